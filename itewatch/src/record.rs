//! `itewatch record`: live probes → trace file.
//!
//! The loop drains the ring buffer (through [`LiveReader`], the reader every live sink shares)
//! as it becomes readable and every 250 ms (a CPU spinning with interrupts off never sends the
//! ring buffer's wake-up), writes each kernel record exactly as it came out of the kernel, and
//! at each tick writes the reader's loss markers and device identities and flushes the file,
//! so a host that locks up leaves a readable trace behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::event::{KTime, Record};
use crate::live::{Item, LiveReader};
use crate::output::{OnDrop, Output, WriteError};
use crate::probe::LoadOptions;
use crate::trace::{TraceEnd, TraceWriter};

pub use crate::live::monotonic_ns;

/// What `record` needs.
#[derive(Clone, Debug)]
pub struct RecordOptions {
    pub output: PathBuf,
    pub duration: Option<Duration>,
    /// Written (with the attach plan as JSON) once every probe is attached.
    pub ready_file: Option<PathBuf>,
    pub load: LoadOptions,
    /// Also print each record as a text line on stdout.
    pub echo: bool,
    /// Record although required probes did not attach (`--degraded`).
    pub allow_degraded: bool,
}

/// Counts of a finished recording.
#[derive(Clone, Debug, Default)]
pub struct RecordSummary {
    pub end: TraceEnd,
    pub stacks: u64,
    pub missing_required: Vec<String>,
    /// Compact records the decoder could not complete (thread or IOMMU not announced); a
    /// report of the trace counts the same.
    pub decoder: crate::event::DecoderStats,
}

/// Writes what the reader hands out.
struct Writer<W: Write> {
    writer: TraceWriter<W>,
    echo: bool,
}

impl<W: Write> Writer<W> {
    fn record(&mut self, rec: &Record) -> std::io::Result<()> {
        if self.echo {
            println!("{}", crate::render::record_line(rec));
        }
        self.writer.write_record(rec)
    }

    fn item(&mut self, item: Item<'_>) -> std::io::Result<()> {
        match item {
            Item::Made(r) => self.record(&r),
            Item::Announcement { bytes } => self.writer.write_raw_event(bytes),
            Item::Kernel { bytes, event } => {
                if self.echo {
                    println!("{}", crate::render::record_line(&Record::Event(event)));
                }
                self.writer.write_raw_event(bytes)
            }
        }
    }

    fn records(&mut self, recs: Vec<Record>) -> std::io::Result<()> {
        recs.iter().try_for_each(|r| self.record(r))
    }
}

