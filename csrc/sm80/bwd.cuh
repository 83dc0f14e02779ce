// sm80-family (FlashAttention-2 class) backward: mma.sync m16n8k16, ldmatrix, cp.async.
//
// Three kernels per tile variant (FA_SM80_BWD_KERNEL at the end), launched in this order on one
// stream by src/bwd.rs:
//
//   NAME_dot      grid (ceil(p.seqlen_q / BM), p.num_heads, p.batch), 256 threads, no dynamic smem.
//                 Block (m, h, b): for the BM rows of query block m of head h of sequence b,
//                 D_i = rowsum(dO_i * O_i) and the log2 LSE (+inf for padding rows and rows with
//                 LSE = -inf) into their workspace rows; zeroes the block's dq_accum rows and (in
//                 deterministic mode) its dQ semaphore.
//   NAME_main     grid (ceil(max key capacity / BN), p.num_heads_k, p.batch), W * 32 threads, SMEM
//                 bytes of dynamic smem (src/cells.rs sm80_bwd_smem_bytes). Block (n, hk, b) owns
//                 keys [n * BN, + BN) of kv head hk of sequence b: dK and dV summed over the GQA
//                 group in registers, written once (T, dk / dv strides); dS K added into dq_accum.
//   NAME_convert  grid (ceil(p.seqlen_q / BM), p.num_heads, p.batch), 256 threads, no dynamic smem.
//                 dq = scale * dq_accum (T, dq strides; dq_accum blocks are fragment-major); block
//                 (0, h, 0) also writes dsink[h] = -sum over every row i of head h of
//                 exp(sink_h - LSE_i) * D_i, in a fixed order (when p.dsink and p.sink_logits
//                 are set).
//
// Workspaces: csrc/sm80/bwd_tile.cuh (BwdWorkspace). dk_accum / dv_accum are not used: a block
// loops over the query heads of its kv head's group, so dK / dV need no cross-block reduction.
//
// Design of the main kernel
// - Parallel over key blocks (FlashAttention-2's backward): K and V of the block stay in smem for
//   the whole walk; the walk visits every (query head of the group, query block) pair whose rows
//   see the block (BwdQPlan: causal / window / sink-token block skipping), in ascending query
//   blocks, Q / dO / statistics of the next step loading during the current one (S = 2) or during
//   its dQ phase (S = 1).
// - Scores are transposed, S^T = K Q^T, with each warp owning 16 * kMT key rows (BwdShape): P^T
//   and dS^T are born in the A-operand layout of dV += P^T dO and dK += dS^T Q. Where a warp owns
//   whole dK / dV rows (kWC = 1) P never touches smem; where kWC warps split a key group's
//   columns (32-row groups, FlashAttention-2's 32 x 64 dK / dV warp tiles) P^T goes through smem.
//   dS^T always goes to smem for dQ = dS K, which every warp tiles and adds into dq_accum with
//   fp32 reductions (two barriers per step). dq_accum blocks are stored fragment-major
//   (BwdShape::dq_frag_index), so that each reduction instruction is one 16-byte vector per lane
//   and 512 contiguous bytes per warp (a row-major block takes twice the instructions, each
//   touching 8 lines: 9-15% slower at d >= 96).
// - P is recomputed from the log2 LSE with one FFMA + MUFU.EX2 (scale folded in without score
//   modifiers); softcap multiplies dS by 1 - tanh^2; ALiBi and the mask have no parameters.
//   Masked steps (diagonal, window edges, key tail) apply the element mask; a warp that sees
//   none of a masked step's pairs skips its math.
// - Deterministic mode: each query block's dQ contributions are added in descending key-block
//   order, each block waiting on a per-(batch, head, query block) counter for its rank
//   (BwdMainloop::dq_rank); key blocks are launched in descending order too (bwd_block), so a
//   block only waits on blocks launched before it. dK, dV and dsink have a single writer in both
//   modes.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#include "common/mask.cuh"
#include "common/params.h"
#include "common/ptx.cuh"
#include "common/softmax.cuh"
#include "sm80/bwd_gemm.cuh"
#include "sm80/bwd_mainloop.cuh"
#include "sm80/bwd_tile.cuh"

