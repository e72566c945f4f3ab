//! `btvmm translate`: guest code in, each translation unit's guest
//! instructions beside the host code they became.

use std::fmt::Write as _;

use anyhow::{bail, Context};
use btvmm_translator::translate::{translate, Ccf, Mode, Outcome, Treatment};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter};

use crate::cli::TranslateArgs;

/// The guest bytes the arguments name.
fn guest_bytes(args: &TranslateArgs) -> anyhow::Result<Vec<u8>> {
    if let Some(hex) = &args.hex {
        let digits: String = hex.chars().filter(|c| !c.is_whitespace() && *c != ',').collect();
        if digits.is_empty() || !digits.len().is_multiple_of(2) || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("--hex wants pairs of hex digits, like \"fa 9c 0f 01 04 24\"");
        }
        return Ok((0..digits.len()).step_by(2).map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap_or(0)).collect());
    }
    let Some(path) = &args.file else { bail!("give --hex BYTES or --file FILE") };
    let data = std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))?;
    let start = usize::try_from(args.offset).ok().filter(|&o| o < data.len());
    let Some(start) = start else { bail!("offset {:#x} is outside '{}' ({} bytes)", args.offset, path.display(), data.len()) };
    let end = start.saturating_add(args.length as usize).min(data.len());
    Ok(data[start..end].to_vec())
}

fn format(f: &mut IntelFormatter, i: &Instruction) -> String {
    let mut s = String::new();
    f.format(i, &mut s);
    s
}

/// Host code `code[from..to]`, disassembled at its offsets in the CCF.
fn host_lines(f: &mut IntelFormatter, code: &[u8], from: usize, to: usize) -> Vec<String> {
    let mut d = Decoder::with_ip(64, &code[from..to], from as u64, DecoderOptions::NONE);
    let mut out = Vec::new();
    for i in &mut d {
        out.push(format!("{:04x}  {}", i.ip(), format(f, &i)));
    }
    out
}

fn describe(t: Treatment) -> &'static str {
    match t {
        Treatment::Ident => "IDENT",
        Treatment::Mem => "MEM",
        Treatment::Control => "CONTROL",
        Treatment::Inline => "SENSITIVE: inline over the virtual state in the vCPU block",
        Treatment::Callout => "SENSITIVE: exits to the shared Rust semantics",
    }
}

fn print_ccf(out: &mut String, f: &mut IntelFormatter, ccf: &Ccf, bytes: &[u8], base_rip: u64) {
    let _ = writeln!(
        out,
        "  {} guest instructions -> {} host bytes (entry at {:04x}); IDENT {} MEM {} CONTROL {} SENSITIVE {}",
        ccf.guest.len(),
        ccf.code.len(),
        ccf.entry,
        ccf.counts.ident,
        ccf.counts.mem,
        ccf.counts.control,
        ccf.counts.sensitive
    );
    // Code between the entry and the first instruction's, if any.
    let first = ccf.rip_map.first().map_or(ccf.code.len(), |m| m.0 as usize);
    for l in host_lines(f, &ccf.code, ccf.entry, first) {
        let _ = writeln!(out, "  {:48}   {l}", "");
    }
    for (k, insn) in ccf.guest.iter().enumerate() {
        let from = ccf.rip_map[k].0 as usize;
        let to = ccf.rip_map.get(k + 1).map_or_else(|| ccf.exits.iter().map(|e| e.offset).filter(|&o| o >= from).min().unwrap_or(ccf.code.len()), |m| m.0 as usize);
        let off = insn.ip().wrapping_sub(base_rip) as usize;
        let raw: Vec<String> = bytes.get(off..off + insn.len()).unwrap_or(&[]).iter().map(|b| format!("{b:02x}")).collect();
        let guest = format!("{:x}: {:<14} {}", insn.ip(), raw.join(""), format(f, insn));
        let _ = writeln!(out, "  {guest:48} ; {}", describe(ccf.treatment[k]));
        for l in host_lines(f, &ccf.code, from, to.max(from)) {
            let _ = writeln!(out, "  {:48}   {l}", "");
        }
    }
    let _ = writeln!(out, "  exits:");
    for e in &ccf.exits {
        let _ = writeln!(out, "    {:04x}  to {:#x} ({:?})", e.offset, e.rip, e.reason);
    }
}

/// Translates the guest code TU by TU and describes each.
pub fn run(args: &TranslateArgs) -> anyhow::Result<String> {
    let bytes = guest_bytes(args)?;
    let bits: u32 = args.bits.parse().unwrap_or(64);
    let mode = Mode { bits, seg_base_mask: 0, seg_usable_mask: 0x3f, stack_bits: bits, cpl0: true, sse: true, avx: true, fp_masked: true, x87: true, tlb_tables: None };
    let mut f = IntelFormatter::new();
    f.options_mut().set_first_operand_char_index(8);
    let mut out = String::new();
    let mut off = 0usize;
    while off < bytes.len() {
        let rip = args.rip.wrapping_add(off as u64);
        let _ = writeln!(out, "TU at {rip:#x} ({bits}-bit):");
        match translate(&bytes[off..], rip, mode, 1) {
            Outcome::Ccf(ccf) => {
                print_ccf(&mut out, &mut f, &ccf, &bytes, args.rip);
                // The next TU starts after the last instruction the CCF ran
                // itself (a callout's instruction is shown again on its own).
                let ran = ccf.guest.iter().zip(&ccf.treatment).filter(|(_, t)| **t != Treatment::Callout).map(|(i, _)| i.len()).sum::<usize>();
                off += ran.max(1);
            }
            Outcome::Interpret => {
                let mut d = Decoder::with_ip(bits, &bytes[off..], rip, DecoderOptions::NONE);
                let insn = d.decode();
                let raw: Vec<String> = bytes[off..off + insn.len().max(1).min(bytes.len() - off)].iter().map(|b| format!("{b:02x}")).collect();
                let guest = format!("{:x}: {:<14} {}", rip, raw.join(""), format(&mut f, &insn));
                let _ = writeln!(out, "  {guest:48} ; {}", describe(Treatment::Callout));
                off += insn.len().max(1);
            }
        }
    }
    Ok(out)
}
