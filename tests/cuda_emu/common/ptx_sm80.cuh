// CPU emulation of csrc/common/ptx_sm80.cuh, for tests/test_cuda_emulation.py.
//
// The attention and pack kernels of csrc/ are compiled as host C++ with this file in place of the real
// common/ptx_sm80.cuh (the other headers are the real ones, copied unchanged into the same tree). Each CUDA thread of a CTA runs
// as a fiber on one OS thread (x86-64 context switch below); warp-collective instructions exchange
// their operands through per-warp slots between two warp barriers, and implement the PTX ISA
// definitions of the fragment layouts:
//
//   ldmatrix .x4: lanes 8j..8j+7 give the row addresses of matrix j; lane l receives in register j
//     the 16-bit elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix j (.trans: (rows 2(l%4),
//     2(l%4)+1, col l/4)), the lower column / row in the low half.
//   mma.m16n8k16.row.col: A regs {row g, k 2t..}, {row g+8, k 2t..}, {row g, k 2t+8..},
//     {row g+8, k 2t+8..}; B regs {k 2t.., col g}, {k 2t+8.., col g}; C {row g, col 2t}, {row g,
//     col 2t+1}, {row g+8, col 2t}, {row g+8, col 2t+1}, with g = lane / 4, t = lane % 4.
//   cp.async: copies are queued per thread and land only when cp.async.wait_group retires their
//     group, so a read of a buffer before its wait sees stale data (as it may on a GPU).
//
// Products are exact in float32 (16-bit inputs), accumulated in k order: not bit-identical to a
// tensor core, within float32 rounding of it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>
#include <stdint.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

namespace rmt {
// The dynamic shared memory of the running CTA (defined by the harness).
extern unsigned char smem_raw[];
}  // namespace rmt

namespace rmt_emu {

struct Dim3 {
  unsigned x, y, z;
};

struct Copy {
  void* dst;
  const void* src;  // null: zero-fill
  int bytes;
};

struct Fiber {
  void* sp = nullptr;
  std::vector<char> stack;
  Dim3 thread_idx{0, 0, 0};
  unsigned linear = 0;  // x + y * blockDim.x: the warp is linear / 32
  bool done = false;
  std::vector<std::vector<Copy>> groups{1};  // committed groups, the open one last
};

struct WarpState {
  unsigned count = 0;
  unsigned gen = 0;
  uint32_t u[32][4];
  uint32_t w[32][2];
  float f[32][4];
};

struct CtaState {
  unsigned count = 0;
  unsigned gen = 0;
  unsigned threads = 0;
  unsigned long progress = 0;
};

inline Fiber* g_current = nullptr;
inline void* g_scheduler_sp = nullptr;
inline Dim3 g_block_idx{0, 0, 0};
inline CtaState g_cta;
inline std::vector<WarpState> g_warps;

extern "C" void rmt_emu_swap(void** save_sp, void* load_sp);

inline void yield() { rmt_emu_swap(&g_current->sp, g_scheduler_sp); }

inline unsigned lane() { return g_current->linear & 31u; }

inline void sync_warp() {
  WarpState& w = g_warps[g_current->linear >> 5];
  const unsigned gen = w.gen;
  ++g_cta.progress;
  if (++w.count == 32) {
    w.count = 0;
    ++w.gen;
    return;
  }
  while (w.gen == gen) yield();
}

inline void sync_cta() {
  const unsigned gen = g_cta.gen;
  ++g_cta.progress;
  if (++g_cta.count == g_cta.threads) {
    g_cta.count = 0;
    ++g_cta.gen;
    return;
  }
  while (g_cta.gen == gen) yield();
}

inline WarpState& warp() { return g_warps[g_current->linear >> 5]; }

inline float half_bits_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    __nv_bfloat16_raw raw;
    raw.x = bits;
    return __bfloat162float(__nv_bfloat16(raw));
  }
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}

