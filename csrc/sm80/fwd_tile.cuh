// Forward tile scheduling and sequence bounds for the sm80 family: which (query block, head,
// batch) a thread block owns, the sequence lengths it sees (dense, varlen, seqused_k), and where
// its rows live in global memory.
#pragma once

#include <stdint.h>

#include "common/params.h"
#include "common/ptx.cuh"

namespace fa {
namespace sm80 {

// One thread block's piece of the problem: query rows [m_begin, m_begin + BM) of head `head` of
// sequence `batch`. Pointers address row 0 of this (sequence, head); rows advance by the
// *_row_stride of the params.
template <class T>
struct FwdTile {
    int batch, head, head_k;
    int m_block;
    int seqlen_q, seqlen_k;  // this sequence's query and (used) key counts
    const T* q;              // [sq, d]     row stride p.q_row_stride
    const T* k;              // [sk, d]     row stride p.k_row_stride
    const T* v;              // [sk, d]     row stride p.v_row_stride
    T* o;                    // [sq, d]     row stride p.o_row_stride
    float* lse;              // [sq] contiguous, or null when LSE is not wanted

    // Grid (ceil(max sq / BM), heads, batch). With a right mask bound (causal) later query blocks
    // see more keys, so blockIdx.x is reversed: the heaviest blocks of a (batch, head) start first.
    //
    // The block indices are re-read at each call (ptx::block_idx_*), so a kernel may call this
    // again after its main loop instead of holding the pointers in registers across it.
    __device__ __forceinline__ static FwdTile make(const FaParams& p) {
        FwdTile t;
        t.batch = ptx::block_idx_z();
        t.head = ptx::block_idx_y();
        t.head_k = t.head / (p.num_heads / p.num_heads_k);
        const int block_x = ptx::block_idx_x();
        t.m_block = p.window_right >= 0 ? static_cast<int>(gridDim.x) - 1 - block_x : block_x;

        const bool varlen = (p.flags & FA_FLAG_VARLEN) != 0;
        int64_t q_row0 = 0, k_row0 = 0;  // global row of this sequence's first row (varlen)
        if (varlen) {
            q_row0 = p.cu_seqlens_q[t.batch];
            k_row0 = p.cu_seqlens_k[t.batch];
            t.seqlen_q = p.cu_seqlens_q[t.batch + 1] - p.cu_seqlens_q[t.batch];
            t.seqlen_k = p.cu_seqlens_k[t.batch + 1] - p.cu_seqlens_k[t.batch];
        } else {
            t.seqlen_q = p.seqlen_q;
            t.seqlen_k = p.seqlen_k;
        }
        if (p.seqused_k != nullptr) t.seqlen_k = p.seqused_k[t.batch];

        // Varlen rows are global (the batch stride is unused); dense rows are per batch.
        const int64_t b = varlen ? 0 : t.batch;
        t.q = static_cast<const T*>(p.q) + b * p.q_batch_stride + q_row0 * p.q_row_stride + t.head * p.q_head_stride;
        t.k = static_cast<const T*>(p.k) + b * p.k_batch_stride + k_row0 * p.k_row_stride + t.head_k * p.k_head_stride;
        t.v = static_cast<const T*>(p.v) + b * p.v_batch_stride + k_row0 * p.v_row_stride + t.head_k * p.v_head_stride;
        t.o = static_cast<T*>(p.o) + b * p.o_batch_stride + q_row0 * p.o_row_stride + t.head * p.o_head_stride;
        t.lse = nullptr;
        if (p.lse != nullptr) {
            // Dense [b, h, sq] at (b * h_count + h) * sq + i; varlen [h, total_q] at h * total_q + cu_q[b] + i.
            t.lse = varlen ? p.lse + static_cast<int64_t>(t.head) * p.total_q + q_row0
                           : p.lse + (static_cast<int64_t>(t.batch) * p.num_heads + t.head) * p.seqlen_q;
        }
        return t;
    }
};

}  // namespace sm80
}  // namespace fa
