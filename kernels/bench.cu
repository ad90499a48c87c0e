// Benchmark support (not used by the model).
#include "common.cuh"

// Busy-waits `ns` nanoseconds of the GPU's global timer on one thread. Queued ahead of a batch of
// launches it keeps the GPU busy while the host enqueues them, so CUDA events around the batch
// time the kernels back to back rather than the host's launch rate. grid 1, block 1.
XSAM_KERNEL void bench_spin(unsigned long long ns) {
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < ns);
}
