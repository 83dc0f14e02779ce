// Epilogue of the sm90 forward kernel: O (and LSE) of one consumer warpgroup's 64 rows.
//
// O goes from the accumulator registers straight to global memory: each quad of lanes transposes
// its pieces of a row so that every lane stores whole 16-byte chunks (see store), rows past
// the end of the sequence are skipped, so dense and varlen tensors take the same path. Nothing
// goes through shared memory, so the epilogue does not hold the Q slab: each consumer warp
// releases Q as soon as its last Q.K^T has completed (mainloop.cuh), the producer loads the next
// tile's Q during the last P.V and this epilogue, and the next tile starts without a bubble. (A
// staged TMA store would need its own 64 x D buffer per warpgroup, which the d >= 96 tiles do not
// have room for; the stores here cost D / 16 16-byte stores and D / 8 shuffles per thread per
// tile.)
//
// Measured (H200, 2026-12-02, same-process A/B over d 64 / 80 / 128 / 256 + GQA, 3 runs each):
// 16-byte stores against the former 4-byte pair stores (D / 4 per thread, each warp store
// writing 8 half sectors) +3.4% geomean; +8% / +5% at d 128 512 / 1k, +13% / +9% causal, +16% /
// +12% at d 256 512 / 1k, +19% / +14% / +9% / +5% d 256 causal 512-4k; from 8k within +-2%
// (d 80, which keeps 4-byte stores for 2 of its 10 chunks, -1% to -2%).
// The short sequences, where the epilogue runs most often, gain most; presumably the burst of
// stores held up the memory pipe at each tile boundary, where the mbarrier waits and shared
// loads that start the next tile queue behind it (not profiled).
// Tried, not kept: issuing the next tile's first Q.K^T before this epilogue (so that it runs on
// the tensor cores while the epilogue does). Reading O after wgmma.wait_group 1 with that Q.K^T
// still in flight makes ptxas serialise every wgmma of the kernel (C7514, "non wgmma
// instructions reading accumulator registers"), however the paths are arranged; with the
// ping-pong schedule the other warpgroup's last P.V hides most of the epilogue anyway.
//
// What the epilogue costs (ncu and SASS, H200, 2026-12-03, perf log run 12 call 4): the d 128
// kernel runs about 7200 warp instructions per tile beyond its KV blocks, which makes it 5.5%
// slower per FLOP at 4k keys than at 8k; a consumer warp's epilogue is about 470 of its ~800
// (104 SEL and 35 SHFL of the transpose below, 73 FMUL, 32 F2F, ~100 of address arithmetic,
// 41 fewer since the stores take immediate offsets).
// A stmatrix transpose through shared memory would take ~8 instructions per warp instead of
// ~140, but needs staging room the d >= 96 tiles do not have at their stage counts.
//
// Tiles that see no key at all (empty KV range) take store_zero: O = 0 and LSE = -inf (or the
// sink logit).
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/params.h"
#include "sm90/mask.cuh"
#include "sm90/numeric.cuh"
#include "sm90/pipeline.cuh"
#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"

namespace fa::sm90 {

template <typename T, int D, int BM, int BN>
struct Epilogue {
    using Work = TileWork<BM, BN>;
    static constexpr int kChunksPerRow = D * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks
    static_assert(D * sizeof(T) % 16 == 0, "O rows are stored in 16-byte chunks");

    // Element offset of O row i (within its sequence) of head h, column 0.
    __device__ __forceinline__ static int64_t o_offset(const FaParams& p, const Work& w, int i) {
        return static_cast<int64_t>(w.seq.tma_batch) * p.o_batch_stride +
               static_cast<int64_t>(w.seq.q_row0 + i) * p.o_row_stride +
               static_cast<int64_t>(w.coord.head) * p.o_head_stride;
    }

