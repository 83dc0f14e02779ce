//! The cell whitelist: the one table that says which kernels exist, how they are tiled, what
//! their symbols are called and how much shared memory they take.
//!
//! This file is compiled twice: by `build.rs` (through `#[path = "src/cells.rs"]`), which compiles
//! exactly these cells with nvcc, and by the library, which canonicalises a request to one of these
//! cells and launches it. It therefore uses `std` only. Changing a tile here changes both the
//! `-D` defines nvcc sees and the launch geometry, and the kernels `static_assert` that the shared
//! memory size they compute equals the one computed here, so the two sides cannot drift apart.
//!
//! A *cell* is what changes a kernel's loop, tile or register shape: family, direction, dtype and
//! head dim. Everything else (sizes, window bounds, sink counts, GQA ratios, scales, softcap,
//! slopes, strides) is a field of the params block (`csrc/common/params.h`).

use std::fmt;

/// Element type of Q, K, V (and of O, dO, dQ, dK, dV for 16-bit types).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// fp8 e4m3 (forward only, sm90 family).
    F8E4m3,
    /// fp8 e5m2 (forward only, sm90 family).
    F8E5m2,
}

impl DType {
    /// Every dtype, in key order.
    pub const ALL: [DType; 4] = [DType::F16, DType::Bf16, DType::F8E4m3, DType::F8E5m2];

    /// Bytes per element.
    pub const fn size_in_bytes(self) -> usize {
        match self {
            DType::F16 | DType::Bf16 => 2,
            DType::F8E4m3 | DType::F8E5m2 => 1,
        }
    }

    /// Whether this is one of the fp8 types.
    pub const fn is_fp8(self) -> bool {
        matches!(self, DType::F8E4m3 | DType::F8E5m2)
    }

    /// Short lowercase tag used in cell keys, kernel symbols and build knobs.
    pub const fn tag(self) -> &'static str {
        match self {
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
            DType::F8E4m3 => "e4m3",
            DType::F8E5m2 => "e5m2",
        }
    }

    /// The CUDA C++ type name the kernels are instantiated with.
    pub const fn cuda_type(self) -> &'static str {
        match self {
            DType::F16 => "__half",
            DType::Bf16 => "__nv_bfloat16",
            DType::F8E4m3 => "__nv_fp8_e4m3",
            DType::F8E5m2 => "__nv_fp8_e5m2",
        }
    }

    /// Parses a tag as written by [`DType::tag`].
    pub fn from_tag(tag: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.tag() == tag)
    }
}

/// Head dims with compiled fast kernels.
pub const HEAD_DIMS: [u32; 6] = [64, 80, 96, 128, 192, 256];

/// Kernel family: a set of kernels written for one instruction set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// The naive GPU reference (fp32 accumulation, one query row per thread block). Any head dim
    /// up to 256 at run time; it is the oracle for the fast kernels, not a fast path.
    Reference,
    /// FlashAttention-2 class: mma.sync, ldmatrix, cp.async. sm_80 and sm_90 SASS (+ compute_80 PTX).
    Sm80,
    /// FlashAttention-3 class: TMA, wgmma, warp specialisation. sm_90a SASS.
    Sm90,
}

impl Family {
    /// Tag used in cell keys, symbols and the `FLASHATTN_AOT_FAMILIES` knob.
    pub const fn tag(self) -> &'static str {
        match self {
            Family::Reference => "ref",
            Family::Sm80 => "sm80",
            Family::Sm90 => "sm90",
        }
    }
}

/// Forward or backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Forward: O and LSE.
    Fwd,
    /// Backward: dQ, dK, dV (and dsink).
    Bwd,
}

impl Direction {
    /// Tag used in cell keys, symbols and the `FLASHATTN_AOT_DIRECTIONS` knob.
    pub const fn tag(self) -> &'static str {
        match self {
            Direction::Fwd => "fwd",
            Direction::Bwd => "bwd",
        }
    }
}

