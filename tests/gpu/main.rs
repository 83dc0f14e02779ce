//! GPU tests. They run wherever a CUDA device is present and are reported as ignored (never as
//! passed) where none is (see harness.rs). Every output buffer is poisoned with NaN before a run.
//!
//! - `reference::*`: the GPU reference kernel against the f64 CPU reference, every semantic option.
//! - `fwd::*`: the fast forward kernels of every compiled cell against the CPU reference (small,
//!   ragged shapes, every semantic option) and the GPU reference (large shapes), with the 99 KB
//!   tiles and the compute_80 PTX image forced on this device too.
//! - `errors::*`: bad input returns its typed error and writes nothing.
//! - `merge::*`: `merge_states` against an f64 host merge and as split-KV attention.

mod bwd;
mod errors;
mod harness;
mod merge;
mod paged;
mod support;

use flashattn_aot::{CausalAlign, Cell, DType, Direction, Family, KernelOverride, Mask, compiled_cells};
use harness::Test;
use support::{
    AlibiKind, Case, Gpu, HostElem, Storage, Which, WhichBwd, check_bwd_vs_cpu, check_vs_cpu, check_vs_gpu_reference,
};

/// The semantic options every kernel must implement, applied to a base case.
fn semantic_variants(base: &Case) -> Vec<(&'static str, Case)> {
    let c = |f: &dyn Fn(&mut Case)| {
        let mut x = base.clone();
        f(&mut x);
        x
    };
    vec![
        ("plain", base.clone()),
        (
            "causal_bottom_right",
            c(&|x| x.mask = Mask::Causal(CausalAlign::BottomRight)),
        ),
        ("causal_top_left", c(&|x| x.mask = Mask::Causal(CausalAlign::TopLeft))),
        (
            "window_16_8",
            c(&|x| {
                x.mask = Mask::Window {
                    left: Some(16),
                    right: Some(8),
                    align: CausalAlign::BottomRight,
                }
            }),
        ),
        (
            "window_left_only_top_left",
            c(&|x| {
                x.mask = Mask::Window {
                    left: Some(40),
                    right: None,
                    align: CausalAlign::TopLeft,
                }
            }),
        ),
        (
            "window_right_only",
            c(&|x| {
                x.mask = Mask::Window {
                    left: None,
                    right: Some(3),
                    align: CausalAlign::BottomRight,
                }
            }),
        ),
        (
            "sink_tokens_window",
            c(&|x| {
                x.mask = Mask::Window {
                    left: Some(20),
                    right: Some(0),
                    align: CausalAlign::BottomRight,
                };
                x.sink_tokens = 5;
            }),
        ),
        (
            "sink_tokens_wide",
            c(&|x| {
                x.mask = Mask::Window {
                    left: Some(7),
                    right: Some(0),
                    align: CausalAlign::TopLeft,
                };
                x.sink_tokens = 70;
            }),
        ),
        (
            "sink_logits_causal",
            c(&|x| {
                x.mask = Mask::Causal(CausalAlign::BottomRight);
                x.sink_logits = true;
            }),
        ),
        ("alibi_per_head", c(&|x| x.alibi = AlibiKind::PerHead)),
        (
            "alibi_per_batch_causal",
            c(&|x| {
                x.alibi = AlibiKind::PerBatchHead;
                x.mask = Mask::Causal(CausalAlign::BottomRight);
            }),
        ),
        ("softcap", c(&|x| x.softcap = Some(5.0))),
        (
            "softcap_alibi_window",
            c(&|x| {
                x.softcap = Some(2.0);
                x.alibi = AlibiKind::PerHead;
                x.mask = Mask::Window {
                    left: Some(32),
                    right: Some(32),
                    align: CausalAlign::BottomRight,
                };
            }),
        ),
        ("scale", c(&|x| x.scale = Some(0.3))),
        ("mha", c(&|x| x.heads_k = x.heads)),
        ("mqa", c(&|x| x.heads_k = 1)),
        (
            "gqa4",
            c(&|x| {
                x.heads = 8;
                x.heads_k = 2;
            }),
        ),
        ("heads_major", c(&|x| x.storage = Storage::HeadsMajor)),
        ("padded_strides", c(&|x| x.storage = Storage::Padded)),
        ("no_lse", c(&|x| x.with_lse = false)),
        (
            "varlen_causal",
            c(&|x| {
                let (sq, sk) = (x.seqlen_q, x.seqlen_k);
                x.varlen = Some((vec![sq / 3 + 1, 0, sq, 17], vec![sk / 2 + 3, 9, sk, 17]));
                x.mask = Mask::Causal(CausalAlign::BottomRight);
            }),
        ),
        (
            "varlen_seqused_window",
            c(&|x| {
                let (sq, sk) = (x.seqlen_q, x.seqlen_k);
                x.varlen = Some((vec![sq, 5, 1], vec![sk + 10, 40, 8]));
                x.seqused_k = Some(vec![sk, 33, 0]);
                x.mask = Mask::Window {
                    left: Some(24),
                    right: Some(0),
                    align: CausalAlign::TopLeft,
                };
                x.sink_tokens = 2;
            }),
        ),
    ]
}

