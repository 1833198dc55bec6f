//! The checks of one guest run: first the stimuli (did the VM really have VT-d with
//! device-IOTLB, ATS on the disks, pciehp on both slots, a safe and a surprise removal), read
//! from the guest's dmesg and its config-space dump; then what itewatch recorded, read from the
//! trace with `itewatch::trace::TraceReader`. Only what the real kernel produced is checked.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use itewatch::event::{Bdf, Event, HpWhat, KTime, LostRecord, Payload, Record};
use itewatch::trace::{TraceEnd, TraceHeader, TraceReader};

use crate::kernels::Kernel;

/// One line of the verdict table.
#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl Check {
    pub fn new(name: impl Into<String>, ok: bool, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            ok,
            detail: detail.into(),
        }
    }
    pub fn fail(name: impl Into<String>, detail: impl Into<String>) -> Check {
        Check::new(name, false, detail)
    }
}

/// What the host observed while driving the guest.
#[derive(Debug, Default)]
pub struct RunFacts {
    /// Host-side seconds since QEMU started at which each stage was seen.
    pub stage_s: Vec<(&'static str, f64)>,
    /// The guest said the surprise removal never completed (`ITEWATCH-VM hung: ...`): the
    /// same fact as the `removal-hung` stage, whose own line can drown in an ITE flood on the
    /// console (seen once on 6.1: verdict present, stage line absent).
    pub verdict_hung: bool,
    pub safe_deleted: bool,
    pub surprise_deleted: bool,
    /// QEMU start to exit.
    pub guest_s: f64,
    /// ite-surprise: the agent's last-gasp lines (ttyS1) with the host time each arrived.
    pub last_gasp: Vec<(f64, String)>,
    /// ite-surprise: host times of the first ITE line, the RCU stall report and the first
    /// itewatch kmsg line on the console; ITE lines seen; the console hit its cap.
    pub first_ite_s: Option<f64>,
    pub stall_s: Option<f64>,
    pub kmsg_s: Option<f64>,
    pub ite_lines: usize,
    pub serial_capped: bool,
}

/// One hot-plug disk as the guest saw it before the removals (`/out/topology.txt`).
#[derive(Debug, Clone, Default)]
pub struct Disk {
    pub role: String,
    pub slot: String,
    pub dev: String,
    pub port: String,
    pub ats_ctl: Option<u16>,
    pub fields: BTreeMap<String, String>,
}

pub fn parse_topology(text: &str) -> Vec<Disk> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let fields: BTreeMap<String, String> = l
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let get = |k: &str| fields.get(k).cloned().unwrap_or_default();
            Disk {
                role: get("role"),
                slot: get("slot"),
                dev: get("dev"),
                port: get("port"),
                ats_ctl: fields
                    .get("ats_ctl")
                    .and_then(|v| v.strip_prefix("0x"))
                    .and_then(|v| u16::from_str_radix(v, 16).ok()),
                fields,
            }
        })
        .collect()
}

fn lines_with<'a>(dmesg: &'a str, all: &[&str]) -> Vec<&'a str> {
    dmesg
        .lines()
        .filter(|l| all.iter().all(|n| l.contains(n)))
        .collect()
}

/// Checks of the stimuli: true of the guest whether or not anything recorded.
pub fn check_stimuli(dmesg: &str, disks: &[Disk], facts: &RunFacts) -> Vec<Check> {
    let mut out = Vec::new();
    let dmar = lines_with(dmesg, &["DMAR: IOMMU enabled"]);
    let strict = lines_with(dmesg, &["TLB invalidation policy: strict"]);
    let ir = lines_with(dmesg, &["Enabled IRQ remapping"]);
    out.push(Check::new(
        "VT-d on, strict invalidation, IRQ remapping",
        !dmar.is_empty() && !strict.is_empty() && !ir.is_empty(),
        format!(
            "dmesg: IOMMU enabled {}, strict {}, IRQ remapping {}",
            !dmar.is_empty(),
            !strict.is_empty(),
            !ir.is_empty()
        ),
    ));
    for role in ["safe", "surprise"] {
        let Some(d) = disks.iter().find(|d| d.role == role) else {
            out.push(Check::fail(
                format!("{role} disk found behind a hot-plug slot"),
                "not in topology.txt",
            ));
            continue;
        };
        let ats_on = d.ats_ctl.is_some_and(|c| c & 0x8000 != 0);
        out.push(Check::new(
            format!("{role} disk {} ATS enabled", d.dev),
            ats_on,
            format!(
                "ATS cap at {}, control {} (behind {})",
                d.fields.get("ats_cap").map_or("?", String::as_str),
                d.fields.get("ats_ctl").map_or("?", String::as_str),
                d.port
            ),
        ));
        let slot = lines_with(dmesg, &[&d.port, "pciehp: Slot #"]);
        out.push(Check::new(
            format!("pciehp drives slot {} ({})", d.slot, d.port),
            !slot.is_empty(),
            slot.first()
                .map_or("no pciehp line for the port".into(), |l| {
                    l.split("pciehp: ").nth(1).unwrap_or(l).to_string()
                }),
        ));
    }
    if let Some(d) = disks.iter().find(|d| d.role == "safe") {
        // 6.1: "Attention button pressed" + "Powering off due to button press";
        // 6.12: "Button press: will power off in 5 sec".
        let mut pressed = lines_with(dmesg, &[&d.port, "Attention button pressed"]);
        pressed.extend(lines_with(
            dmesg,
            &[&d.port, "Button press: will power off"],
        ));
        let mut off = lines_with(dmesg, &[&d.port, "Powering off due to button press"]);
        off.extend(lines_with(dmesg, &[&d.port, "will power off in"]));
        out.push(Check::new(
            format!("safe removal of {} (attention button)", d.dev),
            !pressed.is_empty() && !off.is_empty() && facts.safe_deleted,
            format!(
                "button pressed {}, powering off {}, QMP DEVICE_DELETED {}",
                !pressed.is_empty(),
                !off.is_empty(),
                facts.safe_deleted
            ),
        ));
    }
    if let Some(d) = disks.iter().find(|d| d.role == "surprise") {
        let gone = lines_with(dmesg, &[&d.port, "Card not present"]);
        let link = lines_with(dmesg, &[&d.port, "Link Down"]);
        out.push(Check::new(
            format!("surprise removal of {} (card not present)", d.dev),
            !gone.is_empty() && facts.surprise_deleted,
            format!(
                "card not present {}, link down {}, QMP DEVICE_DELETED {}",
                !gone.is_empty(),
                !link.is_empty(),
                facts.surprise_deleted
            ),
        ));
    }
    out
}

