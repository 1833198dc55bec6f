//! `itewatch agent` against the real components, as a fleet runs it: `promtool` on its
//! exposition and alert rules, a real Prometheus server scraping it, a real Alertmanager
//! receiving its alerts across an outage (Debian 12's `prometheus` and
//! `prometheus-alertmanager`, installed by scripts/setup.sh, started here on free loopback
//! ports with temporary storage), SIGKILL during an incident storm, the capability drop of the
//! binary and `systemd-analyze verify` of the unit.
//!
//! A missing tool fails its test with a pointer to scripts/setup.sh; `ITEWATCH_SKIP_REAL=1`
//! turns that into a logged skip. Every child process is killed when its guard drops; every
//! wait is bounded and asserts behaviour, never a duration.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

const TRACE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/vm/6.1/trace.itw");
const RULES_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/prometheus");
const UNIT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/systemd/itewatch-agent.service"
);

/// The path of `name` on PATH. Missing: the test fails naming scripts/setup.sh, or with
/// `ITEWATCH_SKIP_REAL=1` says it skips and returns `None`.
fn tool(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|c| c.is_file())
    });
    if found.is_none() {
        if std::env::var("ITEWATCH_SKIP_REAL").as_deref() == Ok("1") {
            eprintln!("skipped: {name} not found and ITEWATCH_SKIP_REAL=1");
            return None;
        }
        panic!(
            "{name} not found on PATH: run scripts/setup.sh (it installs Debian's prometheus and \
             prometheus-alertmanager), or set ITEWATCH_SKIP_REAL=1 to skip the tests against \
             real components"
        );
    }
    found
}

