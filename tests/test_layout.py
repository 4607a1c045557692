"""MemoryLayout: the one mask definition, checked against hand-drawn masks, the masks built by the
RMT paper's Transformer-XL code and by lucidrains' recurrent-memory-transformer-pytorch, and against
itself (counts, tile classes and block decomposition versus the dense mask)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from rmt_kernels import MemoryLayout, attention_flops
from rmt_kernels.layout import TILE_EMPTY, TILE_FULL, TILE_PARTIAL

FAMILIES = ("causal", "memory_bidirectional", "full")
VISIBILITY = ("segment", "all")


def drawn(*batch_rows: str) -> torch.Tensor:
    """Parse hand-drawn masks, one multi-line string per batch row, into bool ``[B, N, P + N]``.

    Each line is one query row: a label (``r0``, ``x1``, ``w0``) then ``1`` (visible) or ``.``
    (invisible) per key; ``|`` separates the prefix columns from the packed ones.
    """
    mats = []
    for text in batch_rows:
        rows = []
        for line in text.strip().splitlines():
            tokens = line.split()[1:]
            rows.append([tok == "1" for tok in tokens if tok != "|"])
            assert all(tok in ("1", ".", "|") for tok in tokens), line
        mats.append(torch.tensor(rows, dtype=torch.bool).reshape(len(rows), -1))
    return torch.stack(mats)


# --------------------------------------------------------------------------------------- drawn masks

HAND_DRAWN = [
    pytest.param(
        MemoryLayout(2, 2, "causal"), 4, 0, None,
        drawn("""
            r0 1 . . . . . . .
            r1 1 1 . . . . . .
            x0 1 1 1 . . . . .
            x1 1 1 1 1 . . . .
            x2 1 1 1 1 1 . . .
            x3 1 1 1 1 1 1 . .
            w0 1 1 1 1 1 1 1 .
            w1 1 1 1 1 1 1 1 1
        """),
        id="spec-causal-R2-S4-W2",
    ),
    pytest.param(
        MemoryLayout(2, 2, "memory_bidirectional"), 4, 0, None,
        drawn("""
            r0 1 1 . . . . . .
            r1 1 1 . . . . . .
            x0 1 1 1 . . . . .
            x1 1 1 1 1 . . . .
            x2 1 1 1 1 1 . . .
            x3 1 1 1 1 1 1 . .
            w0 1 1 1 1 1 1 1 1
            w1 1 1 1 1 1 1 1 1
        """),
        id="spec-memory_bidirectional-R2-S4-W2",
    ),
    pytest.param(
        MemoryLayout(2, 2, "full"), 4, 0, None,
        drawn("""
            r0 1 1 1 1 1 1 1 1
            r1 1 1 1 1 1 1 1 1
            x0 1 1 1 1 1 1 1 1
            x1 1 1 1 1 1 1 1 1
            x2 1 1 1 1 1 1 1 1
            x3 1 1 1 1 1 1 1 1
            w0 1 1 1 1 1 1 1 1
            w1 1 1 1 1 1 1 1 1
        """),
        id="spec-full-R2-S4-W2",
    ),
    pytest.param(
        MemoryLayout(1, 1, "memory_bidirectional"), 3, 0, [2, 0],
        drawn(
            """
            r0 1 . . . .
            x0 1 1 . . .
            x1 1 1 1 . .
            x2 1 1 1 . .
            w0 1 1 1 . 1
            """,
            """
            r0 1 . . . .
            x0 1 . . . .
            x1 1 . . . .
            x2 1 . . . .
            w0 1 . . . 1
            """,
        ),
        id="memory_bidirectional-padded-and-fully-padded",
    ),
    pytest.param(
        MemoryLayout(2, 2, "causal"), 2, 0, [1, 0],
        drawn(
            """
            r0 1 . . . . .
            r1 1 1 . . . .
            x0 1 1 1 . . .
            x1 1 1 1 . . .
            w0 1 1 1 . 1 .
            w1 1 1 1 . 1 1
            """,
            """
            r0 1 . . . . .
            r1 1 1 . . . .
            x0 1 1 . . . .
            x1 1 1 . . . .
            w0 1 1 . . 1 .
            w1 1 1 . . 1 1
            """,
        ),
        id="causal-padded-and-fully-padded",
    ),
    pytest.param(
        MemoryLayout(1, 1, "full"), 2, 0, [1, 0],
        drawn(
            """
            r0 1 1 . 1
            x0 1 1 . 1
            x1 1 1 . 1
            w0 1 1 . 1
            """,
            """
            r0 1 . . 1
            x0 1 . . 1
            x1 1 . . 1
            w0 1 . . 1
            """,
        ),
        id="full-padded-and-fully-padded",
    ),
    pytest.param(
        MemoryLayout(1, 1, "memory_bidirectional", "segment"), 2, 2, None,
        drawn("""
            r0 . . | 1 . . .
            x0 1 1 | 1 1 . .
            x1 1 1 | 1 1 1 .
            w0 . . | 1 1 1 1
        """),
        id="prefix-visible-to-segment",
    ),
    pytest.param(
        MemoryLayout(1, 1, "memory_bidirectional", "all"), 2, 2, None,
        drawn("""
            r0 1 1 | 1 . . .
            x0 1 1 | 1 1 . .
            x1 1 1 | 1 1 1 .
            w0 1 1 | 1 1 1 1
        """),
        id="prefix-visible-to-all",
    ),
    pytest.param(
        MemoryLayout(1, 1, "causal", "segment"), 2, 1, [1],
        drawn("""
            r0 . | 1 . . .
            x0 1 | 1 1 . .
            x1 1 | 1 1 . .
            w0 . | 1 1 . 1
        """),
        id="causal-prefix-segment-padded",
    ),
    pytest.param(
        MemoryLayout(0, 0, "full", "all"), 2, 1, [0, 2],
        drawn(
            """
            x0 1 | . .
            x1 1 | . .
            """,
            """
            x0 1 | 1 1
            x1 1 | 1 1
            """,
        ),
        id="full-prefix-all-R0-W0-padded",
    ),
    pytest.param(
        MemoryLayout(0, 2, "memory_bidirectional"), 3, 0, None,
        drawn("""
            x0 1 . . . .
            x1 1 1 . . .
            x2 1 1 1 . .
            w0 1 1 1 1 1
            w1 1 1 1 1 1
        """),
        id="memory_bidirectional-R0-write-only",
    ),
    pytest.param(
        MemoryLayout(0, 2, "causal"), 3, 0, None,
        drawn("""
            x0 1 . . . .
            x1 1 1 . . .
            x2 1 1 1 . .
            w0 1 1 1 1 .
            w1 1 1 1 1 1
        """),
        id="causal-R0-write-only",
    ),
    pytest.param(
        MemoryLayout(2, 0, "memory_bidirectional"), 3, 0, None,
        drawn("""
            r0 1 1 . . .
            r1 1 1 . . .
            x0 1 1 1 . .
            x1 1 1 1 1 .
            x2 1 1 1 1 1
        """),
        id="memory_bidirectional-W0-read-only",
    ),
    pytest.param(
        MemoryLayout(0, 0, "memory_bidirectional"), 3, 0, [0, 2],
        drawn(
            """
            x0 . . .
            x1 . . .
            x2 . . .
            """,
            """
            x0 1 . .
            x1 1 1 .
            x2 1 1 .
            """,
        ),
        id="R0-W0-fully-padded-rows-see-nothing",
    ),
    pytest.param(
        MemoryLayout(2, 1, "memory_bidirectional"), 0, 0, None,
        drawn("""
            r0 1 1 .
            r1 1 1 .
            w0 1 1 1
        """),
        id="S0-memory-only",
    ),
]


@pytest.mark.parametrize("layout, s, p, lengths, expected", HAND_DRAWN)
def test_dense_mask_matches_hand_drawn(layout, s, p, lengths, expected):
    got = layout.dense_mask(s, p, lengths)
    assert got.dtype == torch.bool
    assert got.shape == expected.shape
    assert torch.equal(got, expected), f"\n{got.int()}\n!=\n{expected.int()}"
    as_tensor = None if lengths is None else torch.tensor(lengths)
    assert torch.equal(layout.dense_mask(s, p, as_tensor), expected)


def test_dense_mask_empty_segment_has_no_rows():
    assert MemoryLayout(0, 0).dense_mask(0).shape == (1, 0, 0)
    assert MemoryLayout(0, 0).dense_mask(0, 3).shape == (1, 0, 3)


# ------------------------------------------------------------------ the RMT paper's Transformer-XL code


def paper_code_mask(num_mem: int, seg_len: int, cache_len: int, read_mem_from_cache: bool) -> torch.Tensor:
    """The mask of the RMT paper's Transformer-XL code (booydar/LM-RMT ``mem_transformer.py``), built
    the way that code builds it: a ``triu`` of ones marks the *masked* pairs over ``[cache | R | X | W]``
    keys (``R = W = num_mem``, memory written at the end), then the memory blocks are opened and the
    cache is closed to memory rows unless ``read_mem_from_cache``. Returns bool ``[N, P + N]``,
    True = visible."""
    qlen = 2 * num_mem + seg_len
    klen = cache_len + qlen
    masked = torch.triu(torch.ones(qlen, klen, dtype=torch.uint8), diagonal=1 + cache_len)
    if num_mem:
        closed = 1 - int(read_mem_from_cache)
        masked[:num_mem, cache_len : cache_len + num_mem] = 0  # read rows see all read memory
        masked[:num_mem, :cache_len] = closed
        masked[-num_mem:, -num_mem:] = 0  # write rows see all write memory
        masked[-num_mem:, :cache_len] = closed
    return masked == 0


@pytest.mark.parametrize("read_mem_from_cache", [False, True], ids=["cache-to-segment", "cache-to-all"])
def test_memory_bidirectional_matches_paper_code(read_mem_from_cache):
    visibility = "all" if read_mem_from_cache else "segment"
    checked = 0
    for m, s, cache in itertools.product((0, 1, 2, 5, 16), (1, 2, 7, 33), (0, 1, 5, 40)):
        layout = MemoryLayout(m, m, "memory_bidirectional", visibility)
        expected = paper_code_mask(m, s, cache, read_mem_from_cache)
        got = layout.dense_mask(s, cache)[0]
        assert torch.equal(got, expected), f"M={m} S={s} cache={cache}"
        checked += 1
    assert checked == 80


# ------------------------------------------------------------- lucidrains recurrent-memory-transformer


def _lucidrains_masks(monkeypatch, num_mem, seg_len, pad_lengths, read_memories, xl):
    """Run a tiny lucidrains RecurrentMemoryTransformer and capture the mask its attention receives.

    Returns ``(mask [B or 1, N, K], num_read, prefix_len)``. The model is called twice when ``xl``
    (the second call reads the first call's XL memories and write memories)."""
    rmt = pytest.importorskip("recurrent_memory_transformer_pytorch")
    from recurrent_memory_transformer_pytorch import attend

    captured = []
    original = attend.Attend.forward

    def spy(self, q, k, v, mask=None):
        captured.append((q.shape[-2], k.shape[-2], mask))
        return original(self, q, k, v, mask=mask)

    monkeypatch.setattr(attend.Attend, "forward", spy)
    model = rmt.RecurrentMemoryTransformer(
        8, num_tokens=11, depth=1, num_memory_tokens=num_mem, seq_len=seg_len, dim_head=4, heads=1,
        num_residual_streams=1, always_have_read_memories=read_memories, use_xl_memories=True,
    ).eval()
    b = len(pad_lengths) if pad_lengths is not None else 2
    tokens = torch.randint(0, 11, (b, seg_len))
    key_mask = None
    if pad_lengths is not None:
        key_mask = torch.arange(seg_len)[None, :] < torch.tensor(pad_lengths)[:, None]
    with torch.no_grad():
        _, memories, xl_memories = model(tokens, mask=key_mask)
        prefix_extra = 0
        if xl:
            captured.clear()
            _, _, _ = model(tokens, memories, mask=key_mask, xl_memories=xl_memories)
            prefix_extra = xl_memories[0].shape[-2]
    assert len(captured) == 1
    n, keys, mask = captured[0]
    num_read = n - seg_len - num_mem
    assert mask.dim() == 4 and mask.shape[1] == 1
    assert keys - n == 1 + prefix_extra  # the null key (+ the XL memories) before the packed keys
    return mask[:, 0], num_read, keys - n


LUCIDRAINS = [
    pytest.param(1, 4, None, False, False, id="M1-S4-first-segment-no-read"),
    pytest.param(3, 6, None, True, False, id="M3-S6-read-memory-emb"),
    pytest.param(2, 5, [3, 5], False, False, id="M2-S5-padded-no-read"),
    pytest.param(2, 5, [5, 0, 2], True, True, id="M2-S5-fully-padded-with-xl"),
    pytest.param(4, 1, None, True, True, id="M4-S1-xl"),
    pytest.param(5, 7, [7, 1], True, True, id="M5-S7-padded-xl"),
]


@pytest.mark.parametrize("num_mem, seg_len, pad_lengths, read_memories, xl", LUCIDRAINS)
def test_memory_bidirectional_matches_lucidrains(monkeypatch, num_mem, seg_len, pad_lengths, read_memories, xl):
    captured, num_read, prefix_len = _lucidrains_masks(
        monkeypatch, num_mem, seg_len, pad_lengths, read_memories, xl
    )
    assert num_read == (num_mem if read_memories or xl else 0)
    # lucidrains: memory_not_causal (the default) and the null key / XL memories seen by every row.
    layout = MemoryLayout(num_read, num_mem, "memory_bidirectional", "all")
    expected = layout.dense_mask(seg_len, prefix_len, pad_lengths)
    assert torch.equal(captured.expand_as(expected), expected), f"\n{captured.int()}\n!=\n{expected.int()}"


# ------------------------------------------------------------------------------ grid of layouts


def layouts():
    for mask, vis in itertools.product(FAMILIES, VISIBILITY):
        for r, w in ((0, 0), (0, 3), (2, 0), (3, 2)):
            yield MemoryLayout(r, w, mask, vis)


GRID_S = (0, 1, 5)
GRID_P = (0, 3)


def test_key_end_and_prefix_visible_describe_dense_mask():
    for layout in layouts():
        for s, p in itertools.product(GRID_S, GRID_P):
            n = layout.seq_len(s)
            dense = layout.dense_mask(s, p)[0]
            packed = dense[:, p:]
            ends = layout.key_end(s)
            j = torch.arange(n)
            assert torch.equal(packed, j[None, :] < ends[:, None]), (layout, s, p)
            assert torch.equal(dense[:, :p], layout.prefix_visible(s)[:, None].expand(n, p))


def test_key_valid_is_padding():
    layout = MemoryLayout(2, 1, "full")
    valid = layout.key_valid(3, [3, 1, 0])
    expected = torch.tensor(
        [
            [1, 1, 1, 1, 1, 1],
            [1, 1, 1, 0, 0, 1],
            [1, 1, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(valid, expected)


def test_row_classes():
    assert MemoryLayout(2, 1).row_classes(3).tolist() == [0, 0, 1, 1, 1, 2]
    assert MemoryLayout(0, 0).row_classes(2).tolist() == [1, 1]


def test_visible_counts_and_pairs_equal_dense_sums():
    for layout in layouts():
        for s, p in itertools.product(GRID_S, GRID_P):
            for lengths in (None, [s], [s, 0, s // 2]):
                dense = layout.dense_mask(s, p, lengths)
                counts = layout.visible_counts(s, p, lengths)
                assert counts.dtype == torch.int64
                assert torch.equal(counts, dense.sum(-1)), (layout, s, p, lengths)
                assert layout.visible_pairs(s, p, lengths) == int(dense.sum())
                if lengths is None:
                    assert layout.visible_pairs(s, p, batch=3) == 3 * int(dense.sum())


def test_visible_pairs_counts_the_drawn_ones():
    # SPEC §2 drawings: 36, 38 and 64 ones.
    assert MemoryLayout(2, 2, "causal").visible_pairs(4) == 36
    assert MemoryLayout(2, 2, "memory_bidirectional").visible_pairs(4) == 38
    assert MemoryLayout(2, 2, "full").visible_pairs(4) == 64


def test_visible_pairs_batch_mismatch():
    with pytest.raises(ValueError, match="batch"):
        MemoryLayout(1, 1).visible_pairs(3, segment_lengths=[3, 2], batch=3)
    assert MemoryLayout(1, 1).visible_pairs(3, segment_lengths=[3, 2], batch=2) == int(
        MemoryLayout(1, 1).dense_mask(3, 0, [3, 2]).sum()
    )


def test_attention_flops_from_mask():
    layout = MemoryLayout(2, 2, "memory_bidirectional")
    b, h, d = 2, 3, 16
    assert attention_flops(layout, b, h, d, 4) == 4 * b * h * d * 38
    assert attention_flops(layout, b, h, d, 4, mode="bwd") == 2.5 * 4 * b * h * d * 38
    assert attention_flops(layout, b, h, d, 4, mode="fwd+bwd") == 3.5 * 4 * b * h * d * 38
    lengths = [4, 1]
    pairs = int(layout.dense_mask(4, 5, lengths).sum())
    assert attention_flops(layout, b, h, d, 4, prefix_len=5, segment_lengths=lengths) == 4 * h * d * pairs
    with pytest.raises(ValueError, match="mode"):
        attention_flops(layout, b, h, d, 4, mode="backward")


# ------------------------------------------------------------------------------ tile classification


def brute_force_tiles(dense: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """int8 ``[B, ceil(rows / block_m), ceil(cols / block_n)]`` tile classes of a bool mask, judged on
    the in-range elements of each tile."""
    b, rows, cols = dense.shape
    out = torch.empty(b, math.ceil(rows / block_m), math.ceil(cols / block_n), dtype=torch.int8)
    for bi in range(b):
        for ti in range(out.shape[1]):
            for tj in range(out.shape[2]):
                tile = dense[bi, ti * block_m : (ti + 1) * block_m, tj * block_n : (tj + 1) * block_n]
                out[bi, ti, tj] = TILE_EMPTY if not tile.any() else TILE_FULL if tile.all() else TILE_PARTIAL
    return out


TILE_CASES = [
    pytest.param(MemoryLayout(3, 2, "memory_bidirectional"), 11, 0, None, id="mb-R3-W2-S11"),
    pytest.param(MemoryLayout(4, 4, "memory_bidirectional", "segment"), 9, 5, [9, 0, 4], id="mb-prefix-seg-padded"),
    pytest.param(MemoryLayout(4, 0, "causal", "all"), 13, 7, [13, 6], id="causal-prefix-all-padded"),
    pytest.param(MemoryLayout(0, 5, "causal"), 8, 0, [0], id="causal-write-only-fully-padded"),
    pytest.param(MemoryLayout(2, 3, "full", "segment"), 10, 3, [10, 2], id="full-prefix-seg-padded"),
    pytest.param(MemoryLayout(0, 0, "full", "all"), 17, 1, None, id="full-R0-W0-P1"),
    pytest.param(MemoryLayout(16, 16, "memory_bidirectional", "all"), 33, 37, [33, 20], id="mb-M16-P37"),
]


@pytest.mark.parametrize("layout, s, p, lengths", TILE_CASES)
def test_classify_tiles_matches_brute_force(layout, s, p, lengths):
    dense = layout.dense_mask(s, p, lengths)
    # 1x1 tiles are the mask itself; the others include tails (sizes that do not divide N or P).
    for block_m, block_n in ((1, 1), (2, 3), (4, 4), (5, 7), (16, 16), (3, 64), (64, 2)):
        tiles = layout.classify_tiles(s, block_m, block_n, p, lengths)
        assert tiles.prefix.dtype == torch.int8 and tiles.packed.dtype == torch.int8
        expected_prefix = brute_force_tiles(dense[:, :, :p], block_m, block_n)
        expected_packed = brute_force_tiles(dense[:, :, p:], block_m, block_n)
        assert torch.equal(tiles.prefix, expected_prefix), (block_m, block_n)
        assert torch.equal(tiles.packed, expected_packed), (block_m, block_n)


def test_classify_tiles_unit_tiles_are_the_mask():
    layout = MemoryLayout(2, 2, "causal")
    tiles = layout.classify_tiles(4, 1, 1)
    assert torch.equal(tiles.packed == TILE_FULL, layout.dense_mask(4))
    assert not (tiles.packed == TILE_PARTIAL).any()


# ------------------------------------------------------------------------------ block decomposition


def paint_blocks(blocks, n: int, p: int) -> torch.Tensor:
    """int ``[N, P + N]``: how many blocks cover each (row, key) pair. A causal block is painted as
    the stock top-left aligned ``is_causal`` call over query rows ``[row_start - offset, row_end)``
    with its first ``offset`` rows discarded (the ``AttentionBlock`` contract)."""
    count = torch.zeros(n, p + n, dtype=torch.int64)
    for blk in blocks:
        assert blk.source in ("prefix", "packed"), blk
        key_len = p if blk.source == "prefix" else n
        assert 0 <= blk.row_start < blk.row_end <= n, blk
        assert 0 <= blk.key_start < blk.key_end <= key_len, blk
        col0 = 0 if blk.source == "prefix" else p
        cols = slice(col0 + blk.key_start, col0 + blk.key_end)
        rows = blk.row_end - blk.row_start
        keys = blk.key_end - blk.key_start
        if blk.causal:
            assert blk.offset >= 0 and blk.row_start - blk.offset >= 0, blk
            stock_call = torch.ones(rows + blk.offset, keys, dtype=torch.int64).tril()
            count[blk.row_start : blk.row_end, cols] += stock_call[blk.offset :]
        else:
            assert blk.offset == 0, blk
            count[blk.row_start : blk.row_end, cols] += 1
    return count


def test_blocks_tile_dense_mask_exactly():
    checked = 0
    for layout in layouts():
        for s, p in itertools.product((0, 1, 2, 5, 8), (0, 2)):
            n = layout.seq_len(s)
            for length in range(s + 1):
                blocks = layout.blocks(s, p, length)
                count = paint_blocks(blocks, n, p)
                dense = layout.dense_mask(s, p, [length])[0]
                assert count.max() <= 1 if count.numel() else True, (layout, s, p, length, blocks)
                assert torch.equal(count.bool(), dense), (layout, s, p, length, blocks)
                checked += 1
            assert layout.blocks(s, p) == layout.blocks(s, p, s)
    assert checked == 24 * 2 * (1 + 2 + 3 + 6 + 9)


def test_blocks_are_few():
    # One stock call when the mask allows it.
    assert len(MemoryLayout(0, 0, "causal").blocks(64)) == 1
    assert len(MemoryLayout(4, 4, "causal").blocks(64)) == 1
    assert len(MemoryLayout(4, 4, "full").blocks(64)) == 1
    # memory_bidirectional: R rows, X rows (causal), W rows.
    assert len(MemoryLayout(4, 4, "memory_bidirectional").blocks(64)) == 3


# ------------------------------------------------------------------------------ invalid arguments


@pytest.mark.parametrize(
    "args, kwargs, exc, match",
    [
        pytest.param((-1, 0), {}, ValueError, "num_read", id="negative-read"),
        pytest.param((0, -2), {}, ValueError, "num_write", id="negative-write"),
        pytest.param((1.0, 0), {}, TypeError, "num_read", id="float-read"),
        pytest.param((True, 0), {}, TypeError, "num_read", id="bool-read"),
        pytest.param((0, "2"), {}, TypeError, "num_write", id="str-write"),
        pytest.param((1, 1), {"mask": "bidirectional"}, ValueError, "mask", id="unknown-mask"),
        pytest.param((1, 1), {"mask": None}, ValueError, "mask", id="mask-none"),
        pytest.param((1, 1), {"prefix_visible_to": "memory"}, ValueError, "prefix_visible_to", id="unknown-visibility"),
    ],
)
def test_constructor_rejects_bad_arguments(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        MemoryLayout(*args, **kwargs)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        pytest.param(lambda lay: lay.dense_mask(-1), ValueError, "segment_len", id="negative-S"),
        pytest.param(lambda lay: lay.dense_mask(4, -1), ValueError, "prefix_len", id="negative-P"),
        pytest.param(lambda lay: lay.dense_mask(4.0), TypeError, "segment_len", id="float-S"),
        pytest.param(lambda lay: lay.dense_mask(4, 0, [5]), ValueError, "segment_lengths", id="length-above-S"),
        pytest.param(lambda lay: lay.dense_mask(4, 0, [-1]), ValueError, "segment_lengths", id="negative-length"),
        pytest.param(
            lambda lay: lay.dense_mask(4, 0, torch.tensor([[4]])), ValueError, "segment_lengths", id="lengths-2d"
        ),
        pytest.param(
            lambda lay: lay.dense_mask(4, 0, torch.tensor([4.0])), TypeError, "segment_lengths", id="lengths-float"
        ),
        pytest.param(lambda lay: lay.segment_len(3), ValueError, "num_read", id="N-below-R+W"),
        pytest.param(lambda lay: lay.classify_tiles(4, 0, 16), ValueError, "block_m", id="block_m-0"),
        pytest.param(lambda lay: lay.classify_tiles(4, 16, -1), ValueError, "block_n", id="block_n-negative"),
        pytest.param(lambda lay: lay.blocks(4, 0, 5), ValueError, "segment_length", id="blocks-length-above-S"),
        pytest.param(lambda lay: lay.blocks(4, -3), ValueError, "prefix_len", id="blocks-negative-P"),
    ],
)
def test_methods_reject_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call(MemoryLayout(2, 2))