/// The memory of `record`, `agent` and `live` once attached and ready, as the guest read it
/// from /proc (guest.log `memory: <who> VmHWM: .. kB VmRSS: .. kB RssAnon: .. kB RssFile: .. kB`).
/// Fails when a process was not reported (it had exited, or the guest did not look).
pub fn memory_check(out: &Path) -> Check {
    let log = fs::read_to_string(out.join("guest.log")).unwrap_or_default();
    let mut seen = Vec::new();
    let mut parts = Vec::new();
    for l in log.lines() {
        let Some(rest) = l.strip_prefix("memory: ") else {
            continue;
        };
        let mut w = rest.split_whitespace();
        let who = w.next().unwrap_or("?").to_string();
        let words: Vec<&str> = w.collect();
        let mb = |key: &str| {
            words
                .iter()
                .position(|x| *x == key)
                .and_then(|i| words.get(i + 1))
                .and_then(|v| v.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
        };
        if let (Some(hwm), Some(rss)) = (mb("VmHWM:"), mb("VmRSS:")) {
            parts.push(format!(
                "{who} {rss:.1} MiB (peak {hwm:.1}; anon {:.1}, file {:.1})",
                mb("RssAnon:").unwrap_or(-1.0),
                mb("RssFile:").unwrap_or(-1.0)
            ));
            seen.push(who);
        }
    }
    let all = ["record", "agent", "live"]
        .iter()
        .all(|w| seen.iter().any(|s| s == w));
    Check::new(
        "itewatch memory once ready (resident, peak)",
        all,
        if parts.is_empty() {
            "no `memory:` lines in guest.log".to_string()
        } else {
            parts.join("; ")
        },
    )
}

pub fn check_run(kernel: &Kernel, out: &Path, facts: &RunFacts, recorded: bool) -> Vec<Check> {
    let mut checks = Vec::new();
    let dmesg = fs::read_to_string(out.join("dmesg.txt")).unwrap_or_default();
    checks.push(Check::new(
        "guest dmesg captured",
        dmesg.lines().count() > 100 && dmesg.contains(&kernel.release),
        format!("{} lines", dmesg.lines().count()),
    ));
    let disks = parse_topology(&fs::read_to_string(out.join("topology.txt")).unwrap_or_default());
    checks.extend(check_stimuli(&dmesg, &disks, facts));
    let stages: Vec<String> = facts
        .stage_s
        .iter()
        .map(|(s, t)| format!("{s} {t:.1}"))
        .collect();
    checks.push(Check::new(
        "timeline (s since QEMU start)",
        true,
        format!("{}; exit {:.1}", stages.join(", "), facts.guest_s),
    ));
    if recorded {
        checks.push(memory_check(out));
        checks.push(doctor_check(kernel, out, &disks));
        let header_fixes = read_trace(&trace_path(out)).ok().map(|t| {
            t.header
                .kernel_fixes
                .iter()
                .map(|f| (f.commit.clone(), f.status.clone()))
                .collect()
        });
        checks.push(crate::kcode_check::kernel_code_check(
            kernel.pinned.name,
            out,
            header_fixes,
        ));
        checks.push(crate::kcode_check::preflight_check(
            kernel.pinned.name,
            out,
            disks
                .iter()
                .find(|d| d.role == "surprise")
                .map(|d| d.dev.as_str()),
        ));
        let surprise_dev = disks
            .iter()
            .find(|d| d.role == "surprise")
            .map(|d| d.dev.as_str());
        checks.push(crate::preflight_vm::switch_check(out));
        checks.push(crate::preflight_vm::no_power_controller_check(out, &dmesg));
        checks.push(crate::preflight_vm::cannot_tell_check(out, surprise_dev));
        checks.extend(trace_checks(kernel, out, &disks));
        checks.extend(sink_checks(out, &disks));
    }
    checks
}

/// Incident kinds (`"flush-to-gone-device"`, ...) of a JSON array of incidents.
fn kinds(incidents: &[serde_json::Value]) -> std::collections::BTreeSet<String> {
    incidents
        .iter()
        .filter_map(|i| i.get("kind")?.as_str().map(str::to_string))
        .collect()
}

/// Sums of the samples of one metric family in an OpenMetrics exposition whose labels contain
/// every `label="value"` pair of `with`.
fn metric_sum(text: &str, family: &str, with: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (name_labels, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let (name, labels) = match name_labels.split_once('{') {
            Some((n, l)) => (n, l),
            None => (name_labels, ""),
        };
        if name != family {
            continue;
        }
        if with
            .iter()
            .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"")))
        {
            if let Ok(v) = value.parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
    }
    sum
}

