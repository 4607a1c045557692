"""Public ``segment_attention``: validation, backend choice, and the custom ops autograd goes through.

``rmt_kernels::segment_attention_fwd`` / ``_bwd`` are ``torch.library`` custom ops with fake
implementations, so ``torch.compile(fullgraph=True)`` traces through a call without a graph break;
the backend is an argument of the op, so every backend shares one autograd formula.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ... import _extension, backends
from ..._checks import _is_compiling, as_lengths, check_attention_inputs, check_dropout, refuse_dropout
from ...layout import MemoryLayout
from .._alloc import alloc_outputs, as_bnh, as_bnhd, empty_bnhd
from . import cuda, torch_impl, triton_launch

OP = "segment_attention"

# The backends of this op: each entry names its launchers. Importing triton_launch and cuda imports
# neither triton nor the extension; they load on the first launch.
BACKEND_TABLE = backends.register_op(OP, {
    "torch": backends.BackendImpl(
        fwd=torch_impl.segment_attention_fwd_torch,
        bwd=torch_impl.segment_attention_bwd_torch,
        eager=torch_impl.segment_attention_eager_torch,
        dropout=True,
        dropout_mask=torch_impl.segment_attention_dropout_mask_torch,
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        devices=("cpu", "cuda", "mps", "xpu"),
    ),
    "triton": backends.BackendImpl(
        fwd=triton_launch.segment_attention_fwd_triton,
        bwd=triton_launch.segment_attention_bwd_triton,
        dtypes=triton_launch.DTYPES,
        head_dims=triton_launch.HEAD_DIMS,
        devices=("cpu", "cuda"),
        status=backends.triton_status,
        dropout=True,
        dropout_mask=triton_launch.segment_attention_dropout_mask_triton,
    ),
    "cuda": backends.BackendImpl(
        fwd=cuda.segment_attention_fwd_cuda,
        bwd=cuda.segment_attention_bwd_cuda,
        dtypes=cuda.DTYPES,
        head_dims=cuda.HEAD_DIMS,
        devices=("cuda",),
        status=_extension.cuda_status,
    ),
})


def _layout(num_read, num_write, mask, prefix_visible_to) -> MemoryLayout:
    return MemoryLayout(num_read, num_write, mask, prefix_visible_to)


@torch.library.custom_op("rmt_kernels::segment_attention_fwd", mutates_args=())
def segment_attention_fwd_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    segment_lengths: Optional[Tensor],
    num_read: int,
    num_write: int,
    mask: str,
    prefix_visible_to: str,
    scale: float,
    backend: str,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    layout = _layout(num_read, num_write, mask, prefix_visible_to)
    out, lse = BACKEND_TABLE[backend].fwd(
        q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed
    )
    return as_bnhd(out), as_bnh(lse)  # the layouts the fake declares


@segment_attention_fwd_op.register_fake
def _(q, k, v, prefix_k, prefix_v, segment_lengths, num_read, num_write, mask, prefix_visible_to, scale, backend,
      dropout_p=0.0, seed=None):
    return alloc_outputs(q)


@torch.library.custom_op("rmt_kernels::segment_attention_bwd", mutates_args=())
def segment_attention_bwd_op(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    prefix_k: Optional[Tensor],
    prefix_v: Optional[Tensor],
    segment_lengths: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    num_read: int,
    num_write: int,
    mask: str,
    prefix_visible_to: str,
    scale: float,
    backend: str,
    need_prefix_grad: bool,
    dropout_p: float = 0.0,
    seed: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    layout = _layout(num_read, num_write, mask, prefix_visible_to)
    dq, dk, dv, dpk, dpv = BACKEND_TABLE[backend].bwd(
        dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, layout, scale,
        need_prefix_grad, dropout_p, seed,
    )
    empty = q.new_empty(0)
    # Custom ops may not return None, nor alias their inputs; gradients come in the outputs' layout.
    return (
        as_bnhd(dq),
        as_bnhd(dk),
        as_bnhd(dv),
        empty if dpk is None else as_bnhd(dpk),
        empty.clone() if dpv is None else as_bnhd(dpv),
    )


@segment_attention_bwd_op.register_fake
def _(dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, num_read, num_write, mask,
      prefix_visible_to, scale, backend, need_prefix_grad, dropout_p=0.0, seed=None):
    with_prefix = prefix_k is not None and need_prefix_grad
    return (
        empty_bnhd(q.shape, q.dtype, q.device),
        empty_bnhd(k.shape, k.dtype, k.device),
        empty_bnhd(v.shape, v.dtype, v.device),
        empty_bnhd(prefix_k.shape, q.dtype, q.device) if with_prefix else q.new_empty(0),
        empty_bnhd(prefix_v.shape, q.dtype, q.device) if with_prefix else q.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, prefix_k, prefix_v, segment_lengths, *params = inputs
    params += [0.0, None][len(params) - 6:]  # dropout_p and seed when the call left them out
    out, lse = output
    ctx.save_for_backward(q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, params[7])
    ctx.params = params[:7]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, seed = ctx.saved_tensors
    need_prefix = prefix_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    *params, dropout_p = ctx.params
    dq, dk, dv, dpk, dpv = segment_attention_bwd_op(
        dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, *params, need_prefix, dropout_p, seed
    )
    if not need_prefix:
        dpk = dpv = None
    return (dq, dk, dv, dpk, dpv) + (None,) * (len(ctx.needs_input_grad) - 5)


torch.library.register_autograd(
    "rmt_kernels::segment_attention_fwd", _backward, setup_context=_setup_context
)


def segment_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: MemoryLayout,
    *,
    segment_lengths: Optional[Tensor] = None,
    prefix_k: Optional[Tensor] = None,
    prefix_v: Optional[Tensor] = None,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    return_dropout_mask: bool = False,
    backend: str = "auto",
):
    """Causal-plus-memory attention over a packed ``[read memory | segment | write memory]`` segment.

    Which query row sees which key is fixed by ``layout`` (see :class:`MemoryLayout` for the drawn
    masks); nothing else about the mask is passed or materialised.

    Args:
        q: ``[B, H_q, N, D]`` float16, bfloat16 or float32 (float64 on the torch backend), any
            strides (a ``[B, N, H, D]`` tensor viewed with ``.transpose(1, 2)`` works without a copy).
        k, v: ``[B, H_kv, N, D]``, same dtype and device; ``H_q`` a multiple of ``H_kv`` (GQA).
        layout: :class:`MemoryLayout`: R, W, mask family, prefix visibility. ``N >= R + W``.
        segment_lengths: integer ``[B]`` tensor (on the CPU or q's device) or a list of ints, with
            values in ``[0, S]`` (``S = N - R - W``): the valid
            segment tokens of each batch row (right padding). Default: all S valid.
        prefix_k, prefix_v: ``[B, H_kv, P, D]`` keys/values seen before the packed ones (an XL cache,
            a learned null key), read from their own tensors; both or neither. May require grad.
        scale: softmax scale, a finite real number, default ``1 / sqrt(D)``.
        dropout_p: attention dropout in ``[0, 1)`` (default 0): ``(softmax(S) * keep / (1 - p)) V``,
            the keep mask drawn inside the call from a seed taken from the device's generator (so
            ``torch.manual_seed`` reproduces a run; successive calls differ) and regenerated in the
            backward. Pass the module's dropout only in training. Triton draws it in the kernels
            (Philox, never stored); the torch backend runs a dense math path for it (the stock CPU
            kernels take no mask); the cuda backend has none (``"auto"`` passes over it).
        return_dropout_mask: debug: also return the bool keep mask ``[B, H_q, N, P + N]`` (keys
            ``[prefix | packed]``) the call used, which ``segment_attention_ref(dropout_mask=...)``
            takes; all True without dropout.
        backend: ``"auto"`` (default: ``RMT_KERNELS_BACKEND`` if set, else the fastest backend that
            runs on q's device and supports its dtype, head dim and dropout; passing over a faster
            one warns once), ``"torch"``, ``"triton"`` or ``"cuda"``.

    Returns:
        ``[B, H_q, N, D]`` in q's dtype (with ``return_dropout_mask``: ``(out, keep_mask)``).
        Softmax and accumulation run in float32. A row that sees no key outputs 0 and passes zero
        gradient.

    Raises:
        TypeError: a non-tensor argument, mismatched or unsupported dtypes, a non-integer
            ``segment_lengths``.
        ValueError: wrong shapes, devices, head dims or lengths (the message names the argument).
        BackendUnavailableError: the requested backend cannot run here (the message says how to get it).

    Example::

        >>> layout = MemoryLayout(num_read=16, num_write=16, mask="memory_bidirectional")
        >>> q = k = v = torch.randn(2, 4, 16 + 64 + 16, 64)
        >>> segment_attention(q, k, v, layout).shape
        torch.Size([2, 4, 96, 64])
    """
    if not isinstance(q, Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    segment_lengths = as_lengths(segment_lengths)
    dropout_p = check_dropout(dropout_p)
    name = backends.resolve_backend(OP, backend, q.device, q.dtype, q.shape[-1] if q.dim() == 4 else None,
                                    dropout_p > 0)
    impl = BACKEND_TABLE[name]
    shape = check_attention_inputs(
        q, k, v, layout, segment_lengths, prefix_k, prefix_v, scale,
        dtypes=impl.dtypes, head_dims=impl.head_dims, backend=name,
    )
    if not impl.dropout:
        refuse_dropout(OP, name, dropout_p)
    if shape.prefix_len == 0:
        prefix_k = prefix_v = None
    # The seed of the dropout mask, drawn on the device (no host sync; recorded by CUDA graphs).
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=q.device) if dropout_p > 0 else None
    out = _attention(q, k, v, prefix_k, prefix_v, segment_lengths, layout, shape.scale, name, impl, dropout_p, seed)
    if not return_dropout_mask:
        return out
    if dropout_p == 0:
        keys = shape.prefix_len + shape.seq_len
        return out, torch.ones((shape.batch, shape.heads_q, shape.seq_len, keys), dtype=torch.bool, device=q.device)
    return out, impl.dropout_mask(q, k, prefix_k, layout, dropout_p, seed)


def _attention(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, name, impl, dropout_p, seed):
    if _is_compiling():
        out, _ = segment_attention_fwd_op(
            q, k, v, prefix_k, prefix_v, segment_lengths,
            layout.num_read, layout.num_write, layout.mask, layout.prefix_visible_to, scale, name, dropout_p, seed,
        )
        return out
    # Eager: the same kernels without the custom-op machinery (dispatch through torch.library
    # costs several times a small attention call).
    if impl.eager is not None:
        out = impl.eager(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed)
        if out is not None:
            return out
    if torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or (prefix_k is not None and (prefix_k.requires_grad or prefix_v.requires_grad))
    ):
        return _SegmentAttention.apply(
            q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, impl, dropout_p, seed
        )
    return impl.fwd(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed)[0]


class _SegmentAttention(torch.autograd.Function):
    """Eager autograd of :func:`segment_attention`: the formula of ``_backward`` on the launchers of
    one backend entry, called directly. Results keep the layouts the launchers give (the custom ops
    re-lay them out as their fakes declare, which ``torch.compile`` checks)."""

    @staticmethod
    def forward(ctx, q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, impl, dropout_p, seed):
        out, lse = impl.fwd(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, seed)
        ctx.layout, ctx.scale, ctx.impl, ctx.dropout_p = layout, scale, impl, dropout_p
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, seed = ctx.saved_tensors
        need_prefix = prefix_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dpk, dpv = ctx.impl.bwd(
            dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, ctx.layout, ctx.scale,
            need_prefix, ctx.dropout_p, seed,
        )
        if not need_prefix:
            dpk = dpv = None
        return dq, dk, dv, dpk, dpv, None, None, None, None, None, None
