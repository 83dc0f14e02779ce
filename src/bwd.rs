//! The backward pass: `flash_bwd`, `flash_bwd_varlen`, and the GPU reference backward.
//!
//! Inputs: q, k, v, out, dout and the forward's LSE; outputs dq, dk, dv (and dsink with learnable
//! sink logits). Three kernels run in stream order: a preprocess (`_dot`: D = rowsum(dO * O)), the
//! main kernel (`_main`) and a postprocess (`_convert`). The fast paths: the sm90 family
//! (csrc/sm90/bwd.cuh, bwd_wide.cuh: TMA + wgmma) on H100 / H200 at every head dim
//! (`SM90_BWD_HEAD_DIMS`, deterministic mode included), the sm80 family (csrc/sm80/bwd.cuh) on
//! other devices. [`BwdInfo::cell`] names the cell that ran.
//!
//! fp32 workspaces are allocated by the crate on the call's stream for each call
//! (stream-ordered allocation, freed when the call returns and the stream reaches that point; the
//! sm80 family's come from a crate-owned memory pool per device that keeps its memory across
//! synchronizations, see `PooledBuf`; [`release_workspace_memory`] hands it back):
//!
//! - sm80 and sm90 families (the same layout; the sm90 tile has `BM` = 64), with `BM` the chosen tile's query block (`Tile::block_m`) and `R` the
//!   workspace rows per head, `batch * ceil(seqlen_q / BM) * BM` (dense) or
//!   `round_up(total_q, 16) + batch * (BM + 16)` (varlen, every sequence padded to whole blocks):
//!   `8 * heads * R` bytes of row statistics (log2 LSE and D), `4 * heads * R * head_dim` bytes of
//!   dQ accumulators, and in deterministic mode `4 * batch * heads * ceil(seqlen_q / BM)` bytes of
//!   counters. dK and dV need none: a thread block sums its key block's gradients over the whole
//!   GQA group in registers.
//! - reference: `(2 * rows_k * heads_k * head_dim + heads * total_q) * 4` bytes.
//!
//! Determinism: with [`BwdOptions::deterministic`] each query block's dQ contributions are added
//! in a fixed key-block order, so dq, dk, dv and dsink are bitwise identical across runs; without
//! it dQ is accumulated with unordered fp32 reductions (dk, dv and dsink are deterministic in both
//! modes).

use crate::cells::{Cell, Direction, Family};
use crate::dispatch::{DISPATCH_TABLE, KernelRef, not_compiled};
use crate::error::{Error, Result};
use crate::fwd::{self, Dims, Impl};
use crate::options::FwdOptions;
use crate::params::FaParams;
use crate::runtime::{self, Geometry};
use crate::tensor::{AttnElement, Tensor, TensorMut};
use crate::varlen::VarlenSeqlens;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError};
use std::ffi::c_void;
use std::sync::Arc;

/// The tensors of a backward call. Layouts as in the forward; `dq` like `q`, `dk`/`dv` like `k`.
pub struct BwdTensors<'a, T> {
    /// Queries.
    pub q: Tensor<'a, T>,
    /// Keys.
    pub k: Tensor<'a, T>,
    /// Values.
    pub v: Tensor<'a, T>,
    /// The forward's output.
    pub out: Tensor<'a, T>,
    /// Gradient of the output, shaped like `out`.
    pub dout: Tensor<'a, T>,
    /// The forward's LSE (fp32, natural log; `(batch, heads, seqlen_q)` or varlen `(heads, total_q)`).
    pub lse: &'a dyn DevicePtr<f32>,
    /// Gradient of q (written).
    pub dq: TensorMut<'a, T>,
    /// Gradient of k (written; summed over each GQA group).
    pub dk: TensorMut<'a, T>,
    /// Gradient of v (written; summed over each GQA group).
    pub dv: TensorMut<'a, T>,
    /// Gradient of the learnable sink logits, fp32 `(heads,)` (overwritten); required exactly when
    /// the options carry sink logits.
    pub dsink: Option<&'a mut dyn DevicePtrMut<f32>>,
}

/// Options of a backward call: the forward's options (they must be the ones the forward ran with)
/// and whether the result must be bitwise reproducible.
#[derive(Clone, Copy, Debug, Default)]
pub struct BwdOptions<'a> {
    pub(crate) fwd: FwdOptions<'a>,
    pub(crate) deterministic: bool,
}

