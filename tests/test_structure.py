"""The package's shape, read from its source (nothing is imported): every op folder has the same
files, imports only run down the layers and never in a loop, no backend imports another backend's
module, and no module grows past the size that says it holds two things (CONTRIBUTING.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "rmt_kernels"
OP_FILES = {"__init__.py", "interface.py", "torch_impl.py", "triton_fwd.py", "triton_bwd.py", "triton_launch.py",
            "aot.py"}
# Where an op's kernels need them: shared Triton device code; CUDA C++ launchers (an op without them
# has no "cuda" entry in its backend table).
OPTIONAL_OP_FILES = {"triton_common.py", "cuda.py", "torch_plan.py"}
BACKEND_FILES = {"torch_impl": "torch", "torch_plan": "torch", "cuda": "cuda", "triton_fwd": "triton",
                 "triton_bwd": "triton", "triton_launch": "triton", "triton_common": "triton"}
MAX_LINES = 600

# Layers, lowest first: a module may import its own layer and those below, never one above.
LAYERS = [
    ("errors", "layout", "_tolerance"),
    ("_checks", "backends", "_extension", "ops._alloc"),
    ("reference", "ops.*"),  # an op's launchers and kernels
    ("ops.*.interface", "ops.*.aot"),
    ("recurrent", "streamed"),
    ("integrations",),
    ("tools", "bench"),
    ("cli",),
]


def _modules():
    """``{dotted name relative to the package: path}`` of every module of the package."""
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _layer(name: str) -> int:
    parts = name.split(".")
    best = None
    for rank, patterns in enumerate(LAYERS):
        for pattern in patterns:
            pat = pattern.split(".")
            if len(parts) >= len(pat) and all(p == "*" or p == q for p, q in zip(pat, parts)):
                score = (len(pat), -pat.count("*"))
                if best is None or score > best[0]:
                    best = (score, rank)
    assert best is not None, f"module {name} is in no layer of test_structure.LAYERS"
    return best[1]


def _imports(name: str, path: Path, modules) -> set:
    """Package modules that ``name`` imports (anywhere in the file, lazy imports included)."""
    tree = ast.parse(path.read_text())
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
                if not (base == "rmt_kernels" or base.startswith("rmt_kernels.")):
                    continue
                base = base[len("rmt_kernels"):].lstrip(".")
            targets = [f"{base}.{a.name}".lstrip(".") if f"{base}.{a.name}".lstrip(".") in modules else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("rmt_kernels"):
                target = target[len("rmt_kernels"):].lstrip(".")
            if target in modules and target != name:
                found.add(target)
    return found


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_face(name: str) -> bool:
    """A package ``__init__`` (the public face re-exports from below; it is nobody's dependency)."""
    return (PACKAGE / Path(*name.split(".")) / "__init__.py").is_file() if name else True


def test_every_op_folder_has_the_same_files():
    ops = [p for p in (PACKAGE / "ops").iterdir() if p.is_dir() and not p.name.startswith("_")]
    assert len(ops) >= 2
    for op in ops:
        files = {p.name for p in op.glob("*.py")}
        missing = OP_FILES - files
        assert not missing, f"ops/{op.name} lacks {sorted(missing)}"
        extra = files - OP_FILES - OPTIONAL_OP_FILES
        assert not extra, f"ops/{op.name} has files outside the op shape: {sorted(extra)}"
        source = (op / "interface.py").read_text()
        assert "register_op(" in source, f"ops/{op.name}/interface.py builds no backend table"
        has_cuda = (op / "cuda.py").is_file()
        assert has_cuda == ('"cuda":' in source), f"ops/{op.name}: cuda.py and a \"cuda\" table entry go together"


def test_imports_run_down_the_layers():
    upward = []
    for name, targets in _graph().items():
        if _is_face(name):
            continue
        for target in targets:
            if not _is_face(target) and _layer(target) > _layer(name):
                upward.append(f"{name} -> {target}")
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_loop():
    graph = {n: {t for t in ts if not _is_face(t)} for n, ts in _graph().items() if not _is_face(n)}
    state, loops = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                loops.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not loops, "import loops:\n" + "\n".join(loops)


def test_no_backend_imports_another_backend():
    crossing = []
    for name, targets in _graph().items():
        parts = name.split(".")
        if len(parts) != 3 or parts[0] != "ops" or parts[2] not in BACKEND_FILES:
            continue
        for target in targets:
            tparts = target.split(".")
            if len(tparts) == 3 and tparts[0] == "ops":
                if tparts[1] != parts[1] or BACKEND_FILES.get(tparts[2]) != BACKEND_FILES[parts[2]]:
                    crossing.append(f"{name} -> {target}")
    assert not crossing, "a backend's module imports another backend's (or op's):\n" + "\n".join(crossing)


@pytest.mark.parametrize("root", ["rmt_kernels", "tests", "benchmarks"])
def test_no_file_holds_two_things(root):
    big = []
    for path in (PACKAGE.parent / root).rglob("*.py"):
        n = len(path.read_text().splitlines())
        if n > MAX_LINES:
            big.append(f"{path.relative_to(PACKAGE.parent)}: {n} lines")
    assert not big, f"files over {MAX_LINES} lines:\n" + "\n".join(big)


def test_layer_rules_catch_an_upward_import():
    # The checks above are only worth something if they can fail.
    assert _layer("layout") < _layer("ops.pack_segment.interface") < _layer("recurrent") < _layer("cli")
    assert _layer("ops.segment_attention.triton_fwd") == _layer("reference")
    assert _is_face("") and _is_face("ops") and not _is_face("backends")
