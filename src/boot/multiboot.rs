//! Multiboot v1 loader, following QEMU's `-kernel` conventions
//! (hw/i386/multiboot.c and its option ROM) so a kernel sees the same
//! machine under btvmm as under QEMU:
//!
//! - the header is searched 4-byte aligned in the first 8 KiB; flags bit 16
//!   loads by the header's addresses (a.out kludge), otherwise the image is
//!   an ELF file loaded by program headers at their physical addresses;
//! - after the kernel (page-aligned) come the module list, the command lines
//!   (each module's, then the kernel's: its file path, a space, the append
//!   string) and the boot loader name; then each module, page-aligned;
//! - the memory map (e820-like entries) is at 0x9000, the MBI at 0x9500;
//! - mem_lower is 639 KiB (QEMU's BIOS reports the EBDA-reduced size from
//!   int 0x12, matching the first map entry), mem_upper is the RAM
//!   contiguous above 1 MiB;
//! - the entry state is EAX = 0x2BADB002, EBX = the MBI, flat 32-bit
//!   protected mode with paging off (CS 0x08 and data 0x10 of the small GDT
//!   this loader writes at 0x9600, as QEMU's option ROM uses).

pub(crate) mod elf;
pub(crate) mod header;

use btvmm_runtime::{GuestMemory, GuestPhys};
use thiserror::Error;

use header::LoadPlan;

/// EAX at kernel entry.
pub const BOOT_MAGIC: u32 = 0x2BAD_B002;
const MMAP_ADDR: u64 = 0x9000;
const MBI_ADDR: u64 = 0x9500;
const MBI_SIZE: usize = 88;
/// A flat code (0x08) and data (0x10) GDT for the entry state.
pub const GDT_ADDR: u64 = 0x9600;
pub const BOOT_CS: u16 = 0x08;
pub const BOOT_DS: u16 = 0x10;
const GDT: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
const LOADER_NAME: &str = "btvmm";
/// QEMU passes no boot drive: "no BIOS disk", all partitions unused.
const BOOT_DEVICE: u32 = 0x8000_ffff;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
const MEM_LOWER_KIB: u32 = 639;
/// Low memory reserved below 1 MiB, as a PC BIOS reports it: the EBDA and
/// the BIOS area. The VGA hole 0xa0000-0xf0000 is absent from the map.
const EBDA_START: u64 = 0x9_fc00;
const BIOS_START: u64 = 0xf_0000;

