//! The agent's durable output on a thread of its own: incident files in the spool (each
//! `fsync`ed, docs/agent.md), pending Alertmanager deliveries, the JSON line on stdout and the
//! hand-over to the pusher. The loop that drains the ring buffer only queues the incident as
//! the correlator emits it, so a slow or stalled disk never holds up reading the kernel's
//! events (issue: fsync and the spool's directory scan ran on the drain task), nor does
//! building the spool's document or the JSON line.
//!
//! Jobs are taken in batches (all that are queued, up to [`MAX_BATCH`]): the incidents that
//! are new in the batch (a first revision) are written first and made durable with one
//! directory `fsync`, then the other incidents with one more; of several revisions of an
//! incident in a batch only the last is written (it supersedes the others). A new incident
//! that arrives while the other incidents' revisions are being written goes before those not
//! written yet ([`handle`]). Then the pending deliveries (one directory `fsync`), then the JSON
//! lines and the hand-overs to the pusher in queue order (for each incident; an incident left
//! for the next batch sends its own later): a JSON line or a delivery goes out only once its
//! incident is on disk.
//! Dropping the [`Writer`] finishes every queued job before it returns, so nothing already
//! queued is lost at shutdown.

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::mpsc;

use crate::correlate::incident::Incident;
use crate::correlate::Stats;
use crate::trace::TraceHeader;

use super::alert::Msg;
use super::metrics::Metrics;
use super::spool::{Pending, Spool};

/// Most jobs handled as one batch.
pub const MAX_BATCH: usize = 256;

/// One piece of work, in queue order.
pub enum Job {
    Incident(Box<Queued>),
    /// The spool's size bound changed (config reload).
    MaxBytes(u64),
}

/// An incident revision as the correlator emitted it, and what to do with it.
pub struct Queued {
    pub inc: Incident,
    /// The correlator's counts when it was emitted (the spooled document carries them).
    pub stats: Stats,
    /// Print it as a JSON line on stdout.
    pub line: bool,
    /// The Alertmanager delivery this revision causes, if any.
    pub pending: Option<Pending>,
    /// Start of the drain that produced the incident's first revision (`None` for later
    /// revisions): what `itewatch_incident_durable_seconds` measures from.
    pub onset: Option<Instant>,
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
    /// What a spooled document says about the source: its header and the trace's path.
    pub header: TraceHeader,
    pub path: Option<String>,
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
    // Jobs a preempted batch left, with those that preempted it (queue order).
    let mut next: Vec<Job> = Vec::new();
    loop {
        if next.is_empty() {
            match rx.recv() {
                Ok(j) => next.push(j),
                // Closed and nothing left: every queued job is done.
                Err(_) => break,
            }
        }
        while next.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => next.push(j),
                Err(_) => break,
            }
        }
        let batch = std::mem::take(&mut next);
        next = handle(&mut sinks, batch, &mut || rx.try_iter().collect());
    }
}

/// Which incident revisions of a batch to write, as indices into it: the last revision of
/// each incident, those with a first revision in the batch (`new`) before the others
/// (`rest`), each group in the order its incidents first appear (pure).
pub fn plan(batch: &[&Queued]) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<&str> = Vec::new();
    let mut last: std::collections::HashMap<&str, (usize, bool)> = Default::default();
    for (i, q) in batch.iter().enumerate() {
        let id = q.inc.id.0.as_str();
        let e = last.entry(id).or_insert_with(|| {
            order.push(id);
            (i, false)
        });
        e.0 = i;
        e.1 |= q.onset.is_some();
    }
    let (mut new, mut rest) = (Vec::new(), Vec::new());
    for id in order {
        let (i, first) = last[id];
        if first {
            new.push(i);
        } else {
            rest.push(i);
        }
    }
    (new, rest)
}

