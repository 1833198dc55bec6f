//! The last-gasp channel: how an incident leaves a host whose CPU is spinning in
//! `qi_submit_sync` with interrupts off.
//!
//! On such a host (seen on Debian 6.1 with the emulated time-out, docs/vm-tests.md) nothing
//! that needs the stuck CPU works any more: ring-buffer wake-ups of records written there (an
//! irq_work on that CPU), timers armed there, threads that were runnable or asleep there,
//! interrupts routed there. What still works is a thread on another CPU that sleeps on its own
//! timer and writes synchronously. So every agent thread that produces an incident (the main
//! loop, or a sentinel that took over, agent/sentinel.rs) writes it here at once, through its
//! own descriptors, before anything else:
//!
//! - each configured file or terminal (`last_gasp`) gets one compact JSON line per revision
//!   (one `write(2)`; a serial port, a file on a disk, a pipe to netconsole's userspace twin);
//! - with `kmsg`, critical revisions also become a `KERN_CRIT` line in the kernel log, which a
//!   serial console, netconsole and pstore carry off the host, where `itewatch analyze` reads.
//!
//! Terminals and pipes are opened non-blocking: a write that would block is counted as dropped
//! rather than stalling the thread that must keep watching.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use super::metrics::Metrics;

use crate::correlate::incident::{Incident, IncidentId, IncidentKind, Outcome, Severity, Window};
use crate::event::{CallerPath, KTime, Sid};

/// The longest line written to /dev/kmsg: the kernel truncates a record at about 1 KiB.
const KMSG_MAX: usize = 900;
/// At most this many kmsg lines per minute (a storm of incidents must not become a log storm).
const KMSG_PER_MINUTE: u32 = 10;
/// No kmsg line while the kernel logs faster than this (lines per second, as the printk
/// tracepoint saw them). Seen on 6.1 under the emulated time-out raised at once (~3 000 ITE
/// blocks a second from the spinning CPU): the agent's printk on the other CPU took the console
/// over and stayed there printing the flood with interrupts off, so that CPU stopped too and
/// nothing more left the host. A busy console is for the serial or file channel.
pub const KMSG_MAX_LOG_RATE: u32 = 200;

/// One line: what a reader acts on, and when this host wrote it.
#[derive(Serialize)]
struct Line<'a> {
    itewatch: &'static str,
    /// CLOCK_MONOTONIC when written: the time base of dmesg timestamps.
    t_ns: u64,
    /// The agent thread that wrote it: `main`, or `sentinel/<cpu>` after a takeover.
    writer: &'a str,
    id: &'a IncidentId,
    revision: u32,
    kind: IncidentKind,
    severity: Severity,
    window: Option<Window>,
    bdf: Option<String>,
    sid: Option<Sid>,
    /// The submission the incident is about (the first one): who, where, from which path.
    task: Option<&'a str>,
    tid: Option<u32>,
    cpu: Option<u32>,
    caller: Option<CallerPath>,
    outcome: Option<&'a Outcome>,
    start_ns: KTime,
    end_ns: KTime,
    partial: bool,
    closed: bool,
}

/// The compact JSON line of one revision, written at `t_ns` by `writer` (pure).
pub fn line(inc: &Incident, t_ns: u64, writer: &str) -> String {
    let sub = inc.submissions.first();
    let l = Line {
        itewatch: "incident",
        t_ns,
        writer,
        id: &inc.id,
        revision: inc.revision,
        kind: inc.kind,
        severity: inc.severity,
        window: inc.window,
        bdf: inc.device.bdf.map(|b| b.to_string()),
        sid: inc.device.sid,
        task: sub.map(|s| s.task.as_str()),
        tid: sub.map(|s| s.tid),
        cpu: sub.map(|s| s.cpu),
        caller: sub.map(|s| s.caller),
        outcome: inc.outcome.as_ref(),
        start_ns: inc.start,
        end_ns: inc.end,
        partial: inc.partial,
        closed: inc.closed,
    };
    serde_json::to_string(&l).unwrap_or_default()
}

/// The kmsg record of a line: `KERN_CRIT`, tagged, cut to what the kernel keeps (pure).
pub fn kmsg_record(line: &str) -> Vec<u8> {
    let mut body = line;
    if body.len() > KMSG_MAX {
        let mut cut = KMSG_MAX;
        while !body.is_char_boundary(cut) {
            cut -= 1;
        }
        body = &body[..cut];
    }
    format!("<2>itewatch: {body}\n").into_bytes()
}

