//! The semantics of system instructions, shared by the interpreter and the
//! translator's callouts: one implementation of each (DESIGN.md).
//!
//! Each function here has the interpreter's [`Handler`] signature: it gets
//! the decoded instruction with `cpu.regs.rip` already at the next
//! instruction, and returns a guest [`Exception`] on failure.

pub mod flags;
pub mod flow;
pub mod fpu;
pub mod interrupt;
pub mod io;
pub mod privileged;
pub mod segment;

use iced_x86::{Instruction, Mnemonic as M};

use crate::exception::Exception;
use crate::interp::{Handler, Vcpu};

/// The handler for a system instruction, if `i` is one.
pub fn handler(i: &Instruction) -> Option<Handler> {
    Some(match i.mnemonic() {
        M::Cli => flags::cli,
        M::Sti => flags::sti,
        M::Pushf | M::Pushfd | M::Pushfq => flags::pushf,
        M::Popf | M::Popfd | M::Popfq => flags::popf,
        M::Hlt => flags::hlt,
        M::Int => flow::int_n,
        M::Int3 => flow::int3,
        M::Into => flow::into,
        M::Int1 => flow::int1,
        M::Iret | M::Iretd | M::Iretq => flow::iret,
        M::Mov if is_sreg_mov(i) => flow::mov_sreg,
        M::Pop if i.op0_register().is_segment_register() => flow::pop_sreg,
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss => flow::load_far_pointer,
        M::Jmp if is_far(i) => flow::far_jmp,
        M::Call if is_far(i) => flow::far_call,
        M::Retf => flow::far_ret,
        M::In | M::Out => io::in_out,
        M::Insb | M::Insw | M::Insd => io::ins,
        M::Outsb | M::Outsw | M::Outsd => io::outs,
        M::Cpuid => flags::cpuid,
        M::Rdtsc | M::Rdtscp => flags::rdtsc,
        M::Rdrand | M::Rdseed => flags::rdrand,
        _ => return privileged::handler(i),
    })
}

/// x87/SSE/AVX instructions and their state save/restore.
pub fn simd_handler(i: &Instruction) -> Option<Handler> {
    fpu::handler(i)
}

/// Instructions after which the decoded block must end although they fall
/// through: they may change the mode, paging, interrupt state or code bytes.
pub fn ends_block(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        M::Cli | M::Sti | M::Popf | M::Popfd | M::Popfq | M::Hlt | M::In | M::Out | M::Insb
            | M::Insw | M::Insd | M::Outsb | M::Outsw | M::Outsd | M::Lds | M::Les | M::Lfs
            | M::Lgs | M::Lss
    ) || (i.mnemonic() == M::Mov && is_sreg_mov(i))
        || (i.mnemonic() == M::Pop && i.op0_register().is_segment_register())
        || privileged::ends_block(i)
}

fn is_sreg_mov(i: &Instruction) -> bool {
    i.op0_register().is_segment_register() || i.op1_register().is_segment_register()
}

fn is_far(i: &Instruction) -> bool {
    use iced_x86::OpKind;
    matches!(i.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32)
        || (i.op0_kind() == OpKind::Memory && matches!(i.memory_size(), iced_x86::MemorySize::SegPtr16 | iced_x86::MemorySize::SegPtr32 | iced_x86::MemorySize::SegPtr64))
}

/// #GP(0) unless CPL is 0: the check of every privileged instruction.
#[inline]
pub fn require_cpl0(v: &Vcpu) -> Result<(), Exception> {
    if v.cpu.cpl != 0 { Err(Exception::gp0()) } else { Ok(()) }
}
