//! The live probes as a stream of records, shared by every live sink (`record`, `live`,
//! `agent`), so that each of them sees the same thing: the kernel's events, each kernel stack
//! symbolized once (ids are never reused by the BPF side), loss markers for ring-buffer
//! overflows, probe hits the kernel skipped and undecodable records, and the identities of the
//! PCI devices from sysfs (refreshed after each hot-plug interrupt, keeping the last known ATS
//! state of a device that stops answering).
//!
//! BPF run-time statistics are enabled while a reader lives: it holds the stats fd, and the
//! kernel turns the statistics off again when that fd closes, also when the process dies.
//!
//! The reader never blocks. [`LiveReader`] implements `AsRawFd` (the ring buffer's fd), so an
//! async sink wraps it in `tokio::io::unix::AsyncFd` and drains it when it becomes readable;
//! a synchronous one drains it at its own tick.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use aya::maps::{MapData, RingBuf, StackTraceMap};

use crate::event::{Bdf, DeviceInfo, Event, KTime, LostRecord, Payload, Record, StackRecord};
use crate::kallsyms::Kallsyms;
use crate::probe::{CounterTotals, Counters, LoadOptions, ProbeError, Probes};
use crate::trace::{ProbeStatus, ProgramStats};

/// One thing drained from the reader.
pub enum Item<'a> {
    /// A kernel event, with its bytes exactly as the kernel wrote them (what a trace stores).
    Kernel { bytes: &'a [u8], event: Event },
    /// A record made in userspace: a symbolized stack, a device identity or a loss marker.
    Made(Record),
}

/// The identity of a device as last written, to write only what changed.
type DeviceIdent = (u16, u16, Option<String>, Option<String>, Option<bool>);

/// Device identities already handed out, so that a snapshot only yields what changed.
#[derive(Default)]
struct DeviceTracker {
    known: HashMap<Bdf, DeviceIdent>,
}

impl DeviceTracker {
    /// The devices of `now` that are new or changed since the last call.
    fn changed(&mut self, now: Vec<DeviceInfo>) -> Vec<DeviceInfo> {
        let mut out = Vec::new();
        for mut d in now {
            // A device that stops answering (it is being removed) reads back as "ATS
            // unknown": keep the last known state, the report should name it as it was.
            if d.ats.is_none() {
                if let Some(prev) = self.known.get(&d.bdf) {
                    d.ats = prev.4;
                }
            }
            let ident = (d.vendor, d.device, d.driver.clone(), d.slot.clone(), d.ats);
            if self.known.get(&d.bdf) != Some(&ident) {
                self.known.insert(d.bdf, ident);
                out.push(d);
            }
        }
        out
    }
}

/// Loss counts already reported, to report only what they gained.
#[derive(Default)]
struct LossTracker {
    reported: CounterTotals,
    misses_reported: u64,
    undecodable: u64,
    undecodable_reported: u64,
}

impl LossTracker {
    /// A `Lost` marker for what the counters gained since the last call, if anything.
    fn marker(&mut self, now: CounterTotals, misses: u64, after: KTime) -> Option<LostRecord> {
        let full = now.ringbuf_full.saturating_sub(self.reported.ringbuf_full);
        let missed = misses.saturating_sub(self.misses_reported);
        let undecodable = self.undecodable - self.undecodable_reported;
        self.reported = now;
        self.misses_reported = self.misses_reported.max(misses);
        self.undecodable_reported = self.undecodable;
        (full > 0 || missed > 0 || undecodable > 0).then_some(LostRecord {
            after,
            ringbuf_full: full,
            missed,
            undecodable,
        })
    }
}

/// `CLOCK_MONOTONIC` now, in ns (the BPF side's `bpf_ktime_get_ns` clock).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Identities of the PCI devices present now (sysfs). A sysfs that cannot be read leaves the
/// stream without names, not without events.
pub fn sysfs_devices() -> Vec<DeviceInfo> {
    match crate::sysfs::Sysfs::live().device_infos(KTime(monotonic_ns())) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("itewatch: note: device snapshot from sysfs failed: {e}");
            Vec::new()
        }
    }
}

/// Turns a kernel stack into frames, innermost first.
fn symbolize(stacks: &StackTraceMap<MapData>, ksyms: Option<&Kallsyms>, id: u32) -> Vec<String> {
    match stacks.get(&id, 0) {
        Ok(st) => st
            .frames()
            .iter()
            .map(|f| match ksyms {
                Some(k) => k.symbolize(f.ip),
                None => format!("{:#x}", f.ip),
            })
            .collect(),
        Err(e) => vec![format!("<stack {id} unreadable: {e}>")],
    }
}

