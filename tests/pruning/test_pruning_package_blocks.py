"""Task packages of block-SPA (SPLoPA) models: exact round trips, task switching, size, sharing, bad packages.

Expected states are built here from the saved model by hand (the position weights of
pruned blocks zeroed with boolean indexing), never by reading a package back.  The
byte functions of ``support.package_bytes`` decode and re-seal packages by the
documented layout, independently of spa_kernels.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections import OrderedDict

import pytest
import torch
from support.package_bytes import ALIGN, DIGEST, PREFIX, doctored_header, read_parts, reseal
from torch import nn

import spa_kernels
from spa_kernels.nn import SPLoPALinear
from spa_kernels.pruning import prune_blocks, splopa_stored_parameters
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.package import load_task, save_task, task_size

OPTIONS = {"num_prototypes": 3, "block_shape": (8, 8), "prototype_rank": 2, "init_range": 0.5}


class BlockMLP(nn.Module):
    """Two linear layers of different block grids and a third one of the second's shape."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(32, 48, bias=bias)
        self.fc2 = nn.Linear(48, 48, bias=bias)
        self.fc3 = nn.Linear(48, 48, bias=bias)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def splopa_model(base: nn.Module, **options) -> nn.Module:
    return spa_kernels.convert_splopa(base, **(OPTIONS | options)).eval()


def layers_of(model: nn.Module) -> dict[str, SPLoPALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, SPLoPALinear)}


def randomise_task(model: nn.Module, seed: int, keep: float = 0.5) -> nn.Module:
    """Random block masks, position weights, prototypes and biases: a model 'trained' for one task."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers_of(model).values():
            layer.set_masks(torch.rand(layer.block_mask.shape, generator=generator) < keep)
            for name, parameter in layer.named_parameters():
                if name != "weight":
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
        for layer in spa_layers(model).values():
            layer.set_masks(torch.rand(layer.in_mask.shape, generator=generator) < keep,
                            torch.rand(layer.out_mask.shape, generator=generator) < keep)
            for name, parameter in layer.named_parameters():
                if name != "weight":
                    parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model


def expected_after_load(saved: nn.Module) -> dict[str, torch.Tensor]:
    """The saved model's state with the position weights of pruned blocks zeroed (unless shared)."""
    state = {key: value.detach().clone() for key, value in saved.state_dict().items()}
    holders: dict[int, int] = {}
    for layer in layers_of(saved).values():
        holders[id(layer.adapter.pos_weights)] = holders.get(id(layer.adapter.pos_weights), 0) + 1
    for name, layer in layers_of(saved).items():
        if holders[id(layer.adapter.pos_weights)] == 1:
            state[f"{name}.adapter.pos_weights"][:, ~layer.block_mask] = 0
    for name, layer in spa_layers(saved).items():
        state[f"{name}.adapter.rows"][:, :, ~layer.in_mask] = 0
        state[f"{name}.adapter.cols"][:, ~layer.out_mask, :] = 0
        if layer.bias is not None:
            state[f"{name}.bias"][~layer.out_mask] = 0
    return state


