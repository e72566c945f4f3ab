//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;

/// A multiboot image (a.out kludge) loaded at 1 MiB whose code, entered in
/// 32-bit protected mode, is `code` (after the 32-byte header). Written to
/// a temporary file named after the test process and `name`.
pub fn aout_kernel(name: &str, code: &[u8]) -> PathBuf {
    let magic: u32 = 0x1bad_b002;
    let flags: u32 = 1 << 16;
    let base: u32 = 0x10_0000;
    let mut img = Vec::new();
    for w in [magic, flags, magic.wrapping_add(flags).wrapping_neg(), base, base, 0, 0, base + 32] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.extend_from_slice(code);
    let path = std::env::temp_dir().join(format!("btvmm-test-{}-{name}.bin", std::process::id()));
    std::fs::write(&path, img).expect("write kernel");
    path
}
