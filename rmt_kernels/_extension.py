"""Load (or build just in time) the CUDA extension ``rmt_kernels._C`` of the ``cuda`` backend.

Two ways to get the extension:

- ahead of time: ``RMT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation .`` compiles it into the
  installed package (see ``setup.py``);
- just in time: otherwise the first use of ``backend="cuda"`` (or ``rmt-kernels build``) compiles
  ``csrc/`` with ``torch.utils.cpp_extension.load`` and ninja into a cache directory,
  ``RMT_KERNELS_CACHE_DIR`` (default ``~/.cache/rmt_kernels/<torch version>-cu<CUDA version>``),
  under a file lock so that concurrent processes build it once. Later processes only load it (torch
  rebuilds when a source or a flag changed).

Architectures: ``RMT_KERNELS_CUDA_ARCHS`` (e.g. ``"8.0;9.0a"``) if set, else torch's choice
(``TORCH_CUDA_ARCH_LIST``, else the visible GPUs). Parallel compile jobs: ``MAX_JOBS``, else
``RMT_KERNELS_MAX_JOBS``, else 2.

Nothing is compiled before it is asked for. The ``rmt-kernels build`` command is
:mod:`rmt_kernels.tools.build`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import threading
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import torch

from .errors import BackendUnavailableError

ENV_CACHE_DIR = "RMT_KERNELS_CACHE_DIR"
ENV_ARCHS = "RMT_KERNELS_CUDA_ARCHS"
ENV_MAX_JOBS = "RMT_KERNELS_MAX_JOBS"
AOT_MODULE = "rmt_kernels._C"
JIT_NAME = "rmt_kernels_C"
NVCC_FLAGS = ("-O3", "--use_fast_math", "-lineinfo")

_loaded: Optional[str] = None
_load_lock = threading.Lock()


def csrc_dir() -> Path:
    """The ``csrc/`` sources (also the include dir: kernels include ``"common/..."``,
    ``"<op>/..."``): shipped inside an installed package (``rmt_kernels/csrc``) or, from a source
    checkout, next to the package. Raises FileNotFoundError when neither exists."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        f"the CUDA sources (csrc/) are missing: looked in {package / 'csrc'} and {package.parent / 'csrc'}; "
        "reinstall rmt_kernels"
    )


def sources(root: Optional[Path] = None) -> List[Path]:
    """Translation units of the extension: the ``.cu`` launch file of every op folder
    (``csrc/<op>/*.cu``), then the torch binding ``csrc/bindings.cpp``. ``csrc/common/`` holds headers
    only; ``csrc/tools/`` (host probes) is not part of the extension. Every unit's file name is unique,
    since the object files of a build are named after it."""
    root = root or csrc_dir()
    units = [path for path in sorted(root.glob("*/*.cu")) if path.parent.name != "tools"]
    return units + [root / "bindings.cpp"]


def cache_dir() -> Path:
    """Where just-in-time builds go: ``RMT_KERNELS_CACHE_DIR`` or
    ``~/.cache/rmt_kernels/<torch version>-cu<CUDA version>``."""
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    if env:
        return Path(env).expanduser()
    tag = f"{torch.__version__}-cu{torch.version.cuda or 'none'}".replace("+", "_")
    return Path.home() / ".cache" / "rmt_kernels" / tag


