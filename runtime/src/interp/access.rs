//! Operand access for the interpreter: registers, segmentation, and guest
//! memory through the soft TLB (fast path) or the page walk (slow path).

use iced_x86::{Instruction, OpKind, Register};

use super::Vcpu;
use crate::cpu::{rflags, seg, CpuMode};
use crate::exception::Exception;
use crate::mmu::{self, Access};

/// How a register number maps onto the GPR file: (index, kind).
#[derive(Clone, Copy)]
pub(crate) struct RegInfo {
    pub idx: u8,
    pub kind: RegKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum RegKind {
    None,
    Low8,
    High8,
    W16,
    W32,
    W64,
    Seg,
    Other,
}

const fn build_reg_info() -> [RegInfo; 256] {
    let mut t = [RegInfo { idx: 0, kind: RegKind::Other }; 256];
    t[0] = RegInfo { idx: 0, kind: RegKind::None };
    let mut i = 0;
    while i < 20 {
        // AL CL DL BL AH CH DH BH SPL BPL SIL DIL R8L..R15L
        t[1 + i] = if i < 4 {
            RegInfo { idx: i as u8, kind: RegKind::Low8 }
        } else if i < 8 {
            RegInfo { idx: (i - 4) as u8, kind: RegKind::High8 }
        } else {
            RegInfo { idx: (i - 4) as u8, kind: RegKind::Low8 }
        };
        i += 1;
    }
    let mut r = 0;
    while r < 16 {
        t[21 + r] = RegInfo { idx: r as u8, kind: RegKind::W16 };
        t[37 + r] = RegInfo { idx: r as u8, kind: RegKind::W32 };
        t[53 + r] = RegInfo { idx: r as u8, kind: RegKind::W64 };
        r += 1;
    }
    let mut s = 0;
    while s < 6 {
        t[71 + s] = RegInfo { idx: s as u8, kind: RegKind::Seg };
        s += 1;
    }
    t
}

pub(crate) static REG_INFO: [RegInfo; 256] = build_reg_info();

#[inline(always)]
pub fn size_mask(size: u32) -> u64 {
    if size >= 8 { u64::MAX } else { (1u64 << (size * 8)) - 1 }
}

/// A resolved destination operand: a register or a checked linear address.
#[derive(Clone, Copy, Debug)]
pub enum Loc {
    Reg(Register),
    Mem(u64),
}

impl Vcpu {
    #[inline(always)]
    pub fn reg(&self, r: Register) -> u64 {
        let info = REG_INFO[r as usize];
        let v = self.cpu.regs.gpr[info.idx as usize & 15];
        match info.kind {
            RegKind::Low8 => v & 0xff,
            RegKind::High8 => (v >> 8) & 0xff,
            RegKind::W16 => v & 0xffff,
            RegKind::W32 => v & 0xffff_ffff,
            RegKind::W64 => v,
            RegKind::Seg => self.cpu.seg[info.idx as usize % 6].selector as u64,
            RegKind::None => 0,
            RegKind::Other => match r {
                Register::RIP => self.cpu.regs.rip,
                Register::EIP => self.cpu.regs.rip & 0xffff_ffff,
                _ => 0,
            },
        }
    }

    /// Writes a GPR with x86 width rules: 32-bit writes zero-extend, 8/16 merge.
    #[inline(always)]
    pub fn set_reg(&mut self, r: Register, v: u64) {
        let info = REG_INFO[r as usize];
        let slot = &mut self.cpu.regs.gpr[info.idx as usize & 15];
        match info.kind {
            RegKind::Low8 => *slot = (*slot & !0xff) | (v & 0xff),
            RegKind::High8 => *slot = (*slot & !0xff00) | ((v & 0xff) << 8),
            RegKind::W16 => *slot = (*slot & !0xffff) | (v & 0xffff),
            RegKind::W32 => *slot = v & 0xffff_ffff,
            RegKind::W64 => *slot = v,
            _ => {}
        }
    }

