//! Replay throughput and memory of the correlator (docs/benchmarks.md).
//!
//! ```text
//! cargo bench -p itewatch --bench correlate -- --events 10000000
//! ```
//!
//! A simulated stream (benign traffic with an incident scenario every 40 chunks) is generated
//! chunk by chunk, written in the trace format into a buffer, then read back (frame checks,
//! CRC, kernel-record decode) and fed to the correlator. Only reading + correlating is timed;
//! generation is not. Nothing but one chunk is ever in memory, so peak RSS shows the
//! correlator's own state: run it with 10 M and with 100 M events and compare.

mod common;
use common::thread_cpu;
use std::io::Cursor;
use std::time::{Duration, Instant};

use itewatch::correlate::{Config, Correlator};
use itewatch::event::Record;
use itewatch::simulate::LongStream;
use itewatch::trace::{Source, TraceHeader, TraceReader, TraceWriter};

const CHUNK: usize = 65_536;

fn main() {
    let mut events: u64 = std::env::var("ITEWATCH_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--events" {
            if let Some(n) = args.next().and_then(|v| v.parse().ok()) {
                events = n;
            }
        }
    }
    let header = TraceHeader::new(Source::Simulated {
        scenario: "bench-long-stream".into(),
        seed: 1,
    });
    let mut stream = LongStream::new(1, events);
    let mut c = Correlator::new(Config::default());
    let (mut t_read, mut t_corr) = (Duration::ZERO, Duration::ZERO);
    let (mut cpu_read, mut cpu_corr) = (Duration::ZERO, Duration::ZERO);
    let mut records = 0u64;
    let mut bytes = 0u64;
    let mut revisions = 0u64;
    let mut batch: Vec<Record> = Vec::with_capacity(CHUNK);
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK * 400);
    let wall = Instant::now();
    loop {
        // Generate and encode one chunk (not timed).
        buf.clear();
        let mut w = TraceWriter::new(&mut buf, &header).expect("write to memory");
        let mut n = 0;
        for r in stream.by_ref().take(CHUNK) {
            w.write_record(&r).expect("write to memory");
            n += 1;
        }
        w.finish().expect("write to memory");
        if n == 0 {
            break;
        }
        bytes += buf.len() as u64;
        // Read back: frame checks, CRC, decode.
        let t = Instant::now();
        let c0 = thread_cpu();
        batch.clear();
        let mut rd = TraceReader::new(Cursor::new(&buf[..])).expect("read from memory");
        while let Ok(Some(r)) = rd.next_record() {
            batch.push(r);
        }
        t_read += t.elapsed();
        cpu_read += thread_cpu().saturating_sub(c0);
        // Correlate.
        records += batch.len() as u64;
        let t = Instant::now();
        let c0 = thread_cpu();
        for r in batch.drain(..) {
            revisions += c.push_owned(r).len() as u64;
        }
        t_corr += t.elapsed();
        cpu_corr += thread_cpu().saturating_sub(c0);
    }
    let t = Instant::now();
    let c0 = thread_cpu();
    let summary = c.finish();
    t_corr += t.elapsed();
    cpu_corr += thread_cpu().saturating_sub(c0);
    revisions += summary.incidents.len() as u64;
    let ev = stream.events() as f64;
    println!("itewatch correlator benchmark");
    println!("  kernel events        {}", stream.events());
    println!("  records (all kinds)  {records}");
    println!("  trace bytes          {bytes}");
    println!("  incident scenarios   {}", stream.scenarios);
    println!("  incidents opened     {:?}", summary.stats.incidents);
    println!("  revisions emitted    {revisions}");
    println!("  evictions            {:?}", summary.stats.evicted);
    println!(
        "  correlate only       {:.2} s  {:.2} M events/s",
        t_corr.as_secs_f64(),
        ev / t_corr.as_secs_f64() / 1e6
    );
    println!(
        "  read+decode+correlate {:.2} s  {:.2} M events/s",
        (t_read + t_corr).as_secs_f64(),
        ev / (t_read + t_corr).as_secs_f64() / 1e6
    );
    println!(
        "  correlate only, CPU time        {:.2} s  {:.2} M events/s",
        cpu_corr.as_secs_f64(),
        ev / cpu_corr.as_secs_f64() / 1e6
    );
    println!(
        "  read+decode+correlate, CPU time {:.2} s  {:.2} M events/s",
        (cpu_read + cpu_corr).as_secs_f64(),
        ev / (cpu_read + cpu_corr).as_secs_f64() / 1e6
    );
    println!(
        "  wall (incl. generation) {:.2} s",
        wall.elapsed().as_secs_f64()
    );
    match common::status_kib("self", "VmHWM:") {
        Some(k) => println!("  peak RSS (VmHWM)     {:.1} MiB", k as f64 / 1024.0),
        None => println!("  peak RSS (VmHWM)     unavailable"),
    }
}
