// The main loop of the sm90 forward kernel: the producer warp's TMA loads and the consumer
// warpgroups' GEMMs + online softmax.
//
// Per tile, with blocks b_0, b_1, ..., b_{n-1} in visiting order (KvBlocks), the producer issues
//     K(b_0), Q, [K(b_1), V(b_0)], [K(b_2), V(b_1)], ..., V(b_{n-1})
// so K of the next block always travels ahead of V of the current one. Each consumer warpgroup
// (64 query rows) runs the intra-warpgroup overlapped schedule of FA3:
//     S = Q K(b_0)^T;  softmax -> P
//     for k = 1 .. n-1:  issue S = Q K(b_k)^T and O += P V(b_{k-1});  wait S;  softmax(S);
//                        wait P.V;  O *= rescale;  P <- S
//     O += P V(b_{n-1})
// so the softmax of block k overlaps the tensor cores working on P.V of block k-1. Across the
// consumer warpgroups, GEMM issue is ping-ponged: a warpgroup issues its GEMMs only in its
// turn (NamedBarrier::TurnWG*), then passes the turn on, so one warpgroup's softmax runs while
// the other's GEMMs occupy the tensor cores.
#pragma once

#include <stdint.h>

#include "common/params.h"
#include "sm90/layout.cuh"
#include "sm90/mask.cuh"
#include "sm90/numeric.cuh"
#include "sm90/pipeline.cuh"
#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"
#include "sm90/softmax.cuh"
#include "sm90/wgmma.cuh"

namespace fa::sm90 {

// Shared-memory regions of one CTA: shared-window addresses (for PTX operands) and the generic
// pointer of the same base (for the few plain loads / stores).
template <typename Layout>
struct SmemRegions {
    uint8_t* ptr;   // 1024-aligned base, generic
    uint32_t addr;  // the same base, shared window

    __device__ __forceinline__ uint32_t q_slab(int wg) const {
        return addr + Layout::kQOffset + static_cast<uint32_t>(wg) * Layout::QSlab::kStride;
    }
    __device__ __forceinline__ uint32_t k_tile(int stage) const {
        return addr + Layout::kKOffset + static_cast<uint32_t>(stage) * Layout::KVTile::kStride;
    }
    __device__ __forceinline__ uint32_t v_tile(int stage) const {
        return addr + Layout::kVOffset + static_cast<uint32_t>(stage) * Layout::KVTile::kStride;
    }
    __device__ __forceinline__ uint8_t* generic(uint32_t shared_addr) const { return ptr + (shared_addr - addr); }
};

template <typename T, int D, int BM, int BN, int STAGES>
struct Mainloop {
    using Layout = SharedLayout<T, D, BM, BN, STAGES>;
    using Geo = HeadDimGeometry<T, D>;
    using QSlab = typename Layout::QSlab;
    using KVTile = typename Layout::KVTile;
    using Smem = SmemRegions<Layout>;
    using Bars = Barriers<STAGES>;
    using Work = TileWork<BM, BN>;
    using State = PipelineState<STAGES>;

    static constexpr int kConsumerWGs = BM / 64;
    static constexpr int kQKSteps = D / 16;   // wgmma k16 steps of S = Q K^T
    static constexpr int kPVSteps = BN / 16;  // wgmma k16 steps of O += P V
    // Descriptors as the step-0 descriptor plus a per-k16-step constant (SmemTile::k_major_step):
    // +1.4% geomean at d = 128 (src/cells.rs). At d = 80 (32-byte swizzle, 5 panels) rebuilding
    // each step's descriptor from the address measured 5-8% faster without a mask (512-16k) and
    // 0-5% faster causal (H200, 2026-12-03, same-process A/B, two rounds), so d = 80 keeps it.
    static constexpr bool kStepDescriptors = D != 80;
    static_assert(BN % 16 == 0 && BN >= 16 && BN <= 256, "BN is the N of Q.K^T (<= 256) and the K of P.V (k16 steps)");
    static_assert(kConsumerWGs >= 2 && kConsumerWGs <= kMaxConsumerWarpgroups,
                  "ping-pong needs 2 or 3 consumer warpgroups (BM = 128 or 192)");
    static_assert(Layout::kQBytes == static_cast<uint32_t>(BM) * D * sizeof(T), "Q transaction bytes = the whole BM x D tile");
    static_assert(Layout::kKVBytes == static_cast<uint32_t>(BN) * D * sizeof(T), "K/V transaction bytes = one BN x D tile");

