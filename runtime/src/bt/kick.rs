//! Kicks: how the dispatcher gets control back from a loop of chained CCFs.
//!
//! Chained jumps cost nothing: a loop that stays in one page runs as host
//! code jumping to host code, with no counter on the way. To look at the
//! clock and the interrupt lines again, the vCPU is *kicked*: a helper
//! thread (the [`Kicker`]) sleeps until the platform's next deadline (or at
//! most [`KICK_PERIOD`]; it looks at the deadline the vCPU publishes every
//! [`KICK_LOOK`]), gives the vCPU [`KICK_GRACE`] to show that it
//! passes through the dispatcher (which then polls by itself), and only if
//! it stayed in one run of compiled code sends the vCPU thread `SIGURG`. The
//! handler finds the CCF the thread was interrupted in (the [`KickMap`]
//! names, for every 64-byte piece of the code cache, the chainable exits
//! of the TU there: where each one's jump displacement is, and what it
//! holds unchained) and unchains those exits, and zeroes the chain
//! budget that IBTC transfers count down. Whichever way the TU is left, the
//! CCF then returns to the dispatcher, which polls the clock and chains the
//! stub again on its way back. A kick that lands outside compiled code (in
//! the dispatcher, a trampoline) is repeated every [`KICK_RETRY`] until the
//! vCPU takes it.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The longest a chain of CCFs runs without the dispatcher looking at the
/// platform's events (console input, a stop request) when no timer is due.
pub const KICK_PERIOD: Duration = Duration::from_millis(10);
/// How often the kicker looks at the deadline the vCPU published (so a
/// timer is at most this late in a loop of compiled code).
pub const KICK_LOOK: Duration = Duration::from_millis(1);
/// How soon a kick that has not been taken is sent again.
pub const KICK_RETRY: Duration = Duration::from_micros(200);
/// How long a vCPU that is due may take to show it passes through the
/// dispatcher before it is kicked.
pub const KICK_GRACE: Duration = Duration::from_micros(50);
/// Code-cache granule the map keeps one entry for (slots start on it).
const GRANULE: usize = 64;

/// The chainable exit stubs of the TUs in the code cache, by granule, for
/// the kick handler. Changed only by the vCPU thread outside compiled code;
/// read only by the handler on that thread while it runs compiled code.
pub struct KickMap {
    chunks: Vec<ChunkMap>,
    /// The vCPU block's chain budget, zeroed by a kick.
    budget: *mut u64,
    /// Kicks that landed in a CCF.
    pub landed: AtomicU64,
}

struct ChunkMap {
    /// The executable view's start, and the writable view of the same bytes.
    rx: usize,
    rw: *mut u8,
    len: usize,
    /// Per granule, up to two chainable exits: the chunk offset (+1, 0 for
    /// none) of the jump displacement chaining rewrites, in the high 32
    /// bits, and the displacement that makes it an exit, in the low 32.
    stubs: Box<[[AtomicU64; 2]]>,
}

thread_local! {
    /// The kick map of the vCPU running on this thread, if any.
    static CURRENT: Cell<*const KickMap> = const { Cell::new(std::ptr::null()) };
}

impl KickMap {
    pub fn new(budget: *mut u64) -> Self {
        KickMap { chunks: Vec::new(), budget, landed: AtomicU64::new(0) }
    }

    /// Follows the code cache's chunks: `views` are (executable start,
    /// length, writable start); maps of chunks no longer there are dropped.
    pub fn sync(&mut self, views: &[(usize, usize, *mut u8)]) {
        // The kick handler walks the chunk list: no kick lands while it
        // changes (one sent meanwhile lands after, outside compiled code,
        // and is sent again).
        let _held = KicksHeld::new();
        self.chunks.retain(|c| views.iter().any(|&(rx, len, rw)| rx == c.rx && len == c.len && rw == c.rw));
        for &(rx, len, rw) in views {
            if !self.chunks.iter().any(|c| c.rx == rx) {
                let stubs = (0..len.div_ceil(GRANULE)).map(|_| [AtomicU64::new(0), AtomicU64::new(0)]).collect();
                self.chunks.push(ChunkMap { rx, rw, len, stubs });
            }
        }
    }