/// Handles one batch; returns the jobs to handle next, in queue order: when a new incident
/// arrived while later revisions of older ones were being written (each a file `fsync`, and
/// one incident may have dozens of revisions), the revisions not yet written are left, with
/// everything queued for their incidents, and the new incident goes to disk first (issue 11:
/// onset to durable; one waited 6 ms behind another incident's revisions). `arrived` gives
/// what was queued since the batch was taken; it is asked between two of those revisions. At
/// least one revision is written per batch, so a stream of new incidents cannot starve the
/// others.
fn handle(s: &mut Sinks, batch: Vec<Job>, arrived: &mut dyn FnMut() -> Vec<Job>) -> Vec<Job> {
    let mut queued: Vec<Box<Queued>> = Vec::with_capacity(batch.len());
    for job in batch {
        match job {
            Job::MaxBytes(n) => {
                s.spool_max_bytes = n;
                if let Some(sp) = &mut s.spool {
                    sp.set_max_bytes(n);
                }
            }
            Job::Incident(q) => queued.push(q),
        }
    }
    let mut left: Vec<Job> = Vec::new();
    if queued.is_empty() {
        return left;
    }
    if s.spool.is_none() {
        if let Some(dir) = &s.spool_dir {
            s.spool = Spool::open(dir, s.spool_max_bytes).ok();
        }
    }
    match &s.spool {
        Some(sp) => {
            let refs: Vec<&Queued> = queued.iter().map(|q| &**q).collect();
            let (new, rest) = plan(&refs);
            write_group(s, sp, &refs, &new, &mut || true);
            // The later revisions, while no new incident waits.
            let written = write_group(s, sp, &refs, &rest, &mut || {
                let waiting = left.len();
                left.extend(arrived());
                !left[waiting..]
                    .iter()
                    .any(|j| matches!(j, Job::Incident(q) if q.onset.is_some()))
            });
            let unwritten: std::collections::HashSet<String> = rest[written..]
                .iter()
                .map(|&i| refs[i].inc.id.0.clone())
                .collect();
            if let Err(e) = sp.rotate() {
                s.metrics.spool_error(e.op);
                eprintln!("itewatch agent: {e}");
            }
            if !unwritten.is_empty() {
                // Everything queued for the incidents not written yet waits for them (its
                // JSON line and delivery go out once its incident is on disk), ahead of
                // what arrived meanwhile.
                let (wait, go): (Vec<_>, Vec<_>) = queued
                    .into_iter()
                    .partition(|q| unwritten.contains(&q.inc.id.0));
                queued = go;
                let arrived = std::mem::take(&mut left);
                left = wait.into_iter().map(Job::Incident).collect();
                left.extend(arrived);
            }
        }
        None if s.spool_dir.is_some() => {
            for _ in &queued {
                s.metrics.spool_error("open");
            }
        }
        None => {}
    }
    // The deliveries are durable before the JSON lines go out, as the incidents are: a crash
    // after a line was logged cannot lose the alert. One already waiting or sent (a restart
    // re-deriving it) is left alone.
    if let Some(sp) = &s.spool {
        let mut written = false;
        for p in queued.iter().filter_map(|q| q.pending.as_ref()) {
            if sp.is_sent(&p.id) || sp.has_pending(&p.id) {
                continue;
            }
            match sp.write_pending(p) {
                Ok(()) => written = true,
                Err(e) => {
                    s.metrics.spool_error("pending");
                    eprintln!("itewatch agent: {e}; delivery of {} kept in memory", p.id);
                }
            }
        }
        if written {
            if let Err(e) = sp.sync_pending() {
                s.metrics.spool_error("pending");
                eprintln!("itewatch agent: {e}; deliveries kept in memory");
            }
        }
    }
    if queued.iter().any(|q| q.line) {
        let mut out = std::io::stdout().lock();
        for q in queued.iter().filter(|q| q.line) {
            let l = serde_json::to_vec(&q.inc).unwrap_or_default();
            let _ = out.write_all(&l).and_then(|()| out.write_all(b"\n"));
        }
        let _ = out.flush();
    }
    for q in queued {
        if let Some(p) = q.pending {
            // Outside any runtime (this thread): blocking is what it is for. A closed
            // channel means the agent is stopping; the delivery stays pending on disk.
            let _ = s.pusher.blocking_send(Msg::New(p));
        }
    }
    left
}