// MBI flags this loader provides.
const MBI_MEMORY: u32 = 1 << 0;
const MBI_BOOT_DEVICE: u32 = 1 << 1;
const MBI_CMDLINE: u32 = 1 << 2;
const MBI_MODULES: u32 = 1 << 3;
const MBI_MMAP: u32 = 1 << 6;
const MBI_LOADER_NAME: u32 = 1 << 9;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MultibootError {
    #[error("inconsistent multiboot header addresses: {0}")]
    BadAddresses(&'static str),
    #[error("multiboot header at offset {offset:#x} has a bad checksum")]
    BadChecksum { offset: usize },
    #[error("invalid ELF kernel: {0}")]
    BadElf(&'static str),
    #[error("guest memory too small: the boot layout needs {need:#x} bytes, RAM has {size:#x}")]
    MemoryTooSmall { need: u64, size: u64 },
    #[error("not a multiboot kernel: no multiboot header in the first 8 KiB")]
    NoHeader,
    #[error("kernel range {addr:#x}+{len:#x} lies outside guest memory ({size:#x} bytes)")]
    OutsideMemory { addr: u64, len: u64, size: u64 },
    #[error("kernel range {addr:#x}+{len:#x} overlaps the boot information at 0x9000-0x9700")]
    OverlapsBootInfo { addr: u64, len: u64 },
    #[error("kernel file is truncated: {what} extend past its end")]
    Truncated { what: &'static str },
    #[error("unsupported multiboot kernel: {0}")]
    Unsupported(String),
}

/// Whether `image` carries a multiboot header (valid or not) in its first 8 KiB.
pub fn has_header(image: &[u8]) -> bool {
    !matches!(header::find_header(image), Err(MultibootError::NoHeader))
}

/// A boot module, as QEMU's `-initrd "file args,file2"` passes it: the
/// command line is the whole entry (path and arguments), the data is the
/// file's contents.
#[derive(Debug, Clone, Copy)]
pub struct Module<'a> {
    pub cmdline: &'a str,
    pub data: &'a [u8],
}

/// Register state the kernel must be entered with (flat 32-bit protected
/// mode, paging and interrupts off, CS = `BOOT_CS`, other segments
/// `BOOT_DS`, GDTR = `GDT_ADDR`/`gdt_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultibootEntry {
    pub eip: u32,
    pub eax: u32,
    pub ebx: u32,
    pub gdt_base: u32,
    pub gdt_limit: u16,
    /// End of everything the loader placed above the kernel (page-aligned).
    pub end: u64,
}

/// The command line QEMU gives a multiboot kernel: its file path, a space,
/// then the `-append` string (possibly empty).
pub fn qemu_cmdline(kernel_path: &str, append: &str) -> String {
    format!("{kernel_path} {append}")
}

/// Loads `image` into `mem` with its command line and modules; returns the
/// entry state. Never panics on any input.
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<MultibootEntry, MultibootError> {
    let header = header::find_header(image)?;
    header::check_flags(&header)?;
    let plan = if header::uses_header_addresses(&header) {
        header::plan_from_header(image, &header)?
    } else if elf::is_elf(image) {
        elf::plan_from_elf(image)?
    } else {
        return Err(MultibootError::Unsupported(
            "no address fields in the header (flags bit 16) and not an ELF file".into(),
        ));
    };
    check_kernel_placement(mem, &plan)?;
    let layout = InfoLayout::new(&plan, cmdline, modules);
    if layout.end > 1 << 32 {
        return Err(MultibootError::Unsupported("modules would extend above 4 GiB".into()));
    }
    if layout.end > mem.size() {
        return Err(MultibootError::MemoryTooSmall { need: layout.end, size: mem.size() });
    }
    for s in &plan.segments {
        mem.zero(s.addr, s.mem_len);
        mem.write(s.addr, &image[s.file.clone()]);
    }
    layout.write(mem, cmdline, modules);
    write_mbi(mem, &layout);
    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write(GDT_ADDR, &gdt);
    Ok(MultibootEntry {
        eip: plan.entry,
        eax: BOOT_MAGIC,
        ebx: MBI_ADDR as u32,
        gdt_base: GDT_ADDR as u32,
        gdt_limit: (gdt.len() - 1) as u16,
        end: layout.end,
    })
}

fn check_kernel_placement(mem: &GuestMemory, plan: &LoadPlan) -> Result<(), MultibootError> {
    let low_info_end = GDT_ADDR + (GDT.len() * 8) as u64;
    for s in &plan.segments {
        if !mem.contains(s.addr, s.mem_len) {
            return Err(MultibootError::OutsideMemory { addr: s.addr, len: s.mem_len, size: mem.size() });
        }
        if s.addr < low_info_end && s.addr + s.mem_len > MMAP_ADDR {
            return Err(MultibootError::OverlapsBootInfo { addr: s.addr, len: s.mem_len });
        }
    }
    Ok(())
}

fn page_align(x: u64) -> u64 {
    x.div_ceil(PAGE) * PAGE
}

/// Where QEMU puts the module list, command lines, loader name and modules:
/// all relative to the kernel's load address and size.
struct InfoLayout {
    mods_addr: u64,
    /// Address of each module's command line, then the kernel's.
    cmdline_addrs: Vec<u64>,
    loader_name_addr: u64,
    module_addrs: Vec<u64>,
    end: u64,
}

impl InfoLayout {
    fn new(plan: &LoadPlan, cmdline: &str, modules: &[Module<'_>]) -> Self {
        let (low, high) = plan.extent();
        let mods_addr = low + page_align(high - low);
        let mut next = mods_addr + 16 * modules.len() as u64;
        let mut cmdline_addrs = Vec::with_capacity(modules.len() + 1);
        for c in modules.iter().map(|m| m.cmdline).chain([cmdline]) {
            cmdline_addrs.push(next);
            next += c.len() as u64 + 1;
        }
        let loader_name_addr = next;
        next = page_align(next + LOADER_NAME.len() as u64 + 1);
        let mut module_addrs = Vec::with_capacity(modules.len());
        for m in modules {
            module_addrs.push(next);
            next = page_align(next + m.data.len() as u64);
        }
        Self {
            mods_addr,
            cmdline_addrs,
            loader_name_addr,
            module_addrs,
            end: next,
        }
    }

    fn write(&self, mem: &GuestMemory, cmdline: &str, modules: &[Module<'_>]) {
        let strings = modules.iter().map(|m| m.cmdline).chain([cmdline]);
        for (s, &addr) in strings.zip(&self.cmdline_addrs) {
            write_cstr(mem, addr, s);
        }
        write_cstr(mem, self.loader_name_addr, LOADER_NAME);
        for (i, (m, &addr)) in modules.iter().zip(&self.module_addrs).enumerate() {
            mem.write(addr, m.data);
            let entry = self.mods_addr + 16 * i as u64;
            let end = addr + m.data.len() as u64;
            write_u32s(mem, entry, &[addr as u32, end as u32, self.cmdline_addrs[i] as u32, 0]);
        }
    }
}

fn write_cstr(mem: &GuestMemory, addr: GuestPhys, s: &str) {
    mem.write(addr, s.as_bytes());
    mem.write(addr + s.len() as u64, &[0]);
}

fn write_u32s(mem: &GuestMemory, addr: GuestPhys, values: &[u32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    mem.write(addr, &bytes);
}

/// The memory map a PC BIOS with this much RAM reports (e820 types:
/// 1 usable, 2 reserved).
fn memory_map(ram: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, EBDA_START, 1),
        (EBDA_START, 0xa_0000 - EBDA_START, 2),
        (BIOS_START, MIB - BIOS_START, 2),
        (MIB, ram.saturating_sub(MIB), 1),
    ]
}

fn write_mbi(mem: &GuestMemory, layout: &InfoLayout) {
    let ram = mem.size();
    let map = memory_map(ram);
    let mut mmap = Vec::with_capacity(map.len() * 24);
    for (base, len, kind) in &map {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        mmap.extend_from_slice(&kind.to_le_bytes());
    }
    mem.write(MMAP_ADDR, &mmap);
    let mem_upper = u32::try_from(ram.saturating_sub(MIB) / 1024).unwrap_or(u32::MAX);
    let mut mbi = [0u32; MBI_SIZE / 4];
    mbi[0] = MBI_MEMORY | MBI_BOOT_DEVICE | MBI_CMDLINE | MBI_MODULES | MBI_MMAP | MBI_LOADER_NAME;
    mbi[1] = MEM_LOWER_KIB;
    mbi[2] = mem_upper;
    mbi[3] = BOOT_DEVICE;
    mbi[4] = *layout.cmdline_addrs.last().unwrap_or(&0) as u32;
    mbi[5] = layout.module_addrs.len() as u32;
    mbi[6] = layout.mods_addr as u32;
    mbi[11] = mmap.len() as u32;
    mbi[12] = MMAP_ADDR as u32;
    mbi[16] = layout.loader_name_addr as u32;
    write_u32s(mem, MBI_ADDR, &mbi);
}

#[cfg(test)]
mod tests;
