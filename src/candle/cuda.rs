//! The CUDA half of the candle adapter: candle's stream, candle's buffers, the device API of
//! [`crate::cuda`]. Inputs are read in place and the outputs are candle device buffers.

use super::{contiguous_range, AdvantageTensors, BatchOutput, CallLayout, HiddenShape, HiddenStates, InputShape};
use crate::cuda::fused::DeviceHiddenInputs;
use crate::cuda::{CudaBackend, DeviceBatch};
use crate::data::layout::{self, Layout};
use crate::data::{Dtype, LogitElement};
use crate::error::{Error, Result};
use crate::params::Params;
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr};

/// A view of a CUDA tensor's elements at its layout's offset (no copy).
fn view<'s, T: CudaDType + DeviceRepr>(
    name: &'static str,
    storage: &'s Storage,
    layout: &candle_core::Layout,
) -> Result<CudaView<'s, T>> {
    let Storage::Cuda(cuda) = storage else {
        return Err(Error::Candle(format!("`{name}` reports a CUDA device but its storage is not on CUDA")));
    };
    let (start, end) = contiguous_range(name, layout)?;
    let slice = cuda.as_cuda_slice::<T>()?;
    if end > slice.len() {
        return Err(Error::Candle(format!("`{name}`'s layout {start}..{end} exceeds its storage")));
    }
    Ok(slice.slice(start..end))
}

/// A candle tensor of shape `[len]` owning `slice` (which may hold more elements: the
/// device API pads empty buffers to one element).
fn wrap<T: CudaDType>(slice: CudaSlice<T>, len: usize, device: &CudaDevice) -> Result<Tensor> {
    let held = slice.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
    let tensor = Tensor::from_storage(storage, held, BackpropOp::none(), false);
    Ok(if held == len { tensor } else { tensor.narrow(0, 0, len)? })
}

/// What one launch over every row reads: the two logit tensors, or the fused path's hidden
/// states and lm_head. [`launch`] dispatches on the dtype once for both.
pub(super) trait Inputs {
    fn rows(&self) -> usize;
    fn dtype(&self) -> Dtype;
    /// One micro-batch of `batch` over every row, finalising it; returns the `[5 × N]` row outputs.
    fn run<T: LogitElement + DeviceRepr + CudaDType>(
        &self,
        backend: &CudaBackend,
        batch: &mut DeviceBatch<'_>,
        ids: &CudaView<'_, i64>,
    ) -> Result<CudaSlice<f32>>;
}

/// Paired logits: one launch of the kernel (as `CudaBackend::compute` does).
pub(super) struct Logits<'a> {
    pub real: &'a Tensor,
    pub masked: &'a Tensor,
    pub shape: &'a InputShape,
}

impl Inputs for Logits<'_> {
    fn rows(&self) -> usize {
        self.shape.rows
    }
    fn dtype(&self) -> Dtype {
        self.shape.dtype
    }
    fn run<T: LogitElement + DeviceRepr + CudaDType>(
        &self,
        backend: &CudaBackend,
        batch: &mut DeviceBatch<'_>,
        ids: &CudaView<'_, i64>,
    ) -> Result<CudaSlice<f32>> {
        let (real_storage, real_layout) = self.real.storage_and_layout();
        let (masked_storage, masked_layout) = self.masked.storage_and_layout();
        let real = view::<T>("real", &real_storage, real_layout)?;
        let masked = view::<T>("masked", &masked_storage, masked_layout)?;
        backend.score(batch, &real, &masked, ids, self.shape.vocab, true)
    }
}

/// The fused path: cuBLAS chunk GEMMs and the kernel per chunk, then the merge launch
/// ([`CudaBackend::score_hidden_batch`]), the hidden states and lm_head read in place.
pub(super) struct Hidden<'a> {
    pub h: &'a HiddenStates<'a>,
    pub shape: &'a HiddenShape,
    pub chunk: usize,
}

impl Inputs for Hidden<'_> {
    fn rows(&self) -> usize {
        self.shape.rows
    }
    fn dtype(&self) -> Dtype {
        self.shape.dtype
    }
    fn run<T: LogitElement + DeviceRepr + CudaDType>(
        &self,
        backend: &CudaBackend,
        batch: &mut DeviceBatch<'_>,
        ids: &CudaView<'_, i64>,
    ) -> Result<CudaSlice<f32>> {
        let h = self.h;
        let (real_storage, real_layout) = h.real_hidden.storage_and_layout();
        let (masked_storage, masked_layout) = h.masked_hidden.storage_and_layout();
        let (head_storage, head_layout) = h.lm_head.storage_and_layout();
        let inputs = DeviceHiddenInputs {
            real_hidden: view::<T>("real_hidden", &real_storage, real_layout)?,
            masked_hidden: view::<T>("masked_hidden", &masked_storage, masked_layout)?,
            lm_head: view::<T>("lm_head", &head_storage, head_layout)?,
            rows: self.shape.rows,
            hidden: self.shape.hidden,
            vocab: self.shape.vocab,
        };
        backend.score_hidden_batch(batch, &inputs, ids, self.chunk, true)
    }
}

