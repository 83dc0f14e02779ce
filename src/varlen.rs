//! Host-validated sequence-length data for variable-length batches.

use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// `cu_seqlens_q`, `cu_seqlens_k` (int32, `batch + 1` entries, starting at 0, non-decreasing) and
/// optional `seqused_k`, checked on the host and uploaded by the crate, so the kernels can trust
/// them: no sequence reaches outside the packed tensors.
#[derive(Debug)]
pub struct VarlenSeqlens {
    pub(crate) cu_q: CudaSlice<i32>,
    pub(crate) cu_k: CudaSlice<i32>,
    pub(crate) seqused_k: Option<CudaSlice<i32>>,
    host_cu_q: Vec<i32>,
    host_cu_k: Vec<i32>,
    max_q: usize,
    max_k: usize,
}

pub(crate) fn check_cu(name: &str, cu: &[i32]) -> Result<usize> {
    if cu.len() < 2 {
        return Err(Error::InvalidSeqlens(format!(
            "{name} needs batch + 1 >= 2 entries, got {}",
            cu.len()
        )));
    }
    if cu[0] != 0 {
        return Err(Error::InvalidSeqlens(format!("{name}[0] must be 0, got {}", cu[0])));
    }
    let mut max = 0usize;
    for (b, w) in cu.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::InvalidSeqlens(format!(
                "{name} decreases at {b}: {} -> {}",
                w[0], w[1]
            )));
        }
        max = max.max((w[1] - w[0]) as usize);
    }
    Ok(max)
}

impl VarlenSeqlens {
    /// Validates and uploads the cumulative sequence lengths.
    pub fn new(stream: &Arc<CudaStream>, cu_seqlens_q: &[i32], cu_seqlens_k: &[i32]) -> Result<Self> {
        crate::runtime::ensure_driver()?;
        let max_q = check_cu("cu_seqlens_q", cu_seqlens_q)?;
        let max_k = check_cu("cu_seqlens_k", cu_seqlens_k)?;
        if cu_seqlens_q.len() != cu_seqlens_k.len() {
            return Err(Error::InvalidSeqlens(format!(
                "cu_seqlens_q has {} entries but cu_seqlens_k has {}",
                cu_seqlens_q.len(),
                cu_seqlens_k.len()
            )));
        }
        let up = |v: &[i32]| stream.clone_htod(v).map_err(Error::driver("uploading cu_seqlens"));
        Ok(VarlenSeqlens {
            cu_q: up(cu_seqlens_q)?,
            cu_k: up(cu_seqlens_k)?,
            seqused_k: None,
            host_cu_q: cu_seqlens_q.to_vec(),
            host_cu_k: cu_seqlens_k.to_vec(),
            max_q,
            max_k,
        })
    }

    /// Adds `seqused_k`: sequence `b` uses only its first `seqused_k[b]` keys (at most its
    /// capacity `cu_seqlens_k[b+1] - cu_seqlens_k[b]`).
    pub fn with_seqused_k(mut self, stream: &Arc<CudaStream>, seqused_k: &[i32]) -> Result<Self> {
        if seqused_k.len() != self.batch() {
            return Err(Error::InvalidSeqlens(format!(
                "seqused_k has {} entries for a batch of {}",
                seqused_k.len(),
                self.batch()
            )));
        }
        for (b, &used) in seqused_k.iter().enumerate() {
            let cap = self.host_cu_k[b + 1] - self.host_cu_k[b];
            if used < 0 || used > cap {
                return Err(Error::InvalidSeqlens(format!(
                    "seqused_k[{b}] = {used} is outside 0..={cap}"
                )));
            }
        }
        self.max_k = seqused_k.iter().map(|&u| u as usize).max().unwrap_or(0);
        self.seqused_k = Some(
            stream
                .clone_htod(seqused_k)
                .map_err(Error::driver("uploading seqused_k"))?,
        );
        Ok(self)
    }

    /// Number of sequences.
    pub fn batch(&self) -> usize {
        self.host_cu_q.len() - 1
    }

    /// Longest query sequence.
    pub fn max_seqlen_q(&self) -> usize {
        self.max_q
    }

    /// Longest key sequence (as used, when `seqused_k` is set).
    pub fn max_seqlen_k(&self) -> usize {
        self.max_k
    }

    /// Total query rows.
    pub fn total_q(&self) -> usize {
        *self.host_cu_q.last().expect("validated non-empty") as usize
    }

    /// Total key rows (capacity).
    pub fn total_k(&self) -> usize {
        *self.host_cu_k.last().expect("validated non-empty") as usize
    }

    /// Host copy of `cu_seqlens_q`.
    pub fn cu_seqlens_q(&self) -> &[i32] {
        &self.host_cu_q
    }

    /// Host copy of `cu_seqlens_k`.
    pub fn cu_seqlens_k(&self) -> &[i32] {
        &self.host_cu_k
    }

    pub(crate) fn same_context(&self, stream: &CudaStream) -> bool {
        self.cu_q.context().cu_ctx() == stream.context().cu_ctx()
    }
}
