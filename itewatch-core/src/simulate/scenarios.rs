//! The scenarios of the ITE thread (docs/scenarios.md has each one's diagram). Each builds
//! its event stream on a [`World`] and says which incidents a correct correlator must report:
//! the ground truth comes from the scenario's own story, not from the correlator.

use crate::correlate::incident::IncidentKind;
use crate::event::{Bdf, KTime, Payload, Sid, SubmitReturn};

use super::world::{stacks, DevWhat, Kernel, SimDevice, World, MS, US};
use super::Expected;

/// Name, one-line description.
pub const SCENARIOS: &[(&str, &str)] = &[
    (
        "w1-driver-inflight",
        "W1 / case 1: a driver's device-TLB invalidation (CPU0) is in flight when pciehp (CPU1) disconnects the device; aborted with -ETIMEDOUT (6.12), completed late or never returns (6.1)",
    ),
    (
        "w2-notifier-after-disconnect",
        "W2 / case 2: surprise removal, then iommu_release_device's device-TLB flushes to the disconnected device; completed (as in QEMU: latent), aborted (6.12) or hung (6.1)",
    ),
    (
        "w3-safe-removal-link-down",
        "W3 / case 3: safe removal (attention button); the link goes down while the removal's flush waits: aborted, slow, completed late or hung",
    ),
    (
        "hang-no-hotplug",
        "a driver invalidation that stops answering with no hot-plug at all: returns after >100 ms or never (with or without ITE reports)",
    ),
    (
        "hang-then-hotplug",
        "a hung driver invalidation, then a surprise removal of its device: the hung incident is re-attributed to W1",
    ),
    (
        "ite-sid-zero",
        "an ITE reported with SID 0 (hardware gave none) while one device-TLB invalidation is in flight; it completes after the retry loop",
    ),
    (
        "benign",
        "DMA unmap traffic on five devices behind two IOMMUs, lazy-mode flushes, a safe removal whose flushes complete and a hot-add: no incident",
    ),
    (
        "thread-zero-two-cpus",
        "interrupts taken while idle run as thread 0 on two CPUs at once; either CPU's invalidation may take >100 ms (the second's outliving the first's): no return is lost or mispaired",
    ),
    (
        "nested-interrupt",
        "an interrupt's unmap nests on a thread's device-TLB submission before it takes the queue lock; the inner returns first, the outer fast or after >100 ms",
    ),
    (
        "bystander-etimedout",
        "6.12: a removal flush to a surprise-removed device times out; a healthy device's submission stalled behind it on the same IOMMU gets the -ETIMEDOUT: only the gone device is blamed",
    ),
    (
        "mixed-health-batch",
        "6.12: one batch invalidates a surprise-removed device and a healthy one sharing its domain; the ITE names the gone one: only it is blamed",
    ),
    (
        "multi-segment",
        "W2 on segment 0 while a device at the same bus:devfn on segment 1 (another IOMMU, segment sometimes unread) keeps working: only segment 0's device is flagged",
    ),
    (
        "vf-behind-pf",
        "surprise removal of an SR-IOV PF: its VF (pfsid = the PF's SID; sysfs snapshot or not) goes first, then the PF; both get device-TLB flushes after the disconnect",
    ),
    (
        "late-records",
        "6.1 W1 that hangs, with pciehp's records (the disconnect) delivered 250-600 ms late, beyond the reorder window: the incidents open then are partial",
    ),
];

fn exp(kind: IncidentKind, sid: Option<Sid>) -> Expected {
    Expected {
        kind,
        sid,
        segment: None,
    }
}

fn pick(w: &mut World, from: &[usize]) -> usize {
    from[w.rng.below(from.len() as u64) as usize]
}

fn ats_devices(w: &World) -> Vec<usize> {
    (0..w.devices.len()).filter(|i| w.devices[*i].ats).collect()
}

fn all(w: &World) -> Vec<usize> {
    (0..w.devices.len()).collect()
}

fn others(w: &World, d: usize) -> Vec<usize> {
    (0..w.devices.len()).filter(|i| *i != d).collect()
}

fn ret_at(w: &mut World, ts: u64, cpu: u32, dev: usize, tid: u32, ret: i64, start: u64) {
    let comm = w.devices[dev].comm;
    w.ev(
        ts,
        cpu,
        tid,
        comm,
        Payload::SubmitReturn(SubmitReturn {
            ret,
            start: Some(KTime(start)),
        }),
    );
}

/// A benign unmap on some other device at exactly `end`, so the stream lasts until then.
fn last_event(w: &mut World, end: u64, not: usize, avoid_cpu: u32) {
    let cpu = w.cpu_except(avoid_cpu);
    let cand: Vec<usize> = others(w, not)
        .into_iter()
        .filter(|i| w.is_alive(*i, end, 100 * US))
        .collect();
    match cand.first() {
        Some(&i) => {
            let tid = w.devices[i].tid * 10 + 7;
            let comm = w.devices[i].comm;
            w.driver_unmap(end, cpu, tid, comm, i, Some((5 * US, 0)));
        }
        None => w.log(end, cpu, 1, "systemd", "pciehp: end of run".to_string()),
    }
}

