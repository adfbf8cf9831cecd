// Shared by every kernel module (prepended to each .cu file before NVRTC compiles it).
// No CUDA header is included: a machine with only the driver has none. bf16 and f16 are
// 16-bit structs converted through bit casts and inline PTX.

#define KERNEL extern "C" __global__

typedef unsigned long long u64;

struct bf16 { unsigned short x; };
struct f16 { unsigned short x; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16 v) { return __uint_as_float(((unsigned)v.x) << 16); }
__device__ __forceinline__ float to_f32(f16 v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}

// f32 -> bf16, round to nearest even (NaN stays NaN).
__device__ __forceinline__ bf16 to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.x = (unsigned short)((u >> 16) | 0x40u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.x = (unsigned short)(u >> 16);
    }
    return r;
}

// f32 -> f16, round to nearest even.
__device__ __forceinline__ f16 to_f16(float f) {
    f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.x) : "f"(f));
    return r;
}

// Storing an f32 value into each storage type.
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(bf16* p, float v) { *p = to_bf16(v); }
__device__ __forceinline__ void store(f16* p, float v) { *p = to_f16(v); }

// Instantiate M(suffix, type) for every storage type a weight may have.
#define FOR_WEIGHT_TYPES(M) M(f32, float) M(bf16, bf16) M(f16, f16)

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

// 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715x³)))
__device__ __forceinline__ float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

// Activation codes shared with the host: 0 identity, 1 SiLU, 2 GELU (tanh form).
__device__ __forceinline__ float activate(float x, int act) {
    return act == 1 ? silu(x) : (act == 2 ? gelu_tanh(x) : x);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` holds 32 floats of shared memory; the call synchronises the block.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
