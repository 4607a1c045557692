"""Every bad input raises ValueError/TypeError naming the argument; unavailable backends raise
BackendUnavailableError saying why. Checked on both public entry points that validate inputs."""

from __future__ import annotations

import functools
import re
import warnings

import pytest
import torch

import rmt_kernels
from rmt_kernels import BackendUnavailableError, MemoryLayout, segment_attention, segment_attention_ref
from rmt_kernels import _extension, backends
from rmt_kernels.ops.segment_attention.interface import OP

LAYOUT = MemoryLayout(2, 2, "memory_bidirectional")
B, HQ, HKV, S, D, P = 2, 4, 2, 5, 16, 3
N = 2 + S + 2

ENTRY_POINTS = [
    pytest.param(functools.partial(segment_attention, backend="torch"), id="segment_attention-torch"),
    pytest.param(segment_attention, id="segment_attention-auto"),
    pytest.param(segment_attention_ref, id="segment_attention_ref"),
]


def good_inputs(**overrides):
    args = dict(
        q=torch.randn(B, HQ, N, D),
        k=torch.randn(B, HKV, N, D),
        v=torch.randn(B, HKV, N, D),
        layout=LAYOUT,
        segment_lengths=torch.tensor([S, 1]),
        prefix_k=torch.randn(B, HKV, P, D),
        prefix_v=torch.randn(B, HKV, P, D),
        scale=None,
    )
    args.update(overrides)
    return args


def call(fn, args):
    args = dict(args)
    q, k, v, layout = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("layout")
    return fn(q, k, v, layout, **args)


def test_good_inputs_pass(monkeypatch):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    for param in ENTRY_POINTS:
        assert call(param.values[0], good_inputs()).shape == (B, HQ, N, D)


META = torch.device("meta")

