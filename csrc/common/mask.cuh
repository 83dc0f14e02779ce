// Mask and score policy (docs/semantics.md, "Score" and "Visibility").
//
// Small structs built from the params and the sequence sizes (Mask and FwdKvPlan are plain ints,
// so a kernel may park them in shared memory between uses):
//
// - `Mask` says which keys a query row sees (causal / window bounds with either alignment,
//   StreamingLLM sink tokens, the key-length edge), applies that to a score fragment (`apply`),
//   and plans the forward's walk over KV blocks (`fwd_kv_plan`): which blocks a query block must
//   visit and which of them need the element mask, so fully masked blocks are never loaded and
//   fully visible ones pay nothing.
// - `ScoreMod` turns raw q.k into the score of the semantics (scale, softcap, ALiBi). When neither
//   softcap nor ALiBi is on it does nothing and the softmax folds the scale into its exp2 FFMA.
//
// Indices are sequence-local: query row i in [0, sq), key j in [0, sk). Fragments are m16n8 fp32
// accumulators `s[MT][NT][4]` (see common/softmax.cuh for the lane layout): for a fragment
// whose element s[0][0][0] sits at (row0, col0), element s[mt][nt][2*half + e] sits at
// row0 + 16*mt + 8*half, col0 + 8*nt + e.
#pragma once

#include <limits.h>
#include <math.h>
#include <stdint.h>

#include "common/params.h"
#include "common/ptx.cuh"
#include "common/softmax.cuh"

namespace fa {

// Floor / ceiling of a / b for b > 0 and any sign of a.
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
__device__ __forceinline__ int ceil_div(int a, int b) { return -floor_div(-a, b); }
__device__ __forceinline__ int clamp_int(int x, int lo, int hi) { return min(max(x, lo), hi); }

// The order in which a forward query block walks its KV blocks, and which of them are masked.
//
// Visited blocks: the window range [n_begin, n_end) plus, when sink tokens sit left of it, the
// sink range [0, n_sink_end) (disjoint: n_sink_end <= n_begin). Inside the window range,
// [u_begin, u_end) needs no element mask. The walk visits every masked block first, then the
// unmasked ones, so a kernel runs two loops: t in [0, num_masked()) with the mask, t in
// [num_masked(), num_blocks()) without. The order (right-edge blocks descending, left-edge blocks
// ascending, sink blocks ascending, unmasked blocks descending) is irrelevant to the online
// softmax; the first block visited is the right edge (the ragged key tail, the diagonal).
struct FwdKvPlan {
    int n_begin, n_end;  // window range of KV blocks
    int u_begin, u_end;  // unmasked sub-range, n_begin <= u_begin <= u_end <= n_end
    int n_sink_end;      // sink range [0, n_sink_end), left of n_begin

    __device__ __forceinline__ int num_right_masked() const { return n_end - u_end; }
    __device__ __forceinline__ int num_left_masked() const { return u_begin - n_begin; }
    __device__ __forceinline__ int num_masked() const {
        return num_right_masked() + num_left_masked() + n_sink_end;
    }
    __device__ __forceinline__ int num_blocks() const { return num_masked() + (u_end - u_begin); }

    // Part s of n of this walk (split-KV): the s-th of n equal shares (the last ones shorter or
    // empty) of the window range [n_begin, n_end), with the masked / unmasked split kept; part 0
    // also keeps the sink range, which lies left of the window range. Every KV block of the
    // walk is in exactly one part.
    __device__ __forceinline__ FwdKvPlan part(int s, int n) const {
        FwdKvPlan r;
        const int per = (n_end - n_begin + n - 1) / n;
        r.n_begin = min(n_begin + s * per, n_end);
        r.n_end = min(r.n_begin + per, n_end);
        r.u_begin = clamp_int(u_begin, r.n_begin, r.n_end);
        r.u_end = clamp_int(u_end, r.u_begin, r.n_end);
        r.n_sink_end = s == 0 ? n_sink_end : 0;
        return r;
    }

    // KV block of walk step t in the unmasked phase, num_masked() <= t < num_blocks().
    __device__ __forceinline__ int unmasked_block_at(int t) const { return u_end - 1 - (t - num_masked()); }

