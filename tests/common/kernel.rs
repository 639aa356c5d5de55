//! Kernel test bodies, one function per property, each taking the backend under test as
//! `&dyn Backend`: `tests/contract/emulated_kernel.rs` runs them on the emulated kernel,
//! `tests/gpu/cuda_kernel.rs` on a GPU, `tests/contract/cpu_reference.rs` runs the ones meaningful for the
//! float64 reference. Everything is compared with the naive oracle of `tests/common/mod.rs`.
//!
//! Tolerances (the kernels accumulate in f32; the CPU reference, in f64, is well inside them).
//! - Rows: the kernel sums ≤ V exp2 terms of centred logits in per-thread runs + trees and rounds
//!   its outputs to f32, so each row value must satisfy
//!   |kernel − oracle| ≤ 2e-4 + 1e-5·|oracle| + 2e-7·L, where L = max |logit|/τs of the row's
//!   finite logits (the f32 rounding of the scaled logits themselves: ~6e-8·L per logit, a few
//!   of them per value). Infinities must be equal.
//! - Epilogue (turns, trajectories, batch scalars): f64 in every backend; fed with the backend's
//!   own f32 row values, the oracle must agree to |kernel − oracle| ≤ 1e-9·(1 + |oracle|).

use super::{
    assert_close, close, f32s, oracle_batch_advantages, oracle_code, oracle_row, oracle_token_advantage, to_dtype,
    to_f64,
};
use half::{bf16, f16};
use infopo_kernels::{
    Backend, Batch, Error, Estimator, GateSource, LogitElement, Logits, Output, Params, RowOutputs, Trajectories, Turns,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Absolute and relative parts of the row tolerance (see the module docs).
pub const ROW_ATOL: f64 = 2e-4;
pub const ROW_RTOL: f64 = 1e-5;
/// Per unit of max |logit|/τs.
pub const ROW_LOGIT_TOL: f64 = 2e-7;
/// Epilogue tolerance against the oracle fed with the backend's own row values.
pub const EPILOGUE_TOL: f64 = 1e-9;

// ------------------------------------------------------------------------------------------
// Data.

#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub n: usize,
    pub v: usize,
    /// Standard-ish deviation of the logits.
    pub spread: f32,
    /// A constant added to every logit (|logit| ~ 1e4 with 1e4).
    pub shift: f32,
    /// Fraction of −∞ entries (never at the target, never a whole row).
    pub neg_inf: f64,
    pub temperature: f64,
}

impl Spec {
    pub fn new(n: usize, v: usize) -> Self {
        Spec { n, v, spread: 3.0, shift: 0.0, neg_inf: 0.0, temperature: 1.0 }
    }
}

/// Real and masked logits (f32, before conversion to the dtype) and targets.
pub fn generate(s: &Spec, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut real = Vec::with_capacity(s.n * s.v);
    let mut masked = Vec::with_capacity(s.n * s.v);
    let mut targets = Vec::with_capacity(s.n);
    for _ in 0..s.n {
        let a = rng.gen_range(0..s.v);
        targets.push(a as i64);
        for i in 0..s.v {
            let x: f32 = (rng.gen::<f32>() + rng.gen::<f32>() + rng.gen::<f32>() - 1.5) * 2.0 * s.spread;
            let d: f32 = (rng.gen::<f32>() - 0.5) * s.spread;
            let (mut xr, mut ym) = (x + s.shift, x + d + s.shift);
            if i != a && s.v > 2 && rng.gen_bool(s.neg_inf) {
                xr = f32::NEG_INFINITY;
            }
            if i != a && s.v > 2 && rng.gen_bool(s.neg_inf) {
                ym = f32::NEG_INFINITY;
            }
            real.push(xr);
            masked.push(ym);
        }
    }
    (real, masked, targets)
}

// ------------------------------------------------------------------------------------------
// Checks.

/// Checks row `row` of `got` against the oracle of logits `x`, `y` (that row only, as f64).
#[track_caller]
pub fn check_row(got: &RowOutputs, row: usize, x: &[f64], y: &[f64], target: usize, temperature: f64, what: &str) {
    let o = oracle_row(x, y, target, temperature);
    let l = x
        .iter()
        .chain(y)
        .map(|&v| super::contract_logit(v))
        .filter(|v| v.is_finite())
        .fold(0.0f64, |a, v| a.max(v.abs()))
        / temperature;
    let values = [
        ("lse_real", got.lse_real[row], o.lse_real),
        ("lse_masked", got.lse_masked[row], o.lse_masked),
        ("log_ratio", got.log_ratio[row], o.log_ratio),
        ("kl", got.kl[row], o.kl),
        ("entropy_real", got.entropy_real[row], o.entropy_real),
    ];
    for (name, g, w) in values {
        let atol = ROW_ATOL + ROW_LOGIT_TOL * l;
        assert!(
            close(g as f64, w, atol, ROW_RTOL),
            "{what} row {row} {name}: backend {g} oracle {w} (tol {:e})",
            atol + ROW_RTOL * w.abs()
        );
    }
}

/// Checks every row of `got` against the oracle of `real`, `masked` ([n, v] as f64).
#[track_caller]
pub fn compare_rows(
    got: &RowOutputs,
    real: &[f64],
    masked: &[f64],
    targets: &[i64],
    v: usize,
    temperature: f64,
    what: &str,
) {
    assert_eq!(got.len(), targets.len(), "{what}: rows");
    for (row, &a) in targets.iter().enumerate() {
        let range = row * v..(row + 1) * v;
        check_row(got, row, &real[range.clone()], &masked[range], a as usize, temperature, what);
    }
}

/// Runs one spec in dtype T on `b` and compares every row with the oracle. Returns the output.
pub fn check_rows<T: LogitElement>(b: &dyn Backend, s: &Spec, seed: u64) -> Output {
    let (r, m, targets) = generate(s, seed);
    let (real, masked) = (to_dtype::<T>(&r), to_dtype::<T>(&m));
    let batch = Batch::rows(Logits::new(&real, s.n, s.v).unwrap(), Logits::new(&masked, s.n, s.v).unwrap(), &targets);
    let params = Params { temperature: s.temperature, ..Params::default() };
    let out = b.compute(&batch, &params).unwrap();
    let what = format!("{} {} N={} V={} τs={}", b.name(), T::DTYPE, s.n, s.v, s.temperature);
    compare_rows(&out.rows, &to_f64(&real), &to_f64(&masked), &targets, s.v, s.temperature, &what);
    out
}

