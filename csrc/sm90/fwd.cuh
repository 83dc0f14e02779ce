// FlashAttention-3-class forward kernel for sm_90a (H100 / H200): TMA loads through tensor maps,
// mbarrier pipelines, wgmma (SS for Q.K^T, RS for P.V), a producer warp plus 2 or 3 consumer
// warpgroups with setmaxnreg rebalancing, ping-pong between the consumer warpgroups,
// intra-warpgroup overlap of softmax with the next GEMM, a persistent longest-first tile
// scheduler (dynamic under masks / varlen), causal / window / sink-token block skipping, O stored
// from registers.
//
// This file only composes: mainloop.cuh (producer loads, consumer GEMMs + softmax),
// epilogue.cuh (O / LSE stores), scheduler.cuh (tiles and KV block ranges).
//
// ================================ launch contract ================================================
// Instantiation (one line per tile of `sm90_fwd_tiles(d)`, src/cells.rs):
//     FA_SM90_FWD_KERNEL(fa_sm90_fwd_{dtype}_hd{D}_m{BM}n{BN}w{W}s{S}, T, D, BM, BN, W, S, SMEM)
// with SMEM = sm90_fwd_smem_bytes(D, dtype, tile) (static_asserted against SharedLayout here).
// Tiles with `lead` set use FA_SM90_FWD_LEAD_KERNEL and the symbol + `_lead` (same contract).
//
// Kernel:
//     extern "C" __global__ void __launch_bounds__(W * 32, 1)
//     NAME(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,
//          const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v)
// Grid:  (min(num_sms, total_tiles), 1, 1), total_tiles = ceil(p.seqlen_q / BM) * p.num_heads
//        * p.batch (* p.num_splits when > 1) (p.seqlen_q: the max over sequences for varlen). Persistent: the kernel walks
//        its tiles itself (L2 sections, longest first; scheduler.cuh): round-robin when
//        p.semaphore is null, else claimed from the int32 counter p.semaphore points to, which
//        must be 0 at launch (the launcher sets it for causal / window masks and varlen).
// Block: W * 32 threads = one producer warpgroup + BM / 64 consumer warpgroups.
// Dynamic shared memory: SMEM bytes (CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES set to it).
// Plain cuLaunchKernel, cluster size 1.
// Tensor maps (src/sm90_tma.rs, `encode_fwd_tensor_maps`): rank 5, innermost first
//     dims    (PW, rows, D / PW, heads, batch)          PW = swizzle bytes / 2 (layout.cuh)
//     strides (row_stride, PW, head_stride, batch_stride) x sizeof(T) bytes
//     box     (PW, 64 [Q] or BN [K, V], D / PW, 1, 1), swizzle 128 / 64 / 32 B for PW = 64 / 32 / 16
//     rows = seqlen_q / seqlen_k (dense, batch = p.batch) or total_q / total_k (varlen, batch 1)
// The kernel issues box coordinates (0, row, 0, head, batch) with row = q_row0 + i (varlen: the
// global row cu_seqlens[b] + i, batch coordinate 0). O and LSE are written with plain stores.
// Split-KV (the FA_SM90_FWD_SPLIT_KERNEL instantiation, p.num_splits > 1, dense queries,
// src/split.rs): total_tiles is multiplied by num_splits (batch x splits is the scheduler's batch dimension); part s of a tile visits the
// s-th share of its KV blocks (KvBlocks::part) and writes fp32 O / LSE (no sink logit) to
// p.o_partial / p.lse_partial (Epilogue::store_partial), combined by the merge cell's split
// kernel.
// ================================================================================================
#pragma once

#include <cuda.h>
#include <stdint.h>

#include "common/params.h"
#include "sm90/epilogue.cuh"
#include "sm90/layout.cuh"
#include "sm90/mainloop.cuh"
#include "sm90/mask.cuh"
#include "sm90/pipeline.cuh"
#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"
#include "sm90/softmax.cuh"

