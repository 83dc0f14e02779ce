//! Tests that need no GPU: key validation, stable hashes, dispatch lookups, the build manifest and
//! the no-driver path. CI (no GPU, no libcuda) runs all of these.

use flashattn_aot::*;

fn key(arch: SmArch, dtype: DType, head_dim: u32) -> DispatchKey {
    DispatchKey::new(arch, dtype, head_dim)
}

#[test]
fn head_dim_whitelist() {
    for d in HEAD_DIMS {
        key(SmArch::Sm80, DType::Bf16, d).validate_fwd().unwrap();
    }
    for d in [0, 32, 72, 100, 160, 224, 257, 512] {
        let e = key(SmArch::Sm80, DType::Bf16, d).validate_fwd().unwrap_err();
        assert!(
            matches!(e, Error::UnsupportedHeadDim { head_dim, .. } if head_dim == d),
            "{d}: {e}"
        );
    }
}

#[test]
fn fp8_only_on_sm90a_and_newer() {
    for dt in [DType::F8E4m3, DType::F8E5m2] {
        for arch in [SmArch::Sm80, SmArch::Sm89] {
            assert!(matches!(
                key(arch, dt, 128).validate_fwd(),
                Err(Error::UnsupportedDType { .. })
            ));
        }
        for arch in [SmArch::Sm90a, SmArch::Sm100] {
            key(arch, dt, 128).validate_fwd().unwrap();
        }
    }
}

#[test]
fn fp8_backward_refused() {
    for dt in [DType::F8E4m3, DType::F8E5m2] {
        let e = key(SmArch::Sm90a, dt, 128).validate_bwd().unwrap_err();
        assert!(
            matches!(
                e,
                Error::UnsupportedDType {
                    direction: Direction::Bwd,
                    ..
                }
            ),
            "{e}"
        );
    }
    key(SmArch::Sm90a, DType::Bf16, 128).validate_bwd().unwrap();
}

#[test]
fn sink_tokens_need_causal_or_window() {
    let mut k = key(SmArch::Sm80, DType::F16, 64);
    k.sink = 4;
    assert!(matches!(k.validate_fwd(), Err(Error::InvalidArgument(_))));
    k.causal = true;
    k.validate_fwd().unwrap();
    k.causal = false;
    k.sliding_window = Some(128);
    k.validate_fwd().unwrap();
}

#[test]
fn gqa_ratio_and_window_bounds() {
    let mut k = key(SmArch::Sm80, DType::F16, 64);
    k.gqa_ratio = 0;
    assert!(matches!(k.validate_fwd(), Err(Error::InvalidArgument(_))));
    k.gqa_ratio = 8;
    k.validate_fwd().unwrap();
    k.sliding_window = Some(0);
    assert!(matches!(k.validate_fwd(), Err(Error::InvalidArgument(_))));
    k.sliding_window = Some(1);
    k.validate_fwd().unwrap();
}

#[test]
fn paged_rules() {
    let mut k = key(SmArch::Sm90a, DType::Bf16, 128);
    assert!(matches!(k.validate_paged(), Err(Error::InvalidArgument(_))));
    k.paged = true;
    k.validate_paged().unwrap();
    assert!(matches!(k.validate_bwd(), Err(Error::InvalidArgument(_))));
}

#[test]
fn arch_from_compute_capability() {
    assert_eq!(SmArch::from_compute_capability(8, 0).unwrap(), SmArch::Sm80);
    assert_eq!(SmArch::from_compute_capability(8, 6).unwrap(), SmArch::Sm80);
    assert_eq!(SmArch::from_compute_capability(8, 9).unwrap(), SmArch::Sm89);
    assert_eq!(SmArch::from_compute_capability(9, 0).unwrap(), SmArch::Sm90a);
    assert_eq!(SmArch::from_compute_capability(10, 0).unwrap(), SmArch::Sm100);
    assert_eq!(SmArch::from_compute_capability(12, 0).unwrap(), SmArch::Sm100);
    assert!(matches!(
        SmArch::from_compute_capability(7, 5),
        Err(Error::UnsupportedDevice { major: 7, minor: 5, .. })
    ));
}

#[test]
fn dtype_facts() {
    assert_eq!(DType::F16.size_in_bytes(), 2);
    assert_eq!(DType::Bf16.size_in_bytes(), 2);
    assert_eq!(DType::F8E4m3.size_in_bytes(), 1);
    assert!(DType::F8E5m2.is_fp8() && !DType::Bf16.is_fp8());
    for d in DType::ALL {
        assert_eq!(DType::from_tag(d.tag()), Some(d));
    }
    assert_eq!(<Bf16 as GemmSupported>::DTYPE, DType::Bf16);
    assert_eq!(<half::f16 as AttnElement>::DTYPE, DType::F16);
}

