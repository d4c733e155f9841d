"""Builds the compiled kernels: ``spa_kernels._C`` (CPU, always) with ninja.

Install torch first and build with ``--no-build-isolation`` so the build uses
the installed torch instead of downloading another one.
"""

import glob
import os

from setuptools import setup
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


setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
