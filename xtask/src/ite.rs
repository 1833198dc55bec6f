//! Scenario `ite-surprise`: a surprise removal with QEMU's IOMMU timing out device-TLB
//! invalidations to absent devices (qemu-ite/). The host watches the guest's console and the
//! agent's last-gasp serial port while it happens, then checks what the kernel did against
//! what its source says (`kernels::IteResponse`) and what itewatch said against the kernel.
//!
//! Everything checked comes from the guest: the console (the kernel's own ITE, pciehp and RCU
//! stall lines), the recorded trace's raw records, the sinks' outputs. Nothing is injected into
//! itewatch's event stream; the time-out itself comes from the emulated IOMMU.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::assert::{parse_topology, Check, Disk, RunFacts};
use crate::guest::{STAGE, VERDICT};
use crate::kernels::{IteResponse, Kernel};
use crate::qemu::{Files, Guest};

/// After the cut, at most this long for the kernel to finish the removal or hang and be
/// reported (an RCU stall comes ~21 s after the CPU stops), and for the guest to save /out.
const AFTER_CUT: Duration = Duration::from_secs(150);
/// A guest that printed its verdict gets this long to power off before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(20);
/// A hung guest: how long the console is still read after the kernel's RCU stall line, for
/// the rest of the report (the stalled CPU's backtrace) to arrive.
const STALL_TAIL: Duration = Duration::from_secs(5);

/// The kernel's ITE report (qi_dump_fault, KERN_ERR).
const ITE_LINE: &str = "VT-d detected Invalidation Time-out Error: SID";
const STALL_LINE: &str = "rcu: INFO: rcu_";

/// Host-side seconds since QEMU started.
fn host_s(g: &Guest) -> f64 {
    g.started.elapsed().as_secs_f64()
}