BAD_INPUTS = [
    # argument types and ranks
    pytest.param(dict(q=[[1.0]]), TypeError, r"\bq\b", id="q-not-a-tensor"),
    pytest.param(dict(k=torch.randn(B, HKV, N)), ValueError, r"\bk\b.*4-D", id="k-3d"),
    pytest.param(dict(v=torch.randn(1, B, HKV, N, D)), ValueError, r"\bv\b.*4-D", id="v-5d"),
    pytest.param(dict(layout=(2, 2)), TypeError, r"layout", id="layout-not-MemoryLayout"),
    # dtypes
    pytest.param(dict(q=torch.randint(0, 3, (B, HQ, N, D))), TypeError, r"\bq\b.*dtype", id="q-int64"),
    pytest.param(dict(q=torch.randn(B, HQ, N, D).to(torch.int32),
                      k=torch.randn(B, HKV, N, D).to(torch.int32),
                      v=torch.randn(B, HKV, N, D).to(torch.int32)), TypeError, r"\bq\b.*dtype", id="all-int32"),
    pytest.param(dict(k=torch.randn(B, HKV, N, D, dtype=torch.float16)), TypeError, r"\bk\b.*dtype",
                 id="k-dtype-mismatch"),
    pytest.param(dict(v=torch.randn(B, HKV, N, D, dtype=torch.bfloat16)), TypeError, r"\bv\b.*dtype",
                 id="v-dtype-mismatch"),
    pytest.param(dict(prefix_k=torch.randn(B, HKV, P, D, dtype=torch.float16)), TypeError, r"prefix_k.*dtype",
                 id="prefix_k-dtype-mismatch"),
    # devices ('meta' stands in for a second device)
    pytest.param(dict(k=torch.empty(B, HKV, N, D, device=META)), ValueError, r"\bk\b.*meta", id="k-device-mismatch"),
    pytest.param(dict(v=torch.empty(B, HKV, N, D, device=META)), ValueError, r"\bv\b.*meta", id="v-device-mismatch"),
    pytest.param(dict(prefix_v=torch.empty(B, HKV, P, D, device=META)), ValueError, r"prefix_v.*meta",
                 id="prefix_v-device-mismatch"),
    pytest.param(dict(segment_lengths=torch.empty(B, dtype=torch.int64, device=META)), ValueError,
                 r"segment_lengths.*meta", id="segment_lengths-device"),
    # shapes and heads
    pytest.param(dict(v=torch.randn(B, HKV, N, D + 1)), ValueError, r"\bk\b and \bv\b", id="k-v-shape-mismatch"),
    pytest.param(dict(k=torch.randn(B + 1, HKV, N, D), v=torch.randn(B + 1, HKV, N, D)), ValueError, r"\bk\b.*batch",
                 id="k-batch-mismatch"),
    pytest.param(dict(k=torch.randn(B, HKV, N + 1, D), v=torch.randn(B, HKV, N + 1, D)), ValueError,
                 r"k/v.*positions", id="k-length-mismatch"),
    pytest.param(dict(k=torch.randn(B, HKV, N, D + 8), v=torch.randn(B, HKV, N, D + 8)), ValueError,
                 r"k/v head dim", id="k-head-dim-mismatch"),
    pytest.param(dict(k=torch.randn(B, 3, N, D), v=torch.randn(B, 3, N, D), prefix_k=None, prefix_v=None), ValueError,
                 r"q heads \(4\).*multiple of k/v heads \(3\)", id="Hq-not-multiple-of-Hkv"),
    pytest.param(dict(q=torch.randn(B, 1, N, D)), ValueError, r"q heads \(1\).*multiple of k/v heads \(2\)",
                 id="Hkv-greater-than-Hq"),
    pytest.param(dict(q=torch.randn(B, HQ, N, 0), k=torch.randn(B, HKV, N, 0), v=torch.randn(B, HKV, N, 0),
                      prefix_k=None, prefix_v=None), ValueError, r"head dim D=0", id="head-dim-0"),
    pytest.param(dict(q=torch.randn(B, HQ, 3, D), k=torch.randn(B, HKV, 3, D), v=torch.randn(B, HKV, 3, D),
                      segment_lengths=None), ValueError, r"N=3.*num_read \+ num_write", id="N-below-R+W"),
    # segment_lengths
    pytest.param(dict(segment_lengths=torch.tensor([S + 1, 0])), ValueError, r"segment_lengths.*\[0, 5\]",
                 id="segment_lengths-above-S"),
    pytest.param(dict(segment_lengths=torch.tensor([-1, 2])), ValueError, r"segment_lengths.*\[0, 5\]",
                 id="segment_lengths-negative"),
    pytest.param(dict(segment_lengths=torch.tensor([S, S, S])), ValueError, r"segment_lengths.*shape",
                 id="segment_lengths-wrong-length"),
    pytest.param(dict(segment_lengths=torch.tensor([[S, S]])), ValueError, r"segment_lengths.*shape",
                 id="segment_lengths-2d"),
    pytest.param(dict(segment_lengths=torch.tensor([5.0, 1.0])), TypeError, r"segment_lengths.*integer",
                 id="segment_lengths-float"),
    pytest.param(dict(segment_lengths=torch.tensor([True, False])), TypeError, r"segment_lengths.*integer",
                 id="segment_lengths-bool"),
    pytest.param(dict(segment_lengths=[S, 1.5]), TypeError, r"segment_lengths\[i\] must be an int, got float",
                 id="segment_lengths-list-of-floats"),
    # prefix
    pytest.param(dict(prefix_v=None), ValueError, r"prefix_k and prefix_v.*together", id="only-prefix_k"),
    pytest.param(dict(prefix_k=None), ValueError, r"prefix_k and prefix_v.*together", id="only-prefix_v"),
    pytest.param(dict(prefix_v=torch.randn(B, HKV, P + 1, D)), ValueError, r"prefix_k and prefix_v.*same shape",
                 id="prefix-length-mismatch"),
    pytest.param(dict(prefix_k=torch.randn(B, HQ, P, D), prefix_v=torch.randn(B, HQ, P, D)), ValueError,
                 r"prefix_k/prefix_v must be \[B, H_kv, P, D\]", id="prefix-heads-mismatch"),
    pytest.param(dict(prefix_k=torch.randn(1, HKV, P, D), prefix_v=torch.randn(1, HKV, P, D)), ValueError,
                 r"prefix_k/prefix_v must be \[B, H_kv, P, D\]", id="prefix-batch-mismatch"),
    pytest.param(dict(prefix_k=torch.randn(B, HKV, P, D + 1), prefix_v=torch.randn(B, HKV, P, D + 1)), ValueError,
                 r"prefix_k/prefix_v must be \[B, H_kv, P, D\]", id="prefix-head-dim-mismatch"),
    pytest.param(dict(prefix_k=torch.randn(HKV, P, D)), ValueError, r"prefix_k.*4-D", id="prefix_k-3d"),
    # scale
    pytest.param(dict(scale="0.1"), TypeError, r"scale", id="scale-str"),
    pytest.param(dict(scale=True), TypeError, r"scale", id="scale-bool"),
    pytest.param(dict(scale=float("nan")), ValueError, r"scale.*finite", id="scale-nan"),
    pytest.param(dict(scale=float("inf")), ValueError, r"scale.*finite", id="scale-inf"),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS)
@pytest.mark.parametrize("overrides, exc, match", BAD_INPUTS)
def test_bad_inputs_raise(monkeypatch, fn, overrides, exc, match):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    with pytest.raises(exc, match=match):
        call(fn, good_inputs(**overrides))


