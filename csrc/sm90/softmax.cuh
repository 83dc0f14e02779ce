// Online softmax on the wgmma accumulator layout (see mask.cuh for the layout): each thread owns
// two rows of the warpgroup's 64 x BN score tile, shared with the other 3 lanes of its quad.
//
// State per row: the exponent base m (score units, reduced over the quad: the running max, raised
// only when the max outgrows it by a slack, see update) and a per-thread partial row sum l in
// units of 2^(m * exp2_scale) (reduced over the quad only at the end, as in FA2/FA3).
// A row that has seen only -inf keeps m = -inf; its exponent base is taken as 0 so that no
// (-inf) - (-inf) NaN appears, and it finishes with l = 0 (O = 0, LSE = -inf or the sink logit).
#pragma once

#include <math.h>

#include "sm90/mask.cuh"
#include "sm90/ptx.cuh"

namespace fa::sm90 {

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// kSumLag > 0 ties the row-sum FADDs into the MUFU stream (see update); 0 leaves ptxas's order.
template <int N, int kSumLag = 0>  // N = BN: the score tile has N / 2 floats per thread
struct OnlineSoftmax {
    static_assert(N % 16 == 0, "the score tile is a whole number of k16 steps of P.V");
    float row_max[2];
    float row_sum[2];

    __device__ __forceinline__ void reset() {
        row_max[0] = row_max[1] = -INFINITY;
        row_sum[0] = row_sum[1] = 0.0f;
    }

    // The exponent base m of a row is raised only when the row max grows past it by more than
    // kRescaleSlack (log2 units); otherwise it stays, p stays below 2^kRescaleSlack (exact in
    // fp32, and bf16 / fp16 keep their relative precision), and neither O nor the row sum needs
    // rescaling. The decision is per warp, so the O rescale (D / 2 multiplies per thread) is
    // skipped with a uniform branch. The running max settles after a few blocks, so most blocks
    // skip it. (The conditional rescale of FlashAttention-4.)
    static constexpr float kRescaleSlack = 8.0f;

    // Turns the scores s into p = 2^(s * f - m * f) with m the exponent base of the row (see
    // above). Returns whether this warp must rescale O; if so, o_scale holds the factors
    // 2^((m_old - m) f) (0 for a row whose old base was -inf), and is left unset otherwise.
    __device__ __forceinline__ bool update(float (&s)[N / 2], float f, float (&o_scale)[2]) {
        // Both rows in one pass, two partial maxima each: four independent FMNMX chains instead
        // of one row's dependent chain after the other. (FMNMX issues every other cycle on sm_90,
        // so this changes the SASS order more than its cycle count.)
        float part[2][2] = {{row_max[0], row_max[0]}, {row_max[1], row_max[1]}};
#pragma unroll
        for (int c = 0; c < N / 8; ++c) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                part[h][c % 2] = fmaxf(part[h][c % 2], fmaxf(s[4 * c + 2 * h], s[4 * c + 2 * h + 1]));
            }
        }
        float m_new[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) m_new[h] = quad_max(fmaxf(part[h][0], part[h][1]));
        // -inf - -inf is NaN, which compares false: a row that has seen only -inf stays there.
        bool const grow = (m_new[0] - row_max[0]) * f > kRescaleSlack || (m_new[1] - row_max[1]) * f > kRescaleSlack;
        bool const rescale = __any_sync(0xffffffffu, grow);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (rescale) {
                float const m_base_new = m_new[h] == -INFINITY ? 0.0f : m_new[h];
                o_scale[h] = ex2(row_max[h] * f - m_base_new * f);  // 0 when the old max was -inf
                row_max[h] = m_new[h];
            }
            float const m_base = row_max[h] == -INFINITY ? 0.0f : row_max[h];
            float const m_scaled = m_base * f;
            // Two partial sums: halves the dependent FADD chain. sum_after[c] is a partial sum
            // after column group c, for the tie below.
            float sum[2] = {0.0f, 0.0f};
            float sum_after[N / 8][2];
#pragma unroll
            for (int c = 0; c < N / 8; ++c) {
                // With kSumLag > 0 the exponent bias of group c carries 0 * (a partial sum kSumLag
                // groups back). ptxas cannot fold that FFMA (0 * inf is NaN), so the row sum's
                // FADDs must issue before this group's MUFUs, in the gaps the MUFU leaves (one warp
                // instruction per 8 cycles); otherwise ptxas sinks every FADD behind the next-K
                // wait, after the last MUFU. The partial sums are finite and >= 0 (p <= 2^8), so
                // the bias is unchanged. A lag of 2 groups (2 x 2 rows x 2 MUFUs = 64 issue cycles)
                // keeps the MUFUs from waiting on the FADDs' latency.
                float bias = -m_scaled;
                if (kSumLag > 0 && c >= kSumLag) bias = fmaf(sum_after[c - kSumLag][c % 2], 0.0f, bias);
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    float& x = s[4 * c + 2 * h + i];
                    x = ex2(fmaf(x, f, bias));
                    sum[i] += x;
                    sum_after[c][i] = sum[i];
                }
            }
            row_sum[h] = rescale ? fmaf(row_sum[h], o_scale[h], sum[0] + sum[1]) : row_sum[h] + (sum[0] + sum[1]);
        }
        return rescale;
    }

    // Final normalisation: o_scale = 1 / Z (0 for a row with nothing in its denominator) and the
    // natural-log LSE, where Z = sum of exp over visible keys + exp(sink_logit) when given.
    __device__ __forceinline__ void finalize(float f, bool has_sink, float sink_logit, float (&o_scale)[2],
                                             float (&lse)[2]) const {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float const sum = quad_sum(row_sum[h]);
            float const m_log2 = row_max[h] == -INFINITY ? -INFINITY : row_max[h] * f;  // log2 units
            if (has_sink) {
                // Z = sum * 2^m_log2 + 2^sink_log2, computed around the larger exponent.
                float const sink_log2 = sink_logit * kLog2e;
                float const top = fmaxf(m_log2, sink_log2);
                float const w_rows = ex2(m_log2 - top);
                float const z = fmaf(sum, w_rows, ex2(sink_log2 - top));
                bool const empty = top == -INFINITY;  // no visible key and a -inf sink logit
                o_scale[h] = empty ? 0.0f : w_rows * rcp_approx(z);
                lse[h] = empty ? -INFINITY : (top + lg2(z)) * kLn2;
            } else {
                bool const empty = sum == 0.0f || sum != sum;
                o_scale[h] = empty ? 0.0f : rcp_approx(sum);
                lse[h] = empty ? -INFINITY : (m_log2 + lg2(sum)) * kLn2;
            }
        }
    }
};

