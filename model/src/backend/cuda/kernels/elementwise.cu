// Elementwise kernels: activations, gated residuals, modulation tables, products, clamping.
//
// Flat kernels take the element count as u64 and loop with a grid stride; row kernels take one
// block per row (grid stride over rows) and loop over the row's columns. Products followed by a
// sum use __fmul_rn / __fadd_rn, which are never contracted into an FMA, so the results are
// rounded exactly as the CPU reference rounds them.

// x[i] = act(x[i]) for i < n (activation codes as in the prelude).
KERNEL void activate_inplace(float* __restrict__ x, u64 n, int act) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = activate(x[i], act);
}

// x[i] += y[i] for i < n.
KERNEL void add_inplace(float* __restrict__ x, const float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = x[i] + y[i];
}

// x[i] *= y[i] for i < n.
KERNEL void mul_inplace(float* __restrict__ x, const float* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        x[i] = x[i] * y[i];
}

// x[i] = clamp(x[i], lo, hi) for i < n; NaN stays NaN (as Rust's f32::clamp).
KERNEL void clamp_inplace(float* __restrict__ x, u64 n, float lo, float hi) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = x[i];
        x[i] = v < lo ? lo : (v > hi ? hi : v);
    }
}

// Gated residual over rows of width d of x, y [B, L, D] (rows = B·L, `tokens` = L):
// x[r, j] += y[r, j] · gate[offset + (r / L) · stride + j], the gate being row `index` of a
// modulation table [B, C, D] (offset = index·D, stride = C·D).
KERNEL void add_gated_rows(float* __restrict__ x, const float* __restrict__ y,
                           const float* __restrict__ gate, u64 offset, u64 stride, u64 rows,
                           u64 tokens, int d) {
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* g = gate + offset + (row / tokens) * stride;
        float* xr = x + row * d;
        const float* yr = y + row * d;
        for (int j = threadIdx.x; j < d; j += blockDim.x) xr[j] = __fadd_rn(xr[j], __fmul_rn(yr[j], g[j]));
    }
}

// Per-batch modulation rows: out[b, c, :] = table[c, :] + proj[b, ..] for rows = B·C output rows
// of width d, table [C, D] of storage type T, proj [B, C·D] (shared = 0) or [B, D] (shared = 1).
#define MODULATION_TABLE(S, T)                                                                     \
    KERNEL void modulation_table_##S(const T* __restrict__ table, const float* __restrict__ proj, \
                                     float* __restrict__ out, u64 rows, int chunks, int d,       \
                                     int shared) {                                               \
        for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {                               \
            u64 bi = row / chunks;                                                               \
            int ci = (int)(row % chunks);                                                        \
            const T* t = table + (u64)ci * d;                                                    \
            const float* p = proj + (shared ? bi : row) * d;                                     \
            float* o = out + row * d;                                                            \
            for (int j = threadIdx.x; j < d; j += blockDim.x) o[j] = to_f32(t[j]) + p[j];       \
        }                                                                                        \
    }
FOR_WEIGHT_TYPES(MODULATION_TABLE)
