//! A small but real multi-turn GRPO trainer that uses infopo-kernels the way a Rust trainer would.
//!
//! The game: a scripted user holds a hidden item, one of `ITEMS` items described by
//! `INFORMATIVE_ATTRS` yes/no attributes (item k has attribute j iff bit j of k is set), plus one
//! attribute every item has (asking it reveals nothing). Each agent turn is two tokens: `ASK attr_j`
//! (the user answers `YES`/`NO`, appended to the context) or `GUESS item_k` (the episode ends,
//! reward 1 if right, else 0). At most `MAX_AGENT_TURNS` agent turns; running out is a failure.
//!
//! The policy is a tiny candle recurrent net (embedding → tanh recurrence → vocabulary logits,
//! ~4k parameters), on the CPU by default. Each training step samples GRPO groups (G
//! trajectories per hidden item); for every user reply followed by an agent turn it takes the
//! policy's logits over that next agent turn's tokens twice — with the real reply in context and
//! with the reply replaced by the placeholder `MASK` — and hands both, as candle tensors, with the
//! batch's `Conversation` layout to `infopo_kernels::candle::compute_layout`, which returns the outcome advantages and the per-turn
//! information bonus (log-ratio estimator, group normalisation, variance gate). The bonus
//! goes to the agent turn that asked the question (its answer is what changed the next turn), the
//! outcome advantage to every agent token, and the policy takes one AdamW step on
//! −(Σ advantage · log π(token) + c · Σ entropy) / M over the M agent tokens (c = `--entropy`).
//!
//! ```text
//! cargo run --release --features candle --example grpo_candle -- [--beta 0.1] [--steps N] [--seed S] [--device cpu|cuda]
//! ```
//!
//! It prints progress every few steps and ends with `success rate A% -> B%`: the success rate of
//! the policy's own sampled decoding on a fixed evaluation set (every item, `EVAL_EPISODES_PER_ITEM`
//! episodes each, a fixed sampling seed), before and after training.

use std::error::Error;
use std::time::Instant;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{Embedding, Linear, Module, Optimizer};
use clap::Parser;
use infopo_kernels::{Conversation, Params};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type AnyResult<T> = std::result::Result<T, Box<dyn Error>>;

// ---- The game -------------------------------------------------------------------------------

/// Attributes whose answer depends on the item: log2 of the number of items.
const INFORMATIVE_ATTRS: usize = 2;
const ITEMS: usize = 1 << INFORMATIVE_ATTRS;
/// One more attribute that every item has: a question whose answer carries no information.
const ATTRS: usize = INFORMATIVE_ATTRS + 1;
/// Enough to ask every informative attribute once and then guess; no room for a wasted question.
const MAX_AGENT_TURNS: usize = INFORMATIVE_ATTRS + 1;
const TOKENS_PER_AGENT_TURN: usize = 2;
/// BOS, then per agent turn its two tokens and (except after the last) the user's reply.
const MAX_SEQUENCE: usize = 1 + MAX_AGENT_TURNS * (TOKENS_PER_AGENT_TURN + 1) - 1;
/// The policy reads tokens 0..len-1 and predicts 1..len.
const MAX_INPUTS: usize = MAX_SEQUENCE - 1;

const BOS: u32 = 0;
/// The placeholder that replaces the user's reply in the masked run.
const MASK: u32 = 1;
const YES: u32 = 2;
const NO: u32 = 3;
const ASK: u32 = 4;
const GUESS: u32 = 5;
const ATTR0: u32 = 6;
const ITEM0: u32 = ATTR0 + ATTRS as u32;
const VOCAB: usize = ITEM0 as usize + ITEMS;

/// The scripted user's answer to "does it have attribute `attr`?".
fn user_reply(item: usize, attr: usize) -> u32 {
    let has = attr >= INFORMATIVE_ATTRS || (item >> attr) & 1 == 1;
    if has {
        YES
    } else {
        NO
    }
}

