//! The QEMU command line (q35, intel-iommu with device-IOTLB and interrupt remapping, two
//! PCIe root ports with native hot-plug holding ATS-capable virtio disks, one output disk on
//! the root bus; in `removals` also a third root port holding a PCIe switch with an ATS disk
//! behind a downstream port without power controller, for preflight) and a running guest:
//! serial log watching with deadlines, kill on drop.

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// QEMU ids and slots of the hot-plug disks. Slot names in the guest come from `slot=`.
pub const SAFE_ID: &str = "vd1";
pub const SURPRISE_ID: &str = "vd2";
pub const SAFE_SLOT: &str = "1";
pub const SURPRISE_SLOT: &str = "2";
/// The output disk: on pcie.0 without iommu_platform (DMA not translated, no invalidations).
pub const OUT_ADDR: &str = "0x6";
pub const OUT_BDF: &str = "0000:00:06.0";
/// The switch card (scenario `removals`): root port `rp3` (slot 3, after the output disk, so
/// the other devices keep their bus numbers) holds an x3130 upstream port; its downstream port
/// (slot 4, `power_controller_present=off`: QEMU 7.2 hw/pci-bridge/xio3130_downstream.c, the
/// same property as pcie-root-port's) holds an ATS virtio disk.
pub const SWITCH_ADDR: &str = "0x7";
pub const SWITCH_SLOT: &str = "3";
pub const BEHIND_SWITCH_SLOT: &str = "4";
pub const BEHIND_SWITCH_ID: &str = "vd3";

/// `no_timer_check`: under TCG on a loaded host the boot-time check that the timer interrupt
/// arrives through the remapped IO-APIC can miss its window and panic the guest ("timer doesn't
/// work through Interrupt-remapped IO-APIC", seen on 6.1 at load 11); the timer works, only the
/// check is timing-sensitive.
pub const KERNEL_CMDLINE: &str =
    "console=ttyS0 intel_iommu=on iommu.strict=1 no_timer_check panic=-1 oops=panic rdinit=/init";

