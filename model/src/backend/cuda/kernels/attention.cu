// Attention kernels: flash attention (online softmax over key tiles; the Lq×Lk score matrix is
// never stored) for q[B, Lq, H, d], k/v[B, Lk, H, d] -> out[B, Lq, H, d], logits
// scale·(q·k), optional key multiplicities mult[B, Lk].
//
// Key weights, as the CPU reference computes them: a key of multiplicity m > 0 enters the
// softmax with weight m·exp(logit − max), the maximum taken over such keys only; a key of
// multiplicity 0 (and every tile row past Lk) takes no part. A query row no key takes part in
// comes out 0/0 = NaN, as on the CPU.
//
// Two kernel families, one instantiation per head-width bucket D (32, 64, 128; d ≤ D, the
// unused columns zero in shared memory):
// - attention_f32_dD: every product in f32 (SIMT), exp of the natural logit like the CPU.
// - attention_bf16_dD: bf16 tensor cores (mma.sync m16n8k16, f32 accumulation) for Q·Kᵀ and
//   P·V, softmax in f32 in the log2 domain.
// Both launch one block per (64 or 128-query tile, head, batch item) flattened into blockIdx.x,
// query tile fastest, and take their shared memory dynamically (sizes in attention.rs).

#define ATTN_NEG_INF __int_as_float(0xff800000)
#define LOG2E_F 1.4426950408889634f

extern __shared__ float4 attn_smem[];

// === f32 SIMT kernel ===
//
// 256 threads, 64 queries × 64 keys a tile. Thread (ty, tx) = (tid / 16, tid % 16) owns query
// rows ty + 16i (i < 4), the scores of keys tx + 16j (j < 4) and the output columns
// tx + 16jj (jj < D/16). Shared memory: Q [64][D+1] (staged once) and one K-then-V buffer
// [64][D+1] (odd row stride: column reads are bank-conflict free), key weights [64].
// The 16 threads of a row are one half-warp: row reductions are xor-shuffles within it, and
// P reaches the P·V product through shuffles instead of shared memory.

#define F32_THREADS 256
#define F32_BQ 64
#define F32_BK 64

template <int D>
__device__ __forceinline__ void attention_f32_tile(const float* __restrict__ q,
                                                   const float* __restrict__ k,
                                                   const float* __restrict__ v,
                                                   const float* __restrict__ mult, int has_mult,
                                                   float* __restrict__ out, int lq, int lk,
                                                   int heads, int d, float scale) {
    constexpr int S = D + 1;
    constexpr int NJ = D / 16;
    float* qs = (float*)attn_smem;
    float* kv = qs + F32_BQ * S;
    float* ws = kv + F32_BK * S;

    const int tid = threadIdx.x, ty = tid >> 4, tx = tid & 15, lane = tid & 31;
    const int qtiles = (lq + F32_BQ - 1) / F32_BQ;
    const int qt = blockIdx.x % qtiles;
    const int bh = blockIdx.x / qtiles;
    const int h = bh % heads, b = bh / heads;
    const int q0 = qt * F32_BQ;
    const u64 tok = (u64)heads * d;  // floats from one token to the next
    const float* qb = q + (u64)b * lq * tok + (u64)h * d;
    const float* kb = k + (u64)b * lk * tok + (u64)h * d;
    const float* vb = v + (u64)b * lk * tok + (u64)h * d;

    for (int e = tid; e < F32_BQ * D; e += F32_THREADS) {
        const int r = e / D, c = e % D;
        qs[r * S + c] = (q0 + r < lq && c < d) ? qb[(u64)(q0 + r) * tok + c] : 0.0f;
    }

    float o[4][NJ];
    float m[4], l[4];
#pragma unroll
    for (int i = 0; i < 4; i++) {
        m[i] = ATTN_NEG_INF;
        l[i] = 0.0f;
#pragma unroll
        for (int jj = 0; jj < NJ; jj++) o[i][jj] = 0.0f;
    }

    for (int k0 = 0; k0 < lk; k0 += F32_BK) {
        __syncthreads();  // the previous tile's V (and, the first time, nothing) is consumed
        for (int e = tid; e < F32_BK * D; e += F32_THREADS) {
            const int r = e / D, c = e % D;
            kv[r * S + c] = (k0 + r < lk && c < d) ? kb[(u64)(k0 + r) * tok + c] : 0.0f;
        }
        if (tid < F32_BK) {
            const int key = k0 + tid;
            ws[tid] = key < lk ? (has_mult ? mult[(u64)b * lk + key] : 1.0f) : 0.0f;
        }
        __syncthreads();

        float s[4][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) s[i][j] = 0.0f;
#pragma unroll 8
        for (int c = 0; c < D; c++) {
            float qv[4], kx[4];
#pragma unroll
            for (int i = 0; i < 4; i++) qv[i] = qs[(ty + 16 * i) * S + c];
#pragma unroll
            for (int j = 0; j < 4; j++) kx[j] = kv[(tx + 16 * j) * S + c];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) s[i][j] = fmaf(qv[i], kx[j], s[i][j]);
        }

        float w[4];
#pragma unroll
        for (int j = 0; j < 4; j++) w[j] = ws[tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float mx = ATTN_NEG_INF;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                s[i][j] *= scale;
                if (w[j] > 0.0f) mx = fmaxf(mx, s[i][j]);
            }
#pragma unroll
            for (int off = 8; off > 0; off >>= 1)
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
            const float mn = fmaxf(m[i], mx);
            // No key of the row has taken part yet: keep everything at zero (no ∞ − ∞).
            const float corr = mn == ATTN_NEG_INF ? 1.0f : expf(m[i] - mn);
            float sum = 0.0f;
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float p = w[j] > 0.0f ? expf(s[i][j] - mn) * w[j] : 0.0f;
                s[i][j] = p;
                sum += p;
            }
            m[i] = mn;
            l[i] = l[i] * corr + sum;
