//! The guest's x87/SSE/AVX state, kept as an XSAVE area in standard (non-compacted)
//! format (SDM Vol. 1, 13.4 "XSAVE Area"): the 512-byte legacy region (the FXSAVE
//! image), the 64-byte XSAVE header, then the AVX component (YMM upper halves) at
//! the offset the host reports in CPUID leaf 0xD sub-leaf 2.
//!
//! The area is always left *normalised* after the executor runs: every component the
//! guest enabled in XCR0 is written in full and has its XSTATE_BV bit set, and the
//! x87 instruction/data pointers (FOP, FIP, FDP) read as zero so no host code
//! address ever reaches the guest.
//!
//! # Safety
//! The only unsafe code reads host facts once: `xgetbv` (after checking
//! CPUID.OSXSAVE) and one `fxsave64` into a local aligned buffer.

use std::arch::x86_64::__cpuid_count;
use std::fmt;
use std::sync::OnceLock;

/// Bytes reserved for the area: the legacy region, the header and the AVX component
/// (576 + 256 on every host that has AVX) fit with room to spare.
pub const XSAVE_AREA_BYTES: usize = 1024;
/// XCR0 bits of the components btvmm virtualises.
pub const XCR0_X87: u64 = 1 << 0;
pub const XCR0_SSE: u64 = 1 << 1;
pub const XCR0_AVX: u64 = 1 << 2;

pub(super) const OFF_FCW: usize = 0;
pub(super) const OFF_FSW: usize = 2;
#[allow(dead_code)]
pub(super) const OFF_FTW: usize = 4;
pub(super) const OFF_FOP: usize = 6;
pub(super) const OFF_FDP_END: usize = 24;
pub(super) const OFF_MXCSR: usize = 24;
pub(super) const OFF_MXCSR_MASK: usize = 28;
pub(super) const OFF_ST0: usize = 32;
pub(super) const OFF_XMM0: usize = 160;
const OFF_XMM_END: usize = 416;
pub(super) const OFF_XSTATE_BV: usize = 512;
const OFF_HEADER_END: usize = 576;

pub(super) const FCW_INIT: u16 = 0x037f;
pub(super) const MXCSR_INIT: u32 = 0x1f80;
/// MXCSR's exception masks (IM DM ZM OM UM PM).
pub(super) const MXCSR_MASKS: u32 = 0x1f80;
/// The x87 control word's exception masks (IM DM ZM OM UM PM), at the bits
/// of the status word's exception flags.
const FCW_MASKS: u16 = 0x3f;
/// MXCSR_MASK to assume when FXSAVE reports 0 (SDM 11.6.6: all bits but DAZ).
const MXCSR_MASK_DEFAULT: u32 = 0xffbf;

/// Facts about the host's XSAVE support, read once.
#[derive(Debug)]
pub(super) struct HostXsave {
    /// XCR0 bits among x87|SSE|AVX that both CPUID and the host OS enable.
    pub supported_xcr0: u64,
    pub avx_offset: usize,
    pub avx_size: usize,
    pub mxcsr_mask: u32,
}

