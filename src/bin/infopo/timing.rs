//! Timing shared by `infopo bench` and the main job.

use crate::Failure;
use infopo_kernels::{Backend, Batch, Params};
use std::time::{Duration, Instant};

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Times `iters` runs of the full pipeline after `warmup` untimed ones; returns the sorted times
/// in seconds. On CUDA the logits stay on the device and launches are timed with CUDA events
/// (`device_timer::time_device`); elsewhere a `compute` call is timed with the wall clock.
pub fn time_compute(
    backend: &dyn Backend,
    batch: &Batch<'_>,
    params: &Params,
    warmup: u32,
    iters: u32,
) -> Result<Vec<f64>, Failure> {
    #[cfg(feature = "cuda")]
    if backend.name() == "cuda" {
        let gpu = infopo_kernels::cuda::CudaBackend::new(0)?;
        return Ok(crate::device_timer::time_device(&gpu, batch, params, warmup, iters.max(1))?);
    }
    for _ in 0..warmup {
        backend.compute(batch, params)?;
    }
    let mut times = Vec::with_capacity(iters as usize);
    for _ in 0..iters {
        let start = Instant::now();
        backend.compute(batch, params)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_sorted_times() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
