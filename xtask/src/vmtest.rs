//! `cargo xtask vm-test`: per kernel, build the initramfs, boot the guest, drive the removals
//! over QMP as the guest announces its stages, collect the guest's `/out` and check it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::assert::{self, Check, RunFacts};
use crate::guest::{self, GuestPlan, STAGE, VERDICT};
use crate::initramfs::Cpio;
use crate::kernels::{self, Kernel};
use crate::qemu::{self, Files, Guest, QemuOpts};
use crate::qmp::{self, Qmp};
use crate::{ScenarioChoice, VmTestArgs};

/// One guest run's scenario (docs/vm-tests.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Removals,
    IteSurprise,
}

impl Scenario {
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Removals => "removals",
            Scenario::IteSurprise => "ite-surprise",
        }
    }
}

/// The patched QEMU (qemu-ite/), built once by scripts/qemu-ite.sh into a cache keyed by the
/// patch's hash; building it here too keeps `cargo xtask vm-test` working from a fresh clone.
fn qemu_ite(root: &Path) -> Result<PathBuf> {
    let out = Command::new(root.join("scripts/qemu-ite.sh"))
        .current_dir(root)
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running scripts/qemu-ite.sh")?;
    if !out.status.success() {
        bail!("scripts/qemu-ite.sh failed ({})", out.status);
    }
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if path.is_empty() {
        bail!("scripts/qemu-ite.sh printed no path");
    }
    Ok(PathBuf::from(path))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
}

/// Builds the static guest binary (musl) and returns its path.
pub(crate) fn build_itewatch(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("vm-test: building itewatch for x86_64-unknown-linux-musl (release)");
    let st = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "itewatch",
        ])
        // The guest binary must carry the BPF programs, whatever the host build skipped.
        .env_remove("AYA_BUILD_SKIP")
        .current_dir(root)
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("building the musl itewatch failed");
    }
    Ok(target_dir(root).join("x86_64-unknown-linux-musl/release/itewatch"))
}

