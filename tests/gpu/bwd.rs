//! The sm80- and sm90-family backward (`flash_bwd`, `flash_bwd_varlen`) of every compiled cell
//! (each cell's family forced; sm90 cells where the device runs them):
//!
//! - every semantic option (small ragged shapes, dense and varlen) and ragged shapes against the
//!   f64 CPU backward with FlashAttention's tolerance rule;
//! - large shapes (every option of interest, GQA / MQA, varlen with seqused_k) against the GPU
//!   reference backward, within a few rounding quanta;
//! - the 99 KB tile (sm_86 / sm_89) and the compute_80 PTX image forced on this device;
//! - deterministic mode: 10 reruns bitwise identical (dq, dk, dv, dsink);
//! - bad input: typed errors, nothing written.

use crate::harness::Test;
use crate::semantic_variants;
use crate::support::{
    Case, Gpu, HostElem, WhichBwd, bits, check_bwd_bitwise_reruns, check_bwd_vs_cpu, check_bwd_vs_cpu_info,
    check_bwd_vs_gpu_reference,
};
use cudarc::driver::CudaSlice;
use flashattn_aot::{
    BwdOptions, BwdTensors, CausalAlign, Cell, DType, Direction, Error, Family, FwdOptions, KernelOverride, Layout,
    Mask, Tensor, TensorMut, compiled_cells, flash_bwd,
};
use half::bf16;

/// Tolerance of the large checks against the GPU reference, in rounding quanta of the output's
/// magnitude (P and dS are rounded to the 16-bit type before their GEMMs, as in FlashAttention).
const ULPS: f64 = 4.0;

/// `flash_bwd` with the cell's family forced (on an H100 the sm80 family would otherwise only run
/// where the sm90 family has no cell).
fn flash(family: Family, deterministic: bool) -> WhichBwd {
    WhichBwd::Flash {
        deterministic,
        ov: KernelOverride {
            family: Some(family),
            ..Default::default()
        },
    }
}

fn expect_cell(info: &flashattn_aot::BwdInfo, cell: &Cell) -> Result<(), String> {
    if info.cell != cell.key() {
        return Err(format!("expected cell {} but {} ran", cell.key(), info.cell));
    }
    Ok(())
}

