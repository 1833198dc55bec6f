//! Property tests of the correlator against the simulator's ground truth, and its behaviour
//! on malformed input (docs/correlator.md, "Proof").

use itewatch::correlate::incident::{DeviceState, Incident, IncidentKind};
use itewatch::correlate::{correlate_all, Config, Correlator};
use itewatch::event::{
    Event, FixedStr, KTime, LogLine, LostRecord, Meta, Payload, Record, Sid, SubmitReturn,
};
use itewatch::simulate::{generate, Expected, Simulated};
use proptest::prelude::*;

/// (kind, SID) of every final incident, sorted: what the simulator's ground truth names.
fn found(incidents: &[Incident]) -> Vec<Expected> {
    let mut v: Vec<Expected> = incidents
        .iter()
        .map(|i| Expected {
            kind: i.kind,
            sid: i.device.sid,
            segment: None,
        })
        .collect();
    v.sort();
    v
}

fn run(records: &[Record]) -> Vec<Incident> {
    correlate_all(Config::default(), records).0
}

/// The expected (kind, SID) pairs, segments aside.
fn kinds_and_sids(expected: &[Expected]) -> Vec<Expected> {
    let mut v: Vec<Expected> = expected
        .iter()
        .map(|e| Expected {
            segment: None,
            ..*e
        })
        .collect();
    v.sort();
    v
}

/// Where the story names a segment, the incident's device is on it.
fn assert_segments(sim: &Simulated, incidents: &[Incident]) {
    for e in sim.expected.iter().filter(|e| e.segment.is_some()) {
        for i in incidents
            .iter()
            .filter(|i| i.kind == e.kind && i.device.sid == e.sid)
        {
            assert_eq!(
                i.device.bdf.and_then(|b| b.segment),
                e.segment,
                "{} seed {} ({}): {:?} on the wrong segment: {:?}",
                sim.scenario,
                sim.seed,
                sim.variant,
                e.kind,
                i.device.bdf
            );
        }
    }
}

/// No simulated stream loses a record: every return pairs with its own submission.
fn assert_pairing(sim: &Simulated, records: &[Record]) {
    let (_, sum) = correlate_all(Config::default(), records);
    assert_eq!(
        (sum.stats.returns_lost, sum.stats.orphan_returns),
        (0, 0),
        "{} seed {} ({}): (returns lost, orphan returns)",
        sim.scenario,
        sim.seed,
        sim.variant
    );
}

fn assert_matches(sim: &Simulated, records: &[Record]) {
    let incidents = run(records);
    let got = found(&incidents);
    assert_segments(sim, &incidents);
    assert_eq!(
        got,
        kinds_and_sids(&sim.expected),
        "{} seed {} ({}): expected {:?}, got {:?}\n{}",
        sim.scenario,
        sim.seed,
        sim.variant,
        sim.expected,
        got,
        serde_json::to_string_pretty(&incidents).unwrap_or_default()
    );
    for i in &incidents {
        assert!(
            !i.partial,
            "{}: nothing was lost, yet partial: {:?}",
            sim.scenario, i.partial_reasons
        );
        assert!(i.closed);
        assert!(!i.timeline.is_empty());
        assert!(!i.fixes.is_empty());
    }
}

fn scenario(name: &str, seed: u64) {
    let sim = generate(name, seed).expect("known scenario");
    assert_matches(&sim, &sim.records);
    assert_pairing(&sim, &sim.records);
}

/// `late-records`: the story's incidents, and the ones already open when the late disconnect
/// arrived (the hung invalidation, its ITE) say that a late record may have changed them.
fn late_scenario(seed: u64) {
    let sim = generate("late-records", seed).expect("known scenario");
    assert_late(&sim, &sim.records);
    assert_pairing(&sim, &sim.records);
}

fn assert_late(sim: &Simulated, records: &[Record]) {
    let (incidents, sum) = correlate_all(Config::default(), records);
    let what = format!("late-records seed {} ({})", sim.seed, sim.variant);
    assert_eq!(found(&incidents), kinds_and_sids(&sim.expected), "{what}");
    assert!(sum.stats.late_records >= 1, "{what}: nothing was late");
    for i in incidents.iter().filter(|i| {
        matches!(
            i.kind,
            IncidentKind::HungInvalidation | IncidentKind::IteReported
        )
    }) {
        assert!(
            i.partial
                && i.partial_reasons
                    .iter()
                    .any(|r| r.contains("later than the reorder window")),
            "{what}: {:?} not partial: {:?}",
            i.kind,
            i.partial_reasons
        );
    }
}

/// The story's verdict on `records` (a scenario's stream, maybe reordered).
fn assert_story(sim: &Simulated, records: &[Record]) {
    if sim.scenario == "late-records" {
        assert_late(sim, records);
    } else {
        assert_matches(sim, records);
    }
}

