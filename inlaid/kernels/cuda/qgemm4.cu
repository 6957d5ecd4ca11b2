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
// Dequantization (dequant_word): OR-ing codes into the mantissa of 1024.0 and taking the zero point
// off are exact (small integers); the one rounding is the multiply by the scale: each weight is the
// fp32 reference's value rounded once to fp16, as in the Triton kernel.
//
// Work split: a warp owns NW tiles of 16 output columns over a range of super tiles; the 4 warps of a
// block (8 in the wgmma kernel's two-warpgroup form) own neighbouring columns over the same k
// range (their x loads hit L1, or share one x stage), and the grid's y dimension splits K.
//
// Two kernels share that math (Tile). The register kernel double-buffers weights in registers: U
// super tiles are loaded while the previous U are multiplied; x and the scales come straight from
// global memory through L1. Its warps are few (~2.5 per scheduler at M = 32: registers and grid
// size) and ncu puts most of their stalls on those global loads (long scoreboard). A cp.async ring
// for the weights alone (5bef2aa) and x one super tile ahead alone (56f570b) each left the other
// load exposed and measured no faster. The pipelined kernel (qgemm4_async_kernel) copies all three,
// weights, scales and the block's x, through a 4-stage cp.async ring in shared memory, so no load
// in its loop waits on global memory: three stages (super tiles x tiles per warp) stay in flight
// per warp without the registers to hold them. With two tiles per warp, which halves the x reads
// per weight, it is the default for M 5-32, even where that leaves ~1.3 warps per scheduler
// (gate/up at M = 32); the register kernel stays the default for M <= 4, where it measured faster
// (docs/results/kernels.md). In both, every instruction in the loop counts (750 -> 489 SASS
// instructions for 64 MMAs in the register kernel's loop cut 55.8 -> 49.0 us at M = 32).
// On sm_90 the same ring feeds Hopper's warpgroup MMA instead (kWg; "the wgmma kernel" below):
// x is read by the tensor cores from shared memory, one instruction per 16 k for the whole
// block, so the warps' x loads go, and at M = 32 three quarters of their MMA instructions; it
// is the default there for M 5-32.
//
// Split-K: every block stores its partial sums, as they lie in its registers, into its own slice of
// an fp32 workspace (plain coalesced stores, no atomics), and the last block of a column tile to
// arrive (an arrival counter) adds the slices in split order, writes y and zeroes its counter again,
// so one launch does the whole product, the sum is the same whichever block comes last, and only
// the counters need to be clean for the next call (and for CUDA-graph replays). At M = 32 the
// earlier reduction, one fp32 atomicAdd per partial sum, cost ~5-8 us per million adds (the
// ebe2a57 / pipe sweeps: time rose with split at a fixed shape): ~1/5 of a layer's GEMM time.
//
// Programmatic dependent launch (sm_90+, inlaid/kernels/pdl.py has the contract): launched with
// it, the kernel starts while the kernel ahead of it (the norm, the attention, the SiLU) still
// runs, issues its first weight loads (the pipelined kernel: three stages of weights and scales) -
// weights are not written during a forward pass - and only
// then waits for that kernel, so the first HBM round trip overlaps the other kernel's tail instead
// of following it.