/// Property: rows of random shapes (1–5 rows, V up to 9000 so that few rows split over blocks),
/// dtypes, spreads, temperatures and −∞ densities match the oracle; proptest shrinks a failure.
pub fn random_shapes_match_oracle(b: &dyn Backend, cases: u32) {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
    let shapes = (1usize..6, 1usize..9000, 0u8..3, any::<u64>());
    let values = (0.1f32..20.0, prop_oneof![Just(0.0), 0.0f64..0.3], prop_oneof![Just(1.0), 0.25f64..4.0]);
    runner
        .run(&(shapes, values), |((n, v, dtype, seed), (spread, neg_inf, temperature))| {
            let s = Spec { n, v, spread, shift: 0.0, neg_inf, temperature };
            match dtype {
                0 => check_rows::<f32>(b, &s, seed),
                1 => check_rows::<f16>(b, &s, seed),
                _ => check_rows::<bf16>(b, &s, seed),
            };
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{}: {e}", b.name()));
}

fn all_dtypes(b: &dyn Backend, s: &Spec, seed: u64) {
    check_rows::<f32>(b, s, seed);
    check_rows::<f16>(b, s, seed + 1);
    check_rows::<bf16>(b, s, seed + 2);
}

/// The per-row estimator values a backend's epilogue is fed ([`Backend::epilogue_reads_f64_rows`]).
/// The kernels feed their own f32 row outputs, so the oracle is fed the same values. The CPU
/// reference feeds its f64 row values (rounded to f32 only on output), so the oracle is fed its
/// own f64 rows of the same logits (`real`, `masked`: [n, v] as f64).
pub fn epilogue_feed(
    b: &dyn Backend,
    out: &Output,
    estimator: Estimator,
    real: &[f64],
    masked: &[f64],
    targets: &[i64],
    temperature: f64,
) -> Vec<f64> {
    let pick = |lr: f64, kl: f64| match estimator {
        Estimator::LogRatio => lr,
        Estimator::Kl => kl,
    };
    if b.epilogue_reads_f64_rows() {
        let v = real.len() / targets.len().max(1);
        (0..targets.len())
            .map(|r| {
                let range = r * v..(r + 1) * v;
                let o = oracle_row(&real[range.clone()], &masked[range], targets[r] as usize, temperature);
                pick(o.log_ratio, o.kl)
            })
            .collect()
    } else {
        out.rows.log_ratio.iter().zip(&out.rows.kl).map(|(&lr, &kl)| pick(lr as f64, kl as f64)).collect()
    }
}

/// The turn and trajectory outputs of `out` against the oracle fed with `est` (see
/// [`epilogue_feed`]).
#[track_caller]
pub fn check_epilogue(out: &Output, est: &[f64], turns: &Turns<'_>, traj: &Trajectories<'_>, p: &Params) {
    let o = oracle_batch_advantages(est, turns, traj, p);
    let adv = out.advantages.as_ref().expect("advantages");
    let t = EPILOGUE_TOL;
    assert_close("turn_info", out.turn_info.as_ref().expect("turn_info"), &o.info, t, t);
    assert_close("turn_intrinsic", &adv.turn_intrinsic, &o.intrinsic, t, t);
    assert_close("turn_norm", &adv.turn_intrinsic_norm, &o.norm, t, t);
    assert_close("turn_bonus", &adv.turn_bonus, &o.bonus, t, t);
    assert_close("advantage", &adv.trajectory_advantage, &o.advantage, t, t);
    assert_close("gate", &adv.trajectory_gate, &o.gate, t, t);
    assert_close(
        "scalars",
        &[adv.outcome_std, adv.intrinsic_std, adv.magnitude_ratio],
        &[o.outcome_std, o.intrinsic_std, o.magnitude_ratio],
        t,
        t,
    );
}

fn row_bits(o: &Output) -> Vec<u32> {
    [&o.rows.lse_real, &o.rows.lse_masked, &o.rows.log_ratio, &o.rows.kl, &o.rows.entropy_real]
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Rows.

/// V ≤ 31: one warp per block; odd V makes f16/bf16 (and f32) rows unaligned.
pub fn small_vocabularies_every_dtype(b: &dyn Backend) {
    for &v in &[1usize, 7, 31] {
        for &n in &[1usize, 3, 64, 300] {
            all_dtypes(b, &Spec::new(n, v), (v * 1000 + n) as u64);
        }
    }
}

pub fn vocab_1000(b: &dyn Backend) {
    for &n in &[1usize, 3, 64] {
        all_dtypes(b, &Spec::new(n, 1000), 77 + n as u64);
    }
    check_rows::<f32>(b, &Spec::new(300, 1000), 5);
}

/// N small, V large: on the kernels the rows are split over blocks (partials + row tickets).
pub fn split_vocabulary_large_v(b: &dyn Backend) {
    for &v in &[50257usize, 151936] {
        for &n in &[1usize, 3] {
            all_dtypes(b, &Spec::new(n, v), v as u64 + n as u64);
        }
    }
}

pub fn neg_inf_entries_and_infinite_kl(b: &dyn Backend) {
    let s = Spec { neg_inf: 0.2, ..Spec::new(40, 211) };
    let out = check_rows::<f32>(b, &s, 11);
    // Some masked −∞ where the real token has mass: kl = +∞, the true value.
    assert!(out.rows.kl.iter().any(|k| k.is_infinite()));
    check_rows::<bf16>(b, &s, 12);
    // Split path with −∞.
    check_rows::<f16>(b, &Spec { neg_inf: 0.05, ..Spec::new(2, 50257) }, 13);
}

pub fn huge_logits_and_temperature(b: &dyn Backend) {
    check_rows::<f32>(b, &Spec { shift: 1.0e4, spread: 5.0, ..Spec::new(16, 1000) }, 21);
    check_rows::<f32>(b, &Spec { shift: -1.0e4, spread: 5.0, ..Spec::new(2, 50257) }, 22);
    check_rows::<bf16>(b, &Spec { shift: 1.0e4, spread: 300.0, ..Spec::new(8, 333) }, 23);
    check_rows::<f16>(b, &Spec { temperature: 0.7, ..Spec::new(8, 999) }, 24);
    check_rows::<f32>(b, &Spec { temperature: 3.0, spread: 40.0, ..Spec::new(8, 4099) }, 25);
}

/// `n` rows of dtype T where real starts `real_pad` elements into its allocation and masked
/// `masked_pad`; with `sliced`, both are rows 1..n+1 of an [n+1, v] tensor (`slice_rows`).
fn misaligned<T: LogitElement>(b: &dyn Backend, n: usize, v: usize, real_pad: usize, masked_pad: usize, sliced: bool) {
    let first = sliced as usize;
    let (r, m, targets) = generate(&Spec::new(n + first, v), 31 + v as u64);
    let pad = |k: usize, x: &[f32]| {
        let mut buf = vec![T::from_f32(0.0); k];
        buf.extend(to_dtype::<T>(x));
        buf
    };
    let (rbuf, mbuf) = (pad(real_pad, &r), pad(masked_pad, &m));
    fn view<T: LogitElement>(buf: &[T], k: usize, rows: usize, v: usize, first: usize) -> Logits<'_> {
        Logits::new(&buf[k..], rows, v).unwrap().slice_rows(first, rows - first).unwrap()
    }
    let (real, masked) = (view(&rbuf, real_pad, n + first, v, first), view(&mbuf, masked_pad, n + first, v, first));
    let targets = &targets[first..];
    let out = b.compute(&Batch::rows(real, masked, targets), &Params::default()).unwrap();
    let what = format!("{} {} N={n} V={v} pads {real_pad}/{masked_pad} sliced {sliced}", b.name(), T::DTYPE);
    let (rf, mf) = (to_f64(&rbuf[real_pad + first * v..]), to_f64(&mbuf[masked_pad + first * v..]));
    compare_rows(&out.rows, &rf, &mf, targets, v, 1.0, &what);
}

/// Real and masked rows at different 16-byte offsets (the kernel's 8-byte, 4-byte or scalar
/// path, by the alignment they share): the values
/// must not change. On a host-data backend the offsets are those of the host slices (the CUDA
/// backend copies them into fresh device buffers; tests/gpu/cuda_kernel.rs offsets device views).
pub fn real_and_masked_with_different_alignment(b: &dyn Backend) {
    // masked one element into its allocation.
    misaligned::<f16>(b, 3, 1000, 0, 1, false);
    misaligned::<f16>(b, 2, 50257, 0, 1, false);
    // Both offset differently, through slice_rows of a larger tensor (odd V).
    misaligned::<bf16>(b, 4, 333, 0, 3, true);
    misaligned::<f32>(b, 3, 1001, 2, 1, true);
    // Offsets that agree mod 8 or mod 4 but not mod 16 (the kernels' 8- and 4-byte vectors):
    // 8 bytes apart, whole and split rows; 4 bytes apart (f16/bf16); sliced rows of odd V whose
    // offsets then vary from row to row.
    misaligned::<bf16>(b, 3, 1000, 0, 4, false);
    misaligned::<f16>(b, 2, 50257, 4, 0, false);
    misaligned::<f32>(b, 3, 999, 0, 2, false);
    misaligned::<f16>(b, 3, 1000, 0, 2, false);
    misaligned::<bf16>(b, 2, 50257, 2, 0, false);
    misaligned::<bf16>(b, 5, 333, 0, 2, true);
    misaligned::<f16>(b, 4, 1001, 4, 0, true);
}

/// Two runs of the same batch are equal bit for bit: the split path (row tickets, partials)
/// and the whole pipeline (turns, trajectories).
pub fn bitwise_deterministic(b: &dyn Backend) {
    let s = Spec::new(3, 50257);
    let (r, m, targets) = generate(&s, 41);
    let (real, masked) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
    let batch = Batch::rows(Logits::new(&real, 3, s.v).unwrap(), Logits::new(&masked, 3, s.v).unwrap(), &targets);
    let a = b.compute(&batch, &Params::default()).unwrap();
    let c = b.compute(&batch, &Params::default()).unwrap();
    assert_eq!(row_bits(&a), row_bits(&c));

    let l = layout();
    let (r, m, targets) = generate(&Spec::new(64, 31), 42);
    let batch = Batch::rows(Logits::new(&r, 64, 31).unwrap(), Logits::new(&m, 64, 31).unwrap(), &targets)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    let a = b.compute(&batch, &Params::default()).unwrap();
    let c = b.compute(&batch, &Params::default()).unwrap();
    assert_eq!(row_bits(&a), row_bits(&c));
    let f64_bits = |o: &Output| {
        let adv = o.advantages.as_ref().unwrap();
        [
            o.turn_info.as_ref().unwrap(),
            &adv.turn_intrinsic,
            &adv.turn_intrinsic_norm,
            &adv.turn_bonus,
            &adv.trajectory_advantage,
            &adv.trajectory_gate,
            &vec![adv.outcome_std, adv.intrinsic_std, adv.magnitude_ratio],
        ]
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect::<Vec<_>>()
    };
    assert_eq!(f64_bits(&a), f64_bits(&c));
}

// ------------------------------------------------------------------------------------------
// Row errors.

fn expect_error<T: LogitElement>(
    b: &dyn Backend,
    n: usize,
    v: usize,
    edit: impl Fn(&mut [f32], &mut [f32], &mut [i64]),
) {
    let (mut r, mut m, mut targets) = generate(&Spec::new(n, v), 51);
    edit(&mut r, &mut m, &mut targets);
    let (real, masked) = (to_dtype::<T>(&r), to_dtype::<T>(&m));
    let (rf, mf) = (to_f64(&real), to_f64(&masked));
    let want = (0..n).find_map(|row| {
        oracle_code(&rf[row * v..(row + 1) * v], &mf[row * v..(row + 1) * v], targets[row]).map(|k| (row, k))
    });
    let batch = Batch::rows(Logits::new(&real, n, v).unwrap(), Logits::new(&masked, n, v).unwrap(), &targets);
    let got = b.compute(&batch, &Params::default());
    match (got, want) {
        (Err(Error::Row { row, kind, target }), Some((wr, wk))) => {
            assert_eq!((row, kind, target), (wr, wk, Some(targets[wr])), "{} {} V={v}", b.name(), T::DTYPE);
        }
        (got, want) => panic!("{} {} V={v}: got {got:?}, want {want:?}", b.name(), T::DTYPE),
    }
}

/// Each of the seven row errors, deep in the row (the last split for large V), in every dtype,
/// and the priority: lowest row first, then the contract's order within the row.
pub fn every_row_error_code_with_priority(b: &dyn Backend) {
    const INF: f32 = f32::INFINITY;
    const NAN: f32 = f32::NAN;
    const NEG: f32 = f32::NEG_INFINITY;
    for &v in &[37usize, 50257] {
        let row = |r: usize| r * v;
        let other = |t: &[i64], r: usize| if t[r] == 0 { 1 } else { 0 };
        // 1: target out of range (both signs), row 2; row 3 also bad but later.
        expect_error::<f32>(b, 5, v, |_, _, t| {
            t[2] = v as i64;
            t[3] = -1;
        });
        expect_error::<f32>(b, 5, v, |_, _, t| t[2] = -7);
        // 2 / 3: NaN and +∞.
        expect_error::<f32>(b, 5, v, |x, _, _| x[row(2) + v - 1] = NAN);
        expect_error::<bf16>(b, 5, v, |x, _, t| {
            let o = other(t, 1);
            x[row(1) + o] = INF
        });
        expect_error::<f16>(b, 5, v, |_, y, _| y[row(4) + v / 2] = NAN);
        expect_error::<f32>(b, 5, v, |_, y, t| {
            let o = other(t, 0);
            y[row(0) + o] = INF
        });
        // 4 / 5: a whole row at −∞.
        expect_error::<f32>(b, 5, v, |x, _, _| x[row(3)..row(4)].fill(NEG));
        expect_error::<f16>(b, 5, v, |_, y, _| y[row(3)..row(4)].fill(NEG));
        // 6 / 7: the target at −∞.
        expect_error::<f32>(b, 5, v, |x, _, t| x[row(2) + t[2] as usize] = NEG);
        expect_error::<bf16>(b, 5, v, |_, y, t| y[row(2) + t[2] as usize] = NEG);
        // Priority: lowest row first (row 1 code 7 beats row 3 code 1), then lowest code
        // (row 2: NaN masked (3) and −∞ real target (6) → 3; with a real +∞ (2) → 2).
        expect_error::<f32>(b, 5, v, |_, y, t| {
            t[3] = 1 << 40;
            y[row(1) + t[1] as usize] = NEG;
        });
        expect_error::<f32>(b, 5, v, |x, y, t| {
            x[row(2) + t[2] as usize] = NEG;
            y[row(2) + v - 1] = NAN;
        });
        expect_error::<f32>(b, 5, v, |x, y, t| {
            x[row(2) + t[2] as usize] = NEG;
            y[row(2)] = NAN;
            let o = other(t, 2);
            x[row(2) + o] = INF;
            x[row(4)] = NAN;
        });
    }
}

// ------------------------------------------------------------------------------------------
// Turns, trajectories, micro-batches.

pub struct Layout {
    pub offsets: Vec<u32>,
    pub trajectory: Vec<u32>,
    pub credit: Vec<u32>,
    pub group: Vec<u32>,
    pub outcome: Vec<f64>,
    pub tokens: Vec<u32>,
}

impl Layout {
    pub fn turns(&self) -> Turns<'_> {
        Turns { offsets: &self.offsets, trajectory: &self.trajectory, credit_tokens: &self.credit }
    }
    pub fn trajectories(&self) -> Trajectories<'_> {
        Trajectories { group: &self.group, outcome: &self.outcome, tokens: &self.tokens }
    }
}

