//! The kernel's merge mode (entry point `infopo_merge`, emulated): the partial states of
//! vocabulary ranges (Megatron shards p ∈ {1, 2, 3, 8} from padded buffers, uneven ranges with
//! empty ones, the fixed-width chunks of the fused hidden-state path), each written by the kernel
//! in partial-state mode, folded on the device and finalised there with the turns and the
//! epilogue, against the float64 oracle of the whole batch (tolerances of `tests/common/kernel.rs`),
//! against the host's float64 merge of the same states, and bit for bit against the unsplit
//! launch where that must hold (one part).

use crate::common;

use common::kernel::{
    check_epilogue, check_token_advantage, compare_rows, epilogue_feed, generate, layout, peaked, random_span_layout,
    Spec, ROW_ATOL, ROW_RTOL,
};
use common::{close, to_dtype, to_f64};
use half::bf16;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::vocab::{merge_outputs, shard_ranges, RangeInput, RangeStates, VocabRange};
use infopo_kernels::Layout;
use infopo_kernels::{
    Backend, Batch, Error, Estimator, LogitElement, Logits, Output, Params, RowErrorKind, Trajectories, Turns,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kernel's partial states of every range, `[P][N][8]` f32 in range order: a range of the
/// full logits in place, or (`padded`) a copy of its columns in its own `[N, width]` buffer whose
/// columns past the range are NaN (never read).
fn kernel_states<T: LogitElement>(
    e: &Emulated,
    (r, m, t): (&[T], &[T], &[i64]),
    v: usize,
    ranges: &[VocabRange],
    padded: bool,
    params: &Params,
) -> Vec<f32> {
    let n = t.len();
    let mut out = Vec::with_capacity(ranges.len() * n * 8);
    for &range in ranges {
        let states = if padded {
            let width = ranges.iter().map(|r| r.len).max().unwrap().max(1) + 3; // odd stride
            let pad = T::from_f32(f32::NAN);
            let shard = |x: &[T]| {
                let mut s = vec![pad; n * width];
                for row in 0..n {
                    s[row * width..row * width + range.len]
                        .copy_from_slice(&x[row * v + range.start..row * v + range.end()]);
                }
                s
            };
            let (x, y) = (shard(r), shard(m));
            let input =
                RangeInput::shard(Logits::new(&x, n, width).unwrap(), Logits::new(&y, n, width).unwrap(), range);
            e.range_states(&input, t, params).unwrap()
        } else {
            let input = RangeInput::of_full(Logits::new(r, n, v).unwrap(), Logits::new(m, n, v).unwrap(), range);
            e.range_states(&input, t, params).unwrap()
        };
        out.extend_from_slice(&states);
    }
    out
}

/// The host's float64 merge of the same kernel states (`vocab::merge_outputs`).
fn host_merge(states: &[f32], ranges: &[VocabRange], t: &[i64], v: usize, params: &Params) -> Output {
    let per = t.len() * 8;
    let parts: Vec<RangeStates> = ranges
        .iter()
        .enumerate()
        .map(|(k, &range)| RangeStates::from_kernel(range, &states[k * per..(k + 1) * per], params).unwrap())
        .collect();
    let rows = merge_outputs(0, &parts, t, v).unwrap();
    Output { rows, turn_info: None, advantages: None }
}

/// `parts` random contiguous ranges of [0, v), some empty.
fn uneven_ranges(v: usize, parts: usize, rng: &mut StdRng) -> Vec<VocabRange> {
    let mut cuts: Vec<usize> = (0..parts - 1).map(|_| rng.gen_range(0..=v)).collect();
    cuts.push(0);
    cuts.push(v);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| VocabRange::new(w[0], w[1] - w[0])).collect()
}

/// The fused path's chunks: `[k·width, (k+1)·width)`, the last one shorter.
fn chunks(v: usize, width: usize) -> Vec<VocabRange> {
    (0..v.div_ceil(width)).map(|k| VocabRange::new(k * width, width.min(v - k * width))).collect()
}

