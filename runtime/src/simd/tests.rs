//! Differential tests: each instruction is written once as assembly text; rustc's
//! assembler turns it into (a) a native oracle function that loads a machine state,
//! runs the instruction and saves the state, and (b) the instruction bytes, which
//! are decoded by iced-x86 and run through the executor from the same state. The
//! results must agree bit for bit: XSAVE image, GPRs, arithmetic flags, memory.

mod cases;
mod exceptions;

use std::arch::asm;

use iced_x86::{Decoder, DecoderOptions, Instruction};

use super::state::{normalize_after_save, HostXsave, XsaveArea, OFF_FSW, OFF_FTW, OFF_ST0};
use super::{memory_access, Access, FpuState, SimdExecutor, SimdOutcome};

/// Memory operand buffer of a test (FNSAVE needs 108 bytes).
const BUF: usize = 128;
const RSI: usize = 6;
const RDI: usize = 7;
const ARITH_FLAGS: u64 = 0x8d5;

/// Native machine state, laid out for the oracle's assembly (offsets are literal there).
#[repr(C, align(64))]
pub(super) struct Machine {
    area: XsaveArea,   // 0
    gpr: [u64; 16],    // 1024
    rflags: u64,       // 1152
    rfbm: u64,         // 1160
    host_mxcsr: u32,   // 1168
    host_fcw: u16,     // 1172
}

/// One instruction: its oracle and its bytes.
pub(super) struct Native {
    pub text: &'static str,
    pub run: fn(*mut Machine),
    pub bytes: &'static [u8],
}

/// Builds a [`Native`] from Intel-syntax text. The instruction must not use RBX or RSP
/// (the oracle's own), nor write RSI/RDI (memory operands are `[rsi]`; MASKMOV* use RDI).
macro_rules! native {
    ($insn:literal) => {{
        fn run(machine: *mut $crate::simd::tests::Machine) {
            // SAFETY: `machine` points at a live, 64-byte aligned Machine whose XSAVE
            // image is valid for its `rfbm`; the oracle restores RBX/RBP (pushed),
            // declares every other register it changes, and restores the host MXCSR
            // and x87 control word. RSI/RDI point at the test's buffer.
            unsafe {
                std::arch::asm!(
                    "push rbx", "push rbp", "mov rbx, rdi",
                    "stmxcsr [rbx + 1168]", "fnstcw [rbx + 1172]",
                    "mov eax, [rbx + 1160]", "xor edx, edx", "xrstor64 [rbx]",
                    "mov rax, [rbx + 1024]", "mov rcx, [rbx + 1032]", "mov rdx, [rbx + 1040]",
                    "mov rbp, [rbx + 1064]", "mov rsi, [rbx + 1072]", "mov rdi, [rbx + 1080]",
                    "mov r8, [rbx + 1088]", "mov r9, [rbx + 1096]", "mov r10, [rbx + 1104]",
                    "mov r11, [rbx + 1112]", "mov r12, [rbx + 1120]", "mov r13, [rbx + 1128]",
                    "mov r14, [rbx + 1136]", "mov r15, [rbx + 1144]",
                    "push qword ptr [rbx + 1152]", "popfq",
                    $insn,
                    "pushfq", "pop qword ptr [rbx + 1152]",
                    "mov [rbx + 1024], rax", "mov [rbx + 1032], rcx", "mov [rbx + 1040], rdx",
                    "mov [rbx + 1064], rbp", "mov [rbx + 1072], rsi", "mov [rbx + 1080], rdi",
                    "mov [rbx + 1088], r8", "mov [rbx + 1096], r9", "mov [rbx + 1104], r10",
                    "mov [rbx + 1112], r11", "mov [rbx + 1120], r12", "mov [rbx + 1128], r13",
                    "mov [rbx + 1136], r14", "mov [rbx + 1144], r15",
                    "mov eax, [rbx + 1160]", "xor edx, edx", "xsave64 [rbx]",
                    "fninit", "ldmxcsr [rbx + 1168]", "fldcw [rbx + 1172]",
                    "pop rbp", "pop rbx",
                    in("rdi") machine,
                    clobber_abi("C"),
                    out("r12") _, out("r13") _, out("r14") _, out("r15") _,
                );
            }
        }
        fn bytes() -> &'static [u8] {
            let (start, end): (usize, usize);
            // SAFETY: only computes two label addresses and jumps over the
            // instruction, which is never executed here.
            unsafe {
                std::arch::asm!(
                    "lea {s}, [rip + 2f]", "lea {e}, [rip + 3f]", "jmp 3f", "2:", $insn, "3:",
                    s = out(reg) start, e = out(reg) end, options(nostack),
                );
            }
            // SAFETY: [start, end) is this function's own code, mapped readable for
            // the life of the program.
            unsafe { std::slice::from_raw_parts(start as *const u8, end - start) }
        }
        $crate::simd::tests::Native { text: $insn, run, bytes: bytes() }
    }};
}
pub(super) use native;

