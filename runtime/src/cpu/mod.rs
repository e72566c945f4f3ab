//! Architectural state of one x86 vCPU (SDM Vol. 3A, chapter 2 and 9).
//!
//! Everything a 32- or 64-bit OS touches lives here: the register block shared
//! with translated code ([`VcpuRegs`]), segment registers with their hidden
//! descriptor caches, descriptor-table registers, control and debug
//! registers, EFER and the other MSRs, and event state (interrupt shadow,
//! halt). Extended (x87/SSE/AVX) state lives next to it in the vCPU.

pub mod cpuid;
pub mod msr;

pub use btvmm_translator::abi::{gpr, rflags, seg, Segment, VcpuRegs};
pub use msr::Msrs;

/// CR0 bits.
pub mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const EM: u64 = 1 << 2;
    pub const TS: u64 = 1 << 3;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const AM: u64 = 1 << 18;
    pub const NW: u64 = 1 << 29;
    pub const CD: u64 = 1 << 30;
    pub const PG: u64 = 1 << 31;
}

/// CR4 bits.
pub mod cr4 {
    pub const VME: u64 = 1 << 0;
    pub const PVI: u64 = 1 << 1;
    pub const TSD: u64 = 1 << 2;
    pub const DE: u64 = 1 << 3;
    pub const PSE: u64 = 1 << 4;
    pub const PAE: u64 = 1 << 5;
    pub const MCE: u64 = 1 << 6;
    pub const PGE: u64 = 1 << 7;
    pub const PCE: u64 = 1 << 8;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const UMIP: u64 = 1 << 11;
    pub const FSGSBASE: u64 = 1 << 16;
    pub const OSXSAVE: u64 = 1 << 18;
}

/// EFER bits.
pub mod efer {
    pub const SCE: u64 = 1 << 0;
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
    pub const NXE: u64 = 1 << 11;
    pub const FFXSR: u64 = 1 << 14;
}

/// GDTR or IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// The processor mode, derived from CR0.PE, EFLAGS.VM, EFER.LMA and CS.L.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuMode {
    Real,
    Protected,
    Virtual8086,
    /// IA-32e compatibility mode (long mode, CS.L = 0).
    Compat,
    /// 64-bit mode.
    Long,
}

pub struct Cpu {
    pub regs: VcpuRegs,
    pub seg: [Segment; 6],
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdtr: DescriptorTable,
    pub idtr: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub xcr0: u64,
    pub dr: [u64; 8],
    pub msr: Msrs,
    /// Current privilege level (CS.RPL in protected mode, 0 in real mode, 3 in V86).
    pub cpl: u8,
    pub mode: CpuMode,
    /// Interrupts are inhibited for one instruction after `sti` or `mov ss`/`pop ss`.
    pub interrupt_shadow: bool,
    /// The vCPU executed `hlt` and waits for an interrupt.
    pub halted: bool,
}

impl Default for Cpu {
    fn default() -> Self {
        Self::new()
    }
}

impl Cpu {
    /// The state after RESET (SDM Vol. 3A, 9.1.1), but with CS based at 0
    /// rather than the reset vector's 0xffff0000: btvmm has no firmware.
    pub fn new() -> Self {
        let mut seg = [Segment { base: 0, limit: 0xffff, selector: 0, attr: 0x93 }; 6];
        seg[seg::CS].attr = 0x9b;
        Self {
            regs: VcpuRegs { gpr: [0; 16], rip: 0xfff0, rflags: rflags::FIXED1 },
            seg,
            ldtr: Segment { base: 0, limit: 0xffff, selector: 0, attr: 0x82 },
            tr: Segment { base: 0, limit: 0xffff, selector: 0, attr: 0x8b },
            gdtr: DescriptorTable { base: 0, limit: 0xffff },
            idtr: DescriptorTable { base: 0, limit: 0xffff },
            cr0: cr0::ET | cr0::CD | cr0::NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            xcr0: 1,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            msr: Msrs::new(),
            cpl: 0,
            mode: CpuMode::Real,
            interrupt_shadow: false,
            halted: false,
        }
    }

    /// Flat 32-bit protected mode with paging off, as a multiboot loader (QEMU's
    /// boot ROM) leaves it: CS = 0x08 a 4 GiB execute/read code segment, the
    /// data segments 0x10, 4 GiB read/write. GDTR is the loader's to set.
    pub fn set_flat_protected32(&mut self, entry: u32) {
        self.cr0 = (self.cr0 | cr0::PE) & !(cr0::PG | cr0::CD | cr0::NW);
        let code = Segment { base: 0, limit: 0xffff_ffff, selector: 0x08, attr: 0xc09b };
        let data = Segment { base: 0, limit: 0xffff_ffff, selector: 0x10, attr: 0xc093 };
        for (i, s) in self.seg.iter_mut().enumerate() {
            *s = if i == seg::CS { code } else { data };
        }
        self.regs.rip = entry as u64;
        self.regs.rflags = rflags::FIXED1;
        self.cpl = 0;
        self.update_mode();
    }

