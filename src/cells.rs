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
    /// The attention-state merge ([`crate::merge_states`]): one small generic kernel per dtype,
    /// sm_80 and sm_90 SASS (+ compute_80 PTX).
    Merge,
}

impl Family {
    /// Tag used in cell keys, symbols and the `FLASHATTN_AOT_FAMILIES` knob.
    pub const fn tag(self) -> &'static str {
        match self {
            Family::Reference => "ref",
            Family::Sm80 => "sm80",
            Family::Sm90 => "sm90",
            Family::Merge => "merge",
        }
    }

    /// Whether the family's cells are per head dim (fast kernels with compile-time tiles), or
    /// generic over it (the reference and the merge: one kernel per dtype, `head_dim` 0).
    pub const fn per_head_dim(self) -> bool {
        matches!(self, Family::Sm80 | Family::Sm90)
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
        if !self.family.per_head_dim() {
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
            (Family::Merge, _) => "merge/merge.cuh",
        }
    }

    /// The macro in [`Cell::source`] that defines the kernel of one tile of this cell.
    pub const fn instantiate_macro_for(&self, tile: &Tile) -> &'static str {
        if tile.lead {
            "FA_SM90_FWD_LEAD_KERNEL"
        } else {
            self.instantiate_macro()
        }
    }

    /// The macro of the deterministic-mode kernels, which build.rs compiles into a second image
    /// of the cell (`CellImage::det_fatbin`): the sm90-family backward only (the sm80 family's
    /// main kernel takes deterministic mode at run time).
    pub const fn det_instantiate_macro(&self) -> Option<&'static str> {
        match (self.family, self.direction) {
            (Family::Sm90, Direction::Bwd) => Some("FA_SM90_BWD_DET_KERNEL"),
            _ => None,
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
            (Family::Merge, _) => "FA_MERGE_KERNEL",
        }
    }

    /// The tile variants compiled for this cell, most preferred first. The run time picks the
    /// first one whose shared memory fits the device (see [`Cell::smem_bytes`]).
    pub fn tiles(&self) -> Vec<Tile> {
        match (self.family, self.direction) {
            (Family::Reference | Family::Merge, _) => vec![Tile::REFERENCE],
            (Family::Sm80, Direction::Fwd) => sm80_fwd_tiles(self.head_dim).to_vec(),
            (Family::Sm80, Direction::Bwd) => sm80_bwd_tiles(self.head_dim).to_vec(),
            (Family::Sm90, Direction::Fwd) => sm90_fwd_tiles(self.head_dim).to_vec(),
            (Family::Sm90, Direction::Bwd) => sm90_bwd_tiles(self.head_dim).to_vec(),
        }
    }

    /// The tile variants compiled as paged-KV kernels in this cell's image (K/V read through a
    /// block table; [`Cell::paged_symbol`]), most preferred first. Only the sm80-family forward
    /// has them.
    pub fn paged_tiles(&self) -> Vec<Tile> {
        match (self.family, self.direction) {
            (Family::Sm80, Direction::Fwd) => sm80_fwd_paged_tiles(self.head_dim).to_vec(),
            _ => Vec::new(),
        }
    }

    /// The tile variants compiled as split-KV kernels in this cell's image ([`Cell::split_symbol`],
    /// `FwdOptions::num_splits`). Only the sm90-family forward has them (`sm90_fwd_split_tile`);
    /// the sm80 kernels take the split as a run-time parameter.
    pub fn split_tiles(&self) -> Vec<Tile> {
        match (self.family, self.direction) {
            (Family::Sm90, Direction::Fwd) => sm90_fwd_split_tile(self.head_dim).into_iter().collect(),
            _ => Vec::new(),
        }
    }

    /// The kernel symbol of the split-KV kernel of one tile variant: the dense symbol + `_split`.
    pub fn split_symbol(&self, tile: &Tile) -> String {
        format!("{}_split", self.symbol(tile))
    }

    /// The macro in [`Cell::source`] that defines one split-KV kernel of this cell.
    pub const fn split_instantiate_macro(&self) -> &'static str {
        "FA_SM90_FWD_SPLIT_KERNEL"
    }

    /// The kernel symbol of the paged-KV kernel of one tile variant: the dense symbol + `_paged`.
    pub fn paged_symbol(&self, tile: &Tile) -> String {
        format!("{}_paged", self.symbol(tile))
    }

    /// The macro in [`Cell::source`] that defines one paged-KV kernel of this cell.
    pub const fn paged_instantiate_macro(&self) -> &'static str {
        "FA_SM80_FWD_PAGED_KERNEL"
    }

    /// The kernel symbol of one tile variant of this cell.
    pub fn symbol(&self, tile: &Tile) -> String {
        if self.family == Family::Reference {
            // The reference module holds several entry points; `tile` names none of them.
            return format!("fa_ref_{}_{}", self.direction.tag(), self.dtype.tag());
        }
        if self.family == Family::Merge {
            return format!("fa_merge_{}", self.dtype.tag());
        }
        format!(
            "fa_{}_{}_{}_hd{}_m{}n{}w{}s{}{}",
            self.family.tag(),
            self.direction.tag(),
            self.dtype.tag(),
            self.head_dim,
            tile.block_m,
            tile.block_n,
            tile.warps,
            tile.stages,
            if tile.lead { "_lead" } else { "" }
        )
    }

    /// Shared memory (bytes, dynamic) of one tile variant.
    pub fn smem_bytes(&self, tile: &Tile) -> u32 {
        match (self.family, self.direction) {
            (Family::Reference, _) => 0,
            (Family::Sm80, Direction::Fwd) => sm80_fwd_smem_bytes(self.head_dim, self.dtype, tile),
            (Family::Sm80, Direction::Bwd) => sm80_bwd_smem_bytes(self.head_dim, self.dtype, tile),
            (Family::Sm90, Direction::Fwd) => sm90_fwd_smem_bytes(self.head_dim, self.dtype, tile),
            (Family::Sm90, Direction::Bwd) => sm90_bwd_smem_bytes(self.head_dim, self.dtype, tile),
            _ => 0,
        }
    }

    /// GPU code targets of this cell's fatbin (`-gencode` pairs), and whether a compute_80 PTX
    /// image is also built for devices newer than the SASS (driver JIT, `ptx-jit` feature).
    pub const fn targets(&self) -> &'static [Target] {
        match self.family {
            Family::Reference | Family::Sm80 | Family::Merge => &[Target::Sm80, Target::Sm90],
            Family::Sm90 => &[Target::Sm90a],
        }
    }

    /// Whether this cell family can be JIT-compiled from embedded compute_80 PTX.
    pub const fn has_ptx(&self) -> bool {
        matches!(self.family, Family::Reference | Family::Sm80 | Family::Merge)
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
    /// sm90-family forward only: the lead kernel (`FA_SM90_FWD_LEAD_KERNEL`, symbol + `_lead`).
    /// Each consumer warpgroup passes over the first KV blocks of its tile that none of its own
    /// rows sees (above the causal diagonal or the right window bound of its rows, not of the
    /// tile's last row), keeping the pipeline's protocol, and a warpgroup that sees no key of
    /// the tile stores zeros. It is a separate kernel rather than a run-time branch: compiled
    /// into the general kernels, the same code cost calls without a mask 1-2% (H200,
    /// 2026-12-03, two same-process A/Bs in both orders: d 64 / d 128 without a mask -1.2%
    /// together, their scheduling changed), so only causal calls run it (`sm90_fwd_variant`).
    pub lead: bool,
}

impl Tile {
    /// The reference kernels' launch shape: one query row per block, 128 threads.
    pub const REFERENCE: Tile = Tile {
        block_m: 1,
        block_n: 1,
        warps: 4,
        stages: 1,
        lead: false,
    };

