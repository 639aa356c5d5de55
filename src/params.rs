//! Parameters of the InfoPO computation, with the paper's defaults.

use crate::error::{Error, Result};

/// Which per-row value a turn's information gain averages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Estimator {
    /// `log_ratio`: the paper's teacher-forced estimator of the realised token.
    #[default]
    LogRatio,
    /// `kl`: the full-vocabulary KL(p_real ‖ p_masked).
    Kl,
}

impl Estimator {
    pub fn name(self) -> &'static str {
        match self {
            Estimator::LogRatio => "log-ratio",
            Estimator::Kl => "kl",
        }
    }
}

impl std::str::FromStr for Estimator {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "log-ratio" => Ok(Estimator::LogRatio),
            "kl" => Ok(Estimator::Kl),
            _ => Err(format!("unknown estimator `{s}` (expected log-ratio or kl)")),
        }
    }
}

/// What the variance gate sigmoid(−σ_g/τ) measures the spread of (contract §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateSource {
    /// σ_g = the unbiased std of the group's outcomes (the paper's code).
    #[default]
    Outcome,
    /// σ_g = the credit-weighted unbiased std of the group's non-zero per-token intrinsic values
    /// (the pool of the normalisation); 0 for a pool of fewer than 2 tokens (InfoPO's text).
    Intrinsic,
}

impl GateSource {
    pub fn name(self) -> &'static str {
        match self {
            GateSource::Outcome => "outcome",
            GateSource::Intrinsic => "intrinsic",
        }
    }
}

impl std::str::FromStr for GateSource {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "outcome" => Ok(GateSource::Outcome),
            "intrinsic" => Ok(GateSource::Intrinsic),
            _ => Err(format!("unknown gate source `{s}` (expected outcome or intrinsic)")),
        }
    }
}

/// How a trajectory's score R_i (its `outcome`, what GRPO normalises) comes from the rewards of
/// its agent turns r_0 … r_{n−1} (the official `trajectory_score_method`; contract §1). Used by
/// [`crate::Conversation::rewarded`]; a trajectory given its outcome directly needs none.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TrajectoryScore {
    /// round(Σ_k r_k, 4), rounded half to even on the exact value (the official `Sum`).
    Sum,
    /// Σ_k γ^k r_k, with 0 ≤ γ ≤ 1: the reward to go from the first turn (the official `R2G`; γ =
    /// 0.8 in its config). A reward on the last of n turns counts γ^{n−1} times.
    RewardToGo { gamma: f64 },
}

/// Smallest sampling temperature τs accepted (contract §5).
pub const MIN_TEMPERATURE: f64 = 1e-3;
/// Largest sampling temperature τs accepted (contract §5).
pub const MAX_TEMPERATURE: f64 = 1e3;

/// Parameters of `docs/contract.md`; `Params::default()` is the paper's setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    /// τs: logits are divided by it. Default 1.
    pub temperature: f64,
    pub estimator: Estimator,
    /// β: weight of the intrinsic bonus. Default 0.1.
    pub beta: f64,
    /// τ of the variance gate sigmoid(−σ_g/τ). Default 0.05.
    pub gate_temperature: f64,
    /// ε > 0 added to standard deviations. Default 1e-6.
    pub eps: f64,
    /// Normalise intrinsic values within each group. Default on.
    pub normalize: bool,
    /// What the gate's σ_g measures. Default [`GateSource::Outcome`].
    pub gate_source: GateSource,
    /// Centre only (the official `norm_adv_by_std_in_grpo = False`): outcome advantages
    /// R − μ_g and normalised intrinsic values x − μ, without dividing by σ + ε. Default off.
    pub centre_only: bool,
    /// Intrinsic only (the official `use_intrinsic_only`): bonus_t = magnitude_ratio · norm_t,
    /// without β and the gate, and token advantages without the outcome term. Default off.
    pub intrinsic_only: bool,
    /// A turn with |intrinsic_t| ≤ this counts as zero: out of its group's pool, norm_t = 0
    /// (contract §4). Default 0: exact zeros only.
    pub pool_tolerance: f64,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            temperature: 1.0,
            estimator: Estimator::LogRatio,
            beta: 0.1,
            gate_temperature: 0.05,
            eps: 1e-6,
            normalize: true,
            gate_source: GateSource::Outcome,
            centre_only: false,
            intrinsic_only: false,
            pool_tolerance: 0.0,
        }
    }
}

impl Params {
    /// Checks every parameter's range (contract §5).
    pub fn validate(&self) -> Result<()> {
        let positive = |name, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(Error::Param { name, value, why: "must be finite and > 0" })
            }
        };
        positive("temperature", self.temperature)?;
        // The kernels scale by log2(e)/τs in f32: a tiny τs overflows the scale, a huge one
        // flushes it (and −∞ logits with it) to NaN on legitimate rows.
        if !(MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&self.temperature) {
            return Err(Error::Param { name: "temperature", value: self.temperature, why: "must be in [1e-3, 1e3]" });
        }
        positive("gate_temperature", self.gate_temperature)?;
        // ε > 0: a tied group (σ = 0) gets advantage 0/ε = 0, not 0/0.
        positive("eps", self.eps)?;
        if !self.beta.is_finite() {
            return Err(Error::Param { name: "beta", value: self.beta, why: "must be finite" });
        }
        if !(self.pool_tolerance.is_finite() && self.pool_tolerance >= 0.0) {
            return Err(Error::Param {
                name: "pool_tolerance",
                value: self.pool_tolerance,
                why: "must be finite and >= 0",
            });
        }
        Ok(())
    }
}
