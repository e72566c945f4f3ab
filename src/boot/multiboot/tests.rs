//! Unit tests: hand-built a.out-kludge and ELF images, the boot information
//! layout QEMU uses, and that no input makes the loader panic.

use super::*;
use proptest::prelude::*;

const MIB: u64 = 1 << 20;
const KERNEL: u32 = 0x10_0000;

fn mem(size: u64) -> GuestMemory {
    GuestMemory::new(size).expect("guest memory")
}

fn header(flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(flags)] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h
}
use header::HEADER_MAGIC;

/// An a.out-kludge image: header at offset 0, loaded at 1 MiB, `text`
/// bytes of file data then `bss` zeroed bytes, entry at +0x20.
fn aout_image(text: usize, bss: u32) -> Vec<u8> {
    let mut img = header(1 << 16 | 0x3);
    let load_end = KERNEL + text as u32;
    for v in [KERNEL, KERNEL, load_end, if bss == 0 { 0 } else { load_end + bss }, KERNEL + 0x20] {
        img.extend_from_slice(&v.to_le_bytes());
    }
    while img.len() < text {
        img.push((img.len() % 251) as u8);
    }
    img
}

/// A minimal ELF file: (vaddr, paddr, data, memsz) per PT_LOAD segment;
/// the multiboot header follows the program headers.
fn elf_image(is64: bool, entry: u64, segs: &[(u64, u64, Vec<u8>, u64)]) -> Vec<u8> {
    let (ehsize, phsize) = if is64 { (64usize, 56usize) } else { (52, 32) };
    let mut img = vec![0u8; ehsize];
    img[..4].copy_from_slice(b"\x7fELF");
    img[4] = if is64 { 2 } else { 1 };
    img[5] = 1;
    img[6] = 1;
    img[16] = 2; // ET_EXEC
    img[18..20].copy_from_slice(&(if is64 { 62u16 } else { 3u16 }).to_le_bytes());
    let phoff = ehsize;
    if is64 {
        img[24..32].copy_from_slice(&entry.to_le_bytes());
        img[32..40].copy_from_slice(&(phoff as u64).to_le_bytes());
        img[54..56].copy_from_slice(&(phsize as u16).to_le_bytes());
        img[56..58].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    } else {
        img[24..28].copy_from_slice(&(entry as u32).to_le_bytes());
        img[28..32].copy_from_slice(&(phoff as u32).to_le_bytes());
        img[42..44].copy_from_slice(&(phsize as u16).to_le_bytes());
        img[44..46].copy_from_slice(&(segs.len() as u16).to_le_bytes());
    }
    let mut data_off = phoff + phsize * segs.len() + 12;
    let mut phdrs = Vec::new();
    let mut data = Vec::new();
    for (vaddr, paddr, bytes, memsz) in segs {
        let mut p = vec![0u8; phsize];
        p[0..4].copy_from_slice(&1u32.to_le_bytes());
        let fields = [data_off as u64, *vaddr, *paddr, bytes.len() as u64, *memsz];
        for (i, f) in fields.iter().enumerate() {
            if is64 {
                p[8 + 8 * i..16 + 8 * i].copy_from_slice(&f.to_le_bytes());
            } else {
                p[4 + 4 * i..8 + 4 * i].copy_from_slice(&(*f as u32).to_le_bytes());
            }
        }
        phdrs.extend(p);
        data.extend_from_slice(bytes);
        data_off += bytes.len();
    }
    img.extend(phdrs);
    img.extend(header(0x3));
    img.extend(data);
    img
}

fn read_cstr(m: &GuestMemory, mut addr: u64) -> String {
    let mut s = Vec::new();
    loop {
        let b = m.read_u8(addr);
        if b == 0 || s.len() > 4096 {
            break;
        }
        s.push(b);
        addr += 1;
    }
    String::from_utf8_lossy(&s).into_owned()
}

fn read_bytes(m: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    m.read(addr, &mut v);
    v
}

#[test]
fn find_header_without_magic_is_no_header() {
    let m = mem(4 * MIB);
    assert_eq!(load(&m, &[0u8; 9000], "", &[]), Err(MultibootError::NoHeader));
    assert_eq!(load(&m, &[], "", &[]), Err(MultibootError::NoHeader));
}

