"""The "rmt_kernels" Hugging Face attention against transformers' own "sdpa" on tiny random models.

Rule (tests/helpers.py): the float32 "rmt_kernels" logits and parameter gradients may differ from the
float64 "sdpa" model by at most twice what float32 "sdpa" does, plus the floor. Nothing is downloaded.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import uuid
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5")

from rmt_kernels import MemoryLayout, segment_attention_ref  # noqa: E402
from rmt_kernels.integrations import hf  # noqa: E402

from helpers import assert_close  # noqa: E402

VOCAB, SEQ = 97, 12

hf.register()


def _gpt2(attn_pdrop: float = 0.0):
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
        attn_pdrop=attn_pdrop, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _neox():
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPTNeoXForCausalLM(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=64,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForMaskedLM(cfg)


FAMILIES = [
    pytest.param(_gpt2, id="gpt2"),
    pytest.param(_neox, id="gpt_neox"),
    pytest.param(_llama, id="llama_gqa"),
    pytest.param(_bert, id="bert"),
]


def _mask(kind: str, batch: int = 3, seq: int = SEQ):
    """(2-D attention mask or None, whether the kernel path is expected)."""
    if kind == "none":
        return None, True
    lengths = {"right": [seq, 9, 1], "right_empty_row": [seq, 5, 0]}.get(kind, [seq, 9, 4])
    m = (torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]).long()
    if kind == "left":
        return m.flip(1), False
    if kind == "holes":
        m = torch.ones(batch, seq, dtype=torch.long)
        m[1, 3] = m[2, 0] = m[2, 7] = 0
        return m, False
    return m, True


class _Counter:
    """Wraps ``hf.segment_attention`` to count kernel calls."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = hf.segment_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(hf, "segment_attention", counted)


def _run(model, attn: str, upstream: torch.Tensor, **inputs):
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    (logits * upstream.to(logits.dtype)).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _compare(build, upstream_shape, **inputs):
    """rmt_kernels float32 vs sdpa float64 (reference) and sdpa float32 (baseline)."""
    model = build().eval()
    model64 = copy.deepcopy(model).double()
    upstream = torch.randn(upstream_shape, dtype=torch.float64)
    ref, ref_g = _run(model64, "sdpa", upstream, **inputs)
    base, base_g = _run(model, "sdpa", upstream, **inputs)
    out, out_g = _run(model, "rmt_kernels", upstream, **inputs)
    assert_close(out, ref, base, name="logits")
    assert set(out_g) == set(ref_g) and len(out_g) > 4
    for name in ref_g:
        assert_close(out_g[name], ref_g[name], base_g[name], name=f"grad {name}")
    return model


@pytest.mark.parametrize("build", FAMILIES)
@pytest.mark.parametrize(
    "padding",
    [
        pytest.param("none", id="no_padding"),
        pytest.param("right", id="right"),
        pytest.param("right_empty_row", id="right_with_empty_row"),
        pytest.param("left", id="left_fallback"),
        pytest.param("holes", id="holes_fallback"),
    ],
)
def test_matches_sdpa(build, padding, monkeypatch):
    mask, native = _mask(padding)
    ids = torch.randint(0, VOCAB, (3, SEQ))
    counter = _Counter(monkeypatch)
    _compare(build, (3, SEQ, VOCAB), input_ids=ids, attention_mask=mask)
    # Two layers; the sdpa runs must not touch the kernel.
    assert counter.calls == (2 if native else 0)


LAYOUTS = [
    pytest.param(MemoryLayout(3, 3, mask="causal"), [8, 5, 1], id="causal_R3_W3"),
    pytest.param(MemoryLayout(2, 3, mask="memory_bidirectional"), [9, 9, 9], id="membi_unpadded"),
    pytest.param(MemoryLayout(2, 2, mask="memory_bidirectional"), [10, 4, 0], id="membi_padded_empty_seg"),
    pytest.param(MemoryLayout(0, 4, mask="memory_bidirectional"), [10, 2, 7], id="membi_write_only"),
    pytest.param(MemoryLayout(3, 1, mask="full"), [10, 6, 1], id="full_R3_W1"),
]


