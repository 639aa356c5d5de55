//! `validate::Layout` has public fields, so a layout can be built or edited by hand and handed
//! to the paths that take one directly: `CudaBackend::upload_layout` (the device epilogue),
//! `Emulated::merge_range_states` (the emulated kernel, host memory) and
//! `epilogue::advantages` (the CPU epilogue). Each indexes buffers with every offset and id of
//! the layout, so each must refuse an inconsistent one with a typed error
//! (`validate::layout_consistent`) instead of reading or writing out of bounds or panicking.
//! The CUDA upload runs the same check (`tests/cuda_kernel.rs` covers it on a GPU).

mod common;

use common::random_layout;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::epilogue::advantages;
use infopo_kernels::synth::Rng;
use infopo_kernels::validate::{self, Layout};
use infopo_kernels::{Error, Params, Trajectories, Turns};

/// A validated layout over `rows` rows with trajectories and, with `spans`, credit starts that
/// put each trajectory's credited spans back to back from token 0.
fn validated(rng: &mut Rng, rows: usize, turns: usize, trajectories: usize, spans: bool) -> Layout {
    let l = random_layout(rng, rows, turns, trajectories, 3);
    let turns_in = Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit };
    let traj = Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens };
    let mut out = validate::layout(rows, &turns_in, Some(&traj)).unwrap();
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
        validate::credit_spans(&mut out, &starts).unwrap();
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
        validate::layout_consistent(&l).unwrap_or_else(|e| panic!("case {case}: {e}\n{l:?}"));
        // Turns only (no trajectories) too.
        let turns_only = Layout { groups: None, ..l };
        validate::layout_consistent(&turns_only).unwrap();
    }
}

/// One hand edit of a valid layout, named for the failure message.
type Edit = (&'static str, fn(&mut Layout));

fn edits() -> Vec<Edit> {
    fn g(l: &mut Layout) -> &mut validate::GroupLayout {
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
        advantages(&info, &good, &params).unwrap();
        let (vocab, parts) = (5usize, 2usize);
        let states = vec![0f32; parts * rows * 8];
        let targets = vec![1i64; rows];
        for (what, edit) in edits() {
            let mut bad = good.clone();
            edit(&mut bad);
            assert_ne!(bad, good, "{what}: the edit changed nothing");
            let err = validate::layout_consistent(&bad).expect_err(what);
            assert!(
                matches!(err, Error::Turns { .. } | Error::Trajectories { .. } | Error::CreditSpan { .. }),
                "{what}: {err:?}"
            );
            let err = advantages(&info, &bad, &params).expect_err(what);
            assert!(!matches!(err, Error::Row { .. }), "{what}: {err:?}");
            let err =
                emulated.merge_range_states(&states, parts, &targets, vocab, Some(&bad), &params).expect_err(what);
            assert!(!matches!(err, Error::Row { .. }), "{what}: {err:?}");
        }
    }
}
