//! The `itewatch` command: parse → run → exit code. All logic lives in the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "itewatch",
    version,
    about = "Trace and diagnose VT-d device-TLB invalidation time-outs racing PCIe hot-plug removal"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The live view: probes on this host; `--replay FILE` / `--simulate SCENARIO` drive it
    /// without a kernel. Where tracing is impossible it says why and shows a recording from
    /// the VM tests (embedded; not this host); without a terminal it prints a plain-text
    /// summary, and exits 3 if that summary is of the VM recording.
    Live(itewatch::tui::LiveArgs),
    /// Record the probes' event stream to a trace file (needs root).
    Record(RecordArgs),
    /// Print a trace file, one record per line (`--json`: one JSON object per line).
    Replay {
        /// Trace file written by `record` or `simulate`.
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Generate the event stream of a race scenario from the ITE thread (deterministic per seed).
    Simulate {
        /// Scenario name (see --list).
        #[arg(long, required_unless_present = "list")]
        scenario: Option<String>,
        /// Seed: same seed, same trace.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Trace file to write (replaced only once it is whole; `-`: stdout).
        #[arg(short = 'o', long = "output", required_unless_present = "list")]
        output: Option<PathBuf>,
        /// List the scenarios.
        #[arg(long)]
        list: bool,
    },
    /// Correlate a trace and print its incidents.
    Report {
        /// Trace file (from `record` or `simulate`).
        trace: PathBuf,
        /// `json` (one document), `ndjson`, `text`, `markdown` or `perfetto` (the trace as
        /// Chrome/Perfetto trace-event JSON, for ui.perfetto.dev). Default: json with -o,
        /// text on a terminal or redirected to a file, ndjson on a pipe.
        #[arg(long)]
        format: Option<itewatch::document::Format>,
        /// Write the report to this file (one JSON document by default), replacing it only
        /// once the report is whole; `-`: the same on stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Diagnose ITE / hot-plug incidents from a kernel log (dmesg, journalctl -k, serial
    /// console, netconsole, pstore); `-` or nothing reads stdin.
    Analyze {
        /// Log file (`-` for stdin).
        file: Option<PathBuf>,
        /// `json` (one document), `ndjson`, `text` or `markdown`. Default: json with -o,
        /// text on a terminal or redirected to a file, ndjson on a pipe.
        #[arg(long)]
        format: Option<itewatch::document::Format>,
        /// Write the report to this file (one JSON document by default), replacing it only
        /// once the report is whole; `-`: the same on stdout.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Check whether this host can be traced: privileges, BTF, probe targets, VT-d, ATS
    /// devices, hot-plug slots, and which upstream fixes the kernel appears to carry.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Before a planned removal: does pulling this device (or the card in slot N) now risk
    /// the device-TLB invalidation race, and what to do first. Exit 0 go, 1 risk, 2 cannot
    /// tell (docs/preflight.md).
    Preflight {
        /// The device, `ssss:bb:dd.f` or `bb:dd.f`; the other functions in its slot come with it.
        #[arg(required_unless_present = "slot", conflicts_with = "slot")]
        bdf: Option<String>,
        /// The slot's name in /sys/bus/pci/slots instead of a device.
        #[arg(long)]
        slot: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Attach the probes for this many seconds (at most 60; root) and count the device-TLB
        /// invalidations to the card; 0: not measured.
        #[arg(long, default_value_t = 0.0)]
        watch: f64,
    },
    /// Headless agent: Prometheus /metrics, incident spool, JSON lines and Alertmanager
    /// alerts, from the live probes (default), a replayed trace or a simulated scenario.
    Agent(itewatch::agent::AgentArgs),
    /// Print a shell completion script on stdout (README: how to install it).
    Completions {
        /// bash, zsh or fish (elvish and powershell work too).
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) on stdout: `itewatch man | man -l -`.
    Man {
        /// A subcommand's own page (`itewatch-report(1)`) instead of the main one.
        subcommand: Option<String>,
    },
}

/// `itewatch preflight`: its own exit statuses (0 go, 1 risk, 2 cannot tell, also for errors).
fn preflight(bdf: Option<String>, slot: Option<String>, json: bool, watch: f64) -> ExitCode {
    use itewatch::preflight::{run, Target};
    let target = match (bdf, slot) {
        (_, Some(n)) => Target::Slot(n),
        (Some(b), None) => match b.parse() {
            Ok(b) => Target::Device(b),
            Err(e) => {
                eprintln!("itewatch preflight: {b:?} is not a BDF ({e}); cannot tell (exit 2)");
                return ExitCode::from(2);
            }
        },
        (None, None) => return ExitCode::from(2),
    };
    ExitCode::from(run(&target, json, watch, &mut std::io::stdout().lock()))
}

/// `itewatch completions SHELL`: generated from the clap definitions, so it knows every
/// subcommand and option this build has.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    // Into memory first: clap_complete panics on a write error, and a closed pipe
    // (`itewatch completions bash | head`) must exit 0 like every other command.
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "itewatch", &mut script);
    let mut out = std::io::stdout().lock();
    std::io::Write::write_all(&mut out, &script)?;
    std::io::Write::flush(&mut out)?;
    Ok(ExitCode::SUCCESS)
}

/// `itewatch man [SUBCOMMAND]`: the roff page, from the clap definitions.
fn man(subcommand: Option<String>) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    cmd.build();
    let man = match &subcommand {
        None => clap_mangen::Man::new(cmd),
        Some(name) => {
            let names: Vec<String> = cmd
                .get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect();
            let sub = cmd.find_subcommand(name).cloned().ok_or_else(|| {
                anyhow::anyhow!("no subcommand {name:?} (one of {})", names.join(", "))
            })?;
            // Titled as git-style subcommands' pages are: itewatch-report(1).
            let title = format!("itewatch-{}", sub.get_name());
            clap_mangen::Man::new(sub).title(title)
        }
    };
    let mut out = std::io::stdout().lock();
    man.render(&mut out)?;
    std::io::Write::flush(&mut out)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
