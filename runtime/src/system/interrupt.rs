//! Interrupt and exception delivery (SDM Vol. 3A, 6.12-6.15 and 7.3).
//!
//! Real mode uses the IVT; protected mode 8-byte IDT gates with a stack
//! switch through the TSS on a privilege change; long mode 16-byte gates,
//! IST stacks and 64-bit frames. Faults raised while delivering follow the
//! double-fault rules, and a fault while delivering #DF is a triple fault.

use crate::cpu::{rflags, seg, CpuMode};
use crate::exception::{selector_error, vector, Exception};
use crate::interp::{access::size_mask, VmExit, Vcpu};

use super::segment::{load_cs, read_descriptor, Descriptor};

/// What raised the event: it decides EXT in error codes and the gate DPL check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A fault or trap raised by an instruction or by delivery itself.
    Exception,
    /// An interrupt from the PIC (INTR).
    External,
    /// `int n`: the gate's DPL must allow CPL.
    Software,
    /// `int3` and `into`: like `int n` for the DPL check, but vectors 3/4.
    SoftwareException,
}

impl Source {
    fn ext(self) -> u32 {
        matches!(self, Source::Exception | Source::External) as u32
    }
    fn software(self) -> bool {
        matches!(self, Source::Software | Source::SoftwareException)
    }
}

/// Delivers an exception raised by the instruction at RIP (faults) or just
/// before RIP (traps), with the double- and triple-fault rules.
pub fn deliver_exception(v: &mut Vcpu, e: Exception) {
    let mut current = e;
    for _ in 0..4 {
        tracing::debug!(target: "exception", vector = current.vector, code = ?current.error_code,
            rip = v.cpu.regs.rip, cr2 = current.address, "{}", current.name());
        if current.vector == vector::PF {
            v.cpu.cr2 = current.address;
        }
        match deliver(v, current.vector, Source::Exception, current.error_code) {
            Ok(()) => return,
            Err(next) => {
                if current.vector == vector::DF {
                    break;
                }
                current = if next.is_double_fault_after(&current) {
                    Exception::with_code(vector::DF, 0)
                } else {
                    next
                };
            }
        }
    }
    tracing::warn!(target: "exception", "triple fault");
    v.exit = Some(VmExit::TripleFault);
}

/// Delivers an external interrupt acknowledged from the PIC.
pub fn deliver_external(v: &mut Vcpu, vec: u8) {
    tracing::trace!(target: "exception", vector = vec, rip = v.cpu.regs.rip, "external interrupt");
    if let Err(e) = deliver(v, vec, Source::External, None) {
        deliver_exception(v, e);
    }
}

/// The single-step #DB trap after an instruction executed with TF set.
pub fn single_step_trap(v: &mut Vcpu) {
    v.cpu.dr[6] |= 1 << 14;
    deliver_exception(v, Exception::new(vector::DB));
}

/// `int n`, `int3`, `into`: RIP already points after the instruction.
pub fn software_interrupt(v: &mut Vcpu, vec: u8, source: Source) -> Result<(), Exception> {
    v.stats.count_software_interrupt(vec);
    if v.cpu.mode == CpuMode::Virtual8086 && source == Source::Software && v.cpu.iopl() < 3 {
        return Err(Exception::gp0());
    }
    deliver(v, vec, source, None)
}

/// Delivers one event through the IVT or IDT. On failure nothing visible
/// has changed except memory already pushed, as on hardware.
pub fn deliver(v: &mut Vcpu, vec: u8, src: Source, error: Option<u32>) -> Result<(), Exception> {
    v.block_break = true;
    if v.trap_exceptions {
        let address = if vec == vector::PF { v.cpu.cr2 } else { 0 };
        v.exit = Some(VmExit::Exception(Exception { vector: vec, error_code: error, address }));
        return Ok(());
    }
    v.cpu.halted = false;
    match v.cpu.mode {
        CpuMode::Real => deliver_real(v, vec),
        CpuMode::Long | CpuMode::Compat => deliver_long(v, vec, src, error),
        CpuMode::Protected | CpuMode::Virtual8086 => deliver_protected(v, vec, src, error),
    }
}

