//! Driving an executor under test against an oracle: an enumerated pass (every
//! menu entry, several operand/value draws each) and a random pass
//! (proptest sequences of up to `max_items` entries, shrunk on failure).

use std::cell::RefCell;
use std::collections::BTreeMap;

use iced_x86::Code;
use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};

use super::compare::{self, Case, Run};
use super::machine::*;
use super::rng::Rng;
use super::sequence::{self, Menu};

/// What to run.
pub struct Config {
    /// Seed of everything (enumerated draws, initial states, proptest).
    pub seed: u64,
    /// Draws per menu entry in the enumerated pass.
    pub variants: u32,
    /// Random sequences in the random pass.
    pub random_cases: u32,
    /// Longest random sequence, in menu entries.
    pub max_items: usize,
    /// Which generic forms to use.
    pub keep: fn(Code) -> bool,
    /// Whether to add compound items (strings, branches, calls, enter...).
    pub compounds: bool,
    /// Mismatch reports kept in the `Report`.
    pub max_reports: usize,
    /// Whether flags the SDM leaves undefined are compared too: on AMD
    /// hosts, whose values the interpreter gives (translated code runs
    /// most instructions natively and hands one to the interpreter when
    /// its access misses the TLB, so the two must agree in every flag).
    pub all_flags: bool,
}

impl Config {
    /// The whole user-level integer ISA. For longer hunts, `DIFFTEST_SEED`
    /// overrides the seed, `DIFFTEST_CASES` the number of random sequences
    /// and `DIFFTEST_ITEMS` their longest length (sequences longer than a
    /// translation unit's 12 instructions run through several),
    /// `DIFFTEST_REPORTS` how many mismatches are printed, and
    /// `DIFFTEST_ALL_FLAGS` (0 or 1) whether undefined flags are compared.
    pub fn full() -> Config {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
            std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
        }
        Config {
            seed: var("DIFFTEST_SEED", 0x6274_766d),
            variants: 40,
            random_cases: var("DIFFTEST_CASES", 8000),
            max_items: var("DIFFTEST_ITEMS", 12),
            keep: |_| true,
            compounds: true,
            max_reports: var("DIFFTEST_REPORTS", 5),
            all_flags: var::<u8>("DIFFTEST_ALL_FLAGS", host_is_amd() as u8) != 0,
        }
    }
}

fn host_is_amd() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains("AuthenticAMD"))
}

/// Counters and the first mismatch reports.
#[derive(Default, Debug)]
pub struct Report {
    pub sequences: u64,
    /// Statically counted instructions of sequences both sides ran.
    pub instructions: u64,
    pub mismatches: u64,
    /// Executor errors (not guest events), counted as failures too.
    pub errors: u64,
    /// Faults the oracle raised, by vector.
    pub faults: BTreeMap<u8, u64>,
    pub reports: Vec<String>,
    /// Distinct mnemonics seen in executed sequences.
    pub mnemonics: BTreeMap<String, u64>,
}

impl Report {
    pub fn summary(&self) -> String {
        let faults: Vec<String> =
            self.faults.iter().map(|(v, n)| format!("{}x{n}", compare::vector_name(*v))).collect();
        format!(
            "differential: {} instructions executed in {} sequences ({} mnemonics), {} mismatches, {} executor errors; faults: {}",
            self.instructions,
            self.sequences,
            self.mnemonics.len(),
            self.mismatches,
            self.errors,
            faults.join(" ")
        )
    }
}

/// Runs the enumerated and random passes of `cfg`, `exec` against `oracle`
/// (normally the `NativeExecutor`).
pub fn run_differential(exec: &mut dyn Executor, oracle: &mut dyn Executor, cfg: &Config) -> Report {
    let menu = Menu::new(&cfg.keep, cfg.compounds);
    let mut report = Report::default();
    enumerated(exec, oracle, &menu, cfg, &mut report);
    random(exec, oracle, &menu, cfg, &mut report);
    report
}

fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut r = Rng::new(a ^ b.rotate_left(21) ^ c.rotate_left(42));
    r.next()
}

fn enumerated(exec: &mut dyn Executor, oracle: &mut dyn Executor, menu: &Menu, cfg: &Config, report: &mut Report) {
    for idx in 0..menu.entries.len() {
        for v in 0..cfg.variants as u64 {
            let seed = mix(cfg.seed, idx as u64, v);
            let Ok(code) = sequence::build(menu, &[(idx, seed)]) else { continue };
            let case = initial_case(code, seed);
            if let Err(text) = check(exec, oracle, &case, cfg.all_flags, report) {
                report.mismatches += 1;
                if report.reports.len() < cfg.max_reports {
                    report.reports.push(text);
                }
            }
        }
    }
}

