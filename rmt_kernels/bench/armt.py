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
- ``rmt_kernels:torch/ckpt4`` (step only): the same wrapper with ``checkpoint_every=4``, what keeps
  the memory of long inputs flat (one extra forward per step);
- ``rmt_kernels:torch/diagonal`` (step only): the same wrapper with ``schedule="diagonal"`` (SPEC §7):
  ``segments + layers - 1`` grouped steps over stacked per-layer weights instead of ``segments x layers``
  layer calls; its loss is checked against the einsum peer's like the others;
- ``full_attention`` (step only): the plain backbone (no memory) over the whole concatenated sequence
  under causal ``"sdpa"`` attention, the cost ARMT replaces (its loss is another model's: not checked);
  skipped where the sequence exceeds the backbone's positions;
- ``einsum``: the official code's formulation, the peer: ``reference.assoc_read_ref`` /
  ``assoc_write_ref`` (the official einsums, autograd through them); for the step the official
  wrapper's semantics written out (:mod:`.armt_official`), HF ``"sdpa"`` attention, ``torch.cat``.

Every block result is checked against a float64 evaluation of the reference (the tolerance rule of
``_tolerance.py``) before it is timed; every step's loss against the einsum peer's (the drop-in loads
the peer's state dict with ``strict=True``; ``W_mv`` is randomised, since its official zero init
would leave the memory empty). Step rows in ``fwd+bwd`` carry the step's peak memory
(:func:`peak_bytes`) and, in ``note``, the associative block's share of the step where the block was
timed at the same sizes: the block's median times layers times segments over the step's median.
"""

from __future__ import annotations

import copy
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
CKPT = "rmt_kernels:torch/ckpt4"
DIAGONAL = "rmt_kernels:torch/diagonal"
FULL = "full_attention"
STEP_ONLY = (CKPT, DIAGONAL, FULL)
PROVIDERS = tuple(f"rmt_kernels:{b}" for b in BACKENDS) + (CKPT, DIAGONAL, "einsum", FULL)
PEERS = ("einsum",)
MODES = ("fwd", "fwd+bwd")

Ops = Tuple[Callable, Callable]


def _backend(name: str, device: torch.device) -> str:
    """The backend of a ``rmt_kernels:*`` provider; Skip when it cannot run here."""
    backend = name.split(":", 1)[1].split("/")[0]
    ok, reason = backends.backend_status(OP_READ, backend, device)
    if not ok:
        raise Skip(reason)
    if backend == "triton" and device.type == "cpu":
        raise Skip(TRITON_CPU_REASON)
    return backend


def _ops(name: str, device: torch.device) -> Ops:
    """``(read, write)`` of a provider, called as ``read(x, q, A, z)`` / ``write(k, v, b, A, z)``."""
    if name == "einsum":
        return assoc_read_ref, assoc_write_ref
    if name in STEP_ONLY:
        raise Skip(f"{name} is a property of the whole step (schedule, checkpointing or backbone), not of the block")
    backend = _backend(name, device)
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


def block_references(t: dict, shape: ArmtShape):
    """``(exact, eager)``: the einsum formulation on float64 copies of the inputs and in their dtype
    (the tolerance rule's reference and baseline), computed once per point."""
    ops = (assoc_read_ref, assoc_write_ref)
    with torch.no_grad():
        exact = block(ops, {k: v.double() for k, v in t.items()}, shape.mem_heads, shape.num_mem)
        eager = block(ops, t, shape.mem_heads, shape.num_mem)
    return exact, eager


def _check_block(outs, refs, dtype: torch.dtype) -> Optional[str]:
    """Why a provider's block result is wrong (None: within the tolerance rule of the float64 reference,
    with the einsum formulation in ``dtype`` as the baseline; ``refs`` from :func:`block_references`)."""
    exact, eager = refs
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
    refs = block_references(t, shape)
    calls: Dict[str, Call] = {}
    outcome: Dict[str, Tuple[str, str]] = {}
    for name in providers:
        try:
            ops = _ops(name, device)
            with torch.no_grad():
                why = _check_block(block(ops, t, shape.mem_heads, shape.num_mem), refs, dtype)
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


# --------------------------------------------------------------------------- step


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak tensor memory allocated while ``fn()`` runs, above what was allocated before: CUDA's
    allocator peak; on CPU the running sum of the profiler's allocation/free events, in time order."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def _layers_attr(shape: ArmtShape) -> str:
    return "transformer.h" if shape.family == "gpt2" else "model.layers"


def step_modules(shape: ArmtShape, providers: Sequence[str], device: torch.device, dtype: torch.dtype):
    """``{provider: module}`` over copies of one random backbone: the einsum peer (the official
    semantics, HF ``"sdpa"``) and the drop-in per backend, which loads the peer's state dict strictly.
    Raises Skip (per provider: ``{provider: exception}`` in the second result)."""
    import warnings

    from .armt_official import OfficialCell, OfficialWrapper
    from .step import build_backbone

    backbone = build_backbone(shape, device, dtype)
    torch.manual_seed(0)
    official = OfficialWrapper(
        OfficialCell(copy.deepcopy(backbone), shape.num_mem, shape.d_mem, _layers_attr(shape), n_heads=shape.mem_heads),
        shape.segment_len, max_n_segments=shape.segments).to(device, dtype)
    with torch.no_grad():
        for layer in official.memory_cell.layers:
            layer.W_mv.weight.normal_(0.0, shape.hidden ** -0.5)
    modules, failed = {"einsum": official}, {}
    for name in providers:
        if name == "einsum":
            continue
        if name == FULL:
            modules[name] = copy.deepcopy(backbone).to(device, dtype).train()
            continue
        try:
            backend = _backend(name, device)
            from ..integrations.armt import AssociativeMemoryCell, AssociativeRecurrentWrapper

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the announced switch to the rmt_kernels attention
                cell = AssociativeMemoryCell(copy.deepcopy(backbone), shape.num_mem, shape.d_mem,
                                             _layers_attr(shape), n_heads=shape.mem_heads, backend=backend)
            ours = AssociativeRecurrentWrapper(cell, segment_size=shape.segment_len, max_n_segments=shape.segments,
                                               checkpoint_every=4 if name == CKPT else None,
                                               schedule="diagonal" if name == DIAGONAL else "sequential")
            ours = ours.to(device, dtype)
            ours.load_state_dict(official.state_dict(), strict=True)
            modules[name] = ours.train()
        except Exception as exc:  # noqa: BLE001
            failed[name] = exc
    official.train()
    return modules, failed


def _loss(name: str, module):
    if name == "einsum":
        return lambda ids: module(ids, labels=ids)[0]
    if name == FULL:
        def full(ids):
            positions = getattr(module.config, "n_positions", None)
            if positions is not None and ids.shape[1] > positions:
                raise Skip(f"the whole sequence ({ids.shape[1]} tokens) exceeds the backbone's {positions} positions")
            return module(input_ids=ids, labels=ids, use_cache=False).loss
        return full
    return lambda ids: module(input_ids=ids, labels=ids).loss


def _step_point(shape, mode, providers, device, dtype, cfg, env, block_ms) -> List[dict]:
    from .step import LOSS_RTOL

    outcome: Dict[str, Tuple[str, str]] = {}
    modules: Dict[str, object] = {}
    ids = None
    try:
        modules, failed = step_modules(shape, providers, device, dtype)
        outcome.update({n: classify_exception(e) for n, e in failed.items()})
        gen = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.segments * shape.segment_len), generator=gen)
        ids = ids.to(device)
    except Exception as exc:  # noqa: BLE001
        outcome.update({n: classify_exception(exc) for n in providers})
    losses = {}
    for name in providers:
        if name in modules and name not in outcome:
            try:
                with torch.no_grad():
                    losses[name] = float(_loss(name, modules[name])(ids))
            except Exception as exc:  # noqa: BLE001
                outcome[name] = classify_exception(exc)
    if "einsum" in losses:
        for name, value in losses.items():
            tol = LOSS_RTOL.get(dtype, 1e-4) * abs(losses["einsum"])
            if name not in ("einsum", FULL) and not abs(value - losses["einsum"]) <= tol:
                outcome[name] = ("failed", f"loss {value:.6g} differs from the einsum peer's "
                                           f"{losses['einsum']:.6g} (allowed {tol:.3g})")
    calls: Dict[str, Call] = {}
    for name in providers:
        if name not in modules or name in outcome:
            continue
        module, fn = modules[name], _loss(name, modules[name])
        if mode == "fwd":
            def run(_state, f=fn):
                with torch.no_grad():
                    return f(ids)
        else:
            def run(_state, f=fn):
                f(ids).backward()
        calls[name] = ((lambda _slot, m=module: m.zero_grad(set_to_none=True)), run)
    times = measure_alternating(calls, device, cfg) if calls else {}
    dname = str(dtype).replace("torch.", "")
    point = []
    for name in providers:
        base = dict(suite="armt", provider=name, mode=mode, shape=shape.name, series="step", mask="causal",
                    dtype=dname, **shape.sizes())
        row = untimed_row(env, name, outcome, times.get(name), base)
        if row is not None:
            point.append(row)
            continue
        stats = summarize(times[name])
        extra = {}
        if mode == "fwd+bwd":
            module, fn = modules[name], _loss(name, modules[name])
            module.zero_grad(set_to_none=True)
            extra = dict(peak_mem_mb=peak_bytes(lambda: fn(ids).backward(), device) / 2**20,
                         peak_mem_kind="peak tensor memory of one step above its start (CPU: profiler events)")
        notes = []
        block = block_ms.get((name.split("/")[0], mode))
        if block is not None and name != FULL:
            share = 100.0 * block * shape.layers * shape.segments / stats["median_ms"]
            notes.append(f"associative block ~{share:.0f}% of the step")
        flops = step_flops(shape, full=name == FULL) * (3 if mode == "fwd+bwd" else 1)
        notes.append(f"{flops / 1e9:.3g} GFLOP (model) at {flops / (stats['median_ms'] * 1e6):.3g} GFLOP/s")
        extra["note"] = "; ".join(notes)
        point.append(make_row(env, status="ok", **stats, **base, **extra))
    fill_ratios(point, PEERS, dense=None)
    return point


