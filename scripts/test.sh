#!/bin/sh
# The project's test command: installs what the tests need (QEMU, the
# reference machine for the test kernels; the Debian guests, cached in
# guests-cache/), then runs every test in release mode (the interpreter runs
# guests; a debug build is too slow to be fair).
set -eu
cd "$(dirname "$0")/.."

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "installing qemu-system-x86 (reference machine for the test kernels)" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-system-x86 >/dev/null
fi

# The real guests (Debian kernels and busybox), fetched once and cached.
scripts/fetch-guests.sh >&2

exec cargo test --release --workspace "$@"
