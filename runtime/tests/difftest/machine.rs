//! The contract between the harness and an executor: the machine state a test
//! sequence starts from and ends in, the outcome of running it, and the fixed
//! guest-linear layout (code page, data window) every executor must honour.

use std::fmt;

/// Guest linear address the sequence's first byte is placed at.
pub const CODE_ADDR: u64 = 0x6000_0000;
/// Largest sequence (in bytes) an executor must accept.
pub const CODE_MAX: usize = 0x3ff0;
/// Guest linear address of the data window (identity-mapped, read/write).
pub const WINDOW_ADDR: u64 = 0x7000_0000;
/// Size of the data window: a data half and a stack half.
pub const WINDOW_SIZE: usize = 0x2000;
/// Where the data base register (r15) points: the middle of the data half.
pub const DATA_BASE: u64 = WINDOW_ADDR + 0x800;
/// Initial rsp: the middle of the stack half, so pops and pushes both fit.
pub const STACK_TOP: u64 = WINDOW_ADDR + 0x1800;

/// Architectural RFLAGS bits the harness compares.
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    /// The six arithmetic flags.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Everything compared: the arithmetic flags and DF.
    pub const COMPARED: u64 = ARITH | DF;
    /// Bit 1 always reads as 1; IF is 1 in user mode.
    pub const FIXED: u64 = 0x202;
}

/// Register names in hardware encoding order (the index into `gpr`).
pub const GPR_NAMES: [&str; 16] = [
    "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
    "r13", "r14", "r15",
];
pub const RSP: usize = 4;
pub const R14: usize = 14;
pub const R15: usize = 15;

/// The user-visible integer state a sequence reads and writes (besides the window).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct MachineState {
    /// rax..r15 in hardware encoding order.
    pub gpr: [u64; 16],
    /// RFLAGS; only `rflags::COMPARED` bits are meaningful to the harness.
    pub rflags: u64,
}

impl fmt::Debug for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in GPR_NAMES.iter().zip(self.gpr).enumerate() {
            let sep = if i % 4 == 3 { "\n" } else { "  " };
            write!(f, "{name:>3}={value:016x}{sep}")?;
        }
        write!(f, "rflags={:08x} [{}]", self.rflags, flag_letters(self.rflags))
    }
}

/// `CF PF AF ZF SF DF OF` letters, upper case when set.
pub fn flag_letters(rflags: u64) -> String {
    use rflags::*;
    [(CF, "c"), (PF, "p"), (AF, "a"), (ZF, "z"), (SF, "s"), (DF, "d"), (OF, "o")]
        .iter()
        .map(|&(bit, l)| if rflags & bit != 0 { l.to_uppercase() } else { l.to_string() })
        .collect()
}

/// How a run ended. Guest events are values; the executor's own failures are
/// `ExecutorError`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// RIP reached `code_addr + code.len()`.
    Completed {
        state: MachineState,
        /// Instructions retired, if the executor counts them (the host does not).
        retired: Option<u64>,
    },
    /// An exception stopped the sequence.
    Fault {
        /// Exception vector: 0 #DE, 3 #BP, 6 #UD, 13 #GP, 14 #PF, 17 #AC...
        vector: u8,
        /// The RIP the exception frame holds, minus `code_addr` (for faults the
        /// faulting instruction, for traps such as int3 the next one).
        rip_offset: u64,
        /// Registers and flags as the exception frame would see them.
        state: MachineState,
    },
}

/// An executor failed for its own reasons (not a guest event).
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("{0}")]
    Os(String),
    #[error("sequence did not finish within {0} ms")]
    Timeout(u64),
    #[error("unsupported instruction: {0}")]
    Unsupported(String),
}

/// Something that can run a 64-bit user-mode instruction sequence: the host
/// CPU, the interpreter, later the translator.
///
/// The executor places `code` at guest linear `code_addr` and the window at
/// `WINDOW_ADDR` (identity map, 64-bit long mode, CPL 3 or 0), loads `init`,
/// runs until RIP == `code_addr + code.len()` or an exception, and leaves the
/// window's final bytes in `window`.
pub trait Executor {
    fn name(&self) -> &str;
    fn run(
        &mut self,
        code: &[u8],
        code_addr: u64,
        init: &MachineState,
        window: &mut [u8],
    ) -> Result<Outcome, ExecutorError>;
}
