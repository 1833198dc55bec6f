//! `itewatch report TRACE` and `itewatch analyze LOG`: build the report document
//! (`itewatch_core::document`) and write it where the command line says.

use std::io::{self, Write};
use std::path::Path;

use crate::analyze;
use crate::correlate::Config;
use crate::document::{
    from_analysis, from_trace, from_trace_file, header_document, ndjson_header, ndjson_incident,
    ndjson_summary, open_trace, write, DocumentError, Format, ReportDocument, StdoutKind,
    PERFETTO_NEEDS_A_TRACE,
};

/// `itewatch analyze [FILE|-]`: reads the log, writes the document.
pub fn analyze_cli(
    input: Option<&Path>,
    format: Format,
    out: &mut dyn Write,
) -> Result<ReportDocument, DocumentError> {
    if format == Format::Perfetto {
        return Err(DocumentError::Unsupported(PERFETTO_NEEDS_A_TRACE));
    }
    // Compressed logs are unpacked; a directory, a trace, binary data or nothing at all is
    // refused with its name (analyze/input.rs), never reported as "no incident".
    let (reader, name) = analyze::input::open(input)?;
    let a = analyze::analyze_read(reader, analyze::Options::default());
    let doc = from_analysis(a, name.as_deref());
    write(&doc, format, out)?;
    Ok(doc)
}

/// `itewatch report TRACE`: correlates the trace, writes the document.
pub fn report_cli(
    path: &Path,
    format: Format,
    out: &mut dyn Write,
) -> Result<ReportDocument, DocumentError> {
    if format == Format::Perfetto {
        return crate::perfetto::report(path, out);
    }
    if format != Format::Ndjson {
        let doc = from_trace_file(path, Config::default())?;
        write(&doc, format, out)?;
        return Ok(doc);
    }
    // NDJSON streams: the header at once, each incident's line when it closes (in the order
    // they close), the summary at the end. A long trace's first findings come out early.
    let reader = open_trace(path)?;
    let header = reader.header().clone();
    let start = header_document(&header, Some(path.display().to_string()), false);
    out.write_all(&ndjson_header(&start)?)?;
    out.flush()?;
    let mut failed: Option<DocumentError> = None;
    let mut written = std::collections::BTreeSet::new();
    let doc = from_trace(reader, Some(path), Config::default(), |i| {
        if failed.is_some() || !written.insert(i.id.clone()) {
            return;
        }
        if let Err(e) = ndjson_incident(i).and_then(|l| {
            out.write_all(&l)?;
            out.flush()?;
            Ok(())
        }) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    out.write_all(&ndjson_summary(&doc)?)?;
    Ok(doc)
}

/// Runs `produce` against the CLI's destination: `-o FILE` (a JSON document unless told
/// otherwise; the file is replaced only once the whole report is written, so a failure leaves
/// an existing file as it was), `-o -` (the same, on stdout) or stdout (text on a terminal or
/// redirected to a file, NDJSON on a pipe, unless told otherwise).
pub fn cli_output(
    output: Option<&Path>,
    format: Option<Format>,
    produce: impl FnOnce(Format, &mut dyn Write) -> Result<ReportDocument, DocumentError>,
) -> Result<ReportDocument, DocumentError> {
    match output {
        Some(p) if !itewatch_core::output::is_stdout(p) => {
            itewatch_core::output::write_file(p, |w| {
                // Everything `produce` writes goes to this file: an I/O error is a write of it.
                produce(format.unwrap_or(Format::Json), w).map_err(|e| match e {
                    DocumentError::Io(source) => {
                        itewatch_core::output::WriteError::new(p, source).into()
                    }
                    e => e,
                })
            })
        }
        _ => {
            let fmt = format
                .unwrap_or_else(|| Format::default_for(output.is_some(), StdoutKind::detect()));
            let mut w = io::BufWriter::new(io::stdout().lock());
            let doc = produce(fmt, &mut w)?;
            w.flush()?;
            Ok(doc)
        }
    }
}
