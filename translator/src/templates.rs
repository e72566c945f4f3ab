//! The fixed pieces of generated code that are not guest instructions: the
//! entry and exit trampolines between Rust and compiled code fragments, and
//! the exit stubs a CCF leaves through. All of them address the vCPU block
//! through the host GS base ([`BtBlock`]).

use dynasmrt::{dynasm, x64::X64Relocation, DynasmApi, DynasmLabelApi, VecAssembler};

use crate::abi::{BtBlock, ExitReason};

/// The host registers Rust expects preserved across a call (SysV ABI),
/// pushed by the entry trampoline in this order.
const CALLEE_SAVED: [u8; 6] = [3, 5, 12, 13, 14, 15]; // rbx rbp r12 r13 r14 r15

/// The entry and exit trampolines, assembled once into one piece of code.
pub struct Trampolines {
    pub code: Vec<u8>,
    /// `extern "sysv64" fn()`: enters the CCF at `gs:[target]` with the
    /// guest registers and arithmetic flags of the block loaded; returns
    /// when the CCF leaves through the exit.
    pub entry: usize,
    /// Where every CCF exit jumps (`gs:[exit_stub]` points here).
    pub exit: usize,
    /// Where the host fault handler sends a CCF that faulted (see
    /// `BtBlock::fault_rip`): an exit with reason Fault at that RIP.
    pub fault: usize,
    /// Where it sends a CCF that raised any other host signal (SIGSEGV,
    /// SIGBUS, SIGILL: a VMM bug, never a guest's doing): an exit with
    /// reason HostFault.
    pub host_fault: usize,
    /// Loads the guest's SSE state (`BtBlock::fpu_load`), and the bare
    /// `ret` that replaces it once loaded (`BtBlock::fpu_ready`).
    pub fpu_load: usize,
    pub fpu_ready: usize,
}

fn gpr_off(r: u8) -> i32 {
    BtBlock::off_gpr(r as usize) as i32
}

/// Assembles the trampolines.
///
/// Entry: saves the callee-saved registers, records host RSP, loads the
/// guest's arithmetic flags (with DF, AC and TF clear, as the Rust ABI and
/// translated code need) and every guest GPR but RSP, and jumps to the CCF.
/// Exit: the mirror image, storing the guest GPRs and the host RFLAGS.
pub fn trampolines() -> Trampolines {
    let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
    let entry = a.offset().0;
    for &r in &CALLEE_SAVED {
        dynasm!(a ; .arch x64 ; push Rq(r));
    }
    dynasm!(a
        ; .arch x64
        ; gs mov QWORD [BtBlock::OFF_HOST_RSP as i32], rsp
        ; gs stmxcsr DWORD [BtBlock::OFF_HOST_MXCSR as i32]
        ; gs push QWORD [BtBlock::OFF_HOST_FLAGS as i32]
        ; popfq
    );
    for r in (0u8..16).filter(|&r| r != 4) {
        dynasm!(a ; .arch x64 ; gs mov Rq(r), QWORD [gpr_off(r)]);
    }
    dynasm!(a ; .arch x64 ; gs jmp QWORD [BtBlock::OFF_TARGET as i32]);

    let exit = a.offset().0;
    dynasm!(a
        ; .arch x64
        ; ->exit:
        ; pushfq
        ; gs pop QWORD [BtBlock::OFF_HOST_FLAGS as i32]
    );
    for r in (0u8..16).filter(|&r| r != 4) {
        dynasm!(a ; .arch x64 ; gs mov QWORD [gpr_off(r)], Rq(r));
    }
    // The guest's SSE and AVX state back to its area if a CCF loaded it
    // (the runtime writes what `xsave64` left out as in its initial
    // configuration); Rust gets its MXCSR and a clean x87 unit (FCW 0x37f,
    // empty stack) back.
    dynasm!(a
        ; .arch x64
        ; gs mov rax, QWORD [BtBlock::OFF_FPU_ENTER as i32]
        ; gs cmp rax, QWORD [BtBlock::OFF_FPU_READY as i32]
        ; jne >unloaded
        ; gs mov rcx, QWORD [BtBlock::OFF_FPU_AREA as i32]
        ; gs mov eax, DWORD [BtBlock::OFF_FPU_XCR0 as i32]
        ; mov edx, 0
        ; xsave64 [rcx]
        ; gs mov DWORD [BtBlock::OFF_FPU_SAVED as i32], 1
    );
    if std::arch::is_x86_feature_detected!("avx") {
        // The guest's YMM upper halves, dirty in the host, would slow
        // Rust's SSE code on some hosts.
        dynasm!(a ; .arch x64 ; vzeroupper);
    }
    dynasm!(a
        ; .arch x64
        ; fninit
        ; gs ldmxcsr DWORD [BtBlock::OFF_HOST_MXCSR as i32]
        ; gs mov rax, QWORD [BtBlock::OFF_FPU_LOAD as i32]
        ; gs mov QWORD [BtBlock::OFF_FPU_ENTER as i32], rax
        ; unloaded:
        ; gs mov rsp, QWORD [BtBlock::OFF_HOST_RSP as i32]
    );
    for &r in CALLEE_SAVED.iter().rev() {
        dynasm!(a ; .arch x64 ; pop Rq(r));
    }
    dynasm!(a ; .arch x64 ; ret);

    // Entered with every register as at the faulting instruction, host RSP
    // at the CCF's base; the flags are untouched by the fault.
    let fault = a.offset().0;
    dynasm!(a
        ; .arch x64
        ; gs mov DWORD [BtBlock::OFF_EXIT_REASON as i32], ExitReason::Fault as u64 as i32
        ; gs push QWORD [BtBlock::OFF_FAULT_RIP as i32]
        ; gs pop QWORD [BtBlock::OFF_RIP as i32]
        ; jmp ->exit
    );
    let host_fault = a.offset().0;
    dynasm!(a
        ; .arch x64
        ; gs mov DWORD [BtBlock::OFF_EXIT_REASON as i32], ExitReason::HostFault as u64 as i32
        ; jmp ->exit
    );
    // Called by a CCF (host RSP below the entry's): every register and
    // flag is kept (RAX, RCX and RDX go through the block's `fpu_tmp`).
    let fpu_load = a.offset().0;
    let tmp = BtBlock::OFF_FPU_TMP as i32;
    dynasm!(a
        ; .arch x64
        ; gs mov QWORD [tmp], rax
        ; gs mov QWORD [tmp + 8], rcx
        ; gs mov QWORD [tmp + 16], rdx
        ; gs mov rcx, QWORD [BtBlock::OFF_FPU_AREA as i32]
        ; gs mov eax, DWORD [BtBlock::OFF_FPU_XCR0 as i32]
        ; mov edx, 0
        ; xrstor64 [rcx]
        ; gs mov rax, QWORD [BtBlock::OFF_FPU_READY as i32]
        ; gs mov QWORD [BtBlock::OFF_FPU_ENTER as i32], rax
        ; gs mov rax, QWORD [tmp]
        ; gs mov rcx, QWORD [tmp + 8]
        ; gs mov rdx, QWORD [tmp + 16]
    );
    let fpu_ready = a.offset().0;
    dynasm!(a ; .arch x64 ; ret);
    let code = a.finalize().unwrap_or_default();
    Trampolines { code, entry, exit, fault, host_fault, fpu_load, fpu_ready }
}

