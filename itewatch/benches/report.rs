//! `itewatch report` on large traces: throughput and peak memory of building the report
//! document from a trace file (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p itewatch --bench report -- --events 1000000,10000000
//! ```
//!
//! For each size, a trace file is written into a temp dir from the simulator's long stream
//! (benign DMA-unmap traffic with an incident scenario every 40 chunks; not timed), then a
//! child process (this binary with `--report-file PATH`) runs `document::from_trace_file` on it
//! (what `itewatch report FILE` runs) and encodes the JSON document. The child's VmHWM is the
//! report's own peak RSS, untouched by the generator's heap: if the report held the events, it
//! would grow tenfold from 1 M to 10 M events.

mod common;
use common::thread_cpu;
use std::time::Instant;

use itewatch::correlate::Config;
use itewatch::document::{self, DocSource};
use itewatch::simulate::LongStream;
use itewatch::trace::{Source, TraceHeader, TraceWriter};

/// The child: report one trace file, print `cpu_s wall_s vmhwm_kib records incidents json_bytes`.
fn report_child(path: &str) {
    let wall = Instant::now();
    let c0 = thread_cpu();
    let doc =
        document::from_trace_file(std::path::Path::new(path), Config::default()).expect("report");
    let json = serde_json::to_vec(&doc).expect("encode");
    let cpu = thread_cpu().saturating_sub(c0).as_secs_f64();
    let wall = wall.elapsed().as_secs_f64();
    let records = match &doc.source {
        DocSource::Trace { records, .. } => *records,
        _ => 0,
    };
    println!(
        "{cpu} {wall} {} {records} {} {}",
        common::status_kib("self", "VmHWM:").unwrap_or(0),
        doc.incidents.len(),
        json.len()
    );
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    if let Some(i) = argv.iter().position(|a| a == "--report-file") {
        if let Some(p) = argv.get(i + 1) {
            report_child(p);
        }
        return;
    }
    let quick = !argv.iter().any(|a| a == "--bench");
    let mut sizes: Vec<u64> = if quick {
        vec![20_000]
    } else {
        vec![1_000_000, 10_000_000]
    };
    if let Some(i) = argv.iter().position(|a| a == "--events") {
        let parsed: Vec<u64> = argv
            .get(i + 1)
            .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default();
        if !parsed.is_empty() {
            sizes = parsed;
        }
    }
    let exe = std::env::current_exe().expect("own path");
    let dir = tempfile::tempdir().expect("temp dir");
    println!("itewatch report benchmark (document::from_trace_file in a child process)");
    for events in sizes {
        let path = dir.path().join(format!("long-{events}.itw"));
        // Generate (not timed).
        let t = Instant::now();
        let header = TraceHeader::new(Source::Simulated {
            scenario: "bench-long-stream".into(),
            seed: 1,
        });
        let mut stream = LongStream::new(1, events);
        {
            let mut w = TraceWriter::create(&path, &header).expect("create trace");
            for r in stream.by_ref() {
                w.write_record(&r).expect("write trace");
            }
            w.finish().expect("finish trace");
        }
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let gen_s = t.elapsed().as_secs_f64();
        // Report, in a fresh process.
        let out = std::process::Command::new(&exe)
            .arg("--report-file")
            .arg(&path)
            .output()
            .expect("run the report child");
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<f64> = line
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        let [cpu, wall, hwm, records, incidents, json] = f[..] else {
            panic!(
                "report child failed: {line} {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ev = stream.events() as f64;
        let mib = bytes as f64 / (1 << 20) as f64;
        println!("  {} kernel events", stream.events());
        println!(
            "    trace file          {mib:.0} MiB, {records} records (generated in {gen_s:.1} s, not timed)"
        );
        println!(
            "    incidents           {incidents} ({} scenarios in the stream); JSON {:.0} KiB",
            stream.scenarios,
            json / 1024.0
        );
        println!(
            "    report, CPU time    {cpu:.2} s  {:.2} M events/s  {:.0} MiB/s",
            ev / cpu / 1e6,
            mib / cpu
        );
        println!(
            "    report, wall        {wall:.2} s  {:.2} M events/s",
            ev / wall / 1e6
        );
        println!("    peak RSS (VmHWM)    {:.1} MiB", hwm / 1024.0);
        let _ = std::fs::remove_file(&path);
    }
}
