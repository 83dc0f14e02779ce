// The sm80-family backward main loop: one thread block owns one key block (BN keys) of one
// (sequence, kv head), holds its dK and dV in registers, and walks every (query head of the GQA
// group, query block of BM rows) pair that sees the block. See sm80/bwd.cuh for the design.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "common/mask.cuh"
#include "common/params.h"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "sm80/bwd_gemm.cuh"
#include "sm80/bwd_tile.cuh"

namespace fa {
namespace sm80 {

// The block-uniform state of the walk (64 bytes). Thread 0 writes it to shared memory before the
// walk and every step re-reads it after its barrier: held in registers across the loop, these
// scalars would compete with dK / dV (up to 128 registers) and the scores (up to 64).
struct BwdWalkState {
    Mask mask;      // sizes and bounds of the sequence (sk, diagonal, window, sinks)
    BwdQPlan plan;  // the query blocks this key block visits
    int seqlen_q;
    int head0;      // first query head of the kv head's group
    int n_block;    // this thread block's key block
    int batch;      // sequence index
    int q_row0;     // global row of the sequence's query 0 (varlen)
    int ws_row0;    // workspace row of the sequence's query 0 (BwdWorkspace)
    int num_steps;  // group size x query blocks
};
static_assert(sizeof(BwdWalkState) == 64, "the walk state fills its 64 bytes of smem");

// t = tanh(y) and its derivative 1 - t^2, with MUFU.EX2 / MUFU.RCP. Computed from |y| so that
// neither has a cancellation: r = 1 / (1 + e^(2|y|)) in (0, 1/2], t = sign(y) (1 - 2r),
// 1 - t^2 = 4 r (1 - r) (absolute error ~1e-7, relative ~1e-6 even where 1 - t^2 is tiny).
__device__ __forceinline__ void tanh_and_derivative(float y, float& t, float& dt) {
    const float r = ptx::rcp_approx(1.f + ptx::ex2_approx(fabsf(y) * (2.f * kLog2e)));
    t = copysignf(1.f - 2.f * r, y);
    dt = 4.f * r * (1.f - r);
}

template <class T, int D, int BM, int BN, int W, int S>
struct BwdMainloop {
    using Shape = BwdShape<D, BM, BN, W>;
    using Smem = BwdSmem<T, D, BM, BN, W, S>;
    using Ws = BwdWorkspace<BM>;
    static constexpr int kThreads = Shape::kThreads;
    static constexpr int kMT = Shape::kMT;
    static constexpr int kDT = Shape::kDT;
    static constexpr int kPitch = Smem::kPitch;
    static constexpr int kSPitch = Smem::kSPitch;
    using RowLane = BwdLane<kPitch>;
    using SLane = BwdLane<kSPitch>;
    // The step's Q / dO tiles in XOR-swizzled rows of D elements (SwizzledKv) at d = 128 / 256,
    // else padded rows: with padded rows every 128-byte segment of their per-step cp.async copies
    // straddles two smem lines (the forward's K / V had 10.5 shared wavefronts per 512-byte copy
    // instead of 4; perf log runs 16 / 17). The stages keep their padded size; K / V (copied once
    // per block) stay padded. Measured on H200 (2026-12-04, bf16, `compare.py --bwd`, same-process
    // A/B in both orders against padded rows, perf log run 17 call 4): d = 128 +2.3-4.0% on all 6
    // cells (1k / 4k / 16k, both masks), d = 256 +2.3-3.2% (causal 1k 0.998); d = 64 (32 x 128 x
    // 4 warps) 0.985-0.995 on 5 of 6 cells, so it keeps padded rows. d = 192 would need the
    // column step of QL::column across 3 / 6 groups (kWarpGroups), which the swizzle's XOR does
    // not compose with; d = 80 / 96 rows are not whole lines. Tried, not kept: d = 80 (whole-row
    // warps) with Q / dO in the forward's two swizzled panels (SplitKv): 1.001 over 10 cells
    // (512-16k, both masks; H200, 2026-12-04, perf log run 17 call 6).
    static constexpr int kWarpGroups = Shape::kWarpD / 16;  // 16-column groups of a warp's dK / dV
    static constexpr bool kSwizzleQ =
        (D * static_cast<int>(sizeof(T))) % 128 == 0 && D >= 128 &&
        (!Shape::kPtInSmem || kWarpGroups % 4 == 0 || (kWarpGroups & (kWarpGroups - 1)) == 0);
    static constexpr int kQPitch = kSwizzleQ ? D * static_cast<int>(sizeof(T)) : kPitch;
    using QL = std::conditional_t<kSwizzleQ, SwizzledKv<kQPitch>, PaddedKv<kPitch>>;
    static_assert(!kSwizzleQ || (Smem::kQOffset % 128 == 0 && Smem::kDoOffset % 128 == 0 &&
                                 Smem::kQStageBytes % 128 == 0),
                  "swizzled Q / dO stages start on 128-byte lines (the smem base is 128-byte aligned)");
    using QCopy = BwdTileCopy<T, BM, D, kThreads, kSwizzleQ>;
    using KvCopy = BwdTileCopy<T, BN, D, kThreads>;
    static_assert(BM / 2 <= kThreads, "one thread per 16-byte chunk of a step's LSE and D rows");

