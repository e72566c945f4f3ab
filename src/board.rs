//! The board: the PC's devices on one port bus, wired to the PIC.
//!
//! Port map: PIC 0x20-0x21, 0xa0-0xa1, ELCR 0x4d0-0x4d1; PIT 0x40-0x43 and
//! port 0x61; i8042 0x60/0x64; CMOS 0x70-0x71; POST 0x80; port 0x92;
//! debug-exit 0xf4-0xf7; COM1 0x3f8-0x3ff. Interrupts: PIT channel 0 on
//! IRQ 0, i8042 on IRQ 1 and 12, COM1 on IRQ 4.
//!
//! Threads: the vCPU thread owns the `Board` and is the only one touching
//! device state. Timer deadlines are the vCPU loop's own business: it reads
//! [`Platform::next_deadline`] and the clock between blocks (and sleeps
//! until the deadline in `hlt`), so no thread wakes it while it computes --
//! a timer thread's wake-ups made guest TSC calibration see host scheduling
//! jitter. The stdin thread only queues bytes (or requests a stop or a
//! pause) and raises the [`EventSignal`]. The vCPU then calls
//! [`Platform::service`], which brings the PIT and the UART up to date and
//! writes out buffered console output; the output's flush deadline is one
//! of the board's deadlines, so it goes out within milliseconds.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use btvmm_runtime::{EventSignal, GuestClock, Platform};

use crate::devices::bus::{lock, Bus, BusError, PortStats, SharedDevice};
use crate::devices::cmos::{Cmos, CMOS_PORT};
use crate::devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE};
use crate::devices::i8042::{I8042, PortA, AUX_IRQ, COMMAND_PORT, DATA_PORT, KBD_IRQ, PORT_A};
use crate::devices::irq::IrqLines;
use crate::devices::pic::{Pic, ELCR_PORT, MASTER_PORT, SLAVE_PORT};
use crate::devices::pit::{Pit, PIT_PORT, PORT_B};
use crate::devices::port80::{PostCode, POST_PORT};
use crate::console::input::{spawn_stdin_reader, InputLink};
use crate::devices::serial::{ConsoleOut, SerialInput, Uart, COM1_IRQ, COM1_PORT};
use crate::devices::stop::{PauseHandle, StopHandle, StopReason};