/// Vectors computed independently (Python: FNV-1a 64 over the documented 24-byte encoding).
#[test]
fn stable_hash_vectors() {
    assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
    assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    let k1 = key(SmArch::Sm80, DType::Bf16, 128);
    assert_eq!(k1.stable_hash(), 0xdd44fcb85e1c970c);
    let mut k2 = key(SmArch::Sm90a, DType::Bf16, 128);
    k2.causal = true;
    k2.gqa_ratio = 4;
    assert_eq!(k2.stable_hash(), 0x1c6e4d1241a455a4);
    let k3 = DispatchKey {
        arch: SmArch::Sm89,
        dtype: DType::F16,
        head_dim: 64,
        causal: false,
        varlen: true,
        sliding_window: Some(256),
        alibi: true,
        sink: 4,
        paged: false,
        gqa_ratio: 8,
    };
    assert_eq!(k3.stable_hash(), 0x40fa95d4b5b250bb);
    let k4 = DispatchKey {
        arch: SmArch::Sm100,
        dtype: DType::F8E4m3,
        head_dim: 256,
        causal: true,
        varlen: true,
        sliding_window: Some(4096),
        alibi: false,
        sink: 16,
        paged: true,
        gqa_ratio: 32,
    };
    assert_eq!(k4.stable_hash(), 0xee67b1d1b1a8bd20);
    // Every field changes the hash.
    let base = key(SmArch::Sm80, DType::F16, 64);
    let variants = [
        DispatchKey {
            arch: SmArch::Sm89,
            ..base
        },
        DispatchKey {
            dtype: DType::Bf16,
            ..base
        },
        DispatchKey { head_dim: 80, ..base },
        DispatchKey { causal: true, ..base },
        DispatchKey { varlen: true, ..base },
        DispatchKey {
            sliding_window: Some(0),
            ..base
        },
        DispatchKey { alibi: true, ..base },
        DispatchKey { sink: 1, ..base },
        DispatchKey { paged: true, ..base },
        DispatchKey { gqa_ratio: 2, ..base },
    ];
    for v in variants {
        assert_ne!(v.stable_hash(), base.stable_hash(), "{v:?}");
    }
}

#[test]
fn kernel_name_describes_the_key() {
    let mut k = key(SmArch::Sm90a, DType::Bf16, 128);
    assert_eq!(k.kernel_name(), "flash_sm90a_bf16_hd128");
    k.causal = true;
    k.sliding_window = Some(64);
    k.sink = 4;
    k.gqa_ratio = 8;
    assert_eq!(k.kernel_name(), "flash_sm90a_bf16_hd128_causal_window64_sink4_gqa8");
}

#[test]
fn lookup_hits_every_compiled_fast_cell() {
    let mut fast = 0;
    for img in compiled_cells() {
        let cell = img.cell;
        if !cell.family.per_head_dim() || cell.direction != Direction::Fwd {
            continue;
        }
        fast += 1;
        for arch in [SmArch::Sm80, SmArch::Sm89, SmArch::Sm90a] {
            let sass = arch.sass_target(cell.family);
            let runnable = sass.is_some_and(|t| img.targets.contains(&t)) || img.ptx.is_some();
            if !arch.families().contains(&cell.family) || !runnable {
                continue;
            }
            let mut k = key(arch, cell.dtype, cell.head_dim);
            k.causal = true;
            k.gqa_ratio = 4;
            let r = DISPATCH_TABLE.lookup_family(&k, Direction::Fwd, cell.family).unwrap();
            assert_eq!(r.cell(), cell);
            assert_eq!(r.key(), cell.key());
            assert!(!r.image.kernels.is_empty());
            // The table's own choice serves the key from some compiled family.
            let any = lookup(&k).unwrap();
            assert_eq!(any.cell().dtype, cell.dtype);
            assert_eq!(any.cell().head_dim, cell.head_dim);
        }
    }
    if KERNELS_BUILT && BUILD_KNOBS.contains("FLASHATTN_AOT_FAMILIES=ref,sm80") {
        assert!(fast > 0, "a build with the sm80 family compiled no fast cell");
    }
}

