//! Gives freed heap back to the kernel. glibc keeps what a burst of work freed (the first
//! list of every claim in the cluster, a first walk over a large volume, a wave of work)
//! mapped for reuse, so an idle agent would go on showing its busiest moment as resident
//! memory on every node.

use std::time::Duration;

/// Makes every thread allocate from one heap. glibc gives each busy thread its own arena,
/// and each keeps its own free pages; a watch loop gains nothing from the parallelism.
/// Call before any thread starts.
pub fn one_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator setting; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns free heap pages to the kernel now.
pub fn give_back() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator holds as free; it takes no
    // pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`give_back`] every `every`, forever.
pub async fn give_back_every(every: Duration) {
    let mut ticks = tokio::time::interval(every);
    loop {
        ticks.tick().await;
        give_back();
    }
}
