// sm80-family (FlashAttention-2 class) forward kernel: mma.sync m16n8k16, ldmatrix, cp.async.
//
// Design
// - One thread block = BM query rows of one (sequence, head); W warps split those rows (BM / W
//   each, whole m16 tiles), so softmax statistics never leave a warp (split-Q, no smem reduction).
//   d <= 128: 4 warps x 32 rows (each K/V fragment feeds two m16 tiles); d = 192 / 256: 16 rows
//   per warp (32 rows of O would not fit in registers). See src/cells.rs for the tile table.
// - S = Q K^T: Q and K fragments by ldmatrix from row-padded smem (pitch D + 8 elements, an odd
//   number of 16-byte chunks, conflict-free without a swizzle); P goes from the fp32 accumulator
//   layout to the A-operand layout in registers (two n8 tiles = one k16 step); V fragments by
//   ldmatrix.trans. Head dims are walked in k16 / n8 steps of their own (80 = 5 k-steps, 10 n8
//   tiles), never padded in compute.
// - Online softmax in exp2 with the scale folded into one FFMA; lazy rescaling
//   (OnlineSoftmax::online_softmax_lazy): a row's subtraction base moves only when a tile's max
//   exceeds it by more than 2^8, and O is rescaled only when some row of the warp moved (warp
//   vote); the sums stay per lane until the end; LSE = (base * scale_log2 + log2 sum) * ln 2;
//   learnable sink logits join the denominator in `finalize`.
// - K/V ring of S stages, one cp.async group and one barrier per KV step: block t+S-1 loads while
//   block t computes (common/mask.cuh plans the walk; fwd_mainloop.cuh runs it); at d <= 128 the
//   refill is issued after the step's first Q K^T MMAs, so they need not wait for its address
//   arithmetic (FwdMainloop::kRefill). S = 1 (one K and
//   one V buffer, two barriers per step, FlashAttention-2's scheme) where one stage is what lets
//   two blocks share an SM (d = 256, 64 x 64).
// - The walk visits the masked blocks first (right edge: diagonal / ragged key tail; left edge of
//   a window; sink-token blocks), then the unmasked ones, as two loops over one inlined step with
//   a compile-time mask flag: the steady state has no mask code. Softcap and ALiBi are a uniform
//   run-time branch (`ScoreMod::active`). Fully masked blocks are never loaded; a warp none of
//   whose rows sees a masked block (the upper rows on the causal diagonal) skips its math.
// - Registers are the binding constraint (O + S up to 192 of 255 at d = 128): the block-uniform
//   walk state (K/V pointers, plan, mask bounds) lives in the Q rows' smem padding and is re-read
//   after each barrier; lane-derived addresses are recomputed from %tid; where O + S take 161-192
//   registers the per-lane row sums are parked in the K rows' smem padding between steps (d = 128,
//   128 x 64: the whole 64-key block in one softmax chunk, Q read once per step); beyond that a
//   step runs its block as two softmax chunks. Where O + S + Q fit 160 registers, Q's fragments
//   stay in registers for the whole walk (d = 64); so they do with 16-row warps at d = 192,
//   where the step walks its block in 32-key chunks (O + S + Q <= 208 registers). Elsewhere the
//   first k16 steps of Q that fit stay in registers and the rest is re-read from smem at each
//   Q K^T (d = 96: 2 of 6, d = 128: 1 of 8, d = 256: 13 of 16, with the whole 64-key block as
//   one chunk, O + S + Q = 212 registers). Every dense instantiation is spill-free (registers:
//   src/cells.rs, sm80_fwd_tiles); of the paged ones, d = 128 128 x 64 spills 52 bytes on sm_80
//   (sm80_fwd_paged_tiles).
// - Causal / right-bounded masks remap the grid so that the heaviest query blocks of all (batch,
//   head) pairs start first and the light ones fill the tail (FwdTile::make).
// - Epilogue: O scaled by 1/Z, converted to T, staged in the warp's own Q rows, stored 16 bytes per
//   lane; LSE by one lane per quad. A row with no visible key writes O = 0 and LSE = -inf (or the
//   sink logit).
// - Split-KV (p.num_splits > 1, src/fwd.rs): grid z = batch * num_splits; part s walks the s-th
//   share of its query block's KV blocks (FwdKvPlan::part) and writes its O (fp32, normalised by
//   its own sum, no sink logit) and LSE to p.o_partial / p.lse_partial; the merge cell's split
//   kernel (csrc/merge/merge.cuh) combines the parts, sink logit included, into O and LSE.
//
// Launch contract (src/fwd.rs): grid (ceil(p.seqlen_q / BM), p.num_heads, p.batch * p.num_splits), block W * 32
// threads, SMEM bytes of dynamic shared memory (= src/cells.rs sm80_fwd_smem_bytes), FaParams by
// value. Paged K/V (FA_FLAG_PAGED): the FA_SM80_FWD_PAGED_KERNEL instantiation of the same
// kernel, whose K/V tile copy reads each key row through the block table (FwdTile,
// GmemToSmemTile::issue_paged); queries and output stay dense.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common/mask.cuh"
#include "common/params.h"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "sm80/fwd_epilogue.cuh"
#include "sm80/fwd_mainloop.cuh"
#include "sm80/fwd_tile.cuh"

