//! `itewatch replay`: prints a trace, one record per line (text, or NDJSON with `--json`).
//!
//! A damaged or cut-short trace prints every record before the damage, then the error with
//! its byte offset (on stderr), and the command fails.

use std::io::Write;
use std::path::Path;

use crate::render::{record_json, record_line};
use crate::trace::{TraceError, TraceReader};

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
    for rec in reader.by_ref() {
        let rec = rec.map_err(|e| ReplayError::Trace {
            path: name(),
            after: summary.records,
            source: e,
        })?;
        summary.records += 1;
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
