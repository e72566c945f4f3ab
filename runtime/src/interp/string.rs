//! String instructions with rep/repe/repne and DF, in all sizes and address
//! sizes (SDM Vol. 1, 7.3.9; Vol. 2, "REP/REPE/REPZ/REPNE/REPNZ").
//!
//! A rep loop runs at most [`CHUNK`] iterations per dispatch and then
//! restarts itself (RIP stays on the instruction), so interrupts are taken
//! between iterations as on hardware. After a fault the registers reflect
//! the iterations completed, which is what makes the restart precise.

use iced_x86::{Instruction, OpKind, Register};

use super::access::{seg_index, size_mask};
use super::alu;
use super::Vcpu;
use crate::cpu::rflags::{AF, CF, OF, PF, SF, ZF};
use crate::cpu::seg;
use crate::exception::Exception;

type R = Result<(), Exception>;

pub const CHUNK: u64 = 16384;

/// Registers and address size of a string instruction.
#[derive(Clone, Copy)]
pub struct StringRegs {
    pub si: Register,
    pub di: Register,
    pub cx: Register,
    pub amask: u64,
}

pub fn string_regs(i: &Instruction) -> StringRegs {
    let bits = (0..i.op_count())
        .find_map(|k| match i.op_kind(k) {
            OpKind::MemorySegSI | OpKind::MemoryESDI => Some(16),
            OpKind::MemorySegESI | OpKind::MemoryESEDI => Some(32),
            OpKind::MemorySegRSI | OpKind::MemoryESRDI => Some(64),
            _ => None,
        })
        .unwrap_or(64);
    match bits {
        16 => StringRegs { si: Register::SI, di: Register::DI, cx: Register::CX, amask: 0xffff },
        32 => StringRegs { si: Register::ESI, di: Register::EDI, cx: Register::ECX, amask: 0xffff_ffff },
        _ => StringRegs { si: Register::RSI, di: Register::RDI, cx: Register::RCX, amask: u64::MAX },
    }
}

/// Element size in bytes.
pub fn elem_size(i: &Instruction) -> u32 {
    i.memory_size().size() as u32
}

/// What one iteration asks of the loop.
pub enum Step {
    Continue,
    /// For repe/repne: the ZF condition ended the loop.
    Stop,
}

/// Runs a string instruction: once, or under rep as the prefix says.
/// `body` performs one iteration and advances SI/DI itself.
pub fn run_string(v: &mut Vcpu, i: &Instruction, mut body: impl FnMut(&mut Vcpu) -> Result<Step, Exception>) -> R {
    let rep = i.has_rep_prefix() || i.has_repne_prefix();
    if !rep {
        body(v)?;
        return Ok(());
    }
    let r = string_regs(i);
    let mut n = 0;
    loop {
        let count = v.reg(r.cx);
        if count == 0 {
            return Ok(());
        }
        if n == CHUNK {
            // Leave RIP on this instruction: it resumes after pending events.
            v.cpu.regs.rip = i.ip();
            v.block_break = true;
            return Ok(());
        }
        let step = body(v)?;
        v.set_reg(r.cx, count.wrapping_sub(1));
        n += 1;
        if matches!(step, Step::Stop) {
            return Ok(());
        }
    }
}

#[inline]
fn advance(v: &mut Vcpu, reg: Register, amask: u64, size: u32) {
    let x = v.reg(reg);
    let y = if v.df() { x.wrapping_sub(size as u64) } else { x.wrapping_add(size as u64) } & amask;
    v.set_reg(reg, y);
}

/// Source operand segment (DS, overridable).
fn src_seg(i: &Instruction) -> usize {
    seg_index(i.memory_segment())
}

pub fn movs(v: &mut Vcpu, i: &Instruction) -> R {
    let r = string_regs(i);
    let size = elem_size(i);
    let sseg = src_seg(i);
    if i.has_rep_prefix() && !v.df() && fast_movs(v, i, r, size, sseg)? {
        return Ok(());
    }
    run_string(v, i, |v| {
        let si = v.reg(r.si) & r.amask;
        let di = v.reg(r.di) & r.amask;
        let x = v.read_mem(sseg, si, size)?;
        v.write_mem(seg::ES, di, size, x)?;
        advance(v, r.si, r.amask, size);
        advance(v, r.di, r.amask, size);
        Ok(Step::Continue)
    })
}

