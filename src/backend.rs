//! The backend abstraction: every backend takes the same inputs and returns the same outputs.
//!
//! The backends implement [`Backend`] and depend on this module; choosing one by name is
//! [`crate::open()`]'s job (`src/open.rs`), so no arrow runs back from here to the backends.

use crate::data::Logits;
use crate::data::{Batch, Output, RowOutputs};
use crate::data::{HiddenBatch, HiddenTensors};
use crate::error::{Error, Result};
use crate::params::Params;

/// A way to compute the InfoPO contract (`docs/contract.md`).
pub trait Backend: Send + Sync {
    /// Short name used by the CLI (`cpu`, `emulated`, `cuda`).
    fn name(&self) -> &'static str;

    /// The one-call form: rows, turns and advantages of a whole batch.
    fn compute(&self, batch: &Batch<'_>, params: &Params) -> Result<Output> {
        self.compute_micro_batched(batch, params, &[])
    }

    /// Like [`Backend::compute`], but the rows go through in micro-batches (one kernel launch
    /// each on the kernel backends): `cuts` are the increasing row indices where a new
    /// micro-batch starts. Per-turn sums are carried across micro-batches (a turn may span a
    /// cut) and the last one computes the advantages, so the result equals one batch up to the
    /// rounding of the f64 per-turn sums.
    ///
    /// The cuts bound what one launch (and its temporaries) covers, not the memory: the whole
    /// batch is in host memory (and, on the CUDA backend, uploaded to the device whole) for the
    /// call. When the logits of a batch do not fit at once, score the micro-batches as they are
    /// produced with [`Backend::score_rows`] (or the device API) and a
    /// [`crate::math::epilogue::TurnAccumulator`], then run [`crate::math::epilogue::advantages`] once.
    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output>;

    /// Whether the per-turn means and advantages are computed from the rows' float64 values
    /// (the CPU reference: rows are rounded to f32 only on output) rather than from the f32 row
    /// outputs in [`Output::rows`] (the kernels, which keep rows in f32). The two differ by the
    /// f32 rounding of each row value; tests feed their float64 oracle the same values as the
    /// backend's epilogue.
    fn epilogue_reads_f64_rows(&self) -> bool {
        false
    }

    /// Per-row outputs only (stage one of the two-stage form) of one micro-batch whose row 0 is
    /// row `first_row` of the whole batch: row errors name global rows (`first_row + i`), as
    /// [`Backend::compute_micro_batched`] does. Feed [`RowOutputs::estimator`] to
    /// [`crate::math::epilogue::TurnAccumulator::add_rows`] with the same `first_row`.
    fn score_rows(
        &self,
        first_row: usize,
        real: Logits<'_>,
        masked: Logits<'_>,
        targets: &[i64],
        params: &Params,
    ) -> Result<RowOutputs> {
        crate::data::layout::global_rows(first_row, real.rows())?;
        let out = self.compute(&Batch::rows(real, masked, targets), params).map_err(|e| match e {
            Error::Row { row, kind, target } => Error::Row { row: first_row + row, kind, target },
            other => other,
        })?;
        Ok(out.rows)
    }

    /// The fused-linear path's one-call form: [`Backend::compute`] of a batch given as
    /// hidden states and the lm_head weight instead of logits (logits = hidden · lm_headᵀ,
    /// then ÷ τs), computed over vocabulary chunks of `chunk` token ids (≥ 1;
    /// [`crate::math::chunks::DEFAULT_CHUNK`] when the caller has no preference) so that no `[N, V]`
    /// tensor is ever stored. The same outputs, to the backend's accuracy, as
    /// [`Backend::compute`] on the materialised logits, and the same errors.
    ///
    /// The default runs [`Backend::score_hidden_rows`], then the turn means and advantages on
    /// the host from the f32 row outputs (what the kernel backends' epilogues read); the CPU
    /// reference reads its f64 rows instead ([`Backend::epilogue_reads_f64_rows`]).
    fn compute_hidden(&self, batch: &HiddenBatch<'_>, params: &Params, chunk: usize) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        let rows = self.score_hidden_rows(0, &batch.tensors, batch.targets, params, chunk)?;
        let estimator: Vec<f64> = rows.estimator(params.estimator).iter().map(|&v| v as f64).collect();
        crate::math::epilogue::finish(rows, layout, &estimator, params)
    }

    /// Stage one of the fused path: the per-row outputs of one micro-batch of hidden states
    /// (row 0 is row `first_row` of the whole batch, which row errors name), over vocabulary
    /// chunks of `chunk` token ids. Feed [`RowOutputs::estimator`] to
    /// [`crate::math::epilogue::TurnAccumulator::add_rows`] as with [`Backend::score_rows`].
    ///
    /// The default is [`Error::BackendUnavailable`]: a backend without a fused path says so
    /// (the CPU reference and the emulated kernel have one).
    fn score_hidden_rows(
        &self,
        first_row: usize,
        tensors: &HiddenTensors<'_>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        let _ = (first_row, tensors, targets, params, chunk);
        Err(Error::BackendUnavailable {
            backend: self.name(),
            why: "this backend has no fused-linear (hidden-state) path yet".into(),
        })
    }
}
