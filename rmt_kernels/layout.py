"""The one definition of the causal-plus-memory attention mask.

A packed segment has ``N = R + S + W`` rows::

    positions:  0 .. R-1        R .. R+S-1          R+S .. R+S+W-1
    rows:       read memory R | segment tokens X | write memory W

Keys are ``[prefix (P) | packed (N)]``; the prefix (an XL cache or a learned null key) lives in its own
tensors. Everything that needs to know which key a query row sees -- the reference, the torch
composition, the Triton and CUDA launchers, the FLOP counter and the tests -- asks this module.

The three families, drawn for R=2, S=4, W=2 without padding (rows are queries, columns keys
``r r x x x x w w``; 1 = visible)::

    causal                 memory_bidirectional      full
    r0 1 . . . . . . .     r0 1 1 . . . . . .        r0 1 1 1 1 1 1 1 1
    r1 1 1 . . . . . .     r1 1 1 . . . . . .        ...
    x0 1 1 1 . . . . .     x0 1 1 1 . . . . .        every row sees
    x1 1 1 1 1 . . . .     x1 1 1 1 1 . . . .        every valid key
    x2 1 1 1 1 1 . . .     x2 1 1 1 1 1 . . .
    x3 1 1 1 1 1 1 . .     x3 1 1 1 1 1 1 . .
    w0 1 1 1 1 1 1 1 .     w0 1 1 1 1 1 1 1 1
    w1 1 1 1 1 1 1 1 1     w1 1 1 1 1 1 1 1 1

Every row's packed keys form one range ``[0, key_end[i])``, thinned by right padding: with
``L = segment_lengths[b]``, the keys ``X_t`` with ``L <= t < S`` are invisible to every row (memory keys
are always valid). So packed key ``j`` is visible to row ``i`` iff::

    j < key_end[i]  and  (j < R + L  or  j >= R + S)

and prefix key ``p`` is visible to row ``i`` iff ``prefix_visible[i]`` (``prefix_visible_to="segment"``:
the X rows only; ``"all"``: every row). Kernels evaluate exactly this expression.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence, Union

import torch

MASK_FAMILIES = ("causal", "memory_bidirectional", "full")
# Integer code of each family as the Triton and CUDA kernels receive it (csrc/common/mask_layout.cuh's
# rmt::MaskFamily follows the same order).
MASK_CODES = {name: code for code, name in enumerate(MASK_FAMILIES)}
PREFIX_VISIBILITY = ("segment", "all")

# Row classes of the packed buffer.
ROW_READ, ROW_SEGMENT, ROW_WRITE = 0, 1, 2

# Tile classes returned by :meth:`MemoryLayout.classify_tiles`.
TILE_EMPTY, TILE_PARTIAL, TILE_FULL = 0, 1, 2

LengthsLike = Union[torch.Tensor, Sequence[int], None]


class TileClasses(NamedTuple):
    """Tile classes of one ``(BLOCK_M, BLOCK_N)`` tiling.

    ``prefix``: int8 ``[B or 1, ceil(N / BLOCK_M), ceil(P / BLOCK_N)]``; ``packed``: int8
    ``[B or 1, ceil(N / BLOCK_M), ceil(N / BLOCK_N)]``. Values are ``TILE_EMPTY`` (no visible pair: never
    load it), ``TILE_FULL`` (every in-range pair visible: no mask work) or ``TILE_PARTIAL``. Tail tiles
    are judged on their in-range elements only; bounds masking is the kernel's separate concern.
    """

    prefix: torch.Tensor
    packed: torch.Tensor


class AttentionBlock(NamedTuple):
    """One rectangle (or aligned causal triangle) of the mask.

    Query rows ``[row_start, row_end)`` see keys ``[key_start, key_end)`` of ``source`` (``"prefix"`` or
    ``"packed"``). With ``causal``, row ``row_start + a`` sees key ``key_start + c`` iff
    ``c <= a + offset``: a stock ``is_causal=True`` call (top-left aligned) over query rows
    ``[row_start - offset, row_end)`` computes it exactly, and its first ``offset`` rows are discarded.
    """

    row_start: int
    row_end: int
    source: str
    key_start: int
    key_end: int
    causal: bool
    offset: int = 0


def as_int(value, name: str, minimum: Optional[int] = None) -> int:
    """``value`` as a Python int: ints, numpy integers and 0-d integer tensors (anything with
    ``__index__``) are accepted, bools and floats are not (TypeError); below ``minimum``: ValueError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_nonneg_int(value, name: str) -> int:
    return as_int(value, name, 0)


