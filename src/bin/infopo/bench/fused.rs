//! `infopo bench --fused-linear`: the fused path (hidden states × lm_head over vocabulary
//! chunks, the logits never stored) timed on synthetic inputs, with its peak memory beyond the
//! inputs: the host's on `cpu`/`emulated` ([`super::memory`]), the device's on `cuda`, where the
//! inputs stay on the GPU and each call is timed with CUDA events ([`super::fused_cuda`]).

use super::json_number;
use super::memory::{Peak, Probe};
use crate::args::{BackendArg, BenchArgs, DtypeArg};
use crate::timing::median;
use crate::{emit, Failure, Outcome};
use half::{bf16, f16};
use infopo_kernels::reference::{self, RowValues};
use infopo_kernels::HiddenInputs;

use infopo_kernels::synth::{self, HiddenSpec};
use infopo_kernels::{LogitElement, Params};
use std::time::Instant;

/// Seed of the synthetic inputs; `compare/compare_fused.py` rebuilds the same tensors from it.
pub const SEED: u64 = 2026;
/// Rows whose KL and log-ratio the JSON output lists.
const HEAD_ROWS: usize = 8;

pub fn run(args: &BenchArgs) -> Outcome {
    if args.backend == BackendArg::Cuda {
        return run_cuda(args);
    }
    match args.dtype {
        DtypeArg::Bf16 => run_typed::<bf16>(args),
        DtypeArg::F16 => run_typed::<f16>(args),
        DtypeArg::F32 => run_typed::<f32>(args),
    }
}

/// The fused path of one backend: its name, the element size of its chunk GEMMs (for the
/// working set) and one call.
struct FusedPath<'a> {
    name: &'static str,
    gemm_bytes: usize,
    call: Box<dyn Fn() -> infopo_kernels::Result<Vec<RowValues>> + 'a>,
}

fn path<'a, T: LogitElement>(
    backend: BackendArg,
    inputs: &'a HiddenInputs<'a, T>,
    targets: &'a [i64],
    params: &'a Params,
    chunk: usize,
) -> Result<FusedPath<'a>, Failure> {
    match backend {
        BackendArg::Cpu | BackendArg::Auto => Ok(FusedPath {
            name: "cpu",
            gemm_bytes: 8,
            call: Box::new(move || reference::score_hidden(0, inputs, targets, params, chunk)),
        }),
        BackendArg::Emulated => emulated(inputs, targets, params, chunk),
        // Timed on the device instead (`run_cuda`).
        BackendArg::Cuda => Err(Failure::Input("the cuda fused path is timed by run_cuda".into())),
    }
}

/// The f32 row outputs of a kernel backend as values (for the JSON head and sums).
#[cfg(any(feature = "emulator", feature = "cuda"))]
fn values_of(rows: &infopo_kernels::RowOutputs) -> Vec<RowValues> {
    (0..rows.len())
        .map(|i| RowValues {
            lse_real: rows.lse_real[i] as f64,
            lse_masked: rows.lse_masked[i] as f64,
            log_ratio: rows.log_ratio[i] as f64,
            kl: rows.kl[i] as f64,
            entropy_real: rows.entropy_real[i] as f64,
        })
        .collect()
}

#[cfg(feature = "emulator")]
fn emulated<'a, T: LogitElement>(
    inputs: &'a HiddenInputs<'a, T>,
    targets: &'a [i64],
    params: &'a Params,
    chunk: usize,
) -> Result<FusedPath<'a>, Failure> {
    let emulator = infopo_kernels::emulated::Emulated::new();
    Ok(FusedPath {
        name: "emulated",
        gemm_bytes: 4,
        // The CUDA path's launches: the kernel per chunk, then its merge mode.
        call: Box::new(move || {
            let out = emulator.compute_hidden_typed(0, inputs, targets, None, params, chunk)?;
            Ok(values_of(&out.rows))
        }),
    })
}

#[cfg(not(feature = "emulator"))]
fn emulated<'a, T: LogitElement>(
    _: &'a HiddenInputs<'a, T>,
    _: &'a [i64],
    _: &'a Params,
    _: usize,
) -> Result<FusedPath<'a>, Failure> {
    Err(infopo_kernels::Error::BackendUnavailable {
        backend: "emulated",
        why: "this build has no emulated kernel (rebuild with --features emulator)".into(),
    }
    .into())
}

