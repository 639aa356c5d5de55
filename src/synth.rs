//! Synthetic InfoPO batches with realistic logits, for the CLI's main job, benches and tests.
//! Deterministic for a seed; no external randomness.

use crate::data::LogitElement;

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
    ///
    /// # Panics
    /// When the batch was generated with `vocab == 0` (no logit view has an empty vocabulary):
    /// synthetic data is for tests and benches, whose shapes are the caller's constants.
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

/// Credit starts that place each turn's credited span right after the previous turn's of the
/// same trajectory, the first at `first`, in turn order: the spans of a synthetic or random
/// layout, whose trajectories have room for `first` plus their credits.
pub fn consecutive_credit_starts(turn_trajectory: &[u32], credit_tokens: &[u32], first: u32) -> Vec<u32> {
    let mut next = std::collections::HashMap::new();
    turn_trajectory
        .iter()
        .zip(credit_tokens)
        .map(|(&i, &c)| {
            let at = next.entry(i).or_insert(first);
            let start = *at;
            *at += c;
            start
        })
        .collect()
}

/// The `index`-th draw (from 0) of the SplitMix64 stream seeded with `key`: SplitMix64 is
/// counter-based (its state after `i` steps is `key + i·γ`), so any element of a stream can be
/// drawn directly, in parallel and in any language with wrapping 64-bit arithmetic — which is
/// how `compare/compare_fused.py` rebuilds [`hidden_inputs`] bit for bit in NumPy.
pub fn counter_u64(key: u64, index: u64) -> u64 {
    Rng::new(key.wrapping_add(index.wrapping_mul(0x9E37_79B9_7F4A_7C15))).next_u64()
}

