//! Partial row states over vocabulary ranges (`docs/contract.md`, "Partial states over
//! vocabulary ranges"): score the columns `[v0, v0 + Vc)` of every row into the row's online
//! state (plus the target's two logits when the target falls in the range), then merge the
//! states of ranges that tile `[0, V)` into the row values.
//!
//! This is what vocabulary-parallel use needs (each GPU holds a contiguous shard of the lm_head,
//! Megatron/vLLM style, the last one possibly padded): every shard computes its [`RangeStates`],
//! one all-gather brings the `[p, N, 8]` states to every rank, and [`merge`] finalises. The merge
//! folds the ranges in vocabulary order, whatever order they were computed or gathered in, so the
//! result is bitwise the same for a given set of ranges.
//!
//! Two producers, one state:
//! - [`score_range`] (CPU): float64, natural-log units, through the same [`RowState`] and row
//!   pass ([`crate::cpu::row_state`]) as the unsplit reference;
//! - the kernel in partial-state mode (`state_out` in `kernels/args.h`; emulated here by
//!   `emulated_range_states`, feature `emulator`): `[N, 8]` f32 in the kernel's units (raw maxima, base-2 sums),
//!   turned into a [`RangeStates`] by [`RangeStates::from_kernel`].
//!
//! The merge is float64: the kernel's f32 states are converted exactly (a raw maximum × 1/τs, a
//! base-2 sum × ln 2) and merged with the reference's own [`RowState::merge`], so there is one copy
//! of the merge and finalisation math, and merging adds no f32 rounding to the kernels' own.

use crate::data::RowOutputs;
use crate::data::{LogitData, LogitElement, Logits};
use crate::error::{Error, Result, RowErrorKind};
use crate::math::row::{row_state, row_state_scaled, to_outputs};
use crate::math::row::{scaled_logit, RowState, RowValues, NEG_LIMIT, POS_LIMIT};
use crate::params::Params;
use rayon::prelude::*;

/// Numbers per row of a range state: the six of [`RowState`] (in field order), then the
/// target's real and masked logit (NaN when the target is outside the range).
pub const RANGE_STATE_FIELDS: usize = 8;

/// A contiguous range of token ids `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VocabRange {
    pub start: usize,
    pub len: usize,
}

impl VocabRange {
    pub fn new(start: usize, len: usize) -> Self {
        VocabRange { start, len }
    }

    /// One past the last token id.
    pub fn end(&self) -> usize {
        // Saturating: a range past usize::MAX can only fail the tiling checks, never wrap.
        self.start.saturating_add(self.len)
    }

    /// The column of `target` in this range, if it falls in it.
    pub fn column_of(&self, target: i64) -> Option<usize> {
        let t = usize::try_from(target).ok()?;
        (t >= self.start && t < self.end()).then(|| t - self.start)
    }
}

/// Megatron/vLLM's contiguous vocabulary shards: `parts` ranges of `ceil(vocab / parts)` token
/// ids (the padded shard width), the last ones holding what is left (their valid length; 0 when
/// the vocabulary is exhausted).
pub fn shard_ranges(vocab: usize, parts: usize) -> Result<Vec<VocabRange>> {
    if parts == 0 {
        return Err(Error::shape("a vocabulary split needs at least one shard"));
    }
    let width = vocab.div_ceil(parts);
    Ok((0..parts)
        .map(|k| {
            let start = (k * width).min(vocab);
            VocabRange::new(start, (vocab - start).min(width))
        })
        .collect())
}

/// The chunks of token ids the fused path walks: `[0, vocab)` in ranges of `chunk` (the last
/// one shorter), in vocabulary order; chunk `k`'s states are slice `k` of the states buffer.
pub fn chunk_ranges(vocab: usize, chunk: usize) -> Vec<VocabRange> {
    let chunk = chunk.max(1);
    (0..vocab.div_ceil(chunk)).map(|k| VocabRange::new(k * chunk, chunk.min(vocab - k * chunk))).collect()
}

