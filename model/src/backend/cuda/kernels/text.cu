// text kernels

// embedding
// Row gather: out[r, :] = table[ids[r], :] as f32, for rows = ids.len() rows of width d (table
// [V, D] of storage type T; every id is checked against V on the host).
#define EMBEDDING_GATHER(S, T)                                                                  \
    KERNEL void embedding_##S(const T* __restrict__ table, const unsigned* __restrict__ ids,    \
                              float* __restrict__ out, u64 rows, int d) {                      \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                              \
            const T* t = table + (u64)ids[row] * d;                                             \
            float* o = out + row * d;                                                           \
            for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = to_f32(t[j]);              \
        }                                                                                       \
    }
FOR_WEIGHT_TYPES(EMBEDDING_GATHER)

// attention_rel_bias
// UMT5 self-attention with a relative-position bias, f32: q[B, Lq, H, d], k/v[B, Lk, H, d] ->
// out[B, Lq, H, d], logits scale·(q_i·k_j) + rel[h, j − i + Lq − 1] (rel [H, Lq + Lk − 1]),
// softmax over j. One block of 128 threads per (batch item, head, query row), blockIdx.x =
// (b·H + h)·Lq + i (neighbouring blocks share K and V). Pass 1: each warp takes every 4th key,
// one warp-reduced dot product a key, and the block reduces the row maximum. Pass 2, per chunk
// of 128 keys: the warps recompute the logits into e^(logit − max) in shared memory, then thread
// c accumulates the weighted V column c (any d: columns in chunks of 128). The output is
// Σ e·v / Σ e.
#define RB_THREADS 128
#define RB_KEYS 128

// scale·(q·k) + bias, the product rounded before the bias is added (the CPU's order); every
// lane of the warp gets it.
__device__ __forceinline__ float rel_bias_logit(const float* __restrict__ qr,
                                                const float* __restrict__ kr, int d, float scale,
                                                float bias, int lane) {
    float acc = 0.0f;
    for (int c = lane; c < d; c += 32) acc = fmaf(qr[c], kr[c], acc);
    return __fmul_rn(scale, warp_sum(acc)) + bias;
}

KERNEL void __launch_bounds__(RB_THREADS)
    attention_rel_bias_f32(const float* __restrict__ q, const float* __restrict__ k,
                           const float* __restrict__ v, const float* __restrict__ rel,
                           float* __restrict__ out, int lq, int lk, int heads, int d,
                           float scale) {
    __shared__ float weights[RB_KEYS];
    __shared__ float warp_max_of[RB_THREADS / 32];
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int i = blockIdx.x % lq;
    const int bh = blockIdx.x / lq;
    const int h = bh % heads, b = bh / heads;
    const u64 tok = (u64)heads * d;
    const float* qr = q + ((u64)b * lq + i) * tok + (u64)h * d;
    const float* kb = k + (u64)b * lk * tok + (u64)h * d;
    const float* vb = v + (u64)b * lk * tok + (u64)h * d;
    // The bias of key j is rb[j].
    const float* rb = rel + (u64)h * (lq + lk - 1) + (lq - 1 - i);

    float mx = __int_as_float(0xff800000);
    for (int j = warp; j < lk; j += RB_THREADS / 32)
        mx = fmaxf(mx, rel_bias_logit(qr, kb + (u64)j * tok, d, scale, rb[j], lane));
    if (lane == 0) warp_max_of[warp] = mx;
    __syncthreads();
    mx = warp_max_of[0];
    for (int w = 1; w < RB_THREADS / 32; w++) mx = fmaxf(mx, warp_max_of[w]);

    float* orow = out + ((u64)b * lq + i) * tok + (u64)h * d;
    for (int c0 = 0; c0 < d; c0 += RB_THREADS) {
        const int c = c0 + tid;
        float acc = 0.0f, sum = 0.0f;
        for (int j0 = 0; j0 < lk; j0 += RB_KEYS) {
            const int n = min(RB_KEYS, lk - j0);
            __syncthreads();  // the previous chunk's weights are consumed
            for (int jj = warp; jj < n; jj += RB_THREADS / 32) {
                const int j = j0 + jj;
                const float s = rel_bias_logit(qr, kb + (u64)j * tok, d, scale, rb[j], lane);
                if (lane == 0) weights[jj] = expf(s - mx);
            }
            __syncthreads();
            const float* vc = vb + (u64)j0 * tok + c;
            for (int jj = 0; jj < n; jj++) {
                const float e = weights[jj];
                sum += e;
                if (c < d) acc = fmaf(e, vc[(u64)jj * tok], acc);
            }
        }
        if (c < d) orow[c] = acc / sum;
    }
}
