"""The ``"rmt_kernels"`` attention implementation for Hugging Face ``transformers``.

After :func:`register`, any model whose attention goes through ``AttentionInterface`` (GPT-2,
GPT-NeoX, Llama and its grouped-query relatives, BERT-family encoders, ...) runs on
:func:`rmt_kernels.segment_attention`::

    from rmt_kernels.integrations import hf
    hf.register()
    model.set_attn_implementation("rmt_kernels")   # or from_pretrained(..., attn_implementation="rmt_kernels")

What one attention call computes:

- **No memory layout** (the default): plain padded attention, causal for decoder layers and
  bidirectional for encoder layers (``module.is_causal``; an explicit ``is_causal`` argument wins),
  equal to ``"sdpa"``.
- **A memory layout** (:class:`~rmt_kernels.MemoryLayout`, given as the forward keyword
  ``rmt_layout=`` or stored on the config with :func:`set_memory_layout`): the inputs are one packed
  segment ``[read memory R | segment S | write memory W]`` and each row sees the keys the layout's mask
  family allows (``"causal"``, ``"memory_bidirectional"`` or ``"full"``).

Padding. The mask function registered with ``AttentionMaskInterface`` hands the 2-D padding mask
``[B, N]`` (or ``None`` when nothing is padded) to the attention instead of a dense 4-D mask. When the
memory columns are all valid and the segment part is right padded, the kernel runs with
``segment_lengths`` = the valid segment tokens per row. Any other 2-D mask (left padding, holes,
padded memory columns) takes the **exact fallback**: SDPA with the dense mask
``layout mask AND key-valid``, which is what ``"sdpa"`` computes for the same inputs.

Other fallbacks, all to ``transformers``' own SDPA attention with the same mask ``"sdpa"`` would use:

- queries and keys of different lengths (decoding with a KV cache, cross-attention), a 4-D mask
  (a custom mask, sliding-window or packed-sequence masks), a ``position_bias``: not expressible as a
  memory layout. With a layout set these raise ``ValueError`` instead, since the layout could not be
  honoured; the message says where the layout came from and how to remove a stored one (a layout
  stored with :func:`set_memory_layout` applies to ``generate``'s decoding steps too).

Mixed precision: under ``torch.autocast`` the inputs are cast to the autocast dtype as SDPA's are, and
the kernel runs on them (rotary models pass float32 queries and keys with a lower-precision value).

Only this attention reads a layout. :func:`set_memory_layout` warns when the model's attention is
another one; a forward ``rmt_layout=`` given to a model running another attention is dropped by
``transformers`` without any code of this module running (:func:`uses_rmt_kernels` tells which runs).

Needs ``transformers >= 5`` (importing this module raises ImportError on 4.x, and without
``transformers`` one that names the ``rmt_kernels[hf]`` extra); verified with 5.24.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping
from typing import Optional, Tuple

import torch

try:
    import transformers
except ImportError as exc:
    raise ImportError(
        "rmt_kernels.integrations.hf needs Hugging Face transformers >= 5: "
        'pip install "rmt_kernels[hf]"'
    ) from exc

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"rmt_kernels.integrations.hf needs transformers >= 5 (found {transformers.__version__}): in 4.x "
        "several models (GPT-2, BERT) build their masks themselves and bypass the attention/mask interfaces. "
        "pip install 'transformers>=5'"
    )

from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers import masking_utils  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from ..layout import MemoryLayout  # noqa: E402
from ..ops.segment_attention.interface import segment_attention  # noqa: E402
from . import _amp  # noqa: E402

ATTN_IMPLEMENTATION = "rmt_kernels"
LAYOUT_KWARG = "rmt_layout"
CONFIG_ATTR = "rmt_layout"

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Looked up by name: a release without it sends bidirectional masks down the exact sdpa_mask path.
_STANDARD_MASK_FUNCTIONS = tuple(
    f for f in (causal_mask_function, getattr(masking_utils, "bidirectional_mask_function", None)) if f is not None
)


# --------------------------------------------------------------------------- registration


def register(name: str = ATTN_IMPLEMENTATION) -> str:
    """Register the attention implementation and its mask function under ``name``.

    Idempotent; call it before or after models are built. Afterwards
    ``model.set_attn_implementation(name)``, ``from_pretrained(..., attn_implementation=name)`` and
    ``from_config(config, attn_implementation=name)`` select it.

    Args:
        name: the implementation's name (default ``"rmt_kernels"``).

    Returns:
        ``name``.

    Raises:
        TypeError: ``name`` is not a non-empty string.
        ValueError: ``name`` is one of transformers' own implementations.

    Example::

        >>> from rmt_kernels.integrations import hf
        >>> hf.register()
        'rmt_kernels'
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    builtin = {"eager", "sdpa", "flex_attention", "paged|eager"} | {
        f"flash_attention_{v}" for v in (2, 3, 4)
    }
    if name in builtin:
        raise ValueError(f"name={name!r} would replace transformers' own {name!r} implementation")
    AttentionInterface.register(name, rmt_kernels_attention)
    AttentionMaskInterface.register(name, rmt_kernels_mask)
    return name


