//! The crate's one error type. Every bad input is one of these, never a panic.

use std::path::PathBuf;

/// A per-row data error, in the priority order of `docs/contract.md` §2 ("Row errors").
/// The numeric codes are shared with the kernels (`kernels/state.cuh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum RowErrorKind {
    TargetOutOfRange = 1,
    RealNotFinite = 2,
    MaskedNotFinite = 3,
    RealAllNegInf = 4,
    MaskedAllNegInf = 5,
    RealTargetNegInf = 6,
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

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("shape mismatch: {what}")]
    Shape { what: String },

    #[error("dtype mismatch: real logits are {real}, masked logits are {masked}")]
    DtypeMismatch { real: &'static str, masked: &'static str },

    #[error("vocabulary size is 0: a logit row needs at least one entry")]
    EmptyVocab,

    /// `target` is the row's target id when the backend knows it (host data); the device API
    /// reports the row only, its targets being on the GPU.
    #[error("row {row}: {kind}{}", target.map(|t| format!(" (target {t})")).unwrap_or_default())]
    Row { row: usize, kind: RowErrorKind, target: Option<i64> },

    /// With trajectories, a turn whose information gain is not finite (a row's `kl` is +∞: a
    /// masked −∞ where the real policy has mass, e.g. a padded-vocabulary mismatch) would make
    /// every `turn_bonus` of the batch NaN. `row` is the first row of the turn whose estimator is
    /// not finite; `None` from the two-stage API ([`crate::epilogue::advantages`]), which sees
    /// only per-turn values.
    #[error(
        "turn {turn}: its information gain is not finite{}, which would make every turn_bonus NaN \
         (a masked -inf logit where the real policy has mass gives kl = +inf: check that both \
         vocabularies match, or use the log-ratio estimator)",
        row.map(|r| format!(" (row {r}'s estimator is not finite)")).unwrap_or_default()
    )]
    NonFiniteTurn { turn: usize, row: Option<usize> },

    #[error("invalid turn layout: {what}")]
    Turns { what: String },

    #[error("invalid trajectories: {what}")]
    Trajectories { what: String },

    /// A turn's credited token span (`Batch::credit_start` / file tensor `turn_credit_start`)
    /// does not fit its trajectory's response tokens or overlaps another turn's span.
    #[error("turn {turn}: credited token span {what}")]
    CreditSpan { turn: usize, what: String },

    #[error("invalid parameter {name} = {value}: {why}")]
    Param { name: &'static str, value: f64, why: &'static str },

    #[error("missing tensor `{name}` in {path}")]
    MissingTensor { name: String, path: PathBuf },

    #[error("tensor `{name}`: {what}")]
    TensorFormat { name: String, what: String },

    #[error("cannot read {path}: {what}")]
    File { path: PathBuf, what: String },

    #[error("cannot write {path}: {what}")]
    Write { path: PathBuf, what: String },

    #[error("backend `{backend}` is not available: {why}")]
    BackendUnavailable { backend: &'static str, why: String },

    #[error("CUDA error: {0}")]
    Cuda(String),
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