/// 64 rows over 12 turns (two of them empty) of 6 trajectories in 3 groups (one a singleton),
/// with one group whose intrinsic pool is a single credited token.
pub fn layout() -> Layout {
    Layout {
        offsets: vec![0, 5, 5, 17, 20, 31, 31, 40, 41, 50, 58, 60, 64],
        trajectory: vec![0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 5, 5],
        credit: vec![3, 1, 7, 2, 5, 5, 1, 4, 2, 6, 1, 9],
        group: vec![10, 10, 7, 42, 42, 42],
        outcome: vec![1.0, 0.0, 0.5, 1.0, 0.25, 0.0],
        tokens: vec![20, 9, 11, 1, 30, 40],
    }
}

/// The defaults, the other estimator, normalisation off, and the official pipeline's ablation
/// knobs (centre only with a pool tolerance, intrinsic only).
fn epilogue_params() -> [Params; 5] {
    [
        Params::default(),
        Params { estimator: Estimator::Kl, ..Params::default() },
        Params { normalize: false, beta: 0.3, gate_temperature: 0.5, ..Params::default() },
        Params { centre_only: true, pool_tolerance: 0.03, ..Params::default() },
        Params { intrinsic_only: true, estimator: Estimator::Kl, ..Params::default() },
    ]
}