#pragma unroll
            for (int jj = 0; jj < NJ; jj++) o[i][jj] *= corr;
        }

        __syncthreads();  // every thread is done with K
        for (int e = tid; e < F32_BK * D; e += F32_THREADS) {
            const int r = e / D, c = e % D;
            kv[r * S + c] = (k0 + r < lk && c < d) ? vb[(u64)(k0 + r) * tok + c] : 0.0f;
        }
        __syncthreads();

        // o[i][:] += Σ_key p[i][key] · V[key][:]; p of key src + 16j lives in lane (half | src).
#pragma unroll
        for (int j = 0; j < 4; j++) {
#pragma unroll 4
            for (int src = 0; src < 16; src++) {
                float p[4];
#pragma unroll
                for (int i = 0; i < 4; i++)
                    p[i] = __shfl_sync(0xffffffffu, s[i][j], (lane & 16) | src);
                const float* vr = kv + (src + 16 * j) * S + tx;
#pragma unroll
                for (int jj = 0; jj < NJ; jj++) {
                    const float x = vr[16 * jj];
#pragma unroll
                    for (int i = 0; i < 4; i++) o[i][jj] = fmaf(p[i], x, o[i][jj]);
                }
            }
        }
    }

    float* ob = out + (u64)b * lq * tok + (u64)h * d;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        float sum = l[i];
#pragma unroll
        for (int off = 8; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        const int row = q0 + ty + 16 * i;
        if (row < lq) {
#pragma unroll
            for (int jj = 0; jj < NJ; jj++) {
                const int c = tx + 16 * jj;
                if (c < d) ob[(u64)row * tok + c] = o[i][jj] / sum;
            }
        }
    }
}

// === bf16 tensor-core kernel ===
//
// 256 threads = 8 warps, 128 queries × 64 keys a tile; warp w owns query rows 16w..16w+15 of
// the tile. Shared memory (bf16, row stride D + 8 elements: an odd number of 16-byte units, so
// the 8 rows of an ldmatrix 8×8 matrix hit distinct banks): Q [128][D+8], K [64][D+8],
// V [64][D+8], all converted from f32 (round to nearest even) when staged, zero-padded past d,
// past Lq and past Lk; key weights [64] f32.
// Per tile and warp: S = Q·Kᵀ (16×64, f32 accumulators: 8 n-tiles × 4 registers) from
// ldmatrix.x4 fragments of Q (A, row-major) and K (B: K stored [key][dim] is B column-major);
// online softmax in f32 on the accumulators (thread holds rows g and g + 8 of its warp's 16,
// g = lane / 4, keys 8j + 2t, 8j + 2t + 1 for t = lane % 4; a row's 4 threads reduce with
// xor-shuffles 1 and 2); the probabilities, rounded to bf16, are the A fragments of P·V as they
// lie (accumulator layout of two n-tiles = A layout of one k-step); V's B fragments come from
// ldmatrix.x4.trans of V stored [key][dim].

#define BF16_THREADS 256
#define BF16_BQ 128
#define BF16_BK 64

// Two f32 values as packed bf16 (round to nearest even): `lo` in the low half.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// The shared-space address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a·b for one m16n8k16 tile: bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                         unsigned b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// A tile of rows [row0, row0 + ROWS) × columns [0, D) of a token-major f32 tensor (row stride
// `tok` floats; columns past d and rows past `rows` read as zero), in registers while in
// flight: thread tid holds column pair 2·(tid % (D/2)) of rows tid / (D/2) + i·(256 / (D/2)).
template <int D, int ROWS>
struct Tile {
    static constexpr int PAIRS = D / 2;
    static constexpr int STEP = BF16_THREADS / PAIRS;  // rows per pass of the block
    static constexpr int N = ROWS / STEP;               // pairs per thread
    float2 x[N];

