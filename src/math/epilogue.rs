//! Turn, group and batch statistics (`docs/contract.md` §3–4) in float64: the CPU epilogue,
//! and the second stage of the two-stage API.

use crate::data::layout::{GroupLayout, Layout};
use crate::data::{Advantages, Output, RowOutputs};
use crate::error::{Error, Result};
use crate::params::{GateSource, Params, TrajectoryScore};

/// Weighted Welford/Chan moments: count n (a sum of weights), mean μ and M2 = Σ w (v − μ)².
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Moments {
    pub count: f64,
    pub mean: f64,
    pub m2: f64,
}

impl Moments {
    /// Adds `value` with weight `weight` (a value repeated `weight` times).
    pub fn push(&mut self, value: f64, weight: f64) {
        self.merge(&Moments { count: weight, mean: value, m2: 0.0 });
    }

    /// Chan, Golub & LeVeque's pairwise merge.
    pub fn merge(&mut self, other: &Moments) {
        let n = self.count + other.count;
        if other.count == 0.0 {
            return;
        }
        if self.count == 0.0 {
            *self = *other;
            return;
        }
        let delta = other.mean - self.mean;
        self.mean += delta * (other.count / n);
        self.m2 += other.m2 + delta * delta * (self.count * other.count / n);
        self.count = n;
    }

    /// √(M2 / (n − 1)); needs n ≥ 2.
    pub fn unbiased_std(&self) -> f64 {
        (self.m2 / (self.count - 1.0)).max(0.0).sqrt()
    }
}

/// Per-turn accumulators of the estimator: Σ and row count. Feed rows in any micro-batches and
/// merge; [`TurnAccumulator::info`] equals that of one batch.
///
/// The values are those of the chosen estimator: [`RowOutputs::estimator`] of any backend's
/// [`Backend::score_rows`] (f32), or [`RowValues`](crate::reference::RowValues) of [`crate::reference::score`]
/// (f64).
///
/// [`RowOutputs::estimator`]: crate::RowOutputs::estimator
/// [`Backend::score_rows`]: crate::Backend::score_rows
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnAccumulator {
    pub sum: Vec<f64>,
    pub count: Vec<u64>,
}

impl TurnAccumulator {
    /// Zeroed sums for `turns` turns.
    pub fn new(turns: usize) -> Self {
        TurnAccumulator { sum: vec![0.0; turns], count: vec![0; turns] }
    }

    /// Zeroed sums for the turns of `layout`.
    pub fn for_layout(layout: &Layout) -> Self {
        Self::new(layout.turns())
    }

    pub fn turns(&self) -> usize {
        self.sum.len()
    }

    /// `sum` and `count` (public fields) must have one entry per turn each.
    fn check_lengths(&self) -> Result<()> {
        if self.sum.len() != self.count.len() {
            return Err(Error::turns(format!(
                "TurnAccumulator has {} sums but {} counts: it needs one of each per turn",
                self.sum.len(),
                self.count.len()
            )));
        }
        Ok(())
    }

    /// Adds the estimator values of global rows `first_row..first_row + values.len()` of the
    /// batch whose validated layout is `layout` (the one given to [`advantages`] later).
    pub fn add_rows<V: Copy + Into<f64>>(&mut self, layout: &Layout, first_row: usize, values: &[V]) -> Result<()> {
        self.check_lengths()?;
        let offsets = &layout.turn_offsets;
        if offsets.len() != self.turns() + 1 {
            return Err(Error::turns(format!(
                "accumulator has {} turns but the layout has {}",
                self.turns(),
                offsets.len().saturating_sub(1)
            )));
        }
        let layout_rows = *offsets.last().unwrap_or(&0) as usize;
        let end = match first_row.checked_add(values.len()) {
            Some(end) if end <= layout_rows => end,
            _ => {
                return Err(Error::turns(format!(
                    "rows {first_row}..{first_row}+{} extend past the layout's {layout_rows} rows",
                    values.len()
                )))
            }
        };
        // The first turn whose rows end after first_row.
        let mut t = offsets.partition_point(|&o| (o as usize) <= first_row).saturating_sub(1);
        while t < self.turns() && (offsets[t] as usize) < end {
            let lo = (offsets[t] as usize).max(first_row);
            let hi = (offsets[t + 1] as usize).min(end);
            if hi > lo {
                self.sum[t] += values[lo - first_row..hi - first_row].iter().map(|&v| v.into()).sum::<f64>();
                self.count[t] += (hi - lo) as u64;
            }
            t += 1;
        }
        Ok(())
    }

    pub fn merge(&mut self, other: &TurnAccumulator) -> Result<()> {
        self.check_lengths()?;
        other.check_lengths()?;
        if other.turns() != self.turns() {
            return Err(Error::turns(format!(
                "cannot merge accumulators of {} and {} turns",
                self.turns(),
                other.turns()
            )));
        }
        for t in 0..self.turns() {
            self.sum[t] += other.sum[t];
            self.count[t] += other.count[t];
        }
        Ok(())
    }

