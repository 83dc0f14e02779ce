//! A C ABI over `flash_fwd` / `flash_bwd` for bf16 tensors that another runtime allocated, so
//! that `benches/compare.py --lib` can time our kernels and PyTorch's SDPA backends on the same
//! tensors, in the same process, cell by cell and alternating (the fairest side-by-side: both
//! see the same clocks, the same power state and the same memory).
//!
//! ```text
//! cargo build --release --example pyffi      # target/release/examples/libpyffi.so
//! python3 benches/compare.py --lib target/release/examples/libpyffi.so [--bwd] [--quick]
//! ```
//!
//! Both calls run on the device's primary context (the one PyTorch uses) and its legacy default
//! stream (PyTorch's default stream), so they order with PyTorch's work and its CUDA events.
//! The pointers are borrowed: they are wrapped for the call and handed back, never freed here.
//! Return value: 0 on success, -1 on an error whose text `fa_ffi_error` copies out.

use std::cell::RefCell;
use std::ffi::c_char;
use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaSlice, CudaStream};
use flashattn_aot::{
    BwdOptions, BwdTensors, CausalAlign, Family, FwdOptions, FwdTensors, KernelOverride, Layout, Tensor, TensorMut,
    flash_bwd, flash_fwd, open_device,
};
use half::bf16;

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn stream() -> Result<&'static Arc<CudaStream>, String> {
    static STREAM: OnceLock<Result<Arc<CudaStream>, String>> = OnceLock::new();
    STREAM
        .get_or_init(|| {
            let ctx = open_device(0).map_err(|e| e.to_string())?;
            // SAFETY: every buffer here is used on this one stream only; cudarc's cross-stream
            // events (two per wrapped pointer and call) would only add host time.
            unsafe { ctx.disable_event_tracking() };
            Ok(ctx.default_stream())
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A borrowed device buffer: a `CudaSlice` over memory this library does not own, leaked (not
/// freed) when it goes out of scope.
struct Borrowed<T>(Option<CudaSlice<T>>);

impl<T> Borrowed<T> {
    /// # Safety
    /// `ptr` must be a live device allocation of at least `len` elements of `T`.
    unsafe fn new(stream: &Arc<CudaStream>, ptr: u64, len: usize) -> Self {
        // SAFETY: the caller's contract.
        Borrowed(Some(unsafe { stream.upgrade_device_ptr(ptr, len) }))
    }
    fn get(&self) -> &CudaSlice<T> {
        self.0.as_ref().expect("present until drop")
    }
    fn get_mut(&mut self) -> &mut CudaSlice<T> {
        self.0.as_mut().expect("present until drop")
    }
}

impl<T> Drop for Borrowed<T> {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.leak();
        }
    }
}

/// The shape of one call: `layout` 0 = (batch, seqlen, heads, head_dim) contiguous, 1 =
/// (batch, heads, seqlen, head_dim) contiguous (PyTorch SDPA's usual layout).
#[derive(Clone, Copy)]
struct Shape {
    b: usize,
    sq: usize,
    sk: usize,
    h: usize,
    hk: usize,
    d: usize,
    heads_major: bool,
}

impl Shape {
    #[allow(clippy::too_many_arguments)]
    fn new(b: i32, sq: i32, sk: i32, h: i32, hk: i32, d: i32, layout: i32) -> Result<Shape, String> {
        let u = |x: i32, what: &str| usize::try_from(x).map_err(|_| format!("{what} = {x} is negative"));
        Ok(Shape {
            b: u(b, "batch")?,
            sq: u(sq, "seqlen_q")?,
            sk: u(sk, "seqlen_k")?,
            h: u(h, "heads")?,
            hk: u(hk, "heads_k")?,
            d: u(d, "head_dim")?,
            heads_major: match layout {
                0 => false,
                1 => true,
                _ => return Err(format!("layout {layout}: 0 (b, s, h, d) or 1 (b, h, s, d)")),
            },
        })
    }
    fn layout(&self, s: usize, h: usize) -> Layout {
        if self.heads_major {
            Layout::heads_major(self.b, s, h, self.d)
        } else {
            Layout::contiguous(self.b, s, h, self.d)
        }
    }
    fn q(&self) -> Layout {
        self.layout(self.sq, self.h)
    }
    fn kv(&self) -> Layout {
        self.layout(self.sk, self.hk)
    }
    fn q_len(&self) -> usize {
        self.b * self.sq * self.h * self.d
    }
    fn kv_len(&self) -> usize {
        self.b * self.sk * self.hk * self.d
    }
    fn lse_len(&self) -> usize {
        self.b * self.h * self.sq
    }
}

/// `causal` 0 = none, 1 = bottom-right; `family` 0 = the device's default, 1 = sm80 family, plus
/// 256 * (i + 1) to force tile variant i (`KernelOverride::variant`).
fn options(causal: i32, family: i32) -> Result<(FwdOptions<'static>, KernelOverride), String> {
    let mut opts = FwdOptions::new();
    match causal {
        0 => {}
        1 => opts = opts.causal(CausalAlign::BottomRight),
        _ => return Err(format!("causal {causal}: 0 or 1")),
    }
    // Low byte: the family; the bits above it, when not 0: tile variant + 1 (KernelOverride::variant).
    let variant = (family >> 8) as usize;
    let over = KernelOverride {
        family: match family & 0xff {
            0 => None,
            1 => Some(Family::Sm80),
            _ => {
                return Err(format!(
                    "family {family}: 0 (default) or 1 (sm80), plus 256 * (variant + 1)"
                ));
            }
        },
        variant: variant.checked_sub(1),
        ..Default::default()
    };
    Ok((opts, over))
}

fn report(r: Result<(), String>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => {
            LAST_ERROR.with(|l| *l.borrow_mut() = e);
            -1
        }
    }
}

