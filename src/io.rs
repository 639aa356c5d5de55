//! Safetensors input and output files (the CLI's file format, see `README.md`).
//!
//! Input tensors (names exact; other tensors in the file are ignored):
//!
//! | name | dtype | shape | |
//! | --- | --- | --- | --- |
//! | `real_logits`, `masked_logits` | F32, F16 or BF16 (the same for both) | `[N, V]` | required |
//! | `targets` | I32 or I64 | `[N]` | required |
//! | `turn_offsets` | I32 or I64 | `[T+1]` | optional, all three turn tensors or none |
//! | `turn_trajectory` | I32 or I64 | `[T]` | |
//! | `turn_credit_tokens` | I32 or I64 | `[T]` | |
//! | `trajectory_group` | I32 or I64 | `[B]` | optional, all three or none; needs the turns |
//! | `trajectory_tokens` | I32 or I64 | `[B]` | |
//! | `trajectory_outcome` | F32 or F64 | `[B]` | |
//!
//! Integer tensors may also be U32 or U64. Output tensors are all F32: [`ROW_OUTPUTS`] of shape
//! `[N]`; `turn_info` `[T]` with turns; with trajectories also [`TURN_OUTPUTS`] `[T]`,
//! [`TRAJECTORY_OUTPUTS`] `[B]` and [`SCALAR_OUTPUTS`] of shape `[1]`.
//!
//! Files are written to a temporary file in the destination's folder and renamed into place,
//! so a failed write leaves neither the destination nor the temporary file behind.

use crate::batch::{Batch, Output, Trajectories, Turns};
use crate::error::{Error, Result};
use crate::logits::{Dtype, LogitData, Logits};
use half::{bf16, f16};
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};
use std::borrow::Cow;
use std::path::{Path, PathBuf};

/// The three turn tensors (all or none).
pub const TURN_TENSORS: [&str; 3] = ["turn_offsets", "turn_trajectory", "turn_credit_tokens"];
/// The three trajectory tensors (all or none; they need the turn tensors).
pub const TRAJECTORY_TENSORS: [&str; 3] = ["trajectory_group", "trajectory_tokens", "trajectory_outcome"];
/// Per-row outputs, `[N]`.
pub const ROW_OUTPUTS: [&str; 5] = ["row_lse_real", "row_lse_masked", "row_log_ratio", "row_kl", "row_entropy_real"];
/// Per-turn outputs written with trajectories, `[T]` (`turn_info` is written with turns alone).
pub const TURN_OUTPUTS: [&str; 3] = ["turn_intrinsic", "turn_intrinsic_norm", "turn_bonus"];
/// Per-trajectory outputs, `[B]`.
pub const TRAJECTORY_OUTPUTS: [&str; 2] = ["trajectory_advantage", "trajectory_gate"];
/// Batch scalars, each of shape `[1]`.
pub const SCALAR_OUTPUTS: [&str; 3] = ["outcome_std", "intrinsic_std", "magnitude_ratio"];

/// An owned logit tensor's elements.
#[derive(Debug, Clone, PartialEq)]
pub enum LogitBuf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl LogitBuf {
    pub fn dtype(&self) -> Dtype {
        self.as_data().dtype()
    }

    pub fn len(&self) -> usize {
        self.as_data().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_data(&self) -> LogitData<'_> {
        match self {
            LogitBuf::F32(v) => LogitData::F32(v),
            LogitBuf::F16(v) => LogitData::F16(v),
            LogitBuf::BF16(v) => LogitData::BF16(v),
        }
    }
}

/// Owned turn layout (see [`Turns`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TurnBuf {
    pub offsets: Vec<u32>,
    pub trajectory: Vec<u32>,
    pub credit_tokens: Vec<u32>,
}

/// Owned trajectories (see [`Trajectories`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TrajectoryBuf {
    pub group: Vec<u32>,
    pub outcome: Vec<f64>,
    pub tokens: Vec<u32>,
}

/// A batch read from a file, in owned buffers; [`InputBatch::as_batch`] views it.
#[derive(Debug, Clone, PartialEq)]
pub struct InputBatch {
    pub rows: usize,
    pub vocab: usize,
    pub real: LogitBuf,
    pub masked: LogitBuf,
    pub targets: Vec<i64>,
    pub turns: Option<TurnBuf>,
    pub trajectories: Option<TrajectoryBuf>,
}

