//! The terminal: raw mode and the alternate screen, restored by a guard on every exit path —
//! normal return, error, panic (a hook restores before the panic message prints) and
//! SIGTERM/SIGHUP (a flag the loop checks; it then returns normally and the guards drop,
//! which also closes the BPF stats fd and detaches the probes).
//!
//! A terminal that goes away (ssh dropped, tmux pane or window closed) does not always send
//! SIGHUP to the view: only the session leader gets it, and a shell that runs the view as a
//! plain child does not pass it on. crossterm's reader then spins forever on the dead tty,
//! readable but returning nothing, and never returns even with a timeout (crossterm#793).
//! [`next_input`] therefore looks at the tty with poll(2) before crossterm reads it, and a
//! watchdog thread ends the process if the tty has hung up and the loop has not noticed
//! within a second (the one race left: a hang-up between that look and crossterm's read).

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};
use std::time::Duration;

use crossterm::event::{self as cevent, Event as CEvent};

use crossterm::cursor::{Hide, Show};
use crossterm::terminal::{
    disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen,
};
use crossterm::ExecutableCommand;

static TERMINATE: AtomicBool = AtomicBool::new(false);
static ACTIVE: AtomicBool = AtomicBool::new(false);
static HOOK: Once = Once::new();

extern "C" fn on_signal(_sig: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

/// Whether SIGTERM, SIGHUP or SIGINT arrived.
pub fn terminate_requested() -> bool {
    TERMINATE.load(Ordering::SeqCst)
}

/// Routes SIGTERM, SIGHUP and SIGINT to [`terminate_requested`].
pub fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGHUP, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe; the
        // sigaction struct is zero-initialised and then filled in.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Exit status after the terminal hung up (128 + SIGHUP, as a shell reports it).
pub const EXIT_HANGUP: u8 = 129;

/// The terminal crossterm reads keys from: stdin when it is a terminal, else `/dev/tty`.
fn tty_fd() -> Option<RawFd> {
    static TTY: OnceLock<Option<File>> = OnceLock::new();
    if io::stdin().is_terminal() {
        return Some(io::stdin().as_raw_fd());
    }
    TTY.get_or_init(|| File::open("/dev/tty").ok())
        .as_ref()
        .map(AsRawFd::as_raw_fd)
}

/// What poll(2) says of the terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tty {
    Readable,
    Quiet,
    HungUp,
}

fn poll_tty(fd: RawFd, timeout: Duration) -> Tty {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, ms) };
    if n < 0 {
        // EINTR (a signal: the loop checks its flag) or ENOMEM: nothing to report.
        return Tty::Quiet;
    }
    if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        Tty::HungUp
    } else if p.revents & libc::POLLIN != 0 {
        Tty::Readable
    } else {
        Tty::Quiet
    }
}

/// What waiting on the terminal gave.
#[derive(Debug)]
pub enum Input {
    /// A key, a resize, ..
    Event(CEvent),
    /// Nothing within the timeout.
    Idle,
    /// The terminal hung up: end the view.
    Gone,
}

/// Waits up to `timeout` for a key or resize; [`Input::Gone`] once the terminal has hung up.
pub fn next_input(timeout: Duration) -> io::Result<Input> {
    let Some(fd) = tty_fd() else {
        return Ok(if cevent::poll(timeout)? {
            Input::Event(cevent::read()?)
        } else {
            Input::Idle
        });
    };
    // Events crossterm has already read (several keys in one read, a resize) come first.
    if poll_tty(fd, Duration::ZERO) == Tty::HungUp {
        return Ok(Input::Gone);
    }
    if cevent::poll(Duration::ZERO)? {
        return Ok(Input::Event(cevent::read()?));
    }
    match poll_tty(fd, timeout) {
        Tty::HungUp => Ok(Input::Gone),
        Tty::Readable | Tty::Quiet => Ok(if cevent::poll(Duration::ZERO)? {
            Input::Event(cevent::read()?)
        } else {
            Input::Idle
        }),
    }
}

/// Ends the process if the terminal has been hung up for a second while the view is still on
/// it: the loop is then stuck inside crossterm's reader and cannot return by itself.
fn start_watchdog() {
    let Some(fd) = tty_fd() else { return };
    let spawned = std::thread::Builder::new()
        .name("tty-watchdog".into())
        .spawn(move || {
            let mut hung = 0;
            while ACTIVE.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(250));
                hung = if poll_tty(fd, Duration::ZERO) == Tty::HungUp {
                    hung + 1
                } else {
                    0
                };
                if hung >= 4 && ACTIVE.load(Ordering::SeqCst) {
                    restore();
                    std::process::exit(i32::from(EXIT_HANGUP));
                }
            }
        });
    // Without the thread the view still ends on a hang-up seen by `next_input`.
    drop(spawned);
}

fn restore() {
    if ACTIVE.swap(false, Ordering::SeqCst) {
        let mut out = io::stdout();
        let _ = out.execute(LeaveAlternateScreen);
        let _ = out.execute(Show);
        let _ = disable_raw_mode();
        let _ = out.flush();
    }
}

/// Raw mode + alternate screen while alive.
pub struct TerminalGuard(());

impl TerminalGuard {
    pub fn enter() -> io::Result<TerminalGuard> {
        HOOK.call_once(|| {
            let prev = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                restore();
                prev(info);
            }));
        });
        enable_raw_mode()?;
        ACTIVE.store(true, Ordering::SeqCst);
        let mut out = io::stdout();
        out.execute(EnterAlternateScreen)?;
        out.execute(Hide)?;
        start_watchdog();
        Ok(TerminalGuard(()))
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}
