//! Adversarial candle tensors (feature `candle`, CPU tensors) into every entry of
//! `infopo_kernels::candle`: wrong dtypes, ranks, shapes, strides (transposes, column slices,
//! broadcasts), empty tensors, bad parameters and chunk sizes. Each must be a typed `Error`,
//! never a panic; cases are collected so one run lists every failing one.

use candle_core::{DType, Device, Tensor};
use infopo_kernels::candle::{compute, compute_hidden, score_hidden_rows, score_rows, HiddenStates};
use infopo_kernels::{Error, Params, RowErrorKind, Trajectories, Turns};
use std::panic::{catch_unwind, AssertUnwindSafe};

#[derive(Default)]
struct Cases {
    failures: Vec<String>,
    checked: usize,
}

impl Cases {
    fn err<T>(
        &mut self,
        label: &str,
        expect: impl Fn(&Error) -> bool,
        run: impl FnOnce() -> infopo_kernels::Result<T>,
    ) {
        self.checked += 1;
        match catch_unwind(AssertUnwindSafe(run)) {
            Err(_) => self.failures.push(format!("{label}: panicked")),
            Ok(Ok(_)) => self.failures.push(format!("{label}: accepted")),
            Ok(Err(e)) if !expect(&e) => self.failures.push(format!("{label}: unexpected error {e:?}")),
            Ok(Err(_)) => {}
        }
    }

    fn finish(self) {
        assert!(self.checked > 0);
        assert!(
            self.failures.is_empty(),
            "{} of {} cases:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
    }
}

fn cpu() -> Device {
    Device::Cpu
}

fn matrix(rows: usize, cols: usize, seed: f32) -> Tensor {
    let v: Vec<f32> = (0..rows * cols).map(|i| ((i as f32 + seed) * 0.37).sin() * 2.0).collect();
    Tensor::from_vec(v, (rows, cols), &cpu()).unwrap()
}

fn shape(e: &Error) -> bool {
    matches!(e, Error::Shape { .. })
}
fn dtype(tensor: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::UnsupportedDtype { tensor: t, .. } if *t == tensor)
}
fn not_contiguous(tensor: &'static str) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::NotContiguous { tensor: t, .. } if *t == tensor)
}

