//! The `e` key: writes the selected incident (or all of them) as the versioned report document
//! ([`ReportDocument`], docs/report-format.md, schema docs/report-schema.json), the same
//! document `itewatch report --format json` prints, so scripts and `itewatch::document::parse`
//! read both alike.
//!
//! The document is built from what the view holds now: the latest revision of each incident,
//! the header (host, kernel, IOMMU units, probes), the loss counters and the device snapshots
//! the stream carried (for the inventory). A view that has not reached the end of its stream
//! says so: `source.complete` and `loss.complete` are false.

use std::path::{Path, PathBuf};

use crate::correlate::incident::Incident;
use crate::document::{
    self, Capture, DocSource, DocumentError, Format, Host, IommuUnit, Loss, Probe, ReportDocument,
    Tool,
};
use crate::trace::Source;

use super::state::App;

/// What to export.
pub enum Selection<'a> {
    One(&'a Incident),
    All,
}

/// Where the view's stream comes from, as the document's `source` names it.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    /// Live, or the simulated scenario (of `--simulate`, or the one a replayed trace recorded).
    pub source: Source,
    /// The trace file played (`--replay`, or the bundled VM trace).
    pub path: Option<PathBuf>,
    /// Damage that stopped reading the trace file (every record before it was played).
    pub error: Option<String>,
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

/// The report document for `sel`, from what the view holds now.
pub fn document(app: &App, origin: &Origin, sel: Selection<'_>) -> ReportDocument {
    let incidents = match sel {
        Selection::One(i) => vec![i.clone()],
        Selection::All => app.all_incidents(),
    };
    let (kind, scenario, seed, simulated) = match &origin.source {
        Source::Live => ("live", None, None, false),
        Source::Simulated { scenario, seed } => {
            ("simulated", Some(scenario.clone()), Some(*seed), true)
        }
    };
    let stats = &app.snapshot.stats;
    let h = &app.header;
    let ats_seen = stats.dev_tlb_descriptors > 0 || !app.ats.is_empty();
    let end_ns = (app.snapshot.now.0 > 0).then_some(app.snapshot.now.0);
    let start_ns = app.first_ts.map(|t| t.0);
    ReportDocument {
        schema_version: document::SCHEMA_VERSION.into(),
        tool: Tool {
            name: "itewatch".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        },
        source: DocSource::Trace {
            path: origin.path.as_ref().map(|p| p.display().to_string()),
            origin: kind.into(),
            scenario,
            seed,
            complete: app.ended && origin.error.is_none(),
            records: stats.records,
            error: origin.error.clone(),
        },
        host: match &h.doc_host {
            Some(host) => Host {
                ats_in_use: if ats_seen {
                    Some(true)
                } else {
                    host.ats_in_use
                },
                ..host.clone()
            },
            None => fallback_host(h, simulated, ats_seen),
        },
        probes: h.probes.iter().map(Probe::from).collect(),
        capture: Capture {
            start_ns,
            end_ns,
            duration_ns: start_ns.zip(end_ns).map(|(s, e)| e.saturating_sub(s)),
            started_unix_s: None,
            clock: "CLOCK_MONOTONIC".into(),
        },
        loss: Loss {
            lost_ringbuf_full: app.lost_ringbuf,
            missed: app.missed,
            undecodable: app.undecodable,
            return_without_entry: 0,
            lost_markers: stats.lost_markers,
            complete: app.ended && origin.error.is_none(),
            unparsed_lines: 0,
            required_probes_missing: document::required_probes_missing(&origin.source, &h.probes),
            dev_tlb_without_stack: stats.dev_tlb_without_stack,
            unknown_task: h.decoder.unknown_task,
            unknown_iommu: h.decoder.unknown_iommu,
        },
        inventory: document::inventory_from_incidents(&incidents, &app.device_infos),
        fixes: document::summarize_fixes(&incidents),
        incidents,
    }
}

/// The host section from the view's header alone (a simulation, or a source that carries no
/// host facts).
fn fallback_host(h: &super::state::HeaderInfo, simulated: bool, ats_seen: bool) -> Host {
    Host {
        // A simulation has no host; the header then says "(simulated ..)".
        hostname: if simulated { None } else { opt(&h.host) },
        kernel_release: if simulated { None } else { opt(&h.kernel) },
        kernel_cmdline: None,
        cpu_model: None,
        iommu_units: h
            .iommus
            .iter()
            .map(|name| IommuUnit {
                name: name.clone(),
                version: None,
                address: None,
                cap: None,
                ecap: None,
                device_tlb: None,
                scalable_mode_supported: None,
                caching_mode: None,
            })
            .collect(),
        scalable_mode: None,
        ats_in_use: ats_seen.then_some(true),
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
    origin: &Origin,
    sel: Selection<'_>,
    dir: &Path,
) -> Result<PathBuf, DocumentError> {
    let n = app.all_incidents().len();
    let path = dir.join(file_name(&sel, n));
    let doc = document(app, origin, sel);
    let mut bytes = Vec::new();
    document::write(&doc, Format::Json, &mut bytes)?;
    // Written whole under a temporary name, then renamed: a reader never sees half a report,
    // and an earlier export of the same name stays as it was when this one fails.
    crate::output::write_file(&path, |w| {
        std::io::Write::write_all(w, &bytes)
            .map_err(|e| DocumentError::from(crate::output::WriteError::new(&path, e)))
    })?;
    Ok(std::path::absolute(&path).unwrap_or(path))
}
