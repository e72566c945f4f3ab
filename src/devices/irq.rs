//! Interrupt lines from devices to the PIC.
//!
//! A device model does not hold the PIC: it holds an [`IrqLine`], which records
//! edges ("pulses") and levels in atomics shared with the board. The board
//! moves them into the PIC ([`IrqLines::drain_into`]) after every device access
//! and before answering the CPU's interrupt questions. Device threads could
//! raise lines too, without taking the PIC's lock.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use super::pic::Pic;

/// The sixteen ISA interrupt lines, as seen by the devices.
#[derive(Debug, Default)]
pub struct IrqLines {
    /// Lines with a rising-then-falling edge not yet delivered to the PIC.
    pulses: AtomicU16,
    /// Lines currently held high.
    levels: AtomicU16,
    /// Levels as last delivered to the PIC.
    delivered: AtomicU16,
}

impl IrqLines {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A handle on line `irq` (0-15; others are masked to 0-15).
    pub fn line(self: &Arc<Self>, irq: u8) -> IrqLine {
        IrqLine { lines: Arc::clone(self), irq: irq & 15 }
    }

    /// Applies pending pulses and changed levels to `pic`.
    pub fn drain_into(&self, pic: &mut Pic) {
        let levels = self.levels.load(Ordering::Acquire);
        let changed = levels ^ self.delivered.swap(levels, Ordering::AcqRel);
        let pulses = self.pulses.swap(0, Ordering::AcqRel);
        for irq in 0..16u8 {
            let bit = 1u16 << irq;
            if changed & bit != 0 {
                pic.set_irq_level(irq, levels & bit != 0);
            }
            if pulses & bit != 0 && levels & bit == 0 {
                pic.pulse_irq(irq);
            }
        }
    }
}

/// One interrupt line, owned by the device that drives it.
#[derive(Clone, Debug)]
pub struct IrqLine {
    lines: Arc<IrqLines>,
    irq: u8,
}

impl IrqLine {
    /// An edge: latches a request in an edge-triggered PIC input.
    pub fn pulse(&self) {
        self.lines.pulses.fetch_or(1 << self.irq, Ordering::AcqRel);
    }

    /// Holds the line high or low.
    pub fn set_level(&self, high: bool) {
        if high {
            self.lines.levels.fetch_or(1 << self.irq, Ordering::AcqRel);
        } else {
            self.lines.levels.fetch_and(!(1 << self.irq), Ordering::AcqRel);
        }
    }

    pub fn irq(&self) -> u8 {
        self.irq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pic_at_0x20() -> Pic {
        let mut pic = Pic::new();
        for (chip, offset, value) in [(0, 0, 0x11), (0, 1, 0x20), (0, 1, 4), (0, 1, 1)] {
            pic.write_port(chip, offset, value);
        }
        pic
    }

    #[test]
    fn drain_pulse_latches_request_once() {
        let lines = IrqLines::new();
        let mut pic = pic_at_0x20();
        lines.line(4).pulse();

        lines.drain_into(&mut pic);
        let first = pic.ack();
        lines.drain_into(&mut pic);

        assert_eq!(first, Some(0x24));
        assert!(!pic.irq_requested(4));
    }

    #[test]
    fn drain_level_change_reaches_pic() {
        let lines = IrqLines::new();
        let mut pic = pic_at_0x20();
        let line = lines.line(3);

        line.set_level(true);
        lines.drain_into(&mut pic);
        let raised = pic.irq_requested(3);
        line.set_level(false);
        lines.drain_into(&mut pic);

        assert!(raised);
        assert_eq!(pic.ack(), Some(0x23), "the edge stays latched");
    }

    #[test]
    fn line_number_is_masked_to_sixteen() {
        let lines = IrqLines::new();

        assert_eq!(lines.line(20).irq(), 4);
    }
}