def step_flops(shape: ArmtShape, full: bool = False) -> float:
    """Forward FLOPs of one step (matmuls only; the backward is about twice this): every layer's linears
    and attention (causal: half the square) on each packed segment ``[X | W]``, the associative
    projections, and ``lm_head`` on the X rows; ``full``: the backbone alone over the whole sequence."""
    d, h, kv, hd = shape.hidden, shape.heads, shape.kv_heads, shape.hidden // shape.heads
    if shape.family == "gpt2":
        per_token = 2 * (4 * d * d + 2 * d * shape.intermediate)
    else:
        per_token = 2 * (d * (h + 2 * kv) * hd + h * hd * d + 3 * d * shape.intermediate)
    tokens = shape.segments * shape.segment_len
    head = 2 * d * shape.vocab * tokens * shape.batch
    if full:
        return shape.batch * shape.layers * (per_token * tokens + 2 * h * hd * tokens * tokens) + head
    n = shape.segment_len + shape.num_mem
    assoc = 2 * n * d * shape.d_mem + 2 * shape.num_mem * d * (shape.d_mem + d)  # q; k, v of the memory rows
    per_segment = per_token * n + 2 * h * hd * n * n + assoc
    return shape.batch * shape.layers * shape.segments * per_segment + head


# --------------------------------------------------------------------------- suite


def count_points(shapes: Sequence[ArmtShape], modes: Sequence[str]) -> int:
    modes = [m for m in modes if m in MODES] or list(MODES)
    return sum(len(modes) * (int(s.block) + int(s.layers > 0)) for s in shapes)


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
        block_ms: Dict[Tuple[str, str], float] = {}
        for mode in modes if shape.block else ():
            if progress is not None:
                progress.start(f"armt block {shape.name} {mode}")
            point = _block_point(shape, mode, providers, device, dtype, cfg, env)
            block_ms.update({(r["provider"], mode): r["median_ms"] for r in point if r["status"] == "ok"})
            rows.extend(point)
        for mode in modes if shape.layers > 0 else ():
            if progress is not None:
                progress.start(f"armt step {shape.name} {mode}")
            rows.extend(_step_point(shape, mode, providers, device, dtype, cfg, env, block_ms))
    return rows