/// Attached probes and their maps, read as records.
pub struct LiveReader {
    probes: Probes,
    ring: RingBuf<MapData>,
    stacks: StackTraceMap<MapData>,
    counters: Counters,
    kallsyms: Option<Kallsyms>,
    seen_stacks: HashSet<u32>,
    losses: LossTracker,
    last_ts: KTime,
    devices: DeviceTracker,
    /// A device snapshot is due (after each hot-plug interrupt).
    refresh_devices: bool,
    /// Device records of the snapshot taken at attach time, handed out by the first
    /// `periodic`: taken while the process still has its privileges (reading a device's
    /// extended config space, where ATS is, needs CAP_SYS_ADMIN, which the agent drops).
    pending: Vec<Record>,
    /// Run-time stats when the reader started: what [`LiveReader::program_stats`] subtracts.
    stats_base: Vec<ProgramStats>,
    /// [`LiveReader::program_stats`] as read by the last `periodic` (one read per period, for
    /// the loss marker and for the sinks' cost figures alike).
    last_stats: Vec<ProgramStats>,
    /// Held while the reader lives: closing it turns the kernel's BPF run-time stats off again.
    stats_fd: Option<OwnedFd>,
}

impl LiveReader {
    /// Attaches the probes and starts reading.
    pub fn attach(opts: &LoadOptions) -> Result<LiveReader, ProbeError> {
        LiveReader::new(Probes::attach(opts)?)
    }

    /// Takes the maps of attached probes, enables BPF run-time stats and takes the first
    /// device snapshot (from sysfs).
    pub fn new(mut probes: Probes) -> Result<LiveReader, ProbeError> {
        let ring = probes.take_events()?;
        let stacks = probes.take_stacks()?;
        let counters = probes.take_counters()?;
        let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
        let stats_base = probes.program_stats();
        let kallsyms = probes.kallsyms.take();
        let mut devices = DeviceTracker::default();
        let pending = devices
            .changed(sysfs_devices())
            .into_iter()
            .map(Record::Device)
            .collect();
        Ok(LiveReader {
            probes,
            ring,
            stacks,
            counters,
            kallsyms,
            seen_stacks: HashSet::new(),
            losses: LossTracker::default(),
            last_ts: KTime(0),
            devices,
            refresh_devices: false,
            pending,
            stats_base,
            last_stats: Vec::new(),
            stats_fd,
        })
    }

    /// The attach plan.
    pub fn plan(&self) -> &[ProbeStatus] {
        &self.probes.plan
    }

    /// Notes of the loader (fallbacks, kernel limits) for the user.
    pub fn notes(&self) -> &[String] {
        &self.probes.notes
    }

    /// Required probes that did not attach.
    pub fn missing_required(&self) -> Vec<String> {
        self.probes
            .missing_required()
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    /// Whether the kernel's BPF run-time statistics are on (they need CAP_SYS_ADMIN).
    pub fn stats_enabled(&self) -> bool {
        self.stats_fd.is_some()
    }

    /// Per-program run counts, run time and misses since this reader started.
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.probes
            .program_stats()
            .into_iter()
            .map(|mut s| {
                if let Some(b) = self.stats_base.iter().find(|b| b.program == s.program) {
                    s.run_count = s.run_count.saturating_sub(b.run_count);
                    s.run_time_ns = s.run_time_ns.saturating_sub(b.run_time_ns);
                    s.misses = s.misses.saturating_sub(b.misses);
                }
                s
            })
            .collect()
    }

    /// Per-program stats as of the last [`LiveReader::periodic`] (empty before the first).
    pub fn last_program_stats(&self) -> &[ProgramStats] {
        &self.last_stats
    }

    /// The BPF side's counters, summed over CPUs.
    pub fn counters(&self) -> CounterTotals {
        self.counters.totals()
    }

    /// Distinct kernel stacks seen so far.
    pub fn stacks_seen(&self) -> usize {
        self.seen_stacks.len()
    }

