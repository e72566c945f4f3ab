//! The host side of the guest console, as QEMU's `-nographic` gives it:
//! COM1's output on stdout, stdin typed into COM1, Ctrl-A escapes for the
//! VMM, and the terminal in raw mode for as long as the guest owns it.
//!
//! - [`terminal`]: raw mode and its restoration on every way out (guard,
//!   panic hook, signals).
//! - [`signals`]: SIGTERM, SIGHUP and SIGINT from outside stop the machine
//!   cleanly (exit status 128 + signal number); a second one ends the
//!   process at once, the terminal restored.
//! - [`input`]: the stdin thread and the Ctrl-A escape keys.
//! - [`output`]: COM1's output buffer, flushed within milliseconds rather
//!   than once per byte.
//!
//! [`Session`] puts the process-wide parts together for `btvmm run`.

pub mod input;
pub mod output;
pub mod signals;
pub mod terminal;

use std::io::IsTerminal;
use std::sync::Arc;

use btvmm_runtime::EventSignal;

use crate::devices::stop::StopHandle;

pub use input::{ConsoleKey, EscapeParser};
pub use output::OutputBuffer;

/// The terminal and the signals, held by `main` while a machine runs.
/// Dropping it restores the terminal.
pub struct Session {
    signals: signals::SignalWatch,
    /// `None` when stdin is not a terminal (a pipe or a file): then no
    /// terminal mode is changed.
    raw: Option<terminal::RawTerminal>,
}

impl Session {
    /// Watches the signals first, so that no moment exists when a signal
    /// could end the process with the terminal raw, then puts stdin in raw
    /// mode if it is a terminal.
    pub fn start() -> std::io::Result<Self> {
        let signals = signals::SignalWatch::start()?;
        let stdin = std::io::stdin();
        let raw = if stdin.is_terminal() {
            Some(terminal::RawTerminal::enter(&stdin).map_err(std::io::Error::from)?)
        } else {
            None
        };
        Ok(Self { signals, raw })
    }

    /// From now on a signal stops this machine rather than the process.
    pub fn attach(&self, stop: StopHandle, events: Arc<EventSignal>) {
        self.signals.attach(stop, events);
    }

    /// Whether stdin is a terminal in raw mode.
    pub fn is_raw(&self) -> bool {
        self.raw.is_some()
    }
}
