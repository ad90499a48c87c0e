//! Driver detection, the CUDA context, stream and kernel module.
//!
//! cudarc is built with `dynamic-loading`: libcuda is opened on first use, and cudarc *panics*
//! when the library or one of its symbols is missing. Everything here checks first
//! (`is_culib_present`) and runs driver calls under `catch_unwind` as a last line of defence, so a
//! machine without CUDA gets an `Error::Backend { backend: "cuda", .. }`, never a panic.

use super::buffer::DeviceBuffer;
use super::kernels;
use crate::{Error, Result};
use cudarc::driver::{
    result as cu, sys, CudaContext, CudaFunction, CudaModule, CudaStream, DriverError,
};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

pub(crate) fn backend_err(msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "cuda",
        msg: msg.into(),
    }
}

/// Maps a driver error from `what` to the crate error (out-of-memory gets its own variant).
pub(crate) fn driver_err(what: &str, e: DriverError) -> Error {
    if e.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("cuda: {what}: {e}"))
    } else {
        backend_err(format!("{what}: {e}"))
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic inside cudarc (missing library or symbol) into an error.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(backend_err(format!(
            "{what}: CUDA driver call panicked: {}",
            panic_message(&*p)
        ))),
    }
}

/// The driver's CUDA version as (major, minor), after `cuInit`. Computed once per process.
fn driver() -> std::result::Result<(i32, i32), String> {
    static DRIVER: OnceLock<std::result::Result<(i32, i32), String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let probe = catch_unwind(|| {
                // SAFETY: only tries to dlopen the candidate names; nothing is called yet.
                if !unsafe { sys::is_culib_present() } {
                    return Err(
                        "CUDA driver not found (libcuda.so could not be loaded)".to_string()
                    );
                }
                let mut v = 0i32;
                // SAFETY: plain out-parameter call; valid before cuInit.
                unsafe { sys::cuDriverGetVersion(&mut v) }
                    .result()
                    .map_err(|e| format!("CUDA driver found but cuDriverGetVersion failed: {e}"))?;
                let version = (v / 1000, (v % 1000) / 10);
                cu::init().map_err(|e| {
                    if e.0 == sys::CUresult::CUDA_ERROR_NO_DEVICE {
                        format!(
                            "no CUDA device found (driver {}.{} is installed)",
                            version.0, version.1
                        )
                    } else {
                        format!(
                            "CUDA driver {}.{} found but cuInit failed: {e}",
                            version.0, version.1
                        )
                    }
                })?;
                Ok(version)
            });
            probe.unwrap_or_else(|p| Err(format!("CUDA driver unusable: {}", panic_message(&*p))))
        })
        .clone()
}

/// The CUDA version the driver supports, or why there is no usable driver.
pub fn driver_version() -> std::result::Result<(i32, i32), String> {
    driver()
}

/// Number of CUDA devices (0 when there is no driver).
pub fn device_count() -> usize {
    if driver().is_err() {
        return 0;
    }
    catch_unwind(|| {
        cu::device::get_count()
            .map(|n| n.max(0) as usize)
            .unwrap_or(0)
    })
    .unwrap_or(0)
}

/// `Ok(device name)` when CUDA device 0 is usable by this build (driver, device and compiled
/// kernels all present, context and kernel module load), else `Err(reason)`. Tests use it to skip.
pub fn cuda_available() -> std::result::Result<String, String> {
    match CudaBackend::new(0) {
        Ok(b) => Ok(b.device_name().to_string()),
        Err(Error::Backend { msg, .. }) => Err(msg),
        Err(e) => Err(e.to_string()),
    }
}

const NO_KERNELS: &str = "built without kernels (nvcc was not found when the crate was built; run \
                          scripts/install-cuda-toolchain.sh and rebuild)";

