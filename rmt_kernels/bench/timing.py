"""How the bench suites time a point.

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

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch


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
    # CPU: two warm-up calls, since a first call may do one-time work (the torch backend times its plans
    # on the first call of a shape), which must neither be timed nor set the number of reps; small
    # points get up to 31 reps, so that their p20/p80 spread is a measurement and not two samples.
    elif profile == "full":
        cfg = TimingConfig(warmup=2, min_reps=5, max_reps=31, budget_s=8.0)
    elif profile == "quick":
        cfg = TimingConfig(warmup=2, min_reps=5, max_reps=31, budget_s=1.5)
    else:
        cfg = TimingConfig(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    if reps is not None:
        if reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        cfg = TimingConfig(cfg.warmup, reps, reps, cfg.budget_s)
    return cfg


Call = Tuple[Callable[[int], object], Callable[[object], object]]  # (prepare(slot) -> state, run(state))


MAX_SLOTS = 16


def rotation_slots(device: torch.device, bytes_per_set: int) -> int:
    """How many input sets to rotate over: enough to exceed twice the L2 cache on CUDA (at most
    :data:`MAX_SLOTS`), 1 on CPU."""
    if device.type != "cuda" or bytes_per_set <= 0:
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    return max(1, min(MAX_SLOTS, math.ceil(2 * l2 / bytes_per_set)))


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