    using Acc = float[kMT][kDT][4];  // a warp's dK or dV slab: [16*kMT keys][kWarpD columns]
    // Fragment double buffering (the PIPE forms of sm80/bwd_gemm.cuh) in the S^T / dP^T and smem
    // dV / dK GEMMs: with 8 warps (the 4-warp tiles and d = 128 with one stage spill with it). The
    // dQ GEMM (gemm_trans_trans) always double-buffers.
    static constexpr bool kPipeFrags = W == 8 && !(D == 128 && S == 1);
    // P^T before dP^T (probs_plain, then grads_plain) where it measured faster: d = 64 and 128
    // (+1.5-2% on the H200); d = 96 and 256 lost 1.5-2.5% with it (src/cells.rs notes).
    static constexpr bool kExpEarly = D == 64 || D == 128;
    // (S = 2) where the next step's loads are issued: after the first chunk's S^T MMAs, or
    // (kExpEarly only) after its dP^T MMAs. On the H200 against loads at the top of the step:
    // after S^T d64 +5%, d96 +4-6%, d128 -0.8 to +0.3%; after dP^T d64 +1.5-3%, d128 +0.8-1.6%.
    static constexpr bool kLoadAfterDp = kExpEarly && D == 128;
    static_assert(kExpEarly || !kLoadAfterDp, "the loads follow dP^T only where P^T comes first");

    const FaParams& p;
    unsigned char* smem;

    __device__ __forceinline__ BwdMainloop(const FaParams& params, unsigned char* dynamic_smem)
        : p(params), smem(dynamic_smem) {}

    __device__ __forceinline__ uint32_t smem_base() const { return ptx::smem_u32addr(smem); }

    // ---- walk state ----
    __device__ __forceinline__ void store_state(const BwdWalkState& st) const {
        uint4 lines[4];
        memcpy(lines, &st, sizeof(st));
#pragma unroll
        for (int i = 0; i < 4; ++i) reinterpret_cast<uint4*>(smem + Smem::kStateOffset)[i] = lines[i];
    }
    __device__ __forceinline__ BwdWalkState load_state() const {
        uint4 lines[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) lines[i] = reinterpret_cast<const uint4*>(smem + Smem::kStateOffset)[i];
        BwdWalkState st;
        memcpy(&st, lines, sizeof(st));
        return st;
    }

    // t / n and t % n for 0 <= t < 2^22, 0 < n, through an fp32 reciprocal (MUFU.RCP) and one
    // correction (the quotient estimate is off by at most one): ~10 instructions instead of the
    // ~25 of an integer division, in the address math of every step.
    __device__ __forceinline__ static void divmod_small(int t, int n, int& q, int& r) {
        q = static_cast<int>(static_cast<float>(t) * ptx::rcp_approx(static_cast<float>(n)));
        r = t - q * n;
        if (r < 0) {
            q -= 1;
            r += n;
        } else if (r >= n) {
            q += 1;
            r -= n;
        }
    }
    // The (query head, query block) of walk step t.
    __device__ __forceinline__ static int head_of(const BwdWalkState& st, int t) {
        int q, r;
        divmod_small(t, st.plan.m_end - st.plan.m_begin, q, r);
        return st.head0 + q;
    }
    __device__ __forceinline__ static int mblock_of(const BwdWalkState& st, int t) {
        int q, r;
        divmod_small(t, st.plan.m_end - st.plan.m_begin, q, r);
        return st.plan.m_begin + r;
    }

    // ---- loads ----

