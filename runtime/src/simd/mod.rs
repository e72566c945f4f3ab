//! The SIMD executor: runs guest x87, MMX, SSE..SSE4.2, AVX/AVX2/FMA/F16C
//! instructions natively, one at a time, for the interpreter.
//!
//! For each distinct instruction (keyed by its encoding with addressing erased) a
//! small host stub is generated once (see `stub.rs`): it loads the guest's extended
//! state with `xrstor64`, the guest GPRs and arithmetic flags the instruction uses,
//! runs the instruction re-encoded for 64-bit with its memory operand pointed at a
//! 64-byte aligned staging buffer, and saves everything back with `xsave64`.
//!
//! Guest exceptions never become host faults:
//! - #UD: refused up front (host lacks the feature, EVEX/XOP/3DNow!, LOCK, VSIB).
//! - #GP: alignment of the *guest* address and reserved MXCSR bits are checked in
//!   Rust; the staged copy is always aligned.
//! - #XM: SSE/AVX instructions run with every MXCSR exception masked and the flags
//!   cleared; unmasked exceptions are computed afterwards from the flags raised vs.
//!   the guest's masks. On one, nothing is committed except MXCSR's flags and
//!   `Exception(19)` is returned (as hardware, which leaves the destination alone).
//! - #MF: x87 runs with the guest's real control word, because an x87 exception is
//!   only *signalled* at the next waiting instruction: the stub's remaining
//!   instructions (xsave64, fninit) do not wait, so the host never traps, and the
//!   guest state keeps FSW.ES exactly as hardware computed it. Before a waiting x87
//!   or MMX instruction the executor checks for a pending exception and returns
//!   `Exception(16)`.
//!
//! ## What the caller (interpreter) does, in order
//! 1. `is_simd(insn)` routes the instruction here (FXSAVE/XSAVE families, fences
//!    and prefetches stay with the caller).
//! 2. `check_enabled(insn, SimdControl { cr0, cr4, xcr0 })`: raise the #UD/#NM it
//!    returns (CR0.EM/TS/MP, CR4.OSFXSR/OSXSAVE, XCR0.SSE|AVX).
//! 3. `memory_access(insn)`: for an operand, compute its linear address (MASKMOVQ/
//!    MASKMOVDQU: `DS:rDI`, segment override honoured), optionally
//!    `alignment_fault` (#GP precedes #PF), do segment and page checks for the
//!    access kind, *including write permission for `Write`* (a store that faults
//!    after `execute` would leave e.g. FSTP's pop done), and read `Read`/`ReadWrite`
//!    operands into `mem`.
//! 4. `execute(...)`; on `Done` write `mem` back for `Write`/`ReadWrite`; on
//!    `Exception(19)` raise #XM, or #UD when CR4.OSXMMEXCPT is clear; on
//!    `Exception(16)` raise #MF (CR0.NE=0 legacy FERR# reporting is the caller's).
//!    On anything but `Done` nothing but MXCSR/FSW status flags changed.
//!
//! `gpr` is indexed in iced/hardware order (RAX=0 .. R15=15); only CF PF AF ZF SF OF
//! of `rflags` are read or written.
//!
//! # Safety
//! Unsafe code here calls generated stubs. A stub only touches the `StubFrame` it is
//! given, the guest XSAVE image and the staging buffer the frame points at (its
//! memory operand was rewritten to the staging buffer, which is larger than any
//! operand), saves and restores every callee-saved GPR, MXCSR and the x87 control
//! word, leaves DF clear and the x87 stack empty, and cannot fault given the checks
//! above. Stub code lives in `crate::code_mem`.

mod classify;
mod state;
mod stub;
#[cfg(test)]
mod tests;

use rustc_hash::FxHashMap;

use iced_x86::{Code, EncodingKind, Instruction, InstructionInfoFactory};