    /// Effective address (offset within the segment) of the memory operand.
    #[inline]
    pub fn effective_address(&self, insn: &Instruction) -> u64 {
        let base = insn.memory_base();
        let mut a = insn.memory_displacement64();
        if base == Register::RIP || base == Register::EIP {
            // iced-x86 folds next_ip into the displacement of RIP-relative operands.
            return if base == Register::EIP { a & 0xffff_ffff } else { a };
        }
        let mut mask = u64::MAX;
        if base != Register::None {
            a = a.wrapping_add(self.reg(base));
            mask = addr_mask_of(base);
        }
        let index = insn.memory_index();
        if index != Register::None {
            a = a.wrapping_add(self.reg(index) << insn.memory_index_scale().trailing_zeros());
            mask = addr_mask_of(index);
        }
        if mask == u64::MAX && base == Register::None && index == Register::None {
            mask = match insn.memory_displ_size() {
                2 => 0xffff,
                4 => 0xffff_ffff,
                _ => u64::MAX,
            };
            if self.cpu.mode != CpuMode::Long && mask == u64::MAX {
                mask = 0xffff_ffff;
            }
        }
        a & mask
    }

    /// Segment + offset -> linear address, with the checks of the current mode.
    ///
    /// In 64-bit mode only FS/GS bases apply and the address must be canonical
    /// (#SS for stack references, #GP otherwise). Elsewhere the offset is
    /// checked against the segment limit (expand-down aware) and the type.
    #[inline]
    pub fn linear(&self, sreg: usize, offset: u64, size: u32, write: bool) -> Result<u64, Exception> {
        let s = &self.cpu.seg[sreg];
        if self.cpu.mode == CpuMode::Long {
            let lin = if sreg >= seg::FS { offset.wrapping_add(s.base) } else { offset };
            if !is_canonical(lin) || !is_canonical(lin.wrapping_add(size as u64 - 1)) {
                return Err(if sreg == seg::SS { Exception::ss(0) } else { Exception::gp0() });
            }
            return Ok(lin);
        }
        // Fast path: a present, expand-up, writable data segment (or a
        // read of any readable one) with the offset well inside the limit.
        let ty = s.attr & 0x9e;
        let fast = if write { ty == 0x92 } else { ty & 0x9c == 0x90 || ty & 0x9a == 0x9a };
        if fast && offset.wrapping_add(size as u64 - 1) <= s.limit as u64 && offset <= s.limit as u64 {
            return Ok(s.base.wrapping_add(offset) & 0xffff_ffff);
        }
        self.check_segment(sreg, offset, size, write)?;
        Ok(s.base.wrapping_add(offset) & 0xffff_ffff)
    }

    #[cold]
    fn check_segment(&self, sreg: usize, offset: u64, size: u32, write: bool) -> Result<(), Exception> {
        let s = &self.cpu.seg[sreg];
        let fault = || if sreg == seg::SS { Exception::ss(0) } else { Exception::gp0() };
        if matches!(self.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
            if offset.wrapping_add(size as u64 - 1) > s.limit as u64 {
                return Err(fault());
            }
            return Ok(());
        }
        // A null selector in a data segment register faults on use.
        if !s.present() {
            return Err(fault());
        }
        let ty = s.seg_type();
        let code = ty & 8 != 0;
        if write && (code || ty & 2 == 0) {
            return Err(fault());
        }
        let last = offset.wrapping_add(size as u64 - 1);
        if !code && ty & 4 != 0 {
            // Expand-down: valid offsets are (limit, upper bound].
            let upper = if s.default_big() { 0xffff_ffff } else { 0xffff };
            if offset <= s.limit as u64 || last > upper || last < offset {
                return Err(fault());
            }
        } else if last > s.limit as u64 || last < offset {
            return Err(fault());
        }
        Ok(())
    }

    /// Whether data accesses are user-mode accesses (CPL 3).
    #[inline(always)]
    pub fn user(&self) -> bool {
        self.cpu.cpl == 3
    }

    /// Reads `size` bytes (1, 2, 4 or 8) at a linear address.
    #[inline(always)]
    pub fn read_lin(&mut self, lin: u64, size: u32) -> Result<u64, Exception> {
        self.read_lin_as(lin, size, self.user())
    }

