//! The interpreter: iced-x86 decodes, handlers execute, one instruction at a time.
//!
//! Decoded instructions are cached in blocks keyed by (RIP, guest physical
//! address, code size): a guest loop is decoded once. A block ends at a
//! control transfer, at a page boundary, or after [`MAX_BLOCK`] instructions;
//! handlers that change how code must be decoded or when interrupts may be
//! taken (mode changes, `sti`, `hlt`, I/O) set [`Vcpu::block_break`] so the
//! loop returns to the dispatcher. Writes to a page holding decoded code
//! invalidate its blocks (self-modifying code): write TLB entries are never
//! filled for such pages, so every such write reaches [`Vcpu::write_phys_u8`]
//! or the code-page check of the slow path.

pub mod access;
mod alu;
mod bits;
mod control;
mod dispatch;
mod fast;
mod integer;
mod string;

pub use string::{advance_reg, run_string, string_regs, Step, StringRegs};

use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::rc::Rc;

use iced_x86::{Decoder, DecoderError, DecoderOptions, FlowControl, Instruction};

pub use access::Loc;
use crate::cpu::{rflags, seg, Cpu};
use crate::exception::Exception;
use crate::memory::GuestMemory;
use crate::mmu::{tlb::Tlb, Access};
use crate::platform::{EventSignal, Platform};
use crate::stats::Stats;
use std::sync::Arc;

/// Most instructions in one decoded block.
pub const MAX_BLOCK: usize = 64;

/// With profiling on, the guest RIP is sampled once every this many blocks.
pub const PROFILE_PERIOD: u32 = 256;

/// The vCPU loop reads the clock once every this many blocks.
const TIME_POLL_BLOCKS: u32 = 32;
/// A halted vCPU with no timer deadline still looks around this often.
const HALT_MAX_SLEEP: std::time::Duration = std::time::Duration::from_millis(100);

/// Executes one decoded instruction. `cpu.regs.rip` already holds the
/// address of the next instruction; on `Err` the loop restores it.
pub type Handler = fn(&mut Vcpu, &Instruction) -> Result<(), Exception>;

#[derive(Clone)]
pub(crate) struct Decoded {
    pub insn: Instruction,
    pub exec: Handler,
    /// RIP after it: its end, wrapped at 4 GiB in 32-bit code (the
    /// decoder's next IP is not).
    pub next: u64,
}

pub(crate) struct Block {
    pub insns: Vec<Decoded>,
    /// Physical pages the block's bytes came from.
    pub pages: [u64; 2],
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct BlockKey {
    rip: u64,
    phys: u64,
    bits: u32,
}

const FAST_SLOTS: usize = 4096;

/// Decoded-block cache with page-granular invalidation.
pub(crate) struct CodeMap {
    blocks: FxHashMap<BlockKey, Rc<Block>>,
    /// Direct-mapped front of `blocks`.
    fast: Vec<Option<(BlockKey, Rc<Block>)>>,
    by_page: FxHashMap<u64, Vec<BlockKey>>,
    /// One bit per 4 KiB page of RAM: the page holds decoded code.
    code_pages: Vec<u64>,
}

impl CodeMap {
    fn new(ram_size: u64) -> Self {
        Self {
            blocks: FxHashMap::default(),
            fast: vec![None; FAST_SLOTS],
            by_page: FxHashMap::default(),
            code_pages: vec![0; (ram_size >> 12).div_ceil(64) as usize + 1],
        }
    }

    #[inline(always)]
    pub fn is_code_page(&self, phys_page: u64) -> bool {
        let p = (phys_page >> 12) as usize;
        self.code_pages.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0)
    }

    #[inline(always)]
    fn slot(key: &BlockKey) -> usize {
        ((key.phys ^ (key.rip >> 2) ^ (key.rip >> 14)) as usize) % FAST_SLOTS
    }

