//! InfoPO from hidden states and the lm_head weight on the GPU, the `[N, V]` logits never
//! stored (the CPU reference is [`crate::reference::score_hidden`]).
//!
//! For each chunk of `chunk` token ids `[v0, v0 + c)`, on the backend's one stream:
//! 1. two cuBLAS GEMMs (`cublasGemmEx`, fp32 compute; bf16/f16 inputs on the tensor cores, f32
//!    inputs in full fp32) write the chunk's logits `hidden · lm_head[v0..v0+c]ᵀ` for the real
//!    and the masked hidden states into two f32 `[N, c]` buffers — kept in f32, not rounded to
//!    the input dtype;
//! 2. the kernel in partial-state mode ([`CudaBackend::score_range_into`]) folds them into the
//!    rows' states over the chunk, written to slice `k` of a `[K, N, 8]` f32 states buffer
//!    (÷ τs as on the logits path);
//! 3. after the last chunk, the merge turns the `K` chunk states into the row outputs
//!    and, through [`crate::Backend::compute_hidden`], the turn means and the epilogue: one
//!    launch of the kernel's merge mode ([`CudaBackend::merge_range_states`],
//!    [`CudaBackend::merge_states`]), then one download of the outputs.
//!
//! **Memory beyond the inputs**: `2 · N · c` f32 of chunk logits, `K · N · 8` f32 of states
//! (`K = ⌈V / c⌉`), the kernel's split workspace (only for few rows) and cuBLAS's own workspace
//! (a few MiB per handle) — O(N·c), never O(N·V).
//!
//! The chunk buffers are used in turn by one stream, so chunk `k + 1`'s GEMMs wait for chunk
//! `k`'s reduction. Overlapping them needs a second stream and a second pair of buffers; that is
//! only worth its memory if a GPU measurement shows the reduction is not already hidden behind
//! the GEMMs (it reads `2 · N · c` f32 per chunk against the GEMMs' `4 · N · c · D` flops), so
//! it is not done here (see `benches/cuda.rs`, which times the GEMMs alone against the path).

use super::range::RangeColumns;
use super::{cuda_err, nonempty, CudaBackend, DeviceBatch};
use crate::data::HiddenInputs;
use crate::data::RowOutputs;
use crate::data::{Dtype, LogitElement};
use crate::error::{Error, Result};
use crate::math::range::{chunk_ranges, shard_chunk_ranges, shard_ranges, VocabRange};
use crate::params::Params;
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice};
use std::ffi::{c_int, c_void};
use std::sync::{Arc, OnceLock};

/// File names of the cuBLAS library that cudarc's run-time loader tries (the ones a CUDA 11–13
/// toolkit or the `nvidia-cublas` wheels install).
const CUBLAS_LIBRARIES: &[&str] = if cfg!(windows) {
    &["cublas64_13.dll", "cublas64_12.dll", "cublas64_11.dll", "cublas.dll"]
} else {
    &["libcublas.so.13", "libcublas.so.12", "libcublas.so.11", "libcublas.so"]
};

/// Whether the cuBLAS library can be loaded. cudarc's `fallback-dynamic-loading` loads it on
/// the first cuBLAS call and panics when it is missing, so the fused path asks first (as
/// [`super::driver_present`] does for the driver). When cudarc links cuBLAS instead (a
/// `dynamic-linking` build such as candle's), the library is already in the process and the
/// probe finds it by name.
pub fn cublas_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        CUBLAS_LIBRARIES.iter().any(|name| {
            // SAFETY: loads the cuBLAS library (its initialisers are the ones any cuBLAS program
            // runs); the handle is dropped at once (cudarc loads or links it for itself).
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    })
}

