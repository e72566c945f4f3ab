//! The 8254 programmable interval timer and the PC's port 0x61.
//!
//! Terms: three 16-bit down-counters clocked at 1.193182 MHz. Channel 0's
//! output (OUT0) drives IRQ0; channel 1 once refreshed DRAM; channel 2 drives
//! the speaker, its GATE is bit 0 of port 0x61 and its OUT readable as bit 5,
//! which is what Linux uses to calibrate the TSC. The control word (port
//! 0x43) selects a channel, its access mode (low byte, high byte, or low then
//! high), its mode and BCD counting; the channel ports 0x40-0x42 then take the
//! count. Modes: 0 interrupt on terminal count (OUT rises once), 1 hardware
//! retriggerable one-shot, 2 rate generator (OUT pulses low one clock per
//! period), 3 square wave, 4 software strobe, 5 hardware strobe. A "latch"
//! command freezes the count for reading; "read-back" (select 3) latches
//! count and/or status of several channels at once. A count of 0 means 65536
//! (10000 in BCD).
//!
//! Counting is derived from the host clock (`Instant`): a channel records the
//! instant its count was loaded and the elapsed ticks are computed on demand,
//! so the count the guest reads is exact against host time. Channel 0's rising
//! edges are counted by [`Pit::service`]; missed edges (the vCPU was busy or
//! descheduled) are kept as a backlog of at most ~100 ms worth of ticks, which
//! the board delivers one per acknowledged interrupt: a guest counting ticks
//! sees about the right number, and a long host stall does not turn into an
//! interrupt storm.
//!
//! Simplifications: a new count in modes 2 and 3 takes effect at once (the
//! chip waits for the end of the period); channels 0 and 1 have GATE tied
//! high, so in modes 1 and 5 loading the count starts them (as in QEMU).

use std::sync::Arc;

use btvmm_runtime::GuestClock;
use std::time::{Duration, Instant};

/// The PIT input clock, in Hz.
pub const PIT_HZ: u64 = 1_193_182;
pub const PIT_PORT: u16 = 0x40;
pub const PORT_B: u16 = 0x61;

/// Control word: select counter (bits 7-6); 3 is read-back.
const CW_SELECT_SHIFT: u8 = 6;
const CW_READ_BACK: u8 = 3;
/// Control word: access mode (bits 5-4); 0 is the counter latch command.
const CW_ACCESS_SHIFT: u8 = 4;
const CW_BCD: u8 = 0x01;
/// Read-back: bit 5 clear latches counts, bit 4 clear latches status.
const RB_NO_COUNT: u8 = 0x20;
const RB_NO_STATUS: u8 = 0x10;
/// Status byte: OUT pin and null count (count written, not yet loaded).
const STATUS_OUT: u8 = 0x80;
const STATUS_NULL_COUNT: u8 = 0x40;
/// Port 0x61 bits.
const PORT_B_GATE2: u8 = 0x01;
const PORT_B_SPEAKER: u8 = 0x02;
const PORT_B_WRITABLE: u8 = 0x0f;
const PORT_B_REFRESH: u8 = 0x10;
const PORT_B_OUT2: u8 = 0x20;
/// The DRAM refresh bit toggles every 15.085 us.
const REFRESH_HALF_PERIOD_NS: u128 = 15_085;
/// At most this much time's worth of missed channel 0 ticks is kept.
const MAX_BACKLOG: Duration = Duration::from_millis(100);

/// Ticks of the PIT clock in `d`, rounded down.
fn duration_to_ticks(d: Duration) -> u64 {
    u64::try_from(d.as_nanos() * u128::from(PIT_HZ) / 1_000_000_000).unwrap_or(u64::MAX)
}

/// The time `ticks` take, rounded up, so that at `start + ticks_to_duration(t)`
/// at least `t` ticks have elapsed.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let ns = (u128::from(ticks) * 1_000_000_000).div_ceil(u128::from(PIT_HZ));
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

fn from_bcd(v: u16) -> u64 {
    (0..4).rev().fold(0, |acc, i| acc * 10 + u64::from((v >> (4 * i)) & 0xf))
}

fn to_bcd(mut v: u64) -> u16 {
    (0..4).fold(0, |acc, i| {
        let digit = (v % 10) as u16;
        v /= 10;
        acc | (digit << (4 * i))
    })
}

/// How the channel's count is transferred over the 8-bit port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Access {
    Low = 1,
    High = 2,
    #[default]
    LowHigh = 3,
}