    fn get(&mut self, key: &BlockKey) -> Option<Rc<Block>> {
        let slot = Self::slot(key);
        if let Some((k, b)) = &self.fast[slot] {
            if k == key {
                return Some(b.clone());
            }
        }
        let b = self.blocks.get(key)?.clone();
        self.fast[slot] = Some((*key, b.clone()));
        Some(b)
    }
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The platform asked to stop (exit port, reset, quit).
    Stopped,
    /// `hlt` with interrupts disabled: nothing can ever wake the vCPU.
    HaltedForever,
    /// A triple fault; the guest state is left as it was at the fault.
    TripleFault,
    /// The instruction budget of [`Vcpu::run`] ran out.
    BudgetExhausted,
    /// The platform asked for a pause ([`Platform::pause_requested`]): the
    /// vCPU stopped between instructions and `run` may be called again.
    Paused,
    /// The VMM failed (a host fault in translated code): the guest cannot
    /// go on. The message says what happened; the guest state is as it
    /// was left, not precise.
    InternalError(String),
    /// An exception was raised while [`Vcpu::trap_exceptions`] is set: it was
    /// not delivered, RIP and registers are as the exception frame would hold.
    Exception(Exception),
}

/// One vCPU: architectural state, its soft TLB and decoded-code cache, and
/// the platform it performs I/O on.
pub struct Vcpu {
    pub cpu: Cpu,
    pub mem: Arc<GuestMemory>,
    pub platform: Box<dyn Platform>,
    pub tlb: Tlb,
    pub(crate) code: CodeMap,
    pub stats: Stats,
    /// The guest's clock (TSC and, through the platform, the PIT).
    pub clock: Arc<crate::clock::GuestClock>,
    /// Guest x87/SSE/AVX registers.
    pub fpu: crate::simd::FpuState,
    /// Runs x87/SSE/AVX instructions natively; started on first use.
    pub(crate) simd: Option<Box<crate::simd::SimdExecutor>>,
    /// Set by a handler: return to the dispatcher after this instruction.
    pub block_break: bool,
    /// Set by a handler when the vCPU must leave `run` (triple fault).
    pub exit: Option<VmExit>,
    /// Alignment checking is on (CPL 3, CR0.AM, EFLAGS.AC): misaligned data
    /// accesses raise #AC. Recomputed at every block start; everything that
    /// changes its inputs ends the block.
    pub align_check: bool,
    /// Guest RIP samples (one every [`PROFILE_PERIOD`] blocks) when profiling.
    pub profile: Option<HashMap<u64, u64>>,
    /// Stop at the first exception or software interrupt instead of
    /// delivering it (differential tests compare faults this way).
    pub trap_exceptions: bool,
    /// The binary translator, when it is the engine (`enable_bt`).
    pub bt: Option<Box<crate::bt::Bt>>,
    /// A device write since the run loop last asked the platform for its
    /// next deadline.
    deadline_stale: bool,
}

impl Vcpu {
    pub fn new(mem: Arc<GuestMemory>, platform: Box<dyn Platform>) -> Self {
        let size = mem.size();
        Self {
            cpu: Cpu::new(),
            mem,
            platform,
            tlb: Tlb::new(),
            code: CodeMap::new(size),
            stats: Stats::default(),
            clock: Arc::new(crate::clock::GuestClock::new()),
            fpu: crate::simd::FpuState::new(),
            simd: None,
            block_break: false,
            exit: None,
            trap_exceptions: false,
            bt: None,
            deadline_stale: false,
            align_check: false,
            profile: None,
        }
    }

    /// Runs until the platform stops the VM, a triple fault, or `budget` instructions.
    pub fn run(&mut self, events: &EventSignal, budget: Option<u64>) -> VmExit {
        // Host time this thread spends off the CPU between the guest's looks
        // at its clocks is hidden from them (see `clock`).
        self.clock.watch_current_thread();
        // Translated code finds its vCPU block through this thread's GS
        // base, and loops of it are kicked from this thread's kicker.
        if let Some(bt) = self.bt.as_mut() {
            if let Err(e) = bt.claim_gs().and_then(|()| bt.start_kicks()) {
                tracing::error!(target: "translator", "{e}; falling back to the interpreter");
                self.bt = None;
            }
        }
        let exit = self.run_loop(events, budget);
        if let Some(bt) = self.bt.as_mut() {
            bt.stop_kicks();
        }
        exit
    }