fn deliver_real(v: &mut Vcpu, vec: u8) -> Result<(), Exception> {
    let off = vec as u64 * 4;
    if off + 3 > v.cpu.idtr.limit as u64 {
        return Err(Exception::gp0());
    }
    let entry = v.read_lin_as(v.cpu.idtr.base.wrapping_add(off), 4, false)?;
    let flags = v.cpu.regs.rflags & 0xffff;
    let cs = v.cpu.seg[seg::CS].selector as u64;
    let ip = v.cpu.regs.rip & 0xffff;
    let sp = v.cpu.regs.gpr[4];
    let r = (|| {
        v.push(flags, 2)?;
        v.push(cs, 2)?;
        v.push(ip, 2)
    })();
    if let Err(e) = r {
        v.cpu.regs.gpr[4] = sp;
        return Err(e);
    }
    let sel = (entry >> 16) as u16;
    let cs = &mut v.cpu.seg[seg::CS];
    cs.selector = sel;
    cs.base = (sel as u64) << 4;
    v.cpu.regs.rip = entry & 0xffff;
    v.cpu.regs.rflags &= !(rflags::IF | rflags::TF | rflags::AC | rflags::RF);
    Ok(())
}

/// Reads the IDT gate for `vec`, checking limit, type, DPL and presence.
fn read_gate(v: &mut Vcpu, vec: u8, src: Source, long: bool) -> Result<Descriptor, Exception> {
    let ext = src.ext();
    let idt_err = vec as u32 * 8 + 2 + ext;
    let size = if long { 16 } else { 8 };
    let off = vec as u64 * size;
    if off + size - 1 > v.cpu.idtr.limit as u64 {
        return Err(Exception::gp(idt_err));
    }
    let base = v.cpu.idtr.base.wrapping_add(off);
    let lo = v.read_lin_as(base, 8, false)?;
    let hi = if long { v.read_lin_as(base + 8, 8, false)? } else { 0 };
    let gate = Descriptor { lo, hi };
    let ty = gate.seg_type();
    let ok = !gate.is_code_data()
        && if long { ty == 0xe || ty == 0xf } else { matches!(ty, 5 | 6 | 7 | 0xe | 0xf) };
    if !ok {
        return Err(Exception::gp(idt_err));
    }
    if src.software() && gate.dpl() < v.cpu.cpl {
        return Err(Exception::gp(idt_err));
    }
    if !gate.present() {
        return Err(Exception::np(idt_err));
    }
    Ok(gate)
}

/// Reads and checks the target code segment of a gate.
fn gate_target(v: &mut Vcpu, gate: &Descriptor, ext: u32) -> Result<(u16, Descriptor), Exception> {
    let sel = gate.gate_selector();
    if sel & 0xfffc == 0 {
        return Err(Exception::gp(ext));
    }
    let err = selector_error(sel) | ext;
    let cs = read_descriptor(v, sel).map_err(|e| if e.vector == vector::GP { Exception::gp(err) } else { e })?;
    if !cs.is_code() || cs.dpl() > v.cpu.cpl {
        return Err(Exception::gp(err));
    }
    if !cs.present() {
        return Err(Exception::np(err));
    }
    Ok((sel, cs))
}

/// A stack being built during delivery: writes go straight to linear memory
/// as supervisor accesses, so nothing changes until the frame is complete.
struct Frame {
    base: u64,
    sp: u64,
    mask: u64,
    size: u32,
}

impl Frame {
    fn push(&mut self, v: &mut Vcpu, x: u64) -> Result<(), Exception> {
        self.sp = self.sp.wrapping_sub(self.size as u64) & self.mask;
        let lin = self.base.wrapping_add(self.sp);
        let lin = if self.mask == u64::MAX { lin } else { lin & 0xffff_ffff };
        v.write_lin_as(lin, self.size, x & size_mask(self.size), false)
    }
}

