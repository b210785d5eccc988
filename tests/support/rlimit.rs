//! The open-files limit (`RLIMIT_NOFILE`): raised for tests that hold thousands of
//! sockets (a child started afterwards inherits it), lowered on a child to exhaust it.

/// This process's soft and hard limits on open files.
pub fn open_files() -> (u64, u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    let result = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(result, 0, "getrlimit: {}", std::io::Error::last_os_error());
    (limit.rlim_cur, limit.rlim_max)
}

/// Raises this process's soft limit on open files to its hard limit when it is below
/// `at_least` (tests run in parallel in one process: every one of them gets the room);
/// panics, naming the limit, when even the hard limit is lower.
pub fn raise_open_files(at_least: u64) {
    let (soft, hard) = open_files();
    assert!(
        hard >= at_least,
        "this test needs {at_least} open files but the hard `ulimit -n` is {hard}; raise it to run it"
    );
    if soft < at_least {
        let limit = libc::rlimit {
            rlim_cur: hard,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one `rlimit`.
        let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
        assert_eq!(result, 0, "setrlimit: {}", std::io::Error::last_os_error());
    }
}

/// Sets `pid`'s soft and hard limits on open files.
pub fn limit_open_files(pid: u32, limit: u64) {
    let limit = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    let pid = libc::pid_t::try_from(pid).unwrap();
    // SAFETY: prlimit reads `limit` and writes nothing (null old limit).
    let result = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(result, 0, "prlimit: {}", std::io::Error::last_os_error());
}
