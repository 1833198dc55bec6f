//! The `itewatch` command: parse → run → exit code. All logic lives in the library.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Generate the event stream of a race scenario from the ITE thread (deterministic per seed).
    Simulate {
        /// Scenario name (see --list).
        #[arg(long, required_unless_present = "list")]
        scenario: Option<String>,
        /// Seed: same seed, same trace.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Trace file to write.
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
        /// `json` or `text`.
        #[arg(long, default_value = "text")]
        format: itewatch::report::Format,
    },
    /// Check whether this host can be traced: privileges, BTF, probe targets, VT-d, ATS
    /// devices, hot-plug slots, and which upstream fixes the kernel appears to carry.
    Doctor {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<ExitCode> = match cli.cmd {
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
        Cmd::Report { trace, format } => {
            itewatch::report::run(&trace, format, &mut std::io::stdout().lock())
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from)
        }
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
            eprintln!("itewatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
