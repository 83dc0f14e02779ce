// Naive GPU reference backward: the oracle for the fast backward kernels (docs/semantics.md,
// "Backward").
//
// FA_REFERENCE_BWD_KERNELS(NAME, T) defines three kernels, for T = __half or __nv_bfloat16, each
// taking one `const FaParams p` by value, launched in this order on one stream:
//
//   NAME_dot      grid (p.seqlen_q, p.num_heads, p.batch), block (128, 1, 1), no dynamic smem.
//                 Block (i, h, b): D_i = sum_d dO_i[d] * O_i[d] (fp32) for query row i of head h
//                 of sequence b, written to p.softmax_d in the LSE layout (dense [b, h, seqlen_q],
//                 varlen [h, total_q]). Rows beyond the sequence's length return at once.
//   NAME_main     grid (p.seqlen_q, p.num_heads, p.batch), block (128, 1, 1), no dynamic smem
//                 (5.5 KB static). Block (x, h, b) plays up to three roles:
//                   1. dQ of query row x of head h (when x < the sequence's length), written to
//                      p.dq (T) through the dq strides; a row with no visible key gets zeros.
//                   2. dK, dV of keys j = x, x + gridDim.x, ... of kv head hk = h / group, but only
//                      in the block of the group's first query head (h % group == 0), which sums
//                      the whole group: fp32 stores into p.dk_accum / p.dv_accum, each element
//                      written by exactly one block.
//                   3. dsink[h] (when p.dsink and p.sink_logits are set), in block (0, h, 0) only:
//                      p.dsink[h] += -sum over all rows i of head h of exp(sink_h - lse_i) * D_i.
//   NAME_convert  grid (ceil(rows_k * num_heads_k * head_dim / 256)), block (256, 1, 1), no smem;
//                 rows_k = batch * seqlen_k (dense) or cu_seqlens_k[batch] (varlen, read on the
//                 device). dk_accum / dv_accum -> p.dk / p.dv (T) through the dk / dv strides.
//
// Workspaces (fp32, zero-filled by the Rust side before NAME_dot):
//   softmax_d  the LSE layout: dense [b, h, seqlen_q], varlen [h, total_q]
//   dk_accum, dv_accum  [rows_k, num_heads_k, head_dim] packed; global key row = b * seqlen_k + j
//              (dense) or cu_seqlens_k[b] + j (varlen). Keys j >= seqused_k[b] stay zero.
//   dsink      [h], accumulated into (the Rust side zeroes it).
//
// Reads (besides the forward's fields, see reference/fwd.cuh): o, dout, lse (as the forward wrote
//         it: it includes the sink logit), softmax_d (written by _dot), dk_accum / dv_accum (by
//         _convert), the o / do / dq / dk / dv strides.
// Writes  softmax_d (_dot); dq, dk_accum, dv_accum, dsink (_main); dk, dv (_convert).
// Paged K/V: not supported by the backward API. _main reads K/V through the same addressing as
//         the forward (so it honours FA_FLAG_PAGED) and indexes the accumulators by b * seqlen_k + j;
//         _convert always writes dk / dv dense (or varlen).
//
// Why dK/dV are computed per key row instead of with atomics from every query row: with one
// query row per block, scattering dS_ij * q_i and P_ij * dO_i into the accumulators costs
// 2 * head_dim fp32 atomics per (i, j) pair, ~1.4e11 for batch 2, 8 heads, seqlen 4096, head dim
// 256, all blocks walking the same keys at once (estimated tens of seconds). Recomputing P and dS
// from the key's side costs about one more forward's arithmetic and needs no atomics at all, so
// the whole backward is bitwise deterministic (FA_FLAG_DETERMINISTIC is satisfied whether set or
// not; the kernels do not read it).
#pragma once

#include "common/params.h"
#include "reference/common.cuh"

