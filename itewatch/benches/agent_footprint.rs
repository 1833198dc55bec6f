//! Footprint of `itewatch agent` (docs/benchmarks.md, "Agent footprint").
//!
//! ```text
//! cargo bench -p itewatch --bench agent_footprint [-- --secs 20 --rate 100000]
//! ```
//!
//! Starts the agent binary of this build (the bench profile: optimised) twice and samples its
//! `/proc/PID/stat` CPU ticks (user + system, all threads) and `/proc/PID/status` memory:
//!
//! 1. idle: a simulated scenario is played, then the agent only serves, scraped every 15 s as
//!    Prometheus's default would (the figure a host pays when nothing happens);
//! 2. loaded: `--simulate soak --rate N` (benign DMA traffic with an incident scenario every
//!    40 chunks, paced at N records/s) with a spool, scraped every second; the achieved input
//!    rate is read back from `itewatch_events_total`;
//! 3. loaded from a file: the same stream written to a trace file first (not measured, and
//!    synced to disk before the run), then `--replay FILE --rate N`. The simulated source
//!    builds its stream in chunks inside the agent (~11 MiB of buffers); a replay reads
//!    through a 1 MiB buffer, like the live ring buffer, so this is the closer figure for a
//!    live agent under that load.
//!
//! CPU is per cent of one core over the measured window (after a warm-up); on a shared machine
//! this is the agent's own CPU time, not wall time. For the loaded runs it also prints the
//! time from the drain that produced an incident's first revision to that revision being
//! fsynced in the spool (`itewatch_incident_durable_seconds`, as bucket upper bounds). Figures
//! are printed, not asserted.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the agent when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime + stime of the process (all threads), in ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn scrape(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    Some(buf)
}

fn events_total(addr: SocketAddr) -> Option<f64> {
    scrape(addr)?
        .lines()
        .find(|l| l.starts_with("itewatch_events_total "))?
        .rsplit_once(' ')?
        .1
        .parse()
        .ok()
}

