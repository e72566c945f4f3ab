//! Guest physical RAM: one memfd, mapped shared.
//!
//! # Safety
//! RAM is a shared mapping that the guest (through the interpreter, and later
//! through translated code and the direct-execution stub) writes concurrently
//! with nothing else in this process: a vCPU owns its accesses. All access goes
//! through raw pointers with explicit bounds checks; no Rust reference to guest
//! RAM is ever handed out, because guest writes may alias it at any time.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

use memmap2::{MmapOptions, MmapRaw};
use thiserror::Error;

/// A guest physical address.
pub type GuestPhys = u64;

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_SHIFT: u32 = 12;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot create guest RAM memfd: {0}")]
    Memfd(#[source] nix::Error),
    #[error("cannot map {size} bytes of guest RAM: {source}")]
    Map {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot size guest RAM to {size} bytes: {source}")]
    Resize {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("guest memory size {0} bytes is not a whole number of 4 KiB pages or is zero")]
    BadSize(u64),
}

/// Guest RAM starting at guest physical address 0.
pub struct GuestMemory {
    file: File,
    map: MmapRaw,
    size: u64,
}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest RAM backed by a memfd.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadSize(size));
        }
        let fd = nix::sys::memfd::memfd_create(
            c"btvmm-ram",
            nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
        )
        .map_err(MemoryError::Memfd)?;
        let file = File::from(fd);
        file.set_len(size).map_err(|source| MemoryError::Resize { size, source })?;
        let map = MmapOptions::new()
            .len(size as usize)
            .map_raw(&file)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self { file, map, size })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The memfd behind RAM, for mappings in other address spaces.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Host address of guest physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether `[addr, addr + len)` lies wholly inside RAM.
    #[inline]
    pub fn contains(&self, addr: GuestPhys, len: u64) -> bool {
        addr < self.size && len <= self.size - addr
    }

    /// Host pointer for `[addr, addr + len)`, if it lies wholly in RAM.
    #[inline]
    pub fn host_ptr(&self, addr: GuestPhys, len: u64) -> Option<*mut u8> {
        if self.contains(addr, len) {
            // SAFETY: addr + len <= size, so the offset stays inside the mapping.
            Some(unsafe { self.host_base().add(addr as usize) })
        } else {
            None
        }
    }

    /// Reads RAM into `buf`; bytes outside RAM read as all-ones, as on a PC bus.
    pub fn read(&self, addr: GuestPhys, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = 0xff;
            let p = addr.checked_add(i as u64).and_then(|a| self.host_ptr(a, 1));
            if let Some(p) = p {
                // SAFETY: p points at one byte inside the mapping.
                *b = unsafe { p.read() };
            }
        }
    }

    /// Writes `buf` to RAM; bytes outside RAM are dropped, as on a PC bus.
    pub fn write(&self, addr: GuestPhys, buf: &[u8]) {
        if let Some(p) = self.host_ptr(addr, buf.len() as u64) {
            // SAFETY: `host_ptr` checked that [p, p+len) lies inside the mapping;
            // `buf` is a valid slice, and `copy` allows the two to overlap.
            unsafe { std::ptr::copy(buf.as_ptr(), p, buf.len()) };
            return;
        }
        for (i, b) in buf.iter().enumerate() {
            if let Some(p) = addr.checked_add(i as u64).and_then(|a| self.host_ptr(a, 1)) {
                // SAFETY: p points at one byte inside the mapping.
                unsafe { p.write(*b) };
            }
        }
    }

    /// Fills `[addr, addr + len)` with zero (BSS); bytes outside RAM are dropped.
    pub fn zero(&self, addr: GuestPhys, len: u64) {
        let end = addr.saturating_add(len).min(self.size);
        if addr >= end {
            return;
        }
        // SAFETY: [addr, end) lies inside the mapping.
        unsafe { std::ptr::write_bytes(self.host_base().add(addr as usize), 0, (end - addr) as usize) };
    }

    pub fn read_u8(&self, addr: GuestPhys) -> u8 {
        self.read_le::<1>(addr) as u8
    }
    pub fn read_u16(&self, addr: GuestPhys) -> u16 {
        self.read_le::<2>(addr) as u16
    }
    pub fn read_u32(&self, addr: GuestPhys) -> u32 {
        self.read_le::<4>(addr) as u32
    }
    pub fn read_u64(&self, addr: GuestPhys) -> u64 {
        self.read_le::<8>(addr)
    }
    pub fn write_u8(&self, addr: GuestPhys, v: u8) {
        self.write(addr, &[v]);
    }
    pub fn write_u16(&self, addr: GuestPhys, v: u16) {
        self.write(addr, &v.to_le_bytes());
    }
    pub fn write_u32(&self, addr: GuestPhys, v: u32) {
        self.write(addr, &v.to_le_bytes());
    }
    pub fn write_u64(&self, addr: GuestPhys, v: u64) {
        self.write(addr, &v.to_le_bytes());
    }

    #[inline]
    fn read_le<const N: usize>(&self, addr: GuestPhys) -> u64 {
        let mut b = [0u8; 8];
        self.read(addr, &mut b[..N]);
        u64::from_le_bytes(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_new_zero_size_is_error() {
        assert!(matches!(GuestMemory::new(0), Err(MemoryError::BadSize(0))));
    }

    #[test]
    fn memory_read_write_roundtrip_inside_ram() {
        let m = GuestMemory::new(1 << 20).unwrap();
        m.write_u32(0x1000, 0xdead_beef);
        assert_eq!(m.read_u32(0x1000), 0xdead_beef);
        assert_eq!(m.read_u8(0x1003), 0xde);
    }

    #[test]
    fn memory_outside_ram_reads_all_ones_and_drops_writes() {
        let m = GuestMemory::new(1 << 16).unwrap();
        m.write_u64(0xfffe, 0x1122_3344_5566_7788);
        assert_eq!(m.read_u16(0xfffe), 0x7788);
        assert_eq!(m.read_u32(0xfffe), 0xffff_7788);
        assert_eq!(m.read_u64(u64::MAX - 3), u64::MAX);
    }
}