fn reference_tests<T: HostElem>(dtype: &str, tests: &mut Vec<Test<Gpu>>) {
    for (name, case) in semantic_variants(&Case::new(113, 203, 64)) {
        tests.push(Test::new(format!("reference::{dtype}::{name}"), move |g| {
            check_vs_cpu::<T>(g, &case, Which::Reference).map(|_| ())
        }));
    }
    let shapes = [
        (1, 1, 64),
        (239, 1, 80),
        (113, 203, 40),
        (64, 257, 256),
        (1023, 1024, 128),
    ];
    for (sq, sk, d) in shapes {
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
            let name = format!(
                "reference::{dtype}::shape_{sq}x{sk}_d{d}{}",
                if causal { "_causal" } else { "" }
            );
            tests.push(Test::new(name, move |g| {
                check_vs_cpu::<T>(g, &case, Which::Reference).map(|_| ())
            }));
        }
    }
    // The reference backward against the CPU f64 backward (dense variants).
    for (name, case) in semantic_variants(&Case::new(113, 203, 64)) {
        if case.varlen.is_some() {
            continue;
        }
        tests.push(Test::new(format!("reference_bwd::{dtype}::{name}"), move |g| {
            check_bwd_vs_cpu::<T>(g, &case, WhichBwd::Reference)
        }));
    }
    for (sq, sk, d) in [(1, 1, 64), (239, 1, 80), (64, 257, 256), (300, 300, 128)] {
        let mut case = Case::new(sq, sk, d);
        case.mask = Mask::Causal(CausalAlign::BottomRight);
        tests.push(Test::new(
            format!("reference_bwd::{dtype}::shape_{sq}x{sk}_d{d}_causal"),
            move |g| check_bwd_vs_cpu::<T>(g, &case, WhichBwd::Reference),
        ));
    }
}

/// The path of `family` forced on this device (the sm80 family is not the H100's default).
fn forced(family: Family) -> Which {
    Which::Flash(KernelOverride {
        family: Some(family),
        ..Default::default()
    })
}

fn expect_cell(info: &flashattn_aot::FwdInfo, cell: &Cell) -> Result<(), String> {
    if info.cell != cell.key() {
        return Err(format!("expected cell {} but {} ran", cell.key(), info.cell));
    }
    Ok(())
}

