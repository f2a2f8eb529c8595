//! The GGUF container (versions 2 and 3): metadata key/values and tensor infos, with every
//! read bounds-checked so that a truncated or corrupt file is an error, never a panic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dequant::GgmlType;
use crate::{Error, Result};

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    /// The value as an unsigned integer, if it is any integer type holding one.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a float, if it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// A tensor's entry in the GGUF header.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the innermost (contiguous) one.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Byte range of the data inside the file.
    pub range: std::ops::Range<usize>,
}

impl GgufTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }

    /// The shape in PyTorch order (outermost first).
    pub fn torch_shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// Container version (2 or 3).
    pub version: u32,
    /// Metadata, sorted by key.
    pub metadata: BTreeMap<String, MetaValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensor>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

impl GgufFile {
    /// Maps and parses a GGUF file.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping of a file we do not modify.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let mut cur = Cursor {
            bytes: &mmap,
            pos: 0,
            path,
        };
        if cur.take(4)? != MAGIC {
            return Err(cur.error("not a GGUF file (bad magic)".into()));
        }
        let version = cur.u32()?;
        if !(2..=3).contains(&version) {
            return Err(cur.error(format!("GGUF version {version} is not supported (2 or 3)")));
        }
        let tensor_count = cur.u64()?;
        let kv_count = cur.u64()?;
        let mut metadata = BTreeMap::new();
        for _ in 0..kv_count {
            let key = cur.string()?;
            let ty = cur.u32()?;
            let value = cur.value(ty, 0)?;
            metadata.insert(key, value);
        }
        let alignment = metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT);
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(cur.error(format!("general.alignment {alignment} is not a power of two")));
        }
        let mut infos = Vec::new();
        for _ in 0..tensor_count {
            let name = cur.string()?;
            let n_dims = cur.u32()?;
            if n_dims > 4 {
                return Err(cur.error(format!("tensor `{name}` has {n_dims} dimensions (at most 4)")));
            }
            let dims = (0..n_dims).map(|_| cur.u64()).collect::<Result<Vec<_>>>()?;
            let ty = cur.u32()?;
            let offset = cur.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let data_start = (cur.pos as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let ggml_type = GgmlType::from_id(ty);
            let numel = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| cur.error(format!("tensor `{name}`: element count overflows")))?;
            let size = ggml_type
                .byte_size(numel)
                .map_err(|m| cur.error(format!("tensor `{name}`: {m}")))?;
            let start = data_start
                .checked_add(offset)
                .ok_or_else(|| cur.error(format!("tensor `{name}`: bad data offset {offset}")))?;
            let end = start
                .checked_add(size)
                .filter(|&e| e <= mmap.len() as u64)
                .ok_or_else(|| {
                    cur.error(format!(
                        "tensor `{name}` ends past the end of the file ({} bytes): the file is truncated",
                        mmap.len()
                    ))
                })?;
            tensors.push(GgufTensor {
                name,
                dims,
                ggml_type,
                range: start as usize..end as usize,
            });
        }
        Ok(GgufFile {
            path: path.to_owned(),
            mmap,
            version,
            metadata,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An error about this file.
    pub fn error(&self, message: impl Into<String>) -> Error {
        Error::Gguf {
            path: self.path.clone(),
            message: message.into(),
        }
    }

    /// A metadata value, or an error naming the key.
    pub fn get(&self, key: &str) -> Result<&MetaValue> {
        self.metadata
            .get(key)
            .ok_or_else(|| self.error(format!("metadata key `{key}` is missing")))
    }

    /// A required unsigned integer.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.as_u64()
            .ok_or_else(|| self.error(format!("metadata key `{key}`: expected an integer, found {v:?}")))
    }

    /// A required number.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.as_f64()
            .ok_or_else(|| self.error(format!("metadata key `{key}`: expected a number, found {v:?}")))
    }

    /// A required string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.get(key)?;
        v.as_str()
            .ok_or_else(|| self.error(format!("metadata key `{key}`: expected a string, found {v:?}")))
    }

    /// A tensor info by name.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor.
    pub fn tensor_bytes(&self, tensor: &GgufTensor) -> &[u8] {
        &self.mmap[tensor.range.clone()]
    }

    /// Drops a tensor's pages from this process's resident memory once it is converted, so
    /// that an import's resident set stays near the tensors in flight rather than growing to
    /// the file's size.
    pub fn release_pages(&self, tensor: &GgufTensor) {
        if tensor.range.is_empty() {
            return;
        }
        // SAFETY: a read-only shared mapping of a file: MADV_DONTNEED discards no data (a
        // later read faults the same bytes back in), so no live reference sees a change.
        // Failure only means the pages stay resident.
        let _ = unsafe {
            self.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                tensor.range.start,
                tensor.range.len(),
            )
        };
    }

    /// A tensor's values as f32, in ggml order (innermost dimension contiguous).
    pub fn dequantize(&self, tensor: &GgufTensor) -> Result<Vec<f32>> {
        super::dequant::dequantize(
            tensor.ggml_type,
            self.tensor_bytes(tensor),
            tensor.numel() as usize,
        )
        .map_err(|m| self.error(format!("tensor `{}`: {m}", tensor.name)))
    }
}

/// A bounds-checked little-endian reader over the header.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn error(&self, message: String) -> Error {
        Error::Gguf {
            path: self.path.to_owned(),
            message,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| {
                self.error(format!(
                    "header ends unexpectedly at byte {} (wanted {n} more): the file is truncated or corrupt",
                    self.pos
                ))
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn len(&mut self) -> Result<usize> {
        let n = self.u64()?;
        // No element is smaller than a byte, so a count beyond the file is corrupt.
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| self.error(format!("length {n} at byte {} exceeds the file", self.pos - 8)))
    }

    fn string(&mut self) -> Result<String> {
        let n = self.len()?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| self.error(format!("string at byte {} is not UTF-8", self.pos - n)))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 => {
                if depth > 2 {
                    return Err(self.error("metadata arrays nested too deeply".into()));
                }
                let item_ty = self.u32()?;
                let n = self.len()?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(item_ty, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(self.error(format!("unknown metadata value type {other}"))),
        })
    }
}