/// One launch over every row of `inputs` on `backend`'s stream (candle's), finalising `batch`;
/// no rows: only the epilogue.
fn launch(
    backend: &CudaBackend,
    batch: &mut DeviceBatch<'_>,
    targets: &Tensor,
    inputs: &impl Inputs,
) -> Result<Option<CudaSlice<f32>>> {
    if inputs.rows() == 0 {
        backend.finish(batch)?;
        return Ok(None);
    }
    with_ids(targets, |ids| {
        Ok(Some(match inputs.dtype() {
            Dtype::F32 => inputs.run::<f32>(backend, batch, ids)?,
            Dtype::F16 => inputs.run::<half::f16>(backend, batch, ids)?,
            Dtype::BF16 => inputs.run::<half::bf16>(backend, batch, ids)?,
        }))
    })
}

fn rows_tensor(row_out: Option<CudaSlice<f32>>, n: usize, device: &CudaDevice) -> Result<Tensor> {
    match row_out {
        Some(row_out) => Ok(wrap(row_out, 5 * n, device)?.reshape((5, n))?),
        // No rows: an empty tensor over a one-element buffer (cudarc allocates no 0-length
        // buffers, as `crate::cuda` pads its own).
        None => Ok(wrap(device.alloc_zeros::<f32>(1)?, 0, device)?.reshape((5, 0))?),
    }
}

/// Rows only: a device batch without turns on candle's stream, one launch, a wait for the error
/// word, the rows as a `[5, N]` tensor.
pub(super) fn score_rows(
    device: &CudaDevice,
    targets: &Tensor,
    inputs: &impl Inputs,
    params: &Params,
) -> Result<Tensor> {
    let backend = CudaBackend::shared(&device.cuda_stream())?;
    let mut batch = backend.begin(None, params)?;
    let row_out = launch(&backend, &mut batch, targets, inputs)?;
    batch.check()?;
    rows_tensor(row_out, inputs.rows(), device)
}

/// With turns: the layout validated (before any launch) and uploaded, a device batch over it on
/// candle's stream, one launch, a wait for the error word, every output as a tensor.
pub(super) fn compute(
    device: &CudaDevice,
    targets: &Tensor,
    inputs: &impl Inputs,
    call: CallLayout<'_>,
    params: &Params,
) -> Result<BatchOutput> {
    let rows = inputs.rows();
    let layout = layout::batch_layout(rows, Some(call.turns), call.trajectories, call.credit_start, call.padding)?
        .unwrap_or_default();
    let backend = CudaBackend::shared(&device.cuda_stream())?;
    let device_layout = backend.upload_layout(&layout)?;
    let mut batch = backend.begin(Some(&device_layout), params)?;
    let row_out = launch(&backend, &mut batch, targets, inputs)?;
    batch.check()?;
    batch_output(device, &layout, batch, row_out, rows)
}

/// The outputs of a finished device batch as tensors: its buffers become the tensors (no copy).
fn batch_output(
    device: &CudaDevice,
    layout: &Layout,
    batch: DeviceBatch<'_>,
    row_out: Option<CudaSlice<f32>>,
    rows: usize,
) -> Result<BatchOutput> {
    let (t, b) = (layout.turns(), layout.groups.as_ref().map_or(0, |g| g.trajectory_group.len()));
    let advantages = match &layout.groups {
        None => None,
        Some(g) => Some(AdvantageTensors {
            token_advantage: match g.turn_credit_start {
                Some(_) => Some(wrap(batch.token_advantage, g.total_tokens as usize, device)?),
                None => None,
            },
            padded_advantage: match g.pad_width {
                Some(w) => Some(wrap(batch.padded_advantage, b * w as usize, device)?.reshape((b, w as usize))?),
                None => None,
            },
            turn_intrinsic: wrap(batch.turn_intrinsic, t, device)?,
            turn_intrinsic_norm: wrap(batch.turn_norm, t, device)?,
            turn_bonus: wrap(batch.turn_bonus, t, device)?,
            trajectory_advantage: wrap(batch.traj_advantage, b, device)?,
            trajectory_gate: wrap(batch.traj_gate, b, device)?,
            batch_stats: wrap(batch.scalars, 3, device)?,
        }),
    };
    Ok(BatchOutput {
        rows: rows_tensor(row_out, rows, device)?,
        turn_info: wrap(batch.turn_info, t, device)?,
        advantages,
    })
}

/// `f` of the i64 ids of `targets` (the kernels read i64: U32 targets are widened by candle on
/// its stream).
fn with_ids<R>(targets: &Tensor, f: impl FnOnce(&CudaView<'_, i64>) -> Result<R>) -> Result<R> {
    let widened;
    let targets = if targets.dtype() == DType::I64 {
        targets
    } else {
        widened = targets.to_dtype(DType::I64)?;
        &widened
    };
    let (targets_storage, targets_layout) = targets.storage_and_layout();
    let ids = view::<i64>("targets", &targets_storage, targets_layout)?;
    f(&ids)
}
