//! Specialised handlers for the most frequent instruction forms.
//!
//! The generic handlers in `integer` look at operand kinds on every
//! execution; these are chosen once at decode time for one form (register,
//! immediate or memory operands) so the hot loop does no such matching.
//! Semantics are identical: the differential tests run both.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::access::{size_mask, REG_INFO};
use super::alu;
use super::{Handler, Vcpu};
use crate::cpu::rflags::{AF, CF, OF, PF, SF, ZF};
use crate::exception::Exception;

type R = Result<(), Exception>;
const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

const ADD: u8 = 0;
const OR: u8 = 1;
const ADC: u8 = 2;
const SBB: u8 = 3;
const AND: u8 = 4;
const SUB: u8 = 5;
const XOR: u8 = 6;
const CMP: u8 = 7;
const TEST: u8 = 8;

#[inline(always)]
fn compute<const OP: u8>(v: &Vcpu, size: u32, a: u64, b: u64) -> (u64, u64) {
    let cf = v.cpu.regs.rflags & CF;
    match OP {
        ADD => alu::add(size, a, b, 0),
        ADC => alu::add(size, a, b, cf),
        SUB | CMP => alu::sub(size, a, b, 0),
        SBB => alu::sub(size, a, b, cf),
        AND | TEST => alu::logic(size, a & b),
        OR => alu::logic(size, a | b),
        _ => alu::logic(size, a ^ b),
    }
}

#[inline(always)]
const fn writes(op: u8) -> bool {
    op != CMP && op != TEST
}

#[inline(always)]
fn reg_size(r: iced_x86::Register) -> u32 {
    match REG_INFO[r as usize].kind {
        super::access::RegKind::W64 => 8,
        super::access::RegKind::W32 => 4,
        super::access::RegKind::W16 => 2,
        _ => 1,
    }
}

fn alu_rr<const OP: u8>(v: &mut Vcpu, i: &Instruction) -> R {
    let (d, s) = (i.op0_register(), i.op1_register());
    let size = reg_size(d);
    let (r, f) = compute::<OP>(v, size, v.reg(d), v.reg(s));
    if writes(OP) {
        v.set_reg(d, r);
    }
    v.set_arith(ARITH, f);
    Ok(())
}

fn alu_ri<const OP: u8>(v: &mut Vcpu, i: &Instruction) -> R {
    let d = i.op0_register();
    let size = reg_size(d);
    let (r, f) = compute::<OP>(v, size, v.reg(d), i.immediate(1) & size_mask(size));
    if writes(OP) {
        v.set_reg(d, r);
    }
    v.set_arith(ARITH, f);
    Ok(())
}

fn alu_rm<const OP: u8>(v: &mut Vcpu, i: &Instruction) -> R {
    let d = i.op0_register();
    let size = reg_size(d);
    let lin = v.mem_operand(i, size, false)?;
    let b = v.read_lin(lin, size)?;
    let (r, f) = compute::<OP>(v, size, v.reg(d), b);
    if writes(OP) {
        v.set_reg(d, r);
    }
    v.set_arith(ARITH, f);
    Ok(())
}

/// Memory destination with a register or immediate source.
fn alu_m<const OP: u8, const IMM: bool>(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.memory_size().size() as u32;
    let lin = v.mem_operand(i, size, writes(OP))?;
    if writes(OP) {
        v.probe_write(lin, size)?;
    }
    let a = v.read_lin(lin, size)?;
    let b = if IMM { i.immediate(1) & size_mask(size) } else { v.reg(i.op1_register()) };
    let (r, f) = compute::<OP>(v, size, a, b);
    if writes(OP) {
        v.write_lin(lin, size, r)?;
    }
    v.set_arith(ARITH, f);
    Ok(())
}

fn mov_rr(v: &mut Vcpu, i: &Instruction) -> R {
    let x = v.reg(i.op1_register());
    v.set_reg(i.op0_register(), x);
    Ok(())
}

fn mov_ri(v: &mut Vcpu, i: &Instruction) -> R {
    v.set_reg(i.op0_register(), i.immediate(1));
    Ok(())
}

fn mov_rm(v: &mut Vcpu, i: &Instruction) -> R {
    let d = i.op0_register();
    let size = reg_size(d);
    let lin = v.mem_operand(i, size, false)?;
    let x = v.read_lin(lin, size)?;
    v.set_reg(d, x);
    Ok(())
}

