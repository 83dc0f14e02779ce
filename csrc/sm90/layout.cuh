// Shared-memory geometry of the sm90 forward kernel: swizzled tiles, wgmma descriptors, and the
// byte layout of the whole dynamic shared-memory block.
//
// Every Q, K and V tile is stored the way TMA writes a box (PW, ROWS, PANELS) with a
// swizzle of SWB bytes: `[panel][row][PW elements]`, one SWB-byte line per (panel, row), 16-byte
// chunks XOR-swizzled within each 8-line atom (CuTe's Swizzle<log2(SWB/16), 4, 3>). The head dim
// is cut into panels of PW = SWB / sizeof(T) elements because one swizzled line holds at most
// 128 bytes:
//
//   head dim | row bytes | swizzle SWB | panel PW | panels | why
//   64       | 128       | 128 B       | 64       | 1      |
//   80       | 160       | 32 B        | 16       | 5      | 160 = 5 x 32: the only swizzle that tiles it
//   96       | 192       | 64 B        | 32       | 3      | 192 = 3 x 64
//   128      | 256       | 128 B       | 64       | 2      |
//   192      | 384       | 128 B       | 64       | 3      |
//   256      | 512       | 128 B       | 64       | 4      |
//
// Every swizzle mode reads conflict-free for wgmma (each 8-line x 16-byte core matrix lands on
// 8 distinct bank groups); 128 B is preferred because TMA moves longer lines. One swizzle for the
// whole head dim keeps a single descriptor layout per operand, so P·V covers all of D in one
// wgmma (N = D is PANELS x PW, the panel stride being the MN-major "leading byte offset").
#pragma once

#include <stdint.h>

namespace fa::sm90 {

// The head-dim geometry shared by every tile of one kernel.
template <typename T, int D>
struct HeadDimGeometry {
    static constexpr int kElemBytes = static_cast<int>(sizeof(T));
    static constexpr int kRowBytes = D * kElemBytes;
    static_assert(kElemBytes == 2, "the sm90 forward kernel is written for 16-bit inputs");
    static_assert(D % 16 == 0 && D <= 256, "the head dim must be a multiple of 16 (the wgmma K) and at most 256");
    static constexpr int kSwizzleBytes = kRowBytes % 128 == 0 ? 128 : kRowBytes % 64 == 0 ? 64 : 32;
    static constexpr int kPanelElems = kSwizzleBytes / kElemBytes;  // PW
    static constexpr int kPanels = D / kPanelElems;
    static_assert(kPanels * kPanelElems == D, "the panels must tile the head dim");
    // Swizzle<B, 4, 3>: B = log2(SWB / 16) bits of the line index (address bits 7..) are XORed
    // into the 16-byte chunk index (address bits 4..).
    static constexpr int kSwizzleBits = kSwizzleBytes == 128 ? 3 : kSwizzleBytes == 64 ? 2 : 1;
    static constexpr int kAtomBytes = 8 * kSwizzleBytes;  // 8 lines: the period of the swizzle
    // wgmma descriptor layout type (bits 62..63): 1 = 128 B, 2 = 64 B, 3 = 32 B swizzle.
    static constexpr uint64_t kDescLayout = kSwizzleBytes == 128 ? 1 : kSwizzleBytes == 64 ? 2 : 3;
    static constexpr int kKSteps = D / 16;               // k16 steps of Q·K^T
    static constexpr int kKStepsPerPanel = kPanelElems / 16;
    static_assert(kKStepsPerPanel >= 1, "a panel holds at least one k16 step");
};

// A wgmma shared-memory matrix descriptor (PTX ISA "matrix descriptor"): start address,
// leading / stride byte offsets (all >> 4), base offset 0 (tiles are atom-aligned), layout type.
__device__ __forceinline__ uint64_t make_smem_desc(uint32_t addr, uint32_t leading_bytes, uint32_t stride_bytes,
                                                   uint64_t layout_type) {
    return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) |
           (static_cast<uint64_t>((leading_bytes >> 4) & 0x3FFFu) << 16) |
           (static_cast<uint64_t>((stride_bytes >> 4) & 0x3FFFu) << 32) | (layout_type << 62);
}

// One swizzled tile of ROWS rows x D columns, as one TMA box (PW, ROWS, PANELS) writes it.
template <typename T, int D, int ROWS>
struct SmemTile {
    using Geo = HeadDimGeometry<T, D>;
    static_assert(ROWS % 8 == 0, "a tile is a whole number of 8-line swizzle atoms per panel");
    static_assert(ROWS <= 256, "a TMA box dimension is at most 256");
    static constexpr int kRows = ROWS;
    static constexpr uint32_t kPanelBytes = ROWS * Geo::kSwizzleBytes;
    static constexpr uint32_t kBytes = kPanelBytes * Geo::kPanels;  // = ROWS * D * sizeof(T)
    // Tiles are placed at 1024-byte boundaries: the 128 B swizzle pattern repeats every 1024 bytes
    // and both TMA and the descriptors (base offset 0) assume a pattern-aligned start.
    static constexpr uint32_t kStride = (kBytes + 1023u) / 1024u * 1024u;
    static_assert(kPanelBytes % Geo::kAtomBytes == 0, "panels must start on a swizzle atom");
    static_assert((kPanelBytes >> 4) < (1u << 14) && (Geo::kAtomBytes >> 4) < (1u << 14),
                  "descriptor byte offsets are 14-bit fields in 16-byte units");

