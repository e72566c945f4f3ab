//! Why the machine stops, and the handles devices and the console use to
//! ask for a stop or for a pause.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Why the vCPU loop should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `v` to the isa-debug-exit port: exit status `(v << 1) | 1`.
    DebugExit(i32),
    /// The guest reset the machine (i8042 pulse, port 0x92, ...).
    Reset,
    /// The user asked to quit (the console's Ctrl-A x): exit status 0.
    Quit,
    /// The host sent the process this signal (SIGTERM, SIGHUP, SIGINT):
    /// exit status 128 + signal number, as a shell reports a killed command.
    Signal(i32),
}

/// A shared, first-wins stop request.
#[derive(Clone, Debug, Default)]
pub struct StopHandle {
    requested: Arc<AtomicBool>,
    reason: Arc<Mutex<Option<StopReason>>>,
}

impl StopHandle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `reason` unless a stop was already requested.
    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            tracing::debug!(target: "device", ?reason, "stop requested");
        }
        self.requested.store(true, Ordering::Release);
    }

    #[inline]
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    pub fn reason(&self) -> Option<StopReason> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A shared request for the vCPU loop to return for a moment (the console's
/// Ctrl-A s prints live counters) and then go on. Whoever requests it also
/// raises the machine's `EventSignal`: the vCPU polls the request only then.
#[derive(Clone, Debug, Default)]
pub struct PauseHandle(Arc<AtomicBool>);

impl PauseHandle {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether a pause was requested since the last take; clears the request.
    pub fn take(&self) -> bool {
        self.0.swap(false, Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_take_clears_request() {
        let pause = PauseHandle::new();

        pause.clone().request();

        assert!(pause.take());
        assert!(!pause.take());
    }

    #[test]
    fn request_first_reason_wins() {
        let stop = StopHandle::new();

        stop.request(StopReason::DebugExit(3));
        stop.clone().request(StopReason::Reset);

        assert!(stop.is_requested());
        assert_eq!(stop.reason(), Some(StopReason::DebugExit(3)));
    }

    #[test]
    fn new_handle_is_not_requested() {
        let stop = StopHandle::new();

        assert!(!stop.is_requested());
        assert_eq!(stop.reason(), None);
    }
}
