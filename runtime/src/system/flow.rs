//! Software interrupts, iret, far transfers and segment-register loads
//! (SDM Vol. 2: INT n/INTO/INT3, IRET, JMP/CALL/RET far, MOV/POP Sreg, LDS).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::interrupt::{software_interrupt, Source};
use super::segment::{load_cs, load_data_segment, read_descriptor, Descriptor};
use crate::cpu::{rflags, seg, CpuMode, Segment};
use crate::exception::{selector_error, vector, Exception};
use crate::interp::access::{is_canonical, operand_bytes, seg_index, size_mask};
use crate::interp::Vcpu;

type R = Result<(), Exception>;

pub fn int_n(v: &mut Vcpu, i: &Instruction) -> R {
    software_interrupt(v, i.immediate8(), Source::Software)
}

pub fn int3(v: &mut Vcpu, _i: &Instruction) -> R {
    software_interrupt(v, vector::BP, Source::SoftwareException)
}

pub fn into(v: &mut Vcpu, _i: &Instruction) -> R {
    if v.flag(rflags::OF) {
        return software_interrupt(v, vector::OF, Source::SoftwareException);
    }
    Ok(())
}

/// `int1` (icebp): a #DB trap delivered like a hardware exception.
pub fn int1(v: &mut Vcpu, _i: &Instruction) -> R {
    v.stats.count_software_interrupt(vector::DB);
    super::interrupt::deliver(v, vector::DB, Source::Exception, None)
}

/// mov sreg, r/m and mov r/m, sreg.
pub fn mov_sreg(v: &mut Vcpu, i: &Instruction) -> R {
    if i.op0_register().is_segment_register() {
        let sreg = seg_index(i.op0_register());
        if sreg == seg::CS {
            return Err(Exception::ud());
        }
        let sel = v.read_op(i, 1, 2)? as u16;
        load_data_segment(v, sreg, sel)?;
        if sreg == seg::SS {
            v.cpu.interrupt_shadow = true;
        }
        v.block_break = true;
        Ok(())
    } else {
        let sel = v.cpu.seg[seg_index(i.op1_register())].selector as u64;
        if i.op0_kind() == OpKind::Register {
            // A register destination is zero-extended to the operand size.
            let r = i.op0_register();
            let x = if r.size() == 2 { sel } else { sel & 0xffff };
            v.set_reg(r, x);
            Ok(())
        } else {
            v.write_op0(i, 2, sel)
        }
    }
}

pub fn pop_sreg(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.stack_pointer_increment() as u32;
    let sel = v.peek(0, size)? as u16;
    let sreg = seg_index(i.op0_register());
    load_data_segment(v, sreg, sel)?;
    let ss = v.cpu.stack_size() as u32;
    let sp = v.cpu.regs.gpr[4].wrapping_add(size as u64) & size_mask(ss);
    v.set_sp(sp);
    if sreg == seg::SS {
        v.cpu.interrupt_shadow = true;
    }
    v.block_break = true;
    Ok(())
}

/// lds/les/lfs/lgs/lss r, m16:16|m16:32|m16:64.
pub fn load_far_pointer(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.op0_register().size() as u32;
    let lin = v.mem_operand(i, size + 2, false)?;
    let off = v.read_lin(lin, size)?;
    let sel = v.read_lin(lin + size as u64, 2)? as u16;
    let sreg = match i.mnemonic() {
        Mnemonic::Lds => seg::DS,
        Mnemonic::Les => seg::ES,
        Mnemonic::Lfs => seg::FS,
        Mnemonic::Lgs => seg::GS,
        _ => seg::SS,
    };
    load_data_segment(v, sreg, sel)?;
    v.set_reg(i.op0_register(), off);
    v.block_break = true;
    Ok(())
}

/// The far target of jmp/call: selector and offset.
fn far_target(v: &mut Vcpu, i: &Instruction) -> Result<(u16, u64), Exception> {
    match i.op0_kind() {
        OpKind::FarBranch16 | OpKind::FarBranch32 => Ok((i.far_branch_selector(), i.far_branch32() as u64)),
        _ => {
            let size = (i.memory_size().size() - 2) as u32;
            let lin = v.mem_operand(i, size + 2, false)?;
            let off = v.read_lin(lin, size)?;
            let sel = v.read_lin(lin + size as u64, 2)? as u16;
            Ok((sel, off))
        }
    }
}

