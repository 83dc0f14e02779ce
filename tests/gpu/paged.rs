//! `flash_fwd_paged`: the sm80-family forward over a paged KV cache, against the f64 CPU reference
//! on the same keys packed densely (every semantic option, page sizes 1 to 256 that do and do not
//! divide the kernel's key block, decode and chunked-prefill query counts, shuffled and shared
//! pages, a strided pool whose gaps and unused slots hold NaN, every paged tile variant), the
//! routing on Hopper, and bad input (typed error, nothing written).

use crate::harness::Test;
use crate::support::{AlibiKind, Case, Gpu, HostElem};
use cudarc::driver::CudaSlice;
use flashattn_aot::reference::cpu::{self, Problem};
use flashattn_aot::{
    Alibi, CausalAlign, DType, Direction, Error, Family, FwdInfo, FwdOptions, FwdTensors, KernelOverride, Layout, Mask,
    PagedKv, SmArch, Tensor, TensorMut, compiled_cells, device_info, flash_fwd_paged,
};

fn e(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

/// A paged test: the options and sizes of `case` (batch, seqlen_q, heads, head dim, mask and
/// score options), with sequence b holding `lens[b]` keys in pages of `page_size` slots.
#[derive(Clone, Debug)]
struct Paged {
    case: Case,
    lens: Vec<usize>,
    page_size: usize,
    /// Pool strides with NaN gaps (head stride d + 8, slot stride heads_k (d + 8) + 16).
    padded_pool: bool,
    /// Sequence 1 reuses sequence 0's first page (a shared prefix), when both are long enough.
    share_first_page: bool,
    variant: Option<usize>,
    /// Varlen queries (`PagedKv::with_cu_seqlens_q`): sequence b has q_lens[b] queries.
    q_lens: Option<Vec<usize>>,
}

impl Paged {
    fn new(case: Case, lens: Vec<usize>, page_size: usize) -> Paged {
        Paged {
            case,
            lens,
            page_size,
            padded_pool: false,
            q_lens: None,
            share_first_page: false,
            variant: None,
        }
    }
}

/// Deterministic permutation of 0..n (xorshift Fisher-Yates).
fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut s = seed | 1;
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

struct Built<T> {
    problem: Problem,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    q_dev: CudaSlice<T>,
    k_pool: CudaSlice<T>,
    v_pool: CudaSlice<T>,
    pool: Layout,
    paged: PagedKv,
    alibi: Option<CudaSlice<f32>>,
    sinks: Option<CudaSlice<f32>>,
}

fn build<T: HostElem>(g: &Gpu, t: &Paged) -> Result<Built<T>, String> {
    let c = &t.case;
    let (b, sq, h, hk, d) = (c.batch, c.seqlen_q, c.heads, c.heads_k, c.head_dim);
    assert_eq!(t.lens.len(), b);
    let mut problem = c.problem();
    problem.seqlens_q = t.q_lens.clone().unwrap_or(vec![sq; b]);
    problem.seqlens_k = t.lens.clone();
    let total_k: usize = t.lens.iter().sum();
    let total_q: usize = problem.seqlens_q.iter().sum();
    let mut rng = cpu::Rng::new(c.seed);
    let q = cpu::randn_plus_half(&mut rng, total_q * h * d, T::PREC);
    let mut k = cpu::randn_plus_half(&mut rng, total_k * hk * d, T::PREC);
    let mut v = cpu::randn_plus_half(&mut rng, total_k * hk * d, T::PREC);

    // Pages: each sequence's own, in shuffled pool order, two spare pages, -1 after the used ones.
    let p = t.page_size;
    let used: Vec<usize> = t.lens.iter().map(|&l| l.div_ceil(p)).collect();
    let max_pages = used.iter().copied().max().unwrap_or(0) + 1;
    let num_pages = used.iter().sum::<usize>() + 2;
    let order = permutation(num_pages, c.seed ^ 0x9a9e);
    let mut table = vec![-1i32; b * max_pages];
    let mut next = 0;
    for bb in 0..b {
        for i in 0..used[bb] {
            table[bb * max_pages + i] = order[next] as i32;
            next += 1;
        }
    }
    // A shared prefix: sequence 1's first page is sequence 0's, so its first page_size keys are
    // sequence 0's too (the host copies agree).
    let share = t.share_first_page && b >= 2 && t.lens[0] >= p && t.lens[1] >= p;
    if share {
        table[max_pages] = table[0];
        let row = hk * d;
        let off1 = t.lens[0] * row;
        for x in 0..p * row {
            k[off1 + x] = k[x];
            v[off1 + x] = v[x];
        }
    }
    let pool = if t.padded_pool {
        let hs = d + 8;
        let rs = hk * hs + 16;
        Layout::contiguous(num_pages, p, hk, d).with_strides(p * rs + 32, rs, hs)
    } else {
        Layout::contiguous(num_pages, p, hk, d)
    };
    let extent = pool.extent().unwrap();
    // NaN everywhere a kernel must not read: gaps, unused slots, spare pages.
    let mut kp = vec![T::from_f32(f32::NAN); extent];
    let mut vp = vec![T::from_f32(f32::NAN); extent];
    let mut off = 0;
    for bb in 0..b {
        for r in 0..t.lens[bb] {
            let page = table[bb * max_pages + r / p] as usize;
            for hh in 0..hk {
                for x in 0..d {
                    let dst = page * pool.batch_stride + (r % p) * pool.row_stride + hh * pool.head_stride + x;
                    let src = ((off + r) * hk + hh) * d + x;
                    kp[dst] = T::from_f32(k[src]);
                    vp[dst] = T::from_f32(v[src]);
                }
            }
        }
        off += t.lens[bb];
    }
    let s = &g.stream;
    let lens: Vec<i32> = t.lens.iter().map(|&l| l as i32).collect();
    let mut paged = PagedKv::new(s, &table, max_pages, p, num_pages, &lens).map_err(e)?;
    if let Some(ql) = &t.q_lens {
        let mut cu = vec![0i32];
        for &n in ql {
            cu.push(cu.last().unwrap() + n as i32);
        }
        paged = paged.with_cu_seqlens_q(s, &cu).map_err(e)?;
    }
    let q_h: Vec<T> = q.iter().map(|&x| T::from_f32(x)).collect();
    let alibi = match &problem.alibi_slopes {
        Some(sl) => Some(s.clone_htod(sl).map_err(e)?),
        None => None,
    };
    let sinks = match &problem.sink_logits {
        Some(sl) => Some(s.clone_htod(sl).map_err(e)?),
        None => None,
    };
    Ok(Built {
        problem,
        q,
        k,
        v,
        q_dev: s.clone_htod(&q_h).map_err(e)?,
        k_pool: s.clone_htod(&kp).map_err(e)?,
        v_pool: s.clone_htod(&vp).map_err(e)?,
        pool,
        paged,
        alibi,
        sinks,
    })
}

fn options<'a, T>(c: &Case, bt: &'a Built<T>, variant: Option<usize>) -> FwdOptions<'a> {
    let mut opts = FwdOptions::new()
        .mask(c.mask)
        .sink_tokens(c.sink_tokens)
        .num_splits(c.num_splits);
    if let Some(sc) = c.scale {
        opts = opts.softmax_scale(sc);
    }
    if let Some(cap) = c.softcap {
        opts = opts.softcap(cap);
    }
    if let Some(a) = &bt.alibi {
        opts = opts.alibi(match c.alibi {
            AlibiKind::PerBatchHead => Alibi::PerBatchHead(a),
            _ => Alibi::PerHead(a),
        });
    }
    if let Some(sl) = &bt.sinks {
        opts = opts.sink_logits(sl);
    }
    opts.kernel_override(KernelOverride {
        variant,
        ..Default::default()
    })
}

