"""``rmt-kernels aot``: the Triton kernels of every op compiled for sm_80 and sm_90 without a GPU.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit``
functions, which then cannot be compiled). ``--quick`` (attention at head dims 64 and 128, the handoff
at d=768, bfloat16, every config and variant) keeps it around a minute on two cores; the full set is
``rmt-kernels aot``. The other tests here replace the job list or stop before any compile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from rmt_kernels.tools import aot_triton as aot  # noqa: E402

KERNELS = ("segment_attention_fwd", "segment_attention_bwd_dkdv", "segment_attention_bwd_dq")
PACK_KERNELS = ("pack_segment_fwd", "pack_segment_fwd_ids", "pack_memory_grad", "embedding_grad_atomic",
                "embedding_grad_sorted")


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
    from rmt_kernels.ops.segment_attention import aot as sa_aot
    from rmt_kernels.ops.segment_attention import triton_bwd, triton_fwd
    from rmt_kernels.ops.segment_attention.triton_launch import HEAD_DIMS

    for arch in (80, 90):
        jobs = aot.jobs_for(arch, quick=False)
        keys = {(j.kernel, j.dtype, j.head_dim, tuple(sorted(j.config.items()))) for j in jobs if not j.variant}
        assert len(keys) == sum(not j.variant for j in jobs), "duplicate jobs"
        for kernel, configs_fn in (("segment_attention_fwd", triton_fwd.fwd_configs),
                                   ("segment_attention_bwd_dkdv", triton_bwd.dkdv_configs),
                                   ("segment_attention_bwd_dq", triton_bwd.dq_configs)):
            for dtype in sa_aot.DTYPES:
                for d in HEAD_DIMS:
                    for cfg in configs_fn(d, sa_aot._torch_dtype(dtype), arch):
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


ASSOC_KERNELS = ("assoc_read_fwd", "assoc_read_bwd_dq", "assoc_read_bwd_da", "assoc_write_fwd",
                 "assoc_write_bwd_rows", "assoc_write_bwd_dk", "assoc_write_bwd_state")


def _check_compiled_without_spills(rows, kernels, arch, tensor_cores: bool):
    for kernel in kernels:
        mine = [r for r in rows if r["name"] == kernel and r["arch"] == arch]
        assert mine, f"{kernel} sm_{arch} was not compiled"
        for r in mine:
            assert r["error"] is None, r
            assert r["spill_bytes"] == 0, r
            assert r["shared_bytes"] <= aot.SHARED_LIMIT[arch], r
            assert 0 < r["registers"] <= 255, r
            if tensor_cores:
                assert r["uses_mma"], r


@pytest.mark.parametrize("arch", [pytest.param(80, id="sm80"), pytest.param(90, id="sm90")])
def test_pack_kernels_compile_without_spills(quick_results, arch):
    _check_compiled_without_spills(quick_results[1], PACK_KERNELS, arch, tensor_cores=False)


@pytest.mark.parametrize("arch", [pytest.param(80, id="sm80"), pytest.param(90, id="sm90")])
def test_assoc_kernels_compile_without_spills(quick_results, arch):
    # The associative products run on tensor cores (HMMA, HGMMA on sm_90 where tiles allow).
    _check_compiled_without_spills(quick_results[1], ASSOC_KERNELS, arch, tensor_cores=True)


def test_pack_jobs_use_the_launchers_configs():
    from rmt_kernels.ops.pack_segment import aot as pack_aot
    from rmt_kernels.ops.pack_segment import triton_launch

    jobs = [j for j in aot.jobs_for(90, quick=False) if j.op == "pack_segment"]
    assert {j.kernel for j in jobs} == set(PACK_KERNELS)
    for d in pack_aot.DIMS:
        expected = {
            "pack_segment_fwd": triton_launch.pack_config(d),
            "pack_segment_fwd_ids": triton_launch.pack_config(d),
            "pack_memory_grad": triton_launch.memory_grad_config(1 << 20, d),
            "embedding_grad_atomic": triton_launch.embedding_grad_config(1 << 20, d, False),
            "embedding_grad_sorted": triton_launch.embedding_grad_config(1 << 20, d, True),
        }
        for kernel, config in expected.items():
            for dtype in pack_aot.DTYPES:
                assert any(j.kernel == kernel and j.dtype == dtype and j.head_dim == d and j.config == config
                           for j in jobs), (kernel, dtype, d, config)
    # Every value of every constexpr flag of the pack launchers is compiled at least once.
    for kernel, (fn, _, flags) in pack_aot.kernel_table().items():
        seen = {}
        for j in jobs:
            if j.kernel == kernel:
                for key, value in dict(flags, **(j.variant or {})).items():
                    seen.setdefault(key, set()).add(value)
        for key in ("HAS_READ", "HAS_WRITE", "TWO_SLOTS", "REDUCE_BATCH"):
            if key in fn.arg_names:
                assert seen[key] == {False, True}, (kernel, key, seen[key])


def test_aot_prints_progress(quick_results):
    proc, rows = quick_results
    for arch in (80, 90):
        total = sum(r["arch"] == arch for r in rows)
        assert f"compiling {total} kernels for sm_{arch} with " in proc.stderr, proc.stderr
        assert f"sm_{arch}: {total}/{total} compiled" in proc.stderr, proc.stderr


def test_progress_is_printed_and_flushed_per_job(monkeypatch, capsys):
    jobs = [aot.Job("fake_kernel", "bf16", 64, {"BLOCK_M": 64}, 90, op="segment_attention") for _ in range(3)]

    def fake_compile(job):
        return aot.Result(job.kernel, job.config, job.arch, job.dtype, job.head_dim, 32, 0, 0, False, False)

    monkeypatch.setattr(aot, "jobs_for", lambda arch, quick: jobs)
    monkeypatch.setattr(aot, "compile_job", fake_compile)
    monkeypatch.setattr(aot, "PROGRESS_EVERY_S", 0.0)
    results = aot.run_aot(90, workers=1)
    err = capsys.readouterr().err.splitlines()
    assert len(results) == 3 and all(r.ok for r in results)
    assert err[0] == "compiling 3 kernels for sm_90 with 1 worker..."
    assert [line.split("(")[0].strip() for line in err[1:]] == [f"sm_90: {i}/3 compiled" for i in (1, 2, 3)]


@pytest.mark.parametrize("extra", [pytest.param(["--quick"], id="quick"), pytest.param(["--workers", "2"], id="workers")])
def test_cuda_rejects_triton_only_options(monkeypatch, capsys, extra):
    from rmt_kernels import cli
    from rmt_kernels.tools import aot_cuda

    def no_work(*args, **kwargs):
        raise AssertionError("aot --cuda started compiling despite a usage error")

    monkeypatch.setattr(aot_cuda, "main", no_work)
    monkeypatch.setattr(aot_cuda, "compile_cuda_kernels", no_work)
    with pytest.raises(SystemExit) as exc:
        cli.main(["aot", "--cuda", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "argument --cuda: not allowed with " + extra[0] in err, err


# --------------------------------------------------------------------------------------- specializations

_TRITON_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                  torch.int64: "i64"}


def _jit_view(value):
    """What Triton's JIT makes of a runtime argument: ``("constexpr", 1)`` for an integer equal to 1,
    else ``(type, 16-divisible / 16-byte aligned)``."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if value == 1:
        return "constexpr", 1
    return "i32", value % 16 == 0


