// What the forward and backward attention kernels share: the mask of the params, the key tiles a row
// block visits (prefix tiles, then the packed tiles MaskLayout leaves non-empty), which score tiles need
// per-element masking, the per-element rule itself, and the double-buffered cp.async pipeline that
// streams tiles through shared memory (buffer it & 1 holds step it).
#pragma once

#include <math_constants.h>

#include "common/mask_layout.cuh"
#include "common/mma_sm80.cuh"
#include "segment_attention/segment_attention_config.h"
#include "segment_attention/segment_attention_params.h"

namespace rmt {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__device__ __forceinline__ MaskLayout mask_layout_of(const SegmentAttentionParams& p) {
  return MaskLayout{p.num_read, p.segment_len, p.num_write, p.prefix_len, p.mask, p.prefix_all};
}

// The key tiles one row block visits: prefix tiles [0, n_pre), then packed tiles lo, then hi.
struct KeySchedule {
  TileRange pre, lo, hi;

  __device__ __forceinline__ int total() const { return pre.size() + lo.size() + hi.size(); }

  // Tile index of step `it`; `prefix` says which key source it belongs to.
  __device__ __forceinline__ int tile(int it, bool& prefix) const {
    if (it < pre.size()) {
      prefix = true;
      return pre.begin + it;
    }
    prefix = false;
    it -= pre.size();
    return it < lo.size() ? lo.begin + it : hi.begin + (it - lo.size());
  }
};

__device__ __forceinline__ KeySchedule key_schedule(const MaskLayout& lay, int m0, int m1, int L, int block_n) {
  KeySchedule s;
  s.pre = lay.prefix_key_tiles(m0, m1, block_n);
  lay.packed_key_tiles(m0, m1, L, block_n, &s.lo, &s.hi);
  return s;
}

// Whether a score tile needs per-element masking: not full, or a tail in either dimension.
__device__ __forceinline__ bool tile_needs_mask(const MaskLayout& lay, bool prefix, int m0, int block_m, int n0,
                                                int block_n, int L) {
  const int N = lay.N();
  const int key_len = prefix ? lay.P : N;
  const int m1 = imin(m0 + block_m, N), n1 = imin(n0 + block_n, key_len);
  const int cls = prefix ? lay.classify_prefix(m0, m1) : lay.classify_packed(m0, m1, n0, n1, L);
  return cls != TILE_FULL || m0 + block_m > N || n0 + block_n > key_len;
}

// The per-element rule for query row i and key j of the given source (bounds included).
__device__ __forceinline__ bool pair_visible(const MaskLayout& lay, bool prefix, int i, int j, int L) {
  if (i >= lay.N()) return false;
  if (prefix) return j < lay.P && lay.prefix_visible(i);
  return j < lay.N() && lay.visible(i, j, L);
}

// The keys and values a row-block kernel (forward, dQ) streams for batch bb and kv head hk: packed
// rows and, when P > 0, prefix rows (null otherwise).
template <typename T>
struct KeyValueRows {
  const T* k;
  const T* v;
  const T* pk;
  const T* pv;
};

template <typename T>
__device__ __forceinline__ KeyValueRows<T> key_value_rows(const SegmentAttentionParams& p, int64_t bb, int hk,
                                                          int P) {
  KeyValueRows<T> kv;
  kv.k = static_cast<const T*>(p.k) + bb * p.k_stride[0] + hk * p.k_stride[1];
  kv.v = static_cast<const T*>(p.v) + bb * p.v_stride[0] + hk * p.v_stride[1];
  kv.pk = nullptr;
  kv.pv = nullptr;
  if (P > 0) {
    kv.pk = static_cast<const T*>(p.prefix_k) + bb * p.pk_stride[0] + hk * p.pk_stride[1];
    kv.pv = static_cast<const T*>(p.prefix_v) + bb * p.pv_stride[0] + hk * p.pv_stride[1];
  }
  return kv;
}

// Starts the copies of step `it`'s key and value tiles (from the source the schedule names) into
// buffer it & 1 of sK / sV ([2][BN, D] each); rows past the source's end are zero-filled.
template <int BN, int D, int NT, typename T>
__device__ __forceinline__ void load_key_value_tiles(T* sK, T* sV, const KeyValueRows<T>& kv,
                                                     const SegmentAttentionParams& p, const KeySchedule& sched,
                                                     int it, int N, int P) {
  bool prefix;
  const int n0 = sched.tile(it, prefix) * BN;
  T* dk = sK + (it & 1) * BN * D;
  T* dv = sV + (it & 1) * BN * D;
  if (prefix) {
    load_tile<BN, D, NT>(dk, kv.pk, p.pk_stride[2], n0, P);
    load_tile<BN, D, NT>(dv, kv.pv, p.pv_stride[2], n0, P);
  } else {
    load_tile<BN, D, NT>(dk, kv.k, p.k_stride[2], n0, N);
    load_tile<BN, D, NT>(dv, kv.v, p.v_stride[2], n0, N);
  }
}

// Top of pipeline step `it` of `total`: starts the copies of step it + 1 (issue(it + 1), into the other
// buffer) and waits until step it's copies have landed for the whole CTA. The caller issued step 0 and
// committed it before the loop, and ends each step with __syncthreads() so that the buffer it read is
// free before the next step's copy lands there.
template <typename Issue>
__device__ __forceinline__ void pipeline_wait(int it, int total, const Issue& issue) {
  if (it + 1 < total) {
    issue(it + 1);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

}  // namespace rmt