/// The fused path's inputs on the device, row-major, one element type (f32, f16 or bf16):
/// `real_hidden` and `masked_hidden` `[rows, hidden]`, `lm_head` `[vocab, hidden]`, row `j` the
/// weights of token id `j` — or, for [`CudaBackend::score_hidden_shard_states`], one rank's
/// padded lm_head shard, `vocab` its padded width and row `j` token id `shard.start + j`.
#[derive(Debug)]
pub struct DeviceHiddenInputs<'a, T> {
    pub real_hidden: CudaView<'a, T>,
    pub masked_hidden: CudaView<'a, T>,
    pub lm_head: CudaView<'a, T>,
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl<T> DeviceHiddenInputs<'_, T> {
    fn validate(&self, targets: usize, chunk: usize) -> Result<()> {
        if self.vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        if self.hidden == 0 {
            return Err(Error::shape("hidden width D is 0"));
        }
        if chunk == 0 {
            return Err(Error::shape("the vocabulary chunk must hold at least one token id"));
        }
        let want = |what: &str, len: usize, a: usize, b: usize| -> Result<()> {
            match a.checked_mul(b) {
                Some(n) if n == len => Ok(()),
                _ => Err(Error::shape(format!("{what} holds {len} elements, expected [{a}, {b}]"))),
            }
        };
        want("real_hidden", self.real_hidden.len(), self.rows, self.hidden)?;
        want("masked_hidden", self.masked_hidden.len(), self.rows, self.hidden)?;
        want("lm_head", self.lm_head.len(), self.vocab, self.hidden)?;
        if targets != self.rows {
            return Err(Error::shape(format!("{targets} targets for {} rows", self.rows)));
        }
        // cuBLAS takes 32-bit dimensions and leading dimensions.
        let c = chunk.min(self.vocab);
        for (what, n) in [("rows", self.rows), ("hidden width", self.hidden), ("vocabulary chunk", c)] {
            if c_int::try_from(n).is_err() {
                return Err(Error::shape(format!("{what} {n} exceeds cuBLAS's 32-bit dimensions")));
            }
        }
        Ok(())
    }
}

impl CudaBackend {
    /// This backend's cuBLAS handle (created on first use, on the backend's stream), or
    /// [`Error::BackendUnavailable`] when the cuBLAS library cannot be loaded.
    fn blas(&self) -> Result<Arc<CudaBlas>> {
        if !cublas_present() {
            return Err(Error::BackendUnavailable {
                backend: "cuda",
                why: format!(
                    "the fused hidden-state path needs cuBLAS, and no cuBLAS library ({}) loads on this machine",
                    CUBLAS_LIBRARIES.join(" or ")
                ),
            });
        }
        let mut slot = self.blas.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = &*slot {
            return Ok(b.clone());
        }
        let b = Arc::new(CudaBlas::new(self.stream().clone()).map_err(|e| Error::Cuda(format!("cuBLAS: {e:?}")))?);
        *slot = Some(b.clone());
        Ok(b)
    }

