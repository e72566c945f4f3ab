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

    /// The number of an iced-x86 segment register (DS for anything else).
    #[inline(always)]
    pub fn index(r: iced_x86::Register) -> usize {
        use iced_x86::Register as R;
        match r {
            R::ES => ES,
            R::CS => CS,
            R::SS => SS,
            R::FS => FS,
            R::GS => GS,
            _ => DS,
        }
    }
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

/// The block the host GS base points at while translated code runs.
///
/// Guest GPRs live in the host registers of the same number inside a CCF;
/// `regs.gpr` holds them only across an exit. Guest RSP cannot (host RSP
/// stays the VMM's stack): 64-bit CCFs keep it in `regs.gpr` always,
/// 32-bit ones in a spare host register ([`tlb::R32_RSP`]). Everything else a CCF needs without a
/// free register is here too: spill slots for the scratch registers of a
/// memory-operand rewrite, the segment bases, the soft-TLB tables in use,
/// and the exit protocol. Field order is ABI: emitted code uses the
/// `OFF_*` constants below, which a test checks against the layout.
#[repr(C)]
#[derive(Clone, Debug)]
pub struct BtBlock {
    pub regs: VcpuRegs,
    /// Spill slots for the scratch registers a rewrite borrows.
    pub scratch: [u64; 6],
    /// Host RSP at entry: the exit restores it.
    pub host_rsp: u64,
    /// Where the entry trampoline jumps (a CCF's entry).
    pub target: u64,
    /// The address of the common exit stub (CCFs leave with `jmp gs:[..]`).
    pub exit_stub: u64,
    /// Why the CCF left ([`ExitReason`]); `regs.rip` says where.
    pub exit_reason: u64,
    /// The host RFLAGS at the exit: the guest's arithmetic flags.
    pub host_flags: u64,
    /// Segment bases, in `seg` order, as of the entry.
    pub seg_base: [u64; 6],
    /// Host address of the soft-TLB table (`tlb::ENTRIES` entries) for reads
    /// at the current privilege, and the one for writes.
    pub tlb_read: u64,
    pub tlb_write: u64,
    /// Transfers through the IBTC before the dispatcher must look at the
    /// clock and the interrupt lines again; a kick zeroes it, and at 0 the
    /// next such transfer exits instead.
    pub budget: u64,
    /// Which exit stub the CCF left through: `tu_id << 8 | stub index`, so
    /// the dispatcher can chain it.
    pub exit_site: u64,
    /// The virtual flags CCFs change inline: IF (`cli`) and DF (`cld`,
    /// `std`), one byte each (0 or 1), and every other non-arithmetic RFLAGS
    /// bit as of the entry (what `pushf` pushes besides them).
    pub vif: u8,
    pub vdf: u8,
    /// The runtime saw an interrupt pending at the entry: an inline `sti`
    /// leaves for the runtime, which delivers it after the shadow.
    pub irq_pending: u8,
    pub _pad: [u8; 5],
    pub vflags: u64,
    /// Virtual system registers the inline reads return (as of the entry:
    /// only callouts change them): CR0, GDTR, IDTR, the LDTR and TR selectors.
    pub cr0: u64,
    pub gdtr_base: u64,
    pub gdtr_limit: u64,
    pub idtr_base: u64,
    pub idtr_limit: u64,
    pub ldtr_sel: u64,
    pub tr_sel: u64,
    /// The guest RIP of the instruction that may take a host fault next
    /// (a division), stored just before it. (The fault handler finds the
    /// exit to send the host to by the code cache range it faulted in.)
    pub fault_rip: u64,
    /// The masks of the flag-free soft-TLB probe's `pext`s: the index bits
    /// of a linear address, and the page bits ([`tlb::INDEX_MASK`],
    /// [`tlb::PAGE_MASK`]).
    pub tlb_masks: [u64; 2],
    /// The indirect-branch translation caches: (guest RIP, CCF entry)
    /// pairs, at [`ibtc_index`] of the RIP, one table for CPL 0 and one for
    /// the other privileges ([`BtBlock::off_ibtc`]). Indirect branches look
    /// in their own privilege's table before leaving for the dispatcher, which fills it, and empties it when the
    /// mappings or the mode change. A guest moving between its kernel and
    /// user mode keeps both tables, where one shared table was emptied at
    /// every switch and refilled one exit at a time.
    pub ibtc: [[[u64; 2]; IBTC_ENTRIES]; 2],
    /// Guest SSE state in CCFs: the guest's XSAVE area (its legacy region
    /// is an FXSAVE image), loaded into the host's XMM registers and MXCSR
    /// by the routine `fpu_enter` points at, which CCFs call before their
    /// first SSE instruction: the load routine (`fpu_load`), or once the
    /// state is loaded a bare `ret` (`fpu_ready`). The exit trampoline saves
    /// the state back, and gives Rust back the host MXCSR saved at entry and
    /// a clean x87 unit.
    pub fpu_area: u64,
    pub fpu_enter: u64,
    pub fpu_load: u64,
    pub fpu_ready: u64,
    pub host_mxcsr: u64,
    /// 15: the `pext` mask of the low bits a 16-byte aligned address has clear.
    pub align16_mask: u64,
    /// Segment selectors, in `seg` order, as of the entry (`mov r, sreg`
    /// reads them inline; loads are callouts, which end the CCF).
    pub seg_sel: [u64; 6],
    /// The guest's arithmetic flags put aside around code that clobbers
    /// them (an IBTC lookup, pushf's image): `lahf`'s AH and `seto`'s AL;
    /// and RAX meanwhile, which those two write.
    pub saved_flags: u64,
    pub saved_rax: u64,
    /// The state components the SSE load routine's `xrstor64` and the
    /// exit's `xsave64` move: x87, SSE, and AVX where the guest's XCR0
    /// enables it, so VEX instructions run in CCFs on the guest's YMM
    /// registers.
    pub fpu_xcr0: u64,
    /// Where the load routine keeps the registers it borrows.
    pub fpu_tmp: [u64; 3],
    /// 31: the `pext` mask of the low bits a 32-byte aligned address has
    /// clear (`align16_mask`'s for 32-byte operands).
    pub align32_mask: u64,
    /// Set by the exit when it saved the state a CCF loaded.
    pub fpu_saved: u64,
}

