//! The GPU side of issue 9 (feature `cuda`): the kernel in partial-state mode on device logits
//! ([`CudaBackend::score_range_into`]), the fused hidden-state path (cuBLAS chunk GEMMs, then the
//! kernel per chunk, then the merge: [`CudaBackend::score_hidden`]) and, with feature `nccl`, the
//! all-gather of a rank's shard states. Everything is compared with the float64 reference at
//! the kernels' tolerance (`tests/common/kernel.rs`), row errors with the reference's.
//!
//! The GPU tests are ignored (a machine without a GPU must pass the suite); run them with
//!
//! ```text
//! NVCC=$(scripts/install-nvcc | tail -1) cargo test --release --features cuda --test gpu -- --include-ignored cuda_fused::
//! ```
//!
//! The validation tests without a GPU run everywhere.
#![cfg(feature = "cuda")]

use crate::common;

use common::kernel::{compare_rows, generate, Spec};
use common::{to_dtype, to_f64};
use half::{bf16, f16};
use infopo_kernels::cuda::fused::{ChunkGemm, DeviceHiddenInputs};
use infopo_kernels::cuda::range::RangeColumns;
use infopo_kernels::cuda::CudaBackend;
use infopo_kernels::reference::score_hidden;
use infopo_kernels::vocab::{
    chunk_ranges, merge_outputs, shard_chunk_ranges, shard_ranges, RangeInput, RangeStates, VocabRange,
};
use infopo_kernels::{Error, HiddenInputs, LogitElement, Logits, Params, RowOutputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn gpu() -> CudaBackend {
    CudaBackend::new(0).expect("CUDA device 0 (these tests need a GPU and a driver)")
}

// ---- Without a GPU --------------------------------------------------------------------------

#[test]
fn chunk_ranges_tile_the_vocabulary() {
    for (vocab, chunk) in [(50257usize, 4096usize), (50257, 1733), (32003, 32003), (32003, 40000), (7, 1), (1, 5)] {
        let ranges = chunk_ranges(vocab, chunk);
        assert_eq!(ranges.len(), vocab.div_ceil(chunk), "V={vocab} chunk={chunk}");
        let mut next = 0;
        for r in &ranges {
            assert_eq!(r.start, next, "V={vocab} chunk={chunk}: gap or overlap");
            assert!(r.len >= 1 && r.len <= chunk);
            next = r.end();
        }
        assert_eq!(next, vocab);
    }
}

#[test]
fn shard_chunks_have_equal_counts_and_tile_the_vocabulary() {
    for (vocab, world, chunk) in [(50257usize, 8usize, 1000usize), (32003, 3, 4096), (10, 3, 3), (7, 8, 2), (100, 1, 7)]
    {
        let per_rank: Vec<Vec<VocabRange>> =
            (0..world).map(|rank| shard_chunk_ranges(vocab, world, rank, chunk).unwrap()).collect();
        let k = vocab.div_ceil(world).div_ceil(chunk);
        let mut next = 0;
        for (rank, ranges) in per_rank.iter().enumerate() {
            assert_eq!(ranges.len(), k, "V={vocab} P={world} chunk={chunk} rank {rank}: chunk count");
            for r in ranges {
                assert_eq!(r.start, next, "V={vocab} P={world} chunk={chunk} rank {rank}: gap or overlap");
                assert!(r.len <= chunk);
                next = r.end();
            }
        }
        assert_eq!(next, vocab);
    }
    // A chunk at least the shard width: one range per rank, its shard.
    assert_eq!(shard_chunk_ranges(10, 3, 2, 4).unwrap(), shard_ranges(10, 3).unwrap()[2..].to_vec());
    assert!(matches!(shard_chunk_ranges(10, 3, 3, 4), Err(Error::Shape { .. })));
    assert!(matches!(shard_chunk_ranges(10, 3, 0, 0), Err(Error::Shape { .. })));
    assert!(matches!(shard_chunk_ranges(0, 3, 0, 4), Err(Error::EmptyVocab)));
}

#[test]
fn range_columns_are_validated_without_a_gpu() {
    let shape = |r: infopo_kernels::Result<()>, needle: &str| match r {
        Err(Error::Shape { what }) => assert!(what.contains(needle), "{what:?} lacks {needle:?}"),
        other => panic!("expected a shape error with {needle:?}, got {other:?}"),
    };
    let full = RangeColumns::of_full(100, VocabRange::new(40, 30));
    assert!(full.validate(3, 300, 300, 24).is_ok());
    assert!(full.validate(3, 300, 300, 100).is_ok(), "a longer states buffer is fine");
    shape(full.validate(3, 299, 300, 24), "expected 3 rows x 100 columns");
    shape(full.validate(3, 300, 301, 24), "expected 3 rows x 100 columns");
    shape(full.validate(3, 300, 300, 23), "needs 8 x 3");
    shape(RangeColumns::of_full(100, VocabRange::new(80, 30)).validate(3, 300, 300, 24), "outside the 100 columns");
    // A padded shard: its valid length fits its width; a range past it does not.
    let shard = RangeColumns::shard(13, VocabRange::new(39, 11));
    assert!(shard.validate(2, 26, 26, 16).is_ok());
    shape(RangeColumns::shard(13, VocabRange::new(39, 14)).validate(2, 26, 26, 16), "outside the 13 columns");
    shape(RangeColumns::shard(4, VocabRange::new(usize::MAX - 1, 4)).validate(1, 4, 4, 8), "overflows");
}

/// `C (m x n) = op(A) · op(B)` exactly as cuBLAS reads column-major buffers with these
/// arguments (element (i, j) of a column-major matrix of leading dimension ld at i + j·ld), run
/// by the `gemm` crate through strides, in f64.
fn column_major_gemm(g: &ChunkGemm, a: &[f64], b: &[f64], c: &mut [f64]) {
    let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
    let (lda, ldb, ldc) = (g.lda as isize, g.ldb as isize, g.ldc as isize);
    // op(X)(i, j) = X(j, i) when transposed: the row and column strides swap.
    let (a_rs, a_cs) = if g.transpose_a { (lda, 1) } else { (1, lda) };
    let (b_rs, b_cs) = if g.transpose_b { (ldb, 1) } else { (1, ldb) };
    // Every element the arguments address lies inside the buffers (as cuBLAS would read them).
    let last = |rows: usize, cols: usize, rs: isize, cs: isize| (rows as isize - 1) * rs + (cols as isize - 1) * cs;
    assert!(last(m, k, a_rs, a_cs) < a.len() as isize && last(k, n, b_rs, b_cs) < b.len() as isize);
    assert!(last(m, n, 1, ldc) < c.len() as isize);
    // SAFETY: the strides address only elements inside the three buffers (asserted above); `c`
    // is written only and does not alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            ldc,
            1,
            false,
            a.as_ptr(),
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The chunk GEMM's cuBLAS arguments, fed the row-major lm_head chunk and hidden states as the
/// GPU feeds them, give the row-major `[n, len]` logits `hidden · weightᵀ`.
#[test]
fn chunk_gemm_arguments_give_row_major_logits() {
    let mut rng = StdRng::seed_from_u64(3);
    for &(len, n, d) in &[(1usize, 1usize, 1usize), (7, 3, 5), (64, 1, 9), (33, 17, 128), (5, 40, 2)] {
        let weight: Vec<f64> = (0..len * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let hidden: Vec<f64> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let g = ChunkGemm::new(len, n, d).unwrap();
        let mut out = vec![f64::NAN; n * len];
        column_major_gemm(&g, &weight, &hidden, &mut out);
        for r in 0..n {
            for j in 0..len {
                let want: f64 = (0..d).map(|i| hidden[r * d + i] * weight[j * d + i]).sum();
                let got = out[r * len + j];
                assert!(
                    (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "[{len}, {n}, {d}] out[{r}][{j}] {got} vs {want}"
                );
            }
        }
    }
}

/// Dimensions are checked into cuBLAS's 32-bit int before any cast.
#[test]
fn chunk_gemm_dimensions_are_checked() {
    let big = i32::MAX as usize + 1;
    for (len, n, d) in [(big, 1, 1), (1, big, 1), (1, 1, big), (0, 1, 1), (1, 0, 1), (1, 1, 0)] {
        assert!(matches!(ChunkGemm::new(len, n, d), Err(Error::Shape { .. })), "[{len}, {n}, {d}]");
    }
    let g = ChunkGemm::new(i32::MAX as usize, 2, 3).unwrap();
    assert_eq!((g.m, g.n, g.k, g.lda, g.ldb, g.ldc), (i32::MAX, 2, 3, 3, 3, i32::MAX));
}

// ---- Range states on the GPU ----------------------------------------------------------------

/// Each range's columns of [n, v] logits copied into its own [n, width] shard, the columns past
/// the range's valid length filled with NaN (which the kernel must never read).
fn shard_buffer<T: LogitElement>(x: &[T], n: usize, v: usize, range: VocabRange, width: usize) -> Vec<T> {
    let mut s = vec![T::from_f32(f32::NAN); n * width];
    for row in 0..n {
        s[row * width..row * width + range.len].copy_from_slice(&x[row * v + range.start..row * v + range.end()]);
    }
    s
}

/// `range`'s padded shard (width `width`) of bf16 logits `r`/`m` ([n, v]), uploaded to `gpu`'s
/// stream and scored into `[n, 8]` range states there (targets already on that stream): what one
/// rank of a vocabulary-parallel lm_head holds before the gather.
#[cfg(feature = "nccl")]
#[allow(clippy::too_many_arguments)]
fn shard_states(
    gpu: &CudaBackend,
    (r, m): (&[bf16], &[bf16]),
    targets: &cudarc::driver::CudaView<'_, i64>,
    (n, v): (usize, usize),
    range: VocabRange,
    width: usize,
    params: &Params,
) -> cudarc::driver::CudaSlice<f32> {
    let s = gpu.stream();
    let (x, y) = (
        s.clone_htod(&shard_buffer(r, n, v, range, width)).unwrap(),
        s.clone_htod(&shard_buffer(m, n, v, range, width)).unwrap(),
    );
    let mut states = s.alloc_zeros::<f32>(n * 8).unwrap();
    let columns = RangeColumns::shard(width, range);
    gpu.score_range_into(&x.as_view(), &y.as_view(), targets, columns, params, &mut states.as_view_mut()).unwrap();
    states
}

fn unsplit_outputs<T: LogitElement>(
    r: &[T],
    m: &[T],
    t: &[i64],
    v: usize,
    params: &Params,
) -> infopo_kernels::Result<RowOutputs> {
    let n = t.len();
    infopo_kernels::reference::score(0, Logits::new(r, n, v).unwrap(), Logits::new(m, n, v).unwrap(), t, params)
        .map(|v| infopo_kernels::reference::to_outputs(&v))
}

/// p ∈ {1, 2, 3, 8} padded Megatron shards and three ranges of the full logits, scored on the
/// GPU and merged, against the float64 reference on the whole rows (kernel tolerance).
fn shards_match_reference<T: LogitElement>(gpu: &CudaBackend, n: usize, v: usize, temperature: f64, seed: u64) {
    let (r, m, t) = generate(&Spec { neg_inf: 0.1, temperature, ..Spec::new(n, v) }, seed);
    let (r, m) = (to_dtype::<T>(&r), to_dtype::<T>(&m));
    let params = Params { temperature, ..Params::default() };
    let (x, y) = (to_f64(&r), to_f64(&m));
    for p in [1usize, 2, 3, 8] {
        let width = v.div_ceil(p);
        let parts: Vec<RangeStates> = shard_ranges(v, p)
            .unwrap()
            .into_iter()
            .map(|range| {
                let (rs, ms) = (shard_buffer(&r, n, v, range, width), shard_buffer(&m, n, v, range, width));
                let input =
                    RangeInput::shard(Logits::new(&rs, n, width).unwrap(), Logits::new(&ms, n, width).unwrap(), range);
                gpu.score_range(&input, &t, &params).unwrap()
            })
            .collect();
        let what = format!("cuda {} N={n} V={v} τs={temperature} p={p} padded shards", T::DTYPE);
        compare_rows(&merge_outputs(0, &parts, &t, v).unwrap(), &x, &y, &t, v, temperature, &what);
    }
    let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
    let cuts = [0, v / 5, v / 5 + v / 2, v];
    let parts: Vec<RangeStates> = cuts
        .windows(2)
        .map(|w| gpu.score_range(&RangeInput::of_full(real, masked, VocabRange::new(w[0], w[1] - w[0])), &t, &params))
        .collect::<infopo_kernels::Result<_>>()
        .unwrap();
    let what = format!("cuda {} N={n} V={v} ranges of the full logits", T::DTYPE);
    compare_rows(&merge_outputs(0, &parts, &t, v).unwrap(), &x, &y, &t, v, temperature, &what);
}

#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn range_states_match_the_reference() {
    let gpu = gpu();
    // Few rows and a large vocabulary split every row over blocks; many rows do not.
    for &(n, v) in &[(2usize, 50257usize), (5, 1000), (300, 32003), (1, 7)] {
        shards_match_reference::<f32>(&gpu, n, v, 1.0, (n + v) as u64);
        shards_match_reference::<bf16>(&gpu, n, v, 0.7, (2 * n + v) as u64);
        shards_match_reference::<f16>(&gpu, n, v, 2.0, (3 * n + v) as u64);
    }
}

/// Row errors are decided by the merge on whole rows: the same row and kind as the unsplit
/// reference, for entries in one shard or a side all −∞ across every shard.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn range_row_errors_match_the_reference() {
    let gpu = gpu();
    let (n, v) = (6usize, 4000usize);
    type Edit = fn(&mut [f32], &mut [f32], &mut [i64]);
    let edits: [(&str, Edit); 5] = [
        ("target out of range", |_, _, t| t[3] = 4000),
        ("real NaN", |x, _, _| x[4 * 4000 + 3333] = f32::NAN),
        ("masked +inf", |_, y, _| y[3 * 4000 + 1] = f32::INFINITY),
        ("real all -inf", |x, _, _| x[4000..8000].fill(f32::NEG_INFINITY)),
        ("masked target fill", |_, y, t| y[t[1] as usize + 4000] = f32::MIN),
    ];
    let params = Params::default();
    for (name, edit) in edits {
        let (mut r, mut m, mut t) = generate(&Spec::new(n, v), 23);
        edit(&mut r, &mut m, &mut t);
        let want = unsplit_outputs(&r, &m, &t, v, &params);
        let width = v.div_ceil(3);
        let parts: Vec<RangeStates> = shard_ranges(v, 3)
            .unwrap()
            .into_iter()
            .map(|range| {
                let (rs, ms) = (shard_buffer(&r, n, v, range, width), shard_buffer(&m, n, v, range, width));
                let input =
                    RangeInput::shard(Logits::new(&rs, n, width).unwrap(), Logits::new(&ms, n, width).unwrap(), range);
                gpu.score_range(&input, &t, &params).unwrap()
            })
            .collect();
        match (merge_outputs(0, &parts, &t, v), want) {
            (Err(Error::Row { row: a, kind: k, .. }), Err(Error::Row { row: b, kind: kb, .. })) => {
                assert_eq!((a, k), (b, kb), "{name}")
            }
            (g, w) => panic!("{name}: gpu shards {g:?}, reference {w:?}"),
        }
    }
}

// ---- The fused hidden-state path ------------------------------------------------------------

struct Case {
    real: Vec<f32>,
    masked: Vec<f32>,
    head: Vec<f32>,
    targets: Vec<i64>,
    n: usize,
    d: usize,
    v: usize,
}

/// Hidden states ~ ±1, lm_head rows ~ ±3/√D (logits of a few units); the masked hidden state is
/// the real one perturbed, as a masked feedback would.
fn case(n: usize, d: usize, v: usize, seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let real: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let masked: Vec<f32> = real.iter().map(|&h| h + rng.gen_range(-0.3f32..0.3)).collect();
    let s = 3.0 / (d as f32).sqrt();
    let head: Vec<f32> = (0..v * d).map(|_| rng.gen_range(-s..s)).collect();
    let targets = (0..n).map(|_| rng.gen_range(0..v) as i64).collect();
    Case { real, masked, head, targets, n, d, v }
}

/// hidden · headᵀ in f64, [n, v], from the values as rounded to T.
fn logits<T: LogitElement>(hidden: &[T], head: &[T], n: usize, d: usize, v: usize) -> Vec<f64> {
    let (h, w) = (to_f64(hidden), to_f64(head));
    (0..n * v).map(|i| (0..d).map(|k| h[(i / v) * d + k] * w[(i % v) * d + k]).sum()).collect()
}

fn fused_matches<T: LogitElement + cudarc::driver::DeviceRepr>(
    gpu: &CudaBackend,
    c: &Case,
    temperature: f64,
    chunks: &[usize],
) {
    let (real, masked, head) = (to_dtype::<T>(&c.real), to_dtype::<T>(&c.masked), to_dtype::<T>(&c.head));
    let inputs =
        HiddenInputs { real_hidden: &real, masked_hidden: &masked, lm_head: &head, rows: c.n, hidden: c.d, vocab: c.v };
    let (x, y) = (logits(&real, &head, c.n, c.d, c.v), logits(&masked, &head, c.n, c.d, c.v));
    let params = Params { temperature, ..Params::default() };
    for &chunk in chunks {
        let got = gpu.score_hidden(&inputs, &c.targets, &params, chunk).unwrap();
        let what = format!("cuda fused {} N={} D={} V={} chunk={chunk} τs={temperature}", T::DTYPE, c.n, c.d, c.v);
        compare_rows(&got, &x, &y, &c.targets, c.v, temperature, &what);
    }
}

/// cuBLAS chunk GEMMs (f32 out, fp32 compute) and the kernel per chunk against the float64
/// reference on the f64 logits: bf16 and f32 (and f16), V = 50257 and 32003, chunks that divide
/// V (1733 · 29 = 50257; V itself) and that do not, more than V, few rows (split rows) and many.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn fused_matches_the_f64_reference() {
    let gpu = gpu();
    for &(n, d, v) in &[(3usize, 64usize, 50257usize), (200, 96, 32003), (130, 64, 50257)] {
        let c = case(n, d, v, (7 * n + d + v) as u64);
        let divides = if v == 50257 { 1733 } else { v };
        fused_matches::<f32>(&gpu, &c, 1.0, &[4096, divides, v, v + 7]);
        fused_matches::<bf16>(&gpu, &c, 0.7, &[8192, divides, 1000]);
        fused_matches::<f16>(&gpu, &c, 1.3, &[4096]);
    }
}

/// Vocabulary-parallel fused path, P ranks simulated on one GPU: each "rank" scores its padded
/// lm_head shard (padding rows NaN, never read) into its [K, N, 8] slice of one [P, K, N, 8]
/// buffer (what the all-gather assembles), and the merge of all P · K ranges gives the float64
/// reference's outputs to the kernels' tolerance: p ∈ {1, 2, 3, 8}, chunks smaller and larger
/// than a shard.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn fused_shards_match_the_f64_reference() {
    let gpu = gpu();
    let s = gpu.stream().clone();
    let (n, d, v) = (40usize, 32usize, 32003usize);
    let c = case(n, d, v, 41);
    let (real, masked, head) = (to_dtype::<bf16>(&c.real), to_dtype::<bf16>(&c.masked), to_dtype::<bf16>(&c.head));
    let (x, y) = (logits(&real, &head, n, d, v), logits(&masked, &head, n, d, v));
    let params = Params { temperature: 0.8, ..Params::default() };
    let (dr, dm, dt) =
        (s.clone_htod(&real).unwrap(), s.clone_htod(&masked).unwrap(), s.clone_htod(&c.targets).unwrap());
    for world in [1usize, 2, 3, 8] {
        let width = v.div_ceil(world);
        for chunk in [1500usize, 4096, width + 1] {
            let k = width.div_ceil(chunk);
            let mut states = s.alloc_zeros::<f32>(world * k * n * 8).unwrap();
            let mut ranges = Vec::new();
            for (rank, shard) in shard_ranges(v, world).unwrap().into_iter().enumerate() {
                let mut padded = vec![bf16::NAN; width * d];
                padded[..shard.len * d].copy_from_slice(&head[shard.start * d..shard.end() * d]);
                let dh = s.clone_htod(&padded).unwrap();
                let inputs = DeviceHiddenInputs {
                    real_hidden: dr.as_view(),
                    masked_hidden: dm.as_view(),
                    lm_head: dh.as_view(),
                    rows: n,
                    hidden: d,
                    vocab: width,
                };
                let per_rank = k * n * 8;
                let mut slot = states.slice_mut(rank * per_rank..(rank + 1) * per_rank);
                let got = gpu
                    .score_hidden_shard_states(&inputs, v, (rank, world), &dt.as_view(), &params, chunk, &mut slot)
                    .unwrap();
                assert_eq!(got, shard_chunk_ranges(v, world, rank, chunk).unwrap());
                ranges.extend(got);
            }
            let out = gpu.merge_range_states(&states.as_view(), &ranges, &dt.as_view(), v, &params).unwrap();
            let what = format!("cuda fused shards bf16 N={n} D={d} V={v} P={world} chunk={chunk}");
            compare_rows(&out, &x, &y, &c.targets, v, params.temperature, &what);
        }
    }
}

