//! `infopo bench`: the full pipeline timed on synthetic data or an input file; with
//! `--fused-linear`, the fused path from hidden states ([`fused`]).

#[cfg(feature = "cuda")]
mod device_memory;
mod fused;
// Its report formatting is compiled (and unit-tested) in every build; the measurement needs cuda.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod fused_cuda;
mod memory;

use crate::args::{BenchArgs, DtypeArg};
use crate::timing::{median, time_compute};
use crate::{emit, open, Failure, Outcome};
use half::{bf16, f16};
use infopo_kernels::io::Input;
use infopo_kernels::synth::{self, SynthSpec};
use infopo_kernels::HiddenBatch;
use infopo_kernels::{Batch, LogitElement, Params};
use std::time::Instant;

pub fn run(args: &BenchArgs) -> Outcome {
    if args.fused_linear {
        return fused::run(args);
    }
    if let Some(path) = &args.input {
        return match infopo_kernels::io::read_any_input(path)? {
            // Logits have no vocabulary chunks: silently ignoring --chunk would time something
            // other than what was asked for.
            Input::Logits(_) if args.chunk.is_some() => Err(Failure::Input(format!(
                "--chunk applies to hidden-state inputs (real_hidden, masked_hidden, lm_head) and \
                 --fused-linear, but {} holds logits: drop --chunk",
                path.display()
            ))),
            Input::Logits(input) => bench_batch(args, &input.as_batch()?),
            Input::Hidden(input) => bench_hidden(args, &input.as_batch()?),
        };
    }
    match args.dtype {
        DtypeArg::Bf16 => bench_typed::<bf16>(args),
        DtypeArg::F16 => bench_typed::<f16>(args),
        DtypeArg::F32 => bench_typed::<f32>(args),
    }
}

/// A JSON number (finite) or null.
fn json_number(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_string()
    }
}

fn bench_typed<T: LogitElement>(args: &BenchArgs) -> Outcome {
    let (rows, vocab) = (args.rows as usize, args.vocab as usize);
    if !matches!(rows.checked_mul(vocab), Some(n) if n <= isize::MAX as usize / 8) {
        return Err(Failure::Input(format!("{rows} rows x {vocab} vocab is too large")));
    }
    let mut data = synth::batch::<T>(SynthSpec { rows, vocab, groups: 4, trajectories_per_group: 8, seed: 2026 });
    let starts = token_spans(&mut data, args.agent_tokens);
    bench_batch(args, &data.as_batch().with_credit_start(&starts))
}

/// Credit starts for `data`'s turns (each trajectory's credited spans end to end, in turn
/// order), so that the timed epilogue writes `token_advantage` as a trainer's does; with
/// `agent_tokens`, the trajectories' token counts are evened out to total it (each at least its
/// credited tokens).
fn token_spans<T: LogitElement>(data: &mut synth::SynthBatch<T>, agent_tokens: Option<u64>) -> Vec<u32> {
    let b = data.trajectory_tokens.len();
    let starts = synth::consecutive_credit_starts(&data.turn_trajectory, &data.turn_credit_tokens, 0);
    if let Some(m) = agent_tokens {
        // At least the credited tokens: the spans must still fit.
        let mut used = vec![0u32; b];
        for (&i, &c) in data.turn_trajectory.iter().zip(&data.turn_credit_tokens) {
            used[i as usize] += c;
        }
        for (i, tokens) in data.trajectory_tokens.iter_mut().enumerate() {
            let even = m / b as u64 + u64::from((i as u64) < m % b as u64);
            *tokens = (even as u32).max(used[i]);
        }
    }
    starts
}

/// Times the full pipeline on `batch`; on CUDA the logits stay on the device (uploaded once,
/// rotated beyond L2) and each launch is timed with CUDA events.
fn bench_batch(args: &BenchArgs, batch: &Batch<'_>) -> Outcome {
    let rows_only = Batch::rows(batch.real, batch.masked, batch.targets);
    let batch = if args.rows_only { &rows_only } else { batch };
    let backend = open(args.backend)?;
    let (rows, vocab) = (batch.real.rows(), batch.real.vocab());
    let dtype = batch.real.dtype();
    let params = Params::default();
    let times = time_compute(backend.as_ref(), batch, &params, args.warmup, args.iters)?;
    let med = median(&times);
    let min = times[0];
    let bytes = batch.logit_bytes();
    let gbps = bytes as f64 / med / 1e9;
    let rows_per_s = rows as f64 / med;
    if args.json {
        emit(&format!(
            "{{\"backend\":\"{}\",\"dtype\":\"{}\",\"rows\":{rows},\"vocab\":{vocab},\"iters\":{},\
             \"median_ms\":{},\"min_ms\":{},\"gbps\":{},\"bytes\":{bytes},\"rows_only\":{}}}\n",
            backend.name(),
            dtype.name(),
            args.iters,
            json_number(med * 1e3),
            json_number(min * 1e3),
            json_number(gbps),
            args.rows_only,
        ));
    } else {
        emit(&format!(
            "bench: {} backend, {} x {} {} logits ({:.1} MB read per call), {} iters after {} warmup\n\
             median {:.3} ms   min {:.3} ms   {:.2} GB/s   {:.0} rows/s\n",
            backend.name(),
            rows,
            vocab,
            dtype.name(),
            bytes as f64 / 1e6,
            args.iters,
            args.warmup,
            med * 1e3,
            min * 1e3,
            gbps,
            rows_per_s
        ));
    }
    Ok(())
}

/// Times `Backend::compute_hidden` on a hidden-state file (the whole fused path: rows, turns,
/// advantages) with the wall clock, `--chunk` token ids per chunk; on CUDA this includes the
/// upload of the inputs and the download of the outputs (`--fused-linear` reports memory;
/// `benches/cuda.rs` the device-only times).
fn bench_hidden(args: &BenchArgs, batch: &HiddenBatch<'_>) -> Outcome {
    let rows_only = HiddenBatch::rows(batch.tensors, batch.targets);
    let batch = if args.rows_only { &rows_only } else { batch };
    let backend = open(args.backend)?;
    let params = Params::default();
    let chunk = args.chunk();
    for _ in 0..args.warmup {
        backend.compute_hidden(batch, &params, chunk)?;
    }
    let mut times = Vec::with_capacity(args.iters as usize);
    for _ in 0..args.iters {
        let start = Instant::now();
        backend.compute_hidden(batch, &params, chunk)?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let (med, min) = (median(&times), times[0]);
    let t = &batch.tensors;
    let (rows, hidden, vocab, dtype) = (t.rows(), t.hidden(), t.vocab(), t.dtype());
    if args.json {
        emit(&format!(
            "{{\"path\":\"fused-linear\",\"backend\":\"{}\",\"dtype\":\"{}\",\"rows\":{rows},\"hidden\":{hidden},\
             \"vocab\":{vocab},\"chunk\":{chunk},\"iters\":{},\"median_ms\":{},\"min_ms\":{},\"rows_only\":{}}}\n",
            backend.name(),
            dtype.name(),
            args.iters,
            json_number(med * 1e3),
            json_number(min * 1e3),
            args.rows_only,
        ));
    } else {
        emit(&format!(
            "bench: fused-linear file on the {} backend, {rows} rows x hidden {hidden} x vocab {vocab} {}, \
             chunk {chunk}, {} iters after {} warmup\nmedian {:.3} ms   min {:.3} ms   {:.0} rows/s\n",
            backend.name(),
            dtype.name(),
            args.iters,
            args.warmup,
            med * 1e3,
            min * 1e3,
            rows as f64 / med,
        ));
    }
    Ok(())
}