/// A latched count and which of its bytes the next read returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Latched {
    Low(u16),
    High(u16),
    /// Both bytes, low first.
    Word(u16),
}

#[derive(Clone, Debug)]
struct Channel {
    mode: u8,
    access: Access,
    bcd: bool,
    /// The count as last written (raw, BCD if `bcd`).
    reload: u16,
    /// Low byte written, waiting for the high byte (low-then-high access).
    pending_low: Option<u8>,
    /// The next live read in low-then-high access returns the high byte.
    read_high: bool,
    latched: Option<Latched>,
    status: Option<u8>,
    /// A count has been loaded since the last control word.
    loaded: bool,
    null_count: bool,
    gate: bool,
    /// Modes 1 and 5: a gate edge (or the load, for gates tied high) started it.
    triggered: bool,
    running: bool,
    start: Instant,
    /// Ticks counted before `start` (the gate paused the count).
    base: u64,
    /// Rising edges of OUT since the load already accounted for.
    edges_seen: u64,
    /// GATE is tied high (channels 0 and 1).
    gate_tied: bool,
}

impl Channel {
    fn new(now: Instant, gate_tied: bool) -> Self {
        Self {
            mode: 0,
            access: Access::LowHigh,
            bcd: false,
            reload: 0,
            pending_low: None,
            read_high: false,
            latched: None,
            status: None,
            loaded: false,
            null_count: true,
            gate: gate_tied,
            triggered: false,
            running: false,
            start: now,
            base: 0,
            edges_seen: 0,
            gate_tied,
        }
    }

    fn modulus(&self) -> u64 {
        if self.bcd {
            10_000
        } else {
            0x1_0000
        }
    }

    /// The period in ticks (the count as a number; 0 means the modulus).
    fn period(&self) -> u64 {
        let n = if self.bcd { from_bcd(self.reload) } else { u64::from(self.reload) };
        if n == 0 {
            self.modulus()
        } else {
            n
        }
    }

    fn elapsed(&self, now: Instant) -> u64 {
        let running = if self.running {
            duration_to_ticks(now.saturating_duration_since(self.start))
        } else {
            0
        };
        self.base.saturating_add(running)
    }

    fn pause(&mut self, now: Instant) {
        self.base = self.elapsed(now);
        self.running = false;
    }

    fn resume(&mut self, now: Instant) {
        self.start = now;
        self.running = true;
    }

    fn restart(&mut self, now: Instant) {
        self.base = 0;
        self.edges_seen = 0;
        self.resume(now);
    }

    fn set_control(&mut self, mode: u8, access: Access, bcd: bool) {
        // Modes 6 and 7 are aliases of 2 and 3.
        self.mode = if mode > 5 { mode & 3 } else { mode };
        self.access = access;
        self.bcd = bcd;
        self.pending_low = None;
        self.read_high = false;
        self.latched = None;
        self.status = None;
        self.loaded = false;
        self.null_count = true;
        self.running = false;
        self.triggered = false;
        self.base = 0;
        self.edges_seen = 0;
    }

    fn load(&mut self, value: u16, now: Instant) {
        self.reload = value;
        self.loaded = true;
        self.null_count = false;
        self.base = 0;
        self.edges_seen = 0;
        self.start = now;
        self.running = match self.mode {
            1 | 5 => {
                self.triggered = self.gate_tied;
                self.gate_tied
            }
            _ => self.gate,
        };
    }

    fn write(&mut self, value: u8, now: Instant) {
        match self.access {
            Access::Low => self.load(u16::from(value), now),
            Access::High => self.load(u16::from(value) << 8, now),
            Access::LowHigh => match self.pending_low.take() {
                None => self.pending_low = Some(value),
                Some(low) => self.load(u16::from_le_bytes([low, value]), now),
            },
        }
    }

    fn set_gate(&mut self, high: bool, now: Instant) {
        if high == self.gate || self.gate_tied {
            return;
        }
        self.gate = high;
        if !self.loaded {
            return;
        }
        match (self.mode, high) {
            (0 | 4, true) => self.resume(now),
            (0 | 4 | 2 | 3, false) => self.pause(now),
            (_, true) => {
                self.triggered = true;
                self.restart(now);
            }
            // Modes 1 and 5 ignore the gate going low.
            (_, false) => {}
        }
    }

    fn out(&self, now: Instant) -> bool {
        if !self.loaded {
            return self.mode != 0;
        }
        let p = self.period();
        let e = self.elapsed(now);
        match self.mode {
            0 => e >= p,
            1 => !self.triggered || e >= p,
            2 => !self.gate || e % p != p - 1,
            3 => !self.gate || e % p < p.div_ceil(2),
            4 => e != p,
            _ => !self.triggered || e != p,
        }
    }

