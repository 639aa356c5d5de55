//! The emulated kernel's cross-block protocols (split-row tickets and partials, the grid ticket
//! electing the epilogue block, self-cleaning tickets, the grid-stride loop) in the paths a
//! default serial launch never takes:
//! - several blocks at once with random yields (`Emulated::concurrent`), repeated, must give
//!   the serial run's outputs bit for bit, every output;
//! - a capped grid (`Emulated::with_grid_cap`, items > grid) runs the grid-stride loop: the
//!   float64 oracle agrees and the outputs equal the uncapped run's bit for bit;
//! - split rows (S > 1) with turns, groups and the epilogue, in one batch and micro-batched;
//! - the partial-state mode (`Emulated::range_states`) of split rows over uneven
//!   vocabulary ranges: its states equal the serial ones bit for bit;
//! - the merge mode (`Emulated::merge_range_states`) with turns, groups, token advantages and
//!   the epilogue elected by the grid ticket: every output equals the serial run's bit for bit.
//!
//! `scripts/tsan` runs these under ThreadSanitizer, where a missing fence or an early read is
//! a report (kernels/emulator.h says what the mapping can and cannot catch).

#[path = "../common/mod.rs"]
mod common;

use common::kernel::{check_epilogue, compare_rows, epilogue_feed, generate, layout, Layout, Spec};
use common::{assert_close, to_dtype, to_f64};
use half::bf16;
use infopo_kernels::emulated::{Emulated, MAX_BLOCKS_AT_ONCE};
use infopo_kernels::vocab::{merge_outputs, RangeInput, RangeStates, VocabRange};
use infopo_kernels::{Backend, Batch, Dtype, Error, Estimator, Logits, Output, Params};

/// Every output of a call as bits: the five row values, turn info and every advantage output.
fn output_bits(o: &Output) -> Vec<u64> {
    let rows = [&o.rows.lse_real, &o.rows.lse_masked, &o.rows.log_ratio, &o.rows.kl, &o.rows.entropy_real];
    let mut bits: Vec<u64> = rows.iter().flat_map(|v| v.iter().map(|x| x.to_bits() as u64)).collect();
    if let Some(info) = &o.turn_info {
        bits.extend(info.iter().map(|x| x.to_bits()));
    }
    if let Some(a) = &o.advantages {
        for v in [&a.turn_intrinsic, &a.turn_intrinsic_norm, &a.turn_bonus, &a.trajectory_advantage, &a.trajectory_gate]
        {
            bits.extend(v.iter().map(|x| x.to_bits()));
        }
        bits.extend([a.outcome_std, a.intrinsic_std, a.magnitude_ratio].map(f64::to_bits));
    }
    bits
}

/// 3 rows over 3 turns (the middle one empty) of 3 trajectories in 2 groups.
fn three_row_layout() -> Layout {
    Layout {
        offsets: vec![0, 1, 1, 3],
        trajectory: vec![0, 1, 2],
        credit: vec![2, 1, 3],
        group: vec![7, 7, 9],
        outcome: vec![1.0, 0.0, 0.5],
        tokens: vec![4, 6, 3],
    }
}

/// bf16 logits of `n` rows of `v` and their targets.
fn data(n: usize, v: usize, seed: u64) -> (Vec<bf16>, Vec<bf16>, Vec<i64>) {
    let (r, m, t) = generate(&Spec::new(n, v), seed);
    (to_dtype(&r), to_dtype(&m), t)
}

/// (what, batch, params, micro-batch cuts, repetitions per configuration)
type Case<'a> = (&'a str, &'a Batch<'a>, &'a Params, Option<&'a [usize]>, u32);

/// One call (micro-batched at `cuts` when given).
fn run(b: &dyn Backend, batch: &Batch<'_>, params: &Params, cuts: Option<&[usize]>) -> Output {
    match cuts {
        Some(c) => b.compute_micro_batched(batch, params, c),
        None => b.compute(batch, params),
    }
    .unwrap_or_else(|e| panic!("{}: {e}", b.name()))
}

