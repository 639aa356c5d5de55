//! GPU kernel throughput (feature `cuda`): GB/s of logits read by one fused launch (rows, turns,
//! advantages), inputs resident on the device and rotated so the working set exceeds L2.
//! `cargo bench --features cuda --bench cuda` (skips itself when no GPU is present).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::driver::{CudaSlice, DeviceRepr};
use half::bf16;
use infopo_kernels::cuda::CudaBackend;
use infopo_kernels::synth::{batch, SynthSpec};
use infopo_kernels::{validate, LogitElement, Params};
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
            let layout = validate::batch(&host).expect("synthetic layout").expect("has turns");
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
    bench_dtype::<bf16>(c, &gpu);
    bench_dtype::<f32>(c, &gpu);
}

criterion_group!(benches, cuda);
criterion_main!(benches);
