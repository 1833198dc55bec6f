//! The agent's durable output on a thread of its own: incident files in the spool (each
//! `fsync`ed, docs/agent.md), pending Alertmanager deliveries, the JSON line on stdout and the
//! hand-over to the pusher, in that order for each incident. The loop that drains the ring
//! buffer only queues the work, so a slow or stalled disk never holds up reading the kernel's
//! events (issue: fsync and the spool's directory scan ran on the drain task).
//!
//! Order is kept: jobs run one after another as queued, and a JSON line or a delivery goes
//! out only once its incident is on disk. Dropping the [`Writer`] finishes every queued job
//! before it returns, so nothing already queued is lost at shutdown.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use super::alert::Msg;
use super::metrics::Metrics;
use super::spool::{Pending, Spool};

/// One piece of work, in queue order.
pub enum Job {
    Incident {
        id: String,
        /// The spool document (a whole report of this incident).
        doc: Vec<u8>,
        /// The JSON line for stdout, if printed.
        line: Option<Vec<u8>>,
        /// The Alertmanager delivery this revision causes, if any.
        pending: Option<Pending>,
        /// Start of the drain that produced the incident's first revision (`None` for later
        /// revisions): what `itewatch_incident_durable_seconds` measures from.
        onset: Option<Instant>,
    },
    /// The spool's size bound changed (config reload).
    MaxBytes(u64),
}

/// Where the writer puts things.
pub struct Sinks {
    pub spool: Option<Spool>,
    /// Spool directory, to retry opening it when it could not be opened (it recovers when
    /// fixed).
    pub spool_dir: Option<PathBuf>,
    pub spool_max_bytes: u64,
    pub metrics: Arc<Metrics>,
    pub pusher: mpsc::Sender<Msg>,
}

/// The writer thread and its queue.
pub struct Writer {
    tx: Option<std_mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn spawn(sinks: Sinks) -> std::io::Result<Writer> {
        let (tx, rx) = std_mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("itewatch-writer".into())
            .spawn(move || run(sinks, rx))?;
        Ok(Writer {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Queues a job (never blocks).
    pub fn send(&self, job: Job) {
        if let Some(tx) = &self.tx {
            if tx.send(job).is_err() {
                eprintln!("itewatch agent: the writer thread has stopped; output lost");
            }
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut sinks: Sinks, rx: std_mpsc::Receiver<Job>) {
    for job in rx {
        handle(&mut sinks, job);
    }
}

fn handle(s: &mut Sinks, job: Job) {
    match job {
        Job::MaxBytes(n) => {
            s.spool_max_bytes = n;
            if let Some(sp) = &mut s.spool {
                sp.set_max_bytes(n);
            }
        }
        Job::Incident {
            id,
            doc,
            line,
            pending,
            onset,
        } => {
            if s.spool.is_none() {
                if let Some(dir) = &s.spool_dir {
                    s.spool = Spool::open(dir, s.spool_max_bytes).ok();
                }
            }
            match &s.spool {
                Some(sp) => match sp.put_incident(&id, &doc) {
                    Ok(()) => {
                        if let Some(t) = onset {
                            s.metrics.durable(t.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => {
                        s.metrics.spool_error(e.op);
                        eprintln!("itewatch agent: {e}; incident {id} kept in memory");
                    }
                },
                None if s.spool_dir.is_some() => s.metrics.spool_error("open"),
                None => {}
            }
            // The delivery is durable before the JSON line goes out, as the incident is: a
            // crash after the line was logged cannot lose the alert. One already waiting or
            // sent (a restart re-deriving it) is left alone.
            if let (Some(p), Some(sp)) = (&pending, &s.spool) {
                if !sp.is_sent(&p.id) && !sp.has_pending(&p.id) {
                    if let Err(e) = sp.put_pending(p) {
                        s.metrics.spool_error("pending");
                        eprintln!("itewatch agent: {e}; delivery of {} kept in memory", p.id);
                    }
                }
            }
            if let Some(l) = line {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(&l).and_then(|()| out.write_all(b"\n"));
                let _ = out.flush();
            }
            if let Some(p) = pending {
                // Outside any runtime (this thread): blocking is what it is for. A closed
                // channel means the agent is stopping; the delivery stays pending on disk.
                let _ = s.pusher.blocking_send(Msg::New(p));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queued work never waits for the disk, and dropping the writer finishes all of it, in
    /// order: every incident file, every pending delivery on disk before its hand-over to the
    /// pusher, the hand-overs in queue order.
    #[test]
    fn queued_incidents_are_all_durable_in_order_after_drop() {
        let d = tempfile::tempdir().unwrap();
        let spool = Spool::open(d.path(), 1 << 30).unwrap();
        let (tx, mut rx) = mpsc::channel(1024);
        let metrics = Arc::new(Metrics::new());
        let w = Writer::spawn(Sinks {
            spool: Some(spool),
            spool_dir: Some(d.path().to_path_buf()),
            spool_max_bytes: 1 << 30,
            metrics: metrics.clone(),
            pusher: tx,
        })
        .unwrap();
        let started = Instant::now();
        for i in 0..200u32 {
            w.send(Job::Incident {
                id: format!("{i:016x}"),
                doc: vec![b'x'; 4096],
                line: None,
                pending: (i % 10 == 0).then(|| Pending {
                    id: format!("d{i}"),
                    alert: serde_json::json!({}),
                    delivered_to: Vec::new(),
                }),
                onset: Some(started),
            });
        }
        drop(w);
        let check = Spool::open(d.path(), 1 << 30).unwrap();
        assert_eq!(check.incident_ids().len(), 200);
        let mut order = Vec::new();
        while let Ok(Msg::New(p)) = rx.try_recv() {
            assert!(
                check.has_pending(&p.id),
                "{} handed over before it was on disk",
                p.id
            );
            order.push(p.id);
        }
        let want: Vec<String> = (0..200).step_by(10).map(|i| format!("d{i}")).collect();
        assert_eq!(order, want);
        let m = metrics.encode();
        assert!(
            m.contains("itewatch_incident_durable_seconds_count 200"),
            "{m}"
        );
    }
}
