"""Attention suite: ``segment_attention`` against its peers (SPEC §5) on the shapes of SPEC §4.

Providers (every one computes the point's exact mask unless said otherwise):

- ``reference``: :func:`~rmt_kernels.segment_attention_ref` (dense mask, float32 math).
- ``sdpa_dense``: ``F.scaled_dot_product_attention`` with the dense boolean mask of
  :meth:`MemoryLayout.dense_mask`, built once outside the timed region (what lucidrains does).
- ``sdpa_composed``: the ``rmt_kernels`` torch backend, ``segment_attention(backend="torch")``: stock
  SDPA calls, one per mask block, merged by log-sum-exp.
- ``flex``: ``torch.nn.attention.flex_attention`` compiled with ``torch.compile``, with a ``BlockMask``
  built once from a ``mask_mod`` reading :meth:`MemoryLayout.key_end`.
- ``sdpa_causal``: ``is_causal=True`` over the packed sequence. Exact for ``mask="causal"``; for the
  other families it computes a *different* (cheaper) mask and is shown as the "speed of light" of
  stock kernels, never as a peer.
- ``triton``, ``cuda``: ``segment_attention(backend=...)`` where the backend is available.

Modes: ``fwd`` (inputs without grad, under ``no_grad``), ``bwd`` (the forward runs untimed before each
timed backward), ``fwd+bwd``. FLOPs come from the mask (:func:`~rmt_kernels.attention_flops`).
Before timing, every exact provider's forward output is checked against the reference (or dense SDPA
when the reference does not fit): a mismatch is recorded as a failed row, never timed.
"""

from __future__ import annotations

import gc
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from ..layout import MemoryLayout, attention_flops
from ..ops.segment_attention.interface import OP, segment_attention
from ..reference import segment_attention_ref
from .progress import Progress
from .records import (
    SPEED_OF_LIGHT,
    TRITON_CPU_REASON,
    Skip,
    classify_exception,
    fill_ratios,
    is_speed_of_light,
    make_row,
    peak_tflops,
    untimed_row,
)
from .shapes import MODES, AttnShape
from .timing import Call, TimingConfig, measure_alternating, rotation_slots, summarize

PROVIDERS = ("reference", "sdpa_dense", "sdpa_composed", "flex", "sdpa_causal", "triton", "cuda")
PEERS = ("reference", "sdpa_dense", "sdpa_composed", "flex", "sdpa_causal")

# Forward-output check before timing: |provider - oracle| <= atol + rtol * |oracle| per input dtype
# (a few units in the last place of the output dtype: a sanity check that the provider computes this
# mask, not a tolerance test -- tests/ hold those).
CHECK_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 8e-3), torch.bfloat16: (3e-2, 3e-2)}

Fn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Built:
    """A provider ready for one case: ``fn(q, k, v) -> out`` (None when no requested mode can run),
    a note for its rows, and ``{mode: reason}`` for modes it cannot run."""

    fn: Optional[Fn]
    note: Optional[str] = None
    mode_skips: Optional[Dict[str, str]] = None


@dataclass(frozen=True)
class AttnCase:
    """One point family: a shape under one mask family, dtype and device."""

    shape: AttnShape
    mask: str
    dtype: torch.dtype
    device: torch.device
    modes: Tuple[str, ...] = MODES

    @property
    def layout(self) -> MemoryLayout:
        return MemoryLayout(self.shape.num_read, self.shape.num_write, mask=self.mask)

    @property
    def gqa(self) -> bool:
        return self.shape.heads_q != self.shape.heads_kv


# ----------------------------------------------------------------------------------------- providers


def _reference(case: AttnCase) -> Built:
    if case.device.type == "cuda":
        s = case.shape
        # about six float32 [B, H, N, N] tensors alive at once: scores, masked scores, exponentials,
        # probabilities, and their gradients in the backward
        need = 6 * 4 * s.batch * s.heads_q * s.seq_len * s.seq_len
        free, _ = torch.cuda.mem_get_info(case.device)
        if need > 0.6 * free:
            raise Skip(f"the dense reference needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    layout = case.layout
    return Built(lambda q, k, v: segment_attention_ref(q, k, v, layout))


def _sdpa_dense(case: AttnCase) -> Built:
    mask = case.layout.dense_mask(case.shape.segment_len)[:, None].to(case.device)  # [1, 1, N, N]
    gqa = case.gqa
    return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa))


def _sdpa_composed(case: AttnCase) -> Built:
    layout = case.layout
    note = "rmt_kernels torch backend"
    return Built(lambda q, k, v: segment_attention(q, k, v, layout, backend="torch"), note)


def _sdpa_causal(case: AttnCase) -> Built:
    gqa = case.gqa
    note = None if case.mask == "causal" else SPEED_OF_LIGHT
    return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa), note)


