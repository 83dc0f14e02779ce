// Host-compiled (C) layout probe for FaParams (built by build.rs through the `cc` crate, linked
// into the library). `src/params.rs` compares these numbers with its `#[repr(C)]` mirror in a test,
// so the mirror is checked against what a real C++ compiler makes of params.h.
#include <stddef.h>
#include <stdint.h>

#include "params.h"

#define FA_FIELD(name) offsetof(FaParams, name),

// Every field, in declaration order. The Rust mirror lists the same names in the same order.
static const uint64_t kOffsets[] = {
    FA_FIELD(q) FA_FIELD(k) FA_FIELD(v) FA_FIELD(o) FA_FIELD(lse)
    FA_FIELD(cu_seqlens_q) FA_FIELD(cu_seqlens_k) FA_FIELD(seqused_k)
    FA_FIELD(alibi_slopes) FA_FIELD(sink_logits) FA_FIELD(block_table)
    FA_FIELD(dout) FA_FIELD(dq) FA_FIELD(dk) FA_FIELD(dv)
    FA_FIELD(dq_accum) FA_FIELD(dk_accum) FA_FIELD(dv_accum) FA_FIELD(softmax_d) FA_FIELD(dsink)
    FA_FIELD(semaphore) FA_FIELD(o_partial) FA_FIELD(lse_partial)
    FA_FIELD(q_batch_stride) FA_FIELD(q_row_stride) FA_FIELD(q_head_stride)
    FA_FIELD(k_batch_stride) FA_FIELD(k_row_stride) FA_FIELD(k_head_stride)
    FA_FIELD(v_batch_stride) FA_FIELD(v_row_stride) FA_FIELD(v_head_stride)
    FA_FIELD(o_batch_stride) FA_FIELD(o_row_stride) FA_FIELD(o_head_stride)
    FA_FIELD(do_batch_stride) FA_FIELD(do_row_stride) FA_FIELD(do_head_stride)
    FA_FIELD(dq_batch_stride) FA_FIELD(dq_row_stride) FA_FIELD(dq_head_stride)
    FA_FIELD(dk_batch_stride) FA_FIELD(dk_row_stride) FA_FIELD(dk_head_stride)
    FA_FIELD(dv_batch_stride) FA_FIELD(dv_row_stride) FA_FIELD(dv_head_stride)
    FA_FIELD(batch) FA_FIELD(seqlen_q) FA_FIELD(seqlen_k) FA_FIELD(num_heads) FA_FIELD(num_heads_k)
    FA_FIELD(head_dim) FA_FIELD(total_q) FA_FIELD(seqlen_q_rounded)
    FA_FIELD(window_left) FA_FIELD(window_right) FA_FIELD(causal_align) FA_FIELD(sink_tokens)
    FA_FIELD(alibi_batch_stride) FA_FIELD(page_size) FA_FIELD(block_table_batch_stride)
    FA_FIELD(num_splits) FA_FIELD(scale) FA_FIELD(scale_log2) FA_FIELD(softcap) FA_FIELD(flags)
};



// Writes up to `cap` field offsets into `out`; returns the number of fields.
size_t fa_params_layout(uint64_t* out, size_t cap) {
    const size_t n = sizeof(kOffsets) / sizeof(kOffsets[0]);
    for (size_t i = 0; i < n && i < cap; ++i) out[i] = kOffsets[i];
    return n;
}

size_t fa_params_size(void) { return sizeof(FaParams); }


