/* The pool of threads behind realizar_parallel (cpu_kernels.h).
 *
 * A task is published under a new generation number. Every thread, the caller included,
 * claims units with a compare-and-swap on one word that holds (generation, next unit), so
 * a worker that wakes late, after its task is over, can claim nothing of a later one by
 * mistake. The caller returns once all units are done; it never waits for a worker that
 * took none. That matters when the cores are shared (a load generator on the same machine,
 * more threads than cores): a descheduled worker then costs nothing but its own share.
 *
 * A forward pass calls the pool back to back, so an idle worker spins for a while
 * (SPIN_NS) before it sleeps on a futex; the caller wakes sleepers only when there are
 * some, so a busy pool costs no system calls.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "cpu_kernels.h"

#define MAX_THREADS 64
#define SPIN_NS 2000000  /* how long an idle worker spins before it sleeps: 2 ms */

static struct {
    pthread_mutex_t lock;         /* one caller at a time; resizing */
    pthread_t threads[MAX_THREADS];
    int size;                     /* threads taking part, the caller included */
    _Atomic uint32_t generation;  /* bumped for every task; the futex word */
    _Atomic uint64_t claim;       /* generation << 32 | the next unit to hand out */
    _Atomic int64_t units;        /* units of the current task */
    _Atomic int64_t done;         /* units of the current task finished */
    _Atomic int sleepers;         /* workers inside futex_wait */
    _Atomic int stop;
    realizar_task task;
    const void *arg;
} pool = {.lock = PTHREAD_MUTEX_INITIALIZER, .size = 1};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void wait_for_change(_Atomic uint32_t *word, uint32_t seen) {
    const int64_t until = now_ns() + SPIN_NS;
    do {
        for (int i = 0; i < 64; i++) {
            if (atomic_load_explicit(word, memory_order_acquire) != seen) return;
            cpu_relax();
        }
    } while (now_ns() < until);
    atomic_fetch_add(&pool.sleepers, 1);
    while (atomic_load(word) == seen) {
#ifdef __linux__
        syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
#else
        sched_yield();
#endif
    }
    atomic_fetch_sub(&pool.sleepers, 1);
}

static void wake_all(_Atomic uint32_t *word) {
#ifdef __linux__
    if (atomic_load(&pool.sleepers) == 0) return;
    syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
#else
    (void)word;
#endif
}

/* Claims and runs units of the task of generation `generation` until none is left, or
 * until a later task has replaced it. */
static void take_units(uint32_t generation) {
    for (;;) {
        uint64_t claim = atomic_load_explicit(&pool.claim, memory_order_acquire);
        /* acquire: if this is a later task's, so is the claim word the exchange below compares */
        const int64_t units = atomic_load_explicit(&pool.units, memory_order_acquire);
        if ((uint32_t)(claim >> 32) != generation || (int64_t)(uint32_t)claim >= units) return;
        /* succeeds only if no unit was taken and no task published since `claim` was read */
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &claim, claim + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        pool.task(pool.arg, (int64_t)(uint32_t)claim);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
    }
}

static void *worker(void *start) {
    uint32_t seen = (uint32_t)(uintptr_t)start;
    for (;;) {
        wait_for_change(&pool.generation, seen);
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (atomic_load(&pool.stop)) return NULL;
        take_units(seen);
    }
}

void realizar_parallel(realizar_task task, const void *arg, int64_t units) {
    if (units <= 0) return;
    if (units == 1) {  /* the caller's alone: publishing it would only send spinning workers after it */
        task(arg, 0);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    const uint32_t generation = atomic_load(&pool.generation) + 1;
    /* First no claim can succeed any more: a worker may have read the last task's claim word
     * just before and read this task's `units` next; its compare-and-swap must then fail,
     * or it would run a unit of this task that another thread runs too, and count it in
     * `done`, and this caller would return while a unit of its task still runs. */
    atomic_store(&pool.claim, (uint64_t)generation << 32 | UINT32_MAX);
    pool.task = task;
    pool.arg = arg;
    atomic_store_explicit(&pool.units, units, memory_order_release);
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.claim, (uint64_t)generation << 32, memory_order_release);
    atomic_store(&pool.generation, generation);  /* spinning workers see the task */
    if (pool.size > 1 && units > 1) wake_all(&pool.generation);  /* and sleeping ones wake */
    take_units(generation);
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < units) cpu_relax();
    pthread_mutex_unlock(&pool.lock);
}

int realizar_threads(void) { return pool.size; }

static void stop_workers(void) {
    atomic_store(&pool.stop, 1);
    atomic_fetch_add(&pool.generation, 1);
    wake_all(&pool.generation);
    for (int i = 1; i < pool.size; i++) pthread_join(pool.threads[i], NULL);
    atomic_store(&pool.stop, 0);
    pool.size = 1;
}

/* A forked child has none of the parent's workers: it starts single-threaded. */
static void after_fork_in_child(void) {
    pthread_mutex_t unlocked = PTHREAD_MUTEX_INITIALIZER;
    pool.lock = unlocked;
    pool.size = 1;
    atomic_store(&pool.sleepers, 0);
}

static void register_fork_handler(void) { pthread_atfork(NULL, NULL, after_fork_in_child); }

/* Use `threads` threads (the caller and threads - 1 workers); returns the number in use. */
int realizar_set_threads(int threads) {
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, register_fork_handler);
    threads = threads < 1 ? 1 : threads > MAX_THREADS ? MAX_THREADS : threads;
    pthread_mutex_lock(&pool.lock);
    if (threads != pool.size) {
        stop_workers();
        const uintptr_t start = atomic_load(&pool.generation);
        for (int i = 1; i < threads; i++) {
            if (pthread_create(&pool.threads[i], NULL, worker, (void *)start) != 0) break;
            pool.size = i + 1;
        }
    }
    const int size = pool.size;
    pthread_mutex_unlock(&pool.lock);
    return size;
}
