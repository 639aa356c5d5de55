//! What goes in (a batch of paired logits with its turn and trajectory layout) and what comes out.

use crate::error::{Error, Result};
use crate::io::{Elements, LogitBuf};
use crate::logits::Logits;
use crate::params::Estimator;
use crate::validate::Layout;

/// Scored turns as a CSR layout over rows (contract §1). [`LayoutBuilder`] makes one from
/// per-trajectory turn lists.
///
/// A scored turn t is one piece of user feedback o_t: the agent turn a_t drew it (asked the
/// question), and the agent's next turn a_{t+1} is what it may change. The turn's **rows** are
/// positions of a_{t+1}, scored teacher-forced twice (with o_t, and with o_t masked); its
/// **credit** goes to a_t, whose `credit_tokens` tokens each receive the turn's bonus (InfoPO
/// rewards the turn whose feedback moved the next action). The rows may be all of a_{t+1}'s
/// tokens or any prefix of them (e.g. the first 64, to bound the cost): `info_t` is the mean
/// over the rows given, and the number of rows is independent of `credit_tokens`.
///
/// Indices are `u32`, as the kernels read them (half the bytes of `i64` per index, and more
/// than 2^32 − 1 rows is refused anyway); targets are `i64` because that is what PyTorch and
/// candle hold token ids in, and the device API reads a trainer's targets in place.
#[derive(Debug, Clone, Copy)]
pub struct Turns<'a> {
    /// `[T+1]`: rows of turn t are `offsets[t]..offsets[t+1]`; `offsets[0] = 0`,
    /// `offsets[T] = N`, non-decreasing (an empty turn has info 0).
    pub offsets: &'a [u32],
    /// `[T]`: the trajectory (`0..B`) each turn belongs to.
    pub trajectory: &'a [u32],
    /// `[T]`: tokens of the agent turn that receives the turn's credit (≥ 1; see above).
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
    /// `[B]`: GRPO group id (any ids; they need not be dense). Trajectories sharing an id form
    /// a group, whose outcome mean μ and unbiased std σ normalise its outcomes. A group of one
    /// trajectory uses μ = 0 and σ = 1 (its advantage is its raw outcome, over 1 + ε) and so,
    /// with the outcome gate, a gate of sigmoid(−1/τ); a tied group (σ = 0) gets advantage 0 and
    /// gate 1/2.
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
    /// `[N]` realised token ids, `i64` as PyTorch and candle hold them (layout indices are
    /// `u32`: see [`Turns`] for why the two differ).
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

    /// The chosen estimator's values (`log_ratio` or `kl`), what
    /// [`crate::epilogue::TurnAccumulator::add_rows`] sums per turn.
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

/// Owned turn layout: the buffers behind a [`Turns`] view.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnBuf {
    pub offsets: Vec<u32>,
    pub trajectory: Vec<u32>,
    pub credit_tokens: Vec<u32>,
}

impl TurnBuf {
    /// The borrowed view [`Batch::with_turns`] and [`crate::validate::layout`] take.
    pub fn as_turns(&self) -> Turns<'_> {
        Turns { offsets: &self.offsets, trajectory: &self.trajectory, credit_tokens: &self.credit_tokens }
    }
}

/// Owned trajectories: the buffers behind a [`Trajectories`] view.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrajectoryBuf {
    pub group: Vec<u32>,
    pub outcome: Vec<f64>,
    pub tokens: Vec<u32>,
}

impl TrajectoryBuf {
    /// The borrowed view [`Batch::with_trajectories`] and [`crate::validate::layout`] take.
    pub fn as_trajectories(&self) -> Trajectories<'_> {
        Trajectories { group: &self.group, outcome: &self.outcome, tokens: &self.tokens }
    }
}

/// A batch that owns its data; [`OwnedBatch::as_batch`] views it as the [`Batch`] every backend
/// takes. Build one from a trainer's vectors with [`OwnedBatch::new`] and
/// [`OwnedBatch::with_layout`] (a [`crate::LayoutBuilder`]'s output), or read one from a file
/// with [`crate::io::read_input`] (then the logits and targets are viewed in place in the
/// memory-mapped file where aligned, see [`Elements`], and the batch keeps the file mapped while
/// it lives).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedBatch {
    pub rows: usize,
    pub vocab: usize,
    /// `[rows × vocab]` row-major.
    pub real: LogitBuf,
    /// `[rows × vocab]` row-major, the same dtype as `real`.
    pub masked: LogitBuf,
    /// `[rows]` realised token ids.
    pub targets: Elements<i64>,
    pub turns: Option<TurnBuf>,
    /// Needs `turns`.
    pub trajectories: Option<TrajectoryBuf>,
    /// `[T]` first credited token of each turn (see [`Batch::credit_start`]); needs
    /// `trajectories`.
    pub credit_start: Option<Vec<u32>>,
}

impl OwnedBatch {
    /// A batch of rows only from row-major `[N, V]` logits (`Vec<f32>`, `Vec<half::f16>` or
    /// `Vec<half::bf16>`, the same for both) and N targets: N is `targets.len()`. The logits'
    /// lengths and dtypes are checked here.
    pub fn new(
        real: impl Into<LogitBuf>,
        masked: impl Into<LogitBuf>,
        vocab: usize,
        targets: impl Into<Elements<i64>>,
    ) -> Result<Self> {
        let batch = OwnedBatch {
            rows: 0,
            vocab,
            real: real.into(),
            masked: masked.into(),
            targets: targets.into(),
            turns: None,
            trajectories: None,
            credit_start: None,
        };
        let batch = OwnedBatch { rows: batch.targets.len(), ..batch };
        batch.as_batch()?;
        if batch.real.dtype() != batch.masked.dtype() {
            return Err(Error::DtypeMismatch { real: batch.real.dtype().name(), masked: batch.masked.dtype().name() });
        }
        Ok(batch)
    }

