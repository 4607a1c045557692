"""The overhead and dropout suites of ``rmt-kernels bench`` on CPU (tiny shapes): every point with its
providers, the goals where they apply, skipped rows with their reasons, the command's output."""

from __future__ import annotations

import json

import pytest
import torch

from rmt_kernels import cli
from rmt_kernels.bench import SUITES, overhead, shapes
from rmt_kernels.bench.timing import TimingConfig

from helpers import check_bench_row

CPU = torch.device("cpu")
ONE_REP = TimingConfig(warmup=1, min_reps=1, max_reps=1, budget_s=0.0)
ENV = {"device": "cpu", "device_name": "test cpu", "torch": torch.__version__, "triton": "x", "cuda": "none",
       "git_commit": "unknown", "git_dirty": None}


# ----------------------------------------------------------------------------------------- overhead


@pytest.fixture(scope="module")
def overhead_tiny():
    """The overhead suite at the tiny profile, eager and compiled (one compile per provider and point)."""
    suite = SUITES["overhead"]
    tiny = suite.shapes("cpu", "tiny")
    threads = torch.get_num_threads()
    rows = suite.run(tiny, ("fwd", "fwd+bwd"), overhead.PROVIDERS, CPU, torch.float32, ONE_REP, ENV)
    return tiny, rows, threads


def _overhead_points(rows):
    out = {}
    for row in rows:
        key = (row["series"], row["mask"], row["shape"], row["mode"], overhead.execution(row))
        out.setdefault(key, {})[row["provider"]] = row
    return out


def test_overhead_tiny_profile_is_the_goal_shape():
    (tiny,) = shapes.shapes_for("overhead", "cpu", "tiny")
    assert (tiny.batch, tiny.heads, tiny.seq_len, tiny.head_dim, tiny.num_mem) == (1, 2, 12, 16, 2)
    assert (tiny.segment_len, tiny.dim) == (8, 16) and tiny.name == overhead.GOAL_SHAPE
    quick = shapes.shapes_for("overhead", "cpu", "quick")
    assert tiny in quick and tiny in shapes.shapes_for("overhead", "cpu", "full")
    gpt2 = [s for s in quick if s.name.startswith("gpt2")]
    assert [(s.heads, s.head_dim, s.segment_len, s.num_mem, s.seq_len, s.dim) for s in gpt2] == [
        (12, 64, 512, 16, 544, 768)
    ]
    assert gpt2[0] in shapes.shapes_for("overhead", "cpu", "full")


def test_overhead_rows_cover_every_point_with_both_providers(overhead_tiny):
    tiny, rows, threads = overhead_tiny
    assert torch.get_num_threads() == threads  # the suite's one thread is restored
    expected = overhead.points(tiny, ("fwd", "fwd+bwd"))
    assert len(rows) == 2 * len(expected) == 2 * 12  # 2 masks + pack, 2 modes, eager and compiled
    by_point = _overhead_points(rows)
    assert set(by_point) == {(p.op, p.mask, p.shape.name, p.mode, p.execution) for p in expected}
    for key, point in by_point.items():
        assert sorted(point) == sorted(overhead.PROVIDERS), key
        for row in point.values():
            check_bench_row(row)
            assert row["suite"] == "overhead" and row["device_name"].endswith("(1 threads)")
            assert "1 CPU thread" in row["note"]
            if key[-1] == "eager":
                assert row["status"] == "ok", (key, row["reason"])
            else:
                assert row["status"] in ("ok", "skipped"), (key, row["reason"])
        ours, stock = point["rmt_kernels"], point["stock"]
        if ours["status"] == stock["status"] == "ok":
            assert ours["best_peer"] == "stock"
            assert ours["ratio_to_best_peer"] == pytest.approx(stock["median_ms"] / ours["median_ms"])
            assert stock["ratio_to_best_peer"] is None
        if key[1] == "memory_bidirectional":
            assert overhead.FLOOR in stock["note"]


def test_overhead_goals_sit_on_the_tiny_eager_cpu_points(overhead_tiny):
    _, rows, _ = overhead_tiny
    goals = {(r["series"], r["mask"], r["mode"]): overhead.goal_for(r) for r in rows if overhead.goal_for(r)}
    assert goals == overhead.GOALS
    assert all(overhead.execution(r) == "eager" for r in rows if overhead.goal_for(r))
    assert overhead.goal_for(dict(rows[0], device="cuda")) is None