impl InputBatch {
    /// Borrowed views for [`crate::Backend::compute`]. Shapes of the logits are checked here;
    /// layouts and values are checked by the backends (`validate::batch`).
    pub fn as_batch(&self) -> Result<Batch<'_>> {
        let real = Logits::from_data(self.real.as_data(), self.rows, self.vocab)?;
        let masked = Logits::from_data(self.masked.as_data(), self.rows, self.vocab)?;
        let mut batch = Batch::rows(real, masked, &self.targets);
        if let Some(t) = &self.turns {
            batch = batch.with_turns(Turns {
                offsets: &t.offsets,
                trajectory: &t.trajectory,
                credit_tokens: &t.credit_tokens,
            });
        }
        if let Some(t) = &self.trajectories {
            batch = batch.with_trajectories(Trajectories { group: &t.group, outcome: &t.outcome, tokens: &t.tokens });
        }
        Ok(batch)
    }

    /// Bytes of logits the batch holds (both tensors).
    pub fn logit_bytes(&self) -> usize {
        (self.real.len() + self.masked.len()) * self.real.dtype().size_bytes()
    }
}

/// Reads an input file (see the module docs) into memory.
pub fn read_input(path: impl AsRef<Path>) -> Result<InputBatch> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| file_error(path, e.to_string()))?;
    parse_input(&bytes, path)
}

/// Parses the bytes of an input file; `path` only names the file in errors.
pub fn parse_input(bytes: &[u8], path: &Path) -> Result<InputBatch> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| file_error(path, describe(&e)))?;
    let file = File { st: &st, path };

    let real = file.require("real_logits")?;
    let masked = file.require("masked_logits")?;
    let targets = file.require("targets")?;
    let (rows, vocab) = match *real.shape() {
        [n, v] => (n, v),
        ref s => return Err(Error::shape(format!("`real_logits` has shape {s:?}, expected [N, V]"))),
    };
    if masked.shape() != real.shape() {
        return Err(Error::shape(format!(
            "`masked_logits` has shape {:?} but `real_logits` has shape {:?}",
            masked.shape(),
            real.shape()
        )));
    }
    if targets.shape() != [rows] {
        return Err(Error::shape(format!("`targets` has shape {:?}, expected [N] = [{rows}]", targets.shape())));
    }
    let real_buf = logits("real_logits", &real)?;
    let masked_buf = logits("masked_logits", &masked)?;
    if real_buf.dtype() != masked_buf.dtype() {
        return Err(Error::DtypeMismatch { real: real_buf.dtype().name(), masked: masked_buf.dtype().name() });
    }
    let targets = integers("targets", &targets)?;

    let turns = match file.set(&TURN_TENSORS)? {
        None => None,
        Some(v) => Some(TurnBuf {
            offsets: indices(TURN_TENSORS[0], &v[0])?,
            trajectory: indices(TURN_TENSORS[1], &v[1])?,
            credit_tokens: indices(TURN_TENSORS[2], &v[2])?,
        }),
    };
    let trajectories = match file.set(&TRAJECTORY_TENSORS)? {
        None => None,
        Some(_) if turns.is_none() => {
            return Err(Error::trajectories(format!(
                "{} has the trajectory tensors but not the turn tensors they need ({})",
                path.display(),
                TURN_TENSORS.join(", ")
            )))
        }
        Some(v) => Some(TrajectoryBuf {
            group: indices(TRAJECTORY_TENSORS[0], &v[0])?,
            tokens: indices(TRAJECTORY_TENSORS[1], &v[1])?,
            outcome: floats(TRAJECTORY_TENSORS[2], &v[2])?,
        }),
    };
    Ok(InputBatch { rows, vocab, real: real_buf, masked: masked_buf, targets, turns, trajectories })
}

struct File<'a, 'd> {
    st: &'a SafeTensors<'d>,
    path: &'a Path,
}

