//! The MC146818 real-time clock and its 128 bytes of CMOS RAM.
//!
//! Terms: port 0x70 selects a register (bits 0-6; bit 7 is the PC's NMI
//! disable, kept but without effect as this machine has no NMI source),
//! port 0x71 reads or writes it. Registers 0x00-0x09 hold the time (seconds,
//! alarm seconds, minutes, alarm minutes, hours, alarm hours, day of week
//! with Sunday = 1, day of month, month, year within the century); 0x32 the
//! century (the PC/AT convention). Register A: bit 7 UIP (update in progress:
//! the time registers are about to change, read them later), the divider and
//! rate select. Register B: bit 7 SET (freeze updates so software can set
//! the time), interrupt enables, bit 2 DM (binary rather than BCD), bit 1
//! 24-hour mode (in 12-hour mode bit 7 of the hour is PM). Register C:
//! interrupt flags, cleared by reading. Register D: bit 7 VRT (valid RAM and
//! time). The rest is battery-backed RAM; the BIOS convention puts memory
//! sizes at 0x15-0x18, 0x30-0x31, 0x34-0x35 and 0x5b-0x5d.
//!
//! The time is the host's UTC time plus an offset the guest sets by writing
//! the time registers. UIP reads as set during the last 244 us of each
//! second, as on the chip. The update-ended flag (UF) in register C is
//! reported when a second boundary passed since C was last read; no RTC
//! interrupt (IRQ 8) is generated.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub const CMOS_PORT: u16 = 0x70;

const REG_SECONDS: u8 = 0x00;
const REG_MINUTES: u8 = 0x02;
const REG_HOURS: u8 = 0x04;
const REG_DAY_OF_WEEK: u8 = 0x06;
const REG_DAY_OF_MONTH: u8 = 0x07;
const REG_MONTH: u8 = 0x08;
const REG_YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const REG_EQUIPMENT: u8 = 0x14;
const REG_BASE_MEM_LO: u8 = 0x15;
const REG_EXT_MEM_LO: u8 = 0x17;
const REG_EXT_MEM2_LO: u8 = 0x30;
const REG_CENTURY: u8 = 0x32;
const REG_HIGH_MEM_LO: u8 = 0x34;
const REG_ABOVE_4G: u8 = 0x5b;
const REG_CPU_COUNT: u8 = 0x5f;

const A_UIP: u8 = 0x80;
/// Divider bits 6-4 = 010: the 32.768 kHz time base is running.
const A_DIVIDER_MASK: u8 = 0x70;
const A_DIVIDER_RUNNING: u8 = 0x20;
const A_DEFAULT: u8 = 0x26;
const B_SET: u8 = 0x80;
const B_UIE: u8 = 0x10;
const B_DM_BINARY: u8 = 0x04;
const B_24H: u8 = 0x02;
const B_DEFAULT: u8 = B_24H;
const C_IRQF: u8 = 0x80;
const C_UF: u8 = 0x10;
const D_VRT: u8 = 0x80;
const HOUR_PM: u8 = 0x80;
/// UIP is set this long before each update.
const UIP_WINDOW_NS: u32 = 244_000;
/// The equipment byte: a math coprocessor, an EGA/VGA display.
const EQUIPMENT: u8 = 0x02;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day counted from 1970-01-01: (year, month 1-12, day 1-31).
fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The broken-down time the clock registers show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct DateTime {
    year: i64,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday.
    weekday: u8,
}

impl DateTime {
    fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let (year, month, day) = civil_from_days(days);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
            weekday: ((days + 4).rem_euclid(7) + 1) as u8,
        }
    }

    /// Out-of-range fields (a guest wrote garbage) are carried over, as far
    /// as the arithmetic goes; nothing panics.
    fn to_unix(self) -> i64 {
        let month = i64::from(self.month.clamp(1, 12));
        let days = days_from_civil(self.year, month, i64::from(self.day.max(1)));
        days * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }
}

