"""``rmt-kernels build``: build the CUDA extension ``rmt_kernels._C`` just in time (what the first use
of ``backend="cuda"`` would do), or report the ahead-of-time build if one is installed."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from .. import _extension
from ..errors import BackendUnavailableError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build the CUDA extension rmt_kernels._C just in time into the cache directory (what the first "
        "use of backend='cuda' would do), or report the ahead-of-time build if one is installed."
    )
    parser.add_argument("--archs", default=None,
                        help="CUDA architectures, e.g. '8.0;9.0a' (default: RMT_KERNELS_CUDA_ARCHS, else torch's choice)")
    parser.add_argument("--cache-dir", default=None,
                        help=f"build directory (default: {_extension.ENV_CACHE_DIR} or ~/.cache/rmt_kernels/...)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")


def run(args) -> int:
    module = _extension.AOT_MODULE
    if _extension.aot_available():
        print(f"{module} is installed (built ahead of time): {importlib.util.find_spec(module).origin}")
        return 0
    try:
        archs = _extension.parse_archs(args.archs) if args.archs else None
        ok, reason = _extension.jit_status()
        if not ok:
            raise BackendUnavailableError(f"cannot build {module} just in time: {reason}")
        print(f"building {module} just in time (this takes a few minutes)...", flush=True)
        path = _extension.build(archs=archs, verbose=args.verbose,
                                directory=Path(args.cache_dir) if args.cache_dir else None)
    except (BackendUnavailableError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"built {module} just in time: {path}")
    return 0