def _aot_view(kernel, specialization):
    """``{argument: view}`` of the runtime arguments of ``kernel`` as ``rmt-kernels aot`` compiles it."""
    fn, _, flags = aot._kernel_table()[kernel]
    fn = getattr(fn, "kernel", fn)  # the kernel itself while _launched records its launches
    op = next(op for op in aot.OPS if kernel in aot._op_aot(op).kernel_table())
    mod = aot._op_aot(op)
    dtype = "fp16" if op == "segment_attention" else "fp32"
    consts = dict(flags, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, EVEN_D=True, DOT_PREC="ieee", BLOCK_ROWS=16, BLOCK_T=16)
    signature, consts, attrs = aot._signature(fn, consts, lambda name: mod.arg_kind(kernel, name, dtype, consts),
                                              specialization)
    views = {}
    for idx, (name, is_constexpr) in enumerate(aot._params(fn)):
        if not is_constexpr:
            views[name] = ("constexpr", consts[name]) if signature[name] == "constexpr" else (
                signature[name], (idx,) in attrs)
    return fn, flags, views


def _launched(monkeypatch, run):
    """``[(jit function, {argument: value}, constexpr kwargs)]`` of every kernel launch of ``run()``."""
    from rmt_kernels.ops.pack_segment import triton_bwd as pack_bwd
    from rmt_kernels.ops.pack_segment import triton_fwd as pack_fwd
    from rmt_kernels.ops.segment_attention import triton_bwd, triton_fwd

    launches = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                names = [name for name, _ in aot._params(self.kernel)]
                launches.append((self.kernel, dict(zip(names, args)), kwargs))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for mod in (triton_fwd, triton_bwd, pack_fwd, pack_bwd):
        for name in list(vars(mod)):
            if name.endswith("_kernel"):
                kernel = getattr(mod, name)
                monkeypatch.setattr(mod, name, Spy(getattr(kernel, "kernel", kernel)))
    run()
    return launches