def assert_state(model: nn.Module, want: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        assert torch.equal(state[key], want[key]), key


def snapshot(model: nn.Module) -> dict:
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    state |= {f"{name}.all active": layer._all_active for name, layer in layers_of(model).items()}
    return state


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert (torch.equal(after[key], value) if isinstance(value, torch.Tensor) else after[key] == value), key


def save_to_bytes(model: nn.Module, **options) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trainable is left out
        written = save_task(model, buffer, **options)
    assert written == len(buffer.getvalue())
    return buffer.getvalue()


def header_of(data: bytes) -> dict:
    return json.loads(read_parts(data)[0])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [True, False], ids=["deflate", "stored"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_round_trip_into_a_fresh_copy_is_exact(tmp_path, compress, bias):
    torch.manual_seed(0)
    base = BlockMLP(bias=bias)
    saved = randomise_task(splopa_model(base), seed=1)
    path = tmp_path / "task.spa"
    written = save_task(saved, path, compress=compress)
    assert written == path.stat().st_size == task_size(path) == task_size(saved, compress=compress)

    fresh = splopa_model(base)  # every block active, fresh prototypes and position weights
    x = torch.randn(5, 32)
    assert not torch.equal(fresh(x), saved(x))
    assert load_task(fresh, path) == {}
    assert_state(fresh, expected_after_load(saved))
    assert torch.equal(fresh(x), saved(x))
    for layer in layers_of(fresh).values():
        assert layer.adapter.pos_weights.requires_grad and layer.adapter.prototypes.rows.requires_grad


def test_prototypes_are_stored_once_and_every_sharer_sees_them():
    torch.manual_seed(0)
    base = BlockMLP()
    saved = randomise_task(splopa_model(base), seed=2)
    shared = saved.fc1.adapter.prototypes
    assert shared is saved.fc2.adapter.prototypes is saved.fc3.adapter.prototypes
    header = header_of(save_to_bytes(saved))
    assert [(record["kind"], record["layers"]) for record in header["shared"]] == [
        ("prototypes", ["fc1", "fc2", "fc3"])]
    assert all("prototypes" not in key for record in header["block_layers"] for key in record["tensors"])
    assert header["state"] == []  # nothing of the SPLoPA layers is stored again as trained state

    fresh = splopa_model(base)
    load_task(fresh, io.BytesIO(save_to_bytes(saved)))
    assert fresh.fc1.adapter.prototypes is fresh.fc3.adapter.prototypes  # still one tensor set
    assert torch.equal(fresh.fc3.adapter.prototypes.cols, shared.cols)


def test_unshared_prototypes_are_stored_per_layer():
    torch.manual_seed(0)
    base = BlockMLP()
    saved = randomise_task(splopa_model(base, shared_prototypes=False), seed=3)
    header = header_of(save_to_bytes(saved))
    assert [record["layers"] for record in header["shared"]] == [["fc1"], ["fc2"], ["fc3"]]
    fresh = splopa_model(base, shared_prototypes=False)
    load_task(fresh, io.BytesIO(save_to_bytes(saved)))
    assert_state(fresh, expected_after_load(saved))


def test_shared_position_weights_are_stored_whole_once():
    torch.manual_seed(0)
    base = BlockMLP()
    saved = randomise_task(splopa_model(base, shared_pos_weights=True), seed=4)
    assert saved.fc2.adapter.pos_weights is saved.fc3.adapter.pos_weights
    assert saved.fc1.adapter.pos_weights is not saved.fc2.adapter.pos_weights  # another grid
    header = header_of(save_to_bytes(saved))
    pos = [record for record in header["shared"] if record["kind"] == "pos_weights"]
    assert [record["layers"] for record in pos] == [["fc2", "fc3"]]
    assert pos[0]["tensors"]["value"]["shape"] == [3, 6, 6]
    by_name = {record["name"]: record for record in header["block_layers"]}
    assert "pos_weights" in by_name["fc1"]["tensors"] and "pos_weights" not in by_name["fc2"]["tensors"]
    # Accounting: the shared position weights whole, once; fc1's K per active block; biases; prototypes once.
    prototypes = 3 * (8 * 2 + 2 * 8)
    assert splopa_stored_parameters(saved) == 3 * int(saved.fc1.block_mask.sum()) + 3 * 6 * 6 + 3 * 48 + prototypes

    fresh = splopa_model(base, shared_pos_weights=True)
    load_task(fresh, io.BytesIO(save_to_bytes(saved)))
    assert_state(fresh, expected_after_load(saved))
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), saved(x))


def test_load_into_another_dtype():
    torch.manual_seed(0)
    base = BlockMLP()
    saved = randomise_task(splopa_model(base), seed=5)
    fresh = splopa_model(base).double()
    with torch.no_grad():
        load_task(fresh, io.BytesIO(save_to_bytes(saved)))
    for key, value in expected_after_load(saved).items():
        got = fresh.state_dict()[key]
        assert torch.equal(got, value.to(got.dtype)), key


# --------------------------------------------------------------------------- switching tasks on one base


def test_switching_tasks_a_b_a_leaves_no_trace(tmp_path):
    torch.manual_seed(0)
    base = BlockMLP()
    task_a = randomise_task(splopa_model(base), seed=11, keep=0.3)
    task_b = randomise_task(splopa_model(base), seed=12, keep=0.7)
    save_task(task_a, tmp_path / "a.spa")
    save_task(task_b, tmp_path / "b.spa")
    shared = splopa_model(base)
    weights = {name: layer.weight for name, layer in layers_of(shared).items()}
    values = {name: weight.clone() for name, weight in weights.items()}
    x = torch.randn(4, 32)
    want = {"a.spa": (task_a(x), expected_after_load(task_a)), "b.spa": (task_b(x), expected_after_load(task_b))}
    for path in ("a.spa", "b.spa", "a.spa", "b.spa"):
        load_task(shared, tmp_path / path)
        assert torch.equal(shared(x), want[path][0]), path
        assert_state(shared, want[path][1])
    for name, layer in layers_of(shared).items():  # the frozen base is never copied or changed
        assert layer.weight is weights[name] and torch.equal(layer.weight, values[name])