namespace fa {
namespace sm80 {

// Threads of the dot and convert kernels.
inline constexpr int kBwdPrePostThreads = 256;

template <class T, int D, int BM, int BN, int W, int S>
struct BwdKernel {
    using Mainloop = BwdMainloop<T, D, BM, BN, W, S>;
    using Shape = typename Mainloop::Shape;
    using Smem = typename Mainloop::Smem;
    using Ws = BwdWorkspace<BM>;
    static constexpr int kThreads = Shape::kThreads;
    static constexpr int kSmemBytes = Smem::kBytes;
    // 2 x 4 warps or 1 x 8 warps per SM: up to 255 registers per thread either way.
    static constexpr int kMinBlocksPerSm = W <= 4 ? 2 : 1;
    static constexpr int kPrePostWarps = kBwdPrePostThreads / 32;

    static_assert(ptx::kIsMmaElem<T>, "the sm80 backward takes __half or __nv_bfloat16");

    // ---- NAME_dot ----
    __device__ __forceinline__ static void dot(const FaParams& p) {
        const int m = ptx::block_idx_x(), h = ptx::block_idx_y(), b = ptx::block_idx_z();
        const BwdSeq seq = BwdSeq::make<BM>(p, b);
        if (m * BM >= seq.seqlen_q) return;  // uniform: shorter varlen sequences own fewer blocks
        const int tid = ptx::thread_idx_x();
        const int warp = tid / 32, lane = tid % 32;
        const int64_t ws = Ws::row(p, h, seq.ws_row0) + m * BM;
        const int64_t b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : b;
        // One warp per row, lanes over 16-byte chunks of the head dim.
        for (int r = warp; r < BM; r += kPrePostWarps) {
            const int i = m * BM + r;
            float d_i = 0.f, lse2 = INFINITY;
            if (i < seq.seqlen_q) {
                const int64_t row = seq.q_row0 + i;
                const T* o = static_cast<const T*>(p.o) + b_off * p.o_batch_stride + row * p.o_row_stride +
                             static_cast<int64_t>(h) * p.o_head_stride;
                const T* dout = static_cast<const T*>(p.dout) + b_off * p.do_batch_stride + row * p.do_row_stride +
                                static_cast<int64_t>(h) * p.do_head_stride;
                for (int c = lane; c < D / 8; c += 32) {
                    const uint4 ov = *reinterpret_cast<const uint4*>(o + c * 8);
                    const uint4 dv = *reinterpret_cast<const uint4*>(dout + c * 8);
                    d_i += dot8(ov, dv);
                }
                const float lse = p.lse[bwd_lse_index(p, b, h, seq, i)];
                lse2 = lse == -INFINITY ? INFINITY : lse * kLog2e;
            }
#pragma unroll
            for (int off = 16; off > 0; off /= 2) d_i += __shfl_xor_sync(0xffffffffu, d_i, off);
            if (lane == 0) {
                Ws::dsum(p)[ws + r] = d_i;
                Ws::lse_log2(p)[ws + r] = lse2;
            }
        }
        float4* dq = reinterpret_cast<float4*>(p.dq_accum + ws * D);  // [BM][D] fp32
        for (int idx = tid; idx < BM * D / 4; idx += kBwdPrePostThreads) dq[idx] = make_float4(0.f, 0.f, 0.f, 0.f);
        if (p.semaphore != nullptr && tid == 0) *Ws::semaphore(p, b, h, m) = 0;
    }

