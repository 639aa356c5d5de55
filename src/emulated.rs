//! The kernel source of `kernels/infopo.cu`, compiled as host C++ against `kernels/emulator.h`
//! (feature `emulator`) and launched on CPU threads, one OS thread per CUDA thread, with the
//! launch shape the GPU would get on an H100 ([`launch_shape`] with 132 SMs).
//!
//! It validates exactly like the CPU backend, fills the same [`KernelArgs`] a CUDA backend
//! fills, and decodes the kernel's error word the same way. Slow (it is a test vehicle), but
//! bitwise deterministic run to run.
//!
//! Two test knobs reach protocol paths a default launch does not:
//! - [`Emulated::concurrent`] runs several blocks at once (each with its own `__shared__`
//!   storage) with seeded random yields at barriers, atomics and fences, so the cross-block
//!   protocols (split-row tickets, the grid ticket electing the epilogue block, self-cleaning
//!   tickets) run in changing interleavings; `scripts/tsan` runs it under ThreadSanitizer.
//!   The default is the serial mode: blocks 0, 1, 2, ... one at a time.
//! - [`Emulated::with_grid_cap`] launches fewer blocks than work items
//!   ([`LaunchShape::with_grid_cap`]), so the kernel's grid-stride loop runs.
//!
//! See `kernels/emulator.h` for the model (and what it cannot show).

use crate::backend::Backend;
use crate::batch::{Advantages, Batch, Output, RowOutputs};
use crate::error::{Error, Result};
use crate::launch::{self, launch_shape, KernelArgs, LaunchShape};
use crate::logits::Dtype;
use crate::params::Params;
use crate::validate;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// How the emulator runs one launch: `InfopoEmulation` of `kernels/emulator.h`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct Emulation {
    blocks_at_once: u32,
    reserved: u32,
    seed: u64,
}

extern "C" {
    fn infopo_emulate_f32(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_f16(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
    fn infopo_emulate_bf16(args: *const KernelArgs, grid: u32, block: u32, opt: *const Emulation);
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
}

/// SMs of the emulated device (an H100 SXM).
pub const EMULATED_SM_COUNT: u32 = 132;

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
        let shape = launch_shape(rows, vocab, dtype, self.sm_count);
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
            reserved: 0,
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
        params.validate()?;
        let layout = validate::batch(batch)?;
        let n = batch.real.rows();
        let v = batch.real.vocab();
        let dtype = batch.real.dtype();
        let bounds = validate::micro_batches(cuts, n)?;

        let t = layout.as_ref().map_or(0, |l| l.turns());
        let groups = layout.as_ref().and_then(|l| l.groups.as_ref());
        let b = groups.map_or(0, |g| g.trajectory_tokens.len());

        let mut rows = RowOutputs::with_len(n);
        let mut error_word = 0u64;
        let mut turn_sum = vec![0f64; t];
        let mut turn_count = vec![0f64; t];
        let mut turn_info = vec![0f64; t];
        let mut turn_intrinsic = vec![0f64; t];
        let mut turn_norm = vec![0f64; t];
        let mut turn_bonus = vec![0f64; t];
        let mut traj_advantage = vec![0f64; b];
        let mut traj_gate = vec![0f64; b];
        let mut scalars = [0f64; 3];
        let credit_start = groups.and_then(|g| g.turn_credit_start.as_ref());
        let mut token_advantage = vec![0f64; credit_start.map_or(0, |_| groups.map_or(0, |g| g.total_tokens as usize))];

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
            let mut row_out = vec![0f32; launch::ROW_OUTPUTS * m];

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
            if let Some(l) = layout.as_ref() {
                a.n_turns = t as i64;
                a.turn_offsets = l.turn_offsets.as_ptr();
                a.turn_trajectory = l.turn_trajectory.as_ptr();
                a.turn_credit = l.turn_credit.as_ptr();
                a.turn_sum = turn_sum.as_mut_ptr();
                a.turn_count = turn_count.as_mut_ptr();
                a.turn_info = turn_info.as_mut_ptr();
            }
            if let Some(g) = groups {
                a.n_traj = b as i64;
                a.n_groups = (g.group_trajectory_offsets.len() - 1) as i64;
                a.trajectory_outcome = g.trajectory_outcome.as_ptr();
                a.trajectory_tokens = g.trajectory_tokens.as_ptr();
                a.group_trajectory_offsets = g.group_trajectory_offsets.as_ptr();
                a.group_trajectories = g.group_trajectories.as_ptr();
                a.group_turn_offsets = g.group_turn_offsets.as_ptr();
                a.group_turns = g.group_turns.as_ptr();
                a.turn_intrinsic = turn_intrinsic.as_mut_ptr();
                a.turn_norm = turn_norm.as_mut_ptr();
                a.turn_bonus = turn_bonus.as_mut_ptr();
                a.traj_advantage = traj_advantage.as_mut_ptr();
                a.traj_gate = traj_gate.as_mut_ptr();
                a.scalars = scalars.as_mut_ptr();
                a.total_tokens = g.total_tokens as f64;
                if let Some(starts) = credit_start {
                    a.turn_credit_start = starts.as_ptr();
                    a.trajectory_token_offsets = g.trajectory_token_offsets.as_ptr();
                    a.token_advantage = token_advantage.as_mut_ptr();
                }
            }
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
        let advantages = groups.map(|_| Advantages {
            turn_intrinsic,
            turn_intrinsic_norm: turn_norm,
            turn_bonus,
            trajectory_advantage: traj_advantage,
            trajectory_gate: traj_gate,
            outcome_std: scalars[0],
            intrinsic_std: scalars[1],
            magnitude_ratio: scalars[2],
            token_advantage: credit_start.map(|_| token_advantage),
        });
        Ok(Output { rows, turn_info: layout.map(|_| turn_info), advantages })
    }
}

impl Backend for Emulated {
    fn name(&self) -> &'static str {
        "emulated"
    }

    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output> {
        self.micro_batched(batch, params, cuts)
    }

    /// f32 chunk GEMMs, then the kernel in partial-state mode per chunk
    /// ([`crate::fused::score_hidden_emulated`]).
    fn score_hidden_rows(
        &self,
        first_row: usize,
        tensors: &crate::fused::HiddenTensors<'_>,
        targets: &[i64],
        params: &Params,
        chunk: usize,
    ) -> Result<RowOutputs> {
        let values = crate::fused::score_hidden_tensors_emulated(self, first_row, tensors, targets, params, chunk)?;
        Ok(crate::cpu::to_outputs(&values))
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
