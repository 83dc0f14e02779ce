// Device helpers shared by the naive GPU reference kernels (reference/fwd.cuh, reference/bwd.cuh).
//
// The reference is the oracle for the fast kernels on shapes too large for the CPU reference, so
// it is written for clarity and fp32 accuracy, not speed: one query (or key) row per thread block,
// fp32 accumulation, accurate expf / logf / tanhf, and a mask that is the inequality of
// docs/semantics.md written out. It shares no code with the fast kernels' mask and softmax
// (csrc/common/softmax.cuh) on purpose: a bug in one must not hide in both.
//
// Two ways a block of kThreads threads splits work, used by every reference kernel:
//   - warp per row: a dot product of a row held in shared memory (fp32) with a row in global
//     memory (a key, a value, a query, ...). One warp takes one row at a time, its lanes stride
//     over the head dim (coalesced loads), a butterfly shuffle sums. The order of the sum is fixed,
//     so results are bitwise reproducible.
//   - thread per dim: accumulators over the head dim (O, dQ, dK, dV) live in registers, thread t
//     owning dims t and t + kThreads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common/params.h"

namespace fa::ref {

// ---- launch shape and sizes ------------------------------------------------------------------

inline constexpr int kThreads = 128;           // block size of fwd, bwd _dot and bwd _main
// __launch_bounds__ minimum of resident blocks for the 128-thread kernels: caps registers at
// 65536 / (4 * 128) = 128. Without a minimum, ptxas 13.0 for sm_90 held bwd _main to 64 registers
// and spilled; with it, no reference kernel spills on sm_80 or sm_90.
inline constexpr int kMinBlocksPerSm = 4;
inline constexpr int kConvertThreads = 256;    // block size of bwd _convert
inline constexpr int kWarpSize = 32;
inline constexpr int kWarps = kThreads / kWarpSize;
inline constexpr int kChunk = 128;             // keys (or queries) scored per step of a row's loop
inline constexpr int kMaxHeadDim = 256;        // largest run-time head dim (p.head_dim)
inline constexpr int kDimsPerThread = kMaxHeadDim / kThreads;  // thread-per-dim register slots
inline constexpr unsigned kFullWarp = 0xffffffffu;

static_assert(kThreads % kWarpSize == 0, "the block must be whole warps (warp-per-row dot products)");
static_assert(kMaxHeadDim % kThreads == 0, "thread per dim: every thread owns the same number of dims");
static_assert(kDimsPerThread * kThreads == kMaxHeadDim, "thread-per-dim slots must cover the head dim");

// The element types the reference is instantiated for.
template <typename T>
inline constexpr bool kIsAttnElement = false;
template <>
inline constexpr bool kIsAttnElement<__half> = true;
template <>
inline constexpr bool kIsAttnElement<__nv_bfloat16> = true;

// ---- element conversion ----------------------------------------------------------------------

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---- the launch contract ---------------------------------------------------------------------

// Block-uniform sanity check of what every reference kernel relies on. The Rust side validates all
// of it before launching; a block that finds it broken returns without touching memory rather than
// reading or writing out of bounds.
__device__ __forceinline__ bool contract_ok(const FaParams& p, int block_threads) {
    const bool paged = (p.flags & FA_FLAG_PAGED) != 0;
    const bool varlen = (p.flags & FA_FLAG_VARLEN) != 0;
    return blockDim.x == static_cast<unsigned>(block_threads) && blockDim.y == 1 && blockDim.z == 1 &&
           blockIdx.y < static_cast<unsigned>(p.num_heads) && blockIdx.z < static_cast<unsigned>(p.batch) &&
           p.head_dim >= 1 && p.head_dim <= kMaxHeadDim &&             // thread-per-dim slots
           p.num_heads >= 1 && p.num_heads_k >= 1 && p.num_heads % p.num_heads_k == 0 &&  // GQA
           p.batch >= 1 && p.seqlen_q >= 0 && p.seqlen_k >= 0 &&
           (!varlen || (p.cu_seqlens_q != nullptr && p.cu_seqlens_k != nullptr)) &&
           (!paged || (p.block_table != nullptr && p.page_size >= 1));
}

// Key/value head read by query head h.
__device__ __forceinline__ int kv_head_of(const FaParams& p, int h) {
    return h / (p.num_heads / p.num_heads_k);
}

// ---- sequences and addressing ----------------------------------------------------------------

// Sequence b of the batch: its lengths and where its rows start.
struct SeqView {
    int b;
    int sq;          // query rows of sequence b
    int sk;          // keys of sequence b the kernels see (seqused_k applied); keys >= sk are never read
    int64_t q_row0;  // varlen: global row of query 0 (cu_seqlens_q[b]); dense: 0
    int64_t k_row0;  // varlen: global row of key 0 (cu_seqlens_k[b]); dense: 0
    bool varlen;
};

__device__ __forceinline__ SeqView seq_view(const FaParams& p, int b) {
    SeqView s;
    s.b = b;
    s.varlen = (p.flags & FA_FLAG_VARLEN) != 0;
    int k_capacity;  // keys stored for sequence b
    if (s.varlen) {
        s.q_row0 = p.cu_seqlens_q[b];
        s.k_row0 = p.cu_seqlens_k[b];
        s.sq = p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b];
        k_capacity = p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b];
    } else {
        s.q_row0 = 0;
        s.k_row0 = 0;
        s.sq = p.seqlen_q;
        k_capacity = p.seqlen_k;
    }
    // seqused_k <= capacity per the docs; clamping keeps a bad value from reading past the tensor.
    s.sk = p.seqused_k != nullptr ? min(max(p.seqused_k[b], 0), k_capacity) : k_capacity;
    return s;
}

