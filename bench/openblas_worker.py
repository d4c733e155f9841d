"""The compacted SPLoRA linear layer in NumPy, run in a process of its own.

OpenBLAS reads ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` once, when the library
loads; a machine may set them (an override to an older kernel, say) for every process.
:mod:`bench.dense_limit` starts this script with both removed from its environment
only, so the benchmark sees what NumPy's OpenBLAS does on its own, while the
benchmark process and everything else keep their settings.

The script imports NumPy only (no torch, no ``bench`` package) and talks to its parent
over stdin/stdout, one JSON object per line:

1. it reads the operands from ``<work>/operands.npz``, computes the forward output and
   the train-step gradients once, writes them to ``<work>/results.npz`` and prints
   ``{"ready": ..., "blas": ...}`` (``blas``: what threadpoolctl reports, if present);
2. it waits for a line: ``time`` (the parent has checked the results) or anything
   else (it has not: exit without timing);
3. it times both modes, interleaved, under the budget given on its command line and
   prints ``{"times": {mode: [milliseconds per call, ...]}, "inner": {mode: calls per sample}}``.

Usage: ``python openblas_worker.py <work dir> <threads> <budget as JSON>``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable

import numpy as np

try:
    from threadpoolctl import threadpool_info, threadpool_limits
except ImportError:  # report what is known without it
    threadpool_info = threadpool_limits = None


def layer_steps(x: np.ndarray, weight: np.ndarray, lora_a: np.ndarray, lora_b: np.ndarray, bias: np.ndarray,
                grad_out: np.ndarray) -> dict[str, Callable[[], tuple[np.ndarray, ...]]]:
    """``forward``: ``y = x Wᵀ + b + (x Aᵀ) Bᵀ``; ``train_step``: ``y`` then ``dx, dA, dB, db`` for ``dy = g``.

    Shapes: ``x`` (T, S), ``weight`` (O, S), ``lora_a`` (r, S), ``lora_b`` (O, r),
    ``bias`` (O,), ``grad_out`` (T, O); every product is one sgemm (transposes are
    views, handed to BLAS as flags).
    """

    def forward() -> tuple[np.ndarray, ...]:
        y = x @ weight.T
        y += bias
        y += (x @ lora_a.T) @ lora_b.T
        return (y,)

    def train_step() -> tuple[np.ndarray, ...]:
        hidden = x @ lora_a.T
        y = x @ weight.T
        y += bias
        y += hidden @ lora_b.T
        d_hidden = grad_out @ lora_b
        d_lora_b = grad_out.T @ hidden
        d_lora_a = d_hidden.T @ x
        dx = grad_out @ weight
        dx += d_hidden @ lora_a
        return dx, d_lora_a, d_lora_b, grad_out.sum(axis=0)

    return {"forward": forward, "train_step": train_step}


def _run(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def _calls_per_sample(fn: Callable[[], object], budget: dict) -> int:
    """Warm ``fn`` up as ``bench.timing`` does; return the calls that make a sample last ``min_sample_s``."""
    calls, seconds = 0, 0.0
    while calls < budget["min_warmup"] or seconds < budget["warmup_s"]:
        seconds += _run(fn, 1)
        calls += 1
    if calls == 0:  # no warm-up asked for: the check has run fn already
        return 1
    return max(1, math.ceil(budget["min_sample_s"] / max(seconds / calls, 1e-9)))


def time_interleaved(fns: dict[str, Callable[[], object]], budget: dict) -> tuple[dict[str, list[float]], dict]:
    """Samples (ms per call) of every callable, one of each in turn, under ``bench.timing.Budget``'s rules."""
    inner = {name: _calls_per_sample(fn, budget) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    spent = dict.fromkeys(fns, 0.0)

    def wants_more(name: str) -> bool:
        taken = len(samples[name])
        return taken < budget["min_runs"] or (taken < budget["max_runs"] and spent[name] < budget["max_s"])

    names = list(fns)
    round_index = 0
    while any(wants_more(name) for name in names):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            if wants_more(name):
                elapsed = _run(fns[name], inner[name])
                spent[name] += elapsed
                samples[name].append(elapsed / inner[name] * 1e3)
        round_index += 1
    return samples, inner


def _say(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    work, threads, budget = argv[0], int(argv[1]), json.loads(argv[2])
    if threadpool_limits is not None:
        threadpool_limits(limits=threads, user_api="blas")
    with np.load(f"{work}/operands.npz") as operands:
        tensors = {name: np.ascontiguousarray(operands[name]) for name in operands.files}
    steps = layer_steps(**tensors)
    (y,) = steps["forward"]()
    dx, d_lora_a, d_lora_b, dbias = steps["train_step"]()
    np.savez(f"{work}/results.npz", y=y, dx=dx, dA=d_lora_a, dB=d_lora_b, dbias=dbias)
    blas = []
    if threadpool_info is not None:
        blas = [{key: info.get(key) for key in ("internal_api", "version", "architecture", "num_threads")}
                for info in threadpool_info() if info.get("user_api") == "blas"]
    _say({"ready": True, "numpy": np.__version__, "blas": blas})
    if sys.stdin.readline().strip() != "time":
        return 0
    samples, inner = time_interleaved(steps, budget)
    _say({"times": samples, "inner": inner})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
