/*
 * tsc_calibrate - Linux's early TSC calibration against the 8254
 * (quick_pit_calibrate in arch/x86/kernel/tsc.c), which an AMD guest
 * depends on: channel 2 counts down from 0xffff and the MSB is sampled
 * until it has stepped often enough for a 500 ppm error bound. It must
 * succeed with interrupts off and channel 0 programmed, and two runs must
 * agree within 0.5%. (Linux's slower fallback, which rejects a 10 ms window
 * if any poll took ten times the fastest one, cannot be relied on under a
 * host that preempts the VMM, so it is not a pass condition here.)
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
 * uncertainty come back. As in Linux's pit_expect_msb, the uncertainty
 * runs from the sample before the last one to *after* the read that saw
 * the MSB change: a delay before that read (a host preemption the guest
 * can see) widens the window in which the MSB changed, and must count. */
static int expect_msb(uint8_t val, uint64_t *at, uint64_t *err) {
    uint64_t prev = 0, now = tsc();
    int count;
    for (count = 0; count < 50000; count++) {
        if (!msb_is(val))
            break;
        prev = now;
        now = tsc();
    }
    *err = tsc() - prev;
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

void kmain(void) {
    /* The timer runs, masked, as when Linux calibrates. */
    pic_remap(0xff, 0xff);
    outb(0x43, 0x34);
    outb(0x40, 1193 & 0xff);
    outb(0x40, 1193 >> 8);
    uint64_t first = 0;
    int ok = 0;
    for (int attempt = 0; attempt < 3 && !ok; attempt++)
        ok = quick_calibrate();
    if (!ok)
        printf("%s: quick calibration failed at step %d\n", kernel_name, (int)quick_fail_at);
    check(ok, "quick PIT calibration");
    first = quick_khz;
    ok = 0;
    for (int attempt = 0; attempt < 3 && !ok; attempt++)
        ok = quick_calibrate();
    check(ok, "quick PIT calibration, again");
    uint64_t diff = first > quick_khz ? first - quick_khz : quick_khz - first;
    if (diff * 200 > first)
        printf("%s: %d kHz then %d kHz\n", kernel_name, (int)first, (int)quick_khz);
    check(ok && diff * 200 <= first, "two calibrations agree within 0.5%");
}
