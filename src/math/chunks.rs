//! InfoPO from hidden states and the lm_head weight, the logits never stored (CPU reference):
//! logits = hidden · lm_headᵀ (then ÷ τs as always) are computed in float64 over vocabulary
//! chunks of `chunk` token ids with the `gemm` crate, each chunk folded into the row states
//! ([`crate::math::range::RangeFold`], the machinery of vocabulary ranges) and dropped.
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

use crate::data::{HiddenInputs, HiddenTensors, LogitElement};
use crate::error::{Error, Result};
use crate::math::range::{chunk_ranges, RangeFold, RangeStates, VocabRange};
use crate::math::row::{scaled_logit_f64, RowValues};
use crate::params::Params;
use half::{bf16, f16};
use rayon::prelude::*;

/// Token ids per chunk when the caller has no preference: 2·N·4096 f64 of chunk logits.
pub const DEFAULT_CHUNK: usize = 4096;

/// Runs `$body` with `$inputs` bound to the typed [`HiddenInputs`] of a [`HiddenTensors`].
macro_rules! with_inputs {
    ($tensors:expr, |$inputs:ident| $body:expr) => {{
        let t: &HiddenTensors<'_> = $tensors;
        match t.dtype() {
            $crate::data::Dtype::F32 => t.typed::<f32>().and_then(|$inputs| $body),
            $crate::data::Dtype::F16 => t.typed::<f16>().and_then(|$inputs| $body),
            $crate::data::Dtype::BF16 => t.typed::<bf16>().and_then(|$inputs| $body),
        }
    }};
}
#[cfg(feature = "emulator")]
pub(crate) use with_inputs;

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

/// Every row's values from hidden states (contract §2 on logits = hidden · lm_headᵀ, ÷ `params`'
/// τs), computed over vocabulary chunks of `chunk` token ids (≥ 1): the same values, to f64
/// rounding, as the float64 reference on the materialised logits ([`crate::reference::score`]), and
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

/// An element type the chunk GEMM runs in: f64 (the reference) or f32 (the GPU's accumulate).
pub(crate) trait GemmElement: Copy + Send + Sync + 'static {
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
pub(crate) fn fold_chunks<T: LogitElement, E: GemmElement>(
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
pub(crate) fn for_each_chunk<T: LogitElement, E: GemmElement>(
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
    for range in chunk_ranges(v, chunk) {
        let (start, len) = (range.start, range.len);
        let w = &mut weight[..len * d];
        w.par_iter_mut().zip(&inputs.lm_head[start * d..(start + len) * d]).for_each(|(o, &e)| *o = E::from_input(e));
        let (rl, ml) = (&mut real_l[..n * len], &mut masked_l[..n * len]);
        chunk_logits(&real_h, w, rl, n, d, len);
        chunk_logits(&masked_h, w, ml, n, d, len);
        visit(range, rl, ml)?;
    }
    Ok(())
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
