// The CUDA execution model on the host, for the emulation tests: each CUDA thread a host
// thread, blocks one after another (so `__shared__` variables become statics and dynamic
// shared memory one buffer), warp collectives meeting at per-warp barriers. A kernel's own
// source is compiled against it by tests/emulated_*.rs, which replace what the host cannot
// take (inline PTX helpers, `extern __shared__` arrays, launch bounds).
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#define __device__
#define __forceinline__ inline
#define __global__
#define __shared__ static
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
    unsigned x = 0, y = 0, z = 0;
};
thread_local dim3 threadIdx, blockIdx;
dim3 gridDim, blockDim;
inline int min(int a, int b) { return a < b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
template <typename T>
T __shfl_xor_sync(unsigned, T, int) {
    abort();  // no warp shuffles in the emulated kernels
}

alignas(16) unsigned char emu_smem[200 << 10];  // the block's dynamic shared memory
struct Warp {
    std::barrier<>* bar;
    unsigned a[32][4], b[32][2], addr[32];
};
Warp emu_warps[32];
std::barrier<>* emu_block;
void __syncthreads() { emu_block->arrive_and_wait(); }
void __syncwarp() { emu_warps[threadIdx.x / 32].bar->arrive_and_wait(); }

static void launch(dim3 grid, int threads, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = {(unsigned)threads, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                std::barrier<> block(threads);
                std::vector<std::unique_ptr<std::barrier<>>> warps;
                for (int i = 0; i < threads / 32; i++) {
                    warps.emplace_back(new std::barrier<>(32));
                    emu_warps[i].bar = warps.back().get();
                }
                emu_block = &block;
                memset(emu_smem, 0xAB, sizeof emu_smem);  // garbage, as a fresh block finds it
                std::vector<std::thread> ts;
                for (int t = 0; t < threads; t++)
                    ts.emplace_back([&, t] {
                        threadIdx = {(unsigned)t, 0, 0};
                        blockIdx = {x, y, z};
                        kernel();
                    });
                for (auto& t : ts) t.join();
            }
}

template <typename T>
static void read(FILE* f, std::vector<T>& v) {
    if (fread(v.data(), sizeof(T), v.size(), f) != v.size()) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
}