#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    // read once: keep it out of L1 (x and the scales need it)
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// Global -> shared without a register round trip, to a 32-bit shared-memory address. `bytes` 0
// reads nothing and fills zeros (super tiles past a block's K range). Weights stream past L1
// (.cg); the scales, which the next super tile of a group reads again, may stay in it (.ca).
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void cp_async16(unsigned smem, const void* gmem, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(smem), "l"(gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async8(unsigned smem, const void* gmem, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"(smem), "l"(gmem), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void mma(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// griddepcontrol (PTX 7.8, sm_90): a no-op when the launch did not ask for PDL
__device__ __forceinline__ void wait_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void release_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

__device__ __forceinline__ uint32_t h2_bits(half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ half2 bits_h2(uint32_t u) { return *reinterpret_cast<half2*>(&u); }

// (v & mask) | bits in one instruction: nvcc otherwise emits an AND and an OR here, since a LOP3
// takes only one immediate operand.
__device__ __forceinline__ uint32_t mask_or(uint32_t v, uint32_t mask, uint32_t bits) {
    uint32_t r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(v), "r"(mask), "r"(bits));  // (a & b) | c
    return r;
}

// Four A registers of one MMA from one word of codes. Even q are low nibbles (rows g: zero z0,
// scale s0), odd q high nibbles (rows g + 8). A low nibble OR-ed into the mantissa of 1024.0 is
// exactly 1024 + code, and minus (1024 + zero) exactly code - zero. A high nibble lands 4 bits up:
// 1024 + 16 code, and one fma, * 1/16 + nz1 with nz1 = -(64 + zero), gives code - zero exactly too,
// without shifting it down first (one instruction fewer per register pair). q = 2, 3 are the same
// after one shift of the word by 8. The one rounding is the multiply by the scale.
__device__ __forceinline__ void dequant_word(uint32_t w, half2 z0, half2 s0, half2 nz1, half2 s1,
                                             uint32_t* a) {
    const half2 sixteenth = __float2half2_rn(0.0625f);
#pragma unroll
    for (int b = 0; b < 2; ++b) {
        const uint32_t v = b ? w >> 8 : w;
        const half2 lo = bits_h2(mask_or(v, 0x000F000Fu, 0x64006400u));
        const half2 hi = bits_h2(mask_or(v, 0x00F000F0u, 0x64006400u));
        a[2 * b] = h2_bits(__hmul2(__hsub2(lo, z0), s0));
        a[2 * b + 1] = h2_bits(__hmul2(__hfma2(hi, sixteenth, nz1), s1));
    }
}

// The A registers of the four MMAs (j = 0..3) of one 16-column x 64-k super tile: its uint4 of
// codes w, its zero points zg = (1024 + z_g, 1024 + z_g8) and its scales s0 = (s_g, s_g), s1 =
// (s_g8, s_g8) (zero past the K range where the caller masks).
__device__ __forceinline__ void dequant_tile(const uint4& w, half2 zg, half2 s0, half2 s1, uint32_t (&a)[4][4]) {
    const half2 z0 = __low2half2(zg), nz1 = __high2half2(__hsub2(__float2half2_rn(960.f), zg));
    const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) dequant_word(words[j], z0, s0, nz1, s1, a[j]);
}

// The (scale, zero) pairs of 16-k chunk c, given a lane's pairs in group 0 (`row`; gbytes: bytes per
// group). One wide multiply-add (32-bit offset, 64-bit address): a signed index takes five.
__device__ __forceinline__ const uint2* group_pairs(const uint2* row, int c, int gshift, const int* gidx16,
                                                    unsigned gbytes) {
    const unsigned grp = gshift >= 0 ? c >> gshift : __ldg(gidx16 + c);
    return reinterpret_cast<const uint2*>(reinterpret_cast<const char*>(row) + grp * gbytes);
}

// The launch's arguments.
struct Params {
    const half* __restrict__ x;      // [M, K] (K permuted for act-order)
    const uint4* __restrict__ qw;    // [N / 16, K / 64, 32] one uint4 per lane
    const uint2* __restrict__ sz;    // [G, N / 16, 8]: (scale g, scale g+8, 1024+zero g, 1024+zero g+8)
    const int* __restrict__ gidx16;  // [K / 16] group of each 16-k chunk (read when gshift < 0)
    const half* __restrict__ bias;   // [N] or null
    half* __restrict__ y;            // [M, N]
    float4* __restrict__ ws;         // [split, gridDim.x, NW * TM, 128] partial sums (split > 1)
    int* __restrict__ counts;        // [gridDim.x], zero between calls (split > 1)
    int M, N, K;
    int gshift;  // >= 0: every group is 2^gshift 16-k chunks, in order (no table lookup)
};

// One warp's share of the product: its column tiles and K range, its x rows, its accumulators. W
// warps a block.
template <int TM, int NW, int W = kWarps>
struct Tile {
    int lane, g, t, KS, NT, ks0, ks1, tile0;
    // x row of token 8i + g at this thread's k offset, in 16-byte units. Rows past M read row M - 1:
    // their products land in accumulator rows that are never stored (no predicates, no selects).
    const uint4* xrow[TM];
    const uint2* szrow;  // (scale, zero) pairs of this lane's rows g, g + 8 in group 0, tile tile0
    float acc[NW][TM][4];

    __device__ __forceinline__ explicit Tile(const Params& p) {
        lane = threadIdx.x & 31;
        const int warp = threadIdx.x >> 5;
        g = lane >> 2;
        t = lane & 3;
        KS = p.K / 64;
        NT = p.N / 16;
        const int ks_per = (KS + gridDim.y - 1) / gridDim.y;
        ks0 = blockIdx.y * ks_per;
        ks1 = min(KS, ks0 + ks_per);
        tile0 = (blockIdx.x * W + warp) * NW;  // first 16-column tile of this warp
#pragma unroll
        for (int n = 0; n < NW; ++n)
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[n][i][e] = 0.f;
        szrow = p.sz + (size_t)tile0 * 8 + g;
#pragma unroll
        for (int i = 0; i < TM; ++i)
            xrow[i] = reinterpret_cast<const uint4*>(p.x + (size_t)min(8 * i + g, p.M - 1) * p.K) + 2 * t;
    }

    // Where super tile k of this warp's column tile n starts, for this lane.
    __device__ __forceinline__ const uint4* weights(const Params& p, int n, int k) const {
        return p.qw + ((size_t)(tile0 + n) * KS + k) * 32 + lane;
    }

    // The math of one super tile: weights w[n], their (scale, zero) pairs zs[n], x fragments xv
    // (xv[i][h]: token 8i + g, k 16t + 8h .. +8). kMask (only a block's partial last step in the
    // register kernel): past the range the caller passes an in-range super tile's x and pairs with
    // live = false, and a zero scale zeroes its weights, so the step needs no branch per super tile.
    template <bool kMask = true>
    __device__ __forceinline__ void math(const uint4 (&w)[NW], const uint2 (&zs)[NW], const uint4 (&xv)[TM][2],
                                         bool live) {
#pragma unroll
        for (int n = 0; n < NW; ++n) {
            const half2 sg = bits_h2(zs[n].x), zg = bits_h2(zs[n].y);  // (s_g, s_g8), (z_g, z_g8)
            half2 s0 = __low2half2(sg), s1 = __high2half2(sg);
            if constexpr (kMask) {
                const half2 live2 = __float2half2_rn(live ? 1.f : 0.f);
                s0 = __hmul2(s0, live2), s1 = __hmul2(s1, live2);
            }
            uint32_t a[4][4];
            dequant_tile(w[n], zg, s0, s1, a);
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const uint32_t* xb = (j < 2) ? &xv[i][0].x : &xv[i][1].x;
                    mma(acc[n][i], a[j], xb[(2 * j) & 3], xb[(2 * j + 1) & 3]);
                }
        }
    }

    // A super tile with weights w[n] already in registers, x and the pairs read straight from
    // global memory (L1 serves the block's other warps): x at xs[i] (this lane's 16-byte units of
    // token 8i + g), the pairs of the lane's 16-k chunk c. Their group is computed, not loaded, for
    // equal power-of-two groups: the pairs' load then does not wait on another load.
    template <bool kMask>
    __device__ __forceinline__ void super_tile(const Params& p, const uint4 (&w)[NW], const uint4* const (&xs)[TM],
                                               int c, bool live) {
        uint4 xv[TM][2];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
            xv[i][0] = __ldg(xs[i]);
            xv[i][1] = __ldg(xs[i] + 1);
        }
        const uint2* pairs = group_pairs(szrow, c, p.gshift, p.gidx16, 64 * NT);
        uint2 zs[NW];
#pragma unroll
        for (int n = 0; n < NW; ++n) zs[n] = __ldg(pairs + 8 * n);
        math<kMask>(w, zs, xv, live);
    }

    // C fragment: acc[n][i] = (col g, tokens 8i+2t, 8i+2t+1), (col g+8, same tokens). With a split,
    // the block first stores its partial sums to its workspace slice; the last block of the column
    // tile to arrive replaces acc by the sum over all slices (its own from registers), then writes
    // y like a block without a split.
    __device__ __forceinline__ void finish(const Params& p) {
        const int split = gridDim.y;
        if (split > 1) {
            // slice (blockIdx.y, blockIdx.x); within it, fragment f = n * TM + i of thread tid
            // at f * 128 + tid: each store and load is 16 bytes per thread, 512 per warp, in order
            auto slot = [&](int s, int f) {
                return p.ws + ((size_t)(s * gridDim.x + blockIdx.x) * (NW * TM) + f) * (W * 32) + threadIdx.x;
            };
            // a thread's four sums are tokens 8i + 2t and 8i + 2t + 1: none is stored where both
            // are past M (at M = 1, three lanes in four), and the last block skips them alike
#pragma unroll
            for (int n = 0; n < NW; ++n)
#pragma unroll
                for (int i = 0; i < TM; ++i)
                    if (8 * i + 2 * t < p.M)
                        __stcg(slot(blockIdx.y, n * TM + i),
                               make_float4(acc[n][i][0], acc[n][i][1], acc[n][i][2], acc[n][i][3]));
            // The barrier orders every thread's stores before thread 0's fence, and that fence
            // (cumulative) makes them visible device-wide before the block's arrival counts; the
            // block that sees split - 1 arrivals before its own fences again before its barrier,
            // so all its threads then read complete slices from L2. One fence per block, as in
            // cooperative groups' grid sync, rather than one per thread: 128 membar waits per
            // block showed in ncu's stall samples (kernels.md).
            __syncthreads();
            __shared__ bool last;
            if (threadIdx.x == 0) {
                __threadfence();
                last = atomicAdd(p.counts + blockIdx.x, 1) == split - 1;
                if (last) __threadfence();
            }
            __syncthreads();
            if (!last) return;
#pragma unroll
            for (int n = 0; n < NW; ++n)
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    if (8 * i + 2 * t >= p.M) continue;
                    float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
                    for (int s = 0; s < split; ++s) {
                        const float4 v = s == (int)blockIdx.y
                            ? make_float4(acc[n][i][0], acc[n][i][1], acc[n][i][2], acc[n][i][3])
                            : __ldcg(slot(s, n * TM + i));
                        sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
                    }
                    acc[n][i][0] = sum.x, acc[n][i][1] = sum.y, acc[n][i][2] = sum.z, acc[n][i][3] = sum.w;
                }
            if (threadIdx.x == 0) p.counts[blockIdx.x] = 0;
        }
#pragma unroll
        for (int n = 0; n < NW; ++n)
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int m = 8 * i + 2 * t + (e & 1);
                    const int col = (tile0 + n) * 16 + g + 8 * (e >> 1);
                    if (m >= p.M) continue;
                    const float v = acc[n][i][e] + (p.bias ? __half2float(p.bias[col]) : 0.f);
                    p.y[(size_t)m * p.N + col] = __float2half_rn(v);
                }
    }
};