    /// info_t: the mean per turn, 0 for a turn with no rows.
    pub fn info(&self) -> Vec<f64> {
        self.sum.iter().zip(&self.count).map(|(&s, &c)| if c > 0 { s / c as f64 } else { 0.0 }).collect()
    }
}

/// The turn that holds global row `row` (`offsets`: a validated turn CSR with `row` < its last
/// entry): the last turn starting at or before it, skipping empty turns.
pub fn turn_of_row(offsets: &[u32], row: usize) -> usize {
    offsets.partition_point(|&o| o as usize <= row).saturating_sub(1)
}

/// Outcome moments of one group and the rule for a singleton group (μ = 0, σ = 1).
fn outcome_mean_std(m: &Moments) -> (f64, f64) {
    if m.count <= 1.0 {
        (0.0, 1.0)
    } else {
        (m.mean, m.unbiased_std())
    }
}

/// Whether a turn's intrinsic value joins its group's pool: |v| > the pool tolerance (contract
/// §4; at 0, every non-zero value).
fn in_pool(v: f64, params: &Params) -> bool {
    v.abs() > params.pool_tolerance
}

/// Intrinsic pool moments and the rule for a pool of one token (μ = value, σ = 1).
fn pool_mean_std(m: &Moments) -> (f64, f64) {
    if m.count <= 1.0 {
        (m.mean, 1.0)
    } else {
        (m.mean, m.unbiased_std())
    }
}

/// Stage two: advantages from the per-turn information gain (contract §4).
pub fn advantages(info: &[f64], layout: &Layout, params: &Params) -> Result<Advantages> {
    params.validate()?;
    let groups = layout.groups.as_ref().ok_or_else(|| Error::trajectories("advantages need trajectories"))?;
    crate::data::layout::layout_consistent(layout)?;
    if info.len() != layout.turns() {
        return Err(Error::turns(format!("{} info values for {} turns", info.len(), layout.turns())));
    }
    let GroupLayout {
        trajectory_group,
        trajectory_outcome,
        trajectory_tokens,
        group_trajectory_offsets,
        group_trajectories,
        group_turn_offsets,
        group_turns,
        total_tokens,
        trajectory_token_offsets,
        turn_credit_start,
        pad_width,
        pad_offset,
    } = groups;
    let n_groups = group_trajectory_offsets.len() - 1;
    let eps = params.eps;

    let turn_intrinsic: Vec<f64> = info.iter().zip(&layout.turn_credit).map(|(&i, &c)| i / c as f64).collect();
    // A non-finite value would turn the group pools, the batch std and so every bonus into NaN.
    if let Some(turn) = turn_intrinsic.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFiniteTurn { turn, row: None });
    }

    let mut outcome = vec![(0.0, 1.0); n_groups];
    let mut pool = vec![(0.0, 1.0); n_groups];
    // σ_g of each group's gate (contract §4, `gate_source`).
    let mut gate_sigma = vec![0.0; n_groups];
    for g in 0..n_groups {
        let mut m = Moments::default();
        let members = group_trajectory_offsets[g] as usize..group_trajectory_offsets[g + 1] as usize;
        for &i in &group_trajectories[members] {
            m.push(trajectory_outcome[i as usize], 1.0);
        }
        outcome[g] = outcome_mean_std(&m);
        let mut p = Moments::default();
        let members = group_turn_offsets[g] as usize..group_turn_offsets[g + 1] as usize;
        for &t in &group_turns[members] {
            let v = turn_intrinsic[t as usize];
            if in_pool(v, params) {
                p.push(v, layout.turn_credit[t as usize] as f64);
            }
        }
        pool[g] = pool_mean_std(&p);
        gate_sigma[g] = match params.gate_source {
            GateSource::Outcome => outcome[g].1,
            // A pool of fewer than 2 tokens has no spread: σ_g = 0.
            GateSource::Intrinsic if p.count < 2.0 => 0.0,
            GateSource::Intrinsic => p.unbiased_std(),
        };
    }

    let trajectory_advantage: Vec<f64> = trajectory_outcome
        .iter()
        .zip(trajectory_group)
        .map(|(&r, &g)| {
            let (mu, sigma) = outcome[g as usize];
            if params.centre_only {
                r - mu
            } else {
                (r - mu) / (sigma + eps)
            }
        })
        .collect();
    let trajectory_gate: Vec<f64> =
        trajectory_group.iter().map(|&g| sigmoid(-gate_sigma[g as usize] / params.gate_temperature)).collect();

    let turn_intrinsic_norm: Vec<f64> = (0..layout.turns())
        .map(|t| {
            let v = turn_intrinsic[t];
            if !params.normalize {
                v
            } else if !in_pool(v, params) {
                0.0
            } else {
                let g = trajectory_group[layout.turn_trajectory[t] as usize] as usize;
                let (mu, sigma) = pool[g];
                if params.centre_only {
                    v - mu
                } else {
                    (v - mu) / (sigma + eps)
                }
            }
        })
        .collect();

    let mut outcome_tokens = Moments::default();
    for (&a, &n) in trajectory_advantage.iter().zip(trajectory_tokens) {
        outcome_tokens.push(a, n as f64);
    }
    let mut intrinsic_tokens = Moments::default();
    let mut credited = 0u64;
    for (&v, &c) in turn_intrinsic_norm.iter().zip(&layout.turn_credit) {
        intrinsic_tokens.push(v, c as f64);
        credited += c as u64;
    }
    intrinsic_tokens.push(0.0, (*total_tokens - credited) as f64);

    let outcome_std = outcome_tokens.unbiased_std() + eps;
    let intrinsic_std = intrinsic_tokens.unbiased_std() + eps;
    let magnitude_ratio = (outcome_std.max(1.0) / intrinsic_std).min(1.0);
    let turn_bonus: Vec<f64> = turn_intrinsic_norm
        .iter()
        .zip(&layout.turn_trajectory)
        .map(|(&v, &i)| {
            if params.intrinsic_only {
                magnitude_ratio * v
            } else {
                params.beta * trajectory_gate[i as usize] * magnitude_ratio * v
            }
        })
        .collect();

    // Per-token advantages: a_i (advantage_i; intrinsic only: 0) everywhere, plus bonus_t on
    // turn t's (validated, disjoint) span.
    let token_advantage = turn_credit_start.as_ref().map(|starts| {
        let a = |i: usize| if params.intrinsic_only { 0.0 } else { trajectory_advantage[i] };
        let mut out = vec![0.0; *total_tokens as usize];
        for i in 0..trajectory_advantage.len() {
            out[trajectory_token_offsets[i] as usize..trajectory_token_offsets[i + 1] as usize].fill(a(i));
        }
        for t in 0..layout.turns() {
            let i = layout.turn_trajectory[t] as usize;
            let lo = trajectory_token_offsets[i] as usize + starts[t] as usize;
            let hi = lo + layout.turn_credit[t] as usize;
            for x in &mut out[lo..hi] {
                *x = a(i) + turn_bonus[t];
            }
        }
        out
    });
    let padded_advantage = token_advantage.as_ref().zip(*pad_width).map(|(tokens, width)| {
        let width = width as usize;
        let mut out = vec![0.0; trajectory_advantage.len() * width];
        for (i, &o) in pad_offset.iter().enumerate() {
            let (lo, hi) = (trajectory_token_offsets[i] as usize, trajectory_token_offsets[i + 1] as usize);
            let at = i * width + o as usize;
            out[at..at + hi - lo].copy_from_slice(&tokens[lo..hi]);
        }
        out
    });

    Ok(Advantages {
        turn_intrinsic,
        turn_intrinsic_norm,
        turn_bonus,
        trajectory_advantage,
        trajectory_gate,
        outcome_std,
        intrinsic_std,
        magnitude_ratio,
        token_advantage,
        padded_advantage,
    })
}

