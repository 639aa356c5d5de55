//! The CUDA backend (feature `cuda`; `nccl` for the sharded gather): the kernels through the
//! shared kernel bodies (`cuda_kernel`), partial states, the fused path and the NCCL gather
//! (`cuda_fused`), the device merge (`cuda_merge`). Without the feature this binary is empty.
//!
//! The GPU tests are ignored (a machine without a GPU must pass the suite); run them with
//!
//! ```text
//! NVCC=$(scripts/install-nvcc | tail -1) cargo test --release --features cuda,nccl --test gpu -- --include-ignored
//! ```
//!
//! or on the CPU stand-in of the driver (`.ci/fake-cuda`, `docs/gpu.md`).
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;

mod cuda_fused;
mod cuda_kernel;
mod cuda_merge;