// A q-like tensor (q, o, dout, dq): dense [b, sq, h, d] or varlen [total_q, h, d], through strides
// in elements; the head dim is contiguous. `E` is `const T` or `T`.
template <typename E>
struct QTensor {
    E* data;
    int64_t batch_stride, row_stride, head_stride;

    // The d contiguous elements of (sequence s, row i, head h). Varlen ignores the batch stride.
    __device__ __forceinline__ E* row(const SeqView& s, int i, int h) const {
        const int64_t batch = s.varlen ? 0 : s.b;
        const int64_t global_row = s.q_row0 + i;
        return data + batch * batch_stride + global_row * row_stride + h * head_stride;
    }
};

// A k-like tensor (k, v): dense [b, sk, hk, d], varlen [total_k, hk, d], or paged
// [pages, page_size, hk, d] addressed through block_table [b, block_table_batch_stride]
// (then the batch stride is the page stride and the row stride the slot stride).
template <typename E>
struct KvTensor {
    E* data;
    int64_t batch_stride, row_stride, head_stride;
    const int32_t* block_table;  // [b, block_table_batch_stride] page ids; null unless paged
    int64_t block_table_batch_stride;
    int page_size;

    // The d contiguous elements of (sequence s, key j, kv head hk).
    __device__ __forceinline__ E* row(const SeqView& s, int j, int hk) const {
        if (block_table != nullptr) {
            const int64_t page = block_table[s.b * block_table_batch_stride + j / page_size];
            const int64_t slot = j % page_size;
            return data + page * batch_stride + slot * row_stride + hk * head_stride;
        }
        const int64_t batch = s.varlen ? 0 : s.b;
        const int64_t global_row = s.k_row0 + j;
        return data + batch * batch_stride + global_row * row_stride + hk * head_stride;
    }
};

// The q-like tensors of the params block (element type T).
template <typename T>
__device__ __forceinline__ QTensor<const T> q_tensor(const FaParams& p) {
    return {static_cast<const T*>(p.q), p.q_batch_stride, p.q_row_stride, p.q_head_stride};
}

template <typename T>
__device__ __forceinline__ QTensor<T> o_tensor(const FaParams& p) {
    return {static_cast<T*>(p.o), p.o_batch_stride, p.o_row_stride, p.o_head_stride};
}

template <typename T>
__device__ __forceinline__ QTensor<const T> dout_tensor(const FaParams& p) {
    return {static_cast<const T*>(p.dout), p.do_batch_stride, p.do_row_stride, p.do_head_stride};
}

