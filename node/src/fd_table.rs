//! The kernel grows a process's file-descriptor table by doubling, and each growth waits for an RCU grace
//! period (`accept4` → `alloc_fd` → `expand_files` → `synchronize_rcu`). Sampled here under a connection storm:
//! the accepting tokio worker blocked in the kernel 5–40 ms at a time, repeatedly, while 9,000 clients
//! connected — and so would every client of a node taking a reconnect storm after a deploy. Growing the table
//! once at start-up, to the size the node is configured for, takes those waits out of the accept path (the
//! kernel never shrinks it again).

use std::os::fd::RawFd;

use rustix::process::{Resource, getrlimit};

/// Make descriptor numbers up to `want` (capped below the soft `RLIMIT_NOFILE`) available without a later
/// table expansion. Returns the highest descriptor number covered, or `None` when nothing was done (a limit
/// too low to matter, or the kernel refused).
pub fn presize(want: usize) -> Option<usize> {
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    let top = (want as u64).min(soft.saturating_sub(1));
    if top < 256 {
        return None;
    }
    let top = RawFd::try_from(top).ok()?;
    // A duplicate at (or above) `top` makes the kernel size the table for it; closing it keeps the size.
    let probe = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), top).ok()?;
    drop(probe);
    usize::try_from(top).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `FDSize` in /proc/self/status: slots in this process's descriptor table.
    fn fd_table_size() -> usize {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status.lines().find_map(|l| l.strip_prefix("FDSize:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    }

    #[test]
    fn presize_grows_the_descriptor_table_once_up_front() {
        let want = 6000;
        let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
        let covered = presize(want).expect("the table can be grown");
        assert_eq!(covered as u64, (want as u64).min(soft - 1));
        assert!(fd_table_size() > covered, "FDSize {} covers descriptor {covered}", fd_table_size());
        // The probe descriptor is closed again: the next open gets a low number.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(std::os::fd::AsRawFd::as_raw_fd(&f) < 1000);
    }
}