/// Writes the incident files of `group` (indices into `batch`), asking `go_on` before each
/// file after the first and stopping when it says no, then one directory `fsync`; the first
/// revisions among them are then durable (the metric). Returns how many of `group` it took
/// (written, or failed and counted).
fn write_group(
    s: &Sinks,
    sp: &Spool,
    batch: &[&Queued],
    group: &[usize],
    go_on: &mut dyn FnMut() -> bool,
) -> usize {
    let mut taken = 0;
    let mut durable = Vec::new();
    for &i in group {
        if taken > 0 && !go_on() {
            break;
        }
        taken += 1;
        let q = batch[i];
        let d = crate::document::for_incident(&s.header, s.path.as_deref(), &q.inc, &q.stats);
        let doc = serde_json::to_vec_pretty(&d).unwrap_or_default();
        match sp.write_incident(&q.inc.id.0, &doc) {
            Ok(()) => durable.push(i),
            Err(e) => {
                s.metrics.spool_error(e.op);
                eprintln!(
                    "itewatch agent: {e}; incident {} kept in memory",
                    q.inc.id.0
                );
            }
        }
    }
    if durable.is_empty() {
        return taken;
    }
    match sp.sync_incidents() {
        Ok(()) => {
            for &i in &durable {
                // The incident's first revision, or a later one queued with it.
                let id = &batch[i].inc.id;
                if let Some(t) = batch
                    .iter()
                    .filter(|q| &q.inc.id == id)
                    .find_map(|q| q.onset)
                {
                    s.metrics.durable(t.elapsed().as_secs_f64());
                }
            }
        }
        Err(e) => {
            s.metrics.spool_error(e.op);
            eprintln!("itewatch agent: {e}; incidents kept in memory");
        }
    }
    taken
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real incident (the first a simulated scenario raises) under id `id`, revision `rev`.
    fn incident(id: &str, rev: u32) -> Incident {
        let mut inc = crate::test_records::first_incident();
        inc.id = crate::correlate::incident::IncidentId(id.to_string());
        inc.revision = rev;
        inc
    }

    fn queued(id: &str, rev: u32, onset: Option<Instant>) -> Box<Queued> {
        Box::new(Queued {
            inc: incident(id, rev),
            stats: Stats::default(),
            line: false,
            pending: None,
            onset,
        })
    }

    fn sinks(dir: &std::path::Path, metrics: Arc<Metrics>) -> (Sinks, mpsc::Receiver<Msg>) {
        let (tx, rx) = mpsc::channel(1024);
        let header = TraceHeader::new(crate::trace::Source::Simulated {
            scenario: "w1-driver-inflight".into(),
            seed: 1,
        });
        let s = Sinks {
            spool: Some(Spool::open(dir, 1 << 30).unwrap()),
            spool_dir: Some(dir.to_path_buf()),
            spool_max_bytes: 1 << 30,
            metrics,
            pusher: tx,
            header,
            path: None,
        };
        (s, rx)
    }

    fn revision_on_disk(dir: &std::path::Path, id: &str) -> u64 {
        let f = dir.join("incidents").join(format!("{id}.json"));
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).unwrap()).unwrap();
        v["incidents"][0]["revision"].as_u64().unwrap()
    }

    /// Queued work never waits for the disk, and dropping the writer finishes all of it, in
    /// order: every incident file, every pending delivery on disk before its hand-over to the
    /// pusher, the hand-overs in queue order.
    #[test]
    fn queued_incidents_are_all_durable_in_order_after_drop() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (s, mut rx) = sinks(d.path(), metrics.clone());
        let w = Writer::spawn(s).unwrap();
        let started = Instant::now();
        let base = incident("0", 0);
        for i in 0..200u32 {
            let mut inc = base.clone();
            inc.id = crate::correlate::incident::IncidentId(format!("{i:016x}"));
            w.send(Job::Incident(Box::new(Queued {
                inc,
                stats: Stats::default(),
                line: false,
                pending: (i % 10 == 0).then(|| Pending {
                    id: format!("d{i}"),
                    alert: serde_json::json!({}),
                    delivered_to: Vec::new(),
                }),
                onset: Some(started),
            })));
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

    /// New incidents go to disk before later revisions of older ones queued ahead of them,
    /// and of several revisions of an incident only the last is written.
    #[test]
    fn plan_puts_first_revisions_first_and_the_last_revision_of_each() {
        let t = Some(Instant::now());
        let b = [
            queued("a", 1, None),
            queued("a", 2, None),
            queued("b", 0, t),
            queued("c", 0, t),
            queued("b", 1, None),
            queued("a", 3, None),
            queued("d", 4, None),
        ];
        let refs: Vec<&Queued> = b.iter().map(|q| &**q).collect();
        assert_eq!(plan(&refs), (vec![4, 3], vec![5, 6]));
    }

    /// A batch of queued incidents pays one directory fsync for its new incidents and one for
    /// the rest (issue 11: one per revision put the last of a burst behind all the others),
    /// and the disk holds each incident's last revision.
    #[test]
    fn a_batch_is_written_with_two_directory_fsyncs_and_its_last_revisions() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (mut s, _rx) = sinks(d.path(), metrics.clone());
        let t = Some(Instant::now());
        let batch: Vec<Job> = [
            queued("a", 1, None),
            queued("b", 0, t),
            queued("c", 0, t),
            queued("b", 1, None),
            queued("a", 2, None),
        ]
        .into_iter()
        .map(Job::Incident)
        .collect();
        assert!(handle(&mut s, batch, &mut Vec::new).is_empty());
        let sp = s.spool.as_ref().unwrap();
        assert_eq!(sp.dir_syncs(), 2);
        assert_eq!(revision_on_disk(d.path(), "a"), 2);
        assert_eq!(revision_on_disk(d.path(), "b"), 1);
        assert_eq!(revision_on_disk(d.path(), "c"), 0);
        let m = metrics.encode();
        assert!(
            m.contains("itewatch_incident_durable_seconds_count 2"),
            "{m}"
        );
    }

    /// Issue 11: a new incident that arrives while later revisions of others are being
    /// written goes to disk before the ones not written yet; those wait, with everything
    /// queued for their incidents, and nothing is lost or reordered within an incident.
    #[test]
    fn a_new_incident_goes_before_the_later_revisions_still_to_write() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let (mut s, mut rx) = sinks(d.path(), metrics.clone());
        let delivery = |q: Box<Queued>| {
            let mut q = q;
            q.pending = Some(Pending {
                id: format!("d-{}", q.inc.id.0),
                alert: serde_json::json!({}),
                delivered_to: Vec::new(),
            });
            Job::Incident(q)
        };
        // Later revisions of a, b and c (no first revision among them); c's has a delivery.
        let batch = vec![
            Job::Incident(queued("a", 3, None)),
            Job::Incident(queued("b", 5, None)),
            Job::Incident(queued("c", 1, None)),
            delivery(queued("c", 2, None)),
        ];
        let on_disk = |id: &str| {
            d.path()
                .join("incidents")
                .join(format!("{id}.json"))
                .exists()
        };
        // While they are written, a new incident arrives: the writer sees it once the first
        // file is written (the queue is looked at between files, not before any).
        let mut new = Some(Job::Incident(queued("n", 0, Some(Instant::now()))));
        let left = handle(&mut s, batch, &mut || {
            assert!(
                on_disk("a"),
                "the queue was looked at before a file was written"
            );
            new.take().into_iter().collect()
        });
        // One revision written (progress), then the new incident preempted the rest.
        assert!(on_disk("a"));
        assert!(!on_disk("b") && !on_disk("c") && !on_disk("n"));
        assert!(
            rx.try_recv().is_err(),
            "c's delivery went out before c was on disk"
        );
        let order: Vec<(String, u32)> = left
            .iter()
            .map(|j| match j {
                Job::Incident(q) => (q.inc.id.0.clone(), q.inc.revision),
                Job::MaxBytes(_) => unreachable!(),
            })
            .collect();
        let want = [("b", 5), ("c", 1), ("c", 2), ("n", 0)];
        assert_eq!(
            order,
            want.map(|(i, r)| (i.to_string(), r)).to_vec(),
            "left for the next batch, in queue order"
        );
        // The next batch: the new incident first (durable, counted), then the others.
        assert!(handle(&mut s, left, &mut Vec::new).is_empty());
        assert_eq!(revision_on_disk(d.path(), "n"), 0);
        assert_eq!(revision_on_disk(d.path(), "b"), 5);
        assert_eq!(revision_on_disk(d.path(), "c"), 2);
        assert!(matches!(rx.try_recv(), Ok(Msg::New(p)) if p.id == "d-c"));
        assert!(metrics
            .encode()
            .contains("itewatch_incident_durable_seconds_count 1"));
    }
}
