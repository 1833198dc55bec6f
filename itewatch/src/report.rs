//! `itewatch report TRACE`: runs the correlator over a trace and prints the verdicts.
//!
//! JSON (`--format json`) is one object:
//!
//! ```text
//! { "schema": "itewatch-report/0",
//!   "source": { "kind": "simulated", "scenario": .., "seed": .. } | { "kind": "live" },
//!   "trace": { "complete": bool, "records": n, "error": null | "..." },
//!   "incidents": [ Incident, .. ],        // final revision of each, by start time then id
//!   "summary": { "end": ns, "stats": {..}, "unreturned": [..] } }
//! ```
//!
//! `incidents[]` fields are those of [`crate::correlate::incident::Incident`] and are stable;
//! the full report document (host, probes) grows around them (docs/correlator.md).

use std::io::{self, BufRead, Write};
use std::path::Path;

use serde::Serialize;

use crate::correlate::incident::{Incident, Outcome};
use crate::correlate::{self, Config, Correlator, Stats};
use crate::event::KTime;
use crate::trace::{Source, TraceError, TraceReader};

pub const SCHEMA: &str = "itewatch-report/0";

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Json,
    Text,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "json" => Ok(Format::Json),
            "text" => Ok(Format::Text),
            other => Err(format!("unknown format {other:?} (json or text)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read the trace: {0}")]
    Trace(#[from] TraceError),
    #[error("cannot write the report: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode the report: {0}")]
    Json(#[from] serde_json::Error),
}

/// How reading the trace went.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceStatus {
    /// The trace had its end frame (the recorder stopped cleanly).
    pub complete: bool,
    pub records: u64,
    /// The damage that stopped the reader, if any; every record before it was used.
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReportSummary {
    pub end: KTime,
    pub stats: Stats,
    pub unreturned: Vec<crate::correlate::incident::SubmissionView>,
}

/// The report document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub source: Source,
    pub trace: TraceStatus,
    pub incidents: Vec<Incident>,
    pub summary: ReportSummary,
}

/// Correlates every record of a trace.
pub fn build<R: BufRead>(mut reader: TraceReader<R>, cfg: Config) -> Report {
    let source = reader.header().source.clone();
    let mut c = Correlator::new(cfg);
    let mut revisions = Vec::new();
    let mut records = 0u64;
    let mut error = None;
    loop {
        match reader.next_record() {
            Ok(Some(r)) => {
                records += 1;
                revisions.extend(c.push(&r));
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(e.to_string());
                break;
            }
        }
    }
    let complete = reader.finished().is_some();
    let mut summary = c.finish();
    revisions.append(&mut summary.incidents);
    Report {
        schema: SCHEMA,
        source,
        trace: TraceStatus {
            complete,
            records,
            error,
        },
        incidents: correlate::latest(revisions),
        summary: ReportSummary {
            end: summary.end,
            stats: summary.stats,
            unreturned: summary.unreturned,
        },
    }
}

/// Opens `path` and builds its report.
pub fn build_file(path: &Path, cfg: Config) -> Result<Report, ReportError> {
    Ok(build(TraceReader::open(path)?, cfg))
}

/// Writes the report in `format`.
pub fn write(report: &Report, format: Format, out: &mut dyn Write) -> Result<(), ReportError> {
    match format {
        Format::Json => {
            // Encode first, then write: an I/O error (a closed pipe) stays an I/O error.
            let mut bytes = serde_json::to_vec_pretty(report)?;
            bytes.push(b'\n');
            out.write_all(&bytes)?;
        }
        Format::Text => write_text(report, out)?,
    }
    Ok(())
}

/// `itewatch report TRACE --format F`.
pub fn run(path: &Path, format: Format, out: &mut dyn Write) -> Result<(), ReportError> {
    let report = build_file(path, Config::default())?;
    write(&report, format, out)
}

fn ms(ns: u64) -> String {
    format!("{:.3} ms", ns as f64 / 1e6)
}

