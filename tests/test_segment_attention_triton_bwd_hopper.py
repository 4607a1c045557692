"""The triton backward's atomic dQ path, its row statistics and its sm_90 configs.

- ``dq_atomic``: the dK/dV kernel adds each tile pair's dQ to a float32 buffer (``DQ_ATOMIC``) and no dQ
  kernel runs. Under the interpreter the default is the atomics-free path, so these tests force the
  atomic one (``dq_atomic=True``, or the default rule patched for the public entry point) and compare it
  with the float64 reference (``tests/helpers.py``'s tolerance rule) and with the atomics-free path.
- the preprocess's padded row statistics (``delta``, ``lse / scale``), which the dK/dV kernel reads
  without a row mask;
- the sm_90 configs: the first dK/dV candidates at D = 64 and 128 compiled for sm_90 (without a GPU, in a
  subprocess without the interpreter) use warpgroup MMA with N >= 64 for every product and do not spill.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from rmt_kernels import MemoryLayout  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_bwd, triton_launch  # noqa: E402

from helpers import assert_close, device_inputs  # noqa: E402
from helpers import check_against_reference as _check_against_reference  # noqa: E402

MB = "memory_bidirectional"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
check_against_reference = functools.partial(_check_against_reference, backend="triton")


@pytest.fixture
def atomic_default(monkeypatch):
    """The public entry point's backward takes the atomic dQ path (``dq_atomic=None`` resolves to True)."""
    monkeypatch.setattr(triton_launch, "dq_atomic_default", lambda q, trace=False: True)


# (layout, S, P, segment_lengths, (Hq, Hkv), head dim, prefix requires grad, dtype)
ATOMIC_CASES = [
    pytest.param(MemoryLayout(5, 5, MB), 17, 37, None, (2, 2), 16, True, torch.float32, id="S17-M5-mb-P37"),
    pytest.param(MemoryLayout(16, 16, "causal"), 63, 37, None, (4, 1), 16, True, torch.float32,
                 id="S63-M16-causal-P37-gqa4:1"),
    pytest.param(MemoryLayout(5, 5, MB), 63, 37, [63, 20], (2, 2), 16, False, torch.float32,
                 id="S63-M5-mb-P37-detached-prefix-padded"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 63, 37, [1, 63], (4, 2), 16, True, torch.float32,
                 id="S63-M16-full-P37-all-gqa4:2-padded"),
    pytest.param(MemoryLayout(0, 0, MB), 17, 1, [0, 0], (2, 1), 16, True, torch.float32,
                 id="S17-M0-mb-P1-all-rows-padded"),
    pytest.param(MemoryLayout(0, 0, MB), 63, 0, [0, 63], (2, 2), 64, True, torch.float32,
                 id="S63-M0-mb-empty-rows-D64"),
    pytest.param(MemoryLayout(16, 16, MB), 40, 3, [40, 9], (2, 1), 96, True, torch.float32,
                 id="S40-M16-mb-P3-D96-padded-dim"),
    pytest.param(MemoryLayout(5, 5, MB, "segment"), 63, 37, [63, 0], (4, 2), 32, True, torch.bfloat16,
                 id="S63-M5-mb-P37-seg-padded-gqa-bf16"),
    pytest.param(MemoryLayout(0, 16, "causal"), 65, 0, [65, 17], (2, 2), 32, True, torch.float16,
                 id="S65-M16-causal-write-only-padded-fp16"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, d, prefix_grad, dtype", ATOMIC_CASES)
def test_atomic_dq_matches_reference(device, poisoned, atomic_default, layout, s, p, lengths, heads, d, prefix_grad,
                                     dtype):
    """Output, log-sum-exp and every gradient of the public function with the atomic dQ path, against the
    reference; a detached prefix still contributes its keys' share of dQ (the prefix key blocks run with
    scratch dK/dV)."""
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), d, p, dtype=dtype, prefix_grad=prefix_grad)
    sl = None if lengths is None else torch.tensor(lengths, dtype=torch.int32, device=device)
    check_against_reference(layout, q, k, v, pk, pv, sl)


