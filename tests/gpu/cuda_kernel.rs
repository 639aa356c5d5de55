//! The CUDA kernels on a GPU (feature `cuda`) through the shared kernel test bodies of
//! `tests/common/kernel.rs` (tolerances documented there), plus GPU-only cases: a batch of more
//! than 2^31 elements per tensor and device views at different alignments.
//!
//! The GPU tests are ignored (a machine without a GPU must pass the suite); run them with
//!
//! ```text
//! NVCC=$(scripts/install-nvcc | tail -1) cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::
//! ```
//!
//! `no_driver_is_a_typed_error` and the raw-pointer validation tests run everywhere.
#![cfg(feature = "cuda")]

use crate::common;

use common::kernel::{self, check_row, generate, Spec};
use common::{to_dtype, to_f64};
use half::{bf16, f16};
use infopo_kernels::cuda::raw::RawRows;
use infopo_kernels::cuda::{self, CudaBackend};
use infopo_kernels::{open, BackendKind, Error, LogitElement, Params};
use rayon::prelude::*;

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("CUDA device 0 (these tests need a GPU and a driver)")
}

#[test]
fn no_driver_is_a_typed_error() {
    let present = cuda::driver_present();
    let opened = CudaBackend::new(0);
    match &opened {
        Ok(b) => {
            assert!(present, "CudaBackend::new succeeded without a driver library");
            assert!(b.sm_count() > 0);
        }
        Err(Error::BackendUnavailable { backend, why }) => {
            assert_eq!(*backend, "cuda");
            assert!(!why.is_empty());
        }
        Err(e) => panic!("CudaBackend::new(0) failed with an error other than BackendUnavailable: {e:?}"),
    }
    if !present {
        assert!(opened.is_err(), "no driver, yet a backend");
    }
    // The CLI's paths: `cuda` names the same outcome, `auto` never fails (falls back to the CPU).
    match open(BackendKind::Cuda) {
        Ok(b) => assert!(opened.is_ok() && b.name() == "cuda"),
        Err(e) => assert!(opened.is_err() && matches!(e, Error::BackendUnavailable { .. }), "{e:?}"),
    }
    let auto = open(BackendKind::Auto).expect("auto never fails");
    assert_eq!(auto.name(), if opened.is_ok() { "cuda" } else { "cpu" });
}

