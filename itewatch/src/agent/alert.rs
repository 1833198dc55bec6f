//! Alertmanager delivery: one alert per incident (`POST <url>/api/v2/alerts`), to every
//! configured URL, with exponential back-off. Each delivery is written to the spool before the
//! first attempt and marked sent after the last URL accepted it, so a restart resumes what was
//! pending and never sends an incident twice (incident ids are stable across runs).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use super::http::{parse_http_url, post_json};
use super::metrics::Metrics;
use super::spool::{Pending, Spool};
use crate::correlate::incident::Incident;

/// First retry after this; doubles per failure up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
const POST_TIMEOUT: Duration = Duration::from_secs(5);

pub enum Msg {
    New(Pending),
    Urls(Vec<String>),
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
    if let Some(b) = inc.device.bdf {
        put("bdf", b.to_string());
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
}

pub struct Pusher {
    urls: Vec<String>,
    queue: BTreeMap<String, Entry>,
    /// Delivered ids when there is no spool (memory only).
    sent: HashSet<String>,
    spool: Option<Spool>,
    metrics: Arc<Metrics>,
}

impl Pusher {
    /// Loads what the spool still has pending.
    pub fn new(urls: Vec<String>, spool: Option<Spool>, metrics: Arc<Metrics>) -> Pusher {
        let mut queue = BTreeMap::new();
        if let Some(s) = &spool {
            let (pending, errs) = s.pending();
            for e in errs {
                metrics.spool_error("read");
                eprintln!("itewatch agent: {e}");
            }
            let now = Instant::now();
            for p in pending {
                queue.insert(
                    p.id.clone(),
                    Entry {
                        p,
                        attempts: 0,
                        due: now,
                    },
                );
            }
        }
        metrics.set_pending(queue.len());
        Pusher {
            urls,
            queue,
            sent: HashSet::new(),
            spool,
            metrics,
        }
    }

    fn is_sent(&self, id: &str) -> bool {
        self.sent.contains(id) || self.spool.as_ref().is_some_and(|s| s.is_sent(id))
    }

    fn accept(&mut self, p: Pending) {
        if self.queue.contains_key(&p.id) || self.is_sent(&p.id) {
            return;
        }
        self.persist(&p);
        self.queue.insert(
            p.id.clone(),
            Entry {
                p,
                attempts: 0,
                due: Instant::now(),
            },
        );
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
}
