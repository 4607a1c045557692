"""The ARMT drop-in (AssociativeMemoryCell / AssociativeRecurrentWrapper) against the plain restatement
of the official code in rmt_kernels/bench/armt_official.py.

Rule (tests/helpers.py): the float32 drop-in may differ from the float64 restatement by at most twice
what the float32 restatement does, plus the floor; the float64 drop-in by the float64 floor.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

from rmt_kernels.bench.armt import peak_bytes  # noqa: E402
from rmt_kernels.bench.armt_official import OfficialCell, OfficialWrapper, official_keys  # noqa: E402
from helpers import assert_close  # noqa: E402
from rmt_kernels.integrations import _armt_run, hf  # noqa: E402
from rmt_kernels.integrations.armt import AssociativeMemoryCell, AssociativeRecurrentWrapper  # noqa: E402

VOCAB, DIM, M, D_MEM = 64, 32, 3, 8


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=DIM, n_layer=2, n_head=2, n_positions=128, attn_pdrop=0.0, resid_pdrop=0.0,
        embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    ))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))


LAYERS = {_gpt2: "transformer.h", _llama: "model.layers"}


def _pair(build, cell_kw=None, dtype=torch.float32, **wrapper_kw):
    """(restatement float64, restatement in ``dtype``, drop-in in ``dtype``), the drop-in loaded from the
    restatement's state with strict=True."""
    cell_kw = dict(cell_kw or {})
    base = build().eval()
    ref = OfficialWrapper(OfficialCell(base, M, D_MEM, LAYERS[build], **cell_kw), **wrapper_kw)
    # Non-zero W_mv (the official zero init would make the first write's values vanish) and gates.
    with torch.no_grad():
        for layer in ref.memory_cell.layers:
            layer.W_mv.weight.normal_(0, 0.2)
            layer.W_mb.bias.normal_(0, 1)
    ours_base = build().eval()
    ours = AssociativeRecurrentWrapper(
        AssociativeMemoryCell(ours_base, M, D_MEM, LAYERS[build], attn_implementation="rmt_kernels", backend="torch",
                              **cell_kw), **wrapper_kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return copy.deepcopy(ref).double(), ref.to(dtype), ours.to(dtype)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _inputs(mask_kind, batch=3, total=22, labels_mask=False):
    ids = torch.randint(1, VOCAB, (batch, total))
    mask = None
    if mask_kind == "right":
        lengths = torch.tensor([total, 15, 12])  # row 1: its last segment (of 8) is all padding
        mask = (torch.arange(total)[None, :] < lengths[:, None]).long()
    lmask = (torch.rand(batch, total) < 0.5) if labels_mask else None
    return ids, mask, lmask


def _run(w, is_ours, ids, mask, lmask, upstream, embeds=None, labels=True, dtype=torch.float32):
    w.zero_grad(set_to_none=True)
    kw = dict(labels=ids if labels else None, labels_mask=lmask, attention_mask=mask,
              inputs_embeds=None if embeds is None else embeds.to(dtype))
    if is_ours:
        out = w(input_ids=ids, **kw)
        loss, logits = out.loss, out.logits
    else:
        loss, logits, _ = w(ids, **kw)
    total = (logits * upstream.to(logits.dtype)).sum()
    if labels:
        total = total + loss
    total.backward()
    return torch.as_tensor(loss).detach(), logits.detach(), _grads(w)


CASES = [
    pytest.param(_gpt2, dict(n_heads=2), dict(segment_size=8), "right", {}, id="gpt2_heads2_uneven_right_padding"),
    pytest.param(_llama, dict(), dict(segment_size=8), None, {}, id="llama_gqa_no_masks"),
    pytest.param(_llama, dict(n_heads=2), dict(segment_size=6), "right", {}, id="llama_heads2_right_padding"),
    pytest.param(_gpt2, dict(normalize=False), dict(segment_size=8), "right", {}, id="gpt2_framework_accel"),
    pytest.param(_gpt2, dict(normalize=False, n_heads=2), dict(segment_size=7), None, {}, id="gpt2_no_norm_heads2"),
    pytest.param(_gpt2, dict(gating=True, n_heads=2), dict(segment_size=8), "right", {}, id="gpt2_gating"),
    pytest.param(_gpt2, dict(use_denom=False), dict(segment_size=8), None, {}, id="gpt2_no_denominator"),
    pytest.param(_gpt2, dict(correction=False), dict(segment_size=8), "right", {}, id="gpt2_no_correction"),
    pytest.param(_gpt2, dict(), dict(segment_size=8), "right", dict(labels_mask=True), id="gpt2_labels_mask"),
    pytest.param(_gpt2, dict(), dict(segment_size=8, segment_alignment="right"), None, {}, id="gpt2_right_align"),
    pytest.param(_gpt2, dict(), dict(segment_size=7, segment_alignment="center"), "right", {}, id="gpt2_center"),
    pytest.param(_gpt2, dict(wrap_pos=True), dict(segment_size=8), "right", {}, id="gpt2_wrap_pos"),
    pytest.param(_gpt2, dict(), dict(segment_size=8), "right", dict(embeds=True), id="gpt2_inputs_embeds"),
    pytest.param(_gpt2, dict(), dict(segment_size=5, max_n_segments=5, k2=2), "right", {}, id="gpt2_k2"),
    pytest.param(_llama, dict(n_heads=2), dict(segment_size=5, checkpoint_every=2), "right", {},
                 id="llama_checkpoint_every_2"),
]


def _dtype_cases():
    for case in CASES:
        yield pytest.param(*case.values, torch.float64, id=f"{case.id}-float64")
        yield pytest.param(*case.values, torch.float32, id=f"{case.id}-float32")


@pytest.mark.parametrize("build, cell_kw, wrapper_kw, mask_kind, extra, dtype", list(_dtype_cases()))
def test_forward_backward_match_official(build, cell_kw, wrapper_kw, mask_kind, extra, dtype):
    """Loss, logits and the gradient of every parameter: the float64 drop-in against the float64
    restatement (float64 floor), the float32 one by the rule (twice the float32 restatement's error)."""
    wrapper_kw = dict(wrapper_kw)
    ckpt = wrapper_kw.pop("checkpoint_every", None)
    ref_w, base_w, ours = _pair(build, cell_kw, dtype=dtype, **wrapper_kw)
    ours.checkpoint_every = ckpt
    ids, mask, lmask = _inputs(mask_kind, labels_mask=extra.get("labels_mask", False))
    upstream = torch.randn(ids.shape + (VOCAB,), dtype=torch.float64) * 0.1
    embeds = torch.randn(ids.shape + (DIM,), dtype=torch.float64) * 0.02 if extra.get("embeds") else None
    ref = _run(ref_w, False, ids, mask, lmask, upstream, embeds, dtype=torch.float64)
    base = (None, None, {}) if dtype == torch.float64 else _run(base_w, False, ids, mask, lmask, upstream, embeds)
    out = _run(ours, True, ids, mask, lmask, upstream, embeds, dtype=dtype)
    assert out[1].dtype == dtype
    assert_close(out[0], ref[0], base[0], name="loss")
    assert_close(out[1], ref[1], base[1], name="logits")
    assert set(out[2]) == set(ref[2]) == {n for n, p in ours.named_parameters()}  # every parameter gets one
    for name in ref[2]:
        assert_close(out[2][name], ref[2][name], base[2].get(name), name=f"grad {name}")


def test_no_labels_and_hidden_states():
    ref_w, base_w, ours = _pair(_gpt2, dict(n_heads=2), segment_size=8)
    ids, mask, _ = _inputs("right")
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        ref, base = ref_w(ids, attention_mask=mask)[2], base_w(ids, attention_mask=mask)[2]
        plain = ours(input_ids=ids)
    assert out.loss == 0 and plain.loss == 0 and plain.hidden_states is None
    assert len(out.hidden_states) == len(ref) == 3
    for i, (o, r, b) in enumerate(zip(out.hidden_states, ref, base)):
        assert o.shape == (3, 22, DIM)
        assert_close(o, r, b, name=f"hidden_states[{i}]")
    assert out.segment_bounds == ((0, 8), (8, 16), (16, 22))
    assert torch.equal(out["logits_2"], out.logits[:, 16:])


def test_state_dict_has_the_official_keys():
    for build, cell_kw in ((_gpt2, dict(gating=True, n_heads=2)), (_llama, dict()), (_gpt2, dict(wrap_pos=True))):
        bare = build()
        expected = official_keys(bare.state_dict().keys(), LAYERS[build], 2)
        ref = OfficialWrapper(OfficialCell(build(), M, D_MEM, LAYERS[build], **cell_kw), segment_size=4)
        ours = AssociativeRecurrentWrapper(
            AssociativeMemoryCell(build(), M, D_MEM, LAYERS[build], attn_implementation="rmt_kernels", **cell_kw),
            segment_size=4)
        assert set(ref.state_dict()) == expected
        assert set(ours.state_dict()) == expected
        assert list(ours.state_dict()) == list(ref.state_dict())
        shapes = {k: v.shape for k, v in ref.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
        ours.load_state_dict(ref.state_dict(), strict=True)
        reloaded = AssociativeRecurrentWrapper(
            AssociativeMemoryCell(build(), M, D_MEM, LAYERS[build], attn_implementation="rmt_kernels", **cell_kw),
            segment_size=4)
        reloaded.load_state_dict(ours.state_dict(), strict=True)
        for k, v in ours.state_dict().items():
            assert torch.equal(reloaded.state_dict()[k], v)


def test_init_as_official():
    torch.manual_seed(3)
    ref = OfficialCell(_gpt2(), M, D_MEM, n_heads=2)
    torch.manual_seed(3)
    ours = AssociativeMemoryCell(_gpt2(), M, D_MEM, n_heads=2, attn_implementation="rmt_kernels")
    for (k, a), (k2, b) in zip(ref.state_dict().items(), ours.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not ours.layers[0].W_mv.weight.any()
    assert ours.model.config._attn_implementation == "rmt_kernels"


@pytest.mark.parametrize(
    "build, cell_kw, prompt_mask",
    [
        pytest.param(_gpt2, dict(n_heads=2), False, id="gpt2"),
        pytest.param(_llama, dict(), False, id="llama"),
        pytest.param(_gpt2, dict(normalize=False), True, id="gpt2_masked_prompt"),
    ],
)
def test_greedy_generate_matches_official(build, cell_kw, prompt_mask):
    _, ref, ours = _pair(build, cell_kw, segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 19))
    mask = None
    if prompt_mask:
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=mask, **kw)
        got = ours.generate(ids, attention_mask=mask, **kw)
        single = ours.generate(ids[:, :5], **kw)  # one segment: no state, nothing read
        single_ref = ref.generate(ids[:, :5], **kw)
    assert got.shape == expected.shape == (2, 5)
    assert torch.equal(got, expected) and torch.equal(single, single_ref)


def test_generate_reads_the_state():
    _, _, ours = _pair(_gpt2, dict(), segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 19))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        long = ours.generate(ids, **kw).scores[0]
        short = ours.generate(ids[:, 16:], **kw).scores[0]  # the same last segment without history
    assert not torch.allclose(long, short)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter tensors the autograd graph saves during ``fn()``."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_checkpoint_every_same_results_less_memory():
    _, _, ours = _pair(_gpt2, dict(n_heads=2), segment_size=4)
    ours.train()  # dropout off in the config; train mode as for a training step
    ids = torch.randint(1, VOCAB, (2, 64))  # 16 segments
    results, peaks, saved = {}, {}, {}
    for c in (None, 2, 16):
        ours.checkpoint_every = c

        def step():
            ours.zero_grad(set_to_none=True)
            out = ours(input_ids=ids, labels=ids)
            out.loss.backward()
            return out

        out = step()
        results[c] = (out.loss.detach(), out.logits.detach(), _grads(ours))
        peaks[c] = peak_bytes(step, torch.device("cpu"))
        saved[c] = _saved_bytes(lambda: ours(input_ids=ids, labels=ids).loss)
    for c in (2, 16):
        assert torch.equal(results[c][0], results[None][0]) and torch.equal(results[c][1], results[None][1])
        for name, g in results[None][2].items():
            assert_close(results[c][2][name], g, name=f"grad {name} (checkpoint_every={c})")
    print(f"peak bytes: {peaks}; saved by the graph after forward: {saved}")
    assert saved[2] * 3 < saved[None] and peaks[2] * 2 < peaks[None]


