"""Plans of the ``torch`` backend of segment attention: how one call is cut into stock attention calls,
and which plan runs.

:meth:`MemoryLayout.blocks` cuts one batch row's mask into rectangles and top-left aligned causal
triangles. In the *composition* each block is one call of a stock attention kernel that returns its
log-sum-exp (``_scaled_dot_product_flash_attention_for_cpu`` on CPU, which reads grouped-query heads
and arbitrary strides without copies; an exact blockwise math path elsewhere). Rows covered by several
blocks are merged by log-sum-exp. The backward feeds the *merged* output and log-sum-exp to each
block's backward, which makes each block's gradients exact parts of the full gradient:
``dS = P * (dO V^T - rowsum(dO * O))`` with ``P = exp(S - lse)`` needs only the merged row statistics.
The prefix is read from its own tensors, padding only shortens the key ranges of the blocks (batch rows
with equal ``segment_lengths`` share one set of calls), and a mask that is one causal or one
rectangular block costs exactly one attention call.

A mask of several blocks, or one causal block, can also run as stock calls with an additive mask (CPU,
no prefix, every row sees a key), which compute exactly the pairs they are given (the stock causal call
skips little: on CPU its backward costs what a full call does at N=512 and N=2048, 81% of it at 1024):

- one call over all rows;
- *row chunks* of ``c`` rows (:data:`CHUNK_ROWS`), each one call over the keys up to its last visible
  one (every row is in one chunk: no merge);
- for the backward only, *key chunks* of ``c`` keys (:data:`COL_KEYS`), each one call over the rows
  that see any of its keys: tall calls, where the stock backward is at its most efficient, each giving
  its keys' dk/dv whole and a part of dq (summed). Since the backward needs only the merged ``out`` and
  ``lse``, its plan is chosen independently of the forward's.

Which plan is fastest is measured, not guessed. Up to ``MASKED_CALL_MAX_N`` packed rows one call
always wins, the masked one or the causal one that is the whole op (the fixed cost of each extra call
outweighs the masked work it saves). From there to ``MEASURED_CHOICE_MAX_N`` the first forward of each
layout, shape, dtype, thread count and padded-or-not (not the lengths themselves: a batch of new lengths
is not timed again) times the composition, the one masked call and each row-chunk size, and the first
backward times those and each key-chunk size (three times each, alternated, best of three, no
autograd); the fastest serves every later call (:func:`plan_choices` shows them). Above it the
composition always runs (a masked call's mask grows as N^2). Under ``torch.compile`` tracing, or with
``RMT_KERNELS_TORCH_PLAN=static``, nothing is timed: the static rule (one masked call only up to
``MASKED_CALL_MAX_N``) decides. All plans compute the same attention; the choice changes only
rounding. The plan of a call (runs of equal lengths, blocks, chunks) depends only on the layout and the
sizes, and is cached.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Dict, NamedTuple, Optional, Tuple

import torch

from ...layout import MemoryLayout
from .._alloc import GradAccumulator, accum_dtype, alloc_outputs

_cpu_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_cpu_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
_sdpa = torch._C._nn.scaled_dot_product_attention

# Packed lengths up to which a mask of several blocks runs as one stock call with an additive mask
# (CPU, no prefix, no row without keys); measured in ``rmt-kernels bench --suite overhead``.
MASKED_CALL_MAX_N = 128
# Up to this many packed rows the plan is timed on the first call of each shape (see the module
# docstring); above it the composition runs.
MEASURED_CHOICE_MAX_N = 2048
ENV_PLAN = "RMT_KERNELS_TORCH_PLAN"  # "static": never time, use the static rule


# --------------------------------------------------------------------------- one block


def _math_block_fwd(q, k, v, causal: bool, scale: float):
    b, hq, m, d = q.shape
    hkv, kn = k.shape[1], k.shape[2]
    cdt = accum_dtype(q.dtype)
    qf = q.to(cdt).reshape(b, hkv, hq // hkv, m, d)
    s = torch.matmul(qf, k.to(cdt).transpose(-1, -2)[:, :, None]) * scale  # [B, Hkv, G, M, K]
    if causal:
        s = s.masked_fill(torch.ones(m, kn, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    o = torch.matmul(torch.exp(s - lse[..., None]), v.to(cdt)[:, :, None])
    return o.reshape(b, hq, m, d).to(q.dtype), lse.reshape(b, hq, m)

def _math_block_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    b, hq, m, d = q.shape
    hkv, kn = k.shape[1], k.shape[2]
    g = hq // hkv
    cdt = accum_dtype(q.dtype)
    qf = q.to(cdt).reshape(b, hkv, g, m, d)
    kf, vf = k.to(cdt)[:, :, None], v.to(cdt)[:, :, None]
    dof = do.to(cdt).reshape(b, hkv, g, m, d)
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(torch.ones(m, kn, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.exp(s - lse.to(cdt).reshape(b, hkv, g, m, 1))
    delta = (dof * o.to(cdt).reshape(b, hkv, g, m, d)).sum(-1, keepdim=True)
    ds = p * (torch.matmul(dof, vf.transpose(-1, -2)) - delta)
    dq = torch.matmul(ds, kf) * scale
    dk = (torch.matmul(ds.transpose(-1, -2), qf) * scale).sum(2)
    dv = torch.matmul(p.transpose(-1, -2), dof).sum(2)
    return dq.reshape(b, hq, m, d), dk, dv

def unit_last_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with stride 1 along the head dim. The stock CPU flash kernel reads rows as dense vectors
    and silently gives wrong results otherwise (e.g. ``x[..., ::2]``); other strides it honours."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()

def _stock(q, scale: float) -> bool:
    """Whether the stock CPU kernel computes this call exactly: CPU tensors and a positive scale (it
    returns NaN rows for a scale <= 0; the math path does not)."""
    return q.device.type == "cpu" and scale > 0

def block_fwd(q, k, v, causal: bool, scale: float):
    if _stock(q, scale):
        return _cpu_fwd(q, k, v, 0.0, causal, scale=scale)
    return _math_block_fwd(q, k, v, causal, scale)

def block_bwd(do, q, k, v, o, lse, causal: bool, scale: float):
    if _stock(q, scale):
        return _cpu_bwd(do, q, k, v, o, lse, 0.0, causal, scale=scale)
    return _math_block_bwd(do, q, k, v, o, lse, causal, scale)


# --------------------------------------------------------------------------- plan


class _Run(NamedTuple):
    """Batch rows ``[b0, b1)`` share the valid segment length ``length`` and so the same blocks."""

    b0: int
    b1: int
    length: int
    blocks: tuple
    row_segments: tuple  # ((r0, r1, blocks covering rows [r0, r1)), ...)

class _Plan(NamedTuple):
    runs: Tuple[_Run, ...]
    whole: Optional[object]  # the one block that is the whole op (one stock call), else None
    # Stock calls with an additive mask are possible (CPU, exact): a mask of several blocks, or one
    # causal block (whose stock backward skips nothing), with no prefix and no row without keys.
    masked: bool
    lengths: Optional[tuple]


def lengths_key(segment_lengths: Optional[torch.Tensor], segment_len: int) -> Optional[tuple]:
    """``segment_lengths`` as a tuple of ints (None when every row is complete): a host read."""
    if segment_lengths is None:
        return None
    lengths = tuple(segment_lengths.tolist())
    return None if all(x == segment_len for x in lengths) else lengths

@functools.lru_cache(maxsize=4096)
def _plan(layout: MemoryLayout, batch: int, segment_len: int, prefix_len: int, lengths: Optional[tuple],
          on_cpu: bool) -> _Plan:
    n = layout.seq_len(segment_len)
    runs, start = [], 0
    row_lengths = lengths if lengths is not None else (segment_len,) * batch
    for b in range(1, batch + 1):
        if b == batch or row_lengths[b] != row_lengths[start]:
            blocks = tuple(layout.blocks(segment_len, prefix_len, row_lengths[start]))
            runs.append(_Run(start, b, row_lengths[start], blocks, tuple(_row_segments(blocks, n))))
            start = b
    whole = None
    if len(runs) == 1 and len(runs[0].blocks) == 1 and _is_whole(runs[0].blocks[0], n):
        whole = runs[0].blocks[0]
    masked = (
        on_cpu and (whole is None or whole.causal) and prefix_len == 0 and n <= MEASURED_CHOICE_MAX_N
        and bool((layout.visible_counts(segment_len, 0, lengths) > 0).all())
    )
    return _Plan(tuple(runs), whole, masked, lengths)

def plan_of(q, prefix_k, segment_lengths, layout: MemoryLayout) -> _Plan:
    s = q.shape[2] - layout.num_read - layout.num_write  # N >= R + W: checked by the public entry
    p = 0 if prefix_k is None else prefix_k.shape[2]
    return _plan(layout, q.shape[0], s, p, lengths_key(segment_lengths, s), q.is_cpu)

# A padded batch's mask is [B, 1, N, N] (up to 128 MB at B=8, N=2048 in float32): few are kept.
@functools.lru_cache(maxsize=8)
def _additive_mask(layout: MemoryLayout, segment_len: int, lengths: Optional[tuple], dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    """``[B or 1, 1, N, N]``: 0 where the layout lets a row see a key, ``-inf`` elsewhere."""
    visible = layout.dense_mask(segment_len, 0, lengths)[:, None]
    bias = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, float("-inf"))
    return bias.to(device)

def _row_segments(blocks, n: int):
    """Split rows ``[0, n)`` at every block edge: ``[(r0, r1, [blocks covering it])]``."""
    edges = sorted({0, n, *(b.row_start for b in blocks), *(b.row_end for b in blocks)})
    segs = []
    for r0, r1 in zip(edges[:-1], edges[1:]):
        segs.append((r0, r1, tuple(b for b in blocks if b.row_start <= r0 and b.row_end >= r1)))
    return segs

def _keys(blk, k, v, prefix_k, prefix_v, b0, b1):
    src_k, src_v = (prefix_k, prefix_v) if blk.source == "prefix" else (k, v)
    return src_k[b0:b1, :, blk.key_start : blk.key_end], src_v[b0:b1, :, blk.key_start : blk.key_end]

def _is_whole(blk, n: int) -> bool:
    """The block is every row over every packed key (one stock call is the whole op)."""
    return (blk.row_start, blk.row_end, blk.source, blk.key_start, blk.key_end, blk.offset) == (0, n, "packed", 0, n, 0)


# --------------------------------------------------------------------------- composition


def composed_fwd(plan: _Plan, q, k, v, prefix_k, prefix_v, scale: float):
    """One stock call per block of ``plan``, rows covered by several blocks merged by log-sum-exp."""
    out, lse = alloc_outputs(q)
    for run in plan.runs:
        b0, b1, blocks = run.b0, run.b1, run.blocks
        results = []
        for blk in blocks:
            kb, vb = _keys(blk, k, v, prefix_k, prefix_v, b0, b1)
            o, l = block_fwd(q[b0:b1, :, blk.row_start - blk.offset : blk.row_end], kb, vb, blk.causal, scale)
            results.append((o[:, :, blk.offset :], l[:, :, blk.offset :]))
        for r0, r1, covering in run.row_segments:
            o_seg, l_seg = out[b0:b1, :, r0:r1], lse[b0:b1, :, r0:r1]
            parts = [
                (o[:, :, r0 - blk.row_start : r1 - blk.row_start], l[:, :, r0 - blk.row_start : r1 - blk.row_start])
                for blk, (o, l) in zip(blocks, results)
                if blk in covering
            ]
            if not parts:  # rows that see no key
                o_seg.zero_()
                l_seg.fill_(float("-inf"))
            elif len(parts) == 1:
                o_seg.copy_(parts[0][0])
                l_seg.copy_(parts[0][1])
            else:
                l_m = torch.logsumexp(torch.stack([pl for _, pl in parts]), dim=0)
                acc = sum(po.to(l_m.dtype) * torch.exp(pl - l_m)[..., None] for po, pl in parts)
                o_seg.copy_(acc)
                l_seg.copy_(l_m)
    return out, lse

def composed_bwd(plan: _Plan, dout, q, k, v, prefix_k, prefix_v, out, lse, scale: float, need_prefix_grad: bool):
    """The backward of :func:`composed_fwd`: each block's stock backward fed the merged statistics."""
    p = 0 if prefix_k is None else prefix_k.shape[2]
    acc = accum_dtype(q.dtype)
    dq, dk, dv = GradAccumulator(q, acc), GradAccumulator(k, acc), GradAccumulator(v, acc)
    want_prefix = p > 0 and need_prefix_grad
    dpk = GradAccumulator(prefix_k, acc) if want_prefix else None
    dpv = GradAccumulator(prefix_v, acc) if want_prefix else None
    for run in plan.runs:
        b0, b1 = run.b0, run.b1
        # Widest key ranges first, so a block spanning every key becomes the dk/dv buffer.
        for blk in sorted(run.blocks, key=lambda blk: blk.key_start - blk.key_end):
            rows = slice(blk.row_start - blk.offset, blk.row_end)
            lse_b = lse[b0:b1, :, rows]
            if blk.offset:
                # The discarded rows of the causal call must contribute nothing: lse = +inf makes
                # their probabilities exactly 0 whatever their dout and out.
                lse_b = lse_b.clone()
                lse_b[:, :, : blk.offset] = float("inf")
            kb, vb = _keys(blk, k, v, prefix_k, prefix_v, b0, b1)
            g_q, g_k, g_v = block_bwd(
                dout[b0:b1, :, rows], q[b0:b1, :, rows], kb, vb, out[b0:b1, :, rows], lse_b, blk.causal, scale
            )
            dq.write(b0, b1, blk.row_start, g_q[:, :, blk.offset :])
            if blk.source == "prefix" and not want_prefix:
                continue  # a detached prefix still feeds dq; only its own gradients are dropped
            gk, gv = (dpk, dpv) if blk.source == "prefix" else (dk, dv)
            gk.write(b0, b1, blk.key_start, g_k)
            gv.write(b0, b1, blk.key_start, g_v)
    runs, dtype = [(run.b0, run.b1) for run in plan.runs], q.dtype
    return (
        dq.finish(runs, dtype),
        dk.finish(runs, dtype),
        dv.finish(runs, dtype),
        dpk.finish(runs, dtype) if want_prefix else None,
        dpv.finish(runs, dtype) if want_prefix else None,
    )