AUTO = "auto"  # attn_implementation of the memory cells: switch to this attention, saying so once
SWITCH_WARNED = set()  # the cells (by name) that have said so in this process


def switch_attention(model, attn_implementation, who: str) -> None:
    """What a memory cell (``who``: its class name) does with its ``attn_implementation`` argument:
    ``"auto"`` switches ``model`` to ``"rmt_kernels"`` in place and warns once per ``who`` and process
    that it did; a name switches to that attention silently (``"rmt_kernels"`` is registered first);
    None leaves the model as it is."""
    if attn_implementation is None:
        return
    auto = attn_implementation == AUTO
    if auto:
        attn_implementation = ATTN_IMPLEMENTATION
    if attn_implementation == ATTN_IMPLEMENTATION:
        register()
    current = model.config._attn_implementation
    if current == attn_implementation:
        return
    model.set_attn_implementation(attn_implementation)
    if auto and who not in SWITCH_WARNED:
        SWITCH_WARNED.add(who)
        warnings.warn(
            f"{who} switched the attention of the {type(model).__name__} it was given from {current!r} to "
            f"{attn_implementation!r} in place (that object is changed for all its users); pass "
            f"attn_implementation={attn_implementation!r} to do this without a warning, or "
            "attn_implementation=None to leave the model as it is",
            UserWarning,
            stacklevel=3,
        )


def as_layout(value) -> Optional[MemoryLayout]:
    """A :class:`MemoryLayout` from a layout, a mapping of its fields (as stored on a config) or None."""
    if value is None or isinstance(value, MemoryLayout):
        return value
    if isinstance(value, Mapping):
        return MemoryLayout(**value)
    raise TypeError(
        f"{LAYOUT_KWARG} must be a rmt_kernels.MemoryLayout, a dict of its fields or None, "
        f"got {type(value).__name__}"
    )


def set_memory_layout(model_or_config, layout) -> None:
    """Store ``layout`` on a model's config (as a plain dict, so ``save_pretrained`` keeps working).

    Every attention call of the model then uses it unless a forward ``rmt_layout=`` overrides it,
    including the decoding steps of ``generate`` (which no layout describes: they raise
    ``ValueError``). Only the ``"rmt_kernels"`` attention reads the layout; every other
    implementation ignores it and runs its plain mask, so storing a layout on a model or config
    whose attention is something else warns (``UserWarning``).

    Args:
        model_or_config: a ``PreTrainedModel`` (its ``.config`` is used) or a ``PretrainedConfig``.
        layout: a :class:`MemoryLayout`, a dict of its fields, or None to remove it.

    Raises:
        TypeError: ``layout`` is neither; ``model_or_config`` has no config.

    Example::

        >>> set_memory_layout(model, MemoryLayout(4, 4, mask="causal"))
    """
    config = getattr(model_or_config, "config", model_or_config)
    if not hasattr(config, "to_dict"):
        raise TypeError(f"model_or_config must be a transformers model or config, got {type(model_or_config).__name__}")
    layout = as_layout(layout)
    setattr(config, CONFIG_ATTR, None if layout is None else dataclasses.asdict(layout))
    impl = getattr(config, "_attn_implementation", None)
    if layout is not None and impl is not None and not uses_rmt_kernels(config):
        warnings.warn(
            f"the memory layout is stored, but this model's attention is {impl!r}, which ignores it and "
            f"runs its plain mask: call hf.register() and model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) "
            f"(or load with from_pretrained(..., attn_implementation={ATTN_IMPLEMENTATION!r}))",
            UserWarning,
            stacklevel=2,
        )