#[test]
fn lookup_misses_are_typed() {
    // Paged KV: the sm80-family forward serves it (on sm_90 too, routed visibly from the sm90
    // family, which has no paged kernels); the backward takes no paged cache.
    for arch in [SmArch::Sm80, SmArch::Sm90a] {
        let mut k = key(arch, DType::Bf16, 128);
        k.paged = true;
        match lookup(&k) {
            Ok(r) => {
                assert_eq!(r.cell().family, Family::Sm80);
                assert!(!r.image.paged_kernels.is_empty());
                assert_eq!(r.routed_from.is_some(), arch == SmArch::Sm90a);
            }
            Err(e) => assert!(matches!(e, Error::CellNotCompiled { .. }), "{e}"),
        }
        assert!(matches!(DISPATCH_TABLE.lookup_bwd(&k), Err(Error::InvalidArgument(_))));
        assert!(matches!(
            DISPATCH_TABLE.lookup_family(&k, Direction::Fwd, Family::Sm90),
            Err(Error::NoKernel { .. })
        ));
    }
    // Invalid keys are rejected before any lookup.
    assert!(matches!(
        lookup(&key(SmArch::Sm80, DType::Bf16, 72)),
        Err(Error::UnsupportedHeadDim { .. })
    ));
    // fp8 has no sm80-family kernel.
    assert!(matches!(
        lookup(&key(SmArch::Sm90a, DType::F8E4m3, 128)),
        Err(Error::NoKernel { .. })
    ));
    // The backward: the sm90 family on sm_90a where these knobs compiled it (every head dim has
    // an sm90 backward cell in the whitelist), else the sm80 family (routed, and saying so, on
    // sm_90a).
    for d in HEAD_DIMS {
        assert!(
            whitelist()
                .iter()
                .any(|c| c.family == Family::Sm90 && c.direction == Direction::Bwd && c.head_dim == d),
            "d {d}"
        );
    }
    for (arch, d) in [
        (SmArch::Sm90a, 128),
        (SmArch::Sm90a, 64),
        (SmArch::Sm90a, 256),
        (SmArch::Sm90a, 192),
        (SmArch::Sm80, 128),
    ] {
        let k = key(arch, DType::Bf16, d);
        let sm90_cell = Cell {
            family: Family::Sm90,
            direction: Direction::Bwd,
            dtype: DType::Bf16,
            head_dim: d,
        };
        let sm90 = arch == SmArch::Sm90a && DISPATCH_TABLE.get(&sm90_cell).is_some();
        match DISPATCH_TABLE.lookup_bwd(&k) {
            Ok(r) => {
                assert_eq!(
                    r.cell().family,
                    if sm90 { Family::Sm90 } else { Family::Sm80 },
                    "{arch:?} d {d}"
                );
                assert_eq!(
                    r.routed_from.is_some(),
                    arch == SmArch::Sm90a && !sm90,
                    "{arch:?} d {d}"
                );
            }
            Err(e) => assert!(matches!(e, Error::CellNotCompiled { .. }), "{e}"),
        }
    }
}

#[test]
fn uncompiled_cell_names_the_knob() {
    // A head dim the knobs left out (when they leave one out) is a CellNotCompiled that names the
    // cell and the knob.
    let built: Vec<u32> = compiled_cells()
        .filter(|c| c.cell.family == Family::Sm80)
        .map(|c| c.cell.head_dim)
        .collect();
    for d in HEAD_DIMS {
        let k = key(SmArch::Sm80, DType::Bf16, d);
        match lookup(&k) {
            Ok(r) => assert!(built.contains(&d) && r.cell().head_dim == d),
            Err(Error::CellNotCompiled { cell, hint, .. }) => {
                assert!(!built.contains(&d));
                assert_eq!(cell, format!("sm80.fwd.bf16.hd{d}"));
                assert!(hint.contains("FLASHATTN_AOT_HEAD_DIMS"), "{hint}");
            }
            Err(e) => panic!("unexpected error for hd{d}: {e}"),
        }
    }
}

#[test]
fn strict_lookup_never_routes() {
    // On sm_90 the preferred family is sm90; until it has a cell, strict lookup refuses while
    // lookup routes to the sm80 family and says so.
    let k = key(SmArch::Sm90a, DType::Bf16, 128);
    if let Ok(r) = lookup(&k) {
        if r.cell().family == Family::Sm80 {
            assert_eq!(r.routed_from, Some(Family::Sm90));
            assert!(strict_lookup(&k).is_err());
        }
    }
    if let Ok(r) = strict_lookup(&k) {
        assert_eq!(r.routed_from, None);
        assert_eq!(r.cell().family, Family::Sm90);
    }
}