fn outcome_text(o: &Outcome) -> String {
    match o.duration_ns() {
        Some(d) => format!("{} after {}", o.name(), ms(d)),
        None => o.name().to_string(),
    }
}

fn write_text(r: &Report, out: &mut dyn Write) -> io::Result<()> {
    match &r.source {
        Source::Live => writeln!(out, "trace: recorded live")?,
        Source::Simulated { scenario, seed } => {
            writeln!(out, "trace: simulated {scenario} seed {seed}")?
        }
    }
    writeln!(
        out,
        "{} records{}{}",
        r.trace.records,
        if r.trace.complete { "" } else { ", cut short" },
        r.trace
            .error
            .as_ref()
            .map(|e| format!(" (stopped at: {e})"))
            .unwrap_or_default()
    )?;
    if r.incidents.is_empty() {
        writeln!(out, "\nno incident")?;
    }
    for i in &r.incidents {
        let dev = match (i.device.bdf, i.device.sid) {
            (Some(b), _) => b.to_string(),
            (None, Some(s)) => format!("SID {s}"),
            (None, None) => "no device".to_string(),
        };
        writeln!(
            out,
            "\n[{}] {}{} {} {}{}{}",
            i.severity,
            i.kind,
            i.window.map(|w| format!(" ({w:?})")).unwrap_or_default(),
            dev,
            i.device
                .driver
                .as_ref()
                .map(|d| format!("driver {d} "))
                .unwrap_or_default(),
            i.device
                .slot
                .as_ref()
                .map(|s| format!("slot {s} "))
                .unwrap_or_default(),
            if i.partial { "PARTIAL" } else { "" }
        )?;
        writeln!(
            out,
            "  id {}  {} .. {}  {}",
            i.id,
            i.start,
            i.end,
            i.outcome.as_ref().map(outcome_text).unwrap_or_default()
        )?;
        writeln!(out, "  {}", i.explanation)?;
        for f in &i.fixes {
            writeln!(
                out,
                "  fix {} {:?} ({}): {}",
                f.commit, f.status, f.landed, f.subject
            )?;
        }
        for reason in &i.partial_reasons {
            writeln!(out, "  partial: {reason}")?;
        }
        for t in &i.timeline {
            writeln!(
                out,
                "    {} cpu{} {}[{}] {:<20} {}{}",
                t.ts,
                t.cpu,
                t.task,
                t.tid,
                t.event,
                t.detail,
                t.caller
                    .map(|c| format!(
                        "  <{}>",
                        serde_json::to_value(c)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default()
            )?;
        }
        if i.timeline_omitted > 0 {
            writeln!(out, "    ({} more events omitted)", i.timeline_omitted)?;
        }
    }
    let s = &r.summary.stats;
    writeln!(
        out,
        "\n{} events, {} submissions ({} device-TLB descriptors), {} lost-event markers, {} unreturned at the end",
        s.events, s.submissions, s.dev_tlb_descriptors, s.lost_markers, s.unreturned_at_end
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simulate::{generate, write_trace};

    #[test]
    fn a_simulated_trace_reports_its_incidents_in_both_formats() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w2.itw");
        let sim = generate("w2-notifier-after-disconnect", 4).unwrap();
        write_trace(&sim, &path).unwrap();
        let report = build_file(&path, Config::default()).unwrap();
        assert!(report.trace.complete);
        assert!(report
            .incidents
            .iter()
            .any(|i| i.kind == crate::correlate::incident::IncidentKind::FlushToGoneDevice));
        let mut json = Vec::new();
        write(&report, Format::Json, &mut json).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["incidents"][0]["window"], "W2");
        assert!(v["incidents"][0]["device"]["bdf"].is_string());
        assert!(v["incidents"][0]["device"]["sid"].is_number());
        let mut text = Vec::new();
        write(&report, Format::Text, &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("flush-to-gone-device (W2)"), "{text}");
    }
}