fn bits(o: &Output) -> Vec<u64> {
    let rows = [&o.rows.lse_real, &o.rows.lse_masked, &o.rows.log_ratio, &o.rows.kl, &o.rows.entropy_real];
    let mut b: Vec<u64> = rows.iter().flat_map(|v| v.iter().map(|x| x.to_bits() as u64)).collect();
    if let Some(info) = &o.turn_info {
        b.extend(info.iter().map(|x| x.to_bits()));
    }
    if let Some(a) = &o.advantages {
        for v in [&a.turn_intrinsic, &a.turn_intrinsic_norm, &a.turn_bonus, &a.trajectory_advantage, &a.trajectory_gate]
        {
            b.extend(v.iter().map(|x| x.to_bits()));
        }
        b.extend([a.outcome_std, a.intrinsic_std, a.magnitude_ratio].map(f64::to_bits));
        b.extend(a.token_advantage.iter().flatten().map(|x| x.to_bits()));
    }
    b
}

/// Two f32 merges of the same states, at the kernels' row tolerance (infinities equal).
#[track_caller]
fn rows_close(a: &Output, b: &Output, what: &str) {
    let pairs = [
        ("lse_real", &a.rows.lse_real, &b.rows.lse_real),
        ("lse_masked", &a.rows.lse_masked, &b.rows.lse_masked),
        ("log_ratio", &a.rows.log_ratio, &b.rows.log_ratio),
        ("kl", &a.rows.kl, &b.rows.kl),
        ("entropy_real", &a.rows.entropy_real, &b.rows.entropy_real),
    ];
    for (name, x, y) in pairs {
        for (row, (&p, &q)) in x.iter().zip(y.iter()).enumerate() {
            assert!(close(p as f64, q as f64, ROW_ATOL, ROW_RTOL), "{what} row {row} {name}: device {p}, host {q}");
        }
    }
}

/// The same bits, or the same error.
#[track_caller]
fn same(got: &infopo_kernels::Result<Output>, want: &infopo_kernels::Result<Output>, what: &str) {
    match (got, want) {
        (Ok(g), Ok(w)) => assert_eq!(bits(g), bits(w), "{what}"),
        (Err(g), Err(w)) => assert_eq!(format!("{g:?}"), format!("{w:?}"), "{what}"),
        (g, w) => panic!("{what}: merged {g:?}, unsplit {w:?}"),
    }
}

fn validated(l: &common::kernel::Layout, rows: usize, starts: Option<&[u32]>) -> Layout {
    let mut out = infopo_kernels::Layout::new(rows, &l.turns(), Some(&l.trajectories())).unwrap();
    if let Some(s) = starts {
        out = out.with_credit_start(s).unwrap();
    }
    out
}

/// Rows only: shards (padded buffers), uneven ranges (empty ones included) and fused chunks,
/// f32 and bf16, random rows with −∞ entries and peaked rows (log_ratio exactly 0), split rows
/// (V = 50257 and 32003 with few rows), against the oracle and the host's f64 merge.
#[test]
fn merged_rows_match_the_oracle_and_the_host_merge() {
    let e = Emulated::new();
    let mut rng = StdRng::seed_from_u64(19);
    for &(n, v, temperature) in &[(5usize, 37usize, 1.0), (4, 1000, 0.6), (2, 32003, 1.0), (1, 50257, 2.0)] {
        let params = Params { temperature, ..Params::default() };
        let (r, m, t) = generate(&Spec { neg_inf: 0.15, temperature, ..Spec::new(n, v) }, v as u64);
        fn run<T: LogitElement>(
            e: &Emulated,
            (r, m, t): (&[f32], &[f32], &[i64]),
            v: usize,
            ranges: &[VocabRange],
            padded: bool,
            params: &Params,
            what: &str,
        ) {
            let (r, m) = (to_dtype::<T>(r), to_dtype::<T>(m));
            let states = kernel_states(e, (&r[..], &m[..], t), v, ranges, padded, params);
            let out = e.merge_and_finish(&states, ranges.len(), t, v, None, params).unwrap();
            let what = format!("{what} {} P={}", T::DTYPE, ranges.len());
            compare_rows(&out.rows, &to_f64(&r), &to_f64(&m), t, v, params.temperature, &what);
            rows_close(&out, &host_merge(&states, ranges, t, v, params), &what);
            assert!(out.turn_info.is_none() && out.advantages.is_none());
        }
        let data = (&r[..], &m[..], &t[..]);
        for p in [1usize, 2, 3, 8] {
            let what = format!("N={n} V={v} τs={temperature} shards");
            run::<f32>(&e, data, v, &shard_ranges(v, p).unwrap(), true, &params, &what);
            run::<bf16>(&e, data, v, &shard_ranges(v, p).unwrap(), true, &params, &what);
            let uneven = uneven_ranges(v, p + 1, &mut rng);
            run::<f32>(&e, data, v, &uneven, false, &params, &format!("N={n} V={v} uneven"));
        }
        for width in [v.div_ceil(4).max(1), 4096, 8192] {
            run::<bf16>(&e, data, v, &chunks(v, width), false, &params, &format!("N={n} V={v} chunks of {width}"));
        }
        let (r, m, t) = peaked(n, v, temperature, 7);
        let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        for ranges in [shard_ranges(v, 8).unwrap(), chunks(v, 4096)] {
            let states = kernel_states(&e, (&rb[..], &mb[..], &t[..]), v, &ranges, false, &params);
            let out = e.merge_and_finish(&states, ranges.len(), &t, v, None, &params).unwrap();
            assert!(out.rows.log_ratio.iter().all(|&l| l == 0.0), "peaked V={v}: {:?}", out.rows.log_ratio);
        }
    }
}

