//! `merge_states`: against an f64 host merge of the same inputs (empty parts, fully empty rows,
//! strided layouts, 1 to 16 parts, bitwise reruns), end to end as split-KV attention against one
//! forward over all keys, and bad input (typed error, nothing written).

use crate::harness::Test;
use crate::support::{Gpu, HostElem, bits};
use cudarc::driver::CudaSlice;
use flashattn_aot::{
    AttnState, DType, Direction, Error, Family, FwdOptions, FwdTensors, Layout, MAX_MERGE_PARTS, Tensor, TensorMut,
    compiled_cells, flash_fwd, merge_states,
};

fn e(msg: impl std::fmt::Display) -> String {
    msg.to_string()
}

/// A small deterministic generator (xorshift), uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// Offset of element (b, s, h, x) in `l`.
fn at(l: &Layout, b: usize, s: usize, h: usize, x: usize) -> usize {
    b * l.batch_stride + s * l.row_stride + h * l.head_stride + x
}

/// Max that keeps NaN (f64::max drops it): an unwritten (NaN-poisoned) output must fail.
fn nan_max(m: f64, x: f64) -> f64 {
    if m.is_nan() || x.is_nan() { f64::NAN } else { m.max(x) }
}

/// Output quantum of the element type (relative rounding step).
fn quantum<T: HostElem>() -> f64 {
    if T::PREC == flashattn_aot::reference::cpu::LowPrecision::Bf16 {
        1.0 / 256.0
    } else {
        1.0 / 2048.0
    }
}

/// The f64 merge of host data: (O rows in (b, s, h, d) contiguous order, LSE (b, h, s)).
fn host_merge(o: &[Vec<f32>], lse: &[Vec<f32>], layouts: &[Layout], shape: &Layout) -> (Vec<f64>, Vec<f64>) {
    let (bn, sn, hn, dn) = (shape.batch, shape.seqlen, shape.heads, shape.head_dim);
    let mut out = vec![0.0f64; bn * sn * hn * dn];
    let mut out_lse = vec![f64::NEG_INFINITY; bn * hn * sn];
    for b in 0..bn {
        for s in 0..sn {
            for h in 0..hn {
                let li = (b * hn + h) * sn + s;
                let m = lse.iter().map(|l| l[li] as f64).fold(f64::NEG_INFINITY, f64::max);
                if m == f64::NEG_INFINITY {
                    continue;
                }
                let w: Vec<f64> = lse.iter().map(|l| (l[li] as f64 - m).exp()).collect();
                let z: f64 = w.iter().sum();
                for x in 0..dn {
                    let mut acc = 0.0;
                    for (i, oi) in o.iter().enumerate() {
                        if w[i] != 0.0 {
                            acc += w[i] * oi[at(&layouts[i], b, s, h, x)] as f64;
                        }
                    }
                    out[((b * sn + s) * hn + h) * dn + x] = acc / z;
                }
                out_lse[li] = m + z.ln();
            }
        }
    }
    (out, out_lse)
}