/// Tokens the grammar allows after `previous`: a verb after BOS or a reply (real or masked), an
/// attribute after ASK, an item after GUESS, the user's reply after an attribute.
fn allowed_after(previous: u32) -> std::ops::Range<u32> {
    match previous {
        BOS | MASK | YES | NO => ASK..GUESS + 1,
        ASK => ATTR0..ITEM0,
        GUESS => ITEM0..VOCAB as u32,
        p if p < ITEM0 => YES..NO + 1,
        _ => BOS..BOS + 1, // after a guess: padding
    }
}

/// A large negative logit for tokens the grammar forbids (finite, so 0 · logit stays 0 in the loss
/// and both logit tensors stay inside the crate's input range).
const FORBIDDEN: f32 = -1e4;

/// `[VOCAB, VOCAB]`: row p is the additive logit mask after token p.
fn grammar_table(device: &Device) -> candle_core::Result<Tensor> {
    let mut table = vec![FORBIDDEN; VOCAB * VOCAB];
    for previous in 0..VOCAB as u32 {
        for next in allowed_after(previous) {
            table[previous as usize * VOCAB + next as usize] = 0.0;
        }
    }
    Tensor::from_vec(table, (VOCAB, VOCAB), device)
}

/// One played game.
#[derive(Debug, Clone)]
struct Episode {
    item: usize,
    /// BOS, agent tokens and the user's replies, in order.
    tokens: Vec<u32>,
    /// Agent turns played (each `TOKENS_PER_AGENT_TURN` tokens).
    agent_turns: usize,
    done: bool,
    reward: f64,
}

impl Episode {
    fn new(item: usize) -> Self {
        Episode { item, tokens: vec![BOS], agent_turns: 0, done: false, reward: 0.0 }
    }

    /// Sequence index of agent turn k's first token: after BOS, each earlier turn and its reply.
    fn agent_turn_start(k: usize) -> usize {
        1 + k * (TOKENS_PER_AGENT_TURN + 1)
    }

    /// Appends a sampled agent token and plays the user's side.
    fn push_agent_token(&mut self, token: u32) {
        self.tokens.push(token);
        let previous = self.tokens[self.tokens.len() - 2];
        if previous == ASK {
            self.agent_turns += 1;
            if self.agent_turns == MAX_AGENT_TURNS {
                self.done = true; // out of turns without a guess
            } else {
                self.tokens.push(user_reply(self.item, (token - ATTR0) as usize));
            }
        } else if previous == GUESS {
            self.agent_turns += 1;
            self.done = true;
            self.reward = if (token - ITEM0) as usize == self.item { 1.0 } else { 0.0 };
        }
    }

    fn questions(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.agent_turns)
            .map(Self::agent_turn_start)
            .filter(|&s| self.tokens[s] == ASK && s + 1 < self.tokens.len())
            .map(|s| (self.tokens[s + 1] - ATTR0) as usize)
    }
}

// ---- The policy -----------------------------------------------------------------------------

const EMBED: usize = 16;
const HIDDEN: usize = 48;

/// Embedding → h_t = tanh(W_x e(x_t) + W_h h_{t−1} + b) → logits = W_o h_t + b_o.
struct Policy {
    embed: Embedding,
    input: Linear,
    recur: Linear,
    output: Linear,
    grammar: Tensor,
    device: Device,
}

/// A `[rows, cols]` variable, uniform in ±1/√fan_in from the example's own seeded generator
/// (candle's CPU generator cannot be seeded), so a run is reproducible.
fn uniform_var(rng: &mut StdRng, rows: usize, cols: usize, fan_in: usize, device: &Device) -> candle_core::Result<Var> {
    let bound = 1.0 / (fan_in as f32).sqrt();
    let values: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-bound..bound)).collect();
    Var::from_tensor(&Tensor::from_vec(values, (rows, cols), device)?)
}

