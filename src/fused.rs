//! InfoPO from hidden states and the lm_head weight, the logits never stored (CPU reference):
//! logits = hidden · lm_headᵀ (then ÷ τs as always) are computed in float64 over vocabulary
//! chunks of `chunk` token ids with the `gemm` crate, each chunk folded into the row states
//! ([`crate::partial::RangeFold`], the machinery of vocabulary ranges) and dropped.
//!
//! Extra memory: the two hidden tensors in f64 (2·N·D), one chunk of the lm_head in f64
//! (chunk·D) and two chunks of logits (2·N·chunk), plus O(N) states — never O(N·V).
//!
//! `score_hidden_emulated` (feature `emulator`) is the GPU path's computation on the CPU: the
//! same chunk loop with f32 GEMMs and the kernel source in partial-state mode per chunk.
//!
//! Beside these typed functions, the dtype-erased forms every backend and the CLI share:
//! [`HiddenTensors`] (the three tensors, one dtype, checked widths), [`HiddenBatch`] (with the
//! targets and the optional turns, trajectories and credit starts of a [`crate::Batch`]) and
//! its owned form [`OwnedHiddenBatch`] (what [`crate::io::read_any_input`] reads from a file).
//! [`crate::Backend::compute_hidden`] takes a [`HiddenBatch`] and returns the same
//! [`crate::Output`] as [`crate::Backend::compute`] on the materialised logits;
//! [`crate::Backend::score_hidden_rows`] is its first stage (rows of one micro-batch).

use crate::batch::{Output, RowOutputs, Trajectories, TrajectoryBuf, TurnBuf, Turns};
use crate::cpu::to_outputs;
use crate::epilogue::{advantages, turn_of_row, TurnAccumulator};
use crate::error::{Error, Result};
use crate::io::{Elements, LogitBuf};
use crate::logits::{Dtype, LogitData, LogitElement};
use crate::params::Params;
use crate::partial::{RangeFold, RangeStates, VocabRange};
use crate::state::{scaled_logit_f64, RowValues};
use crate::validate::Layout;
use half::{bf16, f16};
use rayon::prelude::*;

/// Token ids per chunk when the caller has no preference: 2·N·4096 f64 of chunk logits.
pub const DEFAULT_CHUNK: usize = 4096;

/// Borrowed inputs of the fused path, row-major, one element type (f32, f16 or bf16):
/// `real_hidden` and `masked_hidden` [rows, hidden], `lm_head` [vocab, hidden].
#[derive(Debug, Clone, Copy)]
pub struct HiddenInputs<'a, T> {
    pub real_hidden: &'a [T],
    pub masked_hidden: &'a [T],
    pub lm_head: &'a [T],
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
}

impl<T: LogitElement> HiddenInputs<'_, T> {
    fn validate(&self, targets: &[i64]) -> Result<()> {
        check_shapes(
            [self.real_hidden.len(), self.masked_hidden.len(), self.lm_head.len()],
            self.rows,
            self.hidden,
            self.vocab,
        )?;
        if targets.len() != self.rows {
            return Err(Error::shape(format!("{} targets for {} rows", targets.len(), self.rows)));
        }
        Ok(())
    }
}

/// The element counts of `real_hidden`, `masked_hidden` and `lm_head` against
/// `[rows, hidden]`, `[rows, hidden]` and `[vocab, hidden]`; V ≥ 1 and D ≥ 1.
fn check_shapes(lens: [usize; 3], rows: usize, hidden: usize, vocab: usize) -> Result<()> {
    if vocab == 0 {
        return Err(Error::EmptyVocab);
    }
    if hidden == 0 {
        return Err(Error::shape("hidden width D is 0"));
    }
    let want = |what: &str, len: usize, a: usize, b: usize| -> Result<()> {
        match a.checked_mul(b) {
            Some(n) if n == len => Ok(()),
            _ => Err(Error::shape(format!("{what} holds {len} elements, expected [{a}, {b}]"))),
        }
    };
    want("real_hidden", lens[0], rows, hidden)?;
    want("masked_hidden", lens[1], rows, hidden)?;
    want("lm_head", lens[2], vocab, hidden)
}

