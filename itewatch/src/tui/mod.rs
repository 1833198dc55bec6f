//! `itewatch live`: the live view (docs/tui.md).
//!
//! ```text
//! source (live probes | --replay FILE | --simulate SCENARIO) ─► Record
//!    ─► App::observe (latencies, descriptor kinds, losses) ─► Correlator ─► revisions/snapshot
//!    ─► App (plain state) ─► ui::draw (pure) ─► terminal at --fps
//! keys ─► input::map_key ─► Action ─► App::apply (state) | the loop (quit, export)
//! ```
//!
//! Without a terminal (a pipe, CI) or with `--no-tui`, the stream is played as fast as
//! possible and a plain-text summary is printed. Where live tracing is impossible (no BPF
//! object, not root, no BTF, no kprobes), the reason is shown on one screen and the view runs
//! on the bundled VM trace instead (or a simulated scenario when that is absent).

pub mod bench;
pub mod export;
pub mod input;
pub mod lanes;
pub mod metrics;
pub mod source;
pub mod state;
pub mod term;
pub mod ui;

use std::collections::BTreeSet;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crossterm::event::{Event as CEvent, KeyCode};
use crossterm::ExecutableCommand;

use crate::correlate::{Config, Correlator};
use crate::event::{KTime, Record};
use crate::probe::{LoadOptions, ProbeError, Probes};
use crate::record::monotonic_ns;
use crate::simulate::SimError;
use crate::trace::{Source as TraceSource, TraceError, TraceReader};

use input::Action;
use metrics::BpfCost;
use source::{Live, Playback, Source};
use state::{App, HeaderInfo};
use ui::Unavailable;

