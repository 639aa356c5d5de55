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

use crate::batch::RowOutputs;
use crate::cpu::to_outputs;
use crate::error::{Error, Result};
use crate::logits::LogitElement;
use crate::params::Params;
use crate::partial::{RangeFold, RangeStates, VocabRange};
use crate::state::{scaled_logit_f64, RowValues};
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
        if self.vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        if self.hidden == 0 {
            return Err(Error::shape("hidden width D is 0"));
        }
        let want = |what: &str, len: usize, a: usize, b: usize| -> Result<()> {
            match a.checked_mul(b) {
                Some(n) if n == len => Ok(()),
                _ => Err(Error::shape(format!("{what} holds {len} elements, expected [{a}, {b}]"))),
            }
        };
        want("real_hidden", self.real_hidden.len(), self.rows, self.hidden)?;
        want("masked_hidden", self.masked_hidden.len(), self.rows, self.hidden)?;
        want("lm_head", self.lm_head.len(), self.vocab, self.hidden)?;
        if targets.len() != self.rows {
            return Err(Error::shape(format!("{} targets for {} rows", targets.len(), self.rows)));
        }
        Ok(())
    }
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
    let mut fold = RangeFold::new(n);
    let mut start = 0;
    while start < v {
        let len = c.min(v - start);
        let w = &mut weight[..len * d];
        w.par_iter_mut().zip(&inputs.lm_head[start * d..(start + len) * d]).for_each(|(o, &e)| *o = E::from_input(e));
        let (rl, ml) = (&mut real_l[..n * len], &mut masked_l[..n * len]);
        chunk_logits(&real_h, w, rl, n, d, len);
        chunk_logits(&masked_h, w, ml, n, d, len);
        let range = VocabRange::new(start, len);
        fold.push(&states_of(range, rl, ml)?, targets)?;
        start += len;
    }
    fold.finish(first_row, targets, v)
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
