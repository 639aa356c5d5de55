//! Raw device pointers and a caller-owned `CUstream`, for runtimes that are not cudarc-based
//! (tch-rs, burn through its raw handles, custom runtimes).
//!
//! ```no_run
//! # use infopo_kernels::{cuda::{raw::RawRows, CudaBackend}, Dtype, Params};
//! # fn demo(stream: infopo_kernels::cuda::raw::CUstream, real: u64, masked: u64, targets: u64, row_out: u64)
//! # -> infopo_kernels::Result<()> {
//! // Once per (device, stream): the caller's stream, borrowed (never destroyed by us).
//! let backend = unsafe { CudaBackend::from_raw_stream(0, stream)? };
//! let mut batch = backend.begin(None, &Params::default())?;
//! let rows = RawRows { real, masked, targets, row_out, rows: 8, vocab: 151936, row_stride: 151936, dtype: Dtype::BF16 };
//! // SAFETY: see `CudaBackend::score_raw`: the buffers live and stay unwritten until the
//! // launch completes on `stream`.
//! unsafe { backend.score_raw(&mut batch, &rows, true)? };
//! batch.check()?; // waits for the stream; row errors come back here
//! # Ok(()) }
//! ```
//!
//! Everything after the pointers is the safe API's: [`CudaBackend::score_raw`] checks the
//! shape and the batch exactly as [`CudaBackend::score_into`] does and goes through the same
//! launch; only the pointers themselves are the caller's promise.

use super::{open_context, CudaBackend, DeviceBatch, RowPointers};
use crate::data::Dtype;
use crate::error::{Error, Result};
/// The driver's types, re-exported so a caller need not name cudarc's version itself.
pub use cudarc::driver::sys::{CUdeviceptr, CUstream};

/// The rows of one launch, as device addresses in the backend's CUDA context.
///
/// `real` and `masked` hold `rows` rows of `vocab` logits of `dtype`; row `r` starts at element
/// `r * row_stride`. **Today `row_stride` must equal `vocab`** (the device API launches row `r`
/// at `r * vocab`; a padded stride is refused with [`Error::Shape`] until it passes the
/// kernel's `row_stride` argument, which only partial-state mode uses so far). `targets` holds `rows` i64 token ids; `row_out` receives `[5 × rows]` f32
/// (`row_out[k * rows + r]`, k = lse_real, lse_masked, log_ratio, kl, entropy_real).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawRows {
    pub real: CUdeviceptr,
    pub masked: CUdeviceptr,
    pub targets: CUdeviceptr,
    pub row_out: CUdeviceptr,
    pub rows: usize,
    pub vocab: usize,
    /// Elements between the starts of consecutive rows of `real` and of `masked` (≥ `vocab`;
    /// today exactly `vocab`).
    pub row_stride: usize,
    pub dtype: Dtype,
}