/// One device: a context, the stream all work is queued on, and the loaded kernels.
///
/// All operations are stream-ordered on one stream; host-visible results (`to_host`) synchronise.
/// `CudaBackend` is `Send + Sync`; concurrent use from several threads queues on the same stream.
pub struct CudaBackend {
    ordinal: usize,
    name: String,
    compute_capability: (i32, i32),
    sm_count: usize,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    #[allow(dead_code)] // kept alive for the functions loaded from it
    module: Arc<CudaModule>,
    functions: HashMap<&'static str, CudaFunction>,
    /// Fill every new allocation with 0xFF bytes (NaN in f32, bf16 and f16) so that elements a
    /// kernel fails to write show up as NaN. For tests; off by default.
    poison: std::sync::atomic::AtomicBool,
    /// cuBLASLt handle, workspace and plan cache, created by the first GEMM (gemm.rs).
    lt: super::gemm::LtCell,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaBackend(cuda:{} {}, sm_{}{})",
            self.ordinal, self.name, self.compute_capability.0, self.compute_capability.1
        )
    }
}

impl CudaBackend {
    /// Opens device `ordinal`: checks the driver, the device and the compiled kernels, creates a
    /// context and a stream and loads the embedded fatbin. Every failure is an
    /// `Error::Backend { backend: "cuda", .. }` that says what is missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        let (major, minor) = driver().map_err(|reason| {
            if kernels::kernels_compiled() {
                backend_err(reason)
            } else {
                backend_err(format!("{reason}; {NO_KERNELS}"))
            }
        })?;
        guarded("opening the CUDA device", || {
            Self::open(ordinal, (major, minor))
        })
    }

    fn open(ordinal: usize, driver: (i32, i32)) -> Result<Self> {
        let count = cu::device::get_count().map_err(|e| driver_err("cuDeviceGetCount", e))?;
        if count <= 0 {
            return Err(backend_err(format!(
                "no CUDA device found (driver {}.{} is installed)",
                driver.0, driver.1
            )));
        }
        if ordinal >= count as usize {
            return Err(backend_err(format!(
                "no CUDA device cuda:{ordinal} ({count} device(s) present)"
            )));
        }
        let fatbin = kernels::FATBIN.ok_or_else(|| backend_err(NO_KERNELS))?;

        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating the context", e))?;
        // All work goes on one stream, so cudarc's per-allocation events (cross-stream ordering)
        // are pure cost, and during a CUDA graph capture a wait on an event recorded before the
        // capture would break it. Must happen before the first allocation of this context.
        // SAFETY: the backend uses exactly one stream (below) for every allocation and launch.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(|e| driver_err("cuDeviceGetName", e))?;
        let compute_capability = ctx
            .compute_capability()
            .map_err(|e| driver_err("querying the compute capability", e))?;
        if compute_capability.0 < 8 {
            return Err(backend_err(format!(
                "{name} has compute capability {}.{}; the kernels need 8.0 or newer (Ampere+)",
                compute_capability.0, compute_capability.1
            )));
        }
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(|e| driver_err("querying the SM count", e))?
            .max(1) as usize;
        let stream = ctx
            .new_stream()
            .map_err(|e| driver_err("creating a stream", e))?;

        // from_binary copies into a Vec: the image is handed to the driver from a heap buffer,
        // which is aligned (include_bytes! data has no alignment guarantee).
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec()))
            .map_err(|e| {
                backend_err(format!(
                    "loading the kernels fatbin on {name} (sm_{}{}, driver CUDA {}.{}): {e}. \
                     The fatbin holds {:?}; kernels built with nvcc 13 need a driver for CUDA \
                     13.0 or newer (R580+)",
                    compute_capability.0,
                    compute_capability.1,
                    driver.0,
                    driver.1,
                    kernels::GENCODE
                ))
            })?;
        let mut functions = HashMap::new();
        for &k in kernels::KERNEL_NAMES {
            let f = module
                .load_function(k)
                .map_err(|e| backend_err(format!("kernel `{k}` missing from the fatbin: {e}")))?;
            functions.insert(k, f);
        }

        let has_pool = ctx.has_async_alloc();
        let backend = CudaBackend {
            ordinal,
            name,
            compute_capability,
            sm_count,
            ctx,
            stream,
            module,
            functions,
            poison: std::sync::atomic::AtomicBool::new(false),
            lt: super::gemm::LtCell::new(),
        };
        // Freed memory stays in the device's stream-ordered pool instead of going back to the
        // driver at each synchronisation, so a repeated forward pass allocates from the pool
        // only (no cudaMalloc in the steady state). Devices without memory pools (no async
        // allocation) use plain cuMemAlloc instead.
        if has_pool {
            backend.set_pool_release_threshold(u64::MAX)?;
        }
        Ok(backend)
    }

    pub(crate) fn lt_cell(&self) -> &super::gemm::LtCell {
        &self.lt
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn device_name(&self) -> &str {
        &self.name
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    pub fn sm_count(&self) -> usize {
        self.sm_count
    }

    /// (free, total) device memory in bytes.
    pub fn mem_info(&self) -> Result<(usize, usize)> {
        self.ctx
            .mem_get_info()
            .map_err(|e| driver_err("cuMemGetInfo", e))
    }

    /// Fill every new allocation with NaN bytes (see the field). For tests and debugging.
    pub fn set_poison_allocations(&self, on: bool) {
        self.poison.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits for all queued work, then reports any error recorded asynchronously (in drops).
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| driver_err("cuStreamSynchronize", e))?;
        self.ctx
            .check_err()
            .map_err(|e| driver_err("asynchronous CUDA error", e))
    }

    pub(crate) fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub(crate) fn function(&self, name: &'static str) -> Result<&CudaFunction> {
        self.functions
            .get(name)
            .ok_or_else(|| backend_err(format!("kernel `{name}` is not in KERNEL_NAMES")))
    }

    /// `bytes` of device memory, uninitialised (or NaN-poisoned, see `set_poison_allocations`).
    pub fn alloc(&self, bytes: usize) -> Result<DeviceBuffer> {
        // The driver rejects zero-byte allocations; keep one byte so every buffer is real.
        let n = bytes.max(1);
        // SAFETY: the memory is uninitialised, which is fine for plain bytes: every bit pattern is
        // a valid element of the tensor dtypes, and kernels write before anything reads.
        let mut slice = unsafe { self.stream.alloc::<u8>(n) }
            .map_err(|e| driver_err(&format!("allocating {bytes} bytes"), e))?;
        if self.poison.load(std::sync::atomic::Ordering::Relaxed) {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _record) = slice.device_ptr_mut(&self.stream);
            // SAFETY: `ptr` covers `n` bytes of the allocation just made, queued on its stream.
            unsafe { cu::memset_d8_async(ptr, 0xFF, n, self.stream.cu_stream()) }
                .map_err(|e| driver_err("poisoning an allocation", e))?;
        }
        Ok(DeviceBuffer::new(slice, bytes))
    }

    /// Number of blocks for a grid-stride loop over `n` elements with `block` threads: enough
    /// to fill the GPU several times over, no more (each thread then loops).
    pub(crate) fn grid_for(&self, n: usize, block: u32) -> u32 {
        let wanted = n.div_ceil(block as usize).max(1);
        wanted.min(self.sm_count * 32).min(i32::MAX as usize) as u32
    }

    pub(crate) fn check_device(&self, op: &'static str, buf: &DeviceBuffer) -> Result<()> {
        if buf.ordinal() != self.ordinal {
            return Err(backend_err(format!(
                "{op}: tensor lives on cuda:{}, backend is cuda:{}",
                buf.ordinal(),
                self.ordinal
            )));
        }
        Ok(())
    }
}

// Tensors (which hold DeviceBuffers) and the backend are shared across threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CudaBackend>();
    assert_send_sync::<DeviceBuffer>();
    assert_send_sync::<crate::Tensor>();
};