def test_k2_truncates_the_state_gradient():
    _, _, ours = _pair(_gpt2, dict(), segment_size=8, max_n_segments=3, k2=1)
    _, _, full = _pair(_gpt2, dict(), segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 22))
    for w, reaches in ((ours, False), (full, True)):
        embeds = (w.memory_cell.model.get_input_embeddings()(ids) * 1.0).detach().requires_grad_()
        w(input_ids=ids, inputs_embeds=embeds).logits[:, 16:].sum().backward()
        # States out of segment 1 are detached (1 + 1 <= 3): segment 2 cannot reach segment 0's tokens.
        assert bool(embeds.grad[:, :8].abs().sum() > 0) == reaches
        assert bool(embeds.grad[:, 8:16].abs().sum() > 0) == reaches


def _tensor_attributes(module):
    return [(name, k) for name, m in module.named_modules() for k, v in vars(m).items()
            if isinstance(v, torch.Tensor) and k not in ("_parameters", "_buffers")]


def test_no_state_leaks_between_calls():
    _, _, ours = _pair(_gpt2, dict(n_heads=2), segment_size=8)
    ids, mask, _ = _inputs("right")
    before = _tensor_attributes(ours)
    a = ours(input_ids=ids, labels=ids, attention_mask=mask)
    a.loss.backward()
    b = ours(input_ids=ids, labels=ids, attention_mask=mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)
    with torch.no_grad():
        ours.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert _tensor_attributes(ours) == before == []
    # The backbone called directly (no run current) is the plain model with the wrapped layers bypassed.
    model = ours.memory_cell.model
    with torch.no_grad():
        direct = model(input_ids=ids[:, :8]).logits
        hf_plain = copy.deepcopy(model)
        for i, layer in enumerate(hf_plain.transformer.h):
            hf_plain.transformer.h[i] = layer.layer
        assert torch.equal(direct, hf_plain(input_ids=ids[:, :8]).logits)


