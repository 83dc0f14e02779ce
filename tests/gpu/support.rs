//! Shared machinery of the GPU tests: the device, test cases, data generation, strided upload,
//! running a kernel on poisoned outputs, and comparison against the references.

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use flashattn_aot::reference::cpu::{self, Align, LowPrecision, Problem};
use flashattn_aot::reference::{reference_fwd, reference_fwd_varlen};
use flashattn_aot::{
    Alibi, AttnElement, BwdInfo, CausalAlign, FwdInfo, FwdOptions, FwdTensors, KernelOverride, Layout, Mask, Tensor,
    TensorMut, VarlenSeqlens, device_count, device_info, driver_present, flash_fwd, flash_fwd_varlen, open_device,
};
use std::sync::Arc;

pub struct Gpu {
    #[allow(dead_code)]
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
}

/// The device, or the reason the GPU tests are reported as ignored.
pub fn setup() -> Result<Gpu, String> {
    if !driver_present() {
        return Err("no NVIDIA driver (libcuda) on this machine".into());
    }
    match device_count() {
        Ok(0) => return Err("no CUDA device".into()),
        Err(e) => return Err(format!("no usable CUDA device ({e})")),
        Ok(_) => {}
    }
    let ctx = open_device(0).map_err(|e| e.to_string())?;
    let stream = ctx.default_stream();
    let info = device_info(&stream).map_err(|e| e.to_string())?;
    println!("device: {} {:?}", ctx.name().unwrap_or_default(), info);
    Ok(Gpu { ctx, stream })
}

/// Host conversions of the element types.
pub trait HostElem: AttnElement + std::fmt::Debug {
    const PREC: LowPrecision;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
    fn bits(self) -> u16;
}

impl HostElem for half::f16 {
    const PREC: LowPrecision = LowPrecision::F16;
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

impl HostElem for half::bf16 {
    const PREC: LowPrecision = LowPrecision::Bf16;
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

/// How the dense tensors are laid out in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// `(b, s, h, d)` contiguous.
    Contiguous,
    /// `(b, h, s, d)` contiguous (PyTorch's layout) through strides.
    HeadsMajor,
    /// `(b, s, h, d)` with gaps: head stride `d + 8`, row stride `h * (d + 8) + 16`, batch stride
    /// with 32 more. The gaps hold NaN, so a kernel that reads them fails the test.
    Padded,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlibiKind {
    None,
    PerHead,
    PerBatchHead,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub batch: usize,
    pub seqlen_q: usize,
    pub seqlen_k: usize,
    /// Varlen: per-sequence query and key lengths (replaces batch/seqlen_q/seqlen_k).
    pub varlen: Option<(Vec<usize>, Vec<usize>)>,
    /// Varlen: keys used per sequence (<= its key length).
    pub seqused_k: Option<Vec<usize>>,
    pub heads: usize,
    pub heads_k: usize,
    pub head_dim: usize,
    pub mask: Mask,
    pub sink_tokens: u32,
    pub sink_logits: bool,
    pub alibi: AlibiKind,
    pub softcap: Option<f32>,
    pub scale: Option<f32>,
    pub storage: Storage,
    pub with_lse: bool,
    pub seed: u64,
    /// `FwdOptions::num_splits` (1 = unsplit, the default here; 0 = the library's heuristic).
    pub num_splits: u32,
    /// Varlen with `seqused_k`: the stored but unused key rows of K and V hold NaN (a kernel
    /// must not let them reach a result).
    pub nan_unused_kv: bool,
}

impl Case {
    pub fn new(seqlen_q: usize, seqlen_k: usize, head_dim: usize) -> Case {
        Case {
            batch: 2,
            seqlen_q,
            seqlen_k,
            varlen: None,
            seqused_k: None,
            heads: 4,
            heads_k: 2,
            head_dim,
            mask: Mask::None,
            sink_tokens: 0,
            sink_logits: false,
            alibi: AlibiKind::None,
            softcap: None,
            scale: None,
            storage: Storage::Contiguous,
            with_lse: true,
            seed: 1,
            num_splits: 1,
            nan_unused_kv: false,
        }
    }

    fn seqlens(&self) -> (Vec<usize>, Vec<usize>) {
        match &self.varlen {
            Some((q, k)) => (q.clone(), k.clone()),
            None => (vec![self.seqlen_q; self.batch], vec![self.seqlen_k; self.batch]),
        }
    }