    // KV block index of walk step t, 0 <= t < num_blocks().
    __device__ __forceinline__ int block_at(int t) const {
        const int right = num_right_masked();
        if (t < right) return n_end - 1 - t;
        t -= right;
        const int left = num_left_masked();
        if (t < left) return n_begin + t;
        t -= left;
        if (t < n_sink_end) return t;
        t -= n_sink_end;
        return u_end - 1 - t;
    }
};

// Plain data (five ints) so that a kernel may keep it in shared memory between uses.
struct Mask {
    int seqlen_k;      // sk: keys j >= sk never exist
    int diag;          // query i sits at key position i + diag (sk - sq bottom-right, 0 top-left)
    int window_left;   // < 0: no left bound; else keys j >= i + diag - window_left are visible
    int window_right;  // < 0: no right bound; else keys j <= i + diag + window_right are visible
    int sink_tokens;   // keys j < sink_tokens ignore the left bound (0 when there is none)

    __device__ __forceinline__ static Mask make(const FaParams& p, int seqlen_q, int seqlen_k) {
        Mask m;
        m.seqlen_k = seqlen_k;
        m.diag = p.causal_align == FA_ALIGN_TOP_LEFT ? 0 : seqlen_k - seqlen_q;
        // A bound wider than sq + sk never binds; clamping keeps i + diag +- window in int range.
        const int widest = seqlen_q + seqlen_k;
        m.window_left = p.window_left < 0 ? -1 : min(p.window_left, widest);
        m.window_right = p.window_right < 0 ? -1 : min(p.window_right, widest);
        m.sink_tokens = m.window_left < 0 ? 0 : max(p.sink_tokens, 0);
        return m;
    }

    __device__ __forceinline__ bool has_left() const { return window_left >= 0; }
    __device__ __forceinline__ bool has_right() const { return window_right >= 0; }

    // Visible keys of row i: key_begin(i) <= j < key_end(i), or j < sink_tokens for the lower bound.
    __device__ __forceinline__ int key_end(int i) const {
        return has_right() ? min(seqlen_k, i + diag + window_right + 1) : seqlen_k;
    }
    __device__ __forceinline__ int key_begin(int i) const { return has_left() ? i + diag - window_left : INT_MIN; }

    // Whether no row of [row_first, row_last] sees any key of [col_begin, col_end) (a sufficient
    // test: past the right bound of the last row, or before the left bound of the first row
    // with no sink key in the range). Rows past sq only make it answer false.
    __device__ __forceinline__ bool hides(int row_first, int row_last, int col_begin, int col_end) const {
        if (key_end(row_last) <= col_begin) return true;
        return has_left() && key_begin(row_first) >= col_end && col_begin >= sink_tokens;
    }

    // Sets every invisible element of a score fragment to -inf (run after ScoreMod::apply, so
    // softcap cannot turn -inf back into a finite score).
    // Without a left bound (causal, right window, sequence end) a row's visible keys are
    // [0, key_end): one compare of the element's constant column offset against key_end - col0
    // and one select, instead of the three compares of the general rule.
    template <int MT, int NT>
    __device__ __forceinline__ void apply(float (&s)[MT][NT][4], int row0, int col0) const {
        if (!has_left()) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int lim = key_end(row0 + 16 * mt + 8 * half) - col0;  // visible: 8 nt + e < lim
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            if (!(8 * nt + e < lim)) s[mt][nt][2 * half + e] = -INFINITY;
                        }
                    }
                }
            }
            return;
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int row = row0 + 16 * mt + 8 * half;
                const int end = key_end(row);
                const int begin = key_begin(row);
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int col = col0 + 8 * nt + e;
                        const bool visible = col < end && (col >= begin || col < sink_tokens);
                        if (!visible) s[mt][nt][2 * half + e] = -INFINITY;
                    }
                }
            }
        }
    }

    // The KV walk of the query rows [row_first, row_last] (row_last < sq) with key blocks of BN.
    template <int BN>
    __device__ __forceinline__ FwdKvPlan fwd_kv_plan(int row_first, int row_last) const {
        FwdKvPlan plan;
        // Window range: from the first block the first row sees to the last block the last row sees.
        plan.n_end = ceil_div(seqlen_k, BN);
        if (has_right()) plan.n_end = min(plan.n_end, floor_div(row_last + diag + window_right, BN) + 1);
        plan.n_end = max(plan.n_end, 0);
        plan.n_begin = 0;
        if (has_left()) plan.n_begin = max(0, floor_div(row_first + diag - window_left, BN));
        plan.n_begin = min(plan.n_begin, plan.n_end);
        // Sink blocks left of the window (the sink keys still obey the right bound: n_end caps
        // n_begin, so they lie inside [0, n_end)).
        plan.n_sink_end = min(ceil_div(min(sink_tokens, seqlen_k), BN), plan.n_begin);
        // Unmasked blocks: every key of the block is visible to every row of the query block.
        // Left: block start >= the last row's lower bound (sink exemption ignored: conservative).
        int clean_begin = 0;
        if (has_left()) clean_begin = ceil_div(row_last + diag - window_left, BN);
        // Right: block end <= sk, and block end - 1 <= the first row's upper bound.
        int clean_end = seqlen_k / BN;
        if (has_right()) clean_end = min(clean_end, floor_div(row_first + diag + window_right + 1, BN));
        plan.u_begin = clamp_int(clean_begin, plan.n_begin, plan.n_end);
        plan.u_end = clamp_int(clean_end, plan.u_begin, plan.n_end);
        return plan;
    }
};

