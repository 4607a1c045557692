"""GPT-2 and Llama decoder layers re-expressed over stacked per-layer weights, for the diagonal schedule of
:mod:`rmt_kernels.integrations._armt_diagonal` (SPEC §7).

A *group* is ``G`` consecutive layers ``lo .. lo + G - 1`` run together: the hidden states are stacked
``[G * B, N, d]`` (slot ``j`` holds layer ``lo + j``'s batch), every linear of the layer is one grouped GEMM
(``torch.baddbmm`` of the ``[G, B * N, in]`` view against the slice ``[lo : lo + G]`` of a weight tensor
stacked ``[L, in, out]``), the norms and the rotary embedding are applied per slot (a ``[G, 1, d]`` weight
broadcast), and the attention of all slots is one batched call of the ``"rmt_kernels"`` attention
(:func:`rmt_kernels.integrations.hf.rmt_kernels_attention`: ``segment_attention`` under the packed layout,
a right-padded 2-D padding mask becoming its ``segment_lengths``).

The weights are stacked with ``torch.stack`` / ``torch.cat`` of the layers' own parameters when a forward
begins (:func:`stack_backbone`), so autograd reaches the original parameters. Fused where the inputs
coincide: ``q | k | v`` (Llama; GPT-2's ``c_attn`` already is), ``gate | up`` (Llama), and the memory
write's ``W_mk | W_mv | W_mb`` (one GEMM over the memory rows; zero bias for the first two, which adds
exactly nothing).

Exactly the layer's arithmetic (transformers 5.24 ``GPT2Block`` / ``LlamaDecoderLayer``; SPEC §7: equal up
to float reassociation): GPT-2 ``ln_1 -> c_attn -> attention (scale head_dim^-1/2) -> c_proj ->
resid_dropout -> + -> ln_2 -> c_fc -> act -> c_proj -> dropout -> +``; Llama ``RMSNorm (float32 variance)
-> q/k/v -> rotary -> attention (scale head_dim^-1/2, GQA) -> o_proj -> + -> RMSNorm -> down(act(gate) *
up) -> +``. Dropout in training runs at the same places with the same probabilities but other random
draws than the per-layer modules (as the ``"rmt_kernels"`` attention's own dropout already does).

Supported: ``GPT2LMHeadModel`` (no cross-attention, no ``scale_attn_by_inverse_layer_idx``) and
``LlamaForCausalLM`` (any rotary type its ``rotary_emb`` computes; attention/MLP biases). Anything else
raises :class:`UnsupportedForDiagonal` naming what is not supported.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..layout import MemoryLayout
from . import hf


class UnsupportedForDiagonal(ValueError):
    """The cell's backbone (or an option) cannot run under ``schedule="diagonal"``."""


class Stack(NamedTuple):
    """Stacked weights of every layer of one cell, ``[L, ...]`` (None where a layer has no such tensor)."""

    family: str  # "gpt2" or "llama"
    w: dict  # name -> [L, in, out] (GEMM weights, already transposed) or [L, d] (norm weights, biases)
    eps: float
    act: object  # the MLP activation module
    attn_module: torch.nn.Module  # layer 0's attention module (read by the attention entry: config, is_causal)
    n_heads: int
    n_kv: int
    head_dim: int
    scaling: float
    attn_p: float  # attention-probability dropout in training
    resid_p: float  # GPT-2 residual / MLP dropout in training
    d_mem: int
    n_b: int  # width of W_mb (n_heads, or d with gating)


