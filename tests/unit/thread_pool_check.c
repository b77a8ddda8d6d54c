/* Drives thread_pool.c the way the kernels do, back to back, and checks that every unit of every
 * call runs exactly once before the call returns (test_thread_pool.py builds and runs it).
 *
 * usage: thread_pool_check THREADS CALLS
 * Consecutive calls have different numbers of units, as a forward pass's do. Each call's units count
 * their runs in an array on the caller's stack, which the next call reuses: a unit run twice, or
 * still running after its call returned, shows up as a count other than one. Exits 1 at the
 * first such unit, naming it. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "cpu_kernels.h"

int realizar_set_threads(int threads);

#define MAX_UNITS 40

struct call {
    int64_t *runs;  /* [units] */
};

static void count_run(const void *arg, int64_t unit) {
    const struct call *call = arg;
    for (volatile int64_t spin = 0; spin < (unit * 37) % 300; spin++) {}  /* units of unequal length */
    __atomic_fetch_add(&call->runs[unit], 1, __ATOMIC_RELAXED);
}

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    const int threads = atoi(argv[1]);
    const long calls = atol(argv[2]);
    realizar_set_threads(threads);
    for (long c = 0; c < calls; c++) {
        int64_t runs[MAX_UNITS] = {0};
        const int64_t units = 2 + c % (MAX_UNITS - 1);
        const struct call call = {runs};
        realizar_parallel(count_run, &call, units);
        for (int64_t u = 0; u < MAX_UNITS; u++) {
            const int64_t seen = __atomic_load_n(&runs[u], __ATOMIC_RELAXED);
            if (seen != (u < units)) {
                printf("call %ld of %ld units: unit %ld ran %ld times\n", c, (long)units, (long)u, (long)seen);
                return 1;
            }
        }
    }
    printf("%ld calls: every unit ran once\n", calls);
    return 0;
}