/// The chunks of rank `rank`'s Megatron shard (`shard_ranges(vocab, world)[rank]`, padded width
/// `W = ⌈V / P⌉`): `⌈W / chunk⌉` ranges of `chunk` token ids over the padded width, clipped to
/// the shard's valid ids (so the last ones may be shorter or empty). Every rank gets the same
/// count, which an all-gather needs; concatenated over the ranks they tile `[0, vocab)` in
/// order. `chunk ≥ W` gives one range per rank: its shard.
pub fn shard_chunk_ranges(vocab: usize, world: usize, rank: usize, chunk: usize) -> Result<Vec<VocabRange>> {
    if vocab == 0 {
        return Err(Error::EmptyVocab);
    }
    if chunk == 0 {
        return Err(Error::shape("the vocabulary chunk must hold at least one token id"));
    }
    let shards = shard_ranges(vocab, world)?;
    let Some(shard) = shards.get(rank) else {
        return Err(Error::shape(format!("rank {rank} of a world of {world}")));
    };
    let width = vocab.div_ceil(world);
    Ok((0..width.div_ceil(chunk))
        .map(|k| {
            let offset = (k * chunk).min(shard.len);
            VocabRange::new(shard.start + offset, chunk.min(shard.len - offset))
        })
        .collect())
}

/// Logits whose columns `first_col .. first_col + range.len` of each row are the token ids of
/// `range`: either the full `[N, V]` logits ([`RangeInput::of_full`]) or one shard's
/// `[N, W]` logits, W ≥ its valid length ([`RangeInput::shard`]; padding columns are ignored).
#[derive(Debug, Clone, Copy)]
pub struct RangeInput<'a> {
    pub real: Logits<'a>,
    pub masked: Logits<'a>,
    pub first_col: usize,
    pub range: VocabRange,
}

impl<'a> RangeInput<'a> {
    /// Columns `range` of the full logits (row width V ≥ `range.end()`).
    pub fn of_full(real: Logits<'a>, masked: Logits<'a>, range: VocabRange) -> Self {
        RangeInput { real, masked, first_col: range.start, range }
    }

    /// A shard: its first `range.len` columns are token ids `range.start..range.end()`.
    pub fn shard(real: Logits<'a>, masked: Logits<'a>, range: VocabRange) -> Self {
        RangeInput { real, masked, first_col: 0, range }
    }

    pub(crate) fn validate(&self, targets: &[i64], params: &Params) -> Result<()> {
        params.validate()?;
        let (r, m) = (self.real, self.masked);
        if r.rows() != m.rows() || r.vocab() != m.vocab() || targets.len() != r.rows() {
            return Err(Error::shape(format!(
                "real [{}, {}], masked [{}, {}] and {} targets do not match",
                r.rows(),
                r.vocab(),
                m.rows(),
                m.vocab(),
                targets.len()
            )));
        }
        if r.dtype() != m.dtype() {
            return Err(Error::DtypeMismatch { real: r.dtype().name(), masked: m.dtype().name() });
        }
        // Token ids are i64 in the kernels (and the targets): the range must end by i64::MAX.
        if self.range.start.checked_add(self.range.len).is_none_or(|e| e > i64::MAX as usize) {
            return Err(Error::shape(format!(
                "the range {}..{}+{} of token ids extends past i64::MAX",
                self.range.start, self.range.start, self.range.len
            )));
        }
        if self.first_col.checked_add(self.range.len).is_none_or(|e| e > r.vocab()) {
            return Err(Error::shape(format!(
                "columns {}..{}+{} of the range lie outside the {} columns of the logits",
                self.first_col,
                self.first_col,
                self.range.len,
                r.vocab()
            )));
        }
        Ok(())
    }
}

