//! Integer instructions: data movement, ALU, multiply/divide, shifts,
//! conversions, flags, BCD (SDM Vol. 2, and Vol. 1 chapter 7).

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::access::{size_mask, Loc};
use super::alu::{self, ShiftKind};
use super::Vcpu;
use crate::cpu::rflags::{AF, CF, DF, OF, PF, SF, ZF};
use crate::cpu::CpuMode;
use crate::exception::Exception;

type R = Result<(), Exception>;
const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Operand size in bytes of operand `i` (of operand 0 when `i` is an immediate).
#[inline(always)]
pub fn op_size(insn: &Instruction, i: u32) -> u32 {
    let k = match insn.op_kind(i) {
        k @ (OpKind::Register | OpKind::Memory) => (k, i),
        _ => (insn.op0_kind(), 0),
    };
    match k {
        (OpKind::Register, n) => insn.op_register(n).size() as u32,
        (OpKind::Memory, _) => insn.memory_size().size() as u32,
        _ => 4,
    }
}

// --- data movement ---

pub fn mov(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let x = v.read_op(i, 1, size)?;
    v.write_op0(i, size, x)
}

pub fn movzx(v: &mut Vcpu, i: &Instruction) -> R {
    let x = v.read_op(i, 1, op_size(i, 1))?;
    v.set_reg(i.op0_register(), x);
    Ok(())
}

pub fn movsx(v: &mut Vcpu, i: &Instruction) -> R {
    let s = op_size(i, 1);
    let x = v.read_op(i, 1, s)?;
    let bits = 64 - s * 8;
    v.set_reg(i.op0_register(), (((x << bits) as i64) >> bits) as u64);
    Ok(())
}

pub fn lea(v: &mut Vcpu, i: &Instruction) -> R {
    let a = v.effective_address(i);
    v.set_reg(i.op0_register(), a);
    Ok(())
}

pub fn xchg(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let loc = v.dest(i, size)?;
    let a = v.read_loc(loc, size)?;
    let b = v.reg(i.op1_register());
    v.write_loc(loc, size, b)?;
    v.set_reg(i.op1_register(), a);
    Ok(())
}

pub fn xadd(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let loc = v.dest(i, size)?;
    let a = v.read_loc(loc, size)?;
    let b = v.reg(i.op1_register());
    let (r, f) = alu::add(size, a, b, 0);
    // Source first, so that `xadd r, r` with the same register ends with the sum.
    v.set_reg(i.op1_register(), a);
    v.write_loc(loc, size, r)?;
    v.set_arith(ARITH, f);
    Ok(())
}

pub fn cmpxchg(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let loc = v.dest(i, size)?;
    let dst = v.read_loc(loc, size)?;
    let acc = v.cpu.regs.gpr[0] & size_mask(size);
    let (_, f) = alu::sub(size, acc, dst, 0);
    if acc == dst {
        let src = v.reg(i.op1_register());
        v.write_loc(loc, size, src)?;
    } else {
        // A memory destination is written back unchanged even on failure (the
        // locked cycle); a register destination is not written at all, so a
        // 32-bit one keeps its upper half.
        if let Loc::Mem(_) = loc {
            v.write_loc(loc, size, dst)?;
        }
        set_acc(v, size, dst);
    }
    v.set_arith(ARITH, f);
    Ok(())
}

fn set_acc(v: &mut Vcpu, size: u32, x: u64) {
    let r = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    v.set_reg(r, x);
}

/// cmpxchg8b / cmpxchg16b.
pub fn cmpxchg_wide(v: &mut Vcpu, i: &Instruction) -> R {
    let wide = i.mnemonic() == Mnemonic::Cmpxchg16b;
    let half = if wide { 8 } else { 4 };
    let lin = v.mem_operand(i, half * 2, true)?;
    if wide && lin & 15 != 0 {
        return Err(Exception::gp0());
    }
    v.probe_write(lin, half * 2)?;
    let m = size_mask(half);
    let lo = v.read_lin(lin, half)?;
    let hi = v.read_lin(lin + half as u64, half)?;
    let g = &v.cpu.regs.gpr;
    let (ax, dx, bx, cx) = (g[0] & m, g[2] & m, g[3] & m, g[1] & m);
    if lo == ax && hi == dx {
        v.write_lin(lin, half, bx)?;
        v.write_lin(lin + half as u64, half, cx)?;
        v.set_flag(ZF, true);
    } else {
        v.write_lin(lin, half, lo)?;
        v.write_lin(lin + half as u64, half, hi)?;
        let (a, d) = if wide { (Register::RAX, Register::RDX) } else { (Register::EAX, Register::EDX) };
        v.set_reg(a, lo);
        v.set_reg(d, hi);
        v.set_flag(ZF, false);
    }
    Ok(())
}

