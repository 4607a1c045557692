"""``rmt-kernels info`` and ``rmt-kernels check``: what can run on this machine, and whether it computes
the reference's results."""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
from typing import List, Tuple

import torch

from .. import backends
from ..bench.records import device_name, dist_version

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

TRITON_EXTRA = 'pip install "rmt_kernels[triton]"'
CUDA_EXTRA = 'pip install "rmt_kernels[cuda]"'
CUDA_TORCH = "a CUDA build of torch: see https://pytorch.org/get-started/locally/ (on Linux, plain `pip install torch`)"


def _ops() -> Tuple[str, ...]:
    """Every registered op, in the order the package defines them."""
    from ..ops.assoc_memory.interface import OP_READ, OP_WRITE
    from ..ops.pack_segment.interface import OP as PACK, OP_IDS as PACK_IDS
    from ..ops.segment_attention.interface import OP as ATTENTION

    return ATTENTION, PACK, PACK_IDS, OP_READ, OP_WRITE


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


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _missing_triton() -> List[Tuple[str, str]]:
    missing = []
    if platform.system() != "Linux":
        missing.append(("triton, which publishes Linux wheels only", "run on Linux"))
    elif not _installed("triton"):
        missing.append(("triton", f"{TRITON_EXTRA} (Linux CUDA builds of torch bring it along)"))
    if not torch.cuda.is_available():
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            missing.append(("a CUDA GPU and a CUDA build of torch, for the compiled kernels", CUDA_TORCH))
        else:
            missing.append(("a CUDA GPU, for the compiled kernels", "torch sees none"))
        if os.environ.get("TRITON_INTERPRET") != "1":
            missing.append((
                "TRITON_INTERPRET=1, to run the kernels on CPU tensors in Triton's interpreter "
                "(a correctness tool, not a fast path)",
                "set it before importing triton",
            ))
        if not _installed("numpy"):
            missing.append(("numpy, which Triton's interpreter needs", 'pip install numpy (or "rmt_kernels[test]")'))
    return missing


def _missing_cuda() -> List[Tuple[str, str]]:
    from .. import _extension

    if torch.version.cuda is None:
        return [(
            "a CUDA build of torch (then nvcc and ninja to build the extension)",
            f"{CUDA_TORCH}; then {CUDA_EXTRA}",
        )]
    missing = []
    if not _extension.aot_available():
        home = _extension._cuda_home()
        if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
            missing.append((
                "nvcc, to build the extension just in time",
                f"install the CUDA toolkit matching torch's CUDA {torch.version.cuda} and set CUDA_HOME",
            ))
        if shutil.which("ninja") is None:
            missing.append(("ninja, to build the extension", CUDA_EXTRA))
    if not torch.cuda.is_available():
        missing.append(("a CUDA GPU", "torch sees none"))
    return missing


def missing(backend: str) -> List[Tuple[str, str]]:
    """What ``backend`` lacks on this machine to run, as ``(what, how to get it)`` pairs (empty: nothing).

    Packages are named by the extra of ``rmt_kernels`` that installs them (``pip install
    "rmt_kernels[triton]"``, ``"rmt_kernels[cuda]"``)."""
    if backend == "triton":
        return _missing_triton()
    if backend == "cuda":
        return _missing_cuda()
    return []


def configure_info(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Print the package, torch, triton and CUDA versions, the devices, for every op which "
        "backends can run on each device and why, and what each backend lacks here with the pip "
        "command (extra) that gets it."
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
    print("\nwhat each backend lacks here, and how to get it:")
    for backend in backends.BACKENDS[1:]:
        needs = missing(backend)
        if not needs:
            print(f"  {backend:>7}: nothing missing")
        for i, (what, how) in enumerate(needs):
            print(f"  {backend + ':' if i == 0 else '':>8} missing {what} -> {how}")
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
