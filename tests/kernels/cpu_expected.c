/* cpu_expected - host build of workload.c: prints the lines the cpu
 * kernels print for `iterations=N` (argv[1]) and `parts=M` (argv[2], all
 * by default), without the kernel-name prefix. */
#include <stdio.h>
#include <stdlib.h>
#include "workload.h"

/* A number as the kernels' cmdline_uint reads it: 0x for hex, else decimal. */
static unsigned number(const char *s) {
    return (unsigned)strtoul(s, NULL, s[0] == '0' && s[1] == 'x' ? 16 : 10);
}

int main(int argc, char **argv) {
    unsigned n = argc > 1 ? number(argv[1]) : 30;
    unsigned parts = argc > 2 ? number(argv[2]) : WORKLOAD_ALL;
    struct workload_result r;
    workload_run(n, parts, &r);
    printf("iterations=%u\nsieve=%u\ncrc32=%08x\nsort=%08x\nmem=%08x\ncombined=%08x\n", n, r.sieve,
           r.crc, r.sort, r.mem, r.combined);
    return 0;
}
