// Naive GPU reference forward: the oracle for the fast forward kernels (docs/semantics.md).
//
// FA_REFERENCE_FWD_KERNELS(NAME, T) defines one kernel, for T = __half or __nv_bfloat16:
//
//   extern "C" __global__ void NAME(const FaParams p)
//
// Launch contract
//   grid  (p.seqlen_q, p.num_heads, p.batch)   (varlen: p.seqlen_q is the max over the batch)
//   block (128, 1, 1); no dynamic shared memory (2 KB static).
//   Block (x = i, y = h, z = b) computes query row i of head h of sequence b; a row i beyond the
//   sequence's length returns at once.
//
// Reads   q, k, v (T), cu_seqlens_q/k (varlen), seqused_k, block_table (paged), alibi_slopes,
//         sink_logits, the q/k/v strides, batch, seqlen_q, seqlen_k, num_heads, num_heads_k,
//         head_dim (1..256), total_q (varlen LSE), window_left/right, causal_align, sink_tokens,
//         alibi_batch_stride, page_size, block_table_batch_stride, scale, softcap, flags
//         (FA_FLAG_VARLEN, FA_FLAG_PAGED).
// Writes  o (T) through the o strides, every dim of every row of the sequence (zeros for a row
//         with no visible key); lse (fp32, natural log) when p.lse != nullptr: dense
//         [b, h, seqlen_q] contiguous, varlen [h, total_q] contiguous; -inf for a row with no
//         visible key, or the sink logit when p.sink_logits is set.
// Ignores scale_log2, the backward fields, split-KV fields, num_splits, seqlen_q_rounded.
//
// Algorithm, per block (one query row i):
//   1. q_i goes to shared memory as fp32.
//   2. Keys in chunks of kChunk (chunks with no visible key are skipped): a warp per key computes
//      s(i, j) (fp32 dot, then scale, softcap, ALiBi; -inf when masked) into shared memory.
//   3. Online softmax: every thread scans the chunk's scores for the new running max, turns them
//      into p_j = exp(s_j - max), and rescales; each thread accumulates O for its dims,
//      O = O * exp(old max - new max) + sum_j p_j v_j.
//   4. Finalize with the sink logit in the denominator; write O (T) and the LSE.
#pragma once

#include "common/params.h"
#include "reference/common.cuh"

namespace fa::ref {

// Running softmax state of one query row. Every thread of the block holds the same copy: each
// thread scans the whole chunk itself (broadcast reads from shared memory), so the state needs no
// reduction or broadcast and is bitwise identical in all threads.
struct RowSoftmax {
    float row_max = -INFINITY;  // running max of the visible scores; -inf until one is seen
    float row_sum = 0.0f;       // sum over the visible keys seen so far of exp(s - max)

    // Takes the chunk's scores (-inf = masked) into the running max and returns the factor
    // exp(old max - new max) by which everything accumulated so far (sum, O) must be multiplied;
    // 0 while nothing was seen (then sum and O are 0 anyway, and -inf - -inf is never formed).
    __device__ __forceinline__ float rescale_for_chunk(const float* s_smem /* [n] */, int n) {
        float chunk_max = -INFINITY;
        for (int c = 0; c < n; ++c) chunk_max = fmaxf(chunk_max, s_smem[c]);
        const float new_max = fmaxf(row_max, chunk_max);
        const float rescale = row_max == -INFINITY ? 0.0f : expf(row_max - new_max);
        row_max = new_max;
        row_sum *= rescale;
        return rescale;
    }

    // p = exp(s - max) for a score of the current chunk; 0 for a masked one.
    __device__ __forceinline__ float prob(float s) const { return s == -INFINITY ? 0.0f : expf(s - row_max); }

    __device__ __forceinline__ void add_probs(const float* p_smem /* [n] */, int n) {
        for (int c = 0; c < n; ++c) row_sum += p_smem[c];
    }

    struct Result {
        float o_scale;  // O = accumulated O * o_scale
        float lse;      // natural log of the denominator Z
    };

