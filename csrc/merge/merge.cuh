// Merging attention states: n partial results (O_i, LSE_i) of the same queries over disjoint key
// sets (split-KV decode, chunked prefill, ring / context-parallel attention) combine into the
// result over the union of the key sets:
//
//     m = max_i LSE_i,   w_i = exp(LSE_i - m),   Z = sum_i w_i
//     O = sum_i w_i O_i / Z,   LSE = m + ln Z
//
// A part with LSE_i = -inf (no visible key) has w_i = 0 and its O_i is not read. A row whose parts
// are all -inf writes O = 0 and LSE = -inf, as the forward does for a fully masked row.
//
// FA_MERGE_KERNEL(NAME, T) defines two kernels, for T = __half or __nv_bfloat16:
//
//   extern "C" __global__ void NAME(const MergeParams p)              // merge_states
//   extern "C" __global__ void NAME##_split(const MergeSplitParams p)  // split-KV combine
//
// Launch contract
//   grid  (ceil(batch * seqlen * heads / (kMergeWarpsPerBlock * rows_per_warp(head_dim))), 1, 1)
//   block (32 * kMergeWarpsPerBlock, 1, 1); no shared memory.
//   A row (one query, one head) is merged by L = lanes_per_row(head_dim) lanes: the smallest
//   power of two >= head_dim / 8, at most 32, so a warp takes 32 / L rows and (almost) no lane
//   idles at d <= 128. Row r = ((b * seqlen) + s) * heads + h: consecutive lanes groups and warps
//   take consecutive heads of one query, adjacent in the usual (b, s, h, d) storage. Lane l of a
//   row handles the 8-element chunks l, l + L, ... of the head dim with 16-byte loads and stores
//   (the host checks 16-byte alignment, head_dim % 8 == 0). src/merge.rs mirrors both formulas.
//   LSE_i, LSE (fp32, natural log) are (batch, heads, seqlen) contiguous: element
//   (b * heads + h) * seqlen + s. A varlen tensor is batch 1, seqlen = total tokens, so its
//   (heads, total) LSE is the same formula.
//   Accumulation is fp32 in a fixed order (part 0 first): results are bitwise reproducible.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "merge/params.h"

namespace fa::merge {

inline constexpr int kMergeWarpsPerBlock = 8;

__device__ __forceinline__ int lanes_per_row(int64_t head_dim) {
    int l = 1;
    while (l < 32 && l * 8 < head_dim) l *= 2;
    return l;
}

__device__ __forceinline__ float2 to_float2(uint32_t packed, __half) {
    return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}
__device__ __forceinline__ float2 to_float2(uint32_t packed, __nv_bfloat16) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&packed));
}
__device__ __forceinline__ uint32_t from_float2(float a, float b, __half) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t from_float2(float a, float b, __nv_bfloat16) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// The row (one query, one head) this lane group merges, and this lane's place in its group: the
// mapping of the launch contract above, shared by both kernels.
struct RowSlot {
    int lane;   // 0 .. lanes - 1
    int lanes;  // lanes per row
    bool valid; // false past the last row
    int64_t b, s, h;
    int64_t lse_index;  // (b * heads + h) * seqlen + s
};

__device__ __forceinline__ RowSlot row_slot(int64_t head_dim, int64_t batch, int64_t seqlen, int64_t heads) {
    RowSlot r;
    int const warp = static_cast<int>(threadIdx.x) / 32;
    r.lanes = lanes_per_row(head_dim);
    int const rows_per_warp = 32 / r.lanes;
    r.lane = static_cast<int>(threadIdx.x) % 32 % r.lanes;
    int64_t const row = (static_cast<int64_t>(blockIdx.x) * kMergeWarpsPerBlock + warp) * rows_per_warp +
                        static_cast<int>(threadIdx.x) % 32 / r.lanes;
    r.valid = row < batch * seqlen * heads;
    r.h = row % heads;
    int64_t const bs = row / heads;
    r.s = bs % seqlen;
    r.b = bs / seqlen;
    r.lse_index = (r.b * heads + r.h) * seqlen + r.s;
    return r;
}

// Writes 8 elements acc * inv_z as T at out + off (16 bytes).
template <typename T>
__device__ __forceinline__ void store_chunk(void* out, int64_t off, const float (&acc)[8], float inv_z) {
    uint4 y;
    y.x = from_float2(acc[0] * inv_z, acc[1] * inv_z, T{});
    y.y = from_float2(acc[2] * inv_z, acc[3] * inv_z, T{});
    y.z = from_float2(acc[4] * inv_z, acc[5] * inv_z, T{});
    y.w = from_float2(acc[6] * inv_z, acc[7] * inv_z, T{});
    *reinterpret_cast<uint4*>(reinterpret_cast<T*>(out) + off) = y;
}

// A row with no visible key in any part: O = 0 and LSE = -inf.
template <typename T>
__device__ __forceinline__ void write_empty_row(const RowSlot& r, void* out, int64_t out_base, int64_t chunks,
                                                float* out_lse) {
    for (int64_t c = r.lane; c < chunks; c += r.lanes) {
        *reinterpret_cast<uint4*>(reinterpret_cast<T*>(out) + out_base + 8 * c) = make_uint4(0, 0, 0, 0);
    }
    if (r.lane == 0 && out_lse != nullptr) out_lse[r.lse_index] = -INFINITY;
}

