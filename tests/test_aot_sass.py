"""The SASS reader of ``rmt-kernels aot`` (``sass_summary``) on hand-written listings: loops, nested
loops, no loop, branch targets as cuobjdump prints them (addresses) and as nvdisasm does (labels), and
the out-of-line wait that TMA code branches to and back from. Nothing is compiled here."""

from __future__ import annotations

import pytest

from rmt_kernels.tools import aot_triton as aot


def _listing(program, labels=False, name="kernel"):
    """A SASS listing of ``program`` (instructions, and ``"name:"`` labels), instructions 0x10 apart; a
    branch target ``{name}`` printed as cuobjdump does (``0x1d0``) or, with ``labels``, as nvdisasm
    (`` `(.L_x_name) `` and a ``.L_x_name:`` line)."""
    where, addr = {}, 0
    for item in program:
        if item.endswith(":"):
            where[item[:-1]] = addr
        else:
            addr += 0x10
    targets = {label: f"`(.L_x_{label})" if labels else hex(a) for label, a in where.items()}
    lines, addr = ["", "\tcode for sm_90a", f"\t\tFunction : {name}", '\t.headerflags\t@"EF_CUDA_SM90"'], 0
    for item in program:
        if item.endswith(":"):
            if labels:
                lines.append(f".L_x_{item[:-1]}:")
            continue
        lines.append(f"        /*{addr:04x}*/                   {item.format(**targets)} ;"
                     "                                  /* 0x00000a00ff017b82 */")
        lines.append(" " * 102 + "/* 0x000fe20000000800 */")
        addr += 0x10
    return "\n".join(lines) + "\n\t\t..........\n"


# A prologue product, then a loop (header at 0x20) with a TMA load, two HGMMA shapes, a warpgroup wait,
# a branch over a barrier, and a barrier arrive (not a wait); the self-branch after EXIT is never reached.
LOOP = [
    "MOV R1, c[0x0][0x28]",
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0",
    "top:",
    "BAR.SYNC.DEFER_BLOCKING 0x0",
    "UTMALDG.2D [UR8], [UR4]",
    "WARPGROUP.ARRIVE",
    "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24",
    "HGMMA.64x128x16.F32.BF16 R88, R24, gdesc[UR12].tnspB, R88, gsb0",
    "WARPGROUP.DEPBAR.LE gsb0, 0x0",
    "@P0 BRA {skip}",
    "BAR.SYNC 0x1",
    "skip:",
    "BAR.ARV 0x2, 0x80",
    "@P1 BRA {top}",
    "EXIT",
    "trap:",
    "BRA {trap}",
]


@pytest.mark.parametrize("labels", [pytest.param(False, id="addresses"), pytest.param(True, id="labels")])
def test_one_loop(labels):
    s = aot.sass_summary(_listing(LOOP, labels))
    assert s["hgmma_shapes"] == {"64x64x16": 2, "64x128x16": 1}
    assert s["uses_tma"] is True
    assert s["mma_loops"] == [s["main_loop"]]
    assert s["main_loop"] == dict(address="0x20", instructions=10, hgmma={"64x64x16": 1, "64x128x16": 1}, hmma=0,
                                  warpgroup_waits=1, barriers=2, tma_loads=1)


def test_no_loop():
    program = ["HMMA.16816.F32.BF16 R4, R8, R12, RZ", "@P0 BRA {out}", "BAR.SYNC.DEFER_BLOCKING 0x0",
               "HMMA.16816.F32.BF16 R4, R8, R12, R4", "out:", "EXIT", "trap:", "BRA {trap}"]
    for labels in (False, True):
        s = aot.sass_summary(_listing(program, labels))
        assert s == dict(hgmma_shapes={}, uses_tma=False, mma_loops=[], main_loop=None)
    assert aot.sass_summary("") == dict(hgmma_shapes={}, uses_tma=False, mma_loops=[], main_loop=None)


@pytest.mark.parametrize("labels", [pytest.param(False, id="addresses"), pytest.param(True, id="labels")])
def test_nested_loops_count_their_own_instructions(labels):
    """An inner loop's instructions are its own, not the outer loop's; the main loop is the one with
    the most products, here the inner one. ``BRA.U !UP0, target`` is a conditional branch."""
    program = [
        "MOV R1, c[0x0][0x28]",
        "outer:",
        "HGMMA.64x64x16.F32.F16 R24, gdesc[UR4], RZ, !UPT, gsb0",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "inner:",
        "WARPGROUP.ARRIVE",
        "HGMMA.64x256x16.F32.F16 R24, gdesc[UR8], R24",
        "HGMMA.64x256x16.F32.F16 R24, gdesc[UR8], R24, gsb0",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        "BRA.U !UP0, {inner}",
        "BAR.SYNC.DEFER_BLOCKING 0x0",
        "@P1 BRA {outer}",
        "EXIT",
    ]
    s = aot.sass_summary(_listing(program, labels))
    outer, inner = s["mma_loops"]
    assert outer == dict(address="0x10", instructions=4, hgmma={"64x64x16": 1}, hmma=0, warpgroup_waits=0, barriers=2,
                         tma_loads=0)
    assert inner == dict(address="0x30", instructions=5, hgmma={"64x256x16": 2}, hmma=0, warpgroup_waits=1,
                         barriers=0, tma_loads=0)
    assert s["main_loop"] == inner and s["hgmma_shapes"] == {"64x64x16": 1, "64x256x16": 2}