pub use classify::{check_enabled, is_simd, memory_access, Access, SimdControl};
pub use state::{FpuState, InvalidXcr0, XCR0_AVX, XCR0_SSE, XCR0_X87, XSAVE_AREA_BYTES};

use classify::{accesses_mxcsr, classify, loads_mxcsr, required_alignment, x87_pointer_fields};
use crate::code_mem::{self, CodeArena, CodeMemError};
use state::{normalize_after_save, read_u32, write_u32, HostXsave, XsaveArea, MXCSR_MASKS, OFF_MXCSR};
use stub::{StubFn, StubFrame};

/// The guest-visible result of one instruction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimdOutcome {
    /// Executed; registers, flags, FPU state and `mem` hold the results.
    Done,
    /// Not executable here: the caller raises #UD.
    Unsupported,
    /// Raise this vector instead; nothing but status flags changed. 16 #MF, 19 #XM
    /// (the caller turns it into #UD when CR4.OSXMMEXCPT is clear), 13 #GP(0).
    Exception(u8),
}

/// The executor's own failures (not guest events).
#[derive(Debug, thiserror::Error)]
pub enum SimdError {
    #[error(transparent)]
    CodeMemory(#[from] CodeMemError),
    #[error("host lacks OS-enabled XSAVE with x87 and SSE state")]
    HostLacksXsave,
}

/// Counters for `--stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimdStats {
    pub executed: u64,
    pub stubs_compiled: u64,
    pub unsupported: u64,
    pub exceptions: u64,
}

/// Vector numbers returned in [`SimdOutcome::Exception`].
const VECTOR_GP: u8 = 13;
const VECTOR_MF: u8 = 16;
const VECTOR_XM: u8 = 19;
/// CF PF AF ZF SF OF: the only RFLAGS bits a stub loads or returns.
const ARITH_FLAGS: u64 = 0x8d5;
const RFLAGS_FIXED: u64 = 0x2;
/// MXCSR exception flags (IE DE ZE OE UE PE), and the pre-computation ones
/// (the masks: `state::MXCSR_MASKS`).
const MXCSR_FLAGS: u32 = 0x3f;
const MXCSR_PRE_COMPUTATION: u32 = 0x7;
/// Largest memory operand staged (FNSAVE's 108 bytes, a YMM's 32), with slack.
const STAGING_BYTES: usize = 512;

#[repr(C, align(64))]
struct Staging([u8; STAGING_BYTES]);

/// Runs guest SIMD instructions through cached host stubs.
pub struct SimdExecutor {
    stubs: FxHashMap<Instruction, StubFn>,
    arena: CodeArena,
    info: InstructionInfoFactory,
    host: &'static HostXsave,
    host_avx: bool,
    scratch: Box<XsaveArea>,
    staging: Box<Staging>,
    stats: SimdStats,
}

impl SimdExecutor {
    pub fn new() -> Result<Self, SimdError> {
        Self::with_code_budget(code_mem::ARENA_BUDGET)
    }

    /// An executor whose stub cache is flushed whenever `budget` code bytes are used.
    pub fn with_code_budget(budget: usize) -> Result<Self, SimdError> {
        let host = HostXsave::get().ok_or(SimdError::HostLacksXsave)?;
        Ok(SimdExecutor {
            stubs: FxHashMap::default(),
            arena: CodeArena::with_budget(budget),
            info: InstructionInfoFactory::new(),
            host,
            host_avx: std::arch::is_x86_feature_detected!("avx"),
            scratch: Box::new(XsaveArea::zeroed()),
            staging: Box::new(Staging([0; STAGING_BYTES])),
            stats: SimdStats::default(),
        })
    }

    pub fn stats(&self) -> SimdStats {
        self.stats
    }

