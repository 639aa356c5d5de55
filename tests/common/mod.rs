//! An independent naive float64 oracle of `docs/contract.md`, written from the formulas with
//! two passes and explicit repetition (no online state, no Welford), plus shared test helpers.
#![allow(dead_code)]

/// Raw safetensors inputs and the `infopo` binary (CLI and bad-file tests).
pub mod files;
/// Kernel test bodies shared by every backend (`&dyn Backend`), checked against this oracle.
pub mod kernel;
#[cfg(feature = "cuda")]
pub mod stand_in;

use infopo_kernels::synth::Rng;
use infopo_kernels::{GateSource, LogitElement, Params, RowErrorKind, Trajectories, Turns};
use std::collections::BTreeMap;

/// Per-row values by the textbook two-pass formulas.
#[derive(Debug, Clone, Copy)]
pub struct OracleRow {
    pub lse_real: f64,
    pub lse_masked: f64,
    pub log_ratio: f64,
    pub kl: f64,
    pub entropy_real: f64,
}

/// A raw logit as the contract reads it: at or below −2¹⁰⁰ it is −∞ (a mask fill such as
/// `finfo.min`), at or above +2¹⁰⁰ it is +∞.
pub fn contract_logit(v: f64) -> f64 {
    let limit = 2f64.powi(100);
    if v <= -limit {
        f64::NEG_INFINITY
    } else if v >= limit {
        f64::INFINITY
    } else {
        v
    }
}

pub fn oracle_row(real: &[f64], masked: &[f64], target: usize, temperature: f64) -> OracleRow {
    let x: Vec<f64> = real.iter().map(|&v| contract_logit(v) / temperature).collect();
    let y: Vec<f64> = masked.iter().map(|&v| contract_logit(v) / temperature).collect();
    let lse = |v: &[f64]| {
        let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        m + v.iter().map(|&e| (e - m).exp()).sum::<f64>().ln()
    };
    let (lx, ly) = (lse(&x), lse(&y));
    let mut kl = 0.0;
    let mut px = 0.0;
    for i in 0..x.len() {
        let p = (x[i] - lx).exp();
        if p > 0.0 {
            kl += p * ((x[i] - lx) - (y[i] - ly));
            px += p * x[i];
        }
    }
    // A token the real policy can emit (x finite: p > 0 in exact arithmetic, however small its
    // f64 value) that the masked policy cannot: KL = +∞.
    if x.iter().zip(&y).any(|(&a, &b)| a.is_finite() && b == f64::NEG_INFINITY) {
        kl = f64::INFINITY;
    }
    OracleRow {
        lse_real: lx,
        lse_masked: ly,
        log_ratio: (x[target] - lx) - (y[target] - ly),
        kl,
        entropy_real: lx - px,
    }
}

/// The row error the contract (§2, "Row errors") assigns to one row, by a direct reading of its
/// seven rules in order; `None` for a good row.
pub fn oracle_code(real: &[f64], masked: &[f64], target: i64) -> Option<RowErrorKind> {
    use RowErrorKind::*;
    if target < 0 || target >= real.len() as i64 {
        return Some(TargetOutOfRange);
    }
    let a = target as usize;
    let real: &[f64] = &real.iter().map(|&v| contract_logit(v)).collect::<Vec<_>>();
    let masked: &[f64] = &masked.iter().map(|&v| contract_logit(v)).collect::<Vec<_>>();
    let bad = |s: &[f64]| s.iter().any(|x| x.is_nan() || *x == f64::INFINITY);
    let all_neg = |s: &[f64]| s.iter().all(|x| *x == f64::NEG_INFINITY);
    if bad(real) {
        Some(RealNotFinite)
    } else if bad(masked) {
        Some(MaskedNotFinite)
    } else if all_neg(real) {
        Some(RealAllNegInf)
    } else if all_neg(masked) {
        Some(MaskedAllNegInf)
    } else if real[a] == f64::NEG_INFINITY {
        Some(RealTargetNegInf)
    } else if masked[a] == f64::NEG_INFINITY {
        Some(MaskedTargetNegInf)
    } else {
        None
    }
}

/// Mean and unbiased std of an explicit list of values.
fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[derive(Debug, Clone)]
pub struct OracleAdvantages {
    pub info: Vec<f64>,
    pub intrinsic: Vec<f64>,
    pub norm: Vec<f64>,
    pub bonus: Vec<f64>,
    pub advantage: Vec<f64>,
    pub gate: Vec<f64>,
    pub outcome_std: f64,
    pub intrinsic_std: f64,
    pub magnitude_ratio: f64,
    /// The token advantage outside credited spans is 0, not advantage_i (intrinsic only).
    pub intrinsic_only: bool,
}

