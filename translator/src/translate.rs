//! Translation units into compiled code fragments (CCFs).
//!
//! A translation unit (TU) is at most [`MAX_TU_INSNS`] guest instructions
//! from one RIP, ending at the first control transfer or at the first
//! instruction that needs the runtime. Each instruction becomes:
//!
//! - **IDENT**: itself. Guest GPRs are host GPRs inside a CCF, so the bytes
//!   run unchanged; only guest RSP, which host RSP cannot hold, is
//!   substituted: by its own host register in 32-bit code (`tlb::R32_RSP`),
//!   by a scratch register loaded from and stored back to the vCPU block in
//!   64-bit code.
//! - **MEM**: the memory operand's linear address is computed into a scratch
//!   register (`lea`, plus the segment base where it is not zero), looked up
//!   in the soft TLB inline, and the instruction runs on the host address.
//!   A miss (unmapped page, MMIO, a code page being written, a page-crossing
//!   access) leaves the CCF so the instruction is interpreted, precisely:
//!   nothing of it has happened yet (but for a rep compare that ran to a
//!   page's end: the runtime goes on from the registers it left). Guest
//!   code can therefore only ever touch guest RAM through a CCF.
//! - **CONTROL**: direct jumps and conditional branches end the TU in exit
//!   stubs that chaining later patches into direct jumps to the next CCF
//!   (a conditional branch whose stub follows it is retargeted itself:
//!   `ExitSite::branch`); indirect ones look in the IBTC first.
//! - Stack instructions, single and `rep` string instructions and
//!   divisions run inline too, through the same probe (see `plan_insn`);
//!   everything else (system instructions, what the probe cannot cover)
//!   ends the TU with an exit that runs the instruction in the shared Rust
//!   semantics, or becomes inline code over the virtual state.
//!
//! The probe is flag-free (`pext` or `shrx`, `lea`, `jrcxz`), so arithmetic
//! flags stay in host RFLAGS throughout; only the IBTC lookup, pushf's
//! image, a rep string operation and a bit test's address arithmetic
//! clobber them, and put them aside in the block first (`save_flags`),
//! back where liveness inside the TU says they are needed. A miss leaves
//! them as they were before the instruction (a rep compare's rest, as its
//! last comparison left them), since the instruction may fault and the
//! guest sees its flags in the exception frame.
//!
//! Scratch registers hold guest values in 64-bit code: a TU spills the ones
//! it borrows to the block and gives them back before it ends. A TU that
//! loops to its own start (`LoopPlan`) spills them once at its entry and
//! its back edge jumps past the spills.

use dynasmrt::{dynasm, x64::X64Relocation, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, Encoder, FlowControl, Instruction, InstructionInfoFactory,
    MemoryOperand, Mnemonic, OpAccess, OpKind, Register, RflagsBits,
};

use crate::abi::seg::index as seg_index;
use crate::abi::{seg, tlb, BtBlock, ExitReason, IBTC_HASH, IBTC_SET_BITS, IBTC_WAYS};

// The IBTC lookups emitted here try the two ways of a set.
const _: () = assert!(IBTC_WAYS == 2);
use crate::classify::{classify, Class};
use crate::templates::{exit_stub, EXIT_STUB_LEN, UNCHAINED_JUMP};

/// The most guest instructions one TU holds.
pub const MAX_TU_INSNS: usize = 12;

/// What the translator must know about the guest's state besides its bytes;
/// part of the code cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mode {
    /// Code size: 32 or 64 (16-bit code is interpreted).
    pub bits: u32,
    /// Outside 64-bit mode: the data segments (bit `1 << seg::X`) whose base
    /// is not zero and must be added to every address. In 64-bit mode only
    /// FS and GS have bases, and they are always added.
    pub seg_base_mask: u8,
    /// The segments a CCF may access memory through without checking
    /// limits or rights (all of them in 64-bit mode); an access through any
    /// other is left to the runtime.
    pub seg_usable_mask: u8,
    /// Stack address size (SS.B, or 64): 16-bit stacks are left to the runtime.
    pub stack_bits: u32,
    /// The code runs at CPL 0: `cli` and the reads of system registers
    /// (which may fault at other privileges) become inline code.
    pub cpl0: bool,
    /// SSE instructions run without a fault (CR4.OSFXSR set, CR0.EM and
    /// CR0.TS clear): integer and logical ones run in the CCF, on the
    /// guest's XMM registers loaded into the host's.
    pub sse: bool,
    /// VEX-encoded (AVX, AVX2) instructions run without a fault too (CR4.
    /// OSXSAVE set, SSE and AVX state enabled in XCR0): the integer,
    /// logical and move ones run in the CCF, on the guest's YMM registers
    /// (the load routine's `xrstor64` brings their upper halves).
    pub avx: bool,
    /// Every SIMD floating-point exception is masked in MXCSR, so SSE and
    /// AVX floating-point arithmetic cannot fault: it runs in the CCF too
    /// (on the guest's MXCSR, whose flags it raises as the guest's).
    pub fp_masked: bool,
    /// x87 instructions run without a fault and cannot raise one (CR0.EM
    /// and CR0.TS clear, every exception masked in the control word, none
    /// pending): arithmetic, loads, stores and compares run in the CCF, on
    /// the guest's x87 registers (the load routine's `xrstor64` brings
    /// them; the runtime clears the instruction and data pointers the
    /// host leaves).
    pub x87: bool,
    /// Where 64-bit code's probes find the soft TLB's tables of this
    /// privilege (read, write): their offsets from the block (the host GS
    /// base), when both lie within 2 GiB of it, so a probe indexes a table
    /// through GS in one addressing mode. Otherwise (and in 32-bit code,
    /// whose tables ride in registers) the probe reads the table's address
    /// from the block first.
    pub tlb_tables: Option<[i32; 2]>,
}

impl Mode {
    /// What an IBTC entry's tag holds besides the RIP: in 32-bit code, the
    /// fields a kernel's own code changes as it runs (which data segments
    /// have a base and are usable, the stack size, the SIMD and x87 state's), above the 32-bit
    /// RIP, so TUs of such modes share one table. (i386 Linux runs with and
    /// without its per-CPU FS base: emptying the table at every such
    /// change cleared it 42k times while 21 shell commands ran.) 64-bit
    /// code has no bits to spare: its table is emptied at a mode change.
    pub fn ibtc_tag(&self) -> u64 {
        if self.bits != 32 {
            return 0;
        }
        let fields = self.seg_base_mask as u64 | (self.seg_usable_mask as u64) << 8 | ((self.stack_bits == 32) as u64) << 16 | (self.sse as u64) << 17 | (self.avx as u64) << 18 | (self.fp_masked as u64) << 19 | (self.x87 as u64) << 20;
        fields << 32
    }

    /// The IBTC tag of `rip` in this mode: the RIP with `ibtc_tag` above.
    pub fn ibtc_key(&self, rip: u64) -> u64 {
        rip | self.ibtc_tag()
    }

    /// What the IBTC's entries must all share, beyond what their tags
    /// hold (`ibtc_tag`): a change of it empties the table.
    pub fn ibtc_context(&self) -> Mode {
        if self.bits != 32 {
            return *self;
        }
        Mode { seg_base_mask: 0, seg_usable_mask: 0, stack_bits: 0, sse: false, avx: false, fp_masked: false, x87: false, ..*self }
    }
}

/// How the instructions of a TU were translated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ident: u32,
    pub mem: u32,
    pub control: u32,
    /// Instructions that end the TU to run in the runtime (counted once,
    /// for the one that ends it).
    pub sensitive: u32,
}

/// The sensitive instructions that become inline code reading or writing
/// the virtual state in the vCPU block, instead of callouts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VirtualOp {
    /// cli: the virtual IF byte to 0 (CPL 0 only).
    Cli,
    /// sti: the virtual IF byte to 1 (CPL 0 only), unless an interrupt is
    /// pending (`BtBlock::irq_pending`): then the runtime runs it, and
    /// delivers the interrupt after the shadow.
    Sti,
    /// cld/std: the virtual DF byte.
    SetDf(u8),
    /// pushf: arithmetic flags from the host, the rest virtual.
    Pushf,
    /// smsw/sldt/str/sgdt/sidt: a value from the block into a register or memory.
    Read(SysReg),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SysReg {
    Cr0,
    Ldtr,
    Tr,
    Gdtr,
    Idtr,
    /// A segment selector (`mov r/m, sreg`), by `seg` index.
    Seg(u8),
}

/// What one guest instruction became.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Treatment {
    /// Itself (IDENT), or nothing at all (a nop).
    Ident,
    /// Itself on a host address found by an inline soft-TLB probe.
    Mem,
    /// A branch into exit stubs (chained later).
    Control,
    /// Sensitive, done inline over the virtual state in the vCPU block.
    Inline,
    /// An exit to the shared Rust semantics, which run it.
    Callout,
}

/// One exit stub of a CCF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitSite {
    /// Offset of the stub's patchable `jmp rel32`.
    pub offset: usize,
    /// The guest RIP the stub leaves for.
    pub rip: u64,
    pub reason: ExitReason,
    /// Where a chained jump through the stub lands, if not at the entry of
    /// the target TU: a loop's back edge (see `LoopPlan`) jumps past the
    /// spills its TU's entry makes.
    pub chain_to: Option<usize>,
    /// Offset of the `rel32` of the conditional branch whose target this
    /// stub is, if any: chaining retargets the branch itself, so a taken
    /// branch goes straight to the next CCF rather than through the stub's
    /// jump (one taken jump less on every pass of a loop).
    pub branch: Option<usize>,
}

impl ExitSite {
    /// The jump displacement chaining rewrites (its offset in the CCF),
    /// and the value that makes it an exit again: the stub's own `jmp
    /// rel32` (0, onto the exit code behind it), or the conditional
    /// branch's (onto the stub).
    pub fn link(&self) -> (usize, i32) {
        match self.branch {
            Some(b) => (b, (self.offset as i64 - (b as i64 + 4)) as i32),
            None => (self.offset + 1, 0),
        }
    }
}

/// A compiled code fragment, position-independent until it is chained.
#[derive(Clone, Debug)]
pub struct Ccf {
    pub code: Vec<u8>,
    /// Offset of the entry point (chained jumps land here too).
    pub entry: usize,
    /// The guest instructions of the TU, the last one possibly only
    /// handed to the runtime (see `counts.sensitive`).
    pub guest: Vec<Instruction>,
    /// What each of `guest` became.
    pub treatment: Vec<Treatment>,
    /// Guest bytes the TU spans from its first RIP.
    pub guest_bytes: usize,
    pub counts: Counts,
    pub exits: Vec<ExitSite>,
    /// Host offset at which each guest instruction's code starts, with its
    /// RIP: a host fault inside the CCF maps back to a guest instruction.
    pub rip_map: Vec<(u32, u64)>,
}

/// What became of a TU.
#[derive(Clone, Debug)]
pub enum Outcome {
    Ccf(Ccf),
    /// The first instruction must run in the runtime; nothing to compile.
    Interpret,
}

/// How one instruction is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Emits nothing (nop, endbr).
    Nothing,
    Ident,
    Mem,
    Jump(u64),
    Branch(ConditionCode, u64),
    /// loop, loope, loopne or jrcxz/jecxz on the code size's counter
    /// register: the host's own instruction (the guest's RCX is the
    /// host's), over the fall-through exit to the taken one.
    CountBranch(u64),
    /// push of a register or an immediate.
    Push,
    /// push of a segment register: its selector, from the block, written
    /// as 16 bits at the bottom of the slot (the rest is left as it was,
    /// as recent CPUs and the interpreter do).
    PushSeg,
    /// pop into a register.
    Pop,
    /// leave: RSP = RBP, then pop RBP.
    Leave,
    /// A direct near call: push the return address, then jump.
    Call(u64),
    /// A near return (with its immediate).
    Ret,
    /// jmp or call through a register.
    IndirectReg,
    /// jmp or call through memory (the natural width).
    IndirectMem,
    /// Inline code over the virtual state in the vCPU block.
    Virtual(VirtualOp),
    /// div/idiv by a register, run natively: its RIP is stored first, so a
    /// host #DE (SIGFPE) leaves the CCF precisely at it.
    Divide,
    /// div/idiv by memory: the divisor is read through the soft TLB into a
    /// block slot, every scratch register is given back, and the division
    /// runs on the slot as `Divide` does (a #DE finds the guest's registers).
    DivideMem,
    /// bt/bts/btr/btc of memory with a register bit offset, which reaches
    /// beyond the operand: the address moved by the offset's whole
    /// operands, the probe there, then the host's instruction with the
    /// offset reduced to a bit of that operand.
    BitMem,
    /// lods/stos without a rep prefix: one access at [R]SI or [R]DI, which
    /// then moves by the operand size, down if the virtual DF is set.
    StringOne,
    /// rep stos and rep movs at the natural address size: run as the
    /// host's own instruction on the host addresses when the virtual DF is
    /// clear and each operand lies in one page that has an entry;
    /// otherwise (a count of 0, a longer or page-crossing operand, a miss)
    /// the runtime runs it.
    RepString,
    /// repe/repne cmps and scas at the natural address size: the host's
    /// own instruction over the elements that lie in the operands' pages
    /// (both with entries, virtual DF clear), then the flags it left
    /// decide: it ended (the condition, or the count) or the runtime runs
    /// the rest from there.
    RepCompare,
    /// An integer or logical SSE instruction, on the guest's XMM registers
    /// (loaded into the host's first: see `BtBlock::fpu_enter`), with its
    /// memory operand, if any, rewritten as MEM does (16-byte operands of
    /// the aligned forms checked for alignment first: #GP is the runtime's).
    Sse,
    /// Ends the TU: the runtime runs this instruction.
    Stop,
}

const ARITH_FLAGS: u32 = RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;

const GPR64: [Register; 16] = [
    Register::RAX, Register::RCX, Register::RDX, Register::RBX, Register::RSP, Register::RBP, Register::RSI, Register::RDI,
    Register::R8, Register::R9, Register::R10, Register::R11, Register::R12, Register::R13, Register::R14, Register::R15,
];
const GPR32: [Register; 16] = [
    Register::EAX, Register::ECX, Register::EDX, Register::EBX, Register::ESP, Register::EBP, Register::ESI, Register::EDI,
    Register::R8D, Register::R9D, Register::R10D, Register::R11D, Register::R12D, Register::R13D, Register::R14D, Register::R15D,
];
const GPR16: [Register; 16] = [
    Register::AX, Register::CX, Register::DX, Register::BX, Register::SP, Register::BP, Register::SI, Register::DI,
    Register::R8W, Register::R9W, Register::R10W, Register::R11W, Register::R12W, Register::R13W, Register::R14W, Register::R15W,
];
const GPR8: [Register; 16] = [
    Register::AL, Register::CL, Register::DL, Register::BL, Register::SPL, Register::BPL, Register::SIL, Register::DIL,
    Register::R8L, Register::R9L, Register::R10L, Register::R11L, Register::R12L, Register::R13L, Register::R14L, Register::R15L,
];
const RSP: u8 = 4;

/// The hardware number of a general register (any width), if it is one.
fn gpr_number(r: Register) -> Option<u8> {
    if !r.is_gpr() {
        return None;
    }
    GPR64.iter().position(|&g| g == r.full_register()).map(|n| n as u8)
}

/// Register `n` at `size` bytes (8-bit means the low byte, never AH..BH).
fn gpr_sized(n: u8, size: usize) -> Register {
    let n = n as usize & 15;
    match size {
        1 => GPR8[n],
        2 => GPR16[n],
        4 => GPR32[n],
        _ => GPR64[n],
    }
}

