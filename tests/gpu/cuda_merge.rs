//! The kernel's merge mode on a GPU (`CudaBackend::merge_states`, feature `cuda`): range states
//! written by the kernel in partial-state mode (emulated here, uploaded), merged and finalised on
//! the device with turns and the epilogue, against the float64 oracle of the whole batch and the
//! emulated merge of the same states (tolerances of `tests/common/kernel.rs`).
//!
//! Ignored without a GPU; run them with
//!
//! ```text
//! NVCC=$(scripts/install-nvcc | tail -1) cargo test --features cuda --test gpu -- --include-ignored cuda_merge::
//! ```
#![cfg(feature = "cuda")]

use crate::common;

use common::kernel::{
    check_token_advantage, compare_rows, epilogue_feed, generate, random_span_layout, Spec, ROW_ATOL, ROW_RTOL,
};
use common::{close, to_dtype, to_f64};
use half::bf16;
use infopo_kernels::cuda::{rows_to_host, CudaBackend};
use infopo_kernels::emulated::Emulated;
use infopo_kernels::vocab::{shard_ranges, RangeInput, VocabRange};
use infopo_kernels::Layout;
use infopo_kernels::{Error, Estimator, GateSource, LogitElement, Logits, Output, Params, RowErrorKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("CUDA device 0 (these tests need a GPU and a driver)")
}

/// The kernel's partial states of every range of the full logits, `[P][N][8]` f32 (emulated).
fn states<T: LogitElement>((r, m, t): (&[T], &[T], &[i64]), v: usize, ranges: &[VocabRange], p: &Params) -> Vec<f32> {
    let n = t.len();
    let (real, masked) = (Logits::new(r, n, v).unwrap(), Logits::new(m, n, v).unwrap());
    ranges
        .iter()
        .flat_map(|&range| Emulated::new().range_states(&RangeInput::of_full(real, masked, range), t, p).unwrap())
        .collect()
}

/// The rows `r0..r1` of `[P][N][8]` states as `[P][r1 - r0][8]`.
fn state_rows(s: &[f32], parts: usize, n: usize, r0: usize, r1: usize) -> Vec<f32> {
    (0..parts).flat_map(|k| s[(k * n + r0) * 8..(k * n + r1) * 8].iter().copied()).collect()
}

/// The device merge of `s` in launches over the micro-batches `bounds` (the last finalises),
/// read back as an [`Output`].
#[allow(clippy::too_many_arguments)]
fn device_merge(
    b: &CudaBackend,
    s: &[f32],
    parts: usize,
    t: &[i64],
    v: usize,
    layout: Option<&Layout>,
    params: &Params,
    bounds: &[usize],
) -> infopo_kernels::Result<Output> {
    let stream = b.stream();
    let n = t.len();
    let device_layout = layout.map(|l| b.upload_layout(l)).transpose()?;
    let mut batch = b.begin(device_layout.as_ref(), params)?;
    let mut rows = Output::default().rows;
    for (k, w) in bounds.windows(2).enumerate() {
        let (r0, r1) = (w[0], w[1]);
        let part = state_rows(s, parts, n, r0, r1);
        let states = stream.clone_htod(&part).unwrap();
        let targets = stream.clone_htod(&t[r0..r1]).unwrap();
        let finalize = k + 2 == bounds.len();
        let row_out = b.merge_states(&mut batch, &states.slice(..), parts, &targets.slice(..), v, finalize)?;
        let got = rows_to_host(stream, &row_out, r1 - r0).unwrap();
        rows.lse_real.extend(got.lse_real);
        rows.lse_masked.extend(got.lse_masked);
        rows.log_ratio.extend(got.log_ratio);
        rows.kl.extend(got.kl);
        rows.entropy_real.extend(got.entropy_real);
    }
    let (turn_info, advantages) = batch.to_host()?;
    b.check_scratch()?;
    Ok(Output { rows, turn_info, advantages })
}

#[track_caller]
fn rows_close(a: &Output, b: &Output, what: &str) {
    let pairs = [
        (&a.rows.lse_real, &b.rows.lse_real),
        (&a.rows.lse_masked, &b.rows.lse_masked),
        (&a.rows.log_ratio, &b.rows.log_ratio),
        (&a.rows.kl, &b.rows.kl),
        (&a.rows.entropy_real, &b.rows.entropy_real),
    ];
    for (k, (x, y)) in pairs.into_iter().enumerate() {
        assert_eq!(x.len(), y.len(), "{what}");
        for (row, (&p, &q)) in x.iter().zip(y).enumerate() {
            assert!(
                close(p as f64, q as f64, ROW_ATOL, ROW_RTOL),
                "{what} row {row} output {k}: gpu {p}, emulated {q}"
            );
        }
    }
}

