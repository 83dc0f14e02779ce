// Building blocks of the sm80-family backward: the tile shape (which warp owns what), the shared
// memory layout, the cp.async tile copy and the four warp-level GEMM forms it needs.
//
// Fragment conventions (mma.sync m16n8k16, see common/ptx.cuh): an accumulator array
// c[MT][NT][4] holds rows 16*mt + 8*half + lane/4 and columns 8*nt + 2*(lane%4) + e at
// c[mt][nt][2*half + e]. Shared-memory tiles are rows of 16-bit elements with a pitch that is an
// odd number of 16-byte chunks, so every ldmatrix phase and every 4-byte fragment store is
// conflict-free without a swizzle; the per-step Q / dO tiles of d = 128 / 256 use XOR-swizzled
// rows of D elements instead (BwdMainloop::kSwizzleQ, sm80/smem_rows.cuh).
#pragma once

#include <stdint.h>

#include "common/ptx.cuh"
#include "sm80/smem_rows.cuh"

namespace fa {
namespace sm80 {

// Which warp computes what, for head dim D, BM queries per step, BN keys per thread block and
// W warps (the Q / dO stages only matter to the smem layout).
//
// - Scores are computed transposed, S^T = K Q^T (keys x queries), so that P^T and dS^T come out
//   of the accumulators already in the A-operand layout of dV += P^T dO and dK += dS^T Q.
// - Warps form kWN key groups of kWarpKeys = 16 * kMT key rows; the kWC = W / kWN warps of a
//   group split the group's dK / dV columns (kWarpD each) and the step's queries for S^T
//   (kWarpQ each). With kWC = 1 a warp owns whole rows of dK / dV and its P^T / dS^T never leave
//   registers for dV / dK; with kWC > 1 P^T and dS^T go through shared memory.
// - kMT = 2 (32 key rows per warp: each Q / dO fragment read from smem feeds two MMAs) wherever
//   the warp's dK + dV slab still fits 128 registers; else 16 rows.
// - dQ = dS K (BM x D) is tiled over all W warps (kDqWM x kDqWD), A = dS^T from shared memory.
// src/cells.rs `sm80_bwd_warp_keys` applies the same rule.
template <int D, int BM, int BN, int W>
struct BwdShape {
    static constexpr int kThreads = W * 32;
    // Whether key groups of 16 * mt rows give a valid layout whose dK + dV slab fits 128 registers.
    static constexpr bool layout_fits(int mt) {
        if ((W * 16 * mt) % BN != 0) return false;
        const int wc = W * 16 * mt / BN;
        if (wc != 1 && wc != 2 && wc != 4) return false;
        if (D % (16 * wc) != 0 || BM % (16 * wc) != 0) return false;
        return mt * (D / wc) <= 128;
    }
    static constexpr int kMT = layout_fits(2) ? 2 : 1;
    static constexpr int kWarpKeys = 16 * kMT;
    static constexpr int kWN = BN / kWarpKeys;
    static constexpr int kWC = W / kWN;
    static constexpr int kWarpQ = BM / kWC;  // queries of S^T per warp and step
    static constexpr int kWarpD = D / kWC;   // dK / dV columns per warp
    static constexpr int kDT = kWarpD / 8;   // n8 tiles of dK / dV per warp
    static constexpr bool kPtInSmem = kWC > 1;
    // Accumulator registers per lane of dK + dV.
    static constexpr int kAccRegs = kMT * kWarpD;
    // Registers the accumulators live at once may take: dK + dV plus the scores of a chunk of
    // queries (kScoreBudget), or plus a pass of dQ (kDqBudget); the rest of the 255 holds
    // fragments, addresses and the walk's scalars.
    static constexpr int kScoreBudget = 192;
    static constexpr int kDqBudget = 160;
    // Queries per S^T chunk: the largest power-of-two share of kWarpQ (>= 16) whose S^T + dP^T
    // fit the budget next to dK + dV, and 64 registers (d = 64 with 128-query steps spilled at 128).
    static constexpr int chunk_q() {
        int c = kWarpQ;
        while (c > 16 && (kAccRegs + kMT * c > kScoreBudget || kMT * c > 64)) c /= 2;
        return c;
    }
    static constexpr int kChunkQ = chunk_q();
    static constexpr int kChunkNT = kChunkQ / 8;

