//! Runs each test kernel under btvmm, with each engine (the interpreter and
//! the binary translator), and compares its serial output with
//! `tests/kernels/expected/<name>.txt` (recorded under QEMU, the reference
//! machine) and its exit status with the pass code. The cpu kernels are
//! compared with the host build of their workload (cpu_expected).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

/// Debug-exit code 0x10 -> exit status (0x10 << 1) | 1.
const PASS_STATUS: i32 = 33;

/// Runs `kernel` under btvmm; returns (exit status, the kernel's lines).
fn run(engine: &str, kernel: &str, name: &str, extra: &[&str]) -> (i32, Vec<String>) {
    let out = Command::new("timeout")
        .arg("300")
        .arg(env!("CARGO_BIN_EXE_btvmm"))
        .args(["run", "--engine", engine, "-m", "128M", "--multiboot", kernel])
        .args(extra)
        .output()
        .expect("run btvmm");
    let lines = common::kernel_lines(&out.stdout, name);
    if !out.stderr.is_empty() {
        eprintln!("{name} stderr:\n{}", String::from_utf8_lossy(&out.stderr));
    }
    (out.status.code().unwrap_or(-1), lines)
}

fn expected_path(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kernels/expected").join(file)
}

fn check_against_file(engine: &str, name: &str, file: &str, kernel: &str, extra: &[&str], substitutions: &[(&str, &str)]) {
    let (status, lines) = run(engine, kernel, name, extra);
    let mut got = lines.join("\n") + "\n";
    for (from, to) in substitutions {
        got = got.replace(from, to);
    }
    let path = expected_path(file);
    let want = std::fs::read_to_string(&path).expect("expected output file");
    assert_eq!(got, want, "{name} ({engine}): output differs from {}", path.display());
    assert_eq!(status, PASS_STATUS, "{name} ({engine}): exit status");
}

macro_rules! kernel_test {
    ($test:ident, $name:literal, $env:literal) => {
        #[test]
        fn $test() {
            check_against_file(ENGINE, $name, concat!($name, ".txt"), env!($env), &[], &[]);
        }
    };
}

/// btvmm has no firmware: all RAM above 1 MiB is usable (no ACPI or BIOS
/// areas as under QEMU), so mem_upper and the map differ from QEMU's by
/// design, and the loader names itself; the expected file says so.
fn check_multiboot_info(engine: &str) {
    let mods = common::MbiModules::create(&format!("btvmm-{engine}"));
    let (m0s, m1s, initrd) = (&mods.m0, &mods.m1, &mods.initrd);
    let kernel = env!("BTVMM_KERNEL_MULTIBOOT_INFO");
    check_against_file(
        engine,
        "multiboot_info",
        "multiboot_info.btvmm.txt",
        kernel,
        &["--append", "alpha=1 beta", "--initrd", initrd],
        &[(kernel, "$KERNEL"), (m0s, "$MOD0"), (m1s, "$MOD1")],
    );
}

/// The cpu kernels' checksums equal the host's for the same iteration count.
fn check_cpu(engine: &str, name: &str, kernel: &str) {
    let (status, lines) = run(engine, kernel, name, &["--append", "iterations=3"]);
    assert_eq!(lines, common::cpu_expected(name, 3), "{name} ({engine})");
    assert_eq!(status, PASS_STATUS, "{name} ({engine})");
}

/// Some parts of the cpu kernels' workload alone (`parts=M`, as
/// scripts/compare-cpu.py times them): the host's checksums for the same,
/// and each part that ran gives what it gives in a whole round (it worked
/// on the same data).
fn check_cpu_parts(engine: &str, name: &str, kernel: &str, parts: u32) {
    let append = format!("iterations=2 parts={parts}");
    let (status, lines) = run(engine, kernel, name, &["--append", &append]);
    assert_eq!(lines, common::cpu_parts_expected(name, 2, parts), "{name} {append} ({engine})");
    assert_eq!(status, PASS_STATUS, "{name} {append} ({engine})");
    // Lines 1-4: sieve, crc32, sort, mem (parts 1, 2, 4, 8).
    let whole = common::cpu_parts_expected(name, 2, 15);
    for (bit, line) in [(1, 1), (2, 2), (4, 3), (8, 4)] {
        if parts & bit != 0 {
            assert_eq!(lines[line], whole[line], "{name} {append} ({engine}) against a whole round");
        }
    }
}