/// Runs the paged forward on poisoned outputs and checks O and LSE with FlashAttention's rule
/// against the f64 CPU reference on the same keys packed densely.
fn check<T: HostElem>(g: &Gpu, t: &Paged) -> Result<FwdInfo, String> {
    let c = &t.case;
    let bt = build::<T>(g, t)?;
    let (b, sq, h, d) = (c.batch, c.seqlen_q, c.heads, c.head_dim);
    let s = &g.stream;
    let total_q: usize = bt.problem.seqlens_q.iter().sum();
    let ql = match &t.q_lens {
        Some(_) => Layout::varlen(total_q, h, d),
        None => Layout::contiguous(b, sq, h, d),
    };
    let mut out = s.clone_htod(&vec![T::from_f32(f32::NAN); total_q * h * d]).map_err(e)?;
    let mut lse = s.clone_htod(&vec![f32::NAN; total_q * h]).map_err(e)?;
    let opts = options(c, &bt, t.variant);
    let info = flash_fwd_paged(
        s,
        FwdTensors {
            q: Tensor::new(&bt.q_dev, ql),
            k: Tensor::new(&bt.k_pool, bt.pool),
            v: Tensor::new(&bt.v_pool, bt.pool),
            out: TensorMut::new(&mut out, ql),
            lse: if c.with_lse { Some(&mut lse) } else { None },
        },
        &bt.paged,
        &opts,
    )
    .map_err(|err| format!("launch failed: {err}"))?;
    s.synchronize().map_err(|err| format!("kernel failed: {err}"))?;
    let o: Vec<f32> = s.clone_dtoh(&out).map_err(e)?.iter().map(|x| x.to_f32()).collect();
    let l: Vec<f32> = s.clone_dtoh(&lse).map_err(e)?;
    let r = cpu::forward(&bt.problem, &bt.q, &bt.k, &bt.v);
    let (base_o, base_lse) = cpu::forward_lowp(&bt.problem, &bt.q, &bt.k, &bt.v, T::PREC);
    let ctx = || format!("{} ({:?})\ncase: {t:?}", info.symbol, info.routed_from);
    cpu::check_close("O", &o, &r.o, &base_o, cpu::atol_for(T::PREC, &r.o)).map_err(|m| format!("{m}\n{}", ctx()))?;
    if c.with_lse && t.q_lens.is_some() {
        // Varlen: already the reference's [h][total_q].
        cpu::check_close("LSE", &l, &r.lse, &base_lse, 1e-4).map_err(|m| format!("{m}\n{}", ctx()))?;
    } else if c.with_lse {
        // (b, h, sq) -> the reference's [h][total_q].
        let mut m = vec![0f32; h * total_q];
        for bb in 0..b {
            for hh in 0..h {
                for i in 0..sq {
                    m[hh * total_q + bb * sq + i] = l[(bb * h + hh) * sq + i];
                }
            }
        }
        cpu::check_close("LSE", &m, &r.lse, &base_lse, 1e-4).map_err(|m| format!("{m}\n{}", ctx()))?;
    } else if l.iter().any(|x| !x.is_nan()) {
        return Err(format!("lse was written although none was requested\n{}", ctx()));
    }
    Ok(info)
}