// U super tiles per step, the next step's weights loaded before this step's math. As in the
// pipelined kernels' copies, every source (weights, x, the pairs' chunk) advances by U super tiles
// a step, and only a block's last step can be partial: full steps load and multiply without
// predicates or masks (217 -> 169 SASS instructions a full step at M = 1, one tile per warp, U = 2).
template <int TM, int NW, int U>
__global__ void __launch_bounds__(kWarps * 32) qgemm4_kernel(const Params p) {
    Tile<TM, NW> tile(p);
    const int ks0 = tile.ks0, ks1 = tile.ks1;
    const uint4* wp[NW];  // this lane's codes of column tile n at the current step
#pragma unroll
    for (int n = 0; n < NW; ++n) wp[n] = tile.weights(p, n, ks0);
    uint4 cur[U][NW], nxt[U][NW];
    // the U super tiles from wp + 32 `ahead`, those at or past `left` of them zero
    auto load_w = [&](uint4 (&dst)[U][NW], int ahead, int left) {
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int n = 0; n < NW; ++n)
                dst[u][n] = u < left ? load_stream(wp[n] + 32 * (ahead + u)) : make_uint4(0, 0, 0, 0);
    };
    if (ks0 < ks1) load_w(cur, 0, ks1 - ks0);
    // Everything before this line reads only weights; x, the workspace, the counters and y belong
    // to the stream's order, which the wait restores.
    wait_prior_grids();
    release_dependents();
    const uint4* xs[TM];  // this lane's x of token 8i + g at the current step