/// Runs the recording until SIGINT/SIGTERM or the duration, then finishes the trace.
pub fn run(opts: &RecordOptions) -> anyhow::Result<RecordSummary> {
    use anyhow::Context as _;
    if opts.echo && crate::output::is_stdout(&opts.output) {
        anyhow::bail!("--echo prints on stdout, where `-o -` writes the trace: use one of them");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let mut partial = None;
    rt.block_on(run_async(opts, &mut partial))
        .map_err(|e| match partial {
            // The records are not lost: they stay under the temporary name.
            Some(p) => e.context(format!(
                "recording stopped; {} is as it was, what was recorded is in {}",
                opts.output.display(),
                p.display()
            )),
            None => e,
        })
}

/// Ring-buffer records taken per wake-up before the loop looks at its timers again.
const BUDGET: usize = 65536;

/// `partial`: set to the temporary file once it exists (for the error message).
async fn run_async(
    opts: &RecordOptions,
    partial: &mut Option<PathBuf>,
) -> anyhow::Result<RecordSummary> {
    use anyhow::Context as _;
    use tokio::signal::unix::{signal, SignalKind};

    let reader = LiveReader::attach(&opts.load)?;
    for n in reader.notes() {
        eprintln!("itewatch: note: {n}");
    }
    // Why each probe is unavailable comes first, also when a missing required one ends the
    // recording here (a verifier refusal is only told here).
    for p in reader.plan() {
        if p.mechanism.is_none() {
            eprintln!(
                "itewatch: probe {} unavailable: {}",
                p.name,
                p.detail.as_deref().unwrap_or("?")
            );
        }
    }
    let missing = reader.missing_required();
    if !missing.is_empty() && !opts.allow_degraded {
        anyhow::bail!(
            "required probes missing: {}; a recording without them cannot show the race (see \
             `itewatch doctor`). `--degraded` records anyway, and every report of it says it is blind",
            missing.join(", ")
        );
    }
    // Host, CPU model, VT-d units, scalable mode, ATS in use: into the header, so every report
    // of the trace names the machine it came from.
    let mut header = crate::host::live_header(reader.plan(), reader.kernel_fixes(), monotonic_ns());
    header.started_unix_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs());
    // Written under a temporary name and renamed when the recording ends, so an existing
    // trace of that name survives a failed recording. The temporary file is kept when the
    // recording fails or the host dies: flushed once a second, it is a readable trace.
    let out = Output::create(&opts.output, OnDrop::Keep)?;
    *partial = out.temp_path().map(Path::to_path_buf);
    let writer = TraceWriter::new(out, &header)
        .map_err(|e| WriteError::new(partial.as_deref().unwrap_or(&opts.output), e))?;
    let mut w = Writer {
        writer,
        echo: opts.echo,
    };
    let mut reader = reader
        .into_async()
        .map_err(|b| b.1)
        .context("ring buffer fd")?;
    // The device snapshot first: names for the SIDs the probes will report.
    let mut recs = Vec::new();
    reader.get_mut().periodic(KTime(monotonic_ns()), &mut recs);
    w.records(recs)?;
    if let Some(path) = &opts.ready_file {
        std::fs::write(path, serde_json::to_vec_pretty(reader.get_ref().plan())?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let started = monotonic_ns();
    eprintln!(
        "itewatch: recording to {}{} ({} of {} probes attached); Ctrl-C to stop",
        opts.output.display(),
        partial
            .as_deref()
            .map(|p| format!(" (as {} until it ends)", p.display()))
            .unwrap_or_default(),
        header
            .probes
            .iter()
            .filter(|p| p.mechanism.is_some())
            .count(),
        header.probes.len()
    );

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let deadline = opts.duration.map(|d| tokio::time::Instant::now() + d);
    let sleep_until = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(sleep_until);
    loop {
        tokio::select! {
            guard = reader.readable_mut() => {
                let mut guard = guard.context("ring buffer poll")?;
                let taken = guard.get_inner_mut().drain_with(BUDGET, |it| w.item(it))?;
                if taken < BUDGET {
                    guard.clear_ready();
                }
            }
            _ = tick.tick() => {
                // Drain here too, not only on readiness: the ring buffer's wake-up is an
                // irq_work on the CPU that submitted the record, and a CPU spinning with
                // interrupts off (the stuck `qi_submit_sync` this tool exists for) never
                // runs it. Its records are in the ring all the same.
                while reader.get_mut().drain_with(BUDGET, |it| w.item(it))? == BUDGET {}
                let mut recs = Vec::new();
                reader.get_mut().periodic(KTime(monotonic_ns()), &mut recs);
                w.records(recs)?;
                w.writer.flush()?;
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut sleep_until => break,
        }
    }
    // Drain what is left, then the final counters.
    let reader = reader.get_mut();
    while reader.drain_with(BUDGET, |it| w.item(it))? == BUDGET {}
    let mut recs = Vec::new();
    reader.periodic(KTime(monotonic_ns()), &mut recs);
    w.records(recs)?;
    let totals = reader.counters();
    let end = w.writer.end_mut();
    end.read_failed = totals.read_failed;
    end.return_without_entry = totals.return_without_entry;
    end.stack_failed = totals.stack_failed;
    end.stack_clearings = reader.stack_clearings();
    end.duration_ns = Some(monotonic_ns().saturating_sub(started));
    end.programs = reader.program_stats();
    let end = end.clone();
    let stacks = reader.stacks_seen();
    let decoder = reader.decoder_stats();
    w.writer.finish().context("finishing the trace")?.commit()?;
    Ok(RecordSummary {
        end,
        stacks,
        missing_required: missing,
        decoder,
    })
}
