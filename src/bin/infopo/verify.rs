//! `infopo verify IN`: a backend against the CPU reference on a file, output by output.

use crate::args::RunArgs;
use crate::{emit, open, Failure, Outcome};
use infopo_kernels::io::{self, Input};
use infopo_kernels::{Backend, Cpu, Output};
use std::fmt::Write as _;
use std::path::Path;

/// Tolerances of `infopo verify`: |a − b| ≤ atol + rtol·|b| with b the CPU reference.
fn tolerance(backend: &str) -> (f64, f64) {
    if backend == "cpu" {
        (1e-6, 1e-5)
    } else {
        (2e-4, 2e-4)
    }
}

/// The comparison of one output tensor.
#[derive(Debug, Default)]
struct Comparison {
    max_abs: f64,
    max_rel: f64,
    nan: bool,
    bad: usize,
    /// First failing index with the backend's and the reference's value.
    first_bad: Option<(usize, f64, f64)>,
}

fn compare(got: &[f64], want: &[f64], atol: f64, rtol: f64) -> Comparison {
    let mut c = Comparison::default();
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        let (abs, rel, ok) = if a.is_nan() || b.is_nan() {
            c.nan = true;
            (f64::NAN, f64::NAN, false)
        } else if a.is_infinite() || b.is_infinite() {
            if a == b {
                (0.0, 0.0, true)
            } else {
                (f64::INFINITY, f64::INFINITY, false)
            }
        } else {
            let d = (a - b).abs();
            let rel = if b != 0.0 {
                d / b.abs()
            } else if d == 0.0 {
                0.0
            } else {
                f64::INFINITY
            };
            (d, rel, d <= atol + rtol * b.abs())
        };
        if !abs.is_nan() {
            c.max_abs = c.max_abs.max(abs);
            c.max_rel = c.max_rel.max(rel);
        }
        if !ok {
            c.bad += 1;
            c.first_bad.get_or_insert((i, a, b));
        }
    }
    c
}

/// Every output tensor by its file name, as f64.
fn tensors(out: &Output) -> Vec<(&'static str, Vec<f64>)> {
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let mut list: Vec<_> = io::ROW_OUTPUTS.into_iter().zip(out.rows.columns()).map(|(name, c)| (name, f(c))).collect();
    if let Some(info) = &out.turn_info {
        list.push(("turn_info", info.clone()));
    }
    if let Some(a) = &out.advantages {
        list.extend([
            (io::TURN_OUTPUTS[0], a.turn_intrinsic.clone()),
            (io::TURN_OUTPUTS[1], a.turn_intrinsic_norm.clone()),
            (io::TURN_OUTPUTS[2], a.turn_bonus.clone()),
            (io::TRAJECTORY_OUTPUTS[0], a.trajectory_advantage.clone()),
            (io::TRAJECTORY_OUTPUTS[1], a.trajectory_gate.clone()),
            (io::SCALAR_OUTPUTS[0], vec![a.outcome_std]),
            (io::SCALAR_OUTPUTS[1], vec![a.intrinsic_std]),
            (io::SCALAR_OUTPUTS[2], vec![a.magnitude_ratio]),
        ]);
        if let Some(tokens) = &a.token_advantage {
            list.push((io::TOKEN_OUTPUT, tokens.clone()));
        }
    }
    list
}

fn sci(v: f64, nan: bool) -> String {
    if nan {
        "NaN".to_string()
    } else {
        format!("{v:.3e}")
    }
}

