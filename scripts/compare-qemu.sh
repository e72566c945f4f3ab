#!/bin/sh
# Boot times of the same Debian kernel + initramfs under QEMU TCG and under
# btvmm, and their ratio. Installs Debian's qemu-system-x86 if missing,
# fetches the guests if needed, builds btvmm.
#   scripts/compare-qemu.sh [--kernel amd64|686|686-pae|all] [--runs N] [--btvmm-args "--fast-boot"]
set -eu
cd "$(dirname "$0")/.."
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq qemu-system-x86 >/dev/null
fi
scripts/fetch-guests.sh >&2
cargo build --release --quiet
exec scripts/compare-qemu.py "$@"