// The softmax of a (head dim D, KV block BN) tile. The row-sum tie (kSumLag = 2) runs on the
// 128 x 176 tiles, d = 80 and d = 96 (measured on H200, 2026-12-03, bf16, `bench --family sm90
// --head-dims 80,96,192,256`, two calls of three alternating rounds, best of each, tie / none):
// d 80 +0.3% to +5.7% on all 12 cells measured (non-causal 1k / 2k / 4k / 8k / 16k 1.057 /
// 1.035 / 1.030 / 1.011 / 1.014), d 96 on that tile (causal, and non-causal below 2k keys)
// +2.2% to +4.8% on all 7. Elsewhere it lost: d 192 (128 x 112) -0.4% to -2.9% on 5 of 6
// cells, d 256 (128 x 80) -2% to +1% (no direction), d 128 on its 128 x 192 tile -1% to -4%
// on every cell, d 64 (128-wide block) -3.5% to -5%. It also ran on d 128's former 128 x 176
// tile (+2% to +4.5% without a mask there), so the gain belongs to that block width.
//
// Tried, not kept: 2^x from a cubic on the FMA pipe (8 instructions: clamp, floor through a
// rounding add, Horner, exponent add) for a share of the elements instead of MUFU.EX2, the
// software exponential of FlashAttention-4. Same-process A/B on H200 (2026-12-03, both orders,
// docs/perf-log.md run 11): every 4th column group -6.5% at d 64 / 128, every 8th -3.0%, every
// 8th at d 80 / 96 / 192 / 256 -1.7%. So the MUFU is not what limits these kernels; presumably
// instruction issue is (the coordinate feed, which only removed instructions, gained 3%).
//
// Tried, not kept: the row sums from the tensor cores (one m64n8k16 RS wgmma per k16 step of P.V,
// B = a block of ones in smem) instead of the FADDs, at d 64 (H200, 2026-12-04, perf log run
// 16): 0.993, and bf16 LSE errors of 1.1e-3 to 2.0e-3 (the denominator then sums bf16-rounded P).
template <int D, int BN>
using TileSoftmax = OnlineSoftmax<BN, BN == 176 ? 2 : 0>;

}  // namespace fa::sm90
