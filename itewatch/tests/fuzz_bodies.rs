//! The cargo-fuzz targets' bodies (fuzz/bodies/, the very code the targets run) under plain
//! `cargo test`, so CI exercises them without the nightly sanitizer build (docs/fuzzing.md):
//! over every committed input (the log corpus, the VM guests' dmesg and traces, simulated
//! traces of every scenario) and over proptest-generated inputs: random bytes, log lines built
//! from the kernel's own phrases, and the corpus mutated the way libFuzzer mutates (byte
//! flips, cuts, inserts, repeats, splices) — for traces also with each frame's CRC fixed up,
//! so damage gets past the checksum into the decoders.
//!
//! `PROPTEST_CASES=N` runs more cases (default 256 per property).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;

mod analyze_log {
    include!("../../fuzz/bodies/analyze_log.rs");
}
mod trace_reader {
    include!("../../fuzz/bodies/trace_reader.rs");
}

fn data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data")
}

/// Every committed log, and the VM guests' dmesg (read once).
fn log_corpus() -> &'static [Vec<u8>] {
    static C: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    C.get_or_init(read_logs)
}

fn read_logs() -> Vec<Vec<u8>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(data().join("logs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().is_some_and(|n| n != "manifest.json"))
        .collect();
    names.sort();
    names.push(data().join("vm/6.1/dmesg.txt"));
    names.push(data().join("vm/6.12/dmesg.txt"));
    names.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// The VM traces and one simulated trace per scenario (made once).
fn trace_corpus() -> &'static [Vec<u8>] {
    static C: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    C.get_or_init(make_traces)
}

fn make_traces() -> Vec<Vec<u8>> {
    let mut out = vec![
        std::fs::read(data().join("vm/6.1/trace.itw")).unwrap(),
        std::fs::read(data().join("vm/6.12/trace.itw")).unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in itewatch::simulate::SCENARIOS {
        let p = dir.path().join(format!("{name}.itw"));
        let sim = itewatch::simulate::generate(name, 7).unwrap();
        itewatch::simulate::write_trace(&sim, &p).unwrap();
        out.push(std::fs::read(&p).unwrap());
    }
    out
}

#[test]
fn every_committed_input_passes_both_targets() {
    let logs = log_corpus();
    let traces = trace_corpus();
    assert!(logs.len() >= 20 && traces.len() >= 7);
    for input in logs.iter().chain(traces) {
        analyze_log::check(input);
        trace_reader::check(input);
    }
}

/// One libFuzzer-like mutation.
#[derive(Clone, Debug)]
enum Mutation {
    Flip {
        at: usize,
        xor: u8,
    },
    Cut {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Repeat {
        at: usize,
        len: usize,
        times: usize,
    },
    Splice {
        at: usize,
        from: usize,
        start: usize,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1..=255u8).prop_map(|(at, xor)| Mutation::Flip { at, xor }),
        any::<usize>().prop_map(|at| Mutation::Cut { at }),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (any::<usize>(), 1..512usize, 2..200usize).prop_map(|(at, len, times)| Mutation::Repeat {
            at,
            len,
            times
        }),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1..4096usize).prop_map(
            |(at, from, start, len)| Mutation::Splice {
                at,
                from,
                start,
                len
            }
        ),
    ]
}

/// Applies mutations to a copy of `base`, capped at 1 MiB like the smoke run's inputs.
fn mutate(base: &[u8], muts: &[Mutation], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut v = base.to_vec();
    for m in muts {
        let n = v.len().max(1);
        match m {
            Mutation::Flip { at, xor } => {
                if !v.is_empty() {
                    v[at % n] ^= xor;
                }
            }
            Mutation::Cut { at } => v.truncate(at % n),
            Mutation::Insert { at, bytes } => {
                let at = (at % n).min(v.len());
                v.splice(at..at, bytes.iter().copied());
            }
            Mutation::Repeat { at, len, times } => {
                let at = (at % n).min(v.len());
                let end = (at + len).min(v.len());
                let piece = v[at..end].to_vec();
                for _ in 0..*times {
                    v.splice(end..end, piece.iter().copied());
                    if v.len() > 1 << 20 {
                        break;
                    }
                }
            }
            Mutation::Splice {
                at,
                from,
                start,
                len,
            } => {
                let src = &corpus[from % corpus.len()];
                if !src.is_empty() {
                    let s = start % src.len();
                    let e = (s + len).min(src.len());
                    let at = (at % n).min(v.len());
                    v.splice(at..at, src[s..e].iter().copied());
                }
            }
        }
        v.truncate(1 << 20);
    }
    v
}

/// Recomputes the CRC of every whole frame of a (mutated) trace, so payload damage reaches the
/// decoders instead of stopping at the checksum.
fn fix_crcs(v: &mut [u8]) {
    let Some(hlen) = v
        .get(12..16)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
    else {
        return;
    };
    let mut at = 16usize.saturating_add(hlen as usize);
    while let Some(h) = v.get(at..at + 12) {
        let len = u32::from_le_bytes(h[0..4].try_into().unwrap()) as usize;
        let start = at + 12;
        let Some(payload) = v.get(start..start.saturating_add(len)) else {
            return;
        };
        let crc = crc32fast::hash(payload);
        v[at + 8..at + 12].copy_from_slice(&crc.to_le_bytes());
        at = start + len;
    }
}

/// Kernel phrases the analyzer keys on, for inputs that reach its deeper states (what a
/// libFuzzer dictionary would hold).
const PHRASES: &[&str] = &[
    "[ 4212.019021] ",
    "[    0.000000] ",
    "[  100.000000][ T1422] ",
    "[  100.000000][    C5] ",
    "Mar 14 11:41:01.123456 host kernel: ",
    "2024-03-05T10:11:12+0100 host kernel: ",
    "[Wed Apr 10 16:40:12 2024] ",
    "-- Boot 0123456789abcdef --\n",
    "DMAR: VT-d detected Invalidation Time-out Error: SID ",
    "DMAR: VT-d detected Invalidation Queue Error: Reason ",
    "DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x180000100003, qw1 = 0x7ffffffffffff001",
    "DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x10fd8a5ec",
    "DMAR: Invalidation Time-out Error (ITE) cleared",
    "DMAR: DRHD: handling fault status reg ",
    "DMAR: dmar0: reg_base_addr fed90000 ver 1:0 cap d2008c40660462 ecap f050da",
    "pcieport 0000:17:01.0: pciehp: Slot(108): Link Down",
    "pcieport 0000:17:01.0: pciehp: Slot(108): Card not present",
    "pcieport 0000:17:01.0: pciehp: Slot(108): Attention button pressed",
    "NMI watchdog: Watchdog detected hard LOCKUP on cpu ",
    "watchdog: BUG: soft lockup - CPU#17 stuck for 26s! [irq/122-pciehp:933]",
    "rcu: INFO: rcu_preempt self-detected stall on CPU",
    "NMI backtrace for cpu 3",
    "CPU: 144 PID: 1422 Comm: irq/57-pciehp Not tainted 6.1.0 #1",
    "RIP: 0010:qi_submit_sync+0x2c0/0x490",
    "Call Trace:",
    " <TASK>",
    " qi_flush_dev_iotlb+0xb1/0xd0",
    " iommu_bus_notifier+0x7f/0x90",
    " pciehp_unconfigure_device+0x7c/0x130",
    " pciehp_handle_presence_or_link_change+0xdc/0x440",
    " pciehp_ist+0x176/0x180",
    " </TASK>",
    "Kernel panic - not syncing: Hard LOCKUP",
    "Linux version 6.12.0 (x)",
    "pci 0000:18:00.0: [8086:0b60] type 00 class 0x010802",
    "1800",
    "0",
    "=3D",
    "=\n",
    "> ",
    "\r",
    "\n",
    "\x1b[0m",
];

fn phrase_log() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            8 => prop::sample::select(PHRASES).prop_map(|s| s.as_bytes().to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..16),
        ],
        0..200,
    )
    .prop_map(|parts| parts.concat())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn analyze_log_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..8192)) {
        analyze_log::check(&data);
    }

    #[test]
    fn analyze_log_on_kernel_phrases(data in phrase_log()) {
        analyze_log::check(&data);
    }

    #[test]
    fn analyze_log_on_mutated_corpus(
        idx in any::<usize>(),
        muts in prop::collection::vec(mutation(), 1..8),
    ) {
        let corpus = log_corpus();
        let input = mutate(&corpus[idx % corpus.len()], &muts, corpus);
        analyze_log::check(&input);
    }

    #[test]
    fn trace_reader_on_random_bytes(data in prop::collection::vec(any::<u8>(), 0..8192)) {
        trace_reader::check(&data);
        // With a valid preamble, so the bytes reach the header and frame decoders.
        let mut t = b"ITEWTRC\0\x01\0\0\0".to_vec();
        t.extend_from_slice(&data);
        trace_reader::check(&t);
    }

    #[test]
    fn trace_reader_on_mutated_corpus(
        idx in any::<usize>(),
        muts in prop::collection::vec(mutation(), 1..8),
        fix in any::<bool>(),
    ) {
        let corpus = trace_corpus();
        let mut input = mutate(&corpus[idx % corpus.len()], &muts, corpus);
        if fix {
            fix_crcs(&mut input);
        }
        trace_reader::check(&input);
    }
}