/// ITE blocks from `from` every `gap` until before `until` (at most `max`). Returns how many.
#[allow(clippy::too_many_arguments)]
fn ite_blocks(
    w: &mut World,
    from: u64,
    until: u64,
    gap: (u64, u64),
    max: usize,
    cpu: u32,
    dev: usize,
    sid: Option<Sid>,
) -> usize {
    let d = w.devices[dev].clone();
    let qw0 = d.devtlb(0, 52).qw0;
    let mut t = from;
    let mut n = 0;
    while t + 5 * US < until && n < max {
        w.ite_block(t, cpu, d.tid, d.comm, sid, qw0);
        n += 1;
        t += w.rng.range(gap.0, gap.1);
    }
    n
}

/// The pciehp side of a surprise removal of slot `s` (device `d`) starting at `t`: returns
/// the time the device's removal (driver unbind) starts.
fn surprise_prefix(w: &mut World, t: u64, cpu: u32, s: usize, d: usize) -> u64 {
    w.ist(t, cpu, s);
    w.pciehp_log(t + 2 * US, cpu, s, "Link Down");
    w.pciehp_log(t + 3 * US, cpu, s, "Card not present");
    w.unconfigure(t + 30 * US, cpu, s, false);
    w.walk(t + 40 * US, cpu, s);
    if w.kernel == Kernel::V6_12 {
        w.dev_event(t + 45 * US, cpu, s, d, DevWhat::Disconnected);
    }
    w.dev_event(t + 60 * US, cpu, s, d, DevWhat::Remove);
    t + 60 * US
}

/// W1: the thread's CPU0/CPU1 interleaving.
pub fn w1_driver_inflight(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let d = w.rng.below(3) as usize;
    let s = w.devices[d].slot.unwrap_or(0);
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    let everyone = all(w);
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    // pciehp's irq thread runs on the CPU its interrupt is affine to; the driver elsewhere.
    let cpu1 = w.ist_cpu(s);
    let cpu0 = w.cpu_except(cpu1);
    w.rng.next_u64(); // (the draw that picked pciehp's CPU before it was pinned)
                      // CPU0: the driver's unmap; its device-TLB submission does not return by itself.
    let sub = w.driver_unmap(t1, cpu0, dd.tid, dd.comm, d, None);
    // CPU1: pciehp disconnects the device while it is in flight.
    let t_ist = sub + w.rng.range(5 * US, 500 * US);
    let t_rm = surprise_prefix(w, t_ist, cpu1, s, d);
    let mut expected = vec![
        exp(IncidentKind::InflightAcrossDisconnect, sid),
        exp(IncidentKind::IteReported, sid),
    ];
    let variant;
    let end;
    match w.kernel {
        Kernel::V6_12 => {
            // 80a9b50c0b9e: the ITE handler finds the device not present and aborts.
            variant = "aborted";
            let t_ite = t_rm + w.rng.range(MS, 8 * MS);
            w.ite_block(t_ite, cpu0, dd.tid, dd.comm, sid, dd.devtlb(0, 0).qw0);
            let t_ret = t_ite + 5 * US;
            ret_at(w, t_ret, cpu0, d, dd.tid, -110, sub);
            let t_rel = t_ret + w.rng.range(20 * US, 200 * US);
            w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
            w.ist_return(t_rel + 50 * US, cpu1, s, t_ist);
            end = t_rel + w.rng.range(MS, 20 * MS);
        }
        Kernel::V6_1 => {
            if w.rng.chance(50) {
                // ITE, -EAGAIN, restart .. until the device (or something) answers.
                let long = w.rng.chance(50);
                let lat = if long {
                    w.rng.range(150 * MS, 800 * MS)
                } else {
                    w.rng.range(20 * MS, 80 * MS)
                };
                variant = if long { "late-long" } else { "late" };
                if long {
                    expected.push(exp(IncidentKind::HungInvalidation, sid));
                }
                let first = t_rm + w.rng.range(MS, 8 * MS);
                ite_blocks(w, first, sub + lat, (5 * MS, 40 * MS), 12, cpu0, d, sid);
                ret_at(w, sub + lat, cpu0, d, dd.tid, 0, sub);
                let t_rel = sub + lat + w.rng.range(20 * US, 200 * US);
                w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
                w.ist_return(t_rel + 50 * US, cpu1, s, t_ist);
                end = t_rel + w.rng.range(MS, 20 * MS);
            } else {
                // Retries forever with IRQs off: the trace ends before any return.
                variant = "hang";
                expected.push(exp(IncidentKind::HungInvalidation, sid));
                end = sub + w.rng.range(1200 * MS, 3000 * MS);
                let first = t_rm + w.rng.range(MS, 8 * MS);
                ite_blocks(w, first, end, (50 * MS, 150 * MS), 30, cpu0, d, sid);
            }
        }
    }
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu0));
    last_event(w, end, d, cpu0);
    (format!("{} {variant}", w.kernel.name()), expected)
}

/// W2: the bus-notifier flush after a surprise removal.
pub fn w2_notifier_after_disconnect(w: &mut World) -> (String, Vec<Expected>) {
    let d = w.rng.below(3) as usize;
    w2_removal_of(w, d, None)
}