    // Byte offset of element (row, col) inside the tile, swizzle applied.
    __device__ __forceinline__ static uint32_t offset(int row, int col) {
        uint32_t const panel = static_cast<uint32_t>(col) / Geo::kPanelElems;
        uint32_t const in_line = (static_cast<uint32_t>(col) % Geo::kPanelElems) * Geo::kElemBytes;
        uint32_t const linear = panel * kPanelBytes + static_cast<uint32_t>(row) * Geo::kSwizzleBytes + in_line;
        constexpr uint32_t kMask = ((1u << Geo::kSwizzleBits) - 1u) << 4;
        return linear ^ ((linear >> 3) & kMask);
    }

    // K-major descriptor (Q as A, K as B of Q·K^T): rows [row0, row0 + 8m) and head-dim columns
    // [16 ks, 16 ks + 16). 8-line groups are one atom apart (stride byte offset); the leading
    // byte offset is unused by swizzled K-major layouts (set to 16 B, i.e. 1).
    __device__ __forceinline__ static uint64_t desc_k_major(uint32_t tile_addr, int row0, int ks) {
        uint32_t const panel = static_cast<uint32_t>(ks) / Geo::kKStepsPerPanel;
        uint32_t const in_line = (static_cast<uint32_t>(ks) % Geo::kKStepsPerPanel) * 32u;  // 16 elems
        uint32_t const addr = tile_addr + panel * kPanelBytes + static_cast<uint32_t>(row0) * Geo::kSwizzleBytes + in_line;
        return make_smem_desc(addr, 16u, Geo::kAtomBytes, Geo::kDescLayout);
    }

    // The same descriptors as a base plus a per-k-step increment. A descriptor's start-address
    // field (bits 0..13, address >> 4) never carries into the leading byte offset: the shared
    // window is 18 bits (SharedLayout static_asserts it), so adding a step's byte offset >> 4 to
    // the 64-bit descriptor of step 0 only changes that field. Built this way, an issue costs
    // one add per wgmma instead of rebuilding the bit fields from the address each k16 step.
    __device__ __forceinline__ static constexpr uint64_t k_major_step(int ks) {
        return ((static_cast<uint32_t>(ks) / Geo::kKStepsPerPanel) * kPanelBytes +
                (static_cast<uint32_t>(ks) % Geo::kKStepsPerPanel) * 32u) >> 4;
    }
    __device__ __forceinline__ static constexpr uint64_t mn_major_step(int ks) {
        return (static_cast<uint32_t>(ks) * 16u * Geo::kSwizzleBytes) >> 4;
    }

    // MN-major descriptor (V as B of P·V, imm-trans-b = 1): K = tile rows [16 ks, 16 ks + 16),
    // N = all D columns. The leading byte offset steps from one PW-wide panel to the next along
    // N; the stride byte offset steps from one 8-row group to the next along K.
    __device__ __forceinline__ static uint64_t desc_mn_major(uint32_t tile_addr, int ks) {
        uint32_t const addr = tile_addr + static_cast<uint32_t>(ks) * 16u * Geo::kSwizzleBytes;
        return make_smem_desc(addr, kPanelBytes, Geo::kAtomBytes, Geo::kDescLayout);
    }
};

// The dynamic shared-memory block of one CTA, in bytes from a 1024-aligned base:
//   Q      NUM_CONSUMER_WG slabs of 64 rows (slab w belongs to consumer warpgroup w)
//   K      STAGES tiles of BN rows
//   V      STAGES tiles of BN rows
//   mbarriers (8 bytes each): q_full, q_empty, v_fix, k_full[S], k_empty[S], v_full[S], v_empty[S],
//          tile_full[2], tile_empty[2]
//   tile slots: 2 x TileCoord (4 x int32), the decoded tiles the producer hands to the consumers
// plus 1024 bytes of slack to align the base at run time.
//
// src/cells.rs (`sm90_fwd_smem_bytes`) computes the same total; fwd.cuh static_asserts equality.
template <typename T, int D, int BM, int BN, int STAGES>
struct SharedLayout {
    using QSlab = SmemTile<T, D, 64>;
    using KVTile = SmemTile<T, D, BN>;
    static constexpr int kConsumerWGs = BM / 64;
    static_assert(BM % 64 == 0, "each consumer warpgroup owns 64 query rows");

    static constexpr uint32_t kQOffset = 0;
    static constexpr uint32_t kKOffset = kQOffset + kConsumerWGs * QSlab::kStride;
    static constexpr uint32_t kVOffset = kKOffset + STAGES * KVTile::kStride;
    static constexpr uint32_t kBarrierOffset = kVOffset + STAGES * KVTile::kStride;
    static constexpr int kNumBarriers = 3 + 4 * STAGES + 4;
    static constexpr uint32_t kTileSlotOffset = kBarrierOffset + 8u * kNumBarriers;
    static constexpr uint32_t kUsedBytes = kTileSlotOffset + 32u;  // 2 slots of one TileCoord
    static constexpr uint32_t kAlignSlack = 1024;
    static constexpr uint32_t kSmemBytes = kUsedBytes + kAlignSlack;
    static_assert(kSmemBytes <= 227u * 1024u, "the tile does not fit the 227 KB of shared memory of an H100/H200 CTA");
    static_assert(kUsedBytes + 1024u <= (1u << 18), "descriptor start addresses are 18-bit shared-window addresses");
    static_assert(kKOffset % 1024 == 0 && kVOffset % 1024 == 0 && kBarrierOffset % 8 == 0,
                  "tiles start on the swizzle period, mbarriers on 8 bytes");

    // Bytes each TMA transaction delivers (the expect-tx counts).
    static constexpr uint32_t kQBytes = kConsumerWGs * QSlab::kBytes;  // all slabs, one barrier
    static constexpr uint32_t kKVBytes = KVTile::kBytes;
};

}  // namespace fa::sm90
