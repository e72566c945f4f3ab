/*
 * cpu / cpu64 - a CPU-bound workload (workload.c) with paging on: 32-bit
 * protected mode with 4 MiB pages, or long mode. The number of rounds comes
 * from the multiboot command line, `iterations=N` (default 30, ~0.7 s under QEMU TCG); the checksums
 * printed must equal those of the host program cpu_expected run with N.
 * `parts=M` runs only the parts of each round in the mask M (workload.h;
 * scripts/compare-cpu.py times them one by one), compared with
 * `cpu_expected N M`.
 */
#include "kernel.h"
#include "workload.h"

#define DEFAULT_ITERATIONS 30

#ifndef __x86_64__
static uint32_t page_dir[1024] __attribute__((aligned(4096)));

static void enable_paging(void) {
    for (uint32_t i = 0; i < 1024; i++)
        page_dir[i] = (i << 22) | 0x83; /* 4 MiB, present, writable: identity 4 GiB */
    write_cr3((uintptr_t)page_dir);
    write_cr4(read_cr4() | CR4_PSE);
    write_cr0(read_cr0() | CR0_PG | CR0_WP);
}
#endif

void kmain(void) {
#ifndef __x86_64__
    enable_paging();
#endif
    uint32_t n = cmdline_uint("iterations", DEFAULT_ITERATIONS);
    uint32_t parts = cmdline_uint("parts", WORKLOAD_ALL);
    struct workload_result r;
    printf("%s: iterations=%u\n", kernel_name, n);
    workload_run(n, parts, &r);
    printf("%s: sieve=%u\n", kernel_name, r.sieve);
    printf("%s: crc32=%08x\n", kernel_name, r.crc);
    printf("%s: sort=%08x\n", kernel_name, r.sort);
    printf("%s: mem=%08x\n", kernel_name, r.mem);
    printf("%s: combined=%08x\n", kernel_name, r.combined);
}
