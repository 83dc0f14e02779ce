//! Options of an attention call: mask, scale, softcap, ALiBi, sinks, and test overrides.
//! Semantics of each: docs/semantics.md.

use crate::cells::Family;
use cudarc::driver::DevicePtr;
use std::fmt;

/// Where the diagonal of a causal mask (and of window bounds and ALiBi distances) sits when
/// `seqlen_q != seqlen_k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CausalAlign {
    /// Query `i` sits at key position `i + seqlen_k - seqlen_q` (FlashAttention's convention: the
    /// last query sees every key).
    #[default]
    BottomRight,
    /// Query `i` sits at key position `i` (PyTorch's `is_causal`).
    TopLeft,
}

/// Which keys each query sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mask {
    /// Every key.
    #[default]
    None,
    /// Keys at or before the query's diagonal position.
    Causal(CausalAlign),
    /// Keys within `left` before and `right` after the query's diagonal position (both bounds
    /// inclusive; `None` = unbounded). `Window { left: None, right: Some(0), .. }` is causal.
    Window {
        /// Keys visible before the diagonal; `None` = all.
        left: Option<u32>,
        /// Keys visible after the diagonal; `None` = all.
        right: Option<u32>,
        /// Diagonal alignment.
        align: CausalAlign,
    },
}

impl Mask {
    /// `(left, right, align)` with `None` for unbounded.
    pub fn bounds(&self) -> (Option<u32>, Option<u32>, CausalAlign) {
        match *self {
            Mask::None => (None, None, CausalAlign::BottomRight),
            Mask::Causal(align) => (None, Some(0), align),
            Mask::Window { left, right, align } => (left, right, align),
        }
    }

    /// Whether the right bound is the diagonal (causal).
    pub fn is_causal(&self) -> bool {
        self.bounds().1 == Some(0)
    }
}

/// ALiBi slopes: fp32 device buffers.
#[derive(Clone, Copy)]
pub enum Alibi<'a> {
    /// One slope per query head: `(heads,)`.
    PerHead(&'a dyn DevicePtr<f32>),
    /// One slope per batch entry and query head: `(batch, heads)`.
    PerBatchHead(&'a dyn DevicePtr<f32>),
}

impl fmt::Debug for Alibi<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alibi::PerHead(s) => write!(f, "Alibi::PerHead(len {})", s.len()),
            Alibi::PerBatchHead(s) => write!(f, "Alibi::PerBatchHead(len {})", s.len()),
        }
    }
}

/// Test and diagnosis overrides: force a code path that the device would not choose by itself.
/// Only H100s are at hand in this project's CI of GPU tests, so every path (the sm80 family on
/// sm_90, the 99 KB tiles of sm_86/89, the compute_80 PTX through the driver JIT) must be
/// reachable on them. Not needed in normal use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOverride {
    /// Use this family (it must serve the request on this device).
    pub family: Option<Family>,
    /// Pretend the device's opt-in shared memory limit is this many bytes (only lowers it).
    pub smem_limit: Option<u32>,
    /// Load the compute_80 PTX image through the driver JIT instead of the SASS.
    pub force_ptx: bool,
    /// Use this tile variant (index into the cell's kernel list, see [`crate::CellImage::kernels`])
    /// instead of the first that fits; it must still fit the shared memory limit.
    pub variant: Option<usize>,
}

/// Options of a forward call. Build with [`FwdOptions::new`] and the setters.
#[derive(Clone, Copy, Default)]
pub struct FwdOptions<'a> {
    pub(crate) softmax_scale: Option<f32>,
    pub(crate) mask: Mask,
    pub(crate) sink_tokens: u32,
    pub(crate) sink_logits: Option<&'a dyn DevicePtr<f32>>,
    pub(crate) alibi: Option<Alibi<'a>>,
    pub(crate) softcap: Option<f32>,
    pub(crate) num_splits: u32,
    pub(crate) kernel_override: KernelOverride,
}

impl fmt::Debug for FwdOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FwdOptions")
            .field("softmax_scale", &self.softmax_scale)
            .field("mask", &self.mask)
            .field("sink_tokens", &self.sink_tokens)
            .field("sink_logits", &self.sink_logits.map(|s| s.len()))
            .field("alibi", &self.alibi)
            .field("softcap", &self.softcap)
            .field("num_splits", &self.num_splits)
            .field("kernel_override", &self.kernel_override)
            .finish()
    }
}

impl<'a> FwdOptions<'a> {
    /// No mask, scale `1/sqrt(head_dim)`, nothing else.
    pub fn new() -> Self {
        Self::default()
    }

    /// Softmax scale applied to `q.k` (default `1/sqrt(head_dim)`); must be finite and > 0.
    pub fn softmax_scale(mut self, scale: f32) -> Self {
        self.softmax_scale = Some(scale);
        self
    }

    /// The mask.
    pub fn mask(mut self, mask: Mask) -> Self {
        self.mask = mask;
        self
    }

    /// Causal mask with this alignment.
    pub fn causal(self, align: CausalAlign) -> Self {
        self.mask(Mask::Causal(align))
    }

    /// Sliding window `(left, right)`, inclusive, `None` = unbounded, bottom-right aligned.
    pub fn window(self, left: Option<u32>, right: Option<u32>) -> Self {
        self.mask(Mask::Window {
            left,
            right,
            align: CausalAlign::BottomRight,
        })
    }

    /// StreamingLLM sink tokens: the first `n` keys ignore the window's left bound.
    pub fn sink_tokens(mut self, n: u32) -> Self {
        self.sink_tokens = n;
        self
    }

    /// Learnable per-head sink logits (gpt-oss): fp32 `(heads,)`, added to each row's softmax
    /// denominator.
    pub fn sink_logits(mut self, logits: &'a dyn DevicePtr<f32>) -> Self {
        self.sink_logits = Some(logits);
        self
    }

    /// ALiBi slopes.
    pub fn alibi(mut self, alibi: Alibi<'a>) -> Self {
        self.alibi = Some(alibi);
        self
    }

    /// Logit softcap `c`: scores become `c * tanh(s / c)`.
    pub fn softcap(mut self, cap: f32) -> Self {
        self.softcap = Some(cap);
        self
    }

    /// Split-KV: how many parts each query block's keys are split into (FlashAttention's
    /// `num_splits`). `0` (the default) lets [`crate::split_kv_heuristic`] decide from the
    /// call's size and the GPU (it splits only calls that fill less than 80% of one wave, such
    /// as decode steps of small batches); `1` never splits; `2..=`[`crate::MAX_SPLITS`] splits
    /// into exactly that many parts. Both forward families split (reported in
    /// [`crate::FwdInfo::num_splits`]); a split call allocates an fp32 workspace on the stream
    /// for the call; varlen queries are never split (`n >= 2` there is an error).
    pub fn num_splits(mut self, n: u32) -> Self {
        self.num_splits = n;
        self
    }

    /// Forces a code path (tests, diagnosis).
    pub fn kernel_override(mut self, o: KernelOverride) -> Self {
        self.kernel_override = o;
        self
    }

    /// The mask.
    pub fn get_mask(&self) -> Mask {
        self.mask
    }
}