    /// The counting element's value (binary, even in BCD mode).
    fn count(&self, now: Instant) -> u64 {
        if !self.loaded {
            return self.period() % self.modulus();
        }
        let (p, m) = (self.period(), self.modulus());
        let e = self.elapsed(now);
        let value = match self.mode {
            2 => p - e % p,
            3 => p - (e.wrapping_mul(2)) % p,
            _ => (p + m - e % m) % m,
        };
        value % m
    }

    fn count_word(&self, now: Instant) -> u16 {
        let c = self.count(now);
        if self.bcd {
            to_bcd(c)
        } else {
            c as u16
        }
    }

    /// Rising edges of OUT since the load.
    fn edges(&self, now: Instant) -> u64 {
        if !self.loaded {
            return 0;
        }
        let (p, e) = (self.period(), self.elapsed(now));
        match self.mode {
            0 => u64::from(e >= p),
            1 => u64::from(self.triggered && e >= p),
            2 | 3 => e / p,
            4 => u64::from(e > p),
            _ => u64::from(self.triggered && e > p),
        }
    }

    /// The elapsed-tick value at which the next unseen rising edge happens.
    fn next_edge(&self) -> Option<u64> {
        if !self.loaded {
            return None;
        }
        let p = self.period();
        match (self.mode, self.edges_seen) {
            (2 | 3, n) => n.checked_add(1)?.checked_mul(p),
            (0 | 1, 0) => Some(p),
            (4 | 5, 0) => Some(p + 1),
            _ => None,
        }
    }

    fn latch_count(&mut self, now: Instant) {
        if self.latched.is_some() {
            return;
        }
        let c = self.count_word(now);
        self.latched = Some(match self.access {
            Access::Low => Latched::Low(c),
            Access::High => Latched::High(c),
            Access::LowHigh => Latched::Word(c),
        });
    }

    fn latch_status(&mut self, now: Instant) {
        if self.status.is_some() {
            return;
        }
        let mut s = (self.access as u8) << CW_ACCESS_SHIFT | self.mode << 1 | u8::from(self.bcd);
        if self.out(now) {
            s |= STATUS_OUT;
        }
        if self.null_count {
            s |= STATUS_NULL_COUNT;
        }
        self.status = Some(s);
    }

    fn read(&mut self, now: Instant) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        if let Some(l) = self.latched.take() {
            let [low, high] = match l {
                Latched::Low(c) | Latched::High(c) | Latched::Word(c) => c.to_le_bytes(),
            };
            return match l {
                Latched::Low(_) => low,
                Latched::High(_) => high,
                Latched::Word(c) => {
                    self.latched = Some(Latched::High(c));
                    low
                }
            };
        }
        let [low, high] = self.count_word(now).to_le_bytes();
        match self.access {
            Access::Low => low,
            Access::High => high,
            Access::LowHigh => {
                self.read_high = !self.read_high;
                if self.read_high {
                    low
                } else {
                    high
                }
            }
        }
    }
}

/// The three-channel 8254 plus port 0x61.
#[derive(Clone, Debug)]
pub struct Pit {
    channels: [Channel; 3],
    /// Port 0x61 bits 1-3 as written (bit 0 is channel 2's gate).
    port_b: u8,
    created: Instant,
    /// Channel 0 rising edges not yet delivered as IRQ0.
    backlog: u64,
    /// Where port accesses read the time: the guest's clock, which the TSC follows too.
    clock: Arc<GuestClock>,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

impl Pit {
    pub fn new(now: Instant) -> Self {
        Self::with_clock(now, Arc::new(GuestClock::new()))
    }

    /// A PIT whose port accesses take the time from `clock`.
    pub fn with_clock(now: Instant, clock: Arc<GuestClock>) -> Self {
        Self {
            channels: [Channel::new(now, true), Channel::new(now, true), Channel::new(now, false)],
            port_b: 0,
            created: now,
            backlog: 0,
            clock,
        }
    }

    /// Largest backlog of channel 0 ticks kept for delivery.
    fn backlog_cap(&self) -> u64 {
        let period = ticks_to_duration(self.channels[0].period());
        MAX_BACKLOG.as_nanos().div_ceil(period.as_nanos().max(1)).clamp(1, 100) as u64
    }

