//! `infopo`: the command-line front end of infopo-kernels.
//!
//! - `infopo` with no arguments runs the main job: a synthetic InfoPO batch of Qwen-sized bf16
//!   logits through the whole pipeline on the best backend available, printed as tables.
//! - `infopo compute IN OUT`, `infopo verify IN`, `infopo bench`: see `--help` and `README.md`.
//!
//! Exit codes: 0 success, 1 verification failed, 2 bad input or usage (one line on stderr).

use clap::{Args, Parser, Subcommand, ValueEnum};
use half::{bf16, f16};
use infopo_kernels::synth::{self, SynthSpec};
use infopo_kernels::{cpu::Cpu, io, Backend, BackendKind, Batch, Estimator, LogitElement, Output, Params};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "infopo",
    version,
    about = "InfoPO turn-level rewards and advantages from paired logits",
    long_about = "InfoPO turn-level rewards and advantages from paired logits.\n\n\
        With no subcommand, runs the main job: a synthetic batch of 1024 rows of Qwen-sized \
        (151936) bf16 logits in 4 GRPO groups through the full pipeline on the best backend \
        available, and prints per-turn and per-trajectory tables and the throughput.\n\n\
        Exit codes: 0 success, 1 verification failed, 2 bad input or usage."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Compute every output of an input file and write them to OUT (safetensors, F32).
    Compute {
        /// Input safetensors file (real, masked, targets; optional turns and trajectories).
        input: PathBuf,
        /// Output safetensors file, written atomically.
        output: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Run a backend and the CPU reference on a file and compare every output tensor.
    Verify {
        /// Input safetensors file.
        input: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Time the full pipeline (rows, turns, advantages) on synthetic data.
    Bench(BenchArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Backend to run.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Per-row value a turn's information gain averages.
    #[arg(long, value_enum, default_value_t = EstimatorArg::LogRatio)]
    estimator: EstimatorArg,
    /// τs: logits are divided by it (> 0).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f64,
    /// β: weight of the intrinsic bonus.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    beta: f64,
    /// τ of the variance gate sigmoid(−σ_g/τ) (> 0).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    gate_temperature: f64,
    /// ε added to standard deviations (≥ 0).
    #[arg(long, default_value_t = 1e-6, allow_negative_numbers = true)]
    eps: f64,
    /// Do not normalise intrinsic values within each group.
    #[arg(long)]
    no_normalize: bool,
}

impl RunArgs {
    fn params(&self) -> Params {
        Params {
            temperature: self.temperature,
            estimator: match self.estimator {
                EstimatorArg::LogRatio => Estimator::LogRatio,
                EstimatorArg::Kl => Estimator::Kl,
            },
            beta: self.beta,
            gate_temperature: self.gate_temperature,
            eps: self.eps,
            normalize: !self.no_normalize,
        }
    }
}

#[derive(Args, Debug)]
struct BenchArgs {
    /// Backend to time.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    backend: BackendArg,
    /// Rows N of the synthetic batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    rows: u32,
    /// Vocabulary size V.
    #[arg(long, default_value_t = 151_936, value_parser = clap::value_parser!(u32).range(1..))]
    vocab: u32,
    /// Logit dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    dtype: DtypeArg,
    /// Timed iterations.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    iters: u32,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Time this input file instead of synthetic data (its shape and dtype win over
    /// --rows, --vocab and --dtype).
    #[arg(long, value_name = "IN.safetensors")]
    input: Option<std::path::PathBuf>,
    /// Time the per-row pass alone (no turns, no trajectories, no epilogue).
    #[arg(long)]
    rows_only: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum BackendArg {
    Auto,
    Cpu,
    Emulated,
    Cuda,
}

impl BackendArg {
    fn kind(self) -> BackendKind {
        match self {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Emulated => BackendKind::Emulated,
            BackendArg::Cuda => BackendKind::Cuda,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum EstimatorArg {
    LogRatio,
    Kl,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum DtypeArg {
    Bf16,
    F16,
    F32,
}

/// What a failed command reports: one line on stderr and an exit code.
#[derive(Debug)]
enum Failure {
    /// Bad input, usage or an unavailable backend: exit 2.
    Input(String),
    /// Verification failed: exit 1.
    Verify(String),
}

impl From<infopo_kernels::Error> for Failure {
    fn from(e: infopo_kernels::Error) -> Self {
        Failure::Input(e.to_string())
    }
}

type Outcome = std::result::Result<(), Failure>;

fn main() -> ExitCode {
    // clap prints usage errors itself and exits with 2 (and 0 for --help / --version).
    let cli = Cli::parse();
    let result = match cli.command {
        None => main_job(),
        Some(Command::Compute { input, output, run }) => compute(&input, &output, &run),
        Some(Command::Verify { input, run }) => verify(&input, &run),
        Some(Command::Bench(args)) => bench(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(msg)) => {
            eprintln!("infopo: {}", one_line(&msg));
            ExitCode::from(2)
        }
        Err(Failure::Verify(msg)) => {
            eprintln!("infopo: {}", one_line(&msg));
            ExitCode::from(1)
        }
    }
}

fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Writes to stdout, ignoring a closed pipe (`infopo | head`).
fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

fn open(arg: BackendArg) -> Result<Box<dyn Backend>, Failure> {
    Ok(infopo_kernels::open(arg.kind())?)
}

fn compute(input: &std::path::Path, output: &std::path::Path, run: &RunArgs) -> Outcome {
    let params = run.params();
    params.validate()?;
    let backend = open(run.backend)?;
    let data = io::read_input(input)?;
    let batch = data.as_batch()?;
    let start = Instant::now();
    let out = backend.compute(&batch, &params)?;
    let elapsed = start.elapsed();
    io::write_output(output, &out)?;
    emit(&format!(
        "{}: {} rows x {} vocab ({}), {} turns, {} trajectories on {} in {:.1} ms -> {}\n",
        input.display(),
        data.rows,
        data.vocab,
        data.real.dtype(),
        batch.turns.map_or(0, |t| t.len()),
        batch.trajectories.map_or(0, |t| t.len()),
        backend.name(),
        ms(elapsed),
        output.display()
    ));
    Ok(())
}

/// Tolerances of `infopo verify`: |a − b| ≤ atol + rtol·|b| with b the CPU reference.
fn tolerance(backend: &str) -> (f64, f64) {
    if backend == "cpu" {
        (1e-6, 1e-5)
    } else {
        (2e-4, 2e-4)
    }
}

/// The comparison of one output tensor.
#[derive(Debug, Default)]
struct Comparison {
    max_abs: f64,
    max_rel: f64,
    nan: bool,
    bad: usize,
    /// First failing index with the backend's and the reference's value.
    first_bad: Option<(usize, f64, f64)>,
}

fn compare(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Comparison {
    let mut c = Comparison::default();
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let (abs, rel, ok) = if a.is_nan() || b.is_nan() {
            c.nan = true;
            (f64::NAN, f64::NAN, false)
        } else if a.is_infinite() || b.is_infinite() {
            if a == b {
                (0.0, 0.0, true)
            } else {
                (f64::INFINITY, f64::INFINITY, false)
            }
        } else {
            let d = (a - b).abs();
            let rel = if b != 0.0 {
                d / b.abs()
            } else if d == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            (d, rel, d <= atol + rtol * b.abs())
        };
        if !abs.is_nan() {
            c.max_abs = c.max_abs.max(abs);
            c.max_rel = c.max_rel.max(rel);
        }
        if !ok {
            c.bad += 1;
            c.first_bad.get_or_insert((i, a, b));
        }
    }
    c
}

/// Every output tensor by its file name, as f64.
fn tensors(out: &Output) -> Vec<(&'static str, Vec<f64>)> {
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let r = &out.rows;
    let mut list = vec![
        (io::ROW_OUTPUTS[0], f(&r.lse_real)),
        (io::ROW_OUTPUTS[1], f(&r.lse_masked)),
        (io::ROW_OUTPUTS[2], f(&r.log_ratio)),
        (io::ROW_OUTPUTS[3], f(&r.kl)),
        (io::ROW_OUTPUTS[4], f(&r.entropy_real)),
    ];
    if let Some(info) = &out.turn_info {
        list.push(("turn_info", info.clone()));
    }
    if let Some(a) = &out.advantages {
        list.extend([
            (io::TURN_OUTPUTS[0], a.turn_intrinsic.clone()),
            (io::TURN_OUTPUTS[1], a.turn_intrinsic_norm.clone()),
            (io::TURN_OUTPUTS[2], a.turn_bonus.clone()),
            (io::TRAJECTORY_OUTPUTS[0], a.trajectory_advantage.clone()),
            (io::TRAJECTORY_OUTPUTS[1], a.trajectory_gate.clone()),
            (io::SCALAR_OUTPUTS[0], vec![a.outcome_std]),
            (io::SCALAR_OUTPUTS[1], vec![a.intrinsic_std]),
            (io::SCALAR_OUTPUTS[2], vec![a.magnitude_ratio]),
        ]);
    }
    list
}

fn sci(v: f64, nan: bool) -> String {
    if nan {
        "NaN".to_string()
    } else {
        format!("{v:.3e}")
    }
}

fn verify(input: &std::path::Path, run: &RunArgs) -> Outcome {
    let params = run.params();
    params.validate()?;
    let backend = open(run.backend)?;
    let data = io::read_input(input)?;
    let batch = data.as_batch()?;
    let (atol, rtol) = tolerance(backend.name());
    let reference = Cpu.compute(&batch, &params);
    let got = backend.compute(&batch, &params);
    let (reference, got) = match (reference, got) {
        (_, Err(e @ infopo_kernels::Error::BackendUnavailable { .. })) => return Err(e.into()),
        // Bad input: the backend must reject it the same way as the reference.
        (Err(want), Err(e)) if e.to_string() == want.to_string() => return Err(want.into()),
        (Err(want), Err(e)) => {
            return Err(Failure::Verify(format!(
                "verification failed: the cpu reference reports `{want}` but {} reports `{e}`",
                backend.name()
            )))
        }
        (Err(want), Ok(_)) => {
            return Err(Failure::Verify(format!(
                "verification failed: the cpu reference reports `{want}` but {} accepts the input",
                backend.name()
            )))
        }
        (Ok(_), Err(e)) => {
            return Err(Failure::Verify(format!(
                "verification failed: {} fails where the cpu reference succeeds: {e}",
                backend.name()
            )))
        }
        (Ok(r), Ok(g)) => (r, g),
    };

    let mut text = String::new();
    let _ = writeln!(
        text,
        "verify {}: {} against the cpu reference (|a - b| <= {atol:e} + {rtol:e}·|b|)",
        input.display(),
        backend.name()
    );
    let _ = writeln!(text, "{:<22} {:>8} {:>12} {:>12}  status", "tensor", "len", "max abs err", "max rel err");
    let want = tensors(&reference);
    let have = tensors(&got);
    let mut failures = Vec::new();
    for (name, b) in &want {
        let Some((_, a)) = have.iter().find(|(n, _)| n == name) else {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  MISSING", b.len(), "-", "-");
            failures.push(format!("{name} is missing from the {} output", backend.name()));
            continue;
        };
        if a.len() != b.len() {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  LENGTH", b.len(), "-", "-");
            failures.push(format!("{name} has {} values, the reference {}", a.len(), b.len()));
            continue;
        }
        let c = compare(a, b, atol, rtol);
        let status = if c.bad == 0 { "ok" } else { "FAIL" };
        let _ = writeln!(
            text,
            "{name:<22} {:>8} {:>12} {:>12}  {status}",
            b.len(),
            sci(c.max_abs, c.nan),
            sci(c.max_rel, c.nan)
        );
        if let Some((i, x, y)) = c.first_bad {
            failures.push(format!(
                "{name}: {} of {} values beyond tolerance (first at index {i}: {x:e} vs reference {y:e})",
                c.bad,
                b.len()
            ));
        }
    }
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  EXTRA", "-", "-", "-");
            failures.push(format!("{name} is not in the reference output"));
        }
    }
    if failures.is_empty() {
        let _ = writeln!(text, "verify: ok ({} tensors)", want.len());
        emit(&text);
        Ok(())
    } else {
        let _ = writeln!(text, "verify: FAILED");
        emit(&text);
        Err(Failure::Verify(format!("verification failed: {}", failures.join("; "))))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Times `iters` runs of the full pipeline after `warmup` untimed ones; returns the sorted times
/// in seconds. On CUDA the logits stay on the device and launches are timed with CUDA events
/// (`CudaBackend::time_device`); elsewhere a `compute` call is timed with the wall clock.
fn time_compute(
    backend: &dyn Backend,
    batch: &Batch<'_>,
    params: &Params,
    warmup: u32,
    iters: u32,
) -> Result<Vec<f64>, Failure> {
    #[cfg(feature = "cuda")]
    if backend.name() == "cuda" {
        let gpu = infopo_kernels::cuda::CudaBackend::new(0)?;
        return Ok(gpu.time_device(batch, params, warmup, iters.max(1))?);
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

fn bench(args: &BenchArgs) -> Outcome {
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

/// Turns shown in the main job's table.
const SHOWN_TURNS: usize = 12;

fn main_job() -> Outcome {
    let spec = SynthSpec::default_job();
    let backend = infopo_kernels::open(BackendKind::Auto)?;
    eprintln!(
        "infopo: synthesising {} rows x {} vocab bf16 logits, {} GRPO groups x {} trajectories (seed {}) ...",
        spec.rows, spec.vocab, spec.groups, spec.trajectories_per_group, spec.seed
    );
    let data = synth::batch::<bf16>(spec);
    let batch = data.as_batch();
    let params = Params::default();
    // One call for the outputs (and warm-up), then timed calls.
    let out = backend.compute(&batch, &params)?;
    let times = time_compute(backend.as_ref(), &batch, &params, 0, 3)?;
    let med = median(&times);

    let mut s = String::new();
    let _ = writeln!(
        s,
        "InfoPO main job: {} rows x {} vocab (bf16), {} turns, {} trajectories in {} groups; \
         estimator {}, beta {}, gate temperature {}",
        spec.rows,
        spec.vocab,
        data.turn_trajectory.len(),
        data.trajectory_group.len(),
        spec.groups,
        params.estimator.name(),
        params.beta,
        params.gate_temperature
    );
    let n = out.rows.len().max(1) as f64;
    let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let _ = writeln!(
        s,
        "rows: mean log-ratio {:.4}, mean KL {:.4}, mean entropy {:.4} nats\n",
        mean(&out.rows.log_ratio),
        mean(&out.rows.kl),
        mean(&out.rows.entropy_real)
    );

    let info = out.turn_info.as_deref().unwrap_or_default();
    if let Some(adv) = &out.advantages {
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>6} {:>7} {:>10} {:>11} {:>10} {:>11}",
            "turn", "traj", "rows", "credit", "info", "intrinsic", "norm", "bonus"
        );
        for (t, info_t) in info.iter().enumerate().take(SHOWN_TURNS) {
            let rows = data.turn_offsets[t + 1] - data.turn_offsets[t];
            let _ = writeln!(
                s,
                "{t:>5} {:>5} {rows:>6} {:>7} {:>10.5} {:>11.3e} {:>10.4} {:>11.3e}",
                data.turn_trajectory[t],
                data.turn_credit_tokens[t],
                info_t,
                adv.turn_intrinsic[t],
                adv.turn_intrinsic_norm[t],
                adv.turn_bonus[t]
            );
        }
        if info.len() > SHOWN_TURNS {
            let _ = writeln!(s, "    … ({} more turns)", info.len() - SHOWN_TURNS);
        }
        let _ = writeln!(s);
        let _ = writeln!(
            s,
            "{:>5} {:>5} {:>7} {:>6} {:>10} {:>9}",
            "traj", "group", "outcome", "tokens", "advantage", "gate"
        );
        for i in 0..adv.trajectory_advantage.len() {
            let _ = writeln!(
                s,
                "{i:>5} {:>5} {:>7.2} {:>6} {:>10.4} {:>9.3e}",
                data.trajectory_group[i],
                data.trajectory_outcome[i],
                data.trajectory_tokens[i],
                adv.trajectory_advantage[i],
                adv.trajectory_gate[i]
            );
        }
        let _ = writeln!(
            s,
            "\nbatch: outcome_std {:.6}, intrinsic_std {:.6}, magnitude_ratio {:.6}",
            adv.outcome_std, adv.intrinsic_std, adv.magnitude_ratio
        );
    }
    let bytes = batch.logit_bytes();
    let _ = writeln!(
        s,
        "throughput: {} backend, {:.1} MB of logits in {:.1} ms (median of {}) = {:.2} GB/s, {:.0} rows/s",
        backend.name(),
        bytes as f64 / 1e6,
        med * 1e3,
        times.len(),
        bytes as f64 / med / 1e9,
        spec.rows as f64 / med
    );
    emit(&s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_rule() {
        let (atol, rtol) = tolerance("emulated");
        let c = compare(&[1.0 + 3e-4, 0.0, 1e3 + 0.1], &[1.0, 1e-4, 1e3], atol, rtol);
        assert_eq!(c.bad, 0, "{c:?}");
        let c = compare(&[1.0 + 5e-4], &[1.0], atol, rtol);
        assert_eq!(c.bad, 1);
        let (atol, rtol) = tolerance("cpu");
        assert_eq!(compare(&[1.0 + 2e-5], &[1.0], atol, rtol).bad, 1);
        assert_eq!(compare(&[1.0 + 5e-7], &[1.0], atol, rtol).bad, 0);
    }

    #[test]
    fn infinities_must_match_and_nan_never_passes() {
        let inf = f64::INFINITY;
        let c = compare(&[inf, 1.0], &[inf, 1.0], 1e-6, 1e-5);
        assert_eq!((c.bad, c.max_abs), (0, 0.0));
        assert_eq!(compare(&[inf], &[1e300], 1e-6, 1e-5).bad, 1);
        assert_eq!(compare(&[-inf], &[inf], 1e-6, 1e-5).bad, 1);
        let c = compare(&[f64::NAN], &[f64::NAN], 1e-6, 1e-5);
        assert!(c.nan && c.bad == 1);
        assert_eq!(sci(c.max_abs, c.nan), "NaN");
    }

    #[test]
    fn median_of_sorted_times() {
        assert_eq!(median(&[1.0, 2.0, 9.0]), 2.0);
        assert_eq!(median(&[1.0, 2.0, 4.0, 9.0]), 3.0);
    }
}
