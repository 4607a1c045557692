"""Overhead suite: the per-call time of each public op against its stock counterpart.

At a tiny shape the call, not the math, is the cost (argument checks, backend resolution, autograd
and custom-op dispatch); at a GPT-2 RMT layer's shape the math takes over. A point is
``(op, mask family, shape, mode, execution)``:

- op ``segment_attention`` under ``causal`` and ``memory_bidirectional`` (R = W = ``num_mem``), and
  ``pack_segment`` (one ``[M, d]`` memory fed as both R and W, as the official wrapper does);
- mode ``fwd`` (inputs without grad, under ``no_grad``) or ``fwd+bwd`` (forward, then
  ``torch.autograd.grad`` of every input);
- execution ``eager``, or ``compiled``: both providers wrapped in ``torch.compile(fullgraph=True)``
  (static shapes) and timed after the compiling call. A compile that fails gives a skipped row with
  its reason.

Providers: ``rmt_kernels``, the public call (``segment_attention(q, k, v, layout)``,
``pack_segment(seg, layout, mem, mem)``); ``stock``, SDPA ``is_causal=True`` over the same q, k, v
(for ``memory_bidirectional`` a floor: a cheaper mask than the point's), and
``torch.cat([mem.expand(B, M, d), seg, mem.expand(B, M, d)], 1)`` for the pack.

Timing: the two providers alternate within a point (:func:`~.timing.measure_alternating`); each timed
sample is a batch of calls of one provider (as many as fill :data:`SAMPLE_S`, at most
:data:`MAX_CALLS`: samples of equal length, so that a busy machine's stalls hit both providers alike),
as many samples as fit the profile's time budget (up to
:data:`MAX_SAMPLES`: samples are short here, and a busy machine needs many), and the rows hold the
per-call median, p20 and p80 (``median_ms`` etc., milliseconds per call). On CPU the suite runs with
``torch.set_num_threads(1)`` (restored afterwards); each row's ``device_name`` and ``note`` record the
thread count, and the note says eager or compiled and how many calls a sample made.
Before timing, every provider's output is checked: the attention of ``rmt_kernels`` (and of ``stock``
under ``causal``) against :func:`~rmt_kernels.segment_attention_ref`, the floor against eager SDPA,
the packs against eager ``torch.cat``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..layout import MemoryLayout
from ..ops.pack_segment.interface import pack_segment
from ..ops.segment_attention.interface import segment_attention
from ..reference import segment_attention_ref
from .attention import CHECK_TOL
from .progress import Progress
from .records import classify_exception, device_name, fill_ratios, make_row, untimed_row
from .shapes import OverheadShape
from .timing import Call, TimingConfig, measure_alternating, summarize

PROVIDERS = ("rmt_kernels", "stock")
PEERS = ("stock",)
EXECUTIONS = ("eager", "compiled")
SUITE_MODES = ("fwd", "fwd+bwd")
SAMPLE_S = 0.02  # seconds of calls per timed sample
MAX_CALLS = 5000  # calls per sample at most
MAX_SAMPLES = 31  # samples per provider and point at most, when the profile adapts them to its budget
FLOOR = "floor: is_causal over all N rows, a cheaper mask than this point's"

# Goals of rmt_kernels' time over stock's (CPU, 1 thread, the tiny shape, eager, one run):
# (op, mask, mode) -> the largest ratio that meets the goal.
GOAL_SHAPE = "tiny"
GOALS: Dict[Tuple[str, Optional[str], str], float] = {
    ("segment_attention", "causal", "fwd"): 2.5,
    ("segment_attention", "memory_bidirectional", "fwd"): 4.0,
    ("segment_attention", "causal", "fwd+bwd"): 2.0,
    ("segment_attention", "memory_bidirectional", "fwd+bwd"): 3.0,
    ("pack_segment", None, "fwd"): 8.0,
}

Fn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Point:
    """One point of the suite; its rows carry ``op`` as ``series`` and ``execution`` first in ``note``."""

    op: str
    mask: Optional[str]
    shape: OverheadShape
    mode: str
    execution: str

    @property
    def label(self) -> str:
        mask = f" {self.mask}" if self.mask else ""
        return f"overhead {self.op}{mask} {self.shape.name} {self.mode} {self.execution}"


def points(shapes: Sequence[OverheadShape], modes: Sequence[str]) -> List[Point]:
    """Every point of ``shapes`` for the requested ``modes`` (``bwd`` alone is not a point here)."""
    chosen = [m for m in SUITE_MODES if m in modes]
    out = []
    for shape in shapes:
        variants = [("segment_attention", m) for m in shape.attention_masks] + [("pack_segment", None)]
        for op, mask in variants:
            for mode in chosen:
                out.extend(Point(op, mask, shape, mode, ex) for ex in EXECUTIONS)
    return out


def count_points(shapes: Sequence[OverheadShape], modes: Sequence[str]) -> int:
    return len(points(shapes, modes))


def execution(row: dict) -> str:
    """``"eager"`` or ``"compiled"``: how a row of this suite was run (the first word of its note)."""
    return (row.get("note") or "").split(";")[0]


def goal_for(row: dict) -> Optional[float]:
    """The goal of a row's point (largest ``rmt_kernels / stock`` time ratio), or None."""
    if row["device"] != "cpu" or row["shape"] != GOAL_SHAPE or execution(row) != "eager":
        return None
    return GOALS.get((row["series"], row["mask"], row["mode"]))