/// `real_hidden`, `masked_hidden` and `lm_head` share one dtype: the error names the first
/// tensor whose dtype differs from `real_hidden`'s.
pub(crate) fn check_dtypes(real_hidden: Dtype, masked_hidden: Dtype, lm_head: Dtype) -> Result<()> {
    for (tensor, dtype) in [("masked_hidden", masked_hidden), ("lm_head", lm_head)] {
        if dtype != real_hidden {
            let expected = match real_hidden {
                Dtype::F32 => "f32, the dtype of real_hidden (real_hidden, masked_hidden and lm_head share one)",
                Dtype::F16 => "f16, the dtype of real_hidden (real_hidden, masked_hidden and lm_head share one)",
                Dtype::BF16 => "bf16, the dtype of real_hidden (real_hidden, masked_hidden and lm_head share one)",
            };
            return Err(Error::UnsupportedDtype { tensor, dtype: dtype.name().to_string(), expected });
        }
    }
    Ok(())
}

/// [`HiddenInputs`] with the element type erased: `real_hidden` and `masked_hidden`
/// `[rows, hidden]`, `lm_head` `[vocab, hidden]`, row-major, all three of one dtype (F32, F16 or
/// BF16). Made only by [`HiddenTensors::new`] (or from typed inputs), which checks the dtypes and
/// the element counts, so every value of this type is consistent.
#[derive(Debug, Clone, Copy)]
pub struct HiddenTensors<'a> {
    real_hidden: LogitData<'a>,
    masked_hidden: LogitData<'a>,
    lm_head: LogitData<'a>,
    rows: usize,
    hidden: usize,
    vocab: usize,
}

impl<'a> HiddenTensors<'a> {
    /// Views the three tensors; a dtype that differs from `real_hidden`'s is
    /// [`Error::UnsupportedDtype`] naming the tensor, a wrong element count (or V = 0, D = 0) a
    /// shape error.
    pub fn new(
        real_hidden: LogitData<'a>,
        masked_hidden: LogitData<'a>,
        lm_head: LogitData<'a>,
        rows: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<Self> {
        check_dtypes(real_hidden.dtype(), masked_hidden.dtype(), lm_head.dtype())?;
        check_shapes([real_hidden.len(), masked_hidden.len(), lm_head.len()], rows, hidden, vocab)?;
        Ok(HiddenTensors { real_hidden, masked_hidden, lm_head, rows, hidden, vocab })
    }

    /// Typed inputs, their shapes checked.
    pub fn from_inputs<T: LogitElement>(inputs: &HiddenInputs<'a, T>) -> Result<Self> {
        Self::new(
            LogitData::from_slice(inputs.real_hidden),
            LogitData::from_slice(inputs.masked_hidden),
            LogitData::from_slice(inputs.lm_head),
            inputs.rows,
            inputs.hidden,
            inputs.vocab,
        )
    }

    pub fn real_hidden(&self) -> LogitData<'a> {
        self.real_hidden
    }
    pub fn masked_hidden(&self) -> LogitData<'a> {
        self.masked_hidden
    }
    pub fn lm_head(&self) -> LogitData<'a> {
        self.lm_head
    }
    /// N.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// D, the width of the hidden states and of the lm_head's rows.
    pub fn hidden(&self) -> usize {
        self.hidden
    }
    /// V, the lm_head's rows.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn dtype(&self) -> Dtype {
        self.real_hidden.dtype()
    }

    /// Rows `start..start + len` of both hidden tensors, with the whole lm_head (a micro-batch).
    pub fn slice_rows(&self, start: usize, len: usize) -> Result<Self> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.rows)
            .ok_or_else(|| Error::shape(format!("rows {start}..{start}+{len} outside 0..{}", self.rows)))?;
        let (a, b) = (start * self.hidden, end * self.hidden);
        let rows = |d: LogitData<'a>| match d {
            LogitData::F32(x) => LogitData::F32(&x[a..b]),
            LogitData::F16(x) => LogitData::F16(&x[a..b]),
            LogitData::BF16(x) => LogitData::BF16(&x[a..b]),
        };
        Ok(HiddenTensors {
            real_hidden: rows(self.real_hidden),
            masked_hidden: rows(self.masked_hidden),
            rows: len,
            ..*self
        })
    }

    /// The typed [`HiddenInputs`] when `T` is the tensors' element type, else
    /// [`Error::UnsupportedDtype`]: how a backend with a generic entry point
    /// (`fn f<T: LogitElement>(&HiddenInputs<T>)`) takes these tensors, matching on
    /// [`HiddenTensors::dtype`]: `Dtype::BF16 => f(&tensors.typed::<half::bf16>()?)`.
    pub fn typed<T: LogitElement>(&self) -> Result<HiddenInputs<'a, T>> {
        if T::DTYPE != self.dtype() {
            return Err(Error::UnsupportedDtype {
                tensor: "real_hidden",
                dtype: self.dtype().name().to_string(),
                expected: T::DTYPE.name(),
            });
        }
        // Same dtype, same element size: a reinterpretation of Pod elements, as LogitData::from_slice.
        let cast = |d: LogitData<'a>| -> &'a [T] {
            match d {
                LogitData::F32(x) => bytemuck::cast_slice(x),
                LogitData::F16(x) => bytemuck::cast_slice(x),
                LogitData::BF16(x) => bytemuck::cast_slice(x),
            }
        };
        Ok(HiddenInputs {
            real_hidden: cast(self.real_hidden),
            masked_hidden: cast(self.masked_hidden),
            lm_head: cast(self.lm_head),
            rows: self.rows,
            hidden: self.hidden,
            vocab: self.vocab,
        })
    }

    /// Bytes of the three tensors.
    pub fn size_bytes(&self) -> usize {
        (self.real_hidden.len() + self.masked_hidden.len() + self.lm_head.len()) * self.dtype().size_bytes()
    }
}

