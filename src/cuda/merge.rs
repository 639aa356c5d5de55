//! The merge of vocabulary-range states on the device (the kernel's merge mode, entry point
//! `infopo_merge`; see `kernels/args.h`): the last step of the vocabulary-parallel path (each
//! rank's partial states, all-gathered into `[P, N, 8]`) and of the fused hidden-state path (one
//! state slice per vocabulary chunk). One launch per micro-batch of rows, on the backend's
//! stream, with the same [`DeviceBatch`] bookkeeping, tickets and epilogue as
//! [`CudaBackend::score`]: a batch may even mix logit launches and merge launches.

use super::{cuda_err, CudaBackend, DeviceBatch, MergeSource, RowPointers};
use crate::data::Dtype;
use crate::error::{Error, Result};
use crate::launch;
use cudarc::driver::{CudaSlice, CudaView, DevicePtr, DevicePtrMut, DeviceSlice};

impl CudaBackend {
    /// One merge-mode launch over the next `targets.len()` rows of the batch: each row's state is
    /// the fold of `parts` range states in part order, finalised as the logit path finalises it
    /// (row errors in the batch's error word, the turn sums, and with `finalize` the epilogue).
    /// Returns the row outputs, [5 × rows] f32, as [`CudaBackend::score`] does. Asynchronous.
    ///
    /// `states` is `[parts][rows][8]` f32: part k is the partial-state output (`state_out`) of
    /// the k-th vocabulary range in vocabulary order, for these rows, computed with the batch's
    /// temperature; the ranges must tile `[0, vocab)` (an empty range contributes the empty
    /// state: maxima −FLT_MAX, sums 0, target logits NaN). The kernel takes each row's target
    /// logits from the one part whose range holds the target; a target outside `[0, vocab)` is
    /// the row error of the logit path.
    pub fn merge_states(
        &self,
        batch: &mut DeviceBatch<'_>,
        states: &CudaView<'_, f32>,
        parts: usize,
        targets: &CudaView<'_, i64>,
        vocab: usize,
        finalize: bool,
    ) -> Result<CudaSlice<f32>> {
        let mut row_out = self.stream.alloc_zeros::<f32>((5 * targets.len()).max(1)).map_err(cuda_err)?;
        self.merge_states_into(batch, states, parts, targets, vocab, finalize, &mut row_out)?;
        Ok(row_out)
    }

    /// [`CudaBackend::merge_states`] into a caller-owned buffer of at least 5 × rows f32.
    #[allow(clippy::too_many_arguments)]
    pub fn merge_states_into(
        &self,
        batch: &mut DeviceBatch<'_>,
        states: &CudaView<'_, f32>,
        parts: usize,
        targets: &CudaView<'_, i64>,
        vocab: usize,
        finalize: bool,
        row_out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let rows = targets.len();
        launch::check_merge_states(states.len(), parts, rows, vocab)?;
        if row_out.len() < 5 * rows {
            return Err(Error::shape(format!("row_out holds {} f32, needs 5 x {rows}", row_out.len())));
        }
        self.check_context(&[
            ("states", states.stream()),
            ("targets", targets.stream()),
            ("row_out", row_out.stream()),
        ])?;
        self.check_batch(batch, rows, finalize)?;
        // The guards keep cudarc's stream ordering (events) around the launch.
        let (states_ptr, _g0) = states.device_ptr(&self.stream);
        let (targets_ptr, _g1) = targets.device_ptr(&self.stream);
        let (row_out_ptr, _g2) = row_out.device_ptr_mut(&self.stream);
        let pointers = RowPointers { targets: targets_ptr, row_out: row_out_ptr, ..RowPointers::default() };
        let merge = MergeSource { states: states_ptr, parts };
        // The dtype is unused in merge mode (one entry point, f32 states).
        self.launch(batch, Dtype::F32, rows, vocab, finalize, pointers, Some(merge))?;
        batch.rows_seen += rows;
        batch.finalized |= finalize;
        Ok(())
    }
}
