"""Dropout suite: a training step's attention with dropout, forward+backward.

Providers (dropout_p = :data:`DROPOUT_P` on the point's memory mask):

- ``segment_attention:<backend>``: ``segment_attention(q, k, v, layout, dropout_p=p, backend=...)``
  for ``torch`` and ``triton`` (the keep mask drawn inside the call; Triton in the kernels);
- ``sdpa_dense``: ``F.scaled_dot_product_attention`` with the dense boolean mask and ``dropout_p``,
  what a user gets without rmt_kernels (the peer).

The draws differ between providers, so outputs are not compared with each other: each provider's
output is checked finite and of the right shape before timing (``tests/test_dropout.py`` and the
Triton dropout tests check the numbers against the reference with the keep mask a call used).
FLOPs are those of the mask, as in the attention suite (dropout adds elementwise work only).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import backends
from ..layout import attention_flops
from ..ops.segment_attention.interface import OP, segment_attention
from .attention import AttnCase, input_set_bytes, make_call, make_inputs
from .progress import Progress
from .records import TRITON_CPU_REASON, Skip, classify_exception, fill_ratios, make_row, peak_tflops, untimed_row
from .shapes import AttnShape
from .timing import TimingConfig, measure_alternating, rotation_slots, summarize

DROPOUT_P = 0.1
MODE = "fwd+bwd"
BACKENDS = ("torch", "triton")
PROVIDERS = tuple(f"segment_attention:{b}" for b in BACKENDS) + ("sdpa_dense",)
PEERS = ("sdpa_dense",)


def _kernel(backend: str):
    def build(case: AttnCase):
        ok, reason = backends.backend_status(OP, backend, case.device)
        if not ok:
            raise Skip(reason)
        if backend == "triton" and case.device.type == "cpu":
            raise Skip(TRITON_CPU_REASON)
        layout = case.layout
        return (lambda q, k, v: segment_attention(q, k, v, layout, dropout_p=DROPOUT_P, backend=backend)), (
            f"rmt_kernels {backend} backend, dropout in the call"
        )

    return build


def _sdpa_dense(case: AttnCase):
    mask = case.layout.dense_mask(case.shape.segment_len)[:, None].to(case.device)
    gqa = case.gqa
    return (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=DROPOUT_P,
                                                           enable_gqa=gqa)), "dense mask, SDPA's own dropout"


BUILDERS = {**{f"segment_attention:{b}": _kernel(b) for b in BACKENDS}, "sdpa_dense": _sdpa_dense}


def run_dropout(
    shapes: Sequence[AttnShape],
    providers: Sequence[str],
    device: torch.device,
    dtype: torch.dtype,
    cfg: TimingConfig,
    env: dict,
    progress: Optional[Progress] = None,
) -> List[dict]:
    """One point per (shape, mask family), mode ``fwd+bwd``, one row per provider."""
    rows: List[dict] = []
    peak = peak_tflops(env["device_name"], dtype)
    dname = str(dtype).replace("torch.", "")
    for shape in shapes:
        for mask in shape.masks:
            case = AttnCase(shape, mask, dtype, device, (MODE,))
            if progress is not None:
                progress.start(f"dropout {shape.name} {mask}")
            slots = rotation_slots(device, input_set_bytes(shape, dtype))
            inputs = make_inputs(case, slots)
            fns, notes = {}, {}
            outcome: Dict[str, Tuple[str, str]] = {}
            for name in providers:
                try:
                    fns[name], notes[name] = BUILDERS[name](case)
                    with torch.no_grad():
                        out = fns[name](*inputs[0]["nograd"])
                    if out.shape != inputs[0]["nograd"][0].shape or not bool(torch.isfinite(out).all()):
                        outcome[name] = ("failed", "output of the wrong shape or not finite")
                except Exception as exc:  # noqa: BLE001
                    outcome[name] = classify_exception(exc)
            calls = {n: make_call(f, MODE, inputs) for n, f in fns.items() if n not in outcome}
            times = measure_alternating(calls, device, cfg, slots) if calls else {}
            flops = attention_flops(case.layout, shape.batch, shape.heads_q, shape.head_dim, shape.segment_len,
                                    mode=MODE)
            point = []
            for name in providers:
                base = dict(
                    suite="dropout", provider=name, mode=MODE, shape=shape.name, series=shape.series, mask=mask,
                    dtype=dname, **shape.sizes(), note=notes.get(name), flops=flops, peak_tflops=peak,
                )
                row = untimed_row(env, name, outcome, times.get(name), base)
                if row is not None:
                    point.append(row)
                else:
                    stats = summarize(times[name])
                    tflops = flops / (stats["median_ms"] * 1e-3) / 1e12
                    point.append(make_row(env, status="ok", tflops=tflops,
                                          pct_peak=100.0 * tflops / peak if peak else None, **stats, **base))
            fill_ratios(point, PEERS, dense=None)
            rows.extend(point)
            del inputs
    return rows
