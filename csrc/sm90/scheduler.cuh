// Work decomposition of the sm90 forward kernel: the persistent tile scheduler, the per-sequence
// lengths, and the range of KV blocks a query tile visits (causal / window / sink tokens).
//
// Producer and consumers evaluate exactly the same functions on the same params, so they agree
// on every tile, every block and every skipped tile without talking to each other.
#pragma once

#include <stdint.h>

#include "common/params.h"

namespace fa::sm90 {

__device__ __forceinline__ int ceil_div(int a, int b) { return (a + b - 1) / b; }

// One work tile: BM query rows of one (batch, head), and its split-KV part (0 unless
// p.num_splits > 1).
struct TileCoord {
    int m_block;
    int head;
    int batch;
    int split;
};

// Split-KV parts per (batch, head): each is a separate tile over a share of the KV blocks.
__device__ __forceinline__ int num_splits(const FaParams& p) { return p.num_splits > 1 ? p.num_splits : 1; }

// Persistent scheduler. Grid = min(#SMs, total tiles); CTA c starts with tile c. Then either
//   - static: CTA c takes tiles c, c + grid, c + 2 grid, ... (p.semaphore null: tiles of equal
//     length, where round-robin is balanced and costs nothing), or
//   - dynamic: each CTA's producer claims its next tile from the global counter p.semaphore
//     (atomicAdd), so tiles go, in the same order, to whichever CTA is free first. With causal
//     masks / windows / varlen, tile lengths vary by up to seqlen / BN blocks and round-robin
//     leaves some SMs with far more work (simulated on 132 SMs: 71-87% efficiency for causal at
//     d = 128-256, ~99% dynamic; measured on H100, causal 2k-16k: d = 256 +24-29%, d = 128
//     +7-13%, d = 64 +8-14% up to 8k).
//     The counter is 0 at launch and 0 again at exit: every processed tile is followed by one
//     claim, so a launch makes exactly `total` claims, and the CTA that draws the last one
//     (total - 1) resets it; no CTA claims after that. The launcher keeps one counter per stream
//     (launches on a stream run in order) instead of zeroing a fresh one per call.
// The producer decodes each tile index (coord) and hands the coordinate to the consumers through
// shared memory (TileFeed), so only its warp runs the divisions below.
//
// Order: (batch, head) pairs are cut into L2 sections of `section_hb` pairs (K and V within
// kL2Budget bytes; one wave's worth when tiles are of equal length, see section_hb); inside a
// section tiles run m-block by m-block, from the last m-block down (longest first: with a
// causal or right-bounded window the last query rows see the most keys), all pairs of the
// section for each m-block. So the CTAs that run at the same time share K/V in L2, and the short
// tiles come last.
//
// Stateless: everything is recomputed from the params (constant bank) when needed, so that no
// scheduler state stays live in registers through the consumers' main loop.
//
// kSplit (the `_split` kernels, src/split.rs): batch x p.num_splits is the batch dimension, each
// (batch, split) a tile of its own over a share of the KV blocks (TileWork, KvBlocks::part).
// The dense kernels are compiled without it: a run-time split test and divide at each tile's
// start cost the d = 64 tiles ~6% at 2k-8k (H200, 2026-12-03).
template <int BM, int KV_BYTES_PER_KEY, bool kSplit = false>
struct TileScheduler {
    // FA3's choice for H100's 50 MB L2 (8 MB: 3-8% slower under a causal mask at 4k-16k).
    static constexpr int kL2Budget = 32 << 20;

