// Typed synchronisation of the sm90 forward kernel: named-barrier ids, the pipeline state of the
// K/V stages, and the mbarriers in shared memory.
//
// Who waits on what (S = stages, C = consumer warpgroups):
//
//   barrier      arrivals        completed by                         waited on by
//   q_full       1 + tx bytes    producer expect_tx + TMA Q            consumers, once per tile
//   q_empty      C               one thread per consumer WG, after    producer, before loading Q
//                                its O slab left shared memory
//   k_full[s]    1 + tx bytes    producer expect_tx + TMA K            consumers
//   k_empty[s]   4 C             one lane per consumer warp, after    producer, before reusing s
//                                the Q·K^T reading stage s completed
//   v_full[s]    1 + tx bytes    producer expect_tx + TMA V            consumers
//                (or 1 plain arrive after the producer zeroed rows past seqused_k, see v_fix)
//   v_empty[s]   4 C             one lane per consumer warp, after    producer
//                                the P·V reading stage s completed
//   v_fix        1 + tx bytes    producer's own TMA V of a block       the producer itself
//                                that straddles seqused_k
//
// Parity convention: a consumer waits on a full barrier with the phase bit of its PipelineState;
// the producer waits on the matching empty barrier with the opposite bit, which lets its first
// pass over the stages through (a fresh mbarrier reports the phase "before" phase 0 complete).
#pragma once

#include <stdint.h>

#include "sm90/ptx.cuh"

namespace fa::sm90 {

// Named hardware barriers (bar.sync / bar.arrive ids). Id 0 is __syncthreads.
enum class NamedBarrier : uint32_t {
    // Ping-pong: consumer warpgroup w may issue its GEMMs once TurnWG(w) completes; it syncs on
    // its own id (128 threads) and the previous warpgroup in the ring arrives on it (128).
    TurnWG0 = 1,
    TurnWG1 = 2,
    TurnWG2 = 3,
    // The 128 threads of consumer warpgroup w in the epilogue (O slab written / read back).
    EpilogueWG0 = 4,
    EpilogueWG1 = 5,
    EpilogueWG2 = 6,
};

constexpr int kMaxConsumerWarpgroups = 3;
constexpr uint32_t kThreadsPerWarpgroup = 128;
static_assert(static_cast<uint32_t>(NamedBarrier::EpilogueWG0) + kMaxConsumerWarpgroups <= 16,
              "the hardware has 16 named barriers per CTA");
static_assert(static_cast<uint32_t>(NamedBarrier::TurnWG0) + kMaxConsumerWarpgroups <=
                  static_cast<uint32_t>(NamedBarrier::EpilogueWG0),
              "turn and epilogue barrier ids must not overlap");

__device__ __forceinline__ uint32_t barrier_id(NamedBarrier b, int warpgroup = 0) {
    return static_cast<uint32_t>(b) + static_cast<uint32_t>(warpgroup);
}

// Stage index and phase bit of a circular pipeline of STAGES buffers.
template <int STAGES>
struct PipelineState {
    static_assert(STAGES >= 2, "the K/V pipeline needs two stages: the producer fills one while the other is read");
    int stage = 0;
    uint32_t phase = 0;

    __device__ __forceinline__ void advance() {
        if (++stage == STAGES) {
            stage = 0;
            phase ^= 1u;
        }
    }
};

// Shared-window addresses of the kernel's mbarriers (layout: SharedLayout in layout.cuh).
template <int STAGES>
struct Barriers {
    uint32_t base;

    __device__ __forceinline__ uint32_t q_full() const { return base; }
    __device__ __forceinline__ uint32_t q_empty() const { return base + 8u; }
    __device__ __forceinline__ uint32_t v_fix() const { return base + 16u; }
    __device__ __forceinline__ uint32_t k_full(int s) const { return base + 24u + 8u * s; }
    __device__ __forceinline__ uint32_t k_empty(int s) const { return base + 24u + 8u * (STAGES + s); }
    __device__ __forceinline__ uint32_t v_full(int s) const { return base + 24u + 8u * (2 * STAGES + s); }
    __device__ __forceinline__ uint32_t v_empty(int s) const { return base + 24u + 8u * (3 * STAGES + s); }

    static constexpr int kCount = 3 + 4 * STAGES;

    // One thread, before the CTA barrier that precedes every use.
    __device__ __forceinline__ void init(int consumer_warpgroups) const {
        mbarrier_init(q_full(), 1);
        mbarrier_init(q_empty(), static_cast<uint32_t>(consumer_warpgroups));
        mbarrier_init(v_fix(), 1);
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(k_full(s), 1);
            mbarrier_init(v_full(s), 1);
            mbarrier_init(k_empty(s), 4u * consumer_warpgroups);
            mbarrier_init(v_empty(s), 4u * consumer_warpgroups);
        }
        // Without this fence the TMA unit (async proxy) may see an uninitialised barrier when it
        // signals complete_tx, and the transaction is lost (the consumers then hang).
        fence_mbarrier_init();
    }
};

}  // namespace fa::sm90