    fn layout(&self, rows: usize, heads: usize) -> Layout {
        let d = self.head_dim;
        let (b, s) = if self.varlen.is_some() {
            (1, rows)
        } else {
            (self.batch, rows)
        };
        match self.storage {
            Storage::Contiguous => Layout::contiguous(b, s, heads, d),
            Storage::HeadsMajor => Layout::heads_major(b, s, heads, d),
            Storage::Padded => {
                let hs = d + 8;
                let rs = heads * hs + 16;
                Layout::contiguous(b, s, heads, d).with_strides(s * rs + 32, rs, hs)
            }
        }
    }

    pub fn problem(&self) -> Problem {
        let (sq, sk) = self.seqlens();
        let sk_used = match &self.seqused_k {
            Some(u) => u.clone(),
            None => sk,
        };
        let (left, right, align) = self.mask.bounds();
        let batch = sq.len();
        Problem {
            heads: self.heads,
            heads_k: self.heads_k,
            head_dim: self.head_dim,
            seqlens_q: sq,
            seqlens_k: sk_used,
            scale: self
                .scale
                .map(|s| s as f64)
                .unwrap_or(1.0 / (self.head_dim as f64).sqrt()),
            softcap: self.softcap.unwrap_or(0.0) as f64,
            window_left: left.map_or(-1, |x| x as i64),
            window_right: right.map_or(-1, |x| x as i64),
            align: match align {
                CausalAlign::BottomRight => Align::BottomRight,
                CausalAlign::TopLeft => Align::TopLeft,
            },
            sink_tokens: self.sink_tokens as usize,
            alibi_slopes: match self.alibi {
                AlibiKind::None => None,
                AlibiKind::PerHead => Some(alibi_slopes(1, self.heads)),
                AlibiKind::PerBatchHead => Some(alibi_slopes(batch, self.heads)),
            },
            sink_logits: self.sink_logits.then(|| sink_logits(self.heads, self.seed)),
        }
    }

