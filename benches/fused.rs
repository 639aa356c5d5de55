//! The fused path (hidden states × lm_head over vocabulary chunks, the logits never stored) on
//! the CPU: the float64 reference (`reference::score_hidden`) and the GPU path's computation
//! emulated (`Emulated::score_hidden`: f32 chunk GEMMs, the kernel source in partial-state
//! mode), at small shapes and two chunk sizes. Throughput counts rows.
//! `cargo bench --bench fused`; `infopo bench --fused-linear` times the Qwen-sized shape and
//! measures memory.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::reference::score_hidden;
use infopo_kernels::synth::{hidden_inputs, HiddenSpec};
use infopo_kernels::Params;
use std::time::Duration;

const SPEC: HiddenSpec = HiddenSpec { rows: 32, hidden: 256, vocab: 32_003, seed: 7 };
/// Smaller for the emulator, which costs about 0.2 s per chunk launch (one OS thread per CUDA
/// thread) whatever the chunk holds.
const EMULATED_SPEC: HiddenSpec = HiddenSpec { rows: 16, hidden: 128, vocab: 8192, seed: 7 };
const CHUNKS: [usize; 2] = [1024, 4096];

fn shape(spec: HiddenSpec) -> String {
    format!("N{}xD{}xV{}/bf16", spec.rows, spec.hidden, spec.vocab)
}

fn fused(c: &mut Criterion) {
    let params = Params::default();
    let data = hidden_inputs::<bf16>(SPEC);
    let inputs = data.inputs();
    let mut group = c.benchmark_group(format!("fused/cpu-f64/{}", shape(SPEC)));
    group.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    group.throughput(Throughput::Elements(SPEC.rows as u64));
    for chunk in CHUNKS {
        group.bench_with_input(BenchmarkId::new("chunk", chunk), &chunk, |b, &chunk| {
            b.iter(|| score_hidden(0, &inputs, &data.targets, &params, chunk).expect("valid synthetic inputs"))
        });
    }
    group.finish();

    let data = hidden_inputs::<bf16>(EMULATED_SPEC);
    let inputs = data.inputs();
    let emulator = Emulated::new();
    let mut group = c.benchmark_group(format!("fused/emulated/{}", shape(EMULATED_SPEC)));
    group.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_millis(500));
    group.throughput(Throughput::Elements(EMULATED_SPEC.rows as u64));
    for chunk in CHUNKS {
        group.bench_with_input(BenchmarkId::new("chunk", chunk), &chunk, |b, &chunk| {
            b.iter(|| emulator.score_hidden(0, &inputs, &data.targets, &params, chunk).expect("valid synthetic inputs"))
        });
    }
    group.finish();
}

criterion_group!(benches, fused);
criterion_main!(benches);