/// Entries in each table of [`BtBlock::ibtc`]: `1 << IBTC_BITS`, in sets
/// of [`IBTC_WAYS`] adjacent entries. A lookup tries both of its set's:
/// with one entry per RIP's slot, a call target and the return address
/// after the call sharing a slot evicted each other at every call (40k
/// times in one boot's ftrace patching loop).
pub const IBTC_ENTRIES: usize = 1 << IBTC_BITS;
pub const IBTC_BITS: u32 = 12;
pub const IBTC_WAYS: usize = 2;
/// Sets per table: `1 << IBTC_SET_BITS`.
pub const IBTC_SET_BITS: u32 = IBTC_BITS - 1;
/// The multiplier of [`ibtc_index`]'s hash: 2^32 divided by the golden
/// ratio, odd.
pub const IBTC_HASH: u32 = 0x9e37_79b9;
/// A guest RIP no lookup ever has (non-canonical, above 4 GiB): empty entries.
pub const IBTC_EMPTY: u64 = 0x8000_0000_0000_0001;

/// Which of [`BtBlock::ibtc`]'s tables code running at CPL 0 (or not) uses.
pub const fn ibtc_table(cpl0: bool) -> usize {
    if cpl0 { 0 } else { 1 }
}

/// The IBTC entry that opens the set of a guest RIP (the set's other way
/// follows it); emitted code computes the same: the top bits of the low 32
/// bits of RIP times [`IBTC_HASH`] (Fibonacci hashing, which spreads code
/// addresses with any stride). The tables are per privilege, so the high
/// half of a 64-bit kernel's RIPs, all ones, is left out.
pub const fn ibtc_index(rip: u64) -> usize {
    (((rip as u32).wrapping_mul(IBTC_HASH) >> (32 - IBTC_SET_BITS)) as usize) * IBTC_WAYS
}

