//! The report document: its checked-in JSON Schema is the one the types generate, and every
//! document `report` and `analyze` produce validates against it, in every format.

use std::path::{Path, PathBuf};

use itewatch::analyze::{analyze_bytes, Options};
use itewatch::correlate::Config;
use itewatch::document::{self, Format, ReportDocument};
use itewatch::report;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn schema_path() -> PathBuf {
    root().join("../docs/report-schema.json")
}

#[test]
fn checked_in_schema_is_current() {
    let now = document::schema_json();
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(schema_path(), &now).unwrap();
    }
    let on_disk = std::fs::read_to_string(schema_path()).unwrap_or_default();
    assert!(
        on_disk == now,
        "docs/report-schema.json is stale: run `UPDATE_SCHEMA=1 cargo test -p itewatch --test report_document`"
    );
}

fn validator() -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(&document::schema_json()).unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn check(v: &jsonschema::Validator, doc: &ReportDocument, what: &str) {
    let json = serde_json::to_value(doc).unwrap();
    let errors: Vec<String> = v
        .iter_errors(&json)
        .map(|e| format!("{e} at {}", e.instance_path))
        .collect();
    assert!(errors.is_empty(), "{what}: {errors:#?}");
    // Round trip through the reader.
    let text = serde_json::to_string(doc).unwrap();
    let back = document::parse(&text).unwrap();
    assert_eq!(back.incidents.len(), doc.incidents.len(), "{what}");
    // Every format renders.
    for f in [Format::Json, Format::Ndjson, Format::Text, Format::Markdown] {
        let mut out = Vec::new();
        document::write(doc, f, &mut out).unwrap();
        assert!(!out.is_empty());
        if f == Format::Ndjson {
            let lines: Vec<serde_json::Value> = String::from_utf8(out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(lines.len(), doc.incidents.len() + 2, "{what}");
            assert_eq!(lines[0]["record"], "header");
            assert_eq!(lines.last().unwrap()["record"], "summary");
        }
    }
}

#[test]
fn every_corpus_log_report_validates() {
    let v = validator();
    let dir = root().join("tests/data/logs");
    let mut n = 0;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.push(root().join("tests/data/vm/6.1/dmesg.txt"));
    paths.push(root().join("tests/data/vm/6.12/dmesg.txt"));
    for p in paths {
        if p.extension().is_some_and(|e| e == "json") {
            continue;
        }
        let a = analyze_bytes(&std::fs::read(&p).unwrap(), Options::default());
        let doc = document::from_analysis(a, p.file_name().and_then(|n| n.to_str()));
        check(&v, &doc, &p.display().to_string());
        n += 1;
    }
    assert!(n > 20);
}

#[test]
fn trace_reports_validate_and_carry_host_probes_and_fixes() {
    let v = validator();
    let dir = tempfile::tempdir().unwrap();
    for s in [
        "w2-notifier-after-disconnect",
        "w1-driver-inflight",
        "ite-sid-zero",
        "benign",
    ] {
        let path = dir.path().join(format!("{s}.itw"));
        let sim = itewatch::simulate::generate(s, 3).unwrap();
        itewatch::simulate::write_trace(&sim, &path).unwrap();
        let doc = document::from_trace_file(&path, Config::default()).unwrap();
        check(&v, &doc, s);
        if s != "benign" {
            assert!(!doc.incidents.is_empty(), "{s}");
            assert!(!doc.fixes.is_empty(), "{s}");
        }
    }
    for k in ["6.1", "6.12"] {
        let p = root().join(format!("tests/data/vm/{k}/trace.itw"));
        let doc = document::from_trace_file(&p, Config::default()).unwrap();
        check(&v, &doc, k);
        assert!(doc.host.kernel_release.is_some(), "{k}");
        assert!(!doc.probes.is_empty(), "{k}");
    }
}

#[test]
fn the_fixes_carry_what_the_recording_kernels_code_showed() {
    use itewatch::trace::{KernelFixStatus, TraceReader, TraceWriter};
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("w2.itw");
    let sim = itewatch::simulate::generate("w2-notifier-after-disconnect", 2).unwrap();
    itewatch::simulate::write_trace(&sim, &plain).unwrap();
    // Without `kernel_fixes` (every trace before it): no kernel_code on any fix.
    let doc = document::from_trace_file(&plain, Config::default()).unwrap();
    assert!(!doc.fixes.is_empty());
    assert!(doc.fixes.iter().all(|f| f.kernel_code.is_none()));
    let mut r = TraceReader::open(&plain).unwrap();
    let mut header = r.header().clone();
    header.kernel_fixes = doc
        .fixes
        .iter()
        .enumerate()
        .map(|(i, f)| KernelFixStatus {
            commit: f.commit.clone(),
            status: if i == 0 { "absent" } else { "unknown" }.into(),
            evidence: "test".into(),
        })
        .collect();
    let with = dir.path().join("w2-code.itw");
    let mut w = TraceWriter::create(&with, &header).unwrap();
    while let Some(rec) = r.next_record().unwrap() {
        w.write_record(&rec).unwrap();
    }
    w.finish().unwrap();
    let doc = document::from_trace_file(&with, Config::default()).unwrap();
    check(&validator(), &doc, "w2 with kernel_fixes");
    assert_eq!(doc.fixes[0].kernel_code.as_deref(), Some("absent"));
    assert!(doc.fixes[1..]
        .iter()
        .all(|f| f.kernel_code.as_deref() == Some("unknown")));
    let text = document::render_text(&doc);
    assert!(text.contains("this kernel's code: absent"), "{text}");
}

#[test]
fn a_trace_with_recorded_hardware_fills_the_host_section() {
    use itewatch::trace::{HostHardware, HostIommu, TraceReader, TraceWriter};
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("w2.itw");
    let sim = itewatch::simulate::generate("w2-notifier-after-disconnect", 2).unwrap();
    itewatch::simulate::write_trace(&sim, &plain).unwrap();
    // Without `hardware` (as every trace before it): CPU and units unknown, not invented.
    let doc = document::from_trace_file(&plain, Config::default()).unwrap();
    assert_eq!(doc.host.cpu_model, None);
    assert!(doc.host.iommu_units.is_empty());
    assert_eq!(doc.host.scalable_mode, None);
    // Rewrite it with the recorder's hardware facts in the header.
    let mut r = TraceReader::open(&plain).unwrap();
    let mut header = r.header().clone();
    header.hardware = Some(HostHardware {
        cpu_model: Some("Intel(R) Xeon(R) Platinum 8480+".into()),
        iommu_units: vec![HostIommu {
            name: "dmar7".into(),
            kind: "intel-iommu".into(),
            version: Some("4:0".into()),
            address: Some("ee7fc000".into()),
            cap: Some("9ed008c40780466".into()),
            ecap: Some("3ee9e86f050df".into()),
        }],
        scalable_mode: Some(true),
        scalable_mode_basis: Some("intel_iommu=sm_on on the command line".into()),
        ats_in_use: Some(true),
    });
    let with_hw = dir.path().join("w2-hw.itw");
    let mut w = TraceWriter::create(&with_hw, &header).unwrap();
    while let Some(rec) = r.next_record().unwrap() {
        w.write_record(&rec).unwrap();
    }
    w.finish().unwrap();
    let doc = document::from_trace_file(&with_hw, Config::default()).unwrap();
    check(&validator(), &doc, "w2 with hardware");
    assert_eq!(
        doc.host.cpu_model.as_deref(),
        Some("Intel(R) Xeon(R) Platinum 8480+")
    );
    assert_eq!(doc.host.scalable_mode, Some(true));
    assert_eq!(doc.host.ats_in_use, Some(true));
    let u = &doc.host.iommu_units[0];
    assert_eq!(u.name, "dmar7");
    assert_eq!(u.cap.as_deref(), Some("9ed008c40780466"));
    assert_eq!(u.device_tlb, Some(true));
    assert_eq!(u.scalable_mode_supported, Some(true));
    assert_eq!(u.address, Some(0xee7f_c000));
    let text = document::render_text(&doc);
    assert!(
        text.contains("cpu Intel(R) Xeon(R) Platinum 8480+"),
        "{text}"
    );
    assert!(text.contains("dmar7 ver 4:0 cap 9ed008c40780466"), "{text}");
}

#[test]
fn a_cut_trace_names_its_byte_offset_and_keeps_what_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w2.itw");
    let sim = itewatch::simulate::generate("w2-notifier-after-disconnect", 1).unwrap();
    itewatch::simulate::write_trace(&sim, &path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let cut = bytes.len() * 2 / 3;
    bytes.truncate(cut);
    bytes[cut - 3] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    let doc = document::from_trace_file(&path, Config::default()).unwrap();
    match &doc.source {
        document::DocSource::Trace {
            complete,
            records,
            error,
            ..
        } => {
            assert!(!complete);
            assert!(*records > 0);
            assert!(error.as_deref().unwrap_or("").contains("byte"), "{error:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!doc.loss.complete);
}

#[test]
fn readers_accept_older_minor_versions_and_refuse_other_majors() {
    let a = analyze_bytes(
        b"[ 1.000000] DMAR: VT-d detected Invalidation Time-out Error: SID 100\n",
        Options::default(),
    );
    let doc = document::from_analysis(a, None);
    let mut v = serde_json::to_value(&doc).unwrap();
    v["schema_version"] = "2.0".into();
    v["a_field_from_2_7"] = 5.into();
    assert!(document::parse(&v.to_string()).is_ok());
    v["schema_version"] = "3.0".into();
    assert!(document::parse(&v.to_string()).is_err());
}

#[test]
fn a_1x_document_with_the_old_field_names_still_reads() {
    // Schema 2.0 renamed the raw times (`start` → `start_ns`, `ts` → `ts_ns`, ..), dropped
    // `case` (the window says it) and `device.device` (→ `device_id`); 1.x documents read.
    let t = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vm/6.12/trace.itw");
    let doc = document::from_trace_file(&t, Config::default()).unwrap();
    let mut v = serde_json::to_value(&doc).unwrap();
    let new = v.to_string();
    assert!(new.contains("\"start_ns\"") && !new.contains("\"case\""));
    v["schema_version"] = "1.3".into();
    for i in v["incidents"].as_array_mut().unwrap() {
        let o = i.as_object_mut().unwrap();
        for (new, old) in [("start_ns", "start"), ("end_ns", "end")] {
            let x = o.remove(new).unwrap();
            o.insert(old.into(), x);
        }
        o.insert("case".into(), 2.into());
        let d = o["device"].as_object_mut().unwrap();
        let x = d.remove("device_id").unwrap();
        d.insert("device".into(), x);
        for e in o["timeline"].as_array_mut().unwrap() {
            let e = e.as_object_mut().unwrap();
            let x = e.remove("ts_ns").unwrap();
            e.insert("ts".into(), x);
        }
    }
    let old = document::parse(&v.to_string()).expect("a 1.3 document reads");
    assert_eq!(old.incidents.len(), doc.incidents.len());
    for (a, b) in old.incidents.iter().zip(&doc.incidents) {
        assert_eq!(a.start, b.start);
        assert_eq!(a.end, b.end);
        assert_eq!(a.device.device_id, b.device.device_id);
        assert_eq!(a.timeline, b.timeline);
        assert_eq!(a.case(), Some(2));
    }
}

#[test]
fn default_format_is_a_document_for_files_text_for_terminals_ndjson_for_pipes() {
    use document::StdoutKind::*;
    for s in [Terminal, Pipe, File] {
        assert_eq!(Format::default_for(true, s), Format::Json);
    }
    assert_eq!(Format::default_for(false, Terminal), Format::Text);
    assert_eq!(Format::default_for(false, File), Format::Text);
    assert_eq!(Format::default_for(false, Pipe), Format::Ndjson);
}

// Regression: `itewatch report t.itw > r.txt` wrote NDJSON where the terminal had shown text.
// The real binary, its stdout a regular file, then a pipe.
#[test]
fn report_redirected_to_a_file_keeps_text_and_a_pipe_gets_ndjson() {
    let d = tempfile::tempdir().unwrap();
    let trace = root().join("tests/data/vm/6.1/trace.itw");
    let out = d.path().join("r.txt");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .arg("report")
        .arg(&trace)
        .stdout(std::fs::File::create(&out).unwrap())
        .status()
        .unwrap();
    assert!(st.success());
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.starts_with("itewatch 0.1.0 report (schema "), "{text}");
    let piped = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .arg("report")
        .arg(&trace)
        .output()
        .unwrap();
    let first = String::from_utf8(piped.stdout).unwrap();
    let first: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(first["record"], "header");
}

/// `report --format ndjson` streams: a header with what is known before reading, each
/// incident's verdict once (as it closes), then the summary with the rest. Together the lines
/// say what the whole document says.
#[test]
fn streamed_ndjson_says_what_the_document_says() {
    let dir = tempfile::tempdir().unwrap();
    let mut traces = vec![
        root().join("tests/data/vm/6.1/trace.itw"),
        root().join("tests/data/vm/6.12/trace.itw"),
    ];
    for (name, seed) in [("w1-driver-inflight", 3), ("hang-then-hotplug", 1)] {
        let sim = itewatch::simulate::generate(name, seed).unwrap();
        let p = dir.path().join(format!("{name}.itw"));
        let mut w = itewatch::trace::TraceWriter::create(
            &p,
            &itewatch::trace::TraceHeader::new(itewatch::trace::Source::Simulated {
                scenario: name.into(),
                seed,
            }),
        )
        .unwrap();
        for r in &sim.records {
            w.write_record(r).unwrap();
        }
        w.finish().unwrap();
        traces.push(p);
    }
    for t in &traces {
        let mut out = Vec::new();
        let doc = report::report_cli(t, Format::Ndjson, &mut out).unwrap();
        let lines: Vec<serde_json::Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let what = t.display();
        assert_eq!(lines.len(), doc.incidents.len() + 2, "{what}");
        let (header, summary) = (&lines[0], lines.last().unwrap());
        assert_eq!(header["record"], "header");
        assert_eq!(header["schema_version"], document::SCHEMA_VERSION);
        assert!(
            header.get("capture").is_none(),
            "{what}: known only at the end"
        );
        assert!(header["source"].get("records").is_none(), "{what}");
        assert_eq!(header["probes"], serde_json::to_value(&doc.probes).unwrap());
        assert_eq!(summary["record"], "summary");
        assert_eq!(
            summary["source"],
            serde_json::to_value(&doc.source).unwrap()
        );
        assert_eq!(
            summary["capture"],
            serde_json::to_value(&doc.capture).unwrap()
        );
        assert_eq!(summary["fixes"], serde_json::to_value(&doc.fixes).unwrap());
        assert_eq!(summary["incidents"], doc.incidents.len());
        // Each incident once, as its final revision (the order is the order they closed).
        let mut streamed: Vec<serde_json::Value> = lines[1..lines.len() - 1].to_vec();
        let mut want: Vec<serde_json::Value> = doc
            .incidents
            .iter()
            .map(|i| {
                let mut v = serde_json::to_value(i).unwrap();
                v["record"] = "incident".into();
                v
            })
            .collect();
        let key = |v: &serde_json::Value| v["id"].as_str().unwrap_or_default().to_string();
        streamed.sort_by_key(key);
        want.sort_by_key(key);
        assert_eq!(streamed, want, "{what}");
    }
}

/// Streamed for real: fed through a FIFO that holds only the trace up to the record that
/// closes its incident, `report --format ndjson` has already written that incident's line
/// while the rest of the trace is still to come.
#[test]
fn ndjson_incidents_come_out_before_the_trace_ends() {
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Duration;

    // The storm stream (an incident scenario per chunk): incidents close mid-stream.
    let mut stream = itewatch::simulate::LongStream::new(1, 150_000);
    stream.incident_every = 1;
    let mut w = itewatch::trace::TraceWriter::new(
        Vec::new(),
        &itewatch::trace::TraceHeader::new(itewatch::trace::Source::Simulated {
            scenario: "storm".into(),
            seed: 1,
        }),
    )
    .unwrap();
    for rec in stream {
        w.write_record(&rec).unwrap();
    }
    let bytes = w.finish().unwrap();
    // The byte offset just after the record whose processing closes the first incident.
    let mut r = itewatch::trace::TraceReader::new(&bytes[..]).unwrap();
    let mut c = itewatch::correlate::Correlator::new(Config::default());
    let mut cut = None;
    while let Some(rec) = r.next_record().unwrap() {
        if c.push_owned(rec).iter().any(|i| i.closed) {
            cut = Some(r.offset() as usize);
            break;
        }
    }
    let cut = cut.expect("an incident closes before the trace ends");
    assert!(cut + 1000 < bytes.len(), "records follow the verdict");

    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("trace.itw");
    let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);

    /// Sends each complete line written to it.
    struct Lines(mpsc::Sender<String>, Vec<u8>);
    impl Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.1.extend_from_slice(b);
            while let Some(n) = self.1.iter().position(|&c| c == b'\n') {
                let line: Vec<u8> = self.1.drain(..=n).collect();
                let _ = self
                    .0
                    .send(String::from_utf8_lossy(&line).trim().to_string());
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let (tx, rx) = mpsc::channel();
    let path = fifo.clone();
    let report = std::thread::spawn(move || {
        let mut out = Lines(tx, Vec::new());
        report::report_cli(&path, Format::Ndjson, &mut out).map(|d| d.incidents.len())
    });
    let mut w = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    w.write_all(&bytes[..cut]).unwrap();
    w.flush().unwrap();
    let kind = |line: &str| -> String {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        v["record"].as_str().unwrap_or_default().to_string()
    };
    let wait = Duration::from_secs(20);
    assert_eq!(kind(&rx.recv_timeout(wait).unwrap()), "header");
    let line = rx
        .recv_timeout(wait)
        .expect("the incident's line before the rest of the trace");
    assert_eq!(kind(&line), "incident");
    w.write_all(&bytes[cut..]).unwrap();
    drop(w);
    let incidents = report.join().unwrap().unwrap();
    let rest: Vec<String> = rx.iter().collect();
    assert_eq!(
        rest.len(),
        incidents,
        "every other incident, then the summary"
    );
    assert_eq!(kind(rest.last().unwrap()), "summary");
}

/// Regression (issue: blind but "live"): a live recording with only an optional probe
/// attached reported "no incident" as if it had looked. Every report of it now says it is
/// blind: a field in JSON, a BLIND line in text and markdown.
#[test]
fn a_recording_without_its_required_probes_is_reported_blind() {
    use itewatch::trace::{ProbeStatus, Source, TraceHeader, TraceReader, TraceWriter};
    let mut header = TraceHeader::new(Source::Live);
    header.probes = vec![ProbeStatus {
        name: "printk:console".into(),
        state: "attached".into(),
        mechanism: Some("tracepoint".into()),
        detail: None,
    }];
    // The report of a trace holding only `header`.
    let report = |header: &TraceHeader| {
        let bytes = TraceWriter::new(Vec::new(), header)
            .unwrap()
            .finish()
            .unwrap();
        document::from_trace(
            TraceReader::new(&bytes[..]).unwrap(),
            None,
            Config::default(),
            |_| {},
        )
    };
    let doc = report(&header);
    assert!(doc.incidents.is_empty());
    assert!(
        doc.loss
            .required_probes_missing
            .iter()
            .any(|p| p == "qi_submit_sync"),
        "{:?}",
        doc.loss.required_probes_missing
    );
    assert!(document::render_text(&doc).contains("BLIND: required probes missing"));
    assert!(document::render_markdown(&doc).contains("**BLIND**"));
    // A simulated trace carries no probes and is not blind.
    let sim = TraceHeader::new(Source::Simulated {
        scenario: "benign".into(),
        seed: 0,
    });
    assert!(report(&sim).loss.required_probes_missing.is_empty());
}

// Regression: `report -o FILE` truncated FILE before the trace was read, so a report that
// failed destroyed the previous one; and the failure said "cannot read" the file it was
// writing.
#[test]
fn a_failed_report_leaves_an_existing_output_file_untouched() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("report.json");
    std::fs::write(&out, "the previous report").unwrap();
    let missing = d.path().join("no-such-trace.itw");
    let e = report::cli_output(Some(&out), None, |f, w| report::report_cli(&missing, f, w))
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("cannot read ") && text.contains("no-such-trace.itw"),
        "{text}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "the previous report"
    );
    // Rendering that fails half-way: what was written never reaches the file.
    let e = report::cli_output(Some(&out), None, |_, w| {
        w.write_all(b"{ half a report").unwrap();
        Err(document::DocumentError::Version("9.0".into()))
    })
    .unwrap_err();
    assert!(matches!(e, document::DocumentError::Version(_)), "{e}");
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "the previous report"
    );
    let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
    assert_eq!(names.len(), 1, "no temporary file is left behind");
}

