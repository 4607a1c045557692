"""What every suite shares: shapes (SPEC §4), device peaks, timing, environment, the result-row schema.

Timing. Each point times its providers in *alternating* order (rep 1: A B C, rep 2: B C A, ...), so a
slow drift of the machine (other processes, clocks, thermals) hits every provider alike. Warm-up calls
(which also trigger any ``torch.compile``) are never timed. A call is a pair ``(prepare, run)``: only
``run`` is timed, ``prepare`` does the untimed part (e.g. the forward pass before a timed backward).

- CPU: wall clock (``time.perf_counter``) of each ``run``; inputs are not rotated.
- CUDA: a pair of CUDA events around each ``run`` (one synchronisation at the end of the point), inputs
  rotated over enough buffer sets to exceed twice the L2 cache, so that no provider reads its inputs
  from L2 warmed by the previous call.

Reported: median, 20th and 80th percentiles in milliseconds.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..backends import BackendUnavailableError

SCHEMA = "rmt_kernels.bench/1"
MODES = ("fwd", "bwd", "fwd+bwd")
QUICK_MODES = ("fwd", "fwd+bwd")  # attention modes of --quick unless --modes is given
PROFILES = ("full", "quick", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


TRITON_CPU_REASON = (
    "Triton runs CPU tensors only in its interpreter (TRITON_INTERPRET=1), a correctness tool: not benchmarked"
)


class Skip(Exception):
    """A provider cannot run this point; ``str(exc)`` is the reason printed and recorded."""


# ----------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class AttnShape:
    """One attention problem: ``[B, H_q, N, D]`` queries over a packed ``R | S | W`` segment.

    ``series`` groups shapes that differ only in S (one line per provider and series in the plot).
    """

    name: str
    series: str
    batch: int
    heads_q: int
    heads_kv: int
    head_dim: int
    segment_len: int
    num_read: int
    num_write: int
    masks: Tuple[str, ...] = ("causal", "memory_bidirectional", "full")

    @property
    def seq_len(self) -> int:
        return self.num_read + self.segment_len + self.num_write

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "heads_q": self.heads_q, "heads_kv": self.heads_kv,
            "head_dim": self.head_dim, "segment_len": self.segment_len, "num_read": self.num_read,
            "num_write": self.num_write, "seq_len": self.seq_len,
        }


@dataclass(frozen=True)
class HandoffShape:
    """Packing ``[memory (M) | segment embeddings (S) | memory (M)]`` of width ``dim`` for B rows."""

    name: str
    batch: int
    segment_len: int
    num_mem: int
    dim: int

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "segment_len": self.segment_len, "num_read": self.num_mem,
            "num_write": self.num_mem, "seq_len": self.segment_len + 2 * self.num_mem, "dim": self.dim,
        }


@dataclass(frozen=True)
class StepShape:
    """A backbone (random weights) and an RMT step over ``segments`` segments of ``segment_len``."""

    name: str
    family: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    segment_len: int
    num_mem: int
    batch: int
    segments: int

    def sizes(self) -> dict:
        return {
            "batch": self.batch, "heads_q": self.heads, "heads_kv": self.kv_heads,
            "head_dim": self.hidden // self.heads, "segment_len": self.segment_len,
            "num_read": self.num_mem, "num_write": self.num_mem,
            "seq_len": self.segment_len + 2 * self.num_mem, "dim": self.hidden, "layers": self.layers,
            "vocab": self.vocab, "segments": self.segments,
        }


# The goal point of the CPU quick run: the torch backend vs dense-mask SDPA, fwd+bwd.
GOAL_SHAPE = AttnShape("goal-S1024-M64", "goal", 2, 8, 8, 64, 1024, 64, 64, ("memory_bidirectional",))

# SPEC §4 at full size (GPU). bert-rmt: an encoder shares one block, so R = W = 0 and the 10 memory
# tokens, 499 tokens and 3 special tokens form one segment of 512 under mask "full".
_ATTN_FULL = (
    AttnShape("gpt2-rmt", "gpt2-rmt", 8, 12, 12, 64, 512, 16, 16),
    AttnShape("bert-rmt", "bert-rmt", 8, 12, 12, 64, 512, 0, 0, ("full",)),
    AttnShape("llama1b-rmt-M16", "llama1b-rmt", 4, 32, 8, 64, 1024, 16, 16),
    AttnShape("llama1b-rmt-M32", "llama1b-rmt-M32", 4, 32, 8, 64, 1024, 32, 32),
    AttnShape("llama1b-rmt-M128", "llama1b-rmt-M128", 4, 32, 8, 64, 1024, 128, 128),
    AttnShape("llama8b-rmt-S1024", "llama8b-rmt", 1, 32, 8, 128, 1024, 128, 128),
    AttnShape("llama8b-rmt-S2048", "llama8b-rmt", 1, 32, 8, 128, 2048, 128, 128),
    AttnShape("llama8b-rmt-S4096", "llama8b-rmt", 1, 32, 8, 128, 4096, 128, 128),
)

_ATTN_QUICK_CPU = (
    GOAL_SHAPE,
    AttnShape("gpt2-rmt/cpu", "gpt2-rmt", 1, 4, 4, 64, 512, 16, 16),
    AttnShape("llama1b-rmt/cpu", "llama1b-rmt", 1, 8, 2, 64, 1024, 16, 16),
)

_ATTN_QUICK_CUDA = (
    GOAL_SHAPE,
    _ATTN_FULL[0],
    _ATTN_FULL[2],
)

_ATTN_TINY = (AttnShape("tiny", "tiny", 1, 2, 1, 16, 24, 4, 4),)

_HANDOFF_FULL = (
    HandoffShape("gpt2-rmt", 8, 512, 16, 768),
    HandoffShape("llama1b-rmt-M16", 4, 1024, 16, 2048),
    HandoffShape("llama1b-rmt-M128", 4, 1024, 128, 2048),
    HandoffShape("llama8b-rmt-S4096", 1, 4096, 128, 4096),
)

_HANDOFF_QUICK_CPU = (
    HandoffShape("gpt2-rmt/cpu", 2, 512, 16, 768),
    HandoffShape("llama1b-rmt-M16/cpu", 1, 1024, 16, 2048),
    HandoffShape("llama1b-rmt-M128/cpu", 1, 1024, 128, 2048),
)

_HANDOFF_TINY = (HandoffShape("tiny", 2, 24, 4, 32),)

_STEP_FULL = (
    StepShape("gpt2-rmt", "gpt2", 12, 768, 12, 12, 3072, 50257, 512, 16, 8, 4),
    StepShape("llama1b-rmt", "llama", 16, 2048, 32, 8, 8192, 128256, 1024, 16, 1, 4),
)

_STEP_QUICK_CUDA = (
    StepShape("gpt2-rmt", "gpt2", 12, 768, 12, 12, 3072, 50257, 512, 16, 2, 2),
    StepShape("llama1b-rmt/4-layers", "llama", 4, 2048, 32, 8, 8192, 128256, 1024, 16, 1, 2),
)

# CPU: the same families with 2 layers, a width of 256, a small vocabulary and segments of 128; the
# head dim (64) and the grouped-query ratio (4:1) are kept.
_STEP_CPU = (
    StepShape("gpt2-rmt/cpu", "gpt2", 2, 256, 4, 4, 1024, 1024, 128, 16, 1, 2),
    StepShape("llama1b-rmt/cpu", "llama", 2, 256, 4, 1, 512, 1024, 128, 16, 1, 2),
)

_STEP_TINY = (
    StepShape("tiny-gpt2", "gpt2", 1, 32, 2, 2, 64, 97, 16, 4, 1, 2),
    StepShape("tiny-llama", "llama", 1, 32, 2, 1, 64, 97, 16, 4, 1, 2),
)


def _reduce_for_cpu(shape: AttnShape) -> AttnShape:
    """A full-size attention shape at B=1 and a quarter of the heads (GQA ratio kept)."""
    return AttnShape(
        shape.name + "/cpu", shape.series, 1, max(1, shape.heads_q // 4), max(1, shape.heads_kv // 4),
        shape.head_dim, shape.segment_len, shape.num_read, shape.num_write, shape.masks,
    )


def shapes_for(suite: str, device_type: str, profile: str) -> tuple:
    """The shapes a suite runs: ``profile`` is ``"full"`` (SPEC §4), ``"quick"`` or ``"tiny"`` (tests).

    On CPU, ``"full"`` keeps every SPEC §4 attention shape at B=1 with a quarter of the heads, and the
    step suite always uses its reduced backbones.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    cpu = device_type != "cuda"
    if suite == "attention":
        if profile == "tiny":
            return _ATTN_TINY
        if profile == "quick":
            return _ATTN_QUICK_CPU if cpu else _ATTN_QUICK_CUDA
        return (GOAL_SHAPE,) + tuple(_reduce_for_cpu(s) for s in _ATTN_FULL) if cpu else _ATTN_FULL
    if suite == "handoff":
        if profile == "tiny":
            return _HANDOFF_TINY
        if cpu:
            return _HANDOFF_QUICK_CPU
        return _HANDOFF_FULL[:2] if profile == "quick" else _HANDOFF_FULL
    if suite == "step":
        if profile == "tiny":
            return _STEP_TINY
        if cpu:
            return _STEP_CPU
        return _STEP_QUICK_CUDA if profile == "quick" else _STEP_FULL
    raise ValueError(f"unknown suite {suite!r}")


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