/// The synthetic inputs of `args` (seed [`SEED`]), or an input error when they are too large.
fn synth_data<T: LogitElement>(args: &BenchArgs) -> Result<synth::SynthHidden<T>, Failure> {
    let (rows, hidden, vocab) = (args.rows as usize, args.hidden as usize, args.vocab as usize);
    let elements = vocab
        .checked_mul(hidden)
        .zip(rows.checked_mul(hidden).and_then(|b| b.checked_mul(2)))
        .and_then(|(a, b)| a.checked_add(b));
    if !matches!(elements, Some(n) if n <= isize::MAX as usize / 8) {
        return Err(Failure::Input(format!("{rows} rows, hidden {hidden}, vocab {vocab} is too large")));
    }
    Ok(synth::hidden_inputs::<T>(HiddenSpec { rows, hidden, vocab, seed: SEED }))
}

/// The JSON fields of the first rows' values and the sums (a leading comma): what
/// `compare/compare_fused.py` and `compare/compare_fused_gpu.py` check against PyTorch on the same
/// inputs.
fn values_json(values: &[RowValues]) -> String {
    let list = |v: &[f64]| v.iter().map(|&x| json_number(x)).collect::<Vec<_>>().join(",");
    let head = &values[..values.len().min(HEAD_ROWS)];
    let sum_kl: f64 = values.iter().map(|v| v.kl).sum();
    let sum_log_ratio: f64 = values.iter().map(|v| v.log_ratio).sum();
    format!(
        ",\"sum_kl\":{},\"sum_log_ratio\":{},\"head_kl\":[{}],\"head_log_ratio\":[{}]",
        json_number(sum_kl),
        json_number(sum_log_ratio),
        list(&head.iter().map(|v| v.kl).collect::<Vec<_>>()),
        list(&head.iter().map(|v| v.log_ratio).collect::<Vec<_>>()),
    )
}

fn run_typed<T: LogitElement>(args: &BenchArgs) -> Outcome {
    let (rows, hidden, vocab) = (args.rows as usize, args.hidden as usize, args.vocab as usize);
    let chunk = args.chunk();
    let data = synth_data::<T>(args)?;
    let inputs = data.inputs();
    let params = Params::default();
    let fused = path(args.backend, &inputs, &data.targets, &params, chunk)?;

    // Every call is measured, the first (cold) one included: memory the path keeps between calls
    // (workspaces, pools) is counted on the call that first takes it.
    let mut times = Vec::with_capacity(args.iters as usize);
    let mut peaks: Vec<Peak> = Vec::new();
    let mut values = Vec::new();
    for i in 0..args.warmup + args.iters {
        let probe = Probe::start();
        let start = Instant::now();
        values = (fused.call)()?;
        let seconds = start.elapsed().as_secs_f64();
        peaks.push(probe.finish());
        if i >= args.warmup {
            times.push(seconds);
        }
    }
    let times_ms: Vec<f64> = times.iter().map(|s| s * 1e3).collect();
    times.sort_by(f64::total_cmp);
    let (med, min) = (median(&times), times[0]);
    let rss = peaks.iter().map(|p| p.rss).collect::<Option<Vec<u64>>>().map(|v| v.into_iter().max().unwrap_or(0));
    let heap = peaks.iter().map(|p| p.heap).max().unwrap_or(0);
    let c = chunk.min(vocab);
    // The big buffers by construction (src/fused.rs): both hidden tensors, one lm_head chunk and
    // two chunks of logits, in the GEMM's element type.
    // (u128: rows × chunk and rows × vocab are not bounded by the size check above.)
    let (n, d, c128) = (rows as u128, hidden as u128, c as u128);
    let working_set = fused.gemm_bytes as u128 * (2 * n * d + c128 * d + 2 * n * c128);
    let logits_bytes = 2 * n * vocab as u128 * 4;
    let mib = |b: u128| b as f64 / (1u64 << 20) as f64;
    if args.json {
        let list = |v: &[f64]| v.iter().map(|&x| json_number(x)).collect::<Vec<_>>().join(",");
        let opt = |v: Option<u64>| v.map_or("null".to_string(), |b| b.to_string());
        emit(&format!(
            "{{\"path\":\"fused-linear\",\"backend\":\"{}\",\"dtype\":\"{}\",\"rows\":{rows},\"hidden\":{hidden},\
             \"vocab\":{vocab},\"chunk\":{c},\"seed\":{SEED},\"iters\":{},\"warmup\":{},\"median_ms\":{},\
             \"min_ms\":{},\"times_ms\":[{}],\"input_bytes\":{},\"peak_rss_beyond_inputs_bytes\":{},\
             \"first_call_rss_beyond_inputs_bytes\":{},\"peak_heap_beyond_inputs_bytes\":{heap},\
             \"working_set_bytes\":{working_set},\"f32_logits_bytes\":{logits_bytes}{}}}\n",
            fused.name,
            T::DTYPE.name(),
            args.iters,
            args.warmup,
            json_number(med * 1e3),
            json_number(min * 1e3),
            list(&times_ms),
            data.bytes(),
            opt(rss),
            opt(peaks[0].rss),
            values_json(&values),
        ));
    } else {
        let rss_text =
            rss.map_or("unavailable (no /proc/self/clear_refs)".to_string(), |b| format!("{:.1} MiB", mib(b as u128)));
        emit(&format!(
            "bench: fused-linear on the {} backend, {rows} rows x hidden {hidden} x vocab {vocab} {} \
             ({:.1} MB of inputs), chunk {c}, {} iters after {} warmup\n\
             median {:.3} ms   min {:.3} ms   {:.0} rows/s\n\
             peak beyond the inputs: resident {rss_text}, heap {:.1} MiB (chunk buffers {:.1} MiB; \
             the two f32 logit tensors it never stores: {:.1} MiB)\n",
            fused.name,
            T::DTYPE.name(),
            data.bytes() as f64 / 1e6,
            args.iters,
            args.warmup,
            med * 1e3,
            min * 1e3,
            rows as f64 / med,
            mib(heap as u128),
            mib(working_set),
            mib(logits_bytes),
        ));
    }
    Ok(())
}

