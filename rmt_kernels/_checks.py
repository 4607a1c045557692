"""Argument checks of every op, in one place: segment attention, the memory handoff (pack from
embeddings or token ids, ``out=`` buffers) and the backend's dtype/head-dim support.

Public entry points call these once per call; the recurrent driver calls them once per run and then
the ops' validated entries. Each failure names the argument and what was expected; nothing is
silently broadcast or cast.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .errors import BackendUnavailableError
from .layout import MemoryLayout, as_int

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one ``segment_attention`` call, read off validated inputs."""

    batch: int
    heads_q: int
    heads_kv: int
    seq_len: int
    segment_len: int
    prefix_len: int
    head_dim: int
    scale: float


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def functorch_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jvp, ...) is running: the eager paths then take
    their ``autograd.Function`` with ``setup_context``, which functorch requires."""
    try:
        return torch._C._are_functorch_transforms_active()
    except AttributeError:  # pragma: no cover - older torch
        return False


ENV_DEBUG_CHECKS = "RMT_KERNELS_DEBUG_CHECKS"


def host_value_checks(t: torch.Tensor) -> bool:
    """Whether value checks of ``t`` read it on the host: always for CPU tensors; for device tensors
    (where a read is a host sync) only with ``RMT_KERNELS_DEBUG_CHECKS=1``; otherwise they run on
    the device (:func:`device_check`)."""
    return t.device.type == "cpu" or os.environ.get(ENV_DEBUG_CHECKS) == "1"


def device_check(ok: torch.Tensor, message: str) -> None:
    """Assert a boolean device tensor without a host sync: a failure stops the device work with
    ``message`` and surfaces at the next synchronisation. Nothing is checked while compiling."""
    if not _is_compiling():
        torch._assert_async(ok, message)


def as_lengths(segment_lengths):
    """``segment_lengths`` as given, or a list/tuple of ints as an int64 CPU tensor (as
    :meth:`MemoryLayout.dense_mask` takes them)."""
    if isinstance(segment_lengths, (list, tuple)):
        return torch.tensor([as_int(x, "segment_lengths[i]") for x in segment_lengths], dtype=torch.int64)
    return segment_lengths


def check_segment_lengths(segment_lengths, batch: int, segment_len: int, device: torch.device) -> None:
    """An integer ``[B]`` tensor on the CPU or ``device`` with values in ``[0, S]`` (the values: on
    the host for CPU tensors, on the device otherwise, see :func:`host_value_checks`)."""
    if not isinstance(segment_lengths, torch.Tensor):
        raise TypeError(f"segment_lengths must be an integer torch.Tensor [B], got {type(segment_lengths).__name__}")
    dtype = segment_lengths.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"segment_lengths must be an integer tensor, got {dtype}")
    if tuple(segment_lengths.shape) != (batch,):
        raise ValueError(f"segment_lengths must have shape [B] = [{batch}], got {tuple(segment_lengths.shape)}")
    if segment_lengths.device.type not in ("cpu", device.type):
        expected = "the CPU" if device.type == "cpu" else f"the CPU or {device}"
        raise ValueError(f"segment_lengths is on {segment_lengths.device}; expected {expected}")
    if _is_compiling() or not segment_lengths.numel():
        return
    message = f"segment_lengths must lie in [0, S] = [0, {segment_len}]"
    if host_value_checks(segment_lengths):
        lo, hi = (int(x) for x in torch.aminmax(segment_lengths))
        if lo < 0 or hi > segment_len:
            raise ValueError(f"{message}, got values in [{lo}, {hi}]")
    else:
        device_check(((segment_lengths >= 0) & (segment_lengths <= segment_len)).all(), message)


def _tensor4(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(x.shape)}")
    return x


def check_attention_inputs(
    q,
    k,
    v,
    layout,
    segment_lengths=None,
    prefix_k=None,
    prefix_v=None,
    scale=None,
    *,
    dtypes=KERNEL_DTYPES,
    head_dims=None,
    backend: str = "reference",
) -> AttentionShape:
    """Validate the arguments of ``segment_attention`` and return the call's sizes.

    ``dtypes``: dtypes the caller supports; ``head_dims``: supported head dims (None: any >= 1).
    ``segment_lengths`` values are checked against ``[0, S]`` except while ``torch.compile`` traces.
    """
    if not isinstance(layout, MemoryLayout):
        raise TypeError(f"layout must be a rmt_kernels.MemoryLayout, got {type(layout).__name__}")
    q, k, v = _tensor4(q, "q"), _tensor4(k, "k"), _tensor4(v, "v")
    dtype, device = q.dtype, q.device
    _check_q_dtype(dtype, dtypes, backend)
    if k.dtype != dtype or v.dtype != dtype:
        name, t = ("k", k) if k.dtype != dtype else ("v", v)
        raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}; they must match")
    if k.device != device or v.device != device:
        name, t = ("k", k) if k.device != device else ("v", v)
        raise ValueError(f"{name} is on {t.device} but q is on {device}; they must match")
    kshape = k.shape
    if kshape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(kshape)} and {tuple(v.shape)}")
    b, hq, n, d = q.shape
    bk, hkv, nk, dk = kshape
    if bk != b:
        raise ValueError(f"k has batch {bk} but q has {b}")
    if nk != n:
        raise ValueError(f"k/v have {nk} positions but q has {n}; both are the packed length N")
    if dk != d:
        raise ValueError(f"k/v head dim {dk} differs from q head dim {d}")
    if hkv == 0:
        raise ValueError("k/v have no head (H_kv = 0); k and v must be [B, H_kv, N, D] with H_kv >= 1")
    if hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv}) for grouped-query attention")
    _check_head_dim(d, head_dims, backend)
    s = n - layout.num_read - layout.num_write
    if s < 0:
        raise ValueError(
            f"packed length N={n} is shorter than num_read + num_write = "
            f"{layout.num_read} + {layout.num_write} (q, k and v are [B, H, N, D]: a [B, N, H, D] "
            f"projection is passed as .transpose(1, 2))"
        )

    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together (got only one of them)")
    p = 0
    if prefix_k is not None:
        prefix_k, prefix_v = _tensor4(prefix_k, "prefix_k"), _tensor4(prefix_v, "prefix_v")
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if t.dtype != dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but q has {dtype}; they must match")
            if t.device != device:
                raise ValueError(f"{name} is on {t.device} but q is on {device}; they must match")
        if prefix_k.shape != prefix_v.shape:
            raise ValueError(
                f"prefix_k and prefix_v must have the same shape, got {tuple(prefix_k.shape)} "
                f"and {tuple(prefix_v.shape)}"
            )
        pb, ph, p, pd = prefix_k.shape
        if (pb, ph, pd) != (b, hkv, d):
            raise ValueError(
                f"prefix_k/prefix_v must be [B, H_kv, P, D] = [{b}, {hkv}, P, {d}], got {tuple(prefix_k.shape)}"
            )

    if segment_lengths is not None:
        check_segment_lengths(segment_lengths, b, s, device)

    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale}")
    return AttentionShape(b, hq, hkv, n, s, p, d, scale)


# --------------------------------------------------------------------------- backend support


def check_dropout(dropout_p) -> float:
    """``dropout_p`` as a float in ``[0, 1)``: TypeError for a non-real, ValueError outside."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
    return dropout_p


