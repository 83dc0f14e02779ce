// Building blocks of the sm80-family forward main loop: the shared-memory layout, the cp.async
// tile copy (global -> padded or swizzled smem rows, zero-filling ragged rows) and the two warp-level GEMMs
// (S = Q K^T from smem, O += P V with P straight from registers).
#pragma once

#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "common/mask.cuh"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "sm80/fwd_tile.cuh"
#include "sm80/smem_rows.cuh"

namespace fa {
namespace sm80 {

// Dynamic shared memory of one forward thread block (byte offsets):
//   q: [BM][D + 8]                   the block's queries; later each warp's output staging area
//   k: [S][BN][D + 8]                K pipeline stages
//   v: [S][BN][D + 8]                V pipeline stages
// src/cells.rs `sm80_fwd_smem_bytes` computes the same total: BM * pitch + 2 * S * BN * pitch.
//
// The 16-byte pad that ends each row is never touched by the tile copy, ldmatrix or the
// epilogue; the pads of Q rows 0..3 hold the block's FwdWalkState (four 16-byte lines; five for
// the paged kernels' FwdPagedWalkState). Where FwdMainloop::kSwizzleKv or kSplitKv holds, the K
// (and V) region keeps this size but packs its S stages of BN swizzled rows of D elements
// (SwizzledKvLane or SplitKv, FwdMainloop::kKvStageStride); its last S * BN * 16 bytes are then
// free (the K region's hold the parked row sums, FwdMainloop::row_sum_park).
template <class T, int D, int BM, int BN, int S>
struct FwdSmem {
    static constexpr int kPitchBytes = PaddedRows<T, D>::kPitchBytes;
    static constexpr int kQBytes = BM * kPitchBytes;
    static constexpr int kKvStageBytes = BN * kPitchBytes;
    static constexpr int kQOffset = 0;
    static constexpr int kKOffset = kQOffset + kQBytes;
    static constexpr int kVOffset = kKOffset + S * kKvStageBytes;
    static constexpr int kBytes = kVOffset + S * kKvStageBytes;
    static constexpr int kStateLines = 4;
    static constexpr int kStateOffset = kQOffset + D * static_cast<int>(sizeof(T));  // pad of Q row 0
    static_assert(kPitchBytes - D * static_cast<int>(sizeof(T)) == 16 && BM >= kStateLines,
                  "the walk state needs the 16-byte pads of 4 Q rows");
};

// Cooperative copy of a ROWS x D tile from global rows (any row stride, last dim contiguous,
// 16-byte aligned row starts) into padded smem rows (or swizzled ones, kSwizzle), one 16-byte
// cp.async per chunk.
//
// Thread layout: kThreadsPerRow threads share a row (the largest power of two dividing the
// row's chunk count, so it also divides the block size), each copying kChunksPerThreadRow chunks
// strided by kThreadsPerRow; kRowsPerPass rows per pass. Every cp.async instruction of a warp
// then covers whole 32-byte sectors (adjacent lanes take adjacent chunks), and all per-chunk
// offsets are compile-time immediates off one smem address, one global pointer and one row
// index per thread (nothing per chunk stays live in registers).
template <class T, int ROWS, int D, int THREADS, bool kRolledRaggedCopy = false, bool kSwizzle = false>
struct GmemToSmemTile {
    // kSwizzle: rows of D elements with XOR-swizzled chunks (SwizzledKvLane), else padded rows.
    static constexpr int kPitchBytes = kSwizzle ? D * static_cast<int>(sizeof(T)) : PaddedRows<T, D>::kPitchBytes;
    static constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
    static constexpr int kChunksPerRow = D / kElemsPerChunk;
    static constexpr int kThreadsPerRow = kChunksPerRow & -kChunksPerRow;  // lowest set bit
    static constexpr int kChunksPerThreadRow = kChunksPerRow / kThreadsPerRow;
    static constexpr int kRowsPerPass = THREADS / kThreadsPerRow;
    static constexpr int kPasses = ROWS / kRowsPerPass;
    static_assert(D % kElemsPerChunk == 0, "a row must be a whole number of 16-byte cp.async chunks");
    static_assert(THREADS % kThreadsPerRow == 0, "the threads of a row must tile the block");
    static_assert(ROWS % kRowsPerPass == 0, "every thread must copy the same number of rows of a tile");
    // Swizzled rows of whole 128-byte lines: chunk c of row r at c ^ (r % 8). Narrow swizzled
    // rows (32 or 64 bytes, the tail panel of SplitKv): 128 / kPitchBytes rows share a line and
    // chunk c of row r sits at c ^ ((r / kSwLineRows) % kSwWidth).
    static constexpr bool kNarrowSwizzle = kSwizzle && kPitchBytes < 128;
    static constexpr int kSwLineRows = kNarrowSwizzle ? 128 / kPitchBytes : 1;
    static constexpr int kSwWidth = kNarrowSwizzle ? kChunksPerRow : 8;
    static_assert(!kSwizzle || kNarrowSwizzle ||
                      (kPitchBytes % 128 == 0 && kThreadsPerRow % 8 == 0 && kRowsPerPass % 4 == 0),
                  "the swizzled copy: whole 128-byte lines, 8-chunk groups per thread row, and a pass "
                  "stride whose row % 8 change is an XOR");
    static_assert(!kNarrowSwizzle || ((kPitchBytes == 32 || kPitchBytes == 64) && kThreadsPerRow == kChunksPerRow &&
                                      (kRowsPerPass / kSwLineRows) % kSwWidth == 0),
                  "the narrow swizzled copy: 32- or 64-byte rows, one chunk per thread and row, and a pass "
                  "stride that leaves the swizzle unchanged");
    // Byte-offset XOR of pass i's chunks: row + i * kRowsPerPass has row % 8 XOR ((i * kRowsPerPass) % 8)
    // (kRowsPerPass % 4 == 0), which moves the chunk by that XOR (0 for narrow rows).
    __device__ __forceinline__ static uint32_t pass_xor(int i) {
        return kSwizzle ? static_cast<uint32_t>(((i * kRowsPerPass) / kSwLineRows) % kSwWidth) * 16u : 0u;
    }
    // This thread's first destination: row `row`, chunk `col_chunk` (swizzled by the row).
    __device__ __forceinline__ static uint32_t thread_dst(uint32_t smem_tile, int row, int col_chunk) {
        return smem_tile + row * kPitchBytes +
               (kSwizzle ? (col_chunk ^ ((row / kSwLineRows) % kSwWidth)) : col_chunk) * 16;
    }