impl Policy {
    fn new(rng: &mut StdRng, device: &Device) -> candle_core::Result<(Self, Vec<Var>)> {
        let embed = uniform_var(rng, VOCAB, EMBED, 1, device)?;
        let w_x = uniform_var(rng, HIDDEN, EMBED, EMBED, device)?;
        let b_x = Var::from_tensor(&Tensor::zeros(HIDDEN, DType::F32, device)?)?;
        let w_h = uniform_var(rng, HIDDEN, HIDDEN, HIDDEN, device)?;
        let w_o = uniform_var(rng, VOCAB, HIDDEN, HIDDEN, device)?;
        let b_o = Var::from_tensor(&Tensor::zeros(VOCAB, DType::F32, device)?)?;
        let policy = Policy {
            embed: Embedding::new(embed.as_tensor().clone(), EMBED),
            input: Linear::new(w_x.as_tensor().clone(), Some(b_x.as_tensor().clone())),
            recur: Linear::new(w_h.as_tensor().clone(), None),
            output: Linear::new(w_o.as_tensor().clone(), Some(b_o.as_tensor().clone())),
            grammar: grammar_table(device)?,
            device: device.clone(),
        };
        Ok((policy, vec![embed, w_x, b_x, w_h, w_o, b_o]))
    }

    /// One recurrence step: `[B, HIDDEN]` state and `[B]` input tokens → the next state.
    fn step(&self, state: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
        (self.input.forward(&self.embed.forward(tokens)?)? + self.recur.forward(state)?)?.tanh()
    }

    /// Logits for the token after each input (grammar applied): `[..., HIDDEN]` states and the
    /// matching `[...]` input tokens → `[..., VOCAB]`.
    fn logits(&self, states: &Tensor, tokens: &Tensor) -> candle_core::Result<Tensor> {
        let mask = self.grammar.index_select(&tokens.flatten_all()?, 0)?;
        let mut shape = tokens.dims().to_vec();
        shape.push(VOCAB);
        self.output.forward(states)? + mask.reshape(shape)?
    }

    /// Teacher-forced logits over padded inputs `[B, L]` → `[B, L, VOCAB]`.
    fn forward(&self, inputs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, len) = inputs.dims2()?;
        // The input projection of every position at once; only the recurrence is sequential.
        let projected = self.input.forward(&self.embed.forward(inputs)?)?;
        let mut state = Tensor::zeros((batch, HIDDEN), DType::F32, &self.device)?;
        let mut states = Vec::with_capacity(len);
        for p in 0..len {
            state = (projected.i((.., p))? + self.recur.forward(&state)?)?.tanh()?;
            states.push(state.clone());
        }
        self.logits(&Tensor::stack(&states, 1)?, inputs)
    }
}

/// Plays one episode per entry of `items` in lockstep, sampling from the policy.
fn play(policy: &Policy, items: &[usize], rng: &mut StdRng) -> candle_core::Result<Vec<Episode>> {
    let mut episodes: Vec<Episode> = items.iter().map(|&item| Episode::new(item)).collect();
    // Tokens of each episode already fed to the recurrence.
    let mut fed = vec![0usize; items.len()];
    let mut state = Tensor::zeros((items.len(), HIDDEN), DType::F32, &policy.device)?;
    while episodes.iter().any(|e| !e.done) {
        // Every live episode feeds its next unfed token (finished ones feed padding).
        let feed: Vec<u32> = episodes.iter().zip(&fed).map(|(e, &f)| if e.done { BOS } else { e.tokens[f] }).collect();
        let feed = Tensor::new(feed.as_slice(), &policy.device)?;
        state = policy.step(&state, &feed)?.detach();
        let probs = candle_nn::ops::softmax_last_dim(&policy.logits(&state, &feed)?)?.to_vec2::<f32>()?;
        for ((episode, fed), probs) in episodes.iter_mut().zip(&mut fed).zip(probs) {
            if episode.done {
                continue;
            }
            *fed += 1;
            // A user reply already waiting (appended after the question) is fed next, not sampled.
            if *fed == episode.tokens.len() {
                episode.push_agent_token(sample(&probs, rng));
            }
        }
    }
    Ok(episodes)
}

