//! btvmm-runtime: vCPU state, guest memory and MMU, the interpreter, and the
//! semantics of system instructions shared by the interpreter and the
//! translator's callouts.

pub mod memory;
pub mod platform;
pub mod simd;

pub use memory::{GuestMemory, GuestPhys};
pub use platform::{EventSignal, NullPlatform, Platform};
