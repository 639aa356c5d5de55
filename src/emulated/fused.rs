//! The fused (hidden states × lm_head) path as the GPU computes it, on the emulator: per
//! vocabulary chunk an f32 GEMM (the `gemm` crate, as cuBLAS with fp32 accumulate) and the
//! kernel source in partial-state mode (the CUDA counterpart is `cuda/fused.rs`).

use super::Emulated;
use crate::data::layout::{self, Layout};
use crate::data::{HiddenInputs, HiddenTensors, LogitElement, Logits, Output};
use crate::error::{Error, Result};
use crate::math::chunks::{fold_chunks, for_each_chunk, with_inputs};
use crate::math::range::{RangeInput, RangeStates};
use crate::math::row::RowValues;
use crate::params::Params;
use half::{bf16, f16};

impl Emulated {
    /// [`Emulated::compute_hidden_typed`] on dtype-erased tensors (feature `emulator`).
    pub(crate) fn compute_hidden_tensors(
        &self,
        first_row: usize,
        tensors: &HiddenTensors<'_>,
        targets: &[i64],
        layout: Option<&Layout>,
        params: &Params,
        chunk: usize,
    ) -> Result<Output> {
        with_inputs!(tensors, |inputs| self.compute_hidden_typed(first_row, &inputs, targets, layout, params, chunk))
    }

    /// [`crate::reference::score_hidden`] as the GPU path computes it, emulated: each chunk's logits by an f32 GEMM
    /// (the `gemm` crate in f32, as cuBLAS with fp32 accumulate; kept in f32, not rounded to the
    /// input dtype), then the kernel source in partial-state mode over the chunk, run by this emulator
    /// ([`Emulated::range_states`]), folded in vocabulary order with the same merge.
    /// Agrees with the float64 reference to the kernels' tolerance; the same row errors.
    pub fn score_hidden<T: LogitElement>(
        &self,
        first_row: usize,
        inputs: &HiddenInputs<'_, T>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<Vec<RowValues>> {
        fold_chunks::<T, f32>(first_row, inputs, targets, params, chunk, |range, real, masked| {
            let rows = targets.len();
            let input =
                RangeInput::shard(Logits::new(real, rows, range.len)?, Logits::new(masked, rows, range.len)?, range);
            let raw = self.range_states(&input, targets, params)?;
            RangeStates::from_kernel(range, &raw, params)
        })
    }

    /// The GPU path's whole computation, emulated, as [`crate::Backend::compute_hidden`] on the
    /// emulated backend runs it: per chunk an f32 GEMM and the kernel source in partial-state mode,
    /// each chunk's `[N, 8]` states appended to one `[K, N, 8]` buffer (what the CUDA path keeps on
    /// the device), then ONE launch of the kernel's merge mode
    /// ([`Emulated::merge_and_finish`]): the ordered f32 merge, the row
    /// outputs, and with `layout` the turn means and the epilogue, in the kernel. Row errors name
    /// global row `first_row + i`.
    pub fn compute_hidden_typed<T: LogitElement>(
        &self,
        first_row: usize,
        inputs: &HiddenInputs<'_, T>,
        targets: &[i64],
        layout: Option<&Layout>,
        params: &Params,
        chunk: usize,
    ) -> Result<Output> {
        let rows = targets.len();
        layout::global_rows(first_row, rows)?;
        let mut states: Vec<f32> = Vec::new();
        let mut parts = 0;
        for_each_chunk::<T, f32>(inputs, targets, params, chunk, |range, real, masked| {
            let input =
                RangeInput::shard(Logits::new(real, rows, range.len)?, Logits::new(masked, rows, range.len)?, range);
            states.extend(self.range_states(&input, targets, params)?);
            parts += 1;
            Ok(())
        })?;
        self.merge_and_finish(&states, parts, targets, inputs.vocab, layout, params).map_err(|e| match e {
            Error::Row { row, kind, target } => Error::Row { row: first_row + row, kind, target },
            other => other,
        })
    }
}
