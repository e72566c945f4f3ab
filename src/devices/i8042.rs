//! The 8042 keyboard controller with nothing plugged in, and port 0x92.
//!
//! Terms: port 0x64 reads the status register (OBF: a byte waits in the
//! output buffer at port 0x60; IBF: the controller has not taken the last
//! write yet; SYS: the system flag; CMD: the last write went to 0x64;
//! AUXDATA: the waiting byte came from the mouse port) and takes controller
//! commands; port 0x60 reads the output buffer and takes command parameters
//! or bytes for the keyboard. The "command byte" (CTR) enables IRQ 1 / IRQ 12
//! for keyboard / mouse data and disables either port. The controller's
//! output port carries the CPU reset line (bit 0, active low) and the A20
//! gate (bit 1); command 0xfe pulses reset, the classic way to reboot a PC.
//!
//! The controller answers its own commands (self-test, interface tests,
//! command byte and output port access, loopbacks), so Linux's i8042 driver
//! finds it quickly and without timeouts. No keyboard or mouse is attached:
//! a byte sent to either device is answered with 0xfe (resend), which Linux's
//! atkbd/psmouse take as "no device" at once.
//!
//! Port 0x92 (PS/2 "system control port A") has the fast A20 gate (bit 1)
//! and a fast reset (bit 0 going from 0 to 1).

use std::collections::VecDeque;

use super::irq::IrqLine;
use super::stop::{StopHandle, StopReason};

pub const DATA_PORT: u16 = 0x60;
pub const COMMAND_PORT: u16 = 0x64;
pub const PORT_A: u16 = 0x92;
pub const KBD_IRQ: u8 = 1;
pub const AUX_IRQ: u8 = 12;

const STATUS_OBF: u8 = 0x01;
const STATUS_SYS: u8 = 0x04;
const STATUS_CMD: u8 = 0x08;
/// Keyboard not inhibited by the key lock.
const STATUS_UNLOCKED: u8 = 0x10;
const STATUS_AUXDATA: u8 = 0x20;

const CTR_KBD_INT: u8 = 0x01;
const CTR_AUX_INT: u8 = 0x02;
const CTR_SYS: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
/// The command byte a BIOS leaves: keyboard interrupt, system flag,
/// scancode translation.
const CTR_DEFAULT: u8 = 0x45;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_INPUT: u8 = 0xc0;
const CMD_READ_OUTPUT: u8 = 0xd0;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_KBD_LOOP: u8 = 0xd2;
const CMD_AUX_LOOP: u8 = 0xd3;
const CMD_AUX_SEND: u8 = 0xd4;
/// Commands 0xf0-0xff pulse output port bits 0-3 low for each clear bit.
const CMD_PULSE_FIRST: u8 = 0xf0;

const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
/// A device's "resend" answer; with nothing attached it is all we give.
const DEVICE_RESEND: u8 = 0xfe;

/// Output port: bit 0 is the CPU reset line (0 = reset), bit 1 A20.
const OUT_RESET_N: u8 = 0x01;
const OUT_A20: u8 = 0x02;
const OUT_DEFAULT: u8 = 0xcf;

const PORT_A_RESET: u8 = 0x01;
const PORT_A_A20: u8 = 0x02;

/// A byte in the output buffer and the port it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Controller,
    Keyboard,
    Aux,
}

/// The keyboard controller.
pub struct I8042 {
    ctr: u8,
    output_port: u8,
    /// Command waiting for its parameter on port 0x60.
    pending: Option<u8>,
    last_write_was_command: bool,
    /// Bytes for the guest; the front one is the output buffer.
    output: VecDeque<(u8, Source)>,
    kbd_irq: IrqLine,
    aux_irq: IrqLine,
    stop: StopHandle,
}

impl I8042 {
    pub fn new(kbd_irq: IrqLine, aux_irq: IrqLine, stop: StopHandle) -> Self {
        Self {
            ctr: CTR_DEFAULT,
            output_port: OUT_DEFAULT,
            pending: None,
            last_write_was_command: false,
            output: VecDeque::new(),
            kbd_irq,
            aux_irq,
            stop,
        }
    }

    pub fn a20_enabled(&self) -> bool {
        self.output_port & OUT_A20 != 0
    }

    /// Queues a byte; interrupts when it reaches an empty output buffer.
    fn push(&mut self, byte: u8, source: Source) {
        self.output.push_back((byte, source));
        if self.output.len() == 1 {
            self.signal_front();
        }
    }

