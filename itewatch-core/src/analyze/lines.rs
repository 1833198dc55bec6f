//! Reading kernel logs: bounded line reading, then one [`Rec`] per kernel message whatever the
//! dialect it came in (plain `dmesg`, `dmesg -T`/`-x`/`-r`/`--time-format iso`, `journalctl -k`
//! short/short-precise/short-monotonic/short-iso/`-o json`, syslog `kern.log`, raw serial
//! console captures, quoted-printable mail archives).
//!
//! Nothing here knows what a message means (that is `facts`). What it does: cap every line at
//! [`MAX_LINE_BYTES`], strip transport noise (ANSI escapes, `\r`, mail quoting, QP escapes),
//! peel off the dialect's prefix into a timestamp, host and caller, split serial lines where
//! two CPUs' output ran together, and say where a boot begins.

use std::borrow::Cow;
use std::io::{self, BufRead};

/// Longest line kept; the rest of a longer line is skipped (and counted).
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// Reads lines of at most [`MAX_LINE_BYTES`] from a `BufRead` without ever holding more.
pub struct LineReader<R: BufRead> {
    input: R,
    buf: Vec<u8>,
    line_no: u64,
    bytes: u64,
    truncated: u64,
}

impl<R: BufRead> LineReader<R> {
    pub fn new(input: R) -> Self {
        LineReader {
            input,
            buf: Vec::with_capacity(256),
            line_no: 0,
            bytes: 0,
            truncated: 0,
        }
    }

    /// Bytes consumed so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Lines cut at [`MAX_LINE_BYTES`] so far.
    pub fn truncated(&self) -> u64 {
        self.truncated
    }

    /// The next line (1-based number, bytes without the newline, whether it was cut).
    pub fn next_line(&mut self) -> io::Result<Option<(u64, &[u8], bool)>> {
        self.buf.clear();
        let mut cut = false;
        let mut any = false;
        loop {
            let avail = match self.input.fill_buf() {
                Ok(a) => a,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if avail.is_empty() {
                break;
            }
            any = true;
            let (take, done) = match memchr::memchr(b'\n', avail) {
                Some(i) => (i, true),
                None => (avail.len(), false),
            };
            let room = MAX_LINE_BYTES.saturating_sub(self.buf.len());
            if take > room {
                cut = true;
            }
            self.buf.extend_from_slice(&avail[..take.min(room)]);
            let consumed = if done { take + 1 } else { take };
            self.input.consume(consumed);
            self.bytes += consumed as u64;
            if done {
                break;
            }
        }
        if !any {
            return Ok(None);
        }
        self.line_no += 1;
        if cut {
            self.truncated += 1;
        }
        while self.buf.last() == Some(&b'\r') {
            self.buf.pop();
        }
        Ok(Some((self.line_no, &self.buf, cut)))
    }
}

/// Where a record's time came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dialect {
    /// `[  123.456789] msg` (dmesg, serial console, kern.log tail).
    Dmesg,
    /// `[Tue Mar  5 10:11:12 2024] msg` (`dmesg -T`) or `dmesg --time-format iso`.
    DmesgWall,
    /// `Mar 05 10:11:12[.123456] host kernel: msg` (journalctl short/short-precise, syslog).
    Syslog,
    /// `[  123.456789] host kernel: msg` (journalctl -o short-monotonic).
    JournalMonotonic,
    /// `2024-03-05T10:11:12+0100 host kernel: msg` (journalctl -o short-iso[-precise]).
    JournalIso,
    /// One JSON object per line (journalctl -o json).
    JournalJson,
    /// No prefix at all (continuation lines, quoted traces, noise).
    Bare,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Dmesg => "dmesg",
            Dialect::DmesgWall => "dmesg-wall-clock",
            Dialect::Syslog => "syslog",
            Dialect::JournalMonotonic => "journal-short-monotonic",
            Dialect::JournalIso => "journal-short-iso",
            Dialect::JournalJson => "journal-json",
            Dialect::Bare => "bare",
        }
    }
}

/// What the prefix said about boots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BootMark {
    None,
    /// `-- Boot <id> --`, `-- Reboot --`, or a new `_BOOT_ID`.
    Explicit(Option<String>),
}

/// The printk caller (`CONFIG_PRINTK_CALLER`): `[ T1234]` task or `[ C3]` CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Caller {
    Task(u32),
    Cpu(u32),
}

