//! A safetensors file written tensor by tensor as the layers are produced, so that the
//! quantized model never has to sit in memory whole. The header (names, dtypes, shapes,
//! offsets) is known before the first layer is quantized, so it is written first; the data
//! follow in the declared order.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use serde_json::{Map, Value, json};

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
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
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
        let mut offset = 0usize;
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

    /// Writes the next tensor's data; `name` must be the next declared one.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let spec = self.specs.get(self.next).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor `{name}` written after the last declared one",
                self.path.display()
            ))
        })?;
        if spec.name != name || spec.bytes() != bytes.len() {
            return Err(Error::Invalid(format!(
                "{}: expected tensor `{}` ({} bytes) next, got `{name}` ({} bytes)",
                self.path.display(),
                spec.name,
                spec.bytes(),
                bytes.len()
            )));
        }
        self.file.write_all(bytes).map_err(|e| Error::io(&self.path, e))?;
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
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.path, e))
    }
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
}
