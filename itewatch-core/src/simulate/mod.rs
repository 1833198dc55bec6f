//! The deterministic race simulator: event streams for each scenario of the ITE thread,
//! from a seed (jittered timings, varied orderings, noise traffic), in the very format the
//! recorder writes (docs/scenarios.md).
//!
//! Same seed, same bytes: the only randomness is [`Rng`], a SplitMix64 seeded by the caller.
//! Each scenario also returns the incidents a correct correlator reports for it
//! ([`Simulated::expected`]), derived from the scenario's story; the property tests hold the
//! correlator to it.

mod scenarios;
pub mod stream;
pub mod world;

use std::io;
use std::path::Path;

use serde::Serialize;

use crate::correlate::incident::IncidentKind;
use crate::event::{Record, Sid};
use crate::output::{OnDrop, Output, WriteError};
use crate::trace::{Source, TraceHeader, TraceWriter};

pub use scenarios::SCENARIOS;
pub use stream::LongStream;
pub use world::Kernel;

/// SplitMix64: small, fast, and the same on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6a09_e667_f3bc_c909)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.below(hi - lo + 1)
        }
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// An incident a scenario must produce: its kind and the SID of its device (`None` when the
/// scenario's device has no SID to give, e.g. an IOTLB-only submission), and its PCI segment
/// where the story turns on it (two devices with one SID on two segments).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Expected {
    pub kind: IncidentKind,
    pub sid: Option<Sid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub segment: Option<u16>,
}

/// A generated stream.
#[derive(Clone, Debug)]
pub struct Simulated {
    pub scenario: String,
    pub seed: u64,
    /// Which kernel and which outcome the seed chose (e.g. `6.1 hang`).
    pub variant: String,
    pub records: Vec<Record>,
    /// The incidents a correct correlator reports, sorted.
    pub expected: Vec<Expected>,
}

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("unknown scenario {0:?} (itewatch simulate --list names them)")]
    UnknownScenario(String),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// Start of simulated time: 100 s after boot.
pub const T0_NS: u64 = 100_000_000_000;

/// Generates scenario `name` with `seed`, starting at [`T0_NS`].
pub fn generate(name: &str, seed: u64) -> Result<Simulated, SimError> {
    generate_at(name, seed, T0_NS, true)
}

/// Generates scenario `name` from time `t0`; `preamble` adds the stack and device records a
/// trace starts with (a long stream wants them only once).
pub fn generate_at(name: &str, seed: u64, t0: u64, preamble: bool) -> Result<Simulated, SimError> {
    let build: fn(&mut world::World) -> (String, Vec<Expected>) = match name {
        "w1-driver-inflight" => scenarios::w1_driver_inflight,
        "w2-notifier-after-disconnect" => scenarios::w2_notifier_after_disconnect,
        "w3-safe-removal-link-down" => scenarios::w3_safe_removal_link_down,
        "hang-no-hotplug" => scenarios::hang_no_hotplug,
        "hang-then-hotplug" => scenarios::hang_then_hotplug,
        "ite-sid-zero" => scenarios::ite_sid_zero,
        "benign" => scenarios::benign,
        "thread-zero-two-cpus" => scenarios::thread_zero_two_cpus,
        "nested-interrupt" => scenarios::nested_interrupt,
        "bystander-etimedout" => scenarios::bystander_etimedout,
        "mixed-health-batch" => scenarios::mixed_health_batch,
        "multi-segment" => scenarios::multi_segment,
        "vf-behind-pf" => scenarios::vf_behind_pf,
        "late-records" => scenarios::late_records,
        other => return Err(SimError::UnknownScenario(other.to_string())),
    };
    let mut w = world::World::new(seed, t0);
    if preamble {
        w.preamble();
    } else {
        for i in 0..w.devices.len() {
            w.device_snapshot(i, t0);
        }
    }
    let (variant, mut expected) = build(&mut w);
    expected.sort();
    Ok(Simulated {
        scenario: name.to_string(),
        seed,
        variant,
        records: w.finish(),
        expected,
    })
}

/// Writes a generated stream as a trace file (`Source::Simulated`).
pub fn write_trace(sim: &Simulated, path: &Path) -> Result<(), SimError> {
    let err = |source| WriteError::new(path, source);
    let header = TraceHeader::new(Source::Simulated {
        scenario: sim.scenario.clone(),
        seed: sim.seed,
    });
    // `-` is stdout; a file is replaced only once the whole trace is written.
    let out = Output::create(path, OnDrop::Remove)?;
    let mut w = TraceWriter::new(out, &header).map_err(err)?;
    for r in &sim.records {
        w.write_record(r).map_err(err)?;
    }
    w.finish().map_err(err)?.commit()?;
    Ok(())
}