fn sample(probs: &[f32], rng: &mut StdRng) -> u32 {
    let mut u = rng.gen::<f32>() * probs.iter().sum::<f32>();
    for (token, &p) in probs.iter().enumerate() {
        if u < p {
            return token as u32;
        }
        u -= p;
    }
    // Rounding left u just above the total: the last token with any mass.
    probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32
}

const EVAL_EPISODES_PER_ITEM: usize = 32;
const EVAL_SEED: u64 = 0xE7A1;

/// Success rate (%) of sampled decoding on the fixed evaluation set.
fn evaluate(policy: &Policy) -> candle_core::Result<f64> {
    let items: Vec<usize> = (0..ITEMS).flat_map(|item| std::iter::repeat_n(item, EVAL_EPISODES_PER_ITEM)).collect();
    let episodes = play(policy, &items, &mut StdRng::seed_from_u64(EVAL_SEED))?;
    Ok(100.0 * episodes.iter().map(|e| e.reward).sum::<f64>() / episodes.len() as f64)
}

// ---- From episodes to the crate's batch and back ----------------------------------------------

/// A user reply followed by an agent turn: the crate scores that next turn's tokens.
struct ScoredTurn {
    trajectory: usize,
    /// Sequence index of the user's reply.
    reply: usize,
    /// The agent turn that asked the question (it receives the turn's credit).
    asking_turn: usize,
}

fn scored_turns(episodes: &[Episode]) -> Vec<ScoredTurn> {
    let mut turns = Vec::new();
    for (trajectory, episode) in episodes.iter().enumerate() {
        for asking_turn in 0..episode.agent_turns.saturating_sub(1) {
            let reply = Episode::agent_turn_start(asking_turn + 1) - 1;
            turns.push(ScoredTurn { trajectory, reply, asking_turn });
        }
    }
    turns
}

/// `[B, MAX_INPUTS]` inputs (tokens 0..len-1, padded with BOS).
fn padded_inputs(sequences: impl Iterator<Item = Vec<u32>>, device: &Device) -> candle_core::Result<Tensor> {
    let mut flat = Vec::new();
    let mut rows = 0;
    for tokens in sequences {
        let inputs = &tokens[..tokens.len() - 1];
        flat.extend_from_slice(inputs);
        flat.extend(std::iter::repeat_n(BOS, MAX_INPUTS - inputs.len()));
        rows += 1;
    }
    Tensor::from_vec(flat, (rows, MAX_INPUTS), device)
}

/// What one step measured, for the progress line.
struct StepStats {
    reward: f64,
    questions: f64,
    informative: f64,
    bonus_tokens: usize,
    mean_abs_bonus: f64,
}

