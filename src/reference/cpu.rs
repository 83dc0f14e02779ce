//! The CPU oracle of the tests: the attention of `docs/semantics.md` in f64 (forward and
//! backward), a same-precision baseline in fp16/bf16, and FlashAttention's tolerance rule.
//!
//! Everything here is written from `docs/semantics.md` alone. The mask ([`visible`]) in particular
//! is built independently of the kernels' mask code, so that a mask bug in a kernel shows up as a
//! mismatch instead of being reproduced by the oracle.
//!
//! # Layout
//!
//! All buffers are host slices in the packed ("varlen") layout: q, o, dout `[total_q][heads][d]`,
//! k, v `[total_k][heads_k][d]`, where sequence `b` owns the `seqlens_q[b]` rows starting at
//! `sum(seqlens_q[..b])` (the same for keys with `seqlens_k`). LSE (and the backward's row dot
//! `D`) is `[heads][total_q]`. Dense problems are the varlen problem with all lengths equal.
//! Inputs are `f32` values that the caller already rounded to the kernel's dtype.
//!
//! # The test rule (FlashAttention's `test_flash_attn.py`)
//!
//! A kernel's output `out` is compared with the f64 reference `ref` and with the
//! [same-precision baseline](forward_lowp) `base` (the attention a framework computes in the
//! kernel's dtype):
//!
//! ```text
//! max|out - ref| <= 2 * max|base - ref| + atol,   and no NaN/inf where ref is finite
//! ```
//!
//! with `atol` the rounding quantum of the dtype at the reference's magnitude ([`atol_for`]).
//!
//! # Baseline rounding model
//!
//! [`forward_lowp`] and [`backward_lowp`] emulate a framework running attention in fp16/bf16:
//! every product is formed in f32 (exact for fp16/bf16 operands), every matmul accumulates in f32
//! in index order and its result is rounded to the dtype; elementwise chains run in f32 and are
//! rounded to the dtype once at their end. Precisely (`rnd` = round to nearest even in the dtype):
//!
//! ```text
//! forward, per (sequence, head, i, visible j):
//!   S_ij   = rnd(sum_d q_i[d] k_j[d])                                  (QK^T)
//!   t_ij   = tanh(scale * S_ij / softcap)                              (f32; softcap only)
//!   s_ij   = rnd(softcap * t_ij  (or scale * S_ij)  - slope * dist)    (one rounding for the chain)
//!   m_i    = max(max_j s_ij, sink);  e_ij = exp(s_ij - m_i);  l_i = sum_j e_ij + exp(sink - m_i)
//!   P_ij   = rnd(e_ij / l_i),   Psink_i = rnd(exp(sink - m_i) / l_i)   (softmax in f32, rounded)
//!   LSE_i  = m_i + ln(l_i)                                             (f32, not rounded)
//!   O_i    = rnd(sum_j P_ij v_j)                                       (PV)
//! backward:
//!   dP_ij  = rnd(sum_d dO_i[d] v_j[d])                                 (dO V^T)
//!   D_i    = sum_d dO_i[d] O_i[d]                                      (f32, FlashAttention's D:
//!                                                                       = sum_j P_ij dP_ij exactly)
//!   dS_ij  = rnd(P_ij (dP_ij - D_i))                                   (softmax backward)
//!   dR_ij  = rnd(dS_ij * (1 - t_ij^2) * scale)                         (chain backward; no tanh
//!                                                                       factor without softcap)
//!   dQ_i   = rnd(sum_j dR_ij k_j)
//!   dK_j^h = rnd(sum_i dR_ij q_i),  dV_j^h = rnd(sum_i P_ij dO_i)     (per query head h)
//!   dK_j   = rnd(sum_{h in group} dK_j^h)  (same for dV; the framework's sum over repeated KV)
//!   dsink  = sum_i rnd(Psink_i * (0 - D_i))                            (f32 sum, not rounded)
//! ```
//!
//! Fully masked rows give `O = 0`, `P = 0` and `LSE = -inf` (or the sink logit), as in the
//! reference; a framework's NaN there is what FlashAttention's test masks out too.

use half::{bf16, f16};

// ------------------------------------------------------------------------------------------------
// Problem description
// ------------------------------------------------------------------------------------------------

/// Which diagonal the mask (and the ALiBi distance) is aligned to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Query `i` of a sequence with `sq` queries and `sk` keys sits at key position `i + sk - sq`
    /// (FlashAttention's causal convention since 2.1).
    BottomRight,
    /// Query `i` sits at key position `i`.
    TopLeft,
}

/// Host description of one attention problem (dense = varlen with all lengths equal).
#[derive(Clone, Debug)]
pub struct Problem {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; `heads % heads_k == 0` (query head `h` reads kv head `h / (heads / heads_k)`).
    pub heads_k: usize,
    /// Head dimension of q, k, v.
    pub head_dim: usize,
    /// Query rows of each sequence (the batch size is its length).
    pub seqlens_q: Vec<usize>,
    /// Keys each sequence sees (already the "used" length, `seqused_k` when given).
    pub seqlens_k: Vec<usize>,
    /// Softmax scale (the API's default is `1 / sqrt(head_dim)`).
    pub scale: f64,
    /// Softcap `c`: scores become `c * tanh(s / c)`; 0 = off.
    pub softcap: f64,
    /// Left window bound in keys; negative = unbounded.
    pub window_left: i64,
    /// Right window bound in keys; negative = unbounded (0 = causal).
    pub window_right: i64,
    /// Alignment of the mask and of the ALiBi distance.
    pub align: Align,
    /// StreamingLLM sink tokens: the first `sink_tokens` keys ignore the left bound.
    pub sink_tokens: usize,
    /// ALiBi slopes: `heads` values (per head) or `batch * heads` values, row-major `[b][h]`.
    pub alibi_slopes: Option<Vec<f32>>,
    /// Learnable sink logits (gpt-oss): one per query head.
    pub sink_logits: Option<Vec<f32>>,
}

impl Problem {
    /// A problem without mask, bias or sinks, with the default scale `1 / sqrt(head_dim)`.
    pub fn new(heads: usize, heads_k: usize, head_dim: usize, seqlens_q: Vec<usize>, seqlens_k: Vec<usize>) -> Problem {
        Problem {
            heads,
            heads_k,
            head_dim,
            seqlens_q,
            seqlens_k,
            scale: 1.0 / (head_dim.max(1) as f64).sqrt(),
            softcap: 0.0,
            window_left: -1,
            window_right: -1,
            align: Align::BottomRight,
            sink_tokens: 0,
            alibi_slopes: None,
            sink_logits: None,
        }
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.seqlens_q.len()
    }

    /// Query rows of all sequences.
    pub fn total_q(&self) -> usize {
        self.seqlens_q.iter().sum()
    }

    /// Key rows of all sequences.
    pub fn total_k(&self) -> usize {
        self.seqlens_k.iter().sum()
    }

    /// The key/value head that query head `h` reads.
    pub fn kv_head(&self, h: usize) -> usize {
        h / (self.heads / self.heads_k)
    }

    /// `diag` of docs/semantics.md for sequence `b < batch`: the key position of query 0.
    pub fn diag(&self, b: usize) -> i64 {
        match self.align {
            Align::BottomRight => self.seqlens_k[b] as i64 - self.seqlens_q[b] as i64,
            Align::TopLeft => 0,
        }
    }

    /// ALiBi slope of (sequence `b`, query head `h`): per-head slopes when `heads` values are
    /// given, else the `[b][h]` entry. Needs a [valid](Problem::validate) problem, `b < batch`
    /// and `h < heads`.
    pub fn alibi_slope(&self, b: usize, h: usize) -> Option<f32> {
        let slopes = self.alibi_slopes.as_ref()?;
        if slopes.len() == self.heads {
            Some(slopes[h])
        } else {
            Some(slopes[b * self.heads + h])
        }
    }

    /// Sink logit of query head `h < heads`.
    pub fn sink_logit(&self, h: usize) -> Option<f32> {
        self.sink_logits.as_ref().map(|s| s[h])
    }

    /// Checks that the description is self-consistent; the message names the values.
    pub fn validate(&self) -> Result<(), String> {
        let (h, hk, batch) = (self.heads, self.heads_k, self.batch());
        if h == 0 || hk == 0 || h % hk != 0 {
            return Err(format!("heads ({h}) must be a positive multiple of heads_k ({hk})"));
        }
        if self.seqlens_k.len() != batch {
            return Err(format!(
                "{} key lengths for {batch} query lengths",
                self.seqlens_k.len()
            ));
        }
        if !self.scale.is_finite() {
            return Err(format!("scale {} is not finite", self.scale));
        }
        if !(self.softcap.is_finite() && self.softcap >= 0.0) {
            return Err(format!("softcap {} must be finite and >= 0", self.softcap));
        }
        let n_slopes = self.alibi_slopes.as_ref().map_or(h, Vec::len);
        if n_slopes != h && n_slopes != batch * h {
            return Err(format!(
                "{n_slopes} ALiBi slopes, want heads ({h}) or batch * heads ({})",
                batch * h
            ));
        }
        let n_sinks = self.sink_logits.as_ref().map_or(h, Vec::len);
        if n_sinks != h {
            return Err(format!("{n_sinks} sink logits, want one per query head ({h})"));
        }
        Ok(())
    }