/// One compiled unit: everything that changes a kernel's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    /// Kernel family.
    pub family: Family,
    /// Forward or backward.
    pub direction: Direction,
    /// Element type.
    pub dtype: DType,
    /// Head dim; 0 for the reference family (head dim is a run-time size there).
    pub head_dim: u32,
}

impl Cell {
    /// The cell's key in the dispatch map, e.g. `sm80.fwd.bf16.hd128` or `ref.fwd.f16`.
    pub fn key(&self) -> String {
        if self.family == Family::Reference {
            format!("{}.{}.{}", self.family.tag(), self.direction.tag(), self.dtype.tag())
        } else {
            format!(
                "{}.{}.{}.hd{}",
                self.family.tag(),
                self.direction.tag(),
                self.dtype.tag(),
                self.head_dim
            )
        }
    }

    /// The CUDA source (relative to `csrc/`) that holds this cell's kernel templates.
    pub const fn source(&self) -> &'static str {
        match (self.family, self.direction) {
            (Family::Reference, Direction::Fwd) => "reference/fwd.cuh",
            (Family::Reference, Direction::Bwd) => "reference/bwd.cuh",
            (Family::Sm80, Direction::Fwd) => "sm80/fwd.cuh",
            (Family::Sm80, Direction::Bwd) => "sm80/bwd.cuh",
            (Family::Sm90, Direction::Fwd) => "sm90/fwd.cuh",
            (Family::Sm90, Direction::Bwd) => "sm90/bwd.cuh",
        }
    }

    /// The macro in [`Cell::source`] that defines one kernel of this cell.
    pub const fn instantiate_macro(&self) -> &'static str {
        match (self.family, self.direction) {
            (Family::Reference, Direction::Fwd) => "FA_REFERENCE_FWD_KERNELS",
            (Family::Reference, Direction::Bwd) => "FA_REFERENCE_BWD_KERNELS",
            (Family::Sm80, Direction::Fwd) => "FA_SM80_FWD_KERNEL",
            (Family::Sm80, Direction::Bwd) => "FA_SM80_BWD_KERNEL",
            (Family::Sm90, Direction::Fwd) => "FA_SM90_FWD_KERNEL",
            (Family::Sm90, Direction::Bwd) => "FA_SM90_BWD_KERNEL",
        }
    }

    /// The tile variants compiled for this cell, most preferred first. The run time picks the
    /// first one whose shared memory fits the device (see [`Tile::smem_bytes`]).
    pub fn tiles(&self) -> Vec<Tile> {
        match (self.family, self.direction) {
            (Family::Reference, _) => vec![Tile::REFERENCE],
            (Family::Sm80, Direction::Fwd) => sm80_fwd_tiles(self.head_dim).to_vec(),
            (Family::Sm80, Direction::Bwd) => Vec::new(),
            (Family::Sm90, Direction::Fwd) => sm90_fwd_tiles(self.head_dim).to_vec(),
            (Family::Sm90, Direction::Bwd) => Vec::new(),
        }
    }

    /// The kernel symbol of one tile variant of this cell.
    pub fn symbol(&self, tile: &Tile) -> String {
        if self.family == Family::Reference {
            // The reference module holds several entry points; `tile` names none of them.
            return format!("fa_ref_{}_{}", self.direction.tag(), self.dtype.tag());
        }
        format!(
            "fa_{}_{}_{}_hd{}_m{}n{}w{}s{}",
            self.family.tag(),
            self.direction.tag(),
            self.dtype.tag(),
            self.head_dim,
            tile.block_m,
            tile.block_n,
            tile.warps,
            tile.stages
        )
    }

    /// Shared memory (bytes, dynamic) of one tile variant.
    pub fn smem_bytes(&self, tile: &Tile) -> u32 {
        match (self.family, self.direction) {
            (Family::Reference, _) => 0,
            (Family::Sm80, Direction::Fwd) => sm80_fwd_smem_bytes(self.head_dim, self.dtype, tile),
            (Family::Sm90, Direction::Fwd) => sm90_fwd_smem_bytes(self.head_dim, self.dtype, tile),
            _ => 0,
        }
    }

    /// GPU code targets of this cell's fatbin (`-gencode` pairs), and whether a compute_80 PTX
    /// image is also built for devices newer than the SASS (driver JIT, `ptx-jit` feature).
    pub const fn targets(&self) -> &'static [Target] {
        match self.family {
            Family::Reference | Family::Sm80 => &[Target::Sm80, Target::Sm90],
            Family::Sm90 => &[Target::Sm90a],
        }
    }

    /// Whether this cell family can be JIT-compiled from embedded compute_80 PTX.
    pub const fn has_ptx(&self) -> bool {
        matches!(self.family, Family::Reference | Family::Sm80)
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key())
    }
}