    __device__ __forceinline__ static int num_m_blocks(const FaParams& p) { return ceil_div(p.seqlen_q, BM); }
    // (batch, split, head) triples: the scheduler treats batch x splits as its batch dimension.
    __device__ __forceinline__ static int num_hb(const FaParams& p) {
        return kSplit ? p.num_heads * p.batch * num_splits(p) : p.num_heads * p.batch;
    }
    __device__ __forceinline__ static int total(const FaParams& p) { return num_m_blocks(p) * num_hb(p); }
    // (batch, head) pairs per L2 section.
    // - Tiles of equal length (static round-robin: no mask, dense): one wave's worth, the fewest
    //   pairs that give every CTA a tile (ceil(grid / m_blocks)), capped by the budget. The CTAs
    //   running together then share the K/V of as few pairs as possible, and each wave streams
    //   an even share of K/V from HBM instead of the first wave of a big section fetching all
    //   of it. Measured on H100 (bf16, no mask, vs budget-sized sections, whole-grid runs):
    //   +11-12% at 512 keys, +4-11% at 1k, +1-8% at 2k-16k (d = 128 MHA and d = 256); d = 64
    //   and GQA 32/8 within noise (-5% to +7%).
    // - Tiles of unequal length (dynamic: masks, varlen): as many pairs as fit the budget, so
    //   that longest-first holds over many waves and the last wave is short tiles. One-wave
    //   sections measured 4-13% slower under a causal mask at 1k-2k, and 8 MB sections 3-8%
    //   slower at 4k-16k.
    __device__ __forceinline__ static int section_hb(const FaParams& p) {
        int const num_hb = TileScheduler::num_hb(p);
        int section = (kL2Budget / KV_BYTES_PER_KEY) / (p.seqlen_k > 0 ? p.seqlen_k : 1);
        if (p.semaphore == nullptr) {
            int const wave = ceil_div(static_cast<int>(gridDim.x), num_m_blocks(p));
            section = wave < section ? wave : section;
        }
        section = section < 1 ? 1 : section;
        return section < num_hb ? section : (num_hb > 0 ? num_hb : 1);
    }

    __device__ __forceinline__ static int first() { return static_cast<int>(blockIdx.x); }
    __device__ __forceinline__ static bool valid(const FaParams& p, int t) { return t < total(p); }
    // Producer, one lane, once after starting each tile: claims a tile from the dynamic counter
    // (0 when static). The last claim of the launch puts the counter back to 0 for the next one.
    __device__ __forceinline__ static int claim(const FaParams& p) {
        if (p.semaphore == nullptr) return 0;
        int const claimed = atomicAdd(p.semaphore, 1);
        if (claimed == total(p) - 1) atomicExch(p.semaphore, 0);
        return claimed;
    }
    // The tile after t, given the claim made during t. Claim k (0, 1, ...) is tile grid + k: the
    // first grid tiles went to the CTAs' first() tiles.
    __device__ __forceinline__ static int next(const FaParams& p, int t, int claimed) {
        return (p.semaphore != nullptr ? claimed : t) + static_cast<int>(gridDim.x);
    }

    __device__ static TileCoord coord(const FaParams& p, int t) {
        int const m_blocks = num_m_blocks(p);
        int const num_hb = TileScheduler::num_hb(p);
        int const sec_hb = section_hb(p);
        int const section_tiles = sec_hb * m_blocks;
        int const section = t / section_tiles;
        int const in_section = t - section * section_tiles;
        int const hb0 = section * sec_hb;
        int const hb_here = num_hb - hb0 < sec_hb ? num_hb - hb0 : sec_hb;
        int const m_rank = in_section / hb_here;
        int const hb = hb0 + (in_section - m_rank * hb_here);
        int const batch_split = hb / p.num_heads;  // kSplit: batch * splits + split; else batch
        int const head = hb - batch_split * p.num_heads;
        if constexpr (kSplit) {
            int const splits = num_splits(p);
            int const batch = batch_split / splits;
            return TileCoord{m_blocks - 1 - m_rank, head, batch, batch_split - batch * splits};
        }
        return TileCoord{m_blocks - 1 - m_rank, head, batch_split, 0};
    }
};

// Lengths and row offsets of batch entry b (docs/semantics.md: sk_b honours seqused_k).
struct SeqInfo {
    int sq;         // query rows of this sequence
    int sk;         // keys of this sequence (seqused_k[b] when given)
    int q_row0;     // first row of the sequence in the TMA row coordinate (varlen: cu_seqlens_q[b])
    int k_row0;     // likewise for K/V
    int tma_batch;  // batch coordinate of the TMA boxes (dense: b; varlen: 0)
    int diag;       // query row i sits at key position i + diag (bottom-right: sk - sq)

