"""The tables ``rmt-kernels bench`` prints: one per suite, skipped and failed rows as numbered reasons."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from . import overhead
from .records import is_speed_of_light
from .shapes import GOAL_SHAPE
from .step import memory_kind


def _fmt(x: Optional[float], spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


class _Footnotes:
    """Numbered reasons for skipped/failed rows, printed under each table."""

    def __init__(self):
        self.reasons: Dict[str, int] = {}

    def ref(self, row: dict) -> str:
        n = self.reasons.setdefault(row["reason"], len(self.reasons) + 1)
        return f"{row['status']} [{n}]"

    def lines(self) -> List[str]:
        return [f"  [{n}] {reason}" for reason, n in self.reasons.items()]


def _print_table(title: str, header: Sequence[str], body: List[List[str]], notes: _Footnotes) -> None:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    print(f"\n== {title} ==")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    prev = None
    for r in body:
        key = tuple(r[:3])
        cells = [c if key != prev or i >= 3 else "" for i, c in enumerate(r)]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        prev = key
    for line in notes.lines():
        print(line)


NOISE_MARK = "~"


def _noise(flag: Optional[bool]) -> str:
    return NOISE_MARK if flag else ""


def _ratio(row: dict) -> str:
    if row["ratio_to_best_peer"] is None:
        return "-"
    return f"{_noise(row['noisy'])}{row['ratio_to_best_peer']:.2f}x {row['best_peer']}"


def _print_noise_legend(rows: List[dict], flags: Sequence[str] = ("noisy",)) -> None:
    """The line under every table that explains the ``~`` mark and counts the ratios it marks."""
    values = [r[f] for r in rows for f in flags if r[f] is not None]
    print(
        f"  {NOISE_MARK}: noisy ratio ({sum(values)} of {len(values)}): its interval over the two spreads "
        "(peer p20 / row p80 to peer p80 / row p20) contains 1,"
    )
    print("  i.e. the spread is wider than the margin; such a ratio does not rank the two providers.")


def print_attention(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        name = r["provider"] + (" (SoL)" if is_speed_of_light(r) else "")
        if r["status"] == "ok":
            body.append([
                r["shape"], r["mask"], r["mode"], name, f"{r['median_ms']:.3f}",
                f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _fmt(r["tflops"], ".3g"),
                _fmt(r["pct_peak"], ".1f", "n/a"), _ratio(r),
                _noise(r["noisy_vs_sdpa_dense"]) + _fmt(r["ratio_to_sdpa_dense"], ".2f"),
            ])
        else:
            body.append([r["shape"], r["mask"], r["mode"], name, notes.ref(r), "", "", "", "", ""])
    header = ["shape", "mask", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "% peak",
              "vs best peer", "vs sdpa_dense"]
    _print_table(f"attention ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    print("  TFLOP/s counted from the mask (visible pairs); ratios are peer time / row time (> 1: faster);")
    print("  (SoL): is_causal over all N rows, a different (cheaper) mask: stock kernels' speed of light.")
    _print_noise_legend(rows, ("noisy", "noisy_vs_sdpa_dense"))
    composed = [r for r in rows if r["provider"] == "sdpa_composed" and r["ratio_to_sdpa_dense"] is not None]
    if composed:
        print(
            "\n  torch backend (sdpa_composed) vs dense-mask SDPA, time ratio (> 1: torch backend faster), "
            "interval over the spreads:"
        )
        for r in composed:
            goal = (
                r["shape"] == GOAL_SHAPE.name and r["mask"] == "memory_bidirectional" and r["mode"] == "fwd+bwd"
            )
            mark = "   <- goal point (goal: >= 1.5x)" if goal else ""
            interval = f"{r['ratio_to_sdpa_dense_low']:.2f}-{r['ratio_to_sdpa_dense_high']:.2f}"
            noisy = " noisy" if r["noisy_vs_sdpa_dense"] else ""
            print(
                f"    {r['shape']:<22} {r['mask']:<21} {r['mode']:<8} {r['ratio_to_sdpa_dense']:.2f}x "
                f"({interval}){noisy}{mark}"
            )


def print_handoff(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        size = f"B{r['batch']} N{r['seq_len']} d{r['dim']}"
        if r["status"] == "ok":
            body.append([
                r["shape"], size, r["mode"], r["provider"], f"{r['median_ms']:.4f}",
                f"{r['p20_ms']:.4f}-{r['p80_ms']:.4f}", f"{r['gbps']:.1f}", _fmt(r["pct_copy_bw"], ".0f"),
                _ratio(r),
            ])
        else:
            body.append([r["shape"], size, r["mode"], r["provider"], notes.ref(r), "", "", "", ""])
    header = ["shape", "sizes", "mode", "provider", "median ms", "p20-p80 ms", "GB/s", "% copy", "vs best peer"]
    _print_table(f"handoff ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    _print_noise_legend(rows)


def print_step(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        size = f"{r['layers']}L d{r['dim']} B{r['batch']} K{r['segments']}x{r['segment_len']} M{r['num_read']}"
        if r["status"] == "ok":
            body.append([
                r["shape"], size, r["mode"], r["provider"], f"{r['median_ms']:.1f}",
                f"{r['p20_ms']:.1f}-{r['p80_ms']:.1f}", _fmt(r["peak_mem_mb"], ".1f"), _ratio(r),
            ])
        else:
            body.append([r["shape"], size, r["mode"], r["provider"], notes.ref(r), "", "", ""])
    header = ["shape", "sizes", "mode", "provider", "median ms", "p20-p80 ms", "memory MB*", "vs best peer"]
    _print_table(f"step ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    print(f"  * memory: {memory_kind(torch.device(env['device']))}")
    _print_noise_legend(rows)


def _per_call(row: Optional[dict], notes: _Footnotes) -> List[str]:
    if row is None:
        return ["-", ""]
    if row["status"] != "ok":
        return [notes.ref(row), ""]
    return [f"{row['median_ms'] * 1e3:.1f}", f"{row['p20_ms'] * 1e3:.1f}-{row['p80_ms'] * 1e3:.1f}"]


def print_overhead(rows: List[dict], env: dict) -> None:
    """One line per point: per-call µs of ``rmt_kernels`` and ``stock``, their ratio, the goal."""
    notes = _Footnotes()
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in rows:
        key = (r["series"], r["shape"], r["mask"] or "-", r["mode"], overhead.execution(r))
        groups.setdefault(key, {})[r["provider"]] = r
    body = []
    for key, point in groups.items():
        ours, stock = point.get("rmt_kernels"), point.get("stock")
        ratio = None
        if ours is not None and ours["ratio_to_best_peer"]:
            ratio = 1.0 / ours["ratio_to_best_peer"]
        goal = overhead.goal_for(ours or stock)
        verdict = ""
        if goal is not None:
            verdict = f"<= {goal:g}x" + ("" if ratio is None else " met" if ratio <= goal else " MISSED")
        ratio_cell = "-" if ratio is None else f"{_noise(ours['noisy'])}{ratio:.2f}x"
        body.append([*key, *_per_call(ours, notes), *_per_call(stock, notes), ratio_cell, verdict])
    header = ["op", "shape", "mask", "mode", "run", "rmt_kernels us", "p20-p80", "stock us", "p20-p80",
              "rmt/stock", "goal"]
    where = rows[0]["device_name"] or env["device_name"]
    _print_table(f"overhead ({where}, {rows[0]['dtype']})", header, body, notes)
    print("  per-call microseconds (median, p20-p80 of samples of many calls); rmt/stock: rmt_kernels time over")
    print("  stock time (< 1: faster). stock: SDPA is_causal (for memory_bidirectional a floor: a cheaper mask),")
    print("  torch.cat for pack_segment; compiled: both wrapped in torch.compile(fullgraph=True).")
    print(f"  goals: CPU, 1 thread, shape {overhead.GOAL_SHAPE}, eager.")
    _print_noise_legend([r for r in rows if r["provider"] == "rmt_kernels"])


def print_dropout(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        if r["status"] == "ok":
            body.append([
                r["shape"], r["mask"], r["mode"], r["provider"], f"{r['median_ms']:.3f}",
                f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _fmt(r["tflops"], ".3g"), _ratio(r),
            ])
        else:
            body.append([r["shape"], r["mask"], r["mode"], r["provider"], notes.ref(r), "", "", ""])
    header = ["shape", "mask", "mode", "provider", "median ms", "p20-p80 ms", "TFLOP/s", "vs best peer"]
    _print_table(f"dropout p=0.1 ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    print("  attention with dropout_p=0.1, forward+backward; peer: SDPA with the dense mask and its dropout.")
    _print_noise_legend(rows)


def print_armt(rows: List[dict], env: dict) -> None:
    notes = _Footnotes()
    body = []
    for r in rows:
        if r["series"] == "block":
            size = f"B{r['batch']} N{r['seq_len']} M{r['num_write']} d{r['dim']}"
        else:
            size = f"{r['layers']}L d{r['dim']} B{r['batch']} K{r['segments']}x{r['segment_len']} M{r['num_write']}"
        if r["status"] == "ok":
            mem = _fmt(r["peak_mem_mb"], ".1f")
            body.append([r["series"], r["shape"], size, r["mode"], r["provider"], f"{r['median_ms']:.2f}",
                         f"{r['p20_ms']:.2f}-{r['p80_ms']:.2f}", mem, _ratio(r)])
        else:
            body.append([r["series"], r["shape"], size, r["mode"], r["provider"], notes.ref(r), "", "", ""])
    header = ["level", "shape", "sizes", "mode", "provider", "median ms", "p20-p80 ms", "memory MB", "vs einsum"]
    _print_table(f"armt ({env['device_name']}, {rows[0]['dtype']})", header, body, notes)
    shares = [r for r in rows if r["status"] == "ok" and r["series"] == "step" and r["note"] and "associative block" in r["note"]]
    for r in shares:
        print(f"  {r['shape']} {r['mode']} {r['provider']}: {r['note']}")
    _print_noise_legend(rows)
