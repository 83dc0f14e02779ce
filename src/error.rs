//! The crate's one error type.

use crate::cells::{DType, Direction};
use crate::dispatch::SmArch;

/// Everything that can go wrong, with the offending values in the message. Bad input is always
/// reported before anything is launched or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libcuda could not be found or opened (no NVIDIA driver on this machine).
    #[error("the NVIDIA driver library (libcuda) was not found: flashattn-aot needs an NVIDIA driver at run time")]
    NoDriver,

    /// A CUDA driver call failed.
    #[error("CUDA driver error in {context}: {source}")]
    Driver {
        /// What the crate was doing.
        context: &'static str,
        /// The driver's error.
        source: cudarc::driver::DriverError,
    },

    /// The device's compute capability has no kernels in this build.
    #[error("unsupported device: compute capability {major}.{minor} ({reason})")]
    UnsupportedDevice {
        /// Major compute capability.
        major: i32,
        /// Minor compute capability.
        minor: i32,
        /// Why.
        reason: &'static str,
    },

    /// The kernel cell that serves this request was not compiled into this build.
    #[error("kernel cell `{cell}` is not compiled into this build ({knobs}); {hint}")]
    CellNotCompiled {
        /// The cell key, e.g. `sm80.fwd.bf16.hd128`.
        cell: String,
        /// The build knobs this library was compiled with.
        knobs: &'static str,
        /// How to enable it.
        hint: String,
    },

    /// No cell of any family exists for this request (not a build choice: the crate has none).
    #[error("no kernel serves {what}")]
    NoKernel {
        /// The request.
        what: String,
    },

    /// The head dim is not one the kernels support.
    #[error("head dim {head_dim} is not supported (supported: {supported})")]
    UnsupportedHeadDim {
        /// The requested head dim.
        head_dim: u32,
        /// The supported ones.
        supported: &'static str,
    },

    /// The dtype cannot be used for this arch or direction.
    #[error("dtype {dtype:?} is not supported for {direction:?} on {arch:?}: {reason}")]
    UnsupportedDType {
        /// Element type.
        dtype: DType,
        /// Direction.
        direction: Direction,
        /// Arch.
        arch: SmArch,
        /// Why.
        reason: &'static str,
    },

    /// An option or combination of options is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Tensor shapes disagree with each other.
    #[error("shape mismatch: {0}")]
    ShapeMismatch(String),

    /// A tensor's layout reaches outside its buffer.
    #[error("{tensor}: layout needs {needed} elements but the buffer has {len}")]
    BufferTooSmall {
        /// Which tensor.
        tensor: &'static str,
        /// Elements the layout addresses (largest offset + 1).
        needed: usize,
        /// Elements in the buffer.
        len: usize,
    },

    /// A pointer or stride is not aligned as the kernels require.
    #[error("{tensor}: {what} must be a multiple of {required} (got {got})")]
    Misaligned {
        /// Which tensor.
        tensor: &'static str,
        /// What is misaligned.
        what: &'static str,
        /// Required multiple.
        required: usize,
        /// Actual value.
        got: usize,
    },

    /// A buffer lives on another device or context than the stream.
    #[error("{tensor} belongs to device {buffer_device}, but the stream is on device {stream_device}")]
    DeviceMismatch {
        /// Which tensor.
        tensor: &'static str,
        /// The buffer's device ordinal.
        buffer_device: usize,
        /// The stream's device ordinal.
        stream_device: usize,
    },

    /// An output overlaps an input or another output.
    #[error("{a} and {b} overlap in device memory")]
    Aliasing {
        /// First tensor.
        a: &'static str,
        /// Second tensor.
        b: &'static str,
    },

    /// Host-side sequence-length data is malformed.
    #[error("invalid sequence lengths: {0}")]
    InvalidSeqlens(String),

    /// A paged KV cache's block table or key counts are malformed ([`crate::PagedKv::new`]).
    #[error("invalid paged KV cache: {0}")]
    InvalidBlockTable(String),

    /// A size does not fit the kernels' 32-bit indexing.
    #[error("{what} = {value} exceeds the kernels' limit {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Value.
        value: usize,
        /// Limit.
        limit: usize,
    },
}

/// `Result` with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn driver(context: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
        move |source| Error::Driver { context, source }
    }
}
