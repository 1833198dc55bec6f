//! Golden replays: a trace's incidents, as `itewatch report --format json` prints them,
//! checked in next to the trace (docs/correlator.md, "Golden traces").
//!
//! * Every `*.itw` under `tests/data/` (recorded traces, e.g. the VM harness's
//!   `tests/data/vm/<kernel>/trace.itw`) is compared with the `<name>.expected.json` beside it.
//!   Adding a golden trace is dropping the trace in and generating its expected file.
//! * Each simulator scenario (seed 1) is compared with `tests/data/sim/<scenario>.expected.json`,
//!   which pins the incident JSON format.
//!
//! `UPDATE_GOLDEN=1 cargo test --test golden` (re)writes the expected files; review the diff.

use std::path::{Path, PathBuf};

use itewatch::correlate::Config;
use itewatch::document;
use itewatch::simulate::{generate, write_trace, SCENARIOS};

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// The part of the report a golden file pins: the incidents.
fn incidents_json(trace: &Path) -> String {
    let r = document::from_trace_file(trace, Config::default())
        .unwrap_or_else(|e| panic!("{}: {e}", trace.display()));
    let mut s = serde_json::to_string_pretty(&r.incidents).expect("json");
    s.push('\n');
    s
}

fn check(trace: &Path, expected: &Path) {
    let got = incidents_json(trace);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(expected, &got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(expected).unwrap_or_else(|_| {
        panic!(
            "{} has no {}; run UPDATE_GOLDEN=1 cargo test -p itewatch --test golden and review it",
            trace.display(),
            expected.display()
        )
    });
    assert_eq!(
        got,
        want,
        "{}: incidents differ from {}",
        trace.display(),
        expected.display()
    );
}

fn traces_under(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            traces_under(&p, out);
        } else if p.extension().is_some_and(|x| x == "itw") {
            out.push(p);
        }
    }
}

#[test]
fn recorded_traces_match_their_expected_incidents() {
    let mut traces = Vec::new();
    traces_under(&data(), &mut traces);
    traces.sort();
    for t in traces {
        let expected = t.with_extension("expected.json");
        check(&t, &expected);
    }
}

#[test]
fn simulated_scenarios_match_their_expected_incidents() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (name, _) in SCENARIOS {
        let sim = generate(name, 1).expect("scenario");
        let trace = tmp.path().join(format!("{name}.itw"));
        write_trace(&sim, &trace).expect("write trace");
        check(
            &trace,
            &data().join("sim").join(format!("{name}.expected.json")),
        );
    }
}