    /// Every row's outputs from host hidden states and lm_head ([`HiddenInputs`]), computed on
    /// the GPU over vocabulary chunks of `chunk` token ids (see the module docs): uploads the
    /// inputs once, then the chunk loop and one merge launch ([`CudaBackend::score_hidden_batch`]).
    /// Agrees with the float64
    /// reference [`crate::math::chunks::score_hidden`] to the kernels' tolerance, with the same row
    /// errors (global rows from 0).
    pub fn score_hidden<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &HiddenInputs<'_, T>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        Ok(self.compute_hidden_host(inputs, targets, None, params, chunk)?.rows)
    }

    /// [`CudaBackend::score_hidden`] on device inputs (a trainer's own buffers, on or ordered
    /// before this backend's stream): the chunk loop of [`CudaBackend::score_hidden_states`]
    /// into a `[K, N, 8]` buffer it allocates, then the merge
    /// on the device ([`CudaBackend::merge_range_states`]), then one download of the rows.
    pub fn score_hidden_device<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &DeviceHiddenInputs<'_, T>,
        targets: &CudaView<'_, i64>,
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        inputs.validate(targets.len(), chunk)?;
        let ranges = chunk_ranges(inputs.vocab, chunk);
        let floats = ranges.len() * inputs.rows * crate::launch::RANGE_STATE_FLOATS;
        let mut states = self.stream().alloc_zeros::<f32>(floats.max(1)).map_err(cuda_err)?;
        self.score_hidden_states(inputs, targets, params, chunk, &mut states.as_view_mut())?;
        self.merge_range_states(&states.slice(..floats), &ranges, targets, inputs.vocab, params)
    }

    /// The chunk loop alone, asynchronous on the backend's stream: chunk `k` of
    /// [`chunk_ranges`]`(vocab, chunk)` is scored into `states[k·N·8 .. (k+1)·N·8]` (the
    /// kernel's f32 units, see [`CudaBackend::score_range_into`]). `states` holds at least
    /// `K · N · 8` f32. Returns the ranges, for the merge. Allocates the two `[N, c]` f32 chunk
    /// buffers (stream-ordered) and nothing else.
    pub fn score_hidden_states<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &DeviceHiddenInputs<'_, T>,
        targets: &CudaView<'_, i64>,
        params: &Params,
        chunk: usize,
        states: &mut CudaViewMut<'_, f32>,
    ) -> Result<Vec<VocabRange>> {
        inputs.validate(targets.len(), chunk)?;
        let ranges = chunk_ranges(inputs.vocab, chunk);
        self.chunk_loop(inputs, &ranges, 0, targets, params, states)?;
        Ok(ranges)
    }

    /// The chunk loop of one rank of a vocabulary-parallel lm_head (Megatron/vLLM shards,
    /// [`crate::math::range::shard_ranges`]): `inputs.lm_head` is rank `rank`'s padded shard
    /// `[⌈V / P⌉, D]` (P = `world`, V = `vocab`), its row `j` token id `shard.start + j`; rows
    /// past the shard's valid length are padding, never read. Writes the
    /// [`shard_chunk_ranges`]`(vocab, world, rank, chunk)` states (`K = ⌈⌈V / P⌉ / chunk⌉`
    /// chunks on every rank, trailing ones empty on a short last shard) into `states`, ready for
    /// an all-gather ([`CudaBackend::gather_merge_shards`] with the same `chunk`).
    /// Asynchronous. Returns the ranges.
    #[allow(clippy::too_many_arguments)]
    pub fn score_hidden_shard_states<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &DeviceHiddenInputs<'_, T>,
        vocab: usize,
        (rank, world): (usize, usize),
        targets: &CudaView<'_, i64>,
        params: &Params,
        chunk: usize,
        states: &mut CudaViewMut<'_, f32>,
    ) -> Result<Vec<VocabRange>> {
        inputs.validate(targets.len(), chunk)?;
        let ranges = shard_chunk_ranges(vocab, world, rank, chunk)?;
        if inputs.vocab != vocab.div_ceil(world) {
            return Err(Error::shape(format!(
                "an lm_head shard of {} rows, expected the padded width ceil({vocab} / {world}) = {}",
                inputs.vocab,
                vocab.div_ceil(world)
            )));
        }
        let first_id = shard_ranges(vocab, world)?[rank].start;
        self.chunk_loop(inputs, &ranges, first_id, targets, params, states)?;
        Ok(ranges)
    }

    /// Scores `ranges` (token ids; lm_head row `id - first_id`, all inside `inputs.lm_head`)
    /// into consecutive `[N, 8]` slices of `states`: per range two chunk GEMMs and one
    /// partial-state launch (an empty range writes the empty state).
    fn chunk_loop<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &DeviceHiddenInputs<'_, T>,
        ranges: &[VocabRange],
        first_id: usize,
        targets: &CudaView<'_, i64>,
        params: &Params,
        states: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        params.validate()?;
        let (n, d) = (inputs.rows, inputs.hidden);
        let per_chunk = n * crate::launch::RANGE_STATE_FLOATS;
        if ranges.len().checked_mul(per_chunk).is_none_or(|f| f > states.len()) {
            return Err(Error::shape(format!(
                "the states buffer holds {} f32, needs {} chunks x {n} rows x {}",
                states.len(),
                ranges.len(),
                crate::launch::RANGE_STATE_FLOATS
            )));
        }
        debug_assert!(ranges.iter().all(|r| r.start >= first_id && r.end() - first_id <= inputs.vocab));
        let c = ranges.iter().map(|r| r.len).max().unwrap_or(0);
        if n == 0 || ranges.is_empty() {
            return Ok(());
        }
        self.check_context(&[
            ("real_hidden", inputs.real_hidden.stream()),
            ("masked_hidden", inputs.masked_hidden.stream()),
            ("lm_head", inputs.lm_head.stream()),
        ])?;
        let blas = self.blas()?;
        let s = self.stream();
        let mut real_logits = s.alloc_zeros::<f32>((n * c).max(1)).map_err(cuda_err)?;
        let mut masked_logits = s.alloc_zeros::<f32>((n * c).max(1)).map_err(cuda_err)?;
        for (k, range) in ranges.iter().enumerate() {
            let cells = n * range.len;
            if range.len > 0 {
                let row0 = range.start - first_id;
                let weight = inputs.lm_head.slice(row0 * d..(row0 + range.len) * d);
                for (hidden, out) in
                    [(&inputs.real_hidden, &mut real_logits), (&inputs.masked_hidden, &mut masked_logits)]
                {
                    chunk_gemm(&blas, s, T::DTYPE, &weight, hidden, &mut out.slice_mut(..cells), range.len, n, d)?;
                }
            }
            self.score_range_into(
                &real_logits.slice(..cells),
                &masked_logits.slice(..cells),
                targets,
                RangeColumns::shard(range.len, *range),
                params,
                &mut states.slice_mut(k * per_chunk..(k + 1) * per_chunk),
            )?;
        }
        Ok(())
    }
}

