// FlashAttention-3-class backward for sm_90a (H100 / H200): TMA loads of Q / dO / K / V through
// tensor maps, 1-D bulk copies of the row statistics, mbarrier double buffering, and all five
// GEMMs on wgmma (S^T and dP^T SS, dV and dK RS with P^T / dS^T in registers, dQ SS with both
// operands MN-major).
//
// ================================ launch contract ================================================
// Instantiation (one line per tile of `sm90_bwd_tiles(d)`, src/cells.rs; one tile per head dim:
// BM = 64 query rows per step, W = 8 warps, and BN = 128 key rows per thread block with S = 3
// Q / dO stages at d <= 128 (bwd_main, this file), BN = 64 with S = 2 at d = 192, 256
// (bwd_main_wide, csrc/sm90/bwd_wide.cuh)):
//     FA_SM90_BWD_KERNEL(fa_sm90_bwd_{dtype}_hd{D}_m64n128w8s3, T, D, 64, 128, 8, 3, SMEM)
//     FA_SM90_BWD_KERNEL(fa_sm90_bwd_{dtype}_hd{D}_m64n64w8s2, T, D, 64, 64, 8, 2, SMEM)
// which defines three kernels, launched in this order on one stream by src/bwd.rs:
//   NAME_dot      the sm80 family's preprocess (csrc/sm80/bwd.cuh, BM = 64): D = rowsum(dO * O),
//                 the log2 LSE, dq_accum zeroed. grid (ceil(seqlen_q / 64), heads, batch), 256 threads.
//   NAME_main     grid (ceil(max key capacity / BN), heads_k, batch), 256 threads (two
//                 warpgroups), SMEM bytes of dynamic shared memory; arguments
//                 (FaParams p, CUtensorMap tma_q, tma_k, tma_v, tma_do), each map as in the
//                 forward (src/sm90_tma.rs) with box rows 64 (Q, dO) and BN (K, V).
//   NAME_convert  grid (ceil(seqlen_q / 64), heads, batch), 256 threads: dq = scale * dq_accum
//                 (this kernel's fragment-major order, below), and dsink as in the sm80 family.
// Deterministic mode's main kernel, NAME_main_det (same grid and arguments as NAME_main), comes
// from FA_SM90_BWD_DET_KERNEL (end of this file), which build.rs compiles into a second image.
// Workspaces: the sm80 family's (csrc/sm80/bwd_tile.cuh, BwdWorkspace<64>): the same rows, the
// same statistics; only the order of the 64 x D fp32 values inside a dq_accum block differs.
//
// Design of the main kernel
// - One thread block owns key block n (BN = 128 keys) of kv head hk of sequence b: K and V are
//   loaded once (rows past the sequence's keys zeroed in smem), dK and dV stay in registers, and
//   the block walks every (query head of the GQA group, query block of 64 rows) that sees it
//   (sm80::BwdQPlan, the same walk as the sm80 family). Warpgroup w owns keys [64 w, 64 w + 64).
// - Per step, per warpgroup: S^T = K_w Q^T and dP^T = V_w dO^T (m64n64, SS, K-major operands);
//   P^T = exp2(S^T scale log2(e) - lse2), dS^T = P^T (dP^T - D) in the accumulator layout, which
//   is also the A layout of dV += P^T dO and dK += dS^T Q (RS, B MN-major). dS^T goes to smem as
//   a [key][query] tile with the 128 B swizzle, from which dQ = dS K is one m64 GEMM over all 128
//   keys (A = dS MN-major, B = K MN-major); warpgroup w computes D / 2 head-dim columns
//   (BwdHalfCols: [w D / 2, (w + 1) D / 2) where D / 2 is whole swizzle panels, else two column
//   chunks) and adds them into dq_accum with 16-byte fp32 reductions, in the accumulator's
//   fragment order (512 contiguous bytes per warp instruction).
// - One CTA-wide sync per step, the named barrier before dQ (both warpgroups' dS^T are in smem).
//   Right after it thread 0 issues the loads of step t + S - 1 (Q, dO by TMA, lse2 and D by bulk
//   copies, one mbarrier per stage) into the stage of step t - 1, which every thread has finished;
//   dS^T alternates between two buffers, so step t + 1 writes one that only step t - 1's dQ read.
//   Between those syncs the two warpgroups run freely (tuning notes: src/cells.rs,
//   `sm90_bwd_tiles`).
// - dq_accum block order (64 rows x D of one query block): value (row, col) of warpgroup w's
//   accumulator group c (columns BwdHalfCols::col(w, c) .. + 7), warp v, lane l sits in the
//   float4 at index ((w D / 16 + c) 4 + v) 32 + l, as (row r, col k), (r, k + 1), (r + 8, k),
//   (r + 8, k + 1) with r = 16 v + l / 4, k = col(w, c) + 2 (l % 4).
// - Deterministic mode: NAME_main_det (FA_SM90_BWD_DET_KERNEL at the end of this file, in an image
//   of its own), which adds each query block's dQ in a fixed key-block order (bwd_dq_acquire).
// ================================================================================================
#pragma once

