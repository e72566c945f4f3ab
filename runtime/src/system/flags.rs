//! cli, sti, pushf, popf, hlt, cpuid, rdtsc (SDM Vol. 2; IOPL rules Vol. 1 3.4.3).

use iced_x86::{Instruction, Mnemonic};

use crate::cpu::cpuid::guest_cpuid;
use crate::cpu::{cr4, rflags, CpuMode};
use crate::exception::Exception;
use crate::interp::Vcpu;

type R = Result<(), Exception>;

/// Whether IF may be changed: CPL <= IOPL (always in real mode).
fn if_allowed(v: &Vcpu) -> bool {
    v.cpu.mode == CpuMode::Real || v.cpu.cpl <= v.cpu.iopl()
}

pub fn cli(v: &mut Vcpu, _i: &Instruction) -> R {
    if !if_allowed(v) {
        return Err(Exception::gp0());
    }
    v.cpu.regs.rflags &= !rflags::IF;
    v.block_break = true;
    Ok(())
}

pub fn sti(v: &mut Vcpu, _i: &Instruction) -> R {
    if !if_allowed(v) {
        return Err(Exception::gp0());
    }
    if v.cpu.regs.rflags & rflags::IF == 0 {
        // Interrupts stay blocked until after the next instruction.
        v.cpu.interrupt_shadow = true;
    }
    v.cpu.regs.rflags |= rflags::IF;
    v.block_break = true;
    Ok(())
}

pub fn pushf(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode == CpuMode::Virtual8086 && v.cpu.iopl() < 3 {
        return Err(Exception::gp0());
    }
    let size = (-i.stack_pointer_increment()) as u32;
    // VM and RF read as zero in the pushed image.
    let f = v.cpu.regs.rflags & !(rflags::VM | rflags::RF);
    v.push(f, size)
}

pub fn popf(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode == CpuMode::Virtual8086 && v.cpu.iopl() < 3 {
        return Err(Exception::gp0());
    }
    let size = i.stack_pointer_increment() as u32;
    let new = v.pop(size)?;
    let mut mask = rflags::ARITH | rflags::TF | rflags::DF | rflags::NT;
    if size >= 4 {
        mask |= rflags::AC | rflags::ID;
    }
    if v.cpu.cpl == 0 || v.cpu.mode == CpuMode::Real {
        mask |= rflags::IOPL;
    }
    if if_allowed(v) {
        mask |= rflags::IF;
    }
    if size == 2 {
        mask &= 0xffff;
    }
    write_flags(v, new, mask);
    v.block_break = true;
    Ok(())
}

/// Replaces the RFLAGS bits in `mask` with those of `new` (bit 1 stays set).
pub fn write_flags(v: &mut Vcpu, new: u64, mask: u64) {
    let f = &mut v.cpu.regs.rflags;
    *f = ((*f & !mask) | (new & mask)) | rflags::FIXED1;
    v.cpu.update_mode();
}

pub fn hlt(v: &mut Vcpu, _i: &Instruction) -> R {
    super::require_cpl0(v)?;
    v.cpu.halted = true;
    v.block_break = true;
    Ok(())
}

pub fn cpuid(v: &mut Vcpu, _i: &Instruction) -> R {
    let g = &v.cpu.regs.gpr;
    let r = guest_cpuid(g[0] as u32, g[1] as u32, v.cpu.cr4 & cr4::OSXSAVE != 0, v.cpu.xcr0);
    let g = &mut v.cpu.regs.gpr;
    g[0] = r.eax as u64;
    g[3] = r.ebx as u64;
    g[1] = r.ecx as u64;
    g[2] = r.edx as u64;
    Ok(())
}

/// The guest's TSC: its clock's (the host's, less stolen stalls) plus the
/// guest's own offset (set by TSC writes).
pub fn guest_tsc(v: &Vcpu) -> u64 {
    v.clock.tsc().wrapping_add(v.cpu.msr.tsc_offset)
}

pub fn rdtsc(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.cr4 & cr4::TSD != 0 && v.cpu.cpl != 0 && v.cpu.mode != CpuMode::Real {
        return Err(Exception::gp0());
    }
    let t = guest_tsc(v);
    let g = &mut v.cpu.regs.gpr;
    g[0] = t & 0xffff_ffff;
    g[2] = t >> 32;
    if i.mnemonic() == Mnemonic::Rdtscp {
        g[1] = v.cpu.msr.tsc_aux & 0xffff_ffff;
    }
    Ok(())
}

/// rdrand/rdseed: the host's hardware random number generator, which the
/// guest's CPUID advertises only when the host has it. CF=1 on success.
pub fn rdrand(v: &mut Vcpu, i: &Instruction) -> R {
    let seed = i.mnemonic() == Mnemonic::Rdseed;
    let (value, ok) = host_random(seed).ok_or_else(Exception::ud)?;
    let r = i.op0_register();
    let size = r.size() as u32;
    v.set_reg(r, value & crate::interp::access::size_mask(size));
    let f = &mut v.cpu.regs.rflags;
    *f &= !rflags::ARITH;
    if ok {
        *f |= rflags::CF;
    }
    Ok(())
}

fn host_random(seed: bool) -> Option<(u64, bool)> {
    use core::arch::x86_64::{_rdrand64_step, _rdseed64_step};
    let mut x = 0u64;
    if seed {
        if !std::arch::is_x86_feature_detected!("rdseed") {
            return None;
        }
        // SAFETY: the host CPU supports RDSEED (checked above).
        let ok = unsafe { _rdseed64_step(&mut x) };
        Some((x, ok == 1))
    } else {
        if !std::arch::is_x86_feature_detected!("rdrand") {
            return None;
        }
        // SAFETY: the host CPU supports RDRAND (checked above).
        let ok = unsafe { _rdrand64_step(&mut x) };
        Some((x, ok == 1))
    }
}
