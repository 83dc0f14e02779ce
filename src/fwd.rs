//! The forward pass: `flash_fwd`, `flash_fwd_varlen`, and the shared path the GPU reference uses.
//!
//! Order of work in [`run_fwd`]: check shapes, options and buffers (typed errors, nothing
//! launched), resolve the kernel, choose the tile that fits the device, fill the params block,
//! launch while holding cudarc's pointer guards.

use crate::cells::{Cell, Direction, Family, HEAD_DIMS};
use crate::dispatch::{DISPATCH_TABLE, DispatchKey, KernelRef, not_compiled};
use crate::error::{Error, Result};
use crate::kernels::KernelEntry;
use crate::options::{Alibi, CausalAlign, FwdOptions};
use crate::params::{ALIGN_BOTTOM_RIGHT, ALIGN_TOP_LEFT, FLAG_VARLEN, FaParams};
use crate::runtime::{self, Geometry};
use crate::split::Split;
use crate::tensor::{AttnElement, Layout, Tensor, TensorMut};
use crate::varlen::VarlenSeqlens;
use cudarc::driver::sys::CUstreamCaptureStatus;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// The tensors of a forward call.
pub struct FwdTensors<'a, T> {
    /// Queries `(batch, seqlen_q, heads, head_dim)` (varlen: `(total_q, heads, head_dim)`).
    pub q: Tensor<'a, T>,
    /// Keys `(batch, seqlen_k, heads_k, head_dim)` (varlen: `(total_k, heads_k, head_dim)`).
    pub k: Tensor<'a, T>,
    /// Values, shaped like `k`.
    pub v: Tensor<'a, T>,
    /// Output, shaped like `q`.
    pub out: TensorMut<'a, T>,
    /// Optional log-sum-exp output, fp32, natural log: `(batch, heads, seqlen_q)` contiguous, or
    /// `(heads, total_q)` for varlen.
    pub lse: Option<&'a mut dyn DevicePtrMut<f32>>,
}

/// Which kernel ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdInfo {
    /// Cell key, e.g. `sm80.fwd.bf16.hd128`.
    pub cell: &'static str,
    /// Kernel symbol (tile variant).
    pub symbol: &'static str,
    /// Set when the device's preferred family lacked the cell and this family served it.
    pub routed_from: Option<Family>,
    /// True when the kernel was JIT-compiled from compute_80 PTX by the driver.
    pub jit_ptx: bool,
    /// Split-KV parts the call ran with (1 = not split; see [`crate::FwdOptions::num_splits`]).
    pub num_splits: usize,
}

/// Which implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Impl {
    /// The fast kernels.
    Flash,
    /// The naive GPU reference.
    Reference,
}

/// Attention forward on dense `(batch, seqlen, heads, head_dim)` tensors.
///
/// Writes `out` (and `lse` when given). Every shape, stride, buffer length, alignment, option
/// and device is checked first; on error nothing is launched. Enqueued on `stream`; returns
/// which kernel ran.
pub fn flash_fwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    opts: &FwdOptions<'_>,
) -> Result<FwdInfo> {
    let (t, opts) = swap_decode_groups(t, opts);
    run_fwd(stream, t, None, &opts, Impl::Flash)
}

/// A decode step's GQA heads as query rows (FlashAttention's `seqlenq_ngroups_swapped`).
///
/// With one query per sequence that sees every key (no mask, or a right bound with bottom-right
/// alignment: the query sits at the last key), no ALiBi and no sink logits, the `heads / heads_k`
/// query heads that share a KV head are `G` query rows of one head: `q` and `out` `(b, 1, h, d)`
/// are re-strided as `(b, G, heads_k, d)` (row stride = head stride, head stride = G x head
/// stride; the same memory), the LSE `(b, h, 1)` is `(b, heads_k, G)` as it stands, and the mask
/// is dropped (it hides nothing). The kernels then run `b x heads_k` query blocks of G rows
/// instead of `b x h` blocks of one row: G times less work (their query tiles are 64-192 rows)
/// and each K/V block is read once per KV head. Anything else is returned unchanged.
pub(crate) fn swap_decode_groups<'a, 'o, T>(
    t: FwdTensors<'a, T>,
    opts: &FwdOptions<'o>,
) -> (FwdTensors<'a, T>, FwdOptions<'o>) {
    let (q, k, o) = (t.q.layout, t.k.layout, t.out.layout);
    let (left, right, align) = opts.mask.bounds();
    let sees_all = left.is_none() && (right.is_none() || align == CausalAlign::BottomRight);
    let swap = q.seqlen == 1
        && k.heads > 0
        && q.heads > k.heads
        && q.heads % k.heads == 0
        && (o.batch, o.seqlen, o.heads, o.head_dim) == (q.batch, q.seqlen, q.heads, q.head_dim)
        && sees_all
        && opts.sink_tokens == 0
        && opts.alibi.is_none()
        && opts.sink_logits.is_none();
    if !swap {
        return (t, *opts);
    }
    let g = q.heads / k.heads;
    let rows = |l: Layout| Layout {
        batch: l.batch,
        seqlen: g,
        heads: k.heads,
        head_dim: l.head_dim,
        batch_stride: l.batch_stride,
        row_stride: l.head_stride,
        head_stride: g * l.head_stride,
    };
    let FwdTensors {
        q: tq,
        k: tk,
        v: tv,
        out: to,
        lse,
    } = t;
    let swapped = FwdTensors {
        q: Tensor::new(tq.data, rows(q)),
        k: tk,
        v: tv,
        out: TensorMut::new(to.data, rows(o)),
        lse,
    };
    (swapped, opts.mask(crate::options::Mask::None))
}