    /// Publishes the platform's next deadline (guest time): tells the
    /// translator's kicker when it falls in host time (the guest's clock
    /// runs behind the host's by the stalls it hid), and returns the host
    /// TSC value from which the dispatcher must look at the clock.
    fn publish_deadline(&self, deadline: Option<std::time::Instant>) -> u64 {
        if let Some(bt) = self.bt.as_ref() {
            bt.kick_at(deadline.map(|d| self.clock.to_host(d)));
        }
        deadline.map_or(u64::MAX, |d| self.clock.host_tsc_at(d))
    }

    fn run_loop(&mut self, events: &EventSignal, budget: Option<u64>) -> VmExit {
        let limit = budget.map(|b| self.stats.instructions + b);
        let mut deadline = self.platform.next_deadline();
        let mut due_tsc = self.publish_deadline(deadline);
        let mut blocks = 0u32;
        loop {
            blocks = blocks.wrapping_add(1);
            // The clock is read every few blocks, whenever the host TSC says
            // the deadline has come (one run of translated code can last
            // long: counting runs alone let a timer wait for milliseconds),
            // and whenever the kicker took translated code out of a loop.
            let kicked = self.bt.as_ref().is_some_and(|bt| bt.kicked());
            let poll = kicked || blocks.is_multiple_of(TIME_POLL_BLOCKS) || crate::clock::host_tsc() >= due_tsc;
            let now = poll.then(|| self.clock.now_due(deadline));
            let due = now.is_some_and(|now| deadline.is_some_and(|d| now >= d));
            if due || events.is_raised() {
                events.take();
                self.service_devices();
                if self.platform.pause_requested() {
                    return VmExit::Paused;
                }
            }
            // Port writes may have moved the deadline (a PIT reprogrammed).
            if poll || std::mem::take(&mut self.deadline_stale) {
                deadline = self.platform.next_deadline();
                due_tsc = self.publish_deadline(deadline);
            }
            if self.platform.stop_requested() {
                return VmExit::Stopped;
            }
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            if limit.is_some_and(|l| self.stats.instructions >= l) {
                return VmExit::BudgetExhausted;
            }
            if self.cpu.interrupts_enabled() && !self.cpu.interrupt_shadow && self.platform.intr_pending() {
                if let Some(vector) = self.platform.intr_ack() {
                    self.cpu.halted = false;
                    self.external_interrupt(vector);
                    continue;
                }
            }
            if self.cpu.halted {
                if !self.cpu.interrupts_enabled() {
                    return VmExit::HaltedForever;
                }
                let t = std::time::Instant::now();
                deadline = self.platform.next_deadline();
                let now = self.clock.now();
                let timeout = deadline.map_or(HALT_MAX_SLEEP, |d| d.saturating_duration_since(now).min(HALT_MAX_SLEEP));
                if !timeout.is_zero() {
                    events.wait(timeout);
                }
                self.clock.rested();
                // Woken late (a busy host): the lateness is not the guest's.
                self.clock.now_due(deadline);
                self.service_devices();
                deadline = self.platform.next_deadline();
                due_tsc = self.publish_deadline(deadline);
                self.stats.halted_ns += t.elapsed().as_nanos() as u64;
                continue;
            }
            if blocks.is_multiple_of(PROFILE_PERIOD) {
                if let Some(p) = self.profile.as_mut() {
                    *p.entry(self.cpu.regs.rip).or_default() += 1;
                }
            }
            let single = self.cpu.interrupt_shadow || self.cpu.regs.rflags & rflags::TF != 0;
            let remaining = limit.map_or(u64::MAX, |l| l - self.stats.instructions);
            // Translated code counts no instructions, so a run with an
            // instruction budget, single steps and #AC checking stay with the
            // interpreter.
            if self.bt.is_some() && !single && limit.is_none() && !self.alignment_checking() {
                self.run_translated();
            } else {
                self.run_block(single, remaining);
            }
        }
    }

