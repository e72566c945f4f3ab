//! Privileged and mode-changing instructions: control and debug registers,
//! descriptor tables, MSRs, fast system calls, swapgs, XCR0, FS/GS base
//! access, and the descriptor probes lar/lsl/verr/verw (SDM Vol. 2 and
//! Vol. 3A chapters 2, 4.10, 5.8.7-5.8.8, 5.10).

use iced_x86::{Instruction, Mnemonic as M, OpKind, Register};

use super::require_cpl0;
use super::segment::{read_descriptor, read_system_descriptor, Descriptor};
use crate::cpu::msr::index as msr;
use crate::cpu::{cpuid, cr0, cr4, efer, rflags, seg, CpuMode, Segment};
use crate::exception::{selector_error, Exception};
use crate::interp::access::{is_canonical, seg_index};
use crate::interp::{Handler, Vcpu};

type R = Result<(), Exception>;

pub fn handler(i: &Instruction) -> Option<Handler> {
    Some(match i.mnemonic() {
        M::Mov if is_cr(i.op0_register()) || is_cr(i.op1_register()) => mov_cr,
        M::Mov if is_dr(i.op0_register()) || is_dr(i.op1_register()) => mov_dr,
        M::Lmsw => lmsw,
        M::Smsw => smsw,
        M::Clts => clts,
        M::Invlpg => invlpg,
        M::Wbinvd | M::Invd | M::Wbnoinvd => cache_flush,
        M::Lgdt | M::Lidt => load_table,
        M::Sgdt | M::Sidt => store_table,
        M::Lldt => lldt,
        M::Ltr => ltr,
        M::Sldt | M::Str => store_selector,
        M::Lar | M::Lsl => lar_lsl,
        M::Verr | M::Verw => verr_verw,
        M::Rdmsr => rdmsr,
        M::Wrmsr => wrmsr,
        M::Swapgs => swapgs,
        M::Syscall => syscall,
        M::Sysret | M::Sysretq => sysret,
        M::Sysenter => sysenter,
        M::Sysexit | M::Sysexitq => sysexit,
        M::Xgetbv => xgetbv,
        M::Xsetbv => xsetbv,
        M::Rdfsbase | M::Rdgsbase | M::Wrfsbase | M::Wrgsbase => fsgsbase,
        M::Rdpid => rdpid,
        M::Rdpmc => rdpmc,
        _ => return None,
    })
}

/// Instructions that can change the mode, paging or privilege.
pub fn ends_block(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        M::Lmsw | M::Clts | M::Invlpg | M::Lgdt | M::Lidt | M::Lldt | M::Ltr | M::Wrmsr
            | M::Swapgs | M::Xsetbv | M::Wrfsbase | M::Wrgsbase
    ) || (i.mnemonic() == M::Mov && (is_cr(i.op0_register()) || is_dr(i.op0_register())))
}

fn is_cr(r: Register) -> bool {
    (Register::CR0 as u32..=Register::CR15 as u32).contains(&(r as u32))
}

fn is_dr(r: Register) -> bool {
    (Register::DR0 as u32..=Register::DR15 as u32).contains(&(r as u32))
}

// --- control registers ---

const CR0_WRITABLE: u64 = cr0::PE | cr0::MP | cr0::EM | cr0::TS | cr0::ET | cr0::NE | cr0::WP
    | cr0::AM | cr0::NW | cr0::CD | cr0::PG;
const CR4_SUPPORTED: u64 = cr4::VME | cr4::PVI | cr4::TSD | cr4::DE | cr4::PSE | cr4::PAE
    | cr4::MCE | cr4::PGE | cr4::PCE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::FSGSBASE | cr4::OSXSAVE;