/// One part is the unsplit launch: the fold starts from the empty state, which merges exactly,
/// and the merge launch has the unsplit f32 launch's block size, so rows, turn means,
/// advantages and token advantages are equal bit for bit (f32 logits at any V; bf16 with
/// V ≥ 2048, where both use 256 threads), and so are the errors (the KL estimator meets the
/// −∞ entries' kl = +∞: NonFiniteTurn).
#[test]
fn one_part_is_the_unsplit_launch_bit_for_bit() {
    let e = Emulated::new();
    for (case, &(n, v)) in [(40usize, 300usize), (25, 5000), (3, 20011)].iter().enumerate() {
        let mut rng = StdRng::seed_from_u64(40 + case as u64);
        let l = random_span_layout(&mut rng, n);
        let (r, m, t) = generate(&Spec { neg_inf: 0.1, ..Spec::new(n, v) }, 50 + case as u64);
        let lay = validated(&l.layout, n, Some(&l.starts));
        for params in [Params::default(), Params { estimator: Estimator::Kl, normalize: false, ..Params::default() }] {
            let check = |real: &[f32], masked: &[f32], what: &str| {
                let batch = Batch::rows(Logits::new(real, n, v).unwrap(), Logits::new(masked, n, v).unwrap(), &t)
                    .with_turns(l.layout.turns())
                    .with_trajectories(l.layout.trajectories())
                    .with_credit_start(&l.starts);
                let want = e.compute(&batch, &params);
                let states = kernel_states(&e, (real, masked, &t[..]), v, &[VocabRange::new(0, v)], false, &params);
                let got = e.merge_and_finish(&states, 1, &t, v, Some(&lay), &params);
                same(&got, &want, &format!("{what} N={n} V={v} {params:?}"));
                assert!(params.estimator == Estimator::Kl || got.is_ok(), "{what}: the log-ratio case must not fail");
            };
            check(&r, &m, "f32");
            if v >= 2048 {
                let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
                let batch = Batch::rows(Logits::new(&rb, n, v).unwrap(), Logits::new(&mb, n, v).unwrap(), &t)
                    .with_turns(l.layout.turns())
                    .with_trajectories(l.layout.trajectories())
                    .with_credit_start(&l.starts);
                let want = e.compute(&batch, &params);
                let states = kernel_states(&e, (&rb[..], &mb[..], &t[..]), v, &[VocabRange::new(0, v)], false, &params);
                let got = e.merge_and_finish(&states, 1, &t, v, Some(&lay), &params);
                same(&got, &want, &format!("bf16 N={n} V={v} {params:?}"));
            }
        }
    }
}

