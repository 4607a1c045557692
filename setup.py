"""Packaging for rmt_kernels.

`pip install .` installs pure Python, compiles nothing and requires torch alone; the extras add the
packages of the optional parts (`triton`, `cuda`, `hf`, `lucidrains`, `bench`, `test`).
`RMT_KERNELS_BUILD_CUDA=1 pip install --no-build-isolation ".[cuda]"` additionally builds the CUDA
extension `rmt_kernels._C` from csrc/ against the installed torch, for the architectures in
RMT_KERNELS_CUDA_ARCHS (else TORCH_CUDA_ARCH_LIST, else "8.0;9.0a"), with at most
RMT_KERNELS_MAX_JOBS parallel compile jobs (default 2).
"""

import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# Triton publishes Linux wheels only.
TRITON = "triton; platform_system == 'Linux'"


def _version() -> str:
    with open(os.path.join(HERE, "rmt_kernels", "__init__.py")) as f:
        for line in f:
            if line.startswith("__version__"):
                return line.split("=")[1].strip().strip('"')
    raise RuntimeError("__version__ not found")


def _cuda_extension_kwargs() -> dict:
    if os.environ.get("RMT_KERNELS_BUILD_CUDA", "0") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as exc:  # pragma: no cover - exercised only by the opt-in build
        raise RuntimeError(
            "RMT_KERNELS_BUILD_CUDA=1 needs torch importable in the build environment: "
            "install torch first and use `pip install --no-build-isolation .`"
        ) from exc
    import torch

    if torch.version.cuda is None:
        raise RuntimeError("RMT_KERNELS_BUILD_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
    # Translation units: every op folder's launch file (csrc/<op>/*.cu) and the binding; csrc/ is the
    # include dir. csrc/tools/ holds host probes, not part of the extension.
    units = sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
    sources = [u for u in units if os.path.basename(os.path.dirname(u)) != "tools"]
    sources += glob.glob(os.path.join("csrc", "bindings.cpp"))
    if not sources:
        raise RuntimeError("RMT_KERNELS_BUILD_CUDA=1 but csrc/ holds no CUDA sources in this version")
    archs = os.environ.get("RMT_KERNELS_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0a"
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    os.environ.setdefault("MAX_JOBS", os.environ.get("RMT_KERNELS_MAX_JOBS", "2"))
    ext = CUDAExtension(
        name="rmt_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # No -std: torch's build picks the standard its headers need.
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="rmt_kernels",
    version=_version(),
    description="Fused attention and memory-handoff kernels for Recurrent Memory Transformers",
    long_description=long_description,
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # csrc/ ships inside the package as rmt_kernels/csrc, for the just-in-time build of the extension.
    packages=find_packages(include=["rmt_kernels", "rmt_kernels.*"]) + ["rmt_kernels.csrc"],
    package_dir={"rmt_kernels.csrc": "csrc"},
    # Every subfolder of csrc/: common/, one folder per op, tools/.
    package_data={"rmt_kernels.csrc": ["*.cpp", "*/*.cu", "*/*.cuh", "*/*.h", "*/*.cpp"]},
    # torch is the only requirement: the torch backend is stock PyTorch. Every other package comes with
    # the extra that uses it.
    install_requires=["torch>=2.6"],
    extras_require={
        # Triton kernels on CUDA GPUs. Linux CUDA builds of torch already depend on triton; this extra is
        # for installs that lack it.
        "triton": [TRITON],
        # The CUDA extension, built just in time (torch.utils.cpp_extension.load runs ninja) or ahead of
        # time (RMT_KERNELS_BUILD_CUDA=1, BuildExtension with ninja). Needs a CUDA torch and nvcc too.
        "cuda": ["ninja"],
        "test": [
            "pytest",
            "pytest-benchmark",
            "hypothesis",
            TRITON,  # the tests run the Triton kernels on CPU in Triton's interpreter...
            "numpy",  # ...which needs numpy
            "transformers>=5.3,<6",
            "recurrent-memory-transformer-pytorch>=0.7,<0.8",
            "peft",  # the integration tests wrap backbones with LoRA
            "matplotlib",  # tests/test_bench.py writes the benchmark plot
        ],
        "hf": ["transformers>=5.3,<6"],
        # the releases rmt_kernels.integrations.lucidrains patches
        "lucidrains": ["recurrent-memory-transformer-pytorch>=0.7,<0.8"],
        "bench": ["matplotlib", "tqdm", "transformers>=5.3,<6"],
    },
    entry_points={"console_scripts": ["rmt-kernels=rmt_kernels.cli:main"]},
    **_cuda_extension_kwargs(),
)
