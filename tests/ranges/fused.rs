//! The fused CPU path (`infopo_kernels::reference::score_hidden`): hidden states and the lm_head weight, logits
//! computed in f64 chunk by chunk and never stored, against the naive oracle on the logits
//! materialised in f64 here (a plain dot product per logit).

use crate::common;

use common::{close, oracle_code, oracle_row};
use half::{bf16, f16};
use infopo_kernels::reference::score_hidden;
use infopo_kernels::{Error, LogitElement, Params};
use infopo_kernels::{HiddenInputs, DEFAULT_CHUNK};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Case {
    real: Vec<f32>,
    masked: Vec<f32>,
    head: Vec<f32>,
    targets: Vec<i64>,
    n: usize,
    d: usize,
    v: usize,
}

impl Case {
    /// The f32 inputs as the fused API takes them.
    fn inputs(&self) -> HiddenInputs<'_, f32> {
        HiddenInputs {
            real_hidden: &self.real,
            masked_hidden: &self.masked,
            lm_head: &self.head,
            rows: self.n,
            hidden: self.d,
            vocab: self.v,
        }
    }
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

/// Row `r` of hidden · headᵀ in f64, from the values as rounded to T.
fn logits_row<T: LogitElement>(hidden: &[T], head: &[T], r: usize, d: usize, v: usize) -> Vec<f64> {
    let h: Vec<f64> = hidden[r * d..(r + 1) * d].iter().map(|x| x.to_f32() as f64).collect();
    (0..v).map(|j| head[j * d..(j + 1) * d].iter().zip(&h).map(|(w, h)| w.to_f32() as f64 * h).sum::<f64>()).collect()
}

fn check<T: LogitElement>(c: &Case, temperature: f64, chunk: usize) {
    let conv = |x: &[f32]| x.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>();
    let (real, masked, head) = (conv(&c.real), conv(&c.masked), conv(&c.head));
    let inputs =
        HiddenInputs { real_hidden: &real, masked_hidden: &masked, lm_head: &head, rows: c.n, hidden: c.d, vocab: c.v };
    let got = score_hidden(0, &inputs, &c.targets, &Params { temperature, ..Params::default() }, chunk).unwrap();
    for (r, g) in got.iter().enumerate() {
        let (x, y) = (logits_row(&real, &head, r, c.d, c.v), logits_row(&masked, &head, r, c.d, c.v));
        let o = oracle_row(&x, &y, c.targets[r] as usize, temperature);
        let what = format!("{} N={} D={} V={} chunk={chunk} τs={temperature} row {r}", T::DTYPE, c.n, c.d, c.v);
        for (name, a, b) in [
            ("lse_real", g.lse_real, o.lse_real),
            ("lse_masked", g.lse_masked, o.lse_masked),
            ("log_ratio", g.log_ratio, o.log_ratio),
            ("kl", g.kl, o.kl),
            ("entropy_real", g.entropy_real, o.entropy_real),
        ] {
            assert!(close(a, b, 1e-10, 1e-10), "{what} {name}: fused {a}, materialised {b}");
        }
    }
}

#[test]
fn fused_matches_the_materialised_f64_path() {
    for &(n, d, v) in &[(3usize, 16usize, 50257usize), (2, 24, 32003)] {
        let c = case(n, d, v, (n + d + v) as u64);
        for chunk in [DEFAULT_CHUNK, 1000, v, v + 7] {
            check::<f32>(&c, 1.0, chunk);
        }
        check::<bf16>(&c, 0.7, 4096);
        check::<f16>(&c, 2.0, 3000);
    }
    // Tiny chunks (one token id each) on a small vocabulary.
    let c = case(4, 8, 97, 5);
    for chunk in [1, 2, 13] {
        check::<f32>(&c, 1.0, chunk);
    }
}

