//! Input files written tensor by tensor, and the `infopo` binary run on them: shared by the CLI
//! tests and the bad-file tests.

use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::{Command, Output as Run};

/// A tensor's dtype, shape and little-endian bytes.
pub type RawTensor = (Dtype, Vec<usize>, Vec<u8>);
/// Named raw tensors, in file order.
pub type Raw = Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)>;

pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn i64_bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small valid batch as raw tensors: 6 rows of 5 logits, 3 turns, 2 trajectories.
pub fn raw_batch() -> Raw {
    let real: Vec<f32> = (0..30).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
    let masked: Vec<f32> = (0..30).map(|i| (i as f32 * 0.53).cos() * 2.0).collect();
    vec![
        ("real_logits", Dtype::F32, vec![6, 5], f32_bytes(&real)),
        ("masked_logits", Dtype::F32, vec![6, 5], f32_bytes(&masked)),
        ("targets", Dtype::I64, vec![6], i64_bytes(&[0, 1, 2, 3, 4, 0])),
        ("turn_offsets", Dtype::I64, vec![4], i64_bytes(&[0, 2, 4, 6])),
        ("turn_trajectory", Dtype::I64, vec![3], i64_bytes(&[0, 0, 1])),
        ("turn_credit_tokens", Dtype::I64, vec![3], i64_bytes(&[3, 4, 5])),
        ("trajectory_group", Dtype::I64, vec![2], i64_bytes(&[0, 0])),
        ("trajectory_tokens", Dtype::I64, vec![2], i64_bytes(&[10, 12])),
        ("trajectory_outcome", Dtype::F64, vec![2], [1.0f64, 0.0].iter().flat_map(|x| x.to_le_bytes()).collect()),
    ]
}

/// A small valid fused-linear file as raw tensors: the layout and targets of [`raw_batch`]
/// (6 rows, V = 5) with hidden states [6, 4] and an lm_head [5, 4] in place of the logits.
pub fn raw_hidden_batch() -> Raw {
    let real: Vec<f32> = (0..24).map(|i| (i as f32 * 0.41).sin()).collect();
    let masked: Vec<f32> = (0..24).map(|i| (i as f32 * 0.29).cos()).collect();
    let head: Vec<f32> = (0..20).map(|i| (i as f32 * 0.77).sin() * 2.0).collect();
    let mut t = raw_batch();
    t.retain(|x| !x.0.ends_with("_logits"));
    t.extend([
        ("real_hidden", Dtype::F32, vec![6, 4], f32_bytes(&real)),
        ("masked_hidden", Dtype::F32, vec![6, 4], f32_bytes(&masked)),
        ("lm_head", Dtype::F32, vec![5, 4], f32_bytes(&head)),
    ]);
    t
}

/// `tensors` with `name` replaced (or removed with `None`).
pub fn with(mut tensors: Raw, name: &str, replacement: Option<RawTensor>) -> Raw {
    let i = tensors.iter().position(|t| t.0 == name).expect("known tensor");
    match replacement {
        Some((d, s, b)) => tensors[i] = (tensors[i].0, d, s, b),
        None => {
            tensors.remove(i);
        }
    }
    tensors
}

/// The safetensors bytes of raw tensors (written by safetensors itself: a valid container).
pub fn serialize(tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(&str, TensorView<'_>)> =
        tensors.iter().map(|(n, d, s, b)| (*n, TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize(views, &None).unwrap()
}

/// Writes a safetensors file of raw tensors.
pub fn raw_file(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    std::fs::write(path, serialize(tensors)).unwrap();
}

pub fn infopo(args: &[&str]) -> Run {
    Command::new(env!("CARGO_BIN_EXE_infopo")).args(args).output().expect("run infopo")
}

pub fn stderr(run: &Run) -> String {
    String::from_utf8_lossy(&run.stderr).into_owned()
}

pub fn stdout(run: &Run) -> String {
    String::from_utf8_lossy(&run.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// The files in `dir`, sorted: a failed run may leave none beside the inputs the test wrote.
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    v.sort();
    v
}
