// Kernels of the memory handoff: pack [read memory | segment | write memory] (segment rows copied or
// gathered from an embedding by token id), and the backward reductions (memory gradients summed over
// slots and batch; embedding rows scattered by id). All of them are copies or reductions, bound by
// memory bandwidth; offsets are 64-bit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <initializer_list>

#include "pack_segment/pack_segment_params.h"

namespace rmt {

__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }
__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ void store_float(__half* p, float x) { *p = __float2half_rn(x); }
__device__ __forceinline__ void store_float(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store_float(float* p, float x) { *p = x; }

__device__ __forceinline__ int64_t load_id(const void* ids, int is_int64, int64_t offset) {
  return is_int64 ? static_cast<const int64_t*>(ids)[offset] : static_cast<const int32_t*>(ids)[offset];
}

constexpr int kPackRowsPerCta = 8;  // one warp per packed row

// Host side of a pack launch: whether every operand can be copied in 16-byte units (aligned base,
// unit column stride, other strides and the row length whole units). If so, rewrites the strides and
// dim of `p` in units of 16 bytes and returns 16; otherwise leaves `p` alone and returns the element
// size (copies element by element).
inline bool pack_vectorisable(const void* ptr, const int64_t* stride, int elem_bytes) {
  if (ptr == nullptr) return true;
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) != 0 || stride[2] != 1) return false;
  return (stride[0] * elem_bytes) % 16 == 0 && (stride[1] * elem_bytes) % 16 == 0;
}

inline int pack_copy_unit(PackParams* p) {
  const int eb = p->elem_bytes;
  const bool vec = (static_cast<int64_t>(p->dim) * eb) % 16 == 0 && pack_vectorisable(p->out, p->out_stride, eb) &&
                   pack_vectorisable(p->read, p->read_stride, eb) && pack_vectorisable(p->write, p->write_stride, eb) &&
                   pack_vectorisable(p->src, p->src_stride, eb);
  if (!vec) return eb;
  const int per_unit = 16 / eb;
  for (int64_t* stride : {p->out_stride, p->src_stride, p->read_stride, p->write_stride}) {
    stride[0] /= per_unit;
    stride[1] /= per_unit;
  }
  p->dim /= per_unit;
  return 16;
}

// Grid: (cdiv(N, kPackRowsPerCta), B); block (32, kPackRowsPerCta). Warp y copies packed row
// blockIdx.x * kPackRowsPerCta + y of batch row blockIdx.y from its one source (read memory, segment
// row or embedding row, write memory). U is the copy unit: uint4 (16 bytes) when every row is 16-byte
// aligned and contiguous, else the element itself; strides and dim in `p` are in units of U.
template <typename U>
__global__ void __launch_bounds__(32 * kPackRowsPerCta) pack_segment_fwd_kernel(const PackParams p) {
  const int row = blockIdx.x * kPackRowsPerCta + threadIdx.y;
  const int R = p.num_read, S = p.segment_len;
  if (row >= R + S + p.num_write) return;
  const int64_t b = blockIdx.y;
  const U* src;
  int64_t col_stride;
  if (row < R) {
    src = static_cast<const U*>(p.read) + b * p.read_stride[0] + row * p.read_stride[1];
    col_stride = p.read_stride[2];
  } else if (row < R + S) {
    const int64_t t = row - R;
    if (p.ids != nullptr) {
      const int64_t tok = load_id(p.ids, p.ids_int64, b * p.ids_stride[0] + t * p.ids_stride[1]);
      src = static_cast<const U*>(p.src) + tok * p.src_stride[1];
    } else {
      src = static_cast<const U*>(p.src) + b * p.src_stride[0] + t * p.src_stride[1];
    }
    col_stride = p.src_stride[2];
  } else {
    src = static_cast<const U*>(p.write) + b * p.write_stride[0] + (row - R - S) * p.write_stride[1];
    col_stride = p.write_stride[2];
  }
  U* dst = static_cast<U*>(p.out) + b * p.out_stride[0] + static_cast<int64_t>(row) * p.out_stride[1];
  for (int c = threadIdx.x; c < p.dim; c += 32) dst[c * p.out_stride[2]] = src[c * col_stride];
}