const CASES: u32 = 1000;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(CASES))]

    #[test]
    fn w1_driver_inflight(seed in any::<u64>()) {
        scenario("w1-driver-inflight", seed);
    }

    #[test]
    fn w2_notifier_after_disconnect(seed in any::<u64>()) {
        scenario("w2-notifier-after-disconnect", seed);
    }

    #[test]
    fn w3_safe_removal_link_down(seed in any::<u64>()) {
        scenario("w3-safe-removal-link-down", seed);
    }

    #[test]
    fn hang_no_hotplug(seed in any::<u64>()) {
        scenario("hang-no-hotplug", seed);
    }

    #[test]
    fn hang_then_hotplug(seed in any::<u64>()) {
        scenario("hang-then-hotplug", seed);
    }

    #[test]
    fn ite_sid_zero(seed in any::<u64>()) {
        scenario("ite-sid-zero", seed);
    }

    #[test]
    fn thread_zero_two_cpus(seed in any::<u64>()) {
        scenario("thread-zero-two-cpus", seed);
    }

    #[test]
    fn nested_interrupt(seed in any::<u64>()) {
        scenario("nested-interrupt", seed);
        let sim = generate("nested-interrupt", seed).expect("known scenario");
        let (_, sum) = correlate_all(Config::default(), &sim.records);
        prop_assert!(sum.stats.nested >= 1, "seed {seed}: the interrupt's submission did not nest");
    }

    #[test]
    fn bystander_etimedout(seed in any::<u64>()) {
        scenario("bystander-etimedout", seed);
    }

    #[test]
    fn mixed_health_batch(seed in any::<u64>()) {
        scenario("mixed-health-batch", seed);
    }

    // Found by this scenario (1-2 % of seeds, seed 1 among them): on 6.12, when the twin's
    // healthy traffic (SID x on segment 1) was in flight as the gone device's ITE (SID x,
    // segment 0) was printed, the report's device stayed `????:..` and a second ite-reported
    // opened for 0000:.. at the next report. The ITE's segment is now the gone device's.
    #[test]
    fn multi_segment(seed in any::<u64>()) {
        scenario("multi-segment", seed);
    }

    /// What holds of `multi-segment` meanwhile: the segment-1 twin is never flagged, and the
    /// W2 verdict is on segment 0.
    #[test]
    fn multi_segment_never_flags_the_healthy_twin(seed in any::<u64>()) {
        let sim = generate("multi-segment", seed).expect("known scenario");
        let incidents = run(&sim.records);
        for i in &incidents {
            let seg = i.device.bdf.and_then(|b| b.segment);
            prop_assert!(seg != Some(1), "seed {seed}: {:?} on segment 1", i.kind);
            if i.kind == IncidentKind::FlushToGoneDevice {
                prop_assert_eq!(seg, Some(0), "seed {}", seed);
            }
        }
        prop_assert!(incidents.iter().any(|i| i.kind == IncidentKind::FlushToGoneDevice));
        assert_pairing(&sim, &sim.records);
    }

    #[test]
    fn vf_behind_pf(seed in any::<u64>()) {
        scenario("vf-behind-pf", seed);
    }

    #[test]
    fn late_records(seed in any::<u64>()) {
        late_scenario(seed);
    }

    #[test]
    fn benign_gives_no_incident(seed in any::<u64>()) {
        let sim = generate("benign", seed).expect("known scenario");
        let incidents = run(&sim.records);
        prop_assert!(incidents.is_empty(), "{} seed {seed}: {}", sim.variant,
            serde_json::to_string_pretty(&incidents).unwrap_or_default());
    }
}

/// The scenarios the loops below run; `multi-segment` is left out while the correlator splits
/// its ITE (see `multi_segment` above).
const NAMES: [&str; 13] = [
    "w1-driver-inflight",
    "w2-notifier-after-disconnect",
    "w3-safe-removal-link-down",
    "hang-no-hotplug",
    "hang-then-hotplug",
    "ite-sid-zero",
    "benign",
    "thread-zero-two-cpus",
    "nested-interrupt",
    "bystander-etimedout",
    "mixed-health-batch",
    "vf-behind-pf",
    "late-records",
];

/// Left out of [`NAMES`], with the reason above.
const LEFT_OUT: [&str; 1] = ["multi-segment"];

