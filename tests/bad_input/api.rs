//! Adversarial inputs to every public library entry that takes slices, dimensions or
//! parameters: each must be a typed `Error` naming what is wrong, never a panic (nor a silent
//! `Ok`). Cases are collected and reported together, so one run lists every failing case.

use infopo_kernels::emulated::Emulated;
use infopo_kernels::vocab::{self, RangeInput, RangeStates, VocabRange};
use infopo_kernels::TurnAccumulator;
use infopo_kernels::{
    Backend, Batch, Cpu, Error, HiddenBatch, LayoutBuilder, LogitData, Logits, OwnedBatch, OwnedHiddenBatch, Params,
    RowErrorKind, Trajectories, Turns,
};
use infopo_kernels::{HiddenInputs, HiddenTensors};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Collects the cases whose result is not the expected error (a panic, an `Ok`, or another
/// error), and fails once with all of them.
#[derive(Default)]
struct Cases {
    failures: Vec<String>,
    checked: usize,
}

impl Cases {
    /// `run` must return an error that `expect` accepts and whose message holds `needle`.
    fn err<T: std::fmt::Debug>(
        &mut self,
        label: &str,
        needle: &str,
        expect: impl Fn(&Error) -> bool,
        run: impl FnOnce() -> infopo_kernels::Result<T>,
    ) {
        self.checked += 1;
        match catch_unwind(AssertUnwindSafe(run)) {
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.failures.push(format!("{label}: PANIC {msg}"));
            }
            Ok(Ok(v)) => {
                let v = format!("{v:?}");
                self.failures.push(format!("{label}: accepted (Ok {})", &v[..v.len().min(120)]))
            }
            Ok(Err(e)) if !expect(&e) => self.failures.push(format!("{label}: wrong error {e:?}")),
            Ok(Err(e)) if !e.to_string().contains(needle) => {
                self.failures.push(format!("{label}: message `{e}` lacks `{needle}`"))
            }
            Ok(Err(_)) => {}
        }
    }

    fn finish(self) {
        assert!(self.checked > 0);
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}

fn is_shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}
fn is_turns(e: &Error) -> bool {
    matches!(e, Error::Turns { .. })
}
fn is_trajectories(e: &Error) -> bool {
    matches!(e, Error::Trajectories { .. })
}
fn is_empty_vocab(e: &Error) -> bool {
    matches!(e, Error::EmptyVocab)
}
fn is_param(name: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::Param { name: n, .. } if *n == name)
}
fn is_row(row: usize, kind: RowErrorKind) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::Row { row: r, kind: k, .. } if *r == row && *k == kind)
}

fn backends() -> Vec<Box<dyn Backend>> {
    vec![Box::new(Cpu), Box::new(Emulated::new())]
}

/// 4 rows of 5 logits (f32), finite, and valid targets.
fn logits() -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let real: Vec<f32> = (0..20).map(|i| (i as f32 * 0.37).sin() * 2.0).collect();
    let masked: Vec<f32> = (0..20).map(|i| (i as f32 * 0.53).cos()).collect();
    (real, masked, vec![0, 4, 2, 1])
}

/// Every parameter out of its range: (label, the parameter it names, params).
fn bad_params() -> Vec<(String, &'static str, Params)> {
    let d = Params::default();
    let mut out = Vec::new();
    for t in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 0.0, -1.0, 1e-4, 1e4, -0.0] {
        out.push((format!("temperature {t}"), "temperature", Params { temperature: t, ..d }));
    }
    for t in [f64::NAN, f64::INFINITY, 0.0, -0.05] {
        out.push((format!("gate_temperature {t}"), "gate_temperature", Params { gate_temperature: t, ..d }));
    }
    for e in [f64::NAN, f64::INFINITY, 0.0, -1e-6] {
        out.push((format!("eps {e}"), "eps", Params { eps: e, ..d }));
    }
    for b in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        out.push((format!("beta {b}"), "beta", Params { beta: b, ..d }));
    }
    for t in [f64::NAN, f64::INFINITY, -1e-9, -1.0] {
        out.push((format!("pool_tolerance {t}"), "pool_tolerance", Params { pool_tolerance: t, ..d }));
    }
    out
}

#[test]
fn logit_views_check_their_shape() {
    let mut c = Cases::default();
    let x = [0.0f32; 6];
    c.err("len != rows x vocab", "expected rows x vocab", is_shape, || Logits::new(&x, 2, 4));
    c.err("rows x vocab overflows", "overflows usize", is_shape, || Logits::new(&x, usize::MAX, 2));
    c.err("vocab 0", "vocabulary size is 0", is_empty_vocab, || Logits::new(&x, 6, 0));
    c.err("vocab 0, no data", "vocabulary size is 0", is_empty_vocab, || Logits::new::<f32>(&[], 0, 0));
    let l = Logits::new(&x, 2, 3).unwrap();
    c.err("slice past the end", "outside 0..2", is_shape, || l.slice_rows(1, 2));
    c.err("slice start + len overflows", "outside", is_shape, || l.slice_rows(usize::MAX, 2));
    c.err("slice start past the end", "outside", is_shape, || l.slice_rows(3, 0));
    c.err("owned batch, len mismatch", "expected rows x vocab", is_shape, || {
        OwnedBatch::new(vec![0.0f32; 7], vec![0.0f32; 6], 3, vec![0i64, 1])
    });
    c.err("owned batch, vocab 0", "vocabulary size is 0", is_empty_vocab, || {
        OwnedBatch::new(vec![0.0f32; 0], vec![0.0f32; 0], 0, vec![0i64, 1])
    });
    c.err(
        "owned batch, dtype mismatch",
        "dtype mismatch",
        |e| matches!(e, Error::DtypeMismatch { .. }),
        || OwnedBatch::new(vec![0.0f32; 6], vec![half::bf16::ZERO; 6], 3, vec![0i64, 1]),
    );
    c.finish();
}

