//! `--fast-boot`: the decompressor's work done on the host. The payload is
//! unpacked here and its `vmlinux.bin` placed as extract_kernel() would
//! (arch/x86/boot/compressed/misc.c) when KASLR picks nothing: parse_elf()
//! copies each PT_LOAD segment to `output + (p_paddr - LOAD_PHYSICAL_ADDR)`,
//! and with `output == LOAD_PHYSICAL_ADDR` that is p_paddr itself. At the
//! link address handle_relocations() has nothing to do (its delta is
//! `output - LOAD_PHYSICAL_ADDR` on 32-bit, `virt_addr - LOAD_PHYSICAL_ADDR`
//! on 64-bit: both 0), so the relocation table the build appends after the
//! ELF for relocatable kernels is left unread.
//!
//! The handover is the decompressor's: boot_params in RSI/ESI, interrupts
//! off; a 64-bit vmlinux in long mode with the kernel identity-mapped
//! (arch/x86/kernel/head_64.S, startup_64, builds its own tables from
//! there), a 32-bit one in flat protected mode with paging off, at its link
//! address (arch/x86/kernel/head_32.S, startup_32, addresses everything
//! through pa()). Both clear their own BSS too; it is zeroed here anyway.
//! extract_kernel() also clears KASLR_FLAG in loadflags and sets it again
//! only when it randomizes: the zero page never has it here, as after an
//! in-guest decompression with `nokaslr`.

use btvmm_runtime::GuestMemory;

use super::{elf_plan, payload, EntryMode, LinuxError, KERNEL_ADDR};

/// Where the kernel went: the end of what it may use (its lowest address
/// plus init_size, or its highest segment end if larger), the entry mode
/// and the entry's physical address.
pub(super) struct Placed {
    pub end: u64,
    pub mode: EntryMode,
    pub rip: u64,
}

/// Decompresses `payload` and loads the vmlinux it holds.
pub(super) fn load_payload(mem: &GuestMemory, payload: &[u8], init_size: u64, entry: Option<EntryMode>)
    -> Result<Placed, LinuxError> {
    let vmlinux = payload::decompress(payload, mem.size())?;
    load_vmlinux_bin(mem, &vmlinux, init_size, entry)
}

fn load_vmlinux_bin(mem: &GuestMemory, vmlinux: &[u8], init_size: u64, entry: Option<EntryMode>)
    -> Result<Placed, LinuxError> {
    if !super::is_elf(vmlinux) {
        return Err(LinuxError::BadElf("the decompressed payload is not an ELF file".into()));
    }
    let plan = elf_plan::plan_from_elf(vmlinux).map_err(|e| LinuxError::BadElf(e.to_string()))?;
    let elf_bits = if vmlinux[4] == 2 { 64 } else { 32 };
    let mode = match (elf_bits, entry) {
        (64, None | Some(EntryMode::Long64)) => EntryMode::Long64,
        (32, None | Some(EntryMode::Protected32)) => EntryMode::Protected32,
        _ => return Err(LinuxError::FastBootEntry { elf_bits }),
    };
    let (start, high) = plan.extent();
    if start < KERNEL_ADDR {
        return Err(LinuxError::BadElf(format!("a segment at {start:#x} lies below 1 MiB, over the boot data")));
    }
    let rip = u64::from(plan.entry);
    if !plan.segments.iter().any(|s| (s.addr..s.addr + s.mem_len).contains(&rip)) {
        return Err(LinuxError::BadElf(format!("the entry point {rip:#x} lies outside every segment")));
    }
    let end = high.max(start.saturating_add(init_size));
    if end > mem.size() {
        return Err(LinuxError::MemoryTooSmall { need: end.div_ceil(1 << 20), have: mem.size() >> 20 });
    }
    for s in &plan.segments {
        mem.write(s.addr, &vmlinux[s.file.clone()]);
        let filled = (s.file.end - s.file.start) as u64;
        mem.zero(s.addr + filled, s.mem_len.saturating_sub(filled));
    }
    Ok(Placed { end, mode, rip })
}

#[cfg(test)]
mod tests;
