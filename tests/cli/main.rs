//! End-to-end tests of the `infopo` binary on files written into a temporary folder.

#[path = "../common/mod.rs"]
mod common;

use common::files::{
    entries, f32_bytes, i64_bytes, infopo, raw_batch, raw_file, raw_hidden_batch, s, stderr, stdout, with,
};
use half::bf16;
use infopo_kernels::synth::{self, SynthSpec};
use infopo_kernels::{io, Backend, Batch, Cpu, Logits, Output, Params, Trajectories, Turns};
use infopo_kernels::{HiddenBatch, HiddenTensors};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

fn small_spec() -> SynthSpec {
    SynthSpec { rows: 40, vocab: 97, groups: 2, trajectories_per_group: 3, seed: 11 }
}

/// The names, dtype F32 and shapes of every tensor in an output file, checked against the
/// library's CPU output; the values must be the CPU's, rounded to f32.
fn check_output(path: &Path, want: &Output) {
    let bytes = std::fs::read(path).expect("output file exists");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut expected: Vec<(&str, Vec<f32>)> = vec![
        ("row_lse_real", want.rows.lse_real.clone()),
        ("row_lse_masked", want.rows.lse_masked.clone()),
        ("row_log_ratio", want.rows.log_ratio.clone()),
        ("row_kl", want.rows.kl.clone()),
        ("row_entropy_real", want.rows.entropy_real.clone()),
    ];
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    if let Some(info) = &want.turn_info {
        expected.push(("turn_info", f(info)));
    }
    if let Some(a) = &want.advantages {
        expected.extend([
            ("turn_intrinsic", f(&a.turn_intrinsic)),
            ("turn_intrinsic_norm", f(&a.turn_intrinsic_norm)),
            ("turn_bonus", f(&a.turn_bonus)),
            ("trajectory_advantage", f(&a.trajectory_advantage)),
            ("trajectory_gate", f(&a.trajectory_gate)),
            ("outcome_std", f(&[a.outcome_std])),
            ("intrinsic_std", f(&[a.intrinsic_std])),
            ("magnitude_ratio", f(&[a.magnitude_ratio])),
        ]);
        if let Some(tokens) = &a.token_advantage {
            expected.push(("token_advantage", f(tokens)));
        }
        if let Some(padded) = &a.padded_advantage {
            expected.push(("token_advantage_padded", f(padded)));
        }
    }
    // [B, L] for the padded output, [len] for the others.
    let b = want.advantages.as_ref().map_or(0, |a| a.trajectory_advantage.len());
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    let mut want_names: Vec<String> = expected.iter().map(|(n, _)| n.to_string()).collect();
    want_names.sort();
    assert_eq!(names, want_names, "tensors in {}", path.display());
    for (name, values) in expected {
        let t = st.tensor(name).unwrap();
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let shape = if name == "token_advantage_padded" { vec![b, values.len() / b] } else { vec![values.len()] };
        assert_eq!(t.shape(), shape, "{name}");
        let got: Vec<f32> = t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, values, "{name}");
    }
}

#[test]
fn compute_full_batch_matches_the_cpu_library() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let data = synth::batch::<bf16>(small_spec());
    io::write_input(&input, &data.as_batch()).unwrap();
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let want = Cpu.compute(&data.as_batch(), &Params::default()).unwrap();
    assert!(want.advantages.is_some());
    check_output(&output, &want);
    assert_eq!(entries(dir.path()), [input, output], "no temporary file left behind");
}

#[test]
fn compute_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let data = synth::batch::<f32>(small_spec());
    io::write_input(&input, &data.as_batch()).unwrap();
    let args = [
        "--estimator",
        "kl",
        "--temperature",
        "0.7",
        "--beta",
        "-0.2",
        "--gate-temperature",
        "0.5",
        "--eps",
        "0.001",
        "--no-normalize",
        "--gate-source",
        "intrinsic",
    ];
    let mut cmd = vec!["compute", s(&input), s(&output), "--backend", "cpu"];
    cmd.extend(args);
    let run = infopo(&cmd);
    assert!(run.status.success(), "{}", stderr(&run));
    let params = Params {
        temperature: 0.7,
        estimator: infopo_kernels::Estimator::Kl,
        beta: -0.2,
        gate_temperature: 0.5,
        eps: 0.001,
        normalize: false,
        gate_source: infopo_kernels::GateSource::Intrinsic,
        centre_only: false,
        intrinsic_only: false,
        pool_tolerance: 0.0,
    };
    check_output(&output, &Cpu.compute(&data.as_batch(), &params).unwrap());
    // The official pipeline's ablation knobs.
    let ablation = ["--centre-only", "--intrinsic-only", "--pool-tolerance", "0.001"];
    let mut cmd = vec!["compute", s(&input), s(&output), "--backend", "cpu"];
    cmd.extend(ablation);
    let run = infopo(&cmd);
    assert!(run.status.success(), "{}", stderr(&run));
    let params = Params { centre_only: true, intrinsic_only: true, pool_tolerance: 0.001, ..Params::default() };
    check_output(&output, &Cpu.compute(&data.as_batch(), &params).unwrap());
    // A negative tolerance: a usage error naming it, exit 2, no output file.
    std::fs::remove_file(&output).unwrap();
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu", "--pool-tolerance", "-1"]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("pool_tolerance"), "{}", stderr(&run));
    assert!(!output.exists());
}

