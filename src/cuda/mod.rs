//! The kernels of `kernels/infopo.cu` on a GPU, through cudarc (feature `cuda`).
//!
//! Two levels:
//! - [`CudaBackend`] implements [`Backend`] for host data (uploads, one launch, downloads);
//! - the device API works on the trainer's own stream and buffers without copying the logits
//!   and without synchronising: [`CudaBackend::upload_layout`] once per batch,
//!   [`CudaBackend::begin`], then [`CudaBackend::score`] per micro-batch of rows (one launch
//!   each; the last with `finalize = true`, or [`CudaBackend::finish`] after them), then
//!   [`DeviceBatch::check`] / [`DeviceBatch::to_host`] when the caller is ready to wait.
//!   [`CudaBackend::merge_states`] is the same per-micro-batch launch with rows from the
//!   `[P, N, 8]` states of vocabulary ranges instead of logits (`merge.rs`).
//!
//! Other runtimes (tch-rs, burn, custom ones) hand over raw device pointers and their own
//! `CUstream` through [`raw`]; that path shares every check and the launch with this one.
//!
//! The fatbin is embedded at build time (`launch::FATBIN`) and loaded once per CUDA
//! context. A binary built with `cuda` starts on a machine without a driver: [`CudaBackend::new`]
//! returns [`Error::BackendUnavailable`] instead of panicking, whichever linking mode cudarc
//! was built with (the crate probes for the driver library itself, see [`driver_present`]).
//!
//! # Launches are strictly serial on the backend's stream
//!
//! The kernel's cross-block protocols use scratch memory owned by the [`CudaBackend`]: a
//! ticket per row (split rows) and one grid ticket (which block runs the epilogue). Each launch
//! returns every ticket it drew to zero before it ends, so the next launch finds them clean.
//! That holds only if launches that use one backend's scratch never overlap on the GPU and
//! none is cut short:
//! - every launch of a backend goes on its one stream ([`CudaBackend::stream`]), which orders
//!   them; the backend never launches on another stream, and a host mutex orders the enqueues
//!   of threads that share it. Do not capture its launches into a CUDA graph that is replayed
//!   concurrently with itself or on another stream;
//! - a [`DeviceBatch`] is scored only by the backend (stream) that began it (checked);
//! - if a launch is aborted (the trainer gave up on the stream, a kernel was killed, a graph
//!   replay was cancelled), the tickets may be left drawn: call [`CudaBackend::reset_scratch`]
//!   before the next launch. [`CudaBackend::check_scratch`] reads the tickets back (it waits
//!   for the stream) and reports tickets left non-zero; the host path runs it after every batch.

use crate::backend::Backend;
use crate::data::layout::{self, Layout};
use crate::data::{Advantages, Batch, Output, RowOutputs};
use crate::data::{Dtype, LogitData, LogitElement};
use crate::error::{Error, Result};
use crate::launch::{self, launch_shape, KernelArgs};
use crate::params::Params;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice,
    DriverError, LaunchConfig, PushKernelArg,
};
use raw::RowShape;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, OnceLock};

pub mod fused;
mod merge;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod range;
pub mod raw;

/// The cudarc this crate is built against (its `CudaView`s and streams appear in the API).
pub use cudarc;

// SAFETY: KernelArgs is #[repr(C)], plain data (device pointers and numbers), and matches
// `InfopoArgs` of kernels/args.h field for field (checked by a test of `launch`).
unsafe impl DeviceRepr for KernelArgs {}

fn cuda_err(e: DriverError) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// Every entry point of the fatbin, loaded once per context: each launch picks the one of its
/// dtype and kernel variant (`KernelArgs::variant`), so variants can differ between launches.
struct Kernels(HashMap<&'static str, CudaFunction>);

impl Kernels {
    fn get(&self, name: &str) -> Result<&CudaFunction> {
        self.0.get(name).ok_or_else(|| Error::Cuda(format!("the fatbin has no kernel entry point {name:?}")))
    }
}

fn kernels(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    launch::KernelVariant::from_env()?; // an unknown INFOPO_KERNEL_VARIANT: a typed error
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    let key = ctx.cu_ctx() as usize;
    if let Some(k) = cache.get(&key) {
        return Ok(k.clone());
    }
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(launch::FATBIN.to_vec())).map_err(cuda_err)?;
    let mut functions = HashMap::new();
    for name in launch::ENTRY_POINTS {
        functions.insert(name, module.load_function(name).map_err(cuda_err)?);
    }
    let k = Arc::new(Kernels(functions));
    cache.insert(key, k.clone());
    Ok(k)
}

/// Tickets and the split workspace: allocated zeroed, grown on demand, reused by every launch
/// on this backend's stream (the kernel returns the tickets to zero itself; see the module
/// docs for what that assumes).
struct Scratch {
    row_tickets: CudaSlice<u32>,
    grid_ticket: CudaSlice<u32>,
    partials: CudaSlice<f32>,
}

