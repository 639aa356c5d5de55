//! `infopo_kernels::candle` (feature `candle`): candle tensors in and out.
//!
//! Row outputs are checked against candle's own float64 ops (log-softmax by max-shifted
//! log-sum-exp, `gather`, a KL sum), the batch against the CPU backend, and every bad input
//! against its typed error. Inputs are fresh random logits; the seed is printed (run with
//! `INFOPO_SEED=…` to replay one). The fused entries (hidden states and the lm_head weight) are
//! checked against candle's f64 `matmul` followed by the same f64 ops, and the crate's epilogue
//! on those rows.

use candle_core::{DType, Device, IndexOp, Tensor};
use infopo_kernels::candle::{
    compute, compute_hidden, score_hidden_rows, score_rows, HiddenStates, ENTROPY_REAL, KL, LOG_RATIO, LSE_MASKED,
    LSE_REAL,
};
use infopo_kernels::synth::{self, Rng, SynthSpec};
use infopo_kernels::DEFAULT_CHUNK;
use infopo_kernels::{advantages, TurnAccumulator};
use infopo_kernels::{Backend, Error, Estimator, Params, RowErrorKind, Trajectories, Turns};

fn fresh_seed() -> u64 {
    let seed = std::env::var("INFOPO_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("seed {seed} (INFOPO_SEED={seed} replays it)");
    seed
}

/// `[rows, vocab]` F32 logits shaped like a language model's (see `synth::logits_pair`), and
/// targets of the given dtype (some of them off the distribution's peak).
fn random_inputs(rng: &mut Rng, rows: usize, vocab: usize, target_dtype: DType) -> (Tensor, Tensor, Tensor) {
    let (real, masked, targets) = synth::logits_pair::<f32>(rng, rows, vocab);
    let real = Tensor::from_vec(real, (rows, vocab), &Device::Cpu).unwrap();
    let masked = Tensor::from_vec(masked, (rows, vocab), &Device::Cpu).unwrap();
    let targets = Tensor::from_vec(targets, rows, &Device::Cpu).unwrap().to_dtype(target_dtype).unwrap();
    (real, masked, targets)
}

/// The five row outputs by candle's own ops in float64, `[5][N]`.
fn candle_f64_reference(real: &Tensor, masked: &Tensor, targets: &Tensor, temperature: f64) -> Vec<Vec<f64>> {
    let run = || -> candle_core::Result<Vec<Vec<f64>>> {
        let x = (real.to_dtype(DType::F64)? / temperature)?;
        let y = (masked.to_dtype(DType::F64)? / temperature)?;
        let lse = |t: &Tensor| -> candle_core::Result<Tensor> {
            let max = t.max_keepdim(1)?;
            t.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max
        };
        let (lse_x, lse_y) = (lse(&x)?, lse(&y)?);
        let (log_px, log_py) = (x.broadcast_sub(&lse_x)?, y.broadcast_sub(&lse_y)?);
        let ids = targets.contiguous()?.unsqueeze(1)?;
        let log_ratio = (log_px.gather(&ids, 1)? - log_py.gather(&ids, 1)?)?.squeeze(1)?;
        let px = log_px.exp()?;
        let kl = (&px * (&log_px - &log_py)?)?.sum(1)?;
        let entropy = (&px * &log_px)?.sum(1)?.neg()?;
        Ok(vec![
            lse_x.squeeze(1)?.to_vec1()?,
            lse_y.squeeze(1)?.to_vec1()?,
            log_ratio.to_vec1()?,
            kl.to_vec1()?,
            entropy.to_vec1()?,
        ])
    };
    run().expect("candle reference")
}

fn assert_rows_match(got: &Tensor, want: &[Vec<f64>], what: &str) {
    assert_eq!(got.dtype(), DType::F32, "{what}");
    let got: Vec<Vec<f32>> = got.to_vec2().unwrap();
    assert_eq!(got.len(), 5, "{what}");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: {}", infopo_kernels::RowOutputs::NAMES[k]);
        for (r, (&g, &w)) in g.iter().zip(w).enumerate() {
            // The CPU backend computes in f64 and rounds once to f32.
            let tol = 1e-6 + 1e-5 * w.abs();
            assert!(
                (g as f64 - w).abs() <= tol,
                "{what}: {} row {r}: got {g}, candle f64 says {w}",
                infopo_kernels::RowOutputs::NAMES[k]
            );
        }
    }
}

#[test]
fn row_outputs_match_candle_f64_ops_whole_and_row_sliced() {
    let mut rng = Rng::new(fresh_seed());
    let shapes = [(1, 1), (3, 7), (17, 129), (40, 1001), (6, 4099)];
    for (case, &(rows, vocab)) in shapes.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let target_dtype = if case % 2 == 0 { DType::U32 } else { DType::I64 };
            // `before` and `after` extra rows around the batch so the slice starts mid-storage.
            let (before, after) = (1 + rng.below(5) as usize, rng.below(3) as usize);
            let (real, masked, targets) = random_inputs(&mut rng, before + rows + after, vocab, target_dtype);
            let (real, masked) = (real.to_dtype(dtype).unwrap(), masked.to_dtype(dtype).unwrap());
            let temperature = [1.0, 0.7, 1.3][case % 3];
            let params = Params { temperature, ..Params::default() };
            let what = format!("{dtype:?} [{rows}, {vocab}] targets {target_dtype:?} temperature {temperature}");

            let whole = score_rows(&real, &masked, &targets, &params).unwrap();
            assert_eq!(whole.dims(), &[5, before + rows + after]);
            assert_rows_match(&whole, &candle_f64_reference(&real, &masked, &targets, temperature), &what);

            let slice = |t: &Tensor| t.narrow(0, before, rows).unwrap();
            let (real_rows, masked_rows, target_rows) = (slice(&real), slice(&masked), slice(&targets));
            assert_eq!(real_rows.layout().start_offset(), before * vocab, "the slice starts mid-storage");
            let sliced = score_rows(&real_rows, &masked_rows, &target_rows, &params).unwrap();
            assert_rows_match(
                &sliced,
                &candle_f64_reference(&real_rows, &masked_rows, &target_rows, temperature),
                &format!("{what}, rows {before}..{}", before + rows),
            );
            // The slice is read in place: the same rows give the same bits as in the whole call.
            let whole_rows = whole.narrow(1, before, rows).unwrap();
            assert_eq!(sliced.to_vec2::<f32>().unwrap(), whole_rows.to_vec2::<f32>().unwrap(), "{what}");
        }
    }
}

