//! The bottom layer: driver presence, device facts, lazily loaded modules, raw launches.
//!
//! Modules are loaded once per (context, image) on first use, through a dense index
//! (`OnceLock` per image), and functions once per (module, symbol) with their dynamic shared
//! memory limit raised at that moment. Everything here is thread-safe.

use crate::dispatch::SmArch;
use crate::error::{Error, Result};
use crate::kernels::IMAGES;
use cudarc::driver::sys::{self, CUfunction, CUfunction_attribute, CUmodule};
use cudarc::driver::{CudaContext, CudaStream, DriverError, result};
use std::ffi::{CString, c_void};
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};

/// True when libcuda can be opened. cudarc panics on its first driver call without it, so every
/// public entry point checks this first and returns [`Error::NoDriver`] instead.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: `is_culib_present` only tries to dlopen the library by its usual names.
    *PRESENT.get_or_init(|| unsafe { sys::is_culib_present() })
}

/// Returns [`Error::NoDriver`] when libcuda is absent.
pub fn ensure_driver() -> Result<()> {
    if driver_present() { Ok(()) } else { Err(Error::NoDriver) }
}

/// Facts about a device that choose kernels and tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Arch class.
    pub arch: SmArch,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Largest dynamic shared memory a block may opt in to, in bytes.
    pub max_smem_optin: u32,
    /// Number of SMs.
    pub sm_count: u32,
}

struct Module {
    handle: CUmodule,
    /// Functions already looked up, with their dynamic-smem attribute set.
    functions: Mutex<Vec<(&'static str, CUfunction)>>,
}

// SAFETY: CUmodule / CUfunction are opaque driver handles valid in any thread once the owning
// context is current; access to the function list is behind a Mutex.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

struct ContextState {
    ctx: Weak<CudaContext>,
    cu_ctx: usize,
    info: DeviceInfo,
    /// Per image, indexed by [`Part`]: the SASS fatbin, PTX and deterministic-mode modules.
    modules: Vec<[OnceLock<std::result::Result<Module, DriverError>>; 3]>,
}

fn states() -> &'static RwLock<Vec<Arc<ContextState>>> {
    static STATES: OnceLock<RwLock<Vec<Arc<ContextState>>>> = OnceLock::new();
    STATES.get_or_init(|| RwLock::new(Vec::new()))
}

fn attribute(ctx: &CudaContext, attr: sys::CUdevice_attribute) -> Result<i32> {
    ctx.attribute(attr).map_err(Error::driver("reading a device attribute"))
}