    /// Adds the turns and trajectories of `layout` (checked against the rows by the backends).
    pub fn with_layout(mut self, layout: BatchLayout) -> Self {
        self.turns = Some(layout.turns);
        self.trajectories = Some(layout.trajectories);
        self
    }

    /// Borrowed views for [`crate::Backend::compute`]. Shapes of the logits are checked here;
    /// layouts and values are checked by the backends (`validate::batch`).
    pub fn as_batch(&self) -> Result<Batch<'_>> {
        let real = Logits::from_data(self.real.as_data(), self.rows, self.vocab)?;
        let masked = Logits::from_data(self.masked.as_data(), self.rows, self.vocab)?;
        let mut batch = Batch::rows(real, masked, self.targets.as_slice());
        if let Some(t) = &self.turns {
            batch = batch.with_turns(t.as_turns());
        }
        if let Some(t) = &self.trajectories {
            batch = batch.with_trajectories(t.as_trajectories());
        }
        if let Some(s) = &self.credit_start {
            batch = batch.with_credit_start(s);
        }
        Ok(batch)
    }

    /// Bytes of logits the batch holds (both tensors).
    pub fn logit_bytes(&self) -> usize {
        (self.real.len() + self.masked.len()) * self.real.dtype().size_bytes()
    }
}

/// A turn and trajectory layout in owned CSR form, as [`LayoutBuilder`] makes it: rows of turn
/// t are `turns.offsets[t]..turns.offsets[t + 1]`, in the order the turns were added.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchLayout {
    pub turns: TurnBuf,
    pub trajectories: TrajectoryBuf,
}

impl BatchLayout {
    /// The rows the layout covers (the `N` of the logits it goes with).
    pub fn rows(&self) -> usize {
        self.turns.offsets.last().map_or(0, |&o| o as usize)
    }

    /// The validated form [`crate::epilogue::advantages`] and
    /// [`crate::epilogue::TurnAccumulator`] take (the two-stage form).
    pub fn validate(&self) -> Result<Layout> {
        crate::validate::layout(self.rows(), &self.turns.as_turns(), Some(&self.trajectories.as_trajectories()))
    }
}

/// Builds a [`BatchLayout`] from what a trainer holds: trajectories, each with its scored turns,
/// instead of CSR arrays. Each turn's rows follow the previous turn's rows, so add turns in the
/// order their rows sit in the logits (typically trajectory by trajectory, turn by turn).
///
/// ```
/// use infopo_kernels::LayoutBuilder;
/// let mut b = LayoutBuilder::new();
/// let first = b.trajectory(0, 1.0, 40); // GRPO group 0, outcome 1, 40 response tokens
/// b.turn(first, 3, 12)?; // 3 scored rows (the user reply's tokens) credit 12 agent tokens
/// b.turn(first, 2, 20)?;
/// let second = b.trajectory(0, 0.0, 25);
/// b.turn(second, 4, 25)?;
/// let layout = b.build()?;
/// assert_eq!(layout.turns.offsets, [0, 3, 5, 9]);
/// assert_eq!(layout.turns.trajectory, [0, 0, 1]);
/// assert_eq!(layout.rows(), 9);
/// # Ok::<(), infopo_kernels::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct LayoutBuilder {
    layout: BatchLayout,
    rows: u64,
}

impl Default for LayoutBuilder {
    fn default() -> Self {
        let turns = TurnBuf { offsets: vec![0], ..TurnBuf::default() };
        LayoutBuilder { layout: BatchLayout { turns, ..BatchLayout::default() }, rows: 0 }
    }
}

impl LayoutBuilder {
    /// No trajectories, no turns.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a trajectory of GRPO group `group` (any id; trajectories sharing it form a group),
    /// task reward `outcome` and `response_tokens` agent tokens in all; returns its index.
    pub fn trajectory(&mut self, group: u32, outcome: f64, response_tokens: u32) -> u32 {
        let t = &mut self.layout.trajectories;
        t.group.push(group);
        t.outcome.push(outcome);
        t.tokens.push(response_tokens);
        (t.group.len() - 1) as u32
    }

    /// Adds a scored turn of `trajectory` (an index [`LayoutBuilder::trajectory`] returned):
    /// its next `rows` rows (0 is allowed: a turn with no scored tokens gets info 0), crediting
    /// `credit_tokens` agent tokens (≥ 1). Checked here: the trajectory exists and the rows fit
    /// in u32; the rest when [`LayoutBuilder::build`] validates the whole layout.
    pub fn turn(&mut self, trajectory: u32, rows: u32, credit_tokens: u32) -> Result<&mut Self> {
        let b = self.layout.trajectories.group.len();
        if trajectory as usize >= b {
            return Err(Error::turns(format!(
                "turn {} belongs to trajectory {trajectory}, but {b} trajectories were added",
                self.layout.turns.trajectory.len()
            )));
        }
        let end = self.rows + rows as u64;
        if end > u32::MAX as u64 {
            return Err(Error::shape(format!("{end} rows exceed the 2^32 - 1 supported")));
        }
        self.rows = end;
        let t = &mut self.layout.turns;
        t.offsets.push(end as u32);
        t.trajectory.push(trajectory);
        t.credit_tokens.push(credit_tokens);
        Ok(self)
    }

    /// The layout, validated as the backends will (credits ≥ 1 and within their trajectory's
    /// tokens, finite outcomes, at least 2 response tokens in the batch).
    pub fn build(&self) -> Result<BatchLayout> {
        self.layout.validate()?;
        Ok(self.layout.clone())
    }
}
