"""``spa_kernels.show_config()`` and ``python -m spa_kernels``: the facts a bug report needs, true ones."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy
import pytest
import torch

import spa_kernels
from spa_kernels.backend import cpu


@pytest.fixture(scope="module")
def report() -> str:
    return spa_kernels._config.config_report()


def _line(report: str, label: str) -> str:
    matches = [line for line in report.splitlines() if line.strip().startswith(label + ":")]
    assert len(matches) == 1, f"expected one line labelled {label!r} in:\n{report}"
    return matches[0].split(":", 1)[1].strip()


def test_versions(report):
    assert _line(report, "spa_kernels").startswith(spa_kernels.__version__ + " ")
    assert _line(report, "torch").startswith(torch.__version__ + " ")
    assert _line(report, "NumPy") == numpy.__version__
    triton = pytest.importorskip("triton")
    assert _line(report, "Triton").startswith(triton.__version__)


def test_extension_state(report):
    built = _line(report, "built")
    if not cpu.BUILT:
        assert built.startswith("no (") and cpu.BUILD_ERROR in built
        return
    assert built.startswith("yes (") and cpu.extension_path() in built
    assert _line(report, "CPU ISA chosen") == cpu.isa()
    assert cpu.isa() in cpu.supported_isas()
    assert _line(report, "ISAs supported") == ", ".join(cpu.supported_isas())
    assert _line(report, "OpenMP threads") == f"{cpu.max_threads()} (kernels), {torch.get_num_threads()} (torch)"


def test_forced_isa_is_reported():
    if not cpu.BUILT or "generic" not in cpu.supported_isas():
        pytest.skip("the cpu backend is not built")
    previous = cpu.isa()
    cpu.set_isa("generic")
    try:
        assert _line(spa_kernels._config.config_report(), "CPU ISA chosen") == "generic"
    finally:
        cpu.set_isa(previous)


def test_thread_count_follows_torch():
    """The kernels read their thread count from the OpenMP runtime that torch.set_num_threads sets."""
    if not cpu.BUILT:
        pytest.skip("the cpu backend is not built")
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert cpu.max_threads() == 3
        assert _line(spa_kernels._config.config_report(), "OpenMP threads") == "3 (kernels), 3 (torch)"
    finally:
        torch.set_num_threads(previous)


def test_backends_per_device(report):
    assert _line(report, "cpu") == ", ".join(spa_kernels.backends("cpu"))
    if not torch.cuda.is_available():
        assert _line(report, "cuda") == "no device visible"


def test_environment_variables_listed(report, monkeypatch):
    monkeypatch.setenv("SPA_KERNELS_BACKEND", "reference")
    assert "  SPA_KERNELS_BACKEND=reference" in spa_kernels._config.config_report().splitlines()


def test_show_config_prints_the_report(capsys):
    spa_kernels.show_config()
    assert capsys.readouterr().out == spa_kernels._config.config_report() + "\n"


def test_python_dash_m(tmp_path):
    """Run from an unrelated directory so the package is found the way a user's shell finds it."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    result = subprocess.run(
        [sys.executable, "-m", "spa_kernels"], cwd=tmp_path, env=environment,
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("spa_kernels configuration\n")
    assert _line(result.stdout, "torch").startswith(torch.__version__)
    assert _line(result.stdout, "built").startswith("yes (" if cpu.BUILT else "no (")