    pub fn describe(&self) -> String {
        format!("{self:?}")
    }
}

/// ALiBi slopes `2^(-8 (h+1) / H)`, scaled per batch entry so per-batch slopes differ.
fn alibi_slopes(batch: usize, heads: usize) -> Vec<f32> {
    (0..batch * heads)
        .map(|i| {
            let (b, h) = (i / heads, i % heads);
            2f32.powf(-8.0 * (h + 1) as f32 / heads as f32) * (1.0 + 0.25 * b as f32)
        })
        .collect()
}

fn sink_logits(heads: usize, seed: u64) -> Vec<f32> {
    let mut rng = cpu::Rng::new(seed ^ 0x5eed);
    (0..heads).map(|_| rng.normal() + 1.0).collect()
}

/// Packed host tensor `[rows][heads][d]` into a strided device buffer image whose gaps are NaN.
fn scatter<T: HostElem>(packed: &[f32], layout: &Layout, rows_per_batch: usize) -> Vec<T> {
    let n = layout.extent().unwrap();
    let mut out = vec![T::from_f32(f32::NAN); n];
    let (h, d) = (layout.heads, layout.head_dim);
    for (row, chunk) in packed.chunks(h * d).enumerate() {
        let (b, s) = (row / rows_per_batch, row % rows_per_batch);
        for hh in 0..h {
            for x in 0..d {
                out[b * layout.batch_stride + s * layout.row_stride + hh * layout.head_stride + x] =
                    T::from_f32(chunk[hh * d + x]);
            }
        }
    }
    out
}

/// Inverse of [`scatter`]: strided buffer image to packed `[rows][heads][d]`.
fn gather<T: HostElem>(buf: &[T], layout: &Layout, rows: usize, rows_per_batch: usize) -> Vec<f32> {
    let (h, d) = (layout.heads, layout.head_dim);
    let mut out = vec![0f32; rows * h * d];
    for row in 0..rows {
        let (b, s) = (row / rows_per_batch, row % rows_per_batch);
        for hh in 0..h {
            for x in 0..d {
                out[(row * h + hh) * d + x] =
                    buf[b * layout.batch_stride + s * layout.row_stride + hh * layout.head_stride + x].to_f32();
            }
        }
    }
    out
}

/// Which implementation a check runs.
#[derive(Clone, Copy, Debug)]
pub enum Which {
    Flash(KernelOverride),
    Reference,
}

/// Inputs of a case, on host and device.
pub struct Inputs<T> {
    pub problem: Problem,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    q_dev: CudaSlice<T>,
    k_dev: CudaSlice<T>,
    v_dev: CudaSlice<T>,
    q_layout: Layout,
    kv_layout: Layout,
    seqlens: Option<VarlenSeqlens>,
    alibi: Option<CudaSlice<f32>>,
    sinks: Option<CudaSlice<f32>>,
    total_q: usize,
    rows_per_batch_q: usize,
}

pub struct Output {
    /// Packed `[total_q][heads][d]`.
    pub o: Vec<f32>,
    /// `[heads][total_q]`.
    pub lse: Option<Vec<f32>>,
    pub info: FwdInfo,
}

fn e(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

pub fn prepare<T: HostElem>(gpu: &Gpu, case: &Case) -> Result<Inputs<T>, String> {
    let problem = case.problem();
    let total_q: usize = problem.seqlens_q.iter().sum();
    let (sq, sk) = case.seqlens();
    let total_k: usize = sk.iter().sum();
    let mut rng = cpu::Rng::new(case.seed);
    let q = cpu::randn_plus_half(&mut rng, total_q * case.heads * case.head_dim, T::PREC);
    let mut k = cpu::randn_plus_half(&mut rng, total_k * case.heads_k * case.head_dim, T::PREC);
    let mut v = cpu::randn_plus_half(&mut rng, total_k * case.heads_k * case.head_dim, T::PREC);
    if case.nan_unused_kv {
        let (Some((_, cap)), Some(used)) = (&case.varlen, &case.seqused_k) else {
            return Err("nan_unused_kv needs varlen with seqused_k".into());
        };
        let row = case.heads_k * case.head_dim;
        let mut start = 0;
        for (&c, &u) in cap.iter().zip(used) {
            for x in &mut k[(start + u.min(c)) * row..(start + c) * row] {
                *x = f32::NAN;
            }
            for x in &mut v[(start + u.min(c)) * row..(start + c) * row] {
                *x = f32::NAN;
            }
            start += c;
        }
    }
    let (q_rows, k_rows, rows_per_batch_q, rows_per_batch_k) = match case.varlen {
        Some(_) => (total_q, total_k, total_q.max(1), total_k.max(1)),
        None => (sq[0], sk[0], sq[0].max(1), sk[0].max(1)),
    };
    let q_layout = case.layout(q_rows, case.heads);
    let kv_layout = case.layout(k_rows, case.heads_k);
    let s = &gpu.stream;
    let q_dev = s
        .clone_htod(&scatter::<T>(&q, &q_layout, rows_per_batch_q))
        .map_err(e)?;
    let k_dev = s
        .clone_htod(&scatter::<T>(&k, &kv_layout, rows_per_batch_k))
        .map_err(e)?;
    let v_dev = s
        .clone_htod(&scatter::<T>(&v, &kv_layout, rows_per_batch_k))
        .map_err(e)?;
    let seqlens = match &case.varlen {
        Some((lq, lk)) => {
            let cu = |l: &[usize]| {
                let mut c = vec![0i32];
                for &x in l {
                    c.push(c.last().unwrap() + x as i32);
                }
                c
            };
            let mut sl = VarlenSeqlens::new(s, &cu(lq), &cu(lk)).map_err(e)?;
            if let Some(u) = &case.seqused_k {
                let u: Vec<i32> = u.iter().map(|&x| x as i32).collect();
                sl = sl.with_seqused_k(s, &u).map_err(e)?;
            }
            Some(sl)
        }
        None => None,
    };
    let alibi = match &problem.alibi_slopes {
        Some(sl) => Some(s.clone_htod(sl).map_err(e)?),
        None => None,
    };
    let sinks = match &problem.sink_logits {
        Some(sl) => Some(s.clone_htod(sl).map_err(e)?),
        None => None,
    };
    Ok(Inputs {
        problem,
        q,
        k,
        v,
        q_dev,
        k_dev,
        v_dev,
        q_layout,
        kv_layout,
        seqlens,
        alibi,
        sinks,
        total_q,
        rows_per_batch_q,
    })
}

/// Runs `which` on poisoned (NaN) outputs and returns them packed.
pub fn run<T: HostElem>(gpu: &Gpu, case: &Case, inp: &Inputs<T>, which: Which) -> Result<Output, String> {
    let s = &gpu.stream;
    let n_out = inp.q_layout.extent().unwrap();
    let mut out = s.clone_htod(&vec![T::from_f32(f32::NAN); n_out]).map_err(e)?;
    let lse_len = case.heads * inp.total_q;
    let mut lse = s.clone_htod(&vec![f32::NAN; lse_len.max(1)]).map_err(e)?;
    let mut opts = FwdOptions::new()
        .mask(case.mask)
        .sink_tokens(case.sink_tokens)
        .num_splits(case.num_splits);
    if let Some(sc) = case.scale {
        opts = opts.softmax_scale(sc);
    }
    if let Some(c) = case.softcap {
        opts = opts.softcap(c);
    }
    if let Some(a) = &inp.alibi {
        opts = opts.alibi(match case.alibi {
            AlibiKind::PerBatchHead => Alibi::PerBatchHead(a),
            _ => Alibi::PerHead(a),
        });
    }
    if let Some(sl) = &inp.sinks {
        opts = opts.sink_logits(sl);
    }
    let info = {
        if let Which::Flash(o) = which {
            opts = opts.kernel_override(o);
        }
        let t = FwdTensors {
            q: Tensor::new(&inp.q_dev, inp.q_layout),
            k: Tensor::new(&inp.k_dev, inp.kv_layout),
            v: Tensor::new(&inp.v_dev, inp.kv_layout),
            out: TensorMut::new(&mut out, inp.q_layout),
            lse: if case.with_lse { Some(&mut lse) } else { None },
        };
        match (which, &inp.seqlens) {
            (Which::Flash(_), None) => flash_fwd(s, t, &opts),
            (Which::Flash(_), Some(sl)) => flash_fwd_varlen(s, t, sl, &opts),
            (Which::Reference, None) => reference_fwd(s, t, &opts),
            (Which::Reference, Some(sl)) => reference_fwd_varlen(s, t, sl, &opts),
        }
        .map_err(|err| format!("launch failed: {err}"))?
    };
    s.synchronize().map_err(|err| format!("kernel failed: {err}"))?;
    let out_h: Vec<T> = s.clone_dtoh(&out).map_err(e)?;
    let o = gather(&out_h, &inp.q_layout, inp.total_q, inp.rows_per_batch_q);
    let lse = if case.with_lse {
        let l: Vec<f32> = s.clone_dtoh(&lse).map_err(e)?;
        // Dense LSE is (b, h, sq); the references index [h][total_q] with row = b * sq + i.
        Some(match case.varlen {
            Some(_) => l[..lse_len].to_vec(),
            None => {
                let (b, h, sq) = (case.batch, case.heads, case.seqlen_q);
                let mut m = vec![0f32; lse_len];
                for bb in 0..b {
                    for hh in 0..h {
                        for i in 0..sq {
                            m[hh * inp.total_q + bb * sq + i] = l[(bb * h + hh) * sq + i];
                        }
                    }
                }
                m
            }
        })
    } else {
        let l: Vec<f32> = s.clone_dtoh(&lse).map_err(e)?;
        if l.iter().any(|x| !x.is_nan()) {
            return Err("lse was written although none was requested".into());
        }
        None
    };
    Ok(Output { o, lse, info })
}

/// Checks `which` against the f64 CPU reference with FlashAttention's rule
/// `max|out - ref| <= 2 max|base - ref| + atol`, base = the same-precision CPU baseline.
pub fn check_vs_cpu<T: HostElem>(gpu: &Gpu, case: &Case, which: Which) -> Result<FwdInfo, String> {
    let inp = prepare::<T>(gpu, case)?;
    let got = run(gpu, case, &inp, which)?;
    // The CPU references take only the keys each sequence uses.
    let (k, v) = match (&case.varlen, &case.seqused_k) {
        (Some((_, cap)), Some(used)) => {
            let row = case.heads_k * case.head_dim;
            (
                cpu::keep_used_rows(&inp.k, cap, used, row),
                cpu::keep_used_rows(&inp.v, cap, used, row),
            )
        }
        _ => (inp.k.clone(), inp.v.clone()),
    };
    let r = cpu::forward(&inp.problem, &inp.q, &k, &v);
    let (base_o, base_lse) = cpu::forward_lowp(&inp.problem, &inp.q, &k, &v, T::PREC);
    let ctx = || {
        format!(
            "{} via {}\ncase: {}",
            which_name(which),
            got.info.symbol,
            case.describe()
        )
    };
    cpu::check_close("O", &got.o, &r.o, &base_o, cpu::atol_for(T::PREC, &r.o))
        .map_err(|m| format!("{m}\n{}", ctx()))?;
    if let Some(lse) = &got.lse {
        cpu::check_close("LSE", lse, &r.lse, &base_lse, 1e-4).map_err(|m| format!("{m}\n{}", ctx()))?;
    }
    Ok(got.info)
}

/// Checks the fast kernel against the GPU reference on the same inputs (shapes too large for the
/// CPU): every element within `ulps` rounding quanta of the output's magnitude, LSE within 1e-3.
pub fn check_vs_gpu_reference<T: HostElem>(gpu: &Gpu, case: &Case, which: Which, ulps: f64) -> Result<FwdInfo, String> {
    let inp = prepare::<T>(gpu, case)?;
    let got = run(gpu, case, &inp, which)?;
    let want = run(gpu, case, &inp, Which::Reference)?;
    let reference: Vec<f64> = want.o.iter().map(|&x| x as f64).collect();
    let quantum = cpu::atol_for(T::PREC, &reference);
    let st = cpu::err_stats(&got.o, &reference);
    let ctx = || format!("{} vs GPU reference\ncase: {}", got.info.symbol, case.describe());
    if st.nan_count > 0 || st.max_abs > ulps * quantum {
        return Err(format!("O: {st:?} exceeds {ulps} x {quantum}\n{}", ctx()));
    }
    if let (Some(a), Some(b)) = (&got.lse, &want.lse) {
        let rl: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let st = cpu::err_stats(a, &rl);
        if st.nan_count > 0 || st.max_abs > 1e-3 {
            return Err(format!("LSE: {st:?} exceeds 1e-3\n{}", ctx()));
        }
    }
    Ok(got.info)
}

fn which_name(w: Which) -> &'static str {
    match w {
        Which::Flash(_) => "flash",
        Which::Reference => "GPU reference",
    }
}

/// Reads a device buffer's bits (for "nothing was written" checks).
pub fn bits<T: HostElem>(stream: &Arc<CudaStream>, buf: &CudaSlice<T>) -> Vec<u16> {
    stream.clone_dtoh(buf).unwrap().into_iter().map(|x| x.bits()).collect()
}

/// Which backward implementation a check runs.
#[derive(Clone, Copy, Debug)]
pub enum WhichBwd {
    /// `flash_bwd` / `flash_bwd_varlen`, with these overrides (tile variant, smem limit, PTX).
    #[allow(dead_code)]
    Flash {
        deterministic: bool,
        ov: KernelOverride,
    },
    Reference,
}

/// The forward options of `case` (buffers from `inp`).
fn fwd_options<'a, T>(case: &Case, inp: &'a Inputs<T>) -> FwdOptions<'a> {
    let mut opts = FwdOptions::new()
        .mask(case.mask)
        .sink_tokens(case.sink_tokens)
        .num_splits(case.num_splits);
    if let Some(sc) = case.scale {
        opts = opts.softmax_scale(sc);
    }
    if let Some(c) = case.softcap {
        opts = opts.softcap(c);
    }
    if let Some(a) = &inp.alibi {
        opts = opts.alibi(match case.alibi {
            AlibiKind::PerBatchHead => Alibi::PerBatchHead(a),
            _ => Alibi::PerHead(a),
        });
    }
    if let Some(sl) = &inp.sinks {
        opts = opts.sink_logits(sl);
    }
    opts
}