#pragma unroll
    for (int i = 0; i < TM; ++i) xs[i] = tile.xrow[i] + 8 * ks0;
    int chunk = 4 * ks0 + tile.t;  // the lane's 16-k chunk at the current step
    for (int ks = ks0; ks < ks1; ks += U) {
        const int left = ks1 - ks;  // super tiles from this step on
        if (left > U) load_w(nxt, U, left - U);
        if (left >= U) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const uint4* at[TM];
#pragma unroll
                for (int i = 0; i < TM; ++i) at[i] = xs[i] + 8 * u;
                tile.template super_tile<false>(p, cur[u], at, chunk + 4 * u, true);
            }
        } else {  // the block's last step, partial: past the range, a zero scale masks the step's first super tile
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const bool live = u < left;
                const uint4* at[TM];
#pragma unroll
                for (int i = 0; i < TM; ++i) at[i] = xs[i] + (live ? 8 * u : 0);
                tile.template super_tile<true>(p, cur[u], at, chunk + (live ? 4 * u : 0), live);
            }
        }
#pragma unroll
        for (int n = 0; n < NW; ++n) wp[n] += 32 * U;
#pragma unroll
        for (int i = 0; i < TM; ++i) xs[i] += 8 * U;
        chunk += 4 * U;
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int n = 0; n < NW; ++n) cur[u][n] = nxt[u][n];
    }
    tile.finish(p);
}

// One stage of the cp.async pipeline: U super tiles. Each lane's weight uint4s and (scale, zero)
// pairs sit in slots of its own and are read back only by that lane (cp.async.wait_group orders
// them, no barrier, no bank conflicts: a warp's 32 consecutive slots). x is the block's: every
// thread copies a share of the U super tiles' token rows once, and all warps read them after a
// barrier. The mma.sync kernel's rows hold 64 halves plus 8 of padding, so that the 8 tokens a
// quarter warp reads at 32t-byte offsets fall in distinct banks; the wgmma kernel's x (XCores
// below) takes the same bytes.
constexpr int kRow = 72;

template <int TM, int NW, int U, int W>
struct Stage {
    static constexpr int kW = W * U * NW * 32;        // uint4 of weights
    static constexpr int kZS = kW / 2;                // uint4 holding the uint2 (scale, zero) pairs
    static constexpr int kX = U * TM * 8 * kRow / 8;  // uint4 of x
    static constexpr int kSize = kW + kZS + kX;       // uint4 per stage
};

// How the pipelined kernels' copies find their sources: each copy's source is a pointer that
// advances by U super tiles after every step (next()), so in a step whose U super tiles are all in
// the block's K range (kFull) a copy is one instruction: the pointer, a constant shared-memory
// offset, no predicate. Only a block's last step can be partial (`left` < U of its super tiles in
// range): its other copies zero-fill from the step's first super tile, which is in range.
// (Computing each address from the step number instead took ~120 of the wgmma loop's ~350 SASS
// instructions a step at M = 32: 64-bit index arithmetic and selects around 20 copies.)

// x for the mma.sync kernel: 16-byte chunks of token rows into padded rows, each thread a fixed
// share (kPer chunks).
template <int TM, int U, int W>
struct XRows {
    static constexpr int kChunks = U * TM * 8 * 8, kPer = (kChunks + W * 32 - 1) / (W * 32);
    const half* src[kPer];
    unsigned dst[kPer];
    int u[kPer];

    __device__ __forceinline__ XRows(const Params& p, int ks0) {
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const int idx = min(c * W * 32 + (int)threadIdx.x, kChunks - 1);  // spare threads: a duplicate
            const int r = (idx / 8) % (TM * 8), part = idx % 8;
            u[c] = idx / (TM * 64);
            src[c] = p.x + (size_t)min(r, p.M - 1) * p.K + (size_t)(ks0 + u[c]) * 64 + 8 * part;
            dst[c] = ((u[c] * TM * 8 + r) * kRow + 8 * part) * 2;
        }
    }

    // this step's copies into the x region at shared address `x`
    template <bool kFull>
    __device__ __forceinline__ void copy(unsigned x, int left) const {
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            const bool in = kFull || u[c] < left;
            cp_async16(x + dst[c], in ? src[c] : src[c] - u[c] * 64, in ? 16 : 0);
        }
    }

    __device__ __forceinline__ void next() {
#pragma unroll
        for (int c = 0; c < kPer; ++c) src[c] += U * 64;
    }
};

