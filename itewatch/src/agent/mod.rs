//! `itewatch agent`: the headless sink. Records (live probes, a replayed trace or a simulated
//! scenario) go through the same correlator as everywhere else; the agent turns the stream
//! into Prometheus metrics, incidents into spool files, JSON lines on stdout and Alertmanager
//! alerts, and serves them read-only over HTTP. SIGTERM/SIGINT stop it, SIGHUP reloads the
//! config file (Alertmanager URLs, spool bound, stdout; the rest needs a restart).
//! See docs/agent.md.

pub mod alert;
pub mod config;
pub mod http;
pub mod lastgasp;
pub mod metrics;
pub mod privileges;
pub mod sentinel;
pub mod spool;
pub mod writer;

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use crate::correlate::incident::Incident;
use crate::correlate::{Config as CorrelatorConfig, Correlator};
use crate::event::{KTime, Record};
use crate::live::{monotonic_ns, LiveReader};
use crate::trace::{Source as TraceSource, TraceHeader};
use alert::{alert_for, Msg, Pusher};
use config::{Config, ConfigError, FileConfig, SourceConfig};
use lastgasp::LastGasp;
use metrics::Metrics;
use sentinel::{Pipe, Sentinels, Shared};
use spool::{Pending, Spool};

/// Incidents kept in memory for `/incidents` (the spool keeps more).
const MAX_INCIDENTS_IN_MEMORY: usize = 1000;
/// Records fed to the correlator between two yields (replay / simulate).
const CHUNK: usize = sentinel::CHUNK;
/// Wake-up interval of a paced (`--rate`) source.
const PACE_TICK: Duration = Duration::from_millis(10);

/// How many records a source paced at `rate` per second may feed now, `elapsed` after it
/// started with `fed` fed so far; at most `chunk` (pure).
fn paced_budget(rate: u64, elapsed: Duration, fed: u64, chunk: usize) -> usize {
    let due = (u128::from(rate).saturating_mul(elapsed.as_nanos()) / 1_000_000_000)
        .min(u128::from(u64::MAX));
    let left = (due as u64).saturating_sub(fed);
    usize::try_from(left).unwrap_or(usize::MAX).min(chunk)
}