    // dQ column passes of a kDqMT x kDqNT warp tile: a warp's dQ tile is computed and added in
    // column slices so that one slice fits the budget next to dK + dV (each pass re-reads the
    // warp's dS rows).
    static constexpr int dq_passes_of(int mt, int nt) {
        int passes = 1;
        while (kAccRegs + mt * (nt / passes) * 4 > kDqBudget && nt % (2 * passes) == 0) passes *= 2;
        return passes;
    }
    // ldmatrix x4 per k16 step of a whole warp dQ tile (all its passes): each pass loads the
    // warp's mt A tiles and its n8 pairs of B.
    static constexpr int dq_ldsm_of(int mt, int nt) {
        const int passes = dq_passes_of(mt, nt);
        return passes * (mt + (nt / passes + 1) / 2);
    }
    // dQ warp grid: the split of the BM x D tile with the fewest shared-memory loads per MMA
    // (passes included), ties to an even number of n8 tiles, then to more rows.
    static constexpr int dq_warps_m() {
        int best = 0;
        for (int wm = 1; wm <= W; wm *= 2) {
            if (W % wm != 0) continue;
            const int wd = W / wm;
            if (BM % (16 * wm) != 0 || D % (8 * wd) != 0) continue;
            if (best == 0) {
                best = wm;
                continue;
            }
            const long mt1 = BM / wm / 16, nt1 = D / wd / 8, mt0 = BM / best / 16, nt0 = D / (W / best) / 8;
            const long lhs = dq_ldsm_of(mt1, nt1) * mt0 * nt0, rhs = dq_ldsm_of(mt0, nt0) * mt1 * nt1;
            const bool even1 = nt1 % 2 == 0, even0 = nt0 % 2 == 0;
            if (lhs < rhs || (lhs == rhs && (even1 && !even0))) best = wm;
        }
        return best;
    }
    static constexpr int kDqWM = dq_warps_m();
    static constexpr int kDqWD = kDqWM > 0 ? W / kDqWM : 1;
    static constexpr int kDqRows = kDqWM > 0 ? BM / kDqWM : 16;
    static constexpr int kDqCols = D / kDqWD;
    static constexpr int kDqMT = kDqRows / 16;
    static constexpr int kDqNT = kDqCols / 8;
    static constexpr int kDqPasses = dq_passes_of(kDqMT, kDqNT);
    static constexpr int kDqPassNT = kDqNT / kDqPasses;

    // dq_accum layout of a query block (BM x D fp32) in fragments: the 4 accumulator values of
    // one lane's m16n8 tile (rows r, r + 8, columns c, c + 1) are 16 consecutive bytes, the 32
    // lanes of one tile 512 consecutive bytes, ordered by (warp, pass, mt, nt). Fragment index:
    __device__ __forceinline__ static int dq_frag_index(int warp, int pass, int mt, int nt, int lane) {
        return (((warp * kDqPasses + pass) * kDqMT + mt) * kDqPassNT + nt) * 32 + lane;
    }
    // ... and the block row / column of value 0 of fragment f (value i: row + 8 * (i / 2), column + i % 2).
    __device__ __forceinline__ static void dq_frag_coords(int f, int& row, int& col) {
        const int lane = f % 32;
        f /= 32;
        const int nt = f % kDqPassNT;
        f /= kDqPassNT;
        const int mt = f % kDqMT;
        f /= kDqMT;
        const int pass = f % kDqPasses;
        const int warp = f / kDqPasses;
        row = (warp % kDqWM) * kDqRows + 16 * mt + lane / 4;
        col = (warp / kDqWM) * kDqCols + (pass * kDqPassNT + nt) * 8 + 2 * (lane % 4);
    }