/// Random parts with empty (-inf) entries and fully empty rows, part 1 (when present) stored
/// heads-major, O of empty entries NaN (it must not be read); merged on the GPU twice (bitwise
/// equal) and compared with the f64 host merge.
fn check_random<T: HostElem>(g: &Gpu, n: usize, shape: Layout, seed: u64) -> Result<(), String> {
    let s = &g.stream;
    let (bn, sn, hn, dn) = (shape.batch, shape.seqlen, shape.heads, shape.head_dim);
    let mut rng = Rng(seed * 0x9e37_79b9_7f4a_7c15 + 1);
    let rows = bn * sn * hn;
    let mut layouts = Vec::new();
    let mut host_o = Vec::new();
    let mut host_lse = Vec::new();
    for i in 0..n {
        let l = if i == 1 {
            Layout::heads_major(bn, sn, hn, dn)
        } else {
            shape
        };
        let mut lse: Vec<f32> = (0..rows).map(|_| 4.0 * rng.next() + 2.0).collect();
        for (r, x) in lse.iter_mut().enumerate() {
            // Every 5th row of part i empty for some parts; rows r % 7 == 3 empty in every part.
            if (r + i) % 5 == 0 || r % 7 == 3 {
                *x = f32::NEG_INFINITY;
            }
        }
        let mut o = vec![0.0f32; l.extent().unwrap()];
        for b in 0..bn {
            for q in 0..sn {
                for h in 0..hn {
                    let empty = lse[(b * hn + h) * sn + q] == f32::NEG_INFINITY;
                    for x in 0..dn {
                        // Round through T so the host sees exactly what the GPU reads.
                        let v = if empty {
                            f32::NAN
                        } else {
                            T::from_f32(rng.next() * 3.0).to_f32()
                        };
                        o[at(&l, b, q, h, x)] = v;
                    }
                }
            }
        }
        layouts.push(l);
        host_o.push(o);
        host_lse.push(lse);
    }
    let dev_o: Vec<CudaSlice<T>> = host_o
        .iter()
        .map(|o| s.clone_htod(&o.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>()))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let dev_lse: Vec<CudaSlice<f32>> = host_lse
        .iter()
        .map(|l| s.clone_htod(l))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let (want_o, want_lse) = host_merge(&host_o, &host_lse, &layouts, &shape);

    let mut runs = Vec::new();
    for _ in 0..2 {
        let mut out = s.clone_htod(&vec![T::from_f32(f32::NAN); rows * dn]).map_err(e)?;
        let mut lse = s.clone_htod(&vec![f32::NAN; rows]).map_err(e)?;
        let parts: Vec<AttnState<'_, T>> = (0..n)
            .map(|i| AttnState::new(Tensor::new(&dev_o[i], layouts[i]), &dev_lse[i]))
            .collect();
        merge_states(s, &parts, TensorMut::new(&mut out, shape), Some(&mut lse)).map_err(e)?;
        let got_o: Vec<f32> = s.clone_dtoh(&out).map_err(e)?.into_iter().map(|x| x.to_f32()).collect();
        let got_lse: Vec<f32> = s.clone_dtoh(&lse).map_err(e)?;
        runs.push((got_o, got_lse));
    }
    let (got_o, got_lse) = &runs[0];
    let bits0: Vec<u32> = got_o
        .iter()
        .map(|x| x.to_bits())
        .chain(got_lse.iter().map(|x| x.to_bits()))
        .collect();
    let bits1: Vec<u32> = runs[1]
        .0
        .iter()
        .map(|x| x.to_bits())
        .chain(runs[1].1.iter().map(|x| x.to_bits()))
        .collect();
    if bits0 != bits1 {
        return Err("two runs differ bitwise".into());
    }
    let q = quantum::<T>();
    let mut empty_rows = 0;
    for (i, (&g_o, &w_o)) in got_o.iter().zip(&want_o).enumerate() {
        // One rounding of the result plus fp32 accumulation.
        let tol = q * w_o.abs() + 1e-6;
        let diff = (g_o as f64 - w_o).abs();
        if diff.is_nan() || diff > tol {
            return Err(format!("O[{i}] = {g_o}, want {w_o} (tol {tol:.2e})"));
        }
    }
    for (i, (&g_l, &w_l)) in got_lse.iter().zip(&want_lse).enumerate() {
        if w_l == f64::NEG_INFINITY {
            empty_rows += 1;
            if g_l != f32::NEG_INFINITY {
                return Err(format!("LSE[{i}] = {g_l}, want -inf (every part empty)"));
            }
            let row = {
                let (b, rest) = (i / (hn * sn), i % (hn * sn));
                let (h, q) = (rest / sn, rest % sn);
                ((b * sn + q) * hn + h) * dn
            };
            if got_o[row..row + dn].iter().any(|&x| x != 0.0) {
                return Err(format!("O of empty LSE row {i} is not 0"));
            }
        } else if (g_l as f64 - w_l).abs().is_nan() || (g_l as f64 - w_l).abs() > 1e-5 * (1.0 + w_l.abs()) {
            return Err(format!("LSE[{i}] = {g_l}, want {w_l}"));
        }
    }
    if empty_rows == 0 {
        return Err("the case has no fully empty row (test setup)".into());
    }
    Ok(())
}

