//! The CLI's device timer (feature `cuda`): the fused launch timed on device-resident data with
//! CUDA events, for `infopo bench` and the main job's timing on a GPU.

use infopo_kernels::cuda::cudarc::driver::DeviceRepr;
use infopo_kernels::cuda::CudaBackend;
use infopo_kernels::{Batch, Error, Layout, LogitData, LogitElement, Params, Result};
use std::borrow::Cow;

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// `v` itself, or a one-element placeholder when it is empty (cudarc cannot allocate 0 elements).
fn nonempty<T: bytemuck::Zeroable + Copy>(v: &[T]) -> Cow<'_, [T]> {
    if v.is_empty() {
        Cow::Owned(vec![T::zeroed()])
    } else {
        Cow::Borrowed(v)
    }
}

/// Total bytes of rotated input copies in [`time_device`]: more than twice the
/// 50 MB L2 of an H100/H200, so no timed launch finds its logits in L2.
const ROTATION_BYTES: usize = 160 << 20;
/// Logit bytes a timing sample of [`time_device`] reads at least (≤ 64 launches).
const SAMPLE_BYTES: usize = 256 << 20;

/// Times the fused launch on device-resident data, the way a trainer runs it: the logits are
/// uploaded once (in enough copies to exceed L2, rotated), then each batch is one restart (a
/// memset) plus one launch; CUDA events bracket each sample of back-to-back batches. Returns
/// the sorted per-batch times in seconds, one per sample.
pub fn time_device(
    backend: &CudaBackend,
    batch: &Batch<'_>,
    params: &Params,
    warmup: u32,
    iters: u32,
) -> Result<Vec<f64>> {
    let layout = batch.validate()?;
    match (batch.real.data(), batch.masked.data()) {
        (LogitData::F32(x), LogitData::F32(y)) => {
            time_typed(backend, batch, x, y, layout.as_ref(), params, warmup, iters)
        }
        (LogitData::F16(x), LogitData::F16(y)) => {
            time_typed(backend, batch, x, y, layout.as_ref(), params, warmup, iters)
        }
        (LogitData::BF16(x), LogitData::BF16(y)) => {
            time_typed(backend, batch, x, y, layout.as_ref(), params, warmup, iters)
        }
        (x, y) => Err(Error::DtypeMismatch { real: x.dtype().name(), masked: y.dtype().name() }),
    }
}

#[allow(clippy::too_many_arguments)]
fn time_typed<T: LogitElement + DeviceRepr>(
    backend: &CudaBackend,
    batch: &Batch<'_>,
    real: &[T],
    masked: &[T],
    layout: Option<&Layout>,
    params: &Params,
    warmup: u32,
    iters: u32,
) -> Result<Vec<f64>> {
    let s = backend.stream();
    let (rows, vocab) = (batch.real.rows(), batch.real.vocab());
    let copies = ROTATION_BYTES.div_ceil(batch.logit_bytes().max(1)).clamp(1, 16);
    let mut inputs = Vec::with_capacity(copies);
    for _ in 0..copies {
        let x = s.clone_htod(&*nonempty(real)).map_err(cuda_err)?;
        let y = s.clone_htod(&*nonempty(masked)).map_err(cuda_err)?;
        inputs.push((x, y));
    }
    let targets = s.clone_htod(&*nonempty(batch.targets)).map_err(cuda_err)?;
    let device_layout = layout.map(|l| backend.upload_layout(l)).transpose()?;
    let mut state = backend.begin(device_layout.as_ref(), params)?;
    let mut row_out = s.alloc_zeros::<f32>((5 * rows).max(1)).map_err(cuda_err)?;
    let ctx = s.context();
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (ctx.new_event(timing).map_err(cuda_err)?, ctx.new_event(timing).map_err(cuda_err)?);
    let n = rows * vocab;
    // Each sample is `per_sample` back-to-back batches between two events, so the host's
    // submission of one launch overlaps the GPU's work on the previous one (as in a
    // trainer) instead of showing up as idle GPU time for small batches.
    let per_sample = (SAMPLE_BYTES / batch.logit_bytes().max(1)).clamp(1, 64);
    let mut times = Vec::with_capacity(iters as usize);
    let mut launch = 0;
    for sample in 0..warmup + iters {
        start.record(s).map_err(cuda_err)?;
        for _ in 0..per_sample {
            let (x, y) = &inputs[launch % copies];
            launch += 1;
            state.restart()?;
            let (x, y, t) = (x.slice(..n), y.slice(..n), targets.slice(..rows));
            backend.score_into(&mut state, &x, &y, &t, vocab, true, &mut row_out)?;
        }
        end.record(s).map_err(cuda_err)?;
        let ms = start.elapsed_ms(&end).map_err(cuda_err)?;
        if sample >= warmup {
            times.push(ms as f64 * 1e-3 / per_sample as f64);
        }
    }
    state.check()?;
    times.sort_by(f64::total_cmp);
    Ok(times)
}