/// A backward problem on the device: the inputs, dO (host, packed `[total_q][heads][d]`, and
/// device), and the GPU reference forward's O and LSE.
pub struct BwdProblem<T> {
    pub inp: Inputs<T>,
    pub dout: Vec<f32>,
    dout_dev: CudaSlice<T>,
    out_dev: CudaSlice<T>,
    lse_dev: CudaSlice<f32>,
    /// Key rows stored (capacity) in total, and per batch entry of the dense layout.
    total_k: usize,
    rows_per_batch_k: usize,
}

/// The gradients of one backward run, packed: dq `[total_q][heads][d]`, dk / dv
/// `[total_k capacity rows][heads_k][d]`, dsink `[heads]`.
pub struct BwdGot {
    pub dq: Vec<f32>,
    pub dk: Vec<f32>,
    pub dv: Vec<f32>,
    pub dsink: Option<Vec<f32>>,
    pub info: BwdInfo,
}

/// Inputs, dO, and O/LSE from a forward: `flash_fwd` when `flash_forward` (how the flash backward
/// is used: its scores are recomputed by the same kind of MMA as the forward's, as in
/// FlashAttention's tests), else the GPU reference forward.
pub fn bwd_prepare<T: HostElem>(gpu: &Gpu, case: &Case, flash_forward: bool) -> Result<BwdProblem<T>, String> {
    let s = &gpu.stream;
    let inp = prepare::<T>(gpu, case)?;
    let mut rng = cpu::Rng::new(case.seed ^ 0xd0);
    let dout = cpu::randn_plus_half(&mut rng, inp.q.len(), T::PREC);
    let dout_dev = s
        .clone_htod(&scatter::<T>(&dout, &inp.q_layout, inp.rows_per_batch_q))
        .map_err(e)?;
    let n_q = inp.q_layout.extent().unwrap();
    let mut out_dev = s.clone_htod(&vec![T::from_f32(f32::NAN); n_q]).map_err(e)?;
    let mut lse_dev = s
        .clone_htod(&vec![f32::NAN; (case.heads * inp.total_q).max(1)])
        .map_err(e)?;
    {
        let opts = fwd_options(case, &inp);
        let t = FwdTensors {
            q: Tensor::new(&inp.q_dev, inp.q_layout),
            k: Tensor::new(&inp.k_dev, inp.kv_layout),
            v: Tensor::new(&inp.v_dev, inp.kv_layout),
            out: TensorMut::new(&mut out_dev, inp.q_layout),
            lse: Some(&mut lse_dev),
        };
        match (&inp.seqlens, flash_forward) {
            (None, false) => reference_fwd(s, t, &opts).map(|_| ()),
            (Some(sl), false) => reference_fwd_varlen(s, t, sl, &opts).map(|_| ()),
            (None, true) => flash_fwd(s, t, &opts).map(|_| ()),
            (Some(sl), true) => flash_fwd_varlen(s, t, sl, &opts).map(|_| ()),
        }
        .map_err(e)?;
    }
    let (total_k, rows_per_batch_k) = match &case.varlen {
        Some((_, lk)) => {
            let t: usize = lk.iter().sum();
            (t, t.max(1))
        }
        None => (case.batch * case.seqlen_k, case.seqlen_k.max(1)),
    };
    Ok(BwdProblem {
        inp,
        dout,
        dout_dev,
        out_dev,
        lse_dev,
        total_k,
        rows_per_batch_k,
    })
}