    // sum of the products of 8 pairs of T (two uint4 of 16-bit elements), in fp32.
    __device__ __forceinline__ static float dot8(uint4 a, uint4 b) {
        const uint32_t av[4] = {a.x, a.y, a.z, a.w};
        const uint32_t bv[4] = {b.x, b.y, b.z, b.w};
        float acc = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            float2 x, y;
            if constexpr (std::is_same_v<T, __nv_bfloat16>) {
                x = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&av[i]));
                y = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&bv[i]));
            } else {
                x = __half22float2(*reinterpret_cast<const __half2*>(&av[i]));
                y = __half22float2(*reinterpret_cast<const __half2*>(&bv[i]));
            }
            acc = fmaf(x.x, y.x, acc);
            acc = fmaf(x.y, y.y, acc);
        }
        return acc;
    }

    // ---- NAME_main ----
    __device__ __forceinline__ static void run_main(const FaParams& p, unsigned char* smem) {
        const Mainloop mainloop(p, smem);
        int num_steps;
        {
            const BwdBlock blk = bwd_block(p);
            const int n_block = blk.n_block, hk = blk.hk, b = blk.b;
            const BwdSeq seq = BwdSeq::make<BM>(p, b);
            if (n_block * BN >= seq.capacity_k) return;  // uniform: past this sequence's key rows
            BwdWalkState st;
            st.mask = Mask::make(p, seq.seqlen_q, seq.seqlen_k);
            st.plan = BwdQPlan::make<BM, BN>(st.mask, seq.seqlen_q, n_block);
            st.seqlen_q = seq.seqlen_q;
            const int group = p.num_heads / p.num_heads_k;
            st.head0 = hk * group;
            st.n_block = n_block;
            st.batch = b;
            st.q_row0 = seq.q_row0;
            st.ws_row0 = seq.ws_row0;
            st.num_steps = group * (st.plan.m_end - st.plan.m_begin);
            num_steps = st.num_steps;
            if (ptx::thread_idx_x() == 0) mainloop.store_state(st);
            // Group 0: K, V and the first step's loads.
            const int64_t b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : b;
            const int64_t key_row = static_cast<int64_t>(seq.k_row0) + n_block * BN;
            const T* k = static_cast<const T*>(p.k) + b_off * p.k_batch_stride + key_row * p.k_row_stride +
                         static_cast<int64_t>(hk) * p.k_head_stride;
            const T* v = static_cast<const T*>(p.v) + b_off * p.v_batch_stride + key_row * p.v_row_stride +
                         static_cast<int64_t>(hk) * p.v_head_stride;
            mainloop.load_kv(k, v, seq.seqlen_k - n_block * BN);
            if (num_steps > 0) mainloop.load_step(st, 0, 0);
            ptx::cp_async_commit_group();
        }
        // The walk state is published before any thread reads it.
        __syncthreads();

        typename Mainloop::Acc dk, dv;  // [16*kMT keys][kWarpD columns] of the warp, fp32
        zero_acc(dk);
        zero_acc(dv);
        for (int t = 0; t < num_steps; ++t) {
            // Re-derived from the smem state each step (no registers held across the step).
            const BwdWalkState st = mainloop.load_state();
            if (st.plan.masked(Mainloop::mblock_of(st, t))) {
                mainloop.template step</*kMasked=*/true>(t, dk, dv);
            } else {
                mainloop.template step</*kMasked=*/false>(t, dk, dv);
            }
        }

        // Epilogue: every key row of the block that exists in storage, zeros included.
        const BwdBlock blk = bwd_block(p);
        const int n_block = blk.n_block, hk = blk.hk, b = blk.b;
        const BwdSeq seq = BwdSeq::make<BM>(p, b);
        const int64_t b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : b;
        const int64_t key_row = static_cast<int64_t>(seq.k_row0) + n_block * BN;
        T* dk_gmem = static_cast<T*>(p.dk) + b_off * p.dk_batch_stride + key_row * p.dk_row_stride +
                     static_cast<int64_t>(hk) * p.dk_head_stride;
        T* dv_gmem = static_cast<T*>(p.dv) + b_off * p.dv_batch_stride + key_row * p.dv_row_stride +
                     static_cast<int64_t>(hk) * p.dv_head_stride;
        mainloop.store_dkv(dk, dv, dk_gmem, dv_gmem, min(BN, seq.capacity_k - n_block * BN));
    }

    // ---- NAME_convert ----
    __device__ __forceinline__ static void convert(const FaParams& p) {
        const int m = ptx::block_idx_x(), h = ptx::block_idx_y(), b = ptx::block_idx_z();
        const int tid = ptx::thread_idx_x();
        if (m == 0 && b == 0 && p.dsink != nullptr && p.sink_logits != nullptr) dsink(p, h, tid);
        const BwdSeq seq = BwdSeq::make<BM>(p, b);
        if (m * BM >= seq.seqlen_q) return;
        const int64_t ws = Ws::row(p, h, seq.ws_row0) + m * BM;
        const float* dq_acc = p.dq_accum + ws * D;  // BM x D fp32, fragment-major
        const int64_t b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : b;
        T* dq = static_cast<T*>(p.dq) + b_off * p.dq_batch_stride + (static_cast<int64_t>(seq.q_row0) + m * BM) * p.dq_row_stride +
                static_cast<int64_t>(h) * p.dq_head_stride;
        const int rows_valid = min(BM, seq.seqlen_q - m * BM);
        const float scale = p.scale;
        // The block is fragment-major (BwdShape::dq_frag_index): 16 bytes in, a pair of two rows out.
        for (int f = tid; f < BM * D / 4; f += kBwdPrePostThreads) {
            int row, col;
            Shape::dq_frag_coords(f, row, col);
            const float4 v = *reinterpret_cast<const float4*>(dq_acc + f * 4);
            if (row < rows_valid) {
                *reinterpret_cast<uint32_t*>(dq + row * p.dq_row_stride + col) =
                    ptx::pack_f32x2<T>(v.x * scale, v.y * scale);
            }
            if (row + 8 < rows_valid) {
                *reinterpret_cast<uint32_t*>(dq + (row + 8) * p.dq_row_stride + col) =
                    ptx::pack_f32x2<T>(v.z * scale, v.w * scale);
            }
        }
    }

    // dsink[h] = -sum over every row i of head h (all sequences, ascending) of exp(sink - LSE_i) * D_i:
    // thread-strided partial sums, then a fixed-shape block reduction.
    __device__ __forceinline__ static void dsink(const FaParams& p, int h, int tid) {
        __shared__ float partials[kPrePostWarps];
        const float sink = p.sink_logits[h];
        float acc = 0.f;
        for (int bb = 0; bb < p.batch; ++bb) {
            const BwdSeq s = BwdSeq::make<BM>(p, bb);
            const float* dsum = Ws::dsum(p) + Ws::row(p, h, s.ws_row0);
            for (int i = tid; i < s.seqlen_q; i += kBwdPrePostThreads) {
                const float lse = p.lse[bwd_lse_index(p, bb, h, s, i)];
                if (lse != -INFINITY) acc = fmaf(expf(sink - lse), dsum[i], acc);
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
        if (tid % 32 == 0) partials[tid / 32] = acc;
        __syncthreads();
        if (tid == 0) {
            float total = 0.f;
#pragma unroll
            for (int w = 0; w < kPrePostWarps; ++w) total += partials[w];
            p.dsink[h] = -total;
        }
    }
};

}  // namespace sm80
}  // namespace fa