namespace fa::sm90 {

// Register split (65536 per SM): the producer warpgroup keeps the minimum, the consumers take
// the rest. 2 consumer WGs: 128 x 24 + 256 x 240 = 64512; 3: 128 x 32 + 384 x 160 = 65536.
template <int CONSUMER_WGS>
struct RegisterSplit {
    static constexpr uint32_t kProducer = CONSUMER_WGS == 2 ? 24 : 32;
    static constexpr uint32_t kConsumer = CONSUMER_WGS == 2 ? 240 : 160;
    static_assert(128 * kProducer + 128 * CONSUMER_WGS * kConsumer <= 65536, "the register file holds 64K registers");
};

// kSplit: the split-KV kernel (`_split` symbols; see TileScheduler).
// kLead: the lead kernel (`_lead` symbols, `Tile::lead`): each consumer warpgroup passes over
// the first KV blocks of the tile's visiting order that none of its own rows sees (above the
// causal diagonal or right window bound of its rows, though not of the tile's later rows).
template <typename T, int D, int BM, int BN, int W, int STAGES, int SMEM, bool kSplit = false, bool kLead = false>
__device__ __forceinline__ void fwd_kernel(const FaParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                           const CUtensorMap* tma_v) {
    using Layout = SharedLayout<T, D, BM, BN, STAGES>;
    using ML = Mainloop<T, D, BM, BN, STAGES>;
    using Epi = Epilogue<T, D, BM, BN>;
    using Work = TileWork<BM, BN>;
    using Regs = RegisterSplit<BM / 64>;
    using Sched = TileScheduler<BM, 2 * D * static_cast<int>(sizeof(T)), kSplit>;
    constexpr int kConsumerWGs = BM / 64;
    static_assert(W == 4 * (kConsumerWGs + 1), "W = 4 warps of the producer warpgroup + 4 per consumer warpgroup (BM / 64)");
    static_assert(SMEM == static_cast<int>(Layout::kSmemBytes),
                  "SMEM (src/cells.rs sm90_fwd_smem_bytes) disagrees with SharedLayout (csrc/sm90/layout.cuh)");
    static_assert(D * sizeof(T) % 32 == 0, "TMA rows and swizzle panels need the head dim in 32-byte units");

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    // Align the base to the 1024-byte swizzle period (SharedLayout reserves the slack).
    uint32_t const raw_addr = smem_addr(smem_raw);
    uint32_t const pad = (1024u - (raw_addr & 1023u)) & 1023u;
    typename ML::Smem const sm{smem_raw + pad, raw_addr + pad};
    typename ML::Bars const bars{sm.addr + Layout::kBarrierOffset};

    int const warp = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / 32, 0);  // warp-uniform
    int const warpgroup = warp / 4;

    if (threadIdx.x == 0) bars.init(kConsumerWGs);
    // Every thread must see initialised barriers before its first wait or arrive.
    __syncthreads();