impl<'d> File<'_, 'd> {
    fn get(&self, name: &str) -> Option<TensorView<'d>> {
        self.st.tensor(name).ok()
    }

    fn require(&self, name: &str) -> Result<TensorView<'d>> {
        self.get(name).ok_or_else(|| Error::MissingTensor { name: name.to_string(), path: self.path.to_path_buf() })
    }

    /// All of `names`, or none of them; a partial set is an error naming the first missing one.
    fn set(&self, names: &[&str; 3]) -> Result<Option<Vec<TensorView<'d>>>> {
        let found: Vec<Option<TensorView<'d>>> = names.iter().map(|n| self.get(n)).collect();
        if found.iter().all(Option::is_none) {
            return Ok(None);
        }
        if let Some(i) = found.iter().position(Option::is_none) {
            return Err(Error::MissingTensor { name: names[i].to_string(), path: self.path.to_path_buf() });
        }
        Ok(Some(found.into_iter().flatten().collect()))
    }
}

fn file_error(path: &Path, what: String) -> Error {
    Error::File { path: path.to_path_buf(), what }
}

fn describe(e: &SafeTensorError) -> String {
    use SafeTensorError::*;
    let what = match e {
        HeaderTooSmall | InvalidHeaderLength | HeaderTooLarge => {
            "its 8-byte header length is invalid (is it a safetensors file?)".to_string()
        }
        InvalidHeader | InvalidHeaderStart => "the header is not valid UTF-8 JSON".to_string(),
        InvalidHeaderDeserialization | JsonError(_) => "the header is not a valid tensor table".to_string(),
        MetadataIncompleteBuffer => "the tensor data does not match the header's offsets (truncated?)".to_string(),
        InvalidOffset(name) => format!("tensor `{name}` has invalid data offsets"),
        other => format!("{other:?}"),
    };
    format!("not a valid safetensors file: {what}")
}

fn format_error(name: &str, what: impl Into<String>) -> Error {
    Error::TensorFormat { name: name.to_string(), what: what.into() }
}

fn rank1(name: &str, view: &TensorView<'_>) -> Result<usize> {
    match *view.shape() {
        [n] => Ok(n),
        ref s => Err(Error::shape(format!("`{name}` has shape {s:?}, expected one dimension"))),
    }
}

/// Little-endian elements of `N` bytes, decoded by `f`.
fn decode<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    data.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect()
}

fn logits(name: &str, view: &TensorView<'_>) -> Result<LogitBuf> {
    let data = view.data();
    Ok(match view.dtype() {
        StDtype::F32 => LogitBuf::F32(decode(data, f32::from_le_bytes)),
        StDtype::F16 => LogitBuf::F16(decode(data, |b| f16::from_bits(u16::from_le_bytes(b)))),
        StDtype::BF16 => LogitBuf::BF16(decode(data, |b| bf16::from_bits(u16::from_le_bytes(b)))),
        other => {
            return Err(format_error(name, format!("dtype {other:?} is not supported (expected F32, F16 or BF16)")))
        }
    })
}

/// A rank-1 integer tensor (I32, I64, U32 or U64) as i64.
fn integers(name: &str, view: &TensorView<'_>) -> Result<Vec<i64>> {
    rank1(name, view)?;
    let data = view.data();
    match view.dtype() {
        StDtype::I32 => Ok(decode(data, |b| i32::from_le_bytes(b) as i64)),
        StDtype::I64 => Ok(decode(data, i64::from_le_bytes)),
        StDtype::U32 => Ok(decode(data, |b| u32::from_le_bytes(b) as i64)),
        StDtype::U64 => decode(data, u64::from_le_bytes)
            .into_iter()
            .enumerate()
            .map(|(i, v)| i64::try_from(v).map_err(|_| format_error(name, format!("entry {i} = {v} is out of range"))))
            .collect(),
        other => Err(format_error(name, format!("dtype {other:?} is not supported (expected I32 or I64)"))),
    }
}

/// A rank-1 integer tensor whose entries must lie in 0..2^32.
fn indices(name: &str, view: &TensorView<'_>) -> Result<Vec<u32>> {
    integers(name, view)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            if v < 0 {
                Err(format_error(name, format!("entry {i} = {v} is negative")))
            } else {
                u32::try_from(v).map_err(|_| format_error(name, format!("entry {i} = {v} exceeds 2^32 - 1")))
            }
        })
        .collect()
}