def _layout_inputs(layout: MemoryLayout, lengths, hole: bool = False):
    n = SEQ + layout.num_read + layout.num_write
    s = SEQ
    seg = (torch.arange(s)[None, :] < torch.tensor(lengths)[:, None]).long()
    if hole:
        seg[0, 2] = 0
    mask2d = torch.cat(
        [torch.ones(3, layout.num_read, dtype=torch.long), seg, torch.ones(3, layout.num_write, dtype=torch.long)], 1
    )
    dense = layout.dense_mask(s)[:, None] & mask2d.bool()[:, None, None, :]  # [B, 1, N, N]
    return torch.randint(0, VOCAB, (3, n)), mask2d, dense


def _compare_layout(build, layout, lengths, via: str, hole: bool, monkeypatch):
    ids, mask2d, dense = _layout_inputs(layout, lengths, hole)
    model = build().eval()
    model64 = copy.deepcopy(model).double()
    upstream = torch.randn(ids.shape + (VOCAB,), dtype=torch.float64)
    # Oracle: sdpa with the layout's dense mask handed over as a 4-D mask.
    ref, ref_g = _run(model64, "sdpa", upstream, input_ids=ids, attention_mask=dense)
    base, base_g = _run(model, "sdpa", upstream, input_ids=ids, attention_mask=dense)
    counter = _Counter(monkeypatch)
    if via == "kwarg":
        out, out_g = _run(model, "rmt_kernels", upstream, input_ids=ids, attention_mask=mask2d, rmt_layout=layout)
    else:
        model.set_attn_implementation("rmt_kernels")
        hf.set_memory_layout(model, layout)
        out, out_g = _run(model, "rmt_kernels", upstream, input_ids=ids, attention_mask=mask2d)
    assert counter.calls == (0 if hole else 2)
    assert_close(out, ref, base, name="logits")
    for name in ref_g:
        assert_close(out_g[name], ref_g[name], base_g[name], name=f"grad {name}")


@pytest.mark.parametrize(
    "build", [pytest.param(_gpt2, id="gpt2"), pytest.param(_llama, id="llama_gqa"), pytest.param(_bert, id="bert")]
)
@pytest.mark.parametrize("layout, lengths", LAYOUTS)
def test_layout_matches_dense_mask(build, layout, lengths, monkeypatch):
    _compare_layout(build, layout, lengths, "kwarg", False, monkeypatch)


@pytest.mark.parametrize(
    "layout, lengths, hole",
    [
        pytest.param(MemoryLayout(2, 2, mask="memory_bidirectional"), [10, 4, 12], False, id="config_membi"),
        pytest.param(MemoryLayout(2, 2, mask="memory_bidirectional"), [10, 4, 12], True, id="config_hole_fallback"),
        pytest.param(MemoryLayout(3, 0, mask="causal"), [12, 12, 3], True, id="config_causal_hole_fallback"),
    ],
)
def test_layout_from_config(layout, lengths, hole, monkeypatch):
    _compare_layout(_llama, layout, lengths, "config", hole, monkeypatch)


def test_padded_memory_column_takes_fallback(monkeypatch):
    layout = MemoryLayout(2, 2, mask="memory_bidirectional")
    ids, mask2d, _ = _layout_inputs(layout, [12, 7, 3])
    mask2d[1, 0] = 0  # a read-memory key marked as padding: not right padding of the segment
    dense = layout.dense_mask(SEQ)[:, None] & mask2d.bool()[:, None, None, :]
    model = _gpt2().eval()
    counter = _Counter(monkeypatch)
    model.set_attn_implementation("sdpa")
    ref = model(input_ids=ids, attention_mask=dense).logits
    model.set_attn_implementation("rmt_kernels")
    out = model(input_ids=ids, attention_mask=mask2d, rmt_layout=layout).logits
    assert counter.calls == 0
    assert_close(out, ref, name="logits")