/// Host features a case needs beyond SSE4.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    Base,
    Avx,
    Avx2,
    Fma,
    F16c,
    Aes,
    Pclmul,
}

impl Need {
    fn available(self) -> bool {
        use std::arch::is_x86_feature_detected as has;
        let avx_state = FpuState::supported_xcr0() & super::XCR0_AVX != 0;
        match self {
            Need::Base => true,
            Need::Avx => avx_state && has!("avx"),
            Need::Avx2 => avx_state && has!("avx2"),
            Need::Fma => avx_state && has!("fma"),
            Need::F16c => avx_state && has!("f16c"),
            Need::Aes => has!("aes"),
            Need::Pclmul => has!("pclmulqdq"),
        }
    }
}

/// Deterministic pseudo-random source (xorshift64*).
pub(super) struct Rng(u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn float(&mut self) -> f64 {
        (self.next() % 2_000_001) as f64 / 1000.0 - 1000.0
    }
}

/// 80-bit extended encoding of a normal or zero f64.
pub(super) fn f80(x: f64) -> [u8; 10] {
    let bits = x.to_bits();
    let sign = ((bits >> 63) as u16) << 15;
    let exp = ((bits >> 52) & 0x7ff) as u16;
    let frac = bits & ((1 << 52) - 1);
    let (exp80, mant) = if exp == 0 { (0, 0) } else { (exp - 1023 + 16383, (1 << 63) | (frac << 11)) };
    let mut out = [0; 10];
    out[..8].copy_from_slice(&mant.to_le_bytes());
    out[8..].copy_from_slice(&(sign | exp80).to_le_bytes());
    out
}

/// The state a case starts from.
#[derive(Debug, Clone)]
pub(super) struct Setup {
    pub seed: u64,
    pub mxcsr: u32,
    pub fcw: u16,
    /// x87 stack contents from ST0 (TOP = 0), tags set for these only.
    pub x87: Vec<f64>,
}

impl Setup {
    pub fn seeded(seed: u64) -> Setup {
        let mut rng = Rng(seed * 0x9e37_79b9 + 1);
        let x87 = (0..4).map(|_| rng.float()).collect();
        Setup { seed, mxcsr: 0x1f80, fcw: 0x037f, x87 }
    }
}

/// A filled machine: FPU state, GPRs (RSI/RDI = buffer), flags, memory buffer.
pub(super) struct Start {
    pub fpu: FpuState,
    pub gpr: [u64; 16],
    pub rflags: u64,
    pub buf: Box<Aligned>,
}

#[repr(C, align(64))]
#[derive(Clone)]
pub(super) struct Aligned(pub [u8; BUF]);