/// Split-KV attention: one forward per key chunk, merged, against one forward over all keys.
fn check_split_kv<T: HostElem>(g: &Gpu, chunks: &[usize], d: usize) -> Result<(), String> {
    let s = &g.stream;
    let (b, sq, h) = (2usize, 77usize, 4usize);
    let sk: usize = chunks.iter().sum();
    let mut rng = Rng(7 + d as u64);
    let gen_t = |n: usize, rng: &mut Rng| -> Vec<T> { (0..n).map(|_| T::from_f32(rng.next() * 2.0 + 0.5)).collect() };
    let q = s.clone_htod(&gen_t(b * sq * h * d, &mut rng)).map_err(e)?;
    let k = s.clone_htod(&gen_t(b * sk * h * d, &mut rng)).map_err(e)?;
    let v = s.clone_htod(&gen_t(b * sk * h * d, &mut rng)).map_err(e)?;
    let ql = Layout::contiguous(b, sq, h, d);
    let kl_full = Layout::contiguous(b, sk, h, d);
    let opts = FwdOptions::new();
    let fwd = |kv_start: usize, kv_len: usize, out: &mut CudaSlice<T>, lse: &mut CudaSlice<f32>| {
        let kl = Layout::contiguous(b, kv_len, h, d).with_strides(kl_full.batch_stride, kl_full.row_stride, d);
        let off = kv_start * kl_full.row_stride;
        let kv_k = k.slice(off..);
        let kv_v = v.slice(off..);
        flash_fwd(
            s,
            FwdTensors {
                q: Tensor::new(&q, ql),
                k: Tensor::new(&kv_k, kl),
                v: Tensor::new(&kv_v, kl),
                out: TensorMut::new(out, ql),
                lse: Some(lse),
            },
            &opts,
        )
        .map(|_| ())
    };
    let n_o = b * sq * h * d;
    let n_l = b * h * sq;
    let mut full_o = s.clone_htod(&vec![T::from_f32(0.0); n_o]).map_err(e)?;
    let mut full_l = s.alloc_zeros::<f32>(n_l).map_err(e)?;
    fwd(0, sk, &mut full_o, &mut full_l).map_err(e)?;
    let mut part_o = Vec::new();
    let mut part_l = Vec::new();
    let mut start = 0;
    for &c in chunks {
        let mut o = s.clone_htod(&vec![T::from_f32(0.0); n_o]).map_err(e)?;
        let mut l = s.alloc_zeros::<f32>(n_l).map_err(e)?;
        fwd(start, c, &mut o, &mut l).map_err(e)?;
        start += c;
        part_o.push(o);
        part_l.push(l);
    }
    let mut out = s.clone_htod(&vec![T::from_f32(f32::NAN); n_o]).map_err(e)?;
    let mut lse = s.clone_htod(&vec![f32::NAN; n_l]).map_err(e)?;
    let parts: Vec<AttnState<'_, T>> = part_o
        .iter()
        .zip(&part_l)
        .map(|(o, l)| AttnState::new(Tensor::new(o, ql), l))
        .collect();
    merge_states(s, &parts, TensorMut::new(&mut out, ql), Some(&mut lse)).map_err(e)?;
    let got: Vec<f32> = s.clone_dtoh(&out).map_err(e)?.into_iter().map(|x| x.to_f32()).collect();
    let want: Vec<f32> = s
        .clone_dtoh(&full_o)
        .map_err(e)?
        .into_iter()
        .map(|x| x.to_f32())
        .collect();
    let got_l: Vec<f32> = s.clone_dtoh(&lse).map_err(e)?;
    let want_l: Vec<f32> = s.clone_dtoh(&full_l).map_err(e)?;
    // Both sides round O to T once more than the exact result (the parts, then the merge), so
    // allow a few quanta of the largest output.
    let scale = want.iter().fold(1.0f32, |m, x| m.max(x.abs())) as f64;
    let tol = 4.0 * quantum::<T>() * scale;
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() as f64)
        .fold(0.0, nan_max);
    if err.is_nan() || err > tol {
        return Err(format!("max |merged - full| = {err:.3e} > {tol:.3e}"));
    }
    let err_l = got_l
        .iter()
        .zip(&want_l)
        .map(|(a, b)| ((a - b).abs() / (1.0 + b.abs())) as f64)
        .fold(0.0, nan_max);
    if err_l.is_nan() || err_l > 1e-5 {
        return Err(format!("max relative LSE error {err_l:.3e}"));
    }
    Ok(())
}