/// The elements a bulk rep loop has left, or `None` when it is finished:
/// the count is 0, or `done` elements used up its share, and RIP is left on
/// the instruction to resume after pending events.
fn bulk_count(v: &mut Vcpu, i: &Instruction, r: StringRegs, done: u64) -> Option<u64> {
    let count = v.reg(r.cx);
    if count == 0 {
        return None;
    }
    if done >= CHUNK * 8 {
        v.cpu.regs.rip = i.ip();
        v.block_break = true;
        return None;
    }
    Some(count)
}

/// Bulk forward `rep movs` within single pages of RAM, through the TLB.
/// Returns false when the rest must go through the generic loop, which then
/// continues from the registers as this left them.
fn fast_movs(v: &mut Vcpu, i: &Instruction, r: StringRegs, size: u32, sseg: usize) -> Result<bool, Exception> {
    let mut done = 0u64;
    loop {
        let Some(count) = bulk_count(v, i, r, done) else { return Ok(true) };
        let si = v.reg(r.si) & r.amask;
        let di = v.reg(r.di) & r.amask;
        let (Ok(sl), Ok(dl)) = (v.linear(sseg, si, size, false), v.linear(seg::ES, di, size, true)) else {
            return Ok(false);
        };
        let room = (0x1000 - (sl & 0xfff)).min(0x1000 - (dl & 0xfff)) / size as u64;
        let n = room.min(count);
        let user = v.user();
        let pages = match n {
            // The next element straddles a page boundary.
            0 => None,
            _ => v.tlb.lookup(sl, crate::mmu::Access::Read, user).zip(v.tlb.lookup(dl, crate::mmu::Access::Write, user)),
        };
        let Some((src, dst)) = pages else {
            // Take one slow element (it straddles two pages, or fills the
            // TLB, or faults precisely), then go on in bulk.
            let x = v.read_lin(sl, size)?;
            v.write_lin(dl, size, x)?;
            advance(v, r.si, r.amask, size);
            advance(v, r.di, r.amask, size);
            v.set_reg(r.cx, count - 1);
            done += 1;
            continue;
        };
        if (si + n * size as u64) > r.amask || (di + n * size as u64) > r.amask {
            return Ok(false);
        }
        let bytes = (n * size as u64) as usize;
        // A forward copy onto an overlapping later destination repeats the
        // pattern element by element: leave that to the generic loop.
        if dst > src && dst < src + bytes as u64 {
            return Ok(false);
        }
        // SAFETY: both ranges lie within one RAM page each (bounded by
        // `room`), which the TLB entries map; overlap is handled by `copy`
        // exactly as a forward element loop would when dst <= src.
        unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
        v.set_reg(r.si, si + bytes as u64);
        v.set_reg(r.di, di + bytes as u64);
        v.set_reg(r.cx, count - n);
        done += n;
    }
}

pub fn stos(v: &mut Vcpu, i: &Instruction) -> R {
    let r = string_regs(i);
    let size = elem_size(i);
    let x = v.cpu.regs.gpr[0] & size_mask(size);
    if i.has_rep_prefix() && !v.df() && fast_stos(v, i, r, size, x)? {
        return Ok(());
    }
    run_string(v, i, |v| {
        let di = v.reg(r.di) & r.amask;
        v.write_mem(seg::ES, di, size, x)?;
        advance(v, r.di, r.amask, size);
        Ok(Step::Continue)
    })
}

