//! Generic instruction forms: every iced `Code` of the user-level integer ISA
//! (SDM vol. 2, the "general-purpose instructions" of vol. 1 ch. 5.1 and the
//! BMI/ADX/MOVBE extensions) whose operands the harness can synthesize from
//! its `OpCodeInfo`. One `Code` is one encoding: `add r/m32, imm8`, `add eax,
//! imm32` and `add r/m32, imm32` are three forms, all tested.
//!
//! Invariants every synthesized instruction keeps (so no sequence escapes):
//! - it never writes rsp (except push/pop), r14 or r15: those three are never
//!   chosen as operands, and r15/r14 are the data base and index registers;
//! - memory operands are `[r15 (+ r14*scale) + disp]`, 64- or 32-bit address
//!   size, always inside the data half of the window;
//! - registers whose value decides an address or a result the SDM calls
//!   undefined (bt bit offsets, shld/shrd 16-bit counts) are set just before.

use iced_x86::{
    Code, CpuidFeature, EncodingKind, Encoder, Instruction, MemoryOperand, Mnemonic,
    OpCodeOperandKind as K, Register,
};

use super::machine::{DATA_BASE, WINDOW_ADDR};
use super::rng::Rng;

use Mnemonic as M;

/// Mnemonics tested through generic forms.
const MNEMONICS: &[Mnemonic] = &[
    M::Add, M::Adc, M::Sub, M::Sbb, M::And, M::Or, M::Xor, M::Cmp, M::Test, M::Inc, M::Dec,
    M::Neg, M::Not, M::Mul, M::Imul, M::Div, M::Idiv, M::Shl, M::Sal, M::Shr, M::Sar, M::Rol,
    M::Ror, M::Rcl, M::Rcr, M::Shld, M::Shrd, M::Bt, M::Bts, M::Btr, M::Btc, M::Bsf, M::Bsr,
    M::Lzcnt, M::Tzcnt, M::Popcnt, M::Andn, M::Bextr, M::Blsi, M::Blsmsk, M::Blsr, M::Bzhi,
    M::Mulx, M::Pdep, M::Pext, M::Rorx, M::Sarx, M::Shlx, M::Shrx, M::Movzx, M::Movsx,
    M::Movsxd, M::Cbw, M::Cwde, M::Cdqe, M::Cwd, M::Cdq, M::Cqo, M::Seto, M::Setno, M::Setb,
    M::Setae, M::Sete, M::Setne, M::Setbe, M::Seta, M::Sets, M::Setns, M::Setp, M::Setnp,
    M::Setl, M::Setge, M::Setle, M::Setg, M::Cmovo, M::Cmovno, M::Cmovb, M::Cmovae, M::Cmove,
    M::Cmovne, M::Cmovbe, M::Cmova, M::Cmovs, M::Cmovns, M::Cmovp, M::Cmovnp, M::Cmovl,
    M::Cmovge, M::Cmovle, M::Cmovg, M::Xchg, M::Xadd, M::Cmpxchg, M::Cmpxchg8b,
    M::Cmpxchg16b, M::Bswap, M::Movbe, M::Lahf, M::Sahf, M::Lea, M::Push, M::Pop, M::Clc,
    M::Stc, M::Cmc, M::Cld, M::Std, M::Adcx, M::Adox, M::Mov, M::Nop, M::Int3, M::Ud2,
];

/// Forms whose result the SDM leaves undefined for every input.
const EXCLUDED: &[Code] = &[Code::Bswap_r16];

const SHIFTS: &[Mnemonic] = &[
    M::Shl, M::Sal, M::Shr, M::Sar, M::Rol, M::Ror, M::Rcl, M::Rcr, M::Shld, M::Shrd,
];

/// Counts at the edges of the 5- and 6-bit count masks.
const SHIFT_COUNTS: &[i64] = &[0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 255];

/// Writable registers per width (no rsp, r14, r15).
pub const R64: [Register; 13] = {
    use Register::*;
    [RAX, RCX, RDX, RBX, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13]
};
const R32: [Register; 13] = {
    use Register::*;
    [EAX, ECX, EDX, EBX, EBP, ESI, EDI, R8D, R9D, R10D, R11D, R12D, R13D]
};
const R16: [Register; 13] = {
    use Register::*;
    [AX, CX, DX, BX, BP, SI, DI, R8W, R9W, R10W, R11W, R12W, R13W]
};
const R8: [Register; 17] = {
    use Register::*;
    [AL, CL, DL, BL, AH, CH, DH, BH, BPL, SIL, DIL, R8L, R9L, R10L, R11L, R12L, R13L]
};
/// Every GPR, for address arithmetic that reads but never dereferences (lea).
const ALL64: [Register; 16] = {
    use Register::*;
    [RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8, R9, R10, R11, R12, R13, R14, R15]
};

