"""The segment driver against an unrolled reference loop written plainly here (torch.cat, F.embedding,
dense-mask SDPA, the official wrapper's detach rule), through a tiny random transformer."""

import copy
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rmt_kernels import (
    MemoryLayout,
    SegmentDriver,
    StepOutput,
    backends,
    segment_attention,
)
from rmt_kernels.recurrent import memory_detached, segment_bounds
from rmt_kernels.reference import recurrent_ref, segment_split_ref
from tests.helpers import assert_close

DTYPE = torch.float64


# --------------------------------------------------------------------------- a tiny backbone


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h, attend):
        b, n, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        o = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # [B, H, N, D]
        h = h + self.out(o.transpose(1, 2).reshape(b, n, d))
        return h + self.mlp(self.ln2(h))


class TinyLM(nn.Module):
    """Two pre-norm layers, learned positions 0..N-1 per segment, final LayerNorm, LM head."""

    def __init__(self, vocab=29, dim=16, heads=2, layers=2, max_pos=48, dtype=DTYPE):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_pos, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.to(dtype)

    def forward(self, x, attend):
        h = x + self.pos.weight[: x.shape[1]]
        states = [h]
        for blk in self.blocks:
            h = blk(h, attend)
            states.append(h)
        hidden = self.norm(h)
        return hidden, self.head(hidden), states


def driver_step(model, record=None):
    """The backbone as the driver calls it: attention through segment_attention (torch backend)."""

    def step(packed, info):
        if record is not None:
            record.append((packed, info))

        def attend(q, k, v):
            return segment_attention(q, k, v, info.layout, segment_lengths=info.segment_lengths, backend="torch")

        hidden, logits, states = model(packed, attend)
        return StepOutput(hidden, logits, tuple(states) if info.output_hidden_states else None)

    return step


# --------------------------------------------------------------------------- the reference loop


def official_split(t, segment_size, alignment):
    """The official wrapper's split_tensor, on a real tensor."""
    return segment_split_ref(t, segment_size, alignment)


def reference_run(model, memory, ids, segment_size, k2, max_n, attention_mask=None, alignment=None,
                  embeds=None, write_memory=None, num_read=None):
    """Unrolled RMT (``reference.recurrent_ref``): cat([mem, embed(x), mem]), causal + key-padding
    dense mask, next mem = W rows."""
    m = memory.shape[-2] if memory is not None else write_memory.shape[-2]
    layout = MemoryLayout(m if num_read is None else num_read, m, mask="causal")

    def backbone(packed, dense):
        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense[:, None])

        return model(packed, attend)

    return recurrent_ref(
        backbone, memory, model.emb(ids) if embeds is None else embeds, layout, segment_size, k2=k2,
        max_n_segments=max_n, segment_alignment=alignment, attention_mask=attention_mask,
        write_memory=write_memory,
    )