impl Default for BtBlock {
    fn default() -> Self {
        Self {
            regs: VcpuRegs::default(),
            scratch: [0; 6],
            host_rsp: 0,
            target: 0,
            exit_stub: 0,
            exit_reason: 0,
            host_flags: 0,
            seg_base: [0; 6],
            tlb_read: 0,
            tlb_write: 0,
            budget: 0,
            exit_site: 0,
            vif: 0,
            vdf: 0,
            irq_pending: 0,
            _pad: [0; 5],
            vflags: 0,
            cr0: 0,
            gdtr_base: 0,
            gdtr_limit: 0,
            idtr_base: 0,
            idtr_limit: 0,
            ldtr_sel: 0,
            tr_sel: 0,
            fault_rip: 0,
            tlb_masks: [tlb::INDEX_MASK, tlb::PAGE_MASK],
            ibtc: [[[IBTC_EMPTY, 0]; IBTC_ENTRIES]; 2],
            fpu_area: 0,
            fpu_enter: 0,
            fpu_load: 0,
            fpu_ready: 0,
            host_mxcsr: 0,
            align16_mask: 15,
            seg_sel: [0; 6],
            saved_flags: 0,
            saved_rax: 0,
            fpu_xcr0: 0,
            fpu_tmp: [0; 3],
            align32_mask: 31,
            fpu_saved: 0,
        }
    }
}

impl BtBlock {
    pub const OFF_GPR: usize = 0;
    pub const OFF_RIP: usize = VcpuRegs::OFF_RIP;
    pub const OFF_RFLAGS: usize = VcpuRegs::OFF_RFLAGS;
    pub const OFF_SCRATCH: usize = 18 * 8;
    pub const SCRATCH_SLOTS: usize = 6;
    /// The scratch slot holding RSP from before an indirect branch.
    pub const SLOT_OLD_RSP: usize = 4;
    /// The scratch slot of a division's divisor, a push of memory's value
    /// and a rep compare's fourth scratch register: each only within one
    /// instruction's code.
    pub const SLOT_VALUE: usize = 3;
    pub const OFF_HOST_RSP: usize = Self::OFF_SCRATCH + Self::SCRATCH_SLOTS * 8;
    pub const OFF_TARGET: usize = Self::OFF_HOST_RSP + 8;
    pub const OFF_EXIT_STUB: usize = Self::OFF_TARGET + 8;
    pub const OFF_EXIT_REASON: usize = Self::OFF_EXIT_STUB + 8;
    pub const OFF_HOST_FLAGS: usize = Self::OFF_EXIT_REASON + 8;
    pub const OFF_SEG_BASE: usize = Self::OFF_HOST_FLAGS + 8;
    pub const OFF_TLB_READ: usize = Self::OFF_SEG_BASE + 6 * 8;
    pub const OFF_TLB_WRITE: usize = Self::OFF_TLB_READ + 8;
    pub const OFF_BUDGET: usize = Self::OFF_TLB_WRITE + 8;
    pub const OFF_EXIT_SITE: usize = Self::OFF_BUDGET + 8;
    pub const OFF_VIF: usize = Self::OFF_EXIT_SITE + 8;
    pub const OFF_VDF: usize = Self::OFF_VIF + 1;
    pub const OFF_IRQ_PENDING: usize = Self::OFF_VIF + 2;
    pub const OFF_VFLAGS: usize = Self::OFF_VIF + 8;
    pub const OFF_CR0: usize = Self::OFF_VFLAGS + 8;
    pub const OFF_GDTR_BASE: usize = Self::OFF_CR0 + 8;
    pub const OFF_GDTR_LIMIT: usize = Self::OFF_GDTR_BASE + 8;
    pub const OFF_IDTR_BASE: usize = Self::OFF_GDTR_LIMIT + 8;
    pub const OFF_IDTR_LIMIT: usize = Self::OFF_IDTR_BASE + 8;
    pub const OFF_LDTR_SEL: usize = Self::OFF_IDTR_LIMIT + 8;
    pub const OFF_TR_SEL: usize = Self::OFF_LDTR_SEL + 8;
    pub const OFF_FAULT_RIP: usize = Self::OFF_TR_SEL + 8;
    pub const OFF_TLB_MASKS: usize = Self::OFF_FAULT_RIP + 8;
    pub const OFF_IBTC: usize = Self::OFF_TLB_MASKS + 16;
    pub const OFF_FPU_AREA: usize = Self::OFF_IBTC + 2 * IBTC_ENTRIES * 16;