/// Bulk forward `rep stos` within single pages of RAM, through the TLB (a
/// page holding code has no write entry, so its stores take the generic
/// path, which invalidates the code). Returns false when the rest must go
/// through the generic loop, which continues from the registers as this
/// left them.
fn fast_stos(v: &mut Vcpu, i: &Instruction, r: StringRegs, size: u32, x: u64) -> Result<bool, Exception> {
    let pattern = &x.to_le_bytes()[..size as usize];
    let mut done = 0u64;
    loop {
        let Some(count) = bulk_count(v, i, r, done) else { return Ok(true) };
        let di = v.reg(r.di) & r.amask;
        let Ok(dl) = v.linear(seg::ES, di, size, true) else {
            return Ok(false);
        };
        let n = ((0x1000 - (dl & 0xfff)) / size as u64).min(count);
        // An element straddling a page boundary has no single entry.
        let dst = if n == 0 { None } else { v.tlb.lookup(dl, crate::mmu::Access::Write, v.user()) };
        let Some(dst) = dst else {
            // One slow element (it straddles two pages, or fills the TLB,
            // or faults precisely), then go on in bulk.
            v.write_lin(dl, size, x)?;
            advance(v, r.di, r.amask, size);
            v.set_reg(r.cx, count - 1);
            done += 1;
            continue;
        };
        if di + n * size as u64 > r.amask {
            return Ok(false);
        }
        let bytes = (n * size as u64) as usize;
        // SAFETY: the range lies within one RAM page (bounded by the room
        // left in the page), which the TLB's write entry maps.
        unsafe {
            if pattern.iter().all(|&b| b == pattern[0]) {
                std::ptr::write_bytes(dst as *mut u8, pattern[0], bytes);
            } else {
                for k in 0..n as usize {
                    std::ptr::copy_nonoverlapping(pattern.as_ptr(), (dst as *mut u8).add(k * size as usize), size as usize);
                }
            }
        }
        v.set_reg(r.di, di + bytes as u64);
        v.set_reg(r.cx, count - n);
        done += n;
    }
}

pub fn lods(v: &mut Vcpu, i: &Instruction) -> R {
    let r = string_regs(i);
    let size = elem_size(i);
    let sseg = src_seg(i);
    let acc = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    run_string(v, i, |v| {
        let si = v.reg(r.si) & r.amask;
        let x = v.read_mem(sseg, si, size)?;
        v.set_reg(acc, x);
        advance(v, r.si, r.amask, size);
        Ok(Step::Continue)
    })
}

fn rep_condition(v: &Vcpu, i: &Instruction) -> Step {
    let zf = v.flag(ZF);
    let stop = (i.has_repe_prefix() && !zf) || (i.has_repne_prefix() && zf);
    if stop { Step::Stop } else { Step::Continue }
}

pub fn cmps(v: &mut Vcpu, i: &Instruction) -> R {
    let r = string_regs(i);
    let size = elem_size(i);
    let sseg = src_seg(i);
    run_string(v, i, |v| {
        let si = v.reg(r.si) & r.amask;
        let di = v.reg(r.di) & r.amask;
        let a = v.read_mem(sseg, si, size)?;
        let b = v.read_mem(seg::ES, di, size)?;
        let (_, f) = alu::sub(size, a, b, 0);
        v.set_arith(CF | PF | AF | ZF | SF | OF, f);
        advance(v, r.si, r.amask, size);
        advance(v, r.di, r.amask, size);
        Ok(rep_condition(v, i))
    })
}

pub fn scas(v: &mut Vcpu, i: &Instruction) -> R {
    let r = string_regs(i);
    let size = elem_size(i);
    let a = v.cpu.regs.gpr[0] & size_mask(size);
    run_string(v, i, |v| {
        let di = v.reg(r.di) & r.amask;
        let b = v.read_mem(seg::ES, di, size)?;
        let (_, f) = alu::sub(size, a, b, 0);
        v.set_arith(CF | PF | AF | ZF | SF | OF, f);
        advance(v, r.di, r.amask, size);
        Ok(rep_condition(v, i))
    })
}

/// Used by `ins`/`outs` in `system`: advance SI or DI by one element.
pub fn advance_reg(v: &mut Vcpu, reg: Register, amask: u64, size: u32) {
    advance(v, reg, amask, size);
}

