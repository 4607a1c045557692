"""``rmt-kernels``: info | check | bench | aot | build.

``info`` and ``check`` live here. Other subcommands live in their own modules, which export
``configure(parser)`` and ``run(args) -> int``; they are listed in ``_MODULE_COMMANDS`` and imported only
when the parser is built, so a missing optional dependency shows up as a clear error on that command.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from typing import List, Optional

import torch

_MODULE_COMMANDS = {
    "bench": ("rmt_kernels.bench.cli", "run the benchmark suites against the peers"),
    "aot": ("rmt_kernels.tools.aot_triton", "compile every kernel for a GPU target without a GPU and report resources"),
    "build": ("rmt_kernels.tools.build", "build the CUDA extension rmt_kernels._C just in time"),
}


def _versions() -> dict:
    import importlib.metadata as md

    from . import __version__

    def version(dist: str) -> str:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return "not installed"

    return {
        "rmt_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "transformers": version("transformers"),
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }


def _devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def cmd_info(args) -> int:
    from . import backends
    from .ops.segment_attention.interface import OP

    for key, value in _versions().items():
        print(f"{key:>14}: {value}")
    for dev in _devices():
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        print(f"\ndevice {dev} ({name})")
        for backend in backends.BACKENDS[1:]:
            ok, reason = backends.backend_status(OP, backend, dev)
            print(f"  {backend:>7}: {'available' if ok else 'unavailable'} - {reason}")
        try:
            print(f"  {'auto':>7}: -> {backends.resolve_backend(OP, 'auto', dev)}")
        except backends.BackendUnavailableError as exc:
            print(f"  {'auto':>7}: {exc}")
    from . import _extension

    ok, reason = _extension.cuda_status(torch.device("cuda"))
    print(f"\nextension rmt_kernels._C: {'ready' if ok else reason}")
    return 0


def _check_cases():
    """A small grid of layouts: every family, prefix, padding with a fully padded row, GQA."""
    from .layout import MemoryLayout

    cases = []
    for mask in ("causal", "memory_bidirectional", "full"):
        cases.append((f"{mask} R4 W4 S37", MemoryLayout(4, 4, mask), 37, 0, None, (4, 4)))
        cases.append((f"{mask} R0 W5 S20 pad", MemoryLayout(0, 5, mask), 20, 0, [20, 0], (4, 2)))
    cases.append(("memory_bidirectional P7 seg", MemoryLayout(3, 3), 29, 7, [29, 11], (4, 1)))
    cases.append(("memory_bidirectional P7 all", MemoryLayout(3, 3, prefix_visible_to="all"), 29, 7, None, (2, 2)))
    return cases


def cmd_check(args) -> int:
    from . import backends
    from .ops.segment_attention.interface import OP, segment_attention
    from ._tolerance import error_bound
    from .reference import segment_attention_ref

    failures = 0
    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    print(f"{'device':<8} {'backend':<7} {'dtype':<9} {'case':<36} {'max|out|':>10} {'max|grad|':>10}  result")
    for dev in _devices():
        for backend in backends.BACKENDS[1:]:
            ok, reason = backends.backend_status(OP, backend, dev)
            if not ok:
                print(f"{str(dev):<8} {backend:<7} {'-':<9} {'-':<36} {'':>10} {'':>10}  skipped: {reason}")
                continue
            for dname in args.dtypes:
                dtype = dtypes[dname]
                for name, layout, s, p, lens, (hq, hkv) in _check_cases():
                    gen = torch.Generator().manual_seed(0)
                    n, d, b = layout.seq_len(s), 64, 2

                    def rnd(*shape):
                        return torch.randn(*shape, generator=gen).to(dev, dtype).requires_grad_()

                    q, k, v = rnd(b, hq, n, d), rnd(b, hkv, n, d), rnd(b, hkv, n, d)
                    pk, pv = (rnd(b, hkv, p, d), rnd(b, hkv, p, d)) if p else (None, None)
                    sl = torch.tensor(lens, device=dev) if lens else None
                    inputs = [t for t in (q, k, v, pk, pv) if t is not None]
                    kw = dict(segment_lengths=sl, prefix_k=pk, prefix_v=pv)
                    out = segment_attention(q, k, v, layout, backend=backend, **kw)
                    base = segment_attention_ref(q, k, v, layout, upcast=False, **kw)
                    leaves = [t.detach().double().requires_grad_() for t in inputs]
                    hi = dict(zip(("q", "k", "v", "prefix_k", "prefix_v"), leaves))
                    ref = segment_attention_ref(
                        hi["q"], hi["k"], hi["v"], layout, segment_lengths=sl,
                        prefix_k=hi.get("prefix_k"), prefix_v=hi.get("prefix_v"),
                    )
                    dout = torch.randn(out.shape, generator=gen).to(dev, dtype)
                    g_out = torch.autograd.grad(out, inputs, dout)
                    g_base = torch.autograd.grad(base, inputs, dout)
                    g_ref = torch.autograd.grad(ref, leaves, dout.double())
                    err_o = (out.double() - ref).abs().max().item()
                    good = err_o <= error_bound(ref, base, dtype)
                    err_g = 0.0
                    for a, r, e in zip(g_out, g_ref, g_base):
                        err_g = max(err_g, (a.double() - r).abs().max().item())
                        good = good and (a.double() - r).abs().max().item() <= error_bound(r, e, dtype)
                    failures += not good
                    print(
                        f"{str(dev):<8} {backend:<7} {dname:<9} {name:<36} {err_o:>10.2e} {err_g:>10.2e}  "
                        f"{'pass' if good else 'FAIL'}"
                    )
    print("\nall checks passed" if not failures else f"\n{failures} check(s) FAILED")
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rmt-kernels", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices, and which backends can run")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("check", help="every available backend against the reference, pass/fail table")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "float16", "bfloat16"])
    p.set_defaults(func=cmd_check)
    for name, (module, help_text) in _MODULE_COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and not (module == exc.name or module.startswith(exc.name + ".")):
                p = sub.add_parser(name, help=f"{help_text} (unavailable: {exc})")
                p.set_defaults(func=lambda args, exc=exc: _unavailable(exc))
            continue
        p = sub.add_parser(name, help=help_text)
        mod.configure(p)
        p.set_defaults(func=mod.run)
    return parser


def _unavailable(exc: Exception) -> int:
    print(f"error: this command needs a missing dependency: {exc}", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