fn is_high_byte(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

/// Decodes and plans a TU: the instructions and what each becomes. The
/// last instruction is the one that ends the TU (a branch or a stop), or
/// the `limit`-th.
fn plan_tu(bytes: &[u8], rip: u64, mode: Mode, limit: usize) -> Vec<(Instruction, Plan)> {
    let mut dec = Decoder::with_ip(mode.bits, bytes, rip, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut info = InstructionInfoFactory::new();
    // One that ends past 32-bit code's 4 GiB (EIP wraps to 0 there, the
    // decoder's next IP does not) is left to the runtime.
    let plan_of = |insn: &Instruction, info: &mut InstructionInfoFactory| {
        let wraps = mode.bits == 32 && insn.next_ip() > 0xffff_ffff;
        if insn.is_invalid() || wraps { Plan::Stop } else { plan_insn(insn, mode, info) }
    };
    while out.len() < limit && dec.can_decode() {
        let mut insn = dec.decode();
        if mode.bits != 64 {
            host_form(&mut insn);
        }
        let plan = plan_of(&insn, &mut info);
        if plan == Plan::Virtual(VirtualOp::Sti) {
            // The instruction after sti runs before any interrupt (the
            // shadow): it ends the TU, so that the dispatcher looks only
            // after it. One that is not translated (hlt, most often) leaves
            // sti to the runtime, which keeps the shadow itself.
            let next = (out.len() + 1 < limit && dec.can_decode()).then(|| {
                let mut next = dec.decode();
                if mode.bits != 64 {
                    host_form(&mut next);
                }
                let plan = plan_of(&next, &mut info);
                (next, plan)
            });
            match next {
                Some((next, next_plan)) if next_plan != Plan::Stop => {
                    out.push((insn, plan));
                    out.push((next, next_plan));
                }
                _ => out.push((insn, Plan::Stop)),
            }
            break;
        }
        out.push((insn, plan));
        if matches!(plan, Plan::Jump(_) | Plan::Branch(..) | Plan::CountBranch(_) | Plan::Stop | Plan::Call(_) | Plan::Ret | Plan::IndirectReg | Plan::IndirectMem) {
            break;
        }
    }
    // Bytes ran out mid-instruction: leave the rest to the runtime.
    if out.is_empty() && !bytes.is_empty() {
        out.push((Instruction::default(), Plan::Stop));
    }
    out
}

/// The host encoding (address-size prefix, opcode) of a loop, loope,
/// loopne or jrcxz/jecxz that counts with the code size's own register
/// (RCX in 64-bit code, ECX in 32-bit code, which the host names with an
/// address-size prefix) and has the code size's operand size. Others
/// (CX, ECX in 64-bit code, a 16-bit target) are left to the runtime.
fn count_branch_bytes(insn: &Instruction, mode: Mode) -> Option<(Option<u8>, u8)> {
    let opcode = match (mode.bits, insn.code()) {
        (64, Code::Loopne_rel8_64_RCX) | (32, Code::Loopne_rel8_32_ECX) => 0xe0,
        (64, Code::Loope_rel8_64_RCX) | (32, Code::Loope_rel8_32_ECX) => 0xe1,
        (64, Code::Loop_rel8_64_RCX) | (32, Code::Loop_rel8_32_ECX) => 0xe2,
        (64, Code::Jrcxz_rel8_64) | (32, Code::Jecxz_rel8_32) => 0xe3,
        _ => return None,
    };
    Some(((mode.bits == 32).then_some(0x67), opcode))
}

/// Replaces a 32-bit-only encoding by the 64-bit form with the same effect
/// (the one-byte inc/dec are REX prefixes on the host).
fn host_form(insn: &mut Instruction) {
    let code = match insn.code() {
        Code::Inc_r16 => Code::Inc_rm16,
        Code::Inc_r32 => Code::Inc_rm32,
        Code::Dec_r16 => Code::Dec_rm16,
        Code::Dec_r32 => Code::Dec_rm32,
        _ => return,
    };
    insn.set_code(code);
}

fn plan_insn(insn: &Instruction, mode: Mode, info: &mut InstructionInfoFactory) -> Plan {
    // A direct branch to a non-canonical target (from code at the top of
    // the lower half) is #GP at the branch, with nothing pushed: the
    // runtime's. (Its exit would leave for the target, faulting there.)
    let direct = matches!(insn.op0_kind(), OpKind::NearBranch64);
    if mode.bits == 64 && direct && !crate::classify::is_canonical(insn.near_branch_target()) {
        return Plan::Stop;
    }
    // Direct jumps become exit stubs of our own, in any code size.
    if insn.is_jmp_short_or_near() {
        return Plan::Jump(insn.near_branch_target());
    }
    if insn.is_jcc_short_or_near() {
        return Plan::Branch(insn.condition_code(), insn.near_branch_target());
    }
    if count_branch_bytes(insn, mode).is_some() {
        return Plan::CountBranch(insn.near_branch_target());
    }
    if let Some(plan) = plan_stack(insn, mode) {
        return plan;
    }
    if let Some(op) = plan_virtual(insn, mode) {
        return Plan::Virtual(op);
    }
    if plan_string_one(insn, mode) {
        return Plan::StringOne;
    }
    if plan_rep_string(insn, mode) {
        return Plan::RepString;
    }
    if plan_rep_compare(insn, mode) {
        return Plan::RepCompare;
    }
    if crate::classify::is_hint_nop(insn) {
        return Plan::Nothing;
    }
    // What is left of the reserved NOP space, 0F 0D with a register
    // operand, is #UD on the host: the runtime raises it.
    if insn.mnemonic() == Mnemonic::Reservednop {
        return Plan::Stop;
    }
    if classify(insn.code()).0 != Class::Data {
        return Plan::Stop;
    }
    if insn.flow_control() != FlowControl::Next {
        return Plan::Stop;
    }
    let m = insn.mnemonic();
    // Nothing to do (the prefetches and endbr are hint NOPs, above).
    if matches!(m, Mnemonic::Nop | Mnemonic::Pause) {
        return Plan::Nothing;
    }

    // A division runs natively, its host fault caught (by memory through
    // a block slot, so that a fault finds no scratch register borrowed).
    if matches!(m, Mnemonic::Div | Mnemonic::Idiv) {
        return match insn.op0_kind() {
            OpKind::Register if gpr_number(insn.op0_register()).is_some_and(|n| n != RSP) => Plan::Divide,
            OpKind::Memory if mem_operand_ok(insn, mode) => Plan::DivideMem,
            _ => Plan::Stop,
        };
    }
    // Implicit or unbounded memory: the runtime's.
    if matches!(m, Mnemonic::Xlatb | Mnemonic::Enter | Mnemonic::Leave)
        || insn.stack_pointer_increment() != 0
    {
        return Plan::Stop;
    }
    // bt/bts/btr/btc with a register bit offset address memory beyond the
    // operand: inline where the address has the code's own width (64-bit
    // code keeps RSP in the block, so not through RSP there).
    if matches!(m, Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc)
        && insn.op0_kind() == OpKind::Memory
        && insn.op1_kind() == OpKind::Register
    {
        let (base, index) = (insn.memory_base(), insn.memory_index());
        let addr = if base != Register::None { base } else { index };
        // (An EIP-relative operand, 64-bit code's 67h form, wraps at 4 GiB.)
        let width_ok = addr == Register::None || addr == Register::RIP || (addr != Register::EIP && addr.size() as u32 * 8 == mode.bits);
        let names_rsp = [base, index, insn.op1_register()].iter().any(|&r| gpr_number(r) == Some(RSP));
        let ok = mem_operand_ok(insn, mode) && width_ok && !(names_rsp && mode.bits == 64);
        return if ok { Plan::BitMem } else { Plan::Stop };
    }
    if (mode.sse && sse_inline(insn, mode, info)) || (mode.x87 && x87_inline(insn, mode, info)) {
        return Plan::Sse;
    }
    // fwait looks at the guest's x87 state (a pending unmasked exception
    // is #MF, CR0.TS with MP #NM): the host's would answer for it.
    if m == Mnemonic::Wait {
        return Plan::Stop;
    }
    // Only integer instructions on general registers run as themselves for
    // now: x87/SSE/AVX state is the runtime's (some x87 and SSE forms, like
    // fnstcw or stmxcsr, name no vector register at all).
    if !insn.cpuid_features().iter().all(|f| integer_feature(*f))
        && !matches!(m, Mnemonic::Lfence | Mnemonic::Mfence | Mnemonic::Sfence | Mnemonic::Movnti)
    {
        return Plan::Stop;
    }
    let used = info.info(insn);
    if used.used_registers().iter().any(|u| !u.register().is_gpr() && !u.register().is_segment_register()) {
        return Plan::Stop;
    }
    let mut has_mem = false;
    for i in 0..insn.op_count() {
        match insn.op_kind(i) {
            OpKind::Register => {
                if !insn.op_register(i).is_gpr() {
                    return Plan::Stop;
                }
            }
            OpKind::Memory => has_mem = true,
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => {}
            _ => return Plan::Stop,
        }
    }
    if !has_mem || m == Mnemonic::Lea {
        return if m == Mnemonic::Lea && !lea_is_plain(insn, mode) { Plan::Stop } else { Plan::Ident };
    }
    let size = insn.memory_size().size();
    if size == 0 || size > 16 || used.used_memory().len() != 1 {
        return Plan::Stop;
    }
    if mode.seg_usable_mask & (1 << seg_index(insn.memory_segment())) == 0 {
        return Plan::Stop;
    }
    Plan::Mem
}

/// SSE and AVX instructions that run in a CCF: integer, logical, shuffle,
/// string-compare and move instructions on XMM (and general) registers,
/// and their VEX forms on XMM and YMM registers where the guest has AVX
/// enabled (`Mode::avx`), none of which reads or writes MXCSR or can raise
/// a SIMD floating-point exception. MMX forms (the same mnemonics on MM
/// registers), floating-point arithmetic, masked and non-temporal moves,
/// gathers and EVEX forms stay with the runtime.
fn sse_inline(insn: &Instruction, mode: Mode, info: &mut InstructionInfoFactory) -> bool {
    let ok = match insn.encoding() {
        // (`movsd` and `movss` name the string moves too.)
        iced_x86::EncodingKind::Legacy => {
            legacy_sse_inline(insn.mnemonic())
                || matches!(insn.code(), Code::Movss_xmm_xmmm32 | Code::Movss_xmmm32_xmm | Code::Movsd_xmm_xmmm64 | Code::Movsd_xmmm64_xmm)
                || (mode.fp_masked && (legacy_fp_inline(insn.mnemonic()) || insn.code() == Code::Cmpsd_xmm_xmmm64_imm8))
        }
        // (`vzeroupper` in 32-bit code leaves YMM8-15 alone; the host's
        // would clear them.)
        iced_x86::EncodingKind::VEX => {
            mode.avx
                && (vex_inline(insn.mnemonic()) || (mode.fp_masked && vex_fp_inline(insn.mnemonic())))
                && insn.cpuid_features().iter().all(|&f| host_has(f))
                && !(mode.bits != 64 && matches!(insn.mnemonic(), Mnemonic::Vzeroupper | Mnemonic::Vzeroall))
        }
        _ => false,
    };
    if !ok || insn.has_lock_prefix() {
        return false;
    }
    // XMM, YMM and general registers only. A VEX form's destination shows
    // as the ZMM register whose bits above it the host clears: none the
    // guest has (its XCR0 holds no AVX-512 state).
    let vex = insn.encoding() == iced_x86::EncodingKind::VEX;
    operands_inline(insn, mode, info, |r| r.is_xmm() || r.is_ymm() || (vex && r.is_zmm()), &[1, 2, 4, 8, 16, 32])
}

/// Whether the operands of an SSE, AVX or x87 instruction let it run in a
/// CCF: registers of its unit (`unit_reg`) and general registers only, RSP
/// only in the address (which MEM's rewrite takes from where it lives), and
/// at most one memory operand, of one of `sizes` bytes, through a segment
/// a CCF may use.
fn operands_inline(insn: &Instruction, mode: Mode, info: &mut InstructionInfoFactory, unit_reg: impl Fn(Register) -> bool, sizes: &[usize]) -> bool {
    let names_rsp = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && gpr_number(insn.op_register(i)) == Some(RSP));
    if names_rsp {
        return false;
    }
    let used = info.info(insn);
    let regs_ok = used.used_registers().iter().all(|u| {
        let r = u.register();
        unit_reg(r) || r.is_gpr() || r.is_segment_register() || matches!(r, Register::RIP | Register::EIP)
    });
    if !regs_ok {
        return false;
    }
    let has_mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory);
    !has_mem
        || (sizes.contains(&insn.memory_size().size())
            && used.used_memory().len() == 1
            && mode.seg_usable_mask & (1 << seg_index(insn.memory_segment())) != 0)
}

/// x87 instructions that run in a CCF where none can fault (`Mode::x87`):
/// loads, stores, arithmetic, compares, transcendentals and stack
/// operations on the guest's registers. Those that load or store the
/// environment or the control word, or reinitialise the unit, stay with
/// the runtime (they may change what `Mode::x87` was decided on).
fn x87_inline(insn: &Instruction, mode: Mode, info: &mut InstructionInfoFactory) -> bool {
    use Mnemonic as M;
    let ok = matches!(
        insn.mnemonic(),
        M::Fld | M::Fst | M::Fstp | M::Fild | M::Fist | M::Fistp | M::Fisttp | M::Fld1 | M::Fldz | M::Fldpi
            | M::Fldl2e | M::Fldl2t | M::Fldlg2 | M::Fldln2 | M::Fadd | M::Faddp | M::Fiadd | M::Fsub | M::Fsubp
            | M::Fisub | M::Fsubr | M::Fsubrp | M::Fisubr | M::Fmul | M::Fmulp | M::Fimul | M::Fdiv | M::Fdivp
            | M::Fidiv | M::Fdivr | M::Fdivrp | M::Fidivr | M::Fchs | M::Fabs | M::Fsqrt | M::Frndint | M::Fscale
            | M::Fxtract | M::Fprem | M::Fprem1 | M::Fcom | M::Fcomp | M::Fcompp | M::Fucom | M::Fucomp
            | M::Fucompp | M::Ficom | M::Ficomp | M::Fcomi | M::Fcomip | M::Fucomi | M::Fucomip | M::Ftst
            | M::Fxam | M::Fxch | M::Fcmovb | M::Fcmove | M::Fcmovbe | M::Fcmovu | M::Fcmovnb | M::Fcmovne
            | M::Fcmovnbe | M::Fcmovnu | M::Fnstsw | M::Fnstcw | M::Wait | M::Fnclex | M::Ffree | M::Fincstp
            | M::Fdecstp | M::Fnop | M::Fsin | M::Fcos | M::Fsincos | M::Fptan | M::Fpatan | M::F2xm1 | M::Fyl2x
            | M::Fyl2xp1
    );
    if !ok || insn.encoding() != iced_x86::EncodingKind::Legacy {
        return false;
    }
    // x87 and general registers only (`fnstsw ax`).
    let st = |r: Register| (Register::ST0 as u32..=Register::ST7 as u32).contains(&(r as u32));
    operands_inline(insn, mode, info, st, &[2, 4, 8, 10])
}

/// Whether the host runs instructions of CPUID feature `f` (of those the
/// inline SSE and AVX instructions need).
fn host_has(f: iced_x86::CpuidFeature) -> bool {
    use iced_x86::CpuidFeature as F;
    match f {
        F::AVX => std::arch::is_x86_feature_detected!("avx"),
        F::AVX2 => std::arch::is_x86_feature_detected!("avx2"),
        F::AES => std::arch::is_x86_feature_detected!("aes"),
        F::PCLMULQDQ => std::arch::is_x86_feature_detected!("pclmulqdq"),
        F::SSE4_2 => std::arch::is_x86_feature_detected!("sse4.2"),
        _ => false,
    }
}

/// The VEX-encoded instructions `sse_inline` takes: the AVX and AVX2 forms
/// of the legacy ones, and AVX's own data movement (broadcasts, lane
/// inserts and extracts, permutes, blends, `vzeroupper`).
fn vex_inline(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Vmovdqa | M::Vmovdqu | M::Vmovaps | M::Vmovups | M::Vmovapd | M::Vmovupd | M::Vmovd | M::Vmovq
            | M::Vpxor | M::Vpor | M::Vpand | M::Vpandn | M::Vxorps | M::Vxorpd | M::Vandps | M::Vandpd
            | M::Vandnps | M::Vandnpd | M::Vorps | M::Vorpd
            | M::Vpaddb | M::Vpaddw | M::Vpaddd | M::Vpaddq | M::Vpsubb | M::Vpsubw | M::Vpsubd | M::Vpsubq
            | M::Vpaddsb | M::Vpaddsw | M::Vpaddusb | M::Vpaddusw | M::Vpsubsb | M::Vpsubsw | M::Vpsubusb
            | M::Vpsubusw | M::Vpmullw | M::Vpmulhw | M::Vpmulhuw | M::Vpmuludq | M::Vpmulld | M::Vpmaddwd
            | M::Vpmaddubsw | M::Vpmulhrsw
            | M::Vpsllw | M::Vpslld | M::Vpsllq | M::Vpsrlw | M::Vpsrld | M::Vpsrlq | M::Vpsraw | M::Vpsrad
            | M::Vpsllvd | M::Vpsllvq | M::Vpsrlvd | M::Vpsrlvq | M::Vpsravd
            | M::Vpslldq | M::Vpsrldq | M::Vpshufd | M::Vpshufhw | M::Vpshuflw | M::Vpshufb | M::Vpalignr
            | M::Vpunpcklbw | M::Vpunpcklwd | M::Vpunpckldq | M::Vpunpcklqdq | M::Vpunpckhbw | M::Vpunpckhwd
            | M::Vpunpckhdq | M::Vpunpckhqdq | M::Vpacksswb | M::Vpackssdw | M::Vpackuswb | M::Vpackusdw
            | M::Vpcmpeqb | M::Vpcmpeqw | M::Vpcmpeqd | M::Vpcmpeqq | M::Vpcmpgtb | M::Vpcmpgtw | M::Vpcmpgtd
            | M::Vpcmpgtq | M::Vpminub | M::Vpmaxub | M::Vpminsw | M::Vpmaxsw | M::Vpminud | M::Vpmaxud
            | M::Vpminsd | M::Vpmaxsd | M::Vpminuw | M::Vpmaxuw | M::Vpminsb | M::Vpmaxsb
            | M::Vpavgb | M::Vpavgw | M::Vpsadbw | M::Vpabsb | M::Vpabsw | M::Vpabsd | M::Vpsignb | M::Vpsignw
            | M::Vpsignd | M::Vphaddw | M::Vphaddd | M::Vphsubw | M::Vphsubd
            | M::Vpmovmskb | M::Vmovmskps | M::Vmovmskpd | M::Vpextrb | M::Vpextrw | M::Vpextrd | M::Vpextrq
            | M::Vpinsrb | M::Vpinsrw | M::Vpinsrd | M::Vpinsrq | M::Vptest | M::Vtestps | M::Vtestpd
            | M::Vpclmulqdq | M::Vaesenc | M::Vaesenclast | M::Vaesdec | M::Vaesdeclast | M::Vaesimc
            | M::Vaeskeygenassist | M::Vshufps | M::Vshufpd | M::Vunpcklps | M::Vunpckhps | M::Vunpcklpd
            | M::Vunpckhpd | M::Vmovhlps | M::Vmovlhps | M::Vpblendw | M::Vpblendd | M::Vpblendvb
            | M::Vblendps | M::Vblendpd | M::Vblendvps | M::Vblendvpd
            | M::Vpcmpistri | M::Vpcmpestri | M::Vpcmpistrm | M::Vpcmpestrm
            | M::Vpbroadcastb | M::Vpbroadcastw | M::Vpbroadcastd | M::Vpbroadcastq | M::Vbroadcastss
            | M::Vbroadcastsd | M::Vbroadcasti128 | M::Vbroadcastf128 | M::Vinserti128 | M::Vextracti128
            | M::Vinsertf128 | M::Vextractf128 | M::Vperm2i128 | M::Vperm2f128 | M::Vpermq | M::Vpermd
            | M::Vpermilps | M::Vpermilpd | M::Vpmovzxbw | M::Vpmovzxbd | M::Vpmovzxbq | M::Vpmovzxwd
            | M::Vpmovzxwq | M::Vpmovzxdq | M::Vpmovsxbw | M::Vpmovsxbd | M::Vpmovsxbq | M::Vpmovsxwd
            | M::Vpmovsxwq | M::Vpmovsxdq | M::Vzeroupper | M::Vzeroall | M::Vmovss | M::Vmovsd | M::Vmovhps
            | M::Vmovlps | M::Vmovhpd | M::Vmovlpd | M::Vmovddup | M::Vmovsldup | M::Vmovshdup | M::Vlddqu
            | M::Vinsertps | M::Vextractps
    )
}

/// Legacy SSE floating-point arithmetic, compares and conversions, which
/// `sse_inline` takes where MXCSR masks every exception (`Mode::fp_masked`).
/// (`cmpsd` names the string compare too: its SSE form goes by its code.)
fn legacy_fp_inline(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Addss | M::Addsd | M::Addps | M::Addpd | M::Subss | M::Subsd | M::Subps | M::Subpd | M::Mulss
            | M::Mulsd | M::Mulps | M::Mulpd | M::Divss | M::Divsd | M::Divps | M::Divpd | M::Sqrtss | M::Sqrtsd
            | M::Sqrtps | M::Sqrtpd | M::Minss | M::Minsd | M::Minps | M::Minpd | M::Maxss | M::Maxsd | M::Maxps
            | M::Maxpd | M::Comiss | M::Comisd | M::Ucomiss | M::Ucomisd | M::Cmpss | M::Cmpps | M::Cmppd
            | M::Cvtsi2ss | M::Cvtsi2sd | M::Cvtss2sd | M::Cvtsd2ss | M::Cvttss2si | M::Cvttsd2si | M::Cvtss2si
            | M::Cvtsd2si | M::Cvtdq2ps | M::Cvtps2dq | M::Cvttps2dq | M::Cvtdq2pd | M::Cvtpd2dq | M::Cvttpd2dq
            | M::Cvtps2pd | M::Cvtpd2ps | M::Roundss | M::Roundsd | M::Roundps | M::Roundpd | M::Rcpss | M::Rcpps
            | M::Rsqrtss | M::Rsqrtps | M::Haddps | M::Haddpd | M::Hsubps | M::Hsubpd | M::Addsubps | M::Addsubpd
            | M::Dpps | M::Dppd
    )
}

/// The VEX forms of `legacy_fp_inline`'s instructions.
fn vex_fp_inline(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Vaddss | M::Vaddsd | M::Vaddps | M::Vaddpd | M::Vsubss | M::Vsubsd | M::Vsubps | M::Vsubpd
            | M::Vmulss | M::Vmulsd | M::Vmulps | M::Vmulpd | M::Vdivss | M::Vdivsd | M::Vdivps | M::Vdivpd
            | M::Vsqrtss | M::Vsqrtsd | M::Vsqrtps | M::Vsqrtpd | M::Vminss | M::Vminsd | M::Vminps | M::Vminpd
            | M::Vmaxss | M::Vmaxsd | M::Vmaxps | M::Vmaxpd | M::Vcomiss | M::Vcomisd | M::Vucomiss | M::Vucomisd
            | M::Vcmpss | M::Vcmpsd | M::Vcmpps | M::Vcmppd | M::Vcvtsi2ss | M::Vcvtsi2sd | M::Vcvtss2sd
            | M::Vcvtsd2ss | M::Vcvttss2si | M::Vcvttsd2si | M::Vcvtss2si | M::Vcvtsd2si | M::Vcvtdq2ps
            | M::Vcvtps2dq | M::Vcvttps2dq | M::Vcvtdq2pd | M::Vcvtpd2dq | M::Vcvttpd2dq | M::Vcvtps2pd
            | M::Vcvtpd2ps | M::Vroundss | M::Vroundsd | M::Vroundps | M::Vroundpd | M::Vrcpss | M::Vrcpps
            | M::Vrsqrtss | M::Vrsqrtps | M::Vhaddps | M::Vhaddpd | M::Vhsubps | M::Vhsubpd | M::Vaddsubps
            | M::Vaddsubpd | M::Vdpps | M::Vdppd
    )
}