def _attention_launches(monkeypatch, heads, s, num_mem, p):
    from rmt_kernels import MemoryLayout
    from rmt_kernels.ops.segment_attention import triton_launch

    def run():
        layout = MemoryLayout(num_mem, num_mem, "memory_bidirectional")
        hq, hkv = heads
        n = layout.seq_len(s)
        q = torch.randn(2, hq, n, 16, dtype=torch.float16)
        k, v = (torch.randn(2, hkv, n, 16, dtype=torch.float16) for _ in range(2))
        pk, pv = (torch.randn(2, hkv, p, 16, dtype=torch.float16) for _ in range(2))
        lengths = torch.tensor([s, s // 2])
        out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, lengths, layout, 0.25)
        triton_launch.segment_attention_bwd_triton(torch.randn_like(out), q, k, v, pk, pv, lengths, out, lse, layout,
                                                   0.25, True)

    return _launched(monkeypatch, run)


def _pack_launches(monkeypatch):
    from rmt_kernels.ops.pack_segment import triton_launch

    def run():
        b, r, s, d, vocab = 16, 16, 32, 64, 7
        seg = torch.randn(b, s, d)
        read = torch.randn(r, d)
        out = torch.empty(b, 2 * r + s, d)
        ids = torch.randint(0, vocab, (b, s))
        triton_launch.pack_fwd_triton(seg, read, read, r, r, True, out)
        triton_launch.pack_ids_fwd_triton(ids, torch.randn(vocab, d), read, read, r, r, True, out)
        triton_launch.memory_grad_triton(out, 0, r + s, r, True)
        for deterministic in (False, True):
            triton_launch.embedding_grad_triton(out, ids, vocab, r, deterministic)

    return _launched(monkeypatch, run)


def _check_views(launches, specialization, kernels):
    for kernel in kernels:
        fn, flags, expected = _aot_view(kernel, specialization)
        mine = [(args, kw) for f, args, kw in launches
                if getattr(f, "fn", f) is getattr(fn, "fn", fn) and all(kw.get(k, v) == v for k, v in flags.items())]
        assert mine, f"{kernel} was not launched with its heaviest flags"
        got = {name: _jit_view(value) for name, value in mine[0][0].items()}
        diff = {name: (got[name], expected[name]) for name in got if got[name] != expected[name]}
        assert not diff, f"{kernel} ({specialization}): argument: (JIT, aot)\n{diff}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_common_specialization_is_what_the_jit_compiles(monkeypatch):
    """A launch with every size a multiple of 16 (N, P, memory and segment lengths, 16 heads, d = 64) and no
    grouped-query heads: each kernel argument is what the ``common`` job compiles (16-divisible, equal to
    1 and constant, or neither), as Triton's JIT specializes it."""
    _check_views(_attention_launches(monkeypatch, (16, 16), 32, 16, 16), "common", KERNELS
                 + ("segment_attention_bwd_preprocess",))
    _check_views(_pack_launches(monkeypatch), "common", PACK_KERNELS)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_generic_specialization_is_what_the_jit_compiles(monkeypatch):
    """A launch with sizes that are neither multiples of 16 nor 1 (N = 27, 3 query heads per K/V head):
    each attention kernel argument is what the ``generic`` job compiles."""
    _check_views(_attention_launches(monkeypatch, (6, 2), 19, 4, 5), "generic", KERNELS
                 + ("segment_attention_bwd_preprocess",))


def test_every_config_is_compiled_in_the_common_specialization():
    for quick in (False, True):
        jobs = aot.jobs_for(90, quick=quick)
        configs = {(j.kernel, j.dtype, j.head_dim) for j in jobs if not j.variant}
        common = {(j.kernel, j.dtype, j.head_dim) for j in jobs if j.specialization == "common"}
        assert configs == common
        if not quick:
            assert sum(j.specialization == "common" for j in jobs) == len([j for j in jobs if not j.variant])


def test_quick_reports_both_specializations(quick_results):
    _, rows = quick_results
    for arch in (80, 90):
        for kernel in KERNELS + PACK_KERNELS:
            specs = {r["specialization"] for r in rows if r["name"] == kernel and r["arch"] == arch}
            assert specs == {"generic", "common"}, (kernel, arch, specs)
    assert all(r["error"] is None and r["spill_bytes"] == 0 for r in rows if r["specialization"] == "common")


# --------------------------------------------------------------------------------------- dropout


def test_dropout_variant_is_compiled_for_every_dropout_config():
    """Every config the launchers can run with dropout (``configs_fn(..., dropout=True)``) is a job of the
    ``DROPOUT`` variant, and the debug kernel of the dropout mask is compiled too; in the quick list, the
    dropout variant of each quick head dim."""
    from rmt_kernels.ops.segment_attention import aot as sa_aot
    from rmt_kernels.ops.segment_attention import triton_bwd, triton_fwd
    from rmt_kernels.ops.segment_attention.triton_launch import HEAD_DIMS

    for arch in (80, 90):
        for quick in (False, True):
            jobs = aot.jobs_for(arch, quick=quick)
            dropout = {(j.kernel, j.dtype, j.head_dim, tuple(sorted(j.config.items())))
                       for j in jobs if j.variant == {"DROPOUT": True}}
            dims = sa_aot.QUICK_HEAD_DIMS if quick else HEAD_DIMS
            dtypes = sa_aot.QUICK_DTYPES if quick else sa_aot.DTYPES
            for kernel, configs_fn in (("segment_attention_fwd", triton_fwd.fwd_configs),
                                       ("segment_attention_bwd_dkdv", triton_bwd.dkdv_configs),
                                       ("segment_attention_bwd_dq", triton_bwd.dq_configs)):
                for dtype in dtypes:
                    for d in dims:
                        for cfg in configs_fn(d, sa_aot._torch_dtype(dtype), arch, True):
                            assert (kernel, dtype, d, tuple(sorted(cfg.items()))) in dropout, (arch, kernel, d, cfg)
            assert any(j.kernel == "segment_attention_dropout_mask" for j in jobs)


def test_dropout_rows_compile_without_spills(quick_results):
    _, rows = quick_results
    for arch in (80, 90):
        mine = [r for r in rows if r["arch"] == arch and r["variant"] == "DROPOUT=1"]
        assert {r["name"] for r in mine} == set(KERNELS), arch
        for r in mine:
            assert r["error"] is None and r["spill_bytes"] == 0 and r["uses_mma"], r
        mask = [r for r in rows if r["arch"] == arch and r["name"] == "segment_attention_dropout_mask"]
        assert mask and all(r["error"] is None and r["spill_bytes"] == 0 for r in mask), mask


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="records launches under the interpreter")
def test_dropout_specialization_is_what_the_jit_compiles(monkeypatch):
    """A dropout launch with every size a multiple of 16: each argument of the forward, dK/dV and dQ
    kernels (the int64 seed, the dropout probability, the batch start, the key offset) is what the
    ``DROPOUT`` job compiles in the common specialization, as Triton's JIT specializes it."""
    from rmt_kernels import MemoryLayout
    from rmt_kernels.ops.segment_attention import aot as sa_aot
    from rmt_kernels.ops.segment_attention import triton_launch

    def run():
        layout = MemoryLayout(16, 16, "memory_bidirectional")
        n = layout.seq_len(32)
        q = torch.randn(2, 16, n, 16, dtype=torch.float16)
        k, v = (torch.randn(2, 16, n, 16, dtype=torch.float16) for _ in range(2))
        pk, pv = (torch.randn(2, 16, 16, 16, dtype=torch.float16) for _ in range(2))
        lengths, seed = torch.tensor([32, 16]), torch.tensor([12345], dtype=torch.int64)
        out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, lengths, layout, 0.25, 0.3, seed)
        triton_launch.segment_attention_bwd_triton(torch.randn_like(out), q, k, v, pk, pv, lengths, out, lse, layout,
                                                   0.25, True, 0.3, seed)

    launches = _launched(monkeypatch, run)
    for kernel in KERNELS:
        fn, _, flags = aot._kernel_table()[kernel]
        fn = getattr(fn, "kernel", fn)
        flags = dict(flags, DROPOUT=True)
        consts = dict(flags, BLOCK_M=16, BLOCK_N=16, BLOCK_D=16, EVEN_D=True, DOT_PREC="ieee")
        kinds = dict(consts)
        signature, consts, attrs = aot._signature(fn, consts, lambda name: sa_aot.arg_kind(kernel, name, "fp16", kinds),
                                                  "common")
        expected = {}
        for idx, (name, is_constexpr) in enumerate(aot._params(fn)):
            if not is_constexpr:
                expected[name] = ("constexpr", consts[name]) if signature[name] == "constexpr" else (
                    signature[name], (idx,) in attrs)
        mine = [args for f, args, kw in launches
                if getattr(f, "fn", f) is getattr(fn, "fn", fn) and all(kw.get(k, v) == v for k, v in flags.items())]
        assert mine, f"{kernel} was not launched with dropout and its heaviest flags"
        got = {name: _jit_view(value) for name, value in mine[0].items()}
        assert got["Seed"] == ("*i64", True) and got["B_START"] == ("i32", True), got
        diff = {name: (got[name], expected[name]) for name in got if got[name] != expected[name]}
        assert not diff, f"{kernel}: argument: (JIT, aot)\n{diff}"


