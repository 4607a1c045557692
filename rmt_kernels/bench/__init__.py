"""Benchmark suites of ``rmt-kernels bench``: attention, handoff, one RMT training step and per-call
overhead.

Each suite measures ``rmt_kernels`` against its peers (SPEC §5) in the same process and run, and
returns result rows (one dict per point, schema :data:`~rmt_kernels.bench.records.ROW_FIELDS`). The
modules import nothing optional at import time: matplotlib, tqdm and transformers are imported when a
suite or the plot needs them.

- :mod:`.shapes`: the shape dataclasses and tables (SPEC §4), :func:`~.shapes.shapes_for`.
- :mod:`.timing`: alternating timing of a point's providers, quantiles.
- :mod:`.records`: the row schema, skipped/failed outcomes, device peaks, environment, JSON records.
- :mod:`.progress`: per-point progress on stderr.
- :mod:`.attention`: ``segment_attention`` vs the reference, dense-mask SDPA, FlexAttention, ...
- :mod:`.handoff`: ``pack_segment`` vs ``torch.cat`` vs a plain copy of the same bytes.
- :mod:`.step`: one RMT training step (loss+backward, and with clipping and AdamW), official semantics
  vs the ``rmt_kernels`` drop-in.
- :mod:`.dropout`: attention with dropout (p = 0.1), forward+backward, vs SDPA's dropout with a dense mask.
- :mod:`.armt`: ARMT's associative memory per layer and in a whole step, vs the einsum formulation.
- :mod:`.overhead`: per-call time of each public op vs its stock counterpart, eager and compiled.
- :mod:`.report`: the printed tables; :mod:`.plot`: TFLOP/s against segment length (matplotlib PNG).
- :mod:`.cli`: the ``rmt-kernels bench`` command, which runs the suites of :data:`SUITES`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import armt, attention, dropout, handoff, overhead, report, step
from .plot import plot_attention
from .shapes import shapes_for

# (shapes, modes, providers, device, dtype, timing config, environment, progress) -> rows
Runner = Callable[..., List[dict]]


@dataclass(frozen=True)
class Suite:
    """One suite of ``rmt-kernels bench``: its providers, its runner, how many points it times (for the
    progress), how its table is printed and, if it has one, its plot ``(rows, path, title)``."""

    name: str
    providers: Tuple[str, ...]
    run: Runner
    count_points: Callable[[Sequence, Sequence[str]], int]
    print_rows: Callable[[List[dict], dict], None]
    plot: Optional[Callable[[Sequence[dict], str, str], None]] = None

    def shapes(self, device_type: str, profile: str) -> tuple:
        return shapes_for(self.name, device_type, profile)


def _one_point_per_shape(shapes: Sequence, modes: Sequence[str]) -> int:
    return len(shapes)


def _run_handoff(shapes, modes, *args) -> List[dict]:
    return handoff.run_handoff(shapes, *args)


def _run_step(shapes, modes, *args) -> List[dict]:
    return step.run_step(shapes, *args)


def _run_dropout(shapes, modes, *args) -> List[dict]:
    return dropout.run_dropout(shapes, *args)


SUITES: Dict[str, Suite] = {
    "attention": Suite("attention", attention.PROVIDERS, attention.run_attention, attention.count_points,
                       report.print_attention, plot=plot_attention),
    "handoff": Suite("handoff", handoff.PROVIDERS, _run_handoff, _one_point_per_shape, report.print_handoff),
    "step": Suite("step", step.PROVIDERS, _run_step, lambda shapes, modes: len(step.MODES) * len(shapes),
                  report.print_step),
    "overhead": Suite("overhead", overhead.PROVIDERS, overhead.run_overhead, overhead.count_points,
                      report.print_overhead),
    "dropout": Suite("dropout", dropout.PROVIDERS, _run_dropout, _one_point_per_shape, report.print_dropout),
    "armt": Suite("armt", armt.PROVIDERS, armt.run_armt, armt.count_points, report.print_armt),
}

__all__ = ["SUITES", "Suite"]