/// The other live sinks that ran beside the recorder on the same kernel events: the agent
/// (metrics, HTTP incidents, spool files) and the headless live view (its summary). They share
/// the recorder's reader, so they must see what the recorder saw: the same incident kinds as
/// the report of the recorded trace, device-TLB traffic, both removals, no loss.
pub fn sink_checks(out: &Path, disks: &[Disk]) -> Vec<Check> {
    let mut c = Vec::new();
    let reference = match itewatch::document::from_trace_file(
        &trace_path(out),
        itewatch::correlate::Config::default(),
    ) {
        Ok(doc) => serde_json::to_value(&doc)
            .ok()
            .and_then(|v| v.get("incidents").and_then(|i| i.as_array()).cloned())
            .map(|v| kinds(&v))
            .unwrap_or_default(),
        Err(e) => return vec![Check::fail("report of the recorded trace", e.to_string())],
    };
    let want = format!("{reference:?}");
    c.push(expected_w2(out, disks));

    // The agent.
    let metrics = fs::read_to_string(out.join("metrics.txt")).unwrap_or_default();
    let m = |family: &str, with: &[(&str, &str)]| metric_sum(&metrics, family, with);
    let subs = m("itewatch_submissions_total", &[]).unwrap_or(0.0);
    let devtlb = m("itewatch_devtlb_invalidations_total", &[]).unwrap_or(0.0);
    let lost = m("itewatch_lost_events_total", &[]).unwrap_or(0.0);
    let attached = m("itewatch_probe_attached", &[("probe", "qi_submit_sync")]);
    // Least privilege on a real kernel: after attaching, the agent keeps only CAP_BPF (6.1
    // refuses every bpf(2) command without it), and all its numbers below were read after
    // that drop.
    let agent_log = fs::read_to_string(out.join("agent.err")).unwrap_or_default();
    let kept = agent_log.lines().find_map(|l| {
        l.split_once("capabilities kept: ")
            .map(|(_, k)| k.trim().to_string())
    });
    c.push(Check::new(
        "agent: capabilities dropped to CAP_BPF after attaching",
        kept.as_deref() == Some("CAP_BPF"),
        format!("kept {kept:?}"),
    ));
    c.push(Check::new(
        "agent: live metrics of the DMA traffic",
        subs > 0.0 && devtlb > 0.0 && lost == 0.0 && attached == Some(1.0),
        format!(
            "submissions {subs}, device-TLB invalidations {devtlb}, lost {lost}, \
             qi_submit_sync attached {attached:?}"
        ),
    ));
    for d in disks {
        let kind = match d.role.as_str() {
            "safe" => "safe-removal",
            _ => "surprise-removal",
        };
        let slot = m(
            "itewatch_hotplug_events_total",
            &[("slot", &d.port), ("kind", kind)],
        );
        c.push(Check::new(
            format!("agent: {kind} of slot {} counted", d.port),
            slot.is_some_and(|v| v >= 1.0),
            format!(
                "itewatch_hotplug_events_total{{slot={},kind={kind}}} = {slot:?}",
                d.port
            ),
        ));
    }
    let served: Vec<serde_json::Value> = fs::read_to_string(out.join("incidents.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("incidents").and_then(|i| i.as_array()).cloned())
        .unwrap_or_default();
    let mut spooled = Vec::new();
    let mut unreadable = Vec::new();
    if let Ok(rd) = fs::read_dir(out.join("spool/incidents")) {
        for e in rd.flatten() {
            // Each spool file is a report document of one incident, with the guest's kernel
            // and the probes as attached.
            let doc = fs::read_to_string(e.path())
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .filter(|v| {
                    v["incidents"].as_array().map(Vec::len) == Some(1)
                        && v["host"]["kernel_release"]
                            .as_str()
                            .is_some_and(|k| !k.is_empty())
                        && v["probes"].as_array().is_some_and(|p| !p.is_empty())
                });
            match doc {
                Some(v) => spooled.push(v["incidents"][0].clone()),
                None => unreadable.push(e.file_name().to_string_lossy().into_owned()),
            }
        }
    }
    c.push(Check::new(
        "agent: incidents served and spooled as the recorded trace's",
        kinds(&served) == reference
            && kinds(&spooled) == reference
            && spooled.len() == served.len()
            && unreadable.is_empty(),
        format!(
            "recorded {want}; /incidents {} {:?}; spool {} {:?}{}",
            served.len(),
            kinds(&served),
            spooled.len(),
            kinds(&spooled),
            if unreadable.is_empty() {
                String::new()
            } else {
                format!("; unreadable spool files {unreadable:?}")
            }
        ),
    ));

    // The headless live view.
    let text = fs::read_to_string(out.join("live.txt")).unwrap_or_default();
    let counts = text.lines().find_map(live_counts);
    let listed: std::collections::BTreeSet<String> = text
        .lines()
        .skip_while(|l| !l.starts_with("incidents ("))
        .filter_map(|l| {
            let l = l.trim_start();
            let rest = l.strip_prefix('[')?.split_once("] ")?.1;
            // "W2 flush-to-gone-device 0000:..." or "hung-invalidation ...".
            let mut words = rest.split_whitespace();
            let first = words.next()?;
            let kind = if first.len() == 2 && first.starts_with('W') {
                words.next()?
            } else {
                first
            };
            Some(kind.to_string())
        })
        .collect();
    c.push(Check::new(
        "live view: events, no loss, the recorded trace's incidents",
        counts.is_some_and(|(ev, subs, dev, lost, missed)| {
            ev > 0 && subs > 0 && dev > 0 && lost == 0 && missed == 0
        }) && listed == reference,
        format!(
            "(events, submissions, device-TLB, lost, missed) {counts:?}; incidents {listed:?}, \
             recorded {want}"
        ),
    ));
    c.push(tui_check(out, &reference));
    c
}

/// What the surprise removal must give, stated independently of the sinks compared with the
/// report below (which would agree if everything found nothing): the recorded trace's report
/// has a `flush-to-gone-device` on the surprise disk's BDF, window W2, whose submissions came
/// from the removal path as their kernel stacks show (the device-TLB flushes of virtio-blk's
/// teardown after the disconnect walk; both kernels, docs/vm-tests.md).
fn expected_w2(out: &Path, disks: &[Disk]) -> Check {
    let name = "report: W2 flush-to-gone-device on the surprise disk, caller from its stack";
    let Some(d) = disks.iter().find(|d| d.role == "surprise") else {
        return Check::fail(name, "no surprise disk in topology.txt");
    };
    let doc = match itewatch::document::from_trace_file(
        &trace_path(out),
        itewatch::correlate::Config::default(),
    ) {
        Ok(doc) => serde_json::to_value(&doc).unwrap_or_default(),
        Err(e) => return Check::fail(name, e.to_string()),
    };
    let incidents = doc["incidents"].as_array().cloned().unwrap_or_default();
    let hit = incidents.iter().find(|i| {
        i["kind"] == "flush-to-gone-device"
            && i["window"] == "W2"
            && i["device"]["bdf"].as_str() == Some(d.dev.as_str())
    });
    let callers: Vec<String> = hit
        .and_then(|i| i["submissions"].as_array())
        .map(|subs| {
            subs.iter()
                .filter_map(|s| s["caller"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    Check::new(
        name,
        hit.is_some()
            && !callers.is_empty()
            && callers
                .iter()
                .all(|c| c == "removal" || c == "driver-teardown"),
        format!(
            "{} incidents; on {}: {:?}",
            incidents.len(),
            d.dev,
            hit.map(|i| (i["severity"].clone(), callers.clone()))
        ),
    )
}

/// The interactive view on the guest's second serial port (a real tty): it drew its panels
/// with the probes attached, showed the recorded trace's incidents, and left the alternate
/// screen on SIGTERM with status 0.
fn tui_check(out: &Path, reference: &std::collections::BTreeSet<String>) -> Check {
    let name = "interactive view on a tty (ttyS1): panels, probes, incidents, restored";
    let Ok(bytes) = fs::read(out.join("tui.screen")) else {
        return Check::fail(name, "no tui.screen (QEMU's second serial port)");
    };
    let raw = String::from_utf8_lossy(&bytes);
    let screen = screen_words(&raw);
    let rc = fs::read_to_string(out.join("tui.rc")).unwrap_or_default();
    let stats: serde_json::Value = fs::read_to_string(out.join("tui-stats.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let frames = stats["frames"].as_u64().unwrap_or(0);
    let events = stats["events"].as_u64().unwrap_or(0);
    let entered = raw.contains("\x1b[?1049h");
    let left = raw.rfind("\x1b[?1049l") > raw.rfind("\x1b[?1049h");
    let panels = screen.contains("In-flight invalidations") && screen.contains("Incidents (");
    let probes = screen.contains(" attached");
    let shown: Vec<&String> = reference
        .iter()
        .filter(|k| screen.contains(k.as_str()))
        .collect();
    Check::new(
        name,
        rc.trim() == "0"
            && entered
            && left
            && panels
            && probes
            && frames >= 2
            && events > 0
            && shown.len() == reference.len(),
        format!(
            "exit {:?}; {} bytes; alternate screen entered {entered}, left {left}; panels \
             {panels}; probes line {probes}; {frames} frames, {events} events; incidents \
             shown {shown:?} of {reference:?}",
            rc.trim(),
            bytes.len()
        ),
    )
}

/// The text a terminal's byte stream draws, roughly: every control sequence (cursor moves
/// over the blank cells ratatui skips, colours) becomes a space, and runs of spaces one.
fn screen_words(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            out.push(' ');
        } else {
            out.push(ch);
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// "N events, M submissions (K device-TLB descriptors), lost L, missed X" of the live summary.
fn live_counts(line: &str) -> Option<(u64, u64, u64, u64, u64)> {
    let nums: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter(|w| !w.is_empty())
        .filter_map(|w| w.parse().ok())
        .collect();
    (line.contains(" events, ") && line.contains("device-TLB") && nums.len() == 5)
        .then(|| (nums[0], nums[1], nums[2], nums[3], nums[4]))
}

/// Probes that must be attached (or have fallen back) on every pinned kernel, beyond the
/// plan's own required set: the removal sequence needs them.
const EXPECTED_PROBES: &[&str] = &[
    "qi_submit_sync",
    "qi_submit_sync:return",
    "qi_flush_dev_iotlb",
    "pciehp_ist",
    "pciehp_ist:return",
    "pciehp_unconfigure_device",
    "pci_walk_bus",
    "pci_stop_and_remove_bus_device",
    "iommu_release_device",
    "printk:console",
];

/// Kernels of the matrix whose source has the `pci:pci_hp_event` tracepoint
/// (include/trace/events/pci.h, fired by pciehp_ctrl.c): Debian 7.3.4 yes, 6.18.15 no.
const HAS_HP_TRACEPOINT: &[&str] = &["7.3"];

fn same_bdf(a: Bdf, b: Bdf) -> bool {
    a.bus == b.bus
        && a.devfn == b.devfn
        && match (a.segment, b.segment) {
            (Some(x), Some(y)) => x == y,
            _ => true,
        }
}

/// Everything read from one trace.
pub struct TraceData {
    pub header: TraceHeader,
    pub end: Option<TraceEnd>,
    pub events: Vec<Event>,
    pub lost: Vec<LostRecord>,
    pub stacks: BTreeMap<u32, Vec<String>>,
    pub census: StackCensus,
    pub error: Option<String>,
}

/// The submissions' stacks as a trace reader sees them (each id as last recorded before the
/// event).
#[derive(Default, Debug)]
pub struct StackCensus {
    pub records: u64,
    pub dev_tlb: u64,
    pub dev_tlb_with_stack: u64,
    /// First frame in kernel code, not the tracer's: not a `[bpf]` program or trampoline, not a
    /// bare address (`qi_submit_sync+0x5` on 6.1-6.18; on 7.3 the trampoline's stack starts at
    /// its caller, `qi_batch_flush_descs`).
    pub starts_in_submit: u64,
    /// A frame saying the stack is unknown or unreadable.
    pub unknown: u64,
    /// Submissions without a device-TLB descriptor that carry a stack (the probe takes none).
    pub other_with_stack: u64,
}

/// The recorder's trace in the guest's `/out`: `trace.itw` once `record` finished; while it
/// still ran (the guest saved `/out` during a hang) the file it was writing, which `record`
/// names `trace.itw.<pid>-<n>.partial` until it renames it (itewatch::output).
pub fn trace_path(out: &Path) -> PathBuf {
    let done = out.join("trace.itw");
    if done.exists() {
        return done;
    }
    let mut partial: Vec<PathBuf> = fs::read_dir(out)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("trace.itw.") && n.ends_with(".partial"))
                })
                .collect()
        })
        .unwrap_or_default();
    partial.sort();
    partial.pop().unwrap_or(done)
}

pub fn read_trace(path: &Path) -> Result<TraceData, String> {
    let mut r = TraceReader::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut t = TraceData {
        header: r.header().clone(),
        end: None,
        events: Vec::new(),
        lost: Vec::new(),
        stacks: BTreeMap::new(),
        census: StackCensus::default(),
        error: None,
    };
    for rec in r.by_ref() {
        match rec {
            Ok(Record::Event(e)) => {
                if let Payload::Submit(s) = &e.payload {
                    let c = &mut t.census;
                    let frames = s.stack.and_then(|id| t.stacks.get(&id.0));
                    if s.dev_tlb_sids().next().is_none() {
                        c.other_with_stack += s.stack.is_some() as u64;
                    } else {
                        c.dev_tlb += 1;
                        if let Some(f) = frames {
                            c.dev_tlb_with_stack += 1;
                            let first = f.first().map(String::as_str).unwrap_or("");
                            let tracer = first.ends_with("[bpf]")
                                || first.starts_with("0x")
                                || first.starts_with("bpf_");
                            c.starts_in_submit += (!tracer && !first.starts_with('<')) as u64;
                            c.unknown += first.starts_with('<') as u64;
                        }
                    }
                }
                t.events.push(e)
            }
            Ok(Record::Lost(l)) => t.lost.push(l),
            Ok(Record::Stack(s)) => {
                t.census.records += 1;
                t.stacks.insert(s.id.0, s.frames);
            }
            Ok(Record::Device(_)) => {}
            Err(e) => t.error = Some(e.to_string()),
        }
    }
    t.end = r.finished().cloned();
    Ok(t)
}

/// The first event at or after `from` (by timestamp) that matches.
fn first_after(events: &[Event], from: KTime, pred: impl Fn(&Payload) -> bool) -> Option<&Event> {
    events
        .iter()
        .filter(|e| e.meta.ts >= from)
        .find(|e| pred(&e.payload))
}

/// Checks of the recorded trace: probes, device-TLB submissions, slots, removal sequences,
/// losses. `disks` come from the guest's sysfs (topology.txt), not from the test's
/// expectations.
pub fn trace_checks(kernel: &Kernel, out: &Path, disks: &[Disk]) -> Vec<Check> {
    let mut c = Vec::new();
    let path = trace_path(out);
    let mut t = match read_trace(&path) {
        Ok(t) => t,
        Err(e) => return vec![Check::fail("trace readable", e)],
    };
    t.events.sort_by_key(|e| e.meta.ts);
    c.push(Check::new(
        "trace readable and finished",
        t.error.is_none() && t.end.is_some(),
        format!(
            "{} events, {} stacks, end frame {}{}",
            t.events.len(),
            t.stacks.len(),
            t.end.is_some(),
            t.error
                .as_deref()
                .map(|e| format!("; error: {e}"))
                .unwrap_or_default()
        ),
    ));
    // Stacks (`record --stack-map-entries 128`: the reader deletes read ids every 16, so a
    // run exercises the deletions on the real map).
    let (n, end) = (&t.census, t.end.clone().unwrap_or_default());
    // The BPF policy (itewatch-ebpf `want_stack`): a device-TLB submission within 60 s after a
    // hot-plug or removal event carries a stack; before any, one per CPU per second does (the
    // sample). 1 ms of slack after an event for the other CPU to see its mark.
    let hot: Vec<KTime> = t
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.payload,
                Payload::HotplugIst(_)
                    | Payload::Unconfigure(_)
                    | Payload::DisconnectWalk(_)
                    | Payload::DeviceDisconnected(_)
                    | Payload::DeviceRemove(_)
                    | Payload::IommuRelease(_)
                    | Payload::HotplugTrace(_)
            )
        })
        .map(|e| e.meta.ts)
        .collect();
    let must = |ts: KTime| {
        hot.iter()
            .any(|h| ts.0 > h.0 + 1_000_000 && ts.0 < h.0 + 60_000_000_000)
    };
    let (mut must_n, mut must_missing, mut sampled_n, mut sampled_with) = (0u64, 0u64, 0u64, 0u64);
    for e in &t.events {
        if let Payload::Submit(s) = &e.payload {
            if s.dev_tlb_sids().next().is_none() {
                continue;
            }
            if must(e.meta.ts) {
                must_n += 1;
                must_missing += s.stack.is_none() as u64;
            } else {
                sampled_n += 1;
                sampled_with += s.stack.is_some() as u64;
            }
        }
    }
    c.push(Check::new(
        "kernel stacks: device-TLB submissions only, no tracer frames, map kept bounded",
        n.dev_tlb > 0
            && n.other_with_stack == 0
            && n.starts_in_submit == n.dev_tlb_with_stack - n.unknown
            && must_missing <= end.stack_failed
            && (sampled_n == 0 || sampled_with > 0)
            && n.unknown * 20 <= n.dev_tlb
            && end.stack_clearings > 0,
        format!(
            "{} device-TLB submissions, {} with a stack ({} starting in kernel code, {} unknown), \
             {} other submissions with one; within 60 s of a hot-plug event {must_n}, \
             {must_missing} of them without a stack; sampled (before any) {sampled_n}, \
             {sampled_with} with one; {} stack records, {} not taken, {} clearings",
            n.dev_tlb,
            n.dev_tlb_with_stack,
            n.starts_in_submit,
            n.unknown,
            n.other_with_stack,
            n.records,
            end.stack_failed,
            end.stack_clearings
        ),
    ));
    c.push(Check::new(
        "trace from the booted kernel",
        t.header.host.kernel_release == kernel.release,
        format!("header kernel_release {:?}", t.header.host.kernel_release),
    ));

    // Host facts in the header, as the guest's sysfs shows them (iommu.txt).
    let iommu_txt = fs::read_to_string(out.join("iommu.txt")).unwrap_or_default();
    let hw = t.header.hardware.clone().unwrap_or_default();
    let units_ok = !hw.iommu_units.is_empty()
        && hw.iommu_units.iter().all(|u| {
            iommu_txt.contains(&u.name)
                && u.kind == "intel-iommu"
                && u.cap.as_deref().is_some_and(|c| iommu_txt.contains(c))
                && u.ecap.as_deref().is_some_and(|e| iommu_txt.contains(e))
        });
    c.push(Check::new(
        "trace header: CPU model, VT-d units, ATS in use",
        hw.cpu_model.as_deref().is_some_and(|m| !m.is_empty())
            && units_ok
            && hw.ats_in_use == Some(true),
        format!(
            "cpu {:?}; units {}; scalable mode {:?} ({}); ATS in use {:?}",
            hw.cpu_model,
            hw.iommu_units
                .iter()
                .map(|u| format!(
                    "{} {} cap {} ecap {}",
                    u.name,
                    u.kind,
                    u.cap.as_deref().unwrap_or("?"),
                    u.ecap.as_deref().unwrap_or("?")
                ))
                .collect::<Vec<_>>()
                .join(", "),
            hw.scalable_mode,
            hw.scalable_mode_basis.as_deref().unwrap_or("-"),
            hw.ats_in_use
        ),
    ));

    // Probes.
    let state = |name: &str| {
        t.header
            .probes
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.state.as_str())
    };
    let attached = |name: &str| matches!(state(name), Some("attached" | "fell-back"));
    let mut want: Vec<&str> = itewatch::probe::required_probes().collect();
    for p in EXPECTED_PROBES {
        if !want.contains(p) {
            want.push(p);
        }
    }
    if kernel.pinned.name == "6.12" {
        // 6.1 has no pci_doe_disconnected (the DOE code arrived in 6.x later than 6.1's).
        want.push("pci_doe_disconnected");
    }
    if HAS_HP_TRACEPOINT.contains(&kernel.pinned.name) {
        want.push("pci:pci_hp_event");
    }
    let missing: Vec<&str> = want.iter().copied().filter(|p| !attached(p)).collect();
    let plan: Vec<String> = t
        .header
        .probes
        .iter()
        .filter(|p| p.state != "attached")
        .map(|p| {
            format!(
                "{}={}{}",
                p.name,
                p.state,
                p.detail
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            )
        })
        .collect();
    c.push(Check::new(
        "expected probes attached",
        missing.is_empty(),
        if missing.is_empty() {
            format!(
                "{} of {} attached; not at their first choice: {}",
                t.header.probes.iter().filter(|p| attached(&p.name)).count(),
                t.header.probes.len(),
                if plan.is_empty() {
                    "none".to_string()
                } else {
                    plan.join("; ")
                }
            )
        } else {
            format!("missing {}; plan: {}", missing.join(", "), plan.join("; "))
        },
    ));

    // The hot path (every invalidation) on BPF trampolines: both pinned kernels support them
    // for these functions, so a kprobe fallback here means the loader went wrong.
    let mech = |name: &str| {
        t.header
            .probes
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.mechanism.clone())
            .unwrap_or_default()
    };
    let hot = [
        ("qi_submit_sync", "fentry:"),
        ("qi_submit_sync:return", "fexit:"),
        ("qi_flush_dev_iotlb", "fentry:"),
    ];
    c.push(Check::new(
        "hot path on fentry/fexit",
        hot.iter().all(|(n, m)| mech(n).starts_with(m)),
        hot.iter()
            .map(|(n, _)| format!("{n} via {}", mech(n)))
            .collect::<Vec<_>>()
            .join(", "),
    ));

    // Losses.
    let lost_full: u64 = t.lost.iter().map(|l| l.ringbuf_full).sum();
    let missed: u64 = t.lost.iter().map(|l| l.missed).sum();
    let undecodable: u64 = t.lost.iter().map(|l| l.undecodable).sum();
    let end_lost = t
        .end
        .as_ref()
        .map_or(0, |e| e.lost_ringbuf_full + e.missed + e.undecodable);
    c.push(Check::new(
        "no lost events",
        lost_full + missed + undecodable + end_lost == 0,
        format!(
            "ring buffer full {lost_full}, missed {missed}, undecodable {undecodable} (end frame total {end_lost})"
        ),
    ));

    // Per disk: device-TLB submissions while it was present, pciehp_ist for its slot, and
    // the removal sequence.
    for d in disks {
        let (Ok(dev), Ok(port)) = (d.dev.parse::<Bdf>(), d.port.parse::<Bdf>()) else {
            c.push(Check::fail(
                format!("{} disk addresses", d.role),
                format!("{d:?}"),
            ));
            continue;
        };
        let sid = dev.sid();
        let surprise = d.role == "surprise";
        let unconf = t.events.iter().find_map(|e| match &e.payload {
            Payload::Unconfigure(s) if s.port.is_some_and(|p| same_bdf(p, port)) => Some((e, s)),
            _ => None,
        });
        let removal_ts = unconf.map_or(KTime(u64::MAX), |(e, _)| e.meta.ts);
        if surprise && HAS_HP_TRACEPOINT.contains(&kernel.pinned.name) {
            // The tracepoint's own report of the cut, before pciehp unconfigures the slot.
            let hp: Vec<String> = t
                .events
                .iter()
                .filter_map(|e| match &e.payload {
                    Payload::HotplugTrace(h) if h.port.is_some_and(|p| same_bdf(p, port)) => {
                        Some((e.meta.ts, h))
                    }
                    _ => None,
                })
                .map(|(ts, h)| {
                    format!(
                        "{}{}",
                        h.what.kernel_name(),
                        if ts < removal_ts {
                            ""
                        } else {
                            " (after unconfigure)"
                        }
                    )
                })
                .collect();
            let cut = t.events.iter().any(|e| {
                e.meta.ts < removal_ts
                    && matches!(&e.payload, Payload::HotplugTrace(h)
                        if h.port.is_some_and(|p| same_bdf(p, port))
                            && matches!(h.what, HpWhat::LinkDown | HpWhat::CardNotPresent))
            });
            c.push(Check::new(
                format!("surprise {port}: pci_hp_event reports the cut"),
                cut,
                format!("pci:pci_hp_event for port {port}: [{}]", hp.join(", ")),
            ));
        }
        let subs: Vec<&Event> = t
            .events
            .iter()
            .filter(
                |e| matches!(&e.payload, Payload::Submit(s) if s.dev_tlb_sids().any(|x| x == sid)),
            )
            .collect();
        let before = subs.iter().filter(|e| e.meta.ts < removal_ts).count();
        let after = subs.len() - before;
        let flush_ts: Vec<KTime> = t
            .events
            .iter()
            .filter(|e| matches!(&e.payload, Payload::DevTlbFlush(f) if f.sid == sid))
            .map(|e| e.meta.ts)
            .collect();
        let flushes_after = flush_ts.iter().filter(|&&ts| ts >= removal_ts).count();
        c.push(Check::new(
            format!("{} {}: device-TLB submissions during DMA", d.role, sid),
            before > 0,
            format!(
                "{before} submissions with a device-TLB descriptor for {sid} before its removal, {after} after; qi_flush_dev_iotlb for it: {} before, {flushes_after} after",
                flush_ts.len() - flushes_after
            ),
        ));
        let ists = t
            .events
            .iter()
            .filter(|e| matches!(&e.payload, Payload::HotplugIst(s) if s.port.is_some_and(|p| same_bdf(p, port))))
            .count();
        c.push(Check::new(
            format!("{} {}: pciehp_ist for slot {}", d.role, sid, d.slot),
            ists > 0,
            format!("{ists} pciehp_ist entries for port {port}"),
        ));

        // The removal sequence, each step after the previous one.
        let mut steps: Vec<String> = Vec::new();
        let mut ok = true;
        let mut at = KTime(0);
        match unconf {
            Some((e, s)) => {
                ok &= s.presence == Some(!surprise);
                steps.push(format!(
                    "unconfigure presence={:?} @{}",
                    s.presence, e.meta.ts
                ));
                at = e.meta.ts;
            }
            None => {
                ok = false;
                steps.push("no pciehp_unconfigure_device for the port".into());
            }
        }
        if surprise {
            match first_after(
                &t.events,
                at,
                |p| matches!(p, Payload::DisconnectWalk(w) if (w.bus..=w.bus_end).contains(&dev.bus)),
            ) {
                Some(e) => {
                    steps.push(format!("disconnect walk @{}", e.meta.ts));
                    at = e.meta.ts;
                }
                None => {
                    ok = false;
                    steps.push(format!("no disconnect walk covering bus {:02x}", dev.bus));
                }
            }
            if attached("pci_doe_disconnected") || attached("pci_dev_set_disconnected") {
                match first_after(
                    &t.events,
                    at,
                    |p| matches!(p, Payload::DeviceDisconnected(r) if r.bdf.is_some_and(|b| same_bdf(b, dev))),
                ) {
                    Some(e) => steps.push(format!("device disconnected @{}", e.meta.ts)),
                    None => {
                        ok = false;
                        steps.push("no device-disconnected event".into());
                    }
                }
            }
        } else if let Some(e) = first_after(
            &t.events,
            at,
            |p| matches!(p, Payload::DisconnectWalk(w) if (w.bus..=w.bus_end).contains(&dev.bus)),
        ) {
            ok = false;
            steps.push(format!(
                "unexpected disconnect walk in a safe removal @{}",
                e.meta.ts
            ));
        }
        for (what, is) in [("device remove", 0usize), ("iommu release", 1usize)] {
            let found = first_after(&t.events, at, |p| match (is, p) {
                (0, Payload::DeviceRemove(r)) | (1, Payload::IommuRelease(r)) => {
                    r.bdf.is_some_and(|b| same_bdf(b, dev))
                }
                _ => false,
            });
            match found {
                Some(e) => {
                    steps.push(format!("{what} @{}", e.meta.ts));
                    at = e.meta.ts;
                }
                None => {
                    ok = false;
                    steps.push(format!("no {what} for {dev} after the previous step"));
                }
            }
        }
        c.push(Check::new(
            format!("{} removal sequence for {}", d.role, dev),
            ok,
            steps.join(" -> "),
        ));
    }

    // Which removal paths sent device-TLB invalidations to the cut disk, against what the
    // kernel's source says of the legacy context clear (42662d19839f).
    if let Some(d) = disks.iter().find(|d| d.role == "surprise") {
        c.push(context_clear_check(kernel, &t, d));
    }

    // QEMU completes every invalidation: no submission may have failed (an ITE here would be
    // a harness or emulation change worth knowing about).
    let rets: Vec<i64> = t
        .events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::SubmitReturn(r) => Some(r.ret),
            _ => None,
        })
        .collect();
    let failed = rets.iter().filter(|&&r| r != 0).count();
    c.push(Check::new(
        "every qi_submit_sync returned 0 (QEMU has no ITE)",
        failed == 0,
        format!("{} returns, {failed} non-zero", rets.len()),
    ));

    // Figures for the docs: event rate and BPF run time per program.
    if let Some(end) = &t.end {
        let secs = end.duration_ns.map(|n| n as f64 / 1e9);
        let rate = secs.map_or("?".to_string(), |s| {
            format!("{:.0}/s", end.events as f64 / s.max(1e-9))
        });
        c.push(Check::new(
            "event rate",
            true,
            format!(
                "{} events in {} s ({rate})",
                end.events,
                secs.map_or("?".into(), |s| format!("{s:.1}"))
            ),
        ));
        let progs: Vec<String> = end
            .programs
            .iter()
            .filter(|p| p.run_count > 0)
            .map(|p| {
                format!(
                    "{} {}x {:.0} ns",
                    p.program,
                    p.run_count,
                    p.run_time_ns as f64 / p.run_count as f64
                )
            })
            .collect();
        c.push(Check::new(
            "BPF run time per program (mean per run)",
            true,
            if progs.is_empty() {
                "no BPF stats in the end frame".into()
            } else {
                progs.join(", ")
            },
        ));
    }
    c
}

