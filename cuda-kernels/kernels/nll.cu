// The vocabulary reduction of perplexity: for each row of logits (held on the device; never
// copied to the host), [max, sum(exp(l - max)), logit of the target or 0 when another rank
// holds it]. CPU twin: CpuBackend::nll_parts.

extern "C" __global__ void nll_parts(const float* __restrict__ logits, const unsigned int* __restrict__ targets,
                                     float* __restrict__ parts, int rows, int vocab, int first_id) {
    int row = blockIdx.x;
    if (row >= rows) return;
    const float* l = logits + (size_t)row * vocab;
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, l[i]);
    m = block_reduce(m, -__int_as_float(0x7f800000), Max());
    double s = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += (double)expf(l[i] - m);
    s = block_reduce(s, 0.0, Add());
    if (threadIdx.x == 0) {
        long long t = (long long)targets[row] - first_id;
        parts[row * 3 + 0] = m;
        parts[row * 3 + 1] = (float)s;
        parts[row * 3 + 2] = (t >= 0 && t < vocab) ? l[t] : 0.0f;
    }
}