/// Bad input: the typed error, and `out` and `lse` keep their poison bits.
fn check_error(
    g: &Gpu,
    f: impl FnOnce(
        &Gpu,
        &[CudaSlice<half::bf16>],
        &[CudaSlice<f32>],
        &mut CudaSlice<half::bf16>,
        &mut CudaSlice<f32>,
    ) -> flashattn_aot::Result<()>,
    expect: impl Fn(&Error) -> bool,
) -> Result<(), String> {
    let s = &g.stream;
    let n = 2 * 8 * 4 * 64;
    let o: Vec<CudaSlice<half::bf16>> = (0..MAX_MERGE_PARTS + 1)
        .map(|_| s.clone_htod(&vec![half::bf16::ONE; n]))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let l: Vec<CudaSlice<f32>> = (0..MAX_MERGE_PARTS + 1)
        .map(|_| s.clone_htod(&vec![0.5f32; 2 * 4 * 8]))
        .collect::<Result<_, _>>()
        .map_err(e)?;
    let mut out = s.clone_htod(&vec![half::bf16::NAN; n]).map_err(e)?;
    let mut lse = s.clone_htod(&vec![f32::NAN; 2 * 4 * 8]).map_err(e)?;
    let before = bits(s, &out);
    match f(g, &o, &l, &mut out, &mut lse) {
        Ok(()) => return Err("expected an error, but the merge ran".into()),
        Err(err) if !expect(&err) => return Err(format!("unexpected error: {err}")),
        Err(_) => {}
    }
    s.synchronize().map_err(e)?;
    if bits(s, &out) != before {
        return Err("out was written although the call failed".into());
    }
    if s.clone_dtoh(&lse).map_err(e)?.iter().any(|x| !x.is_nan()) {
        return Err("lse was written although the call failed".into());
    }
    Ok(())
}

/// The shape of the bad-input cases.
const SHAPE: Layout = Layout::contiguous(2, 8, 4, 64);

