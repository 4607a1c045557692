"""More than one process: DDP and FSDP2 (``fully_shard``) with every integration and the driver's
streamed truncated BPTT, against single-process runs on the same global batch (SPEC §8).

Two processes on this machine over the gloo backend on the loopback interface (a free port per launch,
a timeout per process) run every case of ``tests/_dist_worker.py`` once; the tests below read its
report. The ``cuda`` version runs the same cases over NCCL on two GPUs. Single-process tests of the
pieces that make it work (the output's pytree round trip, the driver's sync handling) come last.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.utils._pytree as pytree

from rmt_kernels import MemoryLayout, SegmentDriver
from rmt_kernels.streamed import no_sync_context

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_worker.py"
EXAMPLE = ROOT / "benchmarks" / "ddp_example.py"
TIMEOUT_S = 300
EXAMPLE_TIMEOUT_S = 150
TOLERANCE = 1e-5  # float32: max |g - g_ref| / max |g_ref| over every parameter
GROUPS = ("rmt/", "hf/", "lucidrains/", "driver/")


# --------------------------------------------------------------------------- launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    for child in children:
        _kill_tree(int(child))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _env(rank: int, world: int, port: int, **extra) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", **extra)
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    return env


def _run_ranks(args, logs: Path, world: int = 2, **extra) -> list:
    """``python args...`` as ``world`` ranks, each writing to a log file under ``logs`` (a pipe could
    fill up and block a rank inside a collective); all killed at ``TIMEOUT_S``. Returns their
    ``(returncode, output)``."""
    port = _free_port()
    procs = []
    for rank in range(world):
        out = open(logs / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, *map(str, args)], env=_env(rank, world, port, **extra),
                                       cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True), out))
    deadline, killed = time.monotonic() + TIMEOUT_S, False
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            killed = True
            for other, _ in procs:
                if other.poll() is None:
                    os.killpg(other.pid, signal.SIGKILL)
            proc.wait()
    results = []
    for rank, (proc, out) in enumerate(procs):
        out.close()
        text = (logs / f"rank{rank}.log").read_text()
        results.append((proc.returncode, f"(killed after {TIMEOUT_S} s)\n{text}" if killed else text))
    return results


def _report(tmp_path_factory, **extra) -> dict:
    logs = tmp_path_factory.mktemp("dist")
    path = logs / "report.json"
    ranks = _run_ranks([WORKER, path], logs, **extra)
    text = "\n".join(f"--- rank {r} (exit {rc})\n{out[-3000:]}" for r, (rc, out) in enumerate(ranks))
    assert all(rc == 0 for rc, _ in ranks) and path.is_file(), text
    report = json.loads(path.read_text())
    print("\n".join(f"{name}: {value}" for name, value in report.items()))
    return report


def _check(report: dict, group: str) -> None:
    cases = {k: v for k, v in report.items() if k.startswith(group)}
    assert cases, f"no {group} case ran"
    failed = {k: v.get("error") or v["max_rel_diff"] for k, v in cases.items()
              if "error" in v or not v["max_rel_diff"] <= TOLERANCE}
    traces = "\n".join(v.get("trace", "") for v in cases.values())
    assert not failed, f"{failed}\n{traces}"
    for name, value in cases.items():
        if "allreduce_calls_per_step" in value:
            assert value["allreduce_calls_per_step"] == value["expected_allreduce_calls"], (name, value)


@pytest.fixture(scope="module")
def gloo_report(tmp_path_factory):
    return _report(tmp_path_factory)


@pytest.mark.parametrize("group", GROUPS)
def test_two_processes_gloo_match_one_process(gloo_report, group):
    _check(gloo_report, group)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_processes_nccl_match_one_process(tmp_path_factory):
    report = _report(tmp_path_factory, RMT_DIST_BACKEND="nccl")
    for group in GROUPS:
        _check(report, group)


def test_readme_example_runs_under_torchrun(tmp_path):
    """``torchrun --nproc-per-node 2 benchmarks/ddp_example.py`` (gloo on CPU), as the README says. Its
    output goes to a file: torchrun's workers, started from pytest, may not exit while a pipe holds it."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), str(EXAMPLE), "--steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=EXAMPLE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_tree(proc.pid)  # torchrun's workers are not in its process group
            proc.wait()
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    assert "replicas equal" in text, text[-4000:]


# --------------------------------------------------------------------------- single process


