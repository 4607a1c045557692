// Arguments of the CUDA segment attention, shared by the launch file (segment_attention.cu), the
// kernels and the torch binding (bindings.cpp). Plain C++: no torch, no CUDA headers.
//
// Tensors are [B, H, N, D] with arbitrary strides in elements, except that the head dim must be
// contiguous (stride 1) and rows 16-byte aligned (every other stride a multiple of 8 elements, base
// pointers 16-byte aligned): the tiles are loaded with 16-byte asynchronous copies. The Python
// launcher copies an input that does not qualify. Every offset is computed in 64 bits.
#pragma once

#include <stdint.h>

namespace rmt {

enum DType : int { DTYPE_FLOAT16 = 0, DTYPE_BFLOAT16 = 1 };

struct SegmentAttentionParams {
  // Inputs (element type `dtype`). prefix_k / prefix_v are null when P == 0.
  const void* q;
  const void* k;
  const void* v;
  const void* prefix_k;
  const void* prefix_v;
  const int32_t* segment_lengths;  // [B] on the device, or null: every segment token is valid
  int64_t q_stride[4];
  int64_t k_stride[4];
  int64_t v_stride[4];
  int64_t pk_stride[4];
  int64_t pv_stride[4];

  // Forward outputs: out [B, H_q, N, D] (dtype), lse [B, H_q, N] float32 natural log-sum-exp.
  // Backward inputs: the same tensors, read.
  void* out;
  float* lse;
  int64_t out_stride[4];
  int64_t lse_stride[3];

  // Backward only. dout [B, H_q, N, D]; dq/dk/dv/dprefix_k/dprefix_v are written (dtype); the
  // prefix gradients are skipped when null. delta and lse_log2 are float32 [B, H_q, N] contiguous
  // workspaces of the launcher (rowsum(dout * out), and lse * log2(e) with +inf for rows that see no
  // key).
  const void* dout;
  int64_t dout_stride[4];
  void* dq;
  void* dk;
  void* dv;
  void* dprefix_k;
  void* dprefix_v;
  int64_t dq_stride[4];
  int64_t dk_stride[4];
  int64_t dv_stride[4];
  int64_t dpk_stride[4];
  int64_t dpv_stride[4];
  float* delta;
  float* lse_log2;

  int batch;
  int heads_q;
  int heads_kv;
  int head_dim;
  int num_read;     // R
  int segment_len;  // S
  int num_write;    // W
  int prefix_len;   // P
  int mask;         // rmt::MaskFamily
  int prefix_all;   // 1: every row sees the prefix; 0: only the segment rows
  float scale;      // softmax scale
  int dtype;        // rmt::DType
};

// Kernel launches on `stream` (a cudaStream_t). Each returns null on success, else a message naming
// what is unsupported or the CUDA error of the launch.
const char* segment_attention_fwd(const SegmentAttentionParams& params, void* stream);
const char* segment_attention_bwd(const SegmentAttentionParams& params, void* stream);

}  // namespace rmt