// One backward tile variant: NAME_dot, NAME_main, NAME_convert (launch contract at the top) for
// element type T, head dim D, BM query rows per step, BN key rows per thread block, W warps, S
// Q / dO stages; SMEM = the main kernel's dynamic smem as computed by src/cells.rs.
#define FA_SM80_BWD_KERNEL(NAME, T, D, BM, BN, W, S, SMEM)                                                        \
    static_assert(::fa::sm80::BwdKernel<T, D, BM, BN, W, S>::kSmemBytes == (SMEM),                                 \
                  #NAME ": the kernel's smem layout and src/cells.rs sm80_bwd_smem_bytes disagree");               \
    extern "C" __global__ void __launch_bounds__(::fa::sm80::kBwdPrePostThreads) NAME##_dot(const FaParams p) {  \
        ::fa::sm80::BwdKernel<T, D, BM, BN, W, S>::dot(p);                                                         \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__((W) * 32, ::fa::sm80::BwdKernel<T, D, BM, BN, W, S>::kMinBlocksPerSm) \
        NAME##_main(const FaParams p) {                                                                            \
        extern __shared__ __align__(128) unsigned char fa_sm80_bwd_smem[];                                         \
        ::fa::sm80::BwdKernel<T, D, BM, BN, W, S>::run_main(p, fa_sm80_bwd_smem);                                      \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(::fa::sm80::kBwdPrePostThreads) NAME##_convert(const FaParams p) { \
        ::fa::sm80::BwdKernel<T, D, BM, BN, W, S>::convert(p);                                                     \
    }
