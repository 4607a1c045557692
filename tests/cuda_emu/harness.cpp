// Runs the attention and pack kernels of csrc/ on the CPU, for tests/test_cuda_emulation.py: a grid
// of CTAs, each CTA's threads as fibers (see common/ptx_sm80.cuh here, which replaces the real one).
// The launch sequences mirror csrc/segment_attention/segment_attention.cu and
// csrc/pack_segment/pack_segment.cu (same grids, same kernels, same order; the pack copy unit from the
// same pack_copy_unit).
//
// Exported (C ABI, loaded with ctypes):
//   int rmt_emu_fwd(const rmt::SegmentAttentionParams*), int rmt_emu_bwd(...),
//   int rmt_emu_pack_fwd(const rmt::PackParams*), int rmt_emu_memory_grad(const rmt::MemoryGradParams*),
//   int rmt_emu_embedding_grad(const rmt::EmbeddingGradParams*): 0, or -1 when a CTA deadlocks
//     (threads stuck at different barriers), -2 for an unsupported dtype / head dim.
//   long rmt_emu_offset(const char* type, const char* field) (-1: unknown) and
//   long rmt_emu_sizeof(const char* type): offsetof / sizeof in each params struct, so the test can
//     check its ctypes mirrors field by field.
// The emulation first: it defines the CUDA keywords and built-ins (__global__, threadIdx, ...) that
// nvcc provides to every kernel header. Angle brackets so that it comes from the include dir (the
// copied csrc/ tree, where it replaces the real one), the same file the kernel headers include.
#include <common/ptx_sm80.cuh>

#include "pack_segment/pack_segment.cuh"
#include "segment_attention/segment_attention_bwd.cuh"
#include "segment_attention/segment_attention_fwd.cuh"

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

// Runs `kernel` for every CTA of `grid` with `block` threads; false on a deadlock.
template <typename Kernel>
bool launch(Dim3 grid, Dim3 block, Kernel kernel) {
  const unsigned threads = block.x * block.y;
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
          g_fibers[t].thread_idx = Dim3{t % block.x, t / block.x, 0};
          g_fibers[t].linear = t;
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

template <typename Kernel>
bool launch(Dim3 grid, unsigned threads, Kernel kernel) {
  return launch(grid, Dim3{threads, 1, 1}, kernel);
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

template <typename U>
int pack(const rmt::PackParams& p) {
  const int n = p.num_read + p.segment_len + p.num_write;
  const Dim3 grid{cdivu(n, rmt::kPackRowsPerCta), static_cast<unsigned>(p.batch), 1};
  return launch(grid, Dim3{32, rmt::kPackRowsPerCta, 1}, [&] { rmt::pack_segment_fwd_kernel<U>(p); }) ? 0 : -1;
}

template <typename T>
int memory_grad(const rmt::MemoryGradParams& p) {
  const Dim3 grid{static_cast<unsigned>(p.rows), cdivu(p.dim, rmt::kReduceThreads),
                  p.broadcast ? 1u : static_cast<unsigned>(p.batch)};
  return launch(grid, rmt::kReduceThreads, [&] { rmt::pack_memory_grad_kernel<T>(p); }) ? 0 : -1;
}

template <typename T>
int embedding_grad(const rmt::EmbeddingGradParams& p) {
  if (p.sorted_ids != nullptr) {
    const Dim3 grid{static_cast<unsigned>(p.batch * p.segment_len), cdivu(p.dim, rmt::kReduceThreads), 1};
    return launch(grid, rmt::kReduceThreads, [&] { rmt::pack_embedding_grad_sorted_kernel<T>(p); }) ? 0 : -1;
  }
  const Dim3 grid{static_cast<unsigned>(p.segment_len), static_cast<unsigned>(p.batch), 1};
  return launch(grid, rmt::kReduceThreads, [&] { rmt::pack_embedding_grad_atomic_kernel<T>(p); }) ? 0 : -1;
}

template <template <typename> class Op, typename P>
int dispatch_pack_dtype(const P& p) {
  switch (p.dtype) {
    case rmt::PACK_FLOAT16: return Op<__half>::run(p);
    case rmt::PACK_BFLOAT16: return Op<__nv_bfloat16>::run(p);
    case rmt::PACK_FLOAT32: return Op<float>::run(p);
    default: return -2;
  }
}

template <typename T>
struct MemoryGrad {
  static int run(const rmt::MemoryGradParams& p) { return memory_grad<T>(p); }
};
template <typename T>
struct EmbeddingGrad {
  static int run(const rmt::EmbeddingGradParams& p) { return embedding_grad<T>(p); }
};

}  // namespace
}  // namespace rmt_emu

#define RMT_FIELD(type, name) {#type, #name, offsetof(rmt::type, name)}
#define RMT_ATTN(name) RMT_FIELD(SegmentAttentionParams, name)
#define RMT_PACK(name) RMT_FIELD(PackParams, name)
#define RMT_MEM(name) RMT_FIELD(MemoryGradParams, name)
#define RMT_EMB(name) RMT_FIELD(EmbeddingGradParams, name)