    if (warpgroup == 0) {
        // ---- producer warpgroup: warp 0 issues every TMA load, warps 1..3 only give back
        // their registers ----
        setmaxnreg_dec<Regs::kProducer>();
        if (warp == 0) {
            bool const leader = elect_one();
            if (leader) {
                tma_prefetch_descriptor(tma_q);
                tma_prefetch_descriptor(tma_k);
                tma_prefetch_descriptor(tma_v);
            }
            typename ML::Producer producer;
            TileFeed<STAGES> feed;
            int const lane = static_cast<int>(threadIdx.x % 32);
            int t = Sched::first();
#pragma unroll 1
            while (true) {
                bool const valid = Sched::valid(p, t);
                TileCoord const c = valid ? Sched::coord(p, t) : TileCoord{-1, 0, 0, 0};
                feed.put(bars, c, leader);  // m_block -1 (past the last tile) stops the consumers
                if (!valid) break;
                // Claim the next tile now: the atomic's latency hides behind this tile's loads.
                int const claimed = lane == 0 ? Sched::claim(p) : 0;
                Work const w(p, c, kSplit);
                // Tiles without rows or keys: the consumers handle them without loads.
                if (w.has_rows() && w.blocks.count() > 0) producer.load_tile(p, tma_q, tma_k, tma_v, sm, bars, w, leader);
                t = Sched::next(p, t, __shfl_sync(0xffffffffu, claimed, 0));
            }
        }
    } else {
        // ---- consumer warpgroups ----
        setmaxnreg_inc<Regs::kConsumer>();
        int const cwg = warpgroup - 1;
        int const thread_in_wg = static_cast<int>(threadIdx.x) % 128;
        typename ML::Consumer consumer(cwg);
        TileFeed<STAGES> feed;
        consumer.turn_start();
#pragma unroll 1
        while (true) {
            TileCoord const c = feed.take(bars);
            if (c.m_block < 0) break;  // the producer's stop signal
            Work const w(p, c, kSplit);
            if (!w.has_rows() || w.blocks.count() == 0) {
                if (w.has_rows()) Epi::template store_zero<kSplit>(p, w, cwg, thread_in_wg);
                feed.release(bars);
                continue;
            }
            int const wg_row0 = w.row_first() + 64 * cwg;  // this warpgroup's first row
            if (wg_row0 >= w.seq.sq) {
                // None of this warpgroup's rows is in the sequence: keep the pipeline going
                // without computing; nothing to store.
                consumer.skip_tile(w, bars);
                feed.release(bars);
                continue;
            }
            Work wl = w;
            if constexpr (kLead) {
                // The value of w.wg_last_row(cwg), written out: through the helper the lead
                // kernels compile differently (not yet tested on a GPU), the others identically.
                int const wg_rows_end = wg_row0 + 64;
                int const wg_last_row = (wg_rows_end < w.seq.sq ? wg_rows_end : w.seq.sq) - 1;
                int const lead = w.blocks.leading_hidden(MaskBounds(p, w.seq), wg_last_row);
                if (lead == w.blocks.count()) {
                    // No key of the tile is visible to this warpgroup's rows: O = 0 and the LSE
                    // of an empty row, as for a tile without blocks.
                    consumer.skip_tile(w, bars);
                    Epi::template store_zero<kSplit>(p, w, cwg, thread_in_wg);
                    feed.release(bars);
                    continue;
                }
                consumer.pass_blocks(bars, lead);
                wl.blocks = w.blocks.drop_leading(lead);
            }
            TileSoftmax<D, BN> softmax;
            float o[D / 2];
            // Without the lead pass the loop reads w itself (wl is dead): the general kernels
            // compile as they did before the pass existed.
            Work const& wm = kLead ? wl : w;
            // Tried, not kept (perf log run 16): mma_tile specialised on "no score modifier",
            // chosen here per tile. With O defined on two paths ptxas serialises every wgmma
            // (C7515): 0.83. Specialising the whole tile loop instead avoids that but spills
            // 24 / 72 bytes at d 64 / 128, for a test of about 5 of the ~600 instructions of a
            // d 64 iteration.
            consumer.mma_tile(p, wm, sm, bars, ScoreMod(p, w.coord.batch, w.coord.head), softmax, o);

            // The epilogue re-reads the tile's coordinate and re-derives the tile rather than
            // keeping them in registers through the main loop (register pressure: the loop holds
            // S, P, O).
            Work const we(p, feed.current(bars));
            // Split-KV: the sink logit joins the denominator only where the parts are combined.
            bool const has_sink = p.sink_logits != nullptr && !kSplit;
            float const sink_logit = has_sink ? p.sink_logits[we.coord.head] : 0.0f;
            float o_scale[2];
            float lse[2];
            softmax.finalize(ScoreMod::exp2_scale_of(p), has_sink, sink_logit, o_scale, lse);
            ML::Consumer::rescale(o, o_scale);
            if constexpr (kSplit) {
                Epi::store_partial(p, we, cwg, thread_in_wg, o, lse);
            } else {
                Epi::store(p, we, cwg, thread_in_wg, o, lse);
            }
            feed.release(bars);
        }
    }
}

}  // namespace fa::sm90

// One kernel of the sm90 forward family (see the launch contract above).
#define FA_SM90_FWD_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                                   \
    extern "C" __global__ void __launch_bounds__((W) * 32, 1)                                                \
        NAME(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,                  \
             const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v) {         \
        ::fa::sm90::fwd_kernel<T, D, BM, BN, W, S, SMEM>(p, &tma_q, &tma_k, &tma_v);                         \
    }

// The split-KV kernel of a tile (`_split` symbols, `Cell::split_tiles` in src/cells.rs).
#define FA_SM90_FWD_SPLIT_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                             \
    extern "C" __global__ void __launch_bounds__((W) * 32, 1)                                                \
        NAME(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,                  \
             const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v) {         \
        ::fa::sm90::fwd_kernel<T, D, BM, BN, W, S, SMEM, true>(p, &tma_q, &tma_k, &tma_v);                   \
    }

// The lead kernel of a tile (`Tile::lead` in src/cells.rs; the symbol ends in `_lead`).
#define FA_SM90_FWD_LEAD_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                              \
    extern "C" __global__ void __launch_bounds__((W) * 32, 1)                                                \
        NAME(const __grid_constant__ FaParams p, const __grid_constant__ CUtensorMap tma_q,                  \
             const __grid_constant__ CUtensorMap tma_k, const __grid_constant__ CUtensorMap tma_v) {         \
        ::fa::sm90::fwd_kernel<T, D, BM, BN, W, S, SMEM, false, true>(p, &tma_q, &tma_k, &tma_v);            \
    }
