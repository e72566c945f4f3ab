//! SIGTERM, SIGHUP and SIGINT sent from outside.
//!
//! The handlers are `signal-hook`'s: the handler proper only writes to a
//! self-pipe (async-signal-safe, errno preserved), and a thread of ours
//! reads it, so everything done about a signal runs in ordinary thread
//! context. With a machine attached, the first signal asks it to stop
//! (`StopReason::Signal`, exit status 128 + signal number) and wakes the
//! vCPU: the run ends as a Ctrl-A x would, console flushed, the terminal
//! restored by the guard in `main`. Before a machine is attached (the
//! kernel still loading), or at a second signal (a machine that does not
//! stop), the thread restores the terminal and ends the process at once
//! with the same status.
//!
//! In raw mode the terminal sends no signals (Ctrl-C is a byte for the
//! guest), so these come from `kill`, a closing terminal, or a supervisor.

use std::sync::{Arc, Mutex};

use btvmm_runtime::EventSignal;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::terminal;
use crate::devices::stop::{StopHandle, StopReason};

/// The signals that end a run.
pub const STOP_SIGNALS: [i32; 3] = [SIGTERM, SIGHUP, SIGINT];

/// The machine a signal stops.
struct Target {
    stop: StopHandle,
    events: Arc<EventSignal>,
}

/// The signal thread and the machine it stops.
pub struct SignalWatch {
    target: Arc<Mutex<Option<Target>>>,
}

impl SignalWatch {
    /// Installs the handlers and starts the thread that acts on them.
    pub fn start() -> std::io::Result<Self> {
        let mut signals = Signals::new(STOP_SIGNALS)?;
        let target: Arc<Mutex<Option<Target>>> = Arc::default();
        let seen = target.clone();
        std::thread::Builder::new().name("btvmm-signals".into()).spawn(move || {
            let mut received = 0u32;
            for signo in signals.forever() {
                received += 1;
                on_signal(signo, received, &seen);
            }
        })?;
        Ok(Self { target })
    }

    /// From now on the first signal stops this machine.
    pub fn attach(&self, stop: StopHandle, events: Arc<EventSignal>) {
        *lock(&self.target) = Some(Target { stop, events });
    }
}

fn on_signal(signo: i32, received: u32, target: &Mutex<Option<Target>>) {
    tracing::debug!(target: "device", signo, received, "console: signal");
    match &*lock(target) {
        Some(t) if received == 1 => {
            t.stop.request(StopReason::Signal(signo));
            t.events.raise();
        }
        _ => {
            terminal::restore();
            std::process::exit(exit_status(signo));
        }
    }
}

/// A shell's status for a command ended by `signo`.
pub fn exit_status(signo: i32) -> i32 {
    128 + signo
}

fn lock(m: &Mutex<Option<Target>>) -> std::sync::MutexGuard<'_, Option<Target>> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_signal_with_machine_requests_stop_and_wakes_vcpu() {
        let stop = StopHandle::new();
        let events = Arc::new(EventSignal::new());
        let target = Mutex::new(Some(Target { stop: stop.clone(), events: events.clone() }));

        on_signal(SIGTERM, 1, &target);

        assert_eq!(stop.reason(), Some(StopReason::Signal(SIGTERM)));
        assert!(events.is_raised());
    }

    #[test]
    fn exit_status_is_128_plus_signal() {
        assert_eq!(exit_status(SIGTERM), 143);
        assert_eq!(exit_status(SIGHUP), 129);
    }
}
