//! Decoding: each rank keeps the keys and values of every position it has seen (its own heads
//! of its own stage's layers) in a [`KvCache`], so that a new token costs one row of work per
//! layer instead of a forward pass over the whole sequence. [`Decoder`] is what generation
//! drives: a whole model or a group of ranks.

use checkpoint::ModelConfig;

use crate::backend::{AttendedSequence, AttentionLayout, Backend};
use crate::{Error, Result};

/// One layer's keys and values: `[sequences × rows, kv_heads·head_dim]` each, sequence `s`
/// from row `s × rows`, where `rows` is the cache's capacity, or for a sliding-window layer
/// at most twice its window ([`stored_positions`]): the positions it can still attend to.
pub struct LayerCache<B: Backend> {
    pub keys: B::Tensor,
    pub values: B::Tensor,
    /// Rows each sequence has.
    rows: usize,
    /// The attention window, on a sliding-window layer.
    window: Option<usize>,
}

/// Rows a layer's store keeps per sequence, for a cache of `capacity` positions: all of them,
/// or on a sliding-window layer at most twice the window — the window's keys and room to add
/// `window + 1` positions before the oldest must go.
pub fn stored_positions(window: Option<usize>, capacity: usize) -> usize {
    match window {
        Some(w) => capacity.min(2 * w.max(1)),
        None => capacity,
    }
}

