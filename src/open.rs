//! Choosing a backend by name: [`open`] and [`BackendKind`].
//!
//! Kept apart from [`crate::backend`] so the dependencies run one way: this module names the
//! backends, the backends implement the trait, and the trait module names no backend.

use crate::backend::Backend;
use crate::error::Result;

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
