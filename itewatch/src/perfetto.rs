//! `itewatch report --format perfetto`: a trace as Chrome trace-event JSON, the format the
//! Perfetto UI (ui.perfetto.dev) and chrome://tracing open, so that a trace can be looked at
//! in a timeline viewer people already use.
//!
//! Layout (docs/report-format.md, "Perfetto"):
//! - process 1, "CPUs": one lane (`tid`) per CPU. Each `qi_submit_sync` call is a complete
//!   slice (`ph: "X"`) from entry to return on the CPU it ran on; hot-plug events, device-TLB
//!   flushes and kernel log lines are instants (`ph: "i"`, thread scope) on their CPU.
//! - Lost-event markers are global instants.
//! - process 2, "incidents": one lane per incident, the incident a slice over its time span with
//!   its verdict in `args`, and a flow arrow (`ph: "s"` → `"f"`) from it to each submission it
//!   is about.
//!
//! Times are microseconds (the format's unit) with nanosecond decimals; `displayTimeUnit` is
//! `ns`. Written streaming: every event as the trace is read, the incidents at the end, so
//! memory holds only the open submissions and the correlator's own state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, Write};
use std::path::Path;

use serde_json::{json, Value};

use crate::correlate::incident::Incident;
use crate::correlate::{describe, Config};
use crate::document::{self, DocumentError, ReportDocument};
use crate::event::{kind_name, Event, KTime, Payload, Record};
use crate::trace::TraceReader;

/// Process id of the CPU lanes.
pub const PID_CPUS: u32 = 1;
/// Process id of the incident lanes.
pub const PID_INCIDENTS: u32 = 2;

fn us(t: KTime) -> f64 {
    t.0 as f64 / 1000.0
}

/// A submission whose return has not been seen yet.
struct Open {
    event: Event,
}

/// The writer's state between records.
struct Writer<'a> {
    out: &'a mut dyn Write,
    first: bool,
    cpus: BTreeSet<u32>,
    /// Open submissions by kernel thread id.
    open: BTreeMap<u32, Open>,
    /// Where each submission's slice went: (thread id, start) → CPU lane (for the flows).
    placed: BTreeMap<(u32, u64), u32>,
    last_ts: KTime,
    /// Flow ids handed out.
    flows: u64,
}