/// The legacy-encoded SSE instructions `sse_inline` takes.
fn legacy_sse_inline(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Movdqa | M::Movdqu | M::Movaps | M::Movups | M::Movapd | M::Movupd | M::Movd | M::Movq
            | M::Pxor | M::Por | M::Pand | M::Pandn | M::Xorps | M::Xorpd | M::Andps | M::Andpd | M::Andnps
            | M::Andnpd | M::Orps | M::Orpd
            | M::Paddb | M::Paddw | M::Paddd | M::Paddq | M::Psubb | M::Psubw | M::Psubd | M::Psubq
            | M::Paddsb | M::Paddsw | M::Paddusb | M::Paddusw | M::Psubsb | M::Psubsw | M::Psubusb | M::Psubusw
            | M::Pmullw | M::Pmulhw | M::Pmulhuw | M::Pmuludq | M::Pmulld | M::Pmaddwd | M::Pmaddubsw | M::Pmulhrsw
            | M::Psllw | M::Pslld | M::Psllq | M::Psrlw | M::Psrld | M::Psrlq | M::Psraw | M::Psrad
            | M::Pslldq | M::Psrldq | M::Pshufd | M::Pshufhw | M::Pshuflw | M::Pshufb | M::Palignr
            | M::Punpcklbw | M::Punpcklwd | M::Punpckldq | M::Punpcklqdq | M::Punpckhbw | M::Punpckhwd
            | M::Punpckhdq | M::Punpckhqdq | M::Packsswb | M::Packssdw | M::Packuswb | M::Packusdw
            | M::Pcmpeqb | M::Pcmpeqw | M::Pcmpeqd | M::Pcmpeqq | M::Pcmpgtb | M::Pcmpgtw | M::Pcmpgtd
            | M::Pminub | M::Pmaxub | M::Pminsw | M::Pmaxsw | M::Pminud | M::Pmaxud | M::Pminsd | M::Pmaxsd
            | M::Pavgb | M::Pavgw | M::Psadbw | M::Pabsb | M::Pabsw | M::Pabsd | M::Psignb | M::Psignw
            | M::Psignd | M::Phaddw | M::Phaddd | M::Phsubw | M::Phsubd
            | M::Pmovmskb | M::Pextrb | M::Pextrw | M::Pextrd | M::Pextrq | M::Pinsrb | M::Pinsrw | M::Pinsrd
            | M::Pinsrq | M::Ptest | M::Pclmulqdq | M::Aesenc | M::Aesenclast | M::Aesdec | M::Aesdeclast
            | M::Aesimc | M::Aeskeygenassist | M::Shufps | M::Shufpd | M::Unpcklps | M::Unpckhps
            | M::Unpcklpd | M::Unpckhpd | M::Movhlps | M::Movlhps | M::Pblendw
            | M::Pcmpistri | M::Pcmpestri | M::Pcmpistrm | M::Pcmpestrm
            | M::Movhps | M::Movlps | M::Movhpd | M::Movlpd | M::Movddup | M::Movsldup | M::Movshdup | M::Lddqu
            | M::Movmskps | M::Movmskpd | M::Pmovzxbw | M::Pmovzxbd | M::Pmovzxbq | M::Pmovzxwd | M::Pmovzxwq
            | M::Pmovzxdq | M::Pmovsxbw | M::Pmovsxbd | M::Pmovsxbq | M::Pmovsxwd | M::Pmovsxwq | M::Pmovsxdq
            | M::Pminuw | M::Pmaxuw | M::Pminsb | M::Pmaxsb | M::Pcmpgtq | M::Blendps | M::Blendpd
            | M::Blendvps | M::Blendvpd | M::Pblendvb | M::Insertps | M::Extractps
    )
}

fn has_memory_operand(insn: &Instruction) -> bool {
    (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory)
}

/// An instruction whose memory operand must be aligned to its size (#GP
/// otherwise): 16-byte operands of legacy SSE but the unaligned moves and
/// the string compares, and `cmpxchg16b`; of VEX forms, the aligned moves.
fn needs_alignment(insn: &Instruction) -> bool {
    use Mnemonic as M;
    let size = insn.memory_size().size();
    if insn.encoding() == iced_x86::EncodingKind::VEX {
        return matches!(insn.mnemonic(), M::Vmovdqa | M::Vmovaps | M::Vmovapd) && matches!(size, 16 | 32);
    }
    size == 16 && !matches!(insn.mnemonic(), M::Movdqu | M::Movups | M::Movupd | M::Lddqu | M::Pcmpistri | M::Pcmpestri | M::Pcmpistrm | M::Pcmpestrm)
}

/// A division's memory operand can be read inline: a general-register
/// sized operand through a segment the CCF may use.
fn mem_operand_ok(insn: &Instruction, mode: Mode) -> bool {
    matches!(insn.memory_size().size(), 1 | 2 | 4 | 8) && mode.seg_usable_mask & (1 << seg_index(insn.memory_segment())) != 0
}

/// CPUID features of integer instructions, which run natively in a CCF.
fn integer_feature(f: iced_x86::CpuidFeature) -> bool {
    use iced_x86::CpuidFeature as F;
    matches!(
        f,
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64 | F::CMOV | F::CX8
            | F::CMPXCHG16B | F::POPCNT | F::LZCNT | F::BMI1 | F::BMI2 | F::MOVBE | F::ADX | F::MULTIBYTENOP | F::PAUSE
            | F::RDRAND | F::RDSEED | F::CLFSH | F::CLFLUSHOPT | F::PREFETCHW
    )
}

/// rep stos and rep movs (F3), with the natural address size and usable
/// segments.
fn plan_rep_string(insn: &Instruction, mode: Mode) -> bool {
    use Mnemonic as M;
    let si = if mode.bits == 64 { OpKind::MemorySegRSI } else { OpKind::MemorySegESI };
    let di = if mode.bits == 64 { OpKind::MemoryESRDI } else { OpKind::MemoryESEDI };
    let usable = |segment: usize| mode.seg_usable_mask & (1 << segment) != 0;
    let operands_ok = match insn.mnemonic() {
        M::Stosb | M::Stosw | M::Stosd | M::Stosq => insn.op0_kind() == di,
        M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
            insn.op0_kind() == di && insn.op1_kind() == si && usable(seg_index(insn.memory_segment()))
        }
        _ => false,
    };
    operands_ok && insn.has_rep_prefix() && usable(seg::ES)
}

/// repe/repne cmps and scas (one of the two prefixes) with the natural
/// address size, through usable segments.
fn plan_rep_compare(insn: &Instruction, mode: Mode) -> bool {
    use Mnemonic as M;
    let si = if mode.bits == 64 { OpKind::MemorySegRSI } else { OpKind::MemorySegESI };
    let di = if mode.bits == 64 { OpKind::MemoryESRDI } else { OpKind::MemoryESEDI };
    let usable = |segment: usize| mode.seg_usable_mask & (1 << segment) != 0;
    let operands_ok = match insn.mnemonic() {
        M::Scasb | M::Scasw | M::Scasd | M::Scasq => insn.op1_kind() == di,
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
            insn.op0_kind() == si && insn.op1_kind() == di && usable(seg_index(insn.memory_segment()))
        }
        _ => false,
    };
    operands_ok && insn.has_rep_prefix() != insn.has_repne_prefix() && usable(seg::ES)
}

/// lods and stos without rep, with the natural address size, through a
/// usable segment.
fn plan_string_one(insn: &Instruction, mode: Mode) -> bool {
    use Mnemonic as M;
    let si = if mode.bits == 64 { OpKind::MemorySegRSI } else { OpKind::MemorySegESI };
    let di = if mode.bits == 64 { OpKind::MemoryESRDI } else { OpKind::MemoryESEDI };
    let usable = |segment: Register| mode.seg_usable_mask & (1 << seg_index(segment)) != 0;
    // The operands each form has at the natural address size (movsd and
    // cmpsd with register operands are SSE2's), and the segments it uses.
    let (operands_ok, segments_ok) = match insn.mnemonic() {
        M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => (insn.op1_kind() == si, usable(insn.memory_segment())),
        M::Stosb | M::Stosw | M::Stosd | M::Stosq => (insn.op0_kind() == di, usable(Register::ES)),
        M::Scasb | M::Scasw | M::Scasd | M::Scasq => (insn.op1_kind() == di, usable(Register::ES)),
        M::Movsb | M::Movsw | M::Movsd | M::Movsq => {
            (insn.op0_kind() == di && insn.op1_kind() == si, usable(Register::ES) && usable(insn.memory_segment()))
        }
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => {
            (insn.op0_kind() == si && insn.op1_kind() == di, usable(Register::ES) && usable(insn.memory_segment()))
        }
        _ => return false,
    };
    operands_ok && segments_ok && !insn.has_rep_prefix() && !insn.has_repne_prefix()
}

/// Sensitive instructions done inline over the virtual state.
fn plan_virtual(insn: &Instruction, mode: Mode) -> Option<VirtualOp> {
    // A register destination other than RSP; a memory one through a usable segment.
    let dest_ok = insn.op_count() == 0
        || match insn.op0_kind() {
            OpKind::Register => gpr_number(insn.op0_register()).is_some_and(|n| n != RSP),
            OpKind::Memory => mode.seg_usable_mask & (1 << seg_index(insn.memory_segment())) != 0,
            _ => false,
        };
    let op = match insn.mnemonic() {
        Mnemonic::Cli if mode.cpl0 => VirtualOp::Cli,
        Mnemonic::Sti if mode.cpl0 => VirtualOp::Sti,
        Mnemonic::Cld => VirtualOp::SetDf(0),
        Mnemonic::Std => VirtualOp::SetDf(1),
        Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Pushfq => {
            let stack_ok = (mode.stack_bits == 32 || mode.stack_bits == 64) && mode.seg_usable_mask & (1 << seg::SS) != 0;
            if !stack_ok {
                return None;
            }
            VirtualOp::Pushf
        }
        Mnemonic::Smsw if mode.cpl0 => VirtualOp::Read(SysReg::Cr0),
        Mnemonic::Sldt if mode.cpl0 => VirtualOp::Read(SysReg::Ldtr),
        Mnemonic::Str if mode.cpl0 => VirtualOp::Read(SysReg::Tr),
        // The 10-byte image of 64-bit mode only (compatibility mode differs).
        Mnemonic::Sgdt if mode.cpl0 && mode.bits == 64 => VirtualOp::Read(SysReg::Gdtr),
        Mnemonic::Sidt if mode.cpl0 && mode.bits == 64 => VirtualOp::Read(SysReg::Idtr),
        // mov r/m, sreg reads a selector at any privilege.
        Mnemonic::Mov if insn.op_count() == 2 && insn.op1_kind() == OpKind::Register && insn.op1_register().is_segment_register() => {
            VirtualOp::Read(SysReg::Seg(seg_index(insn.op1_register()) as u8))
        }
        _ => return None,
    };
    dest_ok.then_some(op)
}

/// Stack instructions the translator does itself, through SS.
fn plan_stack(insn: &Instruction, mode: Mode) -> Option<Plan> {
    let stack_ok = (mode.stack_bits == 32 || mode.stack_bits == 64) && mode.seg_usable_mask & (1 << seg::SS) != 0;
    // Pushes and pops of the natural stack width (or 16 bits).
    let width = (-insn.stack_pointer_increment()) as u32;
    let natural = if mode.bits == 64 { 8 } else { 4 };
    let rsp_reg = |r: Register| gpr_number(r) == Some(RSP);
    let plan = match insn.mnemonic() {
        Mnemonic::Push if matches!(width, 2 | 4 | 8) => match insn.op0_kind() {
            OpKind::Register if !rsp_reg(insn.op0_register()) && insn.op0_register().is_gpr() => Plan::Push,
            OpKind::Register if insn.op0_register().is_segment_register() => Plan::PushSeg,
            // push rsp pushes RSP from before the push.
            OpKind::Register if rsp_reg(insn.op0_register()) && width == natural => Plan::Push,
            OpKind::Memory if width == natural && insn.memory_size().size() == natural as usize && mem_operand_ok(insn, mode) => {
                Plan::Push
            }
            OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate32to64 => Plan::Push,
            _ => return None,
        },
        Mnemonic::Pop if insn.op0_kind() == OpKind::Register => {
            let r = insn.op0_register();
            if rsp_reg(r) || !r.is_gpr() {
                return None;
            }
            Plan::Pop
        }
        Mnemonic::Leave if insn.code() == Code::Leavew || mode.stack_bits != mode.bits => return None,
        Mnemonic::Leave => Plan::Leave,
        Mnemonic::Call if insn.is_call_near() && width == natural => Plan::Call(insn.near_branch_target()),
        Mnemonic::Call
            if insn.is_call_near_indirect()
                && insn.op0_kind() == OpKind::Register
                && !rsp_reg(insn.op0_register())
                && width == natural =>
        {
            Plan::IndirectReg
        }
        Mnemonic::Jmp if insn.is_jmp_near_indirect() && insn.op0_kind() == OpKind::Register => {
            let r = insn.op0_register();
            return Some(Plan::IndirectReg).filter(|_| r.size() as u32 * 8 == mode.bits && !rsp_reg(r));
        }
        // Through memory: the target is read as a MEM access would read it.
        Mnemonic::Call | Mnemonic::Jmp
            if (insn.is_call_near_indirect() || insn.is_jmp_near_indirect())
                && insn.op0_kind() == OpKind::Memory
                && insn.memory_size().size() == natural as usize
                && mem_operand_ok(insn, mode) =>
        {
            if insn.mnemonic() == Mnemonic::Jmp {
                return Some(Plan::IndirectMem);
            }
            Plan::IndirectMem
        }
        Mnemonic::Ret if !matches!(insn.code(), Code::Retnw | Code::Retnw_imm16) => Plan::Ret,
        _ => return None,
    };
    if !stack_ok {
        return Some(Plan::Stop);
    }
    Some(plan)
}

/// `lea` computes an address without touching memory; RIP-relative forms
/// become immediates, which only 64-bit code has.
fn lea_is_plain(insn: &Instruction, mode: Mode) -> bool {
    mode.bits == 64 || !matches!(insn.memory_base(), Register::EIP | Register::RIP)
}


/// Shifts and rotates by CL (or by an immediate that masks to 0) leave the
/// flags alone when the masked count is 0, so they do not end the life of
/// the flags before them.
fn flags_written_conditionally(insn: &Instruction) -> bool {
    let shift = matches!(
        insn.mnemonic(),
        Mnemonic::Shl | Mnemonic::Sal | Mnemonic::Shr | Mnemonic::Sar | Mnemonic::Rol | Mnemonic::Ror | Mnemonic::Rcl
            | Mnemonic::Rcr | Mnemonic::Shld | Mnemonic::Shrd
    );
    if !shift {
        return false;
    }
    let count = insn.op_count() - 1;
    match insn.op_kind(count) {
        OpKind::Register => true,
        OpKind::Immediate8 => {
            let mask = if insn.op0_kind() == OpKind::Register && insn.op0_register().size() == 8
                || insn.op0_kind() == OpKind::Memory && insn.memory_size().size() == 8
            {
                0x3f
            } else {
                0x1f
            };
            insn.immediate8() & mask == 0
        }
        _ => false,
    }
}

/// The arithmetic flags each instruction needs from before it: read by it,
/// or live after it and not written by it. Everything is live after the TU,
/// and before any instruction that may fault (a memory access, a division):
/// the exception frame shows the guest the flags as they were.
fn live_flags(tu: &[(Instruction, Plan)]) -> Vec<u32> {
    let mut need = vec![0; tu.len()];
    let mut after = ARITH_FLAGS;
    for (k, (insn, plan)) in tu.iter().enumerate().rev() {
        let before = if *plan == Plan::Stop {
            ARITH_FLAGS
        } else {
            let written = if flags_written_conditionally(insn) {
                0
            } else {
                insn.rflags_written() | insn.rflags_cleared() | insn.rflags_set() | insn.rflags_undefined()
            };
            (after & !written) | insn.rflags_read()
        } & ARITH_FLAGS;
        need[k] = before;
        let may_fault = !matches!(plan, Plan::Nothing | Plan::Ident | Plan::Jump(_) | Plan::Branch(..) | Plan::CountBranch(_));
        after = if may_fault { ARITH_FLAGS } else { before };
    }
    need
}

/// An instruction could not be encoded for the host (a register the
/// rewrite needs cannot be combined with the instruction's own).
#[derive(Debug)]
struct Unencodable;

struct Emitter {
    a: VecAssembler<X64Relocation>,
    /// The TU's id, which its exit stubs report (`BtBlock::exit_site`).
    id: u32,
    mode: Mode,
    exits: Vec<ExitSite>,
    /// Out-of-line TLB-miss paths, emitted after the main line.
    misses: Vec<Miss>,
    /// The probes' looks into the second way, emitted after the TU.
    second_ways: Vec<SecondWay>,
    /// The scratch registers a memory access left borrowed for the next
    /// one (register k's guest value in scratch slot k): consecutive
    /// accesses through the same pair spill it once. Released before
    /// anything else that names them, uses the slots, or leaves the CCF.
    borrowed: Vec<u8>,
    /// RCX's guest value is put aside (`save_rcx`: a probe borrowed it and the
    /// instructions since have not named it): the next probe need not save it.
    rcx_borrowed: bool,
    /// Where `save_rcx` puts RCX's guest value still holds it: stored (or
    /// loaded from there) since the last guest instruction that wrote RCX.
    /// A second store was not only redundant: in a loop it chained every
    /// iteration to the last through the store's forwarding latency.
    rcx_home: bool,
    /// An SSE instruction earlier in the TU had the guest's SSE state loaded.
    fpu_loaded: bool,
    /// The scratch registers of a loop TU (`LoopPlan`): every memory access
    /// borrows these, spilled once at the entry.
    loop_pair: Option<[u8; 2]>,
    /// The register holding the guest's RCX in a loop TU that renamed it
    /// (`LoopPlan::rcx_in`; its own guest value in scratch slot 2).
    rcx_in: Option<u8>,
    counts: Counts,
}

/// A probe's out-of-line look into the second way of its table entry's
/// set: `at` is jumped to on a first-way miss (the entry in `s1`, as a
/// pointer or, for a table GS reaches, as an index; the address in `s0`);
/// it jumps back to `hit` with `s1` at the second way's entry, or on to
/// `miss`.
struct SecondWay {
    at: DynamicLabel,
    hit: DynamicLabel,
    miss: DynamicLabel,
    s0: u8,
    s1: u8,
    size: i32,
    /// Which table (see `Emitter::entry`).
    write: bool,
}

/// How a probe reaches its soft-TLB entry (`Emitter::entry`). With `Gs`
/// and `Reg`, the probe's second scratch register holds the entry's index,
/// and every field is read in one addressing mode: through GS at the
/// table's offset from the block (64-bit code, `Mode::tlb_tables`), or
/// from the table's address in a register (32-bit code, `tlb::R32_*`).
/// With `Ptr` (64-bit code whose tables lie beyond GS's reach), the table's
/// address is read from the block at this offset and the register points
/// at the entry.
#[derive(Clone, Copy)]
enum Entry {
    Gs(i32),
    Reg(u8),
    Ptr(i32),
}

struct Miss {
    label: DynamicLabel,
    rip: u64,
    scratch: Vec<u8>,
    /// The guest flags were put aside in the block (`save_flags`: pushf's
    /// image, a rep string operation) and clobbered since: restore them.
    flags_saved: bool,
}

