"""Smoke run of examples/adaptive_pruning.py at tiny settings: it runs, writes its plot and its table."""

from __future__ import annotations

import pytest
import torch

from examples import adaptive_pruning

TINY = ["--pretrain-epochs", "1", "--adapt-epochs", "1", "--retrain-epochs", "1", "--rounds", "2", "--quiet",
        "--threads", "1"]


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_plot_and_table(tmp_path, restore_threads):
    outcome = adaptive_pruning.main(TINY + ["--out", str(tmp_path)])
    records = outcome.result.records
    assert 1 <= len(records) <= 2
    assert len(outcome.test_accuracy) == len(records) + 1  # the unpruned model, then one per round

    plot = tmp_path / "adaptive_accuracy.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "adaptive_accuracy.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| round")]
    assert len(rows) == len(records) + 1
    for record in records:
        assert f"| {record.round} | {record.threshold:.3f} |" in table
        assert record.label in table
    # parameters never grow: a round prunes, a rollback restores the last accepted model
    base = outcome.result.baseline.parameters
    assert base == 32 * 1 * 9 + 8 * 32 * 32 * 9  # stem + eight 3×3 convolutions of width 32
    assert all(r.outcome.parameters <= base for r in records)
    assert outcome.result.accepted.parameters <= base


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        adaptive_pruning.parse_args(["--policy", "speed"])
    with pytest.raises(SystemExit):
        adaptive_pruning.parse_args(["--rounds", "0"])
    with pytest.raises(SystemExit):
        adaptive_pruning.parse_args(["--threads", "0"])
