//! The CPU backend against the independent naive oracle (tests/common), its properties, the
//! paper's conventions, and every bad input.

use crate::common;

use common::*;
use half::{bf16, f16};
use infopo_kernels::reference::Moments;
use infopo_kernels::reference::RowState;
use infopo_kernels::synth::Rng;
use infopo_kernels::{advantages, TurnAccumulator};
use infopo_kernels::{
    Backend, Batch, Cpu, Error, Estimator, Layout, LogitElement, Logits, Params, RowErrorKind, Trajectories, Turns,
};
use proptest::prelude::*;

const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-5;

/// Rounds f64 logits through T so the oracle sees exactly what the backend reads.
fn quantize<T: LogitElement>(v: &[f64]) -> (Vec<T>, Vec<f64>) {
    let q: Vec<T> = v.iter().map(|&x| T::from_f32(x as f32)).collect();
    let back = q.iter().map(|x| x.to_f32() as f64).collect();
    (q, back)
}

fn check_rows<T: LogitElement>(rows: usize, vocab: usize, scale: f64, temperature: f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let (real, real64) = quantize::<T>(&random_logits(&mut rng, rows * vocab, scale));
    let (masked, masked64) =
        quantize::<T>(&real64.iter().map(|&x| x + 0.5 * scale.min(3.0) * rng.normal()).collect::<Vec<_>>());
    let targets: Vec<i64> = (0..rows).map(|_| rng.below(vocab as u64) as i64).collect();
    let batch =
        Batch::rows(Logits::new(&real, rows, vocab).unwrap(), Logits::new(&masked, rows, vocab).unwrap(), &targets);
    let params = Params { temperature, ..Params::default() };
    let out = Cpu.compute(&batch, &params).unwrap().rows;
    for (r, &a) in targets.iter().enumerate() {
        let row = r * vocab..(r + 1) * vocab;
        let o = oracle_row(&real64[row.clone()], &masked64[row], a as usize, temperature);
        let what = format!("{} N={rows} V={vocab} scale={scale} row {r}", T::DTYPE);
        for (name, got, want) in [
            ("lse_real", out.lse_real[r], o.lse_real),
            ("lse_masked", out.lse_masked[r], o.lse_masked),
            ("log_ratio", out.log_ratio[r], o.log_ratio),
            ("kl", out.kl[r], o.kl),
            ("entropy_real", out.entropy_real[r], o.entropy_real),
        ] {
            assert!(close(got as f64, want, ATOL, RTOL), "{what} {name}: got {got}, want {want}");
        }
    }
}

#[test]
fn rows_match_oracle_across_shapes_and_dtypes() {
    for (i, &(rows, vocab)) in [(1, 1), (3, 7), (64, 31), (5, 1000), (3, 50257), (2, 151_936)].iter().enumerate() {
        check_rows::<f32>(rows, vocab, 2.0, 1.0, 100 + i as u64);
        check_rows::<f16>(rows, vocab, 2.0, 0.7, 200 + i as u64);
        check_rows::<bf16>(rows, vocab, 2.0, 1.3, 300 + i as u64);
    }
}

#[test]
fn huge_magnitudes_stay_accurate() {
    // |logit| ~ 1e4: nearly one-hot softmax; the centred state keeps the small values exact.
    check_rows::<f32>(4, 1000, 1e4, 1.0, 11);
    check_rows::<bf16>(4, 257, 1e4, 2.0, 12);
}