#[test]
fn concurrency_is_validated() {
    for bad in [0, MAX_BLOCKS_AT_ONCE + 1] {
        assert!(matches!(Emulated::concurrent(bad, 1), Err(Error::Param { name: "blocks_at_once", .. })));
    }
}

/// Concurrent runs (2, 3 and 4 blocks at once, a seed each, uncapped and capped grids,
/// repeated) equal the serial run bit for bit on every output: split rows with turns and groups
/// (one batch and micro-batched, so the epilogue also runs in a rows-free final launch), and
/// many one-block rows racing for the grid ticket.
#[test]
fn concurrent_runs_equal_serial_bitwise() {
    let serial = Emulated::new();
    let v = 50_257;
    let big = three_row_layout();
    let (br, bm, bt) = data(3, v, 81);
    let split = Batch::rows(Logits::new(&br, 3, v).unwrap(), Logits::new(&bm, 3, v).unwrap(), &bt)
        .with_turns(big.turns())
        .with_trajectories(big.trajectories());
    assert!(serial.shape(1, v, Dtype::BF16).splits > 1 && serial.shape(3, v, Dtype::BF16).splits > 1);
    let small = layout();
    let (sr, sm, st) = data(64, 31, 82);
    let many = Batch::rows(Logits::new(&sr, 64, 31).unwrap(), Logits::new(&sm, 64, 31).unwrap(), &st)
        .with_turns(small.turns())
        .with_trajectories(small.trajectories());
    let kl = Params { estimator: Estimator::Kl, ..Params::default() };
    let cases: [Case<'_>; 4] = [
        ("3 x 50257 split rows", &split, &kl, None, 1),
        ("3 x 50257 micro-batched", &split, &Params::default(), Some(&[1, 3, 3]), 1),
        ("64 x 31 turns and groups", &many, &Params::default(), None, 3),
        ("64 x 31 micro-batched", &many, &kl, Some(&[7, 18, 18, 33, 64]), 3),
    ];
    for (what, batch, params, cuts, reps) in cases {
        let want = output_bits(&run(&serial, batch, params, cuts));
        for (k, seed) in [(2u32, 11u64), (3, 12), (4, 13)] {
            let backends =
                [Emulated::concurrent(k, seed).unwrap(), Emulated::concurrent(k, seed).unwrap().with_grid_cap(5)];
            for (i, b) in backends.iter().enumerate() {
                for rep in 0..reps {
                    let got = output_bits(&run(b, batch, params, cuts));
                    assert!(
                        got == want,
                        "{what}: {k} blocks at once, seed {seed}, capped {}, repetition {rep}",
                        i == 1
                    );
                }
            }
        }
    }
}

/// items > grid: the grid-stride loop gives the oracle's rows and epilogue, and the uncapped
/// run's outputs bit for bit (the reductions' shape does not depend on the grid).
#[test]
fn grid_stride_loop_matches_oracle_and_uncapped() {
    let uncapped = Emulated::new();
    // Split rows, no turns (f32, 3 rows: several splits each).
    let (r, m, t) = generate(&Spec::new(3, 50_257), 91);
    let batch = Batch::rows(Logits::new(&r, 3, 50_257).unwrap(), Logits::new(&m, 3, 50_257).unwrap(), &t);
    let want = output_bits(&uncapped.compute(&batch, &Params::default()).unwrap());
    for cap in [1u32, 4, 7] {
        let b = Emulated::new().with_grid_cap(cap);
        let shape = b.shape(3, 50_257, Dtype::F32);
        assert!(shape.grid == cap && (shape.grid as u64) < 3 * shape.splits as u64, "{shape:?}");
        let out = b.compute(&batch, &Params::default()).unwrap();
        let (rf, mf) = (common::f32s(&r), common::f32s(&m));
        compare_rows(&out.rows, &rf, &mf, &t, 50_257, 1.0, &format!("grid cap {cap}"));
        assert!(output_bits(&out) == want, "grid cap {cap}: not the uncapped bits");
    }
    // One block per row, turns and groups: rows, turns and advantages, one batch and cut.
    let l = layout();
    let (r, m, t) = data(64, 5000, 92);
    let (rf, mf) = (to_f64(&r), to_f64(&m));
    let batch = Batch::rows(Logits::new(&r, 64, 5000).unwrap(), Logits::new(&m, 64, 5000).unwrap(), &t)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    for params in [Params::default(), Params { estimator: Estimator::Kl, ..Params::default() }] {
        for cuts in [None, Some(&[7usize, 18, 18, 33, 64][..])] {
            let want = output_bits(&run(&uncapped, &batch, &params, cuts));
            for cap in [1u32, 5] {
                let b = Emulated::new().with_grid_cap(cap);
                assert!(b.shape(64, 5000, Dtype::BF16).grid == cap);
                let out = run(&b, &batch, &params, cuts);
                compare_rows(&out.rows, &rf, &mf, &t, 5000, 1.0, &format!("grid cap {cap}, cuts {cuts:?}"));
                let est = epilogue_feed(&b, &out, params.estimator, &rf, &mf, &t, 1.0);
                check_epilogue(&out, &est, &l.turns(), &l.trajectories(), &params);
                assert!(output_bits(&out) == want, "grid cap {cap}, cuts {cuts:?}: not the uncapped bits");
            }
        }
    }
}