/// Turns, trajectories and token advantages computed on the device from merged rows, against
/// the float64 oracle of the whole batch: the 64-row layout (empty turns, a singleton group) and
/// random span layouts, shards and chunks, every estimator / gate setting.
#[test]
fn turns_and_advantages_from_merged_rows_match_the_oracle() {
    let e = Emulated::new();
    let l = layout();
    for (v, seed) in [(31usize, 61u64), (5003, 62)] {
        // No −∞ entries: a gap's kl = +∞ would make the KL estimator's turns non-finite.
        let (r, m, t) = generate(&Spec::new(64, v), seed);
        let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let (rf, mf) = (to_f64(&rb), to_f64(&mb));
        let lay = validated(&l, 64, None);
        for params in [
            Params::default(),
            Params { estimator: Estimator::Kl, ..Params::default() },
            Params { normalize: false, beta: 0.3, gate_temperature: 0.5, ..Params::default() },
        ] {
            for ranges in [shard_ranges(v, 3).unwrap(), chunks(v, 8192)] {
                let states = kernel_states(&e, (&rb[..], &mb[..], &t[..]), v, &ranges, false, &params);
                let out = e.merge_and_finish(&states, ranges.len(), &t, v, Some(&lay), &params).unwrap();
                let what = format!("bf16 N=64 V={v} P={} {params:?}", ranges.len());
                compare_rows(&out.rows, &rf, &mf, &t, v, 1.0, &what);
                let est = epilogue_feed(&e, &out, params.estimator, &rf, &mf, &t, 1.0);
                check_epilogue(&out, &est, &l.turns(), &l.trajectories(), &params);
            }
        }
    }
    for case in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(700 + case);
        let (n, v) = (rng.gen_range(1..40usize), [300usize, 32003][case as usize % 2]);
        let sl = random_span_layout(&mut rng, n);
        let (r, m, t) = generate(&Spec::new(n, v), 800 + case);
        let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let (rf, mf) = (to_f64(&rb), to_f64(&mb));
        let lay = validated(&sl.layout, n, Some(&sl.starts));
        let params = Params { gate_source: infopo_kernels::GateSource::Intrinsic, ..Params::default() };
        let ranges = shard_ranges(v, [2usize, 8][case as usize % 2]).unwrap();
        let states = kernel_states(&e, (&rb[..], &mb[..], &t[..]), v, &ranges, true, &params);
        let out = e.merge_and_finish(&states, ranges.len(), &t, v, Some(&lay), &params).unwrap();
        compare_rows(&out.rows, &rf, &mf, &t, v, 1.0, &format!("case {case}"));
        let est = epilogue_feed(&e, &out, params.estimator, &rf, &mf, &t, 1.0);
        check_token_advantage(&out, &est, &sl.layout.turns(), &sl.layout.trajectories(), &sl.starts, &params);
    }
}

/// The merge launch's cross-block protocol (the grid ticket electing the epilogue block) gives
/// the same bits with several blocks at once in random interleavings, and with fewer blocks
/// than rows (the grid-stride loop).
#[test]
fn concurrent_and_grid_capped_merges_give_the_same_bits() {
    let l = layout();
    let v = 3001;
    let (r, m, t) = generate(&Spec { neg_inf: 0.05, ..Spec::new(64, v) }, 5);
    let ranges = shard_ranges(v, 3).unwrap();
    let params = Params::default();
    let states = kernel_states(&Emulated::new(), (&r[..], &m[..], &t[..]), v, &ranges, false, &params);
    let lay = validated(&l, 64, None);
    let serial = Emulated::new().merge_and_finish(&states, 3, &t, v, Some(&lay), &params).unwrap();
    for seed in 0..3 {
        let e = Emulated::concurrent(4, seed).unwrap();
        let got = e.merge_and_finish(&states, 3, &t, v, Some(&lay), &params).unwrap();
        assert_eq!(bits(&got), bits(&serial), "concurrent seed {seed}");
    }
    let capped = Emulated::new().with_grid_cap(5).merge_and_finish(&states, 3, &t, v, Some(&lay), &params).unwrap();
    assert_eq!(bits(&capped), bits(&serial), "grid cap 5");
}

