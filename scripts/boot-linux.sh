#!/bin/sh
# The main job: boot Debian's Linux with a busybox initramfs under btvmm, to a
# shell on this terminal. Fetches the guest if it is not cached and builds
# btvmm in release mode first.
#
#   scripts/boot-linux.sh [--arch amd64|i386|i386-pae] [btvmm run options...]
#
# Ctrl-A x quits, Ctrl-A s prints counters; `poweroff` in the guest ends the VM.
set -eu
cd "$(dirname "$0")/.."
arch=amd64
if [ "${1:-}" = "--arch" ]; then
    arch=${2:?--arch needs amd64, i386 or i386-pae}
    shift 2
fi
cache=${BTVMM_GUESTS_DIR:-guests-cache}
case "$arch" in
    amd64) kernel=$cache/amd64/vmlinuz; initrd=$cache/amd64/initramfs.cpio.gz; fetch=amd64 ;;
    i386) kernel=$cache/i386/vmlinuz-686; initrd=$cache/i386/initramfs.cpio.gz; fetch=i386 ;;
    i386-pae) kernel=$cache/i386/vmlinuz-686-pae; initrd=$cache/i386/initramfs.cpio.gz; fetch=i386 ;;
    *) echo "boot-linux: unknown arch '$arch' (amd64, i386, i386-pae)" >&2; exit 2 ;;
esac
if [ ! -e "$kernel" ] || [ ! -e "$initrd" ]; then
    scripts/fetch-guests.sh --arch "$fetch" >&2
fi
cargo build --release --quiet
exec ./target/release/btvmm run --kernel "$kernel" --initrd "$initrd" --append "console=ttyS0" -m 512M "$@"