/// Writes CR0 with the architectural checks and side effects (LMA, TLB).
pub fn set_cr0(v: &mut Vcpu, val: u64) -> R {
    if val >> 32 != 0 {
        return Err(Exception::gp0());
    }
    let val = (val & CR0_WRITABLE) | cr0::ET;
    if (val & cr0::PG != 0 && val & cr0::PE == 0) || (val & cr0::NW != 0 && val & cr0::CD == 0) {
        return Err(Exception::gp0());
    }
    let old = v.cpu.cr0;
    let paging_on = val & cr0::PG != 0 && old & cr0::PG == 0;
    let paging_off = val & cr0::PG == 0 && old & cr0::PG != 0;
    if paging_on && v.cpu.efer & efer::LME != 0 {
        if v.cpu.cr4 & cr4::PAE == 0 || v.cpu.seg[seg::CS].long() {
            return Err(Exception::gp0());
        }
        v.cpu.efer |= efer::LMA;
    }
    if paging_off && v.cpu.efer & efer::LMA != 0 {
        if v.cpu.mode == CpuMode::Long {
            return Err(Exception::gp0());
        }
        v.cpu.efer &= !efer::LMA;
    }
    v.cpu.cr0 = val;
    if (old ^ val) & (cr0::PG | cr0::WP | cr0::PE) != 0 {
        v.tlb.flush_all();
    }
    v.cpu.update_mode();
    v.block_break = true;
    Ok(())
}

pub fn set_cr3(v: &mut Vcpu, val: u64) -> R {
    let long = v.cpu.efer & efer::LMA != 0;
    if long && val >> 52 != 0 {
        return Err(Exception::gp0());
    }
    v.cpu.cr3 = if long { val } else { val & 0xffff_ffff };
    v.tlb.flush(true);
    v.block_break = true;
    Ok(())
}

pub fn set_cr4(v: &mut Vcpu, val: u64) -> R {
    if val & !CR4_SUPPORTED != 0 {
        return Err(Exception::gp0());
    }
    if v.cpu.efer & efer::LMA != 0 && val & cr4::PAE == 0 {
        return Err(Exception::gp0());
    }
    if val & cr4::OSXSAVE != 0 && cpuid::guest_cpuid(1, 0, false, 1).ecx & (1 << 26) == 0 {
        return Err(Exception::gp0());
    }
    if val & cr4::FSGSBASE != 0 && cpuid::guest_cpuid(7, 0, false, 1).ebx & 1 == 0 {
        return Err(Exception::gp0());
    }
    let old = v.cpu.cr4;
    v.cpu.cr4 = val;
    if (old ^ val) & (cr4::PGE | cr4::PAE | cr4::PSE) != 0 {
        v.tlb.flush_all();
    }
    v.block_break = true;
    Ok(())
}

/// Writes EFER with its checks: LME may not change while paging is on.
pub fn set_efer(v: &mut Vcpu, val: u64) -> R {
    let supported = efer::SCE | efer::LME | efer::LMA | efer::NXE;
    if val & !supported != 0 {
        return Err(Exception::gp0());
    }
    let old = v.cpu.efer;
    if v.cpu.paging() && (old ^ val) & efer::LME != 0 {
        return Err(Exception::gp0());
    }
    // LMA is read-only: it follows LME and CR0.PG.
    v.cpu.efer = (val & !efer::LMA) | (old & efer::LMA);
    if (old ^ val) & efer::NXE != 0 {
        v.tlb.flush_all();
    }
    v.block_break = true;
    Ok(())
}

fn cr_number(r: Register) -> u32 {
    r as u32 - Register::CR0 as u32
}

fn mov_cr(v: &mut Vcpu, i: &Instruction) -> R {
    require_cpl0(v)?;
    if is_cr(i.op0_register()) {
        let val = v.reg(i.op1_register());
        match cr_number(i.op0_register()) {
            0 => set_cr0(v, val),
            2 => {
                v.cpu.cr2 = val;
                Ok(())
            }
            3 => set_cr3(v, val),
            4 => set_cr4(v, val),
            8 => {
                if val >> 4 != 0 {
                    return Err(Exception::gp0());
                }
                v.cpu.cr8 = val;
                Ok(())
            }
            _ => Err(Exception::ud()),
        }
    } else {
        let val = match cr_number(i.op1_register()) {
            0 => v.cpu.cr0,
            2 => v.cpu.cr2,
            3 => v.cpu.cr3,
            4 => v.cpu.cr4,
            8 => v.cpu.cr8,
            _ => return Err(Exception::ud()),
        };
        v.set_reg(i.op0_register(), val);
        Ok(())
    }
}

