//! Alertmanager delivery: one alert per incident (`POST <url>/api/v2/alerts`), to every
//! configured URL, with exponential back-off. Each delivery is written to the spool before the
//! first attempt and marked sent after the last URL accepted it, so a restart resumes what was
//! pending and never sends an incident twice (incident ids are stable across runs). An
//! incident that later rises in severity (a hung submission turning critical) is alerted
//! again with the new severity, once per severity reached (delivery `<id>-<severity>`). At most
//! `max_pending` deliveries wait: past it the oldest are given up (logged, counted in
//! `itewatch_alertmanager_dropped_total`); their incidents stay in the spool and the logs.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::http::{parse_http_url, post_json};
use super::metrics::Metrics;
use super::spool::{Pending, Spool};
use crate::correlate::incident::{Incident, Severity};

/// First retry after this; doubles per failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Msg {
    New(Pending),
    Urls(Vec<String>),
    MaxPending(usize),
}

/// What an incident revision means for alerting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing new to say.
    None,
    /// The first revision: the incident's alert.
    Opened,
    /// A later revision above the severity seen before: an alert with the new severity.
    Escalated,
}

/// Decides from the severity of the revision seen before (`None`: none seen) (pure).
pub fn step(prev: Option<Severity>, inc: &Incident) -> Step {
    match prev {
        _ if inc.revision == 0 => Step::Opened,
        Some(p) if inc.severity > p => Step::Escalated,
        _ => Step::None,
    }
}

/// The delivery's id (its spool file name): the incident id for its first alert,
/// `<id>-<severity>` for an escalation, so that each is sent once across restarts.
pub fn delivery_id(inc: &Incident, step: Step) -> String {
    match step {
        Step::Escalated => format!("{}-{}", inc.id.0, inc.severity),
        Step::None | Step::Opened => inc.id.0.clone(),
    }
}

/// The Alertmanager v2 `postableAlert` for an incident. No `startsAt`/`endsAt`:
/// Alertmanager stamps the arrival and resolves it after its `resolve_timeout`.
pub fn alert_for(inc: &Incident, instance: &str) -> serde_json::Value {
    let mut labels = serde_json::Map::new();
    let mut put = |k: &str, v: String| {
        labels.insert(k.to_string(), serde_json::Value::String(v));
    };
    put("alertname", "ItewatchIncident".into());
    put("incident_id", inc.id.0.clone());
    put("kind", inc.kind.name().into());
    put("severity", inc.severity.to_string());
    put("instance", instance.into());
    // A guessed device is never a label that routes or silences as if it were known: an
    // inferred attribution goes out as `bdf_inferred` with every candidate SID.
    match inc.device.bdf {
        Some(b) if inc.device.inferred => put("bdf_inferred", b.to_string()),
        Some(b) => put("bdf", b.to_string()),
        None => {}
    }
    if !inc.device.candidates.is_empty() {
        let c: Vec<String> = inc
            .device
            .candidates
            .iter()
            .map(|s| s.to_string())
            .collect();
        put("candidate_sids", c.join(","));
    }
    if let Some(i) = &inc.device.iommu {
        put("iommu", i.clone());
    }
    if let Some(w) = inc.window {
        put("window", format!("{w:?}"));
    }
    serde_json::json!({
        "labels": labels,
        "annotations": { "summary": inc.explanation },
    })
}

fn backoff(attempts: u32) -> Duration {
    BASE_BACKOFF
        .saturating_mul(1u32 << attempts.min(16))
        .min(MAX_BACKOFF)
}

struct Entry {
    p: Pending,
    attempts: u32,
    due: Instant,
    /// Arrival order: the oldest go first when the bound is exceeded.
    seq: u64,
}

/// How many of `waiting` deliveries to give up to stay within `max` (pure).
pub fn excess(waiting: usize, max: usize) -> usize {
    waiting.saturating_sub(max.max(1))
}

pub struct Pusher {
    urls: Vec<String>,
    queue: BTreeMap<String, Entry>,
    /// Delivered ids when there is no spool (memory only).
    sent: HashSet<String>,
    spool: Option<Spool>,
    metrics: Arc<Metrics>,
    max_pending: usize,
    next_seq: u64,
}

