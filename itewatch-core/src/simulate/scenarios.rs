//! The scenarios of the ITE thread (docs/scenarios.md has each one's diagram). Each builds
//! its event stream on a [`World`] and says which incidents a correct correlator must report:
//! the ground truth comes from the scenario's own story, not from the correlator.

use crate::correlate::incident::IncidentKind;
use crate::event::{KTime, Payload, Sid, SubmitReturn};

use super::world::{DevWhat, Kernel, World, MS, US};
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
];

fn exp(kind: IncidentKind, sid: Option<Sid>) -> Expected {
    Expected { kind, sid }
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
    let qw0 = World::devtlb_desc(d.sid(), 0, 52).qw0;
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
    let cpu0 = w.cpu();
    let cpu1 = w.cpu_except(cpu0);
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
            w.ite_block(
                t_ite,
                cpu0,
                dd.tid,
                dd.comm,
                sid,
                World::devtlb_desc(dd.sid(), 0, 0).qw0,
            );
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
    let cpu1 = w.cpu();
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
            w.ite_block(
                t + hw,
                cpu1,
                tid,
                &comm,
                Some(d.sid()),
                World::devtlb_desc(d.sid(), 0, 52).qw0,
            );
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
        let qw0 = World::devtlb_desc(dd.sid(), 0, 52).qw0;
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
    let cpu1 = w.cpu();
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
    let other = w.cpu_except(cpu1);
    let t_down = t_rel + w.rng.range(5 * US, 50 * US);
    w.pciehp_log(t_down, other, s, "Link Down");
    let start = t_rel + 60 * US;
    let mut expected = vec![exp(IncidentKind::SafeRemovalFlushTimeout, sid)];
    let roll = w.rng.below(4);
    let qw0 = World::devtlb_desc(dd.sid(), 0, 52).qw0;
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
    let cpu0 = w.cpu();
    let cpu1 = w.cpu_except(cpu0);
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
    let qw0 = World::devtlb_desc(dd.sid(), 0, 0).qw0;
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
        let cpu1 = w.cpu();
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
