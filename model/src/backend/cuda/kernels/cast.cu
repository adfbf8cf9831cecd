// Storage-type conversions: activations to a GEMM's input type, weights to f32.

KERNEL void cast_f32_to_bf16(const float* __restrict__ x, bf16* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = to_bf16(x[i]);
}

KERNEL void cast_f32_to_f16(const float* __restrict__ x, f16* __restrict__ y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = to_f16(x[i]);
}

#define TO_F32(S, T)                                                                        \
    KERNEL void cast_##S##_to_f32(const T* __restrict__ x, float* __restrict__ y, u64 n) {   \
        for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n;                     \
             i += (u64)gridDim.x * blockDim.x)                                              \
            y[i] = to_f32(x[i]);                                                            \
    }
TO_F32(bf16, bf16)
TO_F32(f16, f16)
