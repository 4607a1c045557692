// Backward of segment attention, deterministic (no atomics), in three kernels:
//
// 1. preprocess — grid (cdiv(N, 8), H_q, B), one warp per row: delta = rowsum(dO * O) and
//    lse_log2 = lse * log2(e) (+inf for a row that sees no key, so that exp2(s - lse_log2) is 0 there
//    instead of NaN), both float32 [B, H_q, N] contiguous.
// 2. dQ — grid (cdiv(N, BM), H_q, B): the forward's row-block schedule. Per visited key tile it
//    recomputes S = Q K^T and P = exp2(S * scale * log2(e) - lse_log2), forms dP = dO V^T and
//    dS = P * (dP - delta), and accumulates dQ += dS K in registers; dQ is scaled once at the end.
// 3. dK/dV — grid (cdiv(keys, BN), H_kv, B), launched once over the packed keys and once over the
//    prefix keys (when their gradients are wanted). One CTA owns BN keys of one kv head, warp w keys
//    16w .. 16w + 15, and streams every query head of the group over the query tiles of
//    MaskLayout::packed_query_tiles / prefix_query_tiles (exactly the non-empty tiles of its key
//    column). It computes the transposed products S^T = K Q^T and dP^T = V dO^T so that P^T and dS^T
//    come out in the accumulator layout that feeds dV += P^T dO and dK += dS^T Q directly. Group
//    heads are summed in registers in a fixed order.
//
// Tile classes decide the masking exactly as in the forward: full tiles skip the per-element rule.
#pragma once

#include "segment_attention/segment_attention_schedule.cuh"