/// Runs `which` backward on poisoned (NaN) gradients and returns them packed.
pub fn bwd_run<T: HostElem>(gpu: &Gpu, case: &Case, pb: &BwdProblem<T>, which: WhichBwd) -> Result<BwdGot, String> {
    use flashattn_aot::reference::{reference_bwd, reference_bwd_varlen};
    use flashattn_aot::{BwdOptions, BwdTensors, flash_bwd, flash_bwd_varlen};
    let s = &gpu.stream;
    let inp = &pb.inp;
    let n_q = inp.q_layout.extent().unwrap();
    let n_k = inp.kv_layout.extent().unwrap();
    let mut dq = s.clone_htod(&vec![T::from_f32(f32::NAN); n_q]).map_err(e)?;
    let mut dk = s.clone_htod(&vec![T::from_f32(f32::NAN); n_k]).map_err(e)?;
    let mut dv = s.clone_htod(&vec![T::from_f32(f32::NAN); n_k]).map_err(e)?;
    let mut dsink = s.clone_htod(&vec![f32::NAN; case.heads]).map_err(e)?;
    let info = {
        let opts = fwd_options(case, inp);
        let t = BwdTensors {
            q: Tensor::new(&inp.q_dev, inp.q_layout),
            k: Tensor::new(&inp.k_dev, inp.kv_layout),
            v: Tensor::new(&inp.v_dev, inp.kv_layout),
            out: Tensor::new(&pb.out_dev, inp.q_layout),
            dout: Tensor::new(&pb.dout_dev, inp.q_layout),
            lse: &pb.lse_dev,
            dq: TensorMut::new(&mut dq, inp.q_layout),
            dk: TensorMut::new(&mut dk, inp.kv_layout),
            dv: TensorMut::new(&mut dv, inp.kv_layout),
            dsink: if inp.sinks.is_some() { Some(&mut dsink) } else { None },
        };
        match (which, &inp.seqlens) {
            (WhichBwd::Reference, None) => reference_bwd(s, t, &BwdOptions::new(opts)),
            (WhichBwd::Reference, Some(sl)) => reference_bwd_varlen(s, t, sl, &BwdOptions::new(opts)),
            (WhichBwd::Flash { deterministic, ov }, sl) => {
                let o = BwdOptions::new(opts).deterministic(deterministic).kernel_override(ov);
                match sl {
                    None => flash_bwd(s, t, &o),
                    Some(sl) => flash_bwd_varlen(s, t, sl, &o),
                }
            }
        }
        .map_err(|err| format!("backward launch failed: {err}"))?
    };
    s.synchronize()
        .map_err(|err| format!("backward kernel failed: {err}"))?;
    let dsink = if inp.sinks.is_some() {
        Some(s.clone_dtoh(&dsink).map_err(e)?)
    } else {
        None
    };
    Ok(BwdGot {
        dq: gather(
            &s.clone_dtoh(&dq).map_err(e)?,
            &inp.q_layout,
            inp.total_q,
            inp.rows_per_batch_q,
        ),
        dk: gather(
            &s.clone_dtoh(&dk).map_err(e)?,
            &inp.kv_layout,
            pb.total_k,
            pb.rows_per_batch_k,
        ),
        dv: gather(
            &s.clone_dtoh(&dv).map_err(e)?,
            &inp.kv_layout,
            pb.total_k,
            pb.rows_per_batch_k,
        ),
        dsink,
        info,
    })
}

