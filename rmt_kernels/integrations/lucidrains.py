"""Run lucidrains' ``recurrent-memory-transformer-pytorch`` attention on :func:`segment_attention`.

``apply_rmt_kernels(model)`` patches a ``RecurrentMemoryTransformer`` in place (its forward and every
layer's ``Attention.forward``, as instance attributes; parameters and state-dict keys are untouched)::

    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer
    from rmt_kernels.integrations.lucidrains import apply_rmt_kernels
    model = apply_rmt_kernels(RecurrentMemoryTransformer(512, num_tokens=256, depth=6,
                                                         num_memory_tokens=128, seq_len=1024))

What that model computes per segment, and how it maps onto a :class:`~rmt_kernels.MemoryLayout`:

- packed rows ``[read memories (R = num_memory_tokens, or 0 on a first step without read memories
  when always_have_read_memories=False) | segment tokens | write memories (W = num_memory_tokens)]``;
- ``causal=True`` with the default ``memory_not_causal=True``: mask ``"memory_bidirectional"``;
  ``causal=False``: ``"full"``;
- the learned null key/value and the previous segment's XL keys/values are keys every row sees:
  the prefix ``[XL memories | null]`` with ``prefix_visible_to="all"``; they are read from their own
  tensors (the null key gets its gradient through the kernel; XL memories arrive detached);
- ``mask=`` (True = valid segment token) becomes ``segment_lengths`` when it is right padding.

Same outputs, memories, XL memories and gradients as the unpatched model. The unpatched code runs
instead (exact, it is the original) for a ``mask`` that is not right padding, for
``mask_out_read_memories=True``, and for attention dropout in training mode (the kernel has no
dropout). ``causal=True`` with ``memory_not_causal=False`` fails in the original package itself (its
causal mask does not cover the null key), so it is refused here with a ``ValueError``.
"""

from __future__ import annotations

import types
from typing import Optional

import torch
from recurrent_memory_transformer_pytorch.recurrent_memory_transformer import (
    Attention,
    RecurrentMemoryTransformer,
    RecurrentMemoryTransformerWrapper,
    apply_rotary_pos_emb,
)

from ..layout import MemoryLayout
from ..ops.segment_attention.interface import segment_attention

_STATE_ATTR = "_rmt_kernels_state"


class _SegmentState:
    """What the patched model forward tells its attention layers about the current segment."""

    __slots__ = ("layout", "segment_lengths", "xl_mem_len", "keep_xl", "backend")

    def __init__(self, backend: str):
        self.layout: Optional[MemoryLayout] = None  # None: run the original attention
        self.segment_lengths: Optional[torch.Tensor] = None
        self.xl_mem_len = 0
        self.keep_xl = True
        self.backend = backend


def apply_rmt_kernels(model, *, backend: str = "auto"):
    """Patch ``model`` in place so that its attention runs on :func:`rmt_kernels.segment_attention`.

    Args:
        model: a ``recurrent_memory_transformer_pytorch.RecurrentMemoryTransformer`` (or its
            ``RecurrentMemoryTransformerWrapper``, whose ``.transformer`` is patched). Patching twice
            is a no-op.
        backend: the ``segment_attention`` backend (default ``"auto"``).

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not one of those classes.
        ValueError: ``causal=True`` with ``memory_not_causal=False`` (broken in the original package).

    Example::

        >>> model = apply_rmt_kernels(RecurrentMemoryTransformer(64, num_tokens=100, depth=2,
        ...                                                      num_memory_tokens=4, seq_len=32))
        >>> logits, memories, xl_memories = model(torch.randint(0, 100, (2, 32)))
    """
    transformer = model.transformer if isinstance(model, RecurrentMemoryTransformerWrapper) else model
    if not isinstance(transformer, RecurrentMemoryTransformer):
        raise TypeError(
            "model must be a recurrent_memory_transformer_pytorch RecurrentMemoryTransformer or "
            f"RecurrentMemoryTransformerWrapper, got {type(model).__name__}"
        )
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if transformer.causal and not transformer.use_custom_causal_attn_mask:
        raise ValueError(
            "causal=True with memory_not_causal=False is not supported: the original package's causal "
            "mask does not cover its null key/value (a shape error in its attention); use the default "
            "memory_not_causal=True"
        )
    state = getattr(transformer, _STATE_ATTR, None)
    if state is not None:
        state.backend = backend
        return model
    state = _SegmentState(backend)
    object.__setattr__(transformer, _STATE_ATTR, state)
    transformer.forward = types.MethodType(_model_forward, transformer)
    for module in transformer.modules():
        if isinstance(module, Attention):
            object.__setattr__(module, _STATE_ATTR, state)
            module.forward = types.MethodType(_attention_forward, module)
    return model