fn cell_tests<T: HostElem>(cell: Cell, has_ptx: bool, tests: &mut Vec<Test<Gpu>>) {
    let d = cell.head_dim as usize;
    let key = cell.key();
    let fam = cell.family;
    let sm80 = fam == Family::Sm80;
    // Every semantic option, small ragged shape (dense and varlen), against the CPU reference.
    for (name, case) in semantic_variants(&Case::new(113, 203, d)) {
        tests.push(Test::new(format!("bwd::{key}::{name}"), move |g| {
            let info = check_bwd_vs_cpu_info::<T>(g, &case, flash(fam, false))?;
            expect_cell(&info, &cell)
        }));
    }
    // Stored but unused key rows (past seqused_k) holding NaN: no gradient may see them, and
    // their dK / dV rows are exact zeros (the sm90 kernel zeroes them in shared memory).
    let mut nan_tail = Case::new(113, 203, d);
    nan_tail.varlen = Some((vec![113, 70, 5], vec![213, 140, 8]));
    nan_tail.seqused_k = Some(vec![203, 77, 0]);
    nan_tail.mask = Mask::Causal(CausalAlign::BottomRight);
    nan_tail.nan_unused_kv = true;
    tests.push(Test::new(format!("bwd::{key}::varlen_seqused_nan_tail"), move |g| {
        check_bwd_vs_cpu::<T>(g, &nan_tail, flash(fam, false))
    }));
    // Ragged shapes.
    for (sq, sk) in [(1, 1), (113, 203), (239, 1), (1, 239), (1023, 1024)] {
        for causal in [false, true] {
            let mut case = Case::new(sq, sk, d);
            if sq == 1023 {
                case.batch = 1;
                case.heads = 2;
                case.heads_k = 1;
            }
            if causal {
                case.mask = Mask::Causal(CausalAlign::BottomRight);
            }
            let name = format!("bwd::{key}::shape_{sq}x{sk}{}", if causal { "_causal" } else { "" });
            tests.push(Test::new(name, move |g| {
                check_bwd_vs_cpu::<T>(g, &case, flash(fam, false))
            }));
        }
    }
    // Every tile variant, and the smallest-smem tile (what sm_86 / sm_89 run) through the limit.
    let image = flashattn_aot::DISPATCH_TABLE.get(&cell).unwrap().1;
    for (i, entry) in image.kernels.iter().enumerate() {
        let symbol = entry.symbol;
        tests.push(Test::new(format!("bwd::{key}::variant_{i}"), move |g| {
            let mut case = Case::new(300, 301, d);
            case.mask = Mask::Causal(CausalAlign::BottomRight);
            case.sink_logits = true;
            let ov = KernelOverride {
                variant: Some(i),
                family: Some(fam),
                ..Default::default()
            };
            let info = check_bwd_vs_cpu_info::<T>(
                g,
                &case,
                WhichBwd::Flash {
                    deterministic: false,
                    ov,
                },
            )?;
            if info.symbol != format!("{symbol}_main") {
                return Err(format!("{} ran instead of {symbol}", info.symbol));
            }
            Ok(())
        }));
    }
    // The sm80 family's 99 KB tile (the sm90 family runs on H100 / H200 only).
    if sm80 {
        tests.push(Test::new(format!("bwd::{key}::tile_99kb"), move |g| {
            let mut case = Case::new(113, 203, d);
            case.mask = Mask::Causal(CausalAlign::BottomRight);
            let ov = KernelOverride {
                smem_limit: Some(99 * 1024),
                family: Some(Family::Sm80),
                ..Default::default()
            };
            let info = check_bwd_vs_cpu_info::<T>(
                g,
                &case,
                WhichBwd::Flash {
                    deterministic: false,
                    ov,
                },
            )?;
            let image = flashattn_aot::DISPATCH_TABLE.get(&cell).unwrap().1;
            let entry = image
                .kernels
                .iter()
                .find(|k| format!("{}_main", k.symbol) == info.symbol)
                .ok_or_else(|| format!("{} is not a kernel of {}", info.symbol, cell.key()))?;
            if entry.smem_bytes > 99 * 1024 {
                return Err(format!("{} uses {} bytes", info.symbol, entry.smem_bytes));
            }
            Ok(())
        }));
    }
    // The compute_80 PTX image through the driver JIT (what sm_100 / sm_120 run).
    if has_ptx {
        tests.push(Test::new(format!("bwd::{key}::ptx_jit"), move |g| {
            let mut case = Case::new(113, 203, d);
            case.mask = Mask::Window {
                left: Some(30),
                right: Some(0),
                align: CausalAlign::BottomRight,
            };
            let ov = KernelOverride {
                force_ptx: true,
                family: Some(fam),
                ..Default::default()
            };
            check_bwd_vs_cpu::<T>(
                g,
                &case,
                WhichBwd::Flash {
                    deterministic: false,
                    ov,
                },
            )
        }));
    }
    // Large shapes against the GPU reference backward.
    let mut large = Case::new(2111, 3001, d);
    large.batch = 1;
    large.heads = 4;
    large.heads_k = 2;
    let wanted = [
        "plain",
        "causal_bottom_right",
        "causal_top_left",
        "window_16_8",
        "sink_tokens_window",
        "sink_logits_causal",
        "alibi_per_batch_causal",
        "softcap_alibi_window",
        "mqa",
        "heads_major",
    ];
    for (name, case) in semantic_variants(&large) {
        if !wanted.contains(&name) {
            continue;
        }
        tests.push(Test::new(format!("bwd::{key}::large_{name}"), move |g| {
            check_bwd_vs_gpu_reference::<T>(g, &case, flash(fam, false), ULPS).map(|_| ())
        }));
    }
    for (h, hk, causal) in [(8, 8, false), (8, 2, true), (8, 1, false)] {
        let mut case = Case::new(2048, 2048, d);
        case.batch = 2;
        case.heads = h;
        case.heads_k = hk;
        if causal {
            case.mask = Mask::Causal(CausalAlign::BottomRight);
        }
        tests.push(Test::new(format!("bwd::{key}::gqa_{h}_{hk}"), move |g| {
            check_bwd_vs_gpu_reference::<T>(g, &case, flash(fam, false), ULPS).map(|_| ())
        }));
    }
    let mut big_varlen = large.clone();
    big_varlen.varlen = Some((vec![2111, 1000, 17, 0, 700], vec![3001, 2000, 40, 33, 700]));
    big_varlen.seqused_k = Some(vec![3001, 1500, 40, 0, 650]);
    big_varlen.mask = Mask::Causal(CausalAlign::BottomRight);
    big_varlen.sink_logits = true;
    tests.push(Test::new(
        format!("bwd::{key}::large_varlen_seqused_causal"),
        move |g| check_bwd_vs_gpu_reference::<T>(g, &big_varlen, flash(fam, false), ULPS).map(|_| ()),
    ));
    // Deterministic mode: bitwise-identical reruns (GQA, causal, sink logits: dq, dk, dv, dsink),
    // dense and varlen.
    let mut det = Case::new(1500, 1700, d);
    det.batch = 2;
    det.heads = 8;
    det.heads_k = 2;
    det.mask = Mask::Causal(CausalAlign::BottomRight);
    det.sink_logits = true;
    let mut det_window = det.clone();
    det_window.mask = Mask::Window {
        left: Some(300),
        right: Some(40),
        align: CausalAlign::TopLeft,
    };
    det_window.sink_tokens = 70;
    det_window.sink_logits = false;
    let mut det_varlen = det.clone();
    det_varlen.varlen = Some((vec![1500, 300, 1], vec![1700, 299, 64]));
    for (name, case) in [("dense", det), ("window_sinks", det_window), ("varlen", det_varlen)] {
        tests.push(Test::new(format!("bwd::{key}::deterministic_{name}"), move |g| {
            check_bwd_bitwise_reruns::<T>(g, &case, flash(fam, true), 10, ULPS)
        }));
    }
}

