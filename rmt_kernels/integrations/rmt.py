"""Drop-in ``MemoryCell`` / ``RecurrentWrapper`` with the official RMT wrapper's API.

The official wrapper (booydar/recurrent-memory-transformer, branch ``babilong-release``,
``modeling_rmt/language_modeling.py``; SPEC §3) becomes this one by changing the import::

    from rmt_kernels.integrations.rmt import MemoryCell, RecurrentWrapper
    cell = MemoryCell(base_model, num_mem_tokens=16)
    model = RecurrentWrapper(cell, segment_size=512, max_n_segments=8, k2=-1)
    model.load_state_dict(torch.load("official_checkpoint.pt"), strict=True)   # same keys

Same semantics: a learned memory ``[M, d]`` (``memory_cell.memory``, initialised as
``randn * std(word embeddings)``) is fed as both the read block and the write block,
``[memory | segment embeddings | memory]``; the backbone's last hidden state (after its final norm) at
the write rows is the next memory; ``k2`` detaches the memory produced by segment ``i`` iff
``i >= 1 and k2 not in (-1, None) and i + k2 <= max_n_segments``; logits of all segments are
concatenated and the loss is the shift-by-one cross-entropy over the whole sequence, optionally
restricted by ``labels_mask``; ``generate`` runs all but the last segment to build the memory, then
``base_model.generate`` from ``[memory | last segment]``.

What differs is how it runs:

- the segment loop is :class:`rmt_kernels.recurrent.SegmentDriver` (fused packing of
  ``[memory | tokens | memory]``, one reusable buffer when no graph is recorded);
- the backbone's attention is the ``"rmt_kernels"`` Hugging Face implementation
  (:mod:`rmt_kernels.integrations.hf`) with the ``causal`` layout ``R = W = M``, so right-padded
  segments run on the kernel with ``segment_lengths`` (other padding takes its exact SDPA fallback);
- no per-layer hidden states are kept unless ``output_hidden_states=True`` (the last hidden state is
  taken from the backbone's output), and no KV cache is built during ``forward``.

Outputs: a :class:`RecurrentLMOutput` (a ``CausalLMOutputWithCrossAttentions`` subclass) with
``loss`` (0 when no labels, as the original), ``logits`` ``[B, T, V]``, ``segment_bounds`` and the
property ``segment_logits`` (one view of ``logits`` per segment), and with ``output_hidden_states``
``hidden_states`` (one ``[B, T, d]`` per layer, memory rows removed) and ``segment_hidden_states``.
The original's per-segment keys ``out["logits_{i}"]`` / ``out["hidden_states_{i}"]`` (and
``out.logits_{i}``) still read them, but they are not keys of the output: its keys are its dataclass
fields, so ``torch.utils._pytree`` flattens and rebuilds it (DDP does with ``find_unused_parameters``
or ``static_graph``; the Hugging Face ``Trainer`` turns on ``find_unused_parameters`` for any model
that is not a ``PreTrainedModel``). ``output_attentions`` is accepted and, as in the original (which
never forwards it to the backbone), returns nothing. ``num_mem_tokens`` must be at least 1.

More than one device: the wrappers run under DDP and FSDP2 (``fully_shard``) as they are; the memory
and every parameter of the backbone get a gradient in every step (with ``find_unused_parameters=False``
too). Non-reentrant activation checkpointing works under both; the reentrant one runs each layer's
backward once per segment, which DDP accepts only with ``static_graph=True`` (and then the same number
of segments in every step).

Where it deliberately differs from the original: ``labels_mask`` must be a bool tensor (the original
indexes with it, so an integer 0/1 mask there gathers rows 0 and 1; refused here with ``TypeError``);
integer hyper-parameters given as integral numpy/torch scalars or floats are converted to ``int``;
the backbone may be a PEFT model (the last hidden state is read at the input of the output
embeddings, not from ``base_model``, which under PEFT is the whole LM); building a ``MemoryCell``
switches the backbone's attention in place and says so once (see ``attn_implementation``).
"""

from __future__ import annotations

import functools
import inspect
import numbers
import re
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import hf  # first: without transformers it raises the ImportError that names the extra

from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions  # noqa: E402

from ..layout import MemoryLayout  # noqa: E402
from ..recurrent import SegmentDriver, StepOutput  # noqa: E402

__all__ = ["MemoryCell", "RecurrentWrapper", "RecurrentLMOutput"]