/// `itewatch live` options.
#[derive(clap::Args, Clone, Debug)]
pub struct LiveArgs {
    /// Drive the view from a trace file (from `record` or `simulate`) instead of the probes.
    #[arg(long, value_name = "FILE", conflicts_with = "simulate")]
    pub replay: Option<PathBuf>,
    /// Drive the view from a simulated race scenario (`itewatch simulate --list`); `soak` is an
    /// endless mix of benign traffic (~100 k events/s) and every incident scenario, `storm`
    /// the same with an incident in every chunk (as for `agent --simulate`).
    #[arg(long, value_name = "SCENARIO")]
    pub simulate: Option<String>,
    /// Seed of the simulated scenario.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Playback speed of --replay/--simulate: 1 = as recorded, 0.001 = 1000× slower,
    /// 0 = as fast as possible.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Print a plain-text summary instead of the interactive view (automatic when stdout is
    /// not a terminal).
    #[arg(long)]
    pub no_tui: bool,
    /// Redraws per second.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=60))]
    pub fps: u32,
    /// Where the `e` key writes JSON reports.
    #[arg(long, default_value = ".")]
    pub export_dir: PathBuf,
    /// Stop after this many seconds (demos, benchmarks; live without a terminal: default 10).
    #[arg(long, value_name = "SECS")]
    pub exit_after: Option<f64>,
    /// On exit, write run statistics (frames, records, CPU time) as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_file: Option<PathBuf>,
    /// Kernel BTF for live probes (default /sys/kernel/btf/vmlinux).
    #[arg(long)]
    pub btf: Option<PathBuf>,
    /// Ring buffer size in KiB (a power of two).
    #[arg(long, default_value_t = 4096)]
    pub ringbuf_kib: u32,
    /// Live probes: once they are attached, write the attach plan as JSON to this file (for
    /// scripts that must not start the workload before the tracer sees it).
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    #[error("cannot read {path}: {source}")]
    Trace { path: String, source: TraceError },
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error("live probes: {0}")]
    Probe(#[from] ProbeError),
    /// `--export-dir` is checked before the view starts, not when `e` is pressed.
    #[error("--export-dir: {0} (the `e` key exports there; pass --export-dir DIR)")]
    ExportDir(crate::output::WriteError),
    // Not transparent: the io::Error stays in the chain (a closed pipe exits 0).
    #[error("terminal or output: {0}")]
    Io(#[from] io::Error),
}

/// Records pulled from the source at a time; between chunks the loop checks whether a frame
/// is due.
const CHUNK: usize = 4_096;

/// The trace shown where this host cannot be traced: recorded from Debian 6.1.170 by the VM
/// tests (`itewatch/tests/data/vm/6.1/trace.itw`, 340 KB), embedded in the binary so that a
/// copied binary has it too. The oldest kernel's: it lacks the fixes, so it shows the race.
pub const BUNDLED_TRACE: &[u8] = include_bytes!("../../tests/data/vm/6.1/trace.itw");
/// The kernel [`BUNDLED_TRACE`] was recorded on.
pub const BUNDLED_KERNEL: &str = "6.1";

/// Exit status of `live --no-tui` when this host could not be traced and a recording from the
/// VM was shown instead: its incidents are not this host's.
pub const EXIT_NOT_THIS_HOST: u8 = 3;

/// A trace to replay: a file, or the one embedded in the binary.
#[derive(Clone, Debug)]
pub enum TraceInput {
    File(PathBuf),
    Bundled,
}

impl TraceInput {
    fn open(&self) -> Result<TraceReader<Box<dyn io::BufRead>>, LiveError> {
        let opened = match self {
            TraceInput::File(p) => std::fs::File::open(p)
                .map_err(|source| TraceError::Open { source })
                .and_then(|f| {
                    TraceReader::new(
                        Box::new(io::BufReader::with_capacity(1 << 20, f)) as Box<dyn io::BufRead>
                    )
                }),
            TraceInput::Bundled => {
                TraceReader::new(Box::new(BUNDLED_TRACE) as Box<dyn io::BufRead>)
            }
        };
        opened.map_err(|source| LiveError::Trace {
            path: match self {
                TraceInput::File(p) => p.display().to_string(),
                TraceInput::Bundled => "the bundled VM trace".to_string(),
            },
            source,
        })
    }
}

/// The fallback trace: `ITEWATCH_FALLBACK_TRACE` if set (a file), else the embedded one; with
/// the kernel it was recorded on.
pub fn bundled_trace() -> Option<(TraceInput, String)> {
    if let Some(p) = std::env::var_os("ITEWATCH_FALLBACK_TRACE") {
        let p = PathBuf::from(p);
        return p
            .is_file()
            .then(|| (TraceInput::File(p), "ITEWATCH_FALLBACK_TRACE".to_string()));
    }
    Some((TraceInput::Bundled, BUNDLED_KERNEL.to_string()))
}

/// How the header's warning starts when a replayed trace is damaged (the rest is the error).
const DAMAGED: &str = "trace damaged, played up to: ";

/// The recorded BPF cost in a trace's end frame.
fn recorded_cost(end: &crate::trace::TraceEnd) -> Option<BpfCost> {
    if end.programs.is_empty() {
        return None;
    }
    let runs: u64 = end.programs.iter().map(|p| p.run_count).sum();
    let time: u64 = end.programs.iter().map(|p| p.run_time_ns).sum();
    Some(BpfCost {
        runs,
        ns_per_run: if runs == 0 {
            0.0
        } else {
            time as f64 / runs as f64
        },
        cpu_percent: end
            .duration_ns
            .filter(|d| *d > 0)
            .map_or(0.0, |d| time as f64 * 100.0 / d as f64),
    })
}

/// A playback source and what the header says about it.
struct Opened {
    source: Source,
    header: HeaderInfo,
    trace_source: TraceSource,
    recorded: Option<BpfCost>,
    /// The fixes the source kernel's code carries (trace header / this host), for the
    /// correlator's verdicts.
    kernel_fixes: Vec<crate::trace::KernelFixStatus>,
}

fn open_replay(input: &TraceInput, speed: f64, label: String) -> Result<Opened, LiveError> {
    // Two passes, so that memory does not grow with the trace: the first checks every frame
    // (damage, end frame with the recorded BPF cost) and keeps nothing, the second streams
    // the records to the view and stops where the first found damage.
    let mut reader = input.open()?;
    let th = reader.header().clone();
    let mut damaged = None;
    loop {
        match reader.next_record() {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                damaged = Some(e.to_string());
                break;
            }
        }
    }
    let end = reader.finished().cloned();
    let mut header = HeaderInfo {
        source: label,
        host: th.host.hostname.clone(),
        kernel: th.host.kernel_release.clone(),
        iommus: iommu_names(&th),
        probes: th.probes.clone(),
        warning: None,
        doc_host: Some(crate::document::host_from_header(&th, false)),
        decoder: reader.decoder_stats(),
    };
    if let TraceSource::Simulated { scenario, seed } = &th.source {
        header.host = format!("(simulated {scenario} seed {seed})");
        header.doc_host = None;
    }
    if let Some(d) = damaged {
        header.warning = Some(format!("{DAMAGED}{d}"));
    }
    let records = input.open()?.map_while(Result::ok);
    let p = Playback::new(Box::new(records), speed);
    let recorded = end.as_ref().and_then(recorded_cost);
    Ok(Opened {
        source: Source::Playback(Box::new(p)),
        header,
        trace_source: th.source,
        recorded,
        kernel_fixes: th.kernel_fixes,
    })
}

