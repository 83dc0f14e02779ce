//! Forward benchmark on the FlashAttention-3 paper grid (batch x seqlen = 16k tokens, hidden 2048,
//! head dims 64/128/256, causal and not, seqlen 512..16k), plus head dims 80/96 and GQA 32/8.
//!
//! CUDA-event timing around each call, warm-up first, median of `--iters` runs; FLOPs
//! `4 b h sq sk d`, halved for causal. Prints a table and writes JSON (`--json PATH`) that
//! `benches/compare.py` joins with PyTorch's SDPA backends measured in the same session.
//!
//! ```text
//! cargo bench --bench attention -- [--quick] [--family sm80|auto] [--iters N] [--json out.json]
//! cargo bench --bench attention -- --bwd [--deterministic] [...]
//! ```
//!
//! `--bwd` times the backward (`flash_bwd`: its three kernels, workspace allocation included) on
//! the outputs of one forward, and counts 2.5x the forward's FLOPs (FlashAttention's convention:
//! five GEMMs of the forward's two). `--deterministic` runs it in deterministic mode.
//!
//! `--merge` times `merge_states` instead (2-4 parts of (1, 16384, 32, 128) bf16) and prints the
//! bytes it moves per second.
//!
//! `--paged` times `flash_fwd_paged` (head dim 128, 32 query / 8 KV heads, shuffled pages of 16,
//! 64 and 256 slots) on decode steps (one query per sequence, batch 64) and causal prefill chunks
//! (512 queries, batch 4), against `flash_fwd` on the same keys stored densely, with the same
//! sm80-family kernel and with the default (sm90 on Hopper) one, in the same process.
//!
//! `--decode` times decode steps of small batches over long caches (1-16 sequences, 8k-128k
//! keys, 32 / 8 heads, d 128): unsplit on the device's family and on the sm80 family, the
//! split-KV heuristic (`num_splits` 0) on the device's family, on the sm80 family, and over
//! pages of 16. `benches/decode.py` times
//! PyTorch's SDPA backends on the same cases.

use cudarc::driver::sys::CUevent_flags;
use flashattn_aot::{
    AttnState, BwdOptions, BwdTensors, CausalAlign, Family, FwdOptions, FwdTensors, KernelOverride, Layout, PagedKv,
    Tensor, TensorMut, flash_bwd, flash_fwd, flash_fwd_paged, merge_states, open_device,
};
use half::bf16;
use std::io::Write;

struct Args {
    quick: bool,
    family: Option<Family>,
    iters: usize,
    json: Option<String>,
    head_dims: Vec<usize>,
    variant: Option<usize>,
    seqlens: Option<Vec<usize>>,
    causal: Option<bool>,
    bwd: bool,
    deterministic: bool,
    merge: bool,
    paged: bool,
    decode: bool,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        family: None,
        iters: 30,
        json: None,
        head_dims: vec![64, 128, 256, 80, 96],
        variant: None,
        seqlens: None,
        causal: None,
        bwd: false,
        deterministic: false,
        merge: false,
        paged: false,
        decode: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--bwd" => a.bwd = true,
            "--merge" => a.merge = true,
            "--paged" => a.paged = true,
            "--decode" => a.decode = true,
            "--deterministic" => a.deterministic = true,
            "--family" => {
                a.family = match it.next().as_deref() {
                    Some("sm80") => Some(Family::Sm80),
                    Some("sm90") => Some(Family::Sm90),
                    _ => None,
                }
            }
            "--iters" => a.iters = it.next().and_then(|v| v.parse().ok()).unwrap_or(30),
            "--json" => a.json = it.next(),
            "--variant" => a.variant = it.next().and_then(|v| v.parse().ok()),
            "--seqlens" => a.seqlens = it.next().map(|v| v.split(',').filter_map(|d| d.parse().ok()).collect()),
            "--causal" => a.causal = it.next().map(|v| v == "1" || v == "true"),
            "--head-dims" => {
                a.head_dims = it
                    .next()
                    .map(|v| v.split(',').filter_map(|d| d.parse().ok()).collect())
                    .unwrap_or_default()
            }
            _ => {}
        }
    }
    a
}

struct Row {
    hdim: usize,
    causal: bool,
    seqlen: usize,
    batch: usize,
    heads: usize,
    heads_k: usize,
    ms: f64,
    tflops: f64,
    symbol: String,
}

