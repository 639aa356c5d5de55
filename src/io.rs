//! Safetensors input and output files: the CLI's file format, stated once in `docs/cli.md`
//! ("File format" and "Hidden-state files": every tensor's name, dtype and shape, and which
//! outputs are written when).
//!
//! The tensor names are the constants below: the logits ([`LOGIT_TENSORS`]) or the fused-linear
//! set ([`HIDDEN_TENSORS`]), [`TURN_TENSORS`], [`TRAJECTORY_TENSORS`] and [`CREDIT_START_TENSOR`]
//! in; [`ROW_OUTPUTS`], [`TURN_OUTPUTS`], [`TRAJECTORY_OUTPUTS`], [`SCALAR_OUTPUTS`] and
//! [`TOKEN_OUTPUT`] out. [`read_input`] reads a logit file, [`read_any_input`] either kind (a
//! hidden-state file as an [`crate::OwnedHiddenBatch`]).
//!
//! Input files are memory-mapped, not read: a tensor whose bytes in the file are aligned for its
//! element type (safetensors' own writers align every tensor) is viewed in place, and only a
//! misaligned one, an integer tensor of another width, or any tensor on a big-endian host is
//! copied (see [`Elements`]). A multi-GB logit file therefore costs no copy and no private memory.
//!
//! Files are written to a temporary file in the destination's folder and renamed into place,
//! so a failed write leaves neither the destination nor the temporary file behind.

use crate::data::{
    Batch, Dtype, Elements, HiddenBatch, LogitBuf, LogitData, Logits, Output, OwnedBatch, OwnedHiddenBatch,
    TrajectoryBuf, TurnBuf,
};
use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::TensorView;
use safetensors::{Dtype as StDtype, SafeTensorError, SafeTensors};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The logit tensors of an input file, `[N, V]` each.
pub const LOGIT_TENSORS: [&str; 2] = ["real_logits", "masked_logits"];
/// The fused-linear set of an input file, in place of [`LOGIT_TENSORS`]: `real_hidden` and
/// `masked_hidden` `[N, D]`, `lm_head` `[V, D]`.
pub const HIDDEN_TENSORS: [&str; 3] = ["real_hidden", "masked_hidden", "lm_head"];
/// The three turn tensors (all or none).
pub const TURN_TENSORS: [&str; 3] = ["turn_offsets", "turn_trajectory", "turn_credit_tokens"];
/// The three trajectory tensors (all or none; they need the turn tensors).
pub const TRAJECTORY_TENSORS: [&str; 3] = ["trajectory_group", "trajectory_tokens", "trajectory_outcome"];
/// Optional input `[T]`: where each turn's credited tokens start in its trajectory's response.
pub const CREDIT_START_TENSOR: &str = "turn_credit_start";
/// Per-token output `[M]`, written with [`CREDIT_START_TENSOR`].
pub const TOKEN_OUTPUT: &str = "token_advantage";
/// Optional input `[B]`: each trajectory's first column in the padded output (needs a padded
/// width: [`crate::OwnedBatch::pad_width`], CLI `--pad-width`).
pub const PAD_OFFSET_TENSOR: &str = "trajectory_pad_offset";
/// The padded token output `[B, L]`, written with a padded width.
pub const PADDED_OUTPUT: &str = "token_advantage_padded";
/// Per-row outputs, `[N]`.
/// The row outputs' tensor names: `row_` and [`crate::RowOutputs::NAMES`], in that order.
pub const ROW_OUTPUTS: [&str; 5] = ["row_lse_real", "row_lse_masked", "row_log_ratio", "row_kl", "row_entropy_real"];
/// Per-turn outputs written with trajectories, `[T]` (`turn_info` is written with turns alone).
pub const TURN_OUTPUTS: [&str; 3] = ["turn_intrinsic", "turn_intrinsic_norm", "turn_bonus"];
/// Per-trajectory outputs, `[B]`.
pub const TRAJECTORY_OUTPUTS: [&str; 2] = ["trajectory_advantage", "trajectory_gate"];
/// Batch scalars, each of shape `[1]`.
pub const SCALAR_OUTPUTS: [&str; 3] = ["outcome_std", "intrinsic_std", "magnitude_ratio"];

