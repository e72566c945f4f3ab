//! The command line as a user meets it: bad input gets one clear line and a
//! non-zero status; a guest's exit port, triple fault and `--stats` reach
//! the user, and so does a VGA text screen. Small multiboot images (a.out
//! kludge) are built here.

mod common;

use std::process::{Command, Output};

use common::aout_kernel;

fn btvmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_btvmm")).args(args).output().expect("run btvmm")
}

/// mov dx, 0x3f8; mov al, c; out dx, al (per byte); mov al, code; out 0xf4, al; hlt
fn print_and_exit(text: &[u8], code: u8) -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xf8, 0x03];
    for &b in text {
        c.extend_from_slice(&[0xb0, b, 0xee]);
    }
    c.extend_from_slice(&[0xb0, code, 0xe6, 0xf4, 0xf4]);
    c
}

fn stderr_lines(o: &Output) -> Vec<String> {
    String::from_utf8_lossy(&o.stderr).lines().map(str::to_string).collect()
}

#[test]
fn run_file_that_is_no_kernel_fails_with_one_line() {
    let o = btvmm(&["run", "--multiboot", "/etc/passwd"]);
    assert_ne!(o.status.code(), Some(0));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("not a multiboot kernel"), "{lines:?}");
}

#[test]
fn run_missing_kernel_fails_with_one_line() {
    let o = btvmm(&["run", "--multiboot", "/nonexistent/kernel.elf"]);
    assert_ne!(o.status.code(), Some(0));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("cannot read kernel"), "{lines:?}");
}

#[test]
fn run_memory_too_small_for_kernel_fails_with_one_line() {
    let k = aout_kernel("small", &print_and_exit(b"x", 0));
    let o = btvmm(&["run", "--multiboot", k.to_str().unwrap(), "-m", "1M"]);
    assert_ne!(o.status.code(), Some(0));
    let lines = stderr_lines(&o);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(lines[0].contains("outside guest memory"), "{lines:?}");
}

#[test]
fn run_bad_memory_size_is_rejected() {
    let o = btvmm(&["run", "--multiboot", "/etc/passwd", "-m", "lots"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid memory size"));
}

#[test]
fn run_guest_output_and_exit_port_reach_the_user() {
    let k = aout_kernel("hello", &print_and_exit(b"hello\n", 5));
    let o = btvmm(&["run", "--multiboot", k.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello\n");
    assert_eq!(o.status.code(), Some((5 << 1) | 1));
}

#[test]
fn run_triple_fault_reports_guest_state_and_fails() {
    // ud2 with no usable IDT: #UD, then #GP on the gate, #DF, triple fault.
    let k = aout_kernel("triple", &[0x0f, 0x0b]);
    let o = btvmm(&["run", "--multiboot", k.to_str().unwrap()]);
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("RIP=0000000000100020"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn run_stats_reports_instructions_exceptions_and_io() {
    let k = aout_kernel("stats", &print_and_exit(b"ok\n", 0));
    let o = btvmm(&["run", "--engine", "interp", "--multiboot", k.to_str().unwrap(), "--stats"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    // mov dx; then mov al + out per byte and for the exit code.
    assert!(err.contains("guest instructions executed: 9"), "{err}");
    assert!(err.contains("I/O port accesses by device: debug-exit:1 com1:3"), "{err}");
    assert!(err.contains("translation units: none (engine: interpreter)"), "{err}");
}

#[test]
fn run_stats_under_the_translator_reports_tus_and_callouts() {
    let k = aout_kernel("stats-bt", &print_and_exit(b"ok\n", 0));
    let o = btvmm(&["run", "--multiboot", k.to_str().unwrap(), "--stats"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    // The code is mov dx / (mov al, out)* : TUs of a mov each, ended by the
    // out, which runs in the runtime.
    assert!(err.contains("translation units: 16-bit 0, 32-bit "), "{err}");
    assert!(err.contains("callouts: 4 (out:4)"), "{err}");
    assert!(err.contains("I/O port accesses by device: debug-exit:1 com1:3"), "{err}");
}

/// A kernel in the style of the OSDev wiki's "Bare Bones": it writes to the
/// VGA text buffer only and halts with interrupts off. btvmm has no display,
/// so the screen is printed when the guest stops, under either engine.
#[test]
fn run_vga_text_screen_is_shown_when_the_guest_stops() {
    let mut code = Vec::new();
    // mov dword [0xb8000 + 2 * (80 * row + col)], "<c1><attr><c2><attr>"
    for (at, pair) in [(0u32, b"Hi"), (4, b", "), (8, b"VG"), (12, b"A!"), (2 * (80 * 2 + 3), b"ok")] {
        code.extend_from_slice(&[0xc7, 0x05]);
        code.extend_from_slice(&(0xb_8000 + at).to_le_bytes());
        code.extend_from_slice(&[pair[0], 0x1f, pair[1], 0x1f]);
    }
    code.extend_from_slice(&[0xfa, 0xf4]); // cli; hlt
    let k = aout_kernel("vga", &code);
    for engine in ["interp", "bt"] {
        let o = btvmm(&["run", "--engine", engine, "--multiboot", k.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{engine}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("VGA text screen (0xb8000) at its end:\nHi, VGA!\n\n   ok\n"), "{engine}: {err}");
        assert!(err.contains("halted with interrupts disabled"), "{engine}: {err}");
        assert!(o.stdout.is_empty(), "{engine}");
    }
    // A kernel that leaves the screen alone shows none.
    let k = aout_kernel("novga", &print_and_exit(b"ok\n", 0));
    let o = btvmm(&["run", "--multiboot", k.to_str().unwrap()]);
    assert!(!String::from_utf8_lossy(&o.stderr).contains("VGA"));
}