#[test]
fn output_rows_are_in_the_documented_order() {
    // Real logits uniform over V; masked ones the same but with the target's logit raised by
    // a. Closed forms: lse_real = entropy = ln V, lse_masked = ln(V − 1 + e^a),
    // log_ratio = −ln V − (a − lse_masked), kl = −ln V + lse_masked − a/V: five distinct values.
    let (rows, vocab, a) = (3usize, 50usize, 2.0f64);
    let targets = [0u32, 7, 49];
    let real = Tensor::zeros((rows, vocab), DType::F32, &Device::Cpu).unwrap();
    let mut masked = vec![vec![0f32; vocab]; rows];
    for (row, &t) in masked.iter_mut().zip(&targets) {
        row[t as usize] = a as f32;
    }
    let masked = Tensor::new(masked, &Device::Cpu).unwrap();
    let out = score_rows(&real, &masked, &Tensor::new(&targets, &Device::Cpu).unwrap(), &Params::default()).unwrap();
    let v = vocab as f64;
    let lse_masked = (v - 1.0 + a.exp()).ln();
    let want = [
        (LSE_REAL, v.ln()),
        (LSE_MASKED, lse_masked),
        (LOG_RATIO, -v.ln() - (a - lse_masked)),
        (KL, -v.ln() + lse_masked - a / v),
        (ENTROPY_REAL, v.ln()),
    ];
    for (k, want) in want {
        for got in out.i(k).unwrap().to_vec1::<f32>().unwrap() {
            assert!((got as f64 - want).abs() < 1e-5, "{}: {got} vs {want}", infopo_kernels::RowOutputs::NAMES[k]);
        }
    }
}

#[test]
fn empty_batch_gives_an_empty_output() {
    let real = Tensor::zeros((0, 9), DType::BF16, &Device::Cpu).unwrap();
    let targets = Tensor::zeros(0, DType::I64, &Device::Cpu).unwrap();
    let out = score_rows(&real, &real, &targets, &Params::default()).unwrap();
    assert_eq!(out.dims(), &[5, 0]);
}

fn expect_err(result: infopo_kernels::Result<Tensor>) -> Error {
    match result {
        Ok(t) => panic!("expected an error, got a tensor of shape {:?}", t.dims()),
        Err(e) => e,
    }
}

#[test]
fn bad_dtypes_are_typed_errors_naming_the_tensors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, targets) = random_inputs(&mut rng, 4, 13, DType::I64);
    let p = Params::default();
    let bf16 = masked.to_dtype(DType::BF16).unwrap();
    let e = expect_err(score_rows(&real, &bf16, &targets, &p));
    assert!(matches!(e, Error::DtypeMismatch { real: "f32", masked: "bf16" }), "{e}");
    let e = expect_err(score_rows(&real.to_dtype(DType::F64).unwrap(), &masked, &targets, &p));
    assert!(matches!(e, Error::UnsupportedDtype { tensor: "real", .. }), "{e}");
    assert!(e.to_string().contains("f64"), "{e}");
    let e = expect_err(score_rows(&real, &masked.to_dtype(DType::U8).unwrap(), &targets, &p));
    assert!(matches!(e, Error::UnsupportedDtype { tensor: "masked", .. }), "{e}");
    for bad in [DType::F32, DType::U8, DType::F64] {
        let e = expect_err(score_rows(&real, &masked, &targets.to_dtype(bad).unwrap(), &p));
        assert!(matches!(e, Error::UnsupportedDtype { tensor: "targets", expected: "u32 or i64", .. }), "{e}");
    }
}

#[test]
fn bad_shapes_are_typed_errors_naming_both_tensors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, targets) = random_inputs(&mut rng, 6, 11, DType::U32);
    let p = Params::default();
    let shape_err = |e: Error, needles: &[&str]| {
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        for n in needles {
            assert!(e.to_string().contains(n), "`{e}` should mention {n}");
        }
    };
    let wider = random_inputs(&mut rng, 6, 12, DType::U32).1;
    shape_err(expect_err(score_rows(&real, &wider, &targets, &p)), &["`real` is [6, 11]", "`masked` is [6, 12]"]);
    let taller = random_inputs(&mut rng, 7, 11, DType::U32).1;
    shape_err(expect_err(score_rows(&real, &taller, &targets, &p)), &["`real`", "`masked` is [7, 11]"]);
    shape_err(
        expect_err(score_rows(&real, &masked, &targets.narrow(0, 0, 5).unwrap(), &p)),
        &["`targets` is [5]", "`real` is [6, 11]"],
    );
    shape_err(expect_err(score_rows(&real, &masked, &targets.reshape((2, 3)).unwrap(), &p)), &["`targets` is [2, 3]"]);
    let cube = real.reshape((2, 3, 11)).unwrap();
    shape_err(expect_err(score_rows(&cube, &cube, &targets, &p)), &["[N, V]", "[2, 3, 11]"]);
    let empty_vocab = Tensor::zeros((6, 0), DType::F32, &Device::Cpu).unwrap();
    let e = expect_err(score_rows(&empty_vocab, &empty_vocab, &targets, &p));
    assert!(matches!(e, Error::EmptyVocab), "{e}");
}

#[test]
fn non_row_contiguous_inputs_are_typed_errors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, targets) = random_inputs(&mut rng, 8, 8, DType::I64);
    let p = Params::default();
    // A transpose: same shape, columns in memory.
    let e = expect_err(score_rows(&real.t().unwrap(), &masked, &targets, &p));
    assert!(matches!(e, Error::NotContiguous { tensor: "real", .. }), "{e}");
    // A column slice: each row is contiguous but rows are not adjacent.
    let (wide, wide_masked, _) = random_inputs(&mut rng, 8, 10, DType::I64);
    let cols = |t: &Tensor| t.narrow(1, 1, 8).unwrap();
    let e = expect_err(score_rows(&cols(&wide), &cols(&wide_masked), &targets, &p));
    assert!(matches!(e, Error::NotContiguous { tensor: "real", .. }), "{e}");
    assert!(e.to_string().contains("contiguous()"), "{e}");
    let e = expect_err(score_rows(&real, &cols(&wide_masked), &targets, &p));
    assert!(matches!(e, Error::NotContiguous { tensor: "masked", .. }), "{e}");
    // A broadcast row (stride 0).
    let one_row = real.narrow(0, 0, 1).unwrap().broadcast_as((8, 8)).unwrap();
    let e = expect_err(score_rows(&one_row, &masked, &targets, &p));
    assert!(matches!(e, Error::NotContiguous { tensor: "real", .. }), "{e}");
    // Targets taken as a column of a [N, 2] tensor.
    let pairs = Tensor::stack(&[&targets, &targets], 1).unwrap();
    let e = expect_err(score_rows(&real, &masked, &pairs.i((.., 0)).unwrap(), &p));
    assert!(matches!(e, Error::NotContiguous { tensor: "targets", .. }), "{e}");
    // `.contiguous()` is the documented way out, and gives the same numbers as the copy.
    let fixed = score_rows(&cols(&wide).contiguous().unwrap(), &cols(&wide_masked).contiguous().unwrap(), &targets, &p);
    let want = candle_f64_reference(&cols(&wide), &cols(&wide_masked), &targets, 1.0);
    assert_rows_match(&fixed.unwrap(), &want, "contiguous copy of a column slice");
}