    /// Threads per block.
    pub const fn threads(&self) -> u32 {
        self.warps * 32
    }
}

/// `tile!(block_m, block_n, warps, stages)`: a [`Tile`] literal (a struct literal, so that
/// `&[tile!(..)]` is promoted to a `'static` slice in the const tables below);
/// `tile!(block_m, block_n, warps, stages, lead)`: the same tile's lead kernel ([`Tile::lead`]).
macro_rules! tile {
    ($m:expr, $n:expr, $w:expr, $s:expr) => {
        Tile {
            block_m: $m,
            block_n: $n,
            warps: $w,
            stages: $s,
            lead: false,
        }
    };
    ($m:expr, $n:expr, $w:expr, $s:expr, lead) => {
        Tile {
            block_m: $m,
            block_n: $n,
            warps: $w,
            stages: $s,
            lead: true,
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
/// Reasoning:
/// - Rows per warp. With 32 query rows per warp every K/V fragment loaded from smem feeds two
///   m16 MMAs; with 16 rows the ldmatrix traffic per MMA nearly doubles (d = 256: ~144 ldmatrix.x4
///   per 256 MMAs per warp and step, which puts shared-memory bandwidth, 128 B/clk/SM, at or
///   above the tensor pipe's time). So head dims up to 128 use 4 warps of 32 rows (2 blocks = 8
///   warps per SM by registers); d = 192 / 256 cannot hold 32 rows of O and use 16 rows per warp.
/// - Registers bind: at d = 128 O takes 128 and S (64 keys) 64 of the 255 registers. The kernel
///   keeps the whole 64-key block in one softmax chunk by parking the per-lane row sums in smem
///   between steps (255 registers, no spill); the earlier two 32-key chunks re-read Q from smem
///   per chunk (17% more ldmatrix) and were 5-7% slower. d = 64 keeps Q's fragments in registers.
/// - Stages. A 2-stage K/V ring gives a whole KV step (one barrier per step) to every load and
///   still lets two 4-warp blocks share an SM at d <= 128. At d = 80 / 96 a third stage also
///   fits two blocks (90 / 104 KB). At d = 256 one stage (FlashAttention-2's pipeline: two
///   barriers per step) is what lets two 64 x 64 blocks share an SM.
/// - Rows are padded by 8 elements (16 bytes): the pitch is an odd number of 16-byte chunks for
///   every head dim here, so ldmatrix and cp.async are conflict-free without a swizzle. The
///   pads of Q rows 0-3 hold the block's walk state, those of the K rows held the parked row
///   sums. Since 2026-12-04 K and V use an XOR swizzle with a pitch of D elements instead wherever
///   D is whole 128-byte lines (64 / 128 / 192 / 256): the padded rows made every 128-byte
///   segment of the cp.async copy straddle two smem lines (`FwdMainloop::kSwizzleKv`; d = 256
///   +6-12%, d = 64 +2-6%, perf log run 16; d = 128 +2-7%, run 17). The K and V regions keep
///   their padded size; the stages are packed, and the parked row sums use the free end of the
///   K region. d = 80 / 96 rows (160 / 192 bytes, not whole lines) sit in two swizzled panels,
///   128 bytes + 32 / 64 bytes (`SplitKv`; d = 80 +12-20%, d = 96 +2-7%, run 17).
///
/// Measured (H100 SXM, bf16, `bench --quick --family sm80 --variant i`, TFLOP/s for non-causal
/// 2k / 8k, causal 2k / 8k; two device sessions, 2026-11-22; PyTorch FA2 in the same session:
/// d64 284/304/243/287, d80 251/265/211/250, d96 311/334/247/308, d128 336/348/254/312,
/// d256 303/321/246/280):
/// - d = 64: 128 x 64 297/306-309/251/289-293; 128 x 128 (one 128-key chunk, parked sums)
///   297/311/256/296 and 299/314/251/290 in the other session: a tie, so the smaller tile only;
///   128 x 64 with 3 stages 302/315/251/289.
/// - d = 80: 128 x 64 x 3 stages 245-249/253/210-212/240; 2 stages 250/261/214/244 (tie);
///   128 x 96 (parked sums) 245-248/258/209-211/239-244; 128 x 128 (two chunks) 239/253/206/236;
///   Q in registers (192-register budget) 226/238/204/230 with 3 stages, so not at d = 80.
/// - d = 96: 128 x 64 x 3 stages 310/308/250-253/291 first; 2 stages 303/315/236/292 (fits
///   99 KB); 128 x 96 (parked sums) 273-283/293-296/229-236/270-272; 128 x 32 275/288/233/268.
/// - d = 128: 128 x 64 (one chunk, parked sums) 337-339/346-350/271/310-316, GQA 32/8
///   324-328/341-347/294-295/317-323; 128 x 32 (68 KB, fits 99 KB) 326/329/259/301; 128 x 32 x 3
///   stages 324/325/255/299.
/// - d = 256: 128 x 64 with 8 warps 272/285-287/228-230/261-263 first; 64 x 64 x 1 stage with
///   4 warps (2 blocks per SM, exactly 101376 bytes) 269-272/278/231-242/254-264 (a tie on the
///   geometric mean, better causal, worse non-causal); 64 x 32 x 2 stages 249/258/217/236;
///   128 x 32 with 8 warps 232/241/199/223. Still 0.87-0.95x FA2.
/// - d = 192 (not in the benchmark grid): unchanged, 128 x 64 with 8 warps; 64 x 32 fits 99 KB.
///
/// Session 2 (2026-11-22, full grid, `bench --family sm80 --iters 20`, same-session PyTorch FA2),
/// with the sectioned longest-first causal grid order (csrc/sm80/fwd_tile.cuh) and, at d = 192 /
/// 256 with 16-row warps, Q in registers (`FwdMainloop::kWideQInRegs`):
/// - d = 256, 128 x 64 x 8 warps: non-causal 266/287/299/300/307 at 1k/2k/4k/8k/16k (was
///   261/278/286/285/291), causal 222/259/285/296/307 (was 202/229/242/256/289). 64 x 32 x 4
///   warps x 2 stages with Q in registers: 6% below it (geometric mean of the d = 256 cells).
/// - d = 128, 128 x 32 against 128 x 64 (two runs each): +2% for 16 heads (+5-7% causal 2k-8k),
///   -3% for GQA 32/8 (-8% non-causal 16k): a tie overall, so 128 x 64 stays first.
/// - Not kept: S = Q K^T of both 32-key halves of a 64-key block ahead of their softmaxes (to
///   overlap one half's MMAs with the other's exponentials in one warp): 3-10% slower at
///   d = 64-128.
///
/// - Session 3: the ring refill after the step's first Q K^T MMAs (`FwdMainloop::kRefill`), three
///   full-grid runs alternating with the previous kernels: +2.0% geometric mean (d = 128 +0-6%).
///   Not kept: a d = 256 128 x 32 x 8 warps x 3 stages tile (Q in registers), not measurably
///   faster than 128 x 64 x 2 stages.
///
/// - Session 4 (H200, 2026-12-02, d = 96 / 128 / 256 grid, two device sessions, old and new
///   binaries alternated twice in each, PyTorch FA2 in the same session): the d = 96 refill split
///   (K after the barrier, V after the first Q K^T; was late) +1.7-2.6% non-causal at every
///   length, causal -1.2% at 512 to +1.3% at 16k (both sessions alike); d = 256 Q in a cp.async
///   group of its own (`FwdMainloop::kQGroup`) +0-1.3%; d = 256 causal 512 on 64 x 64 x 1
///   (`sm80_fwd_variant`) +5-8%. Not kept (all measured with forced variants): 16-row-warp tiles
///   with three blocks per SM, d = 96 64 x 64 x 2 stages (164 registers) 0.76-0.90x and d = 128
///   64 x 32 x 3 stages (165 registers) 0.73-0.92x of index 0; d = 256 64 x 32 x 2 stages with Q
///   in registers (two blocks per SM) 0.84-0.95x, worst at short lengths; d = 256 two query
///   blocks per 128 x 64 x 8-warp block without a mask bound (the next Q loaded into the free Q
///   smem from the first step, the ring's last refill fetching the next tile's first K/V block,
///   so the second tile has no prologue): -0.4 to +0.4% at 512-16k, so the ~2 step-times per tile
///   by which 1k-4k trail 16k (273 / 289 / 298 against 306 TFLOP/s) are not its prologue or
///   launch. FA2 there: 295 / 311 / 322 / 311 / 316 at 1k-16k non-causal.
///   Storage: with (batch, heads, seqlen, d) tensors (what compare.py hands PyTorch) instead of
///   (batch, seqlen, heads, d), ours measured +0-1% at d = 256 and d = 128, +0.5-2.7% at d = 96
///   non-causal: not what separates the two.
///
/// - Session 5 (H200, 2026-12-03, bf16, one device session, every binary run twice alternating
///   with main; PyTorch FA2 from run 4: d256 304 / 320, d96 328 / 333, d128 336 / 356, GQA
///   334 / 346 TFLOP/s at 2k / 8k non-causal): part of Q's k-steps in registers
///   (`FwdMainloop::kQSteps`). d = 256 128 x 64 x 8 warps: the whole 64-key block as one softmax
///   chunk with 13 of 16 Q k-steps in registers and the split refill (was 32-key chunks, all of
///   Q): non-causal 1k-16k 274/291/300/304/307 -> 283/301/311/316/318 (+3.4-3.9%), causal
///   225/262/286/302/310 -> 230/269/296/313/322 (+2.2-3.8%); 0.99x FA2 at 2k and 8k. d = 96
///   (2 of 6 k-steps): non-causal 2k/4k/8k 325/330/321 -> 329/341/330, causal +1.3-1.5%; d = 128
///   128 x 64 (1 of 8): 339/342/349 -> 340/346/360, causal +1.6-2.1%, GQA 32/8 344/352/357 ->
///   350/356/363. Not kept: parking the d = 256 row sums in K / V row pads to hold more of Q
///   (-4 to -5%); 12 / 14 k-steps (+2.1-3.4%); 8 / 10 (-2.5 to +1%); d = 96 with 4 or 6 k-steps
///   (-1.7 to +2.7%); the d = 256 64 x 64 x 1-stage tile with 8 or 12 Q k-steps in registers
///   (64-key chunk): +2-3% over its current form, still 7-10% below 128 x 64 x 8 warps
///   non-causal (it runs only causal at 512 keys, not measured there).
///
/// Registers per thread (nvcc 13.0, -O3; sm_80 / sm_90 SASS; same for f16 and bf16; 0 spills and
/// 0 stack everywhere): d64 128x64 226/224; d80 128x64x3 222/223; d96 128x64x3 238/239, x2
/// 238/239; d128 128x64 254/255, 128x32 227/234; d192 128x64w8 240/240, 64x32 230/238;
/// d256 128x64w8 255/255, 64x64x1 241/239. Session 4 (sm_90, bf16): d96 128x64x3 and x2 244 with
/// the split refill. Session 5 (partial Q in registers): d96 128x64x3 / x2 249/255, d128 128x64
/// 255/255, d256 128x64w8 255/255.
pub const fn sm80_fwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[tile!(128, 64, 4, 2)],
        80 => &[tile!(128, 64, 4, 3)],
        96 => &[tile!(128, 64, 4, 3), tile!(128, 64, 4, 2)],
        128 => &[tile!(128, 64, 4, 2), tile!(128, 32, 4, 2), tile!(64, 64, 4, 2)],
        192 => &[tile!(128, 64, 8, 2), tile!(64, 32, 4, 2)],
        256 => &[tile!(128, 64, 8, 2), tile!(64, 64, 4, 1)],
        _ => &[],
    }
}

/// The sm80-family forward tiles that are also compiled as paged-KV kernels (the same kernel with
/// a block-table K/V copy, `GmemToSmemTile::issue_paged`), most preferred first. Each list has a
/// tile within 99 KB. The paged copy walks its rows rolled (one running page / slot pair), which
/// keeps every one of these spill-free (nvcc 13.0 `-Xptxas -v`, bf16, sm_90 / sm_80 registers:
/// d64 224 / 215, d80 224 / 226, d96 x3 251 / 248 and x2 250 / 247, d128 128 x 32 227 / 223,
/// d192 240 / 240 and 234 / 230, d256 64 x 64 x 1 237 / 241), except d128 128 x 64, whose paged
/// copy spills 52 bytes on sm_80 (255 registers, no spill, on sm_90; sm_86 / 89 run 128 x 32,
/// spill-free). It is first because it measured faster on H200 (2026-12-03, `bench --paged`,
/// bf16, 32 / 8 heads, causal, one call against the 128 x 32-only build): decode 2k / 8k -9.0 /
/// -9.4%, prefill chunks of 512 over 4k / 16k -8.4 / -9.5% (page 16; pages 64 / 256 alike).
/// Left out: d256 128 x 64 x 8 warps (its paged copy spills 24 bytes on sm_90).
pub const fn sm80_fwd_paged_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        128 => &[tile!(128, 64, 4, 2), tile!(128, 32, 4, 2), tile!(64, 64, 4, 2)],
        256 => &[tile!(64, 64, 4, 1)],
        _ => sm80_fwd_tiles(head_dim),
    }
}