#[derive(clap::Args, Clone, Debug, Default)]
pub struct AgentArgs {
    /// TOML config file; every key is also a flag below, and flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /incidents: ADDR:PORT or HOST:PORT [default:
    /// 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<String>,
    /// Spool directory for incidents and pending Alertmanager deliveries.
    #[arg(long, value_name = "DIR")]
    pub spool: Option<PathBuf>,
    /// Bound on the incident files in the spool [default: 64 MiB].
    #[arg(long)]
    pub spool_max_bytes: Option<u64>,
    /// Alertmanager base URL (http://host:port); repeat for several.
    #[arg(long = "alertmanager-url", value_name = "URL")]
    pub alertmanager_urls: Vec<String>,
    /// Do not print incidents as JSON lines on stdout.
    #[arg(long)]
    pub no_stdout: bool,
    /// Feed a trace file instead of the live probes.
    #[arg(long, value_name = "FILE", conflicts_with = "simulate")]
    pub replay: Option<PathBuf>,
    /// Feed a simulated scenario instead of the live probes (`itewatch simulate --list`;
    /// `soak` and `storm` are endless streams, one incident per 40 chunks or per chunk).
    #[arg(long, value_name = "SCENARIO")]
    pub simulate: Option<String>,
    /// Seed of --simulate [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Pace --replay / --simulate at this many records per second [default: as fast as
    /// possible].
    #[arg(long, value_name = "RECORDS_PER_S")]
    pub rate: Option<u64>,
    /// Bound on the Alertmanager deliveries waiting; past it the oldest are given up
    /// [default: 10000].
    #[arg(long)]
    pub max_pending: Option<u64>,
    /// Also write a compact JSON line for every incident revision to this file or terminal
    /// (e.g. a serial port), synchronously, from whichever agent thread still runs; repeat
    /// for several. The channel meant to outlive a host stuck in the ITE loop (docs/agent.md).
    #[arg(long = "last-gasp", value_name = "PATH")]
    pub last_gasp: Vec<PathBuf>,
    /// Also write critical incident revisions to the kernel log (/dev/kmsg, KERN_CRIT), which
    /// serial consoles, netconsole and pstore carry off a dying host.
    #[arg(long)]
    pub kmsg: bool,
    /// Validate the configuration and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl AgentArgs {
    /// The flags as a config layer.
    pub fn flags(&self) -> FileConfig {
        FileConfig {
            listen: self.listen.clone(),
            spool: self.spool.clone(),
            spool_max_bytes: self.spool_max_bytes,
            alertmanager_urls: (!self.alertmanager_urls.is_empty())
                .then(|| self.alertmanager_urls.clone()),
            stdout: self.no_stdout.then_some(false),
            replay: self.replay.clone(),
            simulate: self.simulate.clone(),
            seed: self.seed,
            rate: self.rate,
            max_pending: self.max_pending,
            last_gasp: (!self.last_gasp.is_empty()).then(|| self.last_gasp.clone()),
            kmsg: self.kmsg.then_some(true),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot attach the probes: {0}; run `itewatch doctor` to see why, or feed the agent with --replay FILE or --simulate SCENARIO")]
    Probes(#[source] crate::probe::ProbeError),
    #[error("cannot read the trace {path}: {source}")]
    Replay {
        path: String,
        source: crate::trace::TraceError,
    },
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the writer thread: {source}")]
    Writer { source: std::io::Error },
}

/// The file layer (if any) under the flags, validated.
pub fn load_config(file: Option<&Path>, flags: FileConfig) -> Result<Config, ConfigError> {
    let base = match file {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    base.overlay(flags).validate()
}

/// What the HTTP side reads.
pub struct State {
    pub metrics: Arc<Metrics>,
    incidents: Mutex<Incidents>,
    /// Start (monotonic ns) of the oldest submission in flight; 0: none (live source only).
    oldest_inflight_ns: Arc<std::sync::atomic::AtomicU64>,
}

#[derive(Default)]
struct Incidents {
    by_id: BTreeMap<String, Incident>,
    order: VecDeque<String>,
}

impl State {
    pub(crate) fn new(metrics: Arc<Metrics>) -> State {
        State {
            metrics,
            incidents: Mutex::new(Incidents::default()),
            oldest_inflight_ns: Arc::default(),
        }
    }

    /// How long the oldest submission has been in flight, when that is past the critical
    /// hung bound (a CPU is presumably spinning in it with interrupts off).
    pub fn stalled_for(&self) -> Option<Duration> {
        let oldest = self
            .oldest_inflight_ns
            .load(std::sync::atomic::Ordering::Relaxed);
        sentinel::stalled_for(
            oldest,
            monotonic_ns(),
            CorrelatorConfig::default().hung_crit_ns,
        )
        .map(Duration::from_nanos)
    }

    fn remember(&self, inc: &Incident) {
        let mut g = self.incidents.lock().unwrap_or_else(|e| e.into_inner());
        if g.by_id.insert(inc.id.0.clone(), inc.clone()).is_none() {
            g.order.push_back(inc.id.0.clone());
            while g.order.len() > MAX_INCIDENTS_IN_MEMORY {
                if let Some(old) = g.order.pop_front() {
                    g.by_id.remove(&old);
                }
            }
        }
    }

    /// `/incidents`: one summary object per incident, in id order.
    pub fn incidents_json(&self) -> String {
        let g = self.incidents.lock().unwrap_or_else(|e| e.into_inner());
        let list: Vec<serde_json::Value> = g
            .by_id
            .values()
            .map(|i| {
                serde_json::json!({
                    "id": i.id,
                    "revision": i.revision,
                    "kind": i.kind,
                    "severity": i.severity,
                    "window": i.window,
                    "bdf": i.device.bdf.map(|b| b.to_string()),
                    "start_ns": i.start,
                    "end_ns": i.end,
                    "closed": i.closed,
                })
            })
            .collect();
        serde_json::to_string(&serde_json::json!({ "incidents": list })).unwrap_or_default()
    }

    /// `/incidents/{id}`: the incident in the JSON incident format.
    pub fn incident_json(&self, id: &str) -> Option<String> {
        let g = self.incidents.lock().unwrap_or_else(|e| e.into_inner());
        g.by_id.get(id).and_then(|i| serde_json::to_string(i).ok())
    }

    /// Severity of the latest revision of `id` seen (among the last 1000 incidents).
    fn severity_of(&self, id: &str) -> Option<crate::correlate::incident::Severity> {
        let g = self.incidents.lock().unwrap_or_else(|e| e.into_inner());
        g.by_id.get(id).map(|i| i.severity)
    }

    /// Number of incidents known.
    pub fn incident_count(&self) -> usize {
        self.incidents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .len()
    }
}

enum Source {
    /// A trace, a scenario or the endless soak stream, paced by `Config::rate` if set.
    Finite(Box<dyn Iterator<Item = Record> + Send>),
    /// The live probes, attached before the runtime starts (so that the capabilities can be
    /// dropped while there is one thread).
    Live(Box<LiveReader>),
}

/// A duplicate of the ring buffer's fd, registered with the runtime so that events wake the
/// main loop; the reader itself sits in the shared pipeline (agent/sentinel.rs).
struct RingFd(OwnedFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl RingFd {
    fn register(reader: &LiveReader) -> std::io::Result<AsyncFd<RingFd>> {
        // SAFETY: `reader`'s fd is open (the reader owns its ring buffer map); we only
        // duplicate it, and the OwnedFd closes the duplicate when dropped.
        let dup = unsafe { std::os::fd::BorrowedFd::borrow_raw(reader.as_raw_fd()) }
            .try_clone_to_owned()?;
        // SAFETY: RingFd owns the duplicate for its whole life and always returns that fd.
        unsafe { AsyncFd::register_with_interest(RingFd(dup), tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)
    }
}

/// A running agent.
pub struct Handle {
    pub addr: SocketAddr,
    pub state: Arc<State>,
    stop: watch::Sender<bool>,
    reload: mpsc::Sender<()>,
    main: tokio::task::JoinHandle<()>,
    server: tokio::task::JoinHandle<()>,
}

impl Handle {
    /// Asks for a config reload (what SIGHUP does).
    pub async fn reload(&self) {
        let _ = self.reload.send(()).await;
    }

    /// Stops the agent: the stream stops, pending deliveries stay in the spool.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.main.await;
        self.server.abort();
        let _ = self.server.await;
    }
}

/// What a spooled incident document says about where it came from: the source's header
/// (host facts and probes for a live agent) and the trace's path for a replay.
struct DocContext {
    header: TraceHeader,
    path: Option<String>,
}

fn open_source(src: &SourceConfig, metrics: &Metrics) -> Result<(Source, DocContext), AgentError> {
    let simulated = |scenario: &str, seed: u64| DocContext {
        header: TraceHeader::new(TraceSource::Simulated {
            scenario: scenario.to_string(),
            seed,
        }),
        path: None,
    };
    match src {
        SourceConfig::Simulate { scenario, seed } => {
            let records = crate::simulate::stream::named(scenario, *seed)
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
            Ok((Source::Finite(records), simulated(scenario, *seed)))
        }
        SourceConfig::Replay(p) => {
            let rerr = |source| AgentError::Replay {
                path: p.display().to_string(),
                source,
            };
            let reader = crate::trace::TraceReader::open(p).map_err(rerr)?;
            let doc = DocContext {
                header: reader.header().clone(),
                path: Some(p.display().to_string()),
            };
            for probe in &reader.header().probes {
                metrics.probe(
                    &probe.name,
                    probe.attached(),
                    crate::probe::is_required(&probe.name),
                );
            }
            // Read as the stream goes: memory stays bounded whatever the trace's size. A
            // cut-short or damaged trace still gives its records up to the cut.
            let path = p.display().to_string();
            let records = reader
                .map_while(move |r| r.map_err(|e| eprintln!("itewatch agent: {path}: {e}")).ok());
            Ok((Source::Finite(Box::new(records)), doc))
        }
        SourceConfig::Live => {
            let live = LiveReader::attach(&crate::probe::LoadOptions::default())
                .map_err(AgentError::Probes)?;
            for p in live.plan() {
                metrics.probe(&p.name, p.attached(), crate::probe::is_required(&p.name));
            }
            let missing = live.missing_required();
            metrics.set_required_missing(missing.clone());
            if !missing.is_empty() {
                eprintln!(
                    "itewatch agent: required probes missing: {} (see `itewatch doctor`)",
                    live.missing_required_why().join("; ")
                );
            }
            // Before the capabilities are dropped: a device's ATS state needs them.
            let header = crate::host::live_header(live.plan(), live.kernel_fixes(), monotonic_ns());
            Ok((
                Source::Live(Box::new(live)),
                DocContext { header, path: None },
            ))
        }
    }
}

fn hostname() -> String {
    crate::probe::read_trimmed(Path::new("/proc/sys/kernel/hostname"))
        .unwrap_or_else(|| "unknown".into())
}

/// What needs privilege or may fail early: the bound socket and the open source. `run`
/// prepares it before the runtime's threads exist, then drops capabilities.
struct Prepared {
    listener: std::net::TcpListener,
    metrics: Arc<Metrics>,
    source: Source,
    doc: DocContext,
}

fn prepare(cfg: &Config) -> Result<Prepared, AgentError> {
    let bind_err = |source| AgentError::Bind {
        addr: cfg.listen,
        source,
    };
    let listener = std::net::TcpListener::bind(cfg.listen).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let metrics = Arc::new(Metrics::new());
    let (source, doc) = open_source(&cfg.source, &metrics)?;
    Ok(Prepared {
        listener,
        metrics,
        source,
        doc,
    })
}

/// Starts the agent: binds, opens the source and the spool, spawns the tasks.
pub async fn start(
    cfg: Config,
    config_file: Option<PathBuf>,
    flags: FileConfig,
) -> Result<Handle, AgentError> {
    let prepared = prepare(&cfg)?;
    start_prepared(prepared, cfg, config_file, flags).await
}

async fn start_prepared(
    prepared: Prepared,
    cfg: Config,
    config_file: Option<PathBuf>,
    flags: FileConfig,
) -> Result<Handle, AgentError> {
    let Prepared {
        listener,
        metrics,
        source,
        doc,
    } = prepared;
    let bind_err = |source| AgentError::Bind {
        addr: cfg.listen,
        source,
    };
    let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let state = Arc::new(State::new(metrics.clone()));
    let open_spool = |what: &str| -> Option<Spool> {
        let dir = cfg.spool.as_ref()?;
        match Spool::open(dir, cfg.spool_max_bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                metrics.spool_error("open");
                eprintln!("itewatch agent: {e}; {what} are kept in memory only");
                None
            }
        }
    };
    let spool = open_spool("incidents");
    let pusher = Pusher::new(
        cfg.alertmanager_urls.clone(),
        open_spool("Alertmanager deliveries"),
        metrics.clone(),
        cfg.max_pending,
    );
    let (tx, rx) = mpsc::channel(1024);
    let writer = writer::Writer::spawn(writer::Sinks {
        spool,
        spool_dir: cfg.spool.clone(),
        spool_max_bytes: cfg.spool_max_bytes,
        metrics: metrics.clone(),
        pusher: tx.clone(),
        header: doc.header.clone(),
        path: doc.path.clone(),
    })
    .map_err(|source| AgentError::Writer { source })?;
    let pusher = tokio::spawn(pusher.run(rx));
    let server = tokio::spawn(http::serve(listener, state.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (reload_tx, reload_rx) = mpsc::channel(4);
    let worker = Worker {
        cfg,
        config_file,
        flags,
        state: state.clone(),
        metrics,
        writer,
        tx,
        instance: hostname(),
        doc,
    };
    let main = tokio::spawn(async move {
        worker.run(source, stop_rx, reload_rx).await;
        // The pusher ends when its channel closes (the worker dropped the sender); one in
        // the middle of a POST is cut off: what it had not delivered stays pending.
        let abort = pusher.abort_handle();
        if tokio::time::timeout(Duration::from_secs(1), pusher)
            .await
            .is_err()
        {
            abort.abort();
        }
    });
    Ok(Handle {
        addr,
        state,
        stop: stop_tx,
        reload: reload_tx,
        main,
        server,
    })
}

struct Worker {
    cfg: Config,
    config_file: Option<PathBuf>,
    flags: FileConfig,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// Spool, stdout and deliveries, off this task (agent/writer.rs). Dropped with the
    /// worker, which finishes every queued job first.
    writer: writer::Writer,
    tx: mpsc::Sender<Msg>,
    instance: String,
    doc: DocContext,
}

impl Worker {
    /// The correlator's config: defaults, with the fixes the source's kernel code showed
    /// (the live header's, or the replayed trace's).
    fn correlator_config(&self) -> CorrelatorConfig {
        CorrelatorConfig {
            kernel_fixes: self.doc.header.kernel_fixes.clone(),
            ..CorrelatorConfig::default()
        }
    }

    /// Hands one incident revision (from a drain or chunk that began at `onset`) to the
    /// writer, which spools, prints and alerts it (agent/writer.rs); the metrics, `/incidents`
    /// and the alert's step are updated here.
    fn emit(&mut self, inc: Incident, stats: &crate::correlate::Stats, onset: std::time::Instant) {
        let step = alert::step(self.state.severity_of(&inc.id.0), &inc);
        self.metrics.incident(&inc, step == alert::Step::Escalated);
        self.state.remember(&inc);
        let pending =
            (step != alert::Step::None && !self.cfg.alertmanager_urls.is_empty()).then(|| {
                Pending {
                    id: alert::delivery_id(&inc, step),
                    alert: alert_for(&inc, &self.instance),
                    delivered_to: Vec::new(),
                }
            });
        let onset = (inc.revision == 0).then_some(onset);
        self.writer
            .send(writer::Job::Incident(Box::new(writer::Queued {
                inc,
                stats: stats.clone(),
                line: self.cfg.stdout,
                pending,
                onset,
            })));
    }

    /// Emits `out` (from a drain or chunk that began at `onset`), then hands free heap pages
    /// back once in a while.
    fn emit_all(
        &mut self,
        out: Vec<Incident>,
        stats: &crate::correlate::Stats,
        last_trim: &mut std::time::Instant,
        onset: std::time::Instant,
    ) {
        for inc in out {
            self.emit(inc, stats, onset);
        }
        if last_trim.elapsed() >= TRIM_EVERY {
            *last_trim = std::time::Instant::now();
            release_free_memory();
        }
    }

    async fn reload(&mut self) {
        match load_config(self.config_file.as_deref(), self.flags.clone()) {
            Ok(new) => {
                if new.listen != self.cfg.listen
                    || new.spool != self.cfg.spool
                    || new.source != self.cfg.source
                {
                    eprintln!(
                        "itewatch agent: reload: listen, spool and source change only on restart"
                    );
                }
                if new.alertmanager_urls != self.cfg.alertmanager_urls {
                    let _ = self.tx.send(Msg::Urls(new.alertmanager_urls.clone())).await;
                }
                if new.max_pending != self.cfg.max_pending {
                    let _ = self.tx.send(Msg::MaxPending(new.max_pending)).await;
                }
                if new.rate != self.cfg.rate {
                    eprintln!("itewatch agent: reload: rate changes only on restart");
                }
                if new.spool_max_bytes != self.cfg.spool_max_bytes {
                    self.writer.send(writer::Job::MaxBytes(new.spool_max_bytes));
                }
                self.cfg.max_pending = new.max_pending;
                self.cfg.alertmanager_urls = new.alertmanager_urls;
                self.cfg.spool_max_bytes = new.spool_max_bytes;
                self.cfg.stdout = new.stdout;
                eprintln!("itewatch agent: configuration reloaded");
            }
            Err(e) => eprintln!("itewatch agent: reload failed, keeping the running config: {e}"),
        }
    }

    async fn run(self, source: Source, stop: watch::Receiver<bool>, reload: mpsc::Receiver<()>) {
        match source {
            Source::Finite(it) => self.run_finite(it, stop, reload).await,
            Source::Live(reader) => self.run_live(*reader, stop, reload).await,
        }
    }

    /// A trace, a scenario or a soak stream: fed in chunks (paced if asked), never advanced
    /// past its last record; at its end every open incident is closed.
    async fn run_finite(
        mut self,
        mut it: Box<dyn Iterator<Item = Record> + Send>,
        mut stop: watch::Receiver<bool>,
        mut reload: mpsc::Receiver<()>,
    ) {
        let mut corr = Some(Correlator::new(self.correlator_config()));
        let paced_since = std::time::Instant::now();
        let mut fed: u64 = 0;
        let mut last_ts = KTime(0);
        let mut stats = crate::correlate::Stats::default();
        let mut last_trim = std::time::Instant::now();
        loop {
            let mut out = Vec::new();
            let mut tick = Duration::from_millis(100);
            let mut finished = false;
            let mut snapshot_due = false;
            let onset = std::time::Instant::now();
            if let Some(c) = corr.as_mut() {
                let want = match self.cfg.rate {
                    Some(rate) => paced_budget(rate, paced_since.elapsed(), fed, CHUNK),
                    None => CHUNK,
                };
                // Each incident goes to the writer as the correlator emits it, not after the
                // rest of the chunk.
                let metrics = self.metrics.clone();
                let n = feed_chunk(c, it.as_mut(), want, &metrics, &mut last_ts, |inc, st| {
                    self.emit(inc, st, onset)
                });
                fed += n as u64;
                snapshot_due = n > 0;
                if self.cfg.rate.is_some() && n == want {
                    // Paced: come back when the next records are due (at once when behind
                    // by a whole chunk).
                    tick = if want == CHUNK {
                        Duration::ZERO
                    } else {
                        PACE_TICK
                    };
                } else if n < want {
                    // End of the stream: close what is open, report what is left.
                    finished = true;
                    if let Some(c) = corr.take() {
                        let (n, oldest) = c.inflight_summary();
                        let sum = c.finish();
                        out.extend(sum.incidents);
                        self.metrics.inflight_at(n, oldest, sum.end);
                        stats = sum.stats;
                    }
                } else {
                    tick = Duration::ZERO;
                }
            }
            self.emit_all(out, &stats, &mut last_trim, onset);
            // The gauges after the incidents: they are on their way to disk first.
            if let (true, Some(c)) = (snapshot_due, &corr) {
                let (n, oldest) = c.inflight_summary();
                self.metrics.inflight_at(n, oldest, last_ts);
            }
            if finished {
                eprintln!(
                    "itewatch agent: end of the source: {fed} records, {} incidents; serving until stopped",
                    self.state.incident_count()
                );
            }
            tokio::select! {
                _ = stop.changed() => break,
                r = reload.recv() => if r.is_some() { self.reload().await },
                _ = tokio::time::sleep(tick) => {}
            }
            if *stop.borrow() {
                break;
            }
        }
    }

    /// The live probes: the ring buffer's fd wakes the loop, a 100 ms tick advances the
    /// correlator's clock while nothing happens (a hung submission is raised then), and
    /// sentinels pinned to other CPUs take over the pipeline when this loop stops running
    /// (agent/sentinel.rs). Every incident goes to the last-gasp channels first.
    async fn run_live(
        mut self,
        reader: LiveReader,
        mut stop: watch::Receiver<bool>,
        mut reload: mpsc::Receiver<()>,
    ) {
        let registered = RingFd::register(&reader);
        let shared = Shared::new(
            Pipe::new(reader, Correlator::new(self.correlator_config())),
            self.state.oldest_inflight_ns.clone(),
        );
        let mut readable = match registered {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("itewatch agent: ring buffer fd: {e}; polling it every 100 ms");
                None
            }
        };
        let (paths, kmsg) = (self.cfg.last_gasp.clone(), self.cfg.kmsg);
        let metrics = self.metrics.clone();
        let open = |writer: &str| {
            let (lg, errors) = LastGasp::open(writer, &paths, kmsg);
            for e in errors {
                eprintln!("itewatch agent: {e}");
            }
            lg.with_metrics(metrics.clone())
        };
        let mut lastgasp = open("main");
        let (rescued_tx, rescued) = std::sync::mpsc::channel();
        let cpus = sentinel::spread(&sentinel::allowed_cpus(), sentinel::MAX_SENTINELS);
        let sentinels = Sentinels::spawn(shared.clone(), &cpus, open, rescued_tx);
        eprintln!(
            "itewatch agent: {} sentinel thread(s) on CPU {:?}",
            sentinels.len(),
            cpus
        );
        let mut stats = crate::correlate::Stats::default();
        let mut last_trim = std::time::Instant::now();
        loop {
            let mut tick = Duration::from_millis(100);
            let onset = std::time::Instant::now();
            {
                let mut pipe = shared.pipe.lock().unwrap_or_else(|e| e.into_inner());
                let withheld = lastgasp.kmsg_skipped;
                let mut said_withheld = false;
                let metrics = self.metrics.clone();
                // Each revision goes to the last-gasp channels, then to the writer, as the
                // correlator emits it, not after the rest of the drain.
                let step = pipe.step_each(Some(&metrics), |inc, rate, st| {
                    lastgasp.write(&inc, monotonic_ns(), rate);
                    if withheld == 0 && lastgasp.kmsg_skipped > 0 && !said_withheld {
                        said_withheld = true;
                        eprintln!(
                            "itewatch agent: a critical line was kept off /dev/kmsg: the kernel \
                             log floods ({rate} lines/s, above {}); a printk now could keep this \
                             CPU printing the flood. It went to the other last-gasp channels \
                             and the spool; counted in itewatch_last_gasp_unwritten_total.",
                            lastgasp::KMSG_MAX_LOG_RATE
                        );
                    }
                    stats.clone_from(st);
                    self.emit(inc, st, onset);
                });
                shared.beat(&step);
                if step.more {
                    tick = Duration::ZERO;
                }
            }
            // What sentinels produced while this loop did not run: already on their last-gasp
            // channels, now spooled, printed and alerted.
            let out: Vec<Incident> = rescued.try_iter().collect();
            self.emit_all(out, &stats, &mut last_trim, onset);
            tokio::select! {
                _ = stop.changed() => break,
                r = reload.recv() => if r.is_some() { self.reload().await },
                _ = tokio::time::sleep(tick) => {}
                // Events wake the loop at once (an incident is persisted within
                // milliseconds); the tick still advances the correlator's clock, so a
                // hung invalidation is raised while nothing else happens.
                _ = ring_readable(readable.as_mut()) => {}
            }
            if *stop.borrow() {
                break;
            }
        }
        drop(readable);
        drop(sentinels);
    }
}

/// Resolves when the live ring buffer has events waiting (never without a registered fd). The
/// readiness is cleared before the drain, so events that arrive during it wake the loop again.
async fn ring_readable(fd: Option<&mut AsyncFd<RingFd>>) {
    match fd {
        Some(a) => match a.readable_mut().await {
            Ok(mut guard) => guard.clear_ready(),
            // Polling failed: fall back to the tick.
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// glibc gives threads that allocate their own malloc arenas (up to 8 per core). The agent's
/// allocations come from one busy task that tokio moves between its threads, so freed memory
/// sat in several arenas: 67 MiB RSS after 90 s at 100 k events/s, 40 MiB with one arena
/// (docs/benchmarks.md). One arena suits one busy task; call before other threads exist.
///
/// The mmap and trim thresholds are fixed too: glibc raises both (up to 32 and 64 MiB) the
/// first time a large block it had mapped is freed, after which large blocks come from the
/// heap and freed memory is no longer given back. Fixed, large freed blocks go back to the
/// kernel: RSS after 90 s at 100 k events/s from 34.7 to 32.1 MiB (simulated source) and from
/// 32.3 to 31.2 MiB (replayed trace), for about one point more of CPU (docs/benchmarks.md).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets parameters of the allocator; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// How often the agent hands free heap pages back to the kernel.
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Gives the kernel back the free pages inside glibc's heap, not only at its top: under a
/// steady stream the live heap is ~2.5 MiB (massif) while the heap's resident pages grew to
/// 16 MiB, freed blocks pinned below a live one. Costs a walk of the free lists.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only returns free memory of the allocator to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

/// Feeds up to `want` records of `it` to `c` (counting them in `metrics`, the newest
/// timestamp in `last_ts`) and hands each incident revision to `emit` with the correlator's
/// counts as soon as the correlator emits it: an incident found early in a chunk does not
/// wait for the rest of the chunk to be processed. Returns how many records were fed.
fn feed_chunk(
    c: &mut Correlator,
    it: &mut (dyn Iterator<Item = Record> + Send),
    want: usize,
    metrics: &Metrics,
    last_ts: &mut KTime,
    mut emit: impl FnMut(Incident, &crate::correlate::Stats),
) -> usize {
    let mut n = 0;
    for r in it.take(want) {
        metrics.observe(&r);
        if let Some(t) = r.ts() {
            *last_ts = (*last_ts).max(t);
        }
        let out = c.push_owned(r);
        if !out.is_empty() {
            let stats = c.stats();
            for inc in out {
                emit(inc, stats);
            }
        }
        n += 1;
    }
    n
}

/// `itewatch agent`: parse the config, run until SIGTERM/SIGINT, reload on SIGHUP.
pub fn run(args: AgentArgs) -> Result<ExitCode, AgentError> {
    let flags = args.flags();
    let cfg = load_config(args.config.as_deref(), flags.clone())?;
    if args.check_config {
        let problems = config::check_startable(&cfg);
        if problems.is_empty() {
            println!("itewatch agent: configuration is valid");
            return Ok(ExitCode::SUCCESS);
        }
        for p in &problems {
            eprintln!("itewatch agent: {p}");
        }
        return Err(AgentError::Config(ConfigError::Invalid(format!(
            "the agent could not start with this configuration ({} problem{})",
            problems.len(),
            if problems.len() == 1 { "" } else { "s" }
        ))));
    }
    // Bind and open the source (attach the probes) while this is the only thread, then drop
    // the capabilities not needed any more: the runtime's threads inherit the reduced sets.
    let prepared = prepare(&cfg)?;
    privileges::drop_after_start(&cfg.source);
    limit_malloc_arenas();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(AgentError::Runtime)?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(AgentError::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Runtime)?;
        let mut hup = signal(SignalKind::hangup()).map_err(AgentError::Runtime)?;
        let h = start_prepared(prepared, cfg, args.config.clone(), flags).await?;
        eprintln!("itewatch agent: serving http://{}/metrics", h.addr);
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    h.reload().await;
                    continue;
                }
            }
            // Stopping detaches the probes: kernel text patching that waits for every CPU to
            // answer an IPI. Behind a submission in flight this long, one CPU presumably
            // spins with interrupts off and never answers: the detaching CPU would stop too
            // (seen in the VM on 6.1). Keep running and keep watching instead.
            match h.state.stalled_for() {
                None => break,
                Some(age) => eprintln!(
                    "itewatch agent: not stopping: a submission has been in flight for {:.1} s \
                     (a CPU spinning with interrupts off?); detaching the probes would wait for \
                     that CPU for ever and stop this one too. Still watching; SIGKILL ends the \
                     agent, and the kernel then detaches the probes itself.",
                    age.as_secs_f64()
                ),
            }
        }
        eprintln!("itewatch agent: stopping");
        h.stop().await;
        Ok(ExitCode::SUCCESS)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 11: an incident the correlator emits early in a chunk goes to the writer then,
    /// while the rest of the chunk is still unread, not after the whole chunk.
    #[test]
    fn an_incident_is_handed_over_before_the_rest_of_its_chunk_is_processed() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let recs = crate::simulate::generate("w1-driver-inflight", 1)
            .unwrap()
            .records;
        let total = recs.len();
        let taken = Arc::new(AtomicUsize::new(0));
        let t = taken.clone();
        let mut it: Box<dyn Iterator<Item = Record> + Send> =
            Box::new(recs.into_iter().inspect(move |_| {
                t.fetch_add(1, Ordering::Relaxed);
            }));
        let mut c = Correlator::new(CorrelatorConfig::default());
        let metrics = Metrics::new();
        let mut last_ts = KTime(0);
        let mut handed = Vec::new();
        let n = feed_chunk(
            &mut c,
            it.as_mut(),
            total,
            &metrics,
            &mut last_ts,
            |inc, st| handed.push((inc.revision, st.records, taken.load(Ordering::Relaxed))),
        );
        assert_eq!(n, total);
        let (rev, counted, read) = *handed.first().expect("the scenario raises an incident");
        assert_eq!(rev, 0);
        assert!(
            read < total,
            "handed over after all {total} records were read"
        );
        assert_eq!(
            counted as usize, read,
            "the counts are those of the hand-over"
        );
    }

    #[test]
    fn paced_budget_follows_the_rate_and_the_chunk() {
        let ms = Duration::from_millis;
        assert_eq!(paced_budget(100_000, ms(0), 0, CHUNK), 0);
        assert_eq!(paced_budget(100_000, ms(10), 0, CHUNK), 1000);
        assert_eq!(paced_budget(100_000, ms(10), 600, CHUNK), 400);
        // Ahead of the rate: nothing now. Far behind: one chunk at a time.
        assert_eq!(paced_budget(100_000, ms(10), 5000, CHUNK), 0);
        assert_eq!(paced_budget(100_000, ms(10_000), 0, CHUNK), CHUNK);
        assert_eq!(paced_budget(u64::MAX, Duration::MAX, 0, CHUNK), CHUNK);
    }
}