    /// Accounts channel 0's rising edges up to `now` into the IRQ0 backlog.
    pub fn service(&mut self, now: Instant) {
        let ch = &mut self.channels[0];
        let total = ch.edges(now);
        let new = total.saturating_sub(ch.edges_seen);
        ch.edges_seen = total;
        self.backlog = self.backlog.saturating_add(new).min(self.backlog_cap());
    }

    /// Takes one pending IRQ0 edge, if any. The board calls this when the
    /// PIC's IRQ0 request is clear, so ticks are delivered one per ack.
    pub fn take_tick(&mut self) -> bool {
        if self.backlog == 0 {
            return false;
        }
        self.backlog -= 1;
        true
    }

    /// When channel 0's next IRQ0 edge is due (for the timer thread).
    pub fn next_deadline(&self) -> Option<Instant> {
        let ch = &self.channels[0];
        if !ch.running {
            return None;
        }
        let target = ch.next_edge()?.saturating_sub(ch.base);
        ch.start.checked_add(ticks_to_duration(target))
    }

    fn write_control(&mut self, value: u8, now: Instant) {
        let select = value >> CW_SELECT_SHIFT;
        let access = (value >> CW_ACCESS_SHIFT) & 3;
        if select == CW_READ_BACK {
            for (i, ch) in self.channels.iter_mut().enumerate() {
                if value & (2 << i) == 0 {
                    continue;
                }
                if value & RB_NO_COUNT == 0 {
                    ch.latch_count(now);
                }
                if value & RB_NO_STATUS == 0 {
                    ch.latch_status(now);
                }
            }
            return;
        }
        let index = usize::from(select);
        let access = match access {
            0 => return self.channels[index].latch_count(now),
            1 => Access::Low,
            2 => Access::High,
            _ => Access::LowHigh,
        };
        if index == 0 {
            self.service(now);
        }
        self.channels[index].set_control((value >> 1) & 7, access, value & CW_BCD != 0);
    }

    /// Port 0x40-0x43 read at `offset` 0-3.
    pub fn read_at(&mut self, offset: u16, now: Instant) -> u8 {
        match self.channels.get_mut(usize::from(offset)) {
            Some(ch) => ch.read(now),
            // The control register is write-only.
            None => 0,
        }
    }

    /// Port 0x40-0x43 write at `offset` 0-3.
    pub fn write_at(&mut self, offset: u16, value: u8, now: Instant) {
        match offset {
            0 => {
                self.service(now);
                self.channels[0].write(value, now);
            }
            1 | 2 => self.channels[usize::from(offset)].write(value, now),
            _ => self.write_control(value, now),
        }
    }

    /// Port 0x61 read: gate 2, speaker, parity/channel check enables, the
    /// refresh toggle and OUT2.
    pub fn read_port_b(&self, now: Instant) -> u8 {
        let ch2 = &self.channels[2];
        let mut v = self.port_b | u8::from(ch2.gate);
        let half_periods = now.saturating_duration_since(self.created).as_nanos() / REFRESH_HALF_PERIOD_NS;
        if half_periods & 1 != 0 {
            v |= PORT_B_REFRESH;
        }
        if ch2.out(now) {
            v |= PORT_B_OUT2;
        }
        v
    }

    pub fn write_port_b(&mut self, value: u8, now: Instant) {
        self.port_b = value & PORT_B_WRITABLE & !PORT_B_GATE2;
        self.channels[2].set_gate(value & PORT_B_GATE2 != 0, now);
    }

    /// Whether the speaker would sound (gate 2 and speaker data both on).
    pub fn speaker_enabled(&self) -> bool {
        self.port_b & PORT_B_SPEAKER != 0 && self.channels[2].gate
    }
}

impl super::bus::PortDevice for Pit {
    fn read(&mut self, base: u16, offset: u16, _size: u8) -> u32 {
        let now = self.clock.now();
        u32::from(match base {
            PORT_B => self.read_port_b(now),
            _ => self.read_at(offset, now),
        })
    }