/// The `cublasGemmEx` arguments of one chunk GEMM, `out [n, len]` (row-major) =
/// `hidden [n, d]` · `weight [len, d]`ᵀ (both row-major, `weight` the lm_head rows of the chunk's
/// token ids). cuBLAS is column-major, and a row-major `[r, c]` matrix is the column-major
/// `[c, r]` one with leading dimension `c`: so this is `outᵀ [len, n] = weight · hiddenᵀ`, with
/// `A` = the column-major `[d, len]` (`weight`) read transposed (`op(A) = Aᵀ`, `lda = d`), `B` =
/// the column-major `[d, n]` (`hidden`) as is (`ldb = d`) and `C` = the column-major `[len, n]`
/// (`out`, `ldc = len`). Every dimension is checked into cuBLAS's 32-bit `int` here, before any
/// cast; `tests/gpu/cuda_fused.rs` runs these arguments through a column-major GEMM on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkGemm {
    /// `op(A) = Aᵀ` (`CUBLAS_OP_T`) when true.
    pub transpose_a: bool,
    /// `op(B) = Bᵀ` (`CUBLAS_OP_T`) when true.
    pub transpose_b: bool,
    pub m: c_int,
    pub n: c_int,
    pub k: c_int,
    pub lda: c_int,
    pub ldb: c_int,
    pub ldc: c_int,
}

impl ChunkGemm {
    /// The arguments for a chunk of `len` token ids, `rows` rows and hidden width `hidden`
    /// (all ≥ 1 and at most `i32::MAX`, else [`Error::Shape`]).
    pub fn new(len: usize, rows: usize, hidden: usize) -> Result<Self> {
        let dim = |what: &str, v: usize| -> Result<c_int> {
            match c_int::try_from(v) {
                Ok(x) if x > 0 => Ok(x),
                _ => Err(Error::shape(format!("{what} {v} is not in cuBLAS's 1..=2^31 - 1"))),
            }
        };
        let (m, n, k) = (dim("vocabulary chunk", len)?, dim("rows", rows)?, dim("hidden width", hidden)?);
        Ok(ChunkGemm { transpose_a: true, transpose_b: false, m, n, k, lda: k, ldb: k, ldc: m })
    }
}