    // Z = row_sum * exp(row_max) + exp(sink_logit); pass sink_logit = -inf when there is none.
    __device__ __forceinline__ Result finalize(float sink_logit) const {
        const float m = fmaxf(row_max, sink_logit);  // reference point of Z, keeps exp() in range
        if (m == -INFINITY) return {0.0f, -INFINITY};  // no visible key and no sink
        const float keys_weight = row_max == -INFINITY ? 0.0f : expf(row_max - m);
        const float sink_weight = sink_logit == -INFINITY ? 0.0f : expf(sink_logit - m);
        const float z = row_sum * keys_weight + sink_weight;  // Z / exp(m), > 0
        return {keys_weight / z, m + logf(z)};
    }
};

struct FwdSmem {
    float q[kMaxHeadDim];  // [d] query row i, fp32
    float s[kChunk];       // [n] scores of the chunk's keys; -inf = masked
    float p[kChunk];       // [n] exp(s - running max); 0 = masked
};
static_assert(sizeof(FwdSmem) <= 48 * 1024, "the reference forward uses static shared memory only (48 KB)");

template <typename T>
__device__ __forceinline__ void forward_row(const FaParams& p) {
    static_assert(kIsAttnElement<T>, "the reference forward is instantiated for __half and __nv_bfloat16");
    __shared__ FwdSmem smem;

    if (!contract_ok(p, kThreads)) return;
    const int i = blockIdx.x;
    const int h = blockIdx.y;
    const SeqView seq = seq_view(p, blockIdx.z);
    if (i >= seq.sq) return;  // block-uniform: no barrier below is skipped by part of the block

    const int d = p.head_dim;
    const int hk = kv_head_of(p, h);
    const Mask mask = make_mask(p, seq);
    const ScoreMod mod = make_score_mod(p, seq, mask, h);
    const QTensor<const T> q = q_tensor<T>(p);
    const QTensor<T> o = o_tensor<T>(p);
    const KvTensor<const T> k = k_tensor<T>(p);
    const KvTensor<const T> v = v_tensor<T>(p);

    load_row_smem(smem.q, q.row(seq, i, h), d);
    __syncthreads();  // q_i complete before any warp dots with it

    RowSoftmax softmax;
    float o_acc[kDimsPerThread] = {};  // thread per dim: sum_j exp(s_j - max) v_j[dim_of_slot(slot)]

    for (int j0 = 0; j0 < seq.sk; j0 += kChunk) {
        const int n = min(kChunk, seq.sk - j0);
        if (!mask.any_key_visible(i, j0, j0 + n)) continue;  // block-uniform; pure work skipping

        // Scores, warp per key. visible() is uniform over the warp, so the shuffles are converged.
        for (int c = warp_id(); c < n; c += kWarps) {
            const int j = j0 + c;
            float s = -INFINITY;
            if (mask.visible(i, j)) s = mod.score(warp_dot(smem.q, k.row(seq, j, hk), d), i, j);
            if (lane_id() == 0) smem.s[c] = s;
        }
        __syncthreads();  // all scores of the chunk written before anyone scans them

        const float o_rescale = softmax.rescale_for_chunk(smem.s, n);
        for (int c = threadIdx.x; c < n; c += kThreads) smem.p[c] = softmax.prob(smem.s[c]);
        __syncthreads();  // all probabilities written before the scans below

        softmax.add_probs(smem.p, n);
#pragma unroll
        for (int slot = 0; slot < kDimsPerThread; ++slot) o_acc[slot] *= o_rescale;
        for (int c = 0; c < n; ++c) {
            const float p_c = smem.p[c];
            if (p_c == 0.0f) continue;  // masked (or underflowed): contributes nothing
            const T* v_row = v.row(seq, j0 + c, hk);
#pragma unroll
            for (int slot = 0; slot < kDimsPerThread; ++slot) {
                const int dim = dim_of_slot(slot);
                if (dim < d) o_acc[slot] = fmaf(p_c, to_float(v_row[dim]), o_acc[slot]);
            }
        }
        __syncthreads();  // everyone is done with s and p before the next chunk overwrites them
    }

    const float sink_logit = p.sink_logits != nullptr ? p.sink_logits[h] : -INFINITY;
    const RowSoftmax::Result result = softmax.finalize(sink_logit);
    T* o_row = o.row(seq, i, h);
#pragma unroll
    for (int slot = 0; slot < kDimsPerThread; ++slot) {
        const int dim = dim_of_slot(slot);
        if (dim < d) o_row[dim] = from_float<T>(o_acc[slot] * result.o_scale);
    }
    if (p.lse != nullptr && threadIdx.x == 0) p.lse[row_stat_index(p, seq, h, i)] = result.lse;
}

}  // namespace fa::ref

// One reference forward kernel for element type T (see the launch contract at the top).
#define FA_REFERENCE_FWD_KERNELS(NAME, T)                                                    \
    static_assert(fa::ref::kIsAttnElement<T>,                                                \
                  "FA_REFERENCE_FWD_KERNELS: T must be __half or __nv_bfloat16");            \
    extern "C" __global__ void __launch_bounds__(fa::ref::kThreads, fa::ref::kMinBlocksPerSm) \
        NAME(const FaParams p) {                                                             \
        fa::ref::forward_row<T>(p);                                                          \
    }
