//! Differential tests: instruction sequences run on the host CPU and on an
//! executor under test must agree (see `difftest/mod.rs`).
//!
//! Until the interpreter's adapter exists, the harness proves itself: the
//! host against itself over the whole generated corpus (>100,000
//! instructions), a tiny reference executor for add/sub/xor against the host,
//! and a deliberately wrong executor that must be caught and printed.

mod difftest;

use difftest::compare::decode;
use difftest::machine::*;
use difftest::interp::InterpAdapter;
use difftest::native::NativeExecutor;
use difftest::runner::{run_differential, Config, Report};
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

/// Runs the full corpus of `exec` against the host and fails with the
/// mismatch reports. The interpreter's test will be:
///
/// ```ignore
/// #[test]
/// fn interpreter_matches_host() {
///     check_against_host(&mut InterpAdapter::new());
/// }
/// ```
fn check_against_host(exec: &mut dyn Executor) -> Report {
    let mut host = NativeExecutor::new().expect("native executor");
    let report = run_differential(exec, &mut host, &Config::full());
    println!("{}", report.summary());
    for r in &report.reports {
        println!("{r}");
    }
    assert_eq!(report.errors, 0, "executor errors");
    assert_eq!(report.mismatches, 0, "mismatches (reports above)");
    report
}

#[test]
fn host_agrees_with_itself_over_the_full_corpus() {
    let mut second = NativeExecutor::new().expect("native executor");
    let report = check_against_host(&mut second);
    assert!(report.instructions >= 100_000, "only {} instructions", report.instructions);
    // The generators keep every access inside the window: no #PF, no #GP.
    assert_eq!(report.faults.get(&14), None, "a sequence touched memory outside the window");
    assert_eq!(report.faults.get(&13), None, "a sequence raised #GP");
}

#[test]
fn reference_agrees_with_host_on_add_sub_xor() {
    let mut host = NativeExecutor::new().expect("native executor");
    let mut reference = Reference { bug: None };
    let report = run_differential(&mut reference, &mut host, &small_config());
    println!("{}", report.summary());
    assert_eq!(report.reports, Vec::<String>::new());
    assert!(report.instructions > 1000);
}

#[test]
fn wrong_executor_is_detected_and_its_sequence_printed() {
    let mut host = NativeExecutor::new().expect("native executor");
    // A classic bug: 32-bit results not zero-extended into the 64-bit register.
    let mut wrong = Reference { bug: Some(Bug::NoZeroExtension) };
    let report = run_differential(&mut wrong, &mut host, &small_config());
    println!("{}", report.summary());
    assert!(report.mismatches > 0);
    let shrunk = report.reports.iter().find(|r| r.starts_with("random sequence")).expect("a shrunk random case");
    println!("{shrunk}");
    assert!(shrunk.contains("sequence ("), "disassembly printed");
    assert!(shrunk.contains("initial state"), "initial state printed");
    assert!(shrunk.contains(": expected 0x"), "register diff printed");
    assert!(shrunk.contains("d,") || shrunk.contains("d "), "a 32-bit instruction printed");
}

#[test]
fn wrong_flag_is_detected_where_defined_only() {
    let mut host = NativeExecutor::new().expect("native executor");
    let mut wrong = Reference { bug: Some(Bug::NoAuxCarry) };
    let report = run_differential(&mut wrong, &mut host, &small_config());
    assert!(report.mismatches > 0);
    let shrunk = report.reports.last().expect("a report");
    println!("{shrunk}");
    assert!(shrunk.contains("rflags: expected"), "flag diff printed");
    // xor leaves AF undefined: a missing AF there must not count.
    assert!(!shrunk.contains("xor "), "xor's undefined AF was compared");
}

