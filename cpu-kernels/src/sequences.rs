//! How the rows of one call's activations split into sequences, and where each sequence's
//! queries and keys sit for attention (the same rows in a forward pass, a KV cache when
//! decoding).

use std::ops::Range;

use crate::{Error, Result};

/// How the rows of an activation matrix split into independent sequences.
///
/// Row `r` of sequence `s` sits at position `r - start(s)`; attention never crosses a
/// sequence boundary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqLayout {
    /// Cumulative row offsets: `[0, len0, len0 + len1, ...]`.
    bounds: Vec<usize>,
}

impl SeqLayout {
    /// A batch of sequences of the given lengths, each at least one token long.
    pub fn new(lengths: &[usize]) -> Result<Self> {
        if lengths.is_empty() || lengths.contains(&0) {
            return Err(Error::Shape(format!(
                "a batch needs at least one sequence and no empty ones (lengths {lengths:?})"
            )));
        }
        let mut bounds = vec![0];
        for len in lengths {
            bounds.push(bounds.last().unwrap() + len);
        }
        Ok(SeqLayout { bounds })
    }

    /// One sequence of `len` tokens.
    pub fn single(len: usize) -> Result<Self> {
        Self::new(&[len])
    }

    /// Total rows.
    pub fn rows(&self) -> usize {
        *self.bounds.last().unwrap()
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.bounds.len() - 1
    }

    /// Always false: a layout holds at least one sequence.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Row ranges of the sequences.
    pub fn sequences(&self) -> impl Iterator<Item = Range<usize>> + '_ {
        self.bounds.windows(2).map(|w| w[0]..w[1])
    }

    /// The position of every row within its sequence.
    pub fn positions(&self) -> Vec<u32> {
        self.sequences().flat_map(|r| 0..r.len() as u32).collect()
    }
}

/// Where each sequence's queries and keys sit in one attention call: the queries are rows of
/// `q`, the keys (and values) rows of a key store that may hold earlier positions too (a KV
/// cache) or be the same rows as the queries (a plain forward pass).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttentionLayout {
    sequences: Vec<AttendedSequence>,
}

/// One sequence of an [`AttentionLayout`]: query row `queries.start + i` sits at position
/// `past + i` and sees key-store rows `keys + j` for the positions `j ≤ past + i` inside the
/// sliding window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttendedSequence {
    /// Rows of `q` (and of the output).
    pub queries: Range<usize>,
    /// The key-store row of position 0.
    pub keys: usize,
    /// Positions before the first query, already in the key store.
    pub past: usize,
}

impl AttendedSequence {
    /// Position of the last query.
    pub fn last_position(&self) -> usize {
        self.past + self.queries.len() - 1
    }
}

impl AttentionLayout {
    /// Sequences whose query rows tile `0..rows` in order, none empty.
    pub fn new(sequences: Vec<AttendedSequence>) -> Result<Self> {
        let mut next = 0;
        for s in &sequences {
            if s.queries.start != next || s.queries.is_empty() {
                return Err(Error::Shape(format!(
                    "attention layout: query rows {:?} do not follow row {next} or are empty",
                    s.queries
                )));
            }
            next = s.queries.end;
        }
        if sequences.is_empty() {
            return Err(Error::Shape("attention layout: no sequence".into()));
        }
        Ok(AttentionLayout { sequences })
    }

    /// A plain forward pass: each sequence's keys are its own query rows.
    pub fn within(layout: &SeqLayout) -> Self {
        AttentionLayout {
            sequences: layout
                .sequences()
                .map(|queries| AttendedSequence {
                    keys: queries.start,
                    past: 0,
                    queries,
                })
                .collect(),
        }
    }

    /// The sequences.
    pub fn sequences(&self) -> &[AttendedSequence] {
        &self.sequences
    }

    /// Query rows in all.
    pub fn rows(&self) -> usize {
        self.sequences.last().map_or(0, |s| s.queries.end)
    }

    /// Key-store rows the layout reads: one past the last.
    pub fn key_rows(&self) -> usize {
        self.sequences
            .iter()
            .map(|s| s.keys + s.last_position() + 1)
            .max()
            .unwrap_or(0)
    }

    /// Per query row: the key-store row of its position 0 and its position (what the CUDA
    /// kernel reads).
    pub fn per_row(&self) -> (Vec<u32>, Vec<u32>) {
        let mut keys = Vec::with_capacity(self.rows());
        let mut positions = Vec::with_capacity(self.rows());
        for s in &self.sequences {
            for i in 0..s.queries.len() {
                keys.push(s.keys as u32);
                positions.push((s.past + i) as u32);
            }
        }
        (keys, positions)
    }

    /// The position of every query row, for the rotary table.
    pub fn positions(&self) -> Vec<u32> {
        self.per_row().1
    }
}
