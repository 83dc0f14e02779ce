// Score modifiers and the mask, applied in registers on the wgmma accumulator layout.
//
// Layout of a wgmma m64nN fp32 accumulator, per thread of the warpgroup (PTX ISA, "wgmma
// register fragment D"): warp w of the warpgroup owns rows 16w .. 16w + 15; in float d[N / 2],
//     d[4c + 0], d[4c + 1]  ->  row 16w + lane/4,      columns 8c + 2(lane%4) + {0, 1}
//     d[4c + 2], d[4c + 3]  ->  row 16w + lane/4 + 8,  the same columns
// for c in [0, N / 8). So each thread holds 2 rows, and the 4 lanes of a quad share them.
#pragma once

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "common/params.h"
#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"

namespace fa::sm90 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Where this thread's accumulator elements sit inside a 64-row warpgroup tile.
struct AccCoord {
    int row0;  // first of the thread's two rows (the other is row0 + 8)
    int col0;  // column of element 0 inside each 8-column group

    __device__ explicit AccCoord(int thread_in_warpgroup)
        : row0(16 * (thread_in_warpgroup / 32) + (thread_in_warpgroup % 32) / 4), col0(2 * (thread_in_warpgroup % 4)) {}

    __device__ __forceinline__ static constexpr int row_half(int e) { return (e >> 1) & 1; }  // 0: row0, 1: row0 + 8
    __device__ __forceinline__ int row(int e) const { return row0 + 8 * row_half(e); }
    __device__ __forceinline__ int col(int e) const { return 8 * (e >> 2) + col0 + (e & 1); }
};

// softcap * tanh(x / softcap ...) without the MUFU tanh (tanh.approx has ~5e-4 relative error,
// which a large softcap turns into visible errors in P): with t = 2^(2 x log2 e),
//     softcap * tanh(x) = softcap * (1 - 2 / (t + 1)) = softcap - 2 softcap / (t + 1),
// absolute error ~1e-7 * softcap over the whole range (t = inf gives softcap, t = 0 gives
// -softcap, NaN stays NaN). Two MUFU ops and two FP32 ops per element, few temporaries.
__device__ __forceinline__ float softcap_tanh(float x_times_2log2e, float softcap, float minus_2_softcap) {
    float const t = ex2(x_times_2log2e);
    return fmaf(minus_2_softcap, rcp_approx(t + 1.0f), softcap);
}

// softcap and ALiBi (docs/semantics.md order: scale, then softcap, then ALiBi). When either is
// on, scores are turned into natural units s(i, j) before the softmax, which then uses
// exp2_scale = log2(e); otherwise the raw q.k products go to the softmax with exp2_scale =
// scale * log2(e), one FFMA per element. Everything but the slope is read from the params
// (constant bank) where it is used, to keep the main loop's registers for S, P and O.
struct ScoreMod {
    bool active;
    float alibi_slope;  // 0 without ALiBi

    __device__ ScoreMod(const FaParams& p, int batch, int head)
        : active(is_active(p)),
          alibi_slope(p.alibi_slopes != nullptr ? p.alibi_slopes[batch * p.alibi_batch_stride + head] : 0.0f) {}

    __device__ __forceinline__ static bool is_active(const FaParams& p) {
        return p.softcap > 0.0f || p.alibi_slopes != nullptr;
    }
    __device__ __forceinline__ static float exp2_scale_of(const FaParams& p) {
        return is_active(p) ? kLog2e : p.scale_log2;
    }

    // row_base / col_base: query row and key index of element (0, 0) of this warpgroup's tile.
    template <int N>
    __device__ __forceinline__ void apply(const FaParams& p, float (&s)[N / 2], const AccCoord& ac, int row_base,
                                          int col_base, int diag) const {
        if (p.softcap > 0.0f) {
            // Recomputed per block (opaque: not hoisted into a register live across the loop).
            float const softcap = opaque(p.softcap);
            float const in_scale = 2.0f * kLog2e * __fdividef(p.scale, softcap);  // x -> 2 log2(e) x
            float const minus_2_softcap = -2.0f * softcap;
#pragma unroll
            for (int e = 0; e < N / 2; ++e) s[e] = softcap_tanh(s[e] * in_scale, softcap, minus_2_softcap);
        } else {
#pragma unroll
            for (int e = 0; e < N / 2; ++e) s[e] *= p.scale;
        }
        if (p.alibi_slopes != nullptr) {
#pragma unroll
            for (int e = 0; e < N / 2; ++e) {
                int const dist = row_base + ac.row(e) + diag - (col_base + ac.col(e));
                s[e] -= alibi_slope * static_cast<float>(dist < 0 ? -dist : dist);
            }
        }
    }
};

// Sets invisible scores to -inf (after the score modifiers, so that softcap cannot turn -inf
// into a finite value). Only called for blocks where MaskBounds::needs_mask is true. Branch-free:
// per row, the visible keys are [left, right) plus the sink keys [0, sink_tokens) below left.
//
// Without a left bound (causal, right window, sequence end) a row's visible keys are [0, right):
// each element is one compare of its column offset, a constant, against right - col_base - col0,
// and one select, instead of the three compares of the general rule (the diagonal blocks of
// short causal calls are a large share of their work).
template <int N>
__device__ __forceinline__ void apply_mask(float (&s)[N / 2], const AccCoord& ac, int row_base, int col_base,
                                           const MaskBounds& mb) {
    if (mb.window_left < 0) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int const lim = mb.key_end(row_base + ac.row0 + 8 * h) - col_base - ac.col0;  // visible: 8 c + x < lim
#pragma unroll
            for (int c = 0; c < N / 8; ++c) {
#pragma unroll
                for (int x = 0; x < 2; ++x) {
                    int const e = 4 * c + 2 * h + x;
                    s[e] = 8 * c + x < lim ? s[e] : -INFINITY;
                }
            }
        }
        return;
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        int const i = row_base + ac.row0 + 8 * h;
        int const right = mb.key_end(i);
        int const left = mb.window_left >= 0 ? i + mb.diag - mb.window_left : INT_MIN;
        int const sink = mb.window_left >= 0 ? mb.sink_tokens : 0;
#pragma unroll
        for (int c = 0; c < N / 8; ++c) {
#pragma unroll
            for (int x = 0; x < 2; ++x) {
                int const e = 4 * c + 2 * h + x;
                int const j = col_base + ac.col(e);
                bool const visible = (j < right) & ((j >= left) | (j < sink));
                s[e] = visible ? s[e] : -INFINITY;
            }
        }
    }
}

}  // namespace fa::sm90