fn fill_vectors(area: &mut [u8], rng: &mut Rng, avx_offset: Option<usize>) {
    let mut offsets: Vec<usize> = (0..16).map(|i| 160 + 16 * i).collect();
    if let Some(off) = avx_offset {
        offsets.extend((0..16).map(|i| off + 16 * i));
    }
    for (n, off) in offsets.into_iter().enumerate() {
        for lane in 0..2 {
            let at = off + 8 * lane;
            let value = match n % 3 {
                0 => (rng.float() as f32).to_bits() as u64 | (((rng.float() as f32).to_bits() as u64) << 32),
                1 => rng.float().to_bits(),
                _ => rng.next(),
            };
            area[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
    }
}

impl Start {
    pub fn new(setup: &Setup) -> Start {
        let mut rng = Rng(setup.seed.wrapping_mul(0x1000_0001) ^ 0x5555);
        let mut fpu = FpuState::new();
        fpu.set_xcr0(FpuState::supported_xcr0()).expect("supported XCR0");
        let host = HostXsave::get().expect("host has XSAVE");
        let avx = (fpu.xcr0() & super::XCR0_AVX != 0).then_some(host.avx_offset);
        fill_vectors(fpu.area_mut(), &mut rng, avx);
        fpu.set_mxcsr(setup.mxcsr);
        let area = fpu.area_mut();
        area[0..2].copy_from_slice(&setup.fcw.to_le_bytes());
        area[OFF_FSW..OFF_FSW + 2].copy_from_slice(&0u16.to_le_bytes());
        area[OFF_FTW] = ((1u16 << setup.x87.len()) - 1) as u8;
        for (i, &x) in setup.x87.iter().enumerate() {
            area[OFF_ST0 + 16 * i..OFF_ST0 + 16 * i + 10].copy_from_slice(&f80(x));
        }
        let mut buf = Box::new(Aligned([0; BUF]));
        for chunk in buf.0.chunks_mut(8) {
            chunk.copy_from_slice(&rng.next().to_le_bytes());
        }
        let mut gpr = [0u64; 16];
        for (i, g) in gpr.iter_mut().enumerate() {
            *g = if i % 2 == 0 { rng.next() } else { rng.next() % 64 };
        }
        gpr[RSI] = buf.0.as_ptr() as u64;
        gpr[RDI] = buf.0.as_ptr() as u64;
        let rflags = 0x2 | (rng.next() & ARITH_FLAGS);
        Start { fpu, gpr, rflags, buf }
    }
}

/// What both sides produced.
#[derive(Debug, PartialEq)]
pub(super) struct Outcome {
    area: Vec<u8>,
    gpr: [u64; 16],
    flags: u64,
    mem: Vec<u8>,
}

pub(super) fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
    let insn = Decoder::new(bitness, bytes, DecoderOptions::NONE).decode();
    assert_eq!(insn.len(), bytes.len(), "decoding {bytes:02x?}");
    insn
}

fn x87_pointer_fields(insn: &Instruction) -> Option<std::ops::Range<usize>> {
    super::classify::x87_pointer_fields(insn.code())
}

/// Runs the oracle on `start`.
fn run_native(case: &Native, start: &Start, insn: &Instruction) -> Outcome {
    let mut machine = Box::new(Machine {
        area: XsaveArea::zeroed(),
        gpr: start.gpr,
        rflags: start.rflags,
        rfbm: start.fpu.xcr0(),
        host_mxcsr: 0,
        host_fcw: 0,
    });
    let size = start.fpu.xsave_size();
    machine.area.0[..size].copy_from_slice(start.fpu.area());
    let mut buf = start.buf.clone();
    machine.gpr[RSI] = buf.0.as_ptr() as u64;
    machine.gpr[RDI] = buf.0.as_ptr() as u64;
    (case.run)(&mut *machine);
    normalize_after_save(&mut machine.area, start.fpu.xcr0(), HostXsave::get().expect("host"));
    let len = memory_access(insn).map_or(0, |m| m.0);
    if let Some(range) = x87_pointer_fields(insn) {
        buf.0[range].fill(0);
    }
    assert_eq!(&buf.0[len..], &start.buf.0[len..], "{}: wrote past its {len}-byte operand", case.text);
    let mut gpr = machine.gpr;
    gpr[RSI] = start.gpr[RSI];
    gpr[RDI] = start.gpr[RDI];
    Outcome { area: machine.area.0[..size].to_vec(), gpr, flags: machine.rflags & ARITH_FLAGS, mem: buf.0[..len].to_vec() }
}

/// Runs the executor on `start`, asserting that the non-arithmetic flags survive.
pub(super) fn run_executor(exec: &mut SimdExecutor, insn: &Instruction, start: &Start) -> (SimdOutcome, Outcome) {
    let mut fpu = start.fpu.clone();
    let mut gpr = start.gpr;
    let mut rflags = start.rflags | 0x600; // IF and DF belong to the caller
    let (len, access) = memory_access(insn).unwrap_or((0, Access::Read));
    let mut mem = start.buf.0[..len].to_vec();
    if access == Access::Write {
        mem.fill(0xcc); // a caller does not read a write-only operand
    }
    let outcome = exec.execute(insn, &mut gpr, &mut rflags, &mut fpu, &mut mem, start.buf.0.as_ptr() as u64);
    assert_eq!(rflags & !ARITH_FLAGS, 0x602);
    let result = Outcome { area: fpu.area().to_vec(), gpr, flags: rflags & ARITH_FLAGS, mem };
    (outcome, result)
}

/// Compares executor and oracle on `case` from `setup`; returns a description of
/// the first difference.
pub(super) fn compare(exec: &mut SimdExecutor, case: &Native, setup: &Setup) -> Result<(), String> {
    compare_with(exec, &decode(64, case.bytes), case, setup)
}

/// As [`compare`], running `insn` (e.g. a 32-bit guest encoding) in the executor and
/// `case` natively.
pub(super) fn compare_with(exec: &mut SimdExecutor, insn: &Instruction, case: &Native, setup: &Setup) -> Result<(), String> {
    let insn = *insn;
    let start = Start::new(setup);
    let expected = run_native(case, &start, &insn);
    let (outcome, actual) = run_executor(exec, &insn, &start);
    if outcome != SimdOutcome::Done {
        return Err(format!("{}: executor returned {outcome:?}", case.text));
    }
    if let Some(at) = (0..expected.area.len()).find(|&i| expected.area[i] != actual.area[i]) {
        return Err(format!(
            "{} (seed {}): XSAVE byte {at}: native {:02x?} executor {:02x?}",
            case.text,
            setup.seed,
            &expected.area[at & !15..(at & !15) + 16],
            &actual.area[at & !15..(at & !15) + 16]
        ));
    }
    if expected != actual {
        return Err(format!("{} (seed {}): native {:x?} executor {:x?}", case.text, setup.seed, (expected.gpr, expected.flags, &expected.mem), (actual.gpr, actual.flags, &actual.mem)));
    }
    Ok(())
}

/// Runs every available case from a few seeds; reports all failures at once.
pub(super) fn check_all(cases: &[(Need, Native)]) {
    check_all_with(cases, &[1, 2, 3], |_| {});
}

pub(super) fn check_all_with(cases: &[(Need, Native)], seeds: &[u64], tweak: impl Fn(&mut Setup)) {
    let mut exec = SimdExecutor::new().expect("executor");
    let mut failures = Vec::new();
    let mut skipped = 0;
    for (need, case) in cases {
        if !need.available() {
            skipped += 1;
            continue;
        }
        for &seed in seeds {
            let mut setup = Setup::seeded(seed);
            tweak(&mut setup);
            if let Err(failure) = compare(&mut exec, case, &setup) {
                failures.push(failure);
            }
        }
    }
    if skipped > 0 {
        eprintln!("skipped {skipped} cases the host cannot run");
    }
    assert!(failures.is_empty(), "{} failures:\n{}", failures.len(), failures.join("\n"));
}

/// Reads the host's MXCSR and x87 control word.
pub(super) fn host_control_words() -> (u32, u16) {
    let mut mxcsr = 0u32;
    let mut fcw = 0u16;
    // SAFETY: stores the two control registers into the two locals.
    unsafe {
        asm!("stmxcsr [{}]", "fnstcw [{}]", in(reg) &mut mxcsr, in(reg) &mut fcw, options(nostack));
    }
    (mxcsr, fcw)
}