#[test]
fn row_data_errors_and_bad_params_are_the_crate_errors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, targets) = random_inputs(&mut rng, 5, 9, DType::I64);
    let out_of_range = Tensor::new(&[0i64, 1, 9, 2, 3], &Device::Cpu).unwrap();
    let e = expect_err(score_rows(&real, &masked, &out_of_range, &Params::default()));
    assert!(
        matches!(e, Error::Row { row: 2, kind: infopo_kernels::RowErrorKind::TargetOutOfRange, target: Some(9) }),
        "{e}"
    );
    let mut values = real.to_vec2::<f32>().unwrap();
    values[3][4] = f32::NAN;
    let nan = Tensor::new(values, &Device::Cpu).unwrap();
    let e = expect_err(score_rows(&nan, &masked, &targets, &Params::default()));
    assert!(matches!(e, Error::Row { row: 3, kind: infopo_kernels::RowErrorKind::RealNotFinite, .. }), "{e}");
    let e = expect_err(score_rows(&real, &masked, &targets, &Params { temperature: 0.0, ..Params::default() }));
    assert!(matches!(e, Error::Param { name: "temperature", .. }), "{e}");
}

/// A synthetic batch as candle tensors: `[before + rows + after, V]` logits of `dtype` and the
/// row slice `before..before + rows` that the batch's layout covers.
fn synth_tensors(spec: SynthSpec, dtype: DType, before: usize) -> (synth::SynthBatch<f32>, Tensor, Tensor, Tensor) {
    let b = synth::batch::<f32>(spec);
    let pad = |v: &[f32]| {
        let mut all = vec![0.5f32; before * b.vocab];
        all.extend_from_slice(v);
        all.extend(std::iter::repeat_n(-0.5f32, 2 * b.vocab));
        let t = Tensor::from_vec(all, (before + b.rows + 2, b.vocab), &Device::Cpu).unwrap();
        t.to_dtype(dtype).unwrap().narrow(0, before, b.rows).unwrap()
    };
    let (real, masked) = (pad(&b.real), pad(&b.masked));
    let targets = Tensor::from_slice(&b.targets, b.rows, &Device::Cpu).unwrap();
    (b, real, masked, targets)
}

#[test]
fn batch_matches_the_cpu_backend() {
    let seed = fresh_seed();
    for (k, (dtype, estimator, with_trajectories)) in [
        (DType::BF16, Estimator::LogRatio, true),
        (DType::F32, Estimator::Kl, true),
        (DType::F16, Estimator::LogRatio, false),
    ]
    .into_iter()
    .enumerate()
    {
        let spec =
            SynthSpec { rows: 50 + 7 * k, vocab: 257 + k, groups: 2, trajectories_per_group: 3, seed: seed + k as u64 };
        let (b, real, masked, targets) = synth_tensors(spec, dtype, 3);
        let params = ablation_params(k, estimator);
        let turns =
            Turns { offsets: &b.turn_offsets, trajectory: &b.turn_trajectory, credit_tokens: &b.turn_credit_tokens };
        let trajectories =
            Trajectories { group: &b.trajectory_group, outcome: &b.trajectory_outcome, tokens: &b.trajectory_tokens };
        // Each trajectory's turns credit consecutive spans after 5 prompt-echo tokens (the
        // synthetic trajectories have at least 32 tokens beyond their credits).
        let starts = synth::consecutive_credit_starts(&b.turn_trajectory, &b.turn_credit_tokens, 5);
        let credit_start = with_trajectories.then_some(&starts[..]);
        let out =
            compute(&real, &masked, &targets, turns, with_trajectories.then_some(trajectories), credit_start, &params)
                .unwrap();

        // The CPU backend on the same logits (as host slices of the candle tensors' values).
        let host = |t: &Tensor| t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (real_host, masked_host) = (host(&real), host(&masked));
        let rows = b.rows;
        let want = cpu_reference(
            dtype,
            &real_host,
            &masked_host,
            &b,
            turns,
            with_trajectories.then_some(trajectories),
            credit_start,
            &params,
        );

        assert_eq!(out.rows.dims(), &[5, rows]);
        assert_eq!(out.turn_info.dims(), &[b.turn_trajectory.len()]);
        assert_eq!(out.turn_info.dtype(), DType::F64);
        let got = out.to_output().unwrap();
        assert_eq!(got, want, "{dtype:?} {estimator:?} trajectories {with_trajectories}");
        assert_eq!(out.advantages.is_some(), with_trajectories);
        if let Some(a) = &out.advantages {
            assert_eq!(a.trajectory_advantage.dims(), &[b.trajectory_group.len()]);
            assert_eq!(a.batch_stats.dims(), &[3]);
            let tokens: u32 = b.trajectory_tokens.iter().sum();
            assert_eq!(a.token_advantage.as_ref().map(|t| t.dims().to_vec()), Some(vec![tokens as usize]));
        }
    }
}

/// The parameters of case `k` of the batch tests: the official ablation knobs pass through the
/// adapter too (case 0: centre only with a pool tolerance; case 1: intrinsic only).
fn ablation_params(k: usize, estimator: Estimator) -> Params {
    Params {
        estimator,
        centre_only: k == 0,
        pool_tolerance: if k == 0 { 1e-3 } else { 0.0 },
        intrinsic_only: k == 1,
        ..Params::default()
    }
}

/// The CPU backend on host logits of `dtype` (values exactly those of the candle tensors).
#[allow(clippy::too_many_arguments)]
fn cpu_reference(
    dtype: DType,
    real: &[f32],
    masked: &[f32],
    b: &synth::SynthBatch<f32>,
    turns: Turns<'_>,
    trajectories: Option<Trajectories<'_>>,
    credit_start: Option<&[u32]>,
    params: &Params,
) -> infopo_kernels::Output {
    #[allow(clippy::too_many_arguments)]
    fn run<T: infopo_kernels::LogitElement>(
        real: &[f32],
        masked: &[f32],
        b: &synth::SynthBatch<f32>,
        turns: Turns<'_>,
        trajectories: Option<Trajectories<'_>>,
        credit_start: Option<&[u32]>,
        params: &Params,
    ) -> infopo_kernels::Output {
        let narrow = |v: &[f32]| v.iter().map(|&x| T::from_f32(x)).collect::<Vec<T>>();
        let (real, masked) = (narrow(real), narrow(masked));
        let logits = |v| infopo_kernels::Logits::new(v, b.rows, b.vocab).unwrap();
        let mut batch = infopo_kernels::Batch::rows(logits(&real), logits(&masked), &b.targets).with_turns(turns);
        batch.trajectories = trajectories;
        batch.credit_start = credit_start;
        infopo_kernels::Cpu.compute(&batch, params).unwrap()
    }
    match dtype {
        DType::F32 => run::<f32>(real, masked, b, turns, trajectories, credit_start, params),
        DType::F16 => run::<half::f16>(real, masked, b, turns, trajectories, credit_start, params),
        DType::BF16 => run::<half::bf16>(real, masked, b, turns, trajectories, credit_start, params),
        other => panic!("no logits of {other:?}"),
    }
}