    static_assert(W == 4 || W == 8, "4 or 8 warps: the register budget assumes 128-256 threads");
    static_assert(D % 16 == 0, "the head dim is walked in k16 steps");
    static_assert(BM % 16 == 0 && BN % 16 == 0, "query and key blocks are whole m16 / k16 tiles");
    static_assert(BN % kWarpKeys == 0 && W % kWN == 0 && (kWC == 1 || kWC == 2 || kWC == 4),
                  "the key groups of 16 * kMT rows must tile BN with 1, 2 or 4 warps each");
    static_assert(kWarpQ % 16 == 0 && kChunkQ % 16 == 0 && kWarpQ % kChunkQ == 0,
                  "each warp's queries are whole k16 steps of dV += P^T dO, in whole chunks");
    static_assert(kWarpD % 16 == 0, "a warp's dK / dV columns are loaded as n8 pairs");
    static_assert(kDqWM > 0, "no warp grid tiles the dQ block in m16 x n8 tiles");
    static_assert(kAccRegs + kMT * kChunkQ <= kScoreBudget && kAccRegs + kDqMT * kDqPassNT * 4 <= kDqBudget,
                  "dK + dV + one chunk of scores (or one pass of dQ) must leave ~60-90 registers");
};

// Dynamic shared memory of one backward thread block (byte offsets; every region 16-byte aligned):
//   k, v:        [BN][D + 8]          the block's keys and values (later the dK / dV staging area)
//   q, dout:     [S][BM][D + 8]       the step's queries and output gradients (S stages; with
//                                     BwdMainloop::kSwizzleQ each stage holds BM swizzled rows of
//                                     D elements and leaves its last BM * 16 bytes unused)
//   lse, dsum:   [S][BM] fp32         the step's log2 LSE and D = rowsum(dO * O)
//   ds:          [BN][BM + 8]         dS^T of the step (for dQ = dS K)
//   pt:          [BN][BM + 8]         P^T of the step (only when kPtInSmem)
//   state:       64 bytes             the block's walk state (BwdWalkState)
// src/cells.rs `sm80_bwd_smem_bytes` computes the same total.
template <class T, int D, int BM, int BN, int W, int S>
struct BwdSmem {
    using Shape = BwdShape<D, BM, BN, W>;
    static constexpr int kPitch = (D + 8) * static_cast<int>(sizeof(T));   // K, V, Q, dO rows
    static constexpr int kSPitch = (BM + 8) * static_cast<int>(sizeof(T));  // dS^T, P^T rows
    static constexpr int kKvBytes = BN * kPitch;
    static constexpr int kQStageBytes = BM * kPitch;
    static constexpr int kStatStageBytes = BM * 4;
    static constexpr int kKOffset = 0;
    static constexpr int kVOffset = kKOffset + kKvBytes;
    static constexpr int kQOffset = kVOffset + kKvBytes;
    static constexpr int kDoOffset = kQOffset + S * kQStageBytes;
    static constexpr int kLseOffset = kDoOffset + S * kQStageBytes;
    static constexpr int kDsumOffset = kLseOffset + S * kStatStageBytes;
    static constexpr int kDsOffset = kDsumOffset + S * kStatStageBytes;
    static constexpr int kPtOffset = kDsOffset + BN * kSPitch;
    static constexpr int kStateOffset = kPtOffset + (Shape::kPtInSmem ? BN * kSPitch : 0);
    static constexpr int kStateBytes = 64;
    static constexpr int kBytes = kStateOffset + kStateBytes;