/// A SASS target of the fatbins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// sm_80 SASS, runs on sm_80/86/87/89.
    Sm80,
    /// sm_90 SASS for the sm80 family (H100/H200 running FA2-class code).
    Sm90,
    /// sm_90a SASS (wgmma, setmaxnreg): H100/H200 only.
    Sm90a,
}

impl Target {
    /// Every target, in knob order.
    pub const ALL: [Target; 3] = [Target::Sm80, Target::Sm90, Target::Sm90a];

    /// Tag used by the `FLASHATTN_AOT_ARCHS` knob.
    pub const fn tag(self) -> &'static str {
        match self {
            Target::Sm80 => "sm80",
            Target::Sm90 => "sm90",
            Target::Sm90a => "sm90a",
        }
    }

    /// nvcc `-gencode` argument.
    pub const fn gencode(self) -> &'static str {
        match self {
            Target::Sm80 => "arch=compute_80,code=sm_80",
            Target::Sm90 => "arch=compute_90,code=sm_90",
            Target::Sm90a => "arch=compute_90a,code=sm_90a",
        }
    }
}

/// A tile shape: the kernel's compile-time configuration besides dtype and head dim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tile {
    /// Query rows per thread block.
    pub block_m: u32,
    /// Key rows per main-loop step.
    pub block_n: u32,
    /// Warps per thread block.
    pub warps: u32,
    /// K/V shared-memory pipeline stages.
    pub stages: u32,
}

impl Tile {
    /// The reference kernels' launch shape: one query row per block, 128 threads.
    pub const REFERENCE: Tile = Tile {
        block_m: 1,
        block_n: 1,
        warps: 4,
        stages: 1,
    };

    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        self.warps * 32
    }
}

/// `tile!(block_m, block_n, warps, stages)`: a [`Tile`] literal (a struct literal, so that
/// `&[tile!(..)]` is promoted to a `'static` slice in the const tables below).
macro_rules! tile {
    ($m:expr, $n:expr, $w:expr, $s:expr) => {
        Tile {
            block_m: $m,
            block_n: $n,
            warps: $w,
            stages: $s,
        }
    };
}

