// The video autoencoder's per-frame spatial attention, f32: qkv[T, 3C, N] (N = H·W; channels
// [0, C) queries, [C, 2C) keys, [2C, 3C) values, channel-major) -> out[T, C, N],
// out[f, c, i] = Σ_j softmax_j(scale · Σ_c' q[c', i]·k[c', j]) · v[c, j].
//
// Flash attention read straight from the channel-major layout: one block of 256 threads per
// (frame, tile of 64 queries), blockIdx.x = f·⌈N/64⌉ + tile; key tiles of 64 with an online
// softmax (exp of the natural logit, like the CPU). A launch computes output channels
// [c_out0, c_out0 + CB) (C > CB takes several launches, each recomputing the scores):
// - scores: Q and K stream through shared memory in chunks of 32 channels ([32][64] each, rows
//   contiguous in memory, so the loads are coalesced); thread (ty, tx) = (tid / 16, tid % 16)
//   owns queries 4ty..4ty+3 × keys 4tx..4tx+3 (float4 reads). A row's 16 threads are one
//   half-warp: row reductions are xor-shuffles.
// - the probabilities go to shared memory transposed, P[key][query], with each row's rescale
//   factor;
// - P·V: V streams in chunks of 64 channels ([64][65]); thread (py, px) = (tid / 16, tid % 16)
//   owns queries 4px..4px+3 × channels py + 16m (m < 4) of every chunk: CB/4 accumulators.

#define VA_THREADS 256
#define VA_BQ 64
#define VA_BK 64
#define VA_QK_CHUNK 32
#define VA_V_CHUNK 64
#define VA_V_STRIDE (VA_BK + 1)
#define VA_P_STRIDE (VA_BQ + 4)

