//! candle tensors in, candle tensors out (feature `candle`).
//!
//! - [`score_rows`]: the per-row outputs of two `[N, V]` logit tensors as one `[5, N]` F32
//!   tensor (rows in the order of [`RowOutputs::NAMES`]);
//! - [`compute`]: a whole batch (rows, turns, trajectories) as a [`BatchOutput`] of tensors;
//!   [`compute_layout`] the same from a [`BatchLayout`] whole (e.g. a [`crate::Conversation`]'s,
//!   credit starts and the padded `[B, L]` output included);
//! - [`score_hidden_rows`] and [`compute_hidden`]: the same from the last hidden states and the
//!   lm_head weight ([`HiddenStates`]), the logits never stored (the fused linear path,
//!   `docs/guide.md`): extra memory O(N·chunk), not O(N·V).
//!
//! Tensors on the CPU run on the float64 reference backend ([`crate::Cpu`]), reading the
//! logits in place. CUDA tensors (this crate built with `cuda` as well, which turns on
//! candle-core's `cuda`) run the kernels on candle's own stream, reading candle's device
//! buffers in place and returning outputs that are candle device buffers: nothing of size N·V
//! is copied. Other devices (Metal) are an [`Error::BackendUnavailable`].
//!
//! # Inputs
//! - `real`, `masked`: `[N, V]`, both F32, F16 or BF16, on the same device. Their rows must be
//!   contiguous and adjacent in memory (candle's `is_contiguous`), at any start offset: a row
//!   slice of a bigger tensor (`logits.narrow(0, start, len)`) is read in place. A tensor that
//!   is not (a transpose, a column slice `narrow(1, …)`, a broadcast) is an
//!   [`Error::NotContiguous`] rather than a silent copy of N·V elements; call `.contiguous()`
//!   on it if the copy is what you want.
//! - `targets`: `[N]`, U32 or I64, contiguous, on the logits' device. I64 is read in place;
//!   U32 is widened to I64 first (an N-element copy; the kernels read i64 ids).
//!
//! Every bad input is an [`Error`]: a dtype, shape or device mismatch names both tensors
//! ([`Error::DtypeMismatch`], [`Error::Shape`], [`Error::DeviceMismatch`]), a dtype the entry
//! point does not take is [`Error::UnsupportedDtype`]. Row data errors (a NaN logit, a target
//! outside `0..V`, …) are [`Error::Row`] as on every backend: on CUDA that means each call
//! waits for candle's stream once, to read the batch's error word (8 bytes).
//!
//! # Example
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use infopo_kernels::{candle::score_rows, Params};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let device = Device::Cpu; // or Device::new_cuda(0)? with the `cuda` feature
//! // Logits of 6 rows over a vocabulary of 11 tokens, with and without the user's feedback;
//! // the last 4 rows are a row slice, read in place.
//! let real = Tensor::randn(0f32, 1.0, (6, 11), &device)?.to_dtype(DType::BF16)?;
//! let masked = Tensor::randn(0f32, 1.0, (6, 11), &device)?.to_dtype(DType::BF16)?;
//! let targets = Tensor::new(&[3u32, 1, 4, 1, 5, 9], &device)?;
//! let rows = score_rows(&real.narrow(0, 2, 4)?, &masked.narrow(0, 2, 4)?, &targets.narrow(0, 2, 4)?, &Params::default())?;
//! assert_eq!(rows.dims(), &[5, 4]);
//! let kl = rows.get(infopo_kernels::candle::KL)?; // [4] F32 on `device`
//! assert!(kl.to_vec1::<f32>()?.iter().all(|&x| x >= 0.0));
//! # Ok(())
//! # }
//! ```

use crate::backend::Backend;
use crate::cpu::Cpu;
use crate::data::{
    Advantages, Batch, BatchLayout, Dtype, HiddenBatch, HiddenTensors, LogitData, Logits, Output, Padding, RowOutputs,
    Trajectories, Turns,
};
use crate::error::{Error, Result};
use crate::params::Params;
use candle_core::{DType, Device, DeviceLocation, Layout, Storage, Tensor, WithDType};
use std::borrow::Cow;