/// The same outputs as the CPU fused reference to the kernels' tolerance, and the same row
/// error (row and kind) when a hidden state holds a NaN or a target is out of range.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn fused_row_errors_match_the_reference() {
    let gpu = gpu();
    let mut c = case(5, 16, 32003, 3);
    c.real[2 * 16 + 3] = f32::NAN; // every real logit of row 2 NaN
    c.targets[4] = 32003;
    let inputs = HiddenInputs {
        real_hidden: &c.real,
        masked_hidden: &c.masked,
        lm_head: &c.head,
        rows: c.n,
        hidden: c.d,
        vocab: c.v,
    };
    let want = score_hidden(0, &inputs, &c.targets, &Params::default(), 4096);
    let got = gpu.score_hidden(&inputs, &c.targets, &Params::default(), 4096);
    match (got, want) {
        (Err(Error::Row { row: a, kind: k, .. }), Err(Error::Row { row: w, kind: kw, .. })) => {
            assert_eq!((a, k), (w, kw));
            assert_eq!(a, 2);
        }
        (g, w) => panic!("cuda {g:?}, reference {w:?}"),
    }
}

/// Bad shapes are typed errors before anything is launched.
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn fused_bad_shapes_are_typed_errors() {
    let gpu = gpu();
    let c = case(2, 4, 10, 2);
    let ok = HiddenInputs {
        real_hidden: &c.real,
        masked_hidden: &c.masked,
        lm_head: &c.head,
        rows: c.n,
        hidden: c.d,
        vocab: c.v,
    };
    let p = Params::default();
    assert!(gpu.score_hidden(&ok, &c.targets, &p, 3).is_ok());
    let shape = |r: infopo_kernels::Result<RowOutputs>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape(gpu.score_hidden(&HiddenInputs { hidden: 5, ..ok }, &c.targets, &p, 3)));
    assert!(shape(gpu.score_hidden(&HiddenInputs { lm_head: &c.head[..36], ..ok }, &c.targets, &p, 3)));
    assert!(shape(gpu.score_hidden(&ok, &c.targets[..1], &p, 3)));
    assert!(shape(gpu.score_hidden(&ok, &c.targets, &p, 0)));
    assert!(matches!(
        gpu.score_hidden(&ok, &c.targets, &Params { temperature: 1e4, ..p }, 3),
        Err(Error::Param { .. })
    ));
}