#[test]
fn a_report_that_cannot_be_written_says_writing_and_names_the_file() {
    let d = tempfile::tempdir().unwrap();
    let trace = d.path().join("w1.itw");
    let sim = itewatch::simulate::generate("w1-driver-inflight", 1).unwrap();
    itewatch::simulate::write_trace(&sim, &trace).unwrap();
    let out = d.path().join("no-such-dir").join("report.json");
    let e =
        report::cli_output(Some(&out), None, |f, w| report::report_cli(&trace, f, w)).unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("cannot write ") && text.contains("no-such-dir/report.json"),
        "{text}"
    );
}

// Regression: the markdown IOMMU table printed `Some(true)` / `Some(false)`.
#[test]
fn the_markdown_iommu_table_says_yes_and_no() {
    let doc = document::from_trace_file(
        &root().join("tests/data/vm/6.1/trace.itw"),
        Config::default(),
    )
    .unwrap();
    let md = document::render_markdown(&doc);
    assert!(!md.contains("Some("), "{md}");
    assert!(!md.contains("None"), "{md}");
    assert!(
        md.contains("| dmar0 | 1:0 | d2008c22260206 | f00f4e | yes | no |"),
        "{md}"
    );
}

// ----- --format perfetto ---------------------------------------------------------------------

fn perfetto_of(trace: &Path) -> serde_json::Value {
    let mut out = Vec::new();
    report::report_cli(trace, Format::Perfetto, &mut out).unwrap();
    serde_json::from_slice(&out).expect("perfetto output is one JSON document")
}