    // Copies rows [0, rows_valid) of the tile starting at `gmem` and zero-fills rows
    // [rows_valid, ROWS) (their source is never read). Needs rows_valid >= 1: row 0's address
    // stands in as the (unread) source of the zero-filled chunks. kAllRowsValid: the caller
    // knows rows_valid >= ROWS, no predicates.
    template <bool kAllRowsValid = false>
    __device__ __forceinline__ static void issue(uint32_t smem_tile, const T* gmem, int64_t row_stride,
                                                 int rows_valid, int tid) {
        const int row = tid / kThreadsPerRow;
        const int col_chunk = tid % kThreadsPerRow;
        // Opaque stride: the per-pass offsets below are recomputed at each call instead of being
        // hoisted out of the KV loop as kPasses live 64-bit registers per tensor.
        const int64_t stride = ptx::opaque_i64(row_stride);
        const uint32_t smem_thread = thread_dst(smem_tile, row, col_chunk);
        const T* gmem_thread = gmem + row * stride + col_chunk * kElemsPerChunk;
        const int64_t pass_stride = kRowsPerPass * stride;
        const int rows_left = rows_valid - row;  // pass i is valid iff i * kRowsPerPass < rows_left
        if constexpr (kAllRowsValid || !kRolledRaggedCopy) {
#pragma unroll
            for (int i = 0; i < kPasses; ++i) {
                const bool valid = kAllRowsValid || i * kRowsPerPass < rows_left;
                const T* src_row = valid ? gmem_thread + i * pass_stride : gmem;
#pragma unroll
                for (int j = 0; j < kChunksPerThreadRow; ++j) {
                    ptx::cp_async_cg_16((smem_thread ^ pass_xor(i)) + i * kRowsPerPass * kPitchBytes + j * kThreadsPerRow * 16,
                                        src_row + j * kThreadsPerRow * kElemsPerChunk, valid);
                }
            }
        } else {
            // The same copy as a rolled loop over passes: one running source pointer instead of
            // kPasses live addresses (where the caller has no registers to spare).
            const T* src_row = gmem_thread;
#pragma unroll 1
            for (int i = 0; i < kPasses; ++i) {
                const bool valid = i * kRowsPerPass < rows_left;
                const T* src = valid ? src_row : gmem;
#pragma unroll
                for (int j = 0; j < kChunksPerThreadRow; ++j) {
                    ptx::cp_async_cg_16((smem_thread ^ pass_xor(i)) + i * kRowsPerPass * kPitchBytes + j * kThreadsPerRow * 16,
                                        src + j * kThreadsPerRow * kElemsPerChunk, valid);
                }
                src_row += pass_stride;
            }
        }
    }

    // The same tile from a paged cache: tile row i is key row row0 + i of the sequence, stored in
    // page pages[(row0 + i) / page_size] at slot (row0 + i) % page_size; `base` addresses slot 0
    // of page 0 (this head), pages are page_stride elements apart, slots row_stride. Rows
    // [rows_valid, ROWS) are zero-filled without reading their page entry. One division per call;
    // the thread's later rows (kRowsPerPass apart) advance the page and slot incrementally.
    template <bool kAllRowsValid = false>
    __device__ __forceinline__ static void issue_paged(uint32_t smem_tile, const T* base, int64_t row_stride,
                                                       int64_t page_stride, const int32_t* pages, int page_size,
                                                       int row0, int rows_valid, int tid) {
        const int row = tid / kThreadsPerRow;
        const int col_chunk = tid % kThreadsPerRow;
        const uint32_t smem_thread = thread_dst(smem_tile, row, col_chunk);
        const T* base_thread = base + col_chunk * kElemsPerChunk;
        const int rows_left = rows_valid - row;
        int page = (row0 + row) / page_size;
        int slot = (row0 + row) - page * page_size;
        // Rolled over passes: one running (page, slot) pair instead of kPasses live addresses.
#pragma unroll 1
        for (int i = 0; i < kPasses; ++i) {
            const bool valid = kAllRowsValid || i * kRowsPerPass < rows_left;
            // The unread source of a zero-filled row: slot 0 of page 0, inside the pool.
            const T* src_row = base_thread;
            if (valid) {
                src_row = base_thread + static_cast<int64_t>(__ldg(pages + page)) * page_stride +
                          static_cast<int64_t>(slot) * row_stride;
            }
#pragma unroll
            for (int j = 0; j < kChunksPerThreadRow; ++j) {
                ptx::cp_async_cg_16((smem_thread ^ pass_xor(i)) + i * kRowsPerPass * kPitchBytes + j * kThreadsPerRow * 16,
                                    src_row + j * kThreadsPerRow * kElemsPerChunk, valid);
            }
            slot += kRowsPerPass;
            while (slot >= page_size) {  // once per page boundary (pages of fewer slots: more)
                slot -= page_size;
                ++page;
            }
        }
    }
};

// The cp.async copy of a SplitKv tile: the two panels as two swizzled copies (the tail's source
// 64 elements into each row).
template <class T, int ROWS, int D, int THREADS, bool kRolledRaggedCopy = false>
struct SplitKvCopy {
    using Head = GmemToSmemTile<T, ROWS, 64, THREADS, kRolledRaggedCopy, /*kSwizzle=*/true>;
    using Tail = GmemToSmemTile<T, ROWS, D - 64, THREADS, kRolledRaggedCopy, /*kSwizzle=*/true>;
    static constexpr int kTailOffset = SplitKv<D, ROWS>::kTailOffset;
    template <bool kAllRowsValid = false>
    __device__ __forceinline__ static void issue(uint32_t smem_tile, const T* gmem, int64_t row_stride,
                                                 int rows_valid, int tid) {
        Head::template issue<kAllRowsValid>(smem_tile, gmem, row_stride, rows_valid, tid);
        Tail::template issue<kAllRowsValid>(smem_tile + kTailOffset, gmem + 64, row_stride, rows_valid, tid);
    }
    template <bool kAllRowsValid = false>
    __device__ __forceinline__ static void issue_paged(uint32_t smem_tile, const T* base, int64_t row_stride,
                                                       int64_t page_stride, const int32_t* pages, int page_size,
                                                       int row0, int rows_valid, int tid) {
        Head::template issue_paged<kAllRowsValid>(smem_tile, base, row_stride, page_stride, pages, page_size, row0,
                                                  rows_valid, tid);
        Tail::template issue_paged<kAllRowsValid>(smem_tile + kTailOffset, base + 64, row_stride, page_stride, pages,
                                                  page_size, row0, rows_valid, tid);
    }
};

// s[MT][NT] += Q_warp (16*MT x D) * K_tile^T (D x 8*NT), Q from padded smem (pitch PITCH), K from
// smem laid out as KvL says (PaddedKv, SwizzledKv, SplitKv). q_lane / k_lane: this lane's
// ldmatrix addresses (tile start + LdmatrixLane::a_x4, and KvL::b_x4).
template <class T, int MT, int NT, int D, int PITCH, class KvL>
__device__ __forceinline__ void warp_gemm_qk(float (&s)[MT][NT][4], uint32_t q_lane, typename KvL::Lane k_lane) {
    static_assert(D % 16 == 0 && NT % 2 == 0, "Q K^T walks k-steps of 16 and loads K n-tiles in pairs");
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t q_frag[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(q_frag[mt], q_lane + mt * 16 * PITCH + kk * 32);
        // One K n-tile pair at a time: its fragments feed all MT m-tiles and then die, which keeps
        // 4 registers of K live instead of 2 * NT.
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t r[4];
            ptx::ldmatrix_x4(r, KvL::addr(k_lane, np, kk));
            const uint32_t k_frag0[2] = {r[0], r[1]};
            const uint32_t k_frag1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np], q_frag[mt], k_frag0);
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np + 1], q_frag[mt], k_frag1);
            }
        }
    }
}