def uses_rmt_kernels(model_or_config) -> bool:
    """Whether a model (or config) runs this module's attention (under any name it was registered as)."""
    config = getattr(model_or_config, "config", model_or_config)
    impl = getattr(config, "_attn_implementation", None)
    return isinstance(impl, str) and AttentionInterface._global_mapping.get(impl) is rmt_kernels_attention


# --------------------------------------------------------------------------- mask function


def rmt_kernels_mask(
    batch_size: int,
    q_length: Optional[int] = None,
    kv_length: Optional[int] = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    cache_position: Optional[torch.Tensor] = None,
    **kwargs,
):
    """``AttentionMaskInterface`` entry: pass the 2-D padding mask through instead of a 4-D mask.

    For a plain causal or bidirectional mask over queries and keys that coincide (no cache offset),
    returns ``None`` when nothing is padded, else the bool ``[B, kv_length]`` padding mask. Anything
    else (a cache offset, sliding windows, packed sequences, a custom overlay) gets the dense mask of
    ``transformers.masking_utils.sdpa_mask`` (or its ``None``), which the attention hands to SDPA.
    Releases before 5.2x describe the queries by ``cache_position`` instead of ``q_length``/``q_offset``.
    """
    if cache_position is not None:
        q_length = cache_position.shape[0]
        if q_length and int(cache_position[0]) != 0:
            q_offset = -1  # a cache offset: not plain
    plain = (
        mask_function in _STANDARD_MASK_FUNCTIONS
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
        and (attention_mask is None or (attention_mask.dim() == 2 and attention_mask.shape[-1] == kv_length))
    )
    if plain:
        if attention_mask is None or bool(attention_mask.all()):
            return None
        return attention_mask.to(torch.bool)
    if cache_position is not None:
        return sdpa_mask(
            batch_size=batch_size, cache_position=cache_position, kv_length=kv_length, kv_offset=kv_offset,
            mask_function=mask_function, attention_mask=attention_mask, **kwargs,
        )
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )


# --------------------------------------------------------------------------- padding analysis


class _PaddingCache:
    """Remembers the analysis of the last 2-D mask: every layer of a forward gets the same tensor."""

    def __init__(self):
        self._ref = None
        self._key = None
        self._value = None

    def get(self, mask: torch.Tensor, key):
        if self._ref is not None and self._ref() is mask and self._key == (key, mask._version):
            return self._value
        return None

    def put(self, mask: torch.Tensor, key, value) -> None:
        self._ref = weakref.ref(mask)
        self._key = (key, mask._version)
        self._value = value


_padding_cache = _PaddingCache()


def _right_padding(mask2d: torch.Tensor, layout: MemoryLayout, seq_len: int):
    """``(True, lengths or None)`` when the memory columns are valid and the segment is right padded,
    else ``(False, None)``. ``lengths`` is int32 ``[B]`` (None: nothing padded)."""
    cached = _padding_cache.get(mask2d, (layout.num_read, layout.num_write, seq_len))
    if cached is not None:
        return cached
    r, w = layout.num_read, layout.num_write
    s = seq_len - r - w
    valid = mask2d.to(torch.bool)
    seg = valid[:, r : r + s]
    lengths = seg.sum(dim=1)
    expected = torch.arange(s, device=valid.device)[None, :] < lengths[:, None]
    ok = bool(valid[:, :r].all()) and bool(valid[:, r + s :].all()) and bool(torch.equal(seg, expected))
    if not ok:
        result = (False, None)
    elif bool((lengths == s).all()):
        result = (True, None)
    else:
        result = (True, lengths.to(torch.int32))
    _padding_cache.put(mask2d, (r, w, seq_len), result)
    return result


def _dense_mask(layout: MemoryLayout, seq_len: int, mask2d: Optional[torch.Tensor], device) -> torch.Tensor:
    """bool ``[B or 1, 1, N, N]``: the layout's mask AND the 2-D key-valid mask."""
    dense = layout.dense_mask(layout.segment_len(seq_len)).to(device)[:, None]
    if mask2d is not None:
        dense = dense & mask2d.to(device=device, dtype=torch.bool)[:, None, None, :]
    return dense


# --------------------------------------------------------------------------- attention


