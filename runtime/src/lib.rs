//! btvmm-runtime: vCPU state, guest memory and MMU, the interpreter, and the
//! semantics of system instructions shared by the interpreter and the
//! translator's callouts.

pub mod bt;
pub mod clock;
pub mod code_mem;
pub mod cpu;
pub mod exception;
pub mod interp;
pub mod memory;
pub mod mmu;
pub mod platform;
pub mod simd;
pub mod stats;
pub mod system;

pub use clock::GuestClock;
pub use exception::Exception;
pub use memory::{GuestMemory, GuestPhys};
pub use platform::{EventSignal, NullPlatform, Platform};
pub use interp::{Vcpu, VmExit};
