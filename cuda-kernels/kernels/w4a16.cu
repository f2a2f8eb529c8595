// W4A16 products y[M, N] = x[M, K] . Wt[K, N] with f16 activations, 4-bit AWQ weights in
// the "mma" layout (cuda-kernels/src/layout.rs: each lane's 16-byte load holds the nibbles of
// its tensor-core B fragments for one 16-deep step of 64 output features), and
// Wt[k, n] = (q - z) * s rounded to f16 as AutoAWQ's kernels do. CPU twin: tp-runtime's
// CpuAwq::matmul (and MmaLayout::dequantize for the layout).
//
// - w4a16_mma_m{1,2,4}_{f32,f16}: 16, 32 or 64 rows per block on tensor cores
//   (mma.sync m16n8k16, f32 accumulation); a block is four warps on one strip of 64 outputs,
//   each streaming a quarter of the block's K range through its own cp.async pipeline and
//   dequantizing in registers. K is also split over blocks so that small M fills the GPU;
//   the last block of each tile to finish adds the partial sums in split order
//   (deterministic; no float atomics).
// - w4a16_gemv_m{8,16}_{f32,f16}: up to 8 or 16 rows, weights streamed into registers as
//   the tensor cores' A operand (no shared memory), split like w4a16_mma.
// - w4a16_dequant: the weight as f16 [N, K], for large M, where cuBLAS does the product.

#define MMA_WARPS 4
#define MMA_THREADS (32 * MMA_WARPS)

struct __align__(16) u32x4 {
    unsigned int x, y, z, w;
};

