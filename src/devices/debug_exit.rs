//! QEMU's isa-debug-exit device, as `-device isa-debug-exit,iobase=0xf4,iosize=4`.
//!
//! A write of value `v` to any of its four ports stops the machine, and the
//! VMM exits with status `(v << 1) | 1`: a test kernel can report success or
//! failure but never status 0, which stays "the VMM itself ran fine". The
//! value is taken as written, at the width written (`outb` gives 0-255,
//! `outl` the whole 32 bits), as QEMU does; the process exit status the OS
//! keeps is then the low 8 bits. Reads return 0.

use super::stop::{StopHandle, StopReason};

pub const DEBUG_EXIT_PORT: u16 = 0xf4;
pub const DEBUG_EXIT_SIZE: u16 = 4;

pub struct DebugExit {
    stop: StopHandle,
}

impl DebugExit {
    pub fn new(stop: StopHandle) -> Self {
        Self { stop }
    }

    /// The exit status for a written value.
    pub fn status(value: u32) -> i32 {
        ((value << 1) | 1) as i32
    }
}

impl super::bus::PortDevice for DebugExit {
    fn read(&mut self, _base: u16, _offset: u16, _size: u8) -> u32 {
        0
    }

    fn write(&mut self, _base: u16, _offset: u16, _size: u8, value: u32) {
        self.stop.request(StopReason::DebugExit(Self::status(value)));
    }

    fn width(&self) -> u8 {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::{Bus, PortDevice};
    use std::sync::{Arc, Mutex};

    fn bus_with_exit() -> (Bus, StopHandle) {
        let stop = StopHandle::new();
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(DebugExit::new(stop.clone())));
        bus.register("debug-exit", DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, dev).unwrap();
        (bus, stop)
    }

    #[test]
    fn write_byte_stops_with_shifted_status() {
        let (mut bus, stop) = bus_with_exit();

        bus.write(0xf4, 1, 0x10);

        assert_eq!(stop.reason(), Some(StopReason::DebugExit(0x21)));
    }

    #[test]
    fn write_zero_exits_with_one() {
        let (mut bus, stop) = bus_with_exit();

        bus.write(0xf4, 1, 0);

        assert_eq!(stop.reason(), Some(StopReason::DebugExit(1)));
    }

    #[test]
    fn write_dword_keeps_whole_value() {
        let (mut bus, stop) = bus_with_exit();

        bus.write(0xf4, 4, 0x1234_5678);

        assert_eq!(stop.reason(), Some(StopReason::DebugExit(0x2468_acf1)));
    }

    #[test]
    fn write_byte_truncates_wider_register() {
        let (mut bus, stop) = bus_with_exit();

        bus.write(0xf4, 1, 0x1ff);

        assert_eq!(stop.reason(), Some(StopReason::DebugExit(0x1ff)));
    }

    #[test]
    fn write_at_other_port_in_range_also_exits() {
        let (mut bus, stop) = bus_with_exit();

        bus.write(0xf6, 2, 3);

        assert_eq!(stop.reason(), Some(StopReason::DebugExit(7)));
    }

    #[test]
    fn write_top_bit_wraps_without_panic() {
        let status = DebugExit::status(0xffff_ffff);

        assert_eq!(status, -1);
    }

    #[test]
    fn read_returns_zero_and_does_not_stop() {
        let stop = StopHandle::new();
        let mut dev = DebugExit::new(stop.clone());

        assert_eq!(dev.read(0xf4, 0, 4), 0);
        assert!(!stop.is_requested());
    }
}
