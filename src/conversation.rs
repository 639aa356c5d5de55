//! The layout told as conversations ([`Conversation`]): each trajectory by its agent turns, each
//! scored turn by the agent turn whose feedback it scores. Rows, credits and credit starts follow
//! from that (contract §1), so a trainer keeps no parallel arrays.

use crate::data::{BatchLayout, LayoutBuilder};
use crate::error::{Error, Result};
use crate::math::epilogue::trajectory_score;
use crate::params::TrajectoryScore;

/// Builds a [`BatchLayout`], credit starts included, from conversations.
///
/// A trajectory is the token counts of its agent turns a_0 … a_{n−1} (the agent's tokens only:
/// not the prompt, not the user's replies). [`Conversation::feedback`] scores the user's reply to
/// a_k: its rows are the positions of a_{k+1} (all of them, or a prefix with
/// [`Conversation::feedback_rows`]), teacher-forced with and without the reply, and its credit
/// goes to a_k, the turn that drew the reply. Only a reply followed by an agent turn can be
/// scored, as in the official code (`docs/official-config.md`).
///
/// Feedback is added in row order: trajectory by trajectory, turn by turn, which is the order of
/// the rows of the logits it goes with. Out of that order is an error, not a silent mismatch.
///
/// ```
/// use infopo_kernels::{Conversation, TrajectoryScore};
/// let mut c = Conversation::new();
/// // GRPO group 0, outcome 1, agent turns of 3, 2 and 4 tokens: replies to the first two scored.
/// let first = c.trajectory(0, 1.0, &[3, 2, 4]);
/// c.feedback(first, 0)?.feedback(first, 1)?;
/// // Per-turn rewards, scored as the official `Sum`; only the reply to a_0 is scored, over the
/// // first 2 tokens of a_1.
/// let second = c.rewarded(0, &[4, 5, 3], &[0.0, 0.25, 0.5], TrajectoryScore::Sum)?;
/// c.feedback_rows(second, 0, 2)?;
/// let layout = c.build()?;
/// assert_eq!(layout.turns.offsets, [0, 2, 6, 8]); // a_1 and a_2 of the first, 2 rows of the second
/// assert_eq!(layout.turns.credit_tokens, [3, 2, 4]); // a_0 and a_1 of the first, a_0 of the second
/// assert_eq!(layout.credit_start.as_deref(), Some(&[0, 3, 0][..]));
/// assert_eq!(layout.trajectories.tokens, [9, 12]);
/// assert_eq!(layout.trajectories.outcome, [1.0, 0.75]);
/// # Ok::<(), infopo_kernels::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    group: Vec<u32>,
    outcome: Vec<f64>,
    /// `[B+1]` CSR into `turn_tokens`.
    turn_offsets: Vec<usize>,
    turn_tokens: Vec<u32>,
    /// (trajectory, agent turn whose reply is scored, rows), in row order.
    feedback: Vec<(u32, u32, u32)>,
}

impl Conversation {
    /// No trajectories.
    pub fn new() -> Self {
        Conversation { turn_offsets: vec![0], ..Conversation::default() }
    }

    /// Adds a trajectory of GRPO group `group` (any id; trajectories sharing it form a group),
    /// score `outcome` (R_i) and agent turns of `agent_turns` tokens each; returns its index.
    pub fn trajectory(&mut self, group: u32, outcome: f64, agent_turns: &[u32]) -> u32 {
        self.group.push(group);
        self.outcome.push(outcome);
        self.turn_tokens.extend_from_slice(agent_turns);
        self.turn_offsets.push(self.turn_tokens.len());
        (self.group.len() - 1) as u32
    }

    /// Adds a trajectory whose score is `score` of its agent turns' `rewards` (one per agent turn,
    /// finite); returns its index.
    pub fn rewarded(
        &mut self,
        group: u32,
        agent_turns: &[u32],
        rewards: &[f64],
        score: TrajectoryScore,
    ) -> Result<u32> {
        let i = self.group.len();
        if rewards.len() != agent_turns.len() {
            return Err(Error::trajectories(format!(
                "trajectory {i} has {} agent turns but {} per-turn rewards",
                agent_turns.len(),
                rewards.len()
            )));
        }
        if let Some(k) = rewards.iter().position(|r| !r.is_finite()) {
            return Err(Error::trajectories(format!(
                "trajectory {i}'s agent turn {k} has a non-finite reward {}",
                rewards[k]
            )));
        }
        if let TrajectoryScore::RewardToGo { gamma } = score {
            if !(0.0..=1.0).contains(&gamma) {
                return Err(Error::Param { name: "gamma", value: gamma, why: "must be in [0, 1]" });
            }
        }
        Ok(self.trajectory(group, trajectory_score(score, rewards), agent_turns))
    }

