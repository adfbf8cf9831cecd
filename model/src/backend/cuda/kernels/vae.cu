// Video-autoencoder kernels on frame-major [T, C, H, W] f32 activations: the convolutions as
// one implicit GEMM, channel RMS norm and nearest ×2 upsampling.

// ---------------------------------------------------------------------------------------------
// Convolutions
//
// Every convolution of the autoencoder (causal 3-D, stride-2 spatial, stride-2 temporal) is one
// implicit GEMM: out[co, p] = bias[co] + Σ_k W[k, co] · X[k, p] with M = Cout output channels,
// N = T_out·Ho·Wo output pixels (all output frames together, so that small frames still fill
// the tiles) and K = taps · Cin, ordered tap-major (k = tap·Cin + ci). X is never materialised:
// a block's B tile is gathered from the input while staged into shared memory, with the time
// padding (history frames, then zeros) and the spatial zero padding resolved per tap.

// Geometry of one convolution, filled and checked by the host (vae.rs `ConvShape`, same layout).
struct ConvShape {
    int cin, h, w;          // input frame [Cin, H, W]
    int cout, ho, wo;       // output frame [Cout, Ho, Wo]
    int kt, kh, kw;         // kernel taps
    int t_stride, s_stride; // stride in time and in space
    int lead;               // output frame fo, tap a reads input frame fo·t_stride + a − lead
    int pad_h, pad_w;       // zero rows / columns before the first (top / left)
    int hist_t;             // frames in the history buffer
    int hist_frames;        // of which the last hist_frames stand for input frames −1, −2, ...
    int n;                  // output pixels, T_out·Ho·Wo
    int ldw;                // row stride of the prepared weights (Cout rounded up to the tile)
};

// The weight [Cout, Cin, taps] (taps = kt·kh·kw, any storage type) as the GEMM's A operand:
// f32 rows k = tap·Cin + ci of ldw columns, wt[k, co] = w[co, ci, tap], zero for co ≥ Cout, so
// that the conv kernel loads whole aligned float4 rows without bounds checks. n = taps·Cin·ldw.
#define CONV_WEIGHT_PREP(S, T)                                                                 \
    KERNEL void vae_conv_weight_prep_##S(const T* __restrict__ w, float* __restrict__ wt,      \
                                         int cout, int cin, int taps, int ldw, u64 n) {        \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;                        \
             i += (u64)gridDim.x * blockDim.x) {                                               \
            int co = (int)(i % (u64)ldw);                                                      \
            u64 k = i / (u64)ldw;                                                              \
            int ci = (int)(k % (u64)cin), tap = (int)(k / (u64)cin);                           \
            wt[i] = co < cout ? to_f32(w[((u64)co * cin + ci) * taps + tap]) : 0.0f;           \
        }                                                                                      \
    }
FOR_WEIGHT_TYPES(CONV_WEIGHT_PREP)

constexpr int CONV_THREADS = 256;
constexpr int CONV_BK = 16;

// Where tap (a, b, c) of output pixel (fo, r, col) reads channel 0 of its input, or null where
// it reads zeros (time padding past the history, spatial padding, a pixel past the end).
__device__ __forceinline__ const float* conv_tap_source(const float* __restrict__ x,
                                                        const float* __restrict__ hist,
                                                        const ConvShape& s, bool valid, int fo,
                                                        int r, int col, int a, int b, int c) {
    if (!valid) return nullptr;
    long long frame = (long long)s.cin * s.h * s.w;
    int ti = fo * s.t_stride + a - s.lead;
    const float* base;
    if (ti >= 0) {
        base = x + ti * frame;
    } else if (-ti <= s.hist_frames) {
        base = hist + (s.hist_t + ti) * frame;  // −1 is the history's last frame
    } else {
        return nullptr;
    }
    int y = r * s.s_stride + b - s.pad_h, xc = col * s.s_stride + c - s.pad_w;
    if ((unsigned)y >= (unsigned)s.h || (unsigned)xc >= (unsigned)s.w) return nullptr;
    return base + (long long)y * s.w + xc;
}