template <typename T>
__device__ __forceinline__ QTensor<T> dq_tensor(const FaParams& p) {
    return {static_cast<T*>(p.dq), p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride};
}

// The k-like tensors of the params block (element type T); paged when FA_FLAG_PAGED is set.
template <typename T>
__device__ __forceinline__ KvTensor<const T> k_tensor(const FaParams& p) {
    const bool paged = (p.flags & FA_FLAG_PAGED) != 0;
    return {static_cast<const T*>(p.k), p.k_batch_stride, p.k_row_stride, p.k_head_stride,
            paged ? p.block_table : nullptr, p.block_table_batch_stride, p.page_size};
}

template <typename T>
__device__ __forceinline__ KvTensor<const T> v_tensor(const FaParams& p) {
    const bool paged = (p.flags & FA_FLAG_PAGED) != 0;
    return {static_cast<const T*>(p.v), p.v_batch_stride, p.v_row_stride, p.v_head_stride,
            paged ? p.block_table : nullptr, p.block_table_batch_stride, p.page_size};
}

// Index of (sequence s, head h, row i) in a per-row fp32 statistic: p.lse and p.softmax_d.
// Dense [b, h, seqlen_q] contiguous; varlen [h, total_q] contiguous.
__device__ __forceinline__ int64_t row_stat_index(const FaParams& p, const SeqView& s, int h, int i) {
    if (s.varlen) return static_cast<int64_t>(h) * p.total_q + s.q_row0 + i;
    return (static_cast<int64_t>(s.b) * p.num_heads + h) * p.seqlen_q + i;
}

// ---- mask --------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// Visibility of key j to query i within one sequence (docs/semantics.md, "Visibility").
struct Mask {
    int sk;            // keys of the sequence
    int64_t diag;      // key position of query 0: sk - sq (bottom-right) or 0 (top-left)
    int window_left;   // < 0: unbounded
    int window_right;  // < 0: unbounded
    int sink_tokens;   // keys j < sink_tokens ignore the left bound

    // The definition, written as in the docs. Everything else in this struct only skips work.
    __device__ __forceinline__ bool visible(int i, int j) const {
        if (j < 0 || j >= sk) return false;
        const int64_t pos = i + diag;  // query i's position on the key axis
        const bool right_ok = window_right < 0 || j <= pos + window_right;
        const bool left_ok = window_left < 0 || j >= pos - window_left || j < sink_tokens;
        return right_ok && left_ok;
    }

    // Whether some key of [j0, j1) may be visible to query i. Keys visible to i are
    // [0, right_end) intersected with ([left_begin, inf) union [0, sink_tokens)).
    __device__ __forceinline__ bool any_key_visible(int i, int j0, int j1) const {
        const int64_t pos = i + diag;
        int64_t right_end = sk;  // one past the last key the right bound allows
        if (window_right >= 0) right_end = min64(right_end, pos + window_right + 1);
        const int64_t left_begin = window_left >= 0 ? pos - window_left : 0;
        const int64_t lo = max64(j0, 0);
        const int64_t hi = min64(j1, right_end);  // candidates: [lo, hi)
        return lo < hi && (lo < sink_tokens || hi - 1 >= left_begin);
    }

    // Whether key j may be visible to some query of [i0, i1). Solving the bounds for i:
    // right: i >= j - diag - window_right; left: i <= j - diag + window_left unless j is a sink.
    __device__ __forceinline__ bool any_query_sees(int j, int i0, int i1) const {
        if (j < 0 || j >= sk) return false;
        int64_t lo = i0, hi = i1;  // candidates: [lo, hi)
        if (window_right >= 0) lo = max64(lo, j - diag - window_right);
        if (window_left >= 0 && j >= sink_tokens) hi = min64(hi, j - diag + window_left + 1);
        return lo < hi;
    }
};

