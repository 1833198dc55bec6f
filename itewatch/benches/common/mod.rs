//! What the benchmarks share.

use std::time::Duration;

/// CPU time of the calling thread: the fair measure on a loaded machine, where wall time
/// depends on what else runs.
#[allow(dead_code)] // not every benchmark times threads
pub fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on
    // Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A `kB` field (`VmRSS:`, `VmHWM:`, ..) of `/proc/<pid>/status`; `pid` may be `"self"`.
#[allow(dead_code)] // not every benchmark reads memory
pub fn status_kib(pid: &str, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