    /// The offset of the IBTC table code of this privilege looks in
    /// ([`BtBlock::ibtc`]).
    pub const fn off_ibtc(cpl0: bool) -> usize {
        Self::OFF_IBTC + ibtc_table(cpl0) * IBTC_ENTRIES * 16
    }
    pub const OFF_FPU_ENTER: usize = Self::OFF_FPU_AREA + 8;
    pub const OFF_FPU_LOAD: usize = Self::OFF_FPU_ENTER + 8;
    pub const OFF_FPU_READY: usize = Self::OFF_FPU_LOAD + 8;
    pub const OFF_HOST_MXCSR: usize = Self::OFF_FPU_READY + 8;
    pub const OFF_ALIGN16_MASK: usize = Self::OFF_HOST_MXCSR + 8;
    pub const OFF_SEG_SEL: usize = Self::OFF_ALIGN16_MASK + 8;
    pub const OFF_SAVED_FLAGS: usize = Self::OFF_SEG_SEL + 6 * 8;
    pub const OFF_SAVED_RAX: usize = Self::OFF_SAVED_FLAGS + 8;
    pub const OFF_FPU_XCR0: usize = Self::OFF_SAVED_RAX + 8;
    pub const OFF_FPU_TMP: usize = Self::OFF_FPU_XCR0 + 8;
    pub const OFF_ALIGN32_MASK: usize = Self::OFF_FPU_TMP + 3 * 8;
    pub const OFF_FPU_SAVED: usize = Self::OFF_ALIGN32_MASK + 8;

    pub const fn off_gpr(r: usize) -> usize {
        Self::OFF_GPR + r * 8
    }
}

/// Why a CCF returned to the dispatcher. `regs.rip` is the guest RIP to
/// continue at; every instruction before it has completed.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The TU ran to its end (or took a branch out): continue at RIP.
    Next = 0,
    /// The instruction at RIP needs the shared Rust semantics (a system
    /// instruction, a soft-TLB miss, MMIO, a page-crossing access, a write
    /// to a code page): interpret it, then continue.
    Interpret = 1,
    /// An indirect branch (ret, jmp/call through a register) left for the
    /// RIP it computed; the stub's RIP is the branch's own, and scratch
    /// slot [`BtBlock::SLOT_OLD_RSP`] holds RSP from before it, so a target
    /// that faults (non-canonical) can be replayed precisely.
    Indirect = 2,
    /// A host fault in the CCF (a division by zero or overflow): nothing of
    /// the instruction at RIP happened; the runtime runs it, raising the
    /// guest's exception.
    Fault = 3,
    /// Any other host signal in a CCF (SIGSEGV, SIGBUS, SIGILL): translated
    /// code touched what it must not, a VMM bug. The guest state is as the
    /// CCF left its registers, not precise; the runtime reports it and stops.
    HostFault = 4,
}

impl ExitReason {
    pub fn from_raw(v: u64) -> Option<Self> {
        Some(match v {
            0 => Self::Next,
            1 => Self::Interpret,
            2 => Self::Indirect,
            3 => Self::Fault,
            4 => Self::HostFault,
            _ => return None,
        })
    }
}

