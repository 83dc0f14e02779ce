//! Bad input: each case returns its typed error, and the (poisoned) output is left untouched.

use crate::harness::Test;
use crate::support::{Gpu, bits};
use cudarc::driver::{CudaSlice, DevicePtr};
use flashattn_aot::{
    Alibi, CausalAlign, Error, FwdOptions, FwdTensors, Layout, Mask, Tensor, TensorMut, VarlenSeqlens, flash_fwd,
    flash_fwd_varlen,
};
use half::bf16;

struct Bufs {
    q: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
    out: CudaSlice<bf16>,
    lse: CudaSlice<f32>,
    layout: Layout,
}

const B: usize = 2;
const S: usize = 64;
const H: usize = 4;
const D: usize = 64;

fn bufs(g: &Gpu, d: usize) -> Bufs {
    let layout = Layout::contiguous(B, S, H, d);
    let n = B * S * H * d;
    let data: Vec<bf16> = (0..n)
        .map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 101.0))
        .collect();
    let s = &g.stream;
    Bufs {
        q: s.clone_htod(&data).unwrap(),
        k: s.clone_htod(&data).unwrap(),
        v: s.clone_htod(&data).unwrap(),
        out: s.clone_htod(&vec![bf16::NAN; n]).unwrap(),
        lse: s.clone_htod(&vec![f32::NAN; B * H * S]).unwrap(),
        layout,
    }
}

/// Runs `f` (which must fail with an error accepted by `expect`) and checks `out` kept its bits.
fn expect_error(
    g: &Gpu,
    d: usize,
    f: impl FnOnce(&Gpu, &mut Bufs) -> flashattn_aot::Result<flashattn_aot::FwdInfo>,
    expect: impl Fn(&Error) -> bool,
) -> Result<(), String> {
    let mut b = bufs(g, d);
    let before = bits(&g.stream, &b.out);
    let r = f(g, &mut b);
    g.stream.synchronize().map_err(|e| e.to_string())?;
    match r {
        Ok(info) => return Err(format!("expected an error, but {} ran", info.symbol)),
        Err(e) if !expect(&e) => return Err(format!("unexpected error: {e}")),
        Err(_) => {}
    }
    if bits(&g.stream, &b.out) != before {
        return Err("the output was written although the call failed".into());
    }
    let lse: Vec<f32> = g.stream.clone_dtoh(&b.lse).unwrap();
    if lse.iter().any(|x| !x.is_nan()) {
        return Err("lse was written although the call failed".into());
    }
    Ok(())
}

fn call(
    g: &Gpu,
    b: &mut Bufs,
    ql: Layout,
    kl: Layout,
    ol: Layout,
    opts: &FwdOptions<'_>,
) -> flashattn_aot::Result<flashattn_aot::FwdInfo> {
    let t = FwdTensors {
        q: Tensor::new(&b.q, ql),
        k: Tensor::new(&b.k, kl),
        v: Tensor::new(&b.v, kl),
        out: TensorMut::new(&mut b.out, ol),
        lse: Some(&mut b.lse),
    };
    flash_fwd(&g.stream, t, opts)
}

