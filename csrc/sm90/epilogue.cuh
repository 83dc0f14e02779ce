// Epilogue of the sm90 forward kernel: O (and LSE) of one consumer warpgroup's 64 rows.
//
// O goes through shared memory: the warpgroup writes its normalised O, converted to T, into its
// own Q slab (same swizzled layout; its Q is dead once its last Q.K^T completed, and no other
// warpgroup reads that slab), then
//   - a TMA store of the whole 64-row box, when that cannot write past the sequence: dense
//     tensors (the map's row extent is seqlen_q, so rows past it are clipped) or a varlen slab
//     whose 64 rows all belong to the sequence;
//   - otherwise (varlen slab crossing the end of its sequence, whose next rows belong to the
//     next sequence) 16-byte plain stores of the valid rows only.
// Then one thread arrives on q_empty so the producer may load the next tile's Q into the slab.
//
// Tiles that see no key at all (empty KV range) skip shared memory: store_zero writes O = 0 and
// LSE = -inf (or the sink logit) straight to global memory.
#pragma once

#include <math.h>
#include <stdint.h>

#include "common/params.h"
#include "sm90/layout.cuh"
#include "sm90/mask.cuh"
#include "sm90/numeric.cuh"
#include "sm90/pipeline.cuh"
#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"

namespace fa::sm90 {

template <typename T, int D, int BM, int BN>
struct Epilogue {
    using Slab = SmemTile<T, D, 64>;
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
    __device__ static void store(const FaParams& p, const CUtensorMap* tma_o, const Work& w, int wg,
                                 int thread_in_wg, uint8_t* slab_ptr, uint32_t slab_addr, uint32_t q_empty_bar,
                                 const float (&o)[D / 2], const float (&lse)[2]) {
        // The per-thread slab offsets depend only on the thread: computed here, per tile, from an
        // opaque copy of the thread index, so they are not hoisted out of the tile loop.
        AccCoord const ac(opaque(thread_in_wg));
        int const row_first = w.row_first() + 64 * wg;  // first query row of this slab
        int const valid = w.seq.sq - row_first < 64 ? w.seq.sq - row_first : 64;  // may be <= 0

        // 1. registers -> slab. A quad writes 16 contiguous bytes of one line; the 8 lines of a
        //    warp's store hit 8 different 16-byte bank groups thanks to the swizzle.
#pragma unroll
        for (int c = 0; c < D / 8; ++c) {
            int const col = 8 * c + ac.col0;
            *reinterpret_cast<uint32_t*>(slab_ptr + Slab::offset(ac.row0, col)) = pack_pair<T>(o[4 * c + 0], o[4 * c + 1]);
            *reinterpret_cast<uint32_t*>(slab_ptr + Slab::offset(ac.row0 + 8, col)) =
                pack_pair<T>(o[4 * c + 2], o[4 * c + 3]);
        }

        // 2. LSE, straight from registers (one lane of each quad).
        if (p.lse != nullptr && ac.col0 == 0) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                int const r = ac.row0 + 8 * h;
                if (r < valid) p.lse[lse_offset(p, w, row_first + r)] = lse[h];
            }
        }

        // 3. The slab was written by st.shared (generic proxy) and is read by the TMA store
        //    (async proxy): each writing thread fences, then the warpgroup syncs so that the
        //    storing thread sees every write.
        fence_proxy_async_smem();
        uint32_t const epilogue_bar = barrier_id(NamedBarrier::EpilogueWG0, wg);
        named_barrier_sync(epilogue_bar, kThreadsPerWarpgroup);

        bool const varlen = (p.flags & FA_FLAG_VARLEN) != 0;
        if (valid == 64 || (valid > 0 && !varlen)) {
            if (thread_in_wg == 0) {
                tma_store_5d(tma_o, slab_addr, 0, w.seq.q_row0 + row_first, 0, w.coord.head, w.seq.tma_batch);
                tma_store_commit();
                // The next tile's Q load overwrites the slab: release it only once the TMA
                // store has finished reading it.
                tma_store_wait_smem_read();
                mbarrier_arrive(q_empty_bar);
            }
            return;
        }
        if (valid > 0) {
            T* const o_ptr = static_cast<T*>(p.o);
#pragma unroll 1
            for (int idx = thread_in_wg; idx < 64 * kChunksPerRow; idx += kThreadsPerWarpgroup) {
                int const r = idx / kChunksPerRow;
                int const chunk = idx - r * kChunksPerRow;
                if (r < valid) {
                    uint4 const v = *reinterpret_cast<const uint4*>(slab_ptr + Slab::offset(r, chunk * 8));
                    *reinterpret_cast<uint4*>(o_ptr + o_offset(p, w, row_first + r) + chunk * 8) = v;
                }
            }
        }
        // Every thread's reads of the slab precede the release (the producer's TMA would
        // otherwise overwrite rows still being copied out).
        named_barrier_sync(epilogue_bar, kThreadsPerWarpgroup);
        if (thread_in_wg == 0) mbarrier_arrive(q_empty_bar);
    }

    // A tile with no visible key: O = 0, LSE = -inf (or the sink logit) for this slab's rows.
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