#[cfg(feature = "cuda")]
mod cuda;

/// Row of `lse_real` in [`score_rows`]'s output.
pub const LSE_REAL: usize = 0;
/// Row of `lse_masked` in [`score_rows`]'s output.
pub const LSE_MASKED: usize = 1;
/// Row of `log_ratio` in [`score_rows`]'s output.
pub const LOG_RATIO: usize = 2;
/// Row of `kl` in [`score_rows`]'s output.
pub const KL: usize = 3;
/// Row of `entropy_real` in [`score_rows`]'s output.
pub const ENTROPY_REAL: usize = 4;

const LOGIT_DTYPES: &str = "f32, f16 or bf16";
const TARGET_DTYPES: &str = "u32 or i64";

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Candle(e.to_string())
    }
}

/// Per-row outputs of paired logits (contract §2): a `[5, N]` F32 tensor on the inputs'
/// device, rows `lse_real, lse_masked, log_ratio, kl, entropy_real` ([`RowOutputs::NAMES`]).
/// See the [module docs](self) for what the inputs may be.
pub fn score_rows(real: &Tensor, masked: &Tensor, targets: &Tensor, params: &Params) -> Result<Tensor> {
    params.validate()?;
    let shape = check_inputs(real, masked, targets)?;
    match real.device() {
        Device::Cpu => {
            let rows = with_cpu_inputs(real, masked, targets, &shape, |real, masked, targets| {
                Cpu.score_rows(0, real, masked, targets, params)
            })?;
            rows_tensor(&rows, &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(device) => {
            cuda::score_rows(device, targets, &cuda::Logits { real, masked, shape: &shape }, params)
        }
        other => Err(no_backend(other)),
    }
}

/// Everything [`compute`] returns, as tensors on the inputs' device.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BatchOutput {
    /// `[5, N]` F32, as [`score_rows`] returns.
    pub rows: Tensor,
    /// `[T]` F64: the mean estimator of each turn.
    pub turn_info: Tensor,
    /// Present when the batch has trajectories.
    pub advantages: Option<AdvantageTensors>,
}

/// The turn- and trajectory-level outputs (contract §4), F64 like [`Advantages`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdvantageTensors {
    /// `[T]` info_t / credit_t.
    pub turn_intrinsic: Tensor,
    /// `[T]` norm_t.
    pub turn_intrinsic_norm: Tensor,
    /// `[T]` bonus_t, added to each credited token of turn t.
    pub turn_bonus: Tensor,
    /// `[B]` outcome advantage, added to every token of trajectory i.
    pub trajectory_advantage: Tensor,
    /// `[B]` sigmoid(−σ_g/τ) of the trajectory's group.
    pub trajectory_gate: Tensor,
    /// `[3]`: outcome_std, intrinsic_std, magnitude_ratio.
    pub batch_stats: Tensor,
    /// `[M]` per-token advantage (M = Σ trajectory tokens, trajectory-major), present when
    /// [`compute`] was given credit starts.
    pub token_advantage: Option<Tensor>,
    /// `[B, L]` the padded token output ([`Advantages::padded_advantage`]), present when the
    /// layout asks for it ([`BatchLayout::with_padding`], [`compute_layout`]).
    pub padded_advantage: Option<Tensor>,
}