#[test]
fn logit_entries_reject_malformed_tensors() {
    let (real, masked) = (matrix(4, 6, 0.0), matrix(4, 6, 1.0));
    let targets = Tensor::new(&[0u32, 5, 2, 3], &cpu()).unwrap();
    let p = Params::default();
    let turns = Turns { offsets: &[0, 2, 4], trajectory: &[0, 1], credit_tokens: &[1, 2] };
    let traj = Trajectories { group: &[0, 0], outcome: &[1.0, 0.0], tokens: &[3, 3] };
    score_rows(&real, &masked, &targets, &p).expect("the valid inputs");
    compute(&real, &masked, &targets, turns, Some(traj), None, &p).expect("the valid batch");

    let mut c = Cases::default();
    // Both entries on the same bad inputs.
    let mut both = |label: &str, expect: &dyn Fn(&Error) -> bool, r: &Tensor, m: &Tensor, t: &Tensor| {
        c.err(&format!("score_rows: {label}"), expect, || score_rows(r, m, t, &p));
        c.err(&format!("compute: {label}"), expect, || compute(r, m, t, turns, Some(traj), None, &p));
    };
    let to = |t: &Tensor, d: DType| t.to_dtype(d).unwrap();
    for d in [DType::F64, DType::U8, DType::U32, DType::I64] {
        both(&format!("real {d:?}"), &dtype("real"), &to(&real, d), &masked, &targets);
        both(&format!("masked {d:?}"), &dtype("masked"), &real, &to(&masked, d), &targets);
    }
    both(
        "real f32, masked bf16",
        &|e| matches!(e, Error::DtypeMismatch { .. }),
        &real,
        &to(&masked, DType::BF16),
        &targets,
    );
    for d in [DType::F32, DType::F64, DType::BF16, DType::U8] {
        both(&format!("targets {d:?}"), &dtype("targets"), &real, &masked, &to(&targets, d));
    }
    let flat = real.flatten_all().unwrap();
    both("real rank 1", &shape, &flat, &masked, &targets);
    both("real and masked rank 1", &shape, &flat, &masked.flatten_all().unwrap(), &targets);
    both("real rank 3", &shape, &real.unsqueeze(0).unwrap(), &masked.unsqueeze(0).unwrap(), &targets);
    both("real rank 0", &shape, &Tensor::new(1f32, &cpu()).unwrap(), &masked, &targets);
    both("masked fewer rows", &shape, &real, &masked.narrow(0, 0, 3).unwrap().contiguous().unwrap(), &targets);
    both("masked other vocab", &shape, &real, &matrix(4, 5, 0.0), &targets);
    both("targets [N, 1]", &shape, &real, &masked, &targets.unsqueeze(1).unwrap());
    both("targets short", &shape, &real, &masked, &targets.narrow(0, 0, 3).unwrap());
    both("targets scalar", &shape, &real, &masked, &Tensor::new(1u32, &cpu()).unwrap());
    both("vocab 0", &|e| matches!(e, Error::EmptyVocab), &matrix(4, 0, 0.0), &matrix(4, 0, 0.0), &targets);
    both("real transposed", &not_contiguous("real"), &matrix(6, 4, 0.0).t().unwrap(), &masked, &targets);
    both(
        "masked column slice",
        &not_contiguous("masked"),
        &real,
        &matrix(4, 8, 0.0).narrow(1, 1, 6).unwrap(),
        &targets,
    );
    let row = matrix(1, 6, 0.0);
    both("real broadcast rows", &not_contiguous("real"), &row.broadcast_as((4, 6)).unwrap(), &masked, &targets);
    let strided = Tensor::new(&[0u32, 9, 5, 9, 2, 9, 3, 9], &cpu()).unwrap().reshape((4, 2)).unwrap();
    both(
        "targets strided",
        &not_contiguous("targets"),
        &real,
        &masked,
        &strided.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(),
    );
    both(
        "targets broadcast",
        &not_contiguous("targets"),
        &real,
        &masked,
        &Tensor::new(&[1u32], &cpu()).unwrap().broadcast_as(4).unwrap(),
    );
    let big = Tensor::new(&[0u32, 5, u32::MAX, 3], &cpu()).unwrap();
    both(
        "target u32::MAX",
        &|e| matches!(e, Error::Row { row: 2, kind: RowErrorKind::TargetOutOfRange, .. }),
        &real,
        &masked,
        &big,
    );
    let negative = Tensor::new(&[0i64, 5, 2, -7], &cpu()).unwrap();
    both(
        "target negative",
        &|e| matches!(e, Error::Row { row: 3, kind: RowErrorKind::TargetOutOfRange, .. }),
        &real,
        &masked,
        &negative,
    );
    for bad in [f64::NAN, 0.0, -1.0, 1e9] {
        let p = Params { temperature: bad, ..p };
        c.err(
            &format!("score_rows: temperature {bad}"),
            |e| matches!(e, Error::Param { .. }),
            || score_rows(&real, &masked, &targets, &p),
        );
    }
    // The layout against the tensors' rows.
    let short = Turns { offsets: &[0, 2, 3], trajectory: &[0, 1], credit_tokens: &[1, 2] };
    c.err(
        "compute: turns of 3 rows",
        |e| matches!(e, Error::Turns { .. }),
        || compute(&real, &masked, &targets, short, None, None, &p),
    );
    c.err(
        "compute: credit starts without trajectories",
        |e| matches!(e, Error::Trajectories { .. }),
        || compute(&real, &masked, &targets, turns, None, Some(&[0, 0]), &p),
    );
    c.err(
        "compute: overlapping credit spans",
        |e| matches!(e, Error::CreditSpan { .. }),
        || {
            let same = Turns { trajectory: &[0, 0], ..turns };
            compute(&real, &masked, &targets, same, Some(traj), Some(&[0, 0]), &p)
        },
    );
    c.finish();
}

