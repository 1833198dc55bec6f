//! `itewatch record`: live probes → trace file.
//!
//! The loop drains the ring buffer as it becomes readable, symbolizes each kernel stack once
//! (ids are never reused by the BPF side), writes each kernel record exactly as it came out of
//! the kernel, and once a second turns the BPF side's per-CPU loss counters into `Lost`
//! markers and flushes the file, so a host that locks up leaves a readable trace behind.
//! BPF run-time statistics are enabled only while recording (the kernel turns them off when
//! the stats fd closes, also on a crash).

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use aya::maps::{MapData, StackTraceMap};
use tokio::io::unix::AsyncFd;

use crate::event::{Event, KTime, LostRecord, Record, StackRecord};
use crate::kallsyms::Kallsyms;
use crate::probe::{CounterTotals, LoadOptions, Probes};
use crate::trace::{HostInfo, Source, TraceEnd, TraceHeader, TraceWriter};

/// What `record` needs.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub output: PathBuf,
    pub duration: Option<Duration>,
    /// Written (with the attach plan as JSON) once every probe is attached.
    pub ready_file: Option<PathBuf>,
    pub load: LoadOptions,
    /// Also print each record as a text line on stdout.
    pub echo: bool,
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

/// Hostname, kernel release and command line of this host.
pub fn host_info() -> HostInfo {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    HostInfo {
        hostname: read("/proc/sys/kernel/hostname"),
        kernel_release: read("/proc/sys/kernel/osrelease"),
        kernel_cmdline: read("/proc/cmdline"),
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

/// Identities of the PCI devices present now (sysfs), for naming SIDs. A sysfs that cannot
/// be read leaves the trace without names, not without events.
fn device_snapshot() -> Vec<crate::event::DeviceInfo> {
    match crate::sysfs::Sysfs::live().device_infos(KTime(monotonic_ns())) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("itewatch: note: device snapshot from sysfs failed: {e}");
            Vec::new()
        }
    }
}

/// Probe hits skipped by the kernel, summed over programs.
fn total_misses(probes: &Probes) -> u64 {
    probes.program_stats().iter().map(|s| s.misses).sum()
}

/// Counts of a finished recording.
#[derive(Clone, Debug, Default)]
pub struct RecordSummary {
    pub end: TraceEnd,
    pub stacks: u64,
    pub missing_required: Vec<String>,
}

struct Recorder<W: Write> {
    writer: TraceWriter<W>,
    stacks: StackTraceMap<MapData>,
    seen_stacks: HashSet<u32>,
    kallsyms: Option<Kallsyms>,
    last_ts: KTime,
    reported: CounterTotals,
    undecodable: u64,
    undecodable_reported: u64,
    misses_reported: u64,
    echo: bool,
    devices: HashMap<crate::event::Bdf, DeviceIdent>,
}

type DeviceIdent = (u16, u16, Option<String>, Option<String>, Option<bool>);

impl<W: Write> Recorder<W> {
    fn write(&mut self, rec: &Record) -> std::io::Result<()> {
        if self.echo {
            println!("{}", crate::render::record_line(rec));
        }
        self.writer.write_record(rec)
    }

    fn on_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let ev = match Event::decode(bytes) {
            Ok(e) => e,
            Err(_) => {
                // Not written: a reader would stop at it. Counted and reported as lost.
                self.undecodable += 1;
                return Ok(());
            }
        };
        if let Some(id) = ev.payload.stack() {
            if self.seen_stacks.insert(id.0) {
                let frames = symbolize(&self.stacks, self.kallsyms.as_ref(), id.0);
                self.write(&Record::Stack(StackRecord { id, frames }))?;
            }
        }
        self.last_ts = self.last_ts.max(ev.meta.ts);
        if self.echo {
            println!("{}", crate::render::record_line(&Record::Event(ev)));
        }
        self.writer.write_raw_event(bytes)
    }

    /// Writes the devices whose identity (ids, driver, slot) is new since the last snapshot.
    fn write_new_devices(&mut self, now: Vec<crate::event::DeviceInfo>) -> std::io::Result<()> {
        for mut d in now {
            // Keep the last known ATS state when the device stops answering (it is being
            // removed): the trace should name the device as it was.
            if d.ats.is_none() {
                if let Some(prev) = self.devices.get(&d.bdf) {
                    d.ats = prev.4;
                }
            }
            let ident = (d.vendor, d.device, d.driver.clone(), d.slot.clone(), d.ats);
            if self.devices.get(&d.bdf) != Some(&ident) {
                self.devices.insert(d.bdf, ident);
                self.write(&Record::Device(d))?;
            }
        }
        Ok(())
    }

    /// Writes a `Lost` marker for whatever the counters gained since the last one:
    /// ring-buffer reserve failures, probe hits the kernel skipped, undecodable records.
    fn on_counters(&mut self, now: CounterTotals, misses: u64) -> std::io::Result<()> {
        let full = now.ringbuf_full.saturating_sub(self.reported.ringbuf_full);
        let missed = misses.saturating_sub(self.misses_reported);
        let undecodable = self.undecodable - self.undecodable_reported;
        if full > 0 || undecodable > 0 || missed > 0 {
            let at = if self.last_ts.0 == 0 {
                KTime(monotonic_ns())
            } else {
                self.last_ts
            };
            self.write(&Record::Lost(LostRecord {
                after: at,
                ringbuf_full: full,
                missed,
                undecodable,
            }))?;
        }
        self.reported = now;
        self.misses_reported = misses;
        self.undecodable_reported = self.undecodable;
        Ok(())
    }
}