impl BatchOutput {
    /// The same outputs as host data, in the crate's [`Output`] (a copy; waits for the device).
    pub fn to_output(&self) -> Result<Output> {
        let f64s = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_vec1::<f64>()?) };
        let rows: Vec<Vec<f32>> = self.rows.to_vec2::<f32>()?;
        let [lse_real, lse_masked, log_ratio, kl, entropy_real]: [Vec<f32>; 5] =
            rows.try_into().map_err(|_| Error::shape("BatchOutput::rows is not [5, N]"))?;
        let advantages = match &self.advantages {
            None => None,
            Some(a) => {
                // The fields are public: an edited tensor is an error, not an index panic.
                let [outcome_std, intrinsic_std, magnitude_ratio]: [f64; 3] =
                    f64s(&a.batch_stats)?.try_into().map_err(|v: Vec<f64>| {
                        Error::shape(format!("BatchOutput batch_stats holds {} values, not 3", v.len()))
                    })?;
                Some(Advantages {
                    turn_intrinsic: f64s(&a.turn_intrinsic)?,
                    turn_intrinsic_norm: f64s(&a.turn_intrinsic_norm)?,
                    turn_bonus: f64s(&a.turn_bonus)?,
                    trajectory_advantage: f64s(&a.trajectory_advantage)?,
                    trajectory_gate: f64s(&a.trajectory_gate)?,
                    outcome_std,
                    intrinsic_std,
                    magnitude_ratio,
                    token_advantage: a.token_advantage.as_ref().map(f64s).transpose()?,
                    padded_advantage: a.padded_advantage.as_ref().map(|t| f64s(&t.flatten_all()?)).transpose()?,
                })
            }
        };
        Ok(Output {
            rows: RowOutputs { lse_real, lse_masked, log_ratio, kl, entropy_real },
            turn_info: Some(f64s(&self.turn_info)?),
            advantages,
        })
    }
}

/// A whole batch (contract §1–§4): the logits and targets as for [`score_rows`], the turn
/// layout over their rows and, optionally, the trajectories and their GRPO groups.
///
/// The layout and trajectories are host slices ([`Turns`], [`Trajectories`]), not tensors:
/// they are a trainer's bookkeeping (which rows form which turn, which rollout is in which
/// group, its reward), they are validated and rearranged into per-group lists on the host on
/// every backend, and on CUDA they are a few hundred bytes uploaded on candle's stream.
///
/// `credit_start` (`[T]`, needs trajectories) places each turn's credited tokens in its
/// trajectory's response ([`Batch::credit_start`]); with it the output carries
/// [`AdvantageTensors::token_advantage`], the per-token advantage of the policy loss.
pub fn compute(
    real: &Tensor,
    masked: &Tensor,
    targets: &Tensor,
    turns: Turns<'_>,
    trajectories: Option<Trajectories<'_>>,
    credit_start: Option<&[u32]>,
    params: &Params,
) -> Result<BatchOutput> {
    let layout = CallLayout { turns, trajectories, credit_start, padding: None };
    compute_with(real, masked, targets, layout, params)
}

/// [`compute`] with a [`BatchLayout`] whole: its turns, trajectories, credit starts (a
/// [`crate::Conversation`]'s has them) and padded output ([`BatchLayout::with_padding`]), which
/// [`AdvantageTensors::padded_advantage`] then holds as a `[B, L]` tensor on the logits' device.
pub fn compute_layout(
    real: &Tensor,
    masked: &Tensor,
    targets: &Tensor,
    layout: &BatchLayout,
    params: &Params,
) -> Result<BatchOutput> {
    compute_with(real, masked, targets, CallLayout::of(layout)?, params)
}

/// The layout of one candle call, as [`Batch`] holds it.
#[derive(Debug, Clone, Copy)]
struct CallLayout<'a> {
    turns: Turns<'a>,
    trajectories: Option<Trajectories<'a>>,
    credit_start: Option<&'a [u32]>,
    padding: Option<Padding<'a>>,
}

impl<'a> CallLayout<'a> {
    fn of(layout: &'a BatchLayout) -> Result<Self> {
        Ok(CallLayout {
            turns: layout.turns.as_turns(),
            trajectories: Some(layout.trajectories.as_trajectories()),
            credit_start: layout.credit_start.as_deref(),
            padding: layout.padding()?,
        })
    }
}