fn mov_dr(v: &mut Vcpu, i: &Instruction) -> R {
    require_cpl0(v)?;
    let (write, dr) = if is_dr(i.op0_register()) {
        (true, i.op0_register() as u32 - Register::DR0 as u32)
    } else {
        (false, i.op1_register() as u32 - Register::DR0 as u32)
    };
    let dr = match dr {
        4 | 5 if v.cpu.cr4 & cr4::DE != 0 => return Err(Exception::ud()),
        4 | 5 => dr + 2,
        0..=7 => dr,
        _ => return Err(Exception::ud()),
    } as usize;
    if write {
        let mut val = v.reg(i.op1_register());
        if dr >= 6 && val >> 32 != 0 && v.cpu.long_mode() {
            return Err(Exception::gp0());
        }
        if dr == 6 {
            val = (val & 0xe00f) | 0xffff_0ff0;
        } else if dr == 7 {
            val = (val & 0xffff_2bff) | 0x400;
            if val & 0xff != 0 {
                // Hardware breakpoints are not emulated: the guest is told
                // nothing, so count it where `--stats` shows it.
                v.stats.count_unimplemented("hardware breakpoint (DR7)");
            }
        }
        v.cpu.dr[dr] = val;
    } else {
        let x = v.cpu.dr[dr];
        v.set_reg(i.op0_register(), x);
    }
    Ok(())
}

fn lmsw(v: &mut Vcpu, i: &Instruction) -> R {
    require_cpl0(v)?;
    let x = v.read_op(i, 0, 2)?;
    // lmsw sets PE but never clears it; it writes MP, EM, TS.
    let new = (v.cpu.cr0 & !0xe) | (x & 0xf) | (v.cpu.cr0 & cr0::PE);
    set_cr0(v, new)
}

fn smsw(v: &mut Vcpu, i: &Instruction) -> R {
    let x = v.cpu.cr0;
    if i.op0_kind() == OpKind::Register {
        let r = i.op0_register();
        v.set_reg(r, if r.size() == 2 { x & 0xffff } else { x & 0xffff_ffff });
        Ok(())
    } else {
        v.write_op0(i, 2, x & 0xffff)
    }
}

fn clts(v: &mut Vcpu, _i: &Instruction) -> R {
    require_cpl0(v)?;
    v.cpu.cr0 &= !cr0::TS;
    Ok(())
}

fn invlpg(v: &mut Vcpu, i: &Instruction) -> R {
    require_cpl0(v)?;
    let off = v.effective_address(i);
    let s = seg_index(i.memory_segment());
    let lin = if v.cpu.long_mode() {
        if s >= seg::FS { off.wrapping_add(v.cpu.seg[s].base) } else { off }
    } else {
        v.cpu.seg[s].base.wrapping_add(off) & 0xffff_ffff
    };
    v.tlb.invalidate_page(lin);
    v.block_break = true;
    Ok(())
}

fn cache_flush(v: &mut Vcpu, _i: &Instruction) -> R {
    require_cpl0(v)
}

// --- descriptor tables ---

/// lgdt/lidt: limit (2 bytes) and base (3 bytes with a 16-bit operand, 4 in
/// legacy modes, 8 in 64-bit mode).
fn load_table(v: &mut Vcpu, i: &Instruction) -> R {
    require_cpl0(v)?;
    let lin = v.mem_operand(i, 2, false)?;
    let limit = v.read_lin(lin, 2)? as u16;
    let base = if v.cpu.long_mode() {
        let b = v.read_lin(lin + 2, 8)?;
        if !is_canonical(b) {
            return Err(Exception::gp0());
        }
        b
    } else {
        let b = v.read_lin(lin + 2, 4)?;
        if i.code().op_code().operand_size() == 16 { b & 0xff_ffff } else { b }
    };
    let t = crate::cpu::DescriptorTable { base, limit };
    if i.mnemonic() == M::Lgdt {
        v.cpu.gdtr = t;
    } else {
        v.cpu.idtr = t;
    }
    Ok(())
}

fn store_table(v: &mut Vcpu, i: &Instruction) -> R {
    let t = if i.mnemonic() == M::Sgdt { v.cpu.gdtr } else { v.cpu.idtr };
    let base_size = if v.cpu.long_mode() { 8 } else { 4 };
    let lin = v.mem_operand(i, 2 + base_size, true)?;
    v.probe_write(lin, 2 + base_size)?;
    v.write_lin(lin, 2, t.limit as u64)?;
    v.write_lin(lin + 2, base_size, t.base)
}