#[test]
fn neg_inf_entries_and_infinite_kl() {
    let v = 9;
    let mut real = vec![0.5f32, -1.0, 2.0, f32::NEG_INFINITY, 0.0, 1.0, -3.0, 0.25, 4.0];
    let mut masked = vec![0.4f32, -1.1, 1.5, f32::NEG_INFINITY, f32::NEG_INFINITY, 1.2, -2.0, 0.2, 3.0];
    // Row 2: masked = −∞ only where real is −∞ too, so KL stays finite.
    real.extend([1.0f32, f32::NEG_INFINITY, 0.0, 2.0, -1.0, 0.5, 0.5, 0.1, -0.2]);
    masked.extend([1.0f32, f32::NEG_INFINITY, 0.3, 2.0, -1.0, 0.6, 0.4, 0.0, -0.2]);
    let targets = [2i64, 3];
    let batch = Batch::rows(Logits::new(&real, 2, v).unwrap(), Logits::new(&masked, 2, v).unwrap(), &targets);
    let out = Cpu.compute(&batch, &Params::default()).unwrap().rows;
    let as64 = |s: &[f32]| s.iter().map(|&x| x as f64).collect::<Vec<_>>();
    // Row 0 has p > 0 where masked is −∞: KL is +∞, the other outputs are finite.
    assert_eq!(out.kl[0], f32::INFINITY);
    let o = oracle_row(&as64(&real[..v]), &as64(&masked[..v]), 2, 1.0);
    assert_eq!(o.kl, f64::INFINITY);
    assert!(close(out.log_ratio[0] as f64, o.log_ratio, ATOL, RTOL));
    assert!(close(out.entropy_real[0] as f64, o.entropy_real, ATOL, RTOL));
    let o = oracle_row(&as64(&real[v..]), &as64(&masked[v..]), 3, 1.0);
    assert!(close(out.kl[1] as f64, o.kl, ATOL, RTOL), "{} vs {}", out.kl[1], o.kl);
    assert!(close(out.entropy_real[1] as f64, o.entropy_real, ATOL, RTOL));
}

fn full_check(estimator: Estimator, normalize: bool, seed: u64) {
    let mut rng = Rng::new(seed);
    let (rows, vocab) = (40, 33);
    let real64 = random_logits(&mut rng, rows * vocab, 2.0);
    let masked64: Vec<f64> = real64.iter().map(|&x| x + rng.normal()).collect();
    let (real, masked): (Vec<f32>, Vec<f32>) =
        (real64.iter().map(|&x| x as f32).collect(), masked64.iter().map(|&x| x as f32).collect());
    let (real64, masked64) = (f32s(&real), f32s(&masked));
    let targets: Vec<i64> = (0..rows).map(|_| rng.below(vocab as u64) as i64).collect();
    let l = random_layout(&mut rng, rows, 12, 6, 3);
    let batch =
        Batch::rows(Logits::new(&real, rows, vocab).unwrap(), Logits::new(&masked, rows, vocab).unwrap(), &targets)
            .with_turns(Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit })
            .with_trajectories(Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens });
    let params = Params { estimator, normalize, beta: 0.3, gate_temperature: 0.5, ..Params::default() };
    let out = Cpu.compute(&batch, &params).unwrap();
    let est: Vec<f64> = (0..rows)
        .map(|r| {
            let o = oracle_row(
                &real64[r * vocab..(r + 1) * vocab],
                &masked64[r * vocab..(r + 1) * vocab],
                targets[r] as usize,
                1.0,
            );
            match estimator {
                Estimator::LogRatio => o.log_ratio,
                Estimator::Kl => o.kl,
            }
        })
        .collect();
    // Turn-level values are f64 on the CPU: the only error is the row values' (≤ 1e-12), well
    // inside the shared epilogue tolerance.
    kernel::check_epilogue(
        &out,
        &est,
        &Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit },
        &Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens },
        &params,
    );
}

#[test]
fn full_pipeline_matches_oracle() {
    for seed in 0..6 {
        full_check(Estimator::LogRatio, true, seed);
        full_check(Estimator::Kl, true, 50 + seed);
        full_check(Estimator::LogRatio, false, 90 + seed);
    }
}

// ---- Paper conventions -------------------------------------------------------------------

fn layout(offsets: &[u32], traj: &[u32], credit: &[u32], group: &[u32], outcome: &[f64], tokens: &[u32]) -> Layout {
    let rows = *offsets.last().unwrap() as usize;
    infopo_kernels::Layout::new(
        rows,
        &Turns { offsets, trajectory: traj, credit_tokens: credit },
        Some(&Trajectories { group, outcome, tokens }),
    )
    .unwrap()
}

