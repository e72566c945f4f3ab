#!/usr/bin/env python3
"""Build btvmm's busybox initramfs: a gzip'd newc cpio archive.

    mkinitramfs.py --busybox BUSYBOX --init INIT -o OUT.cpio.gz
                   [--applets-from HOST_RUNNABLE_BUSYBOX]

The archive is written directly (no staging tree, no root needed): every entry
is owned by root, mtime 0, so the same inputs give the same bytes. Contents:

    /bin/busybox           BUSYBOX
    /init                  INIT (mode 0755)
    applet symlinks        from `busybox --list-full` of --applets-from, each
                           -> /bin/busybox (without --applets-from, /init runs
                           `busybox --install -s` at boot instead)
    /dev/console, /dev/null, /dev/tty, /dev/ttyS0   character devices (the
                           kernel opens /dev/console before /init runs;
                           devtmpfs is mounted over /dev by /init)
    /proc /sys /tmp /root /etc /mnt /var /usr/bin /usr/sbin /sbin  directories
"""
import argparse
import gzip
import io
import os
import subprocess
import sys

S_IFDIR, S_IFREG, S_IFLNK, S_IFCHR = 0o040000, 0o100000, 0o120000, 0o020000


class Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.names = set()

    def _entry(self, name, mode, data=b"", rdev=(0, 0), nlink=1):
        assert name not in self.names, name
        self.names.add(name)
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            "%08X" % v
            for v in (
                self.ino, mode, 0, 0, nlink, 0, len(data),
                0, 0, rdev[0], rdev[1], len(namez), 0,
            )
        )
        self.ino += 1
        out = self.buf
        out.write(hdr.encode())
        out.write(namez)
        out.write(b"\0" * (-out.tell() % 4))
        out.write(data)
        out.write(b"\0" * (-out.tell() % 4))

    def dir(self, name, mode=0o755):
        self._entry(name, S_IFDIR | mode, nlink=2)

    def file(self, name, data, mode=0o644):
        self._entry(name, S_IFREG | mode, data)

    def symlink(self, name, target):
        self._entry(name, S_IFLNK | 0o777, target.encode())

    def chardev(self, name, major, minor, mode=0o600):
        self._entry(name, S_IFCHR | mode, rdev=(major, minor))

    def finish(self):
        self.ino = 0
        self._entry("TRAILER!!!", 0, nlink=1)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def applets(busybox):
    out = subprocess.run(
        [busybox, "--list-full"], check=True, capture_output=True, text=True
    ).stdout
    return sorted({line.strip().strip("/") for line in out.splitlines() if line.strip()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busybox", required=True, help="static busybox for the guest")
    ap.add_argument("--init", required=True, help="the /init script")
    ap.add_argument("--applets-from", help="a busybox that runs on this host, for the applet list")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()

    with open(args.busybox, "rb") as f:
        busybox = f.read()
    with open(args.init, "rb") as f:
        init = f.read()

    c = Cpio()
    dirs = ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys",
            "tmp", "root", "etc", "mnt", "var", "run"]
    for d in dirs:
        c.dir(d, 0o1777 if d == "tmp" else (0o700 if d == "root" else 0o755))
    c.file("bin/busybox", busybox, 0o755)
    c.file("init", init, 0o755)
    c.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    c.file("etc/group", b"root:x:0:\n")
    c.chardev("dev/console", 5, 1)
    c.chardev("dev/tty", 5, 0, 0o666)
    c.chardev("dev/null", 1, 3, 0o666)
    c.chardev("dev/ttyS0", 4, 64, 0o660)
    n = 0
    if args.applets_from:
        for path in applets(args.applets_from):
            if path == "bin/busybox" or path in c.names:
                continue
            parent = os.path.dirname(path)
            if parent and parent not in c.names:
                c.dir(parent)
            c.symlink(path, "/bin/busybox")
            n += 1

    data = c.finish()
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        # mtime=0 and no file name in the gzip header: reproducible output.
        with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0, compresslevel=9) as gz:
            gz.write(data)
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(data)} bytes of cpio, {n} applet links", file=sys.stderr)


if __name__ == "__main__":
    main()