/// Every scenario the simulator has is in [`NAMES`] or [`LEFT_OUT`].
#[test]
fn names_cover_every_scenario() {
    let mut all: Vec<&str> = itewatch::simulate::SCENARIOS.iter().map(|s| s.0).collect();
    let mut ours: Vec<&str> = NAMES.iter().chain(LEFT_OUT.iter()).copied().collect();
    all.sort_unstable();
    ours.sort_unstable();
    assert_eq!(all, ours);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Arrival order scrambled within the reorder window (per-CPU buffers drained in any
    /// order): the verdicts do not change.
    #[test]
    fn reordering_within_the_window_changes_nothing(
        which in 0..NAMES.len(),
        seed in any::<u64>(),
        swaps in proptest::collection::vec((any::<prop::sample::Index>(), 1usize..8), 0..40),
    ) {
        let sim = generate(NAMES[which], seed).expect("known scenario");
        let mut recs = sim.records.clone();
        for (at, dist) in swaps {
            let i = at.index(recs.len());
            let j = (i + dist).min(recs.len() - 1);
            let ts = |r: &Record| r.ts().map(|t| t.0);
            let close = match (ts(&recs[i]), ts(&recs[j])) {
                (Some(a), Some(b)) => a.abs_diff(b) < 2_000_000,
                _ => false,
            };
            // Stack records must precede their first use; keep them in place.
            if close && !matches!(recs[i], Record::Stack(_)) && !matches!(recs[j], Record::Stack(_)) {
                recs.swap(i, j);
            }
        }
        assert_story(&sim, &recs);
    }

    /// A lagging live reader (issue: the agent advanced the clock past what it had read and
    /// invented hung incidents): records arrive in batches of any size; after a batch the
    /// clock is advanced to the newest record delivered when more are waiting, and, when the
    /// batch emptied the ring, to any time before the next record the kernel has not written
    /// yet. The final verdicts are exactly those of reading the whole stream at once.
    #[test]
    fn advancing_only_to_what_was_delivered_changes_nothing(
        which in 0..NAMES.len(),
        seed in any::<u64>(),
        cuts in proptest::collection::vec((1usize..400, any::<bool>(), 0u64..=1000), 1..60),
    ) {
        let sim = generate(NAMES[which], seed).expect("known scenario");
        let recs = &sim.records;
        let mut c = Correlator::new(Config::default());
        let mut revisions = Vec::new();
        let mut at = 0;
        let mut delivered = KTime(0);
        let mut cuts = cuts.into_iter().cycle();
        while at < recs.len() {
            let (n, emptied, frac) = cuts.next().expect("cycle");
            let end = (at + n).min(recs.len());
            for r in &recs[at..end] {
                if let Some(t) = r.ts() {
                    delivered = delivered.max(t);
                }
                revisions.extend(c.push(r));
            }
            at = end;
            let next = recs[at..].iter().find_map(|r| r.ts()).map(|t| t.0);
            let to = match (emptied, next) {
                // Emptied: the kernel has written nothing newer than the next record yet.
                (true, Some(next)) if next > delivered.0 => {
                    KTime(delivered.0 + (next - 1 - delivered.0) * frac / 1000)
                }
                (true, None) => KTime(delivered.0 + frac * 1_000_000),
                _ => delivered,
            };
            revisions.extend(c.advance(to));
        }
        revisions.extend(c.finish().incidents);
        let got = found(&itewatch::correlate::latest(revisions));
        let want = found(&run(recs));
        prop_assert_eq!(got, want);
    }

    /// Malformed streams (dropped, duplicated, displaced records, lost markers, orphan
    /// returns, garbage log lines, unknown SIDs) give defined results: no panic, the same
    /// output on every run, unique ids, partial incidents where events were lost.
    #[test]
    fn malformed_streams_never_panic_and_stay_deterministic(
        which in 0..NAMES.len(),
        seed in any::<u64>(),
        ops in proptest::collection::vec((0u8..7, any::<prop::sample::Index>(), any::<u16>()), 0..24),
    ) {
        let sim = generate(NAMES[which], seed).expect("known scenario");
        let mut recs = sim.records.clone();
        for (op, at, x) in ops {
            if recs.is_empty() {
                break;
            }
            let i = at.index(recs.len());
            let ts = recs[i].ts().unwrap_or(KTime(0));
            match op {
                0 => { recs.remove(i); }
                1 => { let r = recs[i].clone(); recs.insert(i, r); }
                2 => { let r = recs.remove(i); let j = (x as usize) % (recs.len() + 1); recs.insert(j, r); }
                3 => recs.insert(i, Record::Lost(LostRecord { after: ts, ringbuf_full: u64::from(x), missed: 0, undecodable: 1 })),
                4 => recs.insert(i, ev(ts.0, u32::from(x), Payload::SubmitReturn(SubmitReturn { ret: -110, start: None }))),
                5 => recs.insert(i, log(ts.0, &format!("DMAR: VT-d detected Invalidation Time-out Error: SID {x:x}"))),
                _ => recs.insert(i, log(ts.0, &format!("pcieport zz: pciehp: Slot({x}: Link Down"))),
            }
        }
        let a = run(&recs);
        let b = run(&recs);
        prop_assert_eq!(
            serde_json::to_string(&a).unwrap_or_default(),
            serde_json::to_string(&b).unwrap_or_default()
        );
        let mut ids: Vec<&str> = a.iter().map(|i| i.id.0.as_str()).collect();
        ids.sort_unstable();
        let n = ids.len();
        ids.dedup();
        prop_assert_eq!(ids.len(), n, "incident ids must be unique");
    }
}

fn ev(ts: u64, tid: u32, payload: Payload) -> Record {
    Record::Event(Event {
        meta: Meta {
            ts: KTime(ts),
            cpu: 0,
            pid: tid,
            tid,
            comm: FixedStr::new("test"),
        },
        payload,
    })
}

fn log(ts: u64, text: &str) -> Record {
    ev(
        ts,
        1,
        Payload::KernelLog(LogLine {
            text: text.to_string(),
            truncated: false,
        }),
    )
}

#[test]
fn the_same_trace_gives_the_same_json_byte_for_byte() {
    for name in NAMES {
        let sim = generate(name, 11).expect("known scenario");
        let a = serde_json::to_string(&run(&sim.records)).expect("json");
        let b = serde_json::to_string(&run(&sim.records)).expect("json");
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn a_return_without_a_submit_is_counted_not_reported() {
    let recs = vec![ev(
        1_000,
        5,
        Payload::SubmitReturn(SubmitReturn {
            ret: 0,
            start: None,
        }),
    )];
    let (inc, sum) = correlate_all(Config::default(), &recs);
    assert!(inc.is_empty());
    assert_eq!(sum.stats.orphan_returns, 1);
}

/// The submit of a w1 scenario, for hand-made streams.
fn first_dev_tlb_submit(sim: &Simulated) -> Record {
    sim.records
        .iter()
        .find(|r| match r {
            Record::Event(e) => match &e.payload {
                Payload::Submit(s) => s.dev_tlb_sids().next().is_some(),
                _ => false,
            },
            _ => false,
        })
        .cloned()
        .expect("a device-TLB submit")
}

fn at(r: &Record, ts: u64) -> Record {
    match r {
        Record::Event(e) => {
            let mut e = e.clone();
            e.meta.ts = KTime(ts);
            Record::Event(e)
        }
        other => other.clone(),
    }
}

#[test]
fn a_submit_that_never_returns_is_accounted_for() {
    let sim = generate("benign", 1).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    // Short: listed as unreturned, no incident (the VM's 6.1 run had one such).
    let (inc, sum) = correlate_all(Config::default(), &[at(&sub, 1_000), log(2_000, "x")]);
    assert!(inc.is_empty(), "{inc:?}");
    assert_eq!(sum.unreturned.len(), 1);
    assert_eq!(sum.stats.unreturned_at_end, 1);
    // Long: hung, critical.
    let (inc, _) = correlate_all(
        Config::default(),
        &[at(&sub, 1_000), log(3_000_000_000, "x")],
    );
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0].kind, IncidentKind::HungInvalidation);
    assert_eq!(
        inc[0].severity,
        itewatch::correlate::incident::Severity::Critical
    );
}

#[test]
fn a_duplicated_submit_is_ignored() {
    let sim = generate("benign", 2).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    let tid = match &sub {
        Record::Event(e) => e.meta.tid,
        _ => 0,
    };
    let ret = ev(
        1_500,
        tid,
        Payload::SubmitReturn(SubmitReturn {
            ret: 0,
            start: Some(KTime(1_000)),
        }),
    );
    let (inc, sum) = correlate_all(Config::default(), &[at(&sub, 1_000), at(&sub, 1_000), ret]);
    assert!(inc.is_empty());
    assert_eq!(sum.stats.duplicates, 1);
    assert_eq!(sum.stats.returns_lost, 0);
}

#[test]
fn lost_events_inside_the_window_make_the_incident_partial() {
    let sim = generate("w2-notifier-after-disconnect", 5).expect("known scenario");
    let mut recs = sim.records.clone();
    // A marker right after the disconnect walk.
    let walk = recs
        .iter()
        .position(
            |r| matches!(r, Record::Event(e) if matches!(e.payload, Payload::DisconnectWalk(_))),
        )
        .expect("walk");
    let ts = recs[walk].ts().expect("ts");
    recs.insert(
        walk + 1,
        Record::Lost(LostRecord {
            after: ts,
            ringbuf_full: 12,
            missed: 0,
            undecodable: 0,
        }),
    );
    let inc = run(&recs);
    let w2 = inc
        .iter()
        .find(|i| i.kind == IncidentKind::FlushToGoneDevice)
        .expect("w2 still found");
    assert!(w2.partial, "{w2:?}");
    assert!(w2.timeline.iter().any(|t| t.event == "lost"));
}

#[test]
fn an_ite_for_an_unknown_sid_names_it_and_says_unknown() {
    let (inc, _) = correlate_all(
        Config::default(),
        &[log(
            5_000,
            "DMAR: VT-d detected Invalidation Time-out Error: SID af03",
        )],
    );
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0].kind, IncidentKind::IteReported);
    assert_eq!(inc[0].device.sid, Some(Sid(0xaf03)));
    assert_eq!(inc[0].device.state, Some(DeviceState::Unknown));
    assert_eq!(inc[0].device.present, None);
}