/// Every test kernel under one engine.
macro_rules! engine_tests {
    ($module:ident, $engine:literal) => {
        mod $module {
            use super::*;
            const ENGINE: &str = $engine;

            kernel_test!(modes_matches_reference, "modes", "BTVMM_KERNEL_MODES");
            kernel_test!(paging32_matches_reference, "paging32", "BTVMM_KERNEL_PAGING32");
            kernel_test!(paging_pae_matches_reference, "paging_pae", "BTVMM_KERNEL_PAGING_PAE");
            kernel_test!(paging64_matches_reference, "paging64", "BTVMM_KERNEL_PAGING64");
            kernel_test!(pit_matches_reference, "pit", "BTVMM_KERNEL_PIT");
            kernel_test!(tsc_calibrate_matches_reference, "tsc_calibrate", "BTVMM_KERNEL_TSC_CALIBRATE");
            kernel_test!(exceptions_matches_reference, "exceptions", "BTVMM_KERNEL_EXCEPTIONS");
            kernel_test!(exceptions64_matches_reference, "exceptions64", "BTVMM_KERNEL_EXCEPTIONS64");
            kernel_test!(sysinstr_matches_reference, "sysinstr", "BTVMM_KERNEL_SYSINSTR");
            kernel_test!(sysinstr64_matches_reference, "sysinstr64", "BTVMM_KERNEL_SYSINSTR64");
            kernel_test!(usermode_matches_reference, "usermode", "BTVMM_KERNEL_USERMODE");
            kernel_test!(usermode64_matches_reference, "usermode64", "BTVMM_KERNEL_USERMODE64");
            kernel_test!(callouts_matches_reference, "callouts", "BTVMM_KERNEL_CALLOUTS");
            kernel_test!(callouts64_matches_reference, "callouts64", "BTVMM_KERNEL_CALLOUTS64");
            kernel_test!(smc_matches_reference, "smc", "BTVMM_KERNEL_SMC");
            kernel_test!(smc64_matches_reference, "smc64", "BTVMM_KERNEL_SMC64");
            kernel_test!(codecache_matches_reference, "codecache", "BTVMM_KERNEL_CODECACHE");
            kernel_test!(codecache64_matches_reference, "codecache64", "BTVMM_KERNEL_CODECACHE64");

            #[test]
            fn hostile_matches_reference() {
                check_against_file(ENGINE, "hostile", "hostile.txt", env!("BTVMM_KERNEL_HOSTILE"), &[], &[]);
            }

            /// Everything but the EFLAGS saved in exception frames.
            #[test]
            fn hostile_without_frame_flags_matches_reference() {
                check_hostile_without_frame_flags(ENGINE);
            }

            #[test]
            fn multiboot_info_matches_spec() {
                check_multiboot_info(ENGINE);
            }

            #[test]
            fn cpu_checksums_match_host() {
                check_cpu(ENGINE, "cpu", env!("BTVMM_KERNEL_CPU"));
            }

            #[test]
            fn cpu64_checksums_match_host() {
                check_cpu(ENGINE, "cpu64", env!("BTVMM_KERNEL_CPU64"));
            }

            #[test]
            fn cpu_parts_match_host() {
                check_cpu_parts(ENGINE, "cpu", env!("BTVMM_KERNEL_CPU"), 5);
                check_cpu_parts(ENGINE, "cpu64", env!("BTVMM_KERNEL_CPU64"), 10);
            }
        }
    };
}

engine_tests!(interp, "interp");
engine_tests!(bt, "bt");

fn check_hostile_without_frame_flags(engine: &str) {
    check_against_file(
        engine,
        "hostile",
        "hostile.noframeflags.txt",
        env!("BTVMM_KERNEL_HOSTILE"),
        &["--append", "noframeflags=1"],
        &[],
    );
}

/// hostile with `strict=1` adds the corners where QEMU is no reference
/// (values read beyond RAM, #AC, a store through CS, lock on mov, the #PF
/// error code of a read-modify-write, sandbox faults reported as they are):
/// both engines must print the same.
#[test]
fn hostile_strict_engines_agree() {
    let kernel = env!("BTVMM_KERNEL_HOSTILE");
    let args = ["--append", "strict=1 noframeflags=1"];
    let (interp_status, interp_lines) = run("interp", kernel, "hostile", &args);
    let (bt_status, bt_lines) = run("bt", kernel, "hostile", &args);
    assert_eq!(interp_lines, bt_lines, "hostile strict=1: interp and bt differ");
    assert_eq!((interp_status, bt_status), (PASS_STATUS, PASS_STATUS), "hostile strict=1: exit status");
}

/// The translator with a small code cache (the smallest, 64 KiB, a few
/// hundred translations, except for hostile): the codecache kernels'
/// thousands of functions are translated, evicted and unchained over and
/// over, and self-modifying and generated code meets evictions. The output
/// must not change.
mod bt_small_cache {
    use super::*;

    macro_rules! small_cache_test {
        ($test:ident, $name:literal, $env:literal) => {
            #[test]
            fn $test() {
                check_against_file("bt", $name, concat!($name, ".txt"), env!($env), &["--code-cache", "64K"], &[]);
            }
        };
    }

    small_cache_test!(codecache_matches_reference, "codecache", "BTVMM_KERNEL_CODECACHE");
    small_cache_test!(codecache64_matches_reference, "codecache64", "BTVMM_KERNEL_CODECACHE64");
    small_cache_test!(smc_matches_reference, "smc", "BTVMM_KERNEL_SMC");
    small_cache_test!(smc64_matches_reference, "smc64", "BTVMM_KERNEL_SMC64");

    /// hostile rewrites its sandbox code page for every one of its 3000 runs.
    /// Its own code needs 300-400 KiB of translations: with 512 KiB it still
    /// evicts (some 16000 times) but does not translate everything again on
    /// every run, as it does with 64 KiB (over ten times slower).
    #[test]
    fn hostile_without_frame_flags_matches_reference() {
        check_against_file(
            "bt",
            "hostile",
            "hostile.noframeflags.txt",
            env!("BTVMM_KERNEL_HOSTILE"),
            &["--code-cache", "512K", "--append", "noframeflags=1"],
            &[],
        );
    }
}
