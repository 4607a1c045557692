// Host launch functions of the CUDA segment attention (no torch): argument checks that the kernels rely
// on, dispatch over dtype x head dim, grid and shared-memory setup. Compiles with nvcc alone, which is
// how `rmt-kernels aot --cuda` checks every kernel on a machine without a GPU.
#include <cuda_runtime.h>
#include <stdint.h>

#include "segment_attention/segment_attention_bwd.cuh"
#include "segment_attention/segment_attention_fwd.cuh"

namespace rmt {
namespace {

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

// Rows of 16-byte chunks: unit column stride, other strides multiples of 8 elements, aligned base.
bool chunked(const void* ptr, const int64_t* stride) {
  if (ptr == nullptr) return true;
  return aligned16(ptr) && stride[3] == 1 && stride[0] % 8 == 0 && stride[1] % 8 == 0 && stride[2] % 8 == 0;
}

// Outputs are written two elements (4 bytes) at a time.
bool paired(const void* ptr, const int64_t* stride) {
  if (ptr == nullptr) return true;
  return (reinterpret_cast<uintptr_t>(ptr) & 3u) == 0 && stride[3] == 1 && stride[0] % 2 == 0 &&
         stride[1] % 2 == 0 && stride[2] % 2 == 0;
}

const char* check_common(const SegmentAttentionParams& p) {
  if (p.dtype != DTYPE_FLOAT16 && p.dtype != DTYPE_BFLOAT16) return "dtype must be float16 or bfloat16";
  if (p.head_dim != 64 && p.head_dim != 128) return "head dim must be 64 or 128";
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return "heads_q must be a multiple of heads_kv";
  if (p.mask < MASK_CAUSAL || p.mask > MASK_FULL) return "unknown mask family";
  if (p.batch > 65535 || p.heads_q > 65535) return "batch and heads must be at most 65535";
  if (!chunked(p.q, p.q_stride) || !chunked(p.k, p.k_stride) || !chunked(p.v, p.v_stride)) {
    return "q, k, v need a unit head-dim stride, other strides multiples of 8 and 16-byte alignment";
  }
  if (p.prefix_len > 0 && (p.prefix_k == nullptr || p.prefix_v == nullptr)) return "prefix_len > 0 without prefix tensors";
  if (p.prefix_len > 0 && (!chunked(p.prefix_k, p.pk_stride) || !chunked(p.prefix_v, p.pv_stride))) {
    return "prefix_k, prefix_v need a unit head-dim stride, other strides multiples of 8 and 16-byte alignment";
  }
  return nullptr;
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename Kernel>
const char* allow_smem(Kernel kernel, int bytes) {
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T, int D>
const char* launch_fwd(const SegmentAttentionParams& p, cudaStream_t stream) {
  const int N = p.num_read + p.segment_len + p.num_write;
  auto kernel = segment_attention_fwd_kernel<T, D>;
  if (const char* err = allow_smem(kernel, AttnSmem<D>::fwd)) return err;
  const dim3 grid(cdiv(N, AttnConfig<D>::FWD_BM), p.heads_q, p.batch);
  kernel<<<grid, AttnThreads<D>::fwd, AttnSmem<D>::fwd, stream>>>(p);
  return last_error();
}

template <typename T, int D>
const char* launch_bwd(const SegmentAttentionParams& p, cudaStream_t stream) {
  const int N = p.num_read + p.segment_len + p.num_write;
  constexpr int PRE_ROWS = kPreprocessThreads / 32;
  segment_attention_bwd_preprocess_kernel<T>
      <<<dim3(cdiv(N, PRE_ROWS), p.heads_q, p.batch), kPreprocessThreads, 0, stream>>>(p);
  if (const char* err = last_error()) return err;

  auto dkdv = segment_attention_bwd_dkdv_kernel<T, D>;
  if (const char* err = allow_smem(dkdv, AttnSmem<D>::dkv)) return err;
  constexpr int BN = AttnConfig<D>::DKV_BN;
  dkdv<<<dim3(cdiv(N, BN), p.heads_kv, p.batch), AttnThreads<D>::dkv, AttnSmem<D>::dkv, stream>>>(p, 0);
  if (const char* err = last_error()) return err;
  if (p.prefix_len > 0 && p.dprefix_k != nullptr) {
    dkdv<<<dim3(cdiv(p.prefix_len, BN), p.heads_kv, p.batch), AttnThreads<D>::dkv, AttnSmem<D>::dkv, stream>>>(p, 1);
    if (const char* err = last_error()) return err;
  }

  auto dq = segment_attention_bwd_dq_kernel<T, D>;
  if (const char* err = allow_smem(dq, AttnSmem<D>::dq)) return err;
  dq<<<dim3(cdiv(N, AttnConfig<D>::DQ_BM), p.heads_q, p.batch), AttnThreads<D>::dq, AttnSmem<D>::dq, stream>>>(p);
  return last_error();
}

}  // namespace

const char* segment_attention_fwd(const SegmentAttentionParams& p, void* stream) {
  if (const char* err = check_common(p)) return err;
  if (!paired(p.out, p.out_stride)) return "out needs a unit head-dim stride and 4-byte aligned rows";
  const int N = p.num_read + p.segment_len + p.num_write;
  if (p.batch == 0 || p.heads_q == 0 || N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const bool bf16 = p.dtype == DTYPE_BFLOAT16;
  if (p.head_dim == 64) return bf16 ? launch_fwd<__nv_bfloat16, 64>(p, s) : launch_fwd<__half, 64>(p, s);
  return bf16 ? launch_fwd<__nv_bfloat16, 128>(p, s) : launch_fwd<__half, 128>(p, s);
}

const char* segment_attention_bwd(const SegmentAttentionParams& p, void* stream) {
  if (const char* err = check_common(p)) return err;
  if (!chunked(p.dout, p.dout_stride)) {
    return "dout needs a unit head-dim stride, other strides multiples of 8 and 16-byte alignment";
  }
  if (!paired(p.dq, p.dq_stride) || !paired(p.dk, p.dk_stride) || !paired(p.dv, p.dv_stride) ||
      !paired(p.dprefix_k, p.dpk_stride) || !paired(p.dprefix_v, p.dpv_stride)) {
    return "gradients need a unit head-dim stride and 4-byte aligned rows";
  }
  if ((p.dprefix_k == nullptr) != (p.dprefix_v == nullptr)) return "dprefix_k and dprefix_v go together";
  if (p.delta == nullptr || p.lse_log2 == nullptr) return "the delta and lse_log2 workspaces are missing";
  const int N = p.num_read + p.segment_len + p.num_write;
  if (p.batch == 0 || p.heads_q == 0 || N == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  const bool bf16 = p.dtype == DTYPE_BFLOAT16;
  if (p.head_dim == 64) return bf16 ? launch_bwd<__nv_bfloat16, 64>(p, s) : launch_bwd<__half, 64>(p, s);
  return bf16 ? launch_bwd<__nv_bfloat16, 128>(p, s) : launch_bwd<__half, 128>(p, s);
}

}  // namespace rmt
