"""The Triton backend of ARMT's associative memory against its contract, ``torch_impl``.

Every Triton launcher (read and write, forward and backward) runs on the same inputs as the torch
launcher in the kernel's dtype (the baseline) and in float64 (the reference); each output must be within
``tests/helpers.py``'s tolerance rule. Outputs start as NaN (``_empty`` poisoned), so an element no kernel
writes fails. Shapes are tiny (the interpreter is slow) but cover: one and two heads, ``2p`` not a
power of two, row counts that are not a multiple of the block (and more than one block), every flag,
first and later segments, float32 and bfloat16 inputs with a float32 state, non-contiguous views.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from helpers import assert_close  # noqa: E402
from rmt_kernels.ops.assoc_memory import torch_impl, triton_launch  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture
def poisoned(nan_poison):
    nan_poison(triton_launch, "_empty")


def _rand(shape, dtype, device, strided=False, scale=1.0, shift=0.0):
    """Random ``shape`` tensor; ``strided``: a view with last-dim stride 2."""
    if strided:
        t = torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
    else:
        t = torch.randn(*shape, device=device)
    return (t * scale + shift).to(dtype)


def _state(bsz, h, kdim, dv, device, strided=False):
    A = _rand((bsz, h, dv, kdim), F32, device, scale=0.3).transpose(-1, -2) if strided else \
        _rand((bsz, h, kdim, dv), F32, device, scale=0.3)
    z = torch.rand(bsz, h, kdim, device=device) + 0.05
    return A, z


def _double(t):
    return None if t is None else t.detach().double()


def _check(name, actual, ref, base, dtype):
    if ref is None:
        assert actual is None, name
        return
    assert actual.shape == ref.shape, name
    assert actual.dtype == base.dtype, (name, actual.dtype, base.dtype)
    assert_close(actual, ref, base, name=name, dtype=dtype)


# (B, N, d_mem, d, H, normalize, use_denom, dtype, strided)
READ_CASES = [
    pytest.param(2, 37, 6, 8, 1, True, True, F32, False, id="H1-2p12-N37-norm-denom-fp32"),
    pytest.param(1, 20, 8, 32, 2, True, False, F32, True, id="H2-p4-nodenom-strided-fp32"),
    pytest.param(2, 17, 8, 32, 2, False, True, BF16, False, id="H2-p4-nonorm-bf16"),
    pytest.param(1, 70, 16, 16, 1, False, False, F32, False, id="H1-p16-N70-two-blocks-plain"),
    pytest.param(1, 33, 12, 24, 2, True, True, BF16, True, id="H2-2p12-bf16-strided"),
    pytest.param(1, 21, 32, 16, 1, True, True, F32, False, id="H1-p32-two-chunks-per-piece"),
]


@pytest.mark.parametrize("bsz,n,d_mem,dim,heads,normalize,use_denom,dtype,strided", READ_CASES)
def test_read_matches_torch_impl(device, poisoned, bsz, n, d_mem, dim, heads, normalize, use_denom, dtype, strided):
    kdim, dv = 6 * d_mem // heads, dim // heads
    x = _rand((bsz, n, dim), dtype, device, strided)
    q = _rand((bsz, n, d_mem), dtype, device, strided)
    A, z = _state(bsz, heads, kdim, dv, device, strided)
    dy = _rand((bsz, n, dim), dtype, device, strided)
    args = (heads, normalize, use_denom)

    y = triton_launch.read_fwd_triton(x, q, A, z, *args)
    base = torch_impl.read_fwd_torch(x, q, A, z, *args)
    ref = torch_impl.read_fwd_torch(_double(x), _double(q), _double(A), _double(z), *args)
    _check("y", y, ref, base, dtype)

    grads = triton_launch.read_bwd_triton(dy, q, A, z, *args)
    bases = torch_impl.read_bwd_torch(dy, q, A, z, *args)
    refs = torch_impl.read_bwd_torch(_double(dy), _double(q), _double(A), _double(z), *args)
    for name, g, b, r, dt in zip(("dq", "dA", "dz"), grads, bases, refs, (dtype, F32, F32)):
        _check(name, g, r, b, dt)
    if not use_denom:
        assert torch.count_nonzero(grads[2]) == 0


# (B, M, d_mem, d, H, normalize, use_denom, correction, gating, first, dtype, strided)
WRITE_CASES = [
    pytest.param(2, 5, 6, 8, 1, True, True, True, False, False, F32, False, id="H1-2p12-later-all-fp32"),
    pytest.param(2, 5, 6, 8, 1, True, True, True, True, True, F32, False, id="H1-2p12-first-gating"),
    pytest.param(1, 20, 8, 32, 2, False, True, True, True, False, BF16, True, id="H2-later-gating-bf16-strided"),
    pytest.param(1, 40, 8, 16, 2, True, False, True, False, False, F32, False, id="H2-M40-two-blocks-nodenom"),
    pytest.param(2, 7, 8, 32, 2, False, True, False, False, True, BF16, False, id="H2-first-nocorr-bf16"),
    pytest.param(1, 9, 12, 24, 2, True, True, False, True, False, F32, True, id="H2-2p12-later-nocorr-strided"),
    pytest.param(1, 6, 8, 2, 2, False, False, False, False, False, F32, False, id="H2-d-equals-H"),
    pytest.param(1, 9, 24, 16, 1, True, True, True, True, False, F32, False, id="H1-2p48-chunks-later-all"),
]


@pytest.mark.parametrize("bsz,m,d_mem,dim,heads,normalize,use_denom,correction,gating,first,dtype,strided",
                         WRITE_CASES)
def test_write_matches_torch_impl(device, poisoned, bsz, m, d_mem, dim, heads, normalize, use_denom, correction,
                                  gating, first, dtype, strided):
    kdim, dv = 6 * d_mem // heads, dim // heads
    k = _rand((bsz, m, d_mem), dtype, device, strided)
    v = _rand((bsz, m, dim), dtype, device, strided)
    b = _rand((bsz, m, dim if gating else heads), dtype, device, strided)
    A, z = (None, None) if first else _state(bsz, heads, kdim, dv, device, strided)
    if not first and correction and use_denom:
        z = z * 0.05  # some gamma strictly inside (0, 1)
    dA_new, dz_new = _state(bsz, heads, kdim, dv, device, strided)
    dz_new = dz_new - 0.5
    args = (heads, normalize, use_denom, correction)

    out = triton_launch.write_fwd_triton(k, v, b, A, z, *args)
    base = torch_impl.write_fwd_torch(k, v, b, A, z, *args)
    ref = torch_impl.write_fwd_torch(_double(k), _double(v), _double(b), _double(A), _double(z), *args)
    for name, o, bs, r in zip(("A_new", "z_new"), out, base, ref):
        _check(name, o, r, bs, F32)

    grads = triton_launch.write_bwd_triton(dA_new, dz_new, k, v, b, A, z, *args)
    bases = torch_impl.write_bwd_torch(dA_new, dz_new, k, v, b, A, z, *args)
    refs = torch_impl.write_bwd_torch(_double(dA_new), _double(dz_new), _double(k), _double(v), _double(b),
                                      _double(A), _double(z), *args)
    for name, g, bs, r, dt in zip(("dk", "dv", "db", "dA", "dz"), grads, bases, refs, (dtype,) * 3 + (F32,) * 2):
        _check(name, g, r, bs, dt)


@pytest.mark.parametrize("first", [pytest.param(True, id="first"), pytest.param(False, id="later")])
def test_write_bwd_without_incoming_grads(device, poisoned, first):
    """``dA_new``/``dz_new`` None count as zero (the last segment's state feeds no loss)."""
    bsz, m, d_mem, dim, heads = 1, 6, 8, 16, 2
    k, v, b = (_rand((bsz, m, s), F32, device) for s in (d_mem, dim, heads))
    A, z = (None, None) if first else _state(bsz, heads, 6 * d_mem // heads, dim // heads, device)
    for dA_new, dz_new in ((None, None), (None, torch.randn(bsz, heads, 6 * d_mem // heads, device=device))):
        args = (dA_new, dz_new, k, v, b, A, z, heads, True, True, True)
        grads = triton_launch.write_bwd_triton(*args)
        bases = torch_impl.write_bwd_torch(*args)
        refs = torch_impl.write_bwd_torch(_double(dA_new), _double(dz_new), _double(k), _double(v), _double(b),
                                          _double(A), _double(z), heads, True, True, True)
        for name, g, bs, r in zip(("dk", "dv", "db", "dA", "dz"), grads, bases, refs):
            _check(name, g, r, bs, F32)


@pytest.mark.parametrize("lanes,d_mem,dtype,flags", [
    pytest.param(16, 16, F32, True, id="p16-forced-halves-fp32"),
    pytest.param(16, 16, BF16, False, id="p16-forced-halves-bf16-noflags"),
    pytest.param(128, 128, F32, True, id="p128-halves"),
])
def test_dq_dk_lane_halves(device, poisoned, monkeypatch, lanes, d_mem, dtype, flags):
    """The dq / dk kernels in lane halves (``BLOCK_F = TWO_P / 2``, what p = 128 compiles): forced at
    p = 16, and p = 128 itself at a few rows, read and write, later segments, strided inputs."""
    monkeypatch.setattr(triton_launch, "_PIECE_LANES", lanes)
    for cfg in (triton_launch.read_bwd_dq_config(d_mem, 16), triton_launch.write_bwd_dk_config(d_mem, 16, 5)):
        assert 2 * cfg["BLOCK_F"] == triton_launch.two_p(d_mem)
    test_read_matches_torch_impl(device, poisoned, 2, 19, d_mem, 16, 1, flags, flags, dtype, True)
    test_write_matches_torch_impl(device, poisoned, 1, 5, d_mem, 32, 1, flags, flags, flags,
                                  True, False, dtype, True)


def test_state_view_keeps_offsets_in_int32():
    """The kernels read a head's state matrix with int32 offsets: a view whose strides would overflow
    them is copied, any real state is passed as it is."""
    ok = torch.empty_strided((2, 3, 48, 16), (48 * 64, 48 * 16, 1, 48), device="meta")
    assert triton_launch._state_view(ok) is ok
    wide = torch.empty_strided((1, 2, 6, 4), (1, 1, 2 ** 30, 1), device="meta")
    assert triton_launch._state_view(wide).stride() == (48, 24, 4, 1)
    assert triton_launch._state_view(None) is None


def test_import_does_not_load_triton():
    import subprocess
    import sys

    code = ("import sys; from rmt_kernels.ops.assoc_memory import triton_launch, aot; "
            "assert 'triton' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_aot_jobs_use_the_launchers_configs():
    from rmt_kernels.ops.assoc_memory import aot

    rows = aot.jobs(90, quick=False)
    assert {r["kernel"] for r in rows} == set(aot.kernel_table())
    for p in aot.KEY_DIMS:
        expected = triton_launch.read_fwd_config(p, aot.VALUE_DIM)
        mine = [r["config"] for r in rows if r["kernel"] == "assoc_read_fwd" and r["head_dim"] == p
                and not r.get("variant")]
        assert mine and all({k: c[k] for k in expected} == expected for c in mine)


def test_aot_jobs_cover_every_kernel_config():
    from rmt_kernels.ops.assoc_memory import aot

    rows = aot.jobs(90, quick=False)
    configs = {
        "assoc_read_bwd_dq": lambda p: triton_launch.read_bwd_dq_config(p, aot.VALUE_DIM),
        "assoc_read_bwd_da": lambda p: triton_launch.read_bwd_da_config(p, aot.VALUE_DIM),
        "assoc_write_fwd": lambda p: triton_launch.write_fwd_config(p, aot.VALUE_DIM, aot.MEMORY_ROWS),
        "assoc_write_bwd_rows": lambda p: triton_launch.write_bwd_rows_config(p, aot.VALUE_DIM, aot.MEMORY_ROWS),
        "assoc_write_bwd_dk": lambda p: triton_launch.write_bwd_dk_config(p, aot.VALUE_DIM, aot.MEMORY_ROWS),
        "assoc_write_bwd_state": lambda p: triton_launch.write_bwd_state_config(p, aot.VALUE_DIM, aot.MEMORY_ROWS),
    }
    for kernel, config in configs.items():
        for dtype in aot.DTYPES:
            for p in aot.KEY_DIMS:
                expected = dict(config(p), num_stages=1)
                assert any(r["kernel"] == kernel and r["dtype"] == dtype and r["head_dim"] == p
                           and r["config"] == expected for r in rows), (kernel, dtype, p)


@pytest.mark.parametrize("matmul_precision", ["highest", "high", "medium"])
def test_aot_compiles_the_launchers_precision(matmul_precision):
    """Each dtype's ``DOT_PREC`` at the launch is one ``aot.py`` compiles for that dtype and key dim,
    and never the scalar ``"ieee"`` path."""
    from rmt_kernels.ops.assoc_memory import aot

    rows = aot.jobs(90, quick=False)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision(matmul_precision)
        for dtype, name in ((torch.float16, "fp16"), (BF16, "bf16"), (F32, "fp32")):
            prec = triton_launch.dot_precision(dtype)
            assert prec != "ieee"
            if dtype != F32:
                assert prec == "tf32"
            for p in aot.KEY_DIMS:
                compiled = {(r.get("variant") or {}).get("DOT_PREC", aot.derived_constexprs(None, name, p)["DOT_PREC"])
                            for r in rows if r["dtype"] == name and r["head_dim"] == p}
                assert prec in compiled, (dtype, p, prec, compiled)
    finally:
        torch.set_float32_matmul_precision(old)
    assert triton_launch.dot_precision(F32) == ("tf32x3" if old == "highest" else "tf32")


# --------------------------------------------------------------------------- on a GPU


def _public_block(backend, dtype, device, n_heads, gating):
    """One layer's read and write through the public functions (custom ops, autograd) at GPT-2 ARMT
    sizes (N = 512 + 16, d 768, d_mem 64): outputs and the gradients of every input."""
    from rmt_kernels import assoc_read, assoc_write

    gen = torch.Generator(device="cpu").manual_seed(0)
    bsz, n, m, dim, d_mem = 2, 528, 16, 768, 64

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device, dtype).requires_grad_(True)

    x, q = rnd(bsz, n, dim), rnd(bsz, n, d_mem)
    k, v, b = rnd(bsz, m, d_mem), rnd(bsz, m, dim), rnd(bsz, m, dim if gating else n_heads)
    opts = dict(n_heads=n_heads, backend=backend)
    A, z = assoc_write(k, v, b, gating=gating, **opts)
    y = assoc_read(x, q, A, z, **opts)
    A2, z2 = assoc_write(k * 0.5, y[:, -m:], b, A, z, gating=gating, **opts)
    outs = (y, A2, z2)
    gen_g = torch.Generator(device="cpu").manual_seed(1)
    grads = [torch.randn(o.shape, generator=gen_g).to(device, o.dtype) for o in outs]
    leaves = (x, q, k, v, b)
    return outs + torch.autograd.grad(outs, leaves, grads)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("n_heads, gating", [(1, False), (4, True)], ids=["h1", "h4-gating"])
def test_public_ops_on_gpu_match_the_reference(dtype, n_heads, gating):
    """Compiled kernels (not the interpreter) at model sizes: the Triton backend against a float64 run
    of the torch backend, with the torch backend in the same dtype as the baseline."""
    device = torch.device("cuda")
    got = _public_block("triton", dtype, device, n_heads, gating)
    base = _public_block("torch", dtype, device, n_heads, gating)
    ref = _public_block("torch", torch.float64, device, n_heads, gating)
    names = ("y", "A'", "z'", "dx", "dq", "dk", "dv", "db")
    for name, g, b, r in zip(names, got, base, ref):
        assert_close(g, r, b, name=name, dtype=dtype if g.dtype == dtype else g.dtype)