inline void ldmatrix(uint32_t (&r)[4], uint32_t addr, bool trans) {
  WarpState& w = warp();
  const unsigned l = lane();
  w.u[l][0] = addr;
  sync_warp();
  for (int j = 0; j < 4; ++j) {
    uint16_t lo, hi;
    if (!trans) {
      const uint16_t* row = reinterpret_cast<const uint16_t*>(rmt::smem_raw + w.u[8 * j + l / 4][0]);
      lo = row[2 * (l % 4)];
      hi = row[2 * (l % 4) + 1];
    } else {
      lo = reinterpret_cast<const uint16_t*>(rmt::smem_raw + w.u[8 * j + 2 * (l % 4)][0])[l / 4];
      hi = reinterpret_cast<const uint16_t*>(rmt::smem_raw + w.u[8 * j + 2 * (l % 4) + 1][0])[l / 4];
    }
    r[j] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  sync_warp();
}

inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  WarpState& w = warp();
  const unsigned l = lane();
  for (int i = 0; i < 4; ++i) w.u[l][i] = a[i];
  w.w[l][0] = b0;
  w.w[l][1] = b1;
  sync_warp();
  auto elem = [&](uint32_t reg, int k) { return half_bits_to_float(static_cast<uint16_t>(reg >> (16 * (k & 1))), bf16); };
  auto A = [&](int row, int k) { return elem(w.u[(row % 8) * 4 + (k % 8) / 2][(row >= 8) + 2 * (k >= 8)], k); };
  auto B = [&](int k, int col) { return elem(w.w[col * 4 + (k % 8) / 2][k >= 8], k); };
  const int g = l / 4, t = l % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >= 2), col = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    d[i] = acc;
  }
  sync_warp();
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

template <typename T>
T shfl_xor(T value, int mask) {
  WarpState& w = warp();
  const unsigned l = lane();
  std::memcpy(&w.f[l][0], &value, sizeof(T));
  sync_warp();
  T out;
  std::memcpy(&out, &w.f[l ^ static_cast<unsigned>(mask)][0], sizeof(T));
  sync_warp();
  return out;
}

inline void async_copy(void* smem, const void* gmem, int bytes, bool pred) {
  g_current->groups.back().push_back(Copy{smem, pred ? gmem : nullptr, bytes});
}

inline void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.src != nullptr) {
      std::memcpy(c.dst, c.src, c.bytes);
    } else {
      std::memset(c.dst, 0, c.bytes);
    }
  }
}

// cp.async.wait_group n: every committed group but the newest n has landed.
inline void wait_groups(int n) {
  std::vector<std::vector<Copy>>& groups = g_current->groups;
  const int committed = static_cast<int>(groups.size()) - 1;
  const int retire = committed - n;
  for (int i = 0; i < retire; ++i) land(groups[i]);
  if (retire > 0) groups.erase(groups.begin(), groups.begin() + retire);
}

}  // namespace rmt_emu

#define threadIdx (rmt_emu::g_current->thread_idx)
#define blockIdx (rmt_emu::g_block_idx)
#define __syncthreads() rmt_emu::sync_cta()
#undef CUDART_INF_F
#define CUDART_INF_F (INFINITY)

template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) {
  return rmt_emu::shfl_xor(value, mask);
}

// One OS thread runs every fiber, and fibers switch only at barriers: a read-modify-write is atomic.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

namespace rmt {

inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - smem_raw);
}

inline void cp_async_16(void* smem, const void* gmem, bool pred) { rmt_emu::async_copy(smem, gmem, 16, pred); }
inline void cp_async_4(void* smem, const void* gmem, bool pred) { rmt_emu::async_copy(smem, gmem, 4, pred); }
inline void cp_async_commit() { rmt_emu::g_current->groups.emplace_back(); }

template <int N>
inline void cp_async_wait() {
  rmt_emu::wait_groups(N);
}

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) { rmt_emu::ldmatrix(r, addr, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) { rmt_emu::ldmatrix(r, addr, true); }

inline void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  rmt_emu::mma(c, a, b0, b1, false);
}
inline void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  rmt_emu::mma(c, a, b0, b1, true);
}

}  // namespace rmt