// The warp's Q rows as A fragments, [m16 tile][k16 step], for the first KQ k16 steps of the head
// dim, loaded once for the whole walk where the registers allow it (FwdMainloop::kQSteps).
template <class T, int MT, int KQ, int PITCH>
__device__ __forceinline__ void load_q_frags(uint32_t (&q_frag)[MT][KQ][4], uint32_t q_lane) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < KQ; ++kk) ptx::ldmatrix_x4(q_frag[mt][kk], q_lane + mt * 16 * PITCH + kk * 32);
}

// warp_gemm_qk with Q from registers (load_q_frags): only K comes from smem.
template <class T, int MT, int NT, int D, class KvL>
__device__ __forceinline__ void warp_gemm_qk_rq(float (&s)[MT][NT][4], const uint32_t (&q_frag)[MT][D / 16][4],
                                                typename KvL::Lane k_lane) {
    static_assert(D % 16 == 0 && NT % 2 == 0, "Q K^T walks k-steps of 16 and loads K n-tiles in pairs");
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t r[4];
            ptx::ldmatrix_x4(r, KvL::addr(k_lane, np, kk));
            const uint32_t k_frag0[2] = {r[0], r[1]};
            const uint32_t k_frag1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np], q_frag[mt][kk], k_frag0);
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np + 1], q_frag[mt][kk], k_frag1);
            }
        }
    }
}

// warp_gemm_qk with the first KQ < D / 16 k16 steps of Q from registers (load_q_frags) and the
// rest from smem (q_lane: as for warp_gemm_qk).
template <class T, int MT, int NT, int D, int KQ, int PITCH, class KvL>
__device__ __forceinline__ void warp_gemm_qk_partial_rq(float (&s)[MT][NT][4], const uint32_t (&q_regs)[MT][KQ][4],
                                                        uint32_t q_lane, typename KvL::Lane k_lane) {
    static_assert(D % 16 == 0 && NT % 2 == 0, "Q K^T walks k-steps of 16 and loads K n-tiles in pairs");
    static_assert(KQ >= 1 && KQ < D / 16, "some but not all k-steps of Q in registers (else warp_gemm_qk_rq)");
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t q_smem[MT][4];
        if (kk >= KQ) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(q_smem[mt], q_lane + mt * 16 * PITCH + kk * 32);
        }
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t r[4];
            ptx::ldmatrix_x4(r, KvL::addr(k_lane, np, kk));
            const uint32_t k_frag0[2] = {r[0], r[1]};
            const uint32_t k_frag1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                uint32_t q_frag[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) q_frag[i] = kk < KQ ? q_regs[mt][kk < KQ ? kk : 0][i] : q_smem[mt][i];
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np], q_frag, k_frag0);
                ptx::mma_m16n8k16_f32<T>(s[mt][2 * np + 1], q_frag, k_frag1);
            }
        }
    }
}

// o[MT][DT] += P (16*MT x 8*NT, fp32 accumulator fragments, converted here) * V_tile (8*NT x 8*DT).
// The accumulator layout of two adjacent n8 tiles of P is exactly the A layout of one k16 step,
// so P never leaves registers. v_lane: KvL::bt_x4 of the V tile (KvL: the stage layout, as for
// warp_gemm_qk).
template <class T, int MT, int NT, int DT, class KvL>
__device__ __forceinline__ void warp_gemm_pv(float (&o)[MT][DT][4], const float (&p)[MT][NT][4],
                                             typename KvL::Lane v_lane) {
    static_assert(NT % 2 == 0 && DT % 2 == 0, "P V walks k-steps of 16 keys and loads V d-tiles in pairs");
#pragma unroll
    for (int kk = 0; kk < NT / 2; ++kk) {
        uint32_t p_frag[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            p_frag[mt][0] = ptx::pack_f32x2<T>(p[mt][2 * kk][0], p[mt][2 * kk][1]);          // row g,   keys 2t..
            p_frag[mt][1] = ptx::pack_f32x2<T>(p[mt][2 * kk][2], p[mt][2 * kk][3]);          // row g+8, keys 2t..
            p_frag[mt][2] = ptx::pack_f32x2<T>(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);  // row g,   keys 2t+8..
            p_frag[mt][3] = ptx::pack_f32x2<T>(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);  // row g+8, keys 2t+8..
        }
#pragma unroll
        for (int dp = 0; dp < DT / 2; ++dp) {
            uint32_t r[4];
            ptx::ldmatrix_x4_trans(r, KvL::addr(v_lane, kk, dp));
            const uint32_t v_frag0[2] = {r[0], r[1]};
            const uint32_t v_frag1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ptx::mma_m16n8k16_f32<T>(o[mt][2 * dp], p_frag[mt], v_frag0);
                ptx::mma_m16n8k16_f32<T>(o[mt][2 * dp + 1], p_frag[mt], v_frag1);
            }
        }
    }
}

}  // namespace sm80
}  // namespace fa

// ---- the pipelined KV walk ---------------------------------------------------------------------

namespace fa {
namespace sm80 {

// The block-uniform state of the KV walk. Thread 0 writes it to shared memory (the Q row pads,
// see FwdSmem) before the walk; every step re-reads it after its barrier. With O and S taking
// most of the 255 registers, the ~20 scalars below held across the loop would make ptxas spill;
// re-reading them costs four LDS.128 per step.
template <class T>
struct FwdWalkState {
    const T* k;         // [sk, d] row 0 of this (sequence, kv head), row stride p.k_row_stride
    const T* v;         // [sk, d] row stride p.v_row_stride
    FwdKvPlan plan;     // which KV blocks, in which order, which masked
    Mask mask;          // sizes and bounds (sk, diagonal, window, sinks)
    int m_begin;        // the block's first query row in the sequence
    float alibi_slope;  // 0 without ALiBi

