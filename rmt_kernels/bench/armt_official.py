"""The official ARMT (RodkinIvan/associative-recurrent-memory-transformer, ``modeling_amt/
language_modeling.py``; SPEC §6) restated plainly for transformers 5: the reference that
``rmt_kernels.integrations.armt`` is checked against (``tests/test_integration_armt.py``) and the
``einsum`` peer of the ARMT bench suite's step.

Written from SPEC §6 and the official classes' behaviour, in einsums, with the official module
structure (so its ``state_dict`` has the official keys):

- ``OfficialCell`` replaces every layer of ``layers_attr`` by ``OfficialLayer`` (attributes ``W_mq``,
  ``W_mk``, ``W_mv``, ``W_mb``, ``layer``) and registers the layer list a second time as ``layers``;
  then ``memory = randn(M, d) * std(word embeddings)``. ``normalize=True`` is the ``experimental``
  branch, ``normalize=False`` the ``framework_accel`` one (no L2 norm, ``|k|^2 + 1e-5``).
- The state ``(W_mem, z)`` is kept on each layer as the official does (plain attributes, reset by
  ``zero_mem``), in float32 (float64 for a float64 model).
- A segment is ``cat([embeddings, memory])`` through the model with plain ``"sdpa"`` attention, the
  padding mask extended with ones; the layer output's last M rows are written; logits of the X rows.
- ``OfficialWrapper`` splits like ``split_tensor``, applies the RMT ``k2`` rule to the layer states
  (the official ARMT ignores ``k2``; the drop-in follows the RMT wrapper), concatenates the logits and
  computes the loss as ``process_outputs``; ``generate`` runs all but the last segment, then
  ``model.generate`` from the last segment's embeddings with writing off.
- Hidden states are what transformers 4 returned: entry 0 is layer 0's input before the read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..reference import dpfp_ref

EPS = 1e-5


def dpfp(x: torch.Tensor) -> torch.Tensor:
    """DPFP, nu = 3, unnormalised (``reference.dpfp_ref``)."""
    return dpfp_ref(x, False)


class OfficialLayer(torch.nn.Module):
    def __init__(self, layer, d_model, num_mem_tokens, d_mem, n_heads, correction, use_denom, gating, normalize):
        super().__init__()
        self.d_model, self.m, self.h = d_model, num_mem_tokens, n_heads
        self.correction, self.use_denom, self.gating, self.normalize = correction, use_denom, gating, normalize
        self.d_key = 6 * d_mem
        self.W_mq = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = torch.nn.Linear(d_model, d_model, bias=False)
        self.W_mb = torch.nn.Linear(d_model, d_model if gating else n_heads)
        torch.nn.init.zeros_(self.W_mv.weight)
        self.layer = layer
        self.generate_mode = False
        self.zero_mem()

    def zero_mem(self):
        self.first_seg = True
        self.W_mem = None
        self.z = None

    def heads(self, x):
        b, n, d = x.shape
        return x.reshape(b, n, self.h, d // self.h).permute(0, 2, 1, 3)

    def features(self, u):
        f = dpfp(u)
        return F.normalize(f, dim=-1, p=2.0) if self.normalize else f

    def sdtype(self):
        return torch.float64 if self.W_mq.weight.dtype == torch.float64 else torch.float32

    def associate(self, x):
        b, n, d = x.shape
        mq = self.features(self.heads(self.W_mq(x)).to(self.sdtype()))
        num = torch.einsum("ihjk,ihkt->ihjt", mq, self.W_mem)
        if self.use_denom:
            num = num / (torch.einsum("ihk,ihjk->ihj", self.z, mq)[..., None] + EPS)
        return num.permute(0, 2, 1, 3).reshape(b, n, d).to(x.dtype)

    def update_mem(self, mem):
        sdt = self.sdtype()
        mk = self.features(self.heads(self.W_mk(mem)).to(sdt))
        new_mv = self.heads(self.W_mv(mem)).to(sdt)
        coef = 1
        if self.first_seg:
            prev_mv = torch.zeros_like(new_mv)
        else:
            prev_mv = torch.einsum("ihjk,ihkt->ihjt", mk, self.W_mem)
            if self.use_denom:
                denom = torch.einsum("ihk,ihjk->ihj", self.z, mk)[..., None] + EPS
                prev_mv = prev_mv / denom
                if self.correction:
                    norm2 = torch.linalg.norm(mk, dim=-1) ** 2 + (0.0 if self.normalize else EPS)
                    coef = torch.clip(1 - denom / norm2[..., None], 0, 1).detach()
        mb = self.heads(torch.sigmoid(self.W_mb(mem))).to(sdt)
        op = f"ihjk,ihjt,ihj{'t' if self.gating else 'x'}->ihkt"
        assoc = torch.einsum(op, mk, new_mv - prev_mv, mb)
        dz = (coef * mk).sum(dim=-2)
        self.W_mem = assoc if self.first_seg else self.W_mem + assoc
        self.z = dz if self.first_seg else self.z + dz

    def forward(self, hidden_states, *args, **kwargs):
        if not self.first_seg:
            hidden_states = self.associate(hidden_states) + hidden_states
        out = self.layer(hidden_states, *args, **kwargs)
        if not self.generate_mode:
            y = out[0] if isinstance(out, tuple) else out
            self.update_mem(y[:, -self.m:])
            self.first_seg = False
        return out


class OfficialCell(torch.nn.Module):
    def __init__(self, base_model, num_mem_tokens, d_mem, layers_attr="transformer.h", wrap_pos=False,
                 correction=True, n_heads=1, use_denom=True, gating=False, normalize=True):
        super().__init__()
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        d_model = base_model.get_input_embeddings().embedding_dim
        layers = base_model
        for attr in layers_attr.split("."):
            layers = getattr(layers, attr)
        for i in range(len(layers)):
            layers[i] = OfficialLayer(layers[i], d_model, num_mem_tokens, d_mem, n_heads, correction, use_denom,
                                      gating, normalize)
        self.layers = layers
        emb = base_model.get_input_embeddings()
        dim = getattr(base_model.config, "n_embd", None) or base_model.config.hidden_size
        self.memory = torch.nn.Parameter(torch.randn(num_mem_tokens, dim) * emb.weight.data.std())
        self.wrap_pos = wrap_pos
        if wrap_pos:
            wpe = base_model.transformer.wpe
            n_pos, d = wpe.weight.shape
            new = torch.nn.Embedding(n_pos + num_mem_tokens, d)
            with torch.no_grad():
                new.weight[:n_pos] = wpe.weight
            base_model.transformer.wpe = new

    def zero_mem(self):
        for layer in self.layers:
            layer.zero_mem()

    def set_generate_mode(self, on):
        for layer in self.layers:
            layer.generate_mode = on

    def forward(self, input_ids, attention_mask=None, inputs_embeds=None, output_hidden_states=False):
        m = self.num_mem_tokens
        x = self.model.get_input_embeddings()(input_ids) if inputs_embeds is None else inputs_embeds
        x = torch.cat([x, self.memory.repeat(x.shape[0], 1, 1)], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.ones(x.shape[:2], dtype=torch.int64)
            mask[:, :-m] = attention_mask
        kw = {}
        if self.wrap_pos:
            total = self.model.transformer.wpe.weight.shape[0]
            kw["position_ids"] = torch.cat([torch.arange(x.shape[1] - m), torch.arange(total - m, total)])[None]
        first = []
        hook = self.layers[0].register_forward_pre_hook(lambda _mod, args: first.append(args[0]))
        try:
            out = self.model(inputs_embeds=x, attention_mask=mask, output_hidden_states=True, **kw)
        finally:
            hook.remove()
        hidden = [first[0]] + list(out.hidden_states[1:])
        return out.logits[:, :-m], [h[:, :-m] for h in hidden]

    def generate(self, input_ids, attention_mask=None, **kw):
        self.set_generate_mode(True)
        try:
            x = self.model.get_input_embeddings()(input_ids)
            return self.model.generate(inputs_embeds=x, attention_mask=attention_mask, **kw)
        finally:
            self.set_generate_mode(False)


class OfficialWrapper(torch.nn.Module):
    def __init__(self, memory_cell, segment_size, max_n_segments=None, k2=-1, segment_alignment=None):
        super().__init__()
        self.memory_cell = memory_cell
        self.size, self.max_n, self.k2, self.align = segment_size, max_n_segments, k2, segment_alignment

    def split(self, t):
        n = t.shape[1]
        if self.align in (None, "left"):
            cuts = list(range(0, n, self.size)) + [n]
        elif self.align == "right":
            cuts = (list(range(n, 0, -self.size)) + [0])[::-1]
        else:
            return list(torch.chunk(t, math.ceil(n / self.size), dim=1))
        return [t[:, a:b] for a, b in zip(cuts[:-1], cuts[1:])]

    def _segments(self, input_ids, attention_mask, inputs_embeds):
        ids = self.split(input_ids)
        masks = self.split(attention_mask) if attention_mask is not None else [None] * len(ids)
        embs = self.split(inputs_embeds) if inputs_embeds is not None else [None] * len(ids)
        return list(zip(ids, masks, embs))

    def _truncate(self, i):
        if i >= 1 and self.k2 not in (-1, None) and i + self.k2 <= self.max_n:
            for layer in self.memory_cell.layers:
                layer.W_mem, layer.z = layer.W_mem.detach(), layer.z.detach()

    def forward(self, input_ids, labels=None, labels_mask=None, inputs_embeds=None, attention_mask=None):
        """``(loss or 0, logits [B, T, V], hidden_states per layer [B, T, d])``."""
        self.memory_cell.zero_mem()
        logits, hidden = [], []
        for i, (ids, mask, emb) in enumerate(self._segments(input_ids, attention_mask, inputs_embeds)):
            lg, hs = self.memory_cell(ids, mask, emb)
            logits.append(lg)
            hidden.append(hs)
            self._truncate(i)
        self.memory_cell.zero_mem()
        logits = torch.cat(logits, dim=1)
        loss = 0
        if labels is not None:
            flat_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
            flat_labels = labels[..., 1:].reshape(-1)
            if labels_mask is not None:
                keep = labels_mask[..., :-1].reshape(-1)
                flat_logits, flat_labels = flat_logits[keep], flat_labels[keep]
            loss = F.cross_entropy(flat_logits, flat_labels)
        return loss, logits, tuple(torch.cat(layer, dim=1) for layer in zip(*hidden))

    def generate(self, input_ids, attention_mask=None, **kw):
        self.memory_cell.zero_mem()
        segments = self._segments(input_ids, attention_mask, None)
        with torch.no_grad():
            for ids, mask, _ in segments[:-1]:
                self.memory_cell(ids, mask)
        ids, mask, _ = segments[-1]
        out = self.memory_cell.generate(ids, attention_mask=mask, **kw)
        self.memory_cell.zero_mem()
        return out


def official_keys(base_keys, layers_attr: str, n_layers: int):
    """The official checkpoint's key set, built from the bare backbone's ``state_dict`` keys: the
    memory, the backbone's own keys with every layer ``{layers_attr}.{i}.X`` moved under
    ``{layers_attr}.{i}.layer.X`` beside the ``W_m*`` projections, and each layer's keys again under
    ``memory_cell.layers.{i}.``."""
    keys = {"memory_cell.memory"}
    per_layer = {i: {"W_mq.weight", "W_mk.weight", "W_mv.weight", "W_mb.weight", "W_mb.bias"} for i in range(n_layers)}
    prefix = layers_attr + "."
    for key in base_keys:
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            per_layer[int(index)].add("layer." + rest)
        else:
            keys.add("memory_cell.model." + key)
    for i, names in per_layer.items():
        for name in names:
            keys.add(f"memory_cell.model.{prefix}{i}.{name}")
            keys.add(f"memory_cell.layers.{i}.{name}")
    return keys