/// One chunk GEMM ([`ChunkGemm`]) on `blas`'s stream (`stream`, the backend's: the handle was
/// created on it), fp32 compute, f32 output.
#[allow(clippy::too_many_arguments)]
fn chunk_gemm<T: DeviceRepr>(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    dtype: Dtype,
    weight: &CudaView<'_, T>,
    hidden: &CudaView<'_, T>,
    out: &mut CudaViewMut<'_, f32>,
    len: usize,
    n: usize,
    d: usize,
) -> Result<()> {
    let g = ChunkGemm::new(len, n, d)?;
    if weight.len() != len * d || hidden.len() != n * d || out.len() != n * len {
        return Err(Error::shape(format!(
            "chunk GEMM buffers of {}, {} and {} elements for [{len}, {d}], [{n}, {d}] and [{n}, {len}]",
            weight.len(),
            hidden.len(),
            out.len()
        )));
    }
    let input_type = match dtype {
        Dtype::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
        Dtype::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        Dtype::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
    };
    let op =
        |t: bool| if t { blas_sys::cublasOperation_t::CUBLAS_OP_T } else { blas_sys::cublasOperation_t::CUBLAS_OP_N };
    let (alpha, beta) = (1.0f32, 0.0f32);
    // cuBLAS works in the context current on the calling thread: make it the handle's.
    stream.context().bind_to_thread().map_err(cuda_err)?;
    let (w, _g0) = weight.device_ptr(stream);
    let (h, _g1) = hidden.device_ptr(stream);
    let (o, _g2) = out.device_ptr_mut(stream);
    // SAFETY: the three device buffers hold exactly the elements these dimensions and leading
    // dimensions address (checked above), in this handle's context; `out` does not alias the
    // inputs (a separate allocation); alpha/beta are host f32, as CUBLAS_COMPUTE_32F reads them
    // in the handle's pointer mode (host: cudarc's default, never changed on this private
    // handle); the guards order the buffers on the handle's stream and are held across the call.
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            op(g.transpose_a),
            op(g.transpose_b),
            g.m,
            g.n,
            g.k,
            (&alpha) as *const f32 as *const c_void,
            w as *const c_void,
            input_type,
            g.lda,
            h as *const c_void,
            input_type,
            g.ldb,
            (&beta) as *const f32 as *const c_void,
            o as *mut c_void,
            blas_sys::cudaDataType_t::CUDA_R_32F,
            g.ldc,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .map_err(|e| Error::Cuda(format!("cuBLAS GEMM of a vocabulary chunk: {e:?}")))
}

/// The fused path through the [`crate::Backend`] trait (`infopo compute --backend cuda` on a
/// hidden-state file): host inputs uploaded once, the chunk loop, then ONE merge launch that
/// also runs the turn means and the epilogue of `layout` on the device, as a logit launch does.
impl CudaBackend {
    pub(crate) fn compute_hidden_tensors(
        &self,
        first_row: usize,
        tensors: &crate::data::HiddenTensors<'_>,
        targets: &[i64],
        layout: Option<&crate::data::layout::Layout>,
        params: &Params,
        chunk: usize,
    ) -> Result<crate::data::Output> {
        // Row errors name global rows (`first_row + row`), as on the other backends.
        crate::data::layout::global_rows(first_row, targets.len())?;
        let out = match tensors.dtype() {
            Dtype::F32 => self.compute_hidden_host(&tensors.typed::<f32>()?, targets, layout, params, chunk),
            Dtype::F16 => self.compute_hidden_host(&tensors.typed::<half::f16>()?, targets, layout, params, chunk),
            Dtype::BF16 => self.compute_hidden_host(&tensors.typed::<half::bf16>()?, targets, layout, params, chunk),
        };
        out.map_err(|e| match e {
            Error::Row { row, kind, .. } => {
                Error::Row { row: first_row + row, kind, target: targets.get(row).copied() }
            }
            other => other,
        })
    }