    // The walk of query rows [m_begin, m_begin + rows_valid) of `tile` over key blocks of BN.
    template <int BN>
    __device__ __forceinline__ static FwdWalkState make(const FaParams& p, const FwdTile<T>& tile, int m_begin,
                                                        int rows_valid) {
        FwdWalkState st;
        st.k = tile.k;
        st.v = tile.v;
        st.mask = Mask::make(p, tile.seqlen_q, tile.seqlen_k);
        st.plan = st.mask.template fwd_kv_plan<BN>(m_begin, m_begin + rows_valid - 1);
        if (p.num_splits > 1) st.plan = st.plan.part(tile.split, p.num_splits);
        st.m_begin = m_begin;
        st.alibi_slope = ScoreMod::load_alibi_slope(p, tile.batch, tile.head);
        return st;
    }
};

// The walk state of a paged-KV kernel: the dense one (k / v = slot 0 of page 0 of the head) plus
// the sequence's block-table row, padded to whole 16-byte lines (five Q row pads).
template <class T>
struct FwdPagedWalkState : FwdWalkState<T> {
    const int32_t* pages;
    int64_t unused;

    template <int BN>
    __device__ __forceinline__ static FwdPagedWalkState make(const FaParams& p, const FwdTile<T>& tile, int m_begin,
                                                             int rows_valid) {
        FwdPagedWalkState st;
        static_cast<FwdWalkState<T>&>(st) = FwdWalkState<T>::template make<BN>(p, tile, m_begin, rows_valid);
        st.pages = tile.pages;
        st.unused = 0;
        return st;
    }
};

// The forward main loop of one thread block: W warps, each owning BM / W query rows (split-Q, no
// cross-warp reduction), walking the KV blocks of a FwdKvPlan through an S-stage cp.async ring.
//
// Pipeline (one cp.async group per walk step, one barrier per step):
//   prologue: group 0 = Q + the KV block of step 0; groups 1 .. S-2 = steps 1 .. S-2.
//   step t:   wait until group t has landed (wait_group S-2) and barrier; S = Q K^T on stage
//             t % S; issue the block of step t+S-1 into stage (t+S-1) % S = (t-1) % S, which every
//             warp finished in step t-1 (the barrier proves it); commit (possibly empty, so group
//             index == step index); score mods, mask, online softmax, O += P V. (Where registers
//             are short, all or part of the refill comes before S = Q K^T: kRefill.)
// S = 1 (one K and one V buffer, FlashAttention-2's scheme; see step_single_stage):
//   prologue: group 0 = Q + K of step 0.
//   step t:   wait, barrier, issue V(t); S = Q K^T; wait, barrier, issue K(t+1); softmax, P V.
template <class T, int D, int BM, int BN, int W, int S, bool kPaged = false>
struct FwdMainloop {
    static constexpr int kThreads = W * 32;
    static constexpr int kWarpRows = BM / W;
    static constexpr int kMT = kWarpRows / 16;  // m16 tiles per warp
    static constexpr int kNT = BN / 8;          // n8 key tiles per step
    static constexpr int kDT = D / 8;           // n8 tiles of O over the head dim
    using Smem = FwdSmem<T, D, BM, BN, S>;
    static constexpr int kPitch = Smem::kPitchBytes;
    using QCopy = GmemToSmemTile<T, BM, D, kThreads>;
    using Lane = LdmatrixLane<kPitch>;
    using State = std::conditional_t<kPaged, FwdPagedWalkState<T>, FwdWalkState<T>>;
    static constexpr int kStateLines = static_cast<int>(sizeof(State)) / 16;
    static_assert(S >= 1, "one K/V stage at least (S = 1: step_single_stage, S >= 2: step_ring)");
    static_assert(sizeof(State) % 16 == 0 && kStateLines >= Smem::kStateLines && BM >= kStateLines,
                  "the walk state fills whole 16-byte Q row pads");

