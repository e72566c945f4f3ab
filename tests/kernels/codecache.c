/*
 * codecache / codecache64 - lots of distinct code for the translator's
 * cache: 2048 small functions (codecache.S), each with its own constants and
 * a branch (some with a loop, some with a run of memory operations), called many times in varying orders: all in order with direct
 * calls, strided permutations, LCG-random order, and a hot set mixed with a
 * stream of cold ones. tests/kernels.rs also runs it with the smallest code
 * cache, so that least-recently-used eviction and unchaining run thousands
 * of times. Every phase's checksum is compared with the same arithmetic done
 * in C (cc_model) and printed.
 */
#include "kernel.h"

#define CC_FUNCS 2048

uint32_t cc_call(uint32_t index, uint32_t v);
uint32_t cc_call_all(uint32_t v);

static uint32_t rol32(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

extern volatile uint32_t cc_data[4];
static uint32_t model_data[4];

/* What function n of codecache.S does to v (and to cc_data). */
static uint32_t cc_model(uint32_t n, uint32_t v) {
    if ((n & 3) == 3) {
        for (uint32_t k = (n & 7) + 1; k; k--)
            v = rol32(v + n * 0x9e3779b1u, 3);
    } else {
        v += n * 0x9e3779b1u;
    }
    if ((n & 15) == 5) {
        for (int k = 0; k < 8; k++) {
            model_data[k & 3] ^= v;
            v += model_data[k & 3];
        }
    }
    if ((n & 255) == 0x99) {
        for (int k = 0; k < 3; k++) {
            model_data[k] ^= v;
            v += model_data[k];
        }
    }
    if (v & (1u << (n & 31)))
        return rol32(v ^ (n * 0x85ebca6bu + 0x1234567u), (int)(n % 31) + 1);
    return v - n * 0xc2b2ae35u;
}

static void report(const char *what, uint32_t got, uint32_t want) {
    printf("%s: %s: checksum=%x%s\n", kernel_name, what, got, got == want ? " ok" : " FAILED");
    if (got != want) {
        printf("%s: %s: want %x\n", kernel_name, what, want);
        failures++;
    }
}

static void in_order(void) {
    uint32_t got = 0x1111, want = 0x1111;
    for (int pass = 0; pass < 4; pass++) {
        got = cc_call_all(got);
        for (uint32_t n = 0; n < CC_FUNCS; n++) want = cc_model(n, want);
    }
    report("all in order, direct calls, 4 passes", got, want);
}

static void strided(void) {
    static const uint32_t strides[] = { 1, 2047, 3, 1021, 7, 257, 31, 1365, 641, 5 };
    uint32_t got = 0x2222, want = 0x2222;
    for (unsigned s = 0; s < sizeof(strides) / sizeof(strides[0]); s++) {
        uint32_t idx = s * 97;
        for (int i = 0; i < CC_FUNCS; i++) {
            idx = (idx + strides[s]) & (CC_FUNCS - 1);
            got = cc_call(idx, got);
            want = cc_model(idx, want);
        }
    }
    report("10 strided permutations", got, want);
}

static void random_order(void) {
    uint32_t x = 12345, got = 0x3333, want = 0x3333;
    for (int i = 0; i < 4 * CC_FUNCS; i++) {
        x = x * 1103515245u + 12345u;
        uint32_t idx = (x >> 12) & (CC_FUNCS - 1);
        got = cc_call(idx, got);
        want = cc_model(idx, want);
    }
    report("8192 calls in LCG order", got, want);
}

/* 16 hot functions called between consecutive cold ones. */
static void hot_and_cold(void) {
    uint32_t got = 0x4444, want = 0x4444, cold = 0;
    for (int i = 0; i < 1024; i++) {
        for (uint32_t h = 0; h < 16; h++) {
            uint32_t idx = h * 128 + 64;
            got = cc_call(idx, got);
            want = cc_model(idx, want);
        }
        cold = (cold + 1021) & (CC_FUNCS - 1);
        got = cc_call(cold, got);
        want = cc_model(cold, want);
    }
    report("16 hot + 1024 cold", got, want);
}

void kmain(void) {
    printf("%s: %u functions\n", kernel_name, CC_FUNCS);
    in_order();
    strided();
    random_order();
    hot_and_cold();
    in_order();
    uint32_t d = 0, m = 0;
    for (int k = 0; k < 4; k++) {
        d = rol32(d, 7) ^ cc_data[k];
        m = rol32(m, 7) ^ model_data[k];
    }
    report("memory mixed into by 136 of the functions", d, m);
}