# --------------------------------------------------------------------------- size


def test_size_is_the_stored_parameters_plus_mask_bits():
    torch.manual_seed(0)
    model = splopa_model(BlockMLP())
    prune_blocks(model, 0.3)
    stored = save_to_bytes(model, compress=False)
    values = splopa_stored_parameters(model)
    mask_bytes = sum(math.ceil(layer.block_mask.numel() / 8) for layer in layers_of(model).values())
    blobs = 3 * 3 + 2  # per layer: mask, position weights, bias; the prototypes' rows and cols
    formula = 4 * values + mask_bytes
    _, _, _, header_bytes, payload_bytes, body_bytes = PREFIX.unpack_from(stored)
    assert body_bytes == header_bytes + payload_bytes
    assert len(stored) == PREFIX.size + header_bytes + payload_bytes + DIGEST
    assert formula <= payload_bytes <= formula + (ALIGN - 1) * blobs
    assert header_bytes < 2048

    # The position weights of pruned blocks are not stored: one block less is K values less.
    layer = model.fc2
    first = tuple(int(i) for i in layer.block_mask.nonzero()[0])
    layer.block_mask[first] = False
    layer.refresh_indices()
    assert splopa_stored_parameters(model) == values - 3
    smaller = PREFIX.unpack_from(save_to_bytes(model, compress=False))[4]
    assert formula - 12 <= smaller <= formula - 12 + (ALIGN - 1) * blobs
    deflated = save_to_bytes(model)
    assert task_size(model) == len(deflated)


def test_pruned_model_package_is_smaller_than_the_dense_one():
    torch.manual_seed(0)
    model = splopa_model(BlockMLP())
    dense = len(save_to_bytes(model, compress=False))
    prune_blocks(model, 0.1)
    assert len(save_to_bytes(model, compress=False)) < dense


# --------------------------------------------------------------------------- channel-SPA and block-SPA in one model


def mixed_model() -> nn.Module:
    torch.manual_seed(0)
    base = nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.LayerNorm(16)),
        mlp=nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)),
    ))
    model = spa_kernels.convert(base, rank=2, exclude=["mlp"])
    model.mlp = spa_kernels.convert_splopa(model.mlp, num_prototypes=2, block_shape=(8, 8), inplace=True)
    return model.eval()


def test_mixed_model_round_trip_is_exact():
    saved = randomise_task(mixed_model(), seed=21)
    with torch.no_grad():
        saved.stem[2].weight.normal_()
    assert len(spa_layers(saved)) == 1 and len(layers_of(saved)) == 2
    data = save_to_bytes(saved)
    header = header_of(data)
    assert [record["name"] for record in header["layers"]] == ["stem.0"]
    assert [record["name"] for record in header["block_layers"]] == ["mlp.0", "mlp.2"]
    assert {record["name"] for record in header["state"]} == {"stem.2.weight", "stem.2.bias"}
    fresh = mixed_model()
    load_task(fresh, io.BytesIO(data))
    assert_state(fresh, expected_after_load(saved))
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), saved(x))


def test_splopa_layers_inside_a_task_specific_module_are_stored_whole():
    saved = randomise_task(mixed_model(), seed=22)
    data = save_to_bytes(saved, task_specific=["mlp"])
    header = header_of(data)
    assert header["block_layers"] == [] and header["shared"] == []
    assert "mlp.0.block_mask" not in {r["name"] for r in header["state"]}
    assert "0.block_mask" in header["modules"][0]["tensors"]
    fresh = mixed_model()
    load_task(fresh, io.BytesIO(data))
    x = torch.randn(3, 12)
    assert torch.equal(fresh(x), saved(x))
    assert not fresh.mlp[0]._all_active


# --------------------------------------------------------------------------- older packages


def version_3_package(model: nn.Module) -> bytes:
    """What version 3 wrote for a SPLoPA model: every trained tensor and the block masks whole, in "state"."""
    records, chunks, size = [], [], 0
    seen = set()
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if (not tensor.requires_grad and not name.endswith("block_mask")) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        raw = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        padding = (-size) % ALIGN
        chunks.append(bytes(padding))
        size += padding
        dtype = "bool" if tensor.dtype == torch.bool else "float32"
        records.append({"name": name, "tensors": {"value": {"dtype": dtype, "shape": list(tensor.shape),
                                                             "offset": size, "bytes": len(raw)}}})
        chunks.append(raw)
        size += len(raw)
    header = {"format": "spa_kernels task package", "layers": [], "modules": [], "state": records, "metadata": {}}
    return reseal(header, b"".join(chunks), version=3)