/// `itewatch simulate`: `--list` prints the scenarios; otherwise writes scenario `name` with
/// `seed` to `out` and prints a one-line summary to `msg`.
pub fn cli(
    list: bool,
    name: Option<&str>,
    seed: u64,
    out: Option<&Path>,
    msg: &mut dyn io::Write,
) -> Result<(), CliError> {
    if list {
        for (n, d) in SCENARIOS {
            writeln!(msg, "{n:30} {d}")?;
        }
        return Ok(());
    }
    let name = name.ok_or(CliError::Usage("--scenario NAME (or --list)"))?;
    let out = out.ok_or(CliError::Usage("-o FILE"))?;
    let sim = generate(name, seed)?;
    write_trace(&sim, out)?;
    // With `-o -` the trace is on stdout: the summary goes to stderr.
    let mut stderr = io::stderr();
    let msg: &mut dyn io::Write = if crate::output::is_stdout(out) {
        &mut stderr
    } else {
        msg
    };
    let kinds: Vec<String> = sim
        .expected
        .iter()
        .map(|e| match e.sid {
            Some(s) => format!("{} ({s})", e.kind),
            None => e.kind.to_string(),
        })
        .collect();
    writeln!(
        msg,
        "{}: seed {seed}, {}: {} records -> {} (expected: {})",
        sim.scenario,
        sim.variant,
        sim.records.len(),
        out.display(),
        if kinds.is_empty() {
            "no incident".to_string()
        } else {
            kinds.join(", ")
        }
    )?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("missing {0}")]
    Usage(&'static str),
    #[error(transparent)]
    Sim(#[from] SimError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream() {
        for (name, _) in SCENARIOS {
            let a = generate(name, 7).unwrap();
            let b = generate(name, 7).unwrap();
            assert_eq!(a.records, b.records, "{name}");
            assert_eq!(a.expected, b.expected);
            let c = generate(name, 8).unwrap();
            assert_ne!(a.records, c.records, "{name}: seed must matter");
        }
    }

    #[test]
    fn unknown_scenario_is_an_error() {
        assert!(matches!(
            generate("nope", 1),
            Err(SimError::UnknownScenario(_))
        ));
    }

    /// What would tell a simulated trace from a recorded one: a thread id no kernel hands out,
    /// a per-CPU kernel thread on another CPU, an irq thread hopping CPUs, one id with two
    /// names.
    #[test]
    fn no_tells() {
        use std::collections::BTreeMap;
        let cpu_of = |comm: &str| -> Option<u32> {
            let rest = comm
                .strip_prefix("swapper/")
                .or_else(|| comm.strip_prefix("ksoftirqd/"))
                .or_else(|| {
                    comm.strip_prefix("kworker/")
                        .and_then(|r| r.split(':').next())
                })?;
            rest.parse().ok()
        };
        for (name, _) in SCENARIOS {
            for seed in 0..40 {
                let s = generate(name, seed).unwrap();
                let mut comm_of: BTreeMap<u32, String> = BTreeMap::new();
                let mut irq_cpu: BTreeMap<u32, u32> = BTreeMap::new();
                for r in &s.records {
                    let Record::Event(e) = r else { continue };
                    let (tid, cpu) = (e.meta.tid, e.meta.cpu);
                    let comm = e.meta.comm.as_str().into_owned();
                    let comm = comm.as_str();
                    assert!(tid < world::PID_MAX, "{name}/{seed}: tid {tid}");
                    assert_eq!(
                        e.meta.pid, tid,
                        "{name}/{seed}: kernel threads are their own pid"
                    );
                    if let Some(n) = cpu_of(comm) {
                        assert_eq!(n, cpu, "{name}/{seed}: {comm} (tid {tid}) on CPU {cpu}");
                    }
                    assert_eq!(
                        tid == 0,
                        comm.starts_with("swapper/"),
                        "{name}/{seed}: {comm} tid {tid}"
                    );
                    if comm.starts_with("irq/") {
                        let c = *irq_cpu.entry(tid).or_insert(cpu);
                        assert_eq!(c, cpu, "{name}/{seed}: {comm} moved from CPU {c} to {cpu}");
                    }
                    if tid != 0 {
                        let c = comm_of.entry(tid).or_insert_with(|| comm.to_string());
                        assert_eq!(c.as_str(), comm, "{name}/{seed}: tid {tid} has two names");
                    }
                }
            }
        }
    }

    #[test]
    fn stacks_precede_events_and_threads_stay_in_order() {
        for (name, _) in SCENARIOS {
            for seed in 0..20 {
                let s = generate(name, seed).unwrap();
                let first_event = s
                    .records
                    .iter()
                    .position(|r| matches!(r, Record::Event(_)))
                    .unwrap();
                assert!(s.records[..first_event]
                    .iter()
                    .any(|r| matches!(r, Record::Stack(_))));
                // Thread 0 is each CPU's idle task: one thread per CPU.
                let mut last: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
                for r in &s.records {
                    if let Record::Event(e) = r {
                        let key = (e.meta.tid, if e.meta.tid == 0 { e.meta.cpu } else { 0 });
                        let prev = last.insert(key, e.meta.ts.0).unwrap_or(0);
                        assert!(prev <= e.meta.ts.0, "{name}/{seed}: thread order");
                    }
                }
            }
        }
    }
}
