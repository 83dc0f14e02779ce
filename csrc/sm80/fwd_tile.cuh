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
    int split;               // split-KV part (0 unless p.num_splits > 1)
    int seqlen_q, seqlen_k;  // this sequence's query and (used) key counts
    const T* q;              // [sq, d]     row stride p.q_row_stride
    const T* k;              // [sk, d]     row stride p.k_row_stride
    const T* v;              // [sk, d]     row stride p.v_row_stride
    T* o;                    // [sq, d]     row stride p.o_row_stride
    float* lse;              // [sq] contiguous, or null when LSE is not wanted
    // Paged K/V (kPaged): this sequence's row of the block table, and k / v address slot 0 of
    // page 0 of head_k (key row r lives in page pages[r / p.page_size], slot r % p.page_size;
    // pages are p.k_batch_stride / p.v_batch_stride elements apart). Null otherwise.
    const int32_t* pages;

    // Thread blocks per scheduling section of a right-bounded (causal) grid; see make().
    static constexpr int kSectionBlocks = 512;

    // Grid (ceil(max sq / BM), heads, batch * num_splits). Without a right mask bound every query block costs
    // the same: blockIdx maps directly, and the query blocks of one (batch, head) run side by side
    // (they share its K/V in L2).
    //
    // With one (causal), later query blocks see more keys, and the order matters. The linear
    // block index (x fastest: the hardware's dispatch order) is read as sections of G
    // (batch, head) pairs, ~kSectionBlocks thread blocks each (G = ceil(kSectionBlocks / x),
    // sections balanced to within one pair); inside a section, as (query block from the last,
    // pair) with the pair fastest. So within each section the heaviest query blocks start first
    // and the light ones come last (longest-processing-time-first list scheduling), and the
    // grid's tail is the last section's light blocks. Reversing x within each (batch, head)
    // alone (the previous order) left the heavy blocks of the last pairs to start late and run
    // nearly alone: against it, H100 2026-11-22, causal 2k-16k: d = 64 +0-7%, d = 80 / 96 +2-11%,
    // d = 128 +1-6% (16 heads and GQA 32/8), d = 256 +6-18% (with Q in registers there). One
    // section over all pairs also fixes the tail but spreads the running blocks over every pair,
    // so a K/V block is re-read long after its first use (2-6% slower than sections at d = 64 /
    // 80, 4k-16k, in one run). Sections of 256 or 1024 blocks measured within noise of 512.
    // Heads that share a KV head (GQA) stay adjacent.
    //
    // The block indices are re-read at each call (ptx::block_idx_*), so a kernel may call this
    // again after its main loop instead of holding the pointers in registers across it.
    //
    // kPaged: K/V come from a paged cache (FA_FLAG_PAGED; queries dense, or varlen with
    // FA_FLAG_VARLEN): the key count of a sequence is seqused_k[b] (the host always sets it), and
    // k / v are the pool's head bases.
    template <bool kPaged = false>
    __device__ __forceinline__ static FwdTile make(const FaParams& p) {
        FwdTile t;
        if (p.window_right >= 0) {
            const int m_blocks = static_cast<int>(gridDim.x), heads = static_cast<int>(gridDim.y);
            const int pairs = heads * static_cast<int>(gridDim.z);
            const int linear = ptx::block_idx_x() + m_blocks * (ptx::block_idx_y() + heads * ptx::block_idx_z());
            const int group = min(pairs, (kSectionBlocks + m_blocks - 1) / m_blocks);
            const int64_t sections = (pairs + group - 1) / group;
            // Section s holds pairs [s * pairs / sections, (s + 1) * pairs / sections), i.e.
            // linear indices [first pair * m_blocks, end pair * m_blocks).
            const int64_t pair_of_linear = linear / m_blocks;
            const int64_t section = ((pair_of_linear + 1) * sections - 1) / pairs;
            const int first = static_cast<int>(section * pairs / sections);
            const int size = static_cast<int>((section + 1) * pairs / sections) - first;
            const int local = linear - first * m_blocks;
            const int rank = local / size;  // 0 = the section's last (heaviest) query blocks
            const int pair = first + (local - rank * size);
            t.m_block = m_blocks - 1 - rank;
            t.head = pair % heads;
            t.batch = pair / heads;
        } else {
            t.m_block = ptx::block_idx_x();
            t.head = ptx::block_idx_y();
            t.batch = ptx::block_idx_z();
        }
        // Split-KV (p.num_splits > 1): grid z is batch * num_splits, the splits of a sequence
        // adjacent; split s walks the s-th share of the query block's KV blocks (FwdKvPlan::part).
        t.split = 0;
        if (p.num_splits > 1) {
            t.split = t.batch % p.num_splits;
            t.batch /= p.num_splits;
        }
        t.head_k = t.head / (p.num_heads / p.num_heads_k);

        // Varlen queries (FA_FLAG_VARLEN): rows from cu_seqlens_q; varlen keys too, except for a
        // paged cache, whose keys are addressed through the block table.
        const bool varlen = (p.flags & FA_FLAG_VARLEN) != 0;
        const bool varlen_k = !kPaged && varlen;
        int64_t q_row0 = 0, k_row0 = 0;  // global row of this sequence's first row (varlen)
        if (varlen) {
            q_row0 = p.cu_seqlens_q[t.batch];
            t.seqlen_q = p.cu_seqlens_q[t.batch + 1] - p.cu_seqlens_q[t.batch];
        } else {
            t.seqlen_q = p.seqlen_q;
        }
        if (varlen_k) {
            k_row0 = p.cu_seqlens_k[t.batch];
            t.seqlen_k = p.cu_seqlens_k[t.batch + 1] - p.cu_seqlens_k[t.batch];
        } else {
            t.seqlen_k = p.seqlen_k;
        }
        if (p.seqused_k != nullptr) t.seqlen_k = p.seqused_k[t.batch];

        // Varlen rows are global (the batch stride is unused); dense rows are per batch.
        const int64_t b = varlen ? 0 : t.batch;
        const int64_t b_k = varlen_k ? 0 : t.batch;
        t.q = static_cast<const T*>(p.q) + b * p.q_batch_stride + q_row0 * p.q_row_stride + t.head * p.q_head_stride;
        if constexpr (kPaged) {
            t.k = static_cast<const T*>(p.k) + t.head_k * p.k_head_stride;
            t.v = static_cast<const T*>(p.v) + t.head_k * p.v_head_stride;
            t.pages = p.block_table + static_cast<int64_t>(t.batch) * p.block_table_batch_stride;
        } else {
            t.k = static_cast<const T*>(p.k) + b_k * p.k_batch_stride + k_row0 * p.k_row_stride + t.head_k * p.k_head_stride;
            t.v = static_cast<const T*>(p.v) + b_k * p.v_batch_stride + k_row0 * p.v_row_stride + t.head_k * p.v_head_stride;
            t.pages = nullptr;
        }
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
