//! `cargo xtask vm-bench`: what tracing costs the workload itewatch watches, measured side by
//! side with bpftrace in one boot of each kernel (issue 14, docs/benchmarks.md).
//!
//! The VM is vm-test's (qemu.rs: q35, emulated VT-d with device-IOTLB, strict invalidation,
//! ATS virtio disks in hot-plug slots): the workload reads the slot-1 disk in 4 KiB O_DIRECT
//! requests, one `qi_submit_sync` per DMA unmap. The guest (bench_guest.rs) runs every
//! condition in rotated rounds and writes raw facts; this module parses them and derives the
//! figures (medians, slowdowns, BPF run time per program, trace bytes per submission, lost
//! events) with small pure functions.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use itewatch::knowledge::probes::{Mechanism, SPECS};

use crate::bench_guest::{self, BenchPlan, Condition};
use crate::guest::VERDICT;
use crate::kernels::{self, Kernel};
use crate::qemu::{self, Files, Guest, QemuOpts};
use crate::KernelChoice;

#[derive(clap::Args, Debug)]
pub struct VmBenchArgs {
    /// Which pinned Debian kernel(s) to boot (one boot each).
    #[arg(long, value_enum, default_value = "all")]
    pub kernel: KernelChoice,
    /// Rounds over all conditions (the order rotates by one each round).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// Workload repetitions per condition and round.
    #[arg(long, default_value_t = 7)]
    pub reps: u32,
    /// 4 KiB O_DIRECT reads per repetition (6144: 24 MiB).
    #[arg(long, default_value_t = 6144)]
    pub blocks: u32,
    /// Conditions to run, comma-separated (none, empty, fentry, full, itewatch, agent); all
    /// by default. Figures derived from a condition left out print as `?`.
    #[arg(long, value_delimiter = ',', value_parser = parse_condition)]
    pub conditions: Vec<Condition>,
    /// Back the workload disk with a file (`disk1.raw`) instead of QEMU's null block driver
    /// (the default since 2026-12-06; earlier figures in docs/benchmarks.md used a file).
    #[arg(long)]
    pub file_disk: bool,
    /// Use this static itewatch binary instead of building it (musl target).
    #[arg(long, value_name = "PATH")]
    pub itewatch: Option<PathBuf>,
    /// Upper bound for one kernel's guest run, in seconds (boot to power-off).
    #[arg(long, default_value_t = 3600)]
    pub timeout: u64,
    /// The guest's console is cut off (QEMU killed) past this many MiB.
    #[arg(long, default_value_t = 16)]
    pub serial_cap_mib: u64,
    /// Keep the big files of the run directory (initramfs, disks).
    #[arg(long)]
    pub keep: bool,
    /// Cache directory for kernel packages and run directories.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

fn parse_condition(s: &str) -> std::result::Result<Condition, String> {
    Condition::from_name(s.trim()).ok_or_else(|| {
        let names: Vec<&str> = Condition::ALL.iter().map(|c| c.name()).collect();
        format!("unknown condition {s:?} (one of {})", names.join(", "))
    })
}

impl VmBenchArgs {
    /// The conditions asked for, in the order given, each once; all of them by default.
    pub fn chosen_conditions(&self) -> Vec<Condition> {
        if self.conditions.is_empty() {
            return Condition::ALL.to_vec();
        }
        let mut v: Vec<Condition> = Vec::new();
        for c in &self.conditions {
            if !v.contains(c) {
                v.push(*c);
            }
        }
        v
    }
}

/// The kernel functions itewatch probes on the hot path (those whose plan prefers a
/// trampoline): entries and returns, for bpftrace's empty script.
pub fn hot_path_functions() -> (Vec<&'static str>, Vec<&'static str>) {
    let mut entry = Vec::new();
    let mut ret = Vec::new();
    for spec in SPECS {
        let hot = spec
            .attempts
            .iter()
            .any(|a| matches!(a.mechanism, Mechanism::Fentry | Mechanism::Fexit));
        if !hot {
            continue;
        }
        for a in spec.attempts {
            let list = match a.mechanism {
                Mechanism::Fentry | Mechanism::Kprobe => &mut entry,
                Mechanism::Fexit | Mechanism::Kretprobe => &mut ret,
                Mechanism::Tracepoint => continue,
            };
            if !list.contains(&a.target) {
                list.push(a.target);
            }
        }
    }
    (entry, ret)
}

// ---------------------------------------------------------------------------------------------
// Pure parsing and statistics.

/// The guest's `/out/results.txt`.
#[derive(Debug, Default, PartialEq)]
pub struct GuestResults {
    /// (condition, round, wall ns of one repetition).
    pub reps: Vec<(Condition, u32, u64)>,
    /// (round, trace bytes, submissions in the trace).
    pub traces: Vec<(u32, u64, u64)>,
    /// `info` lines, as written.
    pub info: Vec<String>,
}

/// `key=value` fields of a result line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

fn num(f: &BTreeMap<&str, &str>, key: &str, line: &str) -> Result<u64> {
    f.get(key)
        .with_context(|| format!("no {key}= in result line {line:?}"))?
        .parse()
        .with_context(|| format!("{key}= is not a number in result line {line:?}"))
}

pub fn parse_results(text: &str) -> Result<GuestResults> {
    let mut out = GuestResults::default();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let kind = line.split_whitespace().next().unwrap_or("");
        let f = fields(line);
        match kind {
            "rep" => {
                let name = f
                    .get("cond")
                    .with_context(|| format!("no cond= in {line:?}"))?;
                let c = Condition::from_name(name)
                    .with_context(|| format!("unknown condition {name:?} in {line:?}"))?;
                let round = num(&f, "round", line)? as u32;
                let ns = num(&f, "ns", line)?;
                if ns == 0 {
                    bail!("a repetition took 0 ns ({line:?}): the guest's clock did not read");
                }
                out.reps.push((c, round, ns));
            }
            "trace" => out.traces.push((
                num(&f, "round", line)? as u32,
                num(&f, "bytes", line)?,
                num(&f, "submissions", line)?,
            )),
            "info" => out.info.push(line["info".len()..].trim().to_string()),
            // `ready` lines and anything newer are kept in the file, not needed here.
            _ => {}
        }
    }
    Ok(out)
}