    // K and V of the block (keys >= sk zero-filled) into their tiles.
    __device__ __forceinline__ void load_kv(const T* k, const T* v, int rows_valid) const {
        const int tid = ptx::thread_idx_x();
        KvCopy::issue(smem_base() + Smem::kKOffset, k, p.k_row_stride, rows_valid, tid);
        KvCopy::issue(smem_base() + Smem::kVOffset, v, p.v_row_stride, rows_valid, tid);
    }

    // Q, dO, log2 LSE and D of walk step t into stage `stage` (not committed). Branch-free: with
    // active = false (t past the walk) every chunk is zero-filled and no global memory is read,
    // so that the address math can be scheduled among the MMAs around the call.
    __device__ __forceinline__ void load_step(const BwdWalkState& st, int t, int stage, bool active = true) const {
        const int tid = ptx::thread_idx_x();
        const int h = head_of(st, t);
        const int m = mblock_of(st, t);
        const int rows_valid = active ? min(BM, st.seqlen_q - m * BM) : 0;
        const int64_t row0 = static_cast<int64_t>(st.q_row0) + m * BM;
        const int64_t b = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : st.batch;
        const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + row0 * p.q_row_stride + h * p.q_head_stride;
        const T* dout =
            static_cast<const T*>(p.dout) + b * p.do_batch_stride + row0 * p.do_row_stride + h * p.do_head_stride;
        const uint32_t q_stage = static_cast<uint32_t>(stage) * Smem::kQStageBytes;
        QCopy::issue(smem_base() + Smem::kQOffset + q_stage, q, p.q_row_stride, rows_valid, tid);
        QCopy::issue(smem_base() + Smem::kDoOffset + q_stage, dout, p.do_row_stride, rows_valid, tid);
        // The statistics: BM / 4 chunks each, every row of the block written by the dot kernel.
        const int64_t ws = Ws::row(p, h, st.ws_row0) + m * BM;
        const uint32_t stat_stage = static_cast<uint32_t>(stage) * Smem::kStatStageBytes;
        if (tid < BM / 4) {
            ptx::cp_async_cg_16(smem_base() + Smem::kLseOffset + stat_stage + tid * 16, Ws::lse_log2(p) + ws + tid * 4,
                                active);
        } else if (tid < BM / 2) {
            const int c = tid - BM / 4;
            ptx::cp_async_cg_16(smem_base() + Smem::kDsumOffset + stat_stage + c * 16, Ws::dsum(p) + ws + c * 4, active);
        }
    }

    // ---- the step ----

    // Walk step t: P and dS of query block m (of head h) against the block's keys, dV += P^T dO,
    // dK += dS^T Q, dq_accum += dS K. kMasked: some (query, key) pair of the step is invisible.
    template <bool kMasked>
    __device__ __forceinline__ void step(int t, Acc& dk, Acc& dv) const {
        // Step t's loads have landed for this thread ...
        ptx::cp_async_wait_group<0>();
        // ... and for every thread; every warp has finished step t-1 (its dQ read dS^T, which is
        // rewritten below, and its stage is refilled below); at t = 0 the walk state is published.
        __syncthreads();
        const BwdWalkState st = load_state();
        const int stage = S == 2 ? (t & 1) : 0;
        const int h = head_of(st, t);
        const int m = mblock_of(st, t);
        // (S = 2) issues step t + 1's loads after its first S^T GEMM.
        scores_and_kv_grads<kMasked>(st, t, h, m, stage, dk, dv);
        // dS^T (and P^T) of the whole step are in smem.
        __syncthreads();
        if constexpr (Shape::kPtInSmem) kv_grads_from_smem(stage, dk, dv);
        if constexpr (S == 1) {
            // With one stage, Q and dO are free once every warp is past dV / dK.
            if constexpr (Shape::kPtInSmem) __syncthreads();
            // Branch-free with 8 warps, so that ptxas interleaves the address math with the dQ
            // MMAs (d256 64 x 64: +3-4% on the H200); the 4-warp tiles spilled with it (28-44
            // bytes) and keep the branch.
            if constexpr (W == 8) {
                load_step(st, t + 1, 0, /*active=*/t + 1 < st.num_steps);
            } else {
                if (t + 1 < st.num_steps) load_step(st, t + 1, 0);
            }
            ptx::cp_async_commit_group();
        }
        dq_step(st, h, m);
    }

