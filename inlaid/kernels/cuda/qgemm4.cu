// inlaid small-M W4A16 GEMM: y[M, N] = x[M, K] @ W^T for M <= 64, fp16, tensor cores (sm_80+).
//
// Why a CUDA kernel: Triton gives no control over the register layout of unpacked codes, and its
// 4-bit GEMM stalls at ~20-40% of the weight-read floor for decode (docs/results/kernels.md). Here
// the weights are re-laid out once at load time (inlaid/kernels/cuda_gemm.py, `shuffle`) so that one
// 16-byte load per thread yields exactly the A fragments of four m16n8k16 MMAs: no shuffles, no
// shared memory, no layout conversion between the load and the MMA.
//
// Product: y^T = W x^T. The MMA's A operand (16 x 16) is a tile of W (16 output columns x 16 k), its
// B operand (16 x 8) eight tokens of x. Thread lane = 4g + t (g = lane / 4, t = lane % 4) holds, per
// PTX's m16n8k16 layout, A rows {g, g + 8} x logical k {2t, 2t+1, 2t+8, 2t+9} and B logical k
// {2t, 2t+1, 2t+8, 2t+9} x token g. A dot product does not care which physical k a logical k stands
// for as long as A and B agree, so in a 64-k "super tile" thread t takes the physical k
// [16t, 16t + 16): MMA j (0..3) maps logical {2t, 2t+1} to 16t + 4j + {0, 1} and {2t+8, 2t+9} to
// 16t + 4j + {2, 3}. The thread's x fragments are then 16 contiguous halves per token (two 16-byte
// loads), and its weight codes one uint4 whose word j feeds MMA j:
//   word j, nibble pair q (bits 4q.. and 16+4q..) = A register q of MMA j:
//   q = 0: row g,   k +0/+1   q = 1: row g+8, k +0/+1   q = 2: row g, k +2/+3   q = 3: row g+8, k +2/+3
// Dequantization: (pair | 0x64006400) is exactly (1024 + code) in each fp16 half; subtracting
// (1024 + zero) is exact (small integers) and the one rounding is the multiply by the scale: each
// weight is the fp32 reference's value rounded once to fp16, as in the Triton kernel.
//
// Work split: a warp owns NW tiles of 16 output columns over a range of super tiles; the 4 warps of a
// block own neighbouring columns over the same k range (their x loads hit L1), and the grid's y
// dimension splits K. Split-K partial sums go into an fp32 workspace; the last block of a column
// tile to arrive (an arrival counter) writes y and zeroes its workspace tile and counter again, so
// one launch does the whole product and the workspace is clean for the next call (and for CUDA-graph
// replays).

#include <cuda_fp16.h>
#include <stdint.h>

namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    // read once: keep it out of L1 (x and the scales need it)
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t h2_bits(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ half2 bits_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// Four A registers of one MMA from one word of codes. zs: (1024 + zero, scale) of rows g and g + 8.
__device__ __forceinline__ void dequant_word(uint32_t w, half2 z0, half2 s0, half2 z1, half2 s1,
                                             uint32_t* a) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        half2 v = bits_h2(((w >> (4 * q)) & 0x000F000Fu) | 0x64006400u);
        a[q] = h2_bits(__hmul2(__hsub2(v, (q & 1) ? z1 : z0), (q & 1) ? s1 : s0));
    }
}