#[test]
fn fused_row_errors_match_the_materialised_path() {
    let mut c = case(4, 8, 300, 1);
    c.targets[2] = 300; // out of range
    c.real[3 * 8 + 5] = f32::NAN; // every real logit of row 3 NaN
    let inputs = c.inputs();
    let got = score_hidden(0, &inputs, &c.targets, &Params::default(), 64);
    let want = (0..c.n).find_map(|r| {
        let x = logits_row(&c.real, &c.head, r, c.d, c.v);
        let y = logits_row(&c.masked, &c.head, r, c.d, c.v);
        oracle_code(&x, &y, c.targets[r]).map(|k| (r, k))
    });
    match (got, want) {
        (Err(Error::Row { row, kind, target }), Some((r, k))) => {
            assert_eq!((row, kind, target), (r, k, Some(c.targets[r])));
        }
        (g, w) => panic!("fused {g:?}, oracle {w:?}"),
    }
    // Rows that are a slice of a batch starting at row 1000 are named by their global index.
    match score_hidden(1000, &inputs, &c.targets, &Params::default(), 64) {
        Err(Error::Row { row, .. }) => assert_eq!(Some(row), want.map(|(r, _)| 1000 + r)),
        g => panic!("fused at first_row 1000: {g:?}"),
    }
}

#[test]
fn fused_bad_shapes_are_typed_errors() {
    let c = case(2, 4, 10, 2);
    let ok = c.inputs();
    assert!(score_hidden(0, &ok, &c.targets, &Params::default(), 3).is_ok());
    let shape = |r: infopo_kernels::Result<_>| matches!(r, Err(Error::Shape { .. }));
    assert!(shape(score_hidden(0, &HiddenInputs { hidden: 5, ..ok }, &c.targets, &Params::default(), 3)));
    assert!(shape(score_hidden(0, &HiddenInputs { lm_head: &c.head[..36], ..ok }, &c.targets, &Params::default(), 3)));
    assert!(shape(score_hidden(
        0,
        &HiddenInputs { masked_hidden: &c.masked[..4], ..ok },
        &c.targets,
        &Params::default(),
        3
    )));
    assert!(shape(score_hidden(0, &ok, &c.targets[..1], &Params::default(), 3)));
    assert!(shape(score_hidden(0, &ok, &c.targets, &Params::default(), 0)));
    assert!(matches!(
        score_hidden(0, &HiddenInputs { vocab: 0, lm_head: &[], ..ok }, &c.targets, &Params::default(), 3),
        Err(Error::EmptyVocab)
    ));
    assert!(matches!(
        score_hidden(0, &ok, &c.targets, &Params { temperature: 1e4, ..Params::default() }, 3),
        Err(Error::Param { .. })
    ));
}

/// The emulated GPU path (f32 chunk GEMMs, then the kernel source in partial-state mode per
/// chunk, folded in vocabulary order) against the float64 reference on the f64 logits, to the
/// kernels' tolerance: V = 32003 and 50257, bf16 and f32, chunks that do and do not divide V;
/// the same row error as the reference, naming the global row.
#[test]
fn fused_emulated_matches_the_f64_reference() {
    use common::kernel::compare_rows;
    use infopo_kernels::emulated::Emulated;
    use infopo_kernels::reference::to_outputs;

    fn rows_of<T: LogitElement>(hidden: &[T], head: &[T], n: usize, d: usize, v: usize) -> Vec<f64> {
        (0..n).flat_map(|r| logits_row(hidden, head, r, d, v)).collect()
    }
    fn run<T: LogitElement>(b: &Emulated, c: &Case, temperature: f64, chunk: usize) {
        let conv = |x: &[f32]| x.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>();
        let (real, masked, head) = (conv(&c.real), conv(&c.masked), conv(&c.head));
        let inputs = HiddenInputs {
            real_hidden: &real,
            masked_hidden: &masked,
            lm_head: &head,
            rows: c.n,
            hidden: c.d,
            vocab: c.v,
        };
        let params = Params { temperature, ..Params::default() };
        let got = b.score_hidden(0, &inputs, &c.targets, &params, chunk).unwrap();
        let out = to_outputs(&got);
        let what = format!("emulated fused {} N={} D={} V={} chunk={chunk} τs={temperature}", T::DTYPE, c.n, c.d, c.v);
        let (x, y) = (rows_of(&real, &head, c.n, c.d, c.v), rows_of(&masked, &head, c.n, c.d, c.v));
        compare_rows(&out, &x, &y, &c.targets, c.v, temperature, &what);
    }
    let b = Emulated::new();
    for &(n, d, v) in &[(3usize, 32usize, 32003usize), (2, 24, 50257)] {
        let c = case(n, d, v, (7 * n + d + v) as u64);
        run::<f32>(&b, &c, 1.0, 8192);
        run::<bf16>(&b, &c, 0.7, 10_000);
        run::<f32>(&b, &c, 1.3, v);
    }
    // A row error: every real logit of row 1 NaN, reported as the reference reports it.
    let mut c = case(3, 8, 32003, 9);
    c.real[8..16].fill(f32::NAN);
    let inputs = c.inputs();
    let want = score_hidden(40, &inputs, &c.targets, &Params::default(), 4096);
    let got = b.score_hidden(40, &inputs, &c.targets, &Params::default(), 4096);
    match (got, want) {
        (Err(Error::Row { row: a, kind: k, .. }), Err(Error::Row { row: w, kind: kw, .. })) => {
            assert_eq!((a, k), (w, kw));
            assert_eq!(a, 41);
        }
        (g, w) => panic!("emulated {g:?}, reference {w:?}"),
    }
}