#[test]
fn batch_layout_errors_are_the_crate_errors() {
    let spec = SynthSpec { rows: 20, vocab: 31, groups: 1, trajectories_per_group: 2, seed: fresh_seed() };
    let (b, real, masked, targets) = synth_tensors(spec, DType::F32, 0);
    let p = Params::default();
    let mut offsets = b.turn_offsets.clone();
    *offsets.last_mut().unwrap() += 1;
    let turns = Turns { offsets: &offsets, trajectory: &b.turn_trajectory, credit_tokens: &b.turn_credit_tokens };
    let e = compute(&real, &masked, &targets, turns, None, None, &p).unwrap_err();
    assert!(matches!(e, Error::Turns { .. }), "{e}");
    let turns =
        Turns { offsets: &b.turn_offsets, trajectory: &b.turn_trajectory, credit_tokens: &b.turn_credit_tokens };
    let outcome = vec![f64::NAN; b.trajectory_group.len()];
    let trajectories = Trajectories { group: &b.trajectory_group, outcome: &outcome, tokens: &b.trajectory_tokens };
    let e = compute(&real, &masked, &targets, turns, Some(trajectories), None, &p).unwrap_err();
    assert!(matches!(e, Error::Trajectories { .. }), "{e}");
    // The tensors are checked as in `score_rows`.
    let e = compute(&real, &masked.to_dtype(DType::BF16).unwrap(), &targets, turns, None, None, &p).unwrap_err();
    assert!(matches!(e, Error::DtypeMismatch { .. }), "{e}");
}

// ---- Fused linear: hidden states and the lm_head weight --------------------------------------

/// `[rows, d]` values of `dtype` from `rng`: hidden states ~ ±1 (`scale` 1), or lm_head rows of
/// ±3/√D (logits of a few units, as a trained head gives).
fn random_matrix(rng: &mut Rng, rows: usize, d: usize, scale: f64, dtype: DType) -> Tensor {
    let values: Vec<f32> = (0..rows * d).map(|_| ((2.0 * rng.uniform() - 1.0) * scale) as f32).collect();
    Tensor::from_vec(values, (rows, d), &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

/// The masked run's hidden states: the real ones perturbed (as masking the feedback would).
fn perturbed(rng: &mut Rng, real: &Tensor) -> Tensor {
    let (rows, d) = real.dims2().unwrap();
    let noise = random_matrix(rng, rows, d, 0.3, DType::F32);
    (real.to_dtype(DType::F32).unwrap() + noise).unwrap().to_dtype(real.dtype()).unwrap()
}

/// The materialised path by candle's own f64 ops: logits = hidden · lm_headᵀ in f64 (of the
/// inputs' values as stored), then the row outputs of [`candle_f64_reference`].
fn materialised_f64(h: &HiddenStates<'_>, targets: &Tensor, temperature: f64) -> Vec<Vec<f64>> {
    let head_t = h.lm_head.to_dtype(DType::F64).unwrap().t().unwrap().contiguous().unwrap();
    let logits = |x: &Tensor| x.to_dtype(DType::F64).unwrap().matmul(&head_t).unwrap();
    candle_f64_reference(&logits(h.real_hidden), &logits(h.masked_hidden), targets, temperature)
}

#[test]
fn hidden_rows_match_candle_f64_matmul_then_ops() {
    let mut rng = Rng::new(fresh_seed());
    // (rows, D, V, chunk): chunks that divide V, do not, exceed it, and one token id each.
    let cases = [
        (1, 1, 1, DEFAULT_CHUNK),
        (3, 8, 7, 1),
        (17, 16, 129, 10),
        (6, 24, 4099, 4099),
        (9, 32, 50257, DEFAULT_CHUNK),
        (5, 20, 32003, 3000),
    ];
    for (case, &(rows, d, vocab, chunk)) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let target_dtype = if case % 2 == 0 { DType::U32 } else { DType::I64 };
            // Extra rows around the batch (a row slice starting mid-storage) and a padded
            // lm_head whose first `vocab` rows are the real vocabulary.
            let (before, after, pad) = (1 + rng.below(4) as usize, rng.below(3) as usize, rng.below(5) as usize);
            let all_rows = before + rows + after;
            let real = random_matrix(&mut rng, all_rows, d, 1.0, dtype);
            let masked = perturbed(&mut rng, &real);
            let padded_head = random_matrix(&mut rng, vocab + pad, d, 3.0 / (d as f64).sqrt(), dtype);
            let lm_head = padded_head.narrow(0, 0, vocab).unwrap();
            let ids: Vec<u32> = (0..all_rows).map(|_| rng.below(vocab as u64) as u32).collect();
            let targets = Tensor::new(ids, &Device::Cpu).unwrap().to_dtype(target_dtype).unwrap();
            let temperature = [1.0, 0.7, 1.3][case % 3];
            let params = Params { temperature, ..Params::default() };
            let what = format!(
                "{dtype:?} N={rows} D={d} V={vocab} (+{pad} padding) chunk {chunk} targets {target_dtype:?} τs {temperature}"
            );

            let whole = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
            let got = score_hidden_rows(&whole, &targets, &params, chunk).unwrap();
            assert_eq!(got.dims(), &[5, all_rows], "{what}");
            assert_rows_match(&got, &materialised_f64(&whole, &targets, temperature), &what);

            let slice = |t: &Tensor| t.narrow(0, before, rows).unwrap();
            let (real_rows, masked_rows, target_rows) = (slice(&real), slice(&masked), slice(&targets));
            assert_eq!(real_rows.layout().start_offset(), before * d, "the slice starts mid-storage");
            let sliced = HiddenStates { real_hidden: &real_rows, masked_hidden: &masked_rows, lm_head: &lm_head };
            let got = score_hidden_rows(&sliced, &target_rows, &params, chunk).unwrap();
            assert_eq!(got.dims(), &[5, rows], "{what}");
            assert_rows_match(
                &got,
                &materialised_f64(&sliced, &target_rows, temperature),
                &format!("{what}, rows {before}..{}", before + rows),
            );
        }
    }
}

#[test]
fn hidden_rows_do_not_depend_on_the_chunk() {
    // Chunking only regroups the f64 merge: every chunk gives the same values to f64 rounding,
    // so the f32 outputs agree to a few f32 ulps.
    let mut rng = Rng::new(fresh_seed());
    let (rows, d, vocab) = (7, 12, 2053);
    let real = random_matrix(&mut rng, rows, d, 1.0, DType::BF16);
    let masked = perturbed(&mut rng, &real);
    let lm_head = random_matrix(&mut rng, vocab, d, 3.0 / (d as f64).sqrt(), DType::BF16);
    let targets = Tensor::new((0..rows as u32).map(|r| r * 293).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
    let p = Params::default();
    let one_chunk = score_hidden_rows(&h, &targets, &p, vocab).unwrap().to_vec2::<f32>().unwrap();
    for chunk in [1, 2, 64, 1000, 2052, 5000] {
        let got = score_hidden_rows(&h, &targets, &p, chunk).unwrap().to_vec2::<f32>().unwrap();
        for (k, (g, w)) in got.iter().zip(&one_chunk).enumerate() {
            for (r, (&g, &w)) in g.iter().zip(w).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-6 + 1e-6 * w.abs(),
                    "chunk {chunk} {} row {r}: {g} vs {w}",
                    infopo_kernels::RowOutputs::NAMES[k]
                );
            }
        }
    }
}

