// The sm90-family backward's main kernel for wide head dims (D = 256): the variant of bwd_main
// (csrc/sm90/bwd.cuh) whose two warpgroups split the head dim instead of the keys.
//
// Why another split: bwd_main gives each warpgroup 64 keys, so it holds dK and dV of 64 keys x D
// columns (D registers per thread) besides S^T and dP^T (64): at D = 256 that is 320 registers.
// Here a thread block owns BN = 64 keys (D = 192, 256), and
// - S^T = K Q^T and dP^T = V dO^T (m64n32, SS) are split by queries: warpgroup w computes the
//   step's query columns [32 w, 32 w + 32) (16 + 16 registers);
// - P^T and dS^T go to shared memory ([key][query] tiles, 128 B swizzle), both warpgroups' halves;
// - dV += P^T dO and dK += dS^T Q (m64, N = D / 2, SS: A K-major from those tiles, B MN-major)
//   and dQ = dS K (SS, both MN-major, as in bwd_main) are split by head-dim columns: warpgroup w
//   owns the D / 2 columns BwdHalfCols gives it (one or two wgmma chunks) of dV, dK and dQ
//   (64 + 64 + 64 registers at D = 256).
// dQ's block order in dq_accum is therefore bwd_main's (warpgroup w, columns col(w, c) ..),
// and one convert kernel serves both.
//
// Per step: wait for the stage; S^T, dP^T; P^T, dS^T into the step's buffers (two alternate);
// the CTA-wide named barrier (both halves in smem; every thread finished step t - 1, so thread 0
// issues the loads of step t + S - 1 into its stage); dQ, then dV + dK, as two commit groups;
// dQ's reductions while dV + dK run.
#pragma once

