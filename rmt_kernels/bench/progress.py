"""Per-point progress of ``rmt-kernels bench`` on stderr: a tqdm bar on a terminal when tqdm is
installed, else one flushed ``[i/n] label`` line per point (readable in logs)."""

from __future__ import annotations

import sys


class Progress:
    """Call :meth:`start` before each point and :meth:`close` at the end; ``enabled=False`` prints nothing."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self.enabled = total, 0, enabled
        self._bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=total, file=sys.stderr, unit="pt", dynamic_ncols=True, leave=False)

    def start(self, label: str) -> None:
        """Announce the next point (the previous one, if any, is done)."""
        if self._bar is not None:
            if self.count:
                self._bar.update(1)
            self._bar.set_description_str(label[:60])
        elif self.enabled:
            print(f"[{self.count + 1}/{self.total}] {label}", file=sys.stderr, flush=True)
        self.count += 1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.update(self.count - self._bar.n)
            self._bar.close()