    /// 64-bit mode with paging on (CR3 = `cr3`, PAE, EFER.LME/LMA), flat
    /// segments `code` (a 64-bit code segment) and `data`: the state the
    /// Linux 64-bit boot protocol enters with.
    pub fn set_flat_long64(&mut self, entry: u64, cr3: u64, code: u16, data: u16) {
        self.cr0 = (self.cr0 | cr0::PE | cr0::PG) & !(cr0::CD | cr0::NW);
        self.cr4 |= cr4::PAE;
        self.cr3 = cr3;
        self.efer |= efer::LME | efer::LMA;
        let cs = Segment { base: 0, limit: 0xffff_ffff, selector: code, attr: 0xa09b };
        let ds = Segment { base: 0, limit: 0xffff_ffff, selector: data, attr: 0xc093 };
        for (i, s) in self.seg.iter_mut().enumerate() {
            *s = if i == seg::CS { cs } else { ds };
        }
        self.regs.rip = entry;
        self.regs.rflags = rflags::FIXED1;
        self.cpl = 0;
        self.update_mode();
    }

    /// Renames the flat selectors set by [`Cpu::set_flat_protected32`].
    pub fn set_flat_selectors(&mut self, code: u16, data: u16) {
        for (i, s) in self.seg.iter_mut().enumerate() {
            s.selector = if i == seg::CS { code } else { data };
        }
    }

    /// Recomputes [`Cpu::mode`] after a change of CR0, EFER, EFLAGS.VM or CS.
    pub fn update_mode(&mut self) {
        self.mode = if self.cr0 & cr0::PE == 0 {
            CpuMode::Real
        } else if self.efer & efer::LMA != 0 {
            if self.seg[seg::CS].long() { CpuMode::Long } else { CpuMode::Compat }
        } else if self.regs.rflags & rflags::VM != 0 {
            CpuMode::Virtual8086
        } else {
            CpuMode::Protected
        };
    }

    /// Code size in bits (16, 32 or 64): the decoder's bitness.
    #[inline]
    pub fn code_bits(&self) -> u32 {
        match self.mode {
            CpuMode::Long => 64,
            CpuMode::Real | CpuMode::Virtual8086 => 16,
            _ => {
                if self.seg[seg::CS].default_big() { 32 } else { 16 }
            }
        }
    }

    /// Stack address size in bytes (SS.B), 8 in 64-bit mode.
    #[inline]
    pub fn stack_size(&self) -> u8 {
        match self.mode {
            CpuMode::Long => 8,
            CpuMode::Real | CpuMode::Virtual8086 => 2,
            _ => {
                if self.seg[seg::SS].default_big() { 4 } else { 2 }
            }
        }
    }

    #[inline]
    pub fn long_mode(&self) -> bool {
        self.mode == CpuMode::Long
    }

    #[inline]
    pub fn paging(&self) -> bool {
        self.cr0 & cr0::PG != 0
    }

    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.regs.rflags & rflags::IOPL) >> rflags::IOPL_SHIFT) as u8
    }

    #[inline]
    pub fn interrupts_enabled(&self) -> bool {
        self.regs.rflags & rflags::IF != 0
    }

    /// A one-line-per-group dump of the guest state, for triple-fault reports.
    pub fn dump(&self) -> String {
        let g = &self.regs.gpr;
        let mut s = format!(
            "RAX={:016x} RBX={:016x} RCX={:016x} RDX={:016x}\n\
             RSI={:016x} RDI={:016x} RBP={:016x} RSP={:016x}\n\
             R8 ={:016x} R9 ={:016x} R10={:016x} R11={:016x}\n\
             R12={:016x} R13={:016x} R14={:016x} R15={:016x}\n\
             RIP={:016x} RFL={:08x} CPL={} mode={:?}\n",
            g[0], g[3], g[1], g[2], g[6], g[7], g[5], g[4], g[8], g[9], g[10], g[11], g[12],
            g[13], g[14], g[15], self.regs.rip, self.regs.rflags, self.cpl, self.mode
        );
        for (name, i) in [("ES", 0), ("CS", 1), ("SS", 2), ("DS", 3), ("FS", 4), ("GS", 5)] {
            let sg = &self.seg[i];
            s += &format!(
                "{name} ={:04x} {:016x} {:08x} {:04x}\n",
                sg.selector, sg.base, sg.limit, sg.attr
            );
        }
        s += &format!(
            "LDT={:04x} {:016x} {:08x}  TR={:04x} {:016x} {:08x}\n\
             GDT={:016x} {:04x}  IDT={:016x} {:04x}\n\
             CR0={:08x} CR2={:016x} CR3={:016x} CR4={:08x} EFER={:x}",
            self.ldtr.selector, self.ldtr.base, self.ldtr.limit, self.tr.selector, self.tr.base,
            self.tr.limit, self.gdtr.base, self.gdtr.limit, self.idtr.base, self.idtr.limit,
            self.cr0, self.cr2, self.cr3, self.cr4, self.efer
        );
        s
    }
}
