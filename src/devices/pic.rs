//! The 8259A programmable interrupt controller pair of the PC.
//!
//! Terms: each chip has eight request inputs IR0-7. A request latches into the
//! IRR (interrupt request register) on a rising edge (or follows the line when
//! the ELCR marks it level-triggered). The IMR masks requests. The CPU's INTA
//! cycle ("ack") moves the highest-priority unmasked request from IRR to the
//! ISR (in-service register) and returns its vector (ICW2 base + line). An EOI
//! command (OCW2) clears an ISR bit; lines of lower priority than one in
//! service wait. Priority is fixed (IR0 highest) unless rotated by OCW2.
//!
//! The master (ports 0x20/0x21) drives the CPU's INTR; the slave (0xa0/0xa1)
//! drives the master's IR2 (the cascade), so IRQs 8-15 reach the CPU through
//! IRQ2. Programming: ICW1 (port 0x20 bit 4 set) starts initialization, then
//! ICW2 (vector base), ICW3 (cascade wiring, if not single) and ICW4 (if ICW1
//! asked for it: 8086 mode, auto-EOI, special fully nested) go to port 0x21.
//! After that port 0x21 is the IMR (OCW1); port 0x20 takes OCW2 (EOI and
//! rotation) and OCW3 (read IRR/ISR select, poll, special mask mode).
//! An ack with nothing left to deliver returns the spurious vector (IR7).
//! The ELCR (ports 0x4d0/0x4d1, from the EISA/PIIX chipsets) selects edge or
//! level triggering per line; IRQ 0, 1, 2, 8 and 13 are always edge.
//!
//! This follows what Linux's arch/x86/kernel/i8259.c does: full init, masks,
//! specific EOI to slave then master, OCW3 reads of IRR/ISR to detect
//! spurious interrupts.

/// ICW1: bit 4 marks an initialization command word.
const ICW1_INIT: u8 = 0x10;
/// ICW1: ICW4 will follow.
const ICW1_IC4: u8 = 0x01;
/// ICW1: single chip, no ICW3.
const ICW1_SNGL: u8 = 0x02;
/// ICW1: level-triggered mode for all lines (MCS-80 era; PCs use the ELCR).
const ICW1_LTIM: u8 = 0x08;
/// ICW4: automatic EOI at the end of the ack.
const ICW4_AEOI: u8 = 0x02;
/// ICW4: special fully nested mode.
const ICW4_SFNM: u8 = 0x10;
/// Port 0x20 writes with bit 3 set (and bit 4 clear) are OCW3.
const OCW3_SELECT: u8 = 0x08;
/// OCW3: poll command.
const OCW3_POLL: u8 = 0x04;
/// OCW3: act on the register-read bit (RIS) below.
const OCW3_RR: u8 = 0x02;
/// OCW3: read ISR (set) or IRR (clear).
const OCW3_RIS: u8 = 0x01;
/// OCW3: act on the special-mask bit (SMM) below.
const OCW3_ESMM: u8 = 0x40;
/// OCW3: special mask mode on.
const OCW3_SMM: u8 = 0x20;
/// The master line the slave is wired to.
const CASCADE_IRQ: u8 = 2;
/// Lines the ELCR can make level-triggered (IRQ 0, 1, 2 and 8, 13 never).
const ELCR_MASK: [u8; 2] = [0xf8, 0xde];

/// Where the next write to the data port goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum InitState {
    #[default]
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A chip.
#[derive(Clone, Debug, Default)]
struct Chip {
    /// Line levels seen last, for edge detection.
    last_level: u8,
    irr: u8,
    imr: u8,
    isr: u8,
    /// Rotation: the line with the highest priority is `priority_add`.
    priority_add: u8,
    vector_base: u8,
    read_isr: bool,
    poll: bool,
    special_mask: bool,
    init: InitState,
    needs_icw4: bool,
    single: bool,
    auto_eoi: bool,
    rotate_on_auto_eoi: bool,
    special_fully_nested: bool,
    elcr: u8,
    elcr_mask: u8,
}

impl Chip {
    fn new(elcr_mask: u8) -> Self {
        Self { elcr_mask, ..Self::default() }
    }

    fn set_line(&mut self, line: u8, level: bool) {
        let mask = 1u8 << (line & 7);
        if self.elcr & mask != 0 {
            // Level-triggered: the request follows the line.
            if level {
                self.irr |= mask;
                self.last_level |= mask;
            } else {
                self.irr &= !mask;
                self.last_level &= !mask;
            }
        } else if level {
            if self.last_level & mask == 0 {
                self.irr |= mask;
            }
            self.last_level |= mask;
        } else {
            self.last_level &= !mask;
        }
    }

