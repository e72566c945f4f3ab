//! Interpreter throughput on the CPU test kernel's workload (sieve, CRC32,
//! heapsort, rep stos/movs), in guest instructions per second.
//!
//! Each sample boots the `cpu` test kernel with `iterations=N` under
//! `--engine interp`; criterion's throughput is the number of guest
//! instructions one run executes, so its "elem/s" figure is guest
//! instructions per second (Bochs manages about 28 M/s on this kind of machine).

use btvmm::cli::{Engine, RunArgs};
use btvmm::machine::{Console, Machine};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const ITERATIONS: u32 = 10;

fn args(kernel: &str) -> RunArgs {
    RunArgs {
        multiboot: Some(kernel.into()),
        kernel: None,
        initrd: None,
        append: format!("iterations={ITERATIONS}"),
        memory: 128 << 20,
        boot_entry: None,
        fast_boot: false,
        engine: Engine::Interp,
        code_cache: 64 << 20,
        trace: None,
        stats: false,
        profile: false,
    }
}

/// Boots the kernel once; returns the guest instructions it executed.
fn run_once(kernel: &str) -> u64 {
    let console = Console { output: Box::new(std::io::sink()), stdin: false };
    let mut m = Machine::build_with(&args(kernel), console).expect("build machine");
    let status = m.run().expect("run");
    assert_eq!(status, 33, "cpu kernel did not pass");
    m.vcpu().stats.instructions
}

fn bench_interp(c: &mut Criterion) {
    let mut group = c.benchmark_group("interp");
    group.sample_size(10);
    for (name, kernel) in [("cpu32", env!("BTVMM_KERNEL_CPU")), ("cpu64", env!("BTVMM_KERNEL_CPU64"))] {
        let instructions = run_once(kernel);
        group.throughput(Throughput::Elements(instructions));
        group.bench_function(name, |b| b.iter(|| run_once(kernel)));
        println!("interp/{name}: {instructions} guest instructions per run");
    }
    group.finish();
}

criterion_group!(benches, bench_interp);
criterion_main!(benches);
