//! The library API a trainer meets (issue 7 §6): global rows in two-stage errors, estimator
//! values from any backend's `RowOutputs` into `TurnAccumulator`, `OwnedBatch`, `LayoutBuilder`.

use crate::common;

use common::{assert_close, random_layout};
use infopo_kernels::emulated::Emulated;
use infopo_kernels::synth::{logits_pair, Rng};
use infopo_kernels::{advantages, TurnAccumulator};
use infopo_kernels::{
    half::bf16, Backend, Batch, Conversation, Cpu, Error, Estimator, LayoutBuilder, Logits, OwnedBatch, Params,
    RowErrorKind, Trajectories, TrajectoryBuf, TrajectoryScore, TurnBuf, Turns,
};

fn backends() -> [Box<dyn Backend>; 2] {
    [Box::new(Cpu), Box::new(Emulated::new())]
}

/// 200 rows of vocabulary 37 where global row 150 has an out-of-range target.
fn rows_with_bad_row_150() -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut rng = Rng::new(7);
    let (real, masked, mut targets) = logits_pair::<f32>(&mut rng, 200, 37);
    targets[150] = 37;
    (real, masked, targets)
}

#[test]
fn two_stage_row_errors_name_global_rows() {
    let (real, masked, targets) = rows_with_bad_row_150();
    let params = Params::default();
    let (first, n) = (130, 40);
    let r = Logits::new(&real, 200, 37).unwrap().slice_rows(first, n).unwrap();
    let m = Logits::new(&masked, 200, 37).unwrap().slice_rows(first, n).unwrap();
    let t = &targets[first..first + n];
    let want = |e: Error| match e {
        Error::Row { row, kind, target } => {
            assert_eq!((row, kind, target), (150, RowErrorKind::TargetOutOfRange, Some(37)))
        }
        other => panic!("expected a row error, got {other}"),
    };
    want(infopo_kernels::reference::score(first, r, m, t, &params).unwrap_err());
    for b in backends() {
        want(b.score_rows(first, r, m, t, &params).unwrap_err());
        // The one-call form names the same row.
        let whole = Batch::rows(Logits::new(&real, 200, 37).unwrap(), Logits::new(&masked, 200, 37).unwrap(), &targets);
        want(b.compute_micro_batched(&whole, &params, &[first, first + n]).unwrap_err());
    }
    // The micro-batch that does not hold the bad row scores.
    let r = Logits::new(&real, 200, 37).unwrap().slice_rows(0, 130).unwrap();
    let m = Logits::new(&masked, 200, 37).unwrap().slice_rows(0, 130).unwrap();
    assert_eq!(infopo_kernels::reference::score(0, r, m, &targets[..130], &params).unwrap().len(), 130);
}

#[test]
fn cpu_score_validates_params() {
    let x = [0.0f32; 4];
    let l = Logits::new(&x, 2, 2).unwrap();
    let bad = Params { temperature: 0.0, ..Params::default() };
    assert!(matches!(
        infopo_kernels::reference::score(0, l, l, &[0, 1], &bad),
        Err(Error::Param { name: "temperature", .. })
    ));
}

#[test]
fn row_outputs_estimator_picks_the_estimator() {
    let mut rng = Rng::new(3);
    let (real, masked, targets) = logits_pair::<f32>(&mut rng, 5, 11);
    let out = Cpu
        .score_rows(
            0,
            Logits::new(&real, 5, 11).unwrap(),
            Logits::new(&masked, 5, 11).unwrap(),
            &targets,
            &Params::default(),
        )
        .unwrap();
    assert_eq!(out.estimator(Estimator::LogRatio), &out.log_ratio[..]);
    assert_eq!(out.estimator(Estimator::Kl), &out.kl[..]);
    assert_ne!(out.log_ratio, out.kl);
}