impl<'a> BwdOptions<'a> {
    /// The backward of a forward run with `fwd`.
    pub fn new(fwd: FwdOptions<'a>) -> Self {
        BwdOptions {
            fwd,
            deterministic: false,
        }
    }

    /// Bitwise-identical dq/dk/dv/dsink across runs (no order-dependent atomics), at some cost.
    pub fn deterministic(mut self, on: bool) -> Self {
        self.deterministic = on;
        self
    }

    /// Forces a code path (tests, diagnosis): the forward options' override, which the backward
    /// honours the same way (family, shared-memory limit, PTX image, tile variant).
    pub fn kernel_override(mut self, o: crate::options::KernelOverride) -> Self {
        self.fwd.kernel_override = o;
        self
    }
}

/// Which kernels ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdInfo {
    /// Cell key.
    pub cell: &'static str,
    /// Main kernel symbol.
    pub symbol: &'static str,
}

/// Attention backward on dense tensors.
pub fn flash_bwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: BwdTensors<'_, T>,
    opts: &BwdOptions<'_>,
) -> Result<BwdInfo> {
    run_bwd(stream, t, None, opts, Impl::Flash)
}

/// Attention backward on varlen tensors.
pub fn flash_bwd_varlen<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: BwdTensors<'_, T>,
    seqlens: &VarlenSeqlens,
    opts: &BwdOptions<'_>,
) -> Result<BwdInfo> {
    run_bwd(stream, t, Some(seqlens), opts, Impl::Flash)
}