@pytest.fixture(scope="module")
def wrapper():
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=64, bos_token_id=0, eos_token_id=0)
    return RecurrentWrapper(MemoryCell(GPT2LMHeadModel(cfg), 2, attn_implementation="rmt_kernels"),
                            segment_size=8, max_n_segments=4)


def test_wrapper_output_round_trips_through_pytree(wrapper):
    ids = torch.randint(0, 64, (2, 20))
    out = wrapper(input_ids=ids, labels=ids, output_hidden_states=True)
    leaves, spec = pytree.tree_flatten(out)
    back = pytree.tree_unflatten(leaves, spec)
    assert type(back) is type(out) and list(back.keys()) == list(out.keys())
    assert "logits_0" not in out.keys() and back.segment_bounds == ((0, 8), (8, 16), (16, 20))
    # the original's per-segment keys still read the segments
    assert torch.equal(back["logits_2"], out.logits[:, 16:]) and torch.equal(back.logits_1, out.logits[:, 8:16])
    assert torch.equal(out["hidden_states_1"][0], out.hidden_states[0][:, 8:16])
    assert torch.equal(out.segment_logits[0], out.logits[:, :8]) and len(out.segment_hidden_states) == 3
    with pytest.raises(KeyError):
        out["logits_3"]
    assert not hasattr(out, "logits_3") and not hasattr(out, "other")
    assert all(not t._is_view() for t in leaves if isinstance(t, torch.Tensor))
    no_labels = wrapper(input_ids=ids)
    assert pytree.tree_unflatten(*pytree.tree_flatten(no_labels)).loss == 0


class _Sync:
    """A stand-in ``no_sync``: tells whether the code runs inside its context."""

    def __init__(self):
        self.inside = False

    def __call__(self):
        sync = self

        class _Ctx:
            def __enter__(self):
                sync.inside = True

            def __exit__(self, *exc):
                sync.inside = False

        return _Ctx()


def _streamed_run(k2, no_sync=None, bounds_count=6):
    torch.manual_seed(0)
    d, vocab, m = 8, 20, 2
    emb, lin = nn.Embedding(vocab, d), nn.Linear(d, d)
    memory = nn.Parameter(torch.randn(m, d))
    hooks = []
    for p in (memory, emb.weight, lin.weight):
        p.register_post_accumulate_grad_hook(
            lambda p: hooks.append("inside" if no_sync and no_sync.inside else "outside"))
    driver = SegmentDriver(MemoryLayout(m, m, mask="causal"), segment_size=3, k2=k2, max_n_segments=bounds_count)
    ids = torch.randint(0, vocab, (2, 3 * bounds_count))
    res = driver.run(lambda packed, info: torch.tanh(lin(packed)), memory, input_ids=ids,
                     embedding_weight=emb.weight, loss_fn=lambda out, info: out.square().mean(), no_sync=no_sync)
    return res, {"memory": memory.grad, "emb": emb.weight.grad, "lin": lin.weight.grad}, hooks


def test_streamed_run_syncs_once_with_every_gradient_in_the_last_backward():
    _, plain, plain_hooks = _streamed_run(k2=1)
    sync = _Sync()
    _, synced, hooks = _streamed_run(k2=1, no_sync=sync)
    for name in plain:
        assert torch.equal(plain[name], synced[name]), name
    # the memory (read by segment 0 only) gets its gradient once, in the last backward, outside no_sync
    assert hooks.count("outside") == 3, hooks
    assert hooks[-3:] == ["outside"] * 3 and set(hooks[:-3]) == {"inside"}
    # without truncation there is one graph, one backward: nothing runs in the context
    sync_full = _Sync()
    _, _, full_hooks = _streamed_run(k2=-1, no_sync=sync_full)
    assert full_hooks == ["outside"] * 3


def test_no_sync_context_and_argument_checks():
    assert no_sync_context(None) is None
    ctx = _Sync()
    assert no_sync_context(ctx) is ctx
    with pytest.raises(TypeError, match="neither"):
        no_sync_context(nn.Linear(2, 2))
    with pytest.raises(TypeError):
        no_sync_context(3)
    driver = SegmentDriver(MemoryLayout(2, 2, mask="causal"), segment_size=3)
    with pytest.raises(ValueError, match="loss_fn"):
        driver.run(lambda p, i: p, torch.randn(2, 4), inputs_embeds=torch.randn(1, 6, 4), no_sync=ctx)