fn to_bcd(v: u8) -> u8 {
    ((v / 10 % 10) << 4) | (v % 10)
}

fn from_bcd(v: u8) -> u8 {
    (v >> 4) * 10 + (v & 0xf)
}

/// A source of host wall-clock time (time since the Unix epoch).
pub type WallClock = Box<dyn Fn() -> Duration + Send>;

fn host_wall_clock() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// The RTC and CMOS RAM.
pub struct Cmos {
    index: u8,
    nmi_disabled: bool,
    ram: [u8; 128],
    /// Guest time minus host time, in seconds.
    offset: i64,
    clock: WallClock,
    /// The guest second at the last read of register C.
    last_c_second: i64,
}

impl Cmos {
    /// A CMOS for a machine with `ram_size` bytes of RAM, on the host clock.
    pub fn new(ram_size: u64) -> Self {
        Self::with_clock(ram_size, Box::new(host_wall_clock))
    }

    /// As [`Cmos::new`], with the wall clock supplied (for tests).
    pub fn with_clock(ram_size: u64, clock: WallClock) -> Self {
        let mut cmos = Self {
            index: 0,
            nmi_disabled: false,
            ram: [0; 128],
            offset: 0,
            clock,
            last_c_second: 0,
        };
        cmos.ram[usize::from(REG_A)] = A_DEFAULT;
        cmos.ram[usize::from(REG_B)] = B_DEFAULT;
        cmos.ram[usize::from(REG_D)] = D_VRT;
        cmos.ram[usize::from(REG_EQUIPMENT)] = EQUIPMENT;
        cmos.set_memory_size(ram_size);
        cmos.last_c_second = cmos.now().0;
        cmos
    }

    fn set_word(&mut self, reg: u8, value: u16) {
        let [lo, hi] = value.to_le_bytes();
        self.ram[usize::from(reg)] = lo;
        self.ram[usize::from(reg) + 1] = hi;
    }

    fn set_memory_size(&mut self, ram_size: u64) {
        const KIB: u64 = 1024;
        const MIB: u64 = 1024 * KIB;
        const FOUR_GIB: u64 = 4096 * MIB;
        let below_4g = ram_size.min(FOUR_GIB);
        self.set_word(REG_BASE_MEM_LO, 640);
        let ext_kib = (below_4g.saturating_sub(MIB) / KIB).min(0xffff) as u16;
        self.set_word(REG_EXT_MEM_LO, ext_kib);
        self.set_word(REG_EXT_MEM2_LO, ext_kib);
        let high_64k = (below_4g.saturating_sub(16 * MIB) / (64 * KIB)).min(0xffff) as u16;
        self.set_word(REG_HIGH_MEM_LO, high_64k);
        let above_64k = (ram_size - below_4g) / (64 * KIB);
        let bytes = above_64k.min(0xff_ffff).to_le_bytes();
        self.ram[usize::from(REG_ABOVE_4G)..usize::from(REG_ABOVE_4G) + 3].copy_from_slice(&bytes[..3]);
        self.ram[usize::from(REG_CPU_COUNT)] = 0;
    }

    /// The guest's time: whole seconds since the epoch and nanoseconds into the second.
    fn now(&self) -> (i64, u32) {
        let host = (self.clock)();
        let secs = i64::try_from(host.as_secs()).unwrap_or(i64::MAX);
        (secs.saturating_add(self.offset), host.subsec_nanos())
    }

    fn reg(&self, reg: u8) -> u8 {
        self.ram[usize::from(reg & 0x7f)]
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_DM_BINARY != 0
    }