fn open_simulated(name: &str, seed: u64, speed: f64) -> Result<Opened, LiveError> {
    let recs: Box<dyn Iterator<Item = Record>> = crate::simulate::stream::named(name, seed)?;
    Ok(Opened {
        source: Source::Playback(Box::new(Playback::new(recs, speed))),
        header: HeaderInfo {
            source: format!("simulate {name} seed {seed}"),
            host: "(simulated)".into(),
            kernel: "(simulated)".into(),
            ..Default::default()
        },
        trace_source: TraceSource::Simulated {
            scenario: name.to_string(),
            seed,
        },
        recorded: None,
        kernel_fixes: Vec::new(),
    })
}

/// What the doctor says is missing, for the one-screen explanation.
fn doctor_missing() -> Vec<(String, String)> {
    use crate::doctor::{diagnose, HostView, Status};
    let r = diagnose(&HostView::live());
    let mut v: Vec<(String, String)> = r
        .host
        .iter()
        .filter(|c| matches!(c.status, Status::Missing))
        .map(|c| (c.name.clone(), c.detail.clone()))
        .collect();
    for p in r
        .probes
        .iter()
        .filter(|p| p.required && p.status == Status::Missing)
    {
        v.push((format!("probe {}", p.target), p.detail.clone()));
    }
    v.truncate(8);
    v
}

/// The fallback when live tracing is impossible.
fn open_fallback(
    reason: &dyn std::fmt::Display,
    speed: f64,
) -> Result<(Opened, Unavailable), LiveError> {
    let missing = doctor_missing();
    let (opened, fallback) = match bundled_trace() {
        Some((input, kernel)) => {
            let label = format!("replay of the bundled VM trace ({kernel}), NOT THIS HOST");
            let o = open_replay(&input, speed, label.clone())?;
            (
                o,
                format!(
                    "a recording from the VM test on Linux {kernel}, not this host: its incidents are the VM's"
                ),
            )
        }
        None => (
            open_simulated("w1-driver-inflight", 0, speed)?,
            "the simulated w1-driver-inflight scenario (no bundled VM trace in this build)"
                .to_string(),
        ),
    };
    let mut opened = opened;
    opened.header.warning = Some(format!(
        "NOT LIVE: {reason}; showing {fallback} (run `sudo itewatch doctor`)"
    ));
    Ok((
        opened,
        Unavailable {
            reason: reason.to_string(),
            missing,
            fallback,
        },
    ))
}

/// The IOMMU units a trace header names (none in traces older than its `hardware` key).
fn iommu_names(th: &crate::trace::TraceHeader) -> BTreeSet<String> {
    th.hardware
        .as_ref()
        .map(|h| h.iommu_units.iter().map(|u| u.name.clone()).collect())
        .unwrap_or_default()
}