fn causal(mut c: Case) -> Case {
    c.mask = Mask::Causal(CausalAlign::BottomRight);
    c
}

fn cell_tests<T: HostElem>(key: String, d: usize, variants: usize, tests: &mut Vec<Test<Gpu>>) {
    let key = key.as_str();
    // Every semantic option (those of a dense query tensor), two sequences of 300 and 123 keys in
    // pages of 16.
    for (name, case) in crate::semantic_variants(&Case::new(37, 300, d)) {
        if name.starts_with("varlen") || name == "heads_major" || name == "padded_strides" {
            continue;
        }
        let t = Paged::new(case, vec![300, 123], 16);
        tests.push(Test::new(format!("paged::{key}::{name}"), move |g| {
            check::<T>(g, &t).map(|_| ())
        }));
    }
    // Page sizes below, at, between and above the key block (64), powers of two or not; a decode
    // step (one query per sequence) and a chunk of prefill, with a causal mask.
    for page in [1, 7, 16, 64, 100, 256] {
        for (what, sq) in [("decode", 1), ("chunk", 77)] {
            let mut c = causal(Case::new(sq, 0, d));
            c.batch = 3;
            c.heads = 8;
            c.heads_k = 2;
            let mut t = Paged::new(c, vec![700, 1, 333], page);
            t.share_first_page = page <= 333;
            tests.push(Test::new(format!("paged::{key}::page{page}_{what}"), move |g| {
                check::<T>(g, &t).map(|_| ())
            }));
        }
    }
    // A pool with strides and NaN gaps; an empty sequence (O = 0, LSE = -inf).
    let mut t = Paged::new(causal(Case::new(65, 0, d)), vec![519, 0], 32);
    t.padded_pool = true;
    tests.push(Test::new(
        format!("paged::{key}::pool_padded_strides_empty_seq"),
        move |g| check::<T>(g, &t).map(|_| ()),
    ));
    // Every paged tile variant, forced, on longer sequences.
    for variant in 0..variants {
        for masked in [false, true] {
            let mut c = Case::new(130, 0, d);
            c.batch = 2;
            c.heads = 2;
            c.heads_k = 1;
            if masked {
                c = causal(c);
            }
            let mut t = Paged::new(c, vec![2100, 1500], 16);
            t.variant = Some(variant);
            let name = format!("paged::{key}::variant{variant}{}", if masked { "_causal" } else { "" });
            tests.push(Test::new(name, move |g| check::<T>(g, &t).map(|_| ())));
        }
    }
    // Split-KV over the paged cache: the heuristic on a decode step (it must split it), and 3
    // forced parts with sink tokens, sink logits and a window on a chunk.
    let mut c = causal(Case::new(1, 0, d));
    c.batch = 2;
    c.heads = 8;
    c.heads_k = 2;
    c.num_splits = 0;
    let t = Paged::new(c, vec![1900, 333], 16);
    tests.push(Test::new(format!("paged::{key}::split_auto_decode"), move |g| {
        let info = check::<T>(g, &t)?;
        if info.num_splits < 2 {
            return Err(format!("{} ran unsplit", info.symbol));
        }
        Ok(())
    }));
    let mut c = Case::new(20, 0, d);
    c.mask = Mask::Window {
        left: Some(200),
        right: Some(0),
        align: CausalAlign::BottomRight,
    };
    c.sink_tokens = 3;
    c.sink_logits = true;
    c.num_splits = 3;
    let t = Paged::new(c, vec![900, 70], 7);
    tests.push(Test::new(format!("paged::{key}::split3_window_sinks"), move |g| {
        let info = check::<T>(g, &t)?;
        if info.num_splits != 3 {
            return Err(format!("{} ran with {} parts", info.symbol, info.num_splits));
        }
        Ok(())
    }));
    // Varlen queries over the cache (chunked prefill of sequences of different lengths, an empty
    // one and a single-query one among them): causal, and a window with sink tokens and logits.
    for (name, mask, sinks) in [
        ("causal", Mask::Causal(CausalAlign::BottomRight), false),
        (
            "window_sinks",
            Mask::Window {
                left: Some(50),
                right: Some(0),
                align: CausalAlign::BottomRight,
            },
            true,
        ),
        ("top_left_causal", Mask::Causal(CausalAlign::TopLeft), false),
    ] {
        let mut c = Case::new(0, 0, d);
        c.batch = 4;
        c.heads = 8;
        c.heads_k = 2;
        c.mask = mask;
        if sinks {
            c.sink_tokens = 4;
            c.sink_logits = true;
        }
        let mut t = Paged::new(c, vec![300, 40, 700, 129], 16);
        t.q_lens = Some(vec![37, 0, 150, 1]);
        tests.push(Test::new(format!("paged::{key}::varlen_q_{name}"), move |g| {
            check::<T>(g, &t).map(|_| ())
        }));
    }
    // On Hopper the request is routed to the sm80 family, and says so.
    let c = causal(Case::new(4, 0, d));
    let t = Paged::new(c, vec![90, 200], 16);
    tests.push(Test::new(format!("paged::{key}::routed_visibly"), move |g| {
        let info = check::<T>(g, &t)?;
        let arch = device_info(&g.stream).map_err(e)?.arch;
        if !info.cell.starts_with("sm80.fwd.") || !info.symbol.ends_with("_paged") {
            return Err(format!("{} / {} served a paged request", info.cell, info.symbol));
        }
        let want = (arch == SmArch::Sm90a).then_some(Family::Sm90);
        if info.routed_from != want {
            return Err(format!("routed_from {:?} on {arch:?}", info.routed_from));
        }
        Ok(())
    }));
}

