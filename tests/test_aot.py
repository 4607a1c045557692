"""``rmt-kernels aot``: the Triton kernels compiled for sm_80 and sm_90 without a GPU.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``
functions, which then cannot be compiled). ``--quick`` (head dims 64 and 128, bfloat16, every config)
keeps it around a minute on two cores; the full set is ``rmt-kernels aot``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from rmt_kernels.tools import aot_triton as aot  # noqa: E402

KERNELS = ("segment_attention_fwd", "segment_attention_bwd_dkdv", "segment_attention_bwd_dq")


def _run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "rmt_kernels.cli", "aot", *args], capture_output=True, text=True,
                          env=env, timeout=1200)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    path = tmp_path_factory.mktemp("aot") / "aot.json"
    proc = _run_cli("--arch", "80", "--arch", "90", "--quick", "--json", str(path))
    return proc, json.loads(path.read_text()) if path.exists() else None


def test_aot_quick_passes_on_both_arches(quick_results):
    proc, rows = quick_results
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows, "no JSON written"
    for field in ("name", "config", "arch", "registers", "spill_bytes", "shared_bytes", "uses_wgmma"):
        assert all(field in row for row in rows), field
    assert {row["arch"] for row in rows} == {80, 90}
    assert all(row["error"] is None for row in rows), [row["error"] for row in rows if row["error"]]
    # The table lists every job, one line each, under its arch.
    assert "sm_80" in proc.stdout and "sm_90" in proc.stdout
    assert proc.stdout.count("segment_attention_fwd ") == sum(r["name"] == "segment_attention_fwd" for r in rows)


@pytest.mark.parametrize("head_dim", [pytest.param(64, id="D64"), pytest.param(128, id="D128")])
@pytest.mark.parametrize("arch", [pytest.param(80, id="sm80"), pytest.param(90, id="sm90")])
def test_attention_kernels_use_tensor_cores_without_spills(quick_results, arch, head_dim):
    _, rows = quick_results
    for kernel in KERNELS:
        mine = [r for r in rows if r["name"] == kernel and r["arch"] == arch and r["head_dim"] == head_dim
                and r["dtype"] == "bf16"]
        assert mine, f"{kernel} D={head_dim} sm_{arch} was not compiled"
        for r in mine:
            assert r["spill_bytes"] == 0, r
            assert r["shared_bytes"] <= aot.SHARED_LIMIT[arch], r
            assert 0 < r["registers"] <= 255, r
            assert r["uses_mma"], r  # tensor-core products, not FMA loops
            if arch == 90:
                assert r["uses_wgmma"], f"{kernel} {r['config']} has no HGMMA on sm_90"


def test_every_launchable_config_is_a_job():
    from rmt_kernels.ops.segment_attention import triton_bwd, triton_fwd
    from rmt_kernels.ops.segment_attention.triton_launch import HEAD_DIMS

    for arch in (80, 90):
        jobs = aot.jobs_for(arch, quick=False)
        keys = {(j.kernel, j.dtype, j.head_dim, tuple(sorted(j.config.items()))) for j in jobs if not j.variant}
        assert len(keys) == sum(not j.variant for j in jobs), "duplicate jobs"
        for kernel, configs_fn in (("segment_attention_fwd", triton_fwd.fwd_configs),
                                   ("segment_attention_bwd_dkdv", triton_bwd.dkdv_configs),
                                   ("segment_attention_bwd_dq", triton_bwd.dq_configs)):
            for dtype in aot.DTYPES:
                for d in HEAD_DIMS:
                    for cfg in configs_fn(d, aot._torch_dtype(dtype), arch):
                        assert (kernel, dtype, d, tuple(sorted(cfg.items()))) in keys
        assert {j.kernel for j in jobs} == set(aot._kernel_table())
        # Every value of every constexpr flag of the launchers is compiled at least once.
        for kernel, (fn, _, flags) in aot._kernel_table().items():
            seen = {}
            for j in jobs:
                if j.kernel == kernel:
                    for key, value in dict(flags, **(j.variant or {})).items():
                        seen.setdefault(key, set()).add(value)
            for key in ("MASK", "PREFIX_ALL", "HAS_PREFIX", "IS_PREFIX", "HAS_LENGTHS", "TRACE"):
                if key in fn.arg_names:
                    expected = {0, 1, 2} if key == "MASK" else {False, True}
                    assert seen[key] == expected, (kernel, key, seen[key])


def test_aot_refuses_the_interpreter():
    proc = _run_cli("--arch", "90", "--quick", env_extra={"TRITON_INTERPRET": "1"})
    assert proc.returncode == 2
    assert "unset TRITON_INTERPRET" in proc.stderr


def test_spill_or_shared_overflow_fails(monkeypatch, capsys):
    def fake_run(arch, quick=False, workers=None):
        base = dict(config={"BLOCK_M": 64}, arch=arch, dtype="bf16", head_dim=64, registers=255,
                    uses_wgmma=True, uses_mma=True)
        return [
            aot.Result("ok_kernel", spill_bytes=0, shared_bytes=1024, **base),
            aot.Result("spilling_kernel", spill_bytes=64, shared_bytes=1024, **base),
            aot.Result("big_kernel", spill_bytes=0, shared_bytes=aot.SHARED_LIMIT[arch] + 1, **base),
        ]

    monkeypatch.setattr(aot, "run_aot", fake_run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    args = argparse.Namespace(arch=[90], json=None, quick=True, workers=1, cuda=False)
    assert aot.run(args) == 1
    out = capsys.readouterr()
    assert "SPILL" in out.out and "SHARED OVER LIMIT" in out.out and "2 FAILED" in out.err
