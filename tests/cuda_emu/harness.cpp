// Runs the attention kernels of csrc/ on the CPU, for tests/test_cuda_emulation.py: a grid of CTAs,
// each CTA's threads as fibers (see ptx_sm80.cuh here, which replaces the real one). The launch
// sequence mirrors csrc/segment_attention.cu (same grids, same kernels, same order).
//
// Exported (C ABI, loaded with ctypes):
//   int rmt_emu_fwd(const rmt::SegmentAttentionParams*), int rmt_emu_bwd(...): 0, or -1 when a CTA
//     deadlocks (threads stuck at different barriers), -2 for an unsupported dtype / head dim.
//   long rmt_emu_offset(const char* field): offsetof in SegmentAttentionParams (-1: unknown), and
//   long rmt_emu_params_size(): sizeof, so the test can check its ctypes mirror.
#include "segment_attention_bwd.cuh"

#include <cstddef>
#include <cstring>

namespace rmt {
alignas(128) unsigned char smem_raw[256 * 1024];
}

asm(R"(
.text
.globl rmt_emu_swap
.hidden rmt_emu_swap
.type rmt_emu_swap, @function
rmt_emu_swap:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size rmt_emu_swap, .-rmt_emu_swap
)");

namespace rmt_emu {
namespace {

constexpr size_t kStack = 256 * 1024;
std::vector<Fiber> g_fibers;
std::function<void()> g_body;
bool g_deadlock = false;

extern "C" void rmt_emu_fiber_entry() {
  g_body();
  g_current->done = true;
  ++g_cta.progress;
  rmt_emu_swap(&g_current->sp, g_scheduler_sp);
  std::abort();  // a finished fiber is never resumed
}

void start(Fiber& f) {
  if (f.stack.size() != kStack) f.stack.assign(kStack, 0);
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack.data() + kStack) & ~uintptr_t{15};
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                                  // fake return address of the entry
  *--sp = reinterpret_cast<void*>(&rmt_emu_fiber_entry);            // popped by `ret`
  for (int i = 0; i < 6; ++i) *--sp = nullptr;                      // rbp rbx r12 r13 r14 r15
  f.sp = sp;
  f.done = false;
  f.groups.assign(1, {});
}

// Runs `kernel` for every CTA of `grid` with `threads` threads; false on a deadlock.
template <typename Kernel>
bool launch(Dim3 grid, unsigned threads, Kernel kernel) {
  g_fibers.resize(threads);
  g_warps.assign((threads + 31) / 32, WarpState{});
  g_body = kernel;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block_idx = Dim3{x, y, z};
        g_cta = CtaState{};
        g_cta.threads = threads;
        for (unsigned t = 0; t < threads; ++t) {
          start(g_fibers[t]);
          g_fibers[t].thread_idx = Dim3{t, 0, 0};
        }
        unsigned alive = threads;
        while (alive > 0) {
          const unsigned long before = g_cta.progress;
          alive = 0;
          for (Fiber& f : g_fibers) {
            if (f.done) continue;
            g_current = &f;
            rmt_emu_swap(&g_scheduler_sp, f.sp);
            alive += !f.done;
          }
          if (alive > 0 && g_cta.progress == before) {
            g_deadlock = true;
            return false;
          }
        }
      }
    }
  }
  return true;
}

unsigned cdivu(int a, int b) { return static_cast<unsigned>((a + b - 1) / b); }

template <typename T, int D>
int fwd(const rmt::SegmentAttentionParams& p) {
  const int n = p.num_read + p.segment_len + p.num_write;
  const Dim3 grid{cdivu(n, rmt::AttnConfig<D>::FWD_BM), static_cast<unsigned>(p.heads_q), static_cast<unsigned>(p.batch)};
  return launch(grid, rmt::AttnThreads<D>::fwd, [&] { rmt::segment_attention_fwd_kernel<T, D>(p); }) ? 0 : -1;
}

