//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`; and typed views of their tensors that borrow from the
//! mapping when they can.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytemuck::Pod;
use half::{bf16, f16};
use memmap2::{Mmap, UncheckedAdvice};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// Name of a single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One memory-mapped safetensors file.
struct MappedFile {
    path: PathBuf,
    mmap: Mmap,
}

#[derive(Clone)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Byte range inside the mapped file.
    range: Range<usize>,
}

/// A checkpoint directory whose tensors are read lazily from memory-mapped files.
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Arc<MappedFile>>,
    tensors: HashMap<String, TensorEntry>,
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let mut checkpoint = Checkpoint {
            dir: dir.to_owned(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        if index_path.exists() {
            let weight_map = read_index(&index_path)?;
            let mut shard_names: Vec<&String> = weight_map.values().collect();
            shard_names.sort();
            shard_names.dedup();
            for shard in shard_names {
                let listed: Vec<&str> = weight_map
                    .iter()
                    .filter(|(_, file)| *file == shard)
                    .map(|(name, _)| name.as_str())
                    .collect();
                checkpoint.add_file(&dir.join(shard), Some((&index_path, &listed)))?;
            }
        } else if single_path.exists() {
            checkpoint.add_file(&single_path, None)?;
        } else {
            return Err(Error::NotFound {
                path: dir.to_owned(),
                what: format!("no {SINGLE_FILE} or {INDEX_FILE} in this folder"),
            });
        }
        Ok(checkpoint)
    }

    /// Opens one safetensors file of `dir` alone (a pre-sharded rank's file): no other file
    /// of the folder is opened.
    pub fn open_file(dir: &Path, file_name: &str) -> Result<Self> {
        let mut checkpoint = Checkpoint {
            dir: dir.to_owned(),
            files: Vec::new(),
            tensors: HashMap::new(),
        };
        checkpoint.add_file(&dir.join(file_name), None)?;
        Ok(checkpoint)
    }

    /// Bytes of tensor data in the opened files (their sizes less the headers).
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.range.len() as u64).sum()
    }

    /// Maps one safetensors file and registers its tensors; with `listed`, checks that the
    /// file holds exactly the tensors the index assigns to it.
    fn add_file(&mut self, path: &Path, listed: Option<(&Path, &[&str])>) -> Result<()> {
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is opened read-only and we never hand out mutable views; a
        // concurrent writer would be a user error, as with every mmap-based loader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::Safetensors {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let data_start = 8 + header_len;
        let file_index = self.files.len();
        let mut names: Vec<String> = Vec::new();
        for (name, info) in metadata.tensors() {
            let (start, end) = info.data_offsets;
            let entry = TensorEntry {
                file: file_index,
                dtype: info.dtype,
                shape: info.shape.clone(),
                range: data_start + start..data_start + end,
            };
            if self.tensors.insert(name.clone(), entry).is_some() {
                return Err(Error::Safetensors {
                    path: path.to_owned(),
                    message: format!("tensor `{name}` also appears in another shard"),
                });
            }
            names.push(name);
        }
        if let Some((index_path, listed)) = listed {
            for want in listed {
                if !names.iter().any(|n| n == want) {
                    return Err(Error::Safetensors {
                        path: path.to_owned(),
                        message: format!(
                            "{} assigns tensor `{want}` to this shard, but the shard does not hold it",
                            index_path.display()
                        ),
                    });
                }
            }
            if let Some(extra) = names.iter().find(|n| !listed.contains(&n.as_str())) {
                return Err(Error::Safetensors {
                    path: path.to_owned(),
                    message: format!(
                        "shard holds tensor `{extra}`, which {} does not assign to it",
                        index_path.display()
                    ),
                });
            }
        }
        self.files.push(Arc::new(MappedFile {
            path: path.to_owned(),
            mmap,
        }));
        Ok(())
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The safetensors files, in the order they were opened.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// Whether the checkpoint holds a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// A handle to the named tensor; an error naming the checkpoint if it is absent.
    pub fn tensor(&self, name: &str) -> Result<TensorRef> {
        let entry = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.dir.clone(),
            name: name.into(),
        })?;
        Ok(TensorRef {
            file: Arc::clone(&self.files[entry.file]),
            name: name.into(),
            dtype: entry.dtype,
            shape: entry.shape.clone(),
            range: entry.range.clone(),
        })
    }

    /// Releases the resident pages of every tensor whose name starts with `prefix`
    /// (see [`TensorRef::release_pages`]).
    pub fn release_prefix(&self, prefix: &str) {
        for name in self.tensors.keys().filter(|n| n.starts_with(prefix)) {
            if let Ok(t) = self.tensor(name) {
                t.release_pages();
            }
        }
    }

    /// Like [`Checkpoint::tensor`], also checking the shape.
    pub fn tensor_with_shape(&self, name: &str, expected: &[usize]) -> Result<TensorRef> {
        let t = self.tensor(name)?;
        t.expect_shape(expected)?;
        Ok(t)
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_owned(),
        source,
    })?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::MissingKey {
            path: path.to_owned(),
            key: "weight_map".into(),
            expected: "an object from tensor name to shard file name",
        })?;
    map.iter()
        .map(|(name, file)| {
            let file = file.as_str().ok_or_else(|| Error::BadValue {
                path: path.to_owned(),
                key: format!("weight_map.{name}"),
                message: format!("expected a file name, found {file}"),
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(Error::BadValue {
                    path: path.to_owned(),
                    key: format!("weight_map.{name}"),
                    message: format!("shard `{file}` must be a plain file name in the same directory"),
                });
            }
            Ok((name.clone(), file.to_owned()))
        })
        .collect()
}

