//! Guest exceptions, refused instructions, re-encoding of other guest modes, and
//! host state preservation.

use super::{compare, compare_with, decode, host_control_words, native, run_executor, Setup, Start};
use crate::simd::{FpuState, SimdExecutor, SimdOutcome, SimdStats};

const MXCSR_ZM: u32 = 1 << 9;
const MXCSR_PM: u32 = 1 << 12;
const MXCSR_ZE: u32 = 1 << 2;
const MXCSR_PE: u32 = 1 << 5;
const FSW_ZE: u16 = 1 << 2;
const FSW_ES: u16 = 1 << 7;

fn executor() -> SimdExecutor {
    SimdExecutor::new().expect("executor")
}

fn exec_bytes(exec: &mut SimdExecutor, start: &mut Start, bytes: &[u8], guest_addr: u64) -> SimdOutcome {
    let insn = decode(64, bytes);
    let len = crate::simd::memory_access(&insn).map_or(0, |m| m.0);
    let mut mem = start.buf.0[..len].to_vec();
    let outcome = exec.execute(&insn, &mut start.gpr, &mut start.rflags, &mut start.fpu, &mut mem, guest_addr);
    start.buf.0[..len].copy_from_slice(&mem);
    outcome
}

fn set_xmm(fpu: &mut FpuState, index: usize, value: u128) {
    let off = 160 + 16 * index;
    fpu.area_mut()[off..off + 16].copy_from_slice(&value.to_le_bytes());
}

fn f32x4(x: f32) -> u128 {
    let lane = u128::from(x.to_bits());
    lane | lane << 32 | lane << 64 | lane << 96
}

#[test]
fn divps_unmasked_zero_divide_raises_xm_and_keeps_destination() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    set_xmm(&mut start.fpu, 0, f32x4(1.0));
    set_xmm(&mut start.fpu, 1, 0);
    start.fpu.set_mxcsr(0x1f80 & !MXCSR_ZM);

    let outcome = exec_bytes(&mut exec, &mut start, &[0x0f, 0x5e, 0xc1], 0); // divps xmm0, xmm1

    assert_eq!(outcome, SimdOutcome::Exception(19));
    assert_eq!(start.fpu.xmm(0), f32x4(1.0));
    assert_eq!(start.fpu.mxcsr(), (0x1f80 & !MXCSR_ZM) | MXCSR_ZE);
}

#[test]
fn addss_unmasked_precision_raises_xm_with_pe_flag() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    set_xmm(&mut start.fpu, 0, f32x4(1.0));
    set_xmm(&mut start.fpu, 1, f32x4(1e-10));
    start.fpu.set_mxcsr(0x1f80 & !MXCSR_PM);

    let outcome = exec_bytes(&mut exec, &mut start, &[0xf3, 0x0f, 0x58, 0xc1], 0); // addss xmm0, xmm1

    assert_eq!(outcome, SimdOutcome::Exception(19));
    assert_eq!(start.fpu.xmm(0), f32x4(1.0));
    assert_eq!(start.fpu.mxcsr() & 0x3f, MXCSR_PE);
}

#[test]
fn divps_masked_zero_divide_sets_flag_and_result() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    set_xmm(&mut start.fpu, 0, f32x4(1.0));
    set_xmm(&mut start.fpu, 1, 0);

    let outcome = exec_bytes(&mut exec, &mut start, &[0x0f, 0x5e, 0xc1], 0);

    assert_eq!(outcome, SimdOutcome::Done);
    assert_eq!(start.fpu.xmm(0), f32x4(f32::INFINITY));
    assert_eq!(start.fpu.mxcsr(), 0x1f80 | MXCSR_ZE);
}