pub struct Files {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Which QEMU and which IOMMU model.
#[derive(Clone, Debug)]
pub struct QemuOpts {
    /// The emulator: Debian's `qemu-system-x86_64`, or the build with qemu-ite/*.patch.
    pub binary: PathBuf,
    /// A build of our own: point it at the firmware of the installed packages.
    pub firmware_dirs: bool,
    /// The console is cut off (QEMU killed) past this size (a guest in the ITE retry loop
    /// prints 10 KB/s with the matrix's 20 ms time-out, 700 KB/s with none).
    pub serial_cap_bytes: u64,
    /// `x-ite-on-absent-device=on`: device-TLB invalidations to absent devices time out,
    /// after this many microseconds.
    pub ite: Option<u32>,
    /// Add the switch card (root port slot 3, downstream slot 4 without power controller).
    pub switch: bool,
    /// Slot 1's disk is QEMU's `null-co` block driver of this many bytes (reads give zeros)
    /// instead of `disk1.raw`: a request completes in the vCPU thread that submitted it, with
    /// no host I/O and no wake-up of another host thread (vm-bench: the workload's time is
    /// then the guest's CPU work, not the host's I/O scheduling).
    pub null_disk1: Option<u64>,
}

impl QemuOpts {
    pub fn stock() -> QemuOpts {
        QemuOpts {
            binary: PathBuf::from("qemu-system-x86_64"),
            firmware_dirs: false,
            serial_cap_bytes: 48 << 20,
            ite: None,
            switch: false,
            null_disk1: None,
        }
    }
}

/// The IOMMU of `ite-surprise` (qemu-ite/README.md): device-TLB invalidations to absent
/// devices time out; the wait descriptor after one is aborted with ITE after `timeout_us`
/// (the matrix: 20 ms, the top of the PCIe completion time-out's default range, so a kernel
/// that retries does so about 50 times a second rather than as fast as the emulator runs).
pub fn ite_iommu(timeout_us: u32) -> String {
    format!(
        "intel-iommu,intremap=on,device-iotlb=on,x-ite-on-absent-device=on,x-ite-timeout-us={timeout_us}"
    )
}

impl Files {
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// The guest's second serial port (ttyS1): the interactive live view draws there, or (in
    /// `ite-surprise`) the agent writes its last-gasp lines.
    pub fn tui_screen(&self) -> PathBuf {
        self.dir.join("tui.screen")
    }
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// Every vCPU's registers, sampled when an `ite-surprise` guest gave no verdict.
    pub fn cpus_dump(&self) -> PathBuf {
        self.dir.join("cpus.txt")
    }
    pub fn out_disk(&self) -> PathBuf {
        self.dir.join("out.raw")
    }
    pub fn disk(&self, n: u32) -> PathBuf {
        self.dir.join(format!("disk{n}.raw"))
    }
}

pub fn command(f: &Files, q: &QemuOpts) -> Command {
    let mut c = Command::new(&q.binary);
    let d = |p: PathBuf| p.to_string_lossy().into_owned();
    if q.firmware_dirs {
        c.args(["-L", "/usr/share/seabios", "-L", "/usr/share/qemu"]);
    }
    let iommu = match q.ite {
        Some(us) => ite_iommu(us),
        None => "intel-iommu,intremap=on,device-iotlb=on".to_string(),
    };
    c.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
        .args(["-machine", "q35,kernel-irqchip=split", "-m", "1024", "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        // Keep hot-plug of the root ports native (pciehp), not ACPI.
        .args(["-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off"])
        .args(["-device", &iommu])
        .args(["-device", "pcie-root-port,id=rp1,bus=pcie.0,addr=0x4,chassis=1,slot=1"])
        .args(["-device", "pcie-root-port,id=rp2,bus=pcie.0,addr=0x5,chassis=2,slot=2"])
        .args([
            "-drive",
            &match q.null_disk1 {
                Some(size) => format!("if=none,id=d1,driver=null-co,size={size},read-zeroes=on"),
                None => format!("if=none,id=d1,file={},format=raw", d(f.disk(1))),
            },
        ])
        .args(["-drive", &format!("if=none,id=d2,file={},format=raw", d(f.disk(2)))])
        .args(["-drive", &format!("if=none,id=dout,file={},format=raw", d(f.out_disk()))])
        .args([
            "-device",
            &format!(
                "virtio-blk-pci,id={SAFE_ID},bus=rp1,drive=d1,disable-legacy=on,iommu_platform=on,ats=on"
            ),
        ])
        .args([
            "-device",
            &format!(
                "virtio-blk-pci,id={SURPRISE_ID},bus=rp2,drive=d2,disable-legacy=on,iommu_platform=on,ats=on"
            ),
        ])
        .args([
            "-device",
            &format!("virtio-blk-pci,id=vout,bus=pcie.0,addr={OUT_ADDR},drive=dout,disable-legacy=on"),
        ])
        .arg("-kernel")
        .arg(&f.kernel)
        .arg("-initrd")
        .arg(&f.initrd)
        .args(["-append", KERNEL_CMDLINE])
        .args(["-serial", &format!("file:{}", d(f.serial()))])
        .args(["-serial", &format!("file:{}", d(f.tui_screen()))])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", d(f.qmp()))]);
    if q.switch {
        c.args([
            "-device",
            &format!(
                "pcie-root-port,id=rp3,bus=pcie.0,addr={SWITCH_ADDR},chassis=3,slot={SWITCH_SLOT}"
            ),
        ])
        .args(["-device", "x3130-upstream,id=up3,bus=rp3"])
        .args([
            "-device",
            &format!(
                "xio3130-downstream,id=dn4,bus=up3,chassis=4,slot={BEHIND_SWITCH_SLOT},power_controller_present=off"
            ),
        ])
        .args(["-drive", &format!("if=none,id=d3,file={},format=raw", d(f.disk(3)))])
        .args([
            "-device",
            &format!(
                "virtio-blk-pci,id={BEHIND_SWITCH_ID},bus=dn4,drive=d3,disable-legacy=on,iommu_platform=on,ats=on"
            ),
        ]);
    }
    c
}

/// Creates a sparse raw disk of `size_bytes`, filled with a pattern in its first MiB so reads
/// are not all zeros (not that QEMU cares).
pub fn make_disk(path: &Path, size_bytes: u64) -> Result<()> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size_bytes)?;
    Ok(())
}

/// A running guest. Killed on drop.
pub struct Guest {
    child: Child,
    serial: PathBuf,
    /// The console so far (read incrementally: a storm can make it tens of MB).
    text: String,
    read_bytes: u64,
    cap_bytes: u64,
    pub started: Instant,
}

impl Guest {
    pub fn spawn(f: &Files, q: &QemuOpts) -> Result<Guest> {
        let _ = fs::remove_file(f.qmp());
        let _ = fs::remove_file(f.serial());
        let _ = fs::remove_file(f.tui_screen());
        let log = File::create(f.dir.join("qemu.log"))?;
        let mut cmd = command(f, q);
        fs::write(f.dir.join("qemu.cmdline"), format!("{cmd:?}\n"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| {
                format!(
                    "starting {} (install it: scripts/setup.sh)",
                    q.binary.display()
                )
            })?;
        Ok(Guest {
            child,
            serial: f.serial(),
            text: String::new(),
            read_bytes: 0,
            cap_bytes: q.serial_cap_bytes,
            started: Instant::now(),
        })
    }

    /// Reads what the console printed since the last call; kills QEMU past its cap. Returns the offset in `console()` where the new text starts.
    pub fn poll_serial(&mut self) -> usize {
        let before = self.text.len();
        if let Ok(mut f) = File::open(&self.serial) {
            if f.seek(SeekFrom::Start(self.read_bytes)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    // Keep a partial UTF-8 sequence at the end for the next read.
                    let valid = match std::str::from_utf8(&buf) {
                        Ok(_) => buf.len(),
                        Err(e) if e.error_len().is_none() => e.valid_up_to(),
                        Err(_) => buf.len(),
                    };
                    self.text.push_str(&String::from_utf8_lossy(&buf[..valid]));
                    self.read_bytes += valid as u64;
                    let _ = n;
                }
            }
        }
        if self.read_bytes > self.cap_bytes {
            self.kill();
        }
        before
    }

