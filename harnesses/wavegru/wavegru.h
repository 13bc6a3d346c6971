// wavegru.h: the locked interface between the harness and kernel.cu. Do not edit.
//
// The harness compiles kernel.cu with this header on the include path, loads the cubin through
// the CUDA driver API, reads `wavegru_launch` (WAVEGRU_LAUNCH_SYMBOL) from it, allocates every
// buffer, fills the outputs with a sentinel, zeroes the workspace, and launches the entry point
// `wavegru_generate` (WAVEGRU_ENTRY) once per generation, with one WavegruParams by value.
#pragma once
#include <stdint.h>

#define WG_V 256            // mu-law classes
#define WG_E 1024           // embedding width
#define WG_H 1024           // GRU width (both layers)
#define WG_G 1024           // GLU width
#define WG_START_TOKEN 128  // the token fed at t = 0
#define WG_RMS_EPS 1e-6f    // RMSNorm(x; g) = x / sqrt(mean(x^2) + eps) * g

#define WG_MODE_GENERATE 0  // feed back the sampled token; p[t] = p_sel of the sampled token
#define WG_MODE_TEACHER 1   // feed back teacher[t-1]; p[t] = probability of teacher[t] (0 if cut by min-p)

#define WG_WORKSPACE_BYTES (16u << 20)  // scratch for the kernel; zeroed before every launch

#define WAVEGRU_ENTRY "wavegru_generate"
#define WAVEGRU_LAUNCH_SYMBOL "wavegru_launch"

// All weight tensors are fp32, row-major, bf16-representable. Row blocks of the GRU matrices
// and biases are (r, z, n) as in torch.nn.GRU: W_ih0 is [3H][E], W_hh0 [3H][H], b_* [3H].
typedef struct {
    const float* emb;    // [V][E]
    const float* g0;     // [E]
    const float* W_ih0;  // [3H][E]
    const float* W_hh0;  // [3H][H]
    const float* b_ih0;  // [3H]
    const float* b_hh0;  // [3H]
    const float* g1;     // [H]
    const float* W_ih1;  // [3H][H]
    const float* W_hh1;  // [3H][H]
    const float* b_ih1;  // [3H]
    const float* b_hh1;  // [3H]
    const float* W_a;    // [G][H]
    const float* W_b;    // [G][H]
    const float* b_a;    // [G]
    const float* b_b;    // [G]
    const float* W_o;    // [V][G]
    const float* b_o;    // [V]
    const float* noise;  // Gumbel noise G[T][B][V]
    const int* teacher;  // [T][B] teacher tokens (WG_MODE_TEACHER), else NULL
    int* tokens;         // out [T][B]: the Gumbel-max sample of every step, every mode
    float* p;            // out [T][B]: see WG_MODE_*
    float* h0_out;       // out [B][H]: final state of layer 0
    float* h1_out;       // out [B][H]: final state of layer 1
    void* workspace;     // WG_WORKSPACE_BYTES of device memory, zeroed before every launch
    int T;               // steps
    int B;               // independent streams (initial state zero, first token WG_START_TOKEN)
    int mode;            // WG_MODE_GENERATE or WG_MODE_TEACHER
    float temperature;   // s = (W_o g + b_o) / temperature
    float log_min_p;     // keep v iff s_v - max(s) >= log_min_p (fp32 of ln(min_p))
    int reserved;        // 0
} WavegruParams;

// The launch configuration the harness reads from the cubin. cooperative != 0: launched with
// cuLaunchCooperativeKernel (all blocks co-resident; grid-wide barriers are safe).
typedef struct {
    unsigned int grid;        // blocks (1-D)
    unsigned int block;       // threads per block (1-D)
    unsigned int smem_bytes;  // dynamic shared memory per block
    unsigned int cooperative; // 1: cooperative launch
} WavegruLaunch;

#ifdef __cplusplus
static_assert(sizeof(WavegruParams) == 216, "WavegruParams layout is fixed by the harness");
static_assert(sizeof(WavegruLaunch) == 16, "WavegruLaunch layout is fixed by the harness");
#endif