pub struct OracleParams {
    pub beta: f64,
    pub gate_temperature: f64,
    pub eps: f64,
    pub normalize: bool,
    /// σ_g of the gate from the group's intrinsic pool instead of its outcomes.
    pub gate_intrinsic: bool,
    /// The official `norm_adv_by_std_in_grpo = False`: R − μ and x − μ.
    pub centre_only: bool,
    /// The official `use_intrinsic_only`: bonus = ratio · norm; tokens without the outcome.
    pub intrinsic_only: bool,
    /// |intrinsic| ≤ this is out of the pool.
    pub pool_tolerance: f64,
}

impl Default for OracleParams {
    fn default() -> Self {
        OracleParams {
            beta: 0.1,
            gate_temperature: 0.05,
            eps: 1e-6,
            normalize: true,
            gate_intrinsic: false,
            centre_only: false,
            intrinsic_only: false,
            pool_tolerance: 0.0,
        }
    }
}

impl From<&Params> for OracleParams {
    fn from(p: &Params) -> Self {
        OracleParams {
            beta: p.beta,
            gate_temperature: p.gate_temperature,
            eps: p.eps,
            normalize: p.normalize,
            gate_intrinsic: p.gate_source == GateSource::Intrinsic,
            centre_only: p.centre_only,
            intrinsic_only: p.intrinsic_only,
            pool_tolerance: p.pool_tolerance,
        }
    }
}

/// [`oracle_advantages`] for a batch's own turn and trajectory views.
pub fn oracle_batch_advantages(
    estimator: &[f64],
    turns: &Turns<'_>,
    traj: &Trajectories<'_>,
    p: &Params,
) -> OracleAdvantages {
    oracle_advantages(
        estimator,
        turns.offsets,
        turns.trajectory,
        turns.credit_tokens,
        traj.group,
        traj.outcome,
        traj.tokens,
        &OracleParams::from(p),
    )
}

#[allow(clippy::too_many_arguments)]
pub fn oracle_advantages(
    estimator: &[f64],
    offsets: &[u32],
    turn_traj: &[u32],
    credit: &[u32],
    group: &[u32],
    outcome: &[f64],
    tokens: &[u32],
    p: &OracleParams,
) -> OracleAdvantages {
    let t_n = turn_traj.len();
    let info: Vec<f64> = (0..t_n)
        .map(|t| {
            let rows = &estimator[offsets[t] as usize..offsets[t + 1] as usize];
            if rows.is_empty() {
                0.0
            } else {
                rows.iter().sum::<f64>() / rows.len() as f64
            }
        })
        .collect();
    let intrinsic: Vec<f64> = (0..t_n).map(|t| info[t] / credit[t] as f64).collect();
    let mut members: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &g) in group.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    let mut mu_sigma = vec![(0.0, 1.0); group.len()];
    let mut pool_stats: BTreeMap<u32, (f64, f64)> = BTreeMap::new();
    let mut gate_sigma = vec![0.0; group.len()];
    for (&g, traj) in &members {
        let r: Vec<f64> = traj.iter().map(|&i| outcome[i]).collect();
        let ms = if r.len() == 1 { (0.0, 1.0) } else { mean_std(&r) };
        for &i in traj {
            mu_sigma[i] = ms;
        }
        let mut pool = Vec::new();
        for t in 0..t_n {
            if group[turn_traj[t] as usize] == g && intrinsic[t].abs() > p.pool_tolerance {
                pool.extend(std::iter::repeat_n(intrinsic[t], credit[t] as usize));
            }
        }
        let ps = match pool.len() {
            0 => (0.0, 1.0),
            1 => (pool[0], 1.0),
            _ => mean_std(&pool),
        };
        pool_stats.insert(g, ps);
        // The gate's σ_g: the outcomes' std, or the explicit token pool's (0 below 2 tokens).
        let sigma = if !p.gate_intrinsic {
            ms.1
        } else if pool.len() < 2 {
            0.0
        } else {
            mean_std(&pool).1
        };
        for &i in traj {
            gate_sigma[i] = sigma;
        }
    }
    let advantage: Vec<f64> = (0..group.len())
        .map(|i| {
            let centred = outcome[i] - mu_sigma[i].0;
            if p.centre_only {
                centred
            } else {
                centred / (mu_sigma[i].1 + p.eps)
            }
        })
        .collect();
    let gate: Vec<f64> = (0..group.len()).map(|i| 1.0 / (1.0 + (gate_sigma[i] / p.gate_temperature).exp())).collect();
    let norm: Vec<f64> = (0..t_n)
        .map(|t| {
            if !p.normalize {
                intrinsic[t]
            } else if intrinsic[t].abs() <= p.pool_tolerance {
                0.0
            } else {
                let (m, s) = pool_stats[&group[turn_traj[t] as usize]];
                if p.centre_only {
                    intrinsic[t] - m
                } else {
                    (intrinsic[t] - m) / (s + p.eps)
                }
            }
        })
        .collect();
    let mut outcome_tokens = Vec::new();
    for i in 0..group.len() {
        outcome_tokens.extend(std::iter::repeat_n(advantage[i], tokens[i] as usize));
    }
    let mut intrinsic_tokens = Vec::new();
    let mut credited = 0usize;
    for t in 0..t_n {
        intrinsic_tokens.extend(std::iter::repeat_n(norm[t], credit[t] as usize));
        credited += credit[t] as usize;
    }
    let total: usize = tokens.iter().map(|&n| n as usize).sum();
    intrinsic_tokens.extend(std::iter::repeat_n(0.0, total - credited));
    let outcome_std = mean_std(&outcome_tokens).1 + p.eps;
    let intrinsic_std = mean_std(&intrinsic_tokens).1 + p.eps;
    let magnitude_ratio = (outcome_std.max(1.0) / intrinsic_std).min(1.0);
    let bonus: Vec<f64> = (0..t_n)
        .map(|t| {
            let weight = if p.intrinsic_only { 1.0 } else { p.beta * gate[turn_traj[t] as usize] };
            weight * magnitude_ratio * norm[t]
        })
        .collect();
    OracleAdvantages {
        info,
        intrinsic,
        norm,
        bonus,
        advantage,
        gate,
        outcome_std,
        intrinsic_std,
        magnitude_ratio,
        intrinsic_only: p.intrinsic_only,
    }
}

