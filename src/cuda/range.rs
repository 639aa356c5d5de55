//! The kernel in partial-state mode on the GPU ([`crate::vocab`], `state_out` in
//! `kernels/args.h`): one launch scores a vocabulary range of every row of device logits and
//! writes each row's `[8]` f32 state, in the kernel's units, into a caller's device buffer.
//!
//! Two layouts of the columns, as on the host ([`RangeInput`]):
//! - the full `[N, V]` logits and a column range of them ([`RangeColumns::of_full`]);
//! - one shard's `[N, W]` logits whose first `range.len` columns are the range's token ids,
//!   `W ≥ range.len` (a padded Megatron/vLLM shard, [`RangeColumns::shard`]); the padding
//!   columns are never read.
//!
//! The states are written into a slice the caller owns, so a chunked producer writes chunk `k`
//! into slice `k` of one `[K, N, 8]` buffer ([`super::fused`]) and NCCL can all-gather a rank's
//! `[N, 8]` states ([`super::nccl`]). The kernel's merge mode folds them on the device
//! ([`CudaBackend::merge_range_states`]); [`RangeStates::from_kernel`] turns them into float64
//! natural-log states for the host merge [`crate::math::range::merge`]. The launch goes on the backend's stream
//! and shares its scratch with every other launch of the backend (see [`super`]'s docs).

use super::{cuda_err, CudaBackend};
use crate::data::RowOutputs;
use crate::data::{LogitData, LogitElement};
use crate::error::{Error, Result};
use crate::launch::{launch_shape, KernelArgs, EMPTY_RANGE_STATE, RANGE_STATE_FLOATS};
use crate::math::range::{RangeInput, RangeStates, VocabRange};
use crate::params::Params;
use cudarc::driver::{CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice};
use std::ffi::c_void;

/// Where a vocabulary range lies in rows of device logits: rows are `width` elements apart and
/// columns `first_col .. first_col + range.len` of each row are token ids `range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeColumns {
    /// Elements per row of the logits (the kernel's `row_stride`).
    pub width: usize,
    /// The column of token id `range.start`.
    pub first_col: usize,
    pub range: VocabRange,
}

impl RangeColumns {
    /// Columns `range` of the full `[N, vocab]` logits.
    pub fn of_full(vocab: usize, range: VocabRange) -> Self {
        RangeColumns { width: vocab, first_col: range.start, range }
    }

    /// A shard `[N, width]` whose first `range.len` columns are token ids `range` (the rest is
    /// padding, ignored).
    pub fn shard(width: usize, range: VocabRange) -> Self {
        RangeColumns { width, first_col: 0, range }
    }

    /// The checks that need no GPU, for `rows` rows of `elements` logits per tensor and a
    /// states buffer of `state_floats` f32.
    pub fn validate(&self, rows: usize, real: usize, masked: usize, state_floats: usize) -> Result<()> {
        if rows > u32::MAX as usize {
            return Err(Error::shape(format!("{rows} rows exceed the 2^32 - 1 supported")));
        }
        let expected = rows.checked_mul(self.width);
        if expected != Some(real) || expected != Some(masked) {
            return Err(Error::shape(format!(
                "device logits hold {real} (real) and {masked} (masked) elements, expected {rows} rows x {} columns",
                self.width
            )));
        }
        if self.first_col.checked_add(self.range.len).is_none_or(|e| e > self.width) {
            return Err(Error::shape(format!(
                "columns {}..{}+{} of the range lie outside the {} columns of the logits",
                self.first_col, self.first_col, self.range.len, self.width
            )));
        }
        if i64::try_from(self.range.end()).is_err() || self.range.start.checked_add(self.range.len).is_none() {
            return Err(Error::shape(format!("vocabulary range {}+{} overflows", self.range.start, self.range.len)));
        }
        if rows.checked_mul(RANGE_STATE_FLOATS).is_none_or(|n| n > state_floats) {
            return Err(Error::shape(format!(
                "the states buffer holds {state_floats} f32, needs {RANGE_STATE_FLOATS} x {rows}"
            )));
        }
        Ok(())
    }
}