    static_assert(sizeof(T) == 2, "16-bit elements");
    static_assert((kPitch / 16) % 2 == 1 && kPitch % 16 == 0 && (kSPitch / 16) % 2 == 1 && kSPitch % 16 == 0,
                  "row pitches must be odd numbers of 16-byte chunks (conflict-free ldmatrix)");
    static_assert(S == 1 || S == 2, "one or two Q / dO stages");
    static_assert(kBytes <= 227 * 1024, "dynamic smem must fit the largest opt-in limit (sm_90: 227 KB)");
};

// Cooperative copy of a ROWS x D tile from global rows (any row stride, last dim contiguous,
// 16-byte aligned) into padded smem rows, one 16-byte cp.async per chunk; rows >= rows_valid are
// zero-filled (their source is not read). Adjacent threads take adjacent chunks of a row.
// kSwizzle: rows of D elements (whole 128-byte lines) with XOR-swizzled chunks (SwizzledKvLane).
template <class T, int ROWS, int D, int THREADS, bool kSwizzle = false>
struct BwdTileCopy {
    static constexpr int kPitch = kSwizzle ? D * static_cast<int>(sizeof(T)) : (D + 8) * static_cast<int>(sizeof(T));
    static constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
    static constexpr int kChunksPerRow = D / kElemsPerChunk;
    static constexpr int kThreadsPerRow = kChunksPerRow & -kChunksPerRow;  // lowest set bit
    static constexpr int kChunksPerThreadRow = kChunksPerRow / kThreadsPerRow;
    static constexpr int kRowsPerPass = THREADS / kThreadsPerRow;
    static constexpr int kPasses = (ROWS + kRowsPerPass - 1) / kRowsPerPass;
    static_assert(D % kElemsPerChunk == 0 && THREADS % kThreadsPerRow == 0, "rows are whole chunks");
    static_assert(!kSwizzle || (kPitch % 128 == 0 && kThreadsPerRow % 8 == 0 && kRowsPerPass % 4 == 0),
                  "the swizzled copy: whole 128-byte lines, 8-chunk groups per thread row, and a pass "
                  "stride whose row % 8 change is an XOR");
    // Byte-offset XOR of pass i's chunks (kSwizzle): row + i * kRowsPerPass has row % 8 XOR
    // ((i * kRowsPerPass) % 8).
    __device__ __forceinline__ static uint32_t pass_xor(int i) {
        return kSwizzle ? static_cast<uint32_t>((i * kRowsPerPass) % 8) * 16u : 0u;
    }

    // gmem: row 0 of the tile.
    __device__ __forceinline__ static void issue(uint32_t smem_tile, const T* gmem, int64_t row_stride, int rows_valid,
                                                 int tid) {
        const int row = tid / kThreadsPerRow;
        const int col_chunk = tid % kThreadsPerRow;
        const int64_t stride = ptx::opaque_i64(row_stride);
        const uint32_t smem_thread = smem_tile + row * kPitch + (kSwizzle ? (col_chunk ^ (row % 8)) : col_chunk) * 16;
        const T* gmem_thread = gmem + row * stride + col_chunk * kElemsPerChunk;
#pragma unroll
        for (int i = 0; i < kPasses; ++i) {
            const int r = row + i * kRowsPerPass;
            if (ROWS % kRowsPerPass != 0 && r >= ROWS) break;
            const bool valid = r < rows_valid;
            // Rows past rows_valid keep their (possibly out-of-range) address at d <= 128: a
            // cp.async with src-size 0 reads no global memory, only zero-fills. Without the
            // select to row 0 each pass's source is one 64-bit add (d128: 6 fewer instructions
            // per chunk). H200 2026-12-03 (bwd3 A/B, bf16, 8k): d128 +1.5% non-causal, +1.5% over
            // the launch-order change alone causal; d256 -1.2 to -1.8%, so d > 128 keeps the
            // select (row 0 as the unread source).
            const T* src = (D <= 128 || valid) ? gmem_thread + i * kRowsPerPass * stride : gmem;
#pragma unroll
            for (int j = 0; j < kChunksPerThreadRow; ++j) {
                ptx::cp_async_cg_16((smem_thread ^ pass_xor(i)) + i * kRowsPerPass * kPitch + j * kThreadsPerRow * 16,
                                    src + j * kThreadsPerRow * kElemsPerChunk, valid);
            }
        }
    }
};

// Per-lane byte offsets of ldmatrix x4 row addresses inside a padded tile of pitch PITCH:
// LdmatrixLane's a_x4 (A from a row-major [m][k] tile), b_x4 (B, two n8 tiles x k16, from a
// row-major [n][k] tile) and bt_x4 (B, k16 x two n8 tiles, from a row-major [k][n] tile through
// .trans; also serves x2.trans: lanes 0-15 address k rows 0-15 of one n8 tile), plus at_x4.
template <int PITCH>
struct BwdLane : LdmatrixLane<PITCH> {
    // A (16 x 16) from a row-major [k][m] tile (the transpose is stored), through .trans:
    // matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15).
    __device__ __forceinline__ static uint32_t at_x4(int lane) {
        return ((lane % 8) + 8 * (lane / 16)) * PITCH + ((lane / 8) % 2) * 16;
    }
};

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&c)[MT][NT][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) c[mt][nt][i] = 0.f;
}