    /// The console so far (call `poll_serial` first).
    pub fn console(&self) -> &str {
        &self.text
    }

    pub fn serial_text(&mut self) -> String {
        self.poll_serial();
        self.text.clone()
    }

    /// Whether the console reached its size cap (QEMU was then killed).
    pub fn serial_capped(&self) -> bool {
        self.read_bytes > self.cap_bytes
    }

    pub fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Whether QEMU has exited (and with what status).
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits until the serial log contains `needle` (returns the log), QEMU exits, or the
    /// deadline passes (both errors carry the log tail).
    pub fn wait_serial(&mut self, needle: &str, deadline: Instant) -> Result<String> {
        let mut from = 0;
        loop {
            self.poll_serial();
            if self.text[from..].contains(needle) {
                return Ok(self.text.clone());
            }
            // Only the new text (and a needle's length before it) is searched next time.
            from = floor_char_boundary(&self.text, self.text.len().saturating_sub(needle.len()));
            let text = &self.text;
            if let Some(st) = self.child.try_wait()? {
                bail!(
                    "QEMU exited ({st}) before {needle:?} appeared on the console:\n{}",
                    tail(text, 40)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {:.0} s waiting for {needle:?} on the console:\n{}",
                    self.started.elapsed().as_secs_f64(),
                    tail(text, 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for QEMU to exit by itself until `deadline`, then kills it.
    pub fn wait_exit(&mut self, deadline: Instant) -> Result<std::process::ExitStatus> {
        loop {
            if let Some(st) = self.exited()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("QEMU did not power off in time; killed");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.kill();
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// The last `n` lines of a log.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
