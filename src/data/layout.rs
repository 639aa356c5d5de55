//! The turn and trajectory layout: the borrowed views a batch holds ([`Turns`], [`Trajectories`]),
//! their owned buffers, the [`LayoutBuilder`] a trainer fills, and the validated [`Layout`] the
//! epilogues read, with every check that makes one.

use crate::error::{Error, Result};

/// Scored turns as a CSR layout over rows (contract §1). [`LayoutBuilder`] makes one from
/// per-trajectory turn lists.
///
/// A scored turn t is one piece of user feedback o_t: the agent turn a_t drew it (asked the
/// question), and the agent's next turn a_{t+1} is what it may change. The turn's **rows** are
/// positions of a_{t+1}, scored teacher-forced twice (with o_t, and with o_t masked); its
/// **credit** goes to a_t, whose `credit_tokens` tokens each receive the turn's bonus (InfoPO
/// rewards the turn whose feedback moved the next action). The rows may be all of a_{t+1}'s
/// tokens or any prefix of them (e.g. the first 64, to bound the cost): `info_t` is the mean
/// over the rows given, and the number of rows is independent of `credit_tokens`. The rows are
/// never the user's reply tokens: o_t is only the context of the two passes. How this maps to the
/// official code's turns: `docs/official-config.md`.
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
    /// `[B]`: agent tokens of each trajectory: the tokens of all its agent turns, not the user's
    /// replies (nor the prompt). The outcome advantage covers them, the batch statistics are
    /// taken over them and `token_advantage` has one entry per agent token.
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

/// The padded `[B, L]` token output a trainer holds advantages in (contract §4): row i holds
/// trajectory i's agent tokens at `offset[i] .. offset[i] + tokens[i]` (each at 0 without
/// `offset`) and 0 elsewhere. Needs credit starts, as `token_advantage` does.
#[derive(Debug, Clone, Copy)]
pub struct Padding<'a> {
    /// L: the row width, ≥ `offset[i] + tokens[i]` for every trajectory.
    pub width: u32,
    /// `[B]` where each trajectory's first agent token sits in its row; `None`: at 0.
    pub offset: Option<&'a [u32]>,
}

/// Owned turn layout: the buffers behind a [`Turns`] view.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnBuf {
    pub offsets: Vec<u32>,
    pub trajectory: Vec<u32>,
    pub credit_tokens: Vec<u32>,
}

impl TurnBuf {
    /// The borrowed view [`crate::Batch::with_turns`] and [`Layout::new`] take.
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
    /// The borrowed view [`crate::Batch::with_trajectories`] and [`Layout::new`] take.
    pub fn as_trajectories(&self) -> Trajectories<'_> {
        Trajectories { group: &self.group, outcome: &self.outcome, tokens: &self.tokens }
    }
}

/// A turn and trajectory layout in owned CSR form, as [`LayoutBuilder`] makes it: rows of turn
/// t are `turns.offsets[t]..turns.offsets[t + 1]`, in the order the turns were added.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BatchLayout {
    pub turns: TurnBuf,
    pub trajectories: TrajectoryBuf,
    /// `[T]` first credited token of each turn (see [`crate::Batch::credit_start`]): set by
    /// [`crate::Conversation`], `None` from [`LayoutBuilder`].
    pub credit_start: Option<Vec<u32>>,
    /// L of the padded `[B, L]` token output (see [`Padding`]), set by
    /// [`BatchLayout::with_padding`]; `None`: not asked for.
    pub pad_width: Option<u32>,
    /// `[B]` each trajectory's first column in the padded output (0 each without).
    pub pad_offset: Option<Vec<u32>>,
}

impl BatchLayout {
    /// The rows the layout covers (the `N` of the logits it goes with).
    pub fn rows(&self) -> usize {
        self.turns.offsets.last().map_or(0, |&o| o as usize)
    }

    /// The validated form [`crate::math::epilogue::advantages`] and
    /// [`crate::math::epilogue::TurnAccumulator`] take (the two-stage form).
    pub fn validate(&self) -> Result<Layout> {
        let padding = self.padding()?;
        batch_layout(
            self.rows(),
            Some(self.turns.as_turns()),
            Some(self.trajectories.as_trajectories()),
            self.credit_start.as_deref(),
            padding,
        )
        .map(|l| l.unwrap_or_default())
    }