def _not_expressible(from_config: bool, q_len: int, kv_len: int, attention_mask, position_bias) -> ValueError:
    """The error for a call that a memory layout cannot describe, with where the layout came from."""
    got = (
        f"got {q_len} queries, {kv_len} keys, attention_mask of shape "
        f"{None if attention_mask is None else tuple(attention_mask.shape)}"
        f"{', a position bias' if position_bias is not None else ''}"
    )
    if from_config:
        source = (
            "the memory layout stored on the config (hf.set_memory_layout; save_pretrained keeps it) "
            "applies to every attention call"
        )
        fix = (
            "; to generate or decode with a KV cache, remove it first with hf.set_memory_layout(model, None) "
            f"and pass {LAYOUT_KWARG}= only to the forward calls that run one packed segment (or generate "
            "through rmt_kernels.integrations.rmt.RecurrentWrapper.generate, which needs no stored layout)"
        )
    else:
        source = f"the memory layout passed as {LAYOUT_KWARG}="
        fix = f"; drop {LAYOUT_KWARG}= from this call (a KV-cache decoding step, a custom 4-D mask)"
    return ValueError(
        f"{source} needs queries and keys of one packed segment, a 2-D padding mask and no position bias; "
        f"{got}{fix}"
    )


def rmt_kernels_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry: one attention call of a Hugging Face layer.

    Args:
        module: the attention module (``is_causal``, ``config`` are read from it).
        query: ``[B, H_q, N, D]``; key, value: ``[B, H_kv, N_kv, D]`` (grouped-query heads are read
            natively). float16/bfloat16/float32 (float64 on the torch backend).
        attention_mask: what :func:`rmt_kernels_mask` produced: None, a bool ``[B, N]`` padding mask,
            or a 4-D mask (fallback to SDPA).
        dropout: attention-probability dropout (a training module's ``attention_dropout``), applied
            inside ``segment_attention`` (``dropout_p``; the same distribution as SDPA's dropout, drawn
            from another random stream).
        scaling: softmax scale (default ``1/sqrt(D)``).
        is_causal: overrides ``module.is_causal`` when given.
        kwargs: ``rmt_layout`` (a :class:`MemoryLayout` or dict; default ``module.config.rmt_layout``),
            ``position_bias`` (fallback), and whatever else the model passes (ignored like SDPA does).

    Returns:
        ``(attn_output [B, N, H_q, D] contiguous, None)``, as ``transformers``' SDPA attention.

    Mixed precision: under ``torch.autocast`` the inputs are cast to the autocast dtype exactly as
    SDPA's are (float16/bfloat16/float32 inputs; rotary models pass float32 queries and keys with a
    lower-precision value) and the kernel runs on them with autocast off.

    Raises:
        ValueError: a layout is set but the call cannot honour it (query and key lengths differ, a
            4-D mask, a position bias; the message says how to remove a stored layout), or the layout
            does not fit ``N``.
        TypeError: ``rmt_layout`` of the wrong type.

    Example::

        >>> out, _ = rmt_kernels_attention(module, q, k, v, None, scaling=0.125)
    """
    layout = as_layout(kwargs.pop(LAYOUT_KWARG, None))
    from_config = layout is None
    if layout is None:
        layout = as_layout(getattr(getattr(module, "config", None), CONFIG_ATTR, None))
    device_type = query.device.type
    autocast_dtype = _amp.autocast_dtype(device_type)
    query, key, value = _amp.cast_like_sdpa(autocast_dtype, query, key, value)
    q_len, kv_len = query.shape[2], key.shape[2]
    mask_is_2d = attention_mask is None or (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2)
    position_bias = kwargs.get("position_bias")
    expressible = q_len == kv_len and mask_is_2d and position_bias is None and query.dtype in _KERNEL_DTYPES

    if layout is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not expressible:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                is_causal=is_causal, **kwargs,
            )
        layout = MemoryLayout(0, 0, mask="causal" if causal else "full")
    elif not expressible:
        raise _not_expressible(from_config, q_len, kv_len, attention_mask, position_bias)
    if q_len < layout.num_read + layout.num_write:
        raise ValueError(
            f"{LAYOUT_KWARG} has num_read + num_write = {layout.num_read + layout.num_write} memory "
            f"positions but the layer got only {q_len} positions"
        )

    lengths = None
    if attention_mask is not None:
        right, lengths = _right_padding(attention_mask, layout, q_len)
        if not right:
            dense = _dense_mask(layout, q_len, attention_mask, query.device)
            return sdpa_attention_forward(
                module, query, key, value, dense, dropout=dropout, scaling=scaling, is_causal=False
            )

    with _amp.kernel_region(device_type, autocast_dtype):
        out = segment_attention(query, key, value, layout, segment_lengths=lengths, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None