fn deliver_protected(v: &mut Vcpu, vec: u8, src: Source, error: Option<u32>) -> Result<(), Exception> {
    let ext = src.ext();
    let gate = read_gate(v, vec, src, false)?;
    if gate.seg_type() == 5 {
        tracing::warn!(target: "exception", vector = vec, "task gates are not supported: stopping the guest");
        v.exit = Some(VmExit::TripleFault);
        return Ok(());
    }
    let (sel, cs) = gate_target(v, &gate, ext)?;
    let gate32 = gate.seg_type() & 8 != 0;
    let size = if gate32 { 4 } else { 2 };
    let target = gate.gate_offset() & size_mask(size);
    let cpl = v.cpu.cpl;
    let old_flags = v.cpu.regs.rflags;
    let old_cs = v.cpu.seg[seg::CS].selector as u64;
    let old_rip = v.cpu.regs.rip;
    let new_cpl = if cs.is_conforming_code() { cpl } else { cs.dpl() };
    if target > cs.limit() as u64 {
        return Err(Exception::gp(ext));
    }
    if new_cpl < cpl || v.cpu.mode == CpuMode::Virtual8086 {
        if v.cpu.mode == CpuMode::Virtual8086 && new_cpl != 0 {
            return Err(Exception::gp(selector_error(sel) | ext));
        }
        let (ss_sel, esp) = tss_stack(v, new_cpl, ext)?;
        let ss = check_new_ss(v, ss_sel, new_cpl, ext)?;
        let big = ss.attr() & crate::cpu::Segment::ATTR_DB != 0;
        let mut f = Frame { base: ss.base(), sp: esp, mask: if big { 0xffff_ffff } else { 0xffff }, size };
        if v.cpu.mode == CpuMode::Virtual8086 {
            for s in [seg::GS, seg::FS, seg::DS, seg::ES] {
                f.push(v, v.cpu.seg[s].selector as u64)?;
            }
        }
        f.push(v, v.cpu.seg[seg::SS].selector as u64)?;
        f.push(v, v.cpu.regs.gpr[4])?;
        f.push(v, old_flags)?;
        f.push(v, old_cs)?;
        f.push(v, old_rip)?;
        if let Some(code) = error {
            f.push(v, code as u64)?;
        }
        if v.cpu.mode == CpuMode::Virtual8086 {
            for s in [seg::GS, seg::FS, seg::DS, seg::ES] {
                v.cpu.seg[s] = super::segment::null_segment(0);
            }
        }
        super::segment::load_ss(v, ss_sel, &ss);
        set_sp_masked(v, f.sp, big);
    } else {
        let ss = v.cpu.seg[seg::SS];
        let big = ss.default_big();
        let mut f = Frame { base: ss.base, sp: v.cpu.regs.gpr[4], mask: if big { 0xffff_ffff } else { 0xffff }, size };
        f.push(v, old_flags)?;
        f.push(v, old_cs)?;
        f.push(v, old_rip)?;
        if let Some(code) = error {
            f.push(v, code as u64)?;
        }
        set_sp_masked(v, f.sp, big);
    }
    load_cs(v, sel, &cs, new_cpl);
    finish(v, &gate, target);
    Ok(())
}

fn set_sp_masked(v: &mut Vcpu, sp: u64, big: bool) {
    let r = &mut v.cpu.regs.gpr[4];
    *r = if big { sp & 0xffff_ffff } else { (*r & !0xffff) | (sp & 0xffff) };
}

/// Flag changes common to every gate, then the jump.
fn finish(v: &mut Vcpu, gate: &Descriptor, target: u64) {
    let f = &mut v.cpu.regs.rflags;
    *f &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
    if gate.seg_type() & 1 == 0 {
        *f &= !rflags::IF;
    }
    v.cpu.interrupt_shadow = false;
    v.cpu.update_mode();
    v.cpu.regs.rip = target;
}