    /// Asks for the padded `[B, L]` token output (see [`Padding`]): L = `width`, trajectory i's
    /// tokens from column `offset[i]` (0 without `offset`). Checked by [`BatchLayout::validate`]
    /// and the backends.
    pub fn with_padding(mut self, width: u32, offset: Option<Vec<u32>>) -> Self {
        self.pad_width = Some(width);
        self.pad_offset = offset;
        self
    }

    /// The padding the layout asks for, as a [`Padding`] view.
    pub(crate) fn padding(&self) -> Result<Option<Padding<'_>>> {
        padding_of(self.pad_width, &self.pad_offset)
    }
}

/// Builds a [`BatchLayout`] from what a trainer holds: trajectories, each with its scored turns,
/// instead of CSR arrays. Each turn's rows follow the previous turn's rows, so add turns in the
/// order their rows sit in the logits (typically trajectory by trajectory, turn by turn).
///
/// ```
/// use infopo_kernels::LayoutBuilder;
/// let mut b = LayoutBuilder::new();
/// let first = b.trajectory(0, 1.0, 40); // GRPO group 0, outcome 1, 40 agent tokens in all
/// // 3 rows: positions of the agent turn after the user's reply; credit: the 12 tokens of the
/// // agent turn that drew the reply.
/// b.turn(first, 3, 12)?;
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
    /// task reward `outcome` and `response_tokens` agent tokens in all (the tokens of its agent
    /// turns; the user's replies are not counted); returns its index.
    pub fn trajectory(&mut self, group: u32, outcome: f64, response_tokens: u32) -> u32 {
        let t = &mut self.layout.trajectories;
        t.group.push(group);
        t.outcome.push(outcome);
        t.tokens.push(response_tokens);
        (t.group.len() - 1) as u32
    }

    /// Adds a scored turn of `trajectory` (an index [`LayoutBuilder::trajectory`] returned):
    /// its next `rows` rows, positions of the agent turn after the feedback (0 is allowed: a turn
    /// with no scored tokens gets info 0), crediting the `credit_tokens` tokens (≥ 1) of the
    /// agent turn that drew the feedback (see [`Turns`]). Checked here: the trajectory exists
    /// and the rows fit in u32; the rest when [`LayoutBuilder::build`] validates the whole
    /// layout.
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
    /// tokens, finite outcomes, at least 2 agent tokens in the batch).
    pub fn build(&self) -> Result<BatchLayout> {
        self.layout.validate()?;
        Ok(self.layout.clone())
    }

    /// The layout as built so far, unvalidated.
    pub(crate) fn into_layout(self) -> BatchLayout {
        self.layout
    }
}

/// A validated turn/trajectory layout in the form the epilogues (CPU and kernel) read.
/// Members of a group are listed in increasing index order, so every reduction over a group
/// has one fixed order.
///
/// Build it with [`Layout::new`] (and [`Layout::with_credit_start`]); the fields are public for
/// reading. The entries that take a `Layout` ([`crate::advantages`], the kernels' merge mode, the
/// CUDA layout upload) re-check that it is exactly what those build ([`Layout::check`]) and
/// reject one built or edited by hand that is not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// `[T+1]` CSR row offsets of the turns.
    pub turn_offsets: Vec<u32>,
    /// `[T]`
    pub turn_trajectory: Vec<u32>,
    /// `[T]`
    pub turn_credit: Vec<u32>,
    /// Trajectory-level data; `None` when the batch has turns only.
    pub groups: Option<GroupLayout>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct GroupLayout {
    /// `[B]` dense group index in 0..G, in order of first appearance of the caller's group id.
    pub trajectory_group: Vec<u32>,
    /// `[B]`
    pub trajectory_outcome: Vec<f64>,
    /// `[B]`
    pub trajectory_tokens: Vec<u32>,
    /// `[G+1]` CSR into `group_trajectories`.
    pub group_trajectory_offsets: Vec<u32>,
    /// `[B]` trajectory indices, grouped, increasing within a group.
    pub group_trajectories: Vec<u32>,
    /// `[G+1]` CSR into `group_turns`.
    pub group_turn_offsets: Vec<u32>,
    /// `[T]` turn indices, grouped by their trajectory's group, increasing within a group.
    pub group_turns: Vec<u32>,
    /// M = Σ trajectory_tokens.
    pub total_tokens: u64,
    /// `[B+1]` prefix sums of trajectory_tokens: trajectory i's tokens are
    /// `trajectory_token_offsets[i]..trajectory_token_offsets[i+1]` of the `[M]` token outputs
    /// (u64: M may exceed 2^32).
    pub trajectory_token_offsets: Vec<u64>,
    /// `[T]` first credited token of each turn among its trajectory's agent tokens, when the batch
    /// has credit starts (validated by [`Layout::with_credit_start`]); enables `token_advantage`.
    pub turn_credit_start: Option<Vec<u32>>,
    /// L of the padded `[B, L]` token output, when asked for ([`Layout::with_padding`]).
    pub pad_width: Option<u32>,
    /// `[B]` each trajectory's first column in the padded output (zeros when none were given);
    /// empty without `pad_width`.
    pub pad_offset: Vec<u32>,
}