/// Reads an input file (see the module docs) by memory-mapping it: the logits and targets are
/// viewed in place where they are aligned in the file ([`LogitBuf::is_mapped`]), so nothing of
/// their size is read into or copied in private memory, and the returned batch keeps the file
/// mapped while it lives.
///
/// As with any memory-mapped file (safetensors' own `safe_open` included), the file must not be
/// modified or truncated while the batch lives: a truncated file's lost pages fault on access
/// (SIGBUS). To be independent of the file, read its bytes and call [`parse_input`] (it copies).
/// A path that is not a regular file (a pipe, `/dev/stdin`) is read and copied, since it cannot
/// be mapped.
///
/// A file of hidden states and an lm_head (the fused-linear set) is an error here naming
/// [`read_any_input`], which reads either kind.
pub fn read_input(path: impl AsRef<Path>) -> Result<OwnedBatch> {
    let path = path.as_ref();
    logits_only(read_any_input(path)?, path)
}

/// Parses the bytes of an input file into owned buffers (every tensor is copied); `path` only
/// names the file in errors. [`read_input`] maps the file instead.
pub fn parse_input(bytes: &[u8], path: &Path) -> Result<OwnedBatch> {
    logits_only(parse(bytes, None, path)?, path)
}

fn logits_only(input: Input, path: &Path) -> Result<OwnedBatch> {
    match input {
        Input::Logits(batch) => Ok(batch),
        Input::Hidden(_) => Err(file_error(
            path,
            format!(
                "it holds hidden states and an lm_head ({}), not logits: read it with io::read_any_input",
                HIDDEN_TENSORS.join(", ")
            ),
        )),
    }
}

/// An input file of either kind: logits, or hidden states and the lm_head weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `real_logits` and `masked_logits`: [`crate::Backend::compute`].
    Logits(OwnedBatch),
    /// `real_hidden`, `masked_hidden` and `lm_head`: [`crate::Backend::compute_hidden`].
    Hidden(OwnedHiddenBatch),
}

impl Input {
    /// N, the rows of the batch.
    pub fn rows(&self) -> usize {
        match self {
            Input::Logits(b) => b.rows,
            Input::Hidden(b) => b.rows,
        }
    }
}

/// Reads an input file of either kind (see the module docs) by memory-mapping it, as
/// [`read_input`] does (same contract: the file must not change while the batch lives): the
/// logits, or the hidden states and lm_head, and the targets are viewed in place where aligned.
pub fn read_any_input(path: impl AsRef<Path>) -> Result<Input> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| file_error(path, e.to_string()))?;
    let meta = file.metadata().map_err(|e| file_error(path, e.to_string()))?;
    if meta.is_dir() {
        return Err(file_error(path, "is a directory".to_string()));
    }
    if !meta.is_file() {
        // A pipe or a device (`/dev/stdin`, `<(...)`) cannot be mapped: read it and copy.
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut &file, &mut bytes).map_err(|e| file_error(path, e.to_string()))?;
        return parse(&bytes, None, path);
    }
    // SAFETY: a read-only mapping, never written through; the aliasing hazard of a file changed
    // by another process while mapped is the caller's contract, documented on `read_input`.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(path, format!("cannot map it: {e}")))?;
    let map = Arc::new(map);
    parse(&map, Some(&map), path)
}

/// [`parse_input`] for either kind of file (every tensor is copied).
pub fn parse_any_input(bytes: &[u8], path: &Path) -> Result<Input> {
    parse(bytes, None, path)
}