# ----------------------------------------------------------------------------------------- providers


def _attention_fns(point: Point) -> Dict[str, Fn]:
    layout = MemoryLayout(point.shape.num_mem, point.shape.num_mem, mask=point.mask)
    return {
        "rmt_kernels": lambda q, k, v: segment_attention(q, k, v, layout),
        "stock": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }


def _pack_fns(point: Point) -> Dict[str, Fn]:
    s = point.shape
    layout = MemoryLayout(s.num_mem, s.num_mem, mask="causal")
    b, m, d = s.batch, s.num_mem, s.dim
    return {
        "rmt_kernels": lambda seg, mem: pack_segment(seg, layout, mem, mem),
        "stock": lambda seg, mem: torch.cat([mem.expand(b, m, d), seg, mem.expand(b, m, d)], 1),
    }


def make_inputs(point: Point, device: torch.device, dtype: torch.dtype) -> dict:
    """``args`` (no grad), ``grad_args`` (the same values, requiring grad) and ``dout`` of a point."""
    s = point.shape
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*size):
        return torch.randn(*size, generator=gen).to(device, dtype)

    if point.op == "segment_attention":
        args = tuple(rnd(s.batch, s.heads, s.seq_len, s.head_dim) for _ in range(3))
        dout = rnd(s.batch, s.heads, s.seq_len, s.head_dim)
    else:
        args = (rnd(s.batch, s.segment_len, s.dim), rnd(s.num_mem, s.dim))
        dout = rnd(s.batch, s.seq_len, s.dim)
    grad_args = tuple(t.detach().clone().requires_grad_() for t in args)
    return {"args": args, "grad_args": grad_args, "dout": dout}


def expected_outputs(point: Point, inputs: dict) -> Dict[str, torch.Tensor]:
    """What each provider's forward must return on ``inputs["args"]``."""
    args = inputs["args"]
    if point.op == "pack_segment":
        seg, mem = args
        b, m, d = seg.shape[0], mem.shape[0], mem.shape[1]
        cat = torch.cat([mem.expand(b, m, d), seg, mem.expand(b, m, d)], 1)
        return {"rmt_kernels": cat, "stock": cat}
    layout = MemoryLayout(point.shape.num_mem, point.shape.num_mem, mask=point.mask)
    with torch.no_grad():
        ref = segment_attention_ref(*args, layout)
        stock = ref if point.mask == "causal" else F.scaled_dot_product_attention(*args, is_causal=True)
    return {"rmt_kernels": ref, "stock": stock}


def _forward(fn: Fn, mode: str, inputs: dict) -> torch.Tensor:
    """One call as it is timed (the backward included), returning the forward output."""
    if mode == "fwd":
        with torch.no_grad():
            return fn(*inputs["args"])
    out = fn(*inputs["grad_args"])
    torch.autograd.grad(out, inputs["grad_args"], inputs["dout"])
    return out.detach()


def make_call(fn: Fn, mode: str, inputs: dict, calls: int) -> Call:
    """``(prepare, run)``: ``run`` makes ``calls`` calls of ``fn`` in ``mode``."""
    if mode == "fwd":
        args = inputs["args"]

        def run_fwd(_):
            with torch.no_grad():
                for _ in range(calls):
                    fn(*args)

        return (lambda i: None), run_fwd
    grad_args, dout = inputs["grad_args"], inputs["dout"]

    def run_fb(_):
        for _ in range(calls):
            torch.autograd.grad(fn(*grad_args), grad_args, dout)

    return (lambda i: None), run_fb


def _check(point: Point, got: torch.Tensor, want: torch.Tensor) -> Optional[str]:
    if got.shape != want.shape:
        return f"output shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    if point.op == "pack_segment":
        return None if torch.equal(got, want) else "output differs from torch.cat"
    atol, rtol = CHECK_TOL.get(want.dtype, (1e-4, 1e-4))
    diff = (got.float() - want.float()).abs()
    if bool((diff <= atol + rtol * want.float().abs()).all()):
        return None
    return f"forward output differs by up to {diff.nan_to_num(float('inf')).max().item():.3g}"