impl Layout {
    /// Validates `turns` (and `trajectories`) against `rows` rows and prepares them (contract
    /// §1): the layout [`crate::TurnAccumulator`] and [`crate::advantages`] take.
    pub fn new(rows: usize, turns: &Turns<'_>, trajectories: Option<&Trajectories<'_>>) -> Result<Layout> {
        layout(rows, turns, trajectories)
    }

    /// Adds each turn's first credited token (see [`crate::Batch::credit_start`]), validated
    /// against the trajectories, which enables `token_advantage`.
    pub fn with_credit_start(mut self, starts: &[u32]) -> Result<Layout> {
        credit_spans(&mut self, starts)?;
        Ok(self)
    }

    /// Adds the padded `[B, L]` token output (see [`Padding`]), validated against the
    /// trajectories; needs credit starts.
    pub fn with_padding(mut self, padding: Padding<'_>) -> Result<Layout> {
        pad(&mut self, &padding)?;
        Ok(self)
    }

    /// Checks that this layout is exactly what [`Layout::new`] (and [`Layout::with_credit_start`])
    /// build from its own turns and trajectories: what every entry that takes a `Layout` re-checks,
    /// since the kernels index memory through each of its arrays.
    pub fn check(&self) -> Result<()> {
        layout_consistent(self)
    }

    pub fn turns(&self) -> usize {
        self.turn_trajectory.len()
    }

    pub fn groups(&self) -> usize {
        self.groups.as_ref().map_or(0, |g| g.group_trajectory_offsets.len() - 1)
    }
}

/// The layout part of [`batch`], for any batch of `rows` rows (also the fused path's
/// [`crate::math::chunks::HiddenBatch`]): at most 2^32 − 1 rows, trajectories only with turns, credit
/// starts only with trajectories, each validated against the rows.
pub(crate) fn batch_layout(
    rows: usize,
    turns: Option<Turns<'_>>,
    trajectories: Option<Trajectories<'_>>,
    credit_start: Option<&[u32]>,
    padding: Option<Padding<'_>>,
) -> Result<Option<Layout>> {
    if rows > u32::MAX as usize {
        return Err(Error::shape(format!("{rows} rows exceed the 2^32 - 1 supported")));
    }
    match (turns, trajectories) {
        (None, Some(_)) => Err(Error::trajectories("Batch::trajectories need a turn layout (Batch::turns)")),
        (None, None) if credit_start.is_some() => Err(credit_start_needs_trajectories()),
        (None, None) if padding.is_some() => Err(padding_needs_credit_starts()),
        (None, None) => Ok(None),
        (Some(turns), trajectories) => {
            let mut out = layout(rows, &turns, trajectories.as_ref())?;
            if let Some(starts) = credit_start {
                credit_spans(&mut out, starts)?;
            }
            if let Some(p) = padding {
                pad(&mut out, &p)?;
            }
            Ok(Some(out))
        }
    }
}

/// The [`Padding`] of an owned layout's `pad_width` and `pad_offset`: offsets need a width.
pub(crate) fn padding_of(width: Option<u32>, offset: &Option<Vec<u32>>) -> Result<Option<Padding<'_>>> {
    match (width, offset) {
        (Some(width), offset) => Ok(Some(Padding { width, offset: offset.as_deref() })),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(Error::trajectories(
            "pad offsets (pad_offset, file tensor trajectory_pad_offset) need a padded width (pad_width, CLI --pad-width)",
        )),
    }
}

fn padding_needs_credit_starts() -> Error {
    Error::trajectories(
        "the padded [B, L] output (padding, CLI --pad-width) is a token output: it needs trajectories and credit starts",
    )
}

