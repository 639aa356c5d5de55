//! A `Layout` has public fields, so a trainer can build or edit one by hand and hand it
//! to the two-stage epilogue (`advantages`), the kernels' merge mode
//! (`Emulated::merge_and_finish`, `Emulated::compute_hidden_typed`) or the CUDA layout upload,
//! whose kernels index memory through every one of its arrays. Each inconsistent layout must be
//! a typed error there, never a panic or an out-of-bounds access; the layout `Layout::new`
//! builds is accepted.

use crate::common;

use common::random_layout;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::synth::Rng;
use infopo_kernels::vocab::{RangeInput, VocabRange};
use infopo_kernels::HiddenInputs;
use infopo_kernels::Layout;
use infopo_kernels::{Error, Logits, Params, Trajectories, Turns};
use std::panic::{catch_unwind, AssertUnwindSafe};

const ROWS: usize = 6;
const VOCAB: usize = 7;

/// 6 rows in 3 turns of 2 trajectories (groups 5 and 3, so the dense ids matter), with credit
/// starts and a padded output of width 8: the layout `validate` builds.
fn valid_layout() -> Layout {
    let turns = Turns { offsets: &[0, 2, 3, 6], trajectory: &[0, 1, 1], credit_tokens: &[2, 1, 3] };
    let trajectories = Trajectories { group: &[5, 3], outcome: &[1.0, 0.25], tokens: &[4, 6] };
    let mut layout = infopo_kernels::Layout::new(ROWS, &turns, Some(&trajectories)).unwrap();
    layout = layout.with_credit_start(&[1, 0, 2]).unwrap();
    layout.with_padding(infopo_kernels::Padding { width: 8, offset: Some(&[4, 2]) }).unwrap()
}

/// Hand edits of the valid layout, each breaking one invariant the epilogues rely on.
fn broken_layouts() -> Vec<(&'static str, Layout)> {
    let edit = |f: fn(&mut Layout)| {
        let mut l = valid_layout();
        f(&mut l);
        l
    };
    vec![
        ("no turn offsets", edit(|l| l.turn_offsets.clear())),
        ("decreasing turn offsets", edit(|l| l.turn_offsets = vec![0, 3, 2, 6])),
        ("turn offsets past the rows", edit(|l| l.turn_offsets = vec![0, 2, 3, 9])),
        ("a turn of a missing trajectory", edit(|l| l.turn_trajectory[2] = 9)),
        ("credits missing", edit(|l| l.turn_credit.truncate(2))),
        ("a zero credit", edit(|l| l.turn_credit[0] = 0)),
        ("no group offsets", edit(|l| l.groups.as_mut().unwrap().group_trajectory_offsets.clear())),
        ("group offsets past the list", edit(|l| l.groups.as_mut().unwrap().group_trajectory_offsets = vec![0, 1, 9])),
        ("a group member out of range", edit(|l| l.groups.as_mut().unwrap().group_trajectories[0] = 99)),
        ("a group turn out of range", edit(|l| l.groups.as_mut().unwrap().group_turns[1] = 1_000_000)),
        ("group turn offsets past the list", edit(|l| l.groups.as_mut().unwrap().group_turn_offsets = vec![0, 1, 50])),
        ("a group id out of range", edit(|l| l.groups.as_mut().unwrap().trajectory_group[1] = 7)),
        ("group ids not in first-appearance order", edit(|l| l.groups.as_mut().unwrap().trajectory_group = vec![1, 0])),
        (
            "a trajectory outcome missing",
            edit(|l| l.groups.as_mut().unwrap().trajectory_outcome.pop().map(drop).unwrap()),
        ),
        ("a NaN outcome", edit(|l| l.groups.as_mut().unwrap().trajectory_outcome[0] = f64::NAN)),
        ("trajectory tokens below the credits", edit(|l| l.groups.as_mut().unwrap().trajectory_tokens[0] = 1)),
        ("a total token count too large", edit(|l| l.groups.as_mut().unwrap().total_tokens = 1 << 40)),
        ("token offsets not the prefix sums", edit(|l| l.groups.as_mut().unwrap().trajectory_token_offsets[1] = 9)),
        ("token offsets missing", edit(|l| l.groups.as_mut().unwrap().trajectory_token_offsets.truncate(1))),
        (
            "a credit span past its trajectory",
            edit(|l| l.groups.as_mut().unwrap().turn_credit_start.as_mut().unwrap()[2] = 4),
        ),
        ("credit starts missing", edit(|l| l.groups.as_mut().unwrap().turn_credit_start.as_mut().unwrap().truncate(1))),
        ("overlapping credit spans", edit(|l| l.groups.as_mut().unwrap().turn_credit_start.as_mut().unwrap()[1] = 2)),
        ("a padded width a trajectory does not fit", edit(|l| l.groups.as_mut().unwrap().pad_width = Some(7))),
        ("a pad offset past the width", edit(|l| l.groups.as_mut().unwrap().pad_offset[1] = 3)),
        ("pad offsets missing", edit(|l| l.groups.as_mut().unwrap().pad_offset.truncate(1))),
        ("pad offsets without a width", edit(|l| l.groups.as_mut().unwrap().pad_width = None)),
        ("padding without credit starts", edit(|l| l.groups.as_mut().unwrap().turn_credit_start = None)),
    ]
}