__device__ __forceinline__ u32x4 ld_stream(const u32x4* p) {
    u32x4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// L2 only: other blocks wrote these partial sums. Not volatile, so that loads can overlap.
__device__ __forceinline__ float ld_cg(const float* p) {
    float v;
    asm("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ void fence_acq_rel() { asm volatile("fence.acq_rel.gpu;" ::: "memory"); }

// Adds one to a split-K arrival counter; returns the count before.
__device__ __forceinline__ unsigned int arrive(unsigned int* counter) {
    unsigned int prev;
    asm volatile("atom.global.acq_rel.gpu.add.u32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
    return prev;
}

__device__ __forceinline__ unsigned int hsub2(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ unsigned int hmul2(unsigned int a, unsigned int b) {
    unsigned int d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

__device__ __forceinline__ void mma_16816(float* c, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Scales and zeros of one group for a lane's eight features (`sv`: eight f16 scales, `zw`:
// eight zero nibbles), each duplicated into both halves of an f16x2. Zeros carry the bias of
// the nibble decoding below: 1024 + z for even tiles, 1024 + 16 z for odd ones.
__device__ __forceinline__ void build_group(const u32x4& sv, unsigned int zw, unsigned int* z2, unsigned int* s2) {
    unsigned int sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
    for (int j = 0; j < 8; j++) {
        unsigned int h = (sw[j >> 1] >> (16 * (j & 1))) & 0xFFFFu;
        s2[j] = h | (h << 16);
        unsigned int z = (zw >> (4 * j)) & 0xFu;
        unsigned int zh = ((j & 1) ? z << 4 : z) | 0x6400u;
        z2[j] = zh | (zh << 16);
    }
}

// Index of the (group, strip, gid) entry of the zeros; the scales' eight start at 8 times it.
__device__ __forceinline__ size_t group_at(int gi, int strips, int s, int gid) {
    return (size_t)(gi * strips + s) * 8 + gid;
}

// (a & b) | c in one instruction.
__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int b, unsigned int c) {
    unsigned int d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// The B fragments of eight n8 tiles from one lane's 16 bytes (layout.rs). OR-ing nibbles into
// the mantissa of 1024.0 (0x6400) in place gives 1024 + q (even tiles) or 1024 + 16 q (odd
// tiles) exactly; subtracting the matching zero leaves (q - z) or 16 (q - z), then the scale.
// Odd tiles' sums are divided by 16 at the end (exact).
__device__ __forceinline__ void decode(const u32x4& wv, const unsigned int* z2, const unsigned int* s2,
                                       unsigned int (*b)[2]) {
    const unsigned int lo_mask = 0x000F000Fu, hi_mask = 0x00F000F0u, magic = 0x64006400u;
    unsigned int words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
    for (int w = 0; w < 4; w++) {
        const unsigned int near = words[w], far = words[w] >> 8;
        b[2 * w][0] = hmul2(hsub2(and_or(near, lo_mask, magic), z2[2 * w]), s2[2 * w]);
        b[2 * w][1] = hmul2(hsub2(and_or(far, lo_mask, magic), z2[2 * w]), s2[2 * w]);
        b[2 * w + 1][0] = hmul2(hsub2(and_or(near, hi_mask, magic), z2[2 * w + 1]), s2[2 * w + 1]);
        b[2 * w + 1][1] = hmul2(hsub2(and_or(far, hi_mask, magic), z2[2 * w + 1]), s2[2 * w + 1]);
    }
}

__device__ __forceinline__ void store_out(float* y, size_t i, float v) { y[i] = v; }
__device__ __forceinline__ void store_out(half_bits* y, size_t i, float v) { y[i] = f32_to_f16(v); }

__device__ __forceinline__ unsigned int smem_addr(const void* p) {
    unsigned int a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared, bypassing L1; zeros instead where `fill` is false.
__device__ __forceinline__ void cp_async16(unsigned int dst, const void* src, bool fill) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(fill ? 16 : 0) : "memory");
}

__device__ __forceinline__ void cp_async4(unsigned int dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned int* a, unsigned int addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
                 : "r"(addr));
}

// Halves per staged A row: 16 plus 8 of padding, so that ldmatrix reads no bank twice.
#define A_ROW 24

// Bytes of one pipeline stage of one warp: its lanes' weights (32 x 16), MT A tiles of
// 16 x A_ROW halves, and its lanes' group scales (32 x 16) and zeros (32 x 4).
template <int MT>
struct Stage {
    static constexpr int A = 512;
    static constexpr int S = A + MT * 16 * A_ROW * 2;
    static constexpr int Z = S + 512;
    static constexpr int BYTES = Z + 128;
};

// The end of every fused kernel. The four warps' sums `acc` (FRAG per lane; `at(i, m, n)`
// gives element i's row and column) meet in `red` (2 x FRAG x 32 floats) as
// (w0 + w2) + (w1 + w3). Warp 0 writes the block's sums: the output where K was not split,
// else this split's partial sums; then the last block of each tile to finish adds the partial
// sums in split order (deterministic; no float atomics). The block covers rows
// m0 .. m0 + block_rows of strip blockIdx.x; blockIdx.y is its split.
template <int FRAG, typename Out, typename At>
__device__ __forceinline__ void finish_tile(float* acc, float* red, At at, Out* __restrict__ y,
                                            float* __restrict__ partial, unsigned int* __restrict__ counters,
                                            int M, int N, int m0, int block_rows) {
    __shared__ int is_last;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int s = blockIdx.x, splits = gridDim.y;
    if (warp >= 2) {
#pragma unroll
        for (int i = 0; i < FRAG; i++) red[(warp - 2) * FRAG * 32 + i * 32 + lane] = acc[i];
    }
    __syncthreads();
    if (warp < 2) {
#pragma unroll
        for (int i = 0; i < FRAG; i++) acc[i] += red[warp * FRAG * 32 + i * 32 + lane];
    }
    __syncthreads();
    if (warp == 1) {
#pragma unroll
        for (int i = 0; i < FRAG; i++) red[i * 32 + lane] = acc[i];
    }
    __syncthreads();
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < FRAG; i++) acc[i] += red[i * 32 + lane];
    }

    const int padded = (N + 63) / 64 * 64;
    const size_t split_stride = (size_t)M * padded;
    if (warp == 0) {
#pragma unroll
        for (int i = 0; i < FRAG; i++) {
            int m, n;
            at(i, m, n);
            if (m >= M) continue;
            if (splits == 1) {
                if (n < N) store_out(y, (size_t)m * N + n, acc[i]);
            } else {
                partial[blockIdx.y * split_stride + (size_t)m * padded + n] = acc[i];
            }
        }
    }
    if (splits == 1) return;
    fence_acq_rel();
    __syncthreads();
    const unsigned int tile = blockIdx.z * gridDim.x + blockIdx.x;
    if (tid == 0) is_last = arrive(counters + tile) == (unsigned int)(splits - 1);
    __syncthreads();
    if (!is_last) return;
    fence_acq_rel();
    // Each thread first issues the loads of four elements times four splits, so that they
    // wait on L2 together.
    const int rows = min(block_rows, M - m0), count = rows * 64;
    for (int base = tid; base < count; base += 4 * MMA_THREADS) {
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int sp0 = 0; sp0 < splits; sp0 += 4) {
            float v[4][4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int e = base + i * MMA_THREADS;
                const float* p = partial + (size_t)(m0 + e / 64) * padded + 64 * s + e % 64;
#pragma unroll
                for (int q = 0; q < 4; q++)
                    v[i][q] = (e < count && sp0 + q < splits) ? ld_cg(p + (sp0 + q) * split_stride) : 0.0f;
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int q = 0; q < 4; q++)
                    if (sp0 + q < splits) sum[i] += v[i][q];
        }
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int e = base + i * MMA_THREADS, m = m0 + e / 64, n = 64 * s + e % 64;
            if (e < count && n < N) store_out(y, (size_t)m * N + n, sum[i]);
        }
    }
    if (tid == 0) counters[tile] = 0;  // ready for the next launch on this stream
}

// One block = four warps on the same strip of 64 outputs, each a quarter of the block's K
// range. Each warp runs its own STAGES-deep cp.async pipeline (no block-wide barrier in the
// main loop): one 16-byte weight load per lane and k step, the 16-row A tile, and a group's
// scales and zeros where the group changes; `finish_tile` adds the warps' and the splits' sums.
template <int MT, int STAGES, typename Out>
__device__ __forceinline__ void w4a16_mma(const half_bits* __restrict__ x, const u32x4* __restrict__ qweight,
                                          const unsigned int* __restrict__ zeros,
                                          const half_bits* __restrict__ scales, Out* __restrict__ y,
                                          float* __restrict__ partial, unsigned int* __restrict__ counters,
                                          int M, int K, int N, int g, int k_split) {
    extern __shared__ __align__(16) unsigned char smem[];
    constexpr int FRAG = MT * 8 * 4;  // accumulators per lane
    using St = Stage<MT>;
    const int strips = (N + 63) / 64, steps = K / 16;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int s = blockIdx.x;
    const int m0 = blockIdx.z * 16 * MT;
    const int k_warp = k_split / MMA_WARPS;  // a multiple of 16
    const int k_beg = blockIdx.y * k_split + warp * k_warp;
    const int t_beg = k_beg / 16, t_end = min(K, k_beg + k_warp) / 16;

    unsigned char* pipe = smem + warp * STAGES * St::BYTES;
    const unsigned int pipe_addr = smem_addr(pipe);
    // This lane copies A row lane / 2 of each m tile, its half lane % 2; rows past M are zeros.
    const half_bits* xsrc[MT];
    bool xrow_in[MT];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        int m = m0 + 16 * mt + (lane >> 1);
        xrow_in[mt] = m < M;
        xsrc[mt] = x + (size_t)(m < M ? m : 0) * K + 8 * (lane & 1) + (size_t)t_beg * 16;
    }
    const unsigned int a_copy = St::A + ((lane >> 1) * A_ROW + 8 * (lane & 1)) * 2;
    const unsigned int a_read = St::A + ((lane & 15) * A_ROW + (lane >> 4) * 8) * 2;
    const u32x4* wsrc = qweight + ((size_t)s * steps + t_beg) * 32 + lane;
    // Groups start every g / 16 steps; the first step of the range always loads its group.
    const int gsteps = g / 16;
    const size_t group_stride = (size_t)strips * 8;
    const size_t first_at = group_at(t_beg / gsteps, strips, s, gid);
    const u32x4* ssrc = reinterpret_cast<const u32x4*>(scales) + first_at;
    const unsigned int* zsrc = zeros + first_at;
    int issue_t = t_beg, issue_group_t = t_beg;
    auto issue = [&](int slot) {
        if (issue_t < t_end) {
            const unsigned int st = pipe_addr + slot * St::BYTES;
            cp_async16(st + lane * 16, wsrc, true);
            wsrc += 32;
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                cp_async16(st + a_copy + mt * 16 * A_ROW * 2, xsrc[mt], xrow_in[mt]);
                xsrc[mt] += 16;
            }
            if (issue_t == issue_group_t) {
                cp_async16(st + St::S + lane * 16, ssrc, true);
                cp_async4(st + St::Z + lane * 4, zsrc);
                ssrc += group_stride;
                zsrc += group_stride;
                issue_group_t = (issue_t / gsteps + 1) * gsteps;
            }
            issue_t++;
        }
        cp_async_commit();  // empty groups too: the waits below count groups
    };

    float acc[MT][8][4] = {};

