"""Attention dropout of the triton backend (issue #13): the kernels' keep decisions, forward and backward
against the reference applying them, and the properties of the counter-based mask.

The launchers are called directly; the keep mask of a seed comes from the debug launcher
``segment_attention_dropout_mask_triton``, which runs the attention kernels' own keep function, and the
reference applies it: ``out = (softmax(S) * mask / (1 - p)) V``, the log-sum-exp without dropout. Every
comparison follows ``tests/helpers.py``'s tolerance rule (float64 reference, same-dtype baseline). On CPU
the kernels run under the Triton interpreter; the ``cuda`` tests add long segments and large batches.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from rmt_kernels import MemoryLayout  # noqa: E402
from rmt_kernels.ops.segment_attention import triton_launch  # noqa: E402
from rmt_kernels.ops.segment_attention.triton_common import _dropout_keep  # noqa: E402
from rmt_kernels.reference import segment_attention_ref  # noqa: E402

from helpers import assert_close, device_inputs  # noqa: E402

MB = "memory_bidirectional"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
GRAD_NAMES = ("dq", "dk", "dv", "dprefix_k", "dprefix_v")


# The keep mask of a seed comes from the kernels' own keep function (the debug launcher); the reference
# applies it to the probabilities: out = (softmax(S) * mask / (1 - p)) V, lse without dropout.


def _seed(value, device):
    return torch.tensor([value], dtype=torch.int64, device=device)


def _dropout_run(layout, q, k, v, pk, pv, sl, scale, dropout_p, seed, dout, need_prefix_grad=True):
    """Forward and backward of the launchers: ``(out, lse, [dq, dk, dv, dprefix_k, dprefix_v])``."""
    q, k, v = q.detach(), k.detach(), v.detach()
    pk, pv = (None, None) if pk is None else (pk.detach(), pv.detach())
    out, lse = triton_launch.segment_attention_fwd_triton(q, k, v, pk, pv, sl, layout, scale, dropout_p, seed)
    grads = triton_launch.segment_attention_bwd_triton(dout, q, k, v, pk, pv, sl, out, lse, layout, scale,
                                                       need_prefix_grad, dropout_p, seed)
    return out, lse, list(grads)


def check_dropout_against_reference(layout, q, k, v, pk, pv, sl, scale, dropout_p, seed):
    """Output, log-sum-exp and every gradient of the launchers with dropout against the reference applying
    the debug launcher's mask, with the tolerance rule of ``tests/helpers.py`` (float64 reference,
    same-dtype baseline). Returns ``(out, lse, grads, mask)``."""
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    p = 0 if pk is None else pk.shape[2]
    need_prefix = pk is not None and pk.requires_grad
    dout = torch.randn(q.shape, device=q.device).to(q.dtype)
    out, lse, grads = _dropout_run(layout, q, k, v, pk, pv, sl, scale, dropout_p, seed, dout, need_prefix)
    mask = triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, dropout_p, seed)
    assert mask.dtype == torch.bool and mask.shape == (q.shape[0], q.shape[1], q.shape[2], p + q.shape[2])

    names = ["q", "k", "v"] + (["prefix_k", "prefix_v"] if need_prefix else [])
    given = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), (q, k, v, pk, pv)))

    def reference(convert, upcast):
        t = {n: None if x is None else convert(x.detach()).requires_grad_(n in names) for n, x in given.items()}
        o, l = segment_attention_ref(t["q"], t["k"], t["v"], layout, segment_lengths=sl, prefix_k=t["prefix_k"],
                                     prefix_v=t["prefix_v"], scale=scale, upcast=upcast, return_lse=True,
                                     dropout_p=dropout_p, dropout_mask=mask)
        g = torch.autograd.grad(o, [t[n] for n in names], convert(dout))
        return o, l, g

    ref_out, ref_lse, ref_grads = reference(lambda t: t.double(), True)
    base_out, base_lse, base_grads = reference(lambda t: t.clone(), False)
    assert_close(out, ref_out, base_out, name="out")
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and torch.isneginf(lse[~finite]).all()
    assert_close(lse[finite], ref_lse[finite], base_lse[finite], name="lse", dtype=q.dtype)
    for name, g, rg, bg in zip(names, grads, ref_grads, base_grads):
        assert g.shape == given[name].shape and g.dtype == q.dtype, name
        assert_close(g, rg, bg, name=f"d{name}")
    if not need_prefix:
        assert grads[3] is None and grads[4] is None
    # Rows that see no key: output 0, no gradient to their query.
    empty = ~finite
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()
    return out, lse, grads, mask


# (layout, S, P, segment_lengths, (Hq, Hkv), head dim, dtype, dropout_p)
DROPOUT_CASES = [
    pytest.param(MemoryLayout(5, 5, MB), 37, 7, [37, 0], (4, 2), 16, torch.float32, 0.3,
                 id="mb-P7-seg-fully-padded-gqa4:2"),
    pytest.param(MemoryLayout(0, 0, "causal", "all"), 45, 5, [45, 20], (2, 1), 16, torch.float32, 0.5,
                 id="causal-P5-all-padded-gqa"),
    pytest.param(MemoryLayout(16, 16, "full", "all"), 30, 37, [1, 30], (4, 2), 32, torch.float32, 0.1,
                 id="full-M16-P37-all-padded-D32"),
    pytest.param(MemoryLayout(0, 0, "full"), 17, 0, [0, 5], (2, 2), 16, torch.float32, 0.3,
                 id="full-empty-rows"),
    pytest.param(MemoryLayout(0, 1, MB), 1, 0, [0, 1], (2, 2), 16, torch.float32, 0.3,
                 id="mb-write-only-empty-rows"),
    pytest.param(MemoryLayout(3, 3, "causal"), 70, 3, None, (2, 2), 16, torch.float32, 0.2, id="causal-P3-seg"),
    pytest.param(MemoryLayout(4, 4, MB, "all"), 29, 3, [29, 10], (2, 1), 32, torch.float16, 0.3,
                 id="fp16-mb-P3-all-padded"),
    pytest.param(MemoryLayout(4, 4, MB), 29, 3, [29, 10], (2, 1), 32, torch.bfloat16, 0.3,
                 id="bf16-mb-P3-seg-padded"),
]


@pytest.mark.parametrize("layout, s, p, lengths, heads, d, dtype, dropout_p", DROPOUT_CASES)
def test_dropout_matches_reference(device, poisoned, layout, s, p, lengths, heads, d, dtype, dropout_p):
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), d, p, dtype=dtype)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    out, _, grads, mask = check_dropout_against_reference(layout, q, k, v, pk, pv, sl, 0.25, dropout_p,
                                                          _seed(20261130, device))
    assert not mask.all() and mask.any()


def test_dropout_detached_prefix(device, poisoned):
    """A prefix without gradient (a cache): no prefix gradients, the others as with one."""
    layout = MemoryLayout(5, 5, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (2, 2), layout.seq_len(33), 16, 37, prefix_grad=False)
    check_dropout_against_reference(layout, q, k, v, pk, pv, torch.tensor([33, 12], device=device), 0.25, 0.4,
                                    _seed(7, device))


def _visible(layout, s, p, lengths, b, hq):
    return layout.dense_mask(s, p, lengths).expand(b, -1, -1)[:, None].expand(b, hq, -1, -1)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_dropout_keep_rate(device, dropout_p):
    """The keep rate of the mask over visible elements is 1 - p within a binomial bound (6 sigma), in
    every (batch row, head) on its own too."""
    layout = MemoryLayout(8, 8, MB, "all")
    s, p, b, hq = 150, 37, 2, 4
    n = layout.seq_len(s)
    q = torch.empty(b, hq, n, 16, device=device)
    pk = torch.empty(b, 1, p, 16, device=device)
    mask = triton_launch.segment_attention_dropout_mask_triton(q, q[:, :1], pk, layout, dropout_p,
                                                               _seed(99, device)).cpu()
    visible = _visible(layout, s, p, [150, 77], b, hq)
    sigma = (dropout_p * (1 - dropout_p)) ** 0.5
    total = int(visible.sum())
    rate = mask[visible].float().mean().item()
    assert abs(rate - (1 - dropout_p)) <= 6 * sigma / total ** 0.5, rate
    for bi in range(b):
        for h in range(hq):
            count = int(visible[bi, h].sum())
            rate = mask[bi, h][visible[bi, h]].float().mean().item()
            assert abs(rate - (1 - dropout_p)) <= 6 * sigma / count ** 0.5, (bi, h, rate)
    # Different heads and batch rows draw different masks.
    assert not torch.equal(mask[0, 0], mask[0, 1]) and not torch.equal(mask[0, 0], mask[1, 0])


def test_dropout_mask_at_p0_keeps_everything(device):
    q = torch.empty(2, 2, 20, 16, device=device)
    assert triton_launch.segment_attention_dropout_mask_triton(q, q, None, MemoryLayout(2, 2), 0.0,
                                                               _seed(1, device)).all()


def test_dropout_reproducible_per_seed(device):
    """The same seed reproduces output and gradients bit for bit; another seed changes them (and the mask)."""
    layout = MemoryLayout(4, 4, MB)
    q, k, v, pk, pv = device_inputs(device, 2, (4, 2), layout.seq_len(40), 16, 5)
    sl = torch.tensor([40, 13], device=device)
    dout = torch.randn(q.shape, device=device)
    runs = [_dropout_run(layout, q, k, v, pk, pv, sl, 0.25, 0.3, _seed(seed, device), dout)
            for seed in (11, 11, 12)]
    same, again, other = ([r[0], r[1], *r[2]] for r in runs)
    for name, a, b, c in zip(("out", "lse") + GRAD_NAMES, same, again, other):
        assert torch.equal(a, b), name
        if name != "lse":
            assert not torch.equal(a, c), name
    assert torch.equal(same[1], other[1]), "the log-sum-exp does not depend on dropout"
    masks = [triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, 0.3, _seed(seed, device))
             for seed in (11, 11, 12, 2**40 + 11)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[3]), "the seed's high word counts"


def test_dropout_p0_is_exactly_no_dropout(device):
    layout = MemoryLayout(4, 4, MB, "all")
    q, k, v, pk, pv = device_inputs(device, 2, (2, 1), layout.seq_len(37), 16, 3)
    sl = torch.tensor([37, 0], device=device)
    dout = torch.randn(q.shape, device=device)
    with_seed = _dropout_run(layout, q, k, v, pk, pv, sl, 0.25, 0.0, _seed(5, device), dout)
    plain = _dropout_run(layout, q, k, v, pk, pv, sl, 0.25, 0.0, None, dout)
    for a, b in zip([with_seed[0], with_seed[1], *with_seed[2]], [plain[0], plain[1], *plain[2]]):
        assert torch.equal(a, b)


def test_dropout_needs_a_seed_tensor(device):
    q = torch.randn(1, 2, 9, 16, device=device)
    for seed in (None, torch.tensor([3], dtype=torch.int32, device=device)):
        with pytest.raises(ValueError, match="int64 seed tensor"):
            triton_launch.segment_attention_fwd_triton(q, q, q, None, None, None, MemoryLayout(2, 2), 0.1, 0.2, seed)


def test_dropout_chunked_batch_keeps_the_mask(device, monkeypatch):
    """Batches launched in chunks (grid limit lowered to 2 rows) take the keep decisions of their global
    batch rows: mask, output and gradients equal one launch over the whole batch."""
    layout = MemoryLayout(3, 3, MB)
    q, k, v, pk, pv = device_inputs(device, 5, (2, 1), layout.seq_len(21), 16, 3)
    sl = torch.tensor([21, 0, 5, 21, 9], device=device)
    dout = torch.randn(q.shape, device=device)
    seed = _seed(424242, device)
    whole = _dropout_run(layout, q, k, v, pk, pv, sl, 0.25, 0.4, seed, dout)
    mask = triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, 0.4, seed)
    monkeypatch.setattr(triton_launch, "GRID_YZ_MAX", 2)
    chunked = _dropout_run(layout, q, k, v, pk, pv, sl, 0.25, 0.4, seed, dout)
    assert torch.equal(triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, 0.4, seed), mask)
    for a, b in zip([whole[0], whole[1], *whole[2]], [chunked[0], chunked[1], *chunked[2]]):
        assert torch.equal(a, b)


@triton.jit
def _keep_tile_kernel(Out, Seed, b, h, i0, j0, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    keys = j0 + tl.arange(0, BLOCK_J)
    keep = _dropout_keep(tl.load(Seed), b, h, i0, keys, 0.5 * 16777216.0, BLOCK_I, BLOCK_J)  # [keys, rows]
    tl.store(Out + tl.arange(0, BLOCK_J)[:, None] * BLOCK_I + tl.arange(0, BLOCK_I)[None, :], keep.to(tl.uint8))


def test_dropout_counters_do_not_alias_at_large_coordinates(device):
    """Tiles of (b, h, i, j) far apart (B * H up to 2**20, N and P + N up to 2**16 and beyond) draw
    different keep bits: no coordinate wraps into another's counter."""
    seed = _seed(31337, device)
    coords = [(b, h, i, j) for b in (0, 1, 2**16 - 1, 2**20 - 1) for h in (0, 1, 2**10 - 1)
              for i, j in ((0, 0), (0, 2**16), (2**16 - 16, 0), (2**16 - 16, 2**17 - 32), (16, 32))]
    tiles = []
    for b, h, i, j in coords:
        out = torch.empty(16, 32, dtype=torch.uint8, device=device)
        _keep_tile_kernel[(1,)](out, seed, b, h, i, j, BLOCK_I=16, BLOCK_J=32)
        tiles.append(out.cpu())
    flat = torch.stack(tiles).flatten(1)
    assert len({tuple(t.tolist()) for t in flat}) == len(coords)
    rate = flat.float().mean().item()
    assert abs(rate - 0.5) < 6 * 0.5 / flat.numel() ** 0.5