/// W2 for device `d`; `twin` (a device elsewhere that stays healthy) gets traffic all along.
fn w2_removal_of(w: &mut World, d: usize, twin: Option<usize>) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let s = w.devices[d].slot.unwrap_or(0);
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    let t_rm = surprise_prefix(w, t1, cpu1, s, d);
    // The driver unbinds (no invalidation in flight), then BUS_NOTIFY_REMOVED_DEVICE.
    let t_rel = t_rm + w.rng.range(100 * US, 5 * MS);
    w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
    let mut expected = vec![exp(IncidentKind::FlushToGoneDevice, sid)];
    let roll = w.rng.below(3);
    let (variant, end) = if roll == 0 || (roll == 1 && w.kernel == Kernel::V6_1) {
        // What the QEMU guests did: the flushes complete (latent).
        let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, d, 2, |w, _, _| {
            Some((w.rng.range(3 * US, 40 * US), 0))
        });
        w.ist_return(after + 30 * US, cpu1, s, t1);
        ("completed", after + w.rng.range(MS, 20 * MS))
    } else if w.kernel == Kernel::V6_12 {
        // 6.12: ITE, the device is gone from the rbtree: -ETIMEDOUT, twice.
        expected.push(exp(IncidentKind::IteReported, sid));
        let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, d, 2, |w, _, t| {
            let hw = w.rng.range(MS, 8 * MS);
            let d = w.devices[d].clone();
            let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
            w.ite_block(t + hw, cpu1, tid, &comm, Some(d.sid()), d.devtlb(0, 52).qw0);
            Some((hw + 10 * US, -110))
        });
        w.ist_return(after + 30 * US, cpu1, s, t1);
        ("aborted", after + w.rng.range(MS, 20 * MS))
    } else {
        // 6.1 on real hardware: ITE, retry, forever (the hard lockup of the thread).
        expected.push(exp(IncidentKind::IteReported, sid));
        expected.push(exp(IncidentKind::HungInvalidation, sid));
        let sub = w.removal_flushes(t_rel + 20 * US, cpu1, s, d, 1, |_, _, _| None);
        let end = sub + w.rng.range(1200 * MS, 3000 * MS);
        let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
        let qw0 = dd.devtlb(0, 52).qw0;
        let mut t = sub + w.rng.range(MS, 8 * MS);
        let mut k = 0;
        while t < end && k < 30 {
            w.ite_block(t, cpu1, tid, &comm, sid, qw0);
            t += w.rng.range(50 * MS, 150 * MS);
            k += 1;
        }
        ("hang", end)
    };
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu1));
    if let Some(twin) = twin {
        let n = w.rng.range(20, 60) as usize;
        w.noise(t0, end, n, &[twin], Some(cpu1));
    }
    last_event(w, end, d, cpu1);
    (format!("{} {variant}", w.kernel.name()), expected)
}

