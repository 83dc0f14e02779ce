//! The attention-state merge: `merge_states` and its kernel (csrc/merge/merge.cuh).

use crate::cells::{Cell, Direction, Family};
use crate::dispatch::{DISPATCH_TABLE, not_compiled};
use crate::error::{Error, Result};
use crate::fwd::{Span, check_alignment, check_buffer, check_device, check_disjoint};
use crate::runtime::{self, Geometry};
use crate::tensor::{AttnElement, Layout, Tensor, TensorMut};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::sync::Arc;

/// Most parts one [`merge_states`] call takes (`kMaxMergeParts` in csrc/merge/params.h).
pub const MAX_MERGE_PARTS: usize = 16;

/// Warps per thread block (`kMergeWarpsPerBlock` in csrc/merge/merge.cuh).
pub(crate) const WARPS_PER_BLOCK: usize = 8;

/// Rows one warp merges: 32 / the lanes per row, the smallest power of two >= head_dim / 8 (at
/// most 32); `lanes_per_row` in csrc/merge/merge.cuh.
pub(crate) fn rows_per_warp(head_dim: usize) -> usize {
    let mut lanes = 1;
    while lanes < 32 && lanes * 8 < head_dim {
        lanes *= 2;
    }
    32 / lanes
}

/// One partial attention result: its output and its LSE.
pub struct AttnState<'a, T> {
    /// `O_i`, `(batch, seqlen, heads, head_dim)`.
    pub out: Tensor<'a, T>,
    /// `LSE_i`, fp32 natural log, `(batch, heads, seqlen)` contiguous (what `flash_fwd` writes).
    pub lse: &'a dyn DevicePtr<f32>,
}

impl<'a, T> AttnState<'a, T> {
    /// A part from its output tensor and LSE buffer.
    pub fn new(out: Tensor<'a, T>, lse: &'a dyn DevicePtr<f32>) -> Self {
        AttnState { out, lse }
    }
}

/// The kernel's arguments; mirrors `MergeParams` in csrc/merge/params.h (8-byte fields only).
#[repr(C)]
#[derive(Clone, Copy)]
struct MergeParams {
    part_o: [u64; MAX_MERGE_PARTS],
    part_lse: [u64; MAX_MERGE_PARTS],
    part_stride: [[i64; 3]; MAX_MERGE_PARTS],
    out: u64,
    out_stride: [i64; 3],
    out_lse: u64,
    n_parts: i64,
    batch: i64,
    seqlen: i64,
    heads: i64,
    head_dim: i64,
}

const _: () = assert!(std::mem::size_of::<MergeParams>() == 8 * (MAX_MERGE_PARTS * 5 + 1 + 3 + 1 + 5));

fn strides(l: &Layout) -> [i64; 3] {
    // check_buffer has bounded every stride by i64::MAX / size_of::<T>().
    [l.batch_stride as i64, l.row_stride as i64, l.head_stride as i64]
}

fn same_shape(a: &Layout, b: &Layout) -> bool {
    (a.batch, a.seqlen, a.heads, a.head_dim) == (b.batch, b.seqlen, b.heads, b.head_dim)
}

