// Host emulation of the attention kernel (attention.cu), for tests/emulated_attention.rs: the
// kernel's own source on the CPU (emulation/cuda_host.h), launched as gpu.rs launches it.
//
// Usage: host IN OUT
//   IN:  u64 rows, key_rows, heads, kv_heads, d, window (0: none), key_tile, grid_x, grid_y,
//        threads; f32 scale, softcap (0: none); q (rows x heads*d f32), k and v (key_rows x kv_heads*d f32),
//        key_base and pos (rows u32 each).
//   OUT: out (rows x heads*d f32), NaN wherever the kernel wrote nothing.
#include <cmath>
#include <climits>

#include "cuda_host.h"

inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}

#include "attention_host.inc"

int main(int argc, char** argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: host IN OUT\n");
        return 2;
    }
    FILE* in = fopen(argv[1], "rb");
    if (!in) return 2;
    std::vector<uint64_t> head(10);
    read(in, head);
    const int rows = (int)head[0], key_rows = (int)head[1], heads = (int)head[2], kv_heads = (int)head[3],
              d = (int)head[4], key_tile = (int)head[6], threads = (int)head[9];
    const int window = head[5] == 0 ? INT_MAX : (int)head[5];
    std::vector<float> scale(2), q((size_t)rows * heads * d), k((size_t)key_rows * kv_heads * d),
        v((size_t)key_rows * kv_heads * d);
    std::vector<unsigned> key_base(rows), pos(rows);
    read(in, scale);
    read(in, q);
    read(in, k);
    read(in, v);
    read(in, key_base);
    read(in, pos);
    fclose(in);
    std::vector<float> out(q.size(), NAN);
    launch({(unsigned)head[7], (unsigned)head[8], 1}, threads, [&] {
        attention(q.data(), k.data(), v.data(), out.data(), key_base.data(), pos.data(), rows, heads, kv_heads, d,
                  scale[0], scale[1], window, key_tile);
    });
    FILE* o = fopen(argv[2], "wb");
    if (!o) return 2;
    fwrite(out.data(), 4, out.size(), o);
    fclose(o);
    return 0;
}