// ------------------------------------------------------------------------------------------
// Fused-linear batches and files through the Backend API (issue 9 "Done when": fused-linear
// files give the float64 reference's outputs on the CPU and emulated backends, bf16 and f32,
// V = 50257 and 32003, with and without turns).

use common::kernel::{check_epilogue, compare_rows, epilogue_feed, EPILOGUE_TOL};
use common::{assert_close, oracle_batch_advantages, oracle_token_advantage, random_layout, RandomLayout};
use infopo_kernels::io::{self, Input};
use infopo_kernels::{Backend, Estimator, Output, Trajectories, Turns};
use infopo_kernels::{HiddenBatch, HiddenTensors, OwnedHiddenBatch};

/// A turn layout over `rows` rows with credit starts: each trajectory's turns credit
/// consecutive spans of its response, from token 0 (`random_layout` leaves room for them).
fn layout_with_starts(rows: usize, seed: u64) -> (RandomLayout, Vec<u32>) {
    let mut rng = infopo_kernels::synth::Rng::new(seed);
    let l = random_layout(&mut rng, rows, 4, 3, 2);
    let starts = infopo_kernels::synth::consecutive_credit_starts(&l.turn_traj, &l.credit, 0);
    (l, starts)
}

/// One fused-linear file case: the inputs in dtype T and the f64 logits they define.
struct FileCase<T> {
    real: Vec<T>,
    masked: Vec<T>,
    head: Vec<T>,
    c: Case,
    layout: Option<(RandomLayout, Vec<u32>)>,
    /// hidden · lm_headᵀ in f64 of the T-rounded values, `[N, V]`.
    real_logits: Vec<f64>,
    masked_logits: Vec<f64>,
}

impl<T: LogitElement> FileCase<T> {
    fn new(n: usize, d: usize, v: usize, with_turns: bool, seed: u64) -> Self {
        let c = case(n, d, v, seed);
        let conv = |x: &[f32]| x.iter().map(|&e| T::from_f32(e)).collect::<Vec<T>>();
        let (real, masked, head) = (conv(&c.real), conv(&c.masked), conv(&c.head));
        let rows_of = |h: &[T]| (0..n).flat_map(|r| logits_row(h, &head, r, d, v)).collect::<Vec<f64>>();
        let (real_logits, masked_logits) = (rows_of(&real), rows_of(&masked));
        let layout = with_turns.then(|| layout_with_starts(n, seed + 1));
        FileCase { real, masked, head, c, layout, real_logits, masked_logits }
    }

