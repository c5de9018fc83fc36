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

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of `/proc`'s CPU times; 100
/// where it cannot be asked.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf takes a constant and reads nothing the caller passes; any thread may call it.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100)
}

#[cfg(not(unix))]
pub fn clock_ticks_per_second() -> u64 {
    100
}

/// The memory page size (`sysconf(_SC_PAGESIZE)`), the unit of `/proc`'s resident size; 4096
/// where it cannot be asked.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn page_size() -> u64 {
    // SAFETY: as above.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(not(unix))]
pub fn page_size() -> u64 {
    4096
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
