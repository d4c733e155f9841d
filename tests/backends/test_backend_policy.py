"""Which backend runs an op: auto selection, ``use_backend``, ``SPA_KERNELS_BACKEND``, explicit names.

Precedence (docs/design.md section 2 and ``spa_kernels.backend``): an explicit
``backend=`` argument, then the innermost ``use_backend`` block, then the
environment variable, then auto (fastest available: ``cpu`` before
``reference`` on CPU; never the Triton interpreter).  An explicitly asked-for
backend that cannot run raises; auto falls back silently.

Spy backends (the reference, recording every call) are put into the registry
under the names ``cpu`` and ``triton``, so the policy is tested whatever is
built on this machine; the last tests check the real registry.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from support.linear_cases import expected_backend_calls, recording_backend_calls

import spa_kernels
from spa_kernels import backend as backend_policy
from spa_kernels.backend import reference

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class SpyKernels:
    """The reference linear kernels, recording forward and backward calls."""

    def __init__(self):
        self.calls: list[str] = []

    def splora_linear_forward(self, *args):
        self.calls.append("forward")
        return reference.splora_linear_forward(*args)

    def splora_linear_backward(self, *args):
        self.calls.append("backward")
        return reference.splora_linear_backward(*args)


def install_spy(name: str, spy: SpyKernels, dtypes=ALL_DTYPES) -> None:
    """Registers ``spy`` as the backend ``name``, running CPU tensors of ``dtypes``."""
    capabilities = backend_policy.Capabilities(devices=("cpu",), dtypes=dtypes)
    backend_policy.register_backend(backend_policy.Backend(name, capabilities, kernels=(spy,)))


@pytest.fixture
def spies(monkeypatch):
    """Spy ``cpu`` and ``triton`` backends in the registry (the real ones restored afterwards)."""
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    installed = {name: SpyKernels() for name in ("cpu", "triton")}
    for name, spy in installed.items():
        monkeypatch.setitem(backend_policy._REGISTRY, name, None)  # remembers the real entry
        install_spy(name, spy)
    return installed


def run(backend=None, dtype=torch.float32, backward=True) -> list[str]:
    """Run a small splora_linear (and its backward); return the backend names the op layer used."""
    x = torch.randn(3, 5, dtype=dtype, requires_grad=backward)
    weight = torch.randn(4, 5, dtype=dtype)
    lora_a = torch.randn(2, 5, dtype=dtype)
    lora_b = torch.randn(4, 2, dtype=dtype)
    with recording_backend_calls() as calls:
        y = spa_kernels.splora_linear(x, weight, lora_a, lora_b, in_idx=torch.tensor([1, 3]), backend=backend)
        if backward:
            y.sum().backward()
    return calls


def ran(name: str) -> list[str]:
    """What :func:`run` returns when its forward and backward ran on backend ``name``."""
    return expected_backend_calls(name, "splora_linear", backward=True)


# --------------------------------------------------------------------------- auto


def test_auto_prefers_cpu_over_reference(spies):
    assert run() == ran("cpu")
    assert run(backend="auto") == ran("cpu")
    assert spies["cpu"].calls == ["forward", "backward"] * 2
    assert spies["triton"].calls == []


def test_auto_never_picks_the_triton_interpreter_on_cpu(spies, monkeypatch):
    monkeypatch.delitem(backend_policy._REGISTRY, "cpu")
    assert run() == ran("reference")
    assert spies["triton"].calls == []


def test_auto_falls_back_silently_for_an_unsupported_dtype(spies, caplog):
    install_spy("cpu", spies["cpu"], dtypes=(torch.float32,))
    caplog.set_level(logging.DEBUG, logger="spa_kernels")
    assert run(dtype=torch.float64) == ran("reference")
    assert any("cpu" in record.getMessage() for record in caplog.records), "auto fell back without a debug log"
    assert run(dtype=torch.float32) == ran("cpu")


def test_auto_without_cpu_build_uses_reference(spies, monkeypatch):
    monkeypatch.delitem(backend_policy._REGISTRY, "cpu")
    monkeypatch.delitem(backend_policy._REGISTRY, "triton")
    assert run() == ran("reference")
    assert spa_kernels.backends("cpu") == ["reference"]


def test_backends_lists_what_can_run(spies):
    assert spa_kernels.backends("cpu") == ["reference", "cpu", "triton"]
    assert spa_kernels.backends(torch.device("cpu")) == ["reference", "cpu", "triton"]
    assert "cpu" not in spa_kernels.backends("cuda")  # the spies run on CPU only
    assert "reference" in spa_kernels.backends("cuda")  # plain PyTorch runs anywhere


# --------------------------------------------------------------------------- use_backend


def test_use_backend_forces_forward_and_backward(spies):
    with spa_kernels.use_backend("triton"):
        assert run() == ["triton", "triton"]
    assert spies["triton"].calls == ["forward", "backward"]
    assert run() == ran("cpu"), "use_backend leaked out of its block"


def test_use_backend_nesting_restores_the_outer_choice(spies):
    with spa_kernels.use_backend("triton"):
        with spa_kernels.use_backend("reference"):
            assert run() == ran("reference")
            with spa_kernels.use_backend("auto"):
                assert run() == ran("cpu")
            assert run() == ran("reference")
        assert run() == ["triton", "triton"]
    assert run() == ran("cpu")


def test_use_backend_restores_after_an_exception(spies):
    with pytest.raises(RuntimeError, match="inside"), spa_kernels.use_backend("triton"):
        raise RuntimeError("inside")
    assert run() == ran("cpu")


def test_backward_runs_on_the_forward_backend(spies):
    """The backend is fixed when the forward runs; leaving the block does not change the backward."""
    x = torch.randn(3, 5, requires_grad=True)
    with recording_backend_calls() as calls:
        with spa_kernels.use_backend("triton"):
            y = spa_kernels.splora_linear(x, torch.randn(4, 5))
        y.sum().backward()
    assert calls == ["triton", "triton"]


def test_use_backend_is_honoured_by_compiled_code(spies):
    """A compiled caller re-selects when the use_backend stack changes (no stale graph)."""
    torch._dynamo.reset()
    x, weight = torch.randn(3, 5), torch.randn(4, 5)
    compiled = torch.compile(lambda x, w: spa_kernels.splora_linear(x, w), fullgraph=True, backend="aot_eager")
    with recording_backend_calls() as calls:
        compiled(x, weight)
        with spa_kernels.use_backend("triton"):
            compiled(x, weight)
        compiled(x, weight)
    assert calls == ["cpu", "triton", "cpu"]


# --------------------------------------------------------------------------- environment and precedence


@pytest.mark.parametrize(("value", "expected"), [("triton", "triton"), ("  Reference \n", "reference"),
                                                 ("auto", "cpu"), ("", "cpu")])
def test_environment_variable_sets_the_default(spies, monkeypatch, value, expected):
    monkeypatch.setenv("SPA_KERNELS_BACKEND", value)
    assert run() == ran(expected)


def test_precedence_explicit_then_use_backend_then_environment(spies, monkeypatch):
    monkeypatch.setenv("SPA_KERNELS_BACKEND", "triton")
    assert run() == ["triton", "triton"]
    with spa_kernels.use_backend("reference"):
        assert run() == ran("reference"), "use_backend must win over the environment"
        assert run(backend="cpu") == ran("cpu"), "an explicit backend= must win over use_backend"
    assert run(backend="cpu") == ran("cpu"), "an explicit backend= must win over the environment"


def test_explicit_backend_that_cannot_run_raises(spies):
    install_spy("triton", spies["triton"], dtypes=(torch.float32,))
    with pytest.raises(ValueError, match="backend='triton'"):
        run(backend="triton", dtype=torch.float64)
    with pytest.raises(ValueError, match="backend='triton'"), spa_kernels.use_backend("triton"):
        run(dtype=torch.float64)
    assert spies["triton"].calls == []


def test_environment_backend_that_cannot_run_raises(spies, monkeypatch):
    monkeypatch.delitem(backend_policy._REGISTRY, "triton")
    monkeypatch.setenv("SPA_KERNELS_BACKEND", "triton")
    with pytest.raises(ValueError, match="triton"):
        run()


# --------------------------------------------------------------------------- the real registry


def test_reference_is_always_available():
    assert "reference" in spa_kernels.backends("cpu")
    assert spa_kernels.backends("cpu")[0] == "reference"


def test_auto_picks_cpu_when_built_else_reference(monkeypatch):
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    built = spa_kernels.backend.cpu.BUILT
    assert ("cpu" in spa_kernels.backends("cpu")) == built, spa_kernels.backend.cpu.BUILD_ERROR
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        expected = "cpu" if built and spa_kernels.backend.cpu.CAPABILITIES.runs("cpu", dtype) else "reference"
        assert run(dtype=dtype) == ran(expected), f"auto for {dtype}"


@pytest.mark.parametrize("backend", spa_kernels.backends("cpu"))
def test_explicit_backend_runs_that_backend(backend, monkeypatch):
    monkeypatch.setenv("SPA_KERNELS_BACKEND", "reference" if backend != "reference" else "auto")
    assert run(backend=backend) == ran(backend)


def test_use_backend_is_local_to_its_thread(spies):
    entered, release = threading.Event(), threading.Event()

    def other_thread():
        with spa_kernels.use_backend("triton"):
            entered.set()
            release.wait(timeout=30)

    worker = threading.Thread(target=other_thread)
    worker.start()
    try:
        assert entered.wait(timeout=30)
        assert run() == ran("cpu"), "another thread's use_backend block changed this thread's backend"
    finally:
        release.set()
        worker.join()


# --------------------------------------------------------------------------- names and registration


def test_cuda_is_a_valid_name_but_never_chosen_by_auto():
    """``cuda`` is accepted as a name; auto does not list it until its kernels have passed on a GPU."""
    assert "cuda" in backend_policy.BACKEND_NAMES
    assert all("cuda" not in order for order in backend_policy.AUTO_PREFERENCE.values())
    with spa_kernels.use_backend("cuda"):  # a valid name: the context accepts it
        pass


@pytest.mark.skipif("cuda" in backend_policy.registered(), reason="a cuda backend is registered here")
def test_an_unregistered_cuda_backend_asked_for_raises_clearly(monkeypatch):
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="backend='cuda' is not registered"):
        run(backend="cuda")
    monkeypatch.setenv(backend_policy.ENV_VARIABLE, "cuda")
    with pytest.raises(ValueError, match="backend='cuda' is not registered"):
        run()


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="backend must be one of"):
        run(backend="gpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        run(backend=1)
    with pytest.raises(ValueError, match="unknown backend name"):
        install_spy("fast", SpyKernels())


def test_a_new_backend_registers_with_one_call(monkeypatch):
    """Registering is one ``register_backend`` call; the backend then runs what it implements."""
    monkeypatch.delenv(backend_policy.ENV_VARIABLE, raising=False)
    monkeypatch.setitem(backend_policy._REGISTRY, "cuda", None)
    spy = SpyKernels()
    install_spy("cuda", spy)
    assert "cuda" in spa_kernels.backends("cpu")
    assert run(backend="cuda") == ["cuda", "cuda"]
    assert spy.calls == ["forward", "backward"]
    with pytest.raises(ValueError, match="does not implement splora_conv"):
        spa_kernels.splora_conv2d(torch.randn(1, 2, 3, 3), torch.randn(2, 2, 1, 1), backend="cuda")


def test_capabilities_are_checked_in_one_place(monkeypatch):
    """Dtypes, devices and groups come from each backend's declared capabilities."""
    for impl in backend_policy.registered().values():
        assert isinstance(impl.capabilities, backend_policy.Capabilities)
    ref = backend_policy.get("reference").capabilities
    assert ref.devices is None and ref.grouped_conv
    with pytest.raises(ValueError, match="groups=2"):
        backend_policy.check_groups("cpu", 2)
    backend_policy.check_groups("reference", 2)