/// Bad input for the backward: its typed error, and the (poisoned) gradients left untouched.
fn error_tests(tests: &mut Vec<Test<Gpu>>) {
    const B: usize = 2;
    const S: usize = 64;
    const H: usize = 4;
    const D: usize = 64;
    struct Bufs {
        x: CudaSlice<bf16>,
        out: CudaSlice<bf16>,
        lse: CudaSlice<f32>,
        dq: CudaSlice<bf16>,
        dk: CudaSlice<bf16>,
        dv: CudaSlice<bf16>,
        sinks: CudaSlice<f32>,
    }
    type Call = fn(&Gpu, &mut Bufs, Layout) -> flashattn_aot::Result<flashattn_aot::BwdInfo>;
    fn run(g: &Gpu, call: Call, expect: fn(&Error) -> bool) -> Result<(), String> {
        let l = Layout::contiguous(B, S, H, D);
        let n = B * S * H * D;
        let data: Vec<bf16> = (0..n)
            .map(|i| bf16::from_f32(((i * 37) % 101) as f32 / 101.0))
            .collect();
        let s = &g.stream;
        let nan = vec![bf16::NAN; n];
        let mut b = Bufs {
            x: s.clone_htod(&data).unwrap(),
            out: s.clone_htod(&data).unwrap(),
            lse: s.clone_htod(&vec![0.5f32; B * H * S]).unwrap(),
            dq: s.clone_htod(&nan).unwrap(),
            dk: s.clone_htod(&nan).unwrap(),
            dv: s.clone_htod(&nan).unwrap(),
            sinks: s.clone_htod(&vec![0.25f32; H]).unwrap(),
        };
        let before = [bits(s, &b.dq), bits(s, &b.dk), bits(s, &b.dv)];
        let r = call(g, &mut b, l);
        s.synchronize().map_err(|e| e.to_string())?;
        match r {
            Ok(info) => return Err(format!("expected an error, but {} ran", info.symbol)),
            Err(e) if !expect(&e) => return Err(format!("unexpected error: {e}")),
            Err(_) => {}
        }
        if [bits(s, &b.dq), bits(s, &b.dk), bits(s, &b.dv)] != before {
            return Err("a gradient was written although the call failed".into());
        }
        Ok(())
    }
    fn tensors<'a>(
        b: &'a mut Bufs,
        l: Layout,
        dq_layout: Layout,
        lse: Option<&'a CudaSlice<f32>>,
    ) -> (BwdTensors<'a, bf16>, &'a CudaSlice<f32>) {
        let Bufs {
            x,
            out,
            lse: own_lse,
            dq,
            dk,
            dv,
            sinks,
        } = b;
        (
            BwdTensors {
                q: Tensor::new(x, l),
                k: Tensor::new(x, l),
                v: Tensor::new(x, l),
                out: Tensor::new(out, l),
                dout: Tensor::new(out, l),
                lse: lse.unwrap_or(own_lse),
                dq: TensorMut::new(dq, dq_layout),
                dk: TensorMut::new(dk, l),
                dv: TensorMut::new(dv, l),
                dsink: None,
            },
            sinks,
        )
    }
    let mut add = |name: &str, call: Call, expect: fn(&Error) -> bool| {
        tests.push(Test::new(format!("bwd_errors::{name}"), move |g| run(g, call, expect)));
    };
    add(
        "dq_shape_mismatch",
        |g, b, l| {
            let (t, _) = tensors(b, l, Layout::contiguous(B, S - 1, H, D), None);
            flash_bwd(&g.stream, t, &BwdOptions::new(FwdOptions::new()))
        },
        |e| matches!(e, Error::ShapeMismatch(m) if m.contains("dq")),
    );
    add(
        "missing_dsink_with_sink_logits",
        |g, b, l| {
            let (t, sinks) = tensors(b, l, l, None);
            let opts = FwdOptions::new().causal(CausalAlign::BottomRight).sink_logits(sinks);
            flash_bwd(&g.stream, t, &BwdOptions::new(opts))
        },
        |e| matches!(e, Error::InvalidArgument(m) if m.contains("dsink")),
    );
    add(
        "lse_too_small",
        |g, b, l| {
            let short = g.stream.clone_htod(&vec![0.5f32; B * H * S - 1]).unwrap();
            // The short LSE must outlive the call: leak it (a test-only, 2 KB allocation).
            let short: &'static CudaSlice<f32> = Box::leak(Box::new(short));
            let (t, _) = tensors(b, l, l, Some(short));
            flash_bwd(&g.stream, t, &BwdOptions::new(FwdOptions::new()))
        },
        |e| matches!(e, Error::BufferTooSmall { tensor: "lse", .. }),
    );
    add(
        "misaligned_dq_head_stride",
        |g, b, l| {
            // A head stride of 60 elements (120 bytes): the fast kernels store 16-byte vectors.
            let dq_layout = Layout::contiguous(B, S, H, D).with_strides(S * H * D, H * D, 60);
            let (t, _) = tensors(b, l, dq_layout, None);
            flash_bwd(&g.stream, t, &BwdOptions::new(FwdOptions::new()))
        },
        |e| matches!(e, Error::Misaligned { tensor: "dq", .. }),
    );
}

pub fn tests(tests: &mut Vec<Test<Gpu>>) {
    for img in compiled_cells() {
        let cell = img.cell;
        if cell.family == Family::Reference || cell.direction != Direction::Bwd {
            continue;
        }
        match cell.dtype {
            DType::Bf16 => cell_tests::<half::bf16>(cell, img.ptx.is_some(), tests),
            DType::F16 => cell_tests::<half::f16>(cell, img.ptx.is_some(), tests),
            _ => {}
        }
    }
    error_tests(tests);
}