# One fixed config for both paths: the dK/dV kernel then sums dK and dV in the same order on both.
_BLOCKS = {"dkdv": dict(triton_bwd.INTERPRETER_DKDV_CONFIG), "dq": dict(triton_bwd.INTERPRETER_DQ_CONFIG)}


def _backward(device, dtype, dropout_p, dq_atomic, need_prefix_grad=True, trace=False, batch=2):
    layout = MemoryLayout(5, 5, MB)
    gen = torch.Generator().manual_seed(0)
    n, d = layout.seq_len(40), 32

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    q, k, v = rnd(batch, 4, n, d), rnd(batch, 2, n, d), rnd(batch, 2, n, d)
    pk, pv = rnd(batch, 2, 7, d), rnd(batch, 2, 7, d)
    sl = torch.tensor([40, 13, 0, 40, 7][:batch], device=device)
    seed = torch.tensor([12345], dtype=torch.int64, device=device)
    out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, 0.3, dropout_p, seed)
    dout = rnd(*out.shape)
    return triton_launch.segment_attention_bwd_triton(dout, q, k, v, pk, pv, sl, out, lse, layout, 0.3,
                                                      need_prefix_grad, dropout_p, seed, config=_BLOCKS, trace=trace,
                                                      dq_atomic=dq_atomic)


@pytest.mark.parametrize("dropout_p", [pytest.param(0.0, id="p0"), pytest.param(0.3, id="p0.3")])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16")])
def test_atomic_and_atomics_free_paths_agree(device, poisoned, dtype, dropout_p):
    """With the same config, the two paths give the same dK, dV and prefix gradients (the same kernel
    sums them; bit for bit under the interpreter) and dQ within the tolerance floor of the dtype (float32
    sums in another order), with and without dropout (the atomic dQ regenerates the same keep mask)."""
    free = _backward(device, dtype, dropout_p, False)
    atomic = _backward(device, dtype, dropout_p, True)
    for name, a, f in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), atomic, free):
        assert a.dtype == f.dtype == dtype and a.shape == f.shape, name
        if INTERPRET and name != "dq":
            assert torch.equal(a, f), name
        else:
            assert_close(a, f.double(), name=name, dtype=dtype)


def test_atomic_dq_without_prefix_gradient(device, poisoned):
    """``need_prefix_grad=False`` with a prefix: the atomic path still adds the prefix keys' share of dQ
    (its dQ equals the one with the prefix gradients) and returns no prefix gradients."""
    with_prefix = _backward(device, torch.float32, 0.0, True)
    without = _backward(device, torch.float32, 0.0, True, need_prefix_grad=False)
    assert without[3] is None and without[4] is None
    for name, a, b in zip(("dq", "dk", "dv"), without, with_prefix):
        assert_close(a, b.double(), name=name)


def test_atomic_path_visits_the_same_dkdv_tiles(device):
    """The trace of the atomic path: the dK/dV kernels' tile codes equal the atomics-free path's (the same
    schedule), and there is no dQ kernel to trace."""
    *_, free = _backward(device, torch.float32, 0.0, False, trace=True)
    *_, atomic = _backward(device, torch.float32, 0.0, True, trace=True)
    assert "dq" in free and "dq" not in atomic
    assert set(atomic) == {"dkdv", "dkdv_prefix"}
    for name in atomic:
        assert torch.equal(atomic[name], free[name]), name


