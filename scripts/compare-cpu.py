#!/usr/bin/env python3
"""The CPU test kernel's ring-0 work (sieve, CRC, sort, memcpy, paging on)
under btvmm's translator, btvmm's interpreter and QEMU's TCG, and the
ratios between them (figures to report, not a test). The same workload
built for the host (`cpu_expected`, a 64-bit program from the same C file)
gives the native time that both are measured against.

    scripts/compare-cpu.py [--kernel cpu|cpu64|all] [--iterations N] [--runs R]

Start-up (QEMU's firmware, btvmm's machine setup) is taken out by running
each kernel at two iteration counts (N/4 and N) and timing the difference:
what is left is the workload alone. Each figure is the median of R runs.
QEMU runs as `qemu-system-x86_64 -accel tcg -cpu max` with the kernel's
debug-exit device, as the tests run it. Build first: `cargo build --release`.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BTVMM = os.path.join(ROOT, "target", "release", "btvmm")
NATIVE = os.path.join(ROOT, "target", "kernels", "cpu_expected")
PASS_STATUS = 33


def qemu_argv(kernel, iterations):
    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "128", "-kernel", kernel,
            "-append", f"iterations={iterations}", "-nographic", "-serial", "stdio", "-monitor", "none",
            "-display", "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


def btvmm_argv(engine):
    def argv(kernel, iterations):
        return [BTVMM, "run", "--engine", engine, "--multiboot", kernel, "--append", f"iterations={iterations}"]
    return argv


def native_argv(_kernel, iterations):
    return [NATIVE, str(iterations)]


def seconds(argv):
    start = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.monotonic() - start
    want = 0 if argv[0] == NATIVE else PASS_STATUS
    if p.returncode != want:
        sys.exit(f"compare-cpu: {' '.join(argv)} exited with {p.returncode}, not {want}")
    return took


def workload_seconds(make_argv, kernel, iterations, runs):
    """Median over `runs` of time(iterations) - time(iterations / 4), scaled to `iterations`."""
    low = max(iterations // 4, 1)
    diffs = []
    for _ in range(runs):
        diffs.append(seconds(make_argv(kernel, iterations)) - seconds(make_argv(kernel, low)))
    return statistics.median(diffs) * iterations / (iterations - low)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="all", choices=["cpu", "cpu64", "all"])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--interp-iterations", type=int, default=20,
                    help="the interpreter runs fewer; its time is scaled up to --iterations")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if not os.path.exists(BTVMM):
        sys.exit("compare-cpu: build btvmm first: cargo build --release")
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    if not have_qemu:
        print("compare-cpu: qemu-system-x86_64 not found: only btvmm's engines are compared", file=sys.stderr)
    kernels = ["cpu", "cpu64"] if args.kernel == "all" else [args.kernel]
    print(f"{'kernel':8} {'engine':10} {'seconds for ' + str(args.iterations) + ' iterations':>30}")
    native = workload_seconds(native_argv, None, args.iterations, args.runs)
    print(f"{'host':8} {'native':10} {native:30.2f}")
    for name in kernels:
        kernel = os.path.join(ROOT, "target", "kernels", f"{name}.elf")
        bt = workload_seconds(btvmm_argv("bt"), kernel, args.iterations, args.runs)
        interp = workload_seconds(btvmm_argv("interp"), kernel, args.interp_iterations, args.runs)
        interp *= args.iterations / args.interp_iterations
        print(f"{name:8} {'btvmm-bt':10} {bt:30.2f}")
        print(f"{name:8} {'interp':10} {interp:30.2f}")
        if have_qemu:
            qemu = workload_seconds(qemu_argv, kernel, args.iterations, args.runs)
            print(f"{name:8} {'qemu-tcg':10} {qemu:30.2f}")
            print(f"{name:8} bt/qemu: {bt / qemu:.2f}x the time (target at most 0.50x); "
                  f"native/qemu: {native / qemu:.2f}x")
        print(f"{name:8} bt/native: {bt / native:.2f}x the time")
        print(f"{name:8} bt speed-up over the interpreter: {interp / bt:.1f}x (target at least 20x)")


if __name__ == "__main__":
    main()