// 1 - 2 / (1 + e^(2x)) with MUFU.EX2 and MUFU.RCP: absolute error ~1e-7 everywhere (tanh.approx
// has 2^-11 relative error, which a softcap of 30-50 would turn into visible logit error).
__device__ __forceinline__ float tanh_accurate(float x) {
    return 1.f - 2.f * ptx::rcp_approx(1.f + ptx::ex2_approx(x * (2.f * kLog2e)));
}

// Score modifiers: s = softcap * tanh(scale * q.k / softcap), then s -= slope * |i + diag - j|.
// Scale and softcap are read from the params (constant bank) at each use.
struct ScoreMod {
    const FaParams& p;
    float alibi_slope;  // of this (batch, head); 0 without ALiBi
    int diag;           // the mask's diagonal offset (ALiBi uses the same alignment)

    __device__ __forceinline__ ScoreMod(const FaParams& params, float slope, int diag_offset)
        : p(params), alibi_slope(slope), diag(diag_offset) {}

    // The ALiBi slope of (batch, head): [h] or [b, h] through alibi_batch_stride; 0 without ALiBi.
    __device__ __forceinline__ static float load_alibi_slope(const FaParams& p, int batch, int head) {
        return p.alibi_slopes != nullptr ? p.alibi_slopes[batch * p.alibi_batch_stride + head] : 0.f;
    }

    __device__ __forceinline__ bool has_softcap() const { return p.softcap > 0.f; }
    __device__ __forceinline__ bool has_alibi() const { return p.alibi_slopes != nullptr; }

    // Whether `apply` has work; a uniform run-time branch around it.
    __device__ __forceinline__ bool active() const { return has_softcap() || has_alibi(); }

    // The factor from the scores the softmax sees to log2 units: after `apply` they are natural
    // units (log2(e)); without modifiers they stay raw q.k and the scale folds in here.
    __device__ __forceinline__ static float softmax_scale_log2(const FaParams& p) {
        return (p.softcap > 0.f || p.alibi_slopes != nullptr) ? kLog2e : p.scale_log2;
    }

    // Raw q.k fragment -> natural-unit scores. Call only when active().
    template <int MT, int NT>
    __device__ __forceinline__ void apply(float (&s)[MT][NT][4], int row0, int col0) const {
        if (has_softcap()) {
            // rcp.approx (1 ulp), not '/': IEEE division brings a slow-path call into the loop.
            const float prescale = p.scale * ptx::rcp_approx(p.softcap);
            const float softcap = p.softcap;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][nt][i] = softcap * tanh_accurate(s[mt][nt][i] * prescale);
        } else {
            const float scale = p.scale;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int i = 0; i < 4; ++i) s[mt][nt][i] *= scale;
        }
        if (has_alibi()) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const int row_pos = row0 + 16 * mt + 8 * half + diag;
#pragma unroll
                    for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const int col = col0 + 8 * nt + e;
                            s[mt][nt][2 * half + e] -= alibi_slope * static_cast<float>(abs(row_pos - col));
                        }
                    }
                }
            }
        }
    }
};

}  // namespace fa
