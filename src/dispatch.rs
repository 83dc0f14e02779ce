//! Request keys, their validation and canonicalisation to compiled cells, and the dispatch table.
//!
//! A [`DispatchKey`] describes a request the way a caller thinks of it (arch, dtype, head dim,
//! causal, varlen, window, ALiBi, sink tokens, paged, GQA ratio). Only some of that changes a
//! kernel's shape; the rest is run-time data. [`DispatchTable::lookup`] canonicalises the key to a
//! [`Cell`] (family, direction, dtype, head dim), finds the embedded image that holds it and says
//! which kernel serves the key, including when an H100 request is routed from the sm90 family to
//! the sm80 family because the sm90 family lacks the cell.

use crate::cells::{Cell, DType, Direction, Family, HEAD_DIMS, Target};
use crate::error::{Error, Result};
use crate::kernels::{BUILD_KNOBS, CELL_INDEX, CellImage, IMAGES};

/// GPU architecture class, as far as kernel choice is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SmArch {
    /// sm_80, sm_86, sm_87 (A100, A10, RTX 30xx, Orin): sm80 family.
    Sm80,
    /// sm_89 (L4, L40, RTX 40xx): sm80 family, 99 KB shared memory.
    Sm89,
    /// sm_90 (H100, H200): sm90 family, sm80 family where the sm90 family lacks a cell.
    Sm90a,
    /// sm_100 and newer (B200, RTX 50xx, ...): sm80 family through compute_80 PTX and the driver JIT.
    Sm100,
}

impl SmArch {
    /// The arch class of a device with this compute capability.
    pub fn from_compute_capability(major: i32, minor: i32) -> Result<SmArch> {
        match (major, minor) {
            (8, 9) => Ok(SmArch::Sm89),
            (8, _) => Ok(SmArch::Sm80),
            (9, 0) => Ok(SmArch::Sm90a),
            (m, _) if m >= 10 => Ok(SmArch::Sm100),
            _ => Err(Error::UnsupportedDevice {
                major,
                minor,
                reason: "the kernels need compute capability 8.0 or newer",
            }),
        }
    }

    /// The families that can serve this arch, preferred first.
    pub const fn families(self) -> &'static [Family] {
        match self {
            SmArch::Sm90a => &[Family::Sm90, Family::Sm80],
            _ => &[Family::Sm80],
        }
    }

    /// The SASS target a cell of `family` needs on this arch (None: only PTX can serve it).
    pub const fn sass_target(self, family: Family) -> Option<Target> {
        match (self, family) {
            (SmArch::Sm80 | SmArch::Sm89, Family::Sm80 | Family::Reference | Family::Merge) => Some(Target::Sm80),
            (SmArch::Sm90a, Family::Sm80 | Family::Reference | Family::Merge) => Some(Target::Sm90),
            (SmArch::Sm90a, Family::Sm90) => Some(Target::Sm90a),
            _ => None,
        }
    }

    const fn code(self) -> u8 {
        match self {
            SmArch::Sm80 => 0,
            SmArch::Sm89 => 1,
            SmArch::Sm90a => 2,
            SmArch::Sm100 => 3,
        }
    }

    const fn tag(self) -> &'static str {
        match self {
            SmArch::Sm80 => "sm80",
            SmArch::Sm89 => "sm89",
            SmArch::Sm90a => "sm90a",
            SmArch::Sm100 => "sm100",
        }
    }
}

const fn dtype_code(d: DType) -> u8 {
    match d {
        DType::F16 => 0,
        DType::Bf16 => 1,
        DType::F8E4m3 => 2,
        DType::F8E5m2 => 3,
    }
}

/// A request as the caller sees it. Canonicalised to a compiled [`Cell`] by [`DispatchTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DispatchKey {
    /// Device arch class.
    pub arch: SmArch,
    /// Element type of Q, K, V.
    pub dtype: DType,
    /// Head dim.
    pub head_dim: u32,
    /// Causal mask (either alignment).
    pub causal: bool,
    /// Variable-length batch (cu_seqlens).
    pub varlen: bool,
    /// Sliding window size (left bound), if any.
    pub sliding_window: Option<u32>,
    /// ALiBi slopes present.
    pub alibi: bool,
    /// StreamingLLM sink token count (first `sink` keys always visible); 0 = none.
    pub sink: u32,
    /// Paged KV cache.
    pub paged: bool,
    /// Query heads per key/value head (1 = MHA).
    pub gqa_ratio: u32,
}