    // Registers of O plus the scores of a whole block, the per-thread peak of a step.
    static constexpr int kOAndSRegs = kMT * kDT * 4 + kMT * kNT * 4;
    // Where O + S take more than 160 of the 255 registers but at most 192 (d = 128 with 32 rows
    // per warp and 64 keys), the step keeps its whole block as one softmax chunk and parks the
    // per-lane row sums in shared memory between steps (the 4 registers that made ptxas spill):
    // one LDS.128 and one STS.128 per step, in the 16 bytes per K row that the stages leave
    // unused (one line per thread; row_sum_park: since the K / V swizzle, the free end of the
    // packed K region; before it, the pads of the K rows). Measured on H100 (d = 128, 128 x 64): +5-7% over two
    // 32-key chunks, which re-read Q from smem per chunk. (Parking the sums of the d = 256
    // 128 x 64 x 8-warp tile too, in K and V row pads, to hold more of Q: 4-8% slower, H200
    // 2026-12-03.)
    static constexpr bool kParkRowSums = kOAndSRegs > 160 && kOAndSRegs <= 192 && S * BN >= kThreads;
    // Q's A fragments held in registers for the whole walk where O + S + Q fit 160 registers
    // (d = 64 with 64-key blocks, d = 192 with 16 rows per warp and 32 keys): Q K^T then reads
    // only K from smem, a third fewer ldmatrix per k-step. Measured on H100: +2-3% at d = 64
    // (128 x 64); allowing it up to 192 registers with parked sums (d = 80) was 0-6% slower.
    static constexpr int kQRegs = kMT * (D / 16) * 4;
    // d = 192 / 256 with 16 rows per warp: there the step is bound by shared-memory reads (each
    // K / V fragment feeds one m16 MMA) and Q's ldmatrix are a ninth of them. Q stays in
    // registers (64 at d = 256) and the step walks its block in 32-key chunks, so that O + S + Q
    // stay within 208 registers. Measured on H100 (d = 256, 128 x 64 x 8 warps, session 2 of
    // 2026-11-22): non-causal 2k-16k +4-9%, causal +1-4% beyond the grid-order change;
    // 64 x 32 x 4 warps with Q in registers stayed 6% below it.
    static constexpr bool kWideQInRegs =
        D >= 192 && kMT == 1 && S >= 2 && BN % 32 == 0 && kMT * kDT * 4 + kMT * (32 / 8) * 4 + kQRegs <= 208;
    // d = 256, 64-key blocks: the whole block is one softmax chunk (S = 32 registers: 8 independent
    // accumulator chains per k-step of Q K^T instead of 4, one softmax per step instead of two)
    // and only the first 13 of Q's 16 k-steps stay in registers (O 128 + S 32 + Q 52 = 212;
    // the last 3 are re-read from smem at each Q K^T, 3 ldmatrix of 131 per step), with the
    // split refill (kRefill). Measured on H200 (2026-12-03, bf16, two runs alternating with the
    // 32-key chunks with all of Q in registers): non-causal 1k-16k +3.4-3.9%, causal +2.2-3.8%.
    // Same chunk with 14 k-steps +3.1-3.4% (split refill), +2.1-2.5% (early); 12 k-steps, early
    // refill +2.8-3.2%; 8 k-steps -2.5% (early), +1% (late); 32-key chunks with 12 k-steps -7%;
    // all 16 k-steps with a 64-key chunk spill 68 bytes.
    static constexpr bool kWideBlockChunk = kWideQInRegs && D == 256 && BN == 64;
    // Where 32-row warps have a few registers left beside O + S (d = 96 and d = 128 with 64-key
    // blocks), the first k-steps of Q stay in registers (ldmatrix per warp and step: d = 96
    // 60 -> 56, d = 128 80 -> 78). Measured on H200 (2026-12-03, bf16, two runs alternating):
    // d = 96 with 2 k-steps non-causal 2k-8k +1.4-3.6%, causal +1.3-1.5%; with 4 or all 6
    // (spill-free too) -1.7 to +2.7%; d = 128 with 1 k-step (2 spill 56 bytes) 16 heads
    // +0.6-3.2%, causal +1.6-2.1%, GQA 32/8 +1.0-1.9%, causal +0-0.9%.
    static constexpr int kNarrowQSteps = kMT == 2 && BN == 64 ? (D == 96 ? 2 : D == 128 ? 1 : 0) : 0;
    static constexpr bool kQInRegs = kOAndSRegs + kQRegs <= 160 || kWideQInRegs || kNarrowQSteps > 0;
    // k16 steps of Q held in registers (the rest re-read from smem at each Q K^T).
    static constexpr int kQSteps = !kQInRegs ? 0
                                   : kWideBlockChunk ? 13
                                   : kNarrowQSteps > 0 ? kNarrowQSteps
                                   : D / 16;
    struct QFrags {
        uint32_t r[kQInRegs ? kMT : 1][kQInRegs ? kQSteps : 1][4];
    };
    // With 16-row warps and Q in registers (one block per SM, nothing to hide its prologue), the
    // prologue commits Q as a cp.async group of its own ahead of the ring's groups: load_q then
    // waits for Q only, not for the first K/V block as well. The ring's wait_group counts are
    // unchanged (the extra group is the oldest).
    static constexpr bool kQGroup = kWideQInRegs;
    // With Q in registers at d = 256 the unrolled ragged K/V copy (masked steps) spills.
    // K / V rows swizzled (SwizzledKvLane) where the head dim is whole 128-byte lines; Q keeps
    // padded rows (its pads hold the walk state, and Q is copied once per block). The K / V
    // regions keep their padded size (src/cells.rs `sm80_fwd_smem_bytes`). Measured on H200
    // (2026-12-04, bf16, same-process A/B in both orders, perf log run 16 call 9): d = 256
    // +6-12% on all 6 cells (1k / 4k / 16k, both masks), d = 64 +2-6%; 1.033 over 24 cells. A
    // diagnostic build that only aligned the copy's rows (call 8, wrong results) had shown
    // +11-12% at d = 256 and +15% on its 64 x 64 tile. The d = 128 128 x 64 tile, which parks
    // its row sums, kept padded rows until its sums moved to the free end of the packed K
    // region (perf log run 17 call 2): +1.6-5.2% on 16 heads (512 / 1k / 4k / 16k, both masks),
    // +3.0-7.0% on GQA 32 / 8; d = 64 / 256 (packed stages, else unchanged) 0.980-1.022.
    static constexpr bool kSwizzleKv = (D * static_cast<int>(sizeof(T))) % 128 == 0;
    // d = 80 / 96: rows of 160 / 192 bytes in two swizzled panels (SplitKv), for the same
    // reason. Measured on H200 (2026-12-04, bf16, same-process A/B in both orders against padded
    // rows, perf log run 17 call 3): d = 80 +11.7-20.3% on all 10 cells (512 / 1k / 2k / 4k /
    // 16k, both masks), d = 96 +1.5-7.4%.
    static constexpr bool kSplitKv = !kSwizzleKv && (D == 80 || D == 96);
    static constexpr int kKvPitch = kSwizzleKv ? D * static_cast<int>(sizeof(T)) : kPitch;
    using KvL = std::conditional_t<kSwizzleKv, SwizzledKv<kKvPitch>,
                                   std::conditional_t<kSplitKv, SplitKv<D, BN>, PaddedKv<kPitch>>>;
    // Distance of consecutive K (and V) stages. Swizzled stages are packed (BN rows of D
    // elements each), so the S * BN * 16 bytes their rows do not use lie together at the end of
    // the K (and V) region: the row sums park there (row_sum_park).
    static constexpr int kKvStageStride = kSplitKv ? BN * D * static_cast<int>(sizeof(T)) : BN * kKvPitch;
    static_assert(!(kSwizzleKv || kSplitKv) ||
                      (Smem::kKOffset % 128 == 0 && Smem::kVOffset % 128 == 0 && kKvStageStride % 128 == 0),
                  "swizzled K / V stages start on 128-byte lines (the smem base is 128-byte aligned)");
    static_assert(S * kKvStageStride <= S * Smem::kKvStageBytes, "the stages fit their region");
    using KvCopy = std::conditional_t<kSplitKv, SplitKvCopy<T, BN, D, kThreads, /*kRolledRaggedCopy=*/kWideQInRegs>,
                                      GmemToSmemTile<T, BN, D, kThreads, /*kRolledRaggedCopy=*/kWideQInRegs, kSwizzleKv>>;
    // Keys per softmax chunk. Where O + S would take more than that (none of the listed tiles;
    // e.g. d = 80 with 128 keys), a step walks its block in two halves (S of BN / 2 keys): the
    // loads, the barrier and the prefetch distance stay those of the full block, and the step fits.
    static constexpr int kChunkN =
        kWideBlockChunk ? BN
        : kWideQInRegs ? 32
        : (kOAndSRegs > 160 && !kParkRowSums && BN % 32 == 0) ? BN / 2
        : BN;