#[test]
fn find_header_bad_checksum_is_reported() {
    let mut img = vec![0u8; 64];
    img[8..12].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
    img[12..16].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::BadChecksum { offset: 8 }));
}

#[test]
fn find_header_beyond_8k_or_unaligned_is_not_found() {
    let mut late = vec![0u8; 8192];
    late.extend(aout_image(64, 0));
    assert_eq!(load(&mem(4 * MIB), &late, "", &[]), Err(MultibootError::NoHeader));
    let mut unaligned = vec![0u8; 2];
    unaligned.extend(aout_image(64, 0));
    assert_eq!(load(&mem(4 * MIB), &unaligned, "", &[]), Err(MultibootError::NoHeader));
}

#[test]
fn check_flags_unknown_requirement_is_unsupported() {
    let mut img = header(1 << 16 | 1 << 5);
    img.resize(64, 0);
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::Unsupported(_))));
}

#[test]
fn load_video_flag_is_ignored() {
    let mut img = aout_image(256, 0);
    img[4..8].copy_from_slice(&(1u32 << 16 | 0x7).to_le_bytes());
    let sum = 0u32.wrapping_sub(HEADER_MAGIC).wrapping_sub(1 << 16 | 0x7);
    img[8..12].copy_from_slice(&sum.to_le_bytes());
    assert!(load(&mem(4 * MIB), &img, "", &[]).is_ok());
}

#[test]
fn load_aout_copies_text_zeroes_bss_and_enters_at_entry_addr() {
    let m = mem(4 * MIB);
    m.write(u64::from(KERNEL) + 0x1000, &[0xffu8; 0x800]);
    let img = aout_image(0x1000, 0x800);
    let e = load(&m, &img, "k", &[]).expect("loads");
    assert_eq!(e.eip, KERNEL + 0x20);
    assert_eq!((e.eax, e.ebx), (0x2BAD_B002, 0x9500));
    assert_eq!(read_bytes(&m, KERNEL.into(), img.len()), img);
    assert!(read_bytes(&m, u64::from(KERNEL) + 0x1000, 0x800).iter().all(|&b| b == 0));
}

#[test]
fn load_aout_zero_load_end_loads_the_rest_of_the_file() {
    let mut img = aout_image(0x300, 0);
    img[20..24].copy_from_slice(&0u32.to_le_bytes());
    let m = mem(4 * MIB);
    load(&m, &img, "", &[]).expect("loads");
    assert_eq!(read_bytes(&m, KERNEL.into(), img.len()), img);
}

#[test]
fn load_aout_inconsistent_addresses_are_errors() {
    let m = mem(4 * MIB);
    let mut below = aout_image(64, 0);
    below[12..16].copy_from_slice(&(KERNEL - 4).to_le_bytes()); // header_addr < load_addr
    assert!(matches!(load(&m, &below, "", &[]), Err(MultibootError::BadAddresses(_))));
    let mut before_file = aout_image(64, 0);
    before_file[12..16].copy_from_slice(&(KERNEL + 64).to_le_bytes());
    assert!(matches!(load(&m, &before_file, "", &[]), Err(MultibootError::BadAddresses(_))));
    let mut bss = aout_image(64, 16);
    bss[24..28].copy_from_slice(&(KERNEL + 8).to_le_bytes());
    assert!(matches!(load(&m, &bss, "", &[]), Err(MultibootError::BadAddresses(_))));
}

#[test]
fn load_aout_past_end_of_file_is_truncated() {
    let mut img = aout_image(64, 0);
    img[20..24].copy_from_slice(&(KERNEL + 0x1000).to_le_bytes());
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::Truncated { .. })));
}

#[test]
fn load_kernel_beyond_ram_is_outside_memory() {
    let mut img = aout_image(64, 0);
    let high = 0x800_0000u32;
    for off in [12, 16] {
        img[off..off + 4].copy_from_slice(&high.to_le_bytes());
    }
    img[20..24].copy_from_slice(&(high + 64).to_le_bytes());
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::OutsideMemory { .. })));
}

#[test]
fn load_kernel_over_boot_info_is_refused() {
    let mut img = aout_image(64, 0x1000);
    let low = 0x9000u32;
    for off in [12, 16] {
        img[off..off + 4].copy_from_slice(&low.to_le_bytes());
    }
    img[20..24].copy_from_slice(&(low + 64).to_le_bytes());
    img[24..28].copy_from_slice(&(low + 0x1000).to_le_bytes());
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::OverlapsBootInfo { .. })));
}

