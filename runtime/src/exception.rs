//! Guest exceptions as values (SDM Vol. 3A, 6.15).
//!
//! An instruction that faults returns `Err(Exception)`; the vCPU loop then
//! delivers it through the IDT (see `system::interrupt`). VMM failures are
//! never `Exception`s.

pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const MC: u8 = 18;
    pub const XM: u8 = 19;
}

/// A guest exception: vector, error code, and for #PF the faulting linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// The linear address that goes to CR2 (#PF only).
    pub address: u64,
}

impl Exception {
    pub const fn new(vector: u8) -> Self {
        Self { vector, error_code: None, address: 0 }
    }
    pub const fn with_code(vector: u8, code: u32) -> Self {
        Self { vector, error_code: Some(code), address: 0 }
    }
    pub const fn de() -> Self {
        Self::new(vector::DE)
    }
    pub const fn ud() -> Self {
        Self::new(vector::UD)
    }
    pub const fn nm() -> Self {
        Self::new(vector::NM)
    }
    pub const fn gp(code: u32) -> Self {
        Self::with_code(vector::GP, code)
    }
    pub const fn gp0() -> Self {
        Self::with_code(vector::GP, 0)
    }
    pub const fn ss(code: u32) -> Self {
        Self::with_code(vector::SS, code)
    }
    pub const fn np(code: u32) -> Self {
        Self::with_code(vector::NP, code)
    }
    pub const fn ts(code: u32) -> Self {
        Self::with_code(vector::TS, code)
    }
    pub const fn pf(address: u64, code: u32) -> Self {
        Self { vector: vector::PF, error_code: Some(code), address }
    }

    /// Benign, contributory or page fault: the classes of the double-fault rules (SDM Table 6-5).
    pub fn class(&self) -> FaultClass {
        match self.vector {
            vector::DE | vector::TS | vector::NP | vector::SS | vector::GP => FaultClass::Contributory,
            vector::PF => FaultClass::PageFault,
            vector::DF => FaultClass::DoubleFault,
            _ => FaultClass::Benign,
        }
    }

    /// Whether this exception, raised while delivering `first`, becomes a double fault.
    pub fn is_double_fault_after(&self, first: &Exception) -> bool {
        use FaultClass::*;
        matches!(
            (first.class(), self.class()),
            (Contributory, Contributory) | (PageFault, Contributory) | (PageFault, PageFault)
        )
    }

    pub fn name(&self) -> &'static str {
        const NAMES: [&str; 21] = [
            "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "#CSO", "#TS", "#NP",
            "#SS", "#GP", "#PF", "#15", "#MF", "#AC", "#MC", "#XM", "#VE",
        ];
        NAMES.get(self.vector as usize).copied().unwrap_or("#??")
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultClass {
    Benign,
    Contributory,
    PageFault,
    DoubleFault,
}

/// Selector error code (SDM 6.13): index, TI, and EXT for external events.
pub fn selector_error(selector: u16) -> u32 {
    (selector & 0xfffc) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_fault_rules_follow_sdm_table() {
        assert!(Exception::gp0().is_double_fault_after(&Exception::de()));
        assert!(Exception::pf(0, 0).is_double_fault_after(&Exception::pf(0, 0)));
        assert!(Exception::gp0().is_double_fault_after(&Exception::pf(0, 0)));
        assert!(!Exception::pf(0, 0).is_double_fault_after(&Exception::gp0()));
        assert!(!Exception::gp0().is_double_fault_after(&Exception::ud()));
    }
}
