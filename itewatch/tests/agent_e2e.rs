//! `itewatch agent` end to end, on loopback only: /metrics of a simulated stream, the HTTP
//! endpoints, the spool, Alertmanager delivery exactly once across restarts (against an
//! in-test HTTP server), and the binary's signals and config checks. Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use itewatch::agent::config::FileConfig;
use itewatch::agent::{load_config, start, Handle};

const SCENARIO: &str = "w1-driver-inflight";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn flags(spool: Option<&Path>, am: Option<SocketAddr>) -> FileConfig {
    FileConfig {
        listen: Some("127.0.0.1:0".into()),
        spool: spool.map(Path::to_path_buf),
        alertmanager_urls: am.map(|a| vec![format!("http://{a}")]),
        stdout: Some(false),
        simulate: Some(SCENARIO.into()),
        seed: Some(1),
        ..Default::default()
    }
}

fn start_agent(rt: &tokio::runtime::Runtime, f: FileConfig) -> Handle {
    let cfg = load_config(None, f.clone()).unwrap();
    rt.block_on(start(cfg, None, f)).unwrap()
}

/// Blocking HTTP/1.0 GET on loopback, asking for OpenMetrics as Prometheus does: (status,
/// body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: x\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    (status, body)
}

/// Polls `f` every 50 ms for at most `secs`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// Samples of an exposition: `name{labels}` → value. Panics on a malformed line.
fn parse_exposition(text: &str) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        assert!(key.starts_with("itewatch_"), "unprefixed metric {line:?}");
        m.insert(key.to_string(), v);
    }
    m
}

fn sum(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| k.split('{').next() == Some(name))
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_and_incidents_of_a_simulated_stream() {
    let rt = runtime();
    let h = start_agent(&rt, flags(None, None));
    let addr = h.addr;
    assert!(addr.ip().is_loopback());
    let sim = itewatch::simulate::generate(SCENARIO, 1).unwrap();
    let submits = sim
        .records
        .iter()
        .filter(|r| {
            matches!(r, itewatch::event::Record::Event(e)
                if matches!(e.payload, itewatch::event::Payload::Submit(_)))
        })
        .count() as f64;
    let events = sim
        .records
        .iter()
        .filter(|r| matches!(r, itewatch::event::Record::Event(_)))
        .count() as f64;
    let mut metrics = BTreeMap::new();
    // Incidents are counted as the correlator emits them, before the rest of their chunk is
    // fed: wait for the whole stream too.
    wait_for(20, "incidents and the whole stream in /metrics", || {
        metrics = parse_exposition(&get(addr, "/metrics").1);
        sum(&metrics, "itewatch_incidents_total") >= sim.expected.len() as f64
            && sum(&metrics, "itewatch_submissions_total") >= submits
            && sum(&metrics, "itewatch_events_total") >= events
    });
    let (_, text) = get(addr, "/metrics");
    for name in [
        "itewatch_submissions_total",
        "itewatch_devtlb_invalidations_total",
        "itewatch_submission_latency_seconds_count",
        "itewatch_inflight_submissions",
        "itewatch_oldest_inflight_age_seconds",
        "itewatch_hotplug_events_total",
        "itewatch_incidents_total",
        "itewatch_build_info",
    ] {
        assert!(
            metrics.keys().any(|k| k.split('{').next() == Some(name)),
            "{name} missing from\n{text}"
        );
    }
    for t in [
        "# TYPE itewatch_submissions counter",
        "# TYPE itewatch_submission_latency_seconds histogram",
        "# UNIT itewatch_submission_latency_seconds seconds",
        "# TYPE itewatch_inflight_submissions gauge",
    ] {
        assert!(text.contains(t), "{t} missing");
    }
    // The exposition agrees with the stream: one submission per Submit event.
    assert_eq!(sum(&metrics, "itewatch_submissions_total"), submits);
    assert_eq!(sum(&metrics, "itewatch_events_total"), events);
    assert!(sum(&metrics, "itewatch_devtlb_invalidations_total") > 0.0);
    // Bounded labels: iommu names only.
    for k in metrics
        .keys()
        .filter(|k| k.starts_with("itewatch_submissions_total"))
    {
        assert!(k.contains("iommu=\"dmar"), "{k}");
    }
    // Every expected incident kind is counted.
    for e in &sim.expected {
        assert!(
            metrics
                .keys()
                .any(|k| k.starts_with("itewatch_incidents_total")
                    && k.contains(&format!("kind=\"{}\"", e.kind.name()))),
            "{:?} not counted",
            e.kind
        );
    }

    assert_eq!(get(addr, "/healthz"), (200, "ok\n".to_string()));
    let (code, body) = get(addr, "/incidents");
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<String> = list["incidents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert!(!ids.is_empty());
    let (code, one) = get(addr, &format!("/incidents/{}", ids[0]));
    assert_eq!(code, 200);
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["id"], ids[0].as_str());
    assert!(one["explanation"].is_string());
    assert_eq!(get(addr, "/incidents/0000000000000000").0, 404);
    assert_eq!(get(addr, "/nope").0, 404);
    rt.block_on(h.stop());
}