    // Phase 1 of a step, per warp and chunk of queries: S^T = K Q^T and dP^T = V dO^T, then P^T
    // and dS^T (elementwise), then dV += P^T dO and dK += dS^T Q from registers (kWC = 1) or P^T /
    // dS^T to smem (kWC = 2). dS^T always goes to smem for dQ.
    // With two stages, step t + 1's Q / dO / statistics loads are issued right after the first
    // chunk's S^T MMAs (not at the top of the step), so that their ~200 instructions of address
    // math issue while the tensor pipe works instead of delaying the first MMA.
    template <bool kMasked>
    __device__ __forceinline__ void scores_and_kv_grads(const BwdWalkState& st, int t, int h, int m, int stage,
                                                        Acc& dk, Acc& dv) const {
        constexpr int kNT = Shape::kChunkNT;
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        const int wr = warp % Shape::kWN, wc = warp / Shape::kWN;
        const int key0 = wr * Shape::kWarpKeys;  // the warp's first key row in the block
        const int q0 = wc * Shape::kWarpQ;       // the warp's first query row in the block
        const uint32_t base = smem_base();
        const uint32_t q_stage = base + static_cast<uint32_t>(stage) * Smem::kQStageBytes;
        // A warp none of whose (query, key) pairs is visible skips the math; its dS^T rows are
        // still written (zeros), since dQ reads every row.
        bool hidden = false;
        if constexpr (kMasked) {
            const int key_first = st.n_block * BN + key0;
            const int row_first = m * BM + q0, row_last = row_first + Shape::kWarpQ - 1;
            hidden = st.mask.key_end(row_last) <= key_first ||
                     (st.mask.has_left() && st.mask.key_begin(row_first) >= key_first + Shape::kWarpKeys &&
                      key_first >= st.mask.sink_tokens);
        }
        // Not unrolled: one chunk's scores must be dead before the next chunk's are computed.
#pragma unroll 1
        for (int c = 0; c < Shape::kWarpQ / Shape::kChunkQ; ++c) {
            const int qc = q0 + c * Shape::kChunkQ;  // the chunk's first query row in the block
            float s[kMT][kNT][4];                    // S^T, then P^T: [16*kMT keys][kChunkQ queries]
            float dp[kMT][kNT][4];                   // dP^T, then dS^T
            zero_acc(s);
            zero_acc(dp);
            if (!hidden) {
                gemm_rows_rows<T, kMT, kNT, D / 16, kPitch, QL, kPipeFrags>(
                    s, base + Smem::kKOffset + key0 * kPitch + RowLane::a_x4(lane),
                    QL::b_x4(q_stage + Smem::kQOffset + qc * kQPitch, lane));
            }
            // (S = 2, first chunk) step t + 1's loads. Stage stage ^ 1 was last read in step t - 1,
            // before this step's barrier. t + 1 goes through a zero that ptxas cannot prove
            // (num_steps > t >= 0 here) and that depends on the S^T accumulators: without it
            // ptxas hoists the address math back above the MMAs.
            auto load_next = [&]() {
                if constexpr (S == 2) {
                    if (c == 0) {
                        const int t_next = t + 1 + (__float_as_int(s[0][0][0]) & (st.num_steps >> 31));
                        load_step(st, t_next, stage ^ 1, /*active=*/t_next < st.num_steps);
                        ptx::cp_async_commit_group();
                    }
                }
            };
            // Without score modifiers P^T is formed before dP^T = V dO^T (kExpEarly), so that its
            // exponentials can overlap the dP^T MMAs. (The two forms below are kept apart because
            // merging them changed the SASS of the other head dims: spills, +16-40 instructions.)
            if constexpr (kLoadAfterDp) {
                const bool mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
                if (!hidden) {
                    if (!mods) probs_plain<kMasked>(s, st, m, qc, key0, stage, lane);
                    gemm_rows_rows<T, kMT, kNT, D / 16, kPitch, QL, kPipeFrags>(
                        dp, base + Smem::kVOffset + key0 * kPitch + RowLane::a_x4(lane),
                        QL::b_x4(q_stage + Smem::kDoOffset + qc * kQPitch, lane));
                }
                load_next();
                if (!hidden) {
                    if (!mods) {
                        grads_plain(s, dp, qc, stage, lane);
                    } else {
                        probs_and_grads_impl<kMasked, /*kMods=*/true>(s, dp, st, h, m, qc, key0, stage, lane);
                    }
                }
            } else {
                load_next();
                if (!hidden) {
                    if constexpr (kExpEarly) {
                        const bool mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
                        if (!mods) probs_plain<kMasked>(s, st, m, qc, key0, stage, lane);
                        gemm_rows_rows<T, kMT, kNT, D / 16, kPitch, QL, kPipeFrags>(
                            dp, base + Smem::kVOffset + key0 * kPitch + RowLane::a_x4(lane),
                            QL::b_x4(q_stage + Smem::kDoOffset + qc * kQPitch, lane));
                        if (!mods) {
                            grads_plain(s, dp, qc, stage, lane);
                        } else {
                            probs_and_grads_impl<kMasked, /*kMods=*/true>(s, dp, st, h, m, qc, key0, stage, lane);
                        }
                    } else {
                        gemm_rows_rows<T, kMT, kNT, D / 16, kPitch, QL, kPipeFrags>(
                            dp, base + Smem::kVOffset + key0 * kPitch + RowLane::a_x4(lane),
                            QL::b_x4(q_stage + Smem::kDoOffset + qc * kQPitch, lane));
                        probs_and_grads<kMasked>(s, dp, st, h, m, qc, key0, stage, lane);
                    }
                }
            }
            uint32_t pa[kMT][kNT / 2][4];  // P^T as A fragments (T)
            uint32_t dsa[kMT][kNT / 2][4];  // dS^T as A fragments (T)
            acc_to_a_frags<T>(pa, s);
            acc_to_a_frags<T>(dsa, dp);
            store_frags(base + Smem::kDsOffset, dsa, key0, qc, lane);
            if constexpr (Shape::kPtInSmem) {
                store_frags(base + Smem::kPtOffset, pa, key0, qc, lane);
            } else if (!hidden) {
                gemm_regs_trans<T, kMT, kNT / 2, kDT, QL>(dv, pa,
                                                          QL::bt_x4(q_stage + Smem::kDoOffset + qc * kQPitch, lane));
                gemm_regs_trans<T, kMT, kNT / 2, kDT, QL>(dk, dsa,
                                                          QL::bt_x4(q_stage + Smem::kQOffset + qc * kQPitch, lane));
            }
        }
    }