    __device__ SeqInfo(const FaParams& p, int b) {
        if (p.flags & FA_FLAG_VARLEN) {
            q_row0 = p.cu_seqlens_q[b];
            sq = p.cu_seqlens_q[b + 1] - q_row0;
            k_row0 = p.cu_seqlens_k[b];
            sk = p.seqused_k != nullptr ? p.seqused_k[b] : p.cu_seqlens_k[b + 1] - k_row0;
            tma_batch = 0;
        } else {
            q_row0 = 0;
            sq = p.seqlen_q;
            k_row0 = 0;
            sk = p.seqused_k != nullptr ? p.seqused_k[b] : p.seqlen_k;
            tma_batch = b;
        }
        diag = p.causal_align == FA_ALIGN_BOTTOM_RIGHT ? sk - sq : 0;
    }
};

// The blocks of one warpgroup's rows that need the mask: n >= right_from (keys at or past the
// sequence end or the right bound of the first row) or n < left_below (keys before the left
// bound of the last row, sink blocks included). Two integers per tile instead of the bounds.
struct MaskSteps {
    int right_from;
    int left_below;

    __device__ __forceinline__ bool needs(int n) const { return n >= right_from || n < left_below; }
};

// The visibility rule of docs/semantics.md (applied by apply_mask, mask.cuh) with window bounds
// clamped per sequence so that no sum below overflows 32 bits (a bound beyond sq + sk keys is the
// same as no bound). Cheap to rebuild from the params wherever it is needed.
struct MaskBounds {
    int sk;
    int diag;
    int window_left;   // < 0: unbounded
    int window_right;  // < 0: unbounded
    int sink_tokens;   // keys j < sink_tokens ignore the left bound

    __device__ __forceinline__ MaskBounds(const FaParams& p, const SeqInfo& s) {
        int const cap = s.sq + s.sk;
        sk = s.sk;
        diag = s.diag;
        window_left = p.window_left < 0 ? -1 : (p.window_left < cap ? p.window_left : cap);
        window_right = p.window_right < 0 ? -1 : (p.window_right < cap ? p.window_right : cap);
        sink_tokens = p.sink_tokens < s.sk ? p.sink_tokens : s.sk;  // keys past sk do not exist
    }

    // End (exclusive) of the keys row i sees as far as the right bound and the sequence end go.
    __device__ __forceinline__ int key_end(int i) const {
        int right = sk;
        if (window_right >= 0) right = min(right, i + diag + window_right + 1);
        return right;
    }

    // Rows [row_first, row_last] against blocks of block_n keys: a block needs the mask iff some
    // (row, key) pair in it fails the rule.
    __device__ __forceinline__ MaskSteps steps(int row_first, int row_last, int block_n) const {
        int limit = sk;  // keys below `limit` are visible to every row as far as the right bound goes
        if (window_right >= 0) {
            int const r = row_first + diag + window_right + 1;
            limit = r < limit ? r : limit;
        }
        int left_below = 0;
        if (window_left >= 0) {
            int const first = row_last + diag - window_left;  // keys from `first` on pass the left bound
            left_below = first <= 0 ? 0 : ceil_div(first, block_n);
        }
        return MaskSteps{limit <= 0 ? 0 : limit / block_n, left_below};
    }
};

// The KV blocks a query tile visits, as one descending sequence:
//   window blocks  window_end - 1, ..., window_begin   (right bound / sequence end first: the
//                                                       masked blocks come first, FA's order)
//   then sink blocks sink_end - 1, ..., 0              (StreamingLLM sinks below the window)
// sink_end <= window_begin, so no block is visited twice.
template <int BM, int BN>
struct KvBlocks {
    int window_end;
    int window_begin;
    int sink_end;

    __device__ __forceinline__ int count() const { return window_end - window_begin + sink_end; }

    // k-th block of the sequence, k in [0, count()).
    __device__ __forceinline__ int block(int k) const {
        int const n_window = window_end - window_begin;
        return k < n_window ? window_end - 1 - k : sink_end - 1 - (k - n_window);
    }