@dataclass(frozen=True)
class MemoryLayout:
    """Where the memory rows sit in a packed segment, and which keys each row sees.

    Args:
        num_read: R, read-memory rows at the start of the packed buffer (>= 0).
        num_write: W, write-memory rows at its end (>= 0).
        mask: ``"causal"`` (official HF wrapper, ARMT), ``"memory_bidirectional"`` (the paper's
            Transformer-XL code, lucidrains; the default) or ``"full"`` (encoders).
        prefix_visible_to: which rows see a prefix: ``"segment"`` (X rows only; the default) or
            ``"all"``.

    Raises:
        TypeError: ``num_read``/``num_write`` not ints.
        ValueError: negative sizes, unknown ``mask`` or ``prefix_visible_to``.

    Example::

        >>> layout = MemoryLayout(2, 2, mask="memory_bidirectional")
        >>> layout.dense_mask(4).shape
        torch.Size([1, 8, 8])
    """

    num_read: int
    num_write: int
    mask: str = "memory_bidirectional"
    prefix_visible_to: str = "segment"

    def __post_init__(self):
        # Plain ints whatever integral type came in (numpy, 0-d tensors), so layouts hash and compare.
        object.__setattr__(self, "num_read", _check_nonneg_int(self.num_read, "num_read"))
        object.__setattr__(self, "num_write", _check_nonneg_int(self.num_write, "num_write"))
        if self.mask not in MASK_FAMILIES:
            raise ValueError(f"mask must be one of {MASK_FAMILIES}, got {self.mask!r}")
        if self.prefix_visible_to not in PREFIX_VISIBILITY:
            raise ValueError(
                f"prefix_visible_to must be one of {PREFIX_VISIBILITY}, got {self.prefix_visible_to!r}"
            )

    # ------------------------------------------------------------------ sizes

    def seq_len(self, segment_len: int) -> int:
        """N = R + S + W."""
        return self.num_read + _check_nonneg_int(segment_len, "segment_len") + self.num_write

    def segment_len(self, seq_len: int) -> int:
        """S = N - R - W; ValueError when N < R + W."""
        _check_nonneg_int(seq_len, "seq_len")
        s = seq_len - self.num_read - self.num_write
        if s < 0:
            raise ValueError(
                f"packed length N={seq_len} is shorter than num_read + num_write = "
                f"{self.num_read} + {self.num_write}"
            )
        return s

    def lengths_list(self, segment_len: int, segment_lengths: LengthsLike) -> Optional[list]:
        """``segment_lengths`` as a list of ints checked to lie in ``[0, S]`` (None stays None)."""
        if segment_lengths is None:
            return None
        if isinstance(segment_lengths, torch.Tensor):
            if segment_lengths.dim() != 1:
                raise ValueError(
                    f"segment_lengths must be 1-D [B], got shape {tuple(segment_lengths.shape)}"
                )
            if segment_lengths.dtype.is_floating_point or segment_lengths.dtype.is_complex:
                raise TypeError(f"segment_lengths must be an integer tensor, got {segment_lengths.dtype}")
            values = [int(x) for x in segment_lengths.tolist()]
        else:
            values = [int(x) for x in segment_lengths]
        for b, length in enumerate(values):
            if not 0 <= length <= segment_len:
                raise ValueError(
                    f"segment_lengths[{b}] = {length} is outside [0, S] with S = {segment_len}"
                )
        return values

    # ------------------------------------------------------------- per row

    def row_classes(self, segment_len: int) -> torch.Tensor:
        """int8 ``[N]``: ``ROW_READ``, ``ROW_SEGMENT`` or ``ROW_WRITE`` for each packed row."""
        r, s, w = self.num_read, segment_len, self.num_write
        cls = torch.empty(r + s + w, dtype=torch.int8)
        cls[:r] = ROW_READ
        cls[r : r + s] = ROW_SEGMENT
        cls[r + s :] = ROW_WRITE
        return cls

    def key_end(self, segment_len: int) -> torch.Tensor:
        """int64 ``[N]``: row i sees packed keys ``j < key_end[i]`` (before padding)."""
        r, n = self.num_read, self.seq_len(segment_len)
        rows = torch.arange(n, dtype=torch.int64)
        if self.mask == "causal":
            return rows + 1
        if self.mask == "full":
            return torch.full((n,), n, dtype=torch.int64)
        cls = self.row_classes(segment_len)
        return torch.where(
            cls == ROW_READ,
            torch.full_like(rows, r),
            torch.where(cls == ROW_SEGMENT, rows + 1, torch.full_like(rows, n)),
        )

    def prefix_visible(self, segment_len: int) -> torch.Tensor:
        """bool ``[N]``: whether row i sees the prefix."""
        if self.prefix_visible_to == "all":
            return torch.ones(self.seq_len(segment_len), dtype=torch.bool)
        return self.row_classes(segment_len) == ROW_SEGMENT

    def key_valid(self, segment_len: int, segment_lengths: LengthsLike = None) -> torch.Tensor:
        """bool ``[B or 1, N]``: packed keys that padding leaves visible."""
        r, n = self.num_read, self.seq_len(segment_len)
        lengths = self.lengths_list(segment_len, segment_lengths)
        ends = torch.tensor(lengths if lengths is not None else [segment_len], dtype=torch.int64)
        j = torch.arange(n, dtype=torch.int64)
        return (j[None, :] < r + ends[:, None]) | (j[None, :] >= r + segment_len)

    # ------------------------------------------------------------- dense

    def dense_mask(
        self, segment_len: int, prefix_len: int = 0, segment_lengths: LengthsLike = None
    ) -> torch.Tensor:
        """bool ``[B or 1, N, P + N]`` (True = visible), keys ordered ``[prefix | packed]``.

        The leading dim is B when ``segment_lengths`` (int ``[B]``, values in ``[0, S]``) is given,
        else 1. For tests, the reference and small shapes: it is O(N^2) memory.
        """
        _check_nonneg_int(prefix_len, "prefix_len")
        n = self.seq_len(segment_len)
        j = torch.arange(n, dtype=torch.int64)
        packed = (j[None, :] < self.key_end(segment_len)[:, None])[None] & self.key_valid(
            segment_len, segment_lengths
        )[:, None, :]
        prefix = self.prefix_visible(segment_len)[None, :, None].expand(packed.shape[0], n, prefix_len)
        return torch.cat([prefix, packed], dim=2)

    # ------------------------------------------------------------- counts

    def _packed_counts(self, segment_len: int, lengths: Optional[list], starts, ends) -> torch.Tensor:
        """int64 ``[B or 1, N, K]``: visible packed keys of each row within key ranges
        ``[starts[k], ends[k])``, computed from the interval form without a dense mask."""
        r = self.num_read
        hi = self.key_end(segment_len)[None, :, None]  # [1, N, 1]
        ln = torch.tensor(lengths if lengths is not None else [segment_len], dtype=torch.int64)
        valid_end = (r + ln)[:, None, None]  # [B, 1, 1]
        starts = torch.as_tensor(starts, dtype=torch.int64)[None, None, :]
        ends = torch.as_tensor(ends, dtype=torch.int64)[None, None, :]
        # Visible keys are [0, min(hi, R+L)) and [R+S, hi); intersect each with [start, end).
        a = (torch.minimum(torch.minimum(hi, valid_end), ends) - starts).clamp_min(0)
        b = (torch.minimum(hi, ends) - torch.maximum(starts, torch.tensor(r + segment_len))).clamp_min(0)
        return a + b

    def visible_counts(
        self, segment_len: int, prefix_len: int = 0, segment_lengths: LengthsLike = None
    ) -> torch.Tensor:
        """int64 ``[B or 1, N]``: number of visible keys (prefix included) of each row."""
        _check_nonneg_int(prefix_len, "prefix_len")
        lengths = self.lengths_list(segment_len, segment_lengths)
        n = self.seq_len(segment_len)
        packed = self._packed_counts(segment_len, lengths, [0], [n])[..., 0]
        return packed + prefix_len * self.prefix_visible(segment_len).to(torch.int64)[None]

    def visible_pairs(
        self, segment_len: int, prefix_len: int = 0, segment_lengths: LengthsLike = None, batch: int = 1
    ) -> int:
        """Number of visible (query, key) pairs of one head: the 1s of the mask.

        With ``segment_lengths`` the count is summed over its B rows (``batch`` must then be 1 or B);
        without, one batch row's count is multiplied by ``batch``. Forward FLOPs of attention are
        ``4 * H_q * D * visible_pairs(...)`` (see :func:`attention_flops`).
        """
        counts = self.visible_counts(segment_len, prefix_len, segment_lengths)
        if segment_lengths is not None:
            if batch not in (1, counts.shape[0]):
                raise ValueError(f"batch={batch} does not match segment_lengths of length {counts.shape[0]}")
            return int(counts.sum())
        return int(counts.sum()) * batch

    # ------------------------------------------------------------- tiles

    def classify_tiles(
        self,
        segment_len: int,
        block_m: int,
        block_n: int,
        prefix_len: int = 0,
        segment_lengths: LengthsLike = None,
    ) -> TileClasses:
        """Classify every ``(block_m, block_n)`` tile as empty, full or partial.

        Query rows are tiled from packed row 0; the prefix keys and the packed keys are tiled
        separately from their own position 0, as kernels read them through separate pointers.
        """
        for name, value in (("block_m", block_m), ("block_n", block_n)):
            if _check_nonneg_int(value, name) == 0:
                raise ValueError(f"{name} must be > 0")
        _check_nonneg_int(prefix_len, "prefix_len")
        lengths = self.lengths_list(segment_len, segment_lengths)
        n = self.seq_len(segment_len)
        nb = lengths and len(lengths) or 1

        def classify(counts: torch.Tensor, key_len: int) -> torch.Tensor:
            # counts: [B, N, K] visible keys of each row in each key block.
            mb = math.ceil(n / block_m)
            kb = counts.shape[2]
            padded = torch.zeros(counts.shape[0], mb * block_m, kb, dtype=torch.int64)
            padded[:, :n] = counts
            tile_sum = padded.view(counts.shape[0], mb, block_m, kb).sum(2)
            rows = (torch.clamp(n - torch.arange(mb) * block_m, max=block_m))[:, None]
            cols = (torch.clamp(key_len - torch.arange(kb) * block_n, max=block_n))[None, :]
            out = torch.full(tile_sum.shape, TILE_PARTIAL, dtype=torch.int8)
            out[tile_sum == 0] = TILE_EMPTY
            out[tile_sum == rows * cols] = TILE_FULL
            return out

        starts = list(range(0, n, block_n))
        ends = [min(s + block_n, n) for s in starts]
        packed = classify(self._packed_counts(segment_len, lengths, starts, ends), n)
        pstarts = list(range(0, prefix_len, block_n))
        pwidths = torch.tensor([min(block_n, prefix_len - s) for s in pstarts], dtype=torch.int64)
        pcounts = self.prefix_visible(segment_len).to(torch.int64)[None, :, None] * pwidths[None, None, :]
        prefix = classify(pcounts.expand(nb, n, len(pstarts)), prefix_len)
        return TileClasses(prefix=prefix, packed=packed)

    # ------------------------------------------------------------- blocks

    def blocks(self, segment_len: int, prefix_len: int = 0, segment_length: Optional[int] = None) -> list:
        """Exact decomposition of one batch row's mask into :class:`AttentionBlock` s.

        The blocks do not overlap and their union is ``dense_mask(...)`` for a batch row whose valid
        segment length is ``segment_length`` (default S). Rectangles sharing a key range over adjacent
        rows are merged, so a stock attention kernel runs as few calls as the mask allows; rows
        covered by several blocks are combined by log-sum-exp.
        """
        r, s = self.num_read, segment_len
        n = self.seq_len(segment_len)
        _check_nonneg_int(prefix_len, "prefix_len")
        length = s if segment_length is None else _check_nonneg_int(segment_length, "segment_length")
        if length > s:
            raise ValueError(f"segment_length={length} exceeds S={s}")
        v = r + length  # packed keys [0, v) and [r + s, n) are valid
        out = []

        def add(r0, r1, src, k0, k1, causal=False, offset=0):
            if r1 > r0 and k1 > k0:
                out.append(AttentionBlock(r0, r1, src, k0, k1, causal, offset))

        if prefix_len:
            if self.prefix_visible_to == "all":
                add(0, n, "prefix", 0, prefix_len)
            else:
                add(r, r + s, "prefix", 0, prefix_len)
        if self.mask == "causal" and v == r + s:
            add(0, n, "packed", 0, n, causal=True)
        elif self.mask == "causal":
            add(0, v, "packed", 0, v, causal=True)
            add(v, n, "packed", 0, v)
            add(r + s, n, "packed", r + s, n, causal=True)
        elif self.mask == "memory_bidirectional":
            add(0, r, "packed", 0, r)
            add(r, v, "packed", 0, v, causal=True, offset=r)  # X rows: all of R, causal over valid X
            add(r + s, n, "packed", r + s, n)
            add(v, n, "packed", 0, v)  # padded X rows and W rows over R and the valid X
        else:
            add(0, n, "packed", 0, v)
            add(0, n, "packed", r + s, n)
        return _coalesce(out)


