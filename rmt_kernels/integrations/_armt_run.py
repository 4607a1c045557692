"""The per-layer machinery behind :mod:`rmt_kernels.integrations.armt`: the layer wrapper that reads and
writes ARMT's associative memory around one decoder layer, and the run state it reaches.

Where the state lives. The official code keeps ``A``/``z`` as plain tensor attributes of every layer
wrapper, mutated in place across calls (so a forward leaves them on the modules, and replicas on
several devices share them). Here the layer wrappers hold parameters only; the per-layer states of a
run live in a :class:`Run` that the caller makes current with :func:`active` for the duration of one
backbone call (a ``contextvars.ContextVar``, reset in ``finally``). A layer wrapper that finds no
current run of its own (the backbone called directly) is the bare layer. Each thread sees its own
current run, and a checkpointed chunk makes its run current again when autograd recomputes it (in
the backward's thread).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..ops.assoc_memory.interface import assoc_read_validated, assoc_write_validated

LayerState = Optional[Tuple[Tensor, Tensor]]  # (A [B, H, K, d/H], z [B, H, K]) or None before segment 0

_CURRENT: contextvars.ContextVar = contextvars.ContextVar("rmt_kernels_armt_run", default=None)


class AssocConfig(NamedTuple):
    """The variant of the associative memory (SPEC §6), shared by every layer of a cell."""

    num_mem_tokens: int
    n_heads: int
    normalize: bool
    use_denom: bool
    correction: bool
    gating: bool


class Run:
    """The state of one pass over a backbone: per layer ``(A, z)`` (None before the first write),
    whether the layers write (False while generating), and the resolved op backend.

    ``layers`` are the cell's layer wrappers; a wrapper finds its slot by identity, so a run made for
    one cell is invisible to another cell's layers.
    """

    __slots__ = ("cfg", "slots", "states", "write", "backend", "first_input")

    def __init__(self, cfg: AssocConfig, layers, states: List[LayerState], write: bool, backend: str,
                 capture_input: bool = False):
        self.cfg = cfg
        self.slots = {id(layer): i for i, layer in enumerate(layers)}
        self.states = list(states)
        self.write = write
        self.backend = backend
        self.first_input = [] if capture_input else None  # layer 0's input before the read, when asked


@contextlib.contextmanager
def active(run: Run):
    """Make ``run`` the current run of this thread for the block (always reset afterwards)."""
    token = _CURRENT.set(run)
    try:
        yield run
    finally:
        _CURRENT.reset(token)


def detach_states(states: List[LayerState]) -> List[LayerState]:
    return [None if s is None else (s[0].detach(), s[1].detach()) for s in states]


def flatten_states(states: List[LayerState]) -> List[Tensor]:
    """``[A_0, z_0, A_1, z_1, ...]``, or ``[]`` before the first segment (all layers alike)."""
    if states[0] is None:
        return []
    return [t for s in states for t in s]


def unflatten_states(flat, n_layers: int) -> List[LayerState]:
    if not flat:
        return [None] * n_layers
    return [(flat[2 * i], flat[2 * i + 1]) for i in range(n_layers)]


class AssociativeLayerWrapper(torch.nn.Module):
    """One decoder layer with ARMT's associative read before it and write after it.

    Attribute names are the official ``AssociativeLayerWrapper``'s, so state-dict keys match:
    ``W_mq`` (d -> d_mem), ``W_mk`` (d -> d_mem), ``W_mv`` (d -> d, zero-initialised), ``W_mb``
    (d -> H, or d -> d with ``gating``, with bias) and the wrapped ``layer``. The parameters are created
    in the official order (same use of the random generator), then moved to the layer's device and
    dtype.

    Forward (with a current :class:`Run` that knows this wrapper): if the layer has a state, ``x <-
    assoc_read(x, W_mq x, A, z)``; ``out = layer(x, ...)``; if the run writes, the layer output's last
    M rows ``m`` give ``(A, z) <- assoc_write(W_mk m, W_mv m, W_mb m, A, z)``. The layer's output
    (a tensor or a tuple whose first entry is the hidden states) is returned unchanged.
    """

    def __init__(self, layer: torch.nn.Module, d_model: int, d_mem: int, cfg: AssocConfig):
        super().__init__()
        self.cfg = cfg
        self.W_mq = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mk = torch.nn.Linear(d_model, d_mem, bias=False)
        self.W_mv = torch.nn.Linear(d_model, d_model, bias=False)
        self.W_mb = torch.nn.Linear(d_model, d_model if cfg.gating else cfg.n_heads)
        torch.nn.init.zeros_(self.W_mv.weight)
        ref = next(iter(layer.parameters()), None)
        if ref is not None:
            for lin in (self.W_mq, self.W_mk, self.W_mv, self.W_mb):
                lin.to(device=ref.device, dtype=ref.dtype)
        self.layer = layer

    def forward(self, *args, **kwargs):
        run = _CURRENT.get()
        slot = None if run is None else run.slots.get(id(self))
        if slot is None:
            return self.layer(*args, **kwargs)
        cfg = self.cfg
        by_name = not args
        x = kwargs.pop("hidden_states") if by_name else args[0]
        if slot == 0 and run.first_input is not None:
            run.first_input.append(x)
        state = run.states[slot]
        if state is not None:
            x = assoc_read_validated(x, self.W_mq(x), state[0], state[1], cfg.n_heads, cfg.normalize,
                                     cfg.use_denom, run.backend)
        out = self.layer(hidden_states=x, **kwargs) if by_name else self.layer(x, *args[1:], **kwargs)
        if run.write:
            y = out[0] if isinstance(out, tuple) else out
            m = y[:, y.shape[1] - cfg.num_mem_tokens:]
            old_a, old_z = (None, None) if state is None else state
            run.states[slot] = assoc_write_validated(
                self.W_mk(m), self.W_mv(m), self.W_mb(m), old_a, old_z, cfg.n_heads, cfg.normalize,
                cfg.use_denom, cfg.correction, run.backend,
            )
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"num_mem_tokens={c.num_mem_tokens}, n_heads={c.n_heads}, normalize={c.normalize}, "
                f"use_denom={c.use_denom}, correction={c.correction}, gating={c.gating}")
