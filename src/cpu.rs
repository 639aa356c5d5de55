//! The float64 CPU reference: rows in parallel (rayon), each row in one pass of small chunks
//! whose exponentials are vectorised (a branch-free f64 `exp` the compiler turns into SIMD,
//! built for AVX2 when the CPU has it), accumulated in f64 and merged with [`RowState::merge`].

use crate::backend::Backend;
use crate::data::layout;
use crate::data::{Batch, HiddenBatch, HiddenTensors, Output, RowOutputs};
use crate::error::Result;
use crate::math::chunks;
use crate::math::epilogue::finish;
use crate::math::row::{estimator_values, score, to_outputs};
use crate::params::Params;

/// The CPU backend (float64 reference).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    fn name(&self) -> &'static str {
        "cpu"
    }

    /// The row values stay f64 until written out, and the epilogue reads them so.
    fn epilogue_reads_f64_rows(&self) -> bool {
        true
    }

    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        let bounds = layout::micro_batches(cuts, batch.real.rows())?;
        let mut values = Vec::with_capacity(batch.real.rows());
        for w in bounds.windows(2) {
            let (r0, n) = (w[0], w[1] - w[0]);
            let (real, masked) = (batch.real.slice_rows(r0, n)?, batch.masked.slice_rows(r0, n)?);
            values.extend(score(r0, real, masked, &batch.targets[r0..r0 + n], params)?);
        }
        finish(to_outputs(&values), layout, &estimator_values(&values, params.estimator), params)
    }

    /// Rows in f64 over vocabulary chunks ([`crate::math::chunks::score_hidden`]); the epilogue reads
    /// the f64 rows, as on logits.
    fn compute_hidden(&self, batch: &HiddenBatch<'_>, params: &Params, chunk: usize) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        let values = chunks::score_hidden_tensors(0, &batch.tensors, batch.targets, params, chunk)?;
        let estimator = estimator_values(&values, params.estimator);
        finish(to_outputs(&values), layout, &estimator, params)
    }

    fn score_hidden_rows(
        &self,
        first_row: usize,
        tensors: &HiddenTensors<'_>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        Ok(to_outputs(&chunks::score_hidden_tensors(first_row, tensors, targets, params, chunk)?))
    }
}