/// W3: safe removal, link down while the removal's flush waits.
pub fn w3_safe_removal_link_down(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let d = w.rng.below(3) as usize;
    let s = w.devices[d].slot.unwrap_or(0);
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    // pciehp waits 5 s for a second press; compressed here.
    let t_ist = t1 + w.rng.range(50 * MS, 500 * MS);
    w.kill(d, t_ist - 200 * US);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    w.pciehp_log(t1, cpu1, s, "Attention button pressed");
    w.pciehp_log(t1 + 10 * US, cpu1, s, "Powering off due to button press");
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, t_ist, n, &everyone, None);
    w.ist(t_ist, cpu1, s);
    w.unconfigure(t_ist + 30 * US, cpu1, s, true);
    w.dev_event(t_ist + 50 * US, cpu1, s, d, DevWhat::Remove);
    // The driver's remove() unmaps its buffers on the pciehp thread: fast, benign.
    let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
    let mut t = t_ist + 80 * US;
    for _ in 0..w.rng.range(0, 2) {
        let lat = w.rng.range(2 * US, 20 * US);
        w.driver_unmap(t, cpu1, tid, &comm, d, Some((lat, 0)));
        t += 40 * US;
    }
    let t_rel = t + w.rng.range(200 * US, 3 * MS);
    w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
    let t_down = t_rel + w.rng.range(5 * US, 50 * US);
    w.pciehp_log(t_down, cpu1, s, "Link Down");
    let start = t_rel + 60 * US;
    let mut expected = vec![exp(IncidentKind::SafeRemovalFlushTimeout, sid)];
    let roll = w.rng.below(4);
    let qw0 = dd.devtlb(0, 52).qw0;
    let (variant, end) = match (roll, w.kernel) {
        (0, Kernel::V6_12) | (1, Kernel::V6_12) => {
            // 6.12: the link is down, pci_device_is_present() fails: -ETIMEDOUT.
            expected.push(exp(IncidentKind::IteReported, sid));
            let after = w.removal_flushes(start, cpu1, s, d, 2, |w, _, t| {
                let hw = w.rng.range(MS, 8 * MS);
                let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
                w.ite_block(t + hw, cpu1, tid, &comm, sid, qw0);
                Some((hw + 10 * US, -110))
            });
            w.ist_return(after + 30 * US, cpu1, s, t_ist);
            ("aborted", after + w.rng.range(MS, 20 * MS))
        }
        (0, Kernel::V6_1) | (1, Kernel::V6_1) => {
            expected.push(exp(IncidentKind::IteReported, sid));
            let long = w.rng.chance(50);
            if long {
                expected.push(exp(IncidentKind::HungInvalidation, sid));
            }
            let lat = if long {
                w.rng.range(150 * MS, 800 * MS)
            } else {
                w.rng.range(20 * MS, 80 * MS)
            };
            let after = w.removal_flushes(start, cpu1, s, d, 1, |w, _, t| {
                let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
                let mut ti = t + w.rng.range(MS, 8 * MS);
                let mut k = 0;
                while ti + 10 * US < t + lat && k < 12 {
                    w.ite_block(ti, cpu1, tid, &comm, sid, qw0);
                    ti += w.rng.range(5 * MS, 40 * MS);
                    k += 1;
                }
                Some((lat, 0))
            });
            w.ist_return(after + 30 * US, cpu1, s, t_ist);
            (
                if long { "late-long" } else { "late" },
                after + w.rng.range(MS, 20 * MS),
            )
        }
        (2, _) => {
            // Slow but no time-out reported.
            let n = w.rng.range(1, 2) as usize;
            let after = w.removal_flushes(start, cpu1, s, d, n, |w, _, _| {
                Some((w.rng.range(15 * MS, 80 * MS), 0))
            });
            w.ist_return(after + 30 * US, cpu1, s, t_ist);
            ("slow", after + w.rng.range(MS, 20 * MS))
        }
        _ => {
            // Never returns (6.1 retry loop, or 6.12 with SID-less hardware).
            expected.push(exp(IncidentKind::IteReported, sid));
            expected.push(exp(IncidentKind::HungInvalidation, sid));
            let sub = w.removal_flushes(start, cpu1, s, d, 1, |_, _, _| None);
            let end = sub + w.rng.range(1200 * MS, 3000 * MS);
            let mut ti = sub + w.rng.range(MS, 8 * MS);
            let mut k = 0;
            while ti < end && k < 30 {
                w.ite_block(ti, cpu1, tid, &comm, sid, qw0);
                ti += w.rng.range(50 * MS, 150 * MS);
                k += 1;
            }
            ("hang", end)
        }
    };
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t_ist, end, n, &rest, Some(cpu1));
    last_event(w, end, d, cpu1);
    (format!("{} {variant}", w.kernel.name()), expected)
}

/// A hung driver invalidation with no hot-plug.
pub fn hang_no_hotplug(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let d = w.rng.below(w.devices.len() as u64) as usize;
    let dd = w.devices[d].clone();
    let sid = dd.ats.then(|| dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu0 = w.cpu();
    let sub = w.driver_unmap(t1, cpu0, dd.tid, dd.comm, d, None);
    let mut expected = vec![exp(IncidentKind::HungInvalidation, sid)];
    let ite = dd.ats && w.rng.chance(60);
    if ite {
        expected.push(exp(IncidentKind::IteReported, sid));
    }
    let stuck = w.rng.chance(50);
    let end = if stuck {
        let end = sub + w.rng.range(1200 * MS, 3000 * MS);
        if ite {
            let first = sub + w.rng.range(MS, 8 * MS);
            ite_blocks(w, first, end, (50 * MS, 150 * MS), 30, cpu0, d, sid);
        }
        end
    } else {
        let lat = w.rng.range(150 * MS, 800 * MS);
        if ite {
            let first = sub + w.rng.range(MS, 8 * MS);
            ite_blocks(w, first, sub + lat, (20 * MS, 60 * MS), 12, cpu0, d, sid);
        }
        ret_at(w, sub + lat, cpu0, d, dd.tid, 0, sub);
        sub + lat + w.rng.range(MS, 20 * MS)
    };
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu0));
    last_event(w, end, d, cpu0);
    let variant = format!(
        "{} {}{}",
        w.kernel.name(),
        if stuck { "stuck" } else { "late" },
        if ite { " ite" } else { "" }
    );
    (variant, expected)
}

