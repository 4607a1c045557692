// The torch binding of the CUDA kernels: the one TORCH_LIBRARY of rmt_kernels' C++ side.
//
// Ops (CUDA dispatch key; called eagerly from the Python custom ops rmt_kernels::segment_attention_fwd
// / _bwd, pack_segment_*, pack_memory_grad and pack_embedding_grad when backend="cuda", which carry
// the fake implementations and the autograd formulas; see rmt_kernels/ops/*/cuda.py):
//
//   segment_attention_fwd_cuda   writes out [B, H_q, N, D] and lse [B, H_q, N] (float32)
//   segment_attention_bwd_cuda   writes dq, dk, dv and, when given, dprefix_k / dprefix_v
//   pack_segment_fwd_cuda        writes the packed buffer from a segment or from token ids
//   pack_segment_bwd_cuda        writes one memory's gradient (slots and batch summed)
//   pack_embedding_grad_cuda     writes the embedding-weight gradient (sorted or atomic)
//
// Outputs are allocated by the Python launchers (their layouts are the package's contract); this file
// checks what the kernels rely on, fills the parameter structs and launches on the stream it is given
// (every op takes the caller's torch.cuda.current_stream().cuda_stream as its last argument).
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "pack_segment/pack_segment_params.h"
#include "segment_attention/segment_attention_params.h"

namespace rmt {
namespace {

using OptTensor = std::optional<at::Tensor>;

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

void check_device(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), "rmt_kernels CUDA backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == like.device(), "rmt_kernels CUDA backend: ", name, " is on ", t.device(),
              " but the inputs are on ", like.device());
}

void check_4d(const at::Tensor& t, const char* name, const at::Tensor& like) {
  check_device(t, name, like);
  TORCH_CHECK(t.dim() == 4, "rmt_kernels CUDA backend: ", name, " must be 4-D, got ", t.dim(), "-D");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "rmt_kernels CUDA backend: ", name, " has dtype ",
              t.scalar_type(), " but q has ", like.scalar_type());
}

template <int N>
void strides(int64_t (&dst)[N], const at::Tensor& t) {
  for (int i = 0; i < N; ++i) dst[i] = t.stride(i);
}

int attention_dtype(const at::Tensor& q) {
  if (q.scalar_type() == at::kHalf) return DTYPE_FLOAT16;
  if (q.scalar_type() == at::kBFloat16) return DTYPE_BFLOAT16;
  TORCH_CHECK(false, "rmt_kernels CUDA backend: segment attention supports float16 and bfloat16, got ",
              q.scalar_type());
}

