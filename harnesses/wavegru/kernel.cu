// kernel.cu: the editable surface. A persistent cooperative WaveGRU generation kernel.
//
// Baseline design: 128 blocks x 256 threads (8 warps), one warp per hidden unit j (1024 warps):
//   - W_hh0 and W_hh1 rows of unit j (3 + 3 rows) live in registers as packed bf16, 32 elements
//     per lane x 32 lanes per row (exact: the weights are bf16-representable);
//   - W_ih0 / W_ih1 rows (3 + 3 per warp) and the GLU rows W_a[j], W_b[j] live in shared memory
//     as bf16; W_o is split in quarter rows across the warps (registers);
//   - RMSNorm and the sampler are computed redundantly in every block, so a step needs four
//     grid-wide barriers: after h0, after h1, after g, after the logits.
// Accumulation is fp32 everywhere; sigmoid / tanh / exp are the accurate libm versions.
#include <cooperative_groups.h>
#include "wavegru.h"

namespace cg = cooperative_groups;

#define NBLOCKS 128
#define NTHREADS 256
#define NWARPS (NTHREADS / 32)
#define ROWS_L (3 * NWARPS)   // W_ih rows per block per layer
#define ROWS_GLU (2 * NWARPS) // W_a, W_b rows per block

// dynamic shared memory layout (bytes)
#define ROW_BYTES (WG_H * 2)                             // one bf16 row
#define OFF_WIH0 0
#define OFF_WIH1 (OFF_WIH0 + ROWS_L * ROW_BYTES)
#define OFF_GLU (OFF_WIH1 + ROWS_L * ROW_BYTES)
#define OFF_X (OFF_GLU + ROWS_GLU * ROW_BYTES)          // RMSNorm'd layer input [1024] f32
#define OFF_H0 (OFF_X + WG_H * 4)                        // h0 (all units) [1024] f32
#define OFF_H1 (OFF_H0 + WG_H * 4)                       // h1 (all units) [1024] f32
#define OFF_G (OFF_H1 + WG_H * 4)                        // GLU output [1024] f32
#define OFF_RED (OFF_G + WG_G * 4)                       // reduction scratch [64] f32
#define SMEM_BYTES (OFF_RED + 64 * 4)

extern "C" __device__ const WavegruLaunch wavegru_launch = {NBLOCKS, NTHREADS, SMEM_BYTES, 1};

// workspace layout (floats): the vectors exchanged between blocks
#define WS_H0 0
#define WS_H1 (WS_H0 + WG_H)
#define WS_G (WS_H1 + WG_H)
#define WS_S (WS_G + WG_G)

__device__ __forceinline__ float bf_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }
// two bf16-representable floats -> one packed word (exact: the low halves are zero)
__device__ __forceinline__ uint32_t pack2(float a, float b) {
    return (__float_as_uint(a) >> 16) | (__float_as_uint(b) & 0xffff0000u);
}
__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

