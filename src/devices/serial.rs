//! The 16550A UART on COM1 (ports 0x3f8-0x3ff, IRQ 4), wired to the console.
//!
//! Terms: eight registers. Offset 0 is RBR (receive buffer, read) / THR
//! (transmit holding, write), or the divisor latch low byte when LCR bit 7
//! (DLAB) is set; offset 1 is IER (interrupt enables: received data, THR
//! empty, line status, modem status) or the divisor high byte; offset 2 is
//! IIR (read: the pending interrupt of highest priority, bits 7-6 set when
//! the FIFOs are on, as a 16550A reports them) / FCR (write: FIFO enable and
//! clear); 3 LCR (line control); 4 MCR (modem control: DTR, RTS, OUT1, OUT2
//! which gates the IRQ line on PCs, LOOP); 5 LSR (line status: data ready,
//! THR empty, transmitter idle); 6 MSR (modem status); 7 SCR (scratch).
//!
//! The register model is rust-vmm's `vm_superio::Serial`, which behaves as
//! Linux's 8250 driver expects (16550A autodetection through IIR, IER mask,
//! scratch, loopback MSR, THRE interrupt on enabling it). This wrapper adds
//! what it leaves out: the OUT2 gate on the interrupt line, FCR's "clear
//! receive FIFO", and feeding console input from a queue filled by a host
//! thread as the guest drains the 64-byte FIFO, and buffers console output
//! (`console::OutputBuffer`) for the board to flush. Known differences from a
//! real 16550A, inherited: reading IIR clears every pending source (not only
//! THRE), and IIR always reports the FIFOs enabled.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};

use super::bus::lock;
use super::irq::IrqLine;
use crate::console::OutputBuffer;

pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u8 = 4;

const THR_RBR: u8 = 0;
const FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const LCR_DLAB: u8 = 0x80;
const FCR_CLEAR_RX: u8 = 0x02;
const MCR_OUT2: u8 = 0x08;
const LSR_DATA_READY: u8 = 0x01;
const IIR_NO_INTERRUPT: u8 = 0x01;
/// The receive FIFO of the model (vm-superio keeps 64 bytes).
const RX_FIFO_SIZE: usize = 64;
/// Console input kept waiting for the guest, at most.
const INPUT_QUEUE_LIMIT: usize = 1 << 20;

/// Records that the model asked for an interrupt; the wrapper decides
/// whether it reaches the line (OUT2).
#[derive(Debug, Default)]
pub struct PendingIrq(std::cell::Cell<bool>);

impl Trigger for PendingIrq {
    type E = Infallible;

    fn trigger(&self) -> Result<(), Infallible> {
        self.0.set(true);
        Ok(())
    }
}

/// Bytes typed on the console, waiting for room in the UART's FIFO.
#[derive(Debug, Default)]
pub struct SerialInput {
    queue: Mutex<VecDeque<u8>>,
}

impl SerialInput {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Queues `bytes`; past the limit the excess is dropped.
    pub fn push(&self, bytes: &[u8]) {
        let mut q = lock(&self.queue);
        let room = INPUT_QUEUE_LIMIT.saturating_sub(q.len());
        q.extend(bytes.iter().take(room));
    }

    pub fn is_empty(&self) -> bool {
        lock(&self.queue).is_empty()
    }
}

pub type ConsoleOut = Box<dyn Write + Send>;

/// COM1.
pub struct Uart {
    serial: Serial<PendingIrq, NoEvents, OutputBuffer>,
    irq: IrqLine,
    input: Arc<SerialInput>,
}

impl Uart {
    pub fn new(out: ConsoleOut, irq: IrqLine, input: Arc<SerialInput>) -> Self {
        Self { serial: Serial::new(PendingIrq::default(), OutputBuffer::new(out)), irq, input }
    }

    fn out2(&mut self) -> bool {
        // MCR reads have no side effects.
        self.serial.read(MCR) & MCR_OUT2 != 0
    }

    /// Passes an interrupt the model raised to the line if OUT2 lets it.
    fn forward_irq(&mut self) {
        if self.serial.interrupt_evt().0.take() && self.out2() {
            self.irq.pulse();
        }
    }

    fn dlab(&mut self) -> bool {
        self.serial.read(LCR) & LCR_DLAB != 0
    }

