// Normalisation kernels: layer norm (affine and / or modulated), sums of squares, RMS scaling.
//
// One block per row of width d (grid stride over rows), threads striding over the row's columns;
// row reductions accumulate in f32 per thread and combine with block_sum. As in the CPU
// reference, layer norm is two-pass (mean, then the sum of squared deviations: the biased
// variance) and takes 1 / sqrt (IEEE) rather than an approximate rsqrt; the products followed
// by sums of the output step use __fmul_rn / __fadd_rn (never contracted into an FMA) to round
// as the CPU does.

// Layer norm of rows = B·L rows of x [B, L, D] into y, then optionally the affine map
// o·weight[j] + bias[j] (weight and bias [D] of storage type W), then optionally the modulation
// o·(1 + scale[b, j]) + shift[b, j], where shift / scale of batch item b = row / tokens start at
// `off + b·stride` of their f32 modulation table.
template <typename W, bool AFFINE, bool MOD>
__device__ __forceinline__ void layer_norm_body(const float* __restrict__ x, float* __restrict__ y,
                                                const W* __restrict__ weight,
                                                const W* __restrict__ bias,
                                                const float* __restrict__ shift, u64 shift_off,
                                                u64 shift_stride, const float* __restrict__ scale,
                                                u64 scale_off, u64 scale_stride, u64 rows,
                                                u64 tokens, int d, float eps) {
    __shared__ float scratch[32];
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * d;
        float* yr = y + row * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j];
        const float mean = block_sum(s, scratch) / (float)d;
        float q = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            const float t = xr[j] - mean;
            q += t * t;
        }
        const float var = block_sum(q, scratch);
        const float rstd = 1.0f / sqrtf(var / (float)d + eps);
        const u64 bi = row / tokens;
        const float* sh = MOD ? shift + shift_off + bi * shift_stride : nullptr;
        const float* sc = MOD ? scale + scale_off + bi * scale_stride : nullptr;
        for (int j = threadIdx.x; j < d; j += blockDim.x) {
            float o = __fmul_rn(xr[j] - mean, rstd);
            if constexpr (AFFINE) o = __fadd_rn(__fmul_rn(o, to_f32(weight[j])), to_f32(bias[j]));
            if constexpr (MOD) o = __fadd_rn(__fmul_rn(o, 1.0f + sc[j]), sh[j]);
            yr[j] = o;
        }
    }
}

// Plain layer norm (no affine map, no modulation).
KERNEL void layer_norm_plain(const float* __restrict__ x, float* __restrict__ y, u64 rows,
                             u64 tokens, int d, float eps) {
    layer_norm_body<float, false, false>(x, y, nullptr, nullptr, nullptr, 0, 0, nullptr, 0, 0,
                                         rows, tokens, d, eps);
}

// Modulated layer norm (no affine map).
KERNEL void layer_norm_mod(const float* __restrict__ x, float* __restrict__ y,
                           const float* __restrict__ shift, u64 shift_off, u64 shift_stride,
                           const float* __restrict__ scale, u64 scale_off, u64 scale_stride,
                           u64 rows, u64 tokens, int d, float eps) {
    layer_norm_body<float, false, true>(x, y, nullptr, nullptr, shift, shift_off, shift_stride,
                                        scale, scale_off, scale_stride, rows, tokens, d, eps);
}

// Affine layer norm, with or without modulation, per storage type of the affine parameters.
#define LAYER_NORM_AFFINE(S, T)                                                                   \
    KERNEL void layer_norm_affine_##S(const float* __restrict__ x, float* __restrict__ y,        \
                                      const T* __restrict__ weight, const T* __restrict__ bias,  \
                                      u64 rows, u64 tokens, int d, float eps) {                  \
        layer_norm_body<T, true, false>(x, y, weight, bias, nullptr, 0, 0, nullptr, 0, 0, rows,  \
                                        tokens, d, eps);                                         \
    }                                                                                           \
    KERNEL void layer_norm_affine_mod_##S(                                                      \
        const float* __restrict__ x, float* __restrict__ y, const T* __restrict__ weight,        \
        const T* __restrict__ bias, const float* __restrict__ shift, u64 shift_off,              \
        u64 shift_stride, const float* __restrict__ scale, u64 scale_off, u64 scale_stride,      \
        u64 rows, u64 tokens, int d, float eps) {                                               \
        layer_norm_body<T, true, true>(x, y, weight, bias, shift, shift_off, shift_stride, scale, \
                                       scale_off, scale_stride, rows, tokens, d, eps);          \
    }
FOR_WEIGHT_TYPES(LAYER_NORM_AFFINE)

// out[r] = Σ_j x[r, j]² for `rows` rows of width d.
KERNEL void sum_squares_rows(const float* __restrict__ x, float* __restrict__ out, u64 rows,
                             int d) {
    __shared__ float scratch[32];
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + row * d;
        float s = 0.0f;
        for (int j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) out[row] = s;
    }
}

// x[r, j] = x[r, j] · (1 / sqrt(sumsq[r] / full + eps)) · weight[j], in place, for `rows` rows of
// width d (weight [D] of storage type T).
#define RMS_APPLY(S, T)                                                                          \
    KERNEL void rms_apply_##S(float* __restrict__ x, const float* __restrict__ sumsq,           \
                              const T* __restrict__ weight, u64 rows, int d, float full,         \
                              float eps) {                                                       \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                               \
            const float r = 1.0f / sqrtf(sumsq[row] / full + eps);                              \
            float* xr = x + row * d;                                                             \
            for (int j = threadIdx.x; j < d; j += blockDim.x)                                   \
                xr[j] = __fmul_rn(__fmul_rn(xr[j], r), to_f32(weight[j]));                      \
        }                                                                                        \
    }
FOR_WEIGHT_TYPES(RMS_APPLY)