/// A cheap, clonable handle to one tensor inside a mapped file.
#[derive(Clone)]
pub struct TensorRef {
    file: Arc<MappedFile>,
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

impl fmt::Debug for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {:?} {:?} in {}",
            self.name,
            self.dtype,
            self.shape,
            self.file.path.display()
        )
    }
}

impl TensorRef {
    /// The tensor's name in the checkpoint.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file that holds it.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Its element type.
    pub fn dtype(&self) -> Dtype {
        self.dtype
    }

    /// Its shape, outermost dimension first.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The raw little-endian bytes, straight from the mapping.
    pub fn bytes(&self) -> &[u8] {
        &self.file.mmap[self.range.clone()]
    }

    /// Rows `range` of the outermost dimension: a view of the same mapping, no copy.
    pub fn rows(&self, range: Range<usize>) -> Result<TensorRef> {
        let outer = self.shape.first().copied().unwrap_or(1);
        if range.start > range.end || range.end > outer {
            return Err(Error::Invalid(format!(
                "{}: rows {range:?} of tensor `{}` with {outer} rows",
                self.file.path.display(),
                self.name
            )));
        }
        let row_bytes = self.range.len() / outer.max(1);
        let mut shape = self.shape.clone();
        if let Some(first) = shape.first_mut() {
            *first = range.len();
        }
        Ok(TensorRef {
            file: Arc::clone(&self.file),
            name: format!("{}[{}..{}]", self.name, range.start, range.end),
            dtype: self.dtype,
            shape,
            range: self.range.start + range.start * row_bytes..self.range.start + range.end * row_bytes,
        })
    }

    /// Columns `range` of every row of a 2-D tensor stored as `T` (only those are read), each
    /// row followed by `pad` zeros.
    pub fn columns<T: Element>(&self, range: Range<usize>, pad: usize) -> Result<Vec<T>> {
        if self.dtype != T::DTYPE {
            return Err(self.unsupported(T::NAME));
        }
        let [rows, cols] = self.shape[..] else {
            return Err(Error::Invalid(format!("tensor `{}` is not 2-D", self.name)));
        };
        if range.start > range.end || range.end > cols {
            return Err(Error::Invalid(format!(
                "{}: columns {range:?} of tensor `{}` with {cols} columns",
                self.file.path.display(),
                self.name
            )));
        }
        let elem = std::mem::size_of::<T>();
        let bytes = self.bytes();
        let mut out = Vec::with_capacity(rows * (range.len() + pad));
        for r in 0..rows {
            let row = &bytes[(r * cols + range.start) * elem..(r * cols + range.end) * elem];
            out.extend(bytemuck::pod_collect_to_vec::<u8, T>(row));
            out.extend(std::iter::repeat_n(T::default(), pad));
        }
        Ok(out)
    }

