//! Vocabulary-parallel InfoPO across GPUs (feature `nccl`): each rank holds a contiguous shard
//! of the lm_head (Megatron/vLLM style, [`crate::math::range::shard_ranges`]: `⌈V / P⌉` token ids
//! per rank, the last shard padded), scores its shard into range states — `[N, 8]` from its
//! shard's logits ([`CudaBackend::score_range_into`] with [`RangeColumns::shard`]), or `[K, N, 8]`
//! from the hidden states and its lm_head shard, the logits never stored
//! ([`CudaBackend::score_hidden_shard_states`]) — and
//! [`CudaBackend::gather_merge_shards`] all-gathers the ranks' states into `[P, K, N, 8]` with one
//! NCCL collective on a `cudarc::nccl::Comm` (32 · K · N · P bytes, 1 MiB at N = 4096, P = 8,
//! K = 1) and
//! merges them into every rank's row outputs — the same on every rank, bitwise, since the merge
//! folds the ranges in vocabulary order.
//!
//! ```no_run
//! # use infopo_kernels::cuda::{cudarc, CudaBackend, range::RangeColumns};
//! # use infopo_kernels::{partial::shard_ranges, Params};
//! # fn demo(gpu: &CudaBackend, comm: &cudarc::nccl::Comm, shard_real: cudarc::driver::CudaView<'_, half::bf16>,
//! #        shard_masked: cudarc::driver::CudaView<'_, half::bf16>, targets: cudarc::driver::CudaView<'_, i64>,
//! #        vocab: usize) -> infopo_kernels::Result<()> {
//! let params = Params::default();
//! let (rows, world) = (targets.len(), comm.world_size());
//! let ranges = shard_ranges(vocab, world)?;
//! let width = vocab.div_ceil(world); // every rank's padded shard width
//! let mut local = gpu.stream().alloc_zeros::<f32>(rows * 8).unwrap();
//! let columns = RangeColumns::shard(width, ranges[comm.rank()]);
//! gpu.score_range_into(&shard_real, &shard_masked, &targets, columns, &params, &mut local.as_view_mut())?;
//! // One state per rank (chunk ≥ the shard width); the fused path on an lm_head shard gives K.
//! let outputs = gpu.gather_merge_shards(comm, &local.as_view(), &targets, vocab, width, &params)?;
//! # Ok(()) }
//! ```
//!
//! The merge runs on the device ([`CudaBackend::merge_range_states`]: one launch of the kernel's
//! merge mode over the gathered `[P·K, N, 8]` states, in vocabulary order), then one download of
//! the `[5, N]` row outputs.
//!
//! [`RangeColumns::shard`]: super::range::RangeColumns::shard

use super::{cuda_err, CudaBackend};
use crate::data::RowOutputs;
use crate::error::{Error, Result};
use crate::launch::RANGE_STATE_FLOATS;
use crate::math::range::shard_chunk_ranges;
use crate::params::Params;
use cudarc::driver::{CudaView, CudaViewMut, DeviceSlice};
use cudarc::nccl::Comm;
use std::sync::OnceLock;

/// File names of the NCCL library that cudarc's run-time loader finds on Linux.
const NCCL_LIBRARIES: &[&str] = &["libnccl.so.2", "libnccl.so"];

/// Whether the NCCL library can be loaded. cudarc's `fallback-dynamic-loading` loads it on the
/// first NCCL call (creating a `Comm`) and panics when it is missing: ask this first.
pub fn nccl_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        NCCL_LIBRARIES.iter().any(|name| {
            // SAFETY: loads the NCCL library (its initialisers are the ones any NCCL program
            // runs); the handle is dropped at once (cudarc loads or links it for itself).
            unsafe { libloading::Library::new(*name) }.is_ok()
        })
    })
}

