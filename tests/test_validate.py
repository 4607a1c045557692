"""``rmt-kernels validate``: the dry run end to end (what CI runs), the budget, argument errors, and the
pieces that decide what runs on a lent GPU (test selection and order, stopping a stage at its cap)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from rmt_kernels import cli
from rmt_kernels.bench import SUITES
from rmt_kernels.bench.shapes import shapes_for
from rmt_kernels.tools import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_NAMES = [s.name for s in validate.STAGES]
# What a device run returns: at most 8 files of 16 MiB, 2 folders deep, plain names.
MAX_FILES, MAX_BYTES, NAME = 8, 16 * 2**20, re.compile(r"^[A-Za-z0-9._-]+$")


def _validate(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RMT_KERNELS_BACKEND")}
    return subprocess.run([sys.executable, "-m", "rmt_kernels.cli", "validate", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def _check_device_limits(out) -> None:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= MAX_FILES, files
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        assert len(rel.parts) <= 2 and all(NAME.match(part) for part in rel.parts), rel
        assert p.is_dir() or p.stat().st_size <= MAX_BYTES, rel


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("validate") / "out"
    t0 = time.monotonic()
    proc = _validate("--dry-run", "--out", str(out))
    return out, proc, time.monotonic() - t0


def test_dry_run_runs_every_stage_in_priority_order(dry_run):
    out, proc, seconds = dry_run
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["dry_run"]
    assert [s["stage"] for s in summary["stages"]] == STAGE_NAMES
    status = {s["stage"]: s for s in summary["stages"]}
    for name in ("info", "triton_tests", "attention", "handoff", "step"):
        assert status[name]["status"] == "ok", status[name]
        assert 0 < status[name]["seconds"] <= status[name]["limit_s"] <= status[name]["cap_s"] + 1e-6
    if "overhead" in SUITES:
        assert status["overhead"]["status"] == "ok", status["overhead"]
    else:
        assert status["overhead"]["status"] == "skipped"
        assert status["overhead"]["reason"] == "rmt_kernels.bench.SUITES has no 'overhead' suite"
    assert status["cuda_build"]["status"] == "skipped" and status["cuda_build"]["reason"].startswith("dry run")
    assert status["cuda_tests"]["status"] == "skipped" and "cuda_build" in status["cuda_tests"]["reason"]
    assert seconds < summary["budget_s"]
    # the one-screen summary is printed last and written to summary.txt
    text = (out / "summary.txt").read_text()
    assert proc.stdout.endswith(text)
    assert len(text.splitlines()) <= 40 and all(name in text for name in STAGE_NAMES)


def test_dry_run_output_fits_the_device_limits(dry_run):
    out, _, _ = dry_run
    _check_device_limits(out)
    assert sorted(p.name for p in out.iterdir()) == sorted(validate.FILES)
    assert json.loads((out / "summary.json").read_text())["files"] == sorted(validate.FILES)


def test_dry_run_results(dry_run):
    out, _, _ = dry_run
    tests = json.loads((out / "tests.json").read_text())["triton_tests"]
    # the cuda-marked tests are collected and skip on CPU; the stand-ins pass under the interpreter
    assert tests["passed"] == len(validate.DRY_RUN_TESTS) and tests["failed"] == tests["errors"] == 0
    assert tests["skipped"] == len(tests["order"]) - len(validate.DRY_RUN_TESTS) > 0
    assert tests["order"][-len(validate.DRY_RUN_TESTS):] == list(validate.DRY_RUN_TESTS)
    assert not any(validate.is_cuda_extension_test(i) for i in tests["order"])
    bench = json.loads((out / "bench.json").read_text())
    assert sorted(bench) == sorted(n for n in ("attention", "handoff", "overhead", "step", "armt") if n in SUITES)
    for name, record in bench.items():
        assert record["complete"] and record["rows"], name
        assert {r["status"] for r in record["rows"]} <= {"ok", "skipped"}, name
        assert not any(p == "cuda" or p.endswith(":cuda") for p in record["args"]["providers"]), name
    log = (out / "bench.log").read_text()
    assert "== attention" in log and "[validate" in log


def test_tiny_budget_skips_and_still_writes_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = _validate("--dry-run", "--budget", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and [s["stage"] for s in summary["stages"]] == STAGE_NAMES
    for stage in summary["stages"]:
        assert stage["status"] == "skipped" and stage["reason"].startswith("budget"), stage
    assert (out / "summary.txt").is_file()
    _check_device_limits(out)


def test_later_stages_are_skipped_when_the_budget_runs_out(tmp_path, monkeypatch, capsys):
    # Each fake stage "takes" 100 s of a 480 s budget: the clock is moved, nothing sleeps.
    given = {}

    def fake(run, stage, timeout):
        given[stage.name] = timeout
        run.t0 -= 100.0
        return validate.Outcome("ok", result="fake")

    monkeypatch.setattr(validate, "RUNNERS", {name: fake for name in STAGE_NAMES})
    assert cli.main(["validate", "--dry-run", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    status = {s["stage"]: s for s in summary["stages"]}
    assert list(given) == STAGE_NAMES[:5]
    for name in STAGE_NAMES[:5]:
        assert status[name]["status"] == "ok" and given[name] <= status[name]["cap_s"]
    for name in STAGE_NAMES[5:]:
        assert status[name]["status"] == "skipped" and status[name]["reason"].startswith("budget"), status[name]
    assert "skipped - budget" in capsys.readouterr().out


def test_plan_stage_caps_and_budget():
    stage = validate.Stage("x", "bench", 0.25, 20.0)
    timeout, cap, skip = validate.plan_stage(stage, 480.0, 480.0)
    assert (timeout, cap, skip) == (120.0, 120.0, None)
    timeout, cap, skip = validate.plan_stage(stage, 480.0, 50.0)  # what is left, less grace and reserve
    assert skip is None and timeout == 50.0 - validate.GRACE_S - validate.RESERVE_S
    timeout, _, skip = validate.plan_stage(stage, 480.0, 25.0)
    assert timeout is None and skip.startswith("budget: 25 s left")
    _, cap, _ = validate.plan_stage(stage, 10.0, 10.0)
    assert cap == 20.0  # never below the stage's minimum
    # at the default budget, the stages before the CUDA build leave it and its tests their minimum
    before = sum(s.share for s in validate.STAGES[:-2]) * 480.0
    assert before + sum(s.min_s for s in validate.STAGES[-2:]) < 480.0 - validate.GRACE_S - validate.RESERVE_S


@pytest.mark.parametrize("extra, out_is_file, match", [
    pytest.param(["--budget", "0"], False, "--budget must be a positive", id="zero-budget"),
    pytest.param(["--budget", "-5"], False, "--budget must be a positive", id="negative-budget"),
    pytest.param(["--budget", "inf"], False, "--budget must be a positive", id="infinite-budget"),
    pytest.param([], True, "exists and is not a folder", id="out-is-a-file"),
])
def test_argument_errors_before_any_work(tmp_path, capsys, extra, out_is_file, match):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    out = target if out_is_file else tmp_path / "new"
    assert cli.main(["validate", "--dry-run", "--out", str(out), *extra]) == 2
    assert match in capsys.readouterr().err
    assert target.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_a_real_run_needs_a_gpu(tmp_path, capsys):
    assert cli.main(["validate", "--out", str(tmp_path / "out")]) == 2
    assert "use --dry-run" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_out_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["validate", "--dry-run"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err


def test_a_stage_is_stopped_at_its_cap(tmp_path):
    log = tmp_path / "x.log"
    t0 = time.monotonic()
    rc, timed_out, text = validate.run_process([sys.executable, "-c", "import time; print('started', flush=True); "
                                                "time.sleep(60)"], log, 1.0)
    assert timed_out and rc != 0 and time.monotonic() - t0 < 1.0 + validate.GRACE_S
    assert "started" in text and "killed at the cap" in log.read_text()


def test_triton_selection_order_and_split():
    ids = [
        "tests/test_a_triton.py::test_long[causal-8k-D128-bf16]",
        "tests/test_a_triton.py::test_long[mb-1k-D64-fp32]",
        "tests/test_a_triton.py::test_long[mb-1k-D96-bf16]",
        "tests/test_a_triton.py::test_det[D256]",
        "tests/test_b.py::test_pack[triton]",
        "tests/test_b.py::test_pack[cuda]",
        "tests/test_b_cuda.py::test_anything[S1-D64-bf16]",
        "tests/test_c.py::test_offsets[D64-torch.float32]",
    ]
    assert validate.triton_selection(ids) == [
        "tests/test_b.py::test_pack[triton]",
        "tests/test_a_triton.py::test_det[D256]",
        "tests/test_a_triton.py::test_long[mb-1k-D96-bf16]",
        "tests/test_a_triton.py::test_long[causal-8k-D128-bf16]",
    ]
    assert [i for i in ids if validate.is_cuda_extension_test(i)] == [
        "tests/test_b.py::test_pack[cuda]", "tests/test_b_cuda.py::test_anything[S1-D64-bf16]",
    ]
    assert validate.size_key("t.py::t[S1000-M16-D128-fp16]") == 1000 * 128


def test_log_results_of_a_cut_run():
    text = ("tests/t.py::test_a PASSED [ 25%]\ntests/t.py::test_b SKIPPED (no GPU) [ 50%]\n"
            "tests/t.py::test_c FAILED [ 75%]\ntests/t.py::test_d \n!!! KeyboardInterrupt !!!\n")
    got = validate.log_results(text)
    assert (got["passed"], got["skipped"], got["failed"]) == (1, 1, 1)
    assert got["interrupted_in"] == "tests/t.py::test_d"


def test_bench_units_put_the_rmt_mask_first():
    modes = ("fwd", "fwd+bwd")
    units = validate.bench_units(shapes_for("attention", "cuda", "full"), modes)
    assert all(len(shape.masks) == 1 and unit_modes == modes for shape, unit_modes in units)
    assert sum(len(s.masks) for s in shapes_for("attention", "cuda", "full")) == len(units)
    masks = [shape.masks[0] for shape, _ in units]
    assert masks == sorted(masks, key=validate.MASK_PRIORITY.index)
    handoff = shapes_for("handoff", "cuda", "full")
    assert validate.bench_units(handoff, ("fwd",)) == [(s, ("fwd",)) for s in handoff]
    assert validate.bench_units(handoff[:1], modes) == [(handoff[0], ("fwd",)), (handoff[0], ("fwd+bwd",))]


def test_wrapper_script_installs_without_torch_and_runs_validate():
    path = os.path.join(ROOT, "benchmarks", "gpu_validate.sh")
    text = open(path).read()
    assert "pip install --no-build-isolation --no-deps -e ." in text
    assert 'rmt_kernels.cli validate --out "${OUT:-gpu_validate_out}" "$@"' in text
    assert subprocess.run(["bash", "-n", path]).returncode == 0
