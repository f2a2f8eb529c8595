//! Ending a group of ranks when one of them fails: the first failure is recorded with its
//! rank, and every rank waiting in a collective or for a neighbour's activations sees it
//! within [`Abort::POLL`] and stops with an error that names that rank.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::{Error, Result};

/// A group's failure flag and the first failure's rank and cause.
#[derive(Debug, Default)]
pub struct Abort {
    raised: AtomicBool,
    cause: Mutex<Option<(usize, String)>>,
}

impl Abort {
    /// How often a waiting rank looks at the flag.
    pub const POLL: Duration = Duration::from_millis(50);

    /// A flag nobody has raised.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `rank` failed with `cause`; later failures (those it caused) keep the
    /// first one.
    pub fn raise(&self, rank: usize, cause: String) {
        let mut slot = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some((rank, cause));
        }
        self.raised.store(true, Ordering::SeqCst);
    }

    /// Whether some rank failed.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::SeqCst)
    }

    /// The first failure: its rank and cause.
    pub fn cause(&self) -> Option<(usize, String)> {
        self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// An error unless the flag is down; `rank` is the rank that notices.
    pub fn check(&self, rank: usize) -> Result<()> {
        match self.is_raised() {
            false => Ok(()),
            true => Err(self.error(rank)),
        }
    }

    /// The error a rank stops with because another failed.
    pub fn error(&self, rank: usize) -> Error {
        let (failed, cause) = self.cause().unwrap_or((usize::MAX, "unknown".into()));
        Error::Aborted { rank, failed, cause }
    }
}