/// Parses `bytes`, which are all of `map` when one is given: aligned tensors are then viewed in
/// place in it. Exactly one of the logit set and the hidden set must be present.
fn parse(bytes: &[u8], map: Option<&Arc<Mmap>>, path: &Path) -> Result<Input> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| file_error(path, describe(&e)))?;
    let file = File { st: &st, path };
    let has_any = |names: &[&str]| names.iter().any(|n| file.get(n).is_some());
    match (has_any(&LOGIT_TENSORS), has_any(&HIDDEN_TENSORS)) {
        (true, false) => parse_logits(&file, map).map(Input::Logits),
        (false, true) => parse_hidden(&file, map).map(Input::Hidden),
        (true, true) => Err(file_error(
            path,
            format!(
                "it holds both logits ({}) and hidden states ({}): an input file holds one of the two sets",
                LOGIT_TENSORS.join(", "),
                HIDDEN_TENSORS.join(", ")
            ),
        )),
        (false, false) => Err(file_error(
            path,
            format!(
                "it holds neither logits ({} and {}) nor hidden states and an lm_head ({}, {} and {})",
                LOGIT_TENSORS[0], LOGIT_TENSORS[1], HIDDEN_TENSORS[0], HIDDEN_TENSORS[1], HIDDEN_TENSORS[2]
            ),
        )),
    }
}

fn parse_logits(file: &File<'_, '_>, map: Option<&Arc<Mmap>>) -> Result<OwnedBatch> {
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
    let real_buf = logits("real_logits", &real, map)?;
    let masked_buf = logits("masked_logits", &masked, map)?;
    if real_buf.dtype() != masked_buf.dtype() {
        return Err(Error::DtypeMismatch { real: real_buf.dtype().name(), masked: masked_buf.dtype().name() });
    }
    let layout = parse_layout(file, &targets, map)?;
    Ok(OwnedBatch {
        rows,
        vocab,
        real: real_buf,
        masked: masked_buf,
        targets: layout.targets,
        turns: layout.turns,
        trajectories: layout.trajectories,
        credit_start: layout.credit_start,
        pad_width: None,
        pad_offset: layout.pad_offset,
    })
}

/// The hidden-state set: `real_hidden`, `masked_hidden` `[N, D]`, `lm_head` `[V, D]`, one dtype.
fn parse_hidden(file: &File<'_, '_>, map: Option<&Arc<Mmap>>) -> Result<OwnedHiddenBatch> {
    let Some(set) = file.set(&HIDDEN_TENSORS)? else {
        return Err(Error::MissingTensor { name: HIDDEN_TENSORS[0].to_string(), path: file.path.to_path_buf() });
    };
    let [real, masked, head] = [&set[0], &set[1], &set[2]];
    let targets = file.require("targets")?;
    let (rows, hidden) = match *real.shape() {
        [n, d] => (n, d),
        ref s => return Err(Error::shape(format!("`real_hidden` has shape {s:?}, expected [N, D]"))),
    };
    if masked.shape() != real.shape() {
        return Err(Error::shape(format!(
            "`masked_hidden` has shape {:?} but `real_hidden` has shape {:?}",
            masked.shape(),
            real.shape()
        )));
    }
    let vocab = match *head.shape() {
        [v, d] if d == hidden => v,
        [_, d] => {
            return Err(Error::shape(format!(
                "`lm_head` has shape {:?}: its width D = {d} differs from the hidden states' D = {hidden} \
                 (`real_hidden` has shape {:?})",
                head.shape(),
                real.shape()
            )))
        }
        ref s => return Err(Error::shape(format!("`lm_head` has shape {s:?}, expected [V, D]"))),
    };
    if targets.shape() != [rows] {
        return Err(Error::shape(format!("`targets` has shape {:?}, expected [N] = [{rows}]", targets.shape())));
    }
    let real_hidden = logits("real_hidden", real, map)?;
    let masked_hidden = logits("masked_hidden", masked, map)?;
    let lm_head = logits("lm_head", head, map)?;
    crate::data::batch::check_dtypes(real_hidden.dtype(), masked_hidden.dtype(), lm_head.dtype())?;
    let layout = parse_layout(file, &targets, map)?;
    Ok(OwnedHiddenBatch {
        rows,
        hidden,
        vocab,
        real_hidden,
        masked_hidden,
        lm_head,
        targets: layout.targets,
        turns: layout.turns,
        trajectories: layout.trajectories,
        credit_start: layout.credit_start,
        pad_width: None,
        pad_offset: layout.pad_offset,
    })
}