    /// The line of highest priority set in `bits`, taking rotation into account.
    fn highest(&self, bits: u8) -> Option<u8> {
        (0..8u8)
            .map(|p| (p + self.priority_add) & 7)
            .find(|&line| bits & (1 << line) != 0)
    }

    /// Priority rank (0 = highest) of a line.
    fn rank(&self, line: u8) -> u8 {
        line.wrapping_sub(self.priority_add) & 7
    }

    /// The line this chip would deliver now, if any.
    fn pending(&self, is_master: bool) -> Option<u8> {
        let line = self.highest(self.irr & !self.imr)?;
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode: lines in service but masked do not block.
            in_service &= !self.imr;
        }
        if self.special_fully_nested && is_master {
            // The slave arbitrates its own lines: IR2 in service does not block it.
            in_service &= !(1 << CASCADE_IRQ);
        }
        match self.highest(in_service) {
            Some(busy) if self.rank(busy) <= self.rank(line) => None,
            _ => Some(line),
        }
    }

    /// The INTA cycle on this chip for `line`.
    fn ack(&mut self, line: u8) {
        let mask = 1u8 << line;
        if self.auto_eoi {
            if self.rotate_on_auto_eoi {
                self.priority_add = (line + 1) & 7;
            }
        } else {
            self.isr |= mask;
        }
        // An edge request is consumed; a level one stays while the line is high.
        if self.elcr & mask == 0 || self.last_level & mask == 0 {
            self.irr &= !mask;
        }
    }

    fn write_command(&mut self, value: u8) {
        if value & ICW1_INIT != 0 {
            self.start_init(value);
        } else if value & OCW3_SELECT != 0 {
            if value & OCW3_POLL != 0 {
                self.poll = true;
            }
            if value & OCW3_RR != 0 {
                self.read_isr = value & OCW3_RIS != 0;
            }
            if value & OCW3_ESMM != 0 {
                self.special_mask = value & OCW3_SMM != 0;
            }
        } else {
            self.write_ocw2(value);
        }
    }

    fn start_init(&mut self, icw1: u8) {
        let elcr = self.elcr;
        let elcr_mask = self.elcr_mask;
        *self = Self { elcr, elcr_mask, ..Self::default() };
        self.needs_icw4 = icw1 & ICW1_IC4 != 0;
        self.single = icw1 & ICW1_SNGL != 0;
        if icw1 & ICW1_LTIM != 0 {
            tracing::debug!(target: "device", "pic: ICW1 level-triggered mode ignored (use ELCR)");
        }
        self.init = InitState::Icw2;
    }

    /// OCW2: bits 7-5 are R (rotate), SL (specific), EOI; bits 2-0 the line.
    fn write_ocw2(&mut self, value: u8) {
        let line = value & 7;
        match value >> 5 {
            0b000 => self.rotate_on_auto_eoi = false,
            0b100 => self.rotate_on_auto_eoi = true,
            0b001 | 0b101 => {
                // Non-specific EOI: the highest-priority line in service.
                if let Some(done) = self.highest(self.isr) {
                    self.isr &= !(1 << done);
                    if value & 0x80 != 0 {
                        self.priority_add = (done + 1) & 7;
                    }
                }
            }
            0b011 => self.isr &= !(1 << line),
            0b111 => {
                self.isr &= !(1 << line);
                self.priority_add = (line + 1) & 7;
            }
            0b110 => self.priority_add = (line + 1) & 7,
            // 0b010: no operation.
            _ => {}
        }
    }

    fn write_data(&mut self, value: u8) {
        match self.init {
            InitState::Ready => self.imr = value,
            InitState::Icw2 => {
                self.vector_base = value & 0xf8;
                self.init = if !self.single {
                    InitState::Icw3
                } else if self.needs_icw4 {
                    InitState::Icw4
                } else {
                    InitState::Ready
                };
            }
            InitState::Icw3 => {
                // The cascade wiring is fixed on a PC; nothing to record.
                self.init = if self.needs_icw4 { InitState::Icw4 } else { InitState::Ready };
            }
            InitState::Icw4 => {
                self.auto_eoi = value & ICW4_AEOI != 0;
                self.special_fully_nested = value & ICW4_SFNM != 0;
                self.init = InitState::Ready;
            }
        }
    }
}

/// The master/slave 8259A pair.
#[derive(Clone, Debug)]
pub struct Pic {
    chips: [Chip; 2],
}

