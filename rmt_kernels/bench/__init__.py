"""Benchmark suites of ``rmt-kernels bench``: attention, handoff and one RMT training step.

Each suite measures ``rmt_kernels`` against its peers (SPEC §5) in the same process and run, and
returns result rows (one dict per point, schema :data:`~rmt_kernels.bench.common.ROW_FIELDS`). The
modules import nothing optional at import time: matplotlib, tqdm and transformers are imported when a
suite or the plot needs them.

- :mod:`.common`: shapes (SPEC §4), device peaks, timing, environment capture, the row schema.
- :mod:`.attention`: ``segment_attention`` vs the reference, dense-mask SDPA, FlexAttention, ...
- :mod:`.handoff`: ``pack_segment`` vs ``torch.cat`` vs a plain copy of the same bytes.
- :mod:`.step`: one RMT training step, official semantics vs the ``rmt_kernels`` drop-in.
- :mod:`.plot`: TFLOP/s against segment length per provider (matplotlib PNG).
- :mod:`.cli`: the ``rmt-kernels bench`` command.
"""

SUITES = ("attention", "handoff", "step")

__all__ = ["SUITES"]