GPU_DROPOUT_CASES = [
    pytest.param(MemoryLayout(16, 16, MB), 2016, 37, [2016, 1000], (4, 2), 64, torch.bfloat16, 0.1,
                 id="mb-2k-D64-bf16-P37-seg-padded-gqa"),
    pytest.param(MemoryLayout(0, 0, "causal", "all"), 2048, 64, None, (2, 2), 128, torch.bfloat16, 0.3,
                 id="causal-2k-D128-bf16-P64-all"),
    pytest.param(MemoryLayout(10, 0, "full"), 1014, 37, [1014, 0], (2, 1), 256, torch.float16, 0.2,
                 id="full-1k-D256-fp16-P37-fully-padded"),
    pytest.param(MemoryLayout(32, 32, MB, "all"), 960, 1, [960, 700], (4, 1), 96, torch.bfloat16, 0.5,
                 id="mb-1k-D96-bf16-null-key"),
    pytest.param(MemoryLayout(16, 16, MB), 1000, 37, [1000, 613], (2, 1), 64, torch.float32, 0.3, id="mb-1k-D64-fp32"),
    pytest.param(MemoryLayout(8, 8, "causal"), 1000, 0, [1000, 613], (2, 2), 32, torch.float16, 0.1,
                 id="causal-1k-D32-fp16"),
]