/// Median of a sample (the mean of the two middle values for an even count).
pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Slowdown of `cond` against `base`, in percent.
pub fn slowdown_pct(cond: f64, base: f64) -> f64 {
    (cond / base - 1.0) * 100.0
}

/// One BPF program in `bpftool -j prog show`.
#[derive(Clone, Debug, PartialEq)]
pub struct ProgSample {
    pub id: u64,
    pub name: String,
    pub prog_type: String,
    pub run_time_ns: u64,
    pub run_cnt: u64,
}

pub fn parse_bpftool(json: &str) -> Result<Vec<ProgSample>> {
    let v: serde_json::Value = serde_json::from_str(json).context("bpftool output is not JSON")?;
    let arr = v.as_array().context("bpftool output is not a JSON array")?;
    arr.iter()
        .map(|p| {
            Ok(ProgSample {
                id: p["id"].as_u64().context("a bpftool program without id")?,
                name: p["name"].as_str().unwrap_or("?").to_string(),
                prog_type: p["type"].as_str().unwrap_or("?").to_string(),
                // Absent while kernel.bpf_stats_enabled is 0 or the program never ran.
                run_time_ns: p["run_time_ns"].as_u64().unwrap_or(0),
                run_cnt: p["run_cnt"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// Program id -> `kprobe:FUNC` / `kretprobe:FUNC`, from `bpftool -j perf show` (kprobes
/// attached through perf events; trampolines are not listed there).
pub fn parse_perf(json: &str) -> Result<BTreeMap<u64, String>> {
    let v: serde_json::Value =
        serde_json::from_str(json).context("bpftool perf output is not JSON")?;
    let arr = v
        .as_array()
        .context("bpftool perf output is not a JSON array")?;
    Ok(arr
        .iter()
        .filter_map(|p| {
            let id = p["prog_id"].as_u64()?;
            let kind = p["fd_type"].as_str()?;
            let func = p["func"].as_str()?;
            Some((id, format!("{kind}:{func}")))
        })
        .collect())
}

/// Run time and runs of each program between two snapshots, by its attachment (`labels`,
/// from [`parse_perf`]) or else `type:name`; programs that did not run are left out.
pub fn prog_deltas(
    before: &[ProgSample],
    after: &[ProgSample],
    labels: &BTreeMap<u64, String>,
) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for a in after {
        let (t0, c0) = before
            .iter()
            .find(|b| b.id == a.id)
            .map(|b| (b.run_time_ns, b.run_cnt))
            .unwrap_or((0, 0));
        let cnt = a.run_cnt.saturating_sub(c0);
        if cnt == 0 {
            continue;
        }
        let label = labels
            .get(&a.id)
            .cloned()
            .unwrap_or_else(|| format!("{}:{}", a.prog_type, a.name));
        let e: &mut (u64, u64) = out.entry(label).or_default();
        e.0 += a.run_time_ns.saturating_sub(t0);
        e.1 += cnt;
    }
    out
}

/// Events lost in an `itewatch report --format json` document (ring buffer full, missed,
/// undecodable: the agent's `itewatch_lost_events_total` reasons).
pub fn report_lost(json: &str) -> Result<u64> {
    let v: serde_json::Value = serde_json::from_str(json).context("report is not JSON")?;
    let loss = v.get("loss").context("report has no loss section")?;
    ["lost_ringbuf_full", "missed", "undecodable"]
        .iter()
        .map(|k| {
            loss[k]
                .as_u64()
                .with_context(|| format!("report loss has no {k}"))
        })
        .sum()
}

/// Sum of a counter family's samples in Prometheus text exposition (`NAME{...} VALUE`).
pub fn metric_sum(text: &str, name: &str) -> Option<u64> {
    let mut found = false;
    let mut sum = 0u64;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        let value = rest.rsplit(' ').next().unwrap_or("");
        if let Ok(v) = value.parse::<f64>() {
            found = true;
            sum += v as u64;
        }
    }
    found.then_some(sum)
}

/// Events the agent lost, from its /metrics page: `itewatch_lost_events_total` gets a sample
/// only once a loss record arrived (agent/metrics.rs), so a page that is the agent's (it
/// counts submissions) without one means none lost; anything else is unknown.
pub fn agent_lost(metrics: &str) -> Option<u64> {
    metric_sum(metrics, "itewatch_submissions_total")?;
    Some(metric_sum(metrics, "itewatch_lost_events_total").unwrap_or(0))
}

/// One condition's figures on one kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct CondFigures {
    pub cond: Condition,
    pub reps: usize,
    pub median_s: f64,
    pub slowdown_pct: Option<f64>,
    /// Per round in which both ran: this condition's median over `none`'s median of the same
    /// round, as a slowdown in per cent. Each round's pair ran minutes apart at most, so the
    /// host's drift over the run (a busy host moves a repetition by ±10 % or more) cancels
    /// out of each pair; their spread shows how far one figure can be trusted.
    pub round_slowdowns: Vec<f64>,
    /// Run time per run and runs of each BPF program, summed over the rounds.
    pub programs: BTreeMap<String, (u64, u64)>,
}

/// One kernel's figures.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelFigures {
    pub name: String,
    pub release: String,
    pub conds: Vec<CondFigures>,
    pub trace_bytes: u64,
    pub trace_submissions: u64,
    pub lost_record: Option<u64>,
    pub lost_agent: Option<u64>,
    pub agent_submissions: Option<u64>,
    pub reps_per_round: u32,
    pub rounds: u32,
    /// The host's 1-minute load average sampled during the guest run: (mean, max).
    pub host_load: Option<(f64, f64)>,
}

impl KernelFigures {
    pub fn cond(&self, c: Condition) -> Option<&CondFigures> {
        self.conds.iter().find(|f| f.cond == c)
    }

    pub fn bytes_per_submission(&self) -> Option<f64> {
        (self.trace_submissions > 0)
            .then(|| self.trace_bytes as f64 / self.trace_submissions as f64)
    }

    /// Submissions per repetition, from itewatch's traces.
    pub fn submissions_per_rep(&self) -> Option<f64> {
        let reps = u64::from(self.rounds) * u64::from(self.reps_per_round);
        (self.trace_submissions > 0 && reps > 0)
            .then(|| self.trace_submissions as f64 / reps as f64)
    }

    /// itewatch record's slowdown over that of condition `base` (`ratio_empty`: bpftrace's
    /// empty kprobes).
    pub fn ratio(&self, base: Condition) -> Option<f64> {
        let i = self.cond(Condition::Itewatch)?.slowdown_pct?;
        let e = self.cond(base)?.slowdown_pct?;
        (e != 0.0).then(|| i / e)
    }

    /// `P1 <kernel> none=<s/rep> empty=<+pct> full=<+pct> itewatch=<+pct> agent=<+pct>
    /// ratio_empty=<itewatch/empty> bytes_per_submission=<n> lost=<n> fentry=<+pct>
    /// ratio_fentry=<itewatch/fentry>`: the issue's line, then the trampoline floor; a figure
    /// that could not be measured is `?`.
    pub fn p1_line(&self) -> String {
        let pct = |c: Condition| {
            self.cond(c)
                .and_then(|f| f.slowdown_pct)
                .map(|p| format!("{p:+.1}%"))
                .unwrap_or_else(|| "?".into())
        };
        let none = self
            .cond(Condition::None)
            .map(|f| format!("{:.3}", f.median_s))
            .unwrap_or_else(|| "?".into());
        let lost = match (self.lost_record, self.lost_agent) {
            (Some(a), Some(b)) => (a + b).to_string(),
            _ => "?".into(),
        };
        let ratio = |c: Condition| {
            self.ratio(c)
                .map(|r| format!("{r:.2}"))
                .unwrap_or_else(|| "?".into())
        };
        format!(
            "P1 {} none={} empty={} full={} itewatch={} agent={} ratio_empty={} bytes_per_submission={} lost={} fentry={} ratio_fentry={}",
            self.name,
            none,
            pct(Condition::Empty),
            pct(Condition::Full),
            pct(Condition::Itewatch),
            pct(Condition::Agent),
            ratio(Condition::Empty),
            self.bytes_per_submission()
                .map(|b| format!("{b:.0}"))
                .unwrap_or_else(|| "?".into()),
            lost,
            pct(Condition::Fentry),
            ratio(Condition::Fentry),
        )
    }

    /// The fuller table (markdown).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let spr = self.submissions_per_rep();
        let base = self.cond(Condition::None).map(|f| f.median_s);
        let _ = writeln!(
            s,
            "| condition | median s/rep | slowdown | per round | extra wall ns per submission | BPF run time per run (runs), by program |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|");
        for f in &self.conds {
            let slow = f
                .slowdown_pct
                .map(|p| format!("{p:+.1} %"))
                .unwrap_or_else(|| "—".into());
            let extra = match (base, spr, f.cond) {
                (_, _, Condition::None) | (None, _, _) | (_, None, _) => "—".to_string(),
                (Some(b), Some(n), _) => format!("{:.0}", (f.median_s - b) * 1e9 / n),
            };
            let rounds = if f.round_slowdowns.is_empty() {
                "—".to_string()
            } else {
                f.round_slowdowns
                    .iter()
                    .map(|p| format!("{p:+.1}"))
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let progs = if f.programs.is_empty() {
                "—".to_string()
            } else {
                f.programs
                    .iter()
                    .map(|(name, (ns, cnt))| {
                        format!("`{name}` {:.0} ns ({cnt})", *ns as f64 / *cnt as f64)
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            };
            let _ = writeln!(
                s,
                "| {} | {:.3} | {} | {} | {} | {} |",
                f.cond.name(),
                f.median_s,
                slow,
                rounds,
                extra,
                progs
            );
        }
        s
    }
}

/// What itewatch's own counters said, summed over the rounds (`None`: not readable).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SinkCounts {
    pub lost_record: Option<u64>,
    pub lost_agent: Option<u64>,
    pub agent_submissions: Option<u64>,
}

/// Derives one kernel's figures from what its guest wrote.
pub fn figures(
    name: &str,
    release: &str,
    res: &GuestResults,
    bpf: &BTreeMap<Condition, BTreeMap<String, (u64, u64)>>,
    sinks: SinkCounts,
    rounds: u32,
    reps: u32,
) -> KernelFigures {
    let med = |c: Condition| {
        let v: Vec<f64> = res
            .reps
            .iter()
            .filter(|r| r.0 == c)
            .map(|r| r.2 as f64 / 1e9)
            .collect();
        median(&v).map(|m| (m, v.len()))
    };
    let none = med(Condition::None).map(|m| m.0);
    let round_med = |c: Condition, r: u32| {
        let v: Vec<f64> = res
            .reps
            .iter()
            .filter(|x| x.0 == c && x.1 == r)
            .map(|x| x.2 as f64 / 1e9)
            .collect();
        median(&v)
    };
    let mut seen: Vec<u32> = res.reps.iter().map(|x| x.1).collect();
    seen.sort_unstable();
    seen.dedup();
    let conds = Condition::ALL
        .into_iter()
        .filter_map(|c| {
            let (m, n) = med(c)?;
            Some(CondFigures {
                cond: c,
                reps: n,
                median_s: m,
                slowdown_pct: match (c, none) {
                    (Condition::None, _) | (_, None) => None,
                    (_, Some(b)) => Some(slowdown_pct(m, b)),
                },
                round_slowdowns: match c {
                    Condition::None => Vec::new(),
                    _ => seen
                        .iter()
                        .filter_map(|&r| {
                            Some(slowdown_pct(
                                round_med(c, r)?,
                                round_med(Condition::None, r)?,
                            ))
                        })
                        .collect(),
                },
                programs: bpf.get(&c).cloned().unwrap_or_default(),
            })
        })
        .collect();
    KernelFigures {
        name: name.to_string(),
        release: release.to_string(),
        conds,
        trace_bytes: res.traces.iter().map(|t| t.1).sum(),
        trace_submissions: res.traces.iter().map(|t| t.2).sum(),
        lost_record: sinks.lost_record,
        lost_agent: sinks.lost_agent,
        agent_submissions: sinks.agent_submissions,
        reps_per_round: reps,
        rounds,
        host_load: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Running it.

pub fn run(args: &VmBenchArgs) -> Result<bool> {
    let root = crate::vmtest::workspace_root();
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| root.join(".cache/vm"));
    fs::create_dir_all(&cache)?;
    if args.rounds == 0 || args.reps == 0 || args.blocks == 0 {
        bail!("--rounds, --reps and --blocks must be at least 1");
    }
    let chosen = kernels::chosen(args.kernel);
    let rootfs = crate::bench_rootfs::prepare().context("preparing the bpftrace rootfs")?;
    let itewatch = match &args.itewatch {
        Some(p) => p.clone(),
        None => crate::vmtest::build_itewatch(&root)?,
    };
    let mut all = Vec::new();
    let mut ok = true;
    for p in chosen {
        let t0 = Instant::now();
        let kernel = kernels::prepare(&cache, p)?;
        let dir = cache.join(format!("bench-{}", p.name));
        match run_kernel(&kernel, &dir, &rootfs, &itewatch, args) {
            Ok(f) => {
                println!(
                    "\n== vm-bench {} ({}): {} rounds x {} reps of {} x 4 KiB O_DIRECT reads, {:.0} s; run directory {}",
                    p.name,
                    kernel.release,
                    args.rounds,
                    args.reps,
                    args.blocks,
                    t0.elapsed().as_secs_f64(),
                    dir.display()
                );
                if let Some((mean, max)) = f.host_load {
                    println!(
                        "host load average (1 min) during the run: mean {mean:.1}, max {max:.1}"
                    );
                }
                print!("{}", f.table());
                println!(
                    "itewatch record: {} bytes in traces holding {} submissions ({} per rep); lost: record {}, agent {} (agent saw {} submissions)",
                    f.trace_bytes,
                    f.trace_submissions,
                    f.submissions_per_rep()
                        .map(|n| format!("{n:.0}"))
                        .unwrap_or_else(|| "?".into()),
                    opt(f.lost_record),
                    opt(f.lost_agent),
                    opt(f.agent_submissions)
                );
                all.push(f);
            }
            Err(e) => {
                ok = false;
                println!(
                    "\n== vm-bench {} ({}): FAILED after {:.0} s: {e:#}\n  run directory {}",
                    p.name,
                    kernel.release,
                    t0.elapsed().as_secs_f64(),
                    dir.display()
                );
            }
        }
    }
    println!();
    for f in &all {
        println!("{}", f.p1_line());
    }
    Ok(ok)
}

fn opt(v: Option<u64>) -> String {
    v.map(|n| n.to_string()).unwrap_or_else(|| "?".into())
}

fn build_initramfs(
    kernel: &Kernel,
    itewatch: &Path,
    args: &VmBenchArgs,
    path: &Path,
) -> Result<()> {
    let (mut c, names) = crate::vmtest::guest_base(kernel, Some(itewatch), path)?;
    let (entry, ret) = hot_path_functions();
    let sched = bench_guest::schedule(&args.chosen_conditions(), args.rounds);
    let script = bench_guest::init_script(&BenchPlan {
        modules: &names,
        out_dev: qemu::OUT_BDF,
        work_slot: qemu::SAFE_SLOT,
        blocks: args.blocks,
        reps: args.reps,
        schedule: &sched,
        entry_funcs: &entry,
        return_funcs: &ret,
    });
    c.file("init", 0o755, script.as_bytes());
    fs::write(path, c.finish()).with_context(|| format!("writing {}", path.display()))
}

fn run_kernel(
    kernel: &Kernel,
    dir: &Path,
    rootfs: &Path,
    itewatch: &Path,
    args: &VmBenchArgs,
) -> Result<KernelFigures> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let files = Files {
        dir: dir.to_path_buf(),
        kernel: kernel.vmlinuz.clone(),
        initrd: dir.join("initramfs.cpio"),
    };
    build_initramfs(kernel, itewatch, args, &files.initrd)?;
    // The workload disk (slot 1, ATS) is QEMU's null block driver unless asked otherwise: the
    // reads are the same DMA (map, device reads zeros, unmap and its invalidations), without
    // a host file whose I/O scheduling moved each repetition by ±20 % on a busy host. Slot 2's
    // disk is idle.
    let work_bytes = (u64::from(args.blocks) * 4096).max(8 << 20);
    if args.file_disk {
        qemu::make_disk(&files.disk(1), work_bytes)?;
    }
    qemu::make_disk(&files.disk(2), 8 << 20)?;
    // The output disk starts as the bpftrace rootfs (a tar stream the guest unpacks), and
    // ends as the guest's /out.
    fs::copy(rootfs, files.out_disk())
        .with_context(|| format!("copying {} to the output disk", rootfs.display()))?;
    {
        let f = fs::OpenOptions::new().write(true).open(files.out_disk())?;
        let len = f.metadata()?.len();
        f.set_len(len + (64 << 20))?;
    }
    let qopts = QemuOpts {
        serial_cap_bytes: args.serial_cap_mib << 20,
        null_disk1: (!args.file_disk).then_some(work_bytes),
        ..QemuOpts::stock()
    };
    eprintln!(
        "vm-bench: booting {} ({}) under TCG",
        kernel.pinned.name, kernel.release
    );
    let mut g = Guest::spawn(&files, &qopts)?;
    let deadline = g.started + Duration::from_secs(args.timeout);
    let mut loads = Vec::new();
    let verdict = watch(&mut g, deadline, &mut loads);
    let _ = g.wait_exit(Instant::now() + Duration::from_secs(30));
    let verdict = verdict?;
    let out = dir.join("out");
    // Unpacked only once the guest wrote /out (before that the disk holds the rootfs).
    fs::create_dir_all(&out)?;
    let st = Command::new("tar")
        .arg("xf")
        .arg(files.out_disk())
        .arg("-C")
        .arg(&out)
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("could not unpack the guest's output disk");
    }
    if !args.keep {
        for f in [
            "initramfs.cpio",
            "disk1.raw",
            "disk2.raw",
            "out.raw",
            "itewatch.stripped",
        ] {
            let _ = fs::remove_file(dir.join(f));
        }
    }
    if verdict != format!("{VERDICT} success") {
        bail!(
            "guest verdict {verdict:?}; guest outputs in {}:\n{}",
            out.display(),
            qemu::tail(&g.serial_text(), 30)
        );
    }
    let mut f = collect(kernel, &out, args)?;
    f.host_load = median(&loads).and_then(|_| {
        let mean = loads.iter().sum::<f64>() / loads.len() as f64;
        loads
            .iter()
            .copied()
            .reduce(f64::max)
            .map(|max| (mean, max))
    });
    Ok(f)
}

/// The 1-minute load average of `/proc/loadavg` text.
pub fn loadavg_1min(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

/// Follows the console until the verdict line; shows progress. Returns the verdict line.
fn watch(g: &mut Guest, deadline: Instant, loads: &mut Vec<f64>) -> Result<String> {
    let marker = format!("{VERDICT} ");
    let mut shown = 0usize;
    let mut last_note = Instant::now();
    loop {
        g.poll_serial();
        let text = g.console();
        // Progress: the guest's result lines as they come (reps summarized).
        let new = &text[shown..];
        if let Some(end) = new.rfind('\n') {
            for l in new[..end].lines() {
                if let Some(r) = l.find("ITEWATCH-BENCH ") {
                    let r = &l[r + "ITEWATCH-BENCH ".len()..];
                    if !r.starts_with("rep ") || r.contains("rep=0 ") {
                        eprintln!(
                            "vm-bench: [{:>5.0} s] {r}",
                            g.started.elapsed().as_secs_f64()
                        );
                    }
                } else if l.contains("itewatch-bench: ") || l.contains("ITEWATCH-STAGE") {
                    eprintln!(
                        "vm-bench: [{:>5.0} s] {}",
                        g.started.elapsed().as_secs_f64(),
                        l.trim()
                    );
                }
            }
            shown += end + 1;
        }
        if let Some(i) = text.find(&marker) {
            let line = text[i..].lines().next().unwrap_or("").to_string();
            if text[i..].contains('\n') {
                return Ok(line);
            }
        }
        if let Some(st) = g.exited()? {
            bail!(
                "QEMU exited ({st}) without a verdict:\n{}",
                qemu::tail(g.console(), 40)
            );
        }
        if g.serial_capped() {
            bail!("the guest's console passed its cap; QEMU killed");
        }
        if Instant::now() >= deadline {
            g.kill();
            bail!(
                "no verdict after {:.0} s; QEMU killed:\n{}",
                g.started.elapsed().as_secs_f64(),
                qemu::tail(g.console(), 40)
            );
        }
        // The host is shared: how loaded it was says how far to trust the figures.
        if last_note.elapsed() > Duration::from_secs(10) {
            last_note = Instant::now();
            if let Some(l) = fs::read_to_string("/proc/loadavg")
                .ok()
                .as_deref()
                .and_then(loadavg_1min)
            {
                loads.push(l);
            }
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Reads the guest's /out and derives the figures.
fn collect(kernel: &Kernel, out: &Path, args: &VmBenchArgs) -> Result<KernelFigures> {
    let text = fs::read_to_string(out.join("results.txt"))
        .with_context(|| format!("reading {}", out.join("results.txt").display()))?;
    let res = parse_results(&text)?;
    let mut bpf: BTreeMap<Condition, BTreeMap<String, (u64, u64)>> = BTreeMap::new();
    for c in args.chosen_conditions() {
        for r in 0..args.rounds {
            let read = |which: &str| -> Result<Vec<ProgSample>> {
                let p = out.join(format!("bpf-{}-r{r}-{which}.json", c.name()));
                let s =
                    fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
                parse_bpftool(&s).with_context(|| format!("parsing {}", p.display()))
            };
            let perf = out.join(format!("perf-{}-r{r}.json", c.name()));
            let labels = match fs::read_to_string(&perf) {
                Ok(s) => parse_perf(&s).with_context(|| format!("parsing {}", perf.display()))?,
                Err(_) => BTreeMap::new(),
            };
            let d = prog_deltas(&read("before")?, &read("after")?, &labels);
            let e = bpf.entry(c).or_default();
            for (name, (ns, cnt)) in d {
                let x = e.entry(name).or_default();
                x.0 += ns;
                x.1 += cnt;
            }
        }
    }
    let mut lost_record = Some(0);
    let mut lost_agent = Some(0);
    let mut agent_subs = Some(0);
    for r in 0..args.rounds {
        let rep = fs::read_to_string(out.join(format!("report-r{r}.json")))
            .ok()
            .and_then(|s| report_lost(&s).ok());
        lost_record = lost_record.zip(rep).map(|(a, b)| a + b);
        let m = fs::read_to_string(out.join(format!("metrics-r{r}.txt"))).ok();
        let l = m.as_deref().and_then(agent_lost);
        let s = m
            .as_deref()
            .and_then(|m| metric_sum(m, "itewatch_submissions_total"));
        lost_agent = lost_agent.zip(l).map(|(a, b)| a + b);
        agent_subs = agent_subs.zip(s).map(|(a, b)| a + b);
    }
    Ok(figures(
        kernel.pinned.name,
        &kernel.release,
        &res,
        &bpf,
        SinkCounts {
            lost_record,
            lost_agent,
            agent_submissions: agent_subs,
        },
        args.rounds,
        args.reps,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn slowdown_is_relative_to_base() {
        assert!((slowdown_pct(1.121, 1.0) - 12.1).abs() < 1e-9);
        assert!((slowdown_pct(0.9, 1.0) + 10.0).abs() < 1e-9);
    }

    #[test]
    fn results_lines_parse_and_bad_ones_are_named() {
        let t = "info workload_dev=0000:01:00.0 blocks=6144\n\
                 ready cond=empty round=0 ns=5\n\
                 rep cond=none round=0 rep=0 ns=1000000000\n\
                 rep cond=empty round=1 rep=3 ns=1100000000\n\
                 trace round=2 bytes=4300 submissions=10\n";
        let r = parse_results(t).unwrap();
        assert_eq!(
            r.reps,
            vec![
                (Condition::None, 0, 1_000_000_000),
                (Condition::Empty, 1, 1_100_000_000)
            ]
        );
        assert_eq!(r.traces, vec![(2, 4300, 10)]);
        assert_eq!(r.info, vec!["workload_dev=0000:01:00.0 blocks=6144"]);
        let e = parse_results("rep cond=kprobe round=0 rep=0 ns=1\n").unwrap_err();
        assert!(format!("{e:#}").contains("kprobe"));
        let e = parse_results("rep cond=none round=0 rep=0 ns=\n").unwrap_err();
        assert!(format!("{e:#}").contains("ns="));
        assert!(parse_results("rep cond=none round=0 rep=0 ns=0\n").is_err());
    }

    #[test]
    fn bpftool_deltas_per_program() {
        let before = r#"[{"id":7,"type":"kprobe","name":"qi_submit_sync","run_time_ns":100,"run_cnt":2},
                         {"id":8,"type":"tracing","name":"idle"}]"#;
        let after = r#"[{"id":7,"type":"kprobe","name":"qi_submit_sync","run_time_ns":1100,"run_cnt":12},
                        {"id":8,"type":"tracing","name":"idle"},
                        {"id":9,"type":"tracing","name":"qi_submit_sync_fexit","run_time_ns":50,"run_cnt":5}]"#;
        let perf = r#"[{"pid":229,"fd":12,"prog_id":7,"fd_type":"kretprobe","func":"qi_submit_sync","offset":0},
                       {"pid":229,"fd":13,"prog_id":3,"fd_type":"uprobe","filename":"/usr/bin/bpftrace","offset":5}]"#;
        let labels = parse_perf(perf).unwrap();
        assert_eq!(labels[&7], "kretprobe:qi_submit_sync");
        assert!(!labels.contains_key(&3));
        let d = prog_deltas(
            &parse_bpftool(before).unwrap(),
            &parse_bpftool(after).unwrap(),
            &labels,
        );
        assert_eq!(d.len(), 2);
        assert_eq!(d["kretprobe:qi_submit_sync"], (1000, 10));
        assert_eq!(d["tracing:qi_submit_sync_fexit"], (50, 5));
        assert!(parse_bpftool("{}").is_err());
    }

    #[test]
    fn lost_from_report_and_metrics() {
        let rep = r#"{"loss":{"lost_ringbuf_full":2,"missed":1,"undecodable":0,"return_without_entry":5}}"#;
        assert_eq!(report_lost(rep).unwrap(), 3);
        assert!(report_lost(r#"{"loss":{}}"#).is_err());
        let m = "# HELP itewatch_lost_events Events lost.\n\
                 itewatch_lost_events_total{reason=\"ringbuf_full\"} 3\n\
                 itewatch_lost_events_total{reason=\"missed\"} 1\n\
                 itewatch_lost_events_totalx 9\n\
                 itewatch_submissions_total{iommu=\"dmar0\"} 42\n";
        assert_eq!(metric_sum(m, "itewatch_lost_events_total"), Some(4));
        assert_eq!(metric_sum(m, "itewatch_submissions_total"), Some(42));
        assert_eq!(metric_sum(m, "itewatch_nothing_total"), None);
        assert_eq!(agent_lost(m), Some(4));
        assert_eq!(
            agent_lost("itewatch_submissions_total{iommu=\"dmar0\"} 8192\n"),
            Some(0)
        );
        assert_eq!(agent_lost("<html>not the agent</html>"), None);
    }

    #[test]
    fn round_slowdowns_pair_each_round_with_its_none() {
        // The host got 50 % slower between the rounds: pooled, `empty` looks like +30 %
        // (its round-1 reps outnumber none's); paired by round it is +10 % both times.
        let mut res = GuestResults::default();
        for (c, r, ns, n) in [
            (Condition::None, 0, 1_000_000_000u64, 3),
            (Condition::Empty, 0, 1_100_000_000, 1),
            (Condition::None, 1, 1_500_000_000, 1),
            (Condition::Empty, 1, 1_650_000_000, 3),
        ] {
            for _ in 0..n {
                res.reps.push((c, r, ns));
            }
        }
        let f = figures(
            "6.1",
            "6.1",
            &res,
            &BTreeMap::new(),
            SinkCounts::default(),
            2,
            3,
        );
        let e = f.cond(Condition::Empty).unwrap();
        assert_eq!(e.slowdown_pct.map(|p| p.round()), Some(65.0));
        let r: Vec<f64> = e.round_slowdowns.iter().map(|p| p.round()).collect();
        assert_eq!(r, [10.0, 10.0]);
        assert!(f.cond(Condition::None).unwrap().round_slowdowns.is_empty());
        assert!(f
            .table()
            .contains("| empty | 1.650 | +65.0 % | +10.0 / +10.0 |"));
    }

    #[test]
    fn p1_line_and_ratio() {
        let mut res = GuestResults::default();
        for (c, ns) in [
            (Condition::None, 1_000_000_000u64),
            (Condition::Empty, 1_100_000_000),
            (Condition::Fentry, 1_020_000_000),
            (Condition::Full, 1_300_000_000),
            (Condition::Itewatch, 1_050_000_000),
            (Condition::Agent, 1_200_000_000),
        ] {
            for _ in 0..3 {
                res.reps.push((c, 0, ns));
            }
        }
        res.traces.push((0, 64_000, 1000));
        let f = figures(
            "6.12",
            "6.12.117",
            &res,
            &BTreeMap::new(),
            SinkCounts {
                lost_record: Some(0),
                lost_agent: Some(2),
                agent_submissions: Some(900),
            },
            1,
            3,
        );
        assert_eq!(
            f.p1_line(),
            "P1 6.12 none=1.000 empty=+10.0% full=+30.0% itewatch=+5.0% agent=+20.0% ratio_empty=0.50 bytes_per_submission=64 lost=2 fentry=+2.0% ratio_fentry=2.50"
        );
        // 1000 submissions over 3 reps; empty costs 0.1 s per rep: 300 µs per submission.
        assert!(f
            .table()
            .contains("| empty | 1.100 | +10.0 % | +10.0 | 300000 |"));
        // Nothing measured: the figures say so instead of inventing them.
        let g = figures(
            "6.1",
            "6.1",
            &GuestResults::default(),
            &BTreeMap::new(),
            SinkCounts::default(),
            3,
            7,
        );
        assert_eq!(
            g.p1_line(),
            "P1 6.1 none=? empty=? full=? itewatch=? agent=? ratio_empty=? bytes_per_submission=? lost=? fentry=? ratio_fentry=?"
        );
    }

    #[test]
    fn loadavg_first_field() {
        assert_eq!(loadavg_1min("5.78 3.95 2.15 3/412 32563\n"), Some(5.78));
        assert_eq!(loadavg_1min(""), None);
    }

    #[test]
    fn conditions_chosen_in_order_once_all_by_default() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: VmBenchArgs,
        }
        let parse = |v: &[&str]| Cli::try_parse_from([&["vm-bench"], v].concat()).map(|c| c.a);
        assert_eq!(parse(&[]).unwrap().chosen_conditions(), Condition::ALL);
        assert_eq!(
            parse(&["--conditions", "itewatch,none,itewatch,fentry"])
                .unwrap()
                .chosen_conditions(),
            [Condition::Itewatch, Condition::None, Condition::Fentry]
        );
        let err = parse(&["--conditions", "none,kprobe"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unknown condition \"kprobe\""), "{err}");
    }

    #[test]
    fn hot_path_is_the_trampoline_part_of_the_plan() {
        let (entry, ret) = hot_path_functions();
        assert!(entry.contains(&"qi_submit_sync"));
        assert!(entry.contains(&"qi_flush_dev_iotlb"));
        assert!(!entry.contains(&"pciehp_ist"));
        assert_eq!(ret, vec!["qi_submit_sync"]);
    }
}