def family_of(cell) -> str:
    """``"gpt2"`` or ``"llama"``; raises :class:`UnsupportedForDiagonal` for another backbone."""
    mt = getattr(cell.model.config, "model_type", None)
    if mt == "gpt2":
        cfg = cell.model.config
        if getattr(cfg, "add_cross_attention", False):
            raise UnsupportedForDiagonal("schedule='diagonal' does not support GPT-2 with add_cross_attention=True")
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedForDiagonal(
                "schedule='diagonal' does not support scale_attn_by_inverse_layer_idx=True (a softmax scale per "
                "layer, while the grouped attention call takes one scale)")
        return "gpt2"
    if mt == "llama":
        attn = cell.layers[0].layer.self_attn
        for name in ("q_norm", "k_norm"):
            if hasattr(attn, name):
                raise UnsupportedForDiagonal(f"schedule='diagonal' does not support attention with {name}")
        return "llama"
    raise UnsupportedForDiagonal(
        f"schedule='diagonal' supports GPT-2 and Llama backbones (GPT2LMHeadModel, LlamaForCausalLM), not "
        f"model_type={mt!r}; use schedule='sequential'")


def _t(lin) -> Tensor:
    """A ``nn.Linear``'s weight as ``[in, out]``."""
    return lin.weight.t()


def _cat_bias(*lins) -> Optional[Tensor]:
    if all(lin.bias is None for lin in lins):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.weight.shape[0]) for lin in lins])


def _stack(items) -> Optional[Tensor]:
    return None if items[0] is None else torch.stack(items)


def stack_backbone(cell) -> Stack:
    """Stack every layer's weights (called once per forward: autograd flows back to the parameters)."""
    family = family_of(cell)
    wrappers = list(cell.layers)
    w = {}
    # the associative projections: q alone (on the layer input), k | v | b fused (on the memory rows)
    w["mq"] = torch.stack([_t(a.W_mq) for a in wrappers])
    w["kvb"] = torch.stack([torch.cat([_t(a.W_mk), _t(a.W_mv), _t(a.W_mb)], 1) for a in wrappers])
    w["kvb_b"] = torch.stack([_cat_bias(a.W_mk, a.W_mv, a.W_mb) for a in wrappers])
    layers = [a.layer for a in wrappers]
    cfg = cell.model.config
    if family == "gpt2":
        for key, get in (("ln1", lambda x: x.ln_1), ("ln2", lambda x: x.ln_2)):
            w[key] = torch.stack([get(x).weight for x in layers])
            w[key + "_b"] = torch.stack([get(x).bias for x in layers])
        for key, get in (("qkv", lambda x: x.attn.c_attn), ("o", lambda x: x.attn.c_proj),
                         ("up", lambda x: x.mlp.c_fc), ("down", lambda x: x.mlp.c_proj)):
            w[key] = torch.stack([get(x).weight for x in layers])  # Conv1D: [in, out] already
            w[key + "_b"] = torch.stack([get(x).bias for x in layers])
        a0 = layers[0].attn
        return Stack(family, w, layers[0].ln_1.eps, layers[0].mlp.act, a0, a0.num_heads, a0.num_heads,
                     a0.head_dim, a0.scaling, cfg.attn_pdrop, cfg.resid_pdrop, cell.d_mem,
                     wrappers[0].W_mb.weight.shape[0])
    for key, get in (("ln1", lambda x: x.input_layernorm), ("ln2", lambda x: x.post_attention_layernorm)):
        w[key] = torch.stack([get(x).weight for x in layers])
    att = [x.self_attn for x in layers]
    mlp = [x.mlp for x in layers]
    w["qkv"] = torch.stack([torch.cat([_t(a.q_proj), _t(a.k_proj), _t(a.v_proj)], 1) for a in att])
    w["qkv_b"] = _stack([_cat_bias(a.q_proj, a.k_proj, a.v_proj) for a in att])
    w["o"] = torch.stack([_t(a.o_proj) for a in att])
    w["o_b"] = _stack([a.o_proj.bias for a in att])
    w["up"] = torch.stack([torch.cat([_t(m.gate_proj), _t(m.up_proj)], 1) for m in mlp])
    w["up_b"] = _stack([_cat_bias(m.gate_proj, m.up_proj) for m in mlp])
    w["down"] = torch.stack([_t(m.down_proj) for m in mlp])
    w["down_b"] = _stack([m.down_proj.bias for m in mlp])
    a0 = att[0]
    n_heads = cfg.num_attention_heads
    n_kv = cfg.num_key_value_heads
    return Stack(family, w, layers[0].input_layernorm.variance_epsilon, mlp[0].act_fn, a0, n_heads, n_kv,
                 a0.head_dim, a0.scaling, cfg.attention_dropout, 0.0, cell.d_mem, wrappers[0].W_mb.weight.shape[0])


