//! # flashattn-aot
//!
//! FlashAttention kernels compiled **ahead of time**. `cargo build` runs nvcc over the CUDA C++ in
//! `csrc/` for a whitelist of kernel *cells*, embeds the fatbins in this library and generates a
//! perfect-hash map from cell key to image. At run time the crate needs only the NVIDIA driver
//! (libcuda, opened by [cudarc]): no NVRTC, no nvcc, no Python, no network.
//!
//! ```no_run
//! use cudarc::driver::CudaContext;
//! use flashattn_aot::{flash_fwd, CausalAlign, FwdOptions, FwdTensors, Layout, Tensor, TensorMut};
//! use half::bf16;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let ctx = CudaContext::new(0)?;
//! let stream = ctx.default_stream();
//! let (b, s, h, d) = (2, 1024, 16, 128);
//! let layout = Layout::contiguous(b, s, h, d);
//! let host: Vec<bf16> = (0..b * s * h * d).map(|i| bf16::from_f32((i % 7) as f32 * 0.1)).collect();
//! let q = stream.clone_htod(&host)?;
//! let k = stream.clone_htod(&host)?;
//! let v = stream.clone_htod(&host)?;
//! let mut out = stream.alloc_zeros::<bf16>(b * s * h * d)?;
//! let mut lse = stream.alloc_zeros::<f32>(b * h * s)?;
//! let info = flash_fwd(
//!     &stream,
//!     FwdTensors {
//!         q: Tensor::new(&q, layout),
//!         k: Tensor::new(&k, layout),
//!         v: Tensor::new(&v, layout),
//!         out: TensorMut::new(&mut out, layout),
//!         lse: Some(&mut lse),
//!     },
//!     &FwdOptions::new().causal(CausalAlign::BottomRight),
//! )?;
//! println!("ran {} ({})", info.symbol, info.cell);
//! # Ok(())
//! # }
//! ```
//!
//! ## Semantics
//!
//! Layouts, masks (causal with bottom-right or top-left alignment, sliding window, StreamingLLM
//! sink tokens), learnable sink logits, ALiBi, softcap, GQA/MQA, varlen and the LSE contract are
//! specified in `docs/semantics.md`, which every kernel and both references implement.
//!
//! ## Merging partial results
//!
//! [`merge_states`] combines partial results `(O_i, LSE_i)` over disjoint key sets (split-KV,
//! chunked prefill, ring attention) into the result over all keys, with the forward's
//! conventions for empty rows.
//!
//! ## Kernels
//!
//! | device | kernels |
//! | --- | --- |
//! | sm_80, sm_86, sm_87, sm_89 | sm80 family (FA2-class: mma.sync, ldmatrix, cp.async), tiles chosen by the device's shared memory (163 KB or 99 KB) |
//! | sm_90 (H100, H200) | sm90 family where it has the cell, else the sm80 family built for sm_90 ([`KernelRef::routed_from`] says so) |
//! | sm_100, sm_120, newer | sm80 family from embedded compute_80 PTX through the driver's JIT (feature `ptx-jit`, default) |
//!
//! What a build contains is queryable: [`compiled_cells`], [`MANIFEST_TSV`], [`lookup`].
//!
//! ## Errors
//!
//! Every public function validates shapes, strides, buffer lengths, alignment, options and devices
//! before launching anything and returns a typed [`Error`]; a machine without a driver gets
//! [`Error::NoDriver`], never a panic.

#![warn(missing_docs)]

mod bwd;
mod cells;
mod dispatch;
mod error;
mod fwd;
mod kernels;
mod merge;
mod options;
mod paged;
mod params;
pub mod reference;
mod runtime;
mod sm90_tma;
mod split;
mod tensor;
mod varlen;

pub use bwd::{BwdInfo, BwdOptions, BwdTensors, flash_bwd, flash_bwd_varlen, release_workspace_memory};
pub use cells::{Cell, DType, Direction, Family, HEAD_DIMS, Target, Tile, whitelist};
pub use dispatch::{
    DISPATCH_TABLE, DispatchKey, DispatchTable, KernelRef, SmArch, compiled_cells, fnv1a64, lookup, strict_lookup,
};
pub use error::{Error, Result};
pub use fwd::{FwdInfo, FwdTensors, flash_fwd, flash_fwd_varlen};
pub use kernels::{BUILD_KNOBS, CellImage, KERNELS_BUILT, KernelEntry, MANIFEST_TSV};
pub use merge::{AttnState, MAX_MERGE_PARTS, merge_states};
pub use options::{Alibi, CausalAlign, FwdOptions, KernelOverride, Mask};
pub use paged::{PagedKv, flash_fwd_paged};
pub use runtime::{DeviceInfo, device_count, device_info, driver_present, open_device};
pub use split::{MAX_SPLITS, heuristic as split_kv_heuristic};
pub use tensor::{AttnElement, Bf16, F16, GemmSupported, Layout, Tensor, TensorMut};
#[cfg(feature = "fp8")]
pub use tensor::{F8E4m3, F8E5m2};
pub use varlen::VarlenSeqlens;

/// Re-export of the cudarc version this crate is built against.
pub use cudarc;
