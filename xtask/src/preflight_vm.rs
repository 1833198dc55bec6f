//! The VM checks of `itewatch preflight` beyond the surprise disk's risk and the emptied slot's
//! go (kcode_check::preflight_check): a card behind a PCIe switch, a hot-plug slot without
//! power controller (and the removal step preflight recommends for it, carried out), a
//! preflight that cannot tell (not root), and preflight after an ITE. Each compares
//! preflight's JSON with what the guest's own script read (switch.txt, topology.txt), the
//! kernel's log, or the console.

use std::fs;
use std::path::Path;

use serde_json::Value;

use crate::assert::{parse_topology, Check, Disk};

/// `NAME.rc` and `NAME.json` of one guest preflight (`pf` in guest.rs).
pub fn read(out: &Path, name: &str) -> Result<(String, Value), String> {
    let rc = fs::read_to_string(out.join(format!("{name}.rc")))
        .map_err(|e| format!("{name}.rc: {e}"))?;
    let text = fs::read_to_string(out.join(format!("{name}.json"))).unwrap_or_default();
    let v = serde_json::from_str(&text).map_err(|e| {
        format!(
            "{name}.json: {e}; stderr: {}",
            fs::read_to_string(out.join(format!("{name}.err")))
                .unwrap_or_default()
                .trim()
        )
    })?;
    Ok((rc.trim().to_string(), v))
}

fn verdict(v: &Value) -> &str {
    v["verdict"].as_str().unwrap_or("?")
}