/// With `seqused_k`, the key rows a backward must leave at exactly zero (stored but unused) must
/// be zero; returns dk / dv with only the used rows (the CPU references' packing).
fn used_key_rows(case: &Case, got: &BwdGot) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (Some((_, cap)), Some(used)) = (&case.varlen, &case.seqused_k) else {
        return Ok((got.dk.clone(), got.dv.clone()));
    };
    let row = case.heads_k * case.head_dim;
    let mut start = 0;
    for (b, (&c, &u)) in cap.iter().zip(used).enumerate() {
        for (name, x) in [("dk", &got.dk), ("dv", &got.dv)] {
            if let Some(bad) = x[(start + u) * row..(start + c) * row].iter().position(|v| *v != 0.0) {
                return Err(format!(
                    "{name} of sequence {b}: unused key row {} is not zero ({})",
                    u + bad / row,
                    x[(start + u) * row + bad]
                ));
            }
        }
        start += c;
    }
    Ok((
        cpu::keep_used_rows(&got.dk, cap, used, row),
        cpu::keep_used_rows(&got.dv, cap, used, row),
    ))
}

/// Runs the GPU reference forward (for O and LSE), then `which` backward on poisoned gradients,
/// and checks dq, dk, dv (and dsink) against the f64 CPU backward with FlashAttention's rule.
/// Dense and varlen (with `seqused_k`: unused key rows must get exact zeros).
pub fn check_bwd_vs_cpu<T: HostElem>(gpu: &Gpu, case: &Case, which: WhichBwd) -> Result<(), String> {
    check_bwd_vs_cpu_info::<T>(gpu, case, which).map(|_| ())
}

