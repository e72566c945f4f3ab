/*
 * callouts - a loop of sensitive instructions (cli, sti, pushf, popf, in,
 * out) in ring 0, the binary translator's worst case: each one runs in the
 * runtime's shared semantics. The benches time it under both engines; the
 * test checks both print the same.
 */
#include "kernel.h"

#define DEFAULT_ITERATIONS 100000

void kmain(void) {
    uint32_t n = cmdline_uint("iterations", 1000);
    if (n == 0)
        n = DEFAULT_ITERATIONS;
    uint32_t sum = 0;
    /* Firmware (QEMU's SeaBIOS) leaves the PIT ticking into an unmasked PIC
     * at vector 8; the loop's one-instruction interrupt window after `sti`
     * would take such a tick as a double fault. Mask both PICs. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    for (uint32_t i = 0; i < n; i++) {
        ureg flags;
        asm volatile("cli\n\tpushf\n\tpop %0\n\tsti\n\tpush %0\n\tpopf" : "=r"(flags) :: "memory", "cc");
        sum += (uint32_t)(flags & 0x200) >> 9; /* IF was 0 after cli: adds 0 */
        sum += inb(0x61) & 0x01;               /* gate bit as written below */
        outb(0x61, (uint8_t)(i & 1) | (inb(0x61) & 0x02));
        outb(0x80, (uint8_t)i);
    }
    printf("%s: %u iterations, checksum %u\n", kernel_name, n, sum);
}