pub fn run(args: &VmTestArgs) -> Result<bool> {
    let root = workspace_root();
    let cache = args
        .cache_dir
        .clone()
        .unwrap_or_else(|| root.join(".cache/vm"));
    fs::create_dir_all(&cache)?;
    let chosen = kernels::chosen(args.kernel);
    let scenarios: Vec<Scenario> = match args.scenario {
        ScenarioChoice::Removals => vec![Scenario::Removals],
        ScenarioChoice::IteSurprise => vec![Scenario::IteSurprise],
        ScenarioChoice::All => vec![Scenario::Removals, Scenario::IteSurprise],
    };
    let ite_qemu = if scenarios.contains(&Scenario::IteSurprise) {
        Some(match &args.qemu_ite {
            Some(p) => p.clone(),
            None => qemu_ite(&root)?,
        })
    } else {
        None
    };
    let itewatch = if args.no_record {
        None
    } else if let Some(p) = &args.itewatch {
        Some(p.clone())
    } else {
        Some(build_itewatch(&root)?)
    };
    let mut all_ok = true;
    let mut summaries = Vec::new();
    for (p, scenario) in chosen
        .iter()
        .flat_map(|p| scenarios.iter().map(move |s| (*p, *s)))
    {
        let t0 = Instant::now();
        let kernel = kernels::prepare(&cache, p)?;
        let dir = cache.join(format!("run-{}-{}", p.name, scenario.name()));
        let mut qemu = match (scenario, &ite_qemu) {
            (Scenario::IteSurprise, Some(bin)) => QemuOpts {
                binary: bin.clone(),
                firmware_dirs: true,
                ite: Some(args.ite_timeout_us),
                ..QemuOpts::stock()
            },
            _ => QemuOpts {
                switch: true,
                ..QemuOpts::stock()
            },
        };
        qemu.serial_cap_bytes = args.serial_cap_mib << 20;
        let run = || match run_kernel(&kernel, scenario, &qemu, &dir, itewatch.as_deref(), args) {
            Ok(c) => c,
            Err(e) => vec![Check::fail("guest run", format!("{e:#}"))],
        };
        let mut checks = run();
        let mut retried = None;
        if !checks.iter().all(|c| c.ok) {
            // A kernel that dies before the guest's init runs has not met itewatch at all
            // (seen once on 7.3 under TCG: an int3 oops in sched_clock_cpu while static keys
            // were patched at boot). Boot once more, and say so; a second death fails.
            if let Some(why) = died_before_init(&dir.join("serial.log")) {
                println!("  {} {}: {why}; booting once more", p.name, scenario.name());
                retried = Some(why);
                checks = run();
            }
        }
        let wall = t0.elapsed();
        let ok = checks.iter().all(|c| c.ok);
        if let Some(why) = &retried {
            println!("  note: first boot died before init ({why}); this is the second boot");
        }
        all_ok &= ok;
        println!(
            "\n== kernel {} ({}) {} — {} in {:.1} s; run directory {}",
            p.name,
            kernel.release,
            scenario.name(),
            if ok { "PASS" } else { "FAIL" },
            wall.as_secs_f64(),
            dir.display()
        );
        for c in &checks {
            println!(
                "  [{}] {:<44} {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        if !ok {
            println!("  serial log: {}", dir.join("serial.log").display());
        }
        if ok && args.save_traces && itewatch.is_some() {
            match scenario {
                Scenario::Removals => save_traces(&root, p.name, &dir.join("out"))?,
                Scenario::IteSurprise => crate::ite::save_logs(&root, &kernel, &dir)?,
            }
        }
        if ok && !args.keep {
            // Keep the guest's outputs and logs, drop the big files.
            for f in [
                "initramfs.cpio",
                "disk1.raw",
                "disk2.raw",
                "disk3.raw",
                "out.raw",
            ] {
                let _ = fs::remove_file(dir.join(f));
            }
        }
        summaries.push((p.name, scenario.name(), ok, wall));
    }
    println!("\nvm-test summary:");
    for (name, scenario, ok, wall) in &summaries {
        println!(
            "  {name} {scenario} {} {:.1} s",
            if *ok { "PASS" } else { "FAIL" },
            wall.as_secs_f64()
        );
    }
    Ok(all_ok)
}

/// The part of a guest's initramfs every VM command shares: the directories, console and null
/// devices, busybox as `/bin/sh`, the kernel's modules (their names returned in load order),
/// and `itewatch` stripped of its debug info when given. The caller adds its `/init`.
pub(crate) fn guest_base(
    kernel: &Kernel,
    itewatch: Option<&Path>,
    path: &Path,
) -> Result<(Cpio, Vec<String>)> {
    let mut c = Cpio::new();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "out",
        "lib",
        "lib/modules",
    ] {
        c.dir(d);
    }
    c.chardev("dev/console", 5, 1);
    c.chardev("dev/null", 1, 3);
    c.file_from("bin/busybox", 0o755, Path::new("/bin/busybox"))?;
    c.symlink("bin/sh", "busybox");
    if let Some(bin) = itewatch {
        // The release profile keeps debug info (tens of MB); the guest needs none of it.
        let stripped = path.with_file_name("itewatch.stripped");
        let st = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(bin)
            .status();
        let src = if st.is_ok_and(|s| s.success()) {
            stripped.as_path()
        } else {
            bin
        };
        c.file_from("bin/itewatch", 0o755, src)?;
    }
    let mut names = Vec::new();
    for (name, file) in &kernel.modules {
        c.file_from(&format!("lib/modules/{name}.ko"), 0o644, file)?;
        names.push(name.clone());
    }
    Ok((c, names))
}

fn build_initramfs(
    kernel: &Kernel,
    ite: bool,
    switch: bool,
    itewatch: Option<&Path>,
    args: &VmTestArgs,
    path: &Path,
) -> Result<()> {
    let (mut c, names) = guest_base(kernel, itewatch, path)?;
    let script = guest::init_script(&GuestPlan {
        modules: &names,
        record: itewatch.is_some(),
        out_dev: qemu::OUT_BDF,
        safe_slot: qemu::SAFE_SLOT,
        surprise_slot: qemu::SURPRISE_SLOT,
        switch_slots: switch.then_some((qemu::SWITCH_SLOT, qemu::BEHIND_SWITCH_SLOT)),
        surprise_inflight: args.surprise_inflight,
        ite,
    });
    c.file("init", 0o755, script.as_bytes());
    fs::write(path, c.finish()).with_context(|| format!("writing {}", path.display()))
}