fn bdfs(v: &Value) -> Vec<String> {
    v["functions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f["bdf"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn ats_state<'a>(v: &'a Value, bdf: &str) -> Option<&'a str> {
    v["functions"]
        .as_array()?
        .iter()
        .find(|f| f["bdf"].as_str() == Some(bdf))?["ats"]["state"]
        .as_str()
}

fn check(name: &str, problems: Vec<String>, detail: Vec<String>) -> Check {
    if problems.is_empty() {
        Check::new(name, true, detail.join("; "))
    } else {
        Check::fail(name, problems.join("; "))
    }
}

/// The guest's view of the switch card (switch.txt): the disk behind the switch and every
/// device the card carries.
fn switch_topology(out: &Path) -> (Option<Disk>, Vec<Disk>) {
    let all = parse_topology(&fs::read_to_string(out.join("switch.txt")).unwrap_or_default());
    let disk = all.iter().find(|d| d.role == "behind-switch").cloned();
    (disk, all.into_iter().filter(|d| d.role == "card").collect())
}

/// The card in the switch's root-port slot: risk (exit 1), with every device the guest found
/// under that port listed, and the ATS disk behind the switch's downstream port named as the
/// reason — ATS found through the switch.
pub fn switch_check(out: &Path) -> Check {
    let name = "preflight: card with a switch";
    let (disk, card) = switch_topology(out);
    let Some(disk) = disk else {
        return Check::fail(name, "no behind-switch disk in switch.txt");
    };
    let mut problems = Vec::new();
    if disk.ats_ctl.is_none_or(|c| c & 0x8000 == 0) {
        problems.push(format!(
            "the guest read ATS Control {:?} on {}",
            disk.fields.get("ats_ctl"),
            disk.dev
        ));
    }
    let (rc, v) = match read(out, "preflight-switch") {
        Ok(x) => x,
        Err(e) => return Check::fail(name, e),
    };
    if rc != "1" || verdict(&v) != "risk" {
        problems.push(format!("exit {rc}, verdict {}", verdict(&v)));
    }
    let mut want: Vec<String> = card.iter().map(|d| d.dev.clone()).collect();
    want.sort();
    let mut got = bdfs(&v);
    got.sort();
    if want.len() < 3 || got != want {
        problems.push(format!("functions {got:?}, the guest found {want:?}"));
    }
    if ats_state(&v, &disk.dev) != Some("enabled") {
        problems.push(format!("{} ATS {:?}", disk.dev, ats_state(&v, &disk.dev)));
    }
    let first = v["reasons"][0].as_str().unwrap_or("");
    if !first.contains(&format!("ATS is enabled on {}", disk.dev)) {
        problems.push(format!("first reason {first:?}"));
    }
    check(
        name,
        problems,
        vec![format!(
            "slot {}: exit {rc} {}, functions {got:?}, ATS enabled on {} (behind {})",
            v["slot"]["name"].as_str().unwrap_or("?"),
            verdict(&v),
            disk.dev,
            disk.port
        )],
    )
}

/// The disk in the downstream slot without power controller: risk; the slot's capabilities
/// say no power controller, as the kernel's pciehp line does (`PwrCtrl-`); the recommended
/// removal step is the slot's `power` file, and carrying it out (after the recorder stopped)
/// removed the disk.
pub fn no_power_controller_check(out: &Path, dmesg: &str) -> Check {
    let name = "preflight: slot without power controller";
    let (disk, _) = switch_topology(out);
    let Some(disk) = disk else {
        return Check::fail(name, "no behind-switch disk in switch.txt");
    };
    let mut problems = Vec::new();
    let mut detail = Vec::new();
    let pciehp = dmesg
        .lines()
        .find(|l| l.contains(&disk.port) && l.contains("pciehp: Slot #"))
        .unwrap_or("");
    if !pciehp.contains("PwrCtrl-") || !pciehp.contains("HotPlug+") {
        problems.push(format!("pciehp line for {}: {pciehp:?}", disk.port));
    }
    let (rc, v) = match read(out, "preflight-behind-switch") {
        Ok(x) => x,
        Err(e) => return Check::fail(name, e),
    };
    if rc != "1" || verdict(&v) != "risk" || bdfs(&v) != [disk.dev.clone()] {
        problems.push(format!(
            "exit {rc}, verdict {}, functions {:?}",
            verdict(&v),
            bdfs(&v)
        ));
    }
    let caps = &v["slot"]["caps"]["Ok"];
    if v["slot"]["name"].as_str() != Some(disk.slot.as_str())
        || v["slot"]["port"].as_str() != Some(disk.port.as_str())
        || caps["power_controller"].as_bool() != Some(false)
        || caps["hotplug_capable"].as_bool() != Some(true)
    {
        problems.push(format!("slot {}", v["slot"]));
    }
    if !v["reasons"].as_array().into_iter().flatten().any(|r| {
        r.as_str()
            .is_some_and(|r| r.contains("power controller no"))
    }) {
        problems.push("no reason says the slot has no power controller".into());
    }
    let cmd = format!("echo 0 > /sys/bus/pci/slots/{}/power", disk.slot);
    let step = v["sequence"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["command"].as_str() == Some(cmd.as_str()));
    match step {
        Some(s)
            if s["action"]
                .as_str()
                .is_some_and(|a| a.contains("no power controller")) =>
        {
            detail.push(format!("step {:?}", s["action"].as_str().unwrap_or("")))
        }
        _ => problems.push(format!(
            "no step `{cmd}` for a slot without power controller"
        )),
    }
    let released = fs::read_to_string(out.join("release-behind-switch.txt")).unwrap_or_default();
    let field = |k: &str| {
        released
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
    };
    if field("rc") != "0" || field("gone") != "1" {
        problems.push(format!("carrying out the step: {}", released.trim()));
    }
    detail.push(format!(
        "exit {rc} {}, slot {} caps power controller false (pciehp: PwrCtrl-); `{cmd}` run: exit {}, {} left sysfs in {} s",
        verdict(&v),
        disk.slot,
        field("rc"),
        disk.dev,
        field("seconds")
    ));
    check(name, problems, detail)
}

/// Run as `nobody`: config space beyond 64 bytes is unreadable, so every function's ATS state
/// is unknown and preflight says cannot-tell, exit 2, with the reason — never go.
pub fn cannot_tell_check(out: &Path, surprise_dev: Option<&str>) -> Check {
    let name = "preflight: cannot tell (not root)";
    let (rc, v) = match read(out, "preflight-nonroot") {
        Ok(x) => x,
        Err(e) => return Check::fail(name, e),
    };
    let mut problems = Vec::new();
    let who = fs::read_to_string(out.join("preflight-nonroot.err")).unwrap_or_default();
    if !who.contains("uid=65534") {
        problems.push(format!("not run as nobody: {:?}", who.lines().next()));
    }
    if rc != "2" || verdict(&v) != "cannot-tell" || v["exit_code"].as_u64() != Some(2) {
        problems.push(format!("exit {rc}, verdict {}", verdict(&v)));
    }
    let funcs: Vec<&Value> = v["functions"].as_array().into_iter().flatten().collect();
    let why = |f: &Value| f["ats"]["why"].as_str().unwrap_or("").to_string();
    if funcs.is_empty()
        || surprise_dev.is_none_or(|d| !bdfs(&v).iter().any(|b| b == d))
        || !funcs
            .iter()
            .all(|f| f["ats"]["state"] == "unknown" && why(f).contains("64 bytes"))
    {
        problems.push(format!("functions {}", v["functions"]));
    }
    let first = v["reasons"][0].as_str().unwrap_or("");
    if !first.contains("run as root") {
        problems.push(format!("first reason {first:?}"));
    }
    check(
        name,
        problems,
        vec![format!(
            "exit {rc} {}: {first}; ATS {}; kernel log read {} ({})",
            verdict(&v),
            funcs.first().map(|f| why(f)).unwrap_or_default(),
            v["kernel_log"]["read"],
            v["kernel_log"]["why"].as_str().unwrap_or("")
        )],
    )
}

/// Preflight read the kernel log and found no ITE in it (before any ITE in this boot).
pub fn no_ite_yet(v: &Value) -> Option<String> {
    let log = &v["kernel_log"];
    (log["read"].as_bool() != Some(true) || log["ite_reports"].as_u64() != Some(0))
        .then(|| format!("kernel_log before any ITE: {log}"))
}

/// After the ITE for `sid` and the completed removal (kernels that survive it): the other ATS
/// disk is still a risk and the emptied slot is go, and both say from the kernel log how many
/// ITE reports this boot had for that SID — as many as the console shows — with no device at
/// that SID any more. Before the ITE (preflight-surprise) the log had none.
pub fn after_ite_check(out: &Path, sid: u16, console_ite_lines: usize, other: &Disk) -> Check {
    let name = "preflight after the ITE";
    let mut problems = Vec::new();
    let mut detail = Vec::new();
    match read(out, "preflight-surprise") {
        Ok((_, v)) => problems.extend(no_ite_yet(&v)),
        Err(e) => problems.push(e),
    }
    for (file, want_rc, want) in [
        ("preflight-after-ite-other", "1", "risk"),
        ("preflight-after-ite-empty", "0", "go"),
    ] {
        let (rc, v) = match read(out, file) {
            Ok(x) => x,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        if rc != want_rc || verdict(&v) != want {
            problems.push(format!("{file}: exit {rc}, verdict {}", verdict(&v)));
        }
        let log = &v["kernel_log"];
        let entry = log["ite_sids"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["sid"].as_u64() == Some(u64::from(sid)));
        let reports = entry.and_then(|e| e["reports"].as_u64()).unwrap_or(0);
        let gone = entry.is_some_and(|e| e["present"].as_array().is_some_and(Vec::is_empty));
        if log["read"].as_bool() != Some(true)
            || reports == 0
            || reports != console_ite_lines as u64
            || !gone
        {
            problems.push(format!(
                "{file}: kernel_log {log} (console: {console_ite_lines} ITE lines for SID {sid:x})"
            ));
        }
        let said = v["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r.as_str().is_some_and(|r| r.contains("already timed out")));
        if !said {
            problems.push(format!(
                "{file}: no reason says the IOMMU already timed out"
            ));
        }
        match want {
            "risk" => {
                if bdfs(&v) != [other.dev.clone()] || ats_state(&v, &other.dev) != Some("enabled") {
                    problems.push(format!("{file}: functions {}", v["functions"]));
                }
            }
            _ => {
                if !bdfs(&v).is_empty() {
                    problems.push(format!("{file}: functions {}", v["functions"]));
                }
            }
        }
        detail.push(format!(
            "{}: exit {rc} {}, {reports} ITE report(s) for SID {sid:x} in the kernel log, no device at it now",
            v["target"].as_str().unwrap_or("?"),
            verdict(&v)
        ));
    }
    check(name, problems, detail)
}