impl HostXsave {
    /// `None` when the host cannot run the executor (no XSAVE enabled by the OS).
    pub(super) fn get() -> Option<&'static HostXsave> {
        static HOST: OnceLock<Option<HostXsave>> = OnceLock::new();
        HOST.get_or_init(HostXsave::probe).as_ref()
    }

    fn probe() -> Option<HostXsave> {
        let leaf1 = __cpuid_count(1, 0);
        let osxsave = leaf1.ecx & (1 << 27) != 0;
        let fxsr = leaf1.edx & (1 << 24) != 0;
        if !osxsave || !fxsr || __cpuid_count(0, 0).eax < 0xd {
            return None;
        }
        let host_xcr0 = read_xcr0();
        let cpuid_xcr0 = u64::from(__cpuid_count(0xd, 0).eax);
        let mut supported_xcr0 = host_xcr0 & cpuid_xcr0 & (XCR0_X87 | XCR0_SSE | XCR0_AVX);
        let avx = __cpuid_count(0xd, 2);
        let (avx_offset, avx_size) = (avx.ebx as usize, avx.eax as usize);
        let avx_fits = avx_offset >= OFF_HEADER_END && avx_offset + avx_size <= XSAVE_AREA_BYTES;
        if !avx_fits || !std::arch::is_x86_feature_detected!("avx") {
            supported_xcr0 &= !XCR0_AVX;
        }
        if supported_xcr0 & (XCR0_X87 | XCR0_SSE) != XCR0_X87 | XCR0_SSE {
            return None;
        }
        Some(HostXsave { supported_xcr0, avx_offset, avx_size, mxcsr_mask: host_mxcsr_mask() })
    }

    /// Size of a standard-format area holding the components in `xcr0`.
    pub(super) fn area_size(&self, xcr0: u64) -> usize {
        if xcr0 & XCR0_AVX != 0 {
            self.avx_offset + self.avx_size
        } else {
            OFF_HEADER_END
        }
    }
}

fn read_xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called after CPUID reported OSXSAVE, so `xgetbv` with ECX=0 is
    // permitted at CPL3; it reads a register and touches no memory.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

fn host_mxcsr_mask() -> u32 {
    let mut image = XsaveArea::zeroed();
    // SAFETY: `image` is 64-byte aligned and at least 512 bytes, as `fxsave64`
    // requires (FXSR was checked by the caller); it writes only those 512 bytes.
    unsafe {
        std::arch::asm!("fxsave64 [{}]", in(reg) image.0.as_mut_ptr(), options(nostack, preserves_flags));
    }
    match read_u32(&image.0, OFF_MXCSR_MASK) {
        0 => MXCSR_MASK_DEFAULT,
        mask => mask,
    }
}

/// The raw, 64-byte aligned buffer XSAVE/XRSTOR operate on.
#[repr(C, align(64))]
#[derive(Clone)]
pub(super) struct XsaveArea(pub [u8; XSAVE_AREA_BYTES]);

impl XsaveArea {
    pub(super) fn zeroed() -> Self {
        XsaveArea([0; XSAVE_AREA_BYTES])
    }
}

/// Why an XCR0 value was refused (the caller's `xsetbv` raises #GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("XCR0 value {0:#x} is not supported")]
pub struct InvalidXcr0(pub u64);

/// The guest's FPU/MMX/SSE/AVX registers.
#[derive(Clone)]
pub struct FpuState {
    area: Box<XsaveArea>,
    xcr0: u64,
}

impl Default for FpuState {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for FpuState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FpuState")
            .field("xcr0", &self.xcr0)
            .field("fcw", &self.fcw())
            .field("fsw", &self.fsw())
            .field("mxcsr", &self.mxcsr())
            .finish_non_exhaustive()
    }
}

impl FpuState {
    /// State after power-on/RESET: FNINIT values, MXCSR 0x1f80, all registers zero,
    /// XCR0 = x87|SSE.
    pub fn new() -> Self {
        let mut state = FpuState { area: Box::new(XsaveArea::zeroed()), xcr0: XCR0_X87 | XCR0_SSE };
        state.reset();
        state
    }

    /// Puts the registers back to the power-on state (INIT/RESET); XCR0 is kept.
    pub fn reset(&mut self) {
        self.area.0.fill(0);
        write_u16(&mut self.area.0, OFF_FCW, FCW_INIT);
        write_u32(&mut self.area.0, OFF_MXCSR, MXCSR_INIT);
        write_u32(&mut self.area.0, OFF_MXCSR_MASK, Self::mxcsr_mask());
        self.set_xstate_bv(self.xcr0);
    }

    /// XCR0 bits the guest may set (x87|SSE, plus AVX when the host has it).
    pub fn supported_xcr0() -> u64 {
        HostXsave::get().map_or(XCR0_X87 | XCR0_SSE, |h| h.supported_xcr0)
    }