#[test]
fn an_ite_with_sid_zero_and_nothing_in_flight_is_unattributed() {
    let (inc, _) = correlate_all(
        Config::default(),
        &[log(
            5_000,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 0",
        )],
    );
    assert_eq!(inc.len(), 1);
    assert_eq!(inc[0].device.sid, None);
    assert!(inc[0].explanation.contains("SID 0"));
}

#[test]
fn hung_is_raised_live_by_advance_and_escalates() {
    let sim = generate("benign", 3).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    let mut c = Correlator::new(Config::default());
    assert!(c.push(&at(&sub, 1_000_000)).is_empty());
    let warn = c.advance(KTime(1_000_000 + 150_000_000));
    assert_eq!(warn.len(), 1, "{warn:?}");
    assert_eq!(warn[0].kind, IncidentKind::HungInvalidation);
    assert_eq!(
        warn[0].severity,
        itewatch::correlate::incident::Severity::Warning
    );
    let snap = c.snapshot();
    assert_eq!(snap.inflight.len(), 1);
    assert_eq!(snap.open_incidents.len(), 1);
    let crit = c.advance(KTime(1_000_000 + 1_200_000_000));
    assert_eq!(crit.len(), 1);
    assert_eq!(crit[0].id, warn[0].id);
    assert!(crit[0].revision > warn[0].revision);
    assert_eq!(
        crit[0].severity,
        itewatch::correlate::incident::Severity::Critical
    );
}

/// Regression (issue: severity went critical → warning on `return-lost`, 15 times in 24 s of
/// `agent --simulate soak`): over a long stream rich in incidents, no incident's revisions
/// ever lower its severity.
#[test]
fn an_incidents_severity_never_goes_down() {
    let mut stream = itewatch::simulate::LongStream::new(5, 1_500_000);
    stream.incident_every = 2;
    let mut c = Correlator::new(Config::default());
    let mut seen: std::collections::BTreeMap<String, itewatch::correlate::incident::Severity> =
        Default::default();
    let mut revisions = 0u64;
    let check = |inc: &Incident, seen: &mut std::collections::BTreeMap<_, _>| {
        if let Some(before) = seen.insert(inc.id.0.clone(), inc.severity) {
            assert!(
                inc.severity >= before,
                "incident {} ({}) went from {before} to {} at revision {}",
                inc.id.0,
                inc.kind,
                inc.severity,
                inc.revision
            );
        }
    };
    for r in stream {
        for inc in c.push_owned(r) {
            revisions += 1;
            check(&inc, &mut seen);
        }
    }
    for inc in c.finish().incidents {
        revisions += 1;
        check(&inc, &mut seen);
    }
    assert!(seen.len() > 100, "{} incidents", seen.len());
    assert!(revisions > seen.len() as u64);
}