#[test]
fn hidden_entries_reject_malformed_tensors() {
    let (real, masked, head) = (matrix(4, 3, 0.0), matrix(4, 3, 1.0), matrix(7, 3, 2.0));
    let targets = Tensor::new(&[0i64, 6, 2, 3], &cpu()).unwrap();
    let p = Params::default();
    let turns = Turns { offsets: &[0, 4], trajectory: &[0], credit_tokens: &[2] };
    let h = HiddenStates { real_hidden: &real, masked_hidden: &masked, lm_head: &head };
    score_hidden_rows(&h, &targets, &p, 2).expect("the valid inputs");
    compute_hidden(&h, &targets, turns, None, None, &p, 2).expect("the valid batch");
    score_hidden_rows(&h, &targets, &p, usize::MAX).expect("a chunk wider than V is the whole vocabulary");

    let mut c = Cases::default();
    let mut both = |label: &str, expect: &dyn Fn(&Error) -> bool, h: HiddenStates<'_>, t: &Tensor, chunk: usize| {
        c.err(&format!("score_hidden_rows: {label}"), expect, || score_hidden_rows(&h, t, &p, chunk));
        c.err(&format!("compute_hidden: {label}"), expect, || compute_hidden(&h, t, turns, None, None, &p, chunk));
    };
    let to = |t: &Tensor, d: DType| t.to_dtype(d).unwrap();
    both("chunk 0", &shape, h, &targets, 0);
    let f64_head = to(&head, DType::F64);
    both("lm_head f64", &dtype("lm_head"), HiddenStates { lm_head: &f64_head, ..h }, &targets, 2);
    let bf16_real = to(&real, DType::BF16);
    both(
        "real_hidden bf16, others f32",
        &dtype("masked_hidden"),
        HiddenStates { real_hidden: &bf16_real, ..h },
        &targets,
        2,
    );
    let u8_real = to(&real, DType::U8);
    both("real_hidden u8", &dtype("real_hidden"), HiddenStates { real_hidden: &u8_real, ..h }, &targets, 2);
    both("targets f32", &dtype("targets"), h, &to(&targets, DType::F32), 2);
    let wide = matrix(7, 4, 0.0);
    both("lm_head width 4 for D 3", &shape, HiddenStates { lm_head: &wide, ..h }, &targets, 2);
    let flat_head = head.flatten_all().unwrap();
    both("lm_head rank 1", &shape, HiddenStates { lm_head: &flat_head, ..h }, &targets, 2);
    let rank3 = real.unsqueeze(0).unwrap();
    both("real_hidden rank 3", &shape, HiddenStates { real_hidden: &rank3, ..h }, &targets, 2);
    let fewer = matrix(3, 3, 1.0);
    both("masked_hidden fewer rows", &shape, HiddenStates { masked_hidden: &fewer, ..h }, &targets, 2);
    both("targets for 3 rows", &shape, h, &targets.narrow(0, 0, 3).unwrap(), 2);
    let (empty_real, empty_masked, empty_head) = (matrix(4, 0, 0.0), matrix(4, 0, 0.0), matrix(7, 0, 0.0));
    both(
        "hidden width 0",
        &shape,
        HiddenStates { real_hidden: &empty_real, masked_hidden: &empty_masked, lm_head: &empty_head },
        &targets,
        2,
    );
    let no_vocab = matrix(0, 3, 0.0);
    both(
        "lm_head of 0 rows",
        &|e| matches!(e, Error::EmptyVocab),
        HiddenStates { lm_head: &no_vocab, ..h },
        &targets,
        2,
    );
    let head_t = matrix(3, 7, 0.0).t().unwrap();
    both("lm_head transposed", &not_contiguous("lm_head"), HiddenStates { lm_head: &head_t, ..h }, &targets, 2);
    let real_cols = matrix(4, 5, 0.0).narrow(1, 1, 3).unwrap();
    both(
        "real_hidden column slice",
        &not_contiguous("real_hidden"),
        HiddenStates { real_hidden: &real_cols, ..h },
        &targets,
        2,
    );
    let out_of_range = Tensor::new(&[0i64, 7, 2, 3], &cpu()).unwrap();
    both(
        "target = V",
        &|e| matches!(e, Error::Row { row: 1, kind: RowErrorKind::TargetOutOfRange, .. }),
        h,
        &out_of_range,
        2,
    );
    c.finish();
}

#[test]
fn batch_output_with_edited_tensors_is_an_error_not_a_panic() {
    let (real, masked) = (matrix(4, 6, 0.0), matrix(4, 6, 1.0));
    let targets = Tensor::new(&[0u32, 5, 2, 3], &cpu()).unwrap();
    let turns = Turns { offsets: &[0, 2, 4], trajectory: &[0, 1], credit_tokens: &[1, 2] };
    let traj = Trajectories { group: &[0, 0], outcome: &[1.0, 0.0], tokens: &[3, 3] };
    let out = compute(&real, &masked, &targets, turns, Some(traj), None, &Params::default()).unwrap();
    out.to_output().expect("as computed");
    let mut c = Cases::default();
    let mut short_stats = out.clone();
    short_stats.advantages.as_mut().unwrap().batch_stats = Tensor::zeros(2, DType::F64, &cpu()).unwrap();
    c.err("batch_stats of 2 values", shape, || short_stats.to_output());
    let mut rows_4 = out.clone();
    rows_4.rows = Tensor::zeros((4, 4), DType::F32, &cpu()).unwrap();
    c.err("rows [4, N]", shape, || rows_4.to_output());
    let mut f32_info = out.clone();
    f32_info.turn_info = Tensor::zeros(2, DType::F32, &cpu()).unwrap();
    c.err("turn_info F32", |e| matches!(e, Error::Candle(_)), || f32_info.to_output());
    c.finish();
}