    /// Executes `insn` natively against `fpu`, the guest GPRs and arithmetic flags.
    ///
    /// When [`memory_access`] reports an operand, `mem` holds at least that many bytes
    /// (read from guest memory first for `Read`/`ReadWrite`) and `guest_addr` is the
    /// operand's guest linear address (for alignment checks); on `Done` the caller
    /// writes `mem` back for `Write`/`ReadWrite`. Otherwise pass an empty `mem`.
    pub fn execute(
        &mut self,
        insn: &Instruction,
        gpr: &mut [u64; 16],
        rflags: &mut u64,
        fpu: &mut FpuState,
        mem: &mut [u8],
        guest_addr: u64,
    ) -> SimdOutcome {
        let outcome = self.run(insn, gpr, rflags, fpu, mem, guest_addr);
        match outcome {
            SimdOutcome::Done => self.stats.executed += 1,
            SimdOutcome::Unsupported => self.stats.unsupported += 1,
            SimdOutcome::Exception(_) => self.stats.exceptions += 1,
        }
        outcome
    }

    fn run(
        &mut self,
        insn: &Instruction,
        gpr: &mut [u64; 16],
        rflags: &mut u64,
        fpu: &mut FpuState,
        mem: &mut [u8],
        guest_addr: u64,
    ) -> SimdOutcome {
        let Some(class) = classify(insn) else {
            return SimdOutcome::Unsupported;
        };
        if insn.encoding() == EncodingKind::VEX && fpu.xcr0() & XCR0_AVX == 0 {
            return SimdOutcome::Unsupported;
        }
        if class.waits_for_x87 && fpu.x87_exception_pending() {
            return SimdOutcome::Exception(VECTOR_MF);
        }
        let operand = memory_access(insn);
        let mem_len = operand.map_or(0, |(len, _)| len);
        if mem_len > STAGING_BYTES || mem.len() < mem_len || (mem_len == 0 && classify::has_memory_operand(insn)) {
            tracing::warn!(target: "simd", code = ?insn.code(), mem_len, given = mem.len(), "memory operand not staged");
            return SimdOutcome::Unsupported;
        }
        if let Some(exception) = memory_exception(insn, &mem[..mem_len], guest_addr) {
            return exception;
        }
        let Some(entry) = self.stub_for(insn) else {
            return SimdOutcome::Unsupported;
        };
        self.staging.0[..mem_len].copy_from_slice(&mem[..mem_len]);
        let outcome = self.call_stub(entry, insn.code(), gpr, rflags, fpu);
        if outcome == SimdOutcome::Done {
            if let Some((_, Access::Write | Access::ReadWrite)) = operand {
                mem[..mem_len].copy_from_slice(&self.staging.0[..mem_len]);
            }
            if let Some(range) = x87_pointer_fields(insn.code()) {
                mem[range].fill(0);
            }
        }
        outcome
    }

    /// Runs the stub on a scratch copy of the state and commits it unless an unmasked
    /// SIMD floating-point exception occurred.
    fn call_stub(
        &mut self,
        entry: StubFn,
        code: Code,
        gpr: &mut [u64; 16],
        rflags: &mut u64,
        fpu: &mut FpuState,
    ) -> SimdOutcome {
        fpu.sanitize();
        let size = fpu.xsave_size();
        self.scratch.0[..size].copy_from_slice(&fpu.raw().0[..size]);
        let guest_mxcsr = fpu.mxcsr();
        let masked_run = !accesses_mxcsr(code);
        if masked_run {
            write_u32(&mut self.scratch.0, OFF_MXCSR, (guest_mxcsr & !MXCSR_FLAGS) | MXCSR_MASKS);
        }
        // (Legacy SSE needs only CR4.OSFXSR: its state moves even where XCR0
        // holds x87 state alone.)
        let rfbm = fpu.host_components() & self.host.supported_xcr0;
        let mut frame = StubFrame {
            gpr: *gpr,
            rflags: RFLAGS_FIXED | (*rflags & ARITH_FLAGS),
            area: self.scratch.0.as_mut_ptr(),
            mem: self.staging.0.as_mut_ptr(),
            rfbm,
        };
        // SAFETY: `entry` is a live stub from `self.arena` (see the module's Safety
        // section); `frame` points at the scratch XSAVE area (64-byte aligned, sanitised
        // copy of a valid image, large enough for `rfbm`) and at the staging buffer,
        // both owned by `self` and not otherwise borrowed during the call.
        unsafe { entry(&mut frame) };
        if masked_run {
            let raised = read_u32(&self.scratch.0, OFF_MXCSR) & MXCSR_FLAGS;
            let unmasked = raised & !(guest_mxcsr >> 7) & MXCSR_FLAGS;
            if unmasked != 0 {
                fpu.set_mxcsr(guest_mxcsr | reported_flags(raised, unmasked));
                return SimdOutcome::Exception(VECTOR_XM);
            }
            write_u32(&mut self.scratch.0, OFF_MXCSR, guest_mxcsr | raised);
        }
        normalize_after_save(&mut self.scratch, rfbm, self.host);
        fpu.raw_mut().0[..size].copy_from_slice(&self.scratch.0[..size]);
        *gpr = frame.gpr;
        *rflags = (*rflags & !ARITH_FLAGS) | (frame.rflags & ARITH_FLAGS);
        SimdOutcome::Done
    }