__device__ __forceinline__ Mask make_mask(const FaParams& p, const SeqView& s) {
    Mask m;
    m.sk = s.sk;
    m.diag = p.causal_align == FA_ALIGN_BOTTOM_RIGHT ? static_cast<int64_t>(s.sk) - s.sq : 0;
    m.window_left = p.window_left;
    m.window_right = p.window_right;
    m.sink_tokens = p.sink_tokens;
    return m;
}

// ---- score -------------------------------------------------------------------------------------

// s(i, j) from the raw dot q_i . k_j (docs/semantics.md, "Score"): scale, then softcap, then
// ALiBi, in fp32. For query head h of one sequence.
struct ScoreMod {
    float scale;
    float softcap;      // <= 0: off
    float alibi_slope;  // 0 when ALiBi is off
    int64_t diag;       // the mask's diagonal offset (ALiBi uses the same one)

    // Also returns ds/d(scale * q.k): the softcap derivative 1 - tanh^2 (1 without softcap).
    __device__ __forceinline__ float score(float qk, int i, int j, float* softcap_grad) const {
        float s = scale * qk;
        *softcap_grad = 1.0f;
        if (softcap > 0.0f) {
            const float t = tanhf(s / softcap);
            s = softcap * t;
            *softcap_grad = 1.0f - t * t;
        }
        if (alibi_slope != 0.0f) {
            const float distance = fabsf(static_cast<float>(i + diag - j));
            s -= alibi_slope * distance;
        }
        return s;
    }

    __device__ __forceinline__ float score(float qk, int i, int j) const {
        float unused;
        return score(qk, i, j, &unused);
    }
};

__device__ __forceinline__ ScoreMod make_score_mod(const FaParams& p, const SeqView& s, const Mask& m,
                                                  int h) {
    ScoreMod mod;
    mod.scale = p.scale;
    mod.softcap = p.softcap;
    // alibi_slopes: [h] (alibi_batch_stride 0) or [b, h] (alibi_batch_stride = num_heads)
    const int64_t slope_index = static_cast<int64_t>(s.b) * p.alibi_batch_stride + h;
    mod.alibi_slope = p.alibi_slopes != nullptr ? p.alibi_slopes[slope_index] : 0.0f;
    mod.diag = m.diag;
    return mod;
}

// ---- block-level building blocks -------------------------------------------------------------

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarpSize; }
__device__ __forceinline__ int warp_id() { return threadIdx.x / kWarpSize; }

// Sum over the 32 lanes, result in every lane. Needs the whole warp converged.
__device__ __forceinline__ float warp_allreduce_sum(float x) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullWarp, x, offset);
    return x;
}

// Warp per row: dot(x, y) over d dims, x in shared memory (fp32), y in global memory (T). Every
// lane of the (converged) warp gets the result.
template <typename T>
__device__ __forceinline__ float warp_dot(const float* x_smem /* [d] */, const T* y /* [d] */, int d) {
    float acc = 0.0f;
    for (int k = lane_id(); k < d; k += kWarpSize) acc = fmaf(x_smem[k], to_float(y[k]), acc);
    return warp_allreduce_sum(acc);
}

// Sum over the block, result in every thread; fixed order (deterministic). `scratch_smem` holds
// kWarps floats and may be reused once this returns.
__device__ __forceinline__ float block_allreduce_sum(float x, float* scratch_smem /* [kWarps] */) {
    x = warp_allreduce_sum(x);
    if (lane_id() == 0) scratch_smem[warp_id()] = x;
    __syncthreads();  // every warp's partial is in scratch before anyone sums
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += scratch_smem[w];
    __syncthreads();  // everyone has read scratch before a later call overwrites it
    return total;
}

// Load a row of d elements into shared memory as fp32. The caller syncs before reading it.
template <typename T>
__device__ __forceinline__ void load_row_smem(float* dst_smem /* [d] */, const T* src /* [d] */, int d) {
    for (int k = threadIdx.x; k < d; k += kThreads) dst_smem[k] = to_float(src[k]);
}

// Thread per dim: the head-dim index of this thread's register slot `slot`.
__device__ __forceinline__ int dim_of_slot(int slot) { return threadIdx.x + slot * kThreads; }

}  // namespace fa::ref
