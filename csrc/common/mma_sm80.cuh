// Warp-level building blocks of the attention kernels, for sm_80 and newer (also used on sm_90a), on
// top of the raw instructions of ptx_sm80.cuh: asynchronous global->shared tile copies (cp.async),
// shared->register fragment loads (ldmatrix) and the m16n8k16 tensor-core product (mma.sync) on
// float16 / bfloat16 with float32 accumulation.
//
// Fragment layouts of mma.m16n8k16.row.col (g = lane / 4, t = lane % 4):
//   A (16x16, 4 x 32-bit): {row g, k 2t..2t+1}, {row g+8, k 2t..}, {row g, k 2t+8..}, {row g+8, k 2t+8..}
//   B (16x8,  2 x 32-bit): {k 2t..2t+1, col g}, {k 2t+8.., col g}
//   C (16x8,  4 x float):  {row g, col 2t}, {row g, col 2t+1}, {row g+8, col 2t}, {row g+8, col 2t+1}
// A C fragment pair covering 16 columns is therefore an A fragment once packed to 16 bits, which is
// how P (softmax probabilities) and dS feed the next product without going through shared memory.
//
// Shared tiles are [rows, D] with 16-byte chunks XOR-swizzled by (row % 8): the 8 rows one ldmatrix
// phase reads sit in 8 different bank groups, so neither cp.async stores nor ldmatrix loads conflict.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "common/ptx_sm80.cuh"

namespace rmt {

template <typename T>
struct MmaType;

template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_f16(c, a, b0, b1);
  }
};

template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16_bf16(c, a, b0, b1);
  }
};

// Element offset of 16-byte chunk `chunk` of row `row` in a swizzled [rows, D] tile.
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy rows [row0, row0 + ROWS) of a [*, D] matrix (row stride `stride` elements, unit column stride,
// 16-byte aligned rows) into a swizzled shared tile; rows >= limit are zero-filled.
template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t stride, int row0, int limit) {
  constexpr int CHUNKS = D / 8;
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
    const int row = c / CHUNKS, ch = c % CHUNKS;
    const int grow = row0 + row;
    const bool ok = grow < limit;
    const T* src = ok ? gmem + static_cast<int64_t>(grow) * stride + ch * 8 : gmem;
    cp_async_16(smem + swz<D>(row, ch), src, ok);
  }
}

// A fragment (16 rows from `row0`, k-chunks kc, kc+1) of a row-major swizzled tile.
template <int D, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kc) {
  const int lane = threadIdx.x & 31;
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(a, smem_addr(tile + swz<D>(row, kc + (lane >> 4))));
}

// B fragments of two 8-column n-tiles, where B[k][n] = tile[n0 + n][k]: rows n0..n0+15 of the tile
// are the n index, chunks kc, kc+1 the k index. b[0], b[1]: n-tile 0; b[2], b[3]: n-tile 1.
template <int D, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int n0, int kc) {
  const int lane = threadIdx.x & 31;
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  ldmatrix_x4(b, smem_addr(tile + swz<D>(row, kc + ((lane >> 3) & 1))));
}

// B fragments of two 8-column n-tiles, where B[k][n] = tile[k0 + k][n]: rows k0..k0+15 are the k
// index, chunks nc, nc+1 the n index (a transposing load). b[0], b[1]: n-tile nc; b[2], b[3]: nc+1.
template <int D, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int nc) {
  const int lane = threadIdx.x & 31;
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(b, smem_addr(tile + swz<D>(row, nc + (lane >> 4))));
}

// Sum over the 4 lanes of a quad (the lanes sharing one accumulator row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  return x;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
  return x;
}

}  // namespace rmt
