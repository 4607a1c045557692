"""The diagonal schedule of :class:`rmt_kernels.integrations.armt.AssociativeRecurrentWrapper`
(``schedule="diagonal"``; SPEC §7, arXiv 2506.05229).

With ARMT's per-layer memory, cell (layer l, segment s) needs only (l - 1, s) (its input) and (l, s - 1)
(its layer's associative state). Every cell of an anti-diagonal ``l + s = c`` is independent, so step
``c = 0 .. S + L - 2`` runs the *slots* ``l = lo .. hi`` (``lo = max(0, c - S + 1)``, ``hi = min(c, L - 1)``,
slot j = layer ``lo + j`` on segment ``c - lo - j``) as one group: ``S + L - 1`` grouped steps instead of
``S x L`` layer calls (:mod:`._armt_stacked` holds the grouped layer).

Per step:

1. input ``[G * B, N, d]``: slot of layer 0 (if present) = segment c's packed ``[X | pad | W]`` embeddings
   (packed up front, positions added for GPT-2), the others = the previous step's outputs of layers
   ``lo - 1 .. hi - 1`` (a contiguous slice of it);
2. the associative read of the slots that have a state (every slot but the one on its first segment,
   which is layer ``c``, the last slot, while ``c < L``), against the previous step's written states of
   layers ``lo ..`` (again a contiguous slice: no gather);
3. the grouped layer (attention: one batched ``segment_attention`` call);
4. the write of each slot's M memory rows (slots with a state: one call against the old states; the
   first-segment slot: one call without, as the sequential run); ``k2`` detaches the states of the slots
   whose segment its rule names;
5. when layer L - 1 is among the slots, its segment goes through the final norm and ``lm_head``.

Short segments (the last one, or the first under ``segment_alignment="right"``) are padded *inside* the
slot: ``[X (n_s) | pad (S_max - n_s) | W (M)]``, the pad rows masked as right padding of the segment part
(the attention runs them as ``segment_lengths``, so no valid row attends to a pad row), and the positions
are those of the sequential run (X rows ``0 .. n_s - 1``, W rows ``n_s .. n_s + M - 1``, or GPT-2's
``wrap_pos`` rows), so every valid row computes what the sequential schedule computes.

Exact: logits, loss, hidden states, final states and gradients equal the sequential schedule's up to
float reassociation (the grouped GEMMs sum in another order). Autograd runs through the wavefront: the
stacked weights are ``torch.stack`` of the parameters. Refused (ValueError): ``checkpoint_every`` (its
chunks of segments cut across the wavefront) and backbones other than GPT-2 and Llama (see
:func:`._armt_stacked.family_of`). Dropout in training runs with other random draws than the sequential
schedule (the same distribution).
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ..ops.assoc_memory.interface import assoc_read_validated, assoc_write_validated, resolve_backend
from ..ops.pack_segment.interface import pack_segment, pack_segment_from_ids
from ..recurrent import memory_detached
from ._armt_stacked import grouped_linear, layer_group, stack_backbone
from .rmt import _plain_embedding


def _final(cell, st) -> tuple:
    """``(final norm, lm_head)`` modules of the backbone."""
    if st.family == "gpt2":
        return cell.model.transformer.ln_f, cell.model.lm_head
    return cell.model.model.norm, cell.model.lm_head


def _pack_all(cell, st, bounds, input_ids, inputs_embeds, attention_mask, n_max: int):
    """Per segment: the layer-0 input ``[B, N, d]`` (``[X | pad | W]``), position ids ``[N]``, and the
    bool padding mask ``[B, N]`` (None where every row is valid)."""
    emb = cell.model.get_input_embeddings()
    layout = cell.layout
    m = cell.num_mem_tokens
    pb = cell.backend if cell.backend in ("torch", "triton") else "auto"
    n = n_max + m
    xs, positions, masks = [], [], []
    for a, b in bounds:
        ns = b - a
        if inputs_embeds is None and _plain_embedding(emb):
            packed = pack_segment_from_ids(input_ids[:, a:b], emb.weight, layout, None, cell.memory, backend=pb)
        else:
            x = emb(input_ids[:, a:b]) if inputs_embeds is None else inputs_embeds[:, a:b]
            packed = pack_segment(x, layout, None, cell.memory, backend=pb)
        device = packed.device
        if cell.wrap_pos:
            total = cell.model.transformer.wpe.weight.shape[0]
            mem_pos = torch.arange(total - m, total, device=device)
        else:
            mem_pos = torch.arange(ns, ns + m, device=device)
        pad = n_max - ns
        pos = torch.cat([torch.arange(ns, device=device), torch.zeros(pad, dtype=torch.long, device=device), mem_pos])
        if st.family == "gpt2":
            packed = packed + cell.model.transformer.wpe(torch.cat([pos[:ns], mem_pos]))[None].to(packed.device)
            if cell.model.training and cell.model.config.embd_pdrop > 0:
                packed = torch.nn.functional.dropout(packed, cell.model.config.embd_pdrop, True)
        if pad:
            packed = torch.cat([packed[:, :ns], packed.new_zeros(packed.shape[0], pad, packed.shape[2]),
                                packed[:, ns:]], dim=1)
        mask = None
        if pad or attention_mask is not None:
            mask = torch.ones(packed.shape[0], n, dtype=torch.bool, device=device)
            mask[:, ns:n_max] = False
            if attention_mask is not None:
                mask[:, :ns] = attention_mask[:, a:b].to(device=device).bool()
        xs.append(packed)
        positions.append(pos)
        masks.append(mask)
    return xs, positions, masks


def _cat_slots(per_slot: List[Optional[Tensor]], full) -> Optional[Tensor]:
    """One tensor over the slots, or None when every slot has None (``full(i)`` fills a None)."""
    if all(t is None for t in per_slot):
        return None
    return torch.cat([t if t is not None else full(i) for i, t in enumerate(per_slot)])


def run_diagonal(wrapper, input_ids, inputs_embeds, attention_mask, output_hidden_states: bool, bounds):
    """All segments of ``bounds`` on the diagonal schedule: ``(per-segment logits, per-segment hidden
    states, final per-layer states)``, as :meth:`AssociativeRecurrentWrapper.run_segments` returns."""
    cell = wrapper.memory_cell
    cfg = cell.cfg
    st = stack_backbone(cell)
    model = cell.model
    training = model.training
    n_layers = len(cell.layers)
    n_seg = len(bounds)
    lens = [b - a for a, b in bounds]
    n_max = max(lens)
    m = cell.num_mem_tokens
    n = n_max + m
    xs, positions, masks = _pack_all(cell, st, bounds, input_ids, inputs_embeds, attention_mask, n_max)
    batch = xs[0].shape[0]
    device = xs[0].device
    backend = resolve_backend(cell.backend, device, cell.memory.dtype)
    k2, max_n = wrapper.rmt_config["k2"], wrapper.rmt_config["max_n_segments"]

    rot_cache = {}

    def rotary(s):  # (cos, sin) [1, N, hd] of segment s (one per distinct position vector)
        key = lens[s]
        if key not in rot_cache:
            rot_cache[key] = model.model.rotary_emb(xs[s], positions[s][None])
        return rot_cache[key]

    norm, lm_head = _final(cell, st)
    logits: List[Optional[Tensor]] = [None] * n_seg
    hidden = [[None] * (n_layers + 1) for _ in range(n_seg)] if output_hidden_states else None
    final_states: List[Optional[tuple]] = [None] * n_layers
    prev_out: Optional[Tensor] = None
    prev_state = None  # (A, z) stacked over the previous step's slots
    prev_lo = 0
    for c in range(n_seg + n_layers - 1):
        lo, hi = max(0, c - n_seg + 1), min(c, n_layers - 1)
        g = hi - lo + 1
        segs = [c - l for l in range(lo, hi + 1)]
        parts = []
        if lo == 0:
            parts.append(xs[c])
            if hidden is not None:
                hidden[c][0] = xs[c][:, : lens[c]]
        first_in = max(lo, 1)
        if first_in <= hi:
            parts.append(prev_out[(first_in - 1 - prev_lo) * batch : (hi - prev_lo) * batch])
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        # the read: every slot with a state (all but layer c's first segment)
        n_read = g - (1 if c <= n_layers - 1 else 0)
        old = None
        if n_read:
            r0, r1 = (lo - prev_lo) * batch, (lo + n_read - prev_lo) * batch
            old = (prev_state[0][r0:r1], prev_state[1][r0:r1])
            xr = x[: n_read * batch]
            q = grouped_linear(xr.reshape(n_read, batch * n, -1), st.w["mq"][lo : lo + n_read], None)
            xr = assoc_read_validated(xr, q.view(n_read * batch, n, -1), old[0], old[1], cfg.n_heads,
                                      cfg.normalize, cfg.use_denom, backend)
            x = xr if n_read == g else torch.cat([xr, x[n_read * batch :]])
        # the layers
        mask = _cat_slots([masks[s] for s in segs], lambda i: torch.ones(batch, n, dtype=torch.bool, device=device))
        rot = None
        if st.family == "llama":
            rots = [rotary(s) for s in segs]
            if all(r is rots[0] for r in rots):
                rot = rots[0]
            else:
                rot = tuple(torch.cat([r[i].expand(batch, -1, -1) for r in rots]) for i in range(2))
        y = layer_group(st, lo, hi, x, batch, m, mask, rot, training)
        # the write of every slot's memory rows
        mem = y[:, n - m :].reshape(g, batch * m, -1)
        kvb = grouped_linear(mem, st.w["kvb"][lo : hi + 1], st.w["kvb_b"][lo : hi + 1]).view(g * batch, m, -1)
        k, v, b = kvb.split([st.d_mem, y.shape[-1], st.n_b], dim=-1)
        new_a, new_z = [], []
        if n_read:
            sl = slice(0, n_read * batch)
            a_, z_ = assoc_write_validated(k[sl], v[sl], b[sl], old[0], old[1], cfg.n_heads, cfg.normalize,
                                           cfg.use_denom, cfg.correction, backend)
            new_a.append(a_)
            new_z.append(z_)
        if n_read < g:
            sl = slice(n_read * batch, None)
            a_, z_ = assoc_write_validated(k[sl], v[sl], b[sl], None, None, cfg.n_heads, cfg.normalize,
                                           cfg.use_denom, cfg.correction, backend)
            new_a.append(a_)
            new_z.append(z_)
        a_new = new_a[0] if len(new_a) == 1 else torch.cat(new_a)
        z_new = new_z[0] if len(new_z) == 1 else torch.cat(new_z)
        cut = [memory_detached(s, k2, max_n) for s in segs]
        if any(cut) and torch.is_grad_enabled():
            a_new = torch.cat([a_new[j * batch : (j + 1) * batch].detach() if cut[j] else
                               a_new[j * batch : (j + 1) * batch] for j in range(g)])
            z_new = torch.cat([z_new[j * batch : (j + 1) * batch].detach() if cut[j] else
                               z_new[j * batch : (j + 1) * batch] for j in range(g)])
        if segs[0] == n_seg - 1:  # layer lo finished its last segment
            final_states[lo] = (a_new[:batch], z_new[:batch])
        # outputs
        if hidden is not None:
            for j, s in enumerate(segs[:-1] if hi == n_layers - 1 else segs):
                hidden[s][lo + j + 1] = y[j * batch : (j + 1) * batch, : lens[s]]
        if hi == n_layers - 1:
            s = segs[-1]
            last = norm(y[(g - 1) * batch :])
            logits[s] = lm_head(last)[:, : lens[s]]
            if hidden is not None:
                hidden[s][n_layers] = last[:, : lens[s]]
        prev_out, prev_state, prev_lo = y, (a_new, z_new), lo
    seg_hidden = [tuple(h) for h in hidden] if hidden is not None else [None] * n_seg
    return logits, seg_hidden, final_states