    /// Drains at most `budget` kernel events, handing each to `f` (preceded by its stack, the
    /// first time that stack is seen). Returns how many kernel records were taken; fewer than
    /// `budget` means the ring buffer is empty. Stops at the first error of `f`.
    pub fn drain_with<E>(
        &mut self,
        budget: usize,
        mut f: impl FnMut(Item<'_>) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut taken = 0;
        while taken < budget {
            let Some(item) = self.ring.next() else {
                break;
            };
            taken += 1;
            let bytes: &[u8] = &item;
            let event = match Event::decode(bytes) {
                Ok(e) => e,
                Err(_) => {
                    // Not handed out (a trace reader would stop at it): counted, and
                    // reported as lost by the next `periodic`.
                    self.losses.undecodable += 1;
                    continue;
                }
            };
            if let Some(id) = event.payload.stack() {
                if self.seen_stacks.insert(id.0) {
                    let frames = symbolize(&self.stacks, self.kallsyms.as_ref(), id.0);
                    f(Item::Made(Record::Stack(StackRecord { id, frames })))?;
                }
            }
            if matches!(event.payload, Payload::HotplugIstReturn(_)) {
                self.refresh_devices = true;
            }
            self.last_ts = self.last_ts.max(event.meta.ts);
            f(Item::Kernel { bytes, event })?;
        }
        Ok(taken)
    }

    /// [`LiveReader::drain_with`] into a vector of records.
    pub fn drain(&mut self, budget: usize, out: &mut Vec<Record>) -> usize {
        let r: Result<usize, std::convert::Infallible> = self.drain_with(budget, |it| {
            out.push(match it {
                Item::Kernel { event, .. } => Record::Event(event),
                Item::Made(r) => r,
            });
            Ok(())
        });
        match r {
            Ok(n) => n,
        }
    }

    /// Call about once a second (and once at start): the attach-time device snapshot (first
    /// call), a `Lost` marker for what the loss counters gained, and the identities of devices
    /// that appeared or changed when a device snapshot is due. `now` (CLOCK_MONOTONIC) stamps the marker when no event came yet.
    pub fn periodic(&mut self, now: KTime, out: &mut Vec<Record>) {
        self.last_stats = self.program_stats();
        let misses = self.last_stats.iter().map(|s| s.misses).sum();
        let after = if self.last_ts.0 == 0 {
            now
        } else {
            self.last_ts
        };
        out.append(&mut self.pending);
        if let Some(l) = self.losses.marker(self.counters.totals(), misses, after) {
            out.push(Record::Lost(l));
        }
        if std::mem::take(&mut self.refresh_devices) {
            let now = sysfs_devices();
            out.extend(self.devices.changed(now).into_iter().map(Record::Device));
        }
    }
}

impl LiveReader {
    /// The reader registered with the tokio reactor (call inside a runtime): readable when
    /// the ring buffer has events waiting. On failure the reader comes back with the error.
    pub fn into_async(
        self,
    ) -> Result<tokio::io::unix::AsyncFd<LiveReader>, Box<(LiveReader, std::io::Error)>> {
        // SAFETY: `as_raw_fd` is the fd of the ring buffer map this reader owns for its whole
        // life, and always the same one; the AsyncFd owns the reader, so the fd stays open and
        // unchanged until the AsyncFd drops.
        unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE)
        }
        .map_err(|e| Box::new(e.into_parts()))
    }
}

impl AsRawFd for LiveReader {
    /// The ring buffer's fd: readable when events are waiting.
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(bus: u8, ats: Option<bool>, driver: Option<&str>) -> DeviceInfo {
        DeviceInfo {
            bdf: Bdf {
                segment: Some(0),
                bus,
                devfn: 0,
            },
            vendor: 0x1af4,
            device: 0x1042,
            driver: driver.map(str::to_string),
            slot: Some("1".into()),
            port: None,
            ats,
            iommu: None,
            seen: KTime(1),
        }
    }

    #[test]
    fn device_snapshots_yield_only_what_changed_and_keep_the_last_known_ats() {
        let mut t = DeviceTracker::default();
        let first = t.changed(vec![
            dev(1, Some(true), Some("virtio-pci")),
            dev(2, None, None),
        ]);
        assert_eq!(first.len(), 2, "everything is new at first");
        assert!(
            t.changed(vec![dev(1, Some(true), Some("virtio-pci"))])
                .is_empty(),
            "nothing changed"
        );
        // Being removed: the device no longer answers (ATS unknown) and lost its driver.
        let gone = t.changed(vec![dev(1, None, None)]);
        assert_eq!(gone.len(), 1, "the driver change is news");
        assert_eq!(gone[0].ats, Some(true), "ATS as last known");
        assert_eq!(gone[0].driver, None);
    }

    #[test]
    fn loss_markers_carry_only_the_increase_of_each_counter() {
        let mut l = LossTracker::default();
        let c = |full| CounterTotals {
            ringbuf_full: full,
            ..Default::default()
        };
        assert!(l.marker(c(0), 0, KTime(5)).is_none(), "nothing lost");
        l.undecodable = 2;
        let m = l.marker(c(3), 7, KTime(9)).expect("a marker");
        assert_eq!(
            (m.after, m.ringbuf_full, m.missed, m.undecodable),
            (KTime(9), 3, 7, 2)
        );
        assert!(l.marker(c(3), 7, KTime(10)).is_none(), "no new loss");
        let m = l.marker(c(4), 9, KTime(11)).expect("a marker");
        assert_eq!((m.ringbuf_full, m.missed, m.undecodable), (1, 2, 0));
    }
}
