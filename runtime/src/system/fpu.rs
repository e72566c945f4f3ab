//! x87/SSE/AVX instructions as the interpreter runs them, and the state
//! save/restore instructions fxsave, fxrstor, xsave, xsaveopt, xrstor
//! (SDM Vol. 1 chapters 10.5 and 13; Vol. 2 FXSAVE/XSAVE/XRSTOR).
//!
//! Data instructions are executed natively one at a time by
//! [`crate::simd::SimdExecutor`] with their memory operand staged in a host
//! buffer (counted in `--stats` as "executed natively"); this module does
//! the guest-visible part: enabling checks, segmentation and paging of the
//! operand, and exception mapping.

use iced_x86::{Instruction, Mnemonic as M, Register};

use crate::cpu::{cr0, cr4};
use crate::exception::{vector, Exception};
use crate::interp::access::seg_index;
use crate::interp::{Handler, Vcpu};
use crate::simd::{self, Access, FpuState, SimdControl, SimdExecutor, SimdOutcome};

type R = Result<(), Exception>;

pub fn handler(i: &Instruction) -> Option<Handler> {
    match i.mnemonic() {
        M::Fxsave | M::Fxsave64 => Some(fxsave),
        M::Fxrstor | M::Fxrstor64 => Some(fxrstor),
        M::Xsave | M::Xsave64 | M::Xsaveopt | M::Xsaveopt64 => Some(xsave),
        M::Xrstor | M::Xrstor64 => Some(xrstor),
        _ if simd::is_simd(i) => Some(execute),
        _ => None,
    }
}

fn control(v: &Vcpu) -> SimdControl {
    SimdControl { cr0: v.cpu.cr0, cr4: v.cpu.cr4, xcr0: v.cpu.xcr0 }
}

fn execute(v: &mut Vcpu, i: &Instruction) -> R {
    simd::check_enabled(i, control(v)).map_err(Exception::new)?;
    let mut buf = [0u8; 512];
    let mut operand = None;
    if let Some((size, access)) = simd::memory_access(i) {
        let write = access != Access::Read;
        let lin = operand_linear(v, i, size as u32, write)?;
        if simd::alignment_fault(i, lin) {
            return Err(Exception::gp0());
        }
        let size = size.min(buf.len());
        if write {
            v.probe_write(lin, size as u32)?;
        }
        if access != Access::Write {
            read_bytes(v, lin, &mut buf[..size])?;
        }
        operand = Some((lin, size, write));
    }
    let started = std::time::Instant::now();
    if v.simd.is_none() {
        match SimdExecutor::new() {
            Ok(e) => v.simd = Some(Box::new(e)),
            Err(err) => {
                tracing::error!(target: "exception", "cannot start the SIMD executor: {err}");
                v.stats.count_unimplemented("x87/SSE/AVX (executor unavailable)");
                return Err(Exception::ud());
            }
        }
    }
    let Some(exec) = v.simd.as_mut() else { return Err(Exception::ud()) };
    let size = operand.map_or(0, |(_, s, _)| s);
    let lin = operand.map_or(0, |(l, _, _)| l);
    let outcome = exec.execute(i, &mut v.cpu.regs.gpr, &mut v.cpu.regs.rflags, &mut v.fpu, &mut buf[..size], lin);
    v.stats.simd_native += 1;
    v.stats.vmm_ns += started.elapsed().as_nanos() as u64;
    match outcome {
        SimdOutcome::Done => {
            if let Some((lin, size, true)) = operand {
                write_bytes(v, lin, &buf[..size])?;
            }
            Ok(())
        }
        SimdOutcome::Unsupported => {
            v.stats.count_unimplemented(&format!("{:?}", i.mnemonic()).to_lowercase());
            Err(Exception::ud())
        }
        SimdOutcome::Exception(vector::XM) if v.cpu.cr4 & cr4::OSXMMEXCPT == 0 => Err(Exception::ud()),
        SimdOutcome::Exception(vec) if vec == vector::GP => Err(Exception::gp0()),
        SimdOutcome::Exception(vec) => Err(Exception::new(vec)),
    }
}

/// Linear address of the memory operand; `maskmov*` store through DS:rDI.
fn operand_linear(v: &mut Vcpu, i: &Instruction, size: u32, write: bool) -> Result<u64, Exception> {
    if matches!(i.mnemonic(), M::Maskmovq | M::Maskmovdqu | M::Vmaskmovdqu) {
        let di = match i.memory_base() {
            Register::EDI => v.cpu.regs.gpr[7] & 0xffff_ffff,
            Register::DI => v.cpu.regs.gpr[7] & 0xffff,
            _ => v.cpu.regs.gpr[7],
        };
        return v.linear(seg_index(i.memory_segment()), di, size, write);
    }
    v.mem_operand(i, size.min(16), write).and_then(|lin| {
        if size > 16 {
            // Check the whole operand against the segment, not just the first 16 bytes.
            v.mem_operand(i, size, write)
        } else {
            Ok(lin)
        }
    })
}

fn read_bytes(v: &mut Vcpu, lin: u64, buf: &mut [u8]) -> R {
    for (k, chunk) in buf.chunks_mut(8).enumerate() {
        let addr = lin + 8 * k as u64;
        if chunk.len() == 8 {
            chunk.copy_from_slice(&v.read_lin(addr, 8)?.to_le_bytes());
        } else {
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = v.read_lin(addr + j as u64, 1)? as u8;
            }
        }
    }
    Ok(())
}

