//! The kernel source of `kernels/infopo.cu`, compiled as host C++ against `kernels/emulator.h`
//! (feature `emulator`) and launched on CPU threads, one OS thread per CUDA thread, with the
//! launch shape the GPU would get on an H100 (`launch::launch_shape` with 132 SMs).
//!
//! It validates exactly like the CPU backend, fills the same `KernelArgs` a CUDA backend
//! fills, and decodes the kernel's error word the same way. Slow (it is a test vehicle), but
//! bitwise deterministic run to run.
//!
//! Besides [`Backend`], [`Emulated::merge_and_finish`] runs the kernel's merge mode: the rows of a
//! batch from the partial states of vocabulary ranges, with turns and the epilogue.
//!
//! Two test knobs reach protocol paths a default launch does not:
//! - [`Emulated::concurrent`] runs several blocks at once (each with its own `__shared__`
//!   storage) with seeded random yields at barriers, atomics and fences, so the cross-block
//!   protocols (split-row tickets, the grid ticket electing the epilogue block, self-cleaning
//!   tickets) run in changing interleavings; `scripts/tsan` runs it under ThreadSanitizer.
//!   The default is the serial mode: blocks 0, 1, 2, ... one at a time.
//! - [`Emulated::with_grid_cap`] launches fewer blocks than work items
//!   (`LaunchShape::with_grid_cap`), so the kernel's grid-stride loop runs.
//!
//! See `kernels/emulator.h` for the model (and what it cannot show).

use crate::backend::Backend;
use crate::data::layout::{self, Layout};
use crate::data::Dtype;
use crate::data::{Advantages, Batch, Output, RowOutputs};
use crate::error::{Error, Result};
use crate::launch::{self, launch_shape, merge_shape, KernelArgs, LaunchShape};
use crate::params::Params;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

mod fused;
mod range;

/// How the emulator runs one launch: `InfopoEmulation` of `kernels/emulator.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Emulation {
    blocks_at_once: u32,
    /// 0: every block (the only value this backend uses; the driver stand-in cuts launches).
    blocks_run: u32,
    seed: u64,
}