    /// Scores the user's reply to agent turn `turn` of `trajectory` over every token of agent turn
    /// `turn + 1`.
    pub fn feedback(&mut self, trajectory: u32, turn: u32) -> Result<&mut Self> {
        let next = self.agent_turn(trajectory, turn.saturating_add(1), turn)?;
        self.feedback_rows(trajectory, turn, next)
    }

    /// Scores the user's reply to agent turn `turn` of `trajectory` over the first `rows` tokens
    /// of agent turn `turn + 1` (0 is allowed: the turn then gets info 0).
    pub fn feedback_rows(&mut self, trajectory: u32, turn: u32, rows: u32) -> Result<&mut Self> {
        let next = self.agent_turn(trajectory, turn.saturating_add(1), turn)?;
        if rows > next {
            return Err(Error::turns(format!(
                "feedback to trajectory {trajectory}'s agent turn {turn} scores {rows} rows, but agent turn {} has \
                 {next} tokens",
                turn + 1
            )));
        }
        if self.agent_turn(trajectory, turn, turn)? == 0 {
            return Err(Error::turns(format!(
                "trajectory {trajectory}'s agent turn {turn} has 0 tokens: the reply it drew has nothing to credit"
            )));
        }
        if let Some(&(i, k, _)) = self.feedback.last() {
            if (i, k) >= (trajectory, turn) {
                return Err(Error::turns(format!(
                    "feedback to trajectory {trajectory}'s agent turn {turn} added after that to trajectory {i}'s \
                     turn {k}: add feedback in row order (by trajectory, then turn), once per turn"
                )));
            }
        }
        self.feedback.push((trajectory, turn, rows));
        Ok(self)
    }

    /// The layout, credit starts included, validated as the backends will.
    pub fn build(&self) -> Result<BatchLayout> {
        let mut b = LayoutBuilder::new();
        for (i, (&group, &outcome)) in self.group.iter().zip(&self.outcome).enumerate() {
            let tokens = self.turns(i).iter().try_fold(0u32, |sum, &n| sum.checked_add(n));
            let tokens =
                tokens.ok_or_else(|| Error::trajectories(format!("trajectory {i}'s agent tokens exceed 2^32 - 1")))?;
            b.trajectory(group, outcome, tokens);
        }
        let mut credit_start = Vec::with_capacity(self.feedback.len());
        for &(i, k, rows) in &self.feedback {
            let turns = self.turns(i as usize);
            b.turn(i, rows, turns[k as usize])?;
            // Fits in u32: the trajectory's token total did.
            credit_start.push(turns[..k as usize].iter().sum());
        }
        let mut layout = b.into_layout();
        layout.credit_start = Some(credit_start);
        layout.validate()?;
        Ok(layout)
    }

    fn turns(&self, i: usize) -> &[u32] {
        &self.turn_tokens[self.turn_offsets[i]..self.turn_offsets[i + 1]]
    }

    /// The tokens of agent turn `k` of `trajectory`, for the feedback to agent turn `turn`.
    fn agent_turn(&self, trajectory: u32, k: u32, turn: u32) -> Result<u32> {
        let b = self.group.len();
        if trajectory as usize >= b {
            return Err(Error::turns(format!(
                "feedback to trajectory {trajectory}'s agent turn {turn}, but {b} trajectories were added"
            )));
        }
        let turns = self.turns(trajectory as usize);
        turns.get(k as usize).copied().ok_or_else(|| {
            Error::turns(format!(
                "feedback to trajectory {trajectory}'s agent turn {turn} cannot be scored: the trajectory has {} \
                 agent turns, and only a reply followed by another agent turn is scored",
                turns.len()
            ))
        })
    }
}
