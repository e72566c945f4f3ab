//! Near control transfers and the stack: jmp, jcc, call, ret, loop, jcxz,
//! push, pop, pusha, popa, enter, leave (SDM Vol. 1, 6.2-6.5).
//!
//! Far transfers and `pop sreg` load segments and live in `system`.

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use super::access::{is_canonical, operand_bytes, size_mask};
use super::integer::{condition, op_size};
use super::Vcpu;
use crate::cpu::{seg, CpuMode};
use crate::exception::Exception;

type R = Result<(), Exception>;

/// Sets RIP to `target` (already truncated to the operand size), with the
/// checks the branch instruction itself faults on.
#[inline]
pub fn branch_to(v: &mut Vcpu, target: u64) -> R {
    if v.cpu.mode == CpuMode::Long {
        if !is_canonical(target) {
            return Err(Exception::gp0());
        }
    } else if target > v.cpu.seg[seg::CS].limit as u64 {
        return Err(Exception::gp0());
    }
    v.cpu.regs.rip = target;
    Ok(())
}

/// The operand size of a near branch: 8 in 64-bit mode, else from the instruction.
fn branch_size(v: &Vcpu, i: &Instruction) -> u32 {
    match i.op0_kind() {
        OpKind::NearBranch16 => 2,
        OpKind::NearBranch32 => 4,
        OpKind::NearBranch64 => 8,
        _ if v.cpu.mode == CpuMode::Long && op_size(i, 0) != 2 => 8,
        _ => op_size(i, 0),
    }
}

fn target(v: &mut Vcpu, i: &Instruction) -> Result<u64, Exception> {
    match i.op0_kind() {
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => Ok(i.near_branch_target()),
        _ => {
            let size = branch_size(v, i);
            Ok(v.read_op(i, 0, size)? & size_mask(size))
        }
    }
}

pub fn jmp(v: &mut Vcpu, i: &Instruction) -> R {
    let t = target(v, i)?;
    branch_to(v, t)
}

pub fn jcc(v: &mut Vcpu, i: &Instruction) -> R {
    if condition(v, i.condition_code()) {
        branch_to(v, i.near_branch_target())?;
    }
    Ok(())
}

pub fn call(v: &mut Vcpu, i: &Instruction) -> R {
    let t = target(v, i)?;
    let size = (-i.stack_pointer_increment()) as u32;
    let ret = v.cpu.regs.rip;
    // Check the target before pushing, as the CPU does, so a fault leaves RSP intact.
    let saved = v.cpu.regs.rip;
    branch_to(v, t)?;
    v.cpu.regs.rip = saved;
    v.push(ret, size)?;
    v.cpu.regs.rip = t;
    Ok(())
}

pub fn ret(v: &mut Vcpu, i: &Instruction) -> R {
    let size = operand_bytes(v, i);
    let t = v.peek(0, size)? & size_mask(size);
    branch_to(v, t)?;
    let imm = if i.op_count() > 0 { i.immediate16() as u64 } else { 0 };
    let ss = v.cpu.stack_size() as u32;
    let sp = v.cpu.regs.gpr[4].wrapping_add(size as u64 + imm) & size_mask(ss);
    v.set_sp(sp);
    Ok(())
}

/// The count register of loop/jcxz, by address size.
fn counter(i: &Instruction) -> Register {
    match i.code().op_code().address_size() {
        16 => Register::CX,
        32 => Register::ECX,
        _ => Register::RCX,
    }
}

pub fn loop_(v: &mut Vcpu, i: &Instruction) -> R {
    let r = counter(i);
    let c = v.reg(r).wrapping_sub(1) & size_mask(r.size() as u32);
    let zf = v.flag(crate::cpu::rflags::ZF);
    let take = c != 0
        && match i.mnemonic() {
            Mnemonic::Loope => zf,
            Mnemonic::Loopne => !zf,
            _ => true,
        };
    if take {
        branch_to(v, i.near_branch_target())?;
    }
    v.set_reg(r, c);
    Ok(())
}

pub fn jcxz(v: &mut Vcpu, i: &Instruction) -> R {
    if v.reg(counter(i)) == 0 {
        branch_to(v, i.near_branch_target())?;
    }
    Ok(())
}

pub fn push(v: &mut Vcpu, i: &Instruction) -> R {
    let size = (-i.stack_pointer_increment()) as u32;
    match i.op0_kind() {
        OpKind::Register if i.op0_register().is_segment_register() => {
            let sel = v.reg(i.op0_register());
            // Recent CPUs write only the 16-bit selector, leaving the rest of the slot.
            let ss = v.cpu.stack_size() as u32;
            let new = v.cpu.regs.gpr[4].wrapping_sub(size as u64) & size_mask(ss);
            v.write_mem(seg::SS, new, 2, sel)?;
            v.set_sp(new);
            Ok(())
        }
        OpKind::Register => {
            let x = v.reg(i.op0_register());
            v.push(x, size)
        }
        OpKind::Memory => {
            let x = v.read_op(i, 0, size)?;
            v.push(x, size)
        }
        _ => {
            let x = i.immediate(0) & size_mask(size);
            v.push(x, size)
        }
    }
}

