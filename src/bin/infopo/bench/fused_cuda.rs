//! `infopo bench --fused-linear --backend cuda`: the fused path as a trainer calls it on the GPU.
//! The inputs are uploaded once and stay on the device; each call is
//! `CudaBackend::score_hidden_batch` (the chunk GEMMs, the partial-state launches, the merge
//! launch; the row outputs stay on the device), timed with CUDA events around the call, and its
//! device memory beyond the inputs measured by the `device_memory` probe (cuda builds). Every
//! call, warm-up included, is memory-probed; the times are those after the warm-up.
//!
//! The JSON keys (beside the ones every `--fused-linear` run prints) are documented in
//! compare/README.md; a number that could not be measured is `null`, with the reason.

/// What one `--backend cuda` run measured (plain data, so the output is testable without a GPU).
#[derive(Debug, Clone, Default)]
pub struct CudaReport {
    pub device: String,
    /// Milliseconds between CUDA events recorded before and after each timed call.
    pub times_ms: Vec<f64>,
    /// Host milliseconds of each timed call, from its first enqueue to the stream's end.
    pub wall_ms: Vec<f64>,
    /// Why the pool peak is unavailable (None when it was measured).
    pub pool_unavailable: Option<String>,
    /// Pool bytes in use when the first probe started: the inputs, the backend's scratch.
    pub pool_used_before: Option<u64>,
    /// Per call (warm-up included): the pool's peak beyond its use at the call's start.
    pub pool_peaks: Vec<u64>,
    /// Per call: cuMemGetInfo's free bytes before minus after.
    pub used_increases: Vec<i64>,
    pub device_total: u64,
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list<T: ToString>(v: &[T]) -> String {
    v.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

impl CudaReport {
    /// The largest pool peak over every call (None without a pool).
    pub fn peak_pool(&self) -> Option<u64> {
        if self.pool_unavailable.is_some() {
            return None;
        }
        self.pool_peaks.iter().copied().max()
    }

    /// The device-specific JSON fields (no braces, a leading comma).
    pub fn json_fields(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |b| b.to_string());
        let pooled = self.pool_unavailable.is_none();
        format!(
            ",\"timing\":\"cuda-events\",\"device\":{},\"wall_ms\":[{}],\"device_pool\":{pooled},\
             \"device_pool_unavailable\":{},\"peak_device_pool_beyond_inputs_bytes\":{},\
             \"first_call_device_pool_beyond_inputs_bytes\":{},\"per_call_device_pool_beyond_inputs_bytes\":{},\
             \"device_pool_used_before_bytes\":{},\"per_call_device_used_increase_bytes\":[{}],\
             \"device_total_bytes\":{}",
            json_string(&self.device),
            list(&self.wall_ms.iter().map(|&x| super::json_number(x)).collect::<Vec<_>>()),
            self.pool_unavailable.as_deref().map_or("null".to_string(), json_string),
            opt(self.peak_pool()),
            opt(self.pool_peaks.first().copied().filter(|_| pooled)),
            if pooled { format!("[{}]", list(&self.pool_peaks)) } else { "null".to_string() },
            opt(self.pool_used_before.filter(|_| pooled)),
            list(&self.used_increases),
            self.device_total,
        )
    }

    /// One line for the text output.
    pub fn text(&self, working_set_mib: f64) -> String {
        let mib = |b: f64| b / (1u64 << 20) as f64;
        let pool = match self.peak_pool() {
            Some(b) => format!("{:.1} MiB from the stream-ordered pool", mib(b as f64)),
            None => format!("unavailable ({})", self.pool_unavailable.as_deref().unwrap_or("no call was measured")),
        };
        let most = self.used_increases.iter().copied().max().unwrap_or(0);
        format!(
            "device peak beyond the inputs: {pool} (chunk buffers, states and row outputs by construction \
             {working_set_mib:.1} MiB); cuMemGetInfo: at most {:.1} MiB more in use after a call\n",
            mib(most as f64)
        )
    }
}

/// The device buffers the fused path allocates per call by construction (src/cuda/fused.rs): two
/// f32 `[N, c]` chunk logit buffers, the `[K, N, 8]` f32 states (`K = ⌈V / c⌉`) and the
/// `[5, N]` f32 row outputs. cuBLAS's workspace and the kernel's split workspace come on top.
pub fn working_set_bytes(rows: usize, vocab: usize, chunk: usize) -> u128 {
    let c = chunk.clamp(1, vocab.max(1)) as u128;
    let (n, k) = (rows as u128, vocab.div_ceil(chunk.max(1)) as u128);
    4 * (2 * n * c + 8 * k * n + 5 * n)
}

#[cfg(feature = "cuda")]
pub use measure::measure;

#[cfg(feature = "cuda")]
mod measure {
    use super::super::device_memory::{mem_get_info, DevicePool, DeviceProbe};
    use super::CudaReport;
    use crate::Failure;
    use cudarc::driver::{sys::CUevent_flags, DeviceRepr};
    use infopo_kernels::cuda::fused::DeviceHiddenInputs;
    use infopo_kernels::cuda::{rows_to_host, CudaBackend};
    use infopo_kernels::synth::SynthHidden;
    use infopo_kernels::{Error, LogitElement, Params, RowOutputs};
    use std::time::Instant;