/// Attention forward on variable-length batches packed as `(total, heads, head_dim)`
/// ([`Layout::varlen`]), with sequence boundaries from `seqlens`.
pub fn flash_fwd_varlen<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    seqlens: &VarlenSeqlens,
    opts: &FwdOptions<'_>,
) -> Result<FwdInfo> {
    run_fwd(stream, t, Some(seqlens), opts, Impl::Flash)
}

/// Sizes after shape validation.
pub(crate) struct Dims {
    pub batch: usize,
    /// Dense: every sequence; varlen: the longest.
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    pub heads: usize,
    pub heads_k: usize,
    pub head_dim: usize,
    pub total_q: usize,
}

pub(crate) fn check_shapes(
    q: &Layout,
    k: &Layout,
    v: &Layout,
    o: &Layout,
    seqlens: Option<&VarlenSeqlens>,
    imp: Impl,
) -> Result<Dims> {
    let d = q.head_dim;
    if k.head_dim != d || v.head_dim != d || o.head_dim != d {
        return Err(Error::ShapeMismatch(format!(
            "head dims differ: q {d}, k {}, v {}, out {}",
            k.head_dim, v.head_dim, o.head_dim
        )));
    }
    if (o.batch, o.seqlen, o.heads) != (q.batch, q.seqlen, q.heads) {
        return Err(Error::ShapeMismatch(format!(
            "out is ({}, {}, {}, {d}) but q is ({}, {}, {}, {d})",
            o.batch, o.seqlen, o.heads, q.batch, q.seqlen, q.heads
        )));
    }
    if (v.batch, v.seqlen, v.heads) != (k.batch, k.seqlen, k.heads) {
        return Err(Error::ShapeMismatch(format!(
            "v is ({}, {}, {}, {d}) but k is ({}, {}, {}, {d})",
            v.batch, v.seqlen, v.heads, k.batch, k.seqlen, k.heads
        )));
    }
    if q.batch != k.batch {
        return Err(Error::ShapeMismatch(format!(
            "batch of q ({}) and k ({}) differ",
            q.batch, k.batch
        )));
    }
    if k.heads == 0 || q.heads % k.heads != 0 {
        return Err(Error::ShapeMismatch(format!(
            "number of k/v heads {} must divide number of heads in query {}",
            k.heads, q.heads
        )));
    }
    match imp {
        Impl::Flash if !HEAD_DIMS.contains(&(d as u32)) => {
            return Err(Error::UnsupportedHeadDim {
                head_dim: d as u32,
                supported: "64, 80, 96, 128, 192, 256",
            });
        }
        Impl::Reference if d == 0 || d > 256 => {
            return Err(Error::UnsupportedHeadDim {
                head_dim: d as u32,
                supported: "1..=256 (reference)",
            });
        }
        _ => {}
    }
    let dims = match seqlens {
        None => Dims {
            batch: q.batch,
            seqlen_q: q.seqlen,
            seqlen_k: k.seqlen,
            heads: q.heads,
            heads_k: k.heads,
            head_dim: d,
            total_q: q.batch * q.seqlen,
        },
        Some(s) => {
            if q.batch != 1 {
                return Err(Error::ShapeMismatch(format!(
                    "varlen tensors are (total, heads, head_dim) (Layout::varlen), got batch {}",
                    q.batch
                )));
            }
            if q.seqlen != s.total_q() || k.seqlen != s.total_k() {
                return Err(Error::ShapeMismatch(format!(
                    "varlen q has {} rows and k {} rows, but cu_seqlens say {} and {}",
                    q.seqlen,
                    k.seqlen,
                    s.total_q(),
                    s.total_k()
                )));
            }
            Dims {
                batch: s.batch(),
                seqlen_q: s.max_seqlen_q(),
                seqlen_k: s.max_seqlen_k(),
                heads: q.heads,
                heads_k: k.heads,
                head_dim: d,
                total_q: s.total_q(),
            }
        }
    };
    let limit = i32::MAX as usize;
    for (what, value) in [
        ("batch", dims.batch),
        ("seqlen_q", q.seqlen),
        ("seqlen_k", k.seqlen),
        ("heads", dims.heads),
        ("total_q * heads", dims.total_q.saturating_mul(dims.heads)),
    ] {
        if value > limit {
            return Err(Error::TooLarge { what, value, limit });
        }
    }
    Ok(dims)
}