# --------------------------------------------------------------------------- which plan runs


# Rows per masked call of the row-chunked plan (candidates timed against the composition and the one
# masked call). The stock CPU kernel skips little of a causal mask (see the module docstring); a masked
# call computes every pair it is given, and no other. Cutting the rows into chunks that each take the keys up
# to their last visible one computes about ``N^2 / 2 + N * c / 2`` pairs of a causal-like mask (``c``
# rows per chunk) with no merge: every row lives in exactly one chunk.
CHUNK_ROWS = (128, 192, 256)
# Keys per backward call of the key-chunked plan (candidates timed against the others). Each call takes
# the rows that see any of its keys (a suffix of the rows for these masks), so the calls are tall: the
# stock backward runs at about its full-call rate per pair, where row chunks of 128 rows ran about 20%
# slower per pair (AMD EPYC, 2 threads, D=64).
COL_KEYS = (128, 256)

_CHOICES: Dict[tuple, int] = {}

FWD, BWD = "fwd", "bwd"


def plan_choices() -> Dict[tuple, int]:
    """The measured choices so far: ``(layout, q shape, k shape, dtype, padded, threads, phase) -> plan``
    with ``phase`` ``"fwd"`` or ``"bwd"`` and ``plan`` 0 (the block composition), N (one masked call
    over all rows), ``c > 0`` (row chunks of ``c`` rows) or ``-c`` (key chunks of ``c`` keys, backward
    only)."""
    return dict(_CHOICES)