/// One GRPO step: play, score with the crate, scatter to tokens, one optimiser step.
fn train_step(
    policy: &Policy,
    optimizer: &mut candle_nn::AdamW,
    params: &Params,
    entropy_weight: f64,
    items: &[usize],
    rng: &mut StdRng,
) -> AnyResult<StepStats> {
    let episodes = play(policy, items, rng)?;
    let device = &policy.device;
    let batch = episodes.len();

    // The real run: teacher-forced logits of every trajectory (they also give the loss).
    let real_inputs = padded_inputs(episodes.iter().map(|e| e.tokens.clone()), device)?;
    let real_logits = policy.forward(&real_inputs)?;

    // The masked run: for each scored turn, its trajectory with that reply replaced by MASK.
    let turns = scored_turns(&episodes);
    let masked_logits = if turns.is_empty() {
        Tensor::zeros((0, MAX_INPUTS, VOCAB), DType::F32, device)? // every game ended at its first turn
    } else {
        let masked_inputs = padded_inputs(
            turns.iter().map(|t| {
                let mut tokens = episodes[t.trajectory].tokens.clone();
                tokens[t.reply] = MASK;
                tokens
            }),
            device,
        )?;
        policy.forward(&masked_inputs)?
    };

    // The rows the crate scores: the next agent turn's tokens, predicted at input positions
    // reply and reply + 1, gathered on the policy's device into [N, VOCAB] tensors.
    let (mut real_rows, mut masked_rows, mut targets) = (Vec::new(), Vec::new(), Vec::new());
    let mut turn_offsets = vec![0u32];
    for (t, turn) in turns.iter().enumerate() {
        for position in turn.reply..turn.reply + TOKENS_PER_AGENT_TURN {
            real_rows.push((turn.trajectory * MAX_INPUTS + position) as u32);
            masked_rows.push((t * MAX_INPUTS + position) as u32);
            targets.push(episodes[turn.trajectory].tokens[position + 1]);
        }
        turn_offsets.push(targets.len() as u32);
    }
    let rows = targets.len();
    let rows_of = |logits: &Tensor, indices: Vec<u32>| -> candle_core::Result<Tensor> {
        let flat = logits.detach().reshape(((), VOCAB))?;
        flat.index_select(&Tensor::from_vec(indices, rows, device)?, 0)
    };
    let real = rows_of(&real_logits, real_rows)?;
    let masked = rows_of(&masked_logits, masked_rows)?;
    let targets = Tensor::from_vec(targets, rows, device)?;

    // The layout, told as conversations: each trajectory's agent turns (the replies are not
    // agent tokens), one GRPO group per hidden item drawn for this step (trajectories
    // i·G .. (i+1)·G), and the replies scored, in the order their rows were gathered. Each turn's
    // rows are the next agent turn's tokens; its bonus goes to the agent turn that asked.
    let mut conv = Conversation::new();
    for (i, e) in episodes.iter().enumerate() {
        conv.trajectory((i / GROUP_SIZE) as u32, e.reward, &vec![TOKENS_PER_AGENT_TURN as u32; e.agent_turns]);
    }
    for t in &turns {
        conv.feedback(t.trajectory as u32, t.asking_turn as u32)?;
    }
    let layout = conv.build()?;

    // candle tensors in, candle tensors out: the CPU reference for CPU tensors, the kernels on
    // candle's own stream for CUDA tensors.
    let output = infopo_kernels::candle::compute_layout(&real, &masked, &targets, &layout, params)?;
    let advantages = output.advantages.ok_or("the crate returned no advantages for a batch with trajectories")?;
    let turn_bonus = advantages.turn_bonus.to_vec1::<f64>()?;
    // [M] trajectory-major: the outcome advantage on every response token plus each turn's bonus
    // on its credited span, as the policy loss consumes it.
    let per_token: Vec<f32> = advantages
        .token_advantage
        .ok_or("credit starts were given, so the crate returns token advantages")?
        .to_dtype(DType::F32)?
        .to_vec1()?;

    // Token j of trajectory b's response is predicted at input position j / 2 * 3 + j % 2.
    let mut weights = vec![0f32; batch * MAX_INPUTS];
    let mut agent_positions = vec![0f32; batch * MAX_INPUTS];
    let mut next = 0;
    for (b, &tokens) in layout.trajectories.tokens.iter().enumerate() {
        for j in 0..tokens as usize {
            let (turn, within) = (j / TOKENS_PER_AGENT_TURN, j % TOKENS_PER_AGENT_TURN);
            let position = b * MAX_INPUTS + Episode::agent_turn_start(turn) - 1 + within;
            weights[position] = per_token[next];
            agent_positions[position] = 1.0;
            next += 1;
        }
    }
    let next_tokens = padded_inputs(
        episodes.iter().map(|e| {
            // Shifted by one: input position p's target is token p + 1 (the extra last token is
            // dropped, padding carries weight 0).
            let mut shifted = e.tokens[1..].to_vec();
            shifted.push(BOS);
            shifted
        }),
        device,
    )?;
    let all_log_probs = candle_nn::ops::log_softmax(&real_logits, D::Minus1)?;
    let log_probs = all_log_probs.gather(&next_tokens.unsqueeze(2)?, 2)?.squeeze(2)?;
    let weights = Tensor::from_vec(weights, (batch, MAX_INPUTS), device)?;
    // Entropy of each agent position's distribution (forbidden tokens have p = 0 exactly).
    let entropy = (all_log_probs.exp()? * &all_log_probs)?.sum(D::Minus1)?.neg()?;
    let agent_positions = Tensor::from_vec(agent_positions, (batch, MAX_INPUTS), device)?;
    let objective = ((log_probs * weights)? + (entropy * agent_positions)?.affine(entropy_weight, 0.0)?)?;
    let loss = (objective.sum_all()? * (-1.0 / per_token.len() as f64))?;
    optimizer.backward_step(&loss)?;

    let questions: Vec<usize> = episodes.iter().flat_map(|e| e.questions()).collect();
    let bonuses: Vec<f64> = turn_bonus.into_iter().filter(|b| *b != 0.0).collect();
    Ok(StepStats {
        reward: episodes.iter().map(|e| e.reward).sum::<f64>() / batch as f64,
        questions: questions.len() as f64 / batch as f64,
        informative: questions.iter().filter(|&&a| a < INFORMATIVE_ATTRS).count() as f64
            / questions.len().max(1) as f64,
        bonus_tokens: bonuses.len() * TOKENS_PER_AGENT_TURN,
        mean_abs_bonus: bonuses.iter().map(|b| b.abs()).sum::<f64>() / bonuses.len().max(1) as f64,
    })
}