/// The per-token advantages of the contract from the oracle's advantages and bonuses, by
/// building each trajectory's agent tokens one by one: `[M]`, trajectory-major.
pub fn oracle_token_advantage(
    o: &OracleAdvantages,
    turn_traj: &[u32],
    credit: &[u32],
    starts: &[u32],
    tokens: &[u32],
) -> Vec<f64> {
    let mut out = Vec::new();
    for (i, &n) in tokens.iter().enumerate() {
        let base = if o.intrinsic_only { 0.0 } else { o.advantage[i] };
        let mut response = vec![base; n as usize];
        for t in 0..turn_traj.len() {
            if turn_traj[t] as usize == i {
                for k in starts[t]..starts[t] + credit[t] {
                    response[k as usize] = base + o.bonus[t];
                }
            }
        }
        out.extend(response);
    }
    out
}

/// |a − b| ≤ atol + rtol·|b|, with infinities equal only to themselves and NaN never close.
pub fn close(a: f64, b: f64, atol: f64, rtol: f64) -> bool {
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= atol + rtol * b.abs()
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f64], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(close(g, w, atol, rtol), "{what}[{i}]: got {g}, want {w} (atol {atol}, rtol {rtol})");
    }
}

pub fn f32s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// f32 values rounded to the element type T.
pub fn to_dtype<T: LogitElement>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

/// Elements of T, exactly, as f64 (what the oracle is fed).
pub fn to_f64<T: LogitElement>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

/// Random logits with a realistic spread, rounded through the element type so the oracle sees
/// exactly the values the backend reads.
pub fn random_logits(rng: &mut Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| scale * rng.normal()).collect()
}

/// A random turn layout over `rows` rows: `turns` turns (some empty), trajectories in groups.
pub struct RandomLayout {
    pub offsets: Vec<u32>,
    pub turn_traj: Vec<u32>,
    pub credit: Vec<u32>,
    pub group: Vec<u32>,
    pub outcome: Vec<f64>,
    pub tokens: Vec<u32>,
}

pub fn random_layout(rng: &mut Rng, rows: usize, turns: usize, trajectories: usize, groups: u32) -> RandomLayout {
    let mut cuts: Vec<u32> = (0..turns - 1).map(|_| rng.below(rows as u64 + 1) as u32).collect();
    cuts.sort_unstable();
    let mut offsets = vec![0];
    offsets.extend(cuts);
    offsets.push(rows as u32);
    let turn_traj: Vec<u32> = (0..turns).map(|_| rng.below(trajectories as u64) as u32).collect();
    let credit: Vec<u32> = (0..turns).map(|_| 1 + rng.below(20) as u32).collect();
    // Sparse, unordered group ids.
    let group: Vec<u32> = (0..trajectories).map(|_| 7 * rng.below(groups as u64) as u32 + 3).collect();
    let outcome: Vec<f64> = (0..trajectories).map(|_| rng.below(3) as f64 * 0.5).collect();
    let mut tokens = vec![0u32; trajectories];
    for t in 0..turns {
        tokens[turn_traj[t] as usize] += credit[t];
    }
    for x in &mut tokens {
        *x += rng.below(30) as u32 + 1;
    }
    RandomLayout { offsets, turn_traj, credit, group, outcome, tokens }
}
