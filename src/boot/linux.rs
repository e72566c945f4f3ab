//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst): bzImage
//! and vmlinux loading, the zero page (`boot_params`) with an e820 map, the
//! command line and the initrd, and the 32- and 64-bit entry states.
//!
//! Layout in low memory (below the EBDA, which the e820 map reserves):
//!
//!   0x1000  GDT: null, null, __BOOT_CS 0x10, __BOOT_DS 0x18 (flat)
//!   0x7000  boot_params (the zero page)
//!   0x9000  page tables of the 64-bit entry: PML4, PDPT, 4 PDs (4 GiB, 2 MiB pages)
//!   0x20000 command line
//!
//! The protected-mode kernel goes to 1 MiB (QEMU's choice too: the
//! relocatable kernel decompresses itself to where it wants), the initrd as
//! high as `initrd_addr_max` and RAM allow, page aligned. With `fast_boot`
//! the host decompresses the payload instead and the kernel proper goes to
//! its link address (fast.rs); the zero page is the same.

use btvmm_runtime::GuestMemory;
use thiserror::Error;

use super::multiboot::elf as elf_plan;

mod fast;
pub mod payload;

const GDT_ADDR: u64 = 0x1000;
const ZERO_PAGE: u64 = 0x7000;
const PML4_ADDR: u64 = 0x9000;
const CMDLINE_ADDR: u64 = 0x20000;
const KERNEL_ADDR: u64 = 0x10_0000;
const EBDA_START: u64 = 0x9_fc00;
const BIOS_START: u64 = 0xf_0000;
pub const BOOT_CS: u16 = 0x10;
pub const BOOT_DS: u16 = 0x18;

// Setup header fields (offsets in the bzImage and in boot_params).
const SETUP_SECTS: usize = 0x1f1;
const BOOT_FLAG: usize = 0x1fe;
const JUMP: usize = 0x200;
const HEADER: usize = 0x202;
const VERSION: usize = 0x206;
const VID_MODE: usize = 0x1fa;
const TYPE_OF_LOADER: usize = 0x210;
const LOADFLAGS: usize = 0x211;
const CODE32_START: usize = 0x214;
const RAMDISK_IMAGE: usize = 0x218;
const RAMDISK_SIZE: usize = 0x21c;
const HEAP_END_PTR: usize = 0x224;
const CMD_LINE_PTR: usize = 0x228;
const INITRD_ADDR_MAX: usize = 0x22c;
const XLOADFLAGS: usize = 0x236;
const CMDLINE_SIZE: usize = 0x238;
const PAYLOAD_OFFSET: usize = 0x248;
const PAYLOAD_LENGTH: usize = 0x24c;
const INIT_SIZE: usize = 0x260;
// boot_params fields outside the setup header.
const ALT_MEM_K: usize = 0x1e0;
const E820_ENTRIES: usize = 0x1e8;
const E820_TABLE: usize = 0x2d0;