pub fn bswap(v: &mut Vcpu, i: &Instruction) -> R {
    let r = i.op0_register();
    let x = v.reg(r);
    let y = match r.size() {
        8 => x.swap_bytes(),
        4 => (x as u32).swap_bytes() as u64,
        // bswap of a 16-bit register is undefined; hardware gives zero.
        _ => 0,
    };
    v.set_reg(r, y);
    Ok(())
}

pub fn movbe(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let x = v.read_op(i, 1, size)?;
    let y = match size {
        2 => (x as u16).swap_bytes() as u64,
        4 => (x as u32).swap_bytes() as u64,
        _ => x.swap_bytes(),
    };
    v.write_op0(i, size, y)
}

/// cbw/cwde/cdqe: sign-extend the lower half of the accumulator.
pub fn sign_extend_acc(v: &mut Vcpu, i: &Instruction) -> R {
    let a = v.cpu.regs.gpr[0];
    match i.mnemonic() {
        Mnemonic::Cbw => v.set_reg(Register::AX, a as i8 as i16 as u16 as u64),
        Mnemonic::Cwde => v.set_reg(Register::EAX, a as i16 as i32 as u32 as u64),
        _ => v.set_reg(Register::RAX, a as i32 as i64 as u64),
    }
    Ok(())
}

/// cwd/cdq/cqo: sign of the accumulator into the data register.
pub fn sign_to_dx(v: &mut Vcpu, i: &Instruction) -> R {
    let a = v.cpu.regs.gpr[0];
    match i.mnemonic() {
        Mnemonic::Cwd => v.set_reg(Register::DX, if (a as i16) < 0 { 0xffff } else { 0 }),
        Mnemonic::Cdq => v.set_reg(Register::EDX, if (a as i32) < 0 { 0xffff_ffff } else { 0 }),
        _ => v.set_reg(Register::RDX, if (a as i64) < 0 { u64::MAX } else { 0 }),
    }
    Ok(())
}

pub fn lahf(v: &mut Vcpu, _i: &Instruction) -> R {
    let f = (v.cpu.regs.rflags & (SF | ZF | AF | PF | CF)) | 2;
    v.set_reg(Register::AH, f);
    Ok(())
}

pub fn sahf(v: &mut Vcpu, _i: &Instruction) -> R {
    let ah = v.reg(Register::AH);
    v.set_arith(SF | ZF | AF | PF | CF, ah);
    Ok(())
}

pub fn nop(_v: &mut Vcpu, _i: &Instruction) -> R {
    Ok(())
}

pub fn xlat(v: &mut Vcpu, i: &Instruction) -> R {
    let base = v.reg(i.memory_base());
    let mask = size_mask(i.memory_base().size() as u32);
    let off = base.wrapping_add(v.cpu.regs.gpr[0] & 0xff) & mask;
    let x = v.read_mem(super::access::seg_index(i.memory_segment()), off, 1)?;
    v.set_reg(Register::AL, x);
    Ok(())
}

// --- ALU ---

macro_rules! binop {
    ($name:ident, $body:expr, $writes:expr) => {
        pub fn $name(v: &mut Vcpu, i: &Instruction) -> R {
            let size = op_size(i, 0);
            let loc = if $writes { v.dest(i, size)? } else { src_loc(v, i, size)? };
            let a = v.read_loc(loc, size)?;
            let b = v.read_op(i, 1, size)?;
            let f: fn(&Vcpu, u32, u64, u64) -> (u64, u64) = $body;
            let (r, fl) = f(v, size, a, b);
            if $writes {
                v.write_loc(loc, size, r)?;
            }
            v.set_arith(ARITH, fl);
            Ok(())
        }
    };
}

/// Operand 0 as a read-only location (cmp, test).
fn src_loc(v: &mut Vcpu, i: &Instruction, size: u32) -> Result<Loc, Exception> {
    match i.op0_kind() {
        OpKind::Register => Ok(Loc::Reg(i.op0_register())),
        _ => Ok(Loc::Mem(v.mem_operand(i, size, false)?)),
    }
}

