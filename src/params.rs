//! `#[repr(C)]` mirror of `FaParams` (csrc/common/params.h), passed by value to every kernel.
//!
//! Why a checked mirror and not bindgen: bindgen needs libclang at build time, which most
//! machines that build this crate (CI included) do not have, for one plain struct. Instead the
//! header is compiled by the host C compiler (build.rs, `cc` crate) into a layout probe, and the
//! `layout_matches_c` test compares every field offset and the size; the header itself
//! `static_assert`s the block boundaries for nvcc, and `const` asserts below pin them for rustc.

use std::ffi::c_void;
use std::mem::offset_of;

/// `FA_ALIGN_BOTTOM_RIGHT`.
pub(crate) const ALIGN_BOTTOM_RIGHT: i32 = 0;
/// `FA_ALIGN_TOP_LEFT`.
pub(crate) const ALIGN_TOP_LEFT: i32 = 1;
/// `FA_FLAG_VARLEN`.
pub(crate) const FLAG_VARLEN: u32 = 0x1;
/// `FA_FLAG_DETERMINISTIC`.
#[allow(dead_code)]
pub(crate) const FLAG_DETERMINISTIC: u32 = 0x2;
/// `FA_FLAG_PAGED`.
#[allow(dead_code)]
pub(crate) const FLAG_PAGED: u32 = 0x4;

/// The kernels' parameter block. Field meanings: csrc/common/params.h and docs/semantics.md.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct FaParams {
    pub q: *const c_void,
    pub k: *const c_void,
    pub v: *const c_void,
    pub o: *mut c_void,
    pub lse: *mut f32,
    pub cu_seqlens_q: *const i32,
    pub cu_seqlens_k: *const i32,
    pub seqused_k: *const i32,
    pub alibi_slopes: *const f32,
    pub sink_logits: *const f32,
    pub block_table: *const i32,
    pub dout: *const c_void,
    pub dq: *mut c_void,
    pub dk: *mut c_void,
    pub dv: *mut c_void,
    pub dq_accum: *mut f32,
    pub dk_accum: *mut f32,
    pub dv_accum: *mut f32,
    pub softmax_d: *mut f32,
    pub dsink: *mut f32,
    pub semaphore: *mut i32,
    pub o_partial: *mut f32,
    pub lse_partial: *mut f32,

    pub q_batch_stride: i64,
    pub q_row_stride: i64,
    pub q_head_stride: i64,
    pub k_batch_stride: i64,
    pub k_row_stride: i64,
    pub k_head_stride: i64,
    pub v_batch_stride: i64,
    pub v_row_stride: i64,
    pub v_head_stride: i64,
    pub o_batch_stride: i64,
    pub o_row_stride: i64,
    pub o_head_stride: i64,
    pub do_batch_stride: i64,
    pub do_row_stride: i64,
    pub do_head_stride: i64,
    pub dq_batch_stride: i64,
    pub dq_row_stride: i64,
    pub dq_head_stride: i64,
    pub dk_batch_stride: i64,
    pub dk_row_stride: i64,
    pub dk_head_stride: i64,
    pub dv_batch_stride: i64,
    pub dv_row_stride: i64,
    pub dv_head_stride: i64,

    pub batch: i32,
    pub seqlen_q: i32,
    pub seqlen_k: i32,
    pub num_heads: i32,
    pub num_heads_k: i32,
    pub head_dim: i32,
    pub total_q: i32,
    pub seqlen_q_rounded: i32,

    pub window_left: i32,
    pub window_right: i32,
    pub causal_align: i32,
    pub sink_tokens: i32,
    pub alibi_batch_stride: i32,
    pub page_size: i32,
    pub block_table_batch_stride: i32,
    pub num_splits: i32,
    pub scale: f32,
    pub scale_log2: f32,
    pub softcap: f32,
    pub flags: u32,
}

// Pins shared with the `static_assert`s in params.h.
const _: () = assert!(offset_of!(FaParams, q_batch_stride) == 23 * 8);
const _: () = assert!(offset_of!(FaParams, batch) == 47 * 8);
const _: () = assert!(std::mem::size_of::<FaParams>() == 47 * 8 + 20 * 4);

impl Default for FaParams {
    fn default() -> Self {
        // SAFETY: every field is a raw pointer, integer or float, for which all-zero bytes are a
        // valid value (null pointers, zero sizes).
        unsafe { std::mem::zeroed() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    unsafe extern "C" {
        fn fa_params_layout(out: *mut u64, cap: usize) -> usize;
        fn fa_params_size() -> usize;
    }

    /// Field offsets of the mirror, in declaration order (the probe lists the same fields).
    fn rust_offsets() -> Vec<usize> {
        macro_rules! offs { ($($f:ident),* $(,)?) => { vec![$(offset_of!(FaParams, $f)),*] }; }
        offs!(
            q,
            k,
            v,
            o,
            lse,
            cu_seqlens_q,
            cu_seqlens_k,
            seqused_k,
            alibi_slopes,
            sink_logits,
            block_table,
            dout,
            dq,
            dk,
            dv,
            dq_accum,
            dk_accum,
            dv_accum,
            softmax_d,
            dsink,
            semaphore,
            o_partial,
            lse_partial,
            q_batch_stride,
            q_row_stride,
            q_head_stride,
            k_batch_stride,
            k_row_stride,
            k_head_stride,
            v_batch_stride,
            v_row_stride,
            v_head_stride,
            o_batch_stride,
            o_row_stride,
            o_head_stride,
            do_batch_stride,
            do_row_stride,
            do_head_stride,
            dq_batch_stride,
            dq_row_stride,
            dq_head_stride,
            dk_batch_stride,
            dk_row_stride,
            dk_head_stride,
            dv_batch_stride,
            dv_row_stride,
            dv_head_stride,
            batch,
            seqlen_q,
            seqlen_k,
            num_heads,
            num_heads_k,
            head_dim,
            total_q,
            seqlen_q_rounded,
            window_left,
            window_right,
            causal_align,
            sink_tokens,
            alibi_batch_stride,
            page_size,
            block_table_batch_stride,
            num_splits,
            scale,
            scale_log2,
            softcap,
            flags,
        )
    }

    #[test]
    fn layout_matches_c() {
        let mut c = vec![0u64; 128];
        // SAFETY: the probe writes at most `cap` entries into the buffer it is given.
        let n = unsafe { fa_params_layout(c.as_mut_ptr(), c.len()) };
        let rust = rust_offsets();
        assert_eq!(n, rust.len(), "field count differs between params.h and src/params.rs");
        for (i, (&c_off, &r_off)) in c[..n].iter().zip(&rust).enumerate() {
            assert_eq!(
                c_off as usize, r_off,
                "offset of field #{i} differs (C {c_off}, Rust {r_off})"
            );
        }
        // SAFETY: a plain function returning sizeof.
        assert_eq!(unsafe { fa_params_size() }, std::mem::size_of::<FaParams>());
        assert_eq!(std::mem::align_of::<FaParams>(), 8);
    }
}