/// The CUDA backend: a stream, the loaded kernels and the scratch buffers.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    kernels: Arc<Kernels>,
    sm_count: u32,
    /// Compute capability ×10 (90 for sm_90): the decision file's choices are per arch.
    arch: u32,
    scratch: Mutex<Scratch>,
    /// The cuBLAS handle of the fused hidden-state path ([`fused`]), on `stream`, made on first use.
    blas: Mutex<Option<Arc<cudarc::cublas::CudaBlas>>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("sm_count", &self.sm_count)
            .field("arch", &self.arch)
            .finish_non_exhaustive()
    }
}

/// File names of the CUDA driver library, most specific first (`libcuda.so.1` is what the
/// driver installs; `libcuda.so` often exists only with the development package).
const DRIVER_LIBRARIES: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };

/// Whether the CUDA driver library can be loaded. Probed by the crate itself rather than with
/// cudarc's `is_culib_present`, which exists only when cudarc loads the driver at run time:
/// with cudarc's `dynamic-linking` (what candle-core picks) the probe still answers, and
/// without a driver cudarc would panic on its first call instead of returning an error.
pub fn driver_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        DRIVER_LIBRARIES.iter().any(|name| {
            // SAFETY: loads the driver library, whose initialisers are the ones any CUDA program
            // runs; the handle is dropped at once (cudarc loads or links it for itself).
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    })
}

/// Opens device `ordinal`'s primary context, or says why not without panicking.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>> {
    if !driver_present() {
        return Err(Error::BackendUnavailable {
            backend: "cuda",
            why: format!("no CUDA driver library ({}) on this machine", DRIVER_LIBRARIES.join(" or ")),
        });
    }
    CudaContext::new(ordinal).map_err(|e| Error::BackendUnavailable {
        backend: "cuda",
        why: format!("cannot open CUDA device {ordinal}: {e:?}"),
    })
}

