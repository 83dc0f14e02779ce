//! Host-side TMA descriptors (`CUtensorMap`) of the sm90-family kernels (forward: q, k, v;
//! backward: q, k, v and dout, the last like q).
//!
//! Each of Q, K and V gets one rank-5 tiled tensor map over its `(row, head, batch)` view with
//! the head dim cut into swizzle panels, innermost first:
//!
//! | dim | extent | stride (bytes) | box |
//! | --- | --- | --- | --- |
//! | 0 | `PW` elements of one panel | contiguous | `PW` |
//! | 1 | rows: `seqlen_q` / `seqlen_k` (dense) or `total_q` / `total_k` (varlen) | `row_stride` | 64 (Q) or `block_n` (K, V) |
//! | 2 | `head_dim / PW` panels | `PW` elements | all panels |
//! | 3 | heads (`num_heads` for Q; `num_heads_k` for K, V) | `head_stride` | 1 |
//! | 4 | batch (dense), 1 (varlen: rows are global) | `batch_stride` | 1 |
//!
//! So one TMA box lands in shared memory as `[panel][row][PW]`, each `PW * 2`-byte line swizzled,
//! which is the layout `csrc/sm90/layout.cuh` builds its wgmma descriptors for:
//!
//! | head dim | swizzle | PW (elements) | panels |
//! | --- | --- | --- | --- |
//! | 64, 128, 192, 256 | 128 B | 64 | 1, 2, 3, 4 |
//! | 96 | 64 B | 32 | 3 |
//! | 80 | 32 B | 16 | 5 |
//!
//! The kernel addresses boxes with coordinates `(0, row, 0, head, batch)`. Out-of-range elements
//! are zero-filled. A dense tensor's row extent is its own sequence length, so a ragged last
//! tile reads nothing of another batch entry; in a varlen tensor the next sequence's rows are in
//! range, which the kernel masks. O is written with plain stores from registers
//! (`csrc/sm90/epilogue.cuh`), so it needs no tensor map and only the 16-byte alignment every
//! flash path checks.

use crate::cells::{DType, Tile};
use crate::error::Error;
use crate::params::{FLAG_VARLEN, FaParams};
use cudarc::driver::sys;

/// Shared-memory swizzle of a tensor map (and of the kernel's wgmma descriptors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Swizzle {
    /// 16-byte chunks swizzled within 32-byte lines.
    B32,
    /// Within 64-byte lines.
    B64,
    /// Within 128-byte lines.
    B128,
}

impl Swizzle {
    fn bytes(self) -> u32 {
        match self {
            Swizzle::B32 => 32,
            Swizzle::B64 => 64,
            Swizzle::B128 => 128,
        }
    }

    fn to_sys(self) -> sys::CUtensorMapSwizzle {
        match self {
            Swizzle::B32 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_32B,
            Swizzle::B64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
            Swizzle::B128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
        }
    }
}

/// Everything `cuTensorMapEncodeTiled` takes besides the data type (innermost dimension first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TmaGeometry {
    /// Global base address.
    pub address: u64,
    /// Extents, elements.
    pub dims: [u64; 5],
    /// Strides of dims 1..=4, bytes (dim 0 is contiguous).
    pub strides: [u64; 4],
    /// Box extents, elements.
    pub box_dims: [u32; 5],
    /// Shared-memory swizzle.
    pub swizzle: Swizzle,
}

/// Rows of the Q and O boxes: one consumer warpgroup's 64 query rows (`csrc/sm90/layout.cuh`).
pub(crate) const Q_BOX_ROWS: u32 = 64;

/// TMA limits (CUDA driver API, `cuTensorMapEncodeTiled`).
const MAX_DIM: u64 = 1 << 32;
const MAX_STRIDE: u64 = 1 << 40;

/// Swizzle of a head dim: the widest line (at most 128 bytes) that tiles a row.
pub(crate) fn head_dim_swizzle(head_dim: u32, elem_bytes: u32) -> Result<Swizzle, Error> {
    let row = head_dim * elem_bytes;
    match row {
        _ if row == 0 || row % 32 != 0 => Err(Error::InvalidArgument(format!(
            "sm90 tensor maps need head_dim * element size to be a positive multiple of 32 bytes, got {head_dim} x {elem_bytes}"
        ))),
        _ if row % 128 == 0 => Ok(Swizzle::B128),
        _ if row % 64 == 0 => Ok(Swizzle::B64),
        _ => Ok(Swizzle::B32),
    }
}