impl DispatchKey {
    /// A plain key: no mask, dense, MHA.
    pub const fn new(arch: SmArch, dtype: DType, head_dim: u32) -> DispatchKey {
        DispatchKey {
            arch,
            dtype,
            head_dim,
            causal: false,
            varlen: false,
            sliding_window: None,
            alibi: false,
            sink: 0,
            paged: false,
            gqa_ratio: 1,
        }
    }

    fn validate_common(&self, direction: Direction) -> Result<()> {
        if !HEAD_DIMS.contains(&self.head_dim) {
            return Err(Error::UnsupportedHeadDim {
                head_dim: self.head_dim,
                supported: "64, 80, 96, 128, 192, 256",
            });
        }
        if self.dtype.is_fp8() && !matches!(self.arch, SmArch::Sm90a | SmArch::Sm100) {
            return Err(Error::UnsupportedDType {
                dtype: self.dtype,
                direction,
                arch: self.arch,
                reason: "fp8 needs sm_90a or newer",
            });
        }
        if self.gqa_ratio == 0 {
            return Err(Error::InvalidArgument("gqa_ratio must be >= 1".into()));
        }
        if self.sliding_window == Some(0) {
            return Err(Error::InvalidArgument(
                "sliding_window must be > 0 (None = unbounded)".into(),
            ));
        }
        if self.sink > 0 && !self.causal && self.sliding_window.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{} sink tokens need a causal mask or a sliding window to be exempt from",
                self.sink
            )));
        }
        Ok(())
    }

    /// Validates a forward request.
    pub fn validate_fwd(&self) -> Result<()> {
        self.validate_common(Direction::Fwd)
    }

    /// Validates a backward request: the forward rules, no fp8, no paged KV.
    pub fn validate_bwd(&self) -> Result<()> {
        self.validate_common(Direction::Bwd)?;
        if self.dtype.is_fp8() {
            return Err(Error::UnsupportedDType {
                dtype: self.dtype,
                direction: Direction::Bwd,
                arch: self.arch,
                reason: "the backward pass is fp16/bf16 only",
            });
        }
        if self.paged {
            return Err(Error::InvalidArgument(
                "the backward pass does not take a paged KV cache".into(),
            ));
        }
        Ok(())
    }

    /// Validates a request for the paged-KV entry points: the forward rules, and `paged` set.
    pub fn validate_paged(&self) -> Result<()> {
        self.validate_fwd()?;
        if !self.paged {
            return Err(Error::InvalidArgument(
                "the paged-KV path needs a key with paged = true".into(),
            ));
        }
        Ok(())
    }

    /// A readable name of the whole request, e.g. `flash_sm90a_bf16_hd128_causal_gqa4` (for logs;
    /// the kernel that serves it is [`KernelRef::symbol_prefix`]).
    pub fn kernel_name(&self) -> String {
        let mut s = format!("flash_{}_{}_hd{}", self.arch.tag(), self.dtype.tag(), self.head_dim);
        if self.causal {
            s.push_str("_causal");
        }
        if self.varlen {
            s.push_str("_varlen");
        }
        if let Some(w) = self.sliding_window {
            s.push_str(&format!("_window{w}"));
        }
        if self.alibi {
            s.push_str("_alibi");
        }
        if self.sink > 0 {
            s.push_str(&format!("_sink{}", self.sink));
        }
        if self.paged {
            s.push_str("_paged");
        }
        if self.gqa_ratio != 1 {
            s.push_str(&format!("_gqa{}", self.gqa_ratio));
        }
        s
    }

    /// The 24-byte encoding hashed by [`DispatchKey::stable_hash`]:
    ///
    /// | bytes | field |
    /// | --- | --- |
    /// | 0 | encoding version, 1 |
    /// | 1 | arch: Sm80 0, Sm89 1, Sm90a 2, Sm100 3 |
    /// | 2 | dtype: F16 0, Bf16 1, F8E4m3 2, F8E5m2 3 |
    /// | 3..7 | head_dim, u32 little-endian |
    /// | 7 | causal (0/1) |
    /// | 8 | varlen (0/1) |
    /// | 9 | sliding window present (0/1) |
    /// | 10..14 | sliding window, u32 LE (0 when absent) |
    /// | 14 | alibi (0/1) |
    /// | 15..19 | sink, u32 LE |
    /// | 19 | paged (0/1) |
    /// | 20..24 | gqa_ratio, u32 LE |
    pub fn stable_encoding(&self) -> [u8; 24] {
        let mut b = [0u8; 24];
        b[0] = 1;
        b[1] = self.arch.code();
        b[2] = dtype_code(self.dtype);
        b[3..7].copy_from_slice(&self.head_dim.to_le_bytes());
        b[7] = self.causal as u8;
        b[8] = self.varlen as u8;
        b[9] = self.sliding_window.is_some() as u8;
        b[10..14].copy_from_slice(&self.sliding_window.unwrap_or(0).to_le_bytes());
        b[14] = self.alibi as u8;
        b[15..19].copy_from_slice(&self.sink.to_le_bytes());
        b[19] = self.paged as u8;
        b[20..24].copy_from_slice(&self.gqa_ratio.to_le_bytes());
        b
    }

    /// FNV-1a 64 of [`DispatchKey::stable_encoding`]: the same on every platform, Rust release and
    /// crate build (pinned by test vectors), so it can key on-disk caches or logs.
    pub fn stable_hash(&self) -> u64 {
        fnv1a64(&self.stable_encoding())
    }

    /// The cell of `family` and `direction` this key canonicalises to.
    pub fn cell(&self, family: Family, direction: Direction) -> Cell {
        Cell {
            family,
            direction,
            dtype: self.dtype,
            head_dim: self.head_dim,
        }
    }
}