    /// MXCSR bits that may be set; writing others is #GP (ldmxcsr, fxrstor, xrstor).
    pub fn mxcsr_mask() -> u32 {
        HostXsave::get().map_or(MXCSR_MASK_DEFAULT, |h| h.mxcsr_mask)
    }

    pub fn xcr0(&self) -> u64 {
        self.xcr0
    }

    /// For the caller's `xsetbv`: refuses values real hardware refuses with #GP
    /// (bit 0 clear, AVX without SSE, unsupported bits).
    pub fn set_xcr0(&mut self, xcr0: u64) -> Result<(), InvalidXcr0> {
        let avx_without_sse = xcr0 & XCR0_AVX != 0 && xcr0 & XCR0_SSE == 0;
        if xcr0 & XCR0_X87 == 0 || avx_without_sse || xcr0 & !Self::supported_xcr0() != 0 {
            return Err(InvalidXcr0(xcr0));
        }
        let newly_enabled = xcr0 & !self.xcr0;
        if newly_enabled & XCR0_AVX != 0 {
            if let Some(host) = HostXsave::get() {
                self.area.0[host.avx_offset..host.avx_offset + host.avx_size].fill(0);
            }
        }
        self.xcr0 = xcr0;
        self.set_xstate_bv(self.xstate_bv() | xcr0);
        Ok(())
    }

    /// Size of the standard-format XSAVE area for the current XCR0
    /// (what CPUID.(EAX=0xD,ECX=0).EBX reports to the guest).
    pub fn xsave_size(&self) -> usize {
        HostXsave::get().map_or(OFF_HEADER_END, |h| h.area_size(self.xcr0))
    }

    /// The area itself, for translated code that loads the legacy region
    /// into the host with `fxrstor64` and stores it back with `fxsave64`
    /// (64-byte aligned; the area stays normalised, since such code runs
    /// only SSE instructions that leave the x87 pointers and MXCSR alone).
    pub fn area_ptr(&mut self) -> *mut u8 {
        self.area.0.as_mut_ptr()
    }

    /// The components translated code loads with `xrstor64` and saves
    /// with `xsave64`: those in XCR0, and x87 and SSE state always (legacy
    /// SSE needs only CR4.OSFXSR, even where XCR0 holds x87 state alone),
    /// which the area holds and its header marks present for the load.
    pub fn ccf_components(&mut self) -> u64 {
        let bv = self.xstate_bv();
        self.set_xstate_bv(bv | XCR0_X87 | XCR0_SSE);
        self.host_components()
    }

    /// The components the host loads and saves for the guest: those in
    /// XCR0, and x87 and SSE state always.
    pub(super) fn host_components(&self) -> u64 {
        self.xcr0 | XCR0_X87 | XCR0_SSE
    }

    /// After translated code saved the state it loaded with `xsave64` (of
    /// `ccf_components`): writes those the host left out, as in their
    /// initial configuration, and marks them present (see
    /// `normalize_after_save`), and clears the x87 instruction and data
    /// pointers the host's x87 instructions left.
    pub fn normalize_after_ccf(&mut self) {
        let Some(host) = HostXsave::get() else { return };
        let components = self.host_components();
        if self.xstate_bv() & components != components {
            normalize_after_save(&mut self.area, components, host);
        }
        // x87 instructions leave host addresses as the last instruction's
        // and operand's.
        self.area.0[OFF_FOP..OFF_FDP_END].fill(0);
    }

    /// The standard-format XSAVE image, `xsave_size()` bytes. Every component
    /// enabled in XCR0 is present and marked in XSTATE_BV.
    pub fn area(&self) -> &[u8] {
        &self.area.0[..self.xsave_size()]
    }

    /// Writable image for the caller's `xrstor`/`fxrstor`. The caller validates
    /// what it loads (MXCSR against `mxcsr_mask()`, header rules) and raises #GP
    /// itself; the executor additionally sanitises the area before every use so an
    /// invalid image can never fault the host.
    pub fn area_mut(&mut self) -> &mut [u8] {
        let size = self.xsave_size();
        &mut self.area.0[..size]
    }