/// Validates the padded `[B, L]` token output against a layout with credit starts and records it
/// (`GroupLayout::pad_width`, `pad_offset`): each trajectory's tokens fit its row, and B · L
/// elements of f64 are addressable.
pub(crate) fn pad(layout: &mut Layout, padding: &Padding<'_>) -> Result<()> {
    let g = match layout.groups.as_mut() {
        Some(g) if g.turn_credit_start.is_some() => g,
        _ => return Err(padding_needs_credit_starts()),
    };
    let b = g.trajectory_tokens.len();
    let width = padding.width;
    let offset = match padding.offset {
        Some(o) if o.len() != b => {
            return Err(Error::trajectories(format!(
                "the padded output's offsets (pad_offset) have {} entries for {b} trajectories",
                o.len()
            )))
        }
        Some(o) => o.to_vec(),
        None => vec![0; b],
    };
    for (i, (&o, &n)) in offset.iter().zip(&g.trajectory_tokens).enumerate() {
        if o as u64 + n as u64 > width as u64 {
            return Err(Error::trajectories(format!(
                "trajectory {i}'s {n} agent tokens at offset {o} do not fit the padded width L = {width}"
            )));
        }
    }
    if (b as u128) * (width as u128) * 8 > isize::MAX as u128 {
        return Err(Error::shape(format!("a padded output of {b} x {width} f64 is not addressable")));
    }
    g.pad_width = Some(width);
    g.pad_offset = offset;
    Ok(())
}

fn credit_start_needs_trajectories() -> Error {
    Error::trajectories("credit_start (file tensor turn_credit_start) needs trajectories")
}

/// Validates the credited token spans of a layout with trajectories and records them in it
/// (`GroupLayout::turn_credit_start`): turn t's span `starts[t] .. starts[t] + turn_credit[t]`
/// must lie within its trajectory's `0 .. tokens` and overlap no other span of that trajectory.
/// Errors name the turn ([`Error::CreditSpan`]).
pub(crate) fn credit_spans(layout: &mut Layout, starts: &[u32]) -> Result<()> {
    let t_count = layout.turns();
    let groups = layout.groups.as_ref().ok_or_else(credit_start_needs_trajectories)?;
    if starts.len() != t_count {
        return Err(Error::turns(format!(
            "credit_start (turn_credit_start) has {} entries for {t_count} turns",
            starts.len()
        )));
    }
    check_spans(&layout.turn_trajectory, &layout.turn_credit, &groups.trajectory_tokens, starts)?;
    if let Some(g) = layout.groups.as_mut() {
        g.turn_credit_start = Some(starts.to_vec());
    }
    Ok(())
}

/// Checks that `layout` is what [`layout`] builds from its own primary fields (turn offsets,
/// trajectories and credits; trajectory groups, outcomes and tokens; credit starts), derived
/// fields included (dense group ids in order of first appearance, the group lists, the token
/// offsets and total): a layout built or edited by hand that is not is an error, never an
/// out-of-bounds read in an epilogue. O(T + B).
pub(crate) fn layout_consistent(layout: &Layout) -> Result<()> {
    let Some(&rows) = layout.turn_offsets.last() else {
        return Err(Error::turns("Layout::turn_offsets is empty: it needs turns + 1 entries"));
    };
    let turns = Turns {
        offsets: &layout.turn_offsets,
        trajectory: &layout.turn_trajectory,
        credit_tokens: &layout.turn_credit,
    };
    let trajectories = layout.groups.as_ref().map(|g| Trajectories {
        group: &g.trajectory_group,
        outcome: &g.trajectory_outcome,
        tokens: &g.trajectory_tokens,
    });
    let mut rebuilt = self::layout(rows as usize, &turns, trajectories.as_ref())?;
    if let Some(starts) = layout.groups.as_ref().and_then(|g| g.turn_credit_start.as_deref()) {
        credit_spans(&mut rebuilt, starts)?;
    }
    if let Some(g) = layout.groups.as_ref() {
        if let Some(width) = g.pad_width {
            pad(&mut rebuilt, &Padding { width, offset: Some(&g.pad_offset) })?;
        }
    }
    if rebuilt != *layout {
        return Err(Error::turns(
            "the Layout's derived fields (dense group ids in order of first appearance, group lists, \
             token offsets) are not those Layout::new builds from its turns and trajectories: \
             build it with Layout::new rather than by hand",
        ));
    }
    Ok(())
}