/// sm80-family forward tiles per head dim, most preferred first.
///
/// The run time takes the first tile whose shared memory fits the device's opt-in limit
/// (sm_90: 227 KB, sm_80: 163 KB, sm_86/sm_89: 99 KB = 101376 bytes), so each list is ordered by
/// preference on H100 and ends with a tile of at most 101376 bytes. The later entries are also
/// reachable on H100 through the `smem_limit` kernel override, to measure them.
///
/// Reasoning (predictions for H100 running sm_90 SASS of the mma.sync code, not yet measured;
/// measured figures go in docs/perf-log.md):
/// - Rows per warp. With 32 query rows per warp every K/V fragment loaded from smem feeds two
///   m16 MMAs (~26 FLOP per smem byte); with 16 rows the smem traffic per MMA nearly doubles
///   (~14 FLOP/byte, ~1.9k FLOP/clk/SM at 128 B/clk, too close to what mma.sync sustains). So
///   head dims up to 128 use BM = 128 with 4 warps of 32 rows: FlashAttention-2's shape, 2 blocks
///   (8 warps) per SM by registers, one block's softmax (MUFU, FP32) overlapping the other's MMAs.
///   d = 192 and 256 cannot hold 32 rows of O (192-256 fp32 registers), so they use 8 warps of
///   16 rows with BM = 128 (BM = 64 would double the L2 -> smem traffic per FLOP).
/// - BM = 128 everywhere the smem allows: each K/V byte read from L2 serves 128 query rows,
///   ~2.6 TB/s of L2 traffic at 330 TFLOP/s.
/// - Registers, not smem, bind on H100: at d = 128 O takes 128 and S (64 keys) 64 of the 255
///   registers, and a straight 64-key step spills. The kernel therefore runs a 64-key block as
///   two softmax chunks of 32 keys (one load, one barrier, two online-softmax updates); the O
///   rescale is skipped when no row max moved. (128 x 48 in one chunk compiles at 254 registers,
///   without margin; the kernel's static_assert keeps O + one S chunk <= 160 registers.)
/// - Stages. A 2-stage K/V ring gives a whole KV step (one barrier per step) to every load and
///   still lets two 4-warp blocks share an SM at d <= 128 (2 x 102 KB at d = 128). A third stage
///   would drop that to one block per SM.
/// - d = 64: 128 x 128 (two 64-key chunks, half the barriers) first; 128 x 64 to measure against.
///   Three blocks per SM would need <= 168 registers and spill.
/// - d = 128: 128 x 64 (102 KB) first; 128 x 32 (68 KB) fits 99 KB.
/// - d = 192 / 256: 128 x 64 with 8 warps (150 / 198 KB, 1 block per SM); 128 x 32 (132 KB)
///   fits A100's 163 KB at d = 256; 64 x 32 with 4 warps fits 99 KB (d = 256: exactly 101376).
/// - Rows are padded by 8 elements (16 bytes): the pitch is an odd number of 16-byte chunks for
///   every head dim here, so ldmatrix and cp.async are conflict-free without a swizzle. The
///   pads of Q rows 0-3 also hold the block's walk state (no extra bytes).
///
/// Registers per thread (nvcc 13.0, -O3; sm_80 / sm_90 SASS; same for f16 and bf16; 0 spills and
/// 0 stack everywhere): d64 128x128 214/215, 128x64 218/222; d80 226/227; d96 239/243;
/// d128 128x64 241/241, 128x32 224/228; d192 128x64w8 194/203, 64x32 178/189;
/// d256 128x64w8 225/237, 128x32w8 210/217, 64x32 210/217.
pub const fn sm80_fwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[tile!(128, 128, 4, 2), tile!(128, 64, 4, 2)],
        80 => &[tile!(128, 64, 4, 2)],
        96 => &[tile!(128, 64, 4, 2)],
        128 => &[tile!(128, 64, 4, 2), tile!(128, 32, 4, 2)],
        192 => &[tile!(128, 64, 8, 2), tile!(64, 32, 4, 2)],
        256 => &[tile!(128, 64, 8, 2), tile!(128, 32, 8, 2), tile!(64, 32, 4, 2)],
        _ => &[],
    }
}

/// Shared memory of an sm80-family forward tile: Q tile plus `stages` K and V tiles, each row
/// padded by 8 elements. `csrc/sm80/fwd_mainloop.cuh` (`FwdSmem`) computes the same number and
/// every kernel static_asserts that it equals the one the build passes in.
pub const fn sm80_fwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    let pitch = (head_dim + 8) * dtype.size_in_bytes() as u32;
    tile.block_m * pitch + 2 * tile.stages * tile.block_n * pitch
}