    fn batch(&self) -> HiddenBatch<'_> {
        let c = &self.c;
        let tensors = HiddenTensors::new(
            infopo_kernels::LogitData::from_slice(&self.real),
            infopo_kernels::LogitData::from_slice(&self.masked),
            infopo_kernels::LogitData::from_slice(&self.head),
            c.n,
            c.d,
            c.v,
        )
        .unwrap();
        let batch = HiddenBatch::rows(tensors, &c.targets);
        match &self.layout {
            None => batch,
            Some((l, starts)) => batch
                .with_turns(Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit })
                .with_trajectories(Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens })
                .with_credit_start(starts),
        }
    }

    /// Writes the batch as a fused-linear input file and reads it back (memory-mapped).
    fn through_file(&self, dir: &std::path::Path) -> OwnedHiddenBatch {
        let path = dir.join(format!("{}-{}.safetensors", T::DTYPE, self.c.v));
        io::write_hidden_input(&path, &self.batch()).unwrap();
        match io::read_any_input(&path).unwrap() {
            Input::Hidden(b) => {
                assert!(b.real_hidden.is_mapped() && b.masked_hidden.is_mapped() && b.lm_head.is_mapped());
                assert_eq!(
                    (b.rows, b.hidden, b.vocab, b.real_hidden.dtype()),
                    (self.c.n, self.c.d, self.c.v, T::DTYPE)
                );
                b
            }
            Input::Logits(_) => panic!("a fused-linear file read back as logits"),
        }
    }

    /// `out` of backend `b` against the naive oracle on the f64 logits: rows to `row_check`,
    /// turns and advantages (fed what `b`'s epilogue reads) to [`EPILOGUE_TOL`].
    fn check(&self, b: &dyn Backend, out: &Output, params: &Params, what: &str, row_check: impl Fn(&Output)) {
        row_check(out);
        let Some((l, starts)) = &self.layout else {
            assert!(out.turn_info.is_none() && out.advantages.is_none(), "{what}: rows only");
            return;
        };
        let (x, y, t) = (&self.real_logits, &self.masked_logits, &self.c.targets);
        let est = epilogue_feed(b, out, params.estimator, x, y, t, params.temperature);
        let turns = Turns { offsets: &l.offsets, trajectory: &l.turn_traj, credit_tokens: &l.credit };
        let traj = Trajectories { group: &l.group, outcome: &l.outcome, tokens: &l.tokens };
        check_epilogue(out, &est, &turns, &traj, params);
        let o = oracle_batch_advantages(&est, &turns, &traj, params);
        let tokens = oracle_token_advantage(&o, &l.turn_traj, &l.credit, starts, &l.tokens);
        let got = out.advantages.as_ref().unwrap().token_advantage.as_ref().expect("token_advantage");
        assert_close(&format!("{what} token_advantage"), got, &tokens, EPILOGUE_TOL, EPILOGUE_TOL);
    }
}

/// The cases of the "Done when" list: each dtype and each V with and without turns.
fn file_cases() -> [(usize, bool, bool); 4] {
    // (V, bf16 rather than f32, with turns)
    [(50257, true, true), (50257, false, false), (32003, false, true), (32003, true, false)]
}

fn params_for(with_turns: bool) -> Params {
    // The KL estimator where there are turns (the log-ratio is the other cases' default).
    if with_turns {
        Params { estimator: Estimator::Kl, temperature: 0.8, ..Params::default() }
    } else {
        Params::default()
    }
}

