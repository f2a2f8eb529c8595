//! f32 matrices in host memory: the CPU backend's activations, and what other backends'
//! activations are copied into when the host needs them (calibration captures, tests).

use crate::{Error, Result};

/// An f32 `[rows, cols]` matrix, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl HostTensor {
    /// Wraps `data` as `[rows, cols]`.
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::Shape(format!(
                "{} values do not make a [{rows}, {cols}] tensor",
                data.len()
            )));
        }
        Ok(HostTensor { data, rows, cols })
    }

    /// `[rows, cols]` of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        HostTensor {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }

    /// Row `r`.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// Rows `range` of the matrix.
    pub fn rows_slice(&self, range: std::ops::Range<usize>) -> &[f32] {
        &self.data[range.start * self.cols..range.end * self.cols]
    }

    /// Mutable rows `range` of the matrix.
    pub fn rows_slice_mut(&mut self, range: std::ops::Range<usize>) -> &mut [f32] {
        &mut self.data[range.start * self.cols..range.end * self.cols]
    }
}