// One warp's weights and (scale, zero) pairs. Each lane copies its own uint4 of codes per super
// tile and column tile, and the pairs of its rows' group, whose index comes from the lane's 16-k
// chunk 4 k + t: a shift for equal power-of-two groups, else a table lookup.
template <int TM, int NW, int U, int W>
struct WCopy {
    static constexpr int kW = Stage<TM, NW, U, W>::kW;  // the pairs follow the weights in a stage
    const uint4* w[NW];  // column tile n's codes at the next step's first super tile
    const uint2* sz;     // the lane's pairs of column tile 0 in group 0
    const int* gidx16;
    int chunk;           // the lane's 16-k chunk at the next step's first super tile
    int gshift;
    unsigned gbytes;      // bytes per group of pairs
    unsigned own;        // the lane's weight slots, bytes into a stage (its pairs: own / 2 into theirs)

    __device__ __forceinline__ WCopy(const Params& p, const Tile<TM, NW, W>& tile, int ks0, unsigned own_)
        : sz(tile.szrow), gidx16(p.gidx16), chunk(4 * ks0 + tile.t), gshift(p.gshift), gbytes(64 * tile.NT),
          own(own_) {
#pragma unroll
        for (int n = 0; n < NW; ++n) w[n] = tile.weights(p, n, ks0);
    }

    template <bool kFull>
    __device__ __forceinline__ void copy(unsigned stage, int left) const {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool in = kFull || u < left;
            const int from = in ? u : 0;
            const uint2* pairs = group_pairs(sz, chunk + 4 * from, gshift, gidx16, gbytes);
#pragma unroll
            for (int n = 0; n < NW; ++n) {
                const unsigned off = (u * NW + n) * 32;
                cp_async16(stage + own + off * 16, w[n] + from * 32, in ? 16 : 0);
                cp_async8(stage + kW * 16 + own / 2 + off * 8, pairs + 8 * n, in ? 8 : 0);
            }
        }
    }

    __device__ __forceinline__ void next() {
#pragma unroll
        for (int n = 0; n < NW; ++n) w[n] += U * 32;
        chunk += 4 * U;
    }
};

#ifdef INLAID_WGMMA
// --- the wgmma kernel (sm_90a) -----------------------------------------------------------------
//
// Hopper's warpgroup MMA computes a 64 x N x 16 product per instruction across the block's four
// warps (one warpgroup): A, 64 output columns (warp w's 16-column tile as rows 16w..16w+15), comes
// from registers in exactly the m16n8k16 A layout that dequant_word already produces, and B, the
// tokens' x (N = 8 TM), straight from shared memory, so no warp loads x fragments and one
// instruction replaces TM mma.syncs per warp. The accumulator's layout per warp is the m16n8 C
// layout for each 8-token chunk, so Tile::finish is unchanged. The MMAs run asynchronously while
// the warp dequantizes the next super tile.
//
// With W = 8 (kWgmma8) a block is two warpgroups over 128 NW columns, each issuing its own MMAs
// with the same B: the x stage, and x's reads from L2, are shared by twice the columns. Measured
// on an H100 (docs/results/kernels.md) it is faster for narrow outputs at M 17-32 (o and down of
// Llama-2-7B, where the K split is 4-8 ways) and slower for the wide ones.
//
// B from shared memory follows the K-major "core matrix" layout: 8 tokens x 8 k (16 bytes a
// token) contiguous, neighbours along K LBO bytes apart and along the tokens SBO bytes apart. The
// A registers' logical k is not physical k (the kernel header: thread t's 16 physical k feed
// logical {2t, 2t+1} and {2t+8, 2t+9} of MMA j), so B must be x permuted the same way: logical
// k 0-7 of MMA j (core matrix c = 0) are the 4-byte words 8t + 2j of the 64-k row, t = 0..3, and
// logical 8-15 (c = 1) the words 8t + 2j + 1. Each lane copies word L of a token row (one
// coalesced 128-byte read per warp) with a 4-byte cp.async to core matrix jc = L % 8, slot
// t = L / 8; core matrices sit kCore = 144 bytes apart (9 x 16: the 32 lanes' words then fall in
// 32 distinct banks), 8 of them per 8-token group.
constexpr int kCore = 144, kGroup = 8 * kCore;

__device__ __forceinline__ void cp_async4(unsigned smem, const void* gmem, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(smem), "l"(gmem), "r"(bytes) : "memory");
}

// Shared-memory matrix descriptor: start, LBO, SBO in 16-byte units, no swizzle.
__device__ __forceinline__ uint64_t smem_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)(lbo >> 4) << 16) | ((uint64_t)(sbo >> 4) << 32);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// cp.async's writes are the generic proxy's; wgmma reads through the async proxy
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// d[i][e] += A (64 x 16, registers) x B (16 x 8 TM, shared memory at desc)
template <int TM>
__device__ __forceinline__ void wgmma(float (&d)[TM][4], const uint32_t (&a)[4], uint64_t desc);