/// Two stages on any backend (score_rows per micro-batch → RowOutputs::estimator →
/// TurnAccumulator → advantages) equal one `compute` of the whole batch.
#[test]
fn estimator_values_from_row_outputs_match_compute() {
    let mut rng = Rng::new(11);
    let (rows, vocab) = (90, 53);
    let (real, masked, targets) = logits_pair::<bf16>(&mut rng, rows, vocab);
    let l = random_layout(&mut rng, rows, 14, 6, 2);
    let turns = Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit };
    let trajectories = Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens };
    let batch =
        Batch::rows(Logits::new(&real, rows, vocab).unwrap(), Logits::new(&masked, rows, vocab).unwrap(), &targets)
            .with_turns(turns)
            .with_trajectories(trajectories);
    let layout = infopo_kernels::Layout::new(rows, &turns, Some(&trajectories)).unwrap();
    for b in backends() {
        // The CPU's epilogue reads f64 rows, the RowOutputs are f32: the sums differ by the f32
        // rounding of each row. The kernels' epilogue reads the same f32 rows (summation order).
        let (atol, rtol) = if b.epilogue_reads_f64_rows() { (1e-5, 1e-4) } else { (1e-9, 1e-9) };
        for estimator in [Estimator::LogRatio, Estimator::Kl] {
            let params = Params { estimator, ..Params::default() };
            let want = b.compute(&batch, &params).unwrap();
            let mut acc = TurnAccumulator::for_layout(&layout);
            for (first, end) in [(0, 17), (17, 18), (18, 61), (61, rows)] {
                let out = b
                    .score_rows(
                        first,
                        batch.real.slice_rows(first, end - first).unwrap(),
                        batch.masked.slice_rows(first, end - first).unwrap(),
                        &targets[first..end],
                        &params,
                    )
                    .unwrap();
                assert_eq!(out.lse_real, want.rows.lse_real[first..end], "{}: rows", b.name());
                acc.add_rows(&layout, first, out.estimator(estimator)).unwrap();
            }
            let what = format!("{} {}", b.name(), estimator.name());
            assert_close(&format!("{what} turn_info"), &acc.info(), want.turn_info.as_ref().unwrap(), atol, rtol);
            let got = advantages(&acc.info(), &layout, &params).unwrap();
            let want = want.advantages.unwrap();
            assert_close(&format!("{what} bonus"), &got.turn_bonus, &want.turn_bonus, atol, rtol);
            assert_close(&format!("{what} advantage"), &got.trajectory_advantage, &want.trajectory_advantage, 0.0, 0.0);
        }
    }
}

#[test]
fn turn_accumulator_checks_the_layout() {
    let layout = LayoutBuilder::new();
    let mut b = layout;
    let i = b.trajectory(0, 1.0, 10);
    b.turn(i, 3, 2).unwrap();
    let l = b.build().unwrap().validate().unwrap();
    let mut acc = TurnAccumulator::new(2);
    assert!(matches!(acc.add_rows(&l, 0, &[1.0f32]), Err(Error::Turns { .. })));
    let mut acc = TurnAccumulator::for_layout(&l);
    assert!(matches!(acc.add_rows(&l, 2, &[1.0f64, 2.0]), Err(Error::Turns { .. })));
    acc.add_rows(&l, 1, &[1.0f32, 2.0]).unwrap();
    assert_eq!(acc.info(), [1.5]);
}

/// The builder's layout equals the hand-written CSR, and computes the same outputs.
#[test]
fn layout_builder_round_trips_hand_written_csr() {
    let mut b = LayoutBuilder::new();
    let t0 = b.trajectory(10, 1.0, 20);
    let t1 = b.trajectory(4, 0.5, 9);
    b.turn(t0, 5, 3).unwrap().turn(t0, 0, 1).unwrap().turn(t1, 12, 7).unwrap();
    let t2 = b.trajectory(10, 0.0, 30);
    b.turn(t2, 3, 2).unwrap();
    b.turn(t1, 4, 2).unwrap(); // turns need not be trajectory-major
    let built = b.build().unwrap();
    let turns = TurnBuf {
        offsets: vec![0, 5, 5, 17, 20, 24],
        trajectory: vec![0, 0, 1, 2, 1],
        credit_tokens: vec![3, 1, 7, 2, 2],
    };
    let trajectories = TrajectoryBuf { group: vec![10, 4, 10], outcome: vec![1.0, 0.5, 0.0], tokens: vec![20, 9, 30] };
    assert_eq!(built.turns, turns);
    assert_eq!(built.trajectories, trajectories);
    assert_eq!(built.rows(), 24);

    let (rows, vocab) = (24, 19);
    let mut rng = Rng::new(5);
    let (real, masked, targets) = logits_pair::<f32>(&mut rng, rows, vocab);
    let owned = OwnedBatch::new(real.clone(), masked.clone(), vocab, targets.clone()).unwrap().with_layout(built);
    let by_hand =
        Batch::rows(Logits::new(&real, rows, vocab).unwrap(), Logits::new(&masked, rows, vocab).unwrap(), &targets)
            .with_turns(turns.as_turns())
            .with_trajectories(trajectories.as_trajectories());
    for b in backends() {
        let params = Params::default();
        assert_eq!(b.compute(&owned.as_batch().unwrap(), &params).unwrap(), b.compute(&by_hand, &params).unwrap());
    }
}