namespace fa {
namespace sm80 {

// T: __half or __nv_bfloat16. D: head dim. BM x BN: query rows x keys per step. W: warps.
// S: K/V pipeline stages. kPaged: K/V from a paged cache (FA_FLAG_PAGED, see FwdTile).
template <class T, int D, int BM, int BN, int W, int S, bool kPaged = false>
struct FwdKernel {
    using Mainloop = FwdMainloop<T, D, BM, BN, W, S, kPaged>;
    using Smem = typename Mainloop::Smem;
    static constexpr int kThreads = W * 32;
    static constexpr int kWarpRows = Mainloop::kWarpRows;
    static constexpr int kMT = Mainloop::kMT;
    static constexpr int kNT = Mainloop::kNT;
    static constexpr int kDT = Mainloop::kDT;
    using Softmax = OnlineSoftmax<kMT>;
    using Epilogue = FwdEpilogue<T, D, kMT, Smem::kPitchBytes>;

    static constexpr int kSmemBytes = Smem::kBytes;
    // Thread blocks per SM the register allocation must allow: 2 x 4 warps (<= 255 registers per
    // thread, the FlashAttention-2 shape), 1 x 8 warps.
    static constexpr int kMinBlocksPerSm = W <= 4 ? 2 : 1;

    static_assert(ptx::kIsMmaElem<T>, "the sm80 forward takes __half or __nv_bfloat16");
    static_assert(D % 16 == 0, "the head dim is walked in k16 steps (Q K^T) and n8 pairs (P V)");
    static_assert(BM % (16 * W) == 0, "each warp owns whole m16 tiles of the query block");
    static_assert(BN % 16 == 0, "a key block is whole k16 steps of P V (and n8 pairs of Q K^T)");
    static_assert(W == 4 || W == 8, "4 or 8 warps: the register budget below assumes 128-256 threads");
    static_assert(kSmemBytes <= 227 * 1024, "dynamic smem must fit the largest opt-in limit (sm_90: 227 KB)");
    static constexpr int kQStepRegs = Mainloop::kQInRegs ? kMT * Mainloop::kQSteps * 4 : 0;
    static_assert(kMT * kDT * 4 + kMT * (Mainloop::kChunkN / 8) * 4 + kQStepRegs <=
                      (Mainloop::kWideQInRegs ? 212 : Mainloop::kParkRowSums ? 200 : 176),
                  "O plus one chunk of S plus Q's register-held k-steps must leave ~79 of the 255 registers to "
                  "fragments, softmax state and addresses, ~55 with the row sums parked in smem (see "
                  "FwdMainloop::kChunkN), or ~43 with 16-row warps and Q in registers (FwdMainloop::kWideQInRegs)");