pub fn run(input: &Path, run: &RunArgs) -> Outcome {
    let params = run.params();
    params.validate()?;
    let backend = open(run.backend)?;
    let data = io::read_any_input(input)?;
    let (atol, rtol) = tolerance(backend.name());
    // A fused-linear file: both run the chunked path, the reference in f64 (the chunk changes
    // only its rounding).
    let (reference, got) = match &data {
        Input::Logits(data) => {
            let batch = data.as_batch()?;
            (Cpu.compute(&batch, &params), backend.compute(&batch, &params))
        }
        Input::Hidden(data) => {
            let batch = data.as_batch()?;
            (Cpu.compute_hidden(&batch, &params, run.chunk()), backend.compute_hidden(&batch, &params, run.chunk()))
        }
    };
    let (reference, got) = match (reference, got) {
        (_, Err(e @ infopo_kernels::Error::BackendUnavailable { .. })) => return Err(e.into()),
        // Bad input: the backend must reject it the same way as the reference.
        (Err(want), Err(e)) if e.to_string() == want.to_string() => return Err(want.into()),
        (Err(want), Err(e)) => {
            return Err(Failure::Verify(format!(
                "verification failed: the cpu reference reports `{want}` but {} reports `{e}`",
                backend.name()
            )))
        }
        (Err(want), Ok(_)) => {
            return Err(Failure::Verify(format!(
                "verification failed: the cpu reference reports `{want}` but {} accepts the input",
                backend.name()
            )))
        }
        (Ok(_), Err(e)) => {
            return Err(Failure::Verify(format!(
                "verification failed: {} fails where the cpu reference succeeds: {e}",
                backend.name()
            )))
        }
        (Ok(r), Ok(g)) => (r, g),
    };

    let mut text = String::new();
    let _ = writeln!(
        text,
        "verify {}: {} against the cpu reference (|a - b| <= {atol:e} + {rtol:e}·|b|)",
        input.display(),
        backend.name()
    );
    let _ = writeln!(text, "{:<22} {:>8} {:>12} {:>12}  status", "tensor", "len", "max abs err", "max rel err");
    let want = tensors(&reference);
    let have = tensors(&got);
    let mut failures = Vec::new();
    for (name, b) in &want {
        let Some((_, a)) = have.iter().find(|(n, _)| n == name) else {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  MISSING", b.len(), "-", "-");
            failures.push(format!("{name} is missing from the {} output", backend.name()));
            continue;
        };
        if a.len() != b.len() {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  LENGTH", b.len(), "-", "-");
            failures.push(format!("{name} has {} values, the reference {}", a.len(), b.len()));
            continue;
        }
        let c = compare(a, b, atol, rtol);
        let status = if c.bad == 0 { "ok" } else { "FAIL" };
        let _ = writeln!(
            text,
            "{name:<22} {:>8} {:>12} {:>12}  {status}",
            b.len(),
            sci(c.max_abs, c.nan),
            sci(c.max_rel, c.nan)
        );
        if let Some((i, x, y)) = c.first_bad {
            failures.push(format!(
                "{name}: {} of {} values beyond tolerance (first at index {i}: {x:e} vs reference {y:e})",
                c.bad,
                b.len()
            ));
        }
    }
    for (name, _) in &have {
        if !want.iter().any(|(n, _)| n == name) {
            let _ = writeln!(text, "{name:<22} {:>8} {:>12} {:>12}  EXTRA", "-", "-", "-");
            failures.push(format!("{name} is not in the reference output"));
        }
    }
    if failures.is_empty() {
        let _ = writeln!(text, "verify: ok ({} tensors)", want.len());
        emit(&text);
        Ok(())
    } else {
        let _ = writeln!(text, "verify: FAILED");
        emit(&text);
        Err(Failure::Verify(format!("verification failed: {}", failures.join("; "))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_rule() {
        let (atol, rtol) = tolerance("emulated");
        let c = compare(&[1.0 + 3e-4, 0.0, 1e3 + 0.1], &[1.0, 1e-4, 1e3], atol, rtol);
        assert_eq!(c.bad, 0, "{c:?}");
        let c = compare(&[1.0 + 5e-4], &[1.0], atol, rtol);
        assert_eq!(c.bad, 1);
        let (atol, rtol) = tolerance("cpu");
        assert_eq!(compare(&[1.0 + 2e-5], &[1.0], atol, rtol).bad, 1);
        assert_eq!(compare(&[1.0 + 5e-7], &[1.0], atol, rtol).bad, 0);
    }

    #[test]
    fn infinities_must_match_and_nan_never_passes() {
        let inf = f64::INFINITY;
        let c = compare(&[inf, 1.0], &[inf, 1.0], 1e-6, 1e-5);
        assert_eq!((c.bad, c.max_abs), (0, 0.0));
        assert_eq!(compare(&[inf], &[1e300], 1e-6, 1e-5).bad, 1);
        assert_eq!(compare(&[-inf], &[inf], 1e-6, 1e-5).bad, 1);
        let c = compare(&[f64::NAN], &[f64::NAN], 1e-6, 1e-5);
        assert!(c.nan && c.bad == 1);
        assert_eq!(sci(c.max_abs, c.nan), "NaN");
    }
}