/// One tensor's view: base address and its (rows, heads, batch) extents and element strides.
#[derive(Clone, Copy, Debug)]
struct View {
    name: &'static str,
    address: u64,
    rows: u64,
    heads: u64,
    batch: u64,
    row_stride: i64,
    head_stride: i64,
    batch_stride: i64,
    box_rows: u32,
}

/// Stride of a dimension in bytes, as TMA takes it. A dimension of extent 1 is only ever
/// addressed at 0, so its stride is free: it is replaced by 16 when the given one is not
/// acceptable (e.g. the unused batch stride 0 of varlen tensors).
fn stride_bytes(name: &str, what: &str, stride: i64, extent: u64, elem_bytes: u32) -> Result<u64, Error> {
    let bytes = (stride as i128) * elem_bytes as i128;
    let valid = bytes > 0 && bytes % 16 == 0 && bytes < MAX_STRIDE as i128;
    if valid {
        return Ok(bytes as u64);
    }
    if extent <= 1 {
        return Ok(16);
    }
    Err(Error::InvalidArgument(format!(
        "{name}: the {what} stride ({stride} elements = {bytes} bytes) cannot be expressed by a TMA descriptor: \
         it must be positive, a multiple of 16 bytes and below 2^40 bytes"
    )))
}

fn geometry(view: View, head_dim: u32, elem_bytes: u32) -> Result<TmaGeometry, Error> {
    let swizzle = head_dim_swizzle(head_dim, elem_bytes)?;
    let panel = swizzle.bytes() / elem_bytes;
    let panels = head_dim / panel;
    if view.address % 16 != 0 {
        return Err(Error::InvalidArgument(format!(
            "{}: base address {:#x} is not 16-byte aligned (TMA needs 16)",
            view.name, view.address
        )));
    }
    // A zero extent is rejected by the driver; such a tensor is never addressed (no tile has rows
    // or keys), so it is described as one row.
    let rows = view.rows.max(1);
    let heads = view.heads.max(1);
    let batch = view.batch.max(1);
    for (what, extent) in [("rows", rows), ("heads", heads), ("batch", batch)] {
        if extent > MAX_DIM {
            return Err(Error::InvalidArgument(format!(
                "{}: {what} = {extent} exceeds the TMA limit of 2^32",
                view.name
            )));
        }
    }
    Ok(TmaGeometry {
        address: view.address,
        dims: [panel as u64, rows, panels as u64, heads, batch],
        strides: [
            stride_bytes(view.name, "row", view.row_stride, rows, elem_bytes)?,
            (panel * elem_bytes) as u64,
            stride_bytes(view.name, "head", view.head_stride, heads, elem_bytes)?,
            stride_bytes(view.name, "batch", view.batch_stride, batch, elem_bytes)?,
        ],
        box_dims: [panel, view.box_rows, panels, 1, 1],
        swizzle,
    })
}

/// The three geometries (q, k, v) of a forward launch. `total_k` is the number of K/V rows of
/// a varlen launch (`cu_seqlens_k[batch]`), which the params block does not carry.
pub(crate) fn fwd_geometries(
    p: &FaParams,
    dtype: DType,
    head_dim: u32,
    tile: &Tile,
    total_k: Option<u64>,
) -> Result<[TmaGeometry; 3], Error> {
    if !matches!(dtype, DType::F16 | DType::Bf16) {
        return Err(Error::InvalidArgument(format!(
            "the sm90 forward kernels take f16 or bf16, not {dtype:?}"
        )));
    }
    if p.head_dim != head_dim as i32 {
        return Err(Error::InvalidArgument(format!(
            "params head_dim {} differs from the kernel's {head_dim}",
            p.head_dim
        )));
    }
    if tile.block_n == 0 || tile.block_n > 256 {
        return Err(Error::InvalidArgument(format!(
            "tile block_n {} is not a TMA box extent (1..=256)",
            tile.block_n
        )));
    }
    let elem = dtype.size_in_bytes() as u32;
    let varlen = p.flags & FLAG_VARLEN != 0;
    let count = |x: i32| x.max(0) as u64;
    let (rows_q, rows_k, batch) = if varlen {
        let total_k = total_k.ok_or_else(|| {
            Error::InvalidArgument(
                "varlen sm90 launch: the K/V tensor maps need total_k (cu_seqlens_k[batch]), which FaParams does \
                 not carry; pass it to encode_fwd_tensor_maps"
                    .to_string(),
            )
        })?;
        (count(p.total_q), total_k, 1)
    } else {
        (count(p.seqlen_q), count(p.seqlen_k), count(p.batch))
    };
    let view = |name, ptr: *const std::ffi::c_void, rows, heads, strides: (i64, i64, i64), box_rows| View {
        name,
        address: ptr as u64,
        rows,
        heads,
        batch,
        row_stride: strides.1,
        head_stride: strides.2,
        batch_stride: if varlen { 0 } else { strides.0 },
        box_rows,
    };
    let hq = count(p.num_heads);
    let hk = count(p.num_heads_k);
    let bn = tile.block_n;
    Ok([
        geometry(
            view(
                "q",
                p.q,
                rows_q,
                hq,
                (p.q_batch_stride, p.q_row_stride, p.q_head_stride),
                Q_BOX_ROWS,
            ),
            head_dim,
            elem,
        )?,
        geometry(
            view(
                "k",
                p.k,
                rows_k,
                hk,
                (p.k_batch_stride, p.k_row_stride, p.k_head_stride),
                bn,
            ),
            head_dim,
            elem,
        )?,
        geometry(
            view(
                "v",
                p.v,
                rows_k,
                hk,
                (p.v_batch_stride, p.v_row_stride, p.v_head_stride),
                bn,
            ),
            head_dim,
            elem,
        )?,
    ])
}

