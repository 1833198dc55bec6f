//! `/metrics`: Prometheus metrics derived from the record stream and the correlator's
//! output. Names follow node_exporter: `itewatch_` prefix, base units (seconds), `_total`
//! on counters. Labels are bounded by the host's hardware (IOMMU units, hot-plug ports,
//! probes, programs) or by fixed sets (incident kind/severity, loss reason): never per event.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

use crate::correlate::incident::Incident;
use crate::event::{DecoderStats, IommuName, KTime, Payload, Record};
use itewatch_core::pairing::Pairing;

type Labels = Vec<(&'static str, String)>;
type HistFamily = Family<Labels, Histogram, fn() -> Histogram>;

/// Most submissions tracked for pairing with their return (one per thread, or per CPU for
/// thread 0, plus nested ones; past the bound, the oldest pairing is forgotten).
const MAX_PAIRING_THREADS: usize = 4096;

fn latency_histogram() -> Histogram {
    // 1 µs .. ~4 s: healthy submissions take microseconds; a device-TLB time-out is ~1 s
    // (6.9+) and the hang case grows without bound (the oldest-in-flight gauge covers it).
    Histogram::new(exponential_buckets(1e-6, 4.0, 12))
}

/// One IOMMU unit's per-submission metrics, taken from their families once.
struct UnitHandles {
    name: IommuName,
    submissions: Counter,
    devtlb: Counter,
    latency: Histogram,
}

/// The state [`Metrics::observe`] updates on every submission and return, behind one lock:
/// the units' handles (looked up by name; a host has a handful of units) and the pairing of
/// submissions with their returns. Taking the handles from the families on each record cost a
/// label vector, a `String` and a hashed lookup per submission: 14.6 % of the agent's profile
/// under 100 k events/s (docs/benchmarks.md).
struct Hot {
    units: Vec<UnitHandles>,
    /// Runner → index in `units` of the submission in flight on it.
    pairing: Pairing<usize>,
}

/// The metric handles; cheap to clone internally (atomics behind `Arc`s).
pub struct Metrics {
    registry: Registry,
    events: Counter,
    submissions: Family<Labels, Counter>,
    devtlb: Family<Labels, Counter>,
    latency: HistFamily,
    inflight: Gauge,
    oldest_age: Gauge<f64, AtomicU64>,
    hotplug: Family<Labels, Counter>,
    incidents: Family<Labels, Counter>,
    escalations: Family<Labels, Counter>,
    lost: Family<Labels, Counter>,
    probe_attached: Family<Labels, Gauge>,
    required_missing: Gauge,
    /// The required probes that did not attach (live source): the agent is blind.
    blind: Mutex<Vec<String>>,
    bpf_run: Family<Labels, Counter<f64, AtomicU64>>,
    spool_errors: Family<Labels, Counter>,
    durable: Histogram,
    pushes: Family<Labels, Counter>,
    pending_pushes: Gauge,
    dropped_pushes: Counter,
    last_gasp_unwritten: Family<Labels, Counter>,
    unannounced: Family<Labels, Counter>,
    /// The decoder's totals at the last [`Metrics::decoder`] call.
    decoder_prev: Mutex<DecoderStats>,
    /// What each record's count touches, behind one lock.
    hot: Mutex<Hot>,
    bpf_prev: Mutex<HashMap<String, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("itewatch");
        let m = Metrics {
            registry: Registry::default(),
            events: Counter::default(),
            submissions: Family::default(),
            devtlb: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            inflight: Gauge::default(),
            oldest_age: Gauge::default(),
            hotplug: Family::default(),
            incidents: Family::default(),
            escalations: Family::default(),
            lost: Family::default(),
            probe_attached: Family::default(),
            required_missing: Gauge::default(),
            blind: Mutex::new(Vec::new()),
            bpf_run: Family::default(),
            spool_errors: Family::default(),
            // Fine around the 10 ms goal (docs/benchmarks.md).
            durable: Histogram::new([
                0.25e-3, 0.5e-3, 1e-3, 2e-3, 2.5e-3, 3e-3, 5e-3, 7.5e-3, 10e-3, 12.5e-3, 15e-3,
                20e-3, 30e-3, 50e-3, 100e-3, 250e-3, 1.0,
            ]),
            pushes: Family::default(),
            pending_pushes: Gauge::default(),
            dropped_pushes: Counter::default(),
            last_gasp_unwritten: Family::default(),
            unannounced: Family::default(),
            decoder_prev: Mutex::new(DecoderStats::default()),
            hot: Mutex::new(Hot {
                units: Vec::new(),
                pairing: Pairing::new(MAX_PAIRING_THREADS),
            }),
            bpf_prev: Mutex::new(HashMap::new()),
        };
        r.register(
            "events",
            "Kernel events the correlator was fed (all kinds; the agent's input rate)",
            m.events.clone(),
        );
        r.register(
            "submissions",
            "qi_submit_sync calls (submissions), by IOMMU unit",
            m.submissions.clone(),
        );
        r.register(
            "devtlb_invalidations",
            "Device-TLB invalidation descriptors submitted, by IOMMU unit",
            m.devtlb.clone(),
        );
        r.register_with_unit(
            "submission_latency",
            "Time from qi_submit_sync entry to its return, by IOMMU unit",
            Unit::Seconds,
            m.latency.clone(),
        );
        r.register(
            "inflight_submissions",
            "Submissions that have not returned yet",
            m.inflight.clone(),
        );
        r.register_with_unit(
            "oldest_inflight_age",
            "Age of the oldest submission still in flight (0 when none)",
            Unit::Seconds,
            m.oldest_age.clone(),
        );
        r.register(
            "hotplug_events",
            "pciehp events by hot-plug port (slot) and kind (interrupt, safe-removal, surprise-removal, removal)",
            m.hotplug.clone(),
        );
        r.register(
            "incidents",
            "Incidents opened, by kind and severity",
            m.incidents.clone(),
        );
        r.register(
            "incident_escalations",
            "Incidents that rose to a higher severity after they opened, by kind and the severity reached",
            m.escalations.clone(),
        );
        r.register(
            "lost_events",
            "Events lost before the correlator saw them, by reason (ringbuf_full, missed, undecodable)",
            m.lost.clone(),
        );
        r.register(
            "probe_attached",
            "1 when the probe is attached, 0 when it is not; required=\"true\" for the probes a verdict needs",
            m.probe_attached.clone(),
        );
        r.register(
            "required_probes_missing",
            "Required probes that did not attach: above 0 the agent is blind and /healthz answers 503",
            m.required_missing.clone(),
        );
        r.register_with_unit(
            "bpf_program_run",
            "Kernel run time of each BPF program (excludes the kprobe or trampoline dispatch cost)",
            Unit::Seconds,
            m.bpf_run.clone(),
        );
        r.register(
            "spool_errors",
            "Spool writes that failed, by operation",
            m.spool_errors.clone(),
        );
        r.register_with_unit(
            "incident_durable",
            "Time from the drain that produced an incident's first revision to that revision being fsynced in the spool",
            Unit::Seconds,
            m.durable.clone(),
        );
        r.register(
            "alertmanager_pushes",
            "Alertmanager POSTs by result (ok, error)",
            m.pushes.clone(),
        );
        r.register(
            "pending_pushes",
            "Incidents waiting to be delivered to Alertmanager",
            m.pending_pushes.clone(),
        );
        r.register(
            "alertmanager_dropped",
            "Deliveries given up because more than max_pending were waiting (oldest first)",
            m.dropped_pushes.clone(),
        );
        r.register(
            "last_gasp_unwritten",
            "Last-gasp lines not written, by channel (file, kmsg) and reason (write_error; for kmsg also flooding: withheld while the kernel log floods, and over_budget)",
            m.last_gasp_unwritten.clone(),
        );
        r.register(
            "events_unannounced",
            "Compact records decoded without the announcement they rely on, by what is unknown (task: pid and command; iommu: unit and segment); the announcement was lost to a full ring buffer",
            m.unannounced.clone(),
        );
        let build: Family<Labels, Gauge> = Family::default();
        build
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        r.register("build_info", "itewatch version (always 1)", build);
        Metrics { registry: r, ..m }
    }

    /// The exposition (OpenMetrics text, which Prometheus scrapes).
    pub fn encode(&self) -> String {
        let mut s = String::new();
        if encode(&mut s, &self.registry).is_err() {
            s.clear();
        }
        s
    }

    /// The exposition in the classic text format (0.0.4), for scrapers and tools that do not
    /// ask for OpenMetrics (`promtool check metrics`, older Prometheus, curl).
    pub fn encode_classic(&self) -> String {
        to_classic_text(&self.encode())
    }

    /// Index in `units` of the unit named `name`, its handles taken from the families the
    /// first time it is seen.
    fn unit(&self, units: &mut Vec<UnitHandles>, name: IommuName) -> usize {
        if let Some(i) = units.iter().position(|u| u.name == name) {
            return i;
        }
        let l = vec![("iommu", name.as_str().into_owned())];
        units.push(UnitHandles {
            name,
            submissions: self.submissions.get_or_create(&l).clone(),
            devtlb: self.devtlb.get_or_create(&l).clone(),
            latency: self.latency.get_or_create(&l).clone(),
        });
        units.len() - 1
    }

    /// Counts what one record says.
    pub fn observe(&self, rec: &Record) {
        if matches!(rec, Record::Event(_)) {
            self.events.inc();
        }
        match rec {
            Record::Event(ev) => match &ev.payload {
                Payload::Submit(s) => {
                    let n = s.dev_tlb_sids().count() as u64;
                    let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
                    let unit = self.unit(&mut hot.units, s.iommu.name);
                    let u = &hot.units[unit];
                    u.submissions.inc();
                    u.devtlb.inc_by(n);
                    // Paired as the kernel runs them (itewatch_core::pairing); past the bound
                    // the oldest pairing is forgotten.
                    hot.pairing.open(&ev.meta, unit);
                }
                Payload::DevTlbFlush(_) => {}
                Payload::SubmitReturn(r) => {
                    let mut hot = self.hot.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some((start, unit)) = hot.pairing.close(&ev.meta) {
                        let start = r.start.unwrap_or(start);
                        let secs = ev.meta.ts.saturating_sub(start) as f64 / 1e9;
                        hot.units[unit].latency.observe(secs);
                    }
                }
                Payload::HotplugIst(s) | Payload::Unconfigure(s) => {
                    let kind = match (&ev.payload, s.presence) {
                        (Payload::HotplugIst(_), _) => "interrupt",
                        (_, Some(true)) => "safe-removal",
                        (_, Some(false)) => "surprise-removal",
                        (_, None) => "removal",
                    };
                    let slot = s
                        .port
                        .map_or_else(|| "unknown".to_string(), |p| p.to_string());
                    self.hotplug
                        .get_or_create(&vec![("slot", slot), ("kind", kind.to_string())])
                        .inc();
                }
                _ => {}
            },
            Record::Lost(l) => {
                self.hot
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pairing
                    .mark_lost();
                for (reason, n) in [
                    ("ringbuf_full", l.ringbuf_full),
                    ("missed", l.missed),
                    ("undecodable", l.undecodable),
                ] {
                    self.lost
                        .get_or_create(&vec![("reason", reason.to_string())])
                        .inc_by(n);
                }
            }
            _ => {}
        }
    }

    /// Counts an incident revision: opened (revision 0) or `escalated` to its severity.
    pub fn incident(&self, inc: &Incident, escalated: bool) {
        let labels = || {
            vec![
                ("kind", inc.kind.name().to_string()),
                ("severity", inc.severity.to_string()),
            ]
        };
        if inc.revision == 0 {
            self.incidents.get_or_create(&labels()).inc();
        } else if escalated {
            self.escalations.get_or_create(&labels()).inc();
        }
    }

    /// The in-flight gauges from [`Correlator::inflight_summary`]: `n` submissions in flight,
    /// the oldest started at `oldest`, at `now`.
    ///
    /// [`Correlator::inflight_summary`]: crate::correlate::Correlator::inflight_summary
    pub fn inflight_at(&self, n: usize, oldest: Option<KTime>, now: KTime) {
        self.inflight.set(n as i64);
        self.oldest_age
            .set(oldest.map_or(0.0, |t| now.saturating_sub(t) as f64 / 1e9));
    }

    /// One probe of the attach plan; `required`: a verdict needs it (probe.rs).
    pub fn probe(&self, name: &str, attached: bool, required: bool) {
        self.probe_attached
            .get_or_create(&vec![
                ("probe", name.to_string()),
                ("required", required.to_string()),
            ])
            .set(attached as i64);
    }

    /// The required probes that did not attach on this host (empty: not blind).
    pub fn set_required_missing(&self, names: Vec<String>) {
        self.required_missing.set(names.len() as i64);
        *self.blind.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// Why the agent cannot see what it is for, if it cannot (`/healthz`).
    pub fn blind(&self) -> Option<String> {
        let b = self.blind.lock().unwrap_or_else(|e| e.into_inner());
        (!b.is_empty()).then(|| format!("blind: required probes missing: {}", b.join(", ")))
    }

    /// Cumulative run time of a BPF program as the kernel reports it.
    pub fn bpf_run_time(&self, program: &str, run_time_ns: u64) {
        let mut prev = self.bpf_prev.lock().unwrap_or_else(|e| e.into_inner());
        let last = prev.entry(program.to_string()).or_insert(0);
        let delta = run_time_ns.saturating_sub(*last);
        *last = run_time_ns.max(*last);
        self.bpf_run
            .get_or_create(&vec![("program", program.to_string())])
            .inc_by(delta as f64 / 1e9);
    }

    /// An incident's first revision is durable in the spool, `secs` after the drain that
    /// produced it began.
    pub fn durable(&self, secs: f64) {
        self.durable.observe(secs);
    }

    pub fn spool_error(&self, op: &'static str) {
        self.spool_errors
            .get_or_create(&vec![("op", op.to_string())])
            .inc();
    }

    pub fn push_result(&self, ok: bool) {
        let r = if ok { "ok" } else { "error" };
        self.pushes
            .get_or_create(&vec![("result", r.to_string())])
            .inc();
    }

    pub fn set_pending(&self, n: usize) {
        self.pending_pushes.set(n as i64);
    }

    pub fn delivery_dropped(&self) {
        self.dropped_pushes.inc();
    }

    /// The live decoder's totals so far (monotonic): counted by what went unannounced.
    pub fn decoder(&self, now: DecoderStats) {
        let mut prev = self.decoder_prev.lock().unwrap_or_else(|e| e.into_inner());
        for (what, new, old) in [
            ("task", now.unknown_task, prev.unknown_task),
            ("iommu", now.unknown_iommu, prev.unknown_iommu),
        ] {
            if new > old {
                self.unannounced
                    .get_or_create(&vec![("unknown", what.to_string())])
                    .inc_by(new - old);
            }
        }
        *prev = now;
    }

    pub fn last_gasp_unwritten(&self, channel: &'static str, reason: &'static str) {
        self.last_gasp_unwritten
            .get_or_create(&vec![
                ("channel", channel.to_string()),
                ("reason", reason.to_string()),
            ])
            .inc();
    }
}

/// OpenMetrics text → the classic Prometheus text format (0.0.4), for the metric types this
/// exporter has (counter, gauge, histogram; no `_created` samples). The samples are the same;
/// only the metadata differs: a counter's `# HELP`/`# TYPE` name the `_total` series, and
/// `# UNIT` and `# EOF` do not exist (pure).
pub fn to_classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find(|p| line.starts_with(p));
        match meta {
            Some(prefix) => {
                let rest = &line[prefix.len()..];
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::LostRecord;

    /// The decoder's totals become counters by what went unannounced; a repeated total adds
    /// nothing.
    #[test]
    fn unannounced_events_are_counted_from_the_decoders_totals() {
        let m = Metrics::new();
        assert!(!m.encode().contains("events_unannounced"));
        let at = |task, iommu| DecoderStats {
            announcements: 9,
            unknown_task: task,
            unknown_iommu: iommu,
        };
        m.decoder(at(2, 0));
        m.decoder(at(2, 0));
        m.decoder(at(5, 1));
        let s = m.encode();
        assert!(
            s.contains("itewatch_events_unannounced_total{unknown=\"task\"} 5"),
            "{s}"
        );
        assert!(s.contains("itewatch_events_unannounced_total{unknown=\"iommu\"} 1"));
    }

    /// Each submission is counted, and its return timed, on its own unit, paired by thread;
    /// a unit seen again reuses its series.
    #[test]
    fn submissions_and_latency_are_counted_per_unit() {
        use crate::test_records::{ev, ret, submit};
        let on = |name: &str, sid| {
            let mut p = submit(sid);
            if let Payload::Submit(s) = &mut p {
                s.iommu.name = crate::event::FixedStr::new(name);
            }
            p
        };
        let m = Metrics::new();
        // Thread 1 on dmar1 (1 µs... 3 ms), thread 2 on dmar0 nested inside it in time.
        m.observe(&ev(1_000, 1, on("dmar1", 5)));
        m.observe(&ev(2_000, 2, on("dmar0", 6)));
        m.observe(&ev(4_000, 2, ret()));
        m.observe(&ev(3_001_000, 1, ret()));
        m.observe(&ev(4_000_000, 2, on("dmar0", 6)));
        m.observe(&ev(4_000_500, 2, ret()));
        let s = m.encode();
        for want in [
            "itewatch_submissions_total{iommu=\"dmar1\"} 1",
            "itewatch_submissions_total{iommu=\"dmar0\"} 2",
            "itewatch_devtlb_invalidations_total{iommu=\"dmar0\"} 2",
            "itewatch_submission_latency_seconds_count{iommu=\"dmar0\"} 2",
            "itewatch_submission_latency_seconds_count{iommu=\"dmar1\"} 1",
            // dmar1's one return took 3 ms: above the 1.024 ms bound, within 4.096 ms.
            "itewatch_submission_latency_seconds_bucket{le=\"0.001024\",iommu=\"dmar1\"} 0",
            "itewatch_submission_latency_seconds_bucket{le=\"0.004096\",iommu=\"dmar1\"} 1",
            // dmar0's took 2 µs and 0.5 µs.
            "itewatch_submission_latency_seconds_bucket{le=\"0.000004\",iommu=\"dmar0\"} 2",
        ] {
            assert!(s.contains(want), "{want} missing from\n{s}");
        }
    }

    /// The in-flight gauges come from the correlator's open submissions (without a full
    /// snapshot): how many, and the age of the oldest.
    #[test]
    fn inflight_gauges_follow_the_open_submissions() {
        use crate::correlate::{Config, Correlator};
        use crate::test_records::{ev, ret, submit};
        let ms = 1_000_000;
        let mut c = Correlator::new(Config::default());
        c.push_owned(ev(5 * ms, 1, submit(5)));
        c.push_owned(ev(7 * ms, 2, submit(6)));
        // Past the reorder window: both are processed.
        c.advance(KTime(60 * ms));
        assert_eq!(c.inflight_summary(), (2, Some(KTime(5 * ms))));
        c.push_owned(ev(61 * ms, 1, ret()));
        c.advance(KTime(120 * ms));
        let (n, oldest) = c.inflight_summary();
        assert_eq!((n, oldest), (1, Some(KTime(7 * ms))));
        let m = Metrics::new();
        m.inflight_at(n, oldest, KTime(2_007 * ms));
        let s = m.encode();
        assert!(s.contains("itewatch_inflight_submissions 1\n"), "{s}");
        assert!(
            s.contains("itewatch_oldest_inflight_age_seconds 2.0\n"),
            "{s}"
        );
    }

    #[test]
    fn names_units_and_loss_reasons() {
        let m = Metrics::new();
        m.observe(&Record::Lost(LostRecord {
            after: KTime(1),
            ringbuf_full: 3,
            missed: 0,
            undecodable: 1,
        }));
        m.bpf_run_time("qi_submit_sync", 2_000_000_000);
        m.bpf_run_time("qi_submit_sync", 3_000_000_000);
        let s = m.encode();
        assert!(
            s.contains("itewatch_lost_events_total{reason=\"ringbuf_full\"} 3"),
            "{s}"
        );
        assert!(s.contains("itewatch_lost_events_total{reason=\"undecodable\"} 1"));
        assert!(s.contains("itewatch_build_info{version=\""));
        assert!(s.contains("itewatch_bpf_program_run_seconds_total{program=\"qi_submit_sync\"} 3"));
        // Families without a sample yet are left out (the e2e test sees the histogram).
        assert!(!s.contains("itewatch_submission_latency_seconds"), "{s}");
        assert!(s.contains("itewatch_oldest_inflight_age_seconds 0"));
    }

    #[test]
    fn classic_text_names_the_counter_series_and_drops_openmetrics_only_lines() {
        let om = "# HELP itewatch_lost_events Events lost.\n# TYPE itewatch_lost_events counter\n\
                  itewatch_lost_events_total{reason=\"missed\"} 1\n\
                  # HELP itewatch_oldest_inflight_age_seconds Age.\n\
                  # TYPE itewatch_oldest_inflight_age_seconds gauge\n\
                  # UNIT itewatch_oldest_inflight_age_seconds seconds\n\
                  itewatch_oldest_inflight_age_seconds 0\n# EOF\n";
        assert_eq!(
            to_classic_text(om),
            "# HELP itewatch_lost_events_total Events lost.\n\
             # TYPE itewatch_lost_events_total counter\n\
             itewatch_lost_events_total{reason=\"missed\"} 1\n\
             # HELP itewatch_oldest_inflight_age_seconds Age.\n\
             # TYPE itewatch_oldest_inflight_age_seconds gauge\n\
             itewatch_oldest_inflight_age_seconds 0\n"
        );
        let m = Metrics::new();
        m.spool_error("open");
        let classic = m.encode_classic();
        assert!(classic.contains("# TYPE itewatch_spool_errors_total counter\n"));
        assert!(!classic.contains("# EOF") && !classic.contains("# UNIT"));
        // Same samples either way.
        let samples = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(samples(&classic), samples(&m.encode()));
        assert_eq!(to_classic_text(""), "");
    }
}
