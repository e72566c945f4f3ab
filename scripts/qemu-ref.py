#!/usr/bin/env python3
"""Boot the fetched Debian guests under QEMU (TCG) as the reference check.

    scripts/qemu-ref.py [--kernel amd64|686|686-pae|all] [--timeout S]
                        [--append ARGS] [--no-no-reboot] [CMD ...]

For each kernel, runs

    qemu-system-{x86_64,i386} -kernel vmlinuz -initrd initramfs.cpio.gz
        -append "console=ttyS0 btvmm.cmds=..." -nographic -m 512M -no-reboot

with the commands CMD ... (default: a small smoke list), checks the initramfs
markers (BTVMM-INIT-READY, one BTVMM-CMD-BEGIN/END pair per command,
BTVMM-CMDS-DONE) and that QEMU exits by itself, prints each command's output,
and reports wall times from QEMU's start to BTVMM-INIT-READY and to QEMU's
exit. The whole console log goes to $BTVMM_GUESTS_DIR/logs/qemu-<kernel>.log.
Exit status 0 when every kernel passed.
"""
import argparse
import base64
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("BTVMM_GUESTS_DIR") or os.path.join(os.path.dirname(HERE), "guests-cache")

KERNELS = {
    "amd64": ("qemu-system-x86_64", "amd64/vmlinuz", "amd64/initramfs.cpio.gz"),
    "686": ("qemu-system-i386", "i386/vmlinuz-686", "i386/initramfs.cpio.gz"),
    "686-pae": ("qemu-system-i386", "i386/vmlinuz-686-pae", "i386/initramfs.cpio.gz"),
}

DEFAULT_CMDS = [
    "uname -a",
    "cat /proc/cpuinfo | head -5",
    "ls /",
    "echo $((6*7))",
    "dd if=/dev/zero bs=1M count=16 | md5sum",
]


def encode(cmds):
    """The kernel command-line fragment (same as scripts/encode-cmds.sh)."""
    return "btvmm.cmds=" + ",".join(base64.b64encode(c.encode()).decode() for c in cmds)


def parse(log):
    """Command outputs from a console log: [(n, rc, [lines])]. Kernel printk
    lines ("[   1.234] ...") inside a command's output are dropped."""
    out, cur = [], None
    for line in log.splitlines():
        m = re.match(r"BTVMM-CMD-BEGIN (\d+)", line)
        if m:
            cur = (int(m.group(1)), [])
            continue
        m = re.match(r"BTVMM-CMD-END (\d+) rc=(\d+)", line)
        if m and cur is not None:
            out.append((cur[0], int(m.group(2)), cur[1]))
            cur = None
            continue
        if cur is not None and not re.match(r"\[\s*\d+\.\d+\] ", line):
            cur[1].append(line)
    return out


def boot(name, cmds, args):
    qemu, kernel, initrd = KERNELS[name]
    kernel, initrd = os.path.join(CACHE, kernel), os.path.join(CACHE, initrd)
    for f in (kernel, initrd):
        if not os.path.exists(f):
            sys.exit(f"qemu-ref: error: {f} is missing; run scripts/fetch-guests.sh first")
    append = " ".join(x for x in ("console=ttyS0", args.append, encode(cmds) if cmds else "") if x)
    argv = [qemu, "-kernel", kernel, "-initrd", initrd, "-append", append,
            "-nographic", "-m", args.memory]
    if not args.no_no_reboot:
        argv.append("-no-reboot")
    os.makedirs(os.path.join(CACHE, "logs"), exist_ok=True)
    logpath = os.path.join(CACHE, "logs", f"qemu-{name}.log")
    print(f"== {name}: {' '.join(argv)}", flush=True)

    t0 = time.monotonic()
    marks = {}
    chunks = []
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    buf = b""
    timed_out = False
    os.set_blocking(p.stdout.fileno(), False)
    while True:
        try:
            data = p.stdout.read()
        except BlockingIOError:
            data = None
        now = time.monotonic() - t0
        if data:
            chunks.append(data)
            buf += data
            for marker in (b"Linux version", b"BTVMM-INIT-READY", b"BTVMM-CMDS-DONE"):
                if marker not in marks and marker in buf:
                    marks[marker] = now
            buf = buf[-64:]
        elif data == b"" or p.poll() is not None:
            if p.poll() is not None:
                rest = p.stdout.read() or b""
                chunks.append(rest)
                break
        if now > args.timeout:
            timed_out = True
            p.kill()
            p.wait()
            break
        time.sleep(0.005)
    t_exit = time.monotonic() - t0
    log = b"".join(chunks).decode("utf-8", "replace").replace("\r\n", "\n")
    with open(logpath, "w") as f:
        f.write(log)

    problems = []
    if timed_out:
        problems.append(f"QEMU did not exit within {args.timeout}s (killed)")
    elif p.returncode != 0:
        problems.append(f"QEMU exited with status {p.returncode}")
    if b"BTVMM-INIT-READY" not in marks:
        problems.append("no BTVMM-INIT-READY")
    results = parse(log)
    if cmds:
        if b"BTVMM-CMDS-DONE" not in marks:
            problems.append("no BTVMM-CMDS-DONE")
        if [r[0] for r in results] != list(range(1, len(cmds) + 1)):
            problems.append(f"expected {len(cmds)} BEGIN/END pairs, found {len(results)}")
    for n, rc, lines in results:
        print(f"-- cmd {n} rc={rc}: {cmds[n - 1] if n <= len(cmds) else '?'}")
        for line in lines:
            print(f"   {line}")
        if rc != 0:
            problems.append(f"command {n} exited {rc}")
    first = marks.get(b"Linux version")
    ready = marks.get(b"BTVMM-INIT-READY")
    done = marks.get(b"BTVMM-CMDS-DONE")
    fmt = lambda t: f"{t:.2f}s" if t is not None else "-"
    print(f"{name}: kernel banner {fmt(first)}, init-ready {fmt(ready)}, cmds-done {fmt(done)}, exit {fmt(t_exit)}"
          f"{' (timeout)' if timed_out else ''}; log {logpath}")
    for pr in problems:
        print(f"{name}: FAIL: {pr}")
    return not problems, (first, ready, done, t_exit)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", default="all", choices=list(KERNELS) + ["all"])
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per boot (default 300)")
    ap.add_argument("--append", default="", help="extra kernel command-line arguments")
    ap.add_argument("-m", "--memory", default="512M")
    ap.add_argument("--no-no-reboot", action="store_true", help="leave out QEMU's -no-reboot")
    ap.add_argument("cmds", nargs="*", help="commands to run in the guest (default: a smoke list)")
    args = ap.parse_args()
    cmds = args.cmds or DEFAULT_CMDS
    names = list(KERNELS) if args.kernel == "all" else [args.kernel]
    ok, summary = True, []
    for name in names:
        good, times = boot(name, cmds, args)
        ok &= good
        summary.append((name, good, times))
    print("\nwall time from QEMU start (s)")
    print("kernel    result   banner  init-ready  cmds-done     exit")
    for name, good, (b, r, d, e) in summary:
        f = lambda t: f"{t:8.2f}" if t is not None else "       -"
        print(f"{name:9} {'ok' if good else 'FAIL':6} {f(b)}    {f(r)}   {f(d)} {f(e)}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
