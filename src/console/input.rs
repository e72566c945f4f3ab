//! Console input: the thread reading stdin into COM1, and the Ctrl-A
//! escapes it takes out of the byte stream, as QEMU's character-device
//! multiplexer does (`-nographic`, `-serial mon:stdio`).
//!
//! Ctrl-A then: `x` quits (exit status 0); `s` prints the `--stats`
//! counters now; `h` or `?` prints the keys; `a` or a second Ctrl-A sends
//! one Ctrl-A to the guest. Any other key after Ctrl-A is dropped, with the
//! Ctrl-A, as QEMU drops it.
//!
//! Stdin is read as it comes, whether a terminal (raw mode, see
//! `terminal`) or a pipe or file. End of input ends the thread, never the
//! machine: a guest fed from a file keeps running.

use std::io::{Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;

use btvmm_runtime::EventSignal;

use crate::devices::serial::SerialInput;
use crate::devices::stop::{PauseHandle, StopHandle, StopReason};

/// The console escape, Ctrl-A.
pub const ESCAPE: u8 = 0x01;

/// The keys, printed by Ctrl-A h.
pub const HELP: &str = "\
btvmm console keys:
  Ctrl-A x       quit (exit status 0)
  Ctrl-A s       print the --stats counters now
  Ctrl-A h, ?    print this help
  Ctrl-A a       send Ctrl-A to the guest (so does Ctrl-A Ctrl-A)
";

/// What a console byte means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleKey {
    /// A byte for the guest.
    Guest(u8),
    /// Nothing yet (Ctrl-A), or an unknown escape, dropped.
    None,
    Quit,
    Stats,
    Help,
}

/// Splits console input into bytes for the guest and the Ctrl-A escapes.
#[derive(Debug, Default)]
pub struct EscapeParser {
    after_escape: bool,
}

impl EscapeParser {
    /// What `byte` means, given the bytes before it.
    pub fn feed(&mut self, byte: u8) -> ConsoleKey {
        if std::mem::take(&mut self.after_escape) {
            return match byte {
                b'x' => ConsoleKey::Quit,
                b's' => ConsoleKey::Stats,
                b'h' | b'?' => ConsoleKey::Help,
                b'a' | ESCAPE => ConsoleKey::Guest(ESCAPE),
                _ => ConsoleKey::None,
            };
        }
        if byte == ESCAPE {
            self.after_escape = true;
            return ConsoleKey::None;
        }
        ConsoleKey::Guest(byte)
    }
}

/// Where console input goes: the UART's queue and the machine's requests.
pub struct InputLink {
    pub input: Arc<SerialInput>,
    /// Raised after each chunk so the vCPU services the UART (and sees a
    /// stop or pause request).
    pub events: Arc<EventSignal>,
    pub stop: StopHandle,
    pub pause: PauseHandle,
}

impl InputLink {
    /// Feeds `bytes` through `parser`: guest bytes to the UART, escapes acted on.
    pub fn feed(&self, parser: &mut EscapeParser, bytes: &[u8]) {
        let mut guest = Vec::with_capacity(bytes.len());
        for &b in bytes {
            match parser.feed(b) {
                ConsoleKey::Guest(g) => guest.push(g),
                ConsoleKey::None => {}
                ConsoleKey::Quit => self.stop.request(StopReason::Quit),
                ConsoleKey::Stats => self.pause.request(),
                ConsoleKey::Help => {
                    let _ = std::io::stderr().write_all(HELP.as_bytes());
                }
            }
        }
        self.input.push(&guest);
        self.events.raise();
    }
}

/// Spawns the thread that reads the host's stdin into the console. It ends
/// at end of input or after Ctrl-A x; it is not joined (a blocking read of
/// stdin cannot be interrupted portably), so the handle may be dropped.
pub fn spawn_stdin_reader(link: InputLink) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name("btvmm-stdin".into()).spawn(move || {
        let mut parser = EscapeParser::default();
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        loop {
            let n = match stdin.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::debug!(target: "device", "console: stdin read failed: {e}");
                    break;
                }
            };
            link.feed(&mut parser, &buf[..n]);
            if link.stop.is_requested() {
                break;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(p: &mut EscapeParser, bytes: &[u8]) -> Vec<ConsoleKey> {
        bytes.iter().map(|&b| p.feed(b)).collect()
    }

    fn link() -> InputLink {
        InputLink {
            input: SerialInput::new(),
            events: Arc::new(EventSignal::new()),
            stop: StopHandle::new(),
            pause: PauseHandle::new(),
        }
    }

    #[test]
    fn escape_ctrl_a_x_quits() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[ESCAPE, b'x']);

        assert_eq!(keys, [ConsoleKey::None, ConsoleKey::Quit]);
    }

    #[test]
    fn escape_twice_sends_one_ctrl_a_then_plain_bytes() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[ESCAPE, ESCAPE, b'x']);

        assert_eq!(keys, [ConsoleKey::None, ConsoleKey::Guest(ESCAPE), ConsoleKey::Guest(b'x')]);
    }

    #[test]
    fn escape_a_sends_one_ctrl_a() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[ESCAPE, b'a', b'a']);

        assert_eq!(keys, [ConsoleKey::None, ConsoleKey::Guest(ESCAPE), ConsoleKey::Guest(b'a')]);
    }

    #[test]
    fn escape_s_asks_for_stats_and_h_for_help() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[ESCAPE, b's', ESCAPE, b'h', ESCAPE, b'?']);

        assert_eq!(
            keys,
            [ConsoleKey::None, ConsoleKey::Stats, ConsoleKey::None, ConsoleKey::Help, ConsoleKey::None, ConsoleKey::Help]
        );
    }

    #[test]
    fn escape_unknown_key_is_dropped_with_the_escape() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[ESCAPE, b'c', b'c']);

        assert_eq!(keys, [ConsoleKey::None, ConsoleKey::None, ConsoleKey::Guest(b'c')]);
    }

    #[test]
    fn control_bytes_other_than_ctrl_a_pass_through() {
        let mut p = EscapeParser::default();

        let keys = feed_all(&mut p, &[0x03, 0x1a, 0x1c, 0x04, b'\r']);

        let bytes: Vec<u8> = keys.iter().map(|k| match k { ConsoleKey::Guest(b) => *b, other => panic!("{other:?}") }).collect();
        assert_eq!(bytes, [0x03, 0x1a, 0x1c, 0x04, b'\r']);
    }

    #[test]
    fn escape_split_across_reads_still_quits() {
        let l = link();
        let mut p = EscapeParser::default();

        l.feed(&mut p, b"ls\x01");
        l.feed(&mut p, b"x");

        assert_eq!(l.stop.reason(), Some(StopReason::Quit));
        assert!(l.events.is_raised());
    }

    #[test]
    fn feed_stats_requests_pause_and_queues_guest_bytes() {
        let l = link();
        let mut p = EscapeParser::default();

        l.feed(&mut p, b"a\x01sb");

        assert!(l.pause.take());
        assert!(l.events.is_raised());
        assert!(!l.stop.is_requested());
        assert!(!l.input.is_empty());
    }
}
