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
instead (exact, it is the original) for a ``mask`` that is not right padding and for
``mask_out_read_memories=True``. Attention dropout (``attn_dropout`` in training mode) runs
inside ``segment_attention`` (``dropout_p``: the same distribution as the original's, another random
stream). ``causal=True`` with ``memory_not_causal=False`` fails in the original package itself (its
causal mask does not cover the null key), so it is refused here with a ``ValueError``.

Under ``torch.autocast`` the attention inputs are cast as SDPA's are (see ``_amp``).

Supported releases: ``recurrent-memory-transformer-pytorch`` 0.7.x (``pip install
"rmt_kernels[lucidrains]"``). Older releases (0.5.x, 0.6.0 with its hyper-connections or
``resi_dual``) have another attention and are refused by :func:`apply_rmt_kernels`; a newer release
is patched with a warning, and refused when its modules lack what the patch reads.
"""

from __future__ import annotations

import inspect
import re
import types
import warnings
from importlib import metadata
from typing import Optional

import torch

try:
    from recurrent_memory_transformer_pytorch.recurrent_memory_transformer import (
        Attention,
        RecurrentMemoryTransformer,
        RecurrentMemoryTransformerWrapper,
        apply_rotary_pos_emb,
    )
except ImportError as exc:
    raise ImportError(
        "rmt_kernels.integrations.lucidrains needs lucidrains' recurrent-memory-transformer-pytorch 0.7.x: "
        'pip install "rmt_kernels[lucidrains]"'
    ) from exc

from ..layout import MemoryLayout  # noqa: E402
from ..ops.segment_attention.interface import segment_attention  # noqa: E402
from . import _amp  # noqa: E402

_STATE_ATTR = "_rmt_kernels_state"
DISTRIBUTION = "recurrent-memory-transformer-pytorch"
SUPPORTED = ((0, 7), (0, 8))  # [low, high) of (major, minor)
# What the patched forwards read: the attention's modules and the model's segment settings.
_ATTENTION_ATTRS = ("norm", "heads", "attend", "null_kv", "to_q", "to_kv", "to_out", "learned_value_residual_mix")
_ATTENTION_ARGS = ("x", "rotary_emb", "mask", "xl_memories", "value_residual")
_MODEL_ATTRS = ("causal", "use_custom_causal_attn_mask", "always_have_read_memories", "num_memory_tokens",
                "xl_mem_len", "use_xl_memories")
_newer_warned = False


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
        RuntimeError: the installed ``recurrent-memory-transformer-pytorch`` is older than 0.7, or its
            modules lack an attribute or argument the patch reads.

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
    _check_release(transformer)
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


def installed_version() -> Optional[str]:
    """The installed release of lucidrains' package (None: not installed as a distribution)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _supported_range() -> str:
    (a, b), (c, d) = SUPPORTED
    return f">={a}.{b},<{c}.{d}"


def _check_release(transformer) -> None:
    """Refuse a release the patch was not written for: by version, then by what its modules hold."""
    global _newer_warned
    version = installed_version()
    release = None
    if version is not None:
        found = re.match(r"(\d+)\.(\d+)", version)
        release = (int(found.group(1)), int(found.group(2))) if found else None
    hint = f"apply_rmt_kernels supports {DISTRIBUTION}{_supported_range()}: pip install \"rmt_kernels[lucidrains]\""
    if release is not None and release < SUPPORTED[0]:
        raise RuntimeError(f"{DISTRIBUTION} {version} is installed, whose attention differs; {hint}")
    missing = [f"{type(transformer).__name__}.{a}" for a in _MODEL_ATTRS if not hasattr(transformer, a)]
    for module in transformer.modules():
        if isinstance(module, Attention):
            missing += [f"Attention.{a}" for a in _ATTENTION_ATTRS if not hasattr(module, a)]
            params = inspect.signature(type(module).forward).parameters
            missing += [f"Attention.forward({a}=)" for a in _ATTENTION_ARGS if a not in params]
            break
    if missing:
        raise RuntimeError(
            f"{DISTRIBUTION} {version or '(version unknown)'} does not have what the patch reads "
            f"({', '.join(sorted(set(missing)))}); {hint}"
        )
    if release is not None and release >= SUPPORTED[1] and not _newer_warned:
        _newer_warned = True
        warnings.warn(
            f"{DISTRIBUTION} {version} is newer than the releases apply_rmt_kernels was checked against "
            f"({_supported_range()}); it has the attributes the patch reads, but compare a few outputs "
            "with the unpatched model",
            UserWarning,
            stacklevel=3,
        )


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
    if state.layout is None:
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

    dtype = _amp.autocast_dtype(q.device.type)
    q, k, v, prefix_k, prefix_v = _amp.cast_like_sdpa(dtype, q, k, v, prefix_k, prefix_v)
    with _amp.kernel_region(q.device.type, dtype):
        out = segment_attention(
            q, k, v, state.layout,
            segment_lengths=state.segment_lengths, prefix_k=prefix_k, prefix_v=prefix_v, backend=state.backend,
            dropout_p=self.attend.dropout if self.training else 0.0,
        )
    out = out.transpose(1, 2).reshape(b, n, h * d)
    return self.to_out(out), next_xl, orig_v