/// Runs `$body` with `$inputs` bound to the typed [`HiddenInputs`] of a [`HiddenTensors`].
macro_rules! with_inputs {
    ($tensors:expr, |$inputs:ident| $body:expr) => {{
        let t: &HiddenTensors<'_> = $tensors;
        match t.dtype() {
            Dtype::F32 => t.typed::<f32>().and_then(|$inputs| $body),
            Dtype::F16 => t.typed::<f16>().and_then(|$inputs| $body),
            Dtype::BF16 => t.typed::<bf16>().and_then(|$inputs| $body),
        }
    }};
}

/// [`score_hidden`] on dtype-erased tensors: every row's values in f64, chunk by chunk.
pub fn score_hidden_tensors(
    first_row: usize,
    tensors: &HiddenTensors<'_>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
) -> Result<Vec<RowValues>> {
    with_inputs!(tensors, |inputs| score_hidden(first_row, &inputs, targets, params, chunk))
}

/// `compute_hidden_emulated` on dtype-erased tensors (feature `emulator`).
#[cfg(feature = "emulator")]
pub fn compute_hidden_tensors_emulated(
    emulator: &crate::emulated::Emulated,
    first_row: usize,
    tensors: &HiddenTensors<'_>,
    targets: &[i64],
    layout: Option<&Layout>,
    params: &Params,
    chunk: usize,
) -> Result<Output> {
    with_inputs!(tensors, |inputs| compute_hidden_emulated(
        emulator, first_row, &inputs, targets, layout, params, chunk
    ))
}

/// `score_hidden_emulated` on dtype-erased tensors (feature `emulator`).
#[cfg(feature = "emulator")]
pub fn score_hidden_tensors_emulated(
    emulator: &crate::emulated::Emulated,
    first_row: usize,
    tensors: &HiddenTensors<'_>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
) -> Result<Vec<RowValues>> {
    with_inputs!(tensors, |inputs| score_hidden_emulated(emulator, first_row, &inputs, targets, params, chunk))
}

/// Everything one call of [`crate::Backend::compute_hidden`] reads: the fused path's
/// [`crate::Batch`], hidden states and the lm_head weight in place of the two logit tensors.
#[derive(Debug, Clone, Copy)]
pub struct HiddenBatch<'a> {
    pub tensors: HiddenTensors<'a>,
    /// `[N]` realised token ids (see [`crate::Batch::targets`]).
    pub targets: &'a [i64],
    pub turns: Option<Turns<'a>>,
    /// Needs `turns`.
    pub trajectories: Option<Trajectories<'a>>,
    /// Needs `trajectories` (see [`crate::Batch::credit_start`]).
    pub credit_start: Option<&'a [u32]>,
}

impl<'a> HiddenBatch<'a> {
    /// A batch of rows only.
    pub fn rows(tensors: HiddenTensors<'a>, targets: &'a [i64]) -> Self {
        HiddenBatch { tensors, targets, turns: None, trajectories: None, credit_start: None }
    }

    pub fn with_turns(mut self, turns: Turns<'a>) -> Self {
        self.turns = Some(turns);
        self
    }

    pub fn with_trajectories(mut self, trajectories: Trajectories<'a>) -> Self {
        self.trajectories = Some(trajectories);
        self
    }

    pub fn with_credit_start(mut self, credit_start: &'a [u32]) -> Self {
        self.credit_start = Some(credit_start);
        self
    }