#[test]
fn compute_turns_only_and_rows_only() {
    let dir = tempfile::tempdir().unwrap();
    let data = synth::batch::<bf16>(small_spec());
    let full = data.as_batch();
    let turns_only = Batch { trajectories: None, ..full };
    let rows_only = Batch::rows(full.real, full.masked, full.targets);
    for (name, batch) in [("turns", turns_only), ("rows", rows_only)] {
        let input = dir.path().join(format!("{name}.safetensors"));
        let output = dir.path().join(format!("{name}.out.safetensors"));
        io::write_input(&input, &batch).unwrap();
        // The CPU, named: `auto` picks the GPU in a CUDA build with a driver.
        let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
        assert!(run.status.success(), "{name}: {}", stderr(&run));
        let want = Cpu.compute(&batch, &Params::default()).unwrap();
        assert_eq!(want.turn_info.is_some(), name == "turns");
        assert!(want.advantages.is_none());
        check_output(&output, &want);
    }
}

#[test]
fn verify_cpu_passes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    io::write_input(&input, &synth::batch::<bf16>(small_spec()).as_batch()).unwrap();
    let run = infopo(&["verify", s(&input), "--backend", "cpu"]);
    assert_eq!(run.status.code(), Some(0), "{}{}", stdout(&run), stderr(&run));
    let out = stdout(&run);
    for name in ["row_kl", "turn_info", "turn_bonus", "trajectory_gate", "magnitude_ratio"] {
        assert!(out.contains(name), "{out}");
    }
}

#[test]
fn verify_emulated_passes() {
    let dir = tempfile::tempdir().unwrap();
    let bf16_input = dir.path().join("bf16.safetensors");
    io::write_input(&bf16_input, &synth::batch::<bf16>(small_spec()).as_batch()).unwrap();
    let f32_input = dir.path().join("f32.safetensors");
    io::write_input(&f32_input, &synth::batch::<f32>(small_spec()).as_batch()).unwrap();
    for input in [&bf16_input, &f32_input] {
        for estimator in ["log-ratio", "kl"] {
            let run = infopo(&["verify", s(input), "--backend", "emulated", "--estimator", estimator]);
            assert_eq!(run.status.code(), Some(0), "{} {estimator}: {}{}", input.display(), stdout(&run), stderr(&run));
        }
    }
}

/// Runs `compute` on a bad input: exit 2, one line on stderr containing every `needle`, no OUT
/// and no temporary file left behind. Returns stderr.
fn expect_bad_input(dir: &Path, input: &Path, needles: &[&str]) -> String {
    let output = dir.join("out.safetensors");
    let before = entries(dir);
    let run = infopo(&["compute", s(input), s(&output), "--backend", "cpu"]);
    let err = stderr(&run);
    assert_eq!(run.status.code(), Some(2), "stderr: {err}");
    assert!(err.starts_with("infopo: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` not in: {err}");
    }
    assert!(!output.exists(), "OUT left behind");
    assert_eq!(entries(dir), before, "a file was left behind");
    err
}

#[test]
fn the_raw_batch_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    raw_file(&input, &raw_batch());
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let batch = io::read_input(&input).unwrap();
    check_output(&output, &Cpu.compute(&batch.as_batch().unwrap(), &Params::default()).unwrap());
}