impl CudaBackend {
    /// The backend on device `ordinal`'s default stream.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_stream(open_context(ordinal)?.default_stream())
    }

    /// The backend on the trainer's own stream: every launch and copy goes on it.
    pub fn with_stream(stream: Arc<CudaStream>) -> Result<Self> {
        let ctx = stream.context().clone();
        let kernels = kernels(&ctx)?;
        use cudarc::driver::sys::CUdevice_attribute as A;
        let attribute = |a| ctx.attribute(a).map_err(cuda_err).map(|v| v as u32);
        let sm_count = attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let arch = 10 * attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?
            + attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        let scratch = Scratch {
            row_tickets: stream.alloc_zeros::<u32>(1).map_err(cuda_err)?,
            grid_ticket: stream.alloc_zeros::<u32>(1).map_err(cuda_err)?,
            partials: stream.alloc_zeros::<f32>(1).map_err(cuda_err)?,
        };
        Ok(CudaBackend { stream, kernels, sm_count, arch, scratch: Mutex::new(scratch), blas: Mutex::new(None) })
    }

    /// The backend of `stream`, made on the first call for its (context, stream) and shared
    /// by every later call: an adapter handed a stream per call (the candle entries) then
    /// looks up the module, allocates the scratch and creates the cuBLAS handle once, not per
    /// step. The cache keeps each such stream alive until the process ends (a trainer has a
    /// few); launches through the shared backend stay ordered by its stream and host mutex.
    #[cfg(feature = "candle")]
    pub(crate) fn shared(stream: &Arc<CudaStream>) -> Result<Arc<CudaBackend>> {
        type Key = (usize, usize);
        static CACHE: OnceLock<Mutex<HashMap<Key, Arc<CudaBackend>>>> = OnceLock::new();
        let key = (stream.context().cu_ctx() as usize, stream.cu_stream() as usize);
        let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = cache.get(&key) {
            return Ok(b.clone());
        }
        let backend = Arc::new(CudaBackend::with_stream(stream.clone())?);
        cache.insert(key, backend.clone());
        Ok(backend)
    }

    /// The stream every launch and copy of this backend goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Checks that device buffers (named by `what`, each given by the stream it was allocated
    /// or is used on) live in this backend's CUDA context: a launch would otherwise dereference
    /// another device's addresses (an illegal address that poisons the context, or a silent
    /// peer read), which no other check sees.
    fn check_context(&self, buffers: &[(&str, &Arc<CudaStream>)]) -> Result<()> {
        let ours = self.stream.context();
        for (what, stream) in buffers {
            let theirs = stream.context();
            if theirs.cu_ctx() != ours.cu_ctx() {
                return Err(Error::Cuda(format!(
                    "device buffer `{what}` lives on CUDA device {} (another context), this backend on device {}",
                    theirs.ordinal(),
                    ours.ordinal()
                )));
            }
        }
        Ok(())
    }

    /// Zeroes the ticket scratch (on the stream, ordered after everything enqueued before),
    /// for a trainer that aborted a launch: a kernel that did not run to its end may leave
    /// tickets drawn, and the next launch would then elect the wrong blocks. Not needed after
    /// launches that completed, which clean up after themselves.
    pub fn reset_scratch(&self) -> Result<()> {
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let scratch = &mut *guard;
        self.stream.memset_zeros(&mut scratch.row_tickets).map_err(cuda_err)?;
        self.stream.memset_zeros(&mut scratch.grid_ticket).map_err(cuda_err)?;
        Ok(())
    }

    /// Waits for the stream and checks that every launch so far returned its tickets to zero,
    /// as completed, non-overlapping launches do. Tickets left drawn mean an aborted launch or
    /// launches that overlapped (see the module docs); the error says to call
    /// [`CudaBackend::reset_scratch`]. Costs one synchronisation and a copy of one u32 per row of
    /// the largest launch so far.
    pub fn check_scratch(&self) -> Result<()> {
        let guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let grid = self.stream.clone_dtoh(&guard.grid_ticket).map_err(cuda_err)?;
        let rows = self.stream.clone_dtoh(&guard.row_tickets).map_err(cuda_err)?;
        let drawn = rows.iter().filter(|&&t| t != 0).count();
        if grid[0] != 0 || drawn != 0 {
            return Err(Error::Cuda(format!(
                "kernel tickets left drawn (grid ticket {}, {drawn} row tickets): a launch was aborted \
                 or two launches overlapped; call CudaBackend::reset_scratch before the next launch",
                grid[0]
            )));
        }
        Ok(())
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    pub fn device_name(&self) -> Result<String> {
        self.stream.context().name().map_err(cuda_err)
    }

    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// Compute capability ×10 (90 for sm_90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// Uploads a validated layout (see [`Layout::new`], and [`Layout::with_credit_start`] for
    /// `token_advantage`) for the batches that use it.
    pub fn upload_layout(&self, layout: &Layout) -> Result<DeviceLayout> {
        // Layout's fields are public: the kernel's epilogue indexes device buffers with every
        // offset and id in it (and writes token_advantage through the credited spans), so a
        // hand-built layout is re-derived and compared before anything is uploaded.
        layout::layout_consistent(layout)?;
        let s = &self.stream;
        let up32 = |v: &[u32]| s.clone_htod(&*nonempty(v)).map_err(cuda_err);
        let groups = match &layout.groups {
            None => None,
            Some(g) => Some(DeviceGroups {
                outcome: s.clone_htod(&g.trajectory_outcome).map_err(cuda_err)?,
                tokens: up32(&g.trajectory_tokens)?,
                trajectory_offsets: up32(&g.group_trajectory_offsets)?,
                trajectories: up32(&g.group_trajectories)?,
                turn_offsets: up32(&g.group_turn_offsets)?,
                turns: up32(&g.group_turns)?,
                token_offsets: s.clone_htod(&g.trajectory_token_offsets).map_err(cuda_err)?,
                credit_start: g.turn_credit_start.as_ref().map(|v| up32(v)).transpose()?,
                pad_offset: g.pad_width.map(|_| up32(&g.pad_offset)).transpose()?,
            }),
        };
        Ok(DeviceLayout {
            layout: layout.clone(),
            turn_offsets: up32(&layout.turn_offsets)?,
            turn_trajectory: up32(&layout.turn_trajectory)?,
            turn_credit: up32(&layout.turn_credit)?,
            groups,
        })
    }

    /// Starts a batch: zeroed per-turn accumulators, outputs and error word on the stream.
    pub fn begin<'l>(&self, layout: Option<&'l DeviceLayout>, params: &Params) -> Result<DeviceBatch<'l>> {
        params.validate()?;
        let s = &self.stream;
        let zeros = |n: usize| s.alloc_zeros::<f64>(n.max(1)).map_err(cuda_err);
        let turns = layout.map_or(0, |l| l.layout.turns());
        let groups = layout.and_then(|l| l.layout.groups.as_ref());
        let trajectories = groups.map_or(0, |g| g.trajectory_group.len());
        // [M] only when the layout has credit starts (the kernel writes it then).
        let tokens = groups.filter(|g| g.turn_credit_start.is_some()).map_or(0, |g| g.total_tokens as usize);
        // [B × L] only when the layout asks for the padded output.
        let padded = groups.and_then(|g| g.pad_width).map_or(0, |w| trajectories * w as usize);
        Ok(DeviceBatch {
            layout,
            params: *params,
            carried: s.alloc_zeros::<u64>(2 * turns + 1).map_err(cuda_err)?,
            turn_info: zeros(turns)?,
            turn_intrinsic: zeros(turns)?,
            turn_norm: zeros(turns)?,
            turn_bonus: zeros(turns)?,
            traj_advantage: zeros(trajectories)?,
            traj_gate: zeros(trajectories)?,
            scalars: zeros(3)?,
            token_advantage: zeros(tokens)?,
            padded_advantage: zeros(padded)?,
            rows_seen: 0,
            finalized: false,
            epilogue_shape: (Dtype::F32, 1),
        })
    }

    /// One launch over the next `targets.len()` rows of the batch (rows are numbered in the
    /// order they arrive). Returns the row outputs, [5 × rows] f32 (`row_out[k * rows + r]`,
    /// k = lse_real, lse_masked, log_ratio, kl, entropy_real). With `finalize`, the same launch
    /// also computes the advantages. Asynchronous: nothing waits for the GPU.
    pub fn score<T: LogitElement + DeviceRepr>(
        &self,
        batch: &mut DeviceBatch<'_>,
        real: &CudaView<'_, T>,
        masked: &CudaView<'_, T>,
        targets: &CudaView<'_, i64>,
        vocab: usize,
        finalize: bool,
    ) -> Result<CudaSlice<f32>> {
        let mut row_out = self.stream.alloc_zeros::<f32>((5 * targets.len()).max(1)).map_err(cuda_err)?;
        self.score_into(batch, real, masked, targets, vocab, finalize, &mut row_out)?;
        Ok(row_out)
    }

    /// [`CudaBackend::score`] into a caller-owned buffer of at least 5 × rows f32 (no allocation).
    #[allow(clippy::too_many_arguments)]
    pub fn score_into<T: LogitElement + DeviceRepr>(
        &self,
        batch: &mut DeviceBatch<'_>,
        real: &CudaView<'_, T>,
        masked: &CudaView<'_, T>,
        targets: &CudaView<'_, i64>,
        vocab: usize,
        finalize: bool,
        row_out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        if vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        let rows = targets.len();
        let expected = rows.checked_mul(vocab);
        if expected != Some(real.len()) || expected != Some(masked.len()) {
            return Err(Error::shape(format!(
                "device logits hold {} (real) and {} (masked) elements, expected {rows} targets x {vocab} vocab",
                real.len(),
                masked.len()
            )));
        }
        if row_out.len() < 5 * rows {
            return Err(Error::shape(format!("row_out holds {} f32, needs 5 x {rows}", row_out.len())));
        }
        self.check_context(&[
            ("real", real.stream()),
            ("masked", masked.stream()),
            ("targets", targets.stream()),
            ("row_out", row_out.stream()),
        ])?;
        let shape = RowShape { rows, vocab, row_stride: vocab, dtype: T::DTYPE };
        // The guards keep cudarc's stream ordering (events) around the launch.
        let (real_ptr, _g0) = real.device_ptr(&self.stream);
        let (masked_ptr, _g1) = masked.device_ptr(&self.stream);
        let (targets_ptr, _g2) = targets.device_ptr(&self.stream);
        let (row_out_ptr, _g3) = row_out.device_ptr_mut(&self.stream);
        let pointers = RowPointers { real: real_ptr, masked: masked_ptr, targets: targets_ptr, row_out: row_out_ptr };
        self.launch_rows(batch, &shape, pointers, finalize)
    }

    /// The one path from checked rows to a launch, shared by [`CudaBackend::score_into`] and
    /// [`CudaBackend::score_raw`]: checks the shape and the batch, launches, books the rows.
    fn launch_rows(
        &self,
        batch: &mut DeviceBatch<'_>,
        shape: &RowShape,
        pointers: RowPointers,
        finalize: bool,
    ) -> Result<()> {
        shape.validate()?;
        self.check_batch(batch, shape.rows, finalize)?;
        self.launch(batch, shape.dtype, shape.rows, shape.vocab, finalize, pointers, None)?;
        batch.rows_seen += shape.rows;
        batch.finalized |= finalize;
        Ok(())
    }

    /// Checks that `rows` more rows (and a finalisation, if asked) fit `batch`.
    fn check_batch(&self, batch: &DeviceBatch<'_>, rows: usize, finalize: bool) -> Result<()> {
        // The batch's accumulators and this backend's tickets are ordered by one stream only
        // if the batch was begun on it (see the module docs).
        if **batch.carried.stream() != *self.stream {
            return Err(Error::Cuda(
                "this DeviceBatch was begun on another backend's stream; score it with that backend".into(),
            ));
        }
        if batch.finalized {
            return Err(Error::turns("this batch was already finalised"));
        }
        launch::check_global_rows(batch.rows_seen, rows)?;
        if let Some(l) = batch.layout {
            let total = *l.layout.turn_offsets.last().unwrap_or(&0) as usize;
            if batch.rows_seen + rows > total {
                return Err(Error::turns(format!(
                    "rows {}..{} go past the layout's {total} rows",
                    batch.rows_seen,
                    batch.rows_seen + rows
                )));
            }
            if finalize && batch.rows_seen + rows != total {
                return Err(Error::turns(format!(
                    "finalising after {} of the layout's {total} rows",
                    batch.rows_seen + rows
                )));
            }
        }
        Ok(())
    }

    /// Finalises a batch whose rows all went through [`CudaBackend::score`] without `finalize`:
    /// one epilogue-only launch, in blocks of the size of the batch's last launch with rows (the
    /// epilogue's f64 reductions follow the block size; the emulated backend sizes its
    /// epilogue-only launch from the batch's vocabulary and dtype too).
    pub fn finish(&self, batch: &mut DeviceBatch<'_>) -> Result<()> {
        if batch.finalized {
            return Ok(());
        }
        self.check_batch(batch, 0, true)?;
        let (dtype, vocab) = batch.epilogue_shape;
        self.launch(batch, dtype, 0, vocab, true, RowPointers::default(), None)?;
        batch.finalized = true;
        Ok(())
    }

    /// One launch on the stream: the logit entry point of `dtype` over `pointers`' rows, or with
    /// `merge` the merge-mode entry point over range states (`merge::merge_states`).
    #[allow(clippy::too_many_arguments)]
    fn launch(
        &self,
        batch: &mut DeviceBatch<'_>,
        dtype: Dtype,
        rows: usize,
        vocab: usize,
        finalize: bool,
        pointers: RowPointers,
        merge: Option<MergeSource>,
    ) -> Result<()> {
        let shape = match merge {
            Some(_) => launch::merge_shape(rows, vocab, self.arch),
            None => launch_shape(rows, vocab, dtype, self.sm_count, self.arch),
        };
        if rows > 0 {
            // Merge mode sizes its blocks as an f32 launch of the same vocabulary does.
            batch.epilogue_shape = (if merge.is_some() { Dtype::F32 } else { dtype }, vocab);
        }
        let s = &self.stream;
        let mut args = KernelArgs {
            real: pointers.real as *const c_void,
            masked: pointers.masked as *const c_void,
            targets: pointers.targets as *const i64,
            row_out: pointers.row_out as *mut f32,
            ..KernelArgs::new(&batch.params, &shape, rows, vocab, batch.rows_seen, finalize)
        };
        if let Some(m) = merge {
            args.merge_states = m.states as *const f32;
            args.merge_parts = m.parts as i64;
        }
        // Pointers of every buffer; the guards keep cudarc's stream ordering until launch.
        // `carried` = [turn_sum (T f64) | turn_count (T f64) | error word (u64)]: one memset
        // zeroes a batch (see `DeviceBatch::restart`).
        let turns = batch.layout.map_or(0, |l| l.layout.turns()) as u64;
        let (carried, _g0) = batch.carried.device_ptr_mut(s);
        args.turn_sum = carried as *mut f64;
        args.turn_count = (carried + 8 * turns) as *mut f64;
        let error_word = carried + 16 * turns;
        args.error_word = error_word as *mut u64;
        let mut guards = Vec::new();
        if let Some(l) = batch.layout {
            args.n_turns = l.layout.turns() as i64;
            let (a, g) = l.turn_offsets.device_ptr(s);
            args.turn_offsets = a as *const u32;
            guards.push(g);
            let (a, g) = l.turn_trajectory.device_ptr(s);
            args.turn_trajectory = a as *const u32;
            guards.push(g);
            let (a, g) = l.turn_credit.device_ptr(s);
            args.turn_credit = a as *const u32;
            guards.push(g);
            if let (Some(d), Some(h)) = (&l.groups, &l.layout.groups) {
                args.n_traj = h.trajectory_group.len() as i64;
                args.n_groups = l.layout.groups() as i64;
                args.total_tokens = h.total_tokens as f64;
                let (a, g) = d.outcome.device_ptr(s);
                args.trajectory_outcome = a as *const f64;
                guards.push(g);
                for (slot, buf) in [
                    (&mut args.trajectory_tokens, &d.tokens),
                    (&mut args.group_trajectory_offsets, &d.trajectory_offsets),
                    (&mut args.group_trajectories, &d.trajectories),
                    (&mut args.group_turn_offsets, &d.turn_offsets),
                    (&mut args.group_turns, &d.turns),
                ] {
                    let (a, g) = buf.device_ptr(s);
                    *slot = a as *const u32;
                    guards.push(g);
                }
                if let Some(starts) = &d.credit_start {
                    let (a, g) = starts.device_ptr(s);
                    args.turn_credit_start = a as *const u32;
                    guards.push(g);
                    let (a, g) = d.token_offsets.device_ptr(s);
                    args.trajectory_token_offsets = a as *const u64;
                    guards.push(g);
                }
                if let (Some(offset), Some(width)) = (&d.pad_offset, h.pad_width) {
                    let (a, g) = offset.device_ptr(s);
                    args.pad_offset = a as *const u32;
                    args.pad_width = width as i64;
                    guards.push(g);
                }
            }
        }
        let mut out_guards = Vec::new();
        for (slot, buf) in [
            (&mut args.turn_info, &mut batch.turn_info),
            (&mut args.turn_intrinsic, &mut batch.turn_intrinsic),
            (&mut args.turn_norm, &mut batch.turn_norm),
            (&mut args.turn_bonus, &mut batch.turn_bonus),
            (&mut args.traj_advantage, &mut batch.traj_advantage),
            (&mut args.traj_gate, &mut batch.traj_gate),
            (&mut args.scalars, &mut batch.scalars),
        ] {
            let (a, g) = buf.device_ptr_mut(s);
            *slot = a as *mut f64;
            out_guards.push(g);
        }
        if !args.turn_credit_start.is_null() {
            let (a, g) = batch.token_advantage.device_ptr_mut(s);
            args.token_advantage = a as *mut f64;
            out_guards.push(g);
        }
        if !args.pad_offset.is_null() {
            let (a, g) = batch.padded_advantage.device_ptr_mut(s);
            args.padded_advantage = a as *mut f64;
            out_guards.push(g);
        }
        // SAFETY: every pointer in `args` is a live device buffer of the documented length on
        // this stream (lengths checked in `score_into`/`begin`, or promised by the caller of
        // `score_raw`); the guards above keep them ordered until the launch is enqueued.
        unsafe { self.launch_on_scratch(dtype, &shape, args) }
    }

    /// Grows this backend's scratch for a launch of `shape` over `args.n_rows` rows, points
    /// `args` at it (row tickets, grid ticket, split partials) and launches on the stream the
    /// `dtype` entry point, or the merge entry point when `args.merge_states` is set: the one
    /// launch site of every mode (rows, epilogue, partial states, merge).
    ///
    /// # Safety
    /// Every other pointer in `args` is a live device buffer of this context, of the length
    /// `kernels/args.h` states for the launch's mode, kept alive and ordered on this stream (the
    /// caller holds cudarc's guards across the call); `shape` is the launch shape `args` was
    /// made for.
    unsafe fn launch_on_scratch(&self, dtype: Dtype, shape: &launch::LaunchShape, mut args: KernelArgs) -> Result<()> {
        let rows = args.n_rows as usize;
        let mut guard = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        let scratch = &mut *guard;
        let s = &self.stream;
        if scratch.row_tickets.len() < rows {
            scratch.row_tickets = s.alloc_zeros::<u32>(rows).map_err(cuda_err)?;
        }
        let partials = launch::partials_len(rows, shape.splits);
        if shape.splits > 1 && scratch.partials.len() < partials {
            scratch.partials = s.alloc_zeros::<f32>(partials).map_err(cuda_err)?;
        }
        let (partials_ptr, _g1) = scratch.partials.device_ptr_mut(s);
        let (row_tickets, _g2) = scratch.row_tickets.device_ptr_mut(s);
        let (grid_ticket, _g3) = scratch.grid_ticket.device_ptr_mut(s);
        args.partials = partials_ptr as *mut f32;
        args.row_tickets = row_tickets as *mut u32;
        args.grid_ticket = grid_ticket as *mut u32;
        let cfg = LaunchConfig { grid_dim: (shape.grid, 1, 1), block_dim: (shape.threads, 1, 1), shared_mem_bytes: 0 };
        let func = self.kernels.get(if args.merge_states.is_null() {
            launch::entry_point(dtype, launch::KernelVariant::from_code(args.variant))
        } else {
            launch::MERGE_ENTRY_POINT
        })?;
        // SAFETY: the caller vouches for the pointers it set; the scratch is exclusively ours
        // (mutex) and serial (one stream), sized above for this shape; the struct matches the
        // kernel's parameter.
        unsafe { s.launch_builder(func).arg(&args).launch(cfg) }.map_err(cuda_err)?;
        if let Some(shape) = launch::token_launch(&args) {
            let cfg =
                LaunchConfig { grid_dim: (shape.grid, 1, 1), block_dim: (shape.threads, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: the same args, next on the same stream: the epilogue's outputs are final.
            unsafe { s.launch_builder(self.kernels.get(launch::TOKENS_ENTRY_POINT)?).arg(&args).launch(cfg) }
                .map_err(cuda_err)?;
        }
        Ok(())
    }
}

/// Device addresses of one launch's rows (0 for a launch without rows).
#[derive(Clone, Copy, Default)]
struct RowPointers {
    real: u64,
    masked: u64,
    targets: u64,
    row_out: u64,
}

/// Merge mode (`merge::merge_states`): the rows come from `[parts][rows][8]` f32 range states
/// instead of logits.
#[derive(Clone, Copy)]
struct MergeSource {
    states: u64,
    parts: usize,
}

struct DeviceGroups {
    outcome: CudaSlice<f64>,
    tokens: CudaSlice<u32>,
    trajectory_offsets: CudaSlice<u32>,
    trajectories: CudaSlice<u32>,
    turn_offsets: CudaSlice<u32>,
    turns: CudaSlice<u32>,
    /// `[B+1]` prefix sums of the trajectory tokens.
    token_offsets: CudaSlice<u64>,
    /// `[T]` with credit starts.
    credit_start: Option<CudaSlice<u32>>,
    /// `[B]` with the padded output.
    pad_offset: Option<CudaSlice<u32>>,
}

/// A validated turn/trajectory layout on the device.
pub struct DeviceLayout {
    layout: Layout,
    turn_offsets: CudaSlice<u32>,
    turn_trajectory: CudaSlice<u32>,
    turn_credit: CudaSlice<u32>,
    groups: Option<DeviceGroups>,
}

impl DeviceLayout {
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
}

/// The per-batch device state: carried per-turn accumulators, outputs and the error word.
pub struct DeviceBatch<'l> {
    layout: Option<&'l DeviceLayout>,
    params: Params,
    /// [turn_sum (T f64) | turn_count (T f64) | error word (u64)], zeroed per batch.
    carried: CudaSlice<u64>,
    /// `[T]` mean estimator per turn over the rows seen so far.
    pub turn_info: CudaSlice<f64>,
    /// `[T]` after finalisation.
    pub turn_intrinsic: CudaSlice<f64>,
    pub turn_norm: CudaSlice<f64>,
    pub turn_bonus: CudaSlice<f64>,
    /// `[B]` after finalisation.
    pub traj_advantage: CudaSlice<f64>,
    pub traj_gate: CudaSlice<f64>,
    /// `[3]` outcome_std, intrinsic_std, magnitude_ratio after finalisation.
    pub scalars: CudaSlice<f64>,
    /// `[M]` per-token advantages after finalisation, when the layout has credit starts
    /// (`layout::credit_spans`); trajectory i's tokens start at Σ_{j<i} tokens_j. A
    /// one-element placeholder otherwise.
    pub token_advantage: CudaSlice<f64>,
    /// `[B × L]` the padded token output after finalisation, when the layout asks for it
    /// ([`Layout::with_padding`]); a one-element placeholder otherwise.
    pub padded_advantage: CudaSlice<f64>,
    rows_seen: usize,
    finalized: bool,
    /// (dtype, vocab) of the last launch with rows: the block size of [`CudaBackend::finish`].
    epilogue_shape: (Dtype, usize),
}

