//! The batches every backend takes: paired logits ([`Batch`], [`OwnedBatch`]) or, on the fused
//! path, hidden states and the lm_head weight ([`HiddenBatch`], [`OwnedHiddenBatch`]).

use super::layout::{self, BatchLayout, Layout, Padding, Trajectories, TrajectoryBuf, TurnBuf, Turns};
use super::logits::{Dtype, Elements, LogitBuf, LogitData, LogitElement, Logits};
use crate::error::{Error, Result};

/// The layout setters of the two borrowed batches ([`Batch`], [`HiddenBatch`]): one builder,
/// written once, for the fields both share (`turns`, `trajectories`, `credit_start`).
macro_rules! layout_setters {
    () => {
        pub fn with_turns(mut self, turns: Turns<'a>) -> Self {
            self.turns = Some(turns);
            self
        }

        pub fn with_trajectories(mut self, trajectories: Trajectories<'a>) -> Self {
            self.trajectories = Some(trajectories);
            self
        }

        /// Where each turn's credited tokens sit in its trajectory's response (see
        /// [`Batch::credit_start`]).
        pub fn with_credit_start(mut self, credit_start: &'a [u32]) -> Self {
            self.credit_start = Some(credit_start);
            self
        }

        /// Asks for the padded `[B, L]` token output ([`crate::Advantages::padded_advantage`]):
        /// L = `width`, trajectory i's tokens from column `offset[i]` (0 without `offset`).
        pub fn with_padding(mut self, width: u32, offset: Option<&'a [u32]>) -> Self {
            self.padding = Some(Padding { width, offset });
            self
        }

        /// The turns, trajectories, credit starts and padding (where it has them) of `layout`,
        /// e.g. a [`crate::Conversation`]'s. Pad offsets without a width are an error here.
        pub fn with_layout(mut self, layout: &'a BatchLayout) -> Result<Self> {
            self.turns = Some(layout.turns.as_turns());
            self.trajectories = Some(layout.trajectories.as_trajectories());
            self.credit_start = layout.credit_start.as_deref();
            self.padding = layout.padding()?;
            Ok(self)
        }

        /// The views of an owned batch's layout buffers, those present.
        fn with_owned_layout(
            mut self,
            turns: &'a Option<TurnBuf>,
            trajectories: &'a Option<TrajectoryBuf>,
            credit_start: &'a Option<Vec<u32>>,
            pad_width: Option<u32>,
            pad_offset: &'a Option<Vec<u32>>,
        ) -> Result<Self> {
            self.turns = turns.as_ref().map(TurnBuf::as_turns);
            self.trajectories = trajectories.as_ref().map(TrajectoryBuf::as_trajectories);
            self.credit_start = credit_start.as_deref();
            self.padding = layout::padding_of(pad_width, pad_offset)?;
            Ok(self)
        }
    };
}

/// The layout setter of the two owned batches ([`OwnedBatch`], [`OwnedHiddenBatch`]).
macro_rules! owned_layout_setters {
    () => {
        /// Adds the turns, trajectories, credit starts and padding (where it has them) of
        /// `layout` (checked against the rows by the backends).
        pub fn with_layout(mut self, layout: BatchLayout) -> Self {
            self.turns = Some(layout.turns);
            self.trajectories = Some(layout.trajectories);
            self.credit_start = layout.credit_start;
            self.pad_width = layout.pad_width;
            self.pad_offset = layout.pad_offset;
            self
        }
    };
}

/// Everything one call of [`crate::Backend::compute`] reads.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub real: Logits<'a>,
    pub masked: Logits<'a>,
    /// `[N]` realised token ids, `i64` as PyTorch and candle hold them (layout indices are
    /// `u32`: see [`Turns`] for why the two differ).
    pub targets: &'a [i64],
    pub turns: Option<Turns<'a>>,
    /// Needs `turns`.
    pub trajectories: Option<Trajectories<'a>>,
    /// `[T]`, needs `trajectories`: turn t's credited tokens are positions
    /// `credit_start[t] .. credit_start[t] + credit_tokens[t]` of trajectory `trajectory[t]`'s
    /// agent tokens (0-based, within `0 .. tokens[i]`; the spans of one trajectory must not
    /// overlap). With it, [`crate::Advantages::token_advantage`] is computed (contract §4).
    pub credit_start: Option<&'a [u32]>,
    /// Needs `credit_start`: the padded `[B, L]` token output as well
    /// ([`crate::Advantages::padded_advantage`]).
    pub padding: Option<Padding<'a>>,
}

impl<'a> Batch<'a> {
    /// A batch of rows only (no turns, no trajectories).
    pub fn rows(real: Logits<'a>, masked: Logits<'a>, targets: &'a [i64]) -> Self {
        Batch { real, masked, targets, turns: None, trajectories: None, credit_start: None, padding: None }
    }

    layout_setters!();

    /// Checks the logits, targets' length and the layouts of a batch; targets' values are checked
    /// per row by the backends (contract §2, "Row errors").
    pub fn validate(&self) -> Result<Option<Layout>> {
        let batch = self;
        let (real, masked) = (&batch.real, &batch.masked);
        if real.dtype() != masked.dtype() {
            return Err(Error::DtypeMismatch { real: real.dtype().name(), masked: masked.dtype().name() });
        }
        if real.rows() != masked.rows() || real.vocab() != masked.vocab() {
            return Err(Error::shape(format!(
                "Batch::real / real_logits are [{}, {}] but Batch::masked / masked_logits are [{}, {}]",
                real.rows(),
                real.vocab(),
                masked.rows(),
                masked.vocab()
            )));
        }
        if batch.targets.len() != real.rows() {
            return Err(Error::shape(format!(
                "Batch::targets / targets hold {} ids for {} rows",
                batch.targets.len(),
                real.rows()
            )));
        }
        layout::batch_layout(real.rows(), batch.turns, batch.trajectories, batch.credit_start, batch.padding)
    }