#pragma unroll
    for (int i = 0; i < STAGES - 1; i++) issue(i);
    int group_t = t_beg;
    unsigned int z2[8], s2[8];
    // Unrolled by the pipeline depth, so that every slot offset is a constant.
    for (int t = t_beg; t < t_end;) {
#pragma unroll
        for (int slot = 0; slot < STAGES; slot++) {
            if (t < t_end) {
                cp_async_wait<STAGES - 2>();
                __syncwarp();  // every lane's copies of step t have landed (A rows come from other lanes)
                const unsigned char* st = pipe + slot * St::BYTES;
                if (t == group_t) {
                    build_group(*reinterpret_cast<const u32x4*>(st + St::S + lane * 16),
                                *reinterpret_cast<const unsigned int*>(st + St::Z + lane * 4), z2, s2);
                    group_t = (t / gsteps + 1) * gsteps;
                }
                const u32x4 wv = *reinterpret_cast<const u32x4*>(st + lane * 16);
                unsigned int a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
                    ldmatrix_x4(a[mt], pipe_addr + slot * St::BYTES + a_read + mt * 16 * A_ROW * 2);
                // Refills the slot of step t - 1, which every lane finished reading before the barrier.
                issue((slot + STAGES - 1) % STAGES);
                unsigned int b[8][2];
                decode(wv, z2, s2, b);
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int j = 0; j < 8; j++) mma_16816(acc[mt][j], a[mt], b[j]);
                t++;
            }
        }
    }
    cp_async_wait<0>();
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int j = 1; j < 8; j += 2)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[mt][j][e] *= 0.0625f;  // odd tiles ran at 16 q
    __syncthreads();  // the pipelines' memory becomes the reduction's
    // Accumulator (mt, j, e) holds row m0 + 16 mt + gid + 8 (e / 2), column 64 s + 8 j + 2 tig + e % 2.
    finish_tile<FRAG>(
        &acc[0][0][0], reinterpret_cast<float*>(smem),
        [&](int i, int& m, int& n) {
            const int mt = i / 32, j = (i / 4) % 8, e = i % 4;
            m = m0 + 16 * mt + gid + 8 * (e >> 1);
            n = 64 * s + 8 * j + 2 * tig + (e & 1);
        },
        y, partial, counters, M, N, m0, 16 * MT);
}