def test_version_3_packages_of_splopa_models_still_load():
    torch.manual_seed(0)
    base = BlockMLP()
    saved = randomise_task(splopa_model(base), seed=31)
    fresh = splopa_model(base)
    load_task(fresh, io.BytesIO(version_3_package(saved)))
    assert_state(fresh, {key: value.detach() for key, value in saved.state_dict().items()})
    assert not fresh.fc1._all_active  # the mask written in place is read again
    x = torch.randn(3, 32)
    assert torch.equal(fresh(x), saved(x))


# --------------------------------------------------------------------------- bad packages


@pytest.fixture(scope="module")
def package() -> tuple[nn.Module, bytes]:
    torch.manual_seed(0)
    base = BlockMLP()
    return base, save_to_bytes(randomise_task(splopa_model(base), seed=41))





def block(header: dict, name: str) -> dict:
    return next(record for record in header["block_layers"] if record["name"] == name)


def grid_of_other_size(header: dict) -> None:
    mask = block(header, "fc2")["tensors"]["block_mask"]
    mask["shape"], mask["bytes"] = [40], 5  # the padding bits of the 36 stored are zero


def more_active_blocks(header: dict) -> None:
    block(header, "fc1")["active_blocks"] += 1


def pos_weights_of_another_k(header: dict) -> None:
    blob = block(header, "fc1")["tensors"]["pos_weights"]
    blob["shape"][0] -= 1
    blob["bytes"] = 4 * math.prod(blob["shape"])


def pos_weights_missing(header: dict) -> None:
    del block(header, "fc3")["tensors"]["pos_weights"]


def prototypes_shared_by_fewer(header: dict) -> None:
    header["shared"][0]["layers"] = ["fc1", "fc2"]


def shared_of_unknown_kind(header: dict) -> None:
    header["shared"][0]["kind"] = "codebook"


def block_layer_renamed(header: dict) -> None:
    block(header, "fc3")["name"] = "head"


BAD_HEADERS = {
    "block grid of another size": (grid_of_other_size, "block_mask holds 40 blocks"),
    "active count disagrees with the mask": (more_active_blocks, "active block count"),
    "position weights of another K": (pos_weights_of_another_k, "pos_weights: shape"),
    "position weights missing": (pos_weights_missing, "holds tensors"),
    "prototypes shared by other layers": (prototypes_shared_by_fewer, "shared among"),
    "shared entry of unknown kind": (shared_of_unknown_kind, "unknown kind"),
    "block layer of another name": (block_layer_renamed, "SPLoPA layers differ"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_bad_package_is_refused_and_model_unchanged(package, case):
    base, data = package
    change, message = BAD_HEADERS[case]
    model = randomise_task(splopa_model(base), seed=42)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_task(model, io.BytesIO(doctored_header(data, change)))
    assert_unchanged(model, before)


MISMATCHED_MODELS = {
    "another block shape": ({"block_shape": (4, 4)}, "block_shape is \\[8, 8\\] in the package, \\[4, 4\\]"),
    "another K": ({"num_prototypes": 4}, "num_prototypes is 3 in the package, 4 in the model"),
    "another prototype rank": ({"prototype_rank": 1}, "rank is 2 in the package, 1 in the model"),
    "prototypes not shared": ({"shared_prototypes": False}, "prototypes are shared among"),
    "position weights shared": ({"shared_pos_weights": True}, "pos_weights are shared among"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED_MODELS))
def test_package_for_another_block_model_is_refused_and_model_unchanged(package, case):
    base, data = package
    options, message = MISMATCHED_MODELS[case]
    model = randomise_task(splopa_model(base, **options), seed=43)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_task(model, io.BytesIO(data))
    assert_unchanged(model, before)


def test_channel_spa_model_refuses_a_block_package(package):
    _, data = package
    model = spa_kernels.convert(BlockMLP(), rank=2)
    before = snapshot(model)
    with pytest.raises(ValueError, match="another architecture"):
        load_task(model, io.BytesIO(data))
    assert_unchanged(model, before)


def test_a_fine_tuned_splopa_weight_is_named_in_a_warning():
    model = splopa_model(BlockMLP())
    model.fc2.weight.requires_grad_(True)  # masked fine-tuning: the frozen base is not in a package
    with pytest.warns(UserWarning, match=r"1 trainable tensors .*fc2\.weight"):
        save_task(model, io.BytesIO())