/// One kernel message with its prefix peeled off.
#[derive(Clone, Debug, PartialEq)]
pub struct Rec<'a> {
    pub line: u64,
    pub dialect: Dialect,
    /// CLOCK_MONOTONIC seconds as printed (`[  123.456789]`).
    pub mono_ns: Option<u64>,
    /// Wall clock, nanoseconds on an ordering-preserving scale (not a Unix time: the year may
    /// be missing); only differences are meaningful. Sub-second digits are kept.
    pub wall_ns: Option<i64>,
    /// The line's own timestamp as the log printed it (`Apr 10 16:40:12.123456`,
    /// `2024-04-10T16:40:12.123456+00:00`, `Wed Apr 10 16:40:12 2024`), for wall-clock
    /// dialects: what a report shows so it can be found in the log.
    pub stamp: Option<Cow<'a, str>>,
    pub caller: Option<Caller>,
    pub host: Option<Cow<'a, str>>,
    /// The syslog identifier was not `kernel` (a userspace line in a full journal).
    pub not_kernel: bool,
    pub boot: BootMark,
    pub text: Cow<'a, str>,
}

impl Rec<'_> {
    /// The same record owning its text (held while the analyzer waits for a wrapped line's
    /// continuation).
    pub fn into_owned(self) -> Rec<'static> {
        Rec {
            line: self.line,
            dialect: self.dialect,
            mono_ns: self.mono_ns,
            wall_ns: self.wall_ns,
            stamp: self.stamp.map(|s| Cow::Owned(s.into_owned())),
            caller: self.caller,
            host: self.host.map(|h| Cow::Owned(h.into_owned())),
            not_kernel: self.not_kernel,
            boot: self.boot,
            text: Cow::Owned(self.text.into_owned()),
        }
    }
}

/// Turns raw lines into records; holds the little cross-line state dialects need
/// (quoted-printable soft breaks).
#[derive(Default)]
pub struct Normalizer {
    /// Quoted-printable decoding switched on (a `=3D`/`=20` escape or a QP header was seen).
    pub qp: bool,
    /// A QP soft-broken line waiting for its continuation.
    pending: Option<(u64, String)>,
}

fn is_qp_hint(s: &[u8]) -> bool {
    // Built once: `memmem::find` builds a searcher per call, which cost more than the search
    // on every line of a large log.
    static EQ3D: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    static QP: std::sync::OnceLock<memchr::memmem::Finder<'static>> = std::sync::OnceLock::new();
    let eq3d = EQ3D.get_or_init(|| memchr::memmem::Finder::new(b"=3D"));
    let qp = QP.get_or_init(|| memchr::memmem::Finder::new(b"quoted-printable"));
    if qp.find(s).is_some() {
        return true;
    }
    let Some(first_eq) = memchr::memchr(b'=', s) else {
        return false;
    };
    if eq3d.find(&s[first_eq..]).is_some() || s.ends_with(b"=20") {
        return true;
    }
    // A soft line break: an encoder wraps at 76 columns and ends the piece with a lone `=`.
    // A mail body pasted without its headers shows one before any `=3D`, and the first
    // line that needs decoding must be decoded too.
    let n = s.len();
    if (60..=76).contains(&n) && s.ends_with(b"=") && !s.ends_with(b"==") {
        return true;
    }
    // `=20` / `=09` (encoded blanks) and encoded UTF-8 (`=C2=A0`, `=E2=80=99`).
    let hex = |c: u8| c.is_ascii_digit() || (b'A'..=b'F').contains(&c);
    s.windows(6).any(|w| {
        w[0] == b'='
            && hex(w[1])
            && hex(w[2])
            && w[3] == b'='
            && hex(w[4])
            && hex(w[5])
            && w[1] >= b'8'
            && w[4] >= b'8'
    }) || s
        .windows(4)
        .any(|w| w[0] == b'=' && (w[1..3] == *b"20" || w[1..3] == *b"09") && w[3] != b'=')
}

