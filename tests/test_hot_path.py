"""The per-call path: eager calls skip the custom-op machinery but run the same launchers, the
torch backend plans once per layout and size, value checks never read device tensors on the host, and
(on a GPU) no op or driver step syncs and a driver segment step replays from a CUDA graph."""

from __future__ import annotations

import pytest
import torch

from rmt_kernels import MemoryLayout, SegmentDriver, pack_segment, pack_segment_from_ids, segment_attention
from rmt_kernels import _checks
from rmt_kernels.ops.segment_attention import interface, torch_plan

from helpers import assert_close

MB = "memory_bidirectional"


def _attention_inputs(b=2, hq=4, hkv=2, n=20, d=16, device="cpu", dtype=torch.float32, grad=True):
    def rnd(h):
        return torch.randn(b, h, n, d, device=device, dtype=dtype).requires_grad_(grad)

    return rnd(hq), rnd(hkv), rnd(hkv)


@pytest.mark.parametrize("layout, lengths", [
    pytest.param(MemoryLayout(0, 0, "causal"), None, id="causal-one-call"),
    pytest.param(MemoryLayout(3, 3, MB), [14, 5], id="mb-masked-call"),
    pytest.param(MemoryLayout(3, 3, MB), None, id="mb"),
])
def test_eager_path_equals_the_custom_op(layout, lengths):
    q, k, v = _attention_inputs()
    sl = None if lengths is None else torch.tensor(lengths)
    out = segment_attention(q, k, v, layout, segment_lengths=sl, backend="torch")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    scale = q.shape[-1] ** -0.5
    op_out, _ = interface.segment_attention_fwd_op(
        q, k, v, None, None, sl, layout.num_read, layout.num_write, layout.mask, layout.prefix_visible_to,
        scale, "torch",
    )
    op_grads = torch.autograd.grad(op_out, (q, k, v), dout)
    assert torch.equal(out, op_out)
    for g, h in zip(grads, op_grads):
        assert torch.equal(g, h)


def test_eager_call_does_not_dispatch_the_custom_op(monkeypatch):
    calls = []
    real = interface.segment_attention_fwd_op

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(interface, "segment_attention_fwd_op", spy)
    q, k, v = _attention_inputs()
    segment_attention(q, k, v, MemoryLayout(2, 2, MB)).sum().backward()
    with torch.no_grad():
        segment_attention(q, k, v, MemoryLayout(2, 2, MB))
    assert not calls


def test_torch_backend_plans_once_per_layout_and_size():
    q, k, v = _attention_inputs(grad=False)
    layout = MemoryLayout(3, 3, MB)
    segment_attention(q, k, v, layout, backend="torch")
    before = torch_plan._plan.cache_info()
    for _ in range(3):
        segment_attention(q, k, v, layout, backend="torch")
    after = torch_plan._plan.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3


def test_masked_call_is_used_only_where_it_is_exact():
    layout = MemoryLayout(0, 0, MB)
    # A fully padded row with R = 0 has rows that see no key: those need the composed path.
    assert not torch_plan._plan(layout, 2, 10, 0, (10, 0), True).masked
    assert torch_plan._plan(MemoryLayout(2, 2, MB), 2, 10, 0, (10, 0), True).masked
    assert not torch_plan._plan(MemoryLayout(2, 2, MB), 2, 10, 3, None, True).masked  # prefix
    assert torch_plan._plan(MemoryLayout(2, 2, "causal"), 2, 10, 0, None, True).masked  # one causal block
    assert not torch_plan._plan(MemoryLayout(2, 2, "full"), 2, 10, 0, None, True).masked  # one plain call
    big = torch_plan.MEASURED_CHOICE_MAX_N  # S = that: N above it, the composition always runs
    assert not torch_plan._plan(MemoryLayout(2, 2, MB), 1, big, 0, None, True).masked
    assert torch_plan._plan(MemoryLayout(2, 2, MB), 1, big - 4, 0, None, True).masked


def _choice_inputs(n, grad=False):
    return _attention_inputs(b=1, hq=2, hkv=2, n=n, d=16, grad=grad)


def _spy_fastest(monkeypatch):
    """Record which phase is timed, on which q shape; the real measurement still runs."""
    timed = []
    real_fwd, real_bwd = torch_plan._fastest_fwd, torch_plan._fastest_bwd
    monkeypatch.setattr(torch_plan, "_fastest_fwd", lambda *a: timed.append(("fwd", a[1].shape)) or real_fwd(*a))
    monkeypatch.setattr(torch_plan, "_fastest_bwd", lambda *a: timed.append(("bwd", a[2].shape)) or real_bwd(*a))
    monkeypatch.setattr(torch_plan, "_CHOICES", {})
    return timed


