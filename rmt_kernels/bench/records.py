"""Result records of the bench suites: the row schema, skipped/failed outcomes, device peaks, the
environment recorded with every run, and the JSON file written by ``--json`` / ``--save``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import re
import subprocess
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import BackendUnavailableError

SCHEMA = "rmt_kernels.bench/1"
TRITON_CPU_REASON = (
    "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), a correctness tool: not benchmarked"
)


class Skip(Exception):
    """A provider cannot run this point; ``str(exc)`` is the reason printed and recorded."""


# ----------------------------------------------------------------------------------------- peaks

# Dense (no sparsity) tensor-core peaks in TFLOP/s for 16-bit inputs, from the vendors' data sheets.
# Matched against torch.cuda.get_device_name() in order; the first hit wins.
_PEAKS_16BIT = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM5 (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Dense 16-bit tensor-core peak of a GPU, or None (unknown GPU, CPU, or float32 inputs).

    float32 gets None: whether SDPA and the kernels run float32 on TF32 tensor cores or on CUDA cores
    depends on settings, so no single peak is honest. CPUs get None: the achievable peak of a shared
    CPU depends on its vector units, clocks and threads, none of which the bench controls.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        return None
    for key, peak in _PEAKS_16BIT:
        if key.lower() in device_name.lower():
            return peak
    return None


# ----------------------------------------------------------------------------------------- environment


def dist_version(dist: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` "model name", else :func:`platform.processor`)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """``torch.cuda.get_device_name`` on CUDA; the CPU model and torch's thread count on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


def git_commit() -> Tuple[str, Optional[bool]]:
    """``(commit, dirty)`` of the checkout the package was imported from; ``("unknown", None)`` for an
    installed copy or when git is missing."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        top = subprocess.run(
            ["git", "-C", pkg_root, "rev-parse", "--show-toplevel"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        if os.path.realpath(top) != os.path.realpath(pkg_root):
            return "unknown", None
        commit = subprocess.run(
            ["git", "-C", pkg_root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", pkg_root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", None


def environment(device: torch.device) -> dict:
    """Device, versions and commit recorded with every run (and copied into every row)."""
    from .. import __version__

    commit, dirty = git_commit()
    return {
        "device": device.type,
        "device_name": device_name(device),
        "rmt_kernels": __version__,
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def results_stem(env: dict) -> str:
    """``<device>_<YYYY-MM-DD>``: how committed result files are named (benchmarks/results/)."""
    name = env["device_name"].split(" (")[0] if env["device"] == "cpu" else env["device_name"]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    prefix = "cpu-" if env["device"] == "cpu" and not slug.startswith("cpu") else ""
    return f"{prefix}{slug}_{env['date'][:10]}"


# ----------------------------------------------------------------------------------------- rows

ROW_FIELDS = (
    # what was measured
    "suite", "provider", "mode", "shape", "series", "mask", "dtype",
    "batch", "heads_q", "heads_kv", "head_dim", "segment_len", "num_read", "num_write", "seq_len",
    "dim", "layers", "vocab", "segments",
    # outcome
    "status", "reason", "note",
    "median_ms", "p20_ms", "p80_ms", "reps",
    "flops", "tflops", "pct_peak", "peak_tflops",
    "bytes", "gbps", "pct_copy_bw",
    "peak_mem_mb", "peak_mem_kind",
    "best_peer", "ratio_to_best_peer", "ratio_to_best_peer_low", "ratio_to_best_peer_high", "noisy",
    "ratio_to_sdpa_dense", "ratio_to_sdpa_dense_low", "ratio_to_sdpa_dense_high", "noisy_vs_sdpa_dense",
    # where
    "device", "device_name", "torch", "triton", "cuda", "git_commit", "git_dirty",
)
STATUSES = ("ok", "skipped", "failed")
SPEED_OF_LIGHT = "speed of light: is_causal over all N rows computes plain causal, not this mask"


def is_speed_of_light(row: dict) -> bool:
    """A row that computes a cheaper mask than its point's (shown as a bound, never as a peer)."""
    return (row.get("note") or "").startswith("speed of light")