/// The global rows `first_row .. first_row + rows` of a micro-batch (row errors name
/// `first_row + i`) must be representable: their end must fit in `usize`.
pub(crate) fn global_rows(first_row: usize, rows: usize) -> Result<()> {
    match first_row.checked_add(rows) {
        Some(_) => Ok(()),
        None => Err(Error::shape(format!(
            "a micro-batch of {rows} rows starting at global row {first_row}: its global rows overflow usize"
        ))),
    }
}

/// Each span `starts[t] .. starts[t] + credit[t]` within its trajectory's tokens, and disjoint
/// from the other spans of that trajectory.
fn check_spans(turn_trajectory: &[u32], credit: &[u32], tokens: &[u32], starts: &[u32]) -> Result<()> {
    let t_count = starts.len();
    let span = |t: usize| (starts[t] as u64, starts[t] as u64 + credit[t] as u64);
    for (t, &i) in turn_trajectory.iter().enumerate().take(t_count) {
        let i = i as usize;
        let (lo, hi) = span(t);
        let n = tokens[i];
        if hi > n as u64 {
            return Err(Error::CreditSpan {
                turn: t,
                what: format!("{lo}..{hi} extends past trajectory {i}'s {n} agent tokens"),
            });
        }
    }
    // Spans in (trajectory, start) order: each must start at or after the previous one's end.
    let mut order: Vec<usize> = (0..t_count).collect();
    order.sort_by_key(|&t| (turn_trajectory[t], starts[t], t));
    for w in order.windows(2) {
        let (p, t) = (w[0], w[1]);
        let i = turn_trajectory[t];
        if turn_trajectory[p] == i && span(p).1 > span(t).0 {
            // Named by the later turn of the two.
            let (late, early) = (t.max(p), t.min(p));
            let ((lo, hi), (elo, ehi)) = (span(late), span(early));
            return Err(Error::CreditSpan {
                turn: late,
                what: format!("{lo}..{hi} of trajectory {i} overlaps turn {early}'s {elo}..{ehi}"),
            });
        }
    }
    Ok(())
}

/// The micro-batch bounds `[0, cuts…, rows]` of [`crate::Backend::compute_micro_batched`].
pub(crate) fn micro_batches(cuts: &[usize], rows: usize) -> Result<Vec<usize>> {
    let mut bounds = Vec::with_capacity(cuts.len() + 2);
    bounds.push(0);
    for &c in cuts {
        if c < *bounds.last().unwrap_or(&0) || c > rows {
            return Err(Error::shape(format!("micro-batch cut {c} is not increasing within 0..={rows}")));
        }
        bounds.push(c);
    }
    bounds.push(rows);
    Ok(bounds)
}

/// Validates a turn layout over `rows` rows and, optionally, its trajectories.
pub(crate) fn layout(rows: usize, turns: &Turns<'_>, trajectories: Option<&Trajectories<'_>>) -> Result<Layout> {
    let t = turns.trajectory.len();
    if turns.offsets.len() != t + 1 {
        return Err(Error::turns(format!(
            "Turns::offsets / turn_offsets has {} entries, expected turns + 1 = {}",
            turns.offsets.len(),
            t + 1
        )));
    }
    if turns.credit_tokens.len() != t {
        return Err(Error::turns(format!(
            "Turns::credit_tokens / turn_credit_tokens has {} entries for {t} turns",
            turns.credit_tokens.len()
        )));
    }
    if turns.offsets[0] != 0 {
        return Err(Error::turns(format!("Turns::offsets / turn_offsets[0] = {}, must be 0", turns.offsets[0])));
    }
    for (i, w) in turns.offsets.windows(2).enumerate() {
        if w[1] < w[0] {
            return Err(Error::turns(format!(
                "Turns::offsets / turn_offsets decrease at turn {i}: {} then {}",
                w[0], w[1]
            )));
        }
    }
    if turns.offsets[t] as usize != rows {
        return Err(Error::turns(format!(
            "Turns::offsets / turn_offsets[{t}] = {}, must equal the number of rows {rows}",
            turns.offsets[t]
        )));
    }
    if let Some(i) = turns.credit_tokens.iter().position(|&c| c < 1) {
        return Err(Error::turns(format!("turn {i} has Turns::credit_tokens / turn_credit_tokens = 0, must be >= 1")));
    }
    let mut out = Layout {
        turn_offsets: turns.offsets.to_vec(),
        turn_trajectory: turns.trajectory.to_vec(),
        turn_credit: turns.credit_tokens.to_vec(),
        groups: None,
    };
    if let Some(traj) = trajectories {
        out.groups = Some(group_layout(turns, traj)?);
    }
    Ok(out)
}

