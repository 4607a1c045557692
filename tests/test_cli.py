"""``rmt-kernels info`` and ``rmt-kernels check`` run on a machine without a GPU."""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys

import pytest
import torch

import rmt_kernels
from rmt_kernels import MemoryLayout, cli
from rmt_kernels.bench import records
from rmt_kernels.tools import diagnose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # A user's shell: no interpreter flag, no backend override (the test process sets TRITON_INTERPRET).
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RMT_KERNELS_BACKEND")}
    return subprocess.run(
        [sys.executable, "-m", "rmt_kernels.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT,
        timeout=600,
    )


def test_info():
    proc = run_cli("info")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for key in ("rmt_kernels", "python", "torch", "triton", "torch CUDA"):
        assert re.search(rf"^\s*{re.escape(key)}: \S", out, re.M), f"missing version line {key!r}:\n{out}"
    assert re.search(rf"^\s*torch: {re.escape(torch.__version__)}$", out, re.M)
    assert re.search(r"^device cpu\b", out, re.M)
    assert re.search(r"^\s*torch: available - ", out, re.M)
    for backend in ("triton", "cuda"):  # available or not, each says why
        assert re.search(rf"^\s*{backend}: (available|unavailable) - \S", out, re.M), out
    assert re.search(r"^\s*auto: -> torch$", out, re.M)
    assert re.search(r"^extension rmt_kernels\._C: \S", out, re.M)


def test_check_passes_on_cpu():
    proc = run_cli("check", "--dtypes", "float32", "bfloat16")
    out = proc.stdout
    assert proc.returncode == 0, f"{out}\n{proc.stderr}"
    assert re.search(r"^device\s+backend\s+dtype\s+case\b.*\bresult$", out, re.M)
    rows = [line for line in out.splitlines() if line.startswith("cpu ")]
    passed = [line for line in rows if re.search(r"\bcpu\s+torch\s+(float32|bfloat16)\b.*\bpass$", line)]
    assert len(passed) == 2 * len(diagnose._check_cases()), out
    for line in passed:  # max errors are printed as numbers
        errors = [float(x) for x in re.findall(r"\d\.\d\de[-+]\d\d", line)]
        assert len(errors) == 2 and all(e < 0.1 for e in errors), line
    assert "FAIL" not in out
    for line in rows:
        assert line.endswith("pass") or "skipped: " in line, line
    assert "all checks passed" in out


def test_check_exit_code_on_failure(monkeypatch, capsys):
    # A failing row must fail the command: break the torch backend's forward for this process.
    from rmt_kernels import backends
    from rmt_kernels.ops.segment_attention.interface import OP

    impl = backends.get_impl(OP, "torch")
    original = impl.fwd

    def wrong(*args, **kwargs):
        out, lse = original(*args, **kwargs)
        return out * 1.5, lse

    monkeypatch.setattr(impl, "fwd", wrong)
    # Eager calls may enter the backend through its eager entry instead: break that one too.
    original_eager = impl.eager

    def wrong_eager(*args, **kwargs):
        out = original_eager(*args, **kwargs)
        return None if out is None else out * 1.5

    monkeypatch.setattr(impl, "eager", wrong_eager)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # only the torch backend runs on CPU tensors
    monkeypatch.setattr(diagnose, "_devices", lambda: [torch.device("cpu")])
    case = ("causal R2 W2 S9", MemoryLayout(2, 2, "causal"), 9, 0, None, (2, 2))
    monkeypatch.setattr(diagnose, "_check_cases", lambda: [case])
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "check(s) FAILED" in out


def test_unknown_subcommand_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["no-such-command"])
    assert info.value.code == 2


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    matches = [ep for ep in scripts if ep.name == "rmt-kernels"]
    assert matches and matches[0].value == "rmt_kernels.cli:main"


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rmt-kernels {rmt_kernels.__version__}"


@pytest.mark.parametrize("argv", [pytest.param([], id="top")] + [
    pytest.param([name], id=name) for name in cli.COMMANDS
])
def test_help_shows_no_markup(capsys, argv):
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: rmt-kernels")
    for markup in ("``", ":mod:", ":func:", ":data:", ":class:", ":meth:"):
        assert markup not in text, text


def test_info_names_the_devices_and_lists_every_op(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu (cpu)" not in out
    assert re.search(rf"^device cpu \({re.escape(records.cpu_name())} \(\d+ threads\)\)$", out, re.M), out
    ops = ("segment_attention", "pack_segment", "pack_segment_from_ids", "assoc_read", "assoc_write")
    for op in ops:
        assert re.search(rf"^\s+{op}$", out, re.M), out
    assert len(re.findall(r"^\s*auto: -> torch$", out, re.M)) == len(ops)
    assert "rmt_kernels has no cuda implementation of assoc_read" in out


def test_info_names_the_extra_that_gets_each_missing_package(monkeypatch, capsys):
    from rmt_kernels import _extension

    monkeypatch.setattr(diagnose.platform, "system", lambda: "Linux")
    monkeypatch.setattr(diagnose, "_installed", lambda module: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    triton = dict(diagnose.missing("triton"))
    assert triton["triton"].startswith('pip install "rmt_kernels[triton]"')
    assert any("TRITON_INTERPRET=1" in what for what in triton)
    assert any(what.startswith("numpy") for what in triton)
    assert diagnose.missing("torch") == []

    monkeypatch.setattr(torch.version, "cuda", None)
    ((what, how),) = diagnose.missing("cuda")
    assert "CUDA build of torch" in what and how.endswith('pip install "rmt_kernels[cuda]"')

    # a CUDA torch without nvcc, ninja or a GPU, and no extension built ahead of time
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_extension, "aot_available", lambda: False)
    monkeypatch.setattr(_extension, "_cuda_home", lambda: None)
    monkeypatch.setattr(diagnose.shutil, "which", lambda name: None)
    cuda = diagnose.missing("cuda")
    assert [what.split(",")[0] for what, _ in cuda] == ["nvcc", "ninja", "a CUDA GPU"]
    assert dict(cuda)["ninja, to build the extension"] == 'pip install "rmt_kernels[cuda]"'

    monkeypatch.setattr(diagnose, "missing", lambda backend: [("triton", "pip install x")] if backend == "triton" else [])
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\s*triton: missing triton -> pip install x$", out, re.M), out
    assert re.search(r"^\s*torch: nothing missing$", out, re.M), out
    assert re.search(r"^\s*cuda: nothing missing$", out, re.M), out