/// The tile of `sm80_fwd_tiles(head_dim)` (an index into it) that a forward call runs when no
/// variant is forced, given its key count (the longest sequence for varlen) and whether it has a
/// causal mask. Index 0 is the general tile; the run time falls back to the first tile that fits
/// where the preferred one does not (sm_86 / sm_89).
///
/// Measured on H200 (2026-12-02, bf16, `bench --variant i`, two device sessions):
/// - d = 256, causal, 512 keys: 64 x 64 x 4 warps x 1 stage (two blocks per SM) 180-184 TFLOP/s
///   against 169-174 for 128 x 64 x 8 warps (+5-8%); a tie at 1k causal (222-224 both), and
///   slower from 2k causal (-4 to -10%) and at every non-causal length (-3 to -13%).
/// - Every other forced variant was slower than index 0 on every cell of the grid (d = 96
///   128 x 64 x 2 stages, d = 128 128 x 32; see `sm80_fwd_tiles`).
pub const fn sm80_fwd_variant(head_dim: u32, seqlen_k: usize, causal: bool) -> usize {
    match head_dim {
        256 if causal && seqlen_k <= 512 => 1,
        _ => 0,
    }
}

/// The tile (an index into `sm80_fwd_tiles(head_dim)` and `sm80_fwd_paged_tiles(head_dim)`)
/// for calls of at most 64 query rows per (sequence, head), such as decode steps (GQA heads as
/// rows) and their split-KV parts, where most of a 128-row block would be padding: d = 128,
/// 64 x 64 (16-row warps). None: the general rule (`sm80_fwd_variant`). Measured on H200
/// (2026-12-03, bf16, 32 / 8 heads, against the 128 x 64 tile in the same call): unsplit decode
/// 1.54-1.56x faster (batch 1, 8k-128k keys), split decode at 128k 1.39x, paged decode (batch
/// 64, 2k / 8k keys) 1.35-1.38x; d 64 / 80 / 96 keep their tiles (not measured with one).
pub const fn sm80_fwd_short_q_variant(head_dim: u32, seqlen_q: usize) -> Option<usize> {
    match head_dim {
        128 if seqlen_q <= 64 => Some(2),
        _ => None,
    }
}

