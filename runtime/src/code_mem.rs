//! Executable memory for generated code (the SIMD executor's stubs, the
//! translator's CCFs), never writable and executable at the same address: each
//! chunk is a private memfd mapped twice, read-write for the emitter and
//! read-execute for running. Chunks only grow by appending; when the byte budget
//! is spent the whole arena is dropped at once (callers drop every code pointer
//! at the same moment).
//!
//! # Safety
//! A stub pointer handed out by [`CodeArena::publish`] points into a live RX
//! mapping of bytes that were completely written before the pointer existed, and it
//! stays valid until [`CodeArena::clear`] or drop. The memfd is created here, never
//! shared, so no one else can change the mapped file underneath the mappings.

use std::fs::File;

use memmap2::{Mmap, MmapMut, MmapOptions};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// Failures to provide code memory (not guest events).
#[derive(Debug, thiserror::Error)]
pub enum CodeMemError {
    #[error("cannot map code memory: {0}")]
    Map(#[source] std::io::Error),
    #[error("code of {0} bytes exceeds a code chunk")]
    TooLarge(usize),
}

pub const CHUNK_BYTES: usize = 256 * 1024;
/// Total code bytes before the arena is flushed (bounds what a guest can make us
/// allocate by executing many distinct instructions).
pub const ARENA_BUDGET: usize = 8 * 1024 * 1024;
/// Stubs start on a cache-line boundary.
const STUB_ALIGN: usize = 64;

struct Chunk {
    writable: MmapMut,
    executable: Mmap,
    used: usize,
}

impl Chunk {
    fn new(len: usize) -> Result<Chunk, CodeMemError> {
        let fd = memfd_create(c"btvmm-code", MemFdCreateFlag::MFD_CLOEXEC)
            .map_err(|e| CodeMemError::Map(e.into()))?;
        let file = File::from(fd);
        file.set_len(len as u64).map_err(CodeMemError::Map)?;
        // SAFETY: the memfd was created just above and never escapes this module, so
        // the shared file cannot be truncated or changed behind the mapping.
        let writable = unsafe { MmapOptions::new().len(len).map_mut(&file) }
            .map_err(CodeMemError::Map)?;
        // SAFETY: as above; this second view is PROT_READ|PROT_EXEC only.
        let executable = unsafe { MmapOptions::new().len(len).map_exec(&file) }
            .map_err(CodeMemError::Map)?;
        Ok(Chunk { writable, executable, used: 0 })
    }
}

/// Append-only store of generated code.
pub struct CodeArena {
    chunks: Vec<Chunk>,
    total: usize,
    budget: usize,
    chunk_bytes: usize,
}

impl Default for CodeArena {
    fn default() -> Self {
        Self::with_budget(ARENA_BUDGET)
    }
}

impl CodeArena {
    pub fn with_budget(budget: usize) -> Self {
        CodeArena { chunks: Vec::new(), total: 0, budget, chunk_bytes: CHUNK_BYTES }
    }

    /// An arena whose chunks (one memfd each) are `chunk_bytes` long.
    pub fn with_chunks(budget: usize, chunk_bytes: usize) -> Self {
        CodeArena { chunks: Vec::new(), total: 0, budget, chunk_bytes: chunk_bytes.max(CHUNK_BYTES) }
    }

    /// True once the byte budget is spent; the owner then calls [`CodeArena::clear`].
    pub fn is_full(&self) -> bool {
        self.total >= self.budget
    }

    /// Copies `code` in and returns its executable address.
    pub fn publish(&mut self, code: &[u8]) -> Result<*const u8, CodeMemError> {
        let chunk_bytes = self.chunk_bytes;
        if code.len() > chunk_bytes {
            return Err(CodeMemError::TooLarge(code.len()));
        }
        let fits = |c: &Chunk| c.used + code.len() <= c.writable.len();
        if !self.chunks.last().is_some_and(fits) {
            self.chunks.push(Chunk::new(chunk_bytes)?);
        }
        let chunk = self.chunks.last_mut().expect("a chunk was just ensured");
        let start = chunk.used;
        chunk.writable[start..start + code.len()].copy_from_slice(code);
        chunk.used = (start + code.len()).next_multiple_of(STUB_ALIGN).min(chunk.writable.len());
        self.total += code.len();
        // The RX view aliases the same pages, so the bytes are visible there; x86
        // keeps instruction fetch coherent with stores to the physical page.
        Ok(chunk.executable[start..].as_ptr())
    }

    /// The executable address ranges of the chunks mapped now.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        self.chunks.iter().map(|c| (c.executable.as_ptr() as usize, c.executable.as_ptr() as usize + c.executable.len())).collect()
    }

    /// Each chunk's executable start, its length, and its writable view of
    /// the same bytes (for code patched from a signal handler).
    pub fn views(&mut self) -> Vec<(usize, usize, *mut u8)> {
        self.chunks.iter_mut().map(|c| (c.executable.as_ptr() as usize, c.executable.len(), c.writable.as_mut_ptr())).collect()
    }

    /// Bytes published since the last clear.
    pub fn used(&self) -> usize {
        self.total
    }

    /// Rewrites published code at executable address `at` (chaining a jump).
    /// Returns false if `at..at+len` is not inside published code.
    pub fn patch(&mut self, at: *const u8, bytes: &[u8]) -> bool {
        for c in &mut self.chunks {
            let base = c.executable.as_ptr() as usize;
            let start = (at as usize).wrapping_sub(base);
            if (at as usize) >= base && start + bytes.len() <= c.used {
                c.writable[start..start + bytes.len()].copy_from_slice(bytes);
                return true;
            }
        }
        false
    }

    /// Unmaps all code. Every pointer from `publish` is dangling afterwards.
    pub fn clear(&mut self) {
        self.chunks.clear();
        self.total = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bytes_visible_through_executable_view() {
        let mut arena = CodeArena::default();

        let first = arena.publish(&[0xc3]).expect("publish");
        let second = arena.publish(&[0x90, 0xc3]).expect("publish");

        // SAFETY: both pointers are into live RX mappings of at least the published length.
        let (a, b) = unsafe { (*first, std::slice::from_raw_parts(second, 2)) };
        assert_eq!(a, 0xc3);
        assert_eq!(b, &[0x90, 0xc3]);
        assert_eq!(second as usize - first as usize, STUB_ALIGN);
    }

    #[test]
    fn publish_oversized_code_rejected() {
        let mut arena = CodeArena::default();

        assert!(matches!(arena.publish(&vec![0x90; CHUNK_BYTES + 1]), Err(CodeMemError::TooLarge(_))));
    }
}
