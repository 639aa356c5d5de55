//! # infopo-kernels
//!
//! Fused one-pass kernels for the turn-level rewards of InfoPO (Information-Driven Policy
//! Optimization): from two [N, V] logit tensors (the policy run with the real user feedback and
//! with it masked) compute per row the two log-sum-exps, the log-ratio of the realised token,
//! the full-vocabulary KL and the entropy; per turn the mean information gain; per GRPO group the
//! outcome and intrinsic statistics, the variance gate and the fused advantages.
//!
//! The math is stated once, in `docs/contract.md` (included below). Backends:
//! - [`Cpu`]: the float64 reference, vectorised and parallel over rows;
//! - `emulated::Emulated` (feature `emulator`): the CUDA kernel source compiled as host C++;
//! - `cuda::CudaBackend` (feature `cuda`): the kernels on a GPU through cudarc.
//!
//! A trainer builds its layout with [`LayoutBuilder`] (trajectories with their turns), holds a
//! step's data in an [`OwnedBatch`] (or borrows its own buffers as a [`Batch`]) and calls
//! [`Backend::compute`]; for rows that arrive in micro-batches, [`Backend::score_rows`] per
//! micro-batch, [`TurnAccumulator`] and [`advantages`] (the README's
//! "Library" section shows the first, `docs/guide.md` the second).
//!
//! Without the logits: from the two hidden states and the lm_head weight, a [`HiddenBatch`] and
//! [`Backend::compute_hidden`] compute the same outputs over vocabulary chunks, never storing an
//! `[N, V]` tensor (the CLI reads such files too, see [`io`]).
//!
//! The module map (data types, the f64 math, backends, adapters, edges) is `docs/layout.md`;
//! the public API, item by item, is the table at the end of `docs/guide.md`.
//!
//! With feature `candle`, `candle::score_rows` and `candle::compute` take and return candle
//! tensors (CPU tensors on the CPU backend, CUDA tensors zero-copy on candle's stream).
//!
//! ```
//! use infopo_kernels::{Backend, Batch, Cpu, Logits, Params};
//! let (n, v) = (2, 4);
//! let real = vec![0.5f32, 1.0, -1.0, 2.0, 0.0, 0.1, 0.2, 0.3];
//! let masked = vec![0.4f32, 1.2, -1.0, 1.5, 0.0, 0.0, 0.0, 0.0];
//! let targets = [3i64, 1];
//! let batch = Batch::rows(Logits::new(&real, n, v)?, Logits::new(&masked, n, v)?, &targets);
//! let out = Cpu.compute(&batch, &Params::default())?;
//! assert!(out.rows.kl.iter().all(|&kl| kl >= 0.0));
//! # Ok::<(), infopo_kernels::Error>(())
//! ```
#![doc = include_str!("../docs/contract.md")]

mod backend;
mod conversation;
mod cpu;
mod data;
mod error;
pub mod io;
mod math;
mod open;
mod params;
pub mod synth;

#[cfg(any(feature = "emulator", feature = "cuda"))]
mod launch;

#[cfg(feature = "emulator")]
pub mod emulated;

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "candle")]
pub mod candle;

/// The float64 contract itself, for checking another implementation against it: the row values
/// of paired logits (`score`) or of hidden states over vocabulary chunks (`score_hidden`), the
/// online row state they fold and merge (`RowState`), and the parallel moments of the epilogue's
/// group statistics (`Moments`). [`Cpu`] is the backend built on them.
pub mod reference {
    pub use crate::math::chunks::score_hidden;
    pub use crate::math::epilogue::Moments;
    pub use crate::math::row::{score, to_outputs, RowState, RowValues};
}

/// Vocabulary-parallel scoring (`docs/guide.md`, "Vocabulary parallel"): each rank scores its
/// shard of the vocabulary into `[N, 8]` partial states (`score_range` on the CPU, the kernel's
/// partial-state mode on the others), and `merge` folds the gathered states in vocabulary order.
pub mod vocab {
    pub use crate::math::range::{
        chunk_ranges, merge, merge_outputs, score_range, shard_chunk_ranges, shard_ranges, RangeInput, RangeStates,
        VocabRange,
    };
}

/// The README's examples, compiled and run by `cargo test` so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// The library guide's examples (`docs/guide.md`), compiled and run by `cargo test` likewise.
#[cfg(doctest)]
#[doc = include_str!("../docs/guide.md")]
pub struct GuideDoctests;

/// The map from the official config to this crate (`docs/official-config.md`), its worked example
/// compiled and run by `cargo test` likewise.
#[cfg(doctest)]
#[doc = include_str!("../docs/official-config.md")]
pub struct OfficialConfigDoctests;

pub use backend::Backend;
pub use conversation::Conversation;
pub use cpu::Cpu;
pub use data::{
    Advantages, Batch, BatchLayout, Dtype, Elements, GroupLayout, HiddenBatch, HiddenInputs, HiddenTensors, Layout,
    LayoutBuilder, LogitBuf, LogitData, LogitElement, Logits, Output, OwnedBatch, OwnedHiddenBatch, Padding,
    RowOutputs, Trajectories, TrajectoryBuf, TurnBuf, Turns,
};
pub use error::{Error, Result, RowErrorKind};
/// The `f16`/`bf16` element types of [`LogitData`] and [`OwnedBatch`], re-exported so that a
/// trainer uses the same `half` version as this crate.
pub use half;
#[cfg(any(feature = "emulator", feature = "cuda"))]
pub use launch::KernelVariant;
pub use math::chunks::DEFAULT_CHUNK;
pub use math::epilogue::{advantages, TurnAccumulator};
pub use open::{open, BackendKind};
pub use params::{Estimator, GateSource, Params, TrajectoryScore};