def _grads(loss, model, extra):
    params = list(extra) + [p for p in model.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _compare_grads(got, want, names, baseline=None):
    baseline = baseline if baseline is not None else [None] * len(got)
    for g, w, b, name in zip(got, want, baseline, names):
        if w is None:
            assert g is None or not g.abs().any(), f"{name}: unexpected gradient"
            continue
        assert g is not None, f"{name}: missing gradient"
        assert_close(g, w, b, name=name)


def _setup(batch=2, seq_len=13, mem_tokens=3, vocab=29, dim=16):
    model = TinyLM(vocab=vocab, dim=dim)
    memory = nn.Parameter(torch.randn(mem_tokens, dim, dtype=DTYPE) * model.emb.weight.detach().std())
    ids = torch.randint(0, vocab, (batch, seq_len))
    return model, memory, ids


# --------------------------------------------------------------------------- rules


@pytest.mark.parametrize("seq_len,size,alignment", [
    pytest.param(10, 4, None, id="left-tail"),
    pytest.param(8, 4, "left", id="left-exact"),
    pytest.param(3, 5, "left", id="left-one-short"),
    pytest.param(10, 4, "right", id="right-head"),
    pytest.param(8, 4, "right", id="right-exact"),
    pytest.param(1, 5, "right", id="right-one"),
    pytest.param(10, 4, "center", id="center-tail"),
    pytest.param(6, 4, "center", id="center-even"),
    pytest.param(10, 3, "center", id="center-3"),
    pytest.param(33, 5, "center", id="center-33"),
    pytest.param(5, 5, "center", id="center-exact"),
])
def test_segment_bounds_match_official_split(seq_len, size, alignment):
    t = torch.arange(seq_len)[None]
    expected = [(int(c[0, 0]), int(c[0, -1]) + 1) for c in official_split(t, size, alignment)]
    assert segment_bounds(seq_len, size, alignment) == expected


@pytest.mark.parametrize("k2,max_n,expected", [
    pytest.param(-1, 5, [False] * 6, id="full-bptt"),
    pytest.param(None, None, [False] * 6, id="none"),
    pytest.param(1, 5, [False, True, True, True, True, False], id="k2=1"),
    pytest.param(2, 5, [False, True, True, True, False, False], id="k2=2"),
    pytest.param(3, 4, [False, True, False, False, False, False], id="k2=3-max4"),
    pytest.param(0, 2, [False, True, True, False, False, False], id="k2=0"),
])
def test_memory_detached_rule(k2, max_n, expected):
    assert [memory_detached(i, k2, max_n) for i in range(6)] == expected


# --------------------------------------------------------------------------- chains


CHAIN_CASES = [
    # (seq_len, segment_size, k2, max_n_segments, alignment, input kind, checkpoint, backend)
    pytest.param(4, 5, -1, None, None, "ids", False, "torch", id="1seg-short"),
    pytest.param(13, 5, -1, None, None, "ids", False, "torch", id="3seg-full"),
    pytest.param(33, 5, -1, None, None, "ids", False, "torch", id="7seg-full-short-last"),
    pytest.param(13, 5, None, None, "right", "embeds", False, "torch", id="3seg-k2None-right-embeds"),
    pytest.param(33, 5, 1, 7, None, "ids", False, "torch", id="7seg-k2=1-max7"),
    pytest.param(35, 5, 2, 7, "center", "ids", False, "torch", id="7seg-k2=2-max7-center"),
    pytest.param(33, 5, 3, 5, None, "embeds", False, "torch", id="7seg-k2=3-max5-embeds"),
    pytest.param(13, 5, 1, 2, None, "ids", True, "torch", id="3seg-k2=1-max2-checkpoint"),
    pytest.param(15, 5, 2, 3, None, "ids", False, "triton", id="3seg-k2=2-max3-triton"),
    pytest.param(13, 5, 0, 3, "right", "ids", False, "torch", id="3seg-k2=0"),
    pytest.param(33, 5, -1, None, None, "ids", True, "torch", id="7seg-full-checkpoint"),
]


@pytest.mark.parametrize("seq_len,size,k2,max_n,alignment,kind,ckpt,backend", CHAIN_CASES)
def test_chain_matches_unrolled_reference(seq_len, size, k2, max_n, alignment, kind, ckpt, backend):
    ok, why = backends.backend_status("pack_segment", backend, torch.device("cpu"))
    if not ok:
        pytest.skip(why)
    # Triton kernels take float32 at most: run that case in float32, judged against a float64 copy
    # of the same model with the float32 reference as the baseline of the tolerance rule.
    dtype = torch.float32 if backend == "triton" else DTYPE
    model, memory, ids = _setup(seq_len=seq_len)
    model64, memory64 = model, memory
    if dtype != DTYPE:
        model, memory = copy.deepcopy(model).to(dtype), nn.Parameter(memory.detach().to(dtype))
    layout = MemoryLayout(3, 3, mask="causal")
    driver = SegmentDriver(layout, size, k2=k2, max_n_segments=max_n, segment_alignment=alignment,
                           checkpoint=ckpt, backend=backend)

    def reference(m, mem, bptt_k2=k2, bptt_max=max_n):
        embeds = m.emb(ids) * 1.5 if kind == "embeds" else None
        return reference_run(m, mem, ids, size, bptt_k2, bptt_max, alignment=alignment, embeds=embeds)

    if kind == "ids":
        res = driver.run(driver_step(model), memory, input_ids=ids, embedding_weight=model.emb.weight)
    else:
        res = driver.run(driver_step(model), memory, inputs_embeds=model.emb(ids) * 1.5)  # a non-leaf input
    ref_logits, ref_mem, _ = reference(model64, memory64)
    base_logits, base_mem, _ = reference(model, memory) if dtype != DTYPE else (None, None, None)
    assert res.bounds == segment_bounds(seq_len, size, alignment)
    assert_close(res.outputs, ref_logits, base_logits, name="logits")
    assert_close(res.memory, ref_mem, base_mem, name="final memory")
    assert res.memory.requires_grad == ref_mem.requires_grad

    upstream = torch.randn(ref_logits.shape, dtype=DTYPE)
    names = ["memory"] + [n for n, _ in model.named_parameters()]
    got = _grads((res.outputs * upstream.to(dtype)).sum(), model, [memory])
    want = _grads((ref_logits * upstream).sum(), model64, [memory64])
    base = _grads((base_logits * upstream.to(dtype)).sum(), model, [memory]) if dtype != DTYPE else [None] * len(got)
    _compare_grads(got, want, names, base)

    n_seg = len(res.bounds)
    if any(memory_detached(i, k2, max_n) for i in range(n_seg - 1)):
        # The truncation must matter here, or this case could not tell it from full BPTT.
        full_logits, _, _ = reference(model64, memory64, -1, None)
        full = _grads((full_logits * upstream).sum(), model64, [memory64])
        assert any(not torch.allclose(a, b) for a, b in zip(want, full) if a is not None and b is not None)


def test_padded_batch_with_fully_padded_segments():
    model, memory, ids = _setup(batch=3, seq_len=15)
    lengths = torch.tensor([15, 7, 3])
    mask = (torch.arange(15)[None] < lengths[:, None]).long()
    layout = MemoryLayout(3, 3, mask="causal")
    driver = SegmentDriver(layout, 5)
    record = []
    res = driver.run(driver_step(model, record), memory, input_ids=ids, embedding_weight=model.emb.weight,
                     attention_mask=mask)
    assert [info.segment_lengths_list for _, info in record] == [(5, 5, 3), (5, 2, 0), (5, 0, 0)]
    official = torch.ones(3, 11, dtype=torch.long)
    official[:, 3:8] = mask[:, 5:10]
    assert torch.equal(record[1][1].packed_attention_mask(), official)
    ref_logits, ref_mem, _ = reference_run(model, memory, ids, 5, -1, None, attention_mask=mask)
    assert_close(res.outputs, ref_logits, name="logits")
    assert_close(res.memory, ref_mem, name="memory")
    upstream = torch.randn_like(ref_logits) * mask[..., None]
    names = ["memory"] + [n for n, _ in model.named_parameters()]
    _compare_grads(_grads((res.outputs * upstream).sum(), model, [memory]),
                   _grads((ref_logits * upstream).sum(), model, [memory]), names)


def test_fixed_write_memory_and_no_read_block():
    model, _, ids = _setup(seq_len=13)
    write = nn.Parameter(torch.randn(3, 16, dtype=DTYPE))
    layout = MemoryLayout(0, 3, mask="causal")
    res = SegmentDriver(layout, 5).run(driver_step(model), None, input_ids=ids,
                                       embedding_weight=model.emb.weight, write_memory=write)
    ref_logits, ref_mem, _ = reference_run(model, None, ids, 5, -1, None, write_memory=write, num_read=0)
    assert_close(res.outputs, ref_logits, name="logits")
    assert_close(res.memory, ref_mem, name="memory")
    upstream = torch.randn_like(ref_logits)
    _compare_grads(_grads((res.outputs * upstream).sum(), model, [write]),
                   _grads((ref_logits * upstream).sum(), model, [write]), ["write_memory"])


def test_hidden_states_only_when_asked():
    model, memory, ids = _setup(seq_len=13)
    driver = SegmentDriver(MemoryLayout(3, 3, mask="causal"), 5)
    record = []
    plain = driver.run(driver_step(model, record), memory, input_ids=ids, embedding_weight=model.emb.weight)
    assert plain.hidden_states is None and not any(info.output_hidden_states for _, info in record)
    res = driver.run(driver_step(model), memory, input_ids=ids, embedding_weight=model.emb.weight,
                     output_hidden_states=True)
    _, _, ref_states = reference_run(model, memory, ids, 5, -1, None)
    assert len(res.hidden_states) == len(ref_states) == 3
    for k, (h, r) in enumerate(zip(res.hidden_states, ref_states)):
        assert_close(h, r, name=f"hidden_states[{k}]")


# --------------------------------------------------------------------------- buffers


def test_buffer_reused_without_autograd():
    model, memory, ids = _setup(seq_len=13)
    driver = SegmentDriver(MemoryLayout(3, 3, mask="causal"), 5)
    with torch.no_grad():
        record = []
        res = driver.run(driver_step(model, record), memory, input_ids=ids, embedding_weight=model.emb.weight)
        assert len({packed.data_ptr() for packed, _ in record}) == 1, "one packed buffer for every segment"
    ref_logits, ref_mem, _ = reference_run(model, memory, ids, 5, -1, None)
    assert_close(res.outputs, ref_logits, name="logits")
    assert_close(res.memory, ref_mem, name="memory")


def test_buffer_not_reused_when_a_graph_may_hold_it():
    model, memory, ids = _setup(seq_len=13)
    driver = SegmentDriver(MemoryLayout(3, 3, mask="causal"), 5)
    record = []
    driver.run(driver_step(model, record), memory.detach(), input_ids=ids, embedding_weight=model.emb.weight.detach())
    # Inputs need no grad, but the backbone's weights do: segment 0 may use the shared buffer; once
    # its step recorded a graph (which saved the buffer), every later segment gets its own.
    ptrs = [packed.data_ptr() for packed, _ in record]
    assert len(set(ptrs)) == len(ptrs)

    model.requires_grad_(False)  # nothing records now, even in grad mode: reuse
    record = []
    res = driver.run(driver_step(model, record), memory.detach(), input_ids=ids, embedding_weight=model.emb.weight)
    assert len({packed.data_ptr() for packed, _ in record}) == 1
    ref_logits, _, _ = reference_run(model, memory.detach(), ids, 5, -1, None)
    assert_close(res.outputs, ref_logits, name="logits")


def test_outputs_aliasing_the_buffer_are_copied():
    """A step that returns (views of) its input: what the driver keeps must survive the reuse."""
    layout = MemoryLayout(2, 2, mask="causal")
    embeds = torch.randn(2, 13, 8)
    memory = torch.randn(2, 8)
    with torch.no_grad():
        res = SegmentDriver(layout, 5).run(lambda packed, info: packed, memory, inputs_embeds=embeds)
    assert torch.equal(res.outputs, embeds)
    assert torch.equal(res.memory, memory.expand(2, 2, 8))


# --------------------------------------------------------------------------- truncated BPTT, streamed


class SavedTensorCounter:
    """Live tensors saved for backward (packed by saved_tensors_hooks, released with the graph)."""

    def __init__(self):
        self.live = self.peak = 0

    def _release(self):
        self.live -= 1

    def pack(self, t):
        self.live += 1
        self.peak = max(self.peak, self.live)
        token = type("Saved", (), {})()
        weakref.finalize(token, self._release)
        return token, t

    @staticmethod
    def unpack(packed):
        return packed[1]


def _streamed_run(n_segments, k2, streaming, max_n=None, dtype=torch.float32):
    torch.manual_seed(0)
    model = TinyLM(dim=16, dtype=dtype)
    memory = nn.Parameter(torch.randn(2, 16, dtype=dtype))
    size = 4
    ids = torch.randint(0, 29, (2, n_segments * size))
    labels = torch.randint(0, 29, (2, n_segments * size))
    driver = SegmentDriver(MemoryLayout(2, 2, mask="causal"), size, k2=k2,
                           max_n_segments=max_n if max_n is not None else n_segments)

    def loss_fn(logits, info):
        return F.cross_entropy(logits.flatten(0, 1), labels[:, info.start : info.end].flatten(), reduction="sum")

    counter = SavedTensorCounter()
    with torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
        if streaming:
            res = driver.run(driver_step(model), memory, input_ids=ids, embedding_weight=model.emb.weight,
                             loss_fn=loss_fn, return_outputs=False)
            loss = res.loss
        else:
            res = driver.run(driver_step(model), memory, input_ids=ids, embedding_weight=model.emb.weight)
            loss = sum(loss_fn(res.outputs[:, a:b], type("I", (), {"start": a, "end": b})) for a, b in res.bounds)
            loss.backward()
    grads = [memory.grad] + [p.grad for p in model.parameters()]
    return counter, loss.detach(), grads


def test_streamed_truncated_bptt_saved_tensors_do_not_grow():
    short, _, _ = _streamed_run(8, k2=1, streaming=True)
    long, _, _ = _streamed_run(64, k2=1, streaming=True)
    assert short.peak > 0
    assert long.peak == short.peak, f"peak saved tensors grew: {short.peak} -> {long.peak}"
    assert long.live == 0
    # The counter does see growth when the whole graph is kept (no streaming).
    kept, _, _ = _streamed_run(16, k2=1, streaming=False)
    assert kept.peak > 4 * short.peak


@pytest.mark.parametrize("k2,max_n", [
    pytest.param(1, 7, id="k2=1"),
    pytest.param(3, 5, id="k2=3-max5"),
    pytest.param(-1, None, id="full"),
])
def test_streamed_gradients_equal_whole_graph(k2, max_n):
    _, loss_s, grads_s = _streamed_run(7, k2, True, max_n=max_n, dtype=DTYPE)
    _, loss_w, grads_w = _streamed_run(7, k2, False, max_n=max_n, dtype=DTYPE)
    assert_close(loss_s, loss_w, name="loss")
    for k, (a, b) in enumerate(zip(grads_s, grads_w)):
        assert_close(a, b, name=f"grad[{k}]")


def test_streamed_non_leaf_inputs_get_their_gradient():
    model, memory, ids = _setup(seq_len=13)
    scale = nn.Parameter(torch.tensor(1.5, dtype=DTYPE))
    driver = SegmentDriver(MemoryLayout(3, 3, mask="causal"), 5, k2=1, max_n_segments=3)
    upstream = torch.randn(2, 13, 29, dtype=DTYPE)

    def loss_fn(logits, info):
        return (logits * upstream[:, info.start : info.end]).sum()

    driver.run(driver_step(model), memory * scale, inputs_embeds=model.emb(ids) * scale, loss_fn=loss_fn)
    got = [scale.grad.clone(), memory.grad.clone()]
    ref_logits, _, _ = reference_run(model, memory * scale, ids, 5, 1, 3, embeds=model.emb(ids) * scale)
    want = torch.autograd.grad((ref_logits * upstream).sum(), [scale, memory])
    for g, w, name in zip(got, want, ["scale", "memory"]):
        assert_close(g, w, name=name)


# --------------------------------------------------------------------------- errors


def _driver_errors():
    lay = MemoryLayout(2, 2, mask="causal")
    emb = torch.randn(2, 9, 8)
    mem = torch.randn(2, 8)
    run = SegmentDriver(lay, 4).run
    ident = lambda p, i: p  # noqa: E731
    return [
        pytest.param(lambda: SegmentDriver(MemoryLayout(2, 0), 4), ValueError, "num_write", id="no-write-block"),
        pytest.param(lambda: SegmentDriver(MemoryLayout(1, 2), 4), ValueError, "num_read", id="read-not-M"),
        pytest.param(lambda: SegmentDriver(lay, 0), ValueError, "segment_size", id="size-0"),
        pytest.param(lambda: SegmentDriver(lay, 4, segment_alignment="middle"), ValueError, "segment_alignment", id="alignment"),
        pytest.param(lambda: SegmentDriver(lay, 4, k2=2), ValueError, "max_n_segments", id="k2-without-max"),
        pytest.param(lambda: SegmentDriver((2, 2), 4), TypeError, "MemoryLayout", id="layout-type"),
        pytest.param(lambda: run(ident, mem), ValueError, "exactly one", id="no-input"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, input_ids=torch.zeros(2, 9, dtype=torch.long)), ValueError, "exactly one", id="two-inputs"),
        pytest.param(lambda: run(ident, mem, input_ids=torch.zeros(2, 9, dtype=torch.long)), ValueError, "embedding_weight", id="ids-without-weight"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, embedding_weight=torch.randn(5, 8)), ValueError, "only with input_ids", id="weight-with-embeds"),
        pytest.param(lambda: run(ident, torch.randn(3, 8), inputs_embeds=emb), ValueError, "memory must be", id="memory-rows"),
        pytest.param(lambda: run(ident, mem.double(), inputs_embeds=emb), TypeError, "memory has dtype", id="memory-dtype"),
        pytest.param(lambda: run(ident, None, inputs_embeds=emb), ValueError, "memory", id="memory-missing"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, attention_mask=torch.tensor([[0] + [1] * 8] * 2)), ValueError, "right-padded", id="left-padding"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, attention_mask=torch.full((2, 9), 2)), ValueError, "only 0 and 1", id="mask-values"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, attention_mask=torch.ones(2, 8)), ValueError, "attention_mask must have shape", id="mask-shape"),
        pytest.param(lambda: run(lambda p, i: p[:, 1:], mem, inputs_embeds=emb), ValueError, "last hidden state", id="step-shape"),
        pytest.param(lambda: run(lambda p, i: "x", mem, inputs_embeds=emb), TypeError, "step must return", id="step-type"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, output_hidden_states=True), ValueError, "hidden_states", id="no-hidden-states"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, bounds=[(0, 4), (5, 9)]), ValueError, "contiguous", id="bounds-gap"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb[:, :0]), ValueError, "empty", id="empty-sequence"),
        pytest.param(lambda: run(ident, mem, inputs_embeds=emb, loss_fn=lambda o, i: o), ValueError, "scalar", id="loss-not-scalar"),
    ]