    /// The FXSAVE image (legacy region). FIP/FDP/FCS/FDS are zero, so the 32-bit
    /// and 64-bit FXSAVE layouts coincide.
    pub fn legacy_region(&self) -> &[u8; 512] {
        self.area.0[..512].try_into().expect("slice of 512 bytes")
    }

    pub fn legacy_region_mut(&mut self) -> &mut [u8; 512] {
        (&mut self.area.0[..512]).try_into().expect("slice of 512 bytes")
    }

    pub fn fcw(&self) -> u16 {
        read_u16(&self.area.0, OFF_FCW)
    }

    pub fn fsw(&self) -> u16 {
        read_u16(&self.area.0, OFF_FSW)
    }

    pub fn mxcsr(&self) -> u32 {
        read_u32(&self.area.0, OFF_MXCSR)
    }

    /// Sets MXCSR; bits outside `mxcsr_mask()` are dropped.
    pub fn set_mxcsr(&mut self, mxcsr: u32) {
        write_u32(&mut self.area.0, OFF_MXCSR, mxcsr & Self::mxcsr_mask());
    }

    /// XMM register `index` (0..16) as a little-endian u128.
    pub fn xmm(&self, index: usize) -> u128 {
        let off = OFF_XMM0 + 16 * (index & 15);
        u128::from_le_bytes(self.area.0[off..off + 16].try_into().expect("16 bytes"))
    }

    /// Upper 128 bits of YMM register `index`, zero when AVX is not enabled.
    pub fn ymm_high(&self, index: usize) -> u128 {
        match HostXsave::get() {
            Some(host) if self.xcr0 & XCR0_AVX != 0 => {
                let off = host.avx_offset + 16 * (index & 15);
                u128::from_le_bytes(self.area.0[off..off + 16].try_into().expect("16 bytes"))
            }
            _ => 0,
        }
    }

    /// Every SIMD floating-point exception is masked in MXCSR: no SSE or
    /// AVX arithmetic can raise #XM.
    pub fn simd_exceptions_masked(&self) -> bool {
        self.mxcsr() & MXCSR_MASKS == MXCSR_MASKS
    }

    /// Every x87 exception is masked in the control word and none is
    /// pending: no x87 instruction can raise #MF.
    pub fn x87_exceptions_masked(&self) -> bool {
        self.fcw() & FCW_MASKS == FCW_MASKS && !self.x87_exception_pending()
    }

    /// True when a waiting x87 instruction (or an MMX one) must raise #MF: the
    /// exception summary bit is set, or a flagged exception is unmasked (which
    /// hardware turns into ES when FLDCW/FRSTOR/FXRSTOR load such a state).
    pub fn x87_exception_pending(&self) -> bool {
        let fsw = self.fsw();
        let unmasked = fsw & !self.fcw() & FCW_MASKS;
        fsw & 0x80 != 0 || unmasked != 0
    }

    pub(super) fn raw(&self) -> &XsaveArea {
        &self.area
    }

    pub(super) fn raw_mut(&mut self) -> &mut XsaveArea {
        &mut self.area
    }

    fn xstate_bv(&self) -> u64 {
        read_u64(&self.area.0, OFF_XSTATE_BV)
    }

    fn set_xstate_bv(&mut self, bv: u64) {
        write_u64(&mut self.area.0, OFF_XSTATE_BV, bv);
    }

    /// Makes the image safe for the host's `xrstor64`: reserved MXCSR bits, XSTATE_BV
    /// bits outside the components the host moves (`host_components`) and non-zero
    /// header reserved bytes would all be #GP.
    pub(super) fn sanitize(&mut self) {
        let mxcsr = self.mxcsr();
        self.set_mxcsr(mxcsr);
        let bv = self.xstate_bv() & self.host_components();
        self.area.0[OFF_XSTATE_BV..OFF_HEADER_END].fill(0);
        self.set_xstate_bv(bv);
    }
}