def refuse_dropout(op: str, backend: str, dropout_p: float) -> None:
    """``BackendUnavailableError`` for ``dropout_p > 0`` on a backend without attention dropout."""
    if dropout_p > 0:
        raise BackendUnavailableError(
            f"the {backend} backend of {op} has no attention dropout: use backend='triton' on a GPU, "
            "backend='torch', or backend='auto'"
        )


def check_kernel_support(q: torch.Tensor, dtypes, head_dims, backend: str) -> None:
    """``q``'s dtype and head dim are among what the ``backend`` launchers support (launchers called
    directly, outside the public entry points, check with this)."""
    _check_q_dtype(q.dtype, dtypes, backend)
    _check_head_dim(q.shape[-1], head_dims, backend)


def _check_q_dtype(dtype: torch.dtype, dtypes, backend: str) -> None:
    if dtype not in dtypes:
        raise TypeError(f"q has dtype {dtype}; the {backend} backend supports {list(dtypes)}")


def _check_head_dim(d: int, head_dims, backend: str) -> None:
    if d == 0 or (head_dims is not None and d not in head_dims):
        supported = "any >= 1" if head_dims is None else sorted(head_dims)
        raise ValueError(f"head dim D={d} is not supported by the {backend} backend (supported: {supported})")


def check_backend_dtype(op: str, backend: str, dtype: torch.dtype, dtypes) -> None:
    if dtype not in dtypes:
        raise TypeError(f"dtype {dtype} is not supported by the {backend} backend of {op} (supported: {list(dtypes)})")