def _replay_dropout(monkeypatch, run):
    """``run()`` twice: once recording the keep mask of every kernel call, once with the reference
    applying those masks in the same order. Returns ``(kernel result, reference result, dropout_p list)``."""
    real = hf.segment_attention
    masks = []

    def recording(q, k, v, layout, **kw):
        out, keep = real(q, k, v, layout, return_dropout_mask=True, **kw)
        masks.append((kw.get("dropout_p", 0.0), keep))
        return out

    monkeypatch.setattr(hf, "segment_attention", recording)
    got = run()
    replay = iter(masks)

    def reference(q, k, v, layout, *, segment_lengths=None, scale=None, dropout_p=0.0, **kw):
        _, keep = next(replay)
        return segment_attention_ref(q, k, v, layout, segment_lengths=segment_lengths, scale=scale,
                                     dropout_p=dropout_p, dropout_mask=keep)

    monkeypatch.setattr(hf, "segment_attention", reference)
    want = run()
    assert next(replay, None) is None
    return got, want, [p for p, _ in masks]


@pytest.mark.parametrize(
    "padding", [pytest.param("none", id="no_padding"), pytest.param("right", id="right")]
)
def test_dropout_runs_in_the_kernel(padding, monkeypatch):
    model = _gpt2(attn_pdrop=0.3).train()
    model.set_attn_implementation("rmt_kernels")
    ids = torch.randint(0, VOCAB, (3, SEQ))
    mask, _ = _mask(padding)
    got, want, ps = _replay_dropout(monkeypatch, lambda: model(input_ids=ids, attention_mask=mask).logits)
    assert ps == [0.3, 0.3]  # every attention call ran the kernel, with the module's dropout
    assert_close(got, want, name="logits")
    monkeypatch.undo()
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    assert torch.equal(a, model(input_ids=ids, attention_mask=mask).logits)
    model.eval()
    assert not torch.allclose(a, model(input_ids=ids, attention_mask=mask).logits)


def test_dropout_with_layout_runs_in_the_kernel(monkeypatch):
    layout = MemoryLayout(2, 2, mask="memory_bidirectional")
    ids, mask2d, _ = _layout_inputs(layout, [12, 7, 3])
    model = _gpt2(attn_pdrop=0.3).train()
    model.set_attn_implementation("rmt_kernels")
    got, want, ps = _replay_dropout(
        monkeypatch, lambda: model(input_ids=ids, attention_mask=mask2d, rmt_layout=layout).logits
    )
    assert ps == [0.3, 0.3]
    assert_close(got, want, name="logits")


@pytest.mark.parametrize("build", [pytest.param(_gpt2, id="gpt2"), pytest.param(_llama, id="llama_gqa")])
def test_greedy_generation_left_padded(build):
    model = build().eval()
    ids = torch.randint(1, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    out = {}
    for attn in ("sdpa", "rmt_kernels"):
        model.set_attn_implementation(attn)
        out[attn] = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert out["rmt_kernels"].shape == (2, 13)
    assert torch.equal(out["rmt_kernels"], out["sdpa"])


def test_registered_before_build_from_pretrained_and_config_layout_saved(tmp_path):
    model = _gpt2().eval()
    layout = MemoryLayout(2, 2, mask="memory_bidirectional")
    with pytest.warns(UserWarning, match="'sdpa', which ignores it"):
        hf.set_memory_layout(model, layout)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="rmt_kernels")
    assert loaded.config._attn_implementation == "rmt_kernels"
    assert hf.as_layout(loaded.config.rmt_layout) == layout
    ids, mask2d, dense = _layout_inputs(layout, [12, 6, 2])
    out = loaded.eval()(input_ids=ids, attention_mask=mask2d).logits
    model.set_attn_implementation("sdpa")
    assert_close(out, model(input_ids=ids, attention_mask=dense).logits, name="logits")