// The A fragments of accumulator array c (16*MT x 8*NT) as T: n8 tiles 2kk and 2kk+1 form k16 step kk.
template <class T, int MT, int NT>
__device__ __forceinline__ void acc_to_a_frags(uint32_t (&a)[MT][NT / 2][4], const float (&c)[MT][NT][4]) {
    static_assert(NT % 2 == 0, "two n8 tiles per k16 step");
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            a[mt][kk][0] = ptx::pack_f32x2<T>(c[mt][2 * kk][0], c[mt][2 * kk][1]);          // row g,   k 2t..
            a[mt][kk][1] = ptx::pack_f32x2<T>(c[mt][2 * kk][2], c[mt][2 * kk][3]);          // row g+8, k 2t..
            a[mt][kk][2] = ptx::pack_f32x2<T>(c[mt][2 * kk + 1][0], c[mt][2 * kk + 1][1]);  // row g,   k 2t+8..
            a[mt][kk][3] = ptx::pack_f32x2<T>(c[mt][2 * kk + 1][2], c[mt][2 * kk + 1][3]);  // row g+8, k 2t+8..
        }
}

// c += A B^T, A rows of a [m][k] tile (a_lane = A rows + a_x4), B rows of a [n][k] tile laid
// out as BL says (PaddedKv, SwizzledKv; b_lane = BL::b_x4 of B's rows); K = 16 * KS. PIPE: the
// fragments of k16 step kk + 1 are loaded before the MMAs of step kk (16 more registers;
// gemm_rows_trans likewise).
template <class T, int MT, int NT, int KS, int APITCH, class BL, bool PIPE>
__device__ __forceinline__ void gemm_rows_rows(float (&c)[MT][NT][4], uint32_t a_lane, typename BL::Lane b_lane) {
    static_assert(NT % 2 == 0, "B n8 tiles are loaded in pairs");
    if constexpr (PIPE) {
        // Fragments of k16 step kk + 1 are loaded before the MMAs of step kk.
        uint32_t a[2][MT][4], b[2][NT / 2][4];
        auto load = [&](int kk, int buf) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(a[buf][mt], a_lane + mt * 16 * APITCH + kk * 32);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) ptx::ldmatrix_x4(b[buf][np], BL::addr(b_lane, np, kk));
        };
        load(0, 0);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            if (kk + 1 < KS) load(kk + 1, (kk + 1) % 2);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                const uint32_t b0[2] = {b[kk % 2][np][0], b[kk % 2][np][1]};
                const uint32_t b1[2] = {b[kk % 2][np][2], b[kk % 2][np][3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[kk % 2][mt], b0);
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[kk % 2][mt], b1);
                }
            }
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(a[mt], a_lane + mt * 16 * APITCH + kk * 32);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t r[4];
                ptx::ldmatrix_x4(r, BL::addr(b_lane, np, kk));
                const uint32_t b0[2] = {r[0], r[1]};
                const uint32_t b1[2] = {r[2], r[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[mt], b0);
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[mt], b1);
                }
            }
        }
    }
}

// c += A B, A from registers (acc_to_a_frags, KS k16 steps), B k rows of a [k][n] tile through
// .trans, laid out as BL says (b_lane = BL::bt_x4 of B's first k row, at its first n column).
template <class T, int MT, int KS, int NT, class BL>
__device__ __forceinline__ void gemm_regs_trans(float (&c)[MT][NT][4], const uint32_t (&a)[MT][KS][4],
                                                typename BL::Lane b_lane) {
    static_assert(NT % 2 == 0, "B n8 tiles are loaded in pairs");
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            uint32_t r[4];
            ptx::ldmatrix_x4_trans(r, BL::addr(b_lane, kk, np));
            const uint32_t b0[2] = {r[0], r[1]};
            const uint32_t b1[2] = {r[2], r[3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[mt][kk], b0);
                ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[mt][kk], b1);
            }
        }
    }
}

