"""``rmt-kernels``: argument parsing and dispatch only.

Each command lives in its own module, listed in :data:`COMMANDS` with the names of its two functions:
``configure(parser)`` adds the command's options, ``run(args) -> int`` runs it and returns the exit
status. Only the module of the command being run is imported, so a command whose optional dependency
is missing fails with a clear error and leaves the others (and ``--help``) working.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# command -> (module, configure function, run function, one-line help)
COMMANDS = {
    "info": ("rmt_kernels.tools.diagnose", "configure_info", "run_info",
             "versions, devices, and which backends of every op can run"),
    "check": ("rmt_kernels.tools.diagnose", "configure_check", "run_check",
              "every available backend against the reference, pass/fail table"),
    "bench": ("rmt_kernels.bench.cli", "configure", "run", "run the benchmark suites against the peers"),
    "aot": ("rmt_kernels.tools.aot_triton", "configure", "run",
            "compile every kernel for a GPU target without a GPU and report resources"),
    "build": ("rmt_kernels.tools.build", "configure", "run", "build the CUDA extension rmt_kernels._C just in time"),
    "validate": ("rmt_kernels.tools.validate", "configure", "run", "time-boxed GPU tests and benchmarks in one run"),
}

DESCRIPTION = "Kernels for Recurrent Memory Transformers: inspect, check, benchmark and build them."


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser; ``command`` (one of :data:`COMMANDS`) gets its options from its module."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="rmt-kernels", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, configure, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        if name != command:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                raise
            p.set_defaults(func=lambda args, exc=exc: _unavailable(exc))
            continue
        getattr(mod, configure)(p)
        p.set_defaults(func=getattr(mod, run))
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"error: this command needs a missing dependency: {exc}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
