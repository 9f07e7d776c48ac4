//! The process's memory, as the operating system sees it: reading the resident set, and handing
//! freed heap memory back.
//!
//! The hot window (see `runtime`) bounds the *live* state of a run to one window of source days.
//! For the peak to follow, what one generation frees must serve the next: glibc keeps what a
//! thread freed in that thread's arena, so a long run of generations (each with new worker
//! threads) would otherwise keep the high-water mark of every arena it ever used. Capping the
//! arenas ([`limit_arenas`]) makes the next generation's threads reuse it. Handing it back to the
//! system ([`release_free_memory`]) is done once, when a run's generations are over: after every
//! generation, each page came back as a page fault in the next, for no lower peak.

/// The process's resident set and its peak so far (`VmRSS`, `VmHWM` of `/proc/self/status`),
/// bytes; zeros where that cannot be read.
pub fn process_memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Returns the allocator's free memory to the system (glibc's `malloc_trim(0)`, which releases
/// the free pages of every arena); does nothing with other C libraries.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers, has no preconditions and is thread-safe (it locks
    // each arena); it only returns free pages to the kernel.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps how many arenas glibc's allocator may create from now on (`mallopt(M_ARENA_MAX, n)`);
/// does nothing with other C libraries. A run of many generations calls this before its first:
/// with one arena per thread ever seen, memory freed in one arena cannot serve the next
/// generation's threads in another, and the peak creeps up even though the live state does not.
pub fn limit_arenas(n: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt takes two integers and no pointers; M_ARENA_MAX only bounds future arena
    // creation (threads beyond it share existing arenas, each behind its own lock).
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(
            libc::M_ARENA_MAX,
            libc::c_int::try_from(n.max(1)).unwrap_or(libc::c_int::MAX),
        );
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = n;
}