fn main() {
    let a = args();
    let ctx = match open_device(0) {
        Ok(c) => c,
        Err(e) => {
            println!("benchmark skipped: {e}");
            return;
        }
    };
    let stream = ctx.default_stream();
    let seqlens: Vec<usize> = match (&a.seqlens, a.quick) {
        (Some(s), _) => s.clone(),
        (None, true) => vec![2048, 8192],
        (None, false) => vec![512, 1024, 2048, 4096, 8192, 16384],
    };
    let causals: Vec<bool> = match a.causal {
        Some(c) => vec![c],
        None => vec![false, true],
    };
    let mut configs = Vec::new();
    for &d in &a.head_dims {
        for &causal in &causals {
            for &s in &seqlens {
                configs.push((d, causal, s, 2048 / d, 2048 / d));
            }
        }
    }
    // GQA 32/8 (Llama-style), head dim 128.
    for &causal in causals.iter().filter(|_| a.head_dims.contains(&128)) {
        for &s in &seqlens {
            configs.push((128, causal, s, 32, 8));
        }
    }
    // Independent random Q, K, V (values in [-1, 1)), large enough for every config, reused.
    let max_elems = 16384 * 32 * 128;
    let random_pool = |seed: u64| -> Vec<bf16> {
        let mut state = seed;
        (0..max_elems)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                bf16::from_f32((state >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            })
            .collect()
    };
    let q = stream.clone_htod(&random_pool(0x2545_f491_4f6c_dd1d)).unwrap();
    let k = stream.clone_htod(&random_pool(0x9e37_79b9_7f4a_7c15)).unwrap();
    let v = stream.clone_htod(&random_pool(0xd1b5_4a32_d192_ed03)).unwrap();
    let mut out = stream.alloc_zeros::<bf16>(max_elems).unwrap();
    // Backward buffers (only with --bwd): dO reuses the input pool.
    let bwd_len = |n: usize| if a.bwd { n } else { 1 };
    let mut lse = stream.alloc_zeros::<f32>(bwd_len(16384 * 32)).unwrap();
    let mut dq = stream.alloc_zeros::<bf16>(bwd_len(max_elems)).unwrap();
    let mut dk = stream.alloc_zeros::<bf16>(bwd_len(max_elems)).unwrap();
    let mut dv = stream.alloc_zeros::<bf16>(bwd_len(max_elems)).unwrap();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).unwrap();
    // Median of `iters` CUDA-event-timed calls after 3 warm-up calls.
    let time_ms = |run: &mut dyn FnMut()| {
        for _ in 0..3 {
            run();
        }
        let mut times = Vec::new();
        for _ in 0..a.iters {
            start.record(&stream).unwrap();
            run();
            stop.record(&stream).unwrap();
            stop.synchronize().unwrap();
            times.push(start.elapsed_ms(&stop).unwrap() as f64);
        }
        times.sort_by(|x, y| x.partial_cmp(y).unwrap());
        times[times.len() / 2]
    };
    if a.merge {
        // merge_states over 2, 3 and 4 parts of (1, 16384, 32, 128) bf16 (128 MiB each): memory
        // bound, so the figure is bytes moved (parts + LSEs read, O + LSE written) per second.
        let l = Layout::contiguous(1, 16384, 32, 128);
        let rows_n = 16384 * 32;
        let lse_parts: Vec<_> = (0..4)
            .map(|p| {
                let vals: Vec<f32> = (0..rows_n).map(|i| ((i * 7 + p * 5) % 13) as f32 * 0.25).collect();
                stream.clone_htod(&vals).unwrap()
            })
            .collect();
        let mut merged = stream.alloc_zeros::<bf16>(max_elems).unwrap();
        let mut merged_lse = stream.alloc_zeros::<f32>(rows_n).unwrap();
        let sources = [&q, &k, &v, &out];
        println!("{:>6} {:>9} {:>8}", "parts", "ms", "GB/s");
        for n in [2usize, 3, 4] {
            let parts: Vec<AttnState<'_, bf16>> = (0..n)
                .map(|i| AttnState::new(Tensor::new(sources[i], l), &lse_parts[i]))
                .collect();
            let ms = time_ms(&mut || {
                merge_states(&stream, &parts, TensorMut::new(&mut merged, l), Some(&mut merged_lse)).unwrap();
            });
            let bytes = ((n + 1) * max_elems * 2 + (n + 1) * rows_n * 4) as f64;
            println!("{n:>6} {ms:>9.3} {:>8.0}", bytes / ms / 1e6);
        }
        return;
    }
    if a.decode {
        // Decode steps (sq = 1, 32 / 8 heads, d 128, no mask: what a bottom-right causal step
        // sees) of small batches over long caches: unsplit on the device's own family, unsplit
        // on the sm80 family, the split-KV heuristic (num_splits 0) on each, and the heuristic
        // over the same keys in shuffled pages of 16. GB/s = K and V bytes / time.
        let (h, hk, d) = (32usize, 8usize, 128usize);
        let cases: [(usize, usize); 7] = [
            (1, 8192),
            (1, 32768),
            (1, 131072),
            (4, 32768),
            (8, 8192),
            (16, 8192),
            (16, 32768),
        ];
        let max_kv = cases.iter().map(|c| c.0 * c.1).max().unwrap() * hk * d;
        let kbuf = stream
            .clone_htod(&random_pool(7)[..max_kv.min(max_elems)].repeat(max_kv.div_ceil(max_elems))[..max_kv])
            .unwrap();
        let vbuf = stream
            .clone_htod(&random_pool(9)[..max_kv.min(max_elems)].repeat(max_kv.div_ceil(max_elems))[..max_kv])
            .unwrap();
        println!(
            "{:>5} {:>6} {:>10} {:>10} {:>10} {:>6} {:>10} {:>10} {:>8} {:>8}",
            "batch", "L", "own ms", "sm80 ms", "split ms", "parts", "s80spl ms", "paged ms", "own GB/s", "splt GB/s"
        );
        for (b, l) in cases {
            let ql = Layout::contiguous(b, 1, h, d);
            let dense = Layout::contiguous(b, l, hk, d);
            let own = FwdOptions::new().num_splits(1);
            let sm80 = own.kernel_override(KernelOverride {
                family: Some(Family::Sm80),
                ..Default::default()
            });
            let auto = FwdOptions::new();
            let sm80_split = auto.kernel_override(KernelOverride {
                family: Some(Family::Sm80),
                ..Default::default()
            });
            let mut parts = 0;
            let mut run_dense = |opts: &FwdOptions<'_>, parts: &mut usize| {
                let t = FwdTensors {
                    q: Tensor::new(&q, ql),
                    k: Tensor::new(&kbuf, dense),
                    v: Tensor::new(&vbuf, dense),
                    out: TensorMut::new(&mut out, ql),
                    lse: None,
                };
                *parts = flash_fwd(&stream, t, opts).unwrap().num_splits;
            };
            let mut ignore = 0;
            let ms_own = time_ms(&mut || run_dense(&own, &mut ignore));
            let ms_sm80 = time_ms(&mut || run_dense(&sm80, &mut ignore));
            let ms_split = time_ms(&mut || run_dense(&auto, &mut parts));
            let ms_sm80_split = time_ms(&mut || run_dense(&sm80_split, &mut ignore));
            let page = 16usize;
            let pages_per_seq = l / page;
            let num_pages = b * pages_per_seq;
            let mut order: Vec<i32> = (0..num_pages as i32).collect();
            let mut st = 0x2545_f491_4f6c_dd1du64;
            for i in (1..num_pages).rev() {
                st ^= st << 13;
                st ^= st >> 7;
                st ^= st << 17;
                order.swap(i, (st % (i as u64 + 1)) as usize);
            }
            let lens = vec![l as i32; b];
            let paged = PagedKv::new(&stream, &order, pages_per_seq, page, num_pages, &lens).unwrap();
            let pool = Layout::contiguous(num_pages, page, hk, d);
            let ms_paged = time_ms(&mut || {
                let t = FwdTensors {
                    q: Tensor::new(&q, ql),
                    k: Tensor::new(&kbuf, pool),
                    v: Tensor::new(&vbuf, pool),
                    out: TensorMut::new(&mut out, ql),
                    lse: None,
                };
                flash_fwd_paged(&stream, t, &paged, &auto).unwrap();
            });
            let kv_bytes = (2 * b * l * hk * d * 2) as f64;
            println!(
                "{b:>5} {l:>6} {ms_own:>10.4} {ms_sm80:>10.4} {ms_split:>10.4} {parts:>6} {ms_sm80_split:>10.4} {ms_paged:>10.4} {:>8.0} {:>8.0}",
                kv_bytes / ms_own / 1e6,
                kv_bytes / ms_split / 1e6
            );
            std::io::stdout().flush().ok();
        }
        return;
    }
    if a.paged {
        // Decode (sq = 1, batch 64) and causal prefill chunks (sq = 512, batch 4) over L cached
        // keys per sequence. The pool is the dense K/V buffer seen as pages, so paged and dense
        // calls read the same bytes; the block table is a fixed shuffle of the pages.
        let (h, hk, d) = (32usize, 8usize, 128usize);
        let cases: [(&str, usize, usize, usize); 4] = [
            ("decode", 1, 64, 2048),
            ("decode", 1, 64, 8192),
            ("chunk", 512, 4, 4096),
            ("chunk", 512, 4, 16384),
        ];
        let max_kv = cases.iter().map(|c| c.2 * c.3).max().unwrap() * hk * d;
        let kbuf = stream.alloc_zeros::<bf16>(max_kv).unwrap();
        let vbuf = stream.alloc_zeros::<bf16>(max_kv).unwrap();
        println!(
            "{:>6} {:>4} {:>5} {:>6} {:>5} {:>10} {:>10} {:>10} {:>7} {:>8}",
            "what", "sq", "batch", "L", "page", "paged ms", "sm80 ms", "auto ms", "p/sm80", "KV GB/s"
        );
        for (what, sq, b, l) in cases {
            let ql = Layout::contiguous(b, sq, h, d);
            let dense = Layout::contiguous(b, l, hk, d);
            let causal = FwdOptions::new().causal(CausalAlign::BottomRight);
            let sm80 = causal.kernel_override(KernelOverride {
                family: Some(Family::Sm80),
                ..Default::default()
            });
            let mut run_dense = |opts: &FwdOptions<'_>| {
                let t = FwdTensors {
                    q: Tensor::new(&q, ql),
                    k: Tensor::new(&kbuf, dense),
                    v: Tensor::new(&vbuf, dense),
                    out: TensorMut::new(&mut out, ql),
                    lse: None,
                };
                flash_fwd(&stream, t, opts).unwrap();
            };
            let ms_sm80 = time_ms(&mut || run_dense(&sm80));
            let ms_auto = time_ms(&mut || run_dense(&causal));
            for page in [16usize, 64, 256] {
                let pages_per_seq = l / page;
                let num_pages = b * pages_per_seq;
                let mut order: Vec<i32> = (0..num_pages as i32).collect();
                let mut st = 0x2545_f491_4f6c_dd1du64;
                for i in (1..num_pages).rev() {
                    st ^= st << 13;
                    st ^= st >> 7;
                    st ^= st << 17;
                    order.swap(i, (st % (i as u64 + 1)) as usize);
                }
                let lens = vec![l as i32; b];
                let paged = PagedKv::new(&stream, &order, pages_per_seq, page, num_pages, &lens).unwrap();
                let pool = Layout::contiguous(num_pages, page, hk, d);
                let ms = time_ms(&mut || {
                    let t = FwdTensors {
                        q: Tensor::new(&q, ql),
                        k: Tensor::new(&kbuf, pool),
                        v: Tensor::new(&vbuf, pool),
                        out: TensorMut::new(&mut out, ql),
                        lse: None,
                    };
                    flash_fwd_paged(&stream, t, &paged, &causal).unwrap();
                });
                let kv_bytes = (2 * b * l * hk * d * 2) as f64;
                println!(
                    "{what:>6} {sq:>4} {b:>5} {l:>6} {page:>5} {ms:>10.4} {ms_sm80:>10.4} {ms_auto:>10.4} {:>7.3} {:>8.0}",
                    ms / ms_sm80,
                    kv_bytes / ms / 1e6
                );
                std::io::stdout().flush().ok();
            }
        }
        return;
    }
    let mut rows = Vec::new();
    println!(
        "{:>5} {:>6} {:>6} {:>5} {:>5} {:>4} {:>9} {:>8}  kernel{}",
        "hdim",
        "causal",
        "seqlen",
        "batch",
        "heads",
        "hk",
        "ms",
        "TFLOP/s",
        if a.bwd { " (backward)" } else { "" }
    );
    for (d, causal, s, h, hk) in configs {
        let b = 16384 / s;
        let ql = Layout::contiguous(b, s, h, d);
        let kl = Layout::contiguous(b, s, hk, d);
        let over = KernelOverride {
            family: a.family,
            variant: a.variant,
            ..Default::default()
        };
        let mut opts = FwdOptions::new();
        if causal {
            opts = opts.causal(CausalAlign::BottomRight);
        }
        let fwd_opts = opts.kernel_override(KernelOverride {
            variant: if a.bwd { None } else { a.variant },
            ..over
        });
        let mut fwd = |lse: Option<&mut cudarc::driver::CudaSlice<f32>>| {
            let t = FwdTensors {
                q: Tensor::new(&q, ql),
                k: Tensor::new(&k, kl),
                v: Tensor::new(&v, kl),
                out: TensorMut::new(&mut out, ql),
                lse: lse.map(|l| l as &mut dyn cudarc::driver::DevicePtrMut<f32>),
            };
            flash_fwd(&stream, t, &fwd_opts)
        };
        let fwd_flops = 4.0 * (b * h * s * s * d) as f64 / if causal { 2.0 } else { 1.0 };
        let (ms, flops, symbol) = if a.bwd {
            // One forward for O and LSE, then the timed backward.
            if let Err(e) = fwd(Some(&mut lse)) {
                println!("{d:>5} {causal:>6} {s:>6}: forward: {e}");
                continue;
            }
            let bwd_opts = BwdOptions::new(opts)
                .deterministic(a.deterministic)
                .kernel_override(over);
            let mut bwd = || {
                let t = BwdTensors {
                    q: Tensor::new(&q, ql),
                    k: Tensor::new(&k, kl),
                    v: Tensor::new(&v, kl),
                    out: Tensor::new(&out, ql),
                    dout: Tensor::new(&q, ql),
                    lse: &lse,
                    dq: TensorMut::new(&mut dq, ql),
                    dk: TensorMut::new(&mut dk, kl),
                    dv: TensorMut::new(&mut dv, kl),
                    dsink: None,
                };
                flash_bwd(&stream, t, &bwd_opts)
            };
            let info = match bwd() {
                Ok(i) => i,
                Err(e) => {
                    println!("{d:>5} {causal:>6} {s:>6}: {e}");
                    continue;
                }
            };
            let ms = time_ms(&mut || {
                bwd().unwrap();
            });
            (ms, 2.5 * fwd_flops, info.symbol)
        } else {
            let info = match fwd(None) {
                Ok(i) => i,
                Err(e) => {
                    println!("{d:>5} {causal:>6} {s:>6}: {e}");
                    continue;
                }
            };
            let ms = time_ms(&mut || {
                fwd(None).unwrap();
            });
            (ms, fwd_flops, info.symbol)
        };
        let tflops = flops / ms / 1e9;
        println!("{d:>5} {causal:>6} {s:>6} {b:>5} {h:>5} {hk:>4} {ms:>9.3} {tflops:>8.1}  {symbol}");
        std::io::stdout().flush().ok();
        rows.push(Row {
            hdim: d,
            causal,
            seqlen: s,
            batch: b,
            heads: h,
            heads_k: hk,
            ms,
            tflops,
            symbol: symbol.to_string(),
        });
    }
    if let Some(path) = a.json {
        let device = ctx.name().unwrap_or_default();
        let mut js = format!("{{\n \"device\": {device:?},\n \"rows\": [\n");
        for (i, r) in rows.iter().enumerate() {
            js.push_str(&format!(
                "  {{\"impl\": \"flashattn-aot\", \"hdim\": {}, \"causal\": {}, \"seqlen\": {}, \"batch\": {}, \"heads\": {}, \"heads_k\": {}, \"ms\": {:.4}, \"{}\": {:.1}, \"deterministic\": {}, \"kernel\": {:?}}}{}\n",
                r.hdim, r.causal, r.seqlen, r.batch, r.heads, r.heads_k, r.ms,
                if a.bwd { "bwd_tflops" } else { "fwd_tflops" }, r.tflops, a.deterministic, r.symbol,
                if i + 1 < rows.len() { "," } else { "" }
            ));
        }
        js.push_str(" ]\n}\n");
        std::fs::write(&path, js).unwrap();
        println!("wrote {path}");
    }
}
