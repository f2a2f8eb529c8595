//! The allocator's handling of the large buffers products and layers make.

/// Keeps freed activation buffers inside the process.
///
/// glibc hands large freed blocks back to the kernel; every fresh buffer of the next layer
/// then page-faults its way in, which costs about a fifth of a decoder layer's time at 512
/// tokens. Raising the trim threshold and allocating every block from the heap (no mmap: glibc
/// caps the mmap threshold at 32 MB, below a 7B-wide search's 100+ MB trial buffers) makes
/// such buffers reuse heap memory. Call once at startup; a no-op outside glibc.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning parameters; it is called before any
    // buffer depends on them and accepts any value.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

/// Hands the free pages of the heap back to the kernel.
///
/// [`retain_freed_memory`] keeps freed buffers for reuse, which lets long-lived buffers
/// (a layer's outputs, the next layer's inputs) land ever higher in the heap and the
/// resident set creep up layer after layer. A layer-by-layer streamer calls this between
/// layers, so that its peak stays that of one layer. A no-op outside glibc.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns pages of free chunks to the kernel; live allocations
    // are untouched.
    unsafe {
        libc::malloc_trim(0);
    }
}