/// The states of every row over one vocabulary range, float64 in natural-log units:
/// `[rows, 8]` row-major, each row `max_real, sum_real, max_masked, sum_masked, sum_diff,
/// sum_centered` (a [`RowState`], maxima of the logits ÷ τs) then the target's logits ÷ τs
/// `x_a, y_a` (NaN when the target is outside the range).
#[derive(Debug, Clone, PartialEq)]
pub struct RangeStates {
    range: VocabRange,
    values: Vec<f64>,
}

impl RangeStates {
    /// States as laid out above (e.g. gathered from other ranks).
    pub fn from_values(range: VocabRange, values: Vec<f64>) -> Result<Self> {
        if values.len() % RANGE_STATE_FIELDS != 0 {
            return Err(Error::shape(format!(
                "{} range-state values are not rows of {RANGE_STATE_FIELDS}",
                values.len()
            )));
        }
        Ok(RangeStates { range, values })
    }

    /// The kernel's partial-state output (`state_out`, `[rows, 8]` f32: raw maxima, base-2
    /// sums, raw target logits) for a launch with `params` (its τs), converted exactly to float64
    /// natural-log units. A side whose maximum is a mask fill (≤ −2¹⁰⁰, or the empty state's
    /// −FLT_MAX) has no weight: its sum is 0 as in the reference (the kernel counts a fill at its
    /// own maximum once), unless NaN poisoned it; a maximum ≥ 2¹⁰⁰ (a +∞ or fill) makes the sum
    /// NaN, as +∞ does in the reference.
    pub fn from_kernel(range: VocabRange, kernel: &[f32], params: &Params) -> Result<Self> {
        params.validate()?;
        if kernel.len() % RANGE_STATE_FIELDS != 0 {
            return Err(Error::shape(format!(
                "{} kernel range-state floats are not rows of {RANGE_STATE_FIELDS}",
                kernel.len()
            )));
        }
        let inv_t = 1.0 / params.temperature;
        let ln2 = std::f64::consts::LN_2;
        // (maximum, sum) of one side in the reference's units, and whether it has any weight.
        let side = |max: f32, sum: f32| -> (f64, f64, bool) {
            let (m, s) = (max as f64, sum as f64);
            if s.is_nan() {
                (if m <= NEG_LIMIT { f64::MIN } else { m * inv_t }, f64::NAN, true)
            } else if m >= POS_LIMIT {
                (f64::INFINITY, f64::NAN, true)
            } else if m <= NEG_LIMIT {
                (f64::MIN, 0.0, false)
            } else {
                (m * inv_t, s, true)
            }
        };
        let mut values = Vec::with_capacity(kernel.len());
        for k in kernel.chunks_exact(RANGE_STATE_FIELDS) {
            let (max_real, sum_real, real_live) = side(k[0], k[1]);
            let (max_masked, sum_masked, _) = side(k[2], k[3]);
            // Without real weight there are no centred terms and no gap (a gap needs a finite x).
            let (sum_diff, sum_centered) = if real_live { (k[4] as f64 * ln2, k[5] as f64 * ln2) } else { (0.0, 0.0) };
            let (xa, ya) = (scaled_logit(k[6], inv_t), scaled_logit(k[7], inv_t));
            values.extend_from_slice(&[max_real, sum_real, max_masked, sum_masked, sum_diff, sum_centered, xa, ya]);
        }
        Ok(RangeStates { range, values })
    }

    /// The states of `[rows, range.len]` logits already scaled into f64 (x = logit / τs, see
    /// `scaled_logit_f64`), e.g. one chunk of logits computed from hidden states.
    pub fn from_scaled_logits(range: VocabRange, real: &[f64], masked: &[f64], targets: &[i64]) -> Result<Self> {
        if real.len() != targets.len() * range.len || masked.len() != real.len() {
            return Err(Error::shape(format!(
                "chunk logits of {} and {} values are not {} rows of {}",
                real.len(),
                masked.len(),
                targets.len(),
                range.len
            )));
        }
        let mut values = vec![0.0; targets.len() * RANGE_STATE_FIELDS];
        values.par_chunks_mut(RANGE_STATE_FIELDS).zip(targets.par_iter()).enumerate().for_each(|(r, (out, &t))| {
            let cols = r * range.len..(r + 1) * range.len;
            let (x, y) = (&real[cols.clone()], &masked[cols]);
            let s = row_state_scaled(x, y);
            let (xa, ya) = range.column_of(t).map_or((f64::NAN, f64::NAN), |c| (x[c], y[c]));
            out.copy_from_slice(&[
                s.max_real,
                s.sum_real,
                s.max_masked,
                s.sum_masked,
                s.sum_diff,
                s.sum_centered,
                xa,
                ya,
            ]);
        });
        Ok(RangeStates { range, values })
    }