def parse_archs(spec: str) -> List[str]:
    """``"8.0;9.0a"`` / ``"80,90a"`` / ``"sm_90a"`` -> ``["80", "90a"]``. ValueError on anything else."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+)\.?(\d)([af]?)(?:\+PTX)?", item)
        if match is None:
            raise ValueError(f"cannot read CUDA architecture {item!r} (expected e.g. 8.0, 9.0a, 80 or sm_90a)")
        archs.append(f"{match.group(1)}{match.group(2)}{match.group(3)}")
    if not archs:
        raise ValueError(f"no CUDA architecture in {spec!r}")
    return archs


def gencode_flags(archs: List[str]) -> List[str]:
    """``-gencode`` flags producing SASS for each architecture."""
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _cuda_home() -> Optional[str]:
    from torch.utils.cpp_extension import CUDA_HOME

    return CUDA_HOME


def jit_status() -> Tuple[bool, str]:
    """``(ok, reason)``: whether this process can build the extension just in time, and if not what is
    missing."""
    if torch.version.cuda is None:
        return False, "this torch is a CPU-only build; install a CUDA build of torch"
    home = _cuda_home()
    if home is None or not (Path(home) / "bin" / "nvcc").exists():
        return False, (
            f"nvcc was not found (CUDA_HOME={home!r}): install the CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda} and set CUDA_HOME"
        )
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return False, "ninja is not installed (pip install ninja)"
    try:
        csrc_dir()
    except FileNotFoundError as exc:
        return False, str(exc)
    return True, f"built just in time on first use into {cache_dir()}"


def aot_available() -> bool:
    """Whether ``rmt_kernels._C`` was built ahead of time into the installed package."""
    return importlib.util.find_spec(AOT_MODULE) is not None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl.flock`` on ``path`` (POSIX), held while one process builds."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


@contextlib.contextmanager
def _max_jobs() -> Iterator[None]:
    """ninja's parallelism for torch's build: ``MAX_JOBS`` if set, else ``RMT_KERNELS_MAX_JOBS`` or 2."""
    if "MAX_JOBS" in os.environ:
        yield
        return
    os.environ["MAX_JOBS"] = os.environ.get(ENV_MAX_JOBS, "2")
    try:
        yield
    finally:
        os.environ.pop("MAX_JOBS", None)


def build(archs: Optional[List[str]] = None, verbose: bool = False, directory: Optional[Path] = None) -> str:
    """Compile (if needed) and load the extension just in time; returns the shared library's path.

    The library is loaded into this process (its ops register in ``torch.ops.rmt_kernels``).

    Args:
        archs: architectures such as ``["80", "90a"]``; default ``RMT_KERNELS_CUDA_ARCHS`` if set,
            else torch's choice.
        verbose: show the compiler commands.
        directory: build directory; default :func:`cache_dir`.

    Raises:
        BackendUnavailableError: no CUDA build of torch, no nvcc, no ninja or no sources; the message
            says which.
        RuntimeError: the compilation failed (torch's message with the compiler output).
    """
    ok, reason = jit_status()
    if not ok:
        raise BackendUnavailableError(f"cannot build the CUDA extension rmt_kernels._C just in time: {reason}")
    from torch.utils.cpp_extension import load

    if archs is None and os.environ.get(ENV_ARCHS, "").strip():
        archs = parse_archs(os.environ[ENV_ARCHS])
    root = csrc_dir()
    build_dir = Path(directory) if directory is not None else cache_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    cuda_flags = list(NVCC_FLAGS) + (gencode_flags(archs) if archs else [])
    global _loaded
    with _file_lock(build_dir / "build.lock"), _max_jobs():
        _loaded = load(
            name=JIT_NAME,
            sources=[str(s) for s in sources(root)],
            extra_include_paths=[str(root)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_flags,
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    return _loaded


def load_extension(verbose: bool = False) -> str:
    """Make the ops ``torch.ops.rmt_kernels.*_cuda`` available; returns the library's path.

    Imports ``rmt_kernels._C`` when it was built ahead of time, otherwise builds it just in time
    (:func:`build`). Loads once per process.

    Raises:
        BackendUnavailableError: the extension is not installed and cannot be built here (the message
            says what is missing).
    """
    global _loaded
    if _loaded is not None:
        return _loaded
    with _load_lock:
        if _loaded is None:
            if aot_available():
                _loaded = str(importlib.import_module(AOT_MODULE).__file__)
            else:
                _loaded = build(verbose=verbose)
    return _loaded


def current_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` (as an int) of torch's current stream on ``device``: the ops launch there."""
    return torch.cuda.current_stream(device).cuda_stream


def cuda_status(device: torch.device) -> Tuple[bool, str]:
    """Whether the extension ``rmt_kernels._C`` can run on ``device``: installed (built ahead of
    time), or buildable just in time on first use (CUDA torch, nvcc, ninja)."""
    if torch.version.cuda is None:
        return False, "this torch is a CPU-only build; the CUDA backend needs a CUDA build of torch and nvcc"
    if device.type != "cuda":
        return False, f"the CUDA backend needs CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    if aot_available():
        return True, "extension rmt_kernels._C (built ahead of time)"
    ok, reason = jit_status()
    if not ok:
        return False, (
            f"the extension rmt_kernels._C is not built and cannot be built just in time here ({reason}); "
            "build it with RMT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation \".[cuda]\" or `rmt-kernels build`"
        )
    return True, f"extension rmt_kernels._C, {reason}"
