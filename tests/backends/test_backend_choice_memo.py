"""``resolve`` remembers its choices, and every input of the policy still takes effect at once.

A choice is kept per requested name (after ``use_backend`` and
``SPA_KERNELS_BACKEND``), device type, dtype, op and groups; registry changes
forget every choice; choices that a run-time readiness test took part in are
never kept.  Each test first makes a choice, so a stale one would be returned.
"""

from __future__ import annotations

import pytest
import torch

import spa_kernels
from spa_kernels import backend as backend_policy
from spa_kernels.backend import reference

CPU = torch.device("cpu")
F32 = torch.float32


def _auto_name() -> str:
    return backend_policy.resolve(None, CPU, F32, "splora_linear").name


@pytest.fixture
def auto_is_cpu(monkeypatch):
    """An auto choice of ``cpu`` already made (a spy ``cpu`` backend where the extension is not built)."""
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    if "cpu" not in spa_kernels.backends("cpu"):
        capabilities = backend_policy.Capabilities(devices=("cpu",), dtypes=(F32,))
        monkeypatch.setitem(backend_policy._REGISTRY, "cpu", backend_policy.Backend("cpu", capabilities, (reference,)))
    assert _auto_name() == "cpu"
    assert _auto_name() == "cpu"  # now from the remembered choice


def test_use_backend_overrides_a_remembered_choice(auto_is_cpu):
    with spa_kernels.use_backend("reference"):
        assert _auto_name() == "reference"
    assert _auto_name() == "cpu"


def test_the_environment_overrides_a_remembered_choice(auto_is_cpu, monkeypatch):
    monkeypatch.setenv(backend_policy.ENV_VARIABLE, "reference")
    assert _auto_name() == "reference"
    monkeypatch.delenv(backend_policy.ENV_VARIABLE)
    assert _auto_name() == "cpu"


@pytest.mark.parametrize("change", ["delitem", "unregister", "auto_preference"])
def test_registry_and_preference_changes_forget_remembered_choices(auto_is_cpu, monkeypatch, change):
    if change == "delitem":
        monkeypatch.delitem(backend_policy._REGISTRY, "cpu")
    elif change == "unregister":
        monkeypatch.setitem(backend_policy._REGISTRY, "cpu", backend_policy._REGISTRY["cpu"])  # restored afterwards
        backend_policy.unregister_backend("cpu")
    else:
        monkeypatch.setitem(backend_policy.AUTO_PREFERENCE, "cpu", ("reference",))
    assert _auto_name() == "reference"


def test_dtype_device_op_and_groups_are_part_of_the_choice(monkeypatch):
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    float32_only = backend_policy.Capabilities(devices=("cpu",), dtypes=(F32,))
    monkeypatch.setitem(backend_policy._REGISTRY, "cpu", backend_policy.Backend("cpu", float32_only, (reference,)))
    assert backend_policy.resolve(None, CPU, F32, "splora_conv").name == "cpu"
    assert backend_policy.resolve(None, CPU, torch.float64, "splora_conv").name == "reference"
    assert backend_policy.resolve(None, CPU, F32, "splora_conv", groups=2).name == "reference"
    assert backend_policy.resolve(None, torch.device("meta"), F32, "splora_conv").name == "reference"


def test_a_choice_that_depends_on_run_time_readiness_is_not_remembered(monkeypatch):
    ready = {"now": True}
    capabilities = backend_policy.Capabilities(devices=("cpu",), dtypes=(F32,))
    flaky = backend_policy.Backend("cuda", capabilities, (reference,), ready=lambda device_type: ready["now"])
    monkeypatch.setitem(backend_policy._REGISTRY, "cuda", flaky)
    assert backend_policy.resolve("cuda", CPU, F32, "splora_linear") is flaky
    ready["now"] = False
    with pytest.raises(ValueError, match="cannot run"):
        backend_policy.resolve("cuda", CPU, F32, "splora_linear")


def test_an_explicit_name_that_cannot_run_raises_every_time(monkeypatch):
    monkeypatch.delitem(backend_policy._REGISTRY, "cpu", raising=False)
    for _ in range(2):
        with pytest.raises(ValueError, match="not registered"):
            backend_policy.resolve("cpu", CPU, F32, "splora_linear")


def test_a_repeated_choice_is_not_worked_out_again(auto_is_cpu, monkeypatch):
    worked_out = []
    choose = backend_policy._choose
    monkeypatch.setattr(backend_policy, "_choose", lambda *args: worked_out.append(args) or choose(*args))
    backend_policy._CHOICES.clear()
    for _ in range(3):
        assert _auto_name() == "cpu"
    assert len(worked_out) == 1
    with spa_kernels.use_backend("reference"):
        for _ in range(3):
            assert _auto_name() == "reference"
    assert len(worked_out) == 2