fn lldt(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    require_cpl0(v)?;
    let sel = v.read_op(i, 0, 2)? as u16;
    if sel & 0xfffc == 0 {
        v.cpu.ldtr = Segment { base: 0, limit: 0, selector: sel, attr: 0 };
        return Ok(());
    }
    let err = selector_error(sel);
    if sel & 4 != 0 {
        return Err(Exception::gp(err));
    }
    let d = read_system_descriptor(v, sel)?;
    if d.is_code_data() || d.seg_type() != 2 {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::np(err));
    }
    v.cpu.ldtr = system_segment(v, &d, sel);
    Ok(())
}

fn system_segment(v: &Vcpu, d: &Descriptor, sel: u16) -> Segment {
    let mut s = d.to_segment(sel);
    if v.cpu.efer & efer::LMA != 0 {
        s.base = d.base64();
    }
    s
}

fn ltr(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    require_cpl0(v)?;
    let sel = v.read_op(i, 0, 2)? as u16;
    let err = selector_error(sel);
    if sel & 0xfffc == 0 {
        return Err(Exception::gp0());
    }
    if sel & 4 != 0 {
        return Err(Exception::gp(err));
    }
    let mut d = read_system_descriptor(v, sel)?;
    let long = v.cpu.efer & efer::LMA != 0;
    let ok = !d.is_code_data() && if long { d.seg_type() == 9 } else { matches!(d.seg_type(), 1 | 9) };
    if !ok {
        return Err(Exception::gp(err));
    }
    if !d.present() {
        return Err(Exception::np(err));
    }
    // Mark the TSS busy, in the descriptor table and in TR.
    d.lo |= 2 << 40;
    let lin = v.cpu.gdtr.base.wrapping_add((sel & 0xfff8) as u64);
    v.write_lin_as(lin + 5, 1, (d.lo >> 40) & 0xff, false)?;
    v.cpu.tr = system_segment(v, &d, sel);
    Ok(())
}

fn store_selector(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    let sel = if i.mnemonic() == M::Sldt { v.cpu.ldtr.selector } else { v.cpu.tr.selector } as u64;
    if i.op0_kind() == OpKind::Register {
        v.set_reg(i.op0_register(), sel);
        Ok(())
    } else {
        v.write_op0(i, 2, sel)
    }
}

/// The descriptor behind `sel` if the current privilege may see it, for lar/lsl/verr/verw.
fn probe_descriptor(v: &mut Vcpu, sel: u16) -> Result<Option<Descriptor>, Exception> {
    if sel & 0xfffc == 0 {
        return Ok(None);
    }
    let d = match read_descriptor(v, sel) {
        Ok(d) => d,
        Err(e) if e.vector == crate::exception::vector::GP => return Ok(None),
        Err(e) => return Err(e),
    };
    let rpl = (sel & 3) as u8;
    if !d.is_conforming_code() && (d.dpl() < v.cpu.cpl || d.dpl() < rpl) {
        return Ok(None);
    }
    Ok(Some(d))
}

fn lar_lsl(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    let sel = v.read_op(i, 1, 2)? as u16;
    let d = probe_descriptor(v, sel)?;
    let long = v.cpu.efer & efer::LMA != 0;
    let lar = i.mnemonic() == M::Lar;
    let valid = d.filter(|d| {
        d.is_code_data()
            || match d.seg_type() {
                2 | 9 | 0xb => true,
                1 | 3 => !long,
                4 | 5 => lar && !long,
                0xc => lar,
                _ => false,
            }
    });
    match valid {
        Some(d) => {
            let x = if lar { (d.lo >> 32) & 0x00f0_ff00 } else { d.limit() as u64 };
            let r = i.op0_register();
            let x = if r.size() == 2 { x & 0xffff } else { x & 0xffff_ffff };
            v.set_reg(r, x);
            v.set_flag(rflags::ZF, true);
        }
        None => v.set_flag(rflags::ZF, false),
    }
    Ok(())
}

fn verr_verw(v: &mut Vcpu, i: &Instruction) -> R {
    if matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    let sel = v.read_op(i, 0, 2)? as u16;
    let d = probe_descriptor(v, sel)?;
    let ok = d.is_some_and(|d| {
        if i.mnemonic() == M::Verr { d.is_readable() } else { d.is_writable_data() }
    });
    v.set_flag(rflags::ZF, ok);
    Ok(())
}

// --- MSRs ---