/// Copies the last error's text (NUL-terminated, truncated to `cap - 1` bytes) into `buf`;
/// returns its full length.
///
/// # Safety
/// `buf` must be writable for `cap` bytes (or null with `cap` 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fa_ffi_error(buf: *mut c_char, cap: usize) -> usize {
    LAST_ERROR.with(|l| {
        let s = l.borrow();
        if cap > 0 && !buf.is_null() {
            let n = s.len().min(cap - 1);
            // SAFETY: the caller's contract; n < cap.
            unsafe {
                std::ptr::copy_nonoverlapping(s.as_ptr(), buf.cast::<u8>(), n);
                *buf.add(n) = 0;
            }
        }
        s.len()
    })
}

/// Forward: `out = attention(q, k, v)`, bf16; `lse` (fp32, (b, h, sq)) may be 0.
///
/// # Safety
/// Every nonzero pointer must be a live device allocation on device 0 holding the elements
/// its shape implies.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fa_ffi_fwd(
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    lse: u64,
    b: i32,
    sq: i32,
    sk: i32,
    h: i32,
    hk: i32,
    d: i32,
    layout: i32,
    causal: i32,
    family: i32,
) -> i32 {
    report((|| {
        let st = stream()?;
        let sh = Shape::new(b, sq, sk, h, hk, d, layout)?;
        let (opts, over) = options(causal, family)?;
        // SAFETY: the caller's contract.
        let (qb, kb, vb, mut ob) = unsafe {
            (
                Borrowed::<bf16>::new(st, q, sh.q_len()),
                Borrowed::<bf16>::new(st, k, sh.kv_len()),
                Borrowed::<bf16>::new(st, v, sh.kv_len()),
                Borrowed::<bf16>::new(st, out, sh.q_len()),
            )
        };
        // SAFETY: as above.
        let mut lb = (lse != 0).then(|| unsafe { Borrowed::<f32>::new(st, lse, sh.lse_len()) });
        let t = FwdTensors {
            q: Tensor::new(qb.get(), sh.q()),
            k: Tensor::new(kb.get(), sh.kv()),
            v: Tensor::new(vb.get(), sh.kv()),
            out: TensorMut::new(ob.get_mut(), sh.q()),
            lse: lb
                .as_mut()
                .map(|l| l.get_mut() as &mut dyn cudarc::driver::DevicePtrMut<f32>),
        };
        flash_fwd(st, t, &opts.kernel_override(over))
            .map(|_| ())
            .map_err(|e| e.to_string())
    })())
}

/// Backward of `fa_ffi_fwd` with the same shape and options: dq, dk, dv from q, k, v, out,
/// dout and the forward's lse (fp32, (b, h, sq)), bf16; `family` as for the forward.
///
/// # Safety
/// As `fa_ffi_fwd`; every pointer is required.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn fa_ffi_bwd(
    q: u64,
    k: u64,
    v: u64,
    out: u64,
    dout: u64,
    lse: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    b: i32,
    sq: i32,
    sk: i32,
    h: i32,
    hk: i32,
    d: i32,
    layout: i32,
    causal: i32,
    deterministic: i32,
    family: i32,
) -> i32 {
    report((|| {
        let st = stream()?;
        let sh = Shape::new(b, sq, sk, h, hk, d, layout)?;
        let (opts, over) = options(causal, family)?;
        // SAFETY: the caller's contract.
        let (qb, kb, vb, ob, dob, lb, mut dqb, mut dkb, mut dvb) = unsafe {
            (
                Borrowed::<bf16>::new(st, q, sh.q_len()),
                Borrowed::<bf16>::new(st, k, sh.kv_len()),
                Borrowed::<bf16>::new(st, v, sh.kv_len()),
                Borrowed::<bf16>::new(st, out, sh.q_len()),
                Borrowed::<bf16>::new(st, dout, sh.q_len()),
                Borrowed::<f32>::new(st, lse, sh.lse_len()),
                Borrowed::<bf16>::new(st, dq, sh.q_len()),
                Borrowed::<bf16>::new(st, dk, sh.kv_len()),
                Borrowed::<bf16>::new(st, dv, sh.kv_len()),
            )
        };
        let t = BwdTensors {
            q: Tensor::new(qb.get(), sh.q()),
            k: Tensor::new(kb.get(), sh.kv()),
            v: Tensor::new(vb.get(), sh.kv()),
            out: Tensor::new(ob.get(), sh.q()),
            dout: Tensor::new(dob.get(), sh.q()),
            lse: lb.get(),
            dq: TensorMut::new(dqb.get_mut(), sh.q()),
            dk: TensorMut::new(dkb.get_mut(), sh.kv()),
            dv: TensorMut::new(dvb.get_mut(), sh.kv()),
            dsink: None,
        };
        let bopts = BwdOptions::new(opts)
            .deterministic(deterministic != 0)
            .kernel_override(over);
        flash_bwd(st, t, &bopts).map(|_| ()).map_err(|e| e.to_string())
    })())
}