    fn alignment_checking(&self) -> bool {
        self.cpu.cpl == 3 && self.cpu.cr0 & crate::cpu::cr0::AM != 0 && self.cpu.regs.rflags & rflags::AC != 0
    }

    /// Executes the one instruction at RIP for translated code, which could
    /// not (an interrupt shadow it starts carries on to the next one, as
    /// the run loop handles). Its mnemonic, if it could be fetched.
    pub(crate) fn interpret_one(&mut self) -> Option<iced_x86::Mnemonic> {
        let block = match self.fetch_block() {
            Ok(b) => b,
            Err(e) => {
                self.raise(e);
                return None;
            }
        };
        self.align_check = self.alignment_checking();
        self.block_break = false;
        let d = block.insns.first()?;
        self.cpu.regs.rip = d.next;
        self.stats.instructions += 1;
        if let Err(e) = (d.exec)(self, &d.insn) {
            self.cpu.regs.rip = d.insn.ip();
            self.raise(e);
        }
        Some(d.insn.mnemonic())
    }

    /// Executes one block (or one instruction if `single`).
    pub(crate) fn run_block(&mut self, single: bool, remaining: u64) {
        let block = match self.fetch_block() {
            Ok(b) => b,
            Err(e) => {
                self.raise(e);
                return;
            }
        };
        let trap_after = self.cpu.regs.rflags & rflags::TF != 0;
        self.align_check = self.alignment_checking();
        let n = if single { 1 } else { block.insns.len().min(remaining.max(1) as usize) };
        self.block_break = false;
        let mut done = 0u64;
        for d in &block.insns[..n] {
            self.cpu.regs.rip = d.next;
            done += 1;
            if let Err(e) = (d.exec)(self, &d.insn) {
                self.cpu.regs.rip = d.insn.ip();
                self.stats.instructions += done;
                self.raise(e);
                return;
            }
            if self.block_break {
                break;
            }
        }
        self.stats.instructions += done;
        if single {
            self.cpu.interrupt_shadow = false;
        }
        if trap_after {
            self.single_step_trap();
        }
    }

    /// Decodes (or finds) the block at CS:RIP.
    fn fetch_block(&mut self) -> Result<Rc<Block>, Exception> {
        let rip = self.cpu.regs.rip;
        let bits = self.cpu.code_bits();
        let lin = self.code_linear(rip)?;
        let user = self.user();
        let phys = match self.tlb.entry(lin, Access::Execute, user) {
            Some(e) => e.phys_page | (lin & 0xfff),
            None => self.translate(lin, Access::Execute, user)?,
        };
        let key = BlockKey { rip, phys, bits };
        if let Some(b) = self.code.get(&key) {
            // A block whose last instruction reaches into the next page
            // holds only while that page still maps where it did.
            let next_lin = (lin & !0xfff).wrapping_add(0x1000) & if self.cpu.long_mode() { u64::MAX } else { 0xffff_ffff };
            if b.pages[1] == u64::MAX || self.code_linear_next(next_lin).is_ok_and(|p| p & !0xfff == b.pages[1]) {
                return Ok(b);
            }
        }
        let t = std::time::Instant::now();
        let decoded = self.decode_block(rip, lin, phys, bits);
        let spent = t.elapsed();
        self.stats.vmm_ns += spent.as_nanos() as u64;
        // Decoding is the VMM's work: the guest's clocks do not see it.
        self.clock.hide(spent);
        let block = Rc::new(decoded?);
        self.insert_block(key, block.clone());
        Ok(block)
    }