/// The keys and values of up to `capacity` positions of each of several sequences, for each
/// layer a rank holds. A sliding-window layer keeps only the positions its window can still
/// reach ([`stored_positions`]): older ones are dropped as new ones come.
pub struct KvCache<B: Backend> {
    capacity: usize,
    lengths: Vec<usize>,
    /// Per sequence, the first position the sliding-window stores still hold.
    first: Vec<usize>,
    layers: Vec<LayerCache<B>>,
    kv_width: usize,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache of `sequences` sequences for layers of the given attention windows
    /// (`None`: full attention) whose keys are `kv_width` wide (kv heads on this rank ×
    /// head_dim).
    pub fn new(
        backend: &B,
        windows: &[Option<usize>],
        kv_width: usize,
        sequences: usize,
        capacity: usize,
    ) -> Result<Self> {
        if sequences == 0 || capacity == 0 {
            return Err(Error::Invalid(format!(
                "a KV cache needs at least one sequence and one position (asked {sequences} × {capacity})"
            )));
        }
        let layers = windows
            .iter()
            .map(|&window| {
                let rows = stored_positions(window, capacity);
                Ok(LayerCache {
                    keys: backend.zeros(sequences * rows, kv_width)?,
                    values: backend.zeros(sequences * rows, kv_width)?,
                    rows,
                    window,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            capacity,
            lengths: vec![0; sequences],
            first: vec![0; sequences],
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
        let rows: usize = self.layers.iter().map(|l| l.rows).sum();
        2 * rows * self.lengths.len() * self.kv_width * 4
    }

    /// The most tokens of one sequence a pass may add: where a sliding-window store is
    /// shorter than the capacity, what fits after the window's keys (the caller splits
    /// longer prefills into passes of this many).
    pub fn max_new_per_pass(&self) -> usize {
        self.sliding()
            .map_or(usize::MAX, |(rows, window)| rows + 1 - window.max(1))
    }

    /// The rows and window of the sliding-window stores that hold fewer rows than the
    /// capacity (every sliding layer of a model has the same window).
    fn sliding(&self) -> Option<(usize, usize)> {
        self.layers
            .iter()
            .find_map(|l| l.window.filter(|_| l.rows < self.capacity).map(|w| (l.rows, w)))
    }

    /// Where the keys of `new[s]` tokens appended to each sequence `s` are (sequences given
    /// none sit this pass out); their queries are consecutive rows in sequence order.
    pub fn layout(&self, new: &[usize]) -> Result<AttentionLayout> {
        self.layout_in(new, self.capacity, &vec![0; self.lengths.len()])
    }

    /// [`KvCache::layout`] in the sliding-window stores: positions from `first[s]` on, in rows
    /// of their own. `None` where no store is shorter than the capacity.
    pub fn sliding_layout(&self, new: &[usize]) -> Result<Option<AttentionLayout>> {
        match self.sliding() {
            Some((rows, _)) => Ok(Some(self.layout_in(new, rows, &self.first)?)),
            None => Ok(None),
        }
    }

    fn layout_in(&self, new: &[usize], rows: usize, first: &[usize]) -> Result<AttentionLayout> {
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
            let stored = past - first[s];
            if stored + n > rows {
                return Err(Error::Invalid(format!(
                    "sequence {s}: {n} new tokens after {stored} stored exceed the sliding-window store's {rows} rows"
                )));
            }
            sequences.push(AttendedSequence {
                queries: row..row + n,
                keys: s * rows,
                past: stored,
            });
            row += n;
        }
        Ok(AttentionLayout::new(sequences)?)
    }

    /// Makes room in the sliding-window stores for `new[s]` more positions of each sequence:
    /// where they would not fit, the positions the next query's window no longer reaches are
    /// dropped and the rest moved to the front of the sequence's rows.
    pub fn make_room(&mut self, backend: &B, new: &[usize]) -> Result<()> {
        let Some((rows, window)) = self.sliding() else {
            return Ok(());
        };
        for (s, &n) in new.iter().enumerate() {
            let past = self.lengths[s];
            if n == 0 || past - self.first[s] + n <= rows {
                continue;
            }
            let keep_from = past.saturating_sub(window.max(1) - 1).max(self.first[s]);
            let (from, kept) = (keep_from - self.first[s], past - keep_from);
            if kept > 0 {
                let mut scratch = backend.alloc(kept, self.kv_width)?;
                for layer in self
                    .layers
                    .iter_mut()
                    .filter(|l| l.rows == rows && l.window.is_some())
                {
                    for store in [&mut layer.keys, &mut layer.values] {
                        backend.copy_rows(store, s * rows + from, &mut scratch, 0, kept)?;
                        backend.copy_rows(&scratch, 0, store, s * rows, kept)?;
                    }
                }
            }
            self.first[s] = keep_from;
        }
        Ok(())
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
        let mut cache = KvCache::new(&CpuBackend::new(), &[None, None], 8, 3, 10).unwrap();
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
        assert_eq!(cache.max_new_per_pass(), usize::MAX);
        assert!(cache.sliding_layout(&[1, 1, 1]).unwrap().is_none());
    }

    /// A window of 4 keeps 8 rows a sequence: 5 new positions at most a pass; when the next
    /// ones would not fit, the 3 positions the window still reaches move to the front.
    #[test]
    fn sliding_window_stores_drop_what_the_window_left() {
        let b = CpuBackend::new();
        let mut cache = KvCache::new(&b, &[Some(4), None], 1, 2, 20).unwrap();
        assert_eq!(cache.max_new_per_pass(), 5);
        assert_eq!(cache.byte_size(), 2 * (8 + 20) * 2 * 4);
        // Sequence 1 stores positions 0..7 (the value is the position).
        let values: Vec<f32> = (0..7).map(|p| p as f32).collect();
        let new = [0, 7];
        cache.make_room(&b, &new).unwrap();
        let layout = cache.sliding_layout(&new).unwrap().unwrap();
        assert_eq!((layout.sequences()[0].keys, layout.sequences()[0].past), (8, 0));
        let stored = b.upload(&values, 7, 1).unwrap();
        let layer = &mut cache.layers_mut()[0];
        b.copy_rows(&stored, 0, &mut layer.keys, 8, 7).unwrap();
        cache.advance(&new);
        // Two more do not fit in 8 rows: positions 4..7 (what position 7's window reaches)
        // move to rows 0..3 of the sequence.
        let new = [0, 2];
        cache.make_room(&b, &new).unwrap();
        let s = cache.sliding_layout(&new).unwrap().unwrap().sequences()[0].clone();
        assert_eq!((s.keys, s.past), (8, 3));
        assert_eq!(&cache.layers_mut()[0].keys.data[8..11], &[4.0, 5.0, 6.0]);
        // The full-attention layer's layout is untouched: position 7 of 20.
        assert_eq!(cache.layout(&new).unwrap().sequences()[0].past, 7);
        // More than a pass may add is refused by the layout.
        let err = cache.sliding_layout(&[0, 6]).unwrap_err().to_string();
        assert!(err.contains("sliding-window store's 8 rows"), "{err}");
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
