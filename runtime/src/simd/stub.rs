//! Generating the host stub that runs one guest SIMD instruction.
//!
//! A stub is an `extern "sysv64" fn(*mut StubFrame)`:
//!
//! ```text
//!   push rbx, rbp, r12-r15; sub rsp, 8        callee-saved GPRs, 16-byte alignment
//!   stmxcsr [rsp]; fnstcw [rsp+4]            host MXCSR and x87 CW (callee-saved)
//!   mov CTX, rdi
//!   xrstor64 [frame.area] (edx:eax = rfbm)   guest x87/SSE/AVX state
//!   mov MEM, [frame.mem]                     staging buffer (if a memory operand)
//!   mov r, [frame.gpr + 8*n] ...             guest GPRs the instruction uses
//!   push [frame.rflags]; popfq               guest CF PF AF ZF SF OF
//!   <guest instruction, memory operand = [MEM], RSP operand renamed>
//!   pushfq; pop [frame.rflags]
//!   mov [frame.gpr + 8*n], r ...
//!   xsave64 [frame.area]
//!   fninit; (vzeroupper)                     drop any pending x87 exception, MMX tags
//!   ldmxcsr [rsp]; fldcw [rsp+4]; ...; ret
//! ```
//!
//! CTX and MEM are host registers the guest instruction does not use (implicit
//! operands included, per iced-x86's instruction info), so any guest operand
//! registers, including RDI, RAX, RCX and RDX, can be loaded unchanged.

use iced_x86::{
    Code, Encoder, Instruction, InstructionInfoFactory, MemoryOperand, OpKind, Register,
};

use super::classify::{gpr64, has_memory_operand, implicit_rdi_operand};

/// The block a stub reads and writes; offsets are baked into stub code.
#[repr(C)]
pub(super) struct StubFrame {
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub area: *mut u8,
    pub mem: *mut u8,
    pub rfbm: u64,
}

const FRAME_RFLAGS: i64 = 128;
const FRAME_AREA: i64 = 136;
const FRAME_MEM: i64 = 144;
const FRAME_RFBM: i64 = 152;

pub(super) type StubFn = unsafe extern "sysv64" fn(*mut StubFrame);

const GPR64: [Register; 16] = [
    Register::RAX, Register::RCX, Register::RDX, Register::RBX,
    Register::RSP, Register::RBP, Register::RSI, Register::RDI,
    Register::R8, Register::R9, Register::R10, Register::R11,
    Register::R12, Register::R13, Register::R14, Register::R15,
];
const GPR32: [Register; 16] = [
    Register::EAX, Register::ECX, Register::EDX, Register::EBX,
    Register::ESP, Register::EBP, Register::ESI, Register::EDI,
    Register::R8D, Register::R9D, Register::R10D, Register::R11D,
    Register::R12D, Register::R13D, Register::R14D, Register::R15D,
];
const GPR16: [Register; 16] = [
    Register::AX, Register::CX, Register::DX, Register::BX,
    Register::SP, Register::BP, Register::SI, Register::DI,
    Register::R8W, Register::R9W, Register::R10W, Register::R11W,
    Register::R12W, Register::R13W, Register::R14W, Register::R15W,
];
const CALLEE_SAVED: [Register; 6] =
    [Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14, Register::R15];
/// Scratch candidates for CTX/MEM/RSP-substitute; never RAX/RCX/RDX, which the
/// xrstor/xsave sequences use while CTX must stay live.
const SCRATCH_ORDER: [Register; 12] = [
    Register::R11, Register::R10, Register::R9, Register::R8, Register::RSI, Register::RDI,
    Register::RBX, Register::RBP, Register::R12, Register::R13, Register::R14, Register::R15,
];

/// Why an instruction cannot get a stub (reported to the guest as #UD).
#[derive(Debug)]
pub(super) struct NoStub;

/// The rewritten instruction and how the stub moves guest registers around it.
pub(super) struct StubPlan {
    insn: Instruction,
    /// (host register, index into `StubFrame::gpr`).
    gprs: Vec<(Register, usize)>,
    ctx: Register,
    mem: Option<Register>,
}

/// A key that identifies the stub `insn` needs: the instruction with its memory
/// operand's addressing and its IP erased.
pub(super) fn stub_key(insn: &Instruction) -> Instruction {
    let mut key = *insn;
    if has_memory_operand(insn) {
        erase_addressing(&mut key);
    }
    key.set_ip(0);
    key.set_len(0);
    key
}

fn erase_addressing(insn: &mut Instruction) {
    insn.set_memory_base(Register::None);
    insn.set_memory_index(Register::None);
    insn.set_memory_index_scale(1);
    insn.set_memory_displacement64(0);
    insn.set_memory_displ_size(0);
    insn.set_segment_prefix(Register::None);
}

fn sized_like(original: Register, full: Register) -> Register {
    let n = GPR64.iter().position(|&r| r == full).unwrap_or(0);
    match original.size() {
        4 => GPR32[n],
        2 => GPR16[n],
        _ => GPR64[n],
    }
}