// Inline PTX names every accumulator as an operand of its own, so each tile count lists its
// registers; the instruction around them is shared. (setp makes the accumulate-into-d predicate.)
#define INLAID_WGMMA_SHAPE(TM, N, DREGS, AREGS, DESC, ONE, ...)                                                 \
    template <>                                                                                          \
    __device__ __forceinline__ void wgmma<TM>(float (&d)[TM][4], const uint32_t (&a)[4], uint64_t desc) { \
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " ONE ", 0;\n"                                    \
                     "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 " DREGS ", " AREGS ", " DESC    \
                     ", p, 1, 1, 0;\n}\n"                                                                  \
                     : __VA_ARGS__                                                                        \
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));                    \
    }

INLAID_WGMMA_SHAPE(1, 8, "{%0, %1, %2, %3}", "{%4, %5, %6, %7}", "%8", "%9", "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]))
INLAID_WGMMA_SHAPE(2, 16, "{%0, %1, %2, %3, %4, %5, %6, %7}", "{%8, %9, %10, %11}", "%12", "%13", "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]))
INLAID_WGMMA_SHAPE(3, 24, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11}", "{%12, %13, %14, %15}", "%16", "%17", "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]))
INLAID_WGMMA_SHAPE(4, 32, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}", "{%16, %17, %18, %19}", "%20", "%21", "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]))
INLAID_WGMMA_SHAPE(8, 64, "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}", "{%32, %33, %34, %35}", "%36", "%37", "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]))
#undef INLAID_WGMMA_SHAPE

// x for the wgmma kernel: 4-byte words into core matrices. Copy c of a thread is token row
// r = W c' + warp of the stage (u = c / kRows, c' = c % kRows); its lane's word and slot are
// fixed, so it keeps one source per token row.
template <int TM, int U, int W>
struct XCores {
    static constexpr int kRows = 8 * TM / W;  // distinct token rows per thread
    static constexpr int kPer = U * kRows;
    const half* src[kRows];  // this lane's word of each token row at the next step's first super tile
    unsigned dst;            // byte offset of this lane's slot in its warp's first row

    __device__ __forceinline__ XCores(const Params& p, int ks0) {
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
        for (int c = 0; c < kRows; ++c)  // rows past M read row M - 1
            src[c] = p.x + (size_t)min(W * c + warp, p.M - 1) * p.K + (size_t)ks0 * 64 + 2 * lane;
        dst = (lane % 8) * kCore + (lane / 8) * 4 + warp * 16;
    }

    template <bool kFull>
    __device__ __forceinline__ void copy(unsigned x, int left) const {
#pragma unroll
        for (int c = 0; c < kPer; ++c) {
            // token W cr + warp: 8-token group W cr / 8, row W cr % 8 + warp in it (W is 4 or 8)
            const int u = c / kRows, cr = c % kRows;
            const bool in = kFull || u < left;
            const unsigned at = x + dst + (u * TM + W * cr / 8) * kGroup + (W * cr % 8) * 16;
            cp_async4(at, src[cr] + (in ? u * 64 : 0), in ? 4 : 0);
        }
    }

    __device__ __forceinline__ void next() {
#pragma unroll
        for (int c = 0; c < kRows; ++c) src[c] += U * 64;
    }
};
#endif

// The pipelined kernels: a ring of S stages in shared memory, S - 1 steps of loads (weights, scales
// and x alike) in flight while a step's math runs, so no warp waits on a global load in the loop.
// Step st lives in slot st % S. One group is committed per step, empty ones included, so "at most
// S - 2 pending" after the prologue's S - 1 groups means "step st has landed"; the barrier that
// follows makes every thread's x copies visible and frees the slot of step st - 1 for step
// st + S - 1. Super tiles past the block's K range are zero-filled (weights, scales and x): they
// add exactly 0, so the math needs no mask. The copies' sources advance by a constant per step
// (the weights of a column tile and x's rows are contiguous along k; WCopy, XRows, XCores).
// kWg: the math is wgmma (XCores), else mma.sync (XRows).
template <int TM, int NW, int U, int S, bool kWg, int W>
__global__ void __launch_bounds__(W * 32) qgemm4_async_kernel(const Params p) {
    using St = Stage<TM, NW, U, W>;
    extern __shared__ uint4 smem[];
    Tile<TM, NW, W> tile(p);
    const int ks0 = tile.ks0, ks1 = tile.ks1;
    const int steps = ks1 > ks0 ? (ks1 - ks0 + U - 1) / U : 0;
    const unsigned base = smem_addr(smem);
    const unsigned own = ((threadIdx.x >> 5) * U * NW * 32 + tile.lane) * 16;  // bytes into a stage
#ifdef INLAID_WGMMA
    using X = std::conditional_t<kWg, XCores<TM, U, W>, XRows<TM, U, W>>;
#else
    using X = XRows<TM, U, W>;
#endif
    X xcopy(p, ks0);
    WCopy<TM, NW, U, W> wcopy(p, tile, ks0, own);
    auto slot = [&](int st) { return base + (unsigned)(st % S) * St::kSize * 16; };
    constexpr unsigned kXAt = (St::kW + St::kZS) * 16;  // the x region, bytes into a stage
    // step st's copies (steps are copied in order, each once); only the last can be partial
    auto copy_step = [&](auto& c, int st, unsigned at) {
        const int left = ks1 - ks0 - st * U;
        if (left >= U)
            c.template copy<true>(at, left);
        else
            c.template copy<false>(at, left);
        c.next();
    };
    // Weights and scales are not written during a forward pass: their first copies go out before
    // the wait for the kernel ahead (pdl.py); x, the workspace, the counters and y come after it.
#pragma unroll
    for (int st = 0; st < S - 1; ++st)
        if (st < steps) copy_step(wcopy, st, slot(st));
    wait_prior_grids();
    release_dependents();
#pragma unroll
    for (int st = 0; st < S - 1; ++st) {
        if (st < steps) copy_step(xcopy, st, slot(st) + kXAt);
        cp_commit();
    }
    for (int st = 0; st < steps; ++st) {
        cp_wait<S - 2>();
#ifdef INLAID_WGMMA
        if constexpr (kWg) fence_proxy_async();
#endif
        __syncthreads();
        if (st + S - 1 < steps) {
            copy_step(wcopy, st + S - 1, slot(st + S - 1));
            copy_step(xcopy, st + S - 1, slot(st + S - 1) + kXAt);
        }
        cp_commit();
        const uint4* stage = smem + (st % S) * St::kSize;
        const uint4* w = stage + own / 16;
        const uint2* zs = reinterpret_cast<const uint2*>(stage + St::kW) + own / 16;
        if constexpr (kWg) {
#ifdef INLAID_WGMMA
            // one commit group per super tile: its MMAs run while the next one is dequantized;
            // all must be done before the next step's barrier lets this slot be refilled
            const uint64_t desc = smem_desc(slot(st) + kXAt, kCore, kGroup);
            uint32_t a[U][NW][4][4];
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int n = 0; n < NW; ++n) {
                    const uint4 wv = w[(u * NW + n) * 32];
                    const uint2 zv = zs[(u * NW + n) * 32];
                    const half2 sg = bits_h2(zv.x);
                    dequant_tile(wv, bits_h2(zv.y), __low2half2(sg), __high2half2(sg), a[u][n]);
                }
                wgmma_fence();
#pragma unroll
                for (int n = 0; n < NW; ++n)
#pragma unroll
                    for (int j = 0; j < 4; ++j)  // MMA j's B: core matrices 2j, 2j + 1 of super tile u
                        wgmma<TM>(tile.acc[n], a[u][n][j], desc + ((u * TM * kGroup + 2 * j * kCore) >> 4));
                wgmma_commit();
            }
            wgmma_wait<0>();
#endif
        } else {
            const half* xs = reinterpret_cast<const half*>(stage + St::kW + St::kZS);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                uint4 wv[NW];
                uint2 zv[NW];
#pragma unroll
                for (int n = 0; n < NW; ++n) {
                    wv[n] = w[(u * NW + n) * 32];
                    zv[n] = zs[(u * NW + n) * 32];
                }
                uint4 xv[TM][2];
#pragma unroll
                for (int i = 0; i < TM; ++i) {
                    const uint4* row =
                        reinterpret_cast<const uint4*>(xs + (u * TM * 8 + 8 * i + tile.g) * kRow) + 2 * tile.t;
                    xv[i][0] = row[0];
                    xv[i][1] = row[1];
                }
                tile.template math<false>(wv, zv, xv, true);
            }
        }
    }
    tile.finish(p);
}