#include <cuda.h>
#include <math.h>
#include <stdint.h>

#include "common/mask.cuh"
#include "common/params.h"
#include "sm80/bwd.cuh"
#include "sm90/layout.cuh"
#include "sm90/mask.cuh"
#include "sm90/numeric.cuh"
#include "sm90/ptx.cuh"
#include "sm90/wgmma.cuh"

namespace fa::sm90 {

constexpr int kBwdBM = 64;   // query rows per step
constexpr int kBwdBN = 128;  // key rows per thread block (64 per warpgroup)
constexpr int kBwdThreads = 256;

// Shared memory of the main kernel, in bytes from a 1024-aligned base:
//   K, V      one tile each of BN rows
//   Q, dO     S stages each of BM rows
//   dS^T      two buffers (steps alternate) of [BN keys][BM queries], 128 B swizzle
//             (SmemTile<T, 64, 128>)
//   stats     S stages of [lse2 x BM | D x BM] fp32
//   mbarriers kv_full, full[S]
// plus 1024 bytes of slack for aligning the base. src/cells.rs (`sm90_bwd_smem_bytes`) computes
// the same total; the kernel static_asserts equality.
template <typename T, int D, int S>
struct BwdLayout {
    using KVTile = SmemTile<T, D, kBwdBN>;
    using QSlab = SmemTile<T, D, kBwdBM>;
    using DsTile = SmemTile<T, kBwdBM, kBwdBN>;
    static constexpr uint32_t kKOffset = 0;
    static constexpr uint32_t kVOffset = kKOffset + KVTile::kStride;
    static constexpr uint32_t kQOffset = kVOffset + KVTile::kStride;
    static constexpr uint32_t kDoOffset = kQOffset + S * QSlab::kStride;
    static constexpr uint32_t kDsOffset = kDoOffset + S * QSlab::kStride;
    static constexpr uint32_t kStatOffset = kDsOffset + 2 * DsTile::kStride;  // two dS^T buffers
    static constexpr uint32_t kStatStageBytes = 2 * kBwdBM * 4;
    static constexpr uint32_t kBarrierOffset = kStatOffset + S * kStatStageBytes;
    static constexpr uint32_t kUsedBytes = kBarrierOffset + (1 + S) * 8;
    static constexpr uint32_t kSmemBytes = kUsedBytes + 1024;
    static_assert(kSmemBytes <= 227u * 1024u, "the backward tile does not fit 227 KB of shared memory");
    static_assert(kUsedBytes + 1024u <= (1u << 18), "descriptor start addresses are 18-bit shared-window addresses");
    // Bytes a step's loads deliver: Q, dO, lse2, D.
    static constexpr uint32_t kStepBytes = 2 * QSlab::kBytes + kStatStageBytes;
};

// The sm80 family's preprocess (dot) and dsink, which depend only on the element type, the head
// dim and the workspace's query block (BM = 64): instantiated through the sm80 tile with that BM.
// (The wide head dims instantiate it through the sm80 family's 64 x 64 one-stage tile, which
// compiles there; the dot and dsink code is the same for every BN.)
template <typename T, int D>
using BwdPrePost = sm80::BwdKernel<T, D, kBwdBM, (D > 128 ? 64 : kBwdBN), 8, (D > 128 ? 1 : 2)>;

// The head-dim columns warpgroup w owns in a GEMM split by head-dim halves (dQ in bwd_main; dV,
// dK and dQ in bwd_main_wide): D / 2 columns as at most two wgmma column chunks, each of which
// an MN-major B operand can address (one that starts on a swizzle panel may span whole panels
// and part of one more; one that starts inside a panel stays inside it):
//   chunk 1: N1 = the whole panels' columns in D / 2: [w N1, (w + 1) N1)
//   chunk 2: N2 = D / 2 - N1 < PW columns: [2 N1 + w N2, 2 N1 + (w + 1) N2), in the last panel
//   (N1, N2): d 64 (0, 32); d 80 (32, 8); d 96 (32, 16); d 128 (64, 0); d 192 (64, 32);
//   d 256 (128, 0).
// The accumulator holds chunk 1's N1 / 2 values per thread, then chunk 2's N2 / 2; its value
// group c (8 columns) starts at column col(w, c).
template <typename T, int D>
struct BwdHalfCols {
    using Geo = HeadDimGeometry<T, D>;
    static constexpr int kHalf = D / 2;
    static constexpr int kN1 = kHalf / Geo::kPanelElems * Geo::kPanelElems;
    static constexpr int kN2 = kHalf - kN1;
    static_assert(kHalf % 8 == 0 && kN2 < Geo::kPanelElems, "the chunks are whole 8-column groups");
    __device__ __forceinline__ static constexpr int col(int w, int c) {
        return 8 * c < kN1 ? w * kN1 + 8 * c : 2 * kN1 + w * kN2 + (8 * c - kN1);
    }
    // Byte offsets of chunk 1 / chunk 2's first column in a tile whose panels are PANEL_BYTES apart.
    __device__ __forceinline__ static uint32_t offset1(int w, uint32_t panel_bytes) {
        return static_cast<uint32_t>(w * kN1 / Geo::kPanelElems) * panel_bytes;
    }
    __device__ __forceinline__ static uint32_t offset2(int w, uint32_t panel_bytes) {
        int const c = 2 * kN1 + w * kN2;
        return static_cast<uint32_t>(c / Geo::kPanelElems) * panel_bytes +
               static_cast<uint32_t>(c % Geo::kPanelElems) * Geo::kElemBytes;
    }
    // One k16 step of a split GEMM into acc (kHalf / 2 values): chunk 1 then chunk 2, with B
    // descriptors b1 / b2 (OP: WgmmaSSTransAB or WgmmaSSTransB).
    template <template <typename, int> class OP>
    __device__ __forceinline__ static void mma(float (&acc)[kHalf / 2], uint64_t a, uint64_t b1, uint64_t b2,
                                               uint32_t accumulate) {
        if constexpr (kN1 > 0) OP<T, kN1>::mma(*reinterpret_cast<float(*)[kN1 / 2]>(acc), a, b1, accumulate);
        if constexpr (kN2 > 0) {
            OP<T, kN2>::mma(*reinterpret_cast<float(*)[kN2 / 2]>(acc + kN1 / 2), a, b2, accumulate);
        }
    }
};

#ifndef FA_SM90_BWD_GROUPED_ORDER
#define FA_SM90_BWD_GROUPED_ORDER 1
#endif
// The most key blocks per head for which the causal order below groups heads.
#ifndef FA_SM90_BWD_GROUP_MAX_KEY_BLOCKS
#define FA_SM90_BWD_GROUP_MAX_KEY_BLOCKS 512
#endif

// Thread blocks per head group of the causal launch order below: about two waves of 132 SMs.
constexpr int kBwdGroupBlocks = 264;

// The (key block, kv head, sequence) of this thread block. The sm80 family's order
// (sm80::bwd_block), except for a right mask bound without a left one (causal) when a head has
// at most 512 key blocks: there the heads are taken in groups of G = max(1, 264 / key blocks)
// (one head from 133 key blocks on), and inside
// a group key-block-major, lowest key block (longest walk) first. Why: the dQ reductions of a
// head's key blocks all land on that head's dq_accum rows (seqlen_q x D x 4 bytes). The sm80
// family's key-block-major order runs a head's key blocks in different waves when there are many
// heads and few key blocks, so its dq_accum rows leave L2 between them (d = 256 at 512 keys,
// 256 heads: 134 MB of dq_accum, each line read and written from HBM once per key block); in
// groups, every key block of a head runs within about two waves (perf log run 14: +9.1% over
// d 64 / 128 / 256 / GQA at 512-4k keys with the limit at 32 key blocks; raising it to 512,
// +3% more on causal calls at 8k / 16k keys). Beyond 512 key blocks (32k keys at BN = 64) the
// sm80 order stands: one head's walks, longest first, would then leave a long walk of the last
// head to the grid's tail.
__device__ __forceinline__ sm80::BwdBlock bwd_block_sm90(const FaParams& p) {
#if FA_SM90_BWD_GROUPED_ORDER
    int const gx = static_cast<int>(gridDim.x);
    if ((p.flags & FA_FLAG_DETERMINISTIC) == 0 && p.window_right >= 0 && p.window_left < 0 &&
        gx <= FA_SM90_BWD_GROUP_MAX_KEY_BLOCKS) {
        int const heads_k = static_cast<int>(gridDim.y);
        int const heads = heads_k * static_cast<int>(gridDim.z);  // (kv head, sequence) pairs
        int const linear = static_cast<int>(blockIdx.x) + gx * (static_cast<int>(blockIdx.y) + heads_k * static_cast<int>(blockIdx.z));
        int const g = max(1, kBwdGroupBlocks / gx);              // heads per group
        int const group = linear / (g * gx);
        int const first = group * g;
        int const members = min(g, heads - first);               // the last group may be smaller
        int const in_group = linear - first * gx;
        int const head = first + in_group % members;
        return {in_group / members, head % heads_k, head / heads_k};
    }
#endif
    return sm80::bwd_block(p);
}

// Deterministic mode (the `_main_det` kernels): query block m's dQ contributions are added in
// descending key-block order, as in the sm80 family (sm80::BwdMainloop::dq_rank; the same
// per-(sequence, head, query block) counters, BwdWorkspace::semaphore, and the same reversed
// launch order, sm80::bwd_block). Here each warpgroup adds its own dQ columns, so the counter
// counts warpgroups: a warpgroup waits until both warpgroups of every higher key block that
// visits m have added theirs (2 x rank), adds, then releases one count.
template <int BM, int BN>
__device__ __forceinline__ int bwd_dq_rank(const Mask& mask, int seqlen_q, int n_block, int m, int lane) {
    int const n_end = (mask.seqlen_k + BN - 1) / BN;  // key blocks with keys of this sequence
    int rank = 0;
    for (int n0 = n_block + 1; n0 < n_end; n0 += 32) {
        int const n = n0 + lane;
        bool const visits = n < n_end && sm80::BwdQPlan::make<BM, BN>(mask, seqlen_q, n).visits(m);
        rank += __popc(__ballot_sync(0xffffffffu, visits));
    }
    return rank;
}

// Before a warpgroup's dQ reductions of query block m (deterministic mode): wait for its turn
// (rank: bwd_dq_rank, which lane 0 of the warpgroup needs).
__device__ __forceinline__ void bwd_dq_acquire(const int* sem, int rank, int wg, int tw) {
    if (tw < 32) {
        if (tw == 0) {
            while (::fa::ptx::ld_acquire_s32(sem) < 2 * rank) {
            }
        }
        __syncwarp();
    }
    named_barrier_sync(2 + static_cast<uint32_t>(wg), 128);  // the warpgroup's reductions follow
}

// After them: every thread's reductions are ordered before the release.
__device__ __forceinline__ void bwd_dq_release(int* sem, int wg, int tw) {
    ::fa::ptx::fence_acq_rel_gpu();
    named_barrier_sync(2 + static_cast<uint32_t>(wg), 128);
    if (tw == 0) ::fa::ptx::red_release_add_s32(sem, 1);
}

template <typename T, int D, int S, int SMEM, bool kDet>
__device__ __forceinline__ void bwd_main(const FaParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                         const CUtensorMap* tma_v, const CUtensorMap* tma_do) {
    using L = BwdLayout<T, D, S>;
    using KVTile = typename L::KVTile;
    using QSlab = typename L::QSlab;
    using DsTile = typename L::DsTile;
    using Geo = HeadDimGeometry<T, D>;
    using Ws = sm80::BwdWorkspace<kBwdBM>;
    constexpr int BM = kBwdBM, BN = kBwdBN;
    constexpr int kQKSteps = D / 16;   // k16 steps of S^T, dP^T
    constexpr int kKVSteps = BM / 16;  // k16 steps of dV, dK (the step's queries)
    constexpr int kDqSteps = BN / 16;  // k16 steps of dQ (the block's keys)
    constexpr int kDqN = D / 2;        // dQ columns per warpgroup
    static_assert(SMEM == static_cast<int>(L::kSmemBytes),
                  "SMEM (src/cells.rs sm90_bwd_smem_bytes) disagrees with BwdLayout (csrc/sm90/bwd.cuh)");
    static_assert((kDqN * 2) % 16 == 0, "each warpgroup's dQ columns start on a 16-byte chunk");

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint32_t const raw_addr = smem_addr(smem_raw);
    uint32_t const pad = (1024u - (raw_addr & 1023u)) & 1023u;
    uint8_t* const base_ptr = smem_raw + pad;
    uint32_t const base = raw_addr + pad;
    uint32_t const bar_kv = base + L::kBarrierOffset;
    uint32_t const bar_full0 = bar_kv + 8u;

    int const tid = static_cast<int>(threadIdx.x);
    int const wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    int const tw = tid % 128;

    sm80::BwdBlock const blk = bwd_block_sm90(p);
    sm80::BwdSeq const seq = sm80::BwdSeq::make<BM>(p, blk.b);
    if (blk.n_block * BN >= seq.capacity_k) return;  // uniform: past this sequence's key rows
    Mask const mask = Mask::make(p, seq.seqlen_q, seq.seqlen_k);
    sm80::BwdQPlan const plan = sm80::BwdQPlan::make<BM, BN>(mask, seq.seqlen_q, blk.n_block);
    int const group = p.num_heads / p.num_heads_k;
    int const n_m = plan.m_end - plan.m_begin;
    int const num_steps = group * n_m;
    int const head0 = blk.hk * group;
    int const key0 = blk.n_block * BN;
    int const batch_coord = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : blk.b;

    if (tid == 0) {
        mbarrier_init(bar_kv, 1);
#pragma unroll
        for (int i = 0; i < S; ++i) mbarrier_init(bar_full0 + 8u * i, 1);
        fence_mbarrier_init();
    }
    __syncthreads();

    // Thread 0: Q, dO and the statistics of walk step t into stage `stage`.
    auto load_step = [&](int t, int stage) {
        int const h = head0 + t / n_m;
        int const m = plan.m_begin + t % n_m;
        uint32_t const bar = bar_full0 + 8u * static_cast<uint32_t>(stage);
        mbarrier_arrive_expect_tx(bar, L::kStepBytes);
        int const row = seq.q_row0 + m * BM;
        uint32_t const slab = static_cast<uint32_t>(stage) * QSlab::kStride;
        tma_load_5d(base + L::kQOffset + slab, tma_q, bar, 0, row, 0, h, batch_coord);
        tma_load_5d(base + L::kDoOffset + slab, tma_do, bar, 0, row, 0, h, batch_coord);
        int64_t const ws = Ws::row(p, h, seq.ws_row0) + static_cast<int64_t>(m) * BM;
        uint32_t const stat = base + L::kStatOffset + static_cast<uint32_t>(stage) * L::kStatStageBytes;
        bulk_load(stat, Ws::lse_log2(p) + ws, BM * 4, bar);
        bulk_load(stat + BM * 4, Ws::dsum(p) + ws, BM * 4, bar);
    };

    if (tid == 0) {
        tma_prefetch_descriptor(tma_q);
        tma_prefetch_descriptor(tma_do);
        mbarrier_arrive_expect_tx(bar_kv, 2 * KVTile::kBytes);
        tma_load_5d(base + L::kKOffset, tma_k, bar_kv, 0, seq.k_row0 + key0, 0, blk.hk, batch_coord);
        tma_load_5d(base + L::kVOffset, tma_v, bar_kv, 0, seq.k_row0 + key0, 0, blk.hk, batch_coord);
        for (int i = 0; i < S - 1 && i < num_steps; ++i) load_step(i, i);
    }
    __syncwarp();
    mbarrier_wait(bar_kv, 0);
    // Key rows past the sequence's keys (seqused_k, the next varlen sequence, or past the tensor,
    // which TMA zero-fills): zeroed, so that no NaN there reaches dP^T or dQ (P^T and dS^T are 0
    // there, but 0 x NaN is not).
    int const rows_valid = seq.seqlen_k - key0;
    if (rows_valid < BN) {
        int const first = rows_valid > 0 ? rows_valid : 0;
        uint4* const kt = reinterpret_cast<uint4*>(base_ptr + L::kKOffset);
        uint4* const vt = reinterpret_cast<uint4*>(base_ptr + L::kVOffset);
#pragma unroll 1
        for (int panel = 0; panel < Geo::kPanels; ++panel) {
            int const begin = (panel * static_cast<int>(KVTile::kPanelBytes) + first * Geo::kSwizzleBytes) / 16;
            int const end = (panel + 1) * static_cast<int>(KVTile::kPanelBytes) / 16;
            for (int i = begin + tid; i < end; i += kBwdThreads) {
                kt[i] = make_uint4(0u, 0u, 0u, 0u);
                vt[i] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        fence_proxy_async_smem();
    }
    __syncthreads();

    AccCoord const ac(tw);
    int const warp_in_wg = tw / 32, lane = tw % 32;
    float dk[D / 2], dv[D / 2];
#pragma unroll
    for (int i = 0; i < D / 2; ++i) {
        dk[i] = 0.f;
        dv[i] = 0.f;
    }
    bool const mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
    uint32_t const k_tile = base + L::kKOffset;
    uint32_t const v_tile = base + L::kVOffset;
    uint32_t const ds_tile0 = base + L::kDsOffset;
    // This warpgroup's dQ columns of K (BwdHalfCols): the two chunks' start addresses.
    using HC = BwdHalfCols<T, D>;
    uint32_t const k_dq1 = k_tile + HC::offset1(wg, KVTile::kPanelBytes);
    uint32_t const k_dq2 = k_tile + HC::offset2(wg, KVTile::kPanelBytes);
    int const my_key0 = key0 + 64 * wg;  // sequence key of this warpgroup's row 0

#pragma unroll 1
    for (int t = 0; t < num_steps; ++t) {
        int const stage = t % S;
        uint32_t const ds_tile = ds_tile0 + static_cast<uint32_t>(t & 1) * DsTile::kStride;  // alternating
        int const h = head0 + t / n_m;
        int const m = plan.m_begin + t % n_m;
        uint32_t const q_slab = base + L::kQOffset + static_cast<uint32_t>(stage) * QSlab::kStride;
        uint32_t const do_slab = base + L::kDoOffset + static_cast<uint32_t>(stage) * QSlab::kStride;
        // Deterministic mode: this block's turn at query block m, computed here, where few
        // registers are live (warp 0 of each warpgroup).
        int const dq_rank = kDet && tw < 32 ? bwd_dq_rank<BM, BN>(mask, seq.seqlen_q, blk.n_block, m, tw) : 0;
        mbarrier_wait(bar_full0 + 8u * static_cast<uint32_t>(stage), static_cast<uint32_t>(t / S) & 1u);

        // ---- S^T = K_w Q^T, dP^T = V_w dO^T ----
        float s[BM / 2], dp[BM / 2];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kQKSteps; ++ks) {
            WgmmaSS<T, BM>::mma(s, KVTile::desc_k_major(k_tile, 64 * wg, ks), QSlab::desc_k_major(q_slab, 0, ks),
                                ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
#pragma unroll
        for (int ks = 0; ks < kQKSteps; ++ks) {
            WgmmaSS<T, BM>::mma(dp, KVTile::desc_k_major(v_tile, 64 * wg, ks), QSlab::desc_k_major(do_slab, 0, ks),
                                ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(s);

        // ---- P^T and dS^T = P^T (dP^T - D); columns are queries, so the statistics are per column ----
        const float* const stat =
            reinterpret_cast<const float*>(base_ptr + L::kStatOffset + static_cast<uint32_t>(stage) * L::kStatStageBytes);
        bool const masked = plan.masked(m);
        if (!mods) {
            // The scale folds into the exp2 FFMA; P^T is formed while dP^T is still running.
            float const scale_log2 = p.scale_log2;
#pragma unroll
            for (int c = 0; c < BM / 8; ++c) {
                float2 const l2 = *reinterpret_cast<const float2*>(stat + 8 * c + ac.col0);
                s[4 * c + 0] = ex2(fmaf(s[4 * c + 0], scale_log2, -l2.x));
                s[4 * c + 1] = ex2(fmaf(s[4 * c + 1], scale_log2, -l2.y));
                s[4 * c + 2] = ex2(fmaf(s[4 * c + 2], scale_log2, -l2.x));
                s[4 * c + 3] = ex2(fmaf(s[4 * c + 3], scale_log2, -l2.y));
            }
            if (masked) {
#pragma unroll
                for (int e = 0; e < BM / 2; ++e) {
                    int const i = m * BM + ac.col(e);
                    int const j = my_key0 + ac.row(e);
                    bool const visible = j < mask.key_end(i) && (j >= mask.key_begin(i) || j < mask.sink_tokens);
                    s[e] = visible ? s[e] : 0.f;
                }
            }
            wgmma_wait<0>();
            fence_operands(dp);
#pragma unroll
            for (int c = 0; c < BM / 8; ++c) {
                float2 const d2 = *reinterpret_cast<const float2*>(stat + BM + 8 * c + ac.col0);
                dp[4 * c + 0] = s[4 * c + 0] * (dp[4 * c + 0] - d2.x);
                dp[4 * c + 1] = s[4 * c + 1] * (dp[4 * c + 1] - d2.y);
                dp[4 * c + 2] = s[4 * c + 2] * (dp[4 * c + 2] - d2.x);
                dp[4 * c + 3] = s[4 * c + 3] * (dp[4 * c + 3] - d2.y);
            }
            if (masked) {
                // 0 x (a NaN of dP^T) is NaN: invisible elements are selected, not multiplied.
#pragma unroll
                for (int e = 0; e < BM / 2; ++e) dp[e] = s[e] != 0.f ? dp[e] : 0.f;
            }
        } else {
            // softcap and ALiBi (docs/semantics.md order): natural-unit scores, then exp2.
            wgmma_wait<0>();
            fence_operands(dp);
            float const slope = p.alibi_slopes != nullptr ? p.alibi_slopes[blk.b * p.alibi_batch_stride + h] : 0.f;
            float const scale = p.scale;
            bool const softcap = p.softcap > 0.f;
            float const cap = p.softcap;
            float const prescale = softcap ? p.scale * rcp_approx(p.softcap) : 0.f;
#pragma unroll
            for (int e = 0; e < BM / 2; ++e) {
                int const i = m * BM + ac.col(e);   // query
                int const j = my_key0 + ac.row(e);  // key
                float sc = s[e] * scale;
                float g = 1.f;
                if (softcap) {
                    float th;
                    sm80::tanh_and_derivative(s[e] * prescale, th, g);  // the sm80 family's, shared
                    sc = cap * th;
                }
                int const dist = i + mask.diag - j;
                sc -= slope * static_cast<float>(dist < 0 ? -dist : dist);
                float const prob = ex2(fmaf(sc, kLog2e, -stat[ac.col(e)]));
                float const grad = prob * (dp[e] - stat[BM + ac.col(e)]) * g;
                bool const visible =
                    !masked || (j < mask.key_end(i) && (j >= mask.key_begin(i) || j < mask.sink_tokens));
                s[e] = visible ? prob : 0.f;
                dp[e] = visible ? grad : 0.f;
            }
        }

        // ---- P^T, dS^T as A fragments; dS^T into smem ----
        uint32_t pa[kKVSteps][4], dsa[kKVSteps][4];
#pragma unroll
        for (int kk = 0; kk < kKVSteps; ++kk) {
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                pa[kk][r] = pack_pair<T>(s[8 * kk + 2 * r], s[8 * kk + 2 * r + 1]);
                dsa[kk][r] = pack_pair<T>(dp[8 * kk + 2 * r], dp[8 * kk + 2 * r + 1]);
            }
        }
        {
            int const r0 = 64 * wg + ac.row0;
#pragma unroll
            for (int c = 0; c < BM / 8; ++c) {
                // dsa[c / 2][(c % 2) 2 + half]: row r0 + 8 half, queries 8 c + col0, + 1
                st_shared_b32(ds_tile + DsTile::offset(r0, 8 * c + ac.col0), dsa[c / 2][(c % 2) * 2 + 0]);
                st_shared_b32(ds_tile + DsTile::offset(r0 + 8, 8 * c + ac.col0), dsa[c / 2][(c % 2) * 2 + 1]);
            }
        }

        // ---- dV += P^T dO, dK += dS^T Q ----
        fence_operands(dv);
        fence_operands(dk);
        fence_operands(pa);
        fence_operands(dsa);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < kKVSteps; ++kk) WgmmaRSTransB<T, D>::mma(dv, pa[kk], QSlab::desc_mn_major(do_slab, kk), 1u);
#pragma unroll
        for (int kk = 0; kk < kKVSteps; ++kk) WgmmaRSTransB<T, D>::mma(dk, dsa[kk], QSlab::desc_mn_major(q_slab, kk), 1u);
        wgmma_commit();

        // ---- dQ = dS K over the block's 128 keys, this warpgroup's D / 2 columns ----
        fence_proxy_async_smem();  // the dS^T stores (generic proxy) before wgmma reads them
        // Both warpgroups' dS^T are in smem; and every thread has finished step t - 1 (its GEMMs
        // completed at its end), whose stage now takes step t + S - 1 (the step's only CTA-wide
        // sync; the dS^T buffer of step t + 1 was last read by step t - 1's dQ).
        named_barrier_sync(1, kBwdThreads);
        if (tid == 0 && t + S - 1 < num_steps) load_step(t + S - 1, (t + S - 1) % S);
        __syncwarp();
        float dq[kDqN / 2];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kDqSteps; ++ks) {
            HC::template mma<WgmmaSSTransAB>(dq, DsTile::desc_mn_major(ds_tile, ks), KVTile::desc_mn_major(k_dq1, ks),
                                              KVTile::desc_mn_major(k_dq2, ks), ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
        wgmma_wait<0>();
        fence_operands(dq);
        fence_operands(dv);
        fence_operands(dk);
        fence_operands(pa);
        fence_operands(dsa);
        {
            float* const dq_block =
                p.dq_accum + (Ws::row(p, h, seq.ws_row0) + static_cast<int64_t>(m) * BM) * D;
            float* const dst = dq_block + ((wg * (kDqN / 8)) * 4 + warp_in_wg) * 128 + lane * 4;
            int* const sem = kDet ? Ws::semaphore(p, blk.b, h, m) : nullptr;
            if constexpr (kDet) bwd_dq_acquire(sem, dq_rank, wg, tw);
#pragma unroll
            for (int c = 0; c < kDqN / 8; ++c) {
                ::fa::ptx::red_add_f32x4(dst + c * 512, dq[4 * c + 0], dq[4 * c + 1], dq[4 * c + 2], dq[4 * c + 3]);
            }
            if constexpr (kDet) bwd_dq_release(sem, wg, tw);
        }
    }

    // ---- dK, dV: every stored key row of the block (rows past seqlen_k are zeros) ----
    int64_t const b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : blk.b;
    int64_t const key_row = static_cast<int64_t>(seq.k_row0) + key0;
    T* const dk_g = static_cast<T*>(p.dk) + b_off * p.dk_batch_stride + key_row * p.dk_row_stride +
                    static_cast<int64_t>(blk.hk) * p.dk_head_stride;
    T* const dv_g = static_cast<T*>(p.dv) + b_off * p.dv_batch_stride + key_row * p.dv_row_stride +
                    static_cast<int64_t>(blk.hk) * p.dv_head_stride;
    int const rows_cap = seq.capacity_k - key0;
    float const scale = p.scale;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int const r = 64 * wg + ac.row0 + 8 * half;
        if (r < rows_cap) {
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                int const col = 8 * c + ac.col0;
                *reinterpret_cast<uint32_t*>(dk_g + r * p.dk_row_stride + col) =
                    pack_pair<T>(dk[4 * c + 2 * half] * scale, dk[4 * c + 2 * half + 1] * scale);
                *reinterpret_cast<uint32_t*>(dv_g + r * p.dv_row_stride + col) =
                    pack_pair<T>(dv[4 * c + 2 * half], dv[4 * c + 2 * half + 1]);
            }
        }
    }
}

// dq = scale * dq_accum (fragment-major blocks, see the top of this file); dsink as the sm80
// family computes it.
template <typename T, int D>
__device__ __forceinline__ void bwd_convert(const FaParams& p) {
    using Ws = sm80::BwdWorkspace<kBwdBM>;
    constexpr int kGroups = D / 16;  // accumulator groups of 8 columns per warpgroup
    int const m = static_cast<int>(blockIdx.x), h = static_cast<int>(blockIdx.y), b = static_cast<int>(blockIdx.z);
    int const tid = static_cast<int>(threadIdx.x);
    if (m == 0 && b == 0 && p.dsink != nullptr && p.sink_logits != nullptr) {
        BwdPrePost<T, D>::dsink(p, h, tid);
    }
    sm80::BwdSeq const seq = sm80::BwdSeq::make<kBwdBM>(p, b);
    if (m * kBwdBM >= seq.seqlen_q) return;
    int64_t const ws = Ws::row(p, h, seq.ws_row0) + static_cast<int64_t>(m) * kBwdBM;
    const float* const acc = p.dq_accum + ws * D;
    int64_t const b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : b;
    T* const dq = static_cast<T*>(p.dq) + b_off * p.dq_batch_stride +
                  (static_cast<int64_t>(seq.q_row0) + m * kBwdBM) * p.dq_row_stride +
                  static_cast<int64_t>(h) * p.dq_head_stride;
    int const rows_valid = min(kBwdBM, seq.seqlen_q - m * kBwdBM);
    float const scale = p.scale;
    for (int f = tid; f < kBwdBM * D / 4; f += kBwdThreads) {
        int const l = f & 31, v = (f >> 5) & 3, grp = f >> 7;
        int const w = grp / kGroups, c = grp % kGroups;
        int const row = 16 * v + l / 4;
        int const col = BwdHalfCols<T, D>::col(w, c) + 2 * (l & 3);
        float4 const x = *reinterpret_cast<const float4*>(acc + 4 * f);
        if (row < rows_valid) {
            *reinterpret_cast<uint32_t*>(dq + row * p.dq_row_stride + col) = pack_pair<T>(x.x * scale, x.y * scale);
        }
        if (row + 8 < rows_valid) {
            *reinterpret_cast<uint32_t*>(dq + (row + 8) * p.dq_row_stride + col) =
                pack_pair<T>(x.z * scale, x.w * scale);
        }
    }
}

}  // namespace fa::sm90

#include "sm90/bwd_wide.cuh"

// One backward tile (see the launch contract above). BM, BN, W, S must be 64, 128, 8, 2.
#define FA_SM90_BWD_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                                   \
    static_assert((BM) == ::fa::sm90::kBwdBM && (W) * 32 == ::fa::sm90::kBwdThreads && (S) >= 2 &&           \
                      (((BN) == ::fa::sm90::kBwdBN && (D) <= 128) || ((BN) == ::fa::sm90::kBwdWideBN && (D) > 128)), \
                  #NAME ": the sm90 backward's tiles are 64 x 128 (d <= 128) and 64 x 64 (wider), 8 warps, 2+ stages"); \
    extern "C" __global__ void __launch_bounds__(::fa::sm80::kBwdPrePostThreads) NAME##_dot(const FaParams p) { \
        ::fa::sm90::BwdPrePost<T, D>::dot(p);                                                                \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__((W) * 32, 1)                                                \
        NAME##_main(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,           \
                    const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v,    \
                    const __grid_constant__ CUtensorMap tma_do) {                                            \
        ::fa::sm90::bwd_main_tile<T, D, BN, S, SMEM, false>(p, &tma_q, &tma_k, &tma_v, &tma_do);             \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(::fa::sm90::kBwdThreads) NAME##_convert(const FaParams p) { \
        ::fa::sm90::bwd_convert<T, D>(p);                                                                    \
    }

// The deterministic main kernel of a tile (`NAME_main_det`, the same arguments as `NAME_main`).
// It is compiled in a translation unit of its own (a second image of the cell, build/nvcc.rs):
// beside the default kernels in one module it changed how ptxas allocated them (perf log run 14,
// call 6: the same PTX up to register numbering, spills at d 96 / 128, -2.1%).
#define FA_SM90_BWD_DET_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                               \
    extern "C" __global__ void __launch_bounds__((W) * 32, 1)                                                \
        NAME##_main_det(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,       \
                        const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v, \
                        const __grid_constant__ CUtensorMap tma_do) {                                        \
        ::fa::sm90::bwd_main_tile<T, D, BN, S, SMEM, true>(p, &tma_q, &tma_k, &tma_v, &tma_do);              \
    }