template <int CB>
__device__ __forceinline__ void vae_attention_tile(const float* __restrict__ qkv,
                                                   float* __restrict__ out, int c, int n,
                                                   float scale, int c_out0) {
    // Q and K chunks for the scores, then one V chunk: the same memory.
    __shared__ __align__(16) float stream[VA_V_CHUNK * VA_V_STRIDE];
    __shared__ __align__(16) float pt[VA_BK * VA_P_STRIDE];
    __shared__ float row_scale[VA_BQ];
    float* qc = stream;
    float* kc = stream + VA_QK_CHUNK * VA_BQ;
    float* vc = stream;

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15;
    const int qtiles = (n + VA_BQ - 1) / VA_BQ;
    const int f = blockIdx.x / qtiles;
    const int q0 = (blockIdx.x % qtiles) * VA_BQ;
    const u64 plane = (u64)c * n;  // one tensor of one frame
    const float* qf = qkv + (u64)f * 3 * plane;
    const float* kf = qf + plane;
    const float* vf = qf + 2 * plane;

    constexpr int VCH = CB / VA_V_CHUNK;
    float o[VCH][4][4];
#pragma unroll
    for (int vcb = 0; vcb < VCH; vcb++)
#pragma unroll
        for (int m = 0; m < 4; m++)
#pragma unroll
            for (int a = 0; a < 4; a++) o[vcb][m][a] = 0.0f;
    float mrow[4], lrow[4];
#pragma unroll
    for (int a = 0; a < 4; a++) {
        mrow[a] = __int_as_float(0xff800000);
        lrow[a] = 0.0f;
    }

    for (int k0 = 0; k0 < n; k0 += VA_BK) {
        float s[4][4];
#pragma unroll
        for (int a = 0; a < 4; a++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[a][e] = 0.0f;
        for (int c0 = 0; c0 < c; c0 += VA_QK_CHUNK) {
            __syncthreads();  // the shared chunks (or the last V chunk, or P) are consumed
            for (int e = tid; e < VA_QK_CHUNK * VA_BQ; e += VA_THREADS) {
                const int ch = c0 + e / VA_BQ, i = e % VA_BQ;
                const bool in = ch < c;
                qc[e] = in && q0 + i < n ? qf[(u64)ch * n + q0 + i] : 0.0f;
                kc[e] = in && k0 + i < n ? kf[(u64)ch * n + k0 + i] : 0.0f;
            }
            __syncthreads();
#pragma unroll 8
            for (int cc = 0; cc < VA_QK_CHUNK; cc++) {
                const float4 qa = *(const float4*)(qc + cc * VA_BQ + 4 * ty);
                const float4 kb = *(const float4*)(kc + cc * VA_BK + 4 * tx);
                const float qv[4] = {qa.x, qa.y, qa.z, qa.w};
                const float kv[4] = {kb.x, kb.y, kb.z, kb.w};
#pragma unroll
                for (int a = 0; a < 4; a++)
#pragma unroll
                    for (int e = 0; e < 4; e++) s[a][e] = fmaf(qv[a], kv[e], s[a][e]);
            }
        }

        // Online softmax of rows 4ty + a over keys 4tx + e (keys past n take no part).
#pragma unroll
        for (int a = 0; a < 4; a++) {
            float mx = __int_as_float(0xff800000);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[a][e] *= scale;
                if (k0 + 4 * tx + e < n) mx = fmaxf(mx, s[a][e]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float mn = fmaxf(mrow[a], mx);  // finite: every tile has a key < n
            const float corr = expf(mrow[a] - mn);
            float sum = 0.0f;
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = k0 + 4 * tx + e < n ? expf(s[a][e] - mn) : 0.0f;
                s[a][e] = p;
                sum += p;
            }
            mrow[a] = mn;
            lrow[a] = lrow[a] * corr + sum;
            if (tx == 0) row_scale[4 * ty + a] = corr;
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float4 col;
            col.x = s[0][e];
            col.y = s[1][e];
            col.z = s[2][e];
            col.w = s[3][e];
            *(float4*)(pt + (4 * tx + e) * VA_P_STRIDE + 4 * ty) = col;
        }
        __syncthreads();  // P and the rescale factors are written; the score chunks are consumed

        // P·V: this thread's queries 4tx + a, channels ty + 16m of each chunk.
#pragma unroll
        for (int a = 0; a < 4; a++) {
            const float r = row_scale[4 * tx + a];
#pragma unroll
            for (int w = 0; w < VCH; w++)
#pragma unroll
                for (int m = 0; m < 4; m++) o[w][m][a] *= r;
        }
#pragma unroll
        for (int vcb = 0; vcb < VCH; vcb++) {
            const int cbase = c_out0 + vcb * VA_V_CHUNK;
            if (cbase < c) {
                if (vcb > 0) __syncthreads();  // the previous V chunk is consumed
                for (int e = tid; e < VA_V_CHUNK * VA_BK; e += VA_THREADS) {
                    const int ch = cbase + e / VA_BK, j = e % VA_BK;
                    vc[(e / VA_BK) * VA_V_STRIDE + j] =
                        ch < c && k0 + j < n ? vf[(u64)ch * n + k0 + j] : 0.0f;
                }
                __syncthreads();
#pragma unroll 4
                for (int j = 0; j < VA_BK; j++) {
                    const float4 p = *(const float4*)(pt + j * VA_P_STRIDE + 4 * tx);
                    const float pv[4] = {p.x, p.y, p.z, p.w};
#pragma unroll
                    for (int m = 0; m < 4; m++) {
                        const float x = vc[(ty + 16 * m) * VA_V_STRIDE + j];
#pragma unroll
                        for (int a = 0; a < 4; a++) o[vcb][m][a] = fmaf(pv[a], x, o[vcb][m][a]);
                    }
                }
            }
        }
    }

    // Row sums to shared memory (the scores' roles), then out = acc / sum (the P·V roles).
#pragma unroll
    for (int a = 0; a < 4; a++) {
        float sum = lrow[a];
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        lrow[a] = sum;
    }
    // (row_scale was last read before the last tile's V chunks, behind a barrier.)
    if (tx == 0)
#pragma unroll
        for (int a = 0; a < 4; a++) row_scale[4 * ty + a] = lrow[a];
    __syncthreads();
    float* of = out + (u64)f * plane;
#pragma unroll
    for (int vcb = 0; vcb < VCH; vcb++)
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const int ch = c_out0 + vcb * VA_V_CHUNK + ty + 16 * m;
            if (ch < c)
#pragma unroll
                for (int a = 0; a < 4; a++) {
                    const int i = q0 + 4 * tx + a;
                    if (i < n) of[(u64)ch * n + i] = o[vcb][m][a] / row_scale[4 * tx + a];
                }
        }
}

// vae_attention_cCB: output channels [c_out0, c_out0 + CB) of every frame.
#define VAE_ATTENTION(CB)                                                                         \
    KERNEL void __launch_bounds__(VA_THREADS)                                                     \
        vae_attention_c##CB(const float* __restrict__ qkv, float* __restrict__ out, int c, int n, \
                            float scale, int c_out0) {                                            \
        vae_attention_tile<CB>(qkv, out, c, n, scale, c_out0);                                    \
    }
VAE_ATTENTION(64)
VAE_ATTENTION(128)
VAE_ATTENTION(256)
VAE_ATTENTION(384)