fn query_info(ctx: &CudaContext) -> Result<DeviceInfo> {
    use sys::CUdevice_attribute::*;
    let major = attribute(ctx, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(ctx, CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    let arch = SmArch::from_compute_capability(major, minor)?;
    let max_smem_optin = attribute(ctx, CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)? as u32;
    let sm_count = attribute(ctx, CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
    Ok(DeviceInfo {
        arch,
        compute_capability: (major, minor),
        max_smem_optin,
        sm_count,
    })
}

fn state(ctx: &Arc<CudaContext>) -> Result<Arc<ContextState>> {
    let key = ctx.cu_ctx() as usize;
    let alive = |s: &ContextState| s.cu_ctx == key && s.ctx.upgrade().is_some();
    if let Some(s) = states().read().unwrap().iter().find(|s| alive(s)) {
        return Ok(s.clone());
    }
    let info = query_info(ctx)?;
    let mut all = states().write().unwrap();
    if let Some(s) = all.iter().find(|s| alive(s)) {
        return Ok(s.clone());
    }
    // A state whose context died is stale (its modules died with it): drop it.
    all.retain(|s| s.ctx.upgrade().is_some());
    let s = Arc::new(ContextState {
        ctx: Arc::downgrade(ctx),
        cu_ctx: key,
        info,
        modules: IMAGES
            .iter()
            .map(|_| std::array::from_fn(|_| OnceLock::new()))
            .collect(),
    });
    all.push(s.clone());
    Ok(s)
}

/// Device facts of the stream's context (cached per context).
pub fn device_info(stream: &CudaStream) -> Result<DeviceInfo> {
    ensure_driver()?;
    Ok(state(stream.context())?.info)
}

/// A loaded kernel ready to launch.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Function {
    handle: CUfunction,
}

/// Loads (once) the image `index` (SASS fatbin, or PTX for the driver JIT when `ptx`), and returns
/// `symbol` with its dynamic shared memory limit raised to `smem_bytes`.
pub(crate) fn function(
    stream: &CudaStream,
    index: usize,
    ptx: bool,
    symbol: &'static str,
    smem_bytes: u32,
) -> Result<Function> {
    function_in(
        stream,
        index,
        if ptx { Part::Ptx } else { Part::Sass },
        symbol,
        smem_bytes,
    )
}

/// Like [`function`], from the image's deterministic-mode fatbin (`CellImage::det_fatbin`).
pub(crate) fn det_function(
    stream: &CudaStream,
    index: usize,
    symbol: &'static str,
    smem_bytes: u32,
) -> Result<Function> {
    function_in(stream, index, Part::Det, symbol, smem_bytes)
}

/// Which of an image's embedded fatbins a module is loaded from (`ContextState::modules` index).
#[derive(Clone, Copy)]
enum Part {
    /// `CellImage::fatbin`.
    Sass = 0,
    /// `CellImage::ptx` (driver JIT).
    Ptx = 1,
    /// `CellImage::det_fatbin`.
    Det = 2,
}

fn function_in(
    stream: &CudaStream,
    index: usize,
    part: Part,
    symbol: &'static str,
    smem_bytes: u32,
) -> Result<Function> {
    let ctx = stream.context();
    let st = state(ctx)?;
    ctx.bind_to_thread().map_err(Error::driver("binding the context"))?;
    let image = &IMAGES[index];
    let slot = &st.modules[index][part as usize];
    let module = slot
        .get_or_init(|| {
            let bytes = match part {
                Part::Sass => image.fatbin,
                Part::Ptx => image.ptx.expect("caller checked the PTX image exists"),
                Part::Det => image.det_fatbin.expect("caller checked the deterministic image exists"),
            };
            // SAFETY: `bytes` is a complete fatbin embedded with 64-byte alignment by build.rs.
            let handle = unsafe { result::module::load_data(bytes.as_ptr() as *const c_void) }?;
            Ok(Module {
                handle,
                functions: Mutex::new(Vec::new()),
            })
        })
        .as_ref()
        .map_err(|e| Error::Driver {
            context: "loading a kernel image",
            source: *e,
        })?;
    let mut functions = module.functions.lock().unwrap();
    if let Some(&(_, f)) = functions.iter().find(|(s, _)| *s == symbol) {
        return Ok(Function { handle: f });
    }
    let name = CString::new(symbol).expect("kernel symbols have no NUL");
    // SAFETY: the module is loaded in this (current) context and never unloaded.
    let handle = unsafe { result::module::get_function(module.handle, name) }
        .map_err(Error::driver("finding a kernel in its image"))?;
    if smem_bytes > 48 * 1024 {
        // SAFETY: `handle` is a valid function of a loaded module.
        unsafe {
            result::function::set_function_attribute(
                handle,
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem_bytes as i32,
            )
        }
        .map_err(Error::driver("raising a kernel's shared memory limit"))?;
    }
    functions.push((symbol, handle));
    Ok(Function { handle })
}

/// Launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: u32,
    pub smem_bytes: u32,
}

/// Enqueues `f` on `stream`.
///
/// # Safety
/// `args` must match the kernel's parameter list exactly (types, order), and every device pointer
/// inside them must stay valid until the kernel has run: callers hold cudarc's pointer guards
/// across this call, which records the stream's work on the buffers' events when they drop.
pub(crate) unsafe fn launch(f: Function, geom: Geometry, stream: &CudaStream, args: &mut [*mut c_void]) -> Result<()> {
    let (gx, gy, gz) = geom.grid;
    if gx == 0 || gy == 0 || gz == 0 {
        return Ok(());
    }
    if gy > 65535 || gz > 65535 {
        return Err(Error::TooLarge {
            what: "grid y/z dimension",
            value: gy.max(gz) as usize,
            limit: 65535,
        });
    }
    stream
        .context()
        .bind_to_thread()
        .map_err(Error::driver("binding the context"))?;
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        result::launch_kernel(
            f.handle,
            geom.grid,
            (geom.block, 1, 1),
            geom.smem_bytes,
            stream.cu_stream(),
            args,
        )
    }
    .map_err(Error::driver("launching a kernel"))
}

/// Opens device `ordinal` (its primary context) with typed errors: [`Error::NoDriver`] when libcuda
/// is absent (where `CudaContext::new` would panic), the driver's error otherwise.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>> {
    ensure_driver()?;
    CudaContext::new(ordinal).map_err(Error::driver("opening the device"))
}

/// Number of CUDA devices; [`Error::NoDriver`] when libcuda is absent.
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    result::init().map_err(Error::driver("initialising the driver"))?;
    Ok(result::device::get_count().map_err(Error::driver("counting devices"))? as usize)
}
