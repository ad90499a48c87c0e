#include "emu.h"
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
unsigned char* emu_dyn_smem;
EmuBlock* emu_block;
thread_local int emu_tid;

void emu_launch(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body) {
    blockDim = block; gridDim = grid;
    const int nt = block.x * block.y * block.z;
    std::vector<unsigned char> dyn(smem + 16);
    emu_dyn_smem = dyn.data();
    EmuBlock eb;
    eb.block_bar = std::make_unique<std::barrier<>>(nt);
    for (int w = 0; w < (nt + 31) / 32; ++w) eb.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, nt - 32 * w)));
    eb.warp_buf.resize(((nt + 31) / 32) * 32);
    emu_block = &eb;
    const size_t nblocks = (size_t)grid.x * grid.y * grid.z;
    std::vector<std::thread> ts;
    for (int t = 0; t < nt; ++t) {
        ts.emplace_back([&, t] {
            emu_tid = t;
            threadIdx = {(unsigned)(t % block.x), (unsigned)((t / block.x) % block.y), (unsigned)(t / (block.x * block.y))};
            for (size_t b = 0; b < nblocks; ++b) {
                blockIdx = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((size_t)grid.x * grid.y))};
                body();
                eb.block_bar->arrive_and_wait();  // block done before the next reuses shared memory
            }
        });
    }
    for (auto& t : ts) t.join();
}