/// The guest's `rdmsr`: `None` means the MSR does not exist (#GP).
pub fn read_msr(v: &Vcpu, index: u32) -> Option<u64> {
    let m = &v.cpu.msr;
    Some(match index {
        msr::TSC => super::flags::guest_tsc(v),
        msr::PLATFORM_ID | msr::BIOS_SIGN_ID => 0,
        msr::APIC_BASE => m.apic_base,
        msr::SYSENTER_CS => m.sysenter_cs,
        msr::SYSENTER_ESP => m.sysenter_esp,
        msr::SYSENTER_EIP => m.sysenter_eip,
        msr::MISC_ENABLE => m.misc_enable,
        msr::PAT => m.pat,
        msr::EFER => v.cpu.efer,
        msr::STAR => m.star,
        msr::LSTAR => m.lstar,
        msr::CSTAR => m.cstar,
        msr::SFMASK => m.sfmask,
        msr::FS_BASE => v.cpu.seg[seg::FS].base,
        msr::GS_BASE => v.cpu.seg[seg::GS].base,
        msr::KERNEL_GS_BASE => m.kernel_gs_base,
        msr::TSC_AUX => m.tsc_aux,
        i => m.inert[crate::cpu::Msrs::inert_slot(i)?],
    })
}

/// The guest's `wrmsr`.
pub fn write_msr(v: &mut Vcpu, index: u32, val: u64) -> R {
    let canonical = |x: u64| if is_canonical(x) { Ok(x) } else { Err(Exception::gp0()) };
    match index {
        msr::TSC => {
            let host = super::flags::guest_tsc(v).wrapping_sub(v.cpu.msr.tsc_offset);
            v.cpu.msr.tsc_offset = val.wrapping_sub(host);
        }
        msr::BIOS_SIGN_ID => {}
        msr::APIC_BASE => v.cpu.msr.apic_base = val & 0x000f_ffff_ffff_f900,
        msr::SYSENTER_CS => v.cpu.msr.sysenter_cs = val & 0xffff,
        msr::SYSENTER_ESP => v.cpu.msr.sysenter_esp = canonical(val)?,
        msr::SYSENTER_EIP => v.cpu.msr.sysenter_eip = canonical(val)?,
        msr::MISC_ENABLE => v.cpu.msr.misc_enable = val,
        msr::PAT => {
            if (0..8).any(|k| matches!((val >> (8 * k)) & 0xff, 2 | 3 | 8..=0xff)) {
                return Err(Exception::gp0());
            }
            v.cpu.msr.pat = val;
        }
        msr::EFER => set_efer(v, val)?,
        msr::STAR => v.cpu.msr.star = val,
        msr::LSTAR => v.cpu.msr.lstar = canonical(val)?,
        msr::CSTAR => v.cpu.msr.cstar = canonical(val)?,
        msr::SFMASK => v.cpu.msr.sfmask = val & 0xffff_ffff,
        msr::FS_BASE => v.cpu.seg[seg::FS].base = canonical(val)?,
        msr::GS_BASE => v.cpu.seg[seg::GS].base = canonical(val)?,
        msr::KERNEL_GS_BASE => v.cpu.msr.kernel_gs_base = canonical(val)?,
        msr::TSC_AUX => v.cpu.msr.tsc_aux = val & 0xffff_ffff,
        i => {
            let slot = crate::cpu::Msrs::inert_slot(i).ok_or(Exception::gp0())?;
            v.cpu.msr.inert[slot] = val;
        }
    }
    Ok(())
}

fn rdmsr(v: &mut Vcpu, _i: &Instruction) -> R {
    require_cpl0(v)?;
    let index = v.cpu.regs.gpr[1] as u32;
    let Some(x) = read_msr(v, index) else {
        tracing::debug!(target: "exception", msr = format_args!("{index:#x}"), "rdmsr of unknown MSR: #GP");
        return Err(Exception::gp0());
    };
    v.cpu.regs.gpr[0] = x & 0xffff_ffff;
    v.cpu.regs.gpr[2] = x >> 32;
    Ok(())
}

fn wrmsr(v: &mut Vcpu, _i: &Instruction) -> R {
    require_cpl0(v)?;
    let g = &v.cpu.regs.gpr;
    let index = g[1] as u32;
    let val = (g[0] & 0xffff_ffff) | (g[2] << 32);
    write_msr(v, index, val).inspect_err(|_| {
        tracing::debug!(target: "exception", msr = format_args!("{index:#x}"), val, "wrmsr refused: #GP");
    })?;
    v.block_break = true;
    Ok(())
}