#[test]
fn singleton_group_uses_zero_mean_unit_std() {
    let l = layout(&[0, 1, 2], &[0, 1], &[1, 1], &[5, 9], &[1.0, 0.0], &[4, 4]);
    let adv = advantages(&[0.5, 0.25], &l, &Params::default()).unwrap();
    assert_close("advantage", &adv.trajectory_advantage, &[1.0 / (1.0 + 1e-6), 0.0], 1e-15, 0.0);
    let gate = 1.0 / (1.0 + (1.0f64 / 0.05).exp());
    assert_close("gate", &adv.trajectory_gate, &[gate, gate], 1e-18, 1e-12);
    // A pool of one token: μ = that value, σ = 1, so norm = 0.
    assert_close("norm", &adv.turn_intrinsic_norm, &[0.0, 0.0], 0.0, 0.0);
}

#[test]
fn tied_group_has_zero_advantage_and_open_gate() {
    let l = layout(&[0, 1, 2, 3], &[0, 1, 2], &[1, 2, 1], &[0, 0, 0], &[1.0, 1.0, 1.0], &[3, 3, 3]);
    let adv = advantages(&[0.5, -0.5, 0.25], &l, &Params::default()).unwrap();
    assert_eq!(adv.trajectory_advantage, vec![0.0; 3]);
    assert_eq!(adv.trajectory_gate, vec![0.5; 3]);
}

#[test]
fn zero_info_turns_are_excluded_and_empty_turns_have_zero_info() {
    // Turn 1 is empty (no rows), turn 2 has info exactly 0: neither enters the pool.
    let offsets = [0u32, 2, 2, 3, 5];
    let l = layout(&offsets, &[0, 0, 1, 1], &[2, 1, 1, 1], &[0, 0], &[1.0, 0.0], &[5, 5]);
    let mut acc = TurnAccumulator::for_layout(&l);
    acc.add_rows(&l, 0, &[1.0, 3.0, 0.0, 2.0, -1.0]).unwrap();
    let info = acc.info();
    assert_eq!(info, vec![2.0, 0.0, 0.0, 0.5]);
    let adv = advantages(&info, &l, &Params::default()).unwrap();
    // Pool: 1.0 twice (turn 0: info 2 / credit 2) and 0.5 once.
    let pool = [1.0, 1.0, 0.5];
    let mean = pool.iter().sum::<f64>() / 3.0;
    let std = (pool.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / 2.0).sqrt();
    let norm = |v: f64| (v - mean) / (std + 1e-6);
    assert_close("norm", &adv.turn_intrinsic_norm, &[norm(1.0), 0.0, 0.0, norm(0.5)], 1e-12, 1e-12);
}

// ---- Properties ---------------------------------------------------------------------------

