//! The log-analyzer corpus (tests/data/logs, plus the VM harness's real guest dmesg): every log
//! gives the incident kinds its manifest entry lists, and every diagnosis cites lines that
//! exist in the file and says something about them.

use std::path::{Path, PathBuf};

use itewatch::analyze::{analyze_bytes, Analysis, Options};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/logs")
}

fn manifest() -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(dir().join("manifest.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v.as_object().unwrap().clone()
}

fn summary(a: &Analysis) -> String {
    let mut s = String::new();
    for i in &a.incidents {
        let ev = i.evidence.as_ref().unwrap();
        s.push_str(&format!(
            "{} {:?} case={:?} sev={} removal={:?} dev={:?}/{:?} slot={:?} cert={:?}\n  {}\n  basis={:?}\n  unknowns={:?}\n  fixes={:?}\n  partial={:?}\n",
            i.kind,
            i.id.0,
            i.case(),
            i.severity,
            i.removal,
            i.device.bdf.map(|b| b.to_string()),
            i.device.sid.map(|b| b.to_string()),
            i.device.slot,
            ev.certainty,
            i.explanation,
            ev.basis,
            ev.unknowns,
            i.fixes.iter().map(|f| (&f.commit, f.status)).collect::<Vec<_>>(),
            i.partial_reasons
        ));
    }
    for n in &a.notes {
        s.push_str(&format!("note {} x{} (boot {})\n", n.kind, n.count, n.boot));
    }
    s.push_str(&format!(
        "boots={} unparsed={} dialects={:?}\n",
        a.boots.len(),
        a.unparsed_count,
        a.dialects
    ));
    s
}

#[test]
fn every_corpus_log_gives_its_expected_incidents() {
    let m = manifest();
    let mut failures = Vec::new();
    let mut files_on_disk: Vec<String> = std::fs::read_dir(dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "manifest.json")
        .collect();
    files_on_disk.sort();
    for f in &files_on_disk {
        assert!(
            m.contains_key(f),
            "{f} is in the corpus but not in manifest.json"
        );
    }
    for (name, want) in &m {
        if name.starts_with('_') {
            continue;
        }
        let path = dir().join(name);
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let a = analyze_bytes(&data, Options::default());
        let mut kinds: Vec<String> = a.incidents.iter().map(|i| i.kind.to_string()).collect();
        kinds.sort();
        let want_kinds: Vec<String> = want["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap().to_string())
            .collect();
        let mut problems = Vec::new();
        if kinds != want_kinds {
            problems.push(format!("kinds {kinds:?}, want {want_kinds:?}"));
        }
        if let Some(b) = want.get("boots").and_then(|b| b.as_u64()) {
            if a.boots.len() as u64 != b {
                problems.push(format!("{} boots, want {b}", a.boots.len()));
            }
        }
        let main = a
            .incidents
            .iter()
            .find(|i| i.kind.to_string() != "ite-reported")
            .or(a.incidents.first());
        if let Some(c) = want.get("case").and_then(|c| c.as_u64()) {
            if main.and_then(|i| i.case()) != Some(c as u8) {
                problems.push(format!("case {:?}, want {c}", main.and_then(|i| i.case())));
            }
        }
        if let Some(r) = want.get("removal").and_then(|c| c.as_str()) {
            let got = main.and_then(|i| i.removal).map(|r| {
                serde_json::to_value(r)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            });
            if got.as_deref() != Some(r) {
                problems.push(format!("removal {got:?}, want {r}"));
            }
        }
        if let Some(c) = want.get("certainty").and_then(|c| c.as_str()) {
            let got = main.and_then(|i| i.evidence.as_ref()).map(|e| {
                serde_json::to_value(e.certainty)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            });
            if got.as_deref() != Some(c) {
                problems.push(format!("certainty {got:?}, want {c}"));
            }
        }
        if let Some(s) = want.get("sid").and_then(|c| c.as_str()) {
            if !a
                .incidents
                .iter()
                .all(|i| i.device.sid.map(|x| x.to_string()).as_deref() == Some(s))
            {
                problems.push(format!("not every incident names SID {s}"));
            }
        }
        // What the incidents say, in every place a reader sees words: explanation, basis,
        // unknowns, partial reasons and the timeline.
        let words: String = a
            .incidents
            .iter()
            .flat_map(|i| {
                let ev = i.evidence.as_ref();
                std::iter::once(i.explanation.clone())
                    .chain(ev.into_iter().flat_map(|e| e.basis.iter().cloned()))
                    .chain(ev.into_iter().flat_map(|e| e.unknowns.iter().cloned()))
                    .chain(i.partial_reasons.iter().cloned())
                    .chain(i.timeline.iter().map(|t| t.detail.clone()))
            })
            .collect::<Vec<_>>()
            .join("\n");
        for s in want
            .get("says")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            let s = s.as_str().unwrap();
            if !words.contains(s) {
                problems.push(format!("no incident says {s:?}"));
            }
        }
        for s in want
            .get("never_says")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            let s = s.as_str().unwrap();
            if words.contains(s) {
                problems.push(format!("an incident says {s:?}"));
            }
        }
        if want.get("no_device").and_then(|c| c.as_bool()) == Some(true)
            && a.incidents
                .iter()
                .any(|i| i.device.bdf.is_some() || i.device.sid.is_some())
        {
            problems.push("an incident names a device".into());
        }
        if let Some(p) = want.get("partial").and_then(|c| c.as_bool()) {
            if main.map(|i| i.partial) != Some(p) {
                problems.push(format!("partial {:?}, want {p}", main.map(|i| i.partial)));
            }
        }
        if let Some(fix) = want.get("fix").and_then(|c| c.as_str()) {
            if !main.is_some_and(|i| i.fixes.iter().any(|f| f.commit == fix)) {
                problems.push(format!("fix {fix} not suggested"));
            }
        }
        for n in want
            .get("notes")
            .and_then(|n| n.as_array())
            .into_iter()
            .flatten()
        {
            let n = n.as_str().unwrap();
            if !a.notes.iter().any(|x| x.kind == n) {
                problems.push(format!("no {n} note"));
            }
        }
        // Every record was read in the dialects listed (its prefix peeled off).
        if let Some(d) = want.get("dialects").and_then(|d| d.as_array()) {
            let want_d: Vec<&str> = d.iter().map(|x| x.as_str().unwrap()).collect();
            let got: Vec<&str> = a.dialects.keys().map(String::as_str).collect();
            if got != want_d {
                problems.push(format!("dialects {got:?}, want {want_d:?}"));
            }
        }
        if let Some(n) = want.get("unparsed_min").and_then(|c| c.as_u64()) {
            if a.unparsed_count < n || a.unparsed.iter().any(|u| u.line == 0) {
                problems.push(format!(
                    "{} unparsed lines reported, want >= {n}",
                    a.unparsed_count
                ));
            }
        }
        if let Some(n) = want.get("unparsed_max").and_then(|c| c.as_u64()) {
            if a.unparsed_count > n {
                problems.push(format!(
                    "{} unparsed lines reported, want <= {n}: {:?}",
                    a.unparsed_count, a.unparsed
                ));
            }
        }
        // Every diagnosis cites real lines and says why.
        let text = String::from_utf8_lossy(&data);
        let nlines = text.lines().count() as u64;
        for i in &a.incidents {
            let ev = i.evidence.as_ref().expect("log incidents carry evidence");
            if ev.lines.is_empty() || ev.basis.is_empty() {
                problems.push(format!(
                    "{} {} has no supporting lines or basis",
                    i.kind, i.id
                ));
            }
            for l in &ev.lines {
                if l.line == 0 || l.line > nlines {
                    problems.push(format!("{} cites line {} of {nlines}", i.id, l.line));
                }
            }
        }
        if std::env::var_os("CORPUS_PRINT").is_some() {
            eprintln!("== {name}\n{}", summary(&a));
        }
        if !problems.is_empty() {
            failures.push(format!("{name}: {}\n{}", problems.join("; "), summary(&a)));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Runs `itewatch analyze FILE --format json`: (exit code, stdout, stderr).
fn analyze_cli(path: &Path) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .arg("analyze")
        .arg(path)
        .args(["--format", "json"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kinds_of(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let mut k: Vec<String> = v["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

/// Regression (issue: `analyze` said "no incident", exit 0, for input it could not read): a
/// gzip, xz or zstd copy of a log gives the plain log's verdict; a directory, an itewatch
/// trace, binary data and empty input are refused by name with a non-zero exit.
#[test]
fn compressed_logs_are_read_and_what_is_not_a_log_is_refused() {
    use std::io::Write;
    let plain = dir().join("w2-ethan-zhao-hardlockup.dmesg");
    let text = std::fs::read(&plain).unwrap();
    let (code, out, _) = analyze_cli(&plain);
    assert_eq!(code, Some(0));
    let want = kinds_of(&out);
    assert!(!want.is_empty());

    let tmp = std::env::temp_dir().join(format!("itewatch-analyze-input-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&text).unwrap();
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut &text[..], &mut xz).unwrap();
    let zst =
        ruzstd::encoding::compress_to_vec(&text[..], ruzstd::encoding::CompressionLevel::Fastest);
    // Names that say nothing: the packing is told from the bytes.
    for (name, bytes) in [("a.log", gz.finish().unwrap()), ("b.log", xz), ("c", zst)] {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).unwrap();
        let (code, out, err) = analyze_cli(&p);
        assert_eq!(code, Some(0), "{name}: {err}");
        assert_eq!(kinds_of(&out), want, "{name}");
    }

    let empty = tmp.join("empty.log");
    std::fs::write(&empty, b"").unwrap();
    let binary = tmp.join("core");
    std::fs::write(&binary, b"\x7fELF\x02\x01\x01\0\0\0\0\0").unwrap();
    let trace = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vm/6.1/trace.itw");
    for (p, says) in [
        (tmp.clone(), "is a directory"),
        (empty, "is empty"),
        (binary, "is binary data"),
        (trace, "is an itewatch trace"),
    ] {
        let (code, out, err) = analyze_cli(&p);
        assert_ne!(code, Some(0), "{}: {out}", p.display());
        assert!(
            err.contains(says) && err.contains(&*p.file_name().unwrap().to_string_lossy()),
            "{}: {err}",
            p.display()
        );
        assert!(
            !out.contains("\"incidents\""),
            "no report for {}",
            p.display()
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