/// Checks a code-segment target of a far jmp/call at the current privilege.
/// Call gates and task switches are not supported: they raise #GP and are counted.
fn check_far_code(v: &mut Vcpu, sel: u16) -> Result<Descriptor, Exception> {
    if sel & 0xfffc == 0 {
        return Err(Exception::gp0());
    }
    let err = selector_error(sel);
    let d = read_descriptor(v, sel)?;
    if !d.is_code_data() {
        v.stats.count_unimplemented("far transfer through a gate or TSS");
        return Err(Exception::gp(err));
    }
    let cpl = v.cpu.cpl;
    let rpl = (sel & 3) as u8;
    let ok = d.is_code()
        && if d.is_conforming_code() { d.dpl() <= cpl } else { rpl <= cpl && d.dpl() == cpl };
    if !ok {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::np(err));
    }
    Ok(d)
}

fn real_mode_cs(v: &mut Vcpu, sel: u16, off: u64) {
    let cs = &mut v.cpu.seg[seg::CS];
    cs.selector = sel;
    cs.base = (sel as u64) << 4;
    v.cpu.regs.rip = off & 0xffff_ffff;
    v.block_break = true;
}

/// Verifies the new RIP fits the new CS (limit, or canonical in 64-bit code).
fn check_target(d: &Descriptor, sel: u16, off: u64, lma: bool) -> R {
    let s = d.to_segment(sel);
    if lma && s.long() {
        if !is_canonical(off) {
            return Err(Exception::gp0());
        }
    } else if off > s.limit as u64 {
        return Err(Exception::gp0());
    }
    Ok(())
}

pub fn far_jmp(v: &mut Vcpu, i: &Instruction) -> R {
    let (sel, off) = far_target(v, i)?;
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        real_mode_cs(v, sel, off);
        return Ok(());
    }
    let d = check_far_code(v, sel)?;
    let lma = v.cpu.efer & crate::cpu::efer::LMA != 0;
    let off = if d.to_segment(sel).long() && lma { off } else { off & 0xffff_ffff };
    check_target(&d, sel, off, lma)?;
    let cpl = v.cpu.cpl;
    load_cs(v, sel, &d, cpl);
    v.cpu.regs.rip = off;
    Ok(())
}

pub fn far_call(v: &mut Vcpu, i: &Instruction) -> R {
    let (sel, off) = far_target(v, i)?;
    let size = operand_bytes(v, i);
    let old_cs = v.cpu.seg[seg::CS].selector as u64;
    let old_rip = v.cpu.regs.rip;
    let old_sp = v.cpu.regs.gpr[4];
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        v.push(old_cs, size)?;
        if let Err(e) = v.push(old_rip, size) {
            v.cpu.regs.gpr[4] = old_sp;
            return Err(e);
        }
        real_mode_cs(v, sel, off & size_mask(size));
        return Ok(());
    }
    let d = check_far_code(v, sel)?;
    let lma = v.cpu.efer & crate::cpu::efer::LMA != 0;
    let off = if d.to_segment(sel).long() && lma { off } else { off & size_mask(size.min(4)) };
    check_target(&d, sel, off, lma)?;
    let r = v.push(old_cs, size).and_then(|_| v.push(old_rip, size));
    if let Err(e) = r {
        v.cpu.regs.gpr[4] = old_sp;
        return Err(e);
    }
    let cpl = v.cpu.cpl;
    load_cs(v, sel, &d, cpl);
    v.cpu.regs.rip = off;
    Ok(())
}