/// Decodes `=XX` escapes; returns the text and whether it ended in a soft break (`=`).
fn qp_decode(s: &str) -> (String, bool) {
    let b = s.as_bytes();
    let soft = b.last() == Some(&b'=') && !b.ends_with(b"==");
    let body = if soft { &b[..b.len() - 1] } else { b };
    let mut out = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        let c = body[i];
        if c == b'=' && i + 2 < body.len() + 1 {
            let h = body.get(i + 1..i + 3).and_then(|x| {
                std::str::from_utf8(x)
                    .ok()
                    .and_then(|x| u8::from_str_radix(x, 16).ok())
            });
            if let Some(h) = h {
                out.push(h);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    (String::from_utf8_lossy(&out).into_owned(), soft)
}

fn strip_ansi(s: &str) -> Cow<'_, str> {
    if !s.as_bytes().contains(&0x1b) && !s.contains('\r') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() || d == '~' {
                        break;
                    }
                }
            } else {
                it.next();
            }
        } else if c == '\r' {
            // A carriage return inside a serial line: what follows overwrote what came before
            // on the terminal; keep both, separated.
            out.push(' ');
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

impl Normalizer {
    pub fn new() -> Self {
        Self::default()
    }

    /// Splits one raw line into records (usually one; several when serial output ran
    /// together). Calls `f` for each. A QP soft break holds the line until its continuation.
    pub fn feed(&mut self, line_no: u64, raw: &[u8], f: &mut dyn FnMut(Rec<'_>)) {
        let text: Cow<'_, str> = match std::str::from_utf8(raw) {
            Ok(s) => Cow::Borrowed(s),
            Err(_) => Cow::Owned(String::from_utf8_lossy(raw).into_owned()),
        };
        self.feed_text(line_no, raw, text, f)
    }

    /// [`Normalizer::feed`] for a caller that has already decoded the line (`text` is `raw`
    /// as UTF-8, lossily where it is not), so it is validated once.
    pub fn feed_text(
        &mut self,
        line_no: u64,
        raw: &[u8],
        text: Cow<'_, str>,
        f: &mut dyn FnMut(Rec<'_>),
    ) {
        if !self.qp && is_qp_hint(raw) {
            self.qp = true;
        }
        if self.qp {
            let (decoded, soft) = qp_decode(&text);
            let (start, mut joined) = match self.pending.take() {
                Some((n, mut p)) => {
                    let stripped = strip_quote(&decoded);
                    p.push_str(stripped);
                    (n, p)
                }
                None => (line_no, decoded),
            };
            if soft && joined.len() < super::lines::MAX_LINE_BYTES {
                self.pending = Some((start, joined));
                return;
            }
            if joined.len() > MAX_LINE_BYTES {
                let mut cut = MAX_LINE_BYTES;
                while !joined.is_char_boundary(cut) {
                    cut -= 1;
                }
                joined.truncate(cut);
            }
            split_records(start, &joined, f);
            return;
        }
        split_records(line_no, &text, f);
    }

    /// Flushes a pending QP line at the end of input.
    pub fn finish(&mut self, f: &mut dyn FnMut(Rec<'_>)) {
        if let Some((n, p)) = self.pending.take() {
            split_records(n, &p, f);
        }
    }
}

/// Strips mail quoting (`> `, `>> `) and leading whitespace.
fn strip_quote(s: &str) -> &str {
    let mut t = s.trim_start();
    while let Some(r) = t.strip_prefix('>') {
        t = r.trim_start();
    }
    t
}

/// Whether `b[i..]` starts with a dmesg timestamp `[ sss.uuuuuu]`; returns (ns, length).
fn dmesg_ts(b: &[u8], i: usize) -> Option<(u64, usize)> {
    if b.get(i) != Some(&b'[') {
        return None;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b' ') {
        j += 1;
    }
    let s0 = j;
    let mut secs: u64 = 0;
    while let Some(c) = b.get(j).filter(|c| c.is_ascii_digit()) {
        secs = secs.saturating_mul(10).saturating_add(u64::from(c - b'0'));
        j += 1;
        if j - s0 > 12 {
            return None;
        }
    }
    if j == s0 || b.get(j) != Some(&b'.') {
        return None;
    }
    j += 1;
    let f0 = j;
    let mut frac: u64 = 0;
    while let Some(c) = b.get(j).filter(|c| c.is_ascii_digit()) {
        if j - f0 < 9 {
            frac = frac * 10 + u64::from(c - b'0');
        }
        j += 1;
    }
    let digits = j - f0;
    if !(3..=9).contains(&digits) {
        return None;
    }
    // dmesg -d appends a delta: `[  1.234567 <    0.000012>]`.
    if b.get(j) == Some(&b' ') && b.get(j + 1) == Some(&b'<') {
        while let Some(&c) = b.get(j) {
            j += 1;
            if c == b'>' {
                break;
            }
        }
    }
    if b.get(j) != Some(&b']') {
        return None;
    }
    let scale = 10u64.pow(9 - digits.min(9) as u32);
    Some((
        secs.saturating_mul(1_000_000_000)
            .saturating_add(frac.saturating_mul(scale)),
        j + 1 - i,
    ))
}

/// Splits a line where a second dmesg timestamp starts mid-line (two CPUs' serial output run
/// together), then parses each piece.
fn split_records(line_no: u64, text: &str, f: &mut dyn FnMut(Rec<'_>)) {
    let clean = strip_ansi(text);
    let t = strip_quote(&clean);
    let b = t.as_bytes();
    let mut start = 0;
    let mut i = 1;
    // Only a record that started with a timestamp can be followed by another on the line.
    if dmesg_ts(b, 0).is_some() {
        while let Some(off) = b.get(i..).and_then(|r| memchr::memchr(b'[', r)) {
            let at = i + off;
            if dmesg_ts(b, at).is_some() {
                if let Some(piece) = t.get(start..at) {
                    parse_record(line_no, piece, f);
                }
                start = at;
            }
            i = at + 1;
        }
    }
    if let Some(piece) = t.get(start..) {
        parse_record(line_no, piece, f);
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

fn month(s: &str) -> Option<i64> {
    MONTHS.iter().position(|m| *m == s).map(|p| p as i64 + 1)
}

/// `10:11:12[.123456]` → (seconds of the day, nanoseconds of the fraction).
fn hms(s: &str) -> Option<(i64, i64)> {
    let mut it = s.split(':');
    let h: i64 = it.next()?.parse().ok()?;
    let m: i64 = it.next()?.parse().ok()?;
    let mut sf = it.next()?.splitn(2, ['.', ',']);
    let sec: i64 = sf.next()?.parse().ok()?;
    let frac = match sf.next() {
        Some(d) => {
            let digits: String = d.chars().take_while(char::is_ascii_digit).take(9).collect();
            let n: i64 = if digits.is_empty() {
                0
            } else {
                digits.parse().ok()?
            };
            n * 10i64.pow(9 - digits.len() as u32)
        }
        None => 0,
    };
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some((h * 3600 + m * 60 + sec, frac))
}

/// A wall-clock stamp: nanoseconds on an ordering-preserving scale, and the stamp's text.
type Wall<'a> = (i64, &'a str);

fn wall_ns(year: i64, mon: i64, day: i64, (secs, frac): (i64, i64)) -> i64 {
    wall(year, mon, day, secs)
        .saturating_mul(1_000_000_000)
        .saturating_add(frac)
}

fn wall(year: i64, mon: i64, day: i64, secs: i64) -> i64 {
    ((year * 12 + mon) * 31 + day) * 86_400 + secs
}

/// `Mar 05 10:11:12[.123456] ` → (wall, rest).
fn syslog_time(t: &str) -> Option<(Wall<'_>, &str)> {
    let mon = month(t.get(0..3)?)?;
    let rest = t.get(3..)?.trim_start();
    let (day, rest) = rest.split_once(' ')?;
    let day: i64 = day.parse().ok()?;
    let (time, rest) = rest.split_once(' ')?;
    let stamp = t.get(..t.len() - rest.len() - 1)?;
    Some(((wall_ns(0, mon, day, hms(time)?), stamp), rest))
}

/// `2024-03-05T10:11:12[.123456][+0100|Z|+01:00]` → (wall, rest).
fn iso_time(t: &str) -> Option<(Wall<'_>, &str)> {
    let b = t.as_bytes();
    if b.len() < 19 || b.get(4) != Some(&b'-') || b.get(10) != Some(&b'T') {
        return None;
    }
    let year: i64 = t.get(0..4)?.parse().ok()?;
    let mon: i64 = t.get(5..7)?.parse().ok()?;
    let day: i64 = t.get(8..10)?.parse().ok()?;
    let end = t.find(' ').unwrap_or(t.len());
    // The time with its fraction, up to the zone (`+01:00`, `+0100`, `Z`) or the end.
    let time = t.get(11..end)?;
    let tlen = time.find(['+', 'Z', '-']).unwrap_or(time.len());
    let hmsf = hms(time.get(..tlen)?)?;
    Some((
        (wall_ns(year, mon, day, hmsf), t.get(..end)?),
        t.get(end..)?.trim_start(),
    ))
}

/// `[Tue Mar  5 10:11:12 2024] ` (dmesg -T).
fn ctime_bracket(t: &str) -> Option<(Wall<'_>, &str)> {
    let inner_end = t.find(']')?;
    let inner = t.get(1..inner_end)?;
    let mut it = inner.split_whitespace();
    let _dow = it.next()?;
    let mon = month(it.next()?)?;
    let day: i64 = it.next()?.parse().ok()?;
    let secs = hms(it.next()?)?;
    let year: i64 = it.next()?.parse().ok()?;
    Some((
        (wall_ns(year, mon, day, secs), inner.trim()),
        t.get(inner_end + 1..)?,
    ))
}

/// `host ident[pid]: ` → (host, is kernel, rest).
fn host_ident(t: &str) -> Option<(&str, bool, &str)> {
    let (host, rest) = t.split_once(' ')?;
    // The ident ends at the first `: ` (or a `:` ending the line) and has no space: scan for
    // the first space or colon instead of searching the whole message for `: `.
    let b = rest.as_bytes();
    let mut at = 0;
    let colon = loop {
        let i = at + memchr::memchr2(b' ', b':', b.get(at..)?)?;
        if b[i] == b' ' {
            return None;
        }
        if matches!(b.get(i + 1), None | Some(b' ')) {
            break i;
        }
        at = i + 1;
    };
    let ident = rest.get(..colon)?;
    if ident.is_empty() || host.is_empty() {
        return None;
    }
    let kernel = ident == "kernel";
    Some((host, kernel, rest.get(colon + 1..)?.trim_start_matches(' ')))
}

/// `kern  :err   : ` (dmesg -x).
fn strip_facility(t: &str) -> &str {
    let b = t.as_bytes();
    if b.len() > 15 && b.get(6) == Some(&b':') && b.get(13) == Some(&b':') {
        let fac = t.get(..6).unwrap_or("").trim();
        if matches!(
            fac,
            "kern" | "user" | "daemon" | "syslog" | "auth" | "mail" | "local0"
        ) {
            return t.get(14..).unwrap_or("").trim_start_matches(' ');
        }
    }
    t
}

/// `<6>` priority prefix.
fn strip_priority(t: &str) -> &str {
    let b = t.as_bytes();
    if b.first() == Some(&b'<') {
        if let Some(end) = b.iter().take(5).position(|&c| c == b'>') {
            if end > 1 && b[1..end].iter().all(u8::is_ascii_digit) {
                return t.get(end + 1..).unwrap_or("");
            }
        }
    }
    t
}

/// `[ T1234]` / `[ C3]` / `[T1234]` after the timestamp.
fn strip_caller(t: &str) -> (Option<Caller>, &str) {
    let b = t.as_bytes();
    if b.first() != Some(&b'[') {
        return (None, t);
    }
    let Some(end) = b.iter().take(14).position(|&c| c == b']') else {
        return (None, t);
    };
    let inner = t.get(1..end).unwrap_or("").trim_start();
    // By char, not byte: `[Ƅ]` (a multi-byte first char) is not a caller and must not split
    // inside it.
    let mut chars = inner.chars();
    let tag = chars.next();
    let Ok(n) = chars.as_str().parse::<u32>() else {
        return (None, t);
    };
    let c = match tag {
        Some('T') => Caller::Task(n),
        Some('C') => Caller::Cpu(n),
        _ => return (None, t),
    };
    (Some(c), t.get(end + 1..).unwrap_or(""))
}

#[allow(clippy::too_many_arguments)]
fn emit<'a>(
    f: &mut dyn FnMut(Rec<'_>),
    line: u64,
    dialect: Dialect,
    mono_ns: Option<u64>,
    wall: Option<Wall<'a>>,
    host: Option<Cow<'a, str>>,
    not_kernel: bool,
    boot: BootMark,
    rest: &'a str,
) {
    let rest = strip_priority(rest);
    // kern.log carries the dmesg stamp after the syslog prefix.
    let (mono_ns, rest) = match mono_ns {
        None => match dmesg_ts(rest.as_bytes(), 0) {
            Some((ns, len)) => (Some(ns), rest.get(len..).unwrap_or("")),
            None => (None, rest),
        },
        Some(_) => (mono_ns, rest),
    };
    let (caller, rest) = strip_caller(rest.trim_start_matches(' '));
    f(Rec {
        line,
        dialect,
        mono_ns,
        wall_ns: wall.map(|w| w.0),
        stamp: wall.map(|w| Cow::Borrowed(w.1)),
        caller,
        host,
        not_kernel,
        boot,
        text: Cow::Borrowed(rest.trim_start_matches(' ')),
    });
}

/// `<4>` and then a dmesg stamp, with or without a space between them (`<4>[ 1.0]`,
/// `<4> [ 1.0]`); the space is kept when no stamp follows (a frame's indent).
fn strip_priority_before_stamp(t: &str) -> &str {
    let p = strip_priority(t);
    if p.len() == t.len() {
        return t;
    }
    let q = p.trim_start_matches(' ');
    if dmesg_ts(q.as_bytes(), 0).is_some() {
        q
    } else {
        p
    }
}

fn parse_record(line: u64, t: &str, f: &mut dyn FnMut(Rec<'_>)) {
    let t = strip_priority_before_stamp(t);
    // A bare `kernel: ` with no time or host before it (a grep of a syslog file, some
    // collectors), then maybe a priority and a dmesg stamp.
    let t = match t.strip_prefix("kernel: ") {
        Some(r) => strip_priority_before_stamp(r.trim_start_matches(' ')),
        None => t,
    };
    let t = strip_facility(t);
    let b = t.as_bytes();
    match b.first() {
        Some(b'{') => {
            if let Some(()) = parse_json(line, t, f) {
                return;
            }
        }
        Some(b'-') if t.starts_with("-- ") => {
            let inner = t.trim_start_matches("-- ").trim_end_matches(" --");
            if let Some(id) = inner.strip_prefix("Boot ") {
                return emit(
                    f,
                    line,
                    Dialect::Syslog,
                    None,
                    None,
                    None,
                    true,
                    BootMark::Explicit(Some(id.trim().to_string())),
                    "",
                );
            }
            if inner.starts_with("Reboot") {
                return emit(
                    f,
                    line,
                    Dialect::Syslog,
                    None,
                    None,
                    None,
                    true,
                    BootMark::Explicit(None),
                    "",
                );
            }
        }
        Some(b'[') => {
            if let Some((ns, len)) = dmesg_ts(b, 0) {
                let rest = t.get(len..).unwrap_or("").trim_start_matches(' ');
                // short-monotonic: `[  123.456789] host kernel: msg`. Only the `kernel` ident
                // matters here, so look for it right after the first word before parsing.
                let maybe_journal = rest
                    .split_once(' ')
                    .is_some_and(|(_, r)| r.starts_with("kernel:"));
                if let Some((host, kernel, msg)) = maybe_journal
                    .then(|| host_ident(rest))
                    .flatten()
                    .filter(|(h, _, _)| !h.starts_with('['))
                {
                    if kernel {
                        return emit(
                            f,
                            line,
                            Dialect::JournalMonotonic,
                            Some(ns),
                            None,
                            Some(Cow::Borrowed(host)),
                            false,
                            BootMark::None,
                            msg,
                        );
                    }
                }
                return emit(
                    f,
                    line,
                    Dialect::Dmesg,
                    Some(ns),
                    None,
                    None,
                    false,
                    BootMark::None,
                    rest,
                );
            }
            if let Some((w, rest)) = ctime_bracket(t) {
                return emit(
                    f,
                    line,
                    Dialect::DmesgWall,
                    None,
                    Some(w),
                    None,
                    false,
                    BootMark::None,
                    rest,
                );
            }
        }
        Some(c) if c.is_ascii_uppercase() => {
            if let Some((w, rest)) = syslog_time(t) {
                if let Some((host, kernel, msg)) = host_ident(rest) {
                    return emit(
                        f,
                        line,
                        Dialect::Syslog,
                        None,
                        Some(w),
                        Some(Cow::Borrowed(host)),
                        !kernel,
                        BootMark::None,
                        msg,
                    );
                }
            }
        }
        Some(c) if c.is_ascii_digit() => {
            if let Some((w, rest)) = iso_time(t) {
                if let Some((host, kernel, msg)) = host_ident(rest) {
                    return emit(
                        f,
                        line,
                        Dialect::JournalIso,
                        None,
                        Some(w),
                        Some(Cow::Borrowed(host)),
                        !kernel,
                        BootMark::None,
                        msg,
                    );
                }
                // dmesg --time-format iso: `2024-03-05T10:11:12,123456+01:00 msg`.
                return emit(
                    f,
                    line,
                    Dialect::DmesgWall,
                    None,
                    Some(w),
                    None,
                    false,
                    BootMark::None,
                    rest,
                );
            }
        }
        _ => {}
    }
    emit(
        f,
        line,
        Dialect::Bare,
        None,
        None,
        None,
        false,
        BootMark::None,
        t,
    )
}

/// `journalctl -o json`: MESSAGE (a string, or an array of bytes for non-UTF-8),
/// `__MONOTONIC_TIMESTAMP` / `_SOURCE_MONOTONIC_TIMESTAMP` (µs), `_BOOT_ID`, `_HOSTNAME`.
fn parse_json(line: u64, t: &str, f: &mut dyn FnMut(Rec<'_>)) -> Option<()> {
    let v: serde_json::Value = serde_json::from_str(t).ok()?;
    let o = v.as_object()?;
    let msg = match o.get("MESSAGE")? {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(a) => {
            let bytes: Vec<u8> = a
                .iter()
                .filter_map(|x| x.as_u64().and_then(|n| u8::try_from(n).ok()))
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        _ => return None,
    };
    let num = |k: &str| {
        o.get(k).and_then(|x| match x {
            serde_json::Value::String(s) => s.parse::<u64>().ok(),
            serde_json::Value::Number(n) => n.as_u64(),
            _ => None,
        })
    };
    let mono = num("_SOURCE_MONOTONIC_TIMESTAMP")
        .or_else(|| num("__MONOTONIC_TIMESTAMP"))
        .map(|us| us.saturating_mul(1000));
    let wall = num("__REALTIME_TIMESTAMP").map(|us| us.saturating_mul(1000) as i64);
    let boot = o
        .get("_BOOT_ID")
        .and_then(|x| x.as_str())
        .map(|s| BootMark::Explicit(Some(s.to_string())))
        .unwrap_or(BootMark::None);
    let host = o
        .get("_HOSTNAME")
        .and_then(|x| x.as_str())
        .map(|s| Cow::Owned(s.to_string()));
    let not_kernel = o
        .get("_TRANSPORT")
        .and_then(|x| x.as_str())
        .is_some_and(|t| t != "kernel");
    // One JSON object can carry a multi-line message: one record per line.
    for piece in msg.lines() {
        let (caller, rest) = strip_caller(strip_priority(piece));
        f(Rec {
            line,
            dialect: Dialect::JournalJson,
            mono_ns: mono,
            wall_ns: wall,
            stamp: None,
            caller,
            host: host.clone(),
            not_kernel,
            boot: boot.clone(),
            text: Cow::Owned(rest.trim_start_matches(' ').to_string()),
        });
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    type Out = (u64, Dialect, Option<u64>, Option<Caller>, String);

    fn recs(lines: &[&str]) -> Vec<Out> {
        let mut n = Normalizer::new();
        let mut out = Vec::new();
        for (i, l) in lines.iter().enumerate() {
            n.feed(i as u64 + 1, l.as_bytes(), &mut |r| {
                out.push((r.line, r.dialect, r.mono_ns, r.caller, r.text.to_string()))
            });
        }
        n.finish(&mut |r| out.push((r.line, r.dialect, r.mono_ns, r.caller, r.text.to_string())));
        out
    }

    #[test]
    fn every_dialect_yields_the_bare_message() {
        let msg = "DMAR: Invalidation Time-out Error (ITE) cleared";
        let lines = [
            format!("[  123.456789] {msg}"),
            format!("<6>[  123.456789] {msg}"),
            format!("kern  :info  : [  123.456789] {msg}"),
            format!("[Tue Mar  5 10:11:12 2024] {msg}"),
            format!("Mar 05 10:11:12 host1 kernel: {msg}"),
            format!("Mar 05 10:11:12.123456 host1 kernel: {msg}"),
            format!("[  123.456789] host1 kernel: {msg}"),
            format!("2024-03-05T10:11:12+0100 host1 kernel: {msg}"),
            format!("2024-03-05T10:11:12,123456+01:00 {msg}"),
            format!("Mar  5 10:11:12 host1 kernel: [  123.456789] {msg}"),
            format!("[   12.345678][ T1422] {msg}"),
            format!("  > [  123.456789] {msg}"),
            format!("<4> [  123.456789] {msg}"),
            format!("kernel: [  123.456789] {msg}"),
            format!("kernel: {msg}"),
            format!("{{\"MESSAGE\":\"{msg}\",\"__MONOTONIC_TIMESTAMP\":\"123456789\",\"_BOOT_ID\":\"b1\"}}"),
        ];
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let out = recs(&refs);
        assert_eq!(out.len(), lines.len());
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.4, msg, "line {}: {:?}", i + 1, r);
        }
        assert_eq!(out[0].2, Some(123_456_789_000));
        assert_eq!(out[6].1, Dialect::JournalMonotonic);
        assert_eq!(out[9].2, Some(123_456_789_000));
        assert_eq!(out[10].3, Some(Caller::Task(1422)));
        assert_eq!(out[12].2, Some(123_456_789_000));
        assert_eq!(out[13].2, Some(123_456_789_000));
        assert_eq!(out[15].1, Dialect::JournalJson);
        assert_eq!(out[15].2, Some(123_456_789_000));
    }

    #[test]
    fn serial_lines_that_ran_together_are_split() {
        let out = recs(&["[   12.000001] DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x10000000003, qw1 = 0x1[   12.000002] pcieport 0000:00:04.0: pciehp: Slot(1): Link Down"]);
        assert_eq!(out.len(), 2);
        assert!(out[1].4.starts_with("pcieport"));
        assert_eq!(out[1].2, Some(12_000_002_000));
    }

    #[test]
    fn quoted_printable_soft_breaks_and_escapes_are_undone() {
        let out = recs(&[
            "Content-Transfer-Encoding: quoted-printable",
            "[ 4223.822622] NMI watchdog: Watchdog detected hard LOCKUP on c=",
            "pu 144",
            "qw0 =3D 0x1",
        ]);
        assert_eq!(
            out[1].4,
            "NMI watchdog: Watchdog detected hard LOCKUP on cpu 144"
        );
        assert_eq!(out[1].0, 2);
        assert_eq!(out[2].4, "qw0 = 0x1");
    }

    #[test]
    fn quoted_printable_is_told_without_headers_or_an_escape_first() {
        // A body pasted without its headers whose first encoded thing is a soft break.
        let out = recs(&[
            "> [ 4235.822591] watchdog: BUG: soft lockup - CPU#144 stuck for 23s! [irq/5=",
            "7-pciehp:1422]",
        ]);
        assert_eq!(
            out[0].4,
            "watchdog: BUG: soft lockup - CPU#144 stuck for 23s! [irq/57-pciehp:1422]"
        );
        assert!(is_qp_hint(b"caf=C3=A9 au lait"));
        assert!(is_qp_hint(b"a=20b"));
        // Kernel lines with `=` are not QP.
        for l in [
            "[    0.000000] Command line: BOOT_IMAGE=/boot/vmlinuz root=UUID=1234 ro intel_iommu=on",
            "[   12.000000] DMAR: QI HEAD: Device-TLB Invalidation qw0 = 0x1, qw1 = 0x2",
            "[   12.000000] audit: type=1400 audit(1.2:3): apparmor=\"STATUS\"",
        ] {
            assert!(!is_qp_hint(l.as_bytes()), "{l}");
        }
    }

    #[test]
    fn long_lines_are_cut_and_counted() {
        let mut data = vec![b'a'; MAX_LINE_BYTES * 3];
        data.push(b'\n');
        data.extend_from_slice(b"next\n");
        let mut r = LineReader::new(&data[..]);
        let (n, l, cut) = r.next_line().unwrap().unwrap();
        assert_eq!((n, l.len(), cut), (1, MAX_LINE_BYTES, true));
        let (n, l, cut) = r.next_line().unwrap().unwrap();
        assert_eq!((n, l, cut), (2, &b"next"[..], false));
        assert!(r.next_line().unwrap().is_none());
        assert_eq!(r.truncated(), 1);
    }

    #[test]
    fn journal_boot_markers() {
        let mut n = Normalizer::new();
        let mut marks = Vec::new();
        n.feed(1, b"-- Boot 0123abcd --", &mut |r| {
            marks.push(r.boot.clone())
        });
        assert_eq!(marks, vec![BootMark::Explicit(Some("0123abcd".into()))]);
    }
}