def test_float64_is_supported_by_torch_backend_and_reference():
    args = good_inputs(**{name: torch.randn(*t.shape, dtype=torch.float64)
                          for name, t in good_inputs().items() if name in ("q", "k", "v", "prefix_k", "prefix_v")})
    assert call(functools.partial(segment_attention, backend="torch"), args).dtype == torch.float64
    assert call(segment_attention_ref, args).dtype == torch.float64


def test_float64_rejected_where_a_backend_lacks_it():
    # A kernel backend registers its dtypes; the shared check rejects others with the backend named.
    from rmt_kernels._checks import KERNEL_DTYPES, check_attention_inputs

    args = good_inputs(**{name: torch.randn(*t.shape, dtype=torch.float64)
                          for name, t in good_inputs().items() if name in ("q", "k", "v", "prefix_k", "prefix_v")})
    with pytest.raises(TypeError, match=r"q has dtype torch.float64; the triton backend supports"):
        check_attention_inputs(args["q"], args["k"], args["v"], LAYOUT, args["segment_lengths"], args["prefix_k"],
                               args["prefix_v"], dtypes=KERNEL_DTYPES, backend="triton")
    with pytest.raises(ValueError, match=r"head dim D=16 is not supported by the cuda backend"):
        check_attention_inputs(args["q"].float(), args["k"].float(), args["v"].float(), LAYOUT, head_dims=(64, 128),
                               backend="cuda")


# --------------------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", ["gpu", "Torch", "", None, 1], ids=repr)
def test_invalid_backend_argument(monkeypatch, backend):
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    with pytest.raises(ValueError, match=r"backend must be one of"):
        call(functools.partial(segment_attention, backend=backend), good_inputs())


@pytest.mark.parametrize("value", ["gpu", "TORCH", "cpu"])
def test_invalid_env_backend(monkeypatch, value):
    monkeypatch.setenv("RMT_KERNELS_BACKEND", value)
    with pytest.raises(ValueError, match=rf"RMT_KERNELS_BACKEND must be one of .*{re.escape(repr(value))}"):
        call(segment_attention, good_inputs())


def test_env_backend_is_overridden_by_explicit_backend(monkeypatch):
    monkeypatch.setenv("RMT_KERNELS_BACKEND", "cuda")
    args = good_inputs()
    out = call(functools.partial(segment_attention, backend="torch"), args)
    assert out.shape == (B, HQ, N, D)
    monkeypatch.setenv("RMT_KERNELS_BACKEND", "torch")
    torch.testing.assert_close(call(segment_attention, args), out)


def _unavailable(monkeypatch, backend):
    """Make sure ``backend`` is registered for the op but cannot run on CPU tensors; return the reason.

    A backend the tree does not (yet) register is stood in for by a CUDA-only fake, so that the check
    does not depend on which kernels are present."""
    if backend == "triton":
        # Without the interpreter Triton cannot run CPU tensors, whatever the op registers.
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    if backend not in backends._REGISTRY[OP]:
        fake = backends.BackendImpl(fwd=None, bwd=None, dtypes=(torch.float32,), devices=("cuda",))
        monkeypatch.setitem(backends._REGISTRY[OP], backend, fake)
    ok, reason = backends.backend_status(OP, backend, torch.device("cpu"))
    assert not ok and reason
    return reason


@pytest.mark.parametrize("via_env", [False, True], ids=["argument", "RMT_KERNELS_BACKEND"])
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_unavailable_backend_says_why(monkeypatch, backend, via_env):
    reason = _unavailable(monkeypatch, backend)
    if via_env:
        monkeypatch.setenv("RMT_KERNELS_BACKEND", backend)
        fn = segment_attention
    else:
        monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
        fn = functools.partial(segment_attention, backend=backend)
    with pytest.raises(BackendUnavailableError) as info:
        call(fn, good_inputs())
    message = str(info.value)
    assert backend in message and reason in message
    assert isinstance(info.value, RuntimeError)
    assert rmt_kernels.BackendUnavailableError is BackendUnavailableError


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backend_the_op_lacks(monkeypatch, backend):
    # Asked for explicitly: an error that says the op has no such backend. Asked for through
    # RMT_KERNELS_BACKEND (a preference for every op): the op keeps its automatic choice.
    monkeypatch.delitem(backends._REGISTRY[OP], backend, raising=False)
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    with pytest.raises(BackendUnavailableError, match=rf"no {backend} implementation of {OP}"):
        call(functools.partial(segment_attention, backend=backend), good_inputs())
    monkeypatch.setenv("RMT_KERNELS_BACKEND", backend)
    assert backends.resolve_backend(OP, "auto", torch.device("cpu")) == "torch"


