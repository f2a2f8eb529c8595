// Causal grouped-query attention, flash-attention style: each block takes 32 queries of one
// head and walks their keys in tiles with an online softmax, so no score matrix larger than
// 32 x BK ever exists. f32 throughout. CPU twin: CpuBackend::attention.
//
// q [rows, heads*d], out [rows, heads*d]; k and v are a key store [key_rows, kv_heads*d]: the
// same rows as q in a plain forward pass, a KV cache when decoding. Query row r sits at
// position pos[r] of its sequence, whose position 0 is key-store row key_base[r]; it sees the
// key rows key_base[r] + p for p <= pos[r] and pos[r] - p < window. With softcap > 0 each
// scaled score s becomes softcap * tanh(s / softcap) (Gemma 2). Requires d <= 128 and
// d % 4 == 0.

#define BQ 32
#define ATT_THREADS 128
#define MAX_COLS 32  // d / 4 columns of the output per thread, d <= 128

extern "C" __global__ void attention(const float* __restrict__ q, const float* __restrict__ k,
                                     const float* __restrict__ v, float* __restrict__ out,
                                     const unsigned int* __restrict__ key_base,
                                     const unsigned int* __restrict__ pos, int rows, int heads,
                                     int kv_heads, int d, float scale, float softcap, int window,
                                     int bk) {
    extern __shared__ float smem[];
    float* qs = smem;                       // [BQ][d]
    float* ks = qs + BQ * d;                // [bk][d + 1]
    float* vs = ks + bk * (d + 1);          // [bk][d]
    float* s = vs + bk * d;                 // [BQ][bk + 1]
    float* m_s = s + BQ * (bk + 1);         // [BQ] running max
    float* l_s = m_s + BQ;                  // [BQ] running sum
    float* a_s = l_s + BQ;                  // [BQ] rescale factor of the current tile

    const float NEG_INF = -__int_as_float(0x7f800000);
    int tid = threadIdx.x;
    int q0 = blockIdx.x * BQ;
    int h = blockIdx.y;
    int kvh = h / (heads / kv_heads);
    int qstride = heads * d, kstride = kv_heads * d;
    int q_end = min(q0 + BQ, rows);

    for (int e = tid; e < BQ * d; e += ATT_THREADS) {
        int r = e / d, c = e % d, qi = q0 + r;
        qs[e] = qi < rows ? q[(size_t)qi * qstride + h * d + c] * scale : 0.0f;
    }
    if (tid < BQ) {
        m_s[tid] = NEG_INF;
        l_s[tid] = 0.0f;
    }
    // The key rows any query of the block sees: [kstart, kend).
    int kstart = 0x7fffffff, kend = 0;
    for (int qi = q0; qi < q_end; qi++) {
        int p = (int)pos[qi], base = (int)key_base[qi];
        int lo = p + 1 > window ? p + 1 - window : 0;
        if (base + lo < kstart) kstart = base + lo;
        if (base + p + 1 > kend) kend = base + p + 1;
    }

    int row = tid / 4, part = tid % 4, cols = d / 4;
    float acc[MAX_COLS];
#pragma unroll
    for (int c = 0; c < MAX_COLS; c++) acc[c] = 0.0f;

    for (int kb = kstart; kb < kend; kb += bk) {
        __syncthreads();
        for (int e = tid; e < bk * d; e += ATT_THREADS) {
            int j = e / d, c = e % d, kj = kb + j;
            bool in = kj < kend;
            ks[j * (d + 1) + c] = in ? k[(size_t)kj * kstride + kvh * d + c] : 0.0f;
            vs[j * d + c] = in ? v[(size_t)kj * kstride + kvh * d + c] : 0.0f;
        }
        __syncthreads();
        for (int e = tid; e < BQ * bk; e += ATT_THREADS) {
            int r = e / bk, j = e % bk, qi = q0 + r, kj = kb + j;
            bool valid = false;
            if (qi < rows && kj < kend) {
                int p = kj - (int)key_base[qi];  // the key's position in the query's sequence
                valid = p >= 0 && p <= (int)pos[qi] && (int)pos[qi] - p < window;
            }
            float dot = NEG_INF;
            if (valid) {
                dot = 0.0f;
                for (int c = 0; c < d; c++) dot += qs[r * d + c] * ks[j * (d + 1) + c];
                if (softcap > 0.0f) dot = tanhf(dot / softcap) * softcap;
            }
            s[r * (bk + 1) + j] = dot;
        }
        __syncthreads();
        if (tid < BQ) {
            float* sr = s + tid * (bk + 1);
            float mx = NEG_INF;
            for (int j = 0; j < bk; j++) mx = fmaxf(mx, sr[j]);
            float m_old = m_s[tid];
            float m_new = fmaxf(m_old, mx);
            float alpha = 1.0f, sum = 0.0f;
            if (m_new == NEG_INF) {
                for (int j = 0; j < bk; j++) sr[j] = 0.0f;
            } else {
                alpha = expf(m_old - m_new);
                for (int j = 0; j < bk; j++) {
                    float p = sr[j] == NEG_INF ? 0.0f : expf(sr[j] - m_new);
                    sr[j] = p;
                    sum += p;
                }
            }
            l_s[tid] = l_s[tid] * alpha + sum;
            m_s[tid] = m_new;
            a_s[tid] = alpha;
        }
        __syncthreads();
        float alpha = a_s[row];
        const float* pr = s + row * (bk + 1);
#pragma unroll
        for (int c = 0; c < MAX_COLS; c++) {
            if (c < cols) {
                int col = part * cols + c;
                float a = acc[c] * alpha;
                for (int j = 0; j < bk; j++) a += pr[j] * vs[j * d + col];
                acc[c] = a;
            }
        }
    }
    __syncthreads();
    int qi = q0 + row;
    if (qi < rows) {
        float inv = 1.0f / l_s[row];
#pragma unroll
        for (int c = 0; c < MAX_COLS; c++) {
            if (c < cols) out[(size_t)qi * qstride + h * d + part * cols + c] = acc[c] * inv;
        }
    }
}