@pytest.mark.skipif(not INTERPRET, reason="lowers the grid limit under the interpreter")
def test_atomic_path_over_the_grid_limit(monkeypatch):
    """With the grid limit lowered to 4 rows, the atomic path over a batch of 5 (two launches of each
    dK/dV kernel, each adding to its rows of the float32 dQ) gives the gradients of one launch."""
    whole = _backward(torch.device("cpu"), torch.float32, 0.3, True, batch=5)
    monkeypatch.setattr(triton_launch, "GRID_YZ_MAX", 4)
    chunked = _backward(torch.device("cpu"), torch.float32, 0.3, True, batch=5)
    for name, a, b in zip(("dq", "dk", "dv", "dprefix_k", "dprefix_v"), chunked, whole):
        assert torch.equal(a, b), name


def test_dq_atomic_default(device):
    """The default: atomics on a GPU outside deterministic mode, without the trace and for head dims up to
    ``DQ_ATOMIC_MAX_HEAD_DIM``; the interpreter keeps the atomics-free path."""
    q = torch.zeros(1, 1, 16, triton_launch.DQ_ATOMIC_MAX_HEAD_DIM, device=device)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert triton_launch.dq_atomic_default(q) == (not INTERPRET)
        assert not triton_launch.dq_atomic_default(q, trace=True)
        assert not triton_launch.dq_atomic_default(torch.zeros(1, 1, 16, 128, device=device))
        torch.use_deterministic_algorithms(True)
        assert not triton_launch.dq_atomic_default(q)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not triton_launch.dq_atomic_default(torch.zeros(1, 1, 16, 16))  # CPU tensors: the interpreter


def test_row_statistics_are_padded(device, monkeypatch):
    """The preprocess writes ``delta = rowsum(dO * O)`` and ``lse / scale`` for rows ``[0, N)``, and 0 and
    ``+inf`` for the padded rows up to a multiple of ``ROW_PAD`` (both halves of one buffer, one set of
    strides)."""
    seen = {}
    buffers = triton_launch._bwd_buffers

    def spy(*args):
        seen["buffers"] = buffers(*args)
        return seen["buffers"]

    monkeypatch.setattr(triton_launch, "_bwd_buffers", spy)
    layout = MemoryLayout(3, 3, MB)
    n, scale = layout.seq_len(21), 0.3
    q, k, v, _, _ = (t.detach() if t is not None else None
                     for t in device_inputs(device, 2, (2, 1), n, 16, 0))
    out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, None, None, None, layout, scale)
    dout = torch.randn_like(out)
    triton_launch.segment_attention_bwd_triton(dout, q, k, v, None, None, None, out, lse, layout, scale, False,
                                               dq_atomic=False)
    delta, lse_s = seen["buffers"][-2:]
    padded = delta.shape[-1]
    assert padded % triton_bwd.ROW_PAD == 0 and n <= padded < n + triton_bwd.ROW_PAD
    assert delta.stride() == lse_s.stride() and delta.dtype == lse_s.dtype == torch.float32
    assert_close(delta[..., :n], (dout.double() * out.double()).sum(-1), name="delta", dtype=torch.float32)
    assert_close(lse_s[..., :n], lse.double() / scale, name="lse / scale", dtype=torch.float32)
    assert torch.equal(delta[..., n:], torch.zeros_like(delta[..., n:]))
    assert torch.isposinf(lse_s[..., n:]).all()


# --------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_sm90_dkdv_candidates_lead_with_64_row_steps(head_dim, dtype):
    """The first sm_90 dK/dV candidate (the one deterministic mode runs) takes 64 query rows per step and
    64 keys per warpgroup; the earlier 32-row candidates stay in the list."""
    configs = triton_bwd.dkdv_configs(head_dim, dtype, 90)
    first = configs[0]
    assert first["BLOCK_M"] >= 64 and first["BLOCK_N"] == 64 * first["num_warps"] // 4, first
    assert any(c["BLOCK_M"] == 32 for c in configs)


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("head_dim", [16, 32, 64, 96, 128])
def test_tf32_takes_tensor_core_tiles(arch, head_dim):
    """float32 inputs with TF32 products get their own tables of tensor-core sized tiles, each larger
    than every tile of the IEEE float32 tables (small tiles for FMA products); D = 256 has none."""
    for configs_fn in (triton_bwd.dkdv_configs, triton_bwd.dq_configs):
        tf32 = configs_fn(head_dim, torch.float32, arch, tf32=True)
        ieee = configs_fn(head_dim, torch.float32, arch)
        area = [c["BLOCK_M"] * c["BLOCK_N"] for c in tf32]
        assert min(area) > max(c["BLOCK_M"] * c["BLOCK_N"] for c in ieee), (tf32, ieee)
    assert triton_bwd.dkdv_configs(256, torch.float32, arch, tf32=True) == triton_bwd.dkdv_configs(
        256, torch.float32, arch)