/// A hung driver invalidation, then its device is surprise-removed.
pub fn hang_then_hotplug(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let d = w.rng.below(3) as usize;
    let s = w.devices[d].slot.unwrap_or(0);
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    // pciehp's irq thread runs on the CPU its interrupt is affine to; the driver elsewhere.
    let cpu1 = w.ist_cpu(s);
    let cpu0 = w.cpu_except(cpu1);
    let sub = w.driver_unmap(t1, cpu0, dd.tid, dd.comm, d, None);
    let t_ist = sub + w.rng.range(200 * MS, 600 * MS);
    if w.rng.chance(50) {
        // The device is present but does not answer: ITE and retry (on every kernel).
        let first = sub + w.rng.range(MS, 8 * MS);
        ite_blocks(w, first, t_ist, (20 * MS, 60 * MS), 12, cpu0, d, sid);
    }
    let t_rm = surprise_prefix(w, t_ist, cpu1, s, d);
    let expected = vec![
        exp(IncidentKind::HungInvalidation, sid),
        exp(IncidentKind::InflightAcrossDisconnect, sid),
        exp(IncidentKind::IteReported, sid),
    ];
    let qw0 = dd.devtlb(0, 0).qw0;
    let (variant, end) = match w.kernel {
        Kernel::V6_12 => {
            let t_ite = t_rm + w.rng.range(MS, 8 * MS);
            w.ite_block(t_ite, cpu0, dd.tid, dd.comm, sid, qw0);
            ret_at(w, t_ite + 5 * US, cpu0, d, dd.tid, -110, sub);
            let t_rel = t_ite + w.rng.range(20 * US, 200 * US);
            w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
            w.ist_return(t_rel + 50 * US, cpu1, s, t_ist);
            ("aborted after disconnect", t_rel + w.rng.range(MS, 20 * MS))
        }
        Kernel::V6_1 => {
            let end = sub + w.rng.range(1200 * MS, 3000 * MS);
            let first = t_rm + w.rng.range(MS, 8 * MS);
            ite_blocks(w, first, end, (50 * MS, 150 * MS), 30, cpu0, d, sid);
            ("hang", end)
        }
    };
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu0));
    last_event(w, end, d, cpu0);
    (format!("{} {variant}", w.kernel.name()), expected)
}

/// An ITE with SID 0 while one device-TLB invalidation is in flight.
pub fn ite_sid_zero(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let ats: Vec<usize> = (0..w.devices.len()).filter(|i| w.devices[*i].ats).collect();
    let d = ats[w.rng.below(ats.len() as u64) as usize];
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu0 = w.cpu();
    let sub = w.driver_unmap(t1, cpu0, dd.tid, dd.comm, d, None);
    let long = w.rng.chance(50);
    let lat = if long {
        w.rng.range(150 * MS, 800 * MS)
    } else {
        w.rng.range(20 * MS, 80 * MS)
    };
    let mut expected = vec![exp(IncidentKind::IteReported, sid)];
    if long {
        expected.push(exp(IncidentKind::HungInvalidation, sid));
    }
    let first = sub + w.rng.range(2 * MS, 8 * MS);
    let k = ite_blocks(w, first, sub + lat, (2 * MS, 15 * MS), 5, cpu0, d, None);
    debug_assert!(k >= 1);
    ret_at(w, sub + lat, cpu0, d, dd.tid, 0, sub);
    let end = sub + lat + w.rng.range(MS, 20 * MS);
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu0));
    last_event(w, end, d, cpu0);
    (
        format!(
            "{} {}",
            w.kernel.name(),
            if long { "late-long" } else { "late" }
        ),
        expected,
    )
}

/// Benign traffic, a safe removal whose flushes complete, maybe a hot-add.
pub fn benign(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let end = t0 + w.rng.range(20 * MS, 200 * MS);
    let everyone = all(w);
    let mut variant = format!("{} traffic", w.kernel.name());
    if w.rng.chance(50) {
        let d = w.rng.below(3) as usize;
        let s = w.devices[d].slot.unwrap_or(0);
        let cpu1 = w.ist_cpu(s);
        let t1 = t0 + w.rng.range(5 * MS, 15 * MS);
        w.pciehp_log(t1, cpu1, s, "Attention button pressed");
        let t_ist = t1 + w.rng.range(5 * MS, 10 * MS);
        w.kill(d, t_ist - 200 * US);
        w.ist(t_ist, cpu1, s);
        w.unconfigure(t_ist + 30 * US, cpu1, s, true);
        w.dev_event(t_ist + 50 * US, cpu1, s, d, DevWhat::Remove);
        let (tid, comm) = (w.slots[s].ist_tid, w.ist_comm(s));
        let lat = w.rng.range(2 * US, 20 * US);
        w.driver_unmap(t_ist + 80 * US, cpu1, tid, &comm, d, Some((lat, 0)));
        let t_rel = t_ist + w.rng.range(200 * US, 3 * MS);
        w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
        let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, d, 2, |w, _, _| {
            Some((w.rng.range(3 * US, 40 * US), 0))
        });
        w.ist_return(after + 30 * US, cpu1, s, t_ist);
        variant.push_str(" + safe removal");
        if w.rng.chance(50) {
            // Hot-add: pciehp enables the slot, the device comes back.
            let t_add = after + w.rng.range(2 * MS, 5 * MS);
            w.ist(t_add, cpu1, s);
            w.pciehp_log(t_add + 2 * US, cpu1, s, "Card present");
            w.pciehp_log(t_add + 5 * US, cpu1, s, "Link Up");
            w.ist_return(t_add + 900 * US, cpu1, s, t_add);
            w.device_snapshot(d, t_add + MS);
            w.alive[d].push((t_add + 2 * MS, u64::MAX));
            variant.push_str(" + hot-add");
        }
    }
    let n = w.rng.range(30, 120) as usize;
    w.noise(t0, end, n, &everyone, None);
    last_event(w, end, usize::MAX, u32::MAX);
    (variant, Vec::new())
}

