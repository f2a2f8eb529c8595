// Host emulation of the fused W4A16 kernels (w4a16.cu), for tests/emulated_w4a16.rs: the
// kernel source itself, compiled for the CPU, every CUDA thread a host thread. Blocks run one
// after another, so `__shared__` variables become statics; warp collectives (mma.sync,
// ldmatrix, __syncwarp) meet at per-warp barriers; cp.async copies at once. The test
// replaces each inline-asm helper of the source with a declaration; they are defined here.
//
// Usage: host IN OUT ENTRY GRID_X GRID_Y GRID_Z K_SPLIT
//   IN:  u64 k, n, g, m, then the "mma" layout's qweight (u32), zeros (u32), scales (f16
//        bits) with their lengths as three more u64 before them, then x (m x k f16 bits).
//   OUT: u32 count of split-K counters left non-zero, then y (m x n f32; f16 outputs widened);
//        for ENTRY w4a16_dequant (m = 0, K_SPLIT ignored), the f16 weight [n, k] widened.
#include "cuda_host.h"

static float half_to_float(unsigned bits) {
    _Float16 h;
    uint16_t b = (uint16_t)bits;
    memcpy(&h, &b, 2);
    return (float)h;
}
static unsigned float_to_half(float f) {
    _Float16 h = (_Float16)f;  // round to nearest even
    uint16_t b;
    memcpy(&b, &h, 2);
    return b;
}

typedef void (*EntryF32)(const unsigned short*, const struct u32x4*, const unsigned*, const unsigned short*, float*,
                         float*, unsigned*, int, int, int, int, int);
typedef void (*EntryF16)(const unsigned short*, const struct u32x4*, const unsigned*, const unsigned short*,
                         unsigned short*, float*, unsigned*, int, int, int, int, int);
struct EntryRow {
    const char* name;
    EntryF32 f32;
    EntryF16 f16;
};

#include "w4a16_host.inc"

// The helpers the source writes in PTX.
half_bits f32_to_f16(float f) { return (half_bits)float_to_half(f); }
float f16_to_f32(half_bits h) { return half_to_float(h); }
u32x4 ld_stream(const u32x4* p) { return *p; }
float ld_cg(const float* p) {
    float v;
    __atomic_load(p, &v, __ATOMIC_ACQUIRE);
    return v;
}
unsigned int ld_nc(const unsigned int* p) { return *p; }
void fence_acq_rel() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
unsigned int arrive(unsigned int* counter) { return __atomic_fetch_add(counter, 1u, __ATOMIC_SEQ_CST); }
static unsigned halves(unsigned a, unsigned b, bool mul) {
    auto op = [&](unsigned x, unsigned y) {
        const float r = mul ? half_to_float(x) * half_to_float(y) : half_to_float(x) - half_to_float(y);
        return float_to_half(r);  // exact in f32 for f16 operands, so one rounding
    };
    return op(a & 0xFFFF, b & 0xFFFF) | (op(a >> 16, b >> 16) << 16);
}
unsigned int hsub2(unsigned int a, unsigned int b) { return halves(a, b, false); }
unsigned int hmul2(unsigned int a, unsigned int b) { return halves(a, b, true); }
unsigned int and_or(unsigned int a, unsigned int b, unsigned int c) { return (a & b) | c; }
// m16n8k16, A row-major and B column-major f16, C f32: the PTX ISA's fragment layouts.
void mma_16816(float* c, const unsigned int* a, const unsigned int* b) {
    const int lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
    Warp& w = emu_warps[threadIdx.x / 32];
    memcpy(w.a[lane], a, 16);
    memcpy(w.b[lane], b, 8);
    w.bar->arrive_and_wait();
    auto A = [&](int r, int k) { return half_to_float(w.a[(r % 8) * 4 + (k % 8) / 2][r / 8 + 2 * (k / 8)] >> (16 * (k % 2))); };
    auto B = [&](int k, int n) { return half_to_float(w.b[n * 4 + (k % 8) / 2][k / 8] >> (16 * (k % 2))); };
    float d[4];
    for (int e = 0; e < 4; e++) {
        const int row = gid + 8 * (e >> 1), col = 2 * tig + (e & 1);
        float sum = 0.0f;
        for (int k = 0; k < 16; k++) sum += A(row, k) * B(k, col);
        d[e] = c[e] + sum;
    }
    w.bar->arrive_and_wait();
    memcpy(c, d, 16);
}
unsigned int smem_addr(const void* p) { return (unsigned)((const unsigned char*)p - emu_smem); }
void cp_async16(unsigned int dst, const void* src, bool fill) {
    if (fill) memcpy(emu_smem + dst, src, 16);
    else memset(emu_smem + dst, 0, 16);
}
void cp_async4(unsigned int dst, const void* src) { memcpy(emu_smem + dst, src, 4); }
void cp_async_commit() {}
template <int N>
void cp_async_wait() {}
// x4: lanes 8i .. 8i + 7 give the rows of matrix i; each lane gets (row gid, columns 2 tig, 2 tig + 1).
void ldmatrix_x4(unsigned int* a, unsigned int addr) {
    const int lane = threadIdx.x % 32, gid = lane >> 2, tig = lane & 3;
    Warp& w = emu_warps[threadIdx.x / 32];
    w.addr[lane] = addr;
    w.bar->arrive_and_wait();
    for (int i = 0; i < 4; i++) memcpy(&a[i], emu_smem + w.addr[i * 8 + gid] + tig * 4, 4);
    w.bar->arrive_and_wait();
}