// Where and how a launch goes.
struct Launch {
    int split;  // the grid's y
    bool pdl;   // programmatic dependent launch
    cudaStream_t stream;
};

// A block of W warps, NW column tiles each, covers 16 NW W output columns; -1 where N is not a
// multiple of that.
template <int W, int NW, typename Kernel>
int launch(Kernel kernel, int smem_bytes, const Params& p, const Launch& l) {
    if (p.N % (16 * NW * W)) return -1;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(p.N / (16 * NW * W), l.split);
    cfg.blockDim = dim3(W * 32);
    cfg.dynamicSmemBytes = smem_bytes;
    cfg.stream = l.stream;
    cfg.attrs = attr;
    cfg.numAttrs = l.pdl ? 1 : 0;
    return static_cast<int>(cudaLaunchKernelEx(&cfg, kernel, p));
}

template <int TM, int NW, int U>
int launch_registers(const Params& p, const Launch& l) {
    return launch<kWarps, NW>(qgemm4_kernel<TM, NW, U>, 0, p, l);
}

template <int TM, int NW, int U, int S, bool kWg, int W = kWarps>
int launch_async(const Params& p, const Launch& l) {
    constexpr int bytes = Stage<TM, NW, U, W>::kSize * 16 * S;
    // 48 KB of shared memory per block, static and dynamic together, unless the kernel opts in to
    // more: done once per device for every size (the 48 KB stage of 64 tokens plus the kernel's
    // static flag is already over)
    static bool opted_in[64] = {};
    int dev = 0;
    if (cudaGetDevice(&dev) == cudaSuccess && dev < 64 && !opted_in[dev]) {
        const cudaError_t err = cudaFuncSetAttribute(qgemm4_async_kernel<TM, NW, U, S, kWg, W>,
                                                     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
        if (err != cudaSuccess) return static_cast<int>(err);
        opted_in[dev] = true;
    }
    return launch<W, NW>(qgemm4_async_kernel<TM, NW, U, S, kWg, W>, bytes, p, l);
}

// Which kernel (the config's last field; cuda_gemm.py names them). kWgmma8: the wgmma kernel with
// two warpgroups a block (8 warps), which share one x stage across 128 nw columns.
constexpr int kRegisters = 0, kPipelined = 4, kWgmma = 90, kWgmma8 = 91;

// The instantiated configs (each costs compile time): the register kernel with one or two tiles
// per warp, unroll 2 or 4; the pipelined kernels 4 stages deep with one, two or four tiles per
// warp (not four at 64 tokens: 128 accumulators), one or two super tiles per stage; the wgmma one
// only where the library was built for sm_90a.
template <int TM>
int launch_config(const Params& p, const Launch& l, int nw, int unroll, int kernel) {
    if (kernel == kRegisters) {
        if (nw == 1 && unroll == 2) return launch_registers<TM, 1, 2>(p, l);
        if (nw == 1 && unroll == 4) return launch_registers<TM, 1, 4>(p, l);
        if (nw == 2 && unroll == 2) return launch_registers<TM, 2, 2>(p, l);
        if (nw == 2 && unroll == 4) return launch_registers<TM, 2, 4>(p, l);
    } else if (kernel == kPipelined) {
        if (nw == 1 && unroll == 1) return launch_async<TM, 1, 1, 4, false>(p, l);
        if (nw == 1 && unroll == 2) return launch_async<TM, 1, 2, 4, false>(p, l);
        if (nw == 2 && unroll == 1) return launch_async<TM, 2, 1, 4, false>(p, l);
        if (nw == 2 && unroll == 2) return launch_async<TM, 2, 2, 4, false>(p, l);
        if constexpr (TM < 8)
            if (nw == 4 && unroll == 1) return launch_async<TM, 4, 1, 4, false>(p, l);
    } else if (kernel == kWgmma) {
#ifdef INLAID_WGMMA
        if (nw == 1 && unroll == 2) return launch_async<TM, 1, 2, 4, true>(p, l);
        if (nw == 2 && unroll == 1) return launch_async<TM, 2, 1, 4, true>(p, l);
        if (nw == 2 && unroll == 2) return launch_async<TM, 2, 2, 4, true>(p, l);
        if constexpr (TM < 8)
            if (nw == 4 && unroll == 1) return launch_async<TM, 4, 1, 4, true>(p, l);
#endif
    } else if (kernel == kWgmma8) {
#ifdef INLAID_WGMMA
        if (nw == 1 && unroll == 1) return launch_async<TM, 1, 1, 4, true, 8>(p, l);
        if (nw == 1 && unroll == 2) return launch_async<TM, 1, 2, 4, true, 8>(p, l);
        if (nw == 2 && unroll == 1) return launch_async<TM, 2, 1, 4, true, 8>(p, l);
#endif
    }
    return -1;
}

}  // namespace