def _static_only(q) -> bool:
    if os.environ.get(ENV_PLAN, "").strip() == "static":
        return True
    if type(q) is not torch.Tensor:  # fake or functional tensors while tracing: nothing to time
        return True
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - torch < 2.3
        return False


def _static_choice(plan: _Plan, q, scale: float) -> Optional[int]:
    """The plan when no measurement is needed (or allowed), else None. Up to ``MASKED_CALL_MAX_N`` rows
    one call: the masked one, or the one causal call when that is the whole op."""
    if not plan.masked or scale <= 0:
        return 0
    n = q.shape[2]
    if n <= MASKED_CALL_MAX_N:
        return 0 if plan.whole is not None else n
    return 0 if _static_only(q) else None


def _choice_key(plan: _Plan, q, k, layout: MemoryLayout, phase: str) -> tuple:
    # Whether rows are padded, not their lengths: a padded batch of new lengths every step must not be
    # timed again at every step (the fastest plan hardly depends on the lengths).
    padded = plan.lengths is not None
    return (layout, tuple(q.shape), tuple(k.shape), q.dtype, padded, torch.get_num_threads(), phase)


def fwd_choice(plan: _Plan, q, k, v, layout: MemoryLayout, scale: float) -> int:
    """The forward's plan (see :func:`plan_choices`); the first call of a shape measures it."""
    static = _static_choice(plan, q, scale)
    if static is not None:
        return static
    key = _choice_key(plan, q, k, layout, FWD)
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _fastest_fwd(plan, q, k, v, layout, scale)
    return choice