extern "C" {
    fn infopo_emulate_f32(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_f16(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_bf16(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_merge(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_tokens(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    #[cfg(test)]
    fn infopo_emulate_max_blocks_at_once() -> u32;
    #[cfg(test)]
    fn infopo_emulate_flushes_subnormals() -> i32;
}

/// # Safety
/// Every pointer of `args` must be valid for the sizes `kernels/args.h` states for the launch;
/// the call returns after the emulated grid has finished.
unsafe fn launch_with(args: &KernelArgs, dtype: Dtype, shape: &LaunchShape, opt: &Emulation) {
    match dtype {
        Dtype::F32 => infopo_emulate_f32(args, shape.grid, shape.threads, opt),
        Dtype::F16 => infopo_emulate_f16(args, shape.grid, shape.threads, opt),
        Dtype::BF16 => infopo_emulate_bf16(args, shape.grid, shape.threads, opt),
    }
    launch_tokens(args, opt);
}

/// The spread variant's second launch after `args`' launch, when it has one (as the CUDA backend
/// enqueues it: `launch::token_launch`).
///
/// # Safety
/// As [`launch_with`], for the launch `args` just ran.
unsafe fn launch_tokens(args: &KernelArgs, opt: &Emulation) {
    if let Some(shape) = launch::token_launch(args) {
        infopo_emulate_tokens(args, shape.grid, shape.threads, opt)
    }
}

/// SMs of the emulated device (an H100 SXM).
pub const EMULATED_SM_COUNT: u32 = 132;

/// Compute capability (×10) of the emulated device, for the decision file's choices: sm_90.
pub const EMULATED_ARCH: u32 = 90;

/// Most blocks [`Emulated::concurrent`] runs at once (`INFOPO_EMU_MAX_BLOCKS_AT_ONCE`: the
/// emulator compiles one copy of the kernel, hence of its `__shared__` storage, per block).
pub const MAX_BLOCKS_AT_ONCE: u32 = 4;

/// The emulated-kernel backend.
#[derive(Debug)]
pub struct Emulated {
    sm_count: u32,
    /// 1 = serial; more = that many blocks at once with random yields.
    blocks_at_once: u32,
    /// Seed of the yields; launch `k` of this backend uses `seed + k`.
    seed: u64,
    launches: AtomicU64,
    /// At most this many blocks per launch (the grid-stride loop covers the rest).
    grid_cap: Option<u32>,
    /// Tickets allocated zeroed once and reused, as on the GPU (the kernel cleans them).
    tickets: Mutex<Tickets>,
}

#[derive(Debug, Default)]
struct Tickets {
    rows: Vec<u32>,
    grid: u32,
}

impl Default for Emulated {
    fn default() -> Self {
        Self::new()
    }
}

impl Emulated {
    pub fn new() -> Self {
        Self::with_sm_count(EMULATED_SM_COUNT)
    }

    /// An emulated device with `sm_count` SMs (changes only the launch shape).
    pub fn with_sm_count(sm_count: u32) -> Self {
        Emulated {
            sm_count,
            blocks_at_once: 1,
            seed: 0,
            launches: AtomicU64::new(0),
            grid_cap: None,
            tickets: Mutex::new(Tickets::default()),
        }
    }

    /// The emulated H100 running `blocks_at_once` blocks at a time (2..=[`MAX_BLOCKS_AT_ONCE`];
    /// 1 is the serial mode), each block's threads yielding at random (seeded by `seed`, a
    /// different stream per launch) at barriers, atomics and fences. The outputs must not
    /// change: the kernel's reductions have a fixed shape whatever order blocks run in.
    pub fn concurrent(blocks_at_once: u32, seed: u64) -> Result<Self> {
        Self::new().with_concurrency(blocks_at_once, seed)
    }

    /// This backend with `blocks_at_once` blocks at a time (see [`Emulated::concurrent`]).
    pub fn with_concurrency(mut self, blocks_at_once: u32, seed: u64) -> Result<Self> {
        if !(1..=MAX_BLOCKS_AT_ONCE).contains(&blocks_at_once) {
            return Err(Error::Param {
                name: "blocks_at_once",
                value: blocks_at_once as f64,
                why: "the emulator runs 1 to 4 blocks at once",
            });
        }
        self.blocks_at_once = blocks_at_once;
        self.seed = seed;
        Ok(self)
    }

    /// This backend launching at most `cap` blocks (at least 1): rows × splits work items
    /// above the cap make the kernel's grid-stride loop run (the GPU launch never caps below
    /// 2^31 − 1 blocks, so only this reaches that loop).
    pub fn with_grid_cap(mut self, cap: u32) -> Self {
        self.grid_cap = Some(cap);
        self
    }

    /// The shape this backend launches for `rows` rows.
    pub fn shape(&self, rows: usize, vocab: usize, dtype: Dtype) -> LaunchShape {
        let shape = launch_shape(rows, vocab, dtype, self.sm_count, EMULATED_ARCH);
        match self.grid_cap {
            Some(cap) => shape.with_grid_cap(cap),
            None => shape,
        }
    }

    /// How this backend runs its next launch: its blocks at once, and its seed plus the number
    /// of launches so far (a different stream of yields per launch).
    fn next_emulation(&self) -> Emulation {
        Emulation {
            blocks_at_once: self.blocks_at_once,
            blocks_run: 0,
            seed: self.seed.wrapping_add(self.launches.fetch_add(1, Ordering::Relaxed)),
        }
    }

    /// Runs one launch of the kernel entry point of `dtype` with `shape` as this backend runs
    /// its launches (serially, or concurrently with its seed), for [`crate::partial`]'s
    /// partial-state mode, which brings its own buffers.
    ///
    /// # Safety
    /// As [`launch_with`].
    pub(crate) unsafe fn launch(&self, args: &KernelArgs, dtype: Dtype, shape: &LaunchShape) {
        launch_with(args, dtype, shape, &self.next_emulation())
    }

    /// See [`Backend::compute_micro_batched`].
    fn micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output> {
        launch::KernelVariant::from_env()?; // an unknown INFOPO_KERNEL_VARIANT: a typed error
        params.validate()?;
        let layout = batch.validate()?;
        let n = batch.real.rows();
        let v = batch.real.vocab();
        let dtype = batch.real.dtype();
        let bounds = layout::micro_batches(cuts, n)?;

        let t = layout.as_ref().map_or(0, |l| l.turns());

        let mut rows = RowOutputs::with_len(n);
        let mut error_word = 0u64;
        let mut bufs = EpilogueBufs::new(layout.as_ref());

        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let launches = bounds.len() - 1;
        for (k, w) in bounds.windows(2).enumerate() {
            let (r0, r1) = (w[0], w[1]);
            let m = r1 - r0;
            let finalize = k + 1 == launches;
            if m == 0 && !(finalize && t > 0) {
                continue;
            }
            let real = batch.real.slice_rows(r0, m)?;
            let masked = batch.masked.slice_rows(r0, m)?;
            let shape = self.shape(m, v, dtype);
            let mut partials = vec![0f32; launch::partials_len(m, shape.splits)];
            if tickets.rows.len() < m {
                tickets.rows.resize(m, 0);
            }
            let mut row_out = vec![0f32; launch::ROW_OUT_FLOATS * m];

            let mut a = KernelArgs {
                real: real.data().as_bytes().as_ptr().cast(),
                masked: masked.data().as_bytes().as_ptr().cast(),
                targets: batch.targets[r0..r1].as_ptr(),
                row_out: row_out.as_mut_ptr(),
                error_word: &mut error_word,
                partials: partials.as_mut_ptr(),
                row_tickets: tickets.rows.as_mut_ptr(),
                grid_ticket: &mut tickets.grid,
                ..KernelArgs::new(params, &shape, m, v, r0, finalize)
            };
            bufs.attach(&mut a, layout.as_ref());
            let opt = self.next_emulation();
            // SAFETY: every pointer is valid for the sizes documented in kernels/args.h for
            // this launch; the call returns after the emulated grid has finished.
            unsafe { launch_with(&a, dtype, &shape, &opt) }
            debug_assert!(tickets.grid == 0 && tickets.rows.iter().all(|&x| x == 0), "tickets not self-cleaned");
            if let Some(fault @ launch::KernelFault::Row { .. }) = launch::decode_error_word(error_word)? {
                return Err(fault.into_error(Some(batch.targets), None));
            }
            for (i, dst) in
                [&mut rows.lse_real, &mut rows.lse_masked, &mut rows.log_ratio, &mut rows.kl, &mut rows.entropy_real]
                    .into_iter()
                    .enumerate()
            {
                dst[r0..r1].copy_from_slice(&row_out[i * m..(i + 1) * m]);
            }
        }

        // A non-finite estimator loses to every row error of the batch: reported after them all.
        if let Some(fault) = launch::decode_error_word(error_word)? {
            return Err(fault.into_error(Some(batch.targets), layout.as_ref().map(|l| &l.turn_offsets[..])));
        }
        Ok(bufs.into_output(rows, layout.as_ref()))
    }

    /// The kernel's merge mode (entry point `infopo_merge`, see `kernels/args.h`): every row's
    /// outputs from the states of `parts` vocabulary ranges that tile `[0, vocab)`, folded on
    /// the (emulated) device in part order, then the turn means and, with a layout that has
    /// trajectories, the epilogue, all in one launch, as the logit path's one launch computes
    /// them.
    ///
    /// `states` is `[parts][rows][8]` f32 (`rows = targets.len()`), part k being the
    /// partial-state output (`state_out`, e.g. [`Emulated::range_states`]) of the
    /// k-th range in vocabulary order, computed with the same `params` (their τs). The ranges
    /// themselves are not passed: the kernel takes each row's target logits from the one part
    /// whose range holds the target, and a target outside `[0, vocab)` is the row error of the
    /// logit path. `layout` (validated, for `rows` rows: [`crate::Layout::new`], with
    /// [`crate::Layout::with_credit_start`] for token advantages) adds turns and advantages.
    /// Errors as [`Backend::compute`]: shapes, parameters, the lowest row error, then a
    /// non-finite turn.
    pub fn merge_and_finish(
        &self,
        states: &[f32],
        parts: usize,
        targets: &[i64],
        vocab: usize,
        layout: Option<&Layout>,
        params: &Params,
    ) -> Result<Output> {
        params.validate()?;
        let rows = targets.len();
        check_merge_input(states.len(), parts, rows, vocab, layout)?;
        let mut out = RowOutputs::with_len(rows);
        let mut bufs = EpilogueBufs::new(layout);
        let turns = layout.map_or(0, |l| l.turns());
        if rows == 0 && turns == 0 {
            return Ok(bufs.into_output(out, layout));
        }
        let shape = merge_shape(rows, vocab, EMULATED_ARCH);
        let mut row_out = vec![0f32; launch::ROW_OUT_FLOATS * rows];
        let mut error_word = 0u64;
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let mut a = KernelArgs {
            targets: targets.as_ptr(),
            row_out: row_out.as_mut_ptr(),
            error_word: &mut error_word,
            grid_ticket: &mut tickets.grid,
            merge_states: states.as_ptr(),
            merge_parts: parts as i64,
            ..KernelArgs::new(params, &shape, rows, vocab, 0, true)
        };
        bufs.attach(&mut a, layout);
        let opt = self.next_emulation();
        // SAFETY: `states` holds parts × rows × 8 f32 and `targets` rows ids (checked above), the
        // row outputs and epilogue buffers have the sizes kernels/args.h states for this launch
        // (EpilogueBufs sizes them from the layout, validated for `rows` rows); merge mode reads
        // no logits, partials or row tickets. The call returns after the emulated grid finished.
        unsafe {
            infopo_emulate_merge(&a, shape.grid, shape.threads, &opt);
            launch_tokens(&a, &opt);
        }
        debug_assert!(tickets.grid == 0, "grid ticket not self-cleaned");
        drop(tickets);
        if let Some(fault) = launch::decode_error_word(error_word)? {
            return Err(fault.into_error(Some(targets), layout.map(|l| &l.turn_offsets[..])));
        }
        for (i, dst) in [&mut out.lse_real, &mut out.lse_masked, &mut out.log_ratio, &mut out.kl, &mut out.entropy_real]
            .into_iter()
            .enumerate()
        {
            dst.copy_from_slice(&row_out[i * rows..(i + 1) * rows]);
        }
        Ok(bufs.into_output(out, layout))
    }
}

/// The checks of [`Emulated::merge_and_finish`]: [`launch::check_merge_states`], and a layout
/// must cover exactly `rows` rows and be consistent ([`layout::layout_consistent`]: the
/// kernel indexes with every offset and id in it and writes through its credited spans).
fn check_merge_input(
    states_len: usize,
    parts: usize,
    rows: usize,
    vocab: usize,
    layout: Option<&Layout>,
) -> Result<()> {
    launch::check_merge_states(states_len, parts, rows, vocab)?;
    if let Some(l) = layout {
        let covered = l.turn_offsets.last().map_or(0, |&o| o as usize);
        if covered != rows {
            return Err(Error::turns(format!("the layout covers {covered} rows, the merge has {rows}")));
        }
        // The emulated kernel indexes host buffers with every offset and id of the layout.
        layout::layout_consistent(l)?;
    }
    Ok(())
}

/// The per-turn and per-trajectory buffers of one batch (carried across its launches) and how
/// they reach a launch's [`KernelArgs`] and the [`Output`].
struct EpilogueBufs {
    turn_sum: Vec<f64>,
    turn_count: Vec<f64>,
    turn_info: Vec<f64>,
    turn_intrinsic: Vec<f64>,
    turn_norm: Vec<f64>,
    turn_bonus: Vec<f64>,
    traj_advantage: Vec<f64>,
    traj_gate: Vec<f64>,
    scalars: [f64; 3],
    token_advantage: Vec<f64>,
    padded_advantage: Vec<f64>,
}

impl EpilogueBufs {
    fn new(layout: Option<&Layout>) -> Self {
        let t = layout.map_or(0, |l| l.turns());
        let groups = layout.and_then(|l| l.groups.as_ref());
        let b = groups.map_or(0, |g| g.trajectory_tokens.len());
        let m = groups.filter(|g| g.turn_credit_start.is_some()).map_or(0, |g| g.total_tokens as usize);
        let padded = groups.and_then(|g| g.pad_width).map_or(0, |w| b * w as usize);
        EpilogueBufs {
            turn_sum: vec![0.0; t],
            turn_count: vec![0.0; t],
            turn_info: vec![0.0; t],
            turn_intrinsic: vec![0.0; t],
            turn_norm: vec![0.0; t],
            turn_bonus: vec![0.0; t],
            traj_advantage: vec![0.0; b],
            traj_gate: vec![0.0; b],
            scalars: [0.0; 3],
            token_advantage: vec![0.0; m],
            padded_advantage: vec![0.0; padded],
        }
    }

    /// Points `a`'s turn and trajectory fields at `layout` and these buffers.
    fn attach(&mut self, a: &mut KernelArgs, layout: Option<&Layout>) {
        let Some(l) = layout else { return };
        a.n_turns = l.turns() as i64;
        a.turn_offsets = l.turn_offsets.as_ptr();
        a.turn_trajectory = l.turn_trajectory.as_ptr();
        a.turn_credit = l.turn_credit.as_ptr();
        a.turn_sum = self.turn_sum.as_mut_ptr();
        a.turn_count = self.turn_count.as_mut_ptr();
        a.turn_info = self.turn_info.as_mut_ptr();
        let Some(g) = l.groups.as_ref() else { return };
        a.n_traj = g.trajectory_tokens.len() as i64;
        a.n_groups = (g.group_trajectory_offsets.len() - 1) as i64;
        a.trajectory_outcome = g.trajectory_outcome.as_ptr();
        a.trajectory_tokens = g.trajectory_tokens.as_ptr();
        a.group_trajectory_offsets = g.group_trajectory_offsets.as_ptr();
        a.group_trajectories = g.group_trajectories.as_ptr();
        a.group_turn_offsets = g.group_turn_offsets.as_ptr();
        a.group_turns = g.group_turns.as_ptr();
        a.turn_intrinsic = self.turn_intrinsic.as_mut_ptr();
        a.turn_norm = self.turn_norm.as_mut_ptr();
        a.turn_bonus = self.turn_bonus.as_mut_ptr();
        a.traj_advantage = self.traj_advantage.as_mut_ptr();
        a.traj_gate = self.traj_gate.as_mut_ptr();
        a.scalars = self.scalars.as_mut_ptr();
        a.total_tokens = g.total_tokens as f64;
        if let Some(starts) = g.turn_credit_start.as_ref() {
            a.turn_credit_start = starts.as_ptr();
            a.trajectory_token_offsets = g.trajectory_token_offsets.as_ptr();
            a.token_advantage = self.token_advantage.as_mut_ptr();
        }
        if let Some(width) = g.pad_width {
            a.padded_advantage = self.padded_advantage.as_mut_ptr();
            a.pad_offset = g.pad_offset.as_ptr();
            a.pad_width = width as i64;
        }
    }

    fn into_output(self, rows: RowOutputs, layout: Option<&Layout>) -> Output {
        let groups = layout.and_then(|l| l.groups.as_ref());
        let advantages = groups.map(|g| Advantages {
            turn_intrinsic: self.turn_intrinsic,
            turn_intrinsic_norm: self.turn_norm,
            turn_bonus: self.turn_bonus,
            trajectory_advantage: self.traj_advantage,
            trajectory_gate: self.traj_gate,
            outcome_std: self.scalars[0],
            intrinsic_std: self.scalars[1],
            magnitude_ratio: self.scalars[2],
            token_advantage: g.turn_credit_start.as_ref().map(|_| self.token_advantage),
            padded_advantage: g.pad_width.map(|_| self.padded_advantage),
        });
        Output { rows, turn_info: layout.map(|_| self.turn_info), advantages }
    }
}

impl Backend for Emulated {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output> {
        self.micro_batched(batch, params, cuts)
    }

    /// The CUDA fused path's computation: f32 chunk GEMMs, the kernel in partial-state mode per
    /// chunk, then the kernel's merge mode with the turns and the epilogue in the same launch
    /// ([`Emulated::compute_hidden_typed`]).
    fn compute_hidden(&self, batch: &crate::data::HiddenBatch<'_>, params: &Params, chunk: usize) -> Result<Output> {
        params.validate()?;
        let layout = batch.validate()?;
        self.compute_hidden_tensors(0, &batch.tensors, batch.targets, layout.as_ref(), params, chunk)
    }

    /// Rows only, through the same device-merge path as [`Backend::compute_hidden`].
    fn score_hidden_rows(
        &self,
        first_row: usize,
        tensors: &crate::data::HiddenTensors<'_>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        self.compute_hidden_tensors(first_row, tensors, targets, None, params, chunk).map(|out| out.rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator's threads flush f32 subnormals like the kernel built with `-ftz=true`
    /// (x86: MXCSR FTZ|DAZ; aarch64: FPCR.FZ; elsewhere not modelled), and leave the calling
    /// thread's mode alone.
    #[test]
    fn emulator_threads_flush_subnormals() {
        // SAFETY: runs a one-block launch of its own; no arguments.
        let flushes = unsafe { infopo_emulate_flushes_subnormals() } != 0;
        assert_eq!(flushes, cfg!(any(target_arch = "x86_64", target_arch = "x86", target_arch = "aarch64")));
        assert!(std::hint::black_box(f32::MIN_POSITIVE) * 0.5 != 0.0, "the caller's thread must not flush");
    }

    #[test]
    fn max_blocks_at_once_matches_the_emulator() {
        // SAFETY: a pure function of a compile-time constant.
        assert_eq!(unsafe { infopo_emulate_max_blocks_at_once() }, MAX_BLOCKS_AT_ONCE);
    }
}