    /// Moves queued console input into the receive FIFO, as room allows.
    pub fn fill_from_input(&mut self) {
        let mut q = lock(&self.input.queue);
        let n = self.serial.fifo_capacity().min(q.len());
        if n > 0 {
            let (a, b) = q.as_slices();
            let chunk: Vec<u8> = a.iter().chain(b).take(n).copied().collect();
            // In loopback mode the model takes nothing; the bytes wait.
            let taken = self.serial.enqueue_raw_bytes(&chunk).unwrap_or(0).min(n);
            q.drain(..taken);
        }
        drop(q);
        self.forward_irq();
    }

    fn clear_rx_fifo(&mut self) {
        // RBR is only reachable with DLAB clear; LCR writes have no side effects.
        let lcr = self.serial.read(LCR);
        self.write_model(LCR, lcr & !LCR_DLAB);
        for _ in 0..RX_FIFO_SIZE {
            if self.serial.read(LSR) & LSR_DATA_READY == 0 {
                break;
            }
            self.serial.read(THR_RBR);
        }
        self.write_model(LCR, lcr);
    }

    fn write_model(&mut self, offset: u8, value: u8) {
        if let Err(e) = self.serial.write(offset, value) {
            tracing::debug!(target: "device", "serial: console write failed: {e:?}");
        }
    }

    pub fn read_reg(&mut self, offset: u8) -> u8 {
        let value = self.serial.read(offset & 7);
        if offset & 7 == THR_RBR && !self.dlab() {
            self.fill_from_input();
        }
        self.forward_irq();
        value
    }

    pub fn write_reg(&mut self, offset: u8, value: u8) {
        let offset = offset & 7;
        let out2_before = self.out2();
        if offset == FCR && value & FCR_CLEAR_RX != 0 {
            self.clear_rx_fifo();
        }
        self.write_model(offset, value);
        if offset == MCR && !out2_before && self.out2() {
            // OUT2 just opened the gate: a pending interrupt reaches the line.
            let pending = self.serial.state().interrupt_identification & IIR_NO_INTERRUPT == 0;
            if pending {
                self.irq.pulse();
            }
        }
        if offset == THR_RBR && !self.dlab() {
            // Loopback may have queued the byte; console input may follow it.
            self.fill_from_input();
        }
        self.forward_irq();
    }

    /// When buffered console output should be written out, if any waits.
    pub fn output_deadline(&self) -> Option<Instant> {
        self.serial.writer().deadline()
    }

    /// Writes out buffered console output.
    pub fn flush_output(&mut self) {
        if let Err(e) = self.serial.writer_mut().flush_now() {
            tracing::debug!(target: "device", "serial: console write failed: {e}");
        }
    }
}

impl super::bus::PortDevice for Uart {
    fn read(&mut self, _base: u16, offset: u16, _size: u8) -> u32 {
        u32::from(self.read_reg(offset as u8))
    }

    fn write(&mut self, _base: u16, offset: u16, _size: u8, value: u32) {
        self.write_reg(offset as u8, value as u8);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::irq::IrqLines;
    use crate::devices::pic::Pic;

    /// A writer tests can look into.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Rig {
        uart: Uart,
        out: SharedBuf,
        lines: Arc<IrqLines>,
        pic: Pic,
        input: Arc<SerialInput>,
    }

    fn rig() -> Rig {
        let out = SharedBuf::default();
        let lines = IrqLines::new();
        let input = SerialInput::new();
        let uart = Uart::new(Box::new(out.clone()), lines.line(COM1_IRQ), input.clone());
        let mut pic = Pic::new();
        for (offset, value) in [(0, 0x11), (1, 0x20), (1, 4), (1, 1)] {
            pic.write_port(0, offset, value);
        }
        Rig { uart, out, lines, pic, input }
    }

    impl Rig {
        fn irq4_latched(&mut self) -> bool {
            self.lines.drain_into(&mut self.pic);
            let latched = self.pic.irq_requested(COM1_IRQ);
            if latched {
                self.pic.ack();
                self.pic.write_port(0, 0, 0x20);
            }
            latched
        }
    }

    #[test]
    fn write_thr_reaches_console() {
        let mut r = rig();

        for b in b"hi\n" {
            r.uart.write_reg(0, *b);
        }
        let buffered = lock(&r.out.0).clone();
        r.uart.flush_output();

        assert!(buffered.is_empty(), "output waits for the flush");
        assert_eq!(*lock(&r.out.0), b"hi\n");
    }