static int write_out(const char* path, unsigned left, const std::vector<float>& y) {
    FILE* out = fopen(path, "wb");
    if (!out) return 2;
    fwrite(&left, 4, 1, out);
    fwrite(y.data(), 4, y.size(), out);
    fclose(out);
    return 0;
}

static int write_out(const char* path, unsigned left, const std::vector<uint16_t>& y16) {
    std::vector<float> y(y16.size());
    for (size_t i = 0; i < y.size(); i++) y[i] = half_to_float(y16[i]);
    return write_out(path, left, y);
}

int main(int argc, char** argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: host IN OUT ENTRY GRID_X GRID_Y GRID_Z K_SPLIT\n");
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    std::vector<uint64_t> head(7);
    read(in, head);
    const int K = (int)head[0], N = (int)head[1], G = (int)head[2], M = (int)head[3];
    std::vector<unsigned> qweight(head[4]), zeros(head[5]);
    std::vector<uint16_t> scales(head[6]), x((size_t)M * K);
    read(in, qweight);
    read(in, zeros);
    read(in, scales);
    read(in, x);
    fclose(in);
    const std::string entry = argv[3];
    const dim3 grid = {(unsigned)atoi(argv[4]), (unsigned)atoi(argv[5]), (unsigned)atoi(argv[6])};
    const int k_split = atoi(argv[7]);
    if (entry == "w4a16_dequant") {  // y is the weight [n, k]
        std::vector<uint16_t> w16((size_t)N * K, 0x7E00);
        launch(grid, MMA_THREADS, [&] {
            w4a16_dequant(reinterpret_cast<const u32x4*>(qweight.data()), zeros.data(), scales.data(),
                          reinterpret_cast<u32x4*>(w16.data()), K, N, G);
        });
        return write_out(argv[2], 0, w16);
    }
    const EntryRow* row = nullptr;
    for (const EntryRow& r : ENTRIES)
        if (entry == r.name) row = &r;
    if (!row) {
        fprintf(stderr, "no entry %s\n", entry.c_str());
        return 2;
    }
    // Poisoned like the GPU tests' outputs: NaN everywhere before the kernel runs.
    std::vector<float> partial((size_t)grid.y * M * grid.x * 64, NAN), y((size_t)M * N, NAN);
    std::vector<uint16_t> y16((size_t)M * N, 0x7E00);
    std::vector<unsigned> counters(grid.x * grid.z, 0);
    const u32x4* qw = reinterpret_cast<const u32x4*>(qweight.data());
    if (row->f32)
        launch(grid, MMA_THREADS, [&] {
            row->f32(x.data(), qw, zeros.data(), scales.data(), y.data(), partial.data(), counters.data(), M, K, N, G,
                     k_split);
        });
    else
        launch(grid, MMA_THREADS, [&] {
            row->f16(x.data(), qw, zeros.data(), scales.data(), y16.data(), partial.data(), counters.data(), M, K, N,
                     G, k_split);
        });
    unsigned left = 0;
    for (unsigned c : counters) left += c != 0;
    return row->f32 ? write_out(argv[2], left, y) : write_out(argv[2], left, y16);
}
