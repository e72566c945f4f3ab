//! Mnemonic -> handler: the interpreter's dispatch table.
//!
//! Chosen once per decoded instruction and cached with it. System
//! instructions come from `system` (shared with the translator's callouts);
//! x87/SSE/AVX from `simd`. Anything else raises #UD and is counted.

use iced_x86::{Instruction, Mnemonic as M};

use super::{bits, control, integer, string, Handler, Vcpu};
use crate::exception::Exception;

pub(crate) fn handler(i: &Instruction) -> Handler {
    if i.is_invalid() {
        return invalid;
    }
    if btvmm_translator::classify::is_hint_nop(i) {
        return integer::nop;
    }
    // System first: it claims the special forms of general mnemonics
    // (mov to/from segment, control and debug registers, far jmp/call).
    if let Some(h) = crate::system::handler(i) {
        return h;
    }
    // Before the integer table: iced names SSE2's movsd/cmpsd like the
    // string instructions.
    if let Some(h) = crate::system::simd_handler(i) {
        return h;
    }
    if let Some(h) = super::fast::handler(i) {
        return h;
    }
    if let Some(h) = integer_handler(i.mnemonic()) {
        return h;
    }
    unimplemented
}

fn integer_handler(m: M) -> Option<Handler> {
    Some(match m {
        M::Mov => integer::mov,
        M::Movzx => integer::movzx,
        M::Movsx | M::Movsxd => integer::movsx,
        M::Lea => integer::lea,
        M::Xchg => integer::xchg,
        M::Xadd => integer::xadd,
        M::Cmpxchg => integer::cmpxchg,
        M::Cmpxchg8b | M::Cmpxchg16b => integer::cmpxchg_wide,
        M::Bswap => integer::bswap,
        M::Movbe => integer::movbe,
        M::Cbw | M::Cwde | M::Cdqe => integer::sign_extend_acc,
        M::Cwd | M::Cdq | M::Cqo => integer::sign_to_dx,
        M::Lahf => integer::lahf,
        M::Sahf => integer::sahf,
        M::Xlatb => integer::xlat,
        // The prefetches and endbr are hint NOPs, caught above.
        M::Nop | M::Pause | M::Lfence | M::Mfence | M::Sfence | M::Clflush | M::Clflushopt => integer::nop,
        M::Add => integer::add,
        M::Adc => integer::adc,
        M::Sub => integer::sub,
        M::Sbb => integer::sbb,
        M::Cmp => integer::cmp,
        M::And => integer::and,
        M::Or => integer::or,
        M::Xor => integer::xor,
        M::Test => integer::test,
        M::Inc => integer::inc,
        M::Dec => integer::dec,
        M::Neg => integer::neg,
        M::Not => integer::not,
        M::Mul => integer::mul1,
        M::Imul => imul,
        M::Div | M::Idiv => integer::div,
        M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => integer::shift,
        M::Shld | M::Shrd => integer::double_shift,
        M::Clc | M::Stc | M::Cmc | M::Cld | M::Std => integer::flag_op,
        M::Bound => integer::bound,
        M::Arpl => integer::arpl,
        M::Salc => integer::salc,
        M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => integer::bcd,
        M::Seto | M::Setno | M::Setb | M::Setae | M::Sete | M::Setne | M::Setbe | M::Seta
        | M::Sets | M::Setns | M::Setp | M::Setnp | M::Setl | M::Setge | M::Setle | M::Setg => integer::setcc,
        M::Cmovo | M::Cmovno | M::Cmovb | M::Cmovae | M::Cmove | M::Cmovne | M::Cmovbe
        | M::Cmova | M::Cmovs | M::Cmovns | M::Cmovp | M::Cmovnp | M::Cmovl | M::Cmovge
        | M::Cmovle | M::Cmovg => integer::cmovcc,
        M::Bt | M::Bts | M::Btr | M::Btc => bits::bt,
        M::Bsf | M::Bsr => bits::bit_scan,
        M::Popcnt | M::Lzcnt | M::Tzcnt => bits::count_bits,
        M::Andn | M::Bextr | M::Blsi | M::Blsmsk | M::Blsr | M::Bzhi | M::Mulx | M::Pdep
        | M::Pext | M::Rorx | M::Sarx | M::Shlx | M::Shrx => bits::bmi,
        M::Adcx | M::Adox => bits::adx,
        M::Jmp => control::jmp,
        M::Jo | M::Jno | M::Jb | M::Jae | M::Je | M::Jne | M::Jbe | M::Ja | M::Js | M::Jns
        | M::Jp | M::Jnp | M::Jl | M::Jge | M::Jle | M::Jg => control::jcc,
        M::Call => control::call,
        M::Ret => control::ret,
        M::Loop | M::Loope | M::Loopne => control::loop_,
        M::Jcxz | M::Jecxz | M::Jrcxz => control::jcxz,
        M::Push => control::push,
        M::Pop => control::pop,
        M::Pusha | M::Pushad => control::pusha,
        M::Popa | M::Popad => control::popa,
        M::Enter => control::enter,
        M::Leave => control::leave,
        M::Movsb | M::Movsw | M::Movsd | M::Movsq => string::movs,
        M::Stosb | M::Stosw | M::Stosd | M::Stosq => string::stos,
        M::Lodsb | M::Lodsw | M::Lodsd | M::Lodsq => string::lods,
        M::Cmpsb | M::Cmpsw | M::Cmpsd | M::Cmpsq => string::cmps,
        M::Scasb | M::Scasw | M::Scasd | M::Scasq => string::scas,
        M::Ud0 | M::Ud1 | M::Ud2 => invalid,
        _ => return None,
    })
}

/// One- and two/three-operand imul share a mnemonic.
fn imul(v: &mut Vcpu, i: &Instruction) -> Result<(), Exception> {
    if i.op_count() == 1 { integer::mul1(v, i) } else { integer::imul_n(v, i) }
}

/// Whether `i` must end its decoded block even though it falls through.
pub(crate) fn ends_block(i: &Instruction) -> bool {
    crate::system::ends_block(i)
}

fn invalid(_v: &mut Vcpu, _i: &Instruction) -> Result<(), Exception> {
    Err(Exception::ud())
}

/// An instruction btvmm does not implement: #UD, as a CPU without it, and counted.
fn unimplemented(v: &mut Vcpu, i: &Instruction) -> Result<(), Exception> {
    v.stats.count_unimplemented(&format!("{:?}", i.mnemonic()).to_lowercase());
    tracing::debug!(target: "exception", rip = i.ip(), mnemonic = ?i.mnemonic(), "unimplemented instruction: #UD");
    Err(Exception::ud())
}