fn inputs() -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let real: Vec<f32> = (0..ROWS * VOCAB).map(|i| (i as f32 * 0.31).sin() * 2.0).collect();
    let masked: Vec<f32> = (0..ROWS * VOCAB).map(|i| (i as f32 * 0.17).cos()).collect();
    (real, masked, vec![0, 6, 3, 2, 1, 5])
}

/// `run` on every broken layout (but those labelled in `skip`) must be an `Error::Turns` or
/// `Error::Trajectories` (or `Error::CreditSpan`), not a panic and not `Ok`.
fn rejects_every_broken_layout(what: &str, skip: &[&str], run: impl Fn(&Layout) -> infopo_kernels::Result<()>) {
    let mut failures = Vec::new();
    for (label, layout) in broken_layouts().into_iter().filter(|(label, _)| !skip.contains(label)) {
        match catch_unwind(AssertUnwindSafe(|| run(&layout))) {
            Err(_) => failures.push(format!("{label}: panicked")),
            Ok(Ok(())) => failures.push(format!("{label}: accepted")),
            Ok(Err(Error::Turns { .. } | Error::Trajectories { .. } | Error::CreditSpan { .. })) => {}
            Ok(Err(e)) => failures.push(format!("{label}: unexpected error {e:?}")),
        }
    }
    assert!(failures.is_empty(), "{what}:\n{}", failures.join("\n"));
    run(&valid_layout()).unwrap_or_else(|e| panic!("{what}: the valid layout is rejected: {e}"));
}

#[test]
fn two_stage_advantages_reject_inconsistent_layouts() {
    let info = [0.3, -0.2, 0.5];
    // The epilogue sees no rows: a layout of 9 rows is consistent in itself.
    rejects_every_broken_layout("epilogue::advantages", &["turn offsets past the rows"], |l| {
        infopo_kernels::advantages(&info, l, &Params::default()).map(drop)
    });
    // The message says what to do.
    let mut l = valid_layout();
    l.groups.as_mut().unwrap().group_trajectories[0] = 99;
    let e = infopo_kernels::advantages(&info, &l, &Params::default()).unwrap_err();
    assert!(e.to_string().contains("Layout::new"), "{e}");
}

#[test]
fn kernel_merge_mode_rejects_inconsistent_layouts() {
    let (real, masked, targets) = inputs();
    let (real, masked) = (Logits::new(&real, ROWS, VOCAB).unwrap(), Logits::new(&masked, ROWS, VOCAB).unwrap());
    let params = Params::default();
    let emulator = Emulated::new();
    let input = RangeInput::of_full(real, masked, VocabRange::new(0, VOCAB));
    let states = emulator.range_states(&input, &targets, &params).unwrap();
    rejects_every_broken_layout("Emulated::merge_range_states", &[], |l| {
        emulator.merge_and_finish(&states, 1, &targets, VOCAB, Some(l), &params).map(drop)
    });
}

#[test]
fn emulated_fused_path_rejects_inconsistent_layouts() {
    let hidden: Vec<f32> = (0..ROWS * 3).map(|i| (i as f32 * 0.7).sin()).collect();
    let head: Vec<f32> = (0..VOCAB * 3).map(|i| (i as f32 * 0.3).cos()).collect();
    let (_, _, targets) = inputs();
    let inputs = HiddenInputs {
        real_hidden: &hidden[..],
        masked_hidden: &hidden[..],
        lm_head: &head[..],
        rows: ROWS,
        hidden: 3,
        vocab: VOCAB,
    };
    let emulator = Emulated::new();
    rejects_every_broken_layout("Emulated::compute_hidden_typed", &[], |l| {
        emulator.compute_hidden_typed(0, &inputs, &targets, Some(l), &Params::default(), 4).map(drop)
    });
}

// Random layouts: every one validate builds passes, and each of 21 hand edits (every array of
// the layout, its derived fields included) is refused by the check and by each path.

/// A validated layout over `rows` rows with trajectories and, with `spans`, credit starts that
/// put each trajectory's credited spans back to back from token 0.
fn validated(rng: &mut Rng, rows: usize, turns: usize, trajectories: usize, spans: bool) -> Layout {
    let l = random_layout(rng, rows, turns, trajectories, 3);
    let turns_in = Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit };
    let traj = Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens };
    let mut out = infopo_kernels::Layout::new(rows, &turns_in, Some(&traj)).unwrap();
    if spans {
        let mut next = vec![0u32; trajectories];
        let starts: Vec<u32> = (0..turns)
            .map(|t| {
                let i = l.turn_traj[t] as usize;
                let s = next[i];
                next[i] += l.credit[t];
                s
            })
            .collect();
        out = out.with_credit_start(&starts).unwrap();
    }
    out
}