#[test]
fn missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    raw_file(&input, &with(raw_batch(), "targets", None));
    expect_bad_input(dir.path(), &input, &["missing tensor `targets`"]);
    // A partial turn set names the missing member.
    raw_file(&input, &with(raw_batch(), "turn_credit_tokens", None));
    expect_bad_input(dir.path(), &input, &["turn_credit_tokens"]);
    // Trajectories without turns.
    let mut t = raw_batch();
    t.retain(|x| !x.0.starts_with("turn_"));
    raw_file(&input, &t);
    expect_bad_input(dir.path(), &input, &["turn_offsets"]);
}

#[test]
fn wrong_dtypes_and_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let f32_targets = f32_bytes(&[0.0; 6]);
    raw_file(&input, &with(raw_batch(), "targets", Some((Dtype::F32, vec![6], f32_targets))));
    expect_bad_input(dir.path(), &input, &["targets", "dtype"]);
    // real f32, masked bf16.
    let masked: Vec<u8> = (0..30).flat_map(|i| bf16::from_f32(i as f32).to_bits().to_le_bytes()).collect();
    raw_file(&input, &with(raw_batch(), "masked_logits", Some((Dtype::BF16, vec![6, 5], masked))));
    expect_bad_input(dir.path(), &input, &["dtype mismatch", "f32", "bf16"]);
    // Logits of rank 1.
    let real = f32_bytes(&[0.0; 30]);
    raw_file(&input, &with(raw_batch(), "real_logits", Some((Dtype::F32, vec![30], real))));
    expect_bad_input(dir.path(), &input, &["real", "shape"]);
    // Targets of the wrong length.
    raw_file(&input, &with(raw_batch(), "targets", Some((Dtype::I64, vec![5], i64_bytes(&[0; 5])))));
    expect_bad_input(dir.path(), &input, &["targets", "shape"]);
}

#[test]
fn nan_logit_names_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let mut real: Vec<f32> = vec![0.5; 30];
    real[3 * 5 + 2] = f32::NAN;
    raw_file(&input, &with(raw_batch(), "real_logits", Some((Dtype::F32, vec![6, 5], f32_bytes(&real)))));
    let err = expect_bad_input(dir.path(), &input, &["row 3", "real logit is NaN"]);
    assert_eq!(err.trim_end(), "infopo: row 3: a real logit is NaN or +inf (target 3)");
    // verify reports bad input the same way (both backends reject it).
    let run = infopo(&["verify", s(&input), "--backend", "cpu"]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
    assert!(stderr(&run).contains("row 3"), "{}", stderr(&run));
}

#[test]
fn decreasing_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    raw_file(&input, &with(raw_batch(), "turn_offsets", Some((Dtype::I64, vec![4], i64_bytes(&[0, 4, 2, 6])))));
    expect_bad_input(dir.path(), &input, &["turn_offsets decrease"]);
}

#[test]
fn negative_group_id() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    raw_file(
        &input,
        &with(
            raw_batch(),
            "trajectory_group",
            Some((Dtype::I32, vec![2], [0i32, -1].iter().flat_map(|x| x.to_le_bytes()).collect())),
        ),
    );
    expect_bad_input(dir.path(), &input, &["trajectory_group", "entry 1", "negative"]);
}

#[test]
fn corrupt_and_nonexistent_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    std::fs::write(&input, b"this is not a safetensors file at all").unwrap();
    expect_bad_input(dir.path(), &input, &["cannot read", "in.safetensors"]);
    // A valid file cut short.
    raw_file(&input, &raw_batch());
    let bytes = std::fs::read(&input).unwrap();
    std::fs::write(&input, &bytes[..bytes.len() - 7]).unwrap();
    expect_bad_input(dir.path(), &input, &["cannot read"]);
    std::fs::write(&input, b"").unwrap();
    expect_bad_input(dir.path(), &input, &["cannot read"]);
    let missing = dir.path().join("nope.safetensors");
    expect_bad_input(dir.path(), &missing, &["cannot read", "nope.safetensors"]);
}