def test_cell_single_segment_and_uses_kernel(monkeypatch):
    calls = []
    original = hf.segment_attention
    monkeypatch.setattr(hf, "segment_attention", lambda *a, **k: calls.append(a[3]) or original(*a, **k))
    _, ref, ours = _pair(_gpt2, dict(n_heads=2), segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 8))
    cell = ours.memory_cell
    with torch.no_grad():
        out, state = cell(ids)
        out2, state2 = cell(ids, state=state)
        ref.memory_cell.zero_mem()
        r1, _ = ref.memory_cell(ids)
        r2, _ = ref.memory_cell(ids)
    assert len(state) == 2 and state[0][0].shape == (2, 2, 6 * D_MEM // 2, DIM // 2)
    assert state[0][0].dtype == torch.float32
    assert_close(out.logits, r1, name="segment 0")
    assert_close(out2.logits, r2, name="segment 1")
    assert calls and all(layout.num_read == 0 and layout.num_write == M for layout in calls)


def test_bad_arguments():
    _, _, ours = _pair(_gpt2, dict(), segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 10))
    with pytest.raises(TypeError, match="labels_mask"):
        ours(input_ids=ids, labels=ids, labels_mask=torch.ones_like(ids))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(input_ids=ids, attention_mask=torch.ones(2, 9))
    with pytest.raises(ValueError, match="input_ids or inputs_embeds"):
        ours()
    with pytest.raises(ValueError, match="max_n_segments"):
        AssociativeRecurrentWrapper(ours.memory_cell, segment_size=4, k2=2)
    with pytest.raises(ValueError, match="n_heads"):
        AssociativeMemoryCell(_gpt2(), M, 6, n_heads=4, attn_implementation="rmt_kernels")
    with pytest.raises(ValueError, match="GPT-2"):
        AssociativeMemoryCell(_llama(), M, D_MEM, "model.layers", wrap_pos=True, attn_implementation="rmt_kernels")
    with pytest.raises(ValueError, match="layers_attr"):
        AssociativeMemoryCell(_llama(), M, D_MEM, "model.nope", attn_implementation="rmt_kernels")


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
@pytest.mark.parametrize("schedule", ["sequential", "diagonal"])
def test_mixed_precision_training_under_autocast(build, schedule):
    """A float32 model trained under bfloat16 autocast: the associative state stays float32, the loss is
    the float32 one within bfloat16 rounding, and backward reaches every parameter."""
    _, _, ours = _pair(build, dict(n_heads=2), segment_size=6)
    ours.schedule = schedule
    ids = torch.randint(1, VOCAB, (2, 15))
    with torch.no_grad():
        full = ours(input_ids=ids, labels=ids).loss
    states = []
    real = _armt_run.assoc_write_validated
    with torch.autocast("cpu", dtype=torch.bfloat16):
        import unittest.mock as mock
        with mock.patch.object(_armt_run, "assoc_write_validated",
                               side_effect=lambda *a: states.append(real(*a)) or states[-1]):
            out = ours(input_ids=ids, labels=ids)
    out.loss.backward()
    if schedule == "sequential":
        assert states and all(s.dtype == torch.float32 for pair in states for s in pair)
    assert_close(out.loss.float(), full.double(), full, name="autocast loss", dtype=torch.bfloat16)
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
