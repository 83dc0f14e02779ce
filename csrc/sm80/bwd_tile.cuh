// Backward scheduling for the sm80 family: one sequence's sizes and row offsets (dense, varlen,
// seqused_k), the fp32 workspace layout shared by the three backward kernels, and the walk of a
// key block over the query blocks that see it (BwdQPlan).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/mask.cuh"
#include "common/params.h"
#include "common/ptx.cuh"

namespace fa {
namespace sm80 {

// The fp32 workspaces of the backward (allocated by src/bwd.rs; sizes in its module docs).
//
// Rows. Every query row of every head owns one workspace row; each sequence's rows are padded to
// a whole number of BM-row blocks so that a block is always BM rows (no bounds checks in the main
// loop):
//   rows per head R = batch * seqlen_q_rounded            (dense, seqlen_q_rounded = ceil(sq / BM) * BM)
//                   = round_up(total_q, 16) + batch * (BM + 16)   (varlen)
//   row of (head h, sequence b, query i) = h * R + seq_row0(b) + i, with seq_row0(b) = b * seqlen_q_rounded
//   (dense) or round_down(cu_q[b], 16) + b * (BM + 16) (varlen: consecutive bases differ by at least
//   len_b + BM + 1 >= ceil(len_b / BM) * BM, so padded sequences never overlap).
// Every block base is a multiple of 16 rows: 16-byte cp.async of a block's statistics, 16-byte
// vector reductions into dq_accum.
// Arrays (the dot kernel writes every row of every block the main kernel visits, padding included):
//   softmax_d[0 .. H*R)        D_i = rowsum(dO_i * O_i), 0 on padding rows
//   softmax_d[H*R .. 2*H*R)    LSE_i * log2(e) (the "log2 LSE"); +inf on padding rows and on rows
//                              whose LSE is -inf (no visible key), so that P = exp2(s - lse) = 0
//   dq_accum[block * BM * D + i] dQ / scale, fp32, zeroed by the dot kernel, accumulated by the
//                              main kernel (red.global.add.v4), converted by the convert kernel;
//                              inside a block of BM rows the values are in the main kernel's
//                              accumulator-fragment order (BwdShape::dq_frag_index), not row-major
//   semaphore[(b * H + h) * ceil(seqlen_q / BM) + m]   (deterministic mode) KV blocks that have
//                              added their dQ of query block m so far; zeroed by the dot kernel
template <int BM>
struct BwdWorkspace {
    __device__ __forceinline__ static int64_t rows_per_head(const FaParams& p) {
        return (p.flags & FA_FLAG_VARLEN) != 0
                   ? ((static_cast<int64_t>(p.total_q) + 15) & ~int64_t{15}) + static_cast<int64_t>(p.batch) * (BM + 16)
                   : static_cast<int64_t>(p.batch) * p.seqlen_q_rounded;
    }
    // Row of (head h, sequence row 0 of the sequence whose workspace base is seq_row0).
    __device__ __forceinline__ static int64_t row(const FaParams& p, int h, int64_t seq_row0) {
        return static_cast<int64_t>(h) * rows_per_head(p) + seq_row0;
    }
    __device__ __forceinline__ static float* dsum(const FaParams& p) { return p.softmax_d; }
    __device__ __forceinline__ static float* lse_log2(const FaParams& p) {
        return p.softmax_d + static_cast<int64_t>(p.num_heads) * rows_per_head(p);
    }
    __device__ __forceinline__ static int m_blocks(const FaParams& p) { return (p.seqlen_q + BM - 1) / BM; }
    __device__ __forceinline__ static int32_t* semaphore(const FaParams& p, int b, int h, int m_block) {
        return p.semaphore + (static_cast<int64_t>(b) * p.num_heads + h) * m_blocks(p) + m_block;
    }
};

// Sequence b of the batch as the backward sees it.
struct BwdSeq {
    int seqlen_q;    // queries of the sequence
    int seqlen_k;    // keys the kernels see (seqused_k applied)
    int capacity_k;  // key rows stored (>= seqlen_k): dK / dV rows the main kernel writes
    int q_row0;      // global row of query 0 (varlen), 0 for dense
    int k_row0;      // global row of key 0 (varlen), 0 for dense
    int ws_row0;     // workspace row of query 0 within a head's R rows (see BwdWorkspace)