fn encode(g: &TmaGeometry, dtype: DType) -> Result<sys::CUtensorMap, Error> {
    let data_type = match dtype {
        DType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        DType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        other => return Err(Error::InvalidArgument(format!("no TMA data type for {other:?} here"))),
    };
    let element_strides = [1u32; 5];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer refers to a live local array of the rank the call is given (5 dims,
    // 4 strides, 5 box extents, 5 element strides); `map` is a properly aligned (#[repr(align)])
    // CUtensorMap the driver writes. The global address is only recorded, not dereferenced.
    let result = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            5,
            g.address as *mut std::ffi::c_void,
            g.dims.as_ptr(),
            g.strides.as_ptr(),
            g.box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            g.swizzle.to_sys(),
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    match result {
        sys::CUresult::CUDA_SUCCESS => Ok(map),
        code => Err(Error::Driver {
            context: "encoding a TMA descriptor",
            source: cudarc::driver::DriverError(code),
        }),
    }
}

/// Tensor maps (q, k, v) of an sm90 forward launch; `total_k` is the row count of the packed
/// K and V tensors (`cu_seqlens_k[batch]`), used by varlen launches only.
pub(crate) fn encode_fwd_tensor_maps(
    p: &FaParams,
    dtype: DType,
    head_dim: u32,
    tile: &Tile,
    total_k: usize,
) -> Result<[sys::CUtensorMap; 3], Error> {
    encode_all(&fwd_geometries(p, dtype, head_dim, tile, Some(total_k as u64))?, dtype)
}

/// The four geometries (q, k, v, dout) of an sm90 backward launch: the forward's q, k, v (box
/// rows 64 and `tile.block_n`) and dout like q (its own strides, `p.dout`).
pub(crate) fn bwd_geometries(
    p: &FaParams,
    dtype: DType,
    head_dim: u32,
    tile: &Tile,
    total_k: Option<u64>,
) -> Result<[TmaGeometry; 4], Error> {
    let [q, k, v] = fwd_geometries(p, dtype, head_dim, tile, total_k)?;
    let varlen = p.flags & FLAG_VARLEN != 0;
    let dout = geometry(
        View {
            name: "dout",
            address: p.dout as u64,
            rows: q.dims[1],
            heads: q.dims[3],
            batch: q.dims[4],
            row_stride: p.do_row_stride,
            head_stride: p.do_head_stride,
            batch_stride: if varlen { 0 } else { p.do_batch_stride },
            box_rows: Q_BOX_ROWS,
        },
        head_dim,
        dtype.size_in_bytes() as u32,
    )?;
    Ok([q, k, v, dout])
}

/// Tensor maps (q, k, v, dout) of an sm90 backward launch; `total_k` as for the forward.
pub(crate) fn encode_bwd_tensor_maps(
    p: &FaParams,
    dtype: DType,
    head_dim: u32,
    tile: &Tile,
    total_k: usize,
) -> Result<[sys::CUtensorMap; 4], Error> {
    encode_all(&bwd_geometries(p, dtype, head_dim, tile, Some(total_k as u64))?, dtype)
}

fn encode_all<const N: usize>(g: &[TmaGeometry; N], dtype: DType) -> Result<[sys::CUtensorMap; N], Error> {
    let mut maps = [sys::CUtensorMap { opaque: [0; 16] }; N];
    for (map, geometry) in maps.iter_mut().zip(g) {
        *map = encode(geometry, dtype)?;
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TILE: Tile = Tile {
        block_m: 128,
        block_n: 176,
        warps: 12,
        stages: 2,
        lead: false,
    };

    /// Dense `(b, s, h, d)` contiguous params with distinct, 16-byte aligned base addresses.
    fn dense(b: i32, sq: i32, sk: i32, h: i32, hk: i32, d: i32) -> FaParams {
        let (d64, h64, hk64) = (d as i64, h as i64, hk as i64);
        FaParams {
            q: 0x1000_0000 as *const _,
            k: 0x2000_0000 as *const _,
            v: 0x3000_0000 as *const _,
            o: 0x4000_0000 as *mut _,
            q_batch_stride: sq as i64 * h64 * d64,
            q_row_stride: h64 * d64,
            q_head_stride: d64,
            k_batch_stride: sk as i64 * hk64 * d64,
            k_row_stride: hk64 * d64,
            k_head_stride: d64,
            v_batch_stride: sk as i64 * hk64 * d64,
            v_row_stride: hk64 * d64,
            v_head_stride: d64,
            o_batch_stride: sq as i64 * h64 * d64,
            o_row_stride: h64 * d64,
            o_head_stride: d64,
            batch: b,
            seqlen_q: sq,
            seqlen_k: sk,
            num_heads: h,
            num_heads_k: hk,
            head_dim: d,
            total_q: b * sq,
            ..FaParams::default()
        }
    }

    #[test]
    fn dense_bshd_hd128() {
        let p = dense(2, 1000, 777, 16, 4, 128);
        let [q, k, v] = fwd_geometries(&p, DType::Bf16, 128, &TILE, None).unwrap();
        assert_eq!(q.dims, [64, 1000, 2, 16, 2]);
        assert_eq!(q.strides, [16 * 128 * 2, 128, 128 * 2, 1000 * 16 * 128 * 2]);
        assert_eq!(q.box_dims, [64, 64, 2, 1, 1]);
        assert_eq!(q.swizzle, Swizzle::B128);
        assert_eq!(q.address, 0x1000_0000);
        assert_eq!(k.dims, [64, 777, 2, 4, 2]);
        assert_eq!(k.strides, [4 * 128 * 2, 128, 128 * 2, 777 * 4 * 128 * 2]);
        assert_eq!(k.box_dims, [64, 176, 2, 1, 1]);
        assert_eq!(v.dims, k.dims);
        assert_eq!(v.address, 0x3000_0000);
    }

    #[test]
    fn bwd_dout_map_has_its_own_strides() {
        // dout (b, s, h, d) with padded rows, q contiguous: dout's map takes dout's strides and
        // address, q's extents and box; q, k, v are the forward's maps.
        let mut p = dense(2, 1000, 777, 16, 4, 128);
        p.dout = 0x5000_0000 as *const _;
        p.do_row_stride = 16 * 128 + 64;
        p.do_head_stride = 128;
        p.do_batch_stride = 1000 * (16 * 128 + 64);
        let tile = Tile {
            block_m: 64,
            block_n: 128,
            warps: 8,
            stages: 3,
            lead: false,
        };
        let [q, k, v, dout] = bwd_geometries(&p, DType::Bf16, 128, &tile, None).unwrap();
        assert_eq!([q, k, v], fwd_geometries(&p, DType::Bf16, 128, &tile, None).unwrap());
        assert_eq!(k.box_dims, [64, 128, 2, 1, 1]);
        assert_eq!(dout.address, 0x5000_0000);
        assert_eq!(dout.dims, q.dims);
        assert_eq!(dout.box_dims, q.box_dims);
        assert_eq!(
            dout.strides,
            [(16 * 128 + 64) * 2, 128, 128 * 2, 1000 * (16 * 128 + 64) * 2]
        );
        // Varlen: the batch dimension has extent 1 and a placeholder stride.
        p.flags = FLAG_VARLEN;
        p.total_q = 1500;
        let [_, _, _, dout] = bwd_geometries(&p, DType::Bf16, 128, &tile, Some(2000)).unwrap();
        assert_eq!(dout.dims, [64, 1500, 2, 16, 1]);
        assert_eq!(dout.strides[3], 16);
        // A dout stride TMA cannot express is an error naming dout.
        p.do_row_stride = 16 * 128 + 4;
        match bwd_geometries(&p, DType::Bf16, 128, &tile, Some(2000)) {
            Err(Error::InvalidArgument(m)) => assert!(m.starts_with("dout"), "{m}"),
            other => panic!("expected an InvalidArgument for dout, got {other:?}"),
        }
    }

    #[test]
    fn dense_bhsd_strides() {
        // (b, h, s, d) storage expressed through strides.
        let mut p = dense(3, 256, 256, 8, 8, 64);
        p.q_row_stride = 64;
        p.q_head_stride = 256 * 64;
        p.q_batch_stride = 8 * 256 * 64;
        let [q, ..] = fwd_geometries(&p, DType::F16, 64, &TILE, None).unwrap();
        assert_eq!(q.dims, [64, 256, 1, 8, 3]);
        assert_eq!(q.strides, [128, 128, 256 * 64 * 2, 8 * 256 * 64 * 2]);
        assert_eq!(q.box_dims, [64, 64, 1, 1, 1]);
    }

    #[test]
    fn panels_per_head_dim() {
        for (d, swizzle, pw, panels) in [
            (64, Swizzle::B128, 64, 1),
            (80, Swizzle::B32, 16, 5),
            (96, Swizzle::B64, 32, 3),
            (128, Swizzle::B128, 64, 2),
            (192, Swizzle::B128, 64, 3),
            (256, Swizzle::B128, 64, 4),
        ] {
            let p = dense(1, 100, 100, 2, 2, d);
            let [q, k, ..] = fwd_geometries(&p, DType::Bf16, d as u32, &TILE, None).unwrap();
            assert_eq!(q.swizzle, swizzle, "d = {d}");
            assert_eq!(q.dims[0], pw, "d = {d}");
            assert_eq!(q.dims[2], panels, "d = {d}");
            assert_eq!(q.strides[1], pw * 2, "d = {d}");
            assert_eq!(q.box_dims, [pw as u32, 64, panels as u32, 1, 1], "d = {d}");
            assert_eq!(k.box_dims, [pw as u32, 176, panels as u32, 1, 1], "d = {d}");
            // The box's inner extent is exactly one swizzle line.
            assert_eq!(q.box_dims[0] * 2, swizzle.bytes());
        }
    }

    #[test]
    fn varlen_rows_are_global() {
        let mut p = dense(1, 0, 0, 4, 2, 128);
        p.flags = FLAG_VARLEN;
        p.batch = 3;
        p.seqlen_q = 70; // max over the batch: not an extent
        p.seqlen_k = 90;
        p.total_q = 150;
        p.q_row_stride = 4 * 128;
        p.o_row_stride = 4 * 128;
        p.k_row_stride = 2 * 128;
        p.v_row_stride = 2 * 128;
        p.q_batch_stride = 12345; // ignored for varlen
        let [q, k, v] = fwd_geometries(&p, DType::Bf16, 128, &TILE, Some(200)).unwrap();
        assert_eq!(q.dims, [64, 150, 2, 4, 1]);
        assert_eq!(k.dims, [64, 200, 2, 2, 1]);
        assert_eq!(v.dims, [64, 200, 2, 2, 1]);
        assert_eq!(
            q.strides[3], 16,
            "the batch dimension has extent 1: its stride is a placeholder"
        );
        assert!(matches!(
            fwd_geometries(&p, DType::Bf16, 128, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn rejects_what_tma_cannot_express() {
        let p = dense(2, 64, 64, 3, 3, 128);
        let mut bad = p;
        bad.q_row_stride = 3 * 128 + 4; // 8 bytes off a 16-byte multiple
        assert!(matches!(
            fwd_geometries(&bad, DType::Bf16, 128, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
        let mut bad = p;
        bad.k = 0x2000_0008 as *const _;
        assert!(matches!(
            fwd_geometries(&bad, DType::Bf16, 128, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
        let mut bad = p;
        bad.v_head_stride = -128;
        assert!(matches!(
            fwd_geometries(&bad, DType::Bf16, 128, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            fwd_geometries(&p, DType::F8E4m3, 128, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            fwd_geometries(&p, DType::Bf16, 64, &TILE, None),
            Err(Error::InvalidArgument(_))
        ));
        assert!(head_dim_swizzle(72, 2).is_err());
    }

    #[test]
    fn extent_one_dims_take_any_stride() {
        // One head and one batch entry: their strides are never used, even if unaligned.
        let mut p = dense(1, 33, 33, 1, 1, 256);
        p.q_head_stride = 3;
        p.q_batch_stride = 0;
        let [q, ..] = fwd_geometries(&p, DType::Bf16, 256, &TILE, None).unwrap();
        assert_eq!(q.dims, [64, 33, 4, 1, 1]);
        assert_eq!(q.strides, [256 * 2, 128, 16, 16]);
        // Empty tensors are described as one row (never addressed).
        let p = dense(1, 0, 0, 2, 2, 128);
        let [q, k, ..] = fwd_geometries(&p, DType::Bf16, 128, &TILE, None).unwrap();
        assert_eq!(q.dims[1], 1);
        assert_eq!(k.dims[1], 1);
    }
}
