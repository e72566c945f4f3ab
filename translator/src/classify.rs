//! The classification table: what the translator does with each guest
//! instruction form (DESIGN.md, "The translator").
//!
//! Every iced-x86 `Code` gets a [`Class`] and the rule that gave it
//! ([`Reason`]), so a test can check that nothing is classified by accident:
//!
//! - **Data** (IDENT, or MEM when it has a memory operand): user-level
//!   integer and x87/SSE/AVX instructions of the features guests see in
//!   CPUID, run as themselves with memory operands rewritten through the
//!   soft TLB.
//! - **Control**: near jumps, calls and returns (chained or looked up).
//! - **Inline**: reads or simple writes of virtual state (IF, DF, the flags
//!   image, CR0's low word, descriptor-table registers, selectors).
//! - **Callout**: the shared Rust semantics in `btvmm_runtime::system`, and
//!   instructions a 64-bit host cannot execute for a 32-bit guest.
//! - **Fault**: instructions whose architectural effect is #UD (ud0/1/2).
//! - **Undefined**: instructions of features hidden from the guest's CPUID
//!   or not emulated: #UD, counted in `--stats`.

use iced_x86::{Code, CpuidFeature as F, FlowControl, Mnemonic as M};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Data,
    Control,
    Inline,
    Callout,
    Fault,
    Undefined,
}

/// The rule that classified an instruction form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Not an instruction (iced's INVALID, or the db/dw/dd/dq pseudo-forms).
    NotAnInstruction,
    /// Reads or writes the virtual interrupt flag, direction flag or flags image.
    VirtualFlags,
    /// Reads virtual system registers (CR0 low word, GDTR/IDTR/LDTR/TR, selectors).
    VirtualRegisterRead,
    /// A system instruction with shared semantics in the runtime.
    SystemInstruction,
    /// Loads a segment register, or transfers control far.
    SegmentOrFarTransfer,
    /// Valid only outside 64-bit mode: the host cannot execute it.
    LegacyOnly,
    /// Its effect is #UD.
    UndefinedOpcode,
    /// A near branch, call, return or loop.
    NearControl,
    /// Every CPUID feature it needs is one guests see, and it is user-level.
    GuestFeature,
    /// It needs a CPUID feature hidden from guests or not emulated.
    HiddenFeature,
}

/// Whether `insn` lies in the hint-NOP space, 0F 18-0F 1F (with any
/// prefix and ModRM), or is an AMD prefetch (0F 0D with a memory operand):
/// the prefetch hints, nop, endbr, and what features hidden from guests
/// named there (MPX, CET's rdssp, cldemote), which CPUs without them run
/// as NOPs touching no memory, as the AMD host does. Both engines treat
/// them so. (0F 0D with a register operand is #UD.)
pub fn is_hint_nop(insn: &iced_x86::Instruction) -> bool {
    let op = insn.op_code();
    // iced counts a fixed ModRM byte into the opcode (endbr64 is 0x1efa).
    let byte = if op.op_code() > 0xff { op.op_code() >> 8 } else { op.op_code() };
    op.table() == iced_x86::OpCodeTableKind::T0F
        && ((0x18..=0x1f).contains(&byte) || byte == 0x0d && insn.op0_kind() == iced_x86::OpKind::Memory)
}

/// Whether `a` is a canonical 48-bit address (bits 63-47 all equal), as
/// both engines check 64-bit addresses and branch targets.
#[inline(always)]
pub fn is_canonical(a: u64) -> bool {
    ((a as i64) << 16 >> 16) as u64 == a
}

/// The class of an instruction form, and why: a lookup in the table of
/// every form, built by the rules below on first use (they match on the
/// forms' names, too slow to run for every instruction translated).
pub fn classify(code: Code) -> (Class, Reason) {
    static TABLE: std::sync::OnceLock<Vec<(Class, Reason)>> = std::sync::OnceLock::new();
    // `Code::values()` runs through the forms in the order of their numbers.
    let table = TABLE.get_or_init(|| Code::values().map(by_rules).collect());
    table[code as usize]
}

