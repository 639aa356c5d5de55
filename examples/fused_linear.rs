//! InfoPO rewards from a model's last hidden states and its lm_head weight, the logits never
//! stored (`infopo_kernels::candle::score_hidden_rows` / `compute_hidden`), next to the
//! materialised path a trainer takes today (both `[N, V]` logit tensors, then
//! `candle::score_rows` / `compute`).
//!
//! The model is a tiny causal candle language model with seeded random weights (nothing is
//! downloaded): a token embedding, a running mean of the context through one `tanh` layer plus
//! the token's own embedding, RMS norms, an lm_head. It reads a prompt, the user's feedback and the agent's next turn
//! twice — with the feedback and with it replaced by a `MASK` token — and its hidden states over
//! the agent's tokens are the two `[N, D]` inputs; the agent's tokens are the targets.
//!
//! ```text
//! cargo run --release --features candle --example fused_linear -- [--rows 128] [--hidden 256] [--vocab 50257] [--chunk 4096] [--dtype bf16]
//! ```
//!
//! It prints both paths' KL and log-ratio for the first rows, the largest difference of each
//! output, the per-turn means of both, and the memory each path needs beyond the inputs,
//! computed from the shapes (not measured): the two `[N, V]` logit tensors against the fused
//! path's f64 working set (`reference::score_hidden`: 8·(2·N·D + chunk·D + 2·N·chunk) bytes).

use std::error::Error;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use infopo_kernels::candle::{self as ic, HiddenStates};
use infopo_kernels::RowOutputs;
use infopo_kernels::{Params, Turns};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type AnyResult<T> = std::result::Result<T, Box<dyn Error>>;

/// The token that replaces the user's feedback in the masked run.
const MASK: u32 = 0;
const PROMPT_TOKENS: usize = 16;
const FEEDBACK_TOKENS: usize = 8;
/// The agent's tokens are scored as this many turns of near-equal spans (fewer if N is smaller).
const TURNS: usize = 4;

#[derive(Parser, Debug, Clone)]
#[command(about = "InfoPO from hidden states and the lm_head weight vs materialised logits")]
struct Args {
    /// Agent tokens scored (rows N).
    #[arg(long, default_value_t = 128)]
    rows: usize,
    /// Hidden width D.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// Vocabulary size V (GPT-2's by default).
    #[arg(long, default_value_t = 50257)]
    vocab: usize,
    /// Token ids per vocabulary chunk of the fused path.
    #[arg(long, default_value_t = infopo_kernels::DEFAULT_CHUNK)]
    chunk: usize,
    /// Dtype of the hidden states and the lm_head: f32, f16 or bf16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// A tiny causal language model: h_t = rms(tanh(rms(mean(e_0..e_t)) · W) + rms(e_t)), logits = h · lm_headᵀ.
struct TinyLm {
    /// `[V, D]`.
    embedding: Tensor,
    /// `[V, D]`, as candle's `Linear` stores an output projection. Not tied to the embedding:
    /// a tied head with the token's own embedding in h_t would mostly predict the token itself.
    lm_head: Tensor,
    /// `[D, D]`.
    mix: Tensor,
}

impl TinyLm {
    fn new(rng: &mut StdRng, vocab: usize, hidden: usize) -> candle_core::Result<Self> {
        // Head rows of ±3/√D against an RMS-normed hidden state: logits of a few units.
        let head_scale = 3.0 / (hidden as f32).sqrt();
        let mix_scale = 1.0 / (hidden as f32).sqrt();
        let uniform =
            |rng: &mut StdRng, n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-s..s)).collect() };
        Ok(TinyLm {
            embedding: Tensor::from_vec(uniform(rng, vocab * hidden, 1.0), (vocab, hidden), &Device::Cpu)?,
            lm_head: Tensor::from_vec(uniform(rng, vocab * hidden, head_scale), (vocab, hidden), &Device::Cpu)?,
            mix: Tensor::from_vec(uniform(rng, hidden * hidden, 2.0 * mix_scale), (hidden, hidden), &Device::Cpu)?,
        })
    }

    /// `[len, D]` last hidden states of `tokens` (row t predicts token t + 1).
    fn hidden_states(&self, tokens: &[u32]) -> candle_core::Result<Tensor> {
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let e = self.embedding.index_select(&ids, 0)?;
        let positions: Vec<f32> = (1..=tokens.len()).map(|p| p as f32).collect();
        let positions = Tensor::from_vec(positions, (tokens.len(), 1), &Device::Cpu)?;
        let context = rms_norm(&e.cumsum(0)?.broadcast_div(&positions)?)?;
        rms_norm(&(context.matmul(&self.mix)?.tanh()? + rms_norm(&e)?)?)
    }
}