/// Shared memory of an sm80-family forward tile: Q tile plus `stages` K and V tiles, each row
/// padded by 8 elements (swizzled K / V stages are packed rows of D elements, which leaves the
/// last `stages * block_n * 16` bytes of the K and of the V region free). `csrc/sm80/fwd_mainloop.cuh` (`FwdSmem`) computes the same number and
/// every kernel static_asserts that it equals the one the build passes in.
pub const fn sm80_fwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    let pitch = (head_dim + 8) * dtype.size_in_bytes() as u32;
    tile.block_m * pitch + 2 * tile.stages * tile.block_n * pitch
}

/// sm80-family backward tiles per head dim, most preferred first (the run time takes the first
/// whose shared memory fits the device: 227 KB on sm_90, 163 KB on sm_80, 99 KB = 101376 bytes on
/// sm_86 / sm_89; every list has a tile within 163 KB and one within 101376 bytes).
/// For the backward, `block_m` is the query rows of one step of the walk, `block_n` the key rows
/// a thread block owns (their dK, dV in registers), `stages` the Q / dO buffers (2: the next
/// step loads during the whole current one; 1: during its dQ phase).
///
/// Reasoning (csrc/sm80/bwd_gemm.cuh, `BwdShape`):
/// - A warp owns 32 key rows where its dK + dV slab fits 128 registers (each Q / dO fragment
///   read from smem then feeds two MMAs), else 16 (`sm80_bwd_warp_keys`); it computes S^T = K Q^T
///   and dP^T = V dO^T for them, so P^T and dS^T come out in the A layout of dV += P^T dO and
///   dK += dS^T Q. When 2 or 4 warps share a key group they split its dK / dV columns (d = 128:
///   32 x 64 per warp, FlashAttention-2's warp tile) and exchange P^T / dS^T through smem; dS^T
///   always goes through smem for dQ = dS K (fp32 reductions into dq_accum).
/// - Registers bind: dK + dV take up to 128, S^T + dP^T of one chunk up to 64 registers per lane.
/// - Smem: K, V of the block + `stages` x (Q, dO) of `block_m` rows + dS^T (+ P^T); one 8-warp
///   block per SM (registers), or two 4-warp ones.
///
/// Measured (H100 SXM, bf16, `bench --bwd --quick [--variant i]`, TFLOP/s counted as 2.5x the
/// forward's FLOPs, non-causal 2k / 8k, causal 2k / 8k; three device sessions, 2026-11-22):
/// - session 1, 16-row warps everywhere: d64 64x128w8 154/167/131/160, 32x128w4 (32-row warps)
///   177/195/150/181; d128 64x128w8 187/203/156/189, 64x64w4s1 178/194/153/184, 32x64w4
///   156/168/142/161; d256 64x64w8 s2 161/174/140/172, s1 158/172/138/170.
/// - session 2, 32-row warps where they fit (`sm80_bwd_warp_keys`): d64 32x128w4 181/200/146/188,
///   128x128w8 164/183/138/174, 64x128w8 153/171/129/-; d96 64x128w8 179/201/154/189, 64x64w4s1
///   177/195/150/185; d128 64x128w8 s2 199/223/160/206, s1 199/221/165/206, 64x64w4s1
///   186/200/162/192; d256 64x64w8 s2 163/178/138/175, s1 167/183/143/179. Both sessions still
///   branched per element on the score modifiers in the P / dS loop.
/// - session 3, that branch hoisted (the tiles below, first of each list): d64 226/256/183/232,
///   d80 176/195/150/185, d96 211/240/181/219, d128 216/256/185/237 (GQA 32/8 230/258/189/232),
///   d256 174/191/146/187. PyTorch FA2 in the same session: d64 239/281/175/246, d80
///   174/213/143/189, d96 241/288/171/233, d128 256/297/189/273 (GQA 238/296/201/278), d256
///   207/254/172/232: 0.75-1.05x, geometric mean 0.91x.
/// - d = 80 keeps 16-row warps (a 40-column split is not whole k16 steps); d = 192 follows d = 256.
/// - Session 2 (2026-11-22, geometric mean over non-causal / causal 2k / 8k against the first
///   tile in the same session): no other tile won: d64 64x128w8 0.85x, 128x128w8 0.91x; d96
///   128x64w8 0.77x, two Q buffers + one dO buffer (its next dO loaded after dV) 0.96x, 16-row
///   warps (P^T kept in registers) 0.90x at 64x128 and 1.00x at 128x128 s1; d128 128x64w8 0.79x,
///   the two-Q-buffer form 0.95x; d256 s2 0.95x, the two-Q-buffer form 0.96x.
/// - Session 4 (2026-12-02, H200, bf16, `bench --bwd`, 5 head dims x 512/2k/8k/16k, two interleaved
///   runs each, min of the run medians, geometric mean over 48 cells against the previous kernel):
///   dq_accum blocks stored fragment-major (`BwdShape::dq_frag_index`), one `red.global.add.v4.f32`
///   per lane and m16n8 tile (512 contiguous bytes per warp instruction instead of 8 rows x 32
///   bytes): 1.054x (d64 +1-2%, d80 +4-6% from 2k, d96 +5-8%, d128 +6-9%, d256 +6-15%; d80 512 -1
///   to -4%). P^T before dP^T (`kExpEarly`, exponentials overlapping the dP^T MMAs) on top: d64 and
///   d128 +1.5-2% more (1.062x overall); d96 -2.5%, d256 -1.5% (other device call), d80 +-0.5% (not
///   enabled). The alternatives still lose with the new dQ layout (8k non-causal, TFLOP/s): d64
///   64x128w8 225 vs 268, d128 s1 276 vs 279, d256 s2 222 vs 226; d96 64x64w4s1 253 vs 251 (within
///   noise). ncu, d128 non-causal 8k main kernel: ours 9.66 ms, 2.24 G instructions, 7.99 cycles
///   per issued instruction; PyTorch's FA2 8.77 ms, 2.12 G, 7.67 (its pre/post kernels ~0.7 ms from
///   its 9.46 ms total, ours ~0.2 ms). Of our ~1070 instructions per warp and step ~190 are the
///   next step's load addresses (`load_step`), issued right after the step's first barrier while
///   the tensor pipe idles.
///
/// - Session 5 (2026-12-03, H200, bf16, `bench --bwd --seqlens 2048,8192`, same-process A/B against
///   the session-4 kernel, min of 2-3 alternating runs, 20 iterations): the next step's Q / dO /
///   statistics loads (`load_step`, ~150-230 instructions of 64-bit address math) moved from the
///   top of the step, where they delayed the first MMA after the barrier, to behind the first S^T
///   MMAs (two stages; branch-free and tied to the S^T accumulators through a zero ptxas cannot
///   prove, otherwise ptxas hoists the math back) or, with one stage, made branch-free (ptxas then
///   interleaves it with the dQ MMAs): d64 +4.7-5.5%, d96 +4.1-5.8%, d256 (64 x 64 s1)
///   +3.0-4.4%; d128 -0.8 to +0.3%, so d128 issues them behind the dP^T MMAs instead
///   (`kLoadAfterDp`): +0.8-1.6% (+1.5-3.1% at d64, less than behind S^T). The walk's t / n became
///   an fp32-reciprocal divmod. With that, d = 256 runs 64 x 64 with two stages first: +4.7-6.1%
///   against the session-4 kernel, +1.6-1.9% over one stage; d = 192 (same reasoning, not
///   measured) keeps one stage. Not kept: one dQ pass at d = 256 (budget 192: -3.3 to -3.8%;
///   -2.6 to -3.1% against the one-stage loads alone), P^T before dP^T at d = 96 (-0.9 to -1.1%),
///   d = 128 one stage (+0.3-1.1%, below two stages with `kLoadAfterDp`), d = 96 64 x 64 w4
///   (+0.1-3.2%, below 64 x 128). Against PyTorch FA2 (run 4 figures, another session): d64 8k
///   non-causal 283 vs 275, d96 265 vs 284, d128 283 vs 294 (GQA causal 255 vs 278), d256 240 vs 249.
/// - Session 6 (2026-12-03, H200, bf16, `bench --bwd --family sm80`, 8k unless noted, base /
///   candidates alternated twice in one call, min ms): causal thread blocks launched key-block
///   major, lowest key block (longest walk) first (`bwd_block`): causal d96 +3.6%, d128 +3.6%
///   (2k) / +5.0% (8k), GQA 32/8 +11.3% / +10.6%, d256 +0.4%; non-causal unchanged (its order
///   keeps one head's Q / dO shared in L2). Q / dO copies without the select of row 0 for
///   zero-filled rows (`BwdTileCopy`, src-size 0 reads nothing): d128 +1.5% more (non-causal and
///   causal), d96 +0.2%, d256 -1.2 to -1.8% (kept only at d <= 128). Against PyTorch FA2 in the
///   same call: d128 causal 8k 1.05 (was 0.98), GQA causal 8k 1.03 (was 0.93); non-causal 8k
///   d96 0.93, d128 0.99, d256 0.94, GQA 0.98 still below. ptxas (bf16 / f16): the d128 64x128
///   s2 main kernel now spills 24 bytes (was 16), the d256 64x64 s1 one (second choice) 52-60.
///
/// Registers per thread of the main kernel (nvcc 13.0, -O3, sm_80 / sm_90 SASS, bf16 and f16;
/// 0 spills, 0 stack everywhere): d64 32x128w4 255/255, 64x128w8 218/228; d80 s2 255/244,
/// s1 244/245; d96 64x128w8 254/245, 64x64w4 255/255; d128 255/255 for all three; d192 64x64 s1
/// 228/226, s2 226/222, 32x64 217/226; d256 64x64 s1 244/248, s2 240/240, 32x32 240/242.
/// Session 4 (fragment-major dQ, `kExpEarly` at d64 / d128; bf16, sm_90): d64 32x128w4 255 with
/// a 16-byte spill (prologue and epilogue only, none in the walk), 64x128w8 217; d80 s2 244, s1
/// 245; d96 64x128w8 245, 64x64w4 255; d128 255 for all three; d256 s1 241, s2 240, 32x32 240.
/// Session 5 (loads behind the MMAs; ptxas -v, bf16): spills only d128 64x128 s2 16 bytes on
/// sm_90 (one reload of the step count per step; none on sm_80) and d256 64x64 s1 44 bytes (3-4
/// local accesses per step; 44-52 on sm_80); none at d64 (its 16 bytes are gone), d96, d256 s2.
/// The branch-free one-stage loads spilled 20-44 bytes in the 4-warp tiles (d128 64x64, d256
/// 32x32), so those keep the branch (unmeasured either way).
pub const fn sm80_bwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[tile!(32, 128, 4, 2), tile!(64, 128, 8, 2)],
        80 => &[tile!(64, 128, 8, 2), tile!(64, 128, 8, 1)],
        96 => &[tile!(64, 128, 8, 2), tile!(64, 64, 4, 1)],
        128 => &[tile!(64, 128, 8, 2), tile!(64, 128, 8, 1), tile!(64, 64, 4, 1)],
        192 => &[tile!(64, 64, 8, 1), tile!(64, 64, 8, 2), tile!(32, 64, 8, 1)],
        256 => &[tile!(64, 64, 8, 2), tile!(64, 64, 8, 1), tile!(32, 32, 4, 1)],
        _ => &[],
    }
}