pub(crate) fn check_buffer<T>(name: &'static str, len: usize, layout: &Layout) -> Result<()> {
    let needed = layout.extent().ok_or(Error::TooLarge {
        what: "tensor extent",
        value: usize::MAX,
        limit: usize::MAX,
    })?;
    if needed > len {
        return Err(Error::BufferTooSmall {
            tensor: name,
            needed,
            len,
        });
    }
    for stride in [layout.batch_stride, layout.row_stride, layout.head_stride] {
        if stride > i64::MAX as usize / std::mem::size_of::<T>().max(1) {
            return Err(Error::TooLarge {
                what: "stride",
                value: stride,
                limit: i64::MAX as usize,
            });
        }
    }
    Ok(())
}

/// The fast kernels load rows with 16-byte vector copies.
pub(crate) fn check_alignment<T>(name: &'static str, ptr: u64, layout: &Layout) -> Result<()> {
    let elem = std::mem::size_of::<T>();
    if ptr % 16 != 0 {
        return Err(Error::Misaligned {
            tensor: name,
            what: "base address (bytes)",
            required: 16,
            got: (ptr % 16) as usize,
        });
    }
    let per16 = 16 / elem;
    for (what, stride, used) in [
        ("batch stride", layout.batch_stride, layout.batch > 1),
        ("row stride", layout.row_stride, layout.seqlen > 1),
        ("head stride", layout.head_stride, layout.heads > 1),
    ] {
        if used && stride % per16 != 0 {
            return Err(Error::Misaligned {
                tensor: name,
                what,
                required: per16,
                got: stride,
            });
        }
    }
    Ok(())
}

pub(crate) fn check_device(name: &'static str, buf_stream: &CudaStream, stream: &CudaStream) -> Result<()> {
    if buf_stream.context().cu_ctx() != stream.context().cu_ctx() {
        return Err(Error::DeviceMismatch {
            tensor: name,
            buffer_device: buf_stream.context().ordinal(),
            stream_device: stream.context().ordinal(),
        });
    }
    Ok(())
}

/// Byte range of a tensor in device memory.
#[derive(Clone, Copy)]
pub(crate) struct Span {
    name: &'static str,
    start: u64,
    end: u64,
}

impl Span {
    /// `bytes` bytes from `start`.
    pub(crate) fn new(name: &'static str, start: u64, bytes: u64) -> Span {
        Span {
            name,
            start,
            end: start + bytes,
        }
    }
}

pub(crate) fn check_disjoint(outputs: &[Span], all: &[Span]) -> Result<()> {
    for o in outputs {
        for a in all {
            if o.name != a.name && o.start < a.end && a.start < o.end {
                return Err(Error::Aliasing { a: o.name, b: a.name });
            }
        }
    }
    Ok(())
}

fn i32_bound(what: &'static str, v: Option<u32>) -> Result<i32> {
    match v {
        None => Ok(-1),
        Some(x) if x <= i32::MAX as u32 => Ok(x as i32),
        Some(x) => Err(Error::TooLarge {
            what,
            value: x as usize,
            limit: i32::MAX as usize,
        }),
    }
}

/// The tile variant to run: `variant` when given (it must fit), else the first whose shared
/// memory fits `limit`.
pub(crate) fn choose_tile(kref: &KernelRef, limit: u32, variant: Option<usize>) -> Result<&'static KernelEntry> {
    choose_tile_in(kref.image.kernels, kref.key(), "", limit, variant)
}

/// [`choose_tile`] over one of a cell's kernel lists (`kind` names it in errors, e.g. `"paged "`).
pub(crate) fn choose_tile_in(
    kernels: &'static [KernelEntry],
    key: &str,
    kind: &str,
    limit: u32,
    variant: Option<usize>,
) -> Result<&'static KernelEntry> {
    let found = match variant {
        Some(i) => kernels.get(i).filter(|k| k.smem_bytes <= limit),
        None => kernels.iter().find(|k| k.smem_bytes <= limit),
    };
    found.ok_or_else(|| Error::NoKernel {
        what: match variant {
            Some(i) => format!("{key}: {kind}tile variant {i} does not exist or does not fit {limit} bytes"),
            None => format!("{key}: no {kind}tile variant fits {limit} bytes of shared memory"),
        },
    })
}

/// Whether the launch runs the cell's compute_80 PTX (driver JIT): the device needs it or the
/// caller forces it; an error when the image was built without it.
pub(crate) fn uses_ptx(kref: &KernelRef, force_ptx: bool) -> Result<bool> {
    let jit_ptx = kref.jit_ptx || force_ptx;
    if jit_ptx && kref.image.ptx.is_none() {
        return Err(Error::CellNotCompiled {
            cell: kref.key().to_string(),
            knobs: crate::kernels::BUILD_KNOBS,
            hint: "its compute_80 PTX image is needed; build with the `ptx-jit` feature".into(),
        });
    }
    Ok(jit_ptx)
}