def known_bwd_choice(plan: _Plan, q, k, layout: MemoryLayout, scale: float) -> Optional[int]:
    """The backward's plan if it is already decided (static or measured), else None."""
    static = _static_choice(plan, q, scale)
    return static if static is not None else _CHOICES.get(_choice_key(plan, q, k, layout, BWD))


def bwd_choice(plan: _Plan, dout, q, k, v, out, lse, layout: MemoryLayout, scale: float) -> int:
    """The backward's plan; the first backward of a shape measures it on its own ``dout``, ``out`` and
    ``lse`` (any forward plan gives the same statistics)."""
    choice = known_bwd_choice(plan, q, k, layout, scale)
    if choice is None:
        key = _choice_key(plan, q, k, layout, BWD)
        choice = _CHOICES[key] = _fastest_bwd(plan, dout, q, k, v, out, lse, layout, scale)
    return choice


def _candidates(n: int, whole: bool = False) -> Tuple[int, ...]:
    """Forward plans worth timing at ``n`` rows: the composition (0; with ``whole``, the one causal
    call), one masked call (n; not with ``whole``: it computes the whole square) and the row chunks that
    cut the rows into at least two chunks."""
    return (0, *(() if whole else (n,)), *(c for c in CHUNK_ROWS if 2 * c <= n))


