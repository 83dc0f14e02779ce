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
            (Family::Sm90, _) => Vec::new(),
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
    pub const REFERENCE: Tile = Tile { block_m: 1, block_n: 1, warps: 4, stages: 1 };

    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        self.warps * 32
    }
}

/// `tile!(block_m, block_n, warps, stages)`: a [`Tile`] literal (a struct literal, so that
/// `&[tile!(..)]` is promoted to a `'static` slice in the const tables below).
macro_rules! tile {
    ($m:expr, $n:expr, $w:expr, $s:expr) => {
        Tile { block_m: $m, block_n: $n, warps: $w, stages: $s }
    };
}

/// sm80-family forward tiles per head dim, most preferred first.
///
/// Tuning notes (H100 unless said; measured figures in docs/perf-log.md):
/// - Each row's smem is padded by 8 elements (16 bytes), which makes every ldmatrix and
///   cp.async access conflict-free without a swizzle (the row pitch is an odd number of 16-byte
///   chunks for every head dim here).
/// - A second, smaller variant exists where the first exceeds the 99 KB of sm_86/sm_89; the run
///   time picks the first that fits the device's opt-in limit.
pub const fn sm80_fwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[tile!(128, 128, 4, 2), tile!(128, 64, 4, 2)],
        80 => &[tile!(128, 64, 4, 2)],
        96 => &[tile!(128, 64, 4, 2)],
        128 => &[tile!(128, 64, 4, 2), tile!(128, 32, 4, 2)],
        192 => &[tile!(128, 64, 8, 2), tile!(64, 64, 4, 2)],
        256 => &[tile!(128, 64, 8, 2), tile!(64, 64, 4, 1)],
        _ => &[],
    }
}

/// Shared memory of an sm80-family forward tile: Q tile plus `stages` K and V tiles, each row
/// padded by 8 elements. `csrc/sm80/fwd.cuh` static_asserts the same number.
pub const fn sm80_fwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    let pitch = (head_dim + 8) * dtype.size_in_bytes() as u32;
    tile.block_m * pitch + 2 * tile.stages * tile.block_n * pitch
}

/// Every cell the crate knows how to build, before the build knobs filter it. Families whose
/// kernels are not written yet are absent rather than stubbed.
pub fn whitelist() -> Vec<Cell> {
    let mut cells = Vec::new();
    for direction in [Direction::Fwd, Direction::Bwd] {
        for dtype in [DType::F16, DType::Bf16] {
            cells.push(Cell { family: Family::Reference, direction, dtype, head_dim: 0 });
        }
    }
    for dtype in [DType::F16, DType::Bf16] {
        for head_dim in HEAD_DIMS {
            cells.push(Cell { family: Family::Sm80, direction: Direction::Fwd, dtype, head_dim });
        }
    }
    cells
}
