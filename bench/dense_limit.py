"""Dense implementations of the compacted layer besides PyTorch's default: the candidates for "best dense".

PyTorch as shipped (the ``compacted`` contender) is what a user would run, but on some
CPUs it is far from the machine's limit: fp32 ``F.linear`` goes to MKL, which takes a
slow path on AMD processors, while oneDNN and OpenBLAS reach about twice its GFLOP/s.
The limit a masked kernel should be held to is the fastest dense implementation
present, on the compacted operands (compaction not timed). Each candidate here
computes the whole compacted layer, adapter and bias included, so it is checked by
:func:`bench.anchors.check_contender` like every other contender and does the same
active FLOPs as spa_kernels:

* ``compacted oneDNN`` (CPU, linear): every product through oneDNN's fp32 linear
  primitive (``torch.ops.mkldnn._linear_pointwise``), forward and a hand-written
  backward (that op has no autograd formula);
* ``compacted OpenBLAS`` (CPU, linear): the same products in NumPy, timed in a
  separate process with ``OPENBLAS_CORETYPE`` and ``OPENBLAS_L2_SIZE`` removed from
  that process's environment (:mod:`bench.openblas_worker`); its results are checked
  here before it is told to time;
* ``compacted channels_last`` (conv): the compacted convolutions on channels-last
  tensors;
* ``compacted no-oneDNN`` (CPU, conv): the compacted convolutions with PyTorch's
  oneDNN convolutions switched off, so it picks its other CPU algorithm.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import numpy as np
except ImportError:  # the OpenBLAS column is left out, with a note saying why
    np = None
from torch import Tensor

from .anchors import Contender, ContenderMismatch, Expected, LinearProblem, _contender, _leaf, check_contender
from .conv_anchors import ConvProblem, centre_tap_conv
from .timing import Budget, Measurement, percentile

ONEDNN_LINEAR = "compacted oneDNN"
OPENBLAS_LINEAR = "compacted OpenBLAS"
CHANNELS_LAST_CONV = "compacted channels_last"
NO_ONEDNN_CONV = "compacted no-oneDNN"

# Read by OpenBLAS when it loads: removed from the worker's environment only.
OPENBLAS_OVERRIDES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
WORKER = Path(__file__).resolve().parent / "openblas_worker.py"
WORKER_TIMEOUT_S = 600  # per problem: both checks and both modes' samples take seconds


def _compacted_linear_operands(p: LinearProblem) -> tuple[Tensor, ...]:
    """``x_S, W_OS, A_S, B_O, b_O, g_O``, gathered before timing as for ``compacted``."""
    in_idx, out_idx = p.in_idx, p.out_idx
    return (
        p.x[:, in_idx].contiguous(),
        p.weight[out_idx][:, in_idx].contiguous(),
        p.lora_a[:, in_idx].contiguous(),
        p.lora_b[out_idx].contiguous(),
        p.bias[out_idx].contiguous(),
        p.grad_out[:, out_idx].contiguous(),
    )


# --------------------------------------------------------------------------- oneDNN linear


def onednn_linear_available(device: torch.device) -> bool:
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    try:
        probe = torch.ones(2, 3)
        out = torch.ops.mkldnn._linear_pointwise(probe, torch.ones(4, 3), None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(out, torch.full((2, 4), 3.0)))


def onednn_linear_contender(p: LinearProblem) -> Contender:
    """The compacted layer with every product on oneDNN's linear primitive, ``a @ wᵀ (+ bias)``."""
    pointwise = torch.ops.mkldnn._linear_pointwise

    def linear(a: Tensor, w: Tensor, bias: Tensor | None = None) -> Tensor:
        return pointwise(a, w, bias, "none", [], "")

    x_s, weight_os, a_s, b_o, bias_o, grad_o = _compacted_linear_operands(p)
    # W is frozen: its transpose is laid out once, like the compaction (not timed).
    weight_os_t = weight_os.t().contiguous()

    def forward() -> Tensor:
        with torch.no_grad():
            return linear(x_s, weight_os, bias_o) + linear(linear(x_s, a_s), b_o)

    def train_step() -> tuple[Tensor, ...]:
        with torch.no_grad():
            hidden = linear(x_s, a_s)
            y = linear(x_s, weight_os, bias_o) + linear(hidden, b_o)
            d_hidden = linear(grad_o, b_o.t())
            d_lora_b = linear(grad_o.t(), hidden.t())
            d_lora_a = linear(d_hidden.t(), x_s.t())
            dx = linear(grad_o, weight_os_t) + linear(d_hidden, a_s.t())
            del y  # computed as a training forward would; the loss needs no more of it
            return dx, d_lora_a, d_lora_b, grad_o.sum(0)

    return Contender(ONEDNN_LINEAR, forward, train_step, compact=True)


