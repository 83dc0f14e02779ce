//! The backward pass: `flash_bwd`, `flash_bwd_varlen`, and the GPU reference backward.
//!
//! Inputs: q, k, v, out, dout and the forward's LSE; outputs dq, dk, dv (and dsink with learnable
//! sink logits). fp32 workspaces (dK/dV accumulators, the row dots `D = rowsum(dO * O)`) are
//! allocated by the crate on the call's stream for each call (stream-ordered allocation, freed when
//! the call returns and the stream reaches that point): `(2 * rows_k * heads_k * head_dim +
//! heads * total_q) * 4` bytes for the reference path.

use crate::cells::{Cell, Direction, Family};
use crate::dispatch::{DISPATCH_TABLE, not_compiled};
use crate::error::{Error, Result};
use crate::fwd::{self, Dims, Impl};
use crate::options::FwdOptions;
use crate::params::FaParams;
use crate::runtime::{self, Geometry};
use crate::tensor::{AttnElement, Tensor, TensorMut};
use crate::varlen::VarlenSeqlens;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
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
    let cell = match imp {
        Impl::Reference => Cell {
            family: Family::Reference,
            direction: Direction::Bwd,
            dtype: T::DTYPE,
            head_dim: 0,
        },
        Impl::Flash => {
            let key = prep.dispatch_key(info.arch, T::DTYPE, &dims, seqlens.is_some());
            let r = DISPATCH_TABLE.resolve(&key, Direction::Bwd, false)?;
            r.cell()
        }
    };
    let (index, image, jit) = DISPATCH_TABLE
        .serve(&cell, info.arch)
        .ok_or_else(|| not_compiled(&cell, info.arch))?;
    let prefix = image.kernels[0].symbol;
    let sym = |suffix: &str| -> &'static str {
        match suffix {
            "dot" => leak_symbol(prefix, "_dot"),
            "main" => leak_symbol(prefix, "_main"),
            _ => leak_symbol(prefix, "_convert"),
        }
    };
    let f_dot = runtime::function(stream, index, jit, sym("dot"), 0)?;
    let f_main = runtime::function(stream, index, jit, sym("main"), 0)?;
    let f_convert = runtime::function(stream, index, jit, sym("convert"), 0)?;

    // Workspaces.
    let rows_k = match seqlens {
        Some(s) => s.total_k(),
        None => dims.batch * k.layout.seqlen,
    };
    let acc_len = (rows_k * dims.heads_k * dims.head_dim).max(1);
    let dk_acc: CudaSlice<f32> = stream
        .alloc_zeros(acc_len)
        .map_err(Error::driver("allocating the dK workspace"))?;
    let dv_acc: CudaSlice<f32> = stream
        .alloc_zeros(acc_len)
        .map_err(Error::driver("allocating the dV workspace"))?;
    let softmax_d: CudaSlice<f32> = stream
        .alloc_zeros(lse_len.max(1))
        .map_err(Error::driver("allocating the row-dot workspace"))?;

    let guards = fwd::Pointers::take(stream, &q, &k, &v, seqlens, &prep);
    let (out_ptr, _g1) = out.data.device_ptr(stream);
    let (do_ptr, _g2) = dout.data.device_ptr(stream);
    let (lse_ptr, _g3) = lse.device_ptr(stream);
    let (dq_ptr, _g4) = dq.data.device_ptr_mut(stream);
    let (dk_ptr, _g5) = dk.data.device_ptr_mut(stream);
    let (dv_ptr, _g6) = dv.data.device_ptr_mut(stream);
    let (dka, _g7) = dk_acc.device_ptr(stream);
    let (dva, _g8) = dv_acc.device_ptr(stream);
    let (sd, _g9) = softmax_d.device_ptr(stream);
    let (dsink_ptr, _g10) = match dsink {
        Some(d) => {
            let (p, g) = d.device_ptr_mut(stream);
            // The kernels accumulate into dsink: zero it first, in stream order.
            // SAFETY: `p` addresses at least `heads` f32s (checked above).
            unsafe { cudarc::driver::result::memset_d8_async(p, 0, dims.heads * 4, stream.cu_stream()) }
                .map_err(Error::driver("zeroing dsink"))?;
            (p, Some(g))
        }
        None => (0, None),
    };
    let mut p: FaParams = fwd::fill_params(
        &guards,
        &prep,
        &dims,
        seqlens.is_some(),
        [&q.layout, &k.layout, &v.layout, &out.layout],
    );
    p.o = out_ptr as *mut c_void;
    p.lse = lse_ptr as *mut f32;
    p.dout = do_ptr as *const c_void;
    p.dq = dq_ptr as *mut c_void;
    p.dk = dk_ptr as *mut c_void;
    p.dv = dv_ptr as *mut c_void;
    p.dk_accum = dka as *mut f32;
    p.dv_accum = dva as *mut f32;
    p.softmax_d = sd as *mut f32;
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

    let rows_grid = (dims.seqlen_q as u32, dims.heads as u32, dims.batch as u32);
    let conv_elems = rows_k * dims.heads_k * dims.head_dim;
    let mut params = p;
    let mut args = [&mut params as *mut FaParams as *mut c_void];
    // SAFETY: the reference backward kernels take one `FaParams` by value; every pointer in it was
    // checked above and its guard lives until this function returns.
    unsafe {
        runtime::launch(
            f_dot,
            Geometry {
                grid: rows_grid,
                block: 128,
                smem_bytes: 0,
            },
            stream,
            &mut args,
        )?;
        runtime::launch(
            f_main,
            Geometry {
                grid: rows_grid,
                block: 128,
                smem_bytes: 0,
            },
            stream,
            &mut args,
        )?;
        runtime::launch(
            f_convert,
            Geometry {
                grid: (conv_elems.div_ceil(256) as u32, 1, 1),
                block: 256,
                smem_bytes: 0,
            },
            stream,
            &mut args,
        )?;
    }
    drop(guards);
    Ok(BwdInfo {
        cell: image.key,
        symbol: leak_symbol(prefix, "_main"),
    })
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
