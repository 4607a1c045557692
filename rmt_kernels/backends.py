"""Backend resolution, in one place.

``"auto" | "torch" | "triton" | "cuda"``. Each op's ``interface.py`` builds its backend table from
imports one can read (``{"torch": BackendImpl(fwd=torch_impl..., ...), "triton": ...}``) and hands it
to :func:`register_op`; this module only decides which entry of such a table a call gets.
``RMT_KERNELS_BACKEND`` decides what ``"auto"`` means; an explicit ``backend=`` argument wins over it.
Asking for a backend that cannot run raises :class:`BackendUnavailableError` with the reason and how to
get it. This module imports no build code, no triton and no extension.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .errors import BackendUnavailableError

__all__ = [
    "BACKENDS", "ENV_BACKEND", "BackendImpl", "BackendUnavailableError", "register_op", "table",
    "get_impl", "triton_status", "backend_status", "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_BACKEND = "RMT_KERNELS_BACKEND"

Status = Callable[[torch.device], Tuple[bool, str]]


@dataclass
class BackendImpl:
    """One op's implementation on one backend.

    ``fwd``/``bwd``: the launchers; ``eager``: optionally, a forward for eager calls that runs the
    same kernels through an entry with autograd of its own and returns the output, or None where it
    does not apply; ``dtypes``/``head_dims`` (None: any): what they support;
    ``devices``: device types they run on; ``status``: ``device -> (available, reason)`` for what the
    backend needs beyond the device type (triton installed, the extension built); None: nothing.
    """

    fwd: Callable
    bwd: Callable
    dtypes: Tuple[torch.dtype, ...]
    head_dims: Optional[Tuple[int, ...]] = None
    devices: Tuple[str, ...] = ("cpu", "cuda")
    status: Optional[Status] = None
    eager: Optional[Callable] = None
    dropout: bool = False  # the launchers take dropout_p > 0 (and a seed)
    dropout_mask: Optional[Callable] = None  # debug: the keep mask the launchers use for a seed


_REGISTRY: Dict[str, Dict[str, BackendImpl]] = {}


def register_op(op: str, backend_table: Dict[str, BackendImpl]) -> Dict[str, BackendImpl]:
    """Make ``op``'s backend table known to resolution (``rmt-kernels info`` lists it); returns the
    same dict, which the op's custom ops index directly."""
    for name in backend_table:
        if name not in BACKENDS[1:]:
            raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {name!r}")
    _REGISTRY[op] = backend_table
    return backend_table


def table(op: str) -> Dict[str, BackendImpl]:
    """The backend table of ``op`` (KeyError for an op that registered none)."""
    return _REGISTRY[op]


def get_impl(op: str, backend: str) -> BackendImpl:
    return _REGISTRY[op][backend]


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """Whether Triton kernels can run on ``device`` (not counting whether an op has them)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install \"rmt_kernels[triton]\"; Linux only)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device.type != "cuda":
        return False, f"Triton kernels need a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, f"Triton on {torch.cuda.get_device_name(device)}"


def backend_status(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    """``(available, reason)`` of one concrete backend for ``op`` on ``device``."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return False, f"rmt_kernels has no {backend} implementation of {op}"
    if backend == "cuda" and impl.status is not None and torch.version.cuda is None:
        return impl.status(device)  # the most basic thing missing: say that first
    if device.type not in impl.devices:
        return False, f"the {backend} backend of {op} does not run on {device.type} tensors"
    if impl.status is not None:
        return impl.status(device)
    return True, "pure PyTorch"


def unsupported(impl: BackendImpl, dtype: Optional[torch.dtype], head_dim: Optional[int],
                dropout: bool = False) -> Optional[str]:
    """Why ``impl`` cannot take a call of this dtype, head dim and dropout (None: it can)."""
    if dropout and not impl.dropout:
        return "attention dropout"
    if dtype is not None and dtype not in impl.dtypes:
        return f"dtype {dtype}"
    if head_dim is not None and impl.head_dims is not None and head_dim not in impl.head_dims:
        return f"head dim {head_dim} (supported: {list(impl.head_dims)})"
    return None


_WARNED = set()


def _warn_fallback(op: str, skipped: str, reason: str, chosen: str) -> None:
    key = (op, skipped, reason, chosen)
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"rmt_kernels: the {skipped} backend of {op} does not support {reason}; backend='auto' runs "
            f"it on the {chosen} backend instead (slower). Warned once.",
            RuntimeWarning,
            stacklevel=4,
        )


def resolve_backend(
    op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None,
    head_dim: Optional[int] = None, dropout: bool = False,
) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend that can run, or raise.

    ``"auto"`` takes the fastest backend that runs on ``device`` and supports ``dtype``, ``head_dim``
    and ``dropout`` (when given); passing over a faster one that runs here but not with these warns once.
    An explicit backend (argument or ``RMT_KERNELS_BACKEND``) is never replaced."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    ops = _REGISTRY.get(op, {})
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
            # The variable states a preference for every op; an op that has no such backend at all
            # keeps its automatic choice (a registered backend that cannot run here still raises).
            if env in ops:
                backend = env
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        passed_over = None
        for name in order:
            if not backend_status(op, name, device)[0]:
                continue
            reason = unsupported(ops[name], dtype, head_dim, dropout)
            if reason is None:
                if passed_over is not None:
                    _warn_fallback(op, *passed_over, name)
                return name
            passed_over = passed_over or (name, reason)
        if passed_over is not None:
            return passed_over[0]  # nothing supports the call: the fastest one raises a clear error
        raise BackendUnavailableError(f"no backend of {op} can run on {device}")
    ok, reason = backend_status(op, backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {op} on {device}: {reason}")
    return backend