def test_plan_is_measured_once_per_shape(monkeypatch):
    layout = MemoryLayout(4, 4, MB)
    timed = _spy_fastest(monkeypatch)
    small = _choice_inputs(torch_plan.MASKED_CALL_MAX_N, grad=True)
    segment_attention(*small, layout, backend="torch").sum().backward()
    assert not timed  # up to MASKED_CALL_MAX_N the masked call runs without timing
    q, k, v = _choice_inputs(300)
    for _ in range(3):
        segment_attention(q, k, v, layout, backend="torch")
    assert timed == [("fwd", q.shape)] and len(torch_plan.plan_choices()) == 1
    (key, rows), = torch_plan.plan_choices().items()
    assert key[0] == layout and key[1] == tuple(q.shape) and key[-1] == "fwd" and rows in torch_plan._candidates(300)
    monkeypatch.setenv(torch_plan.ENV_PLAN, "static")
    segment_attention(*_choice_inputs(400), layout, backend="torch")
    assert len(timed) == 1  # static rule: nothing timed, the composition runs


def test_backward_plan_is_measured_once_at_the_first_backward(monkeypatch):
    layout = MemoryLayout(4, 4, MB)
    timed = _spy_fastest(monkeypatch)
    q, k, v = _choice_inputs(300, grad=True)
    out = segment_attention(q, k, v, layout, backend="torch")
    assert timed == [("fwd", q.shape)]  # the backward's plan is not known yet
    out.sum().backward()
    assert timed == [("fwd", q.shape), ("bwd", q.shape)]
    for _ in range(2):
        segment_attention(q, k, v, layout, backend="torch").sum().backward()
    assert len(timed) == 2
    choices = {key[-1]: plan for key, plan in torch_plan.plan_choices().items()}
    assert choices["fwd"] in torch_plan._candidates(300) and choices["bwd"] in torch_plan._bwd_candidates(300)


def test_new_padding_lengths_are_not_timed_again(monkeypatch):
    """A padded batch with new lengths at every step reuses the choices of its shape (timing again would
    cost seconds per step); a batch without padding has its own."""
    layout = MemoryLayout(4, 4, MB)
    timed = _spy_fastest(monkeypatch)
    q, k, v = _choice_inputs(300, grad=True)
    for length in (200, 250, 7):  # S = 292
        out = segment_attention(q, k, v, layout, segment_lengths=torch.tensor([length]), backend="torch")
        out.sum().backward()
    assert [phase for phase, _ in timed] == ["fwd", "bwd"]
    segment_attention(q, k, v, layout, backend="torch").sum().backward()
    assert [phase for phase, _ in timed] == ["fwd", "bwd", "fwd", "bwd"]


def test_candidates_cover_every_plan():
    assert torch_plan._candidates(300) == (0, 300, 128)
    assert torch_plan._candidates(1152) == (0, 1152, *torch_plan.CHUNK_ROWS)
    assert torch_plan._bwd_candidates(300) == (0, 300, 128, -128)
    assert torch_plan._candidates(300, whole=True) == (0, 128)  # one causal call, never one masked call
    assert torch_plan._bwd_candidates(300, whole=True) == (0, 128, -128)
    assert torch_plan._bwd_candidates(1152) == (0, 1152, *torch_plan.CHUNK_ROWS, *(-c for c in torch_plan.COL_KEYS))


@pytest.mark.parametrize("mask", ["memory_bidirectional", "causal", "full"])
def test_row_chunks_hold_every_visible_key(mask):
    layout = MemoryLayout(3, 5, mask)
    lengths = (7, 10)
    visible = layout.dense_mask(10, 0, lengths).any(0)
    chunks = torch_plan._row_chunks(layout, 10, lengths, 4)
    assert [c[:2] for c in chunks] == [(r, min(r + 4, 18)) for r in range(0, 18, 4)]
    for r0, r1, end in chunks:
        assert not visible[r0:r1, end:].any() and visible[r0:r1, end - 1].any()


@pytest.mark.parametrize("mask", ["memory_bidirectional", "causal", "full"])
@pytest.mark.parametrize("r, w, lengths", [(3, 5, (7, 10)), (3, 5, None), (0, 2, (4, 0)), (2, 2, (0, 0)),
                                           (4, 1, (10, 3, 6))])
