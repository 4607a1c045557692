"""The pure-PyTorch references of every op: SPEC.md in code.

- :func:`segment_attention_ref`: attention with the dense mask of
  :class:`~rmt_kernels.layout.MemoryLayout`, in float32 (float64 for float64 inputs); slow and O(N^2)
  in memory by design;
- :func:`pack_segment_ref`, :func:`pack_segment_from_ids_ref`: the handoff as ``torch.cat`` (and
  ``F.embedding``);
- :func:`segment_split_ref`, :func:`recurrent_ref`: the official RMT wrapper's segmentation and its
  unrolled loop (SPEC §3), what :class:`~rmt_kernels.recurrent.SegmentDriver` must equal;
- :func:`dpfp_ref`, :func:`assoc_read_ref`, :func:`assoc_write_ref`: ARMT's associative memory (SPEC
  §6) as the official code's einsums, differentiated by autograd: the einsum formulation the
  benchmarks compare against.

Tests and benchmarks import these; nobody copies them.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._checks import as_lengths, check_attention_inputs, check_dropout
from .layout import MemoryLayout

REFERENCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def segment_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: MemoryLayout,
    *,
    segment_lengths: Optional[torch.Tensor] = None,
    prefix_k: Optional[torch.Tensor] = None,
    prefix_v: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
    return_lse: bool = False,
    dropout_p: float = 0.0,
    dropout_mask: Optional[torch.Tensor] = None,
):
    """Reference causal-plus-memory attention with a dense mask.

    Args:
        q: ``[B, H_q, N, D]`` float16/bfloat16/float32/float64, any strides.
        k, v: ``[B, H_kv, N, D]``, same dtype and device; ``H_q % H_kv == 0``.
        layout: the :class:`MemoryLayout` (R, W, mask family, prefix visibility).
        segment_lengths: int ``[B]`` in ``[0, S]``: valid segment tokens per batch row (right padding).
        prefix_k, prefix_v: ``[B, H_kv, P, D]`` keys/values before the packed ones (both or neither).
        scale: softmax scale, default ``1/sqrt(D)``.
        upcast: compute in float32 (float64 for float64 inputs). ``False`` computes in the input
            dtype: the "same-dtype eager" baseline of the tolerance rule.
        return_lse: also return the natural log-sum-exp of each row, float32/float64 ``[B, H_q, N]``
            (of the scores before dropout).
        dropout_p: attention dropout in ``[0, 1)``; with ``p > 0`` the keep mask ``dropout_mask``
            (bool, broadcastable to ``[B, H_q, N, P + N]``, keys ordered ``[prefix | packed]``; what
            ``segment_attention(..., return_dropout_mask=True)`` returns) is required: the output is
            ``(softmax(S) * dropout_mask / (1 - p)) V``.

    Returns:
        ``[B, H_q, N, D]`` in q's dtype (and the log-sum-exp when asked). Rows that see no key give
        0, a log-sum-exp of -inf, and zero gradients.

    Example::

        >>> q = k = v = torch.randn(1, 2, 8, 16)
        >>> segment_attention_ref(q, k, v, MemoryLayout(2, 2)).shape
        torch.Size([1, 2, 8, 16])
    """
    segment_lengths = as_lengths(segment_lengths)
    shape = check_attention_inputs(
        q, k, v, layout, segment_lengths, prefix_k, prefix_v, scale, dtypes=REFERENCE_DTYPES
    )
    dropout_p = check_dropout(dropout_p)
    if dropout_p > 0 and dropout_mask is None:
        raise ValueError("the reference draws no randomness: with dropout_p > 0 pass the keep mask a call used "
                         "(dropout_mask=..., from segment_attention(..., return_dropout_mask=True))")
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    else:
        cdt = q.dtype
    if prefix_k is not None:
        k = torch.cat([prefix_k, k], dim=2)
        v = torch.cat([prefix_v, v], dim=2)
    group = shape.heads_q // shape.heads_kv
    k = k.to(cdt).repeat_interleave(group, dim=1)
    v = v.to(cdt).repeat_interleave(group, dim=1)

    mask = layout.dense_mask(shape.segment_len, shape.prefix_len, segment_lengths)
    mask = mask.to(q.device)[:, None]  # [B or 1, 1, N, P+N]
    scores = torch.matmul(q.to(cdt), k.transpose(-1, -2)) * shape.scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax is shift invariant: a detached row max keeps gradients exact and rows with no key at 0.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    expd = torch.exp(scores - row_max)
    denom = expd.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    safe = torch.where(has_key, denom, torch.ones_like(denom))
    probs = expd / safe
    if dropout_p > 0:
        probs = probs * dropout_mask.to(probs.device) / (1.0 - dropout_p)
    out = torch.matmul(probs, v).to(q.dtype)
    if not return_lse:
        return out
    lse = torch.where(has_key, row_max + torch.log(safe), torch.full_like(denom, float("-inf")))
    return out, lse.squeeze(-1).to(torch.float64 if cdt == torch.float64 else torch.float32)


# --------------------------------------------------------------------------- memory handoff


def pack_segment_ref(
    segment: torch.Tensor,
    layout: MemoryLayout,
    read_memory: Optional[torch.Tensor] = None,
    write_memory: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``torch.cat([read_memory, segment, write_memory], dim=1)`` with ``[M, d]`` memories broadcast
    over the batch: what :func:`~rmt_kernels.pack_segment` computes (memories present iff the layout
    has the block). Differentiable through autograd's own ``cat``/``expand``.

    Example::

        >>> mem = torch.randn(2, 8)
        >>> pack_segment_ref(torch.randn(3, 5, 8), MemoryLayout(2, 2), mem, mem).shape
        torch.Size([3, 9, 8])
    """
    batch = segment.shape[0]
    parts = []
    if layout.num_read:
        parts.append(read_memory.expand(batch, *read_memory.shape[-2:]))
    parts.append(segment)
    if layout.num_write:
        parts.append(write_memory.expand(batch, *write_memory.shape[-2:]))
    return torch.cat(parts, dim=1)


