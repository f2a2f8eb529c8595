//! How a tile of a weight lies in its buffer, for the products that fill tiles on the fly.

/// How a tile of `Wt[k0..k1, n0..n1]` lies in its buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TileLayout {
    /// `tile[(k − k0) · (n1 − n0) + (n − n0)]`: rows of `Wt` (how AWQ stores weights).
    KMajor,
    /// `tile[(n − n0) · (k1 − k0) + (k − k0)]`: rows of `W` (how dense weights are stored).
    NMajor,
}
