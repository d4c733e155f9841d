"""The SPLoRA-against-fine-pruning example: a short run end to end, and what each method trains."""

from __future__ import annotations

import copy

import pytest
import torch

from examples._digits import TASK_CLASSES, DigitsNet, digits_split, splora_task_model, train
from examples.spa_vs_finepruning import (
    fine_tuned_model,
    main,
    masked_fine_tune_model,
    parse_args,
    prune_to,
    recalibrate_batch_norms,
)
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.groups import channel_groups

WIDTH, BLOCKS, RANK, CLASSES = 8, 1, 4, len(TASK_CLASSES)


@pytest.fixture(scope="module")
def task():
    return digits_split(TASK_CLASSES, seed=0)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return DigitsNet(CLASSES, width=WIDTH, blocks=BLOCKS).eval()


def test_short_run_writes_plot_and_table_with_both_methods(tmp_path):
    outcomes = main(["--seeds", "1", "--densities", "0.5", "--epochs", "1", "--rounds", "1", "--tune-epochs", "1",
                     "--pretrain-epochs", "1", "--width", str(WIDTH), "--blocks", str(BLOCKS), "--rank", str(RANK),
                     "--out", str(tmp_path), "--quiet"])
    plot, table = tmp_path / "spa_vs_finepruning.png", tmp_path / "spa_vs_finepruning.md"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = table.read_text()
    assert "| SPLoRA | 0.5 |" in text and "| fine-pruning | 0.5 |" in text
    assert (tmp_path / "spa_vs_finepruning.json").exists()

    # Width 8, one block, density 0.5: conv1 keeps 4 of its 8 outputs, conv2 reads those 4.
    # SPLoRA (no conv biases): stem 4·(1+8), conv1 4·(8+4), conv2 4·(4+8) = 36 + 48 + 48.
    # Fine-pruning: stem 8·1·9, conv1 4·8·9, conv2 8·4·9 = 72 + 288 + 288.
    # Head 8·5 + 5 and three batch norms of 8 channels, 2 parameters each: 45 + 48 on both sides.
    pruned = {o.method: o for o in outcomes if o.target == 0.5}
    assert pruned["SPLoRA"].density == pruned["fine-pruning"].density == 0.5
    assert pruned["SPLoRA"].stored_layers == 132 and pruned["fine-pruning"].stored_layers == 648
    assert pruned["SPLoRA"].stored_shared == pruned["fine-pruning"].stored_shared == 93
    assert pruned["SPLoRA"].package_bytes == (tmp_path / "spa_vs_finepruning_density0.5.spatask").stat().st_size
    assert f"| 0.5 | {(648 + 93) / (132 + 93):.2f}× | {648 / 132:.2f}× |" in text


def test_splora_trains_adapters_and_leaves_the_base_weights_alone(base, task):
    model = splora_task_model(base, CLASSES, rank=RANK, seed=0)
    adapters = {name: copy.deepcopy(layer.adapter.state_dict()) for name, layer in spa_layers(model).items()}
    train(model, task, epochs=1, lr=1e-2)
    for name, layer in spa_layers(model).items():
        assert torch.equal(layer.weight, base.get_submodule(name).weight), name
        assert not torch.equal(layer.adapter.cols, adapters[name]["cols"]), name


def test_fine_pruning_is_the_plain_network_and_trains_only_active_weights(base, task):
    plain = fine_tuned_model(base, CLASSES, seed=0)
    assert all(parameter.requires_grad for parameter in plain.parameters())
    model = masked_fine_tune_model(plain).eval()
    with torch.no_grad():  # zero adapters: the converted network computes the plain one
        torch.testing.assert_close(model(task.x_test), plain.eval()(task.x_test), rtol=1e-4, atol=1e-5)

    prune_to(model, channel_groups(model, task.x_train[:2]), 0.5, 1, None)
    conv1 = model.blocks[0].conv1
    kept = conv1.out_mask.clone()
    assert int(kept.sum()) == WIDTH // 2
    before = {name: layer.weight.detach().clone() for name, layer in spa_layers(model).items()}
    train(model, task, epochs=1, lr=3e-3)
    for name, layer in spa_layers(model).items():
        assert layer.weight.requires_grad, name
        assert float(layer.adapter.rows.abs().max()) == float(layer.adapter.cols.abs().max()) == 0.0, name
    # conv1: the kept filters train, the pruned ones get no gradient and stay as they were
    assert not torch.equal(conv1.weight[kept], before["blocks.0.conv1"][kept])
    assert torch.equal(conv1.weight[~kept], before["blocks.0.conv1"][~kept])
    assert not torch.equal(model.stem.weight, before["stem"])


def test_recalibrated_statistics_are_the_batch_statistics(base, task):
    model = copy.deepcopy(base)
    recalibrate_batch_norms(model, task.x_train)
    stem = model.stem(task.x_train).detach()
    torch.testing.assert_close(model.stem_bn.running_mean, stem.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(model.stem_bn.running_var, stem.var(dim=(0, 2, 3), unbiased=True))
    assert model.stem_bn.momentum == 0.1 and not model.training


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--densities", "0"], ["--densities", "1"],
                                  ["--rounds", "0"], ["--tune-epochs", "-1"], ["--threads", "0"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)