/// The checks every forward entry point makes on its tensors before any launch: buffer lengths
/// against the layouts (q, k, v, out), the LSE buffer's length (`lse_len` floats), and that
/// every buffer lives on the stream's device.
pub(crate) fn check_fwd_buffers<T>(
    stream: &CudaStream,
    q: &Tensor<'_, T>,
    k: &Tensor<'_, T>,
    v: &Tensor<'_, T>,
    out: &TensorMut<'_, T>,
    lse: Option<&dyn DevicePtrMut<f32>>,
    lse_len: usize,
) -> Result<()> {
    check_buffer::<T>("q", q.data.len(), &q.layout)?;
    check_buffer::<T>("k", k.data.len(), &k.layout)?;
    check_buffer::<T>("v", v.data.len(), &v.layout)?;
    check_buffer::<T>("out", out.data.len(), &out.layout)?;
    if let Some(l) = lse {
        if l.len() < lse_len {
            return Err(Error::BufferTooSmall {
                tensor: "lse",
                needed: lse_len,
                len: l.len(),
            });
        }
        check_device("lse", l.stream(), stream)?;
    }
    check_device("q", q.data.stream(), stream)?;
    check_device("k", k.data.stream(), stream)?;
    check_device("v", v.data.stream(), stream)?;
    check_device("out", out.data.stream(), stream)
}

/// The checks on device addresses: the fast kernels' 16-byte alignment of q, k, v and out (when
/// `align`), and that out and lse (`lse_ptr` 0 = none) overlap no input or each other. Inputs are
/// (pointer, layout, buffer length in elements of `elem` bytes).
pub(crate) fn check_fwd_addresses<T>(
    inputs: [(u64, &Layout, usize); 3],
    out: (u64, &Layout, usize),
    (lse_ptr, lse_len): (u64, usize),
    elem: usize,
    align: bool,
) -> Result<()> {
    let names = ["q", "k", "v"];
    if align {
        for (name, (ptr, layout, _)) in names.iter().zip(inputs) {
            check_alignment::<T>(name, ptr, layout)?;
        }
        check_alignment::<T>("out", out.0, out.1)?;
    }
    let span = |name, ptr: u64, elems: usize, size: u64| Span::new(name, ptr, elems as u64 * size);
    let mut spans: Vec<Span> = names
        .iter()
        .zip(inputs)
        .map(|(name, (ptr, _, len))| span(name, ptr, len, elem as u64))
        .collect();
    spans.push(span("out", out.0, out.2, elem as u64));
    let mut outputs = vec![spans[3]];
    if lse_ptr != 0 {
        let s = span("lse", lse_ptr, lse_len, 4);
        spans.push(s);
        outputs.push(s);
    }
    check_disjoint(&outputs, &spans)
}

/// The tile for this call when no variant is forced: the one the family's variant function
/// (`sm90_fwd_variant`, `sm80_fwd_variant`) prefers for its sequence length and mask, else the
/// first that fits `limit`.
fn preferred_tile(kref: &KernelRef, limit: u32, dims: &Dims, causal: bool) -> Result<&'static KernelEntry> {
    let cell = kref.cell();
    let head_dim = cell.head_dim;
    let want = match cell.family {
        Family::Sm90 => {
            crate::cells::sm90_fwd_tiles(head_dim).get(crate::cells::sm90_fwd_variant(head_dim, dims.seqlen_k, causal))
        }
        Family::Sm80 => {
            crate::cells::sm80_fwd_tiles(head_dim).get(
                crate::cells::sm80_fwd_short_q_variant(head_dim, dims.seqlen_q)
                    .unwrap_or(crate::cells::sm80_fwd_variant(head_dim, dims.seqlen_k, causal)),
            )
        }
        Family::Reference | Family::Merge => None,
    };
    match kernel_with_tile(kref.image.kernels, want, limit) {
        Some(k) => Ok(k),
        None => choose_tile(kref, limit, None),
    }
}

/// The kernel of `kernels` compiled for tile `want`, if there is one and it fits `limit` bytes of
/// shared memory.
pub(crate) fn kernel_with_tile(
    kernels: &'static [KernelEntry],
    want: Option<&crate::cells::Tile>,
    limit: u32,
) -> Option<&'static KernelEntry> {
    let want = want?;
    kernels.iter().find(|k| &k.tile == want && k.smem_bytes <= limit)
}

/// The options of a call after validation, in the kernels' terms.
pub(crate) struct Prepared<'a> {
    pub scale: f32,
    pub softcap: f32,
    pub left: Option<u32>,
    pub window_left: i32,
    pub window_right: i32,
    pub causal: bool,
    pub align: i32,
    pub sink_tokens: i32,
    pub alibi: Option<&'a dyn DevicePtr<f32>>,
    pub alibi_batch_stride: i32,
    pub sink_logits: Option<&'a dyn DevicePtr<f32>>,
}

impl Prepared<'_> {
    /// The dispatch key of a request with these options.
    pub fn dispatch_key(
        &self,
        arch: crate::dispatch::SmArch,
        dtype: crate::cells::DType,
        dims: &Dims,
        varlen: bool,
    ) -> DispatchKey {
        DispatchKey {
            arch,
            dtype,
            head_dim: dims.head_dim as u32,
            causal: self.causal,
            varlen,
            sliding_window: self.left,
            alibi: self.alibi.is_some(),
            sink: self.sink_tokens as u32,
            paged: false,
            gqa_ratio: (dims.heads / dims.heads_k) as u32,
        }
    }
}

