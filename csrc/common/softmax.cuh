// Online softmax over mma.sync accumulator fragments (FlashAttention-2 style).
//
// Score tiles arrive as m16n8 fp32 accumulator fragments `s[MT][NT][4]`: MT m16 tiles of the
// warp's rows times NT n8 tiles of keys. Lane (g = lane / 4, t = lane % 4) holds, per m16 tile mt,
// two rows: row 2*mt (fragment row g, elements s[mt][nt][0..1]) and row 2*mt + 1 (fragment row
// g + 8, elements s[mt][nt][2..3]), each at key columns 8*nt + 2t and 8*nt + 2t + 1. The four
// lanes of a quad share a row, so row reductions are two xor-shuffles.
//
// Units. Scores are kept in "score units" (raw q.k, or natural-log units once a score modifier
// has run); `scale_log2` turns them into log2 units, so every exponential is one FFMA plus one
// MUFU.EX2: p = exp2(s * scale_log2 - max * scale_log2). The running sum stays a per-lane partial
// (quad-reduced once, in `finalize`), as in FlashAttention-2.
//
// Rows with no visible key so far have max = -inf; the subtraction base is then 0 instead of
// -inf, so exp2(-inf - base) = 0 and no NaN appears (-inf - -inf).
#pragma once

#include <math.h>

#include "common/ptx.cuh"

namespace fa {

inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// Reductions over the quad (4 consecutive lanes) that owns one accumulator row.
__device__ __forceinline__ float quad_allreduce_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
    return x;
}

__device__ __forceinline__ float quad_allreduce_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    x += __shfl_xor_sync(0xffffffffu, x, 2);
    return x;
}

// What `finalize` returns per row: the factor that turns the accumulated O into the output, and
// the natural-log LSE (-inf for a row with an empty denominator).
template <int kRows>
struct SoftmaxResult {
    float o_scale[kRows];
    float lse[kRows];
};

// `MT`: m16 tiles per warp (each lane owns 2 * MT rows).
template <int MT>
struct OnlineSoftmax {
    static constexpr int kRows = 2 * MT;

    float row_max[kRows];  // running max in score units; -inf until a visible key is seen
    float row_sum[kRows];  // this lane's share of sum exp2(s * scale_log2 - max_log2)
    float scale_log2;      // score units -> log2 units (run-time: depends on the score modifiers)