def _bwd_candidates(n: int, whole: bool = False) -> Tuple[int, ...]:
    """Backward plans worth timing at ``n`` rows: the forward's, and key chunks (``-c``) that cut the
    keys into at least two chunks."""
    return (*_candidates(n, whole), *(-c for c in COL_KEYS if 2 * c <= n))


def _best(fns: dict) -> int:
    """The key of the fastest of ``fns`` (callables): each timed three times, alternated, best of three
    (a single candidate is not run)."""
    if len(fns) == 1:
        return next(iter(fns))
    best = {c: float("inf") for c in fns}
    with torch.no_grad():
        for _ in range(3):
            for c, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                best[c] = min(best[c], time.perf_counter() - t0)
    return min(best, key=best.get)


def _fastest_fwd(plan: _Plan, q, k, v, layout: MemoryLayout, scale: float) -> int:
    return _best({c: (lambda c=c: planned_fwd(c, plan, q, k, v, None, None, layout, scale))
                  for c in _candidates(q.shape[2], plan.whole is not None)})


def _fastest_bwd(plan: _Plan, dout, q, k, v, out, lse, layout: MemoryLayout, scale: float) -> int:
    return _best({c: (lambda c=c: planned_bwd(c, plan, dout, q, k, v, None, None, out, lse, layout, scale, False))
                  for c in _bwd_candidates(q.shape[2], plan.whole is not None)})