const LOADED_HIGH: u8 = 1 << 0;
const CAN_USE_HEAP: u8 = 1 << 7;
const XLF_KERNEL_64: u16 = 1 << 0;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Oldest protocol accepted: 2.06 (cmdline_size, relocatable kernels).
const MIN_VERSION: u16 = 0x0206;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinuxError {
    #[error("cannot decompress the {format} kernel payload: {reason}")]
    Decompress { format: &'static str, reason: String },
    #[error("--fast-boot enters a {elf_bits}-bit kernel only in its own mode: drop --boot-entry or --fast-boot")]
    FastBootEntry { elf_bits: u8 },
    #[error("--fast-boot needs boot protocol 2.08 or later (payload_offset); this kernel has {major}.{minor:02}")]
    FastBootProtocol { major: u8, minor: u8 },
    #[error("the {what} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel")]
    InitrdTooLarge { what: &'static str, size: u64, limit: u64 },
    #[error("guest memory too small for the kernel: it needs {need} MiB, RAM is {have} MiB")]
    MemoryTooSmall { need: u64, have: u64 },
    #[error("not a Linux kernel: neither a bzImage (no 'HdrS' setup header) nor an ELF vmlinux")]
    NotLinux,
    #[error("Linux boot protocol {major}.{minor:02} is too old (btvmm needs 2.06 or later)")]
    ProtocolTooOld { major: u8, minor: u8 },
    #[error("the kernel has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64): boot it with --boot-entry 32")]
    No64BitEntry,
    #[error("kernel command line is {len} bytes; the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("truncated kernel image: {0}")]
    Truncated(&'static str),
    #[error("invalid vmlinux: {0}")]
    BadElf(String),
    #[error("the kernel payload has an unknown compression (magic {magic}): boot without --fast-boot")]
    UnknownPayload { magic: String },
    #[error("the kernel payload is {format}-compressed; --fast-boot decompresses XZ, gzip, zstd and LZMA: boot without --fast-boot")]
    UnsupportedPayload { format: &'static str },
}

/// Which entry point to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit flat protected mode, paging off, at `code32_start`.
    Protected32,
    /// 64-bit long mode with an identity map, at `startup_64`.
    Long64,
}

/// How to boot: the entry mode (None: 64-bit when the kernel has it) and
/// whether the host decompresses a bzImage's payload (`--fast-boot`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootOptions {
    pub entry: Option<EntryMode>,
    pub fast_boot: bool,
}

/// Register state at the kernel entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxEntry {
    pub mode: EntryMode,
    pub rip: u64,
    /// RSI/ESI: the zero page.
    pub boot_params: u64,
    /// CR3 for the 64-bit entry.
    pub cr3: u64,
    pub gdt_base: u64,
    pub gdt_limit: u16,
}

/// Whether `image` carries a bzImage setup header.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.get(HEADER..HEADER + 4) == Some(b"HdrS")
}

/// Whether `image` is an ELF file (a vmlinux).
pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