    fn encode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            to_bcd(v)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.binary() {
            v
        } else {
            from_bcd(v)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.encode(hour);
        }
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | if hour >= 12 { HOUR_PM } else { 0 }
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            return self.decode(v);
        }
        self.decode(v & !HOUR_PM) % 12 + if v & HOUR_PM != 0 { 12 } else { 0 }
    }

    /// Writes the current guest time into the time registers.
    fn materialize(&mut self) {
        let t = DateTime::from_unix(self.now().0);
        let year = t.year.rem_euclid(10_000);
        let fields = [
            (REG_SECONDS, self.encode(t.second)),
            (REG_MINUTES, self.encode(t.minute)),
            (REG_HOURS, self.encode_hour(t.hour)),
            (REG_DAY_OF_WEEK, self.encode(t.weekday)),
            (REG_DAY_OF_MONTH, self.encode(t.day)),
            (REG_MONTH, self.encode(t.month)),
            (REG_YEAR, self.encode((year % 100) as u8)),
            (REG_CENTURY, self.encode((year / 100) as u8)),
        ];
        for (reg, value) in fields {
            self.ram[usize::from(reg)] = value;
        }
    }

    /// Sets the guest time from the time registers.
    fn adopt_registers(&mut self) {
        let year = i64::from(self.decode(self.reg(REG_CENTURY))) * 100
            + i64::from(self.decode(self.reg(REG_YEAR)));
        let t = DateTime {
            year,
            month: self.decode(self.reg(REG_MONTH)),
            day: self.decode(self.reg(REG_DAY_OF_MONTH)),
            hour: self.decode_hour(self.reg(REG_HOURS)),
            minute: self.decode(self.reg(REG_MINUTES)),
            second: self.decode(self.reg(REG_SECONDS)),
            weekday: 1,
        };
        let host = i64::try_from((self.clock)().as_secs()).unwrap_or(i64::MAX);
        self.offset = t.to_unix().saturating_sub(host);
    }

    fn updating(&self) -> bool {
        self.reg(REG_B) & B_SET == 0 && self.reg(REG_A) & A_DIVIDER_MASK == A_DIVIDER_RUNNING
    }

    fn is_clock_register(reg: u8) -> bool {
        matches!(
            reg,
            REG_SECONDS
                | REG_MINUTES
                | REG_HOURS
                | REG_DAY_OF_WEEK
                | REG_DAY_OF_MONTH
                | REG_MONTH
                | REG_YEAR
                | REG_CENTURY
        )
    }

    /// Reads the selected register (port 0x71).
    pub fn read_data(&mut self) -> u8 {
        let reg = self.index;
        match reg {
            _ if Self::is_clock_register(reg) && self.updating() => {
                self.materialize();
                self.reg(reg)
            }
            REG_A => {
                let uip = self.updating() && self.now().1 >= 1_000_000_000 - UIP_WINDOW_NS;
                self.reg(REG_A) | if uip { A_UIP } else { 0 }
            }
            REG_C => {
                let second = self.now().0;
                let mut flags = 0;
                if self.updating() && second != self.last_c_second {
                    flags |= C_UF;
                }
                self.last_c_second = second;
                if flags & C_UF != 0 && self.reg(REG_B) & B_UIE != 0 {
                    flags |= C_IRQF;
                }
                flags
            }
            _ => self.reg(reg),
        }
    }

    /// Writes the selected register (port 0x71).
    pub fn write_data(&mut self, value: u8) {
        let reg = self.index;
        match reg {
            REG_A => self.ram[usize::from(REG_A)] = value & !A_UIP,
            REG_B => {
                let old = self.reg(REG_B);
                if value & B_SET != 0 && old & B_SET == 0 {
                    // Freeze: the registers keep the time at this moment.
                    self.materialize();
                }
                self.ram[usize::from(REG_B)] = value;
                if value & B_SET == 0 && old & B_SET != 0 {
                    self.adopt_registers();
                }
            }
            REG_C | REG_D => {}
            _ if Self::is_clock_register(reg) => {
                let running = self.reg(REG_B) & B_SET == 0;
                if running {
                    self.materialize();
                }
                self.ram[usize::from(reg)] = value;
                if running {
                    self.adopt_registers();
                }
            }
            _ => self.ram[usize::from(reg)] = value,
        }
    }

    /// Port 0x70: selects a register; bit 7 disables NMI.
    pub fn write_index(&mut self, value: u8) {
        self.index = value & 0x7f;
        self.nmi_disabled = value & 0x80 != 0;
    }

    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }
}