fn open_live(args: &LiveArgs) -> Result<(Opened, Option<Unavailable>), LiveError> {
    let load = LoadOptions {
        btf: args.btf.clone(),
        ringbuf_bytes: args.ringbuf_kib.saturating_mul(1024),
        ..Default::default()
    };
    let probes = match Probes::attach(&load) {
        Ok(p) => p,
        Err(e) => {
            let (o, u) = open_fallback(&e, args.speed)?;
            return Ok((o, Some(u)));
        }
    };
    // Some probe attached, but not those a verdict needs (e.g. only the printk tracepoint, or
    // an AMD host where pci_walk_bus attaches): a green running screen would be blind.
    let missing = probes.missing_required();
    if !missing.is_empty() {
        let why = format!(
            "required probes missing: {}",
            probes.missing_required_why().join("; ")
        );
        drop(probes);
        let (o, u) = open_fallback(&why, args.speed)?;
        return Ok((o, Some(u)));
    }
    let live = Live::new(probes, monotonic_ns())?;
    if let Some(path) = &args.ready_file {
        let plan = serde_json::to_vec_pretty(live.plan()).map_err(io::Error::other)?;
        std::fs::write(path, plan)?;
    }
    // This host as a recorder would write it into a trace header: the export's host section.
    let th = crate::host::live_header(live.plan(), live.kernel_fixes(), monotonic_ns());
    let header = HeaderInfo {
        source: "live".into(),
        host: th.host.hostname.clone(),
        kernel: th.host.kernel_release.clone(),
        iommus: iommu_names(&th),
        probes: live.plan().to_vec(),
        warning: None,
        doc_host: Some(crate::document::host_from_header(&th, false)),
        decoder: live.decoder_stats(),
    };
    Ok((
        Opened {
            source: Source::Live(Box::new(live)),
            header,
            trace_source: TraceSource::Live,
            recorded: None,
            kernel_fixes: th.kernel_fixes.clone(),
        },
        None,
    ))
}

/// The correlator, the view state and the source, advanced together.
struct Engine {
    corr: Option<Correlator>,
    app: App,
    src: Source,
    buf: Vec<Record>,
    records: u64,
    /// The newest record timestamp fed.
    delivered: KTime,
}

impl Engine {
    fn new(opened: Opened, cfg: Config) -> Engine {
        let cfg = Config {
            kernel_fixes: opened.kernel_fixes,
            ..cfg
        };
        let mut app = App::new(cfg.clone(), opened.header);
        app.meters.recorded_bpf = opened.recorded;
        Engine {
            corr: Some(Correlator::new(cfg)),
            app,
            src: opened.source,
            buf: Vec::new(),
            records: 0,
            delivered: KTime(0),
        }
    }

    fn feed(&mut self, recs: impl IntoIterator<Item = Record>) {
        let Some(c) = self.corr.as_mut() else {
            return;
        };
        let mut revs = Vec::new();
        for r in recs {
            self.app.observe(&r);
            self.records += 1;
            if let Some(t) = r.ts() {
                self.delivered = self.delivered.max(t);
            }
            revs.extend(c.push_owned(r));
        }
        self.app.on_revisions(revs);
    }

    /// One step: pull what is due, correlate it, tell the correlator the time.
    /// Stops pulling at `until` (the next frame) so that redraws keep their rate when the
    /// input outruns the CPU; the stream then lags, and the header's stream time shows it.
    fn step(&mut self, wall: u64, until: Option<Instant>) {
        if self.corr.is_none() {
            return;
        }
        let mut buf = std::mem::take(&mut self.buf);
        let drained = loop {
            self.src.poll(wall, CHUNK, &mut buf);
            let n = buf.len();
            self.feed(buf.drain(..));
            if n < CHUNK {
                break true;
            }
            if self.src.done() || until.is_some_and(|d| Instant::now() >= d) {
                break false;
            }
        };
        self.buf = buf;
        // Advance only to what the source has delivered: a live ring whose drain the frame
        // deadline cut short still holds records older than `wall` (a return among them would
        // be declared hung), so then only to the newest record fed; a playback's clock stops
        // at what it played.
        let to = match &self.src {
            Source::Live(_) if !drained => self.delivered,
            src => src.clock(wall),
        };
        if self.src.done() {
            self.finish();
        } else if let Some(c) = self.corr.as_mut() {
            let revs = c.advance(to);
            self.app.on_revisions(revs);
        }
    }

    /// Once a second: loss markers, new devices after a hot-plug and the BPF cost (live).
    fn periodic(&mut self, wall: u64) {
        let mut extra = Vec::new();
        if let Source::Live(l) = &mut self.src {
            l.periodic(wall, &mut extra);
            self.app.meters.bpf = l.cost;
            self.app.header.decoder = l.decoder_stats();
        }
        self.feed(extra);
    }

