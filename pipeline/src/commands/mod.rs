//! One module per `awq` subcommand.

pub mod bench;
pub mod eval;
pub mod import;