/// What the trace itself holds, read independently of the writer: CPUs with events, and the
/// submissions (thread, start) per CPU.
fn trace_facts(trace: &Path) -> (std::collections::BTreeSet<u64>, usize) {
    use itewatch::event::{Payload, Record};
    let mut cpus = std::collections::BTreeSet::new();
    let mut submits = 0;
    for r in itewatch::trace::TraceReader::open(trace).unwrap() {
        if let Ok(Record::Event(e)) = r {
            cpus.insert(u64::from(e.meta.cpu));
            if matches!(e.payload, Payload::Submit(_)) {
                submits += 1;
            }
        }
    }
    (cpus, submits)
}

/// A slice of a lane: start, end (µs), name.
type Slice = (f64, f64, String);

/// The trace-event format's required fields, per phase, and that the slices of each lane
/// nest (a viewer draws a lane as a stack: two slices that half overlap break it).
fn check_trace_events(v: &serde_json::Value, what: &str) {
    let events = v["traceEvents"].as_array().expect("traceEvents array");
    assert!(!events.is_empty(), "{what}");
    let mut lanes: std::collections::BTreeMap<(u64, u64), Vec<Slice>> = Default::default();
    let mut flows: std::collections::BTreeMap<u64, (u32, u32)> = Default::default();
    for e in events {
        let ph = e["ph"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: no ph: {e}"));
        assert!(e["name"].is_string(), "{what}: no name: {e}");
        assert!(e["pid"].is_u64(), "{what}: no pid: {e}");
        if ph == "M" {
            assert!(e["args"].is_object(), "{what}: {e}");
            continue;
        }
        assert!(e["tid"].is_u64(), "{what}: no tid: {e}");
        let ts = e["ts"]
            .as_f64()
            .unwrap_or_else(|| panic!("{what}: no ts: {e}"));
        assert!(ts >= 0.0, "{what}: {e}");
        let lane = (e["pid"].as_u64().unwrap(), e["tid"].as_u64().unwrap());
        match ph {
            "X" => {
                let dur = e["dur"]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{what}: no dur: {e}"));
                assert!(dur >= 0.0, "{what}: {e}");
                lanes.entry(lane).or_default().push((
                    ts,
                    ts + dur,
                    e["name"].as_str().unwrap().to_string(),
                ));
            }
            "i" => assert!(
                matches!(e["s"].as_str(), Some("t" | "p" | "g")),
                "{what}: instant scope: {e}"
            ),
            "s" | "f" => {
                let id = e["id"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{what}: flow id: {e}"));
                let c = flows.entry(id).or_default();
                if ph == "s" {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                    assert_eq!(e["bp"], "e", "{what}: {e}");
                }
            }
            other => panic!("{what}: unexpected phase {other}: {e}"),
        }
    }
    for ((pid, tid), mut slices) in lanes {
        slices.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)));
        let mut stack: Vec<Slice> = Vec::new();
        for s in slices {
            while stack.last().is_some_and(|top| top.1 <= s.0) {
                stack.pop();
            }
            if let Some(top) = stack.last() {
                assert!(
                    s.1 <= top.1,
                    "{what}: lane {pid}/{tid}: {:?} half overlaps {:?}",
                    s,
                    top
                );
            }
            stack.push(s);
        }
    }
    for (id, (s, f)) in flows {
        assert_eq!(
            (s, f),
            (1, 1),
            "{what}: flow {id} needs one start and one end"
        );
    }
}