    /// Validates the problem and the lengths of the packed buffers against it.
    fn validate_buffers(&self, q: &[f32], k: &[f32], v: &[f32], dout: Option<&[f32]>) -> Result<(), String> {
        self.validate()?;
        let q_len = self.total_q() * self.heads * self.head_dim;
        let kv_len = self.total_k() * self.heads_k * self.head_dim;
        let named = [("q", q.len(), q_len), ("k", k.len(), kv_len), ("v", v.len(), kv_len)];
        let dout = dout.map(|x| ("dout", x.len(), q_len));
        for (name, got, want) in named.into_iter().chain(dout) {
            if got != want {
                return Err(format!("{name} has {got} elements, the problem wants {want}"));
            }
        }
        Ok(())
    }

    /// Offset of (packed query row, query head) in q, o, dout.
    fn q_off(&self, row: usize, h: usize) -> usize {
        (row * self.heads + h) * self.head_dim
    }

    /// Offset of (packed key row, kv head) in k, v.
    fn kv_off(&self, row: usize, hk: usize) -> usize {
        (row * self.heads_k + hk) * self.head_dim
    }
}

/// Panics with the caller's name and the message when the inputs do not fit the problem.
fn check_inputs(who: &str, p: &Problem, q: &[f32], k: &[f32], v: &[f32], dout: Option<&[f32]>) {
    if let Err(e) = p.validate_buffers(q, k, v, dout) {
        panic!("cpu::{who}: {e}");
    }
}

/// Copies the first `used[b]` rows of each sequence out of a packed buffer whose sequence `b`
/// holds `capacity[b]` rows of `row_len` elements: turns k/v stored with `seqused_k` capacity
/// into the packed layout that [`Problem::seqlens_k`] (the used lengths) describes.
///
/// # Panics
/// When `data` holds fewer than `sum(capacity) * row_len` elements.
pub fn keep_used_rows(data: &[f32], capacity: &[usize], used: &[usize], row_len: usize) -> Vec<f32> {
    let mut out = Vec::new();
    let mut start = 0;
    for (&cap, &n) in capacity.iter().zip(used) {
        out.extend_from_slice(&data[start * row_len..(start + n.min(cap)) * row_len]);
        start += cap;
    }
    out
}

// ------------------------------------------------------------------------------------------------
// The mask
// ------------------------------------------------------------------------------------------------

/// Whether key `j` is visible to query `i` of sequence `b` (both 0-based within the sequence),
/// exactly as docs/semantics.md states it:
///
/// ```text
/// diag = (align == BottomRight) ? sk_b - sq_b : 0
/// (window_right < 0  or  j <= i + diag + window_right)
/// and (window_left < 0  or  j >= i + diag - window_left  or  j < sink_tokens)
/// ```
///
/// Out-of-range `b`, `i >= sq_b` or `j >= sk_b` are not visible.
pub fn visible(p: &Problem, b: usize, i: usize, j: usize) -> bool {
    let (Some(&sq), Some(&sk)) = (p.seqlens_q.get(b), p.seqlens_k.get(b)) else {
        return false;
    };
    if i >= sq || j >= sk {
        return false;
    }
    let pos = i as i64 + p.diag(b); // the key position query i is aligned with
    let j_key = j as i64;
    let right_ok = p.window_right < 0 || j_key <= pos.saturating_add(p.window_right);
    let left_ok = p.window_left < 0 || j_key >= pos.saturating_sub(p.window_left) || j < p.sink_tokens;
    right_ok && left_ok
}

/// ALiBi distance `|i + diag - j|`.
fn alibi_distance(i: usize, j: usize, diag: i64) -> i64 {
    (i as i64 + diag - j as i64).abs()
}

/// One sequence of the batch and where its rows start in the packed buffers.
#[derive(Clone, Copy, Debug)]
struct Seq {
    b: usize,
    q0: usize,
    k0: usize,
    sq: usize,
    sk: usize,
}

fn sequences(p: &Problem) -> Vec<Seq> {
    let (mut q0, mut k0) = (0, 0);
    let mut out = Vec::with_capacity(p.batch());
    for (b, (&sq, &sk)) in p.seqlens_q.iter().zip(&p.seqlens_k).enumerate() {
        out.push(Seq { b, q0, k0, sq, sk });
        q0 += sq;
        k0 += sk;
    }
    out
}

// ------------------------------------------------------------------------------------------------
// f64 reference
// ------------------------------------------------------------------------------------------------

/// Output of [`forward`].
#[derive(Clone, Debug)]
pub struct FwdOut {
    /// `[total_q][heads][head_dim]`.
    pub o: Vec<f64>,
    /// `[heads][total_q]`, natural log; `-inf` (or the sink logit) for rows with no visible key.
    pub lse: Vec<f64>,
}

/// Output of [`backward`].
#[derive(Clone, Debug)]
pub struct BwdOut {
    /// `[total_q][heads][head_dim]`.
    pub dq: Vec<f64>,
    /// `[total_k][heads_k][head_dim]`, summed over the query heads of each kv head.
    pub dk: Vec<f64>,
    /// `[total_k][heads_k][head_dim]`, summed over the query heads of each kv head.
    pub dv: Vec<f64>,
    /// `[heads]`; `None` without sink logits.
    pub dsink: Option<Vec<f64>>,
}

/// The attention forward of docs/semantics.md in f64 (inputs widened exactly from f32).
///
/// Rows with no visible key give `O = 0` and `LSE = -inf`, or `LSE = sink_logit` with sink logits.
///
/// # Panics
/// When the problem is invalid ([`Problem::validate`]) or a buffer's length does not fit it.
pub fn forward(p: &Problem, q: &[f32], k: &[f32], v: &[f32]) -> FwdOut {
    check_inputs("forward", p, q, k, v, None);
    forward_f64(p, &widen(q), &widen(k), &widen(v))
}

/// The attention backward of docs/semantics.md in f64; recomputes the forward (`O`, `LSE`, `P`) in
/// f64, so `D_i = dO_i . O_i` uses the exact `O`. Rows with no visible key contribute nothing.
///
/// # Panics
/// When the problem is invalid ([`Problem::validate`]) or a buffer's length does not fit it.
pub fn backward(p: &Problem, q: &[f32], k: &[f32], v: &[f32], dout: &[f32]) -> BwdOut {
    check_inputs("backward", p, q, k, v, Some(dout));
    backward_f64(p, &widen(q), &widen(k), &widen(v), &widen(dout))
}

fn widen(x: &[f32]) -> Vec<f64> {
    x.iter().map(|&v| f64::from(v)).collect()
}

fn dot_f64(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `acc += alpha * x`.
fn axpy_f64(acc: &mut [f64], alpha: f64, x: &[f64]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += alpha * v;
    }
}

/// The softmax of one (sequence, query head) in f64: what both passes need.
struct HeadSoftmax {
    /// `[sq][sk]`: `P_ij = exp(s_ij - LSE_i)` on visible keys, 0 elsewhere.
    p: Vec<f64>,
    /// `[sq][sk]`: the softcap derivative `1 - tanh^2` (1 without softcap).
    dcap: Vec<f64>,
    /// `[sq]`: `LSE_i`.
    lse: Vec<f64>,
}

fn softmax_f64(p: &Problem, seq: Seq, h: usize, q: &[f64], k: &[f64]) -> HeadSoftmax {
    let (d, hk, sk) = (p.head_dim, p.kv_head(h), seq.sk);
    let slope = p.alibi_slope(seq.b, h).map(f64::from);
    let sink = p.sink_logit(h).map(f64::from);
    let diag = p.diag(seq.b);
    // s = -inf marks a masked entry.
    let mut s = vec![f64::NEG_INFINITY; seq.sq * sk];
    let mut dcap = vec![1.0; seq.sq * sk];
    let mut lse = vec![f64::NEG_INFINITY; seq.sq];
    for (i, lse_i) in lse.iter_mut().enumerate() {
        let qi = &q[p.q_off(seq.q0 + i, h)..][..d];
        let s_row = &mut s[i * sk..(i + 1) * sk];
        let dcap_row = &mut dcap[i * sk..(i + 1) * sk];
        for (j, (s_ij, dcap_ij)) in s_row.iter_mut().zip(dcap_row).enumerate() {
            if !visible(p, seq.b, i, j) {
                continue;
            }
            let kj = &k[p.kv_off(seq.k0 + j, hk)..][..d];
            let mut x = p.scale * dot_f64(qi, kj);
            if p.softcap > 0.0 {
                let t = (x / p.softcap).tanh();
                x = p.softcap * t;
                *dcap_ij = 1.0 - t * t;
            }
            if let Some(slope) = slope {
                x -= slope * alibi_distance(i, j, diag) as f64;
            }
            *s_ij = x;
        }
        let m = s_row.iter().copied().chain(sink).fold(f64::NEG_INFINITY, f64::max);
        if m > f64::NEG_INFINITY {
            let z: f64 = s_row.iter().copied().chain(sink).map(|x| (x - m).exp()).sum();
            *lse_i = m + z.ln();
        }
    }
    let mut prob = vec![0.0; seq.sq * sk];
    for (i, &lse_i) in lse.iter().enumerate() {
        for (p_ij, &s_ij) in prob[i * sk..(i + 1) * sk].iter_mut().zip(&s[i * sk..(i + 1) * sk]) {
            if s_ij > f64::NEG_INFINITY {
                *p_ij = (s_ij - lse_i).exp();
            }
        }
    }
    HeadSoftmax { p: prob, dcap, lse }
}