/// Loads a bzImage or vmlinux, the command line and the initrd.
/// `fast_boot` applies to bzImages only (a vmlinux needs no decompression).
pub fn load(
    mem: &GuestMemory,
    image: &[u8],
    cmdline: &str,
    initrd: Option<&[u8]>,
    opts: BootOptions,
) -> Result<LinuxEntry, LinuxError> {
    let mut zp = vec![0u8; 4096];
    let (kernel_end, mode, rip, initrd_max) = if is_bzimage(image) {
        load_bzimage(mem, image, &mut zp, opts)?
    } else if is_elf(image) {
        load_vmlinux(mem, image, &mut zp, opts.entry)?
    } else {
        return Err(LinuxError::NotLinux);
    };
    let max_cmdline = if le16(&zp, VERSION) >= 0x0206 { le32(&zp, CMDLINE_SIZE) } else { 255 };
    if cmdline.len() as u64 > max_cmdline as u64 {
        return Err(LinuxError::CmdlineTooLong { len: cmdline.len(), max: max_cmdline });
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write(CMDLINE_ADDR, &c);
    put32(&mut zp, CMD_LINE_PTR, CMDLINE_ADDR as u32);
    zp[TYPE_OF_LOADER] = 0xff;
    put16(&mut zp, VID_MODE, 0xffff);
    // No real-mode setup code runs, so its heap is the zero page's business only.
    zp[LOADFLAGS] |= CAN_USE_HEAP;
    put16(&mut zp, HEAP_END_PTR, 0xfe00);
    if let Some(rd) = initrd {
        let limit = initrd_max.min(mem.size());
        let addr = limit.checked_sub(rd.len() as u64).map(|a| a & !0xfff);
        match addr {
            Some(a) if a >= kernel_end => {
                mem.write(a, rd);
                put32(&mut zp, RAMDISK_IMAGE, a as u32);
                put32(&mut zp, RAMDISK_SIZE, rd.len() as u32);
            }
            _ => return Err(LinuxError::InitrdTooLarge { what: "initrd", size: rd.len() as u64, limit }),
        }
    }
    write_e820(&mut zp, mem.size());
    put32(&mut zp, ALT_MEM_K, ((mem.size().saturating_sub(1 << 20)) >> 10).min(u32::MAX as u64) as u32);
    mem.write(ZERO_PAGE, &zp);
    let gdt: [u64; 4] = match mode {
        EntryMode::Long64 => [0, 0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff],
        EntryMode::Protected32 => [0, 0, 0x00cf_9b00_0000_ffff, 0x00cf_9300_0000_ffff],
    };
    for (i, d) in gdt.iter().enumerate() {
        mem.write_u64(GDT_ADDR + 8 * i as u64, *d);
    }
    let cr3 = if mode == EntryMode::Long64 { write_identity_map(mem) } else { 0 };
    Ok(LinuxEntry { mode, rip, boot_params: ZERO_PAGE, cr3, gdt_base: GDT_ADDR, gdt_limit: 31 })
}

/// Returns (end of the kernel's memory, entry mode, entry RIP, initrd limit).
fn load_bzimage(mem: &GuestMemory, image: &[u8], zp: &mut [u8], opts: BootOptions)
    -> Result<(u64, EntryMode, u64, u64), LinuxError> {
    if image.len() < 0x250 || le16(image, BOOT_FLAG) != 0xaa55 {
        return Err(LinuxError::Truncated("setup header"));
    }
    let version = le16(image, VERSION);
    if version < MIN_VERSION {
        return Err(LinuxError::ProtocolTooOld { major: (version >> 8) as u8, minor: version as u8 });
    }
    // The setup header runs from 0x1f1 to the end named by the jump at 0x200.
    let hdr_end = (JUMP + 2 + image[JUMP + 1] as usize).clamp(HEADER + 4, 0x280);
    zp[SETUP_SECTS..hdr_end].copy_from_slice(image.get(SETUP_SECTS..hdr_end).ok_or(LinuxError::Truncated("setup header"))?);
    let setup_sects = match image[SETUP_SECTS] {
        0 => 4,
        n => n as usize,
    };
    let pm_offset = (setup_sects + 1) * 512;
    let pm = image.get(pm_offset..).filter(|p| !p.is_empty()).ok_or(LinuxError::Truncated("protected-mode kernel"))?;
    if image[LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(LinuxError::ProtocolTooOld { major: 0, minor: 0 });
    }
    let init_size = if version >= 0x020a { le32(image, INIT_SIZE) as u64 } else { pm.len() as u64 * 4 };
    let initrd_max = if version >= 0x0203 { le32(image, INITRD_ADDR_MAX) as u64 + 1 } else { 0x3800_0000 };
    if opts.fast_boot {
        // The zero page still says where a bzImage loader put the protected-mode code.
        put32(zp, CODE32_START, KERNEL_ADDR as u32);
        let payload = payload_of(image, pm, version)?
            .ok_or(LinuxError::FastBootProtocol { major: (version >> 8) as u8, minor: version as u8 })?;
        let placed = fast::load_payload(mem, payload, init_size, opts.entry)?;
        return Ok((placed.end, placed.mode, placed.rip, initrd_max));
    }
    // The kernel decompresses in place or relocates to its preferred
    // address; it needs init_size bytes from the larger of the two.
    let pref = if version >= 0x020a { le64(image, 0x258) } else { KERNEL_ADDR };
    let need = KERNEL_ADDR.max(pref).saturating_add(init_size.max(pm.len() as u64));
    if need > mem.size() {
        return Err(LinuxError::MemoryTooSmall { need: need.div_ceil(1 << 20), have: mem.size() >> 20 });
    }
    // Declared payload length must lie within the file.
    payload_of(image, pm, version)?;
    mem.write(KERNEL_ADDR, pm);
    put32(zp, CODE32_START, KERNEL_ADDR as u32);
    let has64 = version >= 0x020c && le16(image, XLOADFLAGS) & XLF_KERNEL_64 != 0;
    let mode = match opts.entry {
        Some(EntryMode::Long64) if !has64 => return Err(LinuxError::No64BitEntry),
        Some(m) => m,
        None if has64 => EntryMode::Long64,
        None => EntryMode::Protected32,
    };
    let rip = match mode {
        EntryMode::Long64 => KERNEL_ADDR + 0x200,
        EntryMode::Protected32 => KERNEL_ADDR,
    };
    Ok((need, mode, rip, initrd_max))
}

/// The compressed payload within the protected-mode code `pm`, if the
/// protocol names it (2.08+); an error if it runs past the file.
fn payload_of<'a>(image: &[u8], pm: &'a [u8], version: u16) -> Result<Option<&'a [u8]>, LinuxError> {
    if version < 0x0208 {
        return Ok(None);
    }
    let (off, len) = (le32(image, PAYLOAD_OFFSET) as usize, le32(image, PAYLOAD_LENGTH) as usize);
    off.checked_add(len)
        .and_then(|end| pm.get(off..end))
        .map(Some)
        .ok_or(LinuxError::Truncated("compressed payload"))
}

