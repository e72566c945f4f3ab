//! Compound items: instructions that need their registers set up to stay
//! inside the window and the sequence (SDM vol. 2: MOVS/STOS/LODS/CMPS/SCAS
//! with REP prefixes, XLAT, ENTER/LEAVE, Jcc/JMP/LOOPcc/JrCXZ, CALL/RET).
//!
//! Each item establishes its own pointers from r15 (data) or rsp (stack), so
//! it stays safe whatever random values the registers held before. Control
//! transfers only go forward to a label inside the sequence; a call's body
//! never touches the stack, so `ret` returns to the instruction after `call`.

use iced_x86::{Code, FlowControl, Instruction, MemoryOperand, Mnemonic, OpCodeOperandKind, Register, RepPrefixKind};

use super::forms::{data_mem, mov_imm};
use super::machine::{DATA_BASE, WINDOW_ADDR};
use super::rng::Rng;
use super::sequence::Builder;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rep {
    None,
    /// F3: `rep` (movs/stos/lods) or `repe` (cmps/scas).
    Repe,
    Repne,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compound {
    /// A string instruction (its `Code`), prefix, 32-bit address size.
    Str { code: Code, rep: Rep, addr32: bool },
    Xlat { addr32: bool },
    /// `enter`/`leave` pair, 16-bit operand size if `word`.
    EnterLeave { word: bool },
    /// A forward jcc/jmp/loop/jrcxz over a few instructions.
    Branch(Code),
    /// `call` into a body ending in `ret` (or `ret 8` after a push).
    Call { ret_imm: bool },
}

const STRINGS: [Code; 20] = [
    Code::Movsb_m8_m8, Code::Movsw_m16_m16, Code::Movsd_m32_m32, Code::Movsq_m64_m64,
    Code::Stosb_m8_AL, Code::Stosw_m16_AX, Code::Stosd_m32_EAX, Code::Stosq_m64_RAX,
    Code::Lodsb_AL_m8, Code::Lodsw_AX_m16, Code::Lodsd_EAX_m32, Code::Lodsq_RAX_m64,
    Code::Cmpsb_m8_m8, Code::Cmpsw_m16_m16, Code::Cmpsd_m32_m32, Code::Cmpsq_m64_m64,
    Code::Scasb_AL_m8, Code::Scasw_AX_m16, Code::Scasd_EAX_m32, Code::Scasq_RAX_m64,
];

/// Every compound item.
pub fn all() -> Vec<Compound> {
    let mut out = Vec::new();
    for code in STRINGS {
        let compares = matches!(code.mnemonic(), Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq | Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq);
        let reps: &[Rep] = if compares { &[Rep::None, Rep::Repe, Rep::Repne] } else { &[Rep::None, Rep::Repe] };
        for &rep in reps {
            for addr32 in [false, true] {
                out.push(Compound::Str { code, rep, addr32 });
            }
        }
    }
    out.extend([Compound::Xlat { addr32: false }, Compound::Xlat { addr32: true }]);
    out.extend([Compound::EnterLeave { word: false }, Compound::EnterLeave { word: true }]);
    out.extend(branch_codes().into_iter().map(Compound::Branch));
    out.extend([Compound::Call { ret_imm: false }, Compound::Call { ret_imm: true }]);
    out
}

/// 64-bit-mode relative branches with a 64-bit operand size: jcc (rel8 and
/// rel32), jmp, loop/loope/loopne and jrcxz/jecxz (RCX and ECX forms).
/// 16-bit operand-size forms would truncate RIP to 16 bits: not generated.
fn branch_codes() -> Vec<Code> {
    Code::values()
        .filter(|c| {
            let op = c.op_code();
            op.mode64()
                && op.is_instruction()
                && matches!(c.flow_control(), FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch)
                && op.op_count() == 1
                && matches!(op.op_kind(0), OpCodeOperandKind::br64_1 | OpCodeOperandKind::br64_4)
                && op.encoding() == iced_x86::EncodingKind::Legacy
                && !matches!(c.mnemonic(), Mnemonic::Jmpe)
        })
        .collect()
}

pub fn emit(c: Compound, rng: &mut Rng, b: &mut Builder) {
    match c {
        Compound::Str { code, rep, addr32 } => string_op(code, rep, addr32, rng, b),
        Compound::Xlat { addr32 } => xlat(addr32, rng, b),
        Compound::EnterLeave { word } => enter_leave(word, rng, b),
        Compound::Branch(code) => branch(code, rng, b),
        Compound::Call { ret_imm } => call(ret_imm, rng, b),
    }
}

/// `lea reg, [r15 + window_off - (DATA_BASE - WINDOW_ADDR)]`.
fn point_into_window(reg: Register, window_off: i64) -> Instruction {
    let disp = window_off - (DATA_BASE - WINDOW_ADDR) as i64;
    Instruction::with2(Code::Lea_r64_m, reg, MemoryOperand::with_base_displ(Register::R15, disp)).expect("lea")
}

fn string_op(code: Code, rep: Rep, addr32: bool, rng: &mut Rng, b: &mut Builder) {
    let down = rng.chance(1, 2);
    let count = if rep == Rep::None { 0 } else { rng.pick(&[0, 1, 2, 3, 5, 7]) };
    // Up to 7 elements of 8 bytes either way from a start in [0x100, 0xf00).
    for reg in [Register::RSI, Register::RDI] {
        b.push(point_into_window(reg, rng.range(0x100, 0xeff)));
    }
    b.push(mov_imm(Register::RCX, count));
    b.push(Instruction::with(if down { Code::Std } else { Code::Cld }));
    let kind = match rep {
        Rep::None => RepPrefixKind::None,
        Rep::Repe => RepPrefixKind::Repe,
        Rep::Repne => RepPrefixKind::Repne,
    };
    b.push(string_instr(code, if addr32 { 32 } else { 64 }, kind));
    if rng.chance(1, 2) {
        b.push(Instruction::with(Code::Cld));
    }
}

fn string_instr(code: Code, a: u32, rep: RepPrefixKind) -> Instruction {
    let seg = Register::None;
    let r = match code {
        Code::Movsb_m8_m8 => Instruction::with_movsb(a, seg, rep),
        Code::Movsw_m16_m16 => Instruction::with_movsw(a, seg, rep),
        Code::Movsd_m32_m32 => Instruction::with_movsd(a, seg, rep),
        Code::Movsq_m64_m64 => Instruction::with_movsq(a, seg, rep),
        Code::Stosb_m8_AL => Instruction::with_stosb(a, rep),
        Code::Stosw_m16_AX => Instruction::with_stosw(a, rep),
        Code::Stosd_m32_EAX => Instruction::with_stosd(a, rep),
        Code::Stosq_m64_RAX => Instruction::with_stosq(a, rep),
        Code::Lodsb_AL_m8 => Instruction::with_lodsb(a, seg, rep),
        Code::Lodsw_AX_m16 => Instruction::with_lodsw(a, seg, rep),
        Code::Lodsd_EAX_m32 => Instruction::with_lodsd(a, seg, rep),
        Code::Lodsq_RAX_m64 => Instruction::with_lodsq(a, seg, rep),
        Code::Cmpsb_m8_m8 => Instruction::with_cmpsb(a, seg, rep),
        Code::Cmpsw_m16_m16 => Instruction::with_cmpsw(a, seg, rep),
        Code::Cmpsd_m32_m32 => Instruction::with_cmpsd(a, seg, rep),
        Code::Cmpsq_m64_m64 => Instruction::with_cmpsq(a, seg, rep),
        Code::Scasb_AL_m8 => Instruction::with_scasb(a, rep),
        Code::Scasw_AX_m16 => Instruction::with_scasw(a, rep),
        Code::Scasd_EAX_m32 => Instruction::with_scasd(a, rep),
        Code::Scasq_RAX_m64 => Instruction::with_scasq(a, rep),
        other => panic!("not a string code: {other:?}"),
    };
    r.expect("string instruction")
}

/// `xlat` reads [rbx + al]: rbx points at least 256 bytes before the end.
fn xlat(addr32: bool, rng: &mut Rng, b: &mut Builder) {
    b.push(point_into_window(Register::RBX, rng.range(0x10, 0xe00)));
    let base = if addr32 { Register::EBX } else { Register::RBX };
    let mem = MemoryOperand::with_base_index(base, Register::AL);
    b.push(Instruction::with1(Code::Xlat_m8, mem).expect("xlat"));
}

/// `enter size, level` then `leave`. rbp is pointed into the stack half
/// first: nested levels copy frame pointers from [rbp - 8*i], and the 16-bit
/// forms update only bp.
fn enter_leave(word: bool, rng: &mut Rng, b: &mut Builder) {
    let level = rng.pick(&[0, 0, 1, 2, 3, 7]);
    let size = rng.pick(&[0, 8, 16, 0x28, 0x100]);
    if level > 0 || word || rng.chance(1, 2) {
        let k = 8 * rng.range(1, 8);
        let lea = Instruction::with2(Code::Lea_r64_m, Register::RBP, MemoryOperand::with_base_displ(Register::RSP, k));
        b.push(lea.expect("lea rbp"));
    }
    let (enter, leave) = if word { (Code::Enterw_imm16_imm8, Code::Leavew) } else { (Code::Enterq_imm16_imm8, Code::Leaveq) };
    b.push(Instruction::with2(enter, size, level).expect("enter"));
    if rng.chance(1, 2) {
        b.push(Instruction::with1(Code::Pushq_imm32, rng.value() as i32).expect("push"));
    }
    b.push(Instruction::with(leave));
}

fn branch(code: Code, rng: &mut Rng, b: &mut Builder) {
    let uses_rcx = matches!(code.mnemonic(), Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz);
    if uses_rcx && rng.chance(1, 2) {
        let rcx = rng.pick(&[0, 1, 2, 0x1_0000_0000, 0x1_0000_0001, -1]);
        b.push(mov_imm(Register::RCX, rcx));
    }
    let target = b.label();
    b.push(Instruction::with_branch(code, target).expect("branch"));
    let n = rng.range(1, 3) as u64;
    b.body_items(n, rng);
    b.bind(target);
}

fn call(ret_imm: bool, rng: &mut Rng, b: &mut Builder) {
    let (callee, after) = (b.label(), b.label());
    if ret_imm {
        b.push(Instruction::with1(Code::Pushq_imm32, rng.value() as i32).expect("push"));
    }
    b.push(Instruction::with_branch(Code::Call_rel32_64, callee).expect("call"));
    b.push(Instruction::with_branch(Code::Jmp_rel8_64, after).expect("jmp"));
    b.bind(callee);
    let n = rng.below(3);
    b.body_items(n, rng);
    if rng.chance(1, 4) {
        // A memory operand in the body, to check the return address is not clobbered.
        let mem = data_mem(rng, false, false);
        b.push(Instruction::with2(Code::Add_rm64_imm8, mem, 1).expect("add"));
    }
    let ret = if ret_imm { Instruction::with1(Code::Retnq_imm16, 8) } else { Ok(Instruction::with(Code::Retnq)) };
    b.push(ret.expect("ret"));
    b.bind(after);
}