# --------------------------------------------------------------------------- chunked masked calls


@functools.lru_cache(maxsize=256)
def _key_ends(layout: MemoryLayout, segment_len: int, lengths: Optional[tuple]) -> torch.Tensor:
    """int64 ``[N]``: one past the last packed key each row sees (in any batch row), from the layout's
    rule without a dense mask: a row whose range reaches past the segment ends on a W key it sees; any
    other row on the last valid key of its range in the longest batch row."""
    ends = layout.key_end(segment_len)
    if lengths is None:
        return ends
    past_segment = ends > layout.num_read + segment_len
    return torch.where(past_segment, ends, ends.clamp(max=layout.num_read + max(lengths)))


@functools.lru_cache(maxsize=256)
def _row_chunks(layout: MemoryLayout, segment_len: int, lengths: Optional[tuple], rows: int) -> tuple:
    """``((r0, r1, key_end), ...)``: rows ``[r0, r1)`` in chunks of ``rows``, each with the packed keys
    ``[0, key_end)`` that hold every key one of its rows sees (in any batch row)."""
    ends = _key_ends(layout, segment_len, lengths)
    n = ends.shape[0]
    return tuple((r0, min(r0 + rows, n), int(ends[r0 : r0 + rows].max())) for r0 in range(0, n, rows))


@functools.lru_cache(maxsize=256)
def _key_chunks(layout: MemoryLayout, segment_len: int, lengths: Optional[tuple], keys: int) -> tuple:
    """``((k0, k1, r0, r1), ...)``: packed keys ``[k0, k1)`` in chunks of ``keys``, each with the rows
    ``[r0, r1)`` that hold every row seeing one of its keys (in any batch row); rows in between that see
    none of them get probability 0 there. Chunks no row sees are left out (their dk, dv are 0)."""
    ends = _key_ends(layout, segment_len, lengths)
    n = ends.shape[0]
    valid_end = layout.num_read + (segment_len if lengths is None else max(lengths))  # then [R + S, N)
    out = []
    for k0 in range(0, n, keys):
        k1 = min(k0 + keys, n)
        first = k0 if k0 < valid_end else max(k0, layout.num_read + segment_len)  # first valid key
        if first >= k1:
            continue  # only padding keys: no row sees them
        seen = (ends > first).nonzero()
        if seen.numel():
            out.append((k0, k1, int(seen[0]), int(seen[-1]) + 1))
    return tuple(out)


def mask_of(plan: _Plan, layout: MemoryLayout, q) -> torch.Tensor:
    return _additive_mask(layout, layout.segment_len(q.shape[2]), plan.lengths, q.dtype, q.device)


def planned_fwd(choice: int, plan: _Plan, q, k, v, prefix_k, prefix_v, layout: MemoryLayout, scale: float):
    """``(out, lse)`` by the forward plan ``choice`` (see :func:`plan_choices`; a call with a prefix
    always has plan 0)."""
    if choice:
        return _masked_fwd(plan, q, k, v, layout, scale, choice)
    if plan.whole is not None:
        return block_fwd(q, k, v, plan.whole.causal, scale)
    return composed_fwd(plan, q, k, v, prefix_k, prefix_v, scale)


