//! Options shared by the subcommands, and their mapping to the library's types.

use clap::{Args, ValueEnum};
use infopo_kernels::{BackendKind, Estimator, GateSource, Params};

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Backend to run.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Per-row value a turn's information gain averages.
    #[arg(long, value_enum, default_value_t = EstimatorArg::LogRatio)]
    pub estimator: EstimatorArg,
    /// τs: logits are divided by it (in [1e-3, 1e3]).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f64,
    /// β: weight of the intrinsic bonus.
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub beta: f64,
    /// τ of the variance gate sigmoid(−σ_g/τ) (> 0).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub gate_temperature: f64,
    /// ε added to standard deviations (> 0).
    #[arg(long, default_value_t = 1e-6, allow_negative_numbers = true)]
    pub eps: f64,
    /// Do not normalise intrinsic values within each group.
    #[arg(long)]
    pub no_normalize: bool,
    /// What the gate's σ_g is the std of: the group's outcomes, or its pool of per-token
    /// intrinsic values (σ_g = 0 below 2 tokens).
    #[arg(long, value_enum, default_value_t = GateSourceArg::Outcome)]
    pub gate_source: GateSourceArg,
    /// Centre only (the official norm_adv_by_std_in_grpo = False): advantages R − μ and
    /// normalised intrinsic values x − μ, not divided by σ + ε.
    #[arg(long)]
    pub centre_only: bool,
    /// Intrinsic only (the official use_intrinsic_only): bonus = magnitude_ratio · norm (no β,
    /// no gate) and token advantages without the outcome term.
    #[arg(long)]
    pub intrinsic_only: bool,
    /// A turn whose |intrinsic| is at most this counts as zero (out of its group's pool).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub pool_tolerance: f64,
    /// Token ids per vocabulary chunk of the fused-linear path (files of hidden states and an
    /// lm_head): each chunk's logits are computed, folded into the row states and dropped.
    /// Ignored for files of logits.
    #[arg(long, default_value_t = infopo_kernels::DEFAULT_CHUNK as u64,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub chunk: u64,
}

impl RunArgs {
    /// `--chunk` as a count of token ids (saturating on a 32-bit host: a chunk wider than the
    /// vocabulary is the whole vocabulary).
    pub fn chunk(&self) -> usize {
        usize::try_from(self.chunk).unwrap_or(usize::MAX)
    }

    pub fn params(&self) -> Params {
        Params {
            temperature: self.temperature,
            estimator: match self.estimator {
                EstimatorArg::LogRatio => Estimator::LogRatio,
                EstimatorArg::Kl => Estimator::Kl,
            },
            beta: self.beta,
            gate_temperature: self.gate_temperature,
            eps: self.eps,
            normalize: !self.no_normalize,
            gate_source: match self.gate_source {
                GateSourceArg::Outcome => GateSource::Outcome,
                GateSourceArg::Intrinsic => GateSource::Intrinsic,
            },
            centre_only: self.centre_only,
            intrinsic_only: self.intrinsic_only,
            pool_tolerance: self.pool_tolerance,
        }
    }
}

#[derive(Args, Debug)]
// `--chunk` needs a fused path to chunk: --fused-linear, or an --input file (of hidden states).
#[command(group(clap::ArgGroup::new("chunked").args(["fused_linear", "input"])))]
pub struct BenchArgs {
    /// Backend to time.
    #[arg(long, value_enum, default_value_t = BackendArg::Auto)]
    pub backend: BackendArg,
    /// Rows N of the synthetic batch.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub rows: u32,
    /// Vocabulary size V.
    #[arg(long, default_value_t = 151_936, value_parser = clap::value_parser!(u32).range(1..))]
    pub vocab: u32,
    /// Logit dtype.
    #[arg(long, value_enum, default_value_t = DtypeArg::Bf16)]
    pub dtype: DtypeArg,
    /// Timed iterations.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub iters: u32,
    /// Untimed iterations before timing.
    #[arg(long, default_value_t = 2)]
    pub warmup: u32,
    /// Time this input file instead of synthetic data (its shape and dtype win over
    /// --rows, --vocab and --dtype).
    #[arg(long, value_name = "IN.safetensors")]
    pub input: Option<std::path::PathBuf>,
    /// Time the per-row pass alone (no turns, no trajectories, no epilogue).
    #[arg(long)]
    pub rows_only: bool,
    /// Agent tokens M of the synthetic batch, spread evenly over its 32 trajectories: the
    /// length of the `token_advantage` output the epilogue writes (each turn's credited span
    /// laid after the previous one's). Default: the synthetic batch's own (~20k).
    #[arg(long, conflicts_with_all = ["input", "rows_only"], value_parser = clap::value_parser!(u64).range(2..=u32::MAX as u64))]
    pub agent_tokens: Option<u64>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Time the fused path instead: synthetic hidden states [N, D] (real and masked) and an
    /// lm_head [V, D], the logits computed chunk by chunk and never stored (rows only); also
    /// reports the peak memory beyond the inputs. With --backend cuda the inputs are uploaded
    /// once, each call is timed with CUDA events and the memory is the device's (the JSON keys
    /// are listed in compare/README.md).
    #[arg(long, conflicts_with_all = ["input", "rows_only"])]
    pub fused_linear: bool,
    /// Hidden width D of the fused path.
    #[arg(long, default_value_t = 1024, requires = "fused_linear", value_parser = clap::value_parser!(u32).range(1..))]
    pub hidden: u32,
    /// Token ids per vocabulary chunk of the fused path (--fused-linear, or an --input file of
    /// hidden states; an --input file of logits has no chunks: a usage error). Default 4096.
    #[arg(long, requires = "chunked", value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk: Option<u32>,
}

impl BenchArgs {
    /// `--chunk` as a count of token ids, [`infopo_kernels::DEFAULT_CHUNK`] when not given.
    pub fn chunk(&self) -> usize {
        self.chunk.map_or(infopo_kernels::DEFAULT_CHUNK, |c| c as usize)
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendArg {
    Auto,
    Cpu,
    Emulated,
    Cuda,
}

impl BackendArg {
    pub fn kind(self) -> BackendKind {
        match self {
            BackendArg::Auto => BackendKind::Auto,
            BackendArg::Cpu => BackendKind::Cpu,
            BackendArg::Emulated => BackendKind::Emulated,
            BackendArg::Cuda => BackendKind::Cuda,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EstimatorArg {
    LogRatio,
    Kl,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateSourceArg {
    Outcome,
    Intrinsic,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    Bf16,
    F16,
    F32,
}