def test_registered_after_build(monkeypatch):
    name = f"rmt_kernels_late_{uuid.uuid4().hex[:8]}"
    model = _llama().eval()
    with pytest.raises(ValueError, match=name):
        model.set_attn_implementation(name)
    assert hf.register(name) == name
    model.set_attn_implementation(name)
    assert model.config._attn_implementation == name
    counter = _Counter(monkeypatch)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    out = model(input_ids=ids).logits
    model.set_attn_implementation("sdpa")
    assert_close(out, model(input_ids=ids).logits, name="logits")
    assert counter.calls == 2


def test_mask_function_passes_2d_mask_or_defers_to_sdpa_mask():
    import inspect

    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    # transformers < 5.2x names the queries by cache_position, later releases by q_length / q_offset.
    by_cache_position = "cache_position" in inspect.signature(sdpa_mask).parameters

    def queries(q_length, q_offset=0):
        if by_cache_position:
            return {"cache_position": torch.arange(q_offset, q_offset + q_length)}
        return {"q_length": q_length, "q_offset": q_offset}

    m = torch.ones(2, 6, dtype=torch.bool)
    assert hf.rmt_kernels_mask(2, kv_length=6, attention_mask=m, **queries(6)) is None
    m[1, 4:] = False
    assert torch.equal(hf.rmt_kernels_mask(2, kv_length=6, attention_mask=m, **queries(6)), m)
    # A cache offset (decoding) or a non-standard mask function: the dense mask sdpa would get.
    dec = hf.rmt_kernels_mask(2, kv_length=6, attention_mask=m, allow_is_causal_skip=True, **queries(1, 5))
    assert torch.equal(dec, sdpa_mask(2, kv_length=6, attention_mask=m, **queries(1, 5)))
    win = sliding_window_causal_mask_function(2)
    got = hf.rmt_kernels_mask(2, kv_length=6, mask_function=win, attention_mask=m, **queries(6))
    assert torch.equal(got, sdpa_mask(2, kv_length=6, mask_function=win, attention_mask=m, **queries(6)))
    assert hf.rmt_kernels_mask(2, kv_length=6, mask_function=causal_mask_function, **queries(6)) is None