/// The 64-row batch of [`layout`] with V logits of bf16, for [`epilogue_matches_oracle`] and
/// [`micro_batches_match_one_batch`].
fn layout_data(v: usize, seed: u64) -> (Vec<bf16>, Vec<bf16>, Vec<i64>) {
    let (r, m, targets) = generate(&Spec::new(64, v), seed);
    (to_dtype(&r), to_dtype(&m), targets)
}

/// Rows, turns, trajectories and batch scalars of one call against the oracle, for each
/// estimator and with normalisation off.
pub fn epilogue_matches_oracle(b: &dyn Backend) {
    let l = layout();
    for (v, seed) in [(31usize, 61u64), (5000, 62)] {
        let (real, masked, targets) = layout_data(v, seed);
        let (rf, mf) = (to_f64(&real), to_f64(&masked));
        let batch = Batch::rows(Logits::new(&real, 64, v).unwrap(), Logits::new(&masked, 64, v).unwrap(), &targets)
            .with_turns(l.turns())
            .with_trajectories(l.trajectories());
        for params in epilogue_params() {
            let out = b.compute(&batch, &params).unwrap();
            let what = format!("{} bf16 N=64 V={v} {params:?}", b.name());
            compare_rows(&out.rows, &rf, &mf, &targets, v, 1.0, &what);
            let est = epilogue_feed(b, &out, params.estimator, &rf, &mf, &targets, 1.0);
            check_epilogue(&out, &est, &l.turns(), &l.trajectories(), &params);
        }
    }
}

/// `compute_micro_batched` with a turn spanning cuts, an empty micro-batch and a final empty
/// one equals one batch: the rows bit for bit (V < 2·MIN_CHUNK, so every launch has one block
/// per row and the same block size whatever the rows per launch or the SM count), the epilogue
/// against the oracle and to 1e-12 of one batch (the f64 per-turn sums round differently).
pub fn micro_batches_match_one_batch(b: &dyn Backend) {
    let l = layout();
    for (v, seed) in [(31usize, 61u64), (5000, 62)] {
        let (real, masked, targets) = layout_data(v, seed);
        let (rf, mf) = (to_f64(&real), to_f64(&masked));
        let batch = Batch::rows(Logits::new(&real, 64, v).unwrap(), Logits::new(&masked, 64, v).unwrap(), &targets)
            .with_turns(l.turns())
            .with_trajectories(l.trajectories());
        for params in epilogue_params() {
            let one = b.compute(&batch, &params).unwrap();
            let micro = b.compute_micro_batched(&batch, &params, &[7, 18, 18, 33, 64]).unwrap();
            let est = epilogue_feed(b, &micro, params.estimator, &rf, &mf, &targets, 1.0);
            check_epilogue(&micro, &est, &l.turns(), &l.trajectories(), &params);
            assert_eq!(row_bits(&one), row_bits(&micro), "{} V={v} {params:?}", b.name());
            let (x, y) = (one.advantages.as_ref().unwrap(), micro.advantages.as_ref().unwrap());
            assert_close("turn_bonus", &y.turn_bonus, &x.turn_bonus, 1e-12, 1e-12);
            assert_close("turn_info", micro.turn_info.as_ref().unwrap(), one.turn_info.as_ref().unwrap(), 1e-12, 1e-12);
        }
    }
    // Rows only, cut into single rows and a remainder.
    let (real, masked, targets) = layout_data(31, 63);
    let batch = Batch::rows(Logits::new(&real, 64, 31).unwrap(), Logits::new(&masked, 64, 31).unwrap(), &targets);
    let one = b.compute(&batch, &Params::default()).unwrap();
    let micro = b.compute_micro_batched(&batch, &Params::default(), &[0, 1, 2, 3, 40]).unwrap();
    assert_eq!(row_bits(&one), row_bits(&micro));
    assert!(micro.turn_info.is_none() && micro.advantages.is_none());
}

pub fn turns_without_trajectories_and_empty_turns(b: &dyn Backend) {
    let offsets = [0u32, 0, 3, 3, 3, 10];
    let trajectory = [0u32, 0, 0, 0, 0];
    let credit = [1u32, 2, 3, 4, 5];
    let turns = Turns { offsets: &offsets, trajectory: &trajectory, credit_tokens: &credit };
    let (r, m, targets) = generate(&Spec::new(10, 77), 71);
    let batch =
        Batch::rows(Logits::new(&r, 10, 77).unwrap(), Logits::new(&m, 10, 77).unwrap(), &targets).with_turns(turns);
    let out = b.compute(&batch, &Params::default()).unwrap();
    let info = out.turn_info.clone().unwrap();
    assert!(out.advantages.is_none());
    assert_eq!((info[0], info[2], info[3]), (0.0, 0.0, 0.0));
    let est = epilogue_feed(b, &out, Estimator::LogRatio, &f32s(&r), &f32s(&m), &targets, 1.0);
    let mean = |a: usize, c: usize| est[a..c].iter().sum::<f64>() / (c - a) as f64;
    assert!((info[1] - mean(0, 3)).abs() < 1e-12);
    assert!((info[4] - mean(3, 10)).abs() < 1e-12);
}

/// Bad parameters, shapes, dtypes, layouts and micro-batch cuts are typed errors.
pub fn validation_errors_are_typed(b: &dyn Backend) {
    let r = vec![0f32; 6];
    let t = [0i64, 1];
    let x = Logits::new(&r, 2, 3).unwrap();
    let batch = Batch::rows(x, x, &t);
    for p in [
        Params { temperature: 0.0, ..Params::default() },
        Params { temperature: f64::NAN, ..Params::default() },
        Params { gate_temperature: -1.0, ..Params::default() },
        Params { eps: -1e-3, ..Params::default() },
        Params { beta: f64::INFINITY, ..Params::default() },
    ] {
        assert!(matches!(b.compute(&batch, &p), Err(Error::Param { .. })), "{p:?}");
    }
    let r16 = vec![f16::ZERO; 6];
    let mixed = Batch::rows(x, Logits::new(&r16, 2, 3).unwrap(), &t);
    assert!(matches!(b.compute(&mixed, &Params::default()), Err(Error::DtypeMismatch { .. })));
    let other_shape = Batch::rows(x, Logits::new(&r, 3, 2).unwrap(), &t);
    assert!(matches!(b.compute(&other_shape, &Params::default()), Err(Error::Shape { .. })));
    assert!(matches!(b.compute(&Batch::rows(x, x, &[0]), &Params::default()), Err(Error::Shape { .. })));
    for cuts in [&[2usize, 1][..], &[3]] {
        let e = b.compute_micro_batched(&batch, &Params::default(), cuts);
        assert!(matches!(e, Err(Error::Shape { .. })), "cuts {cuts:?}: {e:?}");
    }
    let bad_turns = Turns { offsets: &[0, 3], trajectory: &[0], credit_tokens: &[1] };
    assert!(matches!(b.compute(&batch.with_turns(bad_turns), &Params::default()), Err(Error::Turns { .. })));
    let turns = Turns { offsets: &[0, 2], trajectory: &[0], credit_tokens: &[1] };
    let traj = Trajectories { group: &[0], outcome: &[1.0], tokens: &[1] };
    let e = b.compute(&batch.with_turns(turns).with_trajectories(traj), &Params::default());
    assert!(matches!(e, Err(Error::Trajectories { .. })), "{e:?}");
}

