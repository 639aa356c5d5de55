//! What the CUDA and the emulated backend share about launching `kernels/infopo.cu`:
//! the argument block ([`KernelArgs`], the mirror of `kernels/args.h`), the launch shape
//! ([`launch_shape`]), the entry point names and the workspace sizes.
//!
//! # Launching (for a backend)
//!
//! One launch per (micro-)batch of rows: `infopo_<dtype>` (see [`entry_point`]) with
//! `grid = shape.grid` blocks of `shape.threads` threads, no dynamic shared memory, and the
//! [`KernelArgs`] passed **by value** as the only kernel parameter.
//!
//! Buffers (element counts; see also `kernels/args.h`):
//! - `row_out`: `5 * n_rows` f32, written (`row_out[k * n_rows + r]`, k = lse_real, lse_masked,
//!   log_ratio, kl, entropy_real);
//! - `error_word`: 1 u64, **zeroed before the first launch of a batch**; after a launch, a
//!   non-zero word is the batch's first error so far: the lowest row error, else the lowest row
//!   whose estimator is not finite when the batch has trajectories ([`decode_error_word`]);
//! - `partials`: [`partials_len`] f32 of scratch (only read when `splits > 1`);
//! - `row_tickets`: ≥ `n_rows` u32 and `grid_ticket`: 1 u32, **zeroed once when allocated**;
//!   the kernel returns them to zero itself, so keep them across launches (never memset);
//! - `turn_sum`, `turn_count`: `n_turns` f64, **zeroed before the first launch of a batch**,
//!   carried across the micro-batches of a batch (`first_row` = global index of row 0);
//! - outputs `turn_info` `[T]` (every launch with turns), and on the launch with `finalize = 1`:
//!   `turn_intrinsic`, `turn_norm`, `turn_bonus` `[T]`, `traj_advantage`, `traj_gate` `[B]`,
//!   `scalars` `[3]` (outcome_std, intrinsic_std, magnitude_ratio), and `token_advantage` `[M]` f64
//!   when it is not null (then `turn_credit_start` `[T]` and `trajectory_token_offsets` `[B+1]` u64
//!   are read).
//! - merge mode ([`MERGE_ENTRY_POINT`], one entry for every dtype, shape [`merge_shape`]): no
//!   logits, `merge_states` `[merge_parts][n_rows][8]` f32 instead, the rest as above
//!   (`partials` and `row_tickets` unused).
//!
//! A launch with `n_rows = 0` (grid 1) only runs the epilogue (a final micro-batch with no rows).

// The entry-point names and the global-row bound are read by the CUDA backend only; the
// emulator calls the kernel functions directly.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use crate::data::Dtype;
use crate::error::{Error, Result, RowErrorKind};
use crate::math::epilogue::turn_of_row;
use crate::params::{Estimator, GateSource, Params};
use std::ffi::c_void;
use std::ptr;

/// The kernel's argument block: field for field `InfopoArgs` of `kernels/args.h`
/// (see there for each field's meaning).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct KernelArgs {
    pub real: *const c_void,
    pub masked: *const c_void,
    pub targets: *const i64,
    pub row_out: *mut f32,
    pub error_word: *mut u64,
    pub partials: *mut f32,
    pub row_tickets: *mut u32,
    pub grid_ticket: *mut u32,
    pub n_rows: i64,
    pub vocab: i64,
    pub first_row: i64,

    pub n_turns: i64,
    pub turn_offsets: *const u32,
    pub turn_trajectory: *const u32,
    pub turn_credit: *const u32,
    pub turn_sum: *mut f64,
    pub turn_count: *mut f64,
    pub turn_info: *mut f64,

    pub n_traj: i64,
    pub n_groups: i64,
    pub trajectory_outcome: *const f64,
    pub trajectory_tokens: *const u32,
    pub group_trajectory_offsets: *const u32,
    pub group_trajectories: *const u32,
    pub group_turn_offsets: *const u32,
    pub group_turns: *const u32,
    pub turn_intrinsic: *mut f64,
    pub turn_norm: *mut f64,
    pub turn_bonus: *mut f64,
    pub traj_advantage: *mut f64,
    pub traj_gate: *mut f64,
    pub scalars: *mut f64,
    pub total_tokens: f64,
    pub beta: f64,
    pub gate_temperature: f64,
    pub eps: f64,

    pub turn_credit_start: *const u32,
    pub trajectory_token_offsets: *const u64,
    pub token_advantage: *mut f64,

    pub scale: f32,
    pub splits: u32,
    pub estimator: u32,
    pub finalize: u32,
    pub normalize: u32,
    pub gate_source: u32,

    /// Partial-state mode ([`crate::partial`]): non-null = write `n_rows` ×
    /// [`RANGE_STATE_FLOATS`] f32 states instead of the row outputs.
    pub state_out: *mut f32,
    /// Elements between consecutive rows of `real` / `masked`; 0 = `vocab`.
    pub row_stride: i64,
    /// Global token id of column 0 (partial-state mode).
    pub vocab_start: i64,

    /// Merge mode ([`MERGE_ENTRY_POINT`] only): `[merge_parts][n_rows][RANGE_STATE_FLOATS]` f32
    /// range states as partial-state mode writes them, the ranges in vocabulary order.
    pub merge_states: *const f32,
    /// Ranges folded per row (≥ 1).
    pub merge_parts: i64,

    /// The [`KernelVariant`] of this launch ([`KernelVariant::code`]): the emulator and the
    /// driver stand-in run the entry it names; on a GPU the host loads that entry by name
    /// ([`entry_point`]) and the kernel reads it only to leave `token_advantage` to [`token_launch`] (spread).
    pub variant: u32,
    /// 0 (keeps the size a multiple of 8).
    pub variant_reserved: u32,
    /// [`Params::pool_tolerance`].
    pub pool_tolerance: f64,
    /// [`Params::centre_only`] (0/1).
    pub centre_only: u32,
    /// [`Params::intrinsic_only`] (0/1).
    pub intrinsic_only: u32,
    /// `[B × pad_width]` f64 out, or null: the padded token output (needs `token_advantage`).
    pub padded_advantage: *mut f64,
    /// `[B]` each trajectory's first column in `padded_advantage`.
    pub pad_offset: *const u32,
    /// L of `padded_advantage`.
    pub pad_width: i64,
}