// c += A B, A rows of a [m][k] tile (a_lane = A rows + a_x4), B through .trans as in gemm_regs_trans.
template <class T, int MT, int KS, int NT, int APITCH, class BL, bool PIPE>
__device__ __forceinline__ void gemm_rows_trans(float (&c)[MT][NT][4], uint32_t a_lane, typename BL::Lane b_lane) {
    static_assert(NT % 2 == 0, "B n8 tiles are loaded in pairs");
    if constexpr (PIPE) {
        // Fragments of k16 step kk + 1 are loaded before the MMAs of step kk.
        uint32_t a[2][MT][4], b[2][NT / 2][4];
        auto load = [&](int kk, int buf) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(a[buf][mt], a_lane + mt * 16 * APITCH + kk * 32);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) ptx::ldmatrix_x4_trans(b[buf][np], BL::addr(b_lane, kk, np));
        };
        load(0, 0);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            if (kk + 1 < KS) load(kk + 1, (kk + 1) % 2);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                const uint32_t b0[2] = {b[kk % 2][np][0], b[kk % 2][np][1]};
                const uint32_t b1[2] = {b[kk % 2][np][2], b[kk % 2][np][3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[kk % 2][mt], b0);
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[kk % 2][mt], b1);
                }
            }
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            uint32_t a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4(a[mt], a_lane + mt * 16 * APITCH + kk * 32);
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                uint32_t r[4];
                ptx::ldmatrix_x4_trans(r, BL::addr(b_lane, kk, np));
                const uint32_t b0[2] = {r[0], r[1]};
                const uint32_t b1[2] = {r[2], r[3]};
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[mt], b0);
                    ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[mt], b1);
                }
            }
        }
    }
}

// c += A B with A stored transposed ([k][m] tile, a_lane = its first k row and m column + at_x4)
// and B through .trans ([k][n] tile, b_lane as in gemm_regs_trans). NT may be odd (the last n8
// tile through ldmatrix x2.trans): dQ column splits such as 40 of d = 80. The fragments of k16
// step kk + 1 are loaded before the MMAs of step kk.
template <class T, int MT, int KS, int NT, int APITCH, int BPITCH>
__device__ __forceinline__ void gemm_trans_trans(float (&c)[MT][NT][4], uint32_t a_lane, uint32_t b_lane) {
    uint32_t a[2][MT][4], b[2][NT / 2 > 0 ? NT / 2 : 1][4], bt[2][2];
    auto load = [&](int kk, int buf) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) ptx::ldmatrix_x4_trans(a[buf][mt], a_lane + kk * 16 * APITCH + mt * 32);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) ptx::ldmatrix_x4_trans(b[buf][np], b_lane + kk * 16 * BPITCH + np * 32);
        if constexpr (NT % 2 == 1) ptx::ldmatrix_x2_trans(bt[buf], b_lane + kk * 16 * BPITCH + (NT / 2) * 32);
    };
    load(0, 0);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
        if (kk + 1 < KS) load(kk + 1, (kk + 1) % 2);
#pragma unroll
        for (int np = 0; np < NT / 2; ++np) {
            const uint32_t b0[2] = {b[kk % 2][np][0], b[kk % 2][np][1]};
            const uint32_t b1[2] = {b[kk % 2][np][2], b[kk % 2][np][3]};
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                ptx::mma_m16n8k16_f32<T>(c[mt][2 * np], a[kk % 2][mt], b0);
                ptx::mma_m16n8k16_f32<T>(c[mt][2 * np + 1], a[kk % 2][mt], b1);
            }
        }
        if constexpr (NT % 2 == 1) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) ptx::mma_m16n8k16_f32<T>(c[mt][NT - 1], a[kk % 2][mt], bt[kk % 2]);
        }
    }
}

}  // namespace sm80
}  // namespace fa