    /// The fused path as one micro-batch of a [`DeviceBatch`] (its τs, its turn layout): the
    /// chunk loop ([`CudaBackend::score_hidden_states`]) into a `[K, N, 8]` states buffer, then
    /// ONE merge-mode launch ([`CudaBackend::merge_states`]) that gives the rows, adds them to
    /// the batch's turns and, with `finalize`, runs the epilogue. Asynchronous on the stream;
    /// returns the `[5 × N]` row outputs (one padding element when there are no rows: then
    /// only the epilogue runs, when `finalize`). Check errors with [`DeviceBatch::check`] or
    /// [`DeviceBatch::to_host`].
    pub fn score_hidden_batch<T: LogitElement + DeviceRepr>(
        &self,
        batch: &mut DeviceBatch<'_>,
        inputs: &DeviceHiddenInputs<'_, T>,
        targets: &CudaView<'_, i64>,
        chunk: usize,
        finalize: bool,
    ) -> Result<CudaSlice<f32>> {
        inputs.validate(targets.len(), chunk)?;
        let rows = inputs.rows;
        if rows == 0 {
            if finalize {
                self.finish(batch)?;
            }
            return self.stream().alloc_zeros::<f32>(1).map_err(cuda_err);
        }
        let params = batch.params;
        let ranges = chunk_ranges(inputs.vocab, chunk);
        let floats = ranges.len() * rows * crate::launch::RANGE_STATE_FLOATS;
        let mut states = self.stream().alloc_zeros::<f32>(floats).map_err(cuda_err)?;
        self.score_hidden_states(inputs, targets, &params, chunk, &mut states.as_view_mut())?;
        self.merge_states(batch, &states.as_view(), ranges.len(), targets, inputs.vocab, finalize)
    }

    fn compute_hidden_host<T: LogitElement + DeviceRepr>(
        &self,
        inputs: &HiddenInputs<'_, T>,
        targets: &[i64],
        layout: Option<&crate::data::layout::Layout>,
        params: &Params,
        chunk: usize,
    ) -> Result<crate::data::Output> {
        params.validate()?;
        let s = self.stream();
        let up = |v: &[T]| s.clone_htod(&*nonempty(v)).map_err(cuda_err);
        let (real, masked, head) = (up(inputs.real_hidden)?, up(inputs.masked_hidden)?, up(inputs.lm_head)?);
        let t = s.clone_htod(&*nonempty(targets)).map_err(cuda_err)?;
        let device = DeviceHiddenInputs {
            real_hidden: real.slice(..inputs.real_hidden.len()),
            masked_hidden: masked.slice(..inputs.masked_hidden.len()),
            lm_head: head.slice(..inputs.lm_head.len()),
            rows: inputs.rows,
            hidden: inputs.hidden,
            vocab: inputs.vocab,
        };
        // Before slicing the targets to the rows: a count mismatch is a typed error.
        device.validate(targets.len(), chunk)?;
        let device_layout = layout.map(|l| self.upload_layout(l)).transpose()?;
        let mut batch = self.begin(device_layout.as_ref(), params)?;
        let rows = inputs.rows;
        let row_out = self.score_hidden_batch(&mut batch, &device, &t.slice(..rows), chunk, true)?;
        let (turn_info, advantages) = batch.to_host()?;
        // The stream is idle now: a cheap check that the launches left the tickets clean.
        self.check_scratch()?;
        let rows_out = if rows == 0 { RowOutputs::with_len(0) } else { super::rows_to_host(s, &row_out, rows)? };
        Ok(crate::data::Output { rows: rows_out, turn_info, advantages })
    }
}