namespace fa::ref {

__device__ __forceinline__ bool bwd_dot_pointers_ok(const FaParams& p) {
    return p.o != nullptr && p.dout != nullptr && p.softmax_d != nullptr;
}

__device__ __forceinline__ bool bwd_main_pointers_ok(const FaParams& p) {
    return p.q != nullptr && p.k != nullptr && p.v != nullptr && p.dout != nullptr && p.lse != nullptr &&
           p.softmax_d != nullptr && p.dq != nullptr && p.dk_accum != nullptr && p.dv_accum != nullptr;
}

__device__ __forceinline__ bool bwd_convert_pointers_ok(const FaParams& p) {
    return p.dk_accum != nullptr && p.dv_accum != nullptr && p.dk != nullptr && p.dv != nullptr;
}

// Row of sequence s's key j in the dk_accum / dv_accum workspaces.
__device__ __forceinline__ int64_t accum_key_row(const FaParams& p, const SeqView& s, int j) {
    return s.varlen ? s.k_row0 + j : static_cast<int64_t>(s.b) * p.seqlen_k + j;
}

// ---- NAME_dot: D_i = rowsum(dO_i * O_i) ------------------------------------------------------

template <typename T>
__device__ __forceinline__ void backward_dot_row(const FaParams& p) {
    static_assert(kIsAttnElement<T>, "the reference backward is instantiated for __half and __nv_bfloat16");
    __shared__ float scratch[kWarps];  // block reduction partials

    if (!contract_ok(p, kThreads) || !bwd_dot_pointers_ok(p)) return;
    const int i = blockIdx.x;
    const int h = blockIdx.y;
    const SeqView seq = seq_view(p, blockIdx.z);
    if (i >= seq.sq) return;  // block-uniform

    const QTensor<T> o = o_tensor<T>(p);
    const QTensor<const T> dout = dout_tensor<T>(p);
    const T* o_row = o.row(seq, i, h);      // [d]
    const T* do_row = dout.row(seq, i, h);  // [d]

    float partial = 0.0f;
    for (int dim = threadIdx.x; dim < p.head_dim; dim += kThreads)
        partial = fmaf(to_float(do_row[dim]), to_float(o_row[dim]), partial);
    const float d_i = block_allreduce_sum(partial, scratch);
    if (threadIdx.x == 0) p.softmax_d[row_stat_index(p, seq, h, i)] = d_i;
}

// ---- NAME_main, role 1: dQ of one query row --------------------------------------------------

struct DqSmem {
    float q[kMaxHeadDim];     // [d] q_i, fp32
    float dout[kMaxHeadDim];  // [d] dO_i, fp32
    float ds[kChunk];         // [n] dS'_ij of the chunk's keys (softcap derivative applied); 0 = masked
};

// dQ_i = scale * sum_j dS'_ij k_j, dS'_ij = P_ij (dP_ij - D_i) (1 - tanh^2), P_ij = exp(s_ij - lse_i).
template <typename T>
__device__ __forceinline__ void dq_row(const FaParams& p, const SeqView& seq, int i, int h) {
    __shared__ DqSmem smem;

    const int d = p.head_dim;
    const int hk = kv_head_of(p, h);
    const Mask mask = make_mask(p, seq);
    const ScoreMod mod = make_score_mod(p, seq, mask, h);
    const QTensor<const T> q = q_tensor<T>(p);
    const QTensor<const T> dout = dout_tensor<T>(p);
    const QTensor<T> dq = dq_tensor<T>(p);
    const KvTensor<const T> k = k_tensor<T>(p);
    const KvTensor<const T> v = v_tensor<T>(p);
    const int64_t stat = row_stat_index(p, seq, h, i);
    const float lse_i = p.lse[stat];
    const float d_i = p.softmax_d[stat];

    load_row_smem(smem.q, q.row(seq, i, h), d);
    load_row_smem(smem.dout, dout.row(seq, i, h), d);
    __syncthreads();  // q_i and dO_i complete before any warp dots with them

    float dq_acc[kDimsPerThread] = {};  // thread per dim: sum_j dS'_ij k_j[dim_of_slot(slot)]
    // A row with lse = -inf saw no key (and no sink): it has no gradient. Block-uniform.
    const bool has_keys = lse_i != -INFINITY;
    for (int j0 = 0; has_keys && j0 < seq.sk; j0 += kChunk) {
        const int n = min(kChunk, seq.sk - j0);
        if (!mask.any_key_visible(i, j0, j0 + n)) continue;  // block-uniform; pure work skipping

        // dS'_ij, warp per key (visible() is warp-uniform, so the shuffles are converged).
        for (int c = warp_id(); c < n; c += kWarps) {
            const int j = j0 + c;
            float ds = 0.0f;
            if (mask.visible(i, j)) {
                const float qk = warp_dot(smem.q, k.row(seq, j, hk), d);
                const float dp = warp_dot(smem.dout, v.row(seq, j, hk), d);  // dP_ij = dO_i . v_j
                float softcap_grad;
                const float s = mod.score(qk, i, j, &softcap_grad);
                const float prob = expf(s - lse_i);
                ds = prob * (dp - d_i) * softcap_grad;
            }
            if (lane_id() == 0) smem.ds[c] = ds;
        }
        __syncthreads();  // the chunk's dS' complete before the accumulation reads it

        for (int c = 0; c < n; ++c) {
            const float ds_c = smem.ds[c];
            if (ds_c == 0.0f) continue;  // masked (or exactly zero): contributes nothing
            const T* k_row = k.row(seq, j0 + c, hk);
#pragma unroll
            for (int slot = 0; slot < kDimsPerThread; ++slot) {
                const int dim = dim_of_slot(slot);
                if (dim < d) dq_acc[slot] = fmaf(ds_c, to_float(k_row[dim]), dq_acc[slot]);
            }
        }
        __syncthreads();  // everyone is done with ds before the next chunk overwrites it
    }

    T* dq_row_ptr = dq.row(seq, i, h);
#pragma unroll
    for (int slot = 0; slot < kDimsPerThread; ++slot) {
        const int dim = dim_of_slot(slot);
        if (dim < d) dq_row_ptr[dim] = from_float<T>(mod.scale * dq_acc[slot]);
    }
}

// ---- NAME_main, role 2: dK, dV of one key row, summed over the GQA group ---------------------

struct DkvSmem {
    float k[kMaxHeadDim];  // [d] k_j, fp32
    float v[kMaxHeadDim];  // [d] v_j, fp32
    float p[kChunk];       // [n] P_ij of the chunk's queries; 0 = masked
    float ds[kChunk];      // [n] dS'_ij of the chunk's queries; 0 = masked
};

static_assert(sizeof(DqSmem) + sizeof(DkvSmem) + 2 * kWarps * sizeof(float) <= 48 * 1024,
              "the reference backward uses static shared memory only (48 KB)");

// dV_j = sum_{h in group} sum_i P_ij dO_i,  dK_j = scale * sum_{h in group} sum_i dS'_ij q_i,
// stored (not accumulated: this block is the only writer) into dk_accum / dv_accum.
template <typename T>
__device__ __forceinline__ void dkdv_row(const FaParams& p, const SeqView& seq, int j, int hk) {
    __shared__ DkvSmem smem;

    const int d = p.head_dim;
    const int group = p.num_heads / p.num_heads_k;
    const Mask mask = make_mask(p, seq);
    const QTensor<const T> q = q_tensor<T>(p);
    const QTensor<const T> dout = dout_tensor<T>(p);
    const KvTensor<const T> k = k_tensor<T>(p);
    const KvTensor<const T> v = v_tensor<T>(p);

    __syncthreads();  // the previous key row's readers are done with smem.k / smem.v
    load_row_smem(smem.k, k.row(seq, j, hk), d);
    load_row_smem(smem.v, v.row(seq, j, hk), d);
    __syncthreads();  // k_j and v_j complete before any warp dots with them

    float dk_acc[kDimsPerThread] = {};  // thread per dim: sum dS'_ij q_i[dim_of_slot(slot)]
    float dv_acc[kDimsPerThread] = {};  // thread per dim: sum P_ij dO_i[dim_of_slot(slot)]
    for (int h = hk * group; h < (hk + 1) * group; ++h) {
        const ScoreMod mod = make_score_mod(p, seq, mask, h);
        for (int i0 = 0; i0 < seq.sq; i0 += kChunk) {
            const int n = min(kChunk, seq.sq - i0);
            if (!mask.any_query_sees(j, i0, i0 + n)) continue;  // block-uniform; pure work skipping

            // P_ij and dS'_ij, warp per query (visible() and lse_i are warp-uniform).
            for (int c = warp_id(); c < n; c += kWarps) {
                const int i = i0 + c;
                float prob = 0.0f;
                float ds = 0.0f;
                if (mask.visible(i, j)) {
                    const int64_t stat = row_stat_index(p, seq, h, i);
                    const float lse_i = p.lse[stat];
                    // lse_i is finite whenever a key is visible; the test only keeps a broken LSE
                    // from turning into inf * 0.
                    if (lse_i != -INFINITY) {
                        const float qk = warp_dot(smem.k, q.row(seq, i, h), d);
                        const float dp = warp_dot(smem.v, dout.row(seq, i, h), d);  // dO_i . v_j
                        float softcap_grad;
                        const float s = mod.score(qk, i, j, &softcap_grad);
                        prob = expf(s - lse_i);
                        ds = prob * (dp - p.softmax_d[stat]) * softcap_grad;
                    }
                }
                if (lane_id() == 0) {
                    smem.p[c] = prob;
                    smem.ds[c] = ds;
                }
            }
            __syncthreads();  // the chunk's P and dS' complete before the accumulation reads them

            for (int c = 0; c < n; ++c) {
                const float p_c = smem.p[c];
                const float ds_c = smem.ds[c];
                if (p_c == 0.0f && ds_c == 0.0f) continue;  // masked: contributes nothing
                const T* q_row = q.row(seq, i0 + c, h);
                const T* do_row = dout.row(seq, i0 + c, h);
#pragma unroll
                for (int slot = 0; slot < kDimsPerThread; ++slot) {
                    const int dim = dim_of_slot(slot);
                    if (dim < d) {
                        dv_acc[slot] = fmaf(p_c, to_float(do_row[dim]), dv_acc[slot]);
                        dk_acc[slot] = fmaf(ds_c, to_float(q_row[dim]), dk_acc[slot]);
                    }
                }
            }
            __syncthreads();  // everyone is done with p and ds before the next chunk overwrites them
        }
    }

    const int64_t accum = (accum_key_row(p, seq, j) * p.num_heads_k + hk) * d;  // [rows_k, hk, d]
#pragma unroll
    for (int slot = 0; slot < kDimsPerThread; ++slot) {
        const int dim = dim_of_slot(slot);
        if (dim < d) {
            p.dk_accum[accum + dim] = p.scale * dk_acc[slot];
            p.dv_accum[accum + dim] = dv_acc[slot];
        }
    }
}

// ---- NAME_main, role 3: gradient of the learnable sink logit of head h ------------------------

// dsink_h = -sum over every row i (all sequences) of head h of exp(sink_h - lse_i) * D_i, summed in a
// fixed order by one block.
__device__ __forceinline__ void dsink_head(const FaParams& p, int h) {
    __shared__ float scratch[kWarps];  // block reduction partials

    const float sink_logit = p.sink_logits[h];
    float partial = 0.0f;
    for (int b = 0; b < p.batch; ++b) {
        const SeqView seq = seq_view(p, b);
        for (int i = threadIdx.x; i < seq.sq; i += kThreads) {
            const int64_t stat = row_stat_index(p, seq, h, i);
            const float lse_i = p.lse[stat];
            if (lse_i == -INFINITY) continue;  // cannot happen with a sink logit; no NaN if it does
            partial = fmaf(expf(sink_logit - lse_i), p.softmax_d[stat], partial);
        }
    }
    const float total = block_allreduce_sum(partial, scratch);
    if (threadIdx.x == 0) p.dsink[h] += -total;  // the only writer of dsink[h]; zeroed by the Rust side
}

template <typename T>
__device__ __forceinline__ void backward_main(const FaParams& p) {
    static_assert(kIsAttnElement<T>, "the reference backward is instantiated for __half and __nv_bfloat16");
    if (!contract_ok(p, kThreads) || !bwd_main_pointers_ok(p)) return;
    const int x = blockIdx.x;
    const int h = blockIdx.y;
    const SeqView seq = seq_view(p, blockIdx.z);
    const int group = p.num_heads / p.num_heads_k;

    // Every condition below is block-uniform, so the barriers inside the roles are never split.
    if (x < seq.sq) dq_row<T>(p, seq, x, h);
    if (h % group == 0) {
        for (int j = x; j < seq.sk; j += gridDim.x) dkdv_row<T>(p, seq, j, h / group);
    }
    if (p.dsink != nullptr && p.sink_logits != nullptr && x == 0 && blockIdx.z == 0) dsink_head(p, h);
}

// ---- NAME_convert: fp32 accumulators -> dK, dV ------------------------------------------------

template <typename T>
__device__ __forceinline__ void backward_convert(const FaParams& p) {
    static_assert(kIsAttnElement<T>, "the reference backward is instantiated for __half and __nv_bfloat16");
    if (!contract_ok(p, kConvertThreads) || !bwd_convert_pointers_ok(p)) return;
    const bool varlen = (p.flags & FA_FLAG_VARLEN) != 0;
    const int64_t rows_k = varlen ? p.cu_seqlens_k[p.batch] : static_cast<int64_t>(p.batch) * p.seqlen_k;
    const int64_t total = rows_k * p.num_heads_k * p.head_dim;  // elements of dk_accum
    const int64_t e = static_cast<int64_t>(blockIdx.x) * kConvertThreads + threadIdx.x;
    if (e >= total) return;

    // e = (row * num_heads_k + hk) * head_dim + dim
    const int dim = static_cast<int>(e % p.head_dim);
    const int hk = static_cast<int>((e / p.head_dim) % p.num_heads_k);
    const int64_t row = e / (static_cast<int64_t>(p.head_dim) * p.num_heads_k);
    // Dense: row = b * seqlen_k + j. Varlen: row is the global key row, the batch stride unused.
    const int64_t batch = varlen ? 0 : row / p.seqlen_k;
    const int64_t pos = varlen ? row : row % p.seqlen_k;

    T* dk = static_cast<T*>(p.dk);  // [b, sk, hk, d] or varlen [total_k, hk, d], strided
    T* dv = static_cast<T*>(p.dv);  // like dk, with the dv strides
    const int64_t dk_offset = batch * p.dk_batch_stride + pos * p.dk_row_stride + hk * p.dk_head_stride + dim;
    const int64_t dv_offset = batch * p.dv_batch_stride + pos * p.dv_row_stride + hk * p.dv_head_stride + dim;
    dk[dk_offset] = from_float<T>(p.dk_accum[e]);
    dv[dv_offset] = from_float<T>(p.dv_accum[e]);
}

}  // namespace fa::ref

// The three reference backward kernels for element type T (see the launch contract at the top).
#define FA_REFERENCE_BWD_KERNELS(NAME, T)                                                    \
    static_assert(fa::ref::kIsAttnElement<T>,                                                \
                  "FA_REFERENCE_BWD_KERNELS: T must be __half or __nv_bfloat16");            \
    extern "C" __global__ void __launch_bounds__(fa::ref::kThreads, fa::ref::kMinBlocksPerSm) \
        NAME##_dot(const FaParams p) {                                                       \
        fa::ref::backward_dot_row<T>(p);                                                     \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fa::ref::kThreads, fa::ref::kMinBlocksPerSm) \
        NAME##_main(const FaParams p) {                                                      \
        fa::ref::backward_main<T>(p);                                                        \
    }                                                                                        \
    extern "C" __global__ void __launch_bounds__(fa::ref::kConvertThreads)                   \
        NAME##_convert(const FaParams p) {                                                   \
        fa::ref::backward_convert<T>(p);                                                     \
    }