// The cudaStream_t to launch on: the caller's torch.cuda.current_stream().cuda_stream. Taking it as an
// argument keeps this file free of CUDA headers and of libc10_cuda.
void* as_stream(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// Inputs shared by the forward and the backward.
SegmentAttentionParams attention_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const OptTensor& prefix_k, const OptTensor& prefix_v,
                                        const OptTensor& segment_lengths, const at::Tensor& out,
                                        const at::Tensor& lse, int64_t num_read, int64_t num_write,
                                        int64_t mask, bool prefix_all, double scale) {
  check_4d(q, "q", q);
  check_4d(k, "k", q);
  check_4d(v, "v", q);
  check_4d(out, "out", q);
  TORCH_CHECK(k.sizes() == v.sizes(), "rmt_kernels CUDA backend: k and v shapes differ");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(3) == q.size(3),
              "rmt_kernels CUDA backend: k/v must be [B, H_kv, N, D] with q's B, N, D");
  TORCH_CHECK(out.sizes() == q.sizes(), "rmt_kernels CUDA backend: out must have q's shape");
  check_device(lse, "lse", q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3, "rmt_kernels CUDA backend: lse must be float32 [B, H_q, N]");
  TORCH_CHECK(lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "rmt_kernels CUDA backend: lse must be [B, H_q, N]");

  SegmentAttentionParams p{};
  p.dtype = attention_dtype(q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  strides(p.q_stride, q);
  strides(p.k_stride, k);
  strides(p.v_stride, v);
  p.out = out.data_ptr();
  strides(p.out_stride, out);
  p.lse = lse.data_ptr<float>();
  strides(p.lse_stride, lse);

  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.head_dim = static_cast<int>(q.size(3));
  const int64_t n = q.size(2);
  TORCH_CHECK(num_read >= 0 && num_write >= 0 && num_read + num_write <= n,
              "rmt_kernels CUDA backend: need 0 <= num_read + num_write <= N");
  TORCH_CHECK(n < (int64_t{1} << 30), "rmt_kernels CUDA backend: N must be below 2^30");
  p.num_read = static_cast<int>(num_read);
  p.num_write = static_cast<int>(num_write);
  p.segment_len = static_cast<int>(n - num_read - num_write);
  p.mask = static_cast<int>(mask);
  p.prefix_all = prefix_all ? 1 : 0;
  p.scale = static_cast<float>(scale);

  TORCH_CHECK(present(prefix_k) == present(prefix_v), "rmt_kernels CUDA backend: prefix_k and prefix_v go together");
  if (present(prefix_k) && prefix_k->size(2) > 0) {
    check_4d(*prefix_k, "prefix_k", q);
    check_4d(*prefix_v, "prefix_v", q);
    TORCH_CHECK(prefix_k->sizes() == prefix_v->sizes() && prefix_k->size(0) == q.size(0) &&
                    prefix_k->size(1) == k.size(1) && prefix_k->size(3) == q.size(3),
                "rmt_kernels CUDA backend: prefix_k/prefix_v must be [B, H_kv, P, D]");
    p.prefix_k = prefix_k->data_ptr();
    p.prefix_v = prefix_v->data_ptr();
    strides(p.pk_stride, *prefix_k);
    strides(p.pv_stride, *prefix_v);
    p.prefix_len = static_cast<int>(prefix_k->size(2));
  }
  if (present(segment_lengths)) {
    const at::Tensor& sl = *segment_lengths;
    check_device(sl, "segment_lengths", q);
    TORCH_CHECK(sl.scalar_type() == at::kInt && sl.dim() == 1 && sl.size(0) == q.size(0) && sl.is_contiguous(),
                "rmt_kernels CUDA backend: segment_lengths must be a contiguous int32 [B] tensor");
    p.segment_lengths = sl.data_ptr<int32_t>();
  }
  return p;
}

void segment_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const OptTensor& prefix_k, const OptTensor& prefix_v,
                                const OptTensor& segment_lengths, const at::Tensor& out, const at::Tensor& lse,
                                int64_t num_read, int64_t num_write, int64_t mask, bool prefix_all, double scale,
                                int64_t stream) {
  const c10::DeviceGuard guard(q.device());
  SegmentAttentionParams p = attention_params(q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, num_read,
                                              num_write, mask, prefix_all, scale);
  const char* err = segment_attention_fwd(p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "rmt_kernels segment_attention_fwd_cuda: ", err);
}

void segment_attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const OptTensor& prefix_k, const OptTensor& prefix_v,
                                const OptTensor& segment_lengths, const at::Tensor& out, const at::Tensor& lse,
                                const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv,
                                const OptTensor& dprefix_k, const OptTensor& dprefix_v, int64_t num_read,
                                int64_t num_write, int64_t mask, bool prefix_all, double scale, int64_t stream) {
  const c10::DeviceGuard guard(q.device());
  SegmentAttentionParams p = attention_params(q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, num_read,
                                              num_write, mask, prefix_all, scale);
  check_4d(dout, "dout", q);
  check_4d(dq, "dq", q);
  check_4d(dk, "dk", q);
  check_4d(dv, "dv", q);
  TORCH_CHECK(dout.sizes() == q.sizes() && dq.sizes() == q.sizes() && dk.sizes() == k.sizes() &&
                  dv.sizes() == v.sizes(),
              "rmt_kernels CUDA backend: dout/dq must have q's shape and dk/dv k's shape");
  p.dout = dout.data_ptr();
  strides(p.dout_stride, dout);
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  strides(p.dq_stride, dq);
  strides(p.dk_stride, dk);
  strides(p.dv_stride, dv);
  TORCH_CHECK(present(dprefix_k) == present(dprefix_v), "rmt_kernels CUDA backend: dprefix_k and dprefix_v go together");
  if (present(dprefix_k) && p.prefix_len > 0) {
    check_4d(*dprefix_k, "dprefix_k", q);
    check_4d(*dprefix_v, "dprefix_v", q);
    TORCH_CHECK(dprefix_k->sizes() == prefix_k->sizes() && dprefix_v->sizes() == prefix_v->sizes(),
                "rmt_kernels CUDA backend: prefix gradients must have the prefix's shape");
    p.dprefix_k = dprefix_k->data_ptr();
    p.dprefix_v = dprefix_v->data_ptr();
    strides(p.dpk_stride, *dprefix_k);
    strides(p.dpv_stride, *dprefix_v);
  }
  const at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const at::Tensor lse_log2 = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  p.lse_log2 = lse_log2.data_ptr<float>();
  const char* err = segment_attention_bwd(p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "rmt_kernels segment_attention_bwd_cuda: ", err);
}

