//! # awq-calib
//!
//! Calibration for AWQ: text or JSONL records turned into token blocks ([`dataset`]), and the
//! inputs of every projection group of a decoder layer captured over those blocks, one layer
//! at a time, with their per-channel mean |x| ([`capture`]).

pub mod capture;
pub mod dataset;
mod error;

pub use capture::{LayerCapture, LayerInputs, LayerStream};
pub use dataset::{CalibFormat, CalibSet, CalibSpec, CalibSummary, Sampling};
pub use error::{CalibError, Result};
