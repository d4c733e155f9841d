"""The block-SPA example: a short run end to end, its byte counts, and the fine-pruning model it builds."""

from __future__ import annotations

import json

import pytest
import torch

from examples._digits import TASK_CLASSES, digits_split, train
from examples.block_spa import DigitsViT, main, masked_fine_tune_model, parse_args, splopa_model
from spa_kernels.pruning.block_pruning import splopa_layers

WIDTH, DEPTH, PROTOTYPES, CLASSES = 16, 1, 2, len(TASK_CLASSES)
CHANCE = 100.0 / CLASSES


def test_short_run_writes_plot_table_and_packages(tmp_path):
    outcomes = main(["--seeds", "1", "--densities", "0.5", "--epochs", "4", "--rounds", "1", "--tune-epochs", "1",
                     "--pretrain-epochs", "4", "--width", str(WIDTH), "--depth", str(DEPTH), "--prototypes",
                     str(PROTOTYPES), "--out", str(tmp_path), "--quiet"])
    assert (tmp_path / "block_spa.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "block_spa.md").read_text()
    for row in ("| SPLoPA | 1 (not pruned) | 1.000 |", "| fine-pruning | 1 (not pruned) | 1.000 |",
                "| SPLoPA | 0.5 | 0.500 |", "| fine-pruning | 0.5 | 0.500 |"):
        assert row in text
    assert len(json.loads((tmp_path / "block_spa.json").read_text())["runs"]) == 4

    got = {(o.method, o.target): o for o in outcomes}
    assert all(o.accuracy > CHANCE for o in outcomes), [o.accuracy for o in outcomes]
    # Width 16, one block, 8 × 8 blocks: qkv (48, 16), proj (16, 16), fc1 (32, 16), fc2 (16, 32) = 2,048
    # weights in 32 blocks; each layer keeps half its blocks.  The whole network has 2,613 parameters:
    # embedding 144, positions 128, block 2,224, final norm 32, head 85.
    fine, fine_pruned = got["fine-pruning", 1.0], got["fine-pruning", 0.5]
    assert fine.stored_bytes == fine_pruned.stored_bytes == 4 * 2613
    assert fine_pruned.active_bytes == 4 * (2613 - 2048 + 1024)
    # SPLoPA stores K = 2 position weights per active block (16), the biases (112), the prototypes
    # once (2 · (8·2 + 2·8) = 64), three layer norms (96) and the head (85): 389 values, plus the
    # block masks and the header.
    splopa = got["SPLoPA", 0.5]
    assert 4 * 389 < splopa.stored_bytes < 4 * 389 + 4096
    assert splopa.stored_bytes < got["SPLoPA", 1.0].stored_bytes < fine.stored_bytes
    assert splopa.deflated_bytes == (tmp_path / "block_spa_density0.5.spatask").stat().st_size


def test_fine_pruning_model_is_the_plain_network_masked():
    torch.manual_seed(0)
    args = parse_args(["--width", str(WIDTH), "--depth", str(DEPTH)])
    plain = DigitsViT(CLASSES, width=WIDTH, depth=DEPTH).eval()
    plain.requires_grad_(True)
    model = masked_fine_tune_model(plain, args).eval()
    task = digits_split(TASK_CLASSES, seed=0)
    with torch.no_grad():  # zero adapters, every block active: the plain network
        torch.testing.assert_close(model(task.x_test), plain(task.x_test), rtol=1e-5, atol=1e-5)
    layer = model.blocks[0].fc1
    mask = torch.rand(layer.block_mask.shape) < 0.5
    layer.set_masks(mask)
    before = layer.weight.detach().clone()
    train(model, task, epochs=1, lr=1e-2)
    pruned = ~mask.repeat_interleave(8, 0).repeat_interleave(8, 1)
    assert torch.equal(layer.weight[pruned], before[pruned])  # pruned blocks get no gradient
    assert not torch.equal(layer.weight[~pruned], before[~pruned])
    assert float(layer.adapter.pos_weights.abs().max()) == 0.0


def test_splopa_model_trains_adapters_norms_and_head_only():
    torch.manual_seed(0)
    args = parse_args(["--width", str(WIDTH), "--depth", str(DEPTH)])
    model = splopa_model(DigitsViT(CLASSES, width=WIDTH, depth=DEPTH), CLASSES, args, seed=0)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert "embed.weight" not in trained and "position" not in trained
    assert {"head.weight", "norm.weight", "blocks.0.norm1.bias", "blocks.0.fc1.bias",
            "blocks.0.fc1.adapter.pos_weights", "blocks.0.attention.qkv.adapter.prototypes.rows"} <= trained
    assert all(not layer.weight.requires_grad for _, layer in splopa_layers(model))


@pytest.mark.parametrize("argv", [["--seeds", "0"], ["--densities", "1"], ["--block", "5"], ["--width", "18"],
                                  ["--tune-epochs", "-1"]])
def test_bad_arguments_are_refused(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)