// ------------------------------------------------------------------------------------------
// Numerics that must not depend on the backend or the launch shape.

/// [n, v] logits given as f32, rounded to T, through `b` with `params`: the result and the
/// logits as f64 exactly as the backend read them.
fn run_rows<T: LogitElement>(
    b: &dyn Backend,
    (r, m, targets): (&[f32], &[f32], &[i64]),
    v: usize,
    params: &Params,
) -> (Result<Output, Error>, Vec<f64>, Vec<f64>) {
    let n = targets.len();
    let (real, masked) = (to_dtype::<T>(r), to_dtype::<T>(m));
    let batch = Batch::rows(Logits::new(&real, n, v).unwrap(), Logits::new(&masked, n, v).unwrap(), targets);
    (b.compute(&batch, params), to_f64(&real), to_f64(&masked))
}

/// `run_rows` in dtype 0 = f32, 1 = f16, 2 = bf16.
fn run_rows_in(
    dtype: usize,
    b: &dyn Backend,
    data: (&[f32], &[f32], &[i64]),
    v: usize,
    params: &Params,
) -> (Result<Output, Error>, Vec<f64>, Vec<f64>) {
    match dtype {
        0 => run_rows::<f32>(b, data, v, params),
        1 => run_rows::<f16>(b, data, v, params),
        _ => run_rows::<bf16>(b, data, v, params),
    }
}

const DTYPE_NAMES: [&str; 3] = ["f32", "f16", "bf16"];

/// Confident rows: the target is the maximum of both rows and every other token lies at least
/// 60 nats (after the temperature) below it, so both log-sum-exps equal the maximum in f64 and in
/// f32 (the other terms vanish next to 1) and log_ratio is exactly 0. Some other tokens are −∞.
pub fn peaked(n: usize, v: usize, temperature: f64, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let gap = (60.0 * temperature) as f32;
    let (mut real, mut masked, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let a = rng.gen_range(0..v);
        targets.push(a as i64);
        let (top_r, top_m) = (rng.gen_range(-8.0f32..25.0), rng.gen_range(-8.0f32..25.0));
        for i in 0..v {
            let below = |top: f32, rng: &mut StdRng| {
                if rng.gen_bool(0.05) {
                    f32::NEG_INFINITY
                } else {
                    top - gap - rng.gen::<f32>() * 20.0
                }
            };
            real.push(if i == a { top_r } else { below(top_r, &mut rng) });
            masked.push(if i == a { top_m } else { below(top_m, &mut rng) });
        }
    }
    (real, masked, targets)
}

/// A row whose target is the argmax of both policies, the other tokens far below, has
/// log_ratio exactly 0 (as PyTorch's x − max gives), in every dtype, shape (split rows included)
/// and temperature; so such turns have intrinsic exactly 0 and stay out of the group pools.
pub fn peaked_rows_give_exact_zero_log_ratio(b: &dyn Backend) {
    for &(n, v) in &[(1usize, 1usize), (3, 7), (64, 31), (5, 1000), (2, 50257), (1, 151936)] {
        for (k, &temperature) in [1.0, 0.7, 2.5].iter().enumerate() {
            let (r, m, targets) = peaked(n, v, temperature, (n * 7919 + v + k) as u64);
            let params = Params { temperature, ..Params::default() };
            for (dtype, name) in DTYPE_NAMES.iter().enumerate() {
                let (got, rf, mf) = run_rows_in(dtype, b, (&r, &m, &targets), v, &params);
                let out = got.unwrap();
                let what = format!("{} {name} N={n} V={v} τs={temperature}", b.name());
                compare_rows(&out.rows, &rf, &mf, &targets, v, temperature, &what);
                for (row, &a) in targets.iter().enumerate() {
                    let range = row * v..(row + 1) * v;
                    let o = oracle_row(&rf[range.clone()], &mf[range], a as usize, temperature);
                    assert_eq!(o.log_ratio, 0.0, "{what} row {row}: the data should be peaked");
                    let got = out.rows.log_ratio[row];
                    assert!(got == 0.0, "{what} row {row}: log_ratio {got:e} is not exactly 0");
                }
            }
        }
    }
    // Through the epilogue: every turn's intrinsic value is exactly 0, so none enters a pool.
    let l = layout();
    let (r, m, targets) = peaked(64, 31, 1.3, 97);
    let (real, masked) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
    let batch = Batch::rows(Logits::new(&real, 64, 31).unwrap(), Logits::new(&masked, 64, 31).unwrap(), &targets)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    let out = b.compute(&batch, &Params { temperature: 1.3, ..Params::default() }).unwrap();
    let adv = out.advantages.unwrap();
    assert!(adv.turn_intrinsic.iter().all(|&v| v == 0.0), "{}: {:?}", b.name(), adv.turn_intrinsic);
    assert!(adv.turn_intrinsic_norm.iter().all(|&v| v == 0.0), "{}: {:?}", b.name(), adv.turn_intrinsic_norm);
    assert!(adv.turn_bonus.iter().all(|&v| v == 0.0), "{}: {:?}", b.name(), adv.turn_bonus);
}

/// A masked −∞ on a token whose real probability is tiny makes kl +∞ wherever it sits: before
/// or after the row maximum, in another split of the row, in a scalar head or tail. Depths (nats
/// below the maximum, after the temperature): 95 puts the probability between 2⁻¹⁴⁹ and 2⁻¹²⁶
/// (flushed to 0 only with flush-to-zero, as on the GPU), 1000 below every f32 and f64 weight.
pub fn tiny_probability_gap_gives_infinite_kl(b: &dyn Backend) {
    for &(n, v) in &[(4usize, 7usize), (6, 1000), (3, 4099), (2, 50257), (1, 151936)] {
        for &depth in &[95.0f64, 1000.0] {
            for (k, &temperature) in [1.0, 2.0].iter().enumerate() {
                let seed = (v * 31 + n + k) as u64 + depth as u64;
                let (mut r, mut m, targets) = generate(&Spec::new(n, v), seed);
                let mut rng = StdRng::seed_from_u64(seed);
                for row in 0..n {
                    let a = targets[row] as usize;
                    // Maximum and gap: first/last, last/first, then two random placements.
                    let (top, gap) = match row % 4 {
                        0 => (0, v - 1),
                        1 => (v - 1, 0),
                        _ => (rng.gen_range(0..v), rng.gen_range(0..v)),
                    };
                    let mut g = gap;
                    while g == a || g == top {
                        g = (g + 1) % v;
                    }
                    r[row * v + top] = 30.0;
                    r[row * v + g] = 30.0 - (depth * temperature) as f32;
                    m[row * v + g] = f32::NEG_INFINITY;
                }
                let params = Params { temperature, ..Params::default() };
                for (dtype, name) in DTYPE_NAMES.iter().enumerate() {
                    let (got, rf, mf) = run_rows_in(dtype, b, (&r, &m, &targets), v, &params);
                    let out = got.unwrap();
                    let what = format!("{} {name} N={n} V={v} depth {depth} τs={temperature}", b.name());
                    assert!(out.rows.kl.iter().all(|k| *k == f32::INFINITY), "{what}: kl {:?}", out.rows.kl);
                    compare_rows(&out.rows, &rf, &mf, &targets, v, temperature, &what);
                }
            }
        }
    }
}