    /// End of a finite stream: settle the reorder window, keep the last snapshot (what was
    /// still in flight), then close every incident.
    fn finish(&mut self) {
        let Some(mut c) = self.corr.take() else {
            return;
        };
        let last = self.src.clock(u64::MAX);
        let revs = c.advance(KTime(last.0.saturating_add(c.config().reorder_window_ns)));
        self.app.on_revisions(revs);
        self.app.set_snapshot(c.snapshot());
        let summary = c.finish();
        self.app.on_revisions(summary.incidents);
        self.app.ended = true;
    }

    fn refresh_snapshot(&mut self) {
        if let Some(c) = &self.corr {
            self.app.set_snapshot(c.snapshot());
        }
    }
}

/// Run statistics for `--stats-file` (the benchmark reads them).
#[derive(serde::Serialize)]
struct RunStats {
    wall_s: f64,
    frames: u64,
    fps: f64,
    records: u64,
    events: u64,
    cpu_user_s: f64,
    cpu_sys_s: f64,
    cpu_percent: f64,
    max_rss_kib: i64,
}

fn run_stats(started: Instant, frames: u64, e: &Engine) -> RunStats {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is always valid.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let wall = started.elapsed().as_secs_f64();
    let (u, s) = (tv(ru.ru_utime), tv(ru.ru_stime));
    RunStats {
        wall_s: wall,
        frames,
        fps: frames as f64 / wall.max(1e-9),
        records: e.records,
        events: e.app.events,
        cpu_user_s: u,
        cpu_sys_s: s,
        cpu_percent: (u + s) * 100.0 / wall.max(1e-9),
        max_rss_kib: ru.ru_maxrss,
    }
}

fn write_stats(path: &Path, st: &RunStats) -> io::Result<()> {
    std::fs::write(
        path,
        serde_json::to_vec_pretty(st).map_err(io::Error::other)?,
    )
}

/// `itewatch live`.
pub fn run(args: LiveArgs) -> Result<ExitCode, LiveError> {
    let interactive = !args.no_tui && io::stdout().is_terminal() && io::stdin().is_terminal();
    if interactive {
        // Found out now, not after an hour of watching when `e` is pressed.
        crate::output::check_dir_writable(&args.export_dir).map_err(LiveError::ExportDir)?;
    }
    let (opened, unavailable) = match (&args.replay, &args.simulate) {
        (Some(f), _) => (
            open_replay(
                &TraceInput::File(f.clone()),
                args.speed,
                format!("replay {}", f.display()),
            )?,
            None,
        ),
        (None, Some(s)) => (open_simulated(s, args.seed, args.speed)?, None),
        (None, None) => open_live(&args)?,
    };
    let origin = export::Origin {
        source: opened.trace_source.clone(),
        path: match (&args.replay, &unavailable) {
            (Some(f), _) => Some(f.clone()),
            (None, Some(_)) => match bundled_trace() {
                Some((TraceInput::File(p), _)) => Some(p),
                _ => None,
            },
            (None, None) => None,
        },
        error: opened
            .header
            .warning
            .as_deref()
            .and_then(|w| w.strip_prefix(DAMAGED))
            .map(str::to_string),
    };
    let mut engine = Engine::new(opened, Config::default());
    if let Source::Live(_) = engine.src {
        // The first device snapshot: names for the SIDs before any event.
        engine.periodic(monotonic_ns());
    }
    term::install_signal_handlers();
    if interactive {
        run_tui(&args, engine, unavailable.as_ref(), &origin)
    } else {
        run_headless(&args, engine, unavailable.as_ref())
    }
}

