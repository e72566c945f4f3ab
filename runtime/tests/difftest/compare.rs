//! Comparing two runs of one sequence, and printing a mismatch so that it can
//! be read without the harness: disassembly (with the flags undefined before
//! each instruction), the initial state, both outcomes and the differences.

use std::fmt::Write;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use super::flags::undefined_masks;
use super::machine::*;

/// One sequence with the state it starts from.
#[derive(Clone, Debug)]
pub struct Case {
    pub code: Vec<u8>,
    pub init: MachineState,
    pub window: Vec<u8>,
}

/// What an executor did with a case: its outcome and the final window.
#[derive(Clone, Debug)]
pub struct Run {
    pub outcome: Outcome,
    pub window: Vec<u8>,
}

pub fn decode(code: &[u8]) -> Vec<Instruction> {
    Decoder::with_ip(64, code, CODE_ADDR, DecoderOptions::NONE).into_iter().collect()
}

/// Index of the instruction a RIP offset designates (its start at or before).
fn index_at(instrs: &[Instruction], rip_offset: u64) -> usize {
    let rip = CODE_ADDR.wrapping_add(rip_offset);
    instrs.iter().position(|i| i.ip() >= rip).unwrap_or(instrs.len())
}

/// Instructions of the case that ran (all of them, or up to the fault; a
/// static count: skipped branch bodies count, rep iterations count once).
pub fn executed(instrs: &[Instruction], outcome: &Outcome) -> u64 {
    match outcome {
        Outcome::Completed { retired: Some(n), .. } => *n,
        Outcome::Completed { .. } => instrs.len() as u64,
        Outcome::Fault { rip_offset, .. } => index_at(instrs, *rip_offset) as u64 + 1,
    }
}

/// The differences between `expected` (the oracle) and `actual`; empty if
/// they agree. Flags undefined at the end are left out unless `all_flags`.
pub fn diff(case: &Case, expected: &Run, actual: &Run, all_flags: bool) -> Vec<String> {
    let instrs = decode(&case.code);
    let end = CODE_ADDR + case.code.len() as u64;
    let mut masks = undefined_masks(&instrs, end);
    if all_flags {
        masks.iter_mut().for_each(|m| *m = 0);
    }
    let mut out = Vec::new();
    match (&expected.outcome, &actual.outcome) {
        (Outcome::Completed { state: e, .. }, Outcome::Completed { state: a, .. }) => {
            diff_state(e, a, masks[instrs.len()], &mut out);
        }
        (
            Outcome::Fault { vector: ev, rip_offset: er, state: e },
            Outcome::Fault { vector: av, rip_offset: ar, state: a },
        ) => {
            if ev != av {
                out.push(format!("exception: expected {}, got {}", vector_name(*ev), vector_name(*av)));
            }
            if er != ar {
                out.push(format!("fault rip: expected +{er:#x}, got +{ar:#x}"));
            }
            diff_state(e, a, masks[index_at(&instrs, *er)], &mut out);
        }
        (e, a) => out.push(format!("outcome: expected {}, got {}", describe(e), describe(a))),
    }
    diff_window(&expected.window, &actual.window, &mut out);
    out
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Completed { .. } => "completion".into(),
        Outcome::Fault { vector, rip_offset, .. } => format!("{} at +{rip_offset:#x}", vector_name(*vector)),
    }
}

pub fn vector_name(v: u8) -> String {
    let name = match v {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        6 => "#UD",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        17 => "#AC",
        _ => "#?",
    };
    format!("{name}({v})")
}

fn diff_state(e: &MachineState, a: &MachineState, undefined: u64, out: &mut Vec<String>) {
    for (i, name) in GPR_NAMES.iter().enumerate() {
        if e.gpr[i] != a.gpr[i] {
            out.push(format!("{name}: expected {:#018x}, got {:#018x}", e.gpr[i], a.gpr[i]));
        }
    }
    let compared = rflags::COMPARED & !undefined;
    if (e.rflags ^ a.rflags) & compared != 0 {
        out.push(format!(
            "rflags: expected [{}], got [{}] (compared bits {:#x}; undefined here: [{}])",
            flag_letters(e.rflags),
            flag_letters(a.rflags),
            compared,
            flag_letters(undefined)
        ));
    }
}

fn diff_window(e: &[u8], a: &[u8], out: &mut Vec<String>) {
    let bad: Vec<usize> = (0..e.len().min(a.len())).step_by(8).filter(|&o| e[o..o + 8] != a[o..o + 8]).collect();
    for &o in bad.iter().take(8) {
        let q = |w: &[u8]| u64::from_le_bytes(w[o..o + 8].try_into().expect("8 bytes"));
        out.push(format!("window+{o:#06x} ({:#x}): expected {:#018x}, got {:#018x}", WINDOW_ADDR + o as u64, q(e), q(a)));
    }
    if bad.len() > 8 {
        out.push(format!("... {} more differing quadwords in the window", bad.len() - 8));
    }
}

/// Disassembly with each instruction's offset, bytes and the flags undefined
/// before it.
pub fn disassemble(code: &[u8]) -> String {
    let instrs = decode(code);
    let masks = undefined_masks(&instrs, CODE_ADDR + code.len() as u64);
    let mut f = IntelFormatter::new();
    f.options_mut().set_first_operand_char_index(8);
    let mut s = String::new();
    for (i, ins) in instrs.iter().enumerate() {
        let off = (ins.ip() - CODE_ADDR) as usize;
        let bytes: String = code[off..off + ins.len()].iter().map(|b| format!("{b:02x}")).collect();
        let mut text = String::new();
        f.format(ins, &mut text);
        let undef = if masks[i] != 0 { format!("  ; undefined before: {}", flag_letters(masks[i])) } else { String::new() };
        let _ = writeln!(s, "  +{off:04x}  {bytes:<30} {text}{undef}");
    }
    s
}

/// The full report for one mismatch.
pub fn render(case: &Case, oracle: &str, tested: &str, expected: &Run, actual: &Run, diffs: &[String]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "=== differential mismatch: {tested} vs {oracle} (expected) ===");
    let _ = writeln!(s, "sequence ({} bytes at {CODE_ADDR:#x}):", case.code.len());
    s.push_str(&disassemble(&case.code));
    let _ = writeln!(s, "initial state:\n{:?}", case.init);
    let _ = writeln!(s, "{oracle}: {}; {tested}: {}", describe(&expected.outcome), describe(&actual.outcome));
    let _ = writeln!(s, "differences ({tested} vs {oracle}):");
    for d in diffs {
        let _ = writeln!(s, "  {d}");
    }
    s
}