pub(crate) fn run_bwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: BwdTensors<'_, T>,
    seqlens: Option<&VarlenSeqlens>,
    opts: &BwdOptions<'_>,
    imp: Impl,
) -> Result<BwdInfo> {
    runtime::ensure_driver()?;
    let BwdTensors {
        q,
        k,
        v,
        out,
        dout,
        lse,
        dq,
        dk,
        dv,
        dsink,
    } = t;
    // Shapes: the forward's rules, then the gradients mirror their inputs.
    let dims: Dims = fwd::check_shapes(&q.layout, &k.layout, &v.layout, &out.layout, seqlens, imp)?;
    for (name, a, b) in [
        ("dout", &dout.layout, &out.layout),
        ("dq", &dq.layout, &q.layout),
        ("dk", &dk.layout, &k.layout),
        ("dv", &dv.layout, &v.layout),
    ] {
        if (a.batch, a.seqlen, a.heads, a.head_dim) != (b.batch, b.seqlen, b.heads, b.head_dim) {
            return Err(Error::ShapeMismatch(format!("{name} must have the shape of its input")));
        }
    }
    let prep = fwd::prepare_options(&opts.fwd, &dims, seqlens, stream)?;
    for (name, len, layout) in [
        ("q", q.data.len(), &q.layout),
        ("k", k.data.len(), &k.layout),
        ("v", v.data.len(), &v.layout),
        ("out", out.data.len(), &out.layout),
        ("dout", dout.data.len(), &dout.layout),
        ("dq", dq.data.len(), &dq.layout),
        ("dk", dk.data.len(), &dk.layout),
        ("dv", dv.data.len(), &dv.layout),
    ] {
        fwd::check_buffer::<T>(name, len, layout)?;
    }
    let lse_len = dims.heads * dims.total_q;
    if lse.len() < lse_len {
        return Err(Error::BufferTooSmall {
            tensor: "lse",
            needed: lse_len,
            len: lse.len(),
        });
    }
    for (name, s) in [
        ("q", q.data.stream()),
        ("k", k.data.stream()),
        ("v", v.data.stream()),
        ("out", out.data.stream()),
        ("dout", dout.data.stream()),
        ("lse", lse.stream()),
        ("dq", dq.data.stream()),
        ("dk", dk.data.stream()),
        ("dv", dv.data.stream()),
    ] {
        fwd::check_device(name, s, stream)?;
    }
    match (&dsink, opts.fwd.sink_logits) {
        (Some(d), Some(_)) => {
            if d.len() < dims.heads {
                return Err(Error::BufferTooSmall {
                    tensor: "dsink",
                    needed: dims.heads,
                    len: d.len(),
                });
            }
            fwd::check_device("dsink", d.stream(), stream)?;
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(Error::InvalidArgument(
                "dsink given but the options carry no sink logits".into(),
            ));
        }
        (None, Some(_)) => return Err(Error::InvalidArgument("sink logits need a dsink output".into())),
    }

    let info = runtime::device_info(stream)?;
    let ov = opts.fwd.kernel_override;
    let kref = match imp {
        Impl::Reference => {
            let cell = Cell {
                family: Family::Reference,
                direction: Direction::Bwd,
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
        Impl::Flash => {
            let key = prep.dispatch_key(info.arch, T::DTYPE, &dims, seqlens.is_some());
            match ov.family {
                Some(family) => DISPATCH_TABLE.lookup_family(&key, Direction::Bwd, family)?,
                None => DISPATCH_TABLE.resolve(&key, Direction::Bwd, false)?,
            }
        }
    };
    let jit = kref.jit_ptx || (imp == Impl::Flash && ov.force_ptx);
    if jit && kref.image.ptx.is_none() {
        return Err(Error::CellNotCompiled {
            cell: kref.key().to_string(),
            knobs: crate::kernels::BUILD_KNOBS,
            hint: "its compute_80 PTX image is needed; build with the `ptx-jit` feature".into(),
        });
    }
    let entry = match imp {
        Impl::Reference => &kref.image.kernels[0],
        Impl::Flash => fwd::choose_tile(
            &kref,
            ov.smem_limit
                .map_or(info.max_smem_optin, |l| l.min(info.max_smem_optin)),
            ov.variant,
        )?,
    };
    let prefix = entry.symbol;
    let main_smem = if imp == Impl::Flash { entry.smem_bytes } else { 0 };
    let f_dot = runtime::function(stream, kref.index, jit, leak_symbol(prefix, "_dot"), 0)?;
    // The sm90 family compiles deterministic mode as its own main kernel (`_main_det`: the dQ
    // reductions wait for their turn; csrc/sm90/bwd.cuh), in an image of its own
    // (`CellImage::det_fatbin`), so the default kernels carry none of it.
    let det_image = opts.deterministic && imp == Impl::Flash && kref.cell().family == Family::Sm90;
    let (main_symbol, f_main) = if det_image {
        if kref.image.det_fatbin.is_none() {
            return Err(Error::NoKernel {
                what: format!(
                    "{} (Bwd, deterministic): the cell has no deterministic image",
                    kref.key()
                ),
            });
        }
        let symbol = leak_symbol(prefix, "_main_det");
        (symbol, runtime::det_function(stream, kref.index, symbol, main_smem)?)
    } else {
        let symbol = leak_symbol(prefix, "_main");
        (symbol, runtime::function(stream, kref.index, jit, symbol, main_smem)?)
    };
    let f_convert = runtime::function(stream, kref.index, jit, leak_symbol(prefix, "_convert"), 0)?;

    let guards = fwd::Pointers::take(stream, &q, &k, &v, seqlens, &prep);
    let (out_ptr, _g1) = out.data.device_ptr(stream);
    let (do_ptr, _g2) = dout.data.device_ptr(stream);
    let (lse_ptr, _g3) = lse.device_ptr(stream);
    let (dq_ptr, _g4) = dq.data.device_ptr_mut(stream);
    let (dk_ptr, _g5) = dk.data.device_ptr_mut(stream);
    let (dv_ptr, _g6) = dv.data.device_ptr_mut(stream);
    if imp == Impl::Flash {
        // The fast kernels move rows of every 16-bit tensor in 16-byte vectors.
        for (name, ptr, layout) in [
            ("q", guards.q, &q.layout),
            ("k", guards.k, &k.layout),
            ("v", guards.v, &v.layout),
            ("out", out_ptr, &out.layout),
            ("dout", do_ptr, &dout.layout),
            ("dq", dq_ptr, &dq.layout),
            ("dk", dk_ptr, &dk.layout),
            ("dv", dv_ptr, &dv.layout),
        ] {
            fwd::check_alignment::<T>(name, ptr, layout)?;
        }
    }

    // Workspaces (stream-ordered; freed when this function returns, after the launches).
    let rows_k = match seqlens {
        Some(s) => s.total_k(),
        None => dims.batch * k.layout.seqlen,
    };
    let ws = match imp {
        Impl::Reference => Workspace::reference(stream, &dims, rows_k)?,
        Impl::Flash => Workspace::flash(stream, &dims, seqlens, entry.tile.block_m as usize, opts.deterministic)?,
    };
    let (dka, _g7) = ws.dk_accum.ptr(stream);
    let (dva, _g8) = ws.dv_accum.ptr(stream);
    let (sd, _g9) = ws.softmax_d.ptr(stream);
    let (dqa, _g11) = ws.dq_accum.ptr(stream);
    let (sem, _g12) = ws.semaphore.ptr(stream);
    let (dsink_ptr, _g10) = match dsink {
        Some(d) => {
            let (p, g) = d.device_ptr_mut(stream);
            (p, Some(g))
        }
        None => (0, None),
    };
    let mut p: FaParams = fwd::fill_params(
        &guards,
        &prep,
        &dims,
        fwd::Ragged::all_if(seqlens.is_some()),
        [&q.layout, &k.layout, &v.layout, &out.layout],
    );
    p.o = out_ptr as *mut c_void;
    p.lse = lse_ptr as *mut f32;
    p.dout = do_ptr as *const c_void;
    p.dq = dq_ptr as *mut c_void;
    p.dk = dk_ptr as *mut c_void;
    p.dv = dv_ptr as *mut c_void;
    p.dk_accum = if ws.uses_kv_accum {
        dka as *mut f32
    } else {
        std::ptr::null_mut()
    };
    p.dv_accum = if ws.uses_kv_accum {
        dva as *mut f32
    } else {
        std::ptr::null_mut()
    };
    p.softmax_d = sd as *mut f32;
    p.dq_accum = if ws.uses_dq_accum {
        dqa as *mut f32
    } else {
        std::ptr::null_mut()
    };
    p.semaphore = if opts.deterministic && imp == Impl::Flash {
        sem as *mut i32
    } else {
        std::ptr::null_mut()
    };
    p.seqlen_q_rounded = ws.seqlen_q_rounded as i32;
    p.dsink = dsink_ptr as *mut f32;
    let varlen = seqlens.is_some();
    let bs = |b: usize| if varlen { 0 } else { b as i64 };
    p.do_batch_stride = bs(dout.layout.batch_stride);
    p.do_row_stride = dout.layout.row_stride as i64;
    p.do_head_stride = dout.layout.head_stride as i64;
    p.dq_batch_stride = bs(dq.layout.batch_stride);
    p.dq_row_stride = dq.layout.row_stride as i64;
    p.dq_head_stride = dq.layout.head_stride as i64;
    p.dk_batch_stride = bs(dk.layout.batch_stride);
    p.dk_row_stride = dk.layout.row_stride as i64;
    p.dk_head_stride = dk.layout.head_stride as i64;
    p.dv_batch_stride = bs(dv.layout.batch_stride);
    p.dv_row_stride = dv.layout.row_stride as i64;
    p.dv_head_stride = dv.layout.head_stride as i64;
    if opts.deterministic {
        p.flags |= crate::params::FLAG_DETERMINISTIC;
    }

    let (g_dot, g_main, g_convert) = match imp {
        Impl::Reference => {
            let rows_grid = (dims.seqlen_q as u32, dims.heads as u32, dims.batch as u32);
            let conv_elems = rows_k * dims.heads_k * dims.head_dim;
            (
                Geometry {
                    grid: rows_grid,
                    block: 128,
                    smem_bytes: 0,
                },
                Geometry {
                    grid: rows_grid,
                    block: 128,
                    smem_bytes: 0,
                },
                Geometry {
                    grid: (conv_elems.div_ceil(256) as u32, 1, 1),
                    block: 256,
                    smem_bytes: 0,
                },
            )
        }
        Impl::Flash => {
            let (bm, bn) = (entry.tile.block_m as usize, entry.tile.block_n as usize);
            // Key blocks cover each sequence's stored key rows (capacity), so rows past
            // seqused_k get their zero gradients too.
            let max_capacity_k = match seqlens {
                Some(s) => s
                    .cu_seqlens_k()
                    .windows(2)
                    .map(|w| (w[1] - w[0]) as usize)
                    .max()
                    .unwrap_or(0),
                None => k.layout.seqlen,
            };
            let q_grid = (dims.seqlen_q.div_ceil(bm) as u32, dims.heads as u32, dims.batch as u32);
            let pre_post = Geometry {
                grid: q_grid,
                block: SM80_BWD_PRE_POST_THREADS,
                smem_bytes: 0,
            };
            (
                pre_post,
                Geometry {
                    grid: (
                        max_capacity_k.div_ceil(bn) as u32,
                        dims.heads_k as u32,
                        dims.batch as u32,
                    ),
                    block: entry.tile.threads(),
                    smem_bytes: entry.smem_bytes,
                },
                pre_post,
            )
        }
    };
    let mut params = p;
    // The sm90 main kernel also takes the tensor maps of q, k, v and dout (encoded before any
    // launch, so that a stride TMA cannot express fails the call with nothing written).
    let mut maps = if imp == Impl::Flash && kref.cell().family == Family::Sm90 {
        Some(crate::sm90_tma::encode_bwd_tensor_maps(
            &params,
            T::DTYPE,
            dims.head_dim as u32,
            &entry.tile,
            rows_k,
        )?)
    } else {
        None
    };
    if dsink_ptr != 0 {
        // The kernels accumulate into dsink (or write it only where rows exist): zero it first,
        // in stream order (after every check, so that a failed call writes nothing).
        // SAFETY: `dsink_ptr` addresses at least `heads` f32s (checked above).
        unsafe { cudarc::driver::result::memset_d8_async(dsink_ptr, 0, dims.heads * 4, stream.cu_stream()) }
            .map_err(Error::driver("zeroing dsink"))?;
    }
    let mut args = [&mut params as *mut FaParams as *mut c_void];
    // SAFETY: the dot and convert kernels of every family, and the reference and sm80 main
    // kernels, take one `FaParams` by value; the sm90 main kernel takes `FaParams` and four
    // `CUtensorMap`s (q, k, v, dout) by value, in this order. Every pointer in the params was
    // checked above (or is a workspace sized here) and its guard lives until this returns.
    unsafe {
        runtime::launch(f_dot, g_dot, stream, &mut args)?;
        match &mut maps {
            Some([m0, m1, m2, m3]) => {
                let mut main_args = [
                    args[0],
                    m0 as *mut _ as *mut c_void,
                    m1 as *mut _ as *mut c_void,
                    m2 as *mut _ as *mut c_void,
                    m3 as *mut _ as *mut c_void,
                ];
                runtime::launch(f_main, g_main, stream, &mut main_args)?;
            }
            None => runtime::launch(f_main, g_main, stream, &mut args)?,
        }
        runtime::launch(f_convert, g_convert, stream, &mut args)?;
    }
    drop(guards);
    Ok(BwdInfo {
        cell: kref.key(),
        symbol: main_symbol,
    })
}

/// Block size of the dot and convert kernels of both families (`kBwdPrePostThreads` in
/// csrc/sm80/bwd.cuh, `kBwdThreads` in csrc/sm90/bwd.cuh).
const SM80_BWD_PRE_POST_THREADS: u32 = 256;

/// The fp32 workspaces of one backward call (see the module docs for their sizes). Buffers a
/// path does not use are one element long (reference) or absent (sm80 family).
struct Workspace {
    dk_accum: WsBuf,
    dv_accum: WsBuf,
    softmax_d: WsBuf,
    dq_accum: WsBuf,
    semaphore: WsBuf,
    seqlen_q_rounded: usize,
    uses_kv_accum: bool,
    uses_dq_accum: bool,
}

impl Workspace {
    /// The reference path: zeroed dK / dV accumulators `[rows_k, heads_k, d]` and the row dots.
    fn reference(stream: &Arc<CudaStream>, dims: &Dims, rows_k: usize) -> Result<Workspace> {
        let acc_len = (rows_k * dims.heads_k * dims.head_dim).max(1);
        let zeros = |n: usize, what| {
            stream
                .alloc_zeros::<f32>(n.max(1))
                .map(WsBuf::Slice)
                .map_err(Error::driver(what))
        };
        Ok(Workspace {
            dk_accum: zeros(acc_len, "allocating the dK workspace")?,
            dv_accum: zeros(acc_len, "allocating the dV workspace")?,
            softmax_d: zeros(dims.heads * dims.total_q, "allocating the row-dot workspace")?,
            dq_accum: zeros(1, "allocating the dQ workspace")?,
            semaphore: zeros(1, "allocating the semaphores")?,
            seqlen_q_rounded: dims.seqlen_q,
            uses_kv_accum: true,
            uses_dq_accum: false,
        })
    }

    /// The sm80 path (csrc/sm80/bwd_tile.cuh, `BwdWorkspace`): `rows` workspace rows per head,
    /// every sequence padded to whole blocks of `block_m`; log2 LSE and D (`2 * heads * rows`),
    /// dQ accumulators (`heads * rows * d`), and in deterministic mode one counter per
    /// (sequence, head, query block). The dot kernel initialises all of them.
    fn flash(
        stream: &Arc<CudaStream>,
        dims: &Dims,
        seqlens: Option<&VarlenSeqlens>,
        block_m: usize,
        deterministic: bool,
    ) -> Result<Workspace> {
        let seqlen_q_rounded = dims.seqlen_q.div_ceil(block_m) * block_m;
        let rows = match seqlens {
            Some(_) => dims.total_q.next_multiple_of(16) + dims.batch * (block_m + 16),
            None => dims.batch * seqlen_q_rounded,
        };
        let head_rows = dims
            .heads
            .checked_mul(rows)
            .filter(|&r| r <= i32::MAX as usize)
            .ok_or(Error::TooLarge {
                what: "backward workspace rows (heads x padded total_q)",
                value: dims.heads.saturating_mul(rows),
                limit: i32::MAX as usize,
            })?;
        let sems = if deterministic {
            dims.batch * dims.heads * dims.seqlen_q.div_ceil(block_m)
        } else {
            1
        };
        // Every element the kernels read is written first: the dot kernel writes the statistics of
        // every row and zeroes the dQ accumulators and the counters.
        Ok(Workspace {
            dk_accum: WsBuf::None,
            dv_accum: WsBuf::None,
            softmax_d: PooledBuf::alloc(stream, 2 * head_rows * 4, "allocating the row-statistics workspace")?,
            dq_accum: PooledBuf::alloc(stream, head_rows * dims.head_dim * 4, "allocating the dQ workspace")?,
            semaphore: PooledBuf::alloc(stream, sems.max(1) * 4, "allocating the semaphores")?,
            seqlen_q_rounded,
            uses_kv_accum: false,
            uses_dq_accum: true,
        })
    }
}

/// `prefix + suffix` as a `'static` str, interned so each distinct name is allocated once.
fn leak_symbol(prefix: &'static str, suffix: &'static str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<Vec<&'static str>>> = OnceLock::new();
    let want = format!("{prefix}{suffix}");
    let mut names = NAMES.get_or_init(|| Mutex::new(Vec::new())).lock().unwrap();
    if let Some(n) = names.iter().find(|n| **n == want) {
        return n;
    }
    let leaked: &'static str = Box::leak(want.into_boxed_str());
    names.push(leaked);
    leaked
}

/// One workspace buffer: a cudarc allocation (reference path), a buffer of the workspace pool
/// (sm80 family), or none (a null pointer).
enum WsBuf {
    Slice(CudaSlice<f32>),
    Pooled(PooledBuf),
    None,
}

impl WsBuf {
    /// The device pointer, with cudarc's stream-order guard where the buffer has one (drop it
    /// after the launches).
    fn ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, Option<cudarc::driver::SyncOnDrop<'a>>) {
        match self {
            WsBuf::Slice(s) => {
                let (p, g) = s.device_ptr(stream);
                (p, Some(g))
            }
            WsBuf::Pooled(b) => (b.ptr, None),
            WsBuf::None => (0, None),
        }
    }
}

/// A stream-ordered allocation from the crate's workspace pool of the stream's device, freed in
/// stream order on drop.
///
/// The pool keeps its memory across synchronizations (release threshold `u64::MAX`): with the
/// driver's default threshold of 0 every synchronization hands the freed workspace back to the
/// driver and the next call maps it again, which cost ~180 us per call for the 134 MB dQ
/// workspace of d = 128 x 16 heads x 16k tokens on an H100 (16% of that backward at seqlen 512).
/// The pool belongs to the crate, so the memory it keeps is never handed to other allocations of
/// the process; it holds at most the largest set of workspaces in flight at once.
struct PooledBuf {
    ptr: u64,
    stream: cudarc::driver::sys::CUstream,
}

impl PooledBuf {
    /// `bytes` (a multiple of 4) from the pool; where the pool cannot be had, from the stream's
    /// default allocator as before.
    fn alloc(stream: &Arc<CudaStream>, bytes: usize, what: &'static str) -> Result<WsBuf> {
        match Self::alloc_pooled(stream, bytes) {
            Ok(b) => Ok(WsBuf::Pooled(b)),
            // SAFETY: every element the kernels read is written first (see Workspace::flash).
            Err(_) => unsafe { stream.alloc::<f32>(bytes.div_ceil(4).max(1)) }
                .map(WsBuf::Slice)
                .map_err(Error::driver(what)),
        }
    }

    fn alloc_pooled(stream: &Arc<CudaStream>, bytes: usize) -> std::result::Result<PooledBuf, DriverError> {
        use cudarc::driver::sys;
        let pool = workspace_pool(stream)?;
        stream.context().bind_to_thread()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `pool` is a live pool of the stream's device; the memory is only used by kernels
        // launched on `stream` before the stream-ordered free in `drop`.
        unsafe { sys::cuMemAllocFromPoolAsync(&mut ptr, bytes.max(4), pool as sys::CUmemoryPool, stream.cu_stream()) }
            .result()?;
        Ok(PooledBuf {
            ptr,
            stream: stream.cu_stream(),
        })
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from cuMemAllocFromPoolAsync and is freed once, in the order of the
        // stream its kernels were launched on (the caller's stream outlives the call).
        let _ = unsafe { cudarc::driver::sys::cuMemFreeAsync(self.ptr, self.stream) };
    }
}

/// The backward's workspace pools, one per device (created on first use, kept for the process).
static POOLS: std::sync::OnceLock<std::sync::Mutex<Vec<(cudarc::driver::sys::CUdevice, usize)>>> =
    std::sync::OnceLock::new();

fn pools() -> std::sync::MutexGuard<'static, Vec<(cudarc::driver::sys::CUdevice, usize)>> {
    // A panic elsewhere while the lock was held leaves the list itself intact.
    POOLS
        .get_or_init(|| std::sync::Mutex::new(Vec::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// Hands the memory that the backward's workspace pools keep between calls back to the driver.
///
/// `flash_bwd` takes its fp32 workspaces (sizes in the `bwd` module docs, src/bwd.rs) from a pool per
/// device that keeps freed memory for the next call instead of unmapping it at every
/// synchronization (as PyTorch's caching allocator does); the pool holds at most the largest set
/// of workspaces that were in flight at once. Call this after a training phase to give that
/// memory back; memory still in use by queued work is released once that work completes. A
/// no-op where no backward has run.
pub fn release_workspace_memory() -> Result<()> {
    for &(_, pool) in pools().iter() {
        // SAFETY: `pool` is a live pool created by `workspace_pool` and never destroyed.
        unsafe { cudarc::driver::sys::cuMemPoolTrimTo(pool as cudarc::driver::sys::CUmemoryPool, 0) }
            .result()
            .map_err(Error::driver("trimming the workspace pool"))?;
    }
    Ok(())
}

/// The workspace pool of the stream's device (created on first use, kept for the process).
fn workspace_pool(stream: &Arc<CudaStream>) -> std::result::Result<usize, DriverError> {
    use cudarc::driver::sys;
    let dev = stream.context().cu_device();
    let mut pools = pools();
    if let Some(&(_, pool)) = pools.iter().find(|(d, _)| *d == dev) {
        return Ok(pool);
    }
    stream.context().bind_to_thread()?;
    // SAFETY: plain-old-data driver structs; every field the driver reads is set (the rest zero).
    let pool = unsafe {
        let mut props: sys::CUmemPoolProps = std::mem::zeroed();
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = dev;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        sys::cuMemPoolCreate(&mut pool, &props).result()?;
        let mut keep: u64 = u64::MAX;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            &mut keep as *mut u64 as *mut c_void,
        )
        .result()?;
        pool as usize
    };
    pools.push((dev, pool));
    Ok(pool)
}
