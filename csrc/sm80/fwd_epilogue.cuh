// sm80-family forward epilogue: O (normalised, converted to T) and LSE of one warp's rows.
//
// O goes through shared memory so global stores are 16 bytes per lane and whole rows per warp
// (the accumulator layout alone would give 4-byte stores). Each warp stages its rows in its own
// rows of the Q tile, which only that warp ever reads, so no block-wide barrier is needed.
#pragma once

#include <stdint.h>

#include "common/ptx.cuh"

namespace fa {
namespace sm80 {

template <class T, int D, int MT, int PITCH>
struct FwdEpilogue {
    static constexpr int kRows = 16 * MT;           // rows of one warp
    static constexpr int kChunksPerRow = D / 8;     // 16-byte chunks of an output row
    static constexpr int kChunksPerLane = kRows * kChunksPerRow / 32;
    static_assert(kRows * kChunksPerRow % 32 == 0, "every lane must store the same number of O chunks");

    // o: the warp's m16n8 accumulators over the head dim; o_scale: per fragment row (see
    // OnlineSoftmax). stage: smem address of the warp's first staging row (the warp's own Q
    // rows, no longer read). o_gmem: global address of the warp's first row. Rows >= rows_valid
    // (past the sequence end) are not stored.
    __device__ __forceinline__ static void store_o(const float (&o)[MT][D / 8][4], const float (&o_scale)[2 * MT],
                                                   uint32_t stage, T* o_gmem, int64_t row_stride, int rows_valid,
                                                   int lane) {
        const int g = lane / 4, t = lane % 4;
        // Every lane of the warp has finished its last ldmatrix of these Q rows.
        __syncwarp();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const float scale = o_scale[2 * mt + half];
                    const int row = 16 * mt + 8 * half + g;
                    const int col = 8 * dt + 2 * t;
                    const uint32_t packed =
                        ptx::pack_f32x2<T>(o[mt][dt][2 * half] * scale, o[mt][dt][2 * half + 1] * scale);
                    ptx::st_shared_b32(stage + row * PITCH + col * 2, packed);
                }
        // The staged rows are complete before any lane reads another lane's values.
        __syncwarp();
#pragma unroll
        for (int i = 0; i < kChunksPerLane; ++i) {
            const int chunk = lane + 32 * i;
            const int row = chunk / kChunksPerRow;
            const int col_chunk = chunk % kChunksPerRow;
            if (row < rows_valid) {
                ptx::st_global_v4_b32(o_gmem + row * row_stride + col_chunk * 8,
                                      ptx::ld_shared_v4_b32(stage + row * PITCH + col_chunk * 16));
            }
        }
    }

    // Split-KV part: O scaled by o_scale, fp32, straight from the accumulators to rows of D floats
    // (o_gmem: the warp's first row). Each quad writes 32 contiguous bytes per (row, n8 tile).
    __device__ __forceinline__ static void store_o_f32(const float (&o)[MT][D / 8][4], const float (&o_scale)[2 * MT],
                                                       float* o_gmem, int rows_valid, int lane) {
        const int g = lane / 4, t = lane % 4;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = 16 * mt + 8 * half + g;
                if (row >= rows_valid) continue;
                const float scale = o_scale[2 * mt + half];
#pragma unroll
                for (int dt = 0; dt < D / 8; ++dt) {
                    *reinterpret_cast<float2*>(o_gmem + static_cast<int64_t>(row) * D + 8 * dt + 2 * t) =
                        make_float2(o[mt][dt][2 * half] * scale, o[mt][dt][2 * half + 1] * scale);
                }
            }
    }

    // lse: per fragment row; lse_gmem: the warp's first row (contiguous rows). One lane per quad writes.
    __device__ __forceinline__ static void store_lse(const float (&lse)[2 * MT], float* lse_gmem, int rows_valid,
                                                     int lane) {
        if (lane % 4 != 0) return;
        const int g = lane / 4;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = 16 * mt + 8 * half + g;
                if (row < rows_valid) lse_gmem[row] = lse[2 * mt + half];
            }
    }
};

}  // namespace sm80
}  // namespace fa