fn scratch_off(slot: usize) -> i32 {
    (BtBlock::OFF_SCRATCH + slot * 8) as i32
}

/// What a memory access does with its host address.
#[derive(Clone, Copy, PartialEq, Eq)]
enum MemBody {
    /// The guest instruction itself, on the host address.
    Original,
    /// Reads the operand (a division's divisor, a pushed value) into
    /// `VALUE_SLOT`.
    Value,
    /// Reads an indirect branch's target into the block's RIP.
    Target,
    /// As `Original`, for an operand that must be 16-byte aligned: a
    /// misaligned one leaves the instruction to the runtime (#GP).
    Aligned,
}

/// The block slot a division by memory takes its divisor from, and a push
/// of memory its value.
const VALUE_SLOT: usize = BtBlock::SLOT_VALUE;

impl Emitter {
    /// What exit stub number `index` of this TU reports (`BtBlock::exit_site`).
    fn site(&self, index: usize) -> u32 {
        (self.id << 8) | (index as u32 & 0xff)
    }

    fn exit(&mut self, rip: u64, reason: ExitReason) {
        let offset = self.a.offset().0;
        let site = self.site(self.exits.len());
        self.bytes(&exit_stub(rip, reason, site));
        self.exits.push(ExitSite { offset, rip, reason, chain_to: None, branch: None });
    }

    /// The code of a Next exit to `rip`, as exit number `index` would emit
    /// it: a stub the runtime chains into a plain jump to the target's TU,
    /// loops included (a kick unchains it when the dispatcher wants control
    /// back: runtime `bt::kick`). A jump into another page is unchained
    /// again when that page's mapping may change (runtime
    /// `Bt::check_cross_chains`).
    fn next_exit_code(&self, rip: u64, index: usize) -> [u8; EXIT_STUB_LEN] {
        exit_stub(rip, ExitReason::Next, self.site(index))
    }

    /// The conditional branch that ends a loop TU (`LoopPlan`): taken, it
    /// jumps straight back past the entry's spills (a kick retargets it
    /// onto a stub that gives the registers back and leaves for `target`,
    /// the TU's own RIP); not taken, the registers go back and the TU
    /// leaves for the next instruction. RCX is given back before the branch
    /// unless the loop keeps it borrowed throughout (`keep_rcx`).
    fn loop_back(&mut self, insn: &Instruction, cc: ConditionCode, target: u64, loop_head: usize, keep_rcx: bool) {
        if !keep_rcx {
            // RCX's home holds its guest value at the loop's head, as at
            // the first pass: stored again only if an instruction wrote RCX.
            self.release_rcx();
            self.save_rcx();
        }
        let pair = std::mem::take(&mut self.borrowed);
        let give_back = |e: &Emitter| -> Vec<u8> {
            let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
            match e.rcx_in {
                Some(x) => dynasm!(a ; .arch x64 ; mov rcx, Rq(x) ; gs mov Rq(x), QWORD [scratch_off(2)]),
                None if keep_rcx => dynasm!(a ; .arch x64 ; gs mov rcx, QWORD [BtBlock::off_gpr(1) as i32]),
                None => {}
            }
            for (slot, &r) in pair.iter().enumerate() {
                if e.holds_guest(r) {
                    dynasm!(a ; .arch x64 ; gs mov Rq(r), QWORD [scratch_off(slot)]);
                }
            }
            a.finalize().unwrap_or_default()
        };
        let back = give_back(self);
        let next = mask_rip(insn.next_ip(), self.mode);
        // The back edge: jcc rel32 to the loop's head, chained from the
        // start; unchained (by a kick) it lands on the stub behind the
        // registers' return and the fall-through exit.
        let cc = cc as u8 - ConditionCode::o as u8;
        self.bytes(&[0x0f, 0x80 + cc]);
        let branch = self.a.offset().0;
        self.bytes(&((loop_head as i64 - (branch as i64 + 4)) as i32).to_le_bytes());
        self.bytes(&back);
        self.exit_next(next);
        let offset = self.a.offset().0;
        let site = self.site(self.exits.len());
        self.bytes(&UNCHAINED_JUMP);
        self.bytes(&back);
        self.bytes(&exit_stub(target, ExitReason::Next, site));
        self.exits.push(ExitSite { offset, rip: target, reason: ExitReason::Next, chain_to: Some(loop_head), branch: Some(branch) });
        self.rcx_borrowed = false;
    }

    /// A Next exit to `rip` (see `next_exit_code`).
    fn exit_next(&mut self, rip: u64) {
        let code = self.next_exit_code(rip, self.exits.len());
        let offset = self.a.offset().0;
        self.bytes(&code);
        self.exits.push(ExitSite { offset, rip, reason: ExitReason::Next, chain_to: None, branch: None });
    }

    /// Looks the guest RIP in register `t` up in the IBTC (using `tmp`,
    /// clobbering the flags): on a hit, the CCF entry is in gs:[target];
    /// on a miss, jumps to the returned label. Either way `t` is clobbered
    /// (it holds the tag: `Mode::ibtc_tag`), and the block's RIP, stored
    /// before, is the target.
    fn ibtc_lookup(&mut self, t: u8, tmp: u8) -> DynamicLabel {
        let miss = self.a.new_dynamic_label();
        let found = self.a.new_dynamic_label();
        let table = BtBlock::off_ibtc(self.mode.cpl0) as i32;
        // `ibtc_index` in bytes: the set's number times the set's size.
        let set_shift = (16 * IBTC_WAYS).trailing_zeros() as i8;
        dynasm!(self.a
            ; .arch x64
            // An indirect transfer counts against the chain budget.
            ; gs sub DWORD [BtBlock::OFF_BUDGET as i32], 1
            ; jc =>miss
        );
        let tag = self.mode.ibtc_tag();
        if tag != 0 {
            // The mode's bits above the 32-bit target (`Mode::ibtc_tag`).
            dynasm!(self.a ; .arch x64 ; ror Rq(t), 32 ; or Rq(t), (tag >> 32) as i32 ; ror Rq(t), 32);
        }
        dynasm!(self.a
            ; .arch x64
            ; imul Rd(tmp), Rd(t), IBTC_HASH as i32
            ; shr Rd(tmp), 32 - IBTC_SET_BITS as i8
            ; shl Rd(tmp), set_shift
            // Either way of the set.
            ; gs cmp Rq(t), QWORD [Rq(tmp) + table]
            ; je =>found
            ; add Rd(tmp), 16
            ; gs cmp Rq(t), QWORD [Rq(tmp) + table]
            ; jne =>miss
            ; =>found
            ; gs mov Rq(t), QWORD [Rq(tmp) + table + 8]
            ; gs mov QWORD [BtBlock::OFF_TARGET as i32], Rq(t)
        );
        miss
    }

    fn bytes(&mut self, b: &[u8]) {
        self.a.extend(b.iter().copied());
    }

    fn encode(&mut self, insn: &Instruction) -> Result<(), Unencodable> {
        let mut enc = Encoder::new(64);
        enc.encode(insn, 0).map_err(|_| Unencodable)?;
        let b = enc.take_buffer();
        self.bytes(&b);
        Ok(())
    }

    /// Saves the guest's flags before code that clobbers them (the IBTC
    /// lookup, pushf's image). The soft-TLB probe needs none of this.
    fn save_flags(&mut self) {
        save_flags(&mut self.a);
    }

    /// The saved flags back, if they are live.
    fn restore_flags(&mut self, live: u32) {
        if live != 0 {
            restore_flags(&mut self.a);
        }
    }

    /// The host register guest RSP lives in, in 32-bit code
    /// ([`tlb::R32_RSP`]); 64-bit code keeps it in the block.
    fn resident_rsp(&self) -> Option<u8> {
        (self.mode.bits == 32).then_some(tlb::R32_RSP)
    }

    /// Keeps guest RSP from before an indirect branch in the block's
    /// `SLOT_OLD_RSP` (through `tmp` where it lives in the block).
    fn save_old_rsp(&mut self, tmp: u8) {
        match self.resident_rsp() {
            Some(r) => dynasm!(self.a ; .arch x64 ; gs mov QWORD [scratch_off(BtBlock::SLOT_OLD_RSP)], Rq(r)),
            None => dynasm!(self.a
                ; .arch x64
                ; gs mov Rq(tmp), QWORD [BtBlock::off_gpr(4) as i32]
                ; gs mov QWORD [scratch_off(BtBlock::SLOT_OLD_RSP)], Rq(tmp)
            ),
        }
    }

    /// Whether host register `r` holds a guest value a scratch borrowing
    /// must keep: R8..R15 do not in 32-bit code (the dispatcher takes only
    /// the low eight back from it, and guest ESP in R9, which
    /// `pick_scratch` never hands out there).
    fn holds_guest(&self, r: u8) -> bool {
        self.mode.bits == 64 || r < 8
    }

    fn spill(&mut self, scratch: &[u8]) {
        for (slot, &r) in scratch.iter().enumerate() {
            if self.holds_guest(r) {
                dynasm!(self.a ; .arch x64 ; gs mov QWORD [scratch_off(slot)], Rq(r));
            }
        }
    }

    fn unspill(&mut self, scratch: &[u8]) {
        for (slot, &r) in scratch.iter().enumerate() {
            if self.holds_guest(r) {
                dynasm!(self.a ; .arch x64 ; gs mov Rq(r), QWORD [scratch_off(slot)]);
            }
        }
    }

    /// Gives the borrowed scratch registers back (see `borrowed`).
    fn release(&mut self) {
        let borrowed = std::mem::take(&mut self.borrowed);
        self.unspill(&borrowed);
        self.release_rcx();
    }

    /// Gives RCX back if a probe left it borrowed.
    fn release_rcx(&mut self) {
        if std::mem::take(&mut self.rcx_borrowed) {
            self.load_rcx();
        }
    }

    /// Puts RCX's guest value aside while a probe borrows RCX: in R15 in
    /// 32-bit code (no guest register there, and never a scratch
    /// register), in its home slot in the block otherwise.
    /// Nothing is stored if the place still holds it (`rcx_home`).
    fn save_rcx(&mut self) {
        if std::mem::replace(&mut self.rcx_home, true) {
            return;
        }
        if self.mode.bits == 32 {
            dynasm!(self.a ; .arch x64 ; mov r15, rcx);
        } else {
            dynasm!(self.a ; .arch x64 ; gs mov QWORD [BtBlock::off_gpr(1) as i32], rcx);
        }
    }

    /// Takes RCX's guest value back from where `save_rcx` put it.
    fn load_rcx(&mut self) {
        if self.mode.bits == 32 {
            dynasm!(self.a ; .arch x64 ; mov rcx, r15);
        } else {
            dynasm!(self.a ; .arch x64 ; gs mov rcx, QWORD [BtBlock::off_gpr(1) as i32]);
        }
    }



    /// Restores one spilled scratch register.
    fn unspill_one(&mut self, r: u8, slot: usize) {
        if self.holds_guest(r) {
            dynasm!(self.a ; .arch x64 ; gs mov Rq(r), QWORD [scratch_off(slot)]);
        }
    }

