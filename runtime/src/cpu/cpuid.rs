//! The guest's CPUID: the host's, filtered (DESIGN.md, "The vCPU").
//!
//! What cannot be virtualized is hidden (VMX/SVM, MONITOR/MWAIT, x2APIC,
//! TSC-deadline, LA57, PKU, PCID/INVPCID, SMEP/SMAP, AVX-512, perfmon, the
//! local APIC itself); the hypervisor bit is set and leaf 0x4000_0000 names
//! btvmm. User-visible ISA features stay as the host has them, so guest user
//! code sees the same CPU whether interpreted, translated or run directly.

use core::arch::x86_64::__cpuid_count;

/// The result of one CPUID query.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuidResult {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

const HYPERVISOR_LEAF: u32 = 0x4000_0000;
const VENDOR: &[u8; 12] = b"btvmmbtvmmbt";

/// Bits of leaf 1 ECX kept: SSE3 PCLMUL SSSE3 FMA CX16 SSE4.1 SSE4.2 MOVBE
/// POPCNT AES XSAVE AVX F16C RDRAND (OSXSAVE is computed from CR4).
const LEAF1_ECX_KEEP: u32 = (1 << 0) | (1 << 1) | (1 << 9) | (1 << 12) | (1 << 13) | (1 << 19)
    | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 25) | (1 << 26) | (1 << 28) | (1 << 29) | (1 << 30);
/// Bits of leaf 1 EDX kept: FPU VME DE PSE TSC MSR PAE CX8 SEP PGE CMOV PAT
/// PSE36 CLFSH MMX FXSR SSE SSE2 (no APIC, MTRR, MCE/MCA, ACPI, HTT, TM).
const LEAF1_EDX_KEEP: u32 = (1 << 0) | (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5)
    | (1 << 6) | (1 << 8) | (1 << 11) | (1 << 13) | (1 << 15) | (1 << 16) | (1 << 17) | (1 << 19)
    | (1 << 23) | (1 << 24) | (1 << 25) | (1 << 26);
/// Leaf 7 EBX kept: FSGSBASE BMI1 AVX2 BMI2 ERMS ADX RDSEED CLFLUSHOPT SHA.
const LEAF7_EBX_KEEP: u32 =
    (1 << 0) | (1 << 3) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 18) | (1 << 19) | (1 << 23) | (1 << 29);
/// Leaf 7 ECX kept: VAES VPCLMULQDQ RDPID.
const LEAF7_ECX_KEEP: u32 = (1 << 9) | (1 << 10) | (1 << 22);
/// Leaf 0x8000_0001 ECX kept: LAHF/SAHF in 64-bit, ABM (LZCNT), SSE4A, MISALIGNSSE, 3DNow!Prefetch.
const EXT1_ECX_KEEP: u32 = (1 << 0) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8);
/// Leaf 0x8000_0001 EDX kept: the leaf-1 base set, plus SYSCALL NX MMXEXT FFXSR? no,
/// PDPE1GB RDTSCP LM.
const EXT1_EDX_KEEP: u32 = (LEAF1_EDX_KEEP & 0x0183_f3ff) | (1 << 11) | (1 << 20) | (1 << 22)
    | (1 << 26) | (1 << 27) | (1 << 29);

/// The XSAVE components btvmm supports: x87, SSE, AVX.
pub const XCR0_SUPPORTED: u64 = 0b111;

fn host(leaf: u32, subleaf: u32) -> CpuidResult {
    let r = __cpuid_count(leaf, subleaf);
    CpuidResult { eax: r.eax, ebx: r.ebx, ecx: r.ecx, edx: r.edx }
}

