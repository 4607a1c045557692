"""Helpers shared by the pytest-benchmark wrappers (imported by them; not a test module)."""

from __future__ import annotations

import itertools
from typing import Optional

import pytest
import torch

from rmt_kernels.bench import records


def skip_or_raise(exc: BaseException) -> None:
    """pytest.skip for what ``rmt-kernels bench`` records as skipped; re-raise anything else."""
    status, reason = records.classify_exception(exc)
    if status == "skipped":
        pytest.skip(reason)
    raise exc


def time_call(benchmark, call, device: torch.device, rounds: int, slots: int = 1) -> None:
    """One untimed warm-up (compilation), then ``rounds`` timed ``run`` calls, each after an untimed
    ``prepare`` on the next input set."""
    prepare, run = call

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        run(prepare(0))
        sync()
    except Exception as exc:  # noqa: BLE001
        skip_or_raise(exc)
    counter = itertools.count(1)

    def setup():
        state = prepare(next(counter) % slots)
        sync()
        return (state,), {}

    def target(state):
        run(state)
        sync()

    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


def median_seconds(benchmark) -> Optional[float]:
    """Median of the timed rounds in seconds; None under ``--benchmark-disable`` (nothing was timed)."""
    return benchmark.stats.stats.median if benchmark.stats is not None else None