/// Validates the options against the sizes (and their buffers against the stream's device).
pub(crate) fn prepare_options<'a>(
    opts: &FwdOptions<'a>,
    dims: &Dims,
    seqlens: Option<&VarlenSeqlens>,
    stream: &CudaStream,
) -> Result<Prepared<'a>> {
    let scale = opts.softmax_scale.unwrap_or(1.0 / (dims.head_dim as f32).sqrt());
    // A scale <= 0 is refused: the kernels' online softmax tracks the running maximum of the
    // unscaled scores, which is only the maximum of the scaled ones for a positive scale.
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "softmax scale must be finite and > 0, got {scale}"
        )));
    }
    let softcap = match opts.softcap {
        None => 0.0,
        Some(c) if c.is_finite() && c > 0.0 => c,
        Some(c) => {
            return Err(Error::InvalidArgument(format!(
                "softcap must be finite and > 0, got {c}"
            )));
        }
    };
    let (left, right, align) = opts.mask.bounds();
    let window_left = i32_bound("window left", left)?;
    let window_right = i32_bound("window right", right)?;
    let sink_tokens = i32_bound("sink tokens", Some(opts.sink_tokens))?;
    if opts.sink_tokens > 0 && left.is_none() && right.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{} sink tokens need a causal mask or a sliding window to be exempt from",
            opts.sink_tokens
        )));
    }
    let (alibi, alibi_batch_stride) = match opts.alibi {
        None => (None, 0),
        Some(Alibi::PerHead(s)) => {
            if s.len() != dims.heads {
                return Err(Error::ShapeMismatch(format!(
                    "ALiBi slopes have {} entries for {} heads",
                    s.len(),
                    dims.heads
                )));
            }
            (Some(s), 0)
        }
        Some(Alibi::PerBatchHead(s)) => {
            if s.len() != dims.batch * dims.heads {
                return Err(Error::ShapeMismatch(format!(
                    "ALiBi slopes have {} entries for batch {} x {} heads",
                    s.len(),
                    dims.batch,
                    dims.heads
                )));
            }
            (Some(s), dims.heads as i32)
        }
    };
    if let Some(s) = alibi {
        check_device("alibi slopes", s.stream(), stream)?;
    }
    if let Some(s) = opts.sink_logits {
        if s.len() != dims.heads {
            return Err(Error::ShapeMismatch(format!(
                "sink logits have {} entries for {} heads",
                s.len(),
                dims.heads
            )));
        }
        check_device("sink logits", s.stream(), stream)?;
    }
    if let Some(s) = seqlens {
        if !s.same_context(stream) {
            return Err(Error::DeviceMismatch {
                tensor: "cu_seqlens",
                buffer_device: s.cu_q.context().ordinal(),
                stream_device: stream.context().ordinal(),
            });
        }
    }
    Ok(Prepared {
        scale,
        softcap,
        left,
        window_left,
        window_right,
        causal: opts.mask.is_causal(),
        align: match align {
            CausalAlign::BottomRight => ALIGN_BOTTOM_RIGHT,
            CausalAlign::TopLeft => ALIGN_TOP_LEFT,
        },
        sink_tokens,
        alibi,
        alibi_batch_stride,
        sink_logits: opts.sink_logits,
    })
}

type Guard<'s> = cudarc::driver::SyncOnDrop<'s>;

fn ptr_of<'s, E>(b: Option<&'s dyn DevicePtr<E>>, stream: &'s CudaStream) -> (u64, Option<Guard<'s>>) {
    match b {
        Some(s) => {
            let (p, g) = s.device_ptr(stream);
            (p, Some(g))
        }
        None => (0, None),
    }
}

/// Device pointers of the inputs every pass reads (q, k, v, the option buffers, the varlen
/// index data), with cudarc's guards, which record the stream's work on the buffers when dropped.
pub(crate) struct Pointers<'s> {
    pub q: u64,
    pub k: u64,
    pub v: u64,
    pub alibi: u64,
    pub sinks: u64,
    pub cu_q: u64,
    pub cu_k: u64,
    pub used_k: u64,
    _guards: Vec<Guard<'s>>,
}

