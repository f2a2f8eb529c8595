//! Sharing one output between rayon tasks, and whether a product may use the whole pool.

/// A raw output pointer shared by rayon tasks that write disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SharedOut(pub(crate) *mut f32);
// SAFETY: every user hands each task a region of the output no other task touches.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer; a method so that closures capture the whole (Send) wrapper.
    pub(crate) fn ptr(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    /// Whether this thread runs the body of a whole pass (`tp_runtime::Backend::run`): a
    /// worker of the pool, but not inside a parallel loop, so its products should still use
    /// every thread.
    static POOL_ROOT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as running a whole pass on a worker of rayon's pool until dropped: its
/// products then split over every thread as they would on a thread outside the pool.
pub struct PoolRoot(bool);

impl PoolRoot {
    /// Marks the current thread.
    pub fn enter() -> Self {
        PoolRoot(POOL_ROOT.replace(true))
    }
}

impl Drop for PoolRoot {
    fn drop(&mut self) {
        POOL_ROOT.set(self.0);
    }
}

/// Whether a product on this thread is at the top level: outside the pool, or the body of a
/// [`PoolRoot`]. Inside a parallel loop's task a product stays on its thread. (A task the
/// root thread steals while it waits is taken as the root's: nested, never unsound.)
pub(crate) fn top_level() -> bool {
    rayon::current_thread_index().is_none() || POOL_ROOT.get()
}