template <int TM, int NW, int U>
__global__ void __launch_bounds__(kWarps * 32) qgemm4_kernel(
    const half* __restrict__ x,       // [M, K] (K permuted for act-order)
    const uint4* __restrict__ qw,     // [N / 16, K / 64, 32] one uint4 per lane
    const uint2* __restrict__ sz,     // [G, N / 16, 8]: (scale g, scale g+8, 1024+zero g, 1024+zero g+8)
    const int* __restrict__ gidx16,   // [K / 16] group of each 16-k chunk (read when group16 == 0)
    const half* __restrict__ bias,    // [N] or null
    half* __restrict__ y,             // [M, N]
    float* __restrict__ ws,           // [M, N] fp32, zero between calls (split > 1)
    int* __restrict__ counts,         // [gridDim.x], zero between calls (split > 1)
    int M, int N, int K,
    int group16) {  // > 0: every group is this many 16-k chunks, in order (no table lookup)
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int KS = K / 64, NT = N / 16;
    const int split = gridDim.y;
    const int ks_per = (KS + split - 1) / split;
    const int ks0 = blockIdx.y * ks_per, ks1 = min(KS, ks0 + ks_per);
    const int tile0 = (blockIdx.x * kWarps + warp) * NW;  // first 16-column tile of this warp

    float acc[NW][TM][4];
#pragma unroll
    for (int n = 0; n < NW; ++n)
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[n][i][e] = 0.f;

    // x rows this thread reads (token 8i + g); rows past M read row 0 and are masked by zeroing b
    const half* xrow[TM];
    bool xok[TM];
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int r = 8 * i + g;
        xok[i] = r < M;
        xrow[i] = x + (size_t)(xok[i] ? r : 0) * K + 16 * t;
    }

    // U super tiles per step, the next step's weights loaded before this step's math: 0.5-4 KB of
    // weight loads in flight per warp hide HBM latency without shared memory.
    uint4 cur[U][NW], nxt[U][NW];
    auto load_w = [&](uint4 (&dst)[U][NW], int ks) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int n = 0; n < NW; ++n)
                dst[u][n] = (ks + u < ks1)
                    ? load_stream(qw + ((size_t)(tile0 + n) * KS + ks + u) * 32 + lane)
                    : make_uint4(0, 0, 0, 0);
    };
    if (ks0 < ks1) load_w(cur, ks0);
    for (int ks = ks0; ks < ks1; ks += U) {
        if (ks + U < ks1) load_w(nxt, ks + U);
#pragma unroll
        for (int u = 0; u < U; ++u) {
            // Past the range (the last step of an uneven split) the loads re-read the last super
            // tile and a zero scale zeroes its weights: no branch, so the compiler can issue the
            // next super tile's loads before this one's MMAs.
            const bool live = ks + u < ks1;
            const int k = live ? ks + u : ks1 - 1;
            uint4 xv[TM][2];
#pragma unroll
            for (int i = 0; i < TM; ++i) {
                const uint4* p = reinterpret_cast<const uint4*>(xrow[i] + (size_t)k * 64);
                xv[i][0] = xok[i] ? __ldg(p) : make_uint4(0, 0, 0, 0);
                xv[i][1] = xok[i] ? __ldg(p + 1) : make_uint4(0, 0, 0, 0);
            }
            // computed, not loaded, for equal groups: the scale load then does not wait on another
            const int grp = group16 > 0 ? (4 * k + t) / group16 : __ldg(gidx16 + 4 * k + t);
#pragma unroll
            for (int n = 0; n < NW; ++n) {
                const uint2 zsv = __ldg(sz + ((size_t)grp * NT + tile0 + n) * 8 + g);
                const half2 sg = bits_h2(zsv.x), zg = bits_h2(zsv.y);  // (s_g, s_g8), (z_g, z_g8)
                const half2 live2 = __float2half2_rn(live ? 1.f : 0.f);
                const half2 s0 = __hmul2(__low2half2(sg), live2), s1 = __hmul2(__high2half2(sg), live2);
                const half2 z0 = __low2half2(zg), z1 = __high2half2(zg);
                const uint32_t words[4] = {cur[u][n].x, cur[u][n].y, cur[u][n].z, cur[u][n].w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    uint32_t a[4];
                    dequant_word(words[j], z0, s0, z1, s1, a);
#pragma unroll
                    for (int i = 0; i < TM; ++i) {
                        const uint32_t* xb = (j < 2) ? &xv[i][0].x : &xv[i][1].x;
                        mma(acc[n][i], a, xb[(2 * j) & 3], xb[(2 * j + 1) & 3]);
                    }
                }
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int n = 0; n < NW; ++n) cur[u][n] = nxt[u][n];
    }

    // C fragment: acc[n][i] = (col g, tokens 8i+2t, 8i+2t+1), (col g+8, same tokens). Without a
    // split the block writes y; otherwise it adds into the workspace.
#pragma unroll
    for (int n = 0; n < NW; ++n)
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int m = 8 * i + 2 * t + (e & 1);
                const int col = (tile0 + n) * 16 + g + 8 * (e >> 1);
                if (m >= M) continue;
                if (split == 1) {
                    const float v = acc[n][i][e] + (bias ? __half2float(bias[col]) : 0.f);
                    y[(size_t)m * N + col] = __float2half_rn(v);
                } else {
                    atomicAdd(ws + (size_t)m * N + col, acc[n][i][e]);
                }
            }
    if (split == 1) return;
    // Every thread's adds are visible device-wide before one thread announces the block's arrival;
    // the block that sees split - 1 arrivals before its own then reads complete sums from L2.
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    if (threadIdx.x == 0) last = atomicAdd(counts + blockIdx.x, 1) == split - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const int width = kWarps * NW * 16, col0 = blockIdx.x * width;
    for (int idx = threadIdx.x; idx < M * width; idx += blockDim.x) {
        const int m = idx / width, col = col0 + idx % width;
        float* p = ws + (size_t)m * N + col;
        float v = __ldcg(p);
        if (bias) v += __half2float(bias[col]);
        y[(size_t)m * N + col] = __float2half_rn(v);
        *p = 0.f;
    }
    if (threadIdx.x == 0) counts[blockIdx.x] = 0;
}