struct RecordArgs {
    /// Output trace file: written as `FILE.<pid>-<n>.partial` (kept if the recording fails
    /// or the host dies) and renamed to FILE when the recording ends; `-`: stdout.
    #[arg(short, long)]
    output: PathBuf,
    /// Stop after this many seconds (default: until Ctrl-C / SIGTERM).
    #[arg(long)]
    duration: Option<f64>,
    /// Write the attach plan (JSON) here once all probes are attached.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Kernel BTF (default /sys/kernel/btf/vmlinux).
    #[arg(long)]
    btf: Option<PathBuf>,
    /// Ring buffer size in KiB (a power of two).
    #[arg(long, default_value_t = 4096)]
    ringbuf_kib: u32,
    /// Entries of the kernel stack map (read ids are deleted once an eighth are taken, so this
    /// bounds memory, not the number of distinct stacks).
    #[arg(long, default_value_t = itewatch::probe::DEFAULT_STACK_ENTRIES, value_name = "N")]
    stack_map_entries: u32,
    /// Also print every record on stdout.
    #[arg(long)]
    echo: bool,
    /// Record even when probes every verdict needs did not attach (the trace then says it is
    /// blind in every report of it); without this, `record` refuses.
    #[arg(long)]
    degraded: bool,
}

fn record(a: RecordArgs) -> anyhow::Result<ExitCode> {
    let opts = itewatch::record::RecordOptions {
        output: a.output,
        duration: a.duration.map(std::time::Duration::from_secs_f64),
        ready_file: a.ready_file,
        load: itewatch::probe::LoadOptions {
            btf: a.btf,
            ringbuf_bytes: a.ringbuf_kib.saturating_mul(1024),
            stack_entries: a.stack_map_entries,
            ..Default::default()
        },
        echo: a.echo,
        allow_degraded: a.degraded,
    };
    let s = itewatch::record::run(&opts)?;
    eprintln!(
        "itewatch: {} events, {} stacks, {} lost (ring buffer full), {} undecodable, {} returns without entry, {} stacks not taken",
        s.end.events, s.stacks, s.end.lost_ringbuf_full, s.end.undecodable, s.end.return_without_entry, s.end.stack_failed
    );
    if s.decoder.unknown_task > 0 || s.decoder.unknown_iommu > 0 {
        eprintln!(
            "itewatch: announcements lost: {} events without their thread's (pid and command unknown), {} without their IOMMU's (unit unknown)",
            s.decoder.unknown_task, s.decoder.unknown_iommu
        );
    }
    if !s.missing_required.is_empty() {
        eprintln!(
            "itewatch: DEGRADED: required probes missing: {}; every report of this trace says it is blind",
            s.missing_required.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn replay(file: PathBuf, json: bool) -> anyhow::Result<ExitCode> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let s = itewatch::replay::run(&file, json, &mut out)?;
    std::io::Write::flush(&mut out)?;
    if !s.complete {
        eprintln!(
            "itewatch: {}: no end frame: the recording was cut short ({} records read)",
            file.display(),
            s.records
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.cmd, Cmd::Record(_) | Cmd::Live(_) | Cmd::Agent(_)) {
        // The tracers run beside a CPU that may spin with interrupts off: keep khugepaged's
        // cross-CPU calls away from their memory (host.rs). Best effort.
        let _ = itewatch::host::keep_memory_off_khugepaged();
    }
    let result: anyhow::Result<ExitCode> = match cli.cmd {
        Cmd::Record(a) => record(a),
        Cmd::Replay { file, json } => replay(file, json),
        Cmd::Simulate {
            scenario,
            seed,
            output,
            list,
        } => itewatch::simulate::cli(
            list,
            scenario.as_deref(),
            seed,
            output.as_deref(),
            &mut std::io::stdout().lock(),
        )
        .map(|()| ExitCode::SUCCESS)
        .map_err(anyhow::Error::from),
        Cmd::Report {
            trace,
            format,
            output,
        } => itewatch::report::cli_output(output.as_deref(), format, |f, out| {
            itewatch::report::report_cli(&trace, f, out)
        })
        .map(|_| ExitCode::SUCCESS)
        .map_err(anyhow::Error::from),
        Cmd::Analyze {
            file,
            format,
            output,
        } => itewatch::report::cli_output(output.as_deref(), format, |f, out| {
            itewatch::report::analyze_cli(file.as_deref(), f, out)
        })
        .map(|_| ExitCode::SUCCESS)
        .map_err(anyhow::Error::from),
        Cmd::Completions { shell } => completions(shell),
        Cmd::Man { subcommand } => man(subcommand),
        Cmd::Live(a) => itewatch::tui::run(a).map_err(anyhow::Error::from),
        Cmd::Agent(a) => itewatch::agent::run(a).map_err(anyhow::Error::from),
        Cmd::Preflight {
            bdf,
            slot,
            json,
            watch,
        } => Ok(preflight(bdf, slot, json, watch)),
        Cmd::Doctor { json } => itewatch::doctor::run(json, &mut std::io::stdout().lock())
            .map(|ready| {
                if ready {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            })
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`itewatch replay t.itw | head`) is not an error.
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) {
                return ExitCode::SUCCESS;
            }
            eprintln!("itewatch: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: many errors already name their source in their
/// own message (`cannot read the trace: {0}`), so a cause whose text is already there is
/// skipped instead of repeated.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let t = cause.to_string();
        if text.contains(t.trim()) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&t);
    }
    text
}
