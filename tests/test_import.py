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