#[test]
fn bad_parameters_and_unwritable_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    raw_file(&input, &raw_batch());
    let output = dir.path().join("out.safetensors");
    let run = infopo(&["compute", s(&input), s(&output), "--temperature", "0"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("temperature"), "{}", stderr(&run));
    let run = infopo(&["compute", s(&input), s(&output), "--gate-temperature", "-1"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(!output.exists());
    let nowhere = dir.path().join("no-such-folder").join("out.safetensors");
    let run = infopo(&["compute", s(&input), s(&nowhere)]);
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("cannot write"), "{}", stderr(&run));
    assert_eq!(entries(dir.path()), [input]);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["compute"][..],
        &["compute", "a.safetensors"],
        &["frobnicate"],
        &["verify", "a.safetensors", "--backend", "gpu"],
        &["compute", "a", "b", "--estimator", "mean"],
        &["compute", "a", "b", "--gate-source", "variance"],
        &["bench", "--rows", "0"],
        &["bench", "--dtype", "f64"],
        &["bench", "--iters", "x"],
        &["--no-such-flag"],
    ] {
        let run = infopo(args);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {}", stderr(&run));
        assert!(!stderr(&run).is_empty());
    }
    let run = infopo(&["--help"]);
    assert_eq!(run.status.code(), Some(0));
    for sub in ["compute", "verify", "bench"] {
        assert!(stdout(&run).contains(sub), "{}", stdout(&run));
    }
}

#[test]
fn unavailable_backend_exits_2() {
    // This build has no CUDA kernels unless built with `--features cuda`.
    if cfg!(feature = "cuda") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    raw_file(&input, &raw_batch());
    let run = infopo(&["verify", s(&input), "--backend", "cuda"]);
    assert_eq!(run.status.code(), Some(2));
    assert!(stderr(&run).contains("cuda"), "{}", stderr(&run));
}

/// The value of `"key":` in a flat JSON object, as text.
fn json_field<'a>(json: &'a str, key: &str) -> &'a str {
    let pat = format!("\"{key}\":");
    let start = json.find(&pat).unwrap_or_else(|| panic!("no key {key} in {json}")) + pat.len();
    let rest = &json[start..];
    let end = rest.find([',', '}']).expect("value ends");
    rest[..end].trim()
}

