//! The `e` key: writes the selected incident (or all of them) as the JSON report
//! (`report::Report`, schema `itewatch-report/0`), the same document `itewatch report
//! --format json` prints, so scripts read both alike.

use std::path::{Path, PathBuf};

use crate::correlate::incident::Incident;
use crate::report::{self, Format, Report, ReportError, ReportSummary, TraceStatus};
use crate::trace::Source;

use super::state::App;

/// What to export.
pub enum Selection<'a> {
    One(&'a Incident),
    All,
}

/// The report document for `sel`, from what the view holds now.
pub fn document(app: &App, source: &Source, sel: Selection<'_>) -> Report {
    let incidents = match sel {
        Selection::One(i) => vec![i.clone()],
        Selection::All => app.all_incidents(),
    };
    Report {
        schema: report::SCHEMA,
        source: source.clone(),
        trace: TraceStatus {
            complete: app.ended,
            records: app.snapshot.stats.records,
            error: None,
        },
        incidents,
        summary: ReportSummary {
            end: app.snapshot.now,
            stats: app.snapshot.stats.clone(),
            unreturned: app.snapshot.inflight.clone(),
        },
    }
}

/// File name: `itewatch-incident-<id>.json` or `itewatch-incidents-<n>.json`.
pub fn file_name(sel: &Selection<'_>, n: usize) -> String {
    match sel {
        Selection::One(i) => format!("itewatch-incident-{}.json", i.id),
        Selection::All => format!("itewatch-incidents-{n}.json"),
    }
}

/// Writes the document into `dir`; returns the path written.
pub fn export(
    app: &App,
    source: &Source,
    sel: Selection<'_>,
    dir: &Path,
) -> Result<PathBuf, ReportError> {
    let n = app.all_incidents().len();
    let path = dir.join(file_name(&sel, n));
    let doc = document(app, source, sel);
    let mut bytes = Vec::new();
    report::write(&doc, Format::Json, &mut bytes)?;
    // Write to a temporary name and rename: a reader never sees half a report.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &path)?;
    Ok(std::path::absolute(&path).unwrap_or(path))
}
