//! Runs each test kernel under QEMU, the reference machine, and compares
//! its serial output with `tests/kernels/expected/<name>.txt` and its exit
//! status with the pass code. The cpu kernels are compared with the host
//! build of their workload instead (cpu_expected).
//!
//! Needs `qemu-system-x86_64` (`.ci/run` installs it); BTVMM_NO_QEMU=1 skips.
//! `BTVMM_BLESS=1` rewrites the expected files from QEMU's output.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debug-exit code 0x10 -> exit status (0x10 << 1) | 1.
const PASS_STATUS: i32 = 33;

/// QEMU, which `.ci/run` installs. Without it the tests fail, unless
/// BTVMM_NO_QEMU=1 says to skip the reference runs on purpose.
fn qemu() -> Option<&'static str> {
    let found = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("BTVMM_NO_QEMU").is_some(),
            "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86, or set BTVMM_NO_QEMU=1 to skip)"
        );
        eprintln!("BTVMM_NO_QEMU set: kernel not checked against QEMU");
    }
    found.then_some("qemu-system-x86_64")
}

/// Runs `kernel` under QEMU; returns (exit status, lines the kernel printed,
/// with its `name: ` prefix kept and firmware output dropped).
fn run(kernel: &str, name: &str, extra: &[&str]) -> Option<(i32, Vec<String>)> {
    let qemu = qemu()?;
    let out = Command::new("timeout")
        .arg("120")
        .arg(qemu)
        .args(["-cpu", "max", "-m", "128", "-kernel", kernel, "-nographic", "-serial", "stdio"])
        .args(["-monitor", "none", "-display", "none", "-no-reboot"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=4"])
        .args(extra)
        .output()
        .expect("run qemu");
    let lines = common::kernel_lines(&out.stdout, name);
    Some((out.status.code().unwrap_or(-1), lines))
}

fn expected_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels/expected").join(file)
}

/// QEMU's TCG does not hide host preemption from its guest's clocks, so a
/// kernel that measures time (the PIT, TSC calibration) can fail under QEMU
/// on a loaded host. Those run one at a time, and get three tries.
static TIMED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn check_timed(name: &str, kernel: &str) {
    let _turn = TIMED.lock().unwrap_or_else(|e| e.into_inner());
    let want = std::fs::read_to_string(expected_path(&format!("{name}.txt"))).expect("expected output file");
    for _ in 0..2 {
        let Some((status, lines)) = run(kernel, name, &[]) else { return };
        if lines.join("\n") + "\n" == want && status == PASS_STATUS {
            return;
        }
        eprintln!("{name}: QEMU disagreed with the recording (host load?); trying again");
    }
    check_against_file(name, kernel, &[], &[]);
}

fn check_against_file(name: &str, kernel: &str, extra: &[&str], substitutions: &[(&str, &str)]) {
    check_against_named_file(name, &format!("{name}.txt"), kernel, extra, substitutions);
}

fn check_against_named_file(name: &str, file: &str, kernel: &str, extra: &[&str], substitutions: &[(&str, &str)]) {
    let Some((status, lines)) = run(kernel, name, extra) else { return };
    let mut got = lines.join("\n") + "\n";
    for (from, to) in substitutions {
        got = got.replace(from, to);
    }
    let path = expected_path(file);
    if std::env::var_os("BTVMM_BLESS").is_some() {
        std::fs::write(&path, &got).expect("write expected output");
    }
    let want = std::fs::read_to_string(&path).expect("expected output file");
    assert_eq!(got, want, "{name}: output differs from {}", path.display());
    assert_eq!(status, PASS_STATUS, "{name}: exit status");
}

macro_rules! kernel_test {
    ($test:ident, $name:literal, $env:literal) => {
        #[test]
        fn $test() {
            check_against_file($name, env!($env), &[], &[]);
        }
    };
}

kernel_test!(modes_matches_qemu, "modes", "BTVMM_KERNEL_MODES");
kernel_test!(paging32_matches_qemu, "paging32", "BTVMM_KERNEL_PAGING32");
kernel_test!(paging_pae_matches_qemu, "paging_pae", "BTVMM_KERNEL_PAGING_PAE");
kernel_test!(paging64_matches_qemu, "paging64", "BTVMM_KERNEL_PAGING64");

#[test]
fn pit_matches_qemu() {
    check_timed("pit", env!("BTVMM_KERNEL_PIT"));
}

#[test]
fn tsc_calibrate_matches_qemu() {
    check_timed("tsc_calibrate", env!("BTVMM_KERNEL_TSC_CALIBRATE"));
}

kernel_test!(exceptions_matches_qemu, "exceptions", "BTVMM_KERNEL_EXCEPTIONS");
kernel_test!(exceptions64_matches_qemu, "exceptions64", "BTVMM_KERNEL_EXCEPTIONS64");
kernel_test!(sysinstr_matches_qemu, "sysinstr", "BTVMM_KERNEL_SYSINSTR");
kernel_test!(sysinstr64_matches_qemu, "sysinstr64", "BTVMM_KERNEL_SYSINSTR64");
kernel_test!(usermode_matches_qemu, "usermode", "BTVMM_KERNEL_USERMODE");
kernel_test!(usermode64_matches_qemu, "usermode64", "BTVMM_KERNEL_USERMODE64");
kernel_test!(callouts_matches_qemu, "callouts", "BTVMM_KERNEL_CALLOUTS");
kernel_test!(callouts64_matches_qemu, "callouts64", "BTVMM_KERNEL_CALLOUTS64");
kernel_test!(smc_matches_qemu, "smc", "BTVMM_KERNEL_SMC");
kernel_test!(smc64_matches_qemu, "smc64", "BTVMM_KERNEL_SMC64");
kernel_test!(codecache_matches_qemu, "codecache", "BTVMM_KERNEL_CODECACHE");
kernel_test!(codecache64_matches_qemu, "codecache64", "BTVMM_KERNEL_CODECACHE64");
kernel_test!(hostile_matches_qemu, "hostile", "BTVMM_KERNEL_HOSTILE");

#[test]
fn hostile_without_frame_flags_matches_qemu() {
    let kernel = env!("BTVMM_KERNEL_HOSTILE");
    check_against_named_file("hostile", "hostile.noframeflags.txt", kernel, &["-append", "noframeflags=1"], &[]);
}

#[test]
fn multiboot_info_matches_qemu() {
    let mods = common::MbiModules::create("qemu");
    let (m0s, m1s, initrd) = (&mods.m0, &mods.m1, &mods.initrd);
    let kernel = env!("BTVMM_KERNEL_MULTIBOOT_INFO");
    check_against_file(
        "multiboot_info",
        kernel,
        &["-append", "alpha=1 beta", "-initrd", initrd],
        &[(kernel, "$KERNEL"), (m0s, "$MOD0"), (m1s, "$MOD1")],
    );
}

/// The cpu kernels' checksums equal the host's for the same iteration count.
fn check_cpu(name: &str, kernel: &str) {
    let Some((status, lines)) = run(kernel, name, &["-append", "iterations=3"]) else { return };
    assert_eq!(lines, common::cpu_expected(name, 3));
    assert_eq!(status, PASS_STATUS);
}

#[test]
fn cpu_checksums_match_host() {
    check_cpu("cpu", env!("BTVMM_KERNEL_CPU"));
}

#[test]
fn cpu64_checksums_match_host() {
    check_cpu("cpu64", env!("BTVMM_KERNEL_CPU64"));
}