def linear_dense_notes(device: torch.device) -> list[str]:
    """What runs the in-process linear candidates (CPU)."""
    if device.type != "cpu":
        return []
    blas = "MKL" if torch.backends.mkl.is_available() else "not MKL (this PyTorch is built without it)"
    notes = [f"compacted: F.linear through PyTorch's BLAS, {blas}."]
    if not onednn_linear_available(device):
        notes.append(f"{ONEDNN_LINEAR}: not measured (oneDNN's linear primitive is not available in this PyTorch).")
    return notes


# --------------------------------------------------------------------------- OpenBLAS linear (other process)


class OpenBLASLinear:
    """Runs :mod:`bench.openblas_worker` for one problem at a time; remembers why it could not.

    ``notes`` collects what the suite should print: the BLAS the worker loaded (as
    threadpoolctl reports it) and any reason the column is missing.
    """

    def __init__(self, threads: int, budget: Budget):
        self.threads = threads
        self.budget = budget
        self.notes: list[str] = []
        self.unavailable: str | None = None

    def _note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def _environment(self) -> dict[str, str]:
        env = {name: value for name, value in os.environ.items() if name not in OPENBLAS_OVERRIDES}
        # Only used where threadpoolctl is absent; it sets the same limit otherwise.
        env["OPENBLAS_NUM_THREADS"] = str(self.threads)
        return env

    def measure(self, p: LinearProblem, expected: Expected) -> dict[str, Measurement]:
        """``{"forward": ..., "train_step": ...}`` for ``p``, or ``{}`` when NumPy's BLAS cannot be run.

        Raises :class:`ContenderMismatch` when the worker's results are wrong: as for any
        contender, nothing is timed then.
        """
        if self.unavailable is not None:
            return {}
        if p.x.device.type != "cpu":
            self.unavailable = "not a CPU run"
            return {}
        if np is None:
            self.unavailable = "NumPy is not installed"
            self._note(f"{OPENBLAS_LINEAR}: not measured ({self.unavailable}).")
            return {}
        with tempfile.TemporaryDirectory(prefix="spa-bench-openblas-") as work:
            x_s, weight_os, a_s, b_o, bias_o, grad_o = (t.numpy() for t in _compacted_linear_operands(p))
            np.savez(Path(work) / "operands.npz", x=x_s, weight=weight_os, lora_a=a_s, lora_b=b_o, bias=bias_o,
                     grad_out=grad_o)
            try:
                return self._run_worker(work, p, expected)
            except (OSError, subprocess.SubprocessError, ValueError, KeyError) as error:
                self.unavailable = f"{type(error).__name__}: {error}"
                self._note(f"{OPENBLAS_LINEAR}: not measured ({self.unavailable}).")
                return {}

    def _run_worker(self, work: str, p: LinearProblem, expected: Expected) -> dict[str, Measurement]:
        command = [sys.executable, str(WORKER), work, str(self.threads), json.dumps(asdict(self.budget))]
        with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=self._environment()) as worker:
            # A stuck worker is killed, which ends the reads below with a clear error.
            watchdog = threading.Timer(WORKER_TIMEOUT_S, worker.kill)
            watchdog.start()
            try:
                ready = self._read(worker)
                if not ready.get("ready"):
                    raise ValueError(f"worker did not start: {ready}")
                self._describe(ready)
                with np.load(Path(work) / "results.npz") as results:
                    got = {name: torch.from_numpy(results[name].copy()) for name in results.files}
                checked = Contender(OPENBLAS_LINEAR, lambda: got["y"],
                                    lambda: (got["dx"], got["dA"], got["dB"], got["dbias"]), compact=True)
                try:
                    check_contender(checked, p, expected)
                except ContenderMismatch:
                    worker.stdin.write("stop\n")
                    worker.stdin.flush()
                    raise
                worker.stdin.write("time\n")
                worker.stdin.flush()
                timed = self._read(worker)
            finally:
                watchdog.cancel()
                if worker.poll() is None:
                    try:
                        worker.communicate(timeout=WORKER_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        worker.kill()
                        worker.communicate()
        return {mode: _measurement(samples, timed["inner"][mode]) for mode, samples in timed["times"].items()}

    @staticmethod
    def _read(worker: subprocess.Popen) -> dict:
        line = worker.stdout.readline()
        if not line:
            error = worker.stderr.read().strip().splitlines()
            raise OSError(f"the worker exited with {worker.wait()}: {error[-1] if error else 'no message'}")
        return json.loads(line)

    def _describe(self, ready: dict) -> None:
        removed = ", ".join(OPENBLAS_OVERRIDES)
        if ready.get("blas"):
            blas = "; ".join(
                f"{info.get('internal_api')} {info.get('version')}, kernels for {info.get('architecture')}, "
                f"{info.get('num_threads')} threads"
                for info in ready["blas"]
            )
        else:
            blas = "its BLAS unknown (threadpoolctl is not installed)"
        self._note(
            f"{OPENBLAS_LINEAR}: NumPy {ready.get('numpy')} in its own process, without {removed} in its "
            f"environment: {blas}. Timed there under the same budget, not interleaved with the others."
        )


def _measurement(samples_ms: list[float], inner: int) -> Measurement:
    if not samples_ms:
        raise ValueError("the worker returned no samples")
    ordered = sorted(samples_ms)
    return Measurement(percentile(ordered, 0.5), percentile(ordered, 0.2), percentile(ordered, 0.8),
                       len(ordered), inner)


# --------------------------------------------------------------------------- convolution


def _compacted_conv_layer(p: ConvProblem, memory_format: torch.memory_format
                          ) -> tuple[Callable[[], Tensor], tuple[Tensor, ...], Tensor]:
    in_idx, out_idx = p.in_idx, p.out_idx
    x_s = _leaf(p.x[:, in_idx].contiguous(memory_format=memory_format))
    weight_os = p.weight[out_idx][:, in_idx].contiguous(memory_format=memory_format)
    a_s, b_o, bias_o = _leaf(p.lora_a[:, in_idx]), _leaf(p.lora_b[out_idx]), _leaf(p.bias[out_idx])
    grad_out_o = p.grad_out[:, out_idx].contiguous(memory_format=memory_format)
    k, padding = p.shape.kernel_size, p.shape.padding

    def layer() -> Tensor:
        y = F.conv2d(x_s, weight_os, bias_o, padding=padding)
        return y + centre_tap_conv(x_s, a_s, b_o, kernel_size=k, padding=padding)

    return layer, (x_s, a_s, b_o, bias_o), grad_out_o


def channels_last_conv_contender(p: ConvProblem) -> Contender:
    """The compacted convolutions on channels-last ``x_S``, ``W_OS`` (and ``g_O``)."""
    layer, inputs, grad_out_o = _compacted_conv_layer(p, torch.channels_last)
    return _contender(CHANNELS_LAST_CONV, layer, inputs, grad_out_o, compact=True)


def no_onednn_conv_contender(p: ConvProblem) -> Contender:
    """The compacted convolutions with oneDNN convolutions switched off around each call."""
    layer, inputs, grad_out_o = _compacted_conv_layer(p, torch.contiguous_format)
    contender = _contender(NO_ONEDNN_CONV, layer, inputs, grad_out_o, compact=True)
    return Contender(NO_ONEDNN_CONV, _without_onednn(contender.forward), _without_onednn(contender.train_step),
                     compact=True)


def _without_onednn(fn: Callable[[], object]) -> Callable[[], object]:
    def call():
        enabled = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = False
        try:
            return fn()
        finally:
            torch.backends.mkldnn.enabled = enabled

    return call


def conv_algorithm(p: ConvProblem, memory_format: torch.memory_format, onednn: bool) -> str:
    """The convolution algorithm PyTorch picks for the compacted 3×3 convolution, as it names it."""
    x = p.x[:, p.in_idx].contiguous(memory_format=memory_format)
    weight = p.weight[p.out_idx][:, p.in_idx].contiguous(memory_format=memory_format)
    padding = [p.shape.padding] * 2
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = onednn and enabled
    try:
        chosen = torch._C._select_conv_backend(x, weight, None, [1, 1], padding, [1, 1], False, [0, 0], 1, None)
    except (AttributeError, RuntimeError, TypeError):
        return "unknown"
    finally:
        torch.backends.mkldnn.enabled = enabled
    return str(chosen).rsplit(".", 1)[-1]


def conv_dense_contenders(p: ConvProblem) -> list[Contender]:
    contenders = [channels_last_conv_contender(p)]
    if p.x.device.type == "cpu" and torch.backends.mkldnn.is_available():
        contenders.append(no_onednn_conv_contender(p))
    return contenders


def conv_dense_notes(p: ConvProblem) -> list[str]:
    """Which algorithm each conv candidate runs (CPU)."""
    if p.x.device.type != "cpu":
        return []
    shipped = conv_algorithm(p, torch.contiguous_format, onednn=True)
    last = conv_algorithm(p, torch.channels_last, onednn=True)
    other = conv_algorithm(p, torch.contiguous_format, onednn=False)
    return [f"conv algorithms PyTorch picks for the compacted 3×3 convolution: compacted {shipped}, "
            f"{CHANNELS_LAST_CONV} {last}, {NO_ONEDNN_CONV} {other}."]
