"""``rmt-kernels bench``: run the suites, print the tables, write the JSON records and the plot.

Examples::

    rmt-kernels bench --quick                                  # CPU: < 3 minutes on 2 cores
    rmt-kernels bench --suite attention --modes fwd+bwd --json out.json --plot out.png
    rmt-kernels bench --device cuda --save benchmarks/results  # <device>_<date>.json and .png

Every argument is checked before the first point runs. Exit status: 0 when every row is ok or
skipped, 1 when a provider failed (crashed or computed a different output), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional, Sequence

import torch

from . import SUITES, Suite
from .progress import Progress
from .records import SCHEMA, environment, results_stem, write_record
from .shapes import DTYPES, MODES, QUICK_MODES
from .timing import timing_config


def _output_path(value: str) -> str:
    folder = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist (create it first)")
    if os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value} is a folder, not a file")
    return value


def _matplotlib_missing() -> Optional[str]:
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:
        return f"matplotlib is not installed (pip install matplotlib): {exc}"
    return None


def _plot_path(value: str) -> str:
    missing = _matplotlib_missing()
    if missing:
        raise argparse.ArgumentTypeError(missing)
    return _output_path(value)


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.description = (
        "Time rmt_kernels against its peers (reference, dense-mask SDPA, FlexAttention, is_causal SDPA, "
        "torch.cat, the official RMT step) and record one JSON row per point."
    )
    parser.add_argument("--suite", choices=tuple(SUITES) + ("all",), default="all", help="which suite (default: all)")
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
    per_suite = "; ".join(f"{name}: {', '.join(s.providers)}" for name, s in SUITES.items())
    parser.add_argument(
        "--providers", nargs="+", default=None, metavar="PROVIDER",
        help=f"only these providers of the selected suites (default: all). {per_suite}",
    )
    parser.add_argument("--reps", type=int, default=None, help="timed reps per point (default: adaptive)")
    parser.add_argument("--json", metavar="PATH", type=_output_path, default=None,
                        help="write the records (one row per point); the folder must exist")
    parser.add_argument("--plot", metavar="PATH", type=_plot_path, default=None,
                        help="write the attention plot (PNG; needs matplotlib and the attention suite)")
    parser.add_argument(
        "--save", metavar="DIR", default=None,
        help="also write DIR/<device>_<date>.json and, with the attention suite, .png "
             "(how benchmarks/results/ is named)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no per-point progress on stderr")
    parser.add_argument("--shapes", choices=("tiny",), default=None, help=argparse.SUPPRESS)


def _device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (is this a CPU-only torch build?)")
    return torch.device(name)


def _select(suite: str, providers: Optional[Sequence[str]]) -> List[Suite]:
    """The suites to run: ``--suite`` narrowed to those with a chosen provider; ValueError naming the
    valid providers when one is not a provider of the selected suites."""
    selected = list(SUITES.values()) if suite == "all" else [SUITES[suite]]
    if not providers:
        return selected
    valid = [p for s in selected for p in s.providers]
    unknown = [p for p in dict.fromkeys(providers) if p not in valid]
    if unknown:
        where = "any suite" if suite == "all" else f"the {suite} suite"
        raise ValueError(
            f"--providers: {', '.join(map(repr, unknown))} is not a provider of {where}; "
            f"valid: {', '.join(valid)}"
        )
    return [s for s in selected if any(p in providers for p in s.providers)]


def _check_outputs(args: argparse.Namespace, suites: Sequence[Suite]) -> None:
    """Raise ValueError for a plot that cannot be drawn, before anything runs."""
    if args.plot and not any(s.plot for s in suites):
        names = ", ".join(s.name for s in suites)
        raise ValueError(f"--plot: only the attention suite has a plot, and this run has none ({names})")
    if args.save and any(s.plot for s in suites):
        missing = _matplotlib_missing()
        if missing:
            raise ValueError(f"--save writes a plot: {missing}")


def run(args: argparse.Namespace) -> int:
    """Run the selected suites; see the module docstring for the exit status."""
    try:
        device = _device(args.device)
        suites = _select(args.suite, args.providers)
        _check_outputs(args, suites)
        profile = "tiny" if args.shapes == "tiny" else "quick" if args.quick else "full"
        try:
            cfg = timing_config(device.type, profile, args.reps)
        except ValueError as exc:
            raise ValueError(f"--reps: {exc}") from exc
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    modes = tuple(dict.fromkeys(args.modes)) if args.modes else QUICK_MODES if profile == "quick" else MODES
    chosen = set(args.providers) if args.providers else {p for s in suites for p in s.providers}
    dname = str(dtype).replace("torch.", "")

    env = environment(device)
    dirty = " (uncommitted changes)" if env["git_dirty"] else ""
    print(
        f"rmt-kernels bench: {', '.join(s.name for s in suites)} | {env['device_name']} | {dname} | "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']} | "
        f"commit {env['git_commit'][:12]}{dirty}",
        flush=True,
    )

    plan = [(suite, suite.shapes(device.type, profile)) for suite in suites]
    progress = Progress(sum(s.count_points(shapes, modes) for s, shapes in plan), enabled=not args.no_progress)
    rows: List[dict] = []
    try:
        for suite, shapes in plan:
            providers = [p for p in suite.providers if p in chosen]
            rows.extend(suite.run(shapes, modes, providers, device, dtype, cfg, env, progress))
    finally:
        progress.close()

    for suite in suites:
        part = [r for r in rows if r["suite"] == suite.name]
        if part:
            suite.print_rows(part, env)

    record = {
        "schema": SCHEMA,
        "environment": env,
        "args": {"suites": [s.name for s in suites], "profile": profile, "modes": list(modes), "dtype": str(dtype),
                 "providers": sorted(chosen)},
        "rows": rows,
    }
    json_paths = [args.json] if args.json else []
    plot_paths = [args.plot] if args.plot else []
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        stem = os.path.join(args.save, results_stem(env))
        json_paths.append(stem + ".json")
        if any(s.plot for s in suites):
            plot_paths.append(stem + ".png")
    for path in json_paths:
        write_record(path, record)
        print(f"\nwrote {path} ({len(rows)} rows)")
    status = 0
    plotter = next((s for s in suites if s.plot), None)
    for path in plot_paths:
        title = (f"rmt_kernels {plotter.name}, {env['device_name']}, {dname}, torch {env['torch']}, "
                 f"commit {env['git_commit'][:12]}")
        try:
            plotter.plot(rows, path, title)
        except ValueError as exc:
            print(f"error: {exc}: {path} not written", file=sys.stderr)
            status = 1
            continue
        print(f"wrote {path}")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"\nerror: {len(failed)} row(s) FAILED (see the reasons above)", file=sys.stderr)
        return 1
    return status