def _coalesce(blocks: list) -> list:
    """Merge non-causal blocks of one source whose key ranges touch and whose rows are equal."""
    merged = []
    for blk in blocks:
        for idx, other in enumerate(merged):
            if (
                not blk.causal
                and not other.causal
                and blk.source == other.source
                and (blk.row_start, blk.row_end) == (other.row_start, other.row_end)
                and (blk.key_start == other.key_end or other.key_start == blk.key_end)
            ):
                merged[idx] = other._replace(
                    key_start=min(blk.key_start, other.key_start), key_end=max(blk.key_end, other.key_end)
                )
                break
        else:
            merged.append(blk)
    return merged


def attention_flops(
    layout: MemoryLayout,
    batch: int,
    heads: int,
    head_dim: int,
    segment_len: int,
    prefix_len: int = 0,
    segment_lengths: LengthsLike = None,
    mode: str = "fwd",
) -> float:
    """FLOPs of one ``segment_attention`` call counted from the mask (SPEC §2).

    ``4 * B * H_q * D * visible_pairs`` forward, 2.5 times that backward, 3.5 times for ``"fwd+bwd"``.
    """
    factors = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
    if mode not in factors:
        raise ValueError(f"mode must be one of {tuple(factors)}, got {mode!r}")
    pairs = layout.visible_pairs(segment_len, prefix_len, segment_lengths, batch=batch)
    return 4.0 * heads * head_dim * pairs * factors[mode]