/// [`check_bwd_vs_cpu`], returning which kernel ran.
pub fn check_bwd_vs_cpu_info<T: HostElem>(gpu: &Gpu, case: &Case, which: WhichBwd) -> Result<BwdInfo, String> {
    let pb = bwd_prepare::<T>(gpu, case, matches!(which, WhichBwd::Flash { .. }))?;
    let got = bwd_run(gpu, case, &pb, which)?;
    let inp = &pb.inp;
    let ctx = || format!("{which:?} via {}\ncase: {}", got.info.symbol, case.describe());
    let (got_dk, got_dv) = used_key_rows(case, &got).map_err(|m| format!("{m}\n{}", ctx()))?;
    let (k, v) = match (&case.varlen, &case.seqused_k) {
        (Some((_, cap)), Some(used)) => {
            let row = case.heads_k * case.head_dim;
            (
                cpu::keep_used_rows(&inp.k, cap, used, row),
                cpu::keep_used_rows(&inp.v, cap, used, row),
            )
        }
        _ => (inp.k.clone(), inp.v.clone()),
    };
    let r = cpu::backward(&inp.problem, &inp.q, &k, &v, &pb.dout);
    let (bq, bk, bv, bsink) = cpu::backward_lowp(&inp.problem, &inp.q, &k, &v, &pb.dout, T::PREC);
    for (name, got, want, base) in [
        ("dq", &got.dq, &r.dq, &bq),
        ("dk", &got_dk, &r.dk, &bk),
        ("dv", &got_dv, &r.dv, &bv),
    ] {
        cpu::check_close(name, got, want, base, cpu::atol_for(T::PREC, want)).map_err(|m| format!("{m}\n{}", ctx()))?;
    }
    if let (Some(want), Some(base)) = (&r.dsink, &bsink) {
        let got = got.dsink.as_ref().ok_or("dsink was not read back")?;
        cpu::check_close("dsink", got, want, base, cpu::atol_f32(want)).map_err(|m| format!("{m}\n{}", ctx()))?;
    }
    Ok(got.info)
}