    /// [`TensorRef::columns`] of a float tensor, in its stored type; non-finite values are
    /// refused, naming the tensor.
    pub fn float_columns(&self, range: Range<usize>, pad: usize) -> Result<FloatData> {
        let data = match self.dtype {
            Dtype::F32 => FloatData::F32(self.columns(range, pad)?.into()),
            Dtype::F16 => FloatData::F16(self.columns(range, pad)?.into()),
            Dtype::BF16 => FloatData::BF16(self.columns(range, pad)?.into()),
            _ => return Err(self.unsupported("F32, F16 or BF16")),
        };
        match data.first_non_finite() {
            None => Ok(data),
            Some(index) => Err(Error::NonFinite {
                path: self.file.path.clone(),
                name: self.name.clone(),
                index,
            }),
        }
    }

    /// An error unless the shape equals `expected`.
    pub fn expect_shape(&self, expected: &[usize]) -> Result<()> {
        if self.shape != expected {
            return Err(Error::ShapeMismatch {
                path: self.file.path.clone(),
                name: self.name.clone(),
                found: self.shape.clone(),
                expected: expected.to_vec(),
            });
        }
        Ok(())
    }

    fn unsupported(&self, expected: &'static str) -> Error {
        Error::UnsupportedDtype {
            path: self.file.path.clone(),
            name: self.name.clone(),
            found: format!("{:?}", self.dtype),
            expected,
        }
    }

    /// The values as `T`, borrowed from the mapping: an error unless the tensor is stored as
    /// `T` (the element type is checked here, so a [`HostData`] never misreads its bytes).
    /// A misaligned tensor is copied.
    pub fn host<T: Element>(&self) -> Result<HostData<T>> {
        if self.dtype != T::DTYPE {
            return Err(self.unsupported(T::NAME));
        }
        Ok(if bytemuck::try_cast_slice::<u8, T>(self.bytes()).is_ok() {
            HostData(Repr::Mapped(self.clone()))
        } else {
            HostData(Repr::Owned(bytemuck::pod_collect_to_vec(self.bytes())))
        })
    }

    /// The values in their stored float type (f32, f16 or bf16), borrowed from the mapping;
    /// non-finite values are refused, naming the tensor.
    pub fn float_data(&self) -> Result<FloatData> {
        let data = match self.dtype {
            Dtype::F32 => FloatData::F32(self.host()?),
            Dtype::F16 => FloatData::F16(self.host()?),
            Dtype::BF16 => FloatData::BF16(self.host()?),
            _ => return Err(self.unsupported("F32, F16 or BF16")),
        };
        if let Some(index) = data.first_non_finite() {
            return Err(Error::NonFinite {
                path: self.file.path.clone(),
                name: self.name.clone(),
                index,
            });
        }
        Ok(data)
    }

    /// The values as f32: borrowed from the mapping when stored as aligned f32, converted
    /// otherwise. Non-finite values are refused, naming the tensor.
    pub fn to_f32(&self) -> Result<HostData<f32>> {
        Ok(self.float_data()?.into_f32())
    }

    /// The values of an I32 tensor (packed quantized weights), borrowed when aligned.
    pub fn to_i32(&self) -> Result<HostData<i32>> {
        self.host()
    }

    /// Drops the tensor's pages from this process's resident memory; a later read faults
    /// them back in from the file. Lets a model larger than RAM be streamed layer by layer.
    pub fn release_pages(&self) {
        if self.range.is_empty() {
            return;
        }
        // SAFETY: the mapping is a read-only shared mapping of a file. MADV_DONTNEED on it
        // discards no data: the next access re-reads the same bytes from the page cache or
        // the file, so no live reference can observe a change. Failure only means the pages
        // stay resident.
        let _ = unsafe {
            self.file.mmap.unchecked_advise_range(
                UncheckedAdvice::DontNeed,
                self.range.start,
                self.range.len(),
            )
        };
    }
}

