//! The guest's clock: host monotonic time minus the host's stalls.
//!
//! The guest's TSC and its PIT both follow this clock, so they agree with
//! each other exactly. When the host deschedules the vCPU thread for a few
//! milliseconds (another process on the core, a noisy neighbour of the VM
//! this runs in), real hardware would call that an SMI, and Linux's TSC
//! calibration against the PIT gives up on SMIs. So the vCPU loop detects
//! such stalls -- far more host time passed than the guest instructions and
//! device work since its last look can account for -- and *steals* them:
//! guest time stops while the host was away, as it does for a VM whose vCPU
//! was preempted. Guest time then runs slightly behind the host's under
//! load; it never goes backwards, because only host time since the guest's
//! last look at the clock is ever hidden.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Host TSC ticks per nanosecond, as a 32.32 fixed-point number.
fn tsc_per_ns_q32() -> u64 {
    static RATE: OnceLock<u64> = OnceLock::new();
    *RATE.get_or_init(|| {
        // The shortest of a few 2 ms windows is the least disturbed one.
        let mut best: Option<(u64, u64)> = None;
        for _ in 0..3 {
            let (t0, c0) = (Instant::now(), host_tsc());
            std::thread::sleep(Duration::from_millis(2));
            let (c1, t1) = (host_tsc(), Instant::now());
            let ns = (t1 - t0).as_nanos() as u64;
            let cycles = c1.wrapping_sub(c0);
            // Keep the measurement whose cycles-per-ns is lowest: a preemption
            // between the paired reads inflates the host-time side less than
            // the cycle side only when it falls between them, which lowers the rate.
            if best.is_none_or(|(bn, bc)| (cycles as u128) * (bn as u128) > (bc as u128) * (ns as u128)) {
                best = Some((ns, cycles));
            }
        }
        let (ns, cycles) = best.unwrap_or((1, 1));
        (((cycles as u128) << 32) / ns.max(1) as u128) as u64
    })
}

