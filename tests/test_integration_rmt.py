"""The drop-in MemoryCell / RecurrentWrapper against a plain reimplementation of the official wrapper.

The oracle below is written from SPEC §3 (official wrapper, branch babilong-release): concatenate
``[memory | segment embeddings | memory]``, run the Hugging Face model with ``output_hidden_states=True``
and plain "sdpa" attention, take the last hidden state's write rows as the next memory, detach it by
the k2 rule, concatenate the segment logits and compute the shift-by-one loss. Rule
(tests/helpers.py): the float32 drop-in may differ from the float64 oracle by at most twice what the
float32 oracle does, plus the floor.
"""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers", minversion="5")

from helpers import assert_close  # noqa: E402
from rmt_kernels.integrations import hf, rmt  # noqa: E402

VOCAB, M = 97, 3


# --------------------------------------------------------------------------- oracle


class OracleCell(torch.nn.Module):
    def __init__(self, base_model, num_mem_tokens):
        super().__init__()
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        emb = base_model.get_input_embeddings()
        dim = getattr(base_model.config, "n_embd", None) or base_model.config.hidden_size
        self.memory = torch.nn.Parameter(torch.randn(num_mem_tokens, dim) * emb.weight.data.std())

    def _embed(self, input_ids, inputs_embeds, memory, write):
        x = self.model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        parts = [memory, x, memory] if write else [memory, x]
        return torch.cat(parts, dim=1)

    def _mask(self, attention_mask, n):
        if attention_mask is None:
            return None
        m = self.num_mem_tokens
        mask = torch.ones(attention_mask.shape[0], n, dtype=torch.int64)
        mask[:, m : m + attention_mask.shape[1]] = attention_mask
        return mask

    def forward(self, input_ids, memory, attention_mask=None, inputs_embeds=None):
        if memory is None:
            memory = self.memory.repeat(input_ids.shape[0], 1, 1)
        x = self._embed(input_ids, inputs_embeds, memory, True)
        out = self.model(inputs_embeds=x, attention_mask=self._mask(attention_mask, x.shape[1]),
                         output_hidden_states=True)
        m = self.num_mem_tokens
        hidden = [h[:, m:-m] for h in out.hidden_states]
        return out.logits[:, m:-m], hidden, out.hidden_states[-1][:, -m:]

    def generate(self, input_ids, memory, attention_mask=None, **kw):
        if memory is None:
            memory = self.memory.repeat(input_ids.shape[0], 1, 1)
        x = self._embed(input_ids, None, memory, False)
        return self.model.generate(inputs_embeds=x, attention_mask=self._mask(attention_mask, x.shape[1]), **kw)


class OracleWrapper(torch.nn.Module):
    def __init__(self, memory_cell, segment_size, max_n_segments=None, segment_alignment=None, k2=-1):
        super().__init__()
        self.memory_cell = memory_cell
        self.size, self.max_n, self.align, self.k2 = segment_size, max_n_segments, segment_alignment, k2

    def split(self, t):
        n = t.shape[1]
        if self.align in (None, "left"):
            cuts = list(range(0, n, self.size)) + [n]
        elif self.align == "right":
            cuts = [0] + list(range(n % self.size or self.size, n + 1, self.size))
        else:
            return list(torch.chunk(t, math.ceil(n / self.size), dim=1))
        return [t[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def forward(self, input_ids, labels=None, labels_mask=None, inputs_embeds=None, attention_mask=None):
        ids = self.split(input_ids)
        embs = self.split(inputs_embeds) if inputs_embeds is not None else [None] * len(ids)
        masks = self.split(attention_mask) if attention_mask is not None else [None] * len(ids)
        memory, logits, hidden = None, [], []
        for i, (seg, emb, mask) in enumerate(zip(ids, embs, masks)):
            seg_logits, seg_hidden, memory = self.memory_cell(seg, memory, mask, emb)
            logits.append(seg_logits)
            hidden.append(seg_hidden)
            if i >= 1 and self.k2 not in (-1, None) and i + self.k2 <= self.max_n:
                memory = memory.detach()
        logits = torch.cat(logits, dim=1)
        hidden = tuple(torch.cat(layer, dim=1) for layer in zip(*hidden))
        loss = None
        if labels is not None:
            lg, lb = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
            if labels_mask is not None:
                keep = labels_mask[:, :-1].reshape(-1)
                lg, lb = lg[keep], lb[keep]
            loss = F.cross_entropy(lg, lb)
        return loss, logits, hidden

    def generate(self, input_ids, attention_mask=None, **kw):
        ids = self.split(input_ids)
        masks = self.split(attention_mask) if attention_mask is not None else [None] * len(ids)
        memory = None
        for seg, mask in zip(ids[:-1], masks[:-1]):
            memory = self.memory_cell(seg, memory, mask)[2]
        return self.memory_cell.generate(ids[-1], memory, masks[-1], **kw)


# --------------------------------------------------------------------------- models


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    ))


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    ))


def _neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
    ))


def _pair(build, **wrapper_kw):
    """(oracle float64, oracle float32, drop-in float32), the drop-in loaded from the oracle's state."""
    oracle = OracleWrapper(OracleCell(build().eval(), M), **wrapper_kw)
    ours = rmt.RecurrentWrapper(rmt.MemoryCell(copy.deepcopy(oracle.memory_cell.model), M, "rmt_kernels"), **wrapper_kw)
    assert list(ours.state_dict()) == list(oracle.state_dict())
    ours.load_state_dict(oracle.state_dict(), strict=True)
    return copy.deepcopy(oracle).double(), oracle, ours


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = hf.segment_attention

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(hf, "segment_attention", counted)


CASES = [
    pytest.param(_gpt2, dict(segment_size=8), "right", None, id="gpt2_left_align_right_padding"),
    pytest.param(_llama, dict(segment_size=8), "right", None, id="llama_gqa_right_padding"),
    pytest.param(_neox, dict(segment_size=8), None, None, id="neox_no_mask"),
    pytest.param(_gpt2, dict(segment_size=8, segment_alignment="right"), None, None, id="gpt2_right_align"),
    pytest.param(_gpt2, dict(segment_size=7, segment_alignment="center"), "right", None, id="gpt2_center_align"),
    pytest.param(_gpt2, dict(segment_size=8, max_n_segments=3, k2=1), "right", None, id="gpt2_k2_1"),
    pytest.param(_llama, dict(segment_size=6, max_n_segments=4, k2=2), None, None, id="llama_k2_2"),
    pytest.param(_gpt2, dict(segment_size=8), "right", "labels_mask", id="gpt2_labels_mask"),
    pytest.param(_gpt2, dict(segment_size=8), "holes", None, id="gpt2_holes_fallback"),
    pytest.param(_gpt2, dict(segment_size=8), "right", "inputs_embeds", id="gpt2_inputs_embeds"),
]


def _inputs(mask_kind, extra, batch=3, total=22):
    ids = torch.randint(1, VOCAB, (batch, total))
    mask = None
    if mask_kind == "right":
        lengths = torch.tensor([total, 15, 12])  # row 1: the last segment fully padded (segments of 8)
        mask = (torch.arange(total)[None, :] < lengths[:, None]).long()
    elif mask_kind == "holes":
        mask = torch.ones(batch, total, dtype=torch.long)
        mask[1, 2] = mask[2, 9] = 0
    labels_mask = None
    if extra == "labels_mask":
        labels_mask = torch.rand(batch, total) < 0.5
    return ids, mask, labels_mask


@pytest.mark.parametrize("build, wrapper_kw, mask_kind, extra", CASES)
def test_forward_backward_match_official(build, wrapper_kw, mask_kind, extra, monkeypatch):
    ref_w, base_w, ours = _pair(build, **wrapper_kw)
    ids, mask, labels_mask = _inputs(mask_kind, extra)
    upstream = torch.randn(ids.shape + (VOCAB,), dtype=torch.float64)
    embeds = None
    if extra == "inputs_embeds":
        embeds = torch.randn(ids.shape + (64,), dtype=torch.float64) * 0.02

    def run(w, dtype, is_ours):
        w.zero_grad(set_to_none=True)
        kw = dict(labels=ids, labels_mask=labels_mask, attention_mask=mask,
                  inputs_embeds=None if embeds is None else embeds.to(dtype))
        if is_ours:
            out = w(input_ids=ids, **kw)
            loss, logits = out.loss, out.logits
        else:
            loss, logits, _ = w(ids, **kw)
        (loss + (logits * upstream.to(dtype)).sum()).backward()
        return loss.detach(), logits.detach(), _grads(w)

    ref, base = run(ref_w, torch.float64, False), run(base_w, torch.float32, False)
    counter = _Counter(monkeypatch)
    out = run(ours, torch.float32, True)
    n_seg = len(OracleWrapper(None, **wrapper_kw).split(ids))
    # Holes (segments 0 and 1) take the exact SDPA fallback there; every other segment runs the kernel.
    assert counter.calls == 2 * (n_seg - 2 if mask_kind == "holes" else n_seg)
    assert_close(out[0], ref[0], base[0], name="loss")
    assert_close(out[1], ref[1], base[1], name="logits")
    assert set(out[2]) == set(ref[2]) and "memory_cell.memory" in out[2]
    for name in ref[2]:
        assert_close(out[2][name], ref[2][name], base[2][name], name=f"grad {name}")


def test_k2_detaches_by_the_official_rule():
    # With k2=1, max_n_segments=3 and 3 segments, the memory out of segment 1 is detached (1 + 1 <= 3):
    # segment 2's loss cannot reach the initial memory; with k2=-1 it can.
    _, _, ours = _pair(_gpt2, segment_size=8, max_n_segments=3, k2=1)
    _, _, full = _pair(_gpt2, segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 22))
    for w, reaches in ((ours, False), (full, True)):
        w.zero_grad(set_to_none=True)
        w(input_ids=ids).logits[:, 16:].sum().backward()
        grad = w.memory_cell.memory.grad
        assert (grad is not None and bool(grad.abs().sum() > 0)) == reaches


def test_hidden_states_only_when_asked():
    ref_w, base_w, ours = _pair(_gpt2, segment_size=8)
    ids, mask, _ = _inputs("right", None)
    calls = []
    hook = ours.memory_cell.model.register_forward_pre_hook(
        lambda _m, _a, kw: calls.append((kw.get("output_hidden_states"), kw.get("use_cache"))), with_kwargs=True
    )
    with torch.no_grad():
        out = ours(input_ids=ids, attention_mask=mask)
        assert "hidden_states" not in out and out.loss == 0
        assert calls and all(c == (False, False) for c in calls)
        calls.clear()
        out = ours(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
        assert all(c == (True, False) for c in calls)
        ref, base = ref_w(ids, attention_mask=mask)[2], base_w(ids, attention_mask=mask)[2]
    hook.remove()
    assert len(out.hidden_states) == len(ref) == 3
    for i, (o, r, b) in enumerate(zip(out.hidden_states, ref, base)):
        assert o.shape == (3, 22, 64)
        assert_close(o, r, b, name=f"hidden_states[{i}]")
    assert torch.equal(out["logits_2"], out.logits[:, 16:])
    assert torch.equal(out["hidden_states_1"][0], out.hidden_states[0][:, 8:16])


@pytest.mark.parametrize(
    "build, prompt_mask",
    [
        pytest.param(_gpt2, False, id="gpt2"),
        pytest.param(_llama, False, id="llama_gqa"),
        pytest.param(_gpt2, True, id="gpt2_left_padded_prompt"),
    ],
)
def test_greedy_generation_matches_official(build, prompt_mask):
    _, oracle, ours = _pair(build, segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 19))
    mask = None
    if prompt_mask:
        mask = torch.ones_like(ids)
        mask[1, :2] = 0
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = oracle.generate(ids, attention_mask=mask, **kw)
        out = ours.generate(ids, attention_mask=mask, **kw)
    assert out.shape == ref.shape == (2, 5)
    assert torch.equal(out, ref)


def _checkpointing(model) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return model.is_activation_checkpointing if flag is not None else model.is_gradient_checkpointing


def test_gradient_checkpointing():
    ref_w, base_w, ours = _pair(_llama, segment_size=8)
    ours.gradient_checkpointing_enable({"use_reentrant": False})
    assert _checkpointing(ours.memory_cell.model)
    ids, mask, _ = _inputs("right", None)
    results = []
    for w, is_ours in ((ref_w, False), (base_w, False), (ours, True)):
        w.train()
        w.zero_grad(set_to_none=True)
        loss = w(input_ids=ids, labels=ids, attention_mask=mask).loss if is_ours else w(
            ids, labels=ids, attention_mask=mask)[0]
        loss.backward()
        results.append((loss.detach(), _grads(w)))
    (ref, ref_g), (base, base_g), (out, out_g) = results
    assert_close(out, ref, base, name="loss")
    for name in ref_g:
        assert_close(out_g[name], ref_g[name], base_g[name], name=f"grad {name}")
    ours.gradient_checkpointing_disable()
    assert not _checkpointing(ours.memory_cell.model)


def test_memory_cell_single_segment():
    oracle = OracleCell(_gpt2().eval(), M)
    cell = rmt.MemoryCell(copy.deepcopy(oracle.model), M, "rmt_kernels")
    cell.load_state_dict(oracle.state_dict(), strict=True)
    assert cell.model.config._attn_implementation == "rmt_kernels"
    ids = torch.randint(1, VOCAB, (2, 9))
    mask = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    memory = torch.randn(2, M, 64)
    with torch.no_grad():
        ref_logits, _, ref_mem = oracle(ids, memory, mask)
        out, mem = cell(ids, memory_state=memory, attention_mask=mask)
    assert_close(out.logits, ref_logits, name="logits")
    assert_close(mem, ref_mem, name="memory")


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_mem_tokens"):
        rmt.MemoryCell(_gpt2(), 0)
    with pytest.raises(ValueError, match="num_mem_tokens"):
        rmt.MemoryCell(_gpt2(), 2.5)
    with pytest.raises(TypeError, match="num_mem_tokens"):
        rmt.MemoryCell(_gpt2(), "2")
    cell = rmt.MemoryCell(_gpt2(), 2)
    with pytest.raises(ValueError, match="segment_size"):
        rmt.RecurrentWrapper(cell, max_n_segments=2)
    with pytest.raises(ValueError, match="max_n_segments"):
        rmt.RecurrentWrapper(cell, segment_size=4, k2=1)
    with pytest.raises(ValueError, match="segment_alignment"):
        rmt.RecurrentWrapper(cell, segment_size=4, segment_alignment="middle")
    with pytest.raises(TypeError, match="memory_cell"):
        rmt.RecurrentWrapper(torch.nn.Linear(2, 2), segment_size=4)


# --------------------------------------------------------------------------- issue #14


def _peft(build, vocab=VOCAB):
    """``build``'s model wrapped by PEFT LoRA (random LoRA weights, so the adapters change the output)."""
    peft = pytest.importorskip("peft")
    model = build(vocab).eval()
    targets = {
        "gpt2": (["c_attn"], True),
        "gpt_neox": (["query_key_value"], False),
        "llama": (["q_proj", "v_proj"], False),
    }
    modules, fan_in_fan_out = targets[model.config.model_type]
    config = peft.LoraConfig(task_type=peft.TaskType.CAUSAL_LM, r=4, target_modules=modules,
                             fan_in_fan_out=fan_in_fan_out, lora_dropout=0.0, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def _sized(build):
    def sized(vocab):
        model = build()
        model.resize_token_embeddings(vocab)
        return model
    return sized


@pytest.mark.parametrize(
    "build, vocab",
    [
        pytest.param(_gpt2, VOCAB, id="gpt2"),
        pytest.param(_gpt2, 64, id="gpt2_vocab_equals_hidden"),  # logits as memory would fit the shape
        pytest.param(_neox, VOCAB, id="gpt_neox"),
        pytest.param(_llama, VOCAB, id="llama_gqa"),
    ],
)
def test_peft_lora_backbone_matches_official(build, vocab):
    oracle = OracleWrapper(OracleCell(_peft(_sized(build), vocab), M), segment_size=8)
    ours = rmt.RecurrentWrapper(rmt.MemoryCell(copy.deepcopy(oracle.memory_cell.model), M, "rmt_kernels"),
                                segment_size=8)
    assert list(ours.state_dict()) == list(oracle.state_dict())
    ours.load_state_dict(oracle.state_dict(), strict=True)
    ref_w = copy.deepcopy(oracle).double()
    ids, mask, _ = _inputs("right", None)
    ids = ids % vocab

    def run(w, is_ours):
        w.zero_grad(set_to_none=True)
        if is_ours:
            out = w(input_ids=ids, labels=ids, attention_mask=mask)
            loss, logits = out.loss, out.logits
        else:
            loss, logits, _ = w(ids, labels=ids, attention_mask=mask)
        loss.backward()
        return loss.detach(), logits.detach(), _grads(w)

    ref, base, out = run(ref_w, False), run(oracle, False), run(ours, True)
    assert_close(out[0], ref[0], base[0], name="loss")
    assert_close(out[1], ref[1], base[1], name="logits")
    assert any("lora_" in name for name in out[2]) and "memory_cell.memory" in out[2]
    for name in ref[2]:
        assert_close(out[2][name], ref[2][name], base[2][name], name=f"grad {name}")
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(ours.generate(ids[:, :19], **kw), oracle.generate(ids[:, :19], **kw))


def test_integer_hyper_parameters_accept_numpy_torch_and_integral_floats():
    _, _, plain = _pair(_gpt2, segment_size=8, max_n_segments=3, k2=1)
    cell = plain.memory_cell
    total = 22
    # What run_finetuning_babilong_rmt.py passes: max_n_segments = np.ceil(T / S), a numpy float64.
    odd = rmt.RecurrentWrapper(cell, segment_size=np.int64(8), max_n_segments=np.ceil(total / 8), k2=torch.tensor(1))
    assert odd.rmt_config["max_n_segments"] == 3 and type(odd.rmt_config["max_n_segments"]) is int
    assert (odd.driver.segment_size, odd.driver.max_n_segments, odd.driver.k2) == (8, 3, 1)
    assert rmt.MemoryCell(_gpt2(), np.int32(2), "rmt_kernels").num_mem_tokens == 2
    assert rmt.MemoryCell(_gpt2(), torch.tensor(2.0), "rmt_kernels").num_mem_tokens == 2
    ids = torch.randint(1, VOCAB, (2, total))
    with torch.no_grad():
        assert torch.equal(odd(input_ids=ids, labels=ids).logits, plain(input_ids=ids, labels=ids).logits)
    with pytest.raises(ValueError, match="max_n_segments.*non-integral"):
        rmt.RecurrentWrapper(cell, segment_size=8, max_n_segments=2.5)
    with pytest.raises(ValueError, match="segment_size.*non-integral"):
        rmt.RecurrentWrapper(cell, segment_size=np.float32(7.5))
    with pytest.raises(ValueError, match="k2"):
        rmt.RecurrentWrapper(cell, segment_size=8, max_n_segments=3, k2=float("nan"))
    for bad in (True, "8", torch.tensor([8])):
        with pytest.raises(TypeError, match="segment_size"):
            rmt.RecurrentWrapper(cell, segment_size=bad)


def test_integer_labels_mask_is_refused():
    _, _, ours = _pair(_gpt2, segment_size=8)
    ids = torch.randint(1, VOCAB, (2, 22))
    keep = torch.rand(2, 22) < 0.5
    with torch.no_grad():
        ours(input_ids=ids, labels=ids, labels_mask=keep)
        for bad in (keep.long(), keep.float(), keep.tolist()):
            with pytest.raises(TypeError, match=r"labels_mask must be a bool tensor.*\.bool\(\)"):
                ours(input_ids=ids, labels=ids, labels_mask=bad)


def test_memory_cell_says_it_switches_the_attention(monkeypatch):
    monkeypatch.setattr(hf, "SWITCH_WARNED", set())
    model = _gpt2()
    with pytest.warns(UserWarning, match="switched the attention.*'sdpa' to 'rmt_kernels' in place"):
        rmt.MemoryCell(model, M)
    assert model.config._attn_implementation == "rmt_kernels"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rmt.MemoryCell(_gpt2(), M)  # once per process
        monkeypatch.setattr(hf, "SWITCH_WARNED", set())
        rmt.MemoryCell(_gpt2(), M, attn_implementation="rmt_kernels")  # asked for explicitly: no warning
        kept = _gpt2()
        rmt.MemoryCell(kept, M, attn_implementation=None)
    assert kept.config._attn_implementation == "sdpa"
    assert not [w for w in caught if "MemoryCell switched" in str(w.message)]


def test_import_without_transformers_names_the_extra():
    code = "import sys; sys.modules['transformers'] = None; import rmt_kernels.integrations.rmt"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode != 0
    assert "ImportError" in res.stderr and 'pip install "rmt_kernels[hf]"' in res.stderr


@pytest.mark.parametrize("peft_wrapped", [False, True], ids=["bare", "peft"])
def test_head_skips_the_read_memory_rows(peft_wrapped):
    """The LM head runs on the segment's rows only (``logits_to_keep = N - R``, then a hook that hands
    the head the segment rows and keeps the W rows of its input as the memory): the memory rows' logits,
    which the original computes and drops, are never computed; the results stay the original's."""
    model = _peft(_sized(_gpt2)) if peft_wrapped else _gpt2().eval()
    oracle = OracleWrapper(OracleCell(model, M), segment_size=8)
    ours = rmt.RecurrentWrapper(rmt.MemoryCell(copy.deepcopy(oracle.memory_cell.model), M, "rmt_kernels"),
                                segment_size=8)
    ours.load_state_dict(oracle.state_dict(), strict=True)
    head = ours.memory_cell.model.get_output_embeddings()
    rows = []
    hook = head.register_forward_hook(lambda _m, args, out: rows.append(out.shape[1]))  # runs after ours
    ids, mask, _ = _inputs("right", None)
    try:
        out = ours(input_ids=ids, labels=ids, attention_mask=mask)
    finally:
        hook.remove()
    assert rows == [8, 8, 6], rows  # segments of 8, 8 and 6 tokens: no memory row gets logits
    loss, logits, _ = oracle(ids, labels=ids, attention_mask=mask)
    assert_close(out.logits, logits, name="logits")
    assert_close(out.loss, loss, name="loss")


@pytest.mark.parametrize("with_mask", [False, True], ids=["labels", "labels+labels_mask"])
def test_loss_ignores_minus_100_labels_as_the_official(with_mask):
    """Labels of -100 (the Hugging Face convention) are ignored as the official loss ignores them, with
    and without ``labels_mask``, and the logits' gradient is the official one."""
    ref_w, base_w, ours = _pair(_gpt2, segment_size=8)
    ids, _, _ = _inputs(None, None)
    labels = ids.clone()
    labels[0, 3:9] = -100
    labels[2, -1] = -100
    labels_mask = (torch.rand(ids.shape) < 0.7) if with_mask else None

    def run(w, is_ours):
        if is_ours:
            out = w(input_ids=ids, labels=labels, labels_mask=labels_mask)
            loss, logits = out.loss, out.logits
        else:
            loss, logits, _ = w(ids, labels=labels, labels_mask=labels_mask)
        logits.retain_grad()
        loss.backward()
        return loss.detach(), logits.grad

    ref, base, out = run(ref_w, False), run(base_w, False), run(ours, True)
    assert torch.isfinite(out[0])
    assert_close(out[0], ref[0], base[0], name="loss")
    assert_close(out[1], ref[1], base[1], name="d logits")