def test_overhead_compile_failure_is_a_skipped_row(monkeypatch):
    def no_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("no C++ compiler here")

        return fail

    monkeypatch.setattr(torch, "compile", no_compile)
    (tiny,) = shapes.shapes_for("overhead", "cpu", "tiny")
    rows = overhead.run_overhead([tiny], ("fwd",), overhead.PROVIDERS, CPU, torch.float32, ONE_REP, ENV)
    compiled = [r for r in rows if overhead.execution(r) == "compiled"]
    assert len(compiled) == 2 * 3  # (causal, memory_bidirectional, pack) x both providers
    for row in compiled:
        check_bench_row(row)
        assert row["status"] == "skipped"
        assert row["reason"] == "torch.compile(fullgraph=True) failed: RuntimeError: no C++ compiler here"
    assert all(r["status"] == "ok" for r in rows if overhead.execution(r) == "eager")


def test_cli_overhead_tiny_run_prints_per_call_times_and_goals(tmp_path, capsys):
    out_json = tmp_path / "o.json"
    rc = cli.main(["bench", "--suite", "overhead", "--shapes", "tiny", "--device", "cpu", "--no-progress",
                   "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == 24 and {r["suite"] for r in rows} == {"overhead"}
    assert "== overhead (" in printed and "rmt/stock" in printed
    assert "<= 2.5x" in printed and "<= 8x" in printed


# ----------------------------------------------------------------------------------------- dropout


def test_dropout_suite_times_the_kernel_against_sdpa_dropout():
    suite = SUITES["dropout"]
    (tiny,) = suite.shapes("cpu", "tiny")
    assert tiny.masks == ("memory_bidirectional",)
    assert shapes.shapes_for("dropout", "cpu", "quick") == (shapes.GOAL_SHAPE,)
    rows = suite.run((tiny,), ("fwd+bwd",), suite.providers, CPU, torch.float32, ONE_REP, ENV)
    by = {r["provider"]: r for r in rows}
    assert set(by) == set(suite.providers)
    for row in rows:
        check_bench_row(row)
        assert row["suite"] == "dropout" and row["mode"] == "fwd+bwd"
    assert by["segment_attention:torch"]["status"] == "ok" and by["sdpa_dense"]["status"] == "ok"
    assert by["segment_attention:triton"]["status"] == "skipped"  # CPU without the interpreter's opt-in
    assert by["segment_attention:torch"]["best_peer"] == "sdpa_dense"
    assert by["segment_attention:torch"]["ratio_to_best_peer"] > 0


# ----------------------------------------------------------------------------------------- armt


def test_armt_suite_times_block_and_step_against_the_einsum_formulation():
    pytest.importorskip("transformers", minversion="5")
    from rmt_kernels.bench import armt

    suite = SUITES["armt"]
    (tiny,) = suite.shapes("cpu", "tiny")
    modes = ("fwd", "fwd+bwd")
    rows = suite.run((tiny,), modes, suite.providers, CPU, torch.float32, ONE_REP, ENV)
    assert len(rows) == len(suite.providers) * suite.count_points((tiny,), modes)
    by = {(r["series"], r["mode"], r["provider"]): r for r in rows}
    for row in rows:
        check_bench_row(row)
        assert row["suite"] == "armt"
    for level in ("block", "step"):
        for mode in modes:
            ours, peer = by[level, mode, "rmt_kernels:torch"], by[level, mode, "einsum"]
            assert ours["status"] == "ok" and peer["status"] == "ok", (ours["reason"], peer["reason"])
            assert ours["best_peer"] == "einsum" and ours["ratio_to_best_peer"] > 0
            assert by[level, mode, "rmt_kernels:triton"]["status"] == "skipped"
    for name in (armt.CKPT, armt.DIAGONAL, armt.FULL):
        assert by["block", "fwd", name]["status"] == "skipped"
        for mode in modes:
            assert by["step", mode, name]["status"] == "ok", by["step", mode, name]["reason"]
            assert "GFLOP/s" in by["step", mode, name]["note"]
    step = by["step", "fwd+bwd", "rmt_kernels:torch"]
    assert step["peak_mem_mb"] > 0 and "associative block" in step["note"]


def test_armt_block_check_catches_a_wrong_read():
    """The check before timing fails a provider whose block differs from the reference."""
    from rmt_kernels.bench import armt

    (tiny,) = SUITES["armt"].shapes("cpu", "tiny")
    t = armt.block_inputs(tiny, CPU, torch.float32)
    read, write = armt._ops("einsum", CPU)
    with torch.no_grad():
        good = armt.block((read, write), t, tiny.mem_heads, tiny.num_mem)
        bad = armt.block((lambda *a, **kw: read(*a, **kw) * 1.001, write), t, tiny.mem_heads, tiny.num_mem)
    refs = armt.block_references(t, tiny)
    assert armt._check_block(good, refs, torch.float32) is None
    assert "differs from the float64 reference" in armt._check_block(bad, refs, torch.float32)
