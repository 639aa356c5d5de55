//! The kernel variants (src/launch.rs `KernelVariant`, kernels/variants.cuh) on the
//! emulated kernel, each against the baseline in the same process (`KernelVariant::scoped`):
//! - `packed` / `packed-bump` (bf16 only) give the baseline's row outputs bit for bit on rows
//!   without an error (−∞ entries, mask fills, gaps, huge logits, every alignment, block sizes
//!   below and at 256, split rows), and the same typed error (row and code) on error rows, NaN
//!   against +∞ inputs included;
//! - `ring` (every dtype) gives the baseline's row outputs bit for bit on every alignment class:
//!   the 16-byte path through its shared-memory ring (both the emulated sm_90 path, bulk copies
//!   and mbarriers, in even blocks and the sm_80–89 cp.async path in odd blocks), and rows whose
//!   real and masked offsets differ mod 16 (the baseline's loads, kept);
//! - `waves` changes only the split count: its rows agree with the baseline's to rounding;
//!
//! The whole emulated suites also run per variant with `INFOPO_KERNEL_VARIANT` (.ci/run); the
//! launch shapes, entry points and the decision file are unit tests of `src/launch.rs`.

use half::bf16;
use infopo_kernels::emulated::Emulated;
use infopo_kernels::{Backend, Batch, Dtype, Error, KernelVariant, LogitElement, Logits, Output, Params, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The kernel variants whose row pass differs from the baseline's (bitwise-equal outputs).
const KERNEL_VARIANTS: [KernelVariant; 3] = [KernelVariant::Packed, KernelVariant::PackedBump, KernelVariant::Ring];

fn run<T: LogitElement>(
    b: &Emulated,
    v: KernelVariant,
    r: &[T],
    m: &[T],
    targets: &[i64],
    vocab: usize,
    p: &Params,
) -> Result<Output> {
    let n = targets.len();
    let batch = Batch::rows(Logits::new(r, n, vocab).unwrap(), Logits::new(m, n, vocab).unwrap(), targets);
    v.scoped(|| b.compute(&batch, p))
}

fn bits(o: &Output) -> Vec<u32> {
    let r = &o.rows;
    [&r.lse_real, &r.lse_masked, &r.log_ratio, &r.kl, &r.entropy_real]
        .iter()
        .flat_map(|v| v.iter().map(|x| x.to_bits()))
        .collect()
}

/// Rows of bf16 logits: spread 3 around `shift`, with the given fractions of −∞ and of mask
/// fills (finfo(bf16).min, −2^100, f32::MIN rounded to bf16 = −∞), never at the target.
fn data(n: usize, vocab: usize, shift: f32, neg_inf: f64, fills: f64, seed: u64) -> (Vec<bf16>, Vec<bf16>, Vec<i64>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let fill = [bf16::MIN, bf16::from_f32(-(2f32.powi(100))), bf16::NEG_INFINITY, bf16::from_f32(-(2f32.powi(110)))];
    let (mut r, mut m, mut t) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let a = rng.gen_range(0..vocab);
        t.push(a as i64);
        for i in 0..vocab {
            let x: f32 = (rng.gen::<f32>() + rng.gen::<f32>() + rng.gen::<f32>() - 1.5) * 6.0 + shift;
            let y = x + (rng.gen::<f32>() - 0.5) * 3.0;
            let (mut x, mut y) = (bf16::from_f32(x), bf16::from_f32(y));
            if i != a && vocab > 2 {
                if rng.gen_bool(neg_inf) {
                    x = bf16::NEG_INFINITY;
                }
                if rng.gen_bool(neg_inf) {
                    y = bf16::NEG_INFINITY;
                }
                if rng.gen_bool(fills) {
                    x = fill[rng.gen_range(0..fill.len())];
                }
                if rng.gen_bool(fills) {
                    y = fill[rng.gen_range(0..fill.len())];
                }
            }
            r.push(x);
            m.push(y);
        }
    }
    (r, m, t)
}

