// W4A16 products y[M, N] = x[M, K] . Wt[K, N] straight from the AWQ "gemm" layout:
// qweight [K, N/8] (nibble i of a word holds column 8c + ORDER[i]), qzeros [K/g, N/8]
// packed the same way, scales [K/g, N] f16, Wt[k, n] = (q - z) * s.
// CPU twin: tp-runtime's CpuAwq::matmul.
//
// - w4a16_gemv_m{1,2,4,8}: for M <= 16 (two passes of 8 above 8 rows). Each thread owns one
//   packed word column (8 outputs) over a slice of K; f32 arithmetic; every slice writes its
//   own partial sums, which w4a16_reduce adds in slice order (deterministic).
// - w4a16_gemm_tc: for larger M. 128 x 128 output tiles, K in steps of 32; activations are
//   rounded to f16 and weights dequantized to f16 in shared memory; tensor cores
//   (mma.sync m16n8k16, f32 accumulation).

// Column (within its word) held by nibble i: [0, 2, 4, 6, 1, 3, 5, 7][i]. A function, not a
// table, so that unrolled loops index register arrays with constants.
__device__ __forceinline__ constexpr int order(int i) { return i < 4 ? 2 * i : 2 * i - 7; }

#define GEMV_THREADS 128

template <int MT>
__device__ void gemv(const float* __restrict__ x, const unsigned int* __restrict__ qweight,
                     const unsigned int* __restrict__ qzeros, const half_bits* __restrict__ scales,
                     float* __restrict__ partial, int M, int K, int N, int g, int k_slice, int m0) {
    extern __shared__ float xs[];  // [MT][k_slice]
    int n8 = N / 8;
    int c = blockIdx.x * GEMV_THREADS + threadIdx.x;
    int slice = blockIdx.y;
    int k0 = slice * k_slice;
    int k1 = min(k0 + k_slice, K);
    for (int e = threadIdx.x; e < MT * k_slice; e += GEMV_THREADS) {
        int m = e / k_slice, kk = e % k_slice;
        int gm = m0 + m, gk = k0 + kk;
        xs[e] = (gm < M && gk < K) ? x[(size_t)gm * K + gk] : 0.0f;
    }
    __syncthreads();
    if (c >= n8) return;
    float acc[MT][8];
#pragma unroll
    for (int m = 0; m < MT; m++)
#pragma unroll
        for (int j = 0; j < 8; j++) acc[m][j] = 0.0f;
    int group = -1;
    float s[8], z[8];
    for (int k = k0; k < k1; k++) {
        int kg = k / g;
        if (kg != group) {
            group = kg;
            unsigned int zw = qzeros[(size_t)kg * n8 + c];
            const half_bits* sp = scales + (size_t)kg * N + (size_t)c * 8;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                z[order(i)] = (float)((zw >> (4 * i)) & 15u);
                s[i] = f16_to_f32(sp[i]);
            }
        }
        unsigned int w = qweight[(size_t)k * n8 + c];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int col = order(i);
            float wv = ((float)((w >> (4 * i)) & 15u) - z[col]) * s[col];
#pragma unroll
            for (int m = 0; m < MT; m++) acc[m][col] += xs[m * k_slice + (k - k0)] * wv;
        }
    }
#pragma unroll
    for (int m = 0; m < MT; m++) {
        int gm = m0 + m;
        if (gm < M) {
            float* p = partial + ((size_t)slice * M + gm) * N + (size_t)c * 8;
#pragma unroll
            for (int j = 0; j < 8; j++) p[j] = acc[m][j];
        }
    }
}

#define GEMV_ENTRY(MT)                                                                              \
    extern "C" __global__ void w4a16_gemv_m##MT(const float* x, const unsigned int* qweight,        \
                                                const unsigned int* qzeros, const half_bits* scales, \
                                                float* partial, int M, int K, int N, int g,          \
                                                int k_slice, int m0) {                               \
        gemv<MT>(x, qweight, qzeros, scales, partial, M, K, N, g, k_slice, m0);                     \
    }
GEMV_ENTRY(1)
GEMV_ENTRY(2)
GEMV_ENTRY(4)
GEMV_ENTRY(8)

