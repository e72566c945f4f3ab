//! Test sequences: a menu of entries (generic forms and compound items), a
//! builder that lays them out with labels, flag sanitizing, and encoding with
//! iced's `BlockEncoder` at `CODE_ADDR`.
//!
//! Labels follow iced's convention: a labelled instruction's `ip` is the label
//! id and a branch's target is that id; `BlockEncoder` resolves them, keeping
//! each branch's size as generated (`DONT_FIX_BRANCHES`: rel32 jcc stays
//! rel32). Every label sits on a `nop` of its own, so flag fix-ups never
//! split a target.

use iced_x86::{BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock};

use super::compound::{self, Compound};
use super::flags::{FlagFlow, ARITH};
use super::forms::{self, R64};
use super::machine::CODE_ADDR;
use super::rng::Rng;

/// One thing a sequence can contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Generic(Code),
    Compound(Compound),
}

/// Everything the generators may pick from.
pub struct Menu {
    pub entries: Vec<Entry>,
}

impl Menu {
    /// Generic forms accepted by `keep`, plus (if `compounds`) every compound.
    pub fn new(keep: &dyn Fn(Code) -> bool, compounds: bool) -> Menu {
        let mut entries: Vec<Entry> =
            forms::catalogue().into_iter().filter(|c| keep(*c)).map(Entry::Generic).collect();
        if compounds {
            entries.extend(compound::all().into_iter().map(Entry::Compound));
        }
        Menu { entries }
    }

    /// Entries allowed inside a branch or call body (no nesting, no stack
    /// use inside a call, no faults that would hide the control transfer).
    pub fn body_entries(&self) -> Vec<Code> {
        self.entries
            .iter()
            .filter_map(|e| match e {
                Entry::Generic(c) if !c.op_code().is_stack_instruction() => Some(*c),
                _ => None,
            })
            .filter(|c| !matches!(c, Code::Int3 | Code::Ud2))
            .collect()
    }
}

/// Collects instructions and labels for one sequence.
pub struct Builder {
    pub instrs: Vec<Instruction>,
    next_label: u64,
    pub body: Vec<Code>,
}

impl Builder {
    pub fn new(body: Vec<Code>) -> Self {
        Builder { instrs: Vec::new(), next_label: 1, body }
    }

    pub fn label(&mut self) -> u64 {
        let l = self.next_label;
        self.next_label += 1;
        l
    }

    /// Places `label` here, on a `nop` of its own.
    pub fn bind(&mut self, label: u64) {
        let mut nop = Instruction::with(Code::Nopd);
        nop.set_ip(label);
        self.instrs.push(nop);
    }

    pub fn push(&mut self, ins: Instruction) {
        self.instrs.push(ins);
    }

    pub fn extend(&mut self, ins: impl IntoIterator<Item = Instruction>) {
        self.instrs.extend(ins);
    }

    /// One generic instruction (with its setup) from `code`.
    pub fn generic(&mut self, code: Code, rng: &mut Rng) {
        if let Some(ins) = forms::synthesize(code, rng) {
            self.extend(ins);
        }
    }

    /// `n` random body instructions (for branch and call bodies).
    pub fn body_items(&mut self, n: u64, rng: &mut Rng) {
        for _ in 0..n {
            if self.body.is_empty() {
                return;
            }
            let code = rng.pick(&self.body);
            self.generic(code, rng);
        }
    }
}

/// Emits one entry.
pub fn emit(entry: Entry, seed: u64, b: &mut Builder) {
    let mut rng = Rng::new(seed);
    match entry {
        Entry::Generic(code) => b.generic(code, &mut rng),
        Entry::Compound(c) => compound::emit(c, &mut rng, b),
    }
}

/// Before any instruction that reads a flag some earlier instruction left
/// undefined, insert `cmp r64, r64`, which defines all six from live values
/// and writes no register.
pub fn sanitize_flags(instrs: Vec<Instruction>, rng: &mut Rng) -> Vec<Instruction> {
    let mut flow = FlagFlow::default();
    let mut out = Vec::with_capacity(instrs.len() + 4);
    for ins in instrs {
        if flow.before(&ins) & ins.rflags_read() & ARITH != 0 {
            let cmp = Instruction::with2(Code::Cmp_rm64_r64, rng.pick(&R64), rng.pick(&R64))
                .expect("cmp");
            flow.after(&cmp);
            out.push(cmp);
        }
        flow.after(&ins);
        out.push(ins);
    }
    out
}

/// Builds the bytes of a sequence of (menu index, seed) items.
pub fn build(menu: &Menu, items: &[(usize, u64)]) -> Result<Vec<u8>, String> {
    let mut b = Builder::new(menu.body_entries());
    for &(idx, seed) in items {
        emit(menu.entries[idx % menu.entries.len()], seed, &mut b);
    }
    let salt = items.iter().fold(0x1234u64, |acc, (i, s)| acc.rotate_left(7) ^ (*i as u64) ^ s);
    let instrs = sanitize_flags(b.instrs, &mut Rng::new(salt));
    encode(&instrs)
}

pub fn encode(instrs: &[Instruction]) -> Result<Vec<u8>, String> {
    if instrs.is_empty() {
        return Ok(Vec::new());
    }
    let block = InstructionBlock::new(instrs, CODE_ADDR);
    BlockEncoder::encode(64, block, BlockEncoderOptions::DONT_FIX_BRANCHES)
        .map(|r| r.code_buffer)
        .map_err(|e| format!("encode: {e}"))
}