    /// Checks the targets' length and the layouts against the rows, as
    /// [`crate::validate::batch`] does for logits; targets' values are checked per row.
    pub fn validate(&self) -> Result<Option<Layout>> {
        if self.targets.len() != self.tensors.rows {
            return Err(Error::shape(format!(
                "HiddenBatch::targets / targets hold {} ids for {} rows of real_hidden",
                self.targets.len(),
                self.tensors.rows
            )));
        }
        crate::validate::batch_layout(self.tensors.rows, self.turns, self.trajectories, self.credit_start)
    }
}

/// A fused-path batch that owns its data, the counterpart of [`crate::OwnedBatch`]:
/// [`OwnedHiddenBatch::as_batch`] views it as the [`HiddenBatch`] the backends take.
/// [`crate::io::read_any_input`] reads one from a file, its tensors viewed in place in the
/// memory-mapped file where aligned (see [`Elements`]).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedHiddenBatch {
    pub rows: usize,
    pub hidden: usize,
    pub vocab: usize,
    /// `[rows × hidden]` row-major.
    pub real_hidden: LogitBuf,
    /// `[rows × hidden]`, the dtype of `real_hidden`.
    pub masked_hidden: LogitBuf,
    /// `[vocab × hidden]`, the dtype of `real_hidden`.
    pub lm_head: LogitBuf,
    /// `[rows]` realised token ids.
    pub targets: Elements<i64>,
    pub turns: Option<TurnBuf>,
    /// Needs `turns`.
    pub trajectories: Option<TrajectoryBuf>,
    /// Needs `trajectories`.
    pub credit_start: Option<Vec<u32>>,
}

impl OwnedHiddenBatch {
    /// A batch of rows only: hidden states `[N, hidden]` (N = `targets.len()`) and an lm_head
    /// `[vocab, hidden]` (`Vec<f32>`, `Vec<half::f16>` or `Vec<half::bf16>`, one type for all
    /// three); dtypes and element counts are checked here.
    pub fn new(
        real_hidden: impl Into<LogitBuf>,
        masked_hidden: impl Into<LogitBuf>,
        lm_head: impl Into<LogitBuf>,
        hidden: usize,
        vocab: usize,
        targets: impl Into<Elements<i64>>,
    ) -> Result<Self> {
        let targets = targets.into();
        let batch = OwnedHiddenBatch {
            rows: targets.len(),
            hidden,
            vocab,
            real_hidden: real_hidden.into(),
            masked_hidden: masked_hidden.into(),
            lm_head: lm_head.into(),
            targets,
            turns: None,
            trajectories: None,
            credit_start: None,
        };
        batch.as_batch()?;
        Ok(batch)
    }

    /// Adds the turns and trajectories of `layout` (checked against the rows by the backends).
    pub fn with_layout(mut self, layout: crate::BatchLayout) -> Self {
        self.turns = Some(layout.turns);
        self.trajectories = Some(layout.trajectories);
        self
    }

    /// Borrowed views for [`crate::Backend::compute_hidden`]; the tensors' dtypes and shapes
    /// are checked here, layouts by the backends.
    pub fn as_batch(&self) -> Result<HiddenBatch<'_>> {
        let tensors = HiddenTensors::new(
            self.real_hidden.as_data(),
            self.masked_hidden.as_data(),
            self.lm_head.as_data(),
            self.rows,
            self.hidden,
            self.vocab,
        )?;
        let mut batch = HiddenBatch::rows(tensors, self.targets.as_slice());
        if let Some(t) = &self.turns {
            batch = batch.with_turns(t.as_turns());
        }
        if let Some(t) = &self.trajectories {
            batch = batch.with_trajectories(t.as_trajectories());
        }
        if let Some(s) = &self.credit_start {
            batch = batch.with_credit_start(s);
        }
        Ok(batch)
    }
}

/// The fused path's second stage, shared by the backends: turn means and advantages from the
/// estimator value of each row (`estimator`, `[N]`: f64 rows for the CPU reference, the f32 row
/// outputs for the kernels, as in their logits paths), through the same
/// [`TurnAccumulator`] and [`advantages`] as the two-stage form. With trajectories, a row whose
/// estimator is not finite is [`Error::NonFiniteTurn`] naming its turn and row, as on logits.
pub(crate) fn epilogue(rows: RowOutputs, layout: Option<Layout>, estimator: &[f64], params: &Params) -> Result<Output> {
    let Some(layout) = layout else {
        return Ok(Output { rows, turn_info: None, advantages: None });
    };
    if layout.groups.is_some() {
        if let Some(row) = estimator.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFiniteTurn { turn: turn_of_row(&layout.turn_offsets, row), row: Some(row) });
        }
    }
    let mut acc = TurnAccumulator::for_layout(&layout);
    acc.add_rows(&layout, 0, estimator)?;
    let info = acc.info();
    let advantages = match layout.groups {
        Some(_) => Some(advantages(&info, &layout, params)?),
        None => None,
    };
    Ok(Output { rows, turn_info: Some(info), advantages })
}

