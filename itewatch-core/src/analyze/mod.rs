//! `itewatch analyze`: post-mortem diagnosis from kernel logs (docs/analyze.md).
//!
//! When the race bites, the host usually hard-locks and no trace survives; a serial console,
//! netconsole, pstore or `journalctl -k -b -1` capture often does. This module reads such logs
//! in any of the usual dialects ([`lines`]), recognises the messages that matter ([`facts`]),
//! groups them per boot, and reconstructs the same [`Incident`]s the correlator produces from a
//! trace, each with the [`Evidence`] lines it rests on and how firmly ([`Certainty`]).
//!
//! It refuses to guess: a diagnosis names the lines behind every claim, says what the log does
//! not tell, and a DMA fault, an AER report or a removal without invalidation trouble is a
//! note, never an incident. Memory is bounded whatever the input: lines are cut at
//! [`lines::MAX_LINE_BYTES`], every per-boot list has a cap (overflow counted), and boots are
//! diagnosed and dropped one at a time.

pub mod facts;
pub mod input;
pub mod lines;

use std::collections::BTreeMap;
use std::io::{BufRead, Read};

use serde::{Deserialize, Serialize};

use crate::correlate::describe;
use crate::correlate::detect::{fix_hint, FixHint};
use crate::correlate::incident::{
    Attribution, Certainty, DeviceState, Evidence, EvidenceLine, Incident, IncidentDevice,
    IncidentId, IncidentKind, Outcome, RemovalKind, Severity, TimelineEntry, Window,
};
use crate::event::{Bdf, CallerPath, KTime, Sid};

use facts::{Fact, ReportKind, SlotWhat};
use lines::{BootMark, Caller, Dialect, LineReader, Normalizer, Rec};

/// Bounds and thresholds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Options {
    /// Incidents kept in total (more are counted).
    pub max_incidents: usize,
    /// Unparsed-line entries kept (more are counted).
    pub max_unparsed: usize,
    /// Supporting lines per incident.
    pub max_evidence: usize,
    /// Boot summaries kept.
    pub max_boots: usize,
    /// A removal this long before a stuck invalidation is "before it" (monotonic clock).
    pub removal_window_ns: u64,
    /// ITE lines this far apart are one burst.
    pub ite_gap_ns: u64,
    /// An ITE burst and a stuck task this close are about the same invalidation.
    pub link_window_ns: u64,
    /// This many ITE reports in one burst is the kernel's retry loop.
    pub ite_loop_reports: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_incidents: 1000,
            max_unparsed: 200,
            max_evidence: 48,
            max_boots: 256,
            removal_window_ns: 300 * SEC,
            ite_gap_ns: 60 * SEC,
            link_window_ns: 120 * SEC,
            ite_loop_reports: 3,
        }
    }
}

const SEC: u64 = 1_000_000_000;
/// Per-boot caps.
const MAX_ITE_LINES: usize = 4096;
const MAX_SLOT_LINES: usize = 2048;
const MAX_BLOCKS: usize = 256;
const MAX_OPEN_BLOCKS: usize = 32;
const MAX_FRAMES: usize = 96;
const MAX_DEVICES: usize = 8192;
const MAX_NOTE_EXAMPLES: usize = 3;
const MAX_TEXT: usize = 512;
/// A report block closes after this many unrelated lines in a row.
const BLOCK_NOISE: u32 = 16;

/// One boot of the log, as far as its lines tell.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootInfo {
    pub index: u32,
    /// `_BOOT_ID` / `-- Boot <id> --` when the journal gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub first_line: u64,
    pub last_line: u64,
    pub records: u64,
    /// `monotonic` (dmesg stamps), `wall` (only wall-clock stamps: times are relative to the
    /// boot's first line), or `none`.
    pub clock: String,
    pub hostname: Option<String>,
    pub kernel_release: Option<String>,
    pub kernel_cmdline: Option<String>,
    pub cpu_model: Option<String>,
    /// `DMAR: dmarN: reg_base_addr .. ver .. cap .. ecap ..` lines.
    pub iommu_units: Vec<LogIommuUnit>,
    /// Devices the incidents of this boot are about, with what the log told about them.
    pub devices: Vec<LogDevice>,
}

/// A VT-d unit as its boot line describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogIommuUnit {
    pub name: String,
    pub version: Option<String>,
    pub address: Option<u64>,
    pub cap: Option<u64>,
    pub ecap: Option<u64>,
}

/// A device named by an incident.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogDevice {
    pub bdf: Bdf,
    pub vendor: Option<u16>,
    pub device: Option<u16>,
    pub driver: Option<String>,
    pub slot: Option<String>,
}

/// Something the log shows that is not an incident (and is said so, not dropped).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Note {
    /// `dma-fault` (a DMA remapping fault: not an ITE), `iqe`, `ice`, `aer`, `dpc`,
    /// `removal` (hot-plug without invalidation trouble), `panic`, `stack-without-invalidation`,
    /// `invalidation-stack-without-hang` (a KCSAN, lockdep, sysrq, WARN or dump_stack report
    /// with an invalidation function on its stack: nothing says it was stuck),
    /// `duplicate-episode` (incidents of a later boot that repeat earlier ones stamp for
    /// stamp: the same log pasted twice).
    pub kind: String,
    pub boot: u32,
    pub count: u64,
    pub first_line: u64,
    /// Up to three example lines.
    pub examples: Vec<EvidenceLine>,
}

/// A line the analyzer could not read fully.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unparsed {
    pub line: u64,
    pub reason: String,
    /// The line (cut at 200 bytes).
    pub text: String,
}

/// The result of reading one log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Analysis {
    pub lines: u64,
    pub bytes: u64,
    pub records: u64,
    /// Records per dialect name.
    pub dialects: BTreeMap<String, u64>,
    /// Quoted-printable decoding was switched on (a mail archive).
    pub quoted_printable: bool,
    pub boots: Vec<BootInfo>,
    pub boots_omitted: u64,
    pub incidents: Vec<Incident>,
    pub incidents_omitted: u64,
    pub notes: Vec<Note>,
    pub unparsed: Vec<Unparsed>,
    /// All unparsed lines, including those left out of `unparsed`.
    pub unparsed_count: u64,
    /// Per-boot lists that hit their cap (what was dropped).
    pub overflow: Vec<String>,
    /// Reading stopped early (an I/O error); everything before it was analysed.
    pub read_error: Option<String>,
}

fn cut(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut i = n;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    format!("{}…", &s[..i])
}

/// A line kept as evidence.
#[derive(Clone, Debug)]
struct LineRef {
    line: u64,
    ts: u64,
    cpu: Option<u32>,
    fact: &'static str,
    text: String,
    /// The line's own timestamp as printed (wall-clock dialects).
    stamp: Option<String>,
}

