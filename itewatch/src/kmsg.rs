//! The kernel's log as `/dev/kmsg` hands it out: one record per read(2), oldest first, each
//! `PRIO,SEQ,TS_USEC,FLAGS[,...];TEXT` followed by ` KEY=VALUE` dictionary lines
//! (Documentation/ABI/testing/dev-kmsg, 6.1). This module only takes a record's frame apart;
//! what a message says is `analyze::facts`' business (one parser of kernel messages).
//!
//! Sequence numbers start at 0 at boot, so the first record's number says how many older
//! messages the ring buffer has already overwritten.

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// One record's frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record<'a> {
    /// The kernel's sequence number (0 = the boot's first message).
    pub seq: u64,
    /// CLOCK_MONOTONIC of the message, microseconds.
    pub ts_us: u64,
    /// The message, as the kernel escaped it (non-printable bytes as `\xNN`).
    pub text: &'a str,
}

/// Takes one record apart; `None` for a frame that is not `PRIO,SEQ,TS_USEC,...;TEXT`.
pub fn parse_record(buf: &str) -> Option<Record<'_>> {
    let (head, rest) = buf.split_once(';')?;
    let mut fields = head.split(',');
    fields.next()?.parse::<u32>().ok()?;
    let seq = fields.next()?.parse().ok()?;
    let ts_us = fields.next()?.parse().ok()?;
    let text = rest.split('\n').next().unwrap_or("");
    Some(Record { seq, ts_us, text })
}

/// What reading the whole log gave besides its records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadStats {
    pub records: u64,
    /// The first record's sequence number (messages overwritten before it), if any record.
    pub first_seq: Option<u64>,
    /// Reads that said records were overwritten while reading (EPIPE).
    pub overwritten_while_reading: u64,
    /// Frames [`parse_record`] could not take apart.
    pub malformed: u64,
    /// Stopped at `max_records` before the end of the log.
    pub capped: bool,
}

/// Reads every record now in the log at `path` (`/dev/kmsg`) without waiting for new ones,
/// at most `max_records`, and hands each to `f`. Errors: the log cannot be opened or read
/// (`EPERM` without `CAP_SYSLOG` when `kernel.dmesg_restrict` is set).
pub fn read_all(
    path: &Path,
    max_records: u64,
    mut f: impl FnMut(&Record<'_>),
) -> io::Result<ReadStats> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let mut stats = ReadStats::default();
    // A record is at most ~1 KiB of text plus its dictionary; a read into a smaller buffer
    // fails with EINVAL rather than cutting the record.
    let mut buf = vec![0u8; 16 * 1024];
    while stats.records < max_records {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]);
                match parse_record(&text) {
                    Some(r) => {
                        stats.records += 1;
                        stats.first_seq.get_or_insert(r.seq);
                        f(&r);
                    }
                    None => stats.malformed += 1,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(stats),
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => stats.overwritten_while_reading += 1,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stats.capped = stats.records >= max_records;
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_and_its_dictionary() {
        let r = parse_record(
            "3,1234,31207411,-;DMAR: VT-d detected Invalidation Time-out Error: SID 200\n \
             SUBSYSTEM=pci\n DEVICE=+pci:0000:00:05.0\n",
        )
        .unwrap();
        assert_eq!(r.seq, 1234);
        assert_eq!(r.ts_us, 31_207_411);
        assert_eq!(
            r.text,
            "DMAR: VT-d detected Invalidation Time-out Error: SID 200"
        );
        // A caller field (CONFIG_PRINTK_CALLER) after the flags, and a `;` in the text.
        let r = parse_record("6,7,8,c,caller=T1;a; b\n").unwrap();
        assert_eq!((r.seq, r.ts_us, r.text), (7, 8, "a; b"));
    }

    #[test]
    fn a_frame_that_is_not_a_record_is_refused() {
        assert!(parse_record("no separator").is_none());
        assert!(parse_record("x,1,2,-;text").is_none());
        assert!(parse_record("6,1;text").is_none());
    }

    #[test]
    fn a_missing_log_is_an_error() {
        let e = read_all(Path::new("/nonexistent/kmsg"), 10, |_| {}).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
