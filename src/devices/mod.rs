//! The PC devices of the minimal machine DESIGN.md describes: COM1, the PIC
//! pair, the PIT with port 0x61, the CMOS/RTC, an i8042 good for reset,
//! port 0x92, the POST port and QEMU's debug-exit port. Each chip is a model
//! behind [`bus::PortDevice`]; `crate::board` wires them together.

pub mod bus;
pub mod cmos;
pub mod debug_exit;
pub mod i8042;
pub mod irq;
pub mod pic;
pub mod pit;
pub mod port80;
pub mod serial;
pub mod stop;
