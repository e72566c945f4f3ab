//! Port I/O: in, out, ins, outs with the IOPL and TSS I/O-bitmap checks
//! (SDM Vol. 1, chapter 19).

use iced_x86::{Instruction, Mnemonic, OpKind, Register};

use crate::cpu::{seg, CpuMode};
use crate::exception::Exception;
use crate::interp::access::{seg_index, size_mask};
use crate::interp::Vcpu;

type R = Result<(), Exception>;

/// #GP(0) unless the current privilege may access `size` bytes at `port`.
pub fn check_io(v: &mut Vcpu, port: u16, size: u32) -> R {
    let allowed = match v.cpu.mode {
        CpuMode::Real => true,
        CpuMode::Virtual8086 => false,
        _ => v.cpu.cpl <= v.cpu.iopl(),
    };
    if allowed {
        return Ok(());
    }
    // Consult the I/O permission bitmap of a 32/64-bit TSS.
    let tr = v.cpu.tr;
    if tr.seg_type() & 8 == 0 || tr.limit < 0x67 {
        return Err(Exception::gp0());
    }
    let map = v.read_lin_as(tr.base.wrapping_add(0x66), 2, false)?;
    let byte = map + (port as u64 >> 3);
    if byte + 1 > tr.limit as u64 {
        return Err(Exception::gp0());
    }
    let bits = v.read_lin_as(tr.base.wrapping_add(byte), 2, false)?;
    let want = ((1u64 << size) - 1) << (port & 7);
    if bits & want != 0 {
        return Err(Exception::gp0());
    }
    Ok(())
}

fn acc(size: u32) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        _ => Register::EAX,
    }
}

pub fn in_out(v: &mut Vcpu, i: &Instruction) -> R {
    let is_in = i.mnemonic() == Mnemonic::In;
    let (port_op, data_op) = if is_in { (1, 0) } else { (0, 1) };
    let port = match i.op_kind(port_op) {
        OpKind::Register => v.reg(Register::DX) as u16,
        _ => i.immediate8() as u16,
    };
    let size = i.op_register(data_op).size() as u32;
    check_io(v, port, size)?;
    if is_in {
        let x = v.io_in(port, size as u8);
        v.set_reg(acc(size), x as u64);
    } else {
        let x = v.reg(acc(size)) as u32;
        v.io_out(port, size as u8, x);
    }
    v.block_break = true;
    Ok(())
}

pub fn ins(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.memory_size().size() as u32;
    let port = v.reg(Register::DX) as u16;
    check_io(v, port, size)?;
    let r = crate::interp::string_regs(i);
    crate::interp::run_string(v, i, |v| {
        let di = v.reg(r.di) & r.amask;
        let lin = v.linear(seg::ES, di, size, true)?;
        v.probe_write(lin, size)?;
        let x = v.io_in(port, size as u8) as u64;
        v.write_lin(lin, size, x & size_mask(size))?;
        crate::interp::advance_reg(v, r.di, r.amask, size);
        Ok(crate::interp::Step::Continue)
    })?;
    v.block_break = true;
    Ok(())
}

pub fn outs(v: &mut Vcpu, i: &Instruction) -> R {
    let size = i.memory_size().size() as u32;
    let port = v.reg(Register::DX) as u16;
    check_io(v, port, size)?;
    let r = crate::interp::string_regs(i);
    let sreg = seg_index(i.memory_segment());
    crate::interp::run_string(v, i, |v| {
        let si = v.reg(r.si) & r.amask;
        let x = v.read_mem(sreg, si, size)?;
        v.io_out(port, size as u8, x as u32);
        crate::interp::advance_reg(v, r.si, r.amask, size);
        Ok(crate::interp::Step::Continue)
    })?;
    v.block_break = true;
    Ok(())
}