impl Default for Pic {
    fn default() -> Self {
        Self::new()
    }
}

pub const MASTER_PORT: u16 = 0x20;
pub const SLAVE_PORT: u16 = 0xa0;
pub const ELCR_PORT: u16 = 0x4d0;

impl Pic {
    pub fn new() -> Self {
        Self { chips: [Chip::new(ELCR_MASK[0]), Chip::new(ELCR_MASK[1])] }
    }

    /// Drives IRQ line `irq` (0-15) to `level`. Out-of-range lines are ignored.
    pub fn set_irq_level(&mut self, irq: u8, level: bool) {
        if irq < 16 {
            self.chips[usize::from(irq >> 3)].set_line(irq & 7, level);
            self.update_cascade();
        }
    }

    pub fn raise_irq(&mut self, irq: u8) {
        self.set_irq_level(irq, true);
    }

    pub fn lower_irq(&mut self, irq: u8) {
        self.set_irq_level(irq, false);
    }

    /// A rising then falling edge: latches an edge-triggered request.
    pub fn pulse_irq(&mut self, irq: u8) {
        self.raise_irq(irq);
        self.lower_irq(irq);
    }

    /// Whether `irq`'s request is latched and not yet acknowledged.
    pub fn irq_requested(&self, irq: u8) -> bool {
        irq < 16 && self.chips[usize::from(irq >> 3)].irr & (1 << (irq & 7)) != 0
    }

    /// The slave's INT output is the master's IR2 input.
    fn update_cascade(&mut self) {
        let slave_int = self.chips[1].pending(false).is_some();
        self.chips[0].set_line(CASCADE_IRQ, slave_int);
    }

    /// Whether the master asserts INTR to the CPU.
    pub fn intr_pending(&self) -> bool {
        self.chips[0].pending(true).is_some()
    }

    /// The INTA cycle: the vector to deliver, or `None` if INTR is not asserted.
    /// A request that vanished yields the spurious IR7 vector of its chip.
    pub fn ack(&mut self) -> Option<u8> {
        if !self.intr_pending() {
            return None;
        }
        Some(self.ack_irq().1)
    }

    /// The INTA cycle proper: (irq number, vector).
    fn ack_irq(&mut self) -> (u8, u8) {
        let Some(line) = self.chips[0].pending(true) else {
            return (7, self.chips[0].vector_base | 7);
        };
        self.chips[0].ack(line);
        let result = if line == CASCADE_IRQ {
            match self.chips[1].pending(false) {
                Some(slave_line) => {
                    self.chips[1].ack(slave_line);
                    (8 + slave_line, self.chips[1].vector_base | slave_line)
                }
                None => (15, self.chips[1].vector_base | 7),
            }
        } else {
            (line, self.chips[0].vector_base | line)
        };
        self.update_cascade();
        result
    }

    /// OCW3 poll: the read is an ack returning 0x80 | line, or 0 if none.
    fn poll_read(&mut self, chip: usize) -> u8 {
        self.chips[chip].poll = false;
        if chip == 0 {
            if self.chips[0].pending(true).is_none() {
                return 0;
            }
            let (irq, _) = self.ack_irq();
            0x80 | if irq >= 8 { CASCADE_IRQ } else { irq }
        } else {
            let Some(line) = self.chips[1].pending(false) else { return 0 };
            self.chips[1].ack(line);
            self.update_cascade();
            0x80 | line
        }
    }

    /// Reads chip `chip` (0 master, 1 slave) at port offset `offset` (0 or 1).
    pub fn read_port(&mut self, chip: usize, offset: u16) -> u8 {
        let chip = chip & 1;
        if self.chips[chip].poll {
            return self.poll_read(chip);
        }
        let c = &self.chips[chip];
        match offset {
            0 if c.read_isr => c.isr,
            0 => c.irr,
            _ => c.imr,
        }
    }

    /// Writes chip `chip` (0 master, 1 slave) at port offset `offset` (0 or 1).
    pub fn write_port(&mut self, chip: usize, offset: u16, value: u8) {
        let c = &mut self.chips[chip & 1];
        match offset {
            0 => c.write_command(value),
            _ => c.write_data(value),
        }
        self.update_cascade();
    }

    pub fn read_elcr(&self, chip: usize) -> u8 {
        self.chips[chip & 1].elcr
    }

    pub fn write_elcr(&mut self, chip: usize, value: u8) {
        let c = &mut self.chips[chip & 1];
        c.elcr = value & c.elcr_mask;
        // Level-triggered requests follow their line from now on.
        c.irr = (c.irr & !c.elcr) | (c.last_level & c.elcr);
        self.update_cascade();
    }
}