fn group_layout(turns: &Turns<'_>, traj: &Trajectories<'_>) -> Result<GroupLayout> {
    let b = traj.group.len();
    if traj.outcome.len() != b || traj.tokens.len() != b {
        return Err(Error::trajectories(format!(
            "Trajectories::group / trajectory_group, Trajectories::outcome / trajectory_outcome and \
             Trajectories::tokens / trajectory_tokens have {}, {} and {} entries",
            b,
            traj.outcome.len(),
            traj.tokens.len()
        )));
    }
    if let Some(i) = traj.outcome.iter().position(|r| !r.is_finite()) {
        return Err(Error::trajectories(format!(
            "trajectory {i} has a non-finite Trajectories::outcome / trajectory_outcome {}",
            traj.outcome[i]
        )));
    }
    let mut credited = vec![0u64; b];
    for (t, (&i, &c)) in turns.trajectory.iter().zip(turns.credit_tokens).enumerate() {
        let slot = credited.get_mut(i as usize).ok_or_else(|| {
            Error::turns(format!("turn {t} belongs to trajectory {i} (Turns::trajectory / turn_trajectory), but there are {b} trajectories"))
        })?;
        *slot += c as u64;
    }
    for (i, (&c, &tokens)) in credited.iter().zip(traj.tokens).enumerate() {
        if c > tokens as u64 {
            return Err(Error::trajectories(format!(
                "trajectory {i} credits {c} tokens to its turns (Turns::credit_tokens / turn_credit_tokens) but has \
                 only {tokens} agent tokens (Trajectories::tokens / trajectory_tokens)"
            )));
        }
    }
    let mut trajectory_token_offsets = Vec::with_capacity(b + 1);
    trajectory_token_offsets.push(0u64);
    for &n in traj.tokens {
        trajectory_token_offsets.push(trajectory_token_offsets[trajectory_token_offsets.len() - 1] + n as u64);
    }
    let total_tokens: u64 = trajectory_token_offsets[b];
    if total_tokens < 2 {
        return Err(Error::trajectories(format!(
            "the batch has {total_tokens} agent tokens (Trajectories::tokens / trajectory_tokens); its standard \
             deviations need at least 2"
        )));
    }
    // Dense group ids in order of first appearance.
    let mut dense = std::collections::HashMap::new();
    let trajectory_group: Vec<u32> = traj
        .group
        .iter()
        .map(|&g| {
            let next = dense.len() as u32;
            *dense.entry(g).or_insert(next)
        })
        .collect();
    let g = dense.len();
    let (group_trajectory_offsets, group_trajectories) =
        bucket(g, (0..b as u32).map(|i| (trajectory_group[i as usize], i)));
    let (group_turn_offsets, group_turns) =
        bucket(g, (0..turns.len() as u32).map(|t| (trajectory_group[turns.trajectory[t as usize] as usize], t)));
    Ok(GroupLayout {
        trajectory_group,
        trajectory_outcome: traj.outcome.to_vec(),
        trajectory_tokens: traj.tokens.to_vec(),
        group_trajectory_offsets,
        group_trajectories,
        group_turn_offsets,
        group_turns,
        total_tokens,
        trajectory_token_offsets,
        turn_credit_start: None,
        pad_width: None,
        pad_offset: Vec::new(),
    })
}

/// Stable counting sort of (bucket, item) pairs into CSR form.
fn bucket(buckets: usize, items: impl Iterator<Item = (u32, u32)> + Clone) -> (Vec<u32>, Vec<u32>) {
    let mut offsets = vec![0u32; buckets + 1];
    for (k, _) in items.clone() {
        offsets[k as usize + 1] += 1;
    }
    for k in 0..buckets {
        offsets[k + 1] += offsets[k];
    }
    let mut fill = offsets.clone();
    let mut out = vec![0u32; offsets[buckets] as usize];
    for (k, item) in items {
        out[fill[k as usize] as usize] = item;
        fill[k as usize] += 1;
    }
    (offsets, out)
}
