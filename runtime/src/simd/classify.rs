//! Which instructions the SIMD executor owns, what memory they touch, and the
//! architectural checks made before running one.
//!
//! Sources: SDM Vol. 2, 2.4 "AVX and SSE Instruction Exception Specification"
//! (Table 2-18 ff., exception classes; alignment rules per class), Vol. 1, 8.6
//! "x87 FPU Exception Synchronization" (which x87 instructions wait), 11.6.6 and
//! 13.2 (CR0.EM/TS, CR4.OSFXSR/OSXSAVE, XCR0 enabling).

use std::cell::RefCell;

use iced_x86::{
    Code, CpuidFeature, EncodingKind, Instruction, InstructionInfoFactory, Mnemonic, OpAccess,
    OpKind, Register,
};

use super::state::{XCR0_AVX, XCR0_SSE};

/// How an instruction uses its memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// The caller reads guest memory into `mem` before `execute`.
    Read,
    /// The caller writes `mem` to guest memory after `execute` returned `Done`.
    Write,
    /// Both (also used for masked stores, so unselected bytes keep their value).
    ReadWrite,
}

/// The enabling rules an instruction follows (SDM Vol. 3, 2.5 and 13.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    /// x87 FPU instructions (including FWAIT).
    X87,
    /// MMX instructions, and EMMS.
    Mmx,
    /// Legacy-encoded SSE..SSE4.2, AES, PCLMULQDQ, SHA, GFNI, LDMXCSR/STMXCSR.
    Sse,
    /// VEX-encoded AVX/AVX2/FMA/F16C.
    Vex,
    /// Integer instructions CPUID files under SSE (CRC32, MOVNTI): no enabling checks.
    Integer,
}

/// The classification the executor acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Class {
    pub family: Family,
    /// Raises #MF first when an x87 exception is pending (waiting x87, MMX).
    pub waits_for_x87: bool,
}

/// CPUID features whose instructions this module owns.
fn is_simd_feature(feature: CpuidFeature) -> bool {
    use CpuidFeature as F;
    let named = matches!(
        feature,
        F::FPU | F::FPU287 | F::FPU287XL_ONLY | F::FPU387 | F::FPU387SL_ONLY | F::MMX
            | F::SSE | F::SSE2 | F::SSE3 | F::SSSE3 | F::SSE4_1 | F::SSE4_2 | F::SSE4A
            | F::AVX | F::AVX2 | F::FMA | F::FMA4 | F::F16C | F::XOP | F::AES | F::PCLMULQDQ
            | F::VAES | F::VPCLMULQDQ | F::GFNI | F::SHA | F::D3NOW | F::D3NOWEXT
            | F::CYRIX_D3NOW | F::AMX_BF16 | F::AMX_TILE | F::AMX_INT8
    );
    named || format!("{feature:?}").starts_with("AVX512")
}

/// Whether the host can run an instruction needing `feature`. Anything not listed
/// (AVX-512, XOP, FMA4, 3DNow!, AMX, model-specific x87 oddities) is refused.
fn host_has(feature: CpuidFeature) -> bool {
    use std::arch::is_x86_feature_detected as has;
    use CpuidFeature as F;
    match feature {
        F::FPU | F::FPU287 | F::FPU387 | F::CMOV | F::MMX | F::SSE | F::SSE2 => true,
        F::INTEL8086 | F::INTEL186 | F::INTEL286 | F::INTEL386 | F::INTEL486 | F::X64 => true,
        F::SSE3 => has!("sse3"),
        F::SSSE3 => has!("ssse3"),
        F::SSE4_1 => has!("sse4.1"),
        F::SSE4_2 => has!("sse4.2"),
        F::SSE4A => has!("sse4a"),
        F::AVX => has!("avx"),
        F::AVX2 => has!("avx2"),
        F::FMA => has!("fma"),
        F::F16C => has!("f16c"),
        F::AES => has!("aes"),
        F::PCLMULQDQ => has!("pclmulqdq"),
        F::VAES => has!("vaes"),
        F::VPCLMULQDQ => has!("vpclmulqdq"),
        F::GFNI => has!("gfni"),
        F::SHA => has!("sha"),
        _ => false,
    }
}