#[test]
fn packed_variants_match_the_baseline_bitwise() {
    let e = Emulated::new();
    // (rows, vocab): block sizes 32 (V = 100) to 256, one or several splits, heads and tails.
    let shapes = [(5usize, 100usize), (4, 1000), (3, 4099), (2, 50257), (1, 151_936)];
    let mut case = 0u64;
    for &(n, v) in &shapes {
        for &(shift, neg_inf, fills, temperature) in
            &[(0.0f32, 0.0, 0.0, 1.0), (0.0, 0.2, 0.0, 0.7), (0.0, 0.05, 0.1, 1.0), (1.0e4, 0.0, 0.02, 3.0)]
        {
            case += 1;
            let (r, m, t) = data(n, v, shift, neg_inf, fills, case);
            let p = Params { temperature, ..Params::default() };
            let base = run(&e, KernelVariant::Baseline, &r, &m, &t, v, &p).unwrap();
            for variant in KERNEL_VARIANTS {
                let got = run(&e, variant, &r, &m, &t, v, &p).unwrap();
                assert_eq!(
                    bits(&got),
                    bits(&base),
                    "{variant:?} N={n} V={v} shift={shift} -inf={neg_inf} fills={fills}"
                );
            }
            // Rows starting at every offset mod 16 (equal for real and masked: the 16-byte path
            // with a scalar head), and real / masked rows at different offsets (the baseline's
            // 8-, 4- and 2-byte paths, which every variant keeps).
            for (pr, pm) in [(1usize, 1usize), (3, 3), (7, 7), (1, 5), (2, 6)] {
                if n * v > 300_000 {
                    continue;
                }
                let mut rr = vec![bf16::ZERO; pr];
                rr.extend_from_slice(&r);
                let mut mm = vec![bf16::ZERO; pm];
                mm.extend_from_slice(&m);
                let base = run(&e, KernelVariant::Baseline, &rr[pr..], &mm[pm..], &t, v, &p).unwrap();
                for variant in KERNEL_VARIANTS {
                    let got = run(&e, variant, &rr[pr..], &mm[pm..], &t, v, &p).unwrap();
                    assert_eq!(bits(&got), bits(&base), "{variant:?} N={n} V={v} pads {pr}/{pm}");
                }
            }
        }
    }
}

/// One error row at a time, in a batch of 6 rows: the typed error must name the same row and
/// code under every variant (NaN and +∞ in either side, together, whole sides of −∞ or fills,
/// −∞ / fill targets, a fill at +2^100).
#[test]
fn error_rows_name_the_same_errors() {
    let e = Emulated::new();
    let p = Params::default();
    type Poke = fn(&mut [bf16], &mut [bf16], usize, usize);
    let pokes: [(&str, Poke); 12] = [
        ("real NaN", |x, _, o, _| x[o] = bf16::NAN),
        ("real +inf", |x, _, o, _| x[o] = bf16::INFINITY),
        ("masked NaN", |_, y, o, _| y[o] = bf16::NAN),
        ("masked +inf", |_, y, o, _| y[o] = bf16::INFINITY),
        ("real NaN, masked +inf", |x, y, o, _| (x[o], y[o + 1]) = (bf16::NAN, bf16::INFINITY)),
        ("real +inf, masked NaN", |x, y, o, _| (x[o], y[o]) = (bf16::INFINITY, bf16::NAN)),
        ("real all -inf", |x, _, _, _| x.fill(bf16::NEG_INFINITY)),
        ("masked all fills", |_, y, _, _| y.fill(bf16::MIN)),
        ("real target -inf", |x, _, _, t| x[t] = bf16::NEG_INFINITY),
        ("masked target fill", |_, y, _, t| y[t] = bf16::from_f32(-(2f32.powi(100)))),
        ("real +2^100", |x, _, o, _| x[o] = bf16::from_f32(2f32.powi(100))),
        ("real -inf and NaN", |x, _, o, _| {
            x.fill(bf16::NEG_INFINITY);
            x[o] = bf16::NAN
        }),
    ];
    for &(n, v) in &[(6usize, 1000usize), (6, 50257)] {
        for (k, (what, poke)) in pokes.iter().enumerate() {
            let (mut r, mut m, t) = data(n, v, 0.0, 0.05, 0.0, 100 + k as u64);
            let row = 1 + k % (n - 1);
            let target = t[row] as usize;
            let other = if target == 17 { 18 } else { 17 };
            poke(&mut r[row * v..(row + 1) * v], &mut m[row * v..(row + 1) * v], other, target);
            let want = run(&e, KernelVariant::Baseline, &r, &m, &t, v, &p).unwrap_err();
            assert!(matches!(want, Error::Row { row: r, .. } if r == row), "{what}: {want:?}");
            for variant in KERNEL_VARIANTS {
                let got = run(&e, variant, &r, &m, &t, v, &p).unwrap_err();
                assert_eq!(format!("{got:?}"), format!("{want:?}"), "{variant:?} V={v}: {what}");
            }
        }
    }
}