/// Runs the recording until SIGINT/SIGTERM or the duration, then finishes the trace.
pub fn run(opts: &RecordOptions) -> anyhow::Result<RecordSummary> {
    use anyhow::Context as _;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &RecordOptions) -> anyhow::Result<RecordSummary> {
    use anyhow::Context as _;
    use tokio::signal::unix::{signal, SignalKind};

    let mut probes = Probes::attach(&opts.load)?;
    for n in &probes.notes {
        eprintln!("itewatch: note: {n}");
    }
    let missing: Vec<String> = probes
        .missing_required()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for p in &probes.plan {
        if p.mechanism.is_none() {
            eprintln!(
                "itewatch: probe {} unavailable: {}",
                p.name,
                p.detail.as_deref().unwrap_or("?")
            );
        }
    }
    let mut header = TraceHeader::new(Source::Live);
    header.host = host_info();
    header.probes = probes.plan.clone();
    header.started_mono_ns = Some(monotonic_ns());
    header.started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    let writer = TraceWriter::create(&opts.output, &header)
        .with_context(|| format!("creating {}", opts.output.display()))?;
    let ring = probes.take_events()?;
    let stacks = probes.take_stacks()?;
    let counters = probes.take_counters()?;
    // Held until the end: closing it turns BPF stats collection off again.
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    let stats_base = probes.program_stats();

    let mut rec = Recorder {
        writer,
        stacks,
        seen_stacks: HashSet::new(),
        kallsyms: probes.kallsyms.take(),
        last_ts: KTime(0),
        reported: CounterTotals::default(),
        undecodable: 0,
        undecodable_reported: 0,
        misses_reported: 0,
        echo: opts.echo,
        devices: HashMap::new(),
    };
    // Sysfs device snapshot: names for the SIDs the probes will report.
    rec.write_new_devices(device_snapshot())?;
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, serde_json::to_vec_pretty(&probes.plan)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let started = monotonic_ns();
    eprintln!(
        "itewatch: recording to {} ({} of {} probes attached); Ctrl-C to stop",
        opts.output.display(),
        probes.plan.iter().filter(|p| p.mechanism.is_some()).count(),
        probes.plan.len()
    );

    // SAFETY: the RingBuf owns its map fd for its whole life and always returns that fd; the
    // AsyncFd owns the RingBuf, so the fd stays open and the same until the AsyncFd drops.
    let mut ring =
        unsafe { AsyncFd::register(ring) }.map_err(|e| anyhow::anyhow!("ring buffer fd: {e}"))?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until);
    let mut refresh_devices = false;
    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let bytes: &[u8] = &item;
                    if bytes.len() >= 4 && u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) == itewatch_common::EventKind::HotplugIstReturn as u32 {
                        refresh_devices = true;
                    }
                    rec.on_bytes(bytes)?;
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                rec.on_counters(counters.totals(), total_misses(&probes))?;
                if refresh_devices {
                    refresh_devices = false;
                    rec.write_new_devices(device_snapshot())?;
                }
                rec.writer.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut sleep_until => break,
        }
    }
    // Drain what is left, then the final counters.
    {
        let rb = ring.get_mut();
        while let Some(item) = rb.next() {
            let bytes: &[u8] = &item;
            rec.on_bytes(bytes)?;
        }
    }
    let totals = counters.totals();
    rec.on_counters(totals, total_misses(&probes))?;
    let stats = probes.program_stats();
    drop(stats_fd);
    let end = rec.writer.end_mut();
    end.read_failed = totals.read_failed;
    end.return_without_entry = totals.return_without_entry;
    end.duration_ns = Some(monotonic_ns().saturating_sub(started));
    end.programs = stats
        .into_iter()
        .map(|mut s| {
            if let Some(b) = stats_base.iter().find(|b| b.program == s.program) {
                s.run_count = s.run_count.saturating_sub(b.run_count);
                s.run_time_ns = s.run_time_ns.saturating_sub(b.run_time_ns);
                s.misses = s.misses.saturating_sub(b.misses);
            }
            s
        })
        .collect();
    let end = end.clone();
    let stacks = rec.seen_stacks.len() as u64;
    rec.writer.finish().context("finishing the trace")?;
    Ok(RecordSummary {
        end,
        stacks,
        missing_required: missing,
    })
}