impl Writer<'_> {
    fn emit(&mut self, v: &Value) -> io::Result<()> {
        if !self.first {
            self.out.write_all(b",\n")?;
        }
        self.first = false;
        serde_json::to_writer(&mut *self.out, v).map_err(io::Error::other)
    }

    fn lane(&mut self, cpu: u32) -> io::Result<()> {
        if self.cpus.insert(cpu) {
            self.emit(
                &json!({"ph": "M", "name": "thread_name", "pid": PID_CPUS, "tid": cpu,
                              "args": {"name": format!("cpu {cpu}")}}),
            )?;
            self.emit(
                &json!({"ph": "M", "name": "thread_sort_index", "pid": PID_CPUS,
                              "tid": cpu, "args": {"sort_index": cpu}}),
            )?;
        }
        Ok(())
    }

    /// The slice of a submission, from its entry event to `end`.
    fn slice(&mut self, s: &Event, end: KTime, ret: Option<i64>, note: &str) -> io::Result<()> {
        let Payload::Submit(sub) = &s.payload else {
            return Ok(());
        };
        let name = format!("qi_submit_sync {}", sub.iommu.name);
        let mut args = json!({
            "task": s.meta.comm.as_str(),
            "tid": s.meta.tid,
            "detail": describe::detail(s),
        });
        match ret {
            Some(r) => args["ret"] = json!(r),
            None => args["return"] = json!(note),
        }
        self.placed.insert((s.meta.tid, s.meta.ts.0), s.meta.cpu);
        self.emit(&json!({
            "ph": "X", "cat": "invalidation", "name": name,
            "pid": PID_CPUS, "tid": s.meta.cpu,
            "ts": us(s.meta.ts), "dur": us(KTime(end.0.saturating_sub(s.meta.ts.0))),
            "args": args,
        }))
    }

    /// Closes a submission whose return will not come: a later submission on its CPU shows
    /// the CPU went on (its return was lost), so its slice ends there and slices stay nested.
    fn close_displaced(&mut self, cpu: u32, at: KTime) -> io::Result<()> {
        let gone: Vec<u32> = self
            .open
            .iter()
            .filter(|(_, o)| o.event.meta.cpu == cpu)
            .map(|(t, _)| *t)
            .collect();
        for t in gone {
            if let Some(o) = self.open.remove(&t) {
                self.slice(&o.event, at, None, "not seen (the CPU went on)")?;
            }
        }
        Ok(())
    }

    fn record(&mut self, r: &Record) -> io::Result<()> {
        match r {
            Record::Event(e) => self.event(e),
            Record::Lost(l) => {
                self.last_ts = self.last_ts.max(l.after);
                self.emit(&json!({
                    "ph": "i", "s": "g", "cat": "loss", "name": "events lost",
                    "pid": PID_CPUS, "tid": 0, "ts": us(l.after),
                    "args": {"ringbuf_full": l.ringbuf_full, "missed": l.missed,
                             "undecodable": l.undecodable},
                }))
            }
            Record::Stack(_) | Record::Device(_) => Ok(()),
        }
    }

    fn event(&mut self, e: &Event) -> io::Result<()> {
        self.last_ts = self.last_ts.max(e.meta.ts);
        self.lane(e.meta.cpu)?;
        match &e.payload {
            Payload::Submit(_) => {
                self.close_displaced(e.meta.cpu, e.meta.ts)?;
                if let Some(o) = self.open.remove(&e.meta.tid) {
                    // Same thread, no return in between: that return was lost.
                    self.slice(&o.event, e.meta.ts, None, "lost")?;
                }
                self.open.insert(e.meta.tid, Open { event: e.clone() });
                Ok(())
            }
            Payload::SubmitReturn(r) => match self.open.remove(&e.meta.tid) {
                Some(o) => self.slice(&o.event, e.meta.ts, Some(r.ret), ""),
                // A return without its entry: an instant, so that it is not silently dropped.
                None => self.instant(e, "invalidation"),
            },
            Payload::KernelLog(_) => self.instant(e, "kernel-log"),
            Payload::DevTlbFlush(_) => self.instant(e, "invalidation"),
            _ => self.instant(e, "hotplug"),
        }
    }

    fn instant(&mut self, e: &Event, cat: &str) -> io::Result<()> {
        self.emit(&json!({
            "ph": "i", "s": "t", "cat": cat, "name": kind_name(e.payload.kind()),
            "pid": PID_CPUS, "tid": e.meta.cpu, "ts": us(e.meta.ts),
            "args": {"task": e.meta.comm.as_str(), "tid": e.meta.tid,
                     "detail": describe::detail(e)},
        }))
    }

    /// Submissions still open at the end of the trace: slices to the trace's last event.
    fn finish_open(&mut self) -> io::Result<()> {
        let open = std::mem::take(&mut self.open);
        let end = self.last_ts;
        for (_, o) in open {
            self.slice(&o.event, end, None, "not seen before the trace ended")?;
        }
        Ok(())
    }

    fn incidents(&mut self, incidents: &[Incident]) -> io::Result<()> {
        self.emit(
            &json!({"ph": "M", "name": "process_name", "pid": PID_INCIDENTS,
                          "args": {"name": "itewatch incidents"}}),
        )?;
        self.emit(
            &json!({"ph": "M", "name": "process_sort_index", "pid": PID_INCIDENTS,
                          "args": {"sort_index": 0}}),
        )?;
        for (lane, i) in incidents.iter().enumerate() {
            let lane = lane as u32;
            let title = format!(
                "{}{} {}",
                i.window.map(|w| format!("{w:?} ")).unwrap_or_default(),
                i.kind,
                i.device
                    .bdf
                    .map(|b| b.to_string())
                    .or(i.device.sid.map(|s| format!("SID {s}")))
                    .unwrap_or_default()
            );
            self.emit(
                &json!({"ph": "M", "name": "thread_name", "pid": PID_INCIDENTS,
                              "tid": lane, "args": {"name": title}}),
            )?;
            self.emit(&json!({
                "ph": "X", "cat": "incident", "name": title,
                "pid": PID_INCIDENTS, "tid": lane,
                "ts": us(i.start), "dur": us(KTime(i.end.0.saturating_sub(i.start.0))),
                "args": {
                    "id": i.id, "kind": i.kind, "window": i.window, "severity": i.severity,
                    "outcome": i.outcome, "partial": i.partial,
                    "explanation": i.explanation,
                    "fixes": i.fixes.iter()
                        .map(|f| format!("{} [{}] {}", f.commit, document::status_word(f.status), f.subject))
                        .collect::<Vec<_>>(),
                },
            }))?;
            // A flow arrow from the incident to each submission it is about (only those
            // whose slice is in this file).
            for s in &i.submissions {
                let Some(cpu) = self.placed.get(&(s.tid, s.start.0)).copied() else {
                    continue;
                };
                // Numeric ids: every trace-event reader takes those.
                self.flows += 1;
                let id = self.flows;
                self.emit(&json!({"ph": "s", "cat": "incident", "name": "submission",
                                  "id": id, "pid": PID_INCIDENTS, "tid": lane,
                                  "ts": us(i.start)}))?;
                self.emit(&json!({"ph": "f", "bp": "e", "cat": "incident",
                                  "name": "submission", "id": id, "pid": PID_CPUS,
                                  "tid": cpu, "ts": us(s.start)}))?;
            }
        }
        Ok(())
    }
}

