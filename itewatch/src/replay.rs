//! `itewatch replay`: prints a trace, one record per line (text, or NDJSON with `--json`).
//!
//! A damaged or cut-short trace prints every record before the damage, then the error with
//! its byte offset (on stderr), and the command fails.

use std::io::Write;
use std::path::Path;

use crate::event::{Payload, Record};
use crate::render::{record_json, record_line};
use crate::trace::{TraceError, TraceReader};
use itewatch_core::pairing::Pairing;

/// Submissions tracked for pairing with their return (per thread, nested ones included).
const MAX_PAIRING: usize = 4096;

/// Outcome of a replay that read the whole file.
#[derive(Debug, Default)]
pub struct ReplaySummary {
    pub records: u64,
    /// False when the trace has no end frame (the recorder was killed or the host died).
    pub complete: bool,
}

/// Prints the trace header (as a first JSON object or a `#` comment line) and every record.
pub fn run(path: &Path, json: bool, out: &mut dyn Write) -> Result<ReplaySummary, ReplayError> {
    let name = || path.display().to_string();
    let mut reader = TraceReader::open(path).map_err(|source| ReplayError::Open {
        path: name(),
        source,
    })?;
    let header = serde_json::to_value(reader.header()).unwrap_or_default();
    if json {
        writeln!(
            out,
            "{}",
            serde_json::json!({ "record": "header", "header": header })
        )?;
    } else {
        writeln!(out, "# {}", header)?;
    }
    let mut summary = ReplaySummary::default();
    // Compact (ABI 3) returns carry no start time: they are paired with their submission by
    // the thread they ran on, as the correlator and the agent pair them, so that a return
    // prints its latency instead of claiming its entry was not seen.
    let mut pairing: Pairing<()> = Pairing::new(MAX_PAIRING);
    for rec in reader.by_ref() {
        let mut rec = rec.map_err(|e| ReplayError::Trace {
            path: name(),
            after: summary.records,
            source: e,
        })?;
        summary.records += 1;
        match &mut rec {
            Record::Event(e) => match &mut e.payload {
                Payload::Submit(_) => {
                    pairing.open(&e.meta, ());
                }
                Payload::SubmitReturn(r) => {
                    if let Some((start, ())) = pairing.close(&e.meta) {
                        r.start = r.start.or(Some(start));
                    }
                }
                _ => {}
            },
            Record::Lost(_) => pairing.mark_lost(),
            _ => {}
        }
        if json {
            writeln!(out, "{}", record_json(&rec))?;
        } else {
            writeln!(out, "{}", record_line(&rec))?;
        }
    }
    summary.complete = reader.finished().is_some();
    if let Some(end) = reader.finished() {
        if json {
            writeln!(
                out,
                "{}",
                serde_json::json!({ "record": "end", "end": end })
            )?;
        } else {
            writeln!(
                out,
                "# end: {}",
                serde_json::to_string(end).unwrap_or_default()
            )?;
        }
    }
    Ok(summary)
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("cannot read {path}: {source}")]
    Open { path: String, source: TraceError },
    #[error("cannot read {path} past record {after}: {source} (the {after} records before it were printed)")]
    Trace {
        path: String,
        after: u64,
        source: TraceError,
    },
    // Not `transparent`: the io::Error must stay in the source chain so that a closed pipe
    // (`itewatch replay t.itw | head`) is recognised and exits 0.
    #[error("writing the output: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_records::{ev, ret, submit};
    use crate::trace::{Source, TraceHeader, TraceWriter};

    /// A return without a start time (what ABI 3 probes send) is paired with its thread's
    /// submission and prints its latency; one whose submission is not in the trace says so.
    #[test]
    fn returns_are_paired_with_their_submission_by_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.itw");
        let mut w = TraceWriter::new(
            std::fs::File::create(&path).unwrap(),
            &TraceHeader::new(Source::Live),
        )
        .unwrap();
        for r in [
            ev(100, 5, submit(0x200)),
            ev(350, 5, ret()),
            ev(400, 6, ret()),
        ] {
            w.write_record(&r).unwrap();
        }
        w.finish().unwrap();
        let mut out = Vec::new();
        run(&path, false, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("submit-return ret=0 latency=250ns"), "{text}");
        assert_eq!(text.matches("(entry not seen)").count(), 1, "{text}");
    }
}