/// Split rows (S > 1) combined with turns, groups and the epilogue: 3 rows of V = 151936,
/// one batch and micro-batched, concurrent, against the oracle; the micro-batched rows equal
/// the one-batch rows bit for bit (every launch splits a row the same way).
#[test]
fn split_rows_with_turns_groups_and_epilogue() {
    let l = three_row_layout();
    let v = 151_936;
    let (r, m, t) = data(3, v, 93);
    let (rf, mf) = (to_f64(&r), to_f64(&m));
    let batch = Batch::rows(Logits::new(&r, 3, v).unwrap(), Logits::new(&m, 3, v).unwrap(), &t)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    let b = Emulated::concurrent(3, 7).unwrap();
    for n in [1usize, 2, 3] {
        assert!(b.shape(n, v, Dtype::BF16).splits == b.shape(3, v, Dtype::BF16).splits, "same splits for {n} rows");
    }
    assert!(b.shape(3, v, Dtype::BF16).splits > 1);
    for params in [Params::default(), Params { estimator: Estimator::Kl, normalize: false, ..Params::default() }] {
        let one = b.compute(&batch, &params).unwrap();
        let micro = b.compute_micro_batched(&batch, &params, &[1, 1, 3]).unwrap();
        for (what, out) in [("one batch", &one), ("micro-batched", &micro)] {
            compare_rows(&out.rows, &rf, &mf, &t, v, 1.0, what);
            let est = epilogue_feed(&b, out, params.estimator, &rf, &mf, &t, 1.0);
            check_epilogue(out, &est, &l.turns(), &l.trajectories(), &params);
        }
        assert!(
            output_bits(&Output { turn_info: None, advantages: None, ..one.clone() })
                == output_bits(&Output { turn_info: None, advantages: None, ..micro.clone() })
        );
        let (x, y) = (one.advantages.as_ref().unwrap(), micro.advantages.as_ref().unwrap());
        assert_close("turn_bonus", &y.turn_bonus, &x.turn_bonus, 1e-12, 1e-12);
    }
}

