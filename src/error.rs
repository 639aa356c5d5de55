//! The crate's one error type. Every bad input is one of these, never a panic.

use std::path::PathBuf;

/// A per-row data error, in the priority order of `docs/contract.md` §2 ("Row errors").
/// The numeric codes are shared with the kernels (`kernels/state.cuh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum RowErrorKind {
    /// The target id is negative or ≥ V.
    TargetOutOfRange = 1,
    /// A real logit is NaN or +∞.
    RealNotFinite = 2,
    /// A masked logit is NaN or +∞.
    MaskedNotFinite = 3,
    /// Every real logit is −∞.
    RealAllNegInf = 4,
    /// Every masked logit is −∞.
    MaskedAllNegInf = 5,
    /// The real logit of the target is −∞ (log-probability −∞).
    RealTargetNegInf = 6,
    /// The masked logit of the target is −∞.
    MaskedTargetNegInf = 7,
}

impl RowErrorKind {
    /// Decodes a kernel error code.
    pub fn from_code(code: u8) -> Option<Self> {
        use RowErrorKind::*;
        Some(match code {
            1 => TargetOutOfRange,
            2 => RealNotFinite,
            3 => MaskedNotFinite,
            4 => RealAllNegInf,
            5 => MaskedAllNegInf,
            6 => RealTargetNegInf,
            7 => MaskedTargetNegInf,
            _ => return None,
        })
    }

    pub fn code(self) -> u8 {
        self as u8
    }
}

impl std::fmt::Display for RowErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use RowErrorKind::*;
        f.write_str(match self {
            TargetOutOfRange => "target token id is outside 0..vocab",
            RealNotFinite => "a real logit is NaN or +inf",
            MaskedNotFinite => "a masked logit is NaN or +inf",
            RealAllNegInf => "every real logit is -inf",
            MaskedAllNegInf => "every masked logit is -inf",
            RealTargetNegInf => "the real logit of the target token is -inf",
            MaskedTargetNegInf => "the masked logit of the target token is -inf",
        })
    }
}

/// Everything that can go wrong, each variant naming what and where. Messages name a layout
/// field both as the Rust field and as the input file's tensor (`Turns::credit_tokens /
/// turn_credit_tokens`), so they read right from the library and from the CLI.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Tensor shapes or lengths that do not fit together (logits vs targets, micro-batch cuts,
    /// more than 2^32 − 1 rows, a slice outside its tensor).
    #[error("shape mismatch: {what}")]
    Shape { what: String },

    /// The real and masked logits have different element types.
    #[error("dtype mismatch: real logits are {real}, masked logits are {masked}")]
    DtypeMismatch { real: &'static str, masked: &'static str },

    /// Logits with a vocabulary of 0 entries.
    #[error("vocabulary size is 0: a logit row needs at least one entry")]
    EmptyVocab,

    /// A row whose logits or target break contract §2 ("Row errors"): the lowest failing row,
    /// its index global in the batch (also from the two-stage [`crate::Backend::score_rows`]
    /// and [`crate::reference::score`], given the micro-batch's first row).
    /// `target` is the row's target id when the backend knows it (host data); the device API
    /// reports the row only, its targets being on the GPU.
    #[error("row {row}: {kind}{}", target.map(|t| format!(" (target {t})")).unwrap_or_default())]
    Row { row: usize, kind: RowErrorKind, target: Option<i64> },

    /// With trajectories, a turn whose information gain is not finite (a row's `kl` is +∞: a
    /// masked −∞ where the real policy has mass, e.g. a padded-vocabulary mismatch) would make
    /// every `turn_bonus` of the batch NaN. `row` is the first row of the turn whose estimator is
    /// not finite; `None` from the two-stage API ([`crate::math::epilogue::advantages`]), which sees
    /// only per-turn values.
    #[error(
        "turn {turn}: its information gain is not finite{}, which would make every turn_bonus NaN \
         (a masked -inf logit where the real policy has mass gives kl = +inf: check that both \
         vocabularies match, or use the log-ratio estimator)",
        row.map(|r| format!(" (row {r}'s estimator is not finite)")).unwrap_or_default()
    )]
    NonFiniteTurn { turn: usize, row: Option<usize> },

    /// A turn layout ([`crate::Turns`]) that is not a valid CSR over the rows, or that does not
    /// match the [`crate::math::epilogue::TurnAccumulator`] or info values given with it.
    #[error("invalid turn layout: {what}")]
    Turns { what: String },

    /// Trajectories ([`crate::Trajectories`]) of mismatched lengths, non-finite outcomes,
    /// turns crediting more tokens than their trajectory has, or fewer than 2 tokens in all.
    #[error("invalid trajectories: {what}")]
    Trajectories { what: String },

    /// A turn's credited token span (`Batch::credit_start` / file tensor `turn_credit_start`)
    /// does not fit its trajectory's agent tokens or overlaps another turn's span.
    #[error("turn {turn}: credited token span {what}")]
    CreditSpan { turn: usize, what: String },

    /// A [`crate::Params`] value outside its range ([`crate::Params::validate`]).
    #[error("invalid parameter {name} = {value}: {why}")]
    Param { name: &'static str, value: f64, why: &'static str },

    /// An input file lacks a required tensor (or one of a set that must come together).
    #[error("missing tensor `{name}` in {path}")]
    MissingTensor { name: String, path: PathBuf },

    /// An input file's tensor has the wrong dtype or shape, or a value its type cannot hold.
    #[error("tensor `{name}`: {what}")]
    TensorFormat { name: String, what: String },

    /// An input file cannot be opened, mapped or parsed as safetensors.
    #[error("cannot read {path}: {what}")]
    File { path: PathBuf, what: String },

    /// An output file cannot be written (nothing is left behind).
    #[error("cannot write {path}: {what}")]
    Write { path: PathBuf, what: String },

    /// The backend asked for is not compiled in or cannot run here (no GPU, no driver).
    #[error("backend `{backend}` is not available: {why}")]
    BackendUnavailable { backend: &'static str, why: String },

    /// A CUDA driver or launch error from the CUDA backend (also a stream mismatch or
    /// scratch tickets left drawn by an aborted launch).
    #[error("CUDA error: {0}")]
    Cuda(String),

    // Tensor interop (feature `candle`): the variants are always present so a match on
    // `Error` does not depend on the features.
    /// Two input tensors live on different devices.
    #[error("device mismatch: `{first}` is on {first_device}, `{second}` is on {second_device}")]
    DeviceMismatch { first: &'static str, first_device: String, second: &'static str, second_device: String },

    /// An input tensor has a dtype this entry point does not take.
    #[error("tensor `{tensor}` has dtype {dtype}, expected {expected}")]
    UnsupportedDtype { tensor: &'static str, dtype: String, expected: &'static str },

    /// An input tensor's rows are not contiguous in memory (strided or transposed): call
    /// `.contiguous()` on it first (which copies).
    #[error(
        "tensor `{tensor}` is not row-contiguous (shape {shape}, stride {stride}): call .contiguous() on it first"
    )]
    NotContiguous { tensor: &'static str, shape: String, stride: String },

    /// An error reported by candle itself (e.g. while reading a tensor's storage).
    #[error("candle: {0}")]
    Candle(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn shape(what: impl Into<String>) -> Self {
        Error::Shape { what: what.into() }
    }
    pub(crate) fn turns(what: impl Into<String>) -> Self {
        Error::Turns { what: what.into() }
    }
    pub(crate) fn trajectories(what: impl Into<String>) -> Self {
        Error::Trajectories { what: what.into() }
    }
}