/// Output volume (issue: one incident produced 470 revisions, 17 MB): revisions that change
/// nothing a reader acts on are coalesced and member lists are bounded, and the final
/// verdicts are exactly those of a correlator that emits every revision and keeps every
/// member.
#[test]
fn coalescing_bounds_revisions_and_keeps_every_final_verdict() {
    use itewatch::correlate::{latest, Material};
    let run = |cfg: Config| {
        let mut stream = itewatch::simulate::LongStream::new(5, 250_000);
        stream.incident_every = 2;
        let mut c = Correlator::new(cfg);
        let mut all = Vec::new();
        for r in stream {
            all.extend(c.push_owned(r));
        }
        all.extend(c.finish().incidents);
        all
    };
    let every = run(Config {
        coalesce_ns: 0,
        max_members: usize::MAX,
        ..Config::default()
    });
    let cfg = Config {
        max_members: 8,
        ..Config::default()
    };
    let coalesced = run(cfg.clone());
    // Coalescing alone, all members kept: the same material states in the same order.
    let coalesced_all = run(Config {
        max_members: usize::MAX,
        ..Config::default()
    });
    let bytes =
        |v: &[Incident]| -> usize { v.iter().map(|i| serde_json::to_vec(i).unwrap().len()).sum() };
    let per_incident =
        |v: &[Incident]| -> u32 { v.iter().map(|i| i.revision + 1).max().unwrap_or(0) };
    eprintln!(
        "every revision: {} revisions, {} bytes, at most {} per incident; coalesced: {} revisions, {} bytes, at most {} per incident",
        every.len(),
        bytes(&every),
        per_incident(&every),
        coalesced.len(),
        bytes(&coalesced),
        per_incident(&coalesced)
    );
    let (a, b) = (latest(every.clone()), latest(coalesced.clone()));
    assert_eq!(a.len(), b.len());
    assert!(a.len() > 30, "{} incidents", a.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.id, y.id);
        let verdict = |i: &Incident| {
            (
                i.kind,
                i.severity,
                i.outcome,
                i.window,
                i.attribution.clone(),
                i.device.clone(),
                i.partial_reasons.clone(),
                i.related.clone(),
                i.closed,
            )
        };
        assert_eq!(verdict(x), verdict(y), "incident {}", x.id.0);
        assert_eq!(
            x.submissions.len(),
            y.submissions.len() + y.submissions_omitted as usize,
            "incident {}",
            x.id.0
        );
        assert!(
            y.submissions.len() <= cfg.max_members,
            "incident {}",
            x.id.0
        );
        assert_eq!(x.explanation, y.explanation, "incident {}", x.id.0);
    }
    assert!(coalesced.len() * 2 < every.len());
    // Every revision that changed what a reader acts on went out: for each incident, the
    // sequence of distinct material states is the same.
    let states = |v: &[Incident]| {
        let mut m: std::collections::BTreeMap<String, Vec<Material>> = Default::default();
        for i in v {
            let s = m.entry(i.id.0.clone()).or_default();
            let k = Material::of(i);
            if s.last() != Some(&k) {
                s.push(k);
            }
        }
        m
    };
    assert_eq!(states(&every), states(&coalesced_all));
}

/// A device-TLB submission that came without a kernel stack (the probe could not take one)
/// has an unknown caller: its incident says so (partial) and the stats count it, instead of a
/// verdict that reads as complete.
#[test]
fn a_dev_tlb_submission_without_a_stack_is_counted_and_makes_its_incident_partial() {
    let sim = generate("w2-notifier-after-disconnect", 1).expect("known scenario");
    let stripped: Vec<Record> = sim
        .records
        .iter()
        .cloned()
        .map(|r| match r {
            Record::Event(mut e) => {
                match &mut e.payload {
                    Payload::Submit(s) => s.stack = None,
                    Payload::DevTlbFlush(f) => f.stack = None,
                    _ => {}
                }
                Record::Event(e)
            }
            r => r,
        })
        .collect();
    let (with, s_with) = correlate_all(Config::default(), &sim.records);
    assert_eq!(s_with.stats.dev_tlb_without_stack, 0);
    assert!(with.iter().all(|i| !i.partial));
    let (without, s_without) = correlate_all(Config::default(), &stripped);
    assert!(s_without.stats.dev_tlb_without_stack > 0);
    let w2 = without
        .iter()
        .find(|i| i.kind == IncidentKind::FlushToGoneDevice)
        .expect("the W2 incident");
    assert!(w2.partial, "{:?}", w2.partial_reasons);
    assert!(w2
        .partial_reasons
        .iter()
        .any(|r| r.contains("no kernel stack")));
}

/// `r` moved to `ts`, run by thread `tid` on `cpu`.
fn on(r: &Record, ts: u64, tid: u32, cpu: u32) -> Record {
    match at(r, ts) {
        Record::Event(mut e) => {
            e.meta.tid = tid;
            e.meta.pid = tid;
            e.meta.cpu = cpu;
            Record::Event(e)
        }
        other => other,
    }
}

fn ret_on(ts: u64, tid: u32, cpu: u32) -> Record {
    on(
        &ev(
            ts,
            tid,
            Payload::SubmitReturn(SubmitReturn {
                ret: 0,
                start: None,
            }),
        ),
        ts,
        tid,
        cpu,
    )
}

