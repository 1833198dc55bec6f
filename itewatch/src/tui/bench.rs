//! A deterministic driver of the live view's loop, for the benchmark (`cargo bench -p itewatch
//! --bench tui`, docs/benchmarks.md): a simulated stream played at a fixed speed against a
//! virtual clock, with a frame drawn every `1/fps` second of that clock into a full-size
//! crossterm terminal that writes to a sink. It makes the same calls as the interactive loop
//! (`Engine::step`, `periodic`, `refresh_snapshot`, `ui::draw`), without a tty, keyboard or
//! wall clock, so an instruction count (callgrind) or CPU time is the cost of N seconds of
//! input, however loaded the machine is.

use std::cell::Cell;
use std::io;
use std::rc::Rc;

use ratatui::backend::CrosstermBackend;
use ratatui::layout::Rect;
use ratatui::{Terminal, TerminalOptions, Viewport};

use crate::correlate::Config;

use super::{metrics, open_simulated, ui, Engine, LiveError};

/// What to play and how.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Scenario (`soak`: benign traffic on five devices plus every incident scenario).
    pub scenario: String,
    pub seed: u64,
    /// Playback speed, as `itewatch live --speed` (`soak` at 0.685 is about 100 k events/s).
    pub speed: f64,
    /// Redraws per second of the virtual clock.
    pub fps: u32,
    /// Seconds of the virtual clock to play.
    pub seconds: f64,
    pub width: u16,
    pub height: u16,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            scenario: "soak".into(),
            seed: 0,
            speed: 0.685,
            fps: 10,
            seconds: 10.0,
            width: 120,
            height: 40,
        }
    }
}

/// What was played.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchResult {
    pub frames: u64,
    pub records: u64,
    pub events: u64,
    pub incidents: usize,
    /// Bytes the terminal wrote (escape sequences and text).
    pub terminal_bytes: u64,
}

/// Counts what it is given and keeps nothing.
struct CountingSink(Rc<Cell<u64>>);

impl io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.set(self.0.get() + buf.len() as u64);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Plays `o.seconds` of the virtual clock.
pub fn run(o: &BenchOptions) -> Result<BenchResult, LiveError> {
    let opened = open_simulated(&o.scenario, o.seed, o.speed)?;
    let mut e = Engine::new(opened, Config::default());
    let area = Rect::new(0, 0, o.width, o.height);
    let written = Rc::new(Cell::new(0));
    let mut terminal = Terminal::with_options(
        CrosstermBackend::new(CountingSink(written.clone())),
        TerminalOptions {
            viewport: Viewport::Fixed(area),
        },
    )?;
    let frame_ns = 1_000_000_000 / u64::from(o.fps.max(1));
    let frames = (o.seconds * f64::from(o.fps.max(1))).max(0.0) as u64;
    // Any origin: the playback measures from its first poll.
    let mut wall = 1_000_000_000u64;
    let mut last_periodic = wall;
    let mut last_rate = (wall, 0u64);
    let mut drawn = 0;
    for _ in 0..frames {
        wall += frame_ns;
        e.step(wall, None);
        if wall - last_periodic >= 1_000_000_000 {
            e.periodic(wall);
            e.app.meters.events_per_s =
                metrics::rate_per_s(last_rate.1, e.app.events, wall - last_rate.0);
            last_rate = (wall, e.app.events);
            last_periodic = wall;
        }
        e.refresh_snapshot();
        terminal.draw(|f| ui::draw(f, &e.app))?;
        drawn += 1;
        if e.app.ended {
            break;
        }
    }
    Ok(BenchResult {
        frames: drawn,
        records: e.records,
        events: e.app.events,
        incidents: e.app.all_incidents().len(),
        terminal_bytes: written.get(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plays_the_input_rate_it_is_asked_for_and_draws_every_frame() {
        let o = BenchOptions {
            seconds: 0.3,
            speed: 0.1,
            width: 80,
            height: 30,
            ..Default::default()
        };
        let r = run(&o).unwrap();
        assert_eq!(r.frames, 3);
        assert!(r.events > 1_000, "{r:?}");
        // Faster, more events in the same number of frames.
        let r2 = run(&BenchOptions {
            speed: 0.2,
            ..o.clone()
        })
        .unwrap();
        assert_eq!(r2.frames, 3);
        assert!(r2.events > r.events, "{r:?} {r2:?}");
        assert!(r.terminal_bytes > 80 * 30, "{r:?}");
        // Deterministic: the same input gives the same result.
        assert_eq!(run(&o).unwrap(), r);
    }
}