#[test]
fn host_faults_are_reported_by_vector_and_rip() {
    use iced_x86::code_asm::*;
    type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;
    let cases: [(Asm, u8, u64); 4] = [
        (|a| { a.xor(ecx, ecx)?; a.div(rcx) }, 0, 2),
        (|a| { a.nop()?; a.ud2() }, 6, 1),
        (|a| { a.int3()?; a.nop() }, 3, 1),
        (|a| a.cmpxchg16b(xmmword_ptr(r15 + 8)), 13, 0),
    ];
    let mut host = NativeExecutor::new().expect("native executor");
    for (asm, vector, rip_offset) in cases {
        let mut a = CodeAssembler::new(64).unwrap();
        asm(&mut a).unwrap();
        let code = a.assemble(CODE_ADDR).unwrap();
        let case = difftest::runner::initial_case(code, 7);
        let mut window = case.window.clone();
        let outcome = host.run(&case.code, CODE_ADDR, &case.init, &mut window).unwrap();
        match outcome {
            Outcome::Fault { vector: v, rip_offset: r, state } => {
                assert_eq!((v, r), (vector, rip_offset));
                assert_eq!(state.gpr[R15], DATA_BASE);
            }
            other => panic!("expected a fault, got {other:?}"),
        }
    }
    // The child survived all of them.
    assert_eq!(host.spawns, 1);
}

#[test]
fn undefined_flag_before_a_reader_gets_defined_first() {
    use difftest::sequence::sanitize_flags;
    let bsf = Instruction::with2(Code::Bsf_r64_rm64, Register::RAX, Register::RBX).unwrap();
    let adc = Instruction::with2(Code::Adc_rm64_r64, Register::RCX, Register::RDX).unwrap();
    let out = sanitize_flags(vec![bsf, adc], &mut difftest::rng::Rng::new(1));
    let mnemonics: Vec<Mnemonic> = out.iter().map(|i| i.mnemonic()).collect();
    assert_eq!(mnemonics, [Mnemonic::Bsf, Mnemonic::Cmp, Mnemonic::Adc]);
}

fn small_config() -> Config {
    Config {
        variants: 8,
        random_cases: 300,
        keep: |c| {
            matches!(c.mnemonic(), Mnemonic::Add | Mnemonic::Sub | Mnemonic::Xor)
                && matches!(c.op_code().operand_size(), 32 | 64)
                && c.op_code().op_kinds().iter().all(|k| !format!("{k:?}").starts_with("imm"))
        },
        compounds: false,
        // The reference executor leaves undefined flags as they come.
        all_flags: false,
        ..Config::full()
    }
}

/// A reference executor for `add`, `sub` and `xor` on 32/64-bit registers
/// and memory: u64 arithmetic and the SDM's flag definitions.
struct Reference {
    bug: Option<Bug>,
}

/// Deliberate bugs, to prove the harness catches them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Bug {
    /// 32-bit results keep the register's upper half.
    NoZeroExtension,
    /// AF is never set.
    NoAuxCarry,
}

impl Executor for Reference {
    fn name(&self) -> &str {
        if self.bug.is_none() { "reference" } else { "wrong-reference" }
    }

    fn run(&mut self, code: &[u8], _: u64, init: &MachineState, window: &mut [u8]) -> Result<Outcome, ExecutorError> {
        let mut st = *init;
        let instrs = decode(code);
        for ins in &instrs {
            self.step(ins, &mut st, window)?;
        }
        Ok(Outcome::Completed { state: st, retired: Some(instrs.len() as u64) })
    }
}

impl Reference {
    fn step(&self, ins: &Instruction, st: &mut MachineState, window: &mut [u8]) -> Result<(), ExecutorError> {
        let bits = if ins.op0_kind() == OpKind::Register { ins.op0_register().size() * 8 } else { ins.memory_size().size() * 8 };
        let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
        let a = read(ins, 0, st, window) & mask;
        let b = read(ins, 1, st, window) & mask;
        let sign = 1u64 << (bits - 1);
        let (r, cf, of) = match ins.mnemonic() {
            Mnemonic::Add => { let r = a.wrapping_add(b) & mask; (r, r < a, (a ^ r) & (b ^ r) & sign != 0) }
            Mnemonic::Sub => { let r = a.wrapping_sub(b) & mask; (r, a < b, (a ^ b) & (a ^ r) & sign != 0) }
            Mnemonic::Xor => (a ^ b, false, false),
            _ => return Err(ExecutorError::Unsupported(format!("{ins}"))),
        };
        let mut f = st.rflags & !rflags::ARITH;
        let set = |f: &mut u64, bit: u64, on: bool| if on { *f |= bit };
        set(&mut f, rflags::CF, cf);
        set(&mut f, rflags::OF, of);
        set(&mut f, rflags::ZF, r == 0);
        set(&mut f, rflags::SF, r & sign != 0);
        set(&mut f, rflags::PF, (r as u8).count_ones().is_multiple_of(2));
        set(&mut f, rflags::AF, (a ^ b ^ r) & 0x10 != 0 && self.bug != Some(Bug::NoAuxCarry));
        st.rflags = f;
        if ins.mnemonic() != Mnemonic::Cmp {
            write(ins, r, bits, self.bug != Some(Bug::NoZeroExtension), st, window);
        }
        Ok(())
    }
}