def _compile_failure(exc: BaseException) -> Tuple[str, str]:
    _, reason = classify_exception(exc)
    return "skipped", "torch.compile(fullgraph=True) failed: " + reason


# ----------------------------------------------------------------------------------------- suite


@contextlib.contextmanager
def _suite_settings(device: torch.device) -> Iterator[None]:
    """One CPU thread (on CPU), and room in dynamo's cache for a compiled graph per point; both
    restored afterwards."""
    threads = torch.get_num_threads()
    cfg = torch._dynamo.config
    limits = {k: getattr(cfg, k) for k in ("recompile_limit", "cache_size_limit") if hasattr(cfg, k)}
    try:
        if device.type == "cpu":
            torch.set_num_threads(1)
        for key, value in limits.items():
            setattr(cfg, key, max(value, 256))
        yield
    finally:
        torch.set_num_threads(threads)
        for key, value in limits.items():
            setattr(cfg, key, value)


def _calls_per_sample(fn: Fn, mode: str, inputs: dict, device: torch.device) -> int:
    """How many calls fill :data:`SAMPLE_S` (1 to :data:`MAX_CALLS`), from the median of three timed
    batches (after the checking call): one call each, or 20 when a call takes under a millisecond."""
    batch = 1
    for _ in range(2):
        _, run = make_call(fn, mode, inputs, batch)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            run(None)
            _sync(device)
            times.append(time.perf_counter() - t0)
        per_call = statistics.median(times) / batch
        if batch > 1 or per_call >= 1e-3:
            break
        batch = 20
    return max(1, min(MAX_CALLS, int(SAMPLE_S / max(per_call, 1e-9))))


def _sampling(cfg: TimingConfig) -> TimingConfig:
    """``cfg`` with up to :data:`MAX_SAMPLES` samples when it adapts their number (not for ``--reps``)."""
    if cfg.min_reps == cfg.max_reps:
        return cfg
    return TimingConfig(cfg.warmup, cfg.min_reps, max(cfg.max_reps, MAX_SAMPLES), cfg.budget_s)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run_point(
    point: Point, providers: Sequence[str], device: torch.device, dtype: torch.dtype, cfg: TimingConfig,
    env: dict,
) -> List[dict]:
    inputs = make_inputs(point, device, dtype)
    expected = expected_outputs(point, inputs)
    built = _attention_fns(point) if point.op == "segment_attention" else _pack_fns(point)
    fns: Dict[str, Fn] = {}
    outcome: Dict[str, Tuple[str, str]] = {}
    for name in providers:
        fn = built[name]
        if point.execution == "compiled":
            fn = torch.compile(fn, fullgraph=True, dynamic=False)
        try:
            got = _forward(fn, point.mode, inputs)
            _sync(device)
        except Exception as exc:  # noqa: BLE001 - recorded as the provider's outcome
            outcome[name] = _compile_failure(exc) if point.execution == "compiled" else classify_exception(exc)
            continue
        bad = _check(point, got, expected[name])
        if bad:
            outcome[name] = ("failed", bad)
        else:
            fns[name] = fn
    calls: Dict[str, int] = {}
    for name, fn in fns.items():
        try:
            calls[name] = _calls_per_sample(fn, point.mode, inputs, device)
        except Exception as exc:  # noqa: BLE001
            outcome[name] = classify_exception(exc)
    timed = {name: make_call(fns[name], point.mode, inputs, n) for name, n in calls.items()}
    times = measure_alternating(timed, device, _sampling(cfg)) if timed else {}

    threads = torch.get_num_threads()
    where = device_name(device)
    rows = []
    for name in providers:
        note = f"{point.execution}; {threads} CPU thread{'s' if threads != 1 else ''}"
        if name in calls:
            note += f"; {calls[name]} calls per sample"
        if name == "stock" and point.mask not in (None, "causal"):
            note += "; " + FLOOR
        base = dict(
            suite="overhead", provider=name, mode=point.mode, shape=point.shape.name, series=point.op,
            mask=point.mask, dtype=str(dtype).replace("torch.", ""), **point.shape.sizes(point.op),
            note=note, device_name=where,
        )
        row = untimed_row(env, name, outcome, times.get(name), base)
        if row is None:
            row = make_row(env, status="ok", **summarize([t / calls[name] for t in times[name]]), **base)
        rows.append(row)
    fill_ratios(rows, PEERS, dense=None)
    return rows


def run_overhead(
    shapes: Sequence[OverheadShape],
    modes: Sequence[str],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
) -> List[dict]:
    """Every point of :func:`points`, one row per provider (``ratio_to_best_peer``: stock's time over
    the row's, > 1: faster than stock)."""
    rows: List[dict] = []
    with _suite_settings(device):
        for point in points(shapes, modes):
            if progress is not None:
                progress.start(point.label)
            rows.extend(_run_point(point, providers, device, dtype, cfg, env))
    return rows