impl Default for KernelArgs {
    /// Every pointer null, every count 0, one split.
    fn default() -> Self {
        KernelArgs {
            real: ptr::null(),
            masked: ptr::null(),
            targets: ptr::null(),
            row_out: ptr::null_mut(),
            error_word: ptr::null_mut(),
            partials: ptr::null_mut(),
            row_tickets: ptr::null_mut(),
            grid_ticket: ptr::null_mut(),
            n_rows: 0,
            vocab: 0,
            first_row: 0,
            n_turns: 0,
            turn_offsets: ptr::null(),
            turn_trajectory: ptr::null(),
            turn_credit: ptr::null(),
            turn_sum: ptr::null_mut(),
            turn_count: ptr::null_mut(),
            turn_info: ptr::null_mut(),
            n_traj: 0,
            n_groups: 0,
            trajectory_outcome: ptr::null(),
            trajectory_tokens: ptr::null(),
            group_trajectory_offsets: ptr::null(),
            group_trajectories: ptr::null(),
            group_turn_offsets: ptr::null(),
            group_turns: ptr::null(),
            turn_intrinsic: ptr::null_mut(),
            turn_norm: ptr::null_mut(),
            turn_bonus: ptr::null_mut(),
            traj_advantage: ptr::null_mut(),
            traj_gate: ptr::null_mut(),
            scalars: ptr::null_mut(),
            total_tokens: 0.0,
            beta: 0.0,
            gate_temperature: 0.0,
            eps: 0.0,
            turn_credit_start: ptr::null(),
            trajectory_token_offsets: ptr::null(),
            token_advantage: ptr::null_mut(),
            scale: 0.0,
            splits: 1,
            estimator: 0,
            finalize: 0,
            normalize: 0,
            gate_source: 0,
            state_out: ptr::null_mut(),
            row_stride: 0,
            vocab_start: 0,
            merge_states: ptr::null(),
            merge_parts: 0,
            variant: 0,
            variant_reserved: 0,
            pool_tolerance: 0.0,
            centre_only: 0,
            intrinsic_only: 0,
            padded_advantage: ptr::null_mut(),
            pad_offset: ptr::null(),
            pad_width: 0,
        }
    }
}

impl KernelArgs {
    /// The scalar fields of one launch (shape, row range, parameters); every pointer null and
    /// no turns, for the backend to fill in.
    pub fn new(
        params: &Params,
        shape: &LaunchShape,
        rows: usize,
        vocab: usize,
        first_row: usize,
        finalize: bool,
    ) -> Self {
        KernelArgs {
            n_rows: rows as i64,
            vocab: vocab as i64,
            first_row: first_row as i64,
            scale: scale(params.temperature),
            splits: shape.splits,
            estimator: match params.estimator {
                Estimator::LogRatio => 0,
                Estimator::Kl => 1,
            },
            finalize: finalize as u32,
            normalize: params.normalize as u32,
            gate_source: match params.gate_source {
                GateSource::Outcome => 0,
                GateSource::Intrinsic => 1,
            },
            beta: params.beta,
            gate_temperature: params.gate_temperature,
            eps: params.eps,
            variant: shape.variant.code(),
            pool_tolerance: params.pool_tolerance,
            centre_only: params.centre_only as u32,
            intrinsic_only: params.intrinsic_only as u32,
            ..KernelArgs::default()
        }
    }
}

/// The second launch of [`KernelVariant::Spread`], after a launch with `args` and on the same
/// stream: entry [`TOKENS_ENTRY_POINT`] with the same args, a block of [`MAX_THREADS`] per
/// trajectory; `None` for any other variant, or when `args` writes no token advantages (not the
/// finalising launch, no credit starts, or partial-state mode).
pub fn token_launch(args: &KernelArgs) -> Option<LaunchShape> {
    let writes = args.variant == KernelVariant::Spread.code()
        && args.finalize != 0
        && !args.token_advantage.is_null()
        && args.n_traj > 0
        && args.state_out.is_null();
    writes.then(|| LaunchShape {
        threads: MAX_THREADS,
        splits: 1,
        grid: (args.n_traj as u64).min(i32::MAX as u64) as u32,
        variant: KernelVariant::Spread,
    })
}

/// `log2(e) / temperature`, the kernel's `scale`.
pub fn scale(temperature: f64) -> f32 {
    (std::f64::consts::LOG2_E / temperature) as f32
}

/// Kernel entry point (symbol) of a launch of `dtype` rows under `variant` (a CUDA backend
/// loads every entry and picks per launch, as the emulator does, from [`KernelArgs::variant`]).
pub fn entry_point(dtype: Dtype, variant: KernelVariant) -> &'static str {
    match (dtype, variant) {
        (Dtype::F32, KernelVariant::Ring) => "infopo_f32_ring",
        (Dtype::F16, KernelVariant::Ring) => "infopo_f16_ring",
        (Dtype::BF16, KernelVariant::Ring) => "infopo_bf16_ring",
        (Dtype::F32, _) => "infopo_f32",
        (Dtype::F16, _) => "infopo_f16",
        (Dtype::BF16, KernelVariant::Packed) => "infopo_bf16_packed",
        (Dtype::BF16, KernelVariant::PackedBump) => "infopo_bf16_packed_bump",
        (Dtype::BF16, _) => "infopo_bf16",
    }
}