fn compute_with(
    real: &Tensor,
    masked: &Tensor,
    targets: &Tensor,
    layout: CallLayout<'_>,
    params: &Params,
) -> Result<BatchOutput> {
    params.validate()?;
    let shape = check_inputs(real, masked, targets)?;
    match real.device() {
        Device::Cpu => {
            let out = with_cpu_inputs(real, masked, targets, &shape, |real, masked, targets| {
                let mut batch = Batch::rows(real, masked, targets).with_turns(layout.turns);
                batch.trajectories = layout.trajectories;
                batch.credit_start = layout.credit_start;
                batch.padding = layout.padding;
                Cpu.compute(&batch, params)
            })?;
            output_tensors(&out, &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(device) => {
            let inputs = cuda::Logits { real, masked, shape: &shape };
            cuda::compute(device, targets, &inputs, layout, params)
        }
        other => Err(no_backend(other)),
    }
}

/// The checked geometry of a call.
struct InputShape {
    rows: usize,
    vocab: usize,
    dtype: Dtype,
}

fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

fn no_backend(device: &Device) -> Error {
    match device {
        Device::Cuda(_) => Error::BackendUnavailable {
            backend: "cuda",
            why: "the tensors are on a CUDA device but this build of infopo-kernels has no CUDA kernels \
                  (enable its `cuda` feature, or move the tensors to the CPU)"
                .into(),
        },
        other => Error::BackendUnavailable {
            backend: "candle",
            why: format!("infopo-kernels has no kernels for {} tensors (move them to the CPU)", device_name(other)),
        },
    }
}

fn logit_dtype(name: &'static str, t: &Tensor) -> Result<Dtype> {
    match t.dtype() {
        DType::F32 => Ok(Dtype::F32),
        DType::F16 => Ok(Dtype::F16),
        DType::BF16 => Ok(Dtype::BF16),
        other => Err(Error::UnsupportedDtype { tensor: name, dtype: other.as_str().into(), expected: LOGIT_DTYPES }),
    }
}

fn same_device(a: (&'static str, &Tensor), b: (&'static str, &Tensor)) -> Result<()> {
    if a.1.device().same_device(b.1.device()) {
        Ok(())
    } else {
        Err(Error::DeviceMismatch {
            first: a.0,
            first_device: device_name(a.1.device()),
            second: b.0,
            second_device: device_name(b.1.device()),
        })
    }
}

/// The start..end element range of a tensor whose elements are contiguous in its storage.
fn contiguous_range(name: &'static str, layout: &Layout) -> Result<(usize, usize)> {
    layout.contiguous_offsets().ok_or_else(|| Error::NotContiguous {
        tensor: name,
        shape: format!("{:?}", layout.dims()),
        stride: format!("{:?}", layout.stride()),
    })
}

/// Checks dtypes, devices, shapes and memory layout of the three inputs, in that order.
fn check_inputs(real: &Tensor, masked: &Tensor, targets: &Tensor) -> Result<InputShape> {
    let dtype = logit_dtype("real", real)?;
    let masked_dtype = logit_dtype("masked", masked)?;
    if dtype != masked_dtype {
        return Err(Error::DtypeMismatch { real: dtype.name(), masked: masked_dtype.name() });
    }
    if !matches!(targets.dtype(), DType::U32 | DType::I64) {
        return Err(Error::UnsupportedDtype {
            tensor: "targets",
            dtype: targets.dtype().as_str().into(),
            expected: TARGET_DTYPES,
        });
    }
    same_device(("real", real), ("masked", masked))?;
    same_device(("real", real), ("targets", targets))?;
    let &[rows, vocab] = real.dims() else {
        return Err(Error::shape(format!("`real` must be [N, V], got {:?}", real.dims())));
    };
    if masked.dims() != real.dims() {
        return Err(Error::shape(format!("`real` is {:?} but `masked` is {:?}", real.dims(), masked.dims())));
    }
    if targets.dims() != [rows] {
        return Err(Error::shape(format!(
            "`targets` is {:?} but `real` is {:?}: expected targets [{rows}]",
            targets.dims(),
            real.dims()
        )));
    }
    if vocab == 0 {
        return Err(Error::EmptyVocab);
    }
    if rows > u32::MAX as usize {
        return Err(Error::shape(format!("{rows} rows exceed the 2^32 - 1 supported")));
    }
    contiguous_range("real", real.layout())?;
    contiguous_range("masked", masked.layout())?;
    contiguous_range("targets", targets.layout())?;
    Ok(InputShape { rows, vocab, dtype })
}

/// The elements of a CPU tensor, borrowed from its storage at the layout's offset.
fn cpu_elements<'s, T: WithDType>(name: &'static str, storage: &'s Storage, layout: &Layout) -> Result<&'s [T]> {
    let Storage::Cpu(cpu) = storage else {
        return Err(Error::Candle(format!("`{name}` reports the CPU device but its storage is not on the CPU")));
    };
    let (start, end) = contiguous_range(name, layout)?;
    cpu.as_slice::<T>()?
        .get(start..end)
        .ok_or_else(|| Error::Candle(format!("`{name}`'s layout {start}..{end} exceeds its storage")))
}

/// The elements of a checked CPU tensor of a logit dtype, borrowed in place.
fn cpu_data<'s>(name: &'static str, storage: &'s Storage, layout: &Layout, dtype: Dtype) -> Result<LogitData<'s>> {
    Ok(match dtype {
        Dtype::F32 => LogitData::from_slice(cpu_elements::<f32>(name, storage, layout)?),
        Dtype::F16 => LogitData::from_slice(cpu_elements::<half::f16>(name, storage, layout)?),
        Dtype::BF16 => LogitData::from_slice(cpu_elements::<half::bf16>(name, storage, layout)?),
    })
}

fn cpu_logits<'s>(name: &'static str, storage: &'s Storage, layout: &Layout, shape: &InputShape) -> Result<Logits<'s>> {
    Logits::from_data(cpu_data(name, storage, layout, shape.dtype)?, shape.rows, shape.vocab)
}

/// Runs `f` on borrowed views of three checked CPU tensors (targets widened to i64 if U32).
fn with_cpu_inputs<R>(
    real: &Tensor,
    masked: &Tensor,
    targets: &Tensor,
    shape: &InputShape,
    f: impl FnOnce(Logits<'_>, Logits<'_>, &[i64]) -> Result<R>,
) -> Result<R> {
    let (real_storage, real_layout) = real.storage_and_layout();
    let (masked_storage, masked_layout) = masked.storage_and_layout();
    let (targets_storage, targets_layout) = targets.storage_and_layout();
    let real = cpu_logits("real", &real_storage, real_layout, shape)?;
    let masked = cpu_logits("masked", &masked_storage, masked_layout, shape)?;
    let ids = cpu_targets(&targets_storage, targets_layout, targets.dtype())?;
    f(real, masked, &ids)
}

/// The target ids of a checked CPU tensor: I64 borrowed in place, U32 widened (N elements).
fn cpu_targets<'s>(storage: &'s Storage, layout: &Layout, dtype: DType) -> Result<Cow<'s, [i64]>> {
    Ok(match dtype {
        DType::I64 => Cow::Borrowed(cpu_elements::<i64>("targets", storage, layout)?),
        _ => cpu_elements::<u32>("targets", storage, layout)?.iter().map(|&t| t as i64).collect(),
    })
}

