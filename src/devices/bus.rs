//! The port-I/O bus: the x86 `in`/`out` address space of 65536 byte ports.
//!
//! Devices implement [`PortDevice`] and are registered on one or more port
//! ranges under a name. An access goes to the range holding its first port.
//! Most PC chips are 8 bits wide: for them (`PortDevice::width() == 1`) a
//! 16- or 32-bit access is split into byte accesses on consecutive ports,
//! each routed on its own, as the ISA bus does. Unclaimed ports float: reads
//! return all-ones and writes are dropped. Each device counts its accesses
//! for the `--stats` report.

use std::sync::{Arc, Mutex, MutexGuard};

/// A device on the port bus.
pub trait PortDevice: Send {
    /// Reads `size` bytes (1, 2 or 4) at `offset` from the start `base` of
    /// the range the access hit.
    fn read(&mut self, base: u16, offset: u16, size: u8) -> u32;
    /// Writes `size` bytes (1, 2 or 4) at `offset` from the start `base` of
    /// the range the access hit; `value` holds only the written bytes.
    fn write(&mut self, base: u16, offset: u16, size: u8, value: u32);
    /// The widest access the device decodes itself; wider ones are split.
    fn width(&self) -> u8 {
        1
    }
}

/// A device shared between the bus and the board that wires it.
pub type SharedDevice = Arc<Mutex<dyn PortDevice>>;

/// Locks a device, ignoring poisoning: device models keep no invariants a
/// panic elsewhere could break half-way.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Per-device access counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    pub name: &'static str,
    pub reads: u64,
    pub writes: u64,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("empty port range at {0:#x}")]
    EmptyRange(u16),
    #[error("ports {base:#x}+{len} overlap {other}")]
    Overlap { base: u16, len: u16, other: &'static str },
}

struct Range {
    base: u16,
    len: u16,
    /// Index into `Bus::devices`.
    device: usize,
}

struct Entry {
    device: SharedDevice,
    width: u8,
    stats: PortStats,
}

/// The port-I/O address space.
#[derive(Default)]
pub struct Bus {
    /// Sorted by base, never overlapping.
    ranges: Vec<Range>,
    devices: Vec<Entry>,
}

fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xff,
        2 => 0xffff,
        _ => u32::MAX,
    }
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` under `name` on ports `base..base+len`. The same
    /// name registered again (a chip on several ranges) shares one counter;
    /// pass the same `SharedDevice` for it.
    pub fn register(
        &mut self,
        name: &'static str,
        base: u16,
        len: u16,
        device: SharedDevice,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::EmptyRange(base));
        }
        let end = u32::from(base) + u32::from(len);
        if let Some(r) = self.ranges.iter().find(|r| {
            u32::from(r.base) < end && u32::from(base) < u32::from(r.base) + u32::from(r.len)
        }) {
            let other = self.devices[r.device].stats.name;
            return Err(BusError::Overlap { base, len, other });
        }
        let index = match self.devices.iter().position(|e| e.stats.name == name) {
            Some(i) => i,
            None => {
                let width = lock(&device).width();
                self.devices.push(Entry {
                    device,
                    width,
                    stats: PortStats { name, ..PortStats::default() },
                });
                self.devices.len() - 1
            }
        };
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(at, Range { base, len, device: index });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(u16, usize)> {
        let i = self.ranges.partition_point(|r| r.base <= port);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (u32::from(port) < u32::from(r.base) + u32::from(r.len)).then_some((r.base, r.device))
    }

    /// Port input. `size` other than 1 or 2 is treated as 4.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        let size = if size == 1 || size == 2 { size } else { 4 };
        let Some((base, index)) = self.find(port) else {
            return self.read_split(port, size);
        };
        let entry = &mut self.devices[index];
        if entry.width < size {
            return self.read_split(port, size);
        }
        entry.stats.reads += 1;
        lock(&entry.device).read(base, port - base, size) & all_ones(size)
    }

    fn read_split(&mut self, port: u16, size: u8) -> u32 {
        if size == 1 {
            return 0xff;
        }
        (0..u16::from(size)).fold(0u32, |acc, i| {
            acc | (self.read(port.wrapping_add(i), 1) << (8 * i))
        })
    }

    /// Port output. `size` other than 1 or 2 is treated as 4.
    pub fn write(&mut self, port: u16, size: u8, value: u32) {
        let size = if size == 1 || size == 2 { size } else { 4 };
        let value = value & all_ones(size);
        let Some((base, index)) = self.find(port) else {
            return self.write_split(port, size, value);
        };
        let entry = &mut self.devices[index];
        if entry.width < size {
            return self.write_split(port, size, value);
        }
        entry.stats.writes += 1;
        lock(&entry.device).write(base, port - base, size, value);
    }

    fn write_split(&mut self, port: u16, size: u8, value: u32) {
        if size == 1 {
            return;
        }
        for i in 0..u16::from(size) {
            self.write(port.wrapping_add(i), 1, (value >> (8 * i)) & 0xff);
        }
    }

    /// Access counts by device, in registration order.
    pub fn stats(&self) -> Vec<PortStats> {
        self.devices.iter().map(|e| e.stats.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records accesses; reads return `base + offset` in each byte.
    #[derive(Default)]
    struct Probe {
        width: u8,
        writes: Vec<(u16, u16, u8, u32)>,
    }

    impl PortDevice for Probe {
        fn read(&mut self, base: u16, offset: u16, size: u8) -> u32 {
            let b = u32::from(base.wrapping_add(offset) & 0xff);
            match size {
                1 => b,
                _ => 0xaabb_cc00 | b,
            }
        }
        fn write(&mut self, base: u16, offset: u16, size: u8, value: u32) {
            self.writes.push((base, offset, size, value));
        }
        fn width(&self) -> u8 {
            self.width
        }
    }

    fn probe(width: u8) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe { width, ..Probe::default() }))
    }

    #[test]
    fn read_unclaimed_port_returns_all_ones() {
        let mut bus = Bus::new();

        let values = [bus.read(0x1234, 1), bus.read(0x1234, 2), bus.read(0x1234, 4)];

        assert_eq!(values, [0xff, 0xffff, 0xffff_ffff]);
    }

    #[test]
    fn write_unclaimed_port_is_dropped() {
        let mut bus = Bus::new();
        let dev = probe(1);
        bus.register("probe", 0x10, 2, dev.clone()).unwrap();

        bus.write(0x20, 1, 0x55);

        assert!(lock(&dev).writes.is_empty());
        assert_eq!(bus.stats()[0].writes, 0);
    }

    #[test]
    fn write_in_range_passes_base_and_offset() {
        let mut bus = Bus::new();
        let dev = probe(1);
        bus.register("probe", 0x3f8, 8, dev.clone()).unwrap();

        bus.write(0x3fb, 1, 0x183);

        assert_eq!(lock(&dev).writes, vec![(0x3f8, 3, 1, 0x83)]);
    }

    #[test]
    fn read_wide_on_byte_device_splits_into_bytes() {
        let mut bus = Bus::new();
        bus.register("probe", 0x40, 4, probe(1)).unwrap();

        let value = bus.read(0x41, 4);

        // 0x41, 0x42, 0x43 from the device, 0x44 floats.
        assert_eq!(value, 0xff43_4241);
        assert_eq!(bus.stats()[0].reads, 3);
    }

    #[test]
    fn write_wide_on_byte_device_splits_into_bytes() {
        let mut bus = Bus::new();
        let dev = probe(1);
        bus.register("probe", 0x20, 2, dev.clone()).unwrap();

        bus.write(0x20, 2, 0x1234);

        assert_eq!(lock(&dev).writes, vec![(0x20, 0, 1, 0x34), (0x20, 1, 1, 0x12)]);
    }

    #[test]
    fn read_wide_device_gets_whole_access() {
        let mut bus = Bus::new();
        bus.register("wide", 0xf4, 4, probe(4)).unwrap();

        let value = bus.read(0xf4, 4);

        assert_eq!(value, 0xaabb_ccf4);
    }

    #[test]
    fn register_overlap_is_refused() {
        let mut bus = Bus::new();
        bus.register("a", 0x60, 1, probe(1)).unwrap();
        bus.register("a", 0x64, 1, probe(1)).unwrap();

        let result = bus.register("b", 0x5f, 2, probe(1));

        assert_eq!(result, Err(BusError::Overlap { base: 0x5f, len: 2, other: "a" }));
    }

    #[test]
    fn register_empty_range_is_refused() {
        let mut bus = Bus::new();

        let result = bus.register("a", 0x60, 0, probe(1));

        assert_eq!(result, Err(BusError::EmptyRange(0x60)));
    }

    #[test]
    fn stats_same_name_on_two_ranges_share_counter() {
        let mut bus = Bus::new();
        let dev = probe(1);
        bus.register("pic", 0x20, 2, dev.clone()).unwrap();
        bus.register("pic", 0xa0, 2, dev).unwrap();

        bus.read(0x21, 1);
        bus.write(0xa0, 1, 0);

        assert_eq!(bus.stats(), vec![PortStats { name: "pic", reads: 1, writes: 1 }]);
    }

    #[test]
    fn read_last_port_wraps_without_panic() {
        let mut bus = Bus::new();
        bus.register("top", 0xffff, 1, probe(1)).unwrap();

        let value = bus.read(0xffff, 4);

        assert_eq!(value, 0xffff_ffff);
    }
}
