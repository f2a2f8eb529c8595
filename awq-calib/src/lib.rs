//! # awq-calib
//!
//! Calibration data and per-channel activation statistics, layer by layer. Its code arrives
//! with the quantization work; until then the crate is empty.
