//! Host faults inside compiled code: a guest division by zero (or an
//! `idiv` overflow) runs natively in a CCF and raises SIGFPE on the host.
//! The handler checks that the faulting instruction lies in the code cache,
//! and if so resumes the thread at the fault exit trampoline, which leaves
//! the CCF with reason `Fault` at the guest RIP the CCF stored just before
//! the division (`BtBlock::fault_rip`). The runtime then runs that
//! instruction in the interpreter, which raises the guest's #DE precisely.
//! A SIGFPE anywhere else is not ours: the default action runs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

/// Code-cache address ranges (start, end), filled as chunks are mapped; a
/// fixed table of atomics, since the handler may not lock.
const MAX_RANGES: usize = 256;
static RANGES: [(AtomicUsize, AtomicUsize); MAX_RANGES] = [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_RANGES];
static FAULT_EXITS: [AtomicUsize; MAX_RANGES] = [const { AtomicUsize::new(0) }; MAX_RANGES];

/// Records that `[start, end)` holds compiled code whose faults go to
/// `fault_exit` (until `unregister`).
pub fn register(start: usize, end: usize, fault_exit: usize) {
    install();
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if s.load(Ordering::Acquire) == start && e.load(Ordering::Acquire) == end {
            FAULT_EXITS[i].store(fault_exit, Ordering::Release);
            return;
        }
    }
    for (i, (s, e)) in RANGES.iter().enumerate() {
        if e.load(Ordering::Acquire) == 0 {
            FAULT_EXITS[i].store(fault_exit, Ordering::Release);
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
            e.store(0, Ordering::Release);
            s.store(0, Ordering::Release);
        }
    }
}

pub(super) fn fault_exit_for(pc: usize) -> Option<usize> {
    RANGES.iter().enumerate().find_map(|(i, (s, e))| {
        let (s, e) = (s.load(Ordering::Acquire), e.load(Ordering::Acquire));
        (s <= pc && pc < e).then(|| FAULT_EXITS[i].load(Ordering::Acquire)).filter(|&x| x != 0)
    })
}

extern "C" fn on_sigfpe(signo: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO
    // handler; only its saved RIP is read and written, which resumes the
    // interrupted thread elsewhere with every other register unchanged.
    unsafe {
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
        match fault_exit_for(pc) {
            Some(exit) => uc.uc_mcontext.gregs[libc::REG_RIP as usize] = exit as i64,
            None => {
                // Not a CCF: let the default action have it when the
                // instruction faults again on return.
                libc::signal(signo, libc::SIG_DFL);
            }
        }
    }
}

fn install() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::SigAction(on_sigfpe),
            nix::sys::signal::SaFlags::SA_SIGINFO,
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only reads and writes the interrupted
        // context's RIP and atomics; it is async-signal-safe.
        if let Err(e) = unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGFPE, &action) } {
            tracing::warn!(target: "translator", "cannot catch SIGFPE ({e}): a guest #DE in translated code would be fatal");
        }
    });
}
