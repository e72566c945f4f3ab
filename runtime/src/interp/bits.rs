//! Bit instructions: bt/bts/btr/btc, bsf/bsr, popcnt/lzcnt/tzcnt, BMI1/BMI2,
//! adcx/adox (SDM Vol. 2).

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::access::{size_mask, Loc};
use super::alu;
use super::integer::{op_size, sext};
use super::Vcpu;
use crate::cpu::rflags::{AF, CF, OF, PF, SF, ZF};
use crate::exception::Exception;

type R = Result<(), Exception>;

/// bt, bts, btr, btc. With a register bit offset and a memory operand the
/// offset is signed and selects any bit relative to the operand's address.
pub fn bt(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let bits = size as u64 * 8;
    let modifies = i.mnemonic() != Mnemonic::Bt;
    let (loc, bit) = match (i.op0_kind(), i.op1_kind()) {
        (OpKind::Register, OpKind::Register) => (Loc::Reg(i.op0_register()), v.reg(i.op1_register()) % bits),
        (OpKind::Register, _) => (Loc::Reg(i.op0_register()), i.immediate(1) % bits),
        (_, OpKind::Register) => {
            let off = sext(v.reg(i.op1_register()), size);
            let ea = v.effective_address(i);
            let byte_off = (off >> 3) & !(size as i64 - 1);
            let ea = ea.wrapping_add(byte_off as u64) & addr_mask(v, i);
            let seg = super::access::seg_index(i.memory_segment());
            let lin = v.linear(seg, ea, size, modifies)?;
            (Loc::Mem(lin), (off as u64) & (bits - 1))
        }
        _ => (Loc::Mem(v.mem_operand(i, size, modifies)?), i.immediate(1) % bits),
    };
    if modifies {
        if let Loc::Mem(lin) = loc {
            v.probe_write(lin, size)?;
        }
    }
    let x = v.read_loc(loc, size)?;
    let old = (x >> bit) & 1;
    let y = match i.mnemonic() {
        Mnemonic::Bts => x | (1 << bit),
        Mnemonic::Btr => x & !(1 << bit),
        Mnemonic::Btc => x ^ (1 << bit),
        _ => x,
    };
    if modifies {
        v.write_loc(loc, size, y)?;
    }
    v.set_flag(CF, old != 0);
    Ok(())
}

fn addr_mask(v: &Vcpu, i: &Instruction) -> u64 {
    let r = if i.memory_base() != iced_x86::Register::None { i.memory_base() } else { i.memory_index() };
    match r.size() {
        2 => 0xffff,
        4 => 0xffff_ffff,
        _ if v.cpu.long_mode() => u64::MAX,
        _ => 0xffff_ffff,
    }
}

/// bsf/bsr: ZF=1 and the destination unchanged when the source is zero.
/// The other flags are undefined; as AMD CPUs give them (translated code
/// runs these natively, and the interpreter when a TLB miss leaves one to
/// it): PF from the bit index (as if 0 for a zero source), the rest clear.
pub fn bit_scan(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let x = v.read_op(i, 1, size)?;
    let dst = i.op0_register();
    let r = if x == 0 {
        0
    } else {
        let r = if i.mnemonic() == Mnemonic::Bsf { x.trailing_zeros() } else { 63 - x.leading_zeros() };
        v.set_reg(dst, r as u64);
        r as u64
    };
    let zf = if x == 0 { ZF } else { 0 };
    v.set_arith(CF | PF | AF | ZF | SF | OF, (alu::szp(size, r) & PF) | zf);
    Ok(())
}

/// popcnt, lzcnt, tzcnt.
pub fn count_bits(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let x = v.read_op(i, 1, size)?;
    let bits = size * 8;
    let (r, cf) = match i.mnemonic() {
        Mnemonic::Popcnt => (x.count_ones(), false),
        Mnemonic::Lzcnt => ((x.leading_zeros() - (64 - bits)).min(bits), x == 0),
        _ => (x.trailing_zeros().min(bits), x == 0),
    };
    v.set_reg(i.op0_register(), r as u64);
    let zf = if i.mnemonic() == Mnemonic::Popcnt { x == 0 } else { r == 0 };
    let f = (cf as u64) | if zf { ZF } else { 0 };
    // lzcnt and tzcnt leave OF, SF, AF and PF undefined: AMD CPUs keep OF
    // and clear the rest (popcnt clears them all, as defined).
    let changed = if i.mnemonic() == Mnemonic::Popcnt { CF | PF | AF | ZF | SF | OF } else { CF | PF | AF | ZF | SF };
    v.set_arith(changed, f);
    Ok(())
}