impl Pusher {
    /// Loads what the spool still has pending (oldest first), within `max_pending`.
    pub fn new(
        urls: Vec<String>,
        spool: Option<Spool>,
        metrics: Arc<Metrics>,
        max_pending: usize,
    ) -> Pusher {
        let mut queue = BTreeMap::new();
        let mut seq = 0;
        if let Some(s) = &spool {
            let (pending, errs) = s.pending();
            for e in errs {
                metrics.spool_error("read");
                eprintln!("itewatch agent: {e}");
            }
            let now = Instant::now();
            for p in pending {
                seq += 1;
                queue.insert(
                    p.id.clone(),
                    Entry {
                        p,
                        attempts: 0,
                        due: now,
                        seq,
                    },
                );
            }
        }
        let mut pusher = Pusher {
            urls,
            queue,
            sent: HashSet::new(),
            spool,
            metrics,
            max_pending,
            next_seq: seq,
        };
        pusher.enforce_bound();
        pusher.metrics.set_pending(pusher.queue.len());
        pusher
    }

    /// Gives up the oldest deliveries past `max_pending`.
    fn enforce_bound(&mut self) {
        let n = excess(self.queue.len(), self.max_pending);
        if n == 0 {
            return;
        }
        let mut by_age: Vec<(u64, String)> =
            self.queue.iter().map(|(k, e)| (e.seq, k.clone())).collect();
        by_age.sort();
        for (_, id) in by_age.into_iter().take(n) {
            self.queue.remove(&id);
            if let Some(s) = &self.spool {
                if let Err(e) = s.drop_pending(&id) {
                    self.metrics.spool_error("pending");
                    eprintln!("itewatch agent: {e}");
                }
            }
            self.metrics.delivery_dropped();
        }
        eprintln!(
            "itewatch agent: more than {} Alertmanager deliveries waiting: gave up the {n} oldest (their incidents stay in the spool)",
            self.max_pending
        );
    }

    /// Deliveries waiting, in id order.
    pub fn queued(&self) -> Vec<String> {
        self.queue.keys().cloned().collect()
    }

    fn is_sent(&self, id: &str) -> bool {
        self.sent.contains(id) || self.spool.as_ref().is_some_and(|s| s.is_sent(id))
    }

    /// Queues a new delivery. The worker has usually written its pending file already
    /// (before the incident's JSON line); if it could not, this tries again.
    pub fn accept(&mut self, p: Pending) {
        if self.queue.contains_key(&p.id) || self.is_sent(&p.id) {
            return;
        }
        if !self.spool.as_ref().is_some_and(|s| s.has_pending(&p.id)) {
            self.persist(&p);
        }
        self.next_seq += 1;
        self.queue.insert(
            p.id.clone(),
            Entry {
                p,
                attempts: 0,
                due: Instant::now(),
                seq: self.next_seq,
            },
        );
        self.enforce_bound();
        self.metrics.set_pending(self.queue.len());
    }

    fn persist(&self, p: &Pending) {
        if let Some(s) = &self.spool {
            if let Err(e) = s.put_pending(p) {
                self.metrics.spool_error("pending");
                eprintln!("itewatch agent: {e} (the delivery is kept in memory)");
            }
        }
    }