/// Each row scaled to a root mean square of 1.
fn rms_norm(x: &Tensor) -> candle_core::Result<Tensor> {
    x.broadcast_div(&(x.sqr()?.mean_keepdim(1)? + 1e-6)?.sqrt()?)
}

/// The agent turn's hidden states with the feedback and with it masked, its tokens (the
/// targets), and the lm_head, in `dtype`.
struct Scored {
    real_hidden: Tensor,
    masked_hidden: Tensor,
    lm_head: Tensor,
    targets: Tensor,
}

fn run_model(args: &Args, dtype: DType) -> AnyResult<Scored> {
    let mut rng = StdRng::seed_from_u64(args.seed);
    let model = TinyLm::new(&mut rng, args.vocab, args.hidden)?;
    let token = |rng: &mut StdRng| rng.gen_range(1..args.vocab as u32);
    let prompt: Vec<u32> = (0..PROMPT_TOKENS).map(|_| token(&mut rng)).collect();
    let feedback: Vec<u32> = (0..FEEDBACK_TOKENS).map(|_| token(&mut rng)).collect();
    let agent: Vec<u32> = (0..args.rows).map(|_| token(&mut rng)).collect();
    let context = |feedback: &[u32]| [&prompt[..], feedback, &agent[..]].concat();
    // Rows predicting the agent's tokens: positions first - 1 .. end - 1 of the context.
    let first = PROMPT_TOKENS + FEEDBACK_TOKENS;
    let agent_rows = |h: Tensor| h.narrow(0, first - 1, args.rows);
    let real = agent_rows(model.hidden_states(&context(&feedback))?)?;
    let masked = agent_rows(model.hidden_states(&context(&[MASK; FEEDBACK_TOKENS]))?)?;
    Ok(Scored {
        real_hidden: real.to_dtype(dtype)?,
        masked_hidden: masked.to_dtype(dtype)?,
        lm_head: model.lm_head.to_dtype(dtype)?,
        targets: Tensor::new(agent, &Device::Cpu)?,
    })
}

/// Both paths' outputs, and the memory each needs beyond the inputs (bytes, from the shapes).
struct Comparison {
    fused_rows: Vec<Vec<f32>>,
    materialised_rows: Vec<Vec<f32>>,
    fused_turn_info: Vec<f64>,
    materialised_turn_info: Vec<f64>,
    materialised_bytes: usize,
    fused_bytes: usize,
}

impl Comparison {
    /// The largest |fused − materialised| of each of the five row outputs.
    fn max_row_differences(&self) -> [f32; 5] {
        let mut out = [0f32; 5];
        for (k, (f, m)) in self.fused_rows.iter().zip(&self.materialised_rows).enumerate() {
            out[k] = f.iter().zip(m).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        }
        out
    }
}