    /// Names the chainable exits (at most two) of the TU whose slot is
    /// `[base, base + len)`: the executable address of the jump
    /// displacement chaining rewrites, and the displacement that makes it
    /// an exit again (`ExitSite::link`). An empty list clears the slot.
    pub fn set(&self, base: *const u8, len: usize, exits: &[(*const u8, i32)]) {
        let Some(c) = self.chunks.iter().find(|c| c.rx <= base as usize && (base as usize) < c.rx + c.len) else { return };
        let rel = |p: *const u8| (p as usize).wrapping_sub(c.rx);
        let mut v = [0u64; 2];
        for (slot, &(at, unchained)) in v.iter_mut().zip(exits) {
            *slot = (rel(at) as u64 + 1) << 32 | u64::from(unchained as u32);
        }
        let first = rel(base) / GRANULE;
        let last = (rel(base) + len).div_ceil(GRANULE).min(c.stubs.len());
        for g in &c.stubs[first..last] {
            g[0].store(v[0], Ordering::Relaxed);
            g[1].store(v[1], Ordering::Relaxed);
        }
    }

    /// Makes this the map the kick handler uses on this thread, until the
    /// guard drops. The map must stay where it is meanwhile.
    pub fn install(&self) -> Result<KickGuard, std::io::Error> {
        install_handler()?;
        CURRENT.with(|c| c.set(self));
        Ok(KickGuard(()))
    }

    /// The kick at host address `pc`: unchains the exits of the CCF there.
    fn kick(&self, pc: usize) {
        // SAFETY: `budget` points into the vCPU block, which outlives every
        // CCF run; this thread is the only one touching it.
        unsafe { self.budget.write_volatile(0) };
        let Some(c) = self.chunks.iter().find(|c| c.rx <= pc && pc < c.rx + c.len) else { return };
        let g = &c.stubs[(pc - c.rx) / GRANULE];
        let v = [g[0].load(Ordering::Relaxed), g[1].load(Ordering::Relaxed)];
        if v == [0, 0] {
            return;
        }
        self.landed.fetch_add(1, Ordering::Relaxed);
        for v in v {
            let off = (v >> 32) as usize;
            let unchained = (v as u32).to_le_bytes();
            if off != 0 && off - 1 + unchained.len() <= c.len {
                // SAFETY: the displacement lies inside this chunk's writable
                // view (checked above), which maps the same pages as the
                // code this thread was interrupted in; no other thread
                // writes code. It may be unaligned.
                unsafe { std::ptr::copy_nonoverlapping(unchained.as_ptr(), c.rw.add(off - 1), unchained.len()) };
            }
        }
    }
}

/// Holds kicks (`SIGURG`) off the calling thread until dropped.
struct KicksHeld(libc::sigset_t);

impl KicksHeld {
    fn new() -> Self {
        // SAFETY: both sets are valid places for the calls to fill in;
        // pthread_sigmask only changes this thread's signal mask.
        unsafe {
            let mut urg: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut urg);
            libc::sigaddset(&mut urg, libc::SIGURG);
            libc::pthread_sigmask(libc::SIG_BLOCK, &urg, &mut old);
            KicksHeld(old)
        }
    }
}

impl Drop for KicksHeld {
    fn drop(&mut self) {
        // SAFETY: restores the mask `new` saved, on the same thread (the
        // guard lives only within `sync`).
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Uninstalls the thread's kick map when dropped.
pub struct KickGuard(());

impl Drop for KickGuard {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(std::ptr::null()));
    }
}

extern "C" fn on_kick(_signo: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t to an SA_SIGINFO handler;
    // only its saved RIP is read. The thread's kick map is only ever changed
    // by this thread outside compiled code, and is installed for as long as
    // the vCPU runs; a kick elsewhere finds no stubs and only zeroes the budget.
    unsafe {
        let uc = &*(ctx as *const libc::ucontext_t);
        let pc = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as usize;
        let map = CURRENT.with(Cell::get);
        if let Some(map) = map.as_ref() {
            map.kick(pc);
        }
    }
}

fn install_handler() -> Result<(), std::io::Error> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::SigAction(on_kick),
            nix::sys::signal::SaFlags::SA_SIGINFO | nix::sys::signal::SaFlags::SA_RESTART,
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler reads this thread's kick map and writes code
        // bytes and the block's budget; it takes no locks and allocates
        // nothing.
        unsafe { nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGURG, &action) }.map(|_| ()).map_err(|e| e as i32)
    });
    result.map_err(std::io::Error::from_raw_os_error)
}

/// What the vCPU and its kicker share.
struct Shared {
    origin: Instant,
    /// When to kick (ns since `origin`); `u64::MAX` for no deadline.
    deadline: AtomicU64,
    /// A kick was sent and not yet taken.
    pending: AtomicBool,
    /// Bumped by the vCPU as it enters compiled code and as it leaves: odd
    /// while it is in. The same odd value a while later means it stayed in
    /// one run of chained CCFs (only then is a kick needed: a vCPU passing
    /// through the dispatcher polls the clock and its events itself).
    runs: AtomicU64,
    stop: AtomicBool,
    sent: AtomicU64,
}