    // A fragments of a [16*kMT keys][16*KS queries] tile into a [BN][BM + 8] smem tile at
    // (key0, qc): one 4-byte store per register (rows g / g + 8, query pairs 2t, 2t + 1).
    template <int KS>
    __device__ __forceinline__ static void store_frags(uint32_t tile, const uint32_t (&a)[kMT][KS][4], int key0, int qc,
                                                       int lane) {
        const int g = lane / 4, tq = lane % 4;
        const uint32_t lane_addr = tile + (key0 + g) * kSPitch + (qc + 2 * tq) * 2;
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const uint32_t at = lane_addr + mt * 16 * kSPitch + kk * 32;
                ptx::st_shared_b32(at, a[mt][kk][0]);                    // key g,     queries 16kk + 2t
                ptx::st_shared_b32(at + 8 * kSPitch, a[mt][kk][1]);      // key g + 8
                ptx::st_shared_b32(at + 16, a[mt][kk][2]);               // key g,     queries 16kk + 8 + 2t
                ptx::st_shared_b32(at + 8 * kSPitch + 16, a[mt][kk][3]);  // key g + 8
            }
    }

    // S^T -> P^T and dP^T -> dS^T in place (docs/semantics.md, "Backward"):
    //   P_ij = exp2(s_ij * log2(e) - lse2_i)  (0 where invisible), dS_ij = P_ij (dP_ij - D_i) (1 - tanh^2).
    // Without score modifiers the scale folds into the exp2 FFMA (p.scale_log2). The modifier test
    // is hoisted out of the element loop (one uniform branch per chunk, not one per element).
    template <bool kMasked, int NT>
    __device__ __forceinline__ void probs_and_grads(float (&s)[kMT][NT][4], float (&dp)[kMT][NT][4],
                                                    const BwdWalkState& st, int h, int m, int qc, int key0, int stage,
                                                    int lane) const {
        if (p.softcap > 0.f || p.alibi_slopes != nullptr) {
            probs_and_grads_impl<kMasked, /*kMods=*/true>(s, dp, st, h, m, qc, key0, stage, lane);
        } else {
            probs_and_grads_impl<kMasked, /*kMods=*/false>(s, dp, st, h, m, qc, key0, stage, lane);
        }
    }

