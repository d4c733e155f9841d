"""Builds the compiled kernels: ``spa_kernels._C`` (CPU, always) with ninja, and
``spa_kernels._C_cuda`` (csrc/cuda) where the installed torch has CUDA and a CUDA
toolkit is found (``CUDA_HOME``).  ``SPA_KERNELS_CUDA_ARCH`` overrides the GPU
architectures (default "80;90": sm_80 code that also runs on sm_90, and sm_90).

Install torch first and build with ``--no-build-isolation`` so the build uses
the installed torch instead of downloading another one.
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))

# SPA_KERNELS_SANITIZE=1 (make sanitize) builds with AddressSanitizer and
# UndefinedBehaviorSanitizer; every undefined behaviour aborts instead of
# printing and going on.  Such a build runs only with the sanitizer runtimes
# preloaded, so it goes to a build directory of its own, never in place.
# -fno-wrapv undoes the -fwrapv of the Python build flags, under which a signed
# overflow (a 32-bit offset that wraps) would be defined and not reported.
SANITIZE = os.environ.get("SPA_KERNELS_SANITIZE") == "1"
SANITIZER_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-wrapv", "-fno-omit-frame-pointer", "-g"]


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    optimise = ["-O1"] + SANITIZER_FLAGS if SANITIZE else ["-O3"]
    return CppExtension(
        name="spa_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args=[*optimise, "-fopenmp", "-std=c++20"],
        extra_link_args=["-fopenmp", *(SANITIZER_FLAGS if SANITIZE else [])],
    )


def cuda_extension():
    """The CUDA kernels, or None where torch has no CUDA or no toolkit is installed."""
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return None
    arches = os.environ.get("SPA_KERNELS_CUDA_ARCH", "80;90").replace(",", ";").split(";")
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in arches if arch]
    return cpp_extension.CUDAExtension(
        name="spa_kernels._C_cuda",
        sources=sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        + [os.path.join("csrc", "cuda", "binding.cpp")],
        include_dirs=[os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++17", *gencode]},
    )


setup(
    ext_modules=[ext for ext in (cpu_extension(), cuda_extension()) if ext is not None],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