const PIT_IRQ: u8 = 0;

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    #[error("device wiring: {0}")]
    Bus(#[from] BusError),
    #[error("cannot start a device thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The machine's devices, seen by the vCPU through [`Platform`].
pub struct Board {
    bus: Bus,
    pic: Arc<Mutex<Pic>>,
    pit: Arc<Mutex<Pit>>,
    uart: Arc<Mutex<Uart>>,
    post: Arc<Mutex<PostCode>>,
    lines: Arc<IrqLines>,
    stop: StopHandle,
    pause: PauseHandle,
    input: Arc<SerialInput>,
    events: Arc<EventSignal>,
    clock: Arc<GuestClock>,
    /// The PIC's INTR output as last seen, to wake the vCPU on a rise.
    intr_seen: bool,
    /// A write that may have moved `next_deadline` since the vCPU last asked.
    deadline_moved: bool,
}

impl Board {
    /// A PC with `ram_size` bytes of RAM (for the CMOS), COM1 writing to
    /// `console_out`, and `events` raised whenever a device needs the vCPU.
    /// With `interactive_stdin`, a thread feeds the host's stdin to COM1
    /// (Ctrl-A x quits, Ctrl-A s pauses the vCPU for live counters).
    pub fn new(
        ram_size: u64,
        console_out: ConsoleOut,
        events: Arc<EventSignal>,
        interactive_stdin: bool,
        clock: Arc<GuestClock>,
    ) -> Result<Self, BoardError> {
        let stop = StopHandle::new();
        let pause = PauseHandle::new();
        let lines = IrqLines::new();
        let input = SerialInput::new();
        let pic = Arc::new(Mutex::new(Pic::new()));
        let pit = Arc::new(Mutex::new(Pit::with_clock(clock.now(), clock.clone())));
        let uart = Arc::new(Mutex::new(Uart::new(console_out, lines.line(COM1_IRQ), input.clone())));
        let post = Arc::new(Mutex::new(PostCode::new()));
        let kbc = Arc::new(Mutex::new(I8042::new(lines.line(KBD_IRQ), lines.line(AUX_IRQ), stop.clone())));

        let mut bus = Bus::new();
        let pic_dev: SharedDevice = pic.clone();
        bus.register("pic", MASTER_PORT, 2, pic_dev.clone())?;
        bus.register("pic", SLAVE_PORT, 2, pic_dev.clone())?;
        bus.register("pic", ELCR_PORT, 2, pic_dev)?;
        let pit_dev: SharedDevice = pit.clone();
        bus.register("pit", PIT_PORT, 4, pit_dev.clone())?;
        bus.register("pit", PORT_B, 1, pit_dev)?;
        let kbc_dev: SharedDevice = kbc;
        bus.register("i8042", DATA_PORT, 1, kbc_dev.clone())?;
        bus.register("i8042", COMMAND_PORT, 1, kbc_dev)?;
        bus.register("cmos", CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::new(ram_size))))?;
        bus.register("port80", POST_PORT, 1, post.clone())?;
        bus.register("port92", PORT_A, 1, Arc::new(Mutex::new(PortA::new(stop.clone()))))?;
        let exit = Arc::new(Mutex::new(DebugExit::new(stop.clone())));
        bus.register("debug-exit", DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, exit)?;
        bus.register("com1", COM1_PORT, 8, uart.clone())?;

        if interactive_stdin {
            spawn_stdin_reader(InputLink {
                input: input.clone(),
                events: events.clone(),
                stop: stop.clone(),
                pause: pause.clone(),
            })?;
        }
        Ok(Self {
            bus,
            pic,
            pit,
            uart,
            post,
            lines,
            stop,
            pause,
            input,
            events,
            clock,
            intr_seen: false,
            deadline_moved: false,
        })
    }

    /// Why the machine stopped, once `stop_requested()` is true.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop.reason()
    }

    /// A handle to stop the machine from elsewhere (a signal handler thread).
    /// The vCPU sees it at its next `stop_requested()` check; raise the
    /// event signal as well to wake it from `hlt`.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Queues bytes as if typed on the console (scripted input, tests).
    pub fn push_input(&self, bytes: &[u8]) {
        self.input.push(bytes);
        self.events.raise();
    }

    /// I/O port accesses by device, for `--stats`.
    pub fn port_stats(&self) -> Vec<PortStats> {
        self.bus.stats()
    }

    /// The last POST code written to port 0x80.
    pub fn post_code(&self) -> Option<u8> {
        lock(&self.post).last()
    }

    /// Writes out buffered console output.
    pub fn flush_console(&self) {
        lock(&self.uart).flush_output();
    }

    /// Moves device interrupt lines and due PIT ticks into the PIC; wakes
    /// the vCPU if INTR just rose.
    fn sync_interrupts(&mut self) {
        let mut pit = lock(&self.pit);
        let mut pic = lock(&self.pic);
        self.lines.drain_into(&mut pic);
        if !pic.irq_requested(PIT_IRQ) && pit.take_tick() {
            pic.pulse_irq(PIT_IRQ);
        }
        let intr = pic.intr_pending();
        if intr && !self.intr_seen {
            self.events.raise();
        }
        self.intr_seen = intr;
    }

}

impl Platform for Board {
    fn io_in(&mut self, port: u16, size: u8) -> u32 {
        let value = self.bus.read(port, size);
        self.sync_interrupts();
        value
    }

    fn io_out(&mut self, port: u16, size: u8, value: u32) {
        self.bus.write(port, size, value);
        // The PIT's channels and the console's flush are the deadlines.
        self.deadline_moved |= (PIT_PORT..PIT_PORT + 4).contains(&port) || port == PORT_B || (COM1_PORT..COM1_PORT + 8).contains(&port);
        self.sync_interrupts();
    }

    fn intr_pending(&mut self) -> bool {
        // INTR only changes inside port I/O, service() and the INTA cycle,
        // each of which resynchronises it: the vCPU asks before every block,
        // so this must stay a load, not a walk over the PIC.
        self.intr_seen
    }