/// Instructions in SIMD CPUID families that are not data instructions: hints and
/// fences never fault on their memory operand, so the interpreter handles them.
fn is_hint_or_fence(mnemonic: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        mnemonic,
        M::Prefetchnta | M::Prefetcht0 | M::Prefetcht1 | M::Prefetcht2 | M::Prefetch
            | M::Prefetchw | M::Prefetchwt1 | M::Sfence | M::Lfence | M::Mfence | M::Pause
    )
}

/// True for every instruction the interpreter must hand to [`super::SimdExecutor`]:
/// x87, MMX, SSE*, AVX/AVX2/FMA/F16C and friends, FWAIT, LDMXCSR/STMXCSR, and the
/// EVEX/XOP/3DNow! encodings (which the executor reports as unsupported, i.e. #UD).
/// FXSAVE/FXRSTOR/XSAVE*/XRSTOR*, prefetches and fences are not included.
pub fn is_simd(insn: &Instruction) -> bool {
    if insn.code() == Code::Wait {
        return true;
    }
    if is_hint_or_fence(insn.mnemonic()) {
        return false;
    }
    matches!(insn.encoding(), EncodingKind::EVEX | EncodingKind::MVEX | EncodingKind::XOP | EncodingKind::D3NOW)
        || insn.cpuid_features().iter().any(|&f| is_simd_feature(f))
}

fn touches_mmx(insn: &Instruction) -> bool {
    (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Register && insn.op_register(i).is_mm())
}

/// x87 instructions that do not first check for pending exceptions (SDM Vol. 1, 8.3.12).
fn is_non_waiting_x87(code: Code) -> bool {
    use Code as C;
    matches!(
        code,
        C::Fninit | C::Fnclex | C::Fnstsw_AX | C::Fnstsw_m2byte | C::Fnstcw_m2byte
            | C::Fnstenv_m14byte | C::Fnstenv_m28byte | C::Fnsave_m94byte | C::Fnsave_m108byte
            | C::Fneni | C::Fndisi | C::Fnsetpm
    )
}

/// Classifies an instruction the executor can run on this host; `None` means #UD
/// (foreign encoding, feature the host lacks, LOCK prefix, VSIB addressing).
pub(super) fn classify(insn: &Instruction) -> Option<Class> {
    let vex = match insn.encoding() {
        EncodingKind::Legacy => false,
        EncodingKind::VEX => true,
        _ => return None,
    };
    if insn.has_lock_prefix() || insn.is_vsib() || !is_simd(insn) {
        return None;
    }
    let features = insn.cpuid_features();
    if !features.iter().all(|&f| host_has(f)) {
        return None;
    }
    let x87 = features.iter().any(|f| matches!(f, CpuidFeature::FPU | CpuidFeature::FPU287 | CpuidFeature::FPU387));
    let mmx = touches_mmx(insn) || matches!(insn.mnemonic(), Mnemonic::Emms);
    let family = if vex {
        Family::Vex
    } else if insn.code() == Code::Wait || (x87 && !mmx) {
        Family::X87
    } else if matches!(insn.mnemonic(), Mnemonic::Crc32 | Mnemonic::Movnti) {
        Family::Integer
    } else if features.contains(&CpuidFeature::MMX) && mmx {
        Family::Mmx
    } else {
        Family::Sse
    };
    let waits_for_x87 = mmx || (family == Family::X87 && !is_non_waiting_x87(insn.code()));
    Some(Class { family, waits_for_x87 })
}

/// The implicit `DS:rDI` operand of MASKMOVQ/MASKMOVDQU, in bytes.
pub(super) fn implicit_rdi_operand(code: Code) -> Option<usize> {
    match code {
        Code::Maskmovq_rDI_mm_mm => Some(8),
        Code::Maskmovdqu_rDI_xmm_xmm | Code::VEX_Vmaskmovdqu_rDI_xmm_xmm => Some(16),
        _ => None,
    }
}