fn compare(args: &Args) -> AnyResult<Comparison> {
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => return Err(format!("--dtype {other}: expected f32, f16 or bf16").into()),
    };
    if args.rows == 0 || args.hidden == 0 || args.vocab < 2 {
        return Err("--rows and --hidden must be at least 1, --vocab at least 2 (token 0 is MASK)".into());
    }
    let s = run_model(args, dtype)?;
    let params = Params::default();
    // Up to TURNS turns of near-equal row spans, each crediting its own tokens.
    let turn_count = TURNS.min(args.rows);
    let offsets: Vec<u32> = (0..=turn_count).map(|t| (t * args.rows / turn_count) as u32).collect();
    let credit: Vec<u32> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let turns = Turns { offsets: &offsets, trajectory: &vec![0; turn_count], credit_tokens: &credit };

    // Fused: the hidden states and the lm_head, chunk by chunk; no [N, V] tensor exists.
    let hidden = HiddenStates { real_hidden: &s.real_hidden, masked_hidden: &s.masked_hidden, lm_head: &s.lm_head };
    let fused = ic::compute_hidden(&hidden, &s.targets, turns, None, None, &params, args.chunk)?;

    // Materialised: both [N, V] logit tensors, as an fp32-accumulated GEMM gives them (f32).
    let head_t = s.lm_head.to_dtype(DType::F32)?.t()?;
    let real_logits = s.real_hidden.to_dtype(DType::F32)?.matmul(&head_t)?;
    let masked_logits = s.masked_hidden.to_dtype(DType::F32)?.matmul(&head_t)?;
    let materialised = ic::compute(&real_logits, &masked_logits, &s.targets, turns, None, None, &params)?;

    let (n, d, v, c) = (args.rows, args.hidden, args.vocab, args.chunk.min(args.vocab));
    Ok(Comparison {
        fused_rows: fused.rows.to_vec2()?,
        materialised_rows: materialised.rows.to_vec2()?,
        fused_turn_info: fused.turn_info.to_vec1()?,
        materialised_turn_info: materialised.turn_info.to_vec1()?,
        materialised_bytes: 2 * n * v * DType::F32.size_in_bytes(),
        fused_bytes: 8 * (2 * n * d + c * d + 2 * n * c),
    })
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match compare(&args).and_then(|c| report(&args, &c)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn report(args: &Args, c: &Comparison) -> AnyResult<()> {
    let (kl, log_ratio) = (ic::KL, ic::LOG_RATIO);
    println!(
        "N={} D={} V={} chunk={} {}: hidden states and lm_head vs materialised f32 logits",
        args.rows, args.hidden, args.vocab, args.chunk, args.dtype
    );
    println!("row        kl fused   kl materialised   log_ratio fused   log_ratio materialised");
    for r in 0..args.rows.min(5) {
        println!(
            "{r:>3} {:>15.6} {:>17.6} {:>17.6} {:>24.6}",
            c.fused_rows[kl][r],
            c.materialised_rows[kl][r],
            c.fused_rows[log_ratio][r],
            c.materialised_rows[log_ratio][r]
        );
    }
    for (name, diff) in RowOutputs::NAMES.iter().zip(c.max_row_differences()) {
        println!("max |fused - materialised| {name:<13} {diff:.2e}");
    }
    println!("turn info fused        {:?}", c.fused_turn_info);
    println!("turn info materialised {:?}", c.materialised_turn_info);
    let (m, f) = (c.materialised_bytes, c.fused_bytes);
    println!("memory beyond the inputs (from the shapes, not measured):");
    println!("  materialised: two [N, V] f32 logit tensors        {:>9.1} MiB ({:.1} MiB in bf16)", mib(m), mib(m / 2));
    println!(
        "  fused:        8*(2*N*D + chunk*D + 2*N*chunk) bytes {:>9.1} MiB ({:.1}x less)",
        mib(f),
        m as f64 / f as f64
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(dtype: &str, chunk: usize) -> Args {
        Args { rows: 24, hidden: 32, vocab: 5003, chunk, dtype: dtype.into(), seed: 7 }
    }

    #[test]
    fn fused_matches_the_materialised_logits() -> AnyResult<()> {
        for (dtype, chunk) in [("bf16", 1000), ("f32", 4096), ("f16", 5003)] {
            let c = compare(&small(dtype, chunk))?;
            // The two differ by the f32 rounding of the materialised logits (the fused path's
            // are f64): about 1e-7 relative to logits of a few units, 1e-6 on the outputs.
            for (name, diff) in RowOutputs::NAMES.iter().zip(c.max_row_differences()) {
                assert!(diff < 2e-5, "{dtype} chunk {chunk}: {name} differs by {diff}");
            }
            for (f, m) in c.fused_turn_info.iter().zip(&c.materialised_turn_info) {
                assert!((f - m).abs() < 2e-5, "{dtype}: turn info {f} vs {m}");
            }
            // The feedback matters: the masked run is a different distribution.
            assert!(c.fused_rows[ic::KL].iter().all(|&kl| kl > 0.0), "{dtype}: {:?}", c.fused_rows[ic::KL]);
        }
        Ok(())
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(compare(&small("f64", 100)).is_err());
        assert!(compare(&Args { vocab: 1, ..small("f32", 100) }).is_err());
        assert!(compare(&Args { rows: 0, ..small("f32", 100) }).is_err());
        // A chunk of 0 is the library's typed error, passed through.
        let e = compare(&small("f32", 0)).err().expect("chunk 0 is an error");
        assert!(e.to_string().contains("chunk"), "{e}");
    }
}
