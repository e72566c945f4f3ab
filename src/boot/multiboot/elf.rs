//! ELF kernels: PT_LOAD program headers placed at their physical addresses
//! (p_paddr), BSS zeroed. ELF32 as the multiboot spec says; ELF64 too when
//! every segment lies below 4 GiB (QEMU refuses x86-64 ELF files; GRUB
//! takes them with 32-bit-addressable segments).

use super::header::{LoadPlan, Segment};
use super::MultibootError;

const PT_LOAD: u32 = 1;
const EM_386: u16 = 3;
const EM_X86_64: u16 = 62;
const FOUR_GIB: u64 = 1 << 32;

/// Where the fields we need sit in each ELF class.
struct Layout {
    is64: bool,
}

impl Layout {
    fn entry(&self, e: &[u8]) -> Option<u64> {
        if self.is64 { u64_at(e, 24) } else { u32_at(e, 24).map(u64::from) }
    }
    /// (e_phoff, e_phentsize, e_phnum)
    fn phdrs(&self, e: &[u8]) -> Option<(u64, u16, u16)> {
        if self.is64 {
            Some((u64_at(e, 32)?, u16_at(e, 54)?, u16_at(e, 56)?))
        } else {
            Some((u64::from(u32_at(e, 28)?), u16_at(e, 42)?, u16_at(e, 44)?))
        }
    }
    /// (p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz)
    fn phdr(&self, p: &[u8]) -> Option<(u32, u64, u64, u64, u64, u64)> {
        if self.is64 {
            Some((u32_at(p, 0)?, u64_at(p, 8)?, u64_at(p, 16)?, u64_at(p, 24)?, u64_at(p, 32)?, u64_at(p, 40)?))
        } else {
            let w = |o| u32_at(p, o).map(u64::from);
            Some((u32_at(p, 0)?, w(4)?, w(8)?, w(12)?, w(16)?, w(20)?))
        }
    }
    fn min_phentsize(&self) -> u16 {
        if self.is64 { 56 } else { 32 }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4).map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|s| u64::from_le_bytes(s.try_into().unwrap_or([0; 8])))
}

pub fn is_elf(image: &[u8]) -> bool {
    image.starts_with(b"\x7fELF")
}

pub fn plan_from_elf(image: &[u8]) -> Result<LoadPlan, MultibootError> {
    let truncated = |what| MultibootError::Truncated { what };
    let ident = image.get(..20).ok_or(truncated("ELF header"))?;
    let layout = match ident[4] {
        1 => Layout { is64: false },
        2 => Layout { is64: true },
        _ => return Err(MultibootError::BadElf("unknown ELF class")),
    };
    if ident[5] != 1 {
        return Err(MultibootError::BadElf("not little-endian"));
    }
    let machine = u16_at(image, 18).ok_or(truncated("ELF header"))?;
    if machine != EM_386 && machine != EM_X86_64 {
        return Err(MultibootError::Unsupported(format!("ELF machine {machine} is not x86")));
    }
    let entry = layout.entry(image).ok_or(truncated("ELF header"))?;
    let (phoff, phentsize, phnum) = layout.phdrs(image).ok_or(truncated("ELF header"))?;
    if phnum > 0 && phentsize < layout.min_phentsize() {
        return Err(MultibootError::BadElf("program header entries are too small"));
    }

    let mut segments = Vec::new();
    let mut entry_phys = None;
    for i in 0..u64::from(phnum) {
        let at = phoff.checked_add(i * u64::from(phentsize)).ok_or(truncated("ELF program headers"))?;
        let p = usize::try_from(at)
            .ok()
            .and_then(|at| image.get(at..at.checked_add(usize::from(phentsize))?))
            .ok_or(truncated("ELF program headers"))?;
        let (ptype, offset, vaddr, paddr, filesz, memsz) = layout.phdr(p).ok_or(truncated("ELF program headers"))?;
        if ptype != PT_LOAD || memsz == 0 {
            continue;
        }
        if filesz > memsz {
            return Err(MultibootError::BadElf("segment file size exceeds its memory size"));
        }
        let end = paddr.checked_add(memsz).filter(|&e| e <= FOUR_GIB);
        if end.is_none() {
            return Err(MultibootError::OutsideMemory { addr: paddr, len: memsz, size: FOUR_GIB });
        }
        let file = usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(usize::try_from(filesz).ok()?)?))
            .filter(|r| r.end <= image.len())
            .ok_or(truncated("ELF segment data"))?;
        if entry >= vaddr && entry - vaddr < memsz {
            entry_phys.get_or_insert(paddr + (entry - vaddr));
        }
        segments.push(Segment { addr: paddr, file, mem_len: memsz });
    }
    if segments.is_empty() {
        return Err(MultibootError::BadElf("no loadable segments"));
    }
    // An entry outside every segment is taken as a physical address as is.
    let entry = entry_phys.unwrap_or(entry);
    let entry = u32::try_from(entry).map_err(|_| MultibootError::BadElf("entry point above 4 GiB"))?;
    Ok(LoadPlan { segments, entry })
}
