//! Output files that never destroy what was there: every file a command writes (`report -o`,
//! `analyze -o`, `simulate -o`, `record -o`, the live view's exports) is written under a
//! temporary name beside it and renamed over the destination only once it is whole. Until
//! then an existing file at the destination is untouched, whatever fails (rendering, a full
//! disk, a killed process); a reader never sees half a file.
//!
//! `-` as a destination means standard output ([`Output`]).
//!
//! The temporary name is `<name>.<pid>-<n>.partial` in the destination's directory (a rename
//! is atomic only within one file system). `record` keeps it when it fails or the host dies
//! ([`OnDrop::Keep`]): what was recorded until then is there, readable, under that name.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A failed write, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("cannot write {path}: {source}")]
pub struct WriteError {
    pub path: String,
    pub source: io::Error,
}

impl WriteError {
    pub fn new(path: &Path, source: io::Error) -> WriteError {
        WriteError {
            path: path.display().to_string(),
            source,
        }
    }
}

/// What happens to the temporary file when an [`AtomicFile`] is dropped without
/// [`AtomicFile::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDrop {
    /// Removed: a failed report leaves nothing behind.
    Remove,
    /// Kept: a recording that failed keeps what it recorded, under the temporary name.
    Keep,
}

/// Distinguishes the temporary files of one process (tests write several at once).
static NEXT: AtomicU64 = AtomicU64::new(0);

/// A file written under a temporary name and renamed into place by [`AtomicFile::commit`].
pub struct AtomicFile {
    dest: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    on_drop: OnDrop,
}

impl AtomicFile {
    /// Creates the temporary file beside `dest`. Fails, naming `dest`, when its directory
    /// cannot be written or `dest` is a directory.
    pub fn create(dest: &Path, on_drop: OnDrop) -> Result<AtomicFile, WriteError> {
        let err = |source| WriteError::new(dest, source);
        if dest.is_dir() {
            return Err(err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            )));
        }
        let name = dest
            .file_name()
            .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        loop {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let mut tmp_name = name.to_os_string();
            tmp_name.push(format!(".{}-{n}.partial", std::process::id()));
            let tmp = dir.join(tmp_name);
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(f) => {
                    return Ok(AtomicFile {
                        dest: dest.to_path_buf(),
                        tmp,
                        out: Some(BufWriter::with_capacity(1 << 16, f)),
                        on_drop,
                    })
                }
                // A leftover of an earlier process with the same pid: never overwritten.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(err(e)),
            }
        }
    }

    /// Where the bytes are until [`AtomicFile::commit`].
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes, syncs and renames the file over the destination.
    pub fn commit(mut self) -> Result<(), WriteError> {
        let err = |source| WriteError::new(&self.dest, source);
        let out = self
            .out
            .take()
            .ok_or_else(|| err(io::Error::other("already committed")))?;
        let f = out.into_inner().map_err(|e| err(e.into_error()))?;
        f.sync_all().map_err(err)?;
        drop(f);
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            // Not renamed: the temporary file goes (or stays, for `Keep`) in Drop.
            self.out = None;
            return Err(err(e));
        }
        // The rename itself must survive a crash: sync the directory (best effort; not every
        // file system allows opening a directory for it).
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        self.tmp = PathBuf::new();
        Ok(())
    }

    fn out(&mut self) -> io::Result<&mut BufWriter<File>> {
        self.out
            .as_mut()
            .ok_or_else(|| io::Error::other("write after commit"))
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out()?.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out()?.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out()?.flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.tmp.as_os_str().is_empty() {
            return;
        }
        match self.on_drop {
            OnDrop::Remove => {
                self.out = None;
                let _ = std::fs::remove_file(&self.tmp);
            }
            // Whatever is buffered goes to the file too (BufWriter's drop flushes).
            OnDrop::Keep => {}
        }
    }
}

/// A command's output: standard output (`-`) or a file written by [`AtomicFile`].
pub enum Output {
    Stdout(BufWriter<io::Stdout>),
    File(AtomicFile),
}

/// Whether a destination names standard output.
pub fn is_stdout(dest: &Path) -> bool {
    dest.as_os_str() == "-"
}

impl Output {
    /// `-` is standard output; anything else a file, replaced only by [`Output::commit`].
    pub fn create(dest: &Path, on_drop: OnDrop) -> Result<Output, WriteError> {
        if is_stdout(dest) {
            Ok(Output::Stdout(BufWriter::new(io::stdout())))
        } else {
            AtomicFile::create(dest, on_drop).map(Output::File)
        }
    }

    /// Flushes standard output, or renames the file into place.
    pub fn commit(self) -> Result<(), WriteError> {
        match self {
            Output::Stdout(mut w) => w
                .flush()
                .map_err(|e| WriteError::new(Path::new("standard output"), e)),
            Output::File(f) => f.commit(),
        }
    }

    /// The temporary file's name (none for standard output).
    pub fn temp_path(&self) -> Option<&Path> {
        match self {
            Output::Stdout(_) => None,
            Output::File(f) => Some(f.temp_path()),
        }
    }
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Output::Stdout(w) => w.write(buf),
            Output::File(f) => f.write(buf),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.write_all(buf),
            Output::File(f) => f.write_all(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(w) => w.flush(),
            Output::File(f) => f.flush(),
        }
    }
}