/// One operand of a form, before it becomes an `Instruction`.
#[derive(Clone, Copy, Debug)]
pub enum Operand {
    Reg(Register),
    Mem(MemoryOperand),
    Imm(i64),
}

/// Whether `code` is a generic form the host can run.
pub fn is_generic(code: Code) -> bool {
    let op = code.op_code();
    op.is_instruction()
        && op.mode64()
        && matches!(op.encoding(), EncodingKind::Legacy | EncodingKind::VEX)
        && MNEMONICS.contains(&code.mnemonic())
        && !EXCLUDED.contains(&code)
        && op.op_kinds().iter().all(|k| kind_width(*k).is_some())
        && code.cpuid_features().iter().all(|f| host_has(*f))
}

/// Every generic form, in iced's `Code` order.
pub fn catalogue() -> Vec<Code> {
    Code::values().filter(|c| is_generic(*c)).collect()
}

pub fn host_has(f: CpuidFeature) -> bool {
    use CpuidFeature as F;
    match f {
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64
        | F::CMOV | F::CX8 | F::MULTIBYTENOP => true,
        F::BMI1 => std::is_x86_feature_detected!("bmi1"),
        F::BMI2 => std::is_x86_feature_detected!("bmi2"),
        F::LZCNT => std::is_x86_feature_detected!("lzcnt"),
        F::POPCNT => std::is_x86_feature_detected!("popcnt"),
        F::ADX => std::is_x86_feature_detected!("adx"),
        F::MOVBE => std::is_x86_feature_detected!("movbe"),
        F::CMPXCHG16B => std::is_x86_feature_detected!("cmpxchg16b"),
        _ => false,
    }
}

/// The width class of an operand kind the synthesizer handles (0 for
/// immediates and memory-only), or None.
fn kind_width(k: K) -> Option<u32> {
    Some(match k {
        K::r8_or_mem | K::r8_reg | K::r8_opcode | K::al | K::cl => 8,
        K::r16_or_mem | K::r16_reg | K::r16_rm | K::r16_opcode | K::ax => 16,
        K::r32_or_mem | K::r32_reg | K::r32_rm | K::r32_opcode | K::r32_vvvv | K::eax => 32,
        K::r64_or_mem | K::r64_reg | K::r64_rm | K::r64_opcode | K::r64_vvvv | K::rax => 64,
        K::mem | K::imm8 | K::imm8_const_1 | K::imm8sex16 | K::imm8sex32 | K::imm8sex64
        | K::imm16 | K::imm32 | K::imm32sex64 | K::imm64 => 0,
        _ => return None,
    })
}

/// The instructions for one use of `code`: setup (if any) then the form
/// itself. Retries other operand draws when a draw cannot be encoded (ah
/// with a REX register); None if none encodes.
pub fn synthesize(code: Code, rng: &mut Rng) -> Option<Vec<Instruction>> {
    for _ in 0..16 {
        let mut out = Vec::new();
        let ops = draw_operands(code, rng, &mut out);
        let Some(mut ins) = make(code, &ops) else { continue };
        let op = code.op_code();
        if op.can_use_lock_prefix() && matches!(ops.first(), Some(Operand::Mem(_))) && rng.chance(1, 3) {
            ins.set_has_lock_prefix(true);
        }
        if Encoder::new(64).encode(&ins, 0x1000).is_err() {
            continue;
        }
        out.push(ins);
        return Some(out);
    }
    None
}