#[test]
fn every_backend_rejects_bad_params_before_reading_rows() {
    let (real, masked, targets) = logits();
    let batch = Batch::rows(Logits::new(&real, 4, 5).unwrap(), Logits::new(&masked, 4, 5).unwrap(), &targets);
    let head = [0.5f32; 15];
    let hidden = [0.25f32; 12];
    let tensors = HiddenTensors::new(
        LogitData::from_slice(&hidden),
        LogitData::from_slice(&hidden),
        LogitData::from_slice(&head),
        4,
        3,
        5,
    )
    .unwrap();
    let hidden_batch = HiddenBatch::rows(tensors, &targets);
    let layout = {
        let mut b = LayoutBuilder::new();
        let i = b.trajectory(0, 1.0, 5);
        b.turn(i, 4, 2).unwrap();
        let j = b.trajectory(0, 0.0, 5);
        b.turn(j, 0, 2).unwrap();
        b.build().unwrap().validate().unwrap()
    };
    let emulator = Emulated::new();
    let mut c = Cases::default();
    for (label, name, p) in bad_params() {
        let needle = format!("invalid parameter {name}");
        for b in backends() {
            let n = b.name();
            c.err(&format!("{n} compute, {label}"), &needle, is_param(name), || b.compute(&batch, &p));
            c.err(&format!("{n} score_rows, {label}"), &needle, is_param(name), || {
                b.score_rows(0, batch.real, batch.masked, &targets, &p)
            });
            c.err(&format!("{n} compute_hidden, {label}"), &needle, is_param(name), || {
                b.compute_hidden(&hidden_batch, &p, 2)
            });
            c.err(&format!("{n} score_hidden_rows, {label}"), &needle, is_param(name), || {
                b.score_hidden_rows(0, &tensors, &targets, &p, 2)
            });
        }
        c.err(&format!("reference::score, {label}"), &needle, is_param(name), || {
            infopo_kernels::reference::score(0, batch.real, batch.masked, &targets, &p)
        });
        c.err(&format!("reference::score_hidden, {label}"), &needle, is_param(name), || {
            infopo_kernels::reference::score_hidden(0, &tensors.typed::<f32>()?, &targets, &p, 2)
        });
        let input = RangeInput::of_full(batch.real, batch.masked, VocabRange::new(0, 5));
        c.err(&format!("vocab::score_range, {label}"), &needle, is_param(name), || {
            vocab::score_range(&input, &targets, &p)
        });
        c.err(&format!("Emulated::range_states, {label}"), &needle, is_param(name), || {
            emulator.range_states(&input, &targets, &p)
        });
        c.err(&format!("RangeStates::from_kernel, {label}"), &needle, is_param(name), || {
            RangeStates::from_kernel(VocabRange::new(0, 5), &[0.0; 32], &p)
        });
        c.err(&format!("merge_range_states, {label}"), &needle, is_param(name), || {
            emulator.merge_and_finish(&[0.0; 32], 1, &targets, 5, None, &p)
        });
        c.err(&format!("advantages, {label}"), &needle, is_param(name), || {
            infopo_kernels::advantages(&[0.1, 0.2], &layout, &p)
        });
    }
    c.finish();
}

#[test]
fn batches_with_mismatched_shapes_or_targets() {
    let (real, masked, targets) = logits();
    let real_l = Logits::new(&real, 4, 5).unwrap();
    let masked_l = Logits::new(&masked, 4, 5).unwrap();
    let masked_wide = Logits::new(&masked, 2, 10).unwrap();
    let masked_short = Logits::new(&masked[..15], 3, 5).unwrap();
    let bf = vec![half::bf16::ZERO; 20];
    let masked_bf = Logits::new(&bf, 4, 5).unwrap();
    let p = Params::default();
    let mut c = Cases::default();
    for b in backends() {
        let n = b.name();
        let run = |batch: Batch<'_>| b.compute(&batch, &p);
        c.err(&format!("{n}: masked of another vocab"), "are [4, 5] but", is_shape, || {
            run(Batch::rows(real_l, masked_wide, &targets))
        });
        c.err(&format!("{n}: masked of fewer rows"), "are [4, 5] but", is_shape, || {
            run(Batch::rows(real_l, masked_short, &targets))
        });
        c.err(
            &format!("{n}: dtype mismatch"),
            "dtype mismatch",
            |e| matches!(e, Error::DtypeMismatch { .. }),
            || run(Batch::rows(real_l, masked_bf, &targets)),
        );
        c.err(&format!("{n}: too few targets"), "hold 3 ids for 4 rows", is_shape, || {
            run(Batch::rows(real_l, masked_l, &targets[..3]))
        });
        c.err(&format!("{n}: score_rows, masked of fewer rows"), "[3, 5]", is_shape, || {
            b.score_rows(0, real_l, masked_short, &targets, &p)
        });
        for (bad, row) in [(-1i64, 1), (5, 2), (i64::MIN, 0), (i64::MAX, 3)] {
            let mut t = targets.clone();
            t[row] = bad;
            c.err(
                &format!("{n}: target {bad}"),
                "target token id is outside",
                is_row(row, RowErrorKind::TargetOutOfRange),
                || run(Batch::rows(real_l, masked_l, &t)),
            );
            // Two-stage: the error names the global row.
            c.err(
                &format!("{n}: score_rows target {bad}"),
                &format!("row {}", 100 + row),
                is_row(100 + row, RowErrorKind::TargetOutOfRange),
                || b.score_rows(100, real_l, masked_l, &t, &p),
            );
        }
        // Micro-batch cuts.
        for cuts in [&[3usize, 2][..], &[5], &[usize::MAX], &[0, 0, 5]] {
            c.err(&format!("{n}: cuts {cuts:?}"), "micro-batch cut", is_shape, || {
                b.compute_micro_batched(&Batch::rows(real_l, masked_l, &targets), &p, cuts)
            });
        }
    }
    // A first row whose global row indices overflow usize.
    for b in backends() {
        let n = b.name();
        c.err(&format!("{n}: score_rows first_row overflows"), "global rows", is_shape, || {
            b.score_rows(usize::MAX - 2, real_l, masked_l, &targets, &p)
        });
    }
    c.err("reference::score, first_row overflows", "global rows", is_shape, || {
        infopo_kernels::reference::score(usize::MAX, real_l, masked_l, &targets, &p)
    });
    c.finish();
}

