//! The `itewatch` command: parse → run → exit code. All logic lives in the library.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "itewatch", version, about = "Trace and diagnose VT-d device-TLB invalidation time-outs racing PCIe hot-plug removal")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: anyhow::Result<ExitCode> = match cli.cmd {};
    match result {
        Ok(code) => code,
        Err(e) => {
            // A closed pipe (`itewatch replay t.itw | head`) is not an error.
            if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)) {
                return ExitCode::SUCCESS;
            }
            eprintln!("itewatch: {e:#}");
            ExitCode::FAILURE
        }
    }
}