/// Key rows per warp of an sm80-family backward tile (`BwdShape::kMT` in csrc/sm80/bwd_gemm.cuh):
/// 32 when key groups of 32 rows give a valid layout (1, 2 or 4 warps per group, each with a
/// whole number of k16 steps of columns and queries) whose dK + dV slab fits 128 registers per
/// lane, else 16.
pub const fn sm80_bwd_warp_keys(head_dim: u32, tile: &Tile) -> u32 {
    let group_warps = tile.warps * 32;
    if group_warps % tile.block_n == 0 {
        let wc = group_warps / tile.block_n;
        if (wc == 1 || wc == 2 || wc == 4)
            && head_dim % (16 * wc) == 0
            && tile.block_m % (16 * wc) == 0
            && 2 * (head_dim / wc) <= 128
        {
            return 32;
        }
    }
    16
}

/// Shared memory of an sm80-family backward tile (the main kernel's; the dot and convert kernels
/// use none): K and V (`block_n` rows), `stages` x (Q and dO of `block_m` rows), each row padded
/// by 8 elements (d = 128 / 256 keep Q / dO in swizzled rows of `head_dim` elements inside the
/// same stages); `stages` x 2 x `block_m` fp32 (log2 LSE, D); dS^T (`block_n` rows of
/// `block_m + 8` elements), P^T likewise when two warps share a key group; 64 bytes of walk state.
/// `csrc/sm80/bwd_gemm.cuh` (`BwdSmem`) computes the same number and every kernel
/// static_asserts that it equals the one the build passes in.
pub const fn sm80_bwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    let elem = dtype.size_in_bytes() as u32;
    let pitch = (head_dim + 8) * elem;
    let s_pitch = (tile.block_m + 8) * elem;
    let warps_per_key_group = tile.warps * sm80_bwd_warp_keys(head_dim, tile) / tile.block_n;
    let score_tiles = if warps_per_key_group > 1 { 2 } else { 1 };
    2 * tile.block_n * pitch
        + 2 * tile.stages * tile.block_m * pitch
        + 2 * tile.stages * tile.block_m * 4
        + score_tiles * tile.block_n * s_pitch
        + 64
}