pub fn far_ret(v: &mut Vcpu, i: &Instruction) -> R {
    let size = operand_bytes(v, i);
    let imm = if i.op_count() > 0 { i.immediate16() as u64 } else { 0 };
    let off = v.peek(0, size)? & size_mask(size);
    let sel = v.peek(size as u64, size)? as u16;
    let ssz = v.cpu.stack_size() as u32;
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        let sp = v.cpu.regs.gpr[4].wrapping_add(2 * size as u64 + imm) & size_mask(ssz);
        v.set_sp(sp);
        real_mode_cs(v, sel, off);
        return Ok(());
    }
    if sel & 0xfffc == 0 {
        return Err(Exception::gp0());
    }
    let err = selector_error(sel);
    let d = read_descriptor(v, sel)?;
    let cpl = v.cpu.cpl;
    let rpl = (sel & 3) as u8;
    if rpl < cpl || !d.is_code() || (d.is_conforming_code() && d.dpl() > rpl) || (!d.is_conforming_code() && d.dpl() != rpl) {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::np(err));
    }
    let lma = v.cpu.efer & crate::cpu::efer::LMA != 0;
    check_target(&d, sel, off, lma)?;
    if rpl > cpl {
        // Return to an outer privilege level: SS:RSP follow on the stack.
        let base = 2 * size as u64 + imm;
        let new_sp = v.peek(base, size)?;
        let ss_sel = v.peek(base + size as u64, size)? as u16;
        let ss = outer_ss(v, ss_sel, rpl)?;
        load_cs(v, sel, &d, rpl);
        load_outer_stack(v, ss_sel, ss, new_sp.wrapping_add(imm), size);
        null_inaccessible_segments(v);
    } else {
        let sp = v.cpu.regs.gpr[4].wrapping_add(2 * size as u64 + imm) & size_mask(ssz);
        v.set_sp(sp);
        load_cs(v, sel, &d, cpl);
    }
    v.cpu.regs.rip = off;
    Ok(())
}

/// Checks the SS selector popped when returning to privilege `rpl`.
fn outer_ss(v: &mut Vcpu, sel: u16, rpl: u8) -> Result<Option<Descriptor>, Exception> {
    if sel & 0xfffc == 0 {
        // A null SS is allowed returning to 64-bit code at CPL < 3.
        if v.cpu.efer & crate::cpu::efer::LMA != 0 && rpl != 3 && (sel & 3) as u8 == rpl {
            return Ok(None);
        }
        return Err(Exception::gp0());
    }
    let err = selector_error(sel);
    let d = read_descriptor(v, sel)?;
    if (sel & 3) as u8 != rpl || d.dpl() != rpl || !d.is_writable_data() {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::ss(err));
    }
    Ok(Some(d))
}

fn load_outer_stack(v: &mut Vcpu, sel: u16, ss: Option<Descriptor>, sp: u64, size: u32) {
    match ss {
        Some(d) => super::segment::load_ss(v, sel, &d),
        None => {
            let mut s = super::segment::null_segment(sel);
            s.attr = (0x93 | Segment::ATTR_DB | ((sel & 3) << Segment::ATTR_DPL_SHIFT)) & !Segment::ATTR_P;
            v.cpu.seg[seg::SS] = s;
        }
    }
    let big = v.cpu.long_mode() || v.cpu.seg[seg::SS].default_big();
    let sp = sp & size_mask(size);
    v.cpu.regs.gpr[4] = if v.cpu.long_mode() { sp } else if big { sp & 0xffff_ffff } else { (v.cpu.regs.gpr[4] & !0xffff) | (sp & 0xffff) };
}

/// After a return to an outer level, data segments the new CPL may not use are nulled.
fn null_inaccessible_segments(v: &mut Vcpu) {
    let cpl = v.cpu.cpl;
    for s in [seg::ES, seg::DS, seg::FS, seg::GS] {
        let sg = v.cpu.seg[s];
        let conforming_code = sg.seg_type() & 0xc == 0xc && sg.attr & Segment::ATTR_S != 0;
        if sg.dpl() < cpl && !conforming_code {
            let keep_base = v.cpu.long_mode() && s >= seg::FS;
            let base = sg.base;
            v.cpu.seg[s] = super::segment::null_segment(0);
            if keep_base {
                v.cpu.seg[s].base = base;
            }
        }
    }
}