    #[inline(always)]
    pub fn read_lin_as(&mut self, lin: u64, size: u32, user: bool) -> Result<u64, Exception> {
        if self.align_check && user && lin & (size as u64 - 1) != 0 {
            return Err(Exception::with_code(crate::exception::vector::AC, 0));
        }
        if (lin & 0xfff) + size as u64 <= 0x1000 {
            if let Some(host) = self.tlb.lookup(lin, Access::Read, user) {
                // SAFETY: the TLB only holds pages inside guest RAM and the
                // access stays inside the page, so [host, host+size) is mapped.
                return Ok(unsafe { read_host(host, size) });
            }
        }
        self.read_slow(lin, size, user)
    }

    /// Writes `size` bytes (1, 2, 4 or 8) at a linear address.
    #[inline(always)]
    pub fn write_lin(&mut self, lin: u64, size: u32, v: u64) -> Result<(), Exception> {
        self.write_lin_as(lin, size, v, self.user())
    }

    #[inline(always)]
    pub fn write_lin_as(&mut self, lin: u64, size: u32, v: u64, user: bool) -> Result<(), Exception> {
        if self.align_check && user && lin & (size as u64 - 1) != 0 {
            return Err(Exception::with_code(crate::exception::vector::AC, 0));
        }
        if (lin & 0xfff) + size as u64 <= 0x1000 {
            if let Some(host) = self.tlb.lookup(lin, Access::Write, user) {
                // SAFETY: as in `read_lin_as`; write entries are never filled
                // for pages holding decoded code, so no cache goes stale.
                unsafe { write_host(host, size, v) };
                return Ok(());
            }
        }
        self.write_slow(lin, size, v, user)
    }

    /// Translates a linear address for `kind`, filling the TLB for RAM pages.
    pub fn translate(&mut self, lin: u64, kind: Access, user: bool) -> Result<u64, Exception> {
        let t = mmu::translate(&self.cpu, &self.mem, lin, kind, user)?;
        let phys_page = t.phys & !0xfff;
        if let Some(host) = self.mem.host_ptr(phys_page, 0x1000) {
            let code = kind == Access::Write && self.code.is_code_page(phys_page);
            if !code {
                self.tlb.fill(lin, kind, user, &t, host as u64);
            }
        }
        Ok(t.phys)
    }

    #[cold]
    fn read_slow(&mut self, lin: u64, size: u32, user: bool) -> Result<u64, Exception> {
        let mut v = 0u64;
        let first = self.translate(lin, Access::Read, user)?;
        let in_page = (0x1000 - (lin & 0xfff)).min(size as u64) as u32;
        let second = if in_page < size {
            Some(self.translate(lin.wrapping_add(in_page as u64), Access::Read, user)?)
        } else {
            None
        };
        if second.is_none() && !self.mem.contains(first, size as u64) {
            return Ok(self.mmio_read(first, size as u8));
        }
        for i in 0..size {
            let phys = if i < in_page { first + i as u64 } else { second.unwrap_or(0) + (i - in_page) as u64 };
            v |= (self.mem.read_u8(phys) as u64) << (8 * i);
        }
        Ok(v)
    }

    #[cold]
    fn write_slow(&mut self, lin: u64, size: u32, v: u64, user: bool) -> Result<(), Exception> {
        let first = self.translate(lin, Access::Write, user)?;
        let in_page = (0x1000 - (lin & 0xfff)).min(size as u64) as u32;
        let second = if in_page < size {
            Some(self.translate(lin.wrapping_add(in_page as u64), Access::Write, user)?)
        } else {
            None
        };
        if second.is_none() && !self.mem.contains(first, size as u64) {
            self.mmio_write(first, size as u8, v);
            return Ok(());
        }
        for i in 0..size {
            let phys = if i < in_page { first + i as u64 } else { second.unwrap_or(0) + (i - in_page) as u64 };
            self.write_phys_u8(phys, (v >> (8 * i)) as u8);
        }
        Ok(())
    }

    /// A byte write to guest physical memory that keeps decoded code coherent.
    pub fn write_phys_u8(&mut self, phys: u64, b: u8) {
        if self.code.is_code_page(phys & !0xfff) {
            self.invalidate_code_page(phys & !0xfff);
        }
        self.mem.write_u8(phys, b);
    }