    fn signal_front(&self) {
        match self.output.front() {
            Some((_, Source::Aux)) if self.ctr & CTR_AUX_INT != 0 => self.aux_irq.pulse(),
            Some((_, Source::Keyboard | Source::Controller)) if self.ctr & CTR_KBD_INT != 0 => {
                self.kbd_irq.pulse()
            }
            _ => {}
        }
    }

    pub fn read_status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if let Some((_, source)) = self.output.front() {
            s |= STATUS_OBF;
            if *source == Source::Aux {
                s |= STATUS_AUXDATA;
            }
        }
        if self.ctr & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_write_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    pub fn read_data(&mut self) -> u8 {
        match self.output.pop_front() {
            Some((byte, _)) => {
                self.signal_front();
                byte
            }
            // An empty buffer reads as the last byte on real chips; 0 is as good.
            None => 0,
        }
    }

    fn set_output_port(&mut self, value: u8) {
        self.output_port = value;
        if value & OUT_RESET_N == 0 {
            self.stop.request(StopReason::Reset);
        }
    }

    pub fn write_command(&mut self, cmd: u8) {
        self.last_write_was_command = true;
        self.pending = None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr, Source::Controller),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT | CMD_KBD_LOOP | CMD_AUX_LOOP | CMD_AUX_SEND => {
                self.pending = Some(cmd)
            }
            CMD_AUX_DISABLE => self.ctr |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ctr &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.push(PORT_TEST_OK, Source::Controller),
            CMD_SELF_TEST => {
                self.ctr |= CTR_SYS;
                self.push(SELF_TEST_OK, Source::Controller)
            }
            CMD_KBD_DISABLE => self.ctr |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ctr &= !CTR_KBD_DISABLE,
            CMD_READ_INPUT => self.push(0x80, Source::Controller),
            CMD_READ_OUTPUT => self.push(self.output_port, Source::Controller),
            CMD_PULSE_FIRST..=0xff => {
                if cmd & OUT_RESET_N == 0 {
                    self.stop.request(StopReason::Reset);
                }
            }
            _ => tracing::debug!(target: "device", "i8042: unhandled command {cmd:#04x}"),
        }
    }

    pub fn write_data(&mut self, value: u8) {
        self.last_write_was_command = false;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = value,
            Some(CMD_WRITE_OUTPUT) => self.set_output_port(value),
            Some(CMD_KBD_LOOP) => self.push(value, Source::Keyboard),
            Some(CMD_AUX_LOOP) => self.push(value, Source::Aux),
            Some(CMD_AUX_SEND) => {
                self.ctr &= !CTR_AUX_DISABLE;
                self.push(DEVICE_RESEND, Source::Aux)
            }
            _ => {
                // A byte for the keyboard: sending enables the port.
                self.ctr &= !CTR_KBD_DISABLE;
                self.push(DEVICE_RESEND, Source::Keyboard)
            }
        }
    }
}

impl super::bus::PortDevice for I8042 {
    fn read(&mut self, base: u16, _offset: u16, _size: u8) -> u32 {
        u32::from(match base {
            COMMAND_PORT => self.read_status(),
            _ => self.read_data(),
        })
    }

    fn write(&mut self, base: u16, _offset: u16, _size: u8, value: u32) {
        match base {
            COMMAND_PORT => self.write_command(value as u8),
            _ => self.write_data(value as u8),
        }
    }
}

/// Port 0x92: fast A20 and fast reset.
pub struct PortA {
    value: u8,
    stop: StopHandle,
}

impl PortA {
    pub fn new(stop: StopHandle) -> Self {
        Self { value: PORT_A_A20, stop }
    }
}

impl super::bus::PortDevice for PortA {
    fn read(&mut self, _base: u16, _offset: u16, _size: u8) -> u32 {
        u32::from(self.value)
    }

