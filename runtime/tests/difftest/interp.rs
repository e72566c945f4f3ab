//! The interpreter, and the binary translator, as differential-test executors.
//!
//! Guest layout (4-level paging, CPL 3): the code pages at `CODE_ADDR` and
//! the window at `WINDOW_ADDR` are mapped to small guest-physical pages, so
//! the walk, the soft TLB and the decoded-block cache are all exercised. A
//! `hlt` after the sequence (a #GP at CPL 3) marks its end; exceptions are
//! trapped instead of delivered through an IDT.

use std::sync::Arc;

use btvmm_runtime::cpu::{cr0, cr4, efer, seg, CpuMode, Segment};
use btvmm_runtime::{EventSignal, GuestMemory, NullPlatform, Vcpu, VmExit};

use super::machine::*;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT_CODE: u64 = 0x4000;
const PT_WINDOW: u64 = 0x5000;
const CODE_PHYS: u64 = 0x10000;
const WINDOW_PHYS: u64 = 0x20000;
const BUDGET: u64 = 1_000_000;

pub struct InterpAdapter {
    vcpu: Vcpu,
    events: EventSignal,
    /// The translator runs the code (sequences only branch forward, so a
    /// run without an instruction budget always ends).
    translated: bool,
}

impl InterpAdapter {
    /// The binary translator (CPL 3 code translated as with --user-mode bt).
    pub fn translator() -> Self {
        let mut a = Self::new();
        a.vcpu.enable_bt(64 << 20).expect("translator");
        a.translated = true;
        a
    }

    pub fn new() -> Self {
        let mem = Arc::new(GuestMemory::new(1 << 20).expect("guest memory"));
        let pte = 0x7; // present, writable, user
        mem.write_u64(PML4, PDPT | pte);
        mem.write_u64(PDPT + 8 * ((CODE_ADDR >> 30) & 511), PD | pte);
        mem.write_u64(PD + 8 * ((CODE_ADDR >> 21) & 511), PT_CODE | pte);
        mem.write_u64(PD + 8 * ((WINDOW_ADDR >> 21) & 511), PT_WINDOW | pte);
        for p in 0..5u64 {
            mem.write_u64(PT_CODE + 8 * (((CODE_ADDR >> 12) & 511) + p), (CODE_PHYS + p * 0x1000) | pte);
        }
        for p in 0..(WINDOW_SIZE as u64 / 0x1000) {
            mem.write_u64(PT_WINDOW + 8 * (((WINDOW_ADDR >> 12) & 511) + p), (WINDOW_PHYS + p * 0x1000) | pte);
        }
        let mut vcpu = Vcpu::new(mem, Box::new(NullPlatform));
        vcpu.trap_exceptions = true;
        Self { vcpu, events: EventSignal::new(), translated: false }
    }

    fn reset(&mut self, init: &MachineState) {
        let c = &mut self.vcpu.cpu;
        c.cr0 = cr0::PE | cr0::PG | cr0::ET | cr0::NE | cr0::WP;
        c.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
        c.cr3 = PML4;
        c.efer = efer::LME | efer::LMA | efer::NXE | efer::SCE;
        c.seg[seg::CS] = Segment { base: 0, limit: 0xffff_ffff, selector: 0x33, attr: 0xa0fb };
        for s in [seg::DS, seg::ES, seg::SS, seg::FS, seg::GS] {
            c.seg[s] = Segment { base: 0, limit: 0xffff_ffff, selector: 0x2b, attr: 0xc0f3 };
        }
        c.cpl = 3;
        c.update_mode();
        assert_eq!(c.mode, CpuMode::Long);
        c.regs.gpr = init.gpr;
        c.regs.rflags = (init.rflags & rflags::COMPARED) | rflags::FIXED;
        c.halted = false;
        c.interrupt_shadow = false;
        self.vcpu.tlb.flush_all();
    }

    fn state(&self) -> MachineState {
        MachineState { gpr: self.vcpu.cpu.regs.gpr, rflags: self.vcpu.cpu.regs.rflags }
    }
}

impl Executor for InterpAdapter {
    fn name(&self) -> &str {
        if self.translated { "translator" } else { "interpreter" }
    }

    fn run(&mut self, code: &[u8], code_addr: u64, init: &MachineState, window: &mut [u8]) -> Result<Outcome, ExecutorError> {
        assert_eq!(code_addr, CODE_ADDR);
        let mem = self.vcpu.mem.clone();
        mem.zero(CODE_PHYS, 0x5000);
        mem.write(CODE_PHYS, code);
        mem.write_u8(CODE_PHYS + code.len() as u64, 0xf4); // hlt: #GP at CPL 3 marks the end
        mem.write(WINDOW_PHYS, window);
        self.vcpu.flush_code();
        self.reset(init);
        self.vcpu.cpu.regs.rip = code_addr;
        let start = self.vcpu.stats.instructions;
        let end = code_addr + code.len() as u64;
        let exit = self.vcpu.run(&self.events, if self.translated { None } else { Some(BUDGET) });
        mem.read(WINDOW_PHYS, window);
        // Translated code counts no instructions.
        let retired = (!self.translated).then(|| self.vcpu.stats.instructions - start - 1);
        match exit {
            VmExit::Exception(e) if e.vector == 13 && self.vcpu.cpu.regs.rip == end => {
                Ok(Outcome::Completed { state: self.state(), retired })
            }
            VmExit::Exception(e) => Ok(Outcome::Fault {
                vector: e.vector,
                rip_offset: self.vcpu.cpu.regs.rip.wrapping_sub(code_addr),
                state: self.state(),
            }),
            VmExit::BudgetExhausted => Err(ExecutorError::Timeout(0)),
            other => Err(ExecutorError::Os(format!("interpreter stopped: {other:?}"))),
        }
    }
}