/// `itewatch doctor --json` ran and its document agrees with what the guest's sysfs showed:
/// this kernel, every host fact ok, both disks ATS-capable behind their slots, every required
/// probe target traceable, and a verdict other than not-ready.
/// The surprise disk's device-TLB invalidations from the removal's pciehp thread after the
/// disconnect walk, by the path their stack shows: the driver's teardown (every kernel so
/// far), and the legacy context clear `__context_flush_dev_iotlb`, which only kernels without
/// 42662d19839f send. Kernels that batch (6.12+) send the driver's teardown as iotlb +
/// device-TLB pairs and the context clear as a lone device-TLB descriptor, so a stackless
/// lone one counts as the context clear there.
fn context_clear_check(kernel: &Kernel, t: &TraceData, d: &Disk) -> Check {
    let expected = kernel.pinned.context_clear_flushes_gone_device;
    let name = format!(
        "removal path flushes to the cut disk: context clear {} (42662d19839f {})",
        if expected { "expected" } else { "not expected" },
        if expected {
            "absent"
        } else {
            "present or path absent"
        }
    );
    let Ok(dev) = d.dev.parse::<Bdf>() else {
        return Check::fail(name, format!("bad BDF {}", d.dev));
    };
    let sid = dev.sid();
    let Some(walk) = t.events.iter().find(|e| {
        matches!(&e.payload, Payload::DisconnectWalk(w) if (w.bus..=w.bus_end).contains(&dev.bus))
    }) else {
        return Check::fail(name, "no disconnect walk");
    };
    let subs: Vec<&itewatch::event::Submit> = t
        .events
        .iter()
        .filter(|e| e.meta.ts >= walk.meta.ts && e.meta.comm.to_string().contains("pciehp"))
        .filter_map(|e| match &e.payload {
            Payload::Submit(s) if s.dev_tlb_sids().any(|x| x == sid) => Some(s),
            _ => None,
        })
        .collect();
    let frames = |s: &itewatch::event::Submit| -> Vec<String> {
        s.stack
            .and_then(|id| t.stacks.get(&id.0))
            .cloned()
            .unwrap_or_default()
    };
    let has = |s: &itewatch::event::Submit, f: &str| frames(s).iter().any(|x| x.contains(f));
    let batches = subs.iter().any(|s| s.count >= 2);
    let context = subs
        .iter()
        .filter(|s| {
            has(s, "__context_flush_dev_iotlb") || (batches && frames(s).is_empty() && s.count == 1)
        })
        .count();
    let teardown = subs.iter().filter(|s| has(s, "virtblk_remove")).count();
    let ok = !subs.is_empty() && (context > 0) == expected;
    Check::new(
        name,
        ok,
        format!(
            "{} device-TLB submissions to {sid} from pciehp after the walk: {teardown} with the \
             driver's teardown on the stack, {context} from the context clear",
            subs.len()
        ),
    )
}