#[test]
fn invalid_turn_and_trajectory_layouts() {
    let (real, masked, targets) = logits();
    let real_l = Logits::new(&real, 4, 5).unwrap();
    let masked_l = Logits::new(&masked, 4, 5).unwrap();
    let p = Params::default();
    let turns = |offsets: &'static [u32], trajectory: &'static [u32], credit: &'static [u32]| Turns {
        offsets,
        trajectory,
        credit_tokens: credit,
    };
    let traj = |group: &'static [u32], outcome: &'static [f64], tokens: &'static [u32]| Trajectories {
        group,
        outcome,
        tokens,
    };
    let good_turns = turns(&[0, 2, 4], &[0, 1], &[2, 3]);
    let good_traj = traj(&[0, 0], &[1.0, 0.0], &[5, 5]);
    type Case = (
        &'static str,
        &'static str,
        fn(&Error) -> bool,
        Turns<'static>,
        Option<Trajectories<'static>>,
        Option<&'static [u32]>,
    );
    let cases: Vec<Case> = vec![
        ("offsets too short", "expected turns + 1", is_turns, turns(&[0, 4], &[0, 1], &[2, 3]), None, None),
        ("offsets empty", "expected turns + 1", is_turns, turns(&[], &[], &[]), None, None),
        (
            "credit too short",
            "turn_credit_tokens has 1 entries for 2 turns",
            is_turns,
            turns(&[0, 2, 4], &[0, 1], &[2]),
            None,
            None,
        ),
        ("offsets[0] != 0", "must be 0", is_turns, turns(&[1, 2, 4], &[0, 1], &[2, 3]), None, None),
        (
            "offsets decrease",
            "decrease at turn 1: 3 then 2",
            is_turns,
            turns(&[0, 3, 2, 4], &[0, 1, 1], &[2, 3, 1]),
            None,
            None,
        ),
        (
            "offsets past the rows",
            "must equal the number of rows 4",
            is_turns,
            turns(&[0, 2, 5], &[0, 1], &[2, 3]),
            None,
            None,
        ),
        (
            "offsets short of the rows",
            "must equal the number of rows 4",
            is_turns,
            turns(&[0, 2, 3], &[0, 1], &[2, 3]),
            None,
            None,
        ),
        (
            "offsets u32::MAX",
            "must equal the number of rows 4",
            is_turns,
            turns(&[0, u32::MAX], &[0], &[2]),
            None,
            None,
        ),
        ("credit 0", "= 0, must be >= 1", is_turns, turns(&[0, 2, 4], &[0, 1], &[2, 0]), None, None),
        (
            "turn of a missing trajectory",
            "belongs to trajectory 2",
            is_turns,
            turns(&[0, 2, 4], &[0, 2], &[2, 3]),
            Some(good_traj),
            None,
        ),
        (
            "trajectory lengths differ",
            "have 2, 1 and 2 entries",
            is_trajectories,
            good_turns,
            Some(traj(&[0, 0], &[1.0], &[5, 5])),
            None,
        ),
        (
            "NaN outcome",
            "non-finite",
            is_trajectories,
            good_turns,
            Some(traj(&[0, 0], &[f64::NAN, 0.0], &[5, 5])),
            None,
        ),
        (
            "inf outcome",
            "non-finite",
            is_trajectories,
            good_turns,
            Some(traj(&[0, 0], &[1.0, f64::NEG_INFINITY], &[5, 5])),
            None,
        ),
        (
            "credits past the tokens",
            "credits 3 tokens",
            is_trajectories,
            good_turns,
            Some(traj(&[0, 0], &[1.0, 0.0], &[5, 2])),
            None,
        ),
        (
            "credits u32::MAX twice",
            "credits 8589934590 tokens",
            is_trajectories,
            turns(&[0, 2, 4], &[0, 0], &[u32::MAX, u32::MAX]),
            Some(traj(&[0], &[1.0], &[u32::MAX])),
            None,
        ),
        (
            "no trajectories",
            "need at least 2",
            is_trajectories,
            turns(&[0, 4], &[0], &[1]),
            Some(traj(&[0], &[1.0], &[1])),
            None,
        ),
        ("credit_start without trajectories", "needs trajectories", is_trajectories, good_turns, None, Some(&[0, 0])),
        ("credit_start too short", "has 1 entries for 2 turns", is_turns, good_turns, Some(good_traj), Some(&[0])),
        (
            "credit span past the tokens",
            "extends past trajectory 1",
            |e| matches!(e, Error::CreditSpan { turn: 1, .. }),
            good_turns,
            Some(good_traj),
            Some(&[0, 3]),
        ),
        (
            "credit span at u32::MAX",
            "extends past",
            |e| matches!(e, Error::CreditSpan { turn: 0, .. }),
            good_turns,
            Some(good_traj),
            Some(&[u32::MAX, 0]),
        ),
        (
            "credit spans overlap",
            "overlaps turn 0",
            |e| matches!(e, Error::CreditSpan { turn: 1, .. }),
            turns(&[0, 2, 4], &[0, 0], &[2, 2]),
            Some(good_traj),
            Some(&[0, 1]),
        ),
    ];
    let mut c = Cases::default();
    for b in backends() {
        let n = b.name();
        for (label, needle, expect, turns, trajectories, credit_start) in &cases {
            let mut batch = Batch::rows(real_l, masked_l, &targets).with_turns(*turns);
            batch.trajectories = *trajectories;
            batch.credit_start = *credit_start;
            c.err(&format!("{n}: {label}"), needle, expect, || b.compute(&batch, &p));
        }
        let mut batch = Batch::rows(real_l, masked_l, &targets);
        batch.trajectories = Some(good_traj);
        c.err(&format!("{n}: trajectories without turns"), "need a turn layout", is_trajectories, || {
            b.compute(&batch, &p)
        });
        let mut batch = Batch::rows(real_l, masked_l, &targets);
        batch.credit_start = Some(&[0, 0]);
        c.err(&format!("{n}: credit_start without turns"), "needs trajectories", is_trajectories, || {
            b.compute(&batch, &p)
        });
    }
    // The builder and the fused path take the same layout checks.
    let mut builder = LayoutBuilder::new();
    c.err("builder: turn of no trajectory", "0 trajectories were added", is_turns, || {
        builder.turn(0, 1, 1).map(|_| ())
    });
    let hidden = [0.5f32; 8];
    let head = [0.25f32; 10];
    let tensors = HiddenTensors::new(
        LogitData::from_slice(&hidden),
        LogitData::from_slice(&hidden),
        LogitData::from_slice(&head),
        4,
        2,
        5,
    )
    .unwrap();
    for b in backends() {
        let n = b.name();
        for (label, needle, expect, turns, trajectories, credit_start) in &cases {
            let mut batch = HiddenBatch::rows(tensors, &targets).with_turns(*turns);
            batch.trajectories = *trajectories;
            batch.credit_start = *credit_start;
            c.err(&format!("{n} fused: {label}"), needle, expect, || b.compute_hidden(&batch, &p, 3));
        }
    }
    c.finish();
}