    // LSE of row i: dense [b, h, sq] (sq = p.seqlen_q), varlen [h, total_q].
    __device__ __forceinline__ static int64_t lse_offset(const FaParams& p, const Work& w, int i) {
        if (p.flags & FA_FLAG_VARLEN) {
            return static_cast<int64_t>(w.coord.head) * p.total_q + w.seq.q_row0 + i;
        }
        return (static_cast<int64_t>(w.coord.batch) * p.num_heads + w.coord.head) * p.seqlen_q + i;
    }

    // o: normalised O of this thread (wgmma accumulator layout); lse: of rows row0, row0 + 8.
    //
    // In the accumulator layout the 4 lanes of a quad share a row, and lane t holds the 4-byte
    // piece t (columns 2t, 2t + 1) of every 16-byte chunk (8 columns) of it. For each run of 4
    // chunks the quad transposes its 4 x 4 pieces with two shuffle steps (xor 2, then xor 1), so
    // that lane t holds all of chunk 4j + t and writes it with one 16-byte store: a quarter of
    // the store instructions, each writing whole 32-byte sectors (2 per row) instead of half
    // sectors. Chunks past the last whole run of 4 (d = 80: 2 of 10) keep the 4-byte stores.
    __device__ static void store(const FaParams& p, const Work& w, int wg, int thread_in_wg, const float (&o)[D / 2],
                                 const float (&lse)[2]) {
        // Per-tile recomputation from an opaque thread index (not hoisted out of the tile loop).
        AccCoord const ac(opaque(thread_in_wg));
        int const t = ac.col0 / 2;                      // lane in the quad
        int const row_first = w.row_first() + 64 * wg;  // first query row of this warpgroup
        T* const o_ptr = static_cast<T*>(p.o);          // [b, sq, h, d] (strided) or [total_q, h, d]
        constexpr int kChunks = D / 8;
        constexpr int kRuns = kChunks / 4;  // runs of 4 chunks stored 16 bytes per lane
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int const r = row_first + ac.row0 + 8 * h;  // row of this thread, within the sequence
            bool const valid = r < w.seq.sq;           // the same for the 4 lanes of a quad
            // 16-byte aligned: the base and every stride are 16-byte aligned (src/fwd.rs).
            T* const row = o_ptr + o_offset(p, w, valid ? r : 0);
            // This lane's first chunk; run j's chunk is 4 j 16-byte units on, an immediate
            // offset of the store (indexing with 4 j + t rebuilt each 64-bit address instead:
            // 16-91 more SASS instructions per kernel; H200 A/B, d 128 / 256 + GQA at 512 / 1k,
            // both masks, +0.9% geomean, -1.3% to +3.3%; perf log run 12 call 6).
            uint4* const dst = reinterpret_cast<uint4*>(row + 8 * t);
#pragma unroll
            for (int j = 0; j < kRuns; ++j) {
                uint32_t x[4];
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    x[u] = pack_pair<T>(o[4 * (4 * j + u) + 2 * h], o[4 * (4 * j + u) + 2 * h + 1]);
                }
                // Step 1 (xor 2): pieces of chunks whose bit 1 differs from the lane's swap with
                // the partner lane. Step 2 (xor 1): the same for bit 0. Then x[i] = piece i of
                // chunk 4j + t. Every lane shuffles (whole-warp masks), invalid rows included.
                bool const b1 = (t & 2) != 0;
                uint32_t s0 = __shfl_xor_sync(0xffffffffu, b1 ? x[0] : x[2], 2);
                uint32_t s1 = __shfl_xor_sync(0xffffffffu, b1 ? x[1] : x[3], 2);
                if (b1) {
                    x[0] = s0;
                    x[1] = s1;
                } else {
                    x[2] = s0;
                    x[3] = s1;
                }
                bool const b0 = (t & 1) != 0;
                s0 = __shfl_xor_sync(0xffffffffu, b0 ? x[0] : x[1], 1);
                s1 = __shfl_xor_sync(0xffffffffu, b0 ? x[2] : x[3], 1);
                if (b0) {
                    x[0] = s0;
                    x[2] = s1;
                } else {
                    x[1] = s0;
                    x[3] = s1;
                }
                if (valid) dst[4 * j] = make_uint4(x[0], x[1], x[2], x[3]);
            }
            if (!valid) continue;
#pragma unroll
            for (int c = 4 * kRuns; c < kChunks; ++c) {
                *reinterpret_cast<uint32_t*>(row + 8 * c + ac.col0) = pack_pair<T>(o[4 * c + 2 * h], o[4 * c + 2 * h + 1]);
            }
            // LSE from one lane of each quad.
            if (p.lse != nullptr && ac.col0 == 0) p.lse[lse_offset(p, w, r)] = lse[h];
        }
    }

    // Split-KV part (p.num_splits > 1, dense queries): row (split, b, h, i) of the fp32 partial
    // results, at ((split * batch + b) * heads + h) * sq + i (src/split.rs).
    __device__ __forceinline__ static int64_t partial_row(const FaParams& p, const Work& w, int i) {
        return ((static_cast<int64_t>(w.coord.split) * p.batch + w.coord.batch) * p.num_heads + w.coord.head) *
                   p.seqlen_q +
               i;
    }

    // A split-KV part's O (normalised by the part's own sum, fp32, 8-byte stores straight from
    // the accumulator layout) and LSE (without the sink logit, which the combine adds).
    __device__ static void store_partial(const FaParams& p, const Work& w, int wg, int thread_in_wg,
                                         const float (&o)[D / 2], const float (&lse)[2]) {
        AccCoord const ac(opaque(thread_in_wg));
        int const row_first = w.row_first() + 64 * wg;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int const r = row_first + ac.row0 + 8 * h;
            if (r >= w.seq.sq) continue;
            int64_t const row = partial_row(p, w, r);
            float* const dst = p.o_partial + row * D + ac.col0;
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                *reinterpret_cast<float2*>(dst + 8 * c) = make_float2(o[4 * c + 2 * h], o[4 * c + 2 * h + 1]);
            }
            if (ac.col0 == 0) p.lse_partial[row] = lse[h];
        }
    }

    // A tile with no visible key: O = 0, LSE = -inf (or the sink logit) for this warpgroup's rows;
    // a split-KV part: O = 0, LSE = -inf in the partial results.
    template <bool kSplit>
    __device__ static void store_zero(const FaParams& p, const Work& w, int wg, int thread_in_wg) {
        int const row_first = w.row_first() + 64 * wg;
        int const valid = w.seq.sq - row_first < 64 ? w.seq.sq - row_first : 64;
        if (valid <= 0) return;
        if constexpr (kSplit) {
#pragma unroll 1
            for (int idx = thread_in_wg; idx < valid * (D / 4); idx += kThreadsPerWarpgroup) {
                int const r = idx / (D / 4);
                int const chunk = idx - r * (D / 4);
                *reinterpret_cast<float4*>(p.o_partial + partial_row(p, w, row_first + r) * D + chunk * 4) =
                    make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            }
            if (thread_in_wg < valid) p.lse_partial[partial_row(p, w, row_first + thread_in_wg)] = -INFINITY;
            return;
        }
        T* const o_ptr = static_cast<T*>(p.o);
#pragma unroll 1
        for (int idx = thread_in_wg; idx < valid * kChunksPerRow; idx += kThreadsPerWarpgroup) {
            int const r = idx / kChunksPerRow;
            int const chunk = idx - r * kChunksPerRow;
            *reinterpret_cast<uint4*>(o_ptr + o_offset(p, w, row_first + r) + chunk * 8) = make_uint4(0u, 0u, 0u, 0u);
        }
        if (p.lse != nullptr && thread_in_wg < valid) {
            float const lse = p.sink_logits != nullptr ? p.sink_logits[w.coord.head] : -INFINITY;
            p.lse[lse_offset(p, w, row_first + thread_in_wg)] = lse;
        }
    }
};

}  // namespace fa::sm90
