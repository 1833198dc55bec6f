//! Pairing a submission with its return, as the kernel runs them: the one rule the correlator,
//! the agent's metrics and the live view's tables share.
//!
//! * A submission runs on a thread, and on that thread until it returns: `qi_submit_sync`
//!   keeps interrupts off from taking the queue lock until it is done, so the thread neither
//!   migrates nor runs anything else in between. The exception is thread 0: every CPU's idle
//!   task is thread 0, and interrupts and softirqs taken while idle run as thread 0 too — the
//!   BPF side keys those by CPU, and so does [`Runner`].
//! * A second submission on the same runner before the first returned is *nested*: an
//!   interrupt taken between the probe and the lock issued it, and it returns first. Returns
//!   pair innermost first.
//! * The exception is a return that was never seen: fexit misses none, but records are lost
//!   when the ring buffer is full. Once [`Pairing::mark_lost`] says records were lost, a new
//!   submission on a runner whose innermost submission was open across the loss replaces it
//!   (its return is lost), instead of nesting on it.

use crate::correlate::state::FastMap;
use crate::event::{KTime, Meta};

/// Who runs a submission: the thread, or for thread 0 the CPU as well.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Runner {
    pub tid: u32,
    /// Set only for thread 0 (one idle task per CPU).
    pub cpu: Option<u32>,
}

impl Runner {
    pub fn of(meta: &Meta) -> Runner {
        Runner {
            tid: meta.tid,
            cpu: (meta.tid == 0).then_some(meta.cpu),
        }
    }
}

/// An open submission's place: its runner and how deep it is nested there (0 = outermost).
pub type PairKey = (Runner, u8);

/// Deepest nesting tracked: a submission deeper than this replaces the innermost one (an
/// interrupt can nest once or twice; more means returns were lost).
pub const MAX_DEPTH: u8 = 4;

struct Open<T> {
    start: KTime,
    /// Records were lost while it was open: its return may be among them.
    lost: bool,
    value: T,
}

/// What opening a submission did to the ones already open.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened<T> {
    /// Nothing was open on the runner.
    Fresh,
    /// It nests on the runner's open submission.
    Nested,
    /// The runner's innermost submission was open across lost records (or nested too deep):
    /// its return is taken as lost and it is handed back.
    ReplacedLost(T),
}

/// Open submissions by [`PairKey`], bounded: past `max`, the oldest is handed back
/// ([`Pairing::open`]'s second value) so the caller can count it.
pub struct Pairing<T> {
    open: FastMap<PairKey, Open<T>>,
    max: usize,
}