fn forward_f64(p: &Problem, q: &[f64], k: &[f64], v: &[f64]) -> FwdOut {
    let (d, total_q) = (p.head_dim, p.total_q());
    let mut o = vec![0.0; total_q * p.heads * d];
    let mut lse = vec![f64::NEG_INFINITY; p.heads * total_q];
    for seq in sequences(p) {
        for h in 0..p.heads {
            let hk = p.kv_head(h);
            let sm = softmax_f64(p, seq, h, q, k);
            for (i, &lse_i) in sm.lse.iter().enumerate() {
                let o_i = &mut o[p.q_off(seq.q0 + i, h)..][..d];
                for (j, &p_ij) in sm.p[i * seq.sk..(i + 1) * seq.sk].iter().enumerate() {
                    if p_ij != 0.0 {
                        axpy_f64(o_i, p_ij, &v[p.kv_off(seq.k0 + j, hk)..][..d]);
                    }
                }
                lse[h * total_q + seq.q0 + i] = lse_i;
            }
        }
    }
    FwdOut { o, lse }
}

fn backward_f64(p: &Problem, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> BwdOut {
    let d = p.head_dim;
    let mut dq = vec![0.0; q.len()];
    let mut dk = vec![0.0; k.len()];
    let mut dv = vec![0.0; v.len()];
    let mut dsink = p.sink_logits.as_ref().map(|_| vec![0.0; p.heads]);
    let mut o_i = vec![0.0; d];
    for seq in sequences(p) {
        for h in 0..p.heads {
            let hk = p.kv_head(h);
            let sm = softmax_f64(p, seq, h, q, k);
            for (i, &lse_i) in sm.lse.iter().enumerate() {
                let p_row = &sm.p[i * seq.sk..(i + 1) * seq.sk];
                let dcap_row = &sm.dcap[i * seq.sk..(i + 1) * seq.sk];
                let qi_off = p.q_off(seq.q0 + i, h);
                let do_i = &dout[qi_off..][..d];
                o_i.fill(0.0);
                for (j, &p_ij) in p_row.iter().enumerate() {
                    axpy_f64(&mut o_i, p_ij, &v[p.kv_off(seq.k0 + j, hk)..][..d]);
                }
                let d_i = dot_f64(do_i, &o_i);
                if let (Some(ds), Some(sink)) = (dsink.as_mut(), p.sink_logit(h)) {
                    ds[h] -= (f64::from(sink) - lse_i).exp() * d_i;
                }
                for (j, (&p_ij, &dcap_ij)) in p_row.iter().zip(dcap_row).enumerate() {
                    if p_ij == 0.0 {
                        continue; // masked (or underflowed): no contribution
                    }
                    let kj_off = p.kv_off(seq.k0 + j, hk);
                    let dp_ij = dot_f64(do_i, &v[kj_off..][..d]);
                    // dS' times the scale: the gradient with respect to q.k.
                    let ds_ij = p_ij * (dp_ij - d_i) * dcap_ij * p.scale;
                    axpy_f64(&mut dq[qi_off..][..d], ds_ij, &k[kj_off..][..d]);
                    axpy_f64(&mut dk[kj_off..][..d], ds_ij, &q[qi_off..][..d]);
                    axpy_f64(&mut dv[kj_off..][..d], p_ij, do_i);
                }
            }
        }
    }
    BwdOut { dq, dk, dv, dsink }
}

// ------------------------------------------------------------------------------------------------
// Same-precision baseline
// ------------------------------------------------------------------------------------------------

/// The 16-bit dtype a kernel runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LowPrecision {
    /// IEEE binary16: 10 stored mantissa bits.
    F16,
    /// bfloat16: 7 stored mantissa bits.
    Bf16,
}

impl LowPrecision {
    /// Stored mantissa bits.
    pub fn mantissa_bits(self) -> i32 {
        match self {
            LowPrecision::F16 => 10,
            LowPrecision::Bf16 => 7,
        }
    }
}

/// `x` rounded to the dtype (round to nearest, ties to even) and widened back to f32.
pub fn round_to(prec: LowPrecision, x: f32) -> f32 {
    match prec {
        LowPrecision::F16 => f16::from_f32(x).to_f32(),
        LowPrecision::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Dot product accumulated in f32 in index order.
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |acc, (x, y)| acc + x * y)
}

/// `acc += alpha * x` in f32.
fn axpy_f32(acc: &mut [f32], alpha: f32, x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += alpha * v;
    }
}

fn round_all(prec: LowPrecision, x: &mut [f32]) {
    for v in x {
        *v = round_to(prec, *v);
    }
}

/// The softmax of one (sequence, query head) as a framework computes it in the low dtype.
struct HeadSoftmaxLowp {
    /// `[sq][sk]`: `P_ij` rounded to the dtype, 0 where masked.
    p: Vec<f32>,
    /// `[sq][sk]`: `(1 - t^2) * scale`, the chain's derivative with respect to `S`.
    dchain: Vec<f32>,
    /// `[sq]`: `LSE_i` in f32.
    lse: Vec<f32>,
    /// `[sq]`: the sink's probability rounded to the dtype (0 without sink logits).
    p_sink: Vec<f32>,
}

fn softmax_lowp(p: &Problem, seq: Seq, h: usize, q: &[f32], k: &[f32], prec: LowPrecision) -> HeadSoftmaxLowp {
    let (d, hk, sk) = (p.head_dim, p.kv_head(h), seq.sk);
    let (scale, cap) = (p.scale as f32, p.softcap as f32);
    let slope = p.alibi_slope(seq.b, h);
    let sink = p.sink_logit(h);
    let diag = p.diag(seq.b);
    let mut s = vec![f32::NEG_INFINITY; seq.sq * sk];
    let mut dchain = vec![scale; seq.sq * sk];
    let mut lse = vec![f32::NEG_INFINITY; seq.sq];
    let mut p_sink = vec![0.0; seq.sq];
    let mut prob = vec![0.0; seq.sq * sk];
    for (i, (lse_i, p_sink_i)) in lse.iter_mut().zip(&mut p_sink).enumerate() {
        let qi = &q[p.q_off(seq.q0 + i, h)..][..d];
        let s_row = &mut s[i * sk..(i + 1) * sk];
        let dchain_row = &mut dchain[i * sk..(i + 1) * sk];
        for (j, (s_ij, dchain_ij)) in s_row.iter_mut().zip(dchain_row).enumerate() {
            if !visible(p, seq.b, i, j) {
                continue;
            }
            let raw = round_to(prec, dot_f32(qi, &k[p.kv_off(seq.k0 + j, hk)..][..d]));
            let mut x = scale * raw;
            if cap > 0.0 {
                let t = (x / cap).tanh();
                x = cap * t;
                *dchain_ij = (1.0 - t * t) * scale;
            }
            if let Some(slope) = slope {
                x -= slope * alibi_distance(i, j, diag) as f32;
            }
            *s_ij = round_to(prec, x);
        }
        let m = s_row.iter().copied().chain(sink).fold(f32::NEG_INFINITY, f32::max);
        if m == f32::NEG_INFINITY {
            continue; // no visible key and no sink: P = 0, LSE = -inf
        }
        let p_row = &mut prob[i * sk..(i + 1) * sk];
        let mut l = 0.0f32;
        for (p_ij, &s_ij) in p_row.iter_mut().zip(s_row.iter()) {
            *p_ij = (s_ij - m).exp(); // exp(-inf) = 0 on masked entries
            l += *p_ij;
        }
        let e_sink = sink.map_or(0.0, |x| (x - m).exp());
        l += e_sink;
        for p_ij in p_row.iter_mut() {
            *p_ij = round_to(prec, *p_ij / l);
        }
        *p_sink_i = round_to(prec, e_sink / l);
        *lse_i = m + l.ln();
    }
    HeadSoftmaxLowp {
        p: prob,
        dchain,
        lse,
        p_sink,
    }
}

/// The same-precision baseline forward: attention as a framework computes it in `prec` (see the
/// module docs for every rounding). Returns `(o, lse)` in the layouts of [`forward`]; `o` values
/// are representable in `prec`, `lse` is f32.
///
/// # Panics
/// When the problem is invalid ([`Problem::validate`]) or a buffer's length does not fit it.
pub fn forward_lowp(p: &Problem, q: &[f32], k: &[f32], v: &[f32], prec: LowPrecision) -> (Vec<f32>, Vec<f32>) {
    check_inputs("forward_lowp", p, q, k, v, None);
    let (d, total_q) = (p.head_dim, p.total_q());
    let mut o = vec![0.0; q.len()];
    let mut lse = vec![f32::NEG_INFINITY; p.heads * total_q];
    for seq in sequences(p) {
        for h in 0..p.heads {
            let hk = p.kv_head(h);
            let sm = softmax_lowp(p, seq, h, q, k, prec);
            for (i, &lse_i) in sm.lse.iter().enumerate() {
                let o_i = &mut o[p.q_off(seq.q0 + i, h)..][..d];
                for (j, &p_ij) in sm.p[i * seq.sk..(i + 1) * seq.sk].iter().enumerate() {
                    if p_ij != 0.0 {
                        axpy_f32(o_i, p_ij, &v[p.kv_off(seq.k0 + j, hk)..][..d]);
                    }
                }
                round_all(prec, o_i);
                lse[h * total_q + seq.q0 + i] = lse_i;
            }
        }
    }
    (o, lse)
}