/// 1 / (1 + e^−z), without overflow for large |z|.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// The host epilogue, the one every backend and adapter that finishes on the host runs: turn
/// means and advantages from the estimator value of each row (`estimator`, `[N]`: f64 rows for the CPU reference, the f32 row
/// outputs for the kernels, as in their logits paths), through the same
/// [`TurnAccumulator`] and [`advantages`] as the two-stage form. With trajectories, a row whose
/// estimator is not finite is [`Error::NonFiniteTurn`] naming its turn and row, as on logits.
pub(crate) fn finish(rows: RowOutputs, layout: Option<Layout>, estimator: &[f64], params: &Params) -> Result<Output> {
    let Some(layout) = layout else {
        return Ok(Output { rows, turn_info: None, advantages: None });
    };
    if layout.groups.is_some() {
        if let Some(row) = estimator.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteTurn { turn: turn_of_row(&layout.turn_offsets, row), row: Some(row) });
        }
    }
    let mut acc = TurnAccumulator::for_layout(&layout);
    acc.add_rows(&layout, 0, estimator)?;
    let info = acc.info();
    let advantages = match layout.groups {
        Some(_) => Some(advantages(&info, &layout, params)?),
        None => None,
    };
    Ok(Output { rows, turn_info: Some(info), advantages })
}

/// R_i from the rewards of a trajectory's agent turns (contract §1, [`TrajectoryScore`]); the
/// rewards are finite and γ ∈ [0, 1] (checked by the caller).
pub(crate) fn trajectory_score(score: TrajectoryScore, rewards: &[f64]) -> f64 {
    match score {
        // Python's round(x, 4): the exact binary value rounded half to even at the 4th decimal,
        // which is what Rust's fixed-precision formatting does; the parse is then exact.
        TrajectoryScore::Sum => {
            let sum: f64 = rewards.iter().sum();
            format!("{sum:.4}").parse().unwrap_or(sum)
        }
        // Horner from the last turn: r_0 + γ (r_1 + γ (r_2 + …)), the official order of operations.
        TrajectoryScore::RewardToGo { gamma } => rewards.iter().rev().fold(0.0, |acc, &r| r + gamma * acc),
    }
}