/// Relative-or-absolute closeness of two f64 slices.
fn assert_f64s_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}[{i}]: got {g}, want {w}");
    }
}

#[test]
fn hidden_batch_matches_the_epilogue_of_candle_f64_rows() {
    let seed = fresh_seed();
    for (k, (dtype, estimator, with_trajectories, with_credit)) in [
        (DType::BF16, Estimator::LogRatio, true, true),
        (DType::F32, Estimator::Kl, true, false),
        (DType::F16, Estimator::LogRatio, false, false),
    ]
    .into_iter()
    .enumerate()
    {
        // The synthetic batch's turn layout and trajectories (its logits are not used).
        let spec =
            SynthSpec { rows: 40 + 9 * k, vocab: 3, groups: 2, trajectories_per_group: 3, seed: seed + k as u64 };
        let b = synth::batch::<f32>(spec);
        let mut rng = Rng::new(seed ^ (0x5eed + k as u64));
        let (d, vocab) = (16, 1009 + 2 * k);
        let real = random_matrix(&mut rng, b.rows, d, 1.0, dtype);
        let masked = perturbed(&mut rng, &real);
        let lm_head = random_matrix(&mut rng, vocab, d, 3.0 / (d as f64).sqrt(), dtype);
        let ids: Vec<i64> = (0..b.rows).map(|_| rng.below(vocab as u64) as i64).collect();
        let targets = Tensor::new(ids, &Device::Cpu).unwrap();
        let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
        let params = ablation_params(k, estimator);
        let turns =
            Turns { offsets: &b.turn_offsets, trajectory: &b.turn_trajectory, credit_tokens: &b.turn_credit_tokens };
        let trajectories =
            Trajectories { group: &b.trajectory_group, outcome: &b.trajectory_outcome, tokens: &b.trajectory_tokens };
        let trajectories = with_trajectories.then_some(trajectories);
        // Each trajectory's turns credit consecutive spans after 3 prompt-echo tokens.
        let mut next = vec![3u32; b.trajectory_tokens.len()];
        let starts: Vec<u32> = b
            .turn_trajectory
            .iter()
            .zip(&b.turn_credit_tokens)
            .map(|(&i, &c)| {
                let start = next[i as usize];
                next[i as usize] += c;
                start
            })
            .collect();
        let credit_start = with_credit.then_some(&starts[..]);
        let what = format!("{dtype:?} {estimator:?} trajectories {with_trajectories} credit {with_credit}");

        let out = compute_hidden(&h, &targets, turns, trajectories, credit_start, &params, 100).unwrap();

        // The reference: candle's f64 rows, their estimator through the crate's epilogue.
        let rows = materialised_f64(&h, &targets, params.temperature);
        assert_rows_match(&out.rows, &rows, &what);
        let estimates = match estimator {
            Estimator::LogRatio => &rows[LOG_RATIO],
            Estimator::Kl => &rows[KL],
        };
        let mut layout = infopo_kernels::Layout::new(b.rows, &turns, trajectories.as_ref()).unwrap();
        if let Some(s) = credit_start {
            layout = layout.with_credit_start(s).unwrap();
        }
        let mut acc = TurnAccumulator::for_layout(&layout);
        acc.add_rows(&layout, 0, estimates).unwrap();
        let info = acc.info();
        let got = out.to_output().unwrap();
        assert_f64s_close(got.turn_info.as_ref().unwrap(), &info, 1e-9, &format!("{what} turn_info"));
        assert_eq!(got.advantages.is_some(), with_trajectories, "{what}");
        if let Some(g) = &got.advantages {
            let w = advantages(&info, &layout, &params).unwrap();
            for (name, g, w) in [
                ("turn_intrinsic", &g.turn_intrinsic, &w.turn_intrinsic),
                ("turn_intrinsic_norm", &g.turn_intrinsic_norm, &w.turn_intrinsic_norm),
                ("turn_bonus", &g.turn_bonus, &w.turn_bonus),
                ("trajectory_advantage", &g.trajectory_advantage, &w.trajectory_advantage),
                ("trajectory_gate", &g.trajectory_gate, &w.trajectory_gate),
            ] {
                assert_f64s_close(g, w, 1e-8, &format!("{what} {name}"));
            }
            assert_f64s_close(
                &[g.outcome_std, g.intrinsic_std, g.magnitude_ratio],
                &[w.outcome_std, w.intrinsic_std, w.magnitude_ratio],
                1e-8,
                &format!("{what} batch stats"),
            );
            match (&g.token_advantage, &w.token_advantage) {
                (Some(g), Some(w)) => assert_f64s_close(g, w, 1e-8, &format!("{what} token_advantage")),
                (None, None) => assert!(!with_credit, "{what}"),
                (g, w) => panic!("{what}: token_advantage {} vs {}", g.is_some(), w.is_some()),
            }
        }
        // The rows are those of `score_hidden_rows`, bit for bit.
        let alone = score_hidden_rows(&h, &targets, &params, 100).unwrap();
        assert_eq!(out.rows.to_vec2::<f32>().unwrap(), alone.to_vec2::<f32>().unwrap(), "{what}");
    }
}

/// Small valid fused inputs: [4, 6] hidden states, a [13, 6] lm_head, i64 targets.
fn small_hidden(rng: &mut Rng) -> (Tensor, Tensor, Tensor, Tensor) {
    let real = random_matrix(rng, 4, 6, 1.0, DType::F32);
    let masked = perturbed(rng, &real);
    let lm_head = random_matrix(rng, 13, 6, 1.0, DType::F32);
    let targets = Tensor::new(&[0i64, 12, 5, 7], &Device::Cpu).unwrap();
    (real, masked, lm_head, targets)
}

fn hidden_err(h: HiddenStates<'_>, targets: &Tensor, chunk: usize) -> Error {
    expect_err(score_hidden_rows(&h, targets, &Params::default(), chunk))
}

