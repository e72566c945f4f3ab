//! Why the machine stops, and the handle devices use to ask for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Why the vCPU loop should return.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest wrote `v` to the isa-debug-exit port: exit status `(v << 1) | 1`.
    DebugExit(i32),
    /// The guest reset the machine (i8042 pulse, port 0x92, ...).
    Reset,
    /// The user asked to quit (console escape, signal).
    Quit,
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

#[cfg(test)]
mod tests {
    use super::*;

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
