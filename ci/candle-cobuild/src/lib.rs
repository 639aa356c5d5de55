//! Names one CUDA item of each crate so that `cargo check` type-checks both against the one
//! cudarc they share.

pub fn cuda_backends() -> (
    fn(usize) -> candle_core::Result<candle_core::Device>,
    fn(usize) -> infopo_kernels::Result<infopo_kernels::cuda::CudaBackend>,
) {
    (candle_core::Device::new_cuda, infopo_kernels::cuda::CudaBackend::new)
}
