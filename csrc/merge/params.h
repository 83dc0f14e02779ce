// Kernel arguments of the state merge (csrc/merge/merge.cuh), mirrored by `MergeParams` in
// src/merge.rs. Every field is 8 bytes wide, so the C and Rust layouts agree without padding
// rules; both sides assert the size.
#pragma once

#include <stdint.h>

#define kMaxMergeParts 16

struct MergeParams {
    const void* part_o[kMaxMergeParts];      // O of part i (T), (b, s, h, d) with part_stride[i]
    const float* part_lse[kMaxMergeParts];   // LSE of part i, (b, h, s) contiguous, natural log
    int64_t part_stride[kMaxMergeParts][3];  // batch, row, head strides of part i (elements)
    void* out;                               // merged O (T), (b, s, h, d) with out_stride
    int64_t out_stride[3];
    float* out_lse;                          // merged LSE or null, (b, h, s) contiguous
    int64_t n_parts;                         // 1 .. kMaxMergeParts
    int64_t batch;
    int64_t seqlen;
    int64_t heads;
    int64_t head_dim;                        // a multiple of 8
};

#ifdef __cplusplus
static_assert(sizeof(MergeParams) == 8 * (kMaxMergeParts * 5 + 1 + 3 + 1 + 5), "MergeParams: 8-byte fields only");
#endif

// Kernel arguments of the split-KV combine (FA_MERGE_KERNEL's NAME_split), mirrored by
// `MergeSplitParams` in src/fwd.rs. The parts are what a split sm80 forward wrote (csrc/sm80/fwd.cuh):
// fp32 O and LSE of part i for row r = (b * heads + h) * seqlen + s at index i * rows + r, with
// rows = batch * heads * seqlen (O rows of head_dim floats).
struct MergeSplitParams {
    const float* o_partial;    // [n_splits, batch, heads, seqlen, head_dim]
    const float* lse_partial;  // [n_splits, batch, heads, seqlen], natural log
    const float* sink_logits;  // [heads] learnable sink logits or null
    void* out;                 // O (T), (b, s, h, d) with out_stride
    int64_t out_stride[3];
    float* out_lse;            // LSE or null, (b, h, s) contiguous
    int64_t n_splits;          // >= 1
    int64_t batch;
    int64_t seqlen;
    int64_t heads;
    int64_t head_dim;          // a multiple of 8
};

#ifdef __cplusplus
static_assert(sizeof(MergeSplitParams) == 8 * 13, "MergeSplitParams: 8-byte fields only");
#endif