def test_bad_arguments():
    with pytest.raises(ValueError, match="sdpa"):
        hf.register("sdpa")
    with pytest.raises(TypeError, match="name"):
        hf.register(3)
    with pytest.raises(TypeError, match="rmt_layout"):
        hf.as_layout((2, 2))
    model = _gpt2().eval()
    model.set_attn_implementation("rmt_kernels")
    ids = torch.randint(0, VOCAB, (1, 6))
    with pytest.raises(ValueError, match="num_read"):
        model(input_ids=ids, rmt_layout=MemoryLayout(4, 4))
    with pytest.raises(ValueError, match="2-D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(1, 1, 6, 6, dtype=torch.bool), rmt_layout=MemoryLayout(1, 1))
    with pytest.raises(TypeError, match="model_or_config"):
        hf.set_memory_layout(object(), None)


def test_importing_the_package_does_not_import_transformers():
    code = (
        "import sys, rmt_kernels, rmt_kernels.integrations; "
        "assert 'transformers' not in sys.modules, 'transformers imported'; "
        "assert 'recurrent_memory_transformer_pytorch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- issue #14


def _autocast_run(model, attn: str, ids, mask, layout=None):
    """bf16 autocast forward (as accelerate's bf16 runs it), backward outside the region."""
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    kw = {} if layout is None else {"rmt_layout": layout}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask, **kw).logits
    logits.float().square().mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads


@pytest.mark.parametrize(
    "build",
    [pytest.param(_llama, id="llama_gqa"), pytest.param(_neox, id="gpt_neox"), pytest.param(_gpt2, id="gpt2")],
)
@pytest.mark.parametrize("padding", [pytest.param("none", id="no_padding"), pytest.param("right", id="right")])
def test_bf16_autocast_matches_sdpa(build, padding, monkeypatch):
    # Rotary models hand float32 queries/keys and a bfloat16 value to the attention under autocast;
    # SDPA casts all three to bfloat16 and so must "rmt_kernels".
    model = build().eval()
    model64 = copy.deepcopy(model).double()
    ids = torch.randint(0, VOCAB, (3, SEQ))
    mask, _ = _mask(padding)
    model64.set_attn_implementation("sdpa")
    ref = model64(input_ids=ids, attention_mask=mask).logits
    ref.square().mean().backward()
    ref_g = {n: p.grad for n, p in model64.named_parameters() if p.grad is not None}
    base, base_g = _autocast_run(model, "sdpa", ids, mask)
    counter = _Counter(monkeypatch)
    out, out_g = _autocast_run(model, "rmt_kernels", ids, mask)
    assert counter.calls == 2
    assert_close(out, ref.detach(), base, name="logits")
    assert set(out_g) == set(ref_g)
    for name in ref_g:
        assert_close(out_g[name], ref_g[name], base_g[name], name=f"grad {name}")


def test_bf16_autocast_with_layout(monkeypatch):
    layout = MemoryLayout(2, 2, mask="memory_bidirectional")
    ids, mask2d, dense = _layout_inputs(layout, [12, 7, 3])
    model = _llama().eval()
    base, _ = _autocast_run(model, "sdpa", ids, dense)
    counter = _Counter(monkeypatch)
    out, _ = _autocast_run(model, "rmt_kernels", ids, mask2d, layout)
    assert counter.calls == 2
    model.set_attn_implementation("sdpa")
    ref = copy.deepcopy(model).double()(input_ids=ids, attention_mask=dense).logits
    assert_close(out, ref.detach(), base, name="logits")


def test_mixed_dtypes_outside_autocast_still_refused():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(TypeError, match="dtype"):
        hf.rmt_kernels_attention(module, q, q, q.bfloat16(), None)


def test_layout_on_other_attention_warns():
    model = _gpt2().eval()
    layout = MemoryLayout(2, 2)
    with pytest.warns(UserWarning, match=r"'sdpa', which ignores it.*set_attn_implementation\('rmt_kernels'\)"):
        hf.set_memory_layout(model, layout)
    model.set_attn_implementation("rmt_kernels")
    unset = transformers.GPT2Config()  # no implementation chosen yet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf.set_memory_layout(model, layout)
        hf.set_memory_layout(model, None)
        hf.set_memory_layout(unset, layout)
    assert not [w for w in caught if "memory layout" in str(w.message)]
    eager = transformers.GPT2Config(attn_implementation="eager")
    with pytest.warns(UserWarning, match="'eager'"):
        hf.set_memory_layout(eager, layout)


def test_generate_with_a_stored_layout_says_what_to_do(tmp_path):
    model = _gpt2().eval()
    model.set_attn_implementation("rmt_kernels")
    hf.set_memory_layout(model, MemoryLayout(2, 2, mask="memory_bidirectional"))
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="rmt_kernels").eval()
    ids = torch.randint(1, VOCAB, (1, 8))
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"stored on the config.*hf\.set_memory_layout\(model, None\)"):
        loaded.generate(ids, **kw)
    hf.set_memory_layout(loaded, None)
    out = loaded.generate(ids, **kw)
    model.set_attn_implementation("sdpa")
    hf.set_memory_layout(model, None)
    assert torch.equal(out, model.generate(ids, **kw))
    with pytest.raises(ValueError, match="drop rmt_layout= from this call"):
        loaded(input_ids=ids, attention_mask=torch.ones(1, 1, 8, 8, dtype=torch.bool), rmt_layout=MemoryLayout(1, 1))


def test_import_without_transformers_names_the_extra():
    code = "import sys; sys.modules['transformers'] = None; import rmt_kernels.integrations.hf"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and 'pip install "rmt_kernels[hf]"' in res.stderr
