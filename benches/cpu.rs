//! CPU path throughput: GB/s of logits read by the full pipeline (rows, turns, advantages).
//! `cargo bench --bench cpu`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use infopo_kernels::synth::{batch, SynthSpec};
use infopo_kernels::{Backend, Cpu, LogitElement, Params};
use std::time::Duration;

fn bench_dtype<T: LogitElement>(c: &mut Criterion, rows: &[usize]) {
    let mut group = c.benchmark_group(format!("cpu/{}", T::DTYPE.name()));
    group.sample_size(10).measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    for &vocab in &[32_000usize, 128_256, 151_936] {
        for &n in rows {
            let data = batch::<T>(SynthSpec { rows: n, vocab, groups: 2, trajectories_per_group: 4, seed: 7 });
            let b = data.as_batch();
            group.throughput(Throughput::Bytes(b.logit_bytes() as u64));
            group.bench_with_input(BenchmarkId::new(format!("V{vocab}"), n), &b, |bench, b| {
                bench.iter(|| Cpu.compute(b, &Params::default()).expect("valid synthetic batch"))
            });
        }
    }
    group.finish();
}

fn cpu(c: &mut Criterion) {
    bench_dtype::<bf16>(c, &[16, 256]);
    bench_dtype::<f32>(c, &[16, 256]);
}

criterion_group!(benches, cpu);
criterion_main!(benches);
