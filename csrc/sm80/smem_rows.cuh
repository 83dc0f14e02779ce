// Shared-memory row layouts of the sm80 family's 16-bit tiles and the per-lane ldmatrix
// addresses into them: padded rows (PaddedRows, LdmatrixLane, PaddedKv), XOR-swizzled rows of
// whole 128-byte lines (SwizzledKvLane, SwizzledKv) and 160 / 192-byte rows in two swizzled
// panels (SplitKv). The forward keeps K / V in them (sm80/fwd_mainloop.cuh), the backward its
// per-step Q / dO tiles (sm80/bwd_gemm.cuh).
#pragma once

#include <stdint.h>

namespace fa {
namespace sm80 {

// Rows of D elements stored with a pitch of D + 8 elements. The pitch is an odd number of
// 16-byte chunks, so the 8 row addresses of one ldmatrix phase (and 8 consecutive cp.async
// chunks) fall in 8 distinct 16-byte bank groups: conflict-free without a swizzle.
template <class T, int D>
struct PaddedRows {
    static constexpr int kPitchBytes = (D + 8) * static_cast<int>(sizeof(T));
    static_assert(sizeof(T) == 2, "padded rows hold 16-bit elements (8 per 16-byte chunk)");
    static_assert((kPitchBytes / 16) % 2 == 1 && kPitchBytes % 16 == 0,
                  "the row pitch must be an odd number of 16-byte chunks to keep ldmatrix conflict-free");
};

// K / V rows of D = 64, 128, 192, 256 elements stored with a pitch of D elements (whole
// 128-byte lines) and the 16-byte chunks of each row XOR-swizzled: logical chunk c of row r sits
// at chunk c ^ (r % 8). The 8 row addresses of one ldmatrix phase still fall in 8 distinct
// 16-byte bank groups, and each 128-byte global segment of a cp.async copy lands in one 128-byte
// smem line. With padded rows (pitch D + 8) every 128-byte segment straddles two lines: ncu
// counted 10.5 shared-memory wavefronts per 512-byte LDGSTS instead of 4 (d = 256; perf log
// runs 15 / 16).
//
// Addresses, for a tile whose start is 128-byte aligned: a lane that reads logical chunk
// 2 j + h of row r (j = k-step, h = which 8-column half of the k16 step, from the lane index)
// computes once `lane = r * pitch + 32 (r % 8 / 2) + 16 (h ^ (r % 2))`; k-step j then reads
// `(tile + lane) ^ (32 (j % 4))` plus `128 (j / 4)`.
template <int PITCH>
struct SwizzledKvLane {
    static_assert(PITCH % 128 == 0, "swizzled rows are whole 128-byte lines");
    __device__ __forceinline__ static uint32_t at(int row, int half) {
        const int r = row % 8;
        return row * PITCH + 32 * (r / 2) + 16 * (half ^ (r % 2));
    }
    // B operand from a row-major [n][k] tile (K): rows (lane % 8) + 8 (lane / 16), half (lane / 8) % 2.
    __device__ __forceinline__ static uint32_t b_x4(int lane) { return at((lane % 8) + 8 * (lane / 16), (lane / 8) % 2); }
    // B operand from a row-major [k][n] tile (V) through .trans: rows (lane % 8) + 8 ((lane / 8) % 2), half lane / 16.
    __device__ __forceinline__ static uint32_t bt_x4(int lane) { return at((lane % 8) + 8 * ((lane / 8) % 2), lane / 16); }
    // The address of k16 step (or d-tile pair) j from a lane address made by b_x4 / bt_x4.
    __device__ __forceinline__ static uint32_t step(uint32_t lane_addr, int j) {
        return (lane_addr ^ static_cast<uint32_t>(32 * (j % 4))) + static_cast<uint32_t>(128 * (j / 4));
    }
};

// Per-lane byte offsets of ldmatrix x4 row addresses inside a padded tile (lane i addresses row
// i % 8 of matrix i / 8; see common/ptx.cuh for the fragment layouts).
template <int PITCH>
struct LdmatrixLane {
    // A operand, a 16x16 row-major block: matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15), column-major order.
    __device__ __forceinline__ static uint32_t a_x4(int lane) { return (lane % 16) * PITCH + (lane / 16) * 16; }
    // B operand from a row-major [n][k] tile (K): matrices (k 0-7, k 8-15) of n-tile 0, then of n-tile 1.
    __device__ __forceinline__ static uint32_t b_x4(int lane) {
        return ((lane % 8) + 8 * (lane / 16)) * PITCH + ((lane / 8) % 2) * 16;
    }
    // B operand from a row-major [k][n] tile (V) through .trans: matrices (k 0-7, k 8-15) of n-tile 0, then n-tile 1.
    __device__ __forceinline__ static uint32_t bt_x4(int lane) {
        return ((lane % 8) + 8 * ((lane / 8) % 2)) * PITCH + (lane / 16) * 16;
    }
};

// The K / V stage layouts, as the warp GEMMs see them. Each has a Lane (a lane's ldmatrix
// address, or two, tile start included; made by b_x4 for K, bt_x4 for V), addr(lane, r16, j)
// (the lane's address for 16-row group r16 and 16-column group j: n-tile pair and k16 step of
// Q K^T, k16 step and d-tile pair of P V) and advance(lane, rows).
//
// Padded rows of pitch PITCH bytes (PaddedRows).
template <int PITCH>
struct PaddedKv {
    using Lane = uint32_t;
    __device__ __forceinline__ static Lane b_x4(uint32_t tile, int lane) { return tile + LdmatrixLane<PITCH>::b_x4(lane); }
    __device__ __forceinline__ static Lane bt_x4(uint32_t tile, int lane) {
        return tile + LdmatrixLane<PITCH>::bt_x4(lane);
    }
    __device__ __forceinline__ static uint32_t addr(Lane l, int r16, int j) { return l + r16 * 16 * PITCH + j * 32; }
    __device__ __forceinline__ static Lane advance(Lane l, int rows) { return l + rows * PITCH; }
};

// Swizzled rows of whole 128-byte lines (SwizzledKvLane), pitch PITCH bytes.
template <int PITCH>
struct SwizzledKv {
    using Lane = uint32_t;
    __device__ __forceinline__ static Lane b_x4(uint32_t tile, int lane) { return tile + SwizzledKvLane<PITCH>::b_x4(lane); }
    __device__ __forceinline__ static Lane bt_x4(uint32_t tile, int lane) {
        return tile + SwizzledKvLane<PITCH>::bt_x4(lane);
    }
    __device__ __forceinline__ static uint32_t addr(Lane l, int r16, int j) {
        return SwizzledKvLane<PITCH>::step(l, j) + r16 * 16 * PITCH;
    }
    __device__ __forceinline__ static Lane advance(Lane l, int rows) { return l + rows * PITCH; }
    // The lane address of a tile that starts j0 16-column groups to the right: addr(column(l,
    // j0), r16, j) == addr(l, r16, j0 + j) for the j the caller then uses as long as j0 % 4 + j
    // % 4 carries into no other bit than j0 % 4 | j % 4 would (e.g. j0 a multiple of the number
    // of groups walked, that number a power of two).
    __device__ __forceinline__ static Lane column(Lane l, int j0) { return SwizzledKvLane<PITCH>::step(l, j0); }
};

// Rows of D = 80 / 96 16-bit elements (160 / 192 bytes, not whole lines) split into two swizzled
// panels: the first 64 elements of each of the BN rows in a 128-byte-pitch panel
// (SwizzledKvLane<128>), the last kW = 2 / 4 16-byte chunks in a second panel of kW * 16-byte
// rows right after it, 128 / (16 kW) rows to a line, chunk c of row r at c ^ ((r / (8 / kW)) % kW).
// Both keep the 8 row addresses of an ldmatrix phase in 8 distinct bank groups and every
// cp.async warp instruction on whole lines (SplitKvCopy). The tail address of a lane that
// reads logical chunk 2 j + h of row r: `r * 16 kW + 16 (h ^ b0) + 32 (j ^ b1)` with
// (b1, b0) the swizzle bits of the row, i.e. `lane_b ^ (32 j)`.
template <int D, int BN>
struct SplitKv {
    static constexpr int kW = (D * 2 - 128) / 16;  // chunks in the tail panel
    static constexpr int kTailPitch = kW * 16;
    static constexpr int kTailOffset = BN * 128;
    static_assert((kW == 2 || kW == 4) && BN % 16 == 0, "split rows: 128 bytes + a 32- or 64-byte tail");
    struct Lane {
        uint32_t a, b;
    };
    __device__ __forceinline__ static uint32_t tail_at(int row, int half) {
        const int sw = (row / (8 / kW)) % kW;  // the row's swizzle: chunk c sits at c ^ sw
        return row * kTailPitch + 16 * ((half ^ sw) & 1) + 32 * (sw / 2);
    }
    __device__ __forceinline__ static Lane b_x4(uint32_t tile, int lane) {
        return {tile + SwizzledKvLane<128>::b_x4(lane),
                tile + kTailOffset + tail_at((lane % 8) + 8 * (lane / 16), (lane / 8) % 2)};
    }
    __device__ __forceinline__ static Lane bt_x4(uint32_t tile, int lane) {
        return {tile + SwizzledKvLane<128>::bt_x4(lane),
                tile + kTailOffset + tail_at((lane % 8) + 8 * ((lane / 8) % 2), lane / 16)};
    }
    __device__ __forceinline__ static uint32_t addr(Lane l, int r16, int j) {
        if (j < 4) return SwizzledKvLane<128>::step(l.a, j) + r16 * 16 * 128;
        return (l.b ^ static_cast<uint32_t>(32 * (j - 4))) + r16 * 16 * kTailPitch;
    }
    __device__ __forceinline__ static Lane advance(Lane l, int rows) {
        return {l.a + rows * 128, l.b + rows * kTailPitch};
    }
};

}  // namespace sm80
}  // namespace fa