/// Waits for a console marker; fails early on the guest's failure verdict.
pub fn wait_marker_pub(g: &mut Guest, needle: &str, deadline: Instant) -> Result<String> {
    wait_marker(g, needle, deadline)
}

/// Waits for a console marker; fails early on the guest's failure verdict.
fn wait_marker(g: &mut Guest, needle: &str, deadline: Instant) -> Result<String> {
    let fail = format!("{VERDICT} failure");
    loop {
        let step = (Instant::now() + Duration::from_millis(500)).min(deadline);
        match g.wait_serial(needle, step) {
            Ok(t) => return Ok(t),
            Err(e) => {
                let text = g.console();
                if let Some(i) = text.find(&fail) {
                    let line = text[i..].lines().next().unwrap_or("");
                    bail!("guest reported {line:?}:\n{}", qemu::tail(text, 40));
                }
                if Instant::now() >= deadline || g.exited()?.is_some() {
                    return Err(e);
                }
            }
        }
    }
}

fn run_kernel(
    kernel: &Kernel,
    scenario: Scenario,
    qemu: &QemuOpts,
    dir: &Path,
    itewatch: Option<&Path>,
    args: &VmTestArgs,
) -> Result<Vec<Check>> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    fs::create_dir_all(dir)?;
    let files = Files {
        dir: dir.to_path_buf(),
        kernel: kernel.vmlinuz.clone(),
        initrd: dir.join("initramfs.cpio"),
    };
    let ite = scenario == Scenario::IteSurprise;
    build_initramfs(kernel, ite, qemu.switch, itewatch, args, &files.initrd)?;
    qemu::make_disk(&files.disk(1), 8 << 20)?;
    qemu::make_disk(&files.disk(2), 8 << 20)?;
    if qemu.switch {
        qemu::make_disk(&files.disk(3), 8 << 20)?;
    }
    qemu::make_disk(&files.out_disk(), 64 << 20)?;

    eprintln!(
        "vm-test: booting {} ({}) under TCG: {}",
        kernel.pinned.name,
        kernel.release,
        scenario.name()
    );
    let mut g = Guest::spawn(&files, qemu)?;
    let deadline = g.started + Duration::from_secs(args.timeout);
    let mut facts = RunFacts::default();
    let driven = if ite {
        crate::ite::drive(&mut g, &files, &mut facts, deadline)
    } else {
        drive(&mut g, &files, &mut facts, deadline)
    };
    // Whatever happened, let the guest power off (it does after a failure too), then unpack
    // what it wrote: a failed run's dmesg and logs are the diagnosis.
    let exit = g.wait_exit(deadline.max(Instant::now()) + Duration::from_secs(20));
    facts.guest_s = g.started.elapsed().as_secs_f64();
    let out = dir.join("out");
    // Even a killed guest may have synced its outputs before hanging.
    let unpacked = unpack_out(&files, &out);
    // The interactive view's screen (the guest's ttyS1), beside the guest's own outputs.
    if files.tui_screen().exists() && out.is_dir() {
        let _ = fs::copy(files.tui_screen(), out.join("tui.screen"));
    }
    if ite {
        // The verdict is the kernel's behaviour, checked against what its source says: a
        // guest that hangs by design is killed, not failed.
        let _ = exit;
        return Ok(crate::ite::check(
            kernel,
            &files,
            &out,
            &facts,
            driven,
            unpacked,
            itewatch.is_some(),
        ));
    }
    let verdict = driven.with_context(|| {
        format!(
            "guest outputs (if any) in {}; console tail:\n{}",
            out.display(),
            qemu::tail(&g.serial_text(), 40)
        )
    })?;
    exit?;
    if verdict != format!("{VERDICT} success") {
        bail!(
            "guest verdict {verdict:?}; guest outputs in {}:\n{}",
            out.display(),
            qemu::tail(&g.serial_text(), 40)
        );
    }
    unpacked?;
    Ok(assert::check_run(kernel, &out, &facts, itewatch.is_some()))
}