// Read-only 32-bit load (activations: every block of the row reads them, so L1 keeps them).
__device__ __forceinline__ unsigned int ld_nc(const unsigned int* p) {
    unsigned int v;
    asm("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

// Up to 8 x NT rows, for decoder-sized batches. The weights are the mma's A operand and the
// activations its B (y^T = W^T x^T): one m16n8k16 covers 16 outputs of 8 rows, so a k step of
// a strip takes 4 MMAs per 8 rows where w4a16_mma takes 8 per 16. The "mma" layout serves as
// is: A rows gid and gid + 8 of 16-output tile i are tiles 2i and 2i + 1 of the B fragments.
// Nothing goes through shared memory: each lane loads its 16 weight bytes and its activation
// words straight into registers, D steps ahead (a ring of registers), and a group's scales and
// zeros one group ahead. Blocks, warps and splits of K as in w4a16_mma.
template <int NT, int D, typename Out>
__device__ __forceinline__ void w4a16_gemv(const half_bits* __restrict__ x, const u32x4* __restrict__ qweight,
                                           const unsigned int* __restrict__ zeros,
                                           const half_bits* __restrict__ scales, Out* __restrict__ y,
                                           float* __restrict__ partial, unsigned int* __restrict__ counters,
                                           int M, int K, int N, int g, int k_split) {
    constexpr int FRAG = NT * 4 * 4;  // accumulators per lane
    __shared__ float red[2 * FRAG * 32];
    const int strips = (N + 63) / 64, steps = K / 16;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int s = blockIdx.x;
    const int m0 = blockIdx.z * 8 * NT;
    const int k_warp = k_split / MMA_WARPS;  // a multiple of 16
    const int k_beg = min(K, blockIdx.y * k_split + warp * k_warp);
    const int t_beg = k_beg / 16, t_end = min(K, k_beg + k_warp) / 16;

    // B fragment of row tile nt: this lane's row m0 + 8 nt + gid, halves 2 tig, 2 tig + 1
    // (word 0) and 2 tig + 8, 2 tig + 9 (word 4) of each k step. A row past M reads row M - 1
    // instead: it only feeds output column m0 + 8 nt + gid, which is never written.
    const unsigned int* xp[NT];
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        const int m = min(m0 + 8 * nt + gid, M - 1);
        xp[nt] = reinterpret_cast<const unsigned int*>(x + (size_t)m * K + (size_t)t_beg * 16) + tig;
    }
    const u32x4* wp = qweight + ((size_t)s * steps + t_beg) * 32 + lane;
    // The ring: slot d holds the step that is d (mod D) steps past t_beg; `wp` and `xp` point
    // at the next step to load.
    u32x4 wq[D];
    unsigned int xq[D][NT][2];
    auto load = [&](int d) {
        wq[d] = ld_stream(wp);
        wp += 32;
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            xq[d][nt][0] = ld_nc(xp[nt]);
            xq[d][nt][1] = ld_nc(xp[nt] + 4);
            xp[nt] += 8;
        }
    };
#pragma unroll
    for (int d = 0; d < D; d++)
        if (t_beg + d < t_end) load(d);

    // The group of the first step now, the next one ahead; `next_t` is where that one starts.
    const int gsteps = g / 16;
    const size_t group_stride = (size_t)strips * 8;
    size_t at = group_at(t_beg / gsteps, strips, s, gid);
    int next_t = (t_beg / gsteps + 1) * gsteps;
    unsigned int z2[8], s2[8];
    u32x4 next_sv = {0u, 0u, 0u, 0u};
    unsigned int next_zw = 0u;
    if (t_beg < t_end) {
        build_group(reinterpret_cast<const u32x4*>(scales)[at], zeros[at], z2, s2);
        if (next_t < t_end) {
            at += group_stride;
            next_sv = reinterpret_cast<const u32x4*>(scales)[at];
            next_zw = zeros[at];
        }
    }

    float acc[NT][4][4] = {};

    // Step t from ring slot d, then the slot refilled D steps ahead where `refill`.
    auto step = [&](int d, int t, bool refill) {
        if (t == next_t) {
            build_group(next_sv, next_zw, z2, s2);
            next_t += gsteps;
            if (next_t < t_end) {
                at += group_stride;
                next_sv = reinterpret_cast<const u32x4*>(scales)[at];
                next_zw = zeros[at];
            }
        }
        unsigned int b[8][2];
        decode(wq[d], z2, s2, b);
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const unsigned int a[4] = {b[2 * i][0], b[2 * i + 1][0], b[2 * i][1], b[2 * i + 1][1]};
#pragma unroll
            for (int nt = 0; nt < NT; nt++) mma_16816(acc[nt][i], a, xq[d][nt]);
        }
        if (refill) load(d);
    };
    // Rounds of D steps, unrolled so that every slot is a register: first those whose steps
    // and refills all fall in the range (no checks), then the rest.
    int t0 = t_beg;
    for (; t0 + 2 * D <= t_end; t0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) step(d, t0 + d, true);
    }
    for (; t0 < t_end; t0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++)
            if (t0 + d < t_end) step(d, t0 + d, t0 + d + D < t_end);
    }
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
        for (int i = 0; i < 4; i++) {
            acc[nt][i][2] *= 0.0625f;  // rows gid + 8 are odd tiles, which ran at 16 q
            acc[nt][i][3] *= 0.0625f;
        }
    // Accumulator (nt, i, e) holds row m0 + 8 nt + 2 tig + e % 2, column 64 s + 16 i + gid + 8 (e / 2).
    finish_tile<FRAG>(
        &acc[0][0][0], red,
        [&](int idx, int& m, int& n) {
            const int nt = idx / 16, i = (idx / 4) % 4, e = idx % 4;
            m = m0 + 8 * nt + 2 * tig + (e & 1);
            n = 64 * s + 16 * i + gid + 8 * (e >> 1);
        },
        y, partial, counters, M, N, m0, 8 * NT);
}