/// The rules of the table.
fn by_rules(code: Code) -> (Class, Reason) {
    let m = code.mnemonic();
    if code == Code::INVALID || matches!(m, M::Db | M::Dw | M::Dd | M::Dq) {
        return (Class::Undefined, Reason::NotAnInstruction);
    }
    if matches!(m, M::Ud0 | M::Ud1 | M::Ud2) {
        return (Class::Fault, Reason::UndefinedOpcode);
    }
    if let Some(class) = sensitive(code, m) {
        return class;
    }
    if !code.op_code().mode64() {
        return (Class::Callout, Reason::LegacyOnly);
    }
    if code.cpuid_features().iter().any(|f| !guest_feature(*f)) || code.is_privileged() {
        return (Class::Undefined, Reason::HiddenFeature);
    }
    match code.flow_control() {
        FlowControl::Next | FlowControl::XbeginXabortXend => (Class::Data, Reason::GuestFeature),
        FlowControl::UnconditionalBranch
        | FlowControl::IndirectBranch
        | FlowControl::ConditionalBranch
        | FlowControl::Return
        | FlowControl::Call
        | FlowControl::IndirectCall => (Class::Control, Reason::NearControl),
        FlowControl::Interrupt | FlowControl::Exception => (Class::Callout, Reason::SystemInstruction),
    }
}

/// Instructions that touch state the guest must not see or change directly.
fn sensitive(code: Code, m: M) -> Option<(Class, Reason)> {
    let name = format!("{code:?}");
    Some(match m {
        M::Cli | M::Sti | M::Cld | M::Std | M::Pushf | M::Pushfd | M::Pushfq => (Class::Inline, Reason::VirtualFlags),
        M::Popf | M::Popfd | M::Popfq | M::Iret | M::Iretd | M::Iretq => (Class::Callout, Reason::VirtualFlags),
        M::Smsw | M::Sgdt | M::Sidt | M::Sldt | M::Str => (Class::Inline, Reason::VirtualRegisterRead),
        M::Lgdt | M::Lidt | M::Lldt | M::Ltr | M::Lmsw | M::Clts | M::Invlpg | M::Invd | M::Wbinvd
        | M::Wbnoinvd | M::Hlt | M::Cpuid | M::Rdmsr | M::Wrmsr | M::Rdtsc | M::Rdtscp | M::Rdpmc
        | M::Rdpid | M::Syscall | M::Sysret | M::Sysretq | M::Sysenter | M::Sysexit | M::Sysexitq
        | M::Int | M::Int1 | M::Int3 | M::Into | M::Swapgs | M::In | M::Out | M::Insb | M::Insw
        | M::Insd | M::Outsb | M::Outsw | M::Outsd | M::Lar | M::Lsl | M::Verr | M::Verw
        | M::Xsetbv | M::Xgetbv | M::Rdfsbase | M::Rdgsbase | M::Wrfsbase | M::Wrgsbase
        // XSAVE's component bitmap is XCR0, which is the guest's, not the host's.
        | M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 | M::Xrstor | M::Xrstor64 => {
            (Class::Callout, Reason::SystemInstruction)
        }
        M::Lds | M::Les | M::Lfs | M::Lgs | M::Lss | M::Retf => (Class::Callout, Reason::SegmentOrFarTransfer),
        M::Jmp | M::Call if name.contains("_m16") || name.contains("ptr16") => {
            (Class::Callout, Reason::SegmentOrFarTransfer)
        }
        M::Mov if name.contains("_Sreg_") || name.starts_with("Mov_Sreg") => (Class::Callout, Reason::SegmentOrFarTransfer),
        M::Mov if name.ends_with("_Sreg") => (Class::Inline, Reason::VirtualRegisterRead),
        M::Mov if name.contains("_cr") || name.contains("_dr") => (Class::Callout, Reason::SystemInstruction),
        M::Mov if name.contains("_tr") => (Class::Undefined, Reason::HiddenFeature),
        M::Push | M::Pop if ["_ES", "_CS", "_SS", "_DS", "_FS", "_GS"].iter().any(|s| name.ends_with(s)) => {
            (Class::Callout, Reason::SegmentOrFarTransfer)
        }
        _ => return None,
    })
}

