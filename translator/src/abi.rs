//! The ABI between translated code and the runtime.
//!
//! This module is the one definition of the `#[repr(C)]` vCPU register block
//! that compiled code fragments address as `gs:[offset]`. The interpreter
//! keeps its register file in the same block, so the two engines share one
//! representation of guest state and can hand a vCPU to each other at any
//! instruction boundary.

/// Index of each general register in [`VcpuRegs::gpr`], in hardware encoding order.
pub mod gpr {
    pub const RAX: usize = 0;
    pub const RCX: usize = 1;
    pub const RDX: usize = 2;
    pub const RBX: usize = 3;
    pub const RSP: usize = 4;
    pub const RBP: usize = 5;
    pub const RSI: usize = 6;
    pub const RDI: usize = 7;
    pub const R8: usize = 8;
    pub const R9: usize = 9;
    pub const R10: usize = 10;
    pub const R11: usize = 11;
    pub const R12: usize = 12;
    pub const R13: usize = 13;
    pub const R14: usize = 14;
    pub const R15: usize = 15;
}

/// RFLAGS bits (SDM Vol. 1, 3.4.3).
pub mod rflags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED1: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const IOPL_SHIFT: u32 = 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    /// The six arithmetic flags, which live in host RFLAGS inside translated code.
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
    /// Every bit software can change.
    pub const WRITABLE: u64 = ARITH | TF | IF | DF | IOPL | NT | RF | VM | AC | VIF | VIP | ID;
}

/// Segment register numbering (hardware encoding order, as in `mov sreg`).
pub mod seg {
    pub const ES: usize = 0;
    pub const CS: usize = 1;
    pub const SS: usize = 2;
    pub const DS: usize = 3;
    pub const FS: usize = 4;
    pub const GS: usize = 5;
}

/// A segment register: its visible selector and its hidden descriptor cache.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    /// Descriptor attribute bits as in bytes 5..6 of a descriptor:
    /// type(4) S(1) DPL(2) P(1) | AVL(1) L(1) D/B(1) G(1) at bits 12..15.
    pub attr: u16,
}

impl Segment {
    pub const ATTR_TYPE_MASK: u16 = 0xf;
    pub const ATTR_S: u16 = 1 << 4;
    pub const ATTR_DPL_SHIFT: u16 = 5;
    pub const ATTR_P: u16 = 1 << 7;
    pub const ATTR_AVL: u16 = 1 << 12;
    pub const ATTR_L: u16 = 1 << 13;
    pub const ATTR_DB: u16 = 1 << 14;
    pub const ATTR_G: u16 = 1 << 15;

    pub fn dpl(&self) -> u8 {
        ((self.attr >> Self::ATTR_DPL_SHIFT) & 3) as u8
    }
    pub fn present(&self) -> bool {
        self.attr & Self::ATTR_P != 0
    }
    pub fn long(&self) -> bool {
        self.attr & Self::ATTR_L != 0
    }
    pub fn default_big(&self) -> bool {
        self.attr & Self::ATTR_DB != 0
    }
    pub fn seg_type(&self) -> u8 {
        (self.attr & Self::ATTR_TYPE_MASK) as u8
    }
}

/// The register block that translated code addresses through the host GS base.
///
/// Field order is ABI: emitted code uses the `OFF_*` constants below.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct VcpuRegs {
    pub gpr: [u64; 16],
    pub rip: u64,
    /// Guest RFLAGS as the guest sees them (arithmetic and virtual bits together).
    pub rflags: u64,
}

impl VcpuRegs {
    pub const OFF_GPR: usize = 0;
    pub const OFF_RIP: usize = 16 * 8;
    pub const OFF_RFLAGS: usize = 17 * 8;
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn vcpu_regs_offsets_match_abi_constants() {
        assert_eq!(offset_of!(VcpuRegs, gpr), VcpuRegs::OFF_GPR);
        assert_eq!(offset_of!(VcpuRegs, rip), VcpuRegs::OFF_RIP);
        assert_eq!(offset_of!(VcpuRegs, rflags), VcpuRegs::OFF_RFLAGS);
    }
}