#[test]
fn fused_inputs_with_bad_dimensions() {
    let (_, _, targets) = logits();
    let h = vec![0.5f32; 12]; // [4, 3]
    let w = vec![0.25f32; 15]; // [5, 3]
    fn f<'a>(
        r: &'a [f32],
        m: &'a [f32],
        head: &'a [f32],
        rows: usize,
        hidden: usize,
        vocab: usize,
    ) -> infopo_kernels::Result<HiddenTensors<'a>> {
        HiddenTensors::new(
            LogitData::from_slice(r),
            LogitData::from_slice(m),
            LogitData::from_slice(head),
            rows,
            hidden,
            vocab,
        )
    }
    let hb = vec![half::bf16::ZERO; 15];
    let p = Params::default();
    let mut c = Cases::default();
    c.err("hidden 0", "hidden width D is 0", is_shape, || f(&[], &[], &[], 4, 0, 5));
    c.err("vocab 0", "vocabulary size is 0", is_empty_vocab, || f(&h, &h, &[], 4, 3, 0));
    c.err("lm_head width mismatch", "lm_head holds 15 elements, expected [5, 4]", is_shape, || f(&h, &h, &w, 3, 4, 5));
    c.err("masked_hidden short", "masked_hidden holds 11", is_shape, || f(&h, &h[..11], &w, 4, 3, 5));
    c.err("rows x hidden overflows", "expected [", is_shape, || f(&h, &h, &w, usize::MAX, 3, 5));
    c.err("vocab x hidden overflows", "lm_head", is_shape, || f(&h, &h, &w, 4, 3, usize::MAX));
    c.err(
        "lm_head dtype",
        "lm_head",
        |e| matches!(e, Error::UnsupportedDtype { tensor: "lm_head", .. }),
        || {
            HiddenTensors::new(
                LogitData::from_slice(&h),
                LogitData::from_slice(&h),
                LogitData::from_slice(&hb),
                4,
                3,
                5,
            )
        },
    );
    c.err("owned hidden batch, lm_head short", "lm_head holds 14", is_shape, || {
        OwnedHiddenBatch::new(h.clone(), h.clone(), w[..14].to_vec(), 3, 5, targets.clone())
    });
    let t = f(&h, &h, &w, 4, 3, 5).unwrap();
    c.err("slice past the end", "outside 0..4", is_shape, || t.slice_rows(3, 2));
    c.err("slice overflows", "outside", is_shape, || t.slice_rows(usize::MAX, 1));
    c.err(
        "typed as another dtype",
        "expected bf16",
        |e| matches!(e, Error::UnsupportedDtype { .. }),
        || t.typed::<half::bf16>(),
    );
    let typed = HiddenInputs { rows: 5, ..t.typed::<f32>().unwrap() };
    c.err("typed inputs edited to a wrong row count", "real_hidden holds 12", is_shape, || {
        infopo_kernels::reference::score_hidden(0, &typed, &[0; 5], &p, 2)
    });
    for b in backends() {
        let n = b.name();
        c.err(&format!("{n}: rows first_row overflows"), "global rows overflow", is_shape, || {
            b.score_hidden_rows(usize::MAX, &t, &targets, &p, 2)
        });
        c.err(&format!("{n}: chunk 0"), "at least one token id", is_shape, || {
            b.compute_hidden(&HiddenBatch::rows(t, &targets), &p, 0)
        });
        c.err(&format!("{n}: rows chunk 0"), "at least one token id", is_shape, || {
            b.score_hidden_rows(0, &t, &targets, &p, 0)
        });
        c.err(&format!("{n}: targets short"), "3 ids for 4 rows", is_shape, || {
            b.compute_hidden(&HiddenBatch::rows(t, &targets[..3]), &p, 2)
        });
        c.err(&format!("{n}: rows targets short"), "targets", is_shape, || {
            b.score_hidden_rows(0, &t, &targets[..3], &p, 2)
        });
        for (bad, row) in [(-1i64, 0), (5, 3)] {
            let mut ids = targets.clone();
            ids[row] = bad;
            c.err(
                &format!("{n}: fused target {bad}"),
                "outside 0..vocab",
                is_row(row, RowErrorKind::TargetOutOfRange),
                || b.compute_hidden(&HiddenBatch::rows(t, &ids), &p, 2),
            );
        }
    }
    c.finish();
}

