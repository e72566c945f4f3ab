/*
 * tsc_calibrate - the two ways Linux measures the TSC against the 8254
 * before any other clock exists (arch/x86/kernel/tsc.c): the quick method
 * (channel 2 counting down from 0xffff, the MSB sampled until it has
 * stepped often enough for a 500 ppm error bound) and the slow method
 * (channel 2 one-shot over 10 ms with port 0x61's OUT2 polled, rejected if
 * the slowest poll took ten times the fastest). Both must succeed, with
 * interrupts off and the timer still programmed, as Linux runs them; the
 * two results must agree within 1%.
 */
#include "kernel.h"

#define PIT_HZ 1193182u

static uint64_t tsc(void) {
    return rdtsc();
}

/* Channel 2 in mode 0, gate on, speaker off, counting from `count`. */
static void ch2_start(uint16_t count) {
    outb(0x61, (uint8_t)((inb(0x61) & ~0x02) | 0x01));
    outb(0x43, 0xb0);
    outb(0x42, count & 0xff);
    outb(0x42, count >> 8);
}

static int msb_is(uint8_t val) {
    inb(0x42); /* low byte, ignored */
    return inb(0x42) == val;
}

/* Samples while the MSB reads `val`; the TSC at the last sample and the
 * uncertainty (the time between the last two samples) come back. */
static int expect_msb(uint8_t val, uint64_t *at, uint64_t *err) {
    uint64_t prev = 0, now = tsc();
    int count;
    for (count = 0; count < 50000; count++) {
        if (!msb_is(val))
            break;
        prev = now;
        now = tsc();
    }
    *err = now - prev;
    *at = now;
    return count > 5;
}

static uint64_t quick_khz;
static uint64_t quick_fail_at;

static int quick_calibrate(void) {
    uint64_t t0, d1, t, d2;
    ch2_start(0xffff);
    msb_is(0); /* one read lets the count start */
    if (!expect_msb(0xff, &t0, &d1)) {
        quick_fail_at = 1000;
        return 0;
    }
    for (int i = 1; i <= 233; i++) {
        if (!expect_msb((uint8_t)(0xff - i), &t, &d2)) {
            quick_fail_at = 2000 + i;
            return 0;
        }
        uint64_t delta = t - t0;
        if (i == 1 && d1 + d2 >= (delta * 233) >> 11) {
            quick_fail_at = 3000;
            return 0;
        }
        if (d1 + d2 >= delta >> 11)
            continue;
        if (!msb_is((uint8_t)(0xfe - i))) {
            quick_fail_at = 4000 + i;
            return 0;
        }
        /* i * 256 PIT ticks took delta TSC cycles. */
        quick_khz = delta * PIT_HZ / ((uint64_t)i * 256 * 1000);
        return 1;
    }
    quick_fail_at = 5000;
    return 0;
}

static uint64_t slow_khz, slow_min, slow_max, slow_polls;

static int slow_calibrate(void) {
    uint32_t latch = PIT_HZ / 100; /* 10 ms */
    ch2_start((uint16_t)latch);
    uint64_t start = tsc(), prev = start, lo = ~0ull, hi = 0, polls = 0;
    while (!(inb(0x61) & 0x20)) {
        uint64_t now = tsc(), d = now - prev;
        prev = now;
        if (d < lo) lo = d;
        if (d > hi) hi = d;
        polls++;
    }
    slow_min = lo;
    slow_max = hi;
    slow_polls = polls;
    if (polls < 5000 || hi > 10 * lo)
        return 0;
    slow_khz = (prev - start) / 10;
    return 1;
}

void kmain(void) {
    /* The timer runs, masked, as when Linux calibrates. */
    pic_remap(0xff, 0xff);
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xff);
    outb(0x40, 1193 >> 8);
    int quick = 0, slow = 0;
    for (int attempt = 0; attempt < 3 && !quick; attempt++)
        quick = quick_calibrate();
    for (int attempt = 0; attempt < 3 && !slow; attempt++)
        slow = slow_calibrate();
    if (!quick)
        printf("%s: quick calibration failed at step %d\n", kernel_name, (int)quick_fail_at);
    if (!slow)
        printf("%s: slow calibration failed: polls=%d min=%d max=%d\n", kernel_name, (int)slow_polls,
               (int)slow_min, (int)slow_max);
    check(quick, "quick PIT calibration");
    check(slow, "slow PIT calibration");
    uint64_t diff = quick_khz > slow_khz ? quick_khz - slow_khz : slow_khz - quick_khz;
    if (quick && slow && diff * 100 > slow_khz)
        printf("%s: quick %d kHz, slow %d kHz\n", kernel_name, (int)quick_khz, (int)slow_khz);
    check(quick && slow && diff * 100 <= slow_khz, "quick and slow results agree within 1%");
}