    // ================================ producer ================================================
    // Run by all 32 lanes of one warp (uniform control flow, so the smem zeroing below can use
    // the whole warp); only `leader` issues TMA and expect-tx.
    struct Producer {
        State st;
        uint32_t q_phase = 0;
        uint32_t fix_phase = 0;

        __device__ void load_k(const Work& w, const CUtensorMap* tma_k, const Smem& sm, const Bars& bars, int n,
                               State s, bool leader) const {
            // Wait until every consumer warp released this stage (its Q.K^T completed), or the
            // TMA would overwrite K under a running wgmma.
            mbarrier_wait(bars.k_empty(s.stage), s.phase ^ 1u);
            if (leader) {
                mbarrier_arrive_expect_tx(bars.k_full(s.stage), Layout::kKVBytes);
                tma_load_5d(sm.k_tile(s.stage), tma_k, bars.k_full(s.stage), 0, w.seq.k_row0 + n * BN, 0, w.head_k,
                            w.seq.tma_batch);
            }
        }

        __device__ void load_v(const FaParams& p, const Work& w, const CUtensorMap* tma_v, const Smem& sm,
                               const Bars& bars, int n, State s, bool leader) {
            // Wait until every consumer warp released this stage (its P.V completed).
            mbarrier_wait(bars.v_empty(s.stage), s.phase ^ 1u);
            int const rows_valid = w.seq.sk - n * BN;  // >= 1 for every visited block
            if (p.seqused_k == nullptr || rows_valid >= BN) {
                if (leader) {
                    mbarrier_arrive_expect_tx(bars.v_full(s.stage), Layout::kKVBytes);
                    tma_load_5d(sm.v_tile(s.stage), tma_v, bars.v_full(s.stage), 0, w.seq.k_row0 + n * BN, 0,
                                w.head_k, w.seq.tma_batch);
                }
                return;
            }
            // The block straddles seqused_k: rows [rows_valid, BN) lie inside the tensor map but
            // past the used keys and may hold anything (NaN included), and P = 0 there does not
            // cancel a NaN in P.V. Load through the private v_fix barrier, zero those rows, then
            // publish the stage on v_full with a plain arrival.
            if (leader) {
                mbarrier_arrive_expect_tx(bars.v_fix(), Layout::kKVBytes);
                tma_load_5d(sm.v_tile(s.stage), tma_v, bars.v_fix(), 0, w.seq.k_row0 + n * BN, 0, w.head_k,
                            w.seq.tma_batch);
            }
            mbarrier_wait(bars.v_fix(), fix_phase);
            fix_phase ^= 1u;
            uint4* const tile = reinterpret_cast<uint4*>(sm.generic(sm.v_tile(s.stage)));
            int const lane = static_cast<int>(threadIdx.x % 32);
#pragma unroll 1
            for (int panel = 0; panel < Geo::kPanels; ++panel) {
                // Whole swizzled lines: the swizzle permutes 16-byte chunks only within a line.
                int const begin = (panel * static_cast<int>(KVTile::kPanelBytes) + rows_valid * Geo::kSwizzleBytes) / 16;
                int const end = (panel + 1) * static_cast<int>(KVTile::kPanelBytes) / 16;
                for (int i = begin + lane; i < end; i += 32) tile[i] = make_uint4(0u, 0u, 0u, 0u);
            }
            // The zeros are generic-proxy writes that the consumers' wgmma (async proxy) reads:
            // without this fence the wgmma may still see the TMA-written values.
            fence_proxy_async_smem();
            __syncwarp();
            if (leader) mbarrier_arrive(bars.v_full(s.stage));
        }

