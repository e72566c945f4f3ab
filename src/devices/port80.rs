//! Port 0x80, the POST diagnostic port.
//!
//! Firmware writes progress codes here and kernels write to it as a short
//! I/O delay (Linux's `outb_p`/`io_delay`). Like QEMU's port-0x80 device,
//! writes are absorbed and reads return all-ones (no POST card is fitted);
//! the last code is kept for tracing and tests.

pub const POST_PORT: u16 = 0x80;

#[derive(Debug, Default)]
pub struct PostCode {
    last: Option<u8>,
}

impl PostCode {
    pub fn new() -> Self {
        Self::default()
    }

    /// The last code written, if any.
    pub fn last(&self) -> Option<u8> {
        self.last
    }
}

impl super::bus::PortDevice for PostCode {
    fn read(&mut self, _base: u16, _offset: u16, _size: u8) -> u32 {
        0xff
    }

    fn write(&mut self, _base: u16, _offset: u16, _size: u8, value: u32) {
        let code = value as u8;
        if self.last != Some(code) {
            tracing::trace!(target: "device", "POST code {code:#04x}");
        }
        self.last = Some(code);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::PortDevice;

    #[test]
    fn write_code_is_kept() {
        let mut port = PostCode::new();

        port.write(POST_PORT, 0, 1, 0x1234);

        assert_eq!(port.last(), Some(0x34));
    }

    #[test]
    fn read_returns_all_ones_like_qemu() {
        let mut port = PostCode::new();
        port.write(POST_PORT, 0, 1, 0x55);

        assert_eq!(port.read(POST_PORT, 0, 1), 0xff);
    }
}