/// The same-precision baseline backward: `(dq, dk, dv, dsink)` as a framework's autograd computes
/// them in `prec` (see the module docs for every rounding). `dq`, `dk`, `dv` are representable in
/// `prec`; `dsink` is an f32 sum.
///
/// # Panics
/// When the problem is invalid ([`Problem::validate`]) or a buffer's length does not fit it.
pub fn backward_lowp(
    p: &Problem,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    prec: LowPrecision,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Option<Vec<f32>>) {
    check_inputs("backward_lowp", p, q, k, v, Some(dout));
    let d = p.head_dim;
    let mut dq = vec![0.0; q.len()];
    // Sums over each kv head's group of the per-query-head gradients (already rounded).
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    let mut dsink = p.sink_logits.as_ref().map(|_| vec![0.0f32; p.heads]);
    let mut dp_row = Vec::new();
    let mut o_row = Vec::new();
    for seq in sequences(p) {
        for h in 0..p.heads {
            let hk = p.kv_head(h);
            let sm = softmax_lowp(p, seq, h, q, k, prec);
            let mut dk_h = vec![0.0f32; seq.sk * d]; // [sk][d] for this query head
            let mut dv_h = vec![0.0f32; seq.sk * d];
            for (i, &p_sink_i) in sm.p_sink.iter().enumerate() {
                let p_row = &sm.p[i * seq.sk..(i + 1) * seq.sk];
                let dchain_row = &sm.dchain[i * seq.sk..(i + 1) * seq.sk];
                let qi_off = p.q_off(seq.q0 + i, h);
                let (q_i, do_i) = (&q[qi_off..][..d], &dout[qi_off..][..d]);
                // dP = dO V^T (rounded).
                dp_row.clear();
                dp_row.extend(p_row.iter().enumerate().map(|(j, &p_ij)| {
                    if p_ij == 0.0 {
                        0.0
                    } else {
                        round_to(prec, dot_f32(do_i, &v[p.kv_off(seq.k0 + j, hk)..][..d]))
                    }
                }));
                // D = rowsum(dO * O) with O as the forward wrote it (rounded), as FlashAttention's
                // algorithm computes it: sum_j P dP in exact arithmetic, but not cancelling
                // bit for bit against the rounded dP (e.g. with one key, where dS is exactly 0).
                o_row.clear();
                o_row.resize(d, 0.0);
                for (j, &p_ij) in p_row.iter().enumerate() {
                    if p_ij != 0.0 {
                        axpy_f32(&mut o_row, p_ij, &v[p.kv_off(seq.k0 + j, hk)..][..d]);
                    }
                }
                round_all(prec, &mut o_row);
                let d_i = dot_f32(do_i, &o_row);
                if let Some(ds) = dsink.as_mut() {
                    ds[h] += round_to(prec, p_sink_i * (0.0 - d_i));
                }
                let dq_i = &mut dq[qi_off..][..d];
                for (j, ((&p_ij, &dp_ij), &dchain_ij)) in p_row.iter().zip(&dp_row).zip(dchain_row).enumerate() {
                    if p_ij == 0.0 {
                        continue; // dS = 0 and P dO = 0
                    }
                    let ds_ij = round_to(prec, p_ij * (dp_ij - d_i));
                    let dr_ij = round_to(prec, ds_ij * dchain_ij);
                    axpy_f32(dq_i, dr_ij, &k[p.kv_off(seq.k0 + j, hk)..][..d]);
                    axpy_f32(&mut dk_h[j * d..(j + 1) * d], dr_ij, q_i);
                    axpy_f32(&mut dv_h[j * d..(j + 1) * d], p_ij, do_i);
                }
                round_all(prec, dq_i);
            }
            round_all(prec, &mut dk_h);
            round_all(prec, &mut dv_h);
            for j in 0..seq.sk {
                let off = p.kv_off(seq.k0 + j, hk);
                axpy_f32(&mut dk[off..][..d], 1.0, &dk_h[j * d..(j + 1) * d]);
                axpy_f32(&mut dv[off..][..d], 1.0, &dv_h[j * d..(j + 1) * d]);
            }
        }
    }
    round_all(prec, &mut dk);
    round_all(prec, &mut dv);
    (dq, dk, dv, dsink)
}

// ------------------------------------------------------------------------------------------------
// Tolerance rule
// ------------------------------------------------------------------------------------------------

/// Error of an output against the f64 reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ErrStats {
    /// Largest `|out - ref|` over elements where both are finite.
    pub max_abs: f64,
    /// Mean `|out - ref|` over all elements (mismatches and matching infinities count as 0).
    pub mean_abs: f64,
    /// The first mismatch when `nan_count > 0`, else where `max_abs` is reached (first such).
    pub worst_index: usize,
    /// Mismatches: a NaN/inf where the reference is finite, a value that differs from an infinite
    /// reference (another infinity included), a NaN reference, or an element missing from either
    /// slice.
    pub nan_count: usize,
}

/// Compares `out` with `reference` element by element. A matching infinity (`-inf` against
/// `-inf`, the LSE of a fully masked row) is exact; see [`ErrStats`] for what counts as a mismatch.
pub fn err_stats(out: &[f32], reference: &[f64]) -> ErrStats {
    let n = out.len().max(reference.len());
    let mut st = ErrStats {
        max_abs: 0.0,
        mean_abs: 0.0,
        worst_index: 0,
        nan_count: 0,
    };
    let mut first_mismatch = None;
    let mut sum = 0.0;
    for idx in 0..n {
        let (o, r) = match (out.get(idx), reference.get(idx)) {
            (Some(&o), Some(&r)) => (f64::from(o), r),
            _ => (f64::NAN, f64::NAN),
        };
        if r.is_finite() && o.is_finite() {
            let e = (o - r).abs();
            sum += e;
            if e > st.max_abs {
                st.max_abs = e;
                st.worst_index = idx;
            }
        } else if !(r.is_infinite() && o == r) {
            st.nan_count += 1;
            first_mismatch.get_or_insert(idx);
        }
    }
    if n > 0 {
        st.mean_abs = sum / n as f64;
    }
    if let Some(idx) = first_mismatch {
        st.worst_index = idx;
    }
    st
}

/// FlashAttention's rule: `max|out - ref| <= 2 * max|baseline - ref| + atol` and no mismatch (NaN,
/// inf, missing element; see [`ErrStats`]). `Ok` carries `out`'s statistics; `Err` a message with
/// all the numbers, the worst index and the three values there.
pub fn check_close(
    name: &str,
    out: &[f32],
    reference: &[f64],
    baseline: &[f32],
    atol: f64,
) -> Result<ErrStats, String> {
    if out.len() != reference.len() || baseline.len() != reference.len() {
        return Err(format!(
            "{name}: lengths differ: out {}, reference {}, baseline {}",
            out.len(),
            reference.len(),
            baseline.len()
        ));
    }
    let st = err_stats(out, reference);
    let base = err_stats(baseline, reference);
    let tol = 2.0 * base.max_abs + atol;
    if st.nan_count == 0 && st.max_abs <= tol {
        return Ok(st);
    }
    let w = st.worst_index;
    Err(format!(
        "{name}: max|out - ref| = {:.4e} vs tolerance {tol:.4e} = 2 * {:.4e} (max|baseline - ref|) + atol {atol:.4e}; \
         {} NaN/inf mismatches; worst index {w}: out {}, ref {}, baseline {}; mean|out - ref| = {:.4e} \
         (baseline {:.4e}); {} elements",
        st.max_abs,
        base.max_abs,
        st.nan_count,
        out[w],
        reference[w],
        baseline[w],
        st.mean_abs,
        base.mean_abs,
        out.len(),
    ))
}

/// `2^floor(log2 m)` for a normal `m > 0`, exact (the exponent bits of `m`).
fn binade(m: f64) -> f64 {
    f64::from_bits(m.to_bits() & (0x7ff << 52))
}

/// Largest finite magnitude of `x`, floored at `2^-14` (fp16's smallest normal) so that an all-zero
/// reference still gets a positive quantum.
fn magnitude(x: &[f64]) -> f64 {
    x.iter()
        .filter(|v| v.is_finite())
        .fold(2f64.powi(-14), |m, v| m.max(v.abs()))
}

/// The rounding quantum of `prec` at the reference's magnitude: the spacing of the dtype's numbers
/// at `m = max(max|finite ref|, 0.3)`,
///
/// ```text
/// atol = 2^(floor(log2 m) - mantissa_bits)     bf16: 2^-7 * 2^floor(log2 m),  fp16: 2^-10 * ...
/// ```
///
/// i.e. `2^-8` (bf16) or `2^-11` (fp16) times `m` rounded up to the next power of two (strictly
/// above `m`). This is the size of FlashAttention's `(ref + 0.3 - 0.3 - ref).abs().max()`, 0.3
/// floor included: one unit in the last place of the largest output, and never less than the
/// quantum at 0.3, so an output whose exact value is ~0 (e.g. dq when every row sees one key) is
/// not held to a tolerance below the rounding of the terms it is computed from.
pub fn atol_for(prec: LowPrecision, reference: &[f64]) -> f64 {
    binade(magnitude(reference).max(0.3)) * 2f64.powi(-prec.mantissa_bits())
}

/// A tolerance for f32 outputs such as LSE: 64 f32 units in the last place at `max|finite ref|`
/// (`2^(floor(log2 m) - 17)`), room for fast `exp2`/`log2` approximations and a different
/// summation order.
pub fn atol_f32(reference: &[f64]) -> f64 {
    binade(magnitude(reference)) * 2f64.powi(-23 + 6)
}