fn write_bytes(v: &mut Vcpu, lin: u64, buf: &[u8]) -> R {
    for (k, chunk) in buf.chunks(8).enumerate() {
        let addr = lin + 8 * k as u64;
        if chunk.len() == 8 {
            v.write_lin(addr, 8, u64::from_le_bytes(chunk.try_into().unwrap_or_default()))?;
        } else {
            for (j, b) in chunk.iter().enumerate() {
                v.write_lin(addr + j as u64, 1, *b as u64)?;
            }
        }
    }
    Ok(())
}

/// #UD/#NM checks shared by the save/restore instructions.
fn check_fx(v: &Vcpu) -> R {
    if v.cpu.cr0 & cr0::EM != 0 {
        return Err(Exception::ud());
    }
    if v.cpu.cr0 & cr0::TS != 0 {
        return Err(Exception::nm());
    }
    Ok(())
}

fn check_xsave(v: &Vcpu) -> R {
    if v.cpu.cr4 & cr4::OSXSAVE == 0 {
        return Err(Exception::ud());
    }
    if v.cpu.cr0 & cr0::TS != 0 {
        return Err(Exception::nm());
    }
    Ok(())
}

/// The aligned, writable (or readable) memory operand of a save/restore.
fn area_operand(v: &mut Vcpu, i: &Instruction, size: u32, align: u64, write: bool) -> Result<u64, Exception> {
    let lin = v.mem_operand(i, size, write)?;
    if lin & (align - 1) != 0 {
        return Err(Exception::gp0());
    }
    if write {
        v.probe_write(lin, size)?;
    }
    Ok(lin)
}

fn fxsave(v: &mut Vcpu, i: &Instruction) -> R {
    check_fx(v)?;
    let lin = area_operand(v, i, 512, 16, true)?;
    let image = *v.fpu.legacy_region();
    // Bytes 464..511 are available to software: hardware leaves them alone.
    write_bytes(v, lin, &image[..464])
}

fn fxrstor(v: &mut Vcpu, i: &Instruction) -> R {
    check_fx(v)?;
    let lin = area_operand(v, i, 512, 16, false)?;
    let mut image = [0u8; 512];
    read_bytes(v, lin, &mut image)?;
    let mxcsr = u32::from_le_bytes([image[24], image[25], image[26], image[27]]);
    if mxcsr & !FpuState::mxcsr_mask() != 0 {
        return Err(Exception::gp0());
    }
    let legacy = v.fpu.legacy_region_mut();
    legacy[..464].copy_from_slice(&image[..464]);
    Ok(())
}

/// Requested-feature bitmap: XCR0 & EDX:EAX.
fn rfbm(v: &Vcpu) -> u64 {
    let g = &v.cpu.regs.gpr;
    v.cpu.xcr0 & ((g[0] & 0xffff_ffff) | (g[2] << 32))
}

/// Byte ranges of each state component in the standard-format area.
fn component_ranges(area_len: usize, bit: u32) -> [std::ops::Range<usize>; 2] {
    match bit {
        0 => [0..24, 32..160],
        1 => [160..416, 0..0],
        // AVX: everything past the header (the host layout puts YMM_Hi128 there).
        _ => [576..area_len, 0..0],
    }
}

fn xsave(v: &mut Vcpu, i: &Instruction) -> R {
    check_xsave(v)?;
    let size = v.fpu.xsave_size() as u32;
    let lin = area_operand(v, i, size, 64, true)?;
    let rfbm = rfbm(v);
    let area = v.fpu.area().to_vec();
    for bit in 0..3 {
        if rfbm & (1 << bit) != 0 {
            for r in component_ranges(area.len(), bit) {
                write_bytes(v, lin + r.start as u64, &area[r])?;
            }
        }
    }
    if rfbm & 0b110 != 0 {
        // MXCSR and MXCSR_MASK belong to SSE and AVX alike.
        write_bytes(v, lin + 24, &area[24..32])?;
    }
    let old_bv = v.read_lin(lin + 512, 8)?;
    let new_bv = (old_bv & !rfbm) | (u64::from_le_bytes(area[512..520].try_into().unwrap_or_default()) & rfbm);
    v.write_lin(lin + 512, 8, new_bv)
}

fn xrstor(v: &mut Vcpu, i: &Instruction) -> R {
    check_xsave(v)?;
    let size = v.fpu.xsave_size() as u32;
    let lin = area_operand(v, i, size, 64, false)?;
    let mut image = vec![0u8; size as usize];
    read_bytes(v, lin, &mut image)?;
    let bv = u64::from_le_bytes(image[512..520].try_into().unwrap_or_default());
    let comp = u64::from_le_bytes(image[520..528].try_into().unwrap_or_default());
    // Standard form only: XCOMP_BV zero, XSTATE_BV within XCR0, reserved header bytes zero.
    if comp != 0 || bv & !v.cpu.xcr0 != 0 || image[528..576].iter().any(|&b| b != 0) {
        return Err(Exception::gp0());
    }
    let rfbm = rfbm(v);
    let mxcsr = u32::from_le_bytes(image[24..28].try_into().unwrap_or_default());
    if rfbm & 0b110 != 0 && mxcsr & !FpuState::mxcsr_mask() != 0 {
        return Err(Exception::gp0());
    }
    let init = FpuState::new();
    let init_area = init.area().to_vec();
    let area = v.fpu.area_mut();
    for bit in 0..3 {
        if rfbm & (1 << bit) == 0 {
            continue;
        }
        let src = if bv & (1 << bit) != 0 { &image } else { &init_area };
        for r in component_ranges(area.len(), bit) {
            let r = r.start..r.end.min(src.len()).min(area.len());
            area[r.clone()].copy_from_slice(&src[r]);
        }
    }
    if rfbm & 0b110 != 0 {
        area[24..28].copy_from_slice(&image[24..28]);
    }
    Ok(())
}