/// A child process killed (and reaped) when dropped, also when the test fails half-way.
struct Proc {
    child: Child,
    name: &'static str,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Proc { child, name }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn assert_running(&mut self) {
        if let Ok(Some(s)) = self.child.try_wait() {
            panic!("{} exited early: {s}", self.name);
        }
    }

    fn kill(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    fn sigkill(&self) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: kill(2) on the pid of our own child, which is not reaped yet (so the pid
        // cannot have been reused).
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill -KILL {}", self.name);
    }

    /// Waits (bounded) for the process to end; its exit status.
    fn wait_exit(&mut self, secs: u64) -> std::process::ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "{} did not exit", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Blocking HTTP/1.0 GET (Go's servers answer 1.0 without chunking): (status, body), or
/// `None` when nothing listens yet.
fn try_get(addr: SocketAddr, path: &str, accept: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.get(9..12)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1)?.to_string();
    Some((status, body))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_get(addr, path, "*/*").unwrap_or_else(|| panic!("GET http://{addr}{path} failed"))
}

/// Polls `f` every 100 ms for at most `secs`; `what` names the wait in the failure.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A running `itewatch agent` binary: its address (from its stderr), its stdout lines
/// (complete lines only: a line cut by SIGKILL was never logged) and its stderr.
struct Agent {
    proc: Proc,
    addr: SocketAddr,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

impl Agent {
    fn spawn(args: &[&str]) -> Agent {
        let mut proc = Proc::spawn(
            "itewatch agent",
            Command::new(env!("CARGO_BIN_EXE_itewatch"))
                .arg("agent")
                .args(["--listen", "127.0.0.1:0"])
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut out = BufReader::new(proc.child.stdout.take().unwrap());
        let lines = stdout.clone();
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            while out.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                if buf.ends_with(b"\n") {
                    lines
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&buf).trim_end().to_string());
                }
                buf.clear();
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        let err = BufReader::new(proc.child.stderr.take().unwrap());
        let text = stderr.clone();
        std::thread::spawn(move || {
            for l in err.lines().map_while(Result::ok) {
                text.lock().unwrap().push_str(&l);
                text.lock().unwrap().push('\n');
                if let Some(a) = l
                    .strip_prefix("itewatch agent: serving http://")
                    .and_then(|r| r.strip_suffix("/metrics"))
                {
                    let _ = tx.send(a.to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                proc.kill();
                panic!(
                    "the agent did not start serving; stderr:\n{}",
                    stderr.lock().unwrap()
                );
            }
        };
        Agent {
            proc,
            addr,
            stdout,
            stderr,
        }
    }

    /// Waits for the end of a finite source (the agent says so once its incidents are out).
    fn wait_source_end(&self) {
        wait_for(30, "the end of the source", || {
            self.stderr
                .lock()
                .unwrap()
                .contains("itewatch agent: end of the source")
        });
        // The JSON lines go out through the agent's writer thread, possibly after the source
        // ended: wait until every incident has its lines and no more come.
        let mut last = usize::MAX;
        wait_for(20, "the agent's JSON lines for every incident", || {
            let lines = self.stdout.lock().unwrap().clone();
            let ids: BTreeSet<String> = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v["id"].as_str().map(str::to_string))
                .collect();
            // (An agent whose stdout carries no incident lines only has to go quiet.)
            let settled =
                lines.len() == last && (ids.is_empty() || ids.len() == self.incidents().len());
            last = lines.len();
            if !settled {
                std::thread::sleep(Duration::from_millis(200));
            }
            settled
        });
    }

    /// The revisions that call for an alert, from the JSON lines: each incident's first, and
    /// each later one whose severity rose above the revision before.
    fn alerting_revisions(&self) -> Vec<Value> {
        let lines: Vec<Value> = self
            .stdout
            .lock()
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect();
        let mut last: BTreeMap<String, u8> = BTreeMap::new();
        lines
            .into_iter()
            .filter(|v| {
                let id = v["id"].as_str().unwrap().to_string();
                let rank = severity_rank(&v["severity"]);
                let prev = last.insert(id, rank);
                v["revision"] == 0 || prev.is_some_and(|p| rank > p)
            })
            .collect()
    }

    fn incidents(&self) -> Vec<Value> {
        let (code, body) = get(self.addr, "/incidents");
        assert_eq!(code, 200);
        let v: Value = serde_json::from_str(&body).unwrap();
        v["incidents"].as_array().cloned().unwrap_or_default()
    }

    /// Sum of the samples of `name` (any labels) in the agent's exposition.
    fn metric(&self, name: &str) -> f64 {
        metric_sum(&get(self.addr, "/metrics").1, name)
    }
}

fn severity_rank(s: &Value) -> u8 {
    match s.as_str() {
        Some("info") => 0,
        Some("latent") => 1,
        Some("warning") => 2,
        Some("critical") => 3,
        other => panic!("unknown severity {other:?}"),
    }
}

/// The key Alertmanager keeps an agent alert under (its labels differ in these two only).
fn alert_key(labels: &Value) -> (String, String) {
    (
        labels["incident_id"].as_str().unwrap().to_string(),
        labels["severity"].as_str().unwrap().to_string(),
    )
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.split([' ', '{']).next() == Some(name) && !l.contains("le=") // not the histogram's buckets
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Incidents a simulated scenario raises, by kind (what the agent must count).
fn expected_by_kind(scenario: &str, seed: u64) -> BTreeMap<String, f64> {
    let sim = itewatch::simulate::generate(scenario, seed).unwrap();
    let mut m = BTreeMap::new();
    for e in &sim.expected {
        *m.entry(e.kind.name().to_string()).or_insert(0.0) += 1.0;
    }
    m
}

// ---------------------------------------------------------------------------------------
// promtool

#[test]
fn promtool_accepts_the_exposition_and_the_rules_pass_their_tests() {
    let Some(promtool) = tool("promtool") else {
        return;
    };
    for source in [
        vec!["--replay", TRACE],
        vec!["--simulate", "w2-notifier-after-disconnect", "--seed", "3"],
    ] {
        let mut args = vec!["--no-stdout"];
        args.extend(&source);
        let agent = Agent::spawn(&args);
        agent.wait_source_end();
        assert!(agent.metric("itewatch_incidents_total") >= 1.0);
        // As a plain client (promtool, curl) gets it: the classic text format.
        let (code, text) = get(agent.addr, "/metrics");
        assert_eq!(code, 200);
        assert!(
            text.contains("# TYPE itewatch_incidents_total counter"),
            "{text}"
        );
        let mut check = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        check
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let o = check.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "promtool check metrics ({source:?}):\n{}{}\n--- exposition ---\n{text}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
    }

    let o = Command::new(&promtool)
        .args(["check", "rules", "itewatch.rules.yml"])
        .current_dir(RULES_DIR)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = Command::new(&promtool)
        .args(["test", "rules", "itewatch.rules.test.yml"])
        .current_dir(RULES_DIR)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "promtool test rules:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

// ---------------------------------------------------------------------------------------
// Prometheus

struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &Path, target: SocketAddr, rules: &Path) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: itewatch\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut proc = Proc::spawn(
            "prometheus",
            Command::new(bin)
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for(30, "prometheus ready", || {
            proc.assert_running();
            try_get(addr, "/-/ready", "*/*").is_some_and(|(c, _)| c == 200)
        });
        Prometheus {
            _proc: proc,
            addr,
            _dir: dir,
        }
    }

    /// An instant query: (labels, value) per series.
    fn query(&self, expr: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let (code, body) = get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(expr)),
        );
        assert_eq!(code, 200, "{expr}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{body}");
        v["data"]["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = r["metric"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_string()))
                    .collect();
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// `sum by (label) (expr)` as a map.
    fn by(&self, label: &str, expr: &str) -> BTreeMap<String, f64> {
        self.query(&format!("sum by ({label}) ({expr})"))
            .into_iter()
            .map(|(l, v)| (l.get(label).cloned().unwrap_or_default(), v))
            .collect()
    }
}

#[test]
fn prometheus_scrapes_the_agent_and_its_rules_fire() {
    let Some(bin) = tool("prometheus") else {
        return;
    };
    const SCENARIO: &str = "w1-driver-inflight";
    let seed = 2;
    let agent = Agent::spawn(&[
        "--no-stdout",
        "--simulate",
        SCENARIO,
        "--seed",
        &seed.to_string(),
    ]);
    let expected = expected_by_kind(SCENARIO, seed);
    assert!(!expected.is_empty());
    let sim = itewatch::simulate::generate(SCENARIO, seed).unwrap();
    let submits = sim
        .records
        .iter()
        .filter(|r| {
            matches!(r, itewatch::event::Record::Event(e)
                if matches!(e.payload, itewatch::event::Payload::Submit(_)))
        })
        .count() as f64;
    let prom = Prometheus::start(
        &bin,
        agent.addr,
        &Path::new(RULES_DIR).join("itewatch.rules.yml"),
    );

    let mut got = BTreeMap::new();
    wait_for(30, "the incidents by kind in Prometheus", || {
        got = prom.by("kind", "itewatch_incidents_total");
        got == expected
    });
    assert_eq!(
        prom.query("up{job=\"itewatch\"}").first().map(|(_, v)| *v),
        Some(1.0)
    );
    let subs = prom.query("sum(itewatch_submissions_total)");
    assert_eq!(subs.first().map(|s| s.1), Some(submits), "{subs:?}");
    // The histogram arrived whole: its count is the paired submissions.
    let count = prom.query("sum(itewatch_submission_latency_seconds_count)");
    let inf = prom.query("sum(itewatch_submission_latency_seconds_bucket{le=\"+Inf\"})");
    assert_eq!(count.first().map(|s| s.1), inf.first().map(|s| s.1));
    assert!(count.first().is_some_and(|s| s.1 > 0.0), "{count:?}");
    let info = prom.query("itewatch_build_info");
    assert_eq!(
        info.first().and_then(|(l, _)| l.get("version").cloned()),
        Some(env!("CARGO_PKG_VERSION").to_string())
    );
    // The repo's rules, evaluated by this server: the incidents fire their alert although
    // their series started at 1 (the agent exposes a counter from its first incident on).
    let mut alerts = BTreeSet::new();
    wait_for(30, "the incident alerts", || {
        let (_, body) = get(prom.addr, "/api/v1/alerts");
        let v: Value = serde_json::from_str(&body).unwrap();
        alerts = v["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["kind"].as_str().map(str::to_string))
            .collect();
        alerts == expected.keys().cloned().collect()
    });
}

// ---------------------------------------------------------------------------------------
// Alertmanager

struct Alertmanager {
    proc: Proc,
    addr: SocketAddr,
}

impl Alertmanager {
    /// Starts on `addr` (a free port the first time, the same on a restart) with `dir` as its
    /// configuration and storage; clustering off.
    fn start(bin: &Path, dir: &Path, addr: SocketAddr) -> Alertmanager {
        let cfg = dir.join("alertmanager.yml");
        std::fs::write(
            &cfg,
            "global:\n  resolve_timeout: 1h\nroute:\n  receiver: blackhole\nreceivers:\n  - name: blackhole\n",
        )
        .unwrap();
        let mut proc = Proc::spawn(
            "prometheus-alertmanager",
            Command::new(bin)
                .arg(format!("--config.file={}", cfg.display()))
                .arg(format!("--storage.path={}", dir.join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--cluster.listen-address=")
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        wait_for(30, "alertmanager ready", || {
            proc.assert_running();
            try_get(addr, "/-/ready", "*/*").is_some_and(|(c, _)| c == 200)
        });
        Alertmanager { proc, addr }
    }

    fn alerts(&self) -> Vec<Value> {
        let (code, body) = get(self.addr, "/api/v2/alerts");
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<Value>(&body)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Alerts received in total, duplicates included (the API shows one per label set).
    fn received(&self) -> f64 {
        metric_sum(
            &get(self.addr, "/metrics").1,
            "alertmanager_alerts_received_total",
        )
    }
}

/// Checks that Alertmanager holds exactly one alert per alerting revision (an incident's
/// first, and each rise in severity; JSON incident format), labelled after it.
fn assert_alerts_match(am: &Alertmanager, revisions: &[Value]) {
    let alerts = am.alerts();
    let by_key: BTreeMap<(String, String), &Value> = alerts
        .iter()
        .map(|a| (alert_key(&a["labels"]), &a["labels"]))
        .collect();
    assert_eq!(by_key.len(), alerts.len(), "two alerts for one revision");
    let want: BTreeSet<(String, String)> = revisions
        .iter()
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["severity"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(by_key.keys().cloned().collect::<BTreeSet<_>>(), want);
    for inc in revisions {
        let l = by_key[&(
            inc["id"].as_str().unwrap().to_string(),
            inc["severity"].as_str().unwrap().to_string(),
        )];
        assert_eq!(l["alertname"], "ItewatchIncident");
        assert_eq!(l["kind"], inc["kind"]);
        assert_eq!(l["severity"], inc["severity"]);
        assert_eq!(l["bdf"], inc["device"]["bdf"]);
        assert_eq!(l["window"], inc["window"]);
        assert!(l["instance"].as_str().is_some_and(|s| !s.is_empty()));
    }
}

#[test]
fn alertmanager_gets_each_incident_once_across_its_own_outage() {
    let Some(bin) = tool("prometheus-alertmanager") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let am_dir = d.path().join("am");
    std::fs::create_dir_all(&am_dir).unwrap();
    let spool = d.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    let am_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let url = format!("http://{am_addr}");
    let pending = |p: &Path| std::fs::read_dir(p.join("pending")).map_or(0, |d| d.count());

    // 1. Alertmanager up: each incident arrives, labelled after it.
    let mut am = Alertmanager::start(&bin, &am_dir, am_addr);
    let agent = Agent::spawn(&[
        "--simulate",
        "w2-notifier-after-disconnect",
        "--seed",
        "1",
        "--spool",
        spool_s,
        "--alertmanager-url",
        &url,
    ]);
    agent.wait_source_end();
    let first = agent.alerting_revisions();
    assert!(!first.is_empty());
    let ids: BTreeSet<&str> = first.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(ids.len(), agent.incidents().len());
    wait_for(20, "the alerts in Alertmanager", || {
        am.alerts().len() >= first.len()
    });
    assert_alerts_match(&am, &first);
    wait_for(10, "pending drained", || pending(&spool) == 0);
    assert_eq!(am.received(), first.len() as f64);
    drop(agent);

    // 2. Alertmanager down: a new run's incidents wait in the spool.
    am.proc.kill();
    let agent = Agent::spawn(&[
        "--simulate",
        "hang-then-hotplug",
        "--seed",
        "4",
        "--spool",
        spool_s,
        "--alertmanager-url",
        &url,
    ]);
    agent.wait_source_end();
    let second = agent.alerting_revisions();
    assert!(!second.is_empty());
    let ids: BTreeSet<&str> = second.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(ids.len(), agent.incidents().len());
    wait_for(20, "failed pushes", || {
        agent.metric("itewatch_alertmanager_pushes_total") >= 1.0
    });
    // Each delivery is spooled by the agent's writer thread: a failed push of the first may
    // come before the last is on disk.
    wait_for(20, "every delivery pending in the spool", || {
        pending(&spool) == second.len()
    });
    wait_for(20, "the pending gauge", || {
        agent.metric("itewatch_pending_pushes") == second.len() as f64
    });

    // 3. Alertmanager back (its alerts were in memory: it starts empty): the running agent's
    // retries deliver each waiting incident, once.
    let am = Alertmanager::start(&bin, &am_dir, am_addr);
    wait_for(40, "the pending alerts delivered", || pending(&spool) == 0);
    wait_for(10, "the alerts in Alertmanager", || {
        am.alerts().len() >= second.len()
    });
    assert_alerts_match(&am, &second);
    assert_eq!(am.received(), second.len() as f64);
    drop(agent);

    // 4. A restart re-derives the same incidents (same ids): nothing is sent again.
    let agent = Agent::spawn(&[
        "--simulate",
        "hang-then-hotplug",
        "--seed",
        "4",
        "--spool",
        spool_s,
        "--alertmanager-url",
        &url,
    ]);
    agent.wait_source_end();
    assert_eq!(agent.alerting_revisions().len(), second.len());
    // The pusher would have POSTed at once (nothing is pending to delay it).
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(agent.metric("itewatch_alertmanager_pushes_total"), 0.0);
    assert_eq!(am.received(), second.len() as f64);
}

// ---------------------------------------------------------------------------------------
// Crash safety

/// Records the (incident id, severity) of the alerts POSTed to it; answers 200.
struct Receiver {
    addr: SocketAddr,
    keys: Arc<Mutex<Vec<(String, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let keys = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (got, st) = (keys.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::SeqCst) {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let _ = s.set_nonblocking(false);
                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                let mut r = BufReader::new(s);
                let mut line = String::new();
                let mut len = 0usize;
                loop {
                    line.clear();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                if let Ok(v) = serde_json::from_slice::<Vec<Value>>(&body) {
                    let mut g = got.lock().unwrap();
                    for a in v {
                        g.push(alert_key(&a["labels"]));
                    }
                }
                let mut s = r.into_inner();
                let _ = s.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Receiver {
            addr,
            keys,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Names of the files of `dir` (temporaries included).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

type SpoolView = (
    BTreeMap<String, u64>,
    BTreeMap<String, (String, String)>,
    BTreeSet<String>,
);

/// A file's bytes; `None` if it went between the listing and the read (a running agent
/// marks deliveries sent and rotates incidents).
fn read_unless_gone(p: &Path) -> Option<Vec<u8>> {
    match std::fs::read(p) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{}: {e}", p.display()),
    }
}

/// Every spool file a crash may have left parses (temporaries are ignored: the next start
/// removes them); returns (incident id → revision, pending delivery id → alert key, sent
/// delivery ids).
fn check_spool(spool: &Path) -> SpoolView {
    let mut incidents = BTreeMap::new();
    for n in names(&spool.join("incidents")) {
        if n.starts_with(".tmp-") {
            continue;
        }
        let Some(bytes) = read_unless_gone(&spool.join("incidents").join(&n)) else {
            continue;
        };
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("incidents/{n} does not parse: {e}"));
        // A whole report document of one incident.
        let inc = &v["incidents"][0];
        assert_eq!(v["incidents"].as_array().map(Vec::len), Some(1), "{n}");
        let id = inc["id"].as_str().unwrap().to_string();
        assert_eq!(format!("{id}.json"), n);
        incidents.insert(id, inc["revision"].as_u64().unwrap());
    }
    let mut pending = BTreeMap::new();
    for n in names(&spool.join("pending")) {
        if n.starts_with(".tmp-") {
            continue;
        }
        let Some(bytes) = read_unless_gone(&spool.join("pending").join(&n)) else {
            continue;
        };
        let p: itewatch::agent::spool::Pending = serde_json::from_slice(&bytes)
            .unwrap_or_else(|e| panic!("pending/{n} does not parse: {e}"));
        assert_eq!(format!("{}.json", p.id), n);
        let key = alert_key(&p.alert["labels"]);
        // The first alert of an incident goes by its id, a rise in severity by id-severity.
        assert!(
            p.id == key.0 || p.id == format!("{}-{}", key.0, key.1),
            "{n}: {key:?}"
        );
        pending.insert(p.id, key);
    }
    let sent = names(&spool.join("sent"))
        .into_iter()
        .filter(|n| !n.starts_with(".tmp-"))
        .collect();
    (incidents, pending, sent)
}

/// SplitMix64 for the kill moments; the seed is printed so a failure can be replayed.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[test]
fn sigkill_during_an_incident_storm_loses_nothing_the_agent_logged() {
    const ROUNDS: u64 = 20;
    let mut rng = std::env::var("ITEWATCH_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill moments: ITEWATCH_CRASH_SEED={rng}");
    let d = tempfile::tempdir().unwrap();
    let spool = d.path().join("spool");
    let spool_s = spool.to_str().unwrap();
    // Nothing listens here during the storm: every delivery stays pending.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let mut logged: BTreeMap<String, u64> = BTreeMap::new();
    // Delivery ids the logged lines call for (as the agent names them).
    let mut opened = BTreeSet::new();
    for round in 0..ROUNDS {
        let mut agent = Agent::spawn(&[
            "--simulate",
            "storm",
            "--seed",
            &round.to_string(),
            "--spool",
            spool_s,
            "--alertmanager-url",
            &dead,
        ]);
        // Kill at a random moment once incidents flow (the first comes within milliseconds).
        wait_for(20, "the storm's first incident", || {
            !agent.stdout.lock().unwrap().is_empty()
        });
        std::thread::sleep(Duration::from_millis(splitmix(&mut rng) % 400));
        agent.proc.sigkill();
        agent.proc.wait_exit(10);
        // Let the reader thread take what the pipe still holds.
        wait_for(5, "the stdout reader", || {
            Arc::strong_count(&agent.stdout) == 1
        });
        for l in agent.stdout.lock().unwrap().iter() {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("round {round}: a logged line does not parse: {e}: {l}")
            });
            let id = v["id"].as_str().unwrap().to_string();
            let rev = v["revision"].as_u64().unwrap();
            let e = logged.entry(id).or_insert(0);
            *e = (*e).max(rev);
        }
        for v in agent.alerting_revisions() {
            let id = v["id"].as_str().unwrap();
            opened.insert(if v["revision"] == 0 {
                id.to_string()
            } else {
                format!("{id}-{}", v["severity"].as_str().unwrap())
            });
        }
        let (stored, pending, sent) = check_spool(&spool);
        for (id, rev) in &logged {
            let on_disk = stored.get(id).unwrap_or_else(|| {
                panic!(
                    "round {round}: incident {id} was logged but is not in the spool\nstderr:\n{}",
                    agent.stderr.lock().unwrap()
                )
            });
            assert!(
                on_disk >= rev,
                "round {round}: {id} revision {on_disk} < logged {rev}"
            );
        }
        for id in &opened {
            assert!(
                pending.contains_key(id) || sent.contains(id),
                "round {round}: incident {id} was logged but its delivery is not in the spool"
            );
        }
    }
    assert!(
        opened.len() as u64 >= ROUNDS,
        "the storm raised too few incidents to test anything: {}",
        opened.len()
    );

    // A restart with Alertmanager reachable (and a source raising no incident) delivers
    // everything that was pending, each once.
    let (_, waiting, _) = check_spool(&spool);
    let rx = Receiver::start();
    let agent = Agent::spawn(&[
        "--no-stdout",
        "--simulate",
        "benign",
        "--spool",
        spool_s,
        "--alertmanager-url",
        &format!("http://{}", rx.addr),
    ]);
    wait_for(30, "every pending delivery made", || {
        check_spool(&spool).1.is_empty()
    });
    let final_stderr = agent.stderr.lock().unwrap().clone();
    drop(agent);
    let got = rx.keys.lock().unwrap().clone();
    let distinct: BTreeSet<(String, String)> = got.iter().cloned().collect();
    if distinct.len() != got.len() {
        let mut seen = BTreeSet::new();
        for k in &got {
            if !seen.insert(k.clone()) {
                let w: Vec<_> = waiting.iter().filter(|(_, v)| v.0 == k.0).collect();
                eprintln!("DUP {k:?}; waiting with that incident: {w:?}");
                eprintln!("final agent stderr:\n{final_stderr}");
            }
        }
    }
    assert_eq!(distinct.len(), got.len(), "an alert was delivered twice");
    assert_eq!(distinct, waiting.values().cloned().collect());
    assert!(opened.iter().all(|id| waiting.contains_key(id)));
    // The restart removed what the kills left half-written.
    for sub in ["incidents", "pending", "sent"] {
        let tmp: Vec<String> = names(&spool.join(sub))
            .into_iter()
            .filter(|n| n.starts_with(".tmp-"))
            .collect();
        assert!(tmp.is_empty(), "{sub}: {tmp:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Least privilege, deployment

/// `Cap*` lines of a status file, as numbers.
fn caps_of(status: &str) -> BTreeMap<String, u64> {
    status
        .lines()
        .filter_map(|l| l.strip_prefix("Cap"))
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((format!("Cap{k}"), u64::from_str_radix(v.trim(), 16).ok()?))
        })
        .collect()
}

#[test]
fn a_replaying_agent_holds_no_capability_on_any_thread() {
    let own = caps_of(&std::fs::read_to_string("/proc/self/status").unwrap());
    if own.get("CapEff") == Some(&0) {
        eprintln!("note: the test runs without capabilities; the drop is only proven as root");
    }
    let agent = Agent::spawn(&["--no-stdout", "--replay", TRACE]);
    agent.wait_source_end();
    assert!(
        agent
            .stderr
            .lock()
            .unwrap()
            .contains("capabilities kept: none")
            || own.get("CapPrm") == Some(&0),
        "{}",
        agent.stderr.lock().unwrap()
    );
    let tasks = format!("/proc/{}/task", agent.proc.pid());
    let threads = names(Path::new(&tasks));
    assert!(
        threads.len() > 1,
        "expected the runtime's threads: {threads:?}"
    );
    for t in threads {
        let caps = caps_of(&std::fs::read_to_string(format!("{tasks}/{t}/status")).unwrap());
        for set in ["CapEff", "CapPrm", "CapInh", "CapAmb"] {
            assert_eq!(caps.get(set), Some(&0), "thread {t}: {set} {caps:?}");
        }
        if own.get("CapEff") != Some(&0) {
            // Root with CAP_SETPCAP also empties the bounding set: no exec gets them back.
            assert_eq!(caps.get("CapBnd"), Some(&0), "thread {t}: {caps:?}");
        }
    }
    // Still serving after the drop.
    assert_eq!(get(agent.addr, "/healthz").0, 200);
}

#[test]
fn the_systemd_unit_verifies() {
    let Some(analyze) = tool("systemd-analyze") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    // The unit as installed, with the binary at its ExecStart path (this build's).
    let unit = std::fs::read_to_string(UNIT)
        .unwrap()
        .replace("/usr/local/bin/itewatch", env!("CARGO_BIN_EXE_itewatch"));
    let path = d.path().join("itewatch-agent.service");
    std::fs::write(&path, unit).unwrap();
    let o = Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "systemd-analyze verify:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}