/// Row errors of the unsplit launch, where the offending entries sit in one part or span
/// several: the same error (lowest row, contract order) from the merged states; mask fills
/// count as −∞ and a masked fill where the real token has mass gives kl = +∞ in every part
/// layout.
#[test]
fn row_errors_and_mask_fills_match_the_unsplit_launch() {
    let e = Emulated::new();
    let (n, v) = (6usize, 40usize);
    type Edit = fn(&mut [f32], &mut [f32], &mut [i64]);
    let edits: [(&str, Edit); 11] = [
        ("target = V", |_, _, t| t[3] = 40),
        ("target far outside", |_, _, t| t[1] = 1 << 40),
        ("negative target", |_, _, t| t[2] = -1),
        ("real NaN", |x, _, _| x[4 * 40 + 33] = f32::NAN),
        ("masked +inf", |_, y, _| y[3 * 40 + 1] = f32::INFINITY),
        ("real +fill", |x, _, _| x[2 * 40 + 17] = 2f32.powi(100)),
        ("real all -inf", |x, _, _| x[40..80].fill(f32::NEG_INFINITY)),
        ("masked all fills", |_, y, _| y[5 * 40..6 * 40].fill(f32::MIN)),
        ("real target -inf", |x, _, t| x[4 * 40 + t[4] as usize] = f32::NEG_INFINITY),
        ("masked target fill", |_, y, t| y[t[1] as usize + 40] = f32::MIN),
        ("two errors, lowest row wins", |x, y, _| {
            x[5 * 40 + 3] = f32::NAN;
            y[2 * 40..3 * 40].fill(f32::NEG_INFINITY);
        }),
    ];
    for (name, edit) in edits {
        let (mut r, mut m, mut t) = generate(&Spec::new(n, v), 11);
        edit(&mut r, &mut m, &mut t);
        let batch = Batch::rows(Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap(), &t);
        let want = e.compute(&batch, &Params::default());
        let Err(Error::Row { row, kind, target }) = want else { panic!("{name}: the edit must make a row error") };
        for ranges in [shard_ranges(v, 1).unwrap(), shard_ranges(v, 3).unwrap(), shard_ranges(v, 8).unwrap()] {
            let states = kernel_states(&e, (&r[..], &m[..], &t[..]), v, &ranges, true, &Params::default());
            match e.merge_and_finish(&states, ranges.len(), &t, v, None, &Params::default()) {
                Err(Error::Row { row: a, kind: b, target: c }) => {
                    assert_eq!((a, b, c), (row, kind, target), "{name} P={}", ranges.len())
                }
                other => panic!("{name} P={}: {other:?}", ranges.len()),
            }
        }
    }
    // Mask fills: per row, one shard of the real side and another of the masked side all fills
    // (except the target); the masked fills where the real side has mass give kl = +∞.
    let (n, v) = (4usize, 64usize);
    let (mut r, mut m, t) = generate(&Spec::new(n, v), 21);
    for row in 0..n {
        let a = t[row] as usize;
        for i in (0..v).filter(|&i| i != a) {
            if i / 8 == (a / 8 + 1 + row) % 8 {
                r[row * v + i] = f32::MIN;
            }
            if i / 8 == (a / 8 + 2 + row) % 8 {
                m[row * v + i] = bf16::MIN.to_f32();
            }
        }
    }
    for p in [1usize, 2, 3, 8] {
        let ranges = shard_ranges(v, p).unwrap();
        let params = Params::default();
        let states = kernel_states(&e, (&r[..], &m[..], &t[..]), v, &ranges, true, &params);
        let out = e.merge_and_finish(&states, p, &t, v, None, &params).unwrap();
        compare_rows(&out.rows, &to_f64(&r), &to_f64(&m), &t, v, 1.0, &format!("fills P={p}"));
        assert!(out.rows.kl.iter().all(|&k| k == f32::INFINITY), "fills P={p}: {:?}", out.rows.kl);
    }
}

/// With trajectories, a kl = +∞ row under the KL estimator is `NonFiniteTurn` naming the turn and
/// the row (as the unsplit launch reports it); without trajectories the turn's info is +∞.
#[test]
fn non_finite_turn_is_an_error() {
    let e = Emulated::new();
    let l = layout();
    let v = 31;
    let (r, mut m, t) = generate(&Spec::new(64, v), 81);
    for row in [33usize, 45] {
        let o = if t[row] == 0 { 1 } else { 0 };
        m[row * v + o] = f32::NEG_INFINITY;
    }
    let kl = Params { estimator: Estimator::Kl, ..Params::default() };
    let ranges = shard_ranges(v, 3).unwrap();
    let states = kernel_states(&e, (&r[..], &m[..], &t[..]), v, &ranges, true, &kl);
    match e.merge_and_finish(&states, 3, &t, v, Some(&validated(&l, 64, None)), &kl) {
        Err(Error::NonFiniteTurn { turn: 6, row: Some(33) }) => {}
        other => panic!("{other:?}"),
    }
    let turns_only = infopo_kernels::Layout::new(64, &l.turns(), None).unwrap();
    let out = e.merge_and_finish(&states, 3, &t, v, Some(&turns_only), &kl).unwrap();
    assert_eq!(out.turn_info.as_ref().unwrap()[6], f64::INFINITY);
    assert!(out.advantages.is_none());
    assert_eq!(out.rows.kl[33], f32::INFINITY);
}

