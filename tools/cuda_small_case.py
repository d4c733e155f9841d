"""A small run of every cuda-backend kernel, for ``compute-sanitizer`` (``make gpu-check``).

Linear and conv2d, SPLoRA and SPPaRA, forward and every gradient (the weight's
too), bf16 and fp32, with ragged sizes and pruned channels, so that every tile
kind (active, zero, ragged edge) and every K phase runs once.  Exits non-zero
when a result differs from the reference backend by more than a loose bound
(the exact comparisons are tests/test_cuda_backend.py).
"""

from __future__ import annotations

import sys

import torch
from spa_kernels.backends import cuda as cuda_backend

import spa_kernels


def _leaves(tensors: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype).clone().requires_grad_(True) for k, v in tensors.items()}


def _run(fn, tensors: dict, dtype: torch.dtype, backend: str, grad_out: torch.Tensor):
    leaves = _leaves(tensors, dtype)
    y = fn(leaves, backend)
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(dtype))
    return [y, *grads]


def main() -> int:
    if not torch.cuda.is_available() or not cuda_backend.BUILT:
        print(f"needs a GPU and the built extension (built: {cuda_backend.BUILT}, {cuda_backend.BUILD_ERROR})")
        return 2
    cuda_backend.register()
    gen = torch.Generator().manual_seed(0)
    dev = "cuda"
    in_idx = torch.tensor([0, 2, 3, 7, 11, 12, 30, 31, 32], device=dev)
    out_idx = torch.tensor([1, 4, 5, 6, 19, 36], device=dev, dtype=torch.int32)
    linear = {
        "x": torch.randn(37, 33, generator=gen), "weight": torch.randn(41, 33, generator=gen),
        "lora_a": torch.randn(5, 33, generator=gen), "lora_b": torch.randn(41, 5, generator=gen),
        "bias": torch.randn(41, generator=gen),
    }
    linear = {k: v.to(dev) for k, v in linear.items()}
    conv = {
        "x": torch.randn(2, 33, 9, 7, generator=gen), "weight": torch.randn(41, 33, 3, 3, generator=gen),
        "lora_a": torch.randn(5, 33, generator=gen), "lora_b": torch.randn(41, 5, generator=gen),
        "bias": torch.randn(41, generator=gen),
    }
    conv = {k: v.to(dev) for k, v in conv.items()}
    sppara = {"x": conv["x"], "weight": conv["weight"], "adapter": torch.randn(41, 33, device=dev),
              "bias": conv["bias"]}

    def linear_fn(t, backend):
        return spa_kernels.splora_linear(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx, out_idx,
                                         scale=0.5, backend=backend)

    def conv_fn(t, backend):
        return spa_kernels.splora_conv2d(t["x"], t["weight"], t["lora_a"], t["lora_b"], t["bias"], in_idx, out_idx,
                                         stride=2, padding=1, scale=0.5, backend=backend)

    def sppara_fn(t, backend):
        return spa_kernels.sppara_conv2d(t["x"], t["weight"], t["adapter"], t["bias"], in_idx, out_idx, stride=1,
                                         padding=1, backend=backend)

    failures = 0
    for label, fn, tensors, out_shape in (
        ("splora_linear", linear_fn, linear, (37, 41)),
        ("splora_conv2d", conv_fn, conv, (2, 41, 5, 4)),
        ("sppara_conv2d", sppara_fn, sppara, (2, 41, 9, 7)),
    ):
        grad_out = torch.randn(out_shape, generator=gen).to(dev)
        for dtype in (torch.float32, torch.bfloat16):
            got = _run(fn, tensors, dtype, "cuda", grad_out)
            want = _run(fn, tensors, torch.float64, "reference", grad_out)
            torch.cuda.synchronize()
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                error = float((g.double() - w).abs().max()) / max(1.0, float(w.abs().max()))
                bound = 1e-4 if dtype == torch.float32 else 3e-2
                status = "ok" if error <= bound else "MISMATCH"
                failures += status != "ok"
                print(f"{label} {dtype} output {i}: relative error {error:.2e} ({status})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
