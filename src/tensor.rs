//! Element types, tensor layouts and borrowed device tensors.

use crate::cells::DType;
use cudarc::driver::{DevicePtr, DevicePtrMut, DeviceRepr};

mod sealed {
    pub trait Sealed {}
}

/// An element type the kernels read and write (`half::f16`, `half::bf16`).
pub trait AttnElement: DeviceRepr + Copy + Send + Sync + 'static + sealed::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl sealed::Sealed for half::f16 {}
impl AttnElement for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl sealed::Sealed for half::bf16 {}
impl AttnElement for half::bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Marker types naming a GEMM input type at the type level (for typed dispatch queries).
pub trait GemmSupported: sealed::Sealed {
    /// The dtype.
    const DTYPE: DType;
}

/// Marker for fp16.
#[derive(Clone, Copy, Debug)]
pub struct F16;
/// Marker for bf16.
#[derive(Clone, Copy, Debug)]
pub struct Bf16;
impl sealed::Sealed for F16 {}
impl sealed::Sealed for Bf16 {}
impl GemmSupported for F16 {
    const DTYPE: DType = DType::F16;
}
impl GemmSupported for Bf16 {
    const DTYPE: DType = DType::Bf16;
}

/// Markers for the fp8 types (forward only, sm90 family).
#[cfg(feature = "fp8")]
mod fp8 {
    use super::*;
    /// Marker for fp8 e4m3.
    #[derive(Clone, Copy, Debug)]
    pub struct F8E4m3;
    /// Marker for fp8 e5m2.
    #[derive(Clone, Copy, Debug)]
    pub struct F8E5m2;
    impl sealed::Sealed for F8E4m3 {}
    impl sealed::Sealed for F8E5m2 {}
    impl GemmSupported for F8E4m3 {
        const DTYPE: DType = DType::F8E4m3;
    }
    impl GemmSupported for F8E5m2 {
        const DTYPE: DType = DType::F8E5m2;
    }
}
#[cfg(feature = "fp8")]
pub use fp8::{F8E4m3, F8E5m2};

/// Shape and strides of a `(batch, seqlen, heads, head_dim)` tensor. Strides are in elements; the
/// last dimension is contiguous. A varlen tensor `(total, heads, head_dim)` is `batch = 1`,
/// `seqlen = total` ([`Layout::varlen`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Batch size.
    pub batch: usize,
    /// Sequence length (rows).
    pub seqlen: usize,
    /// Heads.
    pub heads: usize,
    /// Head dim (contiguous).
    pub head_dim: usize,
    /// Elements between batches.
    pub batch_stride: usize,
    /// Elements between rows (sequence positions).
    pub row_stride: usize,
    /// Elements between heads.
    pub head_stride: usize,
}

impl Layout {
    /// Contiguous `(batch, seqlen, heads, head_dim)` storage (FlashAttention's layout).
    pub const fn contiguous(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Layout {
        Layout {
            batch,
            seqlen,
            heads,
            head_dim,
            batch_stride: seqlen * heads * head_dim,
            row_stride: heads * head_dim,
            head_stride: head_dim,
        }
    }

    /// Contiguous `(batch, heads, seqlen, head_dim)` storage (PyTorch SDPA's layout) seen as
    /// `(batch, seqlen, heads, head_dim)` through strides.
    pub const fn heads_major(batch: usize, seqlen: usize, heads: usize, head_dim: usize) -> Layout {
        Layout {
            batch,
            seqlen,
            heads,
            head_dim,
            batch_stride: heads * seqlen * head_dim,
            row_stride: head_dim,
            head_stride: seqlen * head_dim,
        }
    }

    /// Contiguous varlen storage `(total, heads, head_dim)`.
    pub const fn varlen(total: usize, heads: usize, head_dim: usize) -> Layout {
        Layout::contiguous(1, total, heads, head_dim)
    }

    /// The same shape with other strides (in elements).
    pub const fn with_strides(self, batch_stride: usize, row_stride: usize, head_stride: usize) -> Layout {
        Layout {
            batch_stride,
            row_stride,
            head_stride,
            ..self
        }
    }

    /// Number of elements the layout addresses: largest offset + 1 (0 when empty). None when the
    /// offsets overflow `usize`.
    pub fn extent(&self) -> Option<usize> {
        if self.batch == 0 || self.seqlen == 0 || self.heads == 0 || self.head_dim == 0 {
            return Some(0);
        }
        let last = (self.batch - 1)
            .checked_mul(self.batch_stride)?
            .checked_add((self.seqlen - 1).checked_mul(self.row_stride)?)?
            .checked_add((self.heads - 1).checked_mul(self.head_stride)?)?
            .checked_add(self.head_dim - 1)?;
        last.checked_add(1)
    }
}

/// A device tensor to read: a cudarc buffer ([`cudarc::driver::CudaSlice`] or view) and its layout.
pub struct Tensor<'a, T> {
    pub(crate) data: &'a dyn DevicePtr<T>,
    pub(crate) layout: Layout,
}

impl<'a, T> Tensor<'a, T> {
    /// Borrows `data` with `layout`. Checked against the buffer when used.
    pub fn new(data: &'a dyn DevicePtr<T>, layout: Layout) -> Self {
        Tensor { data, layout }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// A device tensor to write.
pub struct TensorMut<'a, T> {
    pub(crate) data: &'a mut dyn DevicePtrMut<T>,
    pub(crate) layout: Layout,
}

impl<'a, T> TensorMut<'a, T> {
    /// Borrows `data` mutably with `layout`. Checked against the buffer when used.
    pub fn new(data: &'a mut dyn DevicePtrMut<T>, layout: Layout) -> Self {
        TensorMut { data, layout }
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}
