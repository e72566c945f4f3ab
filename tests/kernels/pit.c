/*
 * pit - the 8254 timer and the 8259 PIC: channel 0 in mode 2 and mode 3 at
 * ~1 kHz driving IRQ0 through a remapped PIC, ticks counted during a busy
 * loop and while halted (HLT wakes on the interrupt), a latched count read,
 * and channel 2 gated through port 0x61 with OUT2 polled (the way Linux
 * calibrates the TSC). Tick counts depend on time, so only thresholds are
 * printed.
 */
#include "kernel.h"

#define PIT_HZ 1193182u
#define DIVISOR 1193u /* ~1 kHz */

static volatile uint32_t ticks;

static void irq0(struct frame *f) {
    ticks++;
    pic_eoi(0);
}

static void pit_channel0(uint8_t mode) {
    outb(0x43, (uint8_t)(0x30 | (mode << 1))); /* channel 0, lo/hi, mode */
    outb(0x40, DIVISOR & 0xff);
    outb(0x40, DIVISOR >> 8);
}

/* Busy-computes until `want` ticks arrived; returns 0 if the loop bound ran out. */
static int busy_wait_ticks(uint32_t want) {
    uint32_t start = ticks;
    volatile uint32_t x = 1;
    for (uint32_t i = 0; i < 400000000u; i++) {
        x = x * 1103515245u + 12345u;
        if (ticks - start >= want) return 1;
    }
    return 0;
}

static void test_channel0(void) {
    pic_remap(0xfe, 0xff);
    handlers[IRQ_VEC(0)] = irq0;
    pit_channel0(2);
    sti();
    check(busy_wait_ticks(50), "mode 2: 50 ticks during a busy loop");
    uint32_t before = ticks;
    for (int i = 0; i < 20; i++)
        asm volatile("hlt" ::: "memory");
    check(ticks - before >= 20, "hlt: 20 halts woken by irq0");
    cli();
    outb(0x43, 0x00); /* latch channel 0 */
    uint32_t lo = inb(0x40), hi = inb(0x40);
    uint32_t count = lo | (hi << 8);
    check(count <= DIVISOR, "latched count within the divisor");
    pit_channel0(3);
    sti();
    check(busy_wait_ticks(50), "mode 3: 50 ticks during a busy loop");
    cli();
    uint32_t masked = ticks;
    outb(0x21, 0xff); /* mask IRQ0: no more ticks */
    sti();
    for (volatile int i = 0; i < 2000000; i++)
        ;
    cli();
    check(ticks - masked <= 1, "masked irq0 delivers no ticks");
    handlers[IRQ_VEC(0)] = 0;
}

static void test_channel2(void) {
    uint8_t p61 = inb(0x61);
    outb(0x61, (uint8_t)((p61 & ~0x02) | 0x01)); /* gate on, speaker off */
    outb(0x43, 0xb0);                             /* channel 2, lo/hi, mode 0 */
    uint32_t n = PIT_HZ / 100;                    /* 10 ms */
    outb(0x42, n & 0xff);
    outb(0x42, n >> 8);
    int low_first = !(inb(0x61) & 0x20);
    uint64_t t0 = rdtsc();
    uint32_t polls = 0;
    while (!(inb(0x61) & 0x20) && polls < 100000000u)
        polls++;
    uint64_t t1 = rdtsc();
    check(low_first, "channel 2: out2 low after programming mode 0");
    check(polls < 100000000u && polls > 0, "channel 2: out2 rises at terminal count");
    check(t1 > t0, "tsc advances across the countdown");
    outb(0x61, p61);
}

void kmain(void) {
    test_channel0();
    test_channel2();
}