# --------------------------------------------------------------------------------------- SASS of sm_90

# The attention kernels' designed sm_90 pipeline, read from the SASS (``sass_summary``; its parser is
# tested on hand-written listings in test_aot_sass.py): bfloat16 from the quick run, float16 compiled here.
SM90_DTYPES = ("bf16", "fp16")
SM90_DIMS = (64, 128)
_SM90_KERNELS = ("segment_attention_fwd", "segment_attention_bwd_dkdv")
_COMPILE_FP16 = """
import json, sys
from dataclasses import asdict
from rmt_kernels.tools import aot_triton as aot
jobs = [j for j in aot.jobs_for(90, quick=False) if j.kernel in sys.argv[1].split(",") and j.dtype == "fp16"
        and j.head_dim in [int(d) for d in sys.argv[2].split(",")] and not j.variant]
aot.jobs_for = lambda arch, quick: jobs
print(json.dumps([asdict(r) for r in aot.run_aot(90)]))
"""


@pytest.fixture(scope="module")
def fp16_sm90_rows():
    """The forward and dK/dV jobs of float16 at the quick head dims for sm_90 (about ten compiles, in a
    subprocess without ``TRITON_INTERPRET``)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FP16, ",".join(_SM90_KERNELS), ",".join(map(str, SM90_DIMS))],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _sm90_rows(quick_results, fp16_sm90_rows, kernel, dtype, head_dim):
    """The sm_90 rows of ``kernel`` in its heaviest variant (both specializations)."""
    rows = quick_results[1] if dtype == "bf16" else fp16_sm90_rows
    mine = [r for r in rows if r["arch"] == 90 and r["name"] == kernel and r["dtype"] == dtype
            and r["head_dim"] == head_dim and r["variant"] in ("full", "specialization=common")]
    assert mine, f"{kernel} {dtype} D={head_dim} sm_90 was not compiled"
    return mine


def _hgmma_widths(row) -> set:
    """The N widths of the HGMMA shapes (``64x128x16``: 128) of a row."""
    return {int(shape.split("x")[1]) for shape in row["hgmma_shapes"]}


def test_quick_json_reports_the_sass(quick_results):
    _, rows = quick_results
    for row in rows:
        for field in ("hgmma_shapes", "uses_tma", "mma_loops", "main_loop"):
            assert field in row, field
    for kernel in KERNELS:
        for r in [r for r in rows if r["name"] == kernel and r["error"] is None and r["dtype"] == "bf16"]:
            loop = r["main_loop"]
            assert loop is not None and r["mma_loops"] and loop in r["mma_loops"], r
            if r["arch"] == 90:
                assert r["hgmma_shapes"] and loop["hgmma"] and loop["warpgroup_waits"] >= 1, r
            else:
                assert r["hgmma_shapes"] == {} and not r["uses_tma"] and loop["hmma"] > 0, r


@pytest.mark.parametrize("head_dim", [pytest.param(d, id=f"D{d}") for d in SM90_DIMS])
@pytest.mark.parametrize("dtype", SM90_DTYPES)
def test_forward_tma_configs_load_through_tma_with_wide_hgmma(quick_results, fp16_sm90_rows, dtype, head_dim):
    """Each (dtype, D) has forward configs flagged ``TMA: True``; their SASS loads through TMA
    (``UTMALDG``) and every HGMMA is at least 64 wide (N >= 64)."""
    rows = _sm90_rows(quick_results, fp16_sm90_rows, "segment_attention_fwd", dtype, head_dim)
    tma = [r for r in rows if r["config"].get("TMA")]
    assert tma, f"no forward config with TMA: True for {dtype} D={head_dim}: {[r['config'] for r in rows]}"
    for r in tma:
        assert r["error"] is None, r
        assert r["uses_tma"], f"no UTMALDG in the forward {r['config']} ({r['specialization']})"
        assert r["hgmma_shapes"] and min(_hgmma_widths(r)) >= 64, (r["config"], r["hgmma_shapes"])


@pytest.mark.parametrize("head_dim", [pytest.param(d, id=f"D{d}") for d in SM90_DIMS])
@pytest.mark.parametrize("dtype", SM90_DTYPES)
def test_dkdv_has_a_config_with_wide_hgmma(quick_results, fp16_sm90_rows, dtype, head_dim):
    """At least one dK/dV config of each (dtype, D) runs every HGMMA at least 64 wide (N >= 64: the
    ``BLOCK_M >= 64`` configs)."""
    rows = _sm90_rows(quick_results, fp16_sm90_rows, "segment_attention_bwd_dkdv", dtype, head_dim)
    wide = [r["config"] for r in rows if r["error"] is None and r["hgmma_shapes"] and min(_hgmma_widths(r)) >= 64]
    assert wide, f"every dK/dV config of {dtype} D={head_dim} has an HGMMA narrower than 64: " + "; ".join(
        f"{r['config']}: {r['hgmma_shapes']}" for r in rows)


@pytest.mark.parametrize("head_dim", [pytest.param(d, id=f"D{d}") for d in SM90_DIMS])
@pytest.mark.parametrize("dtype", SM90_DTYPES)
def test_sm90_forward_and_dkdv_compile_without_spills(quick_results, fp16_sm90_rows, dtype, head_dim):
    for kernel in _SM90_KERNELS:
        for r in _sm90_rows(quick_results, fp16_sm90_rows, kernel, dtype, head_dim):
            assert r["error"] is None and r["spill_bytes"] == 0, (kernel, r["config"], r["error"], r["spill_bytes"])