        // Tried, not kept (H200, 2026-12-03, perf log run 12 call 2, 32 cells at 512-8k): an L2
        // prefetch of the next tile's Q when the producer starts the tile (1.001), and on top a
        // Q full / empty pair per consumer warpgroup, so each warpgroup's next Q loads as soon
        // as its own last Q.K^T is done (1.001 more). Q latency does not limit the tile
        // transition; its cost is instructions (see epilogue.cuh).
        __device__ void load_tile(const FaParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                  const CUtensorMap* tma_v, const Smem& sm, const Bars& bars, const Work& w,
                                  bool leader) {
            int const count = w.blocks.count();
            load_k(w, tma_k, sm, bars, w.blocks.block(0), st, leader);
            // Wait until every consumer warp's last Q.K^T of the previous tile has completed
            // (q_empty), or the TMA overwrites Q under a running wgmma. The consumers release Q
            // before their last P.V and epilogue, so this load overlaps both.
            mbarrier_wait(bars.q_empty(), q_phase ^ 1u);
            if (leader) {
                mbarrier_arrive_expect_tx(bars.q_full(), Layout::kQBytes);
#pragma unroll
                for (int wg = 0; wg < kConsumerWGs; ++wg) {
                    tma_load_5d(sm.q_slab(wg), tma_q, bars.q_full(), 0, w.seq.q_row0 + w.row_first() + 64 * wg, 0,
                                w.coord.head, w.seq.tma_batch);
                }
            }
            q_phase ^= 1u;
#pragma unroll 1
            for (int k = 1; k < count; ++k) {
                State const st_v = st;
                st.advance();
                load_k(w, tma_k, sm, bars, w.blocks.block(k), st, leader);
                load_v(p, w, tma_v, sm, bars, w.blocks.block(k - 1), st_v, leader);
            }
            load_v(p, w, tma_v, sm, bars, w.blocks.block(count - 1), st, leader);
            st.advance();
        }
    };

    // ================================ consumers ===============================================
    struct Consumer {
        State st;
        uint32_t q_phase = 0;
        int wg;  // consumer warpgroup, 0 .. kConsumerWGs - 1 (query rows 64 wg .. 64 wg + 63)

        __device__ explicit Consumer(int consumer_wg) : wg(consumer_wg) {}

        // Where this thread's accumulator elements sit, recomputed where needed from an opaque
        // thread index: hoisted out of the loops it would stay live (and spill) through them.
        __device__ __forceinline__ static AccCoord acc_coord() {
            return AccCoord(opaque(static_cast<int>(threadIdx.x % kThreadsPerWarpgroup)));
        }

        // Ping-pong turn: wait for it before issuing GEMMs, pass it on right after issuing.
        // Tried, not kept (H200, 2026-12-04, same-process A/B in both orders, perf log run 16):
        // no turns at d 192 / 256, as FlashAttention-3 / -4 do above d 128 (0.997 over 16 cells
        // at 1k-16k); no turns at d 64 (0.942, and ptxas spills 40-52 bytes); O rescaled inside
        // the turn, between the Q.K^T and the P.V issue (FlashAttention-4 above d 128), at every
        // head dim (0.995 over d 64 / 128 / 256 + GQA; d 256 0.986-1.002).
        __device__ __forceinline__ void turn_wait() const {
            named_barrier_sync(barrier_id(NamedBarrier::TurnWG0, wg), 2 * kThreadsPerWarpgroup);
        }
        __device__ __forceinline__ void turn_pass() const {
            int const next = wg + 1 == kConsumerWGs ? 0 : wg + 1;
            named_barrier_arrive(barrier_id(NamedBarrier::TurnWG0, next), 2 * kThreadsPerWarpgroup);
        }
        // The very first turn goes to warpgroup 0: the last warpgroup of the ring arrives on its
        // barrier once at start-up, as if it had just finished a turn.
        __device__ __forceinline__ void turn_start() const {
            if (wg == kConsumerWGs - 1) named_barrier_arrive(barrier_id(NamedBarrier::TurnWG0, 0), 2 * kThreadsPerWarpgroup);
        }

        // One lane per warp signals that this warp's wgmma reading the stage has completed
        // (the empty barriers count 4 arrivals per consumer warpgroup). Without it the producer
        // never refills the stage and hangs.
        __device__ __forceinline__ void release(uint32_t empty_bar) const {
            if (threadIdx.x % 32 == 0) mbarrier_arrive(empty_bar);
        }

