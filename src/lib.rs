//! btvmm: a binary-translation virtual machine monitor for x86 guests.
//!
//! This library is the machine around the vCPU: the devices of a minimal PC
//! (`devices`, wired together on a `board`), the kernel loaders (`boot`),
//! the command line (`cli`), the host terminal side of the guest console
//! (`console`), the `machine` that puts them together with the runtime's
//! vCPU, and the `vga_text` screen shown when a guest stops. `main.rs` is a
//! thin CLI over it; benchmarks and tests build machines through it too.

pub mod board;
pub mod boot;
pub mod cli;
pub mod console;
pub mod devices;
pub mod machine;
pub mod translate_cmd;
pub mod vga_text;