// One BM × BN output tile (BM channels × BN pixels) per block of 256 threads, each thread a
// TM × TN register tile (TN = 8 pixels as two groups of 4, BN/2 apart, so that the shared-memory
// reads are conflict-free float4s). The reduction runs tap by tap over chunks of BK = 16 input
// channels; the next chunk is loaded into registers while the current one is multiplied from
// shared memory (double-buffered, one barrier per chunk). f32 FMA, f32 accumulation.
// Block b covers channel tile b % ceil(Cout/BM) and pixel tile b / ceil(Cout/BM), so blocks
// running together share their input pixels.
template <int BM, int BN, int TM>
__device__ __forceinline__ void conv_igemm(const float* __restrict__ x,
                                           const float* __restrict__ hist,
                                           const float* __restrict__ wt,
                                           const float* __restrict__ bias,
                                           float* __restrict__ out, const ConvShape& s) {
    constexpr int BK = CONV_BK, TN = 8;
    constexpr int TX = BN / TN;
    static_assert(TX * (BM / TM) == CONV_THREADS, "one register tile per thread");
    static_assert(TM == 2 || TM == 4, "TM is 2 or 4");
    static_assert(CONV_THREADS % BN == 0, "whole B rows per pass");
    constexpr int B_STEP = CONV_THREADS / BN;  // B rows loaded per pass
    constexpr int B_LOADS = BK / B_STEP;       // B elements per thread per chunk
    constexpr int A_VECS = BK * BM / 4;        // float4s of one A tile
    static_assert(A_VECS <= CONV_THREADS, "one A float4 per thread at most");

    __shared__ __align__(16) float As[2][BK][BM];
    __shared__ __align__(16) float Bs[2][BK][BN];

    const int tid = threadIdx.x;
    const int co_tiles = s.ldw / BM;
    const int co0 = (int)(blockIdx.x % (unsigned)co_tiles) * BM;
    const long long p0 = (long long)(blockIdx.x / (unsigned)co_tiles) * BN;
    const int hw = s.h * s.w, howo = s.ho * s.wo;

    // This thread's share of the loads: A float4 (row a_row, columns a_col..+4) and B column
    // b_col, rows b_row + j·B_STEP, for output pixel p0 + b_col.
    const bool a_active = tid < A_VECS;
    const int a_row = tid / (BM / 4), a_col = (tid % (BM / 4)) * 4;
    const int b_col = tid % BN, b_row = tid / BN;
    const long long p_load = p0 + b_col;
    const bool p_valid = p_load < s.n;
    int fo = 0, r = 0, col = 0;
    if (p_valid) {
        int p = (int)p_load;
        fo = p / howo;
        int q = p - fo * howo;
        r = q / s.wo;
        col = q - r * s.wo;
    }

    const int chunks = (s.cin + BK - 1) / BK;
    const int steps = s.kt * s.kh * s.kw * chunks;

    // Reduction position of the chunk being loaded: tap (ta, tb, tc) = linear tap, channel ci0.
    int tap = 0, ta = 0, tb = 0, tc = 0, ci0 = 0;
    const float* src = conv_tap_source(x, hist, s, p_valid, fo, r, col, 0, 0, 0);
    float4 a_reg = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    float b_reg[B_LOADS];

    auto load = [&]() {
        if (a_active) {
            int ci = ci0 + a_row;
            a_reg = ci < s.cin ? *reinterpret_cast<const float4*>(
                                     wt + ((long long)tap * s.cin + ci) * s.ldw + co0 + a_col)
                               : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) {
            int ci = ci0 + b_row + j * B_STEP;
            b_reg[j] = (src != nullptr && ci < s.cin) ? __ldg(src + (long long)ci * hw) : 0.0f;
        }
    };
    auto stage = [&](int buf) {
        if (a_active) *reinterpret_cast<float4*>(&As[buf][a_row][a_col]) = a_reg;
#pragma unroll
        for (int j = 0; j < B_LOADS; ++j) Bs[buf][b_row + j * B_STEP][b_col] = b_reg[j];
    };

    const int tx = tid % TX, ty = tid / TX;
    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    if (steps > 0) {
        load();
        stage(0);
    }
    __syncthreads();
    for (int step = 0; step < steps; ++step) {
        const int cur = step & 1;
        const bool more = step + 1 < steps;
        if (more) {
            ci0 += BK;
            if (ci0 >= s.cin) {
                ci0 = 0;
                ++tap;
                if (++tc == s.kw) {
                    tc = 0;
                    if (++tb == s.kh) {
                        tb = 0;
                        ++ta;
                    }
                }
                src = conv_tap_source(x, hist, s, p_valid, fo, r, col, ta, tb, tc);
            }
            load();
        }
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float av[TM];
            if constexpr (TM == 4) {
                float4 v = *reinterpret_cast<const float4*>(&As[cur][k][ty * 4]);
                av[0] = v.x, av[1] = v.y, av[2] = v.z, av[3] = v.w;
            } else {
                float2 v = *reinterpret_cast<const float2*>(&As[cur][k][ty * 2]);
                av[0] = v.x, av[1] = v.y;
            }
            float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][k][tx * 4]);
            float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][k][BN / 2 + tx * 4]);
            float bv[TN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (more) stage(cur ^ 1);
        __syncthreads();
    }

    // Output offsets of this thread's pixels without the channel term (−1: past the end).
    long long pix_off[TN];
