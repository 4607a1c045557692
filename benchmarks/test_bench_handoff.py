"""Handoff points of ``rmt-kernels bench`` as pytest-benchmark tests (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from bench_helpers import median_seconds, skip_or_raise, time_call
from rmt_kernels.bench import handoff, timing

pytest.importorskip("pytest_benchmark")


def test_handoff(benchmark, handoff_point, bench_device, bench_dtype, bench_rounds, bench_env):
    shape, provider = handoff_point
    try:
        fn, note = handoff.BUILDERS[provider](shape, bench_device)
    except Exception as exc:  # noqa: BLE001
        skip_or_raise(exc)
    nbytes = handoff.moved_bytes(shape, bench_dtype)
    slots = timing.rotation_slots(bench_device, nbytes)
    inputs = handoff.make_inputs(shape, bench_device, bench_dtype, slots)
    if provider != "copy":
        x = inputs[0]
        try:
            got = fn(x)
        except Exception as exc:  # noqa: BLE001
            skip_or_raise(exc)
        assert torch.equal(got, torch.cat([x["memory"], x["segment"], x["memory"]], dim=1))
    time_call(benchmark, ((lambda i: inputs[i]), fn), bench_device, bench_rounds, slots)
    median_s = median_seconds(benchmark)
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(
        suite="handoff", provider=provider, mode="fwd", shape=shape.name, note=note, bytes=nbytes,
        gbps=nbytes / median_s / 1e9 if median_s else None, dtype=str(bench_dtype).replace("torch.", ""),
        **shape.sizes(),
    )