    /// CS:RIP -> linear, with the CS limit check outside 64-bit mode.
    pub(crate) fn code_linear(&self, rip: u64) -> Result<u64, Exception> {
        if self.cpu.long_mode() {
            if !access::is_canonical(rip) {
                return Err(Exception::gp0());
            }
            return Ok(rip);
        }
        let cs = &self.cpu.seg[seg::CS];
        if rip > cs.limit as u64 {
            return Err(Exception::gp0());
        }
        Ok(cs.base.wrapping_add(rip) & 0xffff_ffff)
    }

    fn decode_block(&mut self, rip: u64, lin: u64, phys: u64, bits: u32) -> Result<Block, Exception> {
        self.stats.blocks_decoded += 1;
        let mut insns = Vec::new();
        let mut pages = [phys & !0xfff, u64::MAX];
        let page_left = (0x1000 - (phys & 0xfff)) as usize;
        let mut buf = [0u8; 0x1000 + 16];
        self.mem.read(phys, &mut buf[..page_left]);
        let mut off = 0usize;
        let mut ip = rip;
        let ip_mask = if bits == 32 { 0xffff_ffff } else { u64::MAX };
        while insns.len() < MAX_BLOCK {
            let insn;
            if off + 15 <= page_left {
                let mut dec = Decoder::with_ip(bits, &buf[off..page_left], ip, DecoderOptions::NONE);
                insn = dec.decode();
            } else if off < page_left {
                // The instruction may cross into the next page.
                let mut dec = Decoder::with_ip(bits, &buf[off..page_left], ip, DecoderOptions::NONE);
                let first = dec.decode();
                if dec.last_error() != DecoderError::NoMoreBytes {
                    insn = first;
                } else {
                    let mut next_lin = (lin & !0xfff).wrapping_add(0x1000);
                    if !self.cpu.long_mode() {
                        next_lin &= 0xffff_ffff;
                    }
                    let next = match self.code_linear_next(next_lin) {
                        Ok(p) => p,
                        Err(e) if insns.is_empty() => return Err(e),
                        Err(_) => break,
                    };
                    pages[1] = next & !0xfff;
                    let mut tmp = [0u8; 32];
                    let have = page_left - off;
                    tmp[..have].copy_from_slice(&buf[off..page_left]);
                    self.mem.read(next, &mut tmp[have..have + 16]);
                    let mut dec = Decoder::with_ip(bits, &tmp[..have + 16], ip, DecoderOptions::NONE);
                    let i = dec.decode();
                    insns.push(Decoded { exec: dispatch::handler(&i), next: i.next_ip() & ip_mask, insn: i });
                    break;
                }
            } else {
                break;
            }
            off += insn.len();
            ip = insn.next_ip();
            // Past the end of 32-bit code's 4 GiB, decoding goes on at 0
            // in a block of its own.
            let wraps = ip > ip_mask;
            let ends = wraps || insn.flow_control() != FlowControl::Next || insn.is_invalid() || dispatch::ends_block(&insn);
            insns.push(Decoded { exec: dispatch::handler(&insn), next: insn.next_ip() & ip_mask, insn });
            if ends {
                break;
            }
        }
        Ok(Block { insns, pages })
    }

    fn code_linear_next(&mut self, lin: u64) -> Result<u64, Exception> {
        let user = self.user();
        self.translate(lin, Access::Execute, user)
    }

    fn insert_block(&mut self, key: BlockKey, block: Rc<Block>) {
        // A block decoded again (its second page remapped) replaces the
        // old one, in the fast slot too, and is listed once per page.
        let again = self.code.blocks.contains_key(&key);
        for &page in block.pages.iter().filter(|&&p| p != u64::MAX) {
            self.mark_code_page(page);
            let keys = self.code.by_page.entry(page).or_default();
            if !again || !keys.contains(&key) {
                keys.push(key);
            }
        }
        if again {
            self.code.fast[CodeMap::slot(&key)] = Some((key, block.clone()));
        }
        self.code.blocks.insert(key, block);
    }

