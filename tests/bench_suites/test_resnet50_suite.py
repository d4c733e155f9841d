"""The resnet50 bench suite on a small input: every contender is built, checked and timed, and a wrong one is caught.

The model is the suite's own (Hugging Face ResNet-50 from ``ResNetConfig()``); only the
batch and image size shrink, so that the check of every contender stays quick.  Times
are not looked at: the point is that the suite runs and its checks can fail.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import spa_kernels
from bench import RunConfig
from bench.anchors import COMPACTED, SP_ADAPTERS, ContenderMismatch
from bench.compiled import CompileGate, add_compiled_row
from bench.network import mask_with_hooks
from bench.report import SuiteReport, Table, TargetResult
from bench.resnet50 import (
    FULL,
    NOT_AVAILABLE,
    SPA_COMPACT,
    SPA_MASKED,
    Checker,
    ResNet50Suite,
    base_model,
    layer_masks,
    prune,
    sp_adapters_model,
)
from bench.shapes import RESNET50_112
from bench.timing import QUICK_BUDGET
from spa_kernels.pruning import channel_groups

pytest.importorskip("transformers")

SMALL = dataclasses.replace(RESNET50_112, batch=2, image_size=64)


class NoProgress:
    def begin(self, description: str) -> None:
        pass

    def end(self) -> None:
        pass


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pruned():
    """The base model, its converted copy pruned to density 0.5, and a batch of images."""
    base = base_model(SMALL)
    model = spa_kernels.convert(base, rank=SMALL.rank, exclude=["classifier"])
    images = torch.randn(SMALL.batch, 3, SMALL.image_size, SMALL.image_size, generator=torch.Generator().manual_seed(0))
    prune(model, channel_groups(model, (images[:1],)), 0.5)
    return base, model, images


@pytest.mark.slow
def test_suite_runs_every_contender_at_every_density(one_thread):
    config = RunConfig(torch.device("cpu"), torch.float32, (0.5,), QUICK_BUDGET, compiled="no")
    report = ResNet50Suite(SMALL).run(config, NoProgress())
    (table,) = report.tables
    assert [row[0] for row in table.rows] == ["1.0", "0.5", "0.3"]
    expected = [SPA_MASKED, SPA_COMPACT, COMPACTED, SP_ADAPTERS, FULL]
    assert table.headers[1:6] == expected
    available = hasattr(spa_kernels, "compact_activations")
    for row in table.rows:
        cells = dict(zip(table.headers, row, strict=True))
        for name in (SPA_MASKED, COMPACTED, SP_ADAPTERS):
            assert cells[name][0].isdigit(), (name, cells[name])
        assert (cells[SPA_COMPACT] == NOT_AVAILABLE) != available
        assert cells[FULL][0].isdigit() == (row[0] == "1.0")
    statuses = {f"{t.keep} {t.ratio}": t.status for t in report.targets}
    assert len(statuses) == 4
    if not available:
        assert all(status == "SKIP" for name, status in statuses.items() if SPA_COMPACT in name)
    assert any("torch.compile vs eager row was skipped (--compiled no)" in note for note in report.notes)


def test_pruning_keeps_the_density_of_every_group(pruned):
    _, model, images = pruned
    for group in channel_groups(model, (images[:1],)):
        assert int(group.kept(model).sum()) == round(0.5 * group.size)


def test_sp_adapters_model_agrees_and_a_missing_mask_is_caught(pruned, one_thread):
    base, model, images = pruned
    checker = Checker(model, images, torch.device("cpu"), torch.float32)
    checker.check(SP_ADAPTERS, sp_adapters_model(copy.deepcopy(base), model, SMALL.rank), 0.5)

    unmasked = sp_adapters_model(copy.deepcopy(base), model, SMALL.rank)
    for module in unmasked.modules():  # hooks gone: the model computes every channel
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    with pytest.raises(ContenderMismatch, match="sp_adapters logits"):
        checker.check(SP_ADAPTERS, unmasked, 0.5)


def test_checker_catches_an_adapter_left_out(pruned, one_thread):
    base, model, images = pruned
    checker = Checker(model, images, torch.device("cpu"), torch.float32)
    plain = copy.deepcopy(base)  # the base without adapters, masked like the SPA model
    mask_with_hooks(plain, layer_masks(model))
    with pytest.raises(ContenderMismatch, match="float64"):
        checker.check("adapters left out", plain, 0.5)


def test_compile_gate():
    assert CompileGate("yes", budget_s=0.0, reserve_s=1e9).skip_reason() is None
    assert CompileGate("no", budget_s=1e9, reserve_s=0.0).skip_reason() == "--compiled no"
    assert CompileGate("auto", budget_s=1e9, reserve_s=1.0).skip_reason() is None
    assert "budget" in CompileGate("auto", budget_s=10.0, reserve_s=20.0).skip_reason()
    with pytest.raises(ValueError, match="compiled mode"):
        CompileGate("maybe", budget_s=1.0, reserve_s=1.0)


def test_compiled_row_is_added_to_the_report_or_skipped_with_a_note():
    table = Table("compiled", ["a"], [["1"]])
    target = TargetResult("train step", 0.5, "compiled ÷ eager", "≤", 1.0, 0.9)
    calls = []

    def row():
        calls.append(True)
        return table, target, ["compiled note"]

    report = SuiteReport("suite")
    add_compiled_row(report, CompileGate("yes", budget_s=0.0, reserve_s=0.0), "suite", row, targets_apply=True)
    assert (report.tables, report.notes, report.targets) == ([table], ["compiled note"], [target])

    off_cpu = SuiteReport("suite")
    add_compiled_row(off_cpu, CompileGate("yes", budget_s=0.0, reserve_s=0.0), "suite", row, targets_apply=False)
    assert (off_cpu.tables, off_cpu.targets) == ([table], [])

    failed = SuiteReport("suite")
    add_compiled_row(failed, CompileGate("yes", budget_s=0.0, reserve_s=0.0), "suite",
                     lambda: (None, target, ["WARNING: failed"]), targets_apply=True)
    assert (failed.tables, failed.notes, failed.targets) == ([], ["WARNING: failed"], [target])

    skipped = SuiteReport("suite")
    calls.clear()
    add_compiled_row(skipped, CompileGate("no", budget_s=1e9, reserve_s=0.0), "suite", row, targets_apply=True)
    assert calls == [] and skipped.tables == [] and skipped.targets == []
    assert skipped.notes == ["suite: the torch.compile vs eager row was skipped (--compiled no)."]
