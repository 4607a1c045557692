"""Streamed truncated BPTT: the backward calls of ``SegmentDriver.run(loss_fn=...)`` and their
gradient synchronisation under data parallelism.

A streamed run calls ``backward`` once per graph: a graph closes where ``k2`` detaches the memory, and
at the last segment. Data-parallel engines synchronise gradients in every backward they are told to,
and expect every parameter of the module to receive its gradient in the backward that synchronises
(SPEC §8: once per optimiser step). So the driver arranges the run like this:

- the segments before the last graph run, forward and backward, inside the engine's "no sync"
  context (:func:`no_sync_context`: ``DistributedDataParallel.no_sync()``, FSDP2's
  ``set_requires_gradient_sync(False)``); their gradients accumulate locally;
- the inputs they read that the last graph does not (the initial memory, used by segment 0 only) and
  the non-leaf inputs (whose graph the first backward would free) are read there through detached
  leaves (proxies); the last graph reads the inputs themselves;
- the last backward is one ``torch.autograd.backward`` call over the last graph's loss and the
  proxies' accumulated gradients pushed into the inputs: every parameter the run used receives its
  gradient in that one backward, exactly once, and the engine synchronises everything there.

Gradients equal ``sum(loss_fn(...)).backward()`` over the whole run.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager, List, Optional, Tuple

import torch
from torch import Tensor

NoSync = Callable[[], ContextManager]


def no_sync_context(engine) -> Optional[NoSync]:
    """The zero-argument callable that opens ``engine``'s "do not synchronise gradients" context.

    Args:
        engine: None; a ``DistributedDataParallel`` (or any module with ``no_sync()``, e.g. FSDP1):
            its ``no_sync``; an FSDP2 module (``fully_shard``, with ``set_requires_gradient_sync``):
            a context that turns gradient sync off on entry and back on at exit (it does not restore
            a previous ``False``: run the early part of a gradient accumulation outside the driver's
            sync handling, or pass a callable); or a zero-argument callable returning a context
            manager, returned as it is.

    Raises:
        TypeError: anything else.

    Example::

        >>> ctx = no_sync_context(ddp_model)       # ddp_model.no_sync
        >>> with ctx():
        ...     loss.backward()                     # gradients accumulate locally
    """
    if engine is None:
        return None
    if isinstance(engine, torch.nn.Module):
        if callable(getattr(engine, "no_sync", None)):
            return engine.no_sync
        if callable(getattr(engine, "set_requires_gradient_sync", None)):
            return lambda: _gradient_sync_off(engine)
        raise TypeError(
            f"no_sync: {type(engine).__name__} is neither a DistributedDataParallel (no_sync) nor an FSDP2 "
            "module (set_requires_gradient_sync); pass the wrapped module or a callable returning a context"
        )
    if callable(engine):
        return engine
    raise TypeError(
        f"no_sync must be a DDP/FSDP2 module or a callable returning a context, got {type(engine).__name__}"
    )


def resolve_no_sync(no_sync, step, checkpoint: bool) -> Optional[NoSync]:
    """The ``no_sync=`` of a streamed ``SegmentDriver.run``: the given engine, else ``step`` itself
    when it is a DDP or FSDP2 module; as a context factory (:func:`no_sync_context`).

    A ``step`` that is a DDP module with ``find_unused_parameters=True`` is not taken by default: DDP
    then synchronises every backward of the run (correct, one all-reduce per graph), as it would
    without this argument.

    Raises:
        ValueError: a DDP engine given with ``find_unused_parameters=True`` (it would find the initial
            memory, read outside its forward by the driver's pack, unused in the last graph and mark it
            ready, then see its gradient arrive in that same backward), or with the driver's
            ``checkpoint`` (which re-runs ``step`` in the backward, where a DDP forward may not run).
    """
    if no_sync is None and isinstance(step, torch.nn.Module):
        if hasattr(step, "no_sync") or hasattr(step, "set_requires_gradient_sync"):
            no_sync = step
            if getattr(step, "find_unused_parameters", False) and not checkpoint:
                return None
    if isinstance(no_sync, torch.nn.parallel.DistributedDataParallel):
        if no_sync.find_unused_parameters:
            raise ValueError(
                "a streamed run under DDP needs find_unused_parameters=False: the run gives every parameter it "
                "uses its gradient in the last backward (the memory included, which DDP's search would find "
                "unused); freeze the parameters that are really unused (requires_grad_(False))"
            )
        if checkpoint:
            raise ValueError(
                "checkpoint=True re-runs step in the backward, and a DistributedDataParallel forward may not "
                "run there: checkpoint inside the wrapped module (non-reentrant activation checkpointing)"
            )
    return no_sync_context(no_sync)


@contextlib.contextmanager
def fsdp2_unsharded(module):
    """FSDP2: the root module's own parameters unsharded for a whole streamed run.

    The driver reads the initial memory and the embedding weight outside the module's forward (it
    packs them before calling ``step``), and FSDP2 reshards a module's parameters after each backward.
    Inside this context the root's parameters are unsharded (``module.unshard()``) and stay so across
    the run's backward calls (``set_reshard_after_backward(False, recurse=False)``); at exit they are
    resharded. Their gradients are reduce-scattered by the run's last backward as usual.

    Example::

        >>> with fsdp2_unsharded(model):                # model = fully_shard(module)
        ...     driver.run(model, model.memory, input_ids=ids, embedding_weight=model.emb.weight,
        ...                loss_fn=loss_fn, no_sync=model)
    """
    module.unshard()
    module.set_reshard_after_backward(False, recurse=False)
    try:
        yield module
    finally:
        module.set_reshard_after_backward(True, recurse=False)
        module.reshard()


@contextlib.contextmanager
def _gradient_sync_off(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


class StreamedLoss:
    """``loss_fn`` values of the segments; when streaming (grad mode on), the backward runs each time
    the graph closes, so saved activations do not grow with the number of segments.

    Args:
        streaming: grad mode is on and a ``loss_fn`` is given.
        final_start: index of the first segment of the last graph (0: one graph, one backward).
        no_sync: the context of the segments before ``final_start`` (see :func:`no_sync_context`).
    """

    def __init__(self, streaming: bool, final_start: int, no_sync: Optional[NoSync] = None):
        self.streaming = streaming
        self.final_start = final_start if streaming else 0
        self.no_sync = no_sync if self.final_start > 0 else None
        self.total: Optional[Tensor] = None
        self.pending: Optional[Tensor] = None
        self.proxies: List[Tuple[Tensor, Tensor]] = []

    def early(self, t: Optional[Tensor], only_first: bool = False) -> Optional[Tensor]:
        """What the segments before the last graph read instead of ``t``: a detached leaf when ``t``
        requires grad and is not a leaf (its graph would be freed by the first backward) or, with a
        ``no_sync`` engine, is read by the first segment only (``only_first``: so that its gradient
        arrives in the last, synchronised backward); ``t`` itself otherwise."""
        if self.final_start == 0 or t is None or not t.requires_grad:
            return t
        if t.grad_fn is None and not (only_first and self.no_sync is not None):
            return t
        p = t.detach().requires_grad_()
        self.proxies.append((t, p))
        return p

    def region(self, index: int) -> ContextManager:
        """The context segment ``index`` runs in (forward and, when its graph closes, backward)."""
        if self.no_sync is not None and index < self.final_start:
            return self.no_sync()
        return contextlib.nullcontext()

    def add(self, seg_loss, main: Tensor, hs, closes: bool, last: bool):
        """Add one segment's loss; ``closes``: the graph ends here (the memory is detached, or ``last``:
        the last segment). Returns the segment's outputs, detached when the backward ran."""
        if not isinstance(seg_loss, Tensor) or seg_loss.numel() != 1:
            raise ValueError("loss_fn must return a scalar tensor")
        self.pending = seg_loss if self.pending is None else self.pending + seg_loss
        if closes or last or not self.streaming:
            if self.streaming:
                self._backward(self.pending, last)
            done = self.pending.detach()
            self.total = done if self.total is None else self.total + done
            self.pending = None
        if self.streaming:
            main = main.detach()
            hs = None if hs is None else tuple(h.detach() for h in hs)
        return main, hs

    def _backward(self, loss: Tensor, last: bool) -> None:
        """One backward; the last one also pushes the proxies' gradients into their inputs."""
        outputs, grads = ([loss], [None]) if loss.requires_grad else ([], [])
        if last:
            for t, p in self.proxies:
                if p.grad is not None:
                    outputs.append(t)
                    grads.append(p.grad)
            self.proxies = []
        if outputs:
            torch.autograd.backward(outputs, grads)

    def finish(self) -> Optional[Tensor]:
        """The summed loss (detached) or None."""
        return self.total