fn carry(v: &Vcpu) -> u64 {
    (v.cpu.regs.rflags & CF != 0) as u64
}

binop!(add, |_, s, a, b| alu::add(s, a, b, 0), true);
binop!(adc, |v, s, a, b| alu::add(s, a, b, carry(v)), true);
binop!(sub, |_, s, a, b| alu::sub(s, a, b, 0), true);
binop!(sbb, |v, s, a, b| alu::sub(s, a, b, carry(v)), true);
binop!(cmp, |_, s, a, b| alu::sub(s, a, b, 0), false);
binop!(and, |_, s, a, b| alu::logic(s, a & b), true);
binop!(or, |_, s, a, b| alu::logic(s, a | b), true);
binop!(xor, |_, s, a, b| alu::logic(s, a ^ b), true);
binop!(test, |_, s, a, b| alu::logic(s, a & b), false);

macro_rules! unop {
    ($name:ident, $body:expr, $flags:expr) => {
        pub fn $name(v: &mut Vcpu, i: &Instruction) -> R {
            let size = op_size(i, 0);
            let loc = v.dest(i, size)?;
            let a = v.read_loc(loc, size)?;
            let f: fn(u32, u64) -> (u64, u64) = $body;
            let (r, fl) = f(size, a);
            v.write_loc(loc, size, r)?;
            v.set_arith($flags, fl);
            Ok(())
        }
    };
}

unop!(inc, alu::inc, ARITH & !CF);
unop!(dec, alu::dec, ARITH & !CF);
unop!(neg, alu::neg, ARITH);
unop!(not, |s, a| (!a & size_mask(s), 0), 0);

// --- multiply and divide ---

/// One-operand mul/imul: rDX:rAX = rAX * src.
pub fn mul1(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let src = v.read_op(i, 0, size)?;
    let signed = i.mnemonic() == Mnemonic::Imul;
    let m = size_mask(size);
    let a = v.cpu.regs.gpr[0] & m;
    let bits = size * 8;
    let (lo, hi, overflow) = if signed {
        let p = sext(a, size) as i128 * sext(src, size) as i128;
        let lo = p as u64 & m;
        let full_fits = p == sext(lo, size) as i128;
        (lo, (p >> bits) as u64 & m, !full_fits)
    } else {
        let p = a as u128 * src as u128;
        (p as u64 & m, (p >> bits) as u64 & m, (p >> bits) != 0)
    };
    if size == 1 {
        v.set_reg(Register::AX, (hi << 8) | lo);
    } else {
        set_acc(v, size, lo);
        set_dx(v, size, hi);
    }
    mul_flags(v, overflow);
    Ok(())
}

fn set_dx(v: &mut Vcpu, size: u32, x: u64) {
    let r = match size {
        2 => Register::DX,
        4 => Register::EDX,
        _ => Register::RDX,
    };
    v.set_reg(r, x);
}

fn mul_flags(v: &mut Vcpu, overflow: bool) {
    // CF = OF = overflow; SF, ZF, AF and PF are undefined, and AMD CPUs
    // keep them (translated code runs multiplications natively, and the
    // interpreter when a TLB miss leaves one to it).
    v.set_arith(CF | OF, if overflow { CF | OF } else { 0 });
}

#[inline(always)]
pub fn sext(x: u64, size: u32) -> i64 {
    let s = 64 - size * 8;
    ((x << s) as i64) >> s
}

/// Two- and three-operand imul: dst = src1 * src2 (truncated).
pub fn imul_n(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let (a, b) = if i.op_count() == 3 {
        (v.read_op(i, 1, size)?, i.immediate(2) & size_mask(size))
    } else {
        (v.reg(i.op0_register()), v.read_op(i, 1, size)?)
    };
    let p = sext(a, size) as i128 * sext(b, size) as i128;
    let lo = p as u64 & size_mask(size);
    v.set_reg(i.op0_register(), lo);
    mul_flags(v, p != sext(lo, size) as i128);
    Ok(())
}