def _dist_version(dist: str) -> str:
    try:
        return _md.version(dist)
    except _md.PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
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
    return f"{_cpu_name()} ({torch.get_num_threads()} threads)"


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
        "triton": _dist_version("triton"),
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
    "best_peer", "ratio_to_best_peer", "ratio_to_sdpa_dense",
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


def fill_ratios(rows: List[dict], peers: Sequence[str], dense: Optional[str] = "sdpa_dense") -> None:
    """Fill ``best_peer``/``ratio_to_best_peer`` (and ``ratio_to_sdpa_dense``) of one point's rows.

    A row's best peer is the fastest ``ok`` row among ``peers`` other than itself that computes the
    point's exact mask (not :func:`is_speed_of_light`); the ratio is the peer's median
    over the row's median (> 1: the row is faster).
    """
    ok = {r["provider"]: r for r in rows if r["status"] == "ok" and not is_speed_of_light(r)}
    for row in rows:
        if row["status"] != "ok":
            continue
        others = [ok[p] for p in peers if p in ok and p != row["provider"]]
        if others:
            best = min(others, key=lambda r: r["median_ms"])
            row["best_peer"] = best["provider"]
            row["ratio_to_best_peer"] = best["median_ms"] / row["median_ms"]
        if dense and dense in ok and row["provider"] != dense:
            row["ratio_to_sdpa_dense"] = ok[dense]["median_ms"] / row["median_ms"]


