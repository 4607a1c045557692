"""Backend resolution, in one place.

``"auto" | "torch" | "triton" | "cuda"``. ``RMT_KERNELS_BACKEND`` decides what ``"auto"`` means; an
explicit ``backend=`` argument wins over it. Each op registers the backends it implements with
:func:`register`; asking for a backend that cannot run raises :class:`BackendUnavailableError` with the
reason and how to get it. Nothing here imports triton or the compiled extension at module import.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
ENV_BACKEND = "RMT_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here; the message says why and how to get it."""


@dataclass
class BackendImpl:
    """One op's implementation on one backend."""

    fwd: Callable
    bwd: Callable
    dtypes: Tuple[torch.dtype, ...]
    head_dims: Optional[Tuple[int, ...]] = None  # None: any
    devices: Tuple[str, ...] = ("cpu", "cuda")
    extra: Dict[str, object] = field(default_factory=dict)


_REGISTRY: Dict[str, Dict[str, BackendImpl]] = {}


def register(op: str, backend: str, impl: BackendImpl) -> None:
    if backend not in BACKENDS[1:]:
        raise ValueError(f"backend must be one of {BACKENDS[1:]}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def triton_status(device: torch.device) -> Tuple[bool, str]:
    """Whether Triton kernels can run on ``device`` (not counting whether an op has them)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install triton; Linux only)"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, "Triton interpreter (TRITON_INTERPRET=1) on CPU tensors"
        return False, "Triton runs CPU tensors only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
    if device.type != "cuda":
        return False, f"Triton kernels need a CUDA device, got {device.type}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    return True, f"Triton on {torch.cuda.get_device_name(device)}"


def cuda_status(device: torch.device) -> Tuple[bool, str]:
    """Whether the compiled extension ``rmt_kernels._C`` can run on ``device``: installed (built ahead of
    time), or buildable just in time on first use (CUDA torch, nvcc, ninja)."""
    if torch.version.cuda is None:
        return False, "this torch is a CPU-only build; the CUDA backend needs a CUDA build of torch and nvcc"
    if device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if importlib.util.find_spec("rmt_kernels._C") is not None:
        return True, "extension rmt_kernels._C (built ahead of time)"
    from .ops.cuda_build import jit_status

    ok, reason = jit_status()
    if not ok:
        return False, (
            f"the extension rmt_kernels._C is not built and cannot be built just in time here ({reason}); "
            "build it with RMT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation . or `rmt-kernels build`"
        )
    return True, f"extension rmt_kernels._C, {reason}"


def backend_status(op: str, backend: str, device: torch.device) -> Tuple[bool, str]:
    """``(available, reason)`` of one concrete backend for ``op`` on ``device``."""
    impl = _REGISTRY.get(op, {}).get(backend)
    if impl is None:
        return False, f"rmt_kernels {_version()} has no {backend} implementation of {op}"
    if backend == "cuda" and torch.version.cuda is None:
        return cuda_status(device)  # the most basic thing missing: say that first
    if device.type not in impl.devices:
        return False, f"the {backend} backend of {op} does not run on {device.type} tensors"
    if backend == "triton":
        return triton_status(device)
    if backend == "cuda":
        return cuda_status(device)
    return True, "pure PyTorch"


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Turn ``backend`` (possibly "auto") into a concrete backend that can run, or raise."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get(ENV_BACKEND, "").strip()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_BACKEND} must be one of {BACKENDS}, got {env!r}")
            # The variable states a preference for every op; an op that has no such backend at all
            # keeps its automatic choice (a registered backend that cannot run here still raises).
            if env in _REGISTRY.get(op, {}):
                backend = env
    if backend == "auto":
        order = ("triton", "cuda", "torch") if device.type == "cuda" else ("torch",)
        for name in order:
            if backend_status(op, name, device)[0]:
                return name
        raise BackendUnavailableError(f"no backend of {op} can run on {device}")
    ok, reason = backend_status(op, backend, device)
    if not ok:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable for {op} on {device}: {reason}")
    return backend


def get_impl(op: str, backend: str) -> BackendImpl:
    return _REGISTRY[op][backend]


def _version() -> str:
    from . import __version__

    return __version__
