//! The checks of one guest run: first the stimuli (did the VM really have VT-d with
//! device-IOTLB, ATS on the disks, pciehp on both slots, a safe and a surprise removal), read
//! from the guest's dmesg and its config-space dump; then what itewatch recorded, read from the
//! trace with `itewatch::trace::TraceReader`. Only what the real kernel produced is checked.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

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
    pub safe_deleted: bool,
    pub surprise_deleted: bool,
    /// QEMU start to exit.
    pub guest_s: f64,
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
        checks.extend(crate::assert::trace_checks(kernel, out, &disks));
    }
    checks
}

/// Checks of the recorded trace. Filled in once `itewatch record` exists.
pub fn trace_checks(_kernel: &Kernel, out: &Path, _disks: &[Disk]) -> Vec<Check> {
    vec![Check::new(
        "trace present",
        out.join("trace.itw").exists(),
        out.join("trace.itw").display().to_string(),
    )]
}