#[test]
fn vocabulary_ranges_and_merges() {
    let (real, masked, targets) = logits();
    let real_l = Logits::new(&real, 4, 5).unwrap();
    let masked_l = Logits::new(&masked, 4, 5).unwrap();
    let p = Params::default();
    let emulator = Emulated::new();
    let score = |start, len| {
        vocab::score_range(&RangeInput::of_full(real_l, masked_l, VocabRange::new(start, len)), &targets, &p)
    };
    let (a, b, all) = (score(0, 2).unwrap(), score(2, 3).unwrap(), score(0, 5).unwrap());
    let mut c = Cases::default();
    c.err("shards 0", "at least one shard", is_shape, || vocab::shard_ranges(5, 0));
    c.err("range past the columns", "outside the 5 columns", is_shape, || score(3, 3));
    c.err("range start overflows", "extends past i64::MAX", is_shape, || score(usize::MAX, 2));
    c.err("range len overflows", "extends past i64::MAX", is_shape, || score(1, usize::MAX));
    let shard = RangeInput::shard(real_l, masked_l, VocabRange::new(usize::MAX - 1, 4));
    c.err("shard of token ids past i64::MAX", "extends past i64::MAX", is_shape, || {
        vocab::score_range(&shard, &targets, &p)
    });
    c.err("range with too few targets", "3 targets do not match", is_shape, || {
        vocab::score_range(&RangeInput::of_full(real_l, masked_l, VocabRange::new(0, 5)), &targets[..3], &p)
    });
    c.err("emulated range, too few targets", "3 targets do not match", is_shape, || {
        emulator.range_states(&RangeInput::of_full(real_l, masked_l, VocabRange::new(0, 5)), &targets[..3], &p)
    });
    c.err("emulated range past the columns", "outside", is_shape, || {
        emulator.range_states(&RangeInput::of_full(real_l, masked_l, VocabRange::new(4, 2)), &targets, &p)
    });
    c.err("merge: gap", "cover [0, 2) of 4 rows, not [0, 5)", is_shape, || {
        vocab::merge(0, std::slice::from_ref(&a), &targets, 5)
    });
    c.err("merge: overlap", "must tile", is_shape, || {
        vocab::merge(0, &[a.clone(), b.clone(), all.clone()], &targets, 5)
    });
    c.err("merge: short of V", "cover [0, 5) of 4 rows, not [0, 6)", is_shape, || {
        vocab::merge(0, &[a.clone(), b.clone()], &targets, 6)
    });
    c.err("merge: no parts", "cover [0, 0)", is_shape, || vocab::merge(0, &[], &targets, 5));
    c.err("merge: V 0", "vocabulary size is 0", is_empty_vocab, || vocab::merge(0, &[], &targets, 0));
    c.err("merge: targets short", "3 targets given", is_shape, || {
        vocab::merge(0, std::slice::from_ref(&all), &targets[..3], 5)
    });
    c.err("merge: first_row overflows", "global rows overflow", is_shape, || {
        vocab::merge(usize::MAX, std::slice::from_ref(&all), &targets, 5)
    });
    c.err("merge: target out of range", "outside 0..vocab", is_row(7, RowErrorKind::TargetOutOfRange), || {
        vocab::merge(6, std::slice::from_ref(&all), &[0, 9, 0, 0], 5)
    });
    c.err("states not rows of 8", "not rows of 8", is_shape, || {
        RangeStates::from_values(VocabRange::new(0, 5), vec![0.0; 9])
    });
    c.err("kernel states not rows of 8", "not rows of 8", is_shape, || {
        RangeStates::from_kernel(VocabRange::new(0, 5), &[0.0; 7], &p)
    });
    let rows_of = |v: f64| {
        RangeStates::from_values(VocabRange::new(0, 5), [v, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0].repeat(4)).unwrap()
    };
    c.err(
        "merge: NaN maxima",
        "row 0",
        |e| matches!(e, Error::Row { row: 0, .. }),
        || vocab::merge(0, &[rows_of(f64::NAN)], &targets, 5),
    );
    let nan_sums =
        RangeStates::from_values(VocabRange::new(0, 5), [0.0, f64::NAN, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0].repeat(4))
            .unwrap();
    c.err("merge: NaN sums", "real logit is NaN", is_row(0, RowErrorKind::RealNotFinite), || {
        vocab::merge(0, &[nan_sums], &targets, 5)
    });
    // The kernel's merge mode.
    let k = emulator.range_states(&RangeInput::of_full(real_l, masked_l, VocabRange::new(0, 5)), &targets, &p).unwrap();
    c.err("kernel merge: parts 0", "at least one vocabulary range", is_shape, || {
        emulator.merge_and_finish(&k, 0, &targets, 5, None, &p)
    });
    c.err("kernel merge: states short", "range states hold 31 f32", is_shape, || {
        emulator.merge_and_finish(&k[..31], 1, &targets, 5, None, &p)
    });
    c.err("kernel merge: parts x rows overflows", "range states", is_shape, || {
        emulator.merge_and_finish(&k, usize::MAX, &targets, 5, None, &p)
    });
    c.err("kernel merge: V 0", "vocabulary size is 0", is_empty_vocab, || {
        emulator.merge_and_finish(&k, 1, &targets, 0, None, &p)
    });
    c.err("kernel merge: target out of range", "outside 0..vocab", is_row(2, RowErrorKind::TargetOutOfRange), || {
        emulator.merge_and_finish(&k, 1, &[0, 1, 5, 0], 5, None, &p)
    });
    let mut nan = k.clone();
    nan[8 + 1] = f32::NAN; // row 1's real sum
    c.err(
        "kernel merge: NaN state",
        "row 1",
        |e| matches!(e, Error::Row { row: 1, .. }),
        || emulator.merge_and_finish(&nan, 1, &targets, 5, None, &p),
    );
    let mut inf = k.clone();
    inf[16] = f32::INFINITY; // row 2's real maximum
    c.err(
        "kernel merge: +inf maximum",
        "row 2",
        |e| matches!(e, Error::Row { row: 2, .. }),
        || emulator.merge_and_finish(&inf, 1, &targets, 5, None, &p),
    );
    c.finish();
}