#[test]
fn thread_zero_submissions_on_two_cpus_pair_with_their_own_returns() {
    // Softirq or idle-time submissions run as thread 0 on every CPU: keyed by thread alone,
    // CPU 1's submit used to end CPU 0's as return-lost and CPU 0's return then paired with
    // CPU 1's submission.
    let sim = generate("benign", 3).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    let recs = [
        on(&sub, 1_000, 0, 0),
        on(&sub, 2_000, 0, 1),
        ret_on(3_000, 0, 0),
        ret_on(900_000, 0, 1),
    ];
    let (inc, sum) = correlate_all(Config::default(), &recs);
    assert!(inc.is_empty(), "{inc:?}");
    assert_eq!(sum.stats.returns_lost, 0);
    assert_eq!(sum.stats.orphan_returns, 0);
    assert_eq!(sum.stats.returns, 2);
    assert!(sum.unreturned.is_empty());
}

#[test]
fn a_nested_submission_does_not_end_the_one_it_interrupted() {
    // An interrupt between the probe and the queue lock submits on the same thread: it
    // returns first, then the outer one does. Neither return is lost.
    let sim = generate("benign", 4).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    let recs = [
        on(&sub, 1_000, 42, 0),
        on(&sub, 1_500, 42, 0),
        ret_on(2_000, 42, 0),
        ret_on(3_000, 42, 0),
    ];
    let (inc, sum) = correlate_all(Config::default(), &recs);
    assert!(inc.is_empty(), "{inc:?}");
    assert_eq!(sum.stats.nested, 1);
    assert_eq!(sum.stats.returns_lost, 0);
    assert_eq!(sum.stats.orphan_returns, 0);
    assert!(sum.unreturned.is_empty());
}

#[test]
fn after_lost_records_the_next_submission_on_a_thread_takes_the_return_as_lost() {
    let sim = generate("benign", 5).expect("known scenario");
    let sub = first_dev_tlb_submit(&sim);
    let lost = Record::Lost(LostRecord {
        after: KTime(1_200),
        ringbuf_full: 3,
        missed: 0,
        undecodable: 0,
    });
    let recs = [
        on(&sub, 1_000, 42, 0),
        lost,
        on(&sub, 2_000, 42, 0),
        ret_on(3_000, 42, 0),
    ];
    let (_, sum) = correlate_all(Config::default(), &recs);
    assert_eq!(sum.stats.returns_lost, 1);
    assert_eq!(sum.stats.nested, 0);
    assert!(sum.unreturned.is_empty());
}

/// A submission on `tid` whose batch holds one device-TLB descriptor per SID.
fn submit_for(template: &Record, ts: u64, tid: u32, sids: &[u16]) -> Record {
    let Record::Event(mut e) = on(template, ts, tid, tid % 2) else {
        unreachable!()
    };
    if let Payload::Submit(s) = &mut e.payload {
        s.raw.clear();
        for sid in sids {
            s.raw.push(itewatch_common::Desc {
                qw0: (u64::from(*sid) << 32) | 0x3,
                qw1: 0x1000,
            });
        }
        s.count = sids.len() as u32;
    }
    Record::Event(e)
}

fn timed_out(ts: u64, tid: u32) -> Record {
    on(
        &ev(
            ts,
            tid,
            Payload::SubmitReturn(SubmitReturn {
                ret: -110,
                start: None,
            }),
        ),
        ts,
        tid,
        tid % 2,
    )
}

fn ite_incidents(inc: &[Incident]) -> Vec<&Incident> {
    inc.iter()
        .filter(|i| i.kind == IncidentKind::IteReported)
        .collect()
}

#[test]
fn a_bystanders_etimedout_joins_the_printed_ite_and_blames_no_other_device() {
    // 80a9b50c0b9e: the kernel prints the ITE's SID, then whichever CPU checks the fault first
    // returns -ETIMEDOUT — here one whose batch holds only SID 100.
    let sim = generate("benign", 6).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let recs = [
        submit_for(&t, 1_000, 40, &[0x200]),
        submit_for(&t, 1_100, 41, &[0x100]),
        log(
            2_000,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 200",
        ),
        timed_out(2_100, 41),
        timed_out(2_200, 40),
    ];
    let (inc, _) = correlate_all(Config::default(), &recs);
    let ite = ite_incidents(&inc);
    assert_eq!(ite.len(), 1, "{ite:#?}");
    assert_eq!(ite[0].device.sid, Some(Sid(0x200)));
    assert!(!ite[0].device.inferred);
    assert_eq!(ite[0].submissions.len(), 2);
    assert!(
        !inc.iter().any(|i| i.device.sid == Some(Sid(0x100))),
        "the bystander's device is blamed: {inc:#?}"
    );
}

#[test]
fn a_mixed_batch_timing_out_without_a_printed_report_names_its_candidates_as_inferred() {
    let sim = generate("benign", 7).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let recs = [
        submit_for(&t, 1_000, 40, &[0x200, 0x100]),
        timed_out(2_000, 40),
    ];
    let (inc, _) = correlate_all(Config::default(), &recs);
    let ite = ite_incidents(&inc);
    assert_eq!(
        ite.len(),
        1,
        "one incident per time-out, not one per SID: {ite:#?}"
    );
    assert!(ite[0].device.inferred);
    assert_eq!(ite[0].device.candidates, vec![Sid(0x200), Sid(0x100)]);
    assert!(
        ite[0].explanation.contains("inferred"),
        "{}",
        ite[0].explanation
    );

    // The report, printed late (console flush), names SID 100: the incident now knows it.
    let recs = [
        submit_for(&t, 1_000, 40, &[0x200, 0x100]),
        timed_out(2_000, 40),
        log(
            2_500,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 100",
        ),
    ];
    let (inc, _) = correlate_all(Config::default(), &recs);
    let ite = ite_incidents(&inc);
    assert_eq!(ite.len(), 1, "{ite:#?}");
    assert_eq!(ite[0].device.sid, Some(Sid(0x100)));
    assert!(!ite[0].device.inferred);
    assert!(ite[0].device.candidates.is_empty());
}