#[test]
fn load_elf32_places_segments_at_paddr_and_translates_entry() {
    let text = vec![0x90u8; 0x300];
    let data = vec![0x11u8; 0x40];
    // Linked at 0xc0100000 (virtual), loaded at 1 MiB (physical).
    let img = elf_image(false, 0xc010_0010, &[
        (0xc010_0000, 0x10_0000, text.clone(), 0x300),
        (0xc010_2000, 0x10_2000, data.clone(), 0x1000),
    ]);
    let m = mem(4 * MIB);
    m.write(0x10_2040, &[0xff; 0x100]);
    let e = load(&m, &img, "", &[]).expect("loads");
    assert_eq!(e.eip, 0x10_0010);
    assert_eq!(read_bytes(&m, 0x10_0000, 0x300), text);
    assert_eq!(read_bytes(&m, 0x10_2000, 0x40), data);
    assert!(read_bytes(&m, 0x10_2040, 0xfc0).iter().all(|&b| b == 0), "bss zeroed");
}

#[test]
fn load_elf64_with_low_segments_is_accepted() {
    let img = elf_image(true, 0x10_0000, &[(0x10_0000, 0x10_0000, vec![0xf4; 16], 16)]);
    let m = mem(4 * MIB);
    assert_eq!(load(&m, &img, "", &[]).expect("loads").eip, 0x10_0000);
    assert_eq!(m.read_u8(0x10_0000), 0xf4);
}

#[test]
fn load_elf64_segment_above_4g_is_outside_memory() {
    let img = elf_image(true, 0x10_0000, &[(0x1_0000_0000, 0x1_0000_0000, vec![0; 16], 16)]);
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::OutsideMemory { .. })));
}

#[test]
fn load_elf_filesz_beyond_memsz_is_bad_elf() {
    let img = elf_image(false, 0x10_0000, &[(0x10_0000, 0x10_0000, vec![0; 32], 16)]);
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::BadElf(_))));
}

#[test]
fn load_elf_other_machine_is_unsupported() {
    let mut img = elf_image(false, 0x10_0000, &[(0x10_0000, 0x10_0000, vec![0; 16], 16)]);
    img[18] = 40; // ARM
    assert!(matches!(load(&mem(4 * MIB), &img, "", &[]), Err(MultibootError::Unsupported(_))));
}

#[test]
fn write_mbi_matches_qemu_conventions() {
    let m = mem(16 * MIB);
    let cmdline = qemu_cmdline("/k.elf", "iterations=3");
    let e = load(&m, &aout_image(0x1800, 0x800), &cmdline, &[]).expect("loads");
    let mbi = u64::from(e.ebx);
    assert_eq!(m.read_u32(mbi), 0x24f, "flags: mem, boot device, cmdline, mods, mmap, loader name");
    assert_eq!(m.read_u32(mbi + 4), 639);
    assert_eq!(m.read_u32(mbi + 8), (16 * 1024) - 1024);
    assert_eq!(m.read_u32(mbi + 12), 0x8000_ffff);
    assert_eq!(read_cstr(&m, m.read_u32(mbi + 16).into()), "/k.elf iterations=3");
    assert_eq!(m.read_u32(mbi + 20), 0, "no modules");
    assert_eq!(m.read_u32(mbi + 24), KERNEL + 0x2000, "module list after the page-aligned kernel");
    assert_eq!(read_cstr(&m, m.read_u32(mbi + 64).into()), "btvmm");
    let (len, addr) = (m.read_u32(mbi + 44), u64::from(m.read_u32(mbi + 48)));
    assert_eq!((len, addr), (96, 0x9000));
    let entries: Vec<(u32, u64, u64, u32)> = (0..4)
        .map(|i| {
            let a = addr + 24 * i;
            (m.read_u32(a), m.read_u64(a + 4), m.read_u64(a + 12), m.read_u32(a + 20))
        })
        .collect();
    assert_eq!(entries, vec![
        (20, 0, 0x9_fc00, 1),
        (20, 0x9_fc00, 0x400, 2),
        (20, 0xf_0000, 0x1_0000, 2),
        (20, 0x10_0000, 15 * MIB, 1),
    ]);
    assert_eq!((m.read_u64(0x9608), m.read_u64(0x9610)), (GDT[1], GDT[2]));
}