/// Logit processors mask with `finfo(dtype).min` (−3.39e38 in bf16 and f32): a raw logit at or
/// below −2¹⁰⁰ counts as −∞ (so a masked fill where the real token has mass gives kl = +∞, as
/// −∞ does), one at or above +2¹⁰⁰ as +∞ (a row error); whole rows or targets of fills are
/// the −∞ row errors.
pub fn mask_fills_count_as_infinities(b: &dyn Backend) {
    let fills = [f32::MIN, bf16::MIN.to_f32(), -(2f32.powi(100))];
    for &(n, v) in &[(8usize, 37usize), (3, 5000), (2, 50257)] {
        for (k, &temperature) in [1.0, 0.5, 3.0].iter().enumerate() {
            let seed = (v + 13 * n + k) as u64;
            let (mut r, mut m, targets) = generate(&Spec::new(n, v), seed);
            let mut rng = StdRng::seed_from_u64(seed);
            for row in 0..n {
                for i in (0..v).filter(|&i| i != targets[row] as usize) {
                    let fill = fills[rng.gen_range(0..fills.len())];
                    match rng.gen_range(0..12) {
                        0 => r[row * v + i] = fill,
                        1 => m[row * v + i] = fill,
                        2 => (r[row * v + i], m[row * v + i]) = (fill, fill),
                        _ => {}
                    }
                }
                // At least one masked fill where the real token has mass: kl = +∞.
                let o = row * v + if targets[row] == 0 { 1 } else { 0 };
                (r[o], m[o]) = (1.0, fills[row % fills.len()]);
            }
            let params = Params { temperature, ..Params::default() };
            for dtype in [0, 2] {
                let (got, rf, mf) = run_rows_in(dtype, b, (&r, &m, &targets), v, &params);
                let out = got.unwrap();
                let what = format!("{} {} N={n} V={v} fills τs={temperature}", b.name(), DTYPE_NAMES[dtype]);
                assert!(out.rows.kl.iter().all(|k| *k == f32::INFINITY), "{what}: kl {:?}", out.rows.kl);
                compare_rows(&out.rows, &rf, &mf, &targets, v, temperature, &what);
            }
        }
    }
    let pos_limit = 2f32.powi(100);
    for &v in &[37usize, 50257] {
        let row = |r: usize| r * v;
        let other = |t: &[i64], r: usize| row(r) + if t[r] == 0 { 1 } else { 0 };
        expect_error::<f32>(b, 5, v, |_, y, _| y[row(2)..row(3)].fill(f32::MIN));
        expect_error::<bf16>(b, 5, v, |x, _, _| x[row(1)..row(2)].fill(bf16::MIN.to_f32()));
        expect_error::<f32>(b, 5, v, |x, _, t| x[row(3) + t[3] as usize] = -pos_limit);
        expect_error::<bf16>(b, 5, v, |_, y, t| y[row(0) + t[0] as usize] = bf16::MIN.to_f32());
        expect_error::<f32>(b, 5, v, |x, _, t| x[other(t, 2)] = pos_limit);
        expect_error::<bf16>(b, 5, v, |_, y, t| y[other(t, 4)] = bf16::MAX.to_f32());
    }
}

/// With trajectories, a turn whose info is not finite (a row with kl = +∞ under the KL
/// estimator) is a typed error naming the turn and the row, after any row error of the batch
/// (in any micro-batch); the +∞ row itself stays a valid output without trajectories, and the
/// log-ratio estimator is unaffected.
pub fn non_finite_turn_info_is_an_error(b: &dyn Backend) {
    let l = layout();
    let v = 31;
    let (r, mut m, mut targets) = generate(&Spec::new(64, v), 81);
    // Rows 33 (turn 6: rows 31..40) and 45 (turn 8): a masked −∞ where the real token has mass.
    for row in [33usize, 45] {
        let o = if targets[row] == 0 { 1 } else { 0 };
        m[row * v + o] = f32::NEG_INFINITY;
    }
    let kl = Params { estimator: Estimator::Kl, ..Params::default() };
    let run = |m: &[f32], targets: &[i64], p: &Params, cuts: Option<&[usize]>, trajectories: bool| {
        let batch =
            Batch::rows(Logits::new(&r, 64, v).unwrap(), Logits::new(m, 64, v).unwrap(), targets).with_turns(l.turns());
        let batch = if trajectories { batch.with_trajectories(l.trajectories()) } else { batch };
        match cuts {
            Some(c) => b.compute_micro_batched(&batch, p, c),
            None => b.compute(&batch, p),
        }
    };
    for cuts in [None, Some(&[20usize, 40][..]), Some(&[33, 34, 64][..])] {
        match run(&m, &targets, &kl, cuts, true) {
            Err(Error::NonFiniteTurn { turn: 6, row: Some(33) }) => {}
            other => panic!("{} cuts {cuts:?}: {other:?}", b.name()),
        }
    }
    let e = run(&m, &targets, &kl, None, true).unwrap_err().to_string();
    assert!(e.contains("turn 6") && e.contains("row 33"), "{e}");
    // Turns only: no advantages, turn_info +∞ is the true mean; rows keep kl = +∞.
    let out = run(&m, &targets, &kl, None, false).unwrap();
    assert_eq!(out.turn_info.as_ref().unwrap()[6], f64::INFINITY);
    assert_eq!(out.rows.kl[33], f32::INFINITY);
    // The log-ratio estimator never sees the +∞.
    let out = run(&m, &targets, &Params::default(), None, true).unwrap();
    assert!(out.advantages.unwrap().turn_bonus.iter().all(|x| x.is_finite()));
    // A row error anywhere in the batch wins, even in a later micro-batch.
    targets[50] = -1;
    for cuts in [None, Some(&[40usize][..])] {
        match run(&m, &targets, &kl, cuts, true) {
            Err(Error::Row { row: 50, kind: infopo_kernels::RowErrorKind::TargetOutOfRange, .. }) => {}
            other => panic!("{} cuts {cuts:?}: {other:?}", b.name()),
        }
    }
}

/// τs outside [1e-3, 1e3] is a parameter error on every backend; the bounds themselves work
/// (with −∞ entries) and match the oracle.
pub fn temperature_outside_its_range_is_a_parameter_error(b: &dyn Backend) {
    let s = Spec { neg_inf: 0.1, ..Spec::new(4, 300) };
    let (r, m, targets) = generate(&s, 91);
    let batch = Batch::rows(Logits::new(&r, 4, 300).unwrap(), Logits::new(&m, 4, 300).unwrap(), &targets);
    for t in [1e-9, 9.9e-4, 1000.5, 1e9] {
        let got = b.compute(&batch, &Params { temperature: t, ..Params::default() });
        assert!(matches!(got, Err(Error::Param { name: "temperature", .. })), "{} τs={t}: {got:?}", b.name());
    }
    for t in [1e-3, 1e3] {
        check_rows::<f32>(b, &Spec { temperature: t, ..s }, 92);
        check_rows::<bf16>(b, &Spec { temperature: t, ..s }, 93);
    }
}

// ------------------------------------------------------------------------------------------
// Token-level advantages and the intrinsic gate (contract §4).

/// [`check_epilogue`], and `token_advantage` against the oracle's, built token by token from
/// the oracle's advantages and bonuses.
#[track_caller]
pub fn check_token_advantage(
    out: &Output,
    est: &[f64],
    turns: &Turns<'_>,
    traj: &Trajectories<'_>,
    starts: &[u32],
    p: &Params,
) {
    check_epilogue(out, est, turns, traj, p);
    let o = oracle_batch_advantages(est, turns, traj, p);
    let want = oracle_token_advantage(&o, turns.trajectory, turns.credit_tokens, starts, traj.tokens);
    let got = out.advantages.as_ref().unwrap().token_advantage.as_ref().expect("token_advantage");
    assert_close("token_advantage", got, &want, EPILOGUE_TOL, EPILOGUE_TOL);
}

