//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;

/// A temporary file, removed when dropped.
pub struct TempFile(PathBuf);

impl std::ops::Deref for TempFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A multiboot image (a.out kludge) loaded at 1 MiB whose code, entered in
/// 32-bit protected mode, is `code` (after the 32-byte header). Written to
/// a temporary file named after the test process and `name`, removed when
/// the returned value is dropped.
#[allow(dead_code)]
pub fn aout_kernel(name: &str, code: &[u8]) -> TempFile {
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
    TempFile(path)
}

/// The lines a test kernel printed (each starts with `name: `), from raw
/// serial output, without carriage returns or anything else on the console.
#[allow(dead_code)]
pub fn kernel_lines(stdout: &[u8], name: &str) -> Vec<String> {
    let text = String::from_utf8_lossy(stdout);
    let prefix = format!("{name}: ");
    text.split('\n').filter_map(|l| l.find(&prefix).map(|i| l[i..].trim_end_matches('\r').to_string())).collect()
}

/// Two module files for the multiboot_info kernel, and the `--initrd` list
/// naming them (the first with arguments), as QEMU's `-initrd` takes it.
#[allow(dead_code)]
pub struct MbiModules {
    pub dir: PathBuf,
    pub m0: String,
    pub m1: String,
    pub initrd: String,
}

#[allow(dead_code)]
impl MbiModules {
    pub fn create(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("btvmm-mbi-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (m0, m1) = (dir.join("mod0.bin"), dir.join("mod1.txt"));
        std::fs::write(&m0, [0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6]).expect("module 0");
        std::fs::write(&m1, b"second module\n").expect("module 1");
        let (m0, m1) = (m0.to_string_lossy().into_owned(), m1.to_string_lossy().into_owned());
        let initrd = format!("{m0} arg=1,{m1}");
        Self { dir, m0, m1, initrd }
    }
}

#[allow(dead_code)]
impl Drop for MbiModules {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the cpu kernels must print for `iterations`, computed by the host
/// build of the same workload.
#[allow(dead_code)]
pub fn cpu_expected(name: &str, iterations: u32) -> Vec<String> {
    cpu_parts_expected(name, iterations, 15)
}

/// What the cpu kernels must print for `iterations=N parts=M` (the mask of
/// the workload's parts in workload.h; 15 is all of them).
#[allow(dead_code)]
pub fn cpu_parts_expected(name: &str, iterations: u32, parts: u32) -> Vec<String> {
    let host = std::process::Command::new(env!("BTVMM_KERNEL_CPU_EXPECTED"))
        .arg(iterations.to_string())
        .arg(parts.to_string())
        .output()
        .expect("run cpu_expected");
    assert!(host.status.success(), "cpu_expected {iterations} {parts}: {}", host.status);
    let mut want: Vec<String> = String::from_utf8_lossy(&host.stdout).lines().map(|l| format!("{name}: {l}")).collect();
    want.push(format!("{name}: PASS"));
    want
}
