// Host launch functions of the memory-handoff kernels (no torch): copy-unit choice, grids, dispatch
// over dtype. Compiles with nvcc alone.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pack_segment.cuh"

namespace rmt {
namespace {

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cdiv64(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Whether a [*, rows, d] operand can be copied in 16-byte units: aligned base, unit column stride,
// other strides whole units.
bool vectorisable(const void* ptr, const int64_t* stride, int ndim, int elem_bytes) {
  if (ptr == nullptr) return true;
  if ((reinterpret_cast<uintptr_t>(ptr) & 15u) != 0 || stride[ndim - 1] != 1) return false;
  for (int i = 0; i < ndim - 1; ++i) {
    if ((stride[i] * elem_bytes) % 16 != 0) return false;
  }
  return true;
}

void to_units(int64_t* stride, int ndim, int per_unit) {
  for (int i = 0; i < ndim - 1; ++i) stride[i] /= per_unit;
}

template <typename U>
const char* launch_pack(const PackParams& p, cudaStream_t stream) {
  const int n = p.num_read + p.segment_len + p.num_write;
  const dim3 grid(cdiv64(n, kPackRowsPerCta), p.batch);
  pack_segment_fwd_kernel<U><<<grid, dim3(32, kPackRowsPerCta), 0, stream>>>(p);
  return last_error();
}

template <typename T>
const char* launch_memory_grad(const MemoryGradParams& p, cudaStream_t stream) {
  const dim3 grid(p.rows, cdiv64(p.dim, kReduceThreads), p.broadcast ? 1 : p.batch);
  pack_memory_grad_kernel<T><<<grid, kReduceThreads, 0, stream>>>(p);
  return last_error();
}

template <typename T>
const char* launch_embedding_grad(const EmbeddingGradParams& p, cudaStream_t stream) {
  if (p.sorted_ids != nullptr) {
    const int64_t total = static_cast<int64_t>(p.batch) * p.segment_len;
    const dim3 grid(static_cast<unsigned>(total), cdiv64(p.dim, kReduceThreads));
    pack_embedding_grad_sorted_kernel<T><<<grid, kReduceThreads, 0, stream>>>(p);
  } else {
    pack_embedding_grad_atomic_kernel<T><<<dim3(p.segment_len, p.batch), kReduceThreads, 0, stream>>>(p);
  }
  return last_error();
}

}  // namespace

const char* pack_segment_fwd(const PackParams& params, void* stream) {
  const int n = params.num_read + params.segment_len + params.num_write;
  if (params.elem_bytes != 2 && params.elem_bytes != 4) return "element size must be 2 or 4 bytes";
  if (params.batch > 65535) return "batch must be at most 65535";
  if (params.num_read > 0 && params.read == nullptr) return "read memory missing";
  if (params.num_write > 0 && params.write == nullptr) return "write memory missing";
  if (params.batch == 0 || n == 0 || params.dim == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const int eb = params.elem_bytes;
  const bool vec = (params.dim * eb) % 16 == 0 && vectorisable(params.out, params.out_stride, 3, eb) &&
                   vectorisable(params.read, params.read_stride, 3, eb) &&
                   vectorisable(params.write, params.write_stride, 3, eb) &&
                   vectorisable(params.src, params.src_stride, 3, eb);
  if (vec) {
    PackParams p = params;
    const int per_unit = 16 / eb;
    to_units(p.out_stride, 3, per_unit);
    to_units(p.src_stride, 3, per_unit);
    to_units(p.read_stride, 3, per_unit);
    to_units(p.write_stride, 3, per_unit);
    p.dim /= per_unit;
    return launch_pack<uint4>(p, s);
  }
  return eb == 2 ? launch_pack<uint16_t>(params, s) : launch_pack<uint32_t>(params, s);
}

const char* pack_memory_grad(const MemoryGradParams& params, void* stream) {
  if (params.rows == 0 || params.dim == 0 || (!params.broadcast && params.batch == 0)) return nullptr;
  if (params.batch > 65535) return "batch must be at most 65535";
  auto s = static_cast<cudaStream_t>(stream);
  switch (params.dtype) {
    case PACK_FLOAT16: return launch_memory_grad<__half>(params, s);
    case PACK_BFLOAT16: return launch_memory_grad<__nv_bfloat16>(params, s);
    case PACK_FLOAT32: return launch_memory_grad<float>(params, s);
    default: return "dtype must be float16, bfloat16 or float32";
  }
}

const char* pack_embedding_grad(const EmbeddingGradParams& params, void* stream) {
  if (params.batch == 0 || params.segment_len == 0 || params.dim == 0) return nullptr;
  if (params.sorted_ids == nullptr && params.batch > 65535) return "batch must be at most 65535";
  if ((params.sorted_ids == nullptr) != (params.order == nullptr)) return "sorted_ids and order go together";
  auto s = static_cast<cudaStream_t>(stream);
  switch (params.dtype) {
    case PACK_FLOAT16: return launch_embedding_grad<__half>(params, s);
    case PACK_BFLOAT16: return launch_embedding_grad<__nv_bfloat16>(params, s);
    case PACK_FLOAT32: return launch_embedding_grad<float>(params, s);
    default: return "dtype must be float16, bfloat16 or float32";
  }
}

}  // namespace rmt
