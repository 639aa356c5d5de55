//! What goes in (a batch of paired logits with its turn and trajectory layout) and what comes out.

use crate::logits::Logits;

/// Scored turns as a CSR layout over rows (contract §1).
#[derive(Debug, Clone, Copy)]
pub struct Turns<'a> {
    /// `[T+1]`: rows of turn t are `offsets[t]..offsets[t+1]`.
    pub offsets: &'a [u32],
    /// `[T]`: the trajectory each turn belongs to.
    pub trajectory: &'a [u32],
    /// `[T]`: tokens of the agent turn that receives the credit (≥ 1).
    pub credit_tokens: &'a [u32],
}

impl Turns<'_> {
    pub fn len(&self) -> usize {
        self.trajectory.len()
    }
    pub fn is_empty(&self) -> bool {
        self.trajectory.is_empty()
    }
}

/// Trajectories and their GRPO groups (contract §1).
#[derive(Debug, Clone, Copy)]
pub struct Trajectories<'a> {
    /// `[B]`: GRPO group id (any non-negative ids; they need not be dense).
    pub group: &'a [u32],
    /// `[B]`: the task reward R_i.
    pub outcome: &'a [f64],
    /// `[B]`: agent response tokens of each trajectory.
    pub tokens: &'a [u32],
}

impl Trajectories<'_> {
    pub fn len(&self) -> usize {
        self.group.len()
    }
    pub fn is_empty(&self) -> bool {
        self.group.is_empty()
    }
}

/// Everything one call of [`crate::Backend::compute`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub real: Logits<'a>,
    pub masked: Logits<'a>,
    /// `[N]` realised token ids.
    pub targets: &'a [i64],
    pub turns: Option<Turns<'a>>,
    /// Needs `turns`.
    pub trajectories: Option<Trajectories<'a>>,
    /// `[T]`, needs `trajectories`: turn t's credited tokens are positions
    /// `credit_start[t] .. credit_start[t] + credit_tokens[t]` of trajectory `trajectory[t]`'s
    /// response tokens (0-based, within `0 .. tokens[i]`; the spans of one trajectory must not
    /// overlap). With it, [`Advantages::token_advantage`] is computed (contract §4).
    pub credit_start: Option<&'a [u32]>,
}

impl<'a> Batch<'a> {
    /// A batch of rows only (no turns, no trajectories).
    pub fn rows(real: Logits<'a>, masked: Logits<'a>, targets: &'a [i64]) -> Self {
        Batch { real, masked, targets, turns: None, trajectories: None, credit_start: None }
    }

    pub fn with_turns(mut self, turns: Turns<'a>) -> Self {
        self.turns = Some(turns);
        self
    }

    pub fn with_trajectories(mut self, trajectories: Trajectories<'a>) -> Self {
        self.trajectories = Some(trajectories);
        self
    }

    /// Where each turn's credited tokens sit in its trajectory's response (see
    /// [`Batch::credit_start`]).
    pub fn with_credit_start(mut self, credit_start: &'a [u32]) -> Self {
        self.credit_start = Some(credit_start);
        self
    }

    /// Bytes of logits the batch holds (both tensors): the memory traffic of one pass.
    pub fn logit_bytes(&self) -> usize {
        self.real.size_bytes() + self.masked.size_bytes()
    }
}

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
    /// Σ_{j<i} tokens_j), with [`Batch::credit_start`]: `advantage_i` on every token of
    /// trajectory i plus `bonus_t` on turn t's credited span (the per-token advantage of the
    /// policy loss). `None` without credit starts.
    pub token_advantage: Option<Vec<f64>>,
}

/// Everything a backend returns for a [`Batch`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub rows: RowOutputs,
    /// `[T]` with turns: the mean estimator per turn.
    pub turn_info: Option<Vec<f64>>,
    /// With trajectories.
    pub advantages: Option<Advantages>,
}