#[test]
fn waves_agree_with_the_baseline() {
    // 8 SMs: the few-rows regime at emulator-friendly sizes (5 rows: 10 splits, 2.1 waves
    // for the baseline; 9 splits, 2 full waves for `waves`).
    let e = Emulated::with_sm_count(8);
    let (n, v) = (5usize, 50257usize);
    let base = KernelVariant::Baseline.scoped(|| e.shape(n, v, Dtype::BF16));
    let waves = KernelVariant::Waves.scoped(|| e.shape(n, v, Dtype::BF16));
    assert_ne!(base.splits, waves.splits);
    for dtype_case in 0..2 {
        let (r, m, t) = data(n, v, 0.0, 0.05, 0.01, 7 + dtype_case);
        let p = Params::default();
        let got = |variant| {
            if dtype_case == 0 {
                run(&e, variant, &r, &m, &t, v, &p).unwrap()
            } else {
                let (r, m): (Vec<f32>, Vec<f32>) =
                    (r.iter().map(|x| x.to_f32()).collect(), m.iter().map(|x| x.to_f32()).collect());
                run(&e, variant, &r, &m, &t, v, &p).unwrap()
            }
        };
        let (a, b) = (got(KernelVariant::Baseline), got(KernelVariant::Waves));
        let pairs = [
            (&a.rows.lse_real, &b.rows.lse_real),
            (&a.rows.lse_masked, &b.rows.lse_masked),
            (&a.rows.log_ratio, &b.rows.log_ratio),
            (&a.rows.kl, &b.rows.kl),
            (&a.rows.entropy_real, &b.rows.entropy_real),
        ];
        for (x, y) in pairs {
            for (x, y) in x.iter().zip(y.iter()) {
                let ok = x == y || (x - y).abs() as f64 <= 2e-4 + 1e-5 * x.abs() as f64;
                assert!(ok, "waves {y} vs baseline {x}");
            }
        }
    }
}

/// Rows of one dtype (through f32) at every start offset mod 16 for real and masked: equal
/// offsets take the ring (heads of 0..7 elements), different ones the baseline's 8-, 4-, 2-byte
/// loads (the fallback rows). Chunks of 0 to several ring trips, one or several splits, block
/// sizes 32..256; serially on the emulated H100, and on a 1-SM device (fewer splits: chunks of
/// up to 12 stages, so slots are refilled) 3 blocks at once with a grid cap of 3 (each block
/// runs several items, reusing its ring and mbarriers).
fn ring_matches<T: LogitElement>(what: &str) {
    let e = Emulated::new();
    let capped = Emulated::with_sm_count(1).with_concurrency(3, 16).unwrap().with_grid_cap(3);
    let size = std::mem::size_of::<T>();
    let shapes = [(5usize, 100usize), (4, 1000), (3, 4099), (2, 50257), (1, 151_936)];
    for (case, &(n, v)) in shapes.iter().enumerate() {
        let (r, m, t) = data(n, v, 0.0, 0.05, 0.02, 500 + case as u64);
        let (r, m): (Vec<T>, Vec<T>) =
            (r.iter().map(|x| T::from_f32(x.to_f32())).collect(), m.iter().map(|x| T::from_f32(x.to_f32())).collect());
        let p = Params { temperature: 0.9, ..Params::default() };
        let pads: Vec<(usize, usize)> = if n * v > 300_000 {
            vec![(0, 0), (1, 3)]
        } else {
            (0..16 / size).map(|k| (k, k)).chain([(1, 0), (0, 16 / size / 2), (1, 2), (3, 16 / size - 1)]).collect()
        };
        for (pr, pm) in pads {
            let mut rr = vec![T::from_f32(0.0); pr];
            rr.extend_from_slice(&r);
            let mut mm = vec![T::from_f32(0.0); pm];
            mm.extend_from_slice(&m);
            for b in [&e, &capped] {
                let base = run(b, KernelVariant::Baseline, &rr[pr..], &mm[pm..], &t, v, &p).unwrap();
                let got = run(b, KernelVariant::Ring, &rr[pr..], &mm[pm..], &t, v, &p).unwrap();
                assert_eq!(bits(&got), bits(&base), "ring {what} N={n} V={v} pads {pr}/{pm}");
            }
        }
    }
}

#[test]
fn ring_matches_the_baseline_bitwise_in_every_dtype_and_alignment() {
    ring_matches::<bf16>("bf16");
    ring_matches::<half::f16>("f16");
    ring_matches::<f32>("f32");
}

/// The ring's refills (chunks of many stages: a 1-SM device, unsplit rows), serially and 3
/// blocks at once: bitwise the baseline. Small enough for ThreadSanitizer (scripts/tsan runs it
/// under INFOPO_KERNEL_VARIANT=ring, where a slot refilled before every thread has read it is
/// reported as a data race).
#[test]
fn ring_refills_match_the_baseline() {
    let (n, v) = (7usize, 20_000usize); // 7 rows >= 2 waves of 1 SM: unsplit, 10 stages per row
    let (r, m, t) = data(n, v, 0.0, 0.05, 0.02, 900);
    let p = Params::default();
    for b in [Emulated::with_sm_count(1), Emulated::with_sm_count(1).with_concurrency(3, 5).unwrap()] {
        assert_eq!(b.shape(n, v, Dtype::BF16).splits, 1);
        let base = run(&b, KernelVariant::Baseline, &r, &m, &t, v, &p).unwrap();
        let got = run(&b, KernelVariant::Ring, &r, &m, &t, v, &p).unwrap();
        assert_eq!(bits(&got), bits(&base), "ring refills");
    }
}

