"""``rmt-kernels validate``: one time-boxed GPU validation that writes every result as it goes.

Made for a lent GPU with a few minutes of device time: one prepared command runs the stages of
:data:`STAGES` in priority order (info, the ``cuda``-marked Triton tests, the attention, handoff,
overhead, step and armt benchmarks, the CUDA extension's build and tests), then prints the summary.

A stage's cap is its share of ``--budget`` (default 480 s), and it runs as a subprocess killed at
``min(cap, what is left)`` (SIGINT, then SIGKILL after :data:`GRACE_S`); a stage whose minimum no longer
fits is ``skipped`` with a reason starting ``budget``. Benchmarks exclude the providers that would
build the CUDA extension (it comes last) and the dense float32 reference (dense SDPA is the oracle).

Everything lands in ``--out`` as it happens, in at most 7 files and no folder (what a device run
returns): ``summary.json`` and ``summary.txt`` (rewritten when each stage starts and ends: stage,
status ``ok``/``failed``/``skipped``/``timeout``, or ``pending``/``running`` in a run cut off from
outside, seconds, cap, reason, one-line result), ``setup.log`` (info, cuda_build), ``tests.log`` and
``tests.json`` (per test stage: the order run, counts, failures), ``bench.log`` and ``bench.json`` (per
suite: the bench record, rewritten after every shape, so a stage cut at its cap keeps what it measured).

``--dry-run`` runs every stage on CPU stand-ins (tiny shapes, the CPU device, the ``cuda`` tests
collected and skipping plus two Triton cases under the interpreter; the CUDA build skipped with its
reason) in under a minute on 2 idle cores. Exit status: 0 when no stage failed or timed out, 1 otherwise, 2 for
bad arguments (checked before anything runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
SCHEMA = "rmt_kernels.validate/1"
GRACE_S = 10.0  # after SIGINT, before SIGKILL
RESERVE_S = 2.0  # kept for the last summary
FILES = ("summary.json", "summary.txt", "setup.log", "tests.log", "tests.json", "bench.log", "bench.json")
CUDA_MARKS = "cuda and not slow"
# The dry run's stand-ins for the GPU tests: the smallest Triton cases, run under the interpreter.
DRY_RUN_TESTS = (
    "tests/test_segment_attention_triton.py::test_triton_matches_reference[S1-M0-causal]",
    "tests/test_pack_segment.py::test_pack_segment_matches_cat[S1-batched-tied-sliced-triton]",
)
MASK_PRIORITY = ("memory_bidirectional", "causal", "full")  # the RMT mask of every shape first


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its log/JSON group, its cap as a share of the budget, and the least time worth
    starting it with."""

    name: str
    group: str
    share: float
    min_s: float


STAGES = (  # name, group, cap as a share of the budget, least seconds worth starting with
    Stage("info", "setup", 0.06, 5.0),  # rmt-kernels info
    Stage("triton_tests", "tests", 0.28, 20.0),  # cuda-marked, not slow, no float32; smallest first
    Stage("attention", "bench", 0.22, 20.0),  # SPEC §4 shapes, bf16, fwd and fwd+bwd, RMT mask first
    Stage("handoff", "bench", 0.06, 10.0),  # pack bandwidth against a device copy
    Stage("overhead", "bench", 0.08, 10.0),  # per-call cost, eager and compiled (skipped without the suite)
    Stage("step", "bench", 0.10, 15.0),  # the drop-in training step against the official semantics
    Stage("armt", "bench", 0.05, 10.0),  # ARMT's associative block and step (schedules) against einsum
    Stage("cuda_build", "setup", 0.35, 30.0),  # the CUDA extension's just-in-time build
    Stage("cuda_tests", "tests", 1.0, 20.0),  # its cuda-marked tests, with what is left
)


# suite -> (shape profile on the GPU, modes); the dry run measures only the first unit of the "tiny" shapes
BENCH_PLANS = {"attention": ("full", ("fwd", "fwd+bwd")), "handoff": ("full", ("fwd",)),
               "overhead": ("quick", ("fwd", "fwd+bwd")), "step": ("quick", ("fwd+bwd",)),
               "armt": ("quick", ("fwd", "fwd+bwd"))}