    fn write(&mut self, base: u16, offset: u16, _size: u8, value: u32) {
        let now = self.clock.now();
        match base {
            PORT_B => self.write_port_b(value as u8, now),
            _ => self.write_at(offset, value as u8, now),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ticks: u64) -> Instant {
        t0 + ticks_to_duration(ticks)
    }

    /// Programs channel `ch` with control word `cw` and a low-then-high count.
    fn program(pit: &mut Pit, cw: u8, count: u16, now: Instant) {
        let ch = u16::from(cw >> 6);
        pit.write_at(3, cw, now);
        pit.write_at(ch, count as u8, now);
        pit.write_at(ch, (count >> 8) as u8, now);
    }

    fn read_word(pit: &mut Pit, ch: u16, now: Instant) -> u16 {
        let low = pit.read_at(ch, now);
        u16::from_le_bytes([low, pit.read_at(ch, now)])
    }

    #[test]
    fn ticks_to_duration_rounds_up_to_reach_the_tick() {
        let d = ticks_to_duration(11_932);

        assert_eq!(duration_to_ticks(d), 11_932);
        assert_eq!(duration_to_ticks(d - Duration::from_nanos(1)), 11_931);
    }

    #[test]
    fn mode0_count_decrements_with_host_time() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x30, 1000, t0);

        let count = read_word(&mut pit, 0, at(t0, 250));

        assert_eq!(count, 750);
    }