    // Where the ring refill of a step (the K and V of the block of step t+S-1) is issued:
    // - kLate: after the step's first S = Q K^T (compute() calls it), not right after the
    //   barrier: the MMAs no longer wait behind the walk-state reads, the plan lookup and the copy
    //   addresses (~50 dependent integer instructions), which the scheduler now overlaps with them.
    //   d = 64 / 80 / 96 and d = 128 with 32-key blocks.
    // - kSplit: K after the barrier, V after the first S = Q K^T (V of that block is needed only at
    //   its P V). Where O + S leave no room for both copies' addresses next to S (parked row sums,
    //   d = 128 x 64 keys: the whole late refill spilled 40 bytes; half of it fits), and at d = 96
    //   (H200, 2026-12-02: +1.7-2.6% over kLate without a mask at 512-16k, causal -1.2% at 512 to
    //   +1.3% at 16k), and at d = 256 with its 64-key chunk (kWideBlockChunk; 13 k-steps of Q in
    //   registers fit beside it, 12 with the late refill would spill 28 bytes).
    // - kEarly: both after the barrier. d = 192 / 256 with 32-key chunks and all of Q in registers
    //   (one block per SM): the late refill was 2-6% slower there, and a split one not measurably
    //   faster.
    // Measured on H100 (bf16, full grid, session 3 of 2026-11-22, three runs each alternating
    // with HEAD): geometric mean +2.0% (d = 64 +1-7%, 80 -2..+7%, 96 +0-5%, 128 +0-6%).
    // Tried, not kept (H200, 2026-12-04, perf log run 16): at d = 256 the V refill of unmasked
    // steps issued one copy pass at a time between the MMAs of the first P V k-step, against the
    // write-after-read stall on the last refill address (3.65% of samples in run 15): 0.988.
    enum class Refill { kEarly, kLate, kSplit };
    static constexpr Refill kRefill =
        kWideQInRegs && !kWideBlockChunk ? Refill::kEarly
        : (kParkRowSums || kWideBlockChunk || D == 96) ? Refill::kSplit
        : Refill::kLate;

    const FaParams& p;
    unsigned char* smem;  // the dynamic shared memory (generic pointer into the shared window)

    __device__ __forceinline__ FwdMainloop(const FaParams& params, unsigned char* dynamic_smem)
        : p(params), smem(dynamic_smem) {}

    __device__ __forceinline__ uint32_t smem_base() const { return ptx::smem_u32addr(smem); }
    __device__ __forceinline__ static int stage_of(int t) { return static_cast<int>(static_cast<unsigned>(t) % S); }

    // ---- walk state in the Q row pads ----
    __device__ __forceinline__ uint4* state_line(int i) const {
        return reinterpret_cast<uint4*>(smem + Smem::kStateOffset + i * kPitch);
    }
    // One thread writes; the first step's barrier publishes it.
    __device__ __forceinline__ void store_state(const State& st) const {
        uint4 lines[kStateLines];
        memcpy(lines, &st, sizeof(State));
#pragma unroll
        for (int i = 0; i < kStateLines; ++i) *state_line(i) = lines[i];
    }
    // Plain loads: the compiler drops the lines a step does not use, and cannot hoist them out
    // of the loop past its barrier.
    __device__ __forceinline__ State load_state() const {
        uint4 lines[kStateLines];
#pragma unroll
        for (int i = 0; i < kStateLines; ++i) lines[i] = *state_line(i);
        State st;
        memcpy(&st, lines, sizeof(State));
        return st;
    }

    // load_state through volatile shared loads: read where it stands (after a step's first
    // MMAs), never merged with the step's first read, so that the state is not held across them.
    __device__ __forceinline__ State load_state_fresh() const {
        uint4 lines[kStateLines];
#pragma unroll
        for (int i = 0; i < kStateLines; ++i) {
            lines[i] = ptx::ld_shared_v4_b32(smem_base() + Smem::kStateOffset + i * kPitch);
        }
        State st;
        memcpy(&st, lines, sizeof(State));
        return st;
    }

    // K (or V) of KV block n into ring stage `stage`; keys >= sk are zero-filled (zero V rows
    // keep P V finite where P is 0). kFullBlock: the caller knows the block holds BN keys.
    template <bool kFullBlock>
    __device__ __forceinline__ void load_k(const State& st, int n_block, int stage) const {
        const uint32_t stage_offset = static_cast<uint32_t>(stage) * kKvStageStride;
        if constexpr (kPaged) {
            KvCopy::template issue_paged<kFullBlock>(smem_base() + Smem::kKOffset + stage_offset, st.k, p.k_row_stride,
                                                     p.k_batch_stride, st.pages, p.page_size, n_block * BN,
                                                     st.mask.seqlen_k - n_block * BN, ptx::thread_idx_x());
        } else {
            KvCopy::template issue<kFullBlock>(smem_base() + Smem::kKOffset + stage_offset,
                                               st.k + static_cast<int64_t>(n_block) * BN * p.k_row_stride, p.k_row_stride,
                                               st.mask.seqlen_k - n_block * BN, ptx::thread_idx_x());
        }
    }
    template <bool kFullBlock>
    __device__ __forceinline__ void load_v(const State& st, int n_block, int stage) const {
        const uint32_t stage_offset = static_cast<uint32_t>(stage) * kKvStageStride;
        if constexpr (kPaged) {
            KvCopy::template issue_paged<kFullBlock>(smem_base() + Smem::kVOffset + stage_offset, st.v, p.v_row_stride,
                                                     p.v_batch_stride, st.pages, p.page_size, n_block * BN,
                                                     st.mask.seqlen_k - n_block * BN, ptx::thread_idx_x());
        } else {
            KvCopy::template issue<kFullBlock>(smem_base() + Smem::kVOffset + stage_offset,
                                               st.v + static_cast<int64_t>(n_block) * BN * p.v_row_stride, p.v_row_stride,
                                               st.mask.seqlen_k - n_block * BN, ptx::thread_idx_x());
        }
    }
    template <bool kFullBlock>
    __device__ __forceinline__ void load_kv(const State& st, int n_block, int stage) const {
        load_k<kFullBlock>(st, n_block, stage);
        load_v<kFullBlock>(st, n_block, stage);
    }

    // Publishes the walk state and starts the ring: Q rows [0, rows_valid) of the block (row 0
    // at q; the rest zero-filled) and the blocks of the first S-1 walk steps (S = 1: the K of
    // step 0). Loads nothing when the walk is empty, so that the epilogue may reuse Q's smem at
    // once.
    __device__ __forceinline__ void prologue(const State& st, const T* q, int rows_valid) const {
        const int tid = ptx::thread_idx_x();
        if (tid == 0) store_state(st);
        const int num_blocks = st.plan.num_blocks();
        if (num_blocks > 0) QCopy::issue(smem_base() + Smem::kQOffset, q, p.q_row_stride, rows_valid, tid);
        // (kQGroup) Q alone in a group ahead of the ring's, so load_q waits for Q only, not for
        // the first K/V block too.
        if constexpr (kQGroup) ptx::cp_async_commit_group();
        if constexpr (S == 1) {
            if (num_blocks > 0) load_k</*kFullBlock=*/false>(st, st.plan.block_at(0), 0);
            ptx::cp_async_commit_group();
        } else {
#pragma unroll
            for (int t = 0; t < S - 1; ++t) {
                if (t < num_blocks) load_kv</*kFullBlock=*/false>(st, st.plan.block_at(t), t);
                ptx::cp_async_commit_group();
            }
        }
    }

