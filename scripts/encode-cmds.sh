#!/bin/sh
# Print the kernel command-line fragment that makes the btvmm initramfs run
# the given shell commands (one argument each, any characters):
#
#   scripts/encode-cmds.sh 'uname -a' 'echo $((6*7))'
#   -> btvmm.cmds=dW5hbWUgLWE=,ZWNobyAkKCg2KjcpKQ==
#
# Each command is encoded with standard base64 (RFC 4648, with padding) and
# the encodings are joined with commas: no spaces, quotes or other characters
# the kernel's command-line parser treats specially. See scripts/README.md.
set -eu
if [ $# -eq 0 ]; then
    echo "usage: $0 'command' ['command' ...]" >&2
    exit 2
fi
out="btvmm.cmds="
sep=""
for cmd in "$@"; do
    if [ -z "$cmd" ]; then
        echo "encode-cmds: error: empty command" >&2
        exit 2
    fi
    out="$out$sep$(printf '%s' "$cmd" | base64 | tr -d '\n')"
    sep=","
done
# x86 kernels keep at most 2047 bytes of command line (COMMAND_LINE_SIZE).
if [ ${#out} -gt 1800 ]; then
    echo "encode-cmds: warning: fragment is ${#out} bytes; the whole kernel command line must stay under 2048" >&2
fi
printf '%s\n' "$out"