/// div/idiv: quotient and remainder of rDX:rAX by src; #DE on zero or overflow.
pub fn div(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let src = v.read_op(i, 0, size)?;
    if src == 0 {
        return Err(Exception::de());
    }
    let m = size_mask(size);
    let bits = size * 8;
    let g = &v.cpu.regs.gpr;
    let (lo, hi) = if size == 1 { (g[0] & 0xff, (g[0] >> 8) & 0xff) } else { (g[0] & m, g[2] & m) };
    let dividend = ((hi as u128) << bits) | lo as u128;
    let (q, r) = if i.mnemonic() == Mnemonic::Idiv {
        let n = ((dividend << (128 - 2 * bits)) as i128) >> (128 - 2 * bits);
        let d = sext(src, size) as i128;
        let q = n.checked_div(d).ok_or(Exception::de())?;
        let min = -(1i128 << (bits - 1));
        let max = (1i128 << (bits - 1)) - 1;
        if q < min || q > max {
            return Err(Exception::de());
        }
        (q as u64 & m, (n - q * d) as u64 & m)
    } else {
        let q = dividend / src as u128;
        if q > m as u128 {
            return Err(Exception::de());
        }
        (q as u64, (dividend % src as u128) as u64)
    };
    if size == 1 {
        v.set_reg(Register::AX, (r << 8) | q);
    } else {
        set_acc(v, size, q);
        set_dx(v, size, r);
    }
    // Every flag is undefined: AMD CPUs keep CF and OF, set AF and clear
    // the rest (translated code divides natively).
    v.set_arith(SF | ZF | AF | PF, AF);
    Ok(())
}

// --- shifts and rotates ---

pub fn shift(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let count = match i.op1_kind() {
        OpKind::Register => v.reg(i.op1_register()),
        _ => i.immediate(1),
    };
    let count = alu::shift_count(size, count);
    let loc = v.dest(i, size)?;
    let a = v.read_loc(loc, size)?;
    if count == 0 {
        // No flags change, but the destination is written (a 32-bit register
        // is zero-extended) as on hardware.
        return v.write_loc(loc, size, a);
    }
    let kind = match i.mnemonic() {
        Mnemonic::Rol => ShiftKind::Rol,
        Mnemonic::Ror => ShiftKind::Ror,
        Mnemonic::Rcl => ShiftKind::Rcl,
        Mnemonic::Rcr => ShiftKind::Rcr,
        Mnemonic::Shl | Mnemonic::Sal => ShiftKind::Shl,
        Mnemonic::Shr => ShiftKind::Shr,
        _ => ShiftKind::Sar,
    };
    let r = alu::shift(kind, size, a, count, v.flag(CF));
    v.write_loc(loc, size, r.value)?;
    v.set_arith(r.mask, r.flags);
    Ok(())
}

pub fn double_shift(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let count = match i.op2_kind() {
        OpKind::Register => v.reg(i.op2_register()),
        _ => i.immediate(2),
    };
    let count = alu::shift_count(size, count);
    let loc = v.dest(i, size)?;
    let a = v.read_loc(loc, size)?;
    if count == 0 {
        return v.write_loc(loc, size, a);
    }
    let b = v.reg(i.op1_register());
    let (r, f) = alu::double_shift(i.mnemonic() == Mnemonic::Shld, size, a, b, count);
    v.write_loc(loc, size, r)?;
    v.set_arith(ARITH, f);
    Ok(())
}

// --- flags ---

pub fn flag_op(v: &mut Vcpu, i: &Instruction) -> R {
    match i.mnemonic() {
        Mnemonic::Clc => v.set_flag(CF, false),
        Mnemonic::Stc => v.set_flag(CF, true),
        Mnemonic::Cmc => v.cpu.regs.rflags ^= CF,
        Mnemonic::Cld => v.set_flag(DF, false),
        _ => v.set_flag(DF, true),
    }
    Ok(())
}

// --- BCD (invalid in 64-bit mode) ---