#pragma unroll
    for (int j = 0; j < TN; ++j) {
        long long p = p0 + (j / 4) * (BN / 2) + tx * 4 + (j % 4);
        if (p < s.n) {
            int pi = (int)p, f = pi / howo;
            pix_off[j] = (long long)f * s.cout * howo + (pi - f * howo);
        } else {
            pix_off[j] = -1;
        }
    }
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        int co = co0 + ty * TM + i;
        if (co >= s.cout) continue;
        float bv = bias != nullptr ? bias[co] : 0.0f;
        long long co_off = (long long)co * howo;
#pragma unroll
        for (int j = 0; j < TN; ++j)
            if (pix_off[j] >= 0) out[pix_off[j] + co_off] = acc[i][j] + bv;
    }
}

// The convolution for Cout > 16: 64 channels × 128 pixels a block, 4 × 8 a thread.
// x [T, Cin, H, W]; hist [hist_t, Cin, H, W] or null; wt from vae_conv_weight_prep_*; bias
// [Cout] f32 or null; out [T_out, Cout, Ho, Wo]. Grid: ceil(Cout/64) · ceil(n/128) blocks of 256.
KERNEL void __launch_bounds__(CONV_THREADS, 2)
    vae_conv_igemm_64x128(const float* __restrict__ x, const float* __restrict__ hist,
                          const float* __restrict__ wt, const float* __restrict__ bias,
                          float* __restrict__ out, const ConvShape s) {
    conv_igemm<64, 128, 4>(x, hist, wt, bias, out, s);
}

// The convolution for Cout ≤ 16 (the decoder's RGB head): 16 channels × 256 pixels a block,
// 2 × 8 a thread. Arguments as vae_conv_igemm_64x128; grid ceil(Cout/16) · ceil(n/256) blocks.
KERNEL void __launch_bounds__(CONV_THREADS, 2)
    vae_conv_igemm_16x256(const float* __restrict__ x, const float* __restrict__ hist,
                          const float* __restrict__ wt, const float* __restrict__ bias,
                          float* __restrict__ out, const ConvShape s) {
    conv_igemm<16, 256, 2>(x, hist, wt, bias, out, s);
}

// ---------------------------------------------------------------------------------------------
// Channel RMS norm and upsampling

// y = x / max(‖x_c‖₂, 1e−12) · √C · γ (then SiLU when silu_after) over the C channels of every
// pixel of x [T, C, H, W]; one thread per (frame, pixel), consecutive threads on consecutive
// pixels of a channel plane. The sum of squares runs over channels in order without fused
// multiply-adds, and the scale is √C / max(‖x‖, 1e−12) applied as (x · scale) · γ, as on the CPU.
KERNEL void vae_channel_rms_norm(const float* __restrict__ x, const float* __restrict__ gamma,
                                 float* __restrict__ y, int c, int hw, u64 pixels, float root_c,
                                 int silu_after) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < pixels;
         i += (u64)gridDim.x * blockDim.x) {
        u64 f = i / (u64)hw;
        u64 base = f * (u64)c * hw + (i - f * hw);
        float ss = 0.0f;
        for (int ch = 0; ch < c; ++ch) {
            float v = x[base + (u64)ch * hw];
            ss = __fadd_rn(ss, __fmul_rn(v, v));
        }
        float scale = root_c / fmaxf(sqrtf(ss), 1e-12f);
        for (int ch = 0; ch < c; ++ch) {
            u64 at = base + (u64)ch * hw;
            float v = __fmul_rn(__fmul_rn(x[at], scale), gamma[ch]);
            y[at] = silu_after ? silu(v) : v;
        }
    }
}

// Nearest-neighbour ×2 in H and W: x [planes, H, W] -> y [planes, 2H, 2W]. One thread per input
// element (n = planes·H·W), writing its 2 × 2 output block as two float2 stores.
KERNEL void vae_upsample2x(const float* __restrict__ x, float* __restrict__ y, int w, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x) {
        u64 row = i / (u64)w;  // plane·H + r
        u64 col = i - row * w;
        float v = x[i];
        float2 pair = make_float2(v, v);
        float2* top = reinterpret_cast<float2*>(y + (2 * row) * (2 * (u64)w) + 2 * col);
        top[0] = pair;
        top[w] = pair;  // the next output row, 2W floats = W float2s further
    }
}