/// Two runs of the fused path give the same bits (fixed chunk order, deterministic kernel;
/// cuBLAS's default GEMM is deterministic on one stream and one handle).
#[test]
#[ignore = "needs a CUDA GPU: cargo test --features cuda --test gpu -- --include-ignored cuda_fused::"]
fn fused_is_bitwise_deterministic() {
    let gpu = gpu();
    let c = case(64, 128, 50257, 11);
    let (real, masked, head) = (to_dtype::<bf16>(&c.real), to_dtype::<bf16>(&c.masked), to_dtype::<bf16>(&c.head));
    let inputs =
        HiddenInputs { real_hidden: &real, masked_hidden: &masked, lm_head: &head, rows: c.n, hidden: c.d, vocab: c.v };
    let a = gpu.score_hidden(&inputs, &c.targets, &Params::default(), 4096).unwrap();
    let b = gpu.score_hidden(&inputs, &c.targets, &Params::default(), 4096).unwrap();
    let bits = |o: &RowOutputs| {
        [&o.lse_real, &o.lse_masked, &o.log_ratio, &o.kl, &o.entropy_real]
            .iter()
            .flat_map(|v| v.iter().map(|x| x.to_bits()))
            .collect::<Vec<u32>>()
    };
    assert_eq!(bits(&a), bits(&b));
}