fn rows_out(real: &[f32], masked: &[f32], targets: &[i64], vocab: usize) -> infopo_kernels::RowOutputs {
    let n = targets.len();
    Cpu.compute(
        &Batch::rows(Logits::new(real, n, vocab).unwrap(), Logits::new(masked, n, vocab).unwrap(), targets),
        &Params::default(),
    )
    .unwrap()
    .rows
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn kl_is_nonnegative_and_zero_for_identical_rows(seed in any::<u64>(), vocab in 1usize..300, scale in 0.1f64..30.0) {
        let mut rng = Rng::new(seed);
        let real: Vec<f32> = random_logits(&mut rng, vocab, scale).iter().map(|&x| x as f32).collect();
        let masked: Vec<f32> = real.iter().map(|&x| x + rng.normal() as f32).collect();
        let a = [rng.below(vocab as u64) as i64];
        let out = rows_out(&real, &masked, &a, vocab);
        prop_assert!(out.kl[0] >= -1e-6, "kl = {}", out.kl[0]);
        let same = rows_out(&real, &real, &a, vocab);
        prop_assert!(same.kl[0].abs() <= 1e-6 && same.log_ratio[0] == 0.0, "{:?}", same);
    }

    #[test]
    fn adding_a_constant_to_a_row_changes_only_its_lse(seed in any::<u64>(), vocab in 1usize..200, c in -50.0f64..50.0) {
        let mut rng = Rng::new(seed);
        let real: Vec<f32> = random_logits(&mut rng, vocab, 2.0).iter().map(|&x| x as f32).collect();
        let masked: Vec<f32> = real.iter().map(|&x| x + rng.normal() as f32).collect();
        // c is a multiple of 1/4 and the logits are small, so x + c is exact in f32.
        let c = (c * 4.0).round() / 4.0;
        let shifted: Vec<f32> = real.iter().map(|&x| x + c as f32).collect();
        let a = [rng.below(vocab as u64) as i64];
        let (o, s) = (rows_out(&real, &masked, &a, vocab), rows_out(&shifted, &masked, &a, vocab));
        prop_assert!(close(s.lse_real[0] as f64, o.lse_real[0] as f64 + c, 1e-5, 1e-6));
        for (x, y) in [(s.kl[0], o.kl[0]), (s.log_ratio[0], o.log_ratio[0]), (s.entropy_real[0], o.entropy_real[0]), (s.lse_masked[0], o.lse_masked[0])] {
            prop_assert!(close(x as f64, y as f64, 1e-5, 1e-5), "{} vs {}", x, y);
        }
    }

    #[test]
    fn state_merge_is_associative(xs in prop::collection::vec((-30.0f64..30.0, -30.0f64..30.0), 3..60), cut1 in 0usize..60, cut2 in 0usize..60) {
        let n = xs.len();
        let (i, j) = { let (a, b) = (cut1 % n, cut2 % n); (a.min(b), a.max(b)) };
        let fold = |s: &[(f64, f64)]| s.iter().fold(RowState::EMPTY, |mut st, &(x, y)| { st.push(x, y); st });
        let (a, b, c) = (fold(&xs[..i]), fold(&xs[i..j]), fold(&xs[j..]));
        let left = a.merge(&b).merge(&c);
        let right = a.merge(&b.merge(&c));
        let whole = fold(&xs);
        for (p, q) in [(left, right), (left, whole)] {
            let (fp, fq) = (p.finish(0.0, 0.0), q.finish(0.0, 0.0));
            for (u, v) in [(fp.lse_real, fq.lse_real), (fp.lse_masked, fq.lse_masked), (fp.kl, fq.kl), (fp.entropy_real, fq.entropy_real)] {
                prop_assert!(close(u, v, 1e-12, 1e-12), "{} vs {}", u, v);
            }
        }
    }

    #[test]
    fn micro_batches_equal_one_batch(seed in any::<u64>(), cuts in prop::collection::vec(0usize..60, 0..5)) {
        let mut rng = Rng::new(seed);
        let rows = 60;
        let l = random_layout(&mut rng, rows, 9, 5, 2);
        let values: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
        let l = infopo_kernels::Layout::new(rows, &Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit }, None).unwrap();
        let mut whole = TurnAccumulator::new(9);
        whole.add_rows(&l, 0, &values).unwrap();
        let mut bounds = cuts.clone();
        bounds.extend([0, rows]);
        bounds.sort_unstable();
        let mut merged = TurnAccumulator::new(9);
        for w in bounds.windows(2) {
            let mut part = TurnAccumulator::new(9);
            part.add_rows(&l, w[0], &values[w[0]..w[1]]).unwrap();
            merged.merge(&part).unwrap();
        }
        prop_assert_eq!(&merged.count, &whole.count);
        for (a, b) in merged.info().iter().zip(whole.info()) {
            prop_assert!(close(*a, b, 1e-12, 1e-12));
        }
        // Group moments: any split of the values, merged, equals one pass.
        let mut one = Moments::default();
        let mut parts = [Moments::default(), Moments::default(), Moments::default()];
        for (k, &v) in values.iter().enumerate() {
            let w = 1.0 + (k % 4) as f64;
            one.push(v, w);
            parts[k % 3].push(v, w);
        }
        let mut m = parts[0];
        m.merge(&parts[1]);
        m.merge(&parts[2]);
        prop_assert!(close(m.mean, one.mean, 1e-12, 1e-12) && close(m.m2, one.m2, 1e-10, 1e-10) && m.count == one.count);
    }
}

// ---- Bad input ------------------------------------------------------------------------------