/// Writes `dest` whole or not at all: `produce` writes into the temporary file, which replaces
/// `dest` only when `produce` succeeded. On any error `dest` is as it was.
pub fn write_file<T, E: From<WriteError>>(
    dest: &Path,
    produce: impl FnOnce(&mut AtomicFile) -> Result<T, E>,
) -> Result<T, E> {
    let mut f = AtomicFile::create(dest, OnDrop::Remove)?;
    let v = produce(&mut f)?;
    f.commit()?;
    Ok(v)
}

/// Checks at start that files can be created in `dir` (the live view's `--export-dir`), by
/// creating a temporary file there and removing it.
pub fn check_dir_writable(dir: &Path) -> Result<(), WriteError> {
    if !dir.is_dir() {
        return Err(WriteError::new(
            dir,
            io::Error::new(io::ErrorKind::NotFound, "not a directory"),
        ));
    }
    AtomicFile::create(&dir.join("itewatch-write-check"), OnDrop::Remove)
        .map(drop)
        .map_err(|e| WriteError::new(dir, e.source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[derive(Debug)]
    enum TestError {
        Write(WriteError),
        Render,
    }
    impl From<WriteError> for TestError {
        fn from(e: WriteError) -> Self {
            TestError::Write(e)
        }
    }

    // The regression: `report -o` truncated an existing file and then failed.
    #[test]
    fn an_existing_file_stays_untouched_when_rendering_fails() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.json");
        std::fs::write(&p, b"the previous report").unwrap();
        let r: Result<(), TestError> = write_file(&p, |w| {
            w.write_all(b"half a new rep")
                .and_then(|()| w.flush())
                .map_err(|e| WriteError::new(&p, e))?;
            Err(TestError::Render)
        });
        assert!(matches!(r, Err(TestError::Render)));
        assert_eq!(std::fs::read(&p).unwrap(), b"the previous report");
        assert_eq!(entries(d.path()), ["report.json"], "no temporary file left");
    }

    #[test]
    fn a_whole_write_replaces_the_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("report.json");
        std::fs::write(&p, b"old").unwrap();
        let n: Result<u32, TestError> = write_file(&p, |w| {
            w.write_all(b"new contents")
                .map_err(|e| WriteError::new(&p, e))?;
            Ok(7)
        });
        assert_eq!(n.unwrap(), 7);
        assert_eq!(std::fs::read(&p).unwrap(), b"new contents");
        assert_eq!(entries(d.path()), ["report.json"]);
    }

    #[test]
    fn nothing_is_visible_at_the_destination_before_commit() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.itw");
        let mut f = AtomicFile::create(&p, OnDrop::Remove).unwrap();
        f.write_all(b"abc").unwrap();
        f.flush().unwrap();
        assert!(!p.exists());
        assert_eq!(std::fs::read(f.temp_path()).unwrap(), b"abc");
        assert!(f
            .temp_path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with(".partial"));
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
    }

    #[test]
    fn keep_leaves_what_was_written_under_the_temporary_name() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.itw");
        std::fs::write(&p, b"older recording").unwrap();
        let mut f = AtomicFile::create(&p, OnDrop::Keep).unwrap();
        f.write_all(b"records so far").unwrap();
        let tmp = f.temp_path().to_path_buf();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"older recording");
        assert_eq!(std::fs::read(&tmp).unwrap(), b"records so far");
    }

    #[test]
    fn two_writers_of_one_destination_do_not_share_a_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.json");
        let a = AtomicFile::create(&p, OnDrop::Remove).unwrap();
        let b = AtomicFile::create(&p, OnDrop::Remove).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
    }

    #[test]
    fn errors_name_the_destination_and_say_writing() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("no-such-dir").join("r.json");
        let e = AtomicFile::create(&p, OnDrop::Remove).err().unwrap();
        let text = e.to_string();
        assert!(text.starts_with("cannot write "), "{text}");
        assert!(text.contains("no-such-dir/r.json"), "{text}");
        let e = AtomicFile::create(d.path(), OnDrop::Remove).err().unwrap();
        assert!(e.to_string().contains("is a directory"), "{e}");
        // Through `write_file`: the caller's error type carries it, `produce` never runs.
        let r: Result<(), TestError> = write_file(&p, |_| panic!("nothing to write into"));
        match r {
            Err(TestError::Write(e)) => assert!(e.path.ends_with("no-such-dir/r.json"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_directory_check_refuses_a_missing_directory_and_a_file() {
        let d = tempfile::tempdir().unwrap();
        check_dir_writable(d.path()).unwrap();
        assert_eq!(
            entries(d.path()),
            Vec::<String>::new(),
            "the probe file is gone"
        );
        let e = check_dir_writable(&d.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
        let f = d.path().join("file");
        std::fs::write(&f, b"").unwrap();
        assert!(check_dir_writable(&f).is_err());
    }

    #[test]
    fn dash_is_standard_output() {
        assert!(is_stdout(Path::new("-")));
        assert!(!is_stdout(Path::new("./-")));
        assert!(Output::create(Path::new("-"), OnDrop::Remove)
            .unwrap()
            .temp_path()
            .is_none());
    }
}
