//! Split-KV forward: a call with too few query blocks to fill the GPU (decode, short chunks of
//! long caches) splits each query block's key range into parts that run as separate thread
//! blocks, then combines them.
//!
//! - The sm80-family forward kernels (dense and paged) take `num_splits > 1`: grid z becomes
//!   `batch * num_splits`, part `s` walks the `s`-th share of its query block's KV blocks
//!   (`FwdKvPlan::part` in csrc/common/mask.cuh; the sink-token blocks go with part 0) and
//!   writes its O (fp32, normalised by its own sum) and LSE to a workspace.
//! - The merge cell's split kernel (`fa_merge_<dtype>_split`, csrc/merge/merge.cuh) combines the
//!   parts in split order, with the learnable sink logit as one more denominator term, into the
//!   output in its dtype and the LSE: the same function of the same scores as one unsplit walk,
//!   up to fp32 rounding (the FlashAttention-2 `num_splits` scheme).
//! - The sm90 family has a separate split kernel per cell (`_split`, `CellImage::split_kernels`;
//!   the dense sm90 kernels carry no split code): `batch * num_splits` is its persistent
//!   scheduler's batch dimension, part `s` of a tile walks the `s`-th share of its KV blocks
//!   (`KvBlocks::part` in csrc/sm90/scheduler.cuh) and writes the same fp32 partial results.
//! - Workspace: `num_splits * batch * heads * seqlen_q * (head_dim + 1)` fp32, allocated on the
//!   stream for the call and freed after it (stream-ordered), as FlashAttention's
//!   `flash_attn_with_kvcache` allocates its accumulators.
//!
//! [`crate::FwdOptions::num_splits`] picks the count: `0` (the default) lets [`heuristic`]
//! choose, `1` never splits, `n >= 2` splits into `n` parts (at most [`MAX_SPLITS`]), on
//! whichever family serves the call; [`crate::FwdInfo::num_splits`] reports it. Varlen queries
//! are never split.

use crate::cells::{Cell, DType, Direction, Family};
use crate::dispatch::{DISPATCH_TABLE, not_compiled};
use crate::error::{Error, Result};
use crate::fwd::Dims;
use crate::merge::{WARPS_PER_BLOCK, rows_per_warp};
use crate::params::FaParams;
use crate::runtime::{self, DeviceInfo, Function, Geometry};
use crate::tensor::{AttnElement, Layout};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use std::ffi::c_void;

/// Most parts a split-KV call may have (FlashAttention-2's limit).
pub const MAX_SPLITS: usize = 128;

/// The split count [`crate::FwdOptions::num_splits`]`(0)` picks for a call with `work_blocks`
/// thread blocks (query blocks x heads x batch) and `n_blocks` KV blocks per query block on a GPU
/// that runs `capacity` of them at once (SMs x blocks per SM).
///
/// No split when the call already fills 80% of a wave. Otherwise the count whose last wave is
/// fullest (efficiency = waves / ceil(waves)), taking the smallest count within 85% of the best;
/// counts that give the same part length as a smaller count are skipped (they only add parts).
/// This is FlashAttention-2's `num_splits_heuristic` rule; every part keeps at least one KV block.
pub fn heuristic(work_blocks: usize, n_blocks: usize, capacity: usize) -> usize {
    if work_blocks == 0 || capacity == 0 || work_blocks * 10 >= capacity * 8 {
        return 1;
    }
    let max_splits = MAX_SPLITS.min(n_blocks).min(capacity);
    let part_len = |n: usize| n_blocks.div_ceil(n);
    let eligible = |n: usize| n == 1 || part_len(n) != part_len(n - 1);
    let efficiency = |n: usize| {
        let waves = (work_blocks * n) as f64 / capacity as f64;
        waves / waves.ceil()
    };
    let best = (1..=max_splits)
        .filter(|&n| eligible(n))
        .map(efficiency)
        .fold(0.0f64, f64::max);
    (1..=max_splits)
        .find(|&n| eligible(n) && efficiency(n) >= 0.85 * best)
        .unwrap_or(1)
}

/// The combine kernel's arguments; mirrors `MergeSplitParams` in csrc/merge/params.h (8-byte
/// fields only).
#[repr(C)]
#[derive(Clone, Copy)]
struct MergeSplitParams {
    o_partial: u64,
    lse_partial: u64,
    sink_logits: u64,
    out: u64,
    out_stride: [i64; 3],
    out_lse: u64,
    n_splits: i64,
    batch: i64,
    seqlen: i64,
    heads: i64,
    head_dim: i64,
}

const _: () = assert!(std::mem::size_of::<MergeSplitParams>() == 8 * 13);

/// The combine symbol of a dtype (defined next to `merge_states`' kernel by FA_MERGE_KERNEL).
fn combine_symbol(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F16 => Some("fa_merge_f16_split"),
        DType::Bf16 => Some("fa_merge_bf16_split"),
        _ => None,
    }
}

/// A split call's workspace and combine kernel, set up before the forward kernel launches (so
/// that a missing merge cell fails before anything is written).
pub(crate) struct Split {
    n: usize,
    o_partial: CudaSlice<f32>,
    lse_partial: CudaSlice<f32>,
    combine: Function,
}