    fn write(&mut self, _base: u16, _offset: u16, _size: u8, value: u32) {
        let value = value as u8;
        if value & PORT_A_RESET != 0 && self.value & PORT_A_RESET == 0 {
            self.stop.request(StopReason::Reset);
        }
        self.value = value & (PORT_A_RESET | PORT_A_A20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::PortDevice;
    use crate::devices::irq::IrqLines;
    use crate::devices::pic::Pic;
    use std::sync::Arc;

    struct Rig {
        kbc: I8042,
        stop: StopHandle,
        lines: Arc<IrqLines>,
    }

    fn rig() -> Rig {
        let lines = IrqLines::new();
        let stop = StopHandle::new();
        let kbc = I8042::new(lines.line(KBD_IRQ), lines.line(AUX_IRQ), stop.clone());
        Rig { kbc, stop, lines }
    }

    impl Rig {
        fn latched(&self, irq: u8) -> bool {
            let mut pic = Pic::new();
            self.lines.drain_into(&mut pic);
            pic.irq_requested(irq)
        }
    }

    #[test]
    fn command_fe_requests_reset() {
        let mut r = rig();

        r.kbc.write_command(0xfe);

        assert_eq!(r.stop.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn command_ff_pulses_nothing() {
        let mut r = rig();

        r.kbc.write_command(0xff);

        assert!(!r.stop.is_requested());
    }

    #[test]
    fn output_port_reset_bit_clear_requests_reset() {
        let mut r = rig();

        r.kbc.write_command(CMD_WRITE_OUTPUT);
        r.kbc.write_data(0xfe);

        assert_eq!(r.stop.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn output_port_write_keeps_a20() {
        let mut r = rig();

        r.kbc.write_command(CMD_WRITE_OUTPUT);
        r.kbc.write_data(OUT_DEFAULT & !OUT_A20);

        assert!(!r.kbc.a20_enabled());
        assert!(!r.stop.is_requested());
    }

    #[test]
    fn self_test_answers_55_with_obf() {
        let mut r = rig();

        r.kbc.write_command(CMD_SELF_TEST);

        assert_eq!(r.kbc.read_status() & STATUS_OBF, STATUS_OBF);
        assert_eq!(r.kbc.read_data(), SELF_TEST_OK);
        assert_eq!(r.kbc.read_status() & STATUS_OBF, 0);
    }

    #[test]
    fn ctr_write_then_read_round_trips() {
        let mut r = rig();

        r.kbc.write_command(CMD_WRITE_CTR);
        r.kbc.write_data(0x47);
        r.kbc.write_command(CMD_READ_CTR);

        assert_eq!(r.kbc.read_data(), 0x47);
    }

    #[test]
    fn flush_on_idle_controller_finds_empty_buffer() {
        let r = rig();

        let status = r.kbc.read_status();

        assert_eq!(status & (STATUS_OBF | 0x02), 0, "no byte waiting, input buffer free");
    }

    #[test]
    fn aux_loop_echoes_with_auxdata_and_irq12() {
        let mut r = rig();
        r.kbc.write_command(CMD_WRITE_CTR);
        r.kbc.write_data(CTR_KBD_INT | CTR_AUX_INT);

        r.kbc.write_command(CMD_AUX_LOOP);
        r.kbc.write_data(0x5a);

        assert!(r.latched(AUX_IRQ));
        assert_eq!(r.kbc.read_status() & STATUS_AUXDATA, STATUS_AUXDATA);
        assert_eq!(r.kbc.read_data(), 0x5a);
    }

    #[test]
    fn keyboard_byte_answered_resend_on_irq1() {
        let mut r = rig();

        r.kbc.write_data(0xf2);

        assert!(r.latched(KBD_IRQ));
        assert_eq!(r.kbc.read_data(), DEVICE_RESEND);
    }

    #[test]
    fn interrupt_disabled_in_ctr_raises_nothing() {
        let mut r = rig();
        r.kbc.write_command(CMD_WRITE_CTR);
        r.kbc.write_data(0);

        r.kbc.write_command(CMD_SELF_TEST);

        assert!(!r.latched(KBD_IRQ));
    }

    #[test]
    fn status_reports_command_flag_and_system_flag() {
        let mut r = rig();

        r.kbc.write_command(CMD_KBD_DISABLE);

        assert_eq!(r.kbc.read_status(), STATUS_UNLOCKED | STATUS_SYS | STATUS_CMD);
    }

    #[test]
    fn port_a_bit0_rising_requests_reset() {
        let stop = StopHandle::new();
        let mut port = PortA::new(stop.clone());

        port.write(PORT_A, 0, 1, 0x03);

        assert_eq!(stop.reason(), Some(StopReason::Reset));
    }

    #[test]
    fn port_a_a20_reads_back() {
        let stop = StopHandle::new();
        let mut port = PortA::new(stop.clone());

        port.write(PORT_A, 0, 1, 0x00);

        assert_eq!(port.read(PORT_A, 0, 1), 0);
        assert!(!stop.is_requested());
    }
}
