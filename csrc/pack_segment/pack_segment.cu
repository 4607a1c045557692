// Host launch functions of the memory-handoff kernels (no torch): argument checks, grids, dispatch
// over dtype and copy unit (pack_copy_unit in pack_segment.cuh). Compiles with nvcc alone.
#include <cuda_runtime.h>
#include <stdint.h>

#include "pack_segment/pack_segment.cuh"

namespace rmt {
namespace {

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int cdiv64(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

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
  PackParams p = params;
  switch (pack_copy_unit(&p)) {
    case 16: return launch_pack<uint4>(p, s);
    case 4: return launch_pack<uint32_t>(p, s);
    default: return launch_pack<uint16_t>(p, s);
  }
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