#[test]
fn ldmxcsr_unmasked_stale_flags_raise_nothing_later() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    start.buf.0[..4].copy_from_slice(&(0x1f80u32 & !MXCSR_ZM | MXCSR_ZE).to_le_bytes());

    let load = exec_bytes(&mut exec, &mut start, &[0x0f, 0xae, 0x16], 0x1000); // ldmxcsr [rsi]
    let add = exec_bytes(&mut exec, &mut start, &[0x0f, 0x54, 0xc1], 0); // andps xmm0, xmm1

    assert_eq!((load, add), (SimdOutcome::Done, SimdOutcome::Done));
    assert_eq!(start.fpu.mxcsr(), 0x1f80 & !MXCSR_ZM | MXCSR_ZE);
}

#[test]
fn ldmxcsr_reserved_bits_raise_gp() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    start.buf.0[..4].copy_from_slice(&0xffff_ffffu32.to_le_bytes());

    let outcome = exec_bytes(&mut exec, &mut start, &[0x0f, 0xae, 0x16], 0x1000);

    assert_eq!(outcome, SimdOutcome::Exception(13));
    assert_eq!(start.fpu.mxcsr(), 0x1f80);
}

#[test]
fn misaligned_operands_raise_gp_only_where_required() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    let avx = FpuState::supported_xcr0() & crate::simd::XCR0_AVX != 0;
    let cases: &[(&[u8], u64, SimdOutcome)] = &[
        (&[0x0f, 0x28, 0x06], 0x1008, SimdOutcome::Exception(13)), // movaps xmm0, [rsi]
        (&[0x0f, 0x28, 0x06], 0x1010, SimdOutcome::Done),
        (&[0x0f, 0x10, 0x06], 0x1008, SimdOutcome::Done), // movups
        (&[0x0f, 0x58, 0x06], 0x1001, SimdOutcome::Exception(13)), // addps xmm0, [rsi]
        (&[0xf3, 0x0f, 0x58, 0x06], 0x1001, SimdOutcome::Done), // addss
        (&[0x66, 0x0f, 0x38, 0x2a, 0x06], 0x1004, SimdOutcome::Exception(13)), // movntdqa
        (&[0xc5, 0xfc, 0x28, 0x06], 0x1010, SimdOutcome::Exception(13)), // vmovaps ymm0, [rsi]
        (&[0xc5, 0xfc, 0x58, 0x06], 0x1004, SimdOutcome::Done), // vaddps ymm0, ymm0, [rsi]
    ];

    for &(bytes, addr, expected) in cases {
        if bytes[0] == 0xc5 && !avx {
            continue;
        }
        assert_eq!(exec_bytes(&mut exec, &mut start, bytes, addr), expected, "{bytes:02x?} at {addr:#x}");
    }
}

#[test]
fn x87_unmasked_zero_divide_matches_native() {
    let mut exec = executor();
    let setup = Setup { fcw: 0x037b, x87: vec![1.0, 0.0, 3.0], ..Setup::seeded(1) };

    compare(&mut exec, &native!("fdiv st, st(1)"), &setup).unwrap();
    compare(&mut exec, &native!("fdivr st(1), st"), &setup).unwrap();
}

#[test]
fn x87_unmasked_overflow_matches_native() {
    let mut exec = executor();
    let setup = Setup { fcw: 0x0377, x87: vec![1.0, 20000.0], ..Setup::seeded(1) };

    compare(&mut exec, &native!("fscale"), &setup).unwrap();
}