#[test]
fn perfetto_output_is_a_valid_timeline_with_one_lane_per_cpu() {
    let d = tempfile::tempdir().unwrap();
    let sim = d.path().join("w1.itw");
    itewatch::simulate::write_trace(
        &itewatch::simulate::generate("w1-driver-inflight", 1).unwrap(),
        &sim,
    )
    .unwrap();
    for trace in [
        root().join("tests/data/vm/6.1/trace.itw"),
        root().join("tests/data/vm/6.12/trace.itw"),
        sim,
    ] {
        let what = trace.display().to_string();
        let v = perfetto_of(&trace);
        check_trace_events(&v, &what);
        let events = v["traceEvents"].as_array().unwrap();
        let (cpus, submits) = trace_facts(&trace);
        // One named lane per CPU that had an event, and nothing else in that process.
        let named: std::collections::BTreeSet<u64> = events
            .iter()
            .filter(|e| e["ph"] == "M" && e["name"] == "thread_name" && e["pid"] == 1)
            .map(|e| e["tid"].as_u64().unwrap())
            .collect();
        assert_eq!(named, cpus, "{what}");
        // Every submission is a slice on a CPU lane.
        let slices = events
            .iter()
            .filter(|e| e["ph"] == "X" && e["pid"] == 1)
            .count();
        assert_eq!(slices, submits, "{what}");
        // Hot-plug events are instants.
        assert!(
            events
                .iter()
                .any(|e| e["ph"] == "i" && e["name"] == "hotplug-ist"),
            "{what}"
        );
        assert_eq!(v["metadata"]["tool"]["name"], "itewatch", "{what}");
    }
}

