"""Drop-in ``AssociativeMemoryCell`` / ``AssociativeRecurrentWrapper``: the Associative Recurrent Memory
Transformer (ARMT, arXiv 2407.04841; SPEC §6) on this package's kernels.

The official code (RodkinIvan/associative-recurrent-memory-transformer, ``modeling_amt/
language_modeling.py``; branch ``experimental`` for heads, L2 norm, ``use_denom`` and ``gating``, the
default branch ``framework_accel`` for one head without the norm) becomes this by changing the
import; its checkpoints load with ``strict=True``::

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from rmt_kernels.integrations.armt import AssociativeMemoryCell, AssociativeRecurrentWrapper

    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128))
    cell = AssociativeMemoryCell(base, num_mem_tokens=4, d_mem=8, n_heads=2)
    model = AssociativeRecurrentWrapper(cell, segment_size=16, max_n_segments=4, checkpoint_every=2)
    ids = torch.randint(0, 64, (2, 50))
    out = model(input_ids=ids, labels=ids)          # 4 segments: 16, 16, 16, 2 tokens
    out.loss.backward()                             # full BPTT through every layer's (A, z)
    new = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)   # [2, 3]

Semantics (the official ones). Each segment is packed ``[X (S) | W (M)]`` with W the learned
``memory`` parameter (``randn * std(word embeddings)``) for every segment, and runs under plain causal
attention (``MemoryLayout(0, M, "causal")``, the ``"rmt_kernels"`` attention; the padding mask gets
ones for the W rows). Recurrence is per layer: before layer l (from the second segment on) its input
gets the associative read ``x + phi(W_mq x) A_l / (phi(W_mq x) z_l + 1e-5)``; after it, the layer
output's W rows ``m`` write ``(A_l, z_l) <- delta rule(W_mk m, W_mv m, sigmoid(W_mb m))``
(:mod:`rmt_kernels.ops.assoc_memory`). ``normalize=True`` is ``experimental`` (DPFP features
L2-normalised per head), ``normalize=False`` is ``framework_accel`` (one head, no norm, ``|k|^2 +
1e-5`` in the correction). The state is float32 (float64 for a float64 model); gradients flow through
it across segments (full BPTT) unless ``k2`` truncates. Logits of the X rows of every segment are
concatenated; the loss is the shift-by-one cross-entropy, restricted by ``labels_mask`` as the
official ``process_outputs``. ``generate`` runs all but the last segment to build the state, then
the backbone's ``generate`` from the last segment's tokens (no W rows), every layer reading the state
and none writing.

What differs is how it runs, and a few deliberate departures:

- the state of a call lives in a run object made current for that call only (see
  :mod:`rmt_kernels.integrations._armt_run`), never on the modules: two calls give the same result,
  nothing is left on a module afterwards, and every thread / replica has its own;
- packing is one fused kernel (``pack_segment_from_ids`` for a plain embedding); the read and the
  write are the fused ``assoc_read`` / ``assoc_write`` ops; no per-layer hidden states are kept
  unless ``output_hidden_states=True`` (the official asks for them on every segment);
- ``checkpoint_every=c`` runs each chunk of c segments under non-reentrant activation checkpointing
  (see :class:`AssociativeRecurrentWrapper`);
- ``attention_mask``, ``labels`` and ``labels_mask`` are optional (the official indexes all three);
  ``labels_mask`` must be bool (an integer mask would be an index there, as in
  :mod:`rmt_kernels.integrations.rmt`);
- ``k2`` truncates as the official RMT wrapper does (SPEC §3); the official ARMT accepts ``k2`` and
  ignores it, which ``k2=-1`` (the default) reproduces;
- ``hidden_states[0]`` is layer 0's input before the read (the embeddings, as transformers 4 returned
  them); under transformers 5 the official code would report the input after the read;
- the ACT variants, RWKV backbones, sliding windows and ``input_segmented`` of the ``experimental``
  branch are not supported.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.utils.checkpoint

from . import hf  # first: without transformers it raises the ImportError that names the extra

from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions  # noqa: E402

from .. import _checks  # noqa: E402
from ..layout import MemoryLayout  # noqa: E402
from ..ops.assoc_memory.interface import resolve_backend  # noqa: E402
from ..ops.pack_segment.interface import pack_segment, pack_segment_from_ids  # noqa: E402
from ..recurrent import ALIGNMENTS, memory_detached, segment_bounds  # noqa: E402
from ._armt_run import (  # noqa: E402
    AssocConfig, AssociativeLayerWrapper, Run, active, detach_states, flatten_states, unflatten_states,
)
from ._armt_diagonal import run_diagonal  # noqa: E402
from ._armt_stacked import family_of  # noqa: E402
from .rmt import RecurrentLMOutput, _as_int, _plain_embedding, check_labels_mask, shifted_loss  # noqa: E402

__all__ = ["AssociativeMemoryCell", "AssociativeRecurrentWrapper", "AssociativeLayerWrapper"]

_AUTO = hf.AUTO
SCHEDULES = ("sequential", "diagonal")


class AssociativeMemoryCell(torch.nn.Module):
    """ARMT around a Hugging Face causal LM: every layer of ``layers_attr`` wrapped with an associative
    memory, and a learned ``memory`` ``[M, d]`` as the write block of every segment.

    Args:
        base_model: a ``transformers`` causal LM (GPT-2: ``layers_attr="transformer.h"``; Llama family:
            ``"model.layers"``). Changed in place (its layers are replaced by wrappers; its attention
            switched, see ``attn_implementation``). Stored as ``self.model``.
        num_mem_tokens: M >= 1 memory rows.
        d_mem: width of the query/key projections (the feature map makes keys ``6 d_mem`` wide).
        layers_attr: dotted path of the layer ``ModuleList`` in ``base_model``.
        wrap_pos: GPT-2 only: append M position embeddings for the W rows after the model's own.
        correction, n_heads, use_denom, gating: the official variant flags (SPEC §6).
        normalize: L2-normalise the features (``experimental``; False: ``framework_accel``).
        attn_implementation: ``"auto"`` (default: ``"rmt_kernels"``, registered on the fly, warning
            once that the model was switched), a name, or None (leave the model as it is).
        backend: of the associative ops: ``"auto"``, ``"torch"`` or ``"triton"``.

    Attributes:
        memory: ``Parameter [M, d]``. layers: the wrapped layers (registered a second time, as the
            official cell does, so checkpoints carry ``memory_cell.layers.{i}.*`` too).

    Raises:
        TypeError / ValueError: bad sizes, heads that do not divide ``d_mem`` and d, a ``layers_attr``
            that is not a module list, ``wrap_pos`` on a model without GPT-2's ``transformer.wpe``.
    """

    def __init__(self, base_model, num_mem_tokens: int, d_mem: int, layers_attr: str = "transformer.h",
                 wrap_pos: bool = False, correction: bool = True, n_heads: int = 1, use_denom: bool = True,
                 gating: bool = False, normalize: bool = True, attn_implementation: Optional[str] = _AUTO,
                 backend: str = "auto"):
        super().__init__()
        num_mem_tokens = _as_int("num_mem_tokens", num_mem_tokens)
        d_mem = _as_int("d_mem", d_mem)
        if num_mem_tokens < 1 or d_mem < 1:
            raise ValueError(f"num_mem_tokens and d_mem must be >= 1, got {num_mem_tokens} and {d_mem}")
        if not hasattr(base_model, "get_input_embeddings"):
            raise TypeError(f"base_model must be a transformers model, got {type(base_model).__name__}")
        hf.switch_attention(base_model, attn_implementation, "AssociativeMemoryCell")
        self.model = base_model
        self.num_mem_tokens = num_mem_tokens
        self.d_mem = d_mem
        self.d_model = base_model.get_input_embeddings().embedding_dim
        n_heads = _checks.check_assoc_heads(_as_int("n_heads", n_heads), d_mem, self.d_model)
        self.cfg = AssocConfig(num_mem_tokens, n_heads, bool(normalize), bool(use_denom), bool(correction),
                               bool(gating))
        self.backend = backend
        layers = base_model
        for attr in layers_attr.split("."):
            layers = getattr(layers, attr, None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise ValueError(f"layers_attr={layers_attr!r} does not name a ModuleList of {type(base_model).__name__}")
        for i in range(len(layers)):
            layers[i] = AssociativeLayerWrapper(layers[i], self.d_model, d_mem, self.cfg)
        self.layers = layers
        self.create_memory(num_mem_tokens)
        self.wrap_pos = bool(wrap_pos)
        if self.wrap_pos:
            self.wrap_positional_embeddings(num_mem_tokens)

    def create_memory(self, num_mem_tokens: int) -> None:
        """``self.memory`` as the official (same shape, init and generator use), in the embedding's
        dtype and device."""
        emb = self.model.get_input_embeddings().weight
        config = self.model.config
        dim = getattr(config, "n_embd", None) or config.hidden_size
        weights = torch.randn((num_mem_tokens, dim)) * emb.data.std().cpu().float()
        self.memory = torch.nn.Parameter(weights.to(device=emb.device, dtype=emb.dtype))

    def wrap_positional_embeddings(self, num_mem_tokens: int) -> None:
        """GPT-2's ``wpe`` grows by M rows (default ``nn.Embedding`` init) for the W rows."""
        wpe = getattr(getattr(self.model, "transformer", None), "wpe", None)
        if not isinstance(wpe, torch.nn.Embedding):
            raise ValueError("wrap_pos=True needs a GPT-2 style model with transformer.wpe")
        old = wpe.weight.detach()
        new = torch.nn.Embedding(old.shape[0] + num_mem_tokens, old.shape[1])
        new.to(device=old.device, dtype=old.dtype)
        with torch.no_grad():
            new.weight[: old.shape[0]] = old
        self.model.transformer.wpe = new

    @property
    def layout(self) -> MemoryLayout:
        """``[X | W]`` under plain causal attention: ``MemoryLayout(0, M, "causal")``."""
        return MemoryLayout(0, self.num_mem_tokens, mask="causal")

    def set_memory(self, input_shape) -> torch.Tensor:
        """The memory repeated over the batch, ``[B, M, d]`` (official API)."""
        return self.memory.repeat(input_shape[0], 1, 1)

    def new_run(self, states=None, write: bool = True, capture_input: bool = False) -> Run:
        """A :class:`~rmt_kernels.integrations._armt_run.Run` over this cell's layers (states None:
        before the first segment)."""
        p = self.memory
        backend = resolve_backend(self.backend, p.device, p.dtype)
        states = [None] * len(self.layers) if states is None else list(states)
        return Run(self.cfg, self.layers, states, write, backend, capture_input)

    # ------------------------------------------------------------------ one segment

    def _positions(self, seg_len: int, device) -> torch.Tensor:
        total = self.model.transformer.wpe.weight.shape[0]
        m = self.num_mem_tokens
        return torch.cat([torch.arange(seg_len, device=device),
                          torch.arange(total - m, total, device=device)])[None]

    def segment(self, run: Run, input_ids, inputs_embeds, attention_mask, output_hidden_states: bool = False):
        """One packed segment through the backbone with ``run`` current; updates ``run.states``.

        Returns ``(logits [B, S, V], hidden_states or None)`` (X rows only)."""
        emb = self.model.get_input_embeddings()
        pb = self.backend if self.backend in ("torch", "triton") else "auto"
        if inputs_embeds is None and _plain_embedding(emb):
            packed = pack_segment_from_ids(input_ids, emb.weight, self.layout, None, self.memory, backend=pb)
        else:
            x = emb(input_ids) if inputs_embeds is None else inputs_embeds
            packed = pack_segment(x, self.layout, None, self.memory, backend=pb)
        b, n = packed.shape[:2]
        s = n - self.num_mem_tokens
        mask = None
        if attention_mask is not None:
            mask = torch.ones((b, n), dtype=torch.int64, device=attention_mask.device)
            mask[:, :s] = attention_mask
        kwargs = {"rmt_layout": self.layout} if hf.uses_rmt_kernels(self.model) else {}
        if self.wrap_pos:
            kwargs["position_ids"] = self._positions(s, packed.device)
        run.first_input = [] if output_hidden_states else None
        with active(run):
            out = self.model(inputs_embeds=packed, attention_mask=mask, output_hidden_states=output_hidden_states,
                             use_cache=False, **kwargs)
        hidden = None
        if output_hidden_states:
            states = list(out.hidden_states)
            if run.first_input:
                states[0] = run.first_input[0]
            hidden = tuple(h[:, :s] for h in states)
        run.first_input = None
        return out.logits[:, :s], hidden

    def forward(self, input_ids=None, state=None, inputs_embeds=None, attention_mask=None,
                output_hidden_states=None, **kwargs):
        """One segment: ``(out, new_state)``.

        Args:
            input_ids: ``[B, S]`` (or ``inputs_embeds [B, S, d]``).
            state: the per-layer ``[(A, z), ...]`` a previous call returned, or None (first segment).
            attention_mask: ``[B, S]`` padding mask of the tokens.
            output_hidden_states: also return every layer's hidden states (X rows).

        Returns:
            ``(CausalLMOutputWithCrossAttentions(logits [B, S, V], hidden_states?), new_state)``.
        """
        if kwargs:
            raise TypeError(f"AssociativeMemoryCell.forward got unexpected arguments {sorted(kwargs)}")
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        run = self.new_run(state)
        logits, hidden = self.segment(run, input_ids, inputs_embeds, attention_mask, bool(output_hidden_states))
        out = CausalLMOutputWithCrossAttentions(logits=logits)
        if output_hidden_states:
            out["hidden_states"] = hidden
        return out, run.states

    def generate(self, input_ids, state=None, attention_mask=None, **generate_kwargs):
        """``base_model.generate`` from the segment's embeddings (no W rows), every layer reading
        ``state`` (None: no read) and none writing. Returns what ``generate`` returns for
        ``inputs_embeds`` (the new tokens)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        with active(self.new_run(state, write=False)):
            return self.model.generate(inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs)


class AssociativeRecurrentWrapper(torch.nn.Module):
    """Runs an :class:`AssociativeMemoryCell` over a long sequence, segment by segment (official API).

    Args:
        memory_cell: the cell.
        segment_size: tokens per segment (>= 1).
        max_n_segments: used by the ``k2`` rule only.
        k2: gradient truncation as the official RMT wrapper (SPEC §3): the states produced by segment
            ``i`` are detached iff ``i >= 1 and k2 not in (-1, None) and i + k2 <= max_n_segments``.
            -1 / None: full backpropagation through time (the official ARMT's behaviour).
        segment_alignment: None/"left" (default), "right" or "center".
        checkpoint_every: None (default) or c >= 1: when a graph is recorded, every chunk of c
            consecutive segments runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``.
            The forward then keeps only the per-layer states at chunk boundaries (and the chunk's
            outputs), not the activations, features and ``(A, z)`` of every layer of every segment;
            the backward recomputes each chunk's forward once, one chunk at a time. The trade: one
            extra forward pass of the whole sequence (about a third more compute for a training step)
            for saved memory that no longer grows with segments x layers beyond one chunk. Results
            and gradients are those without checkpointing (dropout replays the same random numbers).
        schedule: ``"sequential"`` (default: segment after segment, each through every layer, ``S x L``
            layer calls) or ``"diagonal"`` (SPEC §7, arXiv 2506.05229): the cells of an anti-diagonal
            ``layer + segment = c`` run as one grouped step over the layers in flight (stacked per-layer
            weights, one grouped GEMM per linear, one batched attention call, the associative read and
            write over the stacked per-layer states), ``S + L - 1`` steps in all
            (:mod:`rmt_kernels.integrations._armt_diagonal`). The same logits, loss, hidden states,
            states and gradients up to float reassociation; GPT-2 and Llama backbones only; no
            ``checkpoint_every`` (ValueError); dropout in training draws other random numbers.
        rmt_kwargs: other options the official stores in ``rmt_config`` (ignored here).

    Example::

        >>> model = AssociativeRecurrentWrapper(cell, segment_size=16, max_n_segments=8, checkpoint_every=2)
        >>> model(input_ids=ids, labels=ids).loss.backward()
    """

    def __init__(self, memory_cell: AssociativeMemoryCell, segment_size: int = None, max_n_segments: int = None,
                 k2: Optional[int] = -1, segment_alignment: Optional[str] = None,
                 checkpoint_every: Optional[int] = None, schedule: str = "sequential", **rmt_kwargs):
        super().__init__()
        if not isinstance(memory_cell, AssociativeMemoryCell):
            raise TypeError(f"memory_cell must be an AssociativeMemoryCell, got {type(memory_cell).__name__}")
        if segment_size is None:
            raise ValueError("segment_size is required: the tokens per segment, an integer >= 1")
        segment_size = _as_int("segment_size", segment_size)
        if segment_size < 1:
            raise ValueError(f"segment_size must be >= 1, got {segment_size}")
        max_n_segments = _as_int("max_n_segments", max_n_segments, allow_none=True)
        k2 = _as_int("k2", k2, allow_none=True)
        if k2 not in (-1, None) and max_n_segments is None:
            raise ValueError(f"k2={k2} needs max_n_segments (the truncation rule is i + k2 <= max_n_segments)")
        if segment_alignment not in ALIGNMENTS:
            raise ValueError(f"segment_alignment must be one of {ALIGNMENTS}, got {segment_alignment!r}")
        checkpoint_every = _as_int("checkpoint_every", checkpoint_every, allow_none=True)
        if checkpoint_every is not None and checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be None or >= 1, got {checkpoint_every}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule == "diagonal":
            if checkpoint_every is not None:
                raise ValueError(
                    "schedule='diagonal' does not support checkpoint_every: its checkpointed chunks are runs of "
                    "consecutive segments through every layer, which the wavefront of the diagonal schedule cuts "
                    "across; use schedule='sequential' with checkpoint_every, or the diagonal schedule without it")
            family_of(memory_cell)  # raises UnsupportedForDiagonal (a ValueError) for another backbone
        self.memory_cell = memory_cell
        self.checkpoint_every = checkpoint_every
        self.schedule = schedule
        self.rmt_config = dict(segment_size=segment_size, max_n_segments=max_n_segments, k2=k2,
                               segment_alignment=segment_alignment, **rmt_kwargs)

    def _bounds(self, seq_len: int):
        return segment_bounds(seq_len, self.rmt_config["segment_size"], self.rmt_config["segment_alignment"])

    def _chunk(self, first: int, bounds, input_ids, inputs_embeds, attention_mask, output_hidden_states,
               *flat_states):
        """Segments ``first ..`` of ``bounds`` from the flattened states; returns the logits and hidden
        states per segment and the flattened states after the chunk (k2 applied)."""
        cell = self.memory_cell
        states = unflatten_states(list(flat_states), len(cell.layers))
        logits, hidden = [], []
        for j, (a, b) in enumerate(bounds):
            run = cell.new_run(states)
            lg, hs = cell.segment(
                run, None if input_ids is None else input_ids[:, a:b],
                None if inputs_embeds is None else inputs_embeds[:, a:b],
                None if attention_mask is None else attention_mask[:, a:b], output_hidden_states,
            )
            states = run.states
            if memory_detached(first + j, self.rmt_config["k2"], self.rmt_config["max_n_segments"]):
                states = detach_states(states)
            logits.append(lg)
            hidden.append(hs)
        return logits, hidden, flatten_states(states)

    def run_segments(self, input_ids, inputs_embeds, attention_mask, output_hidden_states: bool, bounds):
        """All segments of ``bounds``: ``(per-segment logits, per-segment hidden states, final states)``."""
        if self.schedule == "diagonal":
            return run_diagonal(self, input_ids, inputs_embeds, attention_mask, output_hidden_states, bounds)
        c = self.checkpoint_every
        ckpt = c is not None and torch.is_grad_enabled()
        step = c if ckpt else max(len(bounds), 1)
        flat: List[torch.Tensor] = []
        logits, hidden = [], []
        for start in range(0, len(bounds), step):
            args = (start, bounds[start : start + step], input_ids, inputs_embeds, attention_mask,
                    output_hidden_states, *flat)
            if ckpt:
                lg, hs, flat = torch.utils.checkpoint.checkpoint(self._chunk, *args, use_reentrant=False)
            else:
                lg, hs, flat = self._chunk(*args)
            logits += lg
            hidden += hs
        return logits, hidden, unflatten_states(flat, len(self.memory_cell.layers))

    def _check(self, input_ids, labels, labels_mask, inputs_embeds, attention_mask):
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if tokens.dim() < 2 or tokens.shape[1] == 0:
            raise ValueError(
                f"the input must be [B, T] ids or [B, T, d] embeddings with T >= 1, got {tuple(tokens.shape)}")
        shape = tuple(tokens.shape[:2])
        check_labels_mask(labels_mask)
        for name, t in (("labels", labels), ("labels_mask", labels_mask), ("attention_mask", attention_mask)):
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} (the input's [B, T]), got {list(t.shape)}")
        return shape[1]

    def forward(self, input_ids=None, labels=None, labels_mask=None, inputs_embeds=None, attention_mask=None,
                output_attentions=None, output_hidden_states=None):
        """Loss and logits over all segments.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, d]``).
            labels: ``[B, T]``; loss ``cross_entropy(logits[:, :-1], labels[:, 1:])`` (mean, -100
                ignored); 0 without labels, as the official.
            labels_mask: bool ``[B, T]``: position t (t < T - 1) predicts ``labels[:, t + 1]`` only
                where set.
            attention_mask: ``[B, T]`` 0/1 or bool padding mask.
            output_attentions: accepted, nothing returned (as the official).
            output_hidden_states: also return every layer's hidden states ``[B, T, d]`` (X rows).

        Returns:
            :class:`rmt_kernels.integrations.rmt.RecurrentLMOutput`: ``loss``, ``logits [B, T, V]``,
            ``segment_bounds``, ``segment_logits`` (``out["logits_{i}"]``) and, when asked,
            ``hidden_states``.

        Raises:
            ValueError: no input or mismatched shapes. TypeError: a non-bool ``labels_mask``.
        """
        seq_len = self._check(input_ids, labels, labels_mask, inputs_embeds, attention_mask)
        bounds = self._bounds(seq_len)
        seg_logits, seg_hidden, _ = self.run_segments(input_ids, inputs_embeds, attention_mask,
                                                      bool(output_hidden_states), bounds)
        logits = torch.cat(seg_logits, dim=1)
        out = RecurrentLMOutput()
        out["loss"] = shifted_loss(logits, labels, labels_mask)
        out["logits"] = logits
        if output_hidden_states:
            out["hidden_states"] = tuple(torch.cat(layer, dim=1) for layer in zip(*seg_hidden))
        out["segment_bounds"] = tuple(bounds)
        return out

    def generate(self, input_ids, attention_mask=None, **generate_kwargs):
        """Build the state on all but the last segment (no graph), then generate from the last
        segment's tokens, every layer reading the state.

        Returns:
            What the backbone's ``generate`` returns for ``inputs_embeds`` (the new tokens only).
        """
        self._check(input_ids, None, None, None, attention_mask)
        bounds = self._bounds(input_ids.shape[1])
        states = None
        if len(bounds) > 1:
            with torch.no_grad():
                states = self.run_segments(input_ids, None, attention_mask, False, bounds[:-1])[2]
        a, b = bounds[-1]
        mask = None if attention_mask is None else attention_mask[:, a:b]
        return self.memory_cell.generate(input_ids[:, a:b], states, attention_mask=mask, **generate_kwargs)
