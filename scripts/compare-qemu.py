#!/usr/bin/env python3
"""Boot the same kernel and initramfs under QEMU's TCG and under btvmm and
print both boot times and their ratio (a figure to report, not a test).

    scripts/compare-qemu.py [--kernel amd64|686|686-pae|all] [--runs N] [--btvmm-args "..."]

Each run boots with `console=ttyS0` and a short command list (`uname -a`,
`echo $((6*7))`), and is timed from start to the shell marker the initramfs
prints (BTVMM-INIT-READY) and to the VM's exit after `poweroff -f`. QEMU runs
as `qemu-system-{x86_64,i386} -accel tcg -m 512M -nographic -no-reboot`.
"""
import argparse
import base64
import os
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.environ.get("BTVMM_GUESTS_DIR") or os.path.join(ROOT, "guests-cache")
KERNELS = {
    "amd64": ("qemu-system-x86_64", "amd64/vmlinuz", "amd64/initramfs.cpio.gz"),
    "686": ("qemu-system-i386", "i386/vmlinuz-686", "i386/initramfs.cpio.gz"),
    "686-pae": ("qemu-system-i386", "i386/vmlinuz-686-pae", "i386/initramfs.cpio.gz"),
}
CMDS = ["uname -a", "echo $((6*7))"]
MARKER = b"BTVMM-INIT-READY"


def append_line():
    enc = ",".join(base64.b64encode(c.encode()).decode() for c in CMDS)
    return f"console=ttyS0 btvmm.cmds={enc}"


def timed(argv, timeout):
    """Runs argv; returns (seconds to the shell marker, seconds to exit, output)."""
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    ready = None
    while True:
        line = p.stdout.readline()
        if not line:
            break
        out += line
        if ready is None and MARKER in line:
            ready = time.monotonic() - start
        if time.monotonic() - start > timeout:
            p.kill()
            break
    p.wait()
    return ready, time.monotonic() - start, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="amd64", choices=list(KERNELS) + ["all"])
    ap.add_argument("--btvmm-args", default="", help="extra options for btvmm run (e.g. --fast-boot)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--runs", type=int, default=1,
                    help="boot each engine this many times, alternating, and compare medians (this host is noisy)")
    args = ap.parse_args()
    btvmm = os.path.join(ROOT, "target", "release", "btvmm")
    if not os.path.exists(btvmm):
        sys.exit("compare-qemu: build btvmm first (cargo build --release)")
    names = list(KERNELS) if args.kernel == "all" else [args.kernel]
    print(f"{'kernel':10} {'engine':8} {'to shell':>9} {'to exit':>9}")
    failed = False
    for name in names:
        qemu, kernel, initrd = KERNELS[name]
        kernel, initrd = os.path.join(CACHE, kernel), os.path.join(CACHE, initrd)
        if not os.path.exists(kernel):
            sys.exit(f"compare-qemu: {kernel} missing: run scripts/fetch-guests.sh")
        q = [qemu, "-accel", "tcg", "-m", "512M", "-nographic", "-no-reboot", "-monitor", "none",
             "-kernel", kernel, "-initrd", initrd, "-append", append_line()]
        b = [btvmm, "run", "--kernel", kernel, "--initrd", initrd, "-m", "512M",
             "--append", append_line()] + args.btvmm_args.split()
        times = {"qemu-tcg": [], "btvmm": []}
        for _ in range(max(args.runs, 1)):
            for engine, argv in (("qemu-tcg", q), ("btvmm", b)):
                ready, total, out = timed(argv, args.timeout)
                ok = ready is not None and b"BTVMM-CMDS-DONE n=2 failed=0" in out
                failed |= not ok
                if ok:
                    times[engine].append((ready, total))
                shown = f"{ready:8.2f}s" if ready is not None else "   never"
                print(f"{name:10} {engine:8} {shown} {total:8.2f}s{'' if ok else '  (FAILED)'}", flush=True)
        if times["qemu-tcg"] and times["btvmm"]:
            (qr, qt), (br, bt) = (tuple(statistics.median(x) for x in zip(*times[e])) for e in ("qemu-tcg", "btvmm"))
            medians = f" (medians of {args.runs})" if args.runs > 1 else ""
            print(f"{name:10} btvmm/qemu: {br / qr:.2f}x to shell, {bt / qt:.2f}x to exit{medians}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