    __device__ __forceinline__ void load(const float* __restrict__ src, int row0, int rows,
                                         u64 tok, int d) {
        const int c = 2 * (threadIdx.x % PAIRS), r = threadIdx.x / PAIRS;
        const bool pair = c + 1 < d, single = c + 1 == d, even = (d & 1) == 0;
        const float* p = src + (u64)(row0 + r) * tok + c;
#pragma unroll
        for (int i = 0; i < N; i++) {
            float2 v;
            v.x = 0.0f;
            v.y = 0.0f;
            if (row0 + r + i * STEP < rows) {
                const float* pi = p + (u64)(i * STEP) * tok;
                if (pair && even) {
                    v = *(const float2*)pi;
                } else if (pair) {
                    v.x = pi[0];
                    v.y = pi[1];
                } else if (single) {
                    v.x = pi[0];
                }
            }
            x[i] = v;
        }
    }

    // Into shared bf16 [ROWS][D + 8], rounded to nearest even.
    __device__ __forceinline__ void store(unsigned short* dst) const {
        const int c = 2 * (threadIdx.x % PAIRS), r = threadIdx.x / PAIRS;
        unsigned* out = (unsigned*)(dst + r * (D + 8) + c);
#pragma unroll
        for (int i = 0; i < N; i++) out[i * STEP * (D + 8) / 2] = pack_bf16x2(x[i].x, x[i].y);
    }
};

template <int D>
__device__ __forceinline__ void attention_bf16_tile(const float* __restrict__ q,
                                                    const float* __restrict__ k,
                                                    const float* __restrict__ v,
                                                    const float* __restrict__ mult, int has_mult,
                                                    float* __restrict__ out, int lq, int lk,
                                                    int heads, int d, float scale) {
    constexpr int S = D + 8;
    constexpr int ND = D / 8;  // n-tiles of the output
    unsigned short* qs = (unsigned short*)attn_smem;
    unsigned short* ks = qs + BF16_BQ * S;
    unsigned short* vs = ks + BF16_BK * S;
    float* ws = (float*)(vs + BF16_BK * S);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3;
    const int qtiles = (lq + BF16_BQ - 1) / BF16_BQ;
    const int qt = blockIdx.x % qtiles;
    const int bh = blockIdx.x / qtiles;
    const int h = bh % heads, b = bh / heads;
    const int q0 = qt * BF16_BQ;
    const u64 tok = (u64)heads * d;
    const float* kb = k + (u64)b * lk * tok + (u64)h * d;
    const float* vb = v + (u64)b * lk * tok + (u64)h * d;

    {
        Tile<D, BF16_BQ> qtile;
        qtile.load(q + (u64)b * lq * tok + (u64)h * d, q0, lq, tok, d);
        qtile.store(qs);
    }
    // The next key tile is read into registers while the current one is computed on.
    Tile<D, BF16_BK> kt, vt;
    kt.load(kb, 0, lk, tok, d);
    vt.load(vb, 0, lk, tok, d);

    // ldmatrix row addresses: lane L supplies row L % 8 of matrix L / 8.
    // Q (A of S): matrices (rows 0-7, 8-15) × (dims +0, +8) → a0..a3.
    const unsigned q_addr = smem_u32(qs + (warp * 16 + (lane & 15)) * S + (lane >> 4) * 8);
    // K (B of S): matrices (keys +0, +8) × (dims +0, +8), dims fastest → b0, b1 of two n-tiles.
    const unsigned k_addr = smem_u32(ks + ((lane >> 4) * 8 + (lane & 7)) * S + ((lane >> 3) & 1) * 8);
    // V (B of P·V, transposed): matrices (dims +0, +8) × (keys +0, +8), keys fastest.
    const unsigned v_addr = smem_u32(vs + (((lane >> 3) & 1) * 8 + (lane & 7)) * S + (lane >> 4) * 8);

    float o[ND][4];
#pragma unroll
    for (int n = 0; n < ND; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {ATTN_NEG_INF, ATTN_NEG_INF}, l[2] = {0.0f, 0.0f};
    const float scale2 = scale * LOG2E_F;

    for (int k0 = 0; k0 < lk; k0 += BF16_BK) {
        __syncthreads();  // the previous tile's K and V are consumed
        kt.store(ks);
        vt.store(vs);
        if (tid < BF16_BK) {
            const int key = k0 + tid;
            ws[tid] = key < lk ? (has_mult ? mult[(u64)b * lk + key] : 1.0f) : 0.0f;
        }
        __syncthreads();
        if (k0 + BF16_BK < lk) {
            kt.load(kb, k0 + BF16_BK, lk, tok, d);
            vt.load(vb, k0 + BF16_BK, lk, tok, d);
        }

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
            unsigned a[4];
            ldmatrix_x4(a, q_addr + kk * 32);
#pragma unroll
            for (int jp = 0; jp < 4; jp++) {
                unsigned bf[4];
                ldmatrix_x4(bf, k_addr + (jp * 16 * S + kk * 16) * 2);
                mma_bf16(s[2 * jp], a, bf[0], bf[1]);
                mma_bf16(s[2 * jp + 1], a, bf[2], bf[3]);
            }
        }

        // Online softmax on rows g (e = 0, 1) and g + 8 (e = 2, 3), keys 8j + 2t + (e & 1).
        float mx[2] = {ATTN_NEG_INF, ATTN_NEG_INF};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 w = *(const float2*)(ws + 8 * j + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                s[j][e] *= scale2;
                if ((e & 1 ? w.y : w.x) > 0.0f) mx[e >> 1] = fmaxf(mx[e >> 1], s[j][e]);
            }
        }
        float corr[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float mn = fmaxf(m[r], mx[r]);
            corr[r] = mn == ATTN_NEG_INF ? 1.0f : exp2f(m[r] - mn);
            m[r] = mn;
            l[r] *= corr[r];
        }
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const float2 w = *(const float2*)(ws + 8 * j + 2 * t);
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float we = e & 1 ? w.y : w.x;
                const float p = we > 0.0f ? exp2f(s[j][e] - m[e >> 1]) * we : 0.0f;
                s[j][e] = p;
                l[e >> 1] += p;
            }
        }