// lane `lane` holds elements k = 128*i + 4*lane + c (i < 8, c < 4) of a 1024-row:
// packed word m = 2*i + (c >> 1).
__device__ __forceinline__ void load_row_regs(uint32_t (&w)[16], const float* row, int lane) {
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float4 v = *reinterpret_cast<const float4*>(row + 128 * i + 4 * lane);
        w[2 * i] = pack2(v.x, v.y);
        w[2 * i + 1] = pack2(v.z, v.w);
    }
}
// the same layout in shared memory: uint4 chunk q (words 4q..4q+3) of row r at [(r*4+q)*32+lane]
__device__ __forceinline__ void store_row_smem(uint4* base, int r, const float* row, int lane) {
#pragma unroll
    for (int q = 0; q < 4; q++) {
        float4 a = *reinterpret_cast<const float4*>(row + 128 * (2 * q) + 4 * lane);
        float4 b = *reinterpret_cast<const float4*>(row + 128 * (2 * q + 1) + 4 * lane);
        base[(r * 4 + q) * 32 + lane] = make_uint4(pack2(a.x, a.y), pack2(a.z, a.w), pack2(b.x, b.y), pack2(b.z, b.w));
    }
}
__device__ __forceinline__ float dot_regs(const uint32_t (&w)[16], const float4* x, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float4 v = x[32 * i + lane];
        acc = fmaf(bf_lo(w[2 * i]), v.x, acc);
        acc = fmaf(bf_hi(w[2 * i]), v.y, acc);
        acc = fmaf(bf_lo(w[2 * i + 1]), v.z, acc);
        acc = fmaf(bf_hi(w[2 * i + 1]), v.w, acc);
    }
    return acc;
}
__device__ __forceinline__ float dot_smem(const uint4* base, int r, const float4* x, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int q = 0; q < 4; q++) {
        uint4 w = base[(r * 4 + q) * 32 + lane];
        float4 a = x[32 * (2 * q) + lane];
        float4 b = x[32 * (2 * q + 1) + lane];
        acc = fmaf(bf_lo(w.x), a.x, acc);
        acc = fmaf(bf_hi(w.x), a.y, acc);
        acc = fmaf(bf_lo(w.y), a.z, acc);
        acc = fmaf(bf_hi(w.y), a.w, acc);
        acc = fmaf(bf_lo(w.z), b.x, acc);
        acc = fmaf(bf_hi(w.z), b.y, acc);
        acc = fmaf(bf_lo(w.w), b.z, acc);
        acc = fmaf(bf_hi(w.w), b.w, acc);
    }
    return acc;
}
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// block-wide sum of one value per thread, same order in every block (deterministic)
__device__ __forceinline__ float block_sum(float v, float* red, int warp, int lane) {
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int i = 0; i < NWARPS; i++) t += red[i];
    return t;
}
// gather a 1024-float vector from the workspace (L2, not L1: other SMs wrote it)
__device__ __forceinline__ float4 gather4(const float* src, float* dst, int tid) {
    float4 v = __ldcg(reinterpret_cast<const float4*>(src) + tid);
    reinterpret_cast<float4*>(dst)[tid] = v;
    return v;
}
// RMSNorm of the 4 elements this thread holds into x (shared); `v` is elements 4*tid..4*tid+3
__device__ __forceinline__ void rmsnorm4(float4 v, const float* g, float* x, float* red, int tid, int warp, int lane) {
    float ss = v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    float tot = block_sum(ss, red, warp, lane);
    float den = sqrtf(tot / (float)WG_H + WG_RMS_EPS);
    float4 gg = __ldg(reinterpret_cast<const float4*>(g) + tid);
    float4 o = make_float4(v.x / den * gg.x, v.y / den * gg.y, v.z / den * gg.z, v.w / den * gg.w);
    reinterpret_cast<float4*>(x)[tid] = o;
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1) wavegru_generate(const WavegruParams p) {
    cg::grid_group grid = cg::this_grid();
    extern __shared__ __align__(16) unsigned char smem[];
    uint4* wih0 = reinterpret_cast<uint4*>(smem + OFF_WIH0);
    uint4* wih1 = reinterpret_cast<uint4*>(smem + OFF_WIH1);
    uint4* wglu = reinterpret_cast<uint4*>(smem + OFF_GLU);
    float* xs = reinterpret_cast<float*>(smem + OFF_X);
    float* h0s = reinterpret_cast<float*>(smem + OFF_H0);
    float* h1s = reinterpret_cast<float*>(smem + OFF_H1);
    float* gs = reinterpret_cast<float*>(smem + OFF_G);
    float* red = reinterpret_cast<float*>(smem + OFF_RED);
    float* ws = reinterpret_cast<float*>(p.workspace);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int j = blockIdx.x * NWARPS + warp;  // the hidden / GLU unit of this warp

    // ---- prologue: weights on chip -----------------------------------------------------------
    uint32_t whh0[3][16], whh1[3][16];
#pragma unroll
    for (int gte = 0; gte < 3; gte++) {
        load_row_regs(whh0[gte], p.W_hh0 + (size_t)(gte * WG_H + j) * WG_H, lane);
        load_row_regs(whh1[gte], p.W_hh1 + (size_t)(gte * WG_H + j) * WG_H, lane);
        store_row_smem(wih0, warp * 3 + gte, p.W_ih0 + (size_t)(gte * WG_H + j) * WG_E, lane);
        store_row_smem(wih1, warp * 3 + gte, p.W_ih1 + (size_t)(gte * WG_H + j) * WG_H, lane);
    }
    store_row_smem(wglu, warp * 2 + 0, p.W_a + (size_t)j * WG_H, lane);
    store_row_smem(wglu, warp * 2 + 1, p.W_b + (size_t)j * WG_H, lane);
    float bi0[3], bh0[3], bi1[3], bh1[3];
#pragma unroll
    for (int gte = 0; gte < 3; gte++) {
        bi0[gte] = p.b_ih0[gte * WG_H + j];
        bh0[gte] = p.b_hh0[gte * WG_H + j];
        bi1[gte] = p.b_ih1[gte * WG_H + j];
        bh1[gte] = p.b_hh1[gte * WG_H + j];
    }
    const float ba = p.b_a[j], bb = p.b_b[j];
    // output layer: warp -> logit v = 2*block + warp/4, quarter qo = warp%4 (256 columns);
    // lane holds columns 256*qo + 128*i + 4*lane + c, i < 2
    const int vo = blockIdx.x * 2 + (warp >> 2), qo = warp & 3;
    uint32_t wo[4];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        float4 v = *reinterpret_cast<const float4*>(p.W_o + (size_t)vo * WG_G + 256 * qo + 128 * i + 4 * lane);
        wo[2 * i] = pack2(v.x, v.y);
        wo[2 * i + 1] = pack2(v.z, v.w);
    }
    const float bo = p.b_o[vo];
    __syncthreads();

    const float4* x4 = reinterpret_cast<const float4*>(xs);
    const float4* h04 = reinterpret_cast<const float4*>(h0s);
    const float4* h14 = reinterpret_cast<const float4*>(h1s);
    const float4* g4 = reinterpret_cast<const float4*>(gs);

    for (int b = 0; b < p.B; b++) {
        reinterpret_cast<float4*>(h0s)[tid] = make_float4(0.f, 0.f, 0.f, 0.f);
        reinterpret_cast<float4*>(h1s)[tid] = make_float4(0.f, 0.f, 0.f, 0.f);
        __syncthreads();  // the zeroed states are visible to every warp before the first step
        float h0j = 0.f, h1j = 0.f;
        int y = WG_START_TOKEN;
        for (int t = 0; t < p.T; t++) {
            const float noise = p.noise[((size_t)t * p.B + b) * WG_V + tid];  // used by the sampler
            // ---- layer 0: x0 = RMSNorm(emb[y]) --------------------------------------------------
            float4 e = __ldg(reinterpret_cast<const float4*>(p.emb + (size_t)y * WG_E) + tid);
            rmsnorm4(e, p.g0, xs, red, tid, warp, lane);
            __syncthreads();
            {
                float a[6];
#pragma unroll
                for (int gte = 0; gte < 3; gte++) {
                    a[gte] = dot_smem(wih0, warp * 3 + gte, x4, lane);
                    a[3 + gte] = dot_regs(whh0[gte], h04, lane);
                }
#pragma unroll
                for (int k = 0; k < 6; k++) a[k] = warp_sum(a[k]);
                float r = sigmoidf_((a[0] + bi0[0]) + (a[3] + bh0[0]));
                float z = sigmoidf_((a[1] + bi0[1]) + (a[4] + bh0[1]));
                float n = tanhf((a[2] + bi0[2]) + r * (a[5] + bh0[2]));
                h0j = (1.f - z) * n + z * h0j;
                if (lane == 0) ws[WS_H0 + j] = h0j;
            }
            grid.sync();
            // ---- layer 1: x1 = RMSNorm(h0) --------------------------------------------------------
            {
                float4 v = gather4(ws + WS_H0, h0s, tid);
                rmsnorm4(v, p.g1, xs, red, tid, warp, lane);
                __syncthreads();
                float a[6];
#pragma unroll
                for (int gte = 0; gte < 3; gte++) {
                    a[gte] = dot_smem(wih1, warp * 3 + gte, x4, lane);
                    a[3 + gte] = dot_regs(whh1[gte], h14, lane);
                }
#pragma unroll
                for (int k = 0; k < 6; k++) a[k] = warp_sum(a[k]);
                float r = sigmoidf_((a[0] + bi1[0]) + (a[3] + bh1[0]));
                float z = sigmoidf_((a[1] + bi1[1]) + (a[4] + bh1[1]));
                float n = tanhf((a[2] + bi1[2]) + r * (a[5] + bh1[2]));
                h1j = (1.f - z) * n + z * h1j;
                if (lane == 0) ws[WS_H1 + j] = h1j;
            }
            grid.sync();
            // ---- GLU: g = (W_a h1 + b_a) * sigmoid(W_b h1 + b_b) ----------------------------------
            {
                __syncthreads();  // every warp is done reading h1s (layer 1 above)
                gather4(ws + WS_H1, h1s, tid);
                __syncthreads();
                float ga = warp_sum(dot_smem(wglu, warp * 2 + 0, h14, lane));
                float gb = warp_sum(dot_smem(wglu, warp * 2 + 1, h14, lane));
                if (lane == 0) ws[WS_G + j] = (ga + ba) * sigmoidf_(gb + bb);
            }
            grid.sync();
            // ---- output logits: s = (W_o g + b_o) / temperature ------------------------------------
            {
                gather4(ws + WS_G, gs, tid);
                __syncthreads();
                float acc = 0.f;
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    float4 v = g4[64 * qo + 32 * i + lane];
                    acc = fmaf(bf_lo(wo[2 * i]), v.x, acc);
                    acc = fmaf(bf_hi(wo[2 * i]), v.y, acc);
                    acc = fmaf(bf_lo(wo[2 * i + 1]), v.z, acc);
                    acc = fmaf(bf_hi(wo[2 * i + 1]), v.w, acc);
                }
                acc = warp_sum(acc);
                if (lane == 0) red[32 + warp] = acc;
                __syncthreads();
                if (tid < 2) {
                    const float* q = red + 32 + 4 * tid;
                    float s = (((q[0] + q[1]) + q[2]) + q[3] + p.b_o[blockIdx.x * 2 + tid]) / p.temperature;
                    ws[WS_S + blockIdx.x * 2 + tid] = s;
                }
            }
            grid.sync();
            // ---- sampler, redundantly in every block: min-p, then Gumbel-max ------------------------
            {
                const float s = __ldcg(ws + WS_S + tid);  // thread tid <-> token v = tid
                float m = warp_max(s);
                __syncthreads();
                if (lane == 0) red[warp] = m;
                __syncthreads();
#pragma unroll
                for (int i = 0; i < NWARPS; i++) m = fmaxf(m, red[i]);
                const float d = s - m;
                const bool keep = d >= p.log_min_p;
                float best = keep ? s + noise : -INFINITY;
                int arg = tid;
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) {
                    float ob = __shfl_xor_sync(0xffffffffu, best, o);
                    int oa = __shfl_xor_sync(0xffffffffu, arg, o);
                    if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
                }
                __syncthreads();
                if (lane == 0) { red[warp] = best; reinterpret_cast<int*>(red)[16 + warp] = arg; }
                __syncthreads();
                best = red[0];
                arg = reinterpret_cast<int*>(red)[16];
#pragma unroll
                for (int i = 1; i < NWARPS; i++) {
                    float ob = red[i];
                    int oa = reinterpret_cast<int*>(red)[16 + i];
                    if (ob > best || (ob == best && oa < arg)) { best = ob; arg = oa; }
                }
                const int chosen = (p.mode == WG_MODE_TEACHER) ? p.teacher[(size_t)t * p.B + b] : arg;
                if (blockIdx.x == 0) {
                    const float ev = keep ? expf(d) : 0.f;
                    float tot = block_sum(ev, red + 32, warp, lane);
                    if (tid == chosen) {
                        p.p[(size_t)t * p.B + b] = ev / tot;
                        p.tokens[(size_t)t * p.B + b] = arg;
                    }
                }
                y = chosen;
            }
        }
        // final states of this stream
        if (lane == 0) {
            p.h0_out[(size_t)b * WG_H + j] = h0j;
            p.h1_out[(size_t)b * WG_H + j] = h1j;
        }
        grid.sync();
    }
}
