//! Borrowed views of the two logit tensors.

use crate::error::{Error, Result};
use half::{bf16, f16};
use memmap2::Mmap;
use std::sync::Arc;

/// Element type of a logit tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    F32,
    F16,
    BF16,
}

impl Dtype {
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::BF16 => "bf16",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Dtype::F32),
            "f16" => Ok(Dtype::F16),
            "bf16" => Ok(Dtype::BF16),
            _ => Err(format!("unknown dtype `{s}` (expected f32, f16 or bf16)")),
        }
    }
}

/// A logit element type the crate reads.
pub trait LogitElement: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: Dtype;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    /// `dst[i] = src[i].to_f32()` for equal-length slices, vectorised where the type allows.
    fn widen(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_f32();
        }
    }
}

impl LogitElement for f32 {
    const DTYPE: Dtype = Dtype::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl LogitElement for f16 {
    const DTYPE: Dtype = Dtype::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    /// half's slice conversion uses F16C when the CPU has it.
    fn widen(src: &[Self], dst: &mut [f32]) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }
}

impl LogitElement for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    #[inline(always)]
    /// Exact: a bf16 is the top half of an f32 (a 16-bit shift, which vectorises).
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// The elements of one logit tensor, by dtype.
#[derive(Debug, Clone, Copy)]
pub enum LogitData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// A borrowed, row-major [rows, vocab] logit tensor.
#[derive(Debug, Clone, Copy)]
pub struct Logits<'a> {
    data: LogitData<'a>,
    rows: usize,
    vocab: usize,
}

impl<'a> Logits<'a> {
    /// Views `data` as `rows` contiguous rows of `vocab` logits.
    pub fn new<T: LogitElement>(data: &'a [T], rows: usize, vocab: usize) -> Result<Self> {
        let data = LogitData::from_slice(data);
        Self::from_data(data, rows, vocab)
    }

    pub fn from_data(data: LogitData<'a>, rows: usize, vocab: usize) -> Result<Self> {
        if vocab == 0 {
            return Err(Error::EmptyVocab);
        }
        let expected = rows
            .checked_mul(vocab)
            .ok_or_else(|| Error::shape(format!("{rows} rows x {vocab} vocab overflows usize")))?;
        if data.len() != expected {
            return Err(Error::shape(format!(
                "logits hold {} elements, expected rows x vocab = {rows} x {vocab} = {expected}",
                data.len()
            )));
        }
        Ok(Logits { data, rows, vocab })
    }

    pub fn data(&self) -> LogitData<'a> {
        self.data
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn vocab(&self) -> usize {
        self.vocab
    }
    pub fn dtype(&self) -> Dtype {
        self.data.dtype()
    }
    /// Bytes of logits in this tensor.
    pub fn size_bytes(&self) -> usize {
        self.rows * self.vocab * self.dtype().size_bytes()
    }

    /// Rows `start..start + len` as a new view (a micro-batch).
    pub fn slice_rows(&self, start: usize, len: usize) -> Result<Logits<'a>> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.rows)
            .ok_or_else(|| Error::shape(format!("rows {start}..{start}+{len} outside 0..{}", self.rows)))?;
        let (a, b) = (start * self.vocab, end * self.vocab);
        let data = match self.data {
            LogitData::F32(d) => LogitData::F32(&d[a..b]),
            LogitData::F16(d) => LogitData::F16(&d[a..b]),
            LogitData::BF16(d) => LogitData::BF16(&d[a..b]),
        };
        Ok(Logits { data, rows: len, vocab: self.vocab })
    }
}

impl<'a> LogitData<'a> {
    pub fn from_slice<T: LogitElement>(data: &'a [T]) -> Self {
        // The three element types are the only implementors of LogitElement.
        match T::DTYPE {
            Dtype::F32 => LogitData::F32(bytemuck::cast_slice(data)),
            Dtype::F16 => LogitData::F16(bytemuck::cast_slice(data)),
            Dtype::BF16 => LogitData::BF16(bytemuck::cast_slice(data)),
        }
    }