/// iret/iretd/iretq in real, protected and long mode (task returns through
/// NT and returns to virtual-8086 mode are not supported: #GP, counted).
pub fn iret(v: &mut Vcpu, i: &Instruction) -> R {
    let size = operand_bytes(v, i);
    match v.cpu.mode {
        CpuMode::Real => iret_real(v, size),
        CpuMode::Long | CpuMode::Compat => iret_protected(v, size, true),
        CpuMode::Protected => iret_protected(v, size, false),
        CpuMode::Virtual8086 => {
            if v.cpu.iopl() < 3 {
                return Err(Exception::gp0());
            }
            iret_real(v, size)
        }
    }?;
    v.block_break = true;
    // Unlike sti, iret has no interrupt shadow: an interrupt the restored IF
    // allows is taken before the next instruction.
    Ok(())
}

fn iret_real(v: &mut Vcpu, size: u32) -> R {
    let ip = v.peek(0, size)?;
    let cs = v.peek(size as u64, size)? as u16;
    let fl = v.peek(2 * size as u64, size)?;
    let ssz = v.cpu.stack_size() as u32;
    let sp = v.cpu.regs.gpr[4].wrapping_add(3 * size as u64) & size_mask(ssz);
    v.set_sp(sp);
    real_mode_cs(v, cs, ip & size_mask(size));
    let mut mask = rflags::ARITH | rflags::TF | rflags::IF | rflags::DF | rflags::NT;
    if v.cpu.mode == CpuMode::Real {
        mask |= rflags::IOPL;
    }
    if size == 4 {
        mask |= rflags::AC | rflags::ID | rflags::RF;
    }
    super::flags::write_flags(v, fl, mask);
    Ok(())
}

fn iret_protected(v: &mut Vcpu, size: u32, long: bool) -> R {
    if v.flag(rflags::NT) {
        if long {
            return Err(Exception::gp0());
        }
        v.stats.count_unimplemented("iret task return");
        return Err(Exception::gp0());
    }
    let rip = v.peek(0, size)? & size_mask(size);
    let sel = v.peek(size as u64, size)? as u16;
    let fl = v.peek(2 * size as u64, size)?;
    let cpl = v.cpu.cpl;
    if !long && fl & rflags::VM != 0 && cpl == 0 && size == 4 {
        v.stats.count_unimplemented("iret to virtual-8086 mode");
        return Err(Exception::gp0());
    }
    if sel & 0xfffc == 0 {
        return Err(Exception::gp0());
    }
    let err = selector_error(sel);
    let d = read_descriptor(v, sel)?;
    let rpl = (sel & 3) as u8;
    if rpl < cpl || !d.is_code() || (d.is_conforming_code() && d.dpl() > rpl) || (!d.is_conforming_code() && d.dpl() != rpl) {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::np(err));
    }
    let to_long = long && d.to_segment(sel).long();
    if to_long && d.to_segment(sel).default_big() {
        return Err(Exception::gp(err));
    }
    let rip = if to_long { rip } else { rip & 0xffff_ffff };
    check_target(&d, sel, rip, long)?;
    // In 64-bit mode iret always pops SS:RSP; elsewhere only on a privilege change.
    let pops_stack = v.cpu.mode == CpuMode::Long || rpl > cpl;
    let mut mask = rflags::ARITH | rflags::TF | rflags::DF | rflags::NT | rflags::RF;
    if size >= 4 {
        mask |= rflags::AC | rflags::ID;
    }
    if cpl == 0 {
        mask |= rflags::IOPL | rflags::VIF | rflags::VIP;
    }
    if cpl <= v.cpu.iopl() {
        mask |= rflags::IF;
    }
    if size == 2 {
        mask &= 0xffff;
    }
    if pops_stack {
        let new_sp = v.peek(3 * size as u64, size)?;
        let ss_sel = v.peek(4 * size as u64, size)? as u16;
        let ss = outer_ss(v, ss_sel, rpl)?;
        load_cs(v, sel, &d, rpl);
        super::flags::write_flags(v, fl, mask);
        load_outer_stack(v, ss_sel, ss, new_sp, size);
        if rpl > cpl {
            null_inaccessible_segments(v);
        }
    } else {
        let ssz = v.cpu.stack_size() as u32;
        let sp = v.cpu.regs.gpr[4].wrapping_add(3 * size as u64) & size_mask(ssz);
        v.set_sp(sp);
        load_cs(v, sel, &d, rpl);
        super::flags::write_flags(v, fl, mask);
    }
    v.cpu.regs.rip = rip;
    Ok(())
}
