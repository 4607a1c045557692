"""``rmt-kernels bench``: run the suites, print the tables, write the JSON records and the plot.

Examples::

    rmt-kernels bench --quick                                  # CPU: < 3 minutes on 2 cores
    rmt-kernels bench --suite attention --modes fwd+bwd --json out.json --plot out.png
    rmt-kernels bench --device cuda --save benchmarks/results  # <device>_<date>.json and .png

Exit status: 0 when every row is ok or skipped, 1 when a provider failed (crashed or computed a
different output), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from . import SUITES, attention, handoff, step
from .common import (
    DTYPES,
    GOAL_SHAPE,
    MODES,
    QUICK_MODES,
    Progress,
    environment,
    is_speed_of_light,
    results_stem,
    shapes_for,
    timing_config,
)

ALL_PROVIDERS = attention.PROVIDERS + handoff.PROVIDERS + step.PROVIDERS


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.description = (
        "Time rmt_kernels against its peers (reference, dense-mask SDPA, FlexAttention, is_causal SDPA, "
        "torch.cat, the official RMT step) and record one JSON row per point."
    )
    parser.add_argument("--suite", choices=SUITES + ("all",), default="all", help="which suite (default: all)")
    parser.add_argument(
        "--quick", action="store_true",
        help="a few reduced shapes (CPU: under 3 minutes on 2 cores; includes the goal point)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA"
    )
    parser.add_argument(
        "--modes", nargs="+", choices=MODES, default=None,
        help="attention modes (default: all three; --quick: fwd fwd+bwd); handoff times fwd, step fwd+bwd",
    )
    parser.add_argument(
        "--providers", nargs="+", choices=ALL_PROVIDERS, default=None, metavar="PROVIDER",
        help=f"only these providers (default: all): {', '.join(ALL_PROVIDERS)}",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed reps per point (default: adaptive)")
    parser.add_argument("--json", metavar="PATH", default=None, help="write the records (one row per point)")
    parser.add_argument("--plot", metavar="PATH", default=None, help="write the attention plot (PNG)")
    parser.add_argument(
        "--save", metavar="DIR", default=None,
        help="also write DIR/<device>_<date>.json and .png (how benchmarks/results/ is named)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--shapes", choices=("tiny",), default=None, help=argparse.SUPPRESS)


def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


class _Footnotes:
    """Numbered reasons for skipped/failed rows, printed under each table."""

    def __init__(self):
        self.reasons: Dict[str, int] = {}

    def ref(self, row: dict) -> str:
        n = self.reasons.setdefault(row["reason"], len(self.reasons) + 1)
        return f"{row['status']} [{n}]"

    def lines(self) -> List[str]:
        return [f"  [{n}] {reason}" for reason, n in self.reasons.items()]


def _print_table(title: str, header: Sequence[str], body: List[List[str]], notes: _Footnotes) -> None:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    print(f"\n== {title} ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    prev = None
    for r in body:
        key = tuple(r[:3])
        cells = [c if key != prev or i >= 3 else "" for i, c in enumerate(r)]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        prev = key
    for line in notes.lines():
        print(line)


def _ratio(row: dict) -> str:
    if row["ratio_to_best_peer"] is None:
        return "-"
    return f"{row['ratio_to_best_peer']:.2f}x {row['best_peer']}"


def print_attention(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        name = r["provider"] + (" (SoL)" if is_speed_of_light(r) else "")
        if r["status"] == "ok":
            body.append([
                r["shape"], r["mask"], r["mode"], name, f"{r['median_ms']:.3f}",
                f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _fmt(r["tflops"], ".3g"),
                _fmt(r["pct_peak"], ".1f", "n/a"), _ratio(r), _fmt(r["ratio_to_sdpa_dense"], ".2f"),
            ])
        else:
            body.append([r["shape"], r["mask"], r["mode"], name, notes.ref(r), "", "", "", "", ""])
    header = ["shape", "mask", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "% peak",
              "vs best peer", "vs sdpa_dense"]
    _print_table(f"attention ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    print("  TFLOP/s counted from the mask (visible pairs); ratios are peer time / row time (> 1: faster);")
    print("  (SoL): is_causal over all N rows, a different (cheaper) mask: stock kernels' speed of light.")
    composed = [r for r in rows if r["provider"] == "sdpa_composed" and r["ratio_to_sdpa_dense"] is not None]
    if composed:
        print("\n  torch backend (sdpa_composed) vs dense-mask SDPA, time ratio (> 1: torch backend faster):")
        for r in composed:
            goal = (
                r["shape"] == GOAL_SHAPE.name and r["mask"] == "memory_bidirectional" and r["mode"] == "fwd+bwd"
            )
            mark = "   <- goal point (goal: >= 1.5x)" if goal else ""
            print(f"    {r['shape']:<22} {r['mask']:<21} {r['mode']:<8} {r['ratio_to_sdpa_dense']:.2f}x{mark}")


def print_handoff(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        size = f"B{r['batch']} N{r['seq_len']} d{r['dim']}"
        if r["status"] == "ok":
            body.append([
                r["shape"], size, r["mode"], r["provider"], f"{r['median_ms']:.4f}",
                f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}", f"{r['gbps']:.1f}", _fmt(r["pct_copy_bw"], ".0f"),
                _ratio(r),
            ])
        else:
            body.append([r["shape"], size, r["mode"], r["provider"], notes.ref(r), "", "", "", ""])
    header = ["shape", "sizes", "mode", "provider", "median ms", "p20-p80 ms", "GB/s", "% copy", "vs best peer"]
    _print_table(f"handoff ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)


def print_step(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        size = f"{r['layers']}L d{r['dim']} B{r['batch']} K{r['segments']}x{r['segment_len']} M{r['num_read']}"
        if r["status"] == "ok":
            body.append([
                r["shape"], size, r["mode"], r["provider"], f"{r['median_ms']:.1f}",
                f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}", f"{r['peak_mem_mb']:.1f}", _ratio(r),
            ])
        else:
            body.append([r["shape"], size, r["mode"], r["provider"], notes.ref(r), "", "", ""])
    header = ["shape", "sizes", "mode", "provider", "median ms", "p20-p80 ms", "memory MB*", "vs best peer"]
    _print_table(f"step ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    print(f"  * memory: {step.memory_kind(torch.device(env['device']))}")


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (is this a CPU-only torch build?)")
    return torch.device(name)


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; see the module docstring for the exit status."""
    try:
        device = _device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    profile = "tiny" if args.shapes == "tiny" else "quick" if args.quick else "full"
    modes = tuple(dict.fromkeys(args.modes)) if args.modes else QUICK_MODES if profile == "quick" else MODES
    suites = SUITES if args.suite == "all" else (args.suite,)
    try:
        cfg = timing_config(device.type, profile, args.reps)
    except ValueError as exc:
        print(f"error: --reps: {exc}", file=sys.stderr)
        return 2
    chosen = set(args.providers) if args.providers else set(ALL_PROVIDERS)

    env = environment(device)
    dirty = " (uncommitted changes)" if env["git_dirty"] else ""
    print(
        f"rmt-kernels bench: {', '.join(suites)} | {env['device_name']} | {str(dtype).replace('torch.', '')} | "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']} | "
        f"commit {env['git_commit'][:12]}{dirty}"
    )

    plan = []
    for suite in suites:
        shapes = shapes_for(suite, device.type, profile)
        if suite == "attention":
            plan.append((suite, shapes, attention.count_points(shapes, modes)))
        else:
            plan.append((suite, shapes, len(shapes)))
    progress = Progress(sum(p[2] for p in plan), enabled=not args.no_progress)
    rows: List[dict] = []
    try:
        for suite, shapes, _ in plan:
            if suite == "attention":
                providers = [p for p in attention.PROVIDERS if p in chosen]
                part = attention.run_attention(shapes, modes, providers, device, dtype, cfg, env, progress)
            elif suite == "handoff":
                providers = [p for p in handoff.PROVIDERS if p in chosen]
                part = handoff.run_handoff(shapes, providers, device, dtype, cfg, env, progress)
            else:
                providers = [p for p in step.PROVIDERS if p in chosen]
                part = step.run_step(shapes, providers, device, dtype, cfg, env, progress)
            rows.extend(part)
    finally:
        progress.close()

    for suite, printer in (("attention", print_attention), ("handoff", print_handoff), ("step", print_step)):
        part = [r for r in rows if r["suite"] == suite]
        if part:
            printer(part, env)

    record = {
        "schema": "rmt_kernels.bench/1",
        "environment": env,
        "args": {"suites": list(suites), "profile": profile, "modes": list(modes), "dtype": str(dtype),
                 "providers": sorted(chosen)},
        "rows": rows,
    }
    json_paths = [args.json] if args.json else []
    plot_paths = [args.plot] if args.plot else []
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        stem = os.path.join(args.save, results_stem(env))
        json_paths.append(stem + ".json")
        plot_paths.append(stem + ".png")
    for path in json_paths:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        print(f"\nwrote {path} ({len(rows)} rows)")
    for path in plot_paths:
        from .plot import plot_attention

        title = f"rmt_kernels attention, {env['device_name']}, {str(dtype).replace('torch.', '')}, " \
                f"torch {env['torch']}, commit {env['git_commit'][:12]}"
        try:
            plot_attention(rows, path, title)
        except ImportError as exc:
            print(f"error: --plot needs matplotlib (pip install matplotlib): {exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"\n{len(failed)} row(s) FAILED (see the reasons above)", file=sys.stderr)
        return 1
    return 0