    fn intr_ack(&mut self) -> Option<u8> {
        self.sync_interrupts();
        let vector = lock(&self.pic).ack();
        // A tick held back while IRQ0 was latched can latch now.
        self.sync_interrupts();
        vector
    }

    fn service(&mut self) {
        lock(&self.pit).service(self.clock.now());
        let mut uart = lock(&self.uart);
        uart.fill_from_input();
        if uart.output_deadline().is_some() {
            uart.flush_output();
        }
        drop(uart);
        self.sync_interrupts();
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timer = lock(&self.pit).next_deadline();
        // The console's flush deadline is host time; deadlines are on the guest clock.
        let output = lock(&self.uart).output_deadline().map(|d| d.checked_sub(self.clock.stolen()).unwrap_or(d));
        match (timer, output) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn deadline_moved(&mut self) -> bool {
        std::mem::take(&mut self.deadline_moved)
    }

    fn stop_requested(&self) -> bool {
        self.stop.is_requested()
    }

    fn pause_requested(&mut self) -> bool {
        self.pause.take()
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        self.flush_console();
    }
}


#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A writer tests can look into.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for SharedBuf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn board() -> (Board, SharedBuf, Arc<EventSignal>) {
        let out = SharedBuf::default();
        let events = Arc::new(EventSignal::new());
        let board = Board::new(64 << 20, Box::new(out.clone()), events.clone(), false, Arc::new(GuestClock::new())).unwrap();
        (board, out, events)
    }

    /// Linux's init_8259A() with every line unmasked: vectors 0x30-0x3f.
    fn init_pic(b: &mut Board) {
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            b.io_out(port, 1, value);
        }
    }

    /// The vCPU asks for the next deadline again after writes to the
    /// devices that have one (the PIT, COM1), not after every port write.
    #[test]
    fn only_timer_and_console_writes_move_the_deadline() {
        let (mut b, _, _) = board();
        b.io_out(0x80, 1, 0x12);
        assert!(!b.deadline_moved(), "a POST code");
        b.io_out(0x43, 1, 0x34);
        b.io_out(0x40, 1, 0x00);
        assert!(b.deadline_moved(), "the PIT reprogrammed");
        assert!(!b.deadline_moved(), "asked once");
        b.io_out(0x3f8, 1, u32::from(b'x'));
        assert!(b.deadline_moved(), "console output to flush");
    }

    #[test]
    fn com1_output_reaches_console_writer_at_service() {
        let (mut b, out, _) = board();

        for &c in b"ok" {
            b.io_out(0x3f8, 1, u32::from(c));
        }
        let deadline = b.next_deadline();
        b.service();

        assert!(deadline.is_some(), "buffered output asks for a service");
        assert_eq!(*lock(&out.0), b"ok");
        assert_eq!(b.next_deadline(), None, "nothing left to flush, no timer armed");
    }

    #[test]
    fn unclaimed_port_reads_all_ones() {
        let (mut b, _, _) = board();

        assert_eq!(b.io_in(0x2f8, 1), 0xff);
    }

    #[test]
    fn debug_exit_write_stops_with_status() {
        let (mut b, _, _) = board();

        b.io_out(0xf4, 1, 0x31);

        assert!(b.stop_requested());
        assert_eq!(b.stop_reason(), Some(StopReason::DebugExit(0x63)));
    }

    #[test]
    fn i8042_reset_command_stops_with_reset() {
        let (mut b, _, _) = board();

        b.io_out(0x64, 1, 0xfe);

        assert_eq!(b.stop_reason(), Some(StopReason::Reset));
    }

    #[test]
    fn pit_periodic_tick_wakes_vcpu_and_delivers_irq0() {
        let (mut b, _, events) = board();
        init_pic(&mut b);
        // Mode 2, 1193 ticks: 1 kHz.
        b.io_out(0x43, 1, 0x34);
        b.io_out(0x40, 1, 1193 & 0xff);
        b.io_out(0x40, 1, 1193 >> 8);
        events.take();

        let deadline = b.next_deadline().expect("channel 0 has a deadline");
        std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
        b.service();

        assert!(b.intr_pending());
        assert_eq!(b.intr_ack(), Some(0x30));
    }

    #[test]
    fn missed_ticks_arrive_one_per_eoi() {
        let (mut b, _, _) = board();
        init_pic(&mut b);
        b.io_out(0x43, 1, 0x34);
        b.io_out(0x40, 1, 0x00);
        b.io_out(0x40, 1, 0x01);
        // 256 ticks is ~215 us: let several periods pass unserviced.
        std::thread::sleep(Duration::from_millis(5));
        b.service();

        let mut delivered = 0;
        while b.intr_ack() == Some(0x30) {
            delivered += 1;
            b.io_out(0x20, 1, 0x20);
            if delivered > 1000 {
                break;
            }
        }

        assert!(delivered >= 2, "catch-up delivered {delivered}");
        assert!(delivered <= 466 + 50, "bounded by the 100 ms backlog cap");
    }

    #[test]
    fn serial_input_raises_irq4_after_service() {
        let (mut b, _, events) = board();
        init_pic(&mut b);
        b.io_out(0x3fc, 1, 0x08);
        b.io_out(0x3f9, 1, 0x01);

        b.push_input(b"a");
        assert!(events.take());
        b.service();

        assert_eq!(b.intr_ack(), Some(0x34));
        assert_eq!(b.io_in(0x3f8, 1), u32::from(b'a'));
    }

    #[test]
    fn cmos_reports_memory_size() {
        let (mut b, _, _) = board();

        b.io_out(0x70, 1, 0x34);
        let low = b.io_in(0x71, 1);
        b.io_out(0x70, 1, 0x35);
        let high = b.io_in(0x71, 1);

        assert_eq!(low | high << 8, (64 - 16) * 16);
    }

    #[test]
    fn port_stats_count_by_device_name() {
        let (mut b, _, _) = board();

        b.io_out(0x80, 1, 0x42);
        b.io_in(0x61, 1);
        b.io_in(0x40, 2);

        let stats = b.port_stats();
        let pit = stats.iter().find(|s| s.name == "pit").unwrap();
        let post = stats.iter().find(|s| s.name == "port80").unwrap();
        assert_eq!((pit.reads, post.writes), (3, 1));
        assert_eq!(b.post_code(), Some(0x42));
    }

    #[test]
    fn random_port_io_never_panics() {
        let (mut b, _, _) = board();
        let ports: Vec<u16> = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1, 0x40, 0x41, 0x42, 0x43, 0x61]
            .into_iter()
            .chain([0x60, 0x64, 0x70, 0x71, 0x80, 0x92, 0xf4, 0xf7, 0xffff])
            .chain(0x3f8..0x400)
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };

        for _ in 0..200_000 {
            let r = next();
            let port = ports[(r % ports.len() as u64) as usize];
            let size = [1u8, 2, 4][(r >> 8) as usize % 3];
            if r & (1 << 20) != 0 {
                b.io_out(port, size, (r >> 32) as u32);
            } else {
                b.io_in(port, size);
            }
            if r & 0xff == 0 {
                b.service();
                // Bounded: random ELCR/ICW writes may legitimately keep a line busy.
                for _ in 0..256 {
                    if b.intr_ack().is_none() {
                        break;
                    }
                    b.io_out(0xa0, 1, 0x20);
                    b.io_out(0x20, 1, 0x20);
                }
            }
        }

        assert!(b.stop_requested(), "the debug-exit port was hit");
    }

    #[test]
    fn pit_channel2_calibration_sees_out2_rise() {
        // Linux's pit_calibrate_tsc(): gate on, speaker off, mode 0 on
        // channel 2, then poll port 0x61 bit 5.
        let (mut b, _, _) = board();
        let gate = (b.io_in(0x61, 1) & !0x02) | 0x01;
        b.io_out(0x61, 1, gate);
        b.io_out(0x43, 1, 0xb0);
        b.io_out(0x42, 1, 0x9c);
        b.io_out(0x42, 1, 0x2e);
        let start = Instant::now();

        while b.io_in(0x61, 1) & 0x20 == 0 {
            assert!(start.elapsed() < Duration::from_secs(2));
        }

        // 0x2e9c = 11932 ticks = 10 ms.
        assert!(start.elapsed() >= Duration::from_micros(9_900));
    }
}