namespace fa::sm90 {

constexpr int kBwdWideBN = 64;  // key rows per thread block of the wide variant

// Shared memory of the wide main kernel, in bytes from a 1024-aligned base:
//   K, V        one tile each of BN = 64 rows
//   Q, dO       S stages each of BM rows
//   P^T, dS^T   two buffers each (steps alternate) of [BN keys][BM queries], 128 B swizzle
//   stats       S stages of [lse2 x BM | D x BM] fp32
//   mbarriers   kv_full, full[S]
// plus 1024 bytes of slack for aligning the base (src/cells.rs `sm90_bwd_smem_bytes`).
template <typename T, int D, int S>
struct BwdWideLayout {
    using KVTile = SmemTile<T, D, kBwdWideBN>;
    using QSlab = SmemTile<T, D, kBwdBM>;
    using PTile = SmemTile<T, kBwdBM, kBwdWideBN>;  // [key][query]
    static constexpr uint32_t kKOffset = 0;
    static constexpr uint32_t kVOffset = kKOffset + KVTile::kStride;
    static constexpr uint32_t kQOffset = kVOffset + KVTile::kStride;
    static constexpr uint32_t kDoOffset = kQOffset + S * QSlab::kStride;
    static constexpr uint32_t kPOffset = kDoOffset + S * QSlab::kStride;  // P^T[2]
    static constexpr uint32_t kDsOffset = kPOffset + 2 * PTile::kStride;  // dS^T[2]
    static constexpr uint32_t kStatOffset = kDsOffset + 2 * PTile::kStride;
    static constexpr uint32_t kStatStageBytes = 2 * kBwdBM * 4;
    static constexpr uint32_t kBarrierOffset = kStatOffset + S * kStatStageBytes;
    static constexpr uint32_t kUsedBytes = kBarrierOffset + (1 + S) * 8;
    static constexpr uint32_t kSmemBytes = kUsedBytes + 1024;
    static_assert(kSmemBytes <= 227u * 1024u, "the wide backward tile does not fit 227 KB of shared memory");
    static_assert(kUsedBytes + 1024u <= (1u << 18), "descriptor start addresses are 18-bit shared-window addresses");
    static constexpr uint32_t kStepBytes = 2 * QSlab::kBytes + kStatStageBytes;
};

template <typename T, int D, int S, int SMEM, bool kDet>
__device__ __forceinline__ void bwd_main_wide(const FaParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                              const CUtensorMap* tma_v, const CUtensorMap* tma_do) {
    using L = BwdWideLayout<T, D, S>;
    using KVTile = typename L::KVTile;
    using QSlab = typename L::QSlab;
    using PTile = typename L::PTile;
    using Geo = HeadDimGeometry<T, D>;
    using Ws = sm80::BwdWorkspace<kBwdBM>;
    constexpr int BM = kBwdBM, BN = kBwdWideBN;
    constexpr int kQN = BM / 2;        // query columns of S^T / dP^T per warpgroup
    constexpr int kQKSteps = D / 16;   // k16 steps of S^T, dP^T
    constexpr int kKVSteps = BM / 16;  // k16 steps of dV, dK (the step's queries)
    constexpr int kDqSteps = BN / 16;  // k16 steps of dQ (the block's keys)
    constexpr int kHalf = D / 2;       // dV / dK / dQ columns per warpgroup
    static_assert(SMEM == static_cast<int>(L::kSmemBytes),
                  "SMEM (src/cells.rs sm90_bwd_smem_bytes) disagrees with BwdWideLayout (csrc/sm90/bwd_wide.cuh)");

    extern __shared__ __align__(1024) uint8_t smem_raw[];
    uint32_t const raw_addr = smem_addr(smem_raw);
    uint32_t const pad = (1024u - (raw_addr & 1023u)) & 1023u;
    uint8_t* const base_ptr = smem_raw + pad;
    uint32_t const base = raw_addr + pad;
    uint32_t const bar_kv = base + L::kBarrierOffset;
    uint32_t const bar_full0 = bar_kv + 8u;

    int const tid = static_cast<int>(threadIdx.x);
    int const wg = __shfl_sync(0xffffffffu, tid / 128, 0);
    int const tw = tid % 128;

    sm80::BwdBlock const blk = bwd_block_sm90(p);
    sm80::BwdSeq const seq = sm80::BwdSeq::make<BM>(p, blk.b);
    if (blk.n_block * BN >= seq.capacity_k) return;  // uniform: past this sequence's key rows
    Mask const mask = Mask::make(p, seq.seqlen_q, seq.seqlen_k);
    sm80::BwdQPlan const plan = sm80::BwdQPlan::make<BM, BN>(mask, seq.seqlen_q, blk.n_block);
    int const group = p.num_heads / p.num_heads_k;
    int const n_m = plan.m_end - plan.m_begin;
    int const num_steps = group * n_m;
    int const head0 = blk.hk * group;
    int const key0 = blk.n_block * BN;
    int const batch_coord = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : blk.b;

    if (tid == 0) {
        mbarrier_init(bar_kv, 1);
#pragma unroll
        for (int i = 0; i < S; ++i) mbarrier_init(bar_full0 + 8u * i, 1);
        fence_mbarrier_init();
    }
    __syncthreads();

    // Thread 0: Q, dO and the statistics of walk step t into stage `stage`.
    auto load_step = [&](int t, int stage) {
        int const h = head0 + t / n_m;
        int const m = plan.m_begin + t % n_m;
        uint32_t const bar = bar_full0 + 8u * static_cast<uint32_t>(stage);
        mbarrier_arrive_expect_tx(bar, L::kStepBytes);
        int const row = seq.q_row0 + m * BM;
        uint32_t const slab = static_cast<uint32_t>(stage) * QSlab::kStride;
        tma_load_5d(base + L::kQOffset + slab, tma_q, bar, 0, row, 0, h, batch_coord);
        tma_load_5d(base + L::kDoOffset + slab, tma_do, bar, 0, row, 0, h, batch_coord);
        int64_t const ws = Ws::row(p, h, seq.ws_row0) + static_cast<int64_t>(m) * BM;
        uint32_t const stat = base + L::kStatOffset + static_cast<uint32_t>(stage) * L::kStatStageBytes;
        bulk_load(stat, Ws::lse_log2(p) + ws, BM * 4, bar);
        bulk_load(stat + BM * 4, Ws::dsum(p) + ws, BM * 4, bar);
    };

    if (tid == 0) {
        tma_prefetch_descriptor(tma_q);
        tma_prefetch_descriptor(tma_do);
        mbarrier_arrive_expect_tx(bar_kv, 2 * KVTile::kBytes);
        tma_load_5d(base + L::kKOffset, tma_k, bar_kv, 0, seq.k_row0 + key0, 0, blk.hk, batch_coord);
        tma_load_5d(base + L::kVOffset, tma_v, bar_kv, 0, seq.k_row0 + key0, 0, blk.hk, batch_coord);
        for (int i = 0; i < S - 1 && i < num_steps; ++i) load_step(i, i);
    }
    __syncwarp();
    mbarrier_wait(bar_kv, 0);
    // Key rows past the sequence's keys: zeroed (see bwd_main).
    int const rows_valid = seq.seqlen_k - key0;
    if (rows_valid < BN) {
        int const first = rows_valid > 0 ? rows_valid : 0;
        uint4* const kt = reinterpret_cast<uint4*>(base_ptr + L::kKOffset);
        uint4* const vt = reinterpret_cast<uint4*>(base_ptr + L::kVOffset);
#pragma unroll 1
        for (int panel = 0; panel < Geo::kPanels; ++panel) {
            int const begin = (panel * static_cast<int>(KVTile::kPanelBytes) + first * Geo::kSwizzleBytes) / 16;
            int const end = (panel + 1) * static_cast<int>(KVTile::kPanelBytes) / 16;
            for (int i = begin + tid; i < end; i += kBwdThreads) {
                kt[i] = make_uint4(0u, 0u, 0u, 0u);
                vt[i] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        fence_proxy_async_smem();
    }
    __syncthreads();

    AccCoord const ac(tw);
    int const warp_in_wg = tw / 32, lane = tw % 32;
    float dk[kHalf / 2], dv[kHalf / 2];
#pragma unroll
    for (int i = 0; i < kHalf / 2; ++i) {
        dk[i] = 0.f;
        dv[i] = 0.f;
    }
    bool const mods = p.softcap > 0.f || p.alibi_slopes != nullptr;
    uint32_t const k_tile = base + L::kKOffset;
    uint32_t const v_tile = base + L::kVOffset;
    // This warpgroup's head-dim columns (BwdHalfCols): the two chunks' offsets in Q / dO and K.
    using HC = BwdHalfCols<T, D>;
    uint32_t const q_off1 = HC::offset1(wg, QSlab::kPanelBytes), q_off2 = HC::offset2(wg, QSlab::kPanelBytes);
    uint32_t const k_dq1 = k_tile + HC::offset1(wg, KVTile::kPanelBytes);
    uint32_t const k_dq2 = k_tile + HC::offset2(wg, KVTile::kPanelBytes);
    int const my_q0 = kQN * wg;  // this warpgroup's first query column of the step

#pragma unroll 1
    for (int t = 0; t < num_steps; ++t) {
        int const stage = t % S;
        uint32_t const buf = static_cast<uint32_t>(t & 1) * PTile::kStride;  // alternating
        uint32_t const p_tile = base + L::kPOffset + buf;
        uint32_t const ds_tile = base + L::kDsOffset + buf;
        int const h = head0 + t / n_m;
        int const m = plan.m_begin + t % n_m;
        uint32_t const q_slab = base + L::kQOffset + static_cast<uint32_t>(stage) * QSlab::kStride;
        uint32_t const do_slab = base + L::kDoOffset + static_cast<uint32_t>(stage) * QSlab::kStride;
        int const dq_rank = kDet && tw < 32 ? bwd_dq_rank<BM, BN>(mask, seq.seqlen_q, blk.n_block, m, tw) : 0;
        mbarrier_wait(bar_full0 + 8u * static_cast<uint32_t>(stage), static_cast<uint32_t>(t / S) & 1u);

        // ---- S^T = K Q_w^T, dP^T = V dO_w^T (this warpgroup's 32 queries) ----
        float s[kQN / 2], dp[kQN / 2];
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kQKSteps; ++ks) {
            WgmmaSS<T, kQN>::mma(s, KVTile::desc_k_major(k_tile, 0, ks), QSlab::desc_k_major(q_slab, my_q0, ks),
                                 ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
#pragma unroll
        for (int ks = 0; ks < kQKSteps; ++ks) {
            WgmmaSS<T, kQN>::mma(dp, KVTile::desc_k_major(v_tile, 0, ks), QSlab::desc_k_major(do_slab, my_q0, ks),
                                 ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
        wgmma_wait<1>();
        fence_operands(s);

        // ---- P^T and dS^T = P^T (dP^T - D); columns are queries ----
        const float* const stat =
            reinterpret_cast<const float*>(base_ptr + L::kStatOffset + static_cast<uint32_t>(stage) * L::kStatStageBytes) +
            my_q0;
        bool const masked = plan.masked(m);
        if (!mods) {
            float const scale_log2 = p.scale_log2;
#pragma unroll
            for (int c = 0; c < kQN / 8; ++c) {
                float2 const l2 = *reinterpret_cast<const float2*>(stat + 8 * c + ac.col0);
                s[4 * c + 0] = ex2(fmaf(s[4 * c + 0], scale_log2, -l2.x));
                s[4 * c + 1] = ex2(fmaf(s[4 * c + 1], scale_log2, -l2.y));
                s[4 * c + 2] = ex2(fmaf(s[4 * c + 2], scale_log2, -l2.x));
                s[4 * c + 3] = ex2(fmaf(s[4 * c + 3], scale_log2, -l2.y));
            }
            if (masked) {
#pragma unroll
                for (int e = 0; e < kQN / 2; ++e) {
                    int const i = m * BM + my_q0 + ac.col(e);
                    int const j = key0 + ac.row(e);
                    bool const visible = j < mask.key_end(i) && (j >= mask.key_begin(i) || j < mask.sink_tokens);
                    s[e] = visible ? s[e] : 0.f;
                }
            }
            wgmma_wait<0>();
            fence_operands(dp);
#pragma unroll
            for (int c = 0; c < kQN / 8; ++c) {
                float2 const d2 = *reinterpret_cast<const float2*>(stat + BM + 8 * c + ac.col0);
                dp[4 * c + 0] = s[4 * c + 0] * (dp[4 * c + 0] - d2.x);
                dp[4 * c + 1] = s[4 * c + 1] * (dp[4 * c + 1] - d2.y);
                dp[4 * c + 2] = s[4 * c + 2] * (dp[4 * c + 2] - d2.x);
                dp[4 * c + 3] = s[4 * c + 3] * (dp[4 * c + 3] - d2.y);
            }
            if (masked) {
                // 0 x (a NaN of dP^T) is NaN: invisible elements are selected, not multiplied.
#pragma unroll
                for (int e = 0; e < kQN / 2; ++e) dp[e] = s[e] != 0.f ? dp[e] : 0.f;
            }
        } else {
            // softcap and ALiBi (docs/semantics.md order): natural-unit scores, then exp2.
            wgmma_wait<0>();
            fence_operands(dp);
            float const slope = p.alibi_slopes != nullptr ? p.alibi_slopes[blk.b * p.alibi_batch_stride + h] : 0.f;
            float const scale = p.scale;
            bool const softcap = p.softcap > 0.f;
            float const cap = p.softcap;
            float const prescale = softcap ? p.scale * rcp_approx(p.softcap) : 0.f;
#pragma unroll
            for (int e = 0; e < kQN / 2; ++e) {
                int const i = m * BM + my_q0 + ac.col(e);  // query
                int const j = key0 + ac.row(e);            // key
                float sc = s[e] * scale;
                float g = 1.f;
                if (softcap) {
                    float th;
                    sm80::tanh_and_derivative(s[e] * prescale, th, g);
                    sc = cap * th;
                }
                int const dist = i + mask.diag - j;
                sc -= slope * static_cast<float>(dist < 0 ? -dist : dist);
                float const prob = ex2(fmaf(sc, kLog2e, -stat[ac.col(e)]));
                float const grad = prob * (dp[e] - stat[BM + ac.col(e)]) * g;
                bool const visible =
                    !masked || (j < mask.key_end(i) && (j >= mask.key_begin(i) || j < mask.sink_tokens));
                s[e] = visible ? prob : 0.f;
                dp[e] = visible ? grad : 0.f;
            }
        }

        // ---- P^T, dS^T into this step's buffers (this warpgroup's 32 query columns) ----
#pragma unroll
        for (int c = 0; c < kQN / 8; ++c) {
            int const col = my_q0 + 8 * c + ac.col0;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                uint32_t const off = PTile::offset(ac.row0 + 8 * half, col);
                st_shared_b32(p_tile + off, pack_pair<T>(s[4 * c + 2 * half], s[4 * c + 2 * half + 1]));
                st_shared_b32(ds_tile + off, pack_pair<T>(dp[4 * c + 2 * half], dp[4 * c + 2 * half + 1]));
            }
        }
        fence_proxy_async_smem();  // the generic-proxy stores before wgmma reads them
        // Both warpgroups' halves are in smem, and every thread has finished step t - 1 (its
        // GEMMs completed at its end): that stage now takes step t + S - 1, and the buffers of
        // step t + 1 were last read by step t - 1.
        named_barrier_sync(1, kBwdThreads);
        if (tid == 0 && t + S - 1 < num_steps) load_step(t + S - 1, (t + S - 1) % S);
        __syncwarp();

        // ---- dQ = dS K (this warpgroup's columns), then dV += P^T dO, dK += dS^T Q ----
        float dq[kHalf / 2];
        fence_operands(dv);
        fence_operands(dk);
        wgmma_fence();
#pragma unroll
        for (int ks = 0; ks < kDqSteps; ++ks) {
            HC::template mma<WgmmaSSTransAB>(dq, PTile::desc_mn_major(ds_tile, ks), KVTile::desc_mn_major(k_dq1, ks),
                                              KVTile::desc_mn_major(k_dq2, ks), ks > 0 ? 1u : 0u);
        }
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < kKVSteps; ++kk) {
            HC::template mma<WgmmaSSTransB>(dv, PTile::desc_k_major(p_tile, 0, kk),
                                             QSlab::desc_mn_major(do_slab + q_off1, kk),
                                             QSlab::desc_mn_major(do_slab + q_off2, kk), 1u);
        }
#pragma unroll
        for (int kk = 0; kk < kKVSteps; ++kk) {
            HC::template mma<WgmmaSSTransB>(dk, PTile::desc_k_major(ds_tile, 0, kk),
                                             QSlab::desc_mn_major(q_slab + q_off1, kk),
                                             QSlab::desc_mn_major(q_slab + q_off2, kk), 1u);
        }
        wgmma_commit();
        if constexpr (kDet) {
            wgmma_wait<0>();  // no wgmma in flight across the wait for this block's turn
        } else {
            wgmma_wait<1>();
        }
        fence_operands(dq);
        {
            float* const dq_block =
                p.dq_accum + (Ws::row(p, h, seq.ws_row0) + static_cast<int64_t>(m) * BM) * D;
            float* const dst = dq_block + ((wg * (kHalf / 8)) * 4 + warp_in_wg) * 128 + lane * 4;
            int* const sem = kDet ? Ws::semaphore(p, blk.b, h, m) : nullptr;
            if constexpr (kDet) bwd_dq_acquire(sem, dq_rank, wg, tw);
#pragma unroll
            for (int c = 0; c < kHalf / 8; ++c) {
                ::fa::ptx::red_add_f32x4(dst + c * 512, dq[4 * c + 0], dq[4 * c + 1], dq[4 * c + 2], dq[4 * c + 3]);
            }
            if constexpr (kDet) bwd_dq_release(sem, wg, tw);
        }
        wgmma_wait<0>();
        fence_operands(dv);
        fence_operands(dk);
    }

    // ---- dK, dV: every stored key row of the block, this warpgroup's columns ----
    int64_t const b_off = (p.flags & FA_FLAG_VARLEN) != 0 ? 0 : blk.b;
    int64_t const key_row = static_cast<int64_t>(seq.k_row0) + key0;
    T* const dk_g = static_cast<T*>(p.dk) + b_off * p.dk_batch_stride + key_row * p.dk_row_stride +
                    static_cast<int64_t>(blk.hk) * p.dk_head_stride;
    T* const dv_g = static_cast<T*>(p.dv) + b_off * p.dv_batch_stride + key_row * p.dv_row_stride +
                    static_cast<int64_t>(blk.hk) * p.dv_head_stride;
    int const rows_cap = seq.capacity_k - key0;
    float const scale = p.scale;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        int const r = ac.row0 + 8 * half;
        if (r < rows_cap) {
#pragma unroll
            for (int c = 0; c < kHalf / 8; ++c) {
                int const col = HC::col(wg, c) + ac.col0;
                *reinterpret_cast<uint32_t*>(dk_g + r * p.dk_row_stride + col) =
                    pack_pair<T>(dk[4 * c + 2 * half] * scale, dk[4 * c + 2 * half + 1] * scale);
                *reinterpret_cast<uint32_t*>(dv_g + r * p.dv_row_stride + col) =
                    pack_pair<T>(dv[4 * c + 2 * half], dv[4 * c + 2 * half + 1]);
            }
        }
    }
}

// The main kernel of tile BN: bwd_main (BN = 128) or bwd_main_wide (BN = 64). A template, so
// that only the chosen one is instantiated.
template <typename T, int D, int BN, int S, int SMEM, bool kDet>
__device__ __forceinline__ void bwd_main_tile(const FaParams& p, const CUtensorMap* tma_q, const CUtensorMap* tma_k,
                                              const CUtensorMap* tma_v, const CUtensorMap* tma_do) {
    if constexpr (BN == kBwdBN) {
        bwd_main<T, D, S, SMEM, kDet>(p, tma_q, tma_k, tma_v, tma_do);
    } else {
        static_assert(BN == kBwdWideBN, "the sm90 backward's key blocks are 128 or 64 rows");
        bwd_main_wide<T, D, S, SMEM, kDet>(p, tma_q, tma_k, tma_v, tma_do);
    }
}

}  // namespace fa::sm90
