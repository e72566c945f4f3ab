/* cpu_expected - host build of workload.c: prints the lines the cpu
 * kernels print for `iterations=N` (argv[1]) and `parts=M` (argv[2], all
 * by default), without the kernel-name prefix. */
#include <stdio.h>
#include <stdlib.h>
#include "workload.h"

int main(int argc, char **argv) {
    unsigned n = argc > 1 ? (unsigned)strtoul(argv[1], NULL, 0) : 30;
    unsigned parts = argc > 2 ? (unsigned)strtoul(argv[2], NULL, 0) : WORKLOAD_ALL;
    struct workload_result r;
    workload_run(n, parts, &r);
    printf("iterations=%u\nsieve=%u\ncrc32=%08x\nsort=%08x\nmem=%08x\ncombined=%08x\n", n, r.sieve,
           r.crc, r.sort, r.mem, r.combined);
    return 0;
}