/// Chooses host registers and rewrites the guest instruction for 64-bit execution.
pub(super) fn plan(insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<StubPlan, NoStub> {
    let mut rewritten = stub_key(insn);
    let implicit_rdi = implicit_rdi_operand(insn.code()).is_some();
    let mut used: Vec<Register> = info
        .info(&rewritten)
        .used_registers()
        .iter()
        .filter_map(|u| gpr64(u.register()))
        .collect();
    used.sort_unstable();
    used.dedup();
    if implicit_rdi {
        used.retain(|&r| r != Register::RDI);
    }
    let mut free = SCRATCH_ORDER
        .into_iter()
        .filter(|r| !(used.contains(r) || implicit_rdi && *r == Register::RDI))
        .collect::<Vec<_>>()
        .into_iter();
    let ctx = free.next().ok_or(NoStub)?;
    let mem = if implicit_rdi {
        // A 16/32-bit guest's DI/EDI form would truncate the staging pointer.
        rewritten.set_op0_kind(OpKind::MemorySegRDI);
        Some(Register::RDI)
    } else if has_memory_operand(insn) {
        let base = free.next().ok_or(NoStub)?;
        rewritten.set_memory_base(base);
        Some(base)
    } else {
        None
    };
    let mut gprs = Vec::with_capacity(used.len());
    for reg in used {
        let index = GPR64.iter().position(|&r| r == reg).ok_or(NoStub)?;
        let host = if reg == Register::RSP { rename_rsp(&mut rewritten, free.next().ok_or(NoStub)?)? } else { reg };
        gprs.push((host, index));
    }
    Ok(StubPlan { insn: rewritten, gprs, ctx, mem })
}

/// Replaces explicit RSP-family operands by `host` (the real RSP is the VMM's stack).
fn rename_rsp(insn: &mut Instruction, host: Register) -> Result<Register, NoStub> {
    let mut renamed = false;
    for i in 0..insn.op_count() {
        if insn.op_kind(i) == OpKind::Register && insn.op_register(i).full_register() == Register::RSP {
            let reg = insn.op_register(i);
            insn.set_op_register(i, sized_like(reg, host));
            renamed = true;
        }
    }
    // An implicit RSP use cannot be renamed; no SIMD instruction has one.
    if renamed { Ok(host) } else { Err(NoStub) }
}

fn mem64(base: Register, displ: i64) -> MemoryOperand {
    MemoryOperand::with_base_displ(base, displ)
}

/// Encodes the stub for `plan`; `vzeroupper` is added when the host has AVX.
pub(super) fn emit(plan: &StubPlan, host_avx: bool) -> Result<Vec<u8>, NoStub> {
    let mut seq: Vec<Instruction> = Vec::with_capacity(48);
    let mut add = |r: Result<Instruction, iced_x86::IcedError>| r.map(|i| seq.push(i)).map_err(|_| NoStub);
    let ctx = plan.ctx;
    for reg in CALLEE_SAVED {
        add(Instruction::with1(Code::Push_r64, reg))?;
    }
    add(Instruction::with2(Code::Sub_rm64_imm8, Register::RSP, 8))?;
    add(Instruction::with1(Code::Stmxcsr_m32, mem64(Register::RSP, 0)))?;
    add(Instruction::with1(Code::Fnstcw_m2byte, mem64(Register::RSP, 4)))?;
    if ctx != Register::RDI {
        add(Instruction::with2(Code::Mov_r64_rm64, ctx, Register::RDI))?;
    }
    add_xstate(&mut add, ctx, Code::Xrstor64_mem)?;
    if let Some(mem) = plan.mem {
        add(Instruction::with2(Code::Mov_r64_rm64, mem, mem64(ctx, FRAME_MEM)))?;
    }
    for &(host, index) in &plan.gprs {
        add(Instruction::with2(Code::Mov_r64_rm64, host, mem64(ctx, 8 * index as i64)))?;
    }
    add(Instruction::with1(Code::Push_rm64, mem64(ctx, FRAME_RFLAGS)))?;
    add(Ok(Instruction::with(Code::Popfq)))?;
    add(Ok(plan.insn))?;
    add(Ok(Instruction::with(Code::Pushfq)))?;
    add(Instruction::with1(Code::Pop_rm64, mem64(ctx, FRAME_RFLAGS)))?;
    for &(host, index) in &plan.gprs {
        add(Instruction::with2(Code::Mov_rm64_r64, mem64(ctx, 8 * index as i64), host))?;
    }
    add_xstate(&mut add, ctx, Code::Xsave64_mem)?;
    add(Ok(Instruction::with(Code::Fninit)))?;
    if host_avx {
        add(Ok(Instruction::with(Code::VEX_Vzeroupper)))?;
    }
    add(Instruction::with1(Code::Ldmxcsr_m32, mem64(Register::RSP, 0)))?;
    add(Instruction::with1(Code::Fldcw_m2byte, mem64(Register::RSP, 4)))?;
    add(Instruction::with2(Code::Add_rm64_imm8, Register::RSP, 8))?;
    for reg in CALLEE_SAVED.iter().rev() {
        add(Instruction::with1(Code::Pop_r64, *reg))?;
    }
    add(Ok(Instruction::with(Code::Retnq)))?;
    encode(&seq)
}

/// `mov rcx, [ctx+area]; mov eax, [ctx+rfbm]; xor edx, edx; <xrstor64|xsave64> [rcx]`.
fn add_xstate(
    add: &mut impl FnMut(Result<Instruction, iced_x86::IcedError>) -> Result<(), NoStub>,
    ctx: Register,
    op: Code,
) -> Result<(), NoStub> {
    add(Instruction::with2(Code::Mov_r64_rm64, Register::RCX, mem64(ctx, FRAME_AREA)))?;
    add(Instruction::with2(Code::Mov_r32_rm32, Register::EAX, mem64(ctx, FRAME_RFBM)))?;
    add(Instruction::with2(Code::Xor_r32_rm32, Register::EDX, Register::EDX))?;
    add(Instruction::with1(op, mem64(Register::RCX, 0)))
}

fn encode(seq: &[Instruction]) -> Result<Vec<u8>, NoStub> {
    let mut encoder = Encoder::new(64);
    let mut ip = 0u64;
    for insn in seq {
        ip += encoder.encode(insn, ip).map_err(|_| NoStub)? as u64;
    }
    Ok(encoder.take_buffer())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};

    fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
        Decoder::new(bitness, bytes, DecoderOptions::NONE).decode()
    }

    fn text(insn: &Instruction) -> String {
        let mut out = String::new();
        IntelFormatter::new().format(insn, &mut out);
        out
    }

    fn plan_of(bitness: u32, bytes: &[u8]) -> StubPlan {
        plan(&decode(bitness, bytes), &mut InstructionInfoFactory::new()).expect("plan")
    }

    #[test]
    fn plan_rip_relative_operand_becomes_scratch_base() {
        let p = plan_of(64, &[0x0f, 0x58, 0x05, 0x10, 0, 0, 0]); // addps xmm0, [rip+0x10]

        assert_eq!(text(&p.insn), "addps xmm0,[r10]");
        assert_eq!(p.ctx, Register::R11);
        assert!(p.gprs.is_empty());
    }

    #[test]
    fn plan_32bit_guest_addressing_reencoded_for_64bit() {
        let p = plan_of(32, &[0x66, 0x0f, 0x6e, 0x44, 0x8b, 0x04]); // movd xmm0, [ebx+ecx*4+4]

        assert_eq!(text(&p.insn), "movd xmm0,[r10]");
        assert!(p.gprs.is_empty());
    }

    #[test]
    fn plan_gpr_operands_loaded_and_scratch_avoids_them() {
        let p = plan_of(64, &[0xf2, 0x4d, 0x0f, 0x2a, 0xc3]); // cvtsi2sd xmm8, r11

        assert_eq!(p.gprs, vec![(Register::R11, 11)]);
        assert_eq!(p.ctx, Register::R10);
    }

    #[test]
    fn plan_rsp_operand_renamed() {
        let p = plan_of(64, &[0x66, 0x0f, 0x6e, 0xc4]); // movd xmm0, esp

        assert_eq!(text(&p.insn), "movd xmm0,r10d");
        assert_eq!(p.gprs, vec![(Register::R10, 4)]);
    }

    #[test]
    fn plan_implicit_registers_included() {
        let p = plan_of(64, &[0x66, 0x0f, 0x3a, 0x61, 0xc1, 0x00]); // pcmpestri xmm0, xmm1, 0
        let regs: Vec<usize> = p.gprs.iter().map(|g| g.1).collect();

        assert_eq!(regs, vec![0, 1, 2]);
    }

    #[test]
    fn plan_maskmovdqu_uses_rdi_as_staging_base() {
        let p = plan_of(64, &[0x66, 0x0f, 0xf7, 0xc1]);

        assert_eq!(p.mem, Some(Register::RDI));
        assert!(p.gprs.iter().all(|g| g.1 != 7));
    }

    #[test]
    fn emit_stub_ends_with_ret_and_restores_host_control_words() {
        let code = emit(&plan_of(64, &[0x0f, 0x58, 0xc1]), true).expect("emit");
        let mut decoder = Decoder::new(64, &code, DecoderOptions::NONE);
        let listing: Vec<String> = decoder.iter().map(|i| text(&i)).collect();

        assert_eq!(listing.last().map(String::as_str), Some("ret"));
        assert!(listing.iter().any(|l| l == "addps xmm0,xmm1"));
        assert!(listing.iter().any(|l| l == "ldmxcsr [rsp]"));
        assert!(listing.iter().any(|l| l == "fldcw [rsp+4]"));
    }
}