_FLEX = {}


def _compiled_flex():
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        # Each case compiles its own graphs (fwd, fwd+bwd); allow far more than dynamo's default.
        # Static shapes: the CPU inductor has emitted uncompilable C++ for flex with dynamic=True.
        cfg = torch._dynamo.config
        for key in ("recompile_limit", "cache_size_limit"):
            if hasattr(cfg, key):
                setattr(cfg, key, max(getattr(cfg, key), 256))
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _flex_cpu_grad_probe() -> Optional[str]:
    """Why FlexAttention cannot run backward on CPU (its own error message), or None if it can.

    Probed with a tiny eager call with grad-requiring inputs, so no compilation is spent on it."""
    from torch.nn.attention.flex_attention import flex_attention

    x = torch.zeros(1, 1, 16, 16, requires_grad=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flex_attention(x, x, x).sum().backward()
    except NotImplementedError as exc:
        return f"NotImplementedError: {str(exc).strip().splitlines()[0]}"
    except Exception:  # noqa: BLE001 - the timed calls will report whatever else is wrong
        return None
    return None


def _flex(case: AttnCase) -> Built:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as exc:
        raise Skip(f"torch {torch.__version__} has no FlexAttention: {exc}") from exc
    mode_skips = {}
    if case.device.type == "cpu":
        reason = _flex_cpu_grad_probe()
        if reason:
            mode_skips = {"bwd": reason, "fwd+bwd": reason}
    if all(m in mode_skips for m in case.modes):
        return Built(None, None, mode_skips)
    n = case.shape.seq_len
    key_end = case.layout.key_end(case.shape.segment_len).to(case.device)  # [N]: row i sees keys j < key_end[i]

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx < key_end[q_idx]

    block_mask = create_block_mask(mask_mod, None, None, n, n, device=case.device)
    fn = _compiled_flex()
    gqa = case.gqa
    note = "torch.compile(flex_attention), cached BlockMask"
    return Built(lambda q, k, v: fn(q, k, v, block_mask=block_mask, enable_gqa=gqa), note, mode_skips)


def _backend(name: str):
    def build(case: AttnCase) -> Built:
        ok, reason = backends.backend_status(OP, name, case.device)
        if not ok:
            raise Skip(reason)
        if case.device.type == "cpu" and name == "triton":
            raise Skip(TRITON_CPU_REASON)
        layout = case.layout
        note = f"rmt_kernels {name} backend"
        return Built(lambda q, k, v: segment_attention(q, k, v, layout, backend=name), note)

    return build


BUILDERS = {
    "reference": _reference,
    "sdpa_dense": _sdpa_dense,
    "sdpa_composed": _sdpa_composed,
    "flex": _flex,
    "sdpa_causal": _sdpa_causal,
    "triton": _backend("triton"),
    "cuda": _backend("cuda"),
}


def _exception_outcome(provider: str, exc: BaseException) -> Tuple[str, str]:
    status, reason = classify_exception(exc)
    compile_error = type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))
    if provider == "flex" and status == "failed" and compile_error:
        return "skipped", "torch.compile cannot build FlexAttention here: " + reason
    return status, reason


# ----------------------------------------------------------------------------------------- calls


def input_set_bytes(shape: AttnShape, dtype: torch.dtype) -> int:
    """Bytes of one input set (q, k, v and dout) of ``shape``: what the CUDA timing rotates over."""
    return 2 * (shape.heads_q + shape.heads_kv) * shape.seq_len * shape.head_dim * dtype.itemsize * shape.batch


def make_inputs(case: AttnCase, slots: int) -> List[dict]:
    """``slots`` independent input sets: q ``[B, H_q, N, D]``, k/v ``[B, H_kv, N, D]``, dout like q."""
    s = case.shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(slots):
        def rnd(h):
            return torch.randn(s.batch, h, s.seq_len, s.head_dim, generator=gen).to(case.device, case.dtype)

        q, k, v, do = rnd(s.heads_q), rnd(s.heads_kv), rnd(s.heads_kv), rnd(s.heads_q)
        grad = tuple(t.detach().requires_grad_() for t in (q, k, v))
        out.append({"nograd": (q, k, v), "grad": grad, "do": do})
    return out


def make_call(fn: Fn, mode: str, inputs: List[dict]) -> Call:
    """``(prepare, run)`` of one provider in one mode; only ``run`` is timed."""
    if mode == "fwd":
        def run_fwd(x):
            with torch.no_grad():
                return fn(*x)

        return (lambda i: inputs[i]["nograd"]), run_fwd
    if mode == "fwd+bwd":
        def run_fb(slot):
            out = fn(*slot["grad"])
            return torch.autograd.grad(out, slot["grad"], slot["do"])

        return (lambda i: inputs[i]), run_fb
    if mode == "bwd":
        def prepare_bwd(i):
            slot = inputs[i]
            return fn(*slot["grad"]), slot["grad"], slot["do"]

        return prepare_bwd, (lambda st: torch.autograd.grad(st[0], st[1], st[2]))
    raise ValueError(f"mode must be one of fwd, bwd, fwd+bwd, got {mode!r}")