pub fn tests(tests: &mut Vec<Test<Gpu>>) {
    for n in [1usize, 2, 3, 16] {
        tests.push(Test::new(format!("merge::bf16::random_{n}_parts"), move |g| {
            check_random::<half::bf16>(g, n, Layout::contiguous(2, 37, 5, 128), n as u64)
        }));
        tests.push(Test::new(format!("merge::f16::random_{n}_parts"), move |g| {
            check_random::<half::f16>(g, n, Layout::contiguous(2, 37, 5, 64), n as u64 + 100)
        }));
    }
    // Head dims beyond one 8-element chunk per lane (d = 512: two per lane) and a small one.
    tests.push(Test::new("merge::bf16::head_dim_512", |g| {
        check_random::<half::bf16>(g, 3, Layout::contiguous(1, 9, 3, 512), 5)
    }));
    tests.push(Test::new("merge::f16::head_dim_96", |g| {
        check_random::<half::f16>(g, 4, Layout::contiguous(2, 13, 7, 96), 7)
    }));
    tests.push(Test::new("merge::bf16::head_dim_8", |g| {
        check_random::<half::bf16>(g, 3, Layout::contiguous(3, 11, 2, 8), 6)
    }));
    // Split-KV end to end, for the head dims this build has a fast bf16 / f16 forward for.
    let has_fwd = |dtype: DType, d: usize| {
        compiled_cells().any(|c| {
            matches!(c.cell.family, Family::Sm80 | Family::Sm90)
                && c.cell.direction == Direction::Fwd
                && c.cell.dtype == dtype
                && c.cell.head_dim as usize == d
        })
    };
    for d in [64usize, 128, 256] {
        if !(has_fwd(DType::Bf16, d) && has_fwd(DType::F16, d)) {
            continue;
        }
        tests.push(Test::new(format!("merge::bf16::split_kv_hd{d}"), move |g| {
            check_split_kv::<half::bf16>(g, &[100, 130, 70], d)
        }));
        tests.push(Test::new(format!("merge::f16::split_kv_hd{d}"), move |g| {
            check_split_kv::<half::f16>(g, &[256, 1, 43, 512], d)
        }));
    }

    let mut add =
        |name: &str, f: fn(&Gpu) -> Result<(), String>| tests.push(Test::new(format!("errors::merge_{name}"), f));
    add("no_parts", |g| {
        check_error(
            g,
            |g, _, _, out, lse| merge_states::<half::bf16>(&g.stream, &[], TensorMut::new(out, SHAPE), Some(lse)),
            |err| matches!(err, Error::InvalidArgument(m) if m.contains("1 to 16")),
        )
    });
    add("too_many_parts", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let parts: Vec<_> = (0..MAX_MERGE_PARTS + 1)
                    .map(|i| AttnState::new(Tensor::new(&o[i], SHAPE), &l[i]))
                    .collect();
                merge_states(&g.stream, &parts, TensorMut::new(out, SHAPE), Some(lse))
            },
            |err| matches!(err, Error::InvalidArgument(m) if m.contains("got 17")),
        )
    });
    add("shape_mismatch", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let other = Layout::contiguous(2, 8, 2, 128);
                let parts = [
                    AttnState::new(Tensor::new(&o[0], SHAPE), &l[0]),
                    AttnState::new(Tensor::new(&o[1], other), &l[1]),
                ];
                merge_states(&g.stream, &parts, TensorMut::new(out, SHAPE), Some(lse))
            },
            |err| matches!(err, Error::ShapeMismatch(m) if m.contains("part 1")),
        )
    });
    add("head_dim_not_multiple_of_8", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let odd = Layout::contiguous(2, 8, 4, 60);
                let parts = [AttnState::new(Tensor::new(&o[0], odd), &l[0])];
                merge_states(&g.stream, &parts, TensorMut::new(out, odd), Some(lse))
            },
            |err| matches!(err, Error::Misaligned { what: "head dim", .. }),
        )
    });
    add("part_too_small", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let big = Layout::contiguous(2, 9, 4, 64);
                let parts = [AttnState::new(Tensor::new(&o[0], big), &l[0])];
                merge_states(&g.stream, &parts, TensorMut::new(out, big), Some(lse))
            },
            |err| matches!(err, Error::BufferTooSmall { .. }),
        )
    });
    add("lse_too_small", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let short = l[1].slice(1..);
                let parts = [
                    AttnState::new(Tensor::new(&o[0], SHAPE), &l[0]),
                    AttnState::new(Tensor::new(&o[1], SHAPE), &short),
                ];
                merge_states(&g.stream, &parts, TensorMut::new(out, SHAPE), Some(lse))
            },
            |err| {
                matches!(
                    err,
                    Error::BufferTooSmall {
                        tensor: "merge part lse",
                        ..
                    }
                )
            },
        )
    });
    add("misaligned_part", |g| {
        check_error(
            g,
            |g, o, l, out, lse| {
                let view = o[0].slice(1..);
                let small = Layout::contiguous(2, 7, 4, 64);
                let parts = [AttnState::new(Tensor::new(&view, small), &l[0])];
                merge_states(&g.stream, &parts, TensorMut::new(out, small), Some(lse))
            },
            |err| matches!(err, Error::Misaligned { .. }),
        )
    });
}