pub fn pop(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.stack_pointer_increment() as u32;
    let x = v.peek(0, size)?;
    let ss = v.cpu.stack_size() as u32;
    let new_sp = v.cpu.regs.gpr[4].wrapping_add(size as u64) & size_mask(ss);
    match i.op0_kind() {
        OpKind::Register => {
            v.set_sp(new_sp);
            v.set_reg(i.op0_register(), x);
        }
        _ => {
            // The address of `pop [rsp+...]` is computed after RSP is incremented.
            let old = v.cpu.regs.gpr[4];
            v.set_sp(new_sp);
            if let Err(e) = v.write_op0(i, size, x) {
                v.cpu.regs.gpr[4] = old;
                return Err(e);
            }
        }
    }
    Ok(())
}

pub fn pusha(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode == CpuMode::Long {
        return Err(Exception::ud());
    }
    let size = if i.mnemonic() == Mnemonic::Pushad { 4 } else { 2 };
    let old = v.cpu.regs.gpr;
    for r in 0..8 {
        if let Err(e) = v.push(old[r] & size_mask(size), size) {
            v.cpu.regs.gpr = old;
            return Err(e);
        }
    }
    Ok(())
}

pub fn popa(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode == CpuMode::Long {
        return Err(Exception::ud());
    }
    let size = if i.mnemonic() == Mnemonic::Popad { 4 } else { 2 };
    let mut vals = [0u64; 8];
    for (k, slot) in vals.iter_mut().enumerate() {
        *slot = v.peek((k as u64) * size as u64, size)?;
    }
    let regs: [Register; 8] = if size == 4 {
        [Register::EDI, Register::ESI, Register::EBP, Register::None, Register::EBX, Register::EDX, Register::ECX, Register::EAX]
    } else {
        [Register::DI, Register::SI, Register::BP, Register::None, Register::BX, Register::DX, Register::CX, Register::AX]
    };
    let ss = v.cpu.stack_size() as u32;
    let sp = v.cpu.regs.gpr[4].wrapping_add(8 * size as u64) & size_mask(ss);
    v.set_sp(sp);
    for (r, x) in regs.iter().zip(vals) {
        if *r != Register::None {
            v.set_reg(*r, x);
        }
    }
    Ok(())
}

pub fn enter(v: &mut Vcpu, i: &Instruction) -> R {
    let size = operand_bytes(v, i);
    let alloc = i.immediate16() as u64;
    let level = (i.immediate8_2nd() & 31) as u64;
    let ss = v.cpu.stack_size() as u32;
    let old = v.cpu.regs.gpr;
    let res = (|| {
        let bp = v.cpu.regs.gpr[5];
        v.push(bp & size_mask(size), size)?;
        let frame = v.cpu.regs.gpr[4];
        let mut bp_walk = bp;
        for _ in 1..level {
            bp_walk = bp_walk.wrapping_sub(size as u64) & size_mask(ss);
            let x = v.read_mem(seg::SS, bp_walk, size)?;
            v.push(x, size)?;
        }
        if level > 0 {
            v.push(frame & size_mask(size), size)?;
        }
        let sp = v.cpu.regs.gpr[4].wrapping_sub(alloc) & size_mask(ss);
        // The final stack pointer must be writable, as hardware checks.
        if alloc > 0 {
            v.linear(seg::SS, sp, 1, true)?;
        }
        let bp_reg = match size {
            2 => Register::BP,
            4 => Register::EBP,
            _ => Register::RBP,
        };
        v.set_reg(bp_reg, frame);
        v.set_sp(sp);
        Ok(())
    })();
    if res.is_err() {
        v.cpu.regs.gpr = old;
    }
    res
}

pub fn leave(v: &mut Vcpu, i: &Instruction) -> R {
    let size = operand_bytes(v, i);
    let ss = v.cpu.stack_size() as u32;
    let bp = v.cpu.regs.gpr[5] & size_mask(ss);
    let x = v.read_mem(seg::SS, bp, size)?;
    v.set_sp(bp.wrapping_add(size as u64));
    let bp_reg = match size {
        2 => Register::BP,
        4 => Register::EBP,
        _ => Register::RBP,
    };
    v.set_reg(bp_reg, x);
    Ok(())
}