impl CudaBackend {
    /// All-gathers every rank's `[N, 8]` range states (`local`, this rank's; all ranks the same
    /// N) into `gathered` (`[P, N, 8]` f32, slice `p` rank `p`'s), with one NCCL all-gather on
    /// `comm`'s stream, ordered after the work enqueued on this backend's stream and before
    /// the work enqueued on it afterwards (events; nothing waits on the host). `comm` must live
    /// in this backend's CUDA context.
    pub fn all_gather_states(
        &self,
        comm: &Comm,
        local: &CudaView<'_, f32>,
        gathered: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        let world = comm.world_size();
        if local.len() % RANGE_STATE_FLOATS != 0 {
            return Err(Error::shape(format!(
                "{} local state floats are not rows of {RANGE_STATE_FLOATS}",
                local.len()
            )));
        }
        if local.len().checked_mul(world) != Some(gathered.len()) {
            return Err(Error::shape(format!(
                "the gather buffer holds {} f32, needs {world} ranks x {} local f32",
                gathered.len(),
                local.len()
            )));
        }
        self.check_context(&[("local", local.stream()), ("gathered", gathered.stream())])?;
        let ours = self.stream();
        let theirs = comm.stream();
        if theirs.context().cu_ctx() != ours.context().cu_ctx() {
            return Err(Error::Cuda(format!(
                "the NCCL communicator of rank {} lives on CUDA device {}, this backend on device {}",
                comm.rank(),
                comm.ordinal(),
                ours.context().ordinal()
            )));
        }
        let same_stream = *theirs == **ours;
        if !same_stream {
            theirs.join(ours).map_err(cuda_err)?;
        }
        comm.all_gather(local, gathered)
            .map_err(|e| Error::Cuda(format!("NCCL all-gather of the range states (rank {}): {e:?}", comm.rank())))?;
        if !same_stream {
            ours.join(&theirs).map_err(cuda_err)?;
        }
        Ok(())
    }

    /// Vocabulary-parallel row outputs: `local` holds this rank's `[K, N, 8]` states over its
    /// shard `shard_ranges(vocab, P)[rank]` (P = `comm.world_size()`) in the chunks of
    /// [`shard_chunk_ranges`]`(vocab, P, rank, chunk)` — from
    /// [`CudaBackend::score_hidden_shard_states`] with the same `chunk`, or, with
    /// `chunk ≥ ⌈V / P⌉` (K = 1), from one [`CudaBackend::score_range_into`] over the shard's
    /// logits. One all-gather ([`CudaBackend::all_gather_states`]) and the merge of the `P · K`
    /// ranges ([`CudaBackend::merge_range_states`]) give every rank every row's outputs, with
    /// row errors (targets outside `[0, vocab)`, non-finite logits) decided on whole rows.
    /// Waits for the stream (the download of the row outputs).
    ///
    /// Collective: every rank must call it with the same `vocab`, `chunk` and row count. An
    /// argument error found on one rank's own inputs (a `local` of the wrong length, say)
    /// returns before that rank joins the all-gather, and NCCL then waits for it on the other
    /// ranks: check the shapes the same way on every rank, or abort the communicator on error.
    pub fn gather_merge_shards(
        &self,
        comm: &Comm,
        local: &CudaView<'_, f32>,
        targets: &CudaView<'_, i64>,
        vocab: usize,
        chunk: usize,
        params: &Params,
    ) -> Result<RowOutputs> {
        params.validate()?;
        let (rows, world) = (targets.len(), comm.world_size());
        let ranges =
            (0..world).map(|rank| shard_chunk_ranges(vocab, world, rank, chunk)).collect::<Result<Vec<_>>>()?.concat();
        let per_rank = ranges.len() / world.max(1) * rows * RANGE_STATE_FLOATS;
        if local.len() != per_rank {
            return Err(Error::shape(format!(
                "{} local state floats, expected {} chunks x {rows} rows x {RANGE_STATE_FLOATS}",
                local.len(),
                ranges.len() / world.max(1)
            )));
        }
        if rows == 0 {
            let none = self.stream().alloc_zeros::<f32>(1).map_err(cuda_err)?;
            return self.merge_range_states(&none.slice(..0), &ranges, targets, vocab, params);
        }
        let mut gathered = self.stream().alloc_zeros::<f32>(per_rank * world).map_err(cuda_err)?;
        self.all_gather_states(comm, local, &mut gathered.as_view_mut())?;
        self.merge_range_states(&gathered.as_view(), &ranges, targets, vocab, params)
    }
}