    /// Checks that `lin..lin+size` is writable (for read-modify-write
    /// instructions, so that a fault happens before any state changes).
    #[inline]
    pub fn probe_write(&mut self, lin: u64, size: u32) -> Result<(), Exception> {
        let user = self.user();
        if (lin & 0xfff) + size as u64 <= 0x1000 && self.tlb.lookup(lin, Access::Write, user).is_some() {
            return Ok(());
        }
        self.translate(lin, Access::Write, user)?;
        let last = lin.wrapping_add(size as u64 - 1);
        if last & !0xfff != lin & !0xfff {
            self.translate(last, Access::Write, user)?;
        }
        Ok(())
    }

    /// Reads memory at `seg:offset`.
    #[inline]
    pub fn read_mem(&mut self, sreg: usize, offset: u64, size: u32) -> Result<u64, Exception> {
        let lin = self.linear(sreg, offset, size, false)?;
        self.read_lin(lin, size)
    }

    /// Writes memory at `seg:offset`.
    #[inline]
    pub fn write_mem(&mut self, sreg: usize, offset: u64, size: u32, v: u64) -> Result<(), Exception> {
        let lin = self.linear(sreg, offset, size, true)?;
        self.write_lin(lin, size, v)
    }

    /// Linear address of the explicit memory operand, checked for the access.
    #[inline]
    pub fn mem_operand(&self, insn: &Instruction, size: u32, write: bool) -> Result<u64, Exception> {
        let off = self.effective_address(insn);
        self.linear(seg_index(insn.memory_segment()), off, size, write)
    }

    /// Reads operand `i` of `size` bytes.
    #[inline]
    pub fn read_op(&mut self, insn: &Instruction, i: u32, size: u32) -> Result<u64, Exception> {
        match insn.op_kind(i) {
            OpKind::Register => Ok(self.reg(insn.op_register(i))),
            OpKind::Memory => {
                let lin = self.mem_operand(insn, size, false)?;
                self.read_lin(lin, size)
            }
            OpKind::Immediate8 | OpKind::Immediate8to16 | OpKind::Immediate8to32
            | OpKind::Immediate8to64 | OpKind::Immediate16 | OpKind::Immediate32
            | OpKind::Immediate32to64 | OpKind::Immediate64 | OpKind::Immediate8_2nd => {
                Ok(insn.immediate(i) & size_mask(size))
            }
            _ => Err(Exception::ud()),
        }
    }

    /// Resolves a destination operand, probing memory for writability.
    #[inline]
    pub fn dest(&mut self, insn: &Instruction, size: u32) -> Result<Loc, Exception> {
        match insn.op0_kind() {
            OpKind::Register => Ok(Loc::Reg(insn.op0_register())),
            _ => {
                let lin = self.mem_operand(insn, size, true)?;
                self.probe_write(lin, size)?;
                Ok(Loc::Mem(lin))
            }
        }
    }

    #[inline]
    pub fn read_loc(&mut self, loc: Loc, size: u32) -> Result<u64, Exception> {
        match loc {
            Loc::Reg(r) => Ok(self.reg(r)),
            Loc::Mem(lin) => self.read_lin(lin, size),
        }
    }

    #[inline]
    pub fn write_loc(&mut self, loc: Loc, size: u32, v: u64) -> Result<(), Exception> {
        match loc {
            Loc::Reg(r) => {
                self.set_reg(r, v);
                Ok(())
            }
            Loc::Mem(lin) => self.write_lin(lin, size, v),
        }
    }

    /// Writes operand 0 (register or memory).
    #[inline]
    pub fn write_op0(&mut self, insn: &Instruction, size: u32, v: u64) -> Result<(), Exception> {
        match insn.op0_kind() {
            OpKind::Register => {
                self.set_reg(insn.op0_register(), v);
                Ok(())
            }
            _ => {
                let lin = self.mem_operand(insn, size, true)?;
                self.write_lin(lin, size, v)
            }
        }
    }

    // --- stack ---

