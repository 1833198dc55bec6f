//! Least privilege: once the source is open (probes attached, trace read), the agent drops
//! every capability it no longer needs, before any other thread exists.
//!
//! What a running live agent still does with privilege (checked on 6.1 and 6.12,
//! kernel/bpf/syscall.c): it reads its BPF maps (loss counters, stack traces) and its
//! programs' run-time stats through `bpf(2)` on file descriptors it already holds. On 6.1
//! every `bpf(2)` command is refused without `CAP_BPF` (or `CAP_SYS_ADMIN`) while
//! `kernel.unprivileged_bpf_disabled` is set, Debian's default; from 6.5 the check applies
//! only to loading, but the agent keeps `CAP_BPF` on every kernel so that one rule holds.
//! Draining the ring buffer (mmap), detaching (closing fds), serving HTTP on the bound socket,
//! writing the spool it owns and rereading its config need no capability. Everything used
//! only to attach goes: `CAP_PERFMON` (kprobe perf events), `CAP_SYS_ADMIN`,
//! `CAP_SYS_RESOURCE` (memlock), `CAP_SYSLOG` (kallsyms addresses). A replayed or simulated
//! source needs nothing at all.
//!
//! [`keep_after_start`] decides (pure, unit-tested); [`drop_to`] applies it to the calling
//! thread: bounding set (when `CAP_SETPCAP` allows), ambient and inheritable cleared, then
//! effective and permitted. Threads started afterwards inherit the result.

use caps::{CapSet, Capability, CapsHashSet};

use super::config::SourceConfig;

/// The capabilities a running agent keeps, given its source, what the kernel knows
/// (`CAP_BPF` exists from 5.8) and what the process holds (nothing is ever added).
pub fn keep_after_start(
    source: &SourceConfig,
    kernel_knows_cap_bpf: bool,
    permitted: &CapsHashSet,
) -> CapsHashSet {
    let want: &[Capability] = match source {
        SourceConfig::Replay(_) | SourceConfig::Simulate { .. } => &[],
        SourceConfig::Live if kernel_knows_cap_bpf => &[Capability::CAP_BPF],
        // Before 5.8 `bpf(2)` wanted CAP_SYS_ADMIN.
        SourceConfig::Live => &[Capability::CAP_SYS_ADMIN],
    };
    want.iter()
        .copied()
        .filter(|c| permitted.contains(c))
        .collect()
}

/// Names of a set, sorted, for the log line (`none` when empty).
pub fn describe(set: &CapsHashSet) -> String {
    let mut v: Vec<String> = set.iter().map(|c| c.to_string()).collect();
    v.sort();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot drop capabilities ({step}): {source}")]
pub struct PrivilegeError {
    pub step: &'static str,
    #[source]
    pub source: caps::errors::CapsError,
}

fn step(step: &'static str) -> impl FnOnce(caps::errors::CapsError) -> PrivilegeError {
    move |source| PrivilegeError { step, source }
}

/// Reduces the calling thread to `keep` (intersected with what it holds). Returns the
/// effective set afterwards.
pub fn drop_to(keep: &CapsHashSet) -> Result<CapsHashSet, PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted).map_err(step("read"))?;
    let keep: CapsHashSet = keep.intersection(&permitted).copied().collect();
    // The bounding set first, while CAP_SETPCAP is still effective: even an exec of a
    // set-uid or file-capability binary cannot regain what is gone from it.
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for c in caps::read(None, CapSet::Bounding).map_err(step("read bounding"))? {
            if !keep.contains(&c) {
                caps::drop(None, CapSet::Bounding, c).map_err(step("bounding"))?;
            }
        }
    }
    if caps::runtime::ambient_set_supported().is_ok() {
        caps::clear(None, CapSet::Ambient).map_err(step("ambient"))?;
    }
    caps::clear(None, CapSet::Inheritable).map_err(step("inheritable"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(step("effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(step("permitted"))?;
    caps::read(None, CapSet::Effective).map_err(step("read"))
}

/// What `itewatch agent` runs once its source is open: decide, drop, say what is kept.
/// A failure is logged and the agent goes on with what it has.
pub fn drop_after_start(source: &SourceConfig) {
    let permitted = match caps::read(None, CapSet::Permitted) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("itewatch agent: cannot read capabilities: {e}");
            return;
        }
    };
    if permitted.is_empty() {
        return;
    }
    let knows_bpf = caps::runtime::thread_all_supported().contains(&Capability::CAP_BPF);
    let keep = keep_after_start(source, knows_bpf, &permitted);
    match drop_to(&keep) {
        Ok(eff) => eprintln!("itewatch agent: capabilities kept: {}", describe(&eff)),
        Err(e) => eprintln!("itewatch agent: {e}; running with the capabilities it has"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn set(c: &[Capability]) -> CapsHashSet {
        c.iter().copied().collect()
    }

    #[test]
    fn live_keeps_only_what_reading_maps_and_stats_needs() {
        let root = caps::all();
        let k = keep_after_start(&SourceConfig::Live, true, &root);
        assert_eq!(k, set(&[Capability::CAP_BPF]));
        // What only attaching needed is gone.
        for c in [
            Capability::CAP_PERFMON,
            Capability::CAP_SYS_ADMIN,
            Capability::CAP_SYS_RESOURCE,
            Capability::CAP_SYSLOG,
            Capability::CAP_DAC_OVERRIDE,
            Capability::CAP_NET_BIND_SERVICE,
        ] {
            assert!(!k.contains(&c), "{c} kept");
        }
        // A kernel older than CAP_BPF checks CAP_SYS_ADMIN instead.
        assert_eq!(
            keep_after_start(&SourceConfig::Live, false, &root),
            set(&[Capability::CAP_SYS_ADMIN])
        );
    }

    #[test]
    fn replay_and_simulate_keep_nothing() {
        let root = caps::all();
        assert!(
            keep_after_start(&SourceConfig::Replay(PathBuf::from("t.itw")), true, &root).is_empty()
        );
        let sim = SourceConfig::Simulate {
            scenario: "benign".into(),
            seed: 0,
        };
        assert!(keep_after_start(&sim, true, &root).is_empty());
    }

    #[test]
    fn nothing_is_added_that_the_process_does_not_hold() {
        let only_perfmon = set(&[Capability::CAP_PERFMON]);
        assert!(keep_after_start(&SourceConfig::Live, true, &only_perfmon).is_empty());
        assert!(keep_after_start(&SourceConfig::Live, true, &CapsHashSet::new()).is_empty());
        assert_eq!(describe(&CapsHashSet::new()), "none");
        assert_eq!(describe(&set(&[Capability::CAP_BPF])), "CAP_BPF");
    }
}