/// Starts the agent; returns it and its address once it serves, or the reason it did not.
fn start(args: &[&str]) -> Result<(Agent, SocketAddr, std::sync::mpsc::Receiver<String>), String> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_itewatch"))
        .args(["agent", "--listen", "127.0.0.1:0", "--no-stdout"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the agent: {e}"))?;
    let err = child.stderr.take().ok_or("no stderr")?;
    let agent = Agent(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let end = Instant::now() + Duration::from_secs(30);
    while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        if let Some(a) = l
            .strip_prefix("itewatch agent: serving http://")
            .and_then(|r| r.strip_suffix("/metrics"))
        {
            let addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
            return Ok((agent, addr, rx));
        }
    }
    Err("the agent did not start serving".into())
}

struct Sample {
    cpu_pct: f64,
    rss_kib: u64,
    hwm_kib: u64,
    events_per_s: Option<f64>,
}

/// Measures `secs` seconds, scraping every `scrape_every`.
fn measure(agent: &Agent, addr: SocketAddr, secs: u64, scrape_every: Duration) -> Option<Sample> {
    let pid = agent.0.id();
    let e0 = events_total(addr);
    let c0 = cpu_ticks(pid)?;
    let t0 = Instant::now();
    let mut next_scrape = t0;
    while t0.elapsed() < Duration::from_secs(secs) {
        if Instant::now() >= next_scrape {
            let _ = scrape(addr);
            next_scrape += scrape_every;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let c1 = cpu_ticks(pid)?;
    let wall = t0.elapsed().as_secs_f64();
    let e1 = events_total(addr);
    Some(Sample {
        cpu_pct: (c1 - c0) as f64 / clk_tck() / wall * 100.0,
        rss_kib: common::status_kib(&pid.to_string(), "VmRSS:")?,
        hwm_kib: common::status_kib(&pid.to_string(), "VmHWM:")?,
        events_per_s: match (e0, e1) {
            (Some(a), Some(b)) => Some((b - a) / wall),
            _ => None,
        },
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn main() {
    let mut secs: u64 = 20;
    let mut rate: u64 = 100_000;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--secs" => secs = args.next().and_then(|v| v.parse().ok()).unwrap_or(secs),
            "--rate" => rate = args.next().and_then(|v| v.parse().ok()).unwrap_or(rate),
            _ => {} // `cargo bench` passes --bench
        }
    }
    let warmup = Duration::from_secs(3);
    println!("agent footprint: {secs} s windows after {warmup:?} warm-up");

    // 1. Idle.
    let (agent, addr, rx) = match start(&["--simulate", "w1-driver-inflight", "--seed", "1"]) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let end = Instant::now() + Duration::from_secs(30);
    while let Ok(l) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        if l.contains("end of the source") {
            break;
        }
    }
    std::thread::sleep(warmup);
    match measure(&agent, addr, secs, Duration::from_secs(15)) {
        Some(s) => println!(
            "idle (scraped every 15 s):        CPU {:6.2} % of a core   RSS {:6.1} MiB   peak RSS {:6.1} MiB",
            s.cpu_pct,
            mib(s.rss_kib),
            mib(s.hwm_kib)
        ),
        None => eprintln!("idle: cannot read /proc for the agent"),
    }
    drop(agent);

    // 2. Under load.
    // On the build's disk (not a tmpfs), so the spool's fsyncs cost what they cost.
    let spool = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("itewatch-footprint-{}", std::process::id()));
    let rate_s = rate.to_string();
    let spool_s = spool.to_str().unwrap_or("/nonexistent").to_string();
    let args = ["--simulate", "soak", "--rate", &rate_s, "--spool", &spool_s];
    loaded("load", &args, rate, secs, warmup);
    let _ = std::fs::remove_dir_all(&spool);

    // 3. Under load, from a trace file: enough records for the warm-up and the window.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("itewatch-footprint-trace-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let trace = dir.join("soak.itw");
    let records = (rate as f64 * (secs as f64 + warmup.as_secs_f64() + 10.0)) as u64;
    if let Err(e) = write_soak_trace(&trace, records) {
        eprintln!("cannot write {}: {e}", trace.display());
        std::process::exit(1);
    }
    let trace_s = trace.to_str().unwrap_or("/nonexistent").to_string();
    let spool_s = dir
        .join("spool")
        .to_str()
        .unwrap_or("/nonexistent")
        .to_string();
    let args = ["--replay", &trace_s, "--rate", &rate_s, "--spool", &spool_s];
    loaded("load from a trace file", &args, rate, secs, warmup);
    let _ = std::fs::remove_dir_all(&dir);
}

/// One loaded run: the agent with `args`, measured over `secs` after `warmup`, scraped every
/// second.
fn loaded(label: &str, args: &[&str], rate: u64, secs: u64, warmup: Duration) {
    let (agent, addr, _rx) = match start(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    std::thread::sleep(warmup);
    match measure(&agent, addr, secs, Duration::from_secs(1)) {
        Some(s) => println!(
            "{label} ({rate} records/s asked, {} events/s fed, scraped every 1 s): CPU {:6.2} % of a core   RSS {:6.1} MiB   peak RSS {:6.1} MiB",
            s.events_per_s
                .map_or_else(|| "?".to_string(), |e| format!("{e:.0}")),
            s.cpu_pct,
            mib(s.rss_kib),
            mib(s.hwm_kib)
        ),
        None => eprintln!("{label}: cannot read /proc for the agent"),
    }
    match scrape(addr).and_then(|m| durable_quantiles(&m)) {
        Some((n, p50, p99, max)) => println!(
            "{label}: onset -> incident durable in the spool (fsynced): {n} incidents, p50 <= {}, p99 <= {}, slowest <= {}",
            ms(p50),
            ms(p99),
            ms(max)
        ),
        None => eprintln!("{label}: no itewatch_incident_durable_seconds in /metrics"),
    }
}

fn ms(secs: f64) -> String {
    if secs.is_infinite() {
        "more than the largest bucket".into()
    } else {
        format!("{:.1} ms", secs * 1e3)
    }
}

/// (count, p50, p99, bucket of the slowest) of the agent's onset-to-durable histogram, each as
/// the upper bound of the bucket it falls in.
fn durable_quantiles(metrics: &str) -> Option<(u64, f64, f64, f64)> {
    let mut buckets: Vec<(f64, u64)> = Vec::new();
    for l in metrics.lines() {
        let Some(rest) = l.strip_prefix("itewatch_incident_durable_seconds_bucket{le=\"") else {
            continue;
        };
        let (le, n) = rest.split_once("\"} ")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        buckets.push((le, n.trim().parse().ok()?));
    }
    let count = buckets.last()?.1;
    if count == 0 {
        return None;
    }
    let q = |f: f64| {
        let want = (count as f64 * f).ceil() as u64;
        buckets
            .iter()
            .find(|(_, n)| *n >= want)
            .map_or(f64::INFINITY, |b| b.0)
    };
    Some((count, q(0.5), q(0.99), q(1.0)))
}

/// The soak stream (as `--simulate soak` plays it) written to a trace file.
fn write_soak_trace(path: &std::path::Path, records: u64) -> std::io::Result<()> {
    use itewatch::trace::{Source, TraceHeader, TraceWriter};
    let header = TraceHeader::new(Source::Simulated {
        scenario: "soak".into(),
        seed: 0,
    });
    let mut w = TraceWriter::create(path, &header)?;
    for r in itewatch::simulate::LongStream::new(0, records) {
        w.write_record(&r)?;
    }
    w.finish()?;
    // On disk before the run, not written back during it: a 180 s window's trace is about
    // 19 M records, and its writeback held up the agent's spool fsyncs (an incident's
    // onset-to-durable time up to 1 s in the replay of 2026-12-06, docs/benchmarks.md).
    std::fs::File::open(path)?.sync_all()?;
    Ok(())
}