    template <int BM>
    __device__ __forceinline__ static BwdSeq make(const FaParams& p, int b) {
        BwdSeq s;
        if ((p.flags & FA_FLAG_VARLEN) != 0) {
            s.q_row0 = p.cu_seqlens_q[b];
            s.k_row0 = p.cu_seqlens_k[b];
            s.seqlen_q = p.cu_seqlens_q[b + 1] - s.q_row0;
            s.capacity_k = p.cu_seqlens_k[b + 1] - s.k_row0;
            s.ws_row0 = (s.q_row0 & ~15) + b * (BM + 16);
        } else {
            s.q_row0 = 0;
            s.k_row0 = 0;
            s.seqlen_q = p.seqlen_q;
            s.capacity_k = p.seqlen_k;
            s.ws_row0 = b * p.seqlen_q_rounded;
        }
        // seqused_k <= capacity (checked by the Rust side); the clamp keeps a bad value in bounds.
        s.seqlen_k = p.seqused_k != nullptr ? min(max(p.seqused_k[b], 0), s.capacity_k) : s.capacity_k;
        return s;
    }
};

// The (key block, kv head, sequence) a main-kernel thread block owns.
struct BwdBlock {
    int n_block;  // key block
    int hk;       // kv head
    int b;        // sequence
};

// The block coordinates of this thread block, in one of three launch orders (the hardware hands
// out thread blocks roughly in ascending linear index, x fastest):
// - deterministic mode: key blocks reversed (x -> gridDim.x - 1 - x), so that the higher key
//   blocks, whose dQ contributions come first (BwdMainloop::dq_rank), launch first;
// - a right mask bound without a left one (causal): key-block-major, lowest key block first.
//   Key block n's walk covers the query blocks from about n * BN / BM on, so the lowest blocks
//   walk longest; handing them out first (longest-processing-time-first) keeps a long walk from
//   starting in the last wave. In the (key block, head, sequence) order every head's walks
//   run long to short, and the last head's longest walk started near the end of the grid;
// - otherwise (every walk about as long) blockIdx as is: the concurrent blocks share one
//   head's Q / dO in L2.
__device__ __forceinline__ BwdBlock bwd_block(const FaParams& p) {
    const int x = ptx::block_idx_x(), y = ptx::block_idx_y(), z = ptx::block_idx_z();
    if ((p.flags & FA_FLAG_DETERMINISTIC) != 0) return {static_cast<int>(gridDim.x) - 1 - x, y, z};
    if (p.window_right >= 0 && p.window_left < 0) {
        const int heads_k = static_cast<int>(gridDim.y);
        const int per_n = heads_k * static_cast<int>(gridDim.z);  // thread blocks per key block
        const int linear = x + static_cast<int>(gridDim.x) * (y + heads_k * z);
        const int rest = linear % per_n;
        return {linear / per_n, rest % heads_k, rest / heads_k};
    }
    return {x, y, z};
}

// Index of (sequence, head h, row i) in the forward's LSE: dense [b, h, sq], varlen [h, total_q].
__device__ __forceinline__ int64_t bwd_lse_index(const FaParams& p, int b, int h, const BwdSeq& s, int i) {
    if ((p.flags & FA_FLAG_VARLEN) != 0) return static_cast<int64_t>(h) * p.total_q + s.q_row0 + i;
    return (static_cast<int64_t>(b) * p.num_heads + h) * p.seqlen_q + i;
}

// The query blocks (of BM rows) that key block n_block (keys [n_block * BN, + BN)) visits: every
// block with a row that sees a key of the block is in [m_begin, m_end); inside it, the blocks of
// [u_begin, u_end) need no element mask (every row sees every key; rows past sq are harmless: their
// Q and dO are zero and their log2 LSE +inf, so P = dS = 0). Masked blocks may hold no visible pair
// at all; they then contribute zeros.
//
// This one function decides which (key block, query block) pairs meet, in the main loop and in
// the deterministic dQ order (a key block's rank at query block m counts the lower key blocks
// whose range holds m), so the two can never disagree.
struct BwdQPlan {
    int m_begin, m_end;
    int u_begin, u_end;

    __device__ __forceinline__ bool masked(int m) const { return m < u_begin || m >= u_end; }
    __device__ __forceinline__ bool visits(int m) const { return m >= m_begin && m < m_end; }

    template <int BM, int BN>
    __device__ __forceinline__ static BwdQPlan make(const Mask& mask, int seqlen_q, int n_block) {
        BwdQPlan pl;
        pl.m_begin = pl.m_end = pl.u_begin = pl.u_end = 0;
        const int key_first = n_block * BN;
        const int key_last = min(key_first + BN, mask.seqlen_k) - 1;
        if (key_first > key_last || seqlen_q <= 0) return pl;
        // Rows that see some key of the block: the right bound of the first key, the left bound of
        // the last key (none when a sink key is in the block: sinks ignore the left bound).
        int row_first = 0, row_last = seqlen_q - 1;
        if (mask.has_right()) row_first = max(row_first, key_first - mask.diag - mask.window_right);
        if (mask.has_left() && key_first >= mask.sink_tokens) {
            row_last = min(row_last, key_last - mask.diag + mask.window_left);
        }
        if (row_first > row_last) return pl;
        pl.m_begin = row_first / BM;
        pl.m_end = row_last / BM + 1;
        pl.u_begin = pl.u_end = pl.m_begin;
        // Unmasked: a full block of keys that every row of the query block sees.
        if (key_first + BN <= mask.seqlen_k) {
            int ub = pl.m_begin, ue = pl.m_end;
            if (mask.has_right()) ub = max(ub, ceil_div(key_first + BN - 1 - mask.diag - mask.window_right, BM));
            if (mask.has_left()) ue = min(ue, floor_div(key_first - mask.diag + mask.window_left - (BM - 1), BM) + 1);
            if (ub < ue) {
                pl.u_begin = ub;
                pl.u_end = ue;
            }
        }
        return pl;
    }
};

}  // namespace sm80
}  // namespace fa