/// `--backend cuda`: the inputs uploaded once, each call timed on the device with CUDA events
/// and its device memory beyond the inputs probed ([`super::fused_cuda`]).
#[cfg(feature = "cuda")]
fn run_cuda(args: &BenchArgs) -> Outcome {
    match args.dtype {
        DtypeArg::Bf16 => run_cuda_typed::<bf16>(args),
        DtypeArg::F16 => run_cuda_typed::<f16>(args),
        DtypeArg::F32 => run_cuda_typed::<f32>(args),
    }
}

#[cfg(not(feature = "cuda"))]
fn run_cuda(_: &BenchArgs) -> Outcome {
    Err(infopo_kernels::Error::BackendUnavailable {
        backend: "cuda",
        why: "--fused-linear on cuda needs a build with the CUDA backend (--features cuda)".into(),
    }
    .into())
}

#[cfg(feature = "cuda")]
fn run_cuda_typed<T: LogitElement + cudarc::driver::DeviceRepr>(args: &BenchArgs) -> Outcome {
    use super::fused_cuda::{measure, working_set_bytes};
    let (rows, hidden, vocab) = (args.rows as usize, args.hidden as usize, args.vocab as usize);
    let chunk = args.chunk();
    let data = synth_data::<T>(args)?;
    let params = Params::default();
    let (report, out) = measure(&data, &params, chunk, args.warmup, args.iters)?;
    let values = values_of(&out);
    let times_ms = report.times_ms.clone();
    let mut sorted = times_ms.clone();
    sorted.sort_by(f64::total_cmp);
    let (med, min) = (median(&sorted), sorted[0]);
    let c = chunk.min(vocab);
    let working_set = working_set_bytes(rows, vocab, chunk);
    let logits_bytes = 2 * rows as u128 * vocab as u128 * 4;
    let mib = |b: u128| b as f64 / (1u64 << 20) as f64;
    if args.json {
        let list = |v: &[f64]| v.iter().map(|&x| json_number(x)).collect::<Vec<_>>().join(",");
        emit(&format!(
            "{{\"path\":\"fused-linear\",\"backend\":\"cuda\",\"dtype\":\"{}\",\"rows\":{rows},\"hidden\":{hidden},\
             \"vocab\":{vocab},\"chunk\":{c},\"chunks\":{},\"seed\":{SEED},\"iters\":{},\"warmup\":{},\
             \"median_ms\":{},\"min_ms\":{},\"times_ms\":[{}],\"input_bytes\":{},\
             \"working_set_bytes\":{working_set},\"f32_logits_bytes\":{logits_bytes}{}{}}}\n",
            T::DTYPE.name(),
            vocab.div_ceil(chunk.max(1)),
            args.iters,
            args.warmup,
            json_number(med),
            json_number(min),
            list(&times_ms),
            data.bytes(),
            report.json_fields(),
            values_json(&values),
        ));
    } else {
        emit(&format!(
            "bench: fused-linear on the cuda backend ({}), {rows} rows x hidden {hidden} x vocab {vocab} {} \
             ({:.1} MB of inputs, uploaded once), chunk {c}, {} iters after {} warmup\n\
             median {:.3} ms   min {:.3} ms   {:.0} rows/s (CUDA events around each call)\n{}\
             (the two f32 logit tensors it never stores: {:.1} MiB)\n",
            report.device,
            T::DTYPE.name(),
            data.bytes() as f64 / 1e6,
            args.iters,
            args.warmup,
            med,
            min,
            rows as f64 / (med / 1e3),
            report.text(mib(working_set)),
            mib(logits_bytes),
        ));
    }
    Ok(())
}