/// An element type a tensor can be viewed as.
pub trait Element: Pod + Default + Send + Sync + fmt::Debug {
    /// The safetensors type of its tensors.
    const DTYPE: Dtype;
    /// Its name in error messages.
    const NAME: &'static str;
}

impl Element for f32 {
    const DTYPE: Dtype = Dtype::F32;
    const NAME: &'static str = "F32";
}
impl Element for f16 {
    const DTYPE: Dtype = Dtype::F16;
    const NAME: &'static str = "F16";
}
impl Element for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    const NAME: &'static str = "BF16";
}
impl Element for i32 {
    const DTYPE: Dtype = Dtype::I32;
    const NAME: &'static str = "I32";
}

#[derive(Clone)]
enum Repr<T> {
    /// Zero-copy view of an aligned little-endian tensor whose dtype is `T`'s.
    Mapped(TensorRef),
    /// Converted or computed values.
    Owned(Vec<T>),
}

/// Values of type `T`, either borrowed from a mapped file or owned. A mapped view can only be
/// made by [`TensorRef::host`], which checks the stored type.
#[derive(Clone)]
pub struct HostData<T: Element>(Repr<T>);

impl<T: Element> HostData<T> {
    /// Whether the values are borrowed from a mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Repr::Mapped(_))
    }

    /// The tensor the values are mapped from, if they are.
    pub fn source(&self) -> Option<&TensorRef> {
        match &self.0 {
            Repr::Mapped(t) => Some(t),
            Repr::Owned(_) => None,
        }
    }

    /// The values as an owned vector (copied if mapped).
    pub fn into_vec(self) -> Vec<T> {
        match self.0 {
            Repr::Mapped(t) => bytemuck::pod_collect_to_vec(t.bytes()),
            Repr::Owned(v) => v,
        }
    }
}

impl<T: Element> Deref for HostData<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match &self.0 {
            // Type and alignment were checked when the view was made.
            Repr::Mapped(t) => bytemuck::cast_slice(t.bytes()),
            Repr::Owned(v) => v,
        }
    }
}

impl<T: Element> From<Vec<T>> for HostData<T> {
    fn from(v: Vec<T>) -> Self {
        HostData(Repr::Owned(v))
    }
}

impl<T: Element> fmt::Debug for HostData<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Repr::Mapped(t) => write!(f, "HostData::Mapped({t:?})"),
            Repr::Owned(v) => write!(f, "HostData::Owned({} × {})", v.len(), T::NAME),
        }
    }
}

/// Dense float values in the element type they are stored in.
#[derive(Clone, Debug)]
pub enum FloatData {
    F32(HostData<f32>),
    F16(HostData<f16>),
    BF16(HostData<bf16>),
}

impl FloatData {
    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            FloatData::F32(d) => d.len(),
            FloatData::F16(d) => d.len(),
            FloatData::BF16(d) => d.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored element type.
    pub fn dtype(&self) -> Dtype {
        match self {
            FloatData::F32(_) => Dtype::F32,
            FloatData::F16(_) => Dtype::F16,
            FloatData::BF16(_) => Dtype::BF16,
        }
    }

    /// Bytes of the values in their stored type.
    pub fn byte_size(&self) -> usize {
        self.len() * self.dtype().bitsize() / 8
    }

    /// The values' little-endian bytes, in their stored type.
    pub fn bytes(&self) -> &[u8] {
        match self {
            FloatData::F32(d) => bytemuck::cast_slice(d),
            FloatData::F16(d) => bytemuck::cast_slice(d),
            FloatData::BF16(d) => bytemuck::cast_slice(d),
        }
    }