/// The soft-TLB layout that emitted probes read (the runtime's `Tlb` keeps
/// its tables in this shape; a runtime test checks it).
pub mod tlb {
    /// Entries per way of a table (a power of two), indexed by linear page number.
    pub const ENTRIES: usize = 1024;
    /// A table is two-way set associative and kept as arrays of 8-byte
    /// fields, so an index scales by 8 in one addressing mode: the tags of
    /// the first way (the newest fill), then those of the second (the entry
    /// the newest displaced), then the addends in the same order. The
    /// second way's tag for an index lies this many bytes after the
    /// first's.
    pub const OFF_WAY2: usize = ENTRIES * 8;
    /// An entry's addend (host address minus linear address) lies this many
    /// bytes after its tag.
    pub const OFF_ADDEND: usize = 2 * ENTRIES * 8;
    /// A tag is kept complemented (`!page`), so the probe subtracts it
    /// with one `lea`: `!page + address + size` is the last byte's offset
    /// from the page. An empty entry's page is a non-canonical one above
    /// 4 GiB whose index bits are two more than the entry's own
    /// ([`empty_tag`]): no access that looks the entry up (its first byte's
    /// page has the entry's index, its last byte's that or the next) can
    /// match it.
    pub const fn stored_tag(page: u64) -> u64 {
        !page
    }
    /// The bits of a linear address that index the table (page number mod
    /// `ENTRIES`, in place), and the page bits.
    pub const INDEX_MASK: u64 = ((ENTRIES - 1) << 12) as u64;
    pub const PAGE_MASK: u64 = !0xfff;

    /// The page an empty entry at `index` maps (before complementing).
    pub const fn empty_tag(index: usize) -> u64 {
        (1 << 63) | ((((index + 2) & (ENTRIES - 1)) as u64) << 12)
    }

    /// In 32-bit CCFs, which leave R8..R15 to the VMM, host registers that
    /// hold the probe's constants for the whole run, loaded by the entry
    /// from the block's GPR slots (the dispatcher puts them there): the
    /// read and write tables, the index mask, and the page shift (12: the
    /// tag check shifts the page bits down with `shrx`, one cycle where
    /// 64-bit code's `pext` through the page mask in the block takes three;
    /// a probe-bound loop ran 20% faster for it).
    pub const R32_READ_TABLE: u8 = 12;
    pub const R32_WRITE_TABLE: u8 = 13;
    pub const R32_INDEX_MASK: u8 = 14;
    pub const R32_PAGE_SHIFT: u8 = 8;
    pub const PAGE_SHIFT: u64 = 12;
    /// In 32-bit CCFs, the host register guest RSP lives in, like the
    /// other guest GPRs in theirs (in 64-bit CCFs, where every host
    /// register but RSP holds its guest namesake, it lives in the block).
    /// The dispatcher moves it between the block's RSP slot and this
    /// register's around each run.
    pub const R32_RSP: u8 = 9;
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