    template <bool kMasked, bool kMods, int NT>
    __device__ __forceinline__ void probs_and_grads_impl(float (&s)[kMT][NT][4], float (&dp)[kMT][NT][4],
                                                         const BwdWalkState& st, int h, int m, int qc, int key0,
                                                         int stage, int lane) const {
        const int g = lane / 4, tq = lane % 4;
        const float* lse2 = reinterpret_cast<const float*>(smem + Smem::kLseOffset + stage * Smem::kStatStageBytes);
        const float* dsum = reinterpret_cast<const float*>(smem + Smem::kDsumOffset + stage * Smem::kStatStageBytes);
        const int row0 = m * BM + qc + 2 * tq;        // sequence query of column [nt = 0][e = 0]
        const int col0 = st.n_block * BN + key0 + g;  // sequence key of row [mt = 0][half = 0]
        const float scale_log2 = p.scale_log2;
        // Score modifiers (kMods only): softcap and ALiBi, each a uniform run-time choice.
        const bool softcap = kMods && p.softcap > 0.f;
        const float cap = p.softcap, prescale = kMods && softcap ? p.scale * ptx::rcp_approx(p.softcap) : 0.f;
        const float scale = p.scale;
        const float slope = kMods ? ScoreMod::load_alibi_slope(p, st.batch, h) : 0.f;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float2 l2 = *reinterpret_cast<const float2*>(lse2 + qc + 8 * nt + 2 * tq);
            const float2 d2 = *reinterpret_cast<const float2*>(dsum + qc + 8 * nt + 2 * tq);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = row0 + 8 * nt + e;  // query
                const float lse_i = e == 0 ? l2.x : l2.y;
                const float d_i = e == 0 ? d2.x : d2.y;
                const int key_end = st.mask.key_end(i);
                const int key_begin = st.mask.key_begin(i);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int j = col0 + 16 * mt + 8 * half;  // key
                        float& x = s[mt][nt][2 * half + e];
                        float& y = dp[mt][nt][2 * half + e];
                        float prob, grad = 1.f;
                        if constexpr (!kMods) {
                            prob = ptx::ex2_approx(fmaf(x, scale_log2, -lse_i));
                        } else {
                            float sc = x * scale;
                            if (softcap) {
                                float th;
                                tanh_and_derivative(x * prescale, th, grad);
                                sc = cap * th;
                            }
                            // slope is 0 without ALiBi.
                            sc -= slope * static_cast<float>(abs(i + st.mask.diag - j));
                            prob = ptx::ex2_approx(fmaf(sc, kLog2e, -lse_i));
                        }
                        if constexpr (kMasked) {
                            const bool visible = j < key_end && (j >= key_begin || j < st.mask.sink_tokens);
                            prob = visible ? prob : 0.f;
                        }
                        x = prob;
                        y = kMods ? prob * (y - d_i) * grad : prob * (y - d_i);
                    }
            }
        }
    }

    // Without score modifiers, in two halves: S^T -> P^T in place (before dP^T is computed) ...
    template <bool kMasked, int NT>
    __device__ __forceinline__ void probs_plain(float (&s)[kMT][NT][4], const BwdWalkState& st, int m, int qc,
                                                int key0, int stage, int lane) const {
        const int g = lane / 4, tq = lane % 4;
        const float* lse2 = reinterpret_cast<const float*>(smem + Smem::kLseOffset + stage * Smem::kStatStageBytes);
        const int row0 = m * BM + qc + 2 * tq;
        const int col0 = st.n_block * BN + key0 + g;
        const float scale_log2 = p.scale_log2;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float2 l2 = *reinterpret_cast<const float2*>(lse2 + qc + 8 * nt + 2 * tq);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int i = row0 + 8 * nt + e;
                const float lse_i = e == 0 ? l2.x : l2.y;
                const int key_end = st.mask.key_end(i);
                const int key_begin = st.mask.key_begin(i);
#pragma unroll
                for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int j = col0 + 16 * mt + 8 * half;
                        float& x = s[mt][nt][2 * half + e];
                        float prob = ptx::ex2_approx(fmaf(x, scale_log2, -lse_i));
                        if constexpr (kMasked) {
                            const bool visible = j < key_end && (j >= key_begin || j < st.mask.sink_tokens);
                            prob = visible ? prob : 0.f;
                        }
                        x = prob;
                    }
            }
        }
    }

    // ... then dP^T -> dS^T = P^T (dP^T - D).
    template <int NT>
    __device__ __forceinline__ void grads_plain(const float (&s)[kMT][NT][4], float (&dp)[kMT][NT][4], int qc,
                                                int stage, int lane) const {
        const int tq = lane % 4;
        const float* dsum = reinterpret_cast<const float*>(smem + Smem::kDsumOffset + stage * Smem::kStatStageBytes);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            const float2 d2 = *reinterpret_cast<const float2*>(dsum + qc + 8 * nt + 2 * tq);
#pragma unroll
            for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) dp[mt][nt][i] = s[mt][nt][i] * (dp[mt][nt][i] - (i % 2 == 0 ? d2.x : d2.y));
        }
    }

    // (kWC > 1) dV += P^T dO and dK += dS^T Q over all BM queries of the step, A from smem: the
    // warp's key rows, its kWarpD columns.
    __device__ __forceinline__ void kv_grads_from_smem(int stage, Acc& dk, Acc& dv) const {
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        const int wr = warp % Shape::kWN, wc = warp / Shape::kWN;
        const int key0 = wr * Shape::kWarpKeys;
        const uint32_t base = smem_base();
        const uint32_t q_stage = base + static_cast<uint32_t>(stage) * Smem::kQStageBytes;
        // This lane's dO and Q addresses at the warp's first dK / dV column.
        typename QL::Lane do_lane, q_lane;
        if constexpr (kSwizzleQ) {
            // The first column in 16-column groups. QL::column holds for the kWarpGroups groups
            // walked from it: a power of two (or a multiple of 4) that j0 is a multiple of.
            const int j0 = wc * kWarpGroups;
            do_lane = QL::column(QL::bt_x4(q_stage + Smem::kDoOffset, lane), j0);
            q_lane = QL::column(QL::bt_x4(q_stage + Smem::kQOffset, lane), j0);
        } else {
            const uint32_t col = wc * Shape::kWarpD * 2;
            do_lane = q_stage + Smem::kDoOffset + RowLane::bt_x4(lane) + col;
            q_lane = q_stage + Smem::kQOffset + RowLane::bt_x4(lane) + col;
        }
        gemm_rows_trans<T, kMT, BM / 16, kDT, kSPitch, QL, kPipeFrags>(
            dv, base + Smem::kPtOffset + key0 * kSPitch + SLane::a_x4(lane), do_lane);
        gemm_rows_trans<T, kMT, BM / 16, kDT, kSPitch, QL, kPipeFrags>(
            dk, base + Smem::kDsOffset + key0 * kSPitch + SLane::a_x4(lane), q_lane);
    }

    // This key block's rank among the key blocks that visit query block m (the order in which
    // their dQ contributions are added in deterministic mode): the number of higher key blocks
    // whose BwdQPlan holds m. Descending order: with a right mask bound a higher key block starts
    // its walk at a later query block, so it reaches m in fewer steps and rarely keeps a lower
    // one waiting (ascending order serialises the causal walk into a wavefront). Higher key
    // blocks are launched first in deterministic mode (bwd_block), so a block only ever waits
    // on blocks launched before it. Warp-wide; every lane returns it.
    __device__ __forceinline__ static int dq_rank(const BwdWalkState& st, int m, int lane) {
        const int n_end = (st.mask.seqlen_k + BN - 1) / BN;  // key blocks with keys of this sequence
        int rank = 0;
        for (int n0 = st.n_block + 1; n0 < n_end; n0 += 32) {
            const int n = n0 + lane;
            const bool visits = n < n_end && BwdQPlan::make<BM, BN>(st.mask, st.seqlen_q, n).visits(m);
            rank += __popc(__ballot_sync(0xffffffffu, visits));
        }
        return rank;
    }

    // Phase 2: dq_accum[block m of head h] += dS K (fp32 reductions; kept unscaled, the convert
    // kernel applies the softmax scale), in kDqPasses column slices. Deterministic mode adds the
    // key blocks' contributions to each query block in key-block order (BwdWorkspace::semaphore).
    __device__ __forceinline__ void dq_step(const BwdWalkState& st, int h, int m) const {
        constexpr int kDqMT = Shape::kDqMT, kPassNT = Shape::kDqPassNT;
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        const int row0 = (warp % Shape::kDqWM) * Shape::kDqRows;  // the warp's dQ rows (queries)
        const int col0 = (warp / Shape::kDqWM) * Shape::kDqCols;  // and columns
        const uint32_t base = smem_base();
        const bool deterministic = (p.flags & FA_FLAG_DETERMINISTIC) != 0;
        int32_t* sem = deterministic ? Ws::semaphore(p, st.batch, h, m) : nullptr;
        float* dq = p.dq_accum + (Ws::row(p, h, st.ws_row0) + m * BM) * D;  // BM x D fp32, fragment-major
#pragma unroll 1
        for (int pass = 0; pass < Shape::kDqPasses; ++pass) {
            const int col = col0 + pass * kPassNT * 8;  // the pass's first dQ column
            float acc[kDqMT][kPassNT][4];
            zero_acc(acc);
            gemm_trans_trans<T, kDqMT, BN / 16, kPassNT, kSPitch, kPitch>(
                acc, base + Smem::kDsOffset + SLane::at_x4(lane) + row0 * 2,
                base + Smem::kKOffset + RowLane::bt_x4(lane) + col * 2);
            if (deterministic && pass == 0) {
                if (warp == 0) {
                    const int rank = dq_rank(st, m, lane);
                    if (lane == 0) {
                        // The higher key blocks of this query block have added theirs.
                        while (ptx::ld_acquire_s32(sem) < rank) {
                        }
                    }
                    __syncwarp();
                }
                // Every thread's reductions below follow the higher blocks' ones.
                __syncthreads();
            }
            // Fragment-major block (BwdShape::dq_frag_index): one 512-byte vector reduction per
            // m16n8 tile, four whole 128-byte lines.
            float* frag = dq + Shape::dq_frag_index(warp, pass, 0, 0, lane) * 4;
#pragma unroll
            for (int mt = 0; mt < kDqMT; ++mt)
#pragma unroll
                for (int nt = 0; nt < kPassNT; ++nt) {
                    const float(&c)[4] = acc[mt][nt];
                    ptx::red_add_f32x4(frag + (mt * kPassNT + nt) * 128, c[0], c[1], c[2], c[3]);
                }
        }
        if (deterministic) {
            // This thread's reductions are ordered before the release below ...
            ptx::fence_acq_rel_gpu();
            // ... and so are every other thread's.
            __syncthreads();
            if (tid == 0) ptx::red_release_add_s32(sem, 1);
        }
    }

    // ---- epilogue ----

    // dK (times the softmax scale) and dV of the block's key rows [0, rows_valid), as T: staged
    // in the K and V tiles (every warp is done with them), stored 16 bytes per lane.
    __device__ __forceinline__ void store_dkv(const Acc& dk, const Acc& dv, T* dk_gmem, T* dv_gmem,
                                              int rows_valid) const {
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        const int wr = warp % Shape::kWN, wc = warp / Shape::kWN;
        const int g = lane / 4, tq = lane % 4;
        const uint32_t base = smem_base();
        const uint32_t lane_off = (wr * Shape::kWarpKeys + g) * kPitch + (wc * Shape::kWarpD + 2 * tq) * 2;
        const float scale = p.scale;
        // Every cp.async has landed and every warp is done reading K (dQ) and V.
        ptx::cp_async_wait_all();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const uint32_t off = lane_off + (16 * mt + 8 * half) * kPitch + dt * 16;
                    ptx::st_shared_b32(base + Smem::kKOffset + off,
                                       ptx::pack_f32x2<T>(dk[mt][dt][2 * half] * scale, dk[mt][dt][2 * half + 1] * scale));
                    ptx::st_shared_b32(base + Smem::kVOffset + off,
                                       ptx::pack_f32x2<T>(dv[mt][dt][2 * half], dv[mt][dt][2 * half + 1]));
                }
        // The staged rows are complete.
        __syncthreads();
        constexpr int kChunksPerRow = D / 8;
        for (int idx = tid; idx < BN * kChunksPerRow; idx += kThreads) {
            const int row = idx / kChunksPerRow, chunk = idx % kChunksPerRow;
            if (row < rows_valid) {
                const uint32_t off = row * kPitch + chunk * 16;
                ptx::st_global_v4_b32(dk_gmem + row * p.dk_row_stride + chunk * 8,
                                      ptx::ld_shared_v4_b32(base + Smem::kKOffset + off));
                ptx::st_global_v4_b32(dv_gmem + row * p.dv_row_stride + chunk * 8,
                                      ptx::ld_shared_v4_b32(base + Smem::kVOffset + off));
            }
        }
    }
};

}  // namespace sm80
}  // namespace fa