#[test]
fn spool_holds_one_file_per_incident_and_an_unwritable_spool_keeps_the_agent_running() {
    let rt = runtime();
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let h = start_agent(&rt, flags(Some(&spool), None));
    let state = h.state.clone();
    wait_for(20, "incidents", || state.incident_count() > 0);
    std::thread::sleep(Duration::from_millis(300));
    let n = state.incident_count();
    let files: BTreeSet<String> = std::fs::read_dir(spool.join("incidents"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files.len(), n, "{files:?}");
    // Each file is a whole report document of its one incident (attachable to a ticket),
    // valid against the checked-in schema.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/report-schema.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let schema = jsonschema::validator_for(&schema).unwrap();
    for f in &files {
        let text = std::fs::read_to_string(spool.join("incidents").join(f)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let errors: Vec<String> = schema.iter_errors(&v).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{f}: {errors:#?}");
        let doc = itewatch::document::parse(&text).unwrap();
        assert_eq!(doc.incidents.len(), 1, "{f}");
        assert_eq!(format!("{}.json", doc.incidents[0].id), *f);
        assert!(!doc.fixes.is_empty(), "{f}");
        assert_eq!(doc.inventory.len(), 1, "{f}");
        assert_eq!(doc.capture.start_ns, Some(doc.incidents[0].start.0));
        match &doc.source {
            itewatch::document::DocSource::Trace {
                origin, scenario, ..
            } => {
                assert_eq!(origin, "simulated");
                assert!(scenario.is_some());
            }
            other => panic!("{other:?}"),
        }
    }
    rt.block_on(h.stop());

    // The spool path is a file: every write fails; the agent says so, counts it, serves on.
    let blocked = d.path().join("blocked");
    std::fs::write(&blocked, b"").unwrap();
    let h = start_agent(&rt, flags(Some(&blocked), None));
    let addr = h.addr;
    let state = h.state.clone();
    wait_for(20, "incidents despite the spool", || {
        state.incident_count() > 0
    });
    let m = parse_exposition(&get(addr, "/metrics").1);
    assert!(sum(&m, "itewatch_spool_errors_total") >= 1.0, "{m:?}");
    assert_eq!(get(addr, "/healthz").0, 200);
    rt.block_on(h.stop());
}

/// A tiny Alertmanager: records the alerts it accepts; answers 503 while `accept` is false.
struct FakeAm {
    addr: SocketAddr,
    accept: Arc<AtomicBool>,
    accepted: Arc<Mutex<Vec<serde_json::Value>>>,
    refused: Arc<Mutex<u32>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FakeAm {
    fn start() -> FakeAm {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let accept = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let refused = Arc::new(Mutex::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, acc, rf, st) = (
            accept.clone(),
            accepted.clone(),
            refused.clone(),
            stop.clone(),
        );
        let thread = std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(120);
            while !st.load(Ordering::SeqCst) && Instant::now() < end {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut r = BufReader::new(s);
                let mut first = String::new();
                let mut len = 0usize;
                let mut line = String::new();
                r.read_line(&mut first).unwrap();
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                assert!(first.starts_with("POST /api/v2/alerts "), "{first}");
                let ok = a.load(Ordering::SeqCst);
                if ok {
                    let v: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
                    acc.lock().unwrap().extend(v);
                } else {
                    *rf.lock().unwrap() += 1;
                }
                let status = if ok {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                let mut s = r.into_inner();
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        FakeAm {
            addr,
            accept,
            accepted,
            refused,
            stop,
            thread: Some(thread),
        }
    }
    /// (incident id, severity) of every alert accepted: one per delivery.
    fn keys(&self) -> BTreeSet<(String, String)> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["labels"]["incident_id"].as_str().unwrap().to_string(),
                    a["labels"]["severity"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }
    fn ids(&self) -> Vec<String> {
        self.accepted
            .lock()
            .unwrap()
            .iter()
            .map(|a| a["labels"]["incident_id"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for FakeAm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// (incident id, severity) of each alert the simulated stream calls for, by the agent's rule.
fn expected_deliveries() -> BTreeSet<(String, String)> {
    use itewatch::agent::alert::{step, Step};
    use itewatch::correlate::{Config, Correlator};
    let sim = itewatch::simulate::generate(SCENARIO, 1).unwrap();
    let mut c = Correlator::new(Config::default());
    let mut out = Vec::new();
    for r in sim.records {
        out.extend(c.push_owned(r));
    }
    out.extend(c.finish().incidents);
    let mut last = BTreeMap::new();
    let mut want = BTreeSet::new();
    for inc in out {
        if step(last.insert(inc.id.0.clone(), inc.severity), &inc) != Step::None {
            want.insert((inc.id.0.clone(), inc.severity.to_string()));
        }
    }
    want
}

fn count(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

#[test]
fn alertmanager_gets_each_incident_exactly_once_across_restarts() {
    let rt = runtime();
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let am = FakeAm::start();

    // The deliveries the stream calls for: each incident's first alert and each rise in its
    // severity (this scenario has one), as the agent decides them.
    let want = expected_deliveries();
    let n = want.len();
    let incidents: BTreeSet<&str> = want.iter().map(|(id, _)| id.as_str()).collect();
    assert!(
        n > incidents.len(),
        "no escalation in the scenario any more: {want:?}"
    );

    // 1. Alertmanager refuses: deliveries wait in the spool.
    let h = start_agent(&rt, flags(Some(&spool), Some(am.addr)));
    wait_for(20, "a refused push", || *am.refused.lock().unwrap() > 0);
    wait_for(10, "all pending", || count(&spool.join("pending")) == n);
    rt.block_on(h.stop());
    assert!(am.ids().is_empty());
    assert_eq!(count(&spool.join("pending")), n);

    // 2. Alertmanager accepts: the restarted agent delivers what was pending, once each.
    am.accept.store(true, Ordering::SeqCst);
    let h = start_agent(&rt, flags(Some(&spool), Some(am.addr)));
    wait_for(20, "deliveries", || am.ids().len() >= n);
    wait_for(10, "pending drained", || count(&spool.join("pending")) == 0);
    rt.block_on(h.stop());
    let ids = am.ids();
    assert_eq!(ids.len(), n, "{ids:?}");
    assert_eq!(am.keys(), want);
    assert_eq!(count(&spool.join("sent")), n);
    let first = am.accepted.lock().unwrap()[0].clone();
    assert_eq!(first["labels"]["alertname"], "ItewatchIncident");
    assert!(first["annotations"]["summary"].is_string());

    // 3. Another restart re-derives the same incidents (same ids): nothing is sent again.
    let h = start_agent(&rt, flags(Some(&spool), Some(am.addr)));
    let state = h.state.clone();
    wait_for(20, "incidents again", || {
        state.incident_count() == incidents.len()
    });
    std::thread::sleep(Duration::from_millis(1500));
    rt.block_on(h.stop());
    assert_eq!(am.ids().len(), n);
}

fn itewatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_itewatch"))
}

#[test]
fn check_config_accepts_a_good_file_and_names_what_is_wrong() {
    let d = tempfile::tempdir().unwrap();
    let good = d.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:9464\"\nalertmanager_urls = [\"http://127.0.0.1:9093\"]\nsimulate = \"benign\"\n",
    )
    .unwrap();
    let o = itewatch()
        .args(["agent", "--check-config", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let bad = d.path().join("bad.toml");
    std::fs::write(&bad, "listen = \"127.0.0.1:9464\"\nlisten_port = 1\n").unwrap();
    let o = itewatch()
        .args(["agent", "--check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("listen_port"));
}

#[test]
fn live_without_probes_exits_naming_doctor() {
    if itewatch::probe::has_bpf_object() {
        eprintln!("skipped: this build carries the BPF object; the live path may attach");
        return;
    }
    let o = itewatch()
        .args(["agent", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("itewatch doctor"), "{err}");
}

/// Waits at most `secs` for a stderr line containing `needle` (lines come from a reader
/// thread, so a silent child cannot block the test).
fn wait_line(lines: &std::sync::mpsc::Receiver<String>, needle: &str, secs: u64) {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return,
            Ok(_) => {}
            Err(e) => panic!("no {needle:?} on stderr: {e}"),
        }
    }
}

/// Kills the child if the test fails half-way.
struct Reap(std::process::Child);

impl Drop for Reap {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sighup_reloads_and_sigterm_stops_cleanly() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("agent.toml");
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nstdout = false\nsimulate = \"benign\"\n",
    )
    .unwrap();
    let mut child = Reap(
        itewatch()
            .args(["agent", "--config"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let stderr = child.0.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    wait_line(&lines, "serving http://127.0.0.1:", 20);
    std::fs::write(
        &cfg,
        "listen = \"127.0.0.1:0\"\nstdout = false\nsimulate = \"benign\"\nalertmanager_urls = [\"http://127.0.0.1:9\"]\n",
    )
    .unwrap();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    wait_line(&lines, "configuration reloaded", 10);
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    wait_line(&lines, "stopping", 10);
    let end = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < end, "agent did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
}