fn mov_m<const IMM: bool>(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.memory_size().size() as u32;
    let lin = v.mem_operand(i, size, true)?;
    let x = if IMM { i.immediate(1) & size_mask(size) } else { v.reg(i.op1_register()) };
    v.write_lin(lin, size, x)
}

fn incdec_r<const INC: bool>(v: &mut Vcpu, i: &Instruction) -> R {
    let d = i.op0_register();
    let size = reg_size(d);
    let (r, f) = if INC { alu::inc(size, v.reg(d)) } else { alu::dec(size, v.reg(d)) };
    v.set_reg(d, r);
    v.set_arith(ARITH & !CF, f);
    Ok(())
}

fn is_gpr(r: iced_x86::Register) -> bool {
    matches!(
        REG_INFO[r as usize].kind,
        super::access::RegKind::Low8 | super::access::RegKind::High8 | super::access::RegKind::W16
            | super::access::RegKind::W32 | super::access::RegKind::W64
    )
}

fn is_imm(k: OpKind) -> bool {
    matches!(
        k,
        OpKind::Immediate8 | OpKind::Immediate16 | OpKind::Immediate32 | OpKind::Immediate64
            | OpKind::Immediate8to16 | OpKind::Immediate8to32 | OpKind::Immediate8to64
            | OpKind::Immediate32to64
    )
}

macro_rules! alu_forms {
    ($op:expr, $k0:expr, $k1:expr, $r0:expr, $r1:expr) => {
        match ($k0, $k1) {
            (OpKind::Register, OpKind::Register) if is_gpr($r0) && is_gpr($r1) => Some(alu_rr::<{ $op }> as Handler),
            (OpKind::Register, k) if is_gpr($r0) && is_imm(k) => Some(alu_ri::<{ $op }> as Handler),
            (OpKind::Register, OpKind::Memory) if is_gpr($r0) => Some(alu_rm::<{ $op }> as Handler),
            (OpKind::Memory, OpKind::Register) if is_gpr($r1) => Some(alu_m::<{ $op }, false> as Handler),
            (OpKind::Memory, k) if is_imm(k) => Some(alu_m::<{ $op }, true> as Handler),
            _ => None,
        }
    };
}

/// A specialised handler for `i`'s form, if there is one.
pub(crate) fn handler(i: &Instruction) -> Option<Handler> {
    if i.op_count() == 0 {
        return None;
    }
    let (k0, r0) = (i.op0_kind(), i.op0_register());
    let (k1, r1) = if i.op_count() > 1 { (i.op1_kind(), i.op1_register()) } else { (OpKind::Register, iced_x86::Register::None) };
    match i.mnemonic() {
        Mnemonic::Add if i.op_count() == 2 => alu_forms!(ADD, k0, k1, r0, r1),
        Mnemonic::Or if i.op_count() == 2 => alu_forms!(OR, k0, k1, r0, r1),
        Mnemonic::Adc if i.op_count() == 2 => alu_forms!(ADC, k0, k1, r0, r1),
        Mnemonic::Sbb if i.op_count() == 2 => alu_forms!(SBB, k0, k1, r0, r1),
        Mnemonic::And if i.op_count() == 2 => alu_forms!(AND, k0, k1, r0, r1),
        Mnemonic::Sub if i.op_count() == 2 => alu_forms!(SUB, k0, k1, r0, r1),
        Mnemonic::Xor if i.op_count() == 2 => alu_forms!(XOR, k0, k1, r0, r1),
        Mnemonic::Cmp if i.op_count() == 2 => alu_forms!(CMP, k0, k1, r0, r1),
        Mnemonic::Test if i.op_count() == 2 => alu_forms!(TEST, k0, k1, r0, r1),
        Mnemonic::Mov if i.op_count() == 2 => match (k0, k1) {
            (OpKind::Register, OpKind::Register) if is_gpr(r0) && is_gpr(r1) => Some(mov_rr as Handler),
            (OpKind::Register, k) if is_gpr(r0) && is_imm(k) => Some(mov_ri as Handler),
            (OpKind::Register, OpKind::Memory) if is_gpr(r0) => Some(mov_rm as Handler),
            (OpKind::Memory, OpKind::Register) if is_gpr(r1) => Some(mov_m::<false> as Handler),
            (OpKind::Memory, k) if is_imm(k) => Some(mov_m::<true> as Handler),
            _ => None,
        },
        Mnemonic::Inc if k0 == OpKind::Register && is_gpr(r0) => Some(incdec_r::<true> as Handler),
        Mnemonic::Dec if k0 == OpKind::Register && is_gpr(r0) => Some(incdec_r::<false> as Handler),
        _ => None,
    }
}