template <typename T>
__device__ void merge_row(const MergeParams& p) {
    RowSlot const r = row_slot(p.head_dim, p.batch, p.seqlen, p.heads);
    if (!r.valid) return;
    int64_t const b = r.b, s = r.s, h = r.h, lse_index = r.lse_index;
    int const n = static_cast<int>(p.n_parts);

    // Every lane reads the n LSEs (one 4-byte load each, broadcast within the lane group).
    float lse[kMaxMergeParts];
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kMaxMergeParts; ++i) {
        lse[i] = i < n ? p.part_lse[i][lse_index] : -INFINITY;
        m = fmaxf(m, lse[i]);
    }
    int64_t const chunks = p.head_dim / 8;
    int64_t const out_base = b * p.out_stride[0] + s * p.out_stride[1] + h * p.out_stride[2];
    if (m == -INFINITY) {
        write_empty_row<T>(r, p.out, out_base, chunks, p.out_lse);
        return;
    }
    // A NaN LSE propagates: exp(NaN) is NaN, so Z and every output of the row are NaN.
    float w[kMaxMergeParts];
    float z = 0.0f;
#pragma unroll
    for (int i = 0; i < kMaxMergeParts; ++i) {
        w[i] = expf(lse[i] - m);  // 0 for a -inf part (and for the unused slots)
        z += w[i];
    }
    float const inv_z = 1.0f / z;

    for (int64_t c = r.lane; c < chunks; c += r.lanes) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int i = 0; i < kMaxMergeParts; ++i) {
            if (i >= n || w[i] == 0.0f) continue;  // an empty part's O is not read
            int64_t const off = b * p.part_stride[i][0] + s * p.part_stride[i][1] + h * p.part_stride[i][2] + 8 * c;
            uint4 const x = *reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(p.part_o[i]) + off);
            uint32_t const words[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                float2 const f = to_float2(words[j], T{});
                acc[2 * j] = fmaf(w[i], f.x, acc[2 * j]);
                acc[2 * j + 1] = fmaf(w[i], f.y, acc[2 * j + 1]);
            }
        }
        store_chunk<T>(p.out, out_base + 8 * c, acc, inv_z);
    }
    if (r.lane == 0 && p.out_lse != nullptr) p.out_lse[lse_index] = m + logf(z);
}

// The split-KV combine: like merge_row, over p.n_splits fp32 parts at fixed offsets, with the
// learnable sink logit (when given) as one more term of the denominator whose O is 0, as the
// forward's finalize has it: Z = sum_i exp(LSE_i) + exp(sink), O = sum_i exp(LSE_i) O_i / Z.
// Same grid, block and row mapping as merge_row; fp32 in split order (bitwise reproducible).
template <typename T>
__device__ void merge_split_row(const MergeSplitParams& p) {
    RowSlot const r = row_slot(p.head_dim, p.batch, p.seqlen, p.heads);
    if (!r.valid) return;
    int64_t const rows = p.batch * p.seqlen * p.heads;
    int64_t const b = r.b, s = r.s, h = r.h, lse_index = r.lse_index;
    int const n = static_cast<int>(p.n_splits);

    float const sink = p.sink_logits != nullptr ? p.sink_logits[h] : -INFINITY;
    float m = sink;
    for (int i = 0; i < n; ++i) m = fmaxf(m, p.lse_partial[i * rows + lse_index]);
    int64_t const chunks = p.head_dim / 8;
    int64_t const out_base = b * p.out_stride[0] + s * p.out_stride[1] + h * p.out_stride[2];
    if (m == -INFINITY) {
        write_empty_row<T>(r, p.out, out_base, chunks, p.out_lse);
        return;
    }
    float z = expf(sink - m);  // 0 without a sink logit
    for (int i = 0; i < n; ++i) z += expf(p.lse_partial[i * rows + lse_index] - m);
    float const inv_z = 1.0f / z;

    for (int64_t c = r.lane; c < chunks; c += r.lanes) {
        float acc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.0f;
        for (int i = 0; i < n; ++i) {
            float const w = expf(p.lse_partial[i * rows + lse_index] - m);
            if (w == 0.0f) continue;  // an empty part's O is not read
            float4 const* src = reinterpret_cast<float4 const*>(p.o_partial + (i * rows + lse_index) * p.head_dim + 8 * c);
            float4 const x0 = src[0], x1 = src[1];
            acc[0] = fmaf(w, x0.x, acc[0]);
            acc[1] = fmaf(w, x0.y, acc[1]);
            acc[2] = fmaf(w, x0.z, acc[2]);
            acc[3] = fmaf(w, x0.w, acc[3]);
            acc[4] = fmaf(w, x1.x, acc[4]);
            acc[5] = fmaf(w, x1.y, acc[5]);
            acc[6] = fmaf(w, x1.z, acc[6]);
            acc[7] = fmaf(w, x1.w, acc[7]);
        }
        store_chunk<T>(p.out, out_base + 8 * c, acc, inv_z);
    }
    if (r.lane == 0 && p.out_lse != nullptr) p.out_lse[lse_index] = m + logf(z);
}

}  // namespace fa::merge

#define FA_MERGE_KERNEL(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(32 * fa::merge::kMergeWarpsPerBlock) NAME(         \
        const MergeParams p) {                                                                      \
        fa::merge::merge_row<T>(p);                                                                 \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(32 * fa::merge::kMergeWarpsPerBlock) NAME##_split( \
        const MergeSplitParams p) {                                                                 \
        fa::merge::merge_split_row<T>(p);                                                           \
    }