fn err_of(real: &[f32], masked: &[f32], targets: &[i64], vocab: usize) -> Error {
    let n = targets.len();
    Cpu.compute(
        &Batch::rows(Logits::new(real, n, vocab).unwrap(), Logits::new(masked, n, vocab).unwrap(), targets),
        &Params::default(),
    )
    .unwrap_err()
}

fn row_err(e: Error) -> (usize, RowErrorKind) {
    match e {
        Error::Row { row, kind, .. } => (row, kind),
        other => panic!("expected a row error, got {other:?}"),
    }
}

#[test]
fn row_errors_name_the_lowest_row_and_first_kind() {
    let v = 4;
    let good = vec![0.0f32, 1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.5, 1.0, -1.0, 0.0, 2.0];
    let t = [1i64, 2, 3];
    let set = |i: usize, x: f32| {
        let mut g = good.clone();
        g[i] = x;
        g
    };
    use RowErrorKind::*;
    assert_eq!(row_err(err_of(&good, &good, &[1, 4, 3], v)), (1, TargetOutOfRange));
    assert_eq!(row_err(err_of(&good, &good, &[1, 2, -1], v)), (2, TargetOutOfRange));
    assert_eq!(row_err(err_of(&set(6, f32::NAN), &good, &t, v)), (1, RealNotFinite));
    assert_eq!(row_err(err_of(&set(6, f32::INFINITY), &good, &t, v)), (1, RealNotFinite));
    assert_eq!(row_err(err_of(&good, &set(9, f32::NAN), &t, v)), (2, MaskedNotFinite));
    // Row 1 has both a NaN masked logit and a bad target in row 2: the lower row wins.
    assert_eq!(row_err(err_of(&good, &set(4, f32::NAN), &[1, 2, 9], v)), (1, MaskedNotFinite));
    // Within a row the contract order wins: NaN real before NaN masked.
    assert_eq!(row_err(err_of(&set(0, f32::NAN), &set(1, f32::NAN), &t, v)), (0, RealNotFinite));
    let mut all = good.clone();
    all[4..8].fill(f32::NEG_INFINITY);
    assert_eq!(row_err(err_of(&all, &good, &t, v)), (1, RealAllNegInf));
    assert_eq!(row_err(err_of(&good, &all, &t, v)), (1, MaskedAllNegInf));
    assert_eq!(row_err(err_of(&set(6, f32::NEG_INFINITY), &good, &t, v)), (1, RealTargetNegInf));
    assert_eq!(row_err(err_of(&good, &set(6, f32::NEG_INFINITY), &t, v)), (1, MaskedTargetNegInf));
    let msg = err_of(&set(6, f32::NAN), &good, &t, v).to_string();
    assert!(msg.contains("row 1") && msg.contains("NaN"), "{msg}");
}

#[test]
fn shape_dtype_and_param_errors() {
    let x = vec![0.0f32; 6];
    let h = vec![f16::ZERO; 6];
    assert!(matches!(Logits::new(&x, 2, 4), Err(Error::Shape { .. })));
    assert!(matches!(Logits::new(&x, 6, 0), Err(Error::EmptyVocab)));
    let (a, b) = (Logits::new(&x, 2, 3).unwrap(), Logits::new(&h, 2, 3).unwrap());
    assert!(matches!(Cpu.compute(&Batch::rows(a, b, &[0, 0]), &Params::default()), Err(Error::DtypeMismatch { .. })));
    let c = Logits::new(&x, 3, 2).unwrap();
    assert!(matches!(Cpu.compute(&Batch::rows(a, c, &[0, 0]), &Params::default()), Err(Error::Shape { .. })));
    assert!(matches!(Cpu.compute(&Batch::rows(a, a, &[0]), &Params::default()), Err(Error::Shape { .. })));
    for p in [
        Params { temperature: 0.0, ..Params::default() },
        Params { temperature: f64::NAN, ..Params::default() },
        Params { gate_temperature: -1.0, ..Params::default() },
        Params { eps: -1e-3, ..Params::default() },
        Params { eps: f64::INFINITY, ..Params::default() },
        Params { beta: f64::NAN, ..Params::default() },
    ] {
        assert!(matches!(Cpu.compute(&Batch::rows(a, a, &[0, 0]), &p), Err(Error::Param { .. })), "{p:?}");
    }
}