/// FNV-1a, 64-bit (offset basis 0xcbf29ce484222325, prime 0x100000001b3).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Which embedded kernel serves a request.
#[derive(Clone, Copy, Debug)]
pub struct KernelRef {
    /// The compiled cell.
    pub image: &'static CellImage,
    /// Index of the image in the table (dense, for per-context module caches).
    pub index: usize,
    /// Set when the key's preferred family lacks the cell and another family serves it (e.g. an
    /// H100 request served by the sm80 family): the family that was skipped.
    pub routed_from: Option<Family>,
    /// True when the device runs the cell's compute_80 PTX through the driver JIT.
    pub jit_ptx: bool,
}

impl KernelRef {
    /// The cell that serves the request.
    pub fn cell(&self) -> Cell {
        self.image.cell
    }

    /// The cell key, e.g. `sm80.fwd.bf16.hd128`.
    pub fn key(&self) -> &'static str {
        self.image.key
    }

    /// The first (most preferred) kernel symbol of the cell.
    pub fn symbol_prefix(&self) -> &'static str {
        self.image.kernels.first().map(|k| k.symbol).unwrap_or(self.image.key)
    }
}

/// Which families support a request's features at all (independent of what was compiled).
fn family_supports(family: Family, key: &DispatchKey, direction: Direction) -> bool {
    match family {
        Family::Reference | Family::Merge => false,
        // The sm80 family: 16-bit forward (dense, varlen, paged KV) and backward; no fp8 path.
        Family::Sm80 => (!key.paged || direction == Direction::Fwd) && !key.dtype.is_fp8(),
        // The sm90 family: 16-bit forward, no paged KV yet; the backward at the head dims of
        // `SM90_BWD_HEAD_DIMS` (the others run the sm80 family's backward).
        Family::Sm90 => {
            !key.paged
                && !key.dtype.is_fp8()
                && (direction == Direction::Fwd || crate::cells::SM90_BWD_HEAD_DIMS.contains(&key.head_dim))
        }
    }
}

/// The table of compiled cells, generated by the build.
pub struct DispatchTable {
    images: &'static [CellImage],
}

/// The crate's dispatch table.
pub static DISPATCH_TABLE: DispatchTable = DispatchTable { images: IMAGES };

impl DispatchTable {
    /// Number of compiled cells.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// True when no kernel was compiled (documentation builds).
    pub fn is_empty(&self) -> bool {
        self.images.is_empty()
    }