        __device__ __forceinline__ void issue_qk(float (&s)[BN / 2], const Smem& sm, int stage) const {
            // Descriptors are rebuilt per issue from an opaque base: hoisted out of the loops they
            // would pin D / 16 64-bit values in uniform registers for the whole kernel.
            // The stage's tile address is the same in every lane, but ptxas cannot prove it (the
            // stage counter is carried through the barrier-wait loops), so it would build each
            // k16 step's descriptor in vector registers (64-bit add, moves) and copy it into
            // uniform registers (R2UR) before every wgmma. Read from lane 0, it is uniform: one
            // UIADD3.64 per wgmma at both GEMMs. The kernels shrink by 1-5% of their SASS
            // instructions (d 128 128 x 128: 3632 -> 3512) and ran +1.6% (H200, same-process A/B
            // in both orders, d 64 / 128 / 256 + GQA at 1k / 8k: d 64 +1.6% to +4.6%; perf log
            // run 11). (The warp is converged here: wgmma is .sync.aligned.)
            uint32_t const q = static_cast<uint32_t>(opaque(static_cast<int>(sm.q_slab(wg))));
            uint32_t const k = __shfl_sync(0xffffffffu, sm.k_tile(stage), 0);
            fence_operands(s);
            wgmma_fence();  // s was read by ordinary instructions (the previous softmax)
            if constexpr (kStepDescriptors) {
                uint64_t const q_desc = QSlab::desc_k_major(q, 0, 0);
                uint64_t const k_desc = KVTile::desc_k_major(k, 0, 0);
#pragma unroll
                for (int ks = 0; ks < kQKSteps; ++ks) {
                    WgmmaSS<T, BN>::mma(s, q_desc + QSlab::k_major_step(ks), k_desc + KVTile::k_major_step(ks),
                                        ks > 0 ? 1u : 0u);
                }
            } else {
#pragma unroll
                for (int ks = 0; ks < kQKSteps; ++ks) {
                    WgmmaSS<T, BN>::mma(s, QSlab::desc_k_major(q, 0, ks), KVTile::desc_k_major(k, 0, ks),
                                        ks > 0 ? 1u : 0u);
                }
            }
            wgmma_commit();
        }

        // accumulate = false (the tile's first P.V): O = P V, the old contents of o ignored, so
        // that o needs no zeroing at the start of each tile (D / 4 CS2R per thread; H200 A/B
        // over d 128 / 256 at 512-2k 1.002, within noise, d 256 512 keys +3-4%; perf log run 12).
        __device__ __forceinline__ void issue_pv(float (&o)[D / 2], uint32_t (&pf)[kPVSteps][4], const Smem& sm,
                                                 int stage, bool accumulate) const {
            uint32_t const v = __shfl_sync(0xffffffffu, sm.v_tile(stage), 0);  // uniform: see issue_qk
            uint32_t const first = accumulate ? 1u : 0u;  // scale-d of k16 step 0 (later steps: 1)
            fence_operands(o);
            fence_operands(pf);
            wgmma_fence();  // o was rescaled and pf converted by ordinary instructions
            if constexpr (kStepDescriptors) {
                uint64_t const v_desc = KVTile::desc_mn_major(v, 0);
#pragma unroll
                for (int ks = 0; ks < kPVSteps; ++ks) {
                    WgmmaRSTransB<T, D>::mma(o, pf[ks], v_desc + KVTile::mn_major_step(ks), ks > 0 ? 1u : first);
                }
            } else {
#pragma unroll
                for (int ks = 0; ks < kPVSteps; ++ks) {
                    WgmmaRSTransB<T, D>::mma(o, pf[ks], KVTile::desc_mn_major(v, ks), ks > 0 ? 1u : first);
                }
            }
            wgmma_commit();
        }

        // Score modifiers, mask (only where the block needs one) and the online-softmax update.
        // Returns whether this warp must rescale O by o_scale (OnlineSoftmax::update).
        __device__ __forceinline__ bool softmax_step(const FaParams& p, float (&s)[BN / 2], const Work& w, int n,
                                                     const ScoreMod& mod, MaskSteps steps,
                                                     TileSoftmax<D, BN>& sm_state, float (&o_scale)[2]) const {
            int const row_base = w.row_first() + 64 * wg;
            int const col_base = n * BN;
            if (mod.active) mod.template apply<BN>(p, s, acc_coord(), row_base, col_base, w.seq.diag);
            if (steps.needs(n)) apply_mask<BN>(s, acc_coord(), row_base, col_base, MaskBounds(p, w.seq));
            return sm_state.update(s, ScoreMod::exp2_scale_of(p), o_scale);
        }

