// Typed synchronisation of the sm90 forward kernel: named-barrier ids, the pipeline state of the
// K/V stages, and the mbarriers in shared memory.
//
// Who waits on what (S = stages, C = consumer warpgroups):
//
//   barrier      arrivals        completed by                         waited on by
//   q_full       1 + tx bytes    producer expect_tx + TMA Q            consumers, once per tile
//   q_empty      4 C             one lane per consumer warp, after    producer, before loading Q
//                                its last Q·K^T of the tile completed
//   k_full[s]    1 + tx bytes    producer expect_tx + TMA K            consumers
//   k_empty[s]   4 C             one lane per consumer warp, after    producer, before reusing s
//                                the Q·K^T reading stage s completed
//   v_full[s]    1 + tx bytes    producer expect_tx + TMA V            consumers
//                (or 1 plain arrive after the producer zeroed rows past seqused_k, see v_fix)
//   v_empty[s]   4 C             one lane per consumer warp, after    producer
//                                the P·V reading stage s completed
//   v_fix        1 + tx bytes    producer's own TMA V of a block       the producer itself
//                                that straddles seqused_k
//   tile_full[i] 1               producer, after writing the          consumers, before each tile
//                                coordinate of its next tile into
//                                slot i
//   tile_empty[i] 4 C            one lane per consumer warp, after    producer, before rewriting
//                                the epilogue of the tile in slot i    slot i
//
// Parity convention: a consumer waits on a full barrier with the phase bit of its PipelineState;
// the producer waits on the matching empty barrier with the opposite bit, which lets its first
// pass over the stages through (a fresh mbarrier reports the phase "before" phase 0 complete).
#pragma once

#include <stdint.h>

#include "sm90/ptx.cuh"
#include "sm90/scheduler.cuh"

namespace fa::sm90 {

// Named hardware barriers (bar.sync / bar.arrive ids). Id 0 is __syncthreads.
enum class NamedBarrier : uint32_t {
    // Ping-pong: consumer warpgroup w may issue its GEMMs once TurnWG(w) completes; it syncs on
    // its own id (128 threads) and the previous warpgroup in the ring arrives on it (128).
    TurnWG0 = 1,
    TurnWG1 = 2,
    TurnWG2 = 3,
};

constexpr int kMaxConsumerWarpgroups = 3;
constexpr uint32_t kThreadsPerWarpgroup = 128;
static_assert(static_cast<uint32_t>(NamedBarrier::TurnWG0) + kMaxConsumerWarpgroups <= 16,
              "the hardware has 16 named barriers per CTA");

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
    __device__ __forceinline__ uint32_t tile_full(int i) const { return base + 24u + 8u * (4 * STAGES + i); }
    __device__ __forceinline__ uint32_t tile_empty(int i) const {
        return base + 24u + 8u * (4 * STAGES + kTileSlots + i);
    }
    // The tile slots, right after the barriers: slot i holds one decoded tile coordinate
    // (TileCoord, 16 bytes, 8-byte aligned).
    __device__ __forceinline__ uint32_t tile_slot(int i) const { return base + 8u * kCount + 16u * i; }

    static constexpr int kTileSlots = 2;
    static constexpr int kCount = 3 + 4 * STAGES + 2 * kTileSlots;

    // One thread, before the CTA barrier that precedes every use.
    __device__ __forceinline__ void init(int consumer_warpgroups) const {
        mbarrier_init(q_full(), 1);
        mbarrier_init(q_empty(), 4u * consumer_warpgroups);
        mbarrier_init(v_fix(), 1);
        for (int s = 0; s < STAGES; ++s) {
            mbarrier_init(k_full(s), 1);
            mbarrier_init(v_full(s), 1);
            mbarrier_init(k_empty(s), 4u * consumer_warpgroups);
            mbarrier_init(v_empty(s), 4u * consumer_warpgroups);
        }
        for (int i = 0; i < kTileSlots; ++i) {
            mbarrier_init(tile_full(i), 1);
            mbarrier_init(tile_empty(i), 4u * consumer_warpgroups);
        }
        // Without this fence the TMA unit (async proxy) may see an uninitialised barrier when it
        // signals complete_tx, and the transaction is lost (the consumers then hang).
        fence_mbarrier_init();
    }
};

// Hands decoded tiles from the producer warp to the consumer warpgroups through the tile slots,
// a ring of kTileSlots = 2: the producer may publish the next tile while the consumers still
// work on the current one, whose slot they hold until its epilogue is done (so they can re-read
// the coordinate there instead of keeping it in registers through the main loop). One counter of
// handed-over tiles gives slot (n % 2) and phase ((n / 2) % 2).
template <int STAGES>
struct TileFeed {
    static_assert(Barriers<STAGES>::kTileSlots == 2, "slot and phase below are bits 0 and 1 of the counter");
    uint32_t n = 0;

    __device__ __forceinline__ int slot() const { return static_cast<int>(n & 1u); }
    __device__ __forceinline__ uint32_t phase() const { return (n >> 1) & 1u; }

    // Producer warp, all lanes; `leader` writes. The producer decodes each tile index once and
    // publishes the coordinate, so that the consumers never run the scheduler's divisions (about
    // six run-time integer divisions per decode, twice per tile per consumer thread before).
    // m_block < 0 is the stop signal.
    __device__ __forceinline__ void put(const Barriers<STAGES>& bars, const TileCoord& c, bool leader) {
        // The consumers must have finished the tile two back, which held this slot.
        mbarrier_wait(bars.tile_empty(slot()), phase() ^ 1u);
        if (leader) {
            uint32_t const a = bars.tile_slot(slot());
            st_shared_v2_b32(a, static_cast<uint32_t>(c.m_block), static_cast<uint32_t>(c.head));
            st_shared_v2_b32(a + 8u, static_cast<uint32_t>(c.batch), static_cast<uint32_t>(c.split));
            mbarrier_arrive(bars.tile_full(slot()));  // release: orders the stores before it
        }
        ++n;
    }

    // Consumers, every thread: the next tile (waits until it is published).
    __device__ __forceinline__ TileCoord take(const Barriers<STAGES>& bars) const {
        mbarrier_wait(bars.tile_full(slot()), phase());
        return current(bars);
    }
    // The coordinate take() returned, read again from the slot (still held).
    __device__ __forceinline__ TileCoord current(const Barriers<STAGES>& bars) const {
        uint32_t const a = bars.tile_slot(slot());
        uint32_t x, y, z, w;
        ld_shared_v2_b32(a, x, y);
        ld_shared_v2_b32(a + 8u, z, w);
        return TileCoord{static_cast<int>(x), static_cast<int>(y), static_cast<int>(z), static_cast<int>(w)};
    }
    // Consumers, every thread, once the tile is finished: gives the slot back. Without this
    // arrival the producer never reuses the slot and hangs.
    __device__ __forceinline__ void release(const Barriers<STAGES>& bars) {
        __syncwarp();  // every lane has read the slot before its warp releases it
        if (threadIdx.x % 32 == 0) mbarrier_arrive(bars.tile_empty(slot()));
        ++n;
    }
};

}  // namespace fa::sm90