# --------------------------------------------------------------------------- memory handoff


def check_layout(layout) -> None:
    if not isinstance(layout, MemoryLayout):
        raise TypeError(f"layout must be a rmt_kernels.MemoryLayout, got {type(layout).__name__}")


def check_memories(layout, read_memory, write_memory, batch: int, dim: int, dtype, device):
    """Validate both memories against the layout; returns ``(read, write, tied)`` (write None if tied)."""
    tied = read_memory is not None and read_memory is write_memory
    for name, mem, rows, block in (
        ("read_memory", read_memory, layout.num_read, "num_read"),
        ("write_memory", write_memory, layout.num_write, "num_write"),
    ):
        if mem is None:
            if rows:
                raise ValueError(
                    f"layout has {block}={rows}: {name} ([B, {rows}, d] or [{rows}, d]) is required"
                )
            continue
        if not isinstance(mem, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mem).__name__}")
        if rows == 0:
            raise ValueError(f"{name} was given but layout has {block}=0 (no such block); pass None")
        if mem.dim() == 2:
            expected = (rows, dim)
        elif mem.dim() == 3:
            expected = (batch, rows, dim)
        else:
            raise ValueError(f"{name} must be [B, {rows}, d] or [{rows}, d], got shape {tuple(mem.shape)}")
        if tuple(mem.shape) != expected:
            raise ValueError(
                f"{name} must have shape {list(expected)} (B={batch}, {block}={rows}, d={dim}), "
                f"got {list(mem.shape)}"
            )
        if mem.dtype != dtype:
            raise TypeError(f"{name} has dtype {mem.dtype} but the packed buffer is {dtype}; they must match")
        if mem.device != device:
            raise ValueError(f"{name} is on {mem.device} but the segment is on {device}; they must match")
    return read_memory, (None if tied else write_memory), tied


def _extent(t: torch.Tensor) -> Tuple[int, int]:
    start = t.data_ptr()
    last = sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) if t.numel() else -1
    return start, start + (last + 1) * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share any byte of storage (the reusable-buffer and ``out=`` checks)."""
    if a.numel() == 0 or b.numel() == 0 or a.device != b.device:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a0 < b1 and b0 < a1


def check_out(out, shape, dtype, device, inputs) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out must have shape {list(shape)} = [B, R + S + W, d], got {list(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"out has dtype {out.dtype}; expected {dtype}")
    if out.device != device:
        raise ValueError(f"out is on {out.device}; expected {device}")
    present = [t for t in inputs if t is not None]
    if out.requires_grad or (torch.is_grad_enabled() and any(t.requires_grad for t in present)):
        raise ValueError(
            "out= is not differentiable: an input (or out) requires grad while grad mode is on. "
            "Call without out= for a differentiable result, or run under torch.no_grad()"
        )
    if not _is_compiling():
        for t in present:
            if overlaps(out, t):
                raise ValueError("out overlaps one of the inputs; pass a separate buffer")


def check_segment(segment) -> None:
    if not isinstance(segment, torch.Tensor):
        raise TypeError(f"segment must be a torch.Tensor, got {type(segment).__name__}")
    if segment.dim() != 3:
        raise ValueError(f"segment must be 3-D [B, S, d], got shape {tuple(segment.shape)}")


def check_embedding_weight(embedding_weight) -> None:
    if not isinstance(embedding_weight, torch.Tensor):
        raise TypeError(f"embedding_weight must be a torch.Tensor, got {type(embedding_weight).__name__}")
    if embedding_weight.dim() != 2:
        raise ValueError(f"embedding_weight must be 2-D [V, d], got shape {tuple(embedding_weight.shape)}")


def check_ids_tensor(input_ids, embedding_weight) -> None:
    """``input_ids`` is a ``[B, S]`` tensor on the embedding's device (its dtype and range:
    :func:`check_input_ids`)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D [B, S], got shape {tuple(input_ids.shape)}")
    if input_ids.device != embedding_weight.device:
        raise ValueError(f"input_ids is on {input_ids.device} but embedding_weight is on {embedding_weight.device}")