/// sm90-family (FlashAttention-3 class, sm_90a) forward tiles per head dim, most preferred
/// first. `warps` = 4 (producer warpgroup) + 4 per consumer warpgroup of 64 query rows, so
/// `block_m / 64 = warps / 4 - 1`.
///
/// Reasoning (predictions for H100; measured figures go in docs/perf-log.md):
/// - Registers decide the shape. A consumer thread holds S (`block_n / 2` fp32), P (`block_n /
///   4` b32 while the P.V that reads it runs) and O (`head_dim / 2` fp32). With 2 consumer
///   warpgroups `setmaxnreg` gives them 240 registers (producer 24), with 3 only 160
///   (producer 32). Every tile below compiles with no spills; ptxas leaves ~30-40 registers of
///   fragmentation around the wgmma register blocks, so S + P + O must stay near 200 (2 WGs) or
///   128 (3 WGs).
/// - Shared memory: Q (`block_m x d`, reused as the O staging buffer) + `stages` x (K + V tiles
///   of `block_n x d`) + barriers + 1 KB alignment slack, at most 227 KB (232448 bytes).
/// - d = 64: 192 x 128, 3 consumer WGs (FA3's tile): exp costs as much as the MMAs at d = 64
///   (64 / d), so three warpgroups keep the MUFU busy while the others' GEMMs run. S + P + O =
///   128 of 160 registers; 192 x 192 would need 176 (FA3 moves P through smem for that one).
///   3 stages because a KV step is short (~0.7 us for all three WGs) against TMA latency.
/// - d = 80: 128 x 176, 3 stages. The head dim is 5 panels of 16 with a 32-byte swizzle (the
///   only swizzle that tiles 160-byte rows; one TMA box and one P.V wgmma of N = 80).
/// - d = 96: 128 x 176, 3 stages (228472 bytes). 64-byte swizzle, 3 panels of 32. FA3 uses
///   192 x 144 with P through smem; with P in registers 3 WGs x 160 registers do not fit it.
/// - d = 128: 128 x 176, 2 stages (FA3's non-causal tile; its causal 128 x 128 is not a
///   separate cell here). S + P + O = 196 registers. 128 x 192 fits smem (O reuses Q) but not
///   the registers.
/// - d = 192: 128 x 112, 2 stages (222296 bytes); 3 stages do not fit.
/// - d = 256: 128 x 80, 2 stages (230488 bytes): O alone is 128 registers.
pub const fn sm90_fwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[tile!(192, 128, 16, 3)],
        80 => &[tile!(128, 176, 12, 3)],
        96 => &[tile!(128, 176, 12, 3)],
        128 => &[tile!(128, 176, 12, 2)],
        192 => &[tile!(128, 112, 12, 2)],
        256 => &[tile!(128, 80, 12, 2)],
        _ => &[],
    }
}

/// Shared memory of an sm90-family forward tile, in bytes (dynamic; the kernel aligns its base
/// to 1024 itself). `csrc/sm90/layout.cuh` (`SharedLayout`) computes the same number and every
/// kernel static_asserts that it equals the one the build passes in:
/// - Q: `block_m / 64` slabs of 64 rows x `head_dim`, each rounded up to 1024 bytes (the swizzle
///   period; the epilogue stages O in the same slabs);
/// - K and V: `stages` tiles each of `block_n` rows x `head_dim`, rounded up to 1024 bytes;
/// - `3 + 4 * stages` mbarriers of 8 bytes;
/// - 1024 bytes of slack for aligning the base.
pub const fn sm90_fwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    const fn round_up_1k(x: u32) -> u32 {
        x.div_ceil(1024) * 1024
    }
    let row_bytes = head_dim * dtype.size_in_bytes() as u32;
    let q_slabs = tile.block_m / 64;
    let q = q_slabs * round_up_1k(64 * row_bytes);
    let kv = 2 * tile.stages * round_up_1k(tile.block_n * row_bytes);
    let barriers = (3 + 4 * tile.stages) * 8;
    q + kv + barriers + 1024
}

/// Every cell the crate knows how to build, before the build knobs filter it. Families whose
/// kernels are not written yet are absent rather than stubbed.
pub fn whitelist() -> Vec<Cell> {
    let mut cells = Vec::new();
    for direction in [Direction::Fwd, Direction::Bwd] {
        for dtype in [DType::F16, DType::Bf16] {
            cells.push(Cell {
                family: Family::Reference,
                direction,
                dtype,
                head_dim: 0,
            });
        }
    }
    for family in [Family::Sm80, Family::Sm90] {
        for dtype in [DType::F16, DType::Bf16] {
            for head_dim in HEAD_DIMS {
                cells.push(Cell {
                    family,
                    direction: Direction::Fwd,
                    dtype,
                    head_dim,
                });
            }
        }
    }
    cells
}
