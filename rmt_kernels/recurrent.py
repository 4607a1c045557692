"""The multi-segment RMT driver: segmentation, memory handoff, gradient truncation, packed buffers.

One :class:`SegmentDriver` runs a backbone over a long sequence one segment at a time, with the
official RMT wrapper's semantics (booydar/recurrent-memory-transformer, ``babilong-release``; SPEC §3):

- **segmentation** (:func:`segment_bounds`): ``"left"`` (default) cuts segments of ``segment_size``
  from the start, the last one shorter; ``"right"`` from the end, the first one shorter;
  ``"center"`` is ``torch.chunk(x, ceil(T / segment_size), dim=1)``;
- **handoff**: segment ``i`` is packed as ``[memory | segment tokens | memory]`` (the same memory
  tensor feeds the R and the W block; R = W = M), or ``[memory | tokens | write_memory]`` with a fixed
  write input. The next memory is the W rows of the backbone's last hidden state (after its final
  norm), with no projection;
- **truncation** (:func:`memory_detached`): the memory produced by segment ``i`` is detached iff
  ``i >= 1 and k2 not in (-1, None) and i + k2 <= max_n_segments``.

The backbone is a callable ``step(packed_embeds, info)``: ``packed_embeds`` is ``[B, N, d]``
(``N = R + S + W``) and ``info`` a :class:`SegmentInfo` with the :class:`MemoryLayout` and the padding
(``segment_lengths``) that ``segment_attention`` takes. It returns the last hidden state ``[B, N, d]``,
a ``(hidden, logits)`` pair, or a :class:`StepOutput` (which may also carry every layer's hidden
states when ``info.output_hidden_states`` asks for them).

Buffers: the packed input of a segment is built by one fused kernel (``pack_segment`` or, from token
ids, ``pack_segment_from_ids``). While autograd records nothing (``torch.no_grad()``, or no input and
no parameter requiring grad), one buffer sized for the longest segment is allocated once and every
segment is packed into it. As soon as a step records a graph (its outputs require grad), the graph
may have saved the buffer, so every later segment gets a fresh one: overwriting a saved buffer would
corrupt the backward (autograd's version counter would catch it and raise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .layout import MemoryLayout, as_int
from . import _checks
from .ops.pack_segment.interface import pack_validated
from .ops.pack_segment.interface import resolve_backend as resolve_pack_backend
from .streamed import StreamedLoss, resolve_no_sync

ALIGNMENTS = (None, "left", "right", "center")

Bounds = List[Tuple[int, int]]


# --------------------------------------------------------------------------- rules


def segment_bounds(seq_len: int, segment_size: int, alignment: Optional[str] = None) -> Bounds:
    """Token ranges ``[(start, end), ...]`` of the segments of a length-``seq_len`` sequence.

    Exactly the official wrapper's ``split_tensor``: ``None``/``"left"``: starts ``0, s, 2s, ...``,
    the last segment shorter; ``"right"``: ends ``T, T - s, ...``, the first segment shorter;
    ``"center"``: ``torch.chunk`` into ``ceil(T / s)`` chunks (chunks of ``ceil(T / n)`` tokens, the
    last one shorter; torch.chunk may return fewer chunks than asked, and so does this).

    Raises:
        TypeError / ValueError: non-int or negative ``seq_len``, ``segment_size < 1``, unknown
            ``alignment``.

    Example::

        >>> segment_bounds(10, 4)
        [(0, 4), (4, 8), (8, 10)]
        >>> segment_bounds(10, 4, "right")
        [(0, 2), (2, 6), (6, 10)]
        >>> segment_bounds(10, 4, "center")
        [(0, 4), (4, 8), (8, 10)]
    """
    for name, value, low in (("seq_len", seq_len, 0), ("segment_size", segment_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if alignment not in ALIGNMENTS:
        raise ValueError(f"segment_alignment must be one of {ALIGNMENTS}, got {alignment!r}")
    if alignment in (None, "left"):
        edges = list(range(0, seq_len, segment_size)) + [seq_len]
    elif alignment == "right":
        edges = (list(range(seq_len, 0, -segment_size)) + [0])[::-1]
    else:
        if seq_len == 0:
            return []
        chunk = math.ceil(seq_len / math.ceil(seq_len / segment_size))
        edges = list(range(0, seq_len, chunk)) + [seq_len]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:])]


def memory_detached(index: int, k2: Optional[int], max_n_segments: Optional[int]) -> bool:
    """Whether the memory produced by segment ``index`` (0-based) is detached (SPEC §3):
    ``index >= 1 and k2 not in (-1, None) and index + k2 <= max_n_segments``.

    The 0 -> 1 hop is never detached. ``max_n_segments`` is required when the rule can detach.

    Example::

        >>> [memory_detached(i, 1, 4) for i in range(5)]
        [False, True, True, True, False]
    """
    if index < 1 or k2 in (-1, None):
        return False
    if max_n_segments is None:
        raise ValueError(f"k2={k2} needs max_n_segments (the truncation rule is i + k2 <= max_n_segments)")
    return index + k2 <= max_n_segments


# --------------------------------------------------------------------------- step protocol


@dataclass(frozen=True)
class SegmentInfo:
    """What a backbone ``step`` needs to attend one packed segment.

    Attributes:
        layout: the :class:`MemoryLayout` (R, W, mask family) to pass to ``segment_attention``.
        batch: B.
        index: 0-based segment index; ``num_segments`` in this run.
        start, end: the segment's token range in the full sequence (``S = end - start``).
        segment_lengths: int64 ``[B]`` on the inputs' device, valid segment tokens per batch row (right
            padding), or None when every row is complete. Pass it to ``segment_attention``.
        segment_lengths_list: the same as Python ints (or None), for host-side logic.
        output_hidden_states: whether the driver wants every layer's hidden states from this step.
    """

    layout: MemoryLayout
    batch: int
    index: int
    num_segments: int
    start: int
    end: int
    segment_lengths: Optional[Tensor]
    segment_lengths_list: Optional[Tuple[int, ...]]
    output_hidden_states: bool = False

    @property
    def segment_len(self) -> int:
        """S, tokens of this segment (padding included)."""
        return self.end - self.start

    @property
    def seq_len(self) -> int:
        """N = R + S + W, rows of the packed input."""
        return self.layout.seq_len(self.segment_len)

    def packed_attention_mask(self, device=None, dtype: torch.dtype = torch.long) -> Tensor:
        """``[B, N]`` key mask in Hugging Face form: 1 for memory rows and valid tokens, 0 for padding
        (what the official wrapper's ``pad_attention_mask`` builds)."""
        r, s, n = self.layout.num_read, self.segment_len, self.seq_len
        if device is None:
            device = self.segment_lengths.device if self.segment_lengths is not None else "cpu"
        j = torch.arange(n, device=device)
        if self.segment_lengths is None:
            return torch.ones(self.batch, n, dtype=dtype, device=device)
        lengths = self.segment_lengths.to(device)[:, None]
        return ((j[None, :] < r + lengths) | (j[None, :] >= r + s)).to(dtype)


class StepOutput(NamedTuple):
    """What a backbone step may return (a bare tensor means ``StepOutput(hidden)``).

    hidden: ``[B, N, d]`` last hidden state after the final norm; its W rows become the next memory.
    logits: ``[B, N, V]`` or None; when given, the driver returns the segment rows of the logits,
        otherwise the segment rows of ``hidden``.
    hidden_states: every layer's ``[B, N, d]`` hidden states, only needed when
        ``info.output_hidden_states`` is True.

    ``hidden`` and ``logits`` may each also hold only the rows ``[R, N)`` (``N - R`` rows), and
    ``logits`` only the segment's rows ``[R, R + S)``: a step whose LM head skips the memory rows
    (Hugging Face ``logits_to_keep=N - R``) computes no logits that nobody reads.
    """

    hidden: Tensor
    logits: Optional[Tensor] = None
    hidden_states: Optional[Sequence[Tensor]] = None


@dataclass
class RecurrentOutput:
    """Result of :meth:`SegmentDriver.run`.

    outputs: ``[B, T', V]`` (logits) or ``[B, T', d]`` (hidden, when the step gives no logits): the
        segment rows of every segment, concatenated (``T'`` = tokens covered by the bounds); None with
        ``return_outputs=False``. Detached when ``loss_fn`` ran the backward.
    memory: ``[B, M, d]`` memory produced by the last segment (after the truncation rule; detached
        when ``loss_fn`` ran the backward).
    hidden_states: with ``output_hidden_states``: one ``[B, T', d]`` tensor per layer, segment rows
        concatenated; else None.
    loss: with ``loss_fn``: the sum of its per-segment values, detached; else None.
    bounds: the segments' token ranges.
    """

    outputs: Optional[Tensor]
    memory: Tensor
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    loss: Optional[Tensor] = None
    bounds: Bounds = field(default_factory=list)


StepFn = Callable[[Tensor, SegmentInfo], Union[Tensor, Tuple[Tensor, Tensor], StepOutput]]
LossFn = Callable[[Tensor, SegmentInfo], Tensor]


# --------------------------------------------------------------------------- helpers


def _as_step_output(result, info: SegmentInfo, dim: int) -> StepOutput:
    if isinstance(result, StepOutput):
        out = result
    elif isinstance(result, Tensor):
        out = StepOutput(result)
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        out = StepOutput(result[0], result[1])
    else:
        raise TypeError(
            f"step must return a Tensor, a (hidden, logits) pair or a StepOutput, got {type(result).__name__}"
        )
    b, n = info.batch, info.seq_len
    rows = (n, n - info.layout.num_read)  # every packed row, or rows [R, N)
    if not isinstance(out.hidden, Tensor) or out.hidden.dim() != 3 or out.hidden.shape[0] != b \
            or out.hidden.shape[1] not in rows or out.hidden.shape[2] != dim:
        shape = tuple(out.hidden.shape) if isinstance(out.hidden, Tensor) else type(out.hidden).__name__
        raise ValueError(
            f"step must return the last hidden state [B, N, d] = [{b}, {n}, {dim}] (or its rows [R, N): "
            f"[{b}, {rows[1]}, {dim}]), got {shape}"
        )
    s = info.segment_len
    if out.logits is not None and (out.logits.dim() != 3 or out.logits.shape[0] != b
                                   or out.logits.shape[1] not in (*rows, s)):
        raise ValueError(
            f"step logits must be [B, N, V] with B={b}, N={n} (or rows [R, N): {rows[1]} rows, or the "
            f"segment's: {s} rows), got {tuple(out.logits.shape)}"
        )
    if info.output_hidden_states:
        if out.hidden_states is None:
            raise ValueError("output_hidden_states=True but step returned no hidden_states (use StepOutput)")
        for k, h in enumerate(out.hidden_states):
            if not isinstance(h, Tensor) or h.dim() != 3 or tuple(h.shape[:2]) != (b, n):
                raise ValueError(f"step hidden_states[{k}] must be [B, N, d] with B={b}, N={n}")
    return out


def _records(*tensors) -> bool:
    """Whether autograd would record an op on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _own(t: Optional[Tensor], buf: Optional[Tensor]) -> Optional[Tensor]:
    """``t``, copied if it aliases the reusable buffer (which the next segment overwrites)."""
    if t is not None and buf is not None and _checks.overlaps(t, buf):
        return t.clone()
    return t


# --------------------------------------------------------------------------- driver


class SegmentDriver:
    """Runs a backbone over a long sequence segment by segment, handing memory over between segments.

    Args:
        layout: :class:`MemoryLayout`. ``num_write`` = M > 0 (the next memory is the W rows);
            ``num_read`` is M (official RMT: the memory is read and rewritten) or 0.
        segment_size: tokens per segment (>= 1).
        max_n_segments: the official wrapper's ``max_n_segments``; used only by the ``k2`` rule (it does
            not limit the number of segments). Required when ``k2`` is not -1/None.
        k2: gradient truncation, see :func:`memory_detached`. -1 or None: full BPTT (default -1).
        segment_alignment: None/"left" (default), "right" or "center" (see :func:`segment_bounds`).
        checkpoint: recompute each segment in the backward (``torch.utils.checkpoint``,
            ``use_reentrant=False``) instead of keeping its activations. Default False.
        backend: backend of the pack kernels (``"auto"``, ``"torch"``, ``"triton"``).

    Raises:
        TypeError / ValueError: a bad layout, sizes, alignment, or ``k2`` without ``max_n_segments``.

    Example::

        >>> layout = MemoryLayout(num_read=2, num_write=2, mask="causal")
        >>> driver = SegmentDriver(layout, segment_size=4)
        >>> step = lambda packed, info: packed * 0.5            # a stand-in backbone
        >>> res = driver.run(step, torch.randn(2, 8), inputs_embeds=torch.randn(3, 10, 8))
        >>> res.outputs.shape, res.memory.shape, res.bounds
        (torch.Size([3, 10, 8]), torch.Size([3, 2, 8]), [(0, 4), (4, 8), (8, 10)])
    """

    def __init__(
        self,
        layout: MemoryLayout,
        segment_size: int,
        *,
        max_n_segments: Optional[int] = None,
        k2: Optional[int] = -1,
        segment_alignment: Optional[str] = None,
        checkpoint: bool = False,
        backend: str = "auto",
    ):
        if not isinstance(layout, MemoryLayout):
            raise TypeError(f"layout must be a rmt_kernels.MemoryLayout, got {type(layout).__name__}")
        if layout.num_write < 1:
            raise ValueError("layout.num_write must be > 0: the next memory is the W rows of the last hidden state")
        if layout.num_read not in (0, layout.num_write):
            raise ValueError(
                f"layout.num_read must be 0 or num_write ({layout.num_write}): the memory of M = num_write "
                f"rows is what the R block reads; got num_read={layout.num_read}"
            )
        segment_size = as_int(segment_size, "segment_size", 1)
        if segment_alignment not in ALIGNMENTS:
            raise ValueError(f"segment_alignment must be one of {ALIGNMENTS}, got {segment_alignment!r}")
        k2 = None if k2 is None else as_int(k2, "k2")
        max_n_segments = None if max_n_segments is None else as_int(max_n_segments, "max_n_segments")
        if k2 not in (-1, None) and max_n_segments is None:
            raise ValueError(f"k2={k2} needs max_n_segments (the truncation rule is i + k2 <= max_n_segments)")
        self.layout = layout
        self.segment_size = segment_size
        self.max_n_segments = max_n_segments
        self.k2 = k2
        self.segment_alignment = segment_alignment
        self.checkpoint = bool(checkpoint)
        self.backend = backend

    @property
    def num_mem_tokens(self) -> int:
        """M, rows of the memory state (= ``layout.num_write``)."""
        return self.layout.num_write

    def segment_bounds(self, seq_len: int) -> Bounds:
        """:func:`segment_bounds` with this driver's size and alignment."""
        return segment_bounds(seq_len, self.segment_size, self.segment_alignment)

    def memory_detached(self, index: int) -> bool:
        """:func:`memory_detached` with this driver's ``k2`` and ``max_n_segments``."""
        return memory_detached(index, self.k2, self.max_n_segments)

    # ------------------------------------------------------------------ run

    def run(
        self,
        step: StepFn,
        memory: Optional[Tensor] = None,
        *,
        input_ids: Optional[Tensor] = None,
        embedding_weight: Optional[Tensor] = None,
        inputs_embeds: Optional[Tensor] = None,
        attention_mask: Optional[Tensor] = None,
        write_memory: Optional[Tensor] = None,
        bounds: Optional[Sequence[Tuple[int, int]]] = None,
        output_hidden_states: bool = False,
        loss_fn: Optional[LossFn] = None,
        return_outputs: bool = True,
        no_sync=None,
    ) -> RecurrentOutput:
        """Run ``step`` over every segment of the sequence.

        Args:
            step: the backbone, ``step(packed_embeds [B, N, d], info: SegmentInfo)`` returning the last
                hidden state ``[B, N, d]``, ``(hidden, logits [B, N, V])`` or a :class:`StepOutput`.
                While no autograd graph is recorded the packed buffer is reused by the next segment:
                the step must not keep it beyond its return (outputs that alias it are copied).
            memory: initial memory ``[M, d]`` (broadcast over the batch, e.g. the learned parameter)
                or ``[B, M, d]``. Required unless ``write_memory`` is given and the layout has no R.
            input_ids: ``[B, T]`` int32/int64 token ids, embedded by ``embedding_weight`` ``[V, d]``
                inside the fused pack; or
            inputs_embeds: ``[B, T, d]`` embeddings (exactly one of the two).
            attention_mask: optional right-padded 0/1 ``[B, T]``; gives ``info.segment_lengths``. A
                segment past a row's end is fully padded: its memory rows still run.
            write_memory: optional fixed W input ``[M, d]`` or ``[B, M, d]`` for every segment (the
                memory state then feeds only the R block). Default: the memory state feeds both.
            bounds: explicit segment ranges (contiguous from 0, may stop before T), e.g. all but the
                last segment of ``segment_bounds(T)`` before generation. Default: ``segment_bounds(T)``.
            output_hidden_states: ask the step for every layer's hidden states (``info``) and return
                their segment rows concatenated. Default False: only the last hidden state is used.
            loss_fn: ``loss_fn(outputs_of_segment [B, S, V or d], info) -> scalar``. Under grad mode
                the driver then runs the backward itself, each time the graph closes (the memory is
                detached by ``k2``, or the last segment): truncated BPTT whose saved activations do
                not grow with the number of segments. Gradients equal those of
                ``sum(loss_fn(...)).backward()`` over the whole run. ``step`` must not close over
                non-leaf tensors that require grad (their graph would be freed by the first backward);
                non-leaf inputs passed here are handled.
            return_outputs: keep and concatenate the per-segment outputs (default True).
            no_sync: with ``loss_fn`` under data parallelism, the engine whose gradient synchronisation
                the backward calls before the last one must skip: the ``DistributedDataParallel`` or
                FSDP2 (``fully_shard``) module that ``step`` calls, or a zero-argument callable
                returning a context manager (:func:`rmt_kernels.streamed.no_sync_context`). Default:
                ``step`` itself when it is such a module. The segments before the last graph then
                run, forward and backward, in that context, and the last backward (the only
                synchronised one) gives every input and parameter the run used its gradient, the
                initial memory included (:mod:`rmt_kernels.streamed`). Under FSDP2 read the memory
                and the embedding inside :func:`rmt_kernels.streamed.fsdp2_unsharded`. With DDP,
                ``find_unused_parameters=True`` and ``checkpoint=True`` are refused
                (:func:`rmt_kernels.streamed.resolve_no_sync` says why).

        Returns:
            :class:`RecurrentOutput`.

        Raises:
            TypeError / ValueError: inconsistent inputs (the message names the argument), a step
                returning wrong shapes, a mask that is not right-padded.
        """
        run = self._prepare(step, memory, input_ids, embedding_weight, inputs_embeds, attention_mask,
                            write_memory, bounds, output_hidden_states, loss_fn, no_sync)
        state = run.first_memory
        outs, layer_outs = [], []
        for i, (t0, t1) in enumerate(run.bounds):
            info = self._segment_info(run, i, t0, t1)
            last = i == len(run.bounds) - 1
            with run.losses.region(i):
                main, hs, new_mem = self._run_segment(run, step, info, state)
                state = self._hand_off(run, i, new_mem, last)
                if loss_fn is not None:
                    main, hs = run.losses.add(loss_fn(main, info), main, hs, self.memory_detached(i), last)
            if return_outputs:
                outs.append(main)
            if hs is not None:
                layer_outs.append(hs)
        return self._finish(run, state, outs, layer_outs, return_outputs)

    # ------------------------------------------------------------------ the steps of a run

    def _prepare(self, step, memory, input_ids, embedding_weight, inputs_embeds, attention_mask, write_memory,
                 bounds, output_hidden_states, loss_fn, no_sync) -> "_Run":
        """Check every argument once, resolve the pack backend, and set up the streamed loss."""
        batch, dim, dtype, device, bounds, lengths = _checks.check_run_inputs(
            self.layout, step, memory, input_ids, embedding_weight, inputs_embeds, attention_mask, write_memory,
            bounds, self.segment_bounds,
        )
        backend = resolve_pack_backend(self.backend, device, dtype, from_ids=input_ids is not None)

        if no_sync is not None and loss_fn is None:
            raise ValueError("no_sync= goes with loss_fn=: only a streamed run calls backward itself")
        no_sync = resolve_no_sync(no_sync, step, self.checkpoint) if loss_fn is not None else None
        final_start = max((i + 1 for i in range(len(bounds) - 1) if self.memory_detached(i)), default=0)
        losses = StreamedLoss(loss_fn is not None and torch.is_grad_enabled(), final_start, no_sync)
        tokens = input_ids if input_ids is not None else inputs_embeds
        early = (losses.early(tokens), losses.early(embedding_weight), losses.early(write_memory))
        seg_lengths = _segment_lengths(bounds, lengths)
        on_device = None
        if any(x is not None for x in seg_lengths):
            # Every segment's lengths in one host-to-device copy per run, not one per segment.
            table = [x if x is not None else [b - a] * batch for x, (a, b) in zip(seg_lengths, bounds)]
            on_device = torch.tensor(table, dtype=torch.int64).to(device)
        return _Run(
            tokens=tokens, weight=embedding_weight, write_memory=write_memory, early=early,
            final_start=losses.final_start, first_memory=losses.early(memory, only_first=True), bounds=bounds,
            segment_lengths=seg_lengths,
            lengths_on_device=on_device, batch=batch, dim=dim, dtype=dtype, device=device, backend=backend,
            hidden_states=bool(output_hidden_states), losses=losses,
            max_rows=max(self.layout.seq_len(b - a) for a, b in bounds),
        )

    def _segment_info(self, run: "_Run", i: int, t0: int, t1: int) -> SegmentInfo:
        """The step's view of segment ``i``: layout, token range and this segment's padding."""
        seg_lengths = run.segment_lengths[i]
        return SegmentInfo(
            layout=self.layout, batch=run.batch, index=i, num_segments=len(run.bounds), start=t0, end=t1,
            segment_lengths=None if seg_lengths is None else run.lengths_on_device[i],
            segment_lengths_list=seg_lengths, output_hidden_states=run.hidden_states,
        )

    def _run_segment(self, run: "_Run", step, info: SegmentInfo, state):
        """Pack segment ``info.index`` (into the reusable buffer while no graph is recorded), run the
        step, and return ``(segment rows of the outputs, per-layer segment rows or None, W rows)``."""
        tokens, weight, write = run.sources(info.index)
        seg = tokens[:, info.start : info.end]
        read = state if self.layout.num_read else None
        write = state if write is None else write
        if self.checkpoint and torch.is_grad_enabled():
            return _checkpoint(self._segment, step, info, seg, weight, read, write, run, None, use_reentrant=False)
        out_buf = run.buffer_for(info, read, write, weight if weight is not None else seg)
        main, hs, new_mem = self._segment(step, info, seg, weight, read, write, run, out_buf)
        if main.requires_grad or new_mem.requires_grad or any(h.requires_grad for h in hs or ()):
            run.retire_buffer()  # the graph may hold the buffer: never write it again
        elif run.buffer is not None:
            main, new_mem = _own(main, run.buffer), _own(new_mem, run.buffer)
            hs = None if hs is None else tuple(_own(h, run.buffer) for h in hs)
        return main, hs, new_mem

    def _segment(self, step, info: SegmentInfo, seg, weight, read, write, run: "_Run", out_buf):
        layout = self.layout
        tied = read is not None and read is write
        packed = pack_validated(seg, weight, layout, read, None if tied else write, tied, out_buf, run.backend)
        res = _as_step_output(step(packed, info), info, run.dim)
        r, s, n = layout.num_read, info.segment_len, packed.shape[1]
        rows = res.logits if res.logits is not None else res.hidden
        first = r if rows.shape[1] == n else 0  # rows [0, N), or from the segment's first ([R, N) or S rows)
        main = rows[:, first : first + s]
        new_mem = res.hidden[:, res.hidden.shape[1] - layout.num_write :]
        hs = tuple(h[:, r : r + s] for h in res.hidden_states) if info.output_hidden_states else None
        return main, hs, new_mem

    def _hand_off(self, run: "_Run", i: int, new_mem: Tensor, last: bool) -> Tensor:
        """The memory the next segment reads: the W rows, detached when the k2 rule says so."""
        if not last and (new_mem.dtype != run.dtype or new_mem.device != run.device):
            raise TypeError(
                f"step returned a last hidden state of dtype {new_mem.dtype} on {new_mem.device}; the memory "
                f"must stay {run.dtype} on {run.device} (the dtype and device of the inputs)"
            )
        return new_mem.detach() if self.memory_detached(i) else new_mem

    def _finish(self, run: "_Run", state, outs, layer_outs, return_outputs: bool) -> RecurrentOutput:
        loss = run.losses.finish()
        if run.losses.streaming:
            state = state.detach()
        hidden_states = None
        if run.hidden_states:
            hidden_states = tuple(torch.cat(layer, dim=1) for layer in zip(*layer_outs))
        return RecurrentOutput(
            outputs=torch.cat(outs, dim=1) if return_outputs else None,
            memory=state,
            hidden_states=hidden_states,
            loss=loss,
            bounds=list(run.bounds),
        )


