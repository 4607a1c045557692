"""The ``torch`` backend of segment attention: stock attention calls, composed per mask block or
chunked (:mod:`.torch_plan` says how, and measures which plan runs), and a dense math path for
dropout.

The launchers here validate nothing (the public entry did) and record no autograd, except
:func:`segment_attention_eager_torch`, which returns a differentiable result where one stock call
(through SDPA's own entry, whose C++ autograd node runs the stock backward) or the dense dropout path
is the whole op.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from ...layout import MemoryLayout
from .._alloc import accum_dtype
from .torch_plan import (
    MASKED_CALL_MAX_N,
    _sdpa,
    bwd_choice,
    fwd_choice,
    known_bwd_choice,
    lengths_key,
    mask_of,
    plan_of,
    planned_bwd,
    planned_fwd,
    unit_last_stride,
)

# --------------------------------------------------------------------------- launchers


def segment_attention_fwd_torch(
    q, k, v, prefix_k, prefix_v, segment_lengths, layout: MemoryLayout, scale: float,
    dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
):
    """Forward of the torch backend: ``(out [B, H_q, N, D], lse [B, H_q, N])``. Inputs are validated.
    With ``dropout_p > 0`` the dense dropout path runs (:func:`_dropout_fwd`).

    When one stock call is the whole op, its results are returned as they come (the output in q's
    layout, as SDPA's); composed results are stored as ``alloc_outputs`` lays them out.
    """
    if dropout_p > 0:
        return _dropout_fwd(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed)
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    if prefix_k is not None:
        prefix_k, prefix_v = unit_last_stride(prefix_k), unit_last_stride(prefix_v)
    plan = plan_of(q, prefix_k, segment_lengths, layout)
    choice = fwd_choice(plan, q, k, v, layout, scale)
    return planned_fwd(choice, plan, q, k, v, prefix_k, prefix_v, layout, scale)


def segment_attention_eager_torch(
    q, k, v, prefix_k, prefix_v, segment_lengths, layout: MemoryLayout, scale: float,
    dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
):
    """Eager calls where one stock call is the whole op (a single causal or rectangular block, or
    the masked call), when that call is the plan of the forward and, under autograd, of the backward
    (:mod:`.torch_plan` may cut one causal block into chunks instead): SDPA's
    own entry runs that CPU kernel, and its C++ autograd node runs the kernel's backward, the
    launchers' formula without a Python autograd node. With dropout: the dense path in differentiable
    ops, whose graph keeps the probabilities for the backward (as SDPA's own dropout path does)
    instead of recomputing them. None elsewhere (the caller then takes the launchers)."""
    if dropout_p > 0:
        return _dropout_eager(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed)
    if not q.is_cpu or scale <= 0 or q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return None
    plan = plan_of(q, prefix_k, segment_lengths, layout)
    gqa = q.shape[1] != k.shape[1]
    if not plan.masked or q.shape[2] <= MASKED_CALL_MAX_N:  # the static rule decides both passes
        if plan.whole is not None:
            return _sdpa(q, k, v, None, 0.0, plan.whole.causal, scale=scale, enable_gqa=gqa)
        if plan.masked:
            return _sdpa(q, k, v, mask_of(plan, layout, q), 0.0, False, scale=scale, enable_gqa=gqa)
        return None
    one_call = 0 if plan.whole is not None else q.shape[2]  # the plan code of that one stock call
    if fwd_choice(plan, q, k, v, layout, scale) != one_call:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if grad and known_bwd_choice(plan, q, k, layout, scale) != one_call:
        return None  # the backward's plan is another one, or is measured at the first backward
    if plan.whole is not None:
        return _sdpa(q, k, v, None, 0.0, plan.whole.causal, scale=scale, enable_gqa=gqa)
    return _sdpa(q, k, v, mask_of(plan, layout, q), 0.0, False, scale=scale, enable_gqa=gqa)


def segment_attention_bwd_torch(
    dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, layout: MemoryLayout, scale: float,
    need_prefix_grad: bool, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None,
):
    """Backward of the torch backend: ``(dq, dk, dv, dprefix_k, dprefix_v)``, prefix grads None when
    there is no prefix or ``need_prefix_grad`` is False."""
    if dropout_p > 0:
        return _dropout_bwd(dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, layout, scale,
                            need_prefix_grad, dropout_p, seed)
    dout, q, k, v, prefix_k, prefix_v = map(unit_last_stride, (dout, q, k, v, prefix_k, prefix_v))
    plan = plan_of(q, prefix_k, segment_lengths, layout)
    choice = bwd_choice(plan, dout, q, k, v, out, lse, layout, scale)
    return planned_bwd(choice, plan, dout, q, k, v, prefix_k, prefix_v, out, lse, layout, scale, need_prefix_grad)


# --------------------------------------------------------------------------- dropout

# The stock CPU kernels take no dropout mask: with dropout_p > 0 the torch backend runs one dense math
# pass over the keys [prefix | packed] (O(N * (P + N)) memory, like SDPA's own dropout path on CPU),
# with the keep mask drawn from a generator seeded by the call's seed and regenerated in the backward.


def segment_attention_dropout_mask_torch(q, k, prefix_k, layout: MemoryLayout, dropout_p: float, seed):
    """The keep mask bool ``[B, H_q, N, P + N]`` (keys ``[prefix | packed]``) that the torch backend
    applies for ``seed`` (int64 ``[1]``): uniform draws of a generator seeded with it, kept where
    ``>= dropout_p``. Reading the seed is a host read (a sync for CUDA tensors)."""
    b, hq, n, _ = q.shape
    p = 0 if prefix_k is None else prefix_k.shape[2]
    gen = torch.Generator(device=q.device).manual_seed(int(seed.reshape(-1)[0]))
    return torch.rand((b, hq, n, p + n), generator=gen, device=q.device) >= dropout_p


def _dense_scores(q, k, prefix_k, segment_lengths, layout: MemoryLayout, scale: float):
    """Masked scores ``[B, H_kv, G, N, P + N]`` in the accumulation dtype, and the keys used."""
    b, hq, n, d = q.shape
    keys = k if prefix_k is None else torch.cat([prefix_k, k], dim=2)
    hkv, kn = keys.shape[1], keys.shape[2]
    cdt = accum_dtype(q.dtype)
    visible = layout.dense_mask(n - layout.num_read - layout.num_write, kn - n, segment_lengths)
    qf = q.to(cdt).reshape(b, hkv, hq // hkv, n, d)
    scores = torch.matmul(qf, keys.to(cdt).transpose(-1, -2)[:, :, None]) * scale  # [B, Hkv, G, N, K]
    return scores.masked_fill(~visible.to(q.device)[:, None, None], float("-inf")), qf, keys


def _probs(scores, lse):
    """``exp(scores - lse)``; rows without a key (``lse = -inf``) give 0 rather than NaN."""
    return torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])


def _dropout_fwd(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed):
    b, hq, n, d = q.shape
    scores, _, keys = _dense_scores(q, k, prefix_k, segment_lengths, layout, scale)
    values = v if prefix_v is None else torch.cat([prefix_v, v], dim=2)
    lse = torch.logsumexp(scores, dim=-1)  # before dropout: what the backward's P needs
    keep = segment_attention_dropout_mask_torch(q, k, prefix_k, layout, dropout_p, seed)
    dropped = _probs(scores, lse) * keep.reshape(scores.shape) / (1.0 - dropout_p)
    out = torch.matmul(dropped, values.to(scores.dtype)[:, :, None]).reshape(b, hq, n, d)
    return out.to(q.dtype), lse.reshape(b, hq, n)


def _dropout_bwd(dout, q, k, v, prefix_k, prefix_v, segment_lengths, out, lse, layout, scale,
                 need_prefix_grad, dropout_p, seed):
    b, hq, n, d = q.shape
    scores, qf, keys = _dense_scores(q, k, prefix_k, segment_lengths, layout, scale)
    values = v if prefix_v is None else torch.cat([prefix_v, v], dim=2)
    hkv, g, cdt = keys.shape[1], hq // keys.shape[1], scores.dtype
    probs = _probs(scores, lse.to(cdt).reshape(b, hkv, g, n))
    keep = segment_attention_dropout_mask_torch(q, k, prefix_k, layout, dropout_p, seed).reshape(scores.shape)
    kept = keep / (1.0 - dropout_p)
    dof = dout.to(cdt).reshape(b, hkv, g, n, d)
    dv = torch.matmul((probs * kept).transpose(-1, -2), dof).sum(2)
    dp = torch.matmul(dof, values.to(cdt).transpose(-1, -2)[:, :, None]) * kept
    delta = (dof * out.to(cdt).reshape(b, hkv, g, n, d)).sum(-1, keepdim=True)
    ds = probs * (dp - delta)
    dq = (torch.matmul(ds, keys.to(cdt)[:, :, None]) * scale).reshape(b, hq, n, d)
    dk = (torch.matmul(ds.transpose(-1, -2), qf) * scale).sum(2)
    p = keys.shape[2] - n
    dtype = q.dtype
    want_prefix = p > 0 and need_prefix_grad
    return (
        dq.to(dtype),
        dk[:, :, p:].to(dtype),
        dv[:, :, p:].to(dtype),
        dk[:, :, :p].to(dtype) if want_prefix else None,
        dv[:, :, :p].to(dtype) if want_prefix else None,
    )


def _dropout_eager(q, k, v, prefix_k, prefix_v, segment_lengths, layout, scale, dropout_p, seed):
    b, hq, n, d = q.shape
    scores, _, _ = _dense_scores(q, k, prefix_k, segment_lengths, layout, scale)
    values = v if prefix_v is None else torch.cat([prefix_v, v], dim=2)
    s, p = n - layout.num_read - layout.num_write, _prefix_len(prefix_k)
    if _rows_without_keys(layout, s, p, lengths_key(segment_lengths, s)):
        # Shift by the detached row maximum (0 for rows without a key): the softmax stays exact, and
        # rows without a key give 0 and zero gradients instead of NaN.
        row_max = scores.amax(dim=-1, keepdim=True).detach()
        expd = torch.exp(scores - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)))
        denom = expd.sum(dim=-1, keepdim=True)
        probs = expd / torch.where(denom > 0, denom, torch.ones_like(denom))
    else:
        probs = torch.softmax(scores, dim=-1)
    keep = segment_attention_dropout_mask_torch(q, k, prefix_k, layout, dropout_p, seed).reshape(scores.shape)
    kept = keep.to(scores.dtype).mul_(1.0 / (1.0 - dropout_p))
    out = torch.matmul(probs * kept, values.to(scores.dtype)[:, :, None])
    return out.reshape(b, hq, n, d).to(q.dtype)


def _prefix_len(prefix_k) -> int:
    return 0 if prefix_k is None else prefix_k.shape[2]


@functools.lru_cache(maxsize=1024)
def _rows_without_keys(layout: MemoryLayout, segment_len: int, prefix_len: int, lengths: Optional[tuple]) -> bool:
    return not bool((layout.visible_counts(segment_len, prefix_len, lengths) > 0).all())