pub fn doctor_check(kernel: &Kernel, out: &Path, disks: &[Disk]) -> Check {
    let name = "doctor --json sane";
    let rc = fs::read_to_string(out.join("doctor.rc")).unwrap_or_default();
    let text = fs::read_to_string(out.join("doctor.json")).unwrap_or_default();
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(
                name,
                format!(
                    "exit {}, not JSON ({e}); stderr: {}",
                    rc.trim(),
                    fs::read_to_string(out.join("doctor.err"))
                        .unwrap_or_default()
                        .trim()
                ),
            )
        }
    };
    let mut problems = Vec::new();
    let release = v["kernel_release"].as_str().unwrap_or("");
    if release != kernel.release {
        problems.push(format!("kernel_release {release:?}"));
    }
    let verdict = v["verdict"].as_str().unwrap_or("?");
    if !matches!(verdict, "ready" | "degraded") {
        problems.push(format!("verdict {verdict}"));
    }
    for h in v["host"].as_array().into_iter().flatten() {
        if h["status"].as_str() != Some("ok") {
            problems.push(format!("host fact {} is {}", h["name"], h["status"]));
        }
    }
    for d in disks {
        let seen = v["ats_devices"].as_array().into_iter().flatten().any(|a| {
            a["bdf"].as_str() == Some(d.dev.as_str())
                && a["ats"].as_bool() == Some(true)
                && a["port"].as_str() == Some(d.port.as_str())
        });
        if !seen {
            problems.push(format!(
                "{} not listed as an ATS device behind {}",
                d.dev, d.port
            ));
        }
    }
    for p in v["probes"].as_array().into_iter().flatten() {
        if p["required"].as_bool() == Some(true) && p["status"].as_str() != Some("ok") {
            problems.push(format!(
                "required probe target {} is {}",
                p["target"], p["status"]
            ));
        }
    }
    Check::new(
        name,
        rc.trim() == "0" && problems.is_empty(),
        if problems.is_empty() {
            format!(
                "exit {}, verdict {verdict}, {} host facts ok, {} ATS devices, {} slots",
                rc.trim(),
                v["host"].as_array().map_or(0, Vec::len),
                v["ats_devices"].as_array().map_or(0, Vec::len),
                v["slots"].as_array().map_or(0, Vec::len)
            )
        } else {
            format!("exit {}: {}", rc.trim(), problems.join("; "))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use itewatch::output::{AtomicFile, OnDrop};
    use std::io::Write;

    #[test]
    fn memory_is_reported_for_each_process_or_the_check_fails() {
        let out = std::env::temp_dir().join(format!("xtask-memory-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        let line = |who: &str| {
            format!(
                "memory: {who} VmHWM: 2048 kB VmRSS: 1024 kB RssAnon: 512 kB RssFile: 512 kB \n"
            )
        };
        fs::write(out.join("guest.log"), line("record") + &line("agent")).unwrap();
        let c = memory_check(&out);
        assert!(!c.ok, "live is missing: {}", c.detail);
        fs::write(
            out.join("guest.log"),
            line("record") + &line("agent") + &line("live"),
        )
        .unwrap();
        let c = memory_check(&out);
        assert!(c.ok, "{}", c.detail);
        assert!(
            c.detail
                .contains("agent 1.0 MiB (peak 2.0; anon 0.5, file 0.5)"),
            "{}",
            c.detail
        );
        fs::remove_dir_all(&out).unwrap();
    }

    // The 6.1 ITE run saves /out while the recorder still writes: the checks must find the
    // trace under the temporary name `record` gives it.
    #[test]
    fn a_recording_still_running_is_found_under_its_temporary_name() {
        let out = std::env::temp_dir().join(format!("xtask-trace-path-{}", std::process::id()));
        fs::create_dir_all(&out).unwrap();
        let mut f = AtomicFile::create(&out.join("trace.itw"), OnDrop::Keep).unwrap();
        f.write_all(b"records").unwrap();
        let tmp = f.temp_path().to_path_buf();
        drop(f);
        assert_eq!(trace_path(&out), tmp);
        fs::write(out.join("trace.itw"), b"finished").unwrap();
        assert_eq!(trace_path(&out), out.join("trace.itw"));
        fs::remove_dir_all(&out).unwrap();
    }
}