    fn cuda_err(e: impl std::fmt::Debug) -> Error {
        Error::Cuda(format!("{e:?}"))
    }

    /// Uploads `data` once, then `warmup + iters` calls of the fused path on the device.
    /// Returns the report and the last call's row outputs.
    pub fn measure<T: LogitElement + DeviceRepr>(
        data: &SynthHidden<T>,
        params: &Params,
        chunk: usize,
        warmup: u32,
        iters: u32,
    ) -> Result<(CudaReport, RowOutputs), Failure> {
        let gpu = CudaBackend::new(0)?;
        let s = gpu.stream().clone();
        let inputs = data.inputs();
        let up = |v: &[T]| s.clone_htod(v).map_err(cuda_err);
        let (real, masked, head) = (up(inputs.real_hidden)?, up(inputs.masked_hidden)?, up(inputs.lm_head)?);
        let targets = s.clone_htod(&data.targets).map_err(cuda_err)?;
        let device = DeviceHiddenInputs {
            real_hidden: real.as_view(),
            masked_hidden: masked.as_view(),
            lm_head: head.as_view(),
            rows: inputs.rows,
            hidden: inputs.hidden,
            vocab: inputs.vocab,
        };
        let pool = DevicePool::open(&s);
        let mut report = CudaReport {
            device: gpu.device_name()?,
            pool_unavailable: pool.as_ref().err().cloned(),
            pool_used_before: pool.as_ref().ok().map(DevicePool::used).transpose()?,
            device_total: mem_get_info(&s)?.1 as u64,
            ..CudaReport::default()
        };
        let ctx = s.context();
        let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
        let (start, end) = (ctx.new_event(timing).map_err(cuda_err)?, ctx.new_event(timing).map_err(cuda_err)?);
        let mut last = None;
        for i in 0..warmup + iters.max(1) {
            // The batch's accumulators (a few bytes, rows only) belong to the caller, not the call.
            let mut batch = gpu.begin(None, params)?;
            let probe = DeviceProbe::start(&s, pool.as_ref().ok())?;
            let wall = Instant::now();
            start.record(&s).map_err(cuda_err)?;
            let rows = gpu.score_hidden_batch(&mut batch, &device, &targets.as_view(), chunk, true)?;
            end.record(&s).map_err(cuda_err)?;
            let peak = probe.finish()?;
            let wall_ms = wall.elapsed().as_secs_f64() * 1e3;
            batch.check()?;
            report.pool_peaks.push(peak.pool_beyond_start.unwrap_or(0));
            report.used_increases.push(peak.used_increase);
            if i >= warmup {
                report.times_ms.push(start.elapsed_ms(&end).map_err(cuda_err)? as f64);
                report.wall_ms.push(wall_ms);
            }
            last = Some(rows);
        }
        gpu.check_scratch()?;
        let rows = rows_to_host(&s, &last.expect("at least one call"), inputs.rows)?;
        Ok((report, rows))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn working_set_is_the_chunk_buffers_states_and_rows() {
        // N = 4, V = 10, chunk 4: two [4, 4] f32 buffers, K = 3 slices of [4, 8], [5, 4].
        assert_eq!(working_set_bytes(4, 10, 4), 4 * (2 * 16 + 3 * 32 + 20));
        // A chunk wider than the vocabulary is one chunk of V.
        assert_eq!(working_set_bytes(4, 10, 64), 4 * (2 * 40 + 32 + 20));
    }

    #[test]
    fn an_unavailable_pool_reports_null_and_why_never_a_number() {
        let report = CudaReport {
            device: "GPU \"x\"".into(),
            times_ms: vec![1.0],
            wall_ms: vec![1.5],
            pool_unavailable: Some("no pools".into()),
            pool_used_before: Some(7),
            pool_peaks: vec![0, 0],
            used_increases: vec![-3, 5],
            device_total: 80,
        };
        let json = report.json_fields();
        for needle in [
            "\"device\":\"GPU \\\"x\\\"\"",
            "\"device_pool\":false",
            "\"device_pool_unavailable\":\"no pools\"",
            "\"peak_device_pool_beyond_inputs_bytes\":null",
            "\"first_call_device_pool_beyond_inputs_bytes\":null",
            "\"per_call_device_pool_beyond_inputs_bytes\":null",
            "\"device_pool_used_before_bytes\":null",
            "\"per_call_device_used_increase_bytes\":[-3,5]",
            "\"wall_ms\":[1.5]",
        ] {
            assert!(json.contains(needle), "`{needle}` not in {json}");
        }
        assert!(report.text(1.0).contains("unavailable (no pools)"));
    }

    #[test]
    fn a_pool_reports_the_largest_call() {
        let report = CudaReport {
            pool_peaks: vec![300, 100, 200],
            pool_used_before: Some(9),
            used_increases: vec![4096, 0, 0],
            ..CudaReport::default()
        };
        let json = report.json_fields();
        for needle in [
            "\"device_pool\":true",
            "\"device_pool_unavailable\":null",
            "\"peak_device_pool_beyond_inputs_bytes\":300",
            "\"first_call_device_pool_beyond_inputs_bytes\":300",
            "\"per_call_device_pool_beyond_inputs_bytes\":[300,100,200]",
            "\"device_pool_used_before_bytes\":9",
        ] {
            assert!(json.contains(needle), "`{needle}` not in {json}");
        }
    }
}