#[test]
fn two_stage_epilogue_inputs() {
    let layout = {
        let mut b = LayoutBuilder::new();
        let i = b.trajectory(0, 1.0, 5);
        b.turn(i, 3, 2).unwrap();
        let j = b.trajectory(0, 0.0, 5);
        b.turn(j, 1, 2).unwrap();
        b.build().unwrap().validate().unwrap()
    };
    let turns_only =
        infopo_kernels::Layout::new(4, &Turns { offsets: &[0, 4], trajectory: &[0], credit_tokens: &[1] }, None)
            .unwrap();
    let p = Params::default();
    let mut c = Cases::default();
    c.err("accumulator of other turns", "accumulator has 3 turns", is_turns, || {
        TurnAccumulator::new(3).add_rows(&layout, 0, &[1.0f32])
    });
    c.err("rows past the layout", "3..3+2 extend past the layout's 4 rows", is_turns, || {
        TurnAccumulator::for_layout(&layout).add_rows(&layout, 3, &[1.0f32, 2.0])
    });
    c.err("first_row at usize::MAX", "past the layout", is_turns, || {
        TurnAccumulator::for_layout(&layout).add_rows(&layout, usize::MAX, &[1.0f32])
    });
    c.err("merge accumulators of other turns", "cannot merge", is_turns, || {
        TurnAccumulator::new(2).merge(&TurnAccumulator::new(3))
    });
    let ragged = TurnAccumulator { sum: vec![0.0; 2], count: vec![0; 1] };
    c.err("accumulator with ragged sums and counts", "counts", is_turns, || {
        TurnAccumulator::for_layout(&layout).merge(&ragged)
    });
    c.err("ragged accumulator add_rows", "counts", is_turns, || ragged.clone().add_rows(&layout, 0, &[1.0f32]));
    c.err("info of other turns", "3 info values for 2 turns", is_turns, || {
        infopo_kernels::advantages(&[0.0; 3], &layout, &p)
    });
    c.err(
        "info NaN",
        "turn 1",
        |e| matches!(e, Error::NonFiniteTurn { turn: 1, row: None }),
        || infopo_kernels::advantages(&[0.1, f64::NAN], &layout, &p),
    );
    c.err(
        "info inf",
        "turn 0",
        |e| matches!(e, Error::NonFiniteTurn { turn: 0, .. }),
        || infopo_kernels::advantages(&[f64::INFINITY, 0.0], &layout, &p),
    );
    c.err("advantages without trajectories", "need trajectories", is_trajectories, || {
        infopo_kernels::advantages(&[0.1], &turns_only, &p)
    });
    c.finish();
}

/// What a valid zero-row batch gives on every backend: no rows, and an error only where the
/// layout needs rows it does not have.
#[test]
fn zero_rows_are_valid_and_agree() {
    let p = Params::default();
    let empty: [f32; 0] = [];
    let l = Logits::new(&empty, 0, 7).unwrap();
    let turns = Turns { offsets: &[0, 0], trajectory: &[0], credit_tokens: &[2] };
    let traj = Trajectories { group: &[3], outcome: &[1.0], tokens: &[4] };
    let outs: Vec<_> = backends()
        .iter()
        .map(|b| {
            let rows = b.compute(&Batch::rows(l, l, &[]), &p).unwrap();
            assert!(rows.rows.is_empty(), "{}", b.name());
            b.compute(&Batch::rows(l, l, &[]).with_turns(turns).with_trajectories(traj), &p).unwrap()
        })
        .collect();
    assert_eq!(outs[0].turn_info, Some(vec![0.0]));
    assert_eq!(outs[0].turn_info, outs[1].turn_info);
    assert_eq!(
        outs[0].advantages.as_ref().unwrap().trajectory_advantage,
        outs[1].advantages.as_ref().unwrap().trajectory_advantage
    );
}

/// A random small batch, often invalid in one place: shapes, targets, special logits, turn
/// offsets, trajectories, credit starts and micro-batch cuts, all from `seed`.
struct RandomCase {
    rows: usize,
    vocab: usize,
    real: Vec<f32>,
    masked: Vec<f32>,
    targets: Vec<i64>,
    offsets: Vec<u32>,
    trajectory: Vec<u32>,
    credit: Vec<u32>,
    group: Vec<u32>,
    outcome: Vec<f64>,
    tokens: Vec<u32>,
    starts: Option<Vec<u32>>,
    with_turns: bool,
    with_trajectories: bool,
    cuts: Vec<usize>,
}