#[test]
fn hidden_bad_dtypes_are_typed_errors_naming_the_tensor() {
    let (real, masked, lm_head, targets) = small_hidden(&mut Rng::new(fresh_seed()));
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
    assert!(score_hidden_rows(&h, &targets, &Params::default(), 4).is_ok());
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let (masked_bf16, head_bf16, head_f16) = (bf16(&masked), bf16(&lm_head), lm_head.to_dtype(DType::F16).unwrap());
    let e = hidden_err(HiddenStates { masked_hidden: &masked_bf16, ..h }, &targets, 4);
    assert!(matches!(e, Error::UnsupportedDtype { tensor: "masked_hidden", .. }), "{e}");
    assert!(e.to_string().contains("bf16") && e.to_string().contains("f32, the dtype of `real_hidden`"), "{e}");
    let e = hidden_err(HiddenStates { lm_head: &head_f16, ..h }, &targets, 4);
    assert!(matches!(&e, Error::UnsupportedDtype { tensor: "lm_head", dtype, .. } if dtype == "f16"), "{e}");
    // BF16 hidden states with an F32 head: the head is named, with the dtype it should have.
    let real_bf16 = bf16(&real);
    let e = hidden_err(
        HiddenStates { real_hidden: &real_bf16, masked_hidden: &masked_bf16, lm_head: &lm_head },
        &targets,
        4,
    );
    assert!(
        matches!(e, Error::UnsupportedDtype { tensor: "lm_head", expected, .. } if expected.starts_with("bf16")),
        "{e}"
    );
    let both_bf16 = HiddenStates { real_hidden: &real_bf16, masked_hidden: &masked_bf16, lm_head: &head_bf16 };
    assert!(score_hidden_rows(&both_bf16, &targets, &Params::default(), 4).is_ok());
    let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let (real64, masked64, head64) = (f64s(&real), f64s(&masked), f64s(&lm_head));
    let e = hidden_err(HiddenStates { real_hidden: &real64, masked_hidden: &masked64, lm_head: &head64 }, &targets, 4);
    assert!(matches!(e, Error::UnsupportedDtype { tensor: "real_hidden", .. }), "{e}");
    for bad in [DType::F32, DType::U8] {
        let e = hidden_err(h, &targets.to_dtype(bad).unwrap(), 4);
        assert!(matches!(e, Error::UnsupportedDtype { tensor: "targets", .. }), "{e}");
    }
}

#[test]
fn hidden_bad_shapes_are_typed_errors_naming_both_tensors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, lm_head, targets) = small_hidden(&mut rng);
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
    let shape_err = |e: Error, needles: &[&str]| {
        assert!(matches!(e, Error::Shape { .. }), "{e}");
        for n in needles {
            assert!(e.to_string().contains(n), "`{e}` should mention {n}");
        }
    };
    // The lm_head's width is not the hidden states' D.
    let narrow_head = random_matrix(&mut rng, 13, 5, 1.0, DType::F32);
    shape_err(
        hidden_err(HiddenStates { lm_head: &narrow_head, ..h }, &targets, 4),
        &["`real_hidden` is [4, 6]", "`lm_head` is [13, 5]", "6 vs 5"],
    );
    let wider = random_matrix(&mut rng, 4, 7, 1.0, DType::F32);
    shape_err(
        hidden_err(HiddenStates { masked_hidden: &wider, ..h }, &targets, 4),
        &["`real_hidden` is [4, 6]", "`masked_hidden` is [4, 7]"],
    );
    let taller = random_matrix(&mut rng, 5, 6, 1.0, DType::F32);
    shape_err(hidden_err(HiddenStates { masked_hidden: &taller, ..h }, &targets, 4), &["`masked_hidden` is [5, 6]"]);
    shape_err(hidden_err(h, &targets.narrow(0, 0, 3).unwrap(), 4), &["`targets` is [3]", "`real_hidden` is [4, 6]"]);
    let flat_head = lm_head.flatten_all().unwrap();
    shape_err(hidden_err(HiddenStates { lm_head: &flat_head, ..h }, &targets, 4), &["[V, D]", "[78]"]);
    let cube = real.reshape((2, 2, 6)).unwrap();
    shape_err(hidden_err(HiddenStates { real_hidden: &cube, masked_hidden: &cube, ..h }, &targets, 4), &["[N, D]"]);
    shape_err(hidden_err(h, &targets, 0), &["chunk"]);
    let empty_head = Tensor::zeros((0, 6), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(hidden_err(HiddenStates { lm_head: &empty_head, ..h }, &targets, 4), Error::EmptyVocab));
    let no_width = Tensor::zeros((4, 0), DType::F32, &Device::Cpu).unwrap();
    let no_width_head = Tensor::zeros((13, 0), DType::F32, &Device::Cpu).unwrap();
    let zero_d = HiddenStates { real_hidden: &no_width, masked_hidden: &no_width, lm_head: &no_width_head };
    shape_err(hidden_err(zero_d, &targets, 4), &["hidden width D"]);
    // An empty batch is not an error.
    let none = Tensor::zeros((0, 6), DType::F32, &Device::Cpu).unwrap();
    let no_targets = Tensor::zeros(0, DType::U32, &Device::Cpu).unwrap();
    let empty = HiddenStates { real_hidden: &none, masked_hidden: &none, lm_head: &lm_head };
    assert_eq!(score_hidden_rows(&empty, &no_targets, &Params::default(), 4).unwrap().dims(), &[5, 0]);
}

#[test]
fn hidden_non_row_contiguous_inputs_are_typed_errors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, lm_head, targets) = small_hidden(&mut rng);
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
    // A [D, V] weight passed transposed: the right shape, columns in memory.
    let head_t = random_matrix(&mut rng, 6, 13, 1.0, DType::F32).t().unwrap();
    let e = hidden_err(HiddenStates { lm_head: &head_t, ..h }, &targets, 4);
    assert!(matches!(e, Error::NotContiguous { tensor: "lm_head", .. }), "{e}");
    assert!(e.to_string().contains("contiguous()"), "{e}");
    // Column slices of wider hidden states: rows contiguous but not adjacent.
    let wide = random_matrix(&mut rng, 4, 9, 1.0, DType::F32);
    let cols = wide.narrow(1, 2, 6).unwrap();
    let e = hidden_err(HiddenStates { real_hidden: &cols, ..h }, &targets, 4);
    assert!(matches!(e, Error::NotContiguous { tensor: "real_hidden", .. }), "{e}");
    let e = hidden_err(HiddenStates { masked_hidden: &cols, ..h }, &targets, 4);
    assert!(matches!(e, Error::NotContiguous { tensor: "masked_hidden", .. }), "{e}");
    let square = random_matrix(&mut rng, 6, 6, 1.0, DType::F32);
    let (rows_t, square_t) = (real.narrow(0, 0, 4).unwrap(), square.t().unwrap().narrow(0, 0, 4).unwrap());
    assert!(score_hidden_rows(&HiddenStates { real_hidden: &rows_t, ..h }, &targets, &Params::default(), 4).is_ok());
    let e = hidden_err(HiddenStates { real_hidden: &square_t, ..h }, &targets, 4);
    assert!(matches!(e, Error::NotContiguous { tensor: "real_hidden", .. }), "{e}");
    let pairs = Tensor::stack(&[&targets, &targets], 1).unwrap();
    let e = hidden_err(h, &pairs.i((.., 1)).unwrap(), 4);
    assert!(matches!(e, Error::NotContiguous { tensor: "targets", .. }), "{e}");
    // `.contiguous()` is the way out, and gives the numbers of the copy.
    let fixed = cols.contiguous().unwrap();
    let h_fixed = HiddenStates { real_hidden: &fixed, ..h };
    let got = score_hidden_rows(&h_fixed, &targets, &Params::default(), 4).unwrap();
    assert_rows_match(&got, &materialised_f64(&h_fixed, &targets, 1.0), "contiguous copy of a column slice");
}