/// Variants of the kernel, each switchable at launch; [`KernelVariant::Baseline`]
/// (today's kernel) unless `INFOPO_KERNEL_VARIANT` names another. The kernel variants compute
/// the baseline's row states bit for bit on rows without a row error (error rows keep their
/// codes); [`KernelVariant::Waves`] changes only the split count, so its values agree with the
/// baseline's to rounding, as any other launch shape's do. Every suite runs unchanged under
/// each (`.ci/run`, scripts/tsan, the driver stand-in). See kernels/variants.cuh and
/// docs/kernel-notes.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelVariant {
    /// Today's kernel.
    #[default]
    Baseline,
    /// bf16 rows sharing their offset mod 16: packed bf16x2 clamp (`max.NaN.bf16x2` against
    /// −2¹⁰⁰), max and min, no `live` select (entry `infopo_bf16_packed`; f32/f16: baseline).
    Packed,
    /// [`KernelVariant::Packed`] with a 32-bit trip count over bumped pointers and a
    /// blockDim = 256 fast path (entry `infopo_bf16_packed_bump`).
    PackedBump,
    /// Today's kernel with whole-wave split counts for few rows (`launch_shape_of`).
    Waves,
    /// Every dtype, rows sharing their offset mod 16: the chunk streamed through a 3–4 stage
    /// shared-memory ring (`cp.async.bulk` + mbarrier on sm_90, 16-byte `cp.async` on sm_80–89)
    /// while the warps compute (entries `infopo_<dtype>_ring`).
    Ring,
    /// Today's row pass; `token_advantage` written by a second launch, a block per trajectory
    /// (entry `infopo_tokens`, right after the epilogue's launch), instead of by the one block
    /// that runs the epilogue.
    Spread,
}

impl KernelVariant {
    /// Every variant, the baseline first.
    pub const ALL: [KernelVariant; 6] = [
        KernelVariant::Baseline,
        KernelVariant::Packed,
        KernelVariant::PackedBump,
        KernelVariant::Waves,
        KernelVariant::Ring,
        KernelVariant::Spread,
    ];

    /// The name `INFOPO_KERNEL_VARIANT` takes.
    pub fn name(self) -> &'static str {
        match self {
            KernelVariant::Baseline => "baseline",
            KernelVariant::Packed => "packed",
            KernelVariant::PackedBump => "packed-bump",
            KernelVariant::Waves => "waves",
            KernelVariant::Ring => "ring",
            KernelVariant::Spread => "spread",
        }
    }

    /// `INFOPO_VARIANT_*` of kernels/args.h.
    pub fn code(self) -> u32 {
        match self {
            KernelVariant::Baseline => 0,
            KernelVariant::Packed => 1,
            KernelVariant::PackedBump => 2,
            KernelVariant::Waves => 3,
            KernelVariant::Ring => 4,
            KernelVariant::Spread => 5,
        }
    }

    /// The variant of an `INFOPO_VARIANT_*` code ([`KernelVariant::code`]); the baseline for an
    /// unknown code, as the kernel runs it.
    pub fn from_code(code: u32) -> Self {
        KernelVariant::ALL.into_iter().find(|v| v.code() == code).unwrap_or(KernelVariant::Baseline)
    }

    /// The variant named `name` (an empty name is the baseline).
    pub fn parse(name: &str) -> Result<Self> {
        let name = name.trim();
        if name.is_empty() {
            return Ok(KernelVariant::Baseline);
        }
        KernelVariant::ALL.into_iter().find(|v| v.name() == name).ok_or_else(|| Error::BackendUnavailable {
            backend: "kernel",
            why: format!(
                "INFOPO_KERNEL_VARIANT={name:?} names no kernel variant (one of: {})",
                KernelVariant::ALL.map(KernelVariant::name).join(", ")
            ),
        })
    }

    /// The variant `INFOPO_KERNEL_VARIANT` names (read once per process), `None` when it is
    /// unset; an error for an unknown name (the backends return it on their first launch).
    pub fn from_env() -> Result<Option<Self>> {
        static ENV: std::sync::OnceLock<std::result::Result<Option<KernelVariant>, String>> =
            std::sync::OnceLock::new();
        let v = ENV.get_or_init(|| match std::env::var("INFOPO_KERNEL_VARIANT") {
            Ok(name) => KernelVariant::parse(&name).map(Some).map_err(|e| match e {
                Error::BackendUnavailable { why, .. } => why,
                e => e.to_string(),
            }),
            Err(_) => Ok(None),
        });
        v.clone().map_err(|why| Error::BackendUnavailable { backend: "kernel", why })
    }

    /// The variant of one launch of `rows` rows of `dtype` on a device of compute capability
    /// `arch` (×10: 90 for sm_90): the innermost [`KernelVariant::scoped`] one, else the one
    /// `INFOPO_KERNEL_VARIANT` names, else the decision file's choice for (arch, dtype, rows)
    /// (`INFOPO_KERNEL_DECISIONS`, else the crate's results/kernel-variants.json, as
    /// scripts/gpu-variants writes it), else the baseline (also when the variable
    /// names no variant: the backends report that before launching).
    pub fn for_launch(dtype: Dtype, rows: usize, arch: u32) -> Self {
        if let Some(v) = SCOPED_VARIANT.with(|c| c.get()) {
            return v;
        }
        match KernelVariant::from_env() {
            Ok(Some(v)) => v,
            // An epilogue-only launch (0 rows) takes the choice of the fewest rows.
            Ok(None) => {
                decisions().and_then(|json| decided_variant(json, arch, dtype, rows.max(1))).unwrap_or_default()
            }
            Err(_) => KernelVariant::Baseline,
        }
    }

    /// Runs `f` with launches on this thread using `self` (tests comparing variants in one
    /// process; every backend picks the variant per launch).
    pub fn scoped<R>(self, f: impl FnOnce() -> R) -> R {
        let old = SCOPED_VARIANT.with(|c| c.replace(Some(self)));
        struct Restore(Option<KernelVariant>);
        impl Drop for Restore {
            fn drop(&mut self) {
                SCOPED_VARIANT.with(|c| c.set(self.0));
            }
        }
        let _restore = Restore(old);
        f()
    }
}

/// The decision file scripts/gpu-variants writes: `INFOPO_KERNEL_DECISIONS` if set, else this
/// crate's `results/kernel-variants.json`; read at run time, once per process.
pub fn decision_file() -> std::path::PathBuf {
    std::env::var_os("INFOPO_KERNEL_DECISIONS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/results/kernel-variants.json").into())
}

