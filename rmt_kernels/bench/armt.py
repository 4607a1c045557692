"""ARMT suite: the associative memory (SPEC §6) per layer and in a whole training step.

Points, per :class:`~.shapes.ArmtShape`:

- ``block`` (modes ``fwd`` and ``fwd+bwd``): one layer's associative work on one later segment: the
  read over the ``S + M`` packed rows (``x + phi(x W_q)^T A / phi(x W_q)^T z``), then the delta-rule
  write of the ``M`` memory rows of its result into ``(A, z)``, projections included (the layer in
  between is left out: it is the same for every provider). ``fwd+bwd`` backpropagates into ``x``,
  every projection and the old state (full BPTT).
- ``step`` (shapes with ``layers > 0``; modes ``fwd`` and ``fwd+bwd``): a whole ARMT forward (and
  backward) over ``segments`` segments of a random GPT-2 or Llama backbone, loss included.

Providers:

- ``rmt_kernels:torch`` / ``rmt_kernels:triton``: ``assoc_read``/``assoc_write`` on that backend
  (the step: :class:`rmt_kernels.integrations.armt.AssociativeRecurrentWrapper` with that backend);
- ``einsum``: the official code's formulation, the peer: ``reference.assoc_read_ref`` /
  ``assoc_write_ref`` (the official einsums, autograd through them); for the step the official
  wrapper's semantics written out (:mod:`.armt_official`), HF ``"sdpa"`` attention, ``torch.cat``.

Every provider's result is checked against a float64 evaluation of the reference (the tolerance rule
of ``_tolerance.py``) before it is timed. Step rows carry the memory measure of the step suite and,
in ``note``, the associative block's share of the step: the block's median time times layers times
segments over the step's median, at the same mode and backend.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from .._tolerance import error_bound
from ..ops.assoc_memory.interface import OP_READ, assoc_read, assoc_write
from ..reference import assoc_read_ref, assoc_write_ref
from .progress import Progress
from .records import TRITON_CPU_REASON, Skip, classify_exception, fill_ratios, make_row, untimed_row
from .shapes import ArmtShape
from .timing import Call, TimingConfig, measure_alternating, summarize

BACKENDS = ("torch", "triton")
PROVIDERS = tuple(f"rmt_kernels:{b}" for b in BACKENDS) + ("einsum",)
PEERS = ("einsum",)
MODES = ("fwd", "fwd+bwd")

Ops = Tuple[Callable, Callable]


def _ops(name: str, device: torch.device) -> Ops:
    """``(read, write)`` of a provider, called as ``read(x, q, A, z)`` / ``write(k, v, b, A, z)``."""
    if name == "einsum":
        return assoc_read_ref, assoc_write_ref
    backend = name.split(":", 1)[1]
    ok, reason = backends.backend_status(OP_READ, backend, device)
    if not ok:
        raise Skip(reason)
    if backend == "triton" and device.type == "cpu":
        raise Skip(TRITON_CPU_REASON)
    return (lambda *a, **kw: assoc_read(*a, backend=backend, **kw),
            lambda *a, **kw: assoc_write(*a, backend=backend, **kw))


# --------------------------------------------------------------------------- block


def block_inputs(shape: ArmtShape, device: torch.device, dtype: torch.dtype) -> dict:
    """Inputs of one block point: ``x [B, S + M, d]``, the four projections, and a later segment's
    state ``(A, z)`` (written by one earlier segment), all leaves that require grad."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    d, dm, h, m = shape.hidden, shape.d_mem, shape.mem_heads, shape.num_mem

    def rnd(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device, dtype)

    x = rnd(shape.batch, shape.segment_len + m, d)
    w = {"wq": rnd(dm, d, scale=d ** -0.5), "wk": rnd(dm, d, scale=d ** -0.5), "wv": rnd(d, d, scale=d ** -0.5),
         "wb": rnd(h, d, scale=d ** -0.5), "bb": rnd(h)}
    with torch.no_grad():
        mem = rnd(shape.batch, m, d)
        A, z = assoc_write_ref(F.linear(mem, w["wk"]), F.linear(mem, w["wv"]), F.linear(mem, w["wb"], w["bb"]),
                               None, None, n_heads=h)
    leaves = {"x": x, **w, "A": A, "z": z}
    return {k: t.requires_grad_(True) for k, t in leaves.items()}