#[test]
fn bench_json_is_one_object() {
    let run = infopo(&[
        "bench",
        "--backend",
        "cpu",
        "--rows",
        "8",
        "--vocab",
        "1000",
        "--dtype",
        "f16",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = stdout(&run);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let json = lines[0].trim();
    assert!(json.starts_with('{') && json.ends_with('}'), "{json}");
    assert_eq!(json.matches('{').count(), 1, "{json}");
    assert_eq!(json_field(json, "backend"), "\"cpu\"");
    assert_eq!(json_field(json, "dtype"), "\"f16\"");
    assert_eq!(json_field(json, "rows"), "8");
    assert_eq!(json_field(json, "vocab"), "1000");
    assert_eq!(json_field(json, "iters"), "3");
    assert_eq!(json_field(json, "bytes").parse::<u64>().unwrap(), 2 * 8 * 1000 * 2);
    let median: f64 = json_field(json, "median_ms").parse().unwrap();
    let min: f64 = json_field(json, "min_ms").parse().unwrap();
    let gbps: f64 = json_field(json, "gbps").parse().unwrap();
    assert!(min > 0.0 && min <= median && gbps > 0.0, "{json}");
    // Text form.
    let run = infopo(&["bench", "--backend", "cpu", "--rows", "4", "--vocab", "500", "--iters", "2"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stdout(&run).contains("GB/s"), "{}", stdout(&run));
}

/// The main job: 1024 x 151936 bf16 logits (about 600 MB), about 13 s in the test profile on
/// 2 cores, most of it synthesising the data.
#[test]
fn main_job_runs() {
    let run = infopo(&[]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = stdout(&run);
    for needle in ["turn", "advantage", "gate", "magnitude_ratio", "GB/s", "rows/s", "…"] {
        assert!(out.contains(needle), "`{needle}` not in {out}");
    }
}

#[test]
fn write_input_round_trips_views() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    let real = [1.0f32, 2.0, 3.0, 4.0];
    let masked = [0.0f32, 2.0, 1.0, 4.0];
    let batch = Batch::rows(Logits::new(&real, 2, 2).unwrap(), Logits::new(&masked, 2, 2).unwrap(), &[1, 0])
        .with_turns(Turns { offsets: &[0, 2], trajectory: &[0], credit_tokens: &[2] })
        .with_trajectories(Trajectories { group: &[3], outcome: &[0.5], tokens: &[4] })
        .with_credit_start(&[1]);
    io::write_input(&path, &batch).unwrap();
    let back = io::read_input(&path).unwrap();
    assert_eq!(back.targets, [1, 0]);
    assert_eq!(back.real, infopo_kernels::LogitBuf::F32(real.to_vec().into()));
    let a = Cpu.compute(&batch, &Params::default()).unwrap();
    let b = Cpu.compute(&back.as_batch().unwrap(), &Params::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn temperature_out_of_range_and_non_finite_turn_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    raw_file(&input, &raw_batch());
    for backend in ["cpu", "emulated"] {
        for temperature in ["1e-9", "2000"] {
            let run = infopo(&["compute", s(&input), s(&output), "--backend", backend, "--temperature", temperature]);
            assert_eq!(run.status.code(), Some(2), "{backend} {temperature}: {}", stderr(&run));
            assert!(stderr(&run).contains("temperature"), "{}", stderr(&run));
        }
    }
    // A masked −inf on a token of row 2 (turn 1: rows 2..4) that the real policy can emit:
    // kl = +inf, so with the KL estimator turn 1's bonus would be NaN.
    let mut masked: Vec<f32> = (0..30).map(|i| (i as f32 * 0.53).cos() * 2.0).collect();
    masked[2 * 5] = f32::NEG_INFINITY;
    raw_file(&input, &with(raw_batch(), "masked_logits", Some((Dtype::F32, vec![6, 5], f32_bytes(&masked)))));
    for backend in ["cpu", "emulated"] {
        let run = infopo(&["compute", s(&input), s(&output), "--backend", backend, "--estimator", "kl"]);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{backend}: {err}");
        assert!(err.contains("turn 1") && err.contains("row 2"), "{backend}: {err}");
    }
    assert!(!output.exists());
}

/// `turn_credit_start` makes `compute` write `token_advantage` [M] (as the library computes it,
/// on the cpu and the emulated kernel); spans that overflow or overlap, or credit starts
/// without trajectories, exit 2 naming the turn.
#[test]
fn credit_starts_give_token_advantage_and_bad_spans_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let starts = |v: &[i64]| Some((Dtype::I64, vec![3], i64_bytes(v)));
    let mut good = raw_batch();
    good.push(("turn_credit_start", Dtype::I32, vec![3], [0i32, 3, 2].iter().flat_map(|x| x.to_le_bytes()).collect()));
    raw_file(&input, &good);
    let batch = io::read_input(&input).unwrap();
    let want = Cpu.compute(&batch.as_batch().unwrap(), &Params::default()).unwrap();
    assert_eq!(want.advantages.as_ref().unwrap().token_advantage.as_ref().map(Vec::len), Some(22));
    for backend in ["cpu", "emulated"] {
        let run = infopo(&["compute", s(&input), s(&output), "--backend", backend]);
        assert!(run.status.success(), "{backend}: {}", stderr(&run));
        let got = SafeTensors::deserialize(&std::fs::read(&output).unwrap())
            .unwrap()
            .tensor("token_advantage")
            .map(|t| t.shape().to_vec());
        assert_eq!(got.unwrap(), [22], "{backend}");
        if backend == "cpu" {
            check_output(&output, &want);
        }
        std::fs::remove_file(&output).unwrap();
    }
    // Turn 1 (3..7 of trajectory 0) overlaps turn 0 (0..3 shifted to 1..4); turn 2 runs past
    // trajectory 1's 12 tokens.
    for (bad, needles) in [
        (starts(&[1, 3, 2]), &["turn 1", "overlaps turn 0"][..]),
        (starts(&[0, 3, 8]), &["turn 2", "8..13", "12 agent tokens"][..]),
    ] {
        raw_file(&input, &with(good.clone(), "turn_credit_start", bad));
        expect_bad_input(dir.path(), &input, needles);
        let run = infopo(&["compute", s(&input), s(&output), "--backend", "emulated"]);
        assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
        assert!(stderr(&run).contains(needles[0]), "{}", stderr(&run));
    }
    let mut no_trajectories = good.clone();
    no_trajectories.retain(|t| !t.0.starts_with("trajectory_"));
    raw_file(&input, &no_trajectories);
    expect_bad_input(dir.path(), &input, &["turn_credit_start", "needs trajectories"]);
}

/// `--pad-width L` makes `compute` write `token_advantage_padded` [B, L] as the library computes
/// it (trajectories at the file's `trajectory_pad_offset`, or at 0), on the cpu and the emulated
/// kernel; a width a trajectory does not fit, offsets without `--pad-width`, offsets of the wrong
/// length or padding without credit starts exit 2 with no output file.
#[test]
fn pad_width_gives_the_padded_output_and_bad_padding_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let output = dir.path().join("out.safetensors");
    let offsets = |v: &[i64]| Some((Dtype::I64, vec![v.len()], i64_bytes(v)));
    let mut good = raw_batch();
    good.push(("turn_credit_start", Dtype::I64, vec![3], i64_bytes(&[0, 3, 2])));
    // Trajectories of 10 and 12 agent tokens: at columns 3 and 0 of rows of 13.
    let mut padded = good.clone();
    padded.push(("trajectory_pad_offset", Dtype::I64, vec![2], i64_bytes(&[3, 0])));
    for (file, width, offset) in [(&good, 12u32, None), (&padded, 13, Some(&[3u32, 0][..]))] {
        raw_file(&input, file);
        let mut batch = io::read_input(&input).unwrap();
        assert_eq!(batch.pad_offset.as_deref(), offset);
        batch.pad_width = Some(width);
        let want = Cpu.compute(&batch.as_batch().unwrap(), &Params::default()).unwrap();
        assert_eq!(want.advantages.as_ref().unwrap().padded_advantage.as_ref().map(Vec::len), Some(2 * width as usize));
        for backend in ["cpu", "emulated"] {
            let run =
                infopo(&["compute", s(&input), s(&output), "--backend", backend, "--pad-width", &width.to_string()]);
            assert!(run.status.success(), "{backend}: {}", stderr(&run));
            if backend == "cpu" {
                check_output(&output, &want);
            }
            // Every backend: the [B, L] tensor is the file's [M] tensor scattered at the offsets.
            let bytes = std::fs::read(&output).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            let f32s = |name| -> (Vec<usize>, Vec<f32>) {
                let t = st.tensor(name).unwrap();
                (
                    t.shape().to_vec(),
                    t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                )
            };
            let ((_, tokens), (shape, got)) = (f32s("token_advantage"), f32s("token_advantage_padded"));
            assert_eq!(shape, [2, width as usize], "{backend}");
            let mut scattered = vec![0.0f32; 2 * width as usize];
            let at = |i: usize| offset.map_or(0, |o| o[i] as usize);
            scattered[at(0)..at(0) + 10].copy_from_slice(&tokens[..10]);
            scattered[width as usize + at(1)..width as usize + at(1) + 12].copy_from_slice(&tokens[10..]);
            assert_eq!(got, scattered, "{backend}");
            std::fs::remove_file(&output).unwrap();
        }
    }
    let bad_run = |file: &[(&str, Dtype, Vec<usize>, Vec<u8>)], width: Option<&str>, needles: &[&str]| {
        raw_file(&input, file);
        let mut args = vec!["compute", s(&input), s(&output), "--backend", "emulated"];
        args.extend(width.map(|w| ["--pad-width", w]).into_iter().flatten());
        let run = infopo(&args);
        let err = stderr(&run);
        assert_eq!(run.status.code(), Some(2), "{err}");
        for needle in needles {
            assert!(err.contains(needle), "`{needle}` not in: {err}");
        }
        assert!(!output.exists(), "OUT left behind");
    };
    bad_run(&padded, Some("12"), &["trajectory 0's 10 agent tokens at offset 3 do not fit the padded width L = 12"]);
    bad_run(&good, Some("11"), &["trajectory 1's 12 agent tokens at offset 0 do not fit the padded width L = 11"]);
    bad_run(&padded, None, &["trajectory_pad_offset", "--pad-width"]);
    bad_run(
        &with(padded.clone(), "trajectory_pad_offset", offsets(&[0, 0, 0])),
        Some("20"),
        &["3 entries for 2 trajectories"],
    );
    let mut no_starts = good.clone();
    no_starts.retain(|t| t.0 != "turn_credit_start");
    bad_run(&no_starts, Some("20"), &["padded [B, L] output", "needs trajectories and credit starts"]);
}

// ------------------------------------------------------------------------------------------
// Fused-linear files: hidden states and the lm_head weight instead of logits.

/// A fused-linear batch over the synthetic layout of `small_spec` (40 rows, V = 97): hidden
/// states [40, 8] and an lm_head [97, 8] in dtype T. Returns the layout's synthetic batch and
/// the three tensors.
fn hidden_inputs<T: infopo_kernels::LogitElement>() -> (synth::SynthBatch<T>, [Vec<T>; 3]) {
    let data = synth::batch::<T>(small_spec());
    let mut rng = synth::Rng::new(5);
    let (n, d, v) = (data.rows, 8, data.vocab);
    let mut draw =
        |len: usize, scale: f64| -> Vec<T> { (0..len).map(|_| T::from_f32((scale * rng.normal()) as f32)).collect() };
    let real = draw(n * d, 1.0);
    let masked = draw(n * d, 1.0);
    let head = draw(v * d, 0.8);
    (data, [real, masked, head])
}

fn hidden_batch<'a, T: infopo_kernels::LogitElement>(
    data: &'a synth::SynthBatch<T>,
    [real, masked, head]: &'a [Vec<T>; 3],
) -> HiddenBatch<'a> {
    use infopo_kernels::LogitData;
    let tensors = HiddenTensors::new(
        LogitData::from_slice(real),
        LogitData::from_slice(masked),
        LogitData::from_slice(head),
        data.rows,
        8,
        data.vocab,
    )
    .unwrap();
    let b = data.as_batch();
    HiddenBatch {
        tensors,
        targets: b.targets,
        turns: b.turns,
        trajectories: b.trajectories,
        credit_start: None,
        padding: None,
    }
}

