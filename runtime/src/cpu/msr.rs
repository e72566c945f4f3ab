//! Model-specific registers kept by the vCPU (SDM Vol. 4).
//!
//! Storage only: the semantics of `rdmsr`/`wrmsr` (side effects, #GP on
//! unknown or reserved values) live in `system::msr`, shared by both engines.

pub mod index {
    pub const TSC: u32 = 0x10;
    pub const PLATFORM_ID: u32 = 0x17;
    pub const APIC_BASE: u32 = 0x1b;
    pub const FEATURE_CONTROL: u32 = 0x3a;
    pub const TSC_ADJUST: u32 = 0x3b;
    pub const SPEC_CTRL: u32 = 0x48;
    pub const PRED_CMD: u32 = 0x49;
    pub const BIOS_SIGN_ID: u32 = 0x8b;
    pub const MTRRCAP: u32 = 0xfe;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const MCG_CAP: u32 = 0x179;
    pub const MCG_STATUS: u32 = 0x17a;
    pub const MISC_ENABLE: u32 = 0x1a0;
    pub const PAT: u32 = 0x277;
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const EFER: u32 = 0xc000_0080;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SFMASK: u32 = 0xc000_0084;
    pub const FS_BASE: u32 = 0xc000_0100;
    pub const GS_BASE: u32 = 0xc000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    pub const TSC_AUX: u32 = 0xc000_0103;
    // AMD model-specific registers Linux reads or writes without a fault handler.
    pub const AMD_SYSCFG: u32 = 0xc001_0010;
    pub const AMD_HWCR: u32 = 0xc001_0015;
    pub const AMD_NB_CFG: u32 = 0xc001_001f;
    pub const AMD_OSVW_ID_LENGTH: u32 = 0xc001_0140;
    pub const AMD_OSVW_STATUS: u32 = 0xc001_0141;
    pub const AMD_LS_CFG: u32 = 0xc001_1020;
    pub const AMD_IC_CFG: u32 = 0xc001_1021;
    pub const AMD_DE_CFG: u32 = 0xc001_1029;
    pub const AMD_BU_CFG2: u32 = 0xc001_102a;
}

/// HWCR bit 24 (TscFreqSel): the TSC counts at the P0 frequency, as on every
/// CPU with an invariant TSC.
const HWCR_TSC_FREQ_SEL: u64 = 1 << 24;

/// Model-specific registers that have no effect on btvmm's virtual CPU but
/// that guests configure: reads return what was last written.
pub const INERT: [(u32, u64); 9] = [
    (index::AMD_SYSCFG, 0),
    (index::AMD_HWCR, HWCR_TSC_FREQ_SEL),
    (index::AMD_NB_CFG, 0),
    (index::AMD_OSVW_ID_LENGTH, 0),
    (index::AMD_OSVW_STATUS, 0),
    (index::AMD_LS_CFG, 0),
    (index::AMD_IC_CFG, 0),
    (index::AMD_DE_CFG, 0),
    (index::AMD_BU_CFG2, 0),
];

#[derive(Clone, Debug)]
pub struct Msrs {
    pub star: u64,
    pub lstar: u64,
    pub cstar: u64,
    pub sfmask: u64,
    pub kernel_gs_base: u64,
    pub sysenter_cs: u64,
    pub sysenter_esp: u64,
    pub sysenter_eip: u64,
    /// Guest TSC = host TSC + tsc_offset.
    pub tsc_offset: u64,
    pub tsc_aux: u64,
    pub apic_base: u64,
    pub pat: u64,
    pub misc_enable: u64,
    pub mtrr_def_type: u64,
    pub spec_ctrl: u64,
    pub mcg_status: u64,
    /// Values of the [`INERT`] registers, in the same order.
    pub inert: [u64; INERT.len()],
}

impl Default for Msrs {
    fn default() -> Self {
        Self::new()
    }
}

impl Msrs {
    /// The slot of an inert MSR.
    pub fn inert_slot(index: u32) -> Option<usize> {
        INERT.iter().position(|&(i, _)| i == index)
    }

    pub fn new() -> Self {
        Self {
            star: 0,
            lstar: 0,
            cstar: 0,
            sfmask: 0,
            kernel_gs_base: 0,
            sysenter_cs: 0,
            sysenter_esp: 0,
            sysenter_eip: 0,
            tsc_offset: 0,
            tsc_aux: 0,
            // BSP, xAPIC disabled: btvmm's PC has no local APIC.
            apic_base: 0xfee0_0000 | (1 << 8),
            pat: 0x0007_0406_0007_0406,
            // Fast strings enabled, as firmware leaves it.
            misc_enable: 1,
            mtrr_def_type: 0,
            spec_ctrl: 0,
            mcg_status: 0,
            inert: INERT.map(|(_, v)| v),
        }
    }
}