// ---- Command line ---------------------------------------------------------------------------

const GROUPS_PER_STEP: usize = 16;
const GROUP_SIZE: usize = 8;
const LEARNING_RATE: f64 = 0.005;
/// Without it the policy collapses early onto "ask one question, guess" (50%), see docs/guide.md.
const ENTROPY_WEIGHT: f64 = 0.05;

#[derive(Parser)]
#[command(about = "A multi-turn GRPO trainer for a clarification game, advantages from infopo-kernels")]
struct Args {
    /// β, the weight of the InfoPO information bonus (0: outcome-only GRPO).
    #[arg(long, default_value_t = Params::default().beta)]
    beta: f64,
    /// Optimiser steps.
    #[arg(long, default_value_t = 2000)]
    steps: usize,
    /// Seed of the initial weights and of the training rollouts.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// cpu, or cuda (needs a build with `--features cuda` and a GPU).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight of the entropy bonus on agent tokens (keeps the policy exploring).
    #[arg(long, default_value_t = ENTROPY_WEIGHT)]
    entropy: f64,
    /// AdamW learning rate.
    #[arg(long, default_value_t = LEARNING_RATE)]
    lr: f64,
    /// Print progress every this many steps.
    #[arg(long, default_value_t = 100)]
    log_every: usize,
}

