//! Checkpoints written tensor by tensor as they are produced, so that no model ever has to
//! sit in memory whole. The header of each file (names, dtypes, shapes, offsets) is known
//! before the first tensor is computed, so it is written first; the data follow in the
//! declared order. [`SafetensorsStream`] is one file; [`CheckpointStream`] splits a
//! checkpoint into Hugging Face shards (`model-00001-of-00003.safetensors` and
//! `model.safetensors.index.json`) at a maximum file size, as `save_pretrained` does.
//! Offsets and sizes are `u64` throughout: tensors and files over 4 GiB are ordinary.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value, json};

use crate::mapped::{INDEX_FILE, SINGLE_FILE};
use crate::names::TensorInfo;
use crate::{Error, Result};

/// One tensor of the file, in write order.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// A spec.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: &[usize]) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    /// The spec of a tensor the schema describes; `dense` is the element type of tensors
    /// whose type the schema leaves to the writer.
    pub fn from_info(info: TensorInfo, dense: Dtype) -> Self {
        TensorSpec {
            name: info.name,
            dtype: info.dtype.unwrap_or(dense),
            shape: info.shape,
        }
    }

    /// Size of the data in bytes.
    pub fn bytes(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product::<u64>() * self.dtype.bitsize() as u64 / 8
    }
}

/// A safetensors file being written in a fixed tensor order.
pub struct SafetensorsStream {
    path: PathBuf,
    file: BufWriter<File>,
    specs: Vec<TensorSpec>,
    next: usize,
}

impl SafetensorsStream {
    /// Creates `path` and writes the header for `specs` (data in that order).
    pub fn create(path: &Path, specs: Vec<TensorSpec>, metadata: BTreeMap<String, String>) -> Result<Self> {
        let mut header = Map::new();
        if !metadata.is_empty() {
            header.insert("__metadata__".into(), json!(metadata));
        }
        let mut offset = 0u64;
        for spec in &specs {
            let end = offset + spec.bytes();
            let info = json!({"dtype": spec.dtype, "shape": spec.shape, "data_offsets": [offset, end]});
            if header.insert(spec.name.clone(), info).is_some() {
                return Err(Error::Invalid(format!("tensor `{}` declared twice", spec.name)));
            }
            offset = end;
        }
        let mut text = serde_json::to_string(&Value::Object(header)).expect("JSON values serialize");
        // The data start on an 8-byte boundary, as every safetensors writer does.
        while !text.len().is_multiple_of(8) {
            text.push(' ');
        }
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&(text.len() as u64).to_le_bytes())
            .and_then(|()| file.write_all(text.as_bytes()))
            .map_err(|e| Error::io(path, e))?;
        Ok(SafetensorsStream {
            path: path.to_owned(),
            file,
            specs,
            next: 0,
        })
    }

    /// The next declared tensor, checked to be `name` of `len` bytes.
    fn next_spec(&self, name: &str, len: u64) -> Result<&TensorSpec> {
        let spec = self.specs.get(self.next).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor `{name}` written after the last declared one",
                self.path.display()
            ))
        })?;
        if spec.name != name || spec.bytes() != len {
            return Err(Error::Invalid(format!(
                "{}: expected tensor `{}` ({} bytes) next, got `{name}` ({len} bytes)",
                self.path.display(),
                spec.name,
                spec.bytes(),
            )));
        }
        Ok(spec)
    }

    /// Writes the next tensor's data; `name` must be the next declared one.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.next_spec(name, bytes.len() as u64)?;
        self.file.write_all(bytes).map_err(|e| Error::io(&self.path, e))?;
        self.next += 1;
        Ok(())
    }

    /// Writes the next tensor's data from `reader`, which must yield exactly its bytes: a
    /// tensor that need not be in memory whole. Runs of zeros are skipped over rather than
    /// written, so that they take no disk space where the file system allows holes.
    pub fn write_from(&mut self, name: &str, reader: &mut impl Read) -> Result<()> {
        let len = self.specs.get(self.next).map_or(0, TensorSpec::bytes);
        self.next_spec(name, len)?;
        let io = |e| Error::io(&self.path, e);
        let mut block = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let want = left.min(block.len() as u64) as usize;
            reader.read_exact(&mut block[..want]).map_err(io)?;
            if block[..want].iter().all(|&b| b == 0) {
                self.file.seek(SeekFrom::Current(want as i64)).map_err(io)?;
            } else {
                self.file.write_all(&block[..want]).map_err(io)?;
            }
            left -= want as u64;
        }
        let mut extra = [0u8; 1];
        if reader.read(&mut extra).map_err(io)? != 0 {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}`: the reader holds more than its {len} bytes",
                self.path.display()
            )));
        }
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written and flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        if let Some(missing) = self.specs.get(self.next) {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` was declared but never written",
                self.path.display(),
                missing.name
            )));
        }
        let mut file = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        // Zeros skipped at the very end are a hole the file must still cover.
        let end = file.stream_position().map_err(|e| Error::io(&self.path, e))?;
        file.set_len(end).map_err(|e| Error::io(&self.path, e))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
}