/// sm90-family (FlashAttention-3 class, sm_90a) forward tiles per head dim, most preferred
/// first. `warps` = 4 (producer warpgroup) + 4 per consumer warpgroup of 64 query rows, so
/// `block_m / 64 = warps / 4 - 1`.
///
/// Reasoning (predictions for H100, then what was measured; figures in docs/perf-log.md):
/// - Registers decide the shape. A consumer thread holds S (`block_n / 2` fp32), P (`block_n /
///   4` b32 while the P.V that reads it runs) and O (`head_dim / 2` fp32). With 2 consumer
///   warpgroups `setmaxnreg` gives them 240 registers (producer 24), with 3 only 160
///   (producer 32). Every tile below compiles with no spills; ptxas leaves ~30-40 registers of
///   fragmentation around the wgmma register blocks, so S + P + O must stay near 200 (2 WGs) or
///   128 (3 WGs).
/// - Shared memory: Q (`block_m x d`) + `stages` x (K + V tiles of `block_n x d`) + barriers +
///   tile slots + 1 KB alignment slack, at most 227 KB (232448 bytes). O goes from registers
///   straight to global memory, so it needs none (and Q is released before the last P.V).
/// - d = 64: 192 x 128, 3 consumer WGs (FA3's tile): exp costs as much as the MMAs at d = 64
///   (64 / d), so three warpgroups keep the MUFU busy while the others' GEMMs run. S + P + O =
///   128 of 160 registers; 192 x 192 would need 176 (FA3 moves P through smem for that one).
///   3 stages because a KV step is short (~0.7 us for all three WGs) against TMA latency.
///   Measured (2026-11-22, 2k-16k): 128 x 128 with 2 WGs is 1-16% slower; computing 1/8 to
///   1/3 of the exponentials on the FMA pipe (FA4's degree-3 polynomial exp2) is 2-15% slower,
///   so the MUFU alone is not what bounds d = 64 here.
/// - d = 80: 128 x 176, 3 stages. The head dim is 5 panels of 16 with a 32-byte swizzle (the
///   only swizzle that tiles 160-byte rows; one TMA box and one P.V wgmma of N = 80).
///   192 x 96 x 4 stages (3 consumer WGs, 154840 bytes) measured 0.94-1.03x of it (H200,
///   2026-12-02, every length, causal and not): not kept. 192 x 128 and 192 x 112 spill.
/// - d = 96: 128 x 176, 3 stages (228536 bytes). 64-byte swizzle, 3 panels of 32. FA3 uses
///   192 x 144 with P through smem; with P in registers 3 WGs x 160 registers do not fit it.
///   Second: 192 x 96, 4 stages, 3 consumer WGs (185560 bytes; S + P + O = 120 registers, no
///   spills; 192 x 112 spills). At d <= 96 the exponentials of a block take about as long as
///   its Q.K^T (the MUFU does 16 per clock, the tensor cores 64 x 96 x 16 per wgmma step), so a
///   third warpgroup gives each one two other turns to hide its softmax behind. Measured (H200,
///   2026-12-02, same-process A/B, two runs each, `--variant 1` vs 0): without a mask +9% / +6%
///   / +1% / +3% at 2k / 4k / 8k / 16k, -1.5% / -1% at 512 / 1k (the 192-row tiles waste a third
///   of the last m-block there); causal -3% to +2.5% (mixed). It runs non-causal calls from 2k
///   keys (`sm90_fwd_variant`).
/// - d = 128: 128 x 192, 2 stages (230552 bytes; S + P + O = 208 registers, no spills with
///   the step descriptors below). It replaced FA3's non-causal tile, 128 x 176 (which an older
///   schedule needed for registers), on 2026-12-03 (H200, bf16, `bench --family sm90 --head-dims
///   128 --variant`, three alternating rounds, best of each): without a mask +2.9% / +3.2% /
///   +4.1% at 2k / 8k / 16k (MHA), +1.9% / +3.4% / +3.4% (GQA 32/8); causal 8k / 16k +2.5% /
///   +2.6% (MHA), +2.3% / +2.9% (GQA), against 128 x 176 with the row-sum tie (softmax.cuh),
///   which made 128 x 192 1-4% slower. The text below measured 128 x 176.
///   FA3's causal tile, 128 x 128 x 2 stages, measured 1-15%
///   slower than 128 x 176 under a causal mask (2k-16k, MHA and GQA, both with the dynamic
///   scheduler), and 128 x 128 x 3 stages 0-5% slower without a mask; at d = 80 / 96 causal,
///   128 x 128 x 3 stages was 5-10% slower. So 128 x 176 serves every mask, except causal calls
///   up to 4k keys, which run 128 x 128 (second; `sm90_fwd_variant`).
///   That second tile has 3 stages since 2026-12-03 (230584 bytes): against 2 stages (H200,
///   bf16, `compare.py --lib --lib-b`, both orders, geometric mean of the two, perf log run
///   12) +1.2% over the 12 cells it serves (causal 512-4k and non-causal 512 / 1k, MHA and
///   GQA 32/8; -0.6% to +3.4%), while the 8 cells it does not serve read 0.999. The same
///   A/B gave d = 64's 192 x 128 a fourth stage: within noise (-0.8% to +0.9%), not kept.
///   Schedule, measured (H200, 2026-12-03, bf16, 16k tokens, `bench --family sm90 --head-dims
///   128 --seqlens 2048,8192`, three interleaved rounds, medians; rounds vary by up to +-3%):
///   wgmma descriptors built once per issue plus a constant per k16 step (`k_major_step`,
///   `mn_major_step`; the turn's issue code shrinks from ~200 to ~120 instructions per warp):
///   non-causal 2k / 8k +1.2% / +3.9% (MHA), +4.1% / +1.6% (GQA 32/8), causal -0.5% to +1.0%;
///   geometric mean +1.4% over the 8 cells. Not kept: passing the ping-pong turn right after
///   the Q.K^T issue (before P.V): -1.7% to +2% against that, mixed; no ping-pong at all: equal
///   without a mask, causal 8k -2.5% (MHA) / -1.6% (GQA). Diagnostic (wrong results): 64 of a
///   thread's 88 exponentials per block replaced by one FFMA each: +10-13% on every cell, so the
///   softmax is on the critical path (SASS: the MUFU takes a warp instruction every 8 cycles,
///   88 x 8 = 704 of the ~1150 statically scheduled cycles from the rescale vote to the next
///   turn; the row-sum FADDs and the P conversion run after the last MUFU, not in its gaps).
///   FlashAttention-4's FMA-pipe exp2 (degree-3 polynomial, 10 SASS instructions per element)
///   for a quarter of the elements fills those gaps but turns the span issue-bound at the same
///   ~780 static cycles (not measured). ncu (d 128 non-causal 8k, this schedule): 1.63 ms at
///   1.73 GHz, issue slots 36% busy, L2 hit rate 95%, DRAM 4%; warp stall samples: wait 40%
///   (MUFU and FMNMX fixed-latency stalls), selected 17%, long scoreboard 10%, dispatch 8%,
///   named barrier (ping-pong turn) 7%.
/// - d = 192: 128 x 112, 2 stages (222360 bytes); 3 stages do not fit.
/// - d = 256: 128 x 80, 2 stages (230552 bytes): O alone is 128 registers. 128 x 64 measured
///   within noise without a mask and 7% slower causal at 8k-16k (3% faster at 2k), and -3% to
///   +1.5% at 512-2k (causal and not). 128 x 64 x 3 stages and 128 x 96 do not fit (256 KB).
///   Causal at 16k runs at ~0.9x the non-causal rate; ncu (H200, 2026-12-02): L2 hit rate 89%,
///   DRAM 6.6% busy, SM throughput 83%, so not memory: visiting the KV blocks in ascending order
///   (tiles starting together then walk the same keys) changed nothing (1.00x over the grid,
///   L2 hit rate 87%), and 16 MB L2 sections instead of 32 were 0.996x (d 256 causal 2k-8k -4
///   to -8%). Neither kept.
/// - d = 64: two consumer WGs with wider KV blocks, 128 x 192 x 3 and 128 x 176 x 3 (spill-free),
///   ran ~15% slower than 192 x 128 (H200, 2026-12-04, `--variant`, ours / cuDNN over 1k / 4k /
///   16k, both masks: 0.913 and 0.939 against 1.064-1.083; perf log run 16). 192 x 144 does not
///   fit: ptxas serialises its wgmmas (C7512) and spills 64 bytes.
/// - d = 64: the second tile, 128 x 128 with 2 consumer WGs, ran causal calls up to 1k keys
///   until the third, 192 x 128's lead kernel ([`Tile::lead`]), took every causal call.
/// - d = 256: the second tile is the first one's lead kernel, for causal calls.
/// - d = 80 / 96: the last tile, 128 x 128 x 3 stages, runs causal calls up to 2k keys.
/// - Index 0 of every list is the general tile; `sm90_fwd_variant` says when another one runs.
pub const fn sm90_fwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 => &[
            tile!(192, 128, 16, 3),
            tile!(128, 128, 12, 3),
            tile!(192, 128, 16, 3, lead),
        ],
        80 => &[tile!(128, 176, 12, 3), tile!(128, 128, 12, 3)],
        96 => &[tile!(128, 176, 12, 3), tile!(192, 96, 16, 4), tile!(128, 128, 12, 3)],
        128 => &[tile!(128, 192, 12, 2), tile!(128, 128, 12, 3)],
        192 => &[tile!(128, 112, 12, 2)],
        256 => &[tile!(128, 80, 12, 2), tile!(128, 80, 12, 2, lead)],
        _ => &[],
    }
}

