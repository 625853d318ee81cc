//! Allocator settings for a process that streams objects.
//!
//! A transfer allocates and frees buffers of about a MiB without pause: parts
//! read by the store, HTTP read buffers, tar chunks. glibc serves blocks that
//! large with `mmap` and by default hands a freed heap top back to the kernel,
//! so a 1 GB transfer faults in and zeroes about a GB of fresh pages (in a VM
//! whose balloon reclaims freed memory, each fault also goes to the host).
//! Fixing the two thresholds keeps such buffers in the heap for the next
//! transfer; a free heap top above [`TRIM_THRESHOLD`] is still returned.
//! Measured on a 1 GB archive streamed from the embedded store: 1.0-1.25 s
//! before, 0.87-0.96 s after.
//!
//! Kept buffers must be found again by whichever thread allocates next. glibc
//! gives threads arenas of their own (up to 8 per core), and a buffer freed
//! goes back to the arena it came from, so each arena would keep its own
//! set: a streamed push of 1 GB of large files peaked at about 100 MiB
//! resident. One arena ([`ARENAS`]) holds a single set (with the download
//! sizes of [`crate::objstore::TransferConfig`]: 41 MiB for large files, 51
//! MiB for a mix with 20,000 small files). Small allocations are still
//! served from each thread's cache without taking the arena's lock.

/// Allocations at least this large get their own mapping.
pub const MMAP_THRESHOLD: usize = 32 << 20;
/// Free memory at the heap top beyond this is returned to the kernel.
pub const TRIM_THRESHOLD: usize = 128 << 20;
/// Allocator arenas at most.
pub const ARENAS: usize = 1;

/// Applies these settings to this process. Call once at start, before
/// threads are spawned. Without glibc it does nothing.
pub fn keep_transfer_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: `mallopt` only changes allocator parameters; the values
        // fit an int.
        let ok = unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENAS as libc::c_int) == 1
        };
        if !ok {
            tracing::debug!("allocator settings not applied");
        }
    }
}