_AUTO = hf.AUTO


_SEGMENT_KEY = re.compile(r"(logits|hidden_states)_(\d+)")


@dataclass
class RecurrentLMOutput(CausalLMOutputWithCrossAttentions):
    """What :meth:`RecurrentWrapper.forward` returns: the fields of ``CausalLMOutputWithCrossAttentions``
    plus the per-segment views.

    Attributes:
        segment_bounds: the segments' token ranges ``((start, end), ...)`` (plain ints).
        segment_logits: (property) one ``[B, S_i, V]`` view of ``logits`` per segment.
        segment_hidden_states: (property) with ``output_hidden_states``, per segment a tuple of one
            ``[B, S_i, d]`` view per layer.

    The original wrapper's keys ``"logits_{i}"`` and ``"hidden_states_{i}"`` are read through
    ``out["logits_0"]`` or ``out.logits_0`` (a list per layer for ``hidden_states_{i}``, as there); they
    are not keys of the mapping, so the output flattens to its fields and is rebuilt by
    ``RecurrentLMOutput(**fields)`` (``torch.utils._pytree``, as DDP does). The views are made when
    read, so the output holds no view tensor (FSDP2 warns about views among a module's outputs).

    Example::

        >>> out = model(input_ids, labels=input_ids)
        >>> torch.equal(out["logits_1"], out.segment_logits[1])
        True
    """

    segment_bounds: Optional[Tuple[Tuple[int, int], ...]] = None

    @property
    def segment_logits(self) -> Optional[Tuple[torch.Tensor, ...]]:
        """One ``[B, S_i, V]`` view of ``logits`` per segment (None without bounds or logits)."""
        if self.segment_bounds is None or self.logits is None:
            return None
        return tuple(self.logits[:, a:b] for a, b in self.segment_bounds)

    @property
    def segment_hidden_states(self) -> Optional[Tuple[Tuple[torch.Tensor, ...], ...]]:
        """Per segment, one ``[B, S_i, d]`` view per layer of ``hidden_states`` (None when not asked)."""
        if self.segment_bounds is None or self.hidden_states is None:
            return None
        return tuple(tuple(h[:, a:b] for h in self.hidden_states) for a, b in self.segment_bounds)

    def _segment_value(self, key):
        found = _SEGMENT_KEY.fullmatch(key) if isinstance(key, str) else None
        if found is None:
            return None
        kind, i = found.group(1), int(found.group(2))
        source = self.logits if kind == "logits" else self.hidden_states
        if self.segment_bounds is None or source is None or i >= len(self.segment_bounds):
            raise KeyError(key)
        a, b = self.segment_bounds[i]
        return source[:, a:b] if kind == "logits" else [h[:, a:b] for h in source]

    def __getitem__(self, key):
        value = self._segment_value(key)
        return super().__getitem__(key) if value is None else value

    def __getattr__(self, name):
        if _SEGMENT_KEY.fullmatch(name) is None:
            raise AttributeError(name)
        try:
            return self._segment_value(name)
        except KeyError:
            raise AttributeError(name) from None


def _as_int(name: str, value, allow_none: bool = False):
    """``value`` as a Python int: ints, integral numpy/torch scalars (0-d arrays and tensors
    included) and integral floats such as ``np.ceil(T / S)``.

    Raises:
        TypeError: a bool, a non-number, or None when ``allow_none`` is False.
        ValueError: a number that is not integral (``2.5``, ``nan``, ``inf``).
    """
    if value is None and allow_none:
        return None
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if isinstance(value, numbers.Integral):
        return int(value)
    if not float(value).is_integer():
        raise ValueError(f"{name} must be an integer, got the non-integral value {value!r}")
    return int(value)


def check_labels_mask(labels_mask) -> None:
    """``labels_mask`` is None or a bool tensor (TypeError otherwise): the official wrappers index the
    logits with it, so an integer 0/1 mask there gathers rows 0 and 1 instead of selecting positions."""
    if labels_mask is not None and not (isinstance(labels_mask, torch.Tensor) and labels_mask.dtype == torch.bool):
        got = labels_mask.dtype if isinstance(labels_mask, torch.Tensor) else type(labels_mask).__name__
        raise TypeError(
            f"labels_mask must be a bool tensor, got {got}: pass labels_mask.bool(). (The official "
            "wrapper indexes the logits with an integer mask, gathering rows 0 and 1, which is not "
            "a mask; this drop-in refuses it rather than differ silently.)"
        )