/// A thread that kicks the vCPU thread that started it (see the module).
pub struct Kicker {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Kicker {
    /// Starts kicking the calling thread.
    pub fn start() -> Result<Kicker, std::io::Error> {
        let shared = Arc::new(Shared {
            origin: Instant::now(),
            deadline: AtomicU64::new(u64::MAX),
            pending: AtomicBool::new(false),
            runs: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sent: AtomicU64::new(0),
        });
        // SAFETY: getpid and gettid have no preconditions.
        let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
        let s = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name("btvmm-kicker".into()).spawn(move || kick_loop(&s, pid, tid))?;
        Ok(Kicker { shared, thread: Some(thread) })
    }

    /// The next moment the dispatcher must look (host time), if any. A
    /// plain store: the kicker looks at it at least every [`KICK_LOOK`]
    /// (waking the kicker here, at every earlier deadline, cost the vCPU a
    /// system call on its hot path).
    pub fn set_deadline(&self, at: Option<Instant>) {
        let ns = at.map_or(u64::MAX, |t| t.saturating_duration_since(self.shared.origin).as_nanos() as u64);
        self.shared.deadline.store(ns, Ordering::Relaxed);
    }

    /// Whether a kick came since the last call (the dispatcher then polls).
    #[inline]
    pub fn take(&self) -> bool {
        self.shared.pending.load(Ordering::Relaxed) && self.shared.pending.swap(false, Ordering::Acquire)
    }

    /// The vCPU enters or leaves compiled code (it is the only writer).
    #[inline]
    pub fn enter_or_leave_ccf(&self) {
        let runs = &self.shared.runs;
        runs.store(runs.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
    }

    /// Kick signals sent so far.
    pub fn sent(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
    }
}

impl Drop for Kicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

fn kick_loop(s: &Shared, pid: libc::pid_t, tid: libc::pid_t) {
    // The kicker only ever runs on a CPU nothing else wants: woken on the
    // vCPU's core, it would preempt the vCPU for a few microseconds, which
    // a guest timing a loop sees (Linux's PIT calibration of the TSC gives
    // up on one iteration 10 times slower than the fastest).
    let idle = libc::sched_param { sched_priority: 0 };
    // SAFETY: changes only this thread's scheduling policy; a failure
    // leaves it as it was.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
    let ns = || s.origin.elapsed().as_nanos() as u64;
    let period = KICK_PERIOD.as_nanos() as u64;
    let mut last = ns();
    while !s.stop.load(Ordering::Relaxed) {
        let now = ns();
        let deadline = s.deadline.load(Ordering::Relaxed).min(last.saturating_add(period));
        if now < deadline {
            std::thread::park_timeout(Duration::from_nanos(deadline - now).min(KICK_LOOK));
            continue;
        }
        // Due. A vCPU that passes through the dispatcher meanwhile polls
        // by itself (and publishes its next deadline): no signal for it,
        // which would only stretch what the guest measures between two
        // port reads (Linux's PIT calibration of the TSC).
        let runs = s.runs.load(Ordering::Relaxed);
        std::thread::park_timeout(KICK_GRACE);
        if runs.is_multiple_of(2) || s.runs.load(Ordering::Relaxed) != runs {
            last = ns();
            continue;
        }
        s.pending.store(true, Ordering::Release);
        s.sent.fetch_add(1, Ordering::Relaxed);
        // SAFETY: tgkill sends a signal to one thread of this process, whose
        // handler is installed before the kicker starts.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, libc::SIGURG) };
        std::thread::park_timeout(KICK_RETRY);
        if !s.pending.load(Ordering::Relaxed) {
            last = ns();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urg_blocked() -> bool {
        // SAFETY: `now` is a valid place for the current mask; a null new
        // set only reads it.
        unsafe {
            let mut now: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut now);
            libc::sigismember(&now, libc::SIGURG) == 1
        }
    }

    /// While the kick map changes shape no kick can land in its handler
    /// (which walks the chunk list): SIGURG is held off, and let through
    /// again after.
    #[test]
    fn kicks_are_held_off_while_the_map_changes() {
        assert!(!urg_blocked());
        {
            let _held = KicksHeld::new();
            assert!(urg_blocked());
        }
        assert!(!urg_blocked());
        let mut budget = 0u64;
        let mut map = KickMap::new(&mut budget);
        let mut code = vec![0u8; 4096];
        map.sync(&[(code.as_ptr() as usize, code.len(), code.as_mut_ptr())]);
        assert!(!urg_blocked());
        assert_eq!(map.chunks.len(), 1);
    }
}