impl Split {
    /// For a call of `n` parts (1: none) over `d` (after any decode-GQA re-striding): allocates
    /// the workspace and loads the combine kernel for `T`.
    pub fn for_call<T: AttnElement>(
        stream: &std::sync::Arc<CudaStream>,
        info: &DeviceInfo,
        n: usize,
        d: &Dims,
    ) -> Result<Option<Split>> {
        if n <= 1 {
            return Ok(None);
        }
        let symbol = combine_symbol(T::DTYPE)
            .ok_or_else(|| Error::InvalidArgument(format!("split-KV: {:?} outputs are not supported", T::DTYPE)))?;
        let cell = Cell {
            family: Family::Merge,
            direction: Direction::Fwd,
            dtype: T::DTYPE,
            head_dim: 0,
        };
        let (index, _image, jit_ptx) = DISPATCH_TABLE
            .serve(&cell, info.arch)
            .ok_or_else(|| not_compiled(&cell, info.arch))?;
        let combine = runtime::function(stream, index, jit_ptx, symbol, 0)?;
        let rows = n * d.batch * d.heads * d.seqlen_q;
        let too_large = || Error::TooLarge {
            what: "split-KV workspace (splits x batch x heads x seqlen_q x head_dim)",
            value: usize::MAX,
            limit: i64::MAX as usize,
        };
        let o_len = rows.checked_mul(d.head_dim).ok_or_else(too_large)?;
        // SAFETY (uninitialised memory): the split forward writes every element the combine
        // reads: each part writes every valid row of its query block, empty parts included
        // (O = 0, LSE = -inf; csrc/sm80/fwd.cuh, csrc/sm90 Epilogue::store_zero).
        let o_partial =
            unsafe { stream.alloc::<f32>(o_len) }.map_err(Error::driver("allocating the split-KV workspace"))?;
        let lse_partial =
            unsafe { stream.alloc::<f32>(rows.max(1)) }.map_err(Error::driver("allocating the split-KV workspace"))?;
        Ok(Some(Split {
            n,
            o_partial,
            lse_partial,
            combine,
        }))
    }

    /// Points the forward's params at the workspace and sets the part count.
    pub fn fill_params(&self, params: &mut FaParams, stream: &CudaStream) {
        params.o_partial = self.o_partial.device_ptr(stream).0 as *mut f32;
        params.lse_partial = self.lse_partial.device_ptr(stream).0 as *mut f32;
        params.num_splits = self.n as i32;
    }

    /// Launches the combine into `out` (`out_layout`, already checked) and `lse` (0 = none).
    pub fn combine(
        &self,
        stream: &CudaStream,
        d: &Dims,
        out: u64,
        out_layout: &Layout,
        lse: u64,
        sink_logits: u64,
    ) -> Result<()> {
        let (o_partial, _g1) = self.o_partial.device_ptr(stream);
        let (lse_partial, _g2) = self.lse_partial.device_ptr(stream);
        let mut params = MergeSplitParams {
            o_partial,
            lse_partial,
            sink_logits,
            out,
            out_stride: [
                out_layout.batch_stride as i64,
                out_layout.row_stride as i64,
                out_layout.head_stride as i64,
            ],
            out_lse: lse,
            n_splits: self.n as i64,
            batch: d.batch as i64,
            seqlen: d.seqlen_q as i64,
            heads: d.heads as i64,
            head_dim: d.head_dim as i64,
        };
        let rows = d.batch * d.seqlen_q * d.heads;
        let blocks = rows.div_ceil(WARPS_PER_BLOCK * rows_per_warp(d.head_dim));
        if blocks == 0 {
            return Ok(());
        }
        let geom = Geometry {
            grid: (blocks as u32, 1, 1),
            block: (32 * WARPS_PER_BLOCK) as u32,
            smem_bytes: 0,
        };
        let mut args = [&mut params as *mut MergeSplitParams as *mut c_void];
        // SAFETY: the split combine kernel takes exactly one `MergeSplitParams` by value (layout
        // asserted on both sides); the workspace holds n parts of these sizes, and `out` / `lse`
        // were checked against the same sizes by the forward call.
        unsafe { runtime::launch(self.combine, geom, stream, &mut args) }
    }
}

#[cfg(test)]
mod tests {
    use super::heuristic;

    #[test]
    fn heuristic_fills_the_gpu_only_when_needed() {
        // A full wave: no split.
        assert_eq!(heuristic(264, 64, 264), 1);
        assert_eq!(heuristic(1000, 64, 264), 1);
        // Decode, batch 1, 8 KV heads (GQA packed), 128k keys in 64-key blocks, 132 SMs x 2.
        let n = heuristic(8, 2048, 264);
        assert!((16..=33).contains(&n), "{n}");
        // Few KV blocks: never more parts than blocks.
        assert_eq!(heuristic(1, 3, 264), 3);
        assert_eq!(heuristic(1, 1, 264), 1);
        assert!(heuristic(0, 10, 264) == 1);
    }
}