fn draw_operands(code: Code, rng: &mut Rng, setup: &mut Vec<Instruction>) -> Vec<Operand> {
    let op = code.op_code();
    let mnemonic = code.mnemonic();
    let size = op.op_kinds().iter().filter_map(|k| kind_width(*k)).max().unwrap_or(64);
    let narrow_bt = matches!(mnemonic, M::Bt | M::Bts | M::Btr | M::Btc)
        && matches!(op.op_kinds().get(1), Some(k) if kind_width(*k).unwrap_or(0) > 0);
    let mut ops: Vec<Operand> = op
        .op_kinds()
        .iter()
        .map(|&k| draw_operand(code, k, rng, narrow_bt))
        .collect();
    if SHIFTS.contains(&mnemonic) {
        fix_shift_count(code, size, &mut ops, rng, setup);
    }
    if narrow_bt && matches!(ops[0], Operand::Mem(_)) {
        if let Operand::Reg(r) = ops[1] {
            let bits = rng.pick(&[0, 1, 7, 8, 15, 16, 31, 32, 63, 64, -1, -8, -65]);
            let offset = if rng.chance(1, 2) { bits } else { rng.range(-0x1000, 0xfff) };
            setup.push(mov_imm(r.full_register(), offset));
        }
    }
    if matches!(mnemonic, M::Div | M::Idiv) {
        div_setup(size, rng, setup);
    }
    ops
}

fn draw_operand(code: Code, k: K, rng: &mut Rng, narrow_bt: bool) -> Operand {
    let width = kind_width(k).expect("filtered");
    match k {
        K::al => Operand::Reg(Register::AL),
        K::cl => Operand::Reg(Register::CL),
        K::ax => Operand::Reg(Register::AX),
        K::eax => Operand::Reg(Register::EAX),
        K::rax => Operand::Reg(Register::RAX),
        K::mem if code.mnemonic() == M::Lea => Operand::Mem(lea_mem(rng)),
        K::mem => Operand::Mem(data_mem(rng, code == Code::Cmpxchg16b_m128, false)),
        K::r8_or_mem | K::r16_or_mem | K::r32_or_mem | K::r64_or_mem if rng.chance(1, 2) => {
            Operand::Mem(data_mem(rng, false, narrow_bt))
        }
        K::imm8_const_1 => Operand::Imm(1),
        K::imm8 => Operand::Imm(rng.value() as u8 as i64),
        K::imm8sex16 | K::imm8sex32 | K::imm8sex64 => Operand::Imm(rng.value() as i8 as i64),
        K::imm16 => Operand::Imm(rng.value() as u16 as i64),
        K::imm32 | K::imm32sex64 => Operand::Imm(rng.value() as i32 as i64),
        K::imm64 => Operand::Imm(rng.value() as i64),
        _ => Operand::Reg(reg_of_width(width, rng)),
    }
}

pub fn reg_of_width(width: u32, rng: &mut Rng) -> Register {
    match width {
        8 => rng.pick(&R8),
        16 => rng.pick(&R16),
        32 => rng.pick(&R32),
        _ => rng.pick(&R64),
    }
}

/// `[r15 (+ r14*s) + disp]` inside the data half. r15 = DATA_BASE (window +
/// 0x800) and r14 is a multiple of 16 at most 0x40, so index*8 <= 0x200.
/// `narrow` keeps 0x200 bytes of slack on both sides for bt's bit offsets.
pub fn data_mem(rng: &mut Rng, align16: bool, narrow: bool) -> MemoryOperand {
    let addr32 = rng.chance(1, 5);
    let indexed = rng.chance(1, 3);
    let base_off = (DATA_BASE - WINDOW_ADDR) as i64;
    let (lo, hi) = if narrow { (0x300, 0xb00) } else { (0x10, 0xfe0) };
    let hi = if indexed { hi - 0x200 } else { hi };
    let mut disp = rng.range(lo, hi) - base_off;
    if align16 {
        disp &= !15;
    }
    let (base, index) = if addr32 { (Register::R15D, Register::R14D) } else { (Register::R15, Register::R14) };
    let index = if indexed { index } else { Register::None };
    let scale = if indexed { rng.pick(&[1, 2, 4, 8]) } else { 1 };
    let displ_size = if (-128..128).contains(&disp) && rng.chance(2, 3) { 1 } else { 4 };
    MemoryOperand::with_base_index_scale_displ_size(base, index, scale, disp, displ_size)
}

/// Any addressing form: lea computes an address and never dereferences it.
fn lea_mem(rng: &mut Rng) -> MemoryOperand {
    if rng.chance(1, 10) {
        let target = super::machine::CODE_ADDR.wrapping_add(rng.range(-0x1000, 0x1000) as u64);
        return MemoryOperand::with_base_displ(Register::RIP, target as i64);
    }
    let addr32 = rng.chance(1, 4);
    let w = |r: Register| if addr32 { r.full_register32() } else { r };
    let base = if rng.chance(1, 8) { Register::None } else { w(rng.pick(&ALL64)) };
    let index = if rng.chance(1, 3) {
        Register::None
    } else {
        let r = rng.pick(&ALL64);
        if r == Register::RSP { Register::None } else { w(r) }
    };
    let scale = if index == Register::None { 1 } else { rng.pick(&[1, 2, 4, 8]) };
    let disp = match rng.below(4) {
        0 => 0,
        1 => rng.range(-128, 127),
        _ => rng.value() as i32 as i64,
    };
    let displ_size = if base == Register::None { 4 } else if disp == 0 && rng.chance(1, 2) { 0 } else { 1 };
    MemoryOperand::with_base_index_scale_displ_size(base, index, scale, disp, displ_size)
}