impl RawRows {
    /// The checks that need no GPU: the shape (as for every launch) and the pointers (non-null
    /// and aligned to their element types). [`CudaBackend::score_raw`] runs them first.
    pub fn validate(&self) -> Result<()> {
        self.shape().validate()?;
        if self.rows == 0 {
            return Ok(());
        }
        let elem = self.dtype.size_bytes() as u64;
        for (name, ptr, align) in [
            ("real", self.real, elem),
            ("masked", self.masked, elem),
            ("targets", self.targets, 8),
            ("row_out", self.row_out, 4),
        ] {
            if ptr == 0 {
                return Err(Error::shape(format!("raw pointer `{name}` is null")));
            }
            if ptr % align != 0 {
                return Err(Error::shape(format!(
                    "raw pointer `{name}` = {ptr:#x} is not aligned to its {align}-byte elements"
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn shape(&self) -> RowShape {
        RowShape { rows: self.rows, vocab: self.vocab, row_stride: self.row_stride, dtype: self.dtype }
    }

    fn pointers(&self) -> RowPointers {
        RowPointers { real: self.real, masked: self.masked, targets: self.targets, row_out: self.row_out }
    }
}

/// The shape of one launch's rows, checked the same way on the safe and the raw path.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowShape {
    pub rows: usize,
    pub vocab: usize,
    pub row_stride: usize,
    pub dtype: Dtype,
}

impl RowShape {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        // Row indices are 32-bit in the layout and the error word, as on the host path.
        if self.rows > u32::MAX as usize {
            return Err(Error::shape(format!("{} rows exceed the 2^32 - 1 supported", self.rows)));
        }
        if self.row_stride < self.vocab {
            return Err(Error::shape(format!(
                "row stride {} is less than the vocabulary {}: rows would overlap",
                self.row_stride, self.vocab
            )));
        }
        if self.row_stride != self.vocab {
            return Err(Error::shape(format!(
                "row stride {} differs from the vocabulary {}: the device API launches rows back to \
                 back (row r at element r * vocab) and does not pass a stride yet",
                self.row_stride, self.vocab
            )));
        }
        let elements = self.rows.checked_mul(self.row_stride);
        if elements.and_then(|n| n.checked_mul(self.dtype.size_bytes())).is_none_or(|b| b > isize::MAX as usize) {
            return Err(Error::shape(format!(
                "{} rows of stride {} overflow the address space",
                self.rows, self.row_stride
            )));
        }
        Ok(())
    }
}

impl CudaBackend {
    /// The backend on a stream owned by the caller (another runtime's `CUstream`), on device
    /// `ordinal`'s primary context (the one the CUDA runtime, PyTorch and tch use). Probes for
    /// the driver first: without one this is [`Error::BackendUnavailable`].
    ///
    /// # Safety
    /// - `stream` is a valid `CUstream` of device `ordinal`'s primary context, or null for
    ///   that context's legacy default stream;
    /// - it stays valid (not destroyed) for as long as this backend, every [`DeviceBatch`],
    ///   [`super::DeviceLayout`] and buffer it returns are alive: they enqueue their frees on it
    ///   when dropped. This backend never destroys the stream.
    pub unsafe fn from_raw_stream(ordinal: usize, stream: CUstream) -> Result<Self> {
        let ctx = open_context(ordinal)?;
        // SAFETY: the caller promises the stream's validity and lifetime (above).
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::with_stream(stream)
    }

    /// [`CudaBackend::score_into`] on raw device pointers: one launch over the next
    /// `rows.rows` rows of `batch`, on this backend's stream, asynchronous (nothing waits).
    /// Every check of the safe path runs (shape, 32-bit row count, batch state, layout rows)
    /// plus [`RawRows::validate`]; a violation is a typed error and nothing is launched. Row
    /// errors (bad targets, non-finite logits) come back from [`DeviceBatch::check`].
    ///
    /// # Safety
    /// What the caller keeps true, since the pointers cannot be checked:
    /// - **Memory.** `real`/`masked` are device allocations of this backend's context holding
    ///   at least `(rows - 1) * row_stride + vocab` elements of `dtype` each; `targets` at least
    ///   `rows` i64; `row_out` at least `5 * rows` f32, not overlapping any input.
    /// - **Lifetime.** All four stay allocated, and the inputs unwritten, until this launch has
    ///   completed on the backend's stream; `row_out` is not read before then. Enqueuing the
    ///   free or the next write on the same stream after this call is enough (stream order);
    ///   a stream-ordered caching allocator (PyTorch's) is fine when the tensors are recorded
    ///   on this stream. Work on *other* streams is not ordered for you: if the inputs were
    ///   produced on another stream, make this stream wait for it (an event) before the call.
    /// - **Serial launches.** The backend's launches run one after another on its stream (see
    ///   the module docs of [`super`]); do not abort them half-way, or call
    ///   [`CudaBackend::reset_scratch`] if you did.
    pub unsafe fn score_raw(&self, batch: &mut DeviceBatch<'_>, rows: &RawRows, finalize: bool) -> Result<()> {
        rows.validate()?;
        self.launch_rows(batch, &rows.shape(), rows.pointers(), finalize)
    }
}
