//! CPU cost of the live view (`itewatch live`) at a given input rate (docs/benchmarks.md,
//! "Live view").
//!
//! ```text
//! cargo bench -p itewatch --bench tui -- --seconds 10 --speed 0.685 --fps 10
//! valgrind --tool=callgrind target/release/deps/tui-* --seconds 3    # instruction counts
//! ```
//!
//! `tui::bench::run` plays the `soak` simulated stream against a virtual clock (speed 0.685 is
//! about 100 k events per virtual second) and draws a 120×40 frame every 1/fps virtual second
//! into a crossterm terminal writing to a sink: the loop of `itewatch live` without a tty.
//! The thread's CPU time over the virtual seconds played is the share of one core the view
//! would use at that input rate. The same stream is then generated alone, so the cost of the
//! simulator (which a live or replayed source does not have) is printed apart.

mod common;
use common::thread_cpu;

use itewatch::simulate::LongStream;
use itewatch::tui::bench::{run, BenchOptions};

fn main() {
    let mut o = BenchOptions::default();
    let mut generator = true;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_default();
        match a.as_str() {
            "--seconds" => o.seconds = val().parse().unwrap_or(o.seconds),
            "--speed" => o.speed = val().parse().unwrap_or(o.speed),
            "--fps" => o.fps = val().parse().unwrap_or(o.fps),
            "--seed" => o.seed = val().parse().unwrap_or(o.seed),
            "--scenario" => o.scenario = val(),
            "--no-generator" => generator = false,
            // `cargo bench` passes --bench.
            _ => {}
        }
    }
    let t0 = thread_cpu();
    let r = match run(&o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tui bench: {e}");
            std::process::exit(1);
        }
    };
    let cpu = thread_cpu() - t0;
    let virt = r.frames as f64 / f64::from(o.fps.max(1));
    println!(
        "{} {:.1} s at speed {} ({} fps): {} records, {} events ({:.0} events/s), {} frames, \
         {} incidents, {} terminal bytes",
        o.scenario,
        virt,
        o.speed,
        o.fps,
        r.records,
        r.events,
        r.events as f64 / virt.max(1e-9),
        r.frames,
        r.incidents,
        r.terminal_bytes
    );
    println!(
        "whole view (generator included): {:.3} s CPU = {:.2} % of one core, {:.0} ns per event",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() * 100.0 / virt.max(1e-9),
        cpu.as_nanos() as f64 / r.events.max(1) as f64
    );
    if generator && o.scenario == "soak" {
        let t0 = thread_cpu();
        let n = LongStream::new(o.seed, u64::MAX)
            .take(r.records as usize)
            .count();
        let g = thread_cpu() - t0;
        let view = cpu.saturating_sub(g);
        println!(
            "generator alone ({n} records): {:.3} s CPU = {:.2} % of one core; \
             the view without it: {:.3} s = {:.2} % of one core",
            g.as_secs_f64(),
            g.as_secs_f64() * 100.0 / virt.max(1e-9),
            view.as_secs_f64(),
            view.as_secs_f64() * 100.0 / virt.max(1e-9)
        );
    }
}