/// A random layout whose turns have credited spans: trajectories with gaps before, between
/// and after their turns' spans (uncredited tokens), some trajectories without turns, some
/// turns without rows.
pub struct SpanLayout {
    pub layout: Layout,
    pub starts: Vec<u32>,
}

pub fn random_span_layout(rng: &mut StdRng, rows: usize) -> SpanLayout {
    let n_traj = rng.gen_range(1..7usize);
    let n_turns = rng.gen_range(1..12usize);
    let mut cuts: Vec<u32> = (0..n_turns - 1).map(|_| rng.gen_range(0..=rows as u32)).collect();
    cuts.sort_unstable();
    let mut offsets = vec![0];
    offsets.extend(cuts);
    offsets.push(rows as u32);
    let trajectory: Vec<u32> = (0..n_turns).map(|_| rng.gen_range(0..n_traj as u32)).collect();
    let credit: Vec<u32> = (0..n_turns).map(|_| rng.gen_range(1..6)).collect();
    let mut starts = vec![0u32; n_turns];
    let mut tokens = vec![0u32; n_traj];
    for (i, n) in tokens.iter_mut().enumerate() {
        // This trajectory's turns in a random order along its response, with random gaps.
        let mut mine: Vec<usize> = (0..n_turns).filter(|&t| trajectory[t] as usize == i).collect();
        for k in (1..mine.len()).rev() {
            mine.swap(k, rng.gen_range(0..=k));
        }
        let mut pos = rng.gen_range(0..4u32);
        for t in mine {
            starts[t] = pos;
            pos += credit[t] + rng.gen_range(0..4u32);
        }
        *n = pos + rng.gen_range(0..3u32);
    }
    tokens[0] = tokens[0].max(2);
    let groups = rng.gen_range(1..4u32);
    let group: Vec<u32> = (0..n_traj).map(|_| 5 * rng.gen_range(0..groups) + 1).collect();
    let outcome: Vec<f64> = (0..n_traj).map(|_| rng.gen_range(0..3) as f64 * 0.5).collect();
    SpanLayout { layout: Layout { offsets, trajectory, credit, group, outcome, tokens }, starts }
}

fn gate_params() -> [Params; 6] {
    let intrinsic = Params { gate_source: GateSource::Intrinsic, ..Params::default() };
    [
        Params::default(),
        intrinsic,
        Params { estimator: Estimator::Kl, gate_temperature: 0.5, ..intrinsic },
        Params { normalize: false, beta: 0.3, gate_temperature: 2.0, ..intrinsic },
        Params { centre_only: true, pool_tolerance: 0.02, ..intrinsic },
        Params { intrinsic_only: true, ..Params::default() },
    ]
}

/// The official pipeline's ablation knobs at their edges (contract §4), on the 64-row
/// [`layout`]: centre only gives the singleton group's trajectory its outcome exactly and
/// matches the oracle; `pool_tolerance` at exactly a turn's |intrinsic| takes that turn out of
/// its group's pool (norm 0) while a tolerance just below keeps it in; intrinsic only leaves
/// advantages and gates as they were and drops β and the gate from the bonus.
pub fn ablation_edge_cases(b: &dyn Backend) {
    let l = layout();
    let (real, masked, targets) = layout_data(300, 65);
    let (rf, mf) = (to_f64(&real), to_f64(&masked));
    let batch = Batch::rows(Logits::new(&real, 64, 300).unwrap(), Logits::new(&masked, 64, 300).unwrap(), &targets)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    let run = |p: &Params| b.compute(&batch, p).unwrap_or_else(|e| panic!("{} {p:?}: {e}", b.name()));
    let check = |p: &Params| {
        let out = run(p);
        let est = epilogue_feed(b, &out, p.estimator, &rf, &mf, &targets, 1.0);
        check_epilogue(&out, &est, &l.turns(), &l.trajectories(), p);
        out.advantages.unwrap()
    };
    let base = check(&Params::default());

    let centre = check(&Params { centre_only: true, ..Params::default() });
    assert_eq!(centre.trajectory_advantage[2], l.outcome[2], "{}: singleton group, centre only", b.name());
    assert_eq!(centre.trajectory_gate, base.trajectory_gate, "{}: the gate keeps σ_g", b.name());

    let only = check(&Params { intrinsic_only: true, ..Params::default() });
    assert_eq!(only.trajectory_advantage, base.trajectory_advantage, "{}", b.name());
    for t in 0..l.trajectory.len() {
        let want = only.magnitude_ratio * only.turn_intrinsic_norm[t];
        assert!(close(only.turn_bonus[t], want, 1e-12, 1e-12), "{}: turn {t} bonus", b.name());
    }

    // The smallest non-zero |intrinsic| among turns of groups that pool at least two turns.
    let group_of = |t: usize| l.group[l.trajectory[t] as usize];
    let pooled = |t: usize| base.turn_intrinsic[t] != 0.0;
    let t0 = (0..l.trajectory.len())
        .filter(|&t| pooled(t) && (0..l.trajectory.len()).any(|u| u != t && pooled(u) && group_of(u) == group_of(t)))
        .min_by(|&x, &y| base.turn_intrinsic[x].abs().total_cmp(&base.turn_intrinsic[y].abs()))
        .expect("a group pooling two turns");
    let tol = base.turn_intrinsic[t0].abs();
    let at = run(&Params { pool_tolerance: tol, ..Params::default() }).advantages.unwrap();
    assert_eq!(at.turn_intrinsic[t0].to_bits(), base.turn_intrinsic[t0].to_bits(), "{}", b.name());
    assert_eq!(at.turn_intrinsic_norm[t0], 0.0, "{}: |intrinsic| = tolerance is out of the pool", b.name());
    for t in 0..l.trajectory.len() {
        if at.turn_intrinsic[t].abs() <= tol {
            assert_eq!(at.turn_intrinsic_norm[t], 0.0, "{}: turn {t}", b.name());
        }
    }
    let below = run(&Params { pool_tolerance: tol * (1.0 - 1e-9), ..Params::default() }).advantages.unwrap();
    assert_eq!(below.turn_intrinsic_norm[t0], base.turn_intrinsic_norm[t0], "{}: just below, still pooled", b.name());
    assert_ne!(below.turn_intrinsic_norm[t0], 0.0, "{}", b.name());
    // Between t0's value and the next larger one: the oracle agrees (no tie at the threshold).
    let next = (0..l.trajectory.len())
        .map(|t| base.turn_intrinsic[t].abs())
        .filter(|&v| v > tol)
        .fold(f64::INFINITY, f64::min);
    check(&Params { pool_tolerance: (tol + next) / 2.0, ..Params::default() });
}

