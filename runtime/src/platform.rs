//! The one interface between a vCPU and the machine around it.
//!
//! The runtime knows nothing of particular devices: port I/O, MMIO and the
//! interrupt line reach the machine through [`Platform`]. Asynchronous events
//! (timer deadlines, console input) set the shared [`EventSignal`], which the
//! vCPU polls at block boundaries and waits on while halted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// `Any` lets the machine reach its concrete board behind the vCPU's `Box<dyn Platform>`.
pub trait Platform: std::any::Any {
    /// Port input of `size` bytes (1, 2 or 4). Unclaimed ports read all-ones.
    fn io_in(&mut self, port: u16, size: u8) -> u32;
    /// Port output of `size` bytes (1, 2 or 4). Unclaimed ports drop the write.
    fn io_out(&mut self, port: u16, size: u8, value: u32);
    /// MMIO read at a guest physical address outside RAM.
    fn mmio_read(&mut self, _addr: u64, size: u8) -> u64 {
        if size >= 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 }
    }
    /// MMIO write at a guest physical address outside RAM.
    fn mmio_write(&mut self, _addr: u64, _size: u8, _value: u64) {}
    /// Whether the interrupt controller asserts INTR to the CPU.
    fn intr_pending(&mut self) -> bool;
    /// The INTA cycle: the vector of the highest-priority pending interrupt.
    fn intr_ack(&mut self) -> Option<u8>;
    /// Brings time-driven devices up to date; called when the event signal fires.
    fn service(&mut self);
    /// Whether the machine wants the vCPU loop to return (exit port, reset, quit).
    fn stop_requested(&self) -> bool;
    /// Whether the machine wants the vCPU loop to return for a moment (to
    /// print live counters) and then be run again; taking the request clears
    /// it. Polled only after [`Platform::service`], so whoever asks for a
    /// pause must also raise the [`EventSignal`]: the hot loop pays nothing.
    fn pause_requested(&mut self) -> bool {
        false
    }
    /// When time-driven devices next need [`Platform::service`]: the vCPU
    /// loop polls the clock against it between blocks and sleeps until it
    /// while halted.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }
    /// Whether a device write since the last call may have moved
    /// [`Platform::next_deadline`] (a timer reprogrammed, console output
    /// waiting to be flushed); the vCPU then asks for it again.
    fn deadline_moved(&mut self) -> bool {
        true
    }
}

/// A flag raised by device threads (timers, console input) for the vCPU thread.
#[derive(Default)]
pub struct EventSignal {
    raised: AtomicBool,
    lock: Mutex<bool>,
    cond: Condvar,
}

impl EventSignal {
    pub fn new() -> Self {
        Self::default()
    }

    /// Raises the signal and wakes a vCPU sleeping in `hlt`.
    pub fn raise(&self) {
        self.raised.store(true, Ordering::Release);
        let mut woken = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        *woken = true;
        self.cond.notify_all();
    }

    /// Cheap check at block boundaries: whether the signal was raised since the last take.
    #[inline]
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Relaxed)
    }

    /// Clears the signal, returning whether it was raised.
    #[inline]
    pub fn take(&self) -> bool {
        self.raised.swap(false, Ordering::Acquire)
    }

    /// Blocks until the signal is raised or `timeout` passes; uses no CPU.
    pub fn wait(&self, timeout: Duration) {
        let mut woken = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !*woken && !self.raised.load(Ordering::Acquire) {
            woken = self
                .cond
                .wait_timeout(woken, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *woken = false;
    }
}

/// A platform with no devices: every port floats, no interrupts. For tests.
#[derive(Default)]
pub struct NullPlatform;

impl Platform for NullPlatform {
    fn io_in(&mut self, _port: u16, size: u8) -> u32 {
        if size >= 4 { u32::MAX } else { (1u32 << (size * 8)) - 1 }
    }
    fn io_out(&mut self, _port: u16, _size: u8, _value: u32) {}
    fn intr_pending(&mut self) -> bool {
        false
    }
    fn intr_ack(&mut self) -> Option<u8> {
        None
    }
    fn service(&mut self) {}
    fn stop_requested(&self) -> bool {
        false
    }
}