/// SS:ESP for `cpl` from a 16- or 32-bit TSS.
fn tss_stack(v: &mut Vcpu, cpl: u8, ext: u32) -> Result<(u16, u64), Exception> {
    let tr = v.cpu.tr;
    let ts = Exception::ts(selector_error(tr.selector) | ext);
    let is32 = tr.seg_type() & 8 != 0;
    let (off, width) = if is32 { (4 + 8 * cpl as u64, 4) } else { (2 + 4 * cpl as u64, 2) };
    if off + 2 * width as u64 - 1 > tr.limit as u64 {
        return Err(ts);
    }
    let sp = v.read_lin_as(tr.base.wrapping_add(off) & 0xffff_ffff, width, false)?;
    let ss = v.read_lin_as(tr.base.wrapping_add(off + width as u64) & 0xffff_ffff, 2, false)?;
    Ok((ss as u16, sp))
}

fn check_new_ss(v: &mut Vcpu, sel: u16, cpl: u8, ext: u32) -> Result<Descriptor, Exception> {
    let err = selector_error(sel) | ext;
    if sel & 0xfffc == 0 {
        return Err(Exception::ts(ext));
    }
    if (sel & 3) as u8 != cpl {
        return Err(Exception::ts(err));
    }
    let d = read_descriptor(v, sel).map_err(|e| if e.vector == vector::GP { Exception::ts(err) } else { e })?;
    if d.dpl() != cpl || !d.is_writable_data() {
        return Err(Exception::ts(err));
    }
    if !d.present() {
        return Err(Exception::ss(err));
    }
    Ok(d)
}

fn deliver_long(v: &mut Vcpu, vec: u8, src: Source, error: Option<u32>) -> Result<(), Exception> {
    let ext = src.ext();
    let gate = read_gate(v, vec, src, true)?;
    let (sel, cs) = gate_target(v, &gate, ext)?;
    let err = selector_error(sel) | ext;
    if !cs.to_segment(sel).long() || cs.to_segment(sel).default_big() {
        return Err(Exception::gp(err));
    }
    let target = gate.gate_offset64();
    if !crate::interp::access::is_canonical(target) {
        return Err(Exception::gp(ext));
    }
    let cpl = v.cpu.cpl;
    let new_cpl = if cs.is_conforming_code() { cpl } else { cs.dpl() };
    let ist = gate.gate_ist();
    let rsp = if ist != 0 {
        tss64_read(v, 36 + 8 * (ist as u64 - 1), ext)?
    } else if new_cpl < cpl {
        tss64_read(v, 4 + 8 * new_cpl as u64, ext)?
    } else {
        v.cpu.regs.gpr[4]
    };
    if !crate::interp::access::is_canonical(rsp) {
        return Err(Exception::ss(ext));
    }
    let mut f = Frame { base: 0, sp: rsp & !0xf, mask: u64::MAX, size: 8 };
    f.push(v, v.cpu.seg[seg::SS].selector as u64)?;
    f.push(v, v.cpu.regs.gpr[4])?;
    f.push(v, v.cpu.regs.rflags)?;
    f.push(v, v.cpu.seg[seg::CS].selector as u64)?;
    f.push(v, v.cpu.regs.rip)?;
    if let Some(code) = error {
        f.push(v, code as u64)?;
    }
    if new_cpl < cpl {
        // The new SS is a null selector whose RPL is the new CPL.
        let mut ss = super::segment::null_segment(new_cpl as u16);
        ss.attr = 0x93 | Segment::ATTR_DB | ((new_cpl as u16) << Segment::ATTR_DPL_SHIFT);
        ss.attr &= !Segment::ATTR_P;
        v.cpu.seg[seg::SS] = ss;
    }
    v.cpu.regs.gpr[4] = f.sp;
    load_cs(v, sel, &cs, new_cpl);
    finish(v, &gate, target);
    Ok(())
}

use crate::cpu::Segment;

/// Reads a 64-bit field of the 64-bit TSS.
fn tss64_read(v: &mut Vcpu, off: u64, ext: u32) -> Result<u64, Exception> {
    let tr = v.cpu.tr;
    if off + 7 > tr.limit as u64 {
        return Err(Exception::ts(selector_error(tr.selector) | ext));
    }
    v.read_lin_as(tr.base.wrapping_add(off), 8, false)
}
