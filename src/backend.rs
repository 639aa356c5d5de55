//! The backend abstraction: every backend takes the same inputs and returns the same outputs.

use crate::batch::{Batch, Output, RowOutputs};
use crate::error::Result;
use crate::logits::Logits;
use crate::params::Params;

/// A way to compute the InfoPO contract (`docs/contract.md`).
pub trait Backend: Send + Sync {
    /// Short name used by the CLI (`cpu`, `emulated`, `cuda`).
    fn name(&self) -> &'static str;

    /// The one-call form: rows, turns and advantages of a whole batch.
    fn compute(&self, batch: &Batch<'_>, params: &Params) -> Result<Output> {
        self.compute_micro_batched(batch, params, &[])
    }

    /// Like [`Backend::compute`], but the rows go through in micro-batches (one kernel launch
    /// each on the kernel backends): `cuts` are the increasing row indices where a new
    /// micro-batch starts. Per-turn sums are carried across micro-batches (a turn may span a
    /// cut) and the last one computes the advantages, so the result equals one batch up to the
    /// rounding of the f64 per-turn sums.
    fn compute_micro_batched(&self, batch: &Batch<'_>, params: &Params, cuts: &[usize]) -> Result<Output>;

    /// Per-row outputs only (stage one of the two-stage form).
    fn score_rows(&self, real: Logits<'_>, masked: Logits<'_>, targets: &[i64], params: &Params) -> Result<RowOutputs> {
        Ok(self.compute(&Batch::rows(real, masked, targets), params)?.rows)
    }
}

/// Which backend to use, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// CUDA when a device is present (and the crate was built with `cuda`), else the CPU.
    Auto,
    Cpu,
    Emulated,
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "emulated" => Ok(BackendKind::Emulated),
            "cuda" => Ok(BackendKind::Cuda),
            _ => Err(format!("unknown backend `{s}` (expected auto, cpu, emulated or cuda)")),
        }
    }
}

/// Opens a backend by kind. `Auto` never fails: it falls back to the CPU.
pub fn open(kind: BackendKind) -> Result<Box<dyn Backend>> {
    match kind {
        BackendKind::Cpu => Ok(Box::new(crate::cpu::Cpu)),
        BackendKind::Auto => {
            #[cfg(feature = "cuda")]
            if let Ok(cuda) = crate::cuda::CudaBackend::new(0) {
                return Ok(Box::new(cuda));
            }
            Ok(Box::new(crate::cpu::Cpu))
        }
        BackendKind::Emulated => {
            #[cfg(feature = "emulator")]
            return Ok(Box::new(crate::emulated::Emulated::new()));
            #[cfg(not(feature = "emulator"))]
            Err(crate::Error::BackendUnavailable {
                backend: "emulated",
                why: "this build has no emulated kernel (rebuild with --features emulator)".into(),
            })
        }
        BackendKind::Cuda => {
            #[cfg(feature = "cuda")]
            return Ok(Box::new(crate::cuda::CudaBackend::new(0)?));
            #[cfg(not(feature = "cuda"))]
            Err(crate::Error::BackendUnavailable {
                backend: "cuda",
                why: "this build has no CUDA kernels (rebuild with --features cuda)".into(),
            })
        }
    }
}