// ---- NCCL (feature `nccl`) ------------------------------------------------------------------

/// One rank (the whole vocabulary as its shard, padded): the all-gather is a copy, the merge of
/// one shard gives the reference's outputs; a padded shard's padding is never read.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs a CUDA GPU and libnccl: cargo test --features cuda,nccl --test gpu -- --include-ignored cuda_fused::"]
fn nccl_single_rank_gather_and_merge() {
    use cudarc::nccl::Comm;
    use infopo_kernels::cuda::nccl::nccl_present;
    assert!(nccl_present(), "libnccl is not loadable on this machine");
    let gpu = gpu();
    let s = gpu.stream().clone();
    let comm = Comm::from_devices(vec![s.clone()]).expect("a one-rank NCCL communicator").remove(0);
    let (n, v, width) = (37usize, 32003usize, 32016usize);
    let (r, m, t) = generate(&Spec { neg_inf: 0.05, ..Spec::new(n, v) }, 31);
    let (r, m) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
    let range = shard_ranges(v, 1).unwrap()[0];
    let params = Params::default();
    let targets = s.clone_htod(&t).unwrap();
    let local = shard_states(&gpu, (&r, &m), &targets.as_view(), (n, v), range, width, &params);
    let got = gpu.gather_merge_shards(&comm, &local.as_view(), &targets.as_view(), v, width, &params).unwrap();
    compare_rows(&got, &to_f64(&r), &to_f64(&m), &t, v, 1.0, "nccl one rank");
    // The fused path on the (one) lm_head shard, in chunks: K states gathered and merged.
    let c = case(n, 16, v, 5);
    let (hr, hm, hh) =
        (s.clone_htod(&c.real).unwrap(), s.clone_htod(&c.masked).unwrap(), s.clone_htod(&c.head).unwrap());
    let inputs = DeviceHiddenInputs {
        real_hidden: hr.as_view(),
        masked_hidden: hm.as_view(),
        lm_head: hh.as_view(),
        rows: n,
        hidden: 16,
        vocab: v,
    };
    let ct = s.clone_htod(&c.targets).unwrap();
    let chunk = 5000;
    let mut states = s.alloc_zeros::<f32>(v.div_ceil(chunk) * n * 8).unwrap();
    gpu.score_hidden_shard_states(&inputs, v, (0, 1), &ct.as_view(), &params, chunk, &mut states.as_view_mut())
        .unwrap();
    let got = gpu.gather_merge_shards(&comm, &states.as_view(), &ct.as_view(), v, chunk, &params).unwrap();
    let (x, y) = (logits(&c.real, &c.head, n, 16, v), logits(&c.masked, &c.head, n, 16, v));
    compare_rows(&got, &x, &y, &c.targets, v, 1.0, "nccl one rank, fused shard");
    // A gather buffer of the wrong size is a typed error, nothing launched.
    let mut small = s.alloc_zeros::<f32>(n * 8 - 8).unwrap();
    assert!(matches!(
        gpu.all_gather_states(&comm, &local.as_view(), &mut small.as_view_mut()),
        Err(Error::Shape { .. })
    ));
}