    __device__ __forceinline__ explicit OnlineSoftmax(float score_scale_log2) : scale_log2(score_scale_log2) {
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            row_max[r] = -INFINITY;
            row_sum[r] = 0.f;
        }
    }

    // The subtraction base of a row in log2 units: max * scale_log2, or 0 for an empty row.
    __device__ __forceinline__ float max_log2(int r) const {
        return row_max[r] == -INFINITY ? 0.f : row_max[r] * scale_log2;
    }

    // Folds a new score tile into the row maxima. row_scale[r] = exp2(old_max - new_max) (log2
    // units) is the factor by which the previous O rows and sums must be multiplied: exactly 1
    // where the max did not move, 0 where the row had no visible key before. Returns whether
    // any of this lane's rows got a new max.
    template <int NT>
    __device__ __forceinline__ bool max_get_scale(const float (&s)[MT][NT][4], float (&row_scale)[kRows]) {
        bool changed = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = 2 * mt + half;
                float tile_max = s[mt][0][2 * half];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
                    tile_max = fmaxf(tile_max, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
                }
                tile_max = quad_allreduce_max(tile_max);
                const float old_max = row_max[r];
                const float new_max = fmaxf(old_max, tile_max);
                row_max[r] = new_max;
                // old == new also covers a row still without keys (-inf == -inf; its O and sum
                // are 0). old = -inf < new gives exp2(-inf) = 0.
                const bool moved = new_max != old_max;
                row_scale[r] = moved ? ptx::ex2_approx((old_max - new_max) * scale_log2) : 1.f;
                changed |= moved;
            }
        }
        return changed;
    }

    // s -> p = exp2(s * scale_log2 - max_log2) in place (masked -inf scores give 0), and
    // row_sum = row_sum * row_scale + sum(p).
    template <int NT>
    __device__ __forceinline__ void exp_accumulate(float (&s)[MT][NT][4], const float (&row_scale)[kRows]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = 2 * mt + half;
                const float base = max_log2(r);
                float sum[2] = {0.f, 0.f};  // two independent add chains (columns 2t and 2t + 1)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        float& x = s[mt][nt][2 * half + e];
                        x = ptx::ex2_approx(fmaf(x, scale_log2, -base));
                        sum[e] += x;
                    }
                }
                row_sum[r] = fmaf(row_sum[r], row_scale[r], sum[0] + sum[1]);
            }
        }
    }

    // Lazy variant of max_get_scale (FlashAttention-4's conditional rescaling): a row's
    // subtraction base moves only when the tile's max exceeds it by more than
    // kLazyRescaleLog2 (log2 units), so after the first tiles of a row O is almost never
    // rescaled. Invariant: every score folded so far is <= base + kLazyRescaleLog2 (log2
    // units), so probabilities stay <= 2^kLazyRescaleLog2 (exact in fp32, and bf16 / f16 P keeps
    // its relative precision). A row that moves gets base = the tile's max (>= every score so
    // far). row_max then holds the base, not necessarily the true max; `finalize` is exact for
    // any base. A row without visible keys (-inf) moves at its first finite tile max; a -inf
    // tile max never moves a row (-inf - -inf is NaN, and NaN > x is false).
    static constexpr float kLazyRescaleLog2 = 8.f;
    template <int NT>
    __device__ __forceinline__ bool max_get_scale_lazy(const float (&s)[MT][NT][4], float (&row_scale)[kRows]) {
        bool changed = false;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int r = 2 * mt + half;
                // Two independent chains (even / odd n-tiles) for ILP; fmaxf is exact in any order.
                float m0 = fmaxf(s[mt][0][2 * half], s[mt][0][2 * half + 1]);
                float m1 = NT > 1 ? fmaxf(s[mt][NT - 1][2 * half], s[mt][NT - 1][2 * half + 1]) : m0;
#pragma unroll
                for (int nt = 1; nt < NT - 1; ++nt) {
                    float& m = nt % 2 ? m1 : m0;
                    m = fmaxf(m, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
                }
                const float tile_max = quad_allreduce_max(fmaxf(m0, m1));
                const float old_max = row_max[r];
                const bool moved = (tile_max - old_max) * scale_log2 > kLazyRescaleLog2;
                if (moved) row_max[r] = tile_max;
                row_scale[r] = moved ? ptx::ex2_approx((old_max - tile_max) * scale_log2) : 1.f;
                changed |= moved;
            }
        }
        return changed;
    }

    // O rows *= row_scale (O is an m16n8 accumulator array over the head dim).
    template <int DT>
    __device__ __forceinline__ static void rescale_o(float (&o)[MT][DT][4], const float (&row_scale)[kRows]) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                o[mt][dt][0] *= row_scale[2 * mt];
                o[mt][dt][1] *= row_scale[2 * mt];
                o[mt][dt][2] *= row_scale[2 * mt + 1];
                o[mt][dt][3] *= row_scale[2 * mt + 1];
            }
        }
    }

    // The whole per-tile update: new maxima, rescale O and sums, scores -> probabilities.
    // The O rescale (one FMUL per accumulator) is skipped when no row of the warp got a new max
    // (all scales exactly 1), which is most tiles once a long row has seen its large scores.
    // Warp-uniform branch: every lane of the warp must call this together.
    template <int NT, int DT>
    __device__ __forceinline__ void online_softmax(float (&s)[MT][NT][4], float (&o)[MT][DT][4]) {
        float row_scale[kRows];
        const bool changed = max_get_scale(s, row_scale);
        if (__any_sync(0xffffffffu, changed)) rescale_o(o, row_scale);
        exp_accumulate(s, row_scale);
    }

    // online_softmax with max_get_scale_lazy: the O rescale runs only on the (rare) tiles where
    // some row of the warp moved its base.
    template <int NT, int DT>
    __device__ __forceinline__ void online_softmax_lazy(float (&s)[MT][NT][4], float (&o)[MT][DT][4]) {
        float row_scale[kRows];
        const bool changed = max_get_scale_lazy(s, row_scale);
        if (__any_sync(0xffffffffu, changed)) rescale_o(o, row_scale);
        exp_accumulate(s, row_scale);
    }

    // Reduces the sums across the quad and folds in the learnable sink logit (natural units,
    // -inf = none): Z = sum_j exp(s_j) + exp(sink). Returns per row O's scale 1/Z (0 for an empty
    // row) and LSE = ln Z (-inf for an empty row without a sink, the sink logit with one).
    __device__ __forceinline__ SoftmaxResult<kRows> finalize(float sink_logit) const {
        SoftmaxResult<kRows> out;
        const float sink_log2 = sink_logit * kLog2e;
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
            float sum = quad_allreduce_sum(row_sum[r]);
            const float m_log2 = row_max[r] == -INFINITY ? -INFINITY : row_max[r] * scale_log2;
            float o_factor = 1.f;  // exp2(m_log2 - combined max): rescales O and sum to the sink's base
            float base = m_log2;
            if (sink_log2 != -INFINITY) {
                base = fmaxf(m_log2, sink_log2);
                o_factor = ptx::ex2_approx(m_log2 - base);  // 0 when the row saw no key
                sum = fmaf(sum, o_factor, ptx::ex2_approx(sink_log2 - base));
            }
            const bool empty = !(sum > 0.f);
            // rcp.approx (1 ulp) rather than IEEE division, whose slow-path call would pin registers.
            out.o_scale[r] = empty ? 0.f : o_factor * ptx::rcp_approx(sum);
            out.lse[r] = empty ? -INFINITY : (base + ptx::lg2_approx(sum)) * kLn2;
        }
        return out;
    }
};

}  // namespace fa
