//! Names one CUDA item of each crate, and the candle adapter, so that `cargo check` type-checks
//! both against the one cudarc (and the one candle-core) they share.

pub fn cuda_backends() -> (
    fn(usize) -> candle_core::Result<candle_core::Device>,
    fn(usize) -> infopo_kernels::Result<infopo_kernels::cuda::CudaBackend>,
) {
    (candle_core::Device::new_cuda, infopo_kernels::cuda::CudaBackend::new)
}

/// The adapter's entry point, with candle's CUDA backend compiled in (`candle` + `cuda`).
pub type ScoreRows = fn(
    &candle_core::Tensor,
    &candle_core::Tensor,
    &candle_core::Tensor,
    &infopo_kernels::Params,
) -> infopo_kernels::Result<candle_core::Tensor>;

pub fn score_rows() -> ScoreRows {
    infopo_kernels::candle::score_rows
}
