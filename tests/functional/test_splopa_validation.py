"""Bad input to ``splopa_linear`` gets a clear error naming the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import spa_kernels


def _args(**changes):
    k, r, p, q = 3, 2, 4, 2
    args = {
        "x": torch.randn(5, 6 * q),
        "weight": torch.randn(3 * p, 6 * q),
        "prototype_rows": torch.randn(k, r, q),
        "prototype_cols": torch.randn(k, p, r),
        "pos_weights": torch.randn(k, 3, 6),
        "bias": torch.randn(3 * p),
        "block_mask": torch.rand(3, 6) < 0.5,
    }
    args.update(changes)
    return args


def _call(**changes):
    args = _args(**changes)
    scale = args.pop("scale", 1.0)
    return spa_kernels.splopa_linear(**args, scale=scale, backend="reference")


CASES = [
    ("out not divisible by p", {"weight": torch.randn(13, 12), "bias": torch.randn(13)}, ValueError,
     "not divisible by the block height p=4"),
    ("in not divisible by q", {"x": torch.randn(5, 13), "weight": torch.randn(12, 13)}, ValueError,
     "not divisible by the block width q=2"),
    ("mask wrong shape", {"block_mask": torch.ones(6, 3, dtype=torch.bool)}, ValueError, "block_mask must have shape"),
    ("mask wrong dtype", {"block_mask": torch.ones(3, 6)}, TypeError, "block_mask must have dtype torch.bool"),
    ("mask not a tensor", {"block_mask": [[True] * 6] * 3}, TypeError, "block_mask must be a bool tensor"),
    ("K of cols", {"prototype_cols": torch.randn(2, 4, 2)}, ValueError, "mismatched number of prototypes K"),
    ("K of pos_weights", {"pos_weights": torch.randn(4, 3, 6)}, ValueError, "mismatched number of prototypes K"),
    ("rank", {"prototype_cols": torch.randn(3, 4, 1)}, ValueError, "mismatched prototype rank"),
    ("pos_weights shape", {"pos_weights": torch.randn(3, 6, 3)}, ValueError, "pos_weights must have shape"),
    ("pos_weights 2-D", {"pos_weights": torch.randn(3, 18)}, ValueError, "pos_weights must be 3-D"),
    ("rows 2-D", {"prototype_rows": torch.randn(3, 2)}, ValueError, "prototype_rows must be 3-D"),
    ("x width", {"x": torch.randn(5, 10)}, ValueError, "x has 10 features"),
    ("bias shape", {"bias": torch.randn(5)}, ValueError, "bias must have shape"),
    ("dtype mix", {"pos_weights": torch.randn(3, 3, 6, dtype=torch.float64)}, TypeError, "pos_weights has dtype"),
    ("integer x", {"x": torch.ones(5, 12, dtype=torch.int64)}, TypeError, "x has unsupported dtype"),
    ("scale nan", {"scale": float("nan")}, ValueError, "scale must be finite"),
    ("rank 0", {"prototype_rows": torch.randn(3, 0, 2), "prototype_cols": torch.randn(3, 4, 0)}, ValueError,
     "rank >= 1"),
]


@pytest.mark.parametrize(("label", "changes", "error", "message"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_named_error(label, changes, error, message):
    with pytest.raises(error, match=message):
        _call(**changes)


def test_good_input_passes():
    assert _call().shape == (5, 12)


def test_unknown_backend_raises():
    args = _args()
    with pytest.raises(ValueError, match="backend must be one of"):
        spa_kernels.splopa_linear(**args, backend="nope")