    __device__ __forceinline__ static void run(const FaParams& p, unsigned char* smem) {
        const Mainloop mainloop(p, smem);
        typename Mainloop::Next next;
        {
            // Tile, mask and walk plan: published to smem (FwdWalkState) and dropped from registers,
            // which O and S need (up to ~190 of 255 at d = 128).
            const FwdTile<T> tile = FwdTile<T>::template make<kPaged>(p);
            const int m_begin = tile.m_block * BM;
            // Uniform per block: varlen sequences shorter than the longest own fewer query blocks.
            if (m_begin >= tile.seqlen_q) return;
            const int rows_valid = min(BM, tile.seqlen_q - m_begin);
            const auto state = Mainloop::State::template make<BN>(p, tile, m_begin, rows_valid);
            mainloop.prologue(state, tile.q + m_begin * p.q_row_stride, rows_valid);
            next = Mainloop::first_step(state.plan);
        }

        float o[kMT][kDT][4];  // [16*kMT rows][D] fp32, unnormalised
#pragma unroll
        for (int mt = 0; mt < kMT; ++mt)
#pragma unroll
            for (int dt = 0; dt < kDT; ++dt)
#pragma unroll
                for (int i = 0; i < 4; ++i) o[mt][dt][i] = 0.f;
        typename Mainloop::QFrags q;  // (kQInRegs) the warp's Q fragments, else unused
        mainloop.load_q(q);
        Softmax softmax(ScoreMod::softmax_scale_log2(p));
        mainloop.park_row_sums(softmax);  // (kParkRowSums) the sums live in smem during the walk

        // The walk: masked blocks first, then unmasked ones (FwdKvPlan::block_at), one inlined
        // step body per phase so that the steady state carries no mask code.
        int t = 0;
        while (next == Mainloop::Next::kMaskedStep) next = mainloop.template step</*kMasked=*/true>(t++, q, o, softmax);
        while (next == Mainloop::Next::kUnmaskedStep) {
            next = mainloop.template step</*kMasked=*/false>(t++, q, o, softmax);
        }
        // Only empty groups can remain; leave nothing in flight.
        ptx::cp_async_wait_all();

        // Epilogue. The tile's addresses are derived again rather than held across the walk.
        const FwdTile<T> tile = FwdTile<T>::template make<kPaged>(p);
        const int m_begin = tile.m_block * BM;
        const int warp = ptx::thread_idx_x() / 32, lane = ptx::thread_idx_x() % 32;
        const int warp_row0 = warp * kWarpRows;  // the warp's first row in the block
        const int warp_rows_valid = min(BM, tile.seqlen_q - m_begin) - warp_row0;
        // Split-KV: the sink logit joins the denominator only where the parts are combined.
        const bool split = p.num_splits > 1;
        const float sink_logit = !split && p.sink_logits != nullptr ? p.sink_logits[tile.head] : -INFINITY;
        mainloop.unpark_row_sums(softmax);
        const SoftmaxResult<2 * kMT> result = softmax.finalize(sink_logit);
        if (split) {
            // Part tile.split of rows (b, h, i): O over this part's keys (normalised by its own
            // sum) and that sum's LSE, fp32, at row (split * b_count + b) * h_count + h) * sq + i.
            const int64_t row0 =
                ((static_cast<int64_t>(tile.split) * p.batch + tile.batch) * p.num_heads + tile.head) * p.seqlen_q +
                m_begin + warp_row0;
            Epilogue::store_o_f32(o, result.o_scale, p.o_partial + row0 * D, warp_rows_valid, lane);
            Epilogue::store_lse(result.lse, p.lse_partial + row0, warp_rows_valid, lane);
            return;
        }
        Epilogue::store_o(o, result.o_scale, mainloop.smem_base() + Smem::kQOffset + warp_row0 * Smem::kPitchBytes,
                          tile.o + (m_begin + warp_row0) * p.o_row_stride, p.o_row_stride, warp_rows_valid, lane);
        if (tile.lse != nullptr) Epilogue::store_lse(result.lse, tile.lse + m_begin + warp_row0, warp_rows_valid, lane);
    }
};

}  // namespace sm80
}  // namespace fa

// One forward kernel: element type T, head dim D, tile BM x BN, W warps, S stages, SMEM bytes of
// dynamic shared memory as computed by src/cells.rs (checked here against the kernel's layout).
#define FA_SM80_FWD_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                                       \
    static_assert(::fa::sm80::FwdKernel<T, D, BM, BN, W, S>::kSmemBytes == (SMEM),                                \
                  #NAME ": the kernel's smem layout and src/cells.rs sm80_fwd_smem_bytes disagree");              \
    extern "C" __global__ void __launch_bounds__((W) * 32, ::fa::sm80::FwdKernel<T, D, BM, BN, W, S>::kMinBlocksPerSm) \
        NAME(const FaParams p) {                                                                                  \
        extern __shared__ __align__(128) unsigned char fa_sm80_fwd_smem[];                                        \
        ::fa::sm80::FwdKernel<T, D, BM, BN, W, S>::run(p, fa_sm80_fwd_smem);                                      \
    }

// The paged-KV instantiation of the same tile (FwdKernel<..., kPaged = true>).
#define FA_SM80_FWD_PAGED_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                                 \
    static_assert(::fa::sm80::FwdKernel<T, D, BM, BN, W, S, true>::kSmemBytes == (SMEM),                          \
                  #NAME ": the kernel's smem layout and src/cells.rs sm80_fwd_smem_bytes disagree");              \
    extern "C" __global__ void __launch_bounds__((W) * 32,                                                        \
                                                 ::fa::sm80::FwdKernel<T, D, BM, BN, W, S, true>::kMinBlocksPerSm) \
        NAME(const FaParams p) {                                                                                  \
        extern __shared__ __align__(128) unsigned char fa_sm80_fwd_paged_smem[];                                  \
        ::fa::sm80::FwdKernel<T, D, BM, BN, W, S, true>::run(p, fa_sm80_fwd_paged_smem);                          \
    }