fn fwd_cell_tests<T: HostElem>(cell: Cell, has_ptx: bool, tests: &mut Vec<Test<Gpu>>) {
    let d = cell.head_dim as usize;
    let key = cell.key();
    let fam = cell.family;
    // Every semantic option, small ragged shape, against the CPU reference.
    for (name, case) in semantic_variants(&Case::new(113, 203, d)) {
        tests.push(Test::new(format!("fwd::{key}::{name}"), move |g| {
            let info = check_vs_cpu::<T>(g, &case, forced(fam))?;
            expect_cell(&info, &cell)
        }));
    }
    // Stored but unused key rows (past seqused_k) holding NaN: no output may see them.
    let mut nan_tail = Case::new(113, 203, d);
    nan_tail.varlen = Some((vec![113, 70, 5], vec![213, 140, 8]));
    nan_tail.seqused_k = Some(vec![203, 77, 0]);
    nan_tail.mask = Mask::Causal(CausalAlign::BottomRight);
    nan_tail.nan_unused_kv = true;
    tests.push(Test::new(format!("fwd::{key}::varlen_seqused_nan_tail"), move |g| {
        check_vs_cpu::<T>(g, &nan_tail, forced(fam)).map(|_| ())
    }));
    // Ragged shapes.
    for (sq, sk) in [(1, 1), (239, 1), (1, 239), (1023, 1024), (128, 128)] {
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
            let name = format!("fwd::{key}::shape_{sq}x{sk}{}", if causal { "_causal" } else { "" });
            tests.push(Test::new(name, move |g| {
                check_vs_cpu::<T>(g, &case, forced(fam)).map(|_| ())
            }));
        }
    }
    // The smallest-smem tile (what sm_86/sm_89 run), forced on this device.
    if fam == Family::Sm80 {
        tests.push(Test::new(format!("fwd::{key}::tile_99kb"), move |g| {
            let mut case = Case::new(113, 203, d);
            case.mask = Mask::Causal(CausalAlign::BottomRight);
            let which = Which::Flash(KernelOverride {
                family: Some(Family::Sm80),
                smem_limit: Some(99 * 1024),
                ..Default::default()
            });
            let info = check_vs_cpu::<T>(g, &case, which)?;
            let image = flashattn_aot::DISPATCH_TABLE.get(&cell).unwrap().1;
            let entry = image.kernels.iter().find(|k| k.symbol == info.symbol).unwrap();
            if entry.smem_bytes > 99 * 1024 {
                return Err(format!("{} uses {} bytes", info.symbol, entry.smem_bytes));
            }
            Ok(())
        }));
    }
    // Every tile variant, forced: the default one depends on the sequence length and mask
    // (`sm90_fwd_variant`, `sm80_fwd_variant`), so the shapes above do not reach them all.
    if fam == Family::Sm90 || fam == Family::Sm80 {
        let variants = flashattn_aot::DISPATCH_TABLE
            .get(&cell)
            .map_or(0, |(_, image)| image.kernels.len());
        for variant in 0..variants {
            let which = Which::Flash(KernelOverride {
                family: Some(fam),
                variant: Some(variant),
                ..Default::default()
            });
            let mut ragged = Case::new(113, 203, d);
            ragged.mask = Mask::Causal(CausalAlign::BottomRight);
            tests.push(Test::new(format!("fwd::{key}::variant{variant}_causal"), move |g| {
                check_vs_cpu::<T>(g, &ragged, which).map(|_| ())
            }));
            for causal in [false, true] {
                let mut case = Case::new(3000, 3000, d);
                case.batch = 2;
                case.heads = 3;
                case.heads_k = 3;
                if causal {
                    case.mask = Mask::Causal(CausalAlign::BottomRight);
                }
                let name = format!(
                    "fwd::{key}::variant{variant}_large{}",
                    if causal { "_causal" } else { "" }
                );
                tests.push(Test::new(name, move |g| {
                    check_vs_gpu_reference::<T>(g, &case, which, 3.0).map(|_| ())
                }));
            }
        }
    }
    // The compute_80 PTX image through the driver JIT (what sm_100/sm_120 run).
    if has_ptx {
        tests.push(Test::new(format!("fwd::{key}::ptx_jit"), move |g| {
            let mut case = Case::new(113, 203, d);
            case.mask = Mask::Window {
                left: Some(30),
                right: Some(0),
                align: CausalAlign::BottomRight,
            };
            let which = Which::Flash(KernelOverride {
                family: Some(Family::Sm80),
                force_ptx: true,
                ..Default::default()
            });
            let info = check_vs_cpu::<T>(g, &case, which)?;
            if !info.jit_ptx {
                return Err("the PTX image was not used".into());
            }
            Ok(())
        }));
    }
    // Large shapes against the GPU reference: every semantic option at seqlen 4224.
    let mut large = Case::new(4224, 4224, d);
    large.batch = 1;
    large.heads = 2;
    large.heads_k = 1;
    for (name, case) in semantic_variants(&large) {
        if name.starts_with("varlen") {
            continue;
        }
        tests.push(Test::new(format!("fwd::{key}::large_{name}"), move |g| {
            check_vs_gpu_reference::<T>(g, &case, forced(fam), 3.0).map(|_| ())
        }));
    }
    let mut big_varlen = large.clone();
    big_varlen.varlen = Some((vec![4224, 1000, 3000], vec![4224, 3000, 1000]));
    big_varlen.mask = Mask::Causal(CausalAlign::BottomRight);
    tests.push(Test::new(format!("fwd::{key}::large_varlen_causal"), move |g| {
        check_vs_gpu_reference::<T>(g, &big_varlen, forced(fam), 3.0).map(|_| ())
    }));
    // Decode steps (one query per sequence): with GQA and a mask that hides nothing the heads run
    // as query rows (`swap_decode_groups`); with ALiBi, a window or top-left alignment they do not.
    let decode = |h: usize, hk: usize, mask: Mask, alibi: bool| {
        let mut case = Case::new(1, 777, d);
        case.batch = 3;
        case.heads = h;
        case.heads_k = hk;
        case.mask = mask;
        if alibi {
            case.alibi = AlibiKind::PerHead;
        }
        case
    };
    let br = CausalAlign::BottomRight;
    let decodes = [
        ("gqa4_causal", decode(8, 2, Mask::Causal(br), false)),
        ("mqa_nomask", decode(6, 1, Mask::None, false)),
        ("gqa2_causal_heads_major", {
            let mut c = decode(4, 2, Mask::Causal(br), false);
            c.storage = Storage::HeadsMajor;
            c
        }),
        ("gqa4_causal_alibi", decode(8, 2, Mask::Causal(br), true)),
        (
            "gqa4_window",
            decode(
                8,
                2,
                Mask::Window {
                    left: Some(100),
                    right: Some(0),
                    align: br,
                },
                false,
            ),
        ),
        (
            "gqa4_causal_top_left",
            decode(8, 2, Mask::Causal(CausalAlign::TopLeft), false),
        ),
    ];
    for (name, case) in decodes {
        tests.push(Test::new(format!("fwd::{key}::decode_{name}"), move |g| {
            check_vs_cpu::<T>(g, &case, forced(fam)).map(|_| ())
        }));
    }
    split_tests::<T>(cell, tests);
    for (h, hk) in [(8, 8), (8, 2), (16, 2), (8, 1)] {
        let mut case = Case::new(2048, 2048, d);
        case.batch = 2;
        case.heads = h;
        case.heads_k = hk;
        tests.push(Test::new(format!("fwd::{key}::gqa_{h}_{hk}"), move |g| {
            check_vs_gpu_reference::<T>(g, &case, forced(fam), 3.0).map(|_| ())
        }));
    }
}