    #[test]
    fn bt_block_offsets_match_abi_constants() {
        assert_eq!(offset_of!(BtBlock, regs), BtBlock::OFF_GPR);
        assert_eq!(offset_of!(BtBlock, scratch), BtBlock::OFF_SCRATCH);
        assert_eq!(offset_of!(BtBlock, host_rsp), BtBlock::OFF_HOST_RSP);
        assert_eq!(offset_of!(BtBlock, target), BtBlock::OFF_TARGET);
        assert_eq!(offset_of!(BtBlock, exit_stub), BtBlock::OFF_EXIT_STUB);
        assert_eq!(offset_of!(BtBlock, exit_reason), BtBlock::OFF_EXIT_REASON);
        assert_eq!(offset_of!(BtBlock, host_flags), BtBlock::OFF_HOST_FLAGS);
        assert_eq!(offset_of!(BtBlock, seg_base), BtBlock::OFF_SEG_BASE);
        assert_eq!(offset_of!(BtBlock, tlb_read), BtBlock::OFF_TLB_READ);
        assert_eq!(offset_of!(BtBlock, tlb_write), BtBlock::OFF_TLB_WRITE);
        assert_eq!(offset_of!(BtBlock, budget), BtBlock::OFF_BUDGET);
        assert_eq!(offset_of!(BtBlock, exit_site), BtBlock::OFF_EXIT_SITE);
        assert_eq!(offset_of!(BtBlock, vif), BtBlock::OFF_VIF);
        assert_eq!(offset_of!(BtBlock, vdf), BtBlock::OFF_VDF);
        assert_eq!(offset_of!(BtBlock, irq_pending), BtBlock::OFF_IRQ_PENDING);
        assert_eq!(offset_of!(BtBlock, vflags), BtBlock::OFF_VFLAGS);
        assert_eq!(offset_of!(BtBlock, cr0), BtBlock::OFF_CR0);
        assert_eq!(offset_of!(BtBlock, gdtr_base), BtBlock::OFF_GDTR_BASE);
        assert_eq!(offset_of!(BtBlock, idtr_limit), BtBlock::OFF_IDTR_LIMIT);
        assert_eq!(offset_of!(BtBlock, tr_sel), BtBlock::OFF_TR_SEL);
        assert_eq!(offset_of!(BtBlock, fault_rip), BtBlock::OFF_FAULT_RIP);
        assert_eq!(offset_of!(BtBlock, tlb_masks), BtBlock::OFF_TLB_MASKS);
        assert_eq!(offset_of!(BtBlock, ibtc), BtBlock::OFF_IBTC);
        assert_eq!(offset_of!(BtBlock, fpu_area), BtBlock::OFF_FPU_AREA);
        assert_eq!(offset_of!(BtBlock, fpu_enter), BtBlock::OFF_FPU_ENTER);
        assert_eq!(offset_of!(BtBlock, fpu_load), BtBlock::OFF_FPU_LOAD);
        assert_eq!(offset_of!(BtBlock, fpu_ready), BtBlock::OFF_FPU_READY);
        assert_eq!(offset_of!(BtBlock, host_mxcsr), BtBlock::OFF_HOST_MXCSR);
        assert_eq!(offset_of!(BtBlock, align16_mask), BtBlock::OFF_ALIGN16_MASK);
        assert_eq!(offset_of!(BtBlock, seg_sel), BtBlock::OFF_SEG_SEL);
        assert_eq!(offset_of!(BtBlock, saved_flags), BtBlock::OFF_SAVED_FLAGS);
        assert_eq!(offset_of!(BtBlock, saved_rax), BtBlock::OFF_SAVED_RAX);
        assert_eq!(offset_of!(BtBlock, fpu_xcr0), BtBlock::OFF_FPU_XCR0);
        assert_eq!(offset_of!(BtBlock, fpu_tmp), BtBlock::OFF_FPU_TMP);
        assert_eq!(offset_of!(BtBlock, align32_mask), BtBlock::OFF_ALIGN32_MASK);
        assert_eq!(offset_of!(BtBlock, fpu_saved), BtBlock::OFF_FPU_SAVED);
    }

    /// Code addresses at any regular stride spread over the IBTC, and the
    /// hot jump targets of an amd64 boot that shared a slot under the
    /// first hash (`rip ^ rip >> 10`: up to 256 of 4096 addresses 0xffc
    /// apart in one slot), each pair evicting the other on every pass,
    /// have slots of their own.
    #[test]
    fn ibtc_index_spreads_code_addresses() {
        for stride in [4u64, 0x10, 0x40, 0xffc, 0x1000, 0x1004, 0x1_0000] {
            let mut load = vec![0u32; IBTC_ENTRIES];
            for k in 0..IBTC_ENTRIES as u64 {
                let set = ibtc_index(0xffff_ffff_8100_0000 + k * stride);
                assert_eq!(set % IBTC_WAYS, 0);
                load[set] += 1;
            }
            let most = load.iter().max().copied().unwrap_or(0);
            assert!(most <= 2 * IBTC_WAYS as u32, "stride {stride:#x}: {most} addresses in one set");
        }
        for (a, b) in [
            (0xffff_ffff_819e_e1e4u64, 0xffff_ffff_8103_c6ad),
            (0xffff_ffff_8156_a0b0, 0xffff_ffff_8157_20d0),
            (0xffff_ffff_8154_36d0, 0xffff_ffff_8132_8f7e),
            (0xffff_ffff_8157_0f3e, 0xffff_ffff_8157_1f3a),
            (0xffff_ffff_8138_dea0, 0xffff_ffff_8142_4007),
        ] {
            assert_ne!(ibtc_index(a), ibtc_index(b), "{a:#x} and {b:#x}");
        }
    }
}
