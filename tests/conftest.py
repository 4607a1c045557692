"""Test setup shared by every test file (STYLE.md convention 5).

- ``TRITON_INTERPRET=1`` is set here, at import time and before anything imports triton, so Triton
  kernels run on CPU tensors through the interpreter. It is left alone when the caller set it, and it
  is not set when torch is a CUDA/ROCm build, where Triton tests are meant to run compiled on the GPU
  (set ``TRITON_INTERPRET=1`` yourself to interpret there).
- Every test starts from a seed derived from its node id: reproducible, yet different per test.
- Tests marked ``cuda`` are skipped when ``torch.cuda.is_available()`` is False. The device is queried
  once, at collection time and only if such a test was collected; never at import.
- ``nan_poison``: make an output allocator return NaN-filled tensors, so that an element no kernel
  writes shows up as NaN instead of passing by luck (``torch.empty`` often hands out zeros).

The markers ``cuda`` and ``slow`` are declared in ``pyproject.toml``.
"""

from __future__ import annotations

import functools
import os
import random
import zlib

import torch

if "TRITON_INTERPRET" not in os.environ and torch.version.cuda is None and torch.version.hip is None:
    os.environ["TRITON_INTERPRET"] = "1"

# torch.compile tests must trace this checkout's fake kernels: inductor's on-disk caches do not key on
# a custom op's fake implementation, so a cache left by an older checkout can replay stale strides.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rmt_kernels_inductor_")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items or torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False")
    for item in cuda_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """Seed torch and random from the test's node id."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    random.seed(seed)
    return seed


def _fill_nan(result):
    if isinstance(result, torch.Tensor):
        if result.is_floating_point():
            result.fill_(float("nan"))
        return result
    if isinstance(result, (tuple, list)):
        for item in result:
            _fill_nan(item)
    return result


@pytest.fixture
def nan_poison(monkeypatch):
    """``poison(owner, name)``: wrap the allocator ``owner.name`` so that every floating-point tensor it
    returns (alone or in a tuple/list) is filled with NaN. Undone after the test.

    Example::

        def test_x(nan_poison):
            nan_poison(torch_impl, "alloc_outputs")
            out = segment_attention(q, k, v, layout, backend="torch")  # unwritten rows would be NaN
    """

    def poison(owner, name: str):
        original = getattr(owner, name)

        @functools.wraps(original)
        def poisoned(*args, **kwargs):
            return _fill_nan(original(*args, **kwargs))

        monkeypatch.setattr(owner, name, poisoned)
        return original

    return poison


@pytest.fixture
def device():
    """Where the Triton kernels run: CPU under the interpreter, the GPU when they are compiled."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def poisoned(nan_poison):
    """The Triton launchers' outputs, gradients and delta start as NaN (a test module may define its
    own ``poisoned`` for its backend)."""
    from rmt_kernels.ops.segment_attention import triton_launch

    nan_poison(triton_launch, "alloc_outputs")
    nan_poison(triton_launch, "_bwd_buffers")