/// Checks `which` backward against the GPU reference backward on the same inputs (shapes too
/// large for the CPU): every element of dq, dk, dv within `ulps` rounding quanta of the
/// reference's magnitude (`cpu::atol_for`), dsink within 1e-3 of max(1, |reference|).
pub fn check_bwd_vs_gpu_reference<T: HostElem>(
    gpu: &Gpu,
    case: &Case,
    which: WhichBwd,
    ulps: f64,
) -> Result<BwdInfo, String> {
    let pb = bwd_prepare::<T>(gpu, case, false)?;
    let got = bwd_run(gpu, case, &pb, which)?;
    let want = bwd_run(gpu, case, &pb, WhichBwd::Reference)?;
    let ctx = || {
        format!(
            "{which:?} via {} vs GPU reference\ncase: {}",
            got.info.symbol,
            case.describe()
        )
    };
    for (name, a, b) in [
        ("dq", &got.dq, &want.dq),
        ("dk", &got.dk, &want.dk),
        ("dv", &got.dv, &want.dv),
    ] {
        let reference: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let quantum = cpu::atol_for(T::PREC, &reference);
        let st = cpu::err_stats(a, &reference);
        if st.nan_count > 0 || st.max_abs > ulps * quantum {
            let w = st.worst_index;
            return Err(format!(
                "{name}: {st:?} exceeds {ulps} x {quantum} (worst: got {} want {})\n{}",
                a[w],
                b[w],
                ctx()
            ));
        }
    }
    if let (Some(a), Some(b)) = (&got.dsink, &want.dsink) {
        for (h, (x, y)) in a.iter().zip(b).enumerate() {
            if x.is_nan() || (x - y).abs() > 1e-3 * y.abs().max(1.0) {
                return Err(format!("dsink[{h}]: {x} vs reference {y}\n{}", ctx()));
            }
        }
    }
    Ok(got.info)
}

/// Runs `which` (deterministic) `runs` times on the same inputs and requires bitwise-identical
/// dq, dk, dv and dsink; also checks the first run against the GPU reference (`ulps` quanta).
pub fn check_bwd_bitwise_reruns<T: HostElem>(
    gpu: &Gpu,
    case: &Case,
    which: WhichBwd,
    runs: usize,
    ulps: f64,
) -> Result<(), String> {
    let pb = bwd_prepare::<T>(gpu, case, false)?;
    let first = bwd_run(gpu, case, &pb, which)?;
    // The sm90 family runs deterministic mode as its own kernel (`_main_det`, a second image).
    if first.info.cell.starts_with("sm90.") && !first.info.symbol.ends_with("_main_det") {
        return Err(format!(
            "deterministic mode ran {} (cell {})",
            first.info.symbol, first.info.cell
        ));
    }
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    for run in 1..runs {
        if run % 2 == 0 {
            // Every other rerun starts from a trimmed workspace pool (fresh allocations).
            flashattn_aot::release_workspace_memory().map_err(|e| e.to_string())?;
        }
        let again = bwd_run(gpu, case, &pb, which)?;
        for (name, a, b) in [
            ("dq", &first.dq, &again.dq),
            ("dk", &first.dk, &again.dk),
            ("dv", &first.dv, &again.dv),
        ] {
            if bits(a) != bits(b) {
                let i = a
                    .iter()
                    .zip(b.iter())
                    .position(|(x, y)| x.to_bits() != y.to_bits())
                    .unwrap_or(0);
                return Err(format!(
                    "{name} of run {run} differs from run 0 at {i}: {} vs {} ({})\ncase: {}",
                    b[i],
                    a[i],
                    first.info.symbol,
                    case.describe()
                ));
            }
        }
        if first.dsink.as_deref().map(bits) != again.dsink.as_deref().map(bits) {
            return Err(format!(
                "dsink of run {run} differs from run 0\ncase: {}",
                case.describe()
            ));
        }
    }
    let want = bwd_run(gpu, case, &pb, WhichBwd::Reference)?;
    for (name, a, b) in [
        ("dq", &first.dq, &want.dq),
        ("dk", &first.dk, &want.dk),
        ("dv", &first.dv, &want.dv),
    ] {
        let reference: Vec<f64> = b.iter().map(|&x| x as f64).collect();
        let quantum = cpu::atol_for(T::PREC, &reference);
        let st = cpu::err_stats(a, &reference);
        if st.nan_count > 0 || st.max_abs > ulps * quantum {
            return Err(format!(
                "{name}: {st:?} exceeds {ulps} x {quantum}\ncase: {}",
                case.describe()
            ));
        }
    }
    Ok(())
}
