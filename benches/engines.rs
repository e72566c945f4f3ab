//! The binary translator against the interpreter, on the same guests.
//!
//! - `cpu32`/`cpu64`: the CPU test kernel's workload (sieve, CRC32, heapsort,
//!   rep stos/movs) in ring 0 with paging on;
//! - `callouts32`/`callouts64`: a loop of cli/sti/pushf/popf/in/out, every one
//!   of which the translator hands to the runtime.
//!
//! Throughput is guest instructions per second: the interpreter counts the
//! instructions of one run, and the translator runs the very same guest work
//! (it does not count instructions itself). `translate` is the cost of
//! compiling one TU, over every TU start in the cpu kernels' code. Before
//! criterion's samples, one timed run of each engine prints the BT/interp
//! speed ratio measured side by side.

use std::time::Instant;

use btvmm::cli::{Engine, RunArgs};
use btvmm::machine::{Console, Machine};
use btvmm_translator::translate::{translate, Mode, Outcome};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn args(kernel: &str, iterations: u32, engine: Engine) -> RunArgs {
    RunArgs {
        multiboot: Some(kernel.into()),
        kernel: None,
        initrd: None,
        append: format!("iterations={iterations}"),
        memory: 128 << 20,
        boot_entry: None,
        fast_boot: false,
        engine,
        code_cache: 64 << 20,
        trace: None,
        stats: false,
        profile: false,
    }
}

/// Boots the kernel once; returns the guest instructions the interpreter
/// counted (translated code counts none).
fn run_once(kernel: &str, iterations: u32, engine: Engine) -> u64 {
    let console = Console { output: Box::new(std::io::sink()), stdin: false };
    let mut m = Machine::build_with(&args(kernel, iterations, engine), console).expect("build machine");
    let status = m.run().expect("run");
    assert_eq!(status, 33, "{kernel} did not pass");
    m.vcpu().stats.instructions
}

const WORKLOADS: [(&str, &str, u32); 4] = [
    ("cpu32", env!("BTVMM_KERNEL_CPU"), 10),
    ("cpu64", env!("BTVMM_KERNEL_CPU64"), 10),
    ("callouts32", env!("BTVMM_KERNEL_CALLOUTS"), 100_000),
    ("callouts64", env!("BTVMM_KERNEL_CALLOUTS64"), 100_000),
];

fn bench_engines(c: &mut Criterion) {
    for (name, kernel, iterations) in WORKLOADS {
        let instructions = run_once(kernel, iterations, Engine::Interp);
        let timed = |engine| {
            let t = Instant::now();
            run_once(kernel, iterations, engine);
            t.elapsed().as_secs_f64()
        };
        let (interp, bt) = (timed(Engine::Interp), timed(Engine::Bt));
        println!(
            "{name}: {instructions} guest instructions; interp {:.1} M/s, bt {:.1} M/s: bt/interp {:.1}x (one run each)",
            instructions as f64 / interp / 1e6,
            instructions as f64 / bt / 1e6,
            interp / bt
        );
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        group.throughput(Throughput::Elements(instructions));
        group.bench_function("interp", |b| b.iter(|| run_once(kernel, iterations, Engine::Interp)));
        group.bench_function("bt", |b| b.iter(|| run_once(kernel, iterations, Engine::Bt)));
        group.finish();
    }
}

/// Every TU start of a kernel's first loadable segment: each instruction
/// boundary a linear decode finds.
fn tu_starts(kernel: &str, bits: u32) -> (Vec<u8>, u64, Vec<u64>) {
    let elf = std::fs::read(kernel).expect("kernel");
    // ELF32 program header 0 (the kernels are ELF32 even when 64-bit).
    let phoff = u32::from_le_bytes(elf[28..32].try_into().unwrap()) as usize;
    let off = u32::from_le_bytes(elf[phoff + 4..phoff + 8].try_into().unwrap()) as usize;
    let vaddr = u32::from_le_bytes(elf[phoff + 8..phoff + 12].try_into().unwrap()) as u64;
    let filesz = u32::from_le_bytes(elf[phoff + 16..phoff + 20].try_into().unwrap()) as usize;
    let text = elf[off..off + filesz].to_vec();
    let mut d = iced_x86::Decoder::with_ip(bits, &text, vaddr, iced_x86::DecoderOptions::NONE);
    let starts = d.iter().map(|i| i.ip()).collect();
    (text, vaddr, starts)
}

fn bench_translate(c: &mut Criterion) {
    let mut group = c.benchmark_group("translate");
    for (name, kernel, bits) in [("cpu32", env!("BTVMM_KERNEL_CPU"), 32), ("cpu64", env!("BTVMM_KERNEL_CPU64"), 64)] {
        let (text, base, starts) = tu_starts(kernel, bits);
        let mode = Mode { bits, seg_base_mask: 0, seg_usable_mask: 0x3f, stack_bits: bits, cpl0: true, sse: true, avx: false, fp_masked: false, x87: false, tlb_tables: None };
        group.throughput(Throughput::Elements(starts.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut bytes = 0usize;
                for &rip in &starts {
                    let at = (rip - base) as usize;
                    if let Outcome::Ccf(ccf) = translate(&text[at..], rip, mode, 1) {
                        bytes += ccf.code.len();
                    }
                }
                bytes
            })
        });
        println!("translate/{name}: {} TU starts per iteration (elem/s = TUs translated per second)", starts.len());
    }
    group.finish();
}

criterion_group!(benches, bench_engines, bench_translate);
criterion_main!(benches);