impl<'s> Pointers<'s> {
    pub fn take<T>(
        stream: &'s CudaStream,
        q: &'s Tensor<'_, T>,
        k: &'s Tensor<'_, T>,
        v: &'s Tensor<'_, T>,
        seqlens: Option<&'s VarlenSeqlens>,
        prep: &Prepared<'s>,
    ) -> Pointers<'s> {
        let mut guards = Vec::new();
        let mut keep = |(p, g): (u64, Option<Guard<'s>>)| {
            guards.extend(g);
            p
        };
        let q = keep({
            let (p, g) = q.data.device_ptr(stream);
            (p, Some(g))
        });
        let k = keep({
            let (p, g) = k.data.device_ptr(stream);
            (p, Some(g))
        });
        let v = keep({
            let (p, g) = v.data.device_ptr(stream);
            (p, Some(g))
        });
        let alibi = keep(ptr_of(prep.alibi, stream));
        let sinks = keep(ptr_of(prep.sink_logits, stream));
        let (cu_q, cu_k, used_k) = match seqlens {
            Some(s) => {
                let a = keep(ptr_of(Some(&s.cu_q as &dyn DevicePtr<i32>), stream));
                let b = keep(ptr_of(Some(&s.cu_k as &dyn DevicePtr<i32>), stream));
                let c = keep(ptr_of(s.seqused_k.as_ref().map(|u| u as &dyn DevicePtr<i32>), stream));
                (a, b, c)
            }
            None => (0, 0, 0),
        };
        Pointers {
            q,
            k,
            v,
            alibi,
            sinks,
            cu_q,
            cu_k,
            used_k,
            _guards: guards,
        }
    }
}

/// Which tensors of a launch are varlen (packed rows indexed through cu_seqlens, no batch stride).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ragged {
    /// Dense (batch, seqlen, heads, d) tensors.
    None,
    /// q / o and k / v: the varlen entry points.
    All,
    /// q / o only: paged calls with varlen queries (k / v are the page pool, whose batch stride
    /// is the page stride).
    Queries,
}

impl Ragged {
    /// `All` for the varlen entry points, `None` for dense calls.
    pub(crate) fn all_if(varlen: bool) -> Self {
        if varlen { Ragged::All } else { Ragged::None }
    }
}

/// The params block of a launch: pointers of q, k, v and the option buffers, strides (batch
/// strides are 0 for the `ragged` tensors), sizes, mask and score modifiers. `layouts` = [q, k,
/// v, o].
pub(crate) fn fill_params(
    ptrs: &Pointers<'_>,
    prep: &Prepared<'_>,
    dims: &Dims,
    ragged: Ragged,
    layouts: [&Layout; 4],
) -> FaParams {
    let [ql, kl, vl, ol] = layouts;
    let q_stride = |l: &Layout| {
        if ragged == Ragged::None {
            l.batch_stride as i64
        } else {
            0
        }
    };
    let kv_stride = |l: &Layout| {
        if ragged == Ragged::All {
            0
        } else {
            l.batch_stride as i64
        }
    };
    FaParams {
        q: ptrs.q as *const c_void,
        k: ptrs.k as *const c_void,
        v: ptrs.v as *const c_void,
        cu_seqlens_q: ptrs.cu_q as *const i32,
        cu_seqlens_k: ptrs.cu_k as *const i32,
        seqused_k: ptrs.used_k as *const i32,
        alibi_slopes: ptrs.alibi as *const f32,
        sink_logits: ptrs.sinks as *const f32,
        q_batch_stride: q_stride(ql),
        q_row_stride: ql.row_stride as i64,
        q_head_stride: ql.head_stride as i64,
        k_batch_stride: kv_stride(kl),
        k_row_stride: kl.row_stride as i64,
        k_head_stride: kl.head_stride as i64,
        v_batch_stride: kv_stride(vl),
        v_row_stride: vl.row_stride as i64,
        v_head_stride: vl.head_stride as i64,
        o_batch_stride: q_stride(ol),
        o_row_stride: ol.row_stride as i64,
        o_head_stride: ol.head_stride as i64,
        batch: dims.batch as i32,
        seqlen_q: dims.seqlen_q as i32,
        seqlen_k: dims.seqlen_k as i32,
        num_heads: dims.heads as i32,
        num_heads_k: dims.heads_k as i32,
        head_dim: dims.head_dim as i32,
        total_q: dims.total_q as i32,
        window_left: prep.window_left,
        window_right: prep.window_right,
        causal_align: prep.align,
        sink_tokens: prep.sink_tokens,
        alibi_batch_stride: prep.alibi_batch_stride,
        num_splits: 1,
        scale: prep.scale,
        scale_log2: prep.scale * std::f32::consts::LOG2_E,
        softcap: prep.softcap,
        flags: if ragged == Ragged::None { 0 } else { FLAG_VARLEN },
        ..FaParams::default()
    }
}

/// The tile counter of the sm90 dynamic scheduler on `stream` (a device pointer to a zeroed
/// `i32`), or `None` (round-robin scheduling) if it does not exist yet and the stream is capturing
/// a graph, which would own a counter allocated now.
///
/// One counter per (context, stream), allocated on the first masked or varlen sm90 call there and
/// kept, with the stream, for the life of the process. The kernel leaves it at 0 (the CTA making
/// a launch's last claim resets it) and launches on one stream run in order, so later calls cost
/// no allocation or memset (a fresh `alloc_zeros` per call made 2k-token calls 5-13% slower on
/// H100, ~50 us of host time per call).
fn sm90_tile_counter(stream: &Arc<CudaStream>) -> Result<Option<u64>> {
    struct Counter {
        key: (usize, usize),
        ptr: u64,
        _buffer: CudaSlice<i32>,
    }
    static COUNTERS: Mutex<Vec<Counter>> = Mutex::new(Vec::new());
    let key = (stream.context().cu_ctx() as usize, stream.cu_stream() as usize);
    let mut counters = COUNTERS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(c) = counters.iter().find(|c| c.key == key) {
        return Ok(Some(c.ptr));
    }
    let capturing = stream
        .capture_status()
        .map_err(Error::driver("querying stream capture"))?;
    if capturing != CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Ok(None);
    }
    let buffer = stream
        .alloc_zeros::<i32>(1)
        .map_err(Error::driver("allocating the sm90 tile counter"))?;
    let ptr = buffer.device_ptr(stream).0;
    counters.push(Counter {
        key,
        ptr,
        _buffer: buffer,
    });
    Ok(Some(ptr))
}