    /// IDENT: the instruction itself; guest RSP, if it names it, as its
    /// host register in 32-bit code, or through a scratch register loaded
    /// from and stored back to the block in 64-bit code.
    fn ident(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let uses_rsp = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && gpr_number(insn.op_register(i)) == Some(RSP))
            || (insn.op0_kind() == OpKind::Memory || insn.op1_kind() == OpKind::Memory)
                && (gpr_number(insn.memory_base()) == Some(RSP) || gpr_number(insn.memory_index()) == Some(RSP));
        let rip_relative = matches!(insn.memory_base(), Register::RIP | Register::EIP);
        if insn.mnemonic() == Mnemonic::Lea && rip_relative {
            // lea r, [rip+d]: the address is a constant.
            let dst = insn.op0_register();
            let n = gpr_number(dst).ok_or(Unencodable)?;
            let value = insn.memory_displacement64();
            let value = if dst.size() == 4 { value & 0xffff_ffff } else { value };
            match dst.size() {
                4 if n == RSP && self.resident_rsp().is_some() => dynasm!(self.a ; .arch x64 ; mov Rd(tlb::R32_RSP), value as u32 as i32),
                // Guest RSP lives in the block, never in host RSP.
                4 | 8 if n == RSP => dynasm!(self.a
                    ; .arch x64
                    ; gs mov DWORD [BtBlock::off_gpr(4) as i32], value as u32 as i32
                    ; gs mov DWORD [BtBlock::off_gpr(4) as i32 + 4], (value >> 32) as u32 as i32
                ),
                8 => dynasm!(self.a ; .arch x64 ; mov Rq(n), QWORD value as i64),
                4 => dynasm!(self.a ; .arch x64 ; mov Rd(n), value as u32 as i32),
                _ => return Err(Unencodable),
            }
            return Ok(());
        }
        if !uses_rsp {
            if self.mode.bits == 64 {
                let mut enc = Encoder::new(64);
                enc.encode(insn, insn.ip()).map_err(|_| Unencodable)?;
                let b = enc.take_buffer();
                self.bytes(&b);
                return Ok(());
            }
            return self.encode(insn);
        }
        if let Some(r) = self.resident_rsp() {
            let mut copy = *insn;
            substitute_rsp(&mut copy, r);
            return self.encode(&copy);
        }
        let scratch = pick_scratch(insn, info, 1, self.mode.bits);
        let s = scratch[0];
        let mut copy = *insn;
        substitute_rsp(&mut copy, s);
        self.spill(&scratch);
        dynasm!(self.a ; .arch x64 ; gs mov Rq(s), QWORD [BtBlock::off_gpr(4) as i32]);
        self.encode(&copy)?;
        if writes_rsp(insn, info) {
            dynasm!(self.a ; .arch x64 ; gs mov QWORD [BtBlock::off_gpr(4) as i32], Rq(s));
        }
        self.unspill(&scratch);
        Ok(())
    }

    /// MEM: address, inline soft-TLB probe, then the instruction on the host address.
    fn mem(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        // `cmpxchg16b` wants its operand 16-byte aligned (#GP otherwise).
        self.mem_with(insn, info, if needs_alignment(insn) { MemBody::Aligned } else { MemBody::Original })
    }

    /// An SSE instruction (`Plan::Sse`): the guest's SSE state into the
    /// host's registers first (once per TU), then the instruction as IDENT
    /// or MEM.
    fn sse(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        if !self.fpu_loaded {
            dynasm!(self.a ; .arch x64 ; gs call QWORD [BtBlock::OFF_FPU_ENTER as i32]);
            self.fpu_loaded = true;
        }
        if !has_memory_operand(insn) {
            return self.ident(insn, info);
        }
        self.mem_with(insn, info, if needs_alignment(insn) { MemBody::Aligned } else { MemBody::Original })
    }

    /// A division by memory (`Plan::DivideMem`): the divisor is read into
    /// its block slot as MEM would read it, every borrowed register goes
    /// back, and the division runs on the slot.
    fn divide_mem(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let mut on_slot = *insn;
        on_slot.set_memory_base(Register::None);
        on_slot.set_memory_index(Register::None);
        on_slot.set_memory_index_scale(1);
        on_slot.set_memory_displacement64(scratch_off(VALUE_SLOT) as u64);
        on_slot.set_memory_displ_size(4);
        on_slot.set_segment_prefix(Register::GS);
        // Encodable, or nothing is emitted.
        Encoder::new(64).encode(&on_slot, 0).map_err(|_| Unencodable)?;
        self.mem_with(insn, info, MemBody::Value)?;
        self.release();
        self.divide(insn, &on_slot)
    }

    /// `div` as `body` (the guest's, or on the divisor slot), its guest RIP
    /// stored first for the host fault's exit.
    fn divide(&mut self, insn: &Instruction, body: &Instruction) -> Result<(), Unencodable> {
        let at = insn.ip();
        dynasm!(self.a
            ; .arch x64
            ; gs mov DWORD [BtBlock::OFF_FAULT_RIP as i32], at as u32 as i32
            ; gs mov DWORD [BtBlock::OFF_FAULT_RIP as i32 + 4], (at >> 32) as u32 as i32
        );
        self.encode(body)
    }

    /// A memory access of `insn`'s operand, doing `then` at the host address.
    fn mem_with(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory, then: MemBody) -> Result<(), Unencodable> {
        let access = info.info(insn).used_memory()[0].access();
        let original = matches!(then, MemBody::Original | MemBody::Aligned);
        let write = original && !matches!(access, OpAccess::Read | OpAccess::CondRead);
        let size = insn.memory_size().size() as i32;
        let uses_rsp = gpr_number(insn.memory_base()) == Some(RSP)
            || gpr_number(insn.memory_index()) == Some(RSP)
            || (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && gpr_number(insn.op_register(i)) == Some(RSP));
        // RSP through a third scratch register where it lives in the block.
        let resident = self.resident_rsp();
        let rsp_scratch = uses_rsp && resident.is_none();
        let scratch = match self.loop_pair {
            Some(pair) => pair.to_vec(),
            None => pick_scratch(insn, info, if rsp_scratch { 3 } else { 2 }, self.mode.bits),
        };
        let (s0, s1) = (scratch[0], scratch[1]);
        let s_rsp = uses_rsp.then(|| resident.unwrap_or_else(|| scratch[2]));
        // The rewritten instruction first: if it cannot be encoded, nothing
        // has been emitted yet.
        let mut body = *insn;
        if let Some(r) = s_rsp {
            substitute_rsp(&mut body, r);
        }
        // The moffs forms of mov have no ModRM to name a base register.
        let modrm = match body.code() {
            Code::Mov_AL_moffs8 => Some(Code::Mov_r8_rm8),
            Code::Mov_AX_moffs16 => Some(Code::Mov_r16_rm16),
            Code::Mov_EAX_moffs32 => Some(Code::Mov_r32_rm32),
            Code::Mov_RAX_moffs64 => Some(Code::Mov_r64_rm64),
            Code::Mov_moffs8_AL => Some(Code::Mov_rm8_r8),
            Code::Mov_moffs16_AX => Some(Code::Mov_rm16_r16),
            Code::Mov_moffs32_EAX => Some(Code::Mov_rm32_r32),
            Code::Mov_moffs64_RAX => Some(Code::Mov_rm64_r64),
            _ => None,
        };
        if let Some(code) = modrm {
            body.set_code(code);
        }
        on_host_address(&mut body, s0);
        // The host address is s0 + s1 after the probe (the addend in s1),
        // which the rewritten instruction takes as base and index; an
        // encoding without an index takes it folded into s0.
        let (body_bytes, fold) = if original {
            let encode_body = |index: Register| -> Result<Vec<u8>, Unencodable> {
                let mut b = body;
                b.set_memory_index(index);
                b.set_memory_index_scale(1);
                let mut enc = Encoder::new(64);
                enc.encode(&b, 0).map_err(|_| Unencodable)?;
                Ok(enc.take_buffer())
            };
            match encode_body(GPR64[s1 as usize]) {
                Ok(b) => (b, false),
                Err(_) => (encode_body(Register::None)?, true),
            }
        } else {
            let slot = if then == MemBody::Value { scratch_off(VALUE_SLOT) } else { BtBlock::OFF_RIP as i32 };
            let mut a: VecAssembler<X64Relocation> = VecAssembler::new(0);
            match size {
                1 => dynasm!(a ; .arch x64 ; movzx Rd(s1), BYTE [Rq(s0) + Rq(s1)]),
                2 => dynasm!(a ; .arch x64 ; movzx Rd(s1), WORD [Rq(s0) + Rq(s1)]),
                4 => dynasm!(a ; .arch x64 ; mov Rd(s1), DWORD [Rq(s0) + Rq(s1)]),
                _ => dynasm!(a ; .arch x64 ; mov Rq(s1), QWORD [Rq(s0) + Rq(s1)]),
            }
            dynasm!(a ; .arch x64 ; gs mov QWORD [slot], Rq(s1));
            (a.finalize().map_err(|_| Unencodable)?, false)
        };

        // s0 and s1 stay borrowed after the instruction, for the next one,
        // and RCX too if the instruction does not name it.
        let uses_rcx = info.info(insn).used_registers().iter().any(|u| gpr_number(u.register()) == Some(1));
        if uses_rcx {
            self.release_rcx();
        }
        if self.borrowed[..] != scratch[..2] {
            self.release();
            self.spill(&scratch[..2]);
            self.borrowed = scratch[..2].to_vec();
        }
        if let Some(r) = s_rsp.filter(|_| rsp_scratch) {
            if self.holds_guest(r) {
                dynasm!(self.a ; .arch x64 ; gs mov QWORD [scratch_off(2)], Rq(r));
            }
            dynasm!(self.a ; .arch x64 ; gs mov Rq(r), QWORD [BtBlock::off_gpr(4) as i32]);
        }
        self.address(insn, s0, s_rsp)?;
        self.add_segment_base(s0, s1, seg_index(insn.memory_segment()));
        if then == MemBody::Aligned {
            // The linear address's low bits are the host address's: flag-free
            // through RCX, as the probe borrows it.
            let mask = if insn.memory_size().size() == 32 { BtBlock::OFF_ALIGN32_MASK } else { BtBlock::OFF_ALIGN16_MASK };
            let misaligned = self.a.new_dynamic_label();
            let aligned = self.a.new_dynamic_label();
            if !self.rcx_borrowed {
                self.save_rcx();
                self.rcx_borrowed = true;
            }
            dynasm!(self.a
                ; .arch x64
                ; gs pext rcx, Rq(s0), QWORD [mask as i32]
                ; jrcxz =>aligned
                ; jmp =>misaligned
                ; =>aligned
            );
            self.misses.push(Miss { label: misaligned, rip: insn.ip(), scratch: scratch.clone(), flags_saved: false });
        }
        let miss = self.probe(s0, s1, size, write, !uses_rcx, fold);
        self.bytes(&body_bytes);
        if let Some(r) = s_rsp.filter(|_| rsp_scratch) {
            if writes_rsp(insn, info) {
                dynasm!(self.a ; .arch x64 ; gs mov QWORD [BtBlock::off_gpr(4) as i32], Rq(r));
            }
            self.unspill_one(r, 2);
        }
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
        Ok(())
    }

    /// bt/bts/btr/btc of memory with a register bit offset (`Plan::BitMem`),
    /// as the interpreter computes it: the offset, sign-extended from the
    /// operand size, moves the address by whole operands (offset >> 3,
    /// rounded down to the operand size) and selects a bit of the operand
    /// there (offset mod its bits). The arithmetic clobbers the flags, so
    /// they are put aside around it; the probe and the host's instruction
    /// (on the host address, with the reduced offset, which moves nothing)
    /// then run on the guest's flags.
    fn bit_mem(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let size = insn.memory_size().size() as i32;
        let write = insn.mnemonic() != Mnemonic::Bt;
        let off = insn.op1_register();
        let n = gpr_number(off).ok_or(Unencodable)?;
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let (s0, s1, s2) = (scratch[0], scratch[1], scratch[2]);
        // The rewritten instruction first: if it cannot be encoded, nothing
        // has been emitted yet.
        let mut body = *insn;
        on_host_address(&mut body, s0);
        body.set_memory_index(GPR64[s1 as usize]);
        body.set_memory_index_scale(1);
        body.set_op1_register(gpr_sized(s2, off.size()));
        let mut enc = Encoder::new(64);
        enc.encode(&body, 0).map_err(|_| Unencodable)?;
        let body = enc.take_buffer();
        self.release();
        self.spill(&scratch);
        self.save_flags();
        self.address(insn, s0, self.resident_rsp())?;
        // The guest's offset register, as 32-bit code has it in ESP's case.
        let n = if n == RSP { self.resident_rsp().ok_or(Unencodable)? } else { n };
        match size {
            2 => dynasm!(self.a ; .arch x64 ; movsx Rq(s2), Rw(n)),
            4 => dynasm!(self.a ; .arch x64 ; movsxd Rq(s2), Rd(n)),
            _ => dynasm!(self.a ; .arch x64 ; mov Rq(s2), Rq(n)),
        }
        dynasm!(self.a
            ; .arch x64
            ; mov Rq(s1), Rq(s2)
            ; sar Rq(s1), 3
            ; and Rq(s1), -size
            ; add Rq(s0), Rq(s1)
            ; and Rd(s2), size * 8 - 1
        );
        if self.mode.bits != 64 {
            dynasm!(self.a ; .arch x64 ; mov Rd(s0), Rd(s0));
        }
        self.add_segment_base(s0, s1, seg_index(insn.memory_segment()));
        self.restore_flags(1);
        let miss = self.probe(s0, s1, size, write, false, false);
        self.bytes(&body);
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
        Ok(())
    }

    /// Adds the base of `segment` to the address in `s0`, where it may not
    /// be zero (through `tmp`, keeping the flags).
    fn add_segment_base(&mut self, s0: u8, tmp: u8, segment: usize) {
        let add_base = if self.mode.bits == 64 {
            segment == seg::FS || segment == seg::GS
        } else {
            self.mode.seg_base_mask & (1 << segment) != 0
        };
        if add_base {
            let off = (BtBlock::OFF_SEG_BASE + segment * 8) as i32;
            dynasm!(self.a ; .arch x64 ; gs mov Rq(tmp), QWORD [off] ; lea Rq(s0), [Rq(s0) + Rq(tmp)]);
            if self.mode.bits != 64 {
                dynasm!(self.a ; .arch x64 ; mov Rd(s0), Rd(s0));
            }
        }
    }

    /// The inline soft-TLB probe: finds the host address of the access of
    /// `size` bytes at the linear address in `s0`, using `s1` and RCX (put
    /// aside by `save_rcx`, in the block and back before anything else
    /// runs), leaving the flags alone. On a hit the host address is
    /// `s0 + s1` (`s1` holds the entry's addend), or `s0` alone with
    /// `fold`. Jumps to the returned label when the access has no entry (a
    /// miss, or one crossing a page), RCX still put aside.
    ///
    /// The entry is the table's at the index bits of the address; it maps
    /// the access if the last byte lies in the page of its tag, that is
    /// if (last - tag) has no page bits. Both steps are flag-free: `pext`
    /// takes the bits (`shrx` the page bits in 32-bit code), `lea`
    /// subtracts (tags are kept complemented), `jrcxz` tests. In 32-bit code the tables and masks stay in
    /// registers (`tlb::R32_*`); 64-bit code indexes the table through GS
    /// (`Mode::tlb_tables`), or reads its address from the block.
    ///
    /// With `keep_rcx`, RCX stays borrowed after a hit (see `rcx_borrowed`).
    fn probe(&mut self, s0: u8, s1: u8, size: i32, write: bool, keep_rcx: bool, fold: bool) -> DynamicLabel {
        debug_assert!(s0 != 1 && s1 != 1, "RCX is the probe's own");
        let miss = self.a.new_dynamic_label();
        let hit = self.a.new_dynamic_label();
        let second = self.a.new_dynamic_label();
        if !self.rcx_borrowed {
            self.save_rcx();
        }
        match self.entry(write) {
            // s1 is the entry's index in the table.
            Entry::Gs(_) => dynasm!(self.a ; .arch x64 ; gs pext Rq(s1), Rq(s0), QWORD [BtBlock::OFF_TLB_MASKS as i32]),
            Entry::Reg(_) => dynasm!(self.a ; .arch x64 ; pext Rq(s1), Rq(s0), Rq(tlb::R32_INDEX_MASK)),
            Entry::Ptr(table) => dynasm!(self.a
                ; .arch x64
                ; gs pext Rq(s1), Rq(s0), QWORD [BtBlock::OFF_TLB_MASKS as i32]
                ; gs mov rcx, QWORD [table]
                ; lea Rq(s1), [rcx + Rq(s1) * 8]
            ),
        }
        self.tag_mismatch(s0, s1, 0, size, write);
        dynasm!(self.a
            ; .arch x64
            ; jrcxz =>hit
            ; jmp =>second
            ; =>hit
        );
        let addend = tlb::OFF_ADDEND as i32;
        match self.entry(write) {
            Entry::Gs(table) => dynasm!(self.a ; .arch x64 ; gs mov Rq(s1), QWORD [Rq(s1) * 8 + table + addend]),
            Entry::Reg(table) => dynasm!(self.a ; .arch x64 ; mov Rq(s1), QWORD [Rq(table) + Rq(s1) * 8 + addend]),
            Entry::Ptr(_) => dynasm!(self.a ; .arch x64 ; mov Rq(s1), QWORD [Rq(s1) + addend]),
        }
        if fold {
            dynasm!(self.a ; .arch x64 ; lea Rq(s0), [Rq(s0) + Rq(s1)]);
        }
        self.second_ways.push(SecondWay { at: second, hit, miss, s0, s1, size, write });
        self.rcx_borrowed = keep_rcx;
        if !keep_rcx {
            self.load_rcx();
        }
        miss
    }

    /// How a probe reaches the entry of the `write` (or read) table: see
    /// [`Entry`].
    fn entry(&self, write: bool) -> Entry {
        if self.mode.bits == 32 {
            Entry::Reg(if write { tlb::R32_WRITE_TABLE } else { tlb::R32_READ_TABLE })
        } else if let Some(t) = self.mode.tlb_tables {
            Entry::Gs(t[write as usize])
        } else {
            Entry::Ptr(if write { BtBlock::OFF_TLB_WRITE } else { BtBlock::OFF_TLB_READ } as i32)
        }
    }

    /// RCX = the page bits of (last byte - tag) for the entry whose tag is
    /// `way` bytes after the one `s1` names (see [`Entry`]): zero if it
    /// maps the access of `size` bytes at `s0` (flag-free).
    fn tag_mismatch(&mut self, s0: u8, s1: u8, way: i32, size: i32, write: bool) {
        match self.entry(write) {
            Entry::Gs(table) => dynasm!(self.a ; .arch x64 ; gs mov rcx, QWORD [Rq(s1) * 8 + table + way]),
            Entry::Reg(table) => dynasm!(self.a ; .arch x64 ; mov rcx, QWORD [Rq(table) + Rq(s1) * 8 + way]),
            Entry::Ptr(_) => dynasm!(self.a ; .arch x64 ; mov rcx, QWORD [Rq(s1) + way]),
        }
        dynasm!(self.a ; .arch x64 ; lea rcx, [rcx + Rq(s0) + size]);
        if self.mode.bits == 32 {
            dynasm!(self.a ; .arch x64 ; shrx rcx, rcx, Rq(tlb::R32_PAGE_SHIFT));
        } else {
            dynasm!(self.a ; .arch x64 ; gs pext rcx, rcx, QWORD [BtBlock::OFF_TLB_MASKS as i32 + 8]);
        }
    }

    /// The probes' second-way looks (see `SecondWay`), out of line.
    fn emit_second_ways(&mut self) {
        let way2 = tlb::OFF_WAY2 as i32;
        for w in std::mem::take(&mut self.second_ways) {
            let found = self.a.new_dynamic_label();
            let SecondWay { at, hit, miss, s0, s1, size, write } = w;
            dynasm!(self.a ; .arch x64 ; =>at);
            self.tag_mismatch(s0, s1, way2, size, write);
            // The entry: its address, or its index, in the second way.
            let step = if matches!(self.entry(write), Entry::Ptr(_)) { way2 } else { tlb::ENTRIES as i32 };
            dynasm!(self.a
                ; .arch x64
                ; jrcxz =>found
                ; jmp =>miss
                ; =>found
                ; lea Rq(s1), [Rq(s1) + step]
                ; jmp =>hit
            );
        }
    }

    /// Guest RSP into `dst` (at the stack width), moved by `delta` bytes.
    fn load_rsp(&mut self, dst: u8, delta: i32) {
        if let Some(r) = self.resident_rsp() {
            dynasm!(self.a ; .arch x64 ; lea Rd(dst), [Rq(r) + delta]);
            return;
        }
        dynasm!(self.a ; .arch x64 ; gs mov Rq(dst), QWORD [BtBlock::off_gpr(4) as i32]);
        if self.mode.stack_bits == 64 {
            if delta != 0 {
                dynasm!(self.a ; .arch x64 ; lea Rq(dst), [Rq(dst) + delta]);
            }
        } else {
            dynasm!(self.a ; .arch x64 ; lea Rd(dst), [Rq(dst) + delta]);
        }
    }

    /// The host address of `size` stack bytes at guest RSP + `delta`, into
    /// `s0` (its scratch registers spilled first). Returns the miss label;
    /// the caller restores the scratch registers.
    fn stack_slot(&mut self, scratch: &[u8], delta: i32, size: i32, write: bool) -> DynamicLabel {
        let (s0, s1) = (scratch[0], scratch[1]);
        self.spill(scratch);
        self.load_rsp(s0, delta);
        self.add_segment_base(s0, s1, seg::SS);
        self.probe(s0, s1, size, write, false, true)
    }

    /// Guest RSP += `delta` (at the stack width), through `tmp` where it
    /// lives in the block.
    fn move_rsp(&mut self, tmp: u8, delta: i32) {
        if let Some(r) = self.resident_rsp() {
            dynasm!(self.a ; .arch x64 ; lea Rd(r), [Rq(r) + delta]);
            return;
        }
        self.load_rsp(tmp, delta);
        dynasm!(self.a ; .arch x64 ; gs mov QWORD [BtBlock::off_gpr(4) as i32], Rq(tmp));
    }

    /// Stores `value` (a register number, or an immediate) of `size` bytes at host `[s0]`.
    fn store(&mut self, s0: u8, s1: u8, size: i32, value: Result<u8, i64>) {
        match (value, size) {
            (Ok(r), 8) => dynasm!(self.a ; .arch x64 ; mov QWORD [Rq(s0)], Rq(r)),
            (Ok(r), 4) => dynasm!(self.a ; .arch x64 ; mov DWORD [Rq(s0)], Rd(r)),
            (Ok(r), _) => dynasm!(self.a ; .arch x64 ; mov WORD [Rq(s0)], Rw(r)),
            (Err(imm), 8) if i32::try_from(imm).is_ok() => dynasm!(self.a ; .arch x64 ; mov QWORD [Rq(s0)], imm as i32),
            (Err(imm), 8) => dynasm!(self.a ; .arch x64 ; mov Rq(s1), QWORD imm ; mov QWORD [Rq(s0)], Rq(s1)),
            (Err(imm), 4) => dynasm!(self.a ; .arch x64 ; mov DWORD [Rq(s0)], imm as i32),
            (Err(imm), _) => dynasm!(self.a ; .arch x64 ; mov WORD [Rq(s0)], imm as i16),
        }
    }


    /// push reg/imm, or the return address of a call: writes below RSP,
    /// then moves RSP.
    fn push(&mut self, insn: &Instruction, value: Result<u8, i64>, size: i32, info: &mut InstructionInfoFactory) {
        let scratch = pick_scratch(insn, info, 2, self.mode.bits);
        // s1 stays borrowed for a 64-bit immediate; restored after the store.
        let miss = self.stack_slot(&scratch, -size, size, true);
        self.store(scratch[0], scratch[1], size, value);
        self.move_rsp(scratch[0], -size);
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// push of memory: the value is read into `VALUE_SLOT` (a miss leaves
    /// the instruction to the runtime, nothing done), then pushed from there.
    fn push_mem(&mut self, insn: &Instruction, size: i32, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        self.mem_with(insn, info, MemBody::Value)?;
        self.release();
        self.push_from_block(insn, size, size, info, scratch_off(VALUE_SLOT));
        Ok(())
    }

    /// A push of the value at block offset `off` (guest RSP for `push rsp`,
    /// which pushes RSP from before the push; a value read from memory; a
    /// segment selector), through a third scratch register: its low
    /// `stored` bytes written at the bottom of the `size`-byte slot below
    /// RSP, then RSP moved.
    fn push_from_block(&mut self, insn: &Instruction, size: i32, stored: i32, info: &mut InstructionInfoFactory, off: i32) {
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let s2 = scratch[2];
        if self.holds_guest(s2) {
            dynasm!(self.a ; .arch x64 ; gs mov QWORD [scratch_off(2)], Rq(s2));
        }
        dynasm!(self.a ; .arch x64 ; gs mov Rq(s2), QWORD [off]);
        let miss = self.stack_slot(&scratch[..2], -size, stored, true);
        self.store(scratch[0], scratch[1], stored, Ok(s2));
        self.move_rsp(scratch[0], -size);
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// pop reg: reads at RSP, then moves RSP.
    fn pop(&mut self, insn: &Instruction, dst: Register, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let size = dst.size() as i32;
        let n = gpr_number(dst).ok_or(Unencodable)?;
        let scratch = pick_scratch(insn, info, 2, self.mode.bits);
        let miss = self.stack_slot(&scratch, 0, size, false);
        self.unspill_one(scratch[1], 1);
        let s0 = scratch[0];
        match size {
            8 => dynasm!(self.a ; .arch x64 ; mov Rq(n), QWORD [Rq(s0)]),
            4 => dynasm!(self.a ; .arch x64 ; mov Rd(n), DWORD [Rq(s0)]),
            _ => dynasm!(self.a ; .arch x64 ; mov Rw(n), WORD [Rq(s0)]),
        }
        self.move_rsp(s0, size);
        self.unspill_one(s0, 0);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
        Ok(())
    }

    /// leave: pops RBP from where RBP points, then RSP = RBP + the width,
    /// at the stack width (the plan keeps it the code's). The slot is
    /// probed first, so a miss or a fault leaves the instruction to the
    /// runtime with nothing done: RSP as it was in the exception frame.
    fn leave(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) {
        let size = (self.mode.bits / 8) as i32;
        let scratch = pick_scratch(insn, info, 2, self.mode.bits);
        let (s0, s1) = (scratch[0], scratch[1]);
        self.spill(&scratch);
        if size == 8 {
            dynasm!(self.a ; .arch x64 ; mov Rq(s0), rbp);
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(s0), ebp);
        }
        self.add_segment_base(s0, s1, seg::SS);
        let miss = self.probe(s0, s1, size, false, false, true);
        match self.resident_rsp() {
            Some(r) => dynasm!(self.a ; .arch x64 ; lea Rd(r), [rbp + size]),
            None => dynasm!(self.a
                ; .arch x64
                ; lea Rq(s1), [rbp + size]
                ; gs mov QWORD [BtBlock::off_gpr(4) as i32], Rq(s1)
            ),
        }
        if size == 8 {
            dynasm!(self.a ; .arch x64 ; mov rbp, QWORD [Rq(s0)]);
        } else {
            dynasm!(self.a ; .arch x64 ; mov ebp, DWORD [Rq(s0)]);
        }
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// ret [imm16]: the return address into the block's RIP, RSP moved,
    /// then the IBTC, or an indirect exit.
    fn ret(&mut self, insn: &Instruction, live: u32, info: &mut InstructionInfoFactory) {
        let size = (self.mode.bits / 8) as i32;
        let extra = if insn.op_count() > 0 { insn.immediate16() as i32 } else { 0 };
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let miss = self.stack_slot(&scratch, 0, size, false);
        let (s0, s1, s2) = (scratch[0], scratch[1], scratch[2]);
        if size == 8 {
            dynasm!(self.a ; .arch x64 ; mov Rq(s1), QWORD [Rq(s0)]);
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(s1), DWORD [Rq(s0)]);
        }
        dynasm!(self.a
            ; .arch x64
            ; gs mov QWORD [BtBlock::OFF_RIP as i32], Rq(s1)
        );
        self.save_old_rsp(s2);
        self.move_rsp(s0, size + extra);
        self.save_flags();
        let ibtc_miss = self.ibtc_lookup(s1, s2);
        self.unspill(&scratch);
        self.restore_flags(live);
        dynasm!(self.a ; .arch x64 ; gs jmp QWORD [BtBlock::OFF_TARGET as i32] ; =>ibtc_miss);
        self.unspill(&scratch);
        self.restore_flags(live);
        self.indirect_exit(insn.ip());
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// jmp/call through a register, then the IBTC, or an indirect exit.
    fn indirect_reg(&mut self, insn: &Instruction, live: u32, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let r = gpr_number(insn.op0_register()).ok_or(Unencodable)?;
        self.indirect(insn, live, info, Some(r))
    }

    /// jmp/call through memory: the target is read (a miss leaves the
    /// instruction to the runtime with nothing done), then as `indirect_reg`.
    fn indirect_mem(&mut self, insn: &Instruction, live: u32, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        self.mem_with(insn, info, MemBody::Target)?;
        self.release();
        self.indirect(insn, live, info, None)
    }

    /// An indirect jump or call to the target in register `r`, or already
    /// in the block's RIP if `None`.
    fn indirect(&mut self, insn: &Instruction, live: u32, info: &mut InstructionInfoFactory, r: Option<u8>) -> Result<(), Unencodable> {
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let (s0, s1) = (scratch[0], scratch[1]);
        if self.resident_rsp().is_some() {
            self.save_old_rsp(s0);
        } else {
            dynasm!(self.a ; .arch x64 ; gs mov QWORD [scratch_off(0)], Rq(s0));
            self.save_old_rsp(s0);
            dynasm!(self.a ; .arch x64 ; gs mov Rq(s0), QWORD [scratch_off(0)]);
        }
        if insn.mnemonic() == Mnemonic::Call {
            if self.mode.bits == 64 {
                self.canonical_target_or_miss(insn, &scratch[..1], r);
            }
            let size = (self.mode.bits / 8) as i32;
            self.push(insn, Err(insn.next_ip() as i64), size, info);
        }
        self.save_flags();
        self.spill(&scratch[..2]);
        match r {
            Some(r) if self.mode.bits == 64 => dynasm!(self.a ; .arch x64 ; mov Rq(s0), Rq(r)),
            Some(r) => dynasm!(self.a ; .arch x64 ; mov Rd(s0), Rd(r)),
            None => dynasm!(self.a ; .arch x64 ; gs mov Rq(s0), QWORD [BtBlock::OFF_RIP as i32]),
        }
        if r.is_some() {
            dynasm!(self.a ; .arch x64 ; gs mov QWORD [BtBlock::OFF_RIP as i32], Rq(s0));
        }
        let ibtc_miss = self.ibtc_lookup(s0, s1);
        self.unspill(&scratch[..2]);
        self.restore_flags(live);
        dynasm!(self.a ; .arch x64 ; gs jmp QWORD [BtBlock::OFF_TARGET as i32] ; =>ibtc_miss);
        self.unspill(&scratch[..2]);
        self.restore_flags(live);
        self.indirect_exit(insn.ip());
        Ok(())
    }

    /// Before a 64-bit indirect call pushes anything: a target that is not
    /// canonical leaves the call to the runtime, which raises its #GP with
    /// nothing done (a push first left the return address below RSP).
    /// Flag-free: (target + 2^47) >> 48 must be 0, through RCX and jrcxz.
    /// The target is register `r`, or the block's RIP (read there by
    /// `indirect_mem`); `scratch` is one register.
    fn canonical_target_or_miss(&mut self, insn: &Instruction, scratch: &[u8], r: Option<u8>) {
        let s0 = scratch[0];
        let bad = self.a.new_dynamic_label();
        let good = self.a.new_dynamic_label();
        self.spill(scratch);
        match r {
            Some(r) => dynasm!(self.a ; .arch x64 ; mov Rq(s0), Rq(r)),
            None => dynasm!(self.a ; .arch x64 ; gs mov Rq(s0), QWORD [BtBlock::OFF_RIP as i32]),
        }
        self.save_rcx();
        dynasm!(self.a
            ; .arch x64
            ; mov rcx, QWORD 0x8000_0000_0000
            ; lea rcx, [rcx + Rq(s0)]
            ; mov Rd(s0), 48
            ; shrx rcx, rcx, Rq(s0)
            ; jrcxz =>good
            ; jmp =>bad
            ; =>good
        );
        self.load_rcx();
        self.unspill(scratch);
        self.misses.push(Miss { label: bad, rip: insn.ip(), scratch: scratch.to_vec(), flags_saved: false });
    }

    /// Inline code over the virtual state (see [`VirtualOp`]).
    fn virtual_op(&mut self, insn: &Instruction, op: VirtualOp, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        match op {
            VirtualOp::Cli => dynasm!(self.a ; .arch x64 ; gs mov BYTE [BtBlock::OFF_VIF as i32], 0),
            VirtualOp::Sti => {
                // Flag-free: the pending byte through RCX and jrcxz.
                let pending = self.a.new_dynamic_label();
                let quiet = self.a.new_dynamic_label();
                self.save_rcx();
                dynasm!(self.a
                    ; .arch x64
                    ; gs movzx ecx, BYTE [BtBlock::OFF_IRQ_PENDING as i32]
                    ; jrcxz =>quiet
                    ; jmp =>pending
                    ; =>quiet
                );
                self.load_rcx();
                dynasm!(self.a ; .arch x64 ; gs mov BYTE [BtBlock::OFF_VIF as i32], 1);
                // The exit restores RCX as after a probe's miss.
                self.misses.push(Miss { label: pending, rip: insn.ip(), scratch: Vec::new(), flags_saved: false });
            }
            VirtualOp::SetDf(v) => dynasm!(self.a ; .arch x64 ; gs mov BYTE [BtBlock::OFF_VDF as i32], v as i8),
            VirtualOp::Pushf => self.pushf(insn, info),
            VirtualOp::Read(r) => {
                let off = match r {
                    SysReg::Cr0 => BtBlock::OFF_CR0,
                    SysReg::Ldtr => BtBlock::OFF_LDTR_SEL,
                    SysReg::Tr => BtBlock::OFF_TR_SEL,
                    SysReg::Gdtr => BtBlock::OFF_GDTR_LIMIT,
                    SysReg::Idtr => BtBlock::OFF_IDTR_LIMIT,
                    SysReg::Seg(s) => BtBlock::OFF_SEG_SEL + 8 * s as usize,
                } as i32;
                if insn.op0_kind() == OpKind::Register {
                    let dst = insn.op0_register();
                    let n = gpr_number(dst).ok_or(Unencodable)?;
                    // As the interpreter's set_reg: 16 bits merge, wider zero-extend
                    // (smsw gives CR0's low 32 bits).
                    if dst.size() == 2 {
                        dynasm!(self.a ; .arch x64 ; gs mov Rw(n), WORD [off]);
                    } else {
                        dynasm!(self.a ; .arch x64 ; gs mov Rd(n), DWORD [off]);
                    }
                    return Ok(());
                }
                self.store_virtual(insn, r, off, info)?;
            }
        }
        Ok(())
    }

    /// smsw/sldt/str/sgdt/sidt to memory: address, probe, store from the block.
    fn store_virtual(&mut self, insn: &Instruction, r: SysReg, off: i32, info: &mut InstructionInfoFactory) -> Result<(), Unencodable> {
        let table = matches!(r, SysReg::Gdtr | SysReg::Idtr);
        let size = if table { 10 } else { 2 };
        let uses_rsp = gpr_number(insn.memory_base()) == Some(RSP) || gpr_number(insn.memory_index()) == Some(RSP);
        let resident = self.resident_rsp();
        let rsp_scratch = uses_rsp && resident.is_none();
        let scratch = pick_scratch(insn, info, if rsp_scratch { 3 } else { 2 }, self.mode.bits);
        let (s0, s1) = (scratch[0], scratch[1]);
        self.spill(&scratch);
        let s_rsp = uses_rsp.then(|| resident.unwrap_or_else(|| scratch[2]));
        if let Some(r) = s_rsp.filter(|_| rsp_scratch) {
            dynasm!(self.a ; .arch x64 ; gs mov Rq(r), QWORD [BtBlock::off_gpr(4) as i32]);
        }
        self.address(insn, s0, s_rsp)?;
        self.add_segment_base(s0, s1, seg_index(insn.memory_segment()));
        let miss = self.probe(s0, s1, size, true, false, true);
        dynasm!(self.a
            ; .arch x64
            ; gs mov Rw(s1), WORD [off]
            ; mov WORD [Rq(s0)], Rw(s1)
        );
        if table {
            // The base follows the limit in the block too.
            dynasm!(self.a
                ; .arch x64
                ; gs mov Rq(s1), QWORD [off - 8]
                ; mov QWORD [Rq(s0) + 2], Rq(s1)
            );
        }
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
        Ok(())
    }

    /// pushf: the image is the host's arithmetic flags, the virtual IF and
    /// DF bytes, and the other virtual bits (RF and VM read as 0).
    fn pushf(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) {
        let size = -insn.stack_pointer_increment();
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let (s0, s1, v) = (scratch[0], scratch[1], scratch[2]);
        // The saved flags give the image's arithmetic part: AH is RFLAGS'
        // low byte, AL is OF (bit 11).
        self.save_flags();
        self.spill(&scratch);
        dynasm!(self.a
            ; .arch x64
            ; gs movzx Rd(v), BYTE [BtBlock::OFF_SAVED_FLAGS as i32 + 1]
            ; and Rd(v), 0xd5
            ; gs movzx Rd(s1), BYTE [BtBlock::OFF_SAVED_FLAGS as i32]
            ; shl Rd(s1), 11
            ; or Rq(v), Rq(s1)
            ; gs or Rq(v), QWORD [BtBlock::OFF_VFLAGS as i32]
            ; gs movzx Rd(s1), BYTE [BtBlock::OFF_VIF as i32]
            ; shl Rd(s1), 9
            ; or Rq(v), Rq(s1)
            ; gs movzx Rd(s1), BYTE [BtBlock::OFF_VDF as i32]
            ; shl Rd(s1), 10
            ; or Rq(v), Rq(s1)
        );
        self.load_rsp(s0, -size);
        self.add_segment_base(s0, s1, seg::SS);
        let miss = self.probe(s0, s1, size, true, false, true);
        self.store(s0, s1, size, Ok(v));
        self.move_rsp(s0, -size);
        self.unspill(&scratch);
        self.restore_flags(1);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: true });
    }

    /// lods/stos (no rep): the access through the soft TLB, then RSI/RDI
    /// moved by the size, the direction from the virtual DF.
    fn string_one(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) {
        use Mnemonic as M;
        match insn.mnemonic() {
            M::Movsb | M::Movsw | M::Movsd | M::Movsq => return self.string_pair(insn, info, false),
            M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => return self.string_pair(insn, info, true),
            _ => {}
        }
        let store = matches!(insn.mnemonic(), M::Stosb | M::Stosw | M::Stosd | M::Stosq);
        let scan = matches!(insn.mnemonic(), M::Scasb | M::Scasw | M::Scasd | M::Scasq);
        let size = insn.memory_size().size() as i32;
        let (index, segment) = if store || scan { (7u8, seg::ES) } else { (6u8, seg_index(insn.memory_segment())) };
        let scratch = pick_scratch(insn, info, 2, self.mode.bits);
        let (s0, s1) = (scratch[0], scratch[1]);
        self.spill(&scratch);
        let miss = self.string_address(s0, s1, index, segment, size, store);
        match (store, size) {
            // scas: the flags of AL - [ES:RDI] (the step below keeps them).
            (false, 1) if scan => dynasm!(self.a ; .arch x64 ; cmp al, BYTE [Rq(s0)]),
            (false, 2) if scan => dynasm!(self.a ; .arch x64 ; cmp ax, WORD [Rq(s0)]),
            (false, 4) if scan => dynasm!(self.a ; .arch x64 ; cmp eax, DWORD [Rq(s0)]),
            (false, _) if scan => dynasm!(self.a ; .arch x64 ; cmp rax, QWORD [Rq(s0)]),
            (false, 1) => dynasm!(self.a ; .arch x64 ; mov al, BYTE [Rq(s0)]),
            (false, 2) => dynasm!(self.a ; .arch x64 ; mov ax, WORD [Rq(s0)]),
            (false, 4) => dynasm!(self.a ; .arch x64 ; mov eax, DWORD [Rq(s0)]),
            (false, _) => dynasm!(self.a ; .arch x64 ; mov rax, QWORD [Rq(s0)]),
            (true, 1) => dynasm!(self.a ; .arch x64 ; mov BYTE [Rq(s0)], al),
            (true, 2) => dynasm!(self.a ; .arch x64 ; mov WORD [Rq(s0)], ax),
            (true, 4) => dynasm!(self.a ; .arch x64 ; mov DWORD [Rq(s0)], eax),
            (true, _) => dynasm!(self.a ; .arch x64 ; mov QWORD [Rq(s0)], rax),
        }
        self.string_step(&[index], s1, size);
        self.unspill(&scratch);
        self.misses.push(Miss { label: miss, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// The start of a rep string instruction's inline code: the flags put
    /// aside, `scratch` spilled, RCX (the count) put aside first, since
    /// every miss path takes it back. Jumps to the returned label (a miss,
    /// for the runtime) with the virtual DF set or a count of 0.
    fn rep_prologue(&mut self, scratch: &[u8]) -> DynamicLabel {
        self.save_flags();
        self.spill(scratch);
        self.save_rcx();
        self.rcx_borrowed = true;
        let miss = self.a.new_dynamic_label();
        dynasm!(self.a
            ; .arch x64
            ; gs cmp BYTE [BtBlock::OFF_VDF as i32], 0
            ; jne =>miss
        );
        if self.mode.bits == 64 {
            dynasm!(self.a ; .arch x64 ; test rcx, rcx ; jz =>miss);
        } else {
            dynasm!(self.a ; .arch x64 ; test ecx, ecx ; jz =>miss);
        }
        miss
    }

    /// rep stos and rep movs (see `Plan::RepString`): checks, a probe of
    /// each operand's page, then the host's own instruction on the host
    /// addresses, the index registers' guest values moved by the length
    /// after. The flags are put aside in the block throughout.
    fn rep_string(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) {
        let size = insn.memory_size().size() as i32;
        let wide = self.mode.bits == 64;
        let movs = matches!(insn.mnemonic(), Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq);
        let scratch = pick_scratch(insn, info, if movs { 3 } else { 2 }, self.mode.bits);
        let (s0, s1) = (scratch[0], scratch[1]);
        let miss = self.rep_prologue(&scratch);
        if wide {
            dynasm!(self.a ; .arch x64 ; cmp rcx, 0x1000 / size ; ja =>miss);
        } else {
            dynasm!(self.a ; .arch x64 ; cmp ecx, 0x1000 / size ; ja =>miss);
        }
        let mut misses = vec![miss];
        // Each operand's host address minus its index register's guest
        // value: in s2 for the source, in s0 for the destination.
        if movs {
            let s2 = scratch[2];
            misses.push(self.rep_operand(s0, s1, 6, seg_index(insn.memory_segment()), size, false, miss));
            dynasm!(self.a ; .arch x64 ; mov Rq(s2), Rq(s0));
            self.index_delta(s2, 6, s1);
        }
        misses.push(self.rep_operand(s0, s1, 7, seg::ES, size, true, miss));
        self.index_delta(s0, 7, s1);
        if !wide {
            dynasm!(self.a ; .arch x64 ; mov ecx, ecx ; mov edi, edi);
            if movs {
                dynasm!(self.a ; .arch x64 ; mov esi, esi);
            }
        }
        dynasm!(self.a ; .arch x64 ; add rdi, Rq(s0));
        if movs {
            let s2 = scratch[2];
            dynasm!(self.a ; .arch x64 ; add rsi, Rq(s2));
            match size {
                1 => dynasm!(self.a ; .arch x64 ; rep movsb),
                2 => dynasm!(self.a ; .arch x64 ; rep movsw),
                4 => dynasm!(self.a ; .arch x64 ; rep movsd),
                _ => dynasm!(self.a ; .arch x64 ; rep movsq),
            }
            dynasm!(self.a ; .arch x64 ; sub rsi, Rq(s2));
            if !wide {
                // An index that wrapped at 4 GiB (the segment base kept the
                // linear range in one page) keeps only its low half.
                dynasm!(self.a ; .arch x64 ; mov esi, esi);
            }
        } else {
            match size {
                1 => dynasm!(self.a ; .arch x64 ; rep stosb),
                2 => dynasm!(self.a ; .arch x64 ; rep stosw),
                4 => dynasm!(self.a ; .arch x64 ; rep stosd),
                _ => dynasm!(self.a ; .arch x64 ; rep stosq),
            }
        }
        dynasm!(self.a ; .arch x64 ; sub rdi, Rq(s0));
        if !wide {
            dynasm!(self.a ; .arch x64 ; mov edi, edi);
        }
        // RCX holds the guest's count as the instruction left it (0).
        self.rcx_borrowed = false;
        self.unspill(&scratch);
        self.restore_flags(1);
        for label in misses {
            self.misses.push(Miss { label, rip: insn.ip(), scratch: scratch.clone(), flags_saved: true });
        }
    }

    /// repe/repne cmps and scas (see `Plan::RepCompare`). The run covers
    /// the elements that lie in the page of each operand's first one; each
    /// operand's host address minus its index register's guest value is
    /// subtracted again after with `lea`, and RCX gets back what was left
    /// out of the run with `lea`, so the flags stay as the instruction left
    /// them. If it ended (its condition, or the count), they are its
    /// result; otherwise the runtime runs the rest, from the registers as
    /// they are.
    fn rep_compare(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory) {
        use Mnemonic as M;
        let size = insn.memory_size().size() as i32;
        let wide = self.mode.bits == 64;
        let cmps = matches!(insn.mnemonic(), M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq);
        let scratch = pick_scratch(insn, info, if cmps { 4 } else { 3 }, self.mode.bits);
        let (s0, s1, s2) = (scratch[0], scratch[1], scratch[2]);
        let miss = self.rep_prologue(&scratch);
        // s2: the elements this run covers, at most the count.
        if wide {
            dynasm!(self.a ; .arch x64 ; mov Rq(s2), rcx);
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(s2), ecx);
        }
        let mut misses = vec![miss];
        // Each operand's host address minus its index register's guest
        // value: in s3 for the source (cmps), in s0 for ES:[RDI].
        let mut operands = Vec::new();
        if cmps {
            operands.push((6u8, seg_index(insn.memory_segment()), scratch[3]));
        }
        operands.push((7u8, seg::ES, s0));
        for &(index, segment, host) in &operands {
            if wide {
                dynasm!(self.a ; .arch x64 ; mov Rq(host), Rq(index));
            } else {
                dynasm!(self.a ; .arch x64 ; mov Rd(host), Rd(index));
            }
            self.add_segment_base(host, s1, segment);
            // The whole elements from the first to the end of its page.
            dynasm!(self.a
                ; .arch x64
                ; mov Rd(s1), Rd(host)
                ; and Rd(s1), 0xfff
                ; neg Rq(s1)
                ; add Rq(s1), 0x1000
            );
            if size > 1 {
                dynasm!(self.a ; .arch x64 ; shr Rq(s1), size.trailing_zeros() as i8 ; jz =>miss);
            }
            dynasm!(self.a ; .arch x64 ; cmp Rq(s2), Rq(s1) ; cmova Rq(s2), Rq(s1));
            misses.push(self.probe(host, s1, size, false, false, true));
            // The probe took RCX back from where it still is.
            self.rcx_borrowed = true;
            self.index_delta(host, index, s1);
        }
        // s1: the count left out of this run; RCX: the run.
        if wide {
            dynasm!(self.a ; .arch x64 ; mov Rq(s1), rcx ; sub Rq(s1), Rq(s2) ; mov rcx, Rq(s2) ; add rdi, Rq(s0) ; neg Rq(s0));
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(s1), ecx ; sub Rd(s1), Rd(s2) ; mov ecx, Rd(s2) ; mov edi, edi ; add rdi, Rq(s0) ; neg Rq(s0));
        }
        if cmps {
            let s3 = scratch[3];
            if !wide {
                dynasm!(self.a ; .arch x64 ; mov esi, esi);
            }
            dynasm!(self.a ; .arch x64 ; add rsi, Rq(s3) ; neg Rq(s3));
        }
        let repne = insn.has_repne_prefix();
        match (cmps, repne, size) {
            (true, false, 1) => dynasm!(self.a ; .arch x64 ; repe cmpsb),
            (true, false, 2) => dynasm!(self.a ; .arch x64 ; repe cmpsw),
            (true, false, 4) => dynasm!(self.a ; .arch x64 ; repe cmpsd),
            (true, false, _) => dynasm!(self.a ; .arch x64 ; repe cmpsq),
            (true, true, 1) => dynasm!(self.a ; .arch x64 ; repne cmpsb),
            (true, true, 2) => dynasm!(self.a ; .arch x64 ; repne cmpsw),
            (true, true, 4) => dynasm!(self.a ; .arch x64 ; repne cmpsd),
            (true, true, _) => dynasm!(self.a ; .arch x64 ; repne cmpsq),
            (false, false, 1) => dynasm!(self.a ; .arch x64 ; repe scasb),
            (false, false, 2) => dynasm!(self.a ; .arch x64 ; repe scasw),
            (false, false, 4) => dynasm!(self.a ; .arch x64 ; repe scasd),
            (false, false, _) => dynasm!(self.a ; .arch x64 ; repe scasq),
            (false, true, 1) => dynasm!(self.a ; .arch x64 ; repne scasb),
            (false, true, 2) => dynasm!(self.a ; .arch x64 ; repne scasw),
            (false, true, 4) => dynasm!(self.a ; .arch x64 ; repne scasd),
            (false, true, _) => dynasm!(self.a ; .arch x64 ; repne scasq),
        }
        // Back to guest values, flag-free.
        dynasm!(self.a ; .arch x64 ; lea rdi, [rdi + Rq(s0)]);
        if cmps {
            dynasm!(self.a ; .arch x64 ; lea rsi, [rsi + Rq(scratch[3])]);
        }
        if wide {
            dynasm!(self.a ; .arch x64 ; lea rcx, [rcx + Rq(s1)]);
        } else {
            // An index that wrapped at 4 GiB keeps only its low half.
            dynasm!(self.a ; .arch x64 ; mov edi, edi ; lea ecx, [rcx + Rq(s1)]);
            if cmps {
                dynasm!(self.a ; .arch x64 ; mov esi, esi);
            }
        }
        let (done, rest) = (self.a.new_dynamic_label(), self.a.new_dynamic_label());
        if repne {
            dynasm!(self.a ; .arch x64 ; je =>done);
        } else {
            dynasm!(self.a ; .arch x64 ; jne =>done);
        }
        // Neither the condition nor the count ended it: RCX's guest value
        // is where the miss path takes it from, and the runtime goes on.
        dynasm!(self.a ; .arch x64 ; jrcxz =>done);
        self.rcx_home = false;
        self.save_rcx();
        dynasm!(self.a ; .arch x64 ; jmp =>rest ; =>done);
        // RCX holds the guest's count as the instruction left it (its home
        // does not, on this path), the flags its result.
        self.rcx_borrowed = false;
        self.rcx_home = false;
        self.unspill(&scratch);
        for label in misses {
            self.misses.push(Miss { label, rip: insn.ip(), scratch: scratch.clone(), flags_saved: true });
        }
        // The rest goes on with the flags of the last comparison: if its
        // first element faults, they are what the exception frame holds.
        self.misses.push(Miss { label: rest, rip: insn.ip(), scratch, flags_saved: false });
    }

    /// For a rep string operand at [`segment`:index register `index`] of
    /// RCX elements of `size` bytes: jumps to `miss` unless the operand
    /// lies in one page, then probes that page, leaving the first byte's
    /// host address in `s0` (through `s1`). Returns the probe's miss label.
    #[allow(clippy::too_many_arguments)]
    fn rep_operand(&mut self, s0: u8, s1: u8, index: u8, segment: usize, size: i32, write: bool, miss: DynamicLabel) -> DynamicLabel {
        if self.mode.bits == 64 {
            dynasm!(self.a ; .arch x64 ; mov Rq(s0), Rq(index));
        } else {
            // The count is ECX, the index the register's low half.
            dynasm!(self.a ; .arch x64 ; mov ecx, ecx ; mov Rd(s0), Rd(index));
        }
        self.add_segment_base(s0, s1, segment);
        // The last byte in the first byte's page.
        match size {
            1 => dynasm!(self.a ; .arch x64 ; lea Rq(s1), [Rq(s0) + rcx - 1]),
            2 => dynasm!(self.a ; .arch x64 ; lea Rq(s1), [Rq(s0) + rcx * 2 - 1]),
            4 => dynasm!(self.a ; .arch x64 ; lea Rq(s1), [Rq(s0) + rcx * 4 - 1]),
            _ => dynasm!(self.a ; .arch x64 ; lea Rq(s1), [Rq(s0) + rcx * 8 - 1]),
        }
        if self.mode.bits != 64 {
            // An operand wrapping at 4 GiB ends in another page.
            dynasm!(self.a ; .arch x64 ; mov Rd(s1), Rd(s1));
        }
        dynasm!(self.a
            ; .arch x64
            ; xor Rq(s1), Rq(s0)
            ; test Rq(s1), -0x1000
            ; jnz =>miss
        );
        let probe_miss = self.probe(s0, s1, 1, write, false, true);
        // The probe took RCX back from where it still is: the next probe
        // and the miss paths find it there.
        self.rcx_borrowed = true;
        probe_miss
    }

    /// `r` (a host address) minus index register `index`'s guest value at
    /// the address size (through `tmp`).
    fn index_delta(&mut self, r: u8, index: u8, tmp: u8) {
        if self.mode.bits == 64 {
            dynasm!(self.a ; .arch x64 ; sub Rq(r), Rq(index));
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(tmp), Rd(index) ; sub Rq(r), Rq(tmp));
        }
    }

    /// The host address of a string instruction's access of `size` bytes at
    /// [`segment`:index register `index`], into `s0` (through `s1`); the
    /// probe's miss label.
    fn string_address(&mut self, s0: u8, s1: u8, index: u8, segment: usize, size: i32, write: bool) -> DynamicLabel {
        if self.mode.bits == 64 {
            dynasm!(self.a ; .arch x64 ; mov Rq(s0), Rq(index));
        } else {
            dynasm!(self.a ; .arch x64 ; mov Rd(s0), Rd(index));
        }
        self.add_segment_base(s0, s1, segment);
        self.probe(s0, s1, size, write, false, true)
    }

    /// Moves the index registers `indexes` by `size`, down if the virtual
    /// DF is set, flag-free: `tmp` = !(2 * size * DF), then
    /// index + tmp + size + 1.
    fn string_step(&mut self, indexes: &[u8], tmp: u8, size: i32) {
        dynasm!(self.a ; .arch x64 ; gs movzx Rd(tmp), BYTE [BtBlock::OFF_VDF as i32]);
        match size {
            1 => dynasm!(self.a ; .arch x64 ; lea Rd(tmp), [Rq(tmp) * 2]),
            2 => dynasm!(self.a ; .arch x64 ; lea Rd(tmp), [Rq(tmp) * 4]),
            4 => dynasm!(self.a ; .arch x64 ; lea Rd(tmp), [Rq(tmp) * 8]),
            _ => dynasm!(self.a ; .arch x64 ; lea Rd(tmp), [Rq(tmp) * 8] ; lea Rd(tmp), [Rq(tmp) + Rq(tmp)]),
        }
        dynasm!(self.a ; .arch x64 ; not Rq(tmp));
        for &index in indexes {
            if self.mode.bits == 64 {
                dynasm!(self.a ; .arch x64 ; lea Rq(index), [Rq(index) + Rq(tmp) + size + 1]);
            } else {
                dynasm!(self.a ; .arch x64 ; lea Rd(index), [Rq(index) + Rq(tmp) + size + 1]);
            }
        }
    }

    /// movs or cmps without rep: reads [seg:RSI] into a third scratch
    /// register through one probe, then writes it to [ES:RDI] (movs) or
    /// compares it with what is there (cmps: the flags of [RSI] - [RDI])
    /// through another (a miss in either leaves the whole instruction to
    /// the runtime, nothing done), then moves both indexes.
    fn string_pair(&mut self, insn: &Instruction, info: &mut InstructionInfoFactory, compare: bool) {
        let size = insn.memory_size().size() as i32;
        let scratch = pick_scratch(insn, info, 3, self.mode.bits);
        let (s0, s1, s2) = (scratch[0], scratch[1], scratch[2]);
        self.spill(&scratch);
        for (index, segment, second) in [(6u8, seg_index(insn.memory_segment()), false), (7u8, seg::ES, true)] {
            let write = second && !compare;
            let miss = self.string_address(s0, s1, index, segment, size, write);
            match (second, size) {
                (true, 1) if compare => dynasm!(self.a ; .arch x64 ; cmp Rb(s2), BYTE [Rq(s0)]),
                (true, 2) if compare => dynasm!(self.a ; .arch x64 ; cmp Rw(s2), WORD [Rq(s0)]),
                (true, 4) if compare => dynasm!(self.a ; .arch x64 ; cmp Rd(s2), DWORD [Rq(s0)]),
                (true, _) if compare => dynasm!(self.a ; .arch x64 ; cmp Rq(s2), QWORD [Rq(s0)]),
                (false, 1) => dynasm!(self.a ; .arch x64 ; movzx Rd(s2), BYTE [Rq(s0)]),
                (false, 2) => dynasm!(self.a ; .arch x64 ; movzx Rd(s2), WORD [Rq(s0)]),
                (false, 4) => dynasm!(self.a ; .arch x64 ; mov Rd(s2), DWORD [Rq(s0)]),
                (false, _) => dynasm!(self.a ; .arch x64 ; mov Rq(s2), QWORD [Rq(s0)]),
                (true, 1) => dynasm!(self.a ; .arch x64 ; mov BYTE [Rq(s0)], Rb(s2)),
                (true, 2) => dynasm!(self.a ; .arch x64 ; mov WORD [Rq(s0)], Rw(s2)),
                (true, 4) => dynasm!(self.a ; .arch x64 ; mov DWORD [Rq(s0)], Rd(s2)),
                (true, _) => dynasm!(self.a ; .arch x64 ; mov QWORD [Rq(s0)], Rq(s2)),
            }
            self.misses.push(Miss { label: miss, rip: insn.ip(), scratch: scratch.clone(), flags_saved: false });
        }
        self.string_step(&[6, 7], s1, size);
        self.unspill(&scratch);
    }

    fn indirect_exit(&mut self, rip: u64) {
        let offset = self.a.offset().0;
        let site = self.site(self.exits.len());
        self.a.extend(crate::templates::indirect_exit_stub(site));
        self.exits.push(ExitSite { offset, rip, reason: ExitReason::Indirect, chain_to: None, branch: None });
    }

    /// The linear address (before the segment base) of the memory operand, into `dst`.
    fn address(&mut self, insn: &Instruction, dst: u8, s_rsp: Option<u8>) -> Result<(), Unencodable> {
        let base = insn.memory_base();
        let index = insn.memory_index();
        if matches!(base, Register::RIP | Register::EIP) || (base == Register::None && index == Register::None) {
            let mut ea = insn.memory_displacement64();
            if base == Register::EIP || self.mode.bits != 64 {
                ea &= 0xffff_ffff;
            }
            dynasm!(self.a ; .arch x64 ; mov Rq(dst), QWORD ea as i64);
            return Ok(());
        }
        let swap = |r: Register| match (gpr_number(r), s_rsp) {
            (Some(RSP), Some(s)) => gpr_sized(s, r.size()),
            _ => r,
        };
        let (base, index) = (swap(base), swap(index));
        let addr_size = if base != Register::None { base.size() } else { index.size() };
        let (code, dst_reg, disp) = match addr_size {
            8 => (Code::Lea_r64_m, GPR64[dst as usize], insn.memory_displacement64() as i64),
            4 => (Code::Lea_r32_m, GPR32[dst as usize], insn.memory_displacement32() as i32 as i64),
            _ => return Err(Unencodable),
        };
        // iced wants the displacement size of the address size (or 1 for disp8).
        let displ_size = if disp == 0 {
            0
        } else if i8::try_from(disp).is_ok() {
            1
        } else {
            addr_size as u32
        };
        let mem = MemoryOperand::new(base, index, insn.memory_index_scale(), disp, displ_size, false, Register::None);
        let lea = Instruction::with2(code, dst_reg, mem).map_err(|_| Unencodable)?;
        self.encode(&lea)
    }
}