/// One writer's descriptors. Each thread that may write owns its own, so a thread stuck on a
/// dead CPU cannot hold a lock the others need.
pub struct LastGasp {
    /// Who writes through these descriptors (`main`, `sentinel/3`).
    writer: String,
    files: Vec<(PathBuf, File)>,
    kmsg: Option<File>,
    /// Start of the current minute (monotonic ns) and kmsg lines written in it.
    kmsg_window: (u64, u32),
    /// Lines a full terminal or pipe, or a failed write, did not take.
    pub dropped: u64,
    /// Critical lines kept off the kernel log because it was flooding.
    pub kmsg_skipped: u64,
    /// Where lines that were not written are counted (`itewatch_last_gasp_unwritten_total`).
    metrics: Option<Arc<Metrics>>,
}

impl LastGasp {
    /// Opens the channels for `writer`; what cannot be opened is reported and left out.
    pub fn open(writer: &str, paths: &[PathBuf], kmsg: bool) -> (LastGasp, Vec<String>) {
        let mut errors = Vec::new();
        let mut files = Vec::new();
        for p in paths {
            match open_append(p) {
                Ok(f) => files.push((p.clone(), f)),
                Err(e) => errors.push(format!(
                    "cannot open last-gasp channel {}: {e}",
                    p.display()
                )),
            }
        }
        let kmsg = if kmsg {
            match open_append(Path::new("/dev/kmsg")) {
                Ok(f) => Some(f),
                Err(e) => {
                    errors.push(format!("cannot open /dev/kmsg: {e}"));
                    None
                }
            }
        } else {
            None
        };
        (
            LastGasp {
                writer: writer.to_string(),
                files,
                kmsg,
                kmsg_window: (0, 0),
                dropped: 0,
                kmsg_skipped: 0,
                metrics: None,
            },
            errors,
        )
    }

    /// Counts what is not written in the agent's metrics too (an atomic add: never blocks).
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> LastGasp {
        self.metrics = Some(metrics);
        self
    }

    fn unwritten(&mut self, channel: &'static str, reason: &'static str) {
        if reason == "flooding" {
            self.kmsg_skipped += 1;
        } else {
            self.dropped += 1;
        }
        if let Some(m) = &self.metrics {
            m.last_gasp_unwritten(channel, reason);
        }
    }

    /// Whether there is anywhere to write.
    pub fn is_active(&self) -> bool {
        !self.files.is_empty() || self.kmsg.is_some()
    }