impl DeviceBatch<'_> {
    /// Starts the batch over, reusing its buffers: one memset on the stream, no allocation.
    pub fn restart(&mut self) -> Result<()> {
        let stream = self.carried.stream().clone();
        stream.memset_zeros(&mut self.carried).map_err(cuda_err)?;
        self.rows_seen = 0;
        self.finalized = false;
        Ok(())
    }

    /// Waits for the stream and returns the first row error of the batch, if any
    /// (the target is not known on this path: see [`Error::Row`]).
    pub fn check(&self) -> Result<()> {
        let stream = self.carried.stream().clone();
        let n = self.carried.len();
        let word = stream.clone_dtoh(&self.carried.slice(n - 1..)).map_err(cuda_err)?[0];
        match launch::decode_error_word(word)? {
            None => Ok(()),
            Some(fault) => Err(fault.into_error(None, self.layout.map(|l| &l.layout.turn_offsets[..]))),
        }
    }

    /// Rows scored so far.
    pub fn rows_seen(&self) -> usize {
        self.rows_seen
    }

    /// Waits, checks for errors and copies the turn and trajectory outputs to the host.
    pub fn to_host(&self) -> Result<(Option<Vec<f64>>, Option<Advantages>)> {
        self.check()?;
        let Some(l) = self.layout else { return Ok((None, None)) };
        let stream = self.carried.stream().clone();
        let down = |b: &CudaSlice<f64>, n: usize| -> Result<Vec<f64>> {
            let mut v = stream.clone_dtoh(b).map_err(cuda_err)?;
            v.truncate(n);
            Ok(v)
        };
        let t = l.layout.turns();
        let info = down(&self.turn_info, t)?;
        let advantages = match (&l.layout.groups, self.finalized) {
            (Some(g), true) => {
                let b = g.trajectory_group.len();
                let scalars = down(&self.scalars, 3)?;
                Some(Advantages {
                    turn_intrinsic: down(&self.turn_intrinsic, t)?,
                    turn_intrinsic_norm: down(&self.turn_norm, t)?,
                    turn_bonus: down(&self.turn_bonus, t)?,
                    trajectory_advantage: down(&self.traj_advantage, b)?,
                    trajectory_gate: down(&self.traj_gate, b)?,
                    outcome_std: scalars[0],
                    intrinsic_std: scalars[1],
                    magnitude_ratio: scalars[2],
                    token_advantage: match g.turn_credit_start {
                        Some(_) => Some(down(&self.token_advantage, g.total_tokens as usize)?),
                        None => None,
                    },
                    padded_advantage: match g.pad_width {
                        Some(w) => Some(down(&self.padded_advantage, b * w as usize)?),
                        None => None,
                    },
                })
            }
            _ => None,
        };
        Ok((Some(info), advantages))
    }
}