#[test]
fn hidden_row_data_and_layout_errors_are_the_crate_errors() {
    let mut rng = Rng::new(fresh_seed());
    let (real, masked, lm_head, targets) = small_hidden(&mut rng);
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &lm_head };
    let p = Params::default();
    let out_of_range = Tensor::new(&[0u32, 1, 13, 2], &Device::Cpu).unwrap();
    let e = expect_err(score_hidden_rows(&h, &out_of_range, &p, 4));
    assert!(matches!(e, Error::Row { row: 2, kind: RowErrorKind::TargetOutOfRange, target: Some(13) }), "{e}");
    // A NaN in row 3's real hidden state makes every real logit of the row NaN.
    let mut values = real.to_vec2::<f32>().unwrap();
    values[3][1] = f32::NAN;
    let nan = Tensor::new(values, &Device::Cpu).unwrap();
    let e = expect_err(score_hidden_rows(&HiddenStates { real_hidden: &nan, ..h }, &targets, &p, 4));
    assert!(matches!(e, Error::Row { row: 3, kind: RowErrorKind::RealNotFinite, .. }), "{e}");
    let e = expect_err(score_hidden_rows(&h, &targets, &Params { temperature: -1.0, ..p }, 4));
    assert!(matches!(e, Error::Param { name: "temperature", .. }), "{e}");
    // The layout is checked before the rows: a bad layout wins over a bad row.
    let bad_turns = Turns { offsets: &[0, 2, 5], trajectory: &[0, 0], credit_tokens: &[1, 1] };
    let e = compute_hidden(&h, &out_of_range, bad_turns, None, None, &p, 4).unwrap_err();
    assert!(matches!(e, Error::Turns { .. }), "{e}");
    let turns = Turns { offsets: &[0, 2, 4], trajectory: &[0, 0], credit_tokens: &[1, 1] };
    let e = compute_hidden(&h, &out_of_range, turns, None, None, &p, 4).unwrap_err();
    assert!(matches!(e, Error::Row { row: 2, .. }), "{e}");
    let e = compute_hidden(&h, &targets, turns, None, Some(&[0, 1]), &p, 4).unwrap_err();
    assert!(matches!(e, Error::Trajectories { .. }), "{e}");
    let out = compute_hidden(&h, &targets, turns, None, None, &p, 4).unwrap();
    assert_eq!(out.turn_info.dims(), &[2]);
    assert!(out.advantages.is_none());
}

/// CUDA tensors, with this crate built with `--features candle,cuda`: the same numbers as the
/// CPU tensors (within the kernels' f32 tolerance), the outputs on the inputs' device.
#[cfg(feature = "cuda")]
mod on_cuda {
    use super::*;