# --------------------------------------------------------------------------- grouped pieces


def grouped_linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """``x [G, R, in] @ w [G, in, out] (+ b [G, out])``: one batched GEMM over the group."""
    if b is None:
        return torch.bmm(x, w)
    return torch.baddbmm(b.unsqueeze(1), x, w)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm per slot: ``x [G, R, d]``, ``weight [G, d]``."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.unsqueeze(1) * h.to(dtype)


def _layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """nn.LayerNorm per slot: ``x [G, R, d]``, ``weight, bias [G, d]``."""
    return torch.addcmul(bias.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), weight.unsqueeze(1))


def _dropout(x: Tensor, p: float, training: bool) -> Tensor:
    return F.dropout(x, p, True) if training and p > 0 else x


def layer_group(st: Stack, lo: int, hi: int, x: Tensor, batch: int, num_mem: int, mask: Optional[Tensor],
                rotary=None, training: bool = False) -> Tensor:
    """Layers ``lo .. hi`` (inclusive) on their slots of ``x [G * B, N, d]``; returns ``[G * B, N, d]``.

    ``mask``: None or a bool ``[G * B, N]`` padding mask (what the ``"rmt_kernels"`` attention takes);
    ``rotary``: ``(cos, sin)`` broadcastable to ``[G * B, N, head_dim]`` (Llama only).
    """
    w = st.w
    g = hi - lo + 1
    gb, n, d = x.shape
    sl = slice(lo, hi + 1)

    def lin(t, key):
        b = w.get(key + "_b")
        return grouped_linear(t, w[key][sl], None if b is None else b[sl])

    h = x.view(g, batch * n, d)
    if st.family == "gpt2":
        a = _layer_norm(h, w["ln1"][sl], w["ln1_b"][sl], st.eps)
    else:
        a = _rms_norm(h, w["ln1"][sl], st.eps)
    qkv = lin(a, "qkv").view(gb, n, -1)
    hd = st.head_dim
    q, k, v = qkv.split([st.n_heads * hd, st.n_kv * hd, st.n_kv * hd], dim=-1)
    q = q.reshape(gb, n, st.n_heads, hd).transpose(1, 2)
    k = k.reshape(gb, n, st.n_kv, hd).transpose(1, 2)
    v = v.reshape(gb, n, st.n_kv, hd).transpose(1, 2)
    if rotary is not None:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        q, k = apply_rotary_pos_emb(q, k, rotary[0], rotary[1])
    attn, _ = hf.rmt_kernels_attention(
        st.attn_module, q, k, v, mask, dropout=st.attn_p if training else 0.0, scaling=st.scaling,
        rmt_layout=MemoryLayout(0, num_mem, "causal"))
    attn = lin(attn.reshape(g, batch * n, -1), "o")
    h = _dropout(attn, st.resid_p, training) + h if st.family == "gpt2" else h + attn
    if st.family == "gpt2":
        m = _layer_norm(h, w["ln2"][sl], w["ln2_b"][sl], st.eps)
        m = _dropout(lin(st.act(lin(m, "up")), "down"), st.resid_p, training)
        h = h + m
    else:
        m = lin(_rms_norm(h, w["ln2"][sl], st.eps), "up")
        gate, up = m.chunk(2, dim=-1)
        h = h + lin(st.act(gate) * up, "down")
    return h.view(gb, n, d)