/// Partial-state mode with split rows (3 rows of V = 32003 in 3 uneven ranges, each range's rows
/// split over 2 or 3 blocks): 2, 3 and 4 blocks at once, uncapped and capped grids, repeated,
/// give every range's `[N, 8]` states bit for bit as the serial launch does (the split-row
/// tickets and partials feed `state_out` instead of the row outputs), and the merged serial
/// states give the oracle's rows.
#[test]
fn partial_states_concurrent_equal_serial_bitwise() {
    let (n, v) = (3usize, 32_003usize);
    let (r, m, t) = data(n, v, 94);
    let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
    let ranges = [VocabRange::new(0, 13_000), VocabRange::new(13_000, 8_300), VocabRange::new(21_300, 10_703)];
    let params = Params { temperature: 0.8, ..Params::default() };
    let serial = Emulated::new();
    let states = |b: &Emulated, range: VocabRange| -> Vec<u32> {
        let raw = b.range_states(&RangeInput::of_full(real, masked, range), &t, &params).unwrap();
        raw.iter().map(|x| x.to_bits()).collect()
    };
    let mut parts = Vec::new();
    for &range in &ranges {
        assert!(serial.shape(n, range.len, Dtype::BF16).splits > 1, "{range:?}: rows must be split");
        let want = states(&serial, range);
        for (k, seed) in [(2u32, 21u64), (3, 22), (4, 23)] {
            let backends =
                [Emulated::concurrent(k, seed).unwrap(), Emulated::concurrent(k, seed).unwrap().with_grid_cap(3)];
            for (i, b) in backends.iter().enumerate() {
                for rep in 0..2 {
                    assert!(
                        states(b, range) == want,
                        "{range:?}: {k} blocks at once, seed {seed}, capped {}, repetition {rep}",
                        i == 1
                    );
                }
            }
        }
        let raw: Vec<f32> = want.iter().map(|&x| f32::from_bits(x)).collect();
        parts.push(RangeStates::from_kernel(range, &raw, &params).unwrap());
    }
    let out = merge_outputs(0, &parts, &t, v).unwrap();
    compare_rows(&out, &to_f64(&r), &to_f64(&m), &t, v, params.temperature, "merged partial states");
}

/// Merge mode (range states folded on the device, then turns and the epilogue, whose block the
/// grid ticket elects): the 64-row layout with token advantages over 3 uneven ranges, 2, 3 and 4
/// blocks at once, uncapped and capped, give the serial merge's every output bit for bit, and the
/// serial merge agrees with the oracle.
#[test]
fn merge_mode_concurrent_equals_serial_bitwise() {
    let l = layout();
    let (n, v) = (64usize, 300usize);
    let (r, m, t) = data(n, v, 95);
    let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
    let ranges = [VocabRange::new(0, 120), VocabRange::new(120, 0), VocabRange::new(120, 180)];
    let params = Params::default();
    let serial = Emulated::new();
    let states: Vec<f32> = ranges
        .iter()
        .flat_map(|&range| serial.range_states(&RangeInput::of_full(real, masked, range), &t, &params).unwrap())
        .collect();
    // Credited spans: each turn's credit at the start of its trajectory's response, in turn order.
    let starts = infopo_kernels::synth::consecutive_credit_starts(&l.trajectory, &l.credit, 0);
    let mut lay = infopo_kernels::Layout::new(n, &l.turns(), Some(&l.trajectories())).unwrap();
    lay = lay.with_credit_start(&starts).unwrap();
    let merge = |b: &Emulated| b.merge_and_finish(&states, ranges.len(), &t, v, Some(&lay), &params).unwrap();
    let want = merge(&serial);
    let (rf, mf) = (to_f64(&r), to_f64(&m));
    compare_rows(&want.rows, &rf, &mf, &t, v, 1.0, "serial merge");
    let est = epilogue_feed(&serial, &want, params.estimator, &rf, &mf, &t, 1.0);
    check_epilogue(&want, &est, &l.turns(), &l.trajectories(), &params);
    let token_bits = |o: &Output| -> Vec<u64> {
        o.advantages.as_ref().unwrap().token_advantage.as_ref().unwrap().iter().map(|x| x.to_bits()).collect()
    };
    for (k, seed) in [(2u32, 31u64), (3, 32), (4, 33)] {
        for b in [Emulated::concurrent(k, seed).unwrap(), Emulated::concurrent(k, seed).unwrap().with_grid_cap(5)] {
            let got = merge(&b);
            assert!(output_bits(&got) == output_bits(&want), "{k} blocks at once, seed {seed}");
            assert!(token_bits(&got) == token_bits(&want), "{k} blocks at once, seed {seed}: token advantages");
        }
    }
}