    pub fn range(&self) -> VocabRange {
        self.range
    }

    pub fn rows(&self) -> usize {
        self.values.len() / RANGE_STATE_FIELDS
    }

    /// `[rows, 8]` row-major (see the type's docs).
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// Row `row`'s state over the range.
    pub fn state(&self, row: usize) -> RowState {
        let v = &self.values[row * RANGE_STATE_FIELDS..(row + 1) * RANGE_STATE_FIELDS];
        RowState {
            max_real: v[0],
            sum_real: v[1],
            max_masked: v[2],
            sum_masked: v[3],
            sum_diff: v[4],
            sum_centered: v[5],
        }
    }

    /// Row `row`'s target logits ÷ τs (NaN when its target is outside the range).
    pub fn target_logits(&self, row: usize) -> (f64, f64) {
        let v = &self.values[row * RANGE_STATE_FIELDS..(row + 1) * RANGE_STATE_FIELDS];
        (v[6], v[7])
    }
}

/// The float64 states of every row over `input`'s range (the CPU reference's row pass on the
/// range's columns) with `params`' τs. Row errors are not decided here but by [`merge`], which
/// sees whole rows.
pub fn score_range(input: &RangeInput<'_>, targets: &[i64], params: &Params) -> Result<RangeStates> {
    input.validate(targets, params)?;
    let inv_t = 1.0 / params.temperature;
    let values = match (input.real.data(), input.masked.data()) {
        (LogitData::F32(x), LogitData::F32(y)) => range_values(x, y, input, targets, inv_t),
        (LogitData::F16(x), LogitData::F16(y)) => range_values(x, y, input, targets, inv_t),
        (LogitData::BF16(x), LogitData::BF16(y)) => range_values(x, y, input, targets, inv_t),
        _ => unreachable!("dtypes checked by validate"),
    };
    Ok(RangeStates { range: input.range, values })
}

fn range_values<T: LogitElement>(
    real: &[T],
    masked: &[T],
    input: &RangeInput<'_>,
    targets: &[i64],
    inv_t: f64,
) -> Vec<f64> {
    let width = input.real.vocab();
    let (c0, c1) = (input.first_col, input.first_col + input.range.len);
    let mut values = vec![0.0; targets.len() * RANGE_STATE_FIELDS];
    values.par_chunks_mut(RANGE_STATE_FIELDS).zip(targets.par_iter()).enumerate().for_each(|(r, (out, &t))| {
        let (x, y) = (&real[r * width + c0..r * width + c1], &masked[r * width + c0..r * width + c1]);
        let s = row_state(x, y, inv_t);
        let (xa, ya) = match input.range.column_of(t) {
            Some(c) => (scaled_logit(x[c].to_f32(), inv_t), scaled_logit(y[c].to_f32(), inv_t)),
            None => (f64::NAN, f64::NAN),
        };
        out.copy_from_slice(&[s.max_real, s.sum_real, s.max_masked, s.sum_masked, s.sum_diff, s.sum_centered, xa, ya]);
    });
    values
}

