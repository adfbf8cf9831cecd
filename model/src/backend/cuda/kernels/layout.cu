// Layout kernels: rotary embedding, patchify, unpatchify.
//
// One block per row (grid stride over rows), threads striding over the row. Per-row indices are
// u64; indices inside a row are int (the host checks every dimension against 2^31 - 1).

// Rotary embedding of x [B, L, H, d] in place, rows = B·L token rows of H·d, half = d / 2:
// pair j = h·half + i of a row (elements 2j, 2j + 1, since h·d + 2i = 2j) is rotated by
// cos[l, i], sin[l, i] (tables [L, half], l = row % tokens):
// (a, b) -> (a·cos - b·sin, a·sin + b·cos), rounded as the CPU rounds it (no FMA contraction).
KERNEL void rope_rows(float* __restrict__ x, const float* __restrict__ cos_table,
                      const float* __restrict__ sin_table, u64 rows, u64 tokens, int heads,
                      int half) {
    const int pairs = heads * half;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 l = row % tokens;
        const float* c = cos_table + l * half;
        const float* s = sin_table + l * half;
        float* xr = x + row * (u64)(2 * pairs);
        for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
            const int i = j % half;
            const float a = xr[2 * j], b = xr[2 * j + 1];
            xr[2 * j] = __fsub_rn(__fmul_rn(a, c[i]), __fmul_rn(b, s[i]));
            xr[2 * j + 1] = __fadd_rn(__fmul_rn(a, s[i]), __fmul_rn(b, c[i]));
        }
    }
}

// x [B, C, F, H, W] -> out [B, L, C·pt·ph·pw] with L = gf·gh·gw tokens (gf = F / pt, ...; rows
// = B·L): token (fi·gh + hi)·gw + wi takes the patch at frame fi·pt, row hi·ph, column wi·pw,
// feature ((c·pt + kt)·ph + kh)·pw + kw (the Conv3d weight layout).
KERNEL void patchify_rows(const float* __restrict__ x, float* __restrict__ out, u64 rows,
                          int tokens, int channels, int frames, int height, int width, int gh,
                          int gw, int pt, int ph, int pw) {
    const int feat = channels * pt * ph * pw;
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const u64 bi = row / tokens;
        const int tok = (int)(row % tokens);
        const int fi = tok / (gh * gw), hi = (tok / gw) % gh, wi = tok % gw;
        float* o = out + row * feat;
        for (int j = threadIdx.x; j < feat; j += blockDim.x) {
            const int kw = j % pw, kh = (j / pw) % ph, kt = (j / (pw * ph)) % pt;
            const int ci = j / (pw * ph * pt);
            const u64 plane = (bi * channels + ci) * frames + fi * pt + kt;
            o[j] = x[(plane * height + hi * ph + kh) * width + wi * pw + kw];
        }
    }
}

// y [B, L, pt·ph·pw·C] (channel fastest; L = gf·gh·gw) -> out [B, C, F, H, W] with F = gf·pt,
// H = gh·ph, W = gw·pw; one block per (b, c, frame) plane of H·W (planes = B·C·F): pixel
// (fr, r, col) comes from token (fr / pt · gh + r / ph) · gw + col / pw, feature
// ((fr % pt · ph + r % ph) · pw + col % pw) · C + c.
KERNEL void unpatchify_planes(const float* __restrict__ y, float* __restrict__ out, u64 planes,
                              int channels, int frames, int height, int width, int gh, int gw,
                              int pt, int ph, int pw) {
    const int tokens = frames / pt * gh * gw;
    const int feat = pt * ph * pw * channels;
    const int hw = height * width;
    for (u64 plane = blockIdx.x; plane < planes; plane += gridDim.x) {
        const u64 bi = plane / ((u64)channels * frames);
        const int ci = (int)((plane / frames) % channels);
        const int fr = (int)(plane % frames);
        const int fi = fr / pt, kt = fr % pt;
        const float* yb = y + bi * tokens * feat;
        float* o = out + plane * hw;
        for (int p = threadIdx.x; p < hw; p += blockDim.x) {
            const int r = p / width, col = p % width;
            const int tok = (fi * gh + r / ph) * gw + col / pw;
            const int fidx = ((kt * ph + r % ph) * pw + col % pw) * channels + ci;
            o[p] = yb[(u64)tok * feat + fidx];
        }
    }
}
