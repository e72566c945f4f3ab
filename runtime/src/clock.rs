//! The guest's clock: host monotonic time minus the host's stalls and the VMM's own work.
//!
//! The guest's TSC and its PIT both follow this clock, so they agree with
//! each other exactly. When the host deschedules the vCPU thread for a few
//! milliseconds (another process on the core, a noisy neighbour of the VM
//! this runs in), real hardware would call that an SMI, and Linux's TSC
//! calibration against the PIT gives up on SMIs. So every read of the clock
//! first compares the wall time since the previous read with the vCPU
//! thread's CPU time over the same span, and *steals* the difference: guest
//! time stops while the host was away, as it does for a VM whose vCPU was
//! preempted. The VMM's own work (decoding and translating guest code, the
//! look at the CPU-time clock itself) is hidden the same way: a guest timing
//! a loop that runs for the first time must not see its translation. Guest
//! time then runs slightly behind the host's; it never goes backwards,
//! because only host time after the latest read is ever hidden.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Host TSC ticks per nanosecond, as a 32.32 fixed-point number.
fn tsc_per_ns_q32() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        let origin = Instant::now();
        measure_tsc_rate_q32(
            || origin.elapsed().as_nanos() as u64,
            host_tsc,
            || std::thread::sleep(Duration::from_millis(RATE_WINDOW_MS)),
        )
    })
}

/// How long the rate measurement waits between its two clock samples.
const RATE_WINDOW_MS: u64 = 10;
/// Host-time samples taken at each end; the tightest one is kept.
const RATE_TRIES: usize = 8;

/// The TSC rate from two (host ns, TSC) samples `wait()` apart. Each
/// sample brackets the host-time read between two TSC reads and keeps
/// the tightest of a few tries, so a preemption inside a sample (which
/// would skew the rate by the length of the preemption) is thrown away
/// rather than measured. The rate is then exact to a few ppm: the guest
/// converts stolen host time to TSC cycles with it, and any error there
/// shows up as the guest TSC and PIT drifting apart.
fn measure_tsc_rate_q32(mut now_ns: impl FnMut() -> u64, mut tsc: impl FnMut() -> u64, mut wait: impl FnMut()) -> u64 {
    let mut sample = || {
        let mut best: Option<(u64, u64, u64)> = None; // (bracket width, ns, tsc)
        for _ in 0..RATE_TRIES {
            let before = tsc();
            let ns = now_ns();
            let after = tsc();
            let width = after.wrapping_sub(before);
            if best.is_none_or(|(w, _, _)| width < w) {
                best = Some((width, ns, before.wrapping_add(width / 2)));
            }
        }
        best.map_or((0, 0), |(_, ns, cycles)| (ns, cycles))
    };
    let (ns0, c0) = sample();
    wait();
    let (ns1, c1) = sample();
    let ns = ns1.saturating_sub(ns0).max(1);
    (((c1.wrapping_sub(c0) as u128) << 32) / ns as u128) as u64
}

/// Host nanoseconds in `cycles` of the host TSC (at its measured rate).
pub fn host_tsc_ns(cycles: u64) -> u64 {
    (((cycles as u128) << 32) / u128::from(tsc_per_ns_q32().max(1))) as u64
}

/// The host's time stamp counter.
#[inline]
pub fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// The guest's clock, shared by the vCPU and the devices.
#[derive(Debug)]
pub struct GuestClock {
    stolen_ns: AtomicU64,
    origin: Instant,
    /// When (host ns since `origin`) the clock was last read: time before
    /// that may have been seen by the guest and can no longer be hidden.
    observed_ns: AtomicU64,
    /// `stolen_ns` as of that read: what was hidden since then came out of
    /// the time the guest has not seen.
    stolen_at_look: AtomicU64,
    /// The vCPU thread's CPU time, watched for stalls.
    watch: Mutex<Option<Watch>>,
    /// The last TSC value read (see [`Self::tsc`]).
    last_tsc: AtomicU64,
}

