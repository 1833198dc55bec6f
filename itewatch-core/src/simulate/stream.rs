//! An arbitrarily long stream for benchmarks and soak tests: benign traffic chunks with an
//! incident scenario mixed in now and then, generated lazily so that a 100 M-event stream
//! never sits in memory.

use std::collections::VecDeque;

use crate::event::Record;

use super::world::{World, MS, US};
use super::{generate_at, Rng, SCENARIOS};

/// `--simulate soak`: an endless stream of benign traffic with an incident scenario mixed in
/// now and then, for soak tests and the footprint benchmarks.
pub const SOAK: &str = "soak";
/// `--simulate storm`: the same endless stream with an incident scenario in every chunk (an
/// incident storm, for crash tests).
pub const STORM: &str = "storm";

/// Whether `name` is one of the endless streams ([`SOAK`], [`STORM`]).
pub fn is_endless(name: &str) -> bool {
    name == SOAK || name == STORM
}

/// The records of a simulated source by name — a scenario of [`SCENARIOS`], or an endless
/// stream — for `live --simulate` and `agent --simulate` alike (one selector, one list of
/// names).
pub fn named(
    name: &str,
    seed: u64,
) -> Result<Box<dyn Iterator<Item = Record> + Send>, super::SimError> {
    if is_endless(name) {
        let mut s = LongStream::new(seed, u64::MAX);
        if name == STORM {
            s.incident_every = 1;
        }
        return Ok(Box::new(s));
    }
    Ok(Box::new(super::generate(name, seed)?.records.into_iter()))
}

/// Iterator over an endless (or `limit`-event) simulated stream.
pub struct LongStream {
    rng: Rng,
    seed: u64,
    t: u64,
    chunk: u64,
    buf: VecDeque<Record>,
    events: u64,
    limit: u64,
    started: bool,
    /// One chunk in `incident_every` is an incident scenario (0 = never).
    pub incident_every: u64,
    /// Incident scenarios generated so far.
    pub scenarios: u64,
}

impl LongStream {
    /// A stream of about `limit` kernel events (records with a timestamp; stack and device
    /// records come on top).
    pub fn new(seed: u64, limit: u64) -> LongStream {
        LongStream {
            rng: Rng::new(seed),
            seed,
            t: super::T0_NS,
            chunk: 0,
            buf: VecDeque::new(),
            events: 0,
            limit,
            started: false,
            incident_every: 40,
            scenarios: 0,
        }
    }

    /// Kernel events returned so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    fn refill(&mut self) {
        self.chunk += 1;
        let seed = self.seed.wrapping_mul(0x1000_0000_01b3) ^ self.chunk;
        let incident = self.incident_every != 0 && self.chunk.is_multiple_of(self.incident_every);
        let recs = if incident {
            // Rotate through the scenarios that raise incidents.
            let names: Vec<&str> = SCENARIOS
                .iter()
                .map(|s| s.0)
                .filter(|n| *n != "benign")
                .collect();
            let name = names[(self.chunk / self.incident_every) as usize % names.len()];
            self.scenarios += 1;
            match generate_at(name, seed, self.t, !self.started) {
                Ok(s) => s.records,
                Err(_) => Vec::new(),
            }
        } else {
            let mut w = World::new(seed, self.t);
            if self.started {
                for i in 0..w.devices.len() {
                    w.device_snapshot(i, self.t);
                }
            } else {
                w.preamble();
            }
            let span = 20 * MS;
            let devs: Vec<usize> = (0..w.devices.len()).collect();
            w.noise(self.t, self.t + span, 2_000, &devs, None);
            w.finish()
        };
        self.started = true;
        let mut last = self.t;
        for r in recs {
            if let Some(ts) = r.ts() {
                last = last.max(ts.0);
            }
            self.buf.push_back(r);
        }
        self.t = last + self.rng.range(100 * US, 2 * MS);
    }
}

impl Iterator for LongStream {
    type Item = Record;

    fn next(&mut self) -> Option<Record> {
        loop {
            if self.events >= self.limit {
                return None;
            }
            if let Some(r) = self.buf.pop_front() {
                if matches!(r, Record::Event(_) | Record::Lost(_)) {
                    self.events += 1;
                }
                return Some(r);
            }
            self.refill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_stream_is_deterministic_and_bounded() {
        let a: Vec<Record> = LongStream::new(3, 20_000).collect();
        let b: Vec<Record> = LongStream::new(3, 20_000).collect();
        assert_eq!(a, b);
        let n = a
            .iter()
            .filter(|r| matches!(r, Record::Event(_) | Record::Lost(_)))
            .count();
        assert_eq!(n, 20_000);
    }
}