/// The guest's view of `cpuid(leaf, subleaf)`.
///
/// `osxsave` is CR4.OSXSAVE (mirrored in leaf 1 ECX bit 27), `xcr0` the guest's XCR0.
pub fn guest_cpuid(leaf: u32, subleaf: u32, osxsave: bool, xcr0: u64) -> CpuidResult {
    let max_basic = host(0, 0).eax.min(0xd);
    let max_ext = host(0x8000_0000, 0).eax.min(0x8000_0021);
    let zero = CpuidResult::default();
    match leaf {
        0 => CpuidResult { eax: max_basic, ..host(0, 0) },
        1 => {
            let h = host(1, 0);
            let mut ecx = (h.ecx & LEAF1_ECX_KEEP) | (1 << 31);
            if osxsave {
                ecx |= 1 << 27;
            }
            // One logical processor, APIC ID 0; keep CLFLUSH line size.
            let ebx = h.ebx & 0x0000_ff00;
            CpuidResult { eax: h.eax, ebx, ecx, edx: h.edx & LEAF1_EDX_KEEP }
        }
        2..=6 | 8..=0xc if leaf <= max_basic => zero,
        7 if leaf <= max_basic => {
            if subleaf != 0 {
                return zero;
            }
            let h = host(7, 0);
            CpuidResult { eax: 0, ebx: h.ebx & LEAF7_EBX_KEEP, ecx: h.ecx & LEAF7_ECX_KEEP, edx: 0 }
        }
        0xd if leaf <= max_basic => xsave_leaf(subleaf, xcr0),
        HYPERVISOR_LEAF => CpuidResult {
            eax: HYPERVISOR_LEAF,
            ebx: u32::from_le_bytes([VENDOR[0], VENDOR[1], VENDOR[2], VENDOR[3]]),
            ecx: u32::from_le_bytes([VENDOR[4], VENDOR[5], VENDOR[6], VENDOR[7]]),
            edx: u32::from_le_bytes([VENDOR[8], VENDOR[9], VENDOR[10], VENDOR[11]]),
        },
        0x8000_0000 => CpuidResult { eax: max_ext, ..host(0x8000_0000, 0) },
        0x8000_0001 if leaf <= max_ext => {
            let h = host(leaf, 0);
            CpuidResult { eax: h.eax, ebx: 0, ecx: h.ecx & EXT1_ECX_KEEP, edx: h.edx & EXT1_EDX_KEEP }
        }
        0x8000_0002..=0x8000_0006 if leaf <= max_ext => host(leaf, subleaf),
        0x8000_0007 if leaf <= max_ext => {
            // Invariant TSC only: btvmm's TSC follows the host clock.
            CpuidResult { edx: host(leaf, 0).edx & (1 << 8), ..zero }
        }
        0x8000_0021 if leaf <= max_ext => {
            // LFENCE is serialising (as on the host); a null selector load
            // clears the base (as btvmm's segment loads do); SRSO_NO: guest
            // code never drives the host's return predictor directly while
            // interpreted, and a guest could not apply the IBPB-based
            // mitigation anyway (no PRED_CMD for a user process).
            CpuidResult { eax: (host(leaf, 0).eax & (1 << 2)) | (1 << 6) | (1 << 29), ..zero }
        }
        0x8000_0008 if leaf <= max_ext => {
            // Address sizes; no core count, no extra features.
            CpuidResult { eax: host(leaf, 0).eax & 0xffff, ..zero }
        }
        _ if leaf < 0x8000_0000 && leaf > max_basic => {
            // Intel CPUs answer out-of-range leaves with the highest basic leaf.
            zero
        }
        _ => zero,
    }
}

fn xsave_leaf(subleaf: u32, xcr0: u64) -> CpuidResult {
    let h0 = host(0xd, 0);
    match subleaf {
        0 => {
            let enabled_size = xsave_size(xcr0);
            CpuidResult {
                eax: XCR0_SUPPORTED as u32 & h0.eax,
                ebx: enabled_size,
                ecx: xsave_size(XCR0_SUPPORTED & h0.eax as u64),
                edx: 0,
            }
        }
        // XSAVEOPT only; no XSAVEC/XSAVES/XFD.
        1 => CpuidResult { eax: host(0xd, 1).eax & 1, ..Default::default() },
        2 if h0.eax & 4 != 0 => {
            let h = host(0xd, 2);
            CpuidResult { eax: h.eax, ebx: h.ebx, ecx: 0, edx: 0 }
        }
        _ => CpuidResult::default(),
    }
}

/// Size of the XSAVE area for the components in `xcr0` (standard format).
pub fn xsave_size(xcr0: u64) -> u32 {
    if xcr0 & 4 != 0 {
        let h = host(0xd, 2);
        h.ebx + h.eax
    } else {
        512 + 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuid_leaf1_sets_hypervisor_and_hides_apic() {
        let r = guest_cpuid(1, 0, false, 1);
        assert_ne!(r.ecx & (1 << 31), 0);
        assert_eq!(r.edx & (1 << 9), 0);
        assert_eq!(r.ecx & (1 << 5), 0, "vmx hidden");
        assert_eq!(r.ecx & (1 << 27), 0, "osxsave follows cr4");
        assert_ne!(guest_cpuid(1, 0, true, 1).ecx & (1 << 27), 0);
    }

    /// The MMU keeps global mappings across CR3 writes (CR4.PGE): a guest
    /// is told so, and maps its kernel global. Without it an amd64 boot's
    /// 17k CR3 writes each dropped every kernel mapping from the soft TLB
    /// and every kernel entry from the IBTC.
    #[test]
    fn cpuid_reports_global_pages() {
        assert_ne!(guest_cpuid(1, 0, false, 1).edx & (1 << 13), 0, "PGE");
    }

    #[test]
    fn cpuid_hypervisor_leaf_names_btvmm() {
        let r = guest_cpuid(HYPERVISOR_LEAF, 0, false, 1);
        let mut v = Vec::new();
        for x in [r.ebx, r.ecx, r.edx] {
            v.extend_from_slice(&x.to_le_bytes());
        }
        assert_eq!(&v, VENDOR);
    }

    #[test]
    fn cpuid_extended_leaf_keeps_long_mode_and_nx() {
        let r = guest_cpuid(0x8000_0001, 0, false, 1);
        assert_ne!(r.edx & (1 << 29), 0);
        assert_ne!(r.edx & (1 << 20), 0);
        assert_eq!(r.ecx & (1 << 2), 0, "svm hidden");
    }
}