// --- fast system calls ---

fn flat_code(sel: u16, dpl: u8, long: bool) -> Segment {
    let mut attr = 0x9b | ((dpl as u16) << Segment::ATTR_DPL_SHIFT) | Segment::ATTR_G;
    attr |= if long { Segment::ATTR_L } else { Segment::ATTR_DB };
    Segment { base: 0, limit: 0xffff_ffff, selector: sel, attr }
}

fn flat_stack(sel: u16, dpl: u8) -> Segment {
    let attr = 0x93 | ((dpl as u16) << Segment::ATTR_DPL_SHIFT) | Segment::ATTR_G | Segment::ATTR_DB;
    Segment { base: 0, limit: 0xffff_ffff, selector: sel, attr }
}

fn enter_mode(v: &mut Vcpu, cs: Segment, ss: Segment, cpl: u8) {
    v.cpu.seg[seg::CS] = cs;
    v.cpu.seg[seg::SS] = ss;
    v.cpu.cpl = cpl;
    v.cpu.update_mode();
    v.block_break = true;
}

fn syscall(v: &mut Vcpu, _i: &Instruction) -> R {
    if v.cpu.efer & efer::SCE == 0 || matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::ud());
    }
    let sel = ((v.cpu.msr.star >> 32) & 0xfffc) as u16;
    let next = v.cpu.regs.rip;
    if v.cpu.efer & efer::LMA != 0 {
        v.cpu.regs.gpr[1] = next;
        v.cpu.regs.gpr[11] = v.cpu.regs.rflags & !rflags::RF;
        let target = if v.cpu.mode == CpuMode::Long { v.cpu.msr.lstar } else { v.cpu.msr.cstar };
        enter_mode(v, flat_code(sel, 0, true), flat_stack(sel + 8, 0), 0);
        v.cpu.regs.rflags &= !(v.cpu.msr.sfmask | rflags::RF);
        v.cpu.regs.rflags |= rflags::FIXED1;
        v.cpu.regs.rip = target;
    } else {
        v.cpu.regs.gpr[1] = next & 0xffff_ffff;
        enter_mode(v, flat_code(sel, 0, false), flat_stack(sel + 8, 0), 0);
        v.cpu.regs.rflags &= !(rflags::VM | rflags::IF | rflags::RF);
        v.cpu.regs.rip = v.cpu.msr.star & 0xffff_ffff;
    }
    v.cpu.update_mode();
    Ok(())
}

fn sysret(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.efer & efer::SCE == 0 {
        return Err(Exception::ud());
    }
    if v.cpu.cpl != 0 || matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::gp0());
    }
    let base = ((v.cpu.msr.star >> 48) & 0xfffc) as u16;
    let wide = i.mnemonic() == M::Sysretq;
    let rcx = v.cpu.regs.gpr[1];
    if v.cpu.efer & efer::LMA != 0 {
        if wide && !is_canonical(rcx) {
            return Err(Exception::gp0());
        }
        let (cs, rip) = if wide {
            (flat_code((base + 16) | 3, 3, true), rcx)
        } else {
            (flat_code(base | 3, 3, false), rcx & 0xffff_ffff)
        };
        let fl = (v.cpu.regs.gpr[11] & (rflags::WRITABLE & !(rflags::RF | rflags::VM))) | rflags::FIXED1;
        v.cpu.regs.rflags = fl;
        enter_mode(v, cs, flat_stack((base + 8) | 3, 3), 3);
        v.cpu.regs.rip = rip;
    } else {
        enter_mode(v, flat_code(base | 3, 3, false), flat_stack((base + 8) | 3, 3), 3);
        v.cpu.regs.rflags |= rflags::IF;
        v.cpu.regs.rip = rcx & 0xffff_ffff;
    }
    Ok(())
}