def _right_padded_lengths(mask: torch.Tensor):
    """``(True, lengths or None)`` if the bool ``[B, n]`` mask is right padding, else ``(False, None)``."""
    valid = mask.to(torch.bool)
    lengths = valid.sum(dim=1)
    expected = torch.arange(valid.shape[1], device=valid.device)[None, :] < lengths[:, None]
    if not torch.equal(valid, expected):
        return False, None
    if bool((lengths == valid.shape[1]).all()):
        return True, None
    return True, lengths.to(torch.int32)


def _model_forward(self, x, read_memories=None, **kwargs):
    """``RecurrentMemoryTransformer.forward`` with the segment's layout published to the attention."""
    state = getattr(self, _STATE_ATTR)
    mask = kwargs.get("mask")
    has_read = read_memories is not None or self.always_have_read_memories
    read_len = self.num_memory_tokens if has_read else 0
    right, lengths = (True, None) if mask is None else _right_padded_lengths(mask)
    if right and not (read_len > 0 and kwargs.get("mask_out_read_memories", False)):
        state.layout = MemoryLayout(
            read_len,
            self.num_memory_tokens,
            mask="memory_bidirectional" if self.use_custom_causal_attn_mask else "full",
            prefix_visible_to="all",
        )
        state.segment_lengths = lengths
        state.xl_mem_len = self.xl_mem_len
        state.keep_xl = self.use_xl_memories
    try:
        return type(self).forward(self, x, read_memories, **kwargs)
    finally:
        state.layout = None
        state.segment_lengths = None


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H * D]`` -> ``[B, H, N, D]`` (a view)."""
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)


def _attention_forward(self, x, rotary_emb=None, mask=None, xl_memories=None, value_residual=None):
    """``Attention.forward`` on ``segment_attention``; same three outputs as the original."""
    state = getattr(self, _STATE_ATTR)
    if state.layout is None or (self.training and self.attend.dropout > 0.0):
        return type(self).forward(
            self, x, rotary_emb=rotary_emb, mask=mask, xl_memories=xl_memories, value_residual=value_residual
        )
    if (value_residual is None) != (self.learned_value_residual_mix is None):
        raise ValueError("value_residual must be given exactly to the layers that mix it in")

    h = self.heads
    x = self.norm(x)
    q = _heads(self.to_q(x), h)
    k, v = (_heads(t, h) for t in self.to_kv(x).chunk(2, dim=-1))
    orig_v = v
    if self.learned_value_residual_mix is not None:
        v = v.lerp(value_residual, self.learned_value_residual_mix(x))

    b, _, n, d = q.shape
    null_k, null_v = (t[None, :, None, :].expand(b, h, 1, d) for t in self.null_kv)

    # The model keeps the last xl_mem_len positions of [null | packed] keys/values: build only those.
    if state.keep_xl:
        tail = min(state.xl_mem_len, n + 1)
        if tail <= n:
            next_xl = torch.stack((k[:, :, n - tail :], v[:, :, n - tail :]))
        else:
            next_xl = torch.stack((torch.cat((null_k, k), dim=2), torch.cat((null_v, v), dim=2)))
    else:
        next_xl = torch.stack((null_k, null_v))  # discarded by the model

    prefix_k, prefix_v = null_k, null_v
    if xl_memories is not None:
        prefix_k = torch.cat((xl_memories[0], null_k), dim=2)
        prefix_v = torch.cat((xl_memories[1], null_v), dim=2)
    if rotary_emb is not None:
        q_rot, k_rot = rotary_emb  # k_rot covers [xl | null | packed]
        p = prefix_k.shape[2]
        q = apply_rotary_pos_emb(q_rot, q)
        prefix_k = apply_rotary_pos_emb(k_rot[:p], prefix_k)
        k = apply_rotary_pos_emb(k_rot[p:], k)

    out = segment_attention(
        q, k, v, state.layout,
        segment_lengths=state.segment_lengths, prefix_k=prefix_k, prefix_v=prefix_v, backend=state.backend,
    )
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return self.to_out(out), next_xl, orig_v