pub(super) fn has_memory_operand(insn: &Instruction) -> bool {
    (0..insn.op_count()).any(|i| insn.op_kind(i) == OpKind::Memory)
}

/// Size and direction of the instruction's memory operand, `None` when it has none
/// (or one the executor cannot stage: VSIB gathers).
///
/// For MASKMOVQ/MASKMOVDQU the operand is implicit at `DS:rDI` (address size from the
/// instruction); it is reported `ReadWrite` so bytes the mask leaves alone are written
/// back unchanged.
pub fn memory_access(insn: &Instruction) -> Option<(usize, Access)> {
    if let Some(size) = implicit_rdi_operand(insn.code()) {
        return Some((size, Access::ReadWrite));
    }
    if !has_memory_operand(insn) || insn.is_vsib() {
        return None;
    }
    let size = insn.memory_size().size();
    if size == 0 {
        return None;
    }
    thread_local! {
        static INFO: RefCell<InstructionInfoFactory> = RefCell::new(InstructionInfoFactory::new());
    }
    let access = INFO.with(|factory| {
        let mut factory = factory.borrow_mut();
        factory.info(insn).used_memory().first().map(|m| m.access())
    })?;
    // Masked stores leave unselected elements alone: the caller must read them first.
    let masked_store = matches!(
        insn.mnemonic(),
        Mnemonic::Vmaskmovps | Mnemonic::Vmaskmovpd | Mnemonic::Vpmaskmovd | Mnemonic::Vpmaskmovq
    );
    match access {
        OpAccess::Read | OpAccess::CondRead => Some((size, Access::Read)),
        OpAccess::Write if masked_store => Some((size, Access::ReadWrite)),
        OpAccess::Write => Some((size, Access::Write)),
        OpAccess::ReadWrite | OpAccess::CondWrite | OpAccess::ReadCondWrite => Some((size, Access::ReadWrite)),
        _ => None,
    }
}

/// The alignment the memory operand must have, or #GP(0) (SDM Vol. 2, 2.4, 2.5):
/// legacy SSE 16-byte operands except the explicitly unaligned ones, and the VEX
/// aligned moves/non-temporal forms at their full width.
pub(super) fn required_alignment(insn: &Instruction) -> Option<usize> {
    use Mnemonic as M;
    if !has_memory_operand(insn) {
        return None;
    }
    let size = insn.memory_size().size();
    match insn.encoding() {
        EncodingKind::Legacy => {
            let unaligned = matches!(
                insn.mnemonic(),
                M::Movups | M::Movupd | M::Movdqu | M::Lddqu | M::Pcmpestri | M::Pcmpestri64
                    | M::Pcmpestrm | M::Pcmpestrm64 | M::Pcmpistri | M::Pcmpistrm
            );
            let x87 = insn.cpuid_features().iter().any(|f| matches!(f, CpuidFeature::FPU | CpuidFeature::FPU387));
            (size == 16 && !unaligned && !x87).then_some(16)
        }
        EncodingKind::VEX => matches!(
            insn.mnemonic(),
            M::Vmovaps | M::Vmovapd | M::Vmovdqa | M::Vmovntps | M::Vmovntpd | M::Vmovntdq | M::Vmovntdqa
        )
        .then_some(size),
        _ => None,
    }
}

/// True for LDMXCSR/STMXCSR (legacy and VEX), which must see the guest's real MXCSR.
pub(super) fn accesses_mxcsr(code: Code) -> bool {
    matches!(code, Code::Ldmxcsr_m32 | Code::VEX_Vldmxcsr_m32 | Code::Stmxcsr_m32 | Code::VEX_Vstmxcsr_m32)
}

pub(super) fn loads_mxcsr(code: Code) -> bool {
    matches!(code, Code::Ldmxcsr_m32 | Code::VEX_Vldmxcsr_m32)
}