/// Puts the guest's arithmetic flags aside in the block: SF ZF AF PF CF
/// by `lahf`, OF by `seto` (RAX kept meanwhile). A pushfq/popfq pair did
/// this at about 18 cycles on the host measured (popfq is microcoded, and
/// every return and indirect branch paid it); this costs about one.
fn save_flags(a: &mut VecAssembler<X64Relocation>) {
    dynasm!(a
        ; .arch x64
        ; gs mov QWORD [BtBlock::OFF_SAVED_RAX as i32], rax
        ; lahf
        ; seto al
        ; gs mov WORD [BtBlock::OFF_SAVED_FLAGS as i32], ax
        ; gs mov rax, QWORD [BtBlock::OFF_SAVED_RAX as i32]
    );
}

/// The flags `save_flags` put aside, back in host RFLAGS: `add al, 0x7f`
/// overflows exactly when AL (OF) is 1, then `sahf` sets the rest.
fn restore_flags(a: &mut VecAssembler<X64Relocation>) {
    dynasm!(a
        ; .arch x64
        ; gs mov QWORD [BtBlock::OFF_SAVED_RAX as i32], rax
        ; gs mov ax, WORD [BtBlock::OFF_SAVED_FLAGS as i32]
        ; add al, 0x7f
        ; sahf
        ; gs mov rax, QWORD [BtBlock::OFF_SAVED_RAX as i32]
    );
}

