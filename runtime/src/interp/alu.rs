//! Arithmetic with exact x86 flags (SDM Vol. 1, 3.4.3.1 and Appendix A).
//!
//! Every function takes the operand size in bytes and operands already
//! masked to that size, and returns the masked result and the arithmetic
//! flags it defines. Flags an instruction leaves undefined are computed the
//! way AMD and Intel parts commonly do where that is cheap, otherwise zero;
//! differential tests mask them.

use crate::cpu::rflags::{AF, CF, OF, PF, SF, ZF};

use super::access::size_mask;

static PARITY: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = if (i as u8).count_ones().is_multiple_of(2) { PF as u8 } else { 0 };
        i += 1;
    }
    t
};

#[inline(always)]
pub fn msb(size: u32) -> u32 {
    size * 8 - 1
}

/// ZF, SF and PF of a result.
#[inline(always)]
pub fn szp(size: u32, r: u64) -> u64 {
    let mut f = PARITY[(r & 0xff) as usize] as u64;
    if r & size_mask(size) == 0 {
        f |= ZF;
    }
    f | (((r >> msb(size)) & 1) << 7)
}

#[inline(always)]
pub fn add(size: u32, a: u64, b: u64, carry: u64) -> (u64, u64) {
    let m = size_mask(size);
    let (r, cf) = if size == 8 {
        let (s1, c1) = a.overflowing_add(b);
        let (s2, c2) = s1.overflowing_add(carry);
        (s2, c1 | c2)
    } else {
        let s = a + b + carry;
        (s & m, s > m)
    };
    let of = ((a ^ r) & (b ^ r)) >> msb(size) & 1;
    let f = szp(size, r) | (cf as u64) | ((a ^ b ^ r) & AF) | (of << 11);
    (r, f)
}

#[inline(always)]
pub fn sub(size: u32, a: u64, b: u64, borrow: u64) -> (u64, u64) {
    let m = size_mask(size);
    let r = a.wrapping_sub(b).wrapping_sub(borrow) & m;
    let cf = (a as u128) < b as u128 + borrow as u128;
    let of = ((a ^ b) & (a ^ r)) >> msb(size) & 1;
    let f = szp(size, r) | (cf as u64) | ((a ^ b ^ r) & AF) | (of << 11);
    (r, f)
}

#[inline(always)]
pub fn logic(size: u32, r: u64) -> (u64, u64) {
    (r, szp(size, r))
}

/// inc/dec: like add/sub of 1 but CF is not written (callers mask it out).
#[inline(always)]
pub fn inc(size: u32, a: u64) -> (u64, u64) {
    add(size, a, 1, 0)
}

#[inline(always)]
pub fn dec(size: u32, a: u64) -> (u64, u64) {
    sub(size, a, 1, 0)
}

#[inline(always)]
pub fn neg(size: u32, a: u64) -> (u64, u64) {
    sub(size, 0, a, 0)
}

/// Masks a shift/rotate count as the hardware does: 6 bits for 64-bit operands, else 5.
#[inline(always)]
pub fn shift_count(size: u32, c: u64) -> u32 {
    (c & if size == 8 { 0x3f } else { 0x1f }) as u32
}

/// The flags a shift or rotate changes (`mask`) and their new values.
pub struct ShiftResult {
    pub value: u64,
    pub flags: u64,
    pub mask: u64,
}

const ALL: u64 = CF | PF | AF | ZF | SF | OF;