def test_key_ends_follow_the_dense_mask(mask, r, w, lengths):
    """The rule that gives each row's last visible key, against the dense mask it replaces."""
    layout = MemoryLayout(r, w, mask)
    visible = layout.dense_mask(10, 0, lengths).any(0)  # [N, N] over the batch rows
    want = (visible * torch.arange(1, visible.shape[0] + 1)).amax(-1)
    assert torch.equal(torch_plan._key_ends(layout, 10, lengths), want)


@pytest.mark.parametrize("mask", ["memory_bidirectional", "causal", "full"])
@pytest.mark.parametrize("lengths", [(7, 10), (3, 5), None], ids=["padded", "padding-only-chunk", "complete"])
def test_key_chunks_hold_every_row_that_sees_their_keys(mask, lengths):
    layout = MemoryLayout(3, 5, mask)
    visible = layout.dense_mask(10, 0, lengths).any(0)  # [rows, keys]
    chunks = torch_plan._key_chunks(layout, 10, lengths, 4)
    seen = [k0 for k0 in range(0, 18, 4) if visible[:, k0 : k0 + 4].any()]
    if lengths == (3, 5):
        assert 8 not in seen  # keys [8, 12) are padding in every batch row
    assert [c[0] for c in chunks] == seen  # chunks no row sees are left out (keys of padding)
    for k0, k1, r0, r1 in chunks:
        assert k1 == min(k0 + 4, 18)
        rows = visible[:, k0:k1].any(1)
        assert not rows[:r0].any() and not rows[r1:].any() and rows[r0] and rows[r1 - 1]


@pytest.mark.parametrize("fwd,bwd,dtype", [
    (0, 0, torch.float32), (64, 64, torch.float32), (200, 200, torch.float32), (64, -64, torch.float32),
    (0, -128, torch.float32), (200, 64, torch.float32), (64, -64, torch.bfloat16),
], ids=["composition", "row-chunks", "one-masked-call", "rows-then-key-chunks", "composition-then-key-chunks",
        "one-call-then-row-chunks", "bf16-rows-then-key-chunks"])
