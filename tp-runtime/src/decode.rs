//! Decoding: each rank keeps the keys and values of every position it has seen (its own heads
//! of its own stage's layers) in a [`KvCache`], so that a new token costs one row of work per
//! layer instead of a forward pass over the whole sequence. [`Decoder`] is what generation
//! drives: a whole model or a group of ranks.

use checkpoint::ModelConfig;

use crate::backend::{AttendedSequence, AttentionLayout, Backend};
use crate::{Error, Result};

/// One layer's keys and values for every position of every sequence of a [`KvCache`]:
/// `[sequences × capacity, kv_heads·head_dim]` each, sequence `s` from row `s × capacity`.
pub struct LayerCache<B: Backend> {
    pub keys: B::Tensor,
    pub values: B::Tensor,
}

/// The keys and values of up to `capacity` positions of each of several sequences, for each
/// layer a rank holds.
pub struct KvCache<B: Backend> {
    capacity: usize,
    lengths: Vec<usize>,
    layers: Vec<LayerCache<B>>,
    kv_width: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache of `sequences` sequences for `layers` layers whose keys are `kv_width`
    /// wide (kv heads on this rank × head_dim).
    pub fn new(
        backend: &B,
        layers: usize,
        kv_width: usize,
        sequences: usize,
        capacity: usize,
    ) -> Result<Self> {
        if sequences == 0 || capacity == 0 {
            return Err(Error::Invalid(format!(
                "a KV cache needs at least one sequence and one position (asked {sequences} × {capacity})"
            )));
        }
        let rows = sequences * capacity;
        let layers = (0..layers)
            .map(|_| {
                Ok(LayerCache {
                    keys: backend.zeros(rows, kv_width)?,
                    values: backend.zeros(rows, kv_width)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            capacity,
            lengths: vec![0; sequences],
            layers,
            kv_width,
        })
    }

    /// Positions each sequence holds.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Positions each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of keys and values (f32).
    pub fn byte_size(&self) -> usize {
        self.layers.len() * 2 * self.lengths.len() * self.capacity * self.kv_width * 4
    }

    /// Where the keys of `new[s]` tokens appended to each sequence `s` are (sequences given
    /// none sit this pass out); their queries are consecutive rows in sequence order.
    pub fn layout(&self, new: &[usize]) -> Result<AttentionLayout> {
        if new.len() != self.lengths.len() {
            return Err(Error::Invalid(format!(
                "tokens for {} sequences; the cache holds {}",
                new.len(),
                self.lengths.len()
            )));
        }
        let mut row = 0;
        let mut sequences = Vec::new();
        for (s, (&n, &past)) in new.iter().zip(&self.lengths).enumerate() {
            if n == 0 {
                continue;
            }
            if past + n > self.capacity {
                return Err(Error::Invalid(format!(
                    "sequence {s}: {past} cached + {n} new tokens exceed the cache's {} positions",
                    self.capacity
                )));
            }
            sequences.push(AttendedSequence {
                queries: row..row + n,
                keys: s * self.capacity,
                past,
            });
            row += n;
        }
        Ok(AttentionLayout::new(sequences)?)
    }

    /// Records `new[s]` more positions in each sequence (after every layer stored them).
    pub fn advance(&mut self, new: &[usize]) {
        for (length, n) in self.lengths.iter_mut().zip(new) {
            *length += n;
        }
    }

    /// The layers' keys and values, in layer order.
    pub fn layers_mut(&mut self) -> &mut [LayerCache<B>] {
        &mut self.layers
    }
}

/// A model that decodes: the whole model on one backend, or a group of ranks.
pub trait Decoder {
    /// The configuration of the whole model.
    fn config(&self) -> &ModelConfig;
    /// Starts `sequences` empty sequences of at most `capacity` positions, dropping any
    /// earlier ones.
    fn start(&self, sequences: usize, capacity: usize) -> Result<()>;
    /// Appends `tokens[s]` to sequence `s` (prefill when many, one decode step when one; an
    /// empty list sits the pass out) and returns, for each sequence given tokens, the logits
    /// after its last one.
    fn extend(&self, tokens: &[Vec<u32>]) -> Result<Vec<Option<Vec<f32>>>>;
}

/// The rows of the last new token of each sequence given tokens, and where each sequence's
/// logits go in the answer of [`Decoder::extend`].
pub(crate) fn last_rows(new: &[usize]) -> (Vec<usize>, Vec<Option<usize>>) {
    let mut rows = Vec::new();
    let mut slots = Vec::with_capacity(new.len());
    let mut end = 0;
    for &n in new {
        if n == 0 {
            slots.push(None);
        } else {
            end += n;
            slots.push(Some(rows.len()));
            rows.push(end - 1);
        }
    }
    (rows, slots)
}

/// Arranges the logits of the rows of [`last_rows`] per sequence.
pub(crate) fn per_sequence(logits: Vec<Vec<f32>>, slots: &[Option<usize>]) -> Vec<Option<Vec<f32>>> {
    let mut logits: Vec<Option<Vec<f32>>> = logits.into_iter().map(Some).collect();
    slots
        .iter()
        .map(|slot| slot.and_then(|i| logits[i].take()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CpuBackend;

    #[test]
    fn layout_places_each_sequence_in_its_slot() {
        let mut cache = KvCache::new(&CpuBackend::new(), 2, 8, 3, 10).unwrap();
        cache.advance(&[4, 0, 9]);
        let layout = cache.layout(&[1, 3, 0]).unwrap();
        let s = layout.sequences();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].queries.clone(), s[0].keys, s[0].past), (0..1, 0, 4));
        assert_eq!((s[1].queries.clone(), s[1].keys, s[1].past), (1..4, 10, 0));
        assert_eq!(layout.positions(), vec![4, 0, 1, 2]);
        // Sequence 2 has room for one more position only.
        let err = cache.layout(&[0, 0, 2]).unwrap_err().to_string();
        assert!(
            err.contains("sequence 2") && err.contains("10 positions"),
            "{err}"
        );
        assert!(cache.layout(&[1, 1]).is_err());
        assert!(cache.layout(&[0, 0, 0]).is_err());
        assert_eq!(cache.byte_size(), 2 * 2 * 3 * 10 * 8 * 4);
    }

    #[test]
    fn last_rows_skip_sequences_without_tokens() {
        let (rows, slots) = last_rows(&[3, 0, 1, 2]);
        assert_eq!(rows, vec![2, 3, 5]);
        assert_eq!(slots, vec![Some(0), None, Some(1), Some(2)]);
        let logits = per_sequence(vec![vec![0.0], vec![1.0], vec![2.0]], &slots);
        assert_eq!(
            logits,
            vec![Some(vec![0.0]), None, Some(vec![1.0]), Some(vec![2.0])]
        );
    }
}