/// P ranks in one process (a thread each, device `rank`, the communicator made with
/// `Comm::from_rank` as separate processes make it), uneven and padded shards: every rank's
/// `gather_merge_shards` is bitwise the merge of all P shard states on one device (the
/// unsharded fold), and that matches the f64 reference. Odd ranks run the collective on a stream
/// of their own with cudarc's event tracking off (our joins alone order it), even ranks on the
/// backend's stream. P = 3 also gathers the fused path's K chunk states per rank.
#[cfg(feature = "nccl")]
#[test]
#[ignore = "needs CUDA GPUs and libnccl (up to 8 devices; fewer skip the larger worlds) or the CPU stand-in: cargo test --features cuda,nccl --test gpu -- --include-ignored cuda_fused::"]
fn nccl_ranks_agree_bitwise_with_the_unsharded_merge() {
    use cudarc::driver::CudaContext;
    use cudarc::nccl::{Comm, Id};
    let devices = CudaContext::device_count().unwrap() as usize;
    for (world, n, v) in [(2usize, 19usize, 32003usize), (3, 11, 1000), (8, 5, 50257)] {
        if world > devices {
            eprintln!("{world} ranks need {world} devices, this machine has {devices}: skipped");
            continue;
        }
        let (r, m, t) = generate(&Spec { neg_inf: 0.05, ..Spec::new(n, v) }, 40 + world as u64);
        let (r, m) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
        let ranges = shard_ranges(v, world).unwrap();
        let width = v.div_ceil(world);
        let params = Params::default();
        // The fused shard path's inputs (P = 3 only): hidden states and the whole lm_head.
        let c = case(n, 16, v, 7);
        let chunk = 150;
        // The unsharded fold: every shard's states on device 0, merged there.
        let gpu0 = gpu();
        let s0 = gpu0.stream().clone();
        let targets0 = s0.clone_htod(&t).unwrap();
        let mut all = Vec::new();
        for range in &ranges {
            let states = shard_states(&gpu0, (&r, &m), &targets0.as_view(), (n, v), *range, width, &params);
            all.extend(s0.clone_dtoh(&states).unwrap());
        }
        let all = s0.clone_htod(&all).unwrap();
        let unsharded = gpu0.merge_range_states(&all.as_view(), &ranges, &targets0.as_view(), v, &params).unwrap();
        compare_rows(&unsharded, &to_f64(&r), &to_f64(&m), &t, v, 1.0, &format!("unsharded fold, P = {world}"));

        let id = Id::new().unwrap();
        let per_rank: Vec<(RowOutputs, Option<RowOutputs>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (r, m, t, c, ranges, params) = (&r, &m, &t, &c, &ranges, &params);
                    scope.spawn(move || {
                        let ctx = CudaContext::new(rank).unwrap();
                        if rank % 2 == 1 {
                            // As candle can: no cudarc events, so only our own stream joins
                            // order the collective after the scoring and the merge after it.
                            // SAFETY: before any buffer of this context exists.
                            unsafe { ctx.disable_event_tracking() };
                        }
                        let gpu = CudaBackend::with_stream(ctx.default_stream()).unwrap();
                        let s = gpu.stream().clone();
                        let comm_stream = if rank % 2 == 1 { ctx.new_stream().unwrap() } else { s.clone() };
                        let comm = Comm::from_rank(comm_stream, rank, world, id).unwrap();
                        let range = ranges[rank];
                        let tg = s.clone_htod(t).unwrap();
                        let local = shard_states(&gpu, (r, m), &tg.as_view(), (n, v), range, width, params);
                        let got =
                            gpu.gather_merge_shards(&comm, &local.as_view(), &tg.as_view(), v, width, params).unwrap();
                        let fused = (world == 3).then(|| {
                            // This rank's lm_head rows, in its padded shard width (padding zero).
                            let mut head = vec![0.0f32; width * c.d];
                            head[..range.len * c.d].copy_from_slice(&c.head[range.start * c.d..range.end() * c.d]);
                            let (hr, hm, hh) = (
                                s.clone_htod(&c.real).unwrap(),
                                s.clone_htod(&c.masked).unwrap(),
                                s.clone_htod(&head).unwrap(),
                            );
                            let inputs = DeviceHiddenInputs {
                                real_hidden: hr.as_view(),
                                masked_hidden: hm.as_view(),
                                lm_head: hh.as_view(),
                                rows: n,
                                hidden: c.d,
                                vocab: width,
                            };
                            let ct = s.clone_htod(&c.targets).unwrap();
                            let k = shard_chunk_ranges(v, world, rank, chunk).unwrap().len();
                            let mut states = s.alloc_zeros::<f32>(k * n * 8).unwrap();
                            gpu.score_hidden_shard_states(
                                &inputs,
                                v,
                                (rank, world),
                                &ct.as_view(),
                                params,
                                chunk,
                                &mut states.as_view_mut(),
                            )
                            .unwrap();
                            gpu.gather_merge_shards(&comm, &states.as_view(), &ct.as_view(), v, chunk, params).unwrap()
                        });
                        (got, fused)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let bits = |o: &RowOutputs| {
            [&o.lse_real, &o.lse_masked, &o.log_ratio, &o.kl, &o.entropy_real]
                .iter()
                .flat_map(|v| v.iter().map(|x| x.to_bits()))
                .collect::<Vec<u32>>()
        };
        for (rank, (got, fused)) in per_rank.iter().enumerate() {
            assert_eq!(bits(got), bits(&unsharded), "P = {world}: rank {rank} differs from the unsharded fold");
            if let Some(f) = fused {
                assert_eq!(bits(f), bits(&per_rank[0].1.clone().unwrap()), "P = {world}: fused, rank {rank} vs rank 0");
                let (x, y) = (logits(&c.real, &c.head, n, c.d, v), logits(&c.masked, &c.head, n, c.d, v));
                compare_rows(f, &x, &y, &c.targets, v, 1.0, &format!("fused shards, P = {world}, rank {rank}"));
            }
        }
    }
}