/// The split-KV part count of a forward call (see `crate::split`) on the kernel `entry` of
/// `kref` would run: 1 unless the call splits. Both forward families split (the sm80 kernels
/// with `batch * splits` grid blocks, the persistent sm90 kernel with that many tiles).
pub(crate) fn plan_split(
    kref: &KernelRef,
    entry: &KernelEntry,
    opts: &FwdOptions<'_>,
    info: &runtime::DeviceInfo,
    dims: &Dims,
    varlen: bool,
) -> Result<usize> {
    let want = opts.num_splits as usize;
    if want == 1 {
        return Ok(1);
    }
    if want > crate::split::MAX_SPLITS {
        return Err(Error::InvalidArgument(format!(
            "num_splits is {want}; at most {} parts",
            crate::split::MAX_SPLITS
        )));
    }
    if varlen {
        if want >= 2 {
            return Err(Error::InvalidArgument(
                "split-KV (num_splits >= 2) does not take varlen queries".into(),
            ));
        }
        return Ok(1);
    }
    // Thread blocks the GPU runs at once: 2 per SM for the 4-warp sm80 tiles (FwdKernel's
    // kMinBlocksPerSm), 1 for the 8-warp ones and for the persistent sm90 kernel.
    let per_sm = match kref.cell().family {
        Family::Sm80 if entry.tile.warps <= 4 => 2,
        Family::Sm80 | Family::Sm90 => 1,
        Family::Reference | Family::Merge => return Ok(1),
    };
    if want >= 2 {
        return Ok(want);
    }
    let work = dims.seqlen_q.div_ceil(entry.tile.block_m as usize) * dims.heads * dims.batch;
    let n_blocks = dims.seqlen_k.div_ceil(entry.tile.block_n as usize);
    Ok(crate::split::heuristic(work, n_blocks, info.sm_count as usize * per_sm))
}