fn cpu_file_case<T: LogitElement>(dir: &std::path::Path, (n, d, v): (usize, usize, usize), with_turns: bool) {
    use infopo_kernels::Cpu;
    let fc = FileCase::<T>::new(n, d, v, with_turns, (v + d) as u64 + with_turns as u64);
    let owned = fc.through_file(dir);
    let batch = owned.as_batch().unwrap();
    let params = params_for(with_turns);
    for chunk in [DEFAULT_CHUNK, 1000, v, 3 * v] {
        let what = format!("cpu {} V={v} turns={with_turns} chunk={chunk}", T::DTYPE);
        let out = Cpu.compute_hidden(&batch, &params, chunk).unwrap();
        // Rows: the f64 values rounded once to f32.
        fc.check(&Cpu, &out, &params, &what, |out| {
            for r in 0..fc.c.n {
                let range = r * v..(r + 1) * v;
                let o = oracle_row(
                    &fc.real_logits[range.clone()],
                    &fc.masked_logits[range],
                    fc.c.targets[r] as usize,
                    params.temperature,
                );
                for (name, g, w) in [
                    ("lse_real", out.rows.lse_real[r], o.lse_real),
                    ("lse_masked", out.rows.lse_masked[r], o.lse_masked),
                    ("log_ratio", out.rows.log_ratio[r], o.log_ratio),
                    ("kl", out.rows.kl[r], o.kl),
                    ("entropy_real", out.rows.entropy_real[r], o.entropy_real),
                ] {
                    assert!(close(g as f64, w, 1e-12, 1e-7), "{what} row {r} {name}: {g} vs oracle {w}");
                }
            }
        });
    }
}

#[test]
fn fused_linear_files_match_the_f64_reference_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    for (v, bf, with_turns) in file_cases() {
        // The CPU is cheap: every dtype with every V, with and without turns.
        for with_turns in [with_turns, !with_turns] {
            if bf {
                cpu_file_case::<bf16>(dir.path(), (9, 16, v), with_turns);
            } else {
                cpu_file_case::<f32>(dir.path(), (9, 16, v), with_turns);
            }
        }
    }
    cpu_file_case::<f16>(dir.path(), (9, 16, 32003), true);
}

fn emulated_file_case<T: LogitElement>(
    dir: &std::path::Path,
    (n, d, v): (usize, usize, usize),
    with_turns: bool,
    chunk: usize,
) {
    kernel_file_case::<T>(&infopo_kernels::emulated::Emulated::new(), dir, (n, d, v), with_turns, chunk);
}

/// A fused-linear file through a kernel backend's `compute_hidden` (f32 chunk GEMMs, the kernel
/// per chunk, its merge launch with the turns and the epilogue) against the f64 oracle.
fn kernel_file_case<T: LogitElement>(
    b: &dyn Backend,
    dir: &std::path::Path,
    (n, d, v): (usize, usize, usize),
    with_turns: bool,
    chunk: usize,
) {
    let fc = FileCase::<T>::new(n, d, v, with_turns, 3 * (v + d) as u64 + with_turns as u64);
    let owned = fc.through_file(dir);
    let params = params_for(with_turns);
    let out = b.compute_hidden(&owned.as_batch().unwrap(), &params, chunk).unwrap();
    let what = format!("{} {} V={v} turns={with_turns} chunk={chunk}", b.name(), T::DTYPE);
    fc.check(b, &out, &params, &what, |out| {
        compare_rows(&out.rows, &fc.real_logits, &fc.masked_logits, &fc.c.targets, v, params.temperature, &what)
    });
}

/// The same cases on the GPU: cuBLAS chunk GEMMs, the kernel per chunk, the device merge.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: cargo test --release --features cuda --test ranges -- --include-ignored fused::fused_linear_files_match_the_f64_reference_on_cuda"]
fn fused_linear_files_match_the_f64_reference_on_cuda() {
    let gpu = infopo_kernels::cuda::CudaBackend::new(0).expect("a CUDA GPU");
    let dir = tempfile::tempdir().unwrap();
    for ((v, bf, with_turns), chunk) in file_cases().into_iter().zip([8192, 10_000, 9000, 16_384]) {
        if bf {
            kernel_file_case::<bf16>(&gpu, dir.path(), (6, 24, v), with_turns, chunk);
        } else {
            kernel_file_case::<f32>(&gpu, dir.path(), (6, 24, v), with_turns, chunk);
        }
    }
    kernel_file_case::<bf16>(&gpu, dir.path(), (64, 2048, 32003), true, DEFAULT_CHUNK);
}