def make_row(env: dict, **fields) -> dict:
    """A result row with every field of :data:`ROW_FIELDS` (missing ones None); unknown fields raise."""
    unknown = set(fields) - set(ROW_FIELDS)
    if unknown:
        raise ValueError(f"unknown row fields {sorted(unknown)}")
    row = dict.fromkeys(ROW_FIELDS)
    for key in ("device", "device_name", "torch", "triton", "cuda", "git_commit", "git_dirty"):
        row[key] = env.get(key)
    row.update(fields)
    if row["status"] not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {row['status']!r}")
    if row["status"] != "ok" and not row["reason"]:
        raise ValueError("a row that is not ok needs a reason")
    return row


def classify_exception(exc: BaseException) -> Tuple[str, str]:
    """``(status, reason)`` for a provider that raised: missing features and memory are ``skipped``,
    anything else ``failed``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, Skip):
        return "skipped", str(exc)
    if isinstance(exc, (NotImplementedError, BackendUnavailableError, ImportError)):
        return "skipped", reason
    if isinstance(exc, torch.OutOfMemoryError):
        return "skipped", "out of memory: " + reason
    return "failed", reason


def ratio_interval(peer: dict, row: dict) -> Tuple[float, float]:
    """How far the ratio ``peer median / row median`` can move within the two spreads: from the peer's
    p20 over the row's p80 to the peer's p80 over the row's p20."""
    return peer["p20_ms"] / row["p80_ms"], peer["p80_ms"] / row["p20_ms"]


def is_noisy(low: float, high: float) -> bool:
    """A ratio is noise when its interval (:func:`ratio_interval`) reaches 1: the spreads are wider
    than the margin, so the same run could have ranked the two either way."""
    return low <= 1.0 <= high


def _set_ratio(row: dict, peer: dict, field: str, flag: str) -> None:
    low, high = ratio_interval(peer, row)
    row[field] = peer["median_ms"] / row["median_ms"]
    row[field + "_low"], row[field + "_high"] = low, high
    row[flag] = is_noisy(low, high)


def untimed_row(env: dict, name: str, outcome: Dict[str, Tuple[str, str]], result, base: dict,
                classify: Optional[Callable[[BaseException], Tuple[str, str]]] = None) -> Optional[dict]:
    """The row of a provider that has no timings: its build/check ``outcome[name]``, or the exception its
    timing raised (``result``, through ``classify``, default :func:`classify_exception`). None when it
    was timed (``result`` is its list of times): the suite then builds the ``ok`` row."""
    if name in outcome:
        status, reason = outcome[name]
    elif isinstance(result, BaseException):
        status, reason = (classify or classify_exception)(result)
    else:
        return None
    return make_row(env, status=status, reason=reason, **base)


def fill_ratios(rows: List[dict], peers: Sequence[str], dense: Optional[str] = "sdpa_dense") -> None:
    """Fill ``best_peer``/``ratio_to_best_peer`` (and ``ratio_to_sdpa_dense``) of one point's rows.

    A row's best peer is the fastest ``ok`` row among ``peers`` other than itself that computes the
    point's exact mask (not :func:`is_speed_of_light`); the ratio is the peer's median
    over the row's median (> 1: the row is faster). Each ratio comes with its interval over the two
    spreads (``*_low``, ``*_high``, :func:`ratio_interval`) and a flag (``noisy``,
    ``noisy_vs_sdpa_dense``) set when that interval reaches 1 (:func:`is_noisy`).
    """
    ok = {r["provider"]: r for r in rows if r["status"] == "ok" and not is_speed_of_light(r)}
    for row in rows:
        if row["status"] != "ok":
            continue
        others = [ok[p] for p in peers if p in ok and p != row["provider"]]
        if others:
            best = min(others, key=lambda r: r["median_ms"])
            row["best_peer"] = best["provider"]
            _set_ratio(row, best, "ratio_to_best_peer", "noisy")
        if dense and dense in ok and row["provider"] != dense:
            _set_ratio(row, ok[dense], "ratio_to_sdpa_dense", "noisy_vs_sdpa_dense")


def write_record(path: str, record: dict) -> None:
    """Write one run's record (``{"schema", "environment", "args", "rows"}``) as indented JSON."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
