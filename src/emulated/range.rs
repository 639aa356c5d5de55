//! The kernel's partial-state mode on the emulator: the `[rows, 8]` range states a GPU rank
//! computes for its vocabulary shard (the CUDA counterpart is `cuda/range.rs`).

use super::Emulated;
use crate::error::Result;
use crate::launch::{self, KernelArgs};
use crate::math::range::RangeInput;
use crate::params::Params;

impl Emulated {
    /// The kernel source in partial-state mode, emulated on CPU threads by this emulator (the launch a
    /// GPU rank makes for its shard, with the emulator's launch shape and concurrency: serial, or
    /// several blocks at once as [`crate::emulated::Emulated::concurrent`] sets): `[rows, 8]` f32 in
    /// the kernel's units, for [`crate::vocab::RangeStates::from_kernel`] with the same `params`.
    pub fn range_states(&self, input: &RangeInput<'_>, targets: &[i64], params: &Params) -> Result<Vec<f32>> {
        input.validate(targets, params)?;
        let rows = targets.len();
        let mut out = vec![0f32; rows * launch::RANGE_STATE_FLOATS];
        if rows == 0 {
            return Ok(out);
        }
        if input.range.len == 0 {
            // Nothing to launch over: the empty state, no target.
            for o in out.chunks_exact_mut(launch::RANGE_STATE_FLOATS) {
                o.copy_from_slice(&launch::EMPTY_RANGE_STATE);
            }
            return Ok(out);
        }
        let dtype = input.real.dtype();
        let shape = self.shape(rows, input.range.len, dtype);
        let mut partials = vec![0f32; launch::partials_len(rows, shape.splits)];
        let mut row_tickets = vec![0u32; rows];
        let mut grid_ticket = 0u32;
        let mut error_word = 0u64;
        let offset = input.first_col * dtype.size_bytes();
        let a = KernelArgs {
            real: input.real.data().as_bytes()[offset..].as_ptr().cast(),
            masked: input.masked.data().as_bytes()[offset..].as_ptr().cast(),
            targets: targets.as_ptr(),
            error_word: &mut error_word,
            partials: partials.as_mut_ptr(),
            row_tickets: row_tickets.as_mut_ptr(),
            grid_ticket: &mut grid_ticket,
            state_out: out.as_mut_ptr(),
            row_stride: input.real.vocab() as i64,
            vocab_start: input.range.start as i64,
            ..KernelArgs::new(params, &shape, rows, input.range.len, 0, false)
        };
        // SAFETY: `real`/`masked` point at column `first_col` of row 0 and rows are `row_stride`
        // apart, so every read (rows × `range.len` columns) is inside the validated logits; the other
        // buffers have the sizes kernels/args.h states for partial-state mode (no row_out, no turns).
        // The call returns after the emulated grid has finished.
        unsafe { self.launch(&a, dtype, &shape) }
        debug_assert!(error_word == 0 && grid_ticket == 0 && row_tickets.iter().all(|&t| t == 0));
        Ok(out)
    }
}
