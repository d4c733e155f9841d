"""Builds the compiled kernels: ``spa_kernels._C`` (CPU, always) with ninja.

Install torch first and build with ``--no-build-isolation`` so the build uses
the installed torch instead of downloading another one.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    return CppExtension(
        name="spa_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args=["-O3", "-fopenmp", "-std=c++20"],
        extra_link_args=["-fopenmp"],
    )


setup(
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
