"""pytest-benchmark wrappers around the suites of ``rmt_kernels.bench``.

    pytest benchmarks --benchmark-json=out.json                          # quick shapes, cuda if present
    pytest benchmarks --bench-profile full --bench-device cuda --benchmark-json=out.json

The points come from the same shape tables as ``rmt-kernels bench`` (``rmt_kernels.bench.shapes``).
pytest-benchmark times wall clock; on CUDA each timed call ends with a synchronisation. The command
``rmt-kernels bench`` (CUDA events, alternating providers) is the reference measurement; these
wrappers exist to feed pytest-benchmark's comparison and history tools. ``pytest tests`` never
collects this folder.
"""

from __future__ import annotations

import pytest
import torch

from rmt_kernels.bench import attention, handoff, records, shapes, step


def pytest_addoption(parser):
    group = parser.getgroup("rmt_kernels benchmarks")
    group.addoption("--bench-device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    group.addoption("--bench-profile", choices=("quick", "full", "tiny"), default="quick")
    group.addoption("--bench-dtype", choices=tuple(shapes.DTYPES), default=None,
                    help="default: float32 on CPU, bfloat16 on CUDA")
    group.addoption("--bench-rounds", type=int, default=None, help="timed rounds per point")


def _device(config) -> torch.device:
    name = config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pytest_generate_tests(metafunc):
    config = metafunc.config
    device, profile = _device(config), config.getoption("--bench-profile")
    if "attn_point" in metafunc.fixturenames:
        params = [
            pytest.param((shape, mask, mode, provider), id=f"{shape.name}-{mask}-{mode}-{provider}")
            for shape in shapes.shapes_for("attention", device.type, profile)
            for mask in shape.masks
            for mode in (shapes.QUICK_MODES if profile == "quick" else shapes.MODES)
            for provider in attention.PROVIDERS
        ]
        metafunc.parametrize("attn_point", params)
    if "handoff_point" in metafunc.fixturenames:
        params = [
            pytest.param((shape, provider), id=f"{shape.name}-{provider}")
            for shape in shapes.shapes_for("handoff", device.type, profile)
            for provider in handoff.PROVIDERS
        ]
        metafunc.parametrize("handoff_point", params)
    if "step_point" in metafunc.fixturenames:
        params = [
            pytest.param((shape, provider), id=f"{shape.name}-{provider}")
            for shape in shapes.shapes_for("step", device.type, profile)
            for provider in step.PROVIDERS
        ]
        metafunc.parametrize("step_point", params)


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    device = _device(pytestconfig)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: torch sees no CUDA device")
    return device


@pytest.fixture(scope="session")
def bench_dtype(pytestconfig, bench_device) -> torch.dtype:
    name = pytestconfig.getoption("--bench-dtype")
    if name:
        return shapes.DTYPES[name]
    return torch.bfloat16 if bench_device.type == "cuda" else torch.float32


@pytest.fixture(scope="session")
def bench_env(bench_device) -> dict:
    return records.environment(bench_device)


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_device) -> int:
    rounds = pytestconfig.getoption("--bench-rounds")
    if rounds is not None:
        return rounds
    return 50 if bench_device.type == "cuda" else 5