/// A case: the code, registers at interesting values (rsp, r14, r15 at their
/// fixed roles), random flags and window bytes.
pub fn initial_case(code: Vec<u8>, seed: u64) -> Case {
    let mut rng = Rng::new(seed ^ 0xa5a5_5a5a);
    let mut gpr = [0u64; 16];
    for g in gpr.iter_mut() {
        *g = rng.value();
    }
    gpr[RSP] = STACK_TOP;
    gpr[R14] = 16 * rng.below(5);
    gpr[R15] = DATA_BASE;
    let rflags = rng.next() & rflags::COMPARED;
    let window: Vec<u8> = (0..WINDOW_SIZE / 8).flat_map(|_| rng.next().to_le_bytes()).collect();
    Case { code, init: MachineState { gpr, rflags }, window }
}

fn run_one(e: &mut dyn Executor, case: &Case) -> Result<Run, String> {
    let mut window = case.window.clone();
    e.run(&case.code, CODE_ADDR, &case.init, &mut window)
        .map(|outcome| Run { outcome, window })
        .map_err(|err| format!("{} failed: {err}", e.name()))
}

/// Runs one case on both; Err(report text) on a mismatch or executor error.
fn check(exec: &mut dyn Executor, oracle: &mut dyn Executor, case: &Case, all_flags: bool, report: &mut Report) -> Result<(), String> {
    report.sequences += 1;
    let expected = run_one(oracle, case);
    let actual = run_one(exec, case);
    let (expected, actual) = match (expected, actual) {
        (Ok(e), Ok(a)) => (e, a),
        (e, a) => {
            report.errors += 1;
            let why = [e.err(), a.err()].into_iter().flatten().collect::<Vec<_>>().join("; ");
            return Err(format!("{why}\nsequence:\n{}", compare::disassemble(&case.code)));
        }
    };
    let instrs = compare::decode(&case.code);
    report.instructions += compare::executed(&instrs, &expected.outcome);
    for i in &instrs {
        *report.mnemonics.entry(format!("{:?}", i.mnemonic())).or_default() += 1;
    }
    if let Outcome::Fault { vector, .. } = expected.outcome {
        *report.faults.entry(vector).or_default() += 1;
    }
    let diffs = compare::diff(case, &expected, &actual, all_flags);
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(compare::render(case, oracle.name(), exec.name(), &expected, &actual, &diffs))
    }
}

struct Shared<'a> {
    exec: &'a mut dyn Executor,
    oracle: &'a mut dyn Executor,
    report: &'a mut Report,
    /// Set at the first failure: later calls are proptest shrinking, not counted.
    failed: bool,
}

fn random(exec: &mut dyn Executor, oracle: &mut dyn Executor, menu: &Menu, cfg: &Config, report: &mut Report) {
    if cfg.random_cases == 0 {
        return;
    }
    let pt = PtConfig { cases: cfg.random_cases, failure_persistence: None, max_shrink_iters: 4096, ..PtConfig::default() };
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&cfg.seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(pt, TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes));
    let strategy = (
        prop::collection::vec((0..menu.entries.len(), any::<u64>()), 1..=cfg.max_items),
        any::<u64>(),
    );
    let shared = RefCell::new(Shared { exec, oracle, report, failed: false });
    let result = runner.run(&strategy, |(items, state_seed)| {
        let mut s = shared.borrow_mut();
        let Ok(code) = sequence::build(menu, &items) else { return Ok(()) };
        let case = initial_case(code, state_seed);
        let mut scratch = Report::default();
        let counting = !s.failed;
        let Shared { exec, oracle, report, .. } = &mut *s;
        let target = if counting { &mut **report } else { &mut scratch };
        let outcome = check(&mut **exec, &mut **oracle, &case, cfg.all_flags, target);
        if outcome.is_err() {
            s.failed = true;
        }
        outcome.map_err(TestCaseError::fail)
    });
    let s = shared.into_inner();
    if let Err(TestError::Fail(reason, (items, state_seed))) = result {
        s.report.mismatches += 1;
        let shrunk = format!("random sequence (after shrinking; items {items:?}, state seed {state_seed:#x}):\n{reason}");
        // Always kept: the shrunk case is the most readable report of all.
        s.report.reports.push(shrunk);
    }
}