/// Copies [5 × rows] device row outputs to host [`RowOutputs`] (waits for `stream`). `row_out`
/// may be longer (a reused buffer): only its first 5 × rows f32 are copied; a shorter one is
/// [`Error::Shape`].
pub fn rows_to_host(stream: &Arc<CudaStream>, row_out: &CudaSlice<f32>, rows: usize) -> Result<RowOutputs> {
    let needed = rows.checked_mul(launch::ROW_OUT_FLOATS).filter(|&n| n <= row_out.len()).ok_or_else(|| {
        Error::shape(format!("row_out holds {} f32, needs {} x {rows}", row_out.len(), launch::ROW_OUT_FLOATS))
    })?;
    if rows == 0 {
        return Ok(RowOutputs::with_len(0));
    }
    let v = stream.clone_dtoh(&row_out.slice(..needed)).map_err(cuda_err)?;
    let part = |k: usize| v[k * rows..(k + 1) * rows].to_vec();
    Ok(RowOutputs { lse_real: part(0), lse_masked: part(1), log_ratio: part(2), kl: part(3), entropy_real: part(4) })
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        let bounds = layout::micro_batches(cuts, batch.real.rows())?;
        match (batch.real.data(), batch.masked.data()) {
            (LogitData::F32(x), LogitData::F32(y)) => self.compute_host(batch, x, y, layout.as_ref(), params, &bounds),
            (LogitData::F16(x), LogitData::F16(y)) => self.compute_host(batch, x, y, layout.as_ref(), params, &bounds),
            (LogitData::BF16(x), LogitData::BF16(y)) => {
                self.compute_host(batch, x, y, layout.as_ref(), params, &bounds)
            }
            (x, y) => Err(Error::DtypeMismatch { real: x.dtype().name(), masked: y.dtype().name() }),
        }
    }

    /// cuBLAS chunk GEMMs, the kernel in partial-state mode per chunk, then one merge launch
    /// with the turns and the epilogue ([`fused`]).
    fn compute_hidden(&self, batch: &crate::data::HiddenBatch<'_>, params: &Params, chunk: usize) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        self.compute_hidden_tensors(0, &batch.tensors, batch.targets, layout.as_ref(), params, chunk)
    }

    /// Rows only, through the same device path as [`Backend::compute_hidden`].
    fn score_hidden_rows(
        &self,
        first_row: usize,
        tensors: &crate::data::HiddenTensors<'_>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        self.compute_hidden_tensors(first_row, tensors, targets, None, params, chunk).map(|out| out.rows)
    }
}