// Pipeline depth per rows-per-block: deep where a block carries little arithmetic.
#define MMA_ENTRY(MT, STAGES, NAME, OUT)                                                                  \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS) w4a16_mma_m##MT##_##NAME(                 \
        const half_bits* x, const u32x4* qweight, const unsigned int* zeros, const half_bits* scales,    \
        OUT* y, float* partial, unsigned int* counters, int M, int K, int N, int g, int k_split) {        \
        w4a16_mma<MT, STAGES, OUT>(x, qweight, zeros, scales, y, partial, counters, M, K, N, g, k_split); \
    }
MMA_ENTRY(1, 8, f32, float)
MMA_ENTRY(2, 6, f32, float)
MMA_ENTRY(4, 4, f32, float)
MMA_ENTRY(1, 8, f16, half_bits)
MMA_ENTRY(2, 6, f16, half_bits)
MMA_ENTRY(4, 4, f16, half_bits)

// Ring depth per row tiles: as deep as the registers of four blocks per multiprocessor allow.
#define GEMV_ENTRY(ROWS, NT, D, NAME, OUT)                                                                 \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS, 4) w4a16_gemv_m##ROWS##_##NAME(            \
        const half_bits* x, const u32x4* qweight, const unsigned int* zeros, const half_bits* scales,     \
        OUT* y, float* partial, unsigned int* counters, int M, int K, int N, int g, int k_split) {         \
        w4a16_gemv<NT, D, OUT>(x, qweight, zeros, scales, y, partial, counters, M, K, N, g, k_split);     \
    }
