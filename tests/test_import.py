"""``import rmt_kernels`` never needs triton, a GPU or the compiled extension (STYLE.md convention 6).

Each check runs in a fresh interpreter, so nothing this test process imported can hide a problem.
(Starting one costs a torch import, so each subprocess checks several things.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs segment_attention on CPU through "auto" and the torch backend, checks it against the
# reference, and prints the resolved backend and the triton status.
SMOKE = """
import torch
from rmt_kernels import MemoryLayout, segment_attention, segment_attention_ref, backends
from rmt_kernels.ops.segment_attention.interface import OP

layout = MemoryLayout(2, 2, "memory_bidirectional")
q, k, v = (torch.randn(2, 2, 2 + 7 + 2, 16, requires_grad=True) for _ in range(3))
lengths = torch.tensor([7, 3])
out = segment_attention(q, k, v, layout, segment_lengths=lengths, backend="torch")
auto = segment_attention(q, k, v, layout, segment_lengths=lengths)
ref = segment_attention_ref(q, k, v, layout, segment_lengths=lengths)
assert (out - ref).abs().max() < 1e-5 and torch.equal(out, auto)
out.sum().backward()
assert torch.isfinite(q.grad).all()
print("resolved", backends.resolve_backend(OP, "auto", torch.device("cpu")))
print("triton", backends.triton_status(torch.device("cpu")))
"""


def run_python(code: str, env_set=None, env_unset=(), pythonpath_first=None) -> str:
    env = dict(os.environ)
    for name in env_unset:
        env.pop(name, None)
    env.update(env_set or {})
    if pythonpath_first:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath_first, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_import_imports_no_triton_and_env_backend_torch_resolves():
    # Only the import is checked: the first call of any torch.library custom op imports torch._dynamo,
    # which imports triton when it is installed (torch's doing; test_import_and_run_with_triton_blocked
    # shows that calls work without it).
    code = textwrap.dedent(
        """
        import sys
        import rmt_kernels
        import torch
        print("after import:", "triton" in sys.modules, "rmt_kernels._C" in sys.modules,
              torch.cuda.is_initialized())
        """
    ) + SMOKE
    out = run_python(code, env_set={"RMT_KERNELS_BACKEND": "torch"})
    assert "after import: False False False" in out
    assert "resolved torch" in out


def test_import_and_run_with_triton_blocked():
    code = (
        "import sys\nsys.modules['triton'] = None  # `import triton` now raises ImportError\n"
        + SMOKE
        + textwrap.dedent(
            """
            try:
                import triton
            except ImportError:
                print("triton blocked")
            import os
            from rmt_kernels import BackendUnavailableError
            os.environ["RMT_KERNELS_BACKEND"] = "torch"  # this subprocess's own environment
            print("env torch ->", backends.resolve_backend(OP, "auto", torch.device("cpu")))
            os.environ["RMT_KERNELS_BACKEND"] = "triton"
            print("triton registered:", "triton" in backends._REGISTRY[OP])
            try:
                segment_attention(q, k, v, layout)
                print("env triton -> ran on", backends.resolve_backend(OP, "auto", torch.device("cpu")))
            except BackendUnavailableError as exc:
                print("env triton ->", exc)
            """
        )
    )
    out = run_python(code, env_unset=("RMT_KERNELS_BACKEND",))
    assert "triton blocked" in out
    assert "resolved torch" in out
    assert "triton (False, 'triton is not installed" in out
    assert "env torch -> torch" in out
    if "triton registered: True" in out:  # a backend the op has but cannot run: say why
        assert "env triton -> backend 'triton' is unavailable" in out
        assert "triton is not installed" in out.split("env triton ->")[1]
    else:  # RMT_KERNELS_BACKEND names a backend this op lacks: the op keeps its automatic choice
        assert "env triton -> ran on torch" in out


def test_import_and_run_with_broken_triton(tmp_path):
    # An installed but broken triton (wrong driver, missing libraries) must not break the package.
    fake = tmp_path / "triton"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('this triton is broken on purpose')\n")
    out = run_python(SMOKE, env_unset=("RMT_KERNELS_BACKEND", "TRITON_INTERPRET"), pythonpath_first=str(tmp_path))
    assert "resolved torch" in out


# Hides the optional packages (imports fail, importlib.util.find_spec finds nothing) and records the
# file each import of one came from: torch tries numpy by itself; no module of rmt_kernels may try any.
HIDE_OPTIONAL = """
import importlib.machinery, os, sys

OPTIONAL = ("numpy", "triton", "ninja", "pybind11")
attempts = []


class Hide:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in OPTIONAL:
            return importlib.machinery.PathFinder.find_spec(name, path, target)
        frame, probe = sys._getframe(1), False
        while frame.f_code.co_filename.startswith("<frozen"):
            probe = probe or frame.f_code.co_filename == "<frozen importlib.util>"
            frame = frame.f_back
        if not probe:  # an import, not a find_spec() asking whether it is installed
            attempts.append((name, frame.f_code.co_filename))
        return None

    def invalidate_caches(self):
        importlib.machinery.PathFinder.invalidate_caches()


sys.meta_path[:] = [Hide() if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def test_torch_backend_and_info_run_without_triton_numpy_ninja_pybind11():
    code = HIDE_OPTIONAL + SMOKE + textwrap.dedent(
        """
        from rmt_kernels import pack_segment
        seg = torch.randn(2, 5, 8, requires_grad=True)
        mem = torch.randn(2, 8, requires_grad=True)
        pack_segment(seg, layout, mem, mem).sum().backward()
        from rmt_kernels import cli
        assert cli.main(["info"]) == 0 and cli.main(["check"]) == 0
        package = os.sep + "rmt_kernels" + os.sep
        print("ours:", sorted({name for name, where in attempts if package in where}))
        print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in OPTIONAL))
        try:
            import numpy
        except ImportError:
            print("hidden and recorded:", attempts[-1] == ("numpy", "<string>"))
        """
    )
    out = run_python(code, env_unset=("RMT_KERNELS_BACKEND", "TRITON_INTERPRET"))
    assert "resolved torch" in out
    assert "hidden and recorded: True" in out
    assert "ours: []" in out and "loaded: []" in out
    assert 'missing triton -> pip install "rmt_kernels[triton]"' in out, out


def test_torch_is_the_only_requirement_and_each_optional_package_has_its_extra(monkeypatch):
    import runpy

    import setuptools

    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: seen.update(kwargs))
    monkeypatch.delenv("RMT_KERNELS_BUILD_CUDA", raising=False)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    assert seen["install_requires"] == ["torch>=2.6"]
    extras = {name: {req.split(";")[0].split(">")[0].split("<")[0].strip() for req in reqs}
              for name, reqs in seen["extras_require"].items()}
    assert "triton" in extras["triton"] and "ninja" in extras["cuda"]
    assert {"triton", "numpy"} <= extras["test"]  # the tests run Triton's interpreter, which needs numpy
    assert all("torch" not in reqs for reqs in extras.values())