#[test]
fn compute_and_verify_fused_linear_files() {
    use infopo_kernels::emulated::Emulated;
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    let (data, tensors) = hidden_inputs::<bf16>();
    let batch = hidden_batch(&data, &tensors);
    io::write_hidden_input(&input, &batch).unwrap();
    let params = Params::default();
    // compute: the library's outputs exactly, at the default chunk and at --chunk 10.
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
    assert!(run.status.success(), "{}", stderr(&run));
    assert!(stdout(&run).contains("fused linear"), "{}", stdout(&run));
    let want = Cpu.compute_hidden(&batch, &params, infopo_kernels::DEFAULT_CHUNK).unwrap();
    assert!(want.advantages.is_some());
    check_output(&output, &want);
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "emulated", "--chunk", "10"]);
    assert!(run.status.success(), "{}", stderr(&run));
    check_output(&output, &Emulated::new().compute_hidden(&batch, &params, 10).unwrap());
    assert_eq!(entries(dir.path()), [input.clone(), output.clone()], "no temporary file left behind");
    // verify: both backends against the f64 reference, for f32 files too.
    let f32_input = dir.path().join("f32.safetensors");
    let (data32, tensors32) = hidden_inputs::<f32>();
    io::write_hidden_input(&f32_input, &hidden_batch(&data32, &tensors32)).unwrap();
    for file in [&input, &f32_input] {
        for (backend, chunk) in [("cpu", "4096"), ("emulated", "13"), ("emulated", "97")] {
            let run = infopo(&["verify", s(file), "--backend", backend, "--chunk", chunk, "--estimator", "kl"]);
            assert_eq!(run.status.code(), Some(0), "{backend} {chunk}: {}{}", stdout(&run), stderr(&run));
            for name in ["row_kl", "turn_info", "turn_bonus", "magnitude_ratio"] {
                assert!(stdout(&run).contains(name), "{}", stdout(&run));
            }
        }
    }
    // bench: a hidden-state file times the fused path (compute_hidden) on each backend.
    for backend in ["cpu", "emulated"] {
        let args = ["bench", "--input", s(&input), "--backend", backend, "--chunk", "10", "--iters", "1", "--json"];
        let run = infopo(&args);
        assert!(run.status.success(), "{backend}: {}", stderr(&run));
        let json = stdout(&run);
        for needle in ["\"path\":\"fused-linear\"", "\"chunk\":10", "\"hidden\":8", "median_ms"] {
            assert!(json.contains(needle), "{backend}: `{needle}` not in {json}");
        }
    }
    // --chunk must be at least 1 (a usage error).
    let run = infopo(&["compute", s(&input), s(&output), "--chunk", "0"]);
    assert_eq!(run.status.code(), Some(2), "{}", stderr(&run));
}

