//! # awq-calib
//!
//! Calibration for AWQ: text or JSONL records turned into token blocks ([`dataset`]), and the
//! inputs of every projection group of a decoder layer captured over those blocks, one layer
//! at a time ([`capture`]), kept in the precision the search computes in with their per-channel
//! mean |x| ([`activations`]).

pub mod activations;
pub mod capture;
pub mod dataset;
mod error;

pub use activations::Activations;
pub use capture::{LayerCapture, LayerInputs, LayerStream};
pub use dataset::{CalibFormat, CalibSet, CalibSpec, CalibSummary, Sampling};
pub use error::{CalibError, Result};