@pytest.mark.cuda
@pytest.mark.parametrize("layout, s, p, lengths, heads, d, dtype, dropout_p", GPU_DROPOUT_CASES)
def test_dropout_gpu_long_segments(poisoned, layout, s, p, lengths, heads, d, dtype, dropout_p):
    """The autotuned dropout kernels against the reference applying their mask, at long segments."""
    device = torch.device("cuda")
    b = 2 if lengths is None else len(lengths)
    q, k, v, pk, pv = device_inputs(device, b, heads, layout.seq_len(s), d, p, dtype=dtype)
    sl = None if lengths is None else torch.tensor(lengths, device=device)
    seed = torch.randint(0, 2**62, (1,), device=device)
    out, _, _, mask = check_dropout_against_reference(layout, q, k, v, pk, pv, sl, None, dropout_p, seed)
    visible = _visible(layout, s, p, lengths, b, heads[0]).to(device)
    rate = mask[visible].float().mean().item()
    total = int(visible.sum())
    assert abs(rate - (1 - dropout_p)) <= 6 * (dropout_p * (1 - dropout_p) / total) ** 0.5, rate


@pytest.mark.cuda
def test_dropout_gpu_reproducible_and_large_batch_heads():
    """Bit-identical runs per seed at a large B * H (query heads 64, batch 40: counters of 2560 (b, h)
    pairs), a different mask for another seed, and the keep rate over every element."""
    device = torch.device("cuda")
    layout = MemoryLayout(4, 4, MB)
    q, k, v, pk, pv = device_inputs(device, 40, (64, 8), layout.seq_len(120), 64, 16, dtype=torch.bfloat16)
    sl = torch.randint(0, 121, (40,), device=device)
    dout = torch.randn(q.shape, device=device, dtype=q.dtype)
    seed = torch.randint(0, 2**62, (1,), device=device)
    runs = [_dropout_run(layout, q, k, v, pk, pv, sl, 0.125, 0.25, s, dout) for s in (seed, seed, seed + 1)]
    for i, (a, b, c) in enumerate(zip(*([r[0], *r[2]] for r in runs))):
        assert torch.equal(a, b), i
        assert not torch.equal(a, c), i
    mask = triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, 0.25, seed)
    rate = mask.float().mean().item()
    assert abs(rate - 0.75) <= 6 * (0.25 * 0.75 / mask.numel()) ** 0.5
    assert torch.equal(mask, triton_launch.segment_attention_dropout_mask_triton(q, k, pk, layout, 0.25, seed))


def test_public_call_with_dropout_runs_the_kernels(device):
    # Through segment_attention: the seed drawn by the interface, the keep mask of the backend entry.
    from rmt_kernels import segment_attention

    layout = MemoryLayout(3, 3, MB)
    q, k, v, _, _ = device_inputs(device, 2, (4, 2), layout.seq_len(34), 32, 0)
    lengths = torch.tensor([34, 10], device=device)
    out, keep = segment_attention(q, k, v, layout, segment_lengths=lengths, dropout_p=0.2,
                                  return_dropout_mask=True, backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    hi = [t.detach().double().requires_grad_() for t in (q, k, v)]
    lo = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = segment_attention_ref(*hi, layout, segment_lengths=lengths, dropout_p=0.2, dropout_mask=keep)
    base = segment_attention_ref(*lo, layout, segment_lengths=lengths, dropout_p=0.2, dropout_mask=keep,
                                 upcast=False)
    assert_close(out, ref, base, name="out")
    for g, r, bl, name in zip(grads, torch.autograd.grad(ref, hi, dout.double()),
                              torch.autograd.grad(base, lo, dout), ("dq", "dk", "dv")):
        assert_close(g, r, bl, name=name)