// C ABI for ctypes. Returns a cudaError_t (0 = launched), or -1 for an unsupported shape or config.
// Preconditions (checked in Python): contiguous tensors on the current device, 16-byte aligned x
// and ws; with split > 1, ws holds split * N * 8 * TM floats and counts gridDim.x zeros.
// Config (launch_config lists the instantiated ones): nw column tiles per warp, unroll super tiles
// per step, split K ways, kernel 0 (the register kernel), 4 (the pipelined mma.sync kernel), 90 (the
// pipelined wgmma kernel, sm_90a builds only) or 91 (the same with 8 warps a block).
// pdl != 0: programmatic dependent launch (sm_90+ only).
extern "C" int inlaid_qgemm4(const void* x, const void* qw, const void* sz, const int* gidx16,
                             const void* bias, void* y, void* ws, int* counts, int M, int N, int K,
                             int nw, int unroll, int split, int kernel, int gshift, int pdl, void* stream) {
    if (nw != 1 && nw != 2 && nw != 4) return -1;
    if (M < 1 || M > 64 || K % 64 || split < 1) return -1;
    const Params p{static_cast<const half*>(x), static_cast<const uint4*>(qw),
                   static_cast<const uint2*>(sz), gidx16, static_cast<const half*>(bias),
                   static_cast<half*>(y), static_cast<float4*>(ws), counts, M, N, K, gshift};
    const Launch l{split, pdl != 0, static_cast<cudaStream_t>(stream)};
    switch (M <= 32 ? (M + 7) / 8 : 8) {
        case 1: return launch_config<1>(p, l, nw, unroll, kernel);
        case 2: return launch_config<2>(p, l, nw, unroll, kernel);
        case 3: return launch_config<3>(p, l, nw, unroll, kernel);
        case 4: return launch_config<4>(p, l, nw, unroll, kernel);
        default: return launch_config<8>(p, l, nw, unroll, kernel);
    }
}