fn random_case(seed: u64) -> RandomCase {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let mut rng = StdRng::seed_from_u64(seed);
    let (rows, vocab) = (rng.gen_range(0..6usize), rng.gen_range(1..7usize));
    // Each kind of fault is rare, so that most cases reach the backends' row and epilogue code.
    let value = |rng: &mut StdRng| match rng.gen_range(0..200) {
        0 => f32::NAN,
        1 => f32::NEG_INFINITY,
        2 => f32::INFINITY,
        3 => -f32::MAX,
        _ => rng.gen_range(-5.0..5.0),
    };
    let real = (0..rows * vocab).map(|_| value(&mut rng)).collect();
    let masked = (0..rows * vocab).map(|_| value(&mut rng)).collect();
    let targets = (0..rows)
        .map(|_| match rng.gen_range(0..100) {
            0 => -1,
            1 => vocab as i64,
            _ => rng.gen_range(0..vocab as i64),
        })
        .collect();
    let turns = if rows == 0 { rng.gen_range(0..3usize) } else { rng.gen_range(1..4usize) };
    let b = rng.gen_range(1..4usize);
    let mut offsets: Vec<u32> = (0..turns.saturating_sub(1)).map(|_| rng.gen_range(0..=rows as u32)).collect();
    offsets.sort_unstable();
    offsets.insert(0, 0);
    if turns > 0 {
        offsets.push(rows as u32);
    }
    if rng.gen_bool(0.05) {
        let last = offsets.len() - 1;
        offsets.swap(0, last);
    }
    if rng.gen_bool(0.05) {
        offsets.pop();
    }
    let trajectory = (0..turns)
        .map(|_| {
            let past = rng.gen_bool(0.05) as u32;
            rng.gen_range(0..b as u32 + past)
        })
        .collect();
    let credit = (0..turns).map(|_| if rng.gen_bool(0.05) { 0 } else { rng.gen_range(1..4) }).collect();
    let group = (0..b).map(|_| rng.gen_range(0..3)).collect();
    let outcome = (0..b).map(|_| if rng.gen_bool(0.03) { f64::NAN } else { rng.gen_range(0.0..1.0) }).collect();
    let tokens = (0..b).map(|_| rng.gen_range(0..14)).collect();
    let extra_start = rng.gen_bool(0.05) as usize;
    let starts = rng.gen_bool(0.4).then(|| (0..turns + extra_start).map(|_| rng.gen_range(0..6)).collect());
    let past_end = rng.gen_bool(0.05) as usize;
    let mut cuts: Vec<usize> = (0..rng.gen_range(0..3)).map(|_| rng.gen_range(0..=rows + past_end)).collect();
    if rng.gen_bool(0.95) {
        cuts.sort_unstable();
    }
    RandomCase {
        rows,
        vocab,
        real,
        masked,
        targets,
        offsets,
        trajectory,
        credit,
        group,
        outcome,
        tokens,
        starts,
        with_turns: rng.gen_bool(0.9),
        with_trajectories: rng.gen_bool(0.7),
        cuts,
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]

    /// Random small batches, valid or not in one or more places, through `compute_micro_batched`
    /// with random cuts: never a panic, and the emulated kernel fails exactly where the float64
    /// reference does, with the same error (what `infopo verify` requires).
    #[test]
    fn random_batches_fail_alike_on_every_backend(seed in proptest::prelude::any::<u64>()) {
        let c = random_case(seed);
        let real = Logits::new(&c.real, c.rows, c.vocab).unwrap();
        let masked = Logits::new(&c.masked, c.rows, c.vocab).unwrap();
        let mut batch = Batch::rows(real, masked, &c.targets);
        if c.with_turns {
            batch = batch.with_turns(Turns { offsets: &c.offsets, trajectory: &c.trajectory, credit_tokens: &c.credit });
        }
        if c.with_trajectories {
            batch = batch.with_trajectories(Trajectories { group: &c.group, outcome: &c.outcome, tokens: &c.tokens });
        }
        batch.credit_start = c.starts.as_deref();
        let p = Params::default();
        let results: Vec<_> = backends()
            .iter()
            .map(|b| catch_unwind(AssertUnwindSafe(|| b.compute_micro_batched(&batch, &p, &c.cuts))).map_err(|_| b.name()))
            .collect();
        match (&results[0], &results[1]) {
            (Err(name), _) | (_, Err(name)) => proptest::prop_assert!(false, "{} panicked", name),
            (Ok(Ok(_)), Ok(Ok(_))) => {}
            (Ok(Err(a)), Ok(Err(b))) => proptest::prop_assert_eq!(a.to_string(), b.to_string()),
            (Ok(a), Ok(b)) => proptest::prop_assert!(false, "cpu {:?} but emulated {:?}", a.as_ref().err(), b.as_ref().err()),
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]

    /// Random sets of vocabulary ranges (gaps, overlaps, duplicates, empty ranges, any order)
    /// merged by `vocab::merge`: a shape error exactly when the sorted ranges do not tile
    /// [0, V), else the unsplit reference's rows; never a panic.
    #[test]
    fn random_range_sets_merge_or_fail_cleanly(
        vocab in 1usize..9,
        ranges in proptest::collection::vec((0usize..10, 0usize..5), 0..5),
    ) {
        let rows = 3;
        let real: Vec<f32> = (0..rows * 12).map(|i| (i as f32 * 0.7).sin()).collect();
        let masked: Vec<f32> = (0..rows * 12).map(|i| (i as f32 * 0.3).cos()).collect();
        let targets = [0i64, vocab as i64 - 1, (vocab / 2) as i64];
        let p = Params::default();
        let (real, masked) = (Logits::new(&real, rows, 12).unwrap(), Logits::new(&masked, rows, 12).unwrap());
        let parts: Vec<RangeStates> = ranges
            .iter()
            .map(|&(start, len)| {
                vocab::score_range(&RangeInput::of_full(real, masked, VocabRange::new(start, len.min(12 - start.min(12)))), &targets, &p)
            })
            .collect::<Result<_, _>>()
            .unwrap();
        let mut sorted: Vec<VocabRange> = parts.iter().map(|p| p.range()).collect();
        sorted.sort_by_key(|r| (r.start, r.len));
        let mut covered = 0;
        let tiles = sorted.iter().all(|r| {
            let ok = r.start == covered;
            covered = r.end();
            ok
        }) && covered == vocab;
        let merged = vocab::merge(0, &parts, &targets, vocab);
        match merged {
            Ok(_) => proptest::prop_assert!(tiles, "{:?} do not tile [0, {}) but merged", sorted, vocab),
            Err(Error::Shape { .. }) => proptest::prop_assert!(!tiles, "{:?} tile [0, {}) but failed", sorted, vocab),
            Err(e) => proptest::prop_assert!(false, "unexpected {:?}", e),
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { failure_persistence: None, ..Default::default() })]

    /// Range states of any values (NaN, ±inf, huge, negative sums: what a corrupted all-gather
    /// would deliver) through the kernel's merge mode and the float64 merge: any result, a row
    /// error at worst, never a panic or an out-of-bounds access.
    #[test]
    fn garbage_range_states_never_panic(
        parts in 1usize..4,
        values in proptest::collection::vec(
            proptest::prop_oneof![
                proptest::num::f32::ANY,
                proptest::prelude::Just(f32::NAN),
                proptest::prelude::Just(f32::INFINITY),
                proptest::prelude::Just(-f32::MAX),
                -10.0f32..10.0,
            ],
            24,
        ),
    ) {
        let rows = 24 / 8 / parts.min(3);
        let states = &values[..parts * rows * 8];
        let targets: Vec<i64> = (0..rows as i64).collect();
        let p = Params::default();
        let _ = Emulated::new().merge_and_finish(states, parts, &targets, 5, None, &p);
        let split: Vec<RangeStates> = states
            .chunks(rows * 8)
            .enumerate()
            .map(|(k, s)| RangeStates::from_kernel(VocabRange::new(k * 2, if k + 1 == parts { 5 - 2 * k } else { 2 }), s, &p).unwrap())
            .collect();
        let _ = vocab::merge(0, &split, &targets, 5);
    }
}

/// Every mistake a conversation can hold is a typed error naming the trajectory and agent turn:
/// feedback no agent turn follows, more rows than the next turn has, out of row order or twice,
/// to an empty turn or no trajectory; per-turn rewards of the wrong length or non-finite; γ out of
/// [0, 1]; more agent tokens than u32 holds.
#[test]
fn conversation_rejects_what_cannot_be_scored() {
    use infopo_kernels::{Conversation, TrajectoryScore};
    let mut c = Cases::default();
    let base = || {
        let mut conv = Conversation::new();
        conv.trajectory(0, 1.0, &[3, 0, 4]);
        conv.trajectory(0, 0.0, &[2, 5]);
        conv
    };
    type Step = fn(&mut Conversation) -> infopo_kernels::Result<()>;
    let turn_cases: [(&str, &str, Step); 7] = [
        ("after the last agent turn", "trajectory 1's agent turn 1 cannot be scored", |v| v.feedback(1, 1).map(drop)),
        ("far past the last turn", "trajectory 0's agent turn 4294967295 cannot be scored", |v| {
            v.feedback(0, u32::MAX).map(drop)
        }),
        ("more rows than the next turn", "scores 6 rows, but agent turn 1 has 5 tokens", |v| {
            v.feedback_rows(1, 0, 6).map(drop)
        }),
        ("no trajectory", "but 2 trajectories were added", |v| v.feedback(2, 0).map(drop)),
        ("an empty credited turn", "agent turn 1 has 0 tokens", |v| v.feedback(0, 1).map(drop)),
        ("out of row order", "add feedback in row order", |v| v.feedback(1, 0)?.feedback(0, 0).map(drop)),
        ("twice", "add feedback in row order", |v| v.feedback(0, 0)?.feedback(0, 0).map(drop)),
    ];
    for (label, needle, step) in turn_cases {
        c.err(label, needle, is_turns, || step(&mut base()));
    }
    let rewarded = |turns: &[u32], rewards: &[f64], score| Conversation::new().rewarded(0, turns, rewards, score);
    let sum = TrajectoryScore::Sum;
    c.err("rewards of the wrong length", "2 agent turns but 3 per-turn rewards", is_trajectories, || {
        rewarded(&[1, 2], &[0.0, 1.0, 1.0], sum)
    });
    for bad in [f64::NAN, f64::INFINITY] {
        c.err("a non-finite reward", "agent turn 1 has a non-finite reward", is_trajectories, || {
            rewarded(&[1, 2], &[0.0, bad], sum)
        });
    }
    for gamma in [-0.1, 1.5, f64::NAN] {
        c.err("γ out of [0, 1]", "invalid parameter gamma", is_param("gamma"), || {
            rewarded(&[1, 2], &[0.0, 1.0], TrajectoryScore::RewardToGo { gamma })
        });
    }
    c.err("too many agent tokens", "trajectory 0's agent tokens exceed 2^32 - 1", is_trajectories, || {
        let mut v = Conversation::new();
        v.trajectory(0, 1.0, &[u32::MAX, 1]);
        v.build()
    });
    c.err("a batch of 1 agent token", "need at least 2", is_trajectories, || {
        let mut v = Conversation::new();
        v.trajectory(0, 1.0, &[1]);
        v.build()
    });
    c.finish();
}
