"""How the Triton launchers of every op launch: on the inputs' device, in grids within CUDA's limits.

- Triton launches on the *current* device and its current stream, not the tensors': every launch runs
  under the launchers' device guard, with the device of its tensors (checked on CPU by recording the
  guard around every kernel launch under the interpreter; on two GPUs by running on ``cuda:1`` while
  ``cuda:0`` is current).
- The batch is on grid axis y or z (at most 65535): a larger batch is launched in chunks, checked by
  lowering the limit so that the chunked path runs under the interpreter and equals one launch.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

from rmt_kernels import MemoryLayout, pack_segment, pack_segment_from_ids, segment_attention  # noqa: E402
from rmt_kernels.ops.pack_segment import triton_bwd as pack_bwd  # noqa: E402
from rmt_kernels.ops.pack_segment import triton_fwd as pack_fwd  # noqa: E402
from rmt_kernels.ops.pack_segment import triton_launch as pack_launch  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_bwd as sa_bwd  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_fwd as sa_fwd  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_launch as sa_launch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LAUNCH_MODULES = (sa_launch, pack_launch)
KERNEL_MODULES = (sa_fwd, sa_bwd, pack_fwd, pack_bwd)
KERNELS = {f"{mod.__name__}.{name}" for mod in KERNEL_MODULES for name in vars(mod) if name.endswith("_kernel")}


class _Spy:
    """Stands for a kernel: records each launch (its grid and the guards active around it), then runs it."""

    def __init__(self, kernel, name, record):
        self.kernel, self.name, self.record = kernel, name, record

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.record["launches"].append((self.name, grid, list(self.record["guards"])))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.fixture
def launches(monkeypatch):
    """``{"launches": [(kernel, grid, [devices of the guards active at launch])], "guards": [...]}``."""
    record = {"launches": [], "guards": []}

    def guard(t):
        @contextlib.contextmanager
        def entered():
            record["guards"].append(t.device)
            try:
                yield
            finally:
                record["guards"].pop()

        return entered()

    for mod in LAUNCH_MODULES:
        monkeypatch.setattr(mod, "_device_guard", guard)
    for mod in KERNEL_MODULES:
        for name in list(vars(mod)):
            if name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, _Spy(getattr(mod, name), f"{mod.__name__}.{name}", record))
    return record


def _attention_inputs(b, heads=(2, 1), s=37, p=5, dtype=torch.float32, device="cpu"):
    layout = MemoryLayout(4, 4, "memory_bidirectional")
    n = layout.seq_len(s)
    hq, hkv = heads
    q = torch.randn(b, hq, n, 16, dtype=dtype, device=device)
    k, v = (torch.randn(b, hkv, n, 16, dtype=dtype, device=device) for _ in range(2))
    pk, pv = (torch.randn(b, hkv, p, 16, dtype=dtype, device=device) for _ in range(2))
    lengths = torch.randint(0, s + 1, (b,), device=device)
    return layout, q, k, v, pk, pv, lengths


def _run_attention(layout, q, k, v, pk, pv, lengths):
    """Forward (with its trace) and backward of the triton launchers, prefix gradients included."""
    blocks = {"BLOCK_M": 16, "BLOCK_N": 16}
    out, lse, trace = sa_launch.segment_attention_fwd_triton(q, k, v, pk, pv, lengths, layout, 0.25, config=blocks,
                                                             trace=True)
    dout = torch.randn_like(out)
    *grads, traces = sa_launch.segment_attention_bwd_triton(
        dout, q, k, v, pk, pv, lengths, out, lse, layout, 0.25, True, config={"dq": blocks, "dkdv": blocks},
        trace=True)
    return [out, lse, trace, *grads, *traces.values()]


def _run_pack(b, integer_grads=False, device="cpu"):
    """Every pack launcher, with batched and broadcast memories; ``integer_grads``: gradients of small
    integers, whose float32 sums are exact in any order (the atomic embedding gradient's order varies)."""
    r, s, w, d, vocab = 3, 21, 3, 40, 7
    seg = torch.randn(b, s, d, device=device)
    results = []
    for read, write in ((torch.randn(b, r, d, device=device), torch.randn(b, w, d, device=device)),
                        (torch.randn(r, d, device=device), torch.randn(w, d, device=device))):
        out = torch.empty(b, r + s + w, d, device=device)
        results.append(pack_launch.pack_fwd_triton(seg, read, write, r, w, False, out).clone())
        ids = torch.randint(0, vocab, (b, s), device=device)
        weight = torch.randn(vocab, d, device=device)
        results.append(pack_launch.pack_ids_fwd_triton(ids, weight, read, write, r, w, False, out).clone())
    grad = torch.randn(b, r + s + w, d, device=device)
    if integer_grads:
        grad = torch.randint(-4, 5, grad.shape, device=device).float()
    for broadcast in (False, True):
        results.append(pack_launch.memory_grad_triton(grad, 0, r + s, r, broadcast))
    for deterministic in (False, True):
        results.append(pack_launch.embedding_grad_triton(grad, ids, vocab, r, deterministic))
    return results


# --------------------------------------------------------------------------------------- device guard


@pytest.mark.skipif(not INTERPRET, reason="records the launches of the interpreter (CPU tensors)")
def test_every_launch_runs_under_the_device_guard(launches):
    """Each kernel launch of every launcher happens inside exactly one device guard, given the device of
    the launch's tensors; every kernel of every op is launched."""
    _run_attention(*_attention_inputs(2))
    _run_pack(2)
    assert {name for name, _, _ in launches["launches"]} == KERNELS
    for name, _, guards in launches["launches"]:
        assert guards == [torch.device("cpu")], f"{name} launched outside the device guard: {guards}"
    assert not launches["guards"]


@pytest.mark.parametrize("mod", [pytest.param(sa_launch, id="segment_attention"),
                                 pytest.param(pack_launch, id="pack_segment")])
def test_device_guard_makes_the_tensors_device_current(mod):
    """The guard of a tensor on ``cuda:1`` selects device 1 (built without entering it, so no GPU is
    needed); for a CPU tensor it does nothing."""

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    guard = mod._device_guard(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(mod._device_guard(torch.empty(1)), contextlib.nullcontext)


@pytest.mark.cuda
def test_launch_on_a_device_that_is_not_current():
    """Inputs on ``cuda:1`` with ``cuda:0`` current: every op runs on ``cuda:1`` and equals the same call
    with ``cuda:1`` current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda:1")
    layout, q, k, v, pk, pv, lengths = _attention_inputs(2, dtype=torch.bfloat16, device=dev)
    ids = torch.randint(0, 7, (2, 21), device=dev)
    weight = torch.randn(7, 40, device=dev, requires_grad=True)
    seg = torch.randn(2, 21, 40, device=dev, requires_grad=True)
    mem = torch.randn(3, 40, device=dev, requires_grad=True)
    leaves = (q, k, v, pk, pv)
    for t in leaves:
        t.requires_grad_(True)

    def run():
        out = segment_attention(q, k, v, layout, prefix_k=pk, prefix_v=pv, segment_lengths=lengths, backend="triton")
        packed = pack_segment(seg, MemoryLayout(3, 3), mem, mem, backend="triton")
        from_ids = pack_segment_from_ids(ids, weight, MemoryLayout(3, 3), mem, mem, backend="triton")
        tensors = (out, packed, from_ids)
        grads = torch.autograd.grad(tensors, (*leaves, seg, mem, weight), [torch.ones_like(t) for t in tensors])
        torch.cuda.synchronize(dev)
        return [t.detach() for t in tensors] + list(grads)

    with torch.cuda.device(0):
        other = run()
    with torch.cuda.device(dev):
        current = run()
    for a, b in zip(other, current):
        assert a.device == dev and torch.equal(a, b)


# --------------------------------------------------------------------------------------- grid limit


@pytest.mark.skipif(not INTERPRET, reason="lowers the grid limit under the interpreter")
def test_batch_over_the_grid_limit_is_chunked(monkeypatch, launches):
    """With the grid limit lowered to 2 rows, a batch of 5 runs in 3 launches per kernel (grids within
    the limit) and every output, gradient and trace equals one launch over the whole batch."""
    torch.manual_seed(0)
    attention = _attention_inputs(5)
    whole = _run_attention(*attention)
    pack_whole = _run_pack(5, integer_grads=True)
    single = len(launches["launches"])
    for mod in LAUNCH_MODULES:
        monkeypatch.setattr(mod, "GRID_YZ_MAX", 2)
    torch.manual_seed(0)
    chunked = _run_attention(*_attention_inputs(5))
    pack_chunked = _run_pack(5, integer_grads=True)
    for i, (a, b) in enumerate(zip(whole + pack_whole, chunked + pack_chunked)):
        assert torch.equal(a, b), f"result {i} differs when chunked"
    chunked_launches = launches["launches"][single:]
    assert len(chunked_launches) > 2 * single
    for name, grid, _ in chunked_launches:
        if callable(grid):
            grid = grid({"BLOCK_M": 16, "BLOCK_N": 16})
        assert all(extent <= 2 for extent in grid[1:]), (name, grid)


def test_more_heads_than_the_grid_limit_raise(monkeypatch):
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("triton kernels need TRITON_INTERPRET=1 (CPU) or a CUDA GPU")
    monkeypatch.setattr(sa_launch, "GRID_YZ_MAX", 1)
    layout, q, k, v, pk, pv, lengths = _attention_inputs(1, device="cpu" if INTERPRET else "cuda")
    with pytest.raises(ValueError, match="at most 1 query heads"):
        sa_launch.segment_attention_fwd_triton(q, k, v, pk, pv, lengths, layout, 0.25)