    // (kQInRegs) Waits for Q (group 0 of the prologue) and loads the warp's Q fragments; the
    // first step's wait and barrier then find group 0 complete. Does nothing otherwise.
    __device__ __forceinline__ void load_q(QFrags& q) const {
        if constexpr (kQInRegs) {
            ptx::cp_async_wait_group<(kQGroup ? S - 1 : S >= 2 ? S - 2 : 0)>();
            // Every thread's share of Q has landed.
            __syncthreads();
            const int tid = ptx::thread_idx_x();
            const int warp = tid / 32, lane = tid % 32;
            load_q_frags<T, kMT, kQSteps, kPitch>(
                q.r, smem_base() + Smem::kQOffset + warp * kWarpRows * kPitch + Lane::a_x4(lane));
        }
    }

    // What the walk does after a step; derived from the smem state, so that not even the trip
    // counts occupy registers across the loop.
    enum class Next { kDone, kMaskedStep, kUnmaskedStep };
    __device__ __forceinline__ static Next next_after(int t, const FwdKvPlan& plan) {
        if (t + 1 >= plan.num_blocks()) return Next::kDone;
        return t + 1 < plan.num_masked() ? Next::kMaskedStep : Next::kUnmaskedStep;
    }
    __device__ __forceinline__ static Next first_step(const FwdKvPlan& plan) { return next_after(-1, plan); }

    // Walk step t: sync the ring, refill it, and fold KV block plan.block_at(t) into O.
    // kMasked: the block needs the element mask (t < plan.num_masked()); unmasked steps only
    // refill unmasked blocks, which hold BN keys each, so their loads need no bound either.
    template <bool kMasked, class Softmax>
    __device__ __forceinline__ Next step(int t, const QFrags& q, float (&o)[kMT][kDT][4], Softmax& softmax) const {
        if constexpr (S == 1) {
            return step_single_stage<kMasked>(t, q, o, softmax);
        } else {
            return step_ring<kMasked>(t, q, o, softmax);
        }
    }

    // Walk step t of the S >= 2 ring: one barrier; the block of step t+S-1 loads while block t computes.
    template <bool kMasked, class Softmax>
    __device__ __forceinline__ Next step_ring(int t, const QFrags& q, float (&o)[kMT][kDT][4], Softmax& softmax) const {
        // Group t (block t, and Q at t = 0) has landed for this thread ...
        ptx::cp_async_wait_group<(S >= 2 ? S - 2 : 0)>();
        // ... and for every thread; every warp has left step t-1, whose stage is refilled below;
        // and (at t = 0) the walk state is published.
        __syncthreads();
        const State st = load_state();
        // The refill: K and / or V of the block of step t+S-1 into the stage every warp left in
        // step t-1, here or after the first S = Q K^T (kRefill); the step's cp.async group is
        // committed after V. Issued late, the block still has the rest of this step and steps
        // t+1 .. t+S-2 to land (and its V until the P V of step t+S-1).
        const auto refill = [&](auto with_k, auto with_v) {
            const State fs = load_state_fresh();
            const int t_fill = t + S - 1;
            if (t_fill < fs.plan.num_blocks()) {
                const int n_fill = kMasked ? fs.plan.block_at(t_fill) : fs.plan.unmasked_block_at(t_fill);
                if constexpr (decltype(with_k)::value) load_k</*kFullBlock=*/!kMasked>(fs, n_fill, stage_of(t_fill));
                if constexpr (decltype(with_v)::value) load_v</*kFullBlock=*/!kMasked>(fs, n_fill, stage_of(t_fill));
            }
            // Always commit (maybe an empty group) so that group index == walk step for wait_group.
            if constexpr (decltype(with_v)::value) ptx::cp_async_commit_group();
        };
        using Yes = std::true_type;
        using No = std::false_type;
        if constexpr (kRefill == Refill::kEarly) refill(Yes{}, Yes{});
        if constexpr (kRefill == Refill::kSplit) refill(Yes{}, No{});
        compute<kMasked>(t, kMasked ? st.plan.block_at(t) : st.plan.unmasked_block_at(t), st, q, o, softmax, [&] {
            if constexpr (kRefill == Refill::kLate) refill(Yes{}, Yes{});
            if constexpr (kRefill == Refill::kSplit) refill(No{}, Yes{});
        });
        // Re-read rather than keep the plan live across the step's register peak.
        return next_after(t, load_state().plan);
    }

    // Walk step t with one K and one V buffer (S = 1, FlashAttention-2's forward pipeline; the
    // smem of one stage lets two blocks share an SM where two stages would not, d = 256 with
    // 64 x 64). Two barriers: V of block t loads during S = Q K^T, K of block t+1 during the
    // softmax and O += P V.
    template <bool kMasked, class Softmax>
    __device__ __forceinline__ Next step_single_stage(int t, const QFrags& q, float (&o)[kMT][kDT][4],
                                                      Softmax& softmax) const {
        static_assert(kChunkN == BN, "the single-stage step holds a whole block of scores");
        // K of block t (and Q, at t = 0) has landed for this thread ...
        ptx::cp_async_wait_group<0>();
        // ... and for every thread; every warp has finished step t-1's P V, so V's buffer may be
        // refilled; (at t = 0) the walk state is published.
        __syncthreads();
        State st = load_state();
        const int n_block = kMasked ? st.plan.block_at(t) : st.plan.unmasked_block_at(t);
        load_v</*kFullBlock=*/!kMasked>(st, n_block, 0);
        ptx::cp_async_commit_group();

        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        // See compute(): a warp that sees no key of the block skips its math (not its barriers).
        const int warp_row0 = st.m_begin + warp * kWarpRows;
        const bool skip =
            kMasked && st.mask.hides(warp_row0, warp_row0 + kWarpRows - 1, n_block * BN, (n_block + 1) * BN);
        float s[kMT][kNT][4];  // [16*kMT rows][BN keys] scores
        if (!skip) chunk_qk(s, q, KvL::b_x4(smem_base() + Smem::kKOffset, lane), warp, lane);

        // V of block t has landed for this thread ...
        ptx::cp_async_wait_group<0>();
        // ... and for every thread; every warp has finished Q K^T, so K's buffer may be refilled.
        __syncthreads();
        st = load_state();
        if (t + 1 < st.plan.num_blocks()) {
            const int n_next = kMasked ? st.plan.block_at(t + 1) : st.plan.unmasked_block_at(t + 1);
            load_k</*kFullBlock=*/!kMasked>(st, n_next, 0);
        }
        ptx::cp_async_commit_group();
        if (!skip) {
            chunk_softmax_pv<kMasked>(s, o, softmax, st, warp_row0 + lane / 4, n_block * BN + 2 * (lane % 4),
                                      KvL::bt_x4(smem_base() + Smem::kVOffset, lane));
        }
        return next_after(t, load_state().plan);
    }