impl super::bus::PortDevice for Cmos {
    fn read(&mut self, _base: u16, offset: u16, _size: u8) -> u32 {
        match offset {
            // The index register is write-only; the bus floats.
            0 => 0xff,
            _ => u32::from(self.read_data()),
        }
    }

    fn write(&mut self, _base: u16, offset: u16, _size: u8, value: u32) {
        match offset {
            0 => self.write_index(value as u8),
            _ => self.write_data(value as u8),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// 2024-02-29 13:45:30 UTC, a Thursday.
    const LEAP_DAY: u64 = 1_709_214_330;

    fn cmos_at(nanos: Arc<AtomicU64>, ram: u64) -> Cmos {
        Cmos::with_clock(ram, Box::new(move || Duration::from_nanos(nanos.load(Ordering::Relaxed))))
    }

    fn clock(secs: u64) -> Arc<AtomicU64> {
        Arc::new(AtomicU64::new(secs * 1_000_000_000))
    }

    fn read(cmos: &mut Cmos, reg: u8) -> u8 {
        cmos.write_index(reg);
        cmos.read_data()
    }

    fn write(cmos: &mut Cmos, reg: u8, value: u8) {
        cmos.write_index(reg);
        cmos.write_data(value);
    }

    #[test]
    fn civil_round_trip_over_four_centuries() {
        for days in (-800_000i64..800_000).step_by(997) {
            let (y, m, d) = civil_from_days(days);

            assert_eq!(days_from_civil(y, i64::from(m), i64::from(d)), days);
        }
    }

    #[test]
    fn time_registers_read_bcd_by_default() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);

        let regs: Vec<u8> = [0, 2, 4, 6, 7, 8, 9, 0x32].iter().map(|&r| read(&mut cmos, r)).collect();

        assert_eq!(regs, vec![0x30, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]);
    }