/// The variant a decision file (scripts/gpu_variants.py: `{"arch": "sm_90", "choices":
/// [{"dtype", "rows_min", "rows_max", "variant", ..}, ..]}`) chooses for `dtype` at `rows` rows
/// on a device of compute capability `arch` (×10); `None` when the file was measured on another
/// arch, no choice covers the rows or the name is not a variant. A small scanner, not a JSON
/// parser: the file is machine-written, one flat object per choice.
pub fn decided_variant(json: &str, arch: u32, dtype: Dtype, rows: usize) -> Option<KernelVariant> {
    let (head, choices) = json.split_at(json.find("\"choices\"")?);
    let measured_on = head.split("\"arch\"").nth(1)?.split('"').nth(1)?;
    if measured_on != format!("sm_{arch}") {
        return None;
    }
    choices.split('{').skip(1).find_map(|obj| {
        let obj = obj.split('}').next()?;
        let field = |key: &str| -> Option<&str> {
            let at = obj.find(&format!("\"{key}\""))? + key.len() + 2;
            let v = obj[at..].trim_start().strip_prefix(':')?.trim_start();
            Some(match v.strip_prefix('"') {
                Some(v) => &v[..v.find('"')?],
                None => v.split(|c: char| c == ',' || c.is_whitespace()).next()?,
            })
        };
        let lo: usize = field("rows_min")?.parse().ok()?;
        let hi: usize = field("rows_max")?.parse().ok()?;
        let dtype_ok = field("dtype")? == dtype.name();
        if !dtype_ok || rows < lo || rows > hi {
            return None;
        }
        KernelVariant::parse(field("variant")?).ok()
    })
}

/// The decision file's text, read once per process (`None` when absent).
fn decisions() -> Option<&'static str> {
    static FILE: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    FILE.get_or_init(|| std::fs::read_to_string(decision_file()).ok()).as_deref()
}

thread_local! {
    static SCOPED_VARIANT: std::cell::Cell<Option<KernelVariant>> = const { std::cell::Cell::new(None) };
}

/// The merge-mode entry point (one for every logit dtype: range states are f32).
pub const MERGE_ENTRY_POINT: &str = "infopo_merge";

/// The entry point of [`token_launch`] (one for every dtype and mode).
pub const TOKENS_ENTRY_POINT: &str = "infopo_tokens";

/// All entry points of the fatbin (a CUDA backend loads them all; the unit tests check every
/// variant's entry is one).
pub const ENTRY_POINTS: [&str; 10] = [
    "infopo_f32",
    "infopo_f16",
    "infopo_bf16",
    MERGE_ENTRY_POINT,
    TOKENS_ENTRY_POINT,
    "infopo_bf16_packed",
    "infopo_bf16_packed_bump",
    "infopo_f32_ring",
    "infopo_f16_ring",
    "infopo_bf16_ring",
];

/// The fatbin (SASS for the archs of `INFOPO_CUDA_ARCHS`, PTX for the last), for
/// `cuModuleLoadData` / cudarc `Ptx::from_binary`-style loading.
#[cfg(feature = "cuda")]
pub static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/infopo.fatbin"));

/// Row-state floats per partial in `partials`.
pub const STATE_FLOATS: usize = 6;
/// f32 per row of `state_out` in partial-state mode (`INFOPO_RANGE_STATE_FLOATS`).
pub const RANGE_STATE_FLOATS: usize = 8;
/// The kernel's state of a row over an empty range (no launch covers it): no mass on either
/// side, no target.
pub const EMPTY_RANGE_STATE: [f32; RANGE_STATE_FLOATS] = [-f32::MAX, 0.0, -f32::MAX, 0.0, 0.0, 0.0, f32::NAN, f32::NAN];
/// f32 per row of `row_out` (the five row outputs).
pub const ROW_OUT_FLOATS: usize = 5;
/// Largest block the kernel is compiled for (`__launch_bounds__`).
pub const MAX_THREADS: u32 = 256;
/// A split chunk never has fewer logits than this (per tensor).
pub const MIN_CHUNK: usize = 4096;
/// Most splits per row.
pub const MAX_SPLITS: usize = 1024;
/// Registers per thread the kernel is budgeted for (`__launch_bounds__(256, 3)`).
const REGISTERS: u32 = 85;

/// f32 elements of the `partials` workspace for a launch.
pub fn partials_len(rows: usize, splits: u32) -> usize {
    rows * splits as usize * STATE_FLOATS
}

/// Kernel code of [`KernelFault::NonFiniteEstimator`] (`INFOPO_ERR_ESTIMATOR_NOT_FINITE`).
const CODE_ESTIMATOR_NOT_FINITE: u64 = 8;
/// Bits of the code in an error key (`infopo_error_key` in `kernels/state.cuh`).
const CODE_BITS: u32 = 4;
/// The class bit of an error key: set for code 8, so every row error (class 0) wins over it.
const CLASS_BIT: u32 = 40;
/// Global rows a batch's error word can name (`row · 16` must stay below the class bit): the
/// device API refuses a launch whose rows would reach past it (a batch without a layout has no
/// other bound on the rows of its micro-batches).
pub const MAX_GLOBAL_ROWS: usize = 1 << (CLASS_BIT - CODE_BITS);

/// Checks that a launch of `rows` rows after `first_row` rows of its batch stays within the
/// global rows the error word can name ([`MAX_GLOBAL_ROWS`]).
pub fn check_global_rows(first_row: usize, rows: usize) -> Result<()> {
    if first_row.checked_add(rows).is_none_or(|end| end > MAX_GLOBAL_ROWS) {
        return Err(Error::shape(format!(
            "rows {first_row}..{first_row}+{rows} of one batch go past the {MAX_GLOBAL_ROWS} rows its error word can name"
        )));
    }
    Ok(())
}

/// What a non-zero error word reports (global rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFault {
    /// The batch's first row error (lowest row, then the contract's order).
    Row { row: usize, kind: RowErrorKind },
    /// No row error; `row` is the lowest row whose estimator is not finite in a batch with
    /// trajectories ([`Error::NonFiniteTurn`]).
    NonFiniteEstimator { row: usize },
}

