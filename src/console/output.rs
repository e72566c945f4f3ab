//! COM1's output on its way to stdout.
//!
//! vm-superio flushes its writer after every byte, which on stdout meant a
//! `write` system call per byte of guest output. [`OutputBuffer`] keeps the
//! bytes instead and hands them on when the machine says so: its
//! `Write::flush` does nothing, and the board calls [`OutputBuffer::flush_now`]
//! whenever it services devices. So that service comes soon, the buffer
//! offers a deadline ([`FLUSH_DELAY`] after its oldest byte) that the board
//! adds to its timer deadlines: the vCPU loop polls it between blocks and
//! sleeps at most until it while halted. A prompt printed without a newline
//! shows within a few milliseconds; a boot log goes out a few writes per
//! timer tick rather than one per byte.

use std::io::Write;
use std::time::{Duration, Instant};

/// How long output may wait in the buffer.
pub const FLUSH_DELAY: Duration = Duration::from_millis(2);
/// Past this many bytes the buffer is written out at once.
const FLUSH_SIZE: usize = 16 << 10;

/// Buffered console output; see the module documentation.
pub struct OutputBuffer {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// When the oldest byte in `buf` arrived.
    pending_since: Option<Instant>,
}

impl OutputBuffer {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self { out, buf: Vec::with_capacity(FLUSH_SIZE), pending_since: None }
    }

    /// When the buffered output should be written, if any is waiting.
    pub fn deadline(&self) -> Option<Instant> {
        self.pending_since.map(|t| t + FLUSH_DELAY)
    }

    /// Writes out everything buffered. On an error the bytes are dropped:
    /// a console that cannot take them (a closed pipe, a hung-up terminal)
    /// must not make the guest's output pile up in memory.
    pub fn flush_now(&mut self) -> std::io::Result<()> {
        self.pending_since = None;
        let result = self.out.write_all(&self.buf).and_then(|()| self.out.flush());
        self.buf.clear();
        result
    }
}

impl Write for OutputBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        if self.buf.is_empty() {
            self.pending_since = Some(Instant::now());
        }
        self.buf.extend_from_slice(bytes);
        if self.buf.len() >= FLUSH_SIZE {
            self.flush_now()?;
        }
        Ok(bytes.len())
    }

    /// Does nothing: the device flushes after every byte; the board flushes
    /// by time with [`OutputBuffer::flush_now`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A writer that counts the writes reaching it.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let mut s = self.0.lock().unwrap();
            s.0.extend_from_slice(b);
            s.1 += 1;
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_wait_for_flush_now_and_go_in_one_write() {
        let sink = Sink::default();
        let mut out = OutputBuffer::new(Box::new(sink.clone()));

        for b in b"login: " {
            out.write_all(&[*b]).unwrap();
            out.flush().unwrap();
        }
        let before = sink.0.lock().unwrap().clone();
        out.flush_now().unwrap();

        assert_eq!(before, (Vec::new(), 0));
        assert_eq!(*sink.0.lock().unwrap(), (b"login: ".to_vec(), 1));
    }

    #[test]
    fn deadline_follows_oldest_byte_and_clears_on_flush() {
        let mut out = OutputBuffer::new(Box::new(Sink::default()));
        assert_eq!(out.deadline(), None);
        let t0 = Instant::now();

        out.write_all(b"a").unwrap();
        let first = out.deadline().unwrap();
        out.write_all(b"b").unwrap();

        assert!(first >= t0 + FLUSH_DELAY);
        assert_eq!(out.deadline(), Some(first), "a later byte does not push it back");
        out.flush_now().unwrap();
        assert_eq!(out.deadline(), None);
    }

    #[test]
    fn large_output_is_written_without_waiting() {
        let sink = Sink::default();
        let mut out = OutputBuffer::new(Box::new(sink.clone()));

        out.write_all(&vec![b'x'; FLUSH_SIZE]).unwrap();

        assert_eq!(sink.0.lock().unwrap().0.len(), FLUSH_SIZE);
        assert_eq!(out.deadline(), None);
    }
}
