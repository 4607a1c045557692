// Arguments of the CUDA memory-handoff kernels (pack_segment.cu), shared with the torch binding.
// Plain C++: no torch, no CUDA headers. Strides are in elements; a memory broadcast over the batch
// ([R, d]) has batch stride 0. Every offset is computed in 64 bits.
#pragma once

#include <stdint.h>

namespace rmt {

enum PackDType : int { PACK_FLOAT16 = 0, PACK_BFLOAT16 = 1, PACK_FLOAT32 = 2 };

// out[b, :R] = read[b], out[b, R:R+S] = segment[b] (or weight[ids[b]]), out[b, R+S:] = write[b].
struct PackParams {
  void* out;
  int64_t out_stride[3];
  const void* src;  // segment [B, S, d], or the embedding weight [V, d] when ids is set
  int64_t src_stride[3];  // (batch, row, col); the batch stride is unused with ids
  const void* ids;        // [B, S] int32 or int64 token ids, or null
  int64_t ids_stride[2];
  int ids_int64;
  const void* read;  // [B, R, d] / [R, d], null when R == 0
  int64_t read_stride[3];
  const void* write;  // [B, W, d] / [W, d], null when W == 0 (the launcher passes read when tied)
  int64_t write_stride[3];
  int batch;
  int num_read;
  int segment_len;
  int num_write;
  int dim;
  int elem_bytes;  // 2 or 4: the copy does not depend on the floating-point type
};

// dmem[b?, r, :] = sum over the batch when broadcast of grad[b, start + r, :] (+ grad[b, start2 + r, :]
// when start2 >= 0), accumulated in float32.
struct MemoryGradParams {
  const void* grad;  // [B, N, d]
  int64_t grad_stride[3];
  void* dmem;  // [B, rows, d], or [rows, d] when broadcast (batch stride 0)
  int64_t dmem_stride[3];
  int batch;
  int rows;
  int dim;
  int start;
  int start2;  // -1: a single slot
  int broadcast;
  int dtype;  // PackDType
};

// dweight[ids[b, t], :] += grad[b, start + t, :]. Deterministic when sorted_ids / order are given
// (ids sorted stably on the host; each id's rows are summed in token order into a dweight of the grad
// dtype); otherwise float32 atomics into a float32 dweight.
struct EmbeddingGradParams {
  const void* grad;  // [B, N, d]
  int64_t grad_stride[3];
  const void* ids;  // [B, S]
  int64_t ids_stride[2];
  int ids_int64;
  void* dweight;  // [V, d]
  int64_t dw_stride[2];
  const int64_t* sorted_ids;  // [B * S] or null
  const int64_t* order;       // [B * S] flat (b * S + t) positions of sorted_ids, or null
  int batch;
  int segment_len;
  int dim;
  int start;
  int dtype;  // PackDType of grad (and of dweight in the deterministic mode)
};

// Kernel launches on `stream` (a cudaStream_t); null on success, else a message.
const char* pack_segment_fwd(const PackParams& params, void* stream);
const char* pack_memory_grad(const MemoryGradParams& params, void* stream);
const char* pack_embedding_grad(const EmbeddingGradParams& params, void* stream);

}  // namespace rmt