#[test]
fn an_ite_with_sid_zero_prefers_the_descriptor_before_the_queue_head() {
    let sim = generate("benign", 8).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let recs = [
        submit_for(&t, 1_000, 40, &[0x100]),
        submit_for(&t, 1_100, 41, &[0x200]),
        log(
            2_000,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 0",
        ),
        log(
            2_001,
            "DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x10000000003, qw1 = 0xffffb000",
        ),
        log(
            2_002,
            "DMAR: QI PRIOR: Device-TLB Invalidation qw0 = 0x20000000003, qw1 = 0xffffa000",
        ),
    ];
    let (inc, _) = correlate_all(Config::default(), &recs);
    let ite = ite_incidents(&inc);
    assert_eq!(ite.len(), 1, "{ite:#?}");
    let d = &ite[0].device;
    assert!(d.inferred, "SID 0 is never known");
    assert_eq!(d.sid, Some(Sid(0x200)));
    assert_eq!(d.candidates, vec![Sid(0x200), Sid(0x100)]);
    // Both submissions wait on the same queue: both are members.
    assert_eq!(ite[0].submissions.len(), 2);
}

fn snapshot(seg: u16, iommu: &str) -> Record {
    Record::Device(itewatch::event::DeviceInfo {
        bdf: itewatch::event::Bdf::new(seg, 2, 0, 0),
        vendor: 0x8086,
        device: 0x0a54,
        driver: Some("nvme".into()),
        slot: None,
        port: None,
        ats: Some(true),
        iommu: Some(iommu.into()),
        seen: KTime(10),
    })
}

/// A submission to SID 200 on `iommu`, whose segment the probe could not read.
fn submit_segment_unread(template: &Record, ts: u64, tid: u32, iommu: &str) -> Record {
    let Record::Event(mut e) = submit_for(template, ts, tid, &[0x200]) else {
        unreachable!()
    };
    if let Payload::Submit(s) = &mut e.payload {
        s.iommu.name = FixedStr::new(iommu);
        s.iommu.ptr = if iommu == "dmar1" { 0xb000 } else { 0xa000 };
        s.iommu.segment = None;
    }
    Record::Event(e)
}

#[test]
fn an_unknown_segment_is_not_segment_zero() {
    // Two devices at 02:00.0, one per segment. Segment 0's is marked disconnected; the
    // segment-1 device's healthy traffic comes with no segment (the probe could not read it):
    // its IOMMU unit (dmar1, seen serving segment 1) says which device it is.
    let sim = generate("benign", 9).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let gone = ev(
        500,
        7,
        Payload::DeviceDisconnected(itewatch::event::DeviceRef {
            dev_ptr: 1,
            bdf: Some(itewatch::event::Bdf::new(0, 2, 0, 0)),
            vendor: 0x8086,
            device: 0x0a54,
            stack: None,
        }),
    );
    let recs = [
        snapshot(0, "dmar0"),
        snapshot(1, "dmar1"),
        gone,
        submit_segment_unread(&t, 1_000, 40, "dmar1"),
        ret_on(2_000, 40, 0),
    ];
    let (inc, _) = correlate_all(Config::default(), &recs);
    assert!(
        !inc.iter()
            .any(|i| i.kind == IncidentKind::FlushToGoneDevice),
        "segment 1's healthy traffic flagged: {inc:#?}"
    );
}

#[test]
fn a_disconnect_walk_without_a_segment_does_not_cover_every_segment() {
    let sim = generate("benign", 10).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let walk = ev(
        500,
        7,
        Payload::DisconnectWalk(itewatch::event::Walk {
            callback: 0,
            segment: None,
            bus: 2,
            bus_end: 2,
            stack: None,
        }),
    );
    let mut healthy = submit_for(&t, 1_000, 40, &[0x200]);
    if let Record::Event(e) = &mut healthy {
        if let Payload::Submit(s) = &mut e.payload {
            s.iommu.name = FixedStr::new("dmar1");
            s.iommu.segment = Some(1);
        }
    }
    let recs = [
        snapshot(0, "dmar0"),
        snapshot(1, "dmar1"),
        walk,
        healthy,
        ret_on(2_000, 40, 0),
    ];
    let (inc, sum) = correlate_all(Config::default(), &recs);
    assert!(
        !inc.iter()
            .any(|i| i.kind == IncidentKind::FlushToGoneDevice),
        "a walk of unknown segment covered segment 1: {inc:#?}"
    );
    assert_eq!(sum.stats.unknown_segment, 1, "the ambiguity is counted");
}