/// Merges the states of ranges that tile `[0, vocab)` (in any order; empty ranges allowed) into
/// every row's values, folding the ranges in vocabulary order. Errors: ranges
/// that overlap, leave a gap or do not end at `vocab`, or row counts that differ from `targets`
/// (shape errors); else the lowest failing row's error, exactly as the unsplit path reports it
/// (contract §2), naming global row `first_row + i` (the rows are a slice of a batch starting
/// at `first_row`, as in [`crate::reference::score`]).
pub fn merge(first_row: usize, parts: &[RangeStates], targets: &[i64], vocab: usize) -> Result<Vec<RowValues>> {
    let mut order: Vec<&RangeStates> = parts.iter().collect();
    order.sort_by_key(|p| (p.range.start, p.range.len));
    let mut fold = RangeFold::new(targets.len());
    for p in order {
        fold.push(p, targets)?;
    }
    fold.finish(first_row, targets, vocab)
}

/// Row states folded range by range, in vocabulary order: each pushed range must start where
/// the previous one ended. [`merge`] sorts and folds; a chunked producer ([`crate::fused`])
/// folds each chunk as it is computed and drops it.
#[derive(Debug, Clone)]
pub struct RangeFold {
    states: Vec<RowState>,
    target_logits: Vec<(f64, f64)>,
    covered: usize,
}

impl RangeFold {
    /// Nothing folded yet, for `rows` rows.
    pub fn new(rows: usize) -> Self {
        RangeFold { states: vec![RowState::EMPTY; rows], target_logits: vec![(f64::NAN, f64::NAN); rows], covered: 0 }
    }

    /// Folds the next range (it must start where the last one ended).
    pub fn push(&mut self, part: &RangeStates, targets: &[i64]) -> Result<()> {
        if part.range.start != self.covered {
            return Err(Error::shape(format!(
                "vocabulary ranges must tile [0, V) in order: range {}..{} follows {}",
                part.range.start,
                part.range.end(),
                self.covered
            )));
        }
        if part.rows() != self.states.len() || targets.len() != self.states.len() {
            return Err(Error::shape(format!(
                "range {}..{} holds {} rows, {} targets given, {} rows folded",
                part.range.start,
                part.range.end(),
                part.rows(),
                targets.len(),
                self.states.len()
            )));
        }
        let range = part.range;
        self.states.par_iter_mut().zip(self.target_logits.par_iter_mut()).enumerate().for_each(
            |(row, (state, target))| {
                *state = state.merge(&part.state(row));
                if range.column_of(targets[row]).is_some() {
                    *target = part.target_logits(row);
                }
            },
        );
        self.covered = range.end();
        Ok(())
    }

    /// Every row's values once `[0, vocab)` is covered, or the lowest failing row's error
    /// (naming global row `first_row + i`).
    pub fn finish(self, first_row: usize, targets: &[i64], vocab: usize) -> Result<Vec<RowValues>> {
        if vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        crate::data::layout::global_rows(first_row, targets.len())?;
        if self.covered != vocab || targets.len() != self.states.len() {
            return Err(Error::shape(format!(
                "vocabulary ranges cover [0, {}) of {} rows, not [0, {vocab}) of {} rows",
                self.covered,
                self.states.len(),
                targets.len()
            )));
        }
        let results: Vec<std::result::Result<RowValues, RowErrorKind>> = self
            .states
            .par_iter()
            .zip(self.target_logits.par_iter())
            .zip(targets.par_iter())
            .map(|((state, &(xa, ya)), &target)| {
                if !(0..vocab as i64).contains(&target) {
                    return Err(RowErrorKind::TargetOutOfRange);
                }
                state.finish_checked(xa, ya)
            })
            .collect();
        results
            .into_iter()
            .enumerate()
            .map(|(i, r)| r.map_err(|kind| Error::Row { row: first_row + i, kind, target: Some(targets[i]) }))
            .collect()
    }
}

/// [`merge`], rounded to the f32 row outputs of the unsplit path.
pub fn merge_outputs(first_row: usize, parts: &[RangeStates], targets: &[i64], vocab: usize) -> Result<RowOutputs> {
    Ok(to_outputs(&merge(first_row, parts, targets, vocab)?))
}
