//! A newc ("070701") cpio archive written directly, so the initramfs can hold device nodes
//! (`/dev/console`) without root and without the `cpio` tool. Uncompressed: the kernel takes
//! it as is and the guest boots a little faster than from a gzip archive under TCG.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

pub struct Cpio {
    buf: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    pub fn new() -> Self {
        Cpio {
            buf: Vec::new(),
            ino: 1,
        }
    }

    fn pad4(&mut self) {
        while self.buf.len() & 3 != 0 {
            self.buf.push(0);
        }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = name.trim_start_matches('/');
        let nlink = if mode & 0o170000 == S_IFDIR { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.ino += 1;
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            // Writing to a Vec cannot fail.
            let _ = write!(self.buf, "{f:08x}");
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad4();
        self.buf.extend_from_slice(data);
        self.pad4();
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, &[], (0, 0));
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, S_IFREG | mode, data, (0, 0));
    }

    pub fn file_from(&mut self, name: &str, mode: u32, src: &Path) -> Result<()> {
        let data = fs::read(src).with_context(|| format!("reading {}", src.display()))?;
        self.file(name, mode, &data);
        Ok(())
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, target.as_bytes(), (0, 0));
    }

    pub fn chardev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, &[], (major, minor));
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[], (0, 0));
        // The kernel reads the archive in 512-byte blocks happily either way; pad like cpio(1).
        while self.buf.len() & 511 != 0 {
            self.buf.push(0);
        }
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_layout_is_aligned_and_terminated() {
        let mut c = Cpio::new();
        c.dir("bin");
        c.file("/init", 0o755, b"#!/bin/sh\n");
        c.chardev("dev/console", 5, 1);
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let s = String::from_utf8_lossy(&out);
        assert!(s.contains("init\0"));
        assert!(s.contains("TRAILER!!!"));
        // Header of the second entry starts 4-aligned.
        let second = s
            .find("070701")
            .and_then(|_| s[6..].find("070701"))
            .unwrap()
            + 6;
        assert_eq!(second % 4, 0);
    }
}
