"""Handoff points of ``rmt-kernels bench`` as pytest-benchmark tests (see conftest.py)."""

from __future__ import annotations

import pytest
import torch

from bench_helpers import skip_or_raise, time_call
from rmt_kernels.bench import common, handoff

pytest.importorskip("pytest_benchmark")


def test_handoff(benchmark, handoff_point, bench_device, bench_dtype, bench_rounds, bench_env):
    shape, provider = handoff_point
    try:
        fn, note = handoff.BUILDERS[provider](shape, bench_device)
    except Exception as exc:  # noqa: BLE001
        skip_or_raise(exc)
    n = shape.segment_len + 2 * shape.num_mem
    nbytes = 2 * shape.batch * n * shape.dim * bench_dtype.itemsize
    slots = common.rotation_slots(bench_device, nbytes)
    inputs = handoff.make_inputs(shape, bench_device, bench_dtype, slots)
    if provider != "copy":
        x = inputs[0]
        try:
            got = fn(x)
        except Exception as exc:  # noqa: BLE001
            skip_or_raise(exc)
        assert torch.equal(got, torch.cat([x["memory"], x["segment"], x["memory"]], dim=1))
    time_call(benchmark, ((lambda i: inputs[i]), fn), bench_device, bench_rounds, slots)
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(
        suite="handoff", provider=provider, mode="fwd", shape=shape.name, note=note, bytes=nbytes,
        gbps=nbytes / benchmark.stats.stats.median / 1e9, dtype=str(bench_dtype).replace("torch.", ""),
        **shape.sizes(),
    )