/// `[5, N]` F32 from host row outputs.
fn rows_tensor(rows: &RowOutputs, device: &Device) -> Result<Tensor> {
    let n = rows.len();
    let mut all = Vec::with_capacity(5 * n);
    for part in rows.columns() {
        all.extend_from_slice(part);
    }
    Ok(Tensor::from_vec(all, (5, n), device)?)
}

fn output_tensors(out: &Output, device: &Device) -> Result<BatchOutput> {
    let f64s = |v: &[f64]| -> Result<Tensor> { Ok(Tensor::from_slice(v, v.len(), device)?) };
    let advantages = match &out.advantages {
        None => None,
        Some(a) => Some(AdvantageTensors {
            turn_intrinsic: f64s(&a.turn_intrinsic)?,
            turn_intrinsic_norm: f64s(&a.turn_intrinsic_norm)?,
            turn_bonus: f64s(&a.turn_bonus)?,
            trajectory_advantage: f64s(&a.trajectory_advantage)?,
            trajectory_gate: f64s(&a.trajectory_gate)?,
            batch_stats: f64s(&[a.outcome_std, a.intrinsic_std, a.magnitude_ratio])?,
            token_advantage: a.token_advantage.as_deref().map(f64s).transpose()?,
            padded_advantage: match &a.padded_advantage {
                Some(p) => {
                    let b = a.trajectory_advantage.len();
                    Some(Tensor::from_slice(p, (b, p.len() / b.max(1)), device)?)
                }
                None => None,
            },
        }),
    };
    Ok(BatchOutput {
        rows: rows_tensor(&out.rows, device)?,
        turn_info: f64s(out.turn_info.as_deref().unwrap_or_default())?,
        advantages,
    })
}