    #[test]
    fn time_registers_binary_when_dm_set() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);
        write(&mut cmos, REG_B, B_24H | B_DM_BINARY);

        let (h, m, s) = (read(&mut cmos, 4), read(&mut cmos, 2), read(&mut cmos, 0));

        assert_eq!((h, m, s), (13, 45, 30));
    }

    #[test]
    fn hours_in_12h_mode_set_pm_bit() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);
        write(&mut cmos, REG_B, 0);

        let hour = read(&mut cmos, REG_HOURS);

        assert_eq!(hour, HOUR_PM | 0x01);
    }

    #[test]
    fn hours_midnight_in_12h_mode_reads_12_am() {
        let mut cmos = cmos_at(clock(LEAP_DAY - 13 * 3600 - 45 * 60), 0);
        write(&mut cmos, REG_B, 0);

        assert_eq!(read(&mut cmos, REG_HOURS), 0x12);
    }

    #[test]
    fn set_bit_freezes_and_write_sets_guest_time() {
        let nanos = clock(LEAP_DAY);
        let mut cmos = cmos_at(nanos.clone(), 0);

        write(&mut cmos, REG_B, B_SET | B_24H);
        write(&mut cmos, REG_YEAR, 0x99);
        write(&mut cmos, 0x32, 0x19);
        write(&mut cmos, REG_B, B_24H);
        nanos.fetch_add(10_000_000_000, Ordering::Relaxed);

        assert_eq!(read(&mut cmos, REG_YEAR), 0x99);
        assert_eq!(read(&mut cmos, REG_SECONDS), 0x40, "time keeps running from the set value");
    }

    #[test]
    fn clock_write_while_running_adjusts_offset() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);

        write(&mut cmos, REG_MINUTES, 0x10);

        assert_eq!(read(&mut cmos, REG_MINUTES), 0x10);
        assert_eq!(read(&mut cmos, REG_HOURS), 0x13);
    }

    #[test]
    fn clock_write_garbage_does_not_panic() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);

        for reg in [0u8, 2, 4, 7, 8, 9, 0x32] {
            write(&mut cmos, reg, 0xff);
        }
        write(&mut cmos, REG_B, 0);
        let _ = read(&mut cmos, REG_HOURS);
    }

    #[test]
    fn uip_set_only_just_before_the_second() {
        let nanos = clock(LEAP_DAY);
        let mut cmos = cmos_at(nanos.clone(), 0);

        let early = read(&mut cmos, REG_A);
        nanos.fetch_add(999_900_000, Ordering::Relaxed);
        let late = read(&mut cmos, REG_A);

        assert_eq!((early, late), (A_DEFAULT, A_DEFAULT | A_UIP));
    }

    #[test]
    fn register_a_uip_is_read_only() {
        let mut cmos = cmos_at(clock(LEAP_DAY), 0);

        write(&mut cmos, REG_A, 0xa6);

        assert_eq!(read(&mut cmos, REG_A), 0x26);
    }

    #[test]
    fn register_c_reports_update_once_per_second() {
        let nanos = clock(LEAP_DAY);
        let mut cmos = cmos_at(nanos.clone(), 0);
        nanos.fetch_add(1_000_000_000, Ordering::Relaxed);

        let first = read(&mut cmos, REG_C);
        let second = read(&mut cmos, REG_C);

        assert_eq!((first, second), (C_UF, 0));
    }

    #[test]
    fn register_d_reports_valid_ram_and_is_read_only() {
        let mut cmos = cmos_at(clock(0), 0);

        write(&mut cmos, REG_D, 0);

        assert_eq!(read(&mut cmos, REG_D), D_VRT);
    }

    #[test]
    fn memory_size_512m_fills_bios_bytes() {
        let mut cmos = cmos_at(clock(0), 512 << 20);

        let base = u16::from_le_bytes([read(&mut cmos, 0x15), read(&mut cmos, 0x16)]);
        let ext = u16::from_le_bytes([read(&mut cmos, 0x17), read(&mut cmos, 0x18)]);
        let ext2 = u16::from_le_bytes([read(&mut cmos, 0x30), read(&mut cmos, 0x31)]);
        let high = u16::from_le_bytes([read(&mut cmos, 0x34), read(&mut cmos, 0x35)]);

        assert_eq!((base, ext, ext2, high), (640, 0xffff, 0xffff, (512 - 16) * 16));
    }

    #[test]
    fn memory_size_small_reports_extended_kib() {
        let mut cmos = cmos_at(clock(0), 32 << 20);

        let ext = u16::from_le_bytes([read(&mut cmos, 0x17), read(&mut cmos, 0x18)]);

        assert_eq!(ext, 31 * 1024);
    }

    #[test]
    fn memory_size_above_4g_in_64k_units() {
        let mut cmos = cmos_at(clock(0), 6 << 30);

        let above = [read(&mut cmos, 0x5b), read(&mut cmos, 0x5c), read(&mut cmos, 0x5d)];

        assert_eq!(above, [0x00, 0x80, 0x00]);
    }

    #[test]
    fn index_bit7_disables_nmi_and_selects_low_register() {
        let mut cmos = cmos_at(clock(0), 0);

        cmos.write_index(0x80 | REG_D);

        assert!(cmos.nmi_disabled());
        assert_eq!(cmos.read_data(), D_VRT);
    }

    #[test]
    fn ram_bytes_keep_written_values() {
        let mut cmos = cmos_at(clock(0), 0);

        write(&mut cmos, 0x40, 0x5a);

        assert_eq!(read(&mut cmos, 0x40), 0x5a);
    }
}