        // P as wgmma A fragments: k16 step kk holds columns 16 kk .. 16 kk + 15, which are
        // accumulator groups 2 kk and 2 kk + 1 (the fp32 accumulator and the 16-bit A fragment
        // share the row / column ownership, as with mma.sync m16n8k16).
        __device__ __forceinline__ static void to_a_fragments(const float (&s)[BN / 2], uint32_t (&pf)[kPVSteps][4]) {
#pragma unroll
            for (int kk = 0; kk < kPVSteps; ++kk) {
                pf[kk][0] = pack_pair<T>(s[8 * kk + 0], s[8 * kk + 1]);  // row r,     cols 2t, 2t+1
                pf[kk][1] = pack_pair<T>(s[8 * kk + 2], s[8 * kk + 3]);  // row r + 8, cols 2t, 2t+1
                pf[kk][2] = pack_pair<T>(s[8 * kk + 4], s[8 * kk + 5]);  // row r,     cols 8+2t, 9+2t
                pf[kk][3] = pack_pair<T>(s[8 * kk + 6], s[8 * kk + 7]);  // row r + 8, cols 8+2t, 9+2t
            }
        }

        __device__ __forceinline__ static void rescale(float (&o)[D / 2], const float (&scale)[2]) {
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                o[4 * c + 0] *= scale[0];
                o[4 * c + 1] *= scale[0];
                o[4 * c + 2] *= scale[1];
                o[4 * c + 3] *= scale[1];
            }
        }

        // One tile: leaves the unnormalised O in `o` and the softmax state in `sm_state`.
        // Requires w.blocks.count() >= 1.
        __device__ void mma_tile(const FaParams& p, const Work& w, const Smem& sm, const Bars& bars,
                                 const ScoreMod& mod, TileSoftmax<D, BN>& sm_state, float (&o)[D / 2]) {
            // Which blocks of this warpgroup's 64 rows need the mask.
            int const row_base = w.row_first() + 64 * wg;
            int const row_last = w.wg_last_row(wg);
            MaskSteps const steps = MaskBounds(p, w.seq).steps(row_base, row_last < row_base ? row_base : row_last, BN);
            float s[BN / 2];
            uint32_t pf[kPVSteps][4];
            float o_scale[2];
            // o is not zeroed: the tile's first P.V overwrites it (issue_pv, accumulate = false).
            sm_state.reset();

            // Q of this tile has landed (the wgmma reads it through the async proxy; the mbarrier
            // completion makes the TMA's writes visible to it).
            mbarrier_wait(bars.q_full(), q_phase);
            q_phase ^= 1u;

            // S of the first block, alone (nothing to overlap it with yet). K must have landed.
            int const count = w.blocks.count();
            mbarrier_wait(bars.k_full(st.stage), st.phase);
            turn_wait();
            issue_qk(s, sm, st.stage);
            turn_pass();
            wgmma_wait<0>();
            fence_operands(s);
            release(bars.k_empty(st.stage));
            // This warp's last read of Q has completed: the producer may load the next tile's Q
            // (q_empty counts one arrival per consumer warp; without it the producer hangs).
            if (count == 1) release(bars.q_empty());

            // Iteration k: softmax of block k (S complete) while P.V of block k - 1 may still run,
            // then issue S of block k + 1 and P.V of block k. The loop is rotated so that the
            // softmax and mask code is instantiated once, and every path into the softmax has
            // only the P.V group pending (it reads neither s, which the softmax uses, nor
            // anything the softmax writes): ptxas can then keep the wgmmas asynchronous.
#pragma unroll 1
            for (int k = 0; k < count; ++k) {
                bool const needs_rescale = softmax_step(p, s, w, w.blocks.block(k), mod, steps, sm_state, o_scale);
                bool const more = k + 1 < count;
                State st_next = st;
                st_next.advance();
                // Waiting for the next K here (not after the P.V wait) also ends the basic block:
                // ptxas schedules wgmma.wait_group as early as its block allows, and in the same
                // block as the softmax it is hoisted above it, which serialises softmax and P.V.
                if (more) mbarrier_wait(bars.k_full(st_next.stage), st_next.phase);
                wgmma_wait<0>();  // P.V of block k - 1 (none at k = 0): o valid, pf free
                fence_operands(o);
                fence_operands(pf);
                if (k > 0) {
                    release(bars.v_empty(st_v_stage(st)));
                    if (needs_rescale) rescale(o, o_scale);  // at k = 0, o holds nothing yet
                }
                to_a_fragments(s, pf);
                if (!more) break;
                // Block k + 1: S = Q K^T, then O += P V of block k, in one turn.
                State const st_v = st;
                st = st_next;
                turn_wait();
                issue_qk(s, sm, st.stage);
                mbarrier_wait(bars.v_full(st_v.stage), st_v.phase);  // V of block k has landed
                issue_pv(o, pf, sm, st_v.stage, k > 0);
                turn_pass();
                wgmma_wait<1>();  // the older group, S, is done; P.V may still run
                fence_operands(s);
                release(bars.k_empty(st.stage));
                if (k + 2 == count) release(bars.q_empty());  // that was the last Q.K^T (see above)
            }

            // ---- last P.V: V of the last block lives in stage st ----
            mbarrier_wait(bars.v_full(st.stage), st.phase);  // V of the last block has landed
            turn_wait();
            issue_pv(o, pf, sm, st.stage, count > 1);
            turn_pass();
            wgmma_wait<0>();
            fence_operands(o);
            fence_operands(pf);
            release(bars.v_empty(st.stage));
            st.advance();
        }