    #[test]
    fn enable_thre_interrupt_raises_irq4() {
        let mut r = rig();
        r.uart.write_reg(MCR, MCR_OUT2);

        r.uart.write_reg(1, 0x02);

        assert!(r.irq4_latched());
        assert_eq!(r.uart.read_reg(2), 0xc2, "IIR: THRE, FIFOs on");
        assert_eq!(r.uart.read_reg(2), 0xc1, "reading IIR acknowledged THRE");
    }

    #[test]
    fn out2_clear_blocks_irq() {
        let mut r = rig();
        r.uart.write_reg(MCR, 0);

        r.uart.write_reg(1, 0x02);

        assert!(!r.irq4_latched());
    }

    #[test]
    fn out2_set_with_pending_interrupt_raises_irq() {
        let mut r = rig();
        r.uart.write_reg(MCR, 0);
        r.uart.write_reg(1, 0x02);

        r.uart.write_reg(MCR, MCR_OUT2);

        assert!(r.irq4_latched());
    }

    #[test]
    fn input_fills_fifo_and_raises_rx_interrupt() {
        let mut r = rig();
        r.uart.write_reg(1, 0x01);
        r.input.push(b"ls\r");

        r.uart.fill_from_input();

        assert!(r.irq4_latched());
        assert_eq!(r.uart.read_reg(LSR) & LSR_DATA_READY, 1);
        let got: Vec<u8> = (0..3).map(|_| r.uart.read_reg(0)).collect();
        assert_eq!(got, b"ls\r");
        assert_eq!(r.uart.read_reg(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn input_beyond_fifo_flows_in_as_guest_reads() {
        let mut r = rig();
        let text: Vec<u8> = (0..200u8).collect();
        r.input.push(&text);
        r.uart.fill_from_input();

        let got: Vec<u8> = (0..200).map(|_| r.uart.read_reg(0)).collect();

        assert_eq!(got, text);
        assert!(r.input.is_empty());
    }

    #[test]
    fn fcr_clear_rx_drops_received_bytes() {
        let mut r = rig();
        r.input.push(b"stale");
        r.uart.fill_from_input();

        r.uart.write_reg(FCR, 0x07);

        assert_eq!(r.uart.read_reg(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn fcr_clear_rx_with_dlab_set_drops_bytes_and_keeps_lcr() {
        let mut r = rig();
        r.input.push(b"xy");
        r.uart.fill_from_input();
        r.uart.write_reg(LCR, 0x83);

        r.uart.write_reg(FCR, 0x03);

        assert_eq!(r.uart.read_reg(LCR), 0x83);
        assert_eq!(r.uart.read_reg(LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn loopback_msr_mirrors_mcr_as_linux_probes() {
        let mut r = rig();

        r.uart.write_reg(MCR, 0x10 | 0x0a);

        assert_eq!(r.uart.read_reg(6) & 0xf0, 0x90);
    }

    #[test]
    fn loopback_thr_byte_is_received_not_printed() {
        let mut r = rig();
        r.uart.write_reg(MCR, 0x10);

        r.uart.write_reg(0, 0x5a);

        assert_eq!(r.uart.read_reg(0), 0x5a);
        assert!(lock(&r.out.0).is_empty());
    }

    #[test]
    fn scratch_register_keeps_value() {
        let mut r = rig();

        r.uart.write_reg(7, 0xa5);

        assert_eq!(r.uart.read_reg(7), 0xa5);
    }

    #[test]
    fn dlab_divisor_is_separate_from_data() {
        let mut r = rig();
        r.uart.write_reg(LCR, 0x83);
        r.uart.write_reg(0, 0x01);
        r.uart.write_reg(1, 0x00);
        r.uart.write_reg(LCR, 0x03);

        r.uart.write_reg(LCR, 0x83);
        let divisor = (r.uart.read_reg(0), r.uart.read_reg(1));

        assert_eq!(divisor, (0x01, 0x00));
        assert!(lock(&r.out.0).is_empty(), "divisor writes are not output");
    }

    #[test]
    fn ier_keeps_only_16550_bits() {
        let mut r = rig();

        r.uart.write_reg(1, 0xff);

        assert_eq!(r.uart.read_reg(1), 0x0f);
    }
}