    // With a right bound (mb.window_right >= 0): one past the last block any row up to row_last
    // sees through it (not capped by the sequence end).
    __device__ __forceinline__ static int right_end(const MaskBounds& mb, int row_last) {
        int const last_visible = row_last + mb.diag + mb.window_right;
        return last_visible < 0 ? 0 : last_visible / BN + 1;
    }

    // Rows [m_block * BM, min(m_block * BM + BM, sq)) with m_block * BM < sq.
    __device__ static KvBlocks make(const MaskBounds& mb, int sq, int m_block) {
        int const row_first = m_block * BM;
        int const row_last = (row_first + BM < sq ? row_first + BM : sq) - 1;
        int hi = ceil_div(mb.sk, BN);
        if (mb.window_right >= 0) {
            int const hi_window = right_end(mb, row_last);
            hi = hi_window < hi ? hi_window : hi;
        }
        int lo = 0;
        if (mb.window_left >= 0) {
            int const first_visible = row_first + mb.diag - mb.window_left;
            lo = first_visible > 0 ? first_visible / BN : 0;
        }
        lo = lo < hi ? lo : hi;
        int sink = 0;
        if (mb.window_left >= 0 && mb.sink_tokens > 0) {
            int const sink_blocks = ceil_div(mb.sink_tokens, BN);
            sink = sink_blocks < lo ? sink_blocks : lo;
        }
        return KvBlocks{hi, lo, sink};
    }

    // How many blocks at the start of the visiting order no row up to row_last sees (the
    // right bound: the causal diagonal or window_right); at most the window blocks.
    __device__ __forceinline__ int leading_hidden(const MaskBounds& mb, int row_last) const {
        if (mb.window_right < 0) return 0;
        int const n_window = window_end - window_begin;
        int const lead = window_end - right_end(mb, row_last);
        return lead <= 0 ? 0 : (lead < n_window ? lead : n_window);
    }

    // The sequence without its first n blocks (n <= the window blocks).
    __device__ __forceinline__ KvBlocks drop_leading(int n) const { return KvBlocks{window_end - n, window_begin, sink_end}; }

    // Part s of n (split-KV): the s-th of n equal shares of the window blocks (the last ones
    // shorter or empty); part 0 keeps the sink blocks, which lie below the window.
    __device__ __forceinline__ KvBlocks part(int s, int n) const {
        int const per = (window_end - window_begin + n - 1) / n;
        int const lo = window_begin + s * per < window_end ? window_begin + s * per : window_end;
        int const hi = lo + per < window_end ? lo + per : window_end;
        return KvBlocks{hi, lo, s == 0 ? sink_end : 0};
    }
};

// Everything both roles derive from a tile coordinate.
template <int BM, int BN>
struct TileWork {
    TileCoord coord;
    int head_k;
    SeqInfo seq;
    KvBlocks<BM, BN> blocks;

    // split: the tile is part c.split of p.num_splits (a `_split` kernel; a compile-time
    // constant at every call site).
    __device__ __forceinline__ TileWork(const FaParams& p, TileCoord c, bool split = false)
        : coord(c), head_k(c.head / (p.num_heads / p.num_heads_k)), seq(p, c.batch), blocks{0, 0, 0} {
        if (has_rows()) blocks = KvBlocks<BM, BN>::make(MaskBounds(p, seq), seq.sq, c.m_block);
        if (split && p.num_splits > 1) blocks = blocks.part(c.split, p.num_splits);
    }

    // Tiles past the end of a (shorter, varlen) sequence have no rows: nothing to do or write.
    __device__ __forceinline__ bool has_rows() const { return coord.m_block * BM < seq.sq; }
    __device__ __forceinline__ int row_first() const { return coord.m_block * BM; }
    // Last row (within the sequence) of consumer warpgroup wg's 64 rows, clipped to the
    // sequence end (below the warpgroup's first row when none of its rows is in the sequence).
    __device__ __forceinline__ int wg_last_row(int wg) const {
        int const last = row_first() + 64 * wg + 63;
        return seq.sq - 1 < last ? seq.sq - 1 : last;
    }
};

}  // namespace fa::sm90