#[test]
fn fused_linear_files_match_the_f64_reference_on_the_emulated_kernel() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks that do not divide V (the last one short), one per case.
    for ((v, bf, with_turns), chunk) in file_cases().into_iter().zip([8192, 10_000, 9000, 16_384]) {
        if bf {
            emulated_file_case::<bf16>(dir.path(), (6, 24, v), with_turns, chunk);
        } else {
            emulated_file_case::<f32>(dir.path(), (6, 24, v), with_turns, chunk);
        }
    }
}

/// A model-sized hidden width (D = 2048): the f32 chunk GEMMs of the emulated path stay within
/// the kernels' row tolerance, the f64 reference within f32 rounding.
#[test]
fn fused_linear_files_at_a_model_width() {
    let dir = tempfile::tempdir().unwrap();
    cpu_file_case::<bf16>(dir.path(), (4, 2048, 32003), true);
    emulated_file_case::<bf16>(dir.path(), (4, 2048, 32003), true, DEFAULT_CHUNK);
}

/// The two-stage form: `score_hidden_rows` of micro-batches (rows named globally), a
/// `TurnAccumulator` and `advantages` give `compute_hidden`'s outputs (the CPU's rows in f32,
/// so its epilogue inputs differ by their f32 rounding).
#[test]
fn fused_two_stage_micro_batches_match_one_call() {
    use infopo_kernels::emulated::Emulated;
    use infopo_kernels::Cpu;
    use infopo_kernels::{advantages, TurnAccumulator};
    let fc = FileCase::<bf16>::new(9, 16, 3001, true, 77);
    let batch = fc.batch();
    let layout = batch.validate().unwrap().unwrap();
    let params = Params::default();
    let backends: [&dyn Backend; 2] = [&Cpu, &Emulated::new()];
    for b in backends {
        let whole = b.compute_hidden(&batch, &params, 1000).unwrap();
        let mut acc = TurnAccumulator::for_layout(&layout);
        for (r0, n) in [(0usize, 4usize), (4, 0), (4, 5)] {
            let part = batch.tensors.slice_rows(r0, n).unwrap();
            let rows = b.score_hidden_rows(r0, &part, &batch.targets[r0..r0 + n], &params, 1000).unwrap();
            assert_eq!(rows.kl[..], whole.rows.kl[r0..r0 + n], "{} rows {r0}+{n}", b.name());
            acc.add_rows(&layout, r0, rows.estimator(params.estimator)).unwrap();
        }
        let info = acc.info();
        let tol = if b.epilogue_reads_f64_rows() { 1e-6 } else { 0.0 };
        assert_close(&format!("{} turn_info", b.name()), &info, whole.turn_info.as_ref().unwrap(), tol, tol);
        let adv = advantages(&info, &layout, &params).unwrap();
        let want = whole.advantages.as_ref().unwrap();
        if !b.epilogue_reads_f64_rows() {
            // The same f32 rows; the kernel's epilogue (run in the merge launch) and the host's
            // sum them in different orders, so they agree to f64 rounding, not bit for bit.
            let name = b.name();
            assert_close(&format!("{name} turn_intrinsic"), &adv.turn_intrinsic, &want.turn_intrinsic, 0.0, 1e-12);
            assert_close(&format!("{name} turn_bonus"), &adv.turn_bonus, &want.turn_bonus, 0.0, 1e-12);
            assert_close(
                &format!("{name} advantage"),
                &adv.trajectory_advantage,
                &want.trajectory_advantage,
                0.0,
                1e-12,
            );
            assert_close(&format!("{name} gate"), &adv.trajectory_gate, &want.trajectory_gate, 0.0, 1e-12);
            let (got, exp) = (adv.token_advantage.as_ref().unwrap(), want.token_advantage.as_ref().unwrap());
            assert_close(&format!("{name} token_advantage"), got, exp, 0.0, 1e-12);
        }
    }
}

