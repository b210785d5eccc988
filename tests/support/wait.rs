//! Waiting on things that have no channel to await: a condition polled until it holds,
//! and another process (or thread) blocked on a `flock(2)`, as `/proc/locks` shows it.
//! Both are bounded by [`WAIT`](super::token::WAIT) and fail the test with what they
//! waited for; neither is a sleep that hopes something happened meanwhile.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use super::token::WAIT;

const POLL: Duration = Duration::from_millis(2);

/// Polls `condition` until it holds; panics after [`WAIT`].
pub async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        tokio::time::sleep(POLL).await;
    }
}

/// How many lock requests are blocked on `path` right now (the `->` lines of
/// `/proc/locks` for its device and inode). 0 when the file does not exist yet.
pub fn flock_waiters(path: &Path) -> usize {
    let Ok(meta) = std::fs::metadata(path) else {
        return 0;
    };
    let dev = meta.dev();
    // Linux's dev_t encoding (the kernel prints major:minor in hex).
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    let id = format!("{major:02x}:{minor:02x}:{}", meta.ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks
        .lines()
        .filter(|line| line.contains(" -> "))
        .filter(|line| line.split_whitespace().any(|field| field == id))
        .count()
}

/// Lock requests blocked on any file directly inside `dir` (e.g. the state directory,
/// whatever its lock files are called).
pub fn flock_waiters_in(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| flock_waiters(&entry.path()))
        .sum()
}
