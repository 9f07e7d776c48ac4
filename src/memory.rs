//! The process's memory, as the operating system sees it: reading the resident set, and handing
//! freed heap memory back.
//!
//! The hot window (see `runtime`) bounds the *live* state of a run to one window of source days.
//! For the peak to follow, what one generation frees must serve the next: glibc keeps what a
//! thread freed in that thread's arena, so a long run of generations (each with new worker
//! threads) would otherwise keep the high-water mark of every arena it ever used. Capping the
//! arenas ([`limit_arenas`]) makes the next generation's threads reuse it, and a batch run also
//! keeps its larger blocks and its heaps' free tops ([`keep_freed_memory`]). Handing it back to
//! the system ([`release_free_memory`]) is done once, when a run's generations are over: after
//! every generation, each page came back as a page fault in the next, for no lower peak.

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

/// Keeps what a batch run frees for its own next allocations, up to 32 MiB each, instead of
/// returning it to the system as glibc does by default (`mallopt(M_MMAP_THRESHOLD)`,
/// `mallopt(M_TRIM_THRESHOLD)`); does nothing with other C libraries. Returns whether the
/// allocator took both settings. For a process whose command ends with its run: the settings
/// stay in force (glibc's adaptive thresholds are off from then on), and what is kept goes back
/// only at [`release_free_memory`] or exit.
///
/// By default glibc gives an allocation above its mmap threshold (128 KiB, rising as such blocks
/// are freed, to 32 MiB at most) pages of its own when the heap's free top cannot serve it, and
/// unmaps them when it is freed; and it trims a heap's top once more than its trim threshold
/// (128 KiB, then twice the mmap threshold) is free. Each hot-window generation then faulted its
/// batchers' vectors, its maps and its rows in page by page again. Measured on a 5M x 30-day
/// load (2 cores, fresh filesystem, three alternated pairs): 7.00-7.21 s -> 6.57-6.69 s, system
/// time 2.0-2.2 -> 1.3-1.6 s, peak RSS 414-433 -> 448-487 MB.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        /// The most glibc accepts on 64-bit platforms (half its 64 MiB heap size); blocks this
        /// large or larger still get mappings of their own.
        const MMAP_THRESHOLD: libc::c_int = 32 << 20;
        /// Free memory at the top of a heap is kept up to this much.
        const TRIM_THRESHOLD: libc::c_int = 1 << 30;
        // SAFETY: mallopt takes two integers and no pointers, and is thread-safe; these two
        // only change when the allocator maps and unmaps memory, never memory handed out.
        #[allow(unsafe_code)]
        let (mmap, trim) = unsafe {
            (
                libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            )
        };
        mmap == 1 && trim == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