fn sysenter(v: &mut Vcpu, _i: &Instruction) -> R {
    let cs = (v.cpu.msr.sysenter_cs & 0xfffc) as u16;
    if v.cpu.mode == CpuMode::Real || cs == 0 {
        return Err(Exception::gp0());
    }
    let long = v.cpu.efer & efer::LMA != 0;
    v.cpu.regs.rflags &= !(rflags::VM | rflags::IF | rflags::RF);
    enter_mode(v, flat_code(cs, 0, long), flat_stack(cs + 8, 0), 0);
    let (eip, esp) = (v.cpu.msr.sysenter_eip, v.cpu.msr.sysenter_esp);
    v.cpu.regs.rip = if long { eip } else { eip & 0xffff_ffff };
    v.cpu.regs.gpr[4] = if long { esp } else { esp & 0xffff_ffff };
    Ok(())
}

fn sysexit(v: &mut Vcpu, i: &Instruction) -> R {
    let cs = (v.cpu.msr.sysenter_cs & 0xfffc) as u16;
    if v.cpu.cpl != 0 || cs == 0 || matches!(v.cpu.mode, CpuMode::Real | CpuMode::Virtual8086) {
        return Err(Exception::gp0());
    }
    let wide = i.mnemonic() == M::Sysexitq;
    let (rdx, rcx) = (v.cpu.regs.gpr[2], v.cpu.regs.gpr[1]);
    if wide {
        if !is_canonical(rdx) || !is_canonical(rcx) {
            return Err(Exception::gp0());
        }
        enter_mode(v, flat_code((cs + 32) | 3, 3, true), flat_stack((cs + 40) | 3, 3), 3);
        v.cpu.regs.rip = rdx;
        v.cpu.regs.gpr[4] = rcx;
    } else {
        enter_mode(v, flat_code((cs + 16) | 3, 3, false), flat_stack((cs + 24) | 3, 3), 3);
        v.cpu.regs.rip = rdx & 0xffff_ffff;
        v.cpu.regs.gpr[4] = rcx & 0xffff_ffff;
    }
    Ok(())
}

fn swapgs(v: &mut Vcpu, _i: &Instruction) -> R {
    if v.cpu.mode != CpuMode::Long {
        return Err(Exception::ud());
    }
    require_cpl0(v)?;
    std::mem::swap(&mut v.cpu.seg[seg::GS].base, &mut v.cpu.msr.kernel_gs_base);
    Ok(())
}

// --- XCR0, FS/GS base, misc ---

fn xgetbv(v: &mut Vcpu, _i: &Instruction) -> R {
    if v.cpu.cr4 & cr4::OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    let x = match v.cpu.regs.gpr[1] as u32 {
        0 => v.cpu.xcr0,
        _ => return Err(Exception::gp0()),
    };
    v.cpu.regs.gpr[0] = x & 0xffff_ffff;
    v.cpu.regs.gpr[2] = x >> 32;
    Ok(())
}

fn xsetbv(v: &mut Vcpu, _i: &Instruction) -> R {
    if v.cpu.cr4 & cr4::OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    require_cpl0(v)?;
    let g = &v.cpu.regs.gpr;
    let val = (g[0] & 0xffff_ffff) | (g[2] << 32);
    let supported = cpuid::guest_cpuid(0xd, 0, true, 1).eax as u64;
    if g[1] as u32 != 0 || val & !supported != 0 {
        return Err(Exception::gp0());
    }
    v.fpu.set_xcr0(val).map_err(|_| Exception::gp0())?;
    v.cpu.xcr0 = val;
    Ok(())
}

fn fsgsbase(v: &mut Vcpu, i: &Instruction) -> R {
    if v.cpu.mode != CpuMode::Long || v.cpu.cr4 & cr4::FSGSBASE == 0 {
        return Err(Exception::ud());
    }
    let s = if matches!(i.mnemonic(), M::Rdfsbase | M::Wrfsbase) { seg::FS } else { seg::GS };
    let r = i.op0_register();
    match i.mnemonic() {
        M::Rdfsbase | M::Rdgsbase => {
            let b = v.cpu.seg[s].base;
            v.set_reg(r, b);
        }
        _ => {
            let b = v.reg(r);
            if !is_canonical(b) {
                return Err(Exception::gp0());
            }
            v.cpu.seg[s].base = b;
        }
    }
    Ok(())
}

fn rdpid(v: &mut Vcpu, i: &Instruction) -> R {
    let x = v.cpu.msr.tsc_aux;
    v.set_reg(i.op0_register(), x);
    Ok(())
}

/// No performance counters exist: every counter index is invalid.
fn rdpmc(_v: &mut Vcpu, _i: &Instruction) -> R {
    Err(Exception::gp0())
}