/// `token_advantage` on random span layouts (gaps, uncredited tokens, empty turns,
/// trajectories without turns), both gate sources, one batch and micro-batched, against the
/// float64 oracle; without credit starts there is none.
pub fn token_advantages_match_oracle(b: &dyn Backend, cases: u64) {
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(900 + case);
        let (n, v) = (rng.gen_range(1..40usize), [37usize, 300][case as usize % 2]);
        let l = random_span_layout(&mut rng, n);
        let (r, m, targets) = generate(&Spec::new(n, v), 1000 + case);
        let (real, masked) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let (rf, mf) = (to_f64(&real), to_f64(&masked));
        let plain = Batch::rows(Logits::new(&real, n, v).unwrap(), Logits::new(&masked, n, v).unwrap(), &targets)
            .with_turns(l.layout.turns())
            .with_trajectories(l.layout.trajectories());
        // The padded [B, L] output as well: each trajectory at a random offset (or at 0) of rows
        // up to 3 columns wider than the widest.
        let tokens = &l.layout.trajectories().tokens;
        let offsets: Vec<u32> = tokens.iter().map(|_| rng.gen_range(0..4u32)).collect();
        let offsets = (case % 2 == 1).then_some(&offsets[..]);
        let at = |i: usize| offsets.map_or(0, |o| o[i]);
        let width = (0..tokens.len()).map(|i| at(i) + tokens[i]).max().unwrap_or(0) + rng.gen_range(0..4u32);
        let batch = plain.with_credit_start(&l.starts).with_padding(width, offsets);
        let cut = rng.gen_range(0..=n);
        for params in gate_params() {
            let what = format!("{} case {case} N={n} V={v} {params:?}", b.name());
            let out = b.compute(&batch, &params).unwrap_or_else(|e| panic!("{what}: {e}"));
            let est = epilogue_feed(b, &out, params.estimator, &rf, &mf, &targets, 1.0);
            check_token_advantage(&out, &est, &l.layout.turns(), &l.layout.trajectories(), &l.starts, &params);
            check_padded(&out, tokens, width, offsets, &what);
            let micro = b.compute_micro_batched(&batch, &params, &[cut, cut, n]).unwrap();
            let est = epilogue_feed(b, &micro, params.estimator, &rf, &mf, &targets, 1.0);
            check_token_advantage(&micro, &est, &l.layout.turns(), &l.layout.trajectories(), &l.starts, &params);
            check_padded(&micro, tokens, width, offsets, &what);
            let none = b.compute(&plain, &params).unwrap().advantages.unwrap();
            assert!(none.token_advantage.is_none() && none.padded_advantage.is_none(), "{what}");
            let unpadded = b.compute(&plain.with_credit_start(&l.starts), &params).unwrap().advantages.unwrap();
            assert!(unpadded.padded_advantage.is_none(), "{what}");
        }
    }
}

/// The gate from the intrinsic pool: the 64-row [`layout`] against the oracle (one batch and
/// micro-batched), and a group whose pool is a single credited token (turn 1 has no rows, so
/// its value is 0 and stays out of the pool): σ_g = 0, gate exactly 1/2, where the outcome
/// gate of the same group is not.
pub fn intrinsic_gate_matches_oracle(b: &dyn Backend) {
    let l = layout();
    let (real, masked, targets) = layout_data(300, 64);
    let (rf, mf) = (to_f64(&real), to_f64(&masked));
    let batch = Batch::rows(Logits::new(&real, 64, 300).unwrap(), Logits::new(&masked, 64, 300).unwrap(), &targets)
        .with_turns(l.turns())
        .with_trajectories(l.trajectories());
    for params in gate_params() {
        let out = b.compute(&batch, &params).unwrap();
        let est = epilogue_feed(b, &out, params.estimator, &rf, &mf, &targets, 1.0);
        check_epilogue(&out, &est, &l.turns(), &l.trajectories(), &params);
        let micro = b.compute_micro_batched(&batch, &params, &[10, 33]).unwrap();
        let est = epilogue_feed(b, &micro, params.estimator, &rf, &mf, &targets, 1.0);
        check_epilogue(&micro, &est, &l.turns(), &l.trajectories(), &params);
    }

    let small = Layout {
        offsets: vec![0, 4, 4, 8],
        trajectory: vec![0, 1, 2],
        credit: vec![1, 3, 2],
        group: vec![5, 5, 9],
        outcome: vec![1.0, 0.0, 0.5],
        tokens: vec![3, 4, 5],
    };
    let (r, m, targets) = generate(&Spec::new(8, 37), 65);
    let batch = Batch::rows(Logits::new(&r, 8, 37).unwrap(), Logits::new(&m, 8, 37).unwrap(), &targets)
        .with_turns(small.turns())
        .with_trajectories(small.trajectories());
    for params in gate_params() {
        let out = b.compute(&batch, &params).unwrap();
        let est = epilogue_feed(b, &out, params.estimator, &f32s(&r), &f32s(&m), &targets, 1.0);
        check_epilogue(&out, &est, &small.turns(), &small.trajectories(), &params);
        let gate = &out.advantages.as_ref().unwrap().trajectory_gate;
        let half = params.gate_source == GateSource::Intrinsic;
        assert_eq!((gate[0] == 0.5, gate[1] == 0.5), (half, half), "{} {params:?}: {gate:?}", b.name());
    }
}

/// Credited spans that overflow their trajectory or overlap are [`Error::CreditSpan`] naming the
/// turn; credit starts without trajectories or of the wrong length are typed errors too.
pub fn bad_credit_spans_are_typed(b: &dyn Backend) {
    let (r, m, targets) = generate(&Spec::new(6, 11), 66);
    let rows = Batch::rows(Logits::new(&r, 6, 11).unwrap(), Logits::new(&m, 6, 11).unwrap(), &targets);
    let turns = Turns { offsets: &[0, 2, 4, 6], trajectory: &[0, 1, 0], credit_tokens: &[2, 3, 2] };
    let traj = Trajectories { group: &[0, 0], outcome: &[1.0, 0.0], tokens: &[5, 3] };
    let batch = rows.with_turns(turns).with_trajectories(traj);
    let p = Params::default();
    // Fits exactly: turns 0 and 2 tile 0..4 of trajectory 0, turn 1 fills trajectory 1.
    assert!(b.compute(&batch.with_credit_start(&[0, 0, 2]), &p).is_ok());
    let span_error = |starts: &[u32]| match b.compute_micro_batched(&batch.with_credit_start(starts), &p, &[3]) {
        Err(Error::CreditSpan { turn, what }) => (turn, what),
        other => panic!("{} {starts:?}: {other:?}", b.name()),
    };
    // Past the end: turn 2 covers 4..6 of 5 tokens; turn 1 covers 1..4 of 3.
    let (turn, what) = span_error(&[0, 0, 4]);
    assert!(turn == 2 && what.contains("4..6") && what.contains("5 agent tokens"), "{what}");
    assert_eq!(span_error(&[0, 1, 2]).0, 1);
    // Overlap within trajectory 0 (turns 0 and 2): named by the later turn, whatever the order.
    let (turn, what) = span_error(&[0, 0, 1]);
    assert!(turn == 2 && what.contains("turn 0"), "{what}");
    assert_eq!(span_error(&[2, 0, 1]).0, 2);
    // Needs trajectories; one start per turn.
    let e = b.compute(&rows.with_turns(turns).with_credit_start(&[0, 0, 0]), &p);
    assert!(matches!(e, Err(Error::Trajectories { .. })), "{e:?}");
    let e = b.compute(&rows.with_credit_start(&[0]), &p);
    assert!(matches!(e, Err(Error::Trajectories { .. })), "{e:?}");
    let e = b.compute(&batch.with_credit_start(&[0, 0]), &p);
    assert!(matches!(e, Err(Error::Turns { .. })), "{e:?}");
}

/// `padded_advantage` is `token_advantage` scattered into `[B, width]` rows at `offsets` (0
/// without), zero elsewhere: bit for bit, written independently of the backend.
#[track_caller]
pub fn check_padded(out: &Output, tokens: &[u32], width: u32, offsets: Option<&[u32]>, what: &str) {
    let a = out.advantages.as_ref().unwrap();
    let (m, got) = (a.token_advantage.as_ref().unwrap(), a.padded_advantage.as_ref().expect("padded_advantage"));
    let w = width as usize;
    let mut want = vec![0.0; tokens.len() * w];
    let mut k = 0;
    for (i, &n) in tokens.iter().enumerate() {
        let o = offsets.map_or(0, |o| o[i] as usize);
        want[i * w + o..i * w + o + n as usize].copy_from_slice(&m[k..k + n as usize]);
        k += n as usize;
    }
    assert_eq!(got.len(), want.len(), "{what}: padded length");
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(got), bits(&want), "{what}: padded_advantage is not token_advantage scattered");
}