/// Every row's values from hidden states (contract §2 on logits = hidden · lm_headᵀ, ÷ `params`'
/// τs), computed over vocabulary chunks of `chunk` token ids (≥ 1): the same values, to f64
/// rounding, as the float64 reference on the materialised logits ([`crate::cpu::score`]), and
/// the same row errors, naming global row `first_row + i`.
pub fn score_hidden<T: LogitElement>(
    first_row: usize,
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
) -> Result<Vec<RowValues>> {
    let inv_t = 1.0 / params.temperature;
    fold_chunks::<T, f64>(first_row, inputs, targets, params, chunk, |range, real, masked| {
        for l in [&mut *real, &mut *masked] {
            l.par_iter_mut().for_each(|x| *x = scaled_logit_f64(*x, inv_t));
        }
        RangeStates::from_scaled_logits(range, real, masked, targets)
    })
}

/// [`score_hidden`] as the GPU path computes it, emulated: each chunk's logits by an f32 GEMM
/// (the `gemm` crate in f32, as cuBLAS with fp32 accumulate; kept in f32, not rounded to the
/// input dtype), then the kernel source in partial-state mode over the chunk, run by `emulator`
/// ([`crate::partial::emulated_range_states`]), folded in vocabulary order with the same merge.
/// Agrees with the float64 reference to the kernels' tolerance; the same row errors.
#[cfg(feature = "emulator")]
pub fn score_hidden_emulated<T: LogitElement>(
    emulator: &crate::emulated::Emulated,
    first_row: usize,
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
) -> Result<Vec<RowValues>> {
    use crate::logits::Logits;
    use crate::partial::{emulated_range_states, RangeInput};
    fold_chunks::<T, f32>(first_row, inputs, targets, params, chunk, |range, real, masked| {
        let rows = targets.len();
        let input =
            RangeInput::shard(Logits::new(real, rows, range.len)?, Logits::new(masked, rows, range.len)?, range);
        let raw = emulated_range_states(emulator, &input, targets, params)?;
        RangeStates::from_kernel(range, &raw, params)
    })
}

/// An element type the chunk GEMM runs in: f64 (the reference) or f32 (the GPU's accumulate).
trait GemmElement: Copy + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    fn from_input<T: LogitElement>(x: T) -> Self;
}

impl GemmElement for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_input<T: LogitElement>(x: T) -> Self {
        x.to_f32() as f64
    }
}

impl GemmElement for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_input<T: LogitElement>(x: T) -> Self {
        x.to_f32()
    }
}

/// The chunk loop both fused paths share: validates, widens the hidden states to `E` once, and
/// for each chunk of token ids widens its lm_head rows, computes both chunks of logits
/// (unscaled, `[rows, len]` in `E`), lets `states_of` turn them into the chunk's
/// [`RangeStates`], and folds them in vocabulary order.
fn fold_chunks<T: LogitElement, E: GemmElement>(
    first_row: usize,
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
    mut states_of: impl FnMut(VocabRange, &mut [E], &mut [E]) -> Result<RangeStates>,
) -> Result<Vec<RowValues>> {
    let mut fold = RangeFold::new(inputs.rows);
    for_each_chunk::<T, E>(inputs, targets, params, chunk, |range, real, masked| {
        fold.push(&states_of(range, real, masked)?, targets)
    })?;
    fold.finish(first_row, targets, inputs.vocab)
}