    /// Writes one revision to every channel, now (`now_ns`: CLOCK_MONOTONIC);
    /// `log_rate`: kernel log lines in the last second.
    pub fn write(&mut self, inc: &Incident, now_ns: u64, log_rate: u32) {
        if !self.is_active() {
            return;
        }
        let text = line(inc, now_ns, &self.writer);
        let mut bytes = Vec::with_capacity(text.len() + 1);
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(b'\n');
        let mut failed = 0;
        for (_, f) in &mut self.files {
            if f.write_all(&bytes).is_err() {
                failed += 1;
            }
        }
        for _ in 0..failed {
            self.unwritten("file", "write_error");
        }
        if inc.severity == Severity::Critical && self.kmsg.is_some() {
            match kmsg_decision(&mut self.kmsg_window, now_ns, log_rate) {
                Kmsg::Write => {
                    let ok = self
                        .kmsg
                        .as_mut()
                        .is_some_and(|k| k.write_all(&kmsg_record(&text)).is_ok());
                    if !ok {
                        self.unwritten("kmsg", "write_error");
                    }
                }
                Kmsg::Flooding => self.unwritten("kmsg", "flooding"),
                Kmsg::OverBudget => self.unwritten("kmsg", "over_budget"),
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kmsg {
    Write,
    /// The kernel log floods: a printk now could keep this CPU printing for good.
    Flooding,
    /// Past the per-minute budget.
    OverBudget,
}

/// Whether a critical line may go to /dev/kmsg now; counts it in `window` (start of the
/// current minute, lines in it) when it may (pure).
fn kmsg_decision(window: &mut (u64, u32), now_ns: u64, log_rate: u32) -> Kmsg {
    if log_rate > KMSG_MAX_LOG_RATE {
        return Kmsg::Flooding;
    }
    if now_ns.saturating_sub(window.0) >= 60_000_000_000 {
        *window = (now_ns, 0);
    }
    if window.1 >= KMSG_PER_MINUTE {
        return Kmsg::OverBudget;
    }
    window.1 += 1;
    Kmsg::Write
}

/// Opens for appending without blocking on a terminal or pipe (and without making a terminal
/// the controlling one).
fn open_append(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(!p.starts_with("/dev"))
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A critical hung-invalidation from the simulator (the seeds vary the outcome).
    fn hung() -> Incident {
        (0..64)
            .find_map(|seed| {
                let sim = crate::simulate::generate("hang-no-hotplug", seed).unwrap();
                let mut c = crate::correlate::Correlator::new(Default::default());
                let mut out = c.push_all(&sim.records);
                out.extend(c.finish().incidents);
                out.into_iter().find(|i| {
                    i.kind == IncidentKind::HungInvalidation && i.severity == Severity::Critical
                })
            })
            .expect("some seed of the hang scenario gives a critical hung-invalidation")
    }

    #[test]
    fn a_line_names_the_submission_and_fits_in_a_kernel_log_record() {
        let inc = hung();
        let l = line(&inc, 42, "sentinel/1");
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        assert_eq!(v["itewatch"], "incident");
        assert_eq!(v["t_ns"], 42);
        assert_eq!(v["writer"], "sentinel/1");
        assert_eq!(v["kind"], "hung-invalidation");
        assert_eq!(v["severity"], "critical");
        assert_eq!(v["id"], serde_json::to_value(&inc.id).unwrap());
        assert_eq!(v["tid"], inc.submissions[0].tid);
        assert!(!l.contains('\n'));
        assert!(l.len() < KMSG_MAX, "{} bytes: {l}", l.len());
        let rec = kmsg_record(&l);
        assert!(rec.starts_with(b"<2>itewatch: {"));
        assert!(rec.ends_with(b"}\n"));
    }

    #[test]
    fn kmsg_keeps_off_a_flooding_log_and_within_its_budget() {
        let s = 1_000_000_000;
        let mut w = (0, 0);
        assert_eq!(
            kmsg_decision(&mut w, 100 * s, KMSG_MAX_LOG_RATE + 1),
            Kmsg::Flooding
        );
        assert_eq!(w, (0, 0), "a skipped line does not use the budget");
        for _ in 0..KMSG_PER_MINUTE {
            assert_eq!(kmsg_decision(&mut w, 100 * s, 3), Kmsg::Write);
        }
        assert_eq!(kmsg_decision(&mut w, 130 * s, 3), Kmsg::OverBudget);
        assert_eq!(kmsg_decision(&mut w, 160 * s, 3), Kmsg::Write);
    }

    #[test]
    fn kmsg_records_are_cut_on_a_char_boundary() {
        let long = "é".repeat(KMSG_MAX);
        let rec = kmsg_record(&long);
        assert!(String::from_utf8(rec.clone()).is_ok());
        assert!(rec.len() <= KMSG_MAX + "<2>itewatch: \n".len());
    }

    #[test]
    fn every_revision_goes_to_the_file_and_each_is_one_line() {
        let dir = std::env::temp_dir().join(format!("itewatch-lastgasp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lines");
        let _ = std::fs::remove_file(&path);
        let (mut lg, errors) = LastGasp::open("main", std::slice::from_ref(&path), false);
        assert!(errors.is_empty(), "{errors:?}");
        let mut inc = hung();
        lg.write(&inc, 1, 0);
        inc.revision += 1;
        lg.write(&inc, 2, 0);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("\"t_ns\":2"));
        assert_eq!(lg.dropped, 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_critical_line_withheld_from_a_flooding_kmsg_is_counted() {
        let dir = std::env::temp_dir().join(format!("itewatch-lastgasp-k-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (file, kmsg) = (dir.join("lines"), dir.join("kmsg"));
        let (lg, errors) = LastGasp::open("main", std::slice::from_ref(&file), false);
        assert!(errors.is_empty(), "{errors:?}");
        let metrics = Arc::new(Metrics::new());
        let mut lg = lg.with_metrics(metrics.clone());
        // A stand-in for /dev/kmsg: a file, so what would have been printed can be read.
        lg.kmsg = Some(open_append(&kmsg).unwrap());
        let inc = hung();
        assert_eq!(inc.severity, Severity::Critical);
        lg.write(&inc, 1, KMSG_MAX_LOG_RATE + 1);
        assert_eq!(std::fs::read_to_string(&kmsg).unwrap(), "");
        assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 1);
        assert_eq!((lg.kmsg_skipped, lg.dropped), (1, 0));
        lg.write(&inc, 2, 0);
        assert!(std::fs::read_to_string(&kmsg)
            .unwrap()
            .starts_with("<2>itewatch: {"));
        let text = metrics.encode();
        assert!(
            text.contains(
                "itewatch_last_gasp_unwritten_total{channel=\"kmsg\",reason=\"flooding\"} 1\n"
            ),
            "{text}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_channel_that_cannot_be_opened_is_named() {
        let (lg, errors) = LastGasp::open("main", &[PathBuf::from("/nonexistent-dir/x")], false);
        assert!(!lg.is_active());
        assert!(errors[0].contains("/nonexistent-dir/x"), "{errors:?}");
    }
}