#[test]
fn x87_pending_exception_raises_mf_at_next_waiting_instruction() {
    let mut exec = executor();
    let mut start = Start::new(&Setup { fcw: 0x037b, x87: vec![1.0, 0.0], ..Setup::seeded(1) });

    let fdiv = exec_bytes(&mut exec, &mut start, &[0xd8, 0xf1], 0); // fdiv st, st(1)
    let fsw_after = start.fpu.fsw();
    let fadd = exec_bytes(&mut exec, &mut start, &[0xd8, 0xc1], 0); // fadd st, st(1)
    let emms = exec_bytes(&mut exec, &mut start, &[0x0f, 0x77], 0);
    let addps = exec_bytes(&mut exec, &mut start, &[0x0f, 0x58, 0xc1], 0);
    let fnstsw = exec_bytes(&mut exec, &mut start, &[0xdf, 0xe0], 0); // fnstsw ax
    let fnclex = exec_bytes(&mut exec, &mut start, &[0xdb, 0xe2], 0);
    let fadd_again = exec_bytes(&mut exec, &mut start, &[0xd8, 0xc1], 0);

    assert_eq!(fdiv, SimdOutcome::Done);
    assert_eq!(fsw_after & (FSW_ZE | FSW_ES), FSW_ZE | FSW_ES);
    assert_eq!((fadd, emms), (SimdOutcome::Exception(16), SimdOutcome::Exception(16)));
    assert_eq!((addps, fnstsw, fnclex, fadd_again), (SimdOutcome::Done, SimdOutcome::Done, SimdOutcome::Done, SimdOutcome::Done));
    assert_eq!(start.gpr[0] as u16, fsw_after);
}

#[test]
fn guest_32bit_encodings_reencoded_for_host() {
    let mut exec = executor();
    let setup = Setup::seeded(4);
    let movd = decode(32, &[0x66, 0x0f, 0x6e, 0x44, 0x8b, 0x04]); // movd xmm0, [ebx+ecx*4+4]
    let cvt = decode(32, &[0xf2, 0x0f, 0x2a, 0xc8]); // cvtsi2sd xmm1, eax
    let fnstenv = decode(16, &[0xd9, 0x36, 0x00, 0x10]); // fnstenv [0x1000] (14-byte format)

    compare_with(&mut exec, &movd, &native!("movd xmm0, dword ptr [rsi]"), &setup).unwrap();
    compare_with(&mut exec, &cvt, &native!("cvtsi2sd xmm1, eax"), &setup).unwrap();
    compare_with(&mut exec, &fnstenv, &native!("data16 fnstenv [rsi]"), &setup).unwrap();
}

#[test]
fn rip_relative_and_indexed_operands_use_staged_bytes() {
    let mut exec = executor();
    let setup = Setup::seeded(5);
    let riprel = decode(64, &[0xf2, 0x0f, 0x10, 0x05, 0x00, 0x01, 0x00, 0x00]); // movsd xmm0, [rip+0x100]
    let indexed = decode(64, &[0x66, 0x42, 0x0f, 0xfe, 0x54, 0xa5, 0x10]); // paddd xmm2, [rbp+r12*4+0x10]

    compare_with(&mut exec, &riprel, &native!("movsd xmm0, qword ptr [rsi]"), &setup).unwrap();
    compare_with(&mut exec, &indexed, &native!("paddd xmm2, xmmword ptr [rsi]"), &setup).unwrap();
}

#[test]
fn rsp_operand_reads_guest_rsp() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    start.gpr[4] = 0x1234_5678_9abc_def0;

    let movd = exec_bytes(&mut exec, &mut start, &[0x66, 0x0f, 0x6e, 0xc4], 0); // movd xmm0, esp
    let movq_back = exec_bytes(&mut exec, &mut start, &[0x66, 0x48, 0x0f, 0x7e, 0xcc], 0); // movq rsp, xmm1

    assert_eq!((movd, movq_back), (SimdOutcome::Done, SimdOutcome::Done));
    assert_eq!(start.fpu.xmm(0), 0x9abc_def0);
    assert_eq!(start.gpr[4], start.fpu.xmm(1) as u64);
}

#[test]
fn foreign_encodings_and_disabled_avx_unsupported() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));
    let refused: &[&[u8]] = &[
        &[0x62, 0xf1, 0x7c, 0x48, 0x58, 0xc1], // vaddps zmm0, zmm0, zmm1 (EVEX)
        &[0xc4, 0xe2, 0x75, 0x90, 0x04, 0x90], // vpgatherdd (VSIB)
        &[0xf0, 0x0f, 0x58, 0xc1],             // lock addps
        &[0x0f, 0x0f, 0xc1, 0x9e],             // pfadd mm0, mm1 (3DNow!)
    ];
    for bytes in refused {
        assert_eq!(exec_bytes(&mut exec, &mut start, bytes, 0), SimdOutcome::Unsupported, "{bytes:02x?}");
    }

    start.fpu.set_xcr0(0x3).expect("x87|SSE");
    let vex = exec_bytes(&mut exec, &mut start, &[0xc5, 0xfc, 0x58, 0xc1], 0);

    assert_eq!(vex, SimdOutcome::Unsupported);
}