impl KernelFault {
    /// The crate error: `targets` are the batch's host targets (`None` on the device path),
    /// `turn_offsets` the batch's turn CSR (present whenever the kernel can report code 8).
    pub fn into_error(self, targets: Option<&[i64]>, turn_offsets: Option<&[u32]>) -> Error {
        match self {
            KernelFault::Row { row, kind } => {
                Error::Row { row, kind, target: targets.and_then(|t| t.get(row).copied()) }
            }
            KernelFault::NonFiniteEstimator { row } => match turn_offsets {
                Some(offsets) => Error::NonFiniteTurn { turn: turn_of_row(offsets, row), row: Some(row) },
                None => Error::Cuda(format!("kernel reported a non-finite estimator at row {row} without turns")),
            },
        }
    }
}

/// Decodes the error word (`kernels/state.cuh`: atomicMax of `!key`, key = class·2⁴⁰ + row·16 +
/// code): `Ok(None)` for 0, an error for a code the kernel cannot write.
pub fn decode_error_word(word: u64) -> Result<Option<KernelFault>> {
    if word == 0 {
        return Ok(None);
    }
    let key = !word;
    let code = key & ((1 << CODE_BITS) - 1);
    let row = ((key & ((1u64 << CLASS_BIT) - 1)) >> CODE_BITS) as usize;
    let class = key >> CLASS_BIT;
    match (class, code) {
        (1, CODE_ESTIMATOR_NOT_FINITE) => Ok(Some(KernelFault::NonFiniteEstimator { row })),
        (0, c) => match RowErrorKind::from_code(c as u8) {
            Some(kind) => Ok(Some(KernelFault::Row { row, kind })),
            None => Err(Error::Cuda(format!("kernel error word {word:#x}: unknown code {c}"))),
        },
        _ => Err(Error::Cuda(format!("kernel error word {word:#x}: unknown class {class}, code {code}"))),
    }
}

/// Launch geometry of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchShape {
    /// Threads per block (a power of two, 32..=256).
    pub threads: u32,
    /// Blocks per row (each takes a contiguous chunk of the row's 16-byte vectors).
    pub splits: u32,
    /// Blocks of the grid (rows × splits, at most 2^31 − 1: the kernel loops over the rest;
    /// 1 for an epilogue-only launch of 0 rows).
    pub grid: u32,
    /// The kernel variant the shape was made for (the launch's `KernelArgs::variant`).
    pub variant: KernelVariant,
}

impl LaunchShape {
    /// The same work items (threads, splits) on at most `cap` blocks (at least 1): each block
    /// then takes several items through the kernel's grid-stride loop. The emulator uses it to
    /// reach that loop (`Emulated::with_grid_cap`); results must not change.
    #[cfg(feature = "emulator")]
    pub fn with_grid_cap(self, cap: u32) -> Self {
        LaunchShape { grid: self.grid.min(cap.max(1)), ..self }
    }
}

/// The launch shape for `rows` rows of `vocab` logits on a device with `sm_count` SMs (the
/// emulator passes 132, an H100, so it takes the same paths as the GPU).
///
/// - threads: enough for about two 16-byte vectors per thread per row, 32..=256;
/// - splits: 1 when the rows alone give ≥ 2 waves of resident blocks; otherwise the rows are
///   split over blocks to reach 2 waves, but never into chunks of fewer than [`MIN_CHUNK`]
///   logits (nor more than [`MAX_SPLITS`] splits).
/// - variant: [`KernelVariant::for_launch`] on a device of compute capability `arch` (×10).
pub fn launch_shape(rows: usize, vocab: usize, dtype: Dtype, sm_count: u32, arch: u32) -> LaunchShape {
    launch_shape_of(KernelVariant::for_launch(dtype, rows, arch), rows, vocab, dtype, sm_count)
}

/// [`launch_shape`] for a given variant. [`KernelVariant::Waves`]: when the rows are too few
/// for 2 waves, the split count s (1 ≤ s ≤ the baseline's, so never more blocks than its 2
/// waves nor chunks below [`MIN_CHUNK`]) that minimises the time in waves of equal blocks,
/// ⌈rows·s / wave⌉ / s with wave = SMs × resident blocks, the fewest splits on a tie (e.g.
/// 6 splits, 384 blocks, one 97 % wave at 64 rows on 132 SMs, where the baseline's 13 splits
/// make 2.1 waves). Every other variant: the baseline's shape.
pub fn launch_shape_of(variant: KernelVariant, rows: usize, vocab: usize, dtype: Dtype, sm_count: u32) -> LaunchShape {
    let base = LaunchShape { variant, ..baseline_shape(rows, vocab, dtype, sm_count) };
    if variant != KernelVariant::Waves || base.splits == 1 {
        return base;
    }
    let resident = (65536 / (REGISTERS * base.threads)).clamp(1, 32) as usize;
    let wave = sm_count.max(1) as usize * resident;
    let most = base.splits as usize;
    // (waves, splits) of the best so far: waves / splits is the time in units of one row's pass.
    let mut best = (rows.div_ceil(wave), 1usize);
    for s in 2..=most {
        let waves = (rows * s).div_ceil(wave);
        if waves * best.1 < best.0 * s {
            best = (waves, s);
        }
    }
    let splits = best.1;
    LaunchShape {
        threads: base.threads,
        splits: splits as u32,
        grid: rows.saturating_mul(splits).min(i32::MAX as usize) as u32,
        variant,
    }
}

fn baseline_shape(rows: usize, vocab: usize, dtype: Dtype, sm_count: u32) -> LaunchShape {
    let per_vec = 16 / dtype.size_bytes();
    let vectors = vocab.div_ceil(per_vec).max(1);
    let threads = vectors.div_ceil(2).next_power_of_two().clamp(32, MAX_THREADS as usize) as u32;
    if rows == 0 {
        return LaunchShape { threads, splits: 1, grid: 1, variant: KernelVariant::Baseline };
    }
    let resident = (65536 / (REGISTERS * threads)).clamp(1, 32) as usize;
    let target = 2 * sm_count.max(1) as usize * resident;
    let splits = if rows >= target { 1 } else { target.div_ceil(rows).min((vocab / MIN_CHUNK).max(1)).min(MAX_SPLITS) };
    let items = rows.saturating_mul(splits);
    LaunchShape {
        threads,
        splits: splits as u32,
        grid: items.min(i32::MAX as usize) as u32,
        variant: KernelVariant::Baseline,
    }
}