    /// Every compiled cell, in key order.
    pub fn cells(&self) -> impl Iterator<Item = &'static CellImage> + use<> {
        self.images.iter()
    }

    /// The compiled image of exactly this cell, if any.
    pub fn get(&self, cell: &Cell) -> Option<(usize, &'static CellImage)> {
        let index = *CELL_INDEX.get(cell.key().as_str())?;
        Some((index, &self.images[index]))
    }

    /// Resolves a forward request to the kernel that serves it, routing across families where the
    /// preferred one lacks the cell (visible in [`KernelRef::routed_from`]).
    pub fn lookup(&self, key: &DispatchKey) -> Result<KernelRef> {
        self.resolve(key, Direction::Fwd, false)
    }

    /// Like [`DispatchTable::lookup`] for a backward request (both modes: a cell's deterministic
    /// mode is a second main kernel in the same image).
    pub fn lookup_bwd(&self, key: &DispatchKey) -> Result<KernelRef> {
        self.resolve(key, Direction::Bwd, false)
    }

    /// Like [`DispatchTable::lookup`] but never routes to another family: only the key's
    /// preferred family (sm90 for `Sm90a`, sm80 otherwise) may serve it.
    pub fn strict_lookup(&self, key: &DispatchKey) -> Result<KernelRef> {
        self.resolve(key, Direction::Fwd, true)
    }

    /// Resolves `key` for `direction` with exactly `family` (tests force paths with this).
    pub fn lookup_family(&self, key: &DispatchKey, direction: Direction, family: Family) -> Result<KernelRef> {
        match direction {
            Direction::Fwd => key.validate_fwd()?,
            Direction::Bwd => key.validate_bwd()?,
        }
        if !family_supports(family, key, direction) {
            return Err(Error::NoKernel {
                what: format!("{} ({direction:?}) in the {} family", key.kernel_name(), family.tag()),
            });
        }
        let cell = key.cell(family, direction);
        let (index, image, jit_ptx) = self
            .serve(&cell, key.arch)
            .ok_or_else(|| not_compiled(&cell, key.arch))?;
        let preferred = key.arch.families()[0];
        Ok(KernelRef {
            image,
            index,
            routed_from: (family != preferred).then_some(preferred),
            jit_ptx,
        })
    }

    /// Resolves `key` for `direction`. `strict` forbids routing to a non-preferred family.
    pub fn resolve(&self, key: &DispatchKey, direction: Direction, strict: bool) -> Result<KernelRef> {
        match direction {
            Direction::Fwd => key.validate_fwd()?,
            Direction::Bwd => key.validate_bwd()?,
        }
        let families = key.arch.families();
        let preferred = families[0];
        let mut missing: Option<Cell> = None;
        for (i, &family) in families.iter().enumerate() {
            if strict && i > 0 {
                break;
            }
            if !family_supports(family, key, direction) {
                continue;
            }
            let cell = key.cell(family, direction);
            match self.serve(&cell, key.arch) {
                Some((index, image, jit_ptx)) => {
                    return Ok(KernelRef {
                        image,
                        index,
                        routed_from: (i > 0).then_some(preferred),
                        jit_ptx,
                    });
                }
                None => {
                    missing.get_or_insert(cell);
                }
            }
        }
        match missing {
            Some(cell) => Err(not_compiled(&cell, key.arch)),
            None => Err(Error::NoKernel {
                what: format!("{} ({direction:?})", key.kernel_name()),
            }),
        }
    }

    /// The image of `cell` and whether it must be JIT-compiled from PTX on `arch`, if it can run
    /// there at all.
    pub(crate) fn serve(&self, cell: &Cell, arch: SmArch) -> Option<(usize, &'static CellImage, bool)> {
        let (index, image) = self.get(cell)?;
        match arch.sass_target(cell.family) {
            Some(t) if image.targets.contains(&t) => Some((index, image, false)),
            _ if image.ptx.is_some() && cell.family != Family::Sm90 => Some((index, image, true)),
            _ => None,
        }
    }
}

/// The error for a whitelisted cell that this build left out, with the knobs that enable it.
pub(crate) fn not_compiled(cell: &Cell, arch: SmArch) -> Error {
    let target = match arch.sass_target(cell.family) {
        Some(t) => format!("FLASHATTN_AOT_ARCHS including `{}`", t.tag()),
        None => "the `ptx-jit` feature".to_string(),
    };
    let mut needs = vec![format!("FLASHATTN_AOT_FAMILIES including `{}`", cell.family.tag())];
    if cell.family.per_head_dim() {
        needs.push(format!("FLASHATTN_AOT_HEAD_DIMS including `{}`", cell.head_dim));
    }
    needs.push(format!("FLASHATTN_AOT_DTYPES including `{}`", cell.dtype.tag()));
    needs.push(format!("FLASHATTN_AOT_DIRECTIONS including `{}`", cell.direction.tag()));
    needs.push(target);
    Error::CellNotCompiled {
        cell: cell.key(),
        knobs: BUILD_KNOBS,
        hint: format!("rebuild with {} (an unset knob builds everything)", needs.join(", ")),
    }
}

/// Resolves a forward request with [`DISPATCH_TABLE`].
pub fn lookup(key: &DispatchKey) -> Result<KernelRef> {
    DISPATCH_TABLE.lookup(key)
}

/// Resolves a forward request with [`DISPATCH_TABLE`], without routing across families.
pub fn strict_lookup(key: &DispatchKey) -> Result<KernelRef> {
    DISPATCH_TABLE.strict_lookup(key)
}

/// Every compiled cell (the build manifest as data).
pub fn compiled_cells() -> impl Iterator<Item = &'static CellImage> {
    DISPATCH_TABLE.cells()
}