impl CudaBackend {
    /// One launch of the kernel in partial-state mode on the backend's stream: for every row of
    /// `real`/`masked` (`targets.len()` rows laid out as `columns` says), writes the row's state
    /// over `columns.range` into `states[8 r .. 8 r + 8]` (f32, the kernel's units: raw maxima,
    /// base-2 sums, then the raw target logits or NaN; see `kernels/args.h`). Asynchronous.
    ///
    /// Row errors (targets outside `[0, V)`, non-finite logits) are not decided here but by the
    /// merge, which sees whole rows. An empty range writes the empty state without a launch.
    /// Errors (typed, nothing launched): shapes that disagree, a range outside the rows, a
    /// states buffer shorter than `8 × rows`, bad `params`.
    pub fn score_range_into<T: LogitElement + DeviceRepr>(
        &self,
        real: &CudaView<'_, T>,
        masked: &CudaView<'_, T>,
        targets: &CudaView<'_, i64>,
        columns: RangeColumns,
        params: &Params,
        states: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        params.validate()?;
        let rows = targets.len();
        columns.validate(rows, real.len(), masked.len(), states.len())?;
        if rows == 0 {
            return Ok(());
        }
        self.check_context(&[
            ("real", real.stream()),
            ("masked", masked.stream()),
            ("targets", targets.stream()),
            ("states", states.stream()),
        ])?;
        let s = self.stream();
        if columns.range.len == 0 {
            let empty: Vec<f32> = EMPTY_RANGE_STATE.iter().copied().cycle().take(rows * RANGE_STATE_FLOATS).collect();
            return s.memcpy_htod(&empty, states).map_err(cuda_err);
        }
        let dtype = T::DTYPE;
        let shape = launch_shape(rows, columns.range.len, dtype, self.sm_count(), self.arch());
        let offset = (columns.first_col * dtype.size_bytes()) as u64;
        // The guards keep cudarc's stream ordering (events) around the launch.
        let (real_ptr, _g0) = real.device_ptr(s);
        let (masked_ptr, _g1) = masked.device_ptr(s);
        let (targets_ptr, _g2) = targets.device_ptr(s);
        let (states_ptr, _g3) = states.device_ptr_mut(s);
        let args = KernelArgs {
            real: (real_ptr + offset) as *const c_void,
            masked: (masked_ptr + offset) as *const c_void,
            targets: targets_ptr as *const i64,
            state_out: states_ptr as *mut f32,
            row_stride: columns.width as i64,
            vocab_start: columns.range.start as i64,
            ..KernelArgs::new(params, &shape, rows, columns.range.len, 0, false)
        };
        // SAFETY: `real`/`masked` point at column `first_col` of row 0 and rows are `width`
        // apart, so every read (rows × `range.len` columns, and the target's column when it
        // lies in the range) is inside the two views (checked by `validate`); `targets` holds
        // `rows` i64 and `states` at least 8 × rows f32. Partial-state mode has no turns and
        // writes neither `row_out` nor the error word (kernels/args.h), so both stay null.
        unsafe { self.launch_on_scratch(dtype, &shape, args) }
    }