extern "C" {

int rmt_emu_fwd(const rmt::SegmentAttentionParams* p) { return rmt_emu::dispatch<rmt_emu::Fwd>(*p); }
int rmt_emu_bwd(const rmt::SegmentAttentionParams* p) { return rmt_emu::dispatch<rmt_emu::Bwd>(*p); }

int rmt_emu_pack_fwd(const rmt::PackParams* params) {
  const int n = params->num_read + params->segment_len + params->num_write;
  if (params->batch == 0 || n == 0 || params->dim == 0) return 0;
  rmt::PackParams p = *params;
  switch (rmt::pack_copy_unit(&p)) {
    case 16: return rmt_emu::pack<uint4>(p);
    case 4: return rmt_emu::pack<uint32_t>(p);
    default: return rmt_emu::pack<uint16_t>(p);
  }
}

int rmt_emu_memory_grad(const rmt::MemoryGradParams* p) {
  if (p->rows == 0 || p->dim == 0 || (!p->broadcast && p->batch == 0)) return 0;
  return rmt_emu::dispatch_pack_dtype<rmt_emu::MemoryGrad>(*p);
}

int rmt_emu_embedding_grad(const rmt::EmbeddingGradParams* p) {
  if (p->batch == 0 || p->segment_len == 0 || p->dim == 0) return 0;
  return rmt_emu::dispatch_pack_dtype<rmt_emu::EmbeddingGrad>(*p);
}

long rmt_emu_sizeof(const char* type) {
  if (std::strcmp(type, "SegmentAttentionParams") == 0) return static_cast<long>(sizeof(rmt::SegmentAttentionParams));
  if (std::strcmp(type, "PackParams") == 0) return static_cast<long>(sizeof(rmt::PackParams));
  if (std::strcmp(type, "MemoryGradParams") == 0) return static_cast<long>(sizeof(rmt::MemoryGradParams));
  if (std::strcmp(type, "EmbeddingGradParams") == 0) return static_cast<long>(sizeof(rmt::EmbeddingGradParams));
  return -1;
}

long rmt_emu_offset(const char* type, const char* field) {
  static const struct {
    const char* type;
    const char* name;
    size_t offset;
  } fields[] = {
      RMT_ATTN(q), RMT_ATTN(k), RMT_ATTN(v), RMT_ATTN(prefix_k), RMT_ATTN(prefix_v), RMT_ATTN(segment_lengths),
      RMT_ATTN(q_stride), RMT_ATTN(k_stride), RMT_ATTN(v_stride), RMT_ATTN(pk_stride), RMT_ATTN(pv_stride),
      RMT_ATTN(out), RMT_ATTN(lse), RMT_ATTN(out_stride), RMT_ATTN(lse_stride), RMT_ATTN(dout), RMT_ATTN(dout_stride),
      RMT_ATTN(dq), RMT_ATTN(dk), RMT_ATTN(dv), RMT_ATTN(dprefix_k), RMT_ATTN(dprefix_v), RMT_ATTN(dq_stride),
      RMT_ATTN(dk_stride), RMT_ATTN(dv_stride), RMT_ATTN(dpk_stride), RMT_ATTN(dpv_stride), RMT_ATTN(delta),
      RMT_ATTN(lse_log2), RMT_ATTN(batch), RMT_ATTN(heads_q), RMT_ATTN(heads_kv), RMT_ATTN(head_dim),
      RMT_ATTN(num_read), RMT_ATTN(segment_len), RMT_ATTN(num_write), RMT_ATTN(prefix_len), RMT_ATTN(mask),
      RMT_ATTN(prefix_all), RMT_ATTN(scale), RMT_ATTN(dtype),
      RMT_PACK(out), RMT_PACK(out_stride), RMT_PACK(src), RMT_PACK(src_stride), RMT_PACK(ids), RMT_PACK(ids_stride),
      RMT_PACK(ids_int64), RMT_PACK(read), RMT_PACK(read_stride), RMT_PACK(write), RMT_PACK(write_stride),
      RMT_PACK(batch), RMT_PACK(num_read), RMT_PACK(segment_len), RMT_PACK(num_write), RMT_PACK(dim),
      RMT_PACK(elem_bytes),
      RMT_MEM(grad), RMT_MEM(grad_stride), RMT_MEM(dmem), RMT_MEM(dmem_stride), RMT_MEM(batch), RMT_MEM(rows),
      RMT_MEM(dim), RMT_MEM(start), RMT_MEM(start2), RMT_MEM(broadcast), RMT_MEM(dtype),
      RMT_EMB(grad), RMT_EMB(grad_stride), RMT_EMB(ids), RMT_EMB(ids_stride), RMT_EMB(ids_int64), RMT_EMB(dweight),
      RMT_EMB(dw_stride), RMT_EMB(sorted_ids), RMT_EMB(order), RMT_EMB(batch), RMT_EMB(segment_len), RMT_EMB(dim),
      RMT_EMB(start), RMT_EMB(dtype),
  };
  for (const auto& f : fields) {
    if (std::strcmp(f.type, type) == 0 && std::strcmp(f.name, field) == 0) return static_cast<long>(f.offset);
  }
  return -1;
}

}  // extern "C"