def block(ops: Ops, t: dict, n_heads: int, num_mem: int):
    """Read, then write the memory rows of the result: ``(y, A', z')``."""
    read, write = ops
    x = t["x"]
    y = read(x, F.linear(x, t["wq"]), t["A"], t["z"], n_heads=n_heads)
    m = y[:, -num_mem:]
    A2, z2 = write(F.linear(m, t["wk"]), F.linear(m, t["wv"]), F.linear(m, t["wb"], t["bb"]), t["A"], t["z"],
                   n_heads=n_heads)
    return y, A2, z2


def _check_block(outs, t: dict, shape: ArmtShape, dtype: torch.dtype) -> Optional[str]:
    """Why a provider's block result is wrong (None: within the tolerance rule of the float64 reference,
    with the einsum formulation in ``dtype`` as the baseline)."""
    with torch.no_grad():
        exact = block((assoc_read_ref, assoc_write_ref), {k: v.double() for k, v in t.items()}, shape.mem_heads,
                      shape.num_mem)
        eager = block((assoc_read_ref, assoc_write_ref), t, shape.mem_heads, shape.num_mem)
    for name, got, ref, base in zip(("y", "A'", "z'"), outs, exact, eager):
        if not bool(torch.isfinite(got).all()):
            return f"{name} is not finite"
        err = (got.double() - ref).abs().max().item()
        bound = error_bound(ref, base, dtype if name == "y" else got.dtype)
        if not err <= bound:
            return f"{name} differs from the float64 reference by {err:.3g} (allowed {bound:.3g})"
    return None


def _block_call(ops: Ops, t: dict, shape: ArmtShape, mode: str) -> Call:
    grads = None
    if mode == "fwd+bwd":
        with torch.no_grad():
            outs = block(ops, t, shape.mem_heads, shape.num_mem)
        gen = torch.Generator(device="cpu").manual_seed(2)
        grads = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]

    def run(_state):
        if mode == "fwd":
            with torch.no_grad():
                return block(ops, t, shape.mem_heads, shape.num_mem)
        outs = block(ops, t, shape.mem_heads, shape.num_mem)
        torch.autograd.backward(outs, grads)
        return None

    def prepare(_slot):
        for leaf in t.values():
            leaf.grad = None

    return prepare, run


def _block_point(shape, mode, providers, device, dtype, cfg, env) -> List[dict]:
    t = block_inputs(shape, device, dtype)
    calls: Dict[str, Call] = {}
    outcome: Dict[str, Tuple[str, str]] = {}
    for name in providers:
        try:
            ops = _ops(name, device)
            with torch.no_grad():
                why = _check_block(block(ops, t, shape.mem_heads, shape.num_mem), t, shape, dtype)
            if why is not None:
                outcome[name] = ("failed", why)
            else:
                calls[name] = _block_call(ops, t, shape, mode)
        except Exception as exc:  # noqa: BLE001
            outcome[name] = classify_exception(exc)
    times = measure_alternating(calls, device, cfg) if calls else {}
    dname = str(dtype).replace("torch.", "")
    point = []
    sizes = dict(shape.sizes(), layers=1, segments=1)
    for name in providers:
        base = dict(suite="armt", provider=name, mode=mode, shape=shape.name, series="block", mask="causal",
                    dtype=dname, **sizes,
                    note=f"block: read + write of one layer, d_mem {shape.d_mem}, {shape.mem_heads} head(s)")
        row = untimed_row(env, name, outcome, times.get(name), base)
        point.append(row if row is not None else make_row(env, status="ok", **summarize(times[name]), **base))
    fill_ratios(point, PEERS, dense=None)
    return point


# --------------------------------------------------------------------------- suite


def count_points(shapes: Sequence[ArmtShape], modes: Sequence[str]) -> int:
    modes = [m for m in modes if m in MODES] or list(MODES)
    return sum(len(modes) * (2 if s.layers > 0 else 1) for s in shapes)


def run_armt(
    shapes: Sequence[ArmtShape],
    modes: Sequence[str],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
) -> List[dict]:
    """Block points for every shape, step points for shapes with layers, in ``modes`` (``fwd``,
    ``fwd+bwd``; others are ignored); one row per provider."""
    modes = [m for m in modes if m in MODES] or list(MODES)
    rows: List[dict] = []
    for shape in shapes:
        for mode in modes:
            if progress is not None:
                progress.start(f"armt block {shape.name} {mode}")
            rows.extend(_block_point(shape, mode, providers, device, dtype, cfg, env))
    return rows