int pack_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return PACK_FLOAT16;
    case at::kBFloat16: return PACK_BFLOAT16;
    case at::kFloat: return PACK_FLOAT32;
    default: TORCH_CHECK(false, "rmt_kernels CUDA backend: the handoff supports float16, bfloat16 and float32, got ",
                         t.scalar_type());
  }
}

// Strides (batch, row, col) of a [B, rows, d] or broadcast [rows, d] memory.
void memory_strides(int64_t (&dst)[3], const at::Tensor& t) {
  if (t.dim() == 2) {
    dst[0] = 0;
    dst[1] = t.stride(0);
    dst[2] = t.stride(1);
  } else {
    strides(dst, t);
  }
}

void check_memory(const at::Tensor& mem, const char* name, const at::Tensor& out, int64_t rows) {
  check_device(mem, name, out);
  TORCH_CHECK(mem.scalar_type() == out.scalar_type(), "rmt_kernels CUDA backend: ", name, " has dtype ",
              mem.scalar_type(), " but the packed buffer has ", out.scalar_type());
  const bool ok = (mem.dim() == 2 && mem.size(0) == rows && mem.size(1) == out.size(2)) ||
                  (mem.dim() == 3 && mem.size(0) == out.size(0) && mem.size(1) == rows && mem.size(2) == out.size(2));
  TORCH_CHECK(ok, "rmt_kernels CUDA backend: ", name, " must be [B, ", rows, ", d] or [", rows, ", d]");
}

void check_ids(const at::Tensor& ids, const at::Tensor& like) {
  check_device(ids, "input_ids", like);
  TORCH_CHECK((ids.scalar_type() == at::kInt || ids.scalar_type() == at::kLong) && ids.dim() == 2,
              "rmt_kernels CUDA backend: input_ids must be int32 or int64 [B, S]");
}

void pack_segment_fwd_cuda(const at::Tensor& out, const at::Tensor& src, const OptTensor& input_ids,
                           const OptTensor& read, const OptTensor& write, int64_t num_read, int64_t num_write,
                           int64_t stream) {
  const c10::DeviceGuard guard(out.device());
  check_device(out, "out", out);
  check_device(src, "src", out);
  TORCH_CHECK(out.dim() == 3, "rmt_kernels CUDA backend: out must be [B, N, d]");
  TORCH_CHECK(src.scalar_type() == out.scalar_type(), "rmt_kernels CUDA backend: segment/weight dtype differs from out");
  PackParams p{};
  (void)pack_dtype(out);  // the copy is type-agnostic, but only these dtypes are supported
  p.elem_bytes = static_cast<int>(out.element_size());
  p.out = out.data_ptr();
  strides(p.out_stride, out);
  p.src = src.data_ptr();
  p.batch = static_cast<int>(out.size(0));
  p.dim = static_cast<int>(out.size(2));
  if (present(input_ids)) {
    check_ids(*input_ids, out);
    TORCH_CHECK(src.dim() == 2 && src.size(1) == out.size(2), "rmt_kernels CUDA backend: weight must be [V, d]");
    TORCH_CHECK(input_ids->size(0) == out.size(0), "rmt_kernels CUDA backend: input_ids batch differs from out");
    p.src_stride[0] = 0;
    p.src_stride[1] = src.stride(0);
    p.src_stride[2] = src.stride(1);
    p.ids = input_ids->data_ptr();
    strides(p.ids_stride, *input_ids);
    p.ids_int64 = input_ids->scalar_type() == at::kLong ? 1 : 0;
    p.segment_len = static_cast<int>(input_ids->size(1));
  } else {
    TORCH_CHECK(src.dim() == 3 && src.size(0) == out.size(0) && src.size(2) == out.size(2),
                "rmt_kernels CUDA backend: segment must be [B, S, d] with out's B and d");
    strides(p.src_stride, src);
    p.segment_len = static_cast<int>(src.size(1));
  }
  TORCH_CHECK(num_read >= 0 && num_write >= 0 && out.size(1) == num_read + p.segment_len + num_write,
              "rmt_kernels CUDA backend: out must have R + S + W rows");
  p.num_read = static_cast<int>(num_read);
  p.num_write = static_cast<int>(num_write);
  if (num_read > 0) {
    TORCH_CHECK(present(read), "rmt_kernels CUDA backend: read memory missing");
    check_memory(*read, "read_memory", out, num_read);
    p.read = read->data_ptr();
    memory_strides(p.read_stride, *read);
  }
  if (num_write > 0) {
    TORCH_CHECK(present(write), "rmt_kernels CUDA backend: write memory missing");
    check_memory(*write, "write_memory", out, num_write);
    p.write = write->data_ptr();
    memory_strides(p.write_stride, *write);
  }
  const char* err = pack_segment_fwd(p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "rmt_kernels pack_segment_fwd_cuda: ", err);
}