impl LineRef {
    fn evidence(&self) -> EvidenceLine {
        EvidenceLine {
            line: self.line,
            fact: self.fact.to_string(),
            text: self.text.clone(),
            time: self.stamp.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum IteWhat {
    Detected(Option<Sid>),
    /// `SID ffff`: an ITE with an invalid (all-ones) SID.
    DetectedAllOnes,
    Cleared,
    /// A `QI HEAD` (`prior` false) or `QI PRIOR` descriptor; its SID when it is a
    /// device-TLB one.
    Desc {
        sid: Option<Sid>,
        prior: bool,
    },
    Reg,
}

#[derive(Clone, Debug)]
struct IteLine {
    r: LineRef,
    what: IteWhat,
}

#[derive(Clone, Debug)]
struct SlotLine {
    r: LineRef,
    port: Option<Bdf>,
    slot: String,
    what: SlotWhat,
}

#[derive(Clone, Debug)]
struct Frame {
    sym: String,
    reliable: bool,
    r: LineRef,
}

/// One watchdog/oops report with its call trace.
#[derive(Clone, Debug)]
struct Block {
    kind: ReportKind,
    header: LineRef,
    cpu: Option<u32>,
    pid: Option<u32>,
    comm: Option<String>,
    stuck_s: Option<u64>,
    task_line: Option<LineRef>,
    frames: Vec<Frame>,
    frames_omitted: u32,
    noise: u32,
    ended: bool,
    last_line: u64,
    /// A call trace (`Call Trace:`, `<TASK>`, `RIP:` or a frame) has started: lines without
    /// offsets are read as frames from here on.
    in_trace: bool,
    /// The last trace line read was the bottom of a stack (`ret_from_fork`, `</IRQ>` ..): a
    /// log that ends here ends with the trace, not in the middle of it.
    at_bottom: bool,
    /// A report that says a CPU or task is stuck: a hard or soft lockup, an RCU stall, a hung
    /// task, or an NMI backtrace one of those asked for. KCSAN, lockdep, sysrq, WARN and
    /// dump_stack traces are not: an invalidation in their frames was only passing by.
    hang: bool,
}

impl Block {
    fn new(kind: ReportKind, header: LineRef) -> Self {
        Block {
            kind,
            last_line: header.line,
            header,
            cpu: None,
            pid: None,
            comm: None,
            stuck_s: None,
            task_line: None,
            frames: Vec::new(),
            frames_omitted: 0,
            noise: 0,
            ended: false,
            in_trace: false,
            at_bottom: false,
            hang: matches!(
                kind,
                ReportKind::HardLockup
                    | ReportKind::SoftLockup
                    | ReportKind::RcuStall
                    | ReportKind::HungTask
            ),
        }
    }
}

#[derive(Default)]
struct NoteAcc {
    count: u64,
    first_line: u64,
    examples: Vec<EvidenceLine>,
}

/// Everything remembered about the boot being read.
#[derive(Default)]
struct BootState {
    info: BootInfo,
    has_kernel_records: bool,
    last_mono: Option<u64>,
    /// The earliest monotonic stamp this boot has shown.
    first_mono: Option<u64>,
    first_wall: Option<i64>,
    last_ts: u64,
    mono: u64,
    wall: u64,
    ite: Vec<IteLine>,
    /// The last `VT-d detected ..` kind, so QI HEAD/PRIOR lines go to the right fault.
    last_detected: Option<&'static str>,
    slots: Vec<SlotLine>,
    blocks: Vec<Block>,
    open: BTreeMap<Option<Caller>, Block>,
    enumerated: BTreeMap<Bdf, (u16, u16)>,
    drivers: BTreeMap<Bdf, String>,
    group_removed: BTreeMap<Bdf, LineRef>,
    notes: BTreeMap<&'static str, NoteAcc>,
    overflow: BTreeMap<&'static str, u64>,
    panic: Option<LineRef>,
    /// Who asked for the NMI backtraces that follow: a watchdog or stall report (true) or
    /// sysrq (false), with the time it did.
    nmi_cause: Option<(bool, u64)>,
    /// A hang report closed before its registers and frames came (a WARN printed from the
    /// NMI handler cut in): its CPU and time. The next `CPU: N ...` dump of that CPU is its.
    pending_hang: Option<(Option<u32>, u64)>,
}

/// An NMI backtrace this long after a watchdog or stall report is still about it.
const NMI_CAUSE_WINDOW_NS: u64 = 60 * SEC;

/// Counts one more `kind` note at `r` (its first line and up to three examples kept).
fn add_note(notes: &mut BTreeMap<&'static str, NoteAcc>, kind: &'static str, r: &LineRef) {
    let n = notes.entry(kind).or_default();
    if n.count == 0 {
        n.first_line = r.line;
    }
    n.count += 1;
    if n.examples.len() < MAX_NOTE_EXAMPLES {
        n.examples.push(r.evidence());
    }
}

impl BootState {
    fn note(&mut self, kind: &'static str, r: &LineRef) {
        add_note(&mut self.notes, kind, r);
    }
    fn overflowed(&mut self, what: &'static str) {
        *self.overflow.entry(what).or_default() += 1;
    }
    fn close_block(&mut self, key: &Option<Caller>) {
        if let Some(b) = self.open.remove(key) {
            self.push_block(b);
        }
    }
    fn push_block(&mut self, b: Block) {
        // An RCU stall header is followed by NMI backtraces, not by registers of its own.
        if b.hang && b.frames.is_empty() && b.task_line.is_none() && b.kind != ReportKind::RcuStall
        {
            self.pending_hang = Some((b.cpu, b.header.ts));
        }
        if self.blocks.len() < MAX_BLOCKS {
            self.blocks.push(b);
        } else {
            self.overflowed("call-trace reports");
        }
    }
    fn open_block(&mut self, key: Option<Caller>, b: Block) {
        self.close_block(&key);
        if self.open.len() >= MAX_OPEN_BLOCKS {
            // Close the oldest to stay bounded.
            if let Some(k) = self
                .open
                .iter()
                .min_by_key(|(_, b)| b.last_line)
                .map(|(k, _)| *k)
            {
                self.close_block(&k);
            }
        }
        self.open.insert(key, b);
    }
}

/// Streaming analyzer: feed lines, then [`Analyzer::finish`].
pub struct Analyzer {
    norm: Normalizer,
    core: Core,
}

struct Core {
    opts: Options,
    out: Analysis,
    boot: BootState,
    boot_index: u32,
    /// A record that looks cut short, waiting one record for its continuation.
    pending: Option<(Rec<'static>, Option<Fact>)>,
}

impl Analyzer {
    pub fn new(opts: Options) -> Self {
        Analyzer {
            norm: Normalizer::new(),
            core: Core {
                opts,
                out: Analysis::default(),
                boot: BootState::default(),
                boot_index: 0,
                pending: None,
            },
        }
    }

    /// Feeds one raw line (without its newline); `cut` says it was longer than the cap.
    pub fn feed_line(&mut self, line_no: u64, raw: &[u8], cut: bool) {
        let core = &mut self.core;
        core.out.lines = core.out.lines.max(line_no);
        if cut {
            core.unparsed(line_no, "longer than 16 KiB: the rest was skipped", raw);
        }
        let text = match std::str::from_utf8(raw) {
            Ok(s) => std::borrow::Cow::Borrowed(s),
            Err(_) => {
                // Binary garbage (or a non-UTF-8 console): read what is readable.
                let bad = raw.iter().filter(|b| **b < 0x09 || **b == 0x7f).count();
                if bad > raw.len() / 4 {
                    core.unparsed(line_no, "binary data", raw);
                    return;
                }
                String::from_utf8_lossy(raw)
            }
        };
        self.norm
            .feed_text(line_no, raw, text, &mut |rec| core.accept(rec));
    }

    /// Ends the input and diagnoses what is left.
    pub fn finish(mut self, bytes: u64) -> Analysis {
        let core = &mut self.core;
        self.norm.finish(&mut |rec| core.accept(rec));
        if let Some((rec, fact)) = self.core.pending.take() {
            self.core.on_record(rec, fact, None);
        }
        self.core.end_boot();
        let mut out = self.core.out;
        drop_pasted_twice(&mut out);
        out.bytes = bytes;
        out.quoted_printable = self.norm.qp;
        out
    }
}

/// The same episode pasted twice (a bug report quoting the log again, re-wrapped or not)
/// reads as a second boot with the same incidents at the same kernel timestamps. A reboot
/// never repeats an incident's own stamps to the nanosecond: a later incident identical in
/// kind, window, device and start/end time to one of an earlier boot is that one again. It is
/// dropped and said in a `duplicate-episode` note.
fn drop_pasted_twice(out: &mut Analysis) {
    type Print = (String, Option<Window>, Option<Sid>, u64, u64);
    let print = |i: &Incident| -> Print {
        (
            i.kind.name().to_string(),
            i.window,
            i.device.sid,
            i.start.0,
            i.end.0,
        )
    };
    let mut seen: BTreeMap<Print, u32> = BTreeMap::new();
    let mut dropped: Vec<(u32, u64)> = Vec::new();
    out.incidents.retain(|i| {
        let boot = i.evidence.as_ref().map_or(0, |e| e.boot);
        let line = i
            .evidence
            .as_ref()
            .and_then(|e| e.lines.first())
            .map_or(0, |l| l.line);
        match seen.get(&print(i)) {
            // An incident at time 0 has no stamp to compare: kept.
            Some(b) if *b != boot && i.start.0 != 0 => {
                dropped.push((boot, line));
                false
            }
            Some(_) => true,
            None => {
                seen.insert(print(i), boot);
                true
            }
        }
    });
    if let Some(&(boot, first_line)) = dropped.first() {
        out.notes.push(Note {
            kind: "duplicate-episode".into(),
            boot,
            count: dropped.len() as u64,
            first_line,
            examples: Vec::new(),
        });
    }
}

/// Analyses a whole log from a reader. I/O errors stop reading and are reported in
/// [`Analysis::read_error`]; what was read is analysed.
pub fn analyze<R: BufRead>(input: R, opts: Options) -> Analysis {
    let mut reader = LineReader::new(input);
    let mut a = Analyzer::new(opts);
    let mut err = None;
    loop {
        match reader.next_line() {
            Ok(Some((n, l, cut))) => a.feed_line(n, l, cut),
            Ok(None) => break,
            Err(e) => {
                err = Some(format!(
                    "read error after line {} (byte {}): {e}",
                    reader_line(&a),
                    reader.bytes()
                ));
                break;
            }
        }
    }
    let bytes = reader.bytes();
    let mut out = a.finish(bytes);
    out.read_error = err;
    out
}

fn reader_line(a: &Analyzer) -> u64 {
    a.core.out.lines
}

/// Analyses a log held in memory.
pub fn analyze_bytes(data: &[u8], opts: Options) -> Analysis {
    analyze(data, opts)
}

/// Analyses a log from any reader (buffered internally).
pub fn analyze_read<R: Read>(input: R, opts: Options) -> Analysis {
    analyze(std::io::BufReader::with_capacity(1 << 16, input), opts)
}

impl Core {
    fn unparsed(&mut self, line: u64, reason: &str, raw: &[u8]) {
        self.out.unparsed_count += 1;
        if self.out.unparsed.len() < self.opts.max_unparsed {
            let text = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
            self.out.unparsed.push(Unparsed {
                line,
                reason: reason.to_string(),
                text,
            });
        }
    }

    fn new_boot(&mut self, id: Option<String>) {
        self.end_boot();
        self.boot_index = self.boot_index.saturating_add(1);
        self.boot.info.index = self.boot_index;
        self.boot.info.id = id;
    }

    fn end_boot(&mut self) {
        let mut boot = std::mem::take(&mut self.boot);
        if boot.info.records == 0 {
            // Nothing in it (a marker right at the start): keep its id for the next one.
            self.boot.info.id = boot.info.id;
            self.boot.info.index = boot.info.index;
            return;
        }
        let keys: Vec<_> = boot.open.keys().copied().collect();
        for k in keys {
            boot.close_block(&k);
        }
        boot.info.clock = if boot.mono > 0 {
            "monotonic"
        } else if boot.wall > 0 {
            "wall"
        } else {
            "none"
        }
        .to_string();
        diagnose(&mut boot, &self.opts, &mut self.out);
        for (what, n) in &boot.overflow {
            self.out.overflow.push(format!(
                "boot {}: {n} {what} dropped (per-boot cap)",
                boot.info.index
            ));
        }
        if self.out.boots.len() < self.opts.max_boots {
            self.out.boots.push(boot.info);
        } else {
            self.out.boots_omitted += 1;
        }
    }

    /// Takes the next record, joining it to the one before when that one was cut short by a
    /// wrapping console or collector and this one is its continuation.
    fn accept(&mut self, rec: Rec<'_>) {
        let fact = if rec.not_kernel {
            None
        } else {
            facts::classify(&rec.text)
        };
        if let Some((held, held_fact)) = self.pending.take() {
            if let Some((joined, joined_fact)) =
                join_wrapped(&held, held_fact.as_ref(), &rec, fact.as_ref())
            {
                self.on_record(joined, Some(joined_fact), Some(rec.line));
                return;
            }
            self.on_record(held, held_fact, None);
        }
        if looks_cut(&rec.text, fact.as_ref()) {
            self.pending = Some((rec.into_owned(), fact));
            return;
        }
        self.on_record(rec, fact, None);
    }

    /// One record with what it says (`fact`, from [`facts::classify`]); `joined` names the
    /// continuation line that was joined onto it.
    fn on_record(&mut self, rec: Rec<'_>, fact: Option<Fact>, joined: Option<u64>) {
        self.out.records += 1;
        // Look up before inserting: `entry` would allocate the key on every record.
        match self.out.dialects.get_mut(rec.dialect.name()) {
            Some(n) => *n += 1,
            None => {
                self.out.dialects.insert(rec.dialect.name().to_string(), 1);
            }
        }
        // Boot boundaries.
        if let BootMark::Explicit(id) = &rec.boot {
            let differs = match (&self.boot.info.id, id) {
                (Some(a), Some(b)) => a != b,
                (None, Some(_)) => {
                    self.boot.info.records > 0 && rec.dialect != Dialect::JournalJson
                        || self.boot.has_kernel_records
                }
                (_, None) => true,
            };
            if differs && self.boot.info.records > 0 {
                self.new_boot(id.clone());
            } else if self.boot.info.id.is_none() {
                self.boot.info.id = id.clone();
            }
            if rec.text.is_empty() {
                return;
            }
        }
        if let Some(ns) = rec.mono_ns {
            if let Some(last) = self.boot.last_mono {
                // A reboot starts its clock again: back to its first seconds, or below
                // anything this boot has shown. A stamp that goes back but stays within this
                // boot's time is another CPU's: a CPU spinning with interrupts off keeps
                // printing with its clock frozen (seen on 6.1 under the emulated ITE: the
                // spinning CPU's lines at 16.1 s among the other CPU's at 37 s).
                let first = self.boot.first_mono.unwrap_or(0);
                let rebooted = ns < 5 * SEC || ns.saturating_add(5 * SEC) < first;
                if ns.saturating_add(5 * SEC) < last
                    && rebooted
                    && rec.dialect != Dialect::JournalJson
                {
                    self.new_boot(None);
                }
            }
        }
        if matches!(fact, Some(Fact::LinuxVersion { .. })) && self.boot.has_kernel_records {
            self.new_boot(None);
        }
        let b = &mut self.boot;
        if b.info.records == 0 {
            b.info.first_line = rec.line;
            b.info.index = self.boot_index;
        }
        b.info.records += 1;
        b.info.last_line = rec.line;
        if rec.dialect != Dialect::Bare && !rec.not_kernel {
            b.has_kernel_records = true;
        }
        if b.info.hostname.is_none() {
            if let Some(h) = &rec.host {
                b.info.hostname = Some(cut(h, 128));
            }
        }
        // Time: monotonic when printed; else wall clock relative to the boot's first stamp;
        // else the previous line's.
        let ts = if let Some(ns) = rec.mono_ns {
            b.last_mono = Some(ns);
            b.first_mono = Some(b.first_mono.map_or(ns, |f| f.min(ns)));
            b.mono += 1;
            ns
        } else if let Some(w) = rec.wall_ns {
            b.wall += 1;
            let first = *b.first_wall.get_or_insert(w);
            w.saturating_sub(first).max(0) as u64
        } else {
            b.last_ts
        };
        b.last_ts = ts;
        let cpu = match rec.caller {
            Some(Caller::Cpu(c)) => Some(c),
            _ => None,
        };
        let Some(fact) = fact else {
            self.plain_record(&rec);
            return;
        };
        let lr = |name: &'static str| LineRef {
            line: rec.line,
            ts,
            cpu,
            fact: name,
            text: cut(&rec.text, MAX_TEXT),
            stamp: rec.stamp.as_deref().map(str::to_string),
        };
        if let Some(n) = joined {
            let mut r = lr("wrapped-line");
            r.text = cut(&format!("lines {}+{n}: {}", rec.line, rec.text), MAX_TEXT);
            b.note("wrapped-line-joined", &r);
        }
        let key = rec.caller;
        match fact {
            Fact::IteDetected { sid, all_ones } => {
                b.last_detected = Some("ite");
                let what = if all_ones {
                    IteWhat::DetectedAllOnes
                } else {
                    IteWhat::Detected(sid)
                };
                push_ite(b, lr("ite-detected"), what);
            }
            Fact::IqeDetected { .. } => {
                b.last_detected = Some("iqe");
                b.note("iqe", &lr("iqe-detected"));
            }
            Fact::IceDetected { .. } => {
                b.last_detected = Some("ice");
                b.note("ice", &lr("ice-detected"));
            }
            Fact::QiDesc {
                prior, dev_tlb_sid, ..
            } => {
                let name = if prior { "qi-prior" } else { "qi-head" };
                match b.last_detected {
                    Some("iqe") => b.note("iqe", &lr(name)),
                    Some("ice") => b.note("ice", &lr(name)),
                    _ => push_ite(
                        b,
                        lr(name),
                        IteWhat::Desc {
                            sid: dev_tlb_sid,
                            prior,
                        },
                    ),
                }
            }
            Fact::Cleared { what } => match what {
                "ITE" => push_ite(b, lr("ite-cleared"), IteWhat::Cleared),
                "IQE" => b.note("iqe", &lr("iqe-cleared")),
                _ => b.note("ice", &lr("ice-cleared")),
            },
            Fact::FaultStatus { reg } => {
                if reg & 0x40 != 0 {
                    push_ite(b, lr("fault-status-ite"), IteWhat::Reg);
                } else if reg & 0x30 != 0 {
                    b.note(
                        if reg & 0x10 != 0 { "iqe" } else { "ice" },
                        &lr("fault-status"),
                    );
                } else {
                    b.note("dma-fault", &lr("fault-status"));
                }
            }
            Fact::DmaFault { .. } => b.note("dma-fault", &lr("dma-fault")),
            Fact::Slot { port, slot, what } => {
                let r = lr(what.name());
                if b.slots.len() < MAX_SLOT_LINES {
                    b.slots.push(SlotLine {
                        r,
                        port,
                        slot,
                        what,
                    });
                } else {
                    b.overflowed("pciehp lines");
                }
            }
            Fact::Dpc { .. } => b.note("dpc", &lr("dpc")),
            Fact::Aer { .. } => b.note("aer", &lr("aer")),
            Fact::ReportHeader {
                kind,
                cpu: c,
                comm,
                pid,
                stuck_s,
            } => {
                let mut blk = Block::new(kind, lr(kind.name()));
                if blk.hang {
                    b.nmi_cause = Some((true, ts));
                } else if kind == ReportKind::NmiBacktrace {
                    blk.hang = b.nmi_cause.is_some_and(|(watchdog, at)| {
                        watchdog && ts.saturating_sub(at) <= NMI_CAUSE_WINDOW_NS
                    });
                }
                blk.cpu = c;
                blk.comm = comm;
                blk.pid = pid;
                blk.stuck_s = stuck_s;
                b.open_block(key, blk);
            }
            Fact::Task {
                cpu: c,
                pid,
                comm,
                release,
            } => {
                if b.info.kernel_release.is_none() {
                    b.info.kernel_release = release;
                }
                let r = lr("task");
                let fresh = match b.open.get(&key) {
                    Some(o) => o.task_line.is_some() && !o.frames.is_empty(),
                    None => true,
                };
                if fresh {
                    let mut blk = Block::new(ReportKind::Dump, r.clone());
                    if let Some((hc, at)) = b.pending_hang {
                        if (hc.is_none() || c.is_none() || hc == c)
                            && ts.saturating_sub(at) <= NMI_CAUSE_WINDOW_NS
                        {
                            blk.hang = true;
                            b.pending_hang = None;
                        }
                    }
                    b.open_block(key, blk);
                }
                if let Some(o) = b.open.get_mut(&key) {
                    o.cpu = o.cpu.or(c);
                    o.pid = o.pid.or(pid);
                    if o.comm.is_none() {
                        o.comm = Some(comm);
                    }
                    o.task_line = Some(r);
                    o.noise = 0;
                    o.last_line = rec.line;
                }
            }
            Fact::Frame { sym, reliable } => {
                let bottom = reliable && facts::bottom_frame(&sym);
                if !b.open.contains_key(&key) {
                    b.open_block(key, Block::new(ReportKind::Dump, lr("frame")));
                }
                if let Some(o) = b.open.get_mut(&key) {
                    if o.frames.len() < MAX_FRAMES {
                        o.frames.push(Frame {
                            sym,
                            reliable,
                            r: lr("frame"),
                        });
                    } else {
                        o.frames_omitted += 1;
                    }
                    o.noise = 0;
                    o.last_line = rec.line;
                    o.in_trace = true;
                    o.at_bottom = bottom;
                }
            }
            Fact::TraceContext => {
                if let Some(o) = b.open.get_mut(&key) {
                    o.noise = 0;
                    o.last_line = rec.line;
                    o.in_trace = true;
                    o.at_bottom = rec.text.trim() == "</IRQ>";
                }
            }
            Fact::TraceEnd => {
                if let Some(o) = b.open.get_mut(&key) {
                    o.ended = true;
                }
                b.close_block(&key);
            }
            Fact::Panic { .. } => {
                let r = lr("panic");
                if b.panic.is_none() {
                    b.panic = Some(r.clone());
                }
                b.note("panic", &r);
                b.close_block(&key);
            }
            Fact::IommuGroupRemove { bdf } => {
                if b.group_removed.len() < MAX_DEVICES {
                    b.group_removed.insert(bdf, lr("iommu-group-remove"));
                }
            }
            Fact::Enumerated {
                bdf,
                vendor,
                device,
            } => {
                if b.enumerated.len() < MAX_DEVICES {
                    b.enumerated.insert(bdf, (vendor, device));
                }
            }
            Fact::DriverSays { bdf, driver } => {
                if b.drivers.len() < MAX_DEVICES {
                    b.drivers.entry(bdf).or_insert(driver);
                }
            }
            Fact::LinuxVersion { release } => b.info.kernel_release = Some(release),
            Fact::CommandLine { cmdline } => {
                if b.info.kernel_cmdline.is_none() {
                    b.info.kernel_cmdline = Some(cmdline)
                }
            }
            Fact::CpuModel { model } => b.info.cpu_model = Some(model),
            Fact::DmarUnit {
                name,
                version,
                address,
                cap,
                ecap,
            } => {
                if b.info.iommu_units.len() < 64
                    && !b.info.iommu_units.iter().any(|u| u.name == name)
                {
                    b.info.iommu_units.push(LogIommuUnit {
                        name,
                        version,
                        address,
                        cap,
                        ecap,
                    });
                }
            }
            Fact::Sysrq { .. } => {
                b.nmi_cause = Some((false, ts));
                b.note("sysrq", &lr("sysrq"));
            }
            Fact::Mangled { keyword } => {
                let text = rec.text.to_string();
                self.unparsed(
                    rec.line,
                    &format!("looks like \"{keyword}\" but does not match the kernel's format (cut or mangled?)"),
                    text.as_bytes(),
                );
                self.plain_record(&rec);
            }
        }
    }

    /// A record with nothing this analyzer reads: count it against open report blocks, and
    /// pick driver names off device lines.
    fn plain_record(&mut self, rec: &Rec<'_>) {
        let b = &mut self.boot;
        // A register dump (`RAX: ..` .. `PKRU: ..`) is part of the report, and so is the rest
        // of one of its lines that a console wrapped onto a bare line right after it: a dump
        // wrapped into many lines must not end the report before its call trace.
        // A wrapped rest has no caller id of its own: it goes to the block of the line before.
        let key = if rec.dialect == Dialect::Bare && !b.open.contains_key(&rec.caller) {
            b.open
                .iter()
                .find(|(_, o)| o.last_line + 1 == rec.line)
                .map_or(rec.caller, |(k, _)| *k)
        } else {
            rec.caller
        };
        if let Some(o) = b.open.get_mut(&key) {
            let regs = facts::register_line(&rec.text)
                || (rec.dialect == Dialect::Bare
                    && o.last_line + 1 == rec.line
                    && facts::register_continuation(&rec.text));
            if regs {
                o.noise = 0;
                o.last_line = rec.line;
                return;
            }
        }
        // Inside a call trace, a line that is only a symbol is a frame whose offset was
        // stripped (pasted traces).
        if b.open.get(&rec.caller).is_some_and(|o| o.in_trace) {
            if let Some(Fact::Frame { sym, reliable }) = facts::bare_frame(&rec.text) {
                let ts = b.last_ts;
                if let Some(o) = b.open.get_mut(&rec.caller) {
                    let r = LineRef {
                        line: rec.line,
                        ts,
                        cpu: match rec.caller {
                            Some(Caller::Cpu(c)) => Some(c),
                            _ => None,
                        },
                        fact: "frame",
                        text: cut(&rec.text, MAX_TEXT),
                        stamp: rec.stamp.as_deref().map(str::to_string),
                    };
                    o.at_bottom = reliable && facts::bottom_frame(&sym);
                    if o.frames.len() < MAX_FRAMES {
                        o.frames.push(Frame { sym, reliable, r });
                    } else {
                        o.frames_omitted += 1;
                    }
                    o.noise = 0;
                    o.last_line = rec.line;
                }
                return;
            }
        }
        if let Some(o) = b.open.get_mut(&rec.caller) {
            o.noise += 1;
            if o.noise > BLOCK_NOISE {
                b.close_block(&rec.caller);
            }
        }
        if !b.open.is_empty() && rec.caller.is_none() {
            // Without printk caller ids every open block sees the noise.
            let mut done = Vec::new();
            for (k, o) in b.open.iter_mut() {
                if k.is_some() {
                    o.noise += 1;
                    if o.noise > BLOCK_NOISE * 4 {
                        done.push(*k);
                    }
                }
            }
            for k in done {
                b.close_block(&k);
            }
        }
        if let Some((bdf, driver)) = facts::driver_and_device(&rec.text) {
            if b.drivers.len() < MAX_DEVICES && !b.drivers.contains_key(&bdf) {
                b.drivers.insert(bdf, driver.to_string());
            }
        }
    }
}

/// Whether a record looks cut short where a wrapping console or a collector split it: a
/// known message cut inside its fixed text (`Mangled`), or one that ends in its value where
/// the value may go on (`SID 18` + `00`, `[irq/57-pci` + `ehp:1422]`).
fn looks_cut(text: &str, fact: Option<&Fact>) -> bool {
    let ends_hex = || {
        text.trim_end()
            .as_bytes()
            .last()
            .is_some_and(u8::is_ascii_hexdigit)
    };
    match fact {
        Some(Fact::Mangled { .. }) => true,
        Some(Fact::IteDetected { .. } | Fact::IceDetected { .. } | Fact::FaultStatus { .. }) => {
            ends_hex()
        }
        Some(Fact::ReportHeader {
            kind: ReportKind::HardLockup | ReportKind::SoftLockup,
            cpu,
            ..
        }) => {
            // The lockup header's CPU number or `[comm:pid]` may be on the next line.
            cpu.is_none() || text.rfind('[') > text.rfind(']')
        }
        // `QI HEAD: .. qw0 = 0x1` + `80000100003, qw1 = ..`: the descriptor's SID is in qw0.
        Some(Fact::QiDesc { .. }) => !text.contains("qw1"),
        // `Slot(108): Link Do` + `wn`.
        Some(Fact::Slot { what, .. }) => *what == SlotWhat::Other,
        _ => false,
    }
}

/// The longest continuation taken: a wrap carries the rest of one message, not a new one.
const MAX_CONTINUATION: usize = 512;

/// Joins `next` onto the cut-short `held` when `next` is its continuation: a line with no
/// prefix of its own (a console wrap), or a record with the same stamp and caller that says
/// nothing by itself (a collector split). The join must read as the message `held` was cut
/// from; otherwise both stand as they are.
fn join_wrapped(
    held: &Rec<'static>,
    held_fact: Option<&Fact>,
    next: &Rec<'_>,
    next_fact: Option<&Fact>,
) -> Option<(Rec<'static>, Fact)> {
    let bare = next.dialect == Dialect::Bare && next.boot == BootMark::None;
    let same_record_stamp = next.dialect == held.dialect
        && next.caller == held.caller
        && next.boot == BootMark::None
        && ((next.mono_ns.is_some() && next.mono_ns == held.mono_ns)
            || (next.mono_ns.is_none()
                && next.wall_ns.is_some()
                && next.wall_ns == held.wall_ns
                && next.host == held.host));
    let tail = next.text.trim_end();
    if !(bare || same_record_stamp)
        || tail.is_empty()
        || tail.len() > MAX_CONTINUATION
        || !matches!(next_fact, None | Some(Fact::Mangled { .. }))
    {
        return None;
    }
    let head = held.text.trim_end_matches(['\r', '\n']);
    let held_fact = held_fact?;
    let candidates: Vec<String> = match held_fact {
        // Cut inside the fixed text: a console wrap splits anywhere (join as is); a collector
        // split drops the space at the cut (join with one).
        Fact::Mangled { .. } => {
            // Where the kernel's format has a space after the cut (`SID %llx`, `reg %x`,
            // `Error: SID`), the continuation lost it to trimming: put it back first.
            let direct = format!("{head}{tail}");
            let spaced = format!("{head} {tail}");
            if ["SID", "reg", "Reason", ":"]
                .iter()
                .any(|w| head.ends_with(w))
            {
                vec![spaced, direct]
            } else {
                vec![direct, spaced]
            }
        }
        // Cut inside the value: the continuation must start with the rest of it.
        Fact::IteDetected { .. } | Fact::IceDetected { .. } | Fact::FaultStatus { .. } => {
            let word = tail.split_whitespace().next().unwrap_or("");
            if word.is_empty()
                || !word.bytes().all(|c| c.is_ascii_hexdigit())
                || (!bare && word.len() != tail.len())
            {
                return None;
            }
            vec![format!("{}{tail}", head.trim_end())]
        }
        Fact::ReportHeader { .. } | Fact::QiDesc { .. } | Fact::Slot { .. } => {
            vec![format!("{head}{tail}"), format!("{head} {tail}")]
        }
        _ => return None,
    };
    for c in candidates {
        let Some(f) = facts::classify(&c) else {
            continue;
        };
        let fits = match (held_fact, &f) {
            (_, Fact::Mangled { .. }) => false,
            (Fact::Mangled { .. }, _) => true,
            (
                Fact::ReportHeader {
                    cpu: c0, pid: p0, ..
                },
                Fact::ReportHeader { cpu, pid, .. },
            ) => (c0.is_none() && cpu.is_some()) || (p0.is_none() && pid.is_some()),
            (Fact::Slot { .. }, Fact::Slot { what, .. }) => *what != SlotWhat::Other,
            (Fact::QiDesc { .. }, Fact::QiDesc { qw0, .. }) => qw0.is_some(),
            (a, b) => std::mem::discriminant(a) == std::mem::discriminant(b),
        };
        if fits {
            let mut rec = held.clone();
            rec.text = std::borrow::Cow::Owned(c);
            return Some((rec, f));
        }
    }
    None
}

fn push_ite(b: &mut BootState, r: LineRef, what: IteWhat) {
    if b.ite.len() < MAX_ITE_LINES {
        b.ite.push(IteLine { r, what });
    } else {
        b.overflowed("ITE lines");
    }
}

// ---------------------------------------------------------------------------------------
// Diagnosis
// ---------------------------------------------------------------------------------------

use crate::knowledge::stacks::{
    self, DOMAIN_CHANGE, DRIVER_UNMAP, FLUSH_QUEUE, INVALIDATION, REMOVAL, SAFE, SURPRISE, TEARDOWN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Removal,
    Driver,
    Domain,
    Unknown,
}

/// What a report's frames say.
struct Reading {
    inval: bool,
    path: Path,
    removal_from_frames: Option<RemovalKind>,
    /// The decision needed `? ` frames.
    used_unreliable: bool,
    hint: FixHint,
    caller: CallerPath,
    /// Indices of the frames that carried the decision.
    key_frames: Vec<usize>,
}

fn read_frames(frames: &[Frame]) -> Reading {
    let pick = |reliable_only: bool| -> Reading {
        let fs: Vec<(usize, &Frame)> = frames
            .iter()
            .enumerate()
            .filter(|(_, f)| f.reliable || !reliable_only)
            .collect();
        let hits = |set: &[&str]| -> Vec<usize> {
            fs.iter()
                .filter(|(_, f)| stacks::frame_in(&f.sym, set))
                .map(|(i, _)| *i)
                .collect()
        };
        let inval = hits(INVALIDATION);
        let removal = hits(REMOVAL);
        let mut driver = hits(DRIVER_UNMAP);
        driver.extend(hits(FLUSH_QUEUE));
        let domain = hits(DOMAIN_CHANGE);
        let surprise = hits(SURPRISE);
        let safe = hits(SAFE);
        let mut removal = removal;
        if domain.is_empty() {
            removal.extend(hits(TEARDOWN));
        }
        let path = if !removal.is_empty() || !surprise.is_empty() || !safe.is_empty() {
            Path::Removal
        } else if !driver.is_empty() {
            Path::Driver
        } else if !domain.is_empty() {
            Path::Domain
        } else {
            Path::Unknown
        };
        let removal_from_frames = if !surprise.is_empty() {
            Some(RemovalKind::Surprise)
        } else if !safe.is_empty() {
            Some(RemovalKind::Safe)
        } else {
            None
        };
        let syms: Vec<&str> = fs.iter().map(|(_, f)| f.sym.as_str()).collect();
        let mut key: Vec<usize> = inval
            .iter()
            .chain(&surprise)
            .chain(&safe)
            .chain(&removal)
            .chain(if path == Path::Driver {
                &driver
            } else {
                &domain
            })
            .copied()
            .collect();
        key.sort_unstable();
        key.dedup();
        Reading {
            inval: !inval.is_empty(),
            path,
            removal_from_frames,
            used_unreliable: !reliable_only,
            hint: fix_hint(&syms),
            caller: CallerPath::classify(&syms),
            key_frames: key,
        }
    };
    let strict = pick(true);
    if strict.inval && strict.path != Path::Unknown {
        return strict;
    }
    let loose = pick(false);
    if (loose.inval && !strict.inval) || (strict.inval && loose.path != Path::Unknown) {
        return loose;
    }
    strict
}

fn is_pciehp_comm(c: &str) -> bool {
    c.starts_with("irq/") && c.contains("pciehp")
}

/// One stuck task: the reports (watchdogs, NMI backtraces, RCU stalls) about it.
struct Group {
    blocks: Vec<usize>,
    key: String,
}

/// How a slot's removal looked before a given line.
#[derive(Clone, Debug)]
struct RemovalCtx {
    kind: Option<RemovalKind>,
    /// Link lost during a safe removal (case 3).
    link_lost_during_safe: bool,
    slot: String,
    port: Option<Bdf>,
    lines: Vec<LineRef>,
    /// Other slots also had removals in the window: the attribution is ambiguous.
    ambiguous: bool,
}

/// The removal in progress at `line`/`ts`, from the pciehp lines before it.
fn removal_before(slots: &[SlotLine], line: u64, ts: u64, window: u64) -> Option<RemovalCtx> {
    let before: Vec<&SlotLine> = slots
        .iter()
        .filter(|s| s.r.line <= line && ts.saturating_sub(s.r.ts) <= window)
        .collect();
    let last_removal = before.iter().rev().find(|s| {
        matches!(
            s.what,
            SlotWhat::LinkDown | SlotWhat::CardNotPresent | SlotWhat::Button
        )
    })?;
    let slot = last_removal.slot.clone();
    // This slot's lines since it was last up.
    let mine: Vec<&SlotLine> = before.iter().filter(|s| s.slot == slot).copied().collect();
    let start = mine
        .iter()
        .rposition(|s| {
            matches!(s.what, SlotWhat::CardPresent | SlotWhat::LinkUp)
                && s.r.line < last_removal.r.line
        })
        .map(|i| i + 1)
        .unwrap_or(0);
    let seq = mine.get(start..).unwrap_or(&[]);
    let mut button = false;
    let mut lost = false;
    for s in seq {
        match s.what {
            SlotWhat::Button => button = true,
            SlotWhat::ButtonCancel => button = false,
            SlotWhat::LinkDown | SlotWhat::CardNotPresent => lost = true,
            _ => {}
        }
    }
    let kind = if button {
        Some(RemovalKind::Safe)
    } else if lost {
        Some(RemovalKind::Surprise)
    } else {
        None
    };
    let others = before
        .iter()
        .filter(|s| {
            s.slot != slot
                && matches!(
                    s.what,
                    SlotWhat::LinkDown | SlotWhat::CardNotPresent | SlotWhat::Button
                )
        })
        .count();
    Some(RemovalCtx {
        kind,
        link_lost_during_safe: button && lost,
        slot,
        port: last_removal.port,
        lines: seq
            .iter()
            .rev()
            .take(6)
            .rev()
            .map(|s| s.r.clone())
            .collect(),
        ambiguous: others > 0,
    })
}

/// An ITE burst: the ITE lines of one episode.
struct Burst {
    lines: Vec<usize>,
    reports: u32,
    sid: Option<Sid>,
    sid_inferred: bool,
    /// An ITE report said `SID ffff`.
    all_ones: bool,
    other_sids: Vec<Sid>,
    first_ts: u64,
    last_ts: u64,
    first_line: u64,
    last_line: u64,
}

fn bursts(ite: &[IteLine], gap: u64) -> Vec<Burst> {
    let mut out: Vec<Burst> = Vec::new();
    for (i, l) in ite.iter().enumerate() {
        let new = match out.last() {
            Some(b) => l.r.ts.saturating_sub(b.last_ts) > gap,
            None => true,
        };
        if new {
            out.push(Burst {
                lines: Vec::new(),
                reports: 0,
                sid: None,
                sid_inferred: false,
                all_ones: false,
                other_sids: Vec::new(),
                first_ts: l.r.ts,
                last_ts: l.r.ts,
                first_line: l.r.line,
                last_line: l.r.line,
            });
        }
        if let Some(b) = out.last_mut() {
            b.lines.push(i);
            b.last_ts = l.r.ts;
            b.last_line = l.r.line;
        }
    }
    for b in &mut out {
        let mut detected: BTreeMap<Sid, u32> = BTreeMap::new();
        // QI PRIOR: the descriptor just before the queue head, fetched last before the
        // time-out. QI HEAD: the next one to fetch, a later submission's or a stale one (the
        // 6.1 VM console shows another device's there): used only when PRIOR names none.
        let mut desc: BTreeMap<Sid, u32> = BTreeMap::new();
        let mut head: BTreeMap<Sid, u32> = BTreeMap::new();
        let (mut n_det, mut n_clr, mut n_reg) = (0u32, 0u32, 0u32);
        for &i in &b.lines {
            match ite.get(i).map(|l| l.what) {
                Some(IteWhat::Detected(s)) => {
                    n_det += 1;
                    if let Some(s) = s {
                        *detected.entry(s).or_default() += 1;
                    }
                }
                Some(IteWhat::DetectedAllOnes) => {
                    n_det += 1;
                    b.all_ones = true;
                }
                Some(IteWhat::Cleared) => n_clr += 1,
                Some(IteWhat::Reg) => n_reg += 1,
                Some(IteWhat::Desc {
                    sid: Some(s),
                    prior: true,
                }) => *desc.entry(s).or_default() += 1,
                Some(IteWhat::Desc {
                    sid: Some(s),
                    prior: false,
                }) => *head.entry(s).or_default() += 1,
                _ => {}
            }
        }
        b.reports = if n_det > 0 {
            n_det
        } else if n_clr > 0 {
            n_clr
        } else {
            n_reg
        };
        let top = |m: &BTreeMap<Sid, u32>| {
            m.iter()
                .max_by_key(|(s, n)| (**n, std::cmp::Reverse(**s)))
                .map(|(s, _)| *s)
        };
        if let Some(s) = top(&detected) {
            b.sid = Some(s);
            b.other_sids = detected.keys().filter(|k| **k != s).copied().collect();
        } else if let Some(s) = top(&desc) {
            b.sid = Some(s);
            b.sid_inferred = true;
            b.other_sids = desc.keys().filter(|k| **k != s).copied().collect();
            for k in head.keys() {
                if *k != s && !b.other_sids.contains(k) {
                    b.other_sids.push(*k);
                }
            }
        } else if let Some(s) = top(&head) {
            // Only QI HEAD named a device-TLB descriptor: the next slot to fetch, which in a
            // retry loop holds an earlier copy of the same submission (public reports show
            // the same descriptor there on every retry), or another CPU's later one. The
            // weakest inference.
            b.sid = Some(s);
            b.sid_inferred = true;
            b.other_sids = head.keys().filter(|k| **k != s).copied().collect();
        }
    }
    out
}

/// Diagnoses one finished boot into incidents and notes.
fn diagnose(boot: &mut BootState, opts: &Options, out: &mut Analysis) {
    let bi = boot.info.index;
    // Group reports with invalidation frames by task.
    let mut groups: Vec<Group> = Vec::new();
    let mut readings: Vec<Option<Reading>> = Vec::with_capacity(boot.blocks.len());
    for (i, b) in boot.blocks.iter().enumerate() {
        let r = read_frames(&b.frames);
        let rip_in_qi = b.frames.first().is_some_and(|f| {
            matches!(
                stacks::function(&f.sym),
                "qi_submit_sync" | "qi_check_fault"
            )
        });
        if !(r.inval || rip_in_qi) {
            if b.kind != ReportKind::Dump && b.kind != ReportKind::Oops {
                add_note(&mut boot.notes, "stack-without-invalidation", &b.header);
            }
            readings.push(None);
            continue;
        }
        if !b.hang {
            // KCSAN, lockdep, sysrq, WARN, dump_stack: the invalidation was on the stack when
            // the report was printed, nothing says it was stuck.
            add_note(
                &mut boot.notes,
                "invalidation-stack-without-hang",
                &b.header,
            );
            readings.push(None);
            continue;
        }
        let key = match (b.pid, &b.comm, b.cpu) {
            (Some(p), _, _) => format!("pid {p}"),
            (None, Some(c), _) => format!("comm {c}"),
            (None, None, Some(c)) => format!("cpu {c}"),
            (None, None, None) => format!("line {}", b.header.line),
        };
        // An NMI backtrace of the same CPU as a hard lockup is the same task.
        let existing = groups.iter_mut().find(|g| {
            g.key == key
                || g.blocks.iter().any(|&j| {
                    boot.blocks.get(j).is_some_and(|o| {
                        (o.cpu.is_some() && o.cpu == b.cpu && (o.pid.is_none() || b.pid.is_none()))
                            || (o.pid.is_some() && o.pid == b.pid)
                    })
                })
        });
        match existing {
            Some(g) => g.blocks.push(i),
            None => groups.push(Group {
                blocks: vec![i],
                key,
            }),
        }
        readings.push(Some(r));
    }

    // Whether some stuck task is on the removal path: a driver-path task stuck at the same
    // time may only be queued behind it on the same IOMMU.
    let removal_task_stuck = groups.iter().any(|g| {
        g.blocks.iter().any(|&i| {
            readings
                .get(i)
                .and_then(|r| r.as_ref())
                .is_some_and(|r| r.path == Path::Removal)
                || boot
                    .blocks
                    .get(i)
                    .and_then(|b| b.comm.as_deref())
                    .is_some_and(is_pciehp_comm)
        })
    });
    let ite = bursts(&boot.ite, opts.ite_gap_ns);
    let mut burst_link: Vec<Option<usize>> = vec![None; ite.len()];
    let mut made: Vec<Incident> = Vec::new();
    let mut devices: Vec<LogDevice> = Vec::new();

    for g in &groups {
        if let Some((inc, device)) = diagnose_group(
            boot,
            g,
            &readings,
            &ite,
            &mut burst_link,
            &made,
            removal_task_stuck,
            opts,
        ) {
            add_device(&mut devices, &device);
            made.push(inc);
        }
    }

    // ITE bursts: each is an ite-reported incident, attributed to the stuck task it explains.
    for (k, b) in ite.iter().enumerate() {
        if let Some((inc, device)) = diagnose_burst(boot, k, b, &burst_link, &mut made, opts) {
            add_device(&mut devices, &device);
            made.push(inc);
        }
    }

    // Removals without trouble are notes.
    let removals = boot
        .slots
        .iter()
        .filter(|s| {
            matches!(
                s.what,
                SlotWhat::LinkDown | SlotWhat::CardNotPresent | SlotWhat::Button
            )
        })
        .count();
    if removals > 0 && made.is_empty() {
        boot.notes.remove("removal");
        for s in &boot.slots {
            add_note(&mut boot.notes, "removal", &s.r);
        }
    }

    made.sort_by(|a, b| (a.start, &a.id).cmp(&(b.start, &b.id)));
    for inc in made {
        if out.incidents.len() < opts.max_incidents {
            out.incidents.push(inc);
        } else {
            out.incidents_omitted += 1;
        }
    }
    for (kind, n) in std::mem::take(&mut boot.notes) {
        if n.count == 0 {
            continue;
        }
        out.notes.push(Note {
            kind: kind.to_string(),
            boot: bi,
            count: n.count,
            first_line: n.first_line,
            examples: n.examples,
        });
    }
    boot.info.devices = devices;
}

/// One stuck task's reports (a group): the incident they make, with its device.
#[allow(clippy::too_many_arguments)]
fn diagnose_group(
    boot: &BootState,
    g: &Group,
    readings: &[Option<Reading>],
    ite: &[Burst],
    burst_link: &mut [Option<usize>],
    made: &[Incident],
    removal_task_stuck: bool,
    opts: &Options,
) -> Option<(Incident, IncidentDevice)> {
    let bi = boot.info.index;
    let blocks: Vec<&Block> = g
        .blocks
        .iter()
        .filter_map(|&i| boot.blocks.get(i))
        .collect();
    let rs: Vec<&Reading> = g
        .blocks
        .iter()
        .filter_map(|&i| readings.get(i).and_then(|r| r.as_ref()))
        .collect();
    let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
        return None;
    };
    let comm = blocks.iter().find_map(|b| b.comm.clone());
    let pid = blocks.iter().find_map(|b| b.pid);
    let cpu = blocks.iter().find_map(|b| b.cpu);
    let pciehp_task = comm.as_deref().is_some_and(is_pciehp_comm);
    let mut path = rs
        .iter()
        .map(|r| r.path)
        .find(|p| *p == Path::Removal)
        .or_else(|| rs.iter().map(|r| r.path).find(|p| *p != Path::Unknown))
        .unwrap_or(Path::Unknown);
    let mut basis: Vec<String> = Vec::new();
    let mut unknowns: Vec<String> = Vec::new();
    let mut certainty = Certainty::Confirmed;
    let inval_frames: Vec<String> = {
        let mut v: Vec<String> = Vec::new();
        for b in &blocks {
            for f in &b.frames {
                let s = stacks::function(&f.sym);
                if INVALIDATION.contains(&s) && !v.iter().any(|x| x == s) {
                    v.push(s.to_string());
                }
            }
        }
        v
    };
    basis.push(format!(
        "the call trace shows the CPU in {} (a queued invalidation waiting for completion)",
        inval_frames.join(" ← ")
    ));
    if path == Path::Unknown && pciehp_task {
        path = Path::Removal;
        certainty = Certainty::Probable;
        basis.push(format!(
            "the stuck task is {} (the pciehp interrupt thread: hot-plug handling); the frames do not show the path",
            comm.as_deref().unwrap_or("")
        ));
    } else if path == Path::Removal {
        basis.push("the call trace shows the device-removal path (pciehp / iommu_bus_notifier / release_device)".into());
    } else if path == Path::Driver {
        basis.push(
            "the call trace shows a driver's DMA-unmap / IOTLB-flush path, not the removal path"
                .into(),
        );
    } else if path == Path::Domain {
        basis.push("the call trace shows a domain change (VFIO close, attach/detach)".into());
    }
    if rs.iter().any(|r| r.used_unreliable) {
        certainty = certainty.min(Certainty::Probable);
        basis.push("some frames used are marked '?' (possibly stale stack words)".into());
    }
    if let Some(c) = &comm {
        if !pciehp_task || path != Path::Removal {
            basis.push(format!(
                "stuck task: {c}{}",
                pid.map(|p| format!(" (PID {p})")).unwrap_or_default()
            ));
        }
    } else {
        unknowns.push("the log does not name the stuck task".into());
    }
    let frames_removal = rs.iter().find_map(|r| r.removal_from_frames);
    let ctx = removal_before(
        &boot.slots,
        first.header.line,
        first.header.ts,
        opts.removal_window_ns,
    );
    let removal = frames_removal.or(ctx.as_ref().and_then(|c| c.kind));
    if let Some(k) = frames_removal {
        basis.push(format!(
            "the frames show a {} removal ({})",
            if k == RemovalKind::Surprise {
                "surprise"
            } else {
                "safe"
            },
            if k == RemovalKind::Surprise {
                "pciehp_handle_presence_or_link_change"
            } else {
                "disable request / sysfs remove"
            }
        ));
    } else if let Some(c) = &ctx {
        match c.kind {
            Some(RemovalKind::Surprise) => basis.push(format!(
                "Slot({}) reported Link Down / Card not present before it, with no attention-button press: a surprise removal",
                c.slot
            )),
            Some(RemovalKind::Safe) => basis.push(format!(
                "Slot({}) had an attention-button / power-off request before it: a safe removal{}",
                c.slot,
                if c.link_lost_during_safe { ", and the link was lost during it" } else { "" }
            )),
            None => {}
        }
        if c.ambiguous {
            unknowns.push(
                "several slots had removals in the window; the slot named is the latest".into(),
            );
        }
    }
    let (kind, window) = match path {
        Path::Removal => match removal {
            Some(RemovalKind::Surprise) => (
                IncidentKind::FlushToGoneDevice,
                Some(crate::correlate::incident::Window::W2),
            ),
            Some(RemovalKind::Safe) => (
                IncidentKind::SafeRemovalFlushTimeout,
                Some(crate::correlate::incident::Window::W3),
            ),
            None => {
                unknowns.push("whether the removal was safe or surprise (no pciehp line and no telling frame): case 2 or 3".into());
                certainty = certainty.min(Certainty::Probable);
                (IncidentKind::HungInvalidation, None)
            }
        },
        Path::Driver => match &ctx {
            Some(c) if c.kind.is_some() => {
                basis.push(format!(
                    "a removal of Slot({}) was under way when the driver's invalidation hung (the thread's case 1)",
                    c.slot
                ));
                certainty = certainty.min(Certainty::Probable);
                if removal_task_stuck {
                    certainty = Certainty::Possible;
                    unknowns.push("another task was stuck on the removal path at the same time: this one may only be waiting behind it on the same invalidation queue".into());
                }
                (
                    IncidentKind::InflightAcrossDisconnect,
                    Some(crate::correlate::incident::Window::W1),
                )
            }
            _ => {
                unknowns.push("no hot-plug removal appears before it in this boot".into());
                (IncidentKind::HungInvalidation, None)
            }
        },
        Path::Domain | Path::Unknown => {
            if path == Path::Unknown {
                unknowns.push("the frames do not show which path issued the invalidation".into());
                certainty = certainty.min(Certainty::Probable);
            }
            (IncidentKind::HungInvalidation, None)
        }
    };
    // The ITE burst(s) about the same episode.
    let t0 = first.header.ts;
    let t1 = last.header.ts;
    let mut sid: Option<Sid> = None;
    let mut sid_inferred = false;
    let mut ite_lines: Vec<LineRef> = Vec::new();
    let mut ite_reports = 0u32;
    let mut first_ite_ts: Option<u64> = None;
    for (bi_, b) in ite.iter().enumerate() {
        let near = b.first_ts <= t1.saturating_add(opts.link_window_ns)
            && t0 <= b.last_ts.saturating_add(opts.link_window_ns);
        if near && burst_link.get(bi_).is_some_and(|l| l.is_none()) {
            if let Some(slot) = burst_link.get_mut(bi_) {
                *slot = Some(made.len());
            }
            if sid.is_none() {
                sid = b.sid;
                sid_inferred = b.sid_inferred;
            }
            ite_reports = ite_reports.saturating_add(b.reports);
            first_ite_ts = Some(first_ite_ts.map_or(b.first_ts, |t: u64| t.min(b.first_ts)));
            let n = b.lines.len();
            for (k, &li) in b.lines.iter().enumerate() {
                if k < 4 || k + 2 >= n {
                    if let Some(l) = boot.ite.get(li) {
                        ite_lines.push(l.r.clone());
                    }
                }
            }
        }
    }
    if ite_reports > 0 {
        basis.push(format!(
            "{ite_reports} ITE report(s) from the IOMMU around it{}",
            if ite_reports >= opts.ite_loop_reports {
                ": the time-out → abort → resubmit loop of qi_submit_sync"
            } else {
                ""
            }
        ));
    } else {
        unknowns.push("no ITE line survives in the log (the device and SID may be unknown)".into());
    }
    let spinning = blocks.iter().any(|b| b.kind.spinning())
        || boot
            .panic
            .as_ref()
            .is_some_and(|p| p.text.contains("LOCKUP"));
    let severity = if spinning {
        Severity::Critical
    } else {
        Severity::Warning
    };
    let stuck = blocks
        .iter()
        .filter_map(|b| b.stuck_s)
        .max()
        .map(|s| s.saturating_mul(SEC));
    let outcome = stuck
        .or_else(|| {
            first_ite_ts
                .map(|f| t1.saturating_sub(f))
                .filter(|d| *d > 0)
        })
        .map(|ns| Outcome::NotReturned { outstanding_ns: ns });
    let mut partial_reasons = Vec::new();
    if !last.ended && last.last_line + 1 >= boot.info.last_line {
        // Only a lockup or stall report of the stuck CPU cut before the bottom of its
        // trace says the host died printing it; an excerpt or capture may simply stop.
        let stuck_cpu_report = last.hang
            && (last.kind.spinning() || last.kind == ReportKind::Dump)
            && (last.cpu.is_none() || cpu.is_none() || last.cpu == cpu);
        partial_reasons.push(if stuck_cpu_report && !last.at_bottom {
            "the log ends inside the last report, before the bottom of its call trace (the host died while printing it)".into()
        } else {
            "the log ends inside the last report".into()
        });
    }
    if blocks.iter().any(|b| b.frames_omitted > 0) {
        partial_reasons.push("call traces longer than 96 frames were cut".into());
    }
    // Device.
    let slot_ctx = ctx.as_ref().filter(|_| {
        matches!(path, Path::Removal) || kind == IncidentKind::InflightAcrossDisconnect
    });
    let mut device = device_for(
        boot,
        sid,
        slot_ctx.map(|c| (c.slot.clone(), c.port)),
        removal,
        first.header.line,
    );
    if sid_inferred {
        device.inferred = true;
        device.candidates = sid.into_iter().collect();
        unknowns.push("the IOMMU reported SID 0; the SID is inferred from the Device-TLB descriptor of the queue dump (QI PRIOR, else QI HEAD)".into());
    }
    if sid.is_none() {
        unknowns.push("which device the invalidation targeted".into());
    }
    // Evidence lines.
    let mut ev: Vec<LineRef> = Vec::new();
    if let Some(c) = slot_ctx {
        ev.extend(c.lines.iter().cloned());
    }
    ev.extend(ite_lines.iter().cloned());
    for (b, r) in blocks.iter().zip(rs.iter()) {
        ev.push(b.header.clone());
        if let Some(t) = &b.task_line {
            if t.line != b.header.line {
                ev.push(t.clone());
            }
        }
        for &k in &r.key_frames {
            if let Some(f) = b.frames.get(k) {
                ev.push(f.r.clone());
            }
        }
    }
    if let Some(p) = &boot.panic {
        if p.line >= first.header.line {
            ev.push(p.clone());
        }
    }
    let hint = rs.iter().map(|r| r.hint).min().unwrap_or(FixHint::None);
    let caller = rs.first().map(|r| r.caller).unwrap_or(CallerPath::Unknown);
    let id = IncidentId::derive(kind, &[u64::from(bi), first.header.line]);
    let explanation = explain_group(
        kind,
        &device,
        comm.as_deref(),
        removal,
        &ctx,
        ite_reports,
        severity,
        path,
    );
    let facts = describe::Facts {
        kind,
        device: &device,
        outcome: outcome.as_ref(),
        caller,
        hint,
        removal,
        submissions: 0,
        reports: ite_reports,
        sid_zero: sid.is_none() || sid_inferred,
        inferred: sid_inferred,
        candidates: &device.candidates,
        kernel: &[],
        attributed_to: None,
        lockup_seen: spinning,
    };
    let fixes = describe::fixes_for(&facts);
    let inc = build_incident(
        id,
        kind,
        window,
        severity,
        device.clone(),
        removal,
        outcome,
        explanation,
        fixes,
        ev,
        Evidence {
            boot: bi,
            certainty,
            basis,
            unknowns,
            lines: Vec::new(),
            lines_omitted: 0,
        },
        u32::try_from(blocks.len()).unwrap_or(u32::MAX),
        partial_reasons,
        (cpu, pid, comm.as_deref()),
        opts,
    );
    Some((inc, device))
}

/// An ITE burst: its ite-reported incident, attributed to the stuck task it explains (whose
/// incident in `made` is linked back).
fn diagnose_burst(
    boot: &BootState,
    k: usize,
    b: &Burst,
    burst_link: &[Option<usize>],
    made: &mut [Incident],
    opts: &Options,
) -> Option<(Incident, IncidentDevice)> {
    let bi = boot.info.index;
    if b.reports == 0 {
        return None;
    }
    let linked = burst_link.get(k).copied().flatten();
    let mut basis = vec![format!(
        "{} \"VT-d detected Invalidation Time-out Error\" / \"(ITE) cleared\" / fault-status report(s)",
        b.reports
    )];
    let mut unknowns = Vec::new();
    let mut certainty = Certainty::Confirmed;
    let ctx = removal_before(
        &boot.slots,
        b.first_line,
        b.first_ts,
        opts.removal_window_ns,
    );
    let removal = ctx.as_ref().and_then(|c| c.kind);
    if let Some(c) = &ctx {
        basis.push(format!(
            "Slot({}) had a {} removal before it",
            c.slot,
            match c.kind {
                Some(RemovalKind::Safe) => "safe",
                Some(RemovalKind::Surprise) => "surprise",
                None => "",
            }
        ));
    }
    if b.all_ones {
        unknowns.push("the IOMMU reported SID ffff: all ones is no device's ID but an invalid value (what a read of a register or device that is gone returns)".into());
    }
    if b.sid_inferred {
        unknowns.push(format!("the IOMMU reported SID {}; the SID is inferred from the Device-TLB descriptor of the queue dump (QI PRIOR, else QI HEAD)", if b.all_ones { "ffff" } else { "0" }));
    } else if b.sid.is_none() && b.all_ones {
        unknowns.push("no Device-TLB descriptor was dumped: the device is unknown".into());
    } else if b.sid.is_none() {
        unknowns.push("the IOMMU reported SID 0 and no Device-TLB descriptor was dumped: the device is unknown".into());
    }
    if !b.other_sids.is_empty() {
        unknowns.push(format!(
            "{}: {}",
            if b.sid.is_some() && !b.sid_inferred {
                "other SIDs also timed out in this burst"
            } else {
                "other candidates (devices with device-TLB invalidations in the queue dump)"
            },
            b.other_sids
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if linked.is_none() {
        unknowns.push("no call trace shows which path issued the invalidation (case 1, 2 or 3 cannot be told)".into());
        if ctx.is_some() {
            certainty = Certainty::Possible;
            basis.push("only the timing links the ITE to the removal".into());
        }
    }
    let looping = b.reports >= opts.ite_loop_reports;
    let severity = if looping
        || linked
            .and_then(|i| made.get(i))
            .is_some_and(|m| m.severity == Severity::Critical)
    {
        Severity::Critical
    } else {
        Severity::Warning
    };
    if looping {
        basis.push("the report repeats: qi_submit_sync's abort → -EAGAIN → resubmit loop, with interrupts off".into());
    }
    let slot_ctx = ctx.as_ref().map(|c| (c.slot.clone(), c.port));
    let mut device = device_for(boot, b.sid, slot_ctx, removal, b.first_line);
    if b.sid_inferred || b.sid.is_none() {
        device.inferred = b.sid_inferred;
        device.candidates = b
            .sid
            .into_iter()
            .chain(b.other_sids.iter().copied())
            .collect();
    }
    let mut ev: Vec<LineRef> = Vec::new();
    if let Some(c) = &ctx {
        ev.extend(c.lines.iter().cloned());
    }
    for &li in &b.lines {
        if let Some(l) = boot.ite.get(li) {
            ev.push(l.r.clone());
        }
    }
    let kind = IncidentKind::IteReported;
    let id = IncidentId::derive(kind, &[u64::from(bi), b.first_line]);
    let attribution = linked.and_then(|i| made.get(i)).map(|m| Attribution {
        kind: m.kind,
        window: m.window,
        id: m.id.clone(),
    });
    let explanation = explain_ite(&device, b, looping, &attribution, &ctx);
    let facts = describe::Facts {
        kind,
        device: &device,
        outcome: None,
        caller: CallerPath::Unknown,
        hint: FixHint::None,
        removal,
        submissions: 0,
        reports: b.reports,
        sid_zero: b.sid.is_none() || b.sid_inferred,
        inferred: b.sid_inferred,
        candidates: &device.candidates,
        kernel: &[],
        attributed_to: attribution.as_ref().map(|a| a.kind),
        lockup_seen: severity == Severity::Critical,
    };
    let fixes = describe::fixes_for(&facts);
    let mut inc = build_incident(
        id,
        kind,
        None,
        severity,
        device.clone(),
        removal,
        None,
        explanation,
        fixes,
        ev,
        Evidence {
            boot: bi,
            certainty,
            basis,
            unknowns,
            lines: Vec::new(),
            lines_omitted: 0,
        },
        b.reports,
        Vec::new(),
        (None, None, None),
        opts,
    );
    inc.attribution = attribution;
    if let Some(m) = linked.and_then(|i| made.get_mut(i)) {
        m.related.push(inc.id.clone());
        inc.related.push(m.id.clone());
    }
    Some((inc, device))
}

fn add_device(devices: &mut Vec<LogDevice>, d: &IncidentDevice) {
    let Some(bdf) = d.bdf else { return };
    if devices.iter().any(|x| x.bdf == bdf) || devices.len() >= 256 {
        return;
    }
    devices.push(LogDevice {
        bdf,
        vendor: d.vendor,
        device: d.device_id,
        driver: d.driver.clone(),
        slot: d.slot.clone(),
    });
}

/// The device an incident is about, from what the boot's lines say about its SID.
fn device_for(
    boot: &BootState,
    sid: Option<Sid>,
    slot: Option<(String, Option<Bdf>)>,
    removal: Option<RemovalKind>,
    before_line: u64,
) -> IncidentDevice {
    let mut d = IncidentDevice {
        sid,
        ..Default::default()
    };
    if let Some((name, port)) = slot {
        d.slot = Some(name);
        d.port = port;
    }
    let Some(sid) = sid else {
        return d;
    };
    // The segment: the one segment an enumerated device with this SID is on, else the port's.
    let segs: Vec<Bdf> = boot
        .enumerated
        .keys()
        .chain(boot.drivers.keys())
        .filter(|b| b.sid() == sid)
        .copied()
        .collect();
    let seg = match segs
        .iter()
        .map(|b| b.segment)
        .collect::<std::collections::BTreeSet<_>>()
    {
        s if s.len() == 1 => s.into_iter().next().flatten(),
        _ => d.port.and_then(|p| p.segment),
    };
    let bdf = Bdf::from_sid(seg, sid);
    d.bdf = Some(bdf);
    let matches = |b: &&Bdf| b.sid() == sid && (seg.is_none() || b.segment == seg);
    if let Some(k) = boot.enumerated.keys().find(matches).copied() {
        if let Some((v, dev)) = boot.enumerated.get(&k) {
            d.vendor = Some(*v);
            d.device_id = Some(*dev);
        }
    }
    if let Some(k) = boot.drivers.keys().find(matches).copied() {
        d.driver = boot.drivers.get(&k).cloned();
    }
    let released = boot
        .group_removed
        .iter()
        .any(|(b, r)| b.sid() == sid && r.line <= before_line);
    d.state = if released {
        Some(DeviceState::Released)
    } else if removal == Some(RemovalKind::Surprise) {
        Some(DeviceState::Disconnected)
    } else {
        None
    };
    d.present = d.state.and_then(DeviceState::present);
    d
}

#[allow(clippy::too_many_arguments)]
fn build_incident(
    id: IncidentId,
    kind: IncidentKind,
    window: Option<crate::correlate::incident::Window>,
    severity: Severity,
    device: IncidentDevice,
    removal: Option<RemovalKind>,
    outcome: Option<Outcome>,
    explanation: String,
    fixes: Vec<crate::correlate::incident::Fix>,
    mut ev: Vec<LineRef>,
    mut evidence: Evidence,
    reports: u32,
    partial_reasons: Vec<String>,
    task: (Option<u32>, Option<u32>, Option<&str>),
    opts: &Options,
) -> Incident {
    ev.sort_by_key(|l| l.line);
    ev.dedup_by_key(|l| (l.line, l.fact));
    let start = ev.iter().map(|l| l.ts).min().unwrap_or(0);
    let end = ev.iter().map(|l| l.ts).max().unwrap_or(start);
    let max = opts.max_evidence.max(2);
    let omitted = ev.len().saturating_sub(max);
    if omitted > 0 {
        // Keep the first and last halves.
        let tail = ev.split_off(ev.len() - max / 2);
        ev.truncate(max - max / 2);
        ev.extend(tail);
    }
    evidence.lines = ev.iter().map(LineRef::evidence).collect();
    evidence.lines_omitted = u32::try_from(omitted).unwrap_or(u32::MAX);
    let timeline = ev
        .iter()
        .map(|l| TimelineEntry {
            ts: KTime(l.ts),
            cpu: l.cpu.or(task.0).unwrap_or(0),
            tid: task.1.unwrap_or(0),
            task: task.2.unwrap_or("").to_string(),
            event: l.fact.to_string(),
            detail: format!("line {}: {}", l.line, l.text),
            caller: None,
        })
        .collect();
    Incident {
        id,
        revision: 0,
        kind,
        severity,
        window,
        device,
        removal,
        start: KTime(start),
        end: KTime(end),
        outcome,
        submissions: Vec::new(),
        submissions_omitted: 0,
        timeline,
        timeline_omitted: evidence.lines_omitted,
        partial: !partial_reasons.is_empty(),
        partial_reasons,
        reports,
        attribution: None,
        related: Vec::new(),
        explanation,
        fixes,
        closed: true,
        evidence: Some(evidence),
    }
}

fn dev_words(d: &IncidentDevice) -> String {
    let mut s = match (d.bdf, d.sid) {
        (Some(b), _) => format!("device {b}"),
        (None, Some(s)) => format!("SID {s}"),
        (None, None) => "an unknown device".into(),
    };
    if let Some(drv) = &d.driver {
        s.push_str(&format!(" ({drv})"));
    }
    if let Some(slot) = &d.slot {
        s.push_str(&format!(" in slot {slot}"));
    }
    s
}

#[allow(clippy::too_many_arguments)]
fn explain_group(
    kind: IncidentKind,
    d: &IncidentDevice,
    comm: Option<&str>,
    removal: Option<RemovalKind>,
    ctx: &Option<RemovalCtx>,
    ite_reports: u32,
    severity: Severity,
    path: Path,
) -> String {
    let who = comm
        .map(|c| format!("task {c}"))
        .unwrap_or_else(|| "a task".into());
    let dev = dev_words(d);
    let stuck = if severity == Severity::Critical {
        "spun in qi_submit_sync with interrupts off until the watchdog fired"
    } else {
        "was stuck waiting for a queued invalidation"
    };
    let ite = if ite_reports > 0 {
        format!(" The IOMMU reported {ite_reports} invalidation time-out(s) meanwhile.")
    } else {
        String::new()
    };
    match kind {
        IncidentKind::FlushToGoneDevice => format!(
            "Case 2 (W2): after a surprise removal{}, the removal path (iommu_bus_notifier → release) sent a device-TLB invalidation to {dev}, which was no longer there to answer; {who} {stuck}.{ite}",
            ctx.as_ref().map(|c| format!(" of slot {}", c.slot)).unwrap_or_default()
        ),
        IncidentKind::SafeRemovalFlushTimeout => format!(
            "Case 3 (W3): during a safe removal{}, the teardown's device-TLB invalidation to {dev} did not complete{}; {who} {stuck}.{ite}",
            ctx.as_ref().map(|c| format!(" of slot {}", c.slot)).unwrap_or_default(),
            if ctx.as_ref().is_some_and(|c| c.link_lost_during_safe) { " (the link went down during the removal)" } else { "" }
        ),
        IncidentKind::InflightAcrossDisconnect => format!(
            "Case 1 (W1): a driver's device-TLB invalidation to {dev} was in flight while {} was being removed; {who} {stuck}.{ite}",
            ctx.as_ref().map(|c| format!("slot {}", c.slot)).unwrap_or_else(|| "its slot".into())
        ),
        _ => {
            let p = match path {
                Path::Removal => format!(
                    "on the removal path ({})",
                    match removal {
                        Some(_) => "removal kind known",
                        None => "safe or surprise: the log does not say, so case 2 or 3",
                    }
                ),
                Path::Driver => "on a driver's unmap path, with no hot-plug removal in sight".into(),
                Path::Domain => "on a domain change (VFIO close or detach)".into(),
                Path::Unknown => "on a path the frames do not show".into(),
            };
            format!("A device-TLB invalidation to {dev} hung {p}; {who} {stuck}.{ite}")
        }
    }
}

fn explain_ite(
    d: &IncidentDevice,
    b: &Burst,
    looping: bool,
    attribution: &Option<Attribution>,
    ctx: &Option<RemovalCtx>,
) -> String {
    let mut s = format!(
        "The IOMMU reported {} invalidation time-out(s) (ITE) for {}{}.",
        b.reports,
        dev_words(d),
        if b.sid_inferred {
            " (SID 0 reported; the device is inferred from the queue dump's descriptor, not known)"
        } else {
            ""
        }
    );
    if looping {
        s.push_str(" The repetition is qi_submit_sync's retry loop: the kernel lacks a way out for a device that will never answer.");
    }
    match (attribution, ctx) {
        (Some(a), _) => s.push_str(&format!(
            " It is explained by the stuck invalidation {} ({}).",
            a.id, a.kind
        )),
        (None, Some(c)) => s.push_str(&format!(
            " It follows a {} of slot {}; without a call trace the log cannot tell which path issued the invalidation.",
            match c.kind {
                Some(RemovalKind::Safe) => "safe removal",
                _ => "surprise removal",
            },
            c.slot
        )),
        (None, None) => {}
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(log: &str) -> Analysis {
        analyze_bytes(log.as_bytes(), Options::default())
    }

    #[test]
    fn the_patch_trace_is_case_2() {
        let log = "\
[ 4211.433662] pcieport 0000:17:01.0: pciehp: Slot(108): Link Down
[ 4211.433664] pcieport 0000:17:01.0: pciehp: Slot(108): Card not present
[ 4223.822591] NMI watchdog: Watchdog detected hard LOCKUP on cpu 144
[ 4223.822622] CPU: 144 PID: 1422 Comm: irq/57-pciehp Kdump: loaded Tainted: G S  OE    kernel version xxxx
[ 4223.822628] RIP: 0010:qi_submit_sync+0x2c0/0x490
[ 4223.822641] Call Trace:
[ 4223.822642]  qi_flush_dev_iotlb+0xb1/0xd0
[ 4223.822643]  __dmar_remove_one_dev_info+0x224/0x250
[ 4223.822644]  dmar_remove_one_dev_info+0x3e/0x50
[ 4223.822645]  intel_iommu_release_device+0x1f/0x30
[ 4223.822646]  iommu_release_device+0x33/0x60
[ 4223.822647]  iommu_bus_notifier+0x7f/0x90
[ 4223.822648]  blocking_notifier_call_chain+0x60/0x90
[ 4223.822649]  device_del+0x2e5/0x420
[ 4223.822650]  pci_remove_bus_device+0x70/0x110
[ 4223.822651]  pciehp_unconfigure_device+0x7c/0x130
[ 4223.822652]  pciehp_disable_slot+0x6b/0x100
[ 4223.822653]  pciehp_handle_presence_or_link_change+0xdc/0x440
[ 4223.822654]  pciehp_ist+0x176/0x180
[ 4223.822655]  irq_thread_fn+0x19/0x50
[ 4223.822656]  irq_thread+0x104/0x190
[ 4223.822657]  kthread+0x114/0x130
[ 4223.822658]  ret_from_fork+0x1f/0x30
[ 4223.822659] Kernel panic - not syncing: Hard LOCKUP
";
        let a = run(log);
        assert_eq!(a.incidents.len(), 1, "{:#?}", a.incidents);
        let i = &a.incidents[0];
        assert_eq!(i.kind, IncidentKind::FlushToGoneDevice);
        assert_eq!(i.case(), Some(2));
        assert_eq!(i.severity, Severity::Critical);
        assert_eq!(i.removal, Some(RemovalKind::Surprise));
        assert_eq!(i.device.slot.as_deref(), Some("108"));
        let ev = i.evidence.as_ref().unwrap();
        assert_eq!(ev.certainty, Certainty::Confirmed);
        assert!(ev.lines.iter().any(|l| l.line == 5), "{ev:#?}");
        assert!(ev.lines.iter().any(|l| l.line == 1));
    }

    #[test]
    fn dma_faults_are_notes_not_incidents() {
        let a = run("[   10.1] DMAR: DRHD: handling fault status reg 2\n[   10.100000] DMAR: [DMA Read NO_PASID] Request device [01:00.0] fault addr 0xfffd0000 [fault reason 0x06] PTE Read access is not set\n");
        assert!(a.incidents.is_empty());
        assert!(a.notes.iter().any(|n| n.kind == "dma-fault"));
    }

    #[test]
    fn repeated_ite_is_the_retry_loop() {
        let mut log = String::new();
        for k in 0..5 {
            log.push_str(&format!(
                "[  100.{k:06}] DMAR: VT-d detected Invalidation Time-out Error: SID 0\n"
            ));
            log.push_str(&format!("[  100.{k:06}] DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x10000100003, qw1 = 0x7ffffffffffff001\n"));
            log.push_str(&format!("[  100.{k:06}] DMAR: QI PRIOR: Invalidation Wait qw0 = 0x200000025, qw1 = 0x1000\n"));
            log.push_str(&format!(
                "[  100.{k:06}] DMAR: Invalidation Time-out Error (ITE) cleared\n"
            ));
        }
        let a = run(&log);
        assert_eq!(a.incidents.len(), 1);
        let i = &a.incidents[0];
        assert_eq!(i.kind, IncidentKind::IteReported);
        assert_eq!(i.reports, 5);
        assert_eq!(i.severity, Severity::Critical);
        // QI PRIOR here is the wait descriptor; QI HEAD (the next slot) names a device-TLB
        // descriptor: the device is inferred from it, and says so.
        assert_eq!(i.device.sid, Some(Sid(0x0100)));
        assert!(i.device.inferred);
        assert_eq!(i.device.candidates, vec![Sid(0x0100)]);
    }

    #[test]
    fn sid_zero_is_inferred_from_the_descriptor_before_the_queue_head() {
        let log = "[  100.000001] DMAR: VT-d detected Invalidation Time-out Error: SID 0\n\
                   [  100.000001] DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x10000000003, qw1 = 0xffffb000\n\
                   [  100.000001] DMAR: QI PRIOR: Device-TLB Invalidation qw0 = 0x20000000003, qw1 = 0xffffa000\n\
                   [  100.000001] DMAR: Invalidation Time-out Error (ITE) cleared\n";
        let a = run(log);
        assert_eq!(a.incidents.len(), 1);
        let d = &a.incidents[0].device;
        assert_eq!(d.sid, Some(Sid(0x0200)));
        assert!(d.inferred);
        assert_eq!(d.candidates, vec![Sid(0x0200), Sid(0x0100)]);
        assert!(
            a.incidents[0].explanation.contains("inferred"),
            "{}",
            a.incidents[0].explanation
        );
    }

    #[test]
    fn a_logs_own_sub_second_times_are_kept_and_shown() {
        // syslog with microseconds (rsyslog's precise format): two ITE reports 0.4 s apart in
        // the same second of the wall clock.
        let log = "Mar 14 11:41:01.100000 host kernel: DMAR: VT-d detected Invalidation Time-out Error: SID 200\n\
                   Mar 14 11:41:01.500000 host kernel: DMAR: VT-d detected Invalidation Time-out Error: SID 200\n";
        let a = run(log);
        assert_eq!(a.incidents.len(), 1);
        let i = &a.incidents[0];
        assert_eq!(
            i.end.0 - i.start.0,
            400_000_000,
            "sub-second difference kept"
        );
        let times: Vec<Option<&str>> = i
            .evidence
            .as_ref()
            .unwrap()
            .lines
            .iter()
            .map(|l| l.time.as_deref())
            .collect();
        assert_eq!(
            times,
            vec![
                Some("Mar 14 11:41:01.100000"),
                Some("Mar 14 11:41:01.500000")
            ]
        );
    }

    #[test]
    fn timestamps_reset_start_a_new_boot() {
        let a = run("[  500.000000] a\n[  501.000000] b\n[    0.000000] Linux version 6.1.0 (x)\n[    1.000000] c\n");
        assert_eq!(a.boots.len(), 2);
        assert_eq!(a.boots[1].kernel_release.as_deref(), Some("6.1.0"));
        assert_eq!(a.boots[1].first_line, 3);
    }

    /// Regression: the CPU spinning in qi_submit_sync prints with its clock frozen (6.1 under
    /// the emulated ITE: its lines at 16.1 s among the other CPU's at 37 s); each drop was read
    /// as a reboot, cutting the RCU stall report from the episode it belongs to.
    #[test]
    fn a_cpu_with_a_frozen_clock_is_not_a_reboot() {
        let a = run("[    0.000000] Linux version 6.1.0 (x)
[   16.139874] DMAR: VT-d detected Invalidation Time-out Error: SID 200
[   37.215852] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:
[   16.139874] NMI backtrace for cpu 0
[   16.139874] DMAR: VT-d detected Invalidation Time-out Error: SID 200
[   42.488116] DMAR: VT-d detected Invalidation Time-out Error: SID 200
[   16.139874] DMAR: VT-d detected Invalidation Time-out Error: SID 200
");
        assert_eq!(a.boots.len(), 1);
        // An excerpt that starts late and reboots without its banner still splits.
        let b = run("[ 1000.000000] a\n[ 1001.000000] b\n[    0.500000] c\n[    1.000000] d\n");
        assert_eq!(b.boots.len(), 2);
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut data: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        data.extend_from_slice(b"\n[ 1.000000] DMAR: QI HEAD: \n");
        let a = analyze_bytes(&data, Options::default());
        assert!(a.incidents.len() <= 1);
    }

    fn ite_sids(a: &Analysis) -> Vec<Option<Sid>> {
        a.incidents
            .iter()
            .filter(|i| i.kind == IncidentKind::IteReported)
            .map(|i| i.device.sid)
            .collect()
    }

    #[test]
    fn an_ite_line_wrapped_inside_its_text_is_joined() {
        // An 80-column console cut "SID" in two; the continuation has no prefix.
        let a = run("\
Mar 14 11:41:01.123456 node17 kernel: DMAR: VT-d detected Invalidation Time-out Error: SI
D 1800
Mar 14 11:41:01.123460 node17 kernel: DMAR: Invalidation Time-out Error (ITE) cleared
");
        assert_eq!(ite_sids(&a), [Some(Sid(0x1800))]);
        assert_eq!(a.unparsed_count, 0, "{:?}", a.unparsed);
        let n = a
            .notes
            .iter()
            .find(|n| n.kind == "wrapped-line-joined")
            .unwrap();
        assert_eq!(n.count, 1);
        assert!(
            n.examples[0].text.starts_with("lines 1+2: "),
            "{:?}",
            n.examples
        );
        let ev = a.incidents[0].evidence.as_ref().unwrap();
        let l = ev.lines.iter().find(|l| l.fact == "ite-detected").unwrap();
        assert_eq!(l.line, 1);
        assert!(l.text.ends_with("Error: SID 1800"), "{}", l.text);
    }

    #[test]
    fn an_ite_value_cut_by_a_wrap_is_not_read_short() {
        // `SID 18` alone would name the wrong device.
        let a = run("[ 4212.019021] DMAR: VT-d detected Invalidation Time-out Error: SID 18\n00\n[ 4212.019030] DMAR: Invalidation Time-out Error (ITE) cleared\n");
        assert_eq!(ite_sids(&a), [Some(Sid(0x1800))]);
    }

    #[test]
    fn an_ite_split_into_two_records_with_one_stamp_is_joined() {
        for (first, second) in [
            (
                "DMAR: VT-d detected Invalidation Time-out Error:",
                "SID 6500",
            ),
            (
                "DMAR: VT-d detected Invalidation Time-out Error: SID",
                "6500",
            ),
            (
                "DMAR: VT-d detected Invalidation Time-out Error: SID 65",
                "00",
            ),
        ] {
            let log = format!(
                "Mar 14 11:41:02 h kernel: [ 3922.010311] {first}\nMar 14 11:41:02 h kernel: {second}\nMar 14 11:41:02 h kernel: [ 3922.010324] DMAR: Invalidation Time-out Error (ITE) cleared\n"
            );
            let a = run(&log);
            assert_eq!(ite_sids(&a), [Some(Sid(0x6500))], "{first} | {second}");
            // The evidence reads as the kernel printed it.
            let ev = a.incidents[0].evidence.as_ref().unwrap();
            assert!(
                ev.lines
                    .iter()
                    .any(|l| l.text.ends_with("Time-out Error: SID 6500")),
                "{first} | {second}: {:?}",
                ev.lines
            );
            assert_eq!(a.unparsed_count, 0, "{first} | {second}: {:?}", a.unparsed);
        }
    }

    #[test]
    fn a_cut_line_without_its_continuation_stays_unparsed() {
        // The next record is a message of its own (another stamp): nothing to join.
        let a = run("[  10.000000] DMAR: VT-d detected Invalidation Time-out Error: SI\n[  11.000000] D 1800\n");
        assert!(ite_sids(&a).is_empty());
        assert_eq!(a.unparsed_count, 1);
        assert!(a.notes.iter().all(|n| n.kind != "wrapped-line-joined"));
        // A whole ITE line followed by an unrelated bare line keeps its SID and the line.
        let a = run("[  10.000000] DMAR: VT-d detected Invalidation Time-out Error: SID 1800\nHardware name: QEMU\n");
        assert_eq!(ite_sids(&a), [Some(Sid(0x1800))]);
        // A cut line at the very end is still read (as unparsed).
        let a = run("[  10.000000] DMAR: VT-d detected Invalidation Time-o");
        assert_eq!(a.unparsed_count, 1);
    }

    #[test]
    fn a_wrapped_dma_fault_status_is_a_note_not_an_ite() {
        let a = run("[  811.402001] DMAR: DRHD: handling fault status re\ng 2\n");
        assert!(a.incidents.is_empty());
        assert!(a.notes.iter().any(|n| n.kind == "dma-fault"));
        assert_eq!(a.unparsed_count, 0);
    }

    #[test]
    fn wrapped_lockup_headers_keep_their_cpu_and_task() {
        let a = run("\
[ 5131.771019] NMI watchdog: Watchdog detected hard LOCKUP on cp
u 38
[ 5131.771075] CPU: 38 PID: 1187 Comm: irq/121-pciehp Not tainted 5.15.0 #1
[ 5131.771082] RIP: 0010:qi_submit_sync+0x2d4/0x4b0
[ 5131.771090] Call Trace:
[ 5131.771143]  qi_flush_dev_iotlb+0x9e/0xc0
[ 5131.771154]  iommu_bus_notifier+0x7c/0x90
[ 5131.771162]  pciehp_unconfigure_device+0x8f/0x150
[ 5131.771166]  pciehp_handle_presence_or_link_change+0xd8/0x320
[ 5131.771168]  pciehp_ist+0x189/0x1a0
[ 5131.771178]  </TASK>
");
        let i = a
            .incidents
            .iter()
            .find(|i| i.kind == IncidentKind::FlushToGoneDevice)
            .expect("the removal-path hang");
        let ev = i.evidence.as_ref().unwrap();
        assert!(
            ev.lines
                .iter()
                .any(|l| l.fact == "hard-lockup" && l.text.ends_with("on cpu 38")),
            "{:?}",
            ev.lines
        );
        // A soft-lockup header cut inside `[comm:pid]` names no PID it did not see.
        match facts::classify(
            "watchdog: BUG: soft lockup - CPU#61 stuck for 22s! [irq/88-pciehp:13",
        ) {
            Some(Fact::ReportHeader { comm, pid, .. }) => {
                assert_eq!(comm.as_deref(), Some("irq/88-pciehp"));
                assert_eq!(pid, None);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_multibyte_char_where_a_printk_caller_goes_does_not_panic() {
        // Found by the fuzz bodies' random-bytes property: `[Ƅ` split inside the char.
        let a = run("[ 1.000000] [\u{184}]x\n[\u{184}\u{fffd}] y\n[ 2.000000][ T12] DMAR: x\n");
        assert_eq!(a.records, 3);
    }
}
