//! What `itewatch analyze` reads: a kernel log, plain or compressed, told by its first bytes,
//! never by its name. Rotated logs (`kern.log.2.gz`, `journal.xz`, `dmesg.zst`) are read as
//! they are; input that is not a log — a directory, an itewatch trace, other binary data, or
//! nothing at all — is refused with an error that names it, instead of "no incident".

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;

/// Why an input cannot be analysed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {name}: {source}")]
    Read { name: String, source: io::Error },
    #[error("{name} is a directory: give a log file (or - for standard input)")]
    Directory { name: String },
    #[error("{name} is empty: there is no kernel log to analyze")]
    Empty { name: String },
    #[error("{name} is an itewatch trace, not a kernel log: use `itewatch report {name}`")]
    Trace { name: String },
    #[error("{name} is binary data ({what}), not a kernel log")]
    Binary { name: String, what: String },
    #[error("cannot decompress {name} ({format}): {detail}")]
    Decompress {
        name: String,
        format: &'static str,
        detail: String,
    },
}

/// How the bytes are packed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packing {
    Plain,
    Gzip,
    Xz,
    Zstd,
}

/// The packing a prefix announces (pure).
pub fn packing(prefix: &[u8]) -> Packing {
    if prefix.starts_with(&[0x1f, 0x8b]) {
        Packing::Gzip
    } else if prefix.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Packing::Xz
    } else if prefix.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Packing::Zstd
    } else {
        Packing::Plain
    }
}

/// Why a prefix of (unpacked) input is not a text log, if it is not (pure). A log may hold a
/// stray control byte; NUL bytes in its first 4 KiB make it binary.
pub fn not_text(prefix: &[u8]) -> Option<String> {
    if prefix.starts_with(&crate::trace::MAGIC) {
        return Some("trace".into());
    }
    let head = &prefix[..prefix.len().min(4096)];
    let nuls = head.iter().filter(|&&b| b == 0).count();
    (nuls > 0).then(|| format!("{nuls} NUL bytes in its first {} bytes", head.len()))
}

/// Opens `path` (`None` or `-`: standard input) as a stream of log text; returns it with the
/// name to show for it.
pub fn open(path: Option<&Path>) -> Result<(Box<dyn BufRead>, Option<String>), InputError> {
    let (raw, name): (Box<dyn Read>, Option<String>) = match path {
        None => (Box::new(io::stdin()), None),
        Some(p) if p.as_os_str() == "-" => (Box::new(io::stdin()), None),
        Some(p) => {
            let name = p.display().to_string();
            if p.is_dir() {
                return Err(InputError::Directory { name });
            }
            let f = std::fs::File::open(p).map_err(|source| InputError::Read {
                name: name.clone(),
                source,
            })?;
            (Box::new(f), Some(name))
        }
    };
    let shown = name.clone().unwrap_or_else(|| "standard input".into());
    let mut r = BufReader::with_capacity(1 << 16, raw);
    let prefix = peek(&mut r, &shown)?;
    let unpacked: Box<dyn BufRead> = match packing(&prefix) {
        Packing::Plain => Box::new(r),
        Packing::Gzip => Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(r))),
        Packing::Zstd => match ruzstd::decoding::StreamingDecoder::new(r) {
            Ok(d) => Box::new(BufReader::new(d)),
            Err(e) => {
                return Err(InputError::Decompress {
                    name: shown,
                    format: "zstd",
                    detail: e.to_string(),
                })
            }
        },
        Packing::Xz => {
            // lzma-rs decodes whole; a log is read whole by the analyzer's line reader anyway.
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut r, &mut out).map_err(|e| InputError::Decompress {
                name: shown.clone(),
                format: "xz",
                detail: format!("{e:?}"),
            })?;
            Box::new(io::Cursor::new(out))
        }
    };
    let mut unpacked = BufReader::with_capacity(1 << 16, unpacked);
    let head = peek(&mut unpacked, &shown)?;
    if head.is_empty() {
        return Err(InputError::Empty { name: shown });
    }
    match not_text(&head) {
        Some(t) if t == "trace" => Err(InputError::Trace { name: shown }),
        Some(what) => Err(InputError::Binary { name: shown, what }),
        None => Ok((Box::new(unpacked), name)),
    }
}

/// The first bytes of `r` without consuming them.
fn peek(r: &mut impl BufRead, name: &str) -> Result<Vec<u8>, InputError> {
    r.fill_buf()
        .map(<[u8]>::to_vec)
        .map_err(|source| InputError::Read {
            name: name.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packings_by_magic() {
        assert_eq!(packing(&[0x1f, 0x8b, 8]), Packing::Gzip);
        assert_eq!(packing(b"\xfd7zXZ\0\0"), Packing::Xz);
        assert_eq!(packing(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Packing::Zstd);
        assert_eq!(packing(b"[    1.0] DMAR"), Packing::Plain);
    }

    #[test]
    fn text_and_binary() {
        assert_eq!(not_text(b"[ 1.0] hello\n"), None);
        assert_eq!(not_text(&crate::trace::MAGIC), Some("trace".into()));
        assert!(not_text(b"ab\0cd").is_some());
    }
}