#[test]
fn fused_batch_errors_are_typed() {
    use infopo_kernels::Cpu;
    use infopo_kernels::LogitData;
    let c = case(4, 8, 50, 3);
    let head16: Vec<bf16> = c.head.iter().map(|&x| bf16::from_f32(x)).collect();
    // One dtype for the three tensors: the error names the tensor and the dtype expected.
    let err = HiddenTensors::new(
        LogitData::from_slice(&c.real),
        LogitData::from_slice(&c.masked),
        LogitData::from_slice(&head16),
        4,
        8,
        50,
    )
    .unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedDtype { tensor: "lm_head", .. }) && err.to_string().contains("f32"),
        "{err}"
    );
    // A width D that does not fit the lm_head.
    let err = HiddenTensors::new(
        LogitData::from_slice(&c.real),
        LogitData::from_slice(&c.masked),
        LogitData::from_slice(&c.head[..49 * 8]),
        4,
        8,
        50,
    )
    .unwrap_err();
    assert!(matches!(&err, Error::Shape { .. }) && err.to_string().contains("lm_head"), "{err}");
    let tensors = HiddenTensors::from_inputs(&c.inputs()).unwrap();
    // The typed view a generic backend entry point takes: only in the tensors' own dtype.
    let typed = tensors.typed::<f32>().expect("f32 tensors");
    assert_eq!((typed.lm_head, typed.rows, typed.hidden, typed.vocab), (&c.head[..], 4, 8, 50));
    let err = tensors.typed::<bf16>().unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { tensor: "real_hidden", expected: "bf16", .. }), "{err}");
    assert!(tensors.typed::<f16>().is_err());
    // Targets of the wrong length; trajectories without turns; a bad turn layout.
    let short = HiddenBatch::rows(tensors, &c.targets[..3]);
    assert!(matches!(Cpu.compute_hidden(&short, &Params::default(), 16), Err(Error::Shape { .. })));
    let traj = Trajectories { group: &[0], outcome: &[1.0], tokens: &[4] };
    let orphan = HiddenBatch::rows(tensors, &c.targets).with_trajectories(traj);
    assert!(matches!(Cpu.compute_hidden(&orphan, &Params::default(), 16), Err(Error::Trajectories { .. })));
    let turns = Turns { offsets: &[0, 3], trajectory: &[0], credit_tokens: &[1] };
    let bad = HiddenBatch::rows(tensors, &c.targets).with_turns(turns);
    assert!(matches!(Cpu.compute_hidden(&bad, &Params::default(), 16), Err(Error::Turns { .. })));
    // A row error names the global row on both backends; chunk 0 is a shape error.
    let mut targets = c.targets.clone();
    targets[2] = 50;
    let batch = HiddenBatch::rows(tensors, &targets);
    let emulated = infopo_kernels::emulated::Emulated::new();
    let backends: [&dyn Backend; 2] = [&Cpu, &emulated];
    for b in backends {
        match b.compute_hidden(&batch, &Params::default(), 16) {
            Err(Error::Row { row: 2, kind: infopo_kernels::RowErrorKind::TargetOutOfRange, .. }) => {}
            other => panic!("{}: {other:?}", b.name()),
        }
        assert!(matches!(b.compute_hidden(&batch, &Params::default(), 0), Err(Error::Shape { .. })));
    }
    // Owned batches check their tensors when made.
    let err = OwnedHiddenBatch::new(c.real.clone(), c.masked.clone(), head16, 8, 50, c.targets.clone()).unwrap_err();
    assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
}