/// What both kinds of input file share: the targets and the optional layout tensors.
struct FileLayout {
    targets: Elements<i64>,
    turns: Option<TurnBuf>,
    trajectories: Option<TrajectoryBuf>,
    credit_start: Option<Vec<u32>>,
    pad_offset: Option<Vec<u32>>,
}

fn parse_layout(file: &File<'_, '_>, targets: &TensorView<'_>, map: Option<&Arc<Mmap>>) -> Result<FileLayout> {
    let path = file.path;
    let targets = match targets.dtype() {
        StDtype::I64 => elements(targets.data(), map, |d| decode(d, i64::from_le_bytes)),
        _ => integers("targets", targets)?.into(),
    };

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
    // Checked against the turns and trajectories by the backends (`layout::batch`).
    let credit_start = file.get(CREDIT_START_TENSOR).map(|v| indices(CREDIT_START_TENSOR, &v)).transpose()?;
    let pad_offset = file.get(PAD_OFFSET_TENSOR).map(|v| indices(PAD_OFFSET_TENSOR, &v)).transpose()?;
    Ok(FileLayout { targets, turns, trajectories, credit_start, pad_offset })
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
        InvalidOffset(name) => {
            format!("tensor `{name}` has invalid data offsets (they must be in order, contiguous and not overlap)")
        }
        TensorInvalidInfo => {
            "a tensor's data offsets span another byte count than its shape and dtype need".to_string()
        }
        ValidationOverflow => "a tensor's shape (times its dtype's size) overflows the address space".to_string(),
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

/// `data` viewed in place in `map` when aligned for `T`, else decoded into an owned buffer.
fn elements<T: bytemuck::Pod>(
    data: &[u8],
    map: Option<&Arc<Mmap>>,
    decode: impl FnOnce(&[u8]) -> Vec<T>,
) -> Elements<T> {
    map.and_then(|m| Elements::mapped(m, data)).unwrap_or_else(|| decode(data).into())
}

fn logits(name: &str, view: &TensorView<'_>, map: Option<&Arc<Mmap>>) -> Result<LogitBuf> {
    let data = view.data();
    Ok(match view.dtype() {
        StDtype::F32 => LogitBuf::F32(elements(data, map, |d| decode(d, f32::from_le_bytes))),
        StDtype::F16 => LogitBuf::F16(elements(data, map, |d| decode(d, |b| f16::from_bits(u16::from_le_bytes(b))))),
        StDtype::BF16 => LogitBuf::BF16(elements(data, map, |d| decode(d, |b| bf16::from_bits(u16::from_le_bytes(b))))),
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
    float_tensor(name, logits.data(), vec![logits.rows(), logits.vocab()])
}

/// An F32, F16 or BF16 tensor of `shape`.
fn float_tensor<'a>(name: &'static str, data: LogitData<'a>, shape: Vec<usize>) -> Out<'a> {
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
    let mut tensors: Vec<Out<'_>> = (ROW_OUTPUTS.iter().zip(output.rows.columns()))
        .map(|(&name, column)| f32_tensor(name, column.iter().copied()))
        .collect();
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
        if let Some(tokens) = &a.token_advantage {
            tensors.push(f64_as_f32(TOKEN_OUTPUT, tokens));
        }
        if let Some(padded) = &a.padded_advantage {
            let b = a.trajectory_advantage.len();
            let mut t = f64_as_f32(PADDED_OUTPUT, padded);
            t.shape = vec![b, padded.len() / b.max(1)];
            tensors.push(t);
        }
    }
    write_tensors(path.as_ref(), tensors)
}

/// Writes a batch as an input file that [`read_input`] reads back: logits in their dtype,
/// integer tensors as I64, `trajectory_outcome` as F64. Shapes are written as given (not
/// validated), so this also makes deliberately bad files for tests.
pub fn write_input(path: impl AsRef<Path>, batch: &Batch<'_>) -> Result<()> {
    let mut tensors = vec![
        logit_tensor(LOGIT_TENSORS[0], &batch.real),
        logit_tensor(LOGIT_TENSORS[1], &batch.masked),
        i64_tensor("targets", batch.targets.iter().copied()),
    ];
    tensors.extend(layout_tensors(
        batch.turns.as_ref(),
        batch.trajectories.as_ref(),
        batch.credit_start,
        batch.padding,
    ));
    write_tensors(path.as_ref(), tensors)
}

/// Writes a fused-linear batch as an input file that [`read_any_input`] reads back:
/// `real_hidden`, `masked_hidden` `[N, D]` and `lm_head` `[V, D]` in their dtype, the targets
/// and layout as [`write_input`] writes them.
pub fn write_hidden_input(path: impl AsRef<Path>, batch: &HiddenBatch<'_>) -> Result<()> {
    let t = &batch.tensors;
    let (n, d, v) = (t.rows(), t.hidden(), t.vocab());
    let mut tensors = vec![
        float_tensor(HIDDEN_TENSORS[0], t.real_hidden(), vec![n, d]),
        float_tensor(HIDDEN_TENSORS[1], t.masked_hidden(), vec![n, d]),
        float_tensor(HIDDEN_TENSORS[2], t.lm_head(), vec![v, d]),
        i64_tensor("targets", batch.targets.iter().copied()),
    ];
    tensors.extend(layout_tensors(
        batch.turns.as_ref(),
        batch.trajectories.as_ref(),
        batch.credit_start,
        batch.padding,
    ));
    write_tensors(path.as_ref(), tensors)
}

/// The optional turn, trajectory and credit-start tensors of an input file.
fn layout_tensors(
    turns: Option<&crate::Turns<'_>>,
    trajectories: Option<&crate::Trajectories<'_>>,
    credit_start: Option<&[u32]>,
    padding: Option<crate::Padding<'_>>,
) -> Vec<Out<'static>> {
    let u32s = |name, v: &[u32]| i64_tensor(name, v.iter().map(|&x| x as i64));
    let mut tensors = Vec::new();
    if let Some(t) = turns {
        tensors.extend([
            u32s(TURN_TENSORS[0], t.offsets),
            u32s(TURN_TENSORS[1], t.trajectory),
            u32s(TURN_TENSORS[2], t.credit_tokens),
        ]);
    }
    if let Some(t) = trajectories {
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
    if let Some(starts) = credit_start {
        tensors.push(u32s(CREDIT_START_TENSOR, starts));
    }
    // The width is the caller's choice at compute time (`--pad-width`), not part of the file.
    if let Some(offset) = padding.and_then(|p| p.offset) {
        tensors.push(u32s(PAD_OFFSET_TENSOR, offset));
    }
    tensors
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
    use crate::{Trajectories, Turns};

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
        assert_eq!(read.real, LogitBuf::BF16(real.into()));
        assert!(read.real.is_mapped() && read.masked.is_mapped() && read.targets.is_mapped());
        assert_eq!(read.targets, targets);
        assert_eq!(read.turns.as_ref().unwrap().credit_tokens, [3, 4]);
        assert_eq!(read.trajectories.as_ref().unwrap().group, [7, 7]);
        assert_eq!(read.trajectories.as_ref().unwrap().outcome, [1.0, 0.0]);
        read.as_batch().unwrap();
        // Only the destination is left in the folder.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn hidden_round_trip_and_the_logits_reader_names_the_other() {
        use crate::data::{HiddenBatch, HiddenTensors};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hidden.safetensors");
        let real: Vec<f16> = (0..6).map(|i| f16::from_f32(i as f32 * 0.25)).collect();
        let masked: Vec<f16> = (0..6).map(|i| f16::from_f32(-(i as f32))).collect();
        let head: Vec<f16> = (0..12).map(|i| f16::from_f32(i as f32 * 0.5)).collect();
        let tensors = HiddenTensors::new(
            LogitData::from_slice(&real),
            LogitData::from_slice(&masked),
            LogitData::from_slice(&head),
            2,
            3,
            4,
        )
        .unwrap();
        let targets = [1i64, 3];
        let batch = HiddenBatch::rows(tensors, &targets)
            .with_turns(Turns { offsets: &[0, 1, 2], trajectory: &[0, 1], credit_tokens: &[3, 4] })
            .with_trajectories(Trajectories { group: &[7, 7], outcome: &[1.0, 0.0], tokens: &[5, 6] })
            .with_credit_start(&[1, 2]);
        write_hidden_input(&path, &batch).unwrap();
        let Input::Hidden(read) = read_any_input(&path).unwrap() else { panic!("read back as logits") };
        assert_eq!((read.rows, read.hidden, read.vocab), (2, 3, 4));
        assert_eq!(read.lm_head, LogitBuf::F16(head.into()));
        assert!(read.real_hidden.is_mapped() && read.masked_hidden.is_mapped() && read.lm_head.is_mapped());
        assert_eq!(read.targets, targets);
        assert_eq!(read.credit_start.as_deref(), Some(&[1, 2][..]));
        assert_eq!(read.trajectories.as_ref().unwrap().group, [7, 7]);
        assert_eq!(parse_any_input(&std::fs::read(&path).unwrap(), &path).unwrap(), Input::Hidden(read.clone()));
        read.as_batch().unwrap().validate().unwrap();
        // The logits-only readers say what the file holds and what reads it.
        for err in [read_input(&path).unwrap_err(), parse_input(&std::fs::read(&path).unwrap(), &path).unwrap_err()] {
            assert!(matches!(err, Error::File { .. }) && err.to_string().contains("read_any_input"), "{err}");
        }
    }

    /// A safetensors file whose data starts with a `pad` tensor of `pad` bytes, so the tensors
    /// after it sit at offsets of every alignment: real and masked logits of `dtype` ([2, 3],
    /// elements 0..6 and 10..16 as `f32`) and I64 targets. Returns the byte offsets (from the
    /// start of the file) of the three tensors.
    fn file_with_padding(path: &Path, pad: usize, dtype: Dtype) -> [usize; 3] {
        let size = dtype.size_bytes();
        let encode = |v: f32| -> Vec<u8> {
            match dtype {
                Dtype::F32 => v.to_le_bytes().to_vec(),
                Dtype::F16 => f16::from_f32(v).to_bits().to_le_bytes().to_vec(),
                Dtype::BF16 => bf16::from_f32(v).to_bits().to_le_bytes().to_vec(),
            }
        };
        let name = match dtype {
            Dtype::F32 => "F32",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
        };
        let logits = 6 * size;
        let (real_at, masked_at, targets_at) = (pad, pad + logits, pad + 2 * logits);
        let header = format!(
            "{{\"pad\":{{\"dtype\":\"U8\",\"shape\":[{pad}],\"data_offsets\":[0,{pad}]}},\
             \"real_logits\":{{\"dtype\":\"{name}\",\"shape\":[2,3],\"data_offsets\":[{real_at},{masked_at}]}},\
             \"masked_logits\":{{\"dtype\":\"{name}\",\"shape\":[2,3],\"data_offsets\":[{masked_at},{targets_at}]}},\
             \"targets\":{{\"dtype\":\"I64\",\"shape\":[2],\"data_offsets\":[{targets_at},{}]}}}}",
            targets_at + 16
        );
        // Pad the header to a multiple of 8 as safetensors' writers do, so only `pad` misaligns.
        let header = format!("{header:<width$}", width = header.len().div_ceil(8) * 8);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let data_start = bytes.len();
        bytes.extend(std::iter::repeat_n(0xAB, pad));
        bytes.extend((0..6).flat_map(|i| encode(i as f32)));
        bytes.extend((10..16).flat_map(|i| encode(i as f32)));
        bytes.extend([2i64, 0].iter().flat_map(|t| t.to_le_bytes()));
        std::fs::write(path, bytes).unwrap();
        [data_start + real_at, data_start + masked_at, data_start + targets_at]
    }

    #[test]
    fn aligned_tensors_are_viewed_in_place_and_misaligned_ones_copied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.safetensors");
        let aligned = |offset: usize, align: usize| cfg!(target_endian = "little") && offset % align == 0;
        let mut seen = [[false; 2]; 3];
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
            for pad in 0..=8 {
                let [real_at, masked_at, targets_at] = file_with_padding(&path, pad, dtype);
                let read = read_input(&path).unwrap_or_else(|e| panic!("{dtype} pad {pad}: {e}"));
                let size = dtype.size_bytes();
                assert_eq!(read.real.is_mapped(), aligned(real_at, size), "{dtype} pad {pad}");
                assert_eq!(read.masked.is_mapped(), aligned(masked_at, size), "{dtype} pad {pad}");
                assert_eq!(read.targets.is_mapped(), aligned(targets_at, 8), "pad {pad}");
                seen[0][read.real.is_mapped() as usize] = true;
                seen[1][read.masked.is_mapped() as usize] = true;
                seen[2][read.targets.is_mapped() as usize] = true;
                // Mapped or copied, the values are the file's, and the same as parse_input's copy.
                let batch = read.as_batch().unwrap();
                let values = |logits: &Logits<'_>| -> Vec<f32> {
                    match logits.data() {
                        LogitData::F32(d) => d.to_vec(),
                        LogitData::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
                        LogitData::BF16(d) => d.iter().map(|v| v.to_f32()).collect(),
                    }
                };
                assert_eq!(values(&batch.real), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "{dtype} pad {pad}");
                assert_eq!(values(&batch.masked), [10.0, 11.0, 12.0, 13.0, 14.0, 15.0], "{dtype} pad {pad}");
                assert_eq!(batch.targets, [2, 0]);
                let copied = parse_input(&std::fs::read(&path).unwrap(), &path).unwrap();
                assert!(!copied.real.is_mapped() && !copied.targets.is_mapped());
                assert_eq!(copied, read);
            }
        }
        if cfg!(target_endian = "little") {
            assert_eq!(seen, [[true; 2]; 3], "both the mapped and the copied path of every tensor");
        }
    }

    #[test]
    fn unreadable_inputs_are_file_errors() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_input(dir.path()).unwrap_err();
        assert!(matches!(err, Error::File { .. }) && err.to_string().contains("directory"), "{err}");
        let empty = dir.path().join("empty.safetensors");
        std::fs::write(&empty, b"").unwrap();
        let err = read_input(&empty).unwrap_err();
        assert!(matches!(err, Error::File { .. }) && err.to_string().contains("header"), "{err}");
        let err = read_input(dir.path().join("missing.safetensors")).unwrap_err();
        assert!(matches!(err, Error::File { .. }), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_pipe_is_read_and_copied() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("in.safetensors");
        file_with_padding(&file, 0, Dtype::BF16);
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
        assert!(made.success());
        let bytes = std::fs::read(&file).unwrap();
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::write(fifo, bytes).unwrap())
        };
        let read = read_input(&fifo).unwrap();
        writer.join().unwrap();
        assert!(!read.real.is_mapped() && !read.targets.is_mapped());
        assert_eq!(read, read_input(&file).unwrap());
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