/// A rank-1 F32 or F64 tensor as f64.
fn floats(name: &str, view: &TensorView<'_>) -> Result<Vec<f64>> {
    rank1(name, view)?;
    let data = view.data();
    match view.dtype() {
        StDtype::F32 => Ok(decode(data, |b| f32::from_le_bytes(b) as f64)),
        StDtype::F64 => Ok(decode(data, f64::from_le_bytes)),
        other => Err(format_error(name, format!("dtype {other:?} is not supported (expected F32 or F64)"))),
    }
}

/// One tensor to write: dtype, shape and little-endian bytes.
struct Out<'a> {
    name: &'static str,
    dtype: StDtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
}

fn f32_tensor(name: &'static str, values: impl IntoIterator<Item = f32>) -> Out<'static> {
    let bytes: Vec<u8> = values.into_iter().flat_map(f32::to_le_bytes).collect();
    Out { name, dtype: StDtype::F32, shape: vec![bytes.len() / 4], bytes: Cow::Owned(bytes) }
}

fn f64_as_f32(name: &'static str, values: &[f64]) -> Out<'static> {
    f32_tensor(name, values.iter().map(|&v| v as f32))
}

fn i64_tensor(name: &'static str, values: impl IntoIterator<Item = i64>) -> Out<'static> {
    let bytes: Vec<u8> = values.into_iter().flat_map(i64::to_le_bytes).collect();
    Out { name, dtype: StDtype::I64, shape: vec![bytes.len() / 8], bytes: Cow::Owned(bytes) }
}

fn logit_tensor<'a>(name: &'static str, logits: &Logits<'a>) -> Out<'a> {
    let shape = vec![logits.rows(), logits.vocab()];
    let data = logits.data();
    let dtype = match data.dtype() {
        Dtype::F32 => StDtype::F32,
        Dtype::F16 => StDtype::F16,
        Dtype::BF16 => StDtype::BF16,
    };
    let bytes = if cfg!(target_endian = "little") {
        Cow::Borrowed(data.as_bytes())
    } else {
        Cow::Owned(match data {
            LogitData::F32(d) => d.iter().flat_map(|v| v.to_le_bytes()).collect(),
            LogitData::F16(d) => d.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            LogitData::BF16(d) => d.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
        })
    };
    Out { name, dtype, shape, bytes }
}

/// Writes the outputs of a batch (see the module docs) to `path`, atomically.
pub fn write_output(path: impl AsRef<Path>, output: &Output) -> Result<()> {
    let rows = &output.rows;
    let mut tensors = vec![
        f32_tensor(ROW_OUTPUTS[0], rows.lse_real.iter().copied()),
        f32_tensor(ROW_OUTPUTS[1], rows.lse_masked.iter().copied()),
        f32_tensor(ROW_OUTPUTS[2], rows.log_ratio.iter().copied()),
        f32_tensor(ROW_OUTPUTS[3], rows.kl.iter().copied()),
        f32_tensor(ROW_OUTPUTS[4], rows.entropy_real.iter().copied()),
    ];
    if let Some(info) = &output.turn_info {
        tensors.push(f64_as_f32("turn_info", info));
    }
    if let Some(a) = &output.advantages {
        tensors.extend([
            f64_as_f32(TURN_OUTPUTS[0], &a.turn_intrinsic),
            f64_as_f32(TURN_OUTPUTS[1], &a.turn_intrinsic_norm),
            f64_as_f32(TURN_OUTPUTS[2], &a.turn_bonus),
            f64_as_f32(TRAJECTORY_OUTPUTS[0], &a.trajectory_advantage),
            f64_as_f32(TRAJECTORY_OUTPUTS[1], &a.trajectory_gate),
            f64_as_f32(SCALAR_OUTPUTS[0], &[a.outcome_std]),
            f64_as_f32(SCALAR_OUTPUTS[1], &[a.intrinsic_std]),
            f64_as_f32(SCALAR_OUTPUTS[2], &[a.magnitude_ratio]),
        ]);
    }
    write_tensors(path.as_ref(), tensors)
}

/// Writes a batch as an input file that [`read_input`] reads back: logits in their dtype,
/// integer tensors as I64, `trajectory_outcome` as F64. Shapes are written as given (not
/// validated), so this also makes deliberately bad files for tests.
pub fn write_input(path: impl AsRef<Path>, batch: &Batch<'_>) -> Result<()> {
    let u32s = |name, v: &[u32]| i64_tensor(name, v.iter().map(|&x| x as i64));
    let mut tensors = vec![
        logit_tensor("real_logits", &batch.real),
        logit_tensor("masked_logits", &batch.masked),
        i64_tensor("targets", batch.targets.iter().copied()),
    ];
    if let Some(t) = &batch.turns {
        tensors.extend([
            u32s(TURN_TENSORS[0], t.offsets),
            u32s(TURN_TENSORS[1], t.trajectory),
            u32s(TURN_TENSORS[2], t.credit_tokens),
        ]);
    }
    if let Some(t) = &batch.trajectories {
        let outcome: Vec<u8> = t.outcome.iter().flat_map(|v| v.to_le_bytes()).collect();
        tensors.extend([
            u32s(TRAJECTORY_TENSORS[0], t.group),
            u32s(TRAJECTORY_TENSORS[1], t.tokens),
            Out {
                name: TRAJECTORY_TENSORS[2],
                dtype: StDtype::F64,
                shape: vec![t.outcome.len()],
                bytes: Cow::Owned(outcome),
            },
        ]);
    }
    write_tensors(path.as_ref(), tensors)
}

fn write_tensors(path: &Path, tensors: Vec<Out<'_>>) -> Result<()> {
    let write_error = |what: String| Error::Write { path: path.to_path_buf(), what };
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name, v))
                .map_err(|e| write_error(format!("tensor `{}`: {e:?}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    let temp = TempFile::create(path).map_err(|e| write_error(e.to_string()))?;
    safetensors::serialize_to_file(views, &None, &temp.path).map_err(|e| write_error(format!("{e:?}")))?;
    std::fs::File::open(&temp.path).and_then(|f| f.sync_all()).map_err(|e| write_error(e.to_string()))?;
    temp.persist(path).map_err(|e| write_error(e.to_string()))
}

/// A temporary file next to the destination, removed on drop unless persisted.
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    fn create(dest: &Path) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".to_string());
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!(".{name}.{}.{n}.tmp", std::process::id()));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(_) => return Ok(TempFile { path, keep: false }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn persist(mut self, dest: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, dest)?;
        self.keep = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_turns_and_trajectories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.safetensors");
        let real = vec![bf16::from_f32(0.5); 6];
        let masked = vec![bf16::from_f32(-0.5); 6];
        let targets = [0i64, 2];
        let batch = Batch::rows(Logits::new(&real, 2, 3).unwrap(), Logits::new(&masked, 2, 3).unwrap(), &targets)
            .with_turns(Turns { offsets: &[0, 1, 2], trajectory: &[0, 1], credit_tokens: &[3, 4] })
            .with_trajectories(Trajectories { group: &[7, 7], outcome: &[1.0, 0.0], tokens: &[5, 6] });
        write_input(&path, &batch).unwrap();
        let read = read_input(&path).unwrap();
        assert_eq!((read.rows, read.vocab), (2, 3));
        assert_eq!(read.real, LogitBuf::BF16(real));
        assert_eq!(read.targets, targets);
        assert_eq!(read.turns.as_ref().unwrap().credit_tokens, [3, 4]);
        assert_eq!(read.trajectories.as_ref().unwrap().group, [7, 7]);
        assert_eq!(read.trajectories.as_ref().unwrap().outcome, [1.0, 0.0]);
        read.as_batch().unwrap();
        // Only the destination is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-folder").join("out.safetensors");
        let err = write_output(&path, &Output::default()).unwrap_err();
        assert!(matches!(err, Error::Write { .. }), "{err}");
        // A destination that is a folder: the temporary file is removed after the failed rename.
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let err = write_output(&sub, &Output::default()).unwrap_err();
        assert!(matches!(err, Error::Write { .. }), "{err}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