@pytest.mark.parametrize("fn,exc,match", _driver_errors())
def test_driver_validation(fn, exc, match):
    with pytest.raises(exc, match=match):
        fn()


def test_explicit_bounds_run_a_prefix():
    """All but the last segment (what generation needs): bounds given explicitly."""
    model, memory, ids = _setup(seq_len=13)
    driver = SegmentDriver(MemoryLayout(3, 3, mask="causal"), 5, segment_alignment="right")
    bounds = driver.segment_bounds(13)[:-1]
    res = driver.run(driver_step(model), memory, input_ids=ids, embedding_weight=model.emb.weight, bounds=bounds)
    assert res.bounds == [(0, 3), (3, 8)] and res.outputs.shape[1] == 8
    ref_logits, ref_mem, _ = reference_run(model, memory, ids[:, :8], 5, -1, None, alignment="right")
    assert_close(res.outputs, ref_logits, name="logits")
    assert_close(res.memory, ref_mem, name="memory")


@pytest.mark.parametrize("trim", ["logits", "hidden", "both", "segment-logits"])
def test_step_may_return_rows_from_the_segment_start(trim):
    """A step whose head skips the read-memory rows (``[R, N)`` only: HF ``logits_to_keep = N - R``)
    gives the same outputs, memory and gradients as one returning every row."""
    model, memory, ids = _setup(seq_len=13)
    layout = MemoryLayout(3, 3, mask="causal")
    full = driver_step(model)

    def trimmed(packed, info):
        out = full(packed, info)
        r = info.layout.num_read
        hidden = out.hidden[:, r:] if trim in ("hidden", "both") else out.hidden
        logits = out.logits[:, r:] if trim in ("logits", "both") else out.logits
        if trim == "segment-logits":
            logits = out.logits[:, r : r + info.segment_len]
        return StepOutput(hidden, logits)

    results = []
    for step in (full, trimmed):
        res = SegmentDriver(layout, 5).run(step, memory, input_ids=ids, embedding_weight=model.emb.weight)
        grads = torch.autograd.grad(res.outputs.square().sum() + res.memory.sum(), [memory, model.emb.weight])
        results.append((res.outputs, res.memory, *grads))
    for got, want, name in zip(results[1], results[0], ["outputs", "memory", "d_memory", "d_embedding"]):
        assert_close(got, want, name=name)