template <typename T, int D>
int bwd(const rmt::SegmentAttentionParams& p) {
  const int n = p.num_read + p.segment_len + p.num_write;
  const unsigned hq = static_cast<unsigned>(p.heads_q), hkv = static_cast<unsigned>(p.heads_kv);
  const unsigned b = static_cast<unsigned>(p.batch);
  constexpr int BN = rmt::AttnConfig<D>::DKV_BN;
  bool ok = launch(Dim3{cdivu(n, rmt::kPreprocessThreads / 32), hq, b}, rmt::kPreprocessThreads,
                   [&] { rmt::segment_attention_bwd_preprocess_kernel<T>(p); });
  ok = ok && launch(Dim3{cdivu(n, BN), hkv, b}, rmt::AttnThreads<D>::dkv,
                    [&] { rmt::segment_attention_bwd_dkdv_kernel<T, D>(p, 0); });
  if (ok && p.prefix_len > 0 && p.dprefix_k != nullptr) {
    ok = launch(Dim3{cdivu(p.prefix_len, BN), hkv, b}, rmt::AttnThreads<D>::dkv,
                [&] { rmt::segment_attention_bwd_dkdv_kernel<T, D>(p, 1); });
  }
  ok = ok && launch(Dim3{cdivu(n, rmt::AttnConfig<D>::DQ_BM), hq, b}, rmt::AttnThreads<D>::dq,
                    [&] { rmt::segment_attention_bwd_dq_kernel<T, D>(p); });
  return ok ? 0 : -1;
}

template <template <typename, int> class Op>
int dispatch(const rmt::SegmentAttentionParams& p) {
  const bool bf16 = p.dtype == rmt::DTYPE_BFLOAT16;
  if (p.dtype != rmt::DTYPE_FLOAT16 && !bf16) return -2;
  if (p.head_dim == 64) return bf16 ? Op<__nv_bfloat16, 64>::run(p) : Op<__half, 64>::run(p);
  if (p.head_dim == 128) return bf16 ? Op<__nv_bfloat16, 128>::run(p) : Op<__half, 128>::run(p);
  return -2;
}

template <typename T, int D>
struct Fwd {
  static int run(const rmt::SegmentAttentionParams& p) { return fwd<T, D>(p); }
};
template <typename T, int D>
struct Bwd {
  static int run(const rmt::SegmentAttentionParams& p) { return bwd<T, D>(p); }
};

}  // namespace
}  // namespace rmt_emu

#define RMT_FIELD(name) {#name, offsetof(rmt::SegmentAttentionParams, name)}

extern "C" {

int rmt_emu_fwd(const rmt::SegmentAttentionParams* p) { return rmt_emu::dispatch<rmt_emu::Fwd>(*p); }
int rmt_emu_bwd(const rmt::SegmentAttentionParams* p) { return rmt_emu::dispatch<rmt_emu::Bwd>(*p); }
long rmt_emu_params_size() { return static_cast<long>(sizeof(rmt::SegmentAttentionParams)); }

long rmt_emu_offset(const char* field) {
  static const struct {
    const char* name;
    size_t offset;
  } fields[] = {
      RMT_FIELD(q), RMT_FIELD(k), RMT_FIELD(v), RMT_FIELD(prefix_k), RMT_FIELD(prefix_v),
      RMT_FIELD(segment_lengths), RMT_FIELD(q_stride), RMT_FIELD(k_stride), RMT_FIELD(v_stride),
      RMT_FIELD(pk_stride), RMT_FIELD(pv_stride), RMT_FIELD(out), RMT_FIELD(lse), RMT_FIELD(out_stride),
      RMT_FIELD(lse_stride), RMT_FIELD(dout), RMT_FIELD(dout_stride), RMT_FIELD(dq), RMT_FIELD(dk),
      RMT_FIELD(dv), RMT_FIELD(dprefix_k), RMT_FIELD(dprefix_v), RMT_FIELD(dq_stride), RMT_FIELD(dk_stride),
      RMT_FIELD(dv_stride), RMT_FIELD(dpk_stride), RMT_FIELD(dpv_stride), RMT_FIELD(delta),
      RMT_FIELD(lse_log2), RMT_FIELD(batch), RMT_FIELD(heads_q), RMT_FIELD(heads_kv), RMT_FIELD(head_dim),
      RMT_FIELD(num_read), RMT_FIELD(segment_len), RMT_FIELD(num_write), RMT_FIELD(prefix_len),
      RMT_FIELD(mask), RMT_FIELD(prefix_all), RMT_FIELD(scale), RMT_FIELD(dtype),
  };
  for (const auto& f : fields) {
    if (std::strcmp(f.name, field) == 0) return static_cast<long>(f.offset);
  }
  return -1;
}

}  // extern "C"