    fn gpu() -> Device {
        Device::new_cuda(0).expect("a CUDA device")
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        for (r, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 2e-4 + 2e-4 * w.abs(), "{what} {r}: cuda {g}, cpu {w}");
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn score_rows_on_cuda_matches_the_cpu_tensors() {
        let mut rng = Rng::new(fresh_seed());
        for (rows, vocab) in [(1, 1), (17, 129), (33, 4099)] {
            for (dtype, target_dtype) in [(DType::BF16, DType::U32), (DType::F32, DType::I64), (DType::F16, DType::I64)]
            {
                let (real, masked, targets) = random_inputs(&mut rng, rows + 3, vocab, target_dtype);
                let (real, masked) = (real.to_dtype(dtype).unwrap(), masked.to_dtype(dtype).unwrap());
                let slice = |t: &Tensor| t.narrow(0, 2, rows).unwrap();
                let p = Params::default();
                let want = score_rows(&slice(&real), &slice(&masked), &slice(&targets), &p).unwrap();
                let on_gpu = |t: &Tensor| slice(&t.to_device(&gpu()).unwrap());
                let got = score_rows(&on_gpu(&real), &on_gpu(&masked), &on_gpu(&targets), &p).unwrap();
                assert!(got.device().is_cuda());
                assert_eq!(got.dims(), &[5, rows]);
                let (got, want) = (got.to_vec2::<f32>().unwrap(), want.to_vec2::<f32>().unwrap());
                for k in 0..5 {
                    close(
                        &got[k],
                        &want[k],
                        &format!("{dtype:?} [{rows}, {vocab}] {}", infopo_kernels::RowOutputs::NAMES[k]),
                    );
                }
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn batch_on_cuda_matches_the_cpu_tensors() {
        let spec = SynthSpec { rows: 300, vocab: 5003, groups: 2, trajectories_per_group: 4, seed: fresh_seed() };
        let (b, real, masked, targets) = synth_tensors(spec, DType::BF16, 5);
        let turns =
            Turns { offsets: &b.turn_offsets, trajectory: &b.turn_trajectory, credit_tokens: &b.turn_credit_tokens };
        let traj =
            Trajectories { group: &b.trajectory_group, outcome: &b.trajectory_outcome, tokens: &b.trajectory_tokens };
        let p = Params::default();
        let want = compute(&real, &masked, &targets, turns, Some(traj), None, &p).unwrap().to_output().unwrap();
        let g = |t: &Tensor| t.to_device(&gpu()).unwrap();
        let out = compute(&g(&real), &g(&masked), &g(&targets), turns, Some(traj), None, &p).unwrap();
        assert!(out.rows.device().is_cuda() && out.turn_info.device().is_cuda());
        let got = out.to_output().unwrap();
        close(&got.rows.kl, &want.rows.kl, "kl");
        let (ga, wa) = (got.advantages.unwrap(), want.advantages.unwrap());
        for (g, w) in
            ga.turn_bonus.iter().zip(&wa.turn_bonus).chain(ga.trajectory_advantage.iter().zip(&wa.trajectory_advantage))
        {
            assert!((g - w).abs() <= 2e-4 + 2e-4 * w.abs(), "cuda {g}, cpu {w}");
        }
    }

    /// Hidden states and lm_head as CUDA tensors (cuBLAS chunk GEMMs, the kernel per chunk, the
    /// device merge with the turns and the epilogue) against the same tensors on the CPU (the
    /// f64 fused reference): rows within the kernels' tolerance (D ≤ 64 keeps the f32 GEMM's
    /// own rounding far below it), row slices and a padded head read in place.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn hidden_on_cuda_matches_the_cpu_tensors() {
        let seed = fresh_seed();
        let mut rng = Rng::new(seed);
        let spec = SynthSpec { rows: 61, vocab: 3, groups: 2, trajectories_per_group: 3, seed };
        let b = synth::batch::<f32>(spec);
        for (dtype, d, vocab, chunk) in
            [(DType::BF16, 64, 50257, 4096), (DType::F32, 24, 32003, 5000), (DType::F16, 8, 129, 7)]
        {
            let real = random_matrix(&mut rng, b.rows + 2, d, 1.0, dtype);
            let masked = perturbed(&mut rng, &real);
            let padded_head = random_matrix(&mut rng, vocab + 3, d, 3.0 / (d as f64).sqrt(), dtype);
            let ids: Vec<u32> = (0..b.rows + 2).map(|_| rng.below(vocab as u64) as u32).collect();
            let targets = Tensor::new(ids, &Device::Cpu).unwrap();
            let turns = Turns {
                offsets: &b.turn_offsets,
                trajectory: &b.turn_trajectory,
                credit_tokens: &b.turn_credit_tokens,
            };
            let traj = Trajectories {
                group: &b.trajectory_group,
                outcome: &b.trajectory_outcome,
                tokens: &b.trajectory_tokens,
            };
            let p = Params::default();
            let rows_of = |t: &Tensor| t.narrow(0, 2, b.rows).unwrap();
            let head = |t: &Tensor| t.narrow(0, 0, vocab).unwrap();
            let (r, m, w, t) = (rows_of(&real), rows_of(&masked), head(&padded_head), rows_of(&targets));
            let cpu = HiddenStates { real_hidden: &r, masked_hidden: &m, lm_head: &w };
            let want = compute_hidden(&cpu, &t, turns, Some(traj), None, &p, chunk).unwrap().to_output().unwrap();
            let g = |x: &Tensor| x.to_device(&gpu()).unwrap();
            let (gr, gm, gw, gt) =
                (rows_of(&g(&real)), rows_of(&g(&masked)), head(&g(&padded_head)), rows_of(&g(&targets)));
            let on_gpu = HiddenStates { real_hidden: &gr, masked_hidden: &gm, lm_head: &gw };
            let out = compute_hidden(&on_gpu, &gt, turns, Some(traj), None, &p, chunk).unwrap();
            assert!(out.rows.device().is_cuda() && out.turn_info.device().is_cuda());
            let got = out.to_output().unwrap();
            let what = format!("{dtype:?} D={d} V={vocab} chunk {chunk}");
            close(&got.rows.kl, &want.rows.kl, &format!("{what} kl"));
            close(&got.rows.log_ratio, &want.rows.log_ratio, &format!("{what} log_ratio"));
            close(&got.rows.lse_real, &want.rows.lse_real, &format!("{what} lse_real"));
            let rows = score_hidden_rows(&on_gpu, &gt, &p, chunk).unwrap();
            assert!(rows.device().is_cuda());
            let rows = rows.to_vec2::<f32>().unwrap();
            close(&rows[KL], &got.rows.kl, &format!("{what} score_hidden_rows kl"));
            let (ga, wa) = (got.advantages.unwrap(), want.advantages.unwrap());
            for (g, w) in ga
                .turn_bonus
                .iter()
                .zip(&wa.turn_bonus)
                .chain(ga.trajectory_advantage.iter().zip(&wa.trajectory_advantage))
            {
                assert!((g - w).abs() <= 2e-4 + 2e-4 * w.abs(), "{what}: cuda {g}, cpu {w}");
            }
        }
    }

    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn mixed_devices_are_a_typed_error_naming_both() {
        let mut rng = Rng::new(fresh_seed());
        let (real, masked, targets) = random_inputs(&mut rng, 4, 9, DType::U32);
        let e = score_rows(&real, &masked.to_device(&gpu()).unwrap(), &targets, &Params::default()).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { first: "real", second: "masked", .. }), "{e}");
        let e = score_rows(&real, &masked, &targets.to_device(&gpu()).unwrap(), &Params::default()).unwrap_err();
        assert!(matches!(e, Error::DeviceMismatch { second: "targets", .. }), "{e}");
        assert!(e.to_string().contains("cpu") && e.to_string().contains("cuda:0"), "{e}");
    }
}

/// A conversation's layout, taken whole with a padded output (`compute_layout`,
/// `compute_hidden_layout`), gives what the CPU backend gives for the same batch, with
/// `padded_advantage` a `[B, L]` tensor; pad offsets without a width are the crate's error.
#[test]
fn layout_whole_with_padding_matches_the_cpu_backend() {
    use infopo_kernels::candle::{compute_hidden_layout, compute_layout};
    use infopo_kernels::{Batch, Conversation, Cpu, HiddenBatch, HiddenTensors, LogitData, Logits};
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let mut conv = Conversation::new();
    let turns: [&[u32]; 4] = [&[3, 2, 4], &[5], &[1, 6, 2, 3], &[2, 2]];
    for (i, t) in turns.iter().enumerate() {
        let i = conv.trajectory((i % 2) as u32, rng.below(2) as f64, t) as usize;
        for k in 0..t.len() - 1 {
            conv.feedback(i as u32, k as u32).unwrap();
        }
    }
    let offsets = vec![1, 0, 2, 5];
    let layout = conv.build().unwrap().with_padding(14, Some(offsets.clone()));
    let (rows, vocab, d) = (layout.rows(), 29, 6);
    let real = random_matrix(&mut rng, rows, vocab, 2.0, DType::F32);
    let masked = perturbed(&mut rng, &real);
    let ids: Vec<i64> = (0..rows).map(|_| rng.below(vocab as u64) as i64).collect();
    let targets = Tensor::from_slice(&ids, rows, &Device::Cpu).unwrap();
    let params = Params::default();
    let host = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (rh, mh) = (host(&real), host(&masked));
    let logits = |v| Logits::new(v, rows, vocab).unwrap();
    let batch = Batch::rows(logits(&rh), logits(&mh), &ids).with_layout(&layout).unwrap();
    let want = Cpu.compute(&batch, &params).unwrap();
    let out = compute_layout(&real, &masked, &targets, &layout, &params).unwrap();
    let padded = out.advantages.as_ref().unwrap().padded_advantage.as_ref().expect("padded_advantage");
    assert_eq!(padded.dims(), &[4, 14]);
    assert_eq!(out.to_output().unwrap(), want, "seed {seed}");

    // The fused path on hidden states, the same layout.
    let (hr, hm) =
        (random_matrix(&mut rng, rows, d, 1.0, DType::F32), random_matrix(&mut rng, rows, d, 1.0, DType::F32));
    let head = random_matrix(&mut rng, vocab, d, 1.0, DType::F32);
    let h = HiddenStates { real_hidden: &hr, masked_hidden: &hm, lm_head: &head };
    let (hrh, hmh, headh) = (host(&hr), host(&hm), host(&head));
    let tensors = HiddenTensors::new(
        LogitData::from_slice(&hrh),
        LogitData::from_slice(&hmh),
        LogitData::from_slice(&headh),
        rows,
        d,
        vocab,
    )
    .unwrap();
    let hidden = HiddenBatch::rows(tensors, &ids).with_layout(&layout).unwrap();
    let want = Cpu.compute_hidden(&hidden, &params, 7).unwrap();
    let out = compute_hidden_layout(&h, &targets, &layout, &params, 7).unwrap();
    assert_eq!(out.to_output().unwrap(), want, "seed {seed}");

    let mut no_width = layout.clone();
    no_width.pad_width = None;
    let e = compute_layout(&real, &masked, &targets, &no_width, &params).unwrap_err();
    assert!(matches!(e, Error::Trajectories { .. }) && e.to_string().contains("need a padded width"), "{e}");
    let narrow = layout.clone().with_padding(8, Some(offsets));
    let e = compute_layout(&real, &masked, &targets, &narrow, &params).unwrap_err();
    assert!(e.to_string().contains("do not fit the padded width L = 8"), "{e}");
}