/// The launch shape of a merge-mode launch ([`MERGE_ENTRY_POINT`]) of `rows` rows of a
/// `vocab`-token vocabulary: one block per row (no splits) of the size an unsplit f32 launch of
/// the same rows would use, so the epilogue (whose f64 reduction order depends on the block
/// size) runs in blocks of the same size as the logit path's for any V ≥ 2048.
/// Its variant matters only for the token launch (spread): the decision for f32 rows on `arch`.
pub fn merge_shape(rows: usize, vocab: usize, arch: u32) -> LaunchShape {
    let threads = baseline_shape(rows, vocab, Dtype::F32, 1).threads;
    LaunchShape {
        threads,
        splits: 1,
        grid: rows.clamp(1, i32::MAX as usize) as u32,
        variant: KernelVariant::for_launch(Dtype::F32, rows, arch),
    }
}

/// The shape checks of a merge-mode launch, shared by the emulated and the CUDA backend:
/// `states_len` f32 must be `parts × rows × 8` ([`RANGE_STATE_FLOATS`]), `parts` and `vocab` at
/// least 1, `rows` below 2³².
pub fn check_merge_states(states_len: usize, parts: usize, rows: usize, vocab: usize) -> Result<()> {
    if vocab == 0 {
        return Err(Error::EmptyVocab);
    }
    if parts == 0 {
        return Err(Error::shape("a merge needs the states of at least one vocabulary range"));
    }
    if rows > u32::MAX as usize {
        return Err(Error::shape(format!("{rows} rows exceed the 2^32 - 1 supported")));
    }
    let want = parts.checked_mul(rows).and_then(|x| x.checked_mul(RANGE_STATE_FLOATS));
    if want != Some(states_len) {
        return Err(Error::shape(format!(
            "range states hold {states_len} f32, expected {parts} parts x {rows} rows x {RANGE_STATE_FLOATS}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn merge_state_sizes_that_overflow_are_a_shape_error() {
        assert!(super::check_merge_states(usize::MAX, usize::MAX, 2, 10).is_err(), "overflowing sizes");
    }

    use super::*;

    /// A100, H100 PCIe, H100 SXM / H200, RTX 4090, L4 (58) and L40 (142).
    const SM_COUNTS: [u32; 6] = [108, 114, 132, 128, 58, 142];

    /// The kernel variants whose row pass differs from the baseline's (same launch shape).
    const KERNEL_VARIANTS: [KernelVariant; 4] =
        [KernelVariant::Packed, KernelVariant::PackedBump, KernelVariant::Ring, KernelVariant::Spread];

    fn time_in_waves(s: &LaunchShape, rows: usize, sm: u32) -> f64 {
        let resident = (65536 / (85 * s.threads)).clamp(1, 32) as usize;
        let wave = sm as usize * resident;
        (rows * s.splits as usize).div_ceil(wave) as f64 / s.splits as f64
    }

    #[test]
    fn waves_launch_shape_on_every_supported_gpu() {
        // The issue's example: 64 rows of V = 151936 on 132 SMs, 6 splits in 384 blocks (one wave
        // of 396 blocks, 97 % full) instead of 13 splits in 832 blocks (2.1 waves).
        let s = launch_shape_of(KernelVariant::Waves, 64, 151_936, Dtype::BF16, 132);
        assert_eq!((s.splits, s.grid, s.threads), (6, 384, 256));
        assert_eq!(launch_shape_of(KernelVariant::Baseline, 64, 151_936, Dtype::BF16, 132).splits, 13);
        for sm in SM_COUNTS {
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                for vocab in [1000usize, 32_000, 50_257, 151_936, 262_144] {
                    for rows in (1..=64).chain([100, 127, 200, 300, 500, 512, 700, 1000, 2000, 4096, 100_000]) {
                        let b = launch_shape_of(KernelVariant::Baseline, rows, vocab, dtype, sm);
                        let w = launch_shape_of(KernelVariant::Waves, rows, vocab, dtype, sm);
                        let what = format!("sm={sm} {dtype} V={vocab} N={rows}: baseline {b:?}, waves {w:?}");
                        assert_eq!(w.threads, b.threads, "{what}");
                        assert_eq!(w.grid as usize, rows * w.splits as usize, "{what}");
                        assert!(w.splits >= 1 && w.splits as usize <= MAX_SPLITS, "{what}");
                        assert!(w.splits == 1 || vocab / w.splits as usize >= MIN_CHUNK, "{what}");
                        if b.splits == 1 {
                            assert_eq!(w, LaunchShape { variant: KernelVariant::Waves, ..b }, "{what}");
                        }
                        // Never more waves of work than the baseline, in the model it minimises.
                        assert!(time_in_waves(&w, rows, sm) <= time_in_waves(&b, rows, sm) + 1e-12, "{what}");
                        // Every other variant keeps the baseline's shape.
                        for v in KERNEL_VARIANTS {
                            assert_eq!(
                                launch_shape_of(v, rows, vocab, dtype, sm),
                                LaunchShape { variant: v, ..b },
                                "{what}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn variant_names_and_entry_points() {
        for v in KernelVariant::ALL {
            assert_eq!(KernelVariant::parse(v.name()).unwrap(), v);
            for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
                assert!(ENTRY_POINTS.contains(&entry_point(dtype, v)), "{v:?} {dtype}");
            }
        }
        assert_eq!(KernelVariant::parse("").unwrap(), KernelVariant::Baseline);
        assert!(matches!(KernelVariant::parse("rings"), Err(Error::BackendUnavailable { .. })));
        for (dtype, entry) in
            [(Dtype::F32, "infopo_f32_ring"), (Dtype::F16, "infopo_f16_ring"), (Dtype::BF16, "infopo_bf16_ring")]
        {
            assert_eq!(entry_point(dtype, KernelVariant::Ring), entry);
        }
        assert_eq!(entry_point(Dtype::BF16, KernelVariant::Packed), "infopo_bf16_packed");
        assert_eq!(entry_point(Dtype::F16, KernelVariant::Packed), "infopo_f16");
        // The variant travels in the argument block (the emulator and the stand-in dispatch on it).
        for v in KernelVariant::ALL {
            let shape = v.scoped(|| launch_shape(1, 100, Dtype::BF16, 132, 90));
            assert_eq!(shape.variant, v);
            let a = KernelArgs::new(&Params::default(), &shape, 1, 100, 0, false);
            assert_eq!(a.variant, v.code());
            assert_eq!(KernelVariant::from_code(v.code()), v);
        }
        assert_eq!(KernelVariant::from_code(99), KernelVariant::Baseline);
    }

    /// The spread variant's second launch: only after a finalising launch that writes token
    /// advantages of at least one trajectory, never in partial-state mode; a block per trajectory.
    #[test]
    fn token_launch_only_where_the_epilogue_leaves_tokens() {
        let mut tokens = [0f64; 4];
        let tokens = tokens.as_mut_ptr();
        let writing = |v: KernelVariant| KernelArgs {
            n_traj: 3,
            token_advantage: tokens,
            ..KernelArgs::new(&Params::default(), &launch_shape_of(v, 1, 100, Dtype::BF16, 132), 1, 100, 0, true)
        };
        let s = token_launch(&writing(KernelVariant::Spread)).expect("spread writes tokens in a second launch");
        assert_eq!((s.grid, s.threads, s.splits), (3, MAX_THREADS, 1));
        for v in KernelVariant::ALL.into_iter().filter(|&v| v != KernelVariant::Spread) {
            assert_eq!(token_launch(&writing(v)), None, "{v:?}");
        }
        let base = writing(KernelVariant::Spread);
        assert_eq!(token_launch(&KernelArgs { finalize: 0, ..base }), None);
        assert_eq!(token_launch(&KernelArgs { n_traj: 0, ..base }), None);
        assert_eq!(token_launch(&KernelArgs { token_advantage: ptr::null_mut(), ..base }), None);
        let mut states = [0f32; 8];
        assert_eq!(token_launch(&KernelArgs { state_out: states.as_mut_ptr(), ..base }), None);
    }

    /// The decision file as scripts/gpu_variants.py writes it (its dry run on synthetic timings),
    /// read back by src/launch.rs: the variant per (dtype, N range); nothing outside the ranges, for
    /// another dtype, or for a name that is no variant (the process default is then the baseline).
    #[test]
    fn decision_file_picks_the_variant_per_dtype_and_rows() {
        let json = r#"{
     "format": 1,
     "arch": "sm_90",
     "device": "NVIDIA H200, 9.0, 3201 MHz",
     "vocab": 151936,
     "rule": "fastest variant by median if < 0.98 x baseline, else baseline",
     "choices": [
      {
       "dtype": "bf16",
       "rows_min": 1,
       "rows_max": 255,
       "variant": "waves",
       "measured_at_rows": 64,
       "baseline_ms": 64.0,
       "chosen_ms": 44.352
      },
      {
       "dtype": "bf16",
       "rows_min": 256,
       "rows_max": 2047,
       "variant": "ring",
       "measured_at_rows": 512,
       "baseline_ms": 512.0,
       "chosen_ms": 409.6
      },
      {
       "dtype": "bf16",
       "rows_min": 2048,
       "rows_max": 4611686018427387904,
       "variant": "ring",
       "measured_at_rows": 4096,
       "baseline_ms": 4096.0,
       "chosen_ms": 3276.8
      },
      {
       "dtype": "f32",
       "rows_min": 1,
       "rows_max": 255,
       "variant": "waves",
       "measured_at_rows": 64,
       "baseline_ms": 64.0,
       "chosen_ms": 44.352
      },
      {
       "dtype": "f32",
       "rows_min": 256,
       "rows_max": 2047,
       "variant": "ring",
       "measured_at_rows": 512,
       "baseline_ms": 512.0,
       "chosen_ms": 409.6
      },
      {
       "dtype": "f32",
       "rows_min": 2048,
       "rows_max": 4611686018427387904,
       "variant": "ring",
       "measured_at_rows": 4096,
       "baseline_ms": 4096.0,
       "chosen_ms": 3276.8
      }
     ]
    }"#;
        let d = |dtype, rows| decided_variant(json, 90, dtype, rows);
        assert_eq!(d(Dtype::BF16, 64), Some(KernelVariant::Waves));
        assert_eq!(d(Dtype::BF16, 255), Some(KernelVariant::Waves));
        assert_eq!(d(Dtype::BF16, 256), Some(KernelVariant::Ring));
        assert_eq!(d(Dtype::F32, 100_000), Some(KernelVariant::Ring));
        assert_eq!(d(Dtype::BF16, 0), None);
        assert_eq!(d(Dtype::F16, 512), None);
        assert_eq!(decided_variant(&json.replace("\"ring\"", "\"rung\""), 90, Dtype::BF16, 512), None);
        assert_eq!(decided_variant("{}", 90, Dtype::BF16, 512), None);
        // Measured on an H100/H200: not a choice for an sm_80 or sm_100 device.
        assert_eq!(decided_variant(json, 80, Dtype::BF16, 512), None);
        assert_eq!(decided_variant(json, 100, Dtype::BF16, 64), None);
        assert_eq!(decided_variant(&json.replace("sm_90", "sm_80"), 80, Dtype::BF16, 64), Some(KernelVariant::Waves));
    }

    #[test]
    fn shape_splits_only_few_rows() {
        let s = launch_shape_of(KernelVariant::Baseline, 1, 151_936, Dtype::BF16, 132);
        assert_eq!(s.threads, 256);
        assert_eq!(s.splits, 151_936 / MIN_CHUNK as u32);
        assert_eq!(s.grid, s.splits);
        let s = launch_shape_of(KernelVariant::Baseline, 100_000, 151_936, Dtype::BF16, 132);
        assert_eq!((s.splits, s.grid), (1, 100_000));
        let s = launch_shape_of(KernelVariant::Baseline, 3, 1000, Dtype::F32, 132);
        assert_eq!(s.splits, 1);
        assert_eq!(s.threads, 128);
        let s = launch_shape_of(KernelVariant::Baseline, 1, 7, Dtype::F16, 132);
        assert_eq!((s.threads, s.splits, s.grid), (32, 1, 1));
        let s = launch_shape_of(KernelVariant::Baseline, 0, 7, Dtype::F16, 132);
        assert_eq!(s.grid, 1);
    }

    #[test]
    fn error_word_decodes() {
        assert_eq!(decode_error_word(0).unwrap(), None);
        let row = |row, kind| Some(KernelFault::Row { row, kind });
        assert_eq!(decode_error_word(!(5u64 * 16 + 3)).unwrap(), row(5, RowErrorKind::MaskedNotFinite));
        // Rows beyond 2^32 (global rows of many micro-batches) still decode.
        let big = (1u64 << 33) + 7;
        assert_eq!(decode_error_word(!(big * 16 + 7)).unwrap(), row(big as usize, RowErrorKind::MaskedTargetNegInf));
        // The last global row the word can name decodes as a row error, not as class 1.
        let last = MAX_GLOBAL_ROWS as u64 - 1;
        assert_eq!(
            decode_error_word(!(last * 16 + 1)).unwrap(),
            row(last as usize, RowErrorKind::from_code(1).unwrap())
        );
        assert!(check_global_rows(MAX_GLOBAL_ROWS - 5, 5).is_ok());
        assert!(matches!(check_global_rows(MAX_GLOBAL_ROWS - 5, 6), Err(Error::Shape { .. })));
        assert!(matches!(check_global_rows(usize::MAX, 1), Err(Error::Shape { .. })));
        let est = !((1u64 << 40) + 9 * 16 + 8);
        assert_eq!(decode_error_word(est).unwrap(), Some(KernelFault::NonFiniteEstimator { row: 9 }));
        // The class bit makes any row error (larger !key) win the kernel's atomicMax.
        assert!(!((1u64 << 32) * 16 + 7) > est);
        assert!(decode_error_word(!(3 * 16 + 9)).is_err());
        assert!(decode_error_word(!(3 * 16)).is_err());
        assert!(decode_error_word(!((1u64 << 40) + 3 * 16 + 2)).is_err());
        let offsets = [0u32, 4, 4, 10];
        let e = KernelFault::NonFiniteEstimator { row: 4 }.into_error(None, Some(&offsets));
        assert!(matches!(e, Error::NonFiniteTurn { turn: 2, row: Some(4) }), "{e:?}");
    }

    #[cfg(feature = "emulator")]
    #[test]
    fn args_layout_matches_c() {
        extern "C" {
            fn infopo_args_layout(out: *mut usize, cap: usize) -> usize;
        }
        let mut c = [0usize; 64];
        let n = unsafe { infopo_args_layout(c.as_mut_ptr(), c.len()) };
        use std::mem::{align_of, offset_of, size_of};
        let rust = [
            size_of::<KernelArgs>(),
            align_of::<KernelArgs>(),
            offset_of!(KernelArgs, real),
            offset_of!(KernelArgs, masked),
            offset_of!(KernelArgs, targets),
            offset_of!(KernelArgs, row_out),
            offset_of!(KernelArgs, error_word),
            offset_of!(KernelArgs, partials),
            offset_of!(KernelArgs, row_tickets),
            offset_of!(KernelArgs, grid_ticket),
            offset_of!(KernelArgs, n_rows),
            offset_of!(KernelArgs, vocab),
            offset_of!(KernelArgs, first_row),
            offset_of!(KernelArgs, n_turns),
            offset_of!(KernelArgs, turn_offsets),
            offset_of!(KernelArgs, turn_trajectory),
            offset_of!(KernelArgs, turn_credit),
            offset_of!(KernelArgs, turn_sum),
            offset_of!(KernelArgs, turn_count),
            offset_of!(KernelArgs, turn_info),
            offset_of!(KernelArgs, n_traj),
            offset_of!(KernelArgs, n_groups),
            offset_of!(KernelArgs, trajectory_outcome),
            offset_of!(KernelArgs, trajectory_tokens),
            offset_of!(KernelArgs, group_trajectory_offsets),
            offset_of!(KernelArgs, group_trajectories),
            offset_of!(KernelArgs, group_turn_offsets),
            offset_of!(KernelArgs, group_turns),
            offset_of!(KernelArgs, turn_intrinsic),
            offset_of!(KernelArgs, turn_norm),
            offset_of!(KernelArgs, turn_bonus),
            offset_of!(KernelArgs, traj_advantage),
            offset_of!(KernelArgs, traj_gate),
            offset_of!(KernelArgs, scalars),
            offset_of!(KernelArgs, total_tokens),
            offset_of!(KernelArgs, beta),
            offset_of!(KernelArgs, gate_temperature),
            offset_of!(KernelArgs, eps),
            offset_of!(KernelArgs, turn_credit_start),
            offset_of!(KernelArgs, trajectory_token_offsets),
            offset_of!(KernelArgs, token_advantage),
            offset_of!(KernelArgs, scale),
            offset_of!(KernelArgs, splits),
            offset_of!(KernelArgs, estimator),
            offset_of!(KernelArgs, finalize),
            offset_of!(KernelArgs, normalize),
            offset_of!(KernelArgs, gate_source),
            offset_of!(KernelArgs, state_out),
            offset_of!(KernelArgs, row_stride),
            offset_of!(KernelArgs, vocab_start),
            offset_of!(KernelArgs, merge_states),
            offset_of!(KernelArgs, merge_parts),
            offset_of!(KernelArgs, variant),
            offset_of!(KernelArgs, variant_reserved),
            offset_of!(KernelArgs, pool_tolerance),
            offset_of!(KernelArgs, centre_only),
            offset_of!(KernelArgs, intrinsic_only),
            offset_of!(KernelArgs, padded_advantage),
            offset_of!(KernelArgs, pad_offset),
            offset_of!(KernelArgs, pad_width),
        ];
        assert_eq!(&c[..n], &rust[..]);
    }
}
