"""The eager autograd of the custom ops: a pair of ``torch.autograd.Function`` s per op, built from
the custom op's own forward, setup and backward (one formula for every path).

Eager calls skip the ``torch.library`` machinery and apply a Function directly. That Function defines
``forward(ctx, ...)`` and calls the setup itself: torch binds the arguments of a Function that has a
``setup_context`` with ``inspect.signature`` on every call (measured on CPU: an eager pack with
autograd went from 73 to 38 us without it). ``torch.func`` transforms need ``setup_context``, so under
them the twin that has one runs instead (:func:`apply`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .._checks import functorch_active


class EagerFunctions(NamedTuple):
    fast: type  # forward(ctx, ...) calling the setup itself
    functorch: type  # forward + setup_context, for torch.func transforms


def eager_functions(name: str, forward: Callable, setup: Callable, backward: Callable) -> EagerFunctions:
    """The two Functions of an op whose custom op has ``forward(*args)``, ``setup(ctx, inputs, output)``
    and ``backward(ctx, *grads)``."""

    def fast_forward(ctx, *args):
        out = forward(*args)
        setup(ctx, args, out)
        return out

    doc = f"Eager autograd of {name}: the custom op's setup and backward on a direct launch."
    fast = type(name, (torch.autograd.Function,), {
        "__doc__": doc, "forward": staticmethod(fast_forward), "backward": staticmethod(backward)})
    func = type(name + "Func", (torch.autograd.Function,), {
        "__doc__": doc + " (torch.func transforms)", "forward": staticmethod(forward),
        "setup_context": staticmethod(setup), "backward": staticmethod(backward)})
    return EagerFunctions(fast, func)


def apply(functions: EagerFunctions, *args):
    """Apply the fast Function, or its ``setup_context`` twin under a ``torch.func`` transform."""
    return (functions.functorch if functorch_active() else functions.fast).apply(*args)