#[test]
fn layout_errors() {
    let turns_err = |offsets: &[u32], traj: &[u32], credit: &[u32]| {
        infopo_kernels::Layout::new(4, &Turns { offsets, trajectory: traj, credit_tokens: credit }, None).unwrap_err()
    };
    for (o, t, c, needle) in [
        (&[1u32, 2, 4][..], &[0u32, 0][..], &[1u32, 1][..], "must be 0"),
        (&[0, 3, 2, 4], &[0, 0, 0], &[1, 1, 1], "decrease"),
        (&[0, 2, 3], &[0, 0], &[1, 1], "must equal the number of rows"),
        (&[0, 2, 4], &[0, 0], &[1, 0], "credit_tokens = 0"),
        (&[0, 4], &[0, 0], &[1], "entries"),
        (&[0, 2, 4], &[0, 0], &[1], "entries"),
    ] {
        let e = turns_err(o, t, c);
        assert!(matches!(e, Error::Turns { .. }) && e.to_string().contains(needle), "{e}");
    }
    let traj_err = |traj: &[u32], credit: &[u32], group: &[u32], outcome: &[f64], tokens: &[u32]| {
        infopo_kernels::Layout::new(
            4,
            &Turns { offsets: &[0, 2, 4], trajectory: traj, credit_tokens: credit },
            Some(&Trajectories { group, outcome, tokens }),
        )
        .unwrap_err()
        .to_string()
    };
    assert!(traj_err(&[0, 2], &[1, 1], &[0, 0], &[1.0, 0.0], &[3, 3]).contains("trajectory 2"));
    assert!(traj_err(&[0, 0], &[3, 3], &[0, 0], &[1.0, 0.0], &[5, 3]).contains("credits 6 tokens"));
    assert!(traj_err(&[0, 0], &[1, 1], &[0], &[1.0, 0.0], &[3, 3]).contains("entries"));
    assert!(traj_err(&[0, 0], &[1, 1], &[0, 1], &[f64::NAN, 0.0], &[3, 3]).contains("non-finite"));
    let few = infopo_kernels::Layout::new(
        1,
        &Turns { offsets: &[0, 1], trajectory: &[0], credit_tokens: &[1] },
        Some(&Trajectories { group: &[0], outcome: &[1.0], tokens: &[1] }),
    )
    .unwrap_err();
    assert!(few.to_string().contains("at least 2"), "{few}");
    // Trajectories without turns.
    let x = [0.0f32; 2];
    let l = Logits::new(&x, 1, 2).unwrap();
    let b = Batch {
        real: l,
        masked: l,
        targets: &[0],
        turns: None,
        trajectories: Some(Trajectories { group: &[0], outcome: &[0.0], tokens: &[2] }),
        credit_start: None,
        padding: None,
    };
    assert!(matches!(Cpu.compute(&b, &Params::default()), Err(Error::Trajectories { .. })));
}

// ---- The kernel test bodies (tests/common/kernel.rs) on the CPU reference ----------------------
// The kernels' tolerances there hold the f64 reference with a wide margin; the tighter checks
// of the CPU are the ones above.

#[test]
fn kernel_bodies_random_shapes_match_oracle() {
    kernel::random_shapes_match_oracle(&infopo_kernels::Cpu, 64);
}