impl CudaBackend {
    /// Uploads host data once, then one launch per micro-batch of `bounds`.
    fn compute_host<T: LogitElement + DeviceRepr>(
        &self,
        batch: &Batch<'_>,
        real: &[T],
        masked: &[T],
        layout: Option<&Layout>,
        params: &Params,
        bounds: &[usize],
    ) -> Result<Output> {
        let s = &self.stream;
        let (n, vocab) = (batch.real.rows(), batch.real.vocab());
        let device_layout = layout.map(|l| self.upload_layout(l)).transpose()?;
        let mut state = self.begin(device_layout.as_ref(), params)?;
        let real = s.clone_htod(&*nonempty(real)).map_err(cuda_err)?;
        let masked = s.clone_htod(&*nonempty(masked)).map_err(cuda_err)?;
        let targets = s.clone_htod(&*nonempty(batch.targets)).map_err(cuda_err)?;
        let mut row_out = s.alloc_zeros::<f32>((5 * n).max(1)).map_err(cuda_err)?;
        let launches = bounds.len() - 1;
        for (k, w) in bounds.windows(2).enumerate() {
            let (r0, r1) = (w[0], w[1]);
            let finalize = k + 1 == launches;
            if r0 == r1 {
                if finalize {
                    self.finish(&mut state)?;
                }
                continue;
            }
            let mut part = s.alloc_zeros::<f32>(5 * (r1 - r0)).map_err(cuda_err)?;
            self.score_into(
                &mut state,
                &real.slice(r0 * vocab..r1 * vocab),
                &masked.slice(r0 * vocab..r1 * vocab),
                &targets.slice(r0..r1),
                vocab,
                finalize,
                &mut part,
            )?;
            // Gather the micro-batch's [5 × m] block into the batch's [5 × n] layout.
            for k in 0..5 {
                let m = r1 - r0;
                s.memcpy_dtod(&part.slice(k * m..(k + 1) * m), &mut row_out.slice_mut(k * n + r0..k * n + r1))
                    .map_err(cuda_err)?;
            }
        }
        let fill_target = |e: Error| match e {
            Error::Row { row, kind, .. } => Error::Row { row, kind, target: Some(batch.targets[row]) },
            other => other,
        };
        let (turn_info, advantages) = state.to_host().map_err(fill_target)?;
        // The stream is idle now: a cheap check that the launches left the tickets clean.
        self.check_scratch()?;
        let rows = rows_to_host(s, &row_out, n)?;
        Ok(Output { rows, turn_info, advantages })
    }
}

/// `v` itself, or a one-element placeholder when it is empty (cudarc cannot allocate 0
/// elements). Borrowed otherwise: the uploads of whole logit tensors make no host copy.
fn nonempty<T: bytemuck::Zeroable + Copy>(v: &[T]) -> std::borrow::Cow<'_, [T]> {
    if v.is_empty() {
        std::borrow::Cow::Owned(vec![T::zeroed()])
    } else {
        std::borrow::Cow::Borrowed(v)
    }
}