constexpr int kReduceThreads = 256;

// Grid: (rows, cdiv(d, kReduceThreads), broadcast ? 1 : B). One thread per output element; the batch
// (and the second slot) are summed in a fixed order in float32: deterministic.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) pack_memory_grad_kernel(const MemoryGradParams p) {
  const int r = blockIdx.x;
  const int c = blockIdx.y * kReduceThreads + threadIdx.x;
  if (c >= p.dim) return;
  const T* grad = static_cast<const T*>(p.grad);
  const int64_t off1 = static_cast<int64_t>(p.start + r) * p.grad_stride[1] + c * p.grad_stride[2];
  const int64_t off2 = static_cast<int64_t>(p.start2 + r) * p.grad_stride[1] + c * p.grad_stride[2];
  const int64_t b0 = p.broadcast ? 0 : blockIdx.z;
  const int64_t b1 = p.broadcast ? p.batch : b0 + 1;
  float acc = 0.f;
  for (int64_t b = b0; b < b1; ++b) {
    acc += load_float(grad + b * p.grad_stride[0] + off1);
    if (p.start2 >= 0) acc += load_float(grad + b * p.grad_stride[0] + off2);
  }
  T* dst = static_cast<T*>(p.dmem) + b0 * p.dmem_stride[0] + static_cast<int64_t>(r) * p.dmem_stride[1] +
           c * p.dmem_stride[2];
  store_float(dst, acc);
}

// Grid: (S, B). Block: kReduceThreads threads over d. Adds the gradient row of segment token t of batch
// row b into the float32 row of its id: repeated ids accumulate in an order that varies between runs.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) pack_embedding_grad_atomic_kernel(const EmbeddingGradParams p) {
  const int64_t t = blockIdx.x, b = blockIdx.y;
  const int64_t tok = load_id(p.ids, p.ids_int64, b * p.ids_stride[0] + t * p.ids_stride[1]);
  const T* g = static_cast<const T*>(p.grad) + b * p.grad_stride[0] + (p.start + t) * p.grad_stride[1];
  float* dw = static_cast<float*>(p.dweight) + tok * p.dw_stride[0];
  for (int c = threadIdx.x; c < p.dim; c += kReduceThreads) {
    atomicAdd(dw + c * p.dw_stride[1], load_float(g + c * p.grad_stride[2]));
  }
}

// Grid: (B * S, cdiv(d, kReduceThreads)). The ids are sorted stably on the host, so equal ids form runs
// in token order. The CTA at the first position of a run sums the run's gradient rows in order in
// float32 and writes the weight-gradient row once: deterministic, no atomics; other CTAs exit.
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) pack_embedding_grad_sorted_kernel(const EmbeddingGradParams p) {
  const int64_t pos = blockIdx.x;
  const int64_t total = static_cast<int64_t>(p.batch) * p.segment_len;
  const int64_t tok = p.sorted_ids[pos];
  if (pos > 0 && p.sorted_ids[pos - 1] == tok) return;
  const int c = blockIdx.y * kReduceThreads + threadIdx.x;
  if (c >= p.dim) return;
  const T* grad = static_cast<const T*>(p.grad);
  float acc = 0.f;
  for (int64_t i = pos; i < total && p.sorted_ids[i] == tok; ++i) {
    const int64_t flat = p.order[i];
    const int64_t b = flat / p.segment_len, t = flat - b * p.segment_len;
    acc += load_float(grad + b * p.grad_stride[0] + (p.start + t) * p.grad_stride[1] + c * p.grad_stride[2]);
  }
  store_float(static_cast<T*>(p.dweight) + tok * p.dw_stride[0] + c * p.dw_stride[1], acc);
}

}  // namespace rmt
