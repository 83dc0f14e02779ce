//! References: the naive GPU kernels (the oracle for shapes too large for the CPU) and the f64
//! CPU reference with the same-precision baseline and the tolerance rule ([`cpu`]).
//!
//! The GPU reference runs through the same ahead-of-time pipeline, dispatch table and argument
//! checks as [`crate::flash_fwd`]; only the kernel differs (one query row per thread block, fp32
//! accumulation, any head dim up to 256, written for clarity).

pub mod cpu;

use crate::bwd::{BwdInfo, BwdOptions, BwdTensors, run_bwd};
use crate::error::Result;
use crate::fwd::{FwdInfo, FwdTensors, Impl, run_fwd};
use crate::options::FwdOptions;
use crate::tensor::AttnElement;
use crate::varlen::VarlenSeqlens;
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// The GPU reference forward on dense tensors: same arguments and semantics as
/// [`crate::flash_fwd`], slow and simple.
pub fn reference_fwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    opts: &FwdOptions<'_>,
) -> Result<FwdInfo> {
    run_fwd(stream, t, None, opts, Impl::Reference)
}

/// The GPU reference forward on varlen tensors: same arguments as [`crate::flash_fwd_varlen`].
pub fn reference_fwd_varlen<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: FwdTensors<'_, T>,
    seqlens: &VarlenSeqlens,
    opts: &FwdOptions<'_>,
) -> Result<FwdInfo> {
    run_fwd(stream, t, Some(seqlens), opts, Impl::Reference)
}

/// The GPU reference backward on dense tensors: same arguments and semantics as
/// [`crate::flash_bwd`]; bitwise deterministic.
pub fn reference_bwd<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: BwdTensors<'_, T>,
    opts: &BwdOptions<'_>,
) -> Result<BwdInfo> {
    run_bwd(stream, t, None, opts, Impl::Reference)
}

/// The GPU reference backward on varlen tensors.
pub fn reference_bwd_varlen<T: AttnElement>(
    stream: &Arc<CudaStream>,
    t: BwdTensors<'_, T>,
    seqlens: &VarlenSeqlens,
    opts: &BwdOptions<'_>,
) -> Result<BwdInfo> {
    run_bwd(stream, t, Some(seqlens), opts, Impl::Reference)
}