/// The order scratch registers are picked in (without AH..BH in the way).
const SCRATCH_ORDER: [u8; 13] = [11, 10, 9, 8, 6, 7, 5, 3, 12, 13, 14, 0, 2];

/// `count` host registers the instruction does not use, to borrow. The
/// first one is the new memory base; if the instruction names AH..BH it
/// cannot take a REX prefix, so that one is picked among the first eight.
fn pick_scratch(insn: &Instruction, info: &mut InstructionInfoFactory, count: usize, bits: u32) -> Vec<u8> {
    let mut used = 1u16 << RSP;
    for u in info.info(insn).used_registers() {
        if let Some(n) = gpr_number(u.register()) {
            used |= 1 << n;
        }
    }
    let high_byte = (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && is_high_byte(insn.op_register(i)));
    // Never RCX: the soft-TLB probe borrows it on its own (see `probe`);
    // never R15, where 32-bit code keeps RCX meanwhile (`save_rcx`), nor
    // in 32-bit code the registers that hold the probe's tables and masks
    // and guest RSP.
    if bits == 32 {
        used |= [tlb::R32_READ_TABLE, tlb::R32_WRITE_TABLE, tlb::R32_INDEX_MASK, tlb::R32_PAGE_SHIFT, tlb::R32_RSP]
            .iter()
            .fold(0, |m, &r| m | 1 << r);
    }
    let order: &[u8] = if high_byte { &[6, 7, 5, 3, 0, 2, 11, 10, 9, 8, 12, 13, 14] } else { &SCRATCH_ORDER };
    let mut out = Vec::with_capacity(count);
    for &r in order {
        if out.len() == count {
            break;
        }
        if used & (1 << r) == 0 {
            out.push(r);
        }
    }
    out
}

/// Points `insn`'s memory operand at the host address in register `s0`
/// (the linear address, probed; the caller adds the addend as the index):
/// no displacement, no segment.
fn on_host_address(insn: &mut Instruction, s0: u8) {
    insn.set_memory_base(GPR64[s0 as usize]);
    insn.set_memory_displacement64(0);
    insn.set_memory_displ_size(0);
    insn.set_segment_prefix(Register::None);
}

/// Replaces every use of guest RSP (any width) in `insn` by host register `s`.
fn substitute_rsp(insn: &mut Instruction, s: u8) {
    substitute_gpr(insn, RSP, s);
}

/// Replaces every explicit use of GPR `from` (any width) in `insn` by host
/// register `to`.
fn substitute_gpr(insn: &mut Instruction, from: u8, to: u8) {
    for i in 0..insn.op_count() {
        if insn.op_kind(i) == OpKind::Register {
            let r = insn.op_register(i);
            if gpr_number(r) == Some(from) {
                insn.set_op_register(i, gpr_sized(to, r.size()));
            }
        }
    }
    for (get, set) in [
        (Instruction::memory_base as fn(&Instruction) -> Register, Instruction::set_memory_base as fn(&mut Instruction, Register)),
        (Instruction::memory_index, Instruction::set_memory_index),
    ] {
        let r = get(insn);
        if gpr_number(r) == Some(from) {
            set(insn, gpr_sized(to, r.size()));
        }
    }
}

fn writes_rsp(insn: &Instruction, info: &mut InstructionInfoFactory) -> bool {
    info.info(insn).used_registers().iter().any(|u| {
        gpr_number(u.register()) == Some(RSP)
            && !matches!(u.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess)
    })
}

/// Translates the TU at `rip` from `bytes` (the guest code from `rip` on,
/// as far as it is mapped; at most a page and a bit is ever needed). `id`
/// (below 2^24) names the TU in its exits.
pub fn translate(bytes: &[u8], rip: u64, mode: Mode, id: u32) -> Outcome {
    let mut limit = MAX_TU_INSNS;
    loop {
        let tu = plan_tu(bytes, rip, mode, limit);
        if tu.first().is_none_or(|(_, p)| *p == Plan::Stop) {
            return Outcome::Interpret;
        }
        match emit(&tu, rip, mode, id) {
            Ok(ccf) => return Outcome::Ccf(ccf),
            // Instruction k cannot be rewritten: end the TU before it.
            Err(k) if k > 0 => limit = k,
            Err(_) => return Outcome::Interpret,
        }
    }
}