#[test]
fn load_modules_are_page_aligned_after_the_info_with_their_cmdlines() {
    let m = mem(16 * MIB);
    let a = vec![0xaau8; 5000];
    let b = b"hello".to_vec();
    let mods = [Module { cmdline: "/tmp/a.bin arg=1", data: &a }, Module { cmdline: "/tmp/b", data: &b }];
    let e = load(&m, &aout_image(0x1000, 0), "/k ", &mods).expect("loads");
    let mbi = u64::from(e.ebx);
    assert_eq!(m.read_u32(mbi + 20), 2);
    let list = u64::from(m.read_u32(mbi + 24));
    assert_eq!(list, u64::from(KERNEL) + 0x1000);
    let entry = |i: u64| (m.read_u32(list + 16 * i), m.read_u32(list + 16 * i + 4), m.read_u32(list + 16 * i + 8));
    let (s0, e0, c0) = entry(0);
    let (s1, e1, c1) = entry(1);
    assert_eq!(s0, KERNEL + 0x2000, "first module on the page after the info block");
    assert_eq!(e0 - s0, 5000);
    assert_eq!(s1, KERNEL + 0x4000, "second module page-aligned after the first");
    assert_eq!(e1 - s1, 5);
    assert_eq!(read_cstr(&m, c0.into()), "/tmp/a.bin arg=1");
    assert_eq!(read_cstr(&m, c1.into()), "/tmp/b");
    assert_eq!(read_cstr(&m, m.read_u32(mbi + 16).into()), "/k ");
    assert_eq!(read_bytes(&m, s0.into(), 5000), a);
    assert_eq!(read_bytes(&m, s1.into(), 5), b);
    assert_eq!(e.end, u64::from(KERNEL) + 0x5000);
}

#[test]
fn load_modules_larger_than_ram_is_memory_too_small() {
    let big = vec![0u8; 3 * MIB as usize];
    let mods = [Module { cmdline: "big", data: &big }];
    assert!(matches!(
        load(&mem(4 * MIB), &aout_image(0x1000, 0), "", &mods),
        Err(MultibootError::MemoryTooSmall { .. })
    ));
}

#[test]
fn load_built_test_kernel_enters_inside_it() {
    let path = env!("BTVMM_KERNEL_MULTIBOOT_INFO");
    let image = std::fs::read(path).expect("test kernel built by build.rs");
    let m = mem(32 * MIB);
    let e = load(&m, &image, &qemu_cmdline(path, ""), &[]).expect("loads");
    assert!(e.eip >= KERNEL && u64::from(e.eip) < e.end);
    assert_eq!(m.read_u32(0x10_0000), HEADER_MAGIC, "the header is the first thing linked");
}

#[test]
fn load_never_panics_on_truncations() {
    let m = mem(4 * MIB);
    let images = [
        aout_image(0x400, 0x100),
        elf_image(false, 0x10_0000, &[(0x10_0000, 0x10_0000, vec![1; 0x200], 0x400)]),
        elf_image(true, 0x10_0000, &[(0x10_0000, 0x10_0000, vec![1; 0x200], 0x400)]),
    ];
    for img in &images {
        assert!(load(&m, img, "", &[]).is_ok());
        for len in 0..img.len() {
            let _ = load(&m, &img[..len], "", &[]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn load_never_panics_on_garbage(
        mut bytes in proptest::collection::vec(any::<u8>(), 0..1024),
        at in 0usize..64,
        flags in any::<u32>(),
        elf in any::<bool>(),
    ) {
        // Give the garbage a valid header so parsing goes past the search.
        let at = (at * 4).min(bytes.len() / 4 * 4);
        let h = header(flags);
        if bytes.len() >= at + 12 {
            bytes[at..at + 12].copy_from_slice(&h);
        }
        if elf && bytes.len() >= 4 {
            bytes[..4].copy_from_slice(b"\x7fELF");
        }
        let m = mem(2 * MIB);
        let _ = load(&m, &bytes, "x", &[Module { cmdline: "m", data: &bytes }]);
    }
}