/// Interrupts (and softirqs) taken while a CPU is idle run as thread 0, the idle task, on
/// every CPU: CPU a's invalidation is in flight while CPU b runs its own.
pub fn thread_zero_two_cpus(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let ats = ats_devices(w);
    let d = pick(w, &ats);
    let dd = w.devices[d].clone();
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let ca = w.cpu();
    let cb = w.cpu_except(ca);
    // 0: both fast; 1: CPU a's is slow; 2: CPU b's, issued after a's, is slow (a's returns
    // first: paired by thread alone, a's return would close b's submission).
    let mode = w.rng.below(3);
    let lat = if mode == 1 {
        w.rng.range(150 * MS, 800 * MS)
    } else {
        w.rng.range(40 * US, 80 * US)
    };
    // CPU a, idle, takes d's completion interrupt: the unmap runs as thread 0.
    let sub = w.driver_unmap(t1, ca, 0, "swapper/0", d, Some((lat, 0)));
    // CPU b, idle too, takes other devices' interrupts meanwhile: thread 0 as well.
    let rest = others(w, d);
    let mut expected = Vec::new();
    let mut last = sub + lat;
    if mode == 2 {
        let e = pick(w, &rest);
        let t_b = sub + w.rng.range(2 * US, 10 * US);
        w.kill(e, t_b - 200 * US);
        let lat_b = w.rng.range(150 * MS, 800 * MS);
        let s_b = w.driver_unmap(t_b, cb, 0, "swapper/0", e, Some((lat_b, 0)));
        last = s_b + lat_b;
        let ed = &w.devices[e];
        expected.push(exp(
            IncidentKind::HungInvalidation,
            ed.ats.then(|| ed.sid()),
        ));
    } else {
        let k = w.rng.range(1, 4);
        let mut t = sub + w.rng.range(2 * US, 10 * US);
        for i in 0..k {
            if i > 0 && t + 20 * US >= sub + lat {
                break;
            }
            let e = pick(w, &rest);
            let l = w.rng.range(2 * US, 8 * US);
            w.driver_unmap(t, cb, 0, "swapper/0", e, Some((l, 0)));
            t += w.rng.range(20 * US, (lat / 4).max(21 * US));
        }
        if mode == 1 {
            expected.push(exp(IncidentKind::HungInvalidation, Some(dd.sid())));
        }
    }
    let end = last + w.rng.range(MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    // Busy with interrupts (with them off while spinning): no task runs on either meanwhile.
    w.noise_avoiding(t1, end, n, &rest, &[ca, cb]);
    last_event(w, end, d, ca);
    let variant = ["fast", "first slow", "second slow"][mode as usize];
    (format!("{} {variant}", w.kernel.name()), expected)
}

/// An interrupt taken between a submission's probe and its queue lock submits on the same
/// thread: nested, it returns first.
pub fn nested_interrupt(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let ats = ats_devices(w);
    let d = pick(w, &ats);
    let dd = w.devices[d].clone();
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let c = w.cpu();
    let slow = w.rng.chance(50);
    // The outer: d's unmap on its driver's thread.
    let sub = w.driver_unmap(t1, c, dd.tid, dd.comm, d, None);
    // The inner: another device's completion interrupt, on the same thread and CPU.
    let rest = others(w, d);
    let e = pick(w, &rest);
    let t_in = sub + w.rng.range(200, 1_000);
    let lat_in = w.rng.range(2 * US, 10 * US);
    let inner = w.driver_unmap(t_in, c, dd.tid, dd.comm, e, Some((lat_in, 0)));
    let own = if slow {
        w.rng.range(150 * MS, 800 * MS)
    } else {
        w.rng.range(3 * US, 20 * US)
    };
    let t_ret = inner + lat_in + own;
    ret_at(w, t_ret, c, d, dd.tid, 0, sub);
    let mut expected = Vec::new();
    if slow {
        expected.push(exp(IncidentKind::HungInvalidation, Some(dd.sid())));
    }
    let end = t_ret + w.rng.range(MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(c));
    last_event(w, end, d, c);
    let variant = format!("{} {}", w.kernel.name(), if slow { "slow" } else { "fast" });
    (variant, expected)
}

/// 6.12: the removal's flush to a gone device times out; a healthy device's submission on the
/// same IOMMU, stalled behind it, is the one whose CPU handles the ITE and gets -ETIMEDOUT.
pub fn bystander_etimedout(w: &mut World) -> (String, Vec<Expected>) {
    w.kernel = Kernel::V6_12;
    let t0 = w.t0;
    let d = w.rng.below(3) as usize;
    let y = pick(w, &others(w, d)[..2]);
    let s = w.devices[d].slot.unwrap_or(0);
    let (dd, yd) = (w.devices[d].clone(), w.devices[y].clone());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    let cpu_b = w.cpu_except(cpu1);
    let t_rm = surprise_prefix(w, t1, cpu1, s, d);
    let t_rel = t_rm + w.rng.range(100 * US, 5 * MS);
    w.dev_event(t_rel, cpu1, s, d, DevWhat::Release);
    // The console line may reach the log after the bystander's return.
    let printed_first = w.rng.chance(70);
    let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, d, 1, |w, _, t| {
        let hw = w.rng.range(MS, 8 * MS);
        let t_y = t + w.rng.range(50 * US, hw - 200 * US);
        let t_ite = t + hw;
        let t_b = if printed_first {
            t_ite + w.rng.range(4 * US, 20 * US)
        } else {
            t_ite + w.rng.range(200, 1_200)
        };
        w.driver_unmap(t_y, cpu_b, yd.tid, yd.comm, y, Some((t_b - t_y, -110)));
        w.ite_block(
            t_ite,
            cpu_b,
            yd.tid,
            yd.comm,
            Some(dd.sid()),
            dd.devtlb(0, 52).qw0,
        );
        Some((t_b - t + w.rng.range(2 * US, 10 * US), -110))
    });
    w.ist_return(after + 30 * US, cpu1, s, t1);
    let end = after + w.rng.range(MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    w.noise_avoiding(t1, end, n, &others(w, d), &[cpu1, cpu_b]);
    last_event(w, end, d, cpu1);
    let sid = Some(dd.sid());
    let expected = vec![
        exp(IncidentKind::FlushToGoneDevice, sid),
        exp(IncidentKind::IteReported, sid),
    ];
    let variant = format!(
        "6.12 aborted, bystander {}, report {}",
        yd.bdf,
        if printed_first {
            "first"
        } else {
            "after the return"
        }
    );
    (variant, expected)
}

/// 6.12: a gone device and a healthy one share a domain; one batch invalidates both.
pub fn mixed_health_batch(w: &mut World) -> (String, Vec<Expected>) {
    w.kernel = Kernel::V6_12;
    let t0 = w.t0;
    let x = w.rng.below(3) as usize;
    let y = pick(w, &others(w, x)[..2]);
    let s = w.devices[x].slot.unwrap_or(0);
    let (xd, yd) = (w.devices[x].clone(), w.devices[y].clone());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(x, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    let cpu_b = w.cpu_except(cpu1);
    let t_rm = surprise_prefix(w, t1, cpu1, s, x);
    // After the disconnect walk (t1 + 40 us), y's driver unmaps: cache_tag_flush_range
    // batches the domain's IOTLB and both devices' device-TLB invalidations.
    let t_b = t1 + 50 * US + w.rng.range(0, 2 * MS);
    let addr = 0xfff0_0000 + (w.rng.below(4096) << 12);
    let x_first = w.rng.chance(50);
    let (a, b) = (xd.devtlb(addr, 0), yd.devtlb(addr, 0));
    let descs = if x_first {
        [World::iotlb_desc(1 + y as u16), a, b]
    } else {
        [World::iotlb_desc(1 + y as u16), b, a]
    };
    let hw = w.rng.range(MS, 8 * MS);
    w.submission(
        t_b,
        cpu_b,
        yd.tid,
        yd.comm,
        yd.iommu,
        &descs,
        stacks::DRIVER_612,
        Some((hw + 5 * US, -110)),
    );
    w.ite_block(t_b + hw, cpu_b, yd.tid, yd.comm, Some(xd.sid()), a.qw0);
    // The release finds x disconnected: no device-TLB flush of its own (4fc82cd907ac).
    let t_rel = t_rm.max(t_b + hw + 5 * US) + w.rng.range(20 * US, 2 * MS);
    w.dev_event(t_rel, cpu1, s, x, DevWhat::Release);
    w.ist_return(t_rel + 50 * US, cpu1, s, t1);
    let end = t_rel + w.rng.range(MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &others(w, x), Some(cpu_b));
    last_event(w, end, x, cpu_b);
    let sid = Some(xd.sid());
    let expected = vec![
        exp(IncidentKind::FlushToGoneDevice, sid),
        exp(IncidentKind::IteReported, sid),
    ];
    let variant = format!(
        "6.12 aborted, batch {} + {} ({} first)",
        xd.bdf,
        yd.bdf,
        if x_first { "gone" } else { "healthy" }
    );
    (variant, expected)
}

/// W2 on segment 0 while segment 1 has a device at the same bus:devfn behind its own IOMMU.
pub fn multi_segment(w: &mut World) -> (String, Vec<Expected>) {
    let d = w.rng.below(3) as usize;
    // The probe cannot always read the unit's segment.
    let seg1 = if w.rng.chance(20) { None } else { Some(1) };
    let unit = w.add_iommu("dmar2", 0xffff_8882_0040_0000, seg1);
    let bdf = w.devices[d].bdf;
    let twin = SimDevice {
        bdf: Bdf {
            segment: Some(1),
            ..bdf
        },
        vendor: 0x8086,
        device: 0x0a54,
        driver: "nvme",
        slot: None,
        iommu: unit,
        ats: true,
        tid: 3106,
        comm: "fio",
        dev_ptr: 0,
        pf: None,
    };
    let twin = w.add_device(twin, true);
    let (variant, mut expected) = w2_removal_of(w, d, Some(twin));
    for e in &mut expected {
        e.segment = Some(0);
    }
    let variant = format!(
        "{variant}, twin {} on dmar2 (segment {})",
        w.devices[twin].bdf,
        if seg1.is_some() { "read" } else { "unread" }
    );
    (variant, expected)
}

/// Surprise removal of an SR-IOV PF with a VF: the VF goes first, then the PF.
pub fn vf_behind_pf(w: &mut World) -> (String, Vec<Expected>) {
    let t0 = w.t0;
    let p = 2; // mlx5_core, slot 3
    let pd = w.devices[p].clone();
    let s = pd.slot.unwrap_or(0);
    // A VF created after the trace's snapshots has none.
    let seen = w.rng.chance(50);
    let vf = SimDevice {
        bdf: Bdf { devfn: 2, ..pd.bdf },
        vendor: 0x15b3,
        device: 0x101e,
        driver: "vfio-pci",
        slot: pd.slot,
        iommu: pd.iommu,
        ats: true,
        tid: 3107,
        comm: "qemu-system-x86",
        dev_ptr: 0,
        pf: Some(pd.sid()),
    };
    let v = w.add_device(vf, seen);
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let everyone = all(w);
    let n = w.rng.range(10, 40) as usize;
    w.kill(p, t1 - 200 * US);
    w.kill(v, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    w.ist(t1, cpu1, s);
    w.pciehp_log(t1 + 2 * US, cpu1, s, "Link Down");
    w.pciehp_log(t1 + 3 * US, cpu1, s, "Card not present");
    w.unconfigure(t1 + 30 * US, cpu1, s, false);
    // The walk covers the slot's bus: the PF and its VF.
    w.walk(t1 + 40 * US, cpu1, s);
    if w.kernel == Kernel::V6_12 {
        w.dev_event(t1 + 45 * US, cpu1, s, p, DevWhat::Disconnected);
        w.dev_event(t1 + 46 * US, cpu1, s, v, DevWhat::Disconnected);
    }
    // The bus's devices are removed last first: the VF, then the PF.
    let fast = |w: &mut World, _: usize, _: u64| Some((w.rng.range(3 * US, 40 * US), 0));
    w.dev_event(t1 + 60 * US, cpu1, s, v, DevWhat::Remove);
    let t_rel = t1 + 60 * US + w.rng.range(100 * US, 2 * MS);
    w.dev_event(t_rel, cpu1, s, v, DevWhat::Release);
    let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, v, 2, fast);
    let t_rm = after + w.rng.range(50 * US, 500 * US);
    w.dev_event(t_rm, cpu1, s, p, DevWhat::Remove);
    let t_rel = t_rm + w.rng.range(100 * US, 2 * MS);
    w.dev_event(t_rel, cpu1, s, p, DevWhat::Release);
    let after = w.removal_flushes(t_rel + 20 * US, cpu1, s, p, 2, fast);
    w.ist_return(after + 30 * US, cpu1, s, t1);
    let end = after + w.rng.range(MS, 20 * MS);
    let rest: Vec<usize> = others(w, p).into_iter().filter(|i| *i != v).collect();
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu1));
    last_event(w, end, p, cpu1);
    let expected = vec![
        exp(IncidentKind::FlushToGoneDevice, Some(w.devices[v].sid())),
        exp(IncidentKind::FlushToGoneDevice, Some(pd.sid())),
    ];
    let variant = format!(
        "{} completed, VF {} {}",
        w.kernel.name(),
        w.devices[v].bdf,
        if seen {
            "in the snapshots"
        } else {
            "not in the snapshots"
        }
    );
    (variant, expected)
}

