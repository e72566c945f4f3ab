/* workload.h - the cpu kernels' workload, shared with the host program. */
#ifndef WORKLOAD_H
#define WORKLOAD_H
#include <stdint.h>

struct workload_result {
    uint32_t sieve, crc, sort, mem, combined;
};

/* Runs `iterations` rounds; results are those of the last round plus a
 * checksum over all rounds. */
void workload_run(uint32_t iterations, struct workload_result *r);

#endif