/// The sm90-family tile compiled a second time as the split-KV kernel (`_split`): the tile of
/// `sm90_fwd_tiles(head_dim)` with the fewest query rows (split calls are decode steps and short
/// chunks, whose rows are few: d = 64 runs 128 x 128 rather than 192 x 128), the first of them.
/// The dense kernels do not take the split as a run-time parameter: the test and divide it adds
/// at each tile's start cost d = 64 ~6% at 2k-8k (H200, 2026-12-03, two alternating rounds).
pub const fn sm90_fwd_split_tile(head_dim: u32) -> Option<Tile> {
    let tiles = sm90_fwd_tiles(head_dim);
    if tiles.is_empty() {
        return None;
    }
    // Index 0 is never a lead kernel; a split kernel is not compiled as one.
    let mut best = 0;
    let mut i = 1;
    while i < tiles.len() {
        if !tiles[i].lead && tiles[i].block_m < tiles[best].block_m {
            best = i;
        }
        i += 1;
    }
    Some(tiles[best])
}

/// The tile of `sm90_fwd_tiles(head_dim)` (an index into it) that a forward call runs when no
/// variant is forced, given its key count (the longest sequence for varlen) and whether it has
/// a causal mask. Index 0 is the general tile; index 1, where it exists, is a narrower tile for
/// short causal calls, where a wide KV block on the diagonal is mostly masked (d = 128 at 512
/// keys: 9 blocks of 128 x 176, 65% of them visible, against 10 of 128 x 128, 80% visible), and
/// at d = 128 for short calls without a mask too (512 keys fill 3 blocks of 192 to 89%, 4 of 128
/// whole), or at d = 96 the 3-warpgroup tile for long calls without a mask.
///
/// Measured on H100 (2026-11-22, bf16, paper grid, runs of the whole grid in one session):
/// - d = 128, 128 x 128 vs 128 x 176, causal: +19% / +14% / +5% at 512 / 1k / 2k (MHA),
///   +17% / +10% / +4% (GQA 32/8); slower from 4k on. Without a mask: within noise at 512-1k
///   for MHA, 10% slower at 2k for GQA.
/// - d = 64, 128 x 128 (2 consumer WGs) vs 192 x 128, causal: +9% / +12% at 512 / 1k, -8% at 2k;
///   without a mask 3-10% slower at every length (the 3-WG tile keeps the MUFU busier).
///
/// Re-measured on H200 (2026-12-02, same-process A/B, `--variant`; with KV blocks visited in
/// ascending order, since reverted): d = 128 causal, 128 x 128 vs 128 x 176: +16% / +14% / +8%
/// / +5% at 512 / 1k / 2k / 4k (MHA; GQA +14% / +10% / +3% / +0.5%), -0.5% / -3% at 8k / 16k,
/// so the narrow tile now serves causal calls up to 4k keys; d = 64 causal, 128 x 128: +7% / +11% at 512 / 1k, -3%
/// to -11% from 2k (the rule below holds).
/// - d = 128 without a mask, 128 x 128 vs 128 x 192 (H200, 2026-12-03, three alternating
///   rounds, best of each): +4.9% / +1.2% at 512 / 1k keys (MHA), +2.1% / +0.7% (GQA 32/8), so
///   calls up to 1k keys run the narrow tile too. At d = 64 the same swap cost 8% at 512 / 1k.
///   Extending it to 4k keys (128 x 128 x 3 against 128 x 192, same-process A/B in both orders,
///   H200, 2026-12-03, perf log run 12): 2k / 4k 0.990 / 0.976 (MHA), 0.995 / 0.972 (GQA), so
///   the bound stays at 1k.
/// - d = 80 / 96 causal, 128 x 128 x 3 vs 128 x 176 (H200, 2026-12-03, same-process A/B of two
///   builds, `compare.py --lib-b`, median of three rounds): +14% / +13% at 512 / 1k keys (d = 80),
///   +17% / +14% (d = 96); an older measurement had it 5-10% slower from 2k keys.
/// - d = 96, 192 x 96 (3 consumer WGs) without a mask from 2k keys: see `sm90_fwd_tiles`.
/// - Lead kernels ([`Tile::lead`]) for causal calls (H200, 2026-12-03, `compare.py --lib
///   --lib-b`, two same-process A/Bs of main and the lead build in both orders, geometric mean
///   of the two b/a ratios; the unchanged kernels of the same runs read 0.999): d = 64, the
///   192 x 128 lead kernel against the former choice (128 x 128 up to 1k keys, 192 x 128 from
///   2k) +8.7% / +7.3% / +2.4% / +0.3% / -1.0% at 512 / 1k / 2k / 4k / 16k keys; d = 256
///   +4.7% / +1.1% / +2.7% / +1.4% / +1.0%. Not taken (an earlier A/B with the pass compiled
///   into every kernel): d = 128 128 x 192 (causal 16k -2%; up to 4k keys 128 x 128 runs,
///   where the pass never applies), d = 80 128 x 176 (-0.3% to +1.8%). Compiled as lead
///   kernels in a side build (`bench --variant`, two alternating rounds, causal): d = 128 128 x
///   192 -1% / -2% at 8k / 16k (MHA and GQA 32/8); d = 80 128 x 176 -0.6% / +0.5% / +1.0% at
///   2k / 4k / 8k; d = 96 128 x 176 +2.2% / +1.5% / -2.5%. None taken.
/// - d = 80 / 96 causal at 2k keys, 128 x 128 x 3 against 128 x 176 (same side build): +3.7% /
///   +2.7% (381.0 against 367.3, 425.4 against 414.1 TFLOP/s); at 4k -0.9% / -1.7%. So 128 x
///   128 serves causal calls up to 2k keys.
pub const fn sm90_fwd_variant(head_dim: u32, seqlen_k: usize, causal: bool) -> usize {
    match head_dim {
        128 if causal && seqlen_k <= 4096 => 1,
        128 if !causal && seqlen_k <= 1024 => 1,
        64 if causal => 2,
        96 if !causal && seqlen_k >= 2048 => 1,
        80 if causal && seqlen_k <= 2048 => 1,
        96 if causal && seqlen_k <= 2048 => 2,
        256 if causal => 1,
        _ => 0,
    }
}

/// Shared memory of an sm90-family forward tile, in bytes (dynamic; the kernel aligns its base
/// to 1024 itself). `csrc/sm90/layout.cuh` (`SharedLayout`) computes the same number and every
/// kernel static_asserts that it equals the one the build passes in:
/// - Q: `block_m / 64` slabs of 64 rows x `head_dim`, each rounded up to 1024 bytes (the swizzle
///   period; the epilogue stores O from registers, not through these slabs);
/// - K and V: `stages` tiles each of `block_n` rows x `head_dim`, rounded up to 1024 bytes;
/// - `7 + 4 * stages` mbarriers of 8 bytes and 2 tile slots of 16 bytes (a decoded tile
///   coordinate each, `TileFeed` in csrc/sm90/pipeline.cuh);
/// - 1024 bytes of slack for aligning the base.
pub const fn sm90_fwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    const fn round_up_1k(x: u32) -> u32 {
        x.div_ceil(1024) * 1024
    }
    let row_bytes = head_dim * dtype.size_in_bytes() as u32;
    let q_slabs = tile.block_m / 64;
    let q = q_slabs * round_up_1k(64 * row_bytes);
    let kv = 2 * tile.stages * round_up_1k(tile.block_n * row_bytes);
    let barriers = (7 + 4 * tile.stages) * 8;
    let tile_slots = 2 * 16;
    q + kv + barriers + tile_slots + 1024
}

