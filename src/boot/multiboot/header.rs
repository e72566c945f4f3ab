//! The multiboot v1 header and the load plan derived from it: either the
//! header's own addresses (the "a.out kludge", flags bit 16) or the ELF
//! program headers.

use std::ops::Range;

use super::MultibootError;

pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The header must lie 4-byte aligned within the image's first 8 KiB.
const SEARCH_LIMIT: usize = 8192;
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAG_ADDRESSES: u32 = 1 << 16;
/// Bits 0-15 are requirements a loader must understand or refuse.
const REQUIRED_MASK: u32 = 0xffff;
const KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;

/// A found, checksummed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub offset: usize,
    pub flags: u32,
}

/// One piece of the kernel to place in guest memory: `file` bytes of the
/// image copied to `addr`, followed by zeroes up to `mem_len`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub addr: u64,
    pub file: Range<usize>,
    pub mem_len: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    pub segments: Vec<Segment>,
    pub entry: u32,
}

impl LoadPlan {
    /// Lowest and highest (exclusive) guest physical address the kernel occupies.
    pub fn extent(&self) -> (u64, u64) {
        let low = self.segments.iter().map(|s| s.addr).min().unwrap_or(0);
        let high = self.segments.iter().map(|s| s.addr + s.mem_len).max().unwrap_or(0);
        (low, high)
    }
}

fn le32(image: &[u8], at: usize) -> Option<u32> {
    let b = image.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Finds the first header whose checksum is right. A magic with a wrong
/// checksum is reported only if no valid header follows it.
pub fn find_header(image: &[u8]) -> Result<Header, MultibootError> {
    let end = image.len().min(SEARCH_LIMIT);
    let mut bad_checksum = None;
    for offset in (0..end).step_by(4) {
        let (Some(magic), Some(flags), Some(sum)) =
            (le32(image, offset), le32(image, offset + 4), le32(image, offset + 8))
        else {
            break;
        };
        if magic != HEADER_MAGIC {
            continue;
        }
        if magic.wrapping_add(flags).wrapping_add(sum) == 0 {
            return Ok(Header { offset, flags });
        }
        bad_checksum.get_or_insert(offset);
    }
    match bad_checksum {
        Some(offset) => Err(MultibootError::BadChecksum { offset }),
        None => Err(MultibootError::NoHeader),
    }
}

/// Refuses requirements (flags bits 0-15) this loader does not know. Video
/// mode (bit 2) is known and ignored, as QEMU does: no video fields are
/// passed, which the MBI's flags say.
pub fn check_flags(header: &Header) -> Result<(), MultibootError> {
    let unknown = header.flags & REQUIRED_MASK & !KNOWN_REQUIRED;
    if unknown != 0 {
        return Err(MultibootError::Unsupported(format!(
            "header requires unknown features (flags {unknown:#x})"
        )));
    }
    Ok(())
}

pub fn uses_header_addresses(header: &Header) -> bool {
    header.flags & FLAG_ADDRESSES != 0
}

/// The a.out kludge: header_addr, load_addr, load_end_addr, bss_end_addr and
/// entry_addr follow the checksum. The header's file offset and header_addr
/// tie file offsets to addresses.
pub fn plan_from_header(image: &[u8], header: &Header) -> Result<LoadPlan, MultibootError> {
    let field = |i: usize| {
        le32(image, header.offset + 12 + 4 * i)
            .ok_or(MultibootError::Truncated { what: "multiboot header address fields" })
    };
    let (header_addr, load_addr, load_end, bss_end, entry) =
        (field(0)?, field(1)?, field(2)?, field(3)?, field(4)?);
    let bad = MultibootError::BadAddresses;
    let header_delta = header_addr.checked_sub(load_addr).ok_or(bad("header_addr is below load_addr"))?;
    let file_start = header
        .offset
        .checked_sub(header_delta as usize)
        .ok_or(bad("load_addr lies before the start of the file"))?;
    let file_len = if load_end == 0 {
        image.len() - file_start
    } else {
        load_end.checked_sub(load_addr).ok_or(bad("load_end_addr is below load_addr"))? as usize
    };
    let file_end = file_start
        .checked_add(file_len)
        .filter(|&e| e <= image.len())
        .ok_or(MultibootError::Truncated { what: "kernel text and data (load_end_addr)" })?;
    let loaded_end = u64::from(load_addr) + file_len as u64;
    let mem_len = if bss_end == 0 {
        file_len as u64
    } else if u64::from(bss_end) < loaded_end {
        return Err(bad("bss_end_addr is below load_end_addr"));
    } else {
        u64::from(bss_end) - u64::from(load_addr)
    };
    let segment = Segment { addr: u64::from(load_addr), file: file_start..file_end, mem_len };
    Ok(LoadPlan { segments: vec![segment], entry })
}