void pack_segment_bwd_cuda(const at::Tensor& grad, const at::Tensor& dmem, int64_t start, int64_t start2,
                           bool broadcast, int64_t stream) {
  const c10::DeviceGuard guard(grad.device());
  check_device(grad, "grad", grad);
  check_device(dmem, "dmem", grad);
  TORCH_CHECK(grad.dim() == 3 && dmem.scalar_type() == grad.scalar_type(),
              "rmt_kernels CUDA backend: grad must be [B, N, d] and dmem of its dtype");
  TORCH_CHECK(dmem.dim() == (broadcast ? 2 : 3), "rmt_kernels CUDA backend: dmem must be [rows, d] when broadcast, else [B, rows, d]");
  MemoryGradParams p{};
  p.dtype = pack_dtype(grad);
  p.grad = grad.data_ptr();
  strides(p.grad_stride, grad);
  p.dmem = dmem.data_ptr();
  memory_strides(p.dmem_stride, dmem);
  p.batch = static_cast<int>(grad.size(0));
  p.rows = static_cast<int>(dmem.size(dmem.dim() - 2));
  p.dim = static_cast<int>(grad.size(2));
  TORCH_CHECK(dmem.size(dmem.dim() - 1) == grad.size(2), "rmt_kernels CUDA backend: dmem width differs from grad");
  TORCH_CHECK(start >= 0 && start + p.rows <= grad.size(1) && (start2 < 0 || start2 + p.rows <= grad.size(1)),
              "rmt_kernels CUDA backend: memory rows out of the packed range");
  p.start = static_cast<int>(start);
  p.start2 = static_cast<int>(start2 < 0 ? -1 : start2);
  p.broadcast = broadcast ? 1 : 0;
  const char* err = pack_memory_grad(p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "rmt_kernels pack_segment_bwd_cuda: ", err);
}