/// The default largest shard of a checkpoint (as `save_pretrained`'s default, 5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// A checkpoint folder's weights being written in a fixed tensor order: one
/// `model.safetensors` when they fit in one shard, else Hugging Face shards and their index.
/// A shard's file is created when its first tensor arrives and completed with its last, so
/// shards finish as the layers do.
pub struct CheckpointStream {
    dir: PathBuf,
    /// Each file's name and tensors, in order.
    files: Vec<(String, Vec<TensorSpec>)>,
    metadata: BTreeMap<String, String>,
    current: Option<SafetensorsStream>,
    /// Index of the next file to open, and of the next tensor within the current one.
    next_file: usize,
    written_in_file: usize,
}

impl CheckpointStream {
    /// Plans the files for `specs` (data in that order) under `dir`: a new shard starts where
    /// the next tensor would take the current one over `max_shard_bytes` (a tensor larger
    /// than that has a shard of its own).
    pub fn create(
        dir: &Path,
        specs: Vec<TensorSpec>,
        max_shard_bytes: u64,
        metadata: BTreeMap<String, String>,
    ) -> Result<Self> {
        if max_shard_bytes == 0 {
            return Err(Error::Invalid(
                "the maximum shard size must be above 0 bytes".into(),
            ));
        }
        let mut shards: Vec<Vec<TensorSpec>> = Vec::new();
        let mut size = 0u64;
        for spec in specs {
            let bytes = spec.bytes();
            match shards.last_mut() {
                Some(shard) if size + bytes <= max_shard_bytes => {
                    size += bytes;
                    shard.push(spec);
                }
                _ => {
                    size = bytes;
                    shards.push(vec![spec]);
                }
            }
        }
        let count = shards.len();
        let files = shards
            .into_iter()
            .enumerate()
            .map(|(i, specs)| {
                let name = match count {
                    1 => SINGLE_FILE.to_string(),
                    _ => shard_file_name(i, count),
                };
                (name, specs)
            })
            .collect();
        Ok(CheckpointStream {
            dir: dir.to_owned(),
            files,
            metadata,
            current: None,
            next_file: 0,
            written_in_file: 0,
        })
    }

    /// The files this checkpoint is written as, in order, with their tensors.
    pub fn files(&self) -> impl Iterator<Item = (&str, &[TensorSpec])> {
        self.files.iter().map(|(n, s)| (n.as_str(), s.as_slice()))
    }

