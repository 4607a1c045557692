"""Step points of ``rmt-kernels bench`` (one RMT training step) as pytest-benchmark tests."""

from __future__ import annotations

import pytest
import torch

from bench_helpers import skip_or_raise, time_call
from rmt_kernels.bench import step

pytest.importorskip("pytest_benchmark")


def test_step(benchmark, step_point, bench_device, bench_dtype, bench_rounds, bench_env):
    shape, provider = step_point
    try:
        backbone = step.build_backbone(shape, bench_device, bench_dtype)
        module = step.OfficialRMT(backbone, shape.num_mem, shape.segment_len, shape.segments)
        if provider == "rmt_kernels":
            module = step.drop_in(module, shape)
    except Exception as exc:  # noqa: BLE001
        skip_or_raise(exc)
    gen = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.segments * shape.segment_len), generator=gen)
    ids = ids.to(bench_device)
    loss_fn = step.loss_fn(provider, module)
    call = (lambda _slot: module.zero_grad(set_to_none=True), lambda _state: loss_fn(ids).backward())
    time_call(benchmark, call, bench_device, min(bench_rounds, 10))
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(
        suite="step", provider=provider, mode="fwd+bwd", shape=shape.name,
        dtype=str(bench_dtype).replace("torch.", ""), **shape.sizes(),
    )
