// Epilogue of the sm90 forward kernel: O (and LSE) of one consumer warpgroup's 64 rows.
//
// O goes from the accumulator registers straight to global memory: each thread stores its two
// rows as 4-byte pairs (a quad of lanes covers 16 contiguous bytes of a row per store), rows past
// the end of the sequence are skipped, so dense and varlen tensors take the same path. Nothing
// goes through shared memory, so the epilogue does not hold the Q slab: each consumer warp
// releases Q as soon as its last Q.K^T has completed (mainloop.cuh), the producer loads the next
// tile's Q during the last P.V and this epilogue, and the next tile starts without a bubble. (A
// staged TMA store would need its own 64 x D buffer per warpgroup, which the d >= 96 tiles do not
// have room for; the stores here cost D / 4 instructions per thread per tile.)
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
    __device__ static void store(const FaParams& p, const Work& w, int wg, int thread_in_wg, const float (&o)[D / 2],
                                 const float (&lse)[2]) {
        // Per-tile recomputation from an opaque thread index (not hoisted out of the tile loop).
        AccCoord const ac(opaque(thread_in_wg));
        int const row_first = w.row_first() + 64 * wg;  // first query row of this warpgroup
        T* const o_ptr = static_cast<T*>(p.o);          // [b, sq, h, d] (strided) or [total_q, h, d]
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int const r = row_first + ac.row0 + 8 * h;  // row of this thread, within the sequence
            if (r >= w.seq.sq) continue;
            // 4-byte aligned: the base and every stride are 16-byte aligned (src/fwd.rs), col0 is even.
            T* const row = o_ptr + o_offset(p, w, r) + ac.col0;
#pragma unroll
            for (int c = 0; c < D / 8; ++c) {
                *reinterpret_cast<uint32_t*>(row + 8 * c) = pack_pair<T>(o[4 * c + 2 * h], o[4 * c + 2 * h + 1]);
            }
            // LSE from one lane of each quad.
            if (p.lse != nullptr && ac.col0 == 0) p.lse[lse_offset(p, w, r)] = lse[h];
        }
    }

    // A tile with no visible key: O = 0, LSE = -inf (or the sink logit) for this warpgroup's rows.
    __device__ static void store_zero(const FaParams& p, const Work& w, int wg, int thread_in_wg) {
        int const row_first = w.row_first() + 64 * wg;
        int const valid = w.seq.sq - row_first < 64 ? w.seq.sq - row_first : 64;
        if (valid <= 0) return;
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
