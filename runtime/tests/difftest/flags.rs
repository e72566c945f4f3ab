//! Which arithmetic flags are undefined at each point of a sequence.
//!
//! The SDM leaves some flags undefined after many instructions (AF after
//! logic ops, SF/ZF/AF/PF after mul, all six after div...). The host's values
//! are then not a specification, so the comparison masks them. A flag stays
//! undefined until an instruction defines it again; jumps are forward only,
//! so one pass over the instructions suffices, merging at branch targets.
//!
//! A shift or rotate whose count may be zero (a CL count, or an immediate that
//! masks to zero), and a rep-prefixed string compare (whose count may be
//! zero), may leave every flag as it was, so it adds undefinedness but never
//! removes it.

use std::collections::HashMap;

use iced_x86::{FlowControl, Instruction, Mnemonic, OpKind, RflagsBits};

use super::machine::rflags;

/// iced's six arithmetic flag bits.
pub const ARITH: u32 = RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;

/// Forward dataflow of undefined flags, in iced `RflagsBits`.
#[derive(Default)]
pub struct FlagFlow {
    pending: HashMap<u64, u32>,
    current: u32,
}

impl FlagFlow {
    /// Undefined flags just before `ins` (merging jumps that target its ip).
    pub fn before(&mut self, ins: &Instruction) -> u32 {
        self.merge(ins.ip());
        self.current
    }

    /// Applies `ins`: records its branch target, then its effect on flags.
    pub fn after(&mut self, ins: &Instruction) {
        if matches!(
            ins.flow_control(),
            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch | FlowControl::Call
        ) {
            *self.pending.entry(ins.near_branch_target()).or_default() |= self.current;
        }
        let undefined = ins.rflags_undefined();
        self.current = if may_keep_flags(ins) {
            self.current | undefined
        } else {
            (self.current & !ins.rflags_modified()) | undefined
        };
    }

    /// Undefined flags at `ip` reached by falling through or by a jump.
    pub fn merge(&mut self, ip: u64) -> u32 {
        if ip != 0 {
            self.current |= self.pending.remove(&ip).unwrap_or(0);
        }
        self.current
    }
}

/// A shift/rotate whose masked count may be zero leaves flags unchanged.
fn may_keep_flags(ins: &Instruction) -> bool {
    use Mnemonic::*;
    // A repeated compare with a zero count runs no iteration at all.
    let string_compare = matches!(ins.mnemonic(), Cmpsb | Cmpsw | Cmpsd | Cmpsq | Scasb | Scasw | Scasd | Scasq);
    if string_compare && (ins.has_repe_prefix() || ins.has_repne_prefix()) {
        return true;
    }
    if !matches!(ins.mnemonic(), Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd) {
        return false;
    }
    let last = ins.op_count() - 1;
    match ins.op_kind(last) {
        OpKind::Immediate8 => {
            let mask = if ins.op0_register().size() == 8 || ins.memory_size().size() == 8 { 63 } else { 31 };
            ins.immediate8() & mask == 0
        }
        OpKind::Register => true,
        _ => false,
    }
}

/// Converts iced's flag bits to RFLAGS bit positions.
pub fn to_rflags(bits: u32) -> u64 {
    [
        (RflagsBits::CF, rflags::CF),
        (RflagsBits::PF, rflags::PF),
        (RflagsBits::AF, rflags::AF),
        (RflagsBits::ZF, rflags::ZF),
        (RflagsBits::SF, rflags::SF),
        (RflagsBits::OF, rflags::OF),
        (RflagsBits::DF, rflags::DF),
    ]
    .iter()
    .filter(|(iced, _)| bits & iced != 0)
    .map(|(_, arch)| arch)
    .sum()
}

/// Undefined flags (RFLAGS bits) before each decoded instruction, and at the
/// end (`result[instrs.len()]`), for instructions decoded at their real ips.
pub fn undefined_masks(instrs: &[Instruction], end_ip: u64) -> Vec<u64> {
    let mut flow = FlagFlow::default();
    let mut out = Vec::with_capacity(instrs.len() + 1);
    for ins in instrs {
        out.push(to_rflags(flow.before(ins)));
        flow.after(ins);
    }
    out.push(to_rflags(flow.merge(end_ip)));
    out
}