// ---- Fused linear: hidden states and the lm_head weight instead of logits ----------------

/// The inputs of the fused linear path: logits = hidden · lm_headᵀ (then ÷ τs), computed one
/// vocabulary chunk at a time and never stored.
///
/// - `real_hidden`, `masked_hidden`: `[N, D]`, the model's last hidden states (after its final
///   norm) with and without the user's feedback;
/// - `lm_head`: `[V, D]`, the output projection's weight as candle's `Linear` stores it
///   (`[out, in]`; a tied embedding matrix is the same).
///
/// All three F32, F16 or BF16 (one dtype), on one device, with contiguous rows at any start
/// offset: a row slice (`narrow(0, …)`) of hidden states, or the first V rows of a padded
/// lm_head, is read in place; a transpose or a column slice is an [`Error::NotContiguous`].
#[derive(Debug, Clone, Copy)]
pub struct HiddenStates<'a> {
    pub real_hidden: &'a Tensor,
    pub masked_hidden: &'a Tensor,
    pub lm_head: &'a Tensor,
}

/// [`score_rows`] from hidden states ([`HiddenStates`]): the `[5, N]` F32 row outputs of the
/// logits hidden · lm_headᵀ, computed over vocabulary chunks of `chunk` token ids (≥ 1;
/// [`crate::math::chunks::DEFAULT_CHUNK`] when in doubt) and folded into the row states in vocabulary
/// order, so no `[N, V]` tensor exists. `targets` as for [`score_rows`].
///
/// CPU tensors run [`crate::math::chunks::score_hidden`]: the chunk logits in float64 (the reference),
/// extra memory 8·(2·N·D + chunk·D + 2·N·chunk) bytes. CUDA tensors (feature `cuda`) run the
/// CUDA fused path zero-copy on candle's stream: cuBLAS chunk GEMMs into two `[N, chunk]` f32
/// buffers, the kernel per chunk, then one merge launch (`CudaBackend::score_hidden_batch`);
/// extra device memory 4·(2·N·chunk + 8·K·N) bytes plus cuBLAS's workspace.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use infopo_kernels::candle::{score_hidden_rows, HiddenStates, KL};
/// use infopo_kernels::Params;
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let device = Device::Cpu;
/// // 4 rows of hidden width 16, a vocabulary of 1000 token ids, scored 256 ids at a time.
/// let real_hidden = Tensor::randn(0f32, 1.0, (4, 16), &device)?.to_dtype(DType::BF16)?;
/// let masked_hidden = Tensor::randn(0f32, 1.0, (4, 16), &device)?.to_dtype(DType::BF16)?;
/// let lm_head = (Tensor::randn(0f32, 1.0, (1000, 16), &device)? * 0.25)?.to_dtype(DType::BF16)?;
/// let targets = Tensor::new(&[7u32, 42, 999, 0], &device)?;
/// let hidden = HiddenStates { real_hidden: &real_hidden, masked_hidden: &masked_hidden, lm_head: &lm_head };
/// let rows = score_hidden_rows(&hidden, &targets, &Params::default(), 256)?;
/// assert_eq!(rows.dims(), &[5, 4]);
/// assert!(rows.get(KL)?.to_vec1::<f32>()?.iter().all(|&kl| kl >= 0.0));
/// # Ok(())
/// # }
/// ```
pub fn score_hidden_rows(hidden: &HiddenStates<'_>, targets: &Tensor, params: &Params, chunk: usize) -> Result<Tensor> {
    params.validate()?;
    let shape = check_hidden_inputs(hidden, targets)?;
    match hidden.real_hidden.device() {
        Device::Cpu => {
            let rows = with_cpu_hidden(hidden, targets, &shape, |tensors, ids| {
                Cpu.score_hidden_rows(0, &tensors, ids, params, chunk)
            })?;
            rows_tensor(&rows, &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(device) => {
            cuda::score_rows(device, targets, &cuda::Hidden { h: hidden, shape: &shape, chunk }, params)
        }
        other => Err(no_backend(other)),
    }
}

/// [`compute`] from hidden states ([`HiddenStates`]): the rows as [`score_hidden_rows`]
/// computes them, then the turn means and (with trajectories) the advantages, as the CPU
/// backend's epilogue computes them from the rows' float64 values. `turns`, `trajectories`
/// and `credit_start` as for [`compute`]; the layout is checked before any row is scored, and
/// row errors come before a non-finite turn, as on every backend.
pub fn compute_hidden(
    hidden: &HiddenStates<'_>,
    targets: &Tensor,
    turns: Turns<'_>,
    trajectories: Option<Trajectories<'_>>,
    credit_start: Option<&[u32]>,
    params: &Params,
    chunk: usize,
) -> Result<BatchOutput> {
    let layout = CallLayout { turns, trajectories, credit_start, padding: None };
    compute_hidden_with(hidden, targets, layout, params, chunk)
}

/// [`compute_hidden`] with a [`BatchLayout`] whole, as [`compute_layout`] takes it.
pub fn compute_hidden_layout(
    hidden: &HiddenStates<'_>,
    targets: &Tensor,
    layout: &BatchLayout,
    params: &Params,
    chunk: usize,
) -> Result<BatchOutput> {
    compute_hidden_with(hidden, targets, CallLayout::of(layout)?, params, chunk)
}

fn compute_hidden_with(
    hidden: &HiddenStates<'_>,
    targets: &Tensor,
    layout: CallLayout<'_>,
    params: &Params,
    chunk: usize,
) -> Result<BatchOutput> {
    params.validate()?;
    let shape = check_hidden_inputs(hidden, targets)?;
    match hidden.real_hidden.device() {
        Device::Cpu => {
            let out = with_cpu_hidden(hidden, targets, &shape, |tensors, ids| {
                let batch = HiddenBatch {
                    tensors,
                    targets: ids,
                    turns: Some(layout.turns),
                    trajectories: layout.trajectories,
                    credit_start: layout.credit_start,
                    padding: layout.padding,
                };
                Cpu.compute_hidden(&batch, params, chunk)
            })?;
            output_tensors(&out, &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(device) => {
            let inputs = cuda::Hidden { h: hidden, shape: &shape, chunk };
            cuda::compute(device, targets, &inputs, layout, params)
        }
        other => Err(no_backend(other)),
    }
}

/// The checked geometry of a fused call.
struct HiddenShape {
    rows: usize,
    hidden: usize,
    vocab: usize,
    dtype: Dtype,
}

/// The expected-dtype text of a tensor that must match `real_hidden`'s dtype.
fn same_dtype_as_real_hidden(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F32 => "f32, the dtype of `real_hidden`",
        Dtype::F16 => "f16, the dtype of `real_hidden`",
        Dtype::BF16 => "bf16, the dtype of `real_hidden`",
    }
}

/// Checks dtypes, devices, shapes and memory layout of the fused inputs, in that order (as
/// [`check_inputs`] does for logits).
fn check_hidden_inputs(h: &HiddenStates<'_>, targets: &Tensor) -> Result<HiddenShape> {
    let dtype = logit_dtype("real_hidden", h.real_hidden)?;
    for (name, t) in [("masked_hidden", h.masked_hidden), ("lm_head", h.lm_head)] {
        if logit_dtype(name, t)? != dtype {
            return Err(Error::UnsupportedDtype {
                tensor: name,
                dtype: t.dtype().as_str().into(),
                expected: same_dtype_as_real_hidden(dtype),
            });
        }
    }
    if !matches!(targets.dtype(), DType::U32 | DType::I64) {
        return Err(Error::UnsupportedDtype {
            tensor: "targets",
            dtype: targets.dtype().as_str().into(),
            expected: TARGET_DTYPES,
        });
    }
    same_device(("real_hidden", h.real_hidden), ("masked_hidden", h.masked_hidden))?;
    same_device(("real_hidden", h.real_hidden), ("lm_head", h.lm_head))?;
    same_device(("real_hidden", h.real_hidden), ("targets", targets))?;
    let &[rows, hidden] = h.real_hidden.dims() else {
        return Err(Error::shape(format!("`real_hidden` must be [N, D], got {:?}", h.real_hidden.dims())));
    };
    if h.masked_hidden.dims() != h.real_hidden.dims() {
        return Err(Error::shape(format!(
            "`real_hidden` is {:?} but `masked_hidden` is {:?}",
            h.real_hidden.dims(),
            h.masked_hidden.dims()
        )));
    }
    let &[vocab, head_width] = h.lm_head.dims() else {
        return Err(Error::shape(format!("`lm_head` must be [V, D], got {:?}", h.lm_head.dims())));
    };
    if head_width != hidden {
        return Err(Error::shape(format!(
            "`real_hidden` is {:?} but `lm_head` is {:?}: the hidden widths D differ ({hidden} vs {head_width})",
            h.real_hidden.dims(),
            h.lm_head.dims()
        )));
    }
    if targets.dims() != [rows] {
        return Err(Error::shape(format!(
            "`targets` is {:?} but `real_hidden` is {:?}: expected targets [{rows}]",
            targets.dims(),
            h.real_hidden.dims()
        )));
    }
    if vocab == 0 {
        return Err(Error::EmptyVocab);
    }
    if hidden == 0 {
        return Err(Error::shape("the hidden width D of `real_hidden` and `lm_head` is 0"));
    }
    if rows > u32::MAX as usize {
        return Err(Error::shape(format!("{rows} rows exceed the 2^32 - 1 supported")));
    }
    contiguous_range("real_hidden", h.real_hidden.layout())?;
    contiguous_range("masked_hidden", h.masked_hidden.layout())?;
    contiguous_range("lm_head", h.lm_head.layout())?;
    contiguous_range("targets", targets.layout())?;
    Ok(HiddenShape { rows, hidden, vocab, dtype })
}

/// Runs `f` on the crate's view of three checked CPU tensors (targets widened to i64 if U32).
fn with_cpu_hidden<R>(
    h: &HiddenStates<'_>,
    targets: &Tensor,
    shape: &HiddenShape,
    f: impl FnOnce(HiddenTensors<'_>, &[i64]) -> Result<R>,
) -> Result<R> {
    let (real_storage, real_layout) = h.real_hidden.storage_and_layout();
    let (masked_storage, masked_layout) = h.masked_hidden.storage_and_layout();
    let (head_storage, head_layout) = h.lm_head.storage_and_layout();
    let (targets_storage, targets_layout) = targets.storage_and_layout();
    let tensors = HiddenTensors::new(
        cpu_data("real_hidden", &real_storage, real_layout, shape.dtype)?,
        cpu_data("masked_hidden", &masked_storage, masked_layout, shape.dtype)?,
        cpu_data("lm_head", &head_storage, head_layout, shape.dtype)?,
        shape.rows,
        shape.hidden,
        shape.vocab,
    )?;
    let ids = cpu_targets(&targets_storage, targets_layout, targets.dtype())?;
    f(tensors, &ids)
}
