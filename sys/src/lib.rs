//! The calls into the C library that need `unsafe`, each behind a safe function, so that every
//! other crate keeps `#![forbid(unsafe_code)]`. A crate of its own for that reason only: `forbid`
//! cannot be lifted for one function, and a well-known crate wrapping these calls does not exist.

#![deny(unsafe_code)]

/// Asks glibc's allocator to hand the free pages of every arena back to the kernel
/// (`malloc_trim(0)`). glibc gives freed memory back by itself only from the top of the main
/// heap, so after a burst of large buffers freed in the worker threads' arenas the pages stay
/// resident (issue 17: 105 MiB kept after 150 stalled publishes had closed). Returns whether
/// anything was given back.
///
/// It takes each arena's lock in turn while it walks the arena: call it off the request path
/// (a blocking thread), after a burst, not per request.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn trim_allocator() -> bool {
    // SAFETY: malloc_trim takes no pointer and has no precondition; glibc serializes it with
    // every other allocator call through the arena locks, so any thread may call it any time.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Elsewhere (musl, macOS) there is no such call, and those allocators give memory back
/// themselves: nothing to do.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim_allocator() -> bool {
    false
}

#[cfg(test)]
mod tests {
    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn trimming_after_freeing_a_burst_gives_pages_back() {
        // many medium buffers from another thread's arena, freed: glibc keeps them resident
        let burst = std::thread::spawn(|| {
            let buffers: Vec<Vec<u8>> = (0..512).map(|i| vec![i as u8; 64 * 1024]).collect();
            buffers.iter().map(|b| b.len()).sum::<usize>()
        });
        assert_eq!(burst.join().unwrap(), 512 * 64 * 1024);
        assert!(super::trim_allocator(), "32 MiB freed in an arena is handed back");
    }
}