fn host_tsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Host time hidden from the guest, shared by the vCPU and the devices.
#[derive(Debug)]
pub struct GuestClock {
    stolen_ns: AtomicU64,
    origin: Instant,
    /// When (host ns since `origin`) the guest last read the clock: time
    /// before that was seen by the guest and can no longer be hidden.
    observed_ns: AtomicU64,
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
        Self { stolen_ns: AtomicU64::new(0), origin: Instant::now(), observed_ns: AtomicU64::new(0) }
    }

    fn observe(&self, host_now: Instant) {
        let ns = host_now.saturating_duration_since(self.origin).as_nanos() as u64;
        self.observed_ns.fetch_max(ns, Ordering::Relaxed);
    }

    /// The host instant of the guest's latest look at the clock.
    pub fn last_observed(&self) -> Instant {
        self.origin + Duration::from_nanos(self.observed_ns.load(Ordering::Relaxed))
    }

    /// Host time taken from the guest so far.
    pub fn stolen(&self) -> Duration {
        Duration::from_nanos(self.stolen_ns.load(Ordering::Relaxed))
    }

    /// The guest's "now", as a host `Instant` shifted back by the stolen time.
    pub fn now(&self) -> Instant {
        let now = Instant::now();
        self.observe(now);
        now.checked_sub(self.stolen()).unwrap_or(now)
    }

    /// The host `Instant` at which the guest clock reads `guest`.
    pub fn to_host(&self, guest: Instant) -> Instant {
        guest + self.stolen()
    }

    /// The guest TSC before the guest's own offset (IA32_TSC writes).
    pub fn tsc(&self) -> u64 {
        self.observe(Instant::now());
        let stolen_cycles = ((self.stolen_ns.load(Ordering::Relaxed) as u128 * tsc_per_ns_q32() as u128) >> 32) as u64;
        host_tsc().wrapping_sub(stolen_cycles)
    }

    /// Hides `d` of host time from the guest.
    pub fn steal(&self, d: Duration) {
        self.stolen_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// Watches the vCPU's progress between looks at the clock and steals the
/// host time it cannot account for.
#[derive(Debug)]
pub struct StallDetector {
    last: Instant,
    instructions: u64,
    other_ns: u64,
}

/// A generous cost of one guest instruction, far above what the interpreter needs.
const NS_PER_INSTRUCTION: u64 = 100;
/// Gaps shorter than this are never treated as stalls.
const SLACK: Duration = Duration::from_micros(100);

impl StallDetector {
    /// `other_ns`: time measured in work that is not guest instructions
    /// (devices, decoding, native stubs), which never counts as a stall.
    pub fn new(instructions: u64, other_ns: u64) -> Self {
        Self { last: Instant::now(), instructions, other_ns }
    }

    /// Restarts the watch (after a halt, when host time passes legitimately).
    pub fn reset(&mut self, instructions: u64, other_ns: u64) {
        *self = Self::new(instructions, other_ns);
    }

    /// Looks at the clock; steals from `clock` what the work since the last
    /// look cannot explain.
    pub fn check(&mut self, clock: &GuestClock, instructions: u64, other_ns: u64) {
        let now = Instant::now();
        // Only time the guest has not seen yet can be hidden: its clock never
        // goes backwards.
        let elapsed = now.saturating_duration_since(self.last.max(clock.last_observed()));
        if elapsed > SLACK {
            let work = (instructions - self.instructions) * NS_PER_INSTRUCTION + (other_ns - self.other_ns);
            let explained = Duration::from_nanos(work) + SLACK;
            if elapsed > explained {
                tracing::debug!(target: "clock", ?elapsed, ?explained, instructions = instructions - self.instructions, "host stall hidden from the guest");
                clock.steal(elapsed - explained);
            }
        }
        *self = Self { last: now, instructions, other_ns };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_steal_moves_now_and_tsc_back() {
        let c = GuestClock::new();
        let (n0, t0) = (c.now(), c.tsc());
        c.steal(Duration::from_millis(50));
        let (n1, t1) = (c.now(), c.tsc());
        assert!(n1 < n0 + Duration::from_millis(10), "guest time went back by the stolen time");
        assert!(t1 < t0, "the TSC lost the stolen cycles");
        assert!(c.to_host(n1) >= n1 + Duration::from_millis(50));
    }

    #[test]
    fn stall_detector_steals_unexplained_time_only() {
        let c = GuestClock::new();
        let mut d = StallDetector::new(0, 0);
        std::thread::sleep(Duration::from_millis(20));
        // 20 ms with 10 instructions: a stall of about 20 ms.
        d.check(&c, 10, 0);
        let stolen = c.stolen();
        assert!(stolen >= Duration::from_millis(15) && stolen <= Duration::from_millis(40), "{stolen:?}");
        // 20 ms explained by 1M instructions (100 ms budget): nothing stolen.
        std::thread::sleep(Duration::from_millis(20));
        d.check(&c, 1_000_010, 0);
        assert_eq!(c.stolen(), stolen);
        // 20 ms spent in device work: nothing stolen either.
        std::thread::sleep(Duration::from_millis(20));
        d.check(&c, 1_000_010, 25_000_000);
        assert_eq!(c.stolen(), stolen);
    }

    #[test]
    fn stall_before_a_guest_read_is_not_hidden() {
        let c = GuestClock::new();
        let mut d = StallDetector::new(0, 0);
        std::thread::sleep(Duration::from_millis(20));
        let seen = c.tsc();
        d.check(&c, 10, 0);
        assert!(c.tsc() > seen, "the guest clock never goes back");
        assert!(c.stolen() < Duration::from_millis(1));
    }

    #[test]
    fn tsc_rate_is_plausible() {
        let r = tsc_per_ns_q32() as f64 / (1u64 << 32) as f64;
        assert!(r > 0.5 && r < 10.0, "{r} TSC ticks per ns");
    }
}