impl super::bus::PortDevice for Pic {
    fn read(&mut self, base: u16, offset: u16, _size: u8) -> u32 {
        u32::from(match base {
            MASTER_PORT => self.read_port(0, offset),
            SLAVE_PORT => self.read_port(1, offset),
            _ => self.read_elcr(usize::from(offset & 1)),
        })
    }

    fn write(&mut self, base: u16, offset: u16, _size: u8, value: u32) {
        let value = value as u8;
        match base {
            MASTER_PORT => self.write_port(0, offset, value),
            SLAVE_PORT => self.write_port(1, offset, value),
            _ => self.write_elcr(usize::from(offset & 1), value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sequence Linux's init_8259A() writes: vectors 0x30 and 0x38.
    fn linux_pic() -> Pic {
        let mut pic = Pic::new();
        pic.write_port(0, 1, 0xff);
        pic.write_port(1, 1, 0xff);
        pic.write_port(0, 0, 0x11);
        pic.write_port(0, 1, 0x30);
        pic.write_port(0, 1, 1 << 2);
        pic.write_port(0, 1, 0x01);
        pic.write_port(1, 0, 0x11);
        pic.write_port(1, 1, 0x38);
        pic.write_port(1, 1, 2);
        pic.write_port(1, 1, 0x01);
        pic.write_port(0, 1, 0x00);
        pic.write_port(1, 1, 0x00);
        pic
    }

    #[test]
    fn ack_after_linux_init_returns_vector_of_line() {
        let mut pic = linux_pic();
        pic.pulse_irq(4);

        let vector = pic.ack();

        assert_eq!(vector, Some(0x34));
        assert_eq!(pic.chips[0].isr, 1 << 4);
        assert!(!pic.intr_pending());
    }

    #[test]
    fn ack_nothing_pending_returns_none() {
        let mut pic = linux_pic();

        assert_eq!(pic.ack(), None);
    }

    #[test]
    fn raise_masked_line_does_not_assert_intr() {
        let mut pic = linux_pic();
        pic.write_port(0, 1, 0x01);

        pic.pulse_irq(0);

        assert!(!pic.intr_pending());
        assert_eq!(pic.read_port(0, 0), 0x01, "IRR still latches");
    }

    #[test]
    fn raise_held_line_latches_once() {
        let mut pic = linux_pic();
        pic.raise_irq(3);
        pic.ack();
        pic.write_port(0, 0, 0x20);

        pic.raise_irq(3);

        assert!(!pic.intr_pending(), "no new edge while the line stays high");
    }

    #[test]
    fn slave_irq_cascades_through_master_irq2() {
        let mut pic = linux_pic();
        pic.pulse_irq(12);

        let vector = pic.ack();

        assert_eq!(vector, Some(0x3c));
        assert_eq!(pic.chips[0].isr, 1 << 2);
        assert_eq!(pic.chips[1].isr, 1 << 4);
    }

    #[test]
    fn specific_eoi_slave_then_master_clears_both() {
        let mut pic = linux_pic();
        pic.pulse_irq(8);
        pic.ack();

        pic.write_port(1, 0, 0x60);
        pic.write_port(0, 0, 0x62);

        assert_eq!((pic.chips[0].isr, pic.chips[1].isr), (0, 0));
    }

    #[test]
    fn priority_lower_line_waits_for_eoi() {
        let mut pic = linux_pic();
        pic.pulse_irq(1);
        assert_eq!(pic.ack(), Some(0x31));
        pic.pulse_irq(5);

        let before_eoi = pic.intr_pending();
        pic.write_port(0, 0, 0x20);
        let after_eoi = pic.ack();

        assert!(!before_eoi);
        assert_eq!(after_eoi, Some(0x35));
    }

    #[test]
    fn priority_higher_line_nests() {
        let mut pic = linux_pic();
        pic.pulse_irq(4);
        pic.ack();

        pic.pulse_irq(0);

        assert_eq!(pic.ack(), Some(0x30));
    }

    #[test]
    fn priority_two_requests_lowest_line_first() {
        let mut pic = linux_pic();
        pic.pulse_irq(6);
        pic.pulse_irq(3);

        assert_eq!(pic.ack(), Some(0x33));
    }

    #[test]
    fn ocw3_selects_isr_then_irr() {
        let mut pic = linux_pic();
        pic.write_port(0, 1, 0xff);
        pic.pulse_irq(1);
        pic.write_port(0, 1, 0x00);
        pic.ack();
        pic.pulse_irq(6);

        pic.write_port(0, 0, 0x0b);
        let isr = pic.read_port(0, 0);
        pic.write_port(0, 0, 0x0a);
        let irr = pic.read_port(0, 0);

        assert_eq!((isr, irr), (0x02, 0x40));
    }

    #[test]
    fn imr_read_returns_written_mask() {
        let mut pic = linux_pic();

        pic.write_port(1, 1, 0xa5);

        assert_eq!(pic.read_port(1, 1), 0xa5);
    }

    #[test]
    fn ack_vanished_level_request_returns_spurious_irq7() {
        let mut pic = linux_pic();
        pic.write_elcr(0, 0x20);
        pic.raise_irq(5);
        assert!(pic.intr_pending());
        pic.lower_irq(5);

        let spurious = pic.ack_irq();

        assert_eq!(spurious, (7, 0x37));
        assert_eq!(pic.chips[0].isr, 0, "spurious IRQ7 sets no ISR bit");
    }

    #[test]
    fn ack_vanished_slave_request_returns_spurious_irq15() {
        let mut pic = linux_pic();
        pic.write_elcr(1, 0x08);
        pic.raise_irq(11);
        pic.chips[1].set_line(3, false);

        let spurious = pic.ack_irq();

        assert_eq!(spurious, (15, 0x3f));
        assert_eq!(pic.chips[1].isr, 0);
        assert_eq!(pic.chips[0].isr, 1 << 2, "the master acked IR2");
    }

    #[test]
    fn level_line_reasserts_after_eoi() {
        let mut pic = linux_pic();
        pic.write_elcr(1, 0x08);
        pic.raise_irq(11);
        assert_eq!(pic.ack(), Some(0x3b));

        pic.write_port(1, 0, 0x20);
        pic.write_port(0, 0, 0x20);

        assert_eq!(pic.ack(), Some(0x3b));
    }

    #[test]
    fn elcr_level_after_latched_edge_drops_request_of_low_line() {
        let mut pic = linux_pic();
        pic.pulse_irq(5);

        pic.write_elcr(0, 0x20);

        assert!(!pic.intr_pending());
    }

    #[test]
    fn elcr_write_keeps_edge_only_lines_edge() {
        let mut pic = Pic::new();

        pic.write_elcr(0, 0xff);
        pic.write_elcr(1, 0xff);

        assert_eq!((pic.read_elcr(0), pic.read_elcr(1)), (0xf8, 0xde));
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = Pic::new();
        pic.write_port(0, 0, 0x13);
        pic.write_port(0, 1, 0x08);
        pic.write_port(0, 1, 0x03);
        pic.pulse_irq(0);

        let vector = pic.ack();

        assert_eq!(vector, Some(0x08));
        assert_eq!(pic.chips[0].isr, 0);
    }

    #[test]
    fn icw1_resets_mask_and_requests() {
        let mut pic = linux_pic();
        pic.write_port(0, 1, 0x0f);
        pic.pulse_irq(7);

        pic.write_port(0, 0, 0x11);

        assert_eq!((pic.chips[0].imr, pic.chips[0].irr), (0, 0));
        assert_eq!(pic.chips[0].init, InitState::Icw2);
    }

    #[test]
    fn rotate_on_nonspecific_eoi_makes_served_line_lowest() {
        let mut pic = linux_pic();
        pic.pulse_irq(0);
        pic.ack();
        pic.write_port(0, 0, 0xa0);
        pic.pulse_irq(0);
        pic.pulse_irq(3);

        let vector = pic.ack();

        assert_eq!(vector, Some(0x33));
    }

    #[test]
    fn poll_read_acks_highest_request() {
        let mut pic = linux_pic();
        pic.pulse_irq(5);
        pic.write_port(0, 0, 0x0c);

        let polled = pic.read_port(0, 0);

        assert_eq!(polled, 0x85);
        assert_eq!(pic.chips[0].isr, 1 << 5);
        assert_eq!(pic.read_port(0, 0), 0, "poll is one-shot; IRR now empty");
    }

    #[test]
    fn special_mask_mode_lets_lower_line_through() {
        let mut pic = linux_pic();
        pic.pulse_irq(1);
        pic.ack();
        pic.write_port(0, 1, 0x02);
        pic.write_port(0, 0, 0x68);

        pic.pulse_irq(5);

        assert_eq!(pic.ack(), Some(0x35));
    }

    #[test]
    fn set_irq_level_out_of_range_is_ignored() {
        let mut pic = linux_pic();

        pic.set_irq_level(200, true);

        assert!(!pic.intr_pending());
    }
}