/// Where the stall watch last looked.
#[derive(Debug)]
struct Watch {
    /// The vCPU thread's CPU-time clock.
    cpu_clock: libc::clockid_t,
    last: Instant,
    cpu_ns: u64,
    /// How often the CPU-time clock was read.
    looks: u64,
    /// What the last look cost, hidden at the next read (it falls after
    /// the read it served).
    owed: Duration,
}

/// Gaps between two reads shorter than this are not examined: no stall
/// worth hiding fits in them, and looking costs a system call.
const QUIET: Duration = Duration::from_micros(20);
/// Off-CPU time shorter than this stays visible (the measurement's own cost).
const SLACK: Duration = Duration::from_micros(10);
/// A vCPU that looks at a due deadline later than this after it (and
/// after the guest's last look at the clock) was kept from checking it:
/// the rest is hidden.
const LATE: Duration = Duration::from_millis(1);

fn cpu_time_ns(clock: libc::clockid_t) -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write; a bad clock id only makes
    // the call fail, which leaves `t` at zero.
    unsafe { libc::clock_gettime(clock, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Default for GuestClock {
    fn default() -> Self {
        Self::new()
    }
}

impl GuestClock {
    /// A clock with nothing stolen yet. The first one in a process measures
    /// the host TSC rate (a few milliseconds), before any guest runs.
    pub fn new() -> Self {
        tsc_per_ns_q32();
        Self {
            stolen_ns: AtomicU64::new(0),
            origin: Instant::now(),
            observed_ns: AtomicU64::new(0),
            stolen_at_look: AtomicU64::new(0),
            watch: Mutex::new(None),
            last_tsc: AtomicU64::new(0),
        }
    }

    /// Starts watching the calling thread (the vCPU) for stalls: from now
    /// on, wall time it spends off the CPU between two reads of the clock is
    /// hidden from the guest, as time a VM's vCPU was preempted is.
    pub fn watch_current_thread(&self) {
        let mut cpu_clock: libc::clockid_t = 0;
        // SAFETY: pthread_self() is the calling, live thread and `cpu_clock`
        // is a valid place for the result.
        let ok = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut cpu_clock) } == 0;
        let watch = ok.then(|| Watch { cpu_clock, last: Instant::now(), cpu_ns: cpu_time_ns(cpu_clock), looks: 0, owed: Duration::ZERO });
        *self.lock_watch() = watch;
    }

    /// The vCPU was off the CPU legitimately (halted, paused) until now:
    /// restart the watch without hiding that time.
    pub fn rested(&self) {
        if let Some(w) = self.lock_watch().as_mut() {
            w.last = Instant::now();
            w.cpu_ns = cpu_time_ns(w.cpu_clock);
        }
    }

    fn lock_watch(&self) -> std::sync::MutexGuard<'_, Option<Watch>> {
        self.watch.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the host clock for the guest: first hides the vCPU's time off
    /// the CPU since the last read (none of which the guest has seen), then
    /// marks this instant as seen. Every guest-visible read goes through
    /// here, so no stall can fall between a check and the read it guards.
    fn read(&self) -> Instant {
        self.read_due(None)
    }

    /// [`Self::read`], for the vCPU checking whether `deadline` (guest
    /// time) has come: time past the deadline that the guest has not seen
    /// (since the later of the deadline and its last look at the clock),
    /// beyond [`LATE`], is hidden. The vCPU was kept from checking: a
    /// stall the CPU-time clock cannot see (a hypervisor's), a host that
    /// woke it late from a halt, or a kick that came late while compiled
    /// code kept running (whose extra run is then hidden too). So the timer
    /// fires at most `LATE` behind and no run of missed periodic ticks
    /// piles up: ticks delivered in a burst leave the guest's jiffies
    /// behind its TSC for a while, and Linux's clocksource watchdog then
    /// calls the TSC unstable.
    fn read_due(&self, deadline: Option<Instant>) -> Instant {
        let now = Instant::now();
        // Host time since the guest last saw the clock, left to hide.
        let mut unseen = self.unseen(now);
        let mut looked = false;
        if let Some(w) = self.lock_watch().as_mut() {
            // Only time after the latest read can be hidden: the guest's
            // clock never goes backwards.
            let mut unseen_here = now.saturating_duration_since(w.last).min(unseen);
            // The previous look's own cost first (the VMM's work).
            let owed = std::mem::take(&mut w.owed).min(unseen_here);
            self.steal(owed);
            unseen_here -= owed;
            unseen = unseen.saturating_sub(owed);
            // A stall leaves a gap between two reads: reads close together
            // (a guest polling a port) have none to look for. Looking costs
            // a system call, 7 to 15 us on a VM host; looked at every 20 us
            // of such polling, that made i386 Linux's PIT calibration of the
            // TSC see iterations too slow and give up.
            if now.saturating_duration_since(self.last_observed()) >= QUIET {
                looked = true;
                w.looks += 1;
                let cpu = cpu_time_ns(w.cpu_clock);
                let wall = now.saturating_duration_since(w.last);
                let ran = Duration::from_nanos(cpu.saturating_sub(w.cpu_ns));
                let hide = wall.saturating_sub(ran + owed + SLACK).min(unseen_here);
                if !hide.is_zero() {
                    tracing::debug!(target: "clock", ?wall, ?ran, ?hide, "host stall hidden from the guest");
                    self.steal(hide);
                    unseen = unseen.saturating_sub(hide);
                }
                w.last = now;
                w.cpu_ns = cpu;
                w.owed = now.elapsed();
            }
        }
        if let Some(deadline) = deadline {
            let guest = now.checked_sub(self.stolen()).unwrap_or(now);
            let late = guest.saturating_duration_since(deadline).min(unseen).saturating_sub(LATE);
            if !late.is_zero() {
                tracing::debug!(target: "clock", ?late, "late look at a deadline hidden from the guest");
                self.steal(late);
            }
        }
        // The guest sees the clock as of when this returns (its TSC is read
        // after it): after a look, that is past the look's cost, which the
        // next read then cannot hide.
        let seen = if looked { Instant::now() } else { now };
        let ns = seen.saturating_duration_since(self.origin).as_nanos() as u64;
        self.observed_ns.fetch_max(ns, Ordering::Relaxed);
        self.stolen_at_look.store(self.stolen_ns.load(Ordering::Relaxed), Ordering::Relaxed);
        now
    }

    /// Host time up to `now` that the guest has not seen and that is not
    /// hidden yet: since its last look, less what was hidden since.
    fn unseen(&self, now: Instant) -> Duration {
        let hidden = self.stolen_ns.load(Ordering::Relaxed).saturating_sub(self.stolen_at_look.load(Ordering::Relaxed));
        now.saturating_duration_since(self.last_observed()).saturating_sub(Duration::from_nanos(hidden))
    }

    fn last_observed(&self) -> Instant {
        self.origin + Duration::from_nanos(self.observed_ns.load(Ordering::Relaxed))
    }

    /// Host time taken from the guest so far.
    pub fn stolen(&self) -> Duration {
        Duration::from_nanos(self.stolen_ns.load(Ordering::Relaxed))
    }

    /// The guest's "now", as a host `Instant` shifted back by the stolen time.
    pub fn now(&self) -> Instant {
        let now = self.read();
        now.checked_sub(self.stolen()).unwrap_or(now)
    }

    /// The guest's "now", read by the vCPU to see whether `deadline` has
    /// come: a look that comes late is not shown to the guest (see
    /// [`Self::read_due`]).
    pub fn now_due(&self, deadline: Option<Instant>) -> Instant {
        let now = self.read_due(deadline);
        now.checked_sub(self.stolen()).unwrap_or(now)
    }

    /// The host `Instant` at which the guest clock reads `guest`.
    pub fn to_host(&self, guest: Instant) -> Instant {
        guest + self.stolen()
    }

    /// The host TSC value at which the guest clock reads `guest`, if no
    /// more host time is hidden from the guest before then: comparing it
    /// with [`host_tsc`] tells whether a deadline may have come for the
    /// price of one instruction.
    pub fn host_tsc_at(&self, guest: Instant) -> u64 {
        let ahead = self.to_host(guest).saturating_duration_since(Instant::now());
        let cycles = (ahead.as_nanos() * u128::from(tsc_per_ns_q32())) >> 32;
        host_tsc().saturating_add(u64::try_from(cycles).unwrap_or(u64::MAX))
    }

    /// The guest TSC before the guest's own offset (IA32_TSC writes).
    pub fn tsc(&self) -> u64 {
        self.read();
        let stolen_cycles = ((self.stolen_ns.load(Ordering::Relaxed) as u128 * tsc_per_ns_q32() as u128) >> 32) as u64;
        let t = host_tsc().wrapping_sub(stolen_cycles);
        // Hidden time is counted in host nanoseconds and the TSC read a
        // moment after the host clock: what rounding leaves, a few cycles
        // back, is made up, so every read is past the one before.
        let t = t.max(self.last_tsc.load(Ordering::Relaxed) + 1);
        self.last_tsc.store(t, Ordering::Relaxed);
        t
    }

    /// Hides the last `d` of host time, spent on the VMM's own work (such
    /// as translating guest code), as far as the guest has not seen it:
    /// its clock never goes backwards.
    pub fn hide(&self, d: Duration) {
        self.steal(d.min(self.unseen(Instant::now())));
    }

    /// Hides `d` of host time from the guest.
    pub fn steal(&self, d: Duration) {
        self.stolen_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TSC cycles back to nanoseconds: the inverse of the measured rate.
    #[test]
    fn host_tsc_ns_inverts_the_rate() {
        let second = (u128::from(tsc_per_ns_q32()) * 1_000_000_000) >> 32;
        let ns = host_tsc_ns(second as u64);
        assert!(ns.abs_diff(1_000_000_000) <= 1, "1 s of cycles read as {ns} ns");
        assert_eq!(host_tsc_ns(0), 0);
    }

    /// Stolen time moves the guest's clock back; its TSC, which never goes
    /// back, stands just past its last value until host time catches up.
    #[test]
    fn clock_steal_moves_now_back_and_holds_the_tsc() {
        let c = GuestClock::new();
        let (n0, t0) = (c.now(), c.tsc());
        c.steal(Duration::from_millis(50));
        let (n1, t1, t2) = (c.now(), c.tsc(), c.tsc());
        assert!(n1 < n0 + Duration::from_millis(10), "guest time went back by the stolen time");
        assert_eq!((t1, t2), (t0 + 1, t0 + 2), "the TSC lost the stolen cycles, and goes on from where it was");
        assert!(c.to_host(n1) >= n1 + Duration::from_millis(50));
    }

    /// Works on the CPU for `d` of this thread's CPU time (however long
    /// the host keeps it waiting meanwhile: other tests run in parallel).
    fn spin(d: Duration) {
        let start = cpu_time_ns(libc::CLOCK_THREAD_CPUTIME_ID);
        while cpu_time_ns(libc::CLOCK_THREAD_CPUTIME_ID) - start < d.as_nanos() as u64 {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn off_cpu_time_between_reads_is_hidden() {
        let c = GuestClock::new();
        c.watch_current_thread();
        let t0 = c.now();
        // 20 ms asleep: off the CPU, a stall of about 20 ms.
        std::thread::sleep(Duration::from_millis(20));
        let t1 = c.now();
        let stolen = c.stolen();
        assert!(stolen >= Duration::from_millis(15) && stolen <= Duration::from_millis(40), "{stolen:?}");
        assert!(t1 - t0 < Duration::from_millis(5), "the guest saw {:?} pass", t1 - t0);
        // 20 ms of work on the CPU: visible, nothing (beyond what a busy
        // host takes from this thread) is stolen.
        spin(Duration::from_millis(20));
        let t2 = c.now();
        assert!(t2 - t1 >= Duration::from_millis(10), "the guest saw only {:?} of work", t2 - t1);
        // A rest (a halt) is not a stall.
        std::thread::sleep(Duration::from_millis(20));
        c.rested();
        let before = c.stolen();
        let t3 = c.now();
        // (A preemption right between the two reads may be hidden: a few
        // microseconds, not the 20 ms rest.)
        assert!(c.stolen() - before < Duration::from_millis(2), "the rest was hidden: {:?}", c.stolen() - before);
        assert!(t3 - t2 >= Duration::from_millis(20));
    }

    /// A vCPU kept from looking at its deadline (here by work the stall
    /// watch does not see) finds the timer due at most `LATE` behind: a
    /// periodic timer does not fall several periods behind at once.
    #[test]
    fn a_late_look_at_a_deadline_is_hidden() {
        let c = GuestClock::new();
        let deadline = c.now() + Duration::from_millis(2);
        spin(Duration::from_millis(30));
        let t = c.now_due(Some(deadline));
        assert!(t >= deadline, "the deadline has come");
        assert!(t - deadline <= LATE + Duration::from_millis(1), "the guest saw {:?} of lateness", t - deadline);
        assert!(c.stolen() >= Duration::from_millis(20), "{:?}", c.stolen());
        // A look before the deadline hides nothing.
        let before = c.stolen();
        let t = c.now_due(Some(c.now() + Duration::from_secs(1)));
        assert_eq!(c.stolen(), before);
        assert!(t >= deadline);
    }

    /// What the guest saw after a deadline stays seen: only the time since
    /// its last look can be hidden, and its clock never goes backwards.
    #[test]
    fn a_late_look_hides_only_what_the_guest_has_not_seen() {
        let c = GuestClock::new();
        let deadline = c.now() + Duration::from_millis(1);
        spin(Duration::from_millis(15));
        let seen = c.now();
        spin(Duration::from_millis(15));
        let t = c.now_due(Some(deadline));
        assert!(t >= seen, "the clock went back");
        assert!(t - seen <= LATE + Duration::from_millis(1), "{:?}", t - seen);
        assert!(seen - deadline >= Duration::from_millis(10), "the seen lateness stays: {:?}", seen - deadline);
    }

    /// Hiding is bounded by what the guest has not seen, less what was
    /// hidden already: two hides (translation work, then a late look at a
    /// deadline) of the same unseen stretch take it once, and the clock
    /// never goes back.
    #[test]
    fn hides_of_one_unseen_stretch_take_it_once() {
        let c = GuestClock::new();
        let t0 = c.now();
        spin(Duration::from_millis(10));
        c.hide(Duration::from_secs(1));
        c.hide(Duration::from_secs(1));
        let t1 = c.now_due(Some(t0));
        assert!(t1 >= t0, "the clock went back by {:?}", t0 - t1);
        let t2 = c.now();
        spin(Duration::from_millis(10));
        c.hide(Duration::from_secs(1));
        let t3 = c.now_due(Some(t2));
        assert!(t3 >= t2, "the clock went back by {:?}", t2 - t3);
    }

    /// Reads in quick succession    /// Reads in quick succession (a guest polling the PIT) never pay for a
    /// look at the CPU-time clock: they leave no gap a stall could hide in.
    #[test]
    fn reads_close_together_do_not_look_for_stalls() {
        let c = GuestClock::new();
        c.watch_current_thread();
        c.now();
        let start = Instant::now();
        let (mut reads, mut gaps, mut last) = (0, 0, Instant::now());
        while start.elapsed() < Duration::from_millis(5) {
            c.now();
            // Gaps the host's preemptions (parallel tests) put between two
            // reads may each cost a look; counted generously.
            let t = Instant::now();
            gaps += (t - last >= QUIET / 2) as u64;
            last = t;
            reads += 1;
        }
        let looks = c.lock_watch().as_ref().map_or(0, |w| w.looks);
        assert!(looks <= gaps + 1, "{looks} looks in {reads} reads over 5 ms, with {gaps} gaps");
    }

    /// The VMM's own work since the guest last looked is hidden; what the
    /// guest already saw is not (its clock never goes backwards).
    #[test]
    fn vmm_work_is_hidden_up_to_the_last_read() {
        let c = GuestClock::new();
        let t0 = c.now();
        // The work's wall time, however long other tests keep this thread
        // off the CPU meanwhile (hiding 20 ms for 20 ms of CPU time failed
        // on a busy host).
        let start = Instant::now();
        spin(Duration::from_millis(20));
        c.hide(start.elapsed());
        let t1 = c.now();
        assert!(t1 - t0 < Duration::from_millis(5), "the guest saw {:?} of VMM work", t1 - t0);
        spin(Duration::from_millis(2));
        c.hide(Duration::from_secs(1));
        let t2 = c.now();
        assert!(t2 >= t1, "the clock went back");
    }

    /// A read that looks at the CPU-time clock (a system call) reads the
    /// TSC after it: the guest has seen the look's cost, so the next read
    /// must not hide it. (It did, as the VMM's work: two reads right after
    /// a look went back by the look's cost, and the sysinstr kernel's
    /// "rdtsc monotonic" check failed now and then.)
    #[test]
    fn the_tsc_never_goes_back_after_a_look() {
        let c = GuestClock::new();
        c.watch_current_thread();
        for _ in 0..500 {
            spin(QUIET + Duration::from_micros(5)); // the next read looks
            let t0 = c.tsc();
            let t1 = c.tsc();
            assert!(t1 >= t0, "the TSC went back by {} cycles", t0 - t1);
        }
    }

    #[test]
    fn unwatched_clock_hides_nothing() {
        let c = GuestClock::new();
        c.now();
        std::thread::sleep(Duration::from_millis(20));
        c.tsc();
        assert_eq!(c.stolen(), Duration::ZERO);
    }

    /// A preemption between the host-time read and the TSC read of one
    /// sample must not skew the rate. (The first version paired one
    /// `Instant` with one TSC read and kept the *lowest* rate of three
    /// tries, which is exactly the preempted one; the guest's TSC then ran
    /// 1.5 % fast against its PIT after a stall was stolen.)
    #[test]
    fn tsc_rate_ignores_a_preempted_sample() {
        use std::cell::Cell;
        // A host at 2 ticks per ns; reads cost 10 ns. The first TSC read
        // after the first host-time read is 3 ms late: preempted.
        let t = Cell::new(1_000_000u64);
        let reads = Cell::new(0u32);
        let now_ns = || {
            t.set(t.get() + 10);
            t.get()
        };
        let tsc = || {
            reads.set(reads.get() + 1);
            if reads.get() == 2 {
                t.set(t.get() + 3_000_000);
            }
            t.set(t.get() + 10);
            2 * t.get()
        };
        let wait = || t.set(t.get() + 10_000_000);
        let rate = measure_tsc_rate_q32(now_ns, tsc, wait) as f64 / (1u64 << 32) as f64;
        assert!((rate - 2.0).abs() < 2.0 * 1e-5, "measured {rate} ticks per ns, the host has 2");
    }

    #[test]
    fn tsc_rate_is_plausible() {
        let r = tsc_per_ns_q32() as f64 / (1u64 << 32) as f64;
        assert!(r > 0.5 && r < 10.0, "{r} TSC ticks per ns");
    }
}