    #[inline]
    pub fn push(&mut self, v: u64, size: u32) -> Result<(), Exception> {
        let ss = self.cpu.stack_size();
        let rsp = self.cpu.regs.gpr[4];
        let new = rsp.wrapping_sub(size as u64) & size_mask(ss as u32);
        let lin = self.linear(seg::SS, new, size, true)?;
        self.write_lin(lin, size, v)?;
        self.set_sp(new);
        Ok(())
    }

    #[inline]
    pub fn pop(&mut self, size: u32) -> Result<u64, Exception> {
        let v = self.peek(0, size)?;
        let ss = self.cpu.stack_size();
        let new = self.cpu.regs.gpr[4].wrapping_add(size as u64) & size_mask(ss as u32);
        self.set_sp(new);
        Ok(v)
    }

    /// Reads the stack at `rsp + offset` without popping.
    #[inline]
    pub fn peek(&mut self, offset: u64, size: u32) -> Result<u64, Exception> {
        let ss = self.cpu.stack_size();
        let addr = self.cpu.regs.gpr[4].wrapping_add(offset) & size_mask(ss as u32);
        let lin = self.linear(seg::SS, addr, size, false)?;
        self.read_lin(lin, size)
    }

    /// Sets RSP/ESP/SP according to the stack address size.
    #[inline]
    pub fn set_sp(&mut self, v: u64) {
        match self.cpu.stack_size() {
            8 => self.cpu.regs.gpr[4] = v,
            4 => self.cpu.regs.gpr[4] = v & 0xffff_ffff,
            _ => self.cpu.regs.gpr[4] = (self.cpu.regs.gpr[4] & !0xffff) | (v & 0xffff),
        }
    }

    #[inline(always)]
    pub fn flag(&self, f: u64) -> bool {
        self.cpu.regs.rflags & f != 0
    }

    #[inline(always)]
    pub fn set_flag(&mut self, f: u64, on: bool) {
        if on {
            self.cpu.regs.rflags |= f;
        } else {
            self.cpu.regs.rflags &= !f;
        }
    }

    /// Replaces the arithmetic flags selected by `mask` with those in `f`.
    #[inline(always)]
    pub fn set_arith(&mut self, mask: u64, f: u64) {
        self.cpu.regs.rflags = (self.cpu.regs.rflags & !mask) | (f & mask);
    }

    #[inline(always)]
    pub fn df(&self) -> bool {
        self.cpu.regs.rflags & rflags::DF != 0
    }
}

/// Operand size in bytes of an instruction whose size is not in an operand
/// (stack frames, far transfers, iret): from its encoding, else the mode's default.
#[inline]
pub fn operand_bytes(v: &Vcpu, i: &Instruction) -> u32 {
    match i.code().op_code().operand_size() {
        16 => 2,
        32 => 4,
        64 => 8,
        _ if v.cpu.long_mode() => 8,
        _ => 4,
    }
}

/// Segment register number of an iced segment register.
pub use crate::cpu::seg::index as seg_index;

#[inline(always)]
fn addr_mask_of(r: Register) -> u64 {
    match REG_INFO[r as usize].kind {
        RegKind::W16 => 0xffff,
        RegKind::W32 => 0xffff_ffff,
        _ => u64::MAX,
    }
}

pub use btvmm_translator::classify::is_canonical;

/// # Safety
/// `host..host+size` must be mapped and readable.
#[inline(always)]
unsafe fn read_host(host: u64, size: u32) -> u64 {
    let p = host as *const u8;
    // SAFETY: guaranteed by the caller; unaligned reads are allowed on x86.
    unsafe {
        match size {
            1 => p.read() as u64,
            2 => (p as *const u16).read_unaligned() as u64,
            4 => (p as *const u32).read_unaligned() as u64,
            _ => (p as *const u64).read_unaligned(),
        }
    }
}

/// # Safety
/// `host..host+size` must be mapped and writable.
#[inline(always)]
unsafe fn write_host(host: u64, size: u32, v: u64) {
    let p = host as *mut u8;
    // SAFETY: guaranteed by the caller; unaligned writes are allowed on x86.
    unsafe {
        match size {
            1 => p.write(v as u8),
            2 => (p as *mut u16).write_unaligned(v as u16),
            4 => (p as *mut u32).write_unaligned(v as u32),
            _ => (p as *mut u64).write_unaligned(v),
        }
    }
}
