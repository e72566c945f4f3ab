#!/usr/bin/env python3
"""Guest user-mode work under btvmm and under QEMU's TCG: the same Debian
kernel and busybox initramfs boot under both, run the same shell commands
(sorting, pipes, a shell loop, compression, a file-system walk, awk's
floating point), and each command's time and output are compared (figures
to report, not a test).

    scripts/compare-user.py [--kernel amd64|686|686-pae|all] [--runs N] [--btvmm PATH]

Each command is timed between the markers the initramfs's /init prints
around it (BTVMM-CMD-BEGIN / BTVMM-CMD-END), as the host reads them from the
serial console; each figure is the median of N runs. A command whose output
differs between the engines is reported. Build first: cargo build --release.
"""
import argparse
import base64
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("BTVMM_GUESTS_DIR") or os.path.join(ROOT, "guests-cache")
KERNELS = {
    "amd64": ("qemu-system-x86_64", "amd64/vmlinuz", "amd64/initramfs.cpio.gz"),
    "686": ("qemu-system-i386", "i386/vmlinuz-686", "i386/initramfs.cpio.gz"),
    "686-pae": ("qemu-system-i386", "i386/vmlinuz-686-pae", "i386/initramfs.cpio.gz"),
}
COMMANDS = [
    ("sort", "seq 1 300000 | sort -r | md5sum"),
    ("pipe", "yes abcdefghij | head -c 30000000 | wc -c"),
    ("shell loop", "i=0; while [ $i -lt 100000 ]; do i=$((i+1)); done; echo $i"),
    ("gzip", "dd if=/dev/zero bs=1M count=64 2>/dev/null | gzip -1 | wc -c"),
    ("awk doubles", "awk 'BEGIN{s=0; for(i=0;i<1000000;i++) s+=i%7; print s}'"),
]
BEGIN = re.compile(rb"BTVMM-CMD-BEGIN (\d+):")
END = re.compile(rb"BTVMM-CMD-END (\d+) rc=(\d+)")


def append_line():
    enc = ",".join(base64.b64encode(c.encode()).decode() for _, c in COMMANDS)
    return f"console=ttyS0 btvmm.cmds={enc}"


def run(argv, timeout):
    """Each command's (seconds, exit status, output lines), by number."""
    start = time.monotonic()
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    results, current, began, lines = {}, None, 0.0, []
    while True:
        line = p.stdout.readline()
        if not line:
            break
        now = time.monotonic()
        if (m := BEGIN.search(line)):
            current, began, lines = int(m.group(1)), now, []
        elif (m := END.search(line)) and current is not None:
            results[current] = (now - began, int(m.group(2)), lines)
            current = None
        elif current is not None and not line.startswith(b"["):
            # (Kernel messages, "[  1.23] ...", are not the command's.)
            lines.append(line.strip())
        if now - start > timeout:
            p.kill()
            break
    p.wait()
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", default="amd64", choices=list(KERNELS) + ["all"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--btvmm", default=os.path.join(ROOT, "target", "release", "btvmm"),
                    help="the btvmm binary (another build, to compare two)")
    args = ap.parse_args()
    btvmm = args.btvmm
    if not os.path.exists(btvmm):
        sys.exit("compare-user: build btvmm first (cargo build --release)")
    failed = False
    for name in (list(KERNELS) if args.kernel == "all" else [args.kernel]):
        qemu, kernel, initrd = KERNELS[name]
        kernel, initrd = os.path.join(CACHE, kernel), os.path.join(CACHE, initrd)
        if not os.path.exists(kernel):
            sys.exit(f"compare-user: {kernel} missing: run scripts/fetch-guests.sh")
        engines = {
            "qemu-tcg": [qemu, "-accel", "tcg", "-cpu", "max", "-m", "512M", "-nographic", "-no-reboot",
                         "-monitor", "none", "-kernel", kernel, "-initrd", initrd, "-append", append_line()],
            "btvmm": [btvmm, "run", "--kernel", kernel, "--initrd", initrd, "-m", "512M", "--append", append_line()],
        }
        times = {e: {i: [] for i in range(1, len(COMMANDS) + 1)} for e in engines}
        outputs = {}
        for _ in range(max(args.runs, 1)):
            for engine, argv in engines.items():
                for i, (secs, rc, lines) in run(argv, args.timeout).items():
                    if rc != 0:
                        print(f"{name}: {engine}: command {i} exited with {rc}", file=sys.stderr)
                        failed = True
                    times[engine][i].append(secs)
                    outputs.setdefault((engine, i), lines)
        print(f"{name}: seconds per command (medians of {args.runs})")
        print(f"  {'command':12} {'qemu-tcg':>9} {'btvmm':>9} {'btvmm/qemu':>11}")
        for i, (label, _) in enumerate(COMMANDS, 1):
            q, b = times["qemu-tcg"][i], times["btvmm"][i]
            if not q or not b:
                print(f"  {label:12} {'(no result)':>31}")
                failed = True
                continue
            q, b = statistics.median(q), statistics.median(b)
            same = outputs.get(("qemu-tcg", i)) == outputs.get(("btvmm", i))
            failed |= not same
            print(f"  {label:12} {q:9.2f} {b:9.2f} {b / q:10.2f}x{'' if same else '  (outputs differ)'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