def _segment_lengths(bounds: Bounds, lengths: Optional[List[int]]) -> List[Optional[tuple]]:
    """Per segment ``(start, end)``: each row's valid tokens in it (a right-padded row of ``lengths``
    valid tokens), or None when the segment is complete in every row."""
    out = []
    for t0, t1 in bounds:
        seg = None
        if lengths is not None:
            seg = tuple(min(max(x - t0, 0), t1 - t0) for x in lengths)
            if all(x == t1 - t0 for x in seg):
                seg = None
        out.append(seg)
    return out


@dataclass
class _Run:
    """One :meth:`SegmentDriver.run`: its checked inputs and the packed buffer it may reuse."""

    tokens: Tensor  # [B, T] ids or [B, T, d] embeddings
    weight: Optional[Tensor]  # [V, d] with ids
    write_memory: Optional[Tensor]
    early: tuple  # (tokens, weight, write_memory) as the segments before the last graph read them
    final_start: int  # first segment of the last graph (streamed loss)
    first_memory: Optional[Tensor]  # the memory segment 0 reads
    bounds: Bounds
    segment_lengths: List[Optional[tuple]]  # per segment: valid tokens per row, None when all valid
    lengths_on_device: Optional[Tensor]  # int64 [segments, B] on the inputs' device
    batch: int
    dim: int
    dtype: torch.dtype
    device: torch.device
    backend: str  # the resolved pack backend
    hidden_states: bool
    losses: StreamedLoss
    max_rows: int
    buffer: Optional[Tensor] = None
    reuse: bool = True

    def sources(self, index: int) -> tuple:
        """``(tokens, embedding weight, write memory)`` as segment ``index`` reads them."""
        return self.early if index < self.final_start else (self.tokens, self.weight, self.write_memory)

    def buffer_for(self, info: SegmentInfo, read, write, source) -> Optional[Tensor]:
        """A ``[B, N, d]`` view of the one buffer sized for the longest segment, while no graph records
        the pack (the state never aliases it: outputs of a step that used it are owned)."""
        if not self.reuse or _records(read, write, source):
            return None
        n = info.seq_len
        if self.buffer is None:
            self.buffer = torch.empty(self.batch * self.max_rows * self.dim, dtype=self.dtype, device=self.device)
        return self.buffer[: self.batch * n * self.dim].view(self.batch, n, self.dim)

    def retire_buffer(self) -> None:
        self.reuse, self.buffer = False, None
