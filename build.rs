//! Builds the multiboot v1 test kernels under `tests/kernels/` with the
//! machine's gcc and ld (freestanding C and GNU assembly), plus the host
//! program that computes the `cpu` kernels' expected checksums.
//!
//! Outputs go to `<target dir>/kernels/<name>.elf` and each path is exported
//! as `BTVMM_KERNEL_<NAME>` (upper case) for `env!` in tests. 64-bit kernels
//! are linked as x86-64 and converted to ELF32 (QEMU's and GRUB's multiboot
//! loaders take only ELFCLASS32); their entry code is 32-bit.

use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_DIR: &str = "tests/kernels";

/// One test kernel: its name, bitness, sources (relative to tests/kernels)
/// and extra compiler flags.
struct Kernel {
    name: &'static str,
    bits: u32,
    sources: &'static [&'static str],
    defines: &'static [&'static str],
}

const KERNELS: &[Kernel] = &[
    Kernel { name: "modes", bits: 64, sources: &["modes.c", "modes.S"], defines: &[] },
    Kernel { name: "paging32", bits: 32, sources: &["paging.c"], defines: &["-DPAGING_32"] },
    Kernel { name: "paging_pae", bits: 32, sources: &["paging.c"], defines: &["-DPAGING_PAE"] },
    Kernel { name: "paging64", bits: 64, sources: &["paging.c"], defines: &[] },
    Kernel { name: "pit", bits: 32, sources: &["pit.c"], defines: &[] },
    Kernel { name: "tsc_calibrate", bits: 64, sources: &["tsc_calibrate.c"], defines: &[] },
    Kernel { name: "exceptions", bits: 32, sources: &["exceptions.c"], defines: &[] },
    Kernel { name: "exceptions64", bits: 64, sources: &["exceptions.c"], defines: &[] },
    Kernel { name: "sysinstr", bits: 32, sources: &["sysinstr.c"], defines: &[] },
    Kernel { name: "sysinstr64", bits: 64, sources: &["sysinstr.c"], defines: &[] },
    Kernel { name: "usermode", bits: 32, sources: &["usermode.c"], defines: &[] },
    Kernel { name: "usermode64", bits: 64, sources: &["usermode.c"], defines: &[] },
    Kernel { name: "cpu", bits: 32, sources: &["cpu.c", "workload.c"], defines: &[] },
    Kernel { name: "cpu64", bits: 64, sources: &["cpu.c", "workload.c"], defines: &[] },
    Kernel { name: "multiboot_info", bits: 32, sources: &["multiboot_info.c"], defines: &[] },
    Kernel { name: "callouts", bits: 32, sources: &["callouts.c"], defines: &[] },
    Kernel { name: "callouts64", bits: 64, sources: &["callouts.c"], defines: &[] },
    Kernel { name: "smc", bits: 32, sources: &["smc.c", "smc.S"], defines: &[] },
    Kernel { name: "smc64", bits: 64, sources: &["smc.c", "smc.S"], defines: &[] },
    Kernel { name: "codecache", bits: 32, sources: &["codecache.c", "codecache.S"], defines: &[] },
    Kernel { name: "codecache64", bits: 64, sources: &["codecache.c", "codecache.S"], defines: &[] },
    Kernel { name: "hostile", bits: 32, sources: &["hostile.c", "hostile.S"], defines: &[] },
];

const CFLAGS: &[&str] = &[
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-O2",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wno-unused-parameter",
];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let src = root.join(KERNEL_DIR);
    println!("cargo:rerun-if-changed={KERNEL_DIR}");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let dest = target_dir(&out).join("kernels");
    std::fs::create_dir_all(&dest).expect("create kernels output dir");
    let obj_root = out.join("kernel-obj");

    for k in KERNELS {
        let elf = build_kernel(k, &src, &obj_root.join(k.name));
        let final_path = dest.join(format!("{}.elf", k.name));
        std::fs::copy(&elf, &final_path).expect("copy kernel");
        println!("cargo:rustc-env=BTVMM_KERNEL_{}={}", k.name.to_uppercase(), final_path.display());
    }

    // The kernels' C flags, for scripts/compare-cpu.py to build their code
    // as host programs alike.
    std::fs::write(dest.join("kernel-cflags.txt"), CFLAGS.join("\n") + "\n").expect("write kernel-cflags.txt");

    let expected = dest.join("cpu_expected");
    run(Command::new("gcc").args(["-O2", "-Wall", "-Werror", "-o"]).arg(&expected).args([
        src.join("cpu_expected.c"),
        src.join("workload.c"),
    ]));
    println!("cargo:rustc-env=BTVMM_KERNEL_CPU_EXPECTED={}", expected.display());
    println!("cargo:rustc-env=BTVMM_KERNELS_DIR={}", dest.display());
}

/// `<target dir>`: CARGO_TARGET_DIR when set, else derived from OUT_DIR
/// (`<target>/<profile>/build/<pkg>-<hash>/out`).
fn target_dir(out: &Path) -> PathBuf {
    if let Ok(t) = std::env::var("CARGO_TARGET_DIR") {
        let t = PathBuf::from(t);
        if t.is_absolute() {
            return t;
        }
    }
    out.ancestors().nth(4).expect("OUT_DIR has the usual depth").to_path_buf()
}

fn build_kernel(k: &Kernel, src: &Path, obj_dir: &Path) -> PathBuf {
    std::fs::create_dir_all(obj_dir).expect("create object dir");
    let (m, arch_srcs, ld_emul) = match k.bits {
        32 => ("-m32", ["lib/boot32.S", "lib/isr32.S"], "elf_i386"),
        _ => ("-m64", ["lib/boot64.S", "lib/isr64.S"], "elf_x86_64"),
    };
    let name_define = format!("-DKERNEL_NAME=\"{}\"", k.name);
    let mut objects = Vec::new();
    let all = arch_srcs.iter().chain(["lib/common.c", "lib/desc.c"].iter()).chain(k.sources);
    for (i, s) in all.enumerate() {
        let obj = obj_dir.join(format!("{i}.o"));
        run(Command::new("gcc")
            .arg(m)
            .args(CFLAGS)
            .args(k.defines)
            .arg(&name_define)
            .arg("-I")
            .arg(src.join("lib"))
            .arg("-c")
            .arg(src.join(s))
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    let linked = obj_dir.join("linked.elf");
    run(Command::new("ld")
        .args(["-m", ld_emul, "-nostdlib", "-static", "--no-dynamic-linker", "-z", "noexecstack", "--no-warn-rwx-segments"])
        .args(["-z", "max-page-size=0x1000", "-T"])
        .arg(src.join("lib/link.ld"))
        .args(&objects)
        .arg("-o")
        .arg(&linked));
    if k.bits == 32 {
        return linked;
    }
    let elf32 = obj_dir.join("kernel32.elf");
    run(Command::new("objcopy").args(["-O", "elf32-i386"]).arg(&linked).arg(&elf32));
    elf32
}

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(status.success(), "test kernel build step failed: {cmd:?}");
}
