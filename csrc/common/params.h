// The one parameter block every kernel of this crate receives, by value, as its first argument.
//
// This header is the source of truth. `src/params.rs` is a checked mirror: the Rust side asserts
// its size and every field offset against `fa_params_layout()` (csrc/common/params_layout.cpp,
// compiled for the host by build.rs through the `cc` crate), and this header asserts the same
// numbers at compile time below, so the host compiler, nvcc and rustc all agree.
//
// Semantics of every field: docs/semantics.md. Sizes are run-time data; nothing here changes the
// shape of a kernel's loop (that is what a compiled cell is for).
//
// Rules for editing: keep 8-byte fields first, then 4-byte fields; append, never reorder; update
// FA_PARAMS_FIELDS in params_layout.cpp and the mirror in src/params.rs in the same change.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Values of FaParams::causal_align. The alignment places the diagonal of the mask: for a
// sequence with sq queries and sk keys, query row i sits at key position i + diag_offset where
// diag_offset = sk - sq (bottom-right, FlashAttention's convention) or 0 (top-left, PyTorch's
// `is_causal`). The same offset is used by the window bounds and by ALiBi.
#define FA_ALIGN_BOTTOM_RIGHT 0
#define FA_ALIGN_TOP_LEFT 1

// Bits of FaParams::flags.
#define FA_FLAG_VARLEN 0x1u         // cu_seqlens_q / cu_seqlens_k are set
#define FA_FLAG_DETERMINISTIC 0x2u  // backward: no order-dependent atomics
#define FA_FLAG_PAGED 0x4u          // K/V are addressed through block_table

typedef struct FaParams {
    // ---- device pointers (8 bytes each) ----------------------------------------------------
    const void* q;      // [b, sq, h, d]  or varlen [total_q, h, d]
    const void* k;      // [b, sk, hk, d] or varlen [total_k, hk, d] or paged [blocks, page, hk, d]
    const void* v;      // like k
    void* o;            // like q
    float* lse;         // [b, h, sq] or varlen [h, total_q]; natural log; may be null (fwd)
    const int32_t* cu_seqlens_q;  // [b + 1], null unless FA_FLAG_VARLEN
    const int32_t* cu_seqlens_k;  // [b + 1], null unless FA_FLAG_VARLEN
    const int32_t* seqused_k;     // [b] keys actually used per sequence (<= capacity); may be null
    const float* alibi_slopes;    // [h] or [b, h] (see alibi_batch_stride); null = no ALiBi
    const float* sink_logits;     // [h] learnable sink logits; null = none
    const int32_t* block_table;   // [b, max_blocks_per_seq]; null unless FA_FLAG_PAGED
    // backward only
    const void* dout;   // like o
    void* dq;           // like q
    void* dk;           // like k (dense or varlen)
    void* dv;           // like v
    float* dq_accum;    // fp32 workspace, see the backward kernels
    float* dk_accum;    // fp32 workspace (GQA reduction), may be null
    float* dv_accum;    // fp32 workspace (GQA reduction), may be null
    float* softmax_d;   // [b, h, sq_rounded] rowsum(dO * O)
    float* dsink;       // [h] gradient of the sink logits, fp32, accumulated; may be null
    int32_t* semaphore; // scheduling / determinism counters, may be null
    // split-KV partial results
    float* o_partial;   // [splits, b, h, sq, d] fp32
    float* lse_partial; // [splits, b, h, sq] fp32

    // ---- strides, in elements (8 bytes each) -------------------------------------------------
    // Dense: batch, row (sequence position), head. Varlen: batch stride unused (rows are global).
    // Paged K/V: batch stride = block stride, row stride = stride between slots of a page.
    int64_t q_batch_stride, q_row_stride, q_head_stride;
    int64_t k_batch_stride, k_row_stride, k_head_stride;
    int64_t v_batch_stride, v_row_stride, v_head_stride;
    int64_t o_batch_stride, o_row_stride, o_head_stride;
    int64_t do_batch_stride, do_row_stride, do_head_stride;
    int64_t dq_batch_stride, dq_row_stride, dq_head_stride;
    int64_t dk_batch_stride, dk_row_stride, dk_head_stride;
    int64_t dv_batch_stride, dv_row_stride, dv_head_stride;

    // ---- sizes (4 bytes each) ----------------------------------------------------------------
    int32_t batch;
    int32_t seqlen_q;       // dense: every sequence; varlen: max over the batch
    int32_t seqlen_k;       // dense: every sequence (capacity when seqused_k is set); varlen: max
    int32_t num_heads;      // h (query heads)
    int32_t num_heads_k;    // hk; h % hk == 0
    int32_t head_dim;       // d; equals the compiled cell's head dim for the fast kernels
    int32_t total_q;        // varlen: cu_seqlens_q[b]; dense: b * sq (LSE addressing)
    int32_t seqlen_q_rounded;  // sq rounded up to the backward's block (softmax_d / dq_accum rows)

    // ---- mask and score modifiers --------------------------------------------------------
    int32_t window_left;    // keys j >= i + diag - window_left are visible; < 0 = unbounded
    int32_t window_right;   // keys j <= i + diag + window_right are visible; < 0 = unbounded
    int32_t causal_align;   // FA_ALIGN_*
    int32_t sink_tokens;    // StreamingLLM: keys j < sink_tokens ignore the left window bound
    int32_t alibi_batch_stride;  // 0 for slopes [h], h for slopes [b, h]
    int32_t page_size;           // paged K/V: slots per page
    int32_t block_table_batch_stride;  // elements between rows of block_table
    int32_t num_splits;          // split-KV: number of KV splits (1 = none)
    float scale;            // softmax scale applied to q.k (default 1/sqrt(d))
    float scale_log2;       // scale * log2(e)
    float softcap;          // 0 = off; else s = softcap * tanh(s / softcap)
    uint32_t flags;         // FA_FLAG_*
} FaParams;

#ifdef __cplusplus
}  // extern "C"

// Compile-time layout pins. The Rust mirror asserts the same numbers (src/params.rs), and the
// host-compiled probe reports them at run time, so a change here that misses the mirror fails
// the build on one side and a test on the other.
#include <stddef.h>
static_assert(sizeof(void*) == 8, "the params block assumes 64-bit pointers");
static_assert(offsetof(FaParams, q) == 0, "FaParams layout changed: update src/params.rs");
static_assert(offsetof(FaParams, q_batch_stride) == 23 * 8,
              "FaParams pointer block changed: update src/params.rs");
static_assert(offsetof(FaParams, batch) == 47 * 8,
              "FaParams stride block changed: update src/params.rs");
static_assert(sizeof(FaParams) == 47 * 8 + 20 * 4, "FaParams size changed: update src/params.rs");
#endif