    /// The file the next tensor goes to, opened if it is the first of its file.
    fn current(&mut self, name: &str) -> Result<&mut SafetensorsStream> {
        if self.current.is_none() {
            let (file, specs) = self.files.get(self.next_file).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: tensor `{name}` written after the last declared one",
                    self.dir.display()
                ))
            })?;
            let path = self.dir.join(file);
            self.current = Some(SafetensorsStream::create(
                &path,
                specs.clone(),
                self.metadata.clone(),
            )?);
            self.next_file += 1;
            self.written_in_file = 0;
        }
        Ok(self.current.as_mut().expect("opened above"))
    }

    /// Counts a tensor written, completing its file after the file's last one.
    fn written(&mut self) -> Result<()> {
        self.written_in_file += 1;
        if self.written_in_file == self.files[self.next_file - 1].1.len() {
            self.current.take().expect("open").finish()?;
        }
        Ok(())
    }

    /// Writes the next tensor's data; `name` must be the next declared one.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.current(name)?.write(name, bytes)?;
        self.written()
    }

    /// Writes the next tensor's data from a reader ([`SafetensorsStream::write_from`]).
    pub fn write_from(&mut self, name: &str, reader: &mut impl Read) -> Result<()> {
        self.current(name)?.write_from(name, reader)?;
        self.written()
    }

    /// Checks that every declared tensor was written and writes the index (sharded only).
    pub fn finish(self) -> Result<()> {
        if self.current.is_some() || self.next_file < self.files.len() {
            let missing = match &self.current {
                Some(_) => &self.files[self.next_file - 1].1[self.written_in_file],
                None => &self.files[self.next_file].1[0],
            };
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` was declared but never written",
                self.dir.display(),
                missing.name
            )));
        }
        if self.files.len() > 1 {
            let total: u64 = self
                .files
                .iter()
                .flat_map(|(_, s)| s)
                .map(TensorSpec::bytes)
                .sum();
            let weight_map: serde_json::Map<String, Value> = self
                .files
                .iter()
                .flat_map(|(file, specs)| specs.iter().map(move |s| (s.name.clone(), json!(file))))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect();
            let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            let path = self.dir.join(INDEX_FILE);
            let text = serde_json::to_string_pretty(&index).expect("JSON values serialize");
            crate::atomic::write_file(&path, text.as_bytes())?;
        }
        Ok(())
    }
}

/// The name of shard `index` (0-based) of `count`: `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{count:05}.safetensors", index + 1)
}

/// Little-endian bytes of f16 values.
pub fn f16_bytes(values: &[half::f16]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// f32 values rounded to f16, as little-endian bytes.
pub fn f32_as_f16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
        .collect()
}

/// Little-endian bytes of i32 values.
pub fn i32_bytes(values: &[i32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A tensor's bytes made block by block (by `next`, `None` at the end) and read as one
/// stream: what [`CheckpointStream::write_from`] takes for a tensor that is converted a block
/// of rows at a time rather than held whole.
pub struct Blocks<F> {
    next: F,
    current: std::io::Cursor<Vec<u8>>,
}

impl<F: FnMut() -> std::io::Result<Option<Vec<u8>>>> Blocks<F> {
    /// The stream of the blocks `next` makes.
    pub fn new(next: F) -> Self {
        Blocks {
            next,
            current: std::io::Cursor::new(Vec::new()),
        }
    }
}

impl<F: FnMut() -> std::io::Result<Option<Vec<u8>>>> Read for Blocks<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.current.read(buf)?;
            if n > 0 || buf.is_empty() {
                return Ok(n);
            }
            match (self.next)()? {
                Some(block) => self.current = std::io::Cursor::new(block),
                None => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Checkpoint;

    #[test]
    fn stream_is_a_valid_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let specs = vec![
            TensorSpec::new("b", Dtype::F16, &[3]),
            TensorSpec::new("a", Dtype::I32, &[2, 2]),
        ];
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let mut s = SafetensorsStream::create(&path, specs, meta).unwrap();
        assert!(s.write("a", &i32_bytes(&[1, 2, 3, 4])).is_err(), "out of order");
        s.write("b", &f32_as_f16_bytes(&[1.0, 2.0, 3.0])).unwrap();
        s.write("a", &i32_bytes(&[1, 2, 3, -4])).unwrap();
        s.finish().unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(&*ck.tensor("a").unwrap().to_i32().unwrap(), &[1, 2, 3, -4]);
        assert_eq!(&*ck.tensor("b").unwrap().to_f32().unwrap(), &[1.0, 2.0, 3.0]);
    }

    #[test]
    fn unfinished_stream_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        let s = SafetensorsStream::create(
            &path,
            vec![TensorSpec::new("a", Dtype::F16, &[1])],
            BTreeMap::new(),
        )
        .unwrap();
        assert!(s.finish().unwrap_err().to_string().contains("never written"));
    }

    #[test]
    fn checkpoints_shard_at_the_limit_and_index_every_tensor() {
        let dir = tempfile::tempdir().unwrap();
        // 40 + 40 bytes fit a 100-byte shard, the next 40 do not; 200 bytes is a shard alone.
        let specs = vec![
            TensorSpec::new("a", Dtype::F32, &[10]),
            TensorSpec::new("b", Dtype::F32, &[10]),
            TensorSpec::new("c", Dtype::F32, &[10]),
            TensorSpec::new("big", Dtype::F32, &[50]),
            TensorSpec::new("d", Dtype::I32, &[1]),
        ];
        let mut s = CheckpointStream::create(dir.path(), specs, 100, BTreeMap::new()).unwrap();
        let files: Vec<(String, usize)> = s.files().map(|(f, t)| (f.to_string(), t.len())).collect();
        assert_eq!(
            files,
            [
                ("model-00001-of-00004.safetensors".to_string(), 2),
                ("model-00002-of-00004.safetensors".to_string(), 1),
                ("model-00003-of-00004.safetensors".to_string(), 1),
                ("model-00004-of-00004.safetensors".to_string(), 1),
            ]
        );
        for (name, n) in [("a", 10), ("b", 10), ("c", 10), ("big", 50)] {
            let values: Vec<f32> = (0..n).map(|i| i as f32).collect();
            s.write(name, bytemuck::cast_slice(&values)).unwrap();
        }
        assert!(!dir.path().join(INDEX_FILE).exists(), "the index comes last");
        s.write_from("d", &mut &i32_bytes(&[-3])[..]).unwrap();
        s.finish().unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        assert_eq!(ck.files().count(), 4);
        assert_eq!(
            &*ck.tensor("big").unwrap().to_f32().unwrap(),
            &(0..50).map(|i| i as f32).collect::<Vec<_>>()[..]
        );
        assert_eq!(&*ck.tensor("d").unwrap().to_i32().unwrap(), &[-3]);
        let index: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 324);
        assert_eq!(index["weight_map"]["c"], "model-00002-of-00004.safetensors");
    }

    #[test]
    fn a_missing_tensor_or_a_short_reader_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![
            TensorSpec::new("a", Dtype::F32, &[2]),
            TensorSpec::new("b", Dtype::F32, &[2]),
        ];
        let mut s = CheckpointStream::create(dir.path(), specs, 8, BTreeMap::new()).unwrap();
        assert!(
            s.write_from("a", &mut &[0u8; 4][..]).is_err(),
            "4 bytes for an 8-byte tensor"
        );
        let mut s = CheckpointStream::create(
            dir.path(),
            vec![TensorSpec::new("a", Dtype::F32, &[2])],
            8,
            BTreeMap::new(),
        )
        .unwrap();
        assert!(
            s.write_from("a", &mut &[0u8; 12][..])
                .unwrap_err()
                .to_string()
                .contains("more than its 8 bytes")
        );
        let specs = vec![
            TensorSpec::new("a", Dtype::F32, &[2]),
            TensorSpec::new("b", Dtype::F32, &[2]),
        ];
        let mut s = CheckpointStream::create(dir.path(), specs, 8, BTreeMap::new()).unwrap();
        s.write("a", &[0u8; 8]).unwrap();
        assert!(
            s.finish()
                .unwrap_err()
                .to_string()
                .contains("`b` was declared but never written")
        );
    }

    /// A tensor over 4 GiB, and a tensor after it whose offsets are past 4 GiB, round-trip
    /// through the writer and the memory-mapped reader. The big tensor is zeros but for its
    /// last bytes, streamed from a reader: the file is sparse (4 GiB of holes), so this needs
    /// neither 4 GiB of memory nor of disk.
    #[test]
    fn tensors_and_offsets_past_4_gib_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let big = (4u64 << 30) + 8;
        let specs = vec![
            TensorSpec::new("big", Dtype::U8, &[big as usize]),
            TensorSpec::new("after", Dtype::F32, &[2]),
        ];
        let mut s = CheckpointStream::create(dir.path(), specs, u64::MAX, BTreeMap::new()).unwrap();
        let tail = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let mut reader = std::io::repeat(0).take(big - 8).chain(&tail[..]);
        s.write_from("big", &mut reader).unwrap();
        s.write("after", bytemuck::cast_slice(&[1.5f32, -2.0])).unwrap();
        s.finish().unwrap();
        let path = dir.path().join(SINGLE_FILE);
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len > big + 8);
        let ck = Checkpoint::open(dir.path()).unwrap();
        let t = ck.tensor("big").unwrap();
        assert_eq!(t.bytes().len() as u64, big);
        assert_eq!(&t.bytes()[t.bytes().len() - 8..], &tail);
        assert_eq!(t.bytes()[(3u64 << 30) as usize], 0);
        assert_eq!(&*ck.tensor("after").unwrap().to_f32().unwrap(), &[1.5, -2.0]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            eprintln!(
                "file of {len} bytes occupies {} bytes on disk",
                std::fs::metadata(&path).unwrap().blocks() * 512
            );
        }
    }

    #[test]
    fn blocks_read_as_one_stream() {
        let mut left = vec![vec![1u8, 2], vec![], vec![3, 4, 5]].into_iter();
        let mut reader = Blocks::new(|| Ok(left.next()));
        let mut all = Vec::new();
        reader.read_to_end(&mut all).unwrap();
        assert_eq!(all, [1, 2, 3, 4, 5]);
    }
}