// ------------------------------------------------------------------------------------------------
// Deterministic test data
// ------------------------------------------------------------------------------------------------

/// A small deterministic RNG (SplitMix64) for test data; no external crates.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator whose stream depends only on `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits (SplitMix64).
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in the open interval (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) * 2f64.powi(-53)
    }

    /// Standard normal (Box-Muller, cosine branch).
    pub fn normal(&mut self) -> f32 {
        let (u1, u2) = (self.uniform(), self.uniform());
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// `n` values `randn + 0.5` rounded to `prec` (FlashAttention's test data convention).
pub fn randn_plus_half(rng: &mut Rng, n: usize, prec: LowPrecision) -> Vec<f32> {
    (0..n).map(|_| round_to(prec, rng.normal() + 0.5)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BF: LowPrecision = LowPrecision::Bf16;
    const ALL_PREC: [LowPrecision; 2] = [LowPrecision::F16, LowPrecision::Bf16];

    /// Random q, k, v, dout for `p` (dtype-rounded, FlashAttention's convention).
    fn data(p: &Problem, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut rng = Rng::new(seed);
        let (nq, nk) = (p.total_q() * p.heads * p.head_dim, p.total_k() * p.heads_k * p.head_dim);
        let q = randn_plus_half(&mut rng, nq, BF);
        let k = randn_plus_half(&mut rng, nk, BF);
        let v = randn_plus_half(&mut rng, nk, BF);
        let dout = randn_plus_half(&mut rng, nq, BF);
        (q, k, v, dout)
    }

    fn max_diff(a: &[f64], b: &[f64]) -> f64 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
    }

    fn visible_set(p: &Problem, b: usize, i: usize) -> Vec<usize> {
        (0..p.seqlens_k[b]).filter(|&j| visible(p, b, i, j)).collect()
    }

    fn one_seq(sq: usize, sk: usize) -> Problem {
        Problem::new(1, 1, 1, vec![sq], vec![sk])
    }

    #[test]
    fn hand_computed_two_keys() {
        // d = 1, q = 1, k = (1, 2), v = (3, 5), scale 1: s = (1, 2).
        let e = std::f64::consts::E;
        let mut p = one_seq(1, 2);
        p.scale = 1.0;
        let (q, k, v) = ([1.0], [1.0, 2.0], [3.0, 5.0]);
        let check = |p: &Problem, s: [f64; 2], sink: Option<f64>| {
            let z = s[0].exp() + s[1].exp() + sink.map_or(0.0, f64::exp);
            let r = forward(p, &q, &k, &v);
            assert!((r.lse[0] - z.ln()).abs() < 1e-12, "{:?} vs {}", r.lse, z.ln());
            let o = (3.0 * s[0].exp() + 5.0 * s[1].exp()) / z;
            assert!((r.o[0] - o).abs() < 1e-12, "{:?} vs {o}", r.o);
        };
        check(&p, [1.0, 2.0], None);
        let r = forward(&p, &q, &k, &v);
        assert!((r.o[0] - (3.0 + 5.0 * e) / (1.0 + e)).abs() < 1e-12);
        assert!((r.lse[0] - (1.0 + (1.0 + e).ln())).abs() < 1e-12);
        // Scale 0.5.
        p.scale = 0.5;
        check(&p, [0.5, 1.0], None);
        // Softcap 1.5 after the scale.
        p.softcap = 1.5;
        check(&p, [1.5 * (0.5f64 / 1.5).tanh(), 1.5 * (1.0f64 / 1.5).tanh()], None);
        // ALiBi after the softcap: bottom-right diag = sk - sq = 1, distances |0 + 1 - j| = (1, 0).
        p.alibi_slopes = Some(vec![0.25]);
        let capped = [1.5 * (0.5f64 / 1.5).tanh() - 0.25, 1.5 * (1.0f64 / 1.5).tanh()];
        check(&p, capped, None);
        // Top-left: distances (0, 1).
        p.align = Align::TopLeft;
        check(
            &p,
            [1.5 * (0.5f64 / 1.5).tanh(), 1.5 * (1.0f64 / 1.5).tanh() - 0.25],
            None,
        );
        // A sink logit joins the denominator only.
        p.sink_logits = Some(vec![0.75]);
        check(
            &p,
            [1.5 * (0.5f64 / 1.5).tanh(), 1.5 * (1.0f64 / 1.5).tanh() - 0.25],
            Some(0.75),
        );
    }

    #[test]
    fn causal_alignment_with_sq_ne_sk() {
        let mut p = one_seq(2, 5);
        p.window_right = 0;
        assert_eq!(visible_set(&p, 0, 0), [0, 1, 2, 3]);
        assert_eq!(visible_set(&p, 0, 1), [0, 1, 2, 3, 4]);
        p.align = Align::TopLeft;
        assert_eq!(visible_set(&p, 0, 0), [0]);
        assert_eq!(visible_set(&p, 0, 1), [0, 1]);
        // More queries than keys: bottom-right leaves the first sq - sk rows empty.
        let mut p = one_seq(5, 2);
        p.window_right = 0;
        let empty: [usize; 0] = [];
        for i in 0..3 {
            assert_eq!(visible_set(&p, 0, i), empty, "row {i}");
        }
        assert_eq!(visible_set(&p, 0, 3), [0]);
        assert_eq!(visible_set(&p, 0, 4), [0, 1]);
        p.align = Align::TopLeft;
        assert_eq!(visible_set(&p, 0, 0), [0]);
        for i in 1..5 {
            assert_eq!(visible_set(&p, 0, i), [0, 1], "row {i}");
        }
        // Out of range is never visible.
        assert!(!visible(&p, 0, 5, 0) && !visible(&p, 0, 0, 2) && !visible(&p, 1, 0, 0));
    }

    #[test]
    fn window_and_sink_tokens() {
        // Window (2, 1), top-left, 2 sink tokens: row i sees [i - 2, i + 1] plus keys 0 and 1.
        let mut p = one_seq(8, 8);
        p.align = Align::TopLeft;
        (p.window_left, p.window_right, p.sink_tokens) = (2, 1, 2);
        assert_eq!(visible_set(&p, 0, 0), [0, 1]);
        assert_eq!(visible_set(&p, 0, 5), [0, 1, 3, 4, 5, 6]);
        assert_eq!(visible_set(&p, 0, 7), [0, 1, 5, 6, 7]);
        // Causal window left 1 with 3 sinks: sinks still obey the right (causal) bound.
        (p.window_left, p.window_right, p.sink_tokens) = (1, 0, 3);
        assert_eq!(visible_set(&p, 0, 0), [0]);
        assert_eq!(visible_set(&p, 0, 1), [0, 1]);
        assert_eq!(visible_set(&p, 0, 6), [0, 1, 2, 5, 6]);
        // Bottom-right with sk = sq + 2 shifts the window by 2.
        let mut p = one_seq(3, 5);
        (p.window_left, p.window_right, p.sink_tokens) = (1, 0, 1);
        assert_eq!(visible_set(&p, 0, 0), [0, 1, 2]);
        assert_eq!(visible_set(&p, 0, 2), [0, 3, 4]);
        // Right bound only (left unbounded).
        (p.window_left, p.window_right, p.sink_tokens) = (-1, 1, 0);
        assert_eq!(visible_set(&p, 0, 0), [0, 1, 2, 3]);
        // Huge windows do not overflow.
        (p.window_left, p.window_right) = (i64::MAX, i64::MAX);
        assert_eq!(visible_set(&p, 0, 0), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn forward_averages_exactly_the_visible_keys() {
        // Identical keys give equal scores, so O_i is the mean of v over the visible set.
        let mut p = Problem::new(2, 1, 3, vec![6, 4], vec![4, 9]);
        (p.window_left, p.window_right, p.sink_tokens) = (2, 0, 1);
        let mut rng = Rng::new(7);
        let q = randn_plus_half(&mut rng, p.total_q() * 2 * 3, BF);
        let k = vec![0.5; p.total_k() * 3];
        let v = randn_plus_half(&mut rng, p.total_k() * 3, BF);
        let r = forward(&p, &q, &k, &v);
        let mut some_empty = false;
        for seq in sequences(&p) {
            for h in 0..2 {
                for i in 0..seq.sq {
                    let vis = visible_set(&p, seq.b, i);
                    some_empty |= vis.is_empty();
                    let o = &r.o[p.q_off(seq.q0 + i, h)..][..3];
                    for (x, &o_x) in o.iter().enumerate() {
                        let mean = vis.iter().map(|&j| f64::from(v[(seq.k0 + j) * 3 + x])).sum::<f64>()
                            / vis.len().max(1) as f64;
                        assert!((o_x - mean).abs() < 1e-12, "b {} h {h} i {i}: {o_x} vs {mean}", seq.b);
                    }
                    let lse = r.lse[h * p.total_q() + seq.q0 + i];
                    if vis.is_empty() {
                        assert_eq!(lse, f64::NEG_INFINITY);
                    }
                }
            }
        }
        assert!(some_empty, "the case should contain fully masked rows");
    }

    #[test]
    fn fully_masked_rows_write_zero_and_contribute_nothing() {
        // sq = 4, sk = 2, bottom-right causal: rows 0 and 1 see nothing.
        let mut p = Problem::new(2, 2, 4, vec![4], vec![2]);
        p.window_right = 0;
        let (q, k, v, dout) = data(&p, 3);
        for sinks in [None, Some(vec![0.3f32, -1.25])] {
            p.sink_logits = sinks.clone();
            let r = forward(&p, &q, &k, &v);
            for h in 0..2 {
                for i in 0..2 {
                    assert!(r.o[p.q_off(i, h)..][..4].iter().all(|&x| x == 0.0));
                    let want = sinks.as_ref().map_or(f64::NEG_INFINITY, |s| f64::from(s[h]));
                    assert_eq!(r.lse[h * 4 + i], want);
                }
            }
            let g = backward(&p, &q, &k, &v, &dout);
            assert!(g.dq[..p.q_off(2, 0)].iter().all(|&x| x == 0.0));
            // The same problem without the masked rows (rows 2, 3 become top-left rows 0, 1).
            let mut tail = p.clone();
            tail.seqlens_q = vec![2];
            let cut = p.q_off(2, 0);
            let gt = backward(&tail, &q[cut..], &k, &v, &dout[cut..]);
            assert!(max_diff(&g.dq[cut..], &gt.dq) < 1e-14);
            assert!(max_diff(&g.dk, &gt.dk) < 1e-14);
            assert!(max_diff(&g.dv, &gt.dv) < 1e-14);
            if let (Some(a), Some(b)) = (&g.dsink, &gt.dsink) {
                assert!(max_diff(a, b) < 1e-14);
            }
            assert_eq!(g.dsink.is_some(), sinks.is_some());
        }
    }

    #[test]
    fn sink_logit_only_rescales() {
        // O' = O * exp(LSE - LSE'), LSE' = log(exp(LSE) + exp(sink)).
        let mut p = Problem::new(2, 1, 8, vec![5], vec![7]);
        p.window_right = 0;
        let (q, k, v, _) = data(&p, 11);
        let r0 = forward(&p, &q, &k, &v);
        p.sink_logits = Some(vec![1.5, -0.5]);
        let r1 = forward(&p, &q, &k, &v);
        for h in 0..2 {
            let sink = f64::from(p.sink_logit(h).unwrap());
            for i in 0..5 {
                let (l0, l1) = (r0.lse[h * 5 + i], r1.lse[h * 5 + i]);
                assert!((l1 - (l0.exp() + sink.exp()).ln()).abs() < 1e-12);
                for x in 0..8 {
                    let off = p.q_off(i, h) + x;
                    assert!((r1.o[off] - r0.o[off] * (l0 - l1).exp()).abs() < 1e-12);
                }
            }
        }
    }

    #[test]
    fn gqa_equals_repeated_kv_heads() {
        let mut p = Problem::new(4, 2, 5, vec![3, 6], vec![7, 4]);
        (p.window_right, p.softcap) = (1, 3.0);
        p.alibi_slopes = Some(vec![0.5, 0.25, 0.125, 0.0625]);
        p.sink_logits = Some(vec![0.1, 0.2, 0.3, 0.4]);
        let (q, k, v, dout) = data(&p, 5);
        // Repeat each kv head twice: kv head hk -> heads 2hk, 2hk + 1.
        let repeat = |x: &[f32]| -> Vec<f32> { x.chunks(5).flat_map(|c| [c, c]).flatten().copied().collect() };
        let (k2, v2) = (repeat(&k), repeat(&v));
        let mut p2 = p.clone();
        p2.heads_k = 4;
        let (r, r2) = (forward(&p, &q, &k, &v), forward(&p2, &q, &k2, &v2));
        assert!(max_diff(&r.o, &r2.o) < 1e-14 && max_diff(&r.lse, &r2.lse) < 1e-14);
        let (g, g2) = (backward(&p, &q, &k, &v, &dout), backward(&p2, &q, &k2, &v2, &dout));
        assert!(max_diff(&g.dq, &g2.dq) < 1e-13);
        assert!(max_diff(g.dsink.as_ref().unwrap(), g2.dsink.as_ref().unwrap()) < 1e-13);
        let fold = |x: &[f64]| -> Vec<f64> { x.chunks(10).flat_map(|c| (0..5).map(|i| c[i] + c[5 + i])).collect() };
        assert!(max_diff(&g.dk, &fold(&g2.dk)) < 1e-13);
        assert!(max_diff(&g.dv, &fold(&g2.dv)) < 1e-13);
    }

    #[test]
    fn varlen_equals_separate_sequences() {
        let (sq, sk) = (vec![3, 0, 5, 4], vec![4, 2, 6, 0]);
        let mut p = Problem::new(2, 1, 4, sq.clone(), sk.clone());
        (p.window_left, p.window_right, p.sink_tokens) = (2, 0, 1);
        p.alibi_slopes = Some((0..8).map(|i| 0.1 * (i + 1) as f32).collect());
        p.sink_logits = Some(vec![0.5, -0.25]);
        let (q, k, v, dout) = data(&p, 9);
        let r = forward(&p, &q, &k, &v);
        let g = backward(&p, &q, &k, &v, &dout);
        let mut dsink = [0.0; 2];
        for seq in sequences(&p) {
            let mut one = p.clone();
            (one.seqlens_q, one.seqlens_k) = (vec![seq.sq], vec![seq.sk]);
            one.alibi_slopes = Some(p.alibi_slopes.as_ref().unwrap()[seq.b * 2..][..2].to_vec());
            let qr = p.q_off(seq.q0, 0)..p.q_off(seq.q0 + seq.sq, 0);
            let kr = p.kv_off(seq.k0, 0)..p.kv_off(seq.k0 + seq.sk, 0);
            let r1 = forward(&one, &q[qr.clone()], &k[kr.clone()], &v[kr.clone()]);
            assert!(max_diff(&r.o[qr.clone()], &r1.o) < 1e-14);
            for h in 0..2 {
                let lse = &r.lse[h * p.total_q() + seq.q0..][..seq.sq];
                assert!(max_diff(lse, &r1.lse[h * seq.sq..][..seq.sq]) < 1e-14);
            }
            let g1 = backward(&one, &q[qr.clone()], &k[kr.clone()], &v[kr.clone()], &dout[qr.clone()]);
            assert!(max_diff(&g.dq[qr], &g1.dq) < 1e-14);
            assert!(max_diff(&g.dk[kr.clone()], &g1.dk) < 1e-14);
            assert!(max_diff(&g.dv[kr], &g1.dv) < 1e-14);
            for (acc, x) in dsink.iter_mut().zip(g1.dsink.unwrap()) {
                *acc += x;
            }
        }
        assert!(max_diff(g.dsink.as_ref().unwrap(), &dsink) < 1e-13);
    }

    #[test]
    fn unmasked_attention_ignores_key_order() {
        let p = Problem::new(2, 2, 4, vec![3], vec![6]);
        let (q, k, v, dout) = data(&p, 13);
        let perm = [4, 0, 5, 2, 1, 3];
        let permute = |x: &[f32]| -> Vec<f32> { perm.iter().flat_map(|&j| &x[j * 8..(j + 1) * 8]).copied().collect() };
        let (kp, vp) = (permute(&k), permute(&v));
        let (r, rp) = (forward(&p, &q, &k, &v), forward(&p, &q, &kp, &vp));
        assert!(max_diff(&r.o, &rp.o) < 1e-14 && max_diff(&r.lse, &rp.lse) < 1e-14);
        let (g, gp) = (backward(&p, &q, &k, &v, &dout), backward(&p, &q, &kp, &vp, &dout));
        assert!(max_diff(&g.dq, &gp.dq) < 1e-13);
        for (new, &old) in perm.iter().enumerate() {
            assert!(max_diff(&g.dk[old * 8..][..8], &gp.dk[new * 8..][..8]) < 1e-13);
            assert!(max_diff(&g.dv[old * 8..][..8], &gp.dv[new * 8..][..8]) < 1e-13);
        }
    }

    #[test]
    fn large_softcap_is_no_softcap() {
        let mut p = Problem::new(1, 1, 8, vec![4], vec![5]);
        let (q, k, v, dout) = data(&p, 17);
        let (r0, g0) = (forward(&p, &q, &k, &v), backward(&p, &q, &k, &v, &dout));
        p.softcap = 1e6;
        let (r1, g1) = (forward(&p, &q, &k, &v), backward(&p, &q, &k, &v, &dout));
        assert!(max_diff(&r0.o, &r1.o) < 1e-9 && max_diff(&r0.lse, &r1.lse) < 1e-9);
        assert!(max_diff(&g0.dq, &g1.dq) < 1e-9 && max_diff(&g0.dk, &g1.dk) < 1e-9);
        // A small softcap bounds every score: LSE <= log(sk) + cap.
        p.softcap = 0.5;
        let r = forward(&p, &q, &k, &v);
        assert!(r.lse.iter().all(|&l| l <= 5f64.ln() + 0.5 + 1e-12));
    }

    /// `sum(dout * O)` in f64: the loss whose gradients `backward` returns.
    fn loss(p: &Problem, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> f64 {
        dot_f64(&forward_f64(p, q, k, v).o, dout)
    }

    fn check_gradients(p: &Problem, seed: u64) {
        let (q, k, v, dout) = data(p, seed);
        let g = backward(p, &q, &k, &v, &dout);
        let mut x = [widen(&q), widen(&k), widen(&v)];
        let dout = widen(&dout);
        let h = 1e-5;
        for (which, grad) in [&g.dq, &g.dk, &g.dv].into_iter().enumerate() {
            for idx in 0..grad.len() {
                let orig = x[which][idx];
                x[which][idx] = orig + h;
                let up = loss(p, &x[0], &x[1], &x[2], &dout);
                x[which][idx] = orig - h;
                let down = loss(p, &x[0], &x[1], &x[2], &dout);
                x[which][idx] = orig;
                let fd = (up - down) / (2.0 * h);
                assert!(
                    (fd - grad[idx]).abs() < 1e-7 * (1.0 + fd.abs()),
                    "input {which} [{idx}]: fd {fd} vs {}",
                    grad[idx]
                );
            }
        }
        let (Some(sinks), Some(dsink)) = (&p.sink_logits, &g.dsink) else {
            return;
        };
        for hh in 0..p.heads {
            let step = 2f32.powi(-10);
            let (plus, minus) = (sinks[hh] + step, sinks[hh] - step);
            let mut pp = p.clone();
            pp.sink_logits.as_mut().unwrap()[hh] = plus;
            let up = loss(&pp, &x[0], &x[1], &x[2], &dout);
            pp.sink_logits.as_mut().unwrap()[hh] = minus;
            let down = loss(&pp, &x[0], &x[1], &x[2], &dout);
            let fd = (up - down) / f64::from(plus - minus);
            assert!(
                (fd - dsink[hh]).abs() < 1e-5 * (1.0 + fd.abs()),
                "dsink[{hh}]: fd {fd} vs {}",
                dsink[hh]
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Causal bottom-right, sq != sk (a fully masked row in sequence 1), GQA, every score option.
        let mut p = Problem::new(2, 1, 3, vec![3, 3], vec![4, 2]);
        (p.window_left, p.window_right, p.sink_tokens) = (1, 0, 1);
        p.softcap = 1.5;
        p.alibi_slopes = Some(vec![0.3, 0.7]);
        p.sink_logits = Some(vec![0.4, -0.6]);
        check_gradients(&p, 21);
        // Top-left, non-causal right window, per-batch ALiBi, no softcap or sinks.
        let mut p = Problem::new(2, 2, 3, vec![4, 2], vec![3, 5]);
        (p.align, p.window_left, p.window_right, p.scale) = (Align::TopLeft, -1, 1, 0.8);
        p.alibi_slopes = Some(vec![0.1, 0.2, 0.3, 0.4]);
        check_gradients(&p, 22);
        // Plain attention.
        check_gradients(&Problem::new(1, 1, 4, vec![3], vec![4]), 23);
    }

    #[test]
    fn lowp_rounds_the_scores() {
        // One key, so LSE = s. Row 0: q.k = (1 + 2^-4)(1 + 2^-5) = 1.095703125, bf16 1.09375.
        // Row 1 (top-left, ALiBi distance 1, slope 99): q.k = 97 * 1.03125 = 100.03125 rounds to
        // 100 in both dtypes (bf16 spacing 0.5, fp16 tie to even) before the bias: s = 1, not 1.03125.
        let mut p = one_seq(2, 1);
        (p.scale, p.align, p.alibi_slopes) = (1.0, Align::TopLeft, Some(vec![99.0]));
        let (q, k, v) = ([1.0625, 97.0], [1.03125], [2.0]);
        assert_eq!(forward(&p, &q, &k, &v).lse, [1.095703125, 1.03125]);
        let (o, lse) = forward_lowp(&p, &q, &k, &v, BF);
        assert_eq!((o, lse), (vec![2.0, 2.0], vec![1.09375, 1.0]));
        let (o, lse) = forward_lowp(&p, &q, &k, &v, LowPrecision::F16);
        let lse: Vec<f64> = lse.into_iter().map(f64::from).collect();
        assert_eq!((o, lse), (vec![2.0, 2.0], vec![1.095703125, 1.0])); // row 0 exact in fp16
    }

    #[test]
    fn lowp_intermediates_are_rounded() {
        let mut p = Problem::new(2, 1, 8, vec![4, 3], vec![1, 6]);
        (p.softcap, p.align, p.alibi_slopes) = (3.0, Align::TopLeft, Some(vec![0.3, 0.7]));
        let (q, k, v, _) = data(&p, 29);
        for prec in ALL_PREC {
            // Sequence 0 has one key, so LSE = s there: the end of the score chain is rounded.
            let (_, lse) = forward_lowp(&p, &q, &k, &v, prec);
            for h in 0..2 {
                assert!(
                    lse[h * 7..][..4].iter().all(|&x| round_to(prec, x) == x),
                    "{prec:?} {lse:?}"
                );
            }
            // P is rounded (sequence 1 has several keys per row).
            let sm = softmax_lowp(&p, sequences(&p)[1], 1, &q, &k, prec);
            assert!(sm.p.iter().all(|&x| round_to(prec, x) == x) && sm.p.iter().any(|&x| x != 0.0 && x != 1.0));
        }
    }

    #[test]
    fn lowp_baseline_is_close_and_representable() {
        let mut p = Problem::new(4, 2, 16, vec![5, 9], vec![7, 3]);
        (p.window_right, p.softcap) = (0, 4.0);
        p.alibi_slopes = Some(vec![0.5, 0.25, 0.125, 0.0625]);
        p.sink_logits = Some(vec![0.5, 1.0, -1.0, 0.0]);
        let (q, k, v, dout) = data(&p, 31);
        let r = forward(&p, &q, &k, &v);
        let g = backward(&p, &q, &k, &v, &dout);
        for prec in ALL_PREC {
            let (o, lse) = forward_lowp(&p, &q, &k, &v, prec);
            assert!(o.iter().all(|&x| round_to(prec, x) == x));
            let (so, sl) = (err_stats(&o, &r.o), err_stats(&lse, &r.lse));
            // A few quanta: the score rounding dominates (bf16 S ~ 10 has spacing 2^-4).
            assert!(
                so.nan_count == 0 && so.max_abs < 8.0 * atol_for(prec, &r.o),
                "{prec:?} O {so:?}"
            );
            assert!(sl.nan_count == 0 && sl.max_abs < 0.05, "{prec:?} LSE {sl:?}");
            let (dq, dk, dv, dsink) = backward_lowp(&p, &q, &k, &v, &dout, prec);
            let named = [("dq", &dq, &g.dq), ("dk", &dk, &g.dk), ("dv", &dv, &g.dv)];
            for (name, got, want) in named {
                assert!(got.iter().all(|&x| round_to(prec, x) == x), "{name}");
                let st = err_stats(got, want);
                assert!(
                    st.nan_count == 0 && st.max_abs < 16.0 * atol_for(prec, want),
                    "{prec:?} {name} {st:?}"
                );
            }
            let (dsink, want) = (dsink.unwrap(), g.dsink.as_ref().unwrap());
            let st = err_stats(&dsink, want);
            assert!(st.max_abs < 16.0 * atol_for(prec, want), "{prec:?} dsink {st:?}");
        }
    }

    #[test]
    fn lowp_fully_masked_rows() {
        let mut p = Problem::new(1, 1, 4, vec![3], vec![1]);
        p.window_right = 0;
        let (q, k, v, dout) = data(&p, 37);
        let (o, lse) = forward_lowp(&p, &q, &k, &v, BF);
        assert!(o[..8].iter().all(|&x| x == 0.0));
        assert_eq!(lse[..2], [f32::NEG_INFINITY; 2]);
        assert!(lse[2].is_finite());
        p.sink_logits = Some(vec![0.25]);
        let (o, lse) = forward_lowp(&p, &q, &k, &v, BF);
        assert!(o[..8].iter().all(|&x| x == 0.0));
        assert_eq!(lse[..2], [0.25; 2]);
        let (dq, _, _, dsink) = backward_lowp(&p, &q, &k, &v, &dout, BF);
        assert!(dq[..8].iter().all(|&x| x == 0.0));
        assert!(dsink.unwrap()[0].is_finite());
    }

    #[test]
    fn err_stats_counts_mismatches() {
        let inf = f64::INFINITY;
        let out = [1.0, f32::NEG_INFINITY, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 2.5];
        let reference = [1.5, -inf, 0.0, 1.0, inf, 2.0];
        let st = err_stats(&out, &reference);
        assert_eq!(st.max_abs, 0.5);
        assert_eq!(st.nan_count, 3);
        assert_eq!(st.worst_index, 2);
        assert!((st.mean_abs - 1.0 / 6.0).abs() < 1e-15);
        let st = err_stats(&[1.0, 3.0, 2.0], &[1.0, 2.0, 2.5]);
        assert_eq!((st.max_abs, st.worst_index, st.nan_count), (1.0, 1, 0));
        // A missing element and a NaN reference are mismatches.
        assert_eq!(err_stats(&[1.0], &[1.0, 2.0]).nan_count, 1);
        assert_eq!(err_stats(&[1.0], &[f64::NAN]).nan_count, 1);
    }

    #[test]
    fn check_close_applies_the_rule() {
        let reference = [1.0, 2.0, f64::NEG_INFINITY];
        let base = [1.01, 2.0, f32::NEG_INFINITY];
        // Tolerance 2 * 0.01 + 0.001 = 0.021.
        assert!(check_close("O", &[1.02, 2.0, f32::NEG_INFINITY], &reference, &base, 0.001).is_ok());
        assert!(check_close("O", &[1.0, 1.98, f32::NEG_INFINITY], &reference, &base, 0.001).is_ok());
        let e = check_close("O", &[1.0, 2.025, f32::NEG_INFINITY], &reference, &base, 0.001).unwrap_err();
        assert!(
            e.starts_with("O: ") && e.contains("worst index 1") && e.contains("2.025"),
            "{e}"
        );
        let e = check_close("LSE", &[1.0, 2.0, 0.0], &reference, &base, 0.001).unwrap_err();
        assert!(e.contains("1 NaN/inf") && e.contains("worst index 2"), "{e}");
        assert!(check_close("O", &[1.0, f32::NAN, f32::NEG_INFINITY], &reference, &base, 1.0).is_err());
        assert!(
            check_close("O", &[1.0], &reference, &base, 1.0)
                .unwrap_err()
                .contains("lengths")
        );
    }

    #[test]
    fn atol_is_one_unit_in_the_last_place() {
        assert_eq!(atol_for(BF, &[3.0, -1.0]), 2f64.powi(-6));
        assert_eq!(atol_for(LowPrecision::F16, &[-3.0, 1.0]), 2f64.powi(-9));
        assert_eq!(atol_for(BF, &[2.0]), 2f64.powi(-6));
        assert_eq!(atol_for(BF, &[1.999]), 2f64.powi(-7));
        assert_eq!(atol_for(BF, &[f64::NEG_INFINITY, 0.5]), 2f64.powi(-8));
        // FlashAttention's 0.3 floor: the quantum at 0.3 (binade [0.25, 0.5)).
        assert_eq!(atol_for(BF, &[]), 2f64.powi(-2 - 7));
        assert_eq!(atol_for(BF, &[1e-6, -0.01]), 2f64.powi(-2 - 7));
        assert_eq!(atol_for(LowPrecision::F16, &[0.0]), 2f64.powi(-2 - 10));
        assert_eq!(atol_f32(&[10.0]), 2f64.powi(3 - 17));
        // At least the rounding error of any value up to the magnitude.
        let mut rng = Rng::new(41);
        for prec in ALL_PREC {
            let xs: Vec<f64> = (0..200).map(|_| f64::from(rng.normal()) * 3.0).collect();
            let atol = atol_for(prec, &xs);
            assert!(
                xs.iter()
                    .all(|&x| (f64::from(round_to(prec, x as f32)) - x).abs() <= atol / 2.0 + 1e-7)
            );
        }
    }

    #[test]
    fn round_to_nearest_even() {
        let eps = |n| 2f32.powi(n);
        assert_eq!(round_to(BF, 1.0 + eps(-8)), 1.0); // tie to even
        assert_eq!(round_to(BF, 1.0 + 3.0 * eps(-8)), 1.0 + eps(-6)); // tie to even (up)
        assert_eq!(round_to(BF, 1.0 + eps(-7)), 1.0 + eps(-7));
        assert_eq!(round_to(LowPrecision::F16, 1.0 + eps(-11)), 1.0);
        assert_eq!(round_to(LowPrecision::F16, 1.0 + eps(-10)), 1.0 + eps(-10));
        assert_eq!(round_to(LowPrecision::F16, 1e6), f32::INFINITY);
    }

    #[test]
    fn rng_is_deterministic_and_normal() {
        let (mut a, mut b) = (Rng::new(5), Rng::new(5));
        assert!((0..100).all(|_| a.next_u64() == b.next_u64()));
        assert_ne!(Rng::new(5).next_u64(), Rng::new(6).next_u64());
        let mut rng = Rng::new(99);
        let xs: Vec<f64> = (0..20000).map(|_| f64::from(rng.normal())).collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
        for prec in ALL_PREC {
            let xs = randn_plus_half(&mut rng, 5000, prec);
            assert!(xs.iter().all(|&x| round_to(prec, x) == x));
            let mean = xs.iter().map(|&x| f64::from(x)).sum::<f64>() / 5000.0;
            assert!((mean - 0.5).abs() < 0.05, "{mean}");
        }
    }

    #[test]
    fn validate_names_the_values() {
        let ok = Problem::new(4, 2, 8, vec![1, 2], vec![3, 4]);
        assert!(ok.validate().is_ok());
        let mut p = ok.clone();
        p.heads_k = 3;
        assert!(p.validate().unwrap_err().contains("(4)"));
        let mut p = ok.clone();
        p.seqlens_k.push(1);
        assert!(p.validate().is_err());
        let mut p = ok.clone();
        p.alibi_slopes = Some(vec![0.5; 6]);
        assert!(p.validate().unwrap_err().contains("6 ALiBi"));
        p.alibi_slopes = Some(vec![0.5; 8]); // batch * heads
        assert!(p.validate().is_ok());
        p.sink_logits = Some(vec![0.0; 2]);
        assert!(p.validate().is_err());
        let q = vec![0.0; ok.total_q() * 4 * 8];
        let kv = vec![0.0; ok.total_k() * 2 * 8];
        assert!(ok.validate_buffers(&q, &kv, &kv, Some(&q)).is_ok());
        let e = ok.validate_buffers(&q, &kv[1..], &kv, None).unwrap_err();
        assert!(e.contains("k has 111 elements") && e.contains("112"), "{e}");
    }

    #[test]
    fn keep_used_rows_drops_the_unused_tail() {
        // Rows of 2 elements; capacities (3, 2, 1), used (2, 0, 1).
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        assert_eq!(
            keep_used_rows(&data, &[3, 2, 1], &[2, 0, 1], 2),
            [0.0, 1.0, 2.0, 3.0, 10.0, 11.0]
        );
    }

    /// A FlashAttention-like forward: f32 scores, online softmax over blocks of 4 keys, P rounded
    /// to the dtype before the PV product, O rounded at the end.
    fn flash_like(p: &Problem, q: &[f32], k: &[f32], v: &[f32], prec: LowPrecision) -> (Vec<f32>, Vec<f32>) {
        let (d, total_q) = (p.head_dim, p.total_q());
        let mut o = vec![0.0; q.len()];
        let mut lse = vec![f32::NEG_INFINITY; p.heads * total_q];
        for seq in sequences(p) {
            for h in 0..p.heads {
                let (hk, diag) = (p.kv_head(h), p.diag(seq.b));
                for i in 0..seq.sq {
                    let qi = &q[p.q_off(seq.q0 + i, h)..][..d];
                    let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0.0f32, vec![0.0f32; d]);
                    for block in (0..seq.sk).collect::<Vec<_>>().chunks(4) {
                        let s: Vec<(usize, f32)> = block
                            .iter()
                            .filter(|&&j| visible(p, seq.b, i, j))
                            .map(|&j| {
                                let mut x = p.scale as f32 * dot_f32(qi, &k[p.kv_off(seq.k0 + j, hk)..][..d]);
                                if p.softcap > 0.0 {
                                    x = p.softcap as f32 * (x / p.softcap as f32).tanh();
                                }
                                let slope = p.alibi_slope(seq.b, h).unwrap_or(0.0);
                                (j, x - slope * alibi_distance(i, j, diag) as f32)
                            })
                            .collect();
                        let m_new = s.iter().map(|x| x.1).fold(m, f32::max);
                        if m_new == f32::NEG_INFINITY {
                            continue;
                        }
                        let alpha = (m - m_new).exp();
                        l *= alpha;
                        acc.iter_mut().for_each(|a| *a *= alpha);
                        for &(j, x) in &s {
                            let pj = (x - m_new).exp();
                            l += pj;
                            axpy_f32(&mut acc, round_to(prec, pj), &v[p.kv_off(seq.k0 + j, hk)..][..d]);
                        }
                        m = m_new;
                    }
                    if let Some(sink) = p.sink_logit(h) {
                        let m_new = m.max(sink);
                        let alpha = (m - m_new).exp();
                        l = l * alpha + (sink - m_new).exp();
                        acc.iter_mut().for_each(|a| *a *= alpha);
                        m = m_new;
                    }
                    let o_i = &mut o[p.q_off(seq.q0 + i, h)..][..d];
                    if l > 0.0 {
                        for (x, a) in o_i.iter_mut().zip(&acc) {
                            *x = round_to(prec, a / l);
                        }
                        lse[h * total_q + seq.q0 + i] = m + l.ln();
                    }
                }
            }
        }
        (o, lse)
    }

    #[test]
    fn flash_like_kernel_passes_and_mask_bug_fails() {
        let mut p = Problem::new(4, 2, 32, vec![13, 6], vec![9, 17]);
        (p.window_left, p.window_right, p.sink_tokens) = (5, 0, 2);
        p.alibi_slopes = Some(vec![0.3, 0.2, 0.1, 0.05]);
        p.sink_logits = Some(vec![0.5, 1.0, 1.5, 2.0]);
        let (q, k, v, _) = data(&p, 43);
        let r = forward(&p, &q, &k, &v);
        for prec in ALL_PREC {
            let (base_o, base_lse) = forward_lowp(&p, &q, &k, &v, prec);
            let (o, lse) = flash_like(&p, &q, &k, &v, prec);
            check_close("O", &o, &r.o, &base_o, atol_for(prec, &r.o)).unwrap();
            check_close("LSE", &lse, &r.lse, &base_lse, atol_f32(&r.lse)).unwrap();
            // Off-by-one masks: the right bound one too far, the sink count one too small.
            for bug in [(5, 1, 2), (5, 0, 1), (4, 0, 2)] {
                let mut wrong = p.clone();
                (wrong.window_left, wrong.window_right, wrong.sink_tokens) = bug;
                let (o, _) = flash_like(&wrong, &q, &k, &v, prec);
                assert!(
                    check_close("O", &o, &r.o, &base_o, atol_for(prec, &r.o)).is_err(),
                    "{bug:?} {prec:?}"
                );
            }
        }
    }
}
