//! Counters for `--stats`.

use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Default, Clone, Debug)]
pub struct Stats {
    pub instructions: u64,
    pub blocks_decoded: u64,
    pub code_invalidations: u64,
    pub exceptions: BTreeMap<u8, u64>,
    pub interrupts: BTreeMap<u8, u64>,
    /// `int n`, `int3`, `into`, `int1` by vector.
    pub software_interrupts: BTreeMap<u8, u64>,
    /// Instructions btvmm does not implement, by mnemonic: each raised #UD.
    pub unimplemented: BTreeMap<String, u64>,
    /// x87/SSE/AVX instructions run natively one at a time (see `simd`).
    pub simd_native: u64,
    pub halted_ns: u64,
    /// Time spent in device models (port I/O, MMIO, timer service), in
    /// host TSC cycles: a guest polling a port makes millions of accesses,
    /// and two reads of the host clock cost more than many a device model.
    pub device_cycles: u64,
    /// Time in VMM work whose length does not follow the guest's instruction
    /// count (decoding new blocks, compiling and running x87/SSE/AVX stubs):
    /// the guest clock's stall detection must not take it for a host stall.
    pub vmm_ns: u64,
    /// Host stalls hidden from the guest's clock (see `clock`), set at exit.
    pub stolen_ns: u64,
    /// Soft-TLB flushes and single-page invalidations (`invlpg`), set at exit.
    pub tlb_flushes: u64,
    pub tlb_page_invalidations: u64,
    /// Wall time of the runs, set by the machine.
    pub run_ns: u64,
}

impl Stats {
    pub fn count_exception(&mut self, vector: u8) {
        *self.exceptions.entry(vector).or_default() += 1;
    }

    pub fn count_interrupt(&mut self, vector: u8) {
        *self.interrupts.entry(vector).or_default() += 1;
    }

    pub fn count_software_interrupt(&mut self, vector: u8) {
        *self.software_interrupts.entry(vector).or_default() += 1;
    }

    pub fn count_unimplemented(&mut self, mnemonic: &str) {
        *self.unimplemented.entry(mnemonic.to_string()).or_default() += 1;
    }

    /// The report printed at exit, with the translator's counters if it ran.
    pub fn report(&self, bt: Option<&crate::bt::BtStats>) -> String {
        let mut s = String::new();
        match bt {
            None => {
                let _ = writeln!(s, "guest instructions executed: {}", self.instructions);
            }
            // Translated code counts no instructions.
            Some(_) => {
                let _ = writeln!(s, "guest instructions interpreted (callouts, untranslated code): {}", self.instructions);
            }
        }
        let _ = writeln!(s, "decoded blocks: {}  code-page invalidations: {}", self.blocks_decoded, self.code_invalidations);
        let _ = writeln!(
            s,
            "soft TLB: {} flushes, {} single-page invalidations",
            self.tlb_flushes, self.tlb_page_invalidations
        );
        // The binary translator's counters: TUs per bitness (as the VMware
        // papers report them), IDENT share, callouts by kind, code cache.
        match bt {
            None => {
                let _ = writeln!(s, "translation units: none (engine: interpreter)");
            }
            Some(b) => {
                let translated = b.ident + b.mem + b.control + b.sensitive;
                let share = |n: u64| if translated == 0 { 0.0 } else { 100.0 * n as f64 / translated as f64 };
                let _ = writeln!(
                    s,
                    "translation units: 16-bit {}, 32-bit {}, 64-bit {}; instructions IDENT {:.1}%, MEM {:.1}%, CONTROL {:.1}%, SENSITIVE {:.1}%",
                    b.tus[0], b.tus[1], b.tus[2], share(b.ident), share(b.mem), share(b.control), share(b.sensitive)
                );
                let _ = writeln!(
                    s,
                    "code cache: {} bytes compiled; lookups {} hits ({} in the IBTC), {} misses; {} evictions, {} flushes, {} TUs invalidated; {} chained, {} unchained; {} CCF entries",
                    b.code_bytes, b.lookups_hit, b.ibtc_hits, b.lookups_miss, b.evictions, b.flushes, b.invalidated, b.chained, b.unchained, b.entries
                );
                let [next, interpret, indirect, fault, host_fault] = b.exits;
                let _ = writeln!(
                    s,
                    "CCF exits: {next} to an unchained next TU, {interpret} to interpret an instruction, {indirect} on an IBTC miss, {fault} on a guest fault, {host_fault} on a host fault (a VMM bug); {} kicks ({} landed in a CCF)",
                    b.kicks, b.kicks_landed
                );
                let mut callouts: Vec<_> = b.callouts.iter().map(|(m, n)| (*n, format!("{m:?}").to_lowercase())).collect();
                callouts.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                let total: u64 = callouts.iter().map(|c| c.0).sum();
                let list: Vec<_> = callouts.iter().take(24).map(|(n, m)| format!("{m}:{n}")).collect();
                let _ = writeln!(s, "callouts: {total} ({})", list.join(" "));
            }
        }
        let _ = writeln!(s, "x87/SSE/AVX instructions executed natively: {}", self.simd_native);
        let device_ns = crate::clock::host_tsc_ns(self.device_cycles);
        let engine = self.run_ns.saturating_sub(self.halted_ns + device_ns);
        let _ = writeln!(
            s,
            "time: {:.3} s in all: engine {:.3} s, devices {:.3} s, halted {:.3} s",
            self.run_ns as f64 / 1e9,
            engine as f64 / 1e9,
            device_ns as f64 / 1e9,
            self.halted_ns as f64 / 1e9
        );
        let list = |m: &BTreeMap<u8, u64>| {
            m.iter().map(|(v, n)| format!("{v}:{n}")).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(s, "host time hidden from the guest clock (stalls, translating): {:.3} s", self.stolen_ns as f64 / 1e9);
        let _ = writeln!(s, "exceptions by vector: {}", list(&self.exceptions));
        let _ = writeln!(s, "interrupts by vector: {}", list(&self.interrupts));
        let _ = writeln!(s, "software interrupts by vector: {}", list(&self.software_interrupts));
        if !self.unimplemented.is_empty() {
            let u: Vec<_> = self.unimplemented.iter().map(|(k, v)| format!("{k}:{v}")).collect();
            let _ = writeln!(s, "unimplemented instructions (#UD): {}", u.join(" "));
        }
        s
    }
}
