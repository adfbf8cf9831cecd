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
