#!/bin/sh
# Runs one test kernel under QEMU, the reference for expected output.
# usage: run-qemu.sh KERNEL.elf [-append "..."] [-initrd "a,b"] [other QEMU args]
# 32-bit and 64-bit kernels both run under qemu-system-x86_64 (qemu-system-i386
# has no long mode); -cpu max exposes NX, 1 GiB pages, RDTSCP, XSAVE.
# Exit status: 33 = PASS (debug-exit code 0x10), 35 = FAIL (0x11), other = crash.
k="$1"; shift
exec timeout ${QEMU_TIMEOUT:-60} qemu-system-x86_64 -cpu max -m 128 -kernel "$k" -nographic -serial stdio \
    -monitor none -display none -device isa-debug-exit,iobase=0xf4,iosize=4 -no-reboot "$@"