@dataclasses.dataclass
class Outcome:
    """What a stage ended with; ``result`` is its one line in the summary."""

    status: str
    reason: Optional[str] = None
    result: Optional[str] = None
    seconds: float = 0.0
    cap_s: Optional[float] = None
    limit_s: Optional[float] = None


# ----------------------------------------------------------------------------------------- files


def _write_atomic(path: Path, text: str) -> None:
    path.with_name(path.name + ".tmp").write_text(text, encoding="utf-8")
    os.replace(path.with_name(path.name + ".tmp"), path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _update_json(path: Path, key: str, value) -> None:
    """Set ``key`` of the JSON object in ``path`` (created if missing), atomically."""
    data = _read_json(path)
    data[key] = value
    _write_atomic(path, json.dumps(data, indent=1, default=str))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------------------- processes


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group (pytest and the bench write what they have), SIGKILL after the grace."""
    for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_process(cmd: Sequence[str], log: Path, timeout: float, env: Optional[dict] = None) -> Tuple[int, bool, str]:
    """Run ``cmd`` in its own process group with stdout and stderr appended to ``log``, killed after
    ``timeout`` seconds. Returns ``(exit status, timed out, what it wrote)``."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        start = f.tell()
        proc = subprocess.Popen(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        except BaseException:
            _stop(proc)
            raise
    with open(log, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        text = f.read()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"[exit status {proc.returncode}{', killed at the cap' if timed_out else ''}]\n")
    return proc.returncode, timed_out, text


def _last_line(text: str) -> str:
    return ([line.strip()[:200] for line in text.splitlines() if line.strip()] or ["no output"])[-1]


# ----------------------------------------------------------------------------------------- run state


class Run:
    """The state of one validation: output folder, clock, outcomes, and the summary writer."""

    def __init__(self, out: Path, budget: float, dry_run: bool, tmp: Path):
        self.out, self.budget, self.dry_run, self.tmp = out, budget, dry_run, tmp
        self.t0 = time.monotonic()
        self.started = _now()
        self.outcomes: Dict[str, Outcome] = {s.name: Outcome("pending") for s in STAGES}
        self.collected: Optional[List[str]] = None
        self.info: List[str] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        if dry_run:  # hermetic on any machine: CPU only, Triton interpreted, torch.compile off (CPU compiles
            # take longer than the whole dry run; "compiled" bench rows then run eagerly)
            self.env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1", TORCH_COMPILE_DISABLE="1")
        elif "MAX_JOBS" not in self.env and "RMT_KERNELS_MAX_JOBS" not in self.env:
            self.env["RMT_KERNELS_MAX_JOBS"] = str(os.cpu_count() or 2)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def log(self, stage: Stage) -> Path:
        return self.out / f"{stage.group}.log"

    def run(self, stage: Stage, cmd: Sequence[str], timeout: float) -> Tuple[int, bool, str]:
        return run_process(cmd, self.log(stage), max(timeout, 1.0), self.env)

    def write_summary(self, finished: bool = False) -> str:
        import torch

        stages = [
            {"stage": s.name, **{k: round(v, 1) if isinstance(v, float) else v
                                 for k, v in dataclasses.asdict(self.outcomes[s.name]).items()},
             "log": f"{s.group}.log", "json": f"{s.group}.json" if s.group != "setup" else None}
            for s in STAGES
        ]
        summary = {
            "schema": SCHEMA, "dry_run": self.dry_run, "budget_s": self.budget, "started": self.started,
            "elapsed_s": round(self.elapsed(), 1), "finished": finished, "info": self.info,
            "environment": {"python": sys.version.split()[0], "torch": torch.__version__,
                            "torch_cuda": torch.version.cuda, "argv": sys.argv[1:]},
            "stages": stages, "files": sorted(p.name for p in self.out.iterdir() if p.name in FILES),
        }
        _write_atomic(self.out / "summary.json", json.dumps(summary, indent=1))
        text = render_summary(summary)
        _write_atomic(self.out / "summary.txt", text)
        return text


def render_summary(summary: dict) -> str:
    """The one-screen text of ``summary.json``."""
    kind = "dry run (CPU stand-ins)" if summary["dry_run"] else "GPU run"
    state = "finished" if summary["finished"] else "in progress or cut off"
    lines = [f"rmt-kernels validate: {kind}, {state}; {summary['elapsed_s']:.0f} s of a {summary['budget_s']:.0f} s "
             f"budget; started {summary['started']}"]
    lines += [f"  {line}" for line in summary["info"]]
    lines += ["", f"{'stage':<13} {'status':<8} {'seconds':>7} {'limit':>5}  result"]
    for s in summary["stages"]:
        cap = "-" if s["limit_s"] is None else f"{s['limit_s']:.0f}"
        text = s["result"] or s["reason"] or ""
        if s["result"] and s["reason"]:
            text = f"{s['reason']}; {s['result']}"
        lines.append(f"{s['stage']:<13} {s['status']:<8} {s['seconds']:>7.1f} {cap:>5}  {text}"[:160])
    lines += ["", "files: " + " ".join(summary["files"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- tests


def _params(node_id: str) -> str:
    return node_id.partition("[")[2]


def is_cuda_extension_test(node_id: str) -> bool:
    """A test of the CUDA extension: in a ``*_cuda.py`` file, or parametrized with the ``cuda`` backend."""
    path = node_id.partition("::")[0]
    return path.endswith("_cuda.py") or re.search(r"(?<![\w.])cuda(?![\w.])", _params(node_id)) is not None


def size_key(node_id: str) -> int:
    """Rough work of a test from its parameter id: tokens (``8k``, ``S1000``) times head dim (``D128``);
    1 for what the id does not say."""
    params = _params(node_id)
    tokens = [int(n) * 1024 for n in re.findall(r"(?<![\w.])(\d+)k(?![\w])", params)]
    tokens += [int(n) for n in re.findall(r"(?<![\w.])S(\d+)", params)]
    dims = [int(n) for n in re.findall(r"(?<![\w.])D(\d+)", params)]
    return max(tokens, default=1) * max(dims, default=1)


def triton_selection(node_ids: Sequence[str]) -> List[str]:
    """The Triton stage's tests: not the CUDA extension's, no float32 case, smallest first."""
    fp32 = re.compile(r"(?<!\w)(fp32|float32)(?!\w)")
    chosen = [i for i in node_ids if not is_cuda_extension_test(i) and not fp32.search(_params(i))]
    return sorted(chosen, key=size_key)


def _collect(run: Run, stage: Stage, timeout: float) -> Optional[str]:
    """Collect the ``cuda``-marked tests once (``run.collected``); returns an error, or None."""
    if run.collected is not None:
        return None
    files = sorted(p for p in TESTS.glob("test_*.py") if "mark.cuda" in p.read_text(encoding="utf-8"))
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", CUDA_MARKS,
           *(p.relative_to(ROOT) for p in files)]
    rc, timed_out, text = run.run(stage, cmd, timeout)
    if timed_out or rc not in (0, 5):
        return f"collecting the cuda tests {'timed out' if timed_out else f'exited {rc}'}: {_last_line(text)}"
    run.collected = [line.strip() for line in text.splitlines() if line.startswith("tests/") and "::" in line]
    return None


def junit_results(path: Path) -> dict:
    """Counts, failures and skip reasons of a JUnit XML report."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: List[dict] = []
    skips: Dict[str, int] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {child.tag: child for child in case}
        if "failure" in kinds or "error" in kinds:
            child = kinds.get("failure", kinds.get("error"))
            counts["failed" if child.tag == "failure" else "errors"] += 1
            failures.append({"test": name, "message": (child.get("message") or "")[:300]})
        elif "skipped" in kinds:
            counts["skipped"] += 1
            reason = (kinds["skipped"].get("message") or "")[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": skips, "source": "junit"}


def log_results(text: str) -> dict:
    """Counts from pytest's ``-v`` lines, for a run cut at its cap (its JUnit report, if any, counts the
    interrupted test as passed), and the test it was cut in."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    for node, word in re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text, re.M):
        key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors"}.get(word, "skipped")
        counts[key] += 1
        if key in ("failed", "errors"):
            failures.append({"test": node, "message": word})
    started = re.findall(r"^(\S+::\S+) *$", text, re.M)
    return {**counts, "failures": failures, "skip_reasons": {}, "source": "log",
            "interrupted_in": started[-1] if started else None}


def _pytest_stage(run: Run, stage: Stage, timeout: float, node_ids: Sequence[str]) -> Outcome:
    xml = run.tmp / f"{stage.name}.xml"
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-v", "--durations=10", f"--junitxml={xml}",
           *node_ids]
    rc, timed_out, text = run.run(stage, cmd, timeout)
    results = junit_results(xml) if xml.exists() and not timed_out else log_results(text)
    _update_json(run.out / "tests.json", stage.name,
                 {"order": list(node_ids), "exit_status": rc, "timed_out": timed_out, **results})
    result = f"{results['passed']} passed, {results['failed']} failed, {results['errors']} errors, " \
             f"{results['skipped']} skipped of {len(node_ids)}"
    if results["failures"]:
        first = results["failures"][0]
        result += f"; first: {first['test'].rpartition('::')[2]}: {first['message'][:80]}"
    if timed_out:
        where = results.get("interrupted_in")
        return Outcome("timeout", f"cut at {timeout:.0f} s" + (f" in {where}" if where else ""), result)
    if rc == 0:
        return Outcome("ok", None, result)
    return Outcome("failed", f"pytest exited {rc}", result)


def _tests(run: Run, stage: Stage, timeout: float) -> Outcome:
    """triton_tests: the cuda-marked tests that are not the CUDA extension's, no float32, smallest first
    (plus the interpreter stand-ins in a dry run); cuda_tests: the CUDA extension's, once it is built."""
    build = run.outcomes["cuda_build"]
    if stage.name == "cuda_tests" and build.status != "ok":
        return Outcome("skipped", f"needs the CUDA extension: cuda_build {build.status}")
    if not TESTS.is_dir():
        return Outcome("skipped", f"no tests at {TESTS}: run from a checkout (pip install -e .)")
    t0 = time.monotonic()
    error = _collect(run, stage, min(timeout, 90.0))
    if error:
        return Outcome("failed", error)
    if stage.name == "triton_tests":
        node_ids = triton_selection(run.collected or []) + (list(DRY_RUN_TESTS) if run.dry_run else [])
    else:
        node_ids = [i for i in run.collected or [] if is_cuda_extension_test(i)]
    if not node_ids:
        return Outcome("skipped", "no cuda-marked test selected")
    return _pytest_stage(run, stage, timeout - (time.monotonic() - t0), node_ids)


# ----------------------------------------------------------------------------------------- setup


def _info(run: Run, stage: Stage, timeout: float) -> Outcome:
    rc, timed_out, text = run.run(stage, [sys.executable, "-m", "rmt_kernels.cli", "info"], timeout)
    head = text.split("\n\n", 1)[0]
    versions = [line.strip() for line in head.splitlines() if re.match(r"^\s*[\w ]+: \S", line)]
    devices = [line.strip() for line in text.splitlines() if line.startswith("device ")]
    run.info = ([", ".join(versions)] if versions else []) + devices
    if timed_out:
        return Outcome("timeout", f"cut at {timeout:.0f} s")
    if rc != 0:
        return Outcome("failed", f"exited {rc}: {_last_line(text)}")
    return Outcome("ok", None, "; ".join(devices)[:120] or None)


def _cuda_build(run: Run, stage: Stage, timeout: float) -> Outcome:
    if run.dry_run:
        return Outcome("skipped", "dry run: the just-in-time build needs a CUDA torch, nvcc and a GPU")
    rc, timed_out, text = run.run(stage, [sys.executable, "-m", "rmt_kernels.cli", "build", "--verbose"], timeout)
    if timed_out:
        return Outcome("timeout", f"cut at {timeout:.0f} s", _last_line(text))
    if rc != 0:
        return Outcome("failed", f"exited {rc}", _last_line(text))
    return Outcome("ok", None, _last_line(text))


# ----------------------------------------------------------------------------------------- benchmarks


def excluded_provider(suite: str, provider: str, dry_run: bool) -> Optional[str]:
    """Why a bench stage leaves ``provider`` out, or None."""
    if provider == "cuda" or provider.endswith(":cuda"):
        return "the CUDA extension is built in stage cuda_build, after the benchmarks"
    if suite == "attention" and provider == "reference":
        return "the dense float32 reference is too slow for the time box; sdpa_dense is the output oracle"
    if dry_run and provider == "flex":
        return "dry run: compiling FlexAttention for the CPU takes longer than the whole dry run"
    return None


def bench_units(shapes: Sequence, modes: Sequence[str]) -> List[tuple]:
    """``(shape, modes)`` units, each recorded as soon as it is measured: attention shapes one per mask
    family (every mode), RMT mask first; other shapes one per mode."""
    units = []
    for shape in shapes:
        masks = getattr(shape, "masks", None)
        if masks:
            units.extend((dataclasses.replace(shape, masks=(m,)), tuple(modes)) for m in masks)
        else:
            units.extend((shape, (mode,)) for mode in modes)
    rank = {m: i for i, m in enumerate(MASK_PRIORITY)}
    return sorted(units, key=lambda u: rank.get((getattr(u[0], "masks", None) or ("",))[0], len(rank)))


def _bench_worker(args: argparse.Namespace) -> int:
    """Run one suite shape by shape (inside the stage's subprocess), rewriting its record in
    ``bench.json`` after each, then print its table. Exit 1 when a row failed."""
    import torch

    from ..bench import SUITES
    from ..bench.progress import Progress
    from ..bench.records import SCHEMA as BENCH_SCHEMA, environment
    from ..bench.timing import timing_config

    name, (profile, modes) = args.bench_worker, BENCH_PLANS[args.bench_worker]
    suite = SUITES[name]
    device = torch.device("cpu" if args.dry_run else "cuda")
    profile = "tiny" if args.dry_run else profile
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    excluded = {p: why for p in suite.providers if (why := excluded_provider(name, p, args.dry_run))}
    providers = [p for p in suite.providers if p not in excluded]
    units = bench_units(suite.shapes(device.type, profile), modes)[: 1 if args.dry_run else None]
    env = environment(device)
    rows: List[dict] = []
    record = {"schema": BENCH_SCHEMA, "environment": env, "complete": False, "rows": rows,
              "args": {"suite": name, "profile": profile, "modes": list(modes), "dtype": str(dtype),
                       "providers": providers, "excluded_providers": excluded}}
    path = Path(args.out) / "bench.json"
    progress = Progress(sum(suite.count_points([shape], unit_modes) for shape, unit_modes in units))
    for shape, unit_modes in units:
        rows.extend(suite.run([shape], unit_modes, providers, device, dtype, timing_config(device.type, profile),
                              env, progress))
        _update_json(path, name, record)
    progress.close()
    record["complete"] = True
    _update_json(path, name, record)
    if rows:
        suite.print_rows(rows, env)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def _geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bench_result(name: str, record: Optional[dict]) -> str:
    """One line: row counts and the headline number of the suite."""
    rows = (record or {}).get("rows") or []
    if not rows:
        return "no rows"
    count = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    text = f"{len(rows)} rows: {count['ok']} ok, {count['skipped']} skipped, {count['failed']} failed"
    ours = {"attention": "triton", "handoff": "pack_segment:triton", "step": "rmt_kernels",
            "armt": "rmt_kernels:triton"}.get(name)
    mine = [r for r in rows if r["provider"] == ours and r["status"] == "ok"]
    if name == "handoff" and any(r.get("pct_copy_bw") for r in mine):
        text += "; pack_segment:triton at " + ", ".join(f"{r['pct_copy_bw']:.0f}%" for r in mine) + " of copy bw"
    elif mine and all(r.get("ratio_to_best_peer") for r in mine):
        for mode in dict.fromkeys(r["mode"] for r in mine):
            ratios = [r["ratio_to_best_peer"] for r in mine if r["mode"] == mode]
            text += f"; {ours} {mode} vs best peer: geomean {_geomean(ratios):.2f}x (min {min(ratios):.2f}x)"
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        text += f"; first failure: {failed[0]['provider']} {failed[0]['shape']}: {failed[0]['reason'][:60]}"
    return text


def _bench_stage(run: Run, stage: Stage, timeout: float) -> Outcome:
    from ..bench import SUITES

    if stage.name not in SUITES:
        return Outcome("skipped", f"rmt_kernels.bench.SUITES has no {stage.name!r} suite")
    cmd = [sys.executable, "-m", "rmt_kernels.cli", "validate", "--out", run.out, "--bench-worker", stage.name]
    rc, timed_out, text = run.run(stage, cmd + (["--dry-run"] if run.dry_run else []), timeout)
    result = bench_result(stage.name, _read_json(run.out / "bench.json").get(stage.name))
    if timed_out:
        return Outcome("timeout", f"cut at {timeout:.0f} s (rows measured before are in bench.json)", result)
    if rc == 1:
        return Outcome("failed", "a provider failed", result)
    if rc != 0:
        return Outcome("failed", f"exited {rc}: {_last_line(text)}", result)
    return Outcome("ok", None, result)


RUNNERS: Dict[str, Callable[[Run, Stage, float], Outcome]] = {
    "info": _info, "triton_tests": _tests, "attention": _bench_stage, "handoff": _bench_stage,
    "overhead": _bench_stage, "step": _bench_stage, "armt": _bench_stage, "cuda_build": _cuda_build,
    "cuda_tests": _tests,
}


# ----------------------------------------------------------------------------------------- command


def plan_stage(stage: Stage, budget: float, remaining: float) -> Tuple[Optional[float], float, Optional[str]]:
    """``(timeout or None, cap, skip reason)``: the cap is the stage's share of the budget (at least its
    minimum); the timeout leaves the SIGKILL grace and the summary's reserve inside the budget."""
    cap = max(stage.share * budget, stage.min_s)
    room = remaining - GRACE_S - RESERVE_S
    if room < stage.min_s:
        return None, cap, f"budget: {max(remaining, 0.0):.0f} s left, the stage needs at least {stage.min_s:.0f} s"
    return min(cap, room), cap, None


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``validate`` options to ``parser``."""
    parser.description = (
        "One time-boxed validation on a GPU, in priority order: info, the cuda-marked Triton tests, the "
        "attention, handoff, overhead and step benchmarks, the CUDA extension's build and tests; every "
        "result is written to --out as it goes (at most 7 files), summary.txt last."
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    parser.add_argument("--budget", type=float, default=480.0, metavar="SECONDS",
                        help="wall-time budget of the whole run, enforced per stage (default: 480)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every stage on CPU stand-ins (tiny shapes, tests collected and skipping): for CI")
    parser.add_argument("--bench-worker", choices=tuple(BENCH_PLANS), default=None, help=argparse.SUPPRESS)


def _check_args(args: argparse.Namespace) -> Path:
    """The output folder, created once every argument is good; ValueError otherwise (a real run needs a GPU)."""
    if not 0 < args.budget < math.inf:
        raise ValueError(f"--budget must be a positive number of seconds, got {args.budget}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out: {out} exists and is not a folder")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise ValueError("no CUDA device (torch.cuda.is_available() is False): use --dry-run on a CPU")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"--out: cannot create {out}: {exc}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out: cannot write to {out}")
    return out


def run(args: argparse.Namespace) -> int:
    """Run the stages; see the module docstring for the exit status."""
    if args.bench_worker:
        return _bench_worker(args)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Children inherit an ignored SIGINT, and a stage cut at its cap is stopped by SIGINT first.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        out = _check_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name in FILES:
        (out / name).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="rmt_kernels_validate_") as tmp:
        state = Run(out.resolve(), args.budget, args.dry_run, Path(tmp))
        state.write_summary()
        for stage in STAGES:
            timeout, cap, skip = plan_stage(stage, args.budget, args.budget - state.elapsed())
            if skip:
                state.outcomes[stage.name] = Outcome("skipped", skip, cap_s=cap)
            else:
                state.outcomes[stage.name] = Outcome("running", cap_s=cap)
                state.write_summary()
                with open(state.log(stage), "a", encoding="utf-8") as f:
                    f.write(f"\n===== {stage.name}: cap {cap:.0f} s, timeout {timeout:.0f} s, {_now()} =====\n")
                t0 = time.monotonic()
                outcome = RUNNERS[stage.name](state, stage, timeout)
                outcome.seconds, outcome.cap_s, outcome.limit_s = time.monotonic() - t0, cap, timeout
                state.outcomes[stage.name] = outcome
            o = state.outcomes[stage.name]
            line = f"[validate {state.elapsed():5.0f} s] {stage.name}: {o.status}{' - ' + o.reason if o.reason else ''}"
            with open(state.log(stage), "a", encoding="utf-8") as f:
                f.write(line + "\n")
            print(line, flush=True)
            state.write_summary()
        text = state.write_summary(finished=True)
    print("\n" + text, end="", flush=True)
    return 1 if any(o.status in ("failed", "timeout") for o in state.outcomes.values()) else 0
