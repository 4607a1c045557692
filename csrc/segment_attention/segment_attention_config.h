// Tile shapes of the attention kernels per head dim, and the shared memory each needs. Plain C++ (no
// CUDA headers): the kernels, the launch file and the resource report (rmt_kernels/tools/aot_cuda.py,
// via csrc/tools/kernel_table.cpp) read the same numbers.
//
// Every kernel is one warp per 16 rows of its "own" block (query rows for the forward and dQ, key rows
// for dK/dV); the other dimension is streamed through a double-buffered shared tile.
#pragma once

namespace rmt {

// Head dims compiled into the extension.
constexpr int kHeadDims[] = {64, 128};

template <int D>
struct AttnConfig;

template <>
struct AttnConfig<64> {
  static constexpr int FWD_BM = 128, FWD_BN = 64;   // forward: query rows per CTA, keys per step
  static constexpr int DQ_BM = 64, DQ_BN = 64;      // dQ: query rows per CTA, keys per step
  static constexpr int DKV_BN = 64, DKV_BM = 64;    // dK/dV: key rows per CTA, queries per step
};

template <>
struct AttnConfig<128> {
  static constexpr int FWD_BM = 128, FWD_BN = 64;
  static constexpr int DQ_BM = 64, DQ_BN = 64;
  static constexpr int DKV_BN = 64, DKV_BM = 32;
};

constexpr int kElemBytes = 2;  // float16 / bfloat16

template <int D>
struct AttnSmem {
  using C = AttnConfig<D>;
  // Q tile + double-buffered K and V tiles.
  static constexpr int fwd = (C::FWD_BM * D + 2 * 2 * C::FWD_BN * D) * kElemBytes;
  // Q and dO tiles + double-buffered K and V tiles.
  static constexpr int dq = (2 * C::DQ_BM * D + 2 * 2 * C::DQ_BN * D) * kElemBytes;
  // K and V tiles + double-buffered Q and dO tiles + double-buffered lse and delta rows (float32).
  static constexpr int dkv = (2 * C::DKV_BN * D + 2 * 2 * C::DKV_BM * D) * kElemBytes + 2 * 2 * C::DKV_BM * 4;
};

template <int D>
struct AttnThreads {
  using C = AttnConfig<D>;
  static constexpr int fwd = C::FWD_BM / 16 * 32;
  static constexpr int dq = C::DQ_BM / 16 * 32;
  static constexpr int dkv = C::DKV_BN / 16 * 32;
};

// Threads of the backward preprocessing kernel (one warp per row).
constexpr int kPreprocessThreads = 256;

struct KernelResources {
  const char* name;  // kernel function name, as in the compiled binary (template args aside)
  int head_dim;
  int block_m;  // query rows per CTA (forward, dQ) or per step (dK/dV)
  int block_n;  // keys per step (forward, dQ) or per CTA (dK/dV)
  int threads;
  int smem_bytes;  // dynamic shared memory the launch requests
};

// Fills `out` (room for kAttnKernelCount entries) and returns the count.
constexpr int kAttnKernelCount = 3 * 2 + 1;
inline int attention_kernel_table(KernelResources* out) {
  int n = 0;
  using C64 = AttnConfig<64>;
  using C128 = AttnConfig<128>;
  out[n++] = {"segment_attention_fwd_kernel", 64, C64::FWD_BM, C64::FWD_BN, AttnThreads<64>::fwd, AttnSmem<64>::fwd};
  out[n++] = {"segment_attention_fwd_kernel", 128, C128::FWD_BM, C128::FWD_BN, AttnThreads<128>::fwd,
              AttnSmem<128>::fwd};
  out[n++] = {"segment_attention_bwd_dq_kernel", 64, C64::DQ_BM, C64::DQ_BN, AttnThreads<64>::dq, AttnSmem<64>::dq};
  out[n++] = {"segment_attention_bwd_dq_kernel", 128, C128::DQ_BM, C128::DQ_BN, AttnThreads<128>::dq,
              AttnSmem<128>::dq};
  out[n++] = {"segment_attention_bwd_dkdv_kernel", 64, C64::DKV_BM, C64::DKV_BN, AttnThreads<64>::dkv,
              AttnSmem<64>::dkv};
  out[n++] = {"segment_attention_bwd_dkdv_kernel", 128, C128::DKV_BM, C128::DKV_BN, AttnThreads<128>::dkv,
              AttnSmem<128>::dkv};
  out[n++] = {"segment_attention_bwd_preprocess_kernel", 0, kPreprocessThreads / 32, 0, kPreprocessThreads, 0};
  return n;
}

}  // namespace rmt
