use std::io::Write;

use super::super::tests::{bzimage, mem};
use super::super::*;
use super::payload::PayloadFormat;

const TEXT_PADDR: u64 = 0x100_0000;
const DATA_PADDR: u64 = 0x120_0000;
const TEXT: &[u8] = b"\xf4startup_64 or startup_32";
const DATA: &[u8] = b"initialized data";
const BSS_LEN: u64 = 0x1000;

/// A vmlinux.bin as the kernel's build makes it, in miniature: text and
/// data segments linked high with physical addresses from 16 MiB, the
/// physical entry in e_entry, the BSS in the data segment's memsz, and a
/// relocation table after the ELF.
fn vmlinux(class64: bool) -> Vec<u8> {
    let (ehsize, phentsize) = if class64 { (64usize, 56usize) } else { (52, 32) };
    let virt: u64 = if class64 { 0xffff_ffff_8000_0000 } else { 0xc000_0000 };
    let text_off = 0x100u64;
    let data_off = text_off + TEXT.len() as u64;
    let mut e = vec![0u8; ehsize];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = if class64 { 2 } else { 1 };
    e[5] = 1;
    e[6] = 1;
    e[16] = 2; // ET_EXEC
    e[18..20].copy_from_slice(&(if class64 { 62u16 } else { 3 }).to_le_bytes());
    let word = |v: &mut Vec<u8>, x: u64| {
        if class64 { v.extend_from_slice(&x.to_le_bytes()) } else { v.extend_from_slice(&(x as u32).to_le_bytes()) }
    };
    let mut tail = Vec::new();
    word(&mut tail, TEXT_PADDR); // e_entry
    word(&mut tail, ehsize as u64); // e_phoff
    word(&mut tail, 0); // e_shoff
    e[20] = 1; // e_version
    e.truncate(24);
    e.extend_from_slice(&tail);
    e.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    for h in [ehsize as u16, phentsize as u16, 2, 0, 0, 0] {
        e.extend_from_slice(&h.to_le_bytes());
    }
    assert_eq!(e.len(), ehsize);
    let segs = [
        (text_off, TEXT_PADDR, TEXT.len() as u64, TEXT.len() as u64),
        (data_off, DATA_PADDR, DATA.len() as u64, DATA.len() as u64 + BSS_LEN),
    ];
    for (off, paddr, filesz, memsz) in segs {
        let mut p = 1u32.to_le_bytes().to_vec(); // PT_LOAD
        if class64 {
            p.extend_from_slice(&7u32.to_le_bytes());
            for v in [off, paddr + virt, paddr, filesz, memsz, 0x1000] {
                p.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            for v in [off, paddr + virt, paddr, filesz, memsz] {
                p.extend_from_slice(&(v as u32).to_le_bytes());
            }
            p.extend_from_slice(&7u32.to_le_bytes());
            p.extend_from_slice(&0x1000u32.to_le_bytes());
        }
        e.extend_from_slice(&p);
    }
    e.resize(text_off as usize, 0);
    e.extend_from_slice(TEXT);
    e.extend_from_slice(DATA);
    e.extend_from_slice(&[0x44, 0x33, 0x22, 0x11, 0, 0, 0, 0]); // relocations, terminator
    e
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// XZ as scripts/xz_wrap.sh makes it for x86: CRC32 check, BCJ x86 filter.
fn xz(data: &[u8]) -> Vec<u8> {
    let mut opts = lzma_rust2::XzOptions::with_preset(1);
    opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
    opts.prepend_pre_filter(lzma_rust2::FilterType::BcjX86, 0);
    let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn lzma(data: &[u8]) -> Vec<u8> {
    let opts = lzma_rust2::LzmaOptions::with_preset(1);
    let mut w = lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, Some(data.len() as u64)).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// The payload as the kernel's build appends it: the stream, then the
/// uncompressed size (size_append).
fn with_size(mut stream: Vec<u8>, raw: &[u8]) -> Vec<u8> {
    stream.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    stream
}

const FAST: BootOptions = BootOptions { entry: None, fast_boot: true };

#[test]
fn fast_boot_gzip_xz_zstd_lzma_payloads_load_the_elf_at_its_physical_addresses() {
    let elf = vmlinux(true);
    for compress in [gzip, xz, zstd, lzma] {
        let img = bzimage(0x020f, XLF_KERNEL_64, &with_size(compress(&elf), &elf));
        let m = mem(64);
        m.write(DATA_PADDR + DATA.len() as u64, &[0xaa; BSS_LEN as usize]);

        let e = load(&m, &img, "console=ttyS0", Some(b"rd"), FAST).unwrap();

        assert_eq!((e.mode, e.rip, e.boot_params), (EntryMode::Long64, TEXT_PADDR, ZERO_PAGE));
        let mut text = vec![0u8; TEXT.len()];
        m.read(TEXT_PADDR, &mut text);
        assert_eq!(text, TEXT);
        let mut data = vec![0xffu8; DATA.len() + BSS_LEN as usize];
        m.read(DATA_PADDR, &mut data);
        assert_eq!(&data[..DATA.len()], DATA);
        assert!(data[DATA.len()..].iter().all(|&b| b == 0), "BSS not zeroed");
        // The compressed image is not copied to 1 MiB.
        assert_eq!(m.read_u32(KERNEL_ADDR), 0);
        // The zero page carries the bzImage's header, as on the normal path.
        assert_eq!(m.read_u32(ZERO_PAGE + INIT_SIZE as u64), 4 << 20);
        assert_eq!(m.read_u32(ZERO_PAGE + CODE32_START as u64), KERNEL_ADDR as u32);
        assert_eq!(&m.read_u32(ZERO_PAGE + HEADER as u64).to_le_bytes(), b"HdrS");
        // The initrd stays above what the kernel may use: its start plus init_size.
        assert!(m.read_u32(ZERO_PAGE + RAMDISK_IMAGE as u64) as u64 >= TEXT_PADDR + (4 << 20));
    }
}

#[test]
fn fast_boot_32bit_vmlinux_enters_protected_mode_at_its_physical_entry() {
    let elf = vmlinux(false);
    let img = bzimage(0x020f, 0, &with_size(xz(&elf), &elf));
    let m = mem(64);

    let e = load(&m, &img, "", None, FAST).unwrap();

    assert_eq!((e.mode, e.rip, e.cr3), (EntryMode::Protected32, TEXT_PADDR, 0));
    let mut data = vec![0u8; DATA.len()];
    m.read(DATA_PADDR, &mut data);
    assert_eq!(data, DATA);
}

#[test]
fn fast_boot_refuses_an_entry_mode_the_vmlinux_lacks() {
    let elf = vmlinux(true);
    let img = bzimage(0x020f, XLF_KERNEL_64, &gzip(&elf));
    let opts = BootOptions { entry: Some(EntryMode::Protected32), fast_boot: true };

    assert_eq!(load(&mem(64), &img, "", None, opts), Err(LinuxError::FastBootEntry { elf_bits: 64 }));
}

#[test]
fn fast_boot_truncated_or_corrupt_payloads_are_errors() {
    let elf = vmlinux(true);
    for compress in [gzip, xz, zstd, lzma] {
        let good = compress(&elf);
        for cut in (0..good.len()).step_by(7) {
            let img = bzimage(0x020f, XLF_KERNEL_64, &good[..cut]);
            assert!(load(&mem(64), &img, "", None, FAST).is_err(), "cut at {cut} accepted");
        }
        for at in (6..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[at] ^= 0x5a;
            let img = bzimage(0x020f, XLF_KERNEL_64, &bad);
            // Some flips still decode to a loadable ELF; none may panic.
            let _ = load(&mem(64), &img, "", None, FAST);
        }
    }
    // A stream that decodes to something other than an ELF.
    let img = bzimage(0x020f, XLF_KERNEL_64, &gzip(b"not an ELF file at all"));
    assert!(matches!(load(&mem(64), &img, "", None, FAST), Err(LinuxError::BadElf(_))));
}

#[test]
fn fast_boot_unsupported_and_unknown_formats_get_one_clear_error() {
    for (magic, format) in [(&b"BZh91AY&SY"[..], "bzip2"), (b"\x02\x21\x4c\x18\0\0", "LZ4"), (b"\x89LZO\0\r\n", "LZO")] {
        let img = bzimage(0x020f, XLF_KERNEL_64, magic);
        assert_eq!(load(&mem(64), &img, "", None, FAST), Err(LinuxError::UnsupportedPayload { format }));
    }
    let img = bzimage(0x020f, XLF_KERNEL_64, b"\x00\x01\x02\x03\x04\x05\x06");
    let err = load(&mem(64), &img, "", None, FAST).unwrap_err();
    assert_eq!(err.to_string(), "the kernel payload has an unknown compression (magic 00 01 02 03 04 05): boot without --fast-boot");
}

#[test]
fn fast_boot_checks_memory_and_protocol() {
    let elf = vmlinux(true);
    let img = bzimage(0x020f, XLF_KERNEL_64, &gzip(&elf));
    // Kernel at 16 MiB plus init_size (4 MiB) does not fit in 18 MiB.
    assert!(matches!(load(&mem(18), &img, "", None, FAST), Err(LinuxError::MemoryTooSmall { need: 20, have: 18 })));
    let old = bzimage(0x0206, XLF_KERNEL_64, &gzip(&elf));
    assert_eq!(load(&mem(64), &old, "", None, FAST), Err(LinuxError::FastBootProtocol { major: 2, minor: 6 }));
}

#[test]
fn payload_format_detect_names_each_magic() {
    assert_eq!(PayloadFormat::detect(&xz(b"x")), Some(PayloadFormat::Xz));
    assert_eq!(PayloadFormat::detect(&gzip(b"x")), Some(PayloadFormat::Gzip));
    assert_eq!(PayloadFormat::detect(&zstd(b"x")), Some(PayloadFormat::Zstd));
    assert_eq!(PayloadFormat::detect(&lzma(b"x")), Some(PayloadFormat::Lzma));
    assert_eq!(PayloadFormat::detect(b""), None);
}