namespace rmt {

template <typename T>
__global__ void __launch_bounds__(kPreprocessThreads)
    segment_attention_bwd_preprocess_kernel(const SegmentAttentionParams p) {
  constexpr int ROWS = kPreprocessThreads / 32;
  const int N = p.num_read + p.segment_len + p.num_write;
  const int b = blockIdx.z, h = blockIdx.y;
  const int row = blockIdx.x * ROWS + (threadIdx.x >> 5), lane = threadIdx.x & 31;
  if (row >= N) return;
  const int64_t bb = b, rr = row;
  const T* o = static_cast<const T*>(p.out) + bb * p.out_stride[0] + h * p.out_stride[1] + rr * p.out_stride[2];
  const T* d = static_cast<const T*>(p.dout) + bb * p.dout_stride[0] + h * p.dout_stride[1] + rr * p.dout_stride[2];
  float acc = 0.f;
  for (int c = lane; c < p.head_dim; c += 32) {
    acc += MmaType<T>::to_float(o[c * p.out_stride[3]]) * MmaType<T>::to_float(d[c * p.dout_stride[3]]);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const int64_t idx = (bb * p.heads_q + h) * N + rr;
    const float lse = p.lse[bb * p.lse_stride[0] + h * p.lse_stride[1] + rr * p.lse_stride[2]];
    p.delta[idx] = acc;
    p.lse_log2[idx] = lse == -CUDART_INF_F ? CUDART_INF_F : lse * kLog2e;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(AttnThreads<D>::dq, 1)
    segment_attention_bwd_dq_kernel(const SegmentAttentionParams p) {
  using Cfg = AttnConfig<D>;
  using M = MmaType<T>;
  constexpr int BM = Cfg::DQ_BM, BN = Cfg::DQ_BN, NT = AttnThreads<D>::dq;
  constexpr int KSTEPS = D / 16;
  constexpr int STILES = BN / 8;
  constexpr int OTILES = D / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);  // [BM, D]
  T* sO = sQ + BM * D;                     // dO: [BM, D]
  T* sK = sO + BM * D;                     // [2][BN, D]
  T* sV = sK + 2 * BN * D;                 // [2][BN, D]

  const MaskLayout lay = mask_layout_of(p);
  const int N = lay.N();
  const int b = blockIdx.z, h = blockIdx.y, m0 = blockIdx.x * BM;
  const int m1 = imin(m0 + BM, N);
  const int hk = h / (p.heads_q / p.heads_kv);
  const int L = p.segment_lengths != nullptr ? p.segment_lengths[b] : p.segment_len;
  const int64_t bb = b;

  const T* q = static_cast<const T*>(p.q) + bb * p.q_stride[0] + h * p.q_stride[1];
  const T* dout = static_cast<const T*>(p.dout) + bb * p.dout_stride[0] + h * p.dout_stride[1];
  const KeyValueRows<T> kv = key_value_rows<T>(p, bb, hk, lay.P);

  const KeySchedule sched = key_schedule(lay, m0, m1, L, BN);
  const int total = sched.total();
  auto issue = [&](int it) { load_key_value_tiles<BN, D, NT>(sK, sV, kv, p, sched, it, N, lay.P); };

  load_tile<BM, D, NT>(sQ, q, p.q_stride[2], m0, N);
  load_tile<BM, D, NT>(sO, dout, p.dout_stride[2], m0, N);
  if (total > 0) issue(0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int rows[2] = {m0 + warp * 16 + g, m0 + warp * 16 + g + 8};
  const float scale_log2 = p.scale * kLog2e;
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t idx = (bb * p.heads_q + h) * N + rows[r];
    lse2[r] = rows[r] < N ? p.lse_log2[idx] : CUDART_INF_F;
    delta[r] = rows[r] < N ? p.delta[idx] : 0.f;
  }

  float dq[OTILES][4];
#pragma unroll
  for (int i = 0; i < OTILES; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;

  for (int it = 0; it < total; ++it) {
    pipeline_wait(it, total, issue);
    bool prefix;
    const int n0 = sched.tile(it, prefix) * BN;
    const T* tK = sK + (it & 1) * BN * D;
    const T* tV = sV + (it & 1) * BN * D;

    float s[STILES][4], dp[STILES][4];
#pragma unroll
    for (int i = 0; i < STILES; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t qa[4], oa[4];
      load_a<D>(qa, sQ, warp * 16, 2 * kk);
      load_a<D>(oa, sO, warp * 16, 2 * kk);
#pragma unroll
      for (int np = 0; np < STILES / 2; ++np) {
        uint32_t kb[4], vb[4];
        load_b_nk<D>(kb, tK, np * 16, 2 * kk);
        M::mma(s[2 * np], qa, kb[0], kb[1]);
        M::mma(s[2 * np + 1], qa, kb[2], kb[3]);
        load_b_nk<D>(vb, tV, np * 16, 2 * kk);
        M::mma(dp[2 * np], oa, vb[0], vb[1]);
        M::mma(dp[2 * np + 1], oa, vb[2], vb[3]);
      }
    }

    const bool masked = tile_needs_mask(lay, prefix, m0, BM, n0, BN, L);
#pragma unroll
    for (int nt = 0; nt < STILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = e >> 1;
        float pr = exp2f(s[nt][e] * scale_log2 - lse2[r]);
        if (masked && !pair_visible(lay, prefix, rows[r], n0 + nt * 8 + 2 * tq + (e & 1), L)) pr = 0.f;
        s[nt][e] = pr * (dp[nt][e] - delta[r]);  // dS
      }
    }

#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint32_t da[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]), M::pack(s[2 * kk][2], s[2 * kk][3]),
                              M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t kb[4];
        load_b_kn<D>(kb, tK, kk * 16, 2 * dt);
        M::mma(dq[2 * dt], da, kb[0], kb[1]);
        M::mma(dq[2 * dt + 1], da, kb[2], kb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

  T* out = static_cast<T*>(p.dq) + bb * p.dq_stride[0] + h * p.dq_stride[1];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= N) continue;
    T* dst = out + static_cast<int64_t>(rows[r]) * p.dq_stride[2];
#pragma unroll
    for (int dt = 0; dt < OTILES; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * tq) =
          M::pack(dq[dt][2 * r] * p.scale, dq[dt][2 * r + 1] * p.scale);
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(AttnThreads<D>::dkv, 1)
    segment_attention_bwd_dkdv_kernel(const SegmentAttentionParams p, const int prefix) {
  using Cfg = AttnConfig<D>;
  using M = MmaType<T>;
  constexpr int BN = Cfg::DKV_BN, BM = Cfg::DKV_BM, NT = AttnThreads<D>::dkv;
  constexpr int KSTEPS = D / 16;
  constexpr int STILES = BM / 8;  // 8-column tiles of S^T (columns are queries)
  constexpr int OTILES = D / 8;

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);  // [BN, D]
  T* sV = sK + BN * D;                     // [BN, D]
  T* sQ = sV + BN * D;                     // [2][BM, D]
  T* sO = sQ + 2 * BM * D;                 // dO: [2][BM, D]
  float* sL = reinterpret_cast<float*>(sO + 2 * BM * D);  // lse_log2: [2][BM]
  float* sDelta = sL + 2 * BM;                             // [2][BM]

  const MaskLayout lay = mask_layout_of(p);
  const int N = lay.N();
  const int key_len = prefix ? lay.P : N;
  const int b = blockIdx.z, hk = blockIdx.y, n0 = blockIdx.x * BN;
  const int n1 = imin(n0 + BN, key_len);
  const int group = p.heads_q / p.heads_kv;
  const int L = p.segment_lengths != nullptr ? p.segment_lengths[b] : p.segment_len;
  const int64_t bb = b;

  const T* k;
  const T* v;
  T* dk_out;
  T* dv_out;
  int64_t dk_row, dv_row;
  if (prefix) {
    k = static_cast<const T*>(p.prefix_k) + bb * p.pk_stride[0] + hk * p.pk_stride[1];
    v = static_cast<const T*>(p.prefix_v) + bb * p.pv_stride[0] + hk * p.pv_stride[1];
    load_tile<BN, D, NT>(sK, k, p.pk_stride[2], n0, key_len);
    load_tile<BN, D, NT>(sV, v, p.pv_stride[2], n0, key_len);
    dk_out = static_cast<T*>(p.dprefix_k) + bb * p.dpk_stride[0] + hk * p.dpk_stride[1];
    dv_out = static_cast<T*>(p.dprefix_v) + bb * p.dpv_stride[0] + hk * p.dpv_stride[1];
    dk_row = p.dpk_stride[2];
    dv_row = p.dpv_stride[2];
  } else {
    k = static_cast<const T*>(p.k) + bb * p.k_stride[0] + hk * p.k_stride[1];
    v = static_cast<const T*>(p.v) + bb * p.v_stride[0] + hk * p.v_stride[1];
    load_tile<BN, D, NT>(sK, k, p.k_stride[2], n0, key_len);
    load_tile<BN, D, NT>(sV, v, p.v_stride[2], n0, key_len);
    dk_out = static_cast<T*>(p.dk) + bb * p.dk_stride[0] + hk * p.dk_stride[1];
    dv_out = static_cast<T*>(p.dv) + bb * p.dv_stride[0] + hk * p.dv_stride[1];
    dk_row = p.dk_stride[2];
    dv_row = p.dv_stride[2];
  }

  const TileRange qt = prefix ? lay.prefix_query_tiles(BM) : lay.packed_query_tiles(n0, n1, L, BM);
  const int per_head = qt.size();
  const int total = group * per_head;

  auto issue = [&](int it) {
    const int h = hk * group + it / per_head;
    const int m0 = (qt.begin + it % per_head) * BM;
    const int buf = it & 1;
    const T* q = static_cast<const T*>(p.q) + bb * p.q_stride[0] + h * p.q_stride[1];
    const T* dout = static_cast<const T*>(p.dout) + bb * p.dout_stride[0] + h * p.dout_stride[1];
    load_tile<BM, D, NT>(sQ + buf * BM * D, q, p.q_stride[2], m0, N);
    load_tile<BM, D, NT>(sO + buf * BM * D, dout, p.dout_stride[2], m0, N);
    const int64_t base = (bb * p.heads_q + h) * N;
    for (int i = threadIdx.x; i < BM; i += NT) {
      const bool ok = m0 + i < N;
      const int64_t idx = ok ? base + m0 + i : 0;
      cp_async_4(sL + buf * BM + i, p.lse_log2 + idx, ok);
      cp_async_4(sDelta + buf * BM + i, p.delta + idx, ok);
    }
  };

  if (total > 0) issue(0);
  cp_async_commit();

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tq = lane & 3;
  const int keys[2] = {n0 + warp * 16 + g, n0 + warp * 16 + g + 8};
  const float scale_log2 = p.scale * kLog2e;

  float dk[OTILES][4], dv[OTILES][4];
#pragma unroll
  for (int i = 0; i < OTILES; ++i) {
    dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = 0.f;
    dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
  }

  for (int it = 0; it < total; ++it) {
    pipeline_wait(it, total, issue);
    const int m0 = (qt.begin + it % per_head) * BM;
    const int buf = it & 1;
    const T* tQ = sQ + buf * BM * D;
    const T* tO = sO + buf * BM * D;
    const float* tL = sL + buf * BM;
    const float* tDelta = sDelta + buf * BM;

    float s[STILES][4], dp[STILES][4];
#pragma unroll
    for (int i = 0; i < STILES; ++i) {
      s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
      dp[i][0] = dp[i][1] = dp[i][2] = dp[i][3] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t ka[4], va[4];
      load_a<D>(ka, sK, warp * 16, 2 * kk);
      load_a<D>(va, sV, warp * 16, 2 * kk);
#pragma unroll
      for (int np = 0; np < STILES / 2; ++np) {
        uint32_t qb[4], ob[4];
        load_b_nk<D>(qb, tQ, np * 16, 2 * kk);
        M::mma(s[2 * np], ka, qb[0], qb[1]);
        M::mma(s[2 * np + 1], ka, qb[2], qb[3]);
        load_b_nk<D>(ob, tO, np * 16, 2 * kk);
        M::mma(dp[2 * np], va, ob[0], ob[1]);
        M::mma(dp[2 * np + 1], va, ob[2], ob[3]);
      }
    }

    // s becomes P^T, dp becomes dS^T. Element (key keys[e >> 1], query m0 + col).
    const bool masked = tile_needs_mask(lay, prefix != 0, m0, BM, n0, BN, L);
#pragma unroll
    for (int nt = 0; nt < STILES; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * tq + (e & 1);
        float pr = exp2f(s[nt][e] * scale_log2 - tL[col]);
        if (masked && !(keys[e >> 1] < key_len && pair_visible(lay, prefix != 0, m0 + col, keys[e >> 1], L))) {
          pr = 0.f;
        }
        s[nt][e] = pr;
        dp[nt][e] = pr * (dp[nt][e] - tDelta[col]);
      }
    }

#pragma unroll
    for (int kk = 0; kk < BM / 16; ++kk) {
      const uint32_t pa[4] = {M::pack(s[2 * kk][0], s[2 * kk][1]), M::pack(s[2 * kk][2], s[2 * kk][3]),
                              M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t da[4] = {M::pack(dp[2 * kk][0], dp[2 * kk][1]), M::pack(dp[2 * kk][2], dp[2 * kk][3]),
                              M::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                              M::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 16; ++dt) {
        uint32_t ob[4], qb[4];
        load_b_kn<D>(ob, tO, kk * 16, 2 * dt);
        M::mma(dv[2 * dt], pa, ob[0], ob[1]);
        M::mma(dv[2 * dt + 1], pa, ob[2], ob[3]);
        load_b_kn<D>(qb, tQ, kk * 16, 2 * dt);
        M::mma(dk[2 * dt], da, qb[0], qb[1]);
        M::mma(dk[2 * dt + 1], da, qb[2], qb[3]);
      }
    }
    __syncthreads();
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (keys[r] >= key_len) continue;
    T* dst_k = dk_out + static_cast<int64_t>(keys[r]) * dk_row;
    T* dst_v = dv_out + static_cast<int64_t>(keys[r]) * dv_row;
#pragma unroll
    for (int dt = 0; dt < OTILES; ++dt) {
      *reinterpret_cast<uint32_t*>(dst_k + dt * 8 + 2 * tq) =
          M::pack(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
      *reinterpret_cast<uint32_t*>(dst_v + dt * 8 + 2 * tq) = M::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

}  // namespace rmt