#[test]
fn paged_kernels_are_the_sm80_forward_tiles() {
    for img in compiled_cells() {
        let c = img.cell;
        if c.family == Family::Sm80 && c.direction == Direction::Fwd {
            assert_eq!(img.paged_kernels.len(), c.paged_tiles().len(), "{}", img.key);
            assert!(
                img.paged_kernels.iter().any(|k| k.smem_bytes <= 101_376),
                "{}: no paged tile fits sm_86/89",
                img.key
            );
            for (k, t) in img.paged_kernels.iter().zip(c.paged_tiles()) {
                assert_eq!(k.symbol, c.paged_symbol(&t));
                assert!(k.symbol.ends_with("_paged"));
                assert_eq!(k.tile, t);
                assert_eq!(k.smem_bytes, c.smem_bytes(&t));
            }
        } else {
            assert!(img.paged_kernels.is_empty(), "{}", img.key);
        }
    }
}

#[test]
fn manifest_lists_every_compiled_kernel() {
    let lines: Vec<&str> = MANIFEST_TSV.lines().collect();
    assert_eq!(
        lines[0],
        "cell\tsymbol\ttile\tsmem_bytes\ttargets\tfatbin_bytes\tptx_bytes"
    );
    let symbols: usize = compiled_cells()
        .map(|c| c.kernels.len() + c.paged_kernels.len() + c.split_kernels.len())
        .sum();
    assert_eq!(lines.len() - 1, symbols);
    for img in compiled_cells() {
        assert!(!img.fatbin.is_empty(), "{} has an empty fatbin", img.key);
        assert_eq!(
            img.fatbin.as_ptr() as usize % 64,
            0,
            "{} image is not 64-byte aligned",
            img.key
        );
        for k in img.kernels.iter().chain(img.paged_kernels).chain(img.split_kernels) {
            let line = lines.iter().find(|l| l.split('\t').nth(1) == Some(k.symbol));
            let line = line.unwrap_or_else(|| panic!("{} missing from the manifest", k.symbol));
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols[0], img.key);
            assert_eq!(cols[3].parse::<u32>().unwrap(), k.smem_bytes);
            assert_eq!(cols[5].parse::<usize>().unwrap(), img.fatbin.len());
        }
        assert_eq!(DISPATCH_TABLE.get(&img.cell).unwrap().1.key, img.key);
    }
    assert_eq!(DISPATCH_TABLE.len(), compiled_cells().count());
    assert_eq!(DISPATCH_TABLE.is_empty(), compiled_cells().next().is_none());
}

#[test]
fn whitelist_is_consistent() {
    let cells = whitelist();
    for c in &cells {
        if !c.family.per_head_dim() {
            continue;
        }
        assert!(HEAD_DIMS.contains(&c.head_dim));
        let tiles = c.tiles();
        assert!(!tiles.is_empty(), "{c} has no tile");
        // A 99 KB (sm_86/89) variant exists for every sm80-family cell.
        if c.family == Family::Sm80 {
            assert!(
                tiles.iter().any(|t| c.smem_bytes(t) <= 99 * 1024),
                "{c} has no tile within 99 KB"
            );
        }
        assert!(
            tiles.iter().all(|t| c.smem_bytes(t) <= 227 * 1024),
            "{c} has a tile over 227 KB"
        );
        let symbols: std::collections::HashSet<String> = tiles.iter().map(|t| c.symbol(t)).collect();
        assert_eq!(symbols.len(), tiles.len(), "{c} has duplicate symbols");
    }
    let keys: std::collections::HashSet<String> = cells.iter().map(|c| c.key()).collect();
    assert_eq!(keys.len(), cells.len());
}

#[test]
fn no_driver_is_a_typed_error() {
    if driver_present() {
        // With a driver the same calls succeed or fail with a driver error, never NoDriver.
        assert!(!matches!(device_count(), Err(Error::NoDriver)));
    } else {
        assert!(matches!(device_count(), Err(Error::NoDriver)));
        assert!(matches!(open_device(0), Err(Error::NoDriver)));
        // No backward ran, so there is no pool to trim.
        assert!(flashattn_aot::release_workspace_memory().is_ok());
    }
}

#[test]
fn merge_cells_are_whitelisted() {
    // One generic state-merge kernel per 16-bit dtype, with sm_80 / sm_90 SASS and PTX.
    for dtype in [DType::F16, DType::Bf16] {
        let c = whitelist()
            .into_iter()
            .find(|c| c.family == Family::Merge && c.dtype == dtype)
            .expect("a merge cell per 16-bit dtype");
        assert_eq!(c.key(), format!("merge.fwd.{}", dtype.tag()));
        assert_eq!(c.tiles().len(), 1);
        assert_eq!(c.symbol(&c.tiles()[0]), format!("fa_merge_{}", dtype.tag()));
        assert!(c.has_ptx());
    }
    assert!(
        !whitelist()
            .iter()
            .any(|c| c.family == Family::Merge && c.dtype.is_fp8())
    );
}
