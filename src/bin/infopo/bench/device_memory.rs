//! Device memory one call adds beyond what the GPU held when the call began
//! (`infopo bench --fused-linear --backend cuda`), measured two ways:
//!
//! - **the stream-ordered pool**: cudarc 0.19 allocates every `CudaSlice` with `cuMemAllocAsync`
//!   when the device supports memory pools (`CudaContext::has_async_alloc`, from
//!   `CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED`), i.e. from the device's current pool
//!   (`cuDeviceGetMemPool`). Before a call, its `CU_MEMPOOL_ATTR_USED_MEM_HIGH` is reset (set to
//!   0) and `CU_MEMPOOL_ATTR_USED_MEM_CURRENT` read; after it, the high watermark minus the used
//!   memory at the reset is the most the call's own allocations held at once — the counterpart of
//!   PyTorch's `max_memory_allocated()` − `memory_allocated()` at `reset_peak_memory_stats()`.
//!   Without pools cudarc uses `cuMemAlloc`, which nothing counts: the probe then says so
//!   ([`DevicePool::open`] returns the reason) and reports no number.
//! - **`cuMemGetInfo`**: the device's free memory before minus after the call (signed): memory
//!   the call took outside the pool (cuBLAS's workspace on the handle's first use, a pool growing
//!   its reservation) and kept. Coarse (the pool keeps freed memory reserved, other processes
//!   count too), so it is reported beside the pool's number, never instead of it.

use cudarc::driver::sys::{self, CUmemPool_attribute as Attr};
use cudarc::driver::{result, CudaStream};
use infopo_kernels::Error;
use std::ffi::c_void;
use std::sync::Arc;

fn driver_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("device memory probe: {what}: {e:?}"))
}

/// The pool cudarc's allocations on a stream come from.
pub struct DevicePool {
    pool: sys::CUmemoryPool,
}

impl DevicePool {
    /// The current pool of `stream`'s device, or why the allocations cannot be counted.
    pub fn open(stream: &Arc<CudaStream>) -> Result<DevicePool, String> {
        let ctx = stream.context();
        if !ctx.has_async_alloc() {
            return Err("the device does not support memory pools (CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED \
                        is 0): cudarc allocates with cuMemAlloc, which no counter tracks"
                .into());
        }
        ctx.bind_to_thread().map_err(|e| format!("cannot bind the CUDA context: {e:?}"))?;
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: writes one pool handle for a valid device of the bound context.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| format!("cuDeviceGetMemPool failed: {e:?}"))?;
        Ok(DevicePool { pool })
    }

    fn get(&self, attr: Attr) -> Result<u64, Error> {
        let mut value: sys::cuuint64_t = 0;
        // SAFETY: the used-memory attributes are cuuint64_t values of a live pool.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut value as *mut _ as *mut c_void) }
            .result()
            .map_err(|e| driver_err("cuMemPoolGetAttribute", e))?;
        Ok(value)
    }

    fn reset_high_watermark(&self) -> Result<(), Error> {
        let mut zero: sys::cuuint64_t = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t that may only be set to 0 (a reset).
        unsafe {
            sys::cuMemPoolSetAttribute(
                self.pool,
                Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                &mut zero as *mut _ as *mut c_void,
            )
        }
        .result()
        .map_err(|e| driver_err("cuMemPoolSetAttribute(USED_MEM_HIGH, 0)", e))
    }

    /// Memory of the pool in use by this process's allocations now.
    pub fn used(&self) -> Result<u64, Error> {
        self.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }
}

/// An open measurement of one call on `stream`.
pub struct DeviceProbe<'a> {
    stream: &'a Arc<CudaStream>,
    pool: Option<&'a DevicePool>,
    used_at_reset: u64,
    free_before: usize,
}

/// What one call added on the device, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct DevicePeak {
    /// The pool's high watermark minus its use at the reset (None without a pool).
    pub pool_beyond_start: Option<u64>,
    /// `cuMemGetInfo`'s free memory before minus after (negative when the device freed memory).
    pub used_increase: i64,
}

/// `cuMemGetInfo`: (free, total) bytes of the current context's device.
pub fn mem_get_info(stream: &Arc<CudaStream>) -> Result<(usize, usize), Error> {
    stream.context().bind_to_thread().map_err(|e| driver_err("bind the context", e))?;
    result::mem_get_info().map_err(|e| driver_err("cuMemGetInfo", e))
}

impl<'a> DeviceProbe<'a> {
    /// Waits for the stream (nothing earlier is counted), then resets the pool's high watermark.
    pub fn start(stream: &'a Arc<CudaStream>, pool: Option<&'a DevicePool>) -> Result<Self, Error> {
        stream.synchronize().map_err(|e| driver_err("synchronize", e))?;
        let used_at_reset = match pool {
            Some(p) => {
                p.reset_high_watermark()?;
                p.used()?
            }
            None => 0,
        };
        let (free_before, _) = mem_get_info(stream)?;
        Ok(DeviceProbe { stream, pool, used_at_reset, free_before })
    }

    /// Waits for the stream (everything the call enqueued has run), then reads the peak.
    pub fn finish(self) -> Result<DevicePeak, Error> {
        self.stream.synchronize().map_err(|e| driver_err("synchronize", e))?;
        let pool_beyond_start = match self.pool {
            // The watermark restarts from 0 at the reset; a call that allocated nothing from the
            // pool leaves it under the use at the reset: it added nothing.
            Some(p) => Some(p.get(Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?.saturating_sub(self.used_at_reset)),
            None => None,
        };
        let (free_after, _) = mem_get_info(self.stream)?;
        Ok(DevicePeak { pool_beyond_start, used_increase: self.free_before as i64 - free_after as i64 })
    }
}
