#!/usr/bin/env python3
"""The CPU test kernel's ring-0 work (sieve, CRC, sort, memcpy, paging on)
under btvmm's translator, btvmm's interpreter and QEMU's TCG, and the
ratios between them (figures to report, not a test), and the same
workload run natively (see below).

    scripts/compare-cpu.py [--kernel cpu|cpu64|all] [--iterations N] [--runs R]
                           [--parts sieve,crc,sort,mem] [--no-interp]

Two native times are given. `host native` is the workload as gcc builds it
for the host (it may use SSE). `guest code native` is each kernel's own
code: workload.c compiled with the kernels' code-generation flags (32- or
64-bit, general registers only) and run as a host program. No engine that
runs the guest's instructions is expected to beat it, so its ratio to
QEMU's time is the floor of bt/qemu on this machine.

`--parts` runs only some parts of each round (the kernels' `parts=M`), to
see where the time goes.

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


PARTS = {"sieve": 1, "crc": 2, "sort": 4, "mem": 8}  # workload.h's WORKLOAD_*


def qemu_argv(kernel, parts):
    def argv(iterations):
        return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", "128", "-kernel", kernel,
                "-append", f"iterations={iterations} parts={parts}", "-nographic", "-serial", "stdio",
                "-monitor", "none", "-display", "none", "-no-reboot",
                "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]
    return argv


def btvmm_argv(engine, kernel, parts):
    def argv(iterations):
        return [BTVMM, "run", "--engine", engine, "--multiboot", kernel, "--append",
                f"iterations={iterations} parts={parts}"]
    return argv


def host_argv(program, parts):
    """A host build of the workload (cpu_expected.c's main)."""
    def argv(iterations):
        return [program, str(iterations), str(parts)]
    return argv


def build_guest_code(bits):
    """The workload as kernel `bits` runs it, built as a host program into
    target/kernels/guest-code<bits>: workload.c compiled with the kernels'
    own flags (build.rs's CFLAGS, which the build writes out), linked with
    cpu_expected.c. None (and why, on stderr) if gcc cannot link it (-m32
    needs gcc-multilib)."""
    kernels = os.path.join(ROOT, "target", "kernels")
    try:
        with open(os.path.join(kernels, "kernel-cflags.txt")) as f:
            cflags = f.read().split()
    except OSError:
        sys.exit("compare-cpu: no target/kernels/kernel-cflags.txt: build first: cargo build --release")
    src = os.path.join(ROOT, "tests", "kernels")
    out = os.path.join(kernels, f"guest-code{bits}")
    obj = out + ".workload.o"
    m = f"-m{bits}"
    steps = [["gcc", m, *cflags, "-c", os.path.join(src, "workload.c"), "-o", obj],
             ["gcc", m, "-O2", "-no-pie", "-o", out, os.path.join(src, "cpu_expected.c"), obj]]
    for argv in steps:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if p.returncode != 0:
            first = (p.stderr.strip().splitlines() or ["?"])[0]
            print(f"compare-cpu: cannot build the {bits}-bit guest code as a host program ({first})", file=sys.stderr)
            return None
    return out


def seconds(argv):
    start = time.monotonic()
    p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    took = time.monotonic() - start
    want = PASS_STATUS if argv[0] in (BTVMM, "qemu-system-x86_64") else 0
    if p.returncode != want:
        sys.exit(f"compare-cpu: {' '.join(argv)} exited with {p.returncode}, not {want}")
    return took


def workload_seconds(make_argv, iterations, runs):
    """Median over `runs` of time(iterations) - time(iterations / 4), scaled to `iterations`."""
    low = max(iterations // 4, 1)
    diffs = []
    for _ in range(runs):
        diffs.append(seconds(make_argv(iterations)) - seconds(make_argv(low)))
    return statistics.median(diffs) * iterations / (iterations - low)


def parts_mask(text):
    if text == "all":
        return sum(PARTS.values())
    mask = 0
    for name in text.split(","):
        if name not in PARTS:
            raise argparse.ArgumentTypeError(f"unknown part '{name}' (parts: {', '.join(PARTS)}, or all)")
        mask |= PARTS[name]
    return mask


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="all", choices=["cpu", "cpu64", "all"])
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--interp-iterations", type=int, default=20,
                    help="the interpreter runs fewer; its time is scaled up to --iterations")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--parts", type=parts_mask, default="all",
                    help="the parts of each round to run: all, or some of sieve,crc,sort,mem")
    ap.add_argument("--no-interp", action="store_true", help="leave the interpreter out")
    args = ap.parse_args()
    if not os.path.exists(BTVMM):
        sys.exit("compare-cpu: build btvmm first: cargo build --release")
    have_qemu = shutil.which("qemu-system-x86_64") is not None
    if not have_qemu:
        print("compare-cpu: qemu-system-x86_64 not found: only btvmm's engines are compared", file=sys.stderr)
    kernels = ["cpu", "cpu64"] if args.kernel == "all" else [args.kernel]
    parts = args.parts
    print(f"parts of each round: {'+'.join(n for n, bit in PARTS.items() if parts & bit)}")
    print(f"{'kernel':8} {'engine':17} {'seconds for ' + str(args.iterations) + ' iterations':>30}")
    native = workload_seconds(host_argv(NATIVE, parts), args.iterations, args.runs)
    print(f"{'host':8} {'host native':17} {native:30.2f}")
    for name in kernels:
        kernel = os.path.join(ROOT, "target", "kernels", f"{name}.elf")
        program = build_guest_code(64 if name == "cpu64" else 32)
        guest = None
        if program:
            guest = workload_seconds(host_argv(program, parts), args.iterations, args.runs)
            print(f"{name:8} {'guest code native':17} {guest:30.2f}")
        bt = workload_seconds(btvmm_argv("bt", kernel, parts), args.iterations, args.runs)
        print(f"{name:8} {'btvmm-bt':17} {bt:30.2f}")
        interp = None
        if not args.no_interp:
            interp = workload_seconds(btvmm_argv("interp", kernel, parts), args.interp_iterations, args.runs)
            interp *= args.iterations / args.interp_iterations
            print(f"{name:8} {'interp':17} {interp:30.2f}")
        if have_qemu:
            qemu = workload_seconds(qemu_argv(kernel, parts), args.iterations, args.runs)
            print(f"{name:8} {'qemu-tcg':17} {qemu:30.2f}")
            floor = f"; guest code native/qemu (the floor): {guest / qemu:.2f}x" if guest else ""
            print(f"{name:8} bt/qemu: {bt / qemu:.2f}x the time (target at most 0.50x){floor}")
        print(f"{name:8} bt/host native: {bt / native:.2f}x the time", end="")
        print(f"; bt/guest code native: {bt / guest:.2f}x" if guest else "")
        if interp:
            print(f"{name:8} bt speed-up over the interpreter: {interp / bt:.1f}x (target at least 20x)")


if __name__ == "__main__":
    main()
