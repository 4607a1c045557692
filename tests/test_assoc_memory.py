"""ARMT's associative memory ops (``assoc_read`` / ``assoc_write``) on the torch backend: the
reference against a hand computation, the backend against the reference (forward and backward, both
official variants, heads 1/2, ``use_denom``, ``gating``, ``correction``, first and later segments,
16-bit models with a float32 state), float64 gradcheck, full BPTT over several segments, the custom
ops (opcheck, ``torch.compile(fullgraph=True)``) and argument errors. The Triton backend is checked
against this one in ``test_assoc_memory_triton.py``."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from rmt_kernels.ops.assoc_memory import interface, torch_impl
from rmt_kernels.ops.assoc_memory.interface import assoc_read, assoc_write
from rmt_kernels.reference import assoc_read_ref, assoc_write_ref, dpfp_ref

from helpers import assert_close

VARIANTS = [  # (n_heads, normalize, use_denom, correction, gating)
    pytest.param(1, True, True, True, False, id="experimental-h1"),
    pytest.param(2, True, True, True, False, id="experimental-h2"),
    pytest.param(2, True, True, True, True, id="experimental-h2-gating"),
    pytest.param(1, True, False, True, False, id="experimental-nodenom"),
    pytest.param(2, True, True, False, False, id="experimental-nocorrection"),
    pytest.param(1, False, True, True, False, id="framework_accel"),
    pytest.param(1, False, True, False, True, id="framework_accel-gating-nocorrection"),
]


def _state(b, h, d_mem, d, dtype=torch.float32, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    key = 6 * d_mem // h
    A = torch.randn(b, h, key, d // h, generator=g, dtype=dtype)
    z = torch.rand(b, h, key, generator=g, dtype=dtype) + 0.5  # a reachable normaliser (sums of features)
    return A.requires_grad_(grad), z.requires_grad_(grad)


def _write_inputs(b, m, d_mem, d, h, gating, dtype=torch.float32, grad=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, m, d_mem, generator=g).to(dtype)
    v = torch.randn(b, m, d, generator=g).to(dtype)
    beta = torch.randn(b, m, d if gating else h, generator=g).to(dtype)
    return [t.requires_grad_(grad) for t in (k, v, beta)]


# --------------------------------------------------------------------------- reference


def test_dpfp_reference_by_hand():
    u = torch.tensor([[1.0, -2.0]])  # p = 2: r = [relu(u) | relu(-u)] = [1, 0, 0, 2]
    # roll(r, 1) = [2, 1, 0, 0], roll(r, 2) = [0, 2, 1, 0], roll(r, 3) = [0, 0, 2, 1]
    expected = torch.tensor([2.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2])
    assert torch.equal(dpfp_ref(u, False)[0], expected)
    torch.testing.assert_close(dpfp_ref(u, True)[0], expected / expected.norm())
    assert torch.equal(dpfp_ref(torch.zeros(1, 3), True), torch.zeros(1, 18))  # F.normalize keeps a zero row


def test_read_write_reference_by_hand():
    # One head, one memory row, d_mem = 2: k = [0.5, -1] gives r = [0.5, 0, 0, 1] and
    # phi = [r * roll(r, 1) | r * roll(r, 2) | r * roll(r, 3)] = [0.5, 0, 0, 0 | 0, 0, 0, 0 | 0, 0, 0, 0.5].
    k = torch.tensor([[[0.5, -1.0]]], dtype=torch.float64)
    phi = torch.tensor([0.5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0.5], dtype=torch.float64)
    v = torch.tensor([[[3.0, -1.0]]], dtype=torch.float64)
    b = torch.tensor([[[0.0]]], dtype=torch.float64)  # beta = 0.5
    A, z = assoc_write_ref(k, v, b, None, None, n_heads=1, normalize=False)
    torch.testing.assert_close(A[0, 0], 0.5 * torch.outer(phi, v[0, 0]))
    torch.testing.assert_close(z[0, 0], phi)
    # Reading with the same key gives back beta * v: (phi A) / (phi z + eps).
    y = assoc_read_ref(torch.zeros(1, 1, 2, dtype=torch.float64), k, A, z, n_heads=1, normalize=False)
    torch.testing.assert_close(y[0, 0], 0.5 * v[0, 0] * (phi @ phi) / (phi @ phi + 1e-5))
    # A second write of the same pair: vbar = y, gamma = clip(1 - (phi.z + eps) / (|phi|^2 + eps)) = 0.
    A2, z2 = assoc_write_ref(k, v, b, A, z, n_heads=1, normalize=False)
    torch.testing.assert_close(z2, z)
    torch.testing.assert_close(A2[0, 0], A[0, 0] + 0.5 * torch.outer(phi, v[0, 0] - y[0, 0]))


# --------------------------------------------------------------------------- torch backend vs reference


@pytest.mark.parametrize("n_heads, normalize, use_denom, correction, gating", VARIANTS)
@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_torch_backend_matches_reference(n_heads, normalize, use_denom, correction, gating, first):
    b, n, m, d_mem, d = 2, 9, 3, 4, 8
    opts = dict(n_heads=n_heads, normalize=normalize, use_denom=use_denom)
    A, z = (None, None) if first else _state(b, n_heads, d_mem, d, torch.float64, grad=True)
    k, v, beta = _write_inputs(b, m, d_mem, d, n_heads, gating, torch.float64, grad=True)
    A2, z2 = assoc_write(k, v, beta, A, z, correction=correction, gating=gating, backend="torch", **opts)
    A2r, z2r = assoc_write_ref(k, v, beta, A, z, correction=correction, gating=gating, **opts)
    assert A2.dtype == z2.dtype == torch.float64
    assert_close(A2, A2r, name="A'")
    assert_close(z2, z2r, name="z'")
    x = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, n, d_mem, dtype=torch.float64, requires_grad=True)
    y = assoc_read(x, q, A2, z2, backend="torch", **opts)
    yr = assoc_read_ref(x, q, A2r, z2r, **opts)
    assert_close(y, yr, name="y")
    leaves = [t for t in (x, q, k, v, beta, A, z) if t is not None]
    dy = torch.randn_like(y)
    loss = (y * dy).sum() + (A2.sin().sum() + z2.cos().sum())
    loss_r = (yr * dy).sum() + (A2r.sin().sum() + z2r.cos().sum())
    got = torch.autograd.grad(loss, leaves, allow_unused=True)
    exp = torch.autograd.grad(loss_r, leaves, allow_unused=True)
    for i, (g, e) in enumerate(zip(got, exp)):
        if e is None:
            assert g is None or not g.any(), f"grad {i} should be absent"
            continue
        assert_close(g, e, name=f"grad of leaf {i}")


@pytest.mark.parametrize("n_heads, normalize, use_denom, correction, gating", VARIANTS[:4] + VARIANTS[5:6])
def test_gradcheck_float64(n_heads, normalize, use_denom, correction, gating):
    b, n, m, d_mem, d = 1, 3, 2, 2, 4
    opts = dict(n_heads=n_heads, normalize=normalize, use_denom=use_denom, backend="torch")
    A, z = _state(b, n_heads, d_mem, d, torch.float64, grad=True)
    x = torch.randn(b, n, d, dtype=torch.float64, requires_grad=True)
    q = torch.randn(b, n, d_mem, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x, q, A, z: assoc_read(x, q, A, z, **opts), (x, q, A, z))
    k, v, beta = _write_inputs(b, m, d_mem, d, n_heads, gating, torch.float64, grad=True)
    # gamma is detached (a clip of a ratio): gradcheck's finite differences would see it move, so the
    # check runs with correction off; the detached gamma is covered against the reference above.
    torch.autograd.gradcheck(
        lambda k, v, beta, A, z: assoc_write(k, v, beta, A, z, correction=False, gating=gating, **opts),
        (k, v, beta, A, z))
    torch.autograd.gradcheck(lambda k, v, beta: assoc_write(k, v, beta, correction=correction, gating=gating,
                                                             **opts), (k, v, beta))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sixteen_bit_model_keeps_a_float32_state(dtype):
    b, n, m, d_mem, d, h = 2, 7, 3, 4, 8, 2
    k, v, beta = _write_inputs(b, m, d_mem, d, h, False, dtype)
    A, z = assoc_write(k, v, beta, n_heads=h, backend="torch")
    assert A.dtype == z.dtype == torch.float32
    A2, z2 = assoc_write(k, v, beta, A, z, n_heads=h, backend="torch")
    A2r, z2r = assoc_write_ref(k, v, beta, A, z, n_heads=h)
    A2e, _ = assoc_write_ref(k.double(), v.double(), beta.double(), A.double(), z.double(), n_heads=h)
    assert_close(A2, A2e, A2r, name="A' (16-bit inputs)", dtype=torch.float32)
    x = torch.randn(b, n, d).to(dtype)
    q = torch.randn(b, n, d_mem).to(dtype)
    y = assoc_read(x, q, A2, z2, n_heads=h, backend="torch")
    assert y.dtype == dtype
    exact = assoc_read_ref(x.double(), q.double(), A2.double(), z2.double(), n_heads=h)
    eager = x + assoc_read_ref(torch.zeros_like(x), q, A2.to(dtype), z2.to(dtype), n_heads=h)  # all in dtype
    assert_close(y, exact, eager, name="y (16-bit)")


def test_bptt_over_segments_matches_reference():
    """Several segments chained through (A, z) without detaching: gradients reach the first write."""
    b, n, m, d_mem, d, h = 2, 5, 2, 4, 8, 2
    wq, wk, wv = (torch.randn(d, d_mem, dtype=torch.float64, requires_grad=True) for _ in range(2)), None, None
    wq, wk = list(wq)
    wv = torch.randn(d, d, dtype=torch.float64, requires_grad=True)
    wb = torch.randn(d, h, dtype=torch.float64, requires_grad=True)
    xs = [torch.randn(b, n, d, dtype=torch.float64) for _ in range(4)]

    def run(read, write):
        A = z = None
        total = 0
        for x in xs:
            if A is not None:
                x = read(x, x @ wq, A, z)
            m_rows = x[:, -m:].tanh()
            total = total + x.square().mean()
            A, z = write(m_rows @ wk, m_rows @ wv, m_rows @ wb, A, z)
        return total + A.sum() + z.sum()

    opts = dict(n_heads=h)
    ours = run(lambda *a: assoc_read(*a, backend="torch", **opts), lambda *a: assoc_write(*a, backend="torch", **opts))
    ref = run(lambda *a: assoc_read_ref(*a, **opts), lambda *a: assoc_write_ref(*a, **opts))
    assert_close(ours, ref, name="loss")
    params = (wq, wk, wv, wb)
    for i, (g, e) in enumerate(zip(torch.autograd.grad(ours, params), torch.autograd.grad(ref, params))):
        assert e.abs().sum() > 0
        assert_close(g, e, name=f"grad W{'qkvb'[i]}")


def test_no_grad_call_records_nothing():
    A, z = _state(1, 1, 4, 8, grad=True)
    with torch.no_grad():
        y = assoc_read(torch.randn(1, 3, 8), torch.randn(1, 3, 4), A, z, backend="torch")
    assert y.grad_fn is None


# --------------------------------------------------------------------------- custom ops


@pytest.mark.parametrize("first", [True, False], ids=["first", "later"])
def test_opcheck_custom_ops(first):
    b, n, m, d_mem, d, h = 2, 5, 3, 4, 8, 2
    A, z = _state(b, h, d_mem, d, grad=True)
    x = torch.randn(b, n, d, requires_grad=True)
    q = torch.randn(b, n, d_mem, requires_grad=True)
    read = (True, True, "torch")
    torch.library.opcheck(interface.assoc_read_fwd_op, (x, q, A, z, h, *read))
    torch.library.opcheck(interface.assoc_read_bwd_op, (torch.randn(b, n, d), q.detach(), A.detach(), z.detach(), h,
                                                        *read))
    k, v, beta = _write_inputs(b, m, d_mem, d, h, True, grad=True)
    state = (None, None) if first else (A, z)
    flags = (h, True, True, True, "torch")
    torch.library.opcheck(interface.assoc_write_fwd_op, (k, v, beta, *state, *flags))
    dA, dz = torch.randn_like(A), torch.randn_like(z)
    detached = tuple(None if t is None else t.detach() for t in state)
    torch.library.opcheck(interface.assoc_write_bwd_op, (dA, dz, k.detach(), v.detach(), beta.detach(), *detached,
                                                         *flags))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(compile_backend):
    torch._dynamo.reset()
    b, n, m, d_mem, d, h = 2, 6, 2, 4, 8, 2
    wq = torch.randn(d, d_mem, requires_grad=True)
    x0 = torch.randn(b, n, d, requires_grad=True)
    k, v, beta = _write_inputs(b, m, d_mem, d, h, False, grad=True)

    def fn(x0, k, v, beta):
        A, z = assoc_write(k, v, beta, n_heads=h, backend="torch")
        A, z = assoc_write(k * 2, v, beta, A, z, n_heads=h, backend="torch")
        return assoc_read(x0, x0 @ wq, A, z, n_heads=h, backend="torch").sin()

    compiled = torch.compile(fn, fullgraph=True, backend=compile_backend)
    inputs = (x0, k, v, beta)
    got, expected = compiled(*inputs), fn(*inputs)
    assert_close(got, expected.double(), expected, name="compiled y")
    dout = torch.randn_like(got)
    for g, e in zip(torch.autograd.grad(got, inputs + (wq,), dout), torch.autograd.grad(expected, inputs + (wq,), dout)):
        assert_close(g, e.double(), e, name="compiled grad")


# --------------------------------------------------------------------------- errors


def test_read_argument_errors():
    A, z = _state(2, 2, 4, 8)
    x, q = torch.randn(2, 5, 8), torch.randn(2, 5, 4)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        assoc_read([1.0], q, A, z, n_heads=2)
    with pytest.raises(ValueError, match=r"q .* must have x's batch and rows"):
        assoc_read(x, q[:, :3], A, z, n_heads=2)
    with pytest.raises(ValueError, match="n_heads=3 must divide"):
        assoc_read(x, q, A, z, n_heads=3)
    with pytest.raises(ValueError, match=r"A must have shape \[2, 2, 12, 4\]"):
        assoc_read(x, q, A[:, :, :6], z, n_heads=2)
    with pytest.raises(TypeError, match="the associative state of a torch.float32 model is torch.float32"):
        assoc_read(x, q, A.double(), z, n_heads=2)
    with pytest.raises(TypeError, match="A has dtype torch.bfloat16"):
        assoc_read(x.bfloat16(), q.bfloat16(), A.bfloat16(), z.float(), n_heads=2)
    with pytest.raises(TypeError, match="q has dtype"):
        assoc_read(x, q.double(), A, z, n_heads=2)
    with pytest.raises(ValueError, match="backend must be one of"):
        assoc_read(x, q, A, z, n_heads=2, backend="fast")


def test_write_argument_errors():
    A, z = _state(2, 2, 4, 8)
    k, v, beta = _write_inputs(2, 3, 4, 8, 2, False)
    with pytest.raises(ValueError, match=r"b must have last dim 8 = d \(gating=True"):
        assoc_write(k, v, beta, n_heads=2, gating=True)
    with pytest.raises(ValueError, match=r"b must have last dim 2 = H"):
        assoc_write(k, v, torch.randn(2, 3, 8), n_heads=2)
    with pytest.raises(ValueError, match="A and z must both be given"):
        assoc_write(k, v, beta, A, None, n_heads=2)
    with pytest.raises(ValueError, match=r"v .* must have k's batch and rows"):
        assoc_write(k, v[:1], beta, n_heads=2)
    with pytest.raises(TypeError, match="gating must be a bool"):
        assoc_write(k, v, beta, n_heads=2, gating=1)
    with pytest.raises(ValueError, match="n_heads must be a positive int"):
        assoc_write(k, v, beta, n_heads=0)
    with pytest.raises(TypeError, match="correction must be a bool, got str"):
        assoc_write(k, v, beta, n_heads=2, correction="no")
    with pytest.raises(TypeError, match="normalize must be a bool, got int"):
        assoc_read(torch.randn(2, 5, 8), torch.randn(2, 5, 4), *_state(2, 2, 4, 8), n_heads=2, normalize=0)


def test_launcher_formulas_cover_every_flag_combination():
    """The explicit backward of the torch launchers against autograd through the reference, for every
    flag combination (the Triton kernels implement the same formulas)."""
    b, n, m, d_mem, d = 2, 4, 3, 4, 8
    for h, normalize, use_denom, correction, gating, first in itertools.product(
            (1, 2), (True, False), (True, False), (True, False), (False, True), (False, True)):
        A, z = _state(b, h, d_mem, d, torch.float64, grad=True)
        q = torch.randn(b, n, d_mem, dtype=torch.float64, requires_grad=True)
        y = assoc_read_ref(torch.zeros(b, n, d, dtype=torch.float64), q, A, z, n_heads=h, normalize=normalize,
                           use_denom=use_denom)
        dy = torch.randn_like(y)
        exp = torch.autograd.grad(y, (q, A, z), dy, allow_unused=True)
        got = torch_impl.read_bwd_torch(dy, q, A, z, h, normalize, use_denom)
        for g, e in zip(got, exp):
            assert_close(g, torch.zeros_like(g) if e is None else e, name="read bwd")
        k, v, beta = _write_inputs(b, m, d_mem, d, h, gating, torch.float64, grad=True)
        state = (None, None) if first else (A, z)
        A2, z2 = assoc_write_ref(k, v, beta, *state, n_heads=h, normalize=normalize, use_denom=use_denom,
                                 correction=correction, gating=gating)
        gA, gz = torch.randn_like(A2), torch.randn_like(z2)
        leaves = (k, v, beta) + (() if first else (A, z))
        exp = torch.autograd.grad((A2, z2), leaves, (gA, gz), allow_unused=True)
        got = torch_impl.write_bwd_torch(gA, gz, k, v, beta, *state, h, normalize, use_denom, correction)
        for g, e in zip(got, exp):
            assert_close(g, torch.zeros_like(g) if e is None else e, name="write bwd")


# --------------------------------------------------------------------------- autocast, torch.func


def test_autocast_keeps_a_float32_state_and_backward_runs():
    """Inside ``torch.autocast`` the projections arrive in bfloat16: the ops cast them (q to x's dtype;
    k, v, b to their common dtype), run with autocast off, and the state stays float32."""
    b, n, m, d_mem, d, h = 2, 6, 3, 4, 8, 2
    x = torch.randn(b, n, d, requires_grad=True)
    wq, wk = torch.randn(d_mem, d, requires_grad=True), torch.randn(d_mem, d, requires_grad=True)
    wv, wb = torch.randn(d, d, requires_grad=True), torch.randn(h, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mem = x[:, -m:]
        k, v, beta = F.linear(mem, wk), F.linear(mem, wv), F.linear(mem, wb)
        assert k.dtype == torch.bfloat16
        A, z = assoc_write(k, v, beta, n_heads=h, backend="torch")
        assert A.dtype == z.dtype == torch.float32
        y = assoc_read(x, F.linear(x, wq), A, z, n_heads=h, backend="torch")
        A2, z2 = assoc_write(k, v, beta, A, z, n_heads=h, backend="torch")
    assert y.dtype == x.dtype and A2.dtype == z2.dtype == torch.float32
    (y.sum() + A2.sum() + z2.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (x, wq, wk, wv, wb))
    with torch.no_grad():  # the same numbers as the reference on the same bfloat16 inputs, autocast off
        ref_A, ref_z = assoc_write_ref(k, v, beta, None, None, n_heads=h)
    torch.testing.assert_close(A.detach(), ref_A, rtol=0, atol=0)
    torch.testing.assert_close(z.detach(), ref_z, rtol=0, atol=0)


def test_torch_func_grad_through_the_ops():
    b, n, m, d_mem, d, h = 1, 4, 2, 4, 8, 2
    A, z = _state(b, h, d_mem, d, torch.float64)
    x = torch.randn(b, n, d, dtype=torch.float64)
    q = torch.randn(b, n, d_mem, dtype=torch.float64)
    k, v, beta = _write_inputs(b, m, d_mem, d, h, False, torch.float64)

    def loss(A_, z_, impl):
        read, write = impl
        A2, z2 = write(k, v, beta, A_, z_, n_heads=h)
        return read(x, q, A2, z2, n_heads=h).sin().sum()

    ours = (lambda *a, **kw: assoc_read(*a, backend="torch", **kw), lambda *a, **kw: assoc_write(*a, backend="torch", **kw))
    got = torch.func.grad(loss, argnums=(0, 1))(A, z, ours)
    exp = torch.func.grad(loss, argnums=(0, 1))(A, z, (assoc_read_ref, assoc_write_ref))
    for g, e in zip(got, exp):
        assert_close(g, e, name="torch.func.grad")