/// Reads complete lines appended to a file since `offset`.
fn new_lines(path: &Path, offset: &mut u64, partial: &mut String) -> Vec<String> {
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    if f.seek(SeekFrom::Start(*offset)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    *offset += buf.len() as u64;
    partial.push_str(&String::from_utf8_lossy(&buf));
    let mut out = Vec::new();
    while let Some(i) = partial.find('\n') {
        let line: String = partial.drain(..=i).collect();
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if !line.is_empty() {
            out.push(line);
        }
    }
    out
}

/// Drives the guest through the cut and watches what follows; returns the verdict line.
pub fn drive(
    g: &mut Guest,
    files: &Files,
    facts: &mut RunFacts,
    deadline: Instant,
) -> Result<String> {
    let stage = |s: &str| format!("{STAGE} {s}");
    for s in ["booted", "recording", "dma-running", "surprise-cut"] {
        crate::vmtest::wait_marker_pub(g, &stage(s), deadline)?;
        facts.stage_s.push((s, host_s(g)));
    }
    let until = (Instant::now() + AFTER_CUT).min(deadline);
    let lastgasp = files.tui_screen();
    let (mut lg_off, mut lg_partial) = (0u64, String::new());
    let mut scanned = 0usize;
    let mut verdict = None;
    loop {
        g.poll_serial();
        let now = host_s(g);
        for line in new_lines(&lastgasp, &mut lg_off, &mut lg_partial) {
            facts.last_gasp.push((now, line));
        }
        // Only whole lines of the console, from where the last look stopped.
        let text = g.console();
        let end = text.rfind('\n').map_or(0, |i| i + 1).max(scanned);
        for line in text[scanned..end].lines() {
            if line.contains(ITE_LINE) {
                facts.ite_lines += 1;
                facts.first_ite_s.get_or_insert(now);
            }
            if line.contains(STALL_LINE) && facts.stall_s.is_none() {
                facts.stall_s = Some(now);
                facts.stage_s.push(("rcu-stall (console)", now));
            }
            if line.contains("itewatch: {") && facts.kmsg_s.is_none() {
                facts.kmsg_s = Some(now);
            }
            for s in ["removal-hung", "surprise-removed", "recorder-stopped"] {
                if line.starts_with(&stage(s)) {
                    facts.stage_s.push((s, now));
                }
            }
            if let Some(i) = line.find(&format!("{VERDICT} ")) {
                if verdict.is_none() {
                    facts.stage_s.push(("verdict", now));
                }
                verdict = Some(line[i..].to_string());
            }
        }
        scanned = end;
        if g.serial_capped() {
            facts.serial_capped = true;
            break;
        }
        if g.exited()?.is_some() || Instant::now() >= until {
            break;
        }
        // A hung guest prints its verdict before the kernel's stall report and then spins:
        // keep reading the console until the report and its backtrace are in.
        let hung = verdict
            .as_ref()
            .is_some_and(|v| v.contains("hung: removal of"));
        let tail_in = facts
            .stall_s
            .is_some_and(|t| now - t >= STALL_TAIL.as_secs_f64());
        if verdict.is_some() && (!hung || tail_in) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some(v) = &verdict {
        facts.verdict_hung = v.contains("hung: removal of");
        let grace = Instant::now() + EXIT_GRACE;
        while !facts.verdict_hung && g.exited()?.is_none() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // No verdict, or a hung guest whose kernel never reported the stall: where is every
    // vCPU? Three samples of the registers, 0.5 s apart, from QEMU's monitor (symbolize RIP
    // with the kernel's System.map; docs/vm-tests.md).
    if (verdict.is_none() || (facts.verdict_hung && facts.stall_s.is_none()))
        && !facts.serial_capped
    {
        let _ = dump_cpus(files);
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            g.poll_serial();
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // A guest spinning with interrupts off never powers off by itself.
    g.kill();
    for line in new_lines(&lastgasp, &mut lg_off, &mut lg_partial) {
        facts.last_gasp.push((host_s(g), line));
    }
    match verdict {
        Some(v) => Ok(v),
        None if facts.serial_capped => bail!("the console passed its size cap; QEMU was killed"),
        None => bail!(
            "no verdict from the guest within {} s of the cut",
            AFTER_CUT.as_secs()
        ),
    }
}

fn dump_cpus(files: &Files) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut q = crate::qmp::Qmp::connect(&files.qmp(), deadline)?;
    let mut out = String::new();
    for i in 0..3 {
        let r = q.execute(
            "human-monitor-command",
            serde_json::json!({ "command-line": "info registers -a" }),
            deadline,
        )?;
        out.push_str(&format!("== sample {i}\n{}\n", r.as_str().unwrap_or("")));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The kernel stack of every vCPU other than 0 (the one that spins): 128 quadwords from
    // its RSP, to symbolize the return addresses with the kernel's System.map and the KASLR
    // offset (2 MiB aligned) that CPU 0's RIP in qi_submit_sync gives.
    let regs = out.clone();
    let mut cpu = None;
    for line in regs.lines() {
        if let Some(n) = line.strip_prefix("CPU#") {
            cpu = n.trim().parse::<u32>().ok();
        }
        if let (Some(c), Some(i)) = (cpu, line.find("RSP=")) {
            if c == 0 {
                continue;
            }
            let rsp = &line[i + 4..i + 20];
            let hmp = |q: &mut crate::qmp::Qmp, cmd: String| {
                q.execute(
                    "human-monitor-command",
                    serde_json::json!({ "command-line": cmd }),
                    deadline,
                )
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
            };
            hmp(&mut q, format!("cpu {c}"));
            let dump = hmp(&mut q, format!("x/128gx 0x{rsp}"));
            out.push_str(&format!("== stack of CPU {c} from RSP {rsp}\n{dump}\n"));
            cpu = None;
        }
    }
    std::fs::write(files.cpus_dump(), out)?;
    Ok(())
}

/// `0000:02:00.0` → SID 0x0200.
fn sid_of(bdf: &str) -> Option<u16> {
    let (head, devfn) = bdf.rsplit_once(':')?;
    let bus = head.rsplit(':').next()?;
    let (dev, func) = devfn.split_once('.')?;
    let bus = u16::from_str_radix(bus, 16).ok()?;
    let dev = u16::from_str_radix(dev, 16).ok()?;
    let func = u16::from_str_radix(func, 16).ok()?;
    Some(bus << 8 | dev << 3 | func)
}

/// The guest's console timestamp of a line (`[   38.123456] ...`), in ns.
fn printk_ns(line: &str) -> Option<u64> {
    let s = line.trim_start().strip_prefix('[')?;
    let (t, _) = s.split_once(']')?;
    let (sec, frac) = t.trim().split_once('.')?;
    let sec: u64 = sec.parse().ok()?;
    let frac = format!("{frac:0<9}");
    Some(sec * 1_000_000_000 + frac[..9].parse::<u64>().ok()?)
}

/// The last-gasp lines (JSON objects) as the host received them.
fn last_gasp(facts: &RunFacts) -> Vec<(f64, Value)> {
    facts
        .last_gasp
        .iter()
        .filter_map(|(t, l)| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["itewatch"] == "incident").then_some((*t, v))
        })
        .collect()
}

/// Every check of an `ite-surprise` run.
#[allow(clippy::too_many_arguments)]
pub fn check(
    kernel: &Kernel,
    files: &Files,
    out: &Path,
    facts: &RunFacts,
    driven: Result<String>,
    unpacked: Result<()>,
    recorded: bool,
) -> Vec<Check> {
    let mut c = Vec::new();
    let serial = fs::read(files.serial())
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    // The last-gasp lines, kept beside the run: one JSON object per line with the guest's
    // timestamp (t_ns, CLOCK_MONOTONIC: the base of the console's timestamps).
    let kept: String = facts
        .last_gasp
        .iter()
        .map(|(_, l)| format!("{l}\n"))
        .collect();
    let _ = fs::write(files.dir.join("incidents.ndjson"), kept);
    let verdict = match &driven {
        Ok(v) => v.clone(),
        Err(e) => format!("{e:#}"),
    };
    c.push(Check::new(
        "guest ran to its verdict (or was stopped at its bound)",
        driven.is_ok() && !facts.serial_capped,
        format!(
            "{verdict}; console {} lines{}",
            serial.lines().count(),
            if facts.serial_capped { " (capped)" } else { "" }
        ),
    ));
    let stages: Vec<String> = facts
        .stage_s
        .iter()
        .map(|(s, t)| format!("{s} {t:.1}"))
        .collect();
    c.push(Check::new(
        "timeline (s since QEMU start)",
        true,
        stages.join(", "),
    ));
    // The guest prints its topology on the console too: a guest that could not save /out
    // still says which disk was removed.
    let topology = fs::read_to_string(out.join("topology.txt")).unwrap_or_else(|_| {
        serial
            .lines()
            .filter(|l| l.starts_with("role="))
            .map(|l| format!("{l}\n"))
            .collect()
    });
    let disks = parse_topology(&topology);
    let Some(disk) = disks.iter().find(|d| d.role == "surprise").cloned() else {
        c.push(Check::fail(
            "surprise disk found behind a hot-plug slot",
            format!("no topology.txt in {} ({unpacked:?})", out.display()),
        ));
        return c;
    };
    let Some(sid) = sid_of(&disk.dev) else {
        c.push(Check::fail("surprise disk SID", disk.dev.clone()));
        return c;
    };
    c.extend(stimuli(&serial, &disk));
    // The kernel's ITE report for the removed device: the emulated IOMMU's time-out, as the
    // kernel read it (FSTS.ITE, IQER.ITESID).
    let ite_for_sid = format!("{ITE_LINE} {sid:x}");
    let ite_lines = serial.lines().filter(|l| l.contains(&ite_for_sid)).count();
    let other_ite = serial
        .lines()
        .filter(|l| l.contains(ITE_LINE) && !l.contains(&ite_for_sid))
        .count();
    c.push(Check::new(
        format!("kernel: ITE reported for SID {sid:x} ({})", disk.dev),
        ite_lines >= 1 && other_ite == 0,
        format!(
            "{ite_lines} ITE lines for SID {sid:x}, {other_ite} for other SIDs; first {:.1} s",
            facts.first_ite_s.unwrap_or(-1.0)
        ),
    ));
    let stage = |s: &str| facts.stage_s.iter().find(|(n, _)| *n == s).map(|(_, t)| *t);
    match kernel.pinned.ite {
        IteResponse::RetriesForever => {
            c.extend(retries_forever(
                &serial, facts, &disk, sid, ite_lines, out, true,
            ));
        }
        IteResponse::LocksUpInAbortWalk => {
            c.extend(retries_forever(
                &serial, facts, &disk, sid, ite_lines, out, false,
            ));
        }
        IteResponse::AbortsTimedOut => {
            c.push(Check::new(
                "kernel: -ETIMEDOUT path, removal completed (80a9b50c0b9e)",
                stage("surprise-removed").is_some() && stage("removal-hung").is_none(),
                format!(
                    "surprise-removed at {:?} s; {ite_lines} ITE lines (a retry loop would print thousands)",
                    stage("surprise-removed")
                ),
            ));
            c.push(Check::new(
                "kernel: no retry storm",
                ite_lines < 50,
                format!("{ite_lines} ITE lines"),
            ));
            if recorded {
                c.extend(aborts(out, facts, &disk, sid));
                match disks.iter().find(|d| d.role == "safe") {
                    Some(other) => c.push(crate::preflight_vm::after_ite_check(
                        out, sid, ite_lines, other,
                    )),
                    None => c.push(Check::fail(
                        "preflight after the ITE",
                        "no other disk in topology.txt",
                    )),
                }
            }
        }
    }
    if recorded {
        c.push(crate::assert::memory_check(out));
    }
    // What the live tool said about the removed device: the agent's last-gasp lines (all a
    // hung guest leaves) or, when the removal completed, the report of the recorded trace.
    let live: Vec<Value> = match kernel.pinned.ite {
        IteResponse::RetriesForever | IteResponse::LocksUpInAbortWalk => {
            latest_lines(&last_gasp(facts), &disk.dev)
        }
        IteResponse::AbortsTimedOut => itewatch::document::from_trace_file(
            &crate::assert::trace_path(out),
            itewatch::correlate::Config::default(),
        )
        .ok()
        .and_then(|d| serde_json::to_value(&d).ok())
        .and_then(|v| v["incidents"].as_array().cloned())
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i["device"]["bdf"].as_str() == Some(disk.dev.as_str()))
        .collect(),
    };
    c.push(analyze_check(kernel, &serial, out, &disk, sid, &live));
    c
}

/// The latest revision of each incident among last-gasp lines about `bdf`, shaped like an
/// incident (`kind`, `window`, `severity`).
fn latest_lines(lines: &[(f64, Value)], bdf: &str) -> Vec<Value> {
    let mut by_id: std::collections::BTreeMap<String, Value> = Default::default();
    for (_, v) in lines {
        if v["bdf"].as_str() == Some(bdf) {
            by_id.insert(v["id"].to_string(), v.clone());
        }
    }
    by_id.into_values().collect()
}

fn stimuli(serial: &str, d: &Disk) -> Vec<Check> {
    let has = |needles: &[&str]| {
        serial
            .lines()
            .any(|l| needles.iter().all(|n| l.contains(n)))
    };
    vec![
        Check::new(
            "VT-d on, strict invalidation, IRQ remapping",
            has(&["DMAR: IOMMU enabled"])
                && has(&["TLB invalidation policy: strict"])
                && has(&["Enabled IRQ remapping"]),
            "console",
        ),
        Check::new(
            format!("surprise disk {} ATS enabled", d.dev),
            d.ats_ctl.is_some_and(|c| c & 0x8000 != 0),
            format!("control {:?}, behind {}", d.fields.get("ats_ctl"), d.port),
        ),
        Check::new(
            format!("pciehp: card not present on {}", d.port),
            has(&[&d.port, "Card not present"]),
            "console",
        ),
    ]
}

/// 6.1 (the retry loop) and 6.18.15 (the endless abort walk): the kernel spins; itewatch must
/// have said so, critically, before the kernel did. `retries`: the kernel retries, reporting
/// the ITE again each time (6.1); else it reports it once and spins in the abort walk.
fn retries_forever(
    serial: &str,
    facts: &RunFacts,
    d: &Disk,
    sid: u16,
    ite_lines: usize,
    out: &Path,
    retries: bool,
) -> Vec<Check> {
    let mut c = Vec::new();
    let stage = |s: &str| facts.stage_s.iter().find(|(n, _)| *n == s).map(|(_, t)| *t);
    let hung = (stage("removal-hung").is_some() || facts.verdict_hung)
        && stage("surprise-removed").is_none();
    c.push(if retries {
        Check::new(
            "kernel: removal never completes, ITE retried (no 80a9b50c0b9e)",
            hung && ite_lines >= 100,
            format!("{ite_lines} ITE lines for SID {sid:x}"),
        )
    } else {
        Check::new(
            "kernel: removal never completes, one ITE report, then the abort walk spins (no fe89277c9ceb)",
            hung && (1..10).contains(&ite_lines),
            format!("{ite_lines} ITE lines for SID {sid:x} (a retry loop would print thousands)"),
        )
    });
    // The stall report, and qi_submit_sync in the stalled CPU's backtrace.
    let lines: Vec<&str> = serial.lines().collect();
    let stall_at = lines.iter().position(|l| l.contains(STALL_LINE));
    let in_trace = stall_at.is_some_and(|i| {
        lines[i..lines.len().min(i + 400)]
            .iter()
            .any(|l| l.contains("qi_submit_sync"))
    });
    let stall_ns = stall_at.and_then(|i| printk_ns(lines[i]));
    c.push(Check::new(
        "kernel: RCU stall report, qi_submit_sync in the backtrace",
        stall_at.is_some() && in_trace,
        format!(
            "stall line at guest {:?} ns, host {:.1} s: {}",
            stall_ns,
            facts.stall_s.unwrap_or(-1.0),
            stall_at.map_or("none", |i| lines[i].trim())
        ),
    ));
    // The agent's last-gasp lines on ttyS1: a critical hung invalidation for the removed
    // device, attributed to its window, before the stall report reached the host.
    let bdf = d.dev.as_str();
    let lg = last_gasp(facts);
    let critical = lg.iter().find(|(_, v)| {
        v["kind"] == "hung-invalidation"
            && v["severity"] == "critical"
            && v["sid"].as_u64() == Some(u64::from(sid))
            && v["bdf"].as_str() == Some(bdf)
    });
    let windowed = critical.is_some_and(|(_, v)| {
        matches!(v["window"].as_str(), Some("W1" | "W2"))
            || lg.iter().any(|(_, w)| {
                matches!(w["window"].as_str(), Some("W1" | "W2")) && w["bdf"].as_str() == Some(bdf)
            })
    });
    let before = match (critical, facts.stall_s) {
        (Some((t, _)), Some(stall)) => *t < stall,
        (Some(_), None) => true,
        _ => false,
    };
    let guest_before = match (critical, stall_ns) {
        (Some((_, v)), Some(s)) => v["t_ns"].as_u64().is_some_and(|t| t < s),
        _ => false,
    };
    let detect_ms = critical.and_then(|(_, v)| {
        let start = v["start_ns"].as_u64()?;
        let t = v["t_ns"].as_u64()?;
        Some((
            t.saturating_sub(start) as f64 / 1e6,
            v["caller"].clone(),
            v["task"].clone(),
        ))
    });
    c.push(Check::new(
        "agent last-gasp (ttyS1): critical hung-invalidation, removed device, its window",
        critical.is_some() && windowed,
        format!(
            "{} lines; critical {:?}",
            lg.len(),
            critical.map(|(t, v)| format!(
                "at host {t:.2} s: {} {} {} sid {} window {} caller {}",
                v["id"], v["kind"], v["severity"], v["sid"], v["window"], v["caller"]
            ))
        ),
    ));
    c.push(Check::new(
        "agent last-gasp: on the host before the kernel's stall report",
        before && guest_before,
        format!(
            "host: line {:.2} s, stall {:.2} s; guest: t_ns before the stall's timestamp {guest_before}; \
             submission start -> line {:?} ms (threshold 1000 ms)",
            critical.map_or(-1.0, |(t, _)| *t),
            facts.stall_s.unwrap_or(-1.0),
            detect_ms.as_ref().map(|d| d.0)
        ),
    ));
    // Or, while the log floods (the time-out raised at once), withheld by design and said.
    let agent_log = fs::read_to_string(out.join("agent.err")).unwrap_or_default();
    let withheld = agent_log
        .lines()
        .find(|l| l.contains("kept off /dev/kmsg: the kernel log floods"));
    c.push(Check::new(
        "agent: critical line also in the kernel log (kmsg -> console), or withheld from a flooding log and said",
        facts
            .kmsg_s
            .is_some_and(|k| facts.stall_s.is_none_or(|s| k < s))
            || (facts.kmsg_s.is_none() && withheld.is_some()),
        match (facts.kmsg_s, withheld) {
            (Some(k), _) => format!("first itewatch kmsg line at host {k:.2} s"),
            (None, Some(w)) => w.chars().take(120).collect(),
            (None, None) => "no kmsg line on the console, and agent.err does not say why".into(),
        },
    ));
    let refused = agent_log.lines().find(|l| l.contains("not stopping"));
    c.push(Check::new(
        "agent: refuses SIGTERM while the submission spins (no detach)",
        refused.is_some(),
        refused
            .unwrap_or("no refusal in agent.err")
            .chars()
            .take(120)
            .collect::<String>(),
    ));
    c.push(trace_during_hang(out, sid));
    let mem = fs::read_to_string(out.join("guest.log"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("hung: agent memory ").map(str::to_string));
    c.push(Check::new(
        "agent: memory and output while the storm runs (reported)",
        true,
        format!(
            "{}; {} last-gasp lines; {} stdout lines",
            mem.unwrap_or_else(|| "memory not reported".into()),
            facts.last_gasp.len(),
            fs::read_to_string(out.join("agent.out"))
                .unwrap_or_default()
                .lines()
                .count()
        ),
    ));
    // The spool, as the guest saved it from CPU 1 after the stall.
    let spooled = spooled_incidents(out);
    c.push(Check::new(
        "agent spool (saved from the live CPU): the critical incident",
        spooled.iter().any(|i| {
            i["kind"] == "hung-invalidation"
                && i["severity"] == "critical"
                && i["device"]["bdf"].as_str() == Some(bdf)
        }),
        format!("{} spooled documents", spooled.len()),
    ));
    c
}

/// What the recorder wrote while the kernel retried (the trace as saved from CPU 1, without its
/// end frame): the events the verdict rests on — the stuck submission to the removed SID, the
/// surprise unconfigure and the disconnect walk — are there, and the log lines the storm
/// brought, with what was lost, are counted.
fn trace_during_hang(out: &Path, sid: u16) -> Check {
    use itewatch::event::Payload;
    let name = "record (during the hang): the stuck submission and the hot-plug events, losses";
    let t = match crate::assert::read_trace(&crate::assert::trace_path(out)) {
        Ok(t) => t,
        Err(e) => return Check::fail(name, e),
    };
    let mut open = std::collections::BTreeMap::new();
    let (mut unconfigure, mut walk, mut logs) = (false, false, 0u64);
    for ev in &t.events {
        match &ev.payload {
            Payload::Submit(s) => {
                open.insert(ev.meta.tid, s.dev_tlb_sids().any(|x| x.0 == sid));
            }
            Payload::SubmitReturn(_) => {
                open.remove(&ev.meta.tid);
            }
            Payload::Unconfigure(s) if s.presence == Some(false) => unconfigure = true,
            Payload::DisconnectWalk(_) => walk = true,
            Payload::KernelLog(_) => logs += 1,
            _ => {}
        }
    }
    let stuck = open.values().any(|has| *has);
    let (full, missed, bad) = t.lost.iter().fold((0, 0, 0), |a, l| {
        (a.0 + l.ringbuf_full, a.1 + l.missed, a.2 + l.undecodable)
    });
    let span = t
        .events
        .iter()
        .map(|e| e.meta.ts.0)
        .fold((u64::MAX, 0), |a, t| (a.0.min(t), a.1.max(t)));
    Check::new(
        name,
        stuck && unconfigure && walk,
        format!(
            "stuck submission to SID {sid:x} {stuck}, surprise unconfigure {unconfigure}, \
             disconnect walk {walk}; {} events over {:.1} s, {logs} kernel log lines; \
             lost: ring buffer full {full}, missed {missed}, undecodable {bad}{}",
            t.events.len(),
            span.1.saturating_sub(span.0) as f64 / 1e9,
            t.error
                .as_deref()
                .map(|e| format!("; trace ends: {e}"))
                .unwrap_or_default()
        ),
    )
}

fn spooled_incidents(out: &Path) -> Vec<Value> {
    let mut v = Vec::new();
    if let Ok(rd) = fs::read_dir(out.join("spool/incidents")) {
        for e in rd.flatten() {
            if let Some(doc) = fs::read_to_string(e.path())
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                if let Some(list) = doc["incidents"].as_array() {
                    v.extend(list.iter().cloned());
                }
            }
        }
    }
    v
}

/// 6.12: the kernel gave up with -ETIMEDOUT; every sink must say ite-reported, aborted, on the
/// removed device, with the fix present.
fn aborts(out: &Path, facts: &RunFacts, d: &Disk, sid: u16) -> Vec<Check> {
    let mut c = Vec::new();
    let bdf = d.dev.as_str();
    // Straight from the trace's raw records: returns of -110 from submissions carrying the
    // removed device's SID.
    let timed_out = match crate::assert::read_trace(&crate::assert::trace_path(out)) {
        Ok(t) => {
            let mut open = std::collections::BTreeMap::new();
            let mut n = 0;
            for ev in &t.events {
                match &ev.payload {
                    itewatch::event::Payload::Submit(s) => {
                        let has = s.dev_tlb_sids().any(|x| x.0 == sid);
                        open.insert(ev.meta.tid, has);
                    }
                    itewatch::event::Payload::SubmitReturn(r)
                        if open.remove(&ev.meta.tid) == Some(true) && r.ret == -110 =>
                    {
                        n += 1;
                    }
                    _ => {}
                }
            }
            Ok(n)
        }
        Err(e) => Err(e),
    };
    c.push(Check::new(
        format!("trace: qi_submit_sync returned -ETIMEDOUT for SID {sid:x}"),
        timed_out.as_ref().is_ok_and(|n| *n >= 1),
        format!("{timed_out:?} submissions"),
    ));
    let is_ite = |i: &Value| {
        i["kind"] == "ite-reported"
            && i["device"]["bdf"].as_str() == Some(bdf)
            && i["device"]["sid"].as_u64() == Some(u64::from(sid))
    };
    let report = itewatch::document::from_trace_file(
        &crate::assert::trace_path(out),
        itewatch::correlate::Config::default(),
    )
    .ok()
    .and_then(|d| serde_json::to_value(&d).ok())
    .unwrap_or_default();
    let recorded: Vec<Value> = report["incidents"].as_array().cloned().unwrap_or_default();
    let ite = recorded.iter().find(|i| is_ite(i));
    let aborted = ite.is_some_and(|i| {
        i["outcome"]["state"] == "aborted" || i["outcome"].to_string().contains("aborted")
    });
    let fixed = ite.is_some_and(|i| {
        i["fixes"].as_array().is_some_and(|f| {
            f.iter().any(|x| {
                x["commit"]
                    .as_str()
                    .is_some_and(|c| c.starts_with("80a9b50c0b9e"))
                    && x.to_string().contains("present")
            })
        })
    });
    c.push(Check::new(
        "record: ite-reported on the removed device, aborted, 80a9b50c0b9e present",
        ite.is_some() && aborted && fixed,
        format!(
            "incidents {:?}; ite outcome {} fixes {}",
            recorded
                .iter()
                .map(|i| i["kind"].clone())
                .collect::<Vec<_>>(),
            ite.map_or(Value::Null, |i| i["outcome"].clone()),
            ite.map_or(Value::Null, |i| i["fixes"].clone())
        ),
    ));
    let agent_lines: Vec<Value> = fs::read_to_string(out.join("agent.out"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let spooled = spooled_incidents(out);
    let aborted_ite = |i: &Value| is_ite(i) && i["outcome"]["state"] == "aborted";
    c.push(Check::new(
        "agent: ite-reported on the removed device, aborted (stdout and spool)",
        agent_lines.iter().any(aborted_ite) && spooled.iter().any(aborted_ite),
        format!(
            "{} stdout lines, {} spooled",
            agent_lines.len(),
            spooled.len()
        ),
    ));
    let lg = last_gasp(facts);
    c.push(Check::new(
        "agent last-gasp (ttyS1): ite-reported on the removed device, aborted",
        lg.iter().any(|(_, v)| {
            v["kind"] == "ite-reported"
                && v["bdf"].as_str() == Some(bdf)
                && v["outcome"]["state"] == "aborted"
        }),
        format!("{} lines", lg.len()),
    ));
    let live = fs::read_to_string(out.join("live.txt")).unwrap_or_default();
    c.push(Check::new(
        "live view: ite-reported on the removed device, aborted",
        live.lines()
            .any(|l| l.contains("ite-reported") && l.contains(bdf) && l.contains("aborted")),
        live.lines()
            .filter(|l| l.contains("ite-reported"))
            .collect::<Vec<_>>()
            .join(" | "),
    ));
    c
}

/// `itewatch analyze` of the guest's log (the console for a kernel that hung: its dmesg is
/// only the tail of the storm; the saved dmesg otherwise) against what the live tool said
/// (`live`: the incidents the live sinks reported for the removed device). The same verdict:
/// analyze's window verdicts (kind and window) are among the live tool's, both report the
/// ITE, and the worst severities agree. The live tool also splits a stuck submission out as
/// `hung-invalidation`; analyze folds it into the window verdict (docs/vm-tests.md).
fn analyze_check(
    kernel: &Kernel,
    serial: &str,
    out: &Path,
    d: &Disk,
    sid: u16,
    live: &[Value],
) -> Check {
    let (what, text) = match kernel.pinned.ite {
        IteResponse::RetriesForever | IteResponse::LocksUpInAbortWalk => {
            ("console", serial.to_string())
        }
        IteResponse::AbortsTimedOut => (
            "dmesg",
            fs::read_to_string(out.join("dmesg.txt")).unwrap_or_default(),
        ),
    };
    let a = itewatch::analyze::analyze_bytes(text.as_bytes(), Default::default());
    let analyzed: Vec<Value> = a
        .incidents
        .iter()
        .filter_map(|i| serde_json::to_value(i).ok())
        .filter(|i| {
            i["device"]["sid"].as_u64() == Some(u64::from(sid))
                || i["device"]["bdf"]
                    .as_str()
                    .is_some_and(|b| b.ends_with(&d.dev[5..]))
        })
        .collect();
    let verdicts = |list: &[Value]| -> std::collections::BTreeSet<(String, String)> {
        list.iter()
            .filter_map(|i| {
                let kind = i["kind"].as_str()?.to_string();
                let window = match kind.as_str() {
                    "ite-reported" | "hung-invalidation" => String::new(),
                    _ => i["window"].as_str().unwrap_or("").to_string(),
                };
                Some((kind, window))
            })
            .collect()
    };
    let rank = |s: &str| match s {
        "critical" => 3,
        "warning" => 2,
        "latent" => 1,
        _ => 0,
    };
    let worst = |list: &[Value]| {
        list.iter()
            .filter_map(|i| i["severity"].as_str())
            .max_by_key(|s| rank(s))
            .unwrap_or("none")
            .to_string()
    };
    let (av, lv) = (verdicts(&analyzed), verdicts(live));
    let ite = |v: &std::collections::BTreeSet<(String, String)>| {
        v.iter().any(|(k, _)| k == "ite-reported")
    };
    Check::new(
        format!("analyze ({what}): the live tool's verdict on the removed device"),
        ite(&av) && ite(&lv) && av.is_subset(&lv) && worst(&analyzed) == worst(live),
        format!(
            "analyze {av:?} worst {}; live {lv:?} worst {}",
            worst(&analyzed),
            worst(live)
        ),
    )
}

/// Whether a console line belongs to the kernel's ITE report block (qi_dump_fault and the
/// "(ITE) cleared" line): what the retry loop repeats thousands of times.
fn is_ite_block(line: &str) -> bool {
    [
        "DMAR: VT-d detected Invalidation Time-out Error",
        "DMAR: QI HEAD:",
        "DMAR: QI PRIOR:",
        "Invalidation Time-out Error (ITE) cleared",
    ]
    .iter()
    .any(|n| line.contains(n))
}

/// A log trimmed for the test corpus: every line but the ITE report blocks past the first
/// `keep` of them (the storm of a retrying kernel: thousands of identical blocks).
pub fn trim_storm(text: &str, keep: usize) -> String {
    let mut n = 0;
    let mut dropped = 0;
    let mut out = String::new();
    for line in text.lines() {
        if is_ite_block(line) {
            n += 1;
            if n > keep {
                dropped += 1;
                continue;
            }
        }
        out.push_str(line.trim_end_matches('\r'));
        out.push('\n');
    }
    if dropped > 0 {
        out.push_str(&format!(
            "[itewatch vm-test: {dropped} further ITE report lines of the retry loop trimmed]\n"
        ));
    }
    out
}

/// `--save-traces` for `ite-surprise`: the kernel log `analyze` is checked on (the console of
/// a kernel that hung, trimmed; the dmesg of one that gave up) into the analyzer's corpus.
pub fn save_logs(root: &Path, kernel: &Kernel, dir: &Path) -> Result<()> {
    let logs = root.join("itewatch/tests/data/logs");
    let (src, name) = match kernel.pinned.ite {
        IteResponse::RetriesForever | IteResponse::LocksUpInAbortWalk => (
            dir.join("serial.log"),
            format!("vm-ite-{}-console.serial", kernel.pinned.name),
        ),
        IteResponse::AbortsTimedOut => (
            dir.join("out/dmesg.txt"),
            format!("vm-ite-{}.dmesg", kernel.pinned.name),
        ),
    };
    let text = String::from_utf8_lossy(&fs::read(&src)?).into_owned();
    fs::write(logs.join(&name), trim_storm(&text, 400))?;
    eprintln!("vm-test: saved {name} (check its manifest.json entry)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sids_and_printk_times() {
        assert_eq!(sid_of("0000:02:00.0"), Some(0x200));
        assert_eq!(sid_of("0000:af:00.3"), Some(0xaf03));
        assert_eq!(printk_ns("[   38.123456] rcu: INFO"), Some(38_123_456_000));
        assert_eq!(printk_ns("no"), None);
    }
}