/// No terminal: play the stream as fast as possible (live: for `--exit-after`, default 10 s),
/// then print the summary.
fn run_headless(
    args: &LiveArgs,
    mut e: Engine,
    unavailable: Option<&Unavailable>,
) -> Result<ExitCode, LiveError> {
    let started = Instant::now();
    let mut out = io::stdout().lock();
    if let Some(u) = unavailable {
        writeln!(out, "{}", u.text())?;
    }
    if let Source::Playback(p) = &mut e.src {
        // As fast as possible: the pacing only matters on a screen.
        p.unpace();
    }
    let endless = args
        .simulate
        .as_deref()
        .is_some_and(crate::simulate::stream::is_endless);
    let limit = args
        .exit_after
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(10));
    let mut last_periodic = Instant::now();
    loop {
        let wall = monotonic_ns();
        e.step(wall, Some(Instant::now() + Duration::from_millis(100)));
        if e.app.ended {
            break;
        }
        if let Source::Live(_) = e.src {
            if term::terminate_requested() || started.elapsed() >= limit {
                break;
            }
            if last_periodic.elapsed() >= Duration::from_secs(1) {
                e.periodic(monotonic_ns());
                last_periodic = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(50));
        } else if term::terminate_requested()
            || ((endless || args.exit_after.is_some()) && started.elapsed() >= limit)
        {
            break;
        }
    }
    e.refresh_snapshot();
    write!(out, "{}", ui::summary_text(&e.app, &e.app.cfg))?;
    if let Some(u) = unavailable {
        // A script must not book the recording's incidents against this host.
        writeln!(
            out,
            "NOT THIS HOST: the incidents above are from {}; exit status {EXIT_NOT_THIS_HOST}",
            u.fallback
        )?;
    }
    out.flush()?;
    if let Some(p) = &args.stats_file {
        write_stats(p, &run_stats(started, 0, &e))?;
    }
    Ok(match unavailable {
        Some(_) => ExitCode::from(EXIT_NOT_THIS_HOST),
        None => ExitCode::SUCCESS,
    })
}

/// Shows the "cannot trace" screen; true to go on with the fallback, false to quit.
fn confirm_fallback<B: ratatui::backend::Backend>(
    terminal: &mut ratatui::Terminal<B>,
    u: &Unavailable,
) -> Result<bool, LiveError>
where
    LiveError: From<B::Error>,
{
    loop {
        terminal.draw(|f| ui::draw_unavailable(f, u))?;
        if term::terminate_requested() {
            return Ok(false);
        }
        match term::next_input(Duration::from_millis(200))? {
            term::Input::Gone => return Ok(false),
            term::Input::Event(CEvent::Key(k)) => match k.code {
                KeyCode::Enter | KeyCode::Char(' ') | KeyCode::Char('r') => return Ok(true),
                KeyCode::Char('q') | KeyCode::Esc => return Ok(false),
                KeyCode::Char('c')
                    if k.modifiers
                        .contains(crossterm::event::KeyModifiers::CONTROL) =>
                {
                    return Ok(false)
                }
                _ => {}
            },
            term::Input::Event(_) | term::Input::Idle => {}
        }
    }
}