def pack_segment_from_ids_ref(
    input_ids: torch.Tensor,
    embedding_weight: torch.Tensor,
    layout: MemoryLayout,
    read_memory: Optional[torch.Tensor] = None,
    write_memory: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`pack_segment_ref` of ``F.embedding(input_ids, embedding_weight)``."""
    return pack_segment_ref(F.embedding(input_ids, embedding_weight), layout, read_memory, write_memory)


# --------------------------------------------------------------------------- the recurrent loop


def segment_split_ref(x: torch.Tensor, segment_size: int, alignment: Optional[str] = None) -> List[torch.Tensor]:
    """The official wrapper's ``split_tensor`` along dim 1: ``None``/``"left"`` segments of
    ``segment_size`` from the start (the last one shorter), ``"right"`` from the end (the first one
    shorter), ``"center"`` ``torch.chunk`` into ``ceil(T / segment_size)`` chunks."""
    if alignment in ("left", None):
        edges = list(range(0, x.shape[1], segment_size)) + [x.shape[1]]
    elif alignment == "right":
        edges = (list(range(x.shape[1], 0, -segment_size)) + [0])[::-1]
    else:
        return list(torch.chunk(x, math.ceil(x.shape[1] / segment_size), dim=1))
    return [x[:, a:b] for a, b in zip(edges, edges[1:])]


def recurrent_ref(
    backbone: Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Sequence[torch.Tensor]]],
    memory: Optional[torch.Tensor],
    inputs_embeds: torch.Tensor,
    layout: MemoryLayout,
    segment_size: int,
    *,
    k2: Optional[int] = -1,
    max_n_segments: Optional[int] = None,
    segment_alignment: Optional[str] = None,
    attention_mask: Optional[torch.Tensor] = None,
    write_memory: Optional[torch.Tensor] = None,
):
    """The official RMT loop, unrolled with ``torch.cat`` and dense masks (SPEC §3).

    For each segment of ``segment_split_ref(inputs_embeds)``: pack ``[memory | x | memory]`` (or
    ``[x | write_memory]`` without an R block, or a fixed ``write_memory`` W input), call
    ``backbone(packed [B, N, d], mask [B, N, N] bool)`` (the layout's dense mask with the segment's
    key padding from the right-padded 0/1 ``attention_mask [B, T]``), which returns ``(hidden
    [B, N, d], outputs [B, N, V], layer_states)``; keep the segment rows of ``outputs`` and of every
    layer state; the next memory is ``hidden``'s W rows, detached when ``i >= 1 and k2 not in (-1,
    None) and i + k2 <= max_n_segments``.

    Args:
        memory: ``[M, d]`` (repeated over the batch) or ``[B, M, d]``; None only without an R block
            and with ``write_memory``.

    Returns:
        ``(outputs [B, T, V], memory [B, M, d], layer_states)``: the segment rows concatenated, the
        last memory, and one ``[B, T, d]`` tensor per layer state.
    """
    batch = inputs_embeds.shape[0]
    r, w = layout.num_read, layout.num_write
    segments = segment_split_ref(inputs_embeds, segment_size, segment_alignment)
    masks = segment_split_ref(attention_mask, segment_size, segment_alignment) if attention_mask is not None else None
    mem = memory.expand(batch, w, -1) if memory is not None and memory.dim() == 2 else memory
    outs, states = [], []
    for i, x in enumerate(segments):
        s = x.shape[1]
        w_in = mem if write_memory is None else write_memory.expand(batch, w, -1)
        packed = pack_segment_ref(x, layout, mem, w_in)
        lengths = masks[i].sum(1) if masks is not None else None
        dense = layout.dense_mask(s, 0, lengths).expand(batch, -1, -1).to(packed.device)
        hidden, out, layer_states = backbone(packed, dense)
        outs.append(out[:, r : r + s])
        states.append([h[:, r : r + s] for h in layer_states])
        mem = hidden[:, r + s :]
        if i >= 1 and k2 not in (-1, None) and i + k2 <= max_n_segments:
            mem = mem.detach()
    return torch.cat(outs, dim=1), mem, tuple(torch.cat(layer, 1) for layer in zip(*states))


# --------------------------------------------------------------------------- ARMT associative memory

ASSOC_EPS = 1e-5  # the official code's epsilon in every denominator


def dpfp_ref(u: torch.Tensor, normalize: bool) -> torch.Tensor:
    """DPFP with nu = 3 along the last dim ``p`` -> ``6p`` (SPEC §6), L2-normalised when ``normalize``
    (``F.normalize``: a zero row stays zero)."""
    r = torch.cat([F.relu(u), F.relu(-u)], dim=-1)
    f = torch.cat([r * r.roll(j, dims=-1) for j in (1, 2, 3)], dim=-1)
    return F.normalize(f, dim=-1, p=2.0) if normalize else f


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, n_heads, d // n_heads).transpose(1, 2)


def _merge(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def assoc_read_ref(
    x: torch.Tensor, q: torch.Tensor, A: torch.Tensor, z: torch.Tensor, *, n_heads: int,
    normalize: bool = True, use_denom: bool = True,
) -> torch.Tensor:
    """``x + (phi(q)^T A) / (phi(q)^T z + 1e-5)`` per head (without the denominator when not
    ``use_denom``), computed in the state's dtype and returned in ``x``'s.

    ``x [B, N, d]``; ``q [B, N, d_mem]`` the projection ``W_q x``; ``A [B, H, 6 d_mem / H, d / H]``;
    ``z [B, H, 6 d_mem / H]``."""
    f = dpfp_ref(_heads(q, n_heads).to(A.dtype), normalize)
    num = torch.einsum("bhnk,bhkt->bhnt", f, A)
    if use_denom:
        num = num / (torch.einsum("bhk,bhnk->bhn", z, f)[..., None] + ASSOC_EPS)
    return x + _merge(num).to(x.dtype)


def assoc_write_ref(
    k: torch.Tensor, v: torch.Tensor, b: torch.Tensor, A: Optional[torch.Tensor], z: Optional[torch.Tensor], *,
    n_heads: int, normalize: bool = True, use_denom: bool = True, correction: bool = True, gating: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The delta-rule write of the M memory rows; returns the new ``(A, z)`` (SPEC §6, step 3).

    ``k [B, M, d_mem]`` = ``W_k m``, ``v [B, M, d]`` = ``W_v m``, ``b [B, M, H]`` (or ``[B, M, d]``
    with ``gating``) = ``W_b m`` before the sigmoid; ``A``/``z`` the old state, None before the first
    segment (then ``vbar = 0`` and ``gamma = 1``). ``gamma`` is detached; its norm term is ``|k|^2``
    with ``normalize`` (the ``experimental`` branch), ``|k|^2 + 1e-5`` without (``framework_accel``).
    The state is float32 (float64 for float64 inputs)."""
    sdt = torch.float64 if k.dtype == torch.float64 else torch.float32
    f = dpfp_ref(_heads(k, n_heads).to(sdt), normalize)  # [B, H, M, K]
    vv = _heads(v, n_heads).to(sdt)  # [B, H, M, dv]
    beta = torch.sigmoid(_heads(b, n_heads).to(sdt))  # [B, H, M, 1] or [B, H, M, dv]
    gamma = torch.ones_like(f[..., :1])
    if A is None:
        vbar = torch.zeros_like(vv)
    else:
        vbar = torch.einsum("bhmk,bhkt->bhmt", f, A)
        if use_denom:
            den = torch.einsum("bhk,bhmk->bhm", z, f)[..., None] + ASSOC_EPS
            vbar = vbar / den
            if correction:
                norm2 = (f * f).sum(-1, keepdim=True) + (0.0 if normalize else ASSOC_EPS)
                gamma = torch.clip(1 - den / norm2, 0, 1).detach()
    if not gating:
        assert beta.shape[-1] == 1
    delta = beta * (vv - vbar)
    upd = torch.einsum("bhmk,bhmt->bhkt", f, delta)
    zu = (gamma * f).sum(-2)
    if A is None:
        return upd, zu
    return A + upd, z + zu