/// The chunk walk itself: validates, widens the hidden states to `E` once, then for each chunk
/// of token ids in vocabulary order widens its lm_head rows and hands both chunks of unscaled
/// logits (`[rows, len]` in `E`) to `visit`. Extra memory: the widened hidden states, one
/// widened lm_head chunk and two chunks of logits.
fn for_each_chunk<T: LogitElement, E: GemmElement>(
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
    mut visit: impl FnMut(VocabRange, &mut [E], &mut [E]) -> Result<()>,
) -> Result<()> {
    params.validate()?;
    inputs.validate(targets)?;
    if chunk == 0 {
        return Err(Error::shape("the vocabulary chunk must hold at least one token id"));
    }
    let (n, d, v) = (inputs.rows, inputs.hidden, inputs.vocab);
    let widen = |x: &[T]| -> Vec<E> { x.par_iter().map(|&e| E::from_input(e)).collect() };
    let (real_h, masked_h) = (widen(inputs.real_hidden), widen(inputs.masked_hidden));
    let c = chunk.min(v);
    let mut weight = vec![E::ZERO; c * d];
    let mut real_l = vec![E::ZERO; n * c];
    let mut masked_l = vec![E::ZERO; n * c];
    let mut start = 0;
    while start < v {
        let len = c.min(v - start);
        let w = &mut weight[..len * d];
        w.par_iter_mut().zip(&inputs.lm_head[start * d..(start + len) * d]).for_each(|(o, &e)| *o = E::from_input(e));
        let (rl, ml) = (&mut real_l[..n * len], &mut masked_l[..n * len]);
        chunk_logits(&real_h, w, rl, n, d, len);
        chunk_logits(&masked_h, w, ml, n, d, len);
        visit(VocabRange::new(start, len), rl, ml)?;
        start += len;
    }
    Ok(())
}

/// The GPU path's whole computation, emulated, as [`crate::Backend::compute_hidden`] on the
/// emulated backend runs it: per chunk an f32 GEMM and the kernel source in partial-state mode,
/// each chunk's `[N, 8]` states appended to one `[K, N, 8]` buffer (what the CUDA path keeps on
/// the device), then ONE launch of the kernel's merge mode
/// ([`crate::emulated::Emulated::merge_range_states`]): the ordered f32 merge, the row
/// outputs, and with `layout` the turn means and the epilogue, in the kernel. Row errors name
/// global row `first_row + i`.
#[cfg(feature = "emulator")]
pub fn compute_hidden_emulated<T: LogitElement>(
    emulator: &crate::emulated::Emulated,
    first_row: usize,
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    layout: Option<&Layout>,
    params: &Params,
    chunk: usize,
) -> Result<Output> {
    use crate::logits::Logits;
    use crate::partial::{emulated_range_states, RangeInput};
    let rows = targets.len();
    crate::validate::global_rows(first_row, rows)?;
    let mut states: Vec<f32> = Vec::new();
    let mut parts = 0;
    for_each_chunk::<T, f32>(inputs, targets, params, chunk, |range, real, masked| {
        let input =
            RangeInput::shard(Logits::new(real, rows, range.len)?, Logits::new(masked, rows, range.len)?, range);
        states.extend(emulated_range_states(emulator, &input, targets, params)?);
        parts += 1;
        Ok(())
    })?;
    emulator.merge_range_states(&states, parts, targets, inputs.vocab, layout, params).map_err(|e| match e {
        Error::Row { row, kind, target } => Error::Row { row: first_row + row, kind, target },
        other => other,
    })
}

/// [`score_hidden`], rounded to the f32 row outputs of the logits path.
pub fn score_hidden_outputs<T: LogitElement>(
    first_row: usize,
    inputs: &HiddenInputs<'_, T>,
    targets: &[i64],
    params: &Params,
    chunk: usize,
) -> Result<RowOutputs> {
    Ok(to_outputs(&score_hidden(first_row, inputs, targets, params, chunk)?))
}

/// out [n, len] = hidden [n, d] · weightᵀ, weight [len, d], all row-major, accumulated in `E`.
fn chunk_logits<E: GemmElement>(hidden: &[E], weight: &[E], out: &mut [E], n: usize, d: usize, len: usize) {
    assert!(hidden.len() == n * d && weight.len() == len * d && out.len() == n * len);
    if n == 0 || len == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the three buffers hold exactly the [n, d], [d, len] (weight read transposed: column
    // j of the right-hand side is row j of `weight`, so its row stride is 1 and its column stride
    // d) and [n, len] elements addressed by these strides (asserted above); `out` is written only
    // (read_dst = false) and does not alias the inputs.
    unsafe {
        gemm::gemm(
            n,
            len,
            d,
            out.as_mut_ptr(),
            1,
            len as isize,
            false,
            hidden.as_ptr(),
            1,
            d as isize,
            weight.as_ptr(),
            d as isize,
            1,
            E::ZERO,
            E::ONE,
            false,
            false,
            false,
            parallelism,
        );
    }
}
