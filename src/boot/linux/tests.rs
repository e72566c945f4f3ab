use super::*;

/// A minimal bzImage: boot sector with a setup header, one setup sector,
/// then `payload` as the protected-mode kernel.
pub(super) fn bzimage(version: u16, xloadflags: u16, payload: &[u8]) -> Vec<u8> {
    let mut img = vec![0u8; 2 * 512];
    img[SETUP_SECTS] = 1;
    img[BOOT_FLAG..BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[JUMP] = 0xeb;
    img[JUMP + 1] = 0x66; // header runs to 0x268
    img[HEADER..HEADER + 4].copy_from_slice(b"HdrS");
    img[VERSION..VERSION + 2].copy_from_slice(&version.to_le_bytes());
    img[LOADFLAGS] = LOADED_HIGH;
    img[INITRD_ADDR_MAX..INITRD_ADDR_MAX + 4].copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
    img[XLOADFLAGS..XLOADFLAGS + 2].copy_from_slice(&xloadflags.to_le_bytes());
    img[CMDLINE_SIZE..CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
    img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
    img[INIT_SIZE..INIT_SIZE + 4].copy_from_slice(&(4u32 << 20).to_le_bytes());
    img[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes());
    img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    img.extend_from_slice(payload);
    img
}

pub(super) fn mem(mib: u64) -> GuestMemory {
    GuestMemory::new(mib << 20).unwrap()
}

#[test]
fn load_bzimage_64bit_fills_zero_page_and_maps_memory() {
    let m = mem(64);
    let img = bzimage(0x020f, XLF_KERNEL_64, b"KERNELCODE");
    let e = load(&m, &img, "console=ttyS0", Some(b"initrd-bytes"), BootOptions::default()).unwrap();
    assert_eq!(e.mode, EntryMode::Long64);
    assert_eq!(e.rip, KERNEL_ADDR + 0x200);
    assert_eq!(e.boot_params, ZERO_PAGE);
    let mut k = [0u8; 10];
    m.read(KERNEL_ADDR, &mut k);
    assert_eq!(&k, b"KERNELCODE");
    assert_eq!(m.read_u8(ZERO_PAGE + TYPE_OF_LOADER as u64), 0xff);
    let cmd = m.read_u32(ZERO_PAGE + CMD_LINE_PTR as u64) as u64;
    let mut c = [0u8; 14];
    m.read(cmd, &mut c);
    assert_eq!(&c, b"console=ttyS0\0");
    let rd = m.read_u32(ZERO_PAGE + RAMDISK_IMAGE as u64) as u64;
    assert_eq!(rd & 0xfff, 0);
    assert_eq!(m.read_u32(ZERO_PAGE + RAMDISK_SIZE as u64), 12);
    assert!(rd + 12 <= 64 << 20);
    assert_eq!(m.read_u8(ZERO_PAGE + E820_ENTRIES as u64), 4);
    // Last e820 entry: RAM from 1 MiB to the end.
    let last = ZERO_PAGE + E820_TABLE as u64 + 3 * 20;
    assert_eq!(m.read_u64(last), 0x10_0000);
    assert_eq!(m.read_u64(last + 8), (64 << 20) - 0x10_0000);
    assert_eq!(m.read_u32(last + 16), E820_RAM);
    // 2 MiB identity map covering 4 GiB.
    assert_eq!(m.read_u64(e.cr3) & !0xfff, PML4_ADDR + 0x1000);
    assert_eq!(m.read_u64(PML4_ADDR + 0x2000 + 8), (1 << 21) | 0x83);
}

#[test]
fn load_bzimage_without_64bit_entry_boots_32bit_and_refuses_forced_64() {
    let m = mem(64);
    let img = bzimage(0x020f, 0, b"K");
    let e = load(&m, &img, "", None, BootOptions::default()).unwrap();
    assert_eq!(e.mode, EntryMode::Protected32);
    assert_eq!(e.rip, KERNEL_ADDR);
    assert_eq!(load(&m, &img, "", None, BootOptions { entry: Some(EntryMode::Long64), fast_boot: false }), Err(LinuxError::No64BitEntry));
}

#[test]
fn load_rejects_old_protocol_small_memory_and_huge_initrd() {
    let img = bzimage(0x0204, XLF_KERNEL_64, b"K");
    assert!(matches!(load(&mem(64), &img, "", None, BootOptions::default()), Err(LinuxError::ProtocolTooOld { .. })));
    let img = bzimage(0x020f, XLF_KERNEL_64, b"K");
    assert!(matches!(load(&mem(16), &img, "", None, BootOptions::default()), Err(LinuxError::MemoryTooSmall { .. })));
    let big = vec![0u8; 48 << 20];
    assert!(matches!(load(&mem(64), &img, "", Some(&big), BootOptions::default()), Err(LinuxError::InitrdTooLarge { .. })));
}

#[test]
fn load_rejects_non_kernels_and_truncations_without_panicking() {
    let m = mem(64);
    assert_eq!(load(&m, b"#!/bin/sh\necho hi\n", "", None, BootOptions::default()), Err(LinuxError::NotLinux));
    let img = bzimage(0x020f, XLF_KERNEL_64, &[0x90; 4096]);
    for cut in (0..img.len()).step_by(97) {
        let r = load(&m, &img[..cut], "", None, BootOptions::default());
        assert!(r.is_err(), "truncated at {cut} accepted");
    }
}

#[test]
fn load_rejects_too_long_command_line() {
    let m = mem(64);
    let img = bzimage(0x020f, XLF_KERNEL_64, b"K");
    let long = "x".repeat(3000);
    assert!(matches!(load(&m, &img, &long, None, BootOptions::default()), Err(LinuxError::CmdlineTooLong { .. })));
}