fn run_tui(
    args: &LiveArgs,
    mut e: Engine,
    unavailable: Option<&Unavailable>,
    origin: &export::Origin,
) -> Result<ExitCode, LiveError> {
    let started = Instant::now();
    let _guard = term::TerminalGuard::enter()?;
    let backend = ratatui::backend::CrosstermBackend::new(io::stdout());
    // A terminal that reports no size (a serial line nobody set up with `stty rows/cols`)
    // would get nothing drawn: draw 80x24 there instead.
    let mut terminal = match crossterm::terminal::size() {
        Ok((w, h)) if w > 0 && h > 0 => ratatui::Terminal::new(backend)?,
        _ => ratatui::Terminal::with_options(
            backend,
            ratatui::TerminalOptions {
                viewport: ratatui::Viewport::Fixed(ratatui::layout::Rect::new(0, 0, 80, 24)),
            },
        )?,
    };
    // Not `terminal.clear()`: it asks the terminal where the cursor is (ESC [6n) and fails
    // after a timeout where nothing answers, as on a serial line (seen on the VM's ttyS1).
    io::stdout().execute(crossterm::terminal::Clear(
        crossterm::terminal::ClearType::All,
    ))?;
    if let Some(u) = unavailable {
        if !confirm_fallback(&mut terminal, u)? {
            return Ok(ExitCode::SUCCESS);
        }
    }
    let frame = Duration::from_secs_f64(1.0 / f64::from(args.fps));
    let deadline = args
        .exit_after
        .map(|s| started + Duration::from_secs_f64(s));
    let mut next_frame = Instant::now();
    let mut last_periodic = Instant::now();
    let mut last_rate = (Instant::now(), 0u64);
    let mut frames = 0u64;
    let live = matches!(e.src, Source::Live(_));
    // Fault injection for the end-to-end test of the panic path (docs/tui.md, "Tests").
    let panic_after: Option<u64> = std::env::var("ITEWATCH_TEST_PANIC_AFTER_FRAMES")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut hung_up = false;
    loop {
        if term::terminate_requested() || deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        let wall = monotonic_ns();
        if let Source::Playback(p) = &mut e.src {
            p.set_paused(e.app.paused, wall);
        }
        e.step(wall, Some(pull_deadline(Instant::now(), next_frame, frame)));
        let now = Instant::now();
        if now.duration_since(last_periodic) >= Duration::from_secs(1) {
            e.periodic(monotonic_ns());
            let dt = now.duration_since(last_rate.0).as_nanos() as u64;
            e.app.meters.events_per_s = metrics::rate_per_s(last_rate.1, e.app.events, dt);
            last_rate = (now, e.app.events);
            last_periodic = now;
        }
        if now >= next_frame {
            if !e.app.paused {
                e.refresh_snapshot();
            }
            terminal.draw(|f| ui::draw(f, &e.app))?;
            frames += 1;
            if panic_after == Some(frames) {
                panic!("ITEWATCH_TEST_PANIC_AFTER_FRAMES: injected panic after {frames} frames");
            }
            next_frame += frame;
            if next_frame < now {
                next_frame = now + frame;
            }
        }
        let mut timeout = next_frame.saturating_duration_since(Instant::now());
        if live {
            timeout = timeout.min(Duration::from_millis(20));
        }
        match term::next_input(timeout)? {
            term::Input::Gone => {
                hung_up = true;
                break;
            }
            term::Input::Idle => {}
            term::Input::Event(ev) => match ev {
                CEvent::Key(k) => {
                    let action = input::map_key(&e.app, k);
                    match action {
                        Action::Quit => break,
                        Action::Export | Action::ExportAll => {
                            let sel = match (action, e.app.selected_incident()) {
                                (Action::Export, Some(i)) => export::Selection::One(i),
                                _ => export::Selection::All,
                            };
                            let what = match &sel {
                                export::Selection::One(i) => format!("incident {}", i.id),
                                export::Selection::All => {
                                    format!("{} incidents", e.app.all_incidents().len())
                                }
                            };
                            let msg = match export::export(&e.app, origin, sel, &args.export_dir) {
                                Ok(p) => format!("exported {what} to {}", p.display()),
                                Err(err) => format!("export failed: {err}"),
                            };
                            e.app.status = Some(msg);
                        }
                        a => e.app.apply(a),
                    }
                    next_frame = Instant::now();
                }
                CEvent::Resize(..) => next_frame = Instant::now(),
                _ => {}
            },
        }
    }
    if let Some(p) = &args.stats_file {
        write_stats(p, &run_stats(started, frames, &e))?;
    }
    Ok(if hung_up {
        ExitCode::from(term::EXIT_HANGUP)
    } else {
        ExitCode::SUCCESS
    })
}

/// Until when the loop may pull records before it draws: the next frame; when that is already
/// due (the loop woke up to draw it), most of a frame period. Pulling only until a frame that
/// is already due took one chunk per frame, so the stream lagged at `CHUNK × fps` records per
/// second (41 k/s at 10 fps) with the CPU idle. When the input outruns the CPU, the frame is
/// then drawn at most 3/4 of a period late and the redraw rate holds.
fn pull_deadline(now: Instant, next_frame: Instant, frame: Duration) -> Instant {
    if next_frame > now {
        next_frame
    } else {
        now + frame * 3 / 4
    }
}