/// `spread` writes `token_advantage` in a second launch, a block per trajectory (src/launch.rs
/// `token_launch`), instead of in the block that ran the epilogue: the baseline's values bit for
/// bit on trajectories of up to ~2000 tokens (several block strides), with uncredited gaps,
/// spans over a block stride, trajectories without turns and groups of mixed sizes; after one
/// launch, after micro-batches whose last launch has no rows (the epilogue-only launch), and
/// after the merge launch of range states; serially and 3 blocks at once on a 2-SM device (a
/// grid cap below the trajectory count, so blocks take several trajectories).
#[test]
fn spread_token_advantages_match_the_baseline_bitwise() {
    use infopo_kernels::vocab::{shard_ranges, RangeInput};
    use infopo_kernels::{Trajectories, Turns};
    let serial = Emulated::new();
    let concurrent = Emulated::with_sm_count(2).with_concurrency(3, 16).unwrap().with_grid_cap(3);
    for case in 0..4u64 {
        let mut rng = StdRng::seed_from_u64(4100 + case);
        let n_traj = rng.gen_range(2..14usize);
        let (n, v) = (rng.gen_range(3..24usize), 1000usize);
        // Turns in row order over random trajectories; each trajectory's spans in a random order
        // along its response, with gaps; some trajectories get no turn.
        let n_turns = rng.gen_range(1..10usize);
        let mut offsets: Vec<u32> = (0..n_turns - 1).map(|_| rng.gen_range(0..=n as u32)).collect();
        offsets.push(0);
        offsets.push(n as u32);
        offsets.sort_unstable();
        let trajectory: Vec<u32> = (0..n_turns).map(|_| rng.gen_range(0..n_traj as u32)).collect();
        let credit: Vec<u32> = (0..n_turns).map(|_| rng.gen_range(1..400)).collect();
        let mut starts = vec![0u32; n_turns];
        let mut tokens = vec![0u32; n_traj];
        for (i, len) in tokens.iter_mut().enumerate() {
            let mut pos = rng.gen_range(0..300u32);
            for t in (0..n_turns).filter(|&t| trajectory[t] as usize == i) {
                starts[t] = pos;
                pos += credit[t] + rng.gen_range(0..300u32);
            }
            *len = pos.max(2);
        }
        let group: Vec<u32> = (0..n_traj).map(|_| rng.gen_range(0..3u32)).collect();
        let outcome: Vec<f64> = (0..n_traj).map(|_| rng.gen_range(0..4) as f64 * 0.25).collect();
        let turns = Turns { offsets: &offsets, trajectory: &trajectory, credit_tokens: &credit };
        let traj = Trajectories { group: &group, outcome: &outcome, tokens: &tokens };
        let (r, m, t) = data(n, v, 0.0, 0.02, 0.01, 4200 + case);
        let p = Params { beta: 0.7, ..Params::default() };
        let batch = Batch::rows(Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap(), &t)
            .with_turns(turns)
            .with_trajectories(traj)
            .with_credit_start(&starts);
        let layout = infopo_kernels::Layout::new(n, &turns, Some(&traj)).unwrap().with_credit_start(&starts).unwrap();
        let tokens_of = |o: Output| o.advantages.unwrap().token_advantage.unwrap();
        for e in [&serial, &concurrent] {
            let runs = |variant: KernelVariant| {
                variant.scoped(|| {
                    let one = e.compute(&batch, &p).unwrap();
                    let micro = e.compute_micro_batched(&batch, &p, &[n / 2, n, n]).unwrap();
                    let ranges = shard_ranges(v, 3).unwrap();
                    let mut states = Vec::new();
                    for &range in &ranges {
                        let input =
                            RangeInput::of_full(Logits::new(&r, n, v).unwrap(), Logits::new(&m, n, v).unwrap(), range);
                        states.extend(e.range_states(&input, &t, &p).unwrap());
                    }
                    let merged = e.merge_and_finish(&states, ranges.len(), &t, v, Some(&layout), &p).unwrap();
                    [tokens_of(one), tokens_of(micro), tokens_of(merged)]
                })
            };
            let (base, spread) = (runs(KernelVariant::Baseline), runs(KernelVariant::Spread));
            for (k, (b, s)) in base.iter().zip(spread.iter()).enumerate() {
                assert_eq!(b.len(), tokens.iter().map(|&x| x as usize).sum::<usize>());
                let same = b.iter().zip(s.iter()).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "case {case} path {k} ({} trajectories, {} tokens): spread differs", n_traj, b.len());
            }
        }
    }
}