def check_input_ids(input_ids, num_weights: int, name: str = "input_ids") -> None:
    """Validate token ids: an int32/int64 tensor with values in ``[0, num_weights)``.

    The range check runs on the host for CPU tensors and on the device otherwise (no host sync; see
    :func:`host_value_checks`); it is skipped under ``torch.compile``.
    """
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in ID_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {input_ids.dtype}")
    if not input_ids.numel() or _is_compiling():
        return
    message = f"{name} must lie in [0, {num_weights}) (the embedding has {num_weights} rows)"
    if host_value_checks(input_ids):
        lo, hi = (int(x) for x in torch.aminmax(input_ids))
        if lo < 0 or hi >= num_weights:
            raise ValueError(f"{message}, got values in [{lo}, {hi}]")
    else:
        device_check(((input_ids >= 0) & (input_ids < num_weights)).all(), message)


# --------------------------------------------------------------------------- recurrent driver


def lengths_from_mask(attention_mask, batch: int, seq_len: int, device) -> Optional[List[int]]:
    """Valid tokens per row of a right-padded 0/1 ``[B, T]`` mask (one host sync), None if all valid."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (batch, seq_len):
        raise ValueError(f"attention_mask must have shape [B, T] = [{batch}, {seq_len}], got {list(attention_mask.shape)}")
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device} but the inputs are on {device}")
    m = attention_mask.to(torch.int64)
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError("attention_mask must contain only 0 and 1")
    if seq_len > 1 and not bool((m[:, 1:] <= m[:, :-1]).all()):
        raise ValueError(
            "attention_mask must be right-padded (each row: ones, then zeros); left padding and holes "
            "are not supported by the packed layout"
        )
    lengths = [int(x) for x in m.sum(1).tolist()]
    return None if all(x == seq_len for x in lengths) else lengths


def check_bounds(bounds, seq_len: int) -> List[Tuple[int, int]]:
    out, pos = [], 0
    for k, pair in enumerate(bounds):
        try:
            a, b = (int(v) for v in pair)
        except (TypeError, ValueError):
            raise TypeError(f"bounds[{k}] must be a (start, end) pair of ints, got {pair!r}") from None
        if a != pos or b <= a or b > seq_len:
            raise ValueError(
                f"bounds must be contiguous non-empty ranges from 0 within [0, {seq_len}]; bounds[{k}] = "
                f"({a}, {b}) after position {pos}"
            )
        out.append((a, b))
        pos = b
    if not out:
        raise ValueError("bounds is empty")
    return out


def check_memory_state(name, mem, rows: int, batch: int, dim: int, dtype, device) -> None:
    if not isinstance(mem, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mem).__name__}")
    if tuple(mem.shape) not in ((rows, dim), (batch, rows, dim)):
        raise ValueError(f"{name} must be [{rows}, {dim}] or [{batch}, {rows}, {dim}] ([M, d] or [B, M, d] "
                         f"with M = layout.num_write), got {list(mem.shape)}")
    if mem.dtype != dtype:
        raise TypeError(f"{name} has dtype {mem.dtype}; the inputs are {dtype}")
    if mem.device != device:
        raise ValueError(f"{name} is on {mem.device}; the inputs are on {device}")


def check_run_inputs(layout, step, memory, input_ids, embedding_weight, inputs_embeds, attention_mask, write_memory,
                     bounds, segment_bounds):
    """The arguments of ``SegmentDriver.run``, once per run: returns ``(batch, dim, dtype, device,
    bounds, lengths)`` with ``bounds`` checked (or ``segment_bounds(T)``) and ``lengths`` the valid tokens
    per row of ``attention_mask`` (None without padding)."""
    if not callable(step):
        raise TypeError(f"step must be callable, got {type(step).__name__}")
    m, r = layout.num_write, layout.num_read
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    if input_ids is not None:
        if not isinstance(embedding_weight, torch.Tensor) or embedding_weight.dim() != 2:
            raise ValueError("input_ids needs embedding_weight, a [V, d] tensor")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError("input_ids must be a [B, T] tensor")
        check_ids_tensor(input_ids, embedding_weight)
        check_input_ids(input_ids, embedding_weight.shape[0])
        batch, seq_len = input_ids.shape
        dim, dtype, device = embedding_weight.shape[1], embedding_weight.dtype, embedding_weight.device
    else:
        if embedding_weight is not None:
            raise ValueError("embedding_weight is used only with input_ids")
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3:
            raise ValueError("inputs_embeds must be a [B, T, d] tensor")
        batch, seq_len, dim = inputs_embeds.shape
        dtype, device = inputs_embeds.dtype, inputs_embeds.device
    if memory is None:
        if write_memory is None or r:
            raise ValueError("memory ([M, d] or [B, M, d]) is required")
    else:
        check_memory_state("memory", memory, m, batch, dim, dtype, device)
    if write_memory is not None:
        check_memory_state("write_memory", write_memory, m, batch, dim, dtype, device)
    bounds = segment_bounds(seq_len) if bounds is None else check_bounds(bounds, seq_len)
    if not bounds:
        raise ValueError("the sequence is empty (T = 0): nothing to run")
    lengths = None if attention_mask is None else lengths_from_mask(attention_mask, batch, seq_len, device)
    return batch, dim, dtype, device, bounds, lengths


# --------------------------------------------------------------------------- ARMT associative memory

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tensor3(t, name: str, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"{name} must be 3-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    return t


def check_assoc_heads(n_heads, d_mem: int, dim: int) -> int:
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if d_mem % n_heads or dim % n_heads:
        raise ValueError(f"n_heads={n_heads} must divide d_mem={d_mem} and the model dim d={dim}")
    return n_heads


def check_assoc_state(A, z, batch: int, n_heads: int, d_mem: int, dim: int, dtype, state_dtype, device) -> None:
    """``A [B, H, 6 d_mem / H, d / H]`` and ``z [B, H, 6 d_mem / H]`` in ``state_dtype``, the state
    dtype of a ``dtype`` model (the caller's: the launcher contract's ``accum_dtype``)."""
    key = 6 * d_mem // n_heads
    want = {"A": (batch, n_heads, key, dim // n_heads), "z": (batch, n_heads, key)}
    sdt = state_dtype
    for name, t in (("A", A), ("z", z)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != want[name]:
            dims = "[B, H, 6 d_mem / H, d / H]" if name == "A" else "[B, H, 6 d_mem / H]"
            raise ValueError(f"{name} must have shape {list(want[name])} = {dims}, got {list(t.shape)}")
        if t.dtype != sdt:
            raise TypeError(f"{name} has dtype {t.dtype}; the associative state of a {dtype} model is {sdt}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}; expected {device} (the inputs' device)")


def check_flags(**flags) -> None:
    """Each variant flag is a bool (a truthy string or number would silently pick a variant)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_like_rows(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """``t`` has ``ref``'s batch and rows, dtype and device."""
    if t.shape[:2] != ref.shape[:2]:
        raise ValueError(f"{name} {list(t.shape)} must have {ref_name}'s batch and rows {list(ref.shape[:2])}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; expected {ref_name}'s {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device}; expected {ref_name}'s device {ref.device}")


def check_assoc_read(x, q, A, z, n_heads, state_dtype) -> int:
    """Arguments of ``assoc_read`` (``state_dtype``: what A and z must be for x's dtype); returns
    ``n_heads``."""
    _tensor3(x, "x", "[B, N, d]")
    _tensor3(q, "q", "[B, N, d_mem]")
    _check_like_rows("q", q, "x", x)
    heads = check_assoc_heads(n_heads, q.shape[2], x.shape[2])
    check_assoc_state(A, z, x.shape[0], heads, q.shape[2], x.shape[2], x.dtype, state_dtype, x.device)
    return heads


def check_assoc_write(k, v, b, A, z, n_heads, gating, state_dtype) -> int:
    """Arguments of ``assoc_write`` (``A``/``z`` both None before the first segment; ``state_dtype``:
    what they must be for k's dtype); returns ``n_heads``."""
    _tensor3(k, "k", "[B, M, d_mem]")
    _tensor3(v, "v", "[B, M, d]")
    _tensor3(b, "b", "[B, M, H] (or [B, M, d] with gating)")
    _check_like_rows("v", v, "k", k)
    _check_like_rows("b", b, "k", k)
    heads = check_assoc_heads(n_heads, k.shape[2], v.shape[2])
    check_flags(gating=gating)
    want = v.shape[2] if gating else heads
    if b.shape[2] != want:
        what = "d (gating=True: one gate per channel)" if gating else "H (one gate per head)"
        raise ValueError(f"b must have last dim {want} = {what}, got {b.shape[2]}")
    if (A is None) != (z is None):
        raise ValueError("A and z must both be given (a later segment) or both be None (the first segment)")
    if A is not None:
        check_assoc_state(A, z, k.shape[0], heads, k.shape[2], v.shape[2], k.dtype, state_dtype, k.device)
    return heads