# ----------------------------------------------------------------------------------------- suite


def check_outputs(
    case: AttnCase, fns: Dict[str, Fn], notes: Dict[str, Optional[str]], inputs: List[dict]
) -> Dict[str, Tuple[str, str]]:
    """Forward of every exact provider on the first input set, against the reference (or dense SDPA).

    Returns ``{provider: (status, reason)}`` for the providers that failed or could not run.
    """
    bad: Dict[str, Tuple[str, str]] = {}
    outs = {}
    for name, fn in fns.items():
        try:
            with torch.no_grad():
                outs[name] = fn(*inputs[0]["nograd"])
        except Exception as exc:  # noqa: BLE001
            bad[name] = _exception_outcome(name, exc)
    oracle = next((p for p in ("reference", "sdpa_dense") if p in outs), None)
    if oracle is None:
        return bad
    ref = outs[oracle].float()
    atol, rtol = CHECK_TOL.get(case.dtype, (1e-4, 1e-4))
    for name, out in outs.items():
        if name == oracle or is_speed_of_light({"note": notes.get(name)}):
            continue
        diff = (out.float() - ref).abs()
        within = diff <= atol + rtol * ref.abs()  # NaN compares False
        if not bool(within.all()):
            err = diff.nan_to_num(float("inf")).max().item()
            bad[name] = (
                "failed",
                f"forward output differs from {oracle} by up to {err:.3g} (allowed {atol:g} + {rtol:g} * |ref|)",
            )
    return bad


def count_points(shapes: Sequence[AttnShape], modes: Sequence[str]) -> int:
    return sum(len(s.masks) for s in shapes) * len(modes)


def run_attention(
    shapes: Sequence[AttnShape],
    modes: Sequence[str],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
    builders: Optional[Dict[str, Callable]] = None,
) -> List[dict]:
    """Every (shape, mask family, mode) point, one row per provider. ``builders`` overrides
    :data:`BUILDERS` (tests)."""
    builders = builders or BUILDERS
    rows: List[dict] = []
    peak = peak_tflops(env["device_name"], dtype)
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        for mask in shape.masks:
            case = AttnCase(shape, mask, dtype, device, tuple(modes))
            fns: Dict[str, Fn] = {}
            notes: Dict[str, Optional[str]] = {}
            mode_skips: Dict[str, Dict[str, str]] = {}
            outcome: Dict[str, Tuple[str, str]] = {}
            for name in providers:
                try:
                    built = builders[name](case)
                except Exception as exc:  # noqa: BLE001
                    outcome[name] = _exception_outcome(name, exc)
                    continue
                notes[name], mode_skips[name] = built.note, dict(built.mode_skips or {})
                if built.fn is not None:
                    fns[name] = built.fn
            slots = rotation_slots(device, input_set_bytes(shape, dtype))
            inputs = make_inputs(case, slots)
            outcome.update(check_outputs(case, fns, notes, inputs))
            live = {n: f for n, f in fns.items() if n not in outcome}
            for mode in modes:
                if progress is not None:
                    progress.start(f"attention {shape.name} {mask} {mode}")
                calls = {n: make_call(f, mode, inputs) for n, f in live.items() if mode not in mode_skips[n]}
                times = measure_alternating(calls, device, cfg, slots) if calls else {}
                flops = attention_flops(
                    case.layout, shape.batch, shape.heads_q, shape.head_dim, shape.segment_len, mode=mode
                )
                point = []
                for name in providers:
                    base = dict(
                        suite="attention", provider=name, mode=mode, shape=shape.name, series=shape.series,
                        mask=mask, dtype=dname, **shape.sizes(), note=notes.get(name), flops=flops,
                        peak_tflops=peak,
                    )
                    if name not in outcome and mode in mode_skips.get(name, {}):
                        point.append(make_row(env, status="skipped", reason=mode_skips[name][mode], **base))
                        continue
                    row = untimed_row(env, name, outcome, times.get(name), base,
                                      classify=lambda exc, name=name: _exception_outcome(name, exc))
                    if row is not None:
                        point.append(row)
                    else:
                        stats = summarize(times[name])
                        tflops = flops / (stats["median_ms"] * 1e-3) / 1e12
                        point.append(make_row(
                            env, status="ok", tflops=tflops,
                            pct_peak=100.0 * tflops / peak if peak else None, **stats, **base,
                        ))
                fill_ratios(point, PEERS)
                rows.extend(point)
            del inputs, fns, live
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows
