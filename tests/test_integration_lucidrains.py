"""lucidrains' RecurrentMemoryTransformer patched by apply_rmt_kernels against the unpatched model.

Rule (tests/helpers.py): the patched float32 model's logits, emitted memories, XL memories and
parameter gradients may differ from the unpatched float64 model by at most twice what the unpatched
float32 model does, plus the floor. Several segments, XL memories carried across them, a short last
segment and right padding including a fully padded segment row.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch

pytest.importorskip("recurrent_memory_transformer_pytorch")

from recurrent_memory_transformer_pytorch import (  # noqa: E402
    RecurrentMemoryTransformer,
    RecurrentMemoryTransformerWrapper,
)

from helpers import assert_close  # noqa: E402
from rmt_kernels import segment_attention_ref  # noqa: E402
from rmt_kernels.integrations import lucidrains  # noqa: E402

VOCAB, SEG, TOTAL, BATCH = 64, 8, 20, 3


def _model(**overrides):
    kw = dict(num_tokens=VOCAB, depth=2, num_memory_tokens=3, seq_len=SEG, dim_head=16, heads=2, xl_mem_len=6)
    kw.update(overrides)
    return RecurrentMemoryTransformer(32, **kw)


def _mask(kind: str):
    """bool [B, TOTAL] (True = valid) or None; segments are 8, 8, 4 tokens."""
    if kind == "none":
        return None
    lengths = torch.tensor([TOTAL - 1, 16, 11])  # row 1: the last segment fully padded
    mask = torch.arange(TOTAL)[None, :] < lengths[:, None]
    if kind == "holes":
        mask[0, 2] = False  # not right padding in segment 0
    return mask


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = lucidrains.segment_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(lucidrains, "segment_attention", counted)


def _run(model, tokens, mask, upstream, mem_upstream, dtype):
    """Drive the segments by hand with XL memories; backward from logits and the final memories."""
    model.zero_grad(set_to_none=True)
    memories, xl, logits = None, None, []
    masks = (None,) * 3 if mask is None else mask.split(SEG, dim=-1)
    for segment, seg_mask in zip(tokens.split(SEG, dim=-1), masks):
        out, memories, xl = model(segment, memories, mask=seg_mask, xl_memories=xl)
        logits.append(out)
    logits = torch.cat(logits, dim=1)
    loss = (logits * upstream.to(dtype)).sum() + (memories * mem_upstream.to(dtype)).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), memories.detach(), [t.detach() for t in xl or []], grads


CASES = [
    pytest.param({}, "right", 2 * 3, id="default_right_padding"),
    pytest.param({}, "none", 2 * 3, id="default_no_mask"),
    pytest.param({}, "holes", 2 * 2, id="holes_segment0_fallback"),
    pytest.param({"rotary_pos_emb": True, "abs_pos_emb": False}, "right", 2 * 3, id="rotary"),
    pytest.param({"always_have_read_memories": False}, "right", 2 * 3, id="no_read_memory_first_step"),
    pytest.param({"causal": False}, "right", 2 * 3, id="noncausal_full"),
    pytest.param({"use_xl_memories": False}, "right", 2 * 3, id="no_xl"),
    pytest.param({"num_memory_tokens": 1, "xl_mem_len": SEG}, "right", 2 * 3, id="xl_covers_null_key"),
    pytest.param({"enhanced_xl_recurrence": True, "num_residual_streams": 1}, "right", 2 * 3, id="enhanced_xl_1stream"),
]


@pytest.mark.parametrize("overrides, mask_kind, kernel_calls", CASES)
def test_matches_unpatched(overrides, mask_kind, kernel_calls, monkeypatch):
    model = _model(**overrides)
    model64 = copy.deepcopy(model).double()
    patched = lucidrains.apply_rmt_kernels(copy.deepcopy(model))
    tokens = torch.randint(0, VOCAB, (BATCH, TOTAL))
    mask = _mask(mask_kind)
    upstream = torch.randn(BATCH, TOTAL, VOCAB, dtype=torch.float64)
    mem_upstream = torch.randn(BATCH, model.num_memory_tokens, 32, dtype=torch.float64)

    ref = _run(model64, tokens, mask, upstream, mem_upstream, torch.float64)
    base = _run(model, tokens, mask, upstream, mem_upstream, torch.float32)
    counter = _Counter(monkeypatch)
    out = _run(patched, tokens, mask, upstream, mem_upstream, torch.float32)
    assert counter.calls == kernel_calls

    assert_close(out[0], ref[0], base[0], name="logits")
    assert_close(out[1], ref[1], base[1], name="memories")
    assert len(out[2]) == len(ref[2]) == (0 if overrides.get("use_xl_memories") is False else 2)
    for i, (o, r, b) in enumerate(zip(out[2], ref[2], base[2])):
        assert_close(o, r, b, name=f"xl memories layer {i}")
    assert set(out[3]) == set(ref[3]) and any("null_kv" in n for n in out[3])
    for name in ref[3]:
        assert_close(out[3][name], ref[3][name], base[3][name], name=f"grad {name}")


@pytest.mark.parametrize(
    "replay",
    [pytest.param(False, id="loss_truncated_bptt"), pytest.param(True, id="memory_replay_backprop")],
)
def test_wrapper_loss_and_grads(replay):
    model = _model()
    wrapper = RecurrentMemoryTransformerWrapper(model, truncate_at_step=2)
    wrapper64 = copy.deepcopy(wrapper).double()
    patched = lucidrains.apply_rmt_kernels(copy.deepcopy(wrapper))
    assert isinstance(patched, RecurrentMemoryTransformerWrapper)
    tokens = torch.randint(0, VOCAB, (BATCH, TOTAL + 1))

    def run(w):
        w.zero_grad(set_to_none=True)
        if replay:
            loss = w(tokens, memory_replay_backprop=True)
        else:
            loss, _ = w(tokens, return_loss=True)
            loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in w.named_parameters() if p.grad is not None}

    ref, base, out = run(wrapper64), run(wrapper), run(patched)
    assert_close(out[0], ref[0], base[0], name="loss")
    for name in ref[1]:
        assert_close(out[1][name], ref[1][name], base[1][name], name=f"grad {name}")


def test_attention_dropout_runs_in_the_kernel(monkeypatch):
    model = _model(attn_dropout=0.3).train()
    patched = lucidrains.apply_rmt_kernels(copy.deepcopy(model))
    tokens = torch.randint(0, VOCAB, (BATCH, SEG))
    real = lucidrains.segment_attention
    masks = []

    def recording(q, k, v, layout, **kw):
        out, keep = real(q, k, v, layout, return_dropout_mask=True, **kw)
        masks.append((kw["dropout_p"], keep))
        return out

    monkeypatch.setattr(lucidrains, "segment_attention", recording)
    out = patched(tokens)[0]
    assert [p for p, _ in masks] == [0.3, 0.3]  # both layers ran the kernel with the module's dropout
    replay = iter(masks)

    def reference(q, k, v, layout, *, segment_lengths=None, prefix_k=None, prefix_v=None, dropout_p=0.0, **kw):
        _, keep = next(replay)
        return segment_attention_ref(q, k, v, layout, segment_lengths=segment_lengths, prefix_k=prefix_k,
                                     prefix_v=prefix_v, dropout_p=dropout_p, dropout_mask=keep)

    monkeypatch.setattr(lucidrains, "segment_attention", reference)
    assert_close(out, patched(tokens)[0], name="logits")
    monkeypatch.setattr(lucidrains, "segment_attention", real)
    patched.eval()
    assert not torch.allclose(patched(tokens)[0], out)


def test_patch_keeps_state_dict_and_is_idempotent(monkeypatch):
    model = _model()
    keys = list(model.state_dict())
    patched = lucidrains.apply_rmt_kernels(copy.deepcopy(model))
    assert lucidrains.apply_rmt_kernels(patched) is patched
    assert list(patched.state_dict()) == keys
    patched.load_state_dict(model.state_dict(), strict=True)
    clone = copy.deepcopy(patched)  # stays patched, with its own state
    counter = _Counter(monkeypatch)
    tokens = torch.randint(0, VOCAB, (BATCH, SEG))
    ref = model(tokens)[0]
    assert_close(clone(tokens)[0], ref, name="logits")
    assert counter.calls == 2


def test_refuses_what_it_cannot_patch():
    with pytest.raises(TypeError, match="RecurrentMemoryTransformer"):
        lucidrains.apply_rmt_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="memory_not_causal"):
        lucidrains.apply_rmt_kernels(_model(memory_not_causal=False))
    with pytest.raises(TypeError, match="backend"):
        lucidrains.apply_rmt_kernels(_model(), backend=None)


# --------------------------------------------------------------------------- issue #14


@pytest.mark.parametrize("version", ["0.5.6", "0.6.0", "0.4.3"])
def test_refuses_older_releases(version, monkeypatch):
    monkeypatch.setattr(lucidrains, "installed_version", lambda: version)
    with pytest.raises(RuntimeError, match=rf"{version} is installed.*>=0\.7,<0\.8.*rmt_kernels\[lucidrains\]"):
        lucidrains.apply_rmt_kernels(_model())


def test_refuses_a_model_without_what_the_patch_reads(monkeypatch):
    # A stand-in for 0.5.6 / 0.6.0 whatever version metadata says: their Attention has no value
    # residual (the first patched forward failed with AttributeError there).
    monkeypatch.setattr(lucidrains, "installed_version", lambda: None)
    model = _model()
    for module in model.modules():
        if isinstance(module, lucidrains.Attention):
            del module.learned_value_residual_mix
    with pytest.raises(RuntimeError, match=r"Attention\.learned_value_residual_mix.*>=0\.7,<0\.8"):
        lucidrains.apply_rmt_kernels(model)
    assert "forward" not in vars(model)  # nothing was patched


def test_newer_release_warns_once(monkeypatch):
    monkeypatch.setattr(lucidrains, "installed_version", lambda: "0.9.1")
    monkeypatch.setattr(lucidrains, "_newer_warned", False)
    with pytest.warns(UserWarning, match="0.9.1 is newer"):
        lucidrains.apply_rmt_kernels(_model())
    lucidrains.apply_rmt_kernels(_model())
    assert lucidrains._newer_warned


@pytest.mark.parametrize(
    "overrides",
    [pytest.param({}, id="default"), pytest.param({"rotary_pos_emb": True, "abs_pos_emb": False}, id="rotary")],
)
def test_bf16_autocast_matches_unpatched(overrides, monkeypatch):
    # Under autocast the learned null key stays float32 and rotary queries/keys come out float32
    # while the values are bfloat16: cast as SDPA casts, like the original's attention runs.
    model = _model(**overrides)
    model64 = copy.deepcopy(model).double()
    patched = lucidrains.apply_rmt_kernels(copy.deepcopy(model))
    tokens = torch.randint(0, VOCAB, (BATCH, SEG))
    mask = torch.arange(SEG)[None, :] < torch.tensor([SEG, 5, 2])[:, None]
    ref = model64(tokens, mask=mask)[0]
    outs = []
    counter = _Counter(monkeypatch)
    for m in (model, patched):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(tokens, mask=mask)[0]
        logits.float().sum().backward()
        outs.append(logits.detach().float())
    assert counter.calls == 2
    assert_close(outs[1], ref.detach(), outs[0], name="logits")


def test_import_without_the_package_names_the_extra():
    code = (
        "import sys; sys.modules['recurrent_memory_transformer_pytorch'] = None; "
        "import rmt_kernels.integrations.lucidrains"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and 'pip install "rmt_kernels[lucidrains]"' in res.stderr