/// Shards and chunks of random rows (bf16 and f32, split rows at V = 50257), with random span
/// layouts, one launch and micro-batched: rows against the oracle and the emulated merge, turns,
/// advantages and token advantages against the oracle fed with the GPU's rows.
#[test]
#[ignore = "needs a CUDA GPU"]
fn device_merge_matches_the_oracle_and_the_emulator() {
    let b = gpu();
    let e = Emulated::new();
    for case in 0..6u64 {
        let mut rng = StdRng::seed_from_u64(300 + case);
        let (n, v) = (rng.gen_range(1..48usize), [300usize, 32003, 50257][case as usize % 3]);
        let sl = random_span_layout(&mut rng, n);
        let mut lay = infopo_kernels::Layout::new(n, &sl.layout.turns(), Some(&sl.layout.trajectories())).unwrap();
        lay = lay.with_credit_start(&sl.starts).unwrap();
        let (r, m, t) = generate(&Spec { neg_inf: 0.05, ..Spec::new(n, v) }, 400 + case);
        let params = match case % 3 {
            0 => Params::default(),
            1 => Params { gate_source: GateSource::Intrinsic, temperature: 0.7, ..Params::default() },
            _ => Params { normalize: false, beta: 0.3, ..Params::default() },
        };
        let ranges = match case % 2 {
            0 => shard_ranges(v, [2usize, 8][(case / 2) as usize % 2]).unwrap(),
            _ => (0..v.div_ceil(4096)).map(|k| VocabRange::new(k * 4096, 4096.min(v - k * 4096))).collect(),
        };
        let cut = rng.gen_range(0..=n);
        let run = |rf: &[f64], mf: &[f64], s: &[f32], dtype: &str| {
            let want = e.merge_and_finish(s, ranges.len(), &t, v, Some(&lay), &params).unwrap();
            for bounds in [vec![0, n], vec![0, cut, n]] {
                let what = format!("case {case} {dtype} N={n} V={v} P={} bounds {bounds:?}", ranges.len());
                let got = device_merge(&b, s, ranges.len(), &t, v, Some(&lay), &params, &bounds).unwrap();
                compare_rows(&got.rows, rf, mf, &t, v, params.temperature, &what);
                rows_close(&got, &want, &what);
                let est = epilogue_feed(&e, &got, params.estimator, rf, mf, &t, params.temperature);
                check_token_advantage(&got, &est, &sl.layout.turns(), &sl.layout.trajectories(), &sl.starts, &params);
            }
        };
        let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let sb = states((&rb[..], &mb[..], &t[..]), v, &ranges, &params);
        run(&to_f64(&rb), &to_f64(&mb), &sb, "bf16");
        let sf = states((&r[..], &m[..], &t[..]), v, &ranges, &params);
        run(&to_f64(&r), &to_f64(&m), &sf, "f32");
    }
}

/// Row errors reach the batch's error word (lowest row; the target is not known on the device
/// path), and a kl = +∞ row under the KL estimator with trajectories is NonFiniteTurn.
#[test]
#[ignore = "needs a CUDA GPU"]
fn device_merge_reports_row_errors() {
    let b = gpu();
    let (n, v) = (6usize, 40usize);
    let (r, mut m, mut t) = generate(&Spec::new(n, v), 11);
    t[4] = 40;
    m[2 * 40..3 * 40].fill(f32::NEG_INFINITY);
    let ranges = shard_ranges(v, 3).unwrap();
    let p = Params::default();
    let s = states((&r[..], &m[..], &t[..]), v, &ranges, &p);
    match device_merge(&b, &s, 3, &t, v, None, &p, &[0, n]) {
        Err(Error::Row { row: 2, kind: RowErrorKind::MaskedAllNegInf, .. }) => {}
        other => panic!("{other:?}"),
    }
    t[1] = -3;
    let s = states((&r[..], &m[..], &t[..]), v, &ranges, &p);
    match device_merge(&b, &s, 3, &t, v, None, &p, &[0, 3, n]) {
        Err(Error::Row { row: 1, kind: RowErrorKind::TargetOutOfRange, .. }) => {}
        other => panic!("{other:?}"),
    }
    // NonFiniteTurn: the 64-row layout, rows 33 and 45 with a gap.
    let l = common::kernel::layout();
    let (r, mut m, t) = generate(&Spec::new(64, 31), 81);
    for row in [33usize, 45] {
        let o = if t[row] == 0 { 1 } else { 0 };
        m[row * 31 + o] = f32::NEG_INFINITY;
    }
    let kl = Params { estimator: Estimator::Kl, ..Params::default() };
    let lay = infopo_kernels::Layout::new(64, &l.turns(), Some(&l.trajectories())).unwrap();
    let s = states((&r[..], &m[..], &t[..]), 31, &shard_ranges(31, 2).unwrap(), &kl);
    match device_merge(&b, &s, 2, &t, 31, Some(&lay), &kl, &[0, 20, 64]) {
        Err(Error::NonFiniteTurn { turn: 6, row: Some(33) }) => {}
        other => panic!("{other:?}"),
    }
    // A bad state buffer is a typed error before any launch.
    let mut batch = b.begin(None, &p).unwrap();
    let states = b.stream().clone_htod(&[0f32; 40]).unwrap();
    let targets = b.stream().clone_htod(&[0i64; 2]).unwrap();
    let bad = b.merge_states(&mut batch, &states.slice(..), 3, &targets.slice(..), 10, true);
    assert!(matches!(bad, Err(Error::Shape { .. })), "{bad:?}");
}
