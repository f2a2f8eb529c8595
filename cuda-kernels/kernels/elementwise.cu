// Element-wise and row-wise kernels of the decoder. Activations are f32, row-major.
// CPU twins: tp-runtime's CpuBackend (rms_norm, rotary, silu_mul, add_assign, embed, ...).

// y[r] = w * x[r] / sqrt(mean(x[r]^2) + eps); one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int rows, int cols, float eps) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + (size_t)row * cols;
    double sum = 0.0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        double v = xr[i];
        sum += v * v;
    }
    sum = block_reduce(sum, 0.0, Add());
    float inv = 1.0f / sqrtf((float)(sum / cols) + eps);
    float* yr = y + (size_t)row * cols;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = w[i] * (xr[i] * inv);
}

// Rotate-half rotary embeddings in place over the leading rotary_dim dimensions of each head
// (the rest pass through): pairs (i, i + r/2) rotate by the angle whose cos and sin are
// table[row, i] and table[row, r/2 + i], the table holding rotary_dim values a row.
extern "C" __global__ void rotary(float* __restrict__ x, const float* __restrict__ table, int rows,
                                  int cols, int head_dim, int rotary_dim) {
    int half = rotary_dim / 2;
    int heads = cols / head_dim;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)rows * heads * half;
    if (idx >= total) return;
    int i = (int)(idx % half);
    long long t = idx / half;
    int h = (int)(t % heads);
    int row = (int)(t / heads);
    float* p = x + (size_t)row * cols + (size_t)h * head_dim;
    float c = table[(size_t)row * rotary_dim + i];
    float s = table[(size_t)row * rotary_dim + half + i];
    float x1 = p[i], x2 = p[half + i];
    p[i] = x1 * c - x2 * s;
    p[half + i] = x2 * c + x1 * s;
}

// y = silu(g) * u = g / (1 + exp(-g)) * u.
extern "C" __global__ void silu_mul(const float* __restrict__ g, const float* __restrict__ u,
                                    float* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = g[i];
        y[i] = v / (1.0f + expf(-v)) * u[i];
    }
}

// y = gelu_tanh(g) * u: GELU's tanh approximation 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))),
// as PyTorch evaluates it in f32 (Gemma's gelu_pytorch_tanh).
extern "C" __global__ void gelu_tanh_mul(const float* __restrict__ g, const float* __restrict__ u,
                                         float* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = g[i];
        float inner = 0.7978845608028654f * (v + 0.044715f * (v * v * v));
        y[i] = 0.5f * v * (1.0f + tanhf(inner)) * u[i];
    }
}

// x *= factor (Gemma's embedding multiplier).
extern "C" __global__ void scale(float* __restrict__ x, float factor, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= factor;
}

// x = tanh(x / cap) * cap: soft-capped logits (Gemma 2).
extern "C" __global__ void softcap(float* __restrict__ x, float cap, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = tanhf(x[i] / cap) * cap;
}

// x += y.
extern "C" __global__ void add_assign(float* __restrict__ x, const float* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// x[r, c] += b[c].
extern "C" __global__ void add_bias(float* __restrict__ x, const float* __restrict__ b, int rows, int cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < (long long)rows * cols) x[i] += b[i % cols];
}

// Reads element i of a table as f32, for tables kept in their stored type.
struct LoadF32 {
    const float* t;
    __device__ __forceinline__ float operator()(long long i) const { return t[i]; }
};
struct LoadF16 {
    const half_bits* t;
    __device__ __forceinline__ float operator()(long long i) const { return f16_to_f32(t[i]); }
};
struct LoadBf16 {
    const unsigned short* t;
    __device__ __forceinline__ float operator()(long long i) const { return __uint_as_float((unsigned int)t[i] << 16); }
};

// out[r] = table[ids[r] - first_id] when the table holds that id, else zeros (another
// rank holds it). One block per row.
template <typename Load>
__device__ __forceinline__ void embed_rows(Load table, const unsigned int* __restrict__ ids, float* __restrict__ out,
                                           int n, int cols, int first_id, int table_rows) {
    int r = blockIdx.x;
    if (r >= n) return;
    long long local = (long long)ids[r] - first_id;
    bool held = local >= 0 && local < table_rows;
    float* o = out + (size_t)r * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) o[c] = held ? table(local * cols + c) : 0.0f;
}

extern "C" __global__ void embed(const float* __restrict__ table, const unsigned int* __restrict__ ids,
                                 float* __restrict__ out, int n, int cols, int first_id, int table_rows) {
    embed_rows(LoadF32{table}, ids, out, n, cols, first_id, table_rows);
}

extern "C" __global__ void embed_f16(const half_bits* __restrict__ table, const unsigned int* __restrict__ ids,
                                     float* __restrict__ out, int n, int cols, int first_id, int table_rows) {
    embed_rows(LoadF16{table}, ids, out, n, cols, first_id, table_rows);
}

extern "C" __global__ void embed_bf16(const unsigned short* __restrict__ table, const unsigned int* __restrict__ ids,
                                      float* __restrict__ out, int n, int cols, int first_id, int table_rows) {
    embed_rows(LoadBf16{table}, ids, out, n, cols, first_id, table_rows);
}

// out[i] = x[rows[i]]: the hidden states of the scored positions.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const unsigned int* __restrict__ rows,
                                       float* __restrict__ out, int n, int cols) {
    int i = blockIdx.x;
    if (i >= n) return;
    const float* src = x + (size_t)rows[i] * cols;
    float* dst = out + (size_t)i * cols;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) dst[c] = src[c];
}

// Fills a buffer with one value (NaN to poison outputs in tests).
extern "C" __global__ void fill(float* __restrict__ x, float value, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = value;
}

// f32 -> f16, for the cuBLAS f16 baseline.
extern "C" __global__ void to_f16(const float* __restrict__ x, half_bits* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = f32_to_f16(x[i]);
}

// f32 -> bf16, round to nearest even: the activations of a product with bf16 weights.
extern "C" __global__ void to_bf16(const float* __restrict__ x, unsigned short* __restrict__ y, long long n) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        unsigned short b;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(x[i]));
        y[i] = b;
    }
}