/// `itewatch report TRACE --format perfetto`: reads the trace once, writing the CPU lanes as
/// it goes and the incidents at the end; returns the report document of the same pass.
pub fn report(path: &Path, out: &mut dyn Write) -> Result<ReportDocument, DocumentError> {
    write(document::open_trace(path)?, Some(path), out)
}

/// Writes the trace-event JSON of the trace `reader` reads; returns its report document.
pub fn write<R: BufRead>(
    reader: TraceReader<R>,
    path: Option<&Path>,
    out: &mut dyn Write,
) -> Result<ReportDocument, DocumentError> {
    out.write_all(b"{\"displayTimeUnit\":\"ns\",\"traceEvents\":[\n")?;
    let mut w = Writer {
        out,
        first: true,
        cpus: BTreeSet::new(),
        open: BTreeMap::new(),
        placed: BTreeMap::new(),
        last_ts: KTime(0),
        flows: 0,
    };
    w.emit(&json!({"ph": "M", "name": "process_name", "pid": PID_CPUS,
                   "args": {"name": "CPUs: qi_submit_sync, hot-plug, kernel log"}}))?;
    w.emit(
        &json!({"ph": "M", "name": "process_sort_index", "pid": PID_CPUS,
                   "args": {"sort_index": 1}}),
    )?;
    let mut failed: Option<io::Error> = None;
    let doc = document::from_trace_observed(
        reader,
        path,
        Config::default(),
        |r| {
            if failed.is_none() {
                if let Err(e) = w.record(r) {
                    failed = Some(e);
                }
            }
        },
        |_| {},
    );
    if let Some(e) = failed {
        return Err(e.into());
    }
    w.finish_open()?;
    w.incidents(&doc.incidents)?;
    let meta = json!({
        "tool": doc.tool, "schema_version": doc.schema_version, "source": doc.source,
        "host": doc.host, "loss": doc.loss,
    });
    let out = w.out;
    out.write_all(b"\n],\n\"metadata\":")?;
    serde_json::to_writer(&mut *out, &meta)?;
    out.write_all(b"}\n")?;
    Ok(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Sid;
    use crate::simulate::world::World;
    use crate::trace::{Source, TraceHeader, TraceWriter};

    /// The X slices on CPU lane `cpu`: (start µs, end µs, `args.return`).
    fn slices(recs: Vec<Record>, cpu: u64) -> Vec<(f64, f64, Value)> {
        let mut w = TraceWriter::new(
            Vec::new(),
            &TraceHeader::new(Source::Simulated {
                scenario: "test".into(),
                seed: 0,
            }),
        )
        .unwrap();
        for r in &recs {
            w.write_record(r).unwrap();
        }
        let bytes = w.finish().unwrap();
        let mut out = Vec::new();
        write(TraceReader::new(&bytes[..]).unwrap(), None, &mut out).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        v["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == PID_CPUS && e["tid"] == cpu)
            .map(|e| {
                let ts = e["ts"].as_f64().unwrap();
                (
                    ts,
                    ts + e["dur"].as_f64().unwrap(),
                    e["args"]["return"].clone(),
                )
            })
            .collect()
    }

    fn desc() -> [crate::event::RawDesc; 1] {
        [World::devtlb_desc(Sid(0x300), 0x1000, 0)]
    }

    // A submission whose return was lost, then another on the same CPU: the first slice ends
    // where the second starts, so the lane stays a stack a viewer can draw.
    #[test]
    fn a_lost_return_ends_the_slice_where_the_cpu_went_on() {
        let mut w = World::new(0, 1_000_000);
        w.submission(1_000_000, 0, 10, "a", 0, &desc(), 1, None);
        w.submission(1_005_000, 0, 11, "b", 0, &desc(), 1, Some((1_000, 0)));
        let s = slices(w.finish(), 0);
        assert_eq!(s.len(), 2, "{s:?}");
        assert_eq!((s[0].0, s[0].1), (1000.0, 1005.0), "{s:?}");
        assert_eq!(s[0].2, "not seen (the CPU went on)");
        assert_eq!((s[1].0, s[1].1), (1005.0, 1006.0));
        assert!(s[1].2.is_null(), "returned: no note");
    }

    #[test]
    fn a_submission_never_returned_lasts_to_the_end_of_the_trace() {
        let mut w = World::new(0, 1_000_000);
        w.submission(1_000_000, 1, 10, "a", 0, &desc(), 1, None);
        w.submission(1_002_000, 0, 11, "b", 0, &desc(), 1, Some((8_000, 0)));
        let s = slices(w.finish(), 1);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].0, s[0].1), (1000.0, 1010.0), "to the last event");
        assert_eq!(s[0].2, "not seen before the trace ended");
    }
}