# ----------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class TimingConfig:
    """Warm-up calls per provider, then between ``min_reps`` and ``max_reps`` alternating reps, as many
    as fit in ``budget_s`` seconds (estimated from the last warm-up call)."""

    warmup: int
    min_reps: int
    max_reps: int
    budget_s: float


def timing_config(device_type: str, profile: str, reps: Optional[int] = None) -> TimingConfig:
    """Defaults per device and profile; ``reps`` fixes the number of timed reps."""
    if device_type == "cuda":
        cfg = TimingConfig(warmup=3, min_reps=10, max_reps=100, budget_s=1.0)
    elif profile == "full":
        cfg = TimingConfig(warmup=1, min_reps=5, max_reps=21, budget_s=8.0)
    elif profile == "quick":
        cfg = TimingConfig(warmup=1, min_reps=5, max_reps=11, budget_s=1.5)
    else:
        cfg = TimingConfig(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    if reps is not None:
        if reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        cfg = TimingConfig(cfg.warmup, reps, reps, cfg.budget_s)
    return cfg


Call = Tuple[Callable[[int], object], Callable[[object], object]]  # (prepare(slot) -> state, run(state))


def rotation_slots(device: torch.device, bytes_per_set: int, limit: int = 16) -> int:
    """How many input sets to rotate over: enough to exceed twice the L2 cache on CUDA, 1 on CPU."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(limit, math.ceil(2 * l2 / bytes_per_set)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_alternating(
    calls: Dict[str, Call], device: torch.device, cfg: TimingConfig, slots: int = 1
) -> Dict[str, Union[List[float], BaseException]]:
    """Time each provider's ``run`` in alternating order; milliseconds per call, or the exception.

    A provider whose warm-up or a timed call raises is dropped from the point with its exception;
    the others go on.
    """
    results: Dict[str, Union[List[float], BaseException]] = {}
    est: Dict[str, float] = {}
    for name, (prepare, run) in calls.items():
        try:
            for i in range(cfg.warmup):
                state = prepare(i % slots)
                _sync(device)
                t0 = time.perf_counter()
                run(state)
                _sync(device)
                est[name] = time.perf_counter() - t0
            results[name] = []
        except Exception as exc:  # noqa: BLE001 - recorded as the provider's outcome
            results[name] = exc
            _release(device)
    live = [n for n in calls if isinstance(results[n], list)]
    if not live:
        return results
    per_rep = sum(est.get(n, 0.0) for n in live)
    reps = cfg.max_reps if per_rep <= 0 else int(cfg.budget_s / per_rep)
    reps = max(cfg.min_reps, min(cfg.max_reps, reps))
    events: Dict[str, list] = {n: [] for n in live}
    for rep in range(reps):
        order = live[rep % len(live):] + live[: rep % len(live)]
        for name in order:
            if not isinstance(results[name], list):
                continue
            prepare, run = calls[name]
            try:
                state = prepare(rep % slots)
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    run(state)
                    end.record()
                    events[name].append((start, end))
                else:
                    t0 = time.perf_counter()
                    run(state)
                    results[name].append((time.perf_counter() - t0) * 1e3)
                del state
            except Exception as exc:  # noqa: BLE001
                results[name] = exc
                _release(device)
    if device.type == "cuda":
        _sync(device)
        for name, pairs in events.items():
            if isinstance(results[name], list):
                results[name] = [s.elapsed_time(e) for s, e in pairs]
    return results


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    xs = sorted(values)
    if not xs:
        raise ValueError("quantile of an empty sequence")
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> dict:
    """``median_ms``, ``p20_ms``, ``p80_ms`` and ``reps`` of a list of call times."""
    return {
        "median_ms": quantile(times_ms, 0.5),
        "p20_ms": quantile(times_ms, 0.2),
        "p80_ms": quantile(times_ms, 0.8),
        "reps": len(times_ms),
    }


# ----------------------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on stderr when tqdm is installed, else a plain ``[i/n] label`` counter on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, file=sys.stderr, unit="pt", dynamic_ncols=True, leave=False)

    def step(self, label: str) -> None:
        self.count += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label[:60])
            self._bar.update(1)
        else:
            print(f"[{self.count}/{self.total}] {label}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