/// With trajectories, a row whose KL is +∞ (masked logits ≤ −2¹⁰⁰, i.e. −∞, on tokens where
/// the real policy has mass) is the same NonFiniteTurn error as on the materialised logits,
/// naming its turn and row, on both backends. Row 5's masked hidden state is 1e32 in dimension 0
/// and the lm_head's column 0 is −1 except at row 5's target, so that row's masked logits are
/// about −1e32 everywhere but at its target.
#[test]
fn fused_non_finite_information_gain_names_turn_and_row() {
    use infopo_kernels::emulated::Emulated;
    use infopo_kernels::Cpu;
    use infopo_kernels::{Batch, Logits};
    let (n, d, v) = (9, 16, 500);
    let mut fc = FileCase::<f32>::new(n, d, v, true, 91);
    let target = fc.c.targets[5] as usize;
    for j in 0..v {
        fc.head[j * d] = if j == target { 0.0 } else { -1.0 };
    }
    fc.masked[5 * d] = 1e32;
    let params = Params { estimator: Estimator::Kl, ..Params::default() };
    let batch = fc.batch();
    // The same batch as f32 logits (finite values rounded; the fills stay below −2¹⁰⁰).
    let logits =
        |h: &[f32]| -> Vec<f32> { (0..n).flat_map(|r| logits_row(h, &fc.head, r, d, v)).map(|x| x as f32).collect() };
    let (real, masked) = (logits(&fc.real), logits(&fc.masked));
    let mut on_logits =
        Batch::rows(Logits::new(&real, n, v).unwrap(), Logits::new(&masked, n, v).unwrap(), &fc.c.targets);
    on_logits.turns = batch.turns;
    on_logits.trajectories = batch.trajectories;
    on_logits.credit_start = batch.credit_start;
    let want = match Cpu.compute(&on_logits, &params) {
        Err(Error::NonFiniteTurn { turn, row }) => (turn, row),
        other => panic!("logits: {other:?}"),
    };
    assert_eq!(want.1, Some(5));
    let emulated = Emulated::new();
    let backends: [&dyn Backend; 2] = [&Cpu, &emulated];
    for b in backends {
        match b.compute_hidden(&batch, &params, 128) {
            Err(Error::NonFiniteTurn { turn, row }) => assert_eq!((turn, row), want, "{}", b.name()),
            other => panic!("{}: {other:?}", b.name()),
        }
        // The log-ratio estimator is finite there: no error.
        b.compute_hidden(&batch, &Params::default(), 128).unwrap();
    }
}

/// A backend with no fused path (the trait's default) reports so with a typed error.
#[test]
fn a_backend_without_a_fused_path_says_so() {
    struct LogitsOnly;
    impl Backend for LogitsOnly {
        fn name(&self) -> &'static str {
            "logits-only"
        }
        fn compute_micro_batched(
            &self,
            batch: &infopo_kernels::Batch<'_>,
            params: &Params,
            cuts: &[usize],
        ) -> infopo_kernels::Result<Output> {
            infopo_kernels::Cpu.compute_micro_batched(batch, params, cuts)
        }
    }
    let c = case(2, 4, 10, 8);
    let tensors = HiddenTensors::from_inputs(&c.inputs()).unwrap();
    let err = LogitsOnly.compute_hidden(&HiddenBatch::rows(tensors, &c.targets), &Params::default(), 4).unwrap_err();
    assert!(matches!(err, Error::BackendUnavailable { backend: "logits-only", .. }), "{err}");
}

/// A batch of no rows (a micro-batch can be empty) gives empty outputs on both backends, as on
/// logits; with a layout of empty turns, info 0.
#[test]
fn fused_empty_batch() {
    use infopo_kernels::emulated::Emulated;
    use infopo_kernels::Cpu;
    let head = vec![0.5f32; 7 * 3];
    let tensors = HiddenTensors::from_inputs(&HiddenInputs {
        real_hidden: &[],
        masked_hidden: &[],
        lm_head: &head,
        rows: 0,
        hidden: 3,
        vocab: 7,
    })
    .unwrap();
    let emulated = Emulated::new();
    let backends: [&dyn Backend; 2] = [&Cpu, &emulated];
    for b in backends {
        let out = b.compute_hidden(&HiddenBatch::rows(tensors, &[]), &Params::default(), 4).unwrap();
        assert!(out.rows.is_empty() && out.turn_info.is_none(), "{}", b.name());
        let turns = Turns { offsets: &[0, 0], trajectory: &[0], credit_tokens: &[1] };
        let out = b.compute_hidden(&HiddenBatch::rows(tensors, &[]).with_turns(turns), &Params::default(), 4).unwrap();
        assert_eq!(out.turn_info, Some(vec![0.0]), "{}", b.name());
    }
}
