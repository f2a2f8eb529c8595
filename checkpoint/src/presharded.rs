//! Pre-sharded checkpoints (`awq shard`): one `rank{r}.safetensors` per rank holding exactly
//! that rank's share (its tensor-parallel slice of its stage's layers, padded as the runtime
//! pads), and the model's `config.json` with a `mapping` record saying how the ranks split
//! the model. Each rank then reads only its own file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The key of the mapping record in `config.json`.
pub const MAPPING_KEY: &str = "mapping";

/// How a pre-sharded checkpoint's ranks split the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    pub world_size: usize,
    /// Tensor-parallel ranks per stage.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Each stage's decoder layers, `[first, end)`.
    pub stage_layers: Vec<[usize; 2]>,
    /// Zero features added to the intermediate dimension in all.
    pub intermediate_padding: usize,
    /// The rank files, in rank order.
    pub files: Vec<String>,
}

/// The file rank `rank` reads.
pub fn rank_file(rank: usize) -> String {
    format!("rank{rank}.safetensors")
}

impl Mapping {
    /// The mapping of the checkpoint in `dir`, if it is pre-sharded.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        let Some(mapping) = value.get(MAPPING_KEY) else {
            return Ok(None);
        };
        let mapping: Mapping = serde_json::from_value(mapping.clone()).map_err(|e| Error::BadValue {
            path: path.clone(),
            key: MAPPING_KEY.into(),
            message: e.to_string(),
        })?;
        let consistent = mapping.world_size == mapping.tp * mapping.pp
            && mapping.stage_layers.len() == mapping.pp
            && mapping.files.len() == mapping.world_size
            && mapping.files.iter().enumerate().all(|(r, f)| *f == rank_file(r));
        if !consistent {
            return Err(Error::BadValue {
                path,
                key: MAPPING_KEY.into(),
                message: format!(
                    "world_size {} must be tp {} × pp {}, with one stage range per stage and files rank0..rank{}.safetensors",
                    mapping.world_size,
                    mapping.tp,
                    mapping.pp,
                    mapping.world_size.saturating_sub(1)
                ),
            });
        }
        Ok(Some(mapping))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_read_back_and_must_be_consistent() {
        let dir = tempfile::tempdir().unwrap();
        let mapping = Mapping {
            world_size: 2,
            tp: 1,
            pp: 2,
            stage_layers: vec![[0, 2], [2, 3]],
            intermediate_padding: 0,
            files: vec![rank_file(0), rank_file(1)],
        };
        let write = |m: &Mapping| {
            let config = serde_json::json!({"architectures": ["LlamaForCausalLM"], MAPPING_KEY: m});
            std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        };
        write(&mapping);
        assert_eq!(Mapping::read(dir.path()).unwrap(), Some(mapping.clone()));
        write(&Mapping {
            world_size: 3,
            ..mapping
        });
        let err = Mapping::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("`mapping`") && err.contains("world_size 3"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert_eq!(Mapping::read(dir.path()).unwrap(), None);
    }
}