/// CPUID features guests see (btvmm_runtime::cpu::cpuid keeps them from the
/// host), or that every x86-64 CPU has.
fn guest_feature(f: F) -> bool {
    matches!(
        f,
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64 | F::CMOV
            | F::CX8 | F::CMPXCHG16B | F::MMX | F::SSE | F::SSE2 | F::SSE3 | F::SSSE3 | F::SSE4_1
            | F::SSE4_2 | F::SSE4A | F::POPCNT | F::LZCNT | F::AVX | F::AVX2 | F::FMA | F::F16C
            | F::BMI1 | F::BMI2 | F::MOVBE | F::ADX | F::AES | F::PCLMULQDQ | F::VPCLMULQDQ | F::VAES
            | F::SHA | F::RDRAND | F::RDSEED | F::FPU | F::FPU287 | F::FPU387 | F::CLFSH | F::CLFLUSHOPT
            | F::FXSR | F::XSAVE | F::XSAVEOPT | F::PREFETCHW | F::MULTIBYTENOP | F::PAUSE
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn classify_every_code_by_an_explicit_rule() {
        let mut by_class: BTreeMap<String, usize> = BTreeMap::new();
        for code in Code::values() {
            let (class, reason) = classify(code);
            *by_class.entry(format!("{class:?}")).or_default() += 1;
            // A privileged instruction never runs as itself.
            if code.is_privileged() {
                assert!(!matches!(class, Class::Data | Class::Control), "{code:?} is privileged but {class:?}");
            }
            // Nothing invalid in 64-bit mode is emitted as itself.
            if !code.op_code().mode64() && reason != Reason::NotAnInstruction {
                assert!(!matches!(class, Class::Data | Class::Control), "{code:?} cannot run on the host");
            }
        }
        println!("{by_class:?}");
        assert!(by_class["Data"] > 1000);
    }

    #[test]
    fn classify_table_examples() {
        assert_eq!(classify(Code::Cli), (Class::Inline, Reason::VirtualFlags));
        assert_eq!(classify(Code::Popfq).0, Class::Callout);
        assert_eq!(classify(Code::Sgdt_m1664).0, Class::Inline);
        assert_eq!(classify(Code::Mov_cr_r64).0, Class::Callout);
        assert_eq!(classify(Code::Mov_Sreg_r64m16).0, Class::Callout);
        assert_eq!(classify(Code::Mov_r64m16_Sreg).0, Class::Inline);
        assert_eq!(classify(Code::Jmp_m1664).0, Class::Callout);
        assert_eq!(classify(Code::Jmp_rm64).0, Class::Control);
        assert_eq!(classify(Code::Add_rm64_r64), (Class::Data, Reason::GuestFeature));
        assert_eq!(classify(Code::VEX_Vaddps_ymm_ymm_ymmm256).0, Class::Data);
        assert_eq!(classify(Code::EVEX_Vaddps_zmm_k1z_zmm_zmmm512b32_er).0, Class::Undefined);
        assert_eq!(classify(Code::Vmcall).0, Class::Undefined);
        assert_eq!(classify(Code::Aaa), (Class::Callout, Reason::LegacyOnly));
        assert_eq!(classify(Code::Ud2), (Class::Fault, Reason::UndefinedOpcode));
        assert_eq!(classify(Code::Pushq_FS).0, Class::Callout);
        assert_eq!(classify(Code::Xbegin_rel32).0, Class::Undefined);
        assert_eq!(classify(Code::Xsave64_mem).0, Class::Callout);
        assert_eq!(classify(Code::Fxsave64_m512byte).0, Class::Data);
        assert_eq!(classify(Code::Movsb_m8_m8).0, Class::Data);
    }
}