        // For a warpgroup whose 64 rows all lie past the end of the sequence (in the last tile of
        // a sequence whose length is not a multiple of BM, e.g. 512 rows in 192-row tiles):
        // mma_tile's waits, releases and ping-pong turns in the same order, without a GEMM or a
        // softmax, so that the warpgroups with rows have the tensor cores and the MUFU to
        // themselves. Nothing is left to store. Requires w.blocks.count() >= 1.
        // Measured (H200, 2026-12-03, bf16, same-process A/B of two builds, perf log run 9 call 5):
        // d 64 non-causal 512 keys +7.5% (a third of its last tile's rows are past the end);
        // elsewhere within that call's noise (+2.4% over the 8 cells with such a tile, +1.8%
        // over the 32 without one, whose kernels only gained the branch).
        __device__ void skip_tile(const Work& w, const Bars& bars) {
            mbarrier_wait(bars.q_full(), q_phase);
            q_phase ^= 1u;
            release(bars.q_empty());  // Q is not read (q_empty counts every consumer warp)
            int const count = w.blocks.count();
            mbarrier_wait(bars.k_full(st.stage), st.phase);
            turn_wait();
            turn_pass();
            release(bars.k_empty(st.stage));
#pragma unroll 1
            for (int k = 0; k < count; ++k) {
                bool const more = k + 1 < count;
                State st_next = st;
                st_next.advance();
                if (more) mbarrier_wait(bars.k_full(st_next.stage), st_next.phase);
                if (k > 0) release(bars.v_empty(st_v_stage(st)));
                if (!more) break;
                State const st_v = st;
                st = st_next;
                turn_wait();
                mbarrier_wait(bars.v_full(st_v.stage), st_v.phase);
                turn_pass();
                release(bars.k_empty(st.stage));
            }
            mbarrier_wait(bars.v_full(st.stage), st.phase);
            turn_wait();
            turn_pass();
            release(bars.v_empty(st.stage));
            st.advance();
        }

        // Iterations [0, n) of a tile's visiting order that this warpgroup does not compute
        // (lead kernels: the leading blocks none of its rows sees): their waits, releases and
        // ping-pong turns, in the turns the computing warpgroups give them (turn j: S of block j
        // with P.V of block j - 1). Leaves st at block n, with V of block n - 1 released too;
        // mma_tile then runs the rest of the tile as if it started there. skip_tile is the same
        // protocol for a whole tile, kept separate so that kernels without the lead pass compile
        // as before.
        __device__ void pass_blocks(const Bars& bars, int n) {
            State prev = st;
#pragma unroll 1
            for (int j = 0; j < n; ++j) {
                mbarrier_wait(bars.k_full(st.stage), st.phase);
                turn_wait();
                if (j > 0) mbarrier_wait(bars.v_full(prev.stage), prev.phase);
                turn_pass();
                release(bars.k_empty(st.stage));
                if (j > 0) release(bars.v_empty(prev.stage));
                prev = st;
                st.advance();
            }
            if (n > 0) {
                mbarrier_wait(bars.v_full(prev.stage), prev.phase);
                release(bars.v_empty(prev.stage));
            }
        }

        // Stage of the block before the current one (the V the pending P.V reads).
        __device__ __forceinline__ static int st_v_stage(const State& s) {
            return s.stage == 0 ? STAGES - 1 : s.stage - 1;
        }
    };
};

}  // namespace fa::sm90
