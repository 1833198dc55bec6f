//! A tiny QMP client: JSON lines over QEMU's Unix socket. Enough for `qmp_capabilities`,
//! `device_del` and watching for `DEVICE_DELETED` events; every read is bounded.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events received while waiting for something else, oldest first.
    pub events: Vec<Value>,
}

impl Qmp {
    /// Connects (retrying until `deadline`: QEMU creates the socket shortly after start) and
    /// negotiates capabilities.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("connecting to {}", path.display()))
                }
            }
        };
        let writer = stream.try_clone()?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        let greeting = q
            .read_value(deadline)?
            .context("QMP closed before its greeting")?;
        if greeting.get("QMP").is_none() {
            bail!("unexpected QMP greeting: {greeting}");
        }
        q.execute("qmp_capabilities", json!({}), deadline)?;
        Ok(q)
    }

    /// One JSON value, or `None` on EOF / when `deadline` passes first.
    fn read_value(&mut self, deadline: Instant) -> Result<Option<Value>> {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))?;
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Ok(None),
            Ok(_) => Ok(Some(
                serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))?,
            )),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a command and returns its `return` value; events seen meanwhile are queued.
    pub fn execute(&mut self, cmd: &str, args: Value, deadline: Instant) -> Result<Value> {
        let msg = json!({ "execute": cmd, "arguments": args });
        self.writer.write_all(format!("{msg}\n").as_bytes())?;
        loop {
            let Some(v) = self.read_value(deadline)? else {
                bail!("no QMP reply to {cmd} in time");
            };
            if v.get("event").is_some() {
                self.events.push(v);
            } else if let Some(r) = v.get("return") {
                return Ok(r.clone());
            } else if let Some(e) = v.get("error") {
                bail!("QMP {cmd} failed: {e}");
            }
        }
    }

    /// Waits until a queued or new event satisfies `pred`; returns it (removed from the queue).
    pub fn wait_event(
        &mut self,
        deadline: Instant,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Option<Value>> {
        if let Some(i) = self.events.iter().position(&pred) {
            return Ok(Some(self.events.remove(i)));
        }
        while let Some(v) = self.read_value(deadline)? {
            if v.get("event").is_some() {
                if pred(&v) {
                    return Ok(Some(v));
                }
                self.events.push(v);
            }
        }
        Ok(None)
    }
}

/// `DEVICE_DELETED` for the QEMU device `id`.
pub fn is_device_deleted(v: &Value, id: &str) -> bool {
    v.get("event").and_then(Value::as_str) == Some("DEVICE_DELETED")
        && v.pointer("/data/device").and_then(Value::as_str) == Some(id)
}