/// Bytes of the patchable jump that opens every exit stub.
pub const CHAIN_JUMP_BYTES: usize = 5;
/// That jump unchained: to the next instruction, into the exit.
pub const UNCHAINED_JUMP: [u8; CHAIN_JUMP_BYTES] = [0xe9, 0, 0, 0, 0];

/// The length of an [`exit_stub`].
pub const EXIT_STUB_LEN: usize = CHAIN_JUMP_BYTES + 4 * 12 + 8;
// Its displacements are the block's offsets, as positive disp32s.
const _: () = assert!(
    BtBlock::OFF_RIP + 4 < 1 << 31
        && BtBlock::OFF_EXIT_REASON < 1 << 31
        && BtBlock::OFF_EXIT_SITE < 1 << 31
        && BtBlock::OFF_EXIT_STUB < 1 << 31
);

/// An exit stub: leaves the CCF for the dispatcher with `reason`, at guest
/// `rip`, naming itself as `site` (see `BtBlock::exit_site`). It opens with a
/// 5-byte `jmp rel32` that falls through to the next instruction; chaining
/// patches it to jump straight to the CCF of `rip` (or, for a stub a
/// conditional branch lands on, retargets the branch: `ExitSite::link`).
///
/// Every TU has several, so they are encoded here by hand, without an
/// assembler's allocations (a test checks the bytes against dynasm's):
/// four `mov dword gs:[disp32], imm32` (the RIP's halves, the reason, the
/// site) and `jmp qword gs:[disp32]` to the exit.
pub fn exit_stub(rip: u64, reason: ExitReason, site: u32) -> [u8; EXIT_STUB_LEN] {
    const GS_MOV_DWORD: [u8; 4] = [0x65, 0xc7, 0x04, 0x25];
    const GS_JMP_QWORD: [u8; 4] = [0x65, 0xff, 0x24, 0x25];
    let stores = [
        (BtBlock::OFF_RIP, rip as u32),
        (BtBlock::OFF_RIP + 4, (rip >> 32) as u32),
        (BtBlock::OFF_EXIT_REASON, reason as u32),
        (BtBlock::OFF_EXIT_SITE, site),
    ];
    let mut s = [0u8; EXIT_STUB_LEN];
    s[..CHAIN_JUMP_BYTES].copy_from_slice(&UNCHAINED_JUMP);
    let mut at = CHAIN_JUMP_BYTES;
    for (off, imm) in stores {
        s[at..at + 4].copy_from_slice(&GS_MOV_DWORD);
        s[at + 4..at + 8].copy_from_slice(&(off as u32).to_le_bytes());
        s[at + 8..at + 12].copy_from_slice(&imm.to_le_bytes());
        at += 12;
    }
    s[at..at + 4].copy_from_slice(&GS_JMP_QWORD);
    s[at + 4..].copy_from_slice(&(BtBlock::OFF_EXIT_STUB as u32).to_le_bytes());
    s
}