fn main() -> std::process::ExitCode {
    match run(Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("grpo_candle: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> AnyResult<()> {
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            let device = Device::new_cuda(0).map_err(|e| {
                format!(
                    "--device cuda: no CUDA device ({e}); build with --features candle,cuda on a machine with a GPU"
                )
            })?;
            device
        }
        other => return Err(format!("unknown --device `{other}` (expected cpu or cuda)").into()),
    };
    let params = Params { beta: args.beta, ..Params::default() };
    params.validate()?;

    let mut rng = StdRng::seed_from_u64(args.seed);
    let (policy, vars) = Policy::new(&mut rng, &device)?;
    let parameters: usize = vars.iter().map(|v| v.elem_count()).sum();
    let mut optimizer =
        candle_nn::AdamW::new(vars, candle_nn::ParamsAdamW { lr: args.lr, weight_decay: 0.0, ..Default::default() })?;
    println!(
        "grpo_candle: {ITEMS} items, {ATTRS} attributes ({INFORMATIVE_ATTRS} informative), ≤ {MAX_AGENT_TURNS} agent turns; \
         policy {parameters} parameters on {}; {GROUPS_PER_STEP} groups × {GROUP_SIZE} per step; β = {}, seed {}",
        args.device,
        params.beta,
        args.seed
    );

    let started = Instant::now();
    let before = evaluate(&policy)?;
    println!("step     0  eval success {before:5.1}%");
    for step in 1..=args.steps {
        let items: Vec<usize> =
            (0..GROUPS_PER_STEP).flat_map(|_| std::iter::repeat_n(rng.gen_range(0..ITEMS), GROUP_SIZE)).collect();
        let stats = train_step(&policy, &mut optimizer, &params, args.entropy, &items, &mut rng)?;
        if step % args.log_every == 0 || step == args.steps {
            println!(
                "step {step:5}  reward {:.3}  questions/episode {:.2} ({:3.0}% informative)  bonus on {:3} tokens, mean |bonus| {:.4}  {:.1}s",
                stats.reward,
                stats.questions,
                100.0 * stats.informative,
                stats.bonus_tokens,
                stats.mean_abs_bonus,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let after = evaluate(&policy)?;
    println!("success rate {before:.1}% -> {after:.1}%");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_training_step_moves_the_policy() -> AnyResult<()> {
        let device = Device::Cpu;
        let mut rng = StdRng::seed_from_u64(7);
        let (policy, vars) = Policy::new(&mut rng, &device)?;
        let before: Vec<Vec<f32>> =
            vars.iter().map(|v| v.flatten_all()?.to_vec1()).collect::<candle_core::Result<_>>()?;
        // No weight decay and no entropy term: only the advantages from the crate move the weights.
        let adamw = candle_nn::ParamsAdamW { weight_decay: 0.0, ..Default::default() };
        let mut optimizer = candle_nn::AdamW::new(vars.clone(), adamw)?;
        let items: Vec<usize> = (0..ITEMS).flat_map(|item| std::iter::repeat_n(item, GROUP_SIZE)).collect();
        let stats = train_step(&policy, &mut optimizer, &Params::default(), 0.0, &items, &mut rng)?;
        assert!((0.0..=1.0).contains(&stats.reward) && stats.mean_abs_bonus.is_finite());
        for (var, before) in vars.iter().zip(before) {
            assert_ne!(var.flatten_all()?.to_vec1::<f32>()?, before);
        }
        Ok(())
    }

    #[test]
    fn a_batch_without_scored_turns_still_gets_outcome_advantages() -> AnyResult<()> {
        // Every game ended at its first turn: no rows, no turns, only outcomes.
        let empty = Tensor::zeros((0, VOCAB), DType::F32, &Device::Cpu)?;
        let targets = Tensor::zeros(0, DType::U32, &Device::Cpu)?;
        let mut conv = Conversation::new();
        conv.trajectory(0, 1.0, &[2]);
        conv.trajectory(0, 0.0, &[2]);
        let layout = conv.build()?;
        let out = infopo_kernels::candle::compute_layout(&empty, &empty, &targets, &layout, &Params::default())?;
        let advantages = out.advantages.ok_or("no advantages")?;
        let outcome = advantages.trajectory_advantage.to_vec1::<f64>()?;
        assert!(outcome[0] > 0.0 && outcome[1] < 0.0);
        Ok(())
    }

    #[test]
    fn the_scripted_user_and_the_grammar() {
        // Item 2 = 0b10: no attribute 0, attribute 1; every item has the last attribute.
        assert_eq!(user_reply(2, 0), NO);
        assert_eq!(user_reply(2, 1), YES);
        assert_eq!(user_reply(0, ATTRS - 1), YES);
        let mut episode = Episode::new(2);
        for token in [ASK, ATTR0 + 1, GUESS, ITEM0 + 2] {
            assert!(allowed_after(*episode.tokens.last().unwrap()).contains(&token));
            episode.push_agent_token(token);
        }
        assert_eq!(episode.tokens, [BOS, ASK, ATTR0 + 1, YES, GUESS, ITEM0 + 2]);
        assert!(episode.done);
        assert_eq!((episode.agent_turns, episode.reward), (2, 1.0));
        // The reply after turn 0 is followed by turn 1: one scored turn crediting turn 0.
        let turns = scored_turns(&[episode]);
        assert_eq!(turns.len(), 1);
        assert_eq!((turns[0].reply, turns[0].asking_turn), (3, 0));
    }
}