/// Uniform in [0, 1) from 64 random bits (the top 53), as [`Rng::uniform`].
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The `index`-th standard normal of stream `key`: Box–Muller on draws 2·index and 2·index + 1.
pub fn counter_normal(key: u64, index: u64) -> f64 {
    let u = 1.0 - unit(counter_u64(key, 2 * index));
    let v = unit(counter_u64(key, 2 * index + 1));
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

/// Shape and seed of synthetic fused-path inputs ([`hidden_inputs`]).
#[derive(Debug, Clone, Copy)]
pub struct HiddenSpec {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub seed: u64,
}

/// Synthetic inputs of the fused path (hidden states and the lm_head weight) in owned buffers.
#[derive(Debug, Clone)]
pub struct SynthHidden<T> {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// [rows, hidden]
    pub real_hidden: Vec<T>,
    /// [rows, hidden]
    pub masked_hidden: Vec<T>,
    /// [vocab, hidden]
    pub lm_head: Vec<T>,
    pub targets: Vec<i64>,
}

/// Standard deviation of the noise that turns the real hidden states into the masked ones.
pub const MASKED_HIDDEN_NOISE: f64 = 0.3;
/// lm_head entries are N(0, (LM_HEAD_SCALE / √D)²), so logits have std ≈ LM_HEAD_SCALE, the
/// std of the background of [`logits_pair`].
pub const LM_HEAD_SCALE: f64 = 2.0;

/// Inputs at a language model's scale, element `i` of each tensor drawn from its own
/// counter-based stream ([`counter_normal`]; stream keys `counter_u64(seed, s)`, s = 0..4):
/// `real_hidden` ~ N(0, 1); `masked_hidden` = `real_hidden` + N(0, 0.3²) (the masked run's
/// hidden states, near the real ones); `lm_head` ~ N(0, 4/D), so logits = hidden · lm_headᵀ have
/// std ≈ 2; targets uniform in [0, vocab). Each value is computed in f64, rounded to f32, then to
/// `T`. Deterministic for a seed and independent of the thread count.
pub fn hidden_inputs<T: LogitElement>(spec: HiddenSpec) -> SynthHidden<T> {
    use rayon::prelude::*;
    let key = |stream: u64| counter_u64(spec.seed, stream);
    let (real_key, noise_key, head_key, target_key) = (key(0), key(1), key(2), key(3));
    let fill = |len: usize, value: &(dyn Fn(u64) -> f64 + Sync)| -> Vec<T> {
        (0..len).into_par_iter().with_min_len(4096).map(|i| T::from_f32(value(i as u64) as f32)).collect()
    };
    let n = spec.rows * spec.hidden;
    let real_hidden = fill(n, &|i| counter_normal(real_key, i));
    let masked_hidden = fill(n, &|i| counter_normal(real_key, i) + MASKED_HIDDEN_NOISE * counter_normal(noise_key, i));
    let head_std = LM_HEAD_SCALE / (spec.hidden.max(1) as f64).sqrt();
    let lm_head = fill(spec.vocab * spec.hidden, &|i| head_std * counter_normal(head_key, i));
    let targets =
        (0..spec.rows as u64).map(|r| (unit(counter_u64(target_key, r)) * spec.vocab as f64) as i64).collect();
    SynthHidden {
        rows: spec.rows,
        hidden: spec.hidden,
        vocab: spec.vocab,
        real_hidden,
        masked_hidden,
        lm_head,
        targets,
    }
}

impl<T: LogitElement> SynthHidden<T> {
    /// Borrowed views for the fused path ([`crate::math::chunks::score_hidden`]).
    pub fn inputs(&self) -> crate::data::HiddenInputs<'_, T> {
        crate::data::HiddenInputs {
            real_hidden: &self.real_hidden,
            masked_hidden: &self.masked_hidden,
            lm_head: &self.lm_head,
            rows: self.rows,
            hidden: self.hidden,
            vocab: self.vocab,
        }
    }

    /// Bytes of the three tensors and the targets.
    pub fn bytes(&self) -> usize {
        (self.real_hidden.len() + self.masked_hidden.len() + self.lm_head.len()) * std::mem::size_of::<T>()
            + self.targets.len() * std::mem::size_of::<i64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_draws_are_the_stream_of_rng() {
        for key in [0u64, 2026, u64::MAX - 3] {
            let mut rng = Rng::new(key);
            for i in 0..100 {
                assert_eq!(counter_u64(key, i), rng.next_u64(), "key {key}, draw {i}");
            }
        }
    }

    #[test]
    fn hidden_inputs_have_the_documented_scale() {
        let spec = HiddenSpec { rows: 64, hidden: 256, vocab: 3001, seed: 7 };
        let data = hidden_inputs::<f32>(spec);
        let again = hidden_inputs::<f32>(spec);
        assert_eq!(data.lm_head, again.lm_head, "deterministic for a seed");
        let moments = |x: &[f32]| {
            let n = x.len() as f64;
            let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        let (mean, std) = moments(&data.real_hidden);
        assert!(mean.abs() < 0.02 && (std - 1.0).abs() < 0.02, "real_hidden mean {mean} std {std}");
        let diff: Vec<f32> = data.masked_hidden.iter().zip(&data.real_hidden).map(|(m, r)| m - r).collect();
        let (mean, std) = moments(&diff);
        assert!(mean.abs() < 0.01 && (std - MASKED_HIDDEN_NOISE).abs() < 0.01, "noise mean {mean} std {std}");
        let (mean, std) = moments(&data.lm_head);
        let want = LM_HEAD_SCALE / 16.0;
        assert!(mean.abs() < 0.002 && (std / want - 1.0).abs() < 0.01, "lm_head mean {mean} std {std}");
        // Logits of a few rows: std ≈ LM_HEAD_SCALE.
        let logits: Vec<f32> = (0..8)
            .flat_map(|r| {
                let h = &data.real_hidden[r * 256..(r + 1) * 256];
                data.lm_head.chunks(256).map(move |w| h.iter().zip(w).map(|(a, b)| a * b).sum::<f32>())
            })
            .collect();
        let (_, std) = moments(&logits);
        assert!((std / LM_HEAD_SCALE - 1.0).abs() < 0.1, "logit std {std}");
        assert!(data.targets.iter().all(|&t| (0..3001).contains(&t)));
        let distinct: std::collections::HashSet<_> = data.targets.iter().collect();
        assert!(distinct.len() > 50, "targets spread over the vocabulary");
    }
}