def test_cuda_status_on_cpu_only_torch():
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    ok, reason = _extension.cuda_status(torch.device("cuda"))
    assert not ok and "CPU-only" in reason


def test_triton_status_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = backends.triton_status(torch.device("cpu"))
    assert not ok and ("TRITON_INTERPRET=1" in reason or "not installed" in reason)


# --------------------------------------------------------------------------- integral and real arguments


def test_layout_takes_numpy_and_tensor_integers():
    np = pytest.importorskip("numpy")
    layout = MemoryLayout(np.int64(2), torch.tensor(3), "causal")
    assert layout == MemoryLayout(2, 3, "causal") and hash(layout) == hash(MemoryLayout(2, 3, "causal"))
    assert type(layout.num_read) is int and type(layout.num_write) is int
    with pytest.raises(TypeError, match="num_read must be an int, got float"):
        MemoryLayout(2.0, 2)
    with pytest.raises(TypeError, match="num_write must be an int, got bool"):
        MemoryLayout(2, True)


def test_driver_sizes_are_integers():
    from rmt_kernels import SegmentDriver

    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match="segment_size must be an int, got float"):
        SegmentDriver(MemoryLayout(2, 2), 4.0)
    driver = SegmentDriver(MemoryLayout(2, 2), np.int64(4), k2=np.int32(1), max_n_segments=np.int64(3))
    assert (driver.segment_size, driver.k2, driver.max_n_segments) == (4, 1, 3)


def test_segment_lengths_as_a_list():
    q, k, v = (torch.randn(2, 2, 12, 16) for _ in range(3))
    layout = MemoryLayout(2, 2)
    want = segment_attention(q, k, v, layout, segment_lengths=torch.tensor([8, 3]))
    assert torch.equal(segment_attention(q, k, v, layout, segment_lengths=[8, 3]), want)
    assert torch.equal(segment_attention_ref(q, k, v, layout, segment_lengths=[8, 3]),
                       segment_attention_ref(q, k, v, layout, segment_lengths=torch.tensor([8, 3])))


@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_non_positive_scale_is_exact_on_the_torch_backend(scale):
    q, k, v = (torch.randn(2, 2, 12, 16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for layout in (MemoryLayout(0, 0, "causal"), MemoryLayout(2, 2)):
        out = segment_attention(q, k, v, layout, scale=scale, backend="torch")
        ref = segment_attention_ref(q, k, v, layout, scale=scale)
        assert torch.isfinite(out).all()
        assert torch.allclose(out, ref, atol=1e-12, rtol=0)
        g = torch.autograd.grad(out.sum(), (q, k, v))
        g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)


def test_messages_name_the_real_problem():
    q = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match=r"H_kv >= 1"):
        segment_attention(q, q[:, :0], q[:, :0], MemoryLayout(2, 2))
    with pytest.raises(ValueError, match=r"expected the CPU$"):
        segment_attention(q, q, q, MemoryLayout(2, 2), segment_lengths=torch.tensor([3], device="meta"))
    bnhd = torch.randn(1, 6, 2, 16)  # [B, N, H, D] passed without the transpose
    with pytest.raises(ValueError, match=r"\.transpose\(1, 2\)"):
        segment_attention(bnhd, bnhd, bnhd, MemoryLayout(4, 4))


def test_auto_passes_over_a_backend_that_cannot_take_the_call(monkeypatch):
    ran = []

    def fake(name, head_dims):
        def fwd(*args):
            ran.append(name)

        return backends.BackendImpl(fwd=fwd, bwd=fwd, dtypes=(torch.float32,), head_dims=head_dims,
                                    devices=("cuda",), status=lambda device: (True, "fake"))

    op = "fake_op_for_auto"
    monkeypatch.setitem(backends._REGISTRY, op, {"triton": fake("triton", (64,)), "torch": fake("torch", None)})
    monkeypatch.setattr(backends, "_WARNED", set())
    monkeypatch.delenv(backends.ENV_BACKEND, raising=False)
    cuda = torch.device("cuda")
    assert backends.resolve_backend(op, "auto", cuda, torch.float32, 64) == "triton"
    with pytest.warns(RuntimeWarning, match="triton backend of fake_op_for_auto does not support head dim 80"):
        assert backends.resolve_backend(op, "auto", cuda, torch.float32, 80) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve_backend(op, "auto", cuda, torch.float32, 80) == "torch"  # warned once
    # An explicit choice is never replaced: the backend itself then raises its clear error.
    assert backends.resolve_backend(op, "triton", cuda, torch.float32, 80) == "triton"