    /// Values `range` widened to f32 into `out` (which holds `range.len()` values).
    pub fn widen_into(&self, range: Range<usize>, out: &mut [f32]) {
        match self {
            FloatData::F32(d) => out.copy_from_slice(&d[range]),
            FloatData::F16(d) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&d[range], out),
            FloatData::BF16(d) => half::slice::HalfFloatSliceExt::convert_to_f32_slice(&d[range], out),
        }
    }

    /// Values `range` rounded to bf16 (to nearest even) into `out`: a copy when stored as
    /// bf16.
    pub fn narrow_into_bf16(&self, range: Range<usize>, out: &mut [half::bf16]) {
        match self {
            FloatData::F32(d) => half::slice::HalfFloatSliceExt::convert_from_f32_slice(out, &d[range]),
            FloatData::F16(d) => {
                for (o, v) in out.iter_mut().zip(&d[range]) {
                    *o = half::bf16::from_f32(v.to_f32());
                }
            }
            FloatData::BF16(d) => out.copy_from_slice(&d[range]),
        }
    }

    /// All values as f32: the same storage when already f32, converted otherwise.
    pub fn into_f32(self) -> HostData<f32> {
        match self {
            FloatData::F32(d) => d,
            other => {
                let mut out = vec![0f32; other.len()];
                other.widen_into(0..out.len(), &mut out);
                out.into()
            }
        }
    }

    /// Index of the first NaN or infinite value.
    pub fn first_non_finite(&self) -> Option<usize> {
        match self {
            FloatData::F32(d) => d.iter().position(|v| !v.is_finite()),
            FloatData::F16(d) => d.iter().position(|v| !v.is_finite()),
            FloatData::BF16(d) => d.iter().position(|v| !v.is_finite()),
        }
    }

    /// The values of a matrix with `cols` columns followed by `pad` rows of zeros; still
    /// borrowed from the mapping when nothing is added.
    pub fn with_zero_rows(self, cols: usize, pad: usize) -> FloatData {
        fn pad_rows<T: Element>(d: HostData<T>, cols: usize, pad: usize) -> HostData<T> {
            if pad == 0 {
                return d;
            }
            let mut v = d.into_vec();
            v.resize(v.len() + pad * cols, T::default());
            v.into()
        }
        match self {
            FloatData::F32(d) => FloatData::F32(pad_rows(d, cols, pad)),
            FloatData::F16(d) => FloatData::F16(pad_rows(d, cols, pad)),
            FloatData::BF16(d) => FloatData::BF16(pad_rows(d, cols, pad)),
        }
    }
}

