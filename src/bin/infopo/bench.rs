//! `infopo bench`: the full pipeline timed on synthetic data or an input file; with
//! `--fused-linear`, the fused path from hidden states ([`fused`]).

mod fused;
mod memory;

use crate::args::{BenchArgs, DtypeArg};
use crate::timing::{median, time_compute};
use crate::{emit, open, Failure, Outcome};
use half::{bf16, f16};
use infopo_kernels::synth::{self, SynthSpec};
use infopo_kernels::{Batch, LogitElement, Params};

pub fn run(args: &BenchArgs) -> Outcome {
    if args.fused_linear {
        return fused::run(args);
    }
    if let Some(path) = &args.input {
        let input = infopo_kernels::io::read_input(path)?;
        return bench_batch(args, &input.as_batch()?);
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
    let data = synth::batch::<T>(SynthSpec { rows, vocab, groups: 4, trajectories_per_group: 8, seed: 2026 });
    bench_batch(args, &data.as_batch())
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