struct Args {
    const void *x, *qw, *sz;
    const int* gidx16;
    const void* bias;
    void* y;
    float* ws;
    int* counts;
    int M, N, K, split, group16;
    cudaStream_t stream;
};

template <int TM, int NW, int U>
int launch(const Args& a) {
    const dim3 grid(a.N / (16 * NW * kWarps), a.split);
    qgemm4_kernel<TM, NW, U><<<grid, kWarps * 32, 0, a.stream>>>(
        static_cast<const half*>(a.x), static_cast<const uint4*>(a.qw),
        static_cast<const uint2*>(a.sz), a.gidx16, static_cast<const half*>(a.bias),
        static_cast<half*>(a.y), a.ws, a.counts, a.M, a.N, a.K, a.group16);
    return static_cast<int>(cudaGetLastError());
}

template <int NW, int U>
int launch_tm(const Args& a) {
    const int tm = a.M <= 32 ? (a.M + 7) / 8 : 8;
    switch (tm) {
        case 1: return launch<1, NW, U>(a);
        case 2: return launch<2, NW, U>(a);
        case 3: return launch<3, NW, U>(a);
        case 4: return launch<4, NW, U>(a);
        default: return launch<8, NW, U>(a);
    }
}

}  // namespace

// C ABI for ctypes. Returns a cudaError_t (0 = launched), or -1 for an unsupported shape or config.
// Preconditions (checked in Python): contiguous tensors on the current device, 16-byte aligned x.
extern "C" int inlaid_qgemm4(const void* x, const void* qw, const void* sz, const int* gidx16,
                             const void* bias, void* y, float* ws, int* counts, int M, int N, int K,
                             int nw, int unroll, int split, int group16, void* stream) {
    if ((nw != 1 && nw != 2) || (unroll != 2 && unroll != 4)) return -1;
    if (M < 1 || M > 64 || K % 64 || split < 1 || N % (16 * kWarps * nw)) return -1;
    const Args a{x, qw, sz, gidx16, bias, y, ws, counts, M, N, K, split, group16,
                 static_cast<cudaStream_t>(stream)};
    if (nw == 1 && unroll == 2) return launch_tm<1, 2>(a);
    if (nw == 1 && unroll == 4) return launch_tm<1, 4>(a);
    if (nw == 2 && unroll == 2) return launch_tm<2, 2>(a);
    if (nw == 2 && unroll == 4) return launch_tm<2, 4>(a);
    return -1;
}