/// Split-KV (`FwdOptions::num_splits`), on the cell's family: every dense semantic option split
/// into 3 parts, more parts than key blocks (empty parts), the heuristic on decode steps (it must
/// split them), and a long decode against the GPU reference.
fn split_tests<T: HostElem>(cell: Cell, tests: &mut Vec<Test<Gpu>>) {
    let d = cell.head_dim as usize;
    let key = cell.key();
    let fam = cell.family;
    let expect_split = move |info: &flashattn_aot::FwdInfo, n: Option<usize>| -> Result<(), String> {
        let ok = match n {
            Some(n) => info.num_splits == n,
            None => info.num_splits > 1,
        };
        if !ok || info.cell != cell.key() {
            return Err(format!(
                "{} ran with {} parts (wanted {n:?})",
                info.symbol, info.num_splits
            ));
        }
        // The sm90 family splits in its `_split` kernel.
        if (fam == Family::Sm90) != info.symbol.ends_with("_split") {
            return Err(format!("{} ran a split call", info.symbol));
        }
        Ok(())
    };
    for (name, case) in semantic_variants(&Case::new(37, 700, d)) {
        if case.varlen.is_some() {
            continue;
        }
        let mut case = case;
        case.num_splits = 3;
        tests.push(Test::new(format!("fwd::{key}::split3_{name}"), move |g| {
            let info = check_vs_cpu::<T>(g, &case, forced(fam))?;
            expect_split(&info, Some(3))
        }));
    }
    let mut empty_parts = Case::new(5, 130, d);
    empty_parts.mask = Mask::Causal(CausalAlign::BottomRight);
    empty_parts.sink_logits = true;
    empty_parts.num_splits = 128;
    tests.push(Test::new(format!("fwd::{key}::split128_empty_parts"), move |g| {
        let info = check_vs_cpu::<T>(g, &empty_parts, forced(fam))?;
        expect_split(&info, Some(128))
    }));
    for (name, h, hk, mask) in [
        ("gqa4_causal", 8, 2, Mask::Causal(CausalAlign::BottomRight)),
        (
            "mha_window_sinks",
            4,
            4,
            Mask::Window {
                left: Some(300),
                right: Some(0),
                align: CausalAlign::BottomRight,
            },
        ),
    ] {
        let mut case = Case::new(1, 1500, d);
        case.batch = 2;
        case.heads = h;
        case.heads_k = hk;
        case.mask = mask;
        case.sink_tokens = if hk == h { 4 } else { 0 };
        case.sink_logits = hk == h;
        case.num_splits = 0;
        tests.push(Test::new(format!("fwd::{key}::split_auto_decode_{name}"), move |g| {
            let info = check_vs_cpu::<T>(g, &case, forced(fam))?;
            expect_split(&info, None)
        }));
    }
    let mut long = Case::new(1, 32768, d);
    long.batch = 1;
    long.heads = 8;
    long.heads_k = 2;
    long.mask = Mask::Causal(CausalAlign::BottomRight);
    long.num_splits = 0;
    tests.push(Test::new(format!("fwd::{key}::split_auto_decode_32k"), move |g| {
        let info = check_vs_gpu_reference::<T>(g, &long, forced(fam), 3.0)?;
        expect_split(&info, None)
    }));
}

fn main() {
    let mut tests: Vec<Test<Gpu>> = Vec::new();
    reference_tests::<half::bf16>("bf16", &mut tests);
    reference_tests::<half::f16>("f16", &mut tests);
    for img in compiled_cells() {
        let cell = img.cell;
        if !cell.family.per_head_dim() || cell.direction != Direction::Fwd {
            continue;
        }
        match cell.dtype {
            DType::Bf16 => fwd_cell_tests::<half::bf16>(cell, img.ptx.is_some(), &mut tests),
            DType::F16 => fwd_cell_tests::<half::f16>(cell, img.ptx.is_some(), &mut tests),
            _ => {}
        }
    }
    errors::tests(&mut tests);
    bwd::tests(&mut tests);
    merge::tests(&mut tests);
    paged::tests(&mut tests);
    harness::run(tests, support::setup);
}
