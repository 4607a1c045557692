"""Handoff suite: packing ``[memory | segment embeddings | memory]`` for the next segment.

Providers:

- ``pack_segment:<backend>``: ``rmt_kernels.pack_segment(segment, layout, read_memory, write_memory,
  backend=...)`` for ``torch``, ``triton`` and ``cuda``;
- ``torch_cat``: ``torch.cat([memory, segment, memory], dim=1)``, what the official wrapper does;
- ``copy``: ``dst.copy_(src)`` of a contiguous tensor of the packed size, the bandwidth ceiling.

Every provider reads the ``B * N * d`` packed elements once and writes them once, so the bytes moved
are ``2 * B * N * d * itemsize``; GB/s and % of the copy's bandwidth follow. Only the forward is
measured (the backward of a pack is the same bytes split). Outputs are checked equal to ``torch.cat``
before timing.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..layout import MemoryLayout
from ..ops.pack_segment.interface import pack_segment
from .progress import Progress
from .records import TRITON_CPU_REASON, Skip, classify_exception, fill_ratios, make_row, untimed_row
from .shapes import HandoffShape
from .timing import Call, TimingConfig, measure_alternating, rotation_slots, summarize

PACK_BACKENDS = ("torch", "triton", "cuda")
PROVIDERS = tuple(f"pack_segment:{b}" for b in PACK_BACKENDS) + ("torch_cat", "copy")
PEERS = ("torch_cat",)

Fn = Callable[[dict], torch.Tensor]


def _pack(backend: str):
    def build(shape: HandoffShape, device: torch.device) -> Tuple[Fn, Optional[str]]:
        if backend == "triton" and device.type == "cpu":
            raise Skip(TRITON_CPU_REASON)
        layout = MemoryLayout(shape.num_mem, shape.num_mem, mask="causal")

        def fn(x):
            mem = x["memory"]
            return pack_segment(x["segment"], layout, read_memory=mem, write_memory=mem, backend=backend)

        return fn, None

    return build


def _cat(shape: HandoffShape, device: torch.device) -> Tuple[Fn, Optional[str]]:
    return (lambda x: torch.cat([x["memory"], x["segment"], x["memory"]], dim=1)), "official wrapper"


def _copy(shape: HandoffShape, device: torch.device) -> Tuple[Fn, Optional[str]]:
    return (lambda x: x["dst"].copy_(x["src"])), "bandwidth ceiling: the same bytes, one contiguous copy"


BUILDERS = {**{f"pack_segment:{b}": _pack(b) for b in PACK_BACKENDS}, "torch_cat": _cat, "copy": _copy}


def make_inputs(shape: HandoffShape, device: torch.device, dtype: torch.dtype, slots: int) -> List[dict]:
    """``segment [B, S, d]``, ``memory [B, M, d]``, and ``src``/``dst [B, N, d]`` for the copy."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    n = shape.segment_len + 2 * shape.num_mem
    out = []
    for _ in range(slots):
        def rnd(rows):
            return torch.randn(shape.batch, rows, shape.dim, generator=gen).to(device, dtype)

        out.append({
            "segment": rnd(shape.segment_len), "memory": rnd(shape.num_mem),
            "src": rnd(n), "dst": torch.empty(shape.batch, n, shape.dim, device=device, dtype=dtype),
        })
    return out


def moved_bytes(shape: HandoffShape, dtype: torch.dtype) -> int:
    """Bytes every provider moves: the ``B * N * d`` packed elements read once and written once."""
    return 2 * shape.batch * (shape.segment_len + 2 * shape.num_mem) * shape.dim * dtype.itemsize


def run_handoff(
    shapes: Sequence[HandoffShape],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
) -> List[dict]:
    """One point per shape (mode ``fwd``), one row per provider."""
    rows: List[dict] = []
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        if progress is not None:
            progress.start(f"handoff {shape.name}")
        nbytes = moved_bytes(shape, dtype)
        slots = rotation_slots(device, nbytes)
        inputs = make_inputs(shape, device, dtype, slots)
        expected = torch.cat([inputs[0]["memory"], inputs[0]["segment"], inputs[0]["memory"]], dim=1)
        fns: Dict[str, Fn] = {}
        notes: Dict[str, Optional[str]] = {}
        outcome: Dict[str, Tuple[str, str]] = {}
        for name in providers:
            try:
                fns[name], notes[name] = BUILDERS[name](shape, device)
                if name != "copy":
                    got = fns[name](inputs[0])
                    if got.shape != expected.shape or not torch.equal(got, expected):
                        outcome[name] = ("failed", "output differs from torch.cat")
            except Exception as exc:  # noqa: BLE001
                outcome[name] = classify_exception(exc)
        calls: Dict[str, Call] = {
            name: ((lambda i, sets=inputs: sets[i]), fn) for name, fn in fns.items() if name not in outcome
        }
        times = measure_alternating(calls, device, cfg, slots) if calls else {}
        point = []
        for name in providers:
            base = dict(
                suite="handoff", provider=name, mode="fwd", shape=shape.name, mask=None, dtype=dname,
                **shape.sizes(), note=notes.get(name), bytes=nbytes,
            )
            row = untimed_row(env, name, outcome, times.get(name), base)
            if row is not None:
                point.append(row)
            else:
                stats = summarize(times[name])
                gbps = nbytes / (stats["median_ms"] * 1e-3) / 1e9
                point.append(make_row(env, status="ok", gbps=gbps, **stats, **base))
        copy = next((r for r in point if r["provider"] == "copy" and r["status"] == "ok"), None)
        if copy is not None:
            for row in point:
                if row["status"] == "ok":
                    row["pct_copy_bw"] = 100.0 * row["gbps"] / copy["gbps"]
        fill_ratios(point, PEERS, dense=None)
        rows.extend(point)
        del inputs, expected
    return rows