/// Shift counts at the mask edges; CL forms get `mov cl, count` first. 16-bit
/// shld/shrd with a masked count above 16 have an undefined result: avoided.
fn fix_shift_count(code: Code, size: u32, ops: &mut [Operand], rng: &mut Rng, setup: &mut Vec<Instruction>) {
    let double = matches!(code.mnemonic(), M::Shld | M::Shrd);
    let mut count = if rng.chance(3, 4) { rng.pick(SHIFT_COUNTS) } else { rng.below(256) as i64 };
    if double && size == 16 && (count & 31) > 16 {
        count &= 15;
    }
    let last = ops.len() - 1;
    match ops[last] {
        Operand::Reg(Register::CL) => setup.push(mov_imm(Register::RCX, count)),
        Operand::Imm(_) if code.op_code().op_kind(last as u32) == K::imm8 => ops[last] = Operand::Imm(count),
        _ => {}
    }
}

/// Divisions fault (#DE) on most random inputs: two times in three, make the
/// high half of the dividend zero or the sign extension of the low half.
fn div_setup(size: u32, rng: &mut Rng, setup: &mut Vec<Instruction>) {
    let sign = rng.chance(1, 2);
    if rng.chance(1, 3) {
        return;
    }
    let ins = match (size, sign) {
        (8, false) => Instruction::with2(Code::Mov_r8_imm8, Register::AH, 0),
        (8, true) => Ok(Instruction::with(Code::Cbw)),
        (16, false) => Instruction::with2(Code::Mov_r16_imm16, Register::DX, 0),
        (16, true) => Ok(Instruction::with(Code::Cwd)),
        (32, false) => Instruction::with2(Code::Mov_r32_imm32, Register::EDX, 0),
        (32, true) => Ok(Instruction::with(Code::Cdq)),
        (_, false) => Instruction::with2(Code::Mov_r32_imm32, Register::EDX, 0),
        (_, true) => Ok(Instruction::with(Code::Cqo)),
    };
    setup.push(ins.expect("div setup"));
}

/// `mov r64, imm` (sign-extended imm32, or imm64), which leaves flags alone.
pub fn mov_imm(reg: Register, value: i64) -> Instruction {
    let ins = if i32::try_from(value).is_ok() {
        Instruction::with2(Code::Mov_rm64_imm32, reg, value as i32)
    } else {
        Instruction::with2(Code::Mov_r64_imm64, reg, value as u64)
    };
    ins.expect("mov imm")
}

/// Builds the instruction from operands (iced's `with*` are typed by arity).
pub fn make(code: Code, ops: &[Operand]) -> Option<Instruction> {
    use Operand::*;
    let r = match *ops {
        [] => Ok(Instruction::with(code)),
        [Reg(a)] => Instruction::with1(code, a),
        [Mem(a)] => Instruction::with1(code, a),
        [Imm(a)] => Instruction::with1(code, a as i32),
        [Reg(a), Reg(b)] => Instruction::with2(code, a, b),
        [Reg(a), Mem(b)] => Instruction::with2(code, a, b),
        [Reg(a), Imm(b)] => Instruction::with2(code, a, b),
        [Mem(a), Reg(b)] => Instruction::with2(code, a, b),
        [Mem(a), Imm(b)] => Instruction::with2(code, a, b as i32),
        [Imm(a), Imm(b)] => Instruction::with2(code, a as i32, b as i32),
        [Reg(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c as i32),
        [Reg(a), Mem(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Reg(a), Mem(b), Imm(c)] => Instruction::with3(code, a, b, c as i32),
        [Reg(a), Reg(b), Mem(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Reg(c)] => Instruction::with3(code, a, b, c),
        [Mem(a), Reg(b), Imm(c)] => Instruction::with3(code, a, b, c as i32),
        _ => return None,
    };
    r.ok()
}