/// Head dims of the sm90-family (FlashAttention-3 class) backward: all of them, both modes
/// (deterministic mode's kernels are a second image of each cell, `Cell::det_instantiate_macro`).
///
/// How each fits: csrc/sm90/bwd.cuh (d <= 128) gives each warpgroup 64 keys, so it holds dK +
/// dV (`head_dim` registers per thread) besides S^T / dP^T (64); d = 192 / 256 run
/// csrc/sm90/bwd_wide.cuh, whose warpgroups split S^T / dP^T by queries and dV / dK / dQ by
/// head-dim halves. Where half the head dim is not whole swizzle panels (d = 64, 80, 96, 192),
/// a warpgroup's columns are two wgmma chunks (`BwdHalfCols`), each addressable as an MN-major
/// operand.
pub const SM90_BWD_HEAD_DIMS: [u32; 6] = [64, 80, 96, 128, 192, 256];

/// sm90-family backward tiles, one per head dim (csrc/sm90/bwd.cuh, bwd_wide.cuh):
/// - d <= 128: 64 query rows per step x 128 keys per thread block, two warpgroups of 64 keys
///   each (8 warps, 1 CTA per SM: 254 registers at d = 128, 226 at d = 96, 214 at d = 80, 192 at
///   d = 64; no spills), 3 Q / dO stages.
/// - d = 192, 256 ("wide"): 64 x 64 keys, two warpgroups that split the step's queries for S^T /
///   dP^T and the head dim for dV / dK / dQ; P^T and dS^T go through shared memory (two buffers
///   each); 2 stages (the most that fit 227 KB at d = 256: 226 KB); 220 registers at d = 256,
///   179 at d = 192.
///
/// Launch order of causal calls (`bwd_block_sm90`): with at most 512 key blocks per head, heads
/// are taken in groups of about 264 thread blocks (or one head), key-block-major inside a group,
/// so that every key block of a head adds its dQ into that head's dq_accum rows while they are
/// in L2 (perf log run 14: with the limit at 32 key blocks, +9.1% over d 64 / 128 / 256 / GQA at
/// 512-4k keys, both masks: causal d 256 1k +63%, d 128 2k +31%, non-causal unchanged; the limit
/// at 512: +1.6% more over d 128 / 256 / GQA at 8k / 16k, causal cells +2-5%).
///
/// Measured (H200, bf16, `compare.py --lib A --lib-b B --bwd --head-dims 64,128 --seqlens
/// 1024,4096,16384`, both orders, geometric mean of the two; perf log run 13), the d <= 128 tile:
/// - First version (two CTA-wide syncs per step, one dS^T buffer, loads at the top of the step,
///   2 stages): 1.47x FA2, 0.93x cuDNN over those 18 cells.
/// - One sync per step (the one before dQ), two dS^T buffers, the next loads issued right after
///   that sync: +7.8% (on a version that was itself 2.6% behind the first); with it, the first
///   version's code: another +1.0% (d = 128 +2-3% from 4k keys). That is the kernel: about +6%
///   over the first version in all.
/// - 3 stages instead of 2 (loads at the top of the step): 1.00.
/// - Not kept: walk cursors instead of the per-step divisions, with dV issued as soon as P^T is
///   packed (d = 64): -2.6% (d = 128 -4%, ptxas at 255 registers; d = 64 +1%). Issuing the next
///   step's S^T / dP^T before this step's dQ completes: d = 128 spills 176-268 bytes and ptxas
///   serialised every wgmma of the d = 64 kernel (C7514 / C7515) in each order tried. The
///   forward's cheaper causal mask (one limit per query column, when there is no left bound):
///   1.000 over d = 128 MHA + GQA at 512-4k keys (16 cells), so the short causal calls (0.75-0.82x
///   cuDNN at d = 128, 512-2k keys) do not lose in the masked steps' element code; their gap
///   was the launch order's L2 misses on dq_accum (the grouped order above, run 14).
/// - Deterministic mode (`_main_det`, run 14 calls 6-7): 0.95x FA2, 0.59x of the default. In the
///   default kernels' translation unit it made ptxas allocate the default d 80 / 96 / 128 kernels
///   differently (identical PTX up to register numbering; d 128 255 registers + 24 bytes of
///   stack): -2.1% on their default calls. So it has a translation unit and image of its own
///   (the default kernels' SASS is then identical to the tested one's).
pub const fn sm90_bwd_tiles(head_dim: u32) -> &'static [Tile] {
    match head_dim {
        64 | 80 | 96 | 128 => &[tile!(64, 128, 8, 3)],
        192 | 256 => &[tile!(64, 64, 8, 2)],
        _ => &[],
    }
}

/// Shared memory of an sm90-family backward tile (`BwdLayout` in csrc/sm90/bwd.cuh, which
/// static_asserts the same number; `BwdWideLayout` in csrc/sm90/bwd_wide.cuh for `block_n` = 64):
/// K and V (`block_n` rows), `stages` x (Q and dO, `block_m` rows), two dS^T tiles (`block_n` x
/// `block_m`; the wide tile also two P^T tiles), `stages` x 2 x `block_m` fp32 statistics,
/// `1 + stages` mbarriers, 1024 bytes of alignment slack; tiles rounded to 1024 bytes.
pub const fn sm90_bwd_smem_bytes(head_dim: u32, dtype: DType, tile: &Tile) -> u32 {
    const fn round_up_1k(x: u32) -> u32 {
        x.div_ceil(1024) * 1024
    }
    let elem = dtype.size_in_bytes() as u32;
    let row_bytes = head_dim * elem;
    let kv = 2 * round_up_1k(tile.block_n * row_bytes);
    let q_do = 2 * tile.stages * round_up_1k(tile.block_m * row_bytes);
    // dS^T x 2; the wide tile (64 keys, csrc/sm90/bwd_wide.cuh) also P^T x 2.
    let ds_tiles = if tile.block_n == 64 { 4 } else { 2 };
    let ds = ds_tiles * round_up_1k(tile.block_n * tile.block_m * elem);
    let stats = tile.stages * 2 * tile.block_m * 4;
    kv + q_do + ds + stats + (1 + tile.stages) * 8 + 1024
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
    // The state merge (16-bit; a forward-pass operation).
    for dtype in [DType::F16, DType::Bf16] {
        cells.push(Cell {
            family: Family::Merge,
            direction: Direction::Fwd,
            dtype,
            head_dim: 0,
        });
    }
    // The sm80-family backward (16-bit only).
    for dtype in [DType::F16, DType::Bf16] {
        for head_dim in HEAD_DIMS {
            cells.push(Cell {
                family: Family::Sm80,
                direction: Direction::Bwd,
                dtype,
                head_dim,
            });
        }
    }
    // The sm90-family backward (16-bit, SM90_BWD_HEAD_DIMS).
    for dtype in [DType::F16, DType::Bf16] {
        for head_dim in SM90_BWD_HEAD_DIMS {
            cells.push(Cell {
                family: Family::Sm90,
                direction: Direction::Bwd,
                dtype,
                head_dim,
            });
        }
    }
    cells
}