#[test]
fn an_event_later_than_the_reorder_window_makes_the_open_incidents_of_its_time_partial() {
    // A driver-side submission hangs; the disconnect that would make it W1 arrives after
    // records 60 ms newer were processed (window: 10 ms). Whatever the verdict, it says a
    // late event may have changed it.
    let sim = generate("benign", 11).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let gone = ev(
        300_000_000,
        7,
        Payload::DeviceDisconnected(itewatch::event::DeviceRef {
            dev_ptr: 1,
            bdf: Some(itewatch::event::Bdf::new(0, 2, 0, 0)),
            vendor: 0x8086,
            device: 0x0a54,
            stack: None,
        }),
    );
    let mut c = Correlator::new(Config::default());
    let mut all = Vec::new();
    all.extend(c.push(&submit_for(&t, 1_000, 40, &[0x200])));
    all.extend(c.push(&log(360_000_000, "x")));
    all.extend(c.advance(KTime(360_000_000)));
    all.extend(c.push(&gone));
    all.extend(c.push(&log(3_000_000_000, "y")));
    let sum = c.finish();
    all.extend(sum.incidents);
    assert!(sum.stats.late_records >= 1);
    // The last revision of each hung incident.
    let mut last: std::collections::BTreeMap<String, Incident> = Default::default();
    for i in all {
        last.insert(i.id.0.clone(), i);
    }
    let hung: Vec<&Incident> = last
        .values()
        .filter(|i| i.kind == IncidentKind::HungInvalidation)
        .collect();
    assert!(!hung.is_empty(), "{last:#?}");
    assert!(
        hung.iter().all(|i| i.partial
            && i.partial_reasons
                .iter()
                .any(|r| r.contains("later than the reorder window"))),
        "{hung:#?}"
    );
}

#[test]
fn a_vfs_invalidation_is_matched_through_its_pf_and_says_so() {
    // PF 02:00.0 goes away; an invalidation to its VF 02:02.0 carries the PF's SID as pfsid.
    let sim = generate("benign", 12).expect("known scenario");
    let t = first_dev_tlb_submit(&sim);
    let pf: u64 = 0x200;
    let mut vf_submit = submit_for(&t, 1_000, 40, &[0x210]);
    if let Record::Event(e) = &mut vf_submit {
        if let Payload::Submit(s) = &mut e.payload {
            s.raw[0].qw0 |= ((pf & 0xf) << 12) | ((pf >> 4) << 52);
            s.iommu.segment = Some(0);
        }
    }
    let gone = ev(
        500,
        7,
        Payload::DeviceDisconnected(itewatch::event::DeviceRef {
            dev_ptr: 1,
            bdf: Some(itewatch::event::Bdf::new(0, 2, 0, 0)),
            vendor: 0x8086,
            device: 0x0a54,
            stack: None,
        }),
    );
    let recs = [gone, vf_submit, ret_on(2_000, 40, 0)];
    let (inc, _) = correlate_all(Config::default(), &recs);
    let w2: Vec<&Incident> = inc
        .iter()
        .filter(|i| i.kind == IncidentKind::FlushToGoneDevice)
        .collect();
    assert_eq!(w2.len(), 1, "{inc:#?}");
    assert_eq!(w2[0].device.sid, Some(Sid(0x210)));
    assert_eq!(w2[0].device.via_pf, Some(Sid(0x200)));
}

#[test]
fn the_kernels_own_code_decides_fix_status_and_what_a_time_out_does() {
    use itewatch::correlate::incident::FixStatus;
    use itewatch::trace::KernelFixStatus;
    let status = |commit: &str, s: &str| KernelFixStatus {
        commit: commit.into(),
        status: s.into(),
        evidence: "test".into(),
    };
    // A W2 whose path names a fix as missing: with the kernel's code showing that fix, the
    // report never calls it missing.
    let (missing, seed) = (0..40)
        .find_map(|seed| {
            let sim = generate("w2-notifier-after-disconnect", seed).ok()?;
            let (inc, _) = correlate_all(Config::default(), &sim.records);
            inc.iter()
                .flat_map(|i| i.fixes.iter())
                .find(|f| f.status == FixStatus::Missing)
                .map(|f| (f.commit.clone(), seed))
        })
        .expect("some seed names a missing fix");
    let sim = generate("w2-notifier-after-disconnect", seed).unwrap();
    let cfg = Config {
        kernel_fixes: vec![status(&missing, "present")],
        ..Config::default()
    };
    let (inc, _) = correlate_all(cfg, &sim.records);
    assert!(
        inc.iter()
            .flat_map(|i| i.fixes.iter())
            .filter(|f| f.commit == missing)
            .all(|f| f.status != FixStatus::Missing),
        "{missing} called missing although the kernel's code has it"
    );

    // The recorded 6.12 VM trace (a latent W2): what a time-out would do follows the code.
    let t = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/vm/6.12/trace.itw");
    let explain = |fixes: Vec<KernelFixStatus>| {
        let cfg = Config {
            kernel_fixes: fixes,
            ..Config::default()
        };
        let doc = itewatch::document::from_trace_file(&t, cfg).unwrap();
        doc.incidents
            .iter()
            .find(|i| i.kind == IncidentKind::FlushToGoneDevice)
            .map(|i| i.explanation.clone())
            .unwrap()
    };
    assert!(explain(vec![
        status("80a9b50c0b9e", "present"),
        status("fe89277c9ceb", "present")
    ])
    .contains("gives up with -ETIMEDOUT"));
    assert!(explain(vec![
        status("80a9b50c0b9e", "present"),
        status("fe89277c9ceb", "absent")
    ])
    .contains("abort walk"));
    assert!(explain(vec![status("80a9b50c0b9e", "absent")]).contains("lacks 80a9b50c0b9e"));
    // fe89277c9ceb not told: no claim that the kernel gives up.
    assert!(explain(vec![status("80a9b50c0b9e", "present")])
        .contains("unless its ITE abort walk spins first"));
    assert!(explain(Vec::new()).contains("unless the kernel has 80a9b50c0b9e"));
}