IGNORE_INDEX = -100  # F.cross_entropy's default, which the official loss relies on too


def shifted_loss(logits: torch.Tensor, labels: Optional[torch.Tensor], labels_mask: Optional[torch.Tensor]):
    """The official wrappers' loss: ``cross_entropy(logits[:, :-1], labels[:, 1:])`` over the positions
    ``labels_mask[:, :-1]`` keeps (all without a mask); 0 without labels.

    Computed without the copies of the logits that the official slicing costs (``logits[:, :-1]`` then
    ``reshape``, and a zero-filled ``[B, T, V]`` gradient for the slice): the labels are shifted
    instead, and the last position and the positions the mask drops get ``-100``, which
    ``cross_entropy`` ignores (as it ignores ``-100`` labels in the official loss). The mean runs over
    the same positions, so the value is the official one up to the order of the sum."""
    if labels is None:
        return 0
    shifted = labels.new_full(labels.shape, IGNORE_INDEX)
    shifted[..., :-1] = labels[..., 1:]
    if labels_mask is not None:
        shifted[..., :-1].masked_fill_(~labels_mask[..., :-1], IGNORE_INDEX)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)


def _takes_logits_to_keep(model) -> bool:
    """Whether ``model``'s forward (under PEFT: the wrapped model's) takes ``logits_to_keep`` (an int:
    logits of the last rows only), as the causal LMs of ``transformers`` >= 4.50 do. A model that
    ignored it would still be read right: the driver takes N-row logits as well as N - R."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return _forward_takes_logits_to_keep(type(inner))


@functools.lru_cache(maxsize=None)
def _forward_takes_logits_to_keep(cls) -> bool:
    forward = getattr(cls, "forward", None)
    try:
        return forward is not None and "logits_to_keep" in inspect.signature(forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        return False


def _plain_embedding(module) -> bool:
    """Whether ``module(ids)`` is exactly ``module.weight[ids]`` (gradient included), so the fused
    gather-and-pack can replace it."""
    return (
        type(module) is torch.nn.Embedding
        and module.padding_idx is None
        and module.max_norm is None
        and not module.scale_grad_by_freq
        and not module.sparse
    )


class MemoryCell(torch.nn.Module):
    """One RMT segment step around a Hugging Face causal LM, with a learned memory.

    The next memory is the last hidden state after the final norm, read as the input of the model's
    output embeddings (``get_output_embeddings()``, the LM head), so the same code serves GPT-2,
    GPT-NeoX, Llama and the like, bare or wrapped by PEFT (``get_peft_model``, LoRA). A model without
    output embeddings is asked for every layer's hidden states instead and the last one is used.

    Args:
        base_model: a ``transformers`` causal LM (``get_input_embeddings``, ``.logits`` output,
            ``generate``), or a PEFT model around one. Stored as ``self.model``.
        num_mem_tokens: M >= 1, memory rows (read block and write block); an integer (integral numpy
            and torch scalars and integral floats are accepted).
        attn_implementation: the attention implementation ``base_model`` is switched to, in place
            (the object passed in is changed, also for other code that holds it). ``"auto"`` (default):
            ``"rmt_kernels"`` (registered on the fly), with a one-time ``UserWarning`` saying that the
            base model was switched; a name: that implementation, switched without a warning; None:
            leave the base model as it is (the memory layout is then used only if it already runs
            ``"rmt_kernels"``).

    Attributes:
        memory: ``Parameter [M, d]``, ``randn * std(input embedding weight)``.

    Raises:
        TypeError: ``num_mem_tokens`` not an integer; a backbone without input embeddings.
        ValueError: ``num_mem_tokens < 1`` or not integral.

    Example::

        >>> cell = MemoryCell(GPT2LMHeadModel(GPT2Config(n_layer=2)), num_mem_tokens=4)
        >>> out, memory = cell(torch.randint(0, 100, (2, 16)))
        >>> out.logits.shape, memory.shape
        (torch.Size([2, 16, 50257]), torch.Size([2, 4, 768]))
    """

    def __init__(self, base_model, num_mem_tokens: int, attn_implementation: Optional[str] = _AUTO):
        super().__init__()
        num_mem_tokens = _as_int("num_mem_tokens", num_mem_tokens)
        if num_mem_tokens < 1:
            raise ValueError(
                f"num_mem_tokens must be >= 1 (a memory of 0 tokens has no recurrence), got {num_mem_tokens}"
            )
        if not hasattr(base_model, "get_input_embeddings"):
            raise TypeError(f"base_model must be a transformers model, got {type(base_model).__name__}")
        self.model = base_model
        self.create_memory(num_mem_tokens)
        hf.switch_attention(base_model, attn_implementation, "MemoryCell")

    def create_memory(self, num_mem_tokens: int) -> None:
        """Create ``self.memory`` exactly as the original (same shape, init and RNG use)."""
        self.num_mem_tokens = num_mem_tokens
        embeddings = self.model.get_input_embeddings()
        config = self.model.config
        memory_dim = getattr(config, "n_embd", None) or config.hidden_size
        memory_weights = torch.randn((num_mem_tokens, memory_dim)) * embeddings.weight.data.std()
        self.register_parameter("memory", torch.nn.Parameter(memory_weights, requires_grad=True))
        self.read_memory_position = range(num_mem_tokens)
        self.write_memory_position = range(-num_mem_tokens, 0)

    @property
    def layout(self) -> MemoryLayout:
        """The packed layout: ``causal`` with ``R = W = M`` (the official wrapper's attention)."""
        return MemoryLayout(self.num_mem_tokens, self.num_mem_tokens, mask="causal")

    def set_memory(self, input_shape) -> torch.Tensor:
        """The initial memory repeated over the batch, ``[B, M, d]``."""
        return self.memory.repeat(input_shape[0], 1, 1)

    # ------------------------------------------------------------------ backbone step

    def _step(self, attention_mask: Optional[torch.Tensor]):
        """The driver's backbone step: HF forward on the packed embeddings, last hidden state kept."""
        head = self.model.get_output_embeddings() if hasattr(self.model, "get_output_embeddings") else None
        uses_kernels = hf.uses_rmt_kernels(self.model)
        skip_read_rows = _takes_logits_to_keep(self.model)

        def step(packed: torch.Tensor, info) -> StepOutput:
            mask = None
            if attention_mask is not None:
                r = info.layout.num_read
                mask = torch.ones(packed.shape[:2], dtype=torch.int64, device=attention_mask.device)
                mask[:, r : r + info.segment_len] = attention_mask[:, info.start : info.end]
            kwargs = {"rmt_layout": info.layout} if uses_kernels else {}
            r, n = info.layout.num_read, packed.shape[1]
            # The last hidden state is what the LM head reads (a hook on its input), so the model is
            # not asked for every layer's hidden states unless the caller wants them.
            all_layers = info.output_hidden_states or head is None
            if all_layers and skip_read_rows and r:
                # No hook: the model's head reads rows [R, N) only (nobody reads the read-memory rows'
                # logits, which the original computes and drops).
                kwargs["logits_to_keep"] = n - r
            captured = []

            def head_input(_module, args, kw):
                x = args[0] if args else next(iter(kw.values()), None)
                captured.append(x)
                if args and isinstance(x, torch.Tensor) and x.dim() == 3 and x.shape[1] == n:
                    # Only the segment's rows need logits (the original computes every row's and drops
                    # the memory rows'): the head gets those, the W rows (the next memory) are read from
                    # its captured input.
                    return (x[:, r : r + info.segment_len], *args[1:]), kw
                return None

            hook = None if all_layers else head.register_forward_pre_hook(head_input, with_kwargs=True)
            try:
                out = self.model(
                    inputs_embeds=packed,
                    attention_mask=mask,
                    output_hidden_states=all_layers,
                    use_cache=False,
                    **kwargs,
                )
            finally:
                if hook is not None:
                    hook.remove()
            logits = getattr(out, "logits", None)
            if logits is None:
                raise TypeError(f"{type(self.model).__name__} returned no logits: MemoryCell needs a causal LM")
            if all_layers:
                layers = out.hidden_states if info.output_hidden_states else None
                return StepOutput(out.hidden_states[-1], logits, layers)  # logits: N or N - R rows
            if len(captured) != 1 or not isinstance(captured[0], torch.Tensor):
                raise RuntimeError(
                    f"MemoryCell reads the last hidden state as the input of {type(self.model).__name__}'s "
                    f"output embeddings, which were called {len(captured)} times in one forward (expected once)"
                )
            return StepOutput(captured[0], logits)

        return step

    def run_segments(self, driver: SegmentDriver, memory_state, input_ids, inputs_embeds, attention_mask,
                     output_hidden_states: bool, bounds=None):
        """Run ``driver`` with this cell's backbone; ids go through the fused gather when the input
        embedding is a plain ``nn.Embedding``."""
        memory = self.memory if memory_state is None else memory_state
        embedding = self.model.get_input_embeddings()
        if inputs_embeds is None and _plain_embedding(embedding):
            source = {"input_ids": input_ids, "embedding_weight": embedding.weight}
        else:
            source = {"inputs_embeds": embedding(input_ids) if inputs_embeds is None else inputs_embeds}
        return driver.run(
            self._step(attention_mask),
            memory,
            bounds=bounds,
            output_hidden_states=output_hidden_states,
            **source,
        )

    def forward(self, input_ids=None, memory_state=None, inputs_embeds=None, attention_mask=None,
                output_hidden_states=None, output_attentions=None, **kwargs):
        """One segment: ``(out, new_memory_state)`` like the original ``MemoryCell.forward``.

        Args:
            input_ids: ``[B, S]`` token ids (or ``inputs_embeds [B, S, d]``).
            memory_state: ``[B, M, d]`` memory, default the learned one.
            attention_mask: ``[B, S]`` 0/1 (or bool) padding mask of the segment tokens.
            output_hidden_states: also return every layer's hidden states (memory rows removed).

        Returns:
            ``(CausalLMOutputWithCrossAttentions(logits [B, S, V], hidden_states?), memory [B, M, d])``.
        """
        if kwargs:
            raise TypeError(f"MemoryCell.forward got unexpected arguments {sorted(kwargs)}")
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("pass input_ids or inputs_embeds")
        seq = tokens.shape[1]
        driver = SegmentDriver(self.layout, max(seq, 1))
        res = self.run_segments(driver, memory_state, input_ids, inputs_embeds, attention_mask,
                                bool(output_hidden_states), bounds=[(0, seq)])
        out = CausalLMOutputWithCrossAttentions(logits=res.outputs)
        if output_hidden_states:
            out["hidden_states"] = list(res.hidden_states)
        return out, res.memory

    def generate(self, input_ids, memory_state, attention_mask=None, **generate_kwargs):
        """``base_model.generate`` from ``[memory | segment embeddings]`` (no write block).

        Returns what ``generate`` returns for ``inputs_embeds`` (the new tokens only).
        """
        if memory_state is None:
            memory_state = self.set_memory(input_ids.shape)
        embeds = torch.cat([memory_state, self.model.get_input_embeddings()(input_ids)], dim=1)
        mask = None
        if attention_mask is not None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.int64, device=attention_mask.device)
            mask[:, self.num_mem_tokens :] = attention_mask
        return self.model.generate(inputs_embeds=embeds, attention_mask=mask, **generate_kwargs)


