//! What the backends return: per-row outputs, per-turn information and the advantages.

use crate::params::Estimator;

/// Per-row outputs (contract §2), each `[N]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RowOutputs {
    pub lse_real: Vec<f32>,
    pub lse_masked: Vec<f32>,
    pub log_ratio: Vec<f32>,
    pub kl: Vec<f32>,
    pub entropy_real: Vec<f32>,
}

impl RowOutputs {
    /// The outputs' names, in the order of [`RowOutputs::columns`] (the rows of the candle
    /// adapter's `[5, N]` tensor; the file format prefixes each with `row_`).
    pub const NAMES: [&'static str; 5] = ["lse_real", "lse_masked", "log_ratio", "kl", "entropy_real"];

    /// The five outputs in the order of [`RowOutputs::NAMES`].
    pub fn columns(&self) -> [&[f32]; 5] {
        [&self.lse_real, &self.lse_masked, &self.log_ratio, &self.kl, &self.entropy_real]
    }

    pub fn with_len(n: usize) -> Self {
        RowOutputs {
            lse_real: vec![0.0; n],
            lse_masked: vec![0.0; n],
            log_ratio: vec![0.0; n],
            kl: vec![0.0; n],
            entropy_real: vec![0.0; n],
        }
    }

    pub fn len(&self) -> usize {
        self.lse_real.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lse_real.is_empty()
    }

    /// The chosen estimator's values (`log_ratio` or `kl`), what
    /// [`crate::TurnAccumulator::add_rows`] sums per turn.
    pub fn estimator(&self, estimator: Estimator) -> &[f32] {
        match estimator {
            Estimator::LogRatio => &self.log_ratio,
            Estimator::Kl => &self.kl,
        }
    }
}

/// Per-turn, per-trajectory and batch outputs (contract §4).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Advantages {
    /// `[T]` info_t / credit_t.
    pub turn_intrinsic: Vec<f64>,
    /// `[T]` norm_t.
    pub turn_intrinsic_norm: Vec<f64>,
    /// `[T]` bonus_t, added to each credited token of turn t.
    pub turn_bonus: Vec<f64>,
    /// `[B]` outcome advantage, added to every token of trajectory i.
    pub trajectory_advantage: Vec<f64>,
    /// `[B]` sigmoid(−σ_g/τ) of the trajectory's group.
    pub trajectory_gate: Vec<f64>,
    pub outcome_std: f64,
    pub intrinsic_std: f64,
    pub magnitude_ratio: f64,
    /// `[M]`, M = Σ trajectory tokens, trajectory-major (trajectory i's tokens start at
    /// Σ_{j<i} tokens_j), with [`crate::Batch::credit_start`]: `advantage_i` on every token of
    /// trajectory i plus `bonus_t` on turn t's credited span (the per-token advantage of the
    /// policy loss). `None` without credit starts.
    pub token_advantage: Option<Vec<f64>>,
    /// `[B × L]` row-major, with [`crate::Batch::padding`]: row i is `token_advantage`'s
    /// trajectory i at columns `offset[i] .. offset[i] + tokens[i]`, 0 elsewhere (the padded
    /// layout verl and OpenRLHF hold advantages in).
    pub padded_advantage: Option<Vec<f64>>,
}

/// Everything a backend returns for a [`crate::Batch`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub rows: RowOutputs,
    /// `[T]` with turns: the mean estimator per turn.
    pub turn_info: Option<Vec<f64>>,
    /// With trajectories.
    pub advantages: Option<Advantages>,
}