/// A conversation's layout is what a trainer writes by hand with `LayoutBuilder` and a parallel
/// vector of credit starts (the official rule: rows are the next agent turn's tokens, credit the
/// turn that drew the reply, starting where it starts among the agent tokens), and the backends
/// compute the same outputs from it, token advantages included.
#[test]
fn conversation_is_the_layout_written_by_hand() {
    let mut rng = Rng::new(31);
    for case in 0..20 {
        let mut conv = Conversation::new();
        let mut by_hand = LayoutBuilder::new();
        let mut starts = Vec::new();
        let trajectories = 1 + rng.below(6) as u32;
        for i in 0..trajectories {
            let turns: Vec<u32> = (0..1 + rng.below(4)).map(|_| 1 + rng.below(9) as u32).collect();
            let turns = if i == 0 { [&[2][..], &turns].concat() } else { turns };
            let (group, outcome) = (rng.below(3) as u32, rng.below(5) as f64 / 4.0);
            assert_eq!(conv.trajectory(group, outcome, &turns), i);
            by_hand.trajectory(group, outcome, turns.iter().sum());
            for k in 0..turns.len() - 1 {
                // Each reply scored or not, over all of the next turn or a prefix.
                let rows = match rng.below(3) {
                    0 => continue,
                    1 => {
                        conv.feedback(i, k as u32).unwrap();
                        turns[k + 1]
                    }
                    _ => {
                        conv.feedback_rows(i, k as u32, turns[k + 1] / 2).unwrap();
                        turns[k + 1] / 2
                    }
                };
                by_hand.turn(i, rows, turns[k]).unwrap();
                starts.push(turns[..k].iter().sum::<u32>());
            }
        }
        let built = conv.build().unwrap();
        let mut want = by_hand.build().unwrap();
        want.credit_start = Some(starts);
        assert_eq!(built, want, "case {case}");
        let (rows, vocab) = (built.rows(), 23);
        let (real, masked, targets) = logits_pair::<f32>(&mut rng, rows, vocab);
        let logits = |v| Logits::new(v, rows, vocab).unwrap();
        let batch = Batch::rows(logits(&real), logits(&masked), &targets).with_layout(&built).unwrap();
        let starts = want.credit_start.as_deref().unwrap();
        let manual = Batch::rows(logits(&real), logits(&masked), &targets)
            .with_turns(want.turns.as_turns())
            .with_trajectories(want.trajectories.as_trajectories())
            .with_credit_start(starts);
        let owned =
            OwnedBatch::new(real.clone(), masked.clone(), vocab, targets.clone()).unwrap().with_layout(built.clone());
        for b in backends() {
            let params = Params::default();
            let got = b.compute(&batch, &params).unwrap();
            assert!(got.advantages.as_ref().unwrap().token_advantage.is_some());
            assert_eq!(got, b.compute(&manual, &params).unwrap(), "case {case}");
            assert_eq!(got, b.compute(&owned.as_batch().unwrap(), &params).unwrap(), "case {case}");
        }
    }
}