GEMV_ENTRY(8, 1, 8, f32, float)
GEMV_ENTRY(16, 2, 4, f32, float)
GEMV_ENTRY(8, 1, 8, f16, half_bits)
GEMV_ENTRY(16, 2, 4, f16, half_bits)

// w16[n, k] (f16, row-major [N, K]) from the "mma" layout. Each warp decodes four k steps of
// one strip into shared memory, then writes each output row's 128 contiguous bytes whole.
extern "C" __global__ void __launch_bounds__(MMA_THREADS) w4a16_dequant(
    const u32x4* __restrict__ qweight, const unsigned int* __restrict__ zeros, const half_bits* __restrict__ scales,
    u32x4* __restrict__ w16, int K, int N, int g) {
    __shared__ __align__(16) unsigned int tile[MMA_WARPS][64][36];  // 64 rows x 32 words (+4: no conflicts)
    const int strips = (N + 63) / 64, steps = K / 16, quads = (steps + 3) / 4;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    const long long item = (long long)blockIdx.x * MMA_WARPS + warp;
    if (item >= (long long)strips * quads) return;  // no block-wide barrier below
    const int s = (int)(item / quads), t0 = (int)(item % quads) * 4;
    const int n_steps = min(4, steps - t0);
    unsigned int z2[8], s2[8], b[8][2];
    for (int u = 0; u < n_steps; u++) {
        const int t = t0 + u;
        const size_t at = group_at(t * 16 / g, strips, s, gid);
        build_group(*reinterpret_cast<const u32x4*>(scales + at * 8), zeros[at], z2, s2);
        decode(ld_stream(qweight + ((size_t)s * steps + t) * 32 + lane), z2, s2, b);
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int r = 0; r < 2; r++)  // odd tiles ran at 16 q: times 1/16 (0x2C00), exact
                tile[warp][8 * j + gid][8 * u + tig + 4 * r] = (j & 1) ? hmul2(b[j][r], 0x2C002C00u) : b[j][r];
    }
    __syncwarp();
    const int vecs = n_steps * 2;  // 16-byte pieces per row
    for (int e = lane; e < 64 * vecs; e += 32) {
        const int row = e / vecs, v = e % vecs, n = 64 * s + row;
        if (n >= N) continue;
        w16[((size_t)n * K + t0 * 16) / 8 + v] = *reinterpret_cast<const u32x4*>(&tile[warp][row][4 * v]);
    }
}