pub fn tests(tests: &mut Vec<Test<Gpu>>) {
    let mut add = |name: &str, f: fn(&Gpu) -> Result<(), String>| tests.push(Test::new(format!("errors::{name}"), f));

    add("unsupported_head_dim", |g| {
        expect_error(
            g,
            72,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new())
            },
            |e| matches!(e, Error::UnsupportedHeadDim { head_dim: 72, .. }),
        )
    });
    add("heads_k_must_divide_heads", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let kl = Layout::contiguous(B, S, 3, D);
                call(g, b, l, kl, l, &FwdOptions::new())
            },
            |e| matches!(e, Error::ShapeMismatch(m) if m.contains("must divide")),
        )
    });
    add("head_dims_must_agree", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let kl = Layout::contiguous(B, S, 2, 128);
                call(g, b, l, kl, l, &FwdOptions::new())
            },
            |e| matches!(e, Error::ShapeMismatch(_)),
        )
    });
    add("out_shape_must_match_q", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let ol = Layout::contiguous(B, S - 1, H, D);
                call(g, b, l, l, ol, &FwdOptions::new())
            },
            |e| matches!(e, Error::ShapeMismatch(_)),
        )
    });
    add("buffer_too_small", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let big = Layout::contiguous(B, S + 1, H, D);
                let l = b.layout;
                call(g, b, big, l, big, &FwdOptions::new())
            },
            |e| matches!(e, Error::BufferTooSmall { tensor: "q", .. }),
        )
    });
    add("strides_reach_outside", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let bad = l.with_strides(l.batch_stride, l.row_stride + 8, l.head_stride);
                call(g, b, l, bad, l, &FwdOptions::new())
            },
            |e| matches!(e, Error::BufferTooSmall { tensor: "k", .. }),
        )
    });
    add("lse_too_small", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let mut small = g.stream.clone_htod(&vec![f32::NAN; B * H * S - 1]).unwrap();
                let t = FwdTensors {
                    q: Tensor::new(&b.q, l),
                    k: Tensor::new(&b.k, l),
                    v: Tensor::new(&b.v, l),
                    out: TensorMut::new(&mut b.out, l),
                    lse: Some(&mut small),
                };
                flash_fwd(&g.stream, t, &FwdOptions::new())
            },
            |e| matches!(e, Error::BufferTooSmall { tensor: "lse", .. }),
        )
    });
    add("misaligned_base", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = Layout::contiguous(B, S - 1, H, D);
                let view = b.q.slice(1..);
                let t = FwdTensors {
                    q: Tensor::new(&view, l),
                    k: Tensor::new(&b.k, b.layout),
                    v: Tensor::new(&b.v, b.layout),
                    out: TensorMut::new(&mut b.out, l),
                    lse: Some(&mut b.lse),
                };
                flash_fwd(&g.stream, t, &FwdOptions::new())
            },
            |e| matches!(e, Error::Misaligned { tensor: "q", .. }),
        )
    });
    add("misaligned_stride", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let odd = Layout::contiguous(B, S / 2, H, D).with_strides(l.batch_stride, l.row_stride + 3, D);
                let kl = Layout::contiguous(B, S, H, D);
                let ol = Layout::contiguous(B, S / 2, H, D);
                call(g, b, odd, kl, ol, &FwdOptions::new())
            },
            |e| {
                matches!(
                    e,
                    Error::Misaligned {
                        tensor: "q",
                        what: "row stride",
                        ..
                    }
                )
            },
        )
    });
    add("bad_softcap", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().softcap(-1.0))
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        )
    });
    add("bad_scale", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().softmax_scale(f32::NAN))
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        )
    });
    add("negative_scale", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().softmax_scale(-0.125))
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        )
    });
    add("sink_tokens_without_mask", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().sink_tokens(4))
            },
            |e| matches!(e, Error::InvalidArgument(_)),
        )
    });
    add("alibi_wrong_length", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let slopes = g.stream.clone_htod(&[0.5f32; H + 1]).unwrap();
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().alibi(Alibi::PerHead(&slopes)))
            },
            |e| matches!(e, Error::ShapeMismatch(m) if m.contains("ALiBi")),
        )
    });
    add("alibi_per_batch_wrong_length", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let slopes = g.stream.clone_htod(&[0.5f32; H]).unwrap();
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().alibi(Alibi::PerBatchHead(&slopes)))
            },
            |e| matches!(e, Error::ShapeMismatch(m) if m.contains("ALiBi")),
        )
    });
    add("sink_logits_wrong_length", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let sinks = g.stream.clone_htod(&[0.5f32; H - 1]).unwrap();
                let l = b.layout;
                call(
                    g,
                    b,
                    l,
                    l,
                    l,
                    &FwdOptions::new()
                        .mask(Mask::Causal(CausalAlign::TopLeft))
                        .sink_logits(&sinks),
                )
            },
            |e| matches!(e, Error::ShapeMismatch(m) if m.contains("sink")),
        )
    });
    add("output_aliases_input", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                let (ptr, _guard) = b.q.device_ptr(&g.stream);
                // SAFETY (test): a second handle on q's memory, forgotten below so it never frees it.
                let mut alias: CudaSlice<bf16> = unsafe { g.stream.upgrade_device_ptr(ptr, B * S * H * D) };
                let t = FwdTensors {
                    q: Tensor::new(&b.q, l),
                    k: Tensor::new(&b.k, l),
                    v: Tensor::new(&b.v, l),
                    out: TensorMut::new(&mut alias, l),
                    lse: None,
                };
                let r = flash_fwd(&g.stream, t, &FwdOptions::new());
                std::mem::forget(alias);
                r
            },
            |e| matches!(e, Error::Aliasing { a: "out", b: "q" }),
        )
    });
    add("varlen_bad_cu_seqlens", |g| {
        let s = &g.stream;
        let checks = [
            VarlenSeqlens::new(s, &[0, 5, 3], &[0, 5, 9]).err(),
            VarlenSeqlens::new(s, &[1, 5], &[0, 5]).err(),
            VarlenSeqlens::new(s, &[0], &[0]).err(),
            VarlenSeqlens::new(s, &[0, 5, 9], &[0, 5]).err(),
            VarlenSeqlens::new(s, &[0, 5], &[0, 5])
                .unwrap()
                .with_seqused_k(s, &[6])
                .err(),
            VarlenSeqlens::new(s, &[0, 5], &[0, 5])
                .unwrap()
                .with_seqused_k(s, &[1, 1])
                .err(),
        ];
        for (i, c) in checks.into_iter().enumerate() {
            match c {
                Some(Error::InvalidSeqlens(_)) => {}
                other => return Err(format!("check {i}: expected InvalidSeqlens, got {other:?}")),
            }
        }
        Ok(())
    });
    add("varlen_rows_must_match", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let sl = VarlenSeqlens::new(&g.stream, &[0, 10, 20], &[0, 10, 20]).unwrap();
                let l = Layout::varlen(21, H, D);
                let t = FwdTensors {
                    q: Tensor::new(&b.q, l),
                    k: Tensor::new(&b.k, l),
                    v: Tensor::new(&b.v, l),
                    out: TensorMut::new(&mut b.out, l),
                    lse: Some(&mut b.lse),
                };
                flash_fwd_varlen(&g.stream, t, &sl, &FwdOptions::new())
            },
            |e| matches!(e, Error::ShapeMismatch(_)),
        )
    });
    add("split_varlen", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let sl = VarlenSeqlens::new(&g.stream, &[0, 10, 20], &[0, 10, 20]).unwrap();
                let l = Layout::varlen(20, H, D);
                let t = FwdTensors {
                    q: Tensor::new(&b.q, l),
                    k: Tensor::new(&b.k, l),
                    v: Tensor::new(&b.v, l),
                    out: TensorMut::new(&mut b.out, l),
                    lse: Some(&mut b.lse),
                };
                flash_fwd_varlen(&g.stream, t, &sl, &FwdOptions::new().num_splits(2))
            },
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("varlen")),
        )
    });
    add("split_too_many_parts", |g| {
        expect_error(
            g,
            D,
            |g, b| {
                let l = b.layout;
                call(g, b, l, l, l, &FwdOptions::new().num_splits(129))
            },
            |e| matches!(e, Error::InvalidArgument(m) if m.contains("num_splits")),
        )
    });
}