/// shl/sal, shr, sar with an already-masked, non-zero count.
pub fn shift(kind: ShiftKind, size: u32, a: u64, count: u32, cf_in: bool) -> ShiftResult {
    let bits = size * 8;
    let m = size_mask(size);
    let top = msb(size);
    let (r, cf, of) = match kind {
        ShiftKind::Shl => {
            let r = if count >= bits { 0 } else { (a << count) & m };
            let cf = if count > bits { false } else { (a >> (bits - count)) & 1 != 0 };
            let of = ((r >> top) & 1 != 0) ^ cf;
            (r, cf, of)
        }
        ShiftKind::Shr => {
            let r = if count >= bits { 0 } else { a >> count };
            let cf = if count > bits { false } else { (a >> (count - 1)) & 1 != 0 };
            // OF: the top bit before the last one-bit step (the SDM's
            // count-1 rule applied to that step: AMD's OF for every count).
            let before_last = if count > bits { 0 } else { a >> (count - 1) };
            (r, cf, (before_last >> top) & 1 != 0)
        }
        ShiftKind::Sar => {
            let sa = ((a << (64 - bits)) as i64) >> (64 - bits);
            let r = (sa >> count.min(63)) as u64 & m;
            let cf = (sa >> (count - 1).min(63)) & 1 != 0;
            (r, cf, false)
        }
        ShiftKind::Rol | ShiftKind::Ror | ShiftKind::Rcl | ShiftKind::Rcr => {
            return rotate(kind, size, a, count, cf_in);
        }
    };
    // AF is undefined; AMD CPUs set it (translated code runs shifts
    // natively, so the interpreter gives what they give).
    let flags = szp(size, r) | cf as u64 | AF | ((of as u64) << 11);
    ShiftResult { value: r, flags, mask: ALL }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ShiftKind {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
}

fn rotate(kind: ShiftKind, size: u32, a: u64, count: u32, cf_in: bool) -> ShiftResult {
    let bits = size * 8;
    let m = size_mask(size);
    let top = msb(size);
    let mask = CF | OF;
    match kind {
        ShiftKind::Rol | ShiftKind::Ror => {
            let c = count % bits;
            let r = if kind == ShiftKind::Rol {
                if c == 0 { a } else { ((a << c) | (a >> (bits - c))) & m }
            } else if c == 0 {
                a
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let (cf, of) = if kind == ShiftKind::Rol {
                let cf = r & 1 != 0;
                (cf, ((r >> top) & 1 != 0) ^ cf)
            } else {
                let cf = (r >> top) & 1 != 0;
                (cf, cf ^ ((r >> (top - 1)) & 1 != 0))
            };
            ShiftResult { value: r, flags: cf as u64 | ((of as u64) << 11), mask }
        }
        _ => {
            // Rotate through carry: a (bits+1)-bit rotation of CF:value.
            let c = count % (bits + 1);
            let mut r = a;
            let mut cf = cf_in;
            if kind == ShiftKind::Rcl {
                for _ in 0..c {
                    let out = (r >> top) & 1 != 0;
                    r = ((r << 1) | cf as u64) & m;
                    cf = out;
                }
                let of = ((r >> top) & 1 != 0) ^ cf;
                ShiftResult { value: r, flags: cf as u64 | ((of as u64) << 11), mask }
            } else {
                for _ in 0..c {
                    let out = r & 1 != 0;
                    r = (r >> 1) | ((cf as u64) << top);
                    cf = out;
                }
                // The top two bits of the result: what the SDM defines for
                // a count of 1 (the old top bit xor CF), and what AMD CPUs
                // give for every other count, a multiple of bits + 1
                // included (which leaves value and CF as they were).
                let of = ((r >> top) ^ (r >> (top - 1))) & 1 != 0;
                ShiftResult { value: r, flags: cf as u64 | ((of as u64) << 11), mask }
            }
        }
    }
}

/// shld (left) / shrd (right) with a masked, non-zero count.
pub fn double_shift(left: bool, size: u32, dst: u64, src: u64, count: u32) -> (u64, u64) {
    if size == 2 && count >= 16 {
        return host_double_shift16(left, dst as u16, src as u16, count as u8);
    }
    let top = msb(size);
    let (r, cf) = double_shift_value(left, size, dst, src, count);
    // OF: whether the last one-bit step changed the top bit (the SDM's
    // count-1 rule applied to that step: AMD's OF for every count).
    let before_last = if count == 1 { dst } else { double_shift_value(left, size, dst, src, count - 1).0 };
    let of = ((r ^ before_last) >> top) & 1;
    // AF is undefined; AMD CPUs set it, as for the other shifts.
    (r, szp(size, r) | cf as u64 | AF | (of << 11))
}

/// A 16-bit shld/shrd by 16 or more, whose flags (and, beyond 16, value)
/// the SDM leaves undefined and no rule found here reproduces: run on the
/// host, as translated code runs it, so both engines agree.
fn host_double_shift16(left: bool, dst: u16, src: u16, count: u8) -> (u64, u64) {
    let (mut x, mut flags) = (dst, 2u64);
    // SAFETY: pushes and pops one quadword on the host stack (no `nostack`,
    // so the compiler keeps its red zone clear) around a shift of registers
    // only; the flags loaded have DF clear, as Rust expects after the block.
    unsafe {
        if left {
            std::arch::asm!("push {f}", "popfq", "shld {x:x}, {y:x}, cl", "pushfq", "pop {f}",
                x = inout(reg) x, y = in(reg) src, f = inout(reg) flags, in("cl") count);
        } else {
            std::arch::asm!("push {f}", "popfq", "shrd {x:x}, {y:x}, cl", "pushfq", "pop {f}",
                x = inout(reg) x, y = in(reg) src, f = inout(reg) flags, in("cl") count);
        }
    }
    (x as u64, flags & (CF | PF | AF | ZF | SF | OF))
}

/// The value and CF of a double shift by a non-zero count.
fn double_shift_value(left: bool, size: u32, dst: u64, src: u64, count: u32) -> (u64, bool) {
    let bits = size * 8;
    let m = size_mask(size);
    // Work on the 2*bits-bit concatenation. (A 16-bit count above 16 leaves
    // the result undefined; this gives one of the values hardware gives.)
    if left && size == 8 {
        // count is 1..=63 here: no bits beyond the 128-bit concatenation.
        ((dst << count) | (src >> (bits - count)), (dst >> (bits - count)) & 1 != 0)
    } else if left {
        let shifted = ((((dst as u128) << bits) | src as u128) << count) >> bits;
        ((shifted as u64) & m, (shifted >> bits) & 1 != 0)
    } else {
        let wide = ((src as u128) << bits) | dst as u128;
        ((wide >> count) as u64 & m, (wide >> (count - 1)) & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_8bit_overflow_sets_of_cf_af() {
        let (r, f) = add(1, 0x7f, 0x01, 0);
        assert_eq!(r, 0x80);
        assert_eq!(f & (OF | SF | AF | CF | ZF), OF | SF | AF);
        let (r, f) = add(1, 0xff, 0x01, 0);
        assert_eq!(r, 0);
        assert_eq!(f & (CF | ZF | PF), CF | ZF | PF);
    }

    #[test]
    fn add_64bit_with_carry_in_wraps() {
        let (r, f) = add(8, u64::MAX, 0, 1);
        assert_eq!(r, 0);
        assert_ne!(f & CF, 0);
    }

    #[test]
    fn sub_borrow_rules_match_hardware() {
        assert_eq!(sub(4, 0, 1, 0).1 & CF, CF);
        assert_eq!(sub(4, 5, 5, 0).1 & (CF | ZF), ZF);
        assert_eq!(sub(4, 5, 5, 1).1 & CF, CF);
        assert_eq!(sub(8, 0, u64::MAX, 1).0, 0);
        assert_eq!(sub(8, 0, u64::MAX, 1).1 & CF, CF);
        let (r, f) = sub(1, 0x80, 1, 0);
        assert_eq!(r, 0x7f);
        assert_eq!(f & OF, OF);
    }

    #[test]
    fn rcl_16bit_count_17_is_identity() {
        let r = shift(ShiftKind::Rcl, 2, 0x8001, 17, true);
        assert_eq!(r.value, 0x8001);
    }

    /// One `rcl`/`rcr` of `x` by `count` on the host, from flags `flags`
    /// (CF only): the value and the flags after.
    macro_rules! host_rotate {
        ($insn:literal, $class:ident, $modifier:literal, $x:expr, $count:expr, $cf:expr) => {{
            let (mut x, mut flags) = ($x, 2u64 | $cf as u64);
            // SAFETY: pushes and pops one quadword on the host stack (no
            // `nostack`, so the compiler keeps its red zone clear) around a
            // rotation of registers only; the flags loaded have DF clear,
            // as Rust expects after the block.
            unsafe {
                std::arch::asm!("push {f}", "popfq", concat!($insn, " {x", $modifier, "}, cl"), "pushfq", "pop {f}",
                    x = inout($class) x, f = inout(reg) flags, in("cl") $count)
            };
            (x as u64, flags)
        }};
    }

    /// Rotations through carry of each size, by every masked count, with
    /// either CF, against the host CPU: value, CF and OF. Translated code
    /// runs rcl and rcr natively, so the interpreter must give what the host
    /// gives. OF is defined for a count of 1 only; AMD CPUs (such as the one
    /// these numbers were found on) give rcr the xor of the result's top two
    /// bits for every other count too, even a count that rotates the value
    /// back to itself (9, 18 or 27 for a byte; 17 for a word), for which OF
    /// used to be cleared. Elsewhere only a count of 1's OF is compared.
    #[test]
    fn rotations_through_carry_match_the_host() {
        let amd = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("AuthenticAMD"));
        let mut values: Vec<u64> = (0..=255).collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x);
        }
        values.extend([u64::MAX, 1 << 63, (1 << 63) - 1, 0xffff_0000, 0x8000_8000, 0x4000_4000_4000_4000]);
        for kind in [ShiftKind::Rcl, ShiftKind::Rcr] {
            let rcl = kind == ShiftKind::Rcl;
            for size in [1u32, 2, 4, 8] {
                let counts = if size == 8 { 1..64u8 } else { 1..32u8 };
                for &v in &values {
                    let v = v & size_mask(size);
                    for cf in [false, true] {
                        for count in counts.clone() {
                            let (x, flags) = match (size, rcl) {
                                (1, true) => host_rotate!("rcl", reg_byte, "", v as u8, count, cf),
                                (1, false) => host_rotate!("rcr", reg_byte, "", v as u8, count, cf),
                                (2, true) => host_rotate!("rcl", reg, ":x", v as u16, count, cf),
                                (2, false) => host_rotate!("rcr", reg, ":x", v as u16, count, cf),
                                (4, true) => host_rotate!("rcl", reg, ":e", v as u32, count, cf),
                                (4, false) => host_rotate!("rcr", reg, ":e", v as u32, count, cf),
                                (_, true) => host_rotate!("rcl", reg, ":r", v, count, cf),
                                (_, false) => host_rotate!("rcr", reg, ":r", v, count, cf),
                            };
                            let r = shift(kind, size, v, count as u32, cf);
                            let compared = if amd || count == 1 { CF | OF } else { CF };
                            assert_eq!(r.value, x, "{kind:?} of {size} bytes {v:#x} by {count}, CF={cf}");
                            assert_eq!(r.flags & compared, flags & compared, "{kind:?} of {size} bytes {v:#x} by {count}, CF={cf}");
                        }
                    }
                }
            }
        }
    }

    /// One shift of `x` (by CL, shifting in `y` for shld/shrd) on the host,
    /// from flags `flags`: the value and the flags after.
    macro_rules! host_shift {
        ($insn:literal, $class:ident, $modifier:literal, $x:expr, $y:expr, $count:expr, $flags:expr) => {{
            let (mut x, mut flags) = ($x, $flags);
            // SAFETY: pushes and pops one quadword on the host stack (no
            // `nostack`, so the compiler keeps its red zone clear) around a
            // shift of registers only; the flags loaded have DF clear, as
            // Rust expects after the block.
            unsafe {
                std::arch::asm!("push {f}", "popfq", concat!($insn, " {x", $modifier, "}, {y", $modifier, "}, cl"), "pushfq", "pop {f}",
                    x = inout($class) x, y = in($class) $y, f = inout(reg) flags, in("cl") $count)
            };
            (x as u64, flags)
        }};
        ($insn:literal, $class:ident, $modifier:literal, $x:expr, $count:expr, $flags:expr) => {{
            let (mut x, mut flags) = ($x, $flags);
            // SAFETY: as above.
            unsafe {
                std::arch::asm!("push {f}", "popfq", concat!($insn, " {x", $modifier, "}, cl"), "pushfq", "pop {f}",
                    x = inout($class) x, f = inout(reg) flags, in("cl") $count)
            };
            (x as u64, flags)
        }};
    }

    /// shl, shr, sar, shld and shrd of each size by every masked non-zero
    /// count, against the host CPU: value and every arithmetic flag. The
    /// SDM leaves AF undefined (and OF beyond a count of 1), but translated
    /// code runs these natively and runs the same instruction in the
    /// interpreter when its access misses the TLB: the two must not tell
    /// apart. AMD CPUs (such as the one this was found on: the interpreter
    /// cleared AF, the host sets it) are matched in every flag; elsewhere
    /// only the defined ones are compared.
    #[test]
    fn shifts_match_the_host_in_every_flag() {
        let amd = std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("AuthenticAMD"));
        let mut values: Vec<u64> = vec![0, 1, 0x10, 0x80, 0x8000, 0x8000_0000, 1 << 63, u64::MAX, 0x7fff_ffff];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x);
        }
        let kinds = [ShiftKind::Shl, ShiftKind::Shr, ShiftKind::Sar];
        for size in [1u32, 2, 4, 8] {
            let counts = if size == 8 { 1..64u8 } else { 1..32u8 };
            for (k, &v) in values.iter().enumerate() {
                let v = v & size_mask(size);
                let w = values[(k + 5) % values.len()] & size_mask(size);
                for flags_in in [2u64, 0x8d7] {
                    for count in counts.clone() {
                        // CF is undefined for counts of the operand size or more.
                        let cf = if count as u32 >= size * 8 { 0 } else { CF };
                        let defined = cf | SF | ZF | PF | if count == 1 { OF } else { 0 };
                        let compared = if amd { ALL } else { defined };
                        for kind in kinds {
                            let host = match (size, kind) {
                                (1, ShiftKind::Shl) => host_shift!("shl", reg_byte, "", v as u8, count, flags_in),
                                (1, ShiftKind::Shr) => host_shift!("shr", reg_byte, "", v as u8, count, flags_in),
                                (1, _) => host_shift!("sar", reg_byte, "", v as u8, count, flags_in),
                                (2, ShiftKind::Shl) => host_shift!("shl", reg, ":x", v as u16, count, flags_in),
                                (2, ShiftKind::Shr) => host_shift!("shr", reg, ":x", v as u16, count, flags_in),
                                (2, _) => host_shift!("sar", reg, ":x", v as u16, count, flags_in),
                                (4, ShiftKind::Shl) => host_shift!("shl", reg, ":e", v as u32, count, flags_in),
                                (4, ShiftKind::Shr) => host_shift!("shr", reg, ":e", v as u32, count, flags_in),
                                (4, _) => host_shift!("sar", reg, ":e", v as u32, count, flags_in),
                                (_, ShiftKind::Shl) => host_shift!("shl", reg, ":r", v, count, flags_in),
                                (_, ShiftKind::Shr) => host_shift!("shr", reg, ":r", v, count, flags_in),
                                (_, _) => host_shift!("sar", reg, ":r", v, count, flags_in),
                            };
                            let r = shift(kind, size, v, count as u32, flags_in & CF != 0);
                            let mine = (flags_in & !r.mask) | r.flags;
                            let what = format!("{kind:?} of {size} bytes {v:#x} by {count}, flags {flags_in:#x}");
                            assert_eq!(r.value, host.0, "{what}");
                            assert_eq!(mine & compared, host.1 & compared, "{what}");
                        }
                        // A 16-bit count of 16 or more: see `double_shift`.
                        if size == 1 || (size == 2 && count >= 16) {
                            continue;
                        }
                        for left in [true, false] {
                            let host = match (size, left) {
                                (2, true) => host_shift!("shld", reg, ":x", v as u16, w as u16, count, flags_in),
                                (2, false) => host_shift!("shrd", reg, ":x", v as u16, w as u16, count, flags_in),
                                (4, true) => host_shift!("shld", reg, ":e", v as u32, w as u32, count, flags_in),
                                (4, false) => host_shift!("shrd", reg, ":e", v as u32, w as u32, count, flags_in),
                                (_, true) => host_shift!("shld", reg, ":r", v, w, count, flags_in),
                                (_, false) => host_shift!("shrd", reg, ":r", v, w, count, flags_in),
                            };
                            let (r, f) = double_shift(left, size, v, w, count as u32);
                            let what = format!("sh{}d of {size} bytes {v:#x}, {w:#x} by {count}", if left { 'l' } else { 'r' });
                            assert_eq!(r, host.0, "{what}");
                            assert_eq!(f & compared, host.1 & compared, "{what}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn sar_32bit_negative_fills_sign() {
        let r = shift(ShiftKind::Sar, 4, 0x8000_0000, 31, false);
        assert_eq!(r.value, 0xffff_ffff);
    }

    #[test]
    fn shld_32bit_shifts_in_source_bits() {
        assert_eq!(double_shift(true, 4, 0x1234_5678, 0x9abc_def0, 8).0, 0x3456_789a);
        assert_eq!(double_shift(false, 4, 0x1234_5678, 0x9abc_def0, 8).0, 0xf012_3456);
    }
}