pub fn bcd(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode == CpuMode::Long {
        return Err(Exception::ud());
    }
    let al = v.cpu.regs.gpr[0] & 0xff;
    let cf = v.flag(CF);
    let af = v.flag(AF);
    match i.mnemonic() {
        Mnemonic::Daa | Mnemonic::Das => {
            let add = i.mnemonic() == Mnemonic::Daa;
            let mut r = al;
            let (mut ncf, mut naf) = (false, false);
            if (al & 0xf) > 9 || af {
                r = if add { r + 6 } else { r.wrapping_sub(6) } & 0xff;
                naf = true;
                ncf = cf || if add { al + 6 > 0xff } else { al < 6 };
            }
            if al > 0x99 || cf {
                r = if add { r + 0x60 } else { r.wrapping_sub(0x60) } & 0xff;
                ncf = true;
            }
            v.set_reg(Register::AL, r);
            let f = alu::szp(1, r) | ncf as u64 | if naf { AF } else { 0 };
            v.set_arith(ARITH & !OF, f);
            v.set_flag(OF, false);
        }
        Mnemonic::Aaa | Mnemonic::Aas => {
            let ax = v.cpu.regs.gpr[0] & 0xffff;
            let adjust = (al & 0xf) > 9 || af;
            let r = if !adjust {
                ax
            } else if i.mnemonic() == Mnemonic::Aaa {
                ax.wrapping_add(0x106)
            } else {
                let lo = al.wrapping_sub(6) & 0xff;
                let hi = ((ax >> 8).wrapping_sub(1)) & 0xff;
                (hi << 8) | lo
            };
            v.set_reg(Register::AX, r & 0xff0f);
            let f = alu::szp(1, r & 0x0f) | if adjust { CF | AF } else { 0 };
            v.set_arith(ARITH, f);
        }
        Mnemonic::Aam => {
            let base = i.immediate(0) & 0xff;
            if base == 0 {
                return Err(Exception::de());
            }
            let r = al % base;
            v.set_reg(Register::AX, ((al / base) << 8) | r);
            v.set_arith(ARITH, alu::szp(1, r));
        }
        _ => {
            // aad
            let base = i.immediate(0) & 0xff;
            let ah = (v.cpu.regs.gpr[0] >> 8) & 0xff;
            let (r, f) = alu::add(1, al, (ah * base) & 0xff, 0);
            v.set_reg(Register::AX, r);
            v.set_arith(ARITH, f);
        }
    }
    Ok(())
}

/// setcc, cmovcc and jcc share the condition evaluation.
pub fn condition(v: &Vcpu, cc: iced_x86::ConditionCode) -> bool {
    use iced_x86::ConditionCode as C;
    let f = v.cpu.regs.rflags;
    let (cf, zf, sf, of, pf) = (f & CF != 0, f & ZF != 0, f & SF != 0, f & OF != 0, f & PF != 0);
    match cc {
        C::o => of,
        C::no => !of,
        C::b => cf,
        C::ae => !cf,
        C::e => zf,
        C::ne => !zf,
        C::be => cf || zf,
        C::a => !cf && !zf,
        C::s => sf,
        C::ns => !sf,
        C::p => pf,
        C::np => !pf,
        C::l => sf != of,
        C::ge => sf == of,
        C::le => zf || sf != of,
        C::g => !zf && sf == of,
        C::None => true,
    }
}

pub fn setcc(v: &mut Vcpu, i: &Instruction) -> R {
    let c = condition(v, i.condition_code()) as u64;
    v.write_op0(i, 1, c)
}

pub fn cmovcc(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    // The source is read (and may fault) whether or not the move happens.
    let x = v.read_op(i, 1, size)?;
    let r = i.op0_register();
    if condition(v, i.condition_code()) {
        v.set_reg(r, x);
    } else if size == 4 {
        // A 32-bit cmov zero-extends its destination even when false.
        let cur = v.reg(r);
        v.set_reg(r, cur);
    }
    Ok(())
}

/// bound r, m: #BR unless lower <= index <= upper (signed); 32-bit modes only.
pub fn bound(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.op0_register().size() as u32;
    let lin = v.mem_operand(i, size * 2, false)?;
    let lower = sext(v.read_lin(lin, size)?, size);
    let upper = sext(v.read_lin(lin + size as u64, size)?, size);
    let index = sext(v.reg(i.op0_register()), size);
    if index < lower || index > upper {
        return Err(Exception::new(crate::exception::vector::BR));
    }
    Ok(())
}

/// arpl r/m16, r16: raise the destination selector's RPL to the source's
/// (ZF=1), or leave it (ZF=0). Protected mode only.
pub fn arpl(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    let loc = v.dest(i, 2)?;
    let dst = v.read_loc(loc, 2)?;
    let src = v.reg(i.op1_register());
    if dst & 3 < src & 3 {
        v.write_loc(loc, 2, (dst & !3) | (src & 3))?;
        v.set_flag(ZF, true);
    } else {
        v.set_flag(ZF, false);
    }
    Ok(())
}

/// salc (undocumented, 0xd6): AL = CF ? 0xff : 0, as every x86 CPU does outside 64-bit mode.
pub fn salc(v: &mut Vcpu, _i: &Instruction) -> R {
    let al = if v.flag(CF) { 0xff } else { 0 };
    v.set_reg(Register::AL, al);
    Ok(())
}