impl From<Vec<f32>> for FloatData {
    fn from(v: Vec<f32>) -> Self {
        FloatData::F32(v.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(dir: &Path, name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> PathBuf {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn reads_f32_zero_copy_and_f16_converted() {
        let dir = tempfile::tempdir().unwrap();
        let half: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        write(
            dir.path(),
            SINGLE_FILE,
            &[
                ("a", Dtype::F32, vec![2, 2], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
                ("b", Dtype::F16, vec![2], half),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let a = ck.tensor_with_shape("a", &[2, 2]).unwrap().to_f32().unwrap();
        assert!(a.is_mapped());
        assert_eq!(&*a, &[1.0, 2.0, 3.0, 4.0]);
        let b = ck.tensor("b").unwrap();
        assert_eq!(&*b.to_f32().unwrap(), &[1.5, -2.0]);
        // Kept in its stored type, borrowed from the mapping.
        let FloatData::F16(stored) = b.float_data().unwrap() else {
            panic!("f16 tensor read as another type")
        };
        assert!(stored.is_mapped() || stored.len() == 2);
        assert_eq!(stored[1], f16::from_f32(-2.0));
        let err = ck.tensor_with_shape("a", &[4]).unwrap_err().to_string();
        assert!(
            err.contains("`a`") && err.contains("[2, 2]") && err.contains("[4]"),
            "{err}"
        );
        let err = ck.tensor("c").unwrap_err().to_string();
        assert!(err.contains("`c` is missing"), "{err}");
    }

    #[test]
    fn row_views_and_column_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let values: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let words: Vec<u8> = (0..6i32).flat_map(|v| v.to_le_bytes()).collect();
        write(
            dir.path(),
            SINGLE_FILE,
            &[
                ("m", Dtype::F32, vec![3, 4], f32_bytes(&values)),
                ("q", Dtype::I32, vec![2, 3], words),
            ],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let m = ck.tensor("m").unwrap();
        let rows = m.rows(1..3).unwrap();
        assert_eq!(rows.shape(), &[2, 4]);
        let data = rows.to_f32().unwrap();
        assert!(data.is_mapped());
        assert_eq!(&*data, &values[4..12]);
        assert_eq!(
            m.columns::<f32>(1..3, 1).unwrap(),
            vec![1.0, 2.0, 0.0, 5.0, 6.0, 0.0, 9.0, 10.0, 0.0]
        );
        let FloatData::F32(block) = m.float_columns(1..3, 0).unwrap() else {
            panic!("f32 tensor read as another type")
        };
        assert_eq!(&*block, &[1.0, 2.0, 5.0, 6.0, 9.0, 10.0]);
        assert_eq!(
            ck.tensor("q").unwrap().columns::<i32>(2..3, 0).unwrap(),
            vec![2, 5]
        );
        assert!(m.rows(2..4).is_err() && m.columns::<f32>(3..5, 0).is_err());
    }

    #[test]
    fn a_view_never_misreads_the_stored_type() {
        let dir = tempfile::tempdir().unwrap();
        let half: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0]
            .iter()
            .flat_map(|x| f16::from_f32(*x).to_le_bytes())
            .collect();
        write(dir.path(), SINGLE_FILE, &[("h", Dtype::F16, vec![4], half)]);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let h = ck.tensor("h").unwrap();
        // Its 8 bytes would make two f32 or two i32 values: both views are refused.
        let err = h.host::<f32>().unwrap_err().to_string();
        assert!(
            err.contains("`h`") && err.contains("F16") && err.contains("expected F32"),
            "{err}"
        );
        assert!(h.to_i32().is_err() && h.columns::<f32>(0..1, 0).is_err());
        assert_eq!(
            &*h.host::<f16>().unwrap(),
            &[1.0, 2.0, 3.0, 4.0].map(f16::from_f32)
        );
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            SINGLE_FILE,
            &[("a", Dtype::F32, vec![4], f32_bytes(&[1.0; 4]))],
        );
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("model.safetensors") && err.contains("not a valid safetensors"),
            "{err}"
        );
    }

    #[test]
    fn header_longer_than_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = 1_000_000u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        std::fs::write(dir.path().join(SINGLE_FILE), bytes).unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("invalid header length"), "{err}");
    }

    #[test]
    fn non_finite_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            SINGLE_FILE,
            &[("w", Dtype::F32, vec![3], f32_bytes(&[1.0, f32::NAN, 0.0]))],
        );
        let ck = Checkpoint::open(dir.path()).unwrap();
        let err = ck.tensor("w").unwrap().to_f32().unwrap_err().to_string();
        assert!(err.contains("`w`") && err.contains("element 1"), "{err}");
    }

    #[test]
    fn sharded_checkpoint_must_agree_with_index() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "model-00001-of-00002.safetensors",
            &[("a", Dtype::F32, vec![1], f32_bytes(&[1.0]))],
        );
        write(
            dir.path(),
            "model-00002-of-00002.safetensors",
            &[("b", Dtype::F32, vec![1], f32_bytes(&[2.0]))],
        );
        let index = |b_file: &str| {
            format!(
                r#"{{"metadata":{{}},"weight_map":{{"a":"model-00001-of-00002.safetensors","b":"{b_file}"}}}}"#
            )
        };
        std::fs::write(
            dir.path().join(INDEX_FILE),
            index("model-00002-of-00002.safetensors"),
        )
        .unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(&*ck.tensor("b").unwrap().to_f32().unwrap(), &[2.0]);
        assert_eq!(ck.files().count(), 2);

        std::fs::write(
            dir.path().join(INDEX_FILE),
            index("model-00001-of-00002.safetensors"),
        )
        .unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("assigns tensor `b`"), "{err}");
    }

    #[test]
    fn empty_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = Checkpoint::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no model.safetensors"), "{err}");
    }
}