#pragma unroll
        for (int n = 0; n < ND; n++) {
            o[n][0] *= corr[0];
            o[n][1] *= corr[0];
            o[n][2] *= corr[1];
            o[n][3] *= corr[1];
        }

        // O += P·V, k-step kk over keys 16kk..16kk+15: P's A fragment is S n-tiles 2kk, 2kk+1.
#pragma unroll
        for (int kk = 0; kk < BF16_BK / 16; kk++) {
            const unsigned a[4] = {
                pack_bf16x2(s[2 * kk][0], s[2 * kk][1]),
                pack_bf16x2(s[2 * kk][2], s[2 * kk][3]),
                pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int np = 0; np < D / 16; np++) {
                unsigned bf[4];
                ldmatrix_x4_trans(bf, v_addr + (kk * 16 * S + np * 16) * 2);
                mma_bf16(o[2 * np], a, bf[0], bf[1]);
                mma_bf16(o[2 * np + 1], a, bf[2], bf[3]);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    float* ob = out + (u64)b * lq * tok + (u64)h * d;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int row = q0 + warp * 16 + g + 8 * r;
        if (row < lq) {
            float* orow = ob + (u64)row * tok;
#pragma unroll
            for (int n = 0; n < ND; n++) {
                const int c = 8 * n + 2 * t;
                if (c < d) orow[c] = o[n][2 * r] / l[r];
                if (c + 1 < d) orow[c + 1] = o[n][2 * r + 1] / l[r];
            }
        }
    }
}

#define ATTENTION_KERNELS(D, BF16_MIN_BLOCKS)                                                                   \
    KERNEL void __launch_bounds__(F32_THREADS)                                                   \
        attention_f32_d##D(const float* __restrict__ q, const float* __restrict__ k,             \
                           const float* __restrict__ v, const float* __restrict__ mult,          \
                           int has_mult, float* __restrict__ out, int lq, int lk, int heads,     \
                           int d, float scale) {                                                 \
        attention_f32_tile<D>(q, k, v, mult, has_mult, out, lq, lk, heads, d, scale);           \
    }                                                                                            \
    KERNEL void __launch_bounds__(BF16_THREADS, BF16_MIN_BLOCKS)                                                \
        attention_bf16_d##D(const float* __restrict__ q, const float* __restrict__ k,            \
                            const float* __restrict__ v, const float* __restrict__ mult,         \
                            int has_mult, float* __restrict__ out, int lq, int lk, int heads,    \
                            int d, float scale) {                                                \
        attention_bf16_tile<D>(q, k, v, mult, has_mult, out, lq, lk, heads, d, scale);          \
    }
// Blocks per SM the bf16 kernel's registers are budgeted for (two blocks: 128 registers a
// thread): from D = 64 the accumulators and the prefetched key tile need more.
ATTENTION_KERNELS(32, 2)
ATTENTION_KERNELS(64, 1)
ATTENTION_KERNELS(128, 1)