    /// Notes that `page` holds decoded or translated code: writes to it
    /// take the slow path from now on, which invalidates the code.
    pub(crate) fn mark_code_page(&mut self, page: u64) {
        let p = (page >> 12) as usize;
        if let Some(w) = self.code.code_pages.get_mut(p / 64) {
            if *w & (1 << (p % 64)) == 0 {
                *w |= 1 << (p % 64);
                self.tlb.protect_code_page(page);
            }
        }
    }

    /// Drops every decoded block with bytes in `phys_page` (self-modifying code).
    pub fn invalidate_code_page(&mut self, phys_page: u64) {
        self.stats.code_invalidations += 1;
        if let Some(bt) = self.bt.as_mut() {
            bt.invalidate_page(phys_page);
        }
        if let Some(keys) = self.code.by_page.remove(&phys_page) {
            for k in keys {
                self.code.blocks.remove(&k);
                let slot = CodeMap::slot(&k);
                if self.code.fast[slot].as_ref().is_some_and(|(fk, _)| *fk == k) {
                    self.code.fast[slot] = None;
                }
            }
        }
        let p = (phys_page >> 12) as usize;
        if let Some(w) = self.code.code_pages.get_mut(p / 64) {
            *w &= !(1 << (p % 64));
        }
        // The running block may be the one just dropped.
        self.block_break = true;
    }

    /// Flushes the whole decoded-code cache.
    pub fn flush_code(&mut self) {
        let mut pages: Vec<u64> = self.code.by_page.keys().copied().collect();
        if let Some(bt) = self.bt.as_ref() {
            pages.extend(bt.pages());
        }
        for p in pages {
            self.invalidate_code_page(p);
        }
    }

    /// Port input through the platform, timed for `--stats`.
    pub fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let t = crate::clock::host_tsc();
        let v = self.platform.io_in(port, size);
        self.stats.device_cycles += crate::clock::host_tsc().saturating_sub(t);
        v
    }

    /// Port output through the platform, timed for `--stats`.
    pub fn io_out(&mut self, port: u16, size: u8, value: u32) {
        let t = crate::clock::host_tsc();
        self.platform.io_out(port, size, value);
        self.deadline_stale |= self.platform.deadline_moved();
        self.stats.device_cycles += crate::clock::host_tsc().saturating_sub(t);
    }

    /// MMIO read outside RAM, timed for `--stats`.
    pub fn mmio_read(&mut self, addr: u64, size: u8) -> u64 {
        let t = crate::clock::host_tsc();
        let v = self.platform.mmio_read(addr, size);
        self.stats.device_cycles += crate::clock::host_tsc().saturating_sub(t);
        v
    }

    /// MMIO write outside RAM, timed for `--stats`.
    pub fn mmio_write(&mut self, addr: u64, size: u8, value: u64) {
        let t = crate::clock::host_tsc();
        self.platform.mmio_write(addr, size, value);
        self.deadline_stale |= self.platform.deadline_moved();
        self.stats.device_cycles += crate::clock::host_tsc().saturating_sub(t);
    }

    /// Brings time-driven devices up to date, timed for `--stats`.
    fn service_devices(&mut self) {
        let t = crate::clock::host_tsc();
        self.platform.service();
        self.stats.device_cycles += crate::clock::host_tsc().saturating_sub(t);
    }

    /// Delivers a fault raised by an instruction (or by fetching one).
    pub fn raise(&mut self, e: Exception) {
        self.stats.count_exception(e.vector);
        crate::system::interrupt::deliver_exception(self, e);
    }

    fn external_interrupt(&mut self, vector: u8) {
        self.stats.count_interrupt(vector);
        crate::system::interrupt::deliver_external(self, vector);
    }

    fn single_step_trap(&mut self) {
        crate::system::interrupt::single_step_trap(self);
    }
}

#[cfg(test)]
mod tests;
