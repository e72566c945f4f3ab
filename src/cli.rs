//! The command line: `btvmm run ...` in the manner of QEMU's options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(name = "btvmm", version, about = "A binary-translation virtual machine monitor for x86 guests")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Boot a guest kernel.
    Run(RunArgs),
    /// Show how guest code is translated: each TU's guest instructions
    /// beside the host code of its compiled code fragment.
    Translate(TranslateArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TranslateArgs {
    /// Guest code size.
    #[arg(long, value_name = "32|64", default_value = "64", value_parser = ["32", "64"])]
    pub bits: String,
    /// Guest code as hex bytes ("fa 9c 0f 01 04 24" or "fa9c0f010424").
    #[arg(long, value_name = "BYTES", conflicts_with = "file", required_unless_present = "file")]
    pub hex: Option<String>,
    /// Guest code from a file.
    #[arg(long, value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Where in the file the code starts.
    #[arg(long, value_name = "N", default_value = "0", value_parser = parse_number)]
    pub offset: u64,
    /// How many bytes of the file to translate.
    #[arg(long, value_name = "N", default_value = "64", value_parser = parse_number)]
    pub length: u64,
    /// The guest RIP of the first byte.
    #[arg(long, value_name = "ADDR", default_value = "0x1000", value_parser = parse_number)]
    pub rip: u64,
}

/// A number in decimal or with a 0x prefix.
fn parse_number(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| format!("invalid number '{s}'"))
}

#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// A multiboot v1 kernel (ELF or a.out kludge), as QEMU's -kernel takes it.
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    pub multiboot: Option<PathBuf>,
    /// A kernel image: a Linux bzImage or vmlinux, or a multiboot kernel (detected).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for Linux, or multiboot modules (comma-separated, as QEMU's -initrd).
    #[arg(long, value_name = "FILE[,FILE...]")]
    pub initrd: Option<String>,
    /// The kernel command line.
    #[arg(long, value_name = "STRING", default_value = "")]
    pub append: String,
    /// Guest RAM size: a number of MiB, or with a suffix K, M, G (e.g. 512M).
    #[arg(short = 'm', long = "memory", value_name = "SIZE", default_value = "128M", value_parser = parse_size)]
    pub memory: u64,
    /// Linux entry point: 64 (long mode, the default for kernels that have it) or 32.
    #[arg(long, value_name = "32|64", value_parser = ["32", "64"])]
    pub boot_entry: Option<String>,
    /// Decompress a bzImage's kernel on the host and enter it directly,
    /// skipping the in-guest decompressor (XZ, gzip, zstd or LZMA payloads).
    #[arg(long)]
    pub fast_boot: bool,
    /// Execution engine for guest code.
    #[arg(long, value_enum, default_value_t = Engine::Bt)]
    pub engine: Engine,
    /// The binary translator's code-cache budget (e.g. 64M, 256K).
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = parse_cache_size)]
    pub code_cache: u64,
    /// Trace targets, comma-separated (exec, int, mmu, device, io, all); see also BTVMM_LOG.
    #[arg(long, value_name = "TARGETS")]
    pub trace: Option<String>,
    /// Print counters at exit (instructions, exceptions and interrupts by vector, I/O by device).
    #[arg(long)]
    pub stats: bool,
    /// Sample guest RIPs while running and print the hottest at exit (with --stats).
    #[arg(long)]
    pub profile: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// The interpreter (reference engine).
    Interp,
    /// The binary translator.
    Bt,
}

/// A code-cache size: like a memory size, from 64 KiB up.
fn parse_cache_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some(c) if c.is_ascii_digit() => (t, 1),
        _ => return Err(format!("invalid code-cache size '{s}'")),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid code-cache size '{s}'"))?;
    let bytes = n.checked_mul(mult).filter(|&b| b <= 1 << 32).ok_or_else(|| format!("code-cache size '{s}' is too large"))?;
    if bytes < 64 << 10 {
        return Err(format!("code-cache size '{s}' is below the 64 KiB minimum"));
    }
    Ok(bytes)
}

/// Parses a memory size as QEMU does: plain numbers are MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        Some('t' | 'T') => (&s[..s.len() - 1], 1 << 40),
        Some(c) if c.is_ascii_digit() => (s, 1 << 20),
        _ => return Err(format!("invalid memory size '{s}'")),
    };
    let n: u64 = num.parse().map_err(|_| format!("invalid memory size '{s}'"))?;
    let bytes = n.checked_mul(mult).ok_or_else(|| format!("memory size '{s}' is too large"))?;
    if bytes < (1 << 20) {
        return Err(format!("memory size '{s}' is below the 1 MiB minimum"));
    }
    Ok(bytes & !0xfff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_qemu_forms() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("64"), Ok(64 << 20));
        assert_eq!(parse_size("2048K"), Ok(2 << 20));
    }

    #[test]
    fn parse_size_rejects_garbage_and_tiny_sizes() {
        assert!(parse_size("lots").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("16K").is_err());
        assert!(parse_size("99999999999999999999G").is_err());
    }
}