#[test]
fn perfetto_shows_the_incident_of_a_known_trace_and_points_at_its_submission() {
    // The Debian 6.1 surprise removal: one W2 flush-to-gone-device on 0000:02:00.0, whose two
    // device-TLB submissions ran on CPU 0 in irq/26-pciehp (tests/cmd/report.md).
    let trace = root().join("tests/data/vm/6.1/trace.itw");
    let v = perfetto_of(&trace);
    let events = v["traceEvents"].as_array().unwrap();
    let inc = events
        .iter()
        .find(|e| e["ph"] == "X" && e["pid"] == 2)
        .expect("an incident slice");
    assert_eq!(inc["args"]["kind"], "flush-to-gone-device");
    assert_eq!(inc["args"]["window"], "W2");
    assert_eq!(inc["args"]["id"], "febc6aaff87f65a9");
    assert_eq!(inc["name"], "W2 flush-to-gone-device 0000:02:00.0");
    let lane = inc["tid"].as_u64().unwrap();
    let starts: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["ph"] == "s" && e["pid"] == 2 && e["tid"] == lane)
        .collect();
    assert_eq!(starts.len(), 2, "one arrow per submission");
    for s in starts {
        let end = events
            .iter()
            .find(|e| e["ph"] == "f" && e["id"] == s["id"])
            .unwrap();
        assert_eq!(end["pid"], 1);
        assert_eq!(end["tid"], 0, "CPU 0");
        // The arrow lands inside a qi_submit_sync slice of irq/26-pciehp on that CPU.
        let at = end["ts"].as_f64().unwrap();
        assert!(
            events.iter().any(|x| x["ph"] == "X"
                && x["pid"] == 1
                && x["tid"] == 0
                && x["args"]["task"] == "irq/26-pciehp"
                && x["ts"].as_f64().unwrap() <= at
                && at <= x["ts"].as_f64().unwrap() + x["dur"].as_f64().unwrap()),
            "{end}"
        );
    }
}

#[test]
fn perfetto_is_refused_for_a_kernel_log() {
    let e = report::analyze_cli(None, Format::Perfetto, &mut Vec::new()).unwrap_err();
    assert!(e.to_string().contains("itewatch report TRACE"), "{e}");
}
