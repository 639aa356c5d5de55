//! Partial row states over vocabulary ranges (`infopo_kernels::vocab`): the states of ranges
//! tiling [0, V), computed on the CPU (f64) or by the kernel in partial-state mode (emulated),
//! merged on the host, give the unsplit outputs and row errors, for Megatron-style shards
//! (p ∈ {1, 2, 3, 8}, padded last shard), uneven splits and any order of the ranges.

use crate::common;

use common::kernel::{compare_rows, generate, peaked, Spec};
use common::{close, to_dtype, to_f64};
use half::{bf16, f16};
use infopo_kernels::emulated::Emulated;
use infopo_kernels::reference::RowValues;
use infopo_kernels::vocab::{merge, merge_outputs, score_range, shard_ranges, RangeInput, RangeStates, VocabRange};
use infopo_kernels::{Error, LogitElement, Logits, Params, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Copies each range's columns of [n, v] logits into its own [n, width] shard, the columns past
/// the range's valid length filled with `pad` (which the scoring must never read).
fn shard_buffers<T: LogitElement>(
    x: &[T],
    n: usize,
    v: usize,
    ranges: &[VocabRange],
    width: usize,
    pad: T,
) -> Vec<Vec<T>> {
    ranges
        .iter()
        .map(|r| {
            let mut s = vec![pad; n * width];
            for row in 0..n {
                s[row * width..row * width + r.len].copy_from_slice(&x[row * v + r.start..row * v + r.end()]);
            }
            s
        })
        .collect()
}

/// Random cut points: `parts` contiguous ranges of [0, v), some possibly empty.
fn uneven_ranges(v: usize, parts: usize, rng: &mut StdRng) -> Vec<VocabRange> {
    let mut cuts: Vec<usize> = (0..parts - 1).map(|_| rng.gen_range(0..=v)).collect();
    cuts.push(0);
    cuts.push(v);
    cuts.sort_unstable();
    cuts.windows(2).map(|w| VocabRange::new(w[0], w[1] - w[0])).collect()
}

/// Equal errors, or values equal to f64 rounding (infinities equal).
#[track_caller]
fn assert_same(got: &Result<Vec<RowValues>>, want: &Result<Vec<RowValues>>, what: &str) {
    match (got, want) {
        (Ok(g), Ok(w)) => {
            assert_eq!(g.len(), w.len(), "{what}: rows");
            for (row, (g, w)) in g.iter().zip(w).enumerate() {
                let pairs = [
                    ("lse_real", g.lse_real, w.lse_real),
                    ("lse_masked", g.lse_masked, w.lse_masked),
                    ("log_ratio", g.log_ratio, w.log_ratio),
                    ("kl", g.kl, w.kl),
                    ("entropy_real", g.entropy_real, w.entropy_real),
                ];
                for (name, a, b) in pairs {
                    assert!(close(a, b, 1e-11, 1e-11), "{what} row {row} {name}: merged {a}, unsplit {b}");
                }
            }
        }
        (Err(Error::Row { row: r1, kind: k1, target: t1 }), Err(Error::Row { row: r2, kind: k2, target: t2 })) => {
            assert_eq!((r1, k1, t1), (r2, k2, t2), "{what}: row errors differ");
        }
        (g, w) => panic!("{what}: merged {g:?}, unsplit {w:?}"),
    }
}

/// The CPU states of every shard, each from its own padded [n, width] buffer.
fn cpu_shards<T: LogitElement>(
    (r, m, targets): (&[T], &[T], &[i64]),
    v: usize,
    ranges: &[VocabRange],
    width: usize,
    temperature: f64,
) -> Vec<RangeStates> {
    let n = targets.len();
    let pad = T::from_f32(f32::NAN);
    let (rs, ms) = (shard_buffers(r, n, v, ranges, width, pad), shard_buffers(m, n, v, ranges, width, pad));
    ranges
        .iter()
        .zip(rs.iter().zip(&ms))
        .map(|(&range, (x, y))| {
            let input = RangeInput::shard(Logits::new(x, n, width).unwrap(), Logits::new(y, n, width).unwrap(), range);
            score_range(&input, targets, &Params { temperature, ..Params::default() }).unwrap()
        })
        .collect()
}

fn unsplit<T: LogitElement>(
    (r, m, targets): (&[T], &[T], &[i64]),
    v: usize,
    temperature: f64,
) -> Result<Vec<RowValues>> {
    let n = targets.len();
    let params = Params { temperature, ..Params::default() };
    infopo_kernels::reference::score(0, Logits::new(r, n, v).unwrap(), Logits::new(m, n, v).unwrap(), targets, &params)
}

#[test]
fn cpu_shards_give_the_unsharded_outputs() {
    let mut rng = StdRng::seed_from_u64(9);
    for &(n, v) in &[(7usize, 5usize), (5, 37), (4, 1000), (3, 5003), (2, 50257)] {
        for (k, &temperature) in [1.0, 0.7, 2.5].iter().enumerate() {
            let seed = (n * 31 + v + k) as u64;
            let spec = Spec { neg_inf: 0.2, temperature, ..Spec::new(n, v) };
            let random = generate(&spec, seed);
            let confident = peaked(n, v, temperature, seed);
            for (name, (r, m, t)) in [("random", random), ("peaked", confident)] {
                let want = unsplit((&r[..], &m[..], &t[..]), v, temperature);
                for p in [1usize, 2, 3, 8] {
                    let shards = shard_ranges(v, p).unwrap();
                    let width = v.div_ceil(p);
                    let what = format!("{name} N={n} V={v} τs={temperature} p={p} shards");
                    let parts = cpu_shards((&r[..], &m[..], &t[..]), v, &shards, width, temperature);
                    assert_same(&merge(0, &parts, &t, v), &want, &what);
                    // Uneven cuts (empty ranges included), given in a random order.
                    let ranges = uneven_ranges(v, p, &mut rng);
                    let mut parts = cpu_shards((&r[..], &m[..], &t[..]), v, &ranges, v, temperature);
                    parts.shuffle(&mut rng);
                    assert_same(&merge(0, &parts, &t, v), &want, &format!("{what} uneven"));
                }
                if name == "peaked" {
                    let parts = cpu_shards((&r[..], &m[..], &t[..]), v, &shard_ranges(v, 3).unwrap(), v, temperature);
                    let out = merge_outputs(0, &parts, &t, v).unwrap();
                    assert!(out.log_ratio.iter().all(|&l| l == 0.0), "peaked: {:?}", out.log_ratio);
                }
            }
        }
    }
}

#[test]
fn every_dtype_and_ranges_of_the_full_logits() {
    let (n, v, temperature) = (6, 2000, 1.3);
    let (r, m, t) = generate(&Spec { neg_inf: 0.1, temperature, ..Spec::new(n, v) }, 3);
    fn check<T: LogitElement>(r: &[f32], m: &[f32], t: &[i64], n: usize, v: usize, temperature: f64) {
        let (r, m) = (to_dtype::<T>(r), to_dtype::<T>(m));
        let want = unsplit((&r[..], &m[..], t), v, temperature);
        let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
        let parts: Vec<RangeStates> = shard_ranges(v, 3)
            .unwrap()
            .into_iter()
            .map(|range| {
                score_range(&RangeInput::of_full(real, masked, range), t, &Params { temperature, ..Params::default() })
                    .unwrap()
            })
            .collect();
        assert_same(&merge(0, &parts, t, v), &want, &format!("{} full-logit ranges", T::DTYPE));
    }
    check::<f32>(&r, &m, &t, n, v, temperature);
    check::<f16>(&r, &m, &t, n, v, temperature);
    check::<bf16>(&r, &m, &t, n, v, temperature);
}

/// The merge folds in vocabulary order: any order of the same ranges gives the same bits.
#[test]
fn merge_is_bitwise_independent_of_range_order() {
    let (n, v) = (9, 3001);
    let (r, m, t) = generate(&Spec { neg_inf: 0.05, ..Spec::new(n, v) }, 17);
    let mut rng = StdRng::seed_from_u64(5);
    let ranges = uneven_ranges(v, 8, &mut rng);
    let mut parts = cpu_shards((&r[..], &m[..], &t[..]), v, &ranges, v, 1.0);
    let first = merge(0, &parts, &t, v).unwrap();
    for _ in 0..5 {
        parts.shuffle(&mut rng);
        let again = merge(0, &parts, &t, v).unwrap();
        for (a, b) in first.iter().zip(&again) {
            let bits = |x: &RowValues| [x.lse_real, x.lse_masked, x.log_ratio, x.kl, x.entropy_real].map(f64::to_bits);
            assert_eq!(bits(a), bits(b));
        }
    }
}

/// Every row error of the unsplit path, where the offending entries sit in one shard or span
/// several (a real side all −∞ across every shard), reported for the same lowest row.
#[test]
fn row_errors_match_the_unsplit_path() {
    let (n, v) = (6usize, 40usize);
    type Edit = fn(&mut [f32], &mut [f32], &mut [i64]);
    let edits: [(&str, Edit); 10] = [
        ("target out of range", |_, _, t| t[3] = 40),
        ("negative target", |_, _, t| t[2] = -1),
        ("real NaN", |x, _, _| x[4 * 40 + 33] = f32::NAN),
        ("masked +inf", |_, y, _| y[3 * 40 + 1] = f32::INFINITY),
        ("real +fill", |x, _, _| x[2 * 40 + 17] = 2f32.powi(100)),
        ("real all -inf", |x, _, _| x[40..80].fill(f32::NEG_INFINITY)),
        ("masked all fills", |_, y, _| y[5 * 40..6 * 40].fill(f32::MIN)),
        ("real target -inf", |x, _, t| x[4 * 40 + t[4] as usize] = f32::NEG_INFINITY),
        ("masked target fill", |_, y, t| y[t[1] as usize + 40] = f32::MIN),
        ("two errors, lowest row wins", |x, y, _| {
            x[5 * 40 + 3] = f32::NAN;
            y[2 * 40..3 * 40].fill(f32::NEG_INFINITY);
        }),
    ];
    for (name, edit) in edits {
        let (mut r, mut m, mut t) = generate(&Spec::new(n, v), 11);
        edit(&mut r, &mut m, &mut t);
        let want = unsplit((&r[..], &m[..], &t[..]), v, 1.0);
        assert!(matches!(want, Err(Error::Row { .. })), "{name}: the edit must make a row error");
        for p in [1usize, 2, 3, 8] {
            let parts = cpu_shards((&r[..], &m[..], &t[..]), v, &shard_ranges(v, p).unwrap(), v.div_ceil(p), 1.0);
            assert_same(&merge(0, &parts, &t, v), &want, &format!("{name} p={p} cpu"));
            let parts = kernel_shards((&r[..], &m[..], &t[..]), v, &shard_ranges(v, p).unwrap(), 1.0);
            let got = merge(0, &parts, &t, v);
            match (&got, &want) {
                (Err(Error::Row { row: a, kind: b, .. }), Err(Error::Row { row: c, kind: d, .. })) => {
                    assert_eq!((a, b), (c, d), "{name} p={p} emulated")
                }
                _ => panic!("{name} p={p} emulated: {got:?} vs {want:?}"),
            }
            // The same rows as a slice of a batch starting at row 500: the error names row 500 + r.
            match (merge(500, &parts, &t, v), &want) {
                (Err(Error::Row { row: a, kind: b, .. }), Err(Error::Row { row: c, kind: d, .. })) => {
                    assert_eq!((a, b), (500 + c, *d), "{name} p={p} first_row 500")
                }
                (g, _) => panic!("{name} p={p} first_row 500: {g:?} vs {want:?}"),
            }
        }
    }
}

/// The emulated kernel's states of each shard (f32 inputs, its own padded buffer).
fn kernel_shards<T: LogitElement>(
    (r, m, targets): (&[T], &[T], &[i64]),
    v: usize,
    ranges: &[VocabRange],
    temperature: f64,
) -> Vec<RangeStates> {
    let n = targets.len();
    let width = ranges.iter().map(|r| r.len).max().unwrap().max(1) + 3; // padded, odd stride
    let pad = T::from_f32(f32::NAN);
    let (rs, ms) = (shard_buffers(r, n, v, ranges, width, pad), shard_buffers(m, n, v, ranges, width, pad));
    ranges
        .iter()
        .zip(rs.iter().zip(&ms))
        .map(|(&range, (x, y))| {
            let input = RangeInput::shard(Logits::new(x, n, width).unwrap(), Logits::new(y, n, width).unwrap(), range);
            let params = Params { temperature, ..Params::default() };
            let raw = Emulated::new().range_states(&input, targets, &params).unwrap();
            RangeStates::from_kernel(range, &raw, &params).unwrap()
        })
        .collect()
}

/// Shard states from the kernel in partial-state mode (emulated), merged on the host, match the
/// oracle to the kernels' tolerance: random rows with −∞ entries, mask fills, peaked rows (whose
/// log_ratio stays exactly 0), every dtype, split rows (a shard wide enough for several blocks).
#[test]
fn emulated_kernel_shards_merge_to_the_oracle() {
    fn run<T: LogitElement>(r: &[f32], m: &[f32], t: &[i64], v: usize, p: usize, temperature: f64, what: &str) {
        let (r, m) = (to_dtype::<T>(r), to_dtype::<T>(m));
        let parts = kernel_shards((&r[..], &m[..], t), v, &shard_ranges(v, p).unwrap(), temperature);
        let out = merge_outputs(0, &parts, t, v).unwrap();
        let what = format!("{what} {} p={p}", T::DTYPE);
        compare_rows(&out, &to_f64(&r), &to_f64(&m), t, v, temperature, &what);
    }
    for &(n, v, temperature) in &[(5usize, 37usize, 1.0), (4, 1000, 0.6), (2, 20011, 2.0)] {
        let (r, m, t) = generate(&Spec { neg_inf: 0.15, temperature, ..Spec::new(n, v) }, v as u64);
        for p in [1usize, 2, 3, 8] {
            let what = format!("random N={n} V={v} τs={temperature}");
            run::<f32>(&r, &m, &t, v, p, temperature, &what);
            run::<bf16>(&r, &m, &t, v, p, temperature, &what);
            if p == 3 {
                run::<f16>(&r, &m, &t, v, p, temperature, &what);
            }
        }
        let (r, m, t) = peaked(n, v, temperature, 7);
        for p in [1usize, 3, 8] {
            let (rb, mb) = (to_dtype::<bf16>(&r), to_dtype::<bf16>(&m));
            let parts = kernel_shards((&rb[..], &mb[..], &t[..]), v, &shard_ranges(v, p).unwrap(), temperature);
            let out = merge_outputs(0, &parts, &t, v).unwrap();
            assert!(out.log_ratio.iter().all(|&l| l == 0.0), "peaked V={v} p={p}: {:?}", out.log_ratio);
        }
    }
    // Uneven ranges (empty ones included: no launch, the empty state) in a random order.
    let mut rng = StdRng::seed_from_u64(12);
    let (n, v) = (3usize, 3000usize);
    let (r, m, t) = generate(&Spec { neg_inf: 0.1, ..Spec::new(n, v) }, 4);
    for p in [2usize, 5, 9] {
        let mut ranges = uneven_ranges(v, p, &mut rng);
        ranges.insert(p / 2, VocabRange::new(ranges[p / 2].start, 0));
        let mut parts = kernel_shards((&r[..], &m[..], &t[..]), v, &ranges, 0.8);
        parts.shuffle(&mut rng);
        let out = merge_outputs(0, &parts, &t, v).unwrap();
        compare_rows(&out, &to_f64(&r), &to_f64(&m), &t, v, 0.8, &format!("uneven p={p}"));
    }
    // Mask fills: a shard whose real (or masked) side is all fills, and a fill where the real
    // token has mass (kl = +∞ whichever shard holds it).
    let (n, v) = (4usize, 64usize);
    let (mut r, mut m, t) = generate(&Spec::new(n, v), 21);
    for row in 0..n {
        let a = t[row] as usize;
        for i in (0..v).filter(|&i| i != a) {
            let shard_of_i = i / 8; // p = 8 shards of 8
            if shard_of_i == (a / 8 + 1 + row) % 8 {
                r[row * v + i] = f32::MIN;
            }
            if shard_of_i == (a / 8 + 2 + row) % 8 {
                m[row * v + i] = bf16::MIN.to_f32();
            }
        }
    }
    let want_inf = infopo_kernels::reference::score(
        0,
        Logits::new(&r, n, v).unwrap(),
        Logits::new(&m, n, v).unwrap(),
        &t,
        &Params::default(),
    )
    .unwrap();
    assert!(want_inf.iter().all(|x| x.kl == f64::INFINITY));
    for p in [1usize, 2, 3, 8] {
        run::<f32>(&r, &m, &t, v, p, 1.0, "fills");
        run::<bf16>(&r, &m, &t, v, p, 1.0, "fills");
        let parts = kernel_shards((&r[..], &m[..], &t[..]), v, &shard_ranges(v, p).unwrap(), 1.0);
        assert!(merge_outputs(0, &parts, &t, v).unwrap().kl.iter().all(|&k| k == f32::INFINITY));
    }
}

/// The kernel reads a column range of the full logits in place (pointers offset to v0, rows
/// `V` apart), as well as a padded shard; both give the same states (to f32 rounding: the rows'
/// alignments differ, hence the vector heads and the summation shapes), and both merge to the
/// oracle.
#[test]
fn emulated_kernel_range_of_full_logits_equals_its_shard() {
    let (n, v) = (3usize, 9001usize);
    let (r, m, t) = generate(&Spec { neg_inf: 0.1, ..Spec::new(n, v) }, 99);
    let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
    let ranges = [VocabRange::new(0, 1), VocabRange::new(1, 4999), VocabRange::new(5000, 4001)];
    let shards = kernel_shards((&r[..], &m[..], &t[..]), v, &ranges, 1.0);
    let mut fulls = Vec::new();
    for (range, shard) in ranges.iter().zip(&shards) {
        let p = Params::default();
        let raw = Emulated::new().range_states(&RangeInput::of_full(real, masked, *range), &t, &p).unwrap();
        let full = RangeStates::from_kernel(*range, &raw, &p).unwrap();
        for (i, (&a, &b)) in full.values().iter().zip(shard.values()).enumerate() {
            assert!(close(a, b, 1e-5, 1e-5) || (a.is_nan() && b.is_nan()), "range {range:?} [{i}]: {a} vs {b}");
        }
        fulls.push(full);
    }
    for (parts, what) in [(&shards, "padded shards"), (&fulls, "full-logit ranges")] {
        let out = merge_outputs(0, parts, &t, v).unwrap();
        compare_rows(&out, &to_f64(&r), &to_f64(&m), &t, v, 1.0, what);
    }
}

#[test]
fn bad_ranges_and_shapes_are_typed_errors() {
    let (n, v) = (2usize, 10usize);
    let (r, m, t) = generate(&Spec::new(n, v), 1);
    let (real, masked) = (Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap());
    let part = |start, len| {
        score_range(&RangeInput::of_full(real, masked, VocabRange::new(start, len)), &t, &Params::default()).unwrap()
    };
    let shape = |res: Result<Vec<RowValues>>| matches!(res, Err(Error::Shape { .. }));
    assert!(shape(merge(0, &[part(0, 4), part(5, 5)], &t, v)), "gap");
    assert!(shape(merge(0, &[part(0, 6), part(5, 5)], &t, v)), "overlap");
    assert!(shape(merge(0, &[part(0, 4), part(4, 5)], &t, v)), "short of V");
    assert!(shape(merge(0, &[], &t, v)), "no ranges");
    assert!(shape(merge(0, &[part(0, 10)], &t[..1], v)), "rows");
    assert!(merge(0, &[part(0, 10)], &t, v).is_ok());
    let too_wide = RangeInput::of_full(real, masked, VocabRange::new(6, 5));
    assert!(matches!(score_range(&too_wide, &t, &Params::default()), Err(Error::Shape { .. })));
    assert!(matches!(Emulated::new().range_states(&too_wide, &t, &Params::default()), Err(Error::Shape { .. })));
    let ok = RangeInput::of_full(real, masked, VocabRange::new(0, 10));
    assert!(matches!(
        score_range(&ok, &t, &Params { temperature: 0.0, ..Params::default() }),
        Err(Error::Param { .. })
    ));
    assert!(matches!(RangeStates::from_values(VocabRange::new(0, 10), vec![0.0; 9]), Err(Error::Shape { .. })));
    assert_eq!(shard_ranges(10, 4).unwrap(), [(0, 3), (3, 3), (6, 3), (9, 1)].map(|(s, l)| VocabRange::new(s, l)));
    assert_eq!(shard_ranges(5, 8).unwrap().iter().map(|r| r.len).sum::<usize>(), 5);
    assert!(shard_ranges(5, 0).is_err());
}