class RecurrentWrapper(torch.nn.Module):
    """Runs a :class:`MemoryCell` over a long sequence, segment by segment (official API).

    Args:
        memory_cell: the :class:`MemoryCell`.
        segment_size: tokens per segment (>= 1).
        max_n_segments: used by the ``k2`` rule only (it does not limit the number of segments).
        segment_alignment: None/"left" (default), "right" or "center".
        k2: gradient truncation (-1 or None: full backpropagation through time).
        rmt_kwargs: other options the original accepts and stores in ``rmt_config`` (ignored here).

    ``segment_size``, ``max_n_segments`` and ``k2`` are integers; integral numpy and torch scalars
    and integral floats (``np.ceil(T / S)``, as the BABILong scripts pass) are accepted and stored as
    ``int``.

    Raises:
        TypeError / ValueError: bad sizes or alignment, a non-integral size, ``k2`` without
            ``max_n_segments``.

    Example::

        >>> model = RecurrentWrapper(MemoryCell(gpt2, 4), segment_size=16, max_n_segments=4)
        >>> out = model(input_ids, labels=input_ids, attention_mask=mask)
        >>> out.loss.backward()
    """

    def __init__(self, memory_cell: MemoryCell, segment_size: int = None, max_n_segments: int = None,
                 segment_alignment: Optional[str] = None, k2: Optional[int] = -1, **rmt_kwargs):
        super().__init__()
        if not isinstance(memory_cell, MemoryCell):
            raise TypeError(f"memory_cell must be a rmt_kernels MemoryCell, got {type(memory_cell).__name__}")
        self.memory_cell = memory_cell
        if segment_size is None:
            raise ValueError("segment_size is required: the tokens per segment, an integer >= 1")
        segment_size = _as_int("segment_size", segment_size)
        max_n_segments = _as_int("max_n_segments", max_n_segments, allow_none=True)
        k2 = _as_int("k2", k2, allow_none=True)
        self.rmt_config = dict(segment_size=segment_size, max_n_segments=max_n_segments,
                               segment_alignment=segment_alignment, k2=k2, **rmt_kwargs)
        self.driver = SegmentDriver(memory_cell.layout, segment_size, max_n_segments=max_n_segments, k2=k2,
                                    segment_alignment=segment_alignment)

    def forward(self, input_ids=None, labels=None, labels_mask=None, inputs_embeds=None, attention_mask=None,
                output_attentions=None, output_hidden_states=None):
        """Loss and logits over all segments.

        Args:
            input_ids: ``[B, T]`` token ids (or ``inputs_embeds [B, T, d]``; the original needs both).
            labels: ``[B, T]``; the loss is ``cross_entropy(logits[:, :-1], labels[:, 1:])`` (mean,
                ``-100`` ignored).
            labels_mask: bool ``[B, T]``: only positions ``t`` with ``labels_mask[:, t]`` (``t < T - 1``)
                predict ``labels[:, t + 1]``. Any other dtype raises ``TypeError``: the official
                wrapper indexes the logits with the mask, so there an integer 0/1 mask gathers rows 0
                and 1 instead of selecting positions, and a different loss would be silent.
            attention_mask: ``[B, T]`` 0/1 or bool padding mask.
            output_attentions: accepted; nothing is returned for it (as the original).
            output_hidden_states: also return every layer's hidden states.

        Returns:
            :class:`RecurrentLMOutput` with ``loss``, ``logits [B, T, V]``, ``segment_bounds``,
            ``segment_logits`` (also read as ``out["logits_{i}"]``) and, when asked, ``hidden_states``
            / ``segment_hidden_states`` (``out["hidden_states_{i}"]``).

        Raises:
            ValueError: neither ``input_ids`` nor ``inputs_embeds``; shapes that do not match.
            TypeError: ``labels_mask`` is not a bool tensor.
        """
        cell = self.memory_cell
        if input_ids is None and inputs_embeds is None:
            raise ValueError("pass input_ids or inputs_embeds")
        check_labels_mask(labels_mask)
        res = cell.run_segments(self.driver, None, input_ids, inputs_embeds, attention_mask,
                                bool(output_hidden_states))
        logits = res.outputs
        out = RecurrentLMOutput()
        out["loss"] = shifted_loss(logits, labels, labels_mask)
        out["logits"] = logits
        if output_hidden_states:
            out["hidden_states"] = res.hidden_states
        out["segment_bounds"] = tuple((a, b) for a, b in res.bounds)
        return out

    def generate(self, input_ids, attention_mask=None, **generate_kwargs):
        """Build the memory on all but the last segment, then generate from ``[memory | last segment]``.

        Args:
            input_ids: ``[B, T]`` prompt.
            attention_mask: ``[B, T]`` padding mask of the prompt.
            generate_kwargs: passed to the backbone's ``generate`` (e.g. ``max_new_tokens``).

        Returns:
            The generated token ids (new tokens only, as ``generate`` gives for ``inputs_embeds``).
        """
        cell = self.memory_cell
        bounds = self.driver.segment_bounds(input_ids.shape[1])
        memory = None
        if len(bounds) > 1:
            with torch.no_grad():
                memory = cell.run_segments(self.driver, None, input_ids, None, attention_mask, False,
                                           bounds=bounds[:-1]).memory
        a, b = bounds[-1]
        last_mask = None if attention_mask is None else attention_mask[:, a:b]
        return cell.generate(input_ids[:, a:b], memory, attention_mask=last_mask, **generate_kwargs)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
        """Layer-level activation checkpointing of the backbone (``transformers``' own; its
        ``activation_checkpointing_enable`` where it exists, ``gradient_checkpointing_enable`` before).

        Example::

            >>> model.gradient_checkpointing_enable({"use_reentrant": False})
        """
        model = self.memory_cell.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        """Undo :meth:`gradient_checkpointing_enable`."""
        model = self.memory_cell.model
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