fn gpr_index(r: Register) -> usize {
    r.full_register() as usize - Register::RAX as usize
}

fn mem_offset(ins: &Instruction, op: u32, st: &MachineState) -> usize {
    let addr = ins
        .virtual_address(op, 0, |reg, _, _| {
            if reg.is_segment_register() {
                return Some(0);
            }
            Some(st.gpr[gpr_index(reg)] & if reg.size() == 4 { 0xffff_ffff } else { u64::MAX })
        })
        .expect("address");
    (addr - WINDOW_ADDR) as usize
}

fn read(ins: &Instruction, op: u32, st: &MachineState, window: &[u8]) -> u64 {
    match ins.op_kind(op) {
        OpKind::Register => st.gpr[gpr_index(ins.op_register(op))],
        _ => {
            let o = mem_offset(ins, op, st);
            u64::from_le_bytes(window[o..o + 8].try_into().unwrap())
        }
    }
}

fn write(ins: &Instruction, value: u64, bits: usize, zero_extends: bool, st: &mut MachineState, window: &mut [u8]) {
    match ins.op0_kind() {
        OpKind::Register => {
            let slot = &mut st.gpr[gpr_index(ins.op0_register())];
            *slot = if bits == 32 && !zero_extends { (*slot & !0xffff_ffff) | value } else { value };
        }
        _ => {
            let o = mem_offset(ins, 0, st);
            window[o..o + bits / 8].copy_from_slice(&value.to_le_bytes()[..bits / 8]);
        }
    }
}


#[test]
fn host_survives_a_sequence_that_kills_its_child() {
    use iced_x86::code_asm::*;
    let mut host = NativeExecutor::new().expect("native executor");
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(eax, 60).unwrap(); // exit(2): not a fault, the child just goes away
    a.syscall().unwrap();
    let exit = difftest::runner::initial_case(a.assemble(CODE_ADDR).unwrap(), 1);
    let mut window = exit.window.clone();
    assert!(host.run(&exit.code, CODE_ADDR, &exit.init, &mut window).is_err());
    let nop = difftest::runner::initial_case(vec![0x90], 1);
    let outcome = host.run(&nop.code, CODE_ADDR, &nop.init, &mut window).expect("respawned");
    assert!(matches!(outcome, Outcome::Completed { .. }));
    assert_eq!(host.spawns, 2);
}

#[test]
fn host_times_out_on_an_endless_loop_and_recovers() {
    use iced_x86::code_asm::*;
    let mut host = NativeExecutor::new().expect("native executor");
    let mut a = CodeAssembler::new(64).unwrap();
    let mut top = a.create_label();
    a.set_label(&mut top).unwrap();
    a.jmp(top).unwrap();
    let spin = difftest::runner::initial_case(a.assemble(CODE_ADDR).unwrap(), 1);
    let mut window = spin.window.clone();
    let err = host.run(&spin.code, CODE_ADDR, &spin.init, &mut window).unwrap_err();
    assert!(matches!(err, ExecutorError::Timeout(_)), "{err}");
    let nop = difftest::runner::initial_case(vec![0x90], 1);
    assert!(host.run(&nop.code, CODE_ADDR, &nop.init, &mut window).is_ok());
}


#[test]
fn interpreter_matches_host() {
    let report = check_against_host(&mut InterpAdapter::new());
    assert!(report.instructions >= 100_000, "only {} instructions", report.instructions);
}

/// The same corpus (memory operands in the window, stack, string and
/// control-flow compounds included) translated: the host, the interpreter
/// (above) and the translator all agree.
#[test]
fn translator_matches_host() {
    let mut bt = InterpAdapter::translator();
    let report = check_against_host(&mut bt);
    assert!(report.instructions >= 100_000, "only {} instructions", report.instructions);
}