#[test]
fn the_raw_hidden_batch_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
    raw_file(&input, &raw_hidden_batch());
    let run = infopo(&["compute", s(&input), s(&output), "--backend", "cpu"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let Ok(io::Input::Hidden(batch)) = io::read_any_input(&input) else { panic!("not a fused-linear file") };
    let want = Cpu.compute_hidden(&batch.as_batch().unwrap(), &Params::default(), 4096).unwrap();
    assert!(want.advantages.is_some());
    check_output(&output, &want);
}

/// Each malformed fused-linear file exits 2 with one clear line and writes nothing, from
/// `compute` and from `verify`.
#[test]
fn malformed_fused_linear_files() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let bad = |tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)], needles: &[&str]| {
        raw_file(&input, tensors);
        expect_bad_input(dir.path(), &input, needles);
        let run = infopo(&["verify", s(&input), "--backend", "emulated"]);
        assert_eq!(run.status.code(), Some(2), "verify: {}", stderr(&run));
        for needle in needles {
            assert!(stderr(&run).contains(needle), "verify: `{needle}` not in {}", stderr(&run));
        }
    };
    // Both sets.
    let mut both = raw_hidden_batch();
    both.extend(raw_batch().into_iter().filter(|x| x.0.ends_with("_logits")));
    bad(&both, &["both logits", "real_logits", "lm_head", "one of the two sets"]);
    // Neither set.
    let mut neither = raw_batch();
    neither.retain(|x| !x.0.ends_with("_logits"));
    bad(&neither, &["neither logits", "real_hidden"]);
    // A partial set names the missing member.
    bad(&with(raw_hidden_batch(), "lm_head", None), &["missing tensor `lm_head`"]);
    bad(&with(raw_hidden_batch(), "real_hidden", None), &["missing tensor `real_hidden`"]);
    // The lm_head's width D differs from the hidden states'.
    let head = f32_bytes(&[0.5; 15]);
    bad(&with(raw_hidden_batch(), "lm_head", Some((Dtype::F32, vec![5, 3], head))), &["lm_head", "D = 3", "D = 4"]);
    // masked_hidden of another shape; hidden states of rank 1.
    let masked = f32_bytes(&[0.5; 20]);
    bad(
        &with(raw_hidden_batch(), "masked_hidden", Some((Dtype::F32, vec![5, 4], masked))),
        &["masked_hidden", "shape"],
    );
    let real = f32_bytes(&[0.5; 24]);
    bad(&with(raw_hidden_batch(), "real_hidden", Some((Dtype::F32, vec![24], real))), &["real_hidden", "[N, D]"]);
    // Targets for another number of rows.
    let targets = i64_bytes(&[0; 5]);
    bad(&with(raw_hidden_batch(), "targets", Some((Dtype::I64, vec![5], targets))), &["targets", "shape"]);
    // One dtype for the three: a bf16 lm_head with f32 hidden states.
    let head: Vec<u8> = (0..20).flat_map(|i| bf16::from_f32(i as f32 * 0.1).to_bits().to_le_bytes()).collect();
    bad(&with(raw_hidden_batch(), "lm_head", Some((Dtype::BF16, vec![5, 4], head))), &["lm_head", "bf16", "f32"]);
    // A dtype the fused path does not read.
    let head: Vec<u8> = (0..20).flat_map(|i| (i as f64).to_le_bytes()).collect();
    bad(&with(raw_hidden_batch(), "lm_head", Some((Dtype::F64, vec![5, 4], head))), &["lm_head", "F64"]);
}