/// The exit of an indirect branch, which has stored the RIP it leaves for
/// itself: never chained.
pub fn indirect_exit_stub(site: u32) -> Vec<u8> {
    let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
    dynasm!(a
        ; .arch x64
        ; gs mov DWORD [BtBlock::OFF_EXIT_REASON as i32], ExitReason::Indirect as u64 as i32
        ; gs mov DWORD [BtBlock::OFF_EXIT_SITE as i32], site as i32
        ; gs jmp QWORD [BtBlock::OFF_EXIT_STUB as i32]
    );
    a.finalize().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn disasm(code: &[u8]) -> Vec<String> {
        let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
        let mut f = IntelFormatter::new();
        let mut out = Vec::new();
        for i in &mut d {
            let mut s = String::new();
            f.format(&i, &mut s);
            out.push(s);
        }
        out
    }

    #[test]
    fn gs_operands_are_absolute_not_rip_relative() {
        let t = trampolines();
        let text = disasm(&t.code);
        assert!(text.iter().all(|l| !l.contains("rip") && !l.contains("(bad)")), "{text:#?}");
        assert!(text.contains(&"mov gs:[0C0h],rsp".to_string()), "{text:#?}");
        assert_eq!(BtBlock::OFF_HOST_RSP, 0xc0);
        assert_eq!(text.iter().filter(|l| l.starts_with("jmp qword ptr gs:")).count(), 1, "{text:#?}");
        assert!(text.contains(&"ret".to_string()), "{text:#?}");
        // The fault exit ends in a jump to the common exit, just before
        // the SSE load routine.
        let mut d = Decoder::with_ip(64, &t.code, 0, DecoderOptions::NONE);
        let before_load = d.iter().find(|i| i.next_ip() == t.fpu_load as u64).expect("an instruction ends at fpu_load");
        assert!(before_load.is_jmp_near() || before_load.is_jmp_short(), "{before_load}");
        // The exit saves a loaded SSE state and gives Rust its MXCSR back;
        // the load routine restores it and ends at the shared `ret`.
        // As iced writes hex: a leading 0 before a letter.
        let hex = format!("{:X}", BtBlock::OFF_HOST_MXCSR);
        let hex = if hex.starts_with(|c: char| c.is_ascii_alphabetic()) { format!("0{hex}") } else { hex };
        let ldmxcsr = format!("ldmxcsr gs:[{hex}h]");
        for needed in ["xsave64 [rcx]", "fninit", &ldmxcsr, "xrstor64 [rcx]"] {
            assert!(text.contains(&needed.to_string()), "{needed}: {text:#?}");
        }
        assert_eq!(text.last().unwrap(), "ret");
        assert_eq!(t.fpu_ready, t.code.len() - 1);
    }

    /// The hand-encoded stub is what dynasm assembles from its source.
    #[test]
    fn exit_stub_is_dynasms_encoding() {
        for (rip, reason, site) in [(0x1234u64, ExitReason::Next, 0u32), (0xffff_ffff_8100_1234, ExitReason::Interpret, 0xffff_ff07)] {
            let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
            a.extend(UNCHAINED_JUMP);
            dynasm!(a
                ; .arch x64
                ; gs mov DWORD [BtBlock::OFF_RIP as i32], rip as u32 as i32
                ; gs mov DWORD [BtBlock::OFF_RIP as i32 + 4], (rip >> 32) as u32 as i32
                ; gs mov DWORD [BtBlock::OFF_EXIT_REASON as i32], reason as u64 as i32
                ; gs mov DWORD [BtBlock::OFF_EXIT_SITE as i32], site as i32
                ; gs jmp QWORD [BtBlock::OFF_EXIT_STUB as i32]
            );
            assert_eq!(exit_stub(rip, reason, site).to_vec(), a.finalize().unwrap());
        }
    }

    #[test]
    fn exit_stub_stores_rip_and_reason() {
        let s = exit_stub(0xffff_ffff_8100_1234, ExitReason::Interpret, 0x703);
        let text = disasm(&s);
        assert_eq!(text[0], "jmp 5");
        assert!(text[1].ends_with("81001234h"), "{text:#?}");
        assert!(text[2].ends_with("0FFFFFFFFh"), "{text:#?}");
        assert!(text[3].ends_with(",1"), "{text:#?}");
        assert!(text[4].ends_with(",703h"), "{text:#?}");
        assert!(text[5].starts_with("jmp qword ptr gs:"), "{text:#?}");
    }
}