#[test]
fn kernel_bodies_micro_batches_match_one_batch() {
    kernel::micro_batches_match_one_batch(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_every_row_error_code_with_priority() {
    kernel::every_row_error_code_with_priority(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_epilogue_matches_oracle() {
    kernel::epilogue_matches_oracle(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_ablation_edge_cases() {
    kernel::ablation_edge_cases(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_bitwise_deterministic() {
    kernel::bitwise_deterministic(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_alignment_neg_inf_and_huge_logits() {
    kernel::real_and_masked_with_different_alignment(&infopo_kernels::Cpu);
    kernel::neg_inf_entries_and_infinite_kl(&infopo_kernels::Cpu);
    kernel::huge_logits_and_temperature(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_turns_and_validation() {
    kernel::turns_without_trajectories_and_empty_turns(&infopo_kernels::Cpu);
    kernel::validation_errors_are_typed(&infopo_kernels::Cpu);
}

#[test]
fn kernel_bodies_exact_zeros_gaps_fills_turns_and_temperature() {
    kernel::peaked_rows_give_exact_zero_log_ratio(&infopo_kernels::Cpu);
    kernel::tiny_probability_gap_gives_infinite_kl(&infopo_kernels::Cpu);
    kernel::mask_fills_count_as_infinities(&infopo_kernels::Cpu);
    kernel::non_finite_turn_info_is_an_error(&infopo_kernels::Cpu);
    kernel::temperature_outside_its_range_is_a_parameter_error(&infopo_kernels::Cpu);
}

/// The two-stage API sees only per-turn values: a non-finite one names the turn.
#[test]
fn stage_two_rejects_a_non_finite_turn() {
    let turns = Turns { offsets: &[0, 2, 3, 5], trajectory: &[0, 0, 1], credit_tokens: &[1, 2, 1] };
    let traj = Trajectories { group: &[0, 0], outcome: &[1.0, 0.0], tokens: &[4, 3] };
    let layout = infopo_kernels::Layout::new(5, &turns, Some(&traj)).unwrap();
    let p = Params::default();
    assert!(advantages(&[0.5, -0.25, 1.0], &layout, &p).is_ok());
    for bad in [f64::INFINITY, f64::NAN, f64::NEG_INFINITY] {
        match advantages(&[0.5, bad, 1.0], &layout, &p) {
            Err(Error::NonFiniteTurn { turn: 1, row: None }) => {}
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn kernel_bodies_token_advantages_and_intrinsic_gate() {
    kernel::token_advantages_match_oracle(&infopo_kernels::Cpu, 40);
    kernel::intrinsic_gate_matches_oracle(&infopo_kernels::Cpu);
    kernel::bad_credit_spans_are_typed(&infopo_kernels::Cpu);
}

/// The two-stage API: `Layout::with_credit_start` enables `token_advantage` in
/// `advantages`, which equals the one-call result; a hand-edited layout whose spans
/// overflow is still a typed error (no out-of-bounds write).
#[test]
fn two_stage_token_advantage_and_hand_built_spans() {
    let turns = Turns { offsets: &[0, 2, 3, 5], trajectory: &[0, 0, 1], credit_tokens: &[1, 2, 1] };
    let traj = Trajectories { group: &[0, 0], outcome: &[1.0, 0.0], tokens: &[4, 3] };
    let starts = [3u32, 0, 1];
    let real: Vec<f32> = (0..35).map(|i| (i as f32 * 0.41).sin() * 2.0).collect();
    let masked: Vec<f32> = (0..35).map(|i| (i as f32 * 0.29).cos()).collect();
    let targets = [0i64, 1, 2, 3, 4];
    let batch = Batch::rows(Logits::new(&real, 5, 7).unwrap(), Logits::new(&masked, 5, 7).unwrap(), &targets)
        .with_turns(turns)
        .with_trajectories(traj)
        .with_credit_start(&starts);
    let params = Params { gate_source: infopo_kernels::GateSource::Intrinsic, ..Params::default() };
    let one = Cpu.compute(&batch, &params).unwrap();
    let mut layout = infopo_kernels::Layout::new(5, &turns, Some(&traj)).unwrap();
    let without = infopo_kernels::advantages(one.turn_info.as_ref().unwrap(), &layout, &params).unwrap();
    assert!(without.token_advantage.is_none());
    layout = layout.with_credit_start(&starts).unwrap();
    let with = infopo_kernels::advantages(one.turn_info.as_ref().unwrap(), &layout, &params).unwrap();
    assert_eq!(&with, one.advantages.as_ref().unwrap());
    layout.groups.as_mut().unwrap().turn_credit_start = Some(vec![3, 0, 3]);
    let e = infopo_kernels::advantages(one.turn_info.as_ref().unwrap(), &layout, &params).unwrap_err();
    assert!(matches!(e, Error::CreditSpan { turn: 2, .. }), "{e}");
}