#[test]
fn validated_layouts_are_consistent() {
    let mut rng = Rng::new(5);
    for case in 0..200 {
        let rows = rng.below(40) as usize;
        let turns = 1 + rng.below(12) as usize;
        let trajectories = 1 + rng.below(6) as usize;
        let l = validated(&mut rng, rows, turns, trajectories, case % 2 == 0);
        l.check().unwrap_or_else(|e| panic!("case {case}: {e}\n{l:?}"));
        // Turns only (no trajectories) too.
        let turns_only = Layout { groups: None, ..l };
        turns_only.check().unwrap();
    }
}

/// One hand edit of a valid layout, named for the failure message.
type Edit = (&'static str, fn(&mut Layout));

fn edits() -> Vec<Edit> {
    fn g(l: &mut Layout) -> &mut infopo_kernels::GroupLayout {
        l.groups.as_mut().unwrap()
    }
    vec![
        ("turn_offsets one short", |l| {
            l.turn_offsets.pop();
        }),
        ("turn_offsets emptied", |l| l.turn_offsets.clear()),
        ("turn_offsets decreasing", |l| {
            let n = l.turn_offsets.len();
            l.turn_offsets[n - 2] = l.turn_offsets[n - 1] + 1;
        }),
        ("turn_trajectory past B", |l| l.turn_trajectory[0] = g(l).trajectory_group.len() as u32),
        ("turn_credit one short", |l| {
            l.turn_credit.pop();
        }),
        ("turn_credit 0", |l| l.turn_credit[0] = 0),
        ("group_trajectory_offsets emptied", |l| g(l).group_trajectory_offsets.clear()),
        ("group_trajectory_offsets past the list", |l| *g(l).group_trajectory_offsets.last_mut().unwrap() += 5),
        ("group_trajectories past B", |l| g(l).group_trajectories[0] = 1000),
        ("group_trajectories one short", |l| {
            g(l).group_trajectories.pop();
        }),
        ("group_turn_offsets past the list", |l| *g(l).group_turn_offsets.last_mut().unwrap() += 3),
        ("group_turns past T", |l| g(l).group_turns[0] = 1000),
        ("group_turns repeating a turn", |l| {
            let gt = &mut g(l).group_turns;
            gt[1] = gt[0];
        }),
        ("trajectory_group not dense", |l| g(l).trajectory_group[0] = 77),
        ("trajectory_outcome one short", |l| {
            g(l).trajectory_outcome.pop();
        }),
        ("trajectory_outcome NaN", |l| g(l).trajectory_outcome[0] = f64::NAN),
        ("trajectory_tokens one short", |l| {
            g(l).trajectory_tokens.pop();
        }),
        ("total_tokens off", |l| g(l).total_tokens += 1),
        ("trajectory_token_offsets past M", |l| *g(l).trajectory_token_offsets.last_mut().unwrap() += 1000),
        ("turn_credit_start one short", |l| {
            g(l).turn_credit_start.as_mut().unwrap().pop();
        }),
        ("turn_credit_start past the tokens", |l| g(l).turn_credit_start.as_mut().unwrap()[0] = 1 << 30),
    ]
}

#[test]
fn hand_edited_layouts_are_typed_errors_on_every_path() {
    let emulated = Emulated::new();
    let params = Params::default();
    let mut rng = Rng::new(11);
    for case in 0..8 {
        // At least 2 turns, 2 trajectories and a row per turn, so every edit above applies.
        let (rows, turns, trajectories) = (12 + case, 4 + case % 3, 2 + case % 3);
        let good = validated(&mut rng, rows, turns, trajectories, true);
        let info = vec![0.25; turns];
        infopo_kernels::advantages(&info, &good, &params).unwrap();
        let (vocab, parts) = (5usize, 2usize);
        let states = vec![0f32; parts * rows * 8];
        let targets = vec![1i64; rows];
        for (what, edit) in edits() {
            let mut bad = good.clone();
            edit(&mut bad);
            assert_ne!(bad, good, "{what}: the edit changed nothing");
            let err = bad.check().expect_err(what);
            assert!(
                matches!(err, Error::Turns { .. } | Error::Trajectories { .. } | Error::CreditSpan { .. }),
                "{what}: {err:?}"
            );
            let err = infopo_kernels::advantages(&info, &bad, &params).expect_err(what);
            assert!(!matches!(err, Error::Row { .. }), "{what}: {err:?}");
            let err = emulated.merge_and_finish(&states, parts, &targets, vocab, Some(&bad), &params).expect_err(what);
            assert!(!matches!(err, Error::Row { .. }), "{what}: {err:?}");
        }
    }
}