    /// [`crate::math::range::score_range`] on the GPU: uploads `input`'s logits and `targets`, runs
    /// [`CudaBackend::score_range_into`], downloads the `[rows, 8]` states (waits for the
    /// stream) and converts them with [`RangeStates::from_kernel`].
    pub fn score_range(&self, input: &RangeInput<'_>, targets: &[i64], params: &Params) -> Result<RangeStates> {
        // The host input's own checks (shapes, dtypes, the column range, params) first.
        input.validate(targets, params)?;
        let (r, m) = (input.real, input.masked);
        let columns = RangeColumns { width: r.vocab(), first_col: input.first_col, range: input.range };
        let raw = match (r.data(), m.data()) {
            (LogitData::F32(x), LogitData::F32(y)) => self.range_host(x, y, targets, columns, params)?,
            (LogitData::F16(x), LogitData::F16(y)) => self.range_host(x, y, targets, columns, params)?,
            (LogitData::BF16(x), LogitData::BF16(y)) => self.range_host(x, y, targets, columns, params)?,
            (x, y) => return Err(Error::DtypeMismatch { real: x.dtype().name(), masked: y.dtype().name() }),
        };
        RangeStates::from_kernel(input.range, &raw, params)
    }

    fn range_host<T: LogitElement + DeviceRepr>(
        &self,
        real: &[T],
        masked: &[T],
        targets: &[i64],
        columns: RangeColumns,
        params: &Params,
    ) -> Result<Vec<f32>> {
        params.validate()?;
        let rows = targets.len();
        columns.validate(rows, real.len(), masked.len(), rows * RANGE_STATE_FLOATS)?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let s = self.stream();
        let up = |v: &[T]| s.clone_htod(&*super::nonempty(v)).map_err(cuda_err);
        let (x, y) = (up(real)?, up(masked)?);
        let t = s.clone_htod(targets).map_err(cuda_err)?;
        let mut out = s.alloc_zeros::<f32>(rows * RANGE_STATE_FLOATS).map_err(cuda_err)?;
        let n = real.len();
        self.score_range_into(&x.slice(..n), &y.slice(..n), &t.as_view(), columns, params, &mut out.as_view_mut())?;
        s.clone_dtoh(&out).map_err(cuda_err)
    }
}

impl CudaBackend {
    /// The merge of device range states into the row outputs: `states` holds `[P, N, 8]` f32
    /// (the kernel's units), slice `p` the states of `ranges[p]`; the ranges tile `[0, vocab)`
    /// in vocabulary order (empty ones allowed). One launch of the kernel's merge mode
    /// ([`CudaBackend::merge_states`]) folds them per row in that order, deterministically,
    /// then one download of the `[5, N]` rows (this waits for the stream). Row errors as the
    /// unsplit path reports them, naming rows from 0.
    pub fn merge_range_states(
        &self,
        states: &CudaView<'_, f32>,
        ranges: &[VocabRange],
        targets: &CudaView<'_, i64>,
        vocab: usize,
        params: &Params,
    ) -> Result<RowOutputs> {
        params.validate()?;
        check_tiling(ranges, vocab)?;
        let rows = targets.len();
        // The shape checks run for no rows too (as on the emulated backend).
        crate::launch::check_merge_states(states.len(), ranges.len(), rows, vocab)?;
        if rows == 0 {
            // No rows and no turn layout: nothing to launch.
            return Ok(RowOutputs::with_len(0));
        }
        let mut batch = self.begin(None, params)?;
        let row_out = self.merge_states(&mut batch, states, ranges.len(), targets, vocab, true)?;
        batch.check()?;
        super::rows_to_host(self.stream(), &row_out, rows)
    }
}

/// The device merge folds parts in the order given: they must be the vocabulary ranges of
/// `[0, vocab)` in order (a typed error otherwise, as [`crate::math::range::RangeFold`] gives).
pub(crate) fn check_tiling(ranges: &[VocabRange], vocab: usize) -> Result<()> {
    let mut covered = 0usize;
    for r in ranges {
        if r.start != covered {
            return Err(Error::shape(format!(
                "vocabulary ranges must tile [0, V) in order: range {}..{} follows {covered}",
                r.start,
                r.end()
            )));
        }
        covered = r.end();
    }
    if covered != vocab {
        return Err(Error::shape(format!("the vocabulary ranges cover [0, {covered}), not [0, {vocab})")));
    }
    Ok(())
}
