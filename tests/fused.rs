//! The fused CPU path (`infopo_kernels::fused`): hidden states and the lm_head weight, logits
//! computed in f64 chunk by chunk and never stored, against the naive oracle on the logits
//! materialised in f64 here (a plain dot product per logit).

mod common;

use common::{close, oracle_code, oracle_row};
use half::{bf16, f16};
use infopo_kernels::fused::{score_hidden, HiddenInputs, DEFAULT_CHUNK};
use infopo_kernels::{Error, LogitElement, Params};
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
    use infopo_kernels::cpu::to_outputs;
    use infopo_kernels::emulated::Emulated;
    use infopo_kernels::fused::score_hidden_emulated;

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
        let got = score_hidden_emulated(b, 0, &inputs, &c.targets, &params, chunk).unwrap();
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
    let got = score_hidden_emulated(&b, 40, &inputs, &c.targets, &Params::default(), 4096);
    match (got, want) {
        (Err(Error::Row { row: a, kind: k, .. }), Err(Error::Row { row: w, kind: kw, .. })) => {
            assert_eq!((a, k), (w, kw));
            assert_eq!(a, 41);
        }
        (g, w) => panic!("emulated {g:?}, reference {w:?}"),
    }
}