/// Merges `parts` (1 to [`MAX_MERGE_PARTS`], all of `out`'s shape) into `out` and, when given,
/// `lse` (`(batch, heads, seqlen)` fp32, natural log).
///
/// Partial results `(O_i, LSE_i)` of the same queries over disjoint key
/// sets (split-KV decode, chunked prefill, ring / context-parallel attention, a KV cache split
/// across devices) combine into the result over the union of the keys:
///
/// ```text
/// m = max_i LSE_i,  w_i = exp(LSE_i - m),  Z = sum_i w_i
/// O = sum_i w_i O_i / Z,  LSE = m + ln Z
/// ```
///
/// Each part is what [`crate::flash_fwd`] writes for one key set: `O` as a `(batch, seqlen, heads,
/// head_dim)` tensor (any strides, last dim contiguous) and its fp32 natural-log LSE, `(batch,
/// heads, seqlen)` contiguous. Varlen results are merged as `batch = 1`, `seqlen = total` tokens
/// ([`crate::Layout::varlen`]); their `(heads, total)` LSE is then the same layout.
///
/// Conventions (the same as the forward's for fully masked rows):
/// - a part with `LSE_i = -inf` (no visible key) has weight 0 and its `O_i` is not read;
/// - a row whose parts are all `-inf` gets `O = 0` and `LSE = -inf`;
/// - a NaN LSE makes the row NaN;
/// - accumulation is fp32 in part order: results are bitwise reproducible.
///
/// Merging is associative up to rounding: merging the merged result of some parts with the rest
/// gives the same answer as merging all at once (within the output dtype's rounding), so more than
/// [`MAX_MERGE_PARTS`] parts can be merged in rounds.
///
/// The kernel is one small generic cell per dtype (`merge.fwd.f16`, `merge.fwd.bf16`: sm_80 and
/// sm_90 SASS and the compute_80 PTX image), built unless `FLASHATTN_AOT_FAMILIES` leaves out
/// `merge`. It reads every part once and writes the output once (memory bound).
///
/// Requirements, each checked with a typed error before anything is launched: the same shape for
/// every part and `out`; `head_dim` a multiple of 8; 16-byte aligned base addresses and strides
/// (as the fast forward kernels need); LSE buffers of at least `batch * heads * seqlen` elements;
/// every buffer on the stream's device; `out` and `lse` overlapping no input and each other
/// (merge into a fresh buffer, not in place).
pub fn merge_states<T: AttnElement>(
    stream: &Arc<CudaStream>,
    parts: &[AttnState<'_, T>],
    out: TensorMut<'_, T>,
    lse: Option<&mut CudaSlice<f32>>,
) -> Result<()> {
    runtime::ensure_driver()?;
    if parts.is_empty() || parts.len() > MAX_MERGE_PARTS {
        return Err(Error::InvalidArgument(format!(
            "merge_states takes 1 to {MAX_MERGE_PARTS} parts (got {}); merge more in rounds",
            parts.len()
        )));
    }
    if T::DTYPE.is_fp8() {
        return Err(Error::InvalidArgument(
            "merge_states: fp8 outputs are not supported (merge f16 or bf16 states)".into(),
        ));
    }
    let shape = out.layout;
    for (i, p) in parts.iter().enumerate() {
        if !same_shape(&p.out.layout, &shape) {
            return Err(Error::ShapeMismatch(format!(
                "merge part {i} is (b, s, h, d) = ({}, {}, {}, {}) but out is ({}, {}, {}, {})",
                p.out.layout.batch,
                p.out.layout.seqlen,
                p.out.layout.heads,
                p.out.layout.head_dim,
                shape.batch,
                shape.seqlen,
                shape.heads,
                shape.head_dim
            )));
        }
    }
    if shape.head_dim % 8 != 0 {
        return Err(Error::Misaligned {
            tensor: "out",
            what: "head dim",
            required: 8,
            got: shape.head_dim,
        });
    }
    let rows = shape
        .batch
        .checked_mul(shape.seqlen)
        .and_then(|x| x.checked_mul(shape.heads))
        .ok_or(Error::TooLarge {
            what: "batch * seqlen * heads",
            value: usize::MAX,
            limit: i64::MAX as usize,
        })?;
    let rows_per_block = WARPS_PER_BLOCK * rows_per_warp(shape.head_dim);
    let blocks = rows.div_ceil(rows_per_block);
    if blocks > i32::MAX as usize {
        return Err(Error::TooLarge {
            what: "batch * seqlen * heads",
            value: rows,
            limit: i32::MAX as usize * rows_per_block,
        });
    }
    let lse_len = rows;

    // Buffers: lengths and devices.
    for p in parts {
        check_buffer::<T>("merge part out", p.out.data.len(), &p.out.layout)?;
        if p.lse.len() < lse_len {
            return Err(Error::BufferTooSmall {
                tensor: "merge part lse",
                needed: lse_len,
                len: p.lse.len(),
            });
        }
        check_device("merge part out", p.out.data.stream(), stream)?;
        check_device("merge part lse", p.lse.stream(), stream)?;
    }
    check_buffer::<T>("out", out.data.len(), &out.layout)?;
    check_device("out", out.data.stream(), stream)?;
    if let Some(l) = &lse {
        if l.len() < lse_len {
            return Err(Error::BufferTooSmall {
                tensor: "lse",
                needed: lse_len,
                len: l.len(),
            });
        }
        check_device("lse", l.stream(), stream)?;
    }

    // Kernel.
    let info = runtime::device_info(stream)?;
    let cell = Cell {
        family: Family::Merge,
        direction: Direction::Fwd,
        dtype: T::DTYPE,
        head_dim: 0,
    };
    let (index, image, jit_ptx) = DISPATCH_TABLE
        .serve(&cell, info.arch)
        .ok_or_else(|| not_compiled(&cell, info.arch))?;
    let entry = image.kernels.first().ok_or_else(|| not_compiled(&cell, info.arch))?;
    let function = runtime::function(stream, index, jit_ptx, entry.symbol, 0)?;

    // Device pointers, held with their guards until the launch is enqueued.
    let elem = std::mem::size_of::<T>() as u64;
    let mut guards = Vec::with_capacity(2 * parts.len());
    let mut spans = Vec::with_capacity(2 * parts.len() + 2);
    let mut params = MergeParams {
        part_o: [0; MAX_MERGE_PARTS],
        part_lse: [0; MAX_MERGE_PARTS],
        part_stride: [[0; 3]; MAX_MERGE_PARTS],
        out: 0,
        out_stride: strides(&out.layout),
        out_lse: 0,
        n_parts: parts.len() as i64,
        batch: shape.batch as i64,
        seqlen: shape.seqlen as i64,
        heads: shape.heads as i64,
        head_dim: shape.head_dim as i64,
    };
    for (i, p) in parts.iter().enumerate() {
        let (o_ptr, g_o) = p.out.data.device_ptr(stream);
        let (l_ptr, g_l) = p.lse.device_ptr(stream);
        check_alignment::<T>("merge part out", o_ptr, &p.out.layout)?;
        params.part_o[i] = o_ptr;
        params.part_lse[i] = l_ptr;
        params.part_stride[i] = strides(&p.out.layout);
        spans.push(Span::new("merge part out", o_ptr, p.out.data.len() as u64 * elem));
        spans.push(Span::new("merge part lse", l_ptr, p.lse.len() as u64 * 4));
        guards.push(g_o);
        guards.push(g_l);
    }
    let out_len = out.data.len();
    let out_layout = out.layout;
    let (o_ptr, _g_o) = out.data.device_ptr_mut(stream);
    check_alignment::<T>("out", o_ptr, &out_layout)?;
    params.out = o_ptr;
    let mut outputs = vec![Span::new("out", o_ptr, out_len as u64 * elem)];
    let (lse_ptr, _g_lse) = match lse {
        Some(l) => {
            let len = l.len();
            let (ptr, g) = l.device_ptr_mut(stream);
            outputs.push(Span::new("lse", ptr, len as u64 * 4));
            (ptr, Some(g))
        }
        None => (0, None),
    };
    params.out_lse = lse_ptr;
    spans.extend_from_slice(&outputs);
    check_disjoint(&outputs, &spans)?;

    let geom = Geometry {
        grid: (blocks as u32, 1, 1),
        block: (32 * WARPS_PER_BLOCK) as u32,
        smem_bytes: 0,
    };
    let mut args = [&mut params as *mut MergeParams as *mut c_void];
    // SAFETY: merge kernels take exactly one `MergeParams` by value (same layout, asserted on both
    // sides); every pointer in it was checked against its layout and buffer length, and its guard
    // lives until this returns.
    unsafe { runtime::launch(function, geom, stream, &mut args) }
}