// ---- The shared bodies ------------------------------------------------------------------

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn random_shapes_match_oracle() {
    kernel::random_shapes_match_oracle(&gpu(), 256);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn small_vocabularies_every_dtype() {
    kernel::small_vocabularies_every_dtype(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn vocab_1000() {
    kernel::vocab_1000(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn split_vocabulary_large_v() {
    kernel::split_vocabulary_large_v(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn neg_inf_entries_and_infinite_kl() {
    kernel::neg_inf_entries_and_infinite_kl(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn huge_logits_and_temperature() {
    kernel::huge_logits_and_temperature(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn real_and_masked_with_different_alignment() {
    kernel::real_and_masked_with_different_alignment(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn bitwise_deterministic() {
    kernel::bitwise_deterministic(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn every_row_error_code_with_priority() {
    kernel::every_row_error_code_with_priority(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn epilogue_matches_oracle() {
    kernel::epilogue_matches_oracle(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn micro_batches_match_one_batch() {
    kernel::micro_batches_match_one_batch(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn turns_without_trajectories_and_empty_turns() {
    kernel::turns_without_trajectories_and_empty_turns(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn validation_errors_are_typed() {
    kernel::validation_errors_are_typed(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn token_advantages_match_oracle() {
    kernel::token_advantages_match_oracle(&gpu(), 40);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn ablation_edge_cases() {
    kernel::ablation_edge_cases(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn intrinsic_gate_matches_oracle() {
    kernel::intrinsic_gate_matches_oracle(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn bad_credit_spans_are_typed() {
    kernel::bad_credit_spans_are_typed(&gpu());
}

// ---- GPU only ---------------------------------------------------------------------------

/// Device views of real and masked at element offsets `real_pad` / `masked_pad` into their
/// allocations (so their 16-byte alignments differ), scored through the device API in two
/// launches (rows `0..k`, then `k..n` with `finalize`); every row against the oracle.
fn device_views_misaligned<T: LogitElement + cudarc::driver::DeviceRepr>(
    n: usize,
    v: usize,
    real_pad: usize,
    masked_pad: usize,
) {
    let b = gpu();
    let s = b.stream();
    let (r, m, targets) = generate(&Spec::new(n, v), 81 + v as u64);
    let pad = |k: usize, x: &[f32]| {
        let mut buf = vec![T::from_f32(0.0); k];
        buf.extend(to_dtype::<T>(x));
        buf
    };
    let (rbuf, mbuf) = (pad(real_pad, &r), pad(masked_pad, &m));
    let (real_d, masked_d) = (s.clone_htod(&rbuf).unwrap(), s.clone_htod(&mbuf).unwrap());
    let targets_d = s.clone_htod(&targets).unwrap();
    let (rf, mf) = (to_f64(&rbuf[real_pad..]), to_f64(&mbuf[masked_pad..]));
    let mut batch = b.begin(None, &Params::default()).unwrap();
    let k = n / 2;
    for (lo, hi) in [(0, k), (k, n)] {
        let out = b
            .score(
                &mut batch,
                &real_d.slice(real_pad + lo * v..real_pad + hi * v),
                &masked_d.slice(masked_pad + lo * v..masked_pad + hi * v),
                &targets_d.slice(lo..hi),
                v,
                hi == n,
            )
            .unwrap();
        batch.check().unwrap();
        let rows = cuda::rows_to_host(s, &out, hi - lo).unwrap();
        let what = format!("cuda device views {} V={v} pads {real_pad}/{masked_pad}", T::DTYPE);
        for (row, &a) in targets.iter().enumerate().take(hi).skip(lo) {
            let range = row * v..(row + 1) * v;
            check_row(&rows, row - lo, &rf[range.clone()], &mf[range], a as usize, 1.0, &what);
        }
    }
    assert_eq!(batch.rows_seen(), n);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn device_views_at_different_alignments() {
    device_views_misaligned::<f16>(6, 1000, 0, 1);
    device_views_misaligned::<bf16>(4, 50257, 3, 0);
    device_views_misaligned::<f32>(6, 4099, 1, 2);
    device_views_misaligned::<bf16>(300, 333, 5, 2);
}

/// A cheap deterministic pattern: (real, masked) logits of element `idx`, real in [−4, 4),
/// masked = real + [−0.5, 0.5).
fn pattern(idx: u64) -> (f32, f32) {
    let mut h = (idx ^ 0x5851_F42D_4C95_7F2D).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    let x = (h >> 40) as f32 * (8.0 / (1u64 << 24) as f32) - 4.0;
    let d = (h & 0xFFFF) as f32 * (1.0 / 65536.0) - 0.5;
    (x, x + d)
}

/// N = 16384 rows of Qwen's V = 151936 in bf16: 2.49e9 elements (> 2^31) and 5 GB per tensor.
/// One launch over the whole batch through the device API; every row finite with KL ≥ 0 and a
/// handful (the first, one straddling element 2^31 with its target past it, the last) against
/// the oracle.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn more_than_2_pow_31_elements() {
    const N: usize = 16384;
    const V: usize = 151_936;
    const { assert!(N * V > 1 << 31) };
    let straddle = (1usize << 31) / V; // row 14134 holds element 2^31
    let mut real = vec![bf16::ZERO; N * V];
    let mut masked = vec![bf16::ZERO; N * V];
    real.par_chunks_mut(V).zip(masked.par_chunks_mut(V)).enumerate().for_each(|(r, (x, y))| {
        for i in 0..V {
            let (a, c) = pattern((r * V + i) as u64);
            x[i] = bf16::from_f32(a);
            y[i] = bf16::from_f32(c);
        }
    });
    let mut targets: Vec<i64> = (0..N).map(|r| ((r * 7919 + 13) % V) as i64).collect();
    targets[straddle] = ((1usize << 31) - straddle * V + 5) as i64; // the target lies past 2^31

    let b = gpu();
    let s = b.stream();
    let (real_d, masked_d) = (s.clone_htod(&real).unwrap(), s.clone_htod(&masked).unwrap());
    let targets_d = s.clone_htod(&targets).unwrap();
    let mut batch = b.begin(None, &Params::default()).unwrap();
    let out = b.score(&mut batch, &real_d.slice(..), &masked_d.slice(..), &targets_d.slice(..), V, true).unwrap();
    batch.check().unwrap();
    let rows = cuda::rows_to_host(s, &out, N).unwrap();
    for r in 0..N {
        let values = [rows.lse_real[r], rows.lse_masked[r], rows.log_ratio[r], rows.kl[r], rows.entropy_real[r]];
        assert!(values.iter().all(|x| x.is_finite()) && rows.kl[r] >= -1e-3, "row {r}: {values:?}");
    }
    for r in [0, 1, N / 2, straddle - 1, straddle, straddle + 1, N - 1] {
        let range = r * V..(r + 1) * V;
        let (x, y) = (to_f64(&real[range.clone()]), to_f64(&masked[range]));
        check_row(&rows, r, &x, &y, targets[r] as usize, 1.0, "cuda bf16 N=16384 V=151936");
    }
}

// ---- Raw pointers (cuda::raw) and the launch discipline ------------------------------------

fn raw_rows(rows: usize, vocab: usize, dtype: infopo_kernels::Dtype) -> RawRows {
    // Well-formed addresses that are never dereferenced: validation needs no GPU.
    RawRows { real: 0x1000, masked: 0x2000, targets: 0x3000, row_out: 0x4000, rows, vocab, row_stride: vocab, dtype }
}

fn shape_error(rows: RawRows, needle: &str) {
    match rows.validate() {
        Err(Error::Shape { what }) => assert!(what.contains(needle), "`{what}` should mention `{needle}`"),
        other => panic!("{rows:?}: expected a shape error mentioning `{needle}`, got {other:?}"),
    }
}

#[test]
fn raw_rows_are_validated_without_a_gpu() {
    use infopo_kernels::Dtype::{BF16, F16, F32};
    for dtype in [F32, F16, BF16] {
        raw_rows(8, 151_936, dtype).validate().unwrap();
    }
    // No rows: nothing is read, so null pointers are fine (an epilogue-only launch).
    RawRows { real: 0, masked: 0, targets: 0, row_out: 0, ..raw_rows(0, 10, F32) }.validate().unwrap();
    assert!(matches!(raw_rows(4, 0, F32).validate(), Err(Error::EmptyVocab)));
    // Row indices are 32-bit, as on the host path.
    shape_error(raw_rows(u32::MAX as usize + 1, 1, BF16), "2^32");
    raw_rows(u32::MAX as usize, 1, BF16).validate().unwrap();
    shape_error(RawRows { row_stride: 99, ..raw_rows(4, 100, F32) }, "rows would overlap");
    // A padded stride is refused until the kernel takes one (docs/guide.md, "Raw pointers").
    shape_error(RawRows { row_stride: 128, ..raw_rows(4, 100, F32) }, "does not pass a stride");
    shape_error(raw_rows(usize::MAX / 2, 4, F32), "2^32");
    for (rows, name) in [
        (RawRows { real: 0, ..raw_rows(2, 10, F16) }, "`real` is null"),
        (RawRows { masked: 0, ..raw_rows(2, 10, F16) }, "`masked` is null"),
        (RawRows { targets: 0, ..raw_rows(2, 10, F16) }, "`targets` is null"),
        (RawRows { row_out: 0, ..raw_rows(2, 10, F16) }, "`row_out` is null"),
        (RawRows { real: 0x1001, ..raw_rows(2, 10, BF16) }, "`real` = 0x1001 is not aligned to its 2-byte"),
        (RawRows { masked: 0x2002, ..raw_rows(2, 10, F32) }, "`masked` = 0x2002 is not aligned to its 4-byte"),
        (RawRows { targets: 0x3004, ..raw_rows(2, 10, F32) }, "`targets` = 0x3004 is not aligned to its 8-byte"),
        (RawRows { row_out: 0x4002, ..raw_rows(2, 10, F32) }, "`row_out` = 0x4002 is not aligned to its 4-byte"),
    ] {
        shape_error(rows, name);
    }
    // Odd element offsets are fine for 2-byte types (a row slice of a bigger tensor).
    RawRows { real: 0x1002, masked: 0x2006, ..raw_rows(2, 10, BF16) }.validate().unwrap();
}

#[test]
fn raw_stream_without_driver_is_a_typed_error() {
    // SAFETY: the null stream is the primary context's legacy default stream, valid whenever
    // a context opens; it lives as long as the context.
    let opened = unsafe { CudaBackend::from_raw_stream(0, std::ptr::null_mut()) };
    match opened {
        Ok(b) => assert!(cuda::driver_present() && b.sm_count() > 0),
        Err(Error::BackendUnavailable { backend: "cuda", .. }) => {}
        Err(e) => panic!("from_raw_stream failed with an error other than BackendUnavailable: {e:?}"),
    }
}

/// The raw entry on a second backend that borrows the first one's stream, against the safe
/// device API on the same device buffers: bit for bit, at element offsets that misalign rows.
fn raw_matches_safe<T: LogitElement + cudarc::driver::DeviceRepr>(n: usize, v: usize, pad: usize, own_stream: bool) {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let safe = gpu();
    // The device's default stream, or one the caller created (another runtime's stream).
    let safe = if own_stream {
        CudaBackend::with_stream(safe.stream().context().new_stream().unwrap()).unwrap()
    } else {
        safe
    };
    let s = safe.stream().clone();
    // SAFETY: `s` outlives `raw` (declared before it, dropped after it).
    let raw = unsafe { CudaBackend::from_raw_stream(0, s.cu_stream()) }.unwrap();
    let (r, m, targets) = generate(&Spec::new(n, v), 7 + v as u64);
    let padded = |x: &[f32]| {
        let mut buf = vec![T::from_f32(0.0); pad];
        buf.extend(to_dtype::<T>(x));
        buf
    };
    let (real_d, masked_d) = (s.clone_htod(&padded(&r)).unwrap(), s.clone_htod(&padded(&m)).unwrap());
    let targets_d = s.clone_htod(&targets).unwrap();
    let (real_v, masked_v) = (real_d.slice(pad..), masked_d.slice(pad..));

    let mut batch = safe.begin(None, &Params::default()).unwrap();
    let want = safe.score(&mut batch, &real_v, &masked_v, &targets_d.slice(..), v, true).unwrap();
    batch.check().unwrap();

    let mut out = s.alloc_zeros::<f32>(5 * n).unwrap();
    let mut batch = raw.begin(None, &Params::default()).unwrap();
    {
        let (real_p, _g0) = real_v.device_ptr(&s);
        let (masked_p, _g1) = masked_v.device_ptr(&s);
        let (targets_p, _g2) = targets_d.device_ptr(&s);
        let (out_p, _g3) = out.device_ptr_mut(&s);
        let rows = RawRows {
            real: real_p,
            masked: masked_p,
            targets: targets_p,
            row_out: out_p,
            rows: n,
            vocab: v,
            row_stride: v,
            dtype: T::DTYPE,
        };
        // SAFETY: the buffers are live cudarc allocations on `s`, the raw backend's stream,
        // of the sizes stated, and are not dropped before `batch.check()` waits for it.
        unsafe { raw.score_raw(&mut batch, &rows, true) }.unwrap();
    }
    batch.check().unwrap();
    raw.check_scratch().unwrap();
    let (want, got) = (s.clone_dtoh(&want).unwrap(), s.clone_dtoh(&out).unwrap());
    assert_eq!(
        want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        "{} n={n} V={v} pad={pad}",
        T::DTYPE
    );
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn raw_pointers_match_the_device_api() {
    raw_matches_safe::<bf16>(5, 50_257, 3, false);
    raw_matches_safe::<f16>(7, 1000, 1, false);
    raw_matches_safe::<f32>(3, 151_936, 0, false);
}

/// The raw entry on a stream the caller created (not the default stream): the same bits.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn raw_entry_on_a_stream_the_caller_created() {
    raw_matches_safe::<bf16>(6, 50_257, 5, true);
    raw_matches_safe::<f32>(4, 3000, 0, true);
}

/// One trainer run through the device API: the layout uploaded once, one [`DeviceBatch`]
/// restarted every step, each step new logits in two micro-batches cut inside a turn. Every
/// step equals a fresh one-call batch of its logits: rows bit for bit (V = 31: one block per
/// row whatever the launch), turns and advantages to 1e-12.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn device_batch_restarts_step_after_step() {
    use infopo_kernels::{Backend, Batch, Logits};
    let gpu = gpu();
    let s = gpu.stream().clone();
    let l = kernel::layout();
    let (n, v) = (64usize, 31usize);
    let layout = infopo_kernels::Layout::new(n, &l.turns(), Some(&l.trajectories())).unwrap();
    let device_layout = gpu.upload_layout(&layout).unwrap();
    let params = Params::default();
    let mut batch = gpu.begin(Some(&device_layout), &params).unwrap();
    for step in 0..4u64 {
        if step > 0 {
            batch.restart().unwrap();
        }
        let (r, m, t) = generate(&Spec::new(n, v), 90 + step);
        let (r, m) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let mut rows = Vec::new();
        // One upload, sliced: each row keeps the alignment it has in the one-call batch.
        let (x, y, tg) = (s.clone_htod(&r).unwrap(), s.clone_htod(&m).unwrap(), s.clone_htod(&t).unwrap());
        for (r0, r1, last) in [(0usize, 10usize, false), (10, n, true)] {
            let (x, y, tg) = (x.slice(r0 * v..r1 * v), y.slice(r0 * v..r1 * v), tg.slice(r0..r1));
            let out = gpu.score(&mut batch, &x, &y, &tg, v, last).unwrap();
            rows.push(cuda::rows_to_host(&s, &out, r1 - r0).unwrap());
        }
        let (info, adv) = batch.to_host().unwrap();
        let one = gpu
            .compute(
                &Batch::rows(Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap(), &t)
                    .with_turns(l.turns())
                    .with_trajectories(l.trajectories()),
                &params,
            )
            .unwrap();
        let kl: Vec<u32> = rows.iter().flat_map(|o| o.kl.iter().map(|x| x.to_bits())).collect();
        assert_eq!(kl, one.rows.kl.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), "step {step}: rows");
        let close = |a: &[f64], b: &[f64], what: &str| {
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()), "step {step}: {what} {x} vs {y}");
            }
        };
        close(&info.unwrap(), one.turn_info.as_ref().unwrap(), "turn_info");
        let (adv, want) = (adv.unwrap(), one.advantages.unwrap());
        close(&adv.turn_bonus, &want.turn_bonus, "turn_bonus");
        close(&adv.trajectory_advantage, &want.trajectory_advantage, "trajectory_advantage");
    }
    gpu.check_scratch().unwrap();
}

/// A launch cut short (the stand-in runs only its first block; a cancelled graph replay does
/// the like on a GPU) leaves row tickets drawn: `check_scratch` names them, `reset_scratch`
/// clears them, and the next launch is right again. On a real driver only the clean half runs.
#[test]
#[ignore = "needs a CUDA GPU or the CPU stand-in: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn reset_scratch_after_an_aborted_launch() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    // Few rows of a large vocabulary: split rows, so a cut launch leaves row tickets drawn.
    let (n, v) = (3usize, 151_936usize);
    let (r, m, t) = generate(&Spec::new(n, v), 17);
    let (x, y, tg) = (s.clone_htod(&r).unwrap(), s.clone_htod(&m).unwrap(), s.clone_htod(&t).unwrap());
    let run = || {
        let mut batch = gpu.begin(None, &Params::default()).unwrap();
        let out = gpu.score(&mut batch, &x.slice(..), &y.slice(..), &tg.slice(..), v, true).unwrap();
        batch.check().map(|_| cuda::rows_to_host(&s, &out, n).unwrap())
    };
    if let Some(lib) = common::stand_in::stand_in() {
        common::stand_in::abort_next_launch(&lib, 1);
        let _ = run(); // whatever the cut launch left in its outputs
        match gpu.check_scratch() {
            Err(Error::Cuda(what)) => assert!(what.contains("tickets left drawn"), "{what}"),
            other => panic!("an aborted launch left no tickets drawn: {other:?}"),
        }
        gpu.reset_scratch().unwrap();
    } else {
        eprintln!("a real driver: no launch can be cut here; checking the clean path only");
    }
    gpu.check_scratch().unwrap();
    let got = run().unwrap();
    let (rf, mf) = (to_f64(&r), to_f64(&m));
    for (row, &target) in t.iter().enumerate() {
        let cols = row * v..(row + 1) * v;
        check_row(&got, row, &rf[cols.clone()], &mf[cols], target as usize, 1.0, "after reset");
    }
    gpu.check_scratch().unwrap();
}

/// A trainer's steps through the device API and the fused path: after the first step, no
/// module load, no cuBLAS handle, no growth of the scratch, and the same stream-ordered
/// allocations every step (the per-step buffers: row outputs, chunk logits, states), counted
/// by the CPU stand-in of the driver. On a real driver it only runs the steps.
#[test]
#[ignore = "needs the CPU stand-in of the driver to count calls (.ci/fake-cuda); runs the steps on a GPU"]
fn steady_state_steps_load_nothing_and_allocate_the_same() {
    use infopo_kernels::cuda::fused::DeviceHiddenInputs;
    let lib = common::stand_in::stand_in();
    let count = |name: &str| lib.as_ref().map_or(0, |l| common::stand_in::calls(l, name));
    let names = ["cuModuleLoadData", "cublasCreate_v2", "cuMemAllocAsync", "cuMemAlloc_v2", "cuStreamCreate"];
    let snapshot = || names.map(count);
    let gpu = gpu();
    let s = gpu.stream().clone();
    let l = kernel::layout();
    let (n, v, d, chunk) = (64usize, 3000usize, 16usize, 1024usize);
    let layout = infopo_kernels::Layout::new(n, &l.turns(), Some(&l.trajectories())).unwrap();
    let device_layout = gpu.upload_layout(&layout).unwrap();
    let mut batch = gpu.begin(Some(&device_layout), &Params::default()).unwrap();
    let head: Vec<f32> = generate(&Spec::new(v, d), 5).0;
    let head = s.clone_htod(&to_dtype::<bf16>(&head)).unwrap();
    let mut per_step = Vec::new();
    for step in 0..4u64 {
        let before = snapshot();
        // Logits path: two micro-batches.
        batch.restart().unwrap();
        let (r, m, t) = generate(&Spec::new(n, v), 300 + step);
        let (x, y, tg) = (
            s.clone_htod(&to_dtype::<bf16>(&r)).unwrap(),
            s.clone_htod(&to_dtype::<bf16>(&m)).unwrap(),
            s.clone_htod(&t).unwrap(),
        );
        gpu.score(&mut batch, &x.slice(..20 * v), &y.slice(..20 * v), &tg.slice(..20), v, false).unwrap();
        gpu.score(&mut batch, &x.slice(20 * v..), &y.slice(20 * v..), &tg.slice(20..), v, true).unwrap();
        batch.to_host().unwrap();
        // Fused path: hidden states in, one micro-batch.
        batch.restart().unwrap();
        let (hr, hm, _) = generate(&Spec::new(n, d), 400 + step);
        let (hr, hm) = (s.clone_htod(&to_dtype::<bf16>(&hr)).unwrap(), s.clone_htod(&to_dtype::<bf16>(&hm)).unwrap());
        let inputs = DeviceHiddenInputs {
            real_hidden: hr.as_view(),
            masked_hidden: hm.as_view(),
            lm_head: head.as_view(),
            rows: n,
            hidden: d,
            vocab: v,
        };
        gpu.score_hidden_batch(&mut batch, &inputs, &tg.as_view(), chunk, true).unwrap();
        batch.to_host().unwrap();
        let after = snapshot();
        per_step.push(std::array::from_fn::<u64, 5, _>(|k| after[k] - before[k]));
    }
    gpu.check_scratch().unwrap();
    let Some(_) = lib else {
        eprintln!("a real driver: the steps ran; call counts need the CPU stand-in (.ci/fake-cuda)");
        return;
    };
    eprintln!("calls per step ({names:?}): {per_step:?}");
    for (step, calls) in per_step.iter().enumerate().skip(1) {
        assert_eq!(calls[0], 0, "step {step} loaded a module");
        assert_eq!(calls[1], 0, "step {step} created a cuBLAS handle");
        assert_eq!(calls[3], 0, "step {step} made a synchronous allocation");
        assert_eq!(calls[4], 0, "step {step} created a stream");
        assert_eq!(calls[2], per_step[1][2], "step {step}: stream-ordered allocations differ from step 1's");
    }
    // The steady per-step allocations are the documented per-call buffers, not growth: inputs
    // (7 uploads), 2 row outputs, 2 chunk logit buffers, the states and the merge's row outputs.
    assert!(per_step[1][2] <= 16, "{} allocations per step", per_step[1][2]);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn launch_discipline_is_checked() {
    let a = gpu();
    let s = a.stream();
    let (n, v) = (4, 300);
    let (r, m, targets) = generate(&Spec::new(n, v), 5);
    let (real, masked) = (s.clone_htod(&r).unwrap(), s.clone_htod(&m).unwrap());
    let targets = s.clone_htod(&targets).unwrap();
    let (real, masked, targets) = (real.slice(..), masked.slice(..), targets.slice(..));
    // A batch belongs to the stream that began it.
    let other = CudaBackend::with_stream(s.context().new_stream().unwrap()).unwrap();
    let mut batch = a.begin(None, &Params::default()).unwrap();
    match other.score(&mut batch, &real, &masked, &targets, v, true) {
        Err(Error::Cuda(what)) => assert!(what.contains("another backend's stream"), "{what}"),
        other => panic!("expected the stream check, got {:?}", other.map(|_| ())),
    }
    assert_eq!(batch.rows_seen(), 0, "a refused launch books no rows");
    a.score(&mut batch, &real, &masked, &targets, v, true).unwrap();
    batch.check().unwrap();
    // Completed launches leave the tickets clean; a reset keeps them so and launches still work.
    a.check_scratch().unwrap();
    a.reset_scratch().unwrap();
    a.check_scratch().unwrap();
    batch.restart().unwrap();
    a.score(&mut batch, &real, &masked, &targets, v, true).unwrap();
    batch.check().unwrap();
    a.check_scratch().unwrap();
}

/// A layout edited by hand out of consistency is refused before anything reaches the device
/// (the kernel's epilogue indexes device buffers with its offsets and ids), and a row_out
/// shorter than 5 x rows is a typed error on the download.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn hand_edited_layouts_and_short_row_buffers_are_typed_errors() {
    let a = gpu();
    let l = kernel::layout();
    let good = infopo_kernels::Layout::new(64, &l.turns(), Some(&l.trajectories())).unwrap();
    a.upload_layout(&good).unwrap();
    let mut bad = good.clone();
    bad.turn_trajectory[0] = 99;
    assert!(matches!(a.upload_layout(&bad), Err(Error::Turns { .. })));
    let mut bad = good.clone();
    bad.groups.as_mut().unwrap().group_turns[0] = 1000;
    assert!(matches!(a.upload_layout(&bad), Err(Error::Turns { .. })));
    let row_out = a.stream().alloc_zeros::<f32>(5 * 3).unwrap();
    assert!(matches!(cuda::rows_to_host(a.stream(), &row_out, 4), Err(Error::Shape { .. })));
    assert_eq!(cuda::rows_to_host(a.stream(), &row_out, 2).unwrap().kl.len(), 2);
}

// ---- Numerics independent of the launch shape (shared bodies) -------------------------------

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn peaked_rows_give_exact_zero_log_ratio() {
    kernel::peaked_rows_give_exact_zero_log_ratio(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn tiny_probability_gap_gives_infinite_kl() {
    kernel::tiny_probability_gap_gives_infinite_kl(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn mask_fills_count_as_infinities() {
    kernel::mask_fills_count_as_infinities(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn non_finite_turn_info_is_an_error() {
    kernel::non_finite_turn_info_is_an_error(&gpu());
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_kernel::"]
fn temperature_outside_its_range_is_a_parameter_error() {
    kernel::temperature_outside_its_range_is_a_parameter_error(&gpu());
}
