"""Attention points of ``rmt-kernels bench`` as pytest-benchmark tests (see conftest.py)."""

from __future__ import annotations

import pytest

from bench_helpers import median_seconds, skip_or_raise, time_call
from rmt_kernels.bench import attention, records, timing
from rmt_kernels.layout import attention_flops

pytest.importorskip("pytest_benchmark")


def test_attention(benchmark, attn_point, bench_device, bench_dtype, bench_rounds, bench_env):
    shape, mask, mode, provider = attn_point
    case = attention.AttnCase(shape, mask, bench_dtype, bench_device, (mode,))
    try:
        built = attention.BUILDERS[provider](case)
    except Exception as exc:  # noqa: BLE001
        skip_or_raise(exc)
    if mode in (built.mode_skips or {}):
        pytest.skip(built.mode_skips[mode])
    slots = timing.rotation_slots(bench_device, attention.input_set_bytes(shape, bench_dtype))
    inputs = attention.make_inputs(case, slots)
    if not records.is_speed_of_light({"note": built.note}) and provider not in ("reference", "sdpa_dense"):
        oracle = attention.BUILDERS["sdpa_dense"](case)
        bad = attention.check_outputs(case, {"sdpa_dense": oracle.fn, provider: built.fn}, {}, inputs)
        if provider in bad:
            status, reason = bad[provider]
            if status == "skipped":
                pytest.skip(reason)
            pytest.fail(reason)
    time_call(benchmark, attention.make_call(built.fn, mode, inputs), bench_device, bench_rounds, slots)
    flops = attention_flops(case.layout, shape.batch, shape.heads_q, shape.head_dim, shape.segment_len, mode=mode)
    median_s = median_seconds(benchmark)
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(
        suite="attention", provider=provider, mode=mode, shape=shape.name, mask=mask,
        dtype=str(bench_dtype).replace("torch.", ""), note=built.note, flops=flops,
        tflops=flops / median_s / 1e12 if median_s else None, **shape.sizes(),
    )