@pytest.mark.parametrize("labels", [pytest.param(False, id="addresses"), pytest.param(True, id="labels")])
def test_out_of_line_wait_is_no_loop_of_its_own(labels):
    """TMA code waits on an mbarrier: a try-wait, and on failure a branch to a retry block after EXIT that
    spins and branches back into the loop. That backward branch closes no loop (its target does not come
    before it on every path); the spin is a loop without products; the main loop keeps its counts."""
    program = [
        "MOV R1, c[0x0][0x28]",
        "top:",
        "SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [UR4+0x20000], R2",
        "@!P1 BRA {retry}",
        "resume:",
        "WARPGROUP.ARRIVE",
        "HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24, gsb0",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        "@P0 BRA {top}",
        "EXIT",
        "retry:",
        "SYNCS.PHASECHK.TRANS64 P1, [UR4+0x20000], R2",
        "@!P1 BRA {retry}",
        "BRA {resume}",
        "trap:",
        "BRA {trap}",
    ]
    s = aot.sass_summary(_listing(program, labels))
    assert s["mma_loops"] == [s["main_loop"]]
    # The retry block's way back belongs to the loop; its spin is a loop of its own.
    assert s["main_loop"] == dict(address="0x10", instructions=7, hgmma={"64x128x16": 1}, hmma=0, warpgroup_waits=1,
                                  barriers=0, tma_loads=0)


def test_sm80_loop_left_through_a_call():
    """ptxas leaves an sm_80 loop with ``@!P0 CALL.REL.NOINC`` past the ``BRA`` back to its top."""
    program = ["MOV R1, c[0x0][0x28]", "top:", "HMMA.16816.F32.BF16 R4, R8, R12, R4",
               "HMMA.16816.F32.BF16 R4, R8, R14, R4", "BAR.SYNC.DEFER_BLOCKING 0x0", "@!P0 CALL.REL.NOINC {out}",
               "BRA {top}", "out:", "EXIT", "trap:", "BRA {trap}"]
    s = aot.sass_summary(_listing(program))
    assert s["hgmma_shapes"] == {} and not s["uses_tma"]
    assert s["mma_loops"] == [dict(address="0x10", instructions=5, hgmma={}, hmma=2, warpgroup_waits=0, barriers=1,
                                   tma_loads=0)]


def test_functions_are_read_apart():
    """Each ``Function :`` of a listing starts again at address 0; the products of all are counted, the
    main loop is the one with the most products, the last of equals."""
    one = _listing(LOOP, name="a")
    two = _listing(["top:", "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24", "@P1 BRA {top}", "EXIT"], name="b")
    s = aot.sass_summary(one + two)
    assert s["hgmma_shapes"] == {"64x64x16": 3, "64x128x16": 1}
    assert [loop["address"] for loop in s["mma_loops"]] == ["0x20", "0x0"]
    assert s["main_loop"]["hgmma"] == {"64x64x16": 1, "64x128x16": 1}
    equal = aot.sass_summary(two + _listing(["MOV R1, R2", "top:", "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], R24",
                                             "@P1 BRA {top}", "EXIT"], name="c"))
    assert equal["main_loop"]["hgmma"] == {"64x32x16": 1}


def test_table_shows_the_sass_columns():
    base = dict(config={"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "TMA": True, "WARP_SPECIALIZE": False},
                dtype="bf16", head_dim=128, registers=200, spill_bytes=0, shared_bytes=1024, uses_wgmma=True,
                uses_mma=True)
    sass = aot.sass_summary(_listing(LOOP))
    rows = [aot.Result("k90", arch=90, **base, **sass), aot.Result("k80", arch=80, **base),
            aot.Result("k90", arch=90, **base)]  # the last two: no SASS read
    lines = aot.format_table(rows).splitlines()
    assert lines[0].split()[-5:] == ["hgmma", "N", "tma", "wait/bar", "status"]
    assert lines[2].split()[4:] == ["N64", "w8", "TMA", "200", "0", "1.0", "64,128", "yes", "1/2", "ok"]
    assert lines[3].split()[-4:] == ["-", "-", "-", "ok"] and lines[4].split()[-4:] == ["-", "-", "-", "ok"]