/// Byte range of FIP/FCS/FOP/FDP/FDS in an FNSTENV/FNSAVE image, which the executor
/// clears: the host's values are host code addresses.
pub(super) fn x87_pointer_fields(code: Code) -> Option<std::ops::Range<usize>> {
    use Code as C;
    match code {
        C::Fnstenv_m14byte | C::Fstenv_m14byte | C::Fnsave_m94byte | C::Fsave_m94byte => Some(6..14),
        C::Fnstenv_m28byte | C::Fstenv_m28byte | C::Fnsave_m108byte | C::Fsave_m108byte => Some(12..28),
        _ => None,
    }
}

/// The guest control bits that decide whether SIMD instructions may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimdControl {
    pub cr0: u64,
    pub cr4: u64,
    pub xcr0: u64,
}

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXSAVE: u64 = 1 << 18;
/// #UD and #NM vectors.
const UD: u8 = 6;
const NM: u8 = 7;

/// The enabling checks that come before any other exception (SDM Vol. 3, Table 2-2
/// and 13.2; Vol. 2, 2.4.1): returns the vector (#UD 6 or #NM 7) to raise, if any.
/// The caller runs this before [`memory_access`]/`execute`, as it decides between
/// #UD and #NM before any memory fault.
pub fn check_enabled(insn: &Instruction, ctl: SimdControl) -> Result<(), u8> {
    let em = ctl.cr0 & CR0_EM != 0;
    let ts = ctl.cr0 & CR0_TS != 0;
    let Some(class) = classify(insn) else {
        return Err(UD);
    };
    match class.family {
        Family::X87 if insn.code() == Code::Wait => fail_if(ts && ctl.cr0 & CR0_MP != 0, NM),
        Family::X87 => fail_if(em || ts, NM),
        Family::Mmx => fail_if(em, UD).and(fail_if(ts, NM)),
        Family::Sse => fail_if(em || ctl.cr4 & CR4_OSFXSR == 0, UD).and(fail_if(ts, NM)),
        Family::Vex => {
            let enabled = ctl.cr4 & CR4_OSXSAVE != 0 && ctl.xcr0 & (XCR0_SSE | XCR0_AVX) == XCR0_SSE | XCR0_AVX;
            fail_if(!enabled, UD).and(fail_if(ts, NM))
        }
        Family::Integer => Ok(()),
    }
}

fn fail_if(condition: bool, vector: u8) -> Result<(), u8> {
    if condition {
        Err(vector)
    } else {
        Ok(())
    }
}