    /// The cached stub for `insn`, generating it on first use.
    fn stub_for(&mut self, insn: &Instruction) -> Option<StubFn> {
        let key = stub::stub_key(insn);
        if let Some(&entry) = self.stubs.get(&key) {
            return Some(entry);
        }
        if self.arena.is_full() {
            // Dropping the map first: no stub pointer outlives the arena's mappings.
            self.stubs.clear();
            self.arena.clear();
        }
        let code = stub::plan(insn, &mut self.info).and_then(|p| stub::emit(&p, self.host_avx)).ok()?;
        let entry = match self.arena.publish(&code) {
            Ok(ptr) => ptr,
            Err(error) => {
                tracing::error!(target: "simd", %error, "cannot publish stub");
                return None;
            }
        };
        // SAFETY: `entry` points at the complete code of a stub emitted for the
        // `extern "sysv64" fn(*mut StubFrame)` calling convention (see stub.rs) in an
        // RX mapping that lives as long as the map entry holding the pointer.
        let entry: StubFn = unsafe { std::mem::transmute::<*const u8, StubFn>(entry) };
        self.stubs.insert(key, entry);
        self.stats.stubs_compiled += 1;
        Some(entry)
    }
}

/// The alignment #GP(0) of a memory operand at guest linear address `guest_addr`
/// (legacy SSE 16-byte operands, VEX aligned moves). Hardware checks this before the
/// page walk, so the caller may call this before reading guest memory to get #GP
/// rather than #PF first; `execute` checks it again either way.
pub fn alignment_fault(insn: &Instruction, guest_addr: u64) -> bool {
    required_alignment(insn).is_some_and(|align| !guest_addr.is_multiple_of(align as u64))
}

/// #GP(0) checks on the memory operand made before executing: alignment of the guest
/// address, and reserved bits in a value LDMXCSR would load.
fn memory_exception(insn: &Instruction, mem: &[u8], guest_addr: u64) -> Option<SimdOutcome> {
    if alignment_fault(insn, guest_addr) {
        return Some(SimdOutcome::Exception(VECTOR_GP));
    }
    if loads_mxcsr(insn.code()) && read_u32(mem, 0) & !FpuState::mxcsr_mask() != 0 {
        return Some(SimdOutcome::Exception(VECTOR_GP));
    }
    None
}

/// MXCSR flags an unmasked exception leaves set: when a pre-computation exception
/// (IE, DE, ZE) is unmasked, the result is never computed, so post-computation flags
/// (OE, UE, PE) are not raised (SDM Vol. 1, 11.5.2).
fn reported_flags(raised: u32, unmasked: u32) -> u32 {
    if unmasked & MXCSR_PRE_COMPUTATION != 0 {
        raised & MXCSR_PRE_COMPUTATION
    } else {
        raised
    }
}
