//! Segment descriptors and segment-register loads (SDM Vol. 3A, 3.4-3.5 and 5.5-5.8).
//!
//! The descriptor-table lookup and the checks of `mov sreg`/`pop sreg`/`lds`
//! etc. live here, shared by interrupt delivery, far transfers, `iret`,
//! `lar`/`lsl`/`verr`/`verw` and the translator's callouts.

use crate::cpu::{seg, CpuMode, Segment};
use crate::exception::{selector_error, Exception};
use crate::interp::Vcpu;

/// A raw descriptor: the two (or, for long-mode system descriptors, four) dwords.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub lo: u64,
    /// Bytes 8..15 of a 16-byte long-mode system descriptor or gate.
    pub hi: u64,
}

impl Descriptor {
    pub fn base(&self) -> u64 {
        ((self.lo >> 16) & 0xff_ffff) | ((self.lo >> 32) & 0xff00_0000)
    }
    /// The base of a 16-byte system descriptor (TSS, LDT) in long mode.
    pub fn base64(&self) -> u64 {
        self.base() | ((self.hi & 0xffff_ffff) << 32)
    }
    /// The limit in bytes, scaled by the granularity bit.
    pub fn limit(&self) -> u32 {
        let raw = ((self.lo & 0xffff) | ((self.lo >> 32) & 0xf_0000)) as u32;
        if self.attr() & Segment::ATTR_G != 0 { (raw << 12) | 0xfff } else { raw }
    }
    /// Attribute bits in [`Segment::attr`] layout.
    pub fn attr(&self) -> u16 {
        ((self.lo >> 40) & 0xf0ff) as u16
    }
    pub fn dpl(&self) -> u8 {
        ((self.lo >> 45) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.lo & (1 << 47) != 0
    }
    /// S bit: code or data (true) versus system.
    pub fn is_code_data(&self) -> bool {
        self.lo & (1 << 44) != 0
    }
    pub fn seg_type(&self) -> u8 {
        ((self.lo >> 40) & 0xf) as u8
    }
    pub fn is_code(&self) -> bool {
        self.is_code_data() && self.seg_type() & 8 != 0
    }
    pub fn is_conforming_code(&self) -> bool {
        self.is_code() && self.seg_type() & 4 != 0
    }
    pub fn is_readable(&self) -> bool {
        self.is_code_data() && (self.seg_type() & 8 == 0 || self.seg_type() & 2 != 0)
    }
    pub fn is_writable_data(&self) -> bool {
        self.is_code_data() && self.seg_type() & 0xa == 2
    }
    /// The hidden-cache contents this descriptor loads for `selector`.
    pub fn to_segment(&self, selector: u16) -> Segment {
        Segment { base: self.base(), limit: self.limit(), selector, attr: self.attr() }
    }
    /// Gate fields: target selector and offset (64-bit gates use `hi`).
    pub fn gate_selector(&self) -> u16 {
        (self.lo >> 16) as u16
    }
    pub fn gate_offset(&self) -> u64 {
        (self.lo & 0xffff) | ((self.lo >> 32) & 0xffff_0000)
    }
    pub fn gate_offset64(&self) -> u64 {
        self.gate_offset() | ((self.hi & 0xffff_ffff) << 32)
    }
    pub fn gate_ist(&self) -> u8 {
        ((self.lo >> 32) & 7) as u8
    }
}

/// Linear address of the descriptor for `selector`, checking the table limit.
fn descriptor_addr(v: &Vcpu, selector: u16, size: u64) -> Result<u64, Exception> {
    let index = (selector & 0xfff8) as u64;
    let (base, limit) = if selector & 4 != 0 {
        let l = &v.cpu.ldtr;
        if !l.present() || l.selector & 0xfffc == 0 {
            return Err(Exception::gp(selector_error(selector)));
        }
        (l.base, l.limit as u64)
    } else {
        (v.cpu.gdtr.base, v.cpu.gdtr.limit as u64)
    };
    if index + size - 1 > limit {
        return Err(Exception::gp(selector_error(selector)));
    }
    Ok(base.wrapping_add(index))
}

/// Reads the 8-byte descriptor for a non-null selector (supervisor access).
pub fn read_descriptor(v: &mut Vcpu, selector: u16) -> Result<Descriptor, Exception> {
    let lin = descriptor_addr(v, selector, 8)?;
    let lo = v.read_lin_as(lin, 8, false)?;
    Ok(Descriptor { lo, hi: 0 })
}

/// Reads a 16-byte long-mode system descriptor (TSS, LDT).
pub fn read_system_descriptor(v: &mut Vcpu, selector: u16) -> Result<Descriptor, Exception> {
    let long = v.cpu.efer & crate::cpu::efer::LMA != 0;
    let lin = descriptor_addr(v, selector, if long { 16 } else { 8 })?;
    let lo = v.read_lin_as(lin, 8, false)?;
    let hi = if long { v.read_lin_as(lin + 8, 8, false)? } else { 0 };
    Ok(Descriptor { lo, hi })
}

/// Sets the accessed bit of a code/data descriptor in memory, as loads do.
pub fn set_accessed(v: &mut Vcpu, selector: u16, d: &mut Descriptor) -> Result<(), Exception> {
    if d.lo & (1 << 40) == 0 {
        d.lo |= 1 << 40;
        let lin = descriptor_addr(v, selector, 8)?;
        v.write_lin_as(lin + 5, 1, (d.lo >> 40) & 0xff, false)?;
    }
    Ok(())
}

/// A null segment as loaded into DS/ES/FS/GS (or SS in 64-bit mode): unusable.
pub fn null_segment(selector: u16) -> Segment {
    Segment { base: 0, limit: 0, selector, attr: 0 }
}

/// `mov sreg`, `pop sreg`, `lds` and friends for DS, ES, FS, GS and SS (not CS).
pub fn load_data_segment(v: &mut Vcpu, sreg: usize, selector: u16) -> Result<(), Exception> {
    match v.cpu.mode {
        CpuMode::Real | CpuMode::Virtual8086 => {
            let s = &mut v.cpu.seg[sreg];
            s.selector = selector;
            s.base = (selector as u64) << 4;
            if v.cpu.mode == CpuMode::Virtual8086 {
                *s = Segment { base: (selector as u64) << 4, limit: 0xffff, selector, attr: 0xf3 };
            }
            return Ok(());
        }
        _ => {}
    }
    let cpl = v.cpu.cpl;
    let rpl = (selector & 3) as u8;
    if selector & 0xfffc == 0 {
        if sreg == seg::SS && !(v.cpu.mode == CpuMode::Long && cpl != 3 && rpl == cpl) {
            return Err(Exception::gp0());
        }
        let mut s = null_segment(selector);
        if sreg == seg::SS {
            // A null SS in 64-bit mode keeps a usable, writable stack of DPL=CPL.
            s.attr = 0x93 | ((cpl as u16) << Segment::ATTR_DPL_SHIFT) | Segment::ATTR_DB;
            s.attr &= !Segment::ATTR_P;
        }
        v.cpu.seg[sreg] = s;
        return Ok(());
    }
    let err = selector_error(selector);
    let mut d = read_descriptor(v, selector)?;
    if sreg == seg::SS {
        if rpl != cpl || d.dpl() != cpl || !d.is_writable_data() {
            return Err(Exception::gp(err));
        }
        if !d.present() {
            return Err(Exception::ss(err));
        }
    } else {
        if !d.is_readable() {
            return Err(Exception::gp(err));
        }
        if !d.is_conforming_code() && d.dpl() < cpl.max(rpl) {
            return Err(Exception::gp(err));
        }
        if !d.present() {
            return Err(Exception::np(err));
        }
    }
    set_accessed(v, selector, &mut d)?;
    let mut s = d.to_segment(selector);
    if v.cpu.mode == CpuMode::Long && sreg >= seg::FS {
        // Only the low 32 bits of the base come from the descriptor.
        s.base &= 0xffff_ffff;
    }
    v.cpu.seg[sreg] = s;
    Ok(())
}

/// Loads CS from a code descriptor that the caller has already checked,
/// setting CPL and recomputing the mode.
pub fn load_cs(v: &mut Vcpu, selector: u16, d: &Descriptor, cpl: u8) {
    let mut s = d.to_segment((selector & !3) | cpl as u16);
    s.attr |= 1; // accessed
    v.cpu.seg[seg::CS] = s;
    v.cpu.cpl = cpl;
    v.cpu.update_mode();
    v.block_break = true;
}

/// Loads SS from a descriptor the caller has checked.
pub fn load_ss(v: &mut Vcpu, selector: u16, d: &Descriptor) {
    v.cpu.seg[seg::SS] = d.to_segment(selector);
    v.cpu.seg[seg::SS].attr |= 1;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_flat_code_decodes_base_limit_attr() {
        let d = Descriptor { lo: 0x00cf_9a00_0000_ffff, hi: 0 };
        assert_eq!(d.base(), 0);
        assert_eq!(d.limit(), 0xffff_ffff);
        assert_eq!(d.attr(), 0xc09a);
        assert!(d.is_code() && d.is_readable() && d.present());
        assert_eq!(d.dpl(), 0);
    }

    #[test]
    fn descriptor_long_mode_code_has_l_bit() {
        let d = Descriptor { lo: 0x00af_9b00_0000_ffff, hi: 0 };
        let s = d.to_segment(0x10);
        assert!(s.long());
        assert!(!s.default_big());
    }

    #[test]
    fn descriptor_interrupt_gate_fields() {
        let d = Descriptor { lo: 0x1234_8e00_0010_5678, hi: 0xffff_ffff };
        assert_eq!(d.gate_selector(), 0x10);
        assert_eq!(d.gate_offset(), 0x1234_5678);
        assert_eq!(d.gate_offset64(), 0xffff_ffff_1234_5678);
        assert_eq!(d.seg_type(), 0xe);
    }
}