    #[test]
    fn latch_freezes_count_until_read() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 5000, t0);

        pit.write_at(3, 0x00, at(t0, 100));
        let count = read_word(&mut pit, 0, at(t0, 3000));

        assert_eq!(count, 4900);
    }

    #[test]
    fn latch_twice_keeps_first_value() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x30, 5000, t0);

        pit.write_at(3, 0x00, at(t0, 10));
        pit.write_at(3, 0x00, at(t0, 20));

        assert_eq!(read_word(&mut pit, 0, at(t0, 30)), 4990);
    }

    #[test]
    fn read_back_status_reports_mode_access_and_out() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_port_b(0x01, t0);
        program(&mut pit, 0xb0, 100, t0);

        // Read-back, status only, channel 2.
        pit.write_at(3, 0xe8, at(t0, 150));
        let status = pit.read_at(2, at(t0, 150));

        assert_eq!(status, STATUS_OUT | 0x30);
    }

    #[test]
    fn read_back_after_control_word_reports_null_count() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_at(3, 0x34, t0);

        pit.write_at(3, 0xe2, t0);

        assert_eq!(pit.read_at(0, t0), STATUS_OUT | STATUS_NULL_COUNT | 0x34);
    }

    #[test]
    fn read_back_count_and_status_returns_status_first() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 1000, t0);

        pit.write_at(3, 0xc2, at(t0, 1));
        let status = pit.read_at(0, at(t0, 5));
        let count = read_word(&mut pit, 0, at(t0, 5));

        assert_eq!((status, count), (0x34 | STATUS_OUT, 999));
    }

    #[test]
    fn lobyte_access_reads_and_writes_low_byte_only() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_at(3, 0x10, t0);
        pit.write_at(0, 200, t0);

        let count = pit.read_at(0, at(t0, 50));

        assert_eq!(count, 150);
    }

    #[test]
    fn hibyte_access_loads_high_byte() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_at(3, 0x20, t0);
        pit.write_at(0, 0x02, t0);

        let high = pit.read_at(0, at(t0, 1));

        assert_eq!(high, 0x01, "0x200 - 1 = 0x1ff");
    }

    #[test]
    fn bcd_count_reads_in_bcd() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x31, 0x1000, t0);

        let count = read_word(&mut pit, 0, at(t0, 1));

        assert_eq!(count, 0x0999);
    }

    #[test]
    fn mode2_count_reloads_each_period() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 100, t0);

        let count = read_word(&mut pit, 0, at(t0, 1030));

        assert_eq!(count, 70);
    }

    #[test]
    fn mode0_out2_rises_at_terminal_count_on_port_b() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_port_b(0x01, t0);
        program(&mut pit, 0xb0, 1000, t0);

        let before = pit.read_port_b(at(t0, 999)) & PORT_B_OUT2;
        let after = pit.read_port_b(at(t0, 1000)) & PORT_B_OUT2;

        assert_eq!((before, after), (0, PORT_B_OUT2));
    }

    #[test]
    fn gate2_low_pauses_mode0_count() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_port_b(0x01, t0);
        program(&mut pit, 0xb0, 1000, t0);

        pit.write_port_b(0x00, at(t0, 100));
        pit.write_port_b(0x01, at(t0, 500));
        let count = read_word(&mut pit, 2, at(t0, 600));

        assert_eq!(count, 800);
    }

    #[test]
    fn gate2_rising_edge_triggers_mode1() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0xb2, 100, t0);
        let idle = pit.read_port_b(at(t0, 500)) & PORT_B_OUT2;

        pit.write_port_b(0x01, at(t0, 1000));
        let during = pit.read_port_b(at(t0, 1050)) & PORT_B_OUT2;
        let after = pit.read_port_b(at(t0, 1101)) & PORT_B_OUT2;

        assert_eq!((idle, during, after), (PORT_B_OUT2, 0, PORT_B_OUT2));
    }

    #[test]
    fn quick_pit_calibrate_msb_decrements_every_256_ticks() {
        // Linux's quick_pit_calibrate(): mode 0 on channel 2, count 0xffff,
        // then reads of low and high bytes without latching.
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_port_b(0x01, t0);
        program(&mut pit, 0xb0, 0xffff, t0);

        let msbs: Vec<u8> = (0..4u64)
            .map(|i| {
                let now = at(t0, 256 * i + 10);
                pit.read_at(2, now);
                pit.read_at(2, now)
            })
            .collect();

        assert_eq!(msbs, vec![0xff, 0xfe, 0xfd, 0xfc]);
    }

    #[test]
    fn port_b_refresh_bit_toggles() {
        let t0 = Instant::now();
        let pit = Pit::new(t0);

        let a = pit.read_port_b(t0 + Duration::from_nanos(1_000)) & PORT_B_REFRESH;
        let b = pit.read_port_b(t0 + Duration::from_nanos(16_000)) & PORT_B_REFRESH;

        assert_ne!(a, b);
    }

    #[test]
    fn port_b_write_keeps_speaker_bits() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);

        pit.write_port_b(0xff, t0);

        assert_eq!(pit.read_port_b(t0) & 0x0f, 0x0f);
        assert!(pit.speaker_enabled());
    }

    #[test]
    fn service_mode2_counts_periodic_ticks() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 11932, t0);

        pit.service(at(t0, 11932 * 3 + 5));
        let ticks = std::iter::from_fn(|| pit.take_tick().then_some(())).count();

        assert_eq!(ticks, 3);
    }

    #[test]
    fn service_twice_does_not_double_count() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 1000, t0);
        pit.service(at(t0, 1500));

        pit.service(at(t0, 1600));

        assert!(pit.take_tick());
        assert!(!pit.take_tick());
    }

    #[test]
    fn service_long_stall_backlog_is_capped() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        // 100 Hz: a 100 ms cap keeps 10 ticks.
        program(&mut pit, 0x34, 11932, t0);

        pit.service(t0 + Duration::from_secs(60));
        let ticks = std::iter::from_fn(|| pit.take_tick().then_some(())).count();

        assert_eq!(ticks, 10);
    }

    #[test]
    fn service_mode0_one_shot_fires_once() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x30, 500, t0);

        pit.service(at(t0, 600));
        pit.service(at(t0, 100_000));

        assert!(pit.take_tick());
        assert!(!pit.take_tick());
        assert_eq!(pit.next_deadline(), None);
    }

    #[test]
    fn next_deadline_mode0_is_load_plus_count() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);

        program(&mut pit, 0x30, 1193, t0);

        assert_eq!(pit.next_deadline(), Some(at(t0, 1193)));
    }

    #[test]
    fn next_deadline_mode2_advances_after_service() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x34, 1000, t0);

        pit.service(at(t0, 2500));

        assert_eq!(pit.next_deadline(), Some(at(t0, 3000)));
    }

    #[test]
    fn next_deadline_after_control_word_only_is_none() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);

        pit.write_at(3, 0x34, t0);

        assert_eq!(pit.next_deadline(), None);
    }

    #[test]
    fn reprogram_channel0_keeps_due_tick() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x30, 100, t0);

        program(&mut pit, 0x30, 100, at(t0, 150));

        assert!(pit.take_tick(), "the edge at tick 100 was accounted before reload");
    }

    #[test]
    fn mode3_out_is_square_wave() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        pit.write_port_b(0x01, t0);
        program(&mut pit, 0xb6, 100, t0);

        let outs: Vec<bool> = [10, 60, 110, 160].iter().map(|&t| pit.channels[2].out(at(t0, t))).collect();

        assert_eq!(outs, vec![true, false, true, false]);
    }

    #[test]
    fn read_control_port_returns_zero() {
        let mut pit = Pit::default();

        assert_eq!(pit.read_at(3, Instant::now()), 0);
    }

    #[test]
    fn count_zero_means_65536() {
        let t0 = Instant::now();
        let mut pit = Pit::new(t0);
        program(&mut pit, 0x30, 0, t0);

        let count = read_word(&mut pit, 0, at(t0, 1));

        assert_eq!(count, 0xffff);
    }
}