def planned_bwd(choice: int, plan: _Plan, dout, q, k, v, prefix_k, prefix_v, out, lse, layout: MemoryLayout,
                scale: float, need_prefix_grad: bool):
    """``(dq, dk, dv, dprefix_k, dprefix_v)`` by the backward plan ``choice`` (see :func:`plan_choices`;
    a call with a prefix always has plan 0); prefix grads None without a prefix or ``need_prefix_grad``."""
    if choice == 0 and plan.whole is None:
        return composed_bwd(plan, dout, q, k, v, prefix_k, prefix_v, out, lse, scale, need_prefix_grad)
    if choice == 0:
        grads = block_bwd(dout, q, k, v, out, lse, plan.whole.causal, scale)
    elif choice >= q.shape[2]:
        grads = _cpu_bwd(dout, q, k, v, out, lse, 0.0, False, attn_mask=mask_of(plan, layout, q), scale=scale)
    else:
        s = layout.segment_len(q.shape[2])
        if choice > 0:  # row chunks: (rows, keys [0, end))
            tiles = [(r0, r1, 0, end) for r0, r1, end in _row_chunks(layout, s, plan.lengths, choice)]
        else:  # key chunks: (the rows that see them, keys)
            tiles = [(r0, r1, k0, k1) for k0, k1, r0, r1 in _key_chunks(layout, s, plan.lengths, -choice)]
        grads = _tiled_bwd(plan, dout, q, k, v, out, lse, layout, scale, tiles)
    return (*grads, None, None)


def _masked_fwd(plan: _Plan, q, k, v, layout: MemoryLayout, scale: float, rows: int):
    """The attention as masked stock calls over chunks of ``rows`` rows (one call when ``rows >= N``)."""
    bias = mask_of(plan, layout, q)
    n = q.shape[2]
    if rows >= n:
        return _cpu_fwd(q, k, v, 0.0, False, attn_mask=bias, scale=scale)[:2]
    out, lse = alloc_outputs(q)
    for r0, r1, end in _row_chunks(layout, layout.segment_len(n), plan.lengths, rows):
        o, l = _cpu_fwd(q[:, :, r0:r1], k[:, :, :end], v[:, :, :end], 0.0, False, attn_mask=bias[..., r0:r1, :end],
                        scale=scale)[:2]
        out[:, :, r0:r1].copy_(o)
        lse[:, :, r0:r1].copy_(l)
    return out, lse


def _tiled_bwd(plan: _Plan, dout, q, k, v, out, lse, layout: MemoryLayout, scale: float, tiles):
    """``(dq, dk, dv)`` over ``tiles`` ``(r0, r1, k0, k1)``, each one masked stock backward of rows
    ``[r0, r1)`` against keys ``[k0, k1)``: a row chunk gives its rows' dq whole and a part of dk/dv, a
    key chunk its keys' dk/dv whole and a part of dq (parts summed). Tiles run longest side first, so a
    tile spanning all rows (or all keys) is adopted as the dq (dk/dv) buffer."""
    bias = mask_of(plan, layout, q)
    acc = accum_dtype(q.dtype)
    dq, dk, dv = GradAccumulator(q, acc), GradAccumulator(k, acc), GradAccumulator(v, acc)
    b = q.shape[0]
    for r0, r1, k0, k1 in sorted(tiles, key=lambda t: -max(t[1] - t[0], t[3] - t[2])):
        rows, keys = slice(r0, r1), slice(k0, k1)
        g_q, g_k, g_v = _cpu_bwd(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], out[:, :, rows],
                                 lse[:, :, rows], 0.0, False, attn_mask=bias[..., rows, keys], scale=scale)
        dq.write(0, b, r0, g_q)
        dk.write(0, b, k0, g_k)
        dv.write(0, b, k0, g_v)
    whole = ((0, b),)
    return dq.finish(whole, q.dtype), dk.finish(whole, q.dtype), dv.finish(whole, q.dtype)