def test_every_plan_computes_the_attention(monkeypatch, fwd, bwd, dtype):
    """Whichever plans the measurement picks, forward and backward equal the reference (16-bit inputs:
    the chunks' gradients are summed in float32)."""
    from rmt_kernels import segment_attention_ref

    monkeypatch.setattr(torch_plan, "_CHOICES", {})
    monkeypatch.setattr(torch_plan, "_fastest_fwd", lambda *a: fwd)
    monkeypatch.setattr(torch_plan, "_fastest_bwd", lambda *a: bwd)
    layout = MemoryLayout(4, 4, MB)
    q, k, v = _attention_inputs(b=2, hq=4, hkv=2, n=200, d=16, dtype=dtype, grad=True)  # GQA, padding
    lengths = torch.tensor([150, 192])
    out = segment_attention(q, k, v, layout, segment_lengths=lengths, backend="torch")
    ref = segment_attention_ref(q, k, v, layout, segment_lengths=lengths)
    base = segment_attention_ref(q, k, v, layout, segment_lengths=lengths, upcast=False)
    assert_close(out, ref.double(), base, name="out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert sorted(torch_plan.plan_choices().values()) == sorted([fwd, bwd])
    exp = torch.autograd.grad(ref, (q, k, v), dout)
    eager = torch.autograd.grad(base, (q, k, v), dout)
    for g, e, b, name in zip(got, exp, eager, "qkv"):
        assert_close(g, e.double(), b, name=f"d{name}")


@pytest.mark.parametrize("fwd,bwd", [(0, 0), (64, -64), (0, 128)],
                         ids=["one-causal-call", "row-then-key-chunks", "causal-call-then-row-chunks"])
def test_one_causal_block_computes_the_attention_by_every_plan(monkeypatch, fwd, bwd):
    """A causal mask without padding is one stock causal call, or chunks of masked calls."""
    from rmt_kernels import segment_attention_ref

    monkeypatch.setattr(torch_plan, "_CHOICES", {})
    monkeypatch.setattr(torch_plan, "_fastest_fwd", lambda *a: fwd)
    monkeypatch.setattr(torch_plan, "_fastest_bwd", lambda *a: bwd)
    layout = MemoryLayout(4, 4, "causal")
    q, k, v = _attention_inputs(b=2, hq=4, hkv=2, n=200, d=16, grad=True)
    out = segment_attention(q, k, v, layout, backend="torch")
    ref = segment_attention_ref(q, k, v, layout)
    base = segment_attention_ref(q, k, v, layout, upcast=False)
    assert_close(out, ref.double(), base, name="out")
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert sorted(torch_plan.plan_choices().values()) == sorted([fwd, bwd])
    exp = torch.autograd.grad(ref, (q, k, v), dout)
    eager = torch.autograd.grad(base, (q, k, v), dout)
    for g, e, b, name in zip(got, exp, eager, "qkv"):
        assert_close(g, e.double(), b, name=f"d{name}")


def test_value_checks_read_only_host_tensors(monkeypatch):
    cpu = torch.tensor([1, 2])
    assert _checks.host_value_checks(cpu)
    with pytest.raises(ValueError, match=r"segment_lengths must lie in \[0, S\] = \[0, 3\], got values in \[1, 4\]"):
        _checks.check_segment_lengths(torch.tensor([1, 4]), 2, 3, torch.device("cpu"))
    monkeypatch.setenv(_checks.ENV_DEBUG_CHECKS, "1")
    assert _checks.host_value_checks(cpu)


def test_device_check_raises_its_message_on_cpu():
    # On CPU tensors torch._assert_async raises at once; on a GPU the same call fails at the next sync.
    with pytest.raises(RuntimeError, match="token ids out of range"):
        _checks.device_check(torch.tensor(False), "token ids out of range")
    _checks.device_check(torch.tensor(True), "never raised")


# --------------------------------------------------------------------------- on a GPU


def _tiny_step(weights):
    """A one-layer backbone over the packed segment: projections, segment_attention, a norm."""
    wq, wk, wv, wo = weights

    def step(packed, info):
        b, n, d = packed.shape
        heads = 2

        def proj(w):
            return (packed @ w).view(b, n, heads, d // heads).transpose(1, 2)

        att = segment_attention(proj(wq), proj(wk), proj(wv), info.layout, segment_lengths=info.segment_lengths)
        h = packed + att.transpose(1, 2).reshape(b, n, d) @ wo
        return torch.nn.functional.layer_norm(h, (d,))

    return step


@pytest.mark.cuda
def test_no_host_sync_in_ops_and_a_driver_step():
    dev = "cuda"
    layout = MemoryLayout(4, 4, MB)
    q, k, v = _attention_inputs(n=40, d=64, device=dev, dtype=torch.bfloat16)
    lengths = torch.tensor([32, 17], device=dev)
    seg = torch.randn(2, 32, 64, device=dev, requires_grad=True)
    mem = torch.randn(4, 64, device=dev, requires_grad=True)
    weight = torch.randn(50, 64, device=dev, requires_grad=True)
    ids = torch.randint(0, 50, (2, 32), device=dev)
    weights = [torch.randn(64, 64, device=dev) / 8 for _ in range(4)]
    driver = SegmentDriver(MemoryLayout(4, 4, "causal"), 16)

    def everything():
        out = segment_attention(q, k, v, layout, segment_lengths=lengths)
        out.float().sum().backward()
        pack_segment(seg, MemoryLayout(4, 4), mem, mem).sum().backward()
        pack_segment_from_ids(ids, weight, MemoryLayout(4, 4), mem, mem).sum().backward()
        with torch.no_grad():
            driver.run(_tiny_step(weights), mem.detach(), inputs_embeds=seg.detach())

    everything()  # warm-up: compilation and autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        everything()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_driver_segment_step_replays_from_a_cuda_graph():
    dev = "cuda"
    weights = [torch.randn(64, 64, device=dev) / 8 for _ in range(4)]
    driver = SegmentDriver(MemoryLayout(4, 4, "causal"), 16)
    step = _tiny_step(weights)
    static_x = torch.randn(2, 32, 64, device=dev)
    static_mem = torch.randn(4, 64, device=dev)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (and autotuning) before capture
                driver.run(step, static_mem, inputs_embeds=static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = driver.run(step, static_mem, inputs_embeds=static_x)
        for _ in range(2):
            static_x.copy_(torch.randn_like(static_x))
            graph.replay()
            eager = driver.run(step, static_mem, inputs_embeds=static_x)
            torch.cuda.synchronize()
            assert_close(captured.outputs, eager.outputs.double(), name="outputs", dtype=torch.float32)
            assert_close(captured.memory, eager.memory.double(), name="memory", dtype=torch.float32)