/// The CLI with `--backend cuda` in a CUDA build, as smoke steps: `compute` and `verify` (against
/// the CPU reference) on a logits file and a fused-linear file, `bench` and
/// `bench --fused-linear`, and the main job on `auto` (which picks the GPU).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU (or the CPU stand-in of the driver): cargo test --features cuda --test cli -- --include-ignored cuda"]
fn cuda_backend_commands() {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.safetensors");
    io::write_input(&logits, &synth::batch::<bf16>(small_spec()).as_batch()).unwrap();
    let hidden = dir.path().join("hidden.safetensors");
    let (data, tensors) = hidden_inputs::<bf16>();
    io::write_hidden_input(&hidden, &hidden_batch(&data, &tensors)).unwrap();
    for input in [&logits, &hidden] {
        let out = dir.path().join("out.safetensors");
        let run = infopo(&["compute", s(input), s(&out), "--backend", "cuda"]);
        assert_eq!(run.status.code(), Some(0), "compute {}: {}", input.display(), stderr(&run));
        assert!(out.exists());
        let run = infopo(&["verify", s(input), "--backend", "cuda"]);
        assert_eq!(run.status.code(), Some(0), "verify {}: {}{}", input.display(), stdout(&run), stderr(&run));
    }
    let base =
        ["bench", "--backend", "cuda", "--rows", "8", "--vocab", "3000", "--iters", "2", "--warmup", "1", "--json"];
    let run = infopo(&base);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert_eq!(json_field(stdout(&run).trim(), "backend"), "\"cuda\"");
    let run = infopo(&[&base[..], &["--fused-linear", "--hidden", "16", "--chunk", "1000"]].concat());
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(stdout(&run).contains("fused-linear"), "{}", stdout(&run));
    let run = infopo(&[]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    assert!(stdout(&run).contains("cuda"), "the main job did not pick the GPU: {}", stdout(&run));
}