    // This thread's parking line: line `tid` of the free end of the K region, after the packed
    // swizzled stages (kKvStageStride); with padded rows, the pad of K stage row `tid` (stage
    // tid / BN, row tid % BN; the stages are contiguous rows). Only this thread touches it, so
    // program order alone orders its stores and loads. (Written as one multiply: the stage / row
    // form costs the d = 128 step with one k-step of Q in registers a 52-byte spill.)
    __device__ __forceinline__ uint32_t row_sum_park() const {
        static_assert(!kParkRowSums || S * BN >= kThreads, "one K stage row pad per thread");
        static_assert(Smem::kKvStageBytes == BN * kPitch, "K stage rows follow one another");
        const int tid = ptx::thread_idx_x();
        if constexpr (kSwizzleKv || kSplitKv) {
            // The 16-byte line tid of the unused end of the K region (after the packed stages).
            return smem_base() + Smem::kKOffset + S * kKvStageStride + tid * 16;
        } else {
            return smem_base() + Smem::kKOffset + tid * kPitch + D * static_cast<int>(sizeof(T));
        }
    }
    template <class Softmax>
    __device__ __forceinline__ void park_row_sums(const Softmax& softmax) const {
        if constexpr (kParkRowSums) {
            static_assert(Softmax::kRows <= 4, "one 16-byte pad line holds the row sums of one lane");
            uint32_t v[4] = {0u, 0u, 0u, 0u};
#pragma unroll
            for (int r = 0; r < Softmax::kRows; ++r) v[r] = __float_as_uint(softmax.row_sum[r]);
            ptx::st_shared_v4_b32(row_sum_park(), make_uint4(v[0], v[1], v[2], v[3]));
        }
    }
    template <class Softmax>
    __device__ __forceinline__ void unpark_row_sums(Softmax& softmax) const {
        if constexpr (kParkRowSums) {
            const uint4 line = ptx::ld_shared_v4_b32(row_sum_park());
            const uint32_t v[4] = {line.x, line.y, line.z, line.w};
#pragma unroll
            for (int r = 0; r < Softmax::kRows; ++r) softmax.row_sum[r] = __uint_as_float(v[r]);
        }
    }

    // The math of walk step t on KV block n_block: S = Q K^T, score mods, mask (kMasked),
    // online softmax, O += P V, in chunks of kChunkN keys. Lane-derived addresses and indices are recomputed from %tid
    // (cheap) rather than held in registers across the loop.
    // refill(): issued once per call, after the first chunk's S = Q K^T (see step_ring).
    template <bool kMasked, class Softmax, class Refill>
    __device__ __forceinline__ void compute(int t, int n_block, const State& st, const QFrags& q,
                                            float (&o)[kMT][kDT][4], Softmax& softmax, const Refill& refill) const {
        constexpr int kChunkNT = kChunkN / 8;
        static_assert(BN % kChunkN == 0 && kChunkN % 16 == 0, "a chunk is whole k16 steps of P V");
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        if constexpr (kMasked) {
            // A warp none of whose rows sees this block (e.g. the upper half of a 128-row query
            // block on the causal diagonal's last KV block) skips it: O, sums and maxima are
            // unchanged by a block of -inf scores. Warp-uniform; its issue slots go to the
            // other resident block.
            const int warp_row0 = st.m_begin + warp * kWarpRows;
            if (st.mask.hides(warp_row0, warp_row0 + kWarpRows - 1, n_block * BN, (n_block + 1) * BN)) {
                refill();
                return;
            }
        }
        const uint32_t stage_offset = static_cast<uint32_t>(stage_of(t)) * kKvStageStride;
        const typename KvL::Lane k_lane = KvL::b_x4(smem_base() + Smem::kKOffset + stage_offset, lane);
        const typename KvL::Lane v_lane = KvL::bt_x4(smem_base() + Smem::kVOffset + stage_offset, lane);
        // Sequence row / key column of this lane's fragment element [0][0][0].
        const int row0 = st.m_begin + warp * kWarpRows + lane / 4;
        const int col0 = n_block * BN + 2 * (lane % 4);

        // Not unrolled: each chunk's S = Q K^T must not overlap the previous chunk's P V, or the
        // two sets of scores are live at once and the split buys nothing.
#pragma unroll 1
        for (int chunk = 0; chunk < BN / kChunkN; ++chunk) {
            float s[kMT][kChunkNT][4];  // [16*kMT rows][kChunkN keys] scores
            chunk_qk(s, q, KvL::advance(k_lane, chunk * kChunkN), warp, lane);
            if (chunk == 0) refill();
            chunk_softmax_pv<kMasked>(s, o, softmax, st, row0, col0 + chunk * kChunkN,
                                      KvL::advance(v_lane, chunk * kChunkN));
        }
    }

    // S = Q K^T of one chunk: s zeroed and accumulated; k_lane: the chunk's K rows + b_x4.
    template <int NT>
    __device__ __forceinline__ void chunk_qk(float (&s)[kMT][NT][4], const QFrags& q, typename KvL::Lane k_lane,
                                             int warp, int lane) const {
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int i = 0; i < 4; ++i) s[mt][nt][i] = 0.f;
        const uint32_t q_lane = smem_base() + Smem::kQOffset + warp * kWarpRows * kPitch + Lane::a_x4(lane);
        if constexpr (kQInRegs && kQSteps == D / 16) {
            warp_gemm_qk_rq<T, kMT, NT, D, KvL>(s, q.r, k_lane);
        } else if constexpr (kQInRegs) {
            warp_gemm_qk_partial_rq<T, kMT, NT, D, kQSteps, kPitch, KvL>(s, q.r, q_lane, k_lane);
        } else {
            warp_gemm_qk<T, kMT, NT, D, kPitch, KvL>(s, q_lane, k_lane);
        }
    }

    // Score mods, mask (kMasked), online softmax and O += P V of one chunk whose element
    // [0][0][0] sits at (row0, col0); v_lane: the chunk's V rows + bt_x4.
    template <bool kMasked, int NT, class Softmax>
    __device__ __forceinline__ void chunk_softmax_pv(float (&s)[kMT][NT][4], float (&o)[kMT][kDT][4],
                                                     Softmax& softmax, const State& st, int row0, int col0,
                                                     typename KvL::Lane v_lane) const {
        const ScoreMod mod(p, st.alibi_slope, st.mask.diag);
        if (mod.active()) mod.apply(s, row0, col0);
        if constexpr (kMasked) st.mask.apply(s, row0, col0);
        unpark_row_sums(softmax);
        softmax.online_softmax_lazy(s, o);
        park_row_sums(softmax);
        warp_gemm_pv<T, kMT, NT, kDT, KvL>(o, s, v_lane);
    }
};

}  // namespace sm80
}  // namespace fa