/// Drives the guest through its stages; returns the verdict line.
fn drive(g: &mut Guest, files: &Files, facts: &mut RunFacts, deadline: Instant) -> Result<String> {
    let mut qmp = Qmp::connect(
        &files.qmp(),
        (Instant::now() + Duration::from_secs(30)).min(deadline),
    )?;
    let stage = |s: &str| format!("{STAGE} {s}");
    let at = |g: &Guest, facts: &mut RunFacts, s: &'static str| {
        facts.stage_s.push((s, g.started.elapsed().as_secs_f64()))
    };
    for s in ["booted", "recording", "dma-running"] {
        wait_marker(g, &stage(s), deadline)?;
        at(g, facts, s);
    }
    // Safe removal: QMP device_del presses the slot's attention button.
    let qdl = (Instant::now() + Duration::from_secs(10)).min(deadline);
    qmp.execute("device_del", json!({ "id": qemu::SAFE_ID }), qdl)?;
    facts.safe_deleted = qmp
        .wait_event(deadline, |v| qmp::is_device_deleted(v, qemu::SAFE_ID))?
        .is_some();
    at(g, facts, "safe DEVICE_DELETED");
    for s in ["safe-removed", "surprise-removed"] {
        wait_marker(g, &stage(s), deadline)?;
        at(g, facts, s);
    }
    let qdl = (Instant::now() + Duration::from_secs(10)).min(deadline);
    facts.surprise_deleted = qmp
        .wait_event(qdl, |v| qmp::is_device_deleted(v, qemu::SURPRISE_ID))?
        .is_some();
    let text = wait_marker(g, &format!("{VERDICT} "), deadline)?;
    at(g, facts, "verdict");
    Ok(text
        .find(&format!("{VERDICT} "))
        .map(|i| text[i..].lines().next().unwrap_or("").to_string())
        .unwrap_or_default())
}

fn unpack_out(files: &Files, out: &Path) -> Result<()> {
    fs::create_dir_all(out)?;
    let st = Command::new("tar")
        .arg("xf")
        .arg(files.out_disk())
        .arg("-C")
        .arg(out)
        .status()
        .context("running tar")?;
    if !st.success() {
        bail!("could not unpack the guest's output disk");
    }
    Ok(())
}

/// Copies a passing run's trace, dmesg and doctor output into the test data.
fn save_traces(root: &Path, name: &str, out: &Path) -> Result<()> {
    let dst = root.join("itewatch/tests/data/vm").join(name);
    fs::create_dir_all(&dst)?;
    for f in ["trace.itw", "dmesg.txt", "doctor.json", "topology.txt"] {
        let src = out.join(f);
        if src.exists() {
            fs::copy(&src, dst.join(f)).with_context(|| format!("copying {f}"))?;
        }
    }
    eprintln!("vm-test: saved {name} outputs to {}", dst.display());
    Ok(())
}

/// The kernel's first oops or panic line when the guest never reached its init script's first
/// stage (`booted`): the boot died before any itewatch code ran.
fn died_before_init(serial: &Path) -> Option<String> {
    let log = fs::read(serial).ok()?;
    let log = String::from_utf8_lossy(&log);
    died_before_init_in(&log)
}

fn died_before_init_in(log: &str) -> Option<String> {
    if log.contains(&format!("{} booted", crate::guest::STAGE)) {
        return None;
    }
    log.lines()
        .find(|l| l.contains("Oops:") || l.contains("Kernel panic"))
        .map(|l| l.trim().to_string())
}

#[cfg(test)]
mod boot_retry_tests {
    use super::died_before_init_in;

    #[test]
    fn an_oops_before_the_first_stage_is_a_boot_death() {
        let log =
            "[    1.8] sched_clock: Marking stable\n[    1.85] Oops: int3: 0000 [#1] SMP NOPTI\n";
        assert_eq!(
            died_before_init_in(log).as_deref(),
            Some("[    1.85] Oops: int3: 0000 [#1] SMP NOPTI")
        );
    }

    #[test]
    fn an_oops_after_the_guest_booted_is_a_real_failure() {
        let log = "ITEWATCH-STAGE booted\n[   30.1] Oops: general protection fault\n";
        assert_eq!(died_before_init_in(log), None);
    }

    #[test]
    fn a_quiet_log_is_not_a_boot_death() {
        assert_eq!(died_before_init_in("[    1.0] Linux version 7.3.4\n"), None);
    }
}