/// 6.1 W1 that hangs; pciehp's records, the disconnect among them, arrive late.
pub fn late_records(w: &mut World) -> (String, Vec<Expected>) {
    w.kernel = Kernel::V6_1;
    let t0 = w.t0;
    let d = w.rng.below(3) as usize;
    let s = w.devices[d].slot.unwrap_or(0);
    let dd = w.devices[d].clone();
    let sid = Some(dd.sid());
    let t1 = t0 + w.rng.range(2 * MS, 20 * MS);
    let n = w.rng.range(10, 40) as usize;
    let everyone = all(w);
    w.kill(d, t1 - 200 * US);
    w.noise(t0, t1, n, &everyone, None);
    let cpu1 = w.ist_cpu(s);
    let cpu0 = w.cpu_except(cpu1);
    let sub = w.driver_unmap(t1, cpu0, dd.tid, dd.comm, d, None);
    let t_ist = sub + w.rng.range(5 * US, 500 * US);
    let t_rm = surprise_prefix(w, t_ist, cpu1, s, d);
    let end = sub + w.rng.range(1200 * MS, 3000 * MS);
    let first = t_rm + w.rng.range(MS, 8 * MS);
    ite_blocks(w, first, end, (50 * MS, 150 * MS), 30, cpu0, d, sid);
    // CPU1's ring is drained late: pciehp's records reach the reader after records
    // 250-600 ms newer (the reorder window is 10 ms).
    let delay = w.rng.range(250 * MS, 600 * MS);
    let ist_tid = w.slots[s].ist_tid;
    w.deliver_late(ist_tid, t_ist, t_rm, t_ist + delay);
    let rest = others(w, d);
    let n = w.rng.range(10, 40) as usize;
    w.noise(t1, end, n, &rest, Some(cpu0));
    last_event(w, end, d, cpu0);
    let expected = vec![
        exp(IncidentKind::InflightAcrossDisconnect, sid),
        exp(IncidentKind::IteReported, sid),
        exp(IncidentKind::HungInvalidation, sid),
    ];
    (
        format!("6.1 hang, disconnect {} ms late", delay / MS),
        expected,
    )
}