/// After a host `xsave64` with requested-feature bitmap `rfbm` into `area`: writes the
/// init values of components the host reported as in their initial configuration,
/// marks all of `rfbm` present, and clears FOP/FIP/FDP (host addresses).
pub(super) fn normalize_after_save(area: &mut XsaveArea, rfbm: u64, host: &HostXsave) {
    let bytes = &mut area.0;
    let bv = read_u64(bytes, OFF_XSTATE_BV);
    let absent = rfbm & !bv;
    if absent & XCR0_X87 != 0 {
        bytes[OFF_FCW..OFF_MXCSR].fill(0);
        write_u16(bytes, OFF_FCW, FCW_INIT);
        bytes[OFF_ST0..OFF_XMM0].fill(0);
    }
    if absent & XCR0_SSE != 0 {
        bytes[OFF_XMM0..OFF_XMM_END].fill(0);
    }
    if absent & XCR0_AVX != 0 {
        bytes[host.avx_offset..host.avx_offset + host.avx_size].fill(0);
    }
    write_u64(bytes, OFF_XSTATE_BV, bv | rfbm);
    bytes[OFF_FOP..OFF_FDP_END].fill(0);
}

pub(super) fn read_u16(bytes: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([bytes[off], bytes[off + 1]])
}

pub(super) fn read_u32(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().expect("4 bytes"))
}

fn read_u64(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().expect("8 bytes"))
}

fn write_u16(bytes: &mut [u8], off: usize, value: u16) {
    bytes[off..off + 2].copy_from_slice(&value.to_le_bytes());
}

pub(super) fn write_u32(bytes: &mut [u8], off: usize, value: u32) {
    bytes[off..off + 4].copy_from_slice(&value.to_le_bytes());
}

fn write_u64(bytes: &mut [u8], off: usize, value: u64) {
    bytes[off..off + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_state_new_has_fninit_values() {
        let fpu = FpuState::new();

        assert_eq!(fpu.fcw(), 0x37f);
        assert_eq!(fpu.fsw(), 0);
        assert_eq!(fpu.mxcsr(), 0x1f80);
        assert_eq!(fpu.xcr0(), XCR0_X87 | XCR0_SSE);
        assert_eq!(fpu.area().len(), 576);
        assert_eq!(fpu.raw() as *const XsaveArea as usize % 64, 0);
    }

    #[test]
    fn set_xcr0_invalid_values_rejected() {
        let mut fpu = FpuState::new();

        assert_eq!(fpu.set_xcr0(XCR0_SSE), Err(InvalidXcr0(XCR0_SSE)));
        assert!(fpu.set_xcr0(XCR0_X87 | XCR0_AVX).is_err());
        assert!(fpu.set_xcr0(XCR0_X87 | XCR0_SSE | (1 << 5)).is_err());
        assert!(fpu.set_xcr0(XCR0_X87).is_ok());
    }

    #[test]
    fn set_xcr0_avx_grows_area_when_host_has_avx() {
        let mut fpu = FpuState::new();
        if FpuState::supported_xcr0() & XCR0_AVX == 0 {
            return;
        }

        fpu.set_xcr0(XCR0_X87 | XCR0_SSE | XCR0_AVX).expect("host supports AVX");

        assert_eq!(fpu.xsave_size(), 832);
        assert_eq!(read_u64(fpu.area(), OFF_XSTATE_BV), 7);
    }

    #[test]
    fn sanitize_reserved_mxcsr_and_header_cleared() {
        let mut fpu = FpuState::new();
        write_u32(fpu.area_mut(), OFF_MXCSR, 0xffff_ffff);
        fpu.area_mut()[520] = 1;

        fpu.sanitize();

        assert_eq!(fpu.mxcsr(), FpuState::mxcsr_mask());
        assert_eq!(fpu.area()[520], 0);
    }

    #[test]
    fn x87_exception_pending_unmasked_flag_detected() {
        let mut fpu = FpuState::new();
        assert!(!fpu.x87_exception_pending());

        write_u16(fpu.area_mut(), OFF_FSW, 0x0004); // ZE flagged
        write_u16(fpu.area_mut(), OFF_FCW, 0x037b); // ZM clear

        assert!(fpu.x87_exception_pending());
    }
}