/// A vmlinux ELF: segments at their physical addresses, entry at e_entry's
/// physical address, and a zero page built from scratch.
fn load_vmlinux(mem: &GuestMemory, image: &[u8], zp: &mut [u8], entry: Option<EntryMode>)
    -> Result<(u64, EntryMode, u64, u64), LinuxError> {
    let plan = elf_plan::plan_from_elf(image).map_err(|e| LinuxError::BadElf(e.to_string()))?;
    let (_, end) = plan.extent();
    if end > mem.size() {
        return Err(LinuxError::MemoryTooSmall { need: end.div_ceil(1 << 20), have: mem.size() >> 20 });
    }
    for s in &plan.segments {
        mem.write(s.addr, &image[s.file.clone()]);
        let filled = (s.file.end - s.file.start) as u64;
        mem.zero(s.addr + filled, s.mem_len.saturating_sub(filled));
    }
    let class64 = image.get(4) == Some(&2);
    zp[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
    zp[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
    put16(zp, VERSION, 0x020f);
    zp[LOADFLAGS] = LOADED_HIGH;
    put32(zp, CMDLINE_SIZE, 2047);
    let mode = match entry {
        Some(m) => m,
        None if class64 => EntryMode::Long64,
        None => EntryMode::Protected32,
    };
    Ok((end, mode, plan.entry as u64, 0x3800_0000))
}

/// The map Linux sees: low RAM up to the EBDA, the BIOS area reserved, RAM above 1 MiB.
fn write_e820(zp: &mut [u8], size: u64) {
    let entries = [
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa_0000 - EBDA_START, E820_RESERVED),
        (BIOS_START, 0x10_0000 - BIOS_START, E820_RESERVED),
        (0x10_0000, size - 0x10_0000, E820_RAM),
    ];
    for (i, (addr, len, ty)) in entries.iter().enumerate() {
        let at = E820_TABLE + 20 * i;
        zp[at..at + 8].copy_from_slice(&addr.to_le_bytes());
        zp[at + 8..at + 16].copy_from_slice(&len.to_le_bytes());
        zp[at + 16..at + 20].copy_from_slice(&ty.to_le_bytes());
    }
    zp[E820_ENTRIES] = entries.len() as u8;
}

/// Identity-maps the first 4 GiB with 2 MiB pages; returns CR3.
fn write_identity_map(mem: &GuestMemory) -> u64 {
    let pdpt = PML4_ADDR + 0x1000;
    mem.write_u64(PML4_ADDR, pdpt | 3);
    for g in 0..4u64 {
        let pd = PML4_ADDR + 0x2000 + g * 0x1000;
        mem.write_u64(pdpt + 8 * g, pd | 3);
        for e in 0..512u64 {
            mem.write_u64(pd + 8 * e, ((g << 30) | (e << 21)) | 0x83);
        }
    }
    PML4_ADDR
}

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2).map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn le64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8).map_or(0, |s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}
fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests;
