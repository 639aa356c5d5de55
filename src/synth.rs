//! Synthetic InfoPO batches with realistic logits, for the CLI's main job, benches and tests.
//! Deterministic for a seed; no external randomness.

use crate::logits::LogitElement;

/// SplitMix64: small, fast and good enough for synthetic data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.uniform();
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A synthetic batch in owned buffers. `real`/`masked` are [rows, vocab] row-major.
#[derive(Debug, Clone)]
pub struct SynthBatch<T> {
    pub rows: usize,
    pub vocab: usize,
    pub real: Vec<T>,
    pub masked: Vec<T>,
    pub targets: Vec<i64>,
    pub turn_offsets: Vec<u32>,
    pub turn_trajectory: Vec<u32>,
    pub turn_credit_tokens: Vec<u32>,
    pub trajectory_group: Vec<u32>,
    pub trajectory_outcome: Vec<f64>,
    pub trajectory_tokens: Vec<u32>,
}

/// Shape of a synthetic batch.
#[derive(Debug, Clone, Copy)]
pub struct SynthSpec {
    pub rows: usize,
    pub vocab: usize,
    pub groups: usize,
    pub trajectories_per_group: usize,
    pub seed: u64,
}

impl SynthSpec {
    /// The CLI's default job: Qwen's vocabulary, 4 GRPO groups of 8, about 1000 rows.
    pub fn default_job() -> Self {
        SynthSpec { rows: 1024, vocab: 151_936, groups: 4, trajectories_per_group: 8, seed: 2026 }
    }
}

/// Logits like a language model's: a broad normal background, a few strongly preferred tokens;
/// the masked run is the real one with its preferences partly moved (feedback removed).
/// Rows are generated in parallel, each from its own stream of `rng`.
pub fn logits_pair<T: LogitElement>(rng: &mut Rng, rows: usize, vocab: usize) -> (Vec<T>, Vec<T>, Vec<i64>) {
    use rayon::prelude::*;
    let zero = T::from_f32(0.0);
    let mut real = vec![zero; rows * vocab];
    let mut masked = vec![zero; rows * vocab];
    let mut targets = vec![0i64; rows];
    let seeds: Vec<u64> = (0..rows).map(|_| rng.next_u64()).collect();
    real.par_chunks_mut(vocab.max(1))
        .zip(masked.par_chunks_mut(vocab.max(1)))
        .zip(targets.par_iter_mut().zip(seeds))
        .for_each(|((real, masked), (target, seed))| {
            let mut rng = Rng::new(seed);
            for (x_out, y_out) in real.iter_mut().zip(masked.iter_mut()) {
                let x = 2.0 * rng.normal() as f32;
                *x_out = T::from_f32(x);
                *y_out = T::from_f32(x + 0.3 * rng.normal() as f32);
            }
            // A handful of preferred tokens; the feedback sharpens the real distribution.
            let peaks = 1 + rng.below(4) as usize;
            let mut first = 0;
            for p in 0..peaks {
                let i = rng.below(vocab as u64) as usize;
                if p == 0 {
                    first = i;
                }
                let boost = 8.0 + 4.0 * rng.uniform() as f32;
                real[i] = T::from_f32(real[i].to_f32() + boost);
                masked[i] = T::from_f32(masked[i].to_f32() + boost * (0.5 + rng.uniform() as f32));
            }
            *target = if rng.uniform() < 0.8 { first } else { rng.below(vocab as u64) as usize } as i64;
        });
    (real, masked, targets)
}

/// A whole batch: logits, turns over the rows and trajectories in GRPO groups.
pub fn batch<T: LogitElement>(spec: SynthSpec) -> SynthBatch<T> {
    let mut rng = Rng::new(spec.seed);
    let (real, masked, targets) = logits_pair::<T>(&mut rng, spec.rows, spec.vocab);
    let n_traj = (spec.groups * spec.trajectories_per_group).max(1);
    let trajectory_group: Vec<u32> = (0..n_traj).map(|i| (i / spec.trajectories_per_group.max(1)) as u32).collect();
    // Binary task rewards with a group-dependent success rate (some groups all-equal: gate open).
    let trajectory_outcome: Vec<f64> = trajectory_group
        .iter()
        .map(|&g| {
            let rate = [0.5, 1.0, 0.25, 0.0][g as usize % 4];
            if rng.uniform() < rate {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    // 1..=4 scored turns per trajectory, rows spread over them (some turns empty).
    let mut turn_trajectory = Vec::new();
    for i in 0..n_traj {
        for _ in 0..1 + rng.below(4) {
            turn_trajectory.push(i as u32);
        }
    }
    let t = turn_trajectory.len();
    let mut cuts: Vec<u32> = (0..t.saturating_sub(1)).map(|_| rng.below(spec.rows as u64 + 1) as u32).collect();
    cuts.sort_unstable();
    let mut turn_offsets = Vec::with_capacity(t + 1);
    turn_offsets.push(0);
    turn_offsets.extend(cuts);
    turn_offsets.push(spec.rows as u32);
    let turn_credit_tokens: Vec<u32> = (0..t).map(|_| 16 + rng.below(200) as u32).collect();
    let mut trajectory_tokens = vec![0u32; n_traj];
    for (&i, &c) in turn_trajectory.iter().zip(&turn_credit_tokens) {
        trajectory_tokens[i as usize] += c;
    }
    for tokens in &mut trajectory_tokens {
        *tokens += 32 + rng.below(256) as u32;
    }
    SynthBatch {
        rows: spec.rows,
        vocab: spec.vocab,
        real,
        masked,
        targets,
        turn_offsets,
        turn_trajectory,
        turn_credit_tokens,
        trajectory_group,
        trajectory_outcome,
        trajectory_tokens,
    }
}

impl<T: LogitElement> SynthBatch<T> {
    /// Borrowed views for [`crate::Backend::compute`].
    pub fn as_batch(&self) -> crate::Batch<'_> {
        let real = crate::Logits::new(&self.real, self.rows, self.vocab).expect("synthetic shape");
        let masked = crate::Logits::new(&self.masked, self.rows, self.vocab).expect("synthetic shape");
        crate::Batch::rows(real, masked, &self.targets)
            .with_turns(crate::Turns {
                offsets: &self.turn_offsets,
                trajectory: &self.turn_trajectory,
                credit_tokens: &self.turn_credit_tokens,
            })
            .with_trajectories(crate::Trajectories {
                group: &self.trajectory_group,
                outcome: &self.trajectory_outcome,
                tokens: &self.trajectory_tokens,
            })
    }
}