/// Bad input: typed errors, and nothing written.
fn error_tests(tests: &mut Vec<Test<Gpu>>) {
    tests.push(Test::new("paged::errors::block_table", |g: &Gpu| {
        let s = &g.stream;
        // (what, block table, max pages per sequence, page size, pages in the pool, key counts)
        type BadTable = (&'static str, Vec<i32>, usize, usize, usize, Vec<i32>);
        let cases: [BadTable; 6] = [
            ("page out of range", vec![0, 5], 2, 16, 5, vec![20]),
            ("negative page", vec![-1, 0], 2, 16, 4, vec![3]),
            ("too many keys", vec![0, 1], 2, 16, 4, vec![33]),
            ("negative length", vec![0, 1], 2, 16, 4, vec![-1]),
            ("table length", vec![0, 1, 2], 2, 16, 4, vec![20]),
            ("zero page size", vec![0, 1], 2, 0, 4, vec![0]),
        ];
        for (what, table, max_pages, page, pages, lens) in cases {
            match PagedKv::new(s, &table, max_pages, page, pages, &lens) {
                Err(Error::InvalidBlockTable(_)) => {}
                other => return Err(format!("{what}: expected InvalidBlockTable, got {other:?}")),
            }
        }
        // Entries past a sequence's used pages are never read: -1 padding is fine.
        PagedKv::new(s, &[3, -1, -1], 3, 16, 4, &[16]).map_err(e)?;
        Ok(())
    }));
    tests.push(Test::new("paged::errors::shapes_nothing_written", |g: &Gpu| {
        let s = &g.stream;
        let d = 128;
        let paged = PagedKv::new(s, &[0, 1, 2, 3], 2, 16, 4, &[20, 32]).map_err(e)?;
        let q = s.alloc_zeros::<half::bf16>(2 * 3 * 4 * d).map_err(e)?;
        let ql = Layout::contiguous(2, 3, 4, d);
        let pool_ok = Layout::contiguous(4, 16, 2, d);
        let k = s.alloc_zeros::<half::bf16>(4 * 16 * 2 * d).map_err(e)?;
        let v = s.alloc_zeros::<half::bf16>(4 * 16 * 2 * d).map_err(e)?;
        let bad = [
            ("pool pages", ql, Layout::contiguous(3, 16, 2, d)),
            ("pool page size", ql, Layout::contiguous(4, 8, 2, d)),
            ("batch", Layout::contiguous(1, 3, 4, d), pool_ok),
            ("gqa", Layout::contiguous(2, 3, 3, d), pool_ok),
        ];
        for (what, qlay, pool) in bad {
            let mut out = s.clone_htod(&vec![half::bf16::NAN; 2 * 3 * 4 * d]).map_err(e)?;
            let r = flash_fwd_paged(
                s,
                FwdTensors {
                    q: Tensor::new(&q, qlay),
                    k: Tensor::new(&k, pool),
                    v: Tensor::new(&v, pool),
                    out: TensorMut::new(&mut out, qlay),
                    lse: None,
                },
                &paged,
                &FwdOptions::new(),
            );
            if !matches!(r, Err(Error::ShapeMismatch(_))) {
                return Err(format!("{what}: expected ShapeMismatch, got {r:?}"));
            }
            s.synchronize().map_err(e)?;
            let o: Vec<half::bf16> = s.clone_dtoh(&out).map_err(e)?;
            if o.iter().any(|x| !x.is_nan()) {
                return Err(format!("{what}: out was written"));
            }
        }
        Ok(())
    }));
    tests.push(Test::new("paged::errors::varlen_q", |g: &Gpu| {
        let s = &g.stream;
        let d = 128;
        let paged = || PagedKv::new(s, &[0, 1, 2, 3], 2, 16, 4, &[20, 32]);
        for cu in [&[0, 3][..], &[0, 4, 2], &[1, 2, 3]] {
            let r = paged().map_err(e)?.with_cu_seqlens_q(s, cu);
            if !matches!(r, Err(Error::InvalidSeqlens(_))) {
                return Err(format!("cu_seqlens_q {cu:?}: expected InvalidSeqlens, got {r:?}"));
            }
        }
        let paged = paged().map_err(e)?.with_cu_seqlens_q(s, &[0, 3, 5]).map_err(e)?;
        let q = s.alloc_zeros::<half::bf16>(6 * 4 * d).map_err(e)?;
        let pool = Layout::contiguous(4, 16, 2, d);
        let k = s.alloc_zeros::<half::bf16>(4 * 16 * 2 * d).map_err(e)?;
        let v = s.alloc_zeros::<half::bf16>(4 * 16 * 2 * d).map_err(e)?;
        let cases = [
            ("rows", Layout::varlen(6, 4, d), FwdOptions::new()),
            ("dense batch", Layout::contiguous(2, 3, 4, d), FwdOptions::new()),
            ("split", Layout::varlen(5, 4, d), FwdOptions::new().num_splits(2)),
        ];
        for (what, ql, opts) in cases {
            let mut out = s.clone_htod(&vec![half::bf16::NAN; 6 * 4 * d]).map_err(e)?;
            let r = flash_fwd_paged(
                s,
                FwdTensors {
                    q: Tensor::new(&q, ql),
                    k: Tensor::new(&k, pool),
                    v: Tensor::new(&v, pool),
                    out: TensorMut::new(&mut out, ql),
                    lse: None,
                },
                &paged,
                &opts,
            );
            let ok = match what {
                "split" => matches!(r, Err(Error::InvalidArgument(_))),
                _ => matches!(r, Err(Error::ShapeMismatch(_))),
            };
            if !ok {
                return Err(format!("{what}: unexpected {r:?}"));
            }
            s.synchronize().map_err(e)?;
            let o: Vec<half::bf16> = s.clone_dtoh(&out).map_err(e)?;
            if o.iter().any(|x| !x.is_nan()) {
                return Err(format!("{what}: out was written"));
            }
        }
        Ok(())
    }));
}

pub fn tests(tests: &mut Vec<Test<Gpu>>) {
    for img in compiled_cells() {
        let cell = img.cell;
        if cell.family != Family::Sm80 || cell.direction != Direction::Fwd {
            continue;
        }
        let d = cell.head_dim as usize;
        let n = img.paged_kernels.len();
        match cell.dtype {
            DType::Bf16 => cell_tests::<half::bf16>(cell.key(), d, n, tests),
            DType::F16 => cell_tests::<half::f16>(cell.key(), d, n, tests),
            _ => {}
        }
    }
    error_tests(tests);
}
