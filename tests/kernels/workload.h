/* workload.h - the cpu kernels' workload, shared with the host program. */
#ifndef WORKLOAD_H
#define WORKLOAD_H
#include <stdint.h>

struct workload_result {
    uint32_t sieve, crc, sort, mem, combined;
};

/* The parts of a round, to run alone when measuring where time goes. */
#define WORKLOAD_SIEVE 1u
#define WORKLOAD_CRC 2u
#define WORKLOAD_SORT 4u
#define WORKLOAD_MEM 8u
#define WORKLOAD_ALL 15u

/* Runs `iterations` rounds of the parts in `parts`; results are those of
 * the last round (0 for a part left out) plus a checksum over all rounds. */
void workload_run(uint32_t iterations, uint32_t parts, struct workload_result *r);

#endif