/// The trajectory scores against the formulas of contract §1, written out: `Sum` rounds the sum
/// to 4 decimals half to even on the exact value (Python's `round`), `RewardToGo` is Σ γ^k r_k.
#[test]
fn trajectory_scores_follow_the_official_formulas() {
    let score = |rewards: &[f64], s| {
        let mut c = Conversation::new();
        c.rewarded(0, &vec![1; rewards.len()], rewards, s).unwrap();
        c.build().map(|l| l.trajectories.outcome[0]).unwrap_or_else(|_| {
            // A layout needs 2 agent tokens; score a 2-token copy instead.
            let mut c = Conversation::new();
            c.rewarded(0, &vec![2; rewards.len()], rewards, s).unwrap();
            c.build().unwrap().trajectories.outcome[0]
        })
    };
    let sum = TrajectoryScore::Sum;
    // Values Python's round(x, 4) gives: 0.1 + 0.2 = 0.30000000000000004 → 0.3; 1.00015 is
    // stored as 1.0001500000000000945… → 1.0002; 0.00005 as 5.0000000000000000239…e-05 → 0.0001;
    // 0.12345 as 0.1234500000000000041… → 0.1235; 2.00005 as 2.0000499999999998834… → 2.0.
    for (rewards, want) in [
        (&[0.1, 0.2][..], 0.3),
        (&[1.00015], 1.0002),
        (&[0.00005], 0.0001),
        (&[0.12345], 0.1235),
        (&[2.00005], 2.0),
        (&[0.5, -0.25, 1.0], 1.25),
    ] {
        assert_eq!(score(rewards, sum), want, "Sum of {rewards:?}");
    }
    let r2g = |gamma| TrajectoryScore::RewardToGo { gamma };
    let rewards = [0.5, -1.0, 0.25, 2.0];
    let direct = |g: f64| rewards.iter().enumerate().map(|(k, r)| g.powi(k as i32) * r).sum::<f64>();
    assert_eq!(score(&rewards, r2g(0.0)), 0.5, "γ = 0 keeps the first turn's reward");
    assert_eq!(score(&rewards, r2g(1.0)), rewards.iter().sum::<f64>(), "γ = 1 is the plain sum");
    assert_close("γ = 0.8", &[score(&rewards, r2g(0.8))], &[direct(0.8)], 1e-15, 0.0);
    // A reward on the last of 3 turns only counts γ².
    assert_close("γ² on the last of 3", &[score(&[0.0, 0.0, 1.0], r2g(0.8))], &[0.64], 1e-15, 0.0);
}

#[test]
fn layout_builder_errors() {
    let mut b = LayoutBuilder::new();
    let e = b.turn(0, 1, 1).unwrap_err();
    assert!(matches!(e, Error::Turns { .. }) && e.to_string().contains("0 trajectories"), "{e}");
    let i = b.trajectory(0, 1.0, 4);
    b.turn(i, 1, 0).unwrap();
    let e = b.build().unwrap_err();
    assert!(e.to_string().contains("Turns::credit_tokens / turn_credit_tokens = 0"), "{e}");
    let mut b = LayoutBuilder::new();
    let i = b.trajectory(0, 1.0, 4);
    b.turn(i, u32::MAX, 1).unwrap();
    assert!(matches!(b.turn(i, 1, 1), Err(Error::Shape { .. })));
    let mut b = LayoutBuilder::new();
    let i = b.trajectory(0, 1.0, 4);
    b.turn(i, 2, 5).unwrap();
    let e = b.build().unwrap_err();
    assert!(e.to_string().contains("Trajectories::tokens / trajectory_tokens"), "{e}");
}

#[test]
fn owned_batch_checks_shapes_and_dtypes() {
    let x = vec![0.0f32; 6];
    assert_eq!(OwnedBatch::new(x.clone(), x.clone(), 3, vec![0i64, 1]).unwrap().rows, 2);
    assert!(matches!(OwnedBatch::new(x.clone(), x.clone(), 4, vec![0i64, 1]), Err(Error::Shape { .. })));
    assert!(matches!(OwnedBatch::new(x.clone(), vec![0.0f32; 5], 3, vec![0i64, 1]), Err(Error::Shape { .. })));
    let h = vec![bf16::ZERO; 6];
    assert!(matches!(OwnedBatch::new(x, h, 3, vec![0i64, 1]), Err(Error::DtypeMismatch { .. })));
}

#[test]
fn layout_errors_name_the_rust_field_and_the_file_tensor() {
    let rows = 4;
    let e = infopo_kernels::Layout::new(
        rows,
        &Turns { offsets: &[0, 2, 4], trajectory: &[0, 0], credit_tokens: &[1] },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Turns::credit_tokens / turn_credit_tokens"), "{e}");
    let e = infopo_kernels::Layout::new(
        rows,
        &Turns { offsets: &[0, 3, 2, 4], trajectory: &[0, 0, 0], credit_tokens: &[1, 1, 1] },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("Turns::offsets / turn_offsets decrease"), "{e}");
}
