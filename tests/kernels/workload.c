/*
 * workload.c - the CPU workload of the `cpu`/`cpu64` kernels, written as
 * plain C so the same file also builds for the host (cpu_expected.c), which
 * computes the expected checksums. Sieve of Eratosthenes, bitwise CRC-32,
 * heapsort of an LCG-filled array and memset/memcpy with rep stos/movs.
 */
#include "workload.h"

#define SIEVE_N 200000u
#define CRC_BYTES (64u * 1024u)
#define SORT_N 8192u
#define MEM_BYTES (256u * 1024u)

static uint8_t sieve_buf[SIEVE_N];
static uint8_t crc_buf[CRC_BYTES];
static uint32_t sort_buf[SORT_N];
static uint8_t mem_a[MEM_BYTES], mem_b[MEM_BYTES];

static uint32_t lcg(uint32_t *s) {
    *s = *s * 1664525u + 1013904223u;
    return *s;
}

static uint32_t sieve(void) {
    uint32_t count = 0;
    for (uint32_t i = 0; i < SIEVE_N; i++)
        sieve_buf[i] = i >= 2;
    for (uint32_t i = 2; i * i < SIEVE_N; i++)
        if (sieve_buf[i])
            for (uint32_t j = i * i; j < SIEVE_N; j += i)
                sieve_buf[j] = 0;
    for (uint32_t i = 0; i < SIEVE_N; i++)
        count += sieve_buf[i];
    return count;
}

static uint32_t crc32(const uint8_t *p, uint32_t n) {
    uint32_t c = 0xffffffffu;
    for (uint32_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

static void sift_down(uint32_t *a, uint32_t start, uint32_t end) {
    uint32_t root = start;
    while (2 * root + 1 < end) {
        uint32_t child = 2 * root + 1;
        if (child + 1 < end && a[child] < a[child + 1])
            child++;
        if (a[root] >= a[child])
            return;
        uint32_t t = a[root]; a[root] = a[child]; a[child] = t;
        root = child;
    }
}

static uint32_t heapsort_checksum(uint32_t seed) {
    for (uint32_t i = 0; i < SORT_N; i++)
        sort_buf[i] = lcg(&seed);
    for (uint32_t i = SORT_N / 2; i-- > 0;)
        sift_down(sort_buf, i, SORT_N);
    for (uint32_t end = SORT_N - 1; end > 0; end--) {
        uint32_t t = sort_buf[0]; sort_buf[0] = sort_buf[end]; sort_buf[end] = t;
        sift_down(sort_buf, 0, end);
    }
    uint32_t sum = 0;
    for (uint32_t i = 0; i < SORT_N; i++) {
        if (i && sort_buf[i - 1] > sort_buf[i])
            return 0xdeadu; /* not sorted */
        sum = sum * 31u + sort_buf[i];
    }
    return sum;
}

static uint32_t memops(uint32_t seed) {
    uint8_t *d = mem_a;
    uint32_t n = MEM_BYTES;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(seed & 0xff) : "memory");
    for (uint32_t i = 0; i < MEM_BYTES; i += 4096)
        mem_a[i] = (uint8_t)lcg(&seed);
    const uint8_t *s = mem_a;
    d = mem_b;
    n = MEM_BYTES;
    asm volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    /* Overlapping forward move within b, 4 bytes at a time. */
    d = mem_b;
    s = mem_b + 3;
    n = (MEM_BYTES - 4) / 4;
    asm volatile("rep movsl" : "+D"(d), "+S"(s), "+c"(n) :: "memory");
    return crc32(mem_b, MEM_BYTES);
}

void workload_run(uint32_t iterations, uint32_t parts, struct workload_result *r) {
    r->sieve = r->crc = r->sort = r->mem = r->combined = 0;
    for (uint32_t it = 0; it < iterations; it++) {
        uint32_t seed = 0x1234u + it;
        if (parts & WORKLOAD_SIEVE)
            r->sieve = sieve();
        if (parts & WORKLOAD_CRC) {
            /* Its own copy of the seed: the parts after it get the same
             * data whether it runs or not. */
            uint32_t s = seed;
            for (uint32_t i = 0; i < CRC_BYTES; i++)
                crc_buf[i] = (uint8_t)(lcg(&s) >> 24);
            r->crc = crc32(crc_buf, CRC_BYTES);
        }
        if (parts & WORKLOAD_SORT)
            r->sort = heapsort_checksum(seed);
        if (parts & WORKLOAD_MEM)
            r->mem = memops(seed);
        r->combined = (r->combined * 33u) ^ r->sieve ^ r->crc ^ r->sort ^ r->mem;
    }
}