/// BMI1/BMI2 (VEX-encoded general-purpose instructions).
pub fn bmi(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let m = size_mask(size);
    let bits = size * 8;
    let dst = i.op0_register();
    // AF and PF are undefined (SF too for bextr): AMD CPUs give PF from
    // the result and clear AF, except bextr, which sets AF and clears SF.
    let logic = |v: &mut Vcpu, r: u64, cf: bool| {
        let f = alu::szp(size, r) & (ZF | SF | PF) | cf as u64;
        let f = if i.mnemonic() == Mnemonic::Bextr { (f & !SF) | AF } else { f };
        v.set_arith(CF | ZF | SF | OF | AF | PF, f);
    };
    match i.mnemonic() {
        Mnemonic::Andn => {
            let a = v.reg(i.op1_register());
            let b = v.read_op(i, 2, size)?;
            let r = !a & b & m;
            v.set_reg(dst, r);
            logic(v, r, false);
        }
        Mnemonic::Bextr => {
            let src = v.read_op(i, 1, size)?;
            let ctl = v.reg(i.op2_register());
            let start = (ctl & 0xff) as u32;
            let len = ((ctl >> 8) & 0xff) as u32;
            let r = if start >= bits { 0 } else { (src >> start) & low_mask(len) } & m;
            v.set_reg(dst, r);
            logic(v, r, false);
        }
        Mnemonic::Blsi | Mnemonic::Blsmsk | Mnemonic::Blsr => {
            let s = v.read_op(i, 1, size)?;
            let r = match i.mnemonic() {
                Mnemonic::Blsi => s & s.wrapping_neg(),
                Mnemonic::Blsmsk => s ^ s.wrapping_sub(1),
                _ => s & s.wrapping_sub(1),
            } & m;
            v.set_reg(dst, r);
            let cf = if i.mnemonic() == Mnemonic::Blsr || i.mnemonic() == Mnemonic::Blsmsk { s == 0 } else { s != 0 };
            logic(v, r, cf);
        }
        Mnemonic::Bzhi => {
            let s = v.read_op(i, 1, size)?;
            let n = (v.reg(i.op2_register()) & 0xff) as u32;
            let r = if n >= bits { s } else { s & low_mask(n) } & m;
            v.set_reg(dst, r);
            logic(v, r, n > bits - 1);
        }
        Mnemonic::Mulx => {
            let a = v.cpu.regs.gpr[2] & m;
            let b = v.read_op(i, 2, size)?;
            let p = a as u128 * b as u128;
            // Low half to the second operand, high half to the first: if both
            // name the same register the high half wins.
            v.set_reg(i.op1_register(), p as u64 & m);
            v.set_reg(dst, (p >> bits) as u64 & m);
        }
        Mnemonic::Pdep | Mnemonic::Pext => {
            let src = v.reg(i.op1_register());
            let mask = v.read_op(i, 2, size)?;
            let r = if i.mnemonic() == Mnemonic::Pdep { pdep(src, mask) } else { pext(src, mask) } & m;
            v.set_reg(dst, r);
        }
        Mnemonic::Rorx => {
            let s = v.read_op(i, 1, size)?;
            let c = (i.immediate(2) as u32) % bits;
            let r = if c == 0 { s } else { ((s >> c) | (s << (bits - c))) & m };
            v.set_reg(dst, r);
        }
        Mnemonic::Sarx | Mnemonic::Shlx | Mnemonic::Shrx => {
            let s = v.read_op(i, 1, size)?;
            let c = (v.reg(i.op2_register()) & (bits as u64 - 1)) as u32;
            let r = match i.mnemonic() {
                Mnemonic::Sarx => (sext(s, size) >> c) as u64,
                Mnemonic::Shlx => s << c,
                _ => s >> c,
            } & m;
            v.set_reg(dst, r);
        }
        _ => return Err(Exception::ud()),
    }
    Ok(())
}

fn low_mask(n: u32) -> u64 {
    if n >= 64 { u64::MAX } else { (1u64 << n) - 1 }
}

fn pdep(src: u64, mut mask: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while mask != 0 {
        let low = mask & mask.wrapping_neg();
        if (src >> k) & 1 != 0 {
            r |= low;
        }
        mask &= mask - 1;
        k += 1;
    }
    r
}

fn pext(src: u64, mut mask: u64) -> u64 {
    let mut r = 0;
    let mut k = 0;
    while mask != 0 {
        let low = mask & mask.wrapping_neg();
        if src & low != 0 {
            r |= 1 << k;
        }
        mask &= mask - 1;
        k += 1;
    }
    r
}

/// adcx (carry in/out through CF) and adox (through OF); no other flag changes.
pub fn adx(v: &mut Vcpu, i: &Instruction) -> R {
    let size = op_size(i, 0);
    let flag = if i.mnemonic() == Mnemonic::Adcx { CF } else { OF };
    let a = v.reg(i.op0_register());
    let b = v.read_op(i, 1, size)?;
    let (r, f) = alu::add(size, a, b, v.flag(flag) as u64);
    v.set_reg(i.op0_register(), r);
    v.set_flag(flag, f & CF != 0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pdep_pext_roundtrip_on_mask() {
        assert_eq!(pdep(0b101, 0b1101_0000), 0b1001_0000);
        assert_eq!(pext(0b1001_0000, 0b1101_0000), 0b101);
    }
}