// y[m, n] = sum over slices of partial[slice, m, n], in slice order.
extern "C" __global__ void w4a16_reduce(const float* __restrict__ partial, float* __restrict__ y, int slices,
                                        long long mn) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= mn) return;
    float sum = 0.0f;
    for (int sl = 0; sl < slices; sl++) sum += partial[(size_t)sl * mn + i];
    y[i] = sum;
}

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_PAD 8

__device__ __forceinline__ void mma_16816(float* c, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 256 threads = 8 warps: 2 along M (64 rows each) x 4 along N (32 columns each); each warp
// holds 4 x 4 mma tiles of 16 x 8.
extern "C" __global__ void __launch_bounds__(256) w4a16_gemm_tc(
    const float* __restrict__ x, const unsigned int* __restrict__ qweight, const unsigned int* __restrict__ qzeros,
    const half_bits* __restrict__ scales, float* __restrict__ y, int M, int K, int N, int g) {
    __shared__ __align__(16) half_bits as[TC_BM][TC_BK + TC_PAD];  // (m, k)
    __shared__ __align__(16) half_bits bs[TC_BN][TC_BK + TC_PAD];  // (n, k): B transposed
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    int warp_m = warp >> 2, warp_n = warp & 3;
    int gid = lane >> 2, tig = lane & 3;
    int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    int n8 = N / 8;
    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += TC_BK) {
        {
            int r = tid >> 1, c0 = (tid & 1) * 16, gm = m0 + r;
#pragma unroll
            for (int i = 0; i < 16; i++) {
                int gk = k0 + c0 + i;
                float val = (gm < M && gk < K) ? x[(size_t)gm * K + gk] : 0.0f;
                as[r][c0 + i] = f32_to_f16(val);
            }
        }
        for (int t = tid; t < TC_BK * (TC_BN / 8); t += 256) {
            int kr = t / (TC_BN / 8), wc = t % (TC_BN / 8);
            int gk = k0 + kr, gc = n0 / 8 + wc;
            if (gk < K && gc < n8) {
                unsigned int w = qweight[(size_t)gk * n8 + gc];
                int kg = gk / g;
                unsigned int zw = qzeros[(size_t)kg * n8 + gc];
                const half_bits* sp = scales + (size_t)kg * N + (size_t)gc * 8;
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    int col = order(i);
                    float q = (float)((w >> (4 * i)) & 15u);
                    float z = (float)((zw >> (4 * i)) & 15u);
                    bs[wc * 8 + col][kr] = f32_to_f16((q - z) * f16_to_f32(sp[col]));
                }
            } else {
#pragma unroll
                for (int i = 0; i < 8; i++) bs[wc * 8 + i][kr] = 0;
            }
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < TC_BK; kk += 16) {
            unsigned int a[4][4], b[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                int r = warp_m * 64 + mi * 16 + gid;
                a[mi][0] = *reinterpret_cast<const unsigned int*>(&as[r][kk + 2 * tig]);
                a[mi][1] = *reinterpret_cast<const unsigned int*>(&as[r + 8][kk + 2 * tig]);
                a[mi][2] = *reinterpret_cast<const unsigned int*>(&as[r][kk + 2 * tig + 8]);
                a[mi][3] = *reinterpret_cast<const unsigned int*>(&as[r + 8][kk + 2 * tig + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                int cn = warp_n * 32 + ni * 8 + gid;
                b[ni][0] = *reinterpret_cast<const unsigned int*>(&bs[cn][kk + 2 * tig]);
                b[ni][1] = *reinterpret_cast<const unsigned int*>(&bs[cn][kk + 2 * tig + 8]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_16816(acc[mi][ni], a[mi], b[ni]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int ni = 0; ni < 4; ni++) {
            int r = m0 + warp_m * 64 + mi * 16 + gid;
            int c = n0 + warp_n * 32 + ni * 8 + 2 * tig;
            if (c < N) {
                if (r < M) {
                    y[(size_t)r * N + c] = acc[mi][ni][0];
                    if (c + 1 < N) y[(size_t)r * N + c + 1] = acc[mi][ni][1];
                }
                if (r + 8 < M) {
                    y[(size_t)(r + 8) * N + c] = acc[mi][ni][2];
                    if (c + 1 < N) y[(size_t)(r + 8) * N + c + 1] = acc[mi][ni][3];
                }
            }
        }
    }
}