    pub fn dtype(&self) -> Dtype {
        match self {
            LogitData::F32(_) => Dtype::F32,
            LogitData::F16(_) => Dtype::F16,
            LogitData::BF16(_) => Dtype::BF16,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            LogitData::F32(d) => d.len(),
            LogitData::F16(d) => d.len(),
            LogitData::BF16(d) => d.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw bytes (for FFI and device uploads).
    pub fn as_bytes(&self) -> &'a [u8] {
        match self {
            LogitData::F32(d) => bytemuck::cast_slice(d),
            LogitData::F16(d) => bytemuck::cast_slice(d),
            LogitData::BF16(d) => bytemuck::cast_slice(d),
        }
    }
}

/// The elements of one tensor of an input file: viewed in place in the memory-mapped file when
/// its bytes there are aligned for `T` (and the host is little-endian), else an owned copy.
/// Dereferences to `&[T]`; cloning a mapped one shares the mapping.
#[derive(Clone)]
pub struct Elements<T: bytemuck::Pod> {
    storage: Storage<T>,
}

#[derive(Clone)]
enum Storage<T> {
    /// `len` elements of type `T` at byte `start` of `map`; `start` is a multiple of
    /// `align_of::<T>()` (checked when made, and the mapping itself is page-aligned).
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    Owned(Vec<T>),
}

impl<T: bytemuck::Pod> Elements<T> {
    /// Views `bytes` (a sub-slice of `map`) in place if they are aligned for `T`; `None` if not
    /// (or if the host is big-endian: the file's little-endian bytes must then be decoded).
    pub(crate) fn mapped(map: &Arc<Mmap>, bytes: &[u8]) -> Option<Self> {
        if cfg!(target_endian = "big") {
            return None;
        }
        let elements: &[T] = bytemuck::try_cast_slice(bytes).ok()?;
        let start = (bytes.as_ptr() as usize).checked_sub(map.as_ptr() as usize)?;
        (start + bytes.len() <= map.len())
            .then(|| Elements { storage: Storage::Mapped { map: Arc::clone(map), start, len: elements.len() } })
    }

    /// The elements as a slice.
    pub fn as_slice(&self) -> &[T] {
        match &self.storage {
            Storage::Mapped { map, start, len } => {
                let bytes = &map[*start..*start + len * std::mem::size_of::<T>()];
                bytemuck::try_cast_slice(bytes).expect("alignment and length checked when mapped")
            }
            Storage::Owned(v) => v,
        }
    }

    /// Whether the elements are viewed in place in the mapped file (no copy was made).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. })
    }
}

impl<T: bytemuck::Pod> From<Vec<T>> for Elements<T> {
    fn from(v: Vec<T>) -> Self {
        Elements { storage: Storage::Owned(v) }
    }
}

impl<T: bytemuck::Pod> std::ops::Deref for Elements<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: bytemuck::Pod + PartialEq> PartialEq for Elements<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: bytemuck::Pod + PartialEq, const N: usize> PartialEq<[T; N]> for Elements<T> {
    fn eq(&self, other: &[T; N]) -> bool {
        self.as_slice() == other
    }
}

impl<T: bytemuck::Pod + PartialEq> PartialEq<[T]> for Elements<T> {
    fn eq(&self, other: &[T]) -> bool {
        self.as_slice() == other
    }
}

impl<T: bytemuck::Pod + std::fmt::Debug> std::fmt::Debug for Elements<T> {
    /// Small tensors print their elements; large ones (logits) their length and storage.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        if self.len() <= SHOWN {
            f.debug_list().entries(self.as_slice()).finish()
        } else {
            let storage = if self.is_mapped() { "mapped" } else { "owned" };
            write!(f, "[{} elements, {storage}]", self.len())
        }
    }
}

/// A logit tensor's elements (see [`Elements`]).
#[derive(Debug, Clone, PartialEq)]
pub enum LogitBuf {
    F32(Elements<f32>),
    F16(Elements<f16>),
    BF16(Elements<bf16>),
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

    /// Whether the tensor is viewed in place in the mapped file (no copy was made).
    pub fn is_mapped(&self) -> bool {
        match self {
            LogitBuf::F32(v) => v.is_mapped(),
            LogitBuf::F16(v) => v.is_mapped(),
            LogitBuf::BF16(v) => v.is_mapped(),
        }
    }

    pub fn as_data(&self) -> LogitData<'_> {
        match self {
            LogitBuf::F32(v) => LogitData::F32(v),
            LogitBuf::F16(v) => LogitData::F16(v),
            LogitBuf::BF16(v) => LogitData::BF16(v),
        }
    }
}

impl From<Vec<f32>> for LogitBuf {
    fn from(v: Vec<f32>) -> Self {
        LogitBuf::F32(v.into())
    }
}

impl From<Vec<f16>> for LogitBuf {
    fn from(v: Vec<f16>) -> Self {
        LogitBuf::F16(v.into())
    }
}

impl From<Vec<bf16>> for LogitBuf {
    fn from(v: Vec<bf16>) -> Self {
        LogitBuf::BF16(v.into())
    }
}