    /// Tries every entry that is due, once.
    async fn attempt_due(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .queue
            .iter()
            .filter(|(_, e)| e.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for id in due {
            let Some(mut e) = self.queue.remove(&id) else {
                continue;
            };
            let body = serde_json::to_vec(&[&e.p.alert]).unwrap_or_default();
            let mut progressed = false;
            for u in self.urls.clone() {
                if e.p.delivered_to.contains(&u) {
                    continue;
                }
                let ok = match parse_http_url(&u) {
                    Ok(url) => {
                        match post_json(&url, "/api/v2/alerts", body.clone(), POST_TIMEOUT).await {
                            Ok(code) if (200..300).contains(&code) => true,
                            Ok(code) => {
                                eprintln!("itewatch agent: alertmanager {u}: HTTP {code} for incident {id}");
                                false
                            }
                            Err(err) => {
                                eprintln!("itewatch agent: alertmanager {u}: {err}");
                                false
                            }
                        }
                    }
                    Err(err) => {
                        eprintln!("itewatch agent: alertmanager {u}: {err}");
                        false
                    }
                };
                self.metrics.push_result(ok);
                if ok {
                    e.p.delivered_to.push(u);
                    progressed = true;
                }
            }
            if self.urls.iter().all(|u| e.p.delivered_to.contains(u)) {
                if let Some(s) = &self.spool {
                    if let Err(err) = s.mark_sent(&id) {
                        self.metrics.spool_error("sent");
                        eprintln!("itewatch agent: {err}");
                    }
                }
                self.sent.insert(id);
            } else {
                if progressed {
                    self.persist(&e.p);
                }
                e.attempts += 1;
                e.due = Instant::now() + backoff(e.attempts);
                self.queue.insert(id, e);
            }
        }
        self.metrics.set_pending(self.queue.len());
    }

    /// Runs until the sender side is dropped.
    pub async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        loop {
            if !self.urls.is_empty() {
                self.attempt_due().await;
            }
            let next = self
                .queue
                .values()
                .map(|e| e.due)
                .min()
                .filter(|_| !self.urls.is_empty())
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                m = rx.recv() => match m {
                    None => return,
                    Some(Msg::New(p)) => self.accept(p),
                    Some(Msg::Urls(u)) => {
                        self.urls = u;
                        for e in self.queue.values_mut() {
                            e.due = Instant::now();
                        }
                    }
                    Some(Msg::MaxPending(n)) => {
                        self.max_pending = n;
                        self.enforce_bound();
                        self.metrics.set_pending(self.queue.len());
                    }
                },
                _ = tokio::time::sleep_until(next) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), BASE_BACKOFF);
        assert_eq!(backoff(1), BASE_BACKOFF * 2);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }

    use crate::test_records::first_incident as incident;

    #[test]
    fn an_incident_alerts_when_it_opens_and_when_its_severity_rises() {
        let mut inc = incident();
        inc.revision = 0;
        assert_eq!(step(None, &inc), Step::Opened);
        assert_eq!(delivery_id(&inc, Step::Opened), inc.id.0);
        inc.revision = 3;
        inc.severity = Severity::Critical;
        assert_eq!(step(Some(Severity::Warning), &inc), Step::Escalated);
        let id = delivery_id(&inc, Step::Escalated);
        assert_eq!(id, format!("{}-critical", inc.id.0));
        assert_eq!(alert_for(&inc, "h")["labels"]["severity"], "critical");
        // Same or lower severity, or no earlier revision known: nothing new.
        assert_eq!(step(Some(Severity::Critical), &inc), Step::None);
        inc.severity = Severity::Latent;
        assert_eq!(step(Some(Severity::Warning), &inc), Step::None);
        assert_eq!(step(None, &inc), Step::None);
        // The escalation's delivery id is a valid spool name.
        let d = tempfile::tempdir().unwrap();
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        let p = Pending {
            id,
            alert: serde_json::json!({}),
            delivered_to: vec![],
        };
        s.put_pending(&p).unwrap();
        assert_eq!(s.pending().0, vec![p]);
    }

    fn pending(i: u32) -> Pending {
        Pending {
            id: format!("{:016x}", 0xff - i),
            alert: serde_json::json!({"labels": {"alertname": "ItewatchIncident"}}),
            delivered_to: vec![],
        }
    }

    #[test]
    fn excess_is_what_is_past_the_bound() {
        assert_eq!(excess(0, 10), 0);
        assert_eq!(excess(10, 10), 0);
        assert_eq!(excess(13, 10), 3);
        // A bound of 0 would drop every delivery on arrival: treated as 1.
        assert_eq!(excess(2, 0), 1);
    }

    #[test]
    fn pending_deliveries_are_bounded_dropping_the_oldest_and_counted() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let spool = Spool::open(d.path(), 1 << 20).unwrap();
        // No URL: nothing is attempted, everything waits.
        let mut p = Pusher::new(vec![], Some(spool), metrics.clone(), 3);
        for i in 0..5 {
            p.accept(pending(i));
        }
        // Ids sort the other way round from arrival: the bound follows arrival, not ids.
        let mut want: Vec<String> = (2..5).map(|i| pending(i).id).collect();
        want.sort();
        assert_eq!(p.queued(), want);
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        let mut on_disk: Vec<String> = s.pending().0.into_iter().map(|p| p.id).collect();
        on_disk.sort();
        assert_eq!(on_disk, want);
        let text = metrics.encode();
        assert!(
            text.contains("itewatch_alertmanager_dropped_total 2"),
            "{text}"
        );
        assert!(text.contains("itewatch_pending_pushes 3"), "{text}");
        // A delivery given up is not marked sent: it is simply no longer tried.
        assert!(!s.is_sent(&pending(0).id));

        // A restart with a smaller bound trims what the spool holds, oldest first.
        drop(p);
        let p = Pusher::new(vec![], Some(s), metrics.clone(), 1);
        assert_eq!(p.queued().len(), 1);
        let s = Spool::open(d.path(), 1 << 20).unwrap();
        assert_eq!(s.pending().0.len(), 1);
        assert!(metrics
            .encode()
            .contains("itewatch_alertmanager_dropped_total 4"));
    }
}
