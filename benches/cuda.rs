//! GPU kernel throughput (feature `cuda`): GB/s of logits read by one fused launch (rows, turns,
//! advantages), inputs resident on the device and rotated so the working set exceeds L2.
//! `cargo bench --features cuda --bench cuda` (skips itself when no GPU is present).
//!
//! `cuda-fused/...`: the fused hidden-state path at N = 4096, D = 4096,
//! V = 151936 bf16 against cuBLAS's two GEMMs alone, timed with CUDA events on the stream:
//! - `gemms-full-bf16-out`: `real · Wᵀ` and `masked · Wᵀ` over the whole vocabulary into bf16
//!   `[N, V]` logits (what a trainer that materialises the logits pays for them; the issue's
//!   baseline for the ≤ 1.15× goal);
//! - `gemms-chunked-f32-out/c`: the fused path's own GEMMs alone (chunks of c ids, f32 out);
//! - `states/c`: the fused path on the device (GEMMs + the kernel per chunk into `[K, N, 8]`
//!   states), no merge;
//! - `outputs/c`: [`CudaBackend::score_hidden_device`] end to end, with today's host merge
//!   (one download of the states; wall clock, since it waits).
//!
//! Chunks from 1024 ids (2 · N · c f32 = 32 MiB of chunk logits at N = 4096, inside an H100's
//! 50 MB L2, so the kernel may read them back from L2) to 16384 (512 MiB).
//! `CUDA_FUSED_ONLY=1` skips the logits benches.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::cublas::{result as blas_result, sys as blas_sys, CudaBlas};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, DeviceRepr};
use half::bf16;
use infopo_kernels::cuda::fused::{cublas_present, DeviceHiddenInputs};
use infopo_kernels::cuda::CudaBackend;
use infopo_kernels::synth::{batch, SynthSpec};
use infopo_kernels::vocab::chunk_ranges;
use infopo_kernels::{LogitElement, Params};
use rayon::prelude::*;
use std::ffi::{c_int, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// More than twice the 50 MB L2 of an H100/H200.
const ROTATION_BYTES: usize = 128 << 20;

fn bench_dtype<T: LogitElement + DeviceRepr>(c: &mut Criterion, gpu: &CudaBackend) {
    let mut group = c.benchmark_group(format!("cuda/{}", T::DTYPE.name()));
    group.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    let s = gpu.stream().clone();
    for &vocab in &[32_000usize, 128_256, 151_936] {
        for &rows in &[16usize, 256, 4096] {
            let data = batch::<T>(SynthSpec { rows, vocab, groups: 4, trajectories_per_group: 8, seed: 11 });
            let host = data.as_batch();
            let layout = host.validate().expect("synthetic layout").expect("has turns");
            let dev_layout = gpu.upload_layout(&layout).expect("upload layout");
            let bytes = host.logit_bytes();
            let copies = ROTATION_BYTES.div_ceil(bytes).clamp(1, 8);
            let upload = |v: &[T]| -> CudaSlice<T> { s.clone_htod(v).expect("upload logits") };
            let inputs: Vec<(CudaSlice<T>, CudaSlice<T>)> =
                (0..copies).map(|_| (upload(&data.real), upload(&data.masked))).collect();
            let targets = s.clone_htod(&data.targets).expect("upload targets");
            group.throughput(Throughput::Bytes(bytes as u64));
            group.bench_function(BenchmarkId::new(format!("V{vocab}"), rows), |b| {
                let mut state = gpu.begin(Some(&dev_layout), &Params::default()).expect("begin");
                let mut row_out = s.alloc_zeros::<f32>(5 * rows).expect("alloc");
                b.iter_custom(|iters| {
                    s.synchronize().expect("sync");
                    let start = Instant::now();
                    for i in 0..iters {
                        let (real, masked) = &inputs[i as usize % copies];
                        state.restart().expect("restart");
                        gpu.score_into(
                            &mut state,
                            &real.as_view(),
                            &masked.as_view(),
                            &targets.as_view(),
                            vocab,
                            true,
                            &mut row_out,
                        )
                        .expect("launch");
                    }
                    s.synchronize().expect("sync");
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

fn cuda(c: &mut Criterion) {
    let gpu = match CudaBackend::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("skipping the CUDA benches: {e}");
            return;
        }
    };
    if std::env::var_os("CUDA_FUSED_ONLY").is_none() {
        bench_dtype::<bf16>(c, &gpu);
        bench_dtype::<f32>(c, &gpu);
    }
    if cublas_present() {
        bench_fused(c, &gpu);
    } else {
        eprintln!("skipping the fused CUDA benches: no cuBLAS library");
    }
}

/// Uniform values in [-scale, scale), bf16, from a counter hash (fast for 600 M elements).
fn uniform_bf16(len: usize, scale: f32, seed: u64) -> Vec<bf16> {
    (0..len)
        .into_par_iter()
        .map(|i| {
            let mut z = (i as u64).wrapping_add(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            bf16::from_f32(((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale)
        })
        .collect()
}

/// `out [n, m]` (row-major, element type of `out_type`) = `hidden [n, d]` · `weight [m, d]`ᵀ,
/// bf16 inputs, fp32 compute: the GEMM the fused path runs per chunk (src/cuda/fused.rs).
#[allow(clippy::too_many_arguments)]
fn gemm_bf16<O: DeviceRepr>(
    blas: &CudaBlas,
    s: &Arc<CudaStream>,
    weight: &CudaView<'_, bf16>,
    hidden: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, O>,
    out_type: blas_sys::cudaDataType_t,
    (m, n, d): (usize, usize, usize),
) {
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (w, _g0) = weight.device_ptr(s);
    let (h, _g1) = hidden.device_ptr(s);
    let (o, _g2) = out.device_ptr_mut(s);
    let bf = blas_sys::cudaDataType_t::CUDA_R_16BF;
    // SAFETY: the buffers hold [m, d], [n, d] and [n, m] elements (allocated so below).
    unsafe {
        blas_result::gemm_ex(
            *blas.handle(),
            blas_sys::cublasOperation_t::CUBLAS_OP_T,
            blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m as c_int,
            n as c_int,
            d as c_int,
            (&alpha) as *const f32 as *const c_void,
            w as *const c_void,
            bf,
            d as c_int,
            h as *const c_void,
            bf,
            d as c_int,
            (&beta) as *const f32 as *const c_void,
            o as *mut c_void,
            out_type,
            m as c_int,
            blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
        )
    }
    .expect("cuBLAS GEMM");
}

/// Seconds of `iters` runs of `work` between two CUDA events on `s`.
fn device_time(s: &Arc<CudaStream>, iters: u64, mut work: impl FnMut()) -> Duration {
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let (start, end) = (s.context().new_event(timing).unwrap(), s.context().new_event(timing).unwrap());
    start.record(s).unwrap();
    for _ in 0..iters {
        work();
    }
    end.record(s).unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 * 1e-3)
}

fn bench_fused(c: &mut Criterion, gpu: &CudaBackend) {
    let (n, d, v) = (4096usize, 4096usize, 151_936usize);
    let s = gpu.stream().clone();
    let real = s.clone_htod(&uniform_bf16(n * d, 1.0, 1)).expect("upload");
    let masked = s.clone_htod(&uniform_bf16(n * d, 1.0, 2)).expect("upload");
    let head = s.clone_htod(&uniform_bf16(v * d, 3.0 / (d as f32).sqrt(), 3)).expect("upload");
    let targets: Vec<i64> = (0..n).map(|r| ((r * 7919) % v) as i64).collect();
    let targets = s.clone_htod(&targets).expect("upload");
    let inputs = DeviceHiddenInputs {
        real_hidden: real.as_view(),
        masked_hidden: masked.as_view(),
        lm_head: head.as_view(),
        rows: n,
        hidden: d,
        vocab: v,
    };
    let params = infopo_kernels::Params::default();
    let blas = CudaBlas::new(s.clone()).expect("cuBLAS handle");
    let mut group = c.benchmark_group("cuda-fused/bf16-N4096-D4096-V151936");
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    // 2 GEMMs of 2·N·D·V flops.
    group.throughput(Throughput::Elements((4 * n * d * v) as u64));
    {
        let mut out = s.alloc_zeros::<bf16>(n * v).expect("alloc [N, V] bf16");
        group.bench_function("gemms-full-bf16-out", |b| {
            b.iter_custom(|iters| {
                device_time(&s, iters, || {
                    for h in [&real, &masked] {
                        let bf = blas_sys::cudaDataType_t::CUDA_R_16BF;
                        gemm_bf16(&blas, &s, &head.as_view(), &h.as_view(), &mut out.as_view_mut(), bf, (v, n, d));
                    }
                })
            })
        });
    }
    for chunk in [1024usize, 2048, 4096, 8192, 16384] {
        let ranges = chunk_ranges(v, chunk);
        {
            let mut out = s.alloc_zeros::<f32>(n * chunk).expect("alloc chunk");
            group.bench_function(BenchmarkId::new("gemms-chunked-f32-out", chunk), |b| {
                b.iter_custom(|iters| {
                    device_time(&s, iters, || {
                        for r in &ranges {
                            let w = head.slice(r.start * d..r.end() * d);
                            for h in [&real, &masked] {
                                let f = blas_sys::cudaDataType_t::CUDA_R_32F;
                                let mut o = out.slice_mut(..n * r.len);
                                gemm_bf16(&blas, &s, &w, &h.as_view(), &mut o, f, (r.len, n, d));
                            }
                        }
                    })
                })
            });
        }
        let mut states = s.alloc_zeros::<f32>(ranges.len() * n * 8).expect("alloc states");
        let t = targets.as_view();
        group.bench_function(BenchmarkId::new("states", chunk), |b| {
            b.iter_custom(|iters| {
                device_time(&s, iters, || {
                    gpu.score_hidden_states(&inputs, &t, &params, chunk, &mut states.as_view_mut()).expect("fused");
                })
            })
        });
        group.bench_function(BenchmarkId::new("outputs", chunk), |b| {
            b.iter_custom(|iters| {
                s.synchronize().expect("sync");
                let start = Instant::now();
                for _ in 0..iters {
                    gpu.score_hidden_device(&inputs, &t, &params, chunk).expect("fused");
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, cuda);
criterion_main!(benches);
