// Forward of segment attention: flash-attention style online softmax over the key tiles that the
// mask leaves non-empty, on tensor cores (mma.sync m16n8k16, float32 accumulation).
//
// Grid: (cdiv(N, BM), H_q, B). One CTA computes output rows [m0, m0 + BM) of one (batch, query head);
// warp w owns rows m0 + 16w .. m0 + 16w + 15. The CTA visits, in order, the prefix key tiles (when one
// of its rows sees the prefix) and then the packed key tiles of MaskLayout::packed_key_tiles: tiles
// fully inside the padding hole or beyond the last row's key_end are never loaded. A tile classified
// TILE_FULL (and not a key tail) runs without any per-element mask work; TILE_PARTIAL tiles evaluate
// the MaskLayout rule per element. K/V tiles are double buffered: the copy of tile i+1 (cp.async) is
// in flight while tile i is computed.
//
// Numerics: scores are scaled into the log2 domain (scale * log2(e)) so the softmax uses exp2; the
// running max of a row that has seen no key yet is -inf, and the exponent base is then 0 rather than
// -inf so that no inf - inf appears. A row that sees no key at all ends with sum 0: its output is 0
// and its log-sum-exp -inf.
#pragma once

#include "segment_attention/segment_attention_schedule.cuh"

namespace rmt {

template <typename T, int D>
__global__ void __launch_bounds__(AttnThreads<D>::fwd, 1)
    segment_attention_fwd_kernel(const SegmentAttentionParams p) {
  using Cfg = AttnConfig<D>;
  using M = MmaType<T>;
  constexpr int BM = Cfg::FWD_BM, BN = Cfg::FWD_BN, NT = AttnThreads<D>::fwd;
  constexpr int KSTEPS = D / 16;  // k-steps of Q K^T
  constexpr int STILES = BN / 8;  // 8-column accumulator tiles of S
  constexpr int OTILES = D / 8;   // 8-column accumulator tiles of O

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM, D]
  T* sK = sQ + BM * D;                     // [2][BN, D]
  T* sV = sK + 2 * BN * D;                 // [2][BN, D]

  const MaskLayout lay = mask_layout_of(p);
  const int N = lay.N();
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int m1 = imin(m0 + BM, N);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int L = p.segment_lengths != nullptr ? p.segment_lengths[b] : p.segment_len;
  const int64_t bb = b;

  const T* q = static_cast<const T*>(p.q) + bb * p.q_stride[0] + h * p.q_stride[1];
  const KeyValueRows<T> kv = key_value_rows<T>(p, bb, hk, lay.P);

  const KeySchedule sched = key_schedule(lay, m0, m1, L, BN);
  const int total = sched.total();
  auto issue = [&](int it) { load_key_value_tiles<BN, D, NT>(sK, sV, kv, p, sched, it, N, lay.P); };

  load_tile<BM, D, NT>(sQ, q, p.q_stride[2], m0, N);
  if (total > 0) issue(0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  const float scale_log2 = p.scale * kLog2e;

  float o[OTILES][4];
#pragma unroll
  for (int i = 0; i < OTILES; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
  float row_sum[2] = {0.f, 0.f};
  uint32_t qa[KSTEPS][4];

  for (int it = 0; it < total; ++it) {
    pipeline_wait(it, total, issue);
    if (it == 0) {
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) load_a<D>(qa[kk], sQ, warp * 16, 2 * kk);
    }
    bool prefix;
    const int n0 = sched.tile(it, prefix) * BN;
    const T* tK = sK + (it & 1) * BN * D;
    const T* tV = sV + (it & 1) * BN * D;

    float s[STILES][4];
#pragma unroll
    for (int i = 0; i < STILES; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
      for (int np = 0; np < STILES / 2; ++np) {
        uint32_t kb[4];
        load_b_nk<D>(kb, tK, np * 16, 2 * kk);
        M::mma(s[2 * np], qa[kk], kb[0], kb[1]);
        M::mma(s[2 * np + 1], qa[kk], kb[2], kb[3]);
      }
    }

    const bool masked = tile_needs_mask(lay, prefix, m0, BM, n0, BN, L);
#pragma unroll
    for (int nt = 0; nt < STILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (masked && !pair_visible(lay, prefix, rows[e >> 1], n0 + nt * 8 + 2 * tq + (e & 1), L)) {
          x = -CUDART_INF_F;
        }
        s[nt][e] = x;
      }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = row_max[r];
#pragma unroll
      for (int nt = 0; nt < STILES; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = quad_max(mx);
      const float base = mx == -CUDART_INF_F ? 0.f : mx;
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < STILES; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + sum;
#pragma unroll
      for (int dt = 0; dt < OTILES; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t pa[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]), M::pack(s[2 * kk][2], s[2 * kk][3]),
                              M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        load_b_kn<D>(vb, tV, kk * 16, 2 * dp);
        M::mma(o[2 * dp], pa, vb[0], vb[1]);
        M::mma(o[2 * dp + 1], pa, vb[2], vb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.out) + bb * p.out_stride[0] + h * p.out_stride[1];
  float* lse = p.lse + bb * p.lse_stride[0] + h * p.lse_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const int row = rows[r];
    if (row >= N) continue;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    T* dst = out + static_cast<int64_t>(row) * p.out_stride[2];
#pragma unroll
    for (int dt = 0; dt < OTILES; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * tq) = M::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (tq == 0) {
      lse[static_cast<int64_t>(row) * p.lse_stride[2]] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -CUDART_INF_F;
    }
  }
}

}  // namespace rmt