impl<T> Pairing<T> {
    pub fn new(max: usize) -> Pairing<T> {
        Pairing {
            open: FastMap::default(),
            max: max.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// The runner's innermost open submission.
    pub fn innermost_key(&self, runner: Runner) -> Option<PairKey> {
        (0..=MAX_DEPTH)
            .rev()
            .map(|d| (runner, d))
            .find(|k| self.open.contains_key(k))
    }

    /// The runner's innermost open submission.
    pub fn innermost(&self, runner: Runner) -> Option<&T> {
        self.innermost_key(runner)
            .and_then(|k| self.open.get(&k))
            .map(|o| &o.value)
    }

    /// A submission starts. Returns where it went, what happened to the runner's open ones,
    /// and the oldest open submission if the table was full (evicted to make room).
    pub fn open(&mut self, meta: &Meta, value: T) -> (PairKey, Opened<T>, Option<T>) {
        let (key, opened, evicted) = self.reserve(meta);
        self.insert(key, meta.ts, value);
        (key, opened, evicted)
    }

    /// [`Pairing::open`] in two steps, for a caller that builds the value knowing its key:
    /// makes room and says where a submission on `meta` goes; [`Pairing::insert`] puts it.
    pub fn reserve(&mut self, meta: &Meta) -> (PairKey, Opened<T>, Option<T>) {
        let runner = Runner::of(meta);
        let (depth, opened) = match self.innermost_key(runner) {
            None => (0, Opened::Fresh),
            Some(k) if self.open[&k].lost || k.1 >= MAX_DEPTH => {
                let old = self.open.remove(&k).expect("innermost is open");
                (k.1, Opened::ReplacedLost(old.value))
            }
            Some(k) => (k.1 + 1, Opened::Nested),
        };
        let mut evicted = None;
        if self.open.len() >= self.max {
            if let Some(k) = self
                .open
                .iter()
                .min_by_key(|(k, o)| (o.start, **k))
                .map(|(k, _)| *k)
            {
                evicted = self.open.remove(&k).map(|o| o.value);
            }
        }
        ((runner, depth), opened, evicted)
    }

    /// Puts a submission at the key [`Pairing::reserve`] gave.
    pub fn insert(&mut self, key: PairKey, start: KTime, value: T) {
        self.open.insert(
            key,
            Open {
                start,
                lost: false,
                value,
            },
        );
    }

    /// A submission returned on `meta`'s runner: the innermost open one there, with its start.
    pub fn close(&mut self, meta: &Meta) -> Option<(KTime, T)> {
        let k = self.innermost_key(Runner::of(meta))?;
        self.open.remove(&k).map(|o| (o.start, o.value))
    }

    /// Records were lost: any open submission's return may be among them.
    pub fn mark_lost(&mut self) {
        for o in self.open.values_mut() {
            o.lost = true;
        }
    }

    /// Takes one out (to work on it alongside `&mut self` of the owner); [`Pairing::put`]
    /// puts it back where it was.
    pub fn take(&mut self, key: &PairKey) -> Option<(KTime, bool, T)> {
        self.open.remove(key).map(|o| (o.start, o.lost, o.value))
    }

    pub fn put(&mut self, key: PairKey, (start, lost, value): (KTime, bool, T)) {
        self.open.insert(key, Open { start, lost, value });
    }

    /// The keys of the open submissions `pred` accepts, oldest first.
    pub fn keys_where(&self, pred: impl Fn(&T) -> bool) -> Vec<PairKey> {
        let mut v: Vec<(KTime, PairKey)> = self
            .open
            .iter()
            .filter(|(_, o)| pred(&o.value))
            .map(|(k, o)| (o.start, *k))
            .collect();
        v.sort_unstable();
        v.into_iter().map(|(_, k)| k).collect()
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.open.values().map(|o| &o.value)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.open.values_mut().map(|o| &mut o.value)
    }

    /// Empties the table, oldest first.
    pub fn drain(&mut self) -> Vec<T> {
        let mut v: Vec<(KTime, PairKey, T)> = self
            .open
            .drain()
            .map(|(k, o)| (o.start, k, o.value))
            .collect();
        v.sort_unstable_by_key(|(s, k, _)| (*s, *k));
        v.into_iter().map(|(_, _, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Comm;

    fn meta(ts: u64, cpu: u32, tid: u32) -> Meta {
        Meta {
            ts: KTime(ts),
            cpu,
            pid: tid,
            tid,
            comm: Comm::new("t"),
        }
    }

    #[test]
    fn thread_zero_on_two_cpus_are_two_runners() {
        let mut p = Pairing::new(16);
        assert_eq!(p.open(&meta(1, 0, 0), "cpu0").1, Opened::Fresh);
        assert_eq!(p.open(&meta(2, 1, 0), "cpu1").1, Opened::Fresh);
        assert_eq!(p.close(&meta(3, 0, 0)), Some((KTime(1), "cpu0")));
        assert_eq!(p.close(&meta(4, 1, 0)), Some((KTime(2), "cpu1")));
        // A thread other than 0 is one runner whatever the CPU.
        p.open(&meta(5, 0, 7), "t7");
        assert_eq!(p.close(&meta(6, 1, 7)), Some((KTime(5), "t7")));
        assert!(p.is_empty());
    }

    #[test]
    fn a_nested_submission_returns_first_and_the_outer_one_stays_open() {
        let mut p = Pairing::new(16);
        p.open(&meta(1, 0, 9), "outer");
        let (k, how, _) = p.open(&meta(2, 0, 9), "inner");
        assert_eq!(how, Opened::Nested);
        assert_eq!(k.1, 1);
        assert_eq!(p.close(&meta(3, 0, 9)), Some((KTime(2), "inner")));
        assert_eq!(p.close(&meta(4, 0, 9)), Some((KTime(1), "outer")));
        assert_eq!(p.close(&meta(5, 0, 9)), None);
    }

    #[test]
    fn after_lost_records_a_new_submission_replaces_the_open_one() {
        let mut p = Pairing::new(16);
        p.open(&meta(1, 0, 9), "before the loss");
        p.mark_lost();
        let (k, how, _) = p.open(&meta(2, 0, 9), "after");
        assert_eq!(how, Opened::ReplacedLost("before the loss"));
        assert_eq!(k.1, 0);
        assert_eq!(p.close(&meta(3, 0, 9)), Some((KTime(2), "after")));
        assert!(p.is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_hands_back_the_oldest() {
        let mut p = Pairing::new(2);
        p.open(&meta(1, 0, 1), 1);
        p.open(&meta(2, 0, 2), 2);
        let (_, _, evicted) = p.open(&meta(3, 0, 3), 3);
        assert_eq!(evicted, Some(1));
        assert_eq!(p.len(), 2);
        assert_eq!(p.drain(), vec![2, 3]);
    }

    #[test]
    fn nesting_deeper_than_the_bound_replaces_the_innermost() {
        let mut p = Pairing::new(64);
        for d in 0..=MAX_DEPTH {
            assert_eq!(p.open(&meta(u64::from(d), 0, 9), d).0 .1, d);
        }
        let (k, how, _) = p.open(&meta(100, 0, 9), 100);
        assert_eq!(how, Opened::ReplacedLost(MAX_DEPTH));
        assert_eq!(k.1, MAX_DEPTH);
    }
}