/// Plays `records` into a fresh view as fast as possible (tests, screenshots): up to `stop_at`
/// (the view then shows that moment, with what was in flight), or to the end of the stream
/// (incidents closed, the last in-flight state kept).
pub fn play(header: HeaderInfo, records: Vec<Record>, stop_at: Option<KTime>) -> App {
    let recs: Vec<Record> = match stop_at {
        Some(t) => records
            .into_iter()
            .filter(|r| r.ts().is_none_or(|ts| ts <= t))
            .collect(),
        None => records,
    };
    let opened = Opened {
        source: Source::Playback(Box::new(Playback::new(Box::new(std::iter::empty()), 0.0))),
        header,
        trace_source: TraceSource::Live,
        recorded: None,
        kernel_fixes: Vec::new(),
    };
    let mut e = Engine::new(opened, Config::default());
    e.feed(recs);
    match stop_at {
        Some(t) => {
            if let Some(c) = e.corr.as_mut() {
                let revs = c.advance(t);
                e.app.on_revisions(revs);
            }
            e.refresh_snapshot();
        }
        None => {
            // The source is empty: the next step ends the stream.
            e.step(0, None);
        }
    }
    e.app
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (issue: replays inventing hangs): a long stream played by the live view with
    /// every pull cut short after one chunk, as when the input outruns the frame deadline,
    /// gives exactly the incidents a report of the same stream gives.
    #[test]
    fn a_lagging_replay_gives_the_reports_incidents() {
        let stream = || {
            let mut s = crate::simulate::LongStream::new(11, 300_000);
            s.incident_every = 3;
            s
        };
        let mut c = Correlator::new(Config::default());
        let mut revisions = Vec::new();
        for r in stream() {
            revisions.extend(c.push_owned(r));
        }
        revisions.extend(c.finish().incidents);
        let key = |i: &crate::correlate::incident::Incident| {
            (i.id.0.clone(), i.kind, i.severity, i.window, i.device.sid)
        };
        let mut want: Vec<_> = crate::correlate::latest(revisions)
            .iter()
            .map(key)
            .collect();
        want.sort();
        assert!(want.len() > 10, "the stream has incidents: {}", want.len());
        let opened = Opened {
            source: Source::Playback(Box::new(Playback::new(Box::new(stream()), 0.0))),
            header: HeaderInfo::default(),
            trace_source: TraceSource::Live,
            recorded: None,
            kernel_fixes: Vec::new(),
        };
        let mut e = Engine::new(opened, Config::default());
        let mut steps = 0;
        while !e.app.ended {
            // The deadline has always passed: one chunk per step, the clock asked each time.
            e.step(0, Some(Instant::now()));
            steps += 1;
            assert!(steps < 10_000, "the replay ends");
        }
        assert!(steps > 10, "the replay was cut into many steps: {steps}");
        let mut got: Vec<_> = e.app.all_incidents().iter().map(key).collect();
        got.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn a_due_frame_still_leaves_time_to_pull_what_is_due() {
        let t0 = Instant::now();
        let frame = Duration::from_millis(100);
        // Woke up for the frame (or late): pull for 3/4 of a period, not one chunk.
        assert_eq!(pull_deadline(t0, t0, frame), t0 + Duration::from_millis(75));
        assert_eq!(
            pull_deadline(t0 + Duration::from_millis(30), t0, frame),
            t0 + Duration::from_millis(105)
        );
        // A frame ahead (woken by a key): pull until it.
        let next = t0 + Duration::from_millis(40);
        assert_eq!(pull_deadline(t0, next, frame), next);
    }

    /// A damaged replay: the header warns, and the view gets exactly the records before the
    /// damage, streamed (the file is not held in memory).
    #[test]
    fn a_damaged_replay_plays_up_to_the_damage_and_says_so() {
        let sim = crate::simulate::generate("w1-driver-inflight", 3).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.itw");
        let mut w = crate::trace::TraceWriter::create(
            &path,
            &crate::trace::TraceHeader::new(TraceSource::Simulated {
                scenario: "w1-driver-inflight".into(),
                seed: 3,
            }),
        )
        .unwrap();
        for r in &sim.records {
            w.write_record(r).unwrap();
        }
        w.finish().unwrap();
        // Flip one byte two thirds of the way in: that frame's checksum fails.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() * 2 / 3;
        bytes[at] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();

        let mut before = Vec::new();
        let mut r = TraceReader::open(&path).unwrap();
        while let Ok(Some(rec)) = r.next_record() {
            before.push(rec);
        }
        assert!(!before.is_empty() && before.len() < sim.records.len());

        let o = open_replay(&TraceInput::File(path.clone()), 1.0, "t".into()).unwrap();
        let warning = o.header.warning.clone().unwrap_or_default();
        assert!(warning.starts_with(DAMAGED), "{warning}");
        assert!(o.recorded.is_none(), "no end frame was reached");
        let Source::Playback(mut p) = o.source else {
            panic!("a replay plays back");
        };
        p.unpace();
        let mut got = Vec::new();
        p.poll(0, usize::MAX, &mut got);
        assert!(p.done());
        assert_eq!(got, before);
    }
}