#[test]
fn stats_count_stub_reuse() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(1));

    exec_bytes(&mut exec, &mut start, &[0x0f, 0x58, 0xc1], 0);
    exec_bytes(&mut exec, &mut start, &[0x0f, 0x58, 0xc1], 0);
    exec_bytes(&mut exec, &mut start, &[0x0f, 0x58, 0x06], 0x1000); // addps xmm0, [rsi]
    exec_bytes(&mut exec, &mut start, &[0x0f, 0x58, 0x47, 0x40], 0x1000); // addps xmm0, [rdi+0x40]
    exec_bytes(&mut exec, &mut start, &[0x62, 0xf1, 0x7c, 0x48, 0x58, 0xc1], 0);

    assert_eq!(exec.stats(), SimdStats { executed: 4, stubs_compiled: 2, unsupported: 1, exceptions: 0 });
}

#[test]
fn host_control_words_survive_guest_rounding_modes() {
    let mut exec = executor();
    let control = |(mxcsr, fcw): (u32, u16)| (mxcsr & !0x3f, fcw); // flags are sticky, not state
    let before = control(host_control_words());
    let setup = Setup { mxcsr: 0xdf80 | (2 << 13), fcw: 0x0f7f, ..Setup::seeded(2) };
    let start = Start::new(&setup);

    let (outcome, _) = run_executor(&mut exec, &decode(64, &[0x0f, 0x58, 0xc1]), &start);
    let (fld, _) = run_executor(&mut exec, &decode(64, &[0xd9, 0xe8]), &start); // fld1

    assert_eq!((outcome, fld), (SimdOutcome::Done, SimdOutcome::Done));
    assert_eq!(control(host_control_words()), before);
    assert_eq!(std::hint::black_box(1.0f64) / std::hint::black_box(3.0), 1.0 / 3.0);
}

#[test]
fn x87_alias_encodings_run_on_host() {
    let mut exec = executor();
    let mut start = Start::new(&Setup::seeded(3));
    let aliases: &[&[u8]] = &[
        &[0xdf, 0xc1], // ffreep st(1)
        &[0xdd, 0xc9], // fxch4 st(1)
        &[0xdc, 0xd1], // fcom2 st(1)
        &[0xdf, 0xd1], // fstp8 st(1)
        &[0xd9, 0xd9], // fstp1 st(1)
    ];

    for bytes in aliases {
        assert_eq!(exec_bytes(&mut exec, &mut start, bytes, 0), SimdOutcome::Done, "{bytes:02x?}");
    }
}

#[test]
fn stub_cache_flushed_at_budget_keeps_working() {
    let mut exec = SimdExecutor::with_code_budget(1024).expect("executor");
    let mut start = Start::new(&Setup::seeded(1));

    for imm in 0..=255u8 {
        let outcome = exec_bytes(&mut exec, &mut start, &[0x66, 0x0f, 0x70, 0xc1, imm], 0); // pshufd xmm0, xmm1, imm
        assert_eq!(outcome, SimdOutcome::Done);
    }
    let again = exec_bytes(&mut exec, &mut start, &[0x66, 0x0f, 0x70, 0xc1, 0x1b], 0);

    assert_eq!(again, SimdOutcome::Done);
    assert_eq!(start.fpu.xmm(0), {
        let x = start.fpu.xmm(1);
        let lane = |i: u32| (x >> (32 * i)) & 0xffff_ffff;
        lane(3) | lane(2) << 32 | lane(1) << 64 | lane(0) << 96
    });
    assert_eq!(exec.stats().stubs_compiled, 257);
}
