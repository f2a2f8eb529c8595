//! # awq-pack
//!
//! Scale search, clip search, int4 group quantization, packing and checkpoint writing. Its code arrives
//! with the quantization work; until then the crate is empty.