/// The 64-bit register `reg` is part of, when it is a general-purpose register.
pub(super) fn gpr64(reg: Register) -> Option<Register> {
    reg.is_gpr().then(|| reg.full_register())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
        Decoder::new(bitness, bytes, DecoderOptions::NONE).decode()
    }

    #[test]
    fn is_simd_families_routed_to_executor() {
        for bytes in [
            &[0x0f, 0x58, 0xc1][..],         // addps xmm0, xmm1
            &[0xd9, 0xc0],                   // fld st0
            &[0x0f, 0x77],                   // emms
            &[0x9b],                         // fwait
            &[0x0f, 0xae, 0x10],             // ldmxcsr [rax]
            &[0xc5, 0xfc, 0x58, 0xc1],       // vaddps ymm0, ymm0, ymm1
            &[0x62, 0xf1, 0x7c, 0x48, 0x58, 0xc1], // vaddps zmm0 (EVEX)
        ] {
            assert!(is_simd(&decode(64, bytes)), "{bytes:02x?}");
        }
    }

    #[test]
    fn is_simd_integer_system_and_hints_not_routed() {
        for bytes in [
            &[0x48, 0x01, 0xc8][..],       // add rax, rcx
            &[0x0f, 0xae, 0x00],           // fxsave [rax]
            &[0x0f, 0xae, 0x20],           // xsave [rax]
            &[0x0f, 0x18, 0x00],           // prefetchnta [rax]
            &[0x0f, 0xae, 0xf8],           // sfence
            &[0xc4, 0xe2, 0x70, 0xf2, 0xc2], // andn eax, ecx, edx (BMI1, VEX)
        ] {
            assert!(!is_simd(&decode(64, bytes)), "{bytes:02x?}");
        }
    }

    #[test]
    fn memory_access_sizes_and_directions() {
        let cases: [(&[u8], usize, Access); 6] = [
            (&[0x0f, 0x28, 0x00], 16, Access::Read),          // movaps xmm0, [rax]
            (&[0x0f, 0x29, 0x00], 16, Access::Write),         // movaps [rax], xmm0
            (&[0xdd, 0x18], 8, Access::Write),                // fstp qword [rax]
            (&[0xdd, 0x30], 108, Access::Write),              // fnsave [rax]
            (&[0x66, 0x0f, 0xf7, 0xc1], 16, Access::ReadWrite), // maskmovdqu
            (&[0xc4, 0xe2, 0x7d, 0x2f, 0x00], 32, Access::ReadWrite), // vmaskmovpd [rax], ymm0, ymm0
        ];
        for (bytes, size, access) in cases {
            let insn = decode(64, bytes);
            assert_eq!(memory_access(&insn), Some((size, access)), "{bytes:02x?}");
        }
        assert_eq!(memory_access(&decode(64, &[0x0f, 0x58, 0xc1])), None);
    }

    #[test]
    fn required_alignment_follows_encoding_rules() {
        assert_eq!(required_alignment(&decode(64, &[0x0f, 0x58, 0x00])), Some(16)); // addps m128
        assert_eq!(required_alignment(&decode(64, &[0x0f, 0x10, 0x00])), None); // movups
        assert_eq!(required_alignment(&decode(64, &[0xf3, 0x0f, 0x58, 0x00])), None); // addss m32
        assert_eq!(required_alignment(&decode(64, &[0xc5, 0xfc, 0x58, 0x00])), None); // vaddps m256
        assert_eq!(required_alignment(&decode(64, &[0xc5, 0xfc, 0x28, 0x00])), Some(32)); // vmovaps m256
    }

    #[test]
    fn check_enabled_cr_bits_select_ud_or_nm() {
        let addps = decode(64, &[0x0f, 0x58, 0xc1]);
        let fld = decode(64, &[0xd9, 0xc0]);
        let vaddps = decode(64, &[0xc5, 0xfc, 0x58, 0xc1]);
        let ok = SimdControl { cr0: 0x11, cr4: CR4_OSFXSR | CR4_OSXSAVE, xcr0: 7 };

        assert_eq!(check_enabled(&addps, ok), Ok(()));
        assert_eq!(check_enabled(&addps, SimdControl { cr4: 0, ..ok }), Err(UD));
        assert_eq!(check_enabled(&addps, SimdControl { cr0: CR0_TS, ..ok }), Err(NM));
        assert_eq!(check_enabled(&fld, SimdControl { cr0: CR0_EM, ..ok }), Err(NM));
        assert_eq!(check_enabled(&vaddps, SimdControl { xcr0: 3, ..ok }), Err(UD));
    }

    #[test]
    fn classify_lock_prefix_and_gather_refused() {
        let locked = decode(64, &[0xf0, 0x0f, 0x58, 0xc1]);
        let gather = decode(64, &[0xc4, 0xe2, 0x75, 0x90, 0x04, 0x90]); // vpgatherdd ymm0, [rax+ymm2*4], ymm1

        assert_eq!(classify(&locked), None);
        assert_eq!(classify(&gather), None);
    }

    #[test]
    fn classify_mmx_and_x87_waiting() {
        let paddb = classify(&decode(64, &[0x0f, 0xfc, 0xc1])).expect("mmx");
        let fnstsw = classify(&decode(64, &[0xdf, 0xe0])).expect("x87");

        assert_eq!(paddb, Class { family: Family::Mmx, waits_for_x87: true });
        assert_eq!(fnstsw, Class { family: Family::X87, waits_for_x87: false });
    }
}