/// One row; turns without trajectories, empty turns included; no rows at all (with a layout of
/// empty turns, the launch only runs the epilogue).
#[test]
fn one_row_empty_turns_and_no_rows() {
    let e = Emulated::new();
    let params = Params::default();
    let (r, m, t) = generate(&Spec::new(1, 5003), 3);
    let ranges = shard_ranges(5003, 8).unwrap();
    let states = kernel_states(&e, (&r[..], &m[..], &t[..]), 5003, &ranges, true, &params);
    let out = e.merge_and_finish(&states, 8, &t, 5003, None, &params).unwrap();
    compare_rows(&out.rows, &to_f64(&r), &to_f64(&m), &t, 5003, 1.0, "one row");

    let offsets = [0u32, 0, 3, 3, 3, 10];
    let trajectory = [0u32; 5];
    let credit = [1u32, 2, 3, 4, 5];
    let turns = Turns { offsets: &offsets, trajectory: &trajectory, credit_tokens: &credit };
    let (r, m, t) = generate(&Spec::new(10, 77), 71);
    let states = kernel_states(&e, (&r[..], &m[..], &t[..]), 77, &shard_ranges(77, 2).unwrap(), true, &params);
    let lay = infopo_kernels::Layout::new(10, &turns, None).unwrap();
    let out = e.merge_and_finish(&states, 2, &t, 77, Some(&lay), &params).unwrap();
    let info = out.turn_info.clone().unwrap();
    assert_eq!((info[0], info[2], info[3]), (0.0, 0.0, 0.0));
    let est: Vec<f64> = out.rows.log_ratio.iter().map(|&x| x as f64).collect();
    let mean = |a: usize, c: usize| est[a..c].iter().sum::<f64>() / (c - a) as f64;
    assert!((info[1] - mean(0, 3)).abs() < 1e-12 && (info[4] - mean(3, 10)).abs() < 1e-12, "{info:?}");

    // No rows: the epilogue of empty turns only (a group of two trajectories, zero info).
    let turns = Turns { offsets: &[0, 0, 0], trajectory: &[0, 1], credit_tokens: &[1, 2] };
    let traj = Trajectories { group: &[3, 3], outcome: &[1.0, 0.0], tokens: &[2, 3] };
    let lay = infopo_kernels::Layout::new(0, &turns, Some(&traj)).unwrap();
    let out = e.merge_and_finish(&[], 4, &[], 100, Some(&lay), &params).unwrap();
    assert_eq!(out.turn_info.as_deref(), Some(&[0.0, 0.0][..]));
    let adv = out.advantages.unwrap();
    assert_eq!(adv.turn_bonus, [0.0, 0.0]);
    assert!(adv.trajectory_advantage[0] > 0.0 && adv.trajectory_advantage[1] < 0.0);
    assert!(e.merge_and_finish(&[], 4, &[], 100, None, &params).unwrap().rows.is_empty());
}

/// Bad shapes and parameters are typed errors, before any launch.
#[test]
fn bad_merge_inputs_are_typed_errors() {
    let e = Emulated::new();
    let t = [0i64, 1];
    let states = vec![0f32; 3 * 2 * 8];
    let p = Params::default();
    let shape = |r: infopo_kernels::Result<Output>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape(e.merge_and_finish(&states, 2, &t, 10, None, &p)), "parts x rows x 8");
    assert!(shape(e.merge_and_finish(&states[..47], 3, &t, 10, None, &p)), "short");
    assert!(shape(e.merge_and_finish(&[], 0, &t, 10, None, &p)), "no parts");
    assert!(matches!(e.merge_and_finish(&states, 3, &t, 0, None, &p), Err(Error::EmptyVocab)));
    let bad_t = Params { temperature: 0.0, ..p };
    assert!(matches!(e.merge_and_finish(&states, 3, &t, 10, None, &bad_t), Err(Error::Param { .. })));
    let turns = Turns { offsets: &[0, 3], trajectory: &[0], credit_tokens: &[1] };
    let lay = infopo_kernels::Layout::new(3, &turns, None).unwrap();
    assert!(matches!(e.merge_and_finish(&states, 3, &t, 10, Some(&lay), &p), Err(Error::Turns { .. })));
    // A well-formed merge of those zero states is no error of shape: every row has sum 0, so
    // "every real logit is −∞" for the lowest row.
    match e.merge_and_finish(&states, 3, &t, 10, None, &p) {
        Err(Error::Row { row: 0, kind: RowErrorKind::RealAllNegInf, .. }) => {}
        other => panic!("{other:?}"),
    }
}
