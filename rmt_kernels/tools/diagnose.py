"""``rmt-kernels info`` and ``rmt-kernels check``: what can run on this machine, and whether it computes
the reference's results."""

from __future__ import annotations

import argparse
import platform
from typing import List, Tuple

import torch

from .. import backends
from ..bench.records import device_name, dist_version

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _ops() -> Tuple[str, ...]:
    """Every registered op, in the order the package defines them."""
    from ..ops.pack_segment.interface import OP as PACK, OP_IDS as PACK_IDS
    from ..ops.segment_attention.interface import OP as ATTENTION

    return ATTENTION, PACK, PACK_IDS


def _versions() -> dict:
    from .. import __version__

    return {
        "rmt_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": dist_version("triton"),
        "transformers": dist_version("transformers"),
        "torch CUDA": torch.version.cuda or "none (CPU build)",
    }


def _devices() -> List[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def configure_info(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the package, torch, triton and CUDA versions, the devices, and for every op which "
        "backends can run on each device and why."
    )


def run_info(args: argparse.Namespace) -> int:
    from .. import _extension

    for key, value in _versions().items():
        print(f"{key:>14}: {value}")
    for dev in _devices():
        print(f"\ndevice {dev} ({device_name(dev)})")
        for op in _ops():
            print(f"  {op}")
            for backend in backends.BACKENDS[1:]:
                ok, reason = backends.backend_status(op, backend, dev)
                print(f"    {backend:>7}: {'available' if ok else 'unavailable'} - {reason}")
            try:
                print(f"    {'auto':>7}: -> {backends.resolve_backend(op, 'auto', dev)}")
            except backends.BackendUnavailableError as exc:
                print(f"    {'auto':>7}: {exc}")
    ok, reason = _extension.cuda_status(torch.device("cuda"))
    print(f"\nextension rmt_kernels._C: {'ready' if ok else reason}")
    return 0


def _check_cases():
    """A small grid of layouts: every family, prefix, padding with a fully padded row, GQA.

    Each case is ``(name, layout, S, P, segment lengths or None, (H_q, H_kv))``.
    """
    from ..layout import MemoryLayout

    cases = []
    for mask in ("causal", "memory_bidirectional", "full"):
        cases.append((f"{mask} R4 W4 S37", MemoryLayout(4, 4, mask), 37, 0, None, (4, 4)))
        cases.append((f"{mask} R0 W5 S20 pad", MemoryLayout(0, 5, mask), 20, 0, [20, 0], (4, 2)))
    cases.append(("memory_bidirectional P7 seg", MemoryLayout(3, 3), 29, 7, [29, 11], (4, 1)))
    cases.append(("memory_bidirectional P7 all", MemoryLayout(3, 3, prefix_visible_to="all"), 29, 7, None, (2, 2)))
    return cases


def _check_case(case, backend: str, dev: torch.device, dtype: torch.dtype):
    """``(err_out, bound_out, err_grad, bound_grad)`` of one backend on one case: max-abs errors against
    a float64 reference and the bounds of the tolerance rule; the gradient reported is the one closest
    to its bound."""
    from .._tolerance import error_bound
    from ..ops.segment_attention.interface import segment_attention
    from ..reference import segment_attention_ref

    _, layout, s, p, lens, (hq, hkv) = case
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
    grads = [((a.double() - r).abs().max().item(), error_bound(r, e, dtype)) for a, r, e in zip(g_out, g_ref, g_base)]
    err_g, bound_g = max(grads, key=lambda eb: eb[0] / eb[1])
    return err_o, error_bound(ref, base, dtype), err_g, bound_g


def configure_check(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run every available backend of segment_attention against the float64 reference on this "
        "machine and print a pass/fail table. A row passes when each error is within its bound: twice "
        "the error of the same computation done eagerly in the dtype, plus a small floor."
    )
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=tuple(DTYPES))


def run_check(args: argparse.Namespace) -> int:
    from ..ops.segment_attention.interface import OP

    failures = 0
    print(
        f"{'device':<8} {'backend':<7} {'dtype':<9} {'case':<36} {'err(out)':>10} {'bound':>8} "
        f"{'err(grad)':>10} {'bound':>8}  result",
        flush=True,
    )
    for dev in _devices():
        for backend in backends.BACKENDS[1:]:
            ok, reason = backends.backend_status(OP, backend, dev)
            if not ok:
                print(f"{str(dev):<8} {backend:<7} {'-':<9} {'-':<36} {'':>39}  skipped: {reason}", flush=True)
                continue
            for dname in args.dtypes:
                for case in _check_cases():
                    err_o, bound_o, err_g, bound_g = _check_case(case, backend, dev, DTYPES[dname])
                    good = err_o <= bound_o and err_g <= bound_g
                    failures += not good
                    print(
                        f"{str(dev):<8} {backend:<7} {dname:<9} {case[0]:<36} {err_o:>10.2e} {bound_o:>8.1e} "
                        f"{err_g:>10.2e} {bound_g:>8.1e}  {'pass' if good else 'FAIL'}",
                        flush=True,
                    )
    print("\nerr: max |backend - float64 reference|; err(grad): the input gradient closest to its bound")
    print("\nall checks passed" if not failures else f"\n{failures} check(s) FAILED")
    return 1 if failures else 0