pub(crate) fn run_fwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    seqlens: Option<&VarlenSeqlens>,
    opts: &FwdOptions<'_>,
    imp: Impl,
) -> Result<FwdInfo> {
    runtime::ensure_driver()?;
    let FwdTensors { q, k, v, out, lse } = t;
    let dims = check_shapes(&q.layout, &k.layout, &v.layout, &out.layout, seqlens, imp)?;
    let prep = prepare_options(opts, &dims, seqlens, stream)?;

    let lse_len = dims.heads * dims.total_q;
    check_fwd_buffers(stream, &q, &k, &v, &out, lse.as_deref(), lse_len)?;

    // Kernel.
    let info = runtime::device_info(stream)?;
    let key = prep.dispatch_key(info.arch, T::DTYPE, &dims, seqlens.is_some());
    let ov = opts.kernel_override;
    let kref = match (imp, ov.family) {
        (Impl::Reference, _) => {
            let cell = Cell {
                family: Family::Reference,
                direction: Direction::Fwd,
                dtype: T::DTYPE,
                head_dim: 0,
            };
            let (index, image, jit_ptx) = DISPATCH_TABLE
                .serve(&cell, info.arch)
                .ok_or_else(|| not_compiled(&cell, info.arch))?;
            KernelRef {
                image,
                index,
                routed_from: None,
                jit_ptx,
            }
        }
        (Impl::Flash, Some(family)) => DISPATCH_TABLE.lookup_family(&key, Direction::Fwd, family)?,
        (Impl::Flash, None) => DISPATCH_TABLE.lookup(&key)?,
    };
    let smem_limit = ov
        .smem_limit
        .map_or(info.max_smem_optin, |l| l.min(info.max_smem_optin));
    let entry = match ov.variant {
        None => preferred_tile(&kref, smem_limit, &dims, prep.causal)?,
        variant => choose_tile(&kref, smem_limit, variant)?,
    };
    // Split-KV: the sm80 kernels take it at run time; the sm90 family has a `_split` kernel per
    // cell (CellImage::split_kernels), which a split call runs instead.
    let (entry, n_splits) = match (imp, kref.cell().family) {
        (Impl::Reference, _) => (entry, 1),
        (Impl::Flash, Family::Sm90) => match kref.image.split_kernels.iter().find(|e| e.smem_bytes <= smem_limit) {
            Some(split_entry) => match plan_split(&kref, split_entry, opts, &info, &dims, seqlens.is_some())? {
                1 => (entry, 1),
                n => (split_entry, n),
            },
            None if opts.num_splits >= 2 => {
                return Err(Error::NoKernel {
                    what: format!("a split-KV kernel in {}", kref.key()),
                });
            }
            None => (entry, 1),
        },
        (Impl::Flash, _) => (entry, plan_split(&kref, entry, opts, &info, &dims, seqlens.is_some())?),
    };
    let jit_ptx = uses_ptx(&kref, ov.force_ptx)?;
    let m_blocks = dims.seqlen_q.div_ceil(entry.tile.block_m as usize);
    let geom = match kref.cell().family {
        // Never returned by a lookup (no family but the sm80 and sm90 ones serves a forward key).
        Family::Merge => {
            return Err(Error::NoKernel {
                what: format!("{key:?} on the merge family"),
            });
        }
        Family::Reference => Geometry {
            grid: (dims.seqlen_q as u32, dims.heads as u32, dims.batch as u32),
            block: 128,
            smem_bytes: 0,
        },
        Family::Sm80 => Geometry {
            grid: (
                m_blocks as u32,
                dims.heads as u32,
                u32::try_from(dims.batch * n_splits).unwrap_or(u32::MAX),
            ),
            block: entry.tile.threads(),
            smem_bytes: entry.smem_bytes,
        },
        // Persistent: one block per SM (at most one per tile); the kernel walks the tiles.
        Family::Sm90 => Geometry {
            grid: (
                (m_blocks * dims.heads * dims.batch * n_splits).min(info.sm_count as usize) as u32,
                1,
                1,
            ),
            block: entry.tile.threads(),
            smem_bytes: entry.smem_bytes,
        },
    };
    let function = runtime::function(stream, kref.index, jit_ptx, entry.symbol, entry.smem_bytes)?;

    // Device pointers, held with their guards until the launch is enqueued.
    let ptrs = Pointers::take(stream, &q, &k, &v, seqlens, &prep);
    let out_len = out.data.len();
    let (o_ptr, _g_o) = out.data.device_ptr_mut(stream);
    let (lse_ptr, _g_lse) = match lse {
        Some(l) => {
            let (p, g) = l.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    check_fwd_addresses::<T>(
        [
            (ptrs.q, &q.layout, q.data.len()),
            (ptrs.k, &k.layout, k.data.len()),
            (ptrs.v, &v.layout, v.data.len()),
        ],
        (o_ptr, &out.layout, out_len),
        (lse_ptr, lse_len),
        std::mem::size_of::<T>(),
        imp == Impl::Flash,
    )?;
    // The split workspace (after every check of the caller's buffers).
    let split = Split::for_call::<T>(stream, &info, n_splits, &dims)?;

    let mut params = fill_params(
        &ptrs,
        &prep,
        &dims,
        Ragged::all_if(seqlens.is_some()),
        [&q.layout, &k.layout, &v.layout, &out.layout],
    );
    params.o = o_ptr as *mut c_void;
    params.lse = lse_ptr as *mut f32;
    if let Some(sp) = &split {
        sp.fill_params(&mut params, stream);
    }
    if kref.cell().family == Family::Sm90 {
        // Masks and varlen give tiles of different lengths: the kernel then claims tiles from a
        // counter (dynamic persistent scheduling, csrc/sm90/scheduler.cuh) instead of taking
        // them round-robin.
        let masked = prep.window_left >= 0 || prep.window_right >= 0;
        if masked || seqlens.is_some() {
            params.semaphore = sm90_tile_counter(stream)?.map_or(std::ptr::null_mut(), |p| p as *mut i32);
        }
        let total_k = seqlens.map_or(dims.batch * k.layout.seqlen, |s| s.total_k());
        let mut maps =
            crate::sm90_tma::encode_fwd_tensor_maps(&params, T::DTYPE, dims.head_dim as u32, &entry.tile, total_k)?;
        let [m0, m1, m2] = &mut maps;
        let mut args = [
            &mut params as *mut FaParams as *mut c_void,
            m0 as *mut _ as *mut c_void,
            m1 as *mut _ as *mut c_void,
            m2 as *mut _ as *mut c_void,
        ];
        // SAFETY: sm90 forward kernels take `FaParams` and three `CUtensorMap`s by value, in this
        // order; every pointer was checked against its layout and its guard lives until return.
        unsafe { runtime::launch(function, geom, stream, &mut args)? };
    } else {
        let mut args = [&mut params as *mut FaParams as *mut c_void];
        // SAFETY: sm80 and reference forward kernels take exactly one `FaParams` by value; every
        // pointer in it was checked against its layout and its guard lives until this returns.
        unsafe { runtime::launch(function, geom, stream, &mut args)? };
    }
    if let Some(sp) = &split {
        sp.combine(stream, &dims, o_ptr, &out.layout, lse_ptr, ptrs.sinks)?;
    }
    Ok(FwdInfo {
        cell: kref.key(),
        symbol: entry.symbol,
        routed_from: kref.routed_from,
        jit_ptx,
        num_splits: n_splits,
    })
}
