//! The interactive console, as a user at a terminal meets it: btvmm runs on
//! a pseudo-terminal with a tiny guest that echoes COM1 input back. Typed
//! bytes (control characters included) reach the guest, the Ctrl-A escapes
//! work, and the terminal's modes are as before once btvmm has exited,
//! whether by Ctrl-A x or by a signal. A piped stdin that ends does not
//! stop the guest.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::pty::openpty;
use nix::sys::signal::{kill, Signal};
use nix::sys::termios::{tcgetattr, LocalFlags, Termios};
use nix::unistd::Pid;

const TIMEOUT: Duration = Duration::from_secs(20);
const BANNER: &[u8] = b"ready> ";

/// Prints `ready> ` (no newline: it must show without one), then echoes
/// every byte COM1 receives, polling LSR.
fn echo_kernel() -> common::TempFile {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for &b in BANNER {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[
        0x66, 0xba, 0xfd, 0x03, // top: mov dx, 0x3fd (LSR)
        0xec, //                   poll: in al, dx
        0xa8, 0x01, //             test al, 1 (data ready)
        0x74, 0xfb, //             jz poll
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, //                   in al, dx (RBR)
        0xee, //                   out dx, al (THR)
        0xeb, 0xef, //             jmp top
    ]);
    common::aout_kernel("echo", &code)
}

/// btvmm on a pty: stdin, stdout and stderr all the slave, as in a shell.
struct OnPty {
    child: Child,
    master: File,
    /// Kept open so the modes can be read after btvmm exits.
    slave: OwnedFd,
    /// The modes before btvmm started.
    before: Modes,
    seen: Vec<u8>,
    /// The kernel's file, there for as long as btvmm may read it.
    _kernel: common::TempFile,
}

impl OnPty {
    fn spawn() -> Self {
        let pty = openpty(None, None).expect("openpty");
        let before = Modes::of(&tcgetattr(&pty.slave).expect("tcgetattr"));
        let stdio = || Stdio::from(pty.slave.try_clone().expect("dup slave"));
        let kernel = echo_kernel();
        let child = Command::new(env!("CARGO_BIN_EXE_btvmm"))
            .args(["run", "--multiboot", kernel.to_str().unwrap()])
            .stdin(stdio())
            .stdout(stdio())
            .stderr(stdio())
            .spawn()
            .expect("run btvmm");
        Self { child, master: File::from(pty.master), slave: pty.slave, before, seen: Vec::new(), _kernel: kernel }
    }

    fn modes(&self) -> Modes {
        Modes::of(&tcgetattr(&self.slave).expect("tcgetattr"))
    }

    fn type_bytes(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to pty");
    }

    /// Reads the terminal until `needle` shows after what was already
    /// seen; returns everything read since the previous call.
    fn expect(&mut self, needle: &[u8]) -> Vec<u8> {
        let start = self.seen.len();
        read_until(&mut self.master, &mut self.seen, start, needle);
        self.seen[start..].to_vec()
    }

    fn wait(&mut self) -> ExitStatus {
        wait_with_timeout(&mut self.child)
    }
}

impl Drop for OnPty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The parts of a terminal's settings raw mode changes, comparable.
#[derive(Debug, PartialEq, Eq)]
struct Modes(String);

impl Modes {
    fn of(t: &Termios) -> Self {
        Self(format!(
            "{:?} {:?} {:?} {:?} {:?}",
            t.input_flags, t.output_flags, t.local_flags, t.control_flags, t.control_chars
        ))
    }
}

fn read_until(from: &mut File, seen: &mut Vec<u8>, start: usize, needle: &[u8]) {
    let deadline = Instant::now() + TIMEOUT;
    while !seen[start..].windows(needle.len()).any(|w| w == needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no {:?} in {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(&seen[start..]));
        let mut fds = [PollFd::new(from.as_fd(), PollFlags::POLLIN)];
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX).min(200);
        if poll(&mut fds, PollTimeout::from(ms)).expect("poll") == 0 {
            continue;
        }
        let mut buf = [0u8; 4096];
        match from.read(&mut buf) {
            Ok(0) => panic!("end of output before {:?}: {:?}", String::from_utf8_lossy(needle), String::from_utf8_lossy(seen)),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn wait_with_timeout(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "btvmm did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn console_typed_bytes_reach_guest_and_ctrl_a_x_exits_zero_with_modes_restored() {
    let mut vm = OnPty::spawn();

    vm.expect(BANNER);
    let raw = tcgetattr(&vm.slave).unwrap();
    // Ctrl-C, Ctrl-Z, Ctrl-\ and CR are bytes for the guest; Ctrl-A a is one Ctrl-A.
    vm.type_bytes(b"hi\x03\x1a\x1c\r\x01a!");
    let echoed = vm.expect(b"!");
    vm.type_bytes(b"\x01x");
    let status = vm.wait();

    assert!(!raw.local_flags.intersects(LocalFlags::ECHO | LocalFlags::ICANON | LocalFlags::ISIG), "raw mode while running");
    assert_eq!(echoed, b"hi\x03\x1a\x1c\r\x01!", "the guest got every byte, once (no local echo)");
    assert_eq!(status.code(), Some(0));
    assert_eq!(vm.modes(), vm.before);
}

#[test]
fn console_ctrl_a_s_prints_stats_and_guest_goes_on() {
    let mut vm = OnPty::spawn();
    vm.expect(BANNER);

    vm.type_bytes(b"\x01s");
    let stats = vm.expect(b"I/O port accesses by device:");
    vm.type_bytes(b"\x01h");
    let help = vm.expect(b"Ctrl-A x");
    vm.type_bytes(b"z");
    let after = vm.expect(b"z");
    vm.type_bytes(b"\x01x");

    assert!(String::from_utf8_lossy(&stats).contains("translation units:"), "{stats:?}");
    assert!(String::from_utf8_lossy(&help).contains("quit"), "{help:?}");
    assert_eq!(after, b"z", "the guest runs on after the stats");
    assert_eq!(vm.wait().code(), Some(0));
}

fn signal_restores_modes_and_exits_128_plus(signal: Signal) {
    let mut vm = OnPty::spawn();
    vm.expect(BANNER);

    kill(Pid::from_raw(vm.child.id() as i32), signal).expect("kill");
    let status = vm.wait();

    assert_eq!(status.code(), Some(128 + signal as i32), "{signal}");
    assert_eq!(vm.modes(), vm.before, "{signal}");
}

#[test]
fn console_sigterm_restores_modes_and_exits_143() {
    signal_restores_modes_and_exits_128_plus(Signal::SIGTERM);
}

#[test]
fn console_sighup_and_sigint_restore_modes() {
    signal_restores_modes_and_exits_128_plus(Signal::SIGHUP);
    signal_restores_modes_and_exits_128_plus(Signal::SIGINT);
}

#[test]
fn console_piped_stdin_end_does_not_stop_guest() {
    let kernel = echo_kernel();
    let mut child = Command::new(env!("CARGO_BIN_EXE_btvmm"))
        .args(["run", "--multiboot", kernel.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run btvmm");
    let mut stdout = File::from(OwnedFd::from(child.stdout.take().unwrap()));
    let mut seen = Vec::new();

    child.stdin.take().unwrap().write_all(b"ab\x03").unwrap(); // then closed: end of input
    read_until(&mut stdout, &mut seen, 0, b"ready> ab\x03");
    std::thread::sleep(Duration::from_millis(300));
    let running = child.try_wait().unwrap().is_none();
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_with_timeout(&mut child);

    assert!(running, "end of stdin stopped the guest");
    assert_eq!(status.code(), Some(143));
}