_SASS_SCRIPT = r"""
import collections, json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from rmt_kernels.tools import aot_triton as aot

mod = aot._op_aot("segment_attention")
fn, configs_fn, flags = mod.kernel_table()["segment_attention_bwd_dkdv"]
rows = []
for head_dim, variant in json.loads(sys.argv[1]):
    import torch
    dtype = "bf16"
    config = dict(configs_fn(head_dim, torch.bfloat16, 90, dq_atomic=variant.get("DQ_ATOMIC", False))[0])
    for spec in ("generic", "common"):
        cfg = dict(config)
        options = {key: cfg.pop(key) for key in ("num_warps", "num_stages")}
        consts = dict(flags, **cfg, **variant)
        consts.update(mod.derived_constexprs(fn, dtype, head_dim))
        signature, consts, attrs = aot._signature(
            fn, consts, lambda name: mod.arg_kind("segment_attention_bwd_dkdv", name, dtype, consts), spec)
        k = triton.compile(aot._ast_source(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=options)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([aot._tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                                   text=True, check=True).stdout
            sass = subprocess.run([aot._tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True,
                                  check=True).stdout
        fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
        rows.append(dict(head_dim=head_dim, variant=variant, spec=spec, config=config,
                         spill=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                         hgmma=sorted(set(re.findall(r"HGMMA\.(\d+x\d+x\d+)", sass))),
                         hmma=len(re.findall(r"\bHMMA\.", sass)),
                         atomics=len(re.findall(r"\bREDG?\.|\bATOMG?\.", sass))))
print(json.dumps(rows))
"""


def test_sm90_dkdv_products_are_wide_warpgroup_mmas():
    """Compiled for sm_90 (Triton ahead of time, no GPU), the first bfloat16 dK/dV candidate at D = 64 and
    D = 128 runs every product as HGMMA with N >= 64 (``64x64x16``, ``64x128x16``) and spills nothing, in
    both specializations; the atomic dQ variant's first D = 64 candidate too, with its atomics in the SASS."""
    jobs = [(64, {}), (128, {}), (64, {"DQ_ATOMIC": True})]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _SASS_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * len(jobs)
    for row in rows:
        assert row["spill"] == 0, row
        assert row["hgmma"] and row["hmma"] == 0, row
        assert all(int(shape.split("x")[1]) >= 64 for shape in row["hgmma"]), row
        assert (row["atomics"] > 0) == bool(row["variant"].get("DQ_ATOMIC")), row


@pytest.mark.cuda
@pytest.mark.parametrize("d", [pytest.param(64, id="D64"), pytest.param(128, id="D128")])
def test_atomic_dq_on_gpu(poisoned, atomic_default, d):
    """The atomic dQ path on a GPU (autotuned configs), bfloat16, a long padded segment with a prefix and
    grouped-query heads: every gradient against the float64 reference."""
    device = torch.device("cuda")
    layout = MemoryLayout(16, 16, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (8, 2), layout.seq_len(1000), d, 37, dtype=torch.bfloat16)
    sl = torch.tensor([1000, 611], dtype=torch.int32, device=device)
    check_against_reference(layout, q, k, v, pk, pv, sl)