/// Emits a planned TU; `Err(k)` if instruction k cannot be encoded.
fn emit(tu: &[(Instruction, Plan)], rip: u64, mode: Mode, id: u32) -> Result<Ccf, usize> {
    // Room for most CCFs (600 bytes on average in a Linux boot; three
    // labels per probe), so the buffers do not grow a step at a time.
    let a = VecAssembler::new_with_capacity(0, 2048, 0, 0, 64, 0, 64);
    let mut e = Emitter { a, id: id & 0xff_ffff, mode, exits: Vec::new(), misses: Vec::new(), second_ways: Vec::new(), borrowed: Vec::new(), rcx_borrowed: false, rcx_home: false, fpu_loaded: false, loop_pair: None, rcx_in: None, counts: Counts::default() };
    let mut info = InstructionInfoFactory::new();
    let live = live_flags(tu);

    // No check at the entry: a chained jump leaves a TU only through one of
    // its Next stubs, which a kick unchains, and an IBTC transfer counts
    // against the budget a kick zeroes (see `next_exit_code`, `ibtc_lookup`).
    let entry = e.a.offset().0;
    let looped = plan_loop(tu, rip, mode, &mut info);
    let original = tu;
    let mut loop_head = 0;
    if let Some(l) = &looped {
        e.spill(&l.pair);
        e.borrowed = l.pair.to_vec();
        e.loop_pair = Some(l.pair);
        if let Some(x) = l.rcx_in {
            // The guest's RCX moves to `x` for the loop: RCX is the probe's.
            dynasm!(e.a ; .arch x64 ; gs mov QWORD [scratch_off(2)], Rq(x) ; mov Rq(x), rcx);
            e.rcx_in = Some(x);
        } else {
            // RCX's home holds its guest value at the loop's head (see `loop_back`).
            e.save_rcx();
        }
        e.rcx_borrowed = l.keep_rcx;
        loop_head = e.a.offset().0;
    }
    let tu = match &looped {
        Some(l) if l.rcx_in.is_some() => &l.renamed[..],
        _ => tu,
    };

    let mut rip_map = Vec::with_capacity(tu.len());
    let mut ended = false;
    for (k, (insn, plan)) in tu.iter().enumerate() {
        // Borrowed scratch registers go back before anything but another
        // memory access or an instruction that does not name them.
        match plan {
            Plan::Mem | Plan::DivideMem | Plan::Nothing => {}
            Plan::Sse if has_memory_operand(insn) => {}
            // A loop's back edge keeps its registers borrowed (see `loop_back`).
            Plan::Branch(..) if looped.is_some() => {}
            Plan::Ident | Plan::Sse => {
                let regs = info.info(insn).used_registers();
                let used: Vec<u8> = regs.iter().filter_map(|u| gpr_number(u.register())).collect();
                // An instruction that only overwrites all of RCX (a 32-bit
                // write zero-extends) ends its guest value: nothing to give back.
                let overwrites_rcx = regs.iter().filter(|u| gpr_number(u.register()) == Some(1)).all(|u| {
                    matches!(u.register(), Register::ECX | Register::RCX) && u.access() == OpAccess::Write
                });
                // (Guest RSP goes through a scratch register where it lives in the block.)
                let through_scratch = |n: u8| n == RSP && e.resident_rsp().is_none();
                if used.iter().any(|&n| through_scratch(n) || e.borrowed.contains(&n)) {
                    e.release();
                } else if used.contains(&1) && overwrites_rcx {
                    e.rcx_borrowed = false;
                } else if used.contains(&1) {
                    e.release_rcx();
                }
            }
            _ => e.release(),
        }
        rip_map.push((e.a.offset().0 as u32, insn.ip()));
        // Any write to RCX, of any width, leaves RCX's home stale.
        let writes_rcx = info.info(insn).used_registers().iter().any(|u| {
            gpr_number(u.register()) == Some(1) && !matches!(u.access(), OpAccess::Read | OpAccess::CondRead)
        });
        match *plan {
            Plan::Nothing => e.counts.ident += 1,
            Plan::Ident => {
                e.ident(insn, &mut info).map_err(|_| k)?;
                e.counts.ident += 1;
            }
            Plan::Mem => {
                e.mem(insn, &mut info).map_err(|_| k)?;
                e.counts.mem += 1;
            }
            Plan::Sse => {
                e.sse(insn, &mut info).map_err(|_| k)?;
                if has_memory_operand(insn) {
                    e.counts.mem += 1;
                } else {
                    e.counts.ident += 1;
                }
            }
            Plan::Jump(target) => {
                e.counts.control += 1;
                e.exit_next(mask_rip(target, mode));
                ended = true;
            }
            Plan::Branch(cc, target) if looped.is_some() => {
                e.counts.control += 1;
                e.loop_back(insn, cc, mask_rip(target, mode), loop_head, looped.as_ref().is_some_and(|l| l.keep_rcx));
                ended = true;
            }
            Plan::Branch(cc, target) => {
                e.counts.control += 1;
                // jcc rel32 over the fall-through exit to the taken one.
                let fall = e.next_exit_code(mask_rip(insn.next_ip(), mode), e.exits.len());
                let cc = cc as u8 - ConditionCode::o as u8;
                e.bytes(&[0x0f, 0x80 + cc]);
                let branch = e.a.offset().0;
                e.bytes(&(fall.len() as i32).to_le_bytes());
                e.exit_next(mask_rip(insn.next_ip(), mode));
                e.exit_next(mask_rip(target, mode));
                // The taken stub, which the branch lands on directly, is
                // chained by retargeting the branch.
                if let Some(x) = e.exits.last_mut() {
                    debug_assert_eq!(x.offset, branch + 4 + fall.len());
                    x.branch = Some(branch);
                }
                ended = true;
            }
            Plan::CountBranch(target) => {
                e.counts.control += 1;
                // The host's instruction, rel8 over the fall-through exit
                // to the taken one, whose own jump is chained.
                let fall = e.next_exit_code(mask_rip(insn.next_ip(), mode), e.exits.len());
                let (prefix, opcode) = count_branch_bytes(insn, mode).ok_or(k)?;
                if let Some(p) = prefix {
                    e.bytes(&[p]);
                }
                e.bytes(&[opcode, i8::try_from(fall.len()).map_err(|_| k)? as u8]);
                e.exit_next(mask_rip(insn.next_ip(), mode));
                e.exit_next(mask_rip(target, mode));
                ended = true;
            }
            Plan::Push => {
                let size = -insn.stack_pointer_increment();
                if insn.op0_kind() == OpKind::Memory {
                    e.push_mem(insn, size, &mut info).map_err(|_| k)?;
                } else {
                    let value = if insn.op0_kind() == OpKind::Register {
                        Ok(gpr_number(insn.op0_register()).ok_or(k)?)
                    } else {
                        Err(insn.immediate(0) as i64)
                    };
                    if let (Ok(RSP), Some(r)) = (value, e.resident_rsp()) {
                        // The value stored is RSP from before the push.
                        e.push(insn, Ok(r), size, &mut info);
                    } else if value == Ok(RSP) {
                        e.push_from_block(insn, size, size, &mut info, BtBlock::off_gpr(4) as i32);
                    } else {
                        e.push(insn, value, size, &mut info);
                    }
                }
                e.counts.mem += 1;
            }
            Plan::PushSeg => {
                let size = -insn.stack_pointer_increment();
                let off = (BtBlock::OFF_SEG_SEL + seg_index(insn.op0_register()) * 8) as i32;
                e.push_from_block(insn, size, 2, &mut info, off);
                e.counts.mem += 1;
            }
            Plan::Pop => {
                e.pop(insn, insn.op0_register(), &mut info).map_err(|_| k)?;
                e.counts.mem += 1;
            }
            Plan::Leave => {
                e.leave(insn, &mut info);
                e.counts.mem += 1;
            }
            Plan::Call(target) => {
                let size = (mode.bits / 8) as i32;
                e.push(insn, Err(insn.next_ip() as i64), size, &mut info);
                e.counts.control += 1;
                e.exit_next(mask_rip(target, mode));
                ended = true;
            }
            Plan::Ret => {
                e.ret(insn, live[k], &mut info);
                e.counts.control += 1;
                ended = true;
            }
            Plan::IndirectReg => {
                e.indirect_reg(insn, live[k], &mut info).map_err(|_| k)?;
                e.counts.control += 1;
                ended = true;
            }
            Plan::IndirectMem => {
                e.indirect_mem(insn, live[k], &mut info).map_err(|_| k)?;
                e.counts.control += 1;
                ended = true;
            }
            Plan::StringOne => {
                e.string_one(insn, &mut info);
                e.counts.mem += 1;
            }
            Plan::RepString => {
                e.rep_string(insn, &mut info);
                e.counts.mem += 1;
            }
            Plan::RepCompare => {
                e.rep_compare(insn, &mut info);
                e.counts.mem += 1;
            }
            Plan::Divide => {
                e.divide(insn, insn).map_err(|_| k)?;
                e.counts.ident += 1;
            }
            Plan::DivideMem => {
                e.divide_mem(insn, &mut info).map_err(|_| k)?;
                e.counts.mem += 1;
            }
            Plan::BitMem => {
                e.bit_mem(insn, &mut info).map_err(|_| k)?;
                e.counts.mem += 1;
            }
            Plan::Virtual(op) => {
                e.virtual_op(insn, op, &mut info).map_err(|_| k)?;
                e.counts.sensitive += 1;
            }
            Plan::Stop => {
                e.counts.sensitive += 1;
                e.exit(insn.ip(), ExitReason::Interpret);
                ended = true;
            }
        }
        if writes_rcx {
            e.rcx_home = false;
        }
    }
    let last = tu.last().map(|(i, _)| i).copied().unwrap_or_default();
    e.release();
    if !ended {
        e.exit_next(mask_rip(last.next_ip(), mode));
    }
    e.emit_second_ways();
    for m in std::mem::take(&mut e.misses) {
        // Every miss comes from a probe, which put RCX's guest value aside.
        dynasm!(e.a ; .arch x64 ; =>m.label);
        match e.rcx_in {
            Some(x) => dynasm!(e.a ; .arch x64 ; mov rcx, Rq(x) ; gs mov Rq(x), QWORD [scratch_off(2)]),
            None => e.load_rcx(),
        }
        e.unspill(&m.scratch);
        if m.flags_saved {
            restore_flags(&mut e.a);
        }
        e.exit(m.rip, ExitReason::Interpret);
    }
    let guest_bytes = (last.next_ip().wrapping_sub(rip)) as usize;
    let Emitter { a, exits, counts, .. } = e;
    let code = a.finalize().map_err(|_| 0usize)?;
    let treatment = original
        .iter()
        .map(|(i, p)| match p {
            Plan::Nothing | Plan::Ident | Plan::Divide => Treatment::Ident,
            Plan::Sse if !has_memory_operand(i) => Treatment::Ident,
            Plan::Sse => Treatment::Mem,
            Plan::Mem
            | Plan::Push
            | Plan::PushSeg
            | Plan::Pop
            | Plan::Leave
            | Plan::StringOne
            | Plan::RepString
            | Plan::RepCompare
            | Plan::DivideMem
            | Plan::BitMem => Treatment::Mem,
            Plan::Virtual(_) => Treatment::Inline,
            Plan::Jump(_) | Plan::Branch(..) | Plan::CountBranch(_) | Plan::Call(_) | Plan::Ret | Plan::IndirectReg | Plan::IndirectMem => {
                Treatment::Control
            }
            Plan::Stop => Treatment::Callout,
        })
        .collect();
    Ok(Ccf { code, entry, guest: original.iter().map(|(i, _)| *i).collect(), treatment, guest_bytes, counts, exits, rip_map })
}

/// A loop TU: 64-bit code whose conditional branch at the end goes back to
/// its first instruction, with only IDENT and MEM instructions before it
/// that name neither RSP nor `pair`. Its memory accesses all borrow `pair`
/// (and RCX too, with `keep_rcx`, if no instruction names it), spilled once
/// at the entry and given back only when the loop is left: the back edge
/// jumps past the spills. A loop of one TU spilled and restored them every
/// iteration, the most of its memory traffic (the CPU kernel's sieve, an
/// amd64 boot's decompressor). 32-bit code keeps no guest state in its
/// scratch registers: nothing to hoist there.
///
/// RCX, which the probe needs, is renamed where the body names it only
/// explicitly: the guest's RCX lives in `rcx_in` (another register no
/// instruction names, spilled too) for the whole loop, and the body is
/// `renamed`. Otherwise a body that names RCX gives it back and takes it
/// again around each probe.
struct LoopPlan {
    pair: [u8; 2],
    keep_rcx: bool,
    rcx_in: Option<u8>,
    renamed: Vec<(Instruction, Plan)>,
}

fn plan_loop(tu: &[(Instruction, Plan)], rip: u64, mode: Mode, info: &mut InstructionInfoFactory) -> Option<LoopPlan> {
    let ((last, last_plan), body) = tu.split_last()?;
    let loops = matches!(last_plan, Plan::Branch(_, t) if mask_rip(*t, mode) == rip);
    if mode.bits != 64 || !loops || last.ip() == rip {
        return None;
    }
    let mut named = 0u16;
    let mut has_mem = false;
    for (insn, plan) in body {
        match plan {
            Plan::Ident | Plan::Nothing => {}
            Plan::Mem if !needs_alignment(insn) => has_mem = true,
            _ => return None,
        }
        for u in info.info(insn).used_registers() {
            if let Some(n) = gpr_number(u.register()) {
                named |= 1 << n;
            }
        }
        if (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && is_high_byte(insn.op_register(i))) {
            return None;
        }
    }
    if !has_mem || named & (1 << RSP) != 0 {
        return None;
    }
    let mut free = SCRATCH_ORDER.iter().copied().filter(|&r| named & (1 << r) == 0);
    let pair = [free.next()?, free.next()?];
    if named & (1 << 1) == 0 {
        return Some(LoopPlan { pair, keep_rcx: true, rcx_in: None, renamed: Vec::new() });
    }
    let plain = Some(LoopPlan { pair, keep_rcx: false, rcx_in: None, renamed: Vec::new() });
    let Some(x) = free.next() else { return plain };
    let mut renamed = Vec::with_capacity(tu.len());
    for &(insn, plan) in tu {
        let mut copy = insn;
        substitute_gpr(&mut copy, 1, x);
        let implicit = info.info(&copy).used_registers().iter().any(|u| gpr_number(u.register()) == Some(1));
        if implicit || Encoder::new(64).encode(&copy, copy.ip()).is_err() {
            return plain;
        }
        renamed.push((copy, plan));
    }
    Some(LoopPlan { pair, keep_rcx: true, rcx_in: Some(x), renamed })
}

fn mask_rip(rip: u64, mode: Mode) -> u64 {
    if mode.bits == 64 { rip } else { rip & 0xffff_ffff }
}




#[cfg(test)]
mod tests {
    use super::*;

    fn mode(bits: u32) -> Mode {
        Mode { bits, seg_base_mask: if bits == 64 { 0 } else { 1 << seg::FS }, seg_usable_mask: 0x3d, stack_bits: bits, cpl0: true, sse: true, avx: true, fp_masked: true, x87: true, tlb_tables: None }
    }

    /// A small deterministic generator (xorshift), so failures reproduce.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// Host instructions in a CCF that may touch host RSP: only the call
    /// of the SSE load routine (which returns). Flags are put aside in the
    /// block, never pushed.
    fn check_host_code(ccf: &Ccf, what: &str) {
        let mut info = InstructionInfoFactory::new();
        let mut d = Decoder::with_ip(64, &ccf.code, 0, DecoderOptions::NONE);
        for i in &mut d {
            assert!(!i.is_invalid(), "{what}: invalid host code at {:#x}", i.ip());
            let fpu_enter = i.mnemonic() == Mnemonic::Call
                && i.segment_prefix() == Register::GS
                && i.memory_displacement64() == BtBlock::OFF_FPU_ENTER as u64;
            if fpu_enter {
                continue;
            }
            let writes_rsp = info.info(&i).used_registers().iter().any(|u| {
                u.register().full_register() == Register::RSP
                    && !matches!(u.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess)
            });
            assert!(!writes_rsp, "{what}: host code writes RSP: {i} at {:#x}", i.ip());
            // Memory is touched only through GS (the block) or a probed
            // scratch register, never through guest registers with a
            // segment of the guest's.
            if i.op_count() > 0 && (0..i.op_count()).any(|k| i.op_kind(k) == OpKind::Memory) && i.mnemonic() != Mnemonic::Lea {
                assert!(
                    i.segment_prefix() == Register::GS || i.memory_displacement64() < 0x1_0000 || i.memory_base() != Register::None,
                    "{what}: absolute memory access {i}"
                );
            }
        }
    }

    /// `shl byte [m], cl` with CL = 0x40 leaves the flags as they were, so
    /// they are live across the probe of an earlier memory access (found by
    /// the differential test: the probe's flags leaked through the shift).
    #[test]
    fn prefetches_are_nothing_to_do() {
        // prefetcht0 [rax]; prefetchw [rbx+8]; prefetchnta [rip+0x10]; nop
        let bytes = [0x0f, 0x18, 0x08, 0x0f, 0x0d, 0x4b, 0x08, 0x0f, 0x18, 0x05, 0x10, 0, 0, 0, 0x90];
        for bits in [32, 64] {
            let tu = plan_tu(&bytes, 0x1000, mode(bits), MAX_TU_INSNS);
            assert_eq!(tu.len(), 4, "{bits}-bit");
            assert!(tu.iter().all(|(_, p)| *p == Plan::Nothing), "{bits}-bit: {:?}", tu.iter().map(|(_, p)| p).collect::<Vec<_>>());
        }
    }

    #[test]
    fn shift_by_cl_keeps_flags_live() {
        // movbe r10w, [r15]; shl r13w, cl
        let bytes = [0x66, 0x45, 0x0f, 0x38, 0xf0, 0x17, 0x66, 0x41, 0xd3, 0xe5];
        let tu = plan_tu(&bytes, 0x1000, mode(64), MAX_TU_INSNS);
        assert_eq!(tu.len(), 2);
        assert_eq!(live_flags(&tu)[0], ARITH_FLAGS);
        // shl r13w, 4 writes them: dead before it.
        let bytes = [0x66, 0x45, 0x0f, 0x38, 0xf0, 0x17, 0x66, 0x41, 0xc1, 0xe5, 0x04, 0x90];
        let tu = plan_tu(&bytes, 0x1000, mode(64), MAX_TU_INSNS);
        assert_eq!(live_flags(&tu)[0] & ARITH_FLAGS & !RflagsBits::AF, 0);
    }

    /// Flags an instruction overwrites are still live before it if it may
    /// fault first: `movbe bx, [m]; mov ah, 0; div ah` must keep the flags
    /// across the movbe's probe, since the div's #DE shows them (found by
    /// the differential test).
    #[test]
    fn flags_are_live_before_an_instruction_that_may_fault() {
        let bytes = [0x66, 0x41, 0x0f, 0x38, 0xf0, 0x5f, 0x24, 0xb4, 0x00, 0xf6, 0xf4];
        let tu = plan_tu(&bytes, 0x1000, mode(64), MAX_TU_INSNS);
        assert_eq!(tu.len(), 3);
        assert_eq!(tu[2].1, Plan::Divide);
        assert_eq!(live_flags(&tu)[0], ARITH_FLAGS);
        // With an add (which cannot fault) instead of the div, they are dead.
        let bytes = [0x66, 0x41, 0x0f, 0x38, 0xf0, 0x5f, 0x24, 0x01, 0xc3, 0x90];
        let tu = plan_tu(&bytes, 0x1000, mode(64), MAX_TU_INSNS);
        assert_eq!(live_flags(&tu)[0], 0);
    }

    #[test]
    fn guest_rsp_never_becomes_host_rsp() {
        // lea rsp, [rip+0x100]; mov rsp, rax; and rsp, -16; lea rsp, [rsp+8]; xchg rsp, rbx
        let bytes = [0x48, 0x8d, 0x25, 0, 1, 0, 0, 0x48, 0x89, 0xc4, 0x48, 0x83, 0xe4, 0xf0, 0x48, 0x8d, 0x64, 0x24, 0x08, 0x48, 0x87, 0xdc];
        let Outcome::Ccf(ccf) = translate(&bytes, 0x1000, mode(64), 1) else { panic!("not translated") };
        assert_eq!(ccf.guest.len(), 5);
        check_host_code(&ccf, "rsp writes");
    }

    /// Random bytes in both code sizes: whatever the translator makes of
    /// them keeps to the ABI (never host RSP, balanced flag saves, valid code).
    #[test]
    fn random_code_keeps_the_abi() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut translated = 0;
        for n in 0..4000 {
            let bits = if n % 2 == 0 { 64 } else { 32 };
            let bytes: Vec<u8> = (0..64).map(|_| rng.next() as u8).collect();
            if let Outcome::Ccf(ccf) = translate(&bytes, 0x40_0000 + n, mode(bits), n as u32) {
                translated += 1;
                check_host_code(&ccf, &format!("{bits}-bit {bytes:02x?}"));
                assert!(ccf.guest.len() <= MAX_TU_INSNS);
            }
        }
        assert!(translated > 1000, "only {translated} TUs translated");
    }
}