void pack_embedding_grad_cuda(const at::Tensor& grad, const at::Tensor& input_ids, const at::Tensor& dweight,
                              int64_t start, const OptTensor& sorted_ids, const OptTensor& order,
                              int64_t stream) {
  const c10::DeviceGuard guard(grad.device());
  check_device(grad, "grad", grad);
  check_device(dweight, "dweight", grad);
  check_ids(input_ids, grad);
  TORCH_CHECK(grad.dim() == 3 && dweight.dim() == 2 && dweight.size(1) == grad.size(2),
              "rmt_kernels CUDA backend: grad must be [B, N, d] and dweight [V, d]");
  TORCH_CHECK(start >= 0 && start + input_ids.size(1) <= grad.size(1), "rmt_kernels CUDA backend: segment rows out of range");
  EmbeddingGradParams p{};
  p.dtype = pack_dtype(grad);
  p.grad = grad.data_ptr();
  strides(p.grad_stride, grad);
  p.ids = input_ids.data_ptr();
  strides(p.ids_stride, input_ids);
  p.ids_int64 = input_ids.scalar_type() == at::kLong ? 1 : 0;
  p.dweight = dweight.data_ptr();
  strides(p.dw_stride, dweight);
  p.batch = static_cast<int>(input_ids.size(0));
  p.segment_len = static_cast<int>(input_ids.size(1));
  p.dim = static_cast<int>(grad.size(2));
  p.start = static_cast<int>(start);
  TORCH_CHECK(present(sorted_ids) == present(order), "rmt_kernels CUDA backend: sorted_ids and order go together");
  if (present(sorted_ids)) {
    for (const at::Tensor* t : {&*sorted_ids, &*order}) {
      check_device(*t, "sorted_ids/order", grad);
      TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->numel() == input_ids.numel(),
                  "rmt_kernels CUDA backend: sorted_ids and order must be contiguous int64 [B * S]");
    }
    TORCH_CHECK(dweight.scalar_type() == grad.scalar_type(), "rmt_kernels CUDA backend: dweight must have grad's dtype");
    p.sorted_ids = sorted_ids->data_ptr<int64_t>();
    p.order = order->data_ptr<int64_t>();
  } else {
    TORCH_CHECK(dweight.scalar_type() == at::kFloat, "rmt_kernels CUDA backend: the atomic mode accumulates into a float32 dweight");
  }
  const char* err = pack_embedding_grad(p, as_stream(stream));
  TORCH_CHECK(err == nullptr, "rmt_kernels pack_embedding_grad_cuda: ", err);
}

}  // namespace
}  // namespace rmt

TORCH_LIBRARY(rmt_kernels, m) {
  m.def(
      "segment_attention_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? segment_lengths, Tensor(a!) out, Tensor(b!) lse, int num_read, int num_write, int mask, "
      "bool prefix_all, float scale, int stream) -> ()");
  m.def(
      "segment_attention_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor? prefix_k, Tensor? prefix_v, "
      "Tensor? segment_lengths, Tensor out, Tensor lse, Tensor(a!) dq, Tensor(b!) dk, Tensor(c!) dv, "
      "Tensor(d!)? dprefix_k, Tensor(e!)? dprefix_v, int num_read, int num_write, int mask, bool prefix_all, "
      "float scale, int stream) -> ()");
  m.def(
      "pack_segment_fwd_cuda(Tensor(a!) out, Tensor src, Tensor? input_ids, Tensor? read, Tensor? write, "
      "int num_read, int num_write, int stream) -> ()");
  m.def("pack_segment_bwd_cuda(Tensor grad, Tensor(a!) dmem, int start, int start2, bool broadcast, int stream) -> ()");
  m.def(
      "pack_embedding_grad_cuda(Tensor grad, Tensor input_ids, Tensor(a!) dweight, int start, Tensor? sorted_ids, "
      "Tensor? order, int stream) -> ()");
}

TORCH_LIBRARY_IMPL(rmt_kernels, CUDA, m) {
  m.impl("segment_attention_fwd_cuda", &rmt::segment_attention_fwd_cuda);
  m.impl("segment_attention_bwd_cuda", &rmt::segment_attention_bwd_cuda);
  m.impl("pack_segment_fwd_cuda", &rmt::pack_segment_fwd_cuda);
  m.impl("pack_segment_bwd_cuda", &rmt::pack_segment_bwd_cuda);
  m.impl("pack_embedding_grad_cuda", &rmt::pack_embedding_grad_cuda);
}

// A Python module object, so that `import rmt_kernels._C` (ahead-of-time build) and
// torch.utils.cpp_extension.load (just-in-time build) can load the library; the ops register
// themselves when it is loaded.
#define RMT_CAT2(a, b) a##b
#define RMT_CAT(a, b) RMT_CAT2(a, b)
#define RMT_STR2(x) #x
#define RMT_STR(x) RMT_STR2(x)

PyMODINIT_FUNC RMT_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, RMT_STR(TORCH_EXTENSION_NAME),
                               "CUDA kernels of rmt_kernels; the ops live in torch.ops.rmt_kernels", -1, nullptr};
  return PyModule_Create(&module);
}
