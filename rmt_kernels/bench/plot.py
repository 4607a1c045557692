"""The attention plot: TFLOP/s (counted from the mask) against segment length, one line per provider.

One panel per (mode, mask family). Colours are providers; marker shapes are shape series (shapes
that differ only in S share a series and a line). The ``sdpa_causal`` rows of the non-causal families
compute a different mask and are drawn with open markers and dashed lines as the stock-kernel speed
of light.
"""

from __future__ import annotations

from typing import List, Sequence

from ..layout import MASK_FAMILIES
from .records import is_speed_of_light
from .shapes import MODES

_MARKERS = "osD^v<>ph*"


def _series(row: dict) -> str:
    return row.get("series") or row["shape"]


def plot_attention(rows: Sequence[dict], path: str, title: str) -> None:
    """Write a PNG of the ``ok`` attention rows to ``path``.

    Raises:
        ValueError: no attention point ran (no image is written rather than an empty one).
        ImportError: matplotlib is not installed (``pip install matplotlib``, or ``.[bench]``).
    """
    ok = [r for r in rows if r["suite"] == "attention" and r["status"] == "ok" and r["tflops"] is not None]
    if not ok:
        raise ValueError("no attention point ran, nothing to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(r["mode"] == m for r in ok)]
    masks: List[str] = [m for m in MASK_FAMILIES if any(r["mask"] == m for r in ok)]
    providers = list(dict.fromkeys(r["provider"] for r in ok))
    series = list(dict.fromkeys(_series(r) for r in ok))
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    markers = {s: _MARKERS[i % len(_MARKERS)] for i, s in enumerate(series)}
    fig, axes = plt.subplots(
        len(modes), len(masks), figsize=(4.6 * len(masks), 3.4 * len(modes)), squeeze=False, sharex=True
    )
    for i, mode in enumerate(modes):
        for j, mask in enumerate(masks):
            ax = axes[i][j]
            for provider in providers:
                for s in series:
                    pts = sorted(
                        (r["segment_len"], r["tflops"], is_speed_of_light(r))
                        for r in ok
                        if r["mode"] == mode and r["mask"] == mask and r["provider"] == provider
                        and _series(r) == s
                    )
                    if not pts:
                        continue
                    sol = pts[0][2]
                    ax.plot(
                        [p[0] for p in pts], [p[1] for p in pts], marker=markers[s], color=colors[provider],
                        linestyle="--" if sol else "-", linewidth=1.2, markersize=5,
                        markerfacecolor="none" if sol else colors[provider],
                    )
            ax.set_title(f"{mask}, {mode}", fontsize=9)
            ax.grid(True, alpha=0.3)
            if i == len(modes) - 1:
                ax.set_xlabel("segment length S")
            if j == 0:
                ax.set_ylabel("TFLOP/s (from the mask)")
    handles = [plt.Line2D([], [], color=colors[p], label=p) for p in providers]
    sol = "open/dashed: sdpa_causal on a cheaper mask (speed of light)"
    handles += [plt.Line2D([], [], color="gray", linestyle="--", marker="o", markerfacecolor="none", label=sol)]
    handles += [plt.Line2D([], [], color="gray", marker=markers[s], linestyle="none", label=s) for s in series]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1 if len(handles) > 6 else 0.07, 1, 0.95))
    fig.savefig(path, dpi=120)
    plt.close(fig)