    /// Bytes of logits the batch holds (both tensors): the memory traffic of one pass.
    pub fn logit_bytes(&self) -> usize {
        self.real.size_bytes() + self.masked.size_bytes()
    }
}

/// A batch that owns its data; [`OwnedBatch::as_batch`] views it as the [`Batch`] every backend
/// takes. Build one from a trainer's vectors with [`OwnedBatch::new`] and
/// [`OwnedBatch::with_layout`] (a [`crate::LayoutBuilder`]'s output), or read one from a file
/// with [`crate::io::read_input`] (then the logits and targets are viewed in place in the
/// memory-mapped file where aligned, see [`Elements`], and the batch keeps the file mapped while
/// it lives).
#[derive(Debug, Clone, PartialEq)]
pub struct OwnedBatch {
    pub rows: usize,
    pub vocab: usize,
    /// `[rows × vocab]` row-major.
    pub real: LogitBuf,
    /// `[rows × vocab]` row-major, the same dtype as `real`.
    pub masked: LogitBuf,
    /// `[rows]` realised token ids.
    pub targets: Elements<i64>,
    pub turns: Option<TurnBuf>,
    /// Needs `turns`.
    pub trajectories: Option<TrajectoryBuf>,
    /// `[T]` first credited token of each turn (see [`Batch::credit_start`]); needs
    /// `trajectories`.
    pub credit_start: Option<Vec<u32>>,
    /// L of the padded `[B, L]` token output (see [`Batch::padding`]); `None`: not asked for.
    pub pad_width: Option<u32>,
    /// `[B]` each trajectory's first column in the padded output (0 each without); needs
    /// `pad_width`.
    pub pad_offset: Option<Vec<u32>>,
}

impl OwnedBatch {
    /// A batch of rows only from row-major `[N, V]` logits (`Vec<f32>`, `Vec<half::f16>` or
    /// `Vec<half::bf16>`, the same for both) and N targets: N is `targets.len()`. The logits'
    /// lengths and dtypes are checked here.
    pub fn new(
        real: impl Into<LogitBuf>,
        masked: impl Into<LogitBuf>,
        vocab: usize,
        targets: impl Into<Elements<i64>>,
    ) -> Result<Self> {
        let batch = OwnedBatch {
            rows: 0,
            vocab,
            real: real.into(),
            masked: masked.into(),
            targets: targets.into(),
            turns: None,
            trajectories: None,
            credit_start: None,
            pad_width: None,
            pad_offset: None,
        };
        let batch = OwnedBatch { rows: batch.targets.len(), ..batch };
        batch.as_batch()?;
        if batch.real.dtype() != batch.masked.dtype() {
            return Err(Error::DtypeMismatch { real: batch.real.dtype().name(), masked: batch.masked.dtype().name() });
        }
        Ok(batch)
    }

    owned_layout_setters!();

    /// Borrowed views for [`crate::Backend::compute`]. Shapes of the logits are checked here;
    /// layouts and values are checked by the backends (`layout::batch`).
    pub fn as_batch(&self) -> Result<Batch<'_>> {
        let real = Logits::from_data(self.real.as_data(), self.rows, self.vocab)?;
        let masked = Logits::from_data(self.masked.as_data(), self.rows, self.vocab)?;
        let batch = Batch::rows(real, masked, self.targets.as_slice());
        batch.with_owned_layout(&self.turns, &self.trajectories, &self.credit_start, self.pad_width, &self.pad_offset)
    }

    /// Bytes of logits the batch holds (both tensors).
    pub fn logit_bytes(&self) -> usize {
        (self.real.len() + self.masked.len()) * self.real.dtype().size_bytes()
    }
}

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
    pub(crate) fn validate(&self, targets: &[i64]) -> Result<()> {
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
    /// Needs `credit_start` (see [`crate::Batch::padding`]).
    pub padding: Option<Padding<'a>>,
}

impl<'a> HiddenBatch<'a> {
    /// A batch of rows only.
    pub fn rows(tensors: HiddenTensors<'a>, targets: &'a [i64]) -> Self {
        HiddenBatch { tensors, targets, turns: None, trajectories: None, credit_start: None, padding: None }
    }

    layout_setters!();

    /// Checks the targets' length and the layouts against the rows, as
    /// [`Batch::validate`] does for logits; targets' values are checked per row.
    pub fn validate(&self) -> Result<Option<Layout>> {
        if self.targets.len() != self.tensors.rows {
            return Err(Error::shape(format!(
                "HiddenBatch::targets / targets hold {} ids for {} rows of real_hidden",
                self.targets.len(),
                self.tensors.rows
            )));
        }
        crate::data::layout::batch_layout(
            self.tensors.rows,
            self.turns,
            self.trajectories,
            self.credit_start,
            self.padding,
        )
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
    /// L of the padded `[B, L]` token output (see [`Batch::padding`]); `None`: not asked for.
    pub pad_width: Option<u32>,
    /// `[B]` each trajectory's first column in the padded output (0 each without); needs
    /// `pad_width`.
    pub pad_offset: Option<Vec<u32>>,
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
            pad_width: None,
            pad_offset: None,
        };
        batch.as_batch()?;
        Ok(batch)
    }

    owned_layout_setters!();

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
        let batch = HiddenBatch::rows(tensors, self.targets.as_slice());
        batch.with_owned_layout(&self.turns, &self.trajectories, &self.credit_start, self.pad_width, &self.pad_offset)
    }
}
