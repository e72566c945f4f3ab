//! Host faults inside compiled code: a guest division by zero (or an
//! `idiv` overflow) runs natively in a CCF and raises SIGFPE on the host.
//! The handler checks that the faulting instruction lies in the code cache,
//! and if so resumes the thread at the fault exit trampoline, which leaves
//! the CCF with reason `Fault` at the guest RIP the CCF stored just before
//! the division (`BtBlock::fault_rip`). The runtime then runs that
//! instruction in the interpreter, which raises the guest's #DE precisely.
//!
//! SIGSEGV, SIGBUS, SIGILL and SIGFPE of a SIMD floating-point exception in
//! the code cache are never a guest's doing
//! (every guest memory access goes through the soft TLB, misaligned SSE
//! accesses and instructions of features the guest lacks leave for the
//! runtime, SIMD floating-point arithmetic runs there only with every
//! exception masked), so they are a VMM bug: the handler records the signal and the
//! host address ([`take_host_fault`]) and resumes the thread at the
//! host-fault exit, and the runtime reports which TU and guest instruction
//! it was and stops the guest, instead of the process dying.
//!
//! Any of these signals anywhere else is not ours: the action installed
//! before ours takes it (Rust's stack-overflow report, or the default).

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// Code-cache address ranges (start, end), filled as chunks are mapped; a
/// fixed table of atomics, since the handler may not lock.
const MAX_RANGES: usize = 256;
static RANGES: [(AtomicUsize, AtomicUsize); MAX_RANGES] = [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RANGES];
static FAULT_EXITS: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];
static HOST_FAULT_EXITS: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];

/// `si_code` of a SIGFPE from an integer division (Linux's
/// `<asm-generic/siginfo.h>`; the libc crate does not name it).
const FPE_INTDIV: libc::c_int = 1;

/// The signals the handler takes in compiled code.
const SIGNALS: [libc::c_int; 4] = [libc::SIGFPE, libc::SIGSEGV, libc::SIGBUS, libc::SIGILL];
/// The actions installed before ours, by index in `SIGNALS`.
static PREVIOUS: OnceLock<[libc::sigaction; 4]> = OnceLock::new();

thread_local! {
    /// The last host fault that left compiled code through the host-fault
    /// exit on this thread: (signal, host address).
    static HOST_FAULT: Cell<Option<(libc::c_int, usize)>> = const { Cell::new(None) };
}

/// Where the faults of one code range go: the guest-fault exit (SIGFPE)
/// and the host-fault exit (any other signal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultExits {
    pub guest: usize,
    pub host: usize,
}

/// Records that `[start, end)` holds compiled code whose faults go to
/// `exits` (until `unregister`).
pub fn register(start: usize, end: usize, exits: FaultExits) {
    install();
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if s.load(Ordering::Acquire) == start && e.load(Ordering::Acquire) == end {
            FAULT_EXITS[i].store(exits.guest, Ordering::Release);
            HOST_FAULT_EXITS[i].store(exits.host, Ordering::Release);
            return;
        }
    }
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if e.load(Ordering::Acquire) == 0 {
            FAULT_EXITS[i].store(exits.guest, Ordering::Release);
            HOST_FAULT_EXITS[i].store(exits.host, Ordering::Release);
            s.store(start, Ordering::Release);
            e.store(end, Ordering::Release);
            return;
        }
    }
    tracing::warn!(target: "translator", "too many code ranges: host faults in new ones stay fatal");
}

/// Forgets a range (its chunk is about to be unmapped).
pub fn unregister(start: usize, end: usize) {
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if s.load(Ordering::Acquire) == start && e.load(Ordering::Acquire) == end {
            FAULT_EXITS[i].store(0, Ordering::Release);
            HOST_FAULT_EXITS[i].store(0, Ordering::Release);
            e.store(0, Ordering::Release);
            s.store(0, Ordering::Release);
        }
    }
}

/// The exits of the code range holding `pc`, if any.
pub(super) fn fault_exits_for(pc: usize) -> Option<FaultExits> {
    RANGES.iter().enumerate().find_map(|(i, (s, e))| {
        let (s, e) = (s.load(Ordering::Acquire), e.load(Ordering::Acquire));
        let exits = FaultExits { guest: FAULT_EXITS[i].load(Ordering::Acquire), host: HOST_FAULT_EXITS[i].load(Ordering::Acquire) };
        (s <= pc && pc < e && exits.guest != 0).then_some(exits)
    })
}

/// The host fault (signal, host address) that last sent this thread
/// through the host-fault exit, taken once.
pub fn take_host_fault() -> Option<(libc::c_int, usize)> {
    HOST_FAULT.with(|f| f.take())
}

extern "C" fn on_fault(signo: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t and ucontext_t for an
    // SA_SIGINFO handler; only the signal's code and the saved RIP are
    // read, and RIP written, which resumes the interrupted thread elsewhere
    // with every other register unchanged. Re-installing the previous
    // action is async-signal-safe (sigaction).
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let rip = &mut uc.uc_mcontext.gregs[libc::REG_RIP as usize];
        let pc = *rip as usize;
        // A division's #DE (Linux reports an idiv overflow as a division
        // by zero too); a SIMD floating-point exception is never a guest's
        // in compiled code (such arithmetic runs there only with every
        // exception masked), so it is a VMM bug like the others.
        let division = signo == libc::SIGFPE && (*info).si_code == FPE_INTDIV;
        match fault_exits_for(pc) {
            Some(exits) if division => *rip = exits.guest as i64,
            Some(exits) => {
                HOST_FAULT.with(|f| f.set(Some((signo, pc))));
                *rip = exits.host as i64;
            }
            None => {
                // Not compiled code: the action from before ours takes the
                // instruction when it faults again on return.
                let k = SIGNALS.iter().position(|&s| s == signo);
                match (k, PREVIOUS.get()) {
                    (Some(k), Some(prev)) => {
                        libc::sigaction(signo, &prev[k], std::ptr::null_mut());
                    }
                    _ => {
                        libc::signal(signo, libc::SIG_DFL);
                    }
                }
            }
        }
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid value to be overwritten;
        // the handler only reads and writes the interrupted context's RIP,
        // atomics and a thread-local cell, and calls sigaction: it is
        // async-signal-safe.
        unsafe {
            let mut previous: [libc::sigaction; 4] = std::mem::zeroed();
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_fault as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            for (k, &signo) in SIGNALS.iter().enumerate() {
                libc::sigaction(signo, std::ptr::null(), &mut previous[k]);
            }
            let _ = PREVIOUS.set(previous);
            for &signo in &SIGNALS {
                if libc::sigaction(signo, &action, std::ptr::null_mut()) != 0 {
                    tracing::warn!(target: "translator", signo, "cannot catch a host fault signal: one in translated code would be fatal");
                }
            }
        }
    });
}
