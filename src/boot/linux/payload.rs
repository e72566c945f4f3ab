//! The bzImage payload: the compressed `vmlinux.bin` that the in-guest
//! decompressor (arch/x86/boot/compressed/misc.c, extract_kernel) unpacks.
//! `--fast-boot` unpacks it on the host instead.
//!
//! The setup header's `payload_offset`/`payload_length` (protocol 2.08+)
//! locate it, relative to the protected-mode code. Its format is named only
//! by its magic, as boot.rst says. The kernel's build appends the
//! uncompressed size as 4 little-endian bytes after the compressed stream
//! (`size_append` in scripts/Makefile.lib; gzip's own trailer says the same),
//! so every decoder here reads one stream and ignores what follows it.

use std::io::Read;

use super::LinuxError;

/// The compressions `CONFIG_KERNEL_*` can choose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PayloadFormat {
    Bzip2,
    Gzip,
    Lz4,
    Lzma,
    Lzo,
    Xz,
    Zstd,
}

impl PayloadFormat {
    /// The format named by the payload's first bytes (lib/decompress.c's table).
    pub fn detect(payload: &[u8]) -> Option<Self> {
        const MAGICS: &[(&[u8], PayloadFormat)] = &[
            (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], PayloadFormat::Xz),
            (&[0x1f, 0x8b], PayloadFormat::Gzip),
            (&[0x28, 0xb5, 0x2f, 0xfd], PayloadFormat::Zstd),
            (b"BZh", PayloadFormat::Bzip2),
            (&[0x5d, 0x00, 0x00], PayloadFormat::Lzma),
            (&[0x89, b'L', b'Z', b'O'], PayloadFormat::Lzo),
            (&[0x02, 0x21, 0x4c, 0x18], PayloadFormat::Lz4),
        ];
        MAGICS.iter().find(|(m, _)| payload.starts_with(m)).map(|&(_, f)| f)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Bzip2 => "bzip2",
            Self::Gzip => "gzip",
            Self::Lz4 => "LZ4",
            Self::Lzma => "LZMA",
            Self::Lzo => "LZO",
            Self::Xz => "XZ",
            Self::Zstd => "zstd",
        }
    }
}

/// Decompresses `payload`; refuses output longer than `limit` bytes (it
/// could not fit in guest RAM anyway).
pub fn decompress(payload: &[u8], limit: u64) -> Result<Vec<u8>, LinuxError> {
    let format = PayloadFormat::detect(payload).ok_or_else(|| LinuxError::UnknownPayload {
        magic: payload.iter().take(6).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "),
    })?;
    let failed = |reason: String| LinuxError::Decompress { format: format.name(), reason };
    let reader: Box<dyn Read + '_> = match format {
        PayloadFormat::Gzip => Box::new(flate2::read::GzDecoder::new(payload)),
        PayloadFormat::Xz => Box::new(lzma_rust2::XzReader::new(payload, false)),
        PayloadFormat::Lzma => {
            Box::new(lzma_rust2::LzmaReader::new_mem_limit(payload, u32::MAX, None).map_err(|e| failed(e.to_string()))?)
        }
        PayloadFormat::Zstd => {
            Box::new(ruzstd::decoding::StreamingDecoder::new(payload).map_err(|e| failed(e.to_string()))?)
        }
        PayloadFormat::Bzip2 | PayloadFormat::Lz4 | PayloadFormat::Lzo => {
            return Err(LinuxError::UnsupportedPayload { format: format.name() })
        }
    };
    let mut out = Vec::with_capacity(size_hint(payload).min(limit) as usize);
    reader.take(limit.saturating_add(1)).read_to_end(&mut out).map_err(|e| failed(e.to_string()))?;
    if out.len() as u64 > limit {
        return Err(failed(format!("it unpacks to more than the {} MiB of guest RAM", limit >> 20)));
    }
    Ok(out)
}

/// The uncompressed size the build appended (a hint only: never trusted).
fn size_hint(payload: &[u8]) -> u64 {
    match payload.len().checked_sub(4) {
        Some(at) => u64::from(u32::from_le_bytes([payload[at], payload[at + 1], payload[at + 2], payload[at + 3]])),
        None => 0,
    }
}
