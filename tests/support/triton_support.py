"""What the Triton linear and conv tests share: index draws, error reports, GPU compile checks."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch
from torch import Tensor


def random_indices(keep, size: int, gen: torch.Generator) -> Tensor | None:
    """Sorted active channels: ``keep`` as a count (int), a fraction (float), or ``None`` for all."""
    if keep is None:
        return None
    count = keep if isinstance(keep, int) else (0 if keep <= 0 else min(size, max(1, round(keep * size))))
    return torch.randperm(size, generator=gen)[:count].sort().values


def max_error(actual: Tensor, expected: Tensor) -> tuple[float, str]:
    """The largest absolute error (NaN counts as infinite) and a line saying where."""
    if expected.numel() == 0:
        return 0.0, "empty"
    diff = (actual.double() - expected.double()).abs().nan_to_num(nan=float("inf"))
    flat = int(diff.argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), (
        f"max |error| {float(diff.reshape(-1)[flat]):.3e} at {where}: got {float(actual.reshape(-1)[flat]):.6g}, "
        f"expected {float(expected.reshape(-1)[flat]):.6g}"
    )


def has_nvidia_compiler() -> bool:
    try:
        import triton.backends
    except ImportError:
        return False
    return "nvidia" in getattr(triton.backends, "backends", {})


def compile_for_gpu(kernel, pointer_dtypes: dict[str, str], constexprs: dict, config, capability: int,
                    *, ones: tuple[str, ...] = (), divisible_sizes: bool = False) -> None:
    """Compile one JIT kernel to a cubin for ``capability`` (e.g. 90); no GPU needed.

    Pointers get ``pointer_dtypes[name]`` (else ``["default"]``) and 16-byte
    alignment; ``scale``/``out_scale`` are fp32; other runtime arguments are i32
    sizes and strides, marked divisible by 16 when ``divisible_sizes`` (as a
    launch with such shapes specialises them).  ``ones`` become constants 1, as a
    launch with unit dimensions specialises them; ``config`` is an autotune config
    or ``None``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.autotuner import Autotuner

    fn = kernel.fn if isinstance(kernel, Autotuner) else kernel
    constexprs = {**constexprs, **(config.kwargs if config is not None else {}), **dict.fromkeys(ones, 1)}
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        if param.is_constexpr or param.name in ones:
            signature[param.name] = "constexpr"
        elif param.name.endswith("_ptr"):
            signature[param.name] = "*" + pointer_dtypes.get(param.name, pointer_dtypes["default"])
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif param.name in ("scale", "out_scale"):
            signature[param.name] = "fp32"
        else:
            signature[param.name] = "i32"
            if divisible_sizes:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": 4}
    if config is not None:
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                   options=options)


def run_without_interpreter(test_file: str, call: str) -> subprocess.CompletedProcess:
    """Runs ``<module of test_file>.<call>`` in a fresh process without ``TRITON_INTERPRET``.

    Triton decides at import whether kernels are interpreted, so compiling them
    for a GPU needs a process that never set the switch.
    """
    folder = pathlib.Path(test_file).resolve().parent
    tests = pathlib.Path(__file__).resolve().parents[1]  # holds the support package
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tests.parent), str(tests), str(folder), env.get("PYTHONPATH", "")])
    code = f"import {pathlib.Path(test_file).stem} as t; t.{call}"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=folder, capture_output=True, text=True,
                          timeout=600)
