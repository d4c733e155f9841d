"""Task packages: bit-exact round trips, task switching on one base, size, and refusal of bad packages.

Expected values are built here from the saved model by hand (inactive adapter and
bias entries zeroed with boolean indexing), never by reading a package back.  The
byte layout used to doctor packages is the documented one (module docstring of
``spa_kernels.pruning.package``), written out independently in ``support.package_bytes``.
"""

from __future__ import annotations

import copy
import io
import json
import math
import warnings
import zlib

import pytest
import torch
from support.package_bytes import (
    ALIGN,
    DEFLATE,
    DIGEST,
    PREFIX,
    STORED,
    doctored_header,
    read_parts,
    reseal,
    reseal_body,
    seal,
)
from support.pruning_models import ResidualCNN, TinyMLP, residual_cnn_input
from torch import nn

import spa_kernels
from spa_kernels.pruning._layers import spa_layers
from spa_kernels.pruning.package import load_task, save_task, task_size

HEAD_AND_NORMS = ("head", "stem_bn", "block.bn1", "block.bn2", "down.bn1", "down.bn2", "down.shortcut.1")


# --------------------------------------------------------------------------- building tasks


def randomise_task(model: nn.Module, seed: int, keep: float = 0.6, head_weight: bool = False) -> nn.Module:
    """Random masks, adapters, biases, batch norms (and head weight): a model 'trained' for one task.

    ``head_weight`` also redraws the frozen weight of ``model.head``, for models whose
    head is task-specific (a new classifier per task).
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(shape):
        return torch.randn(shape, generator=generator)

    with torch.no_grad():
        for layer in spa_layers(model).values():
            layer.set_masks(torch.rand(layer.in_mask.shape, generator=generator) < keep,
                            torch.rand(layer.out_mask.shape, generator=generator) < keep)
            for name, parameter in layer.named_parameters():
                if name != "weight":
                    parameter.copy_(rand(parameter.shape))
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(rand(module.weight.shape))
                module.bias.copy_(rand(module.bias.shape))
                module.running_mean.copy_(rand(module.running_mean.shape))
                module.running_var.copy_(rand(module.running_var.shape).abs() + 0.5)
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=generator)))
        if head_weight:
            model.head.weight.copy_(rand(model.head.weight.shape))
    return model


def converted(base: nn.Module, rank: int = 3, conv_adapter: str = "splora") -> nn.Module:
    return spa_kernels.convert(base, rank=rank, conv_adapter=conv_adapter).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor and index list, cloned."""
    state = {key: value.detach().clone() for key, value in model.state_dict().items()}
    for name, layer in spa_layers(model).items():
        for which in ("in_idx", "out_idx"):
            idx = getattr(layer, which)
            state[f"{name}.{which}"] = None if idx is None else idx.clone()
    return state


def assert_same_state(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None, key
        else:
            assert got[key] is not None and torch.equal(got[key], want[key]), key


def expected_after_load(saved: nn.Module, task_specific: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The saved model's state with the inactive adapter and bias entries zeroed (task-specific modules whole)."""
    state = {key: value.detach().clone() for key, value in saved.state_dict().items()}
    for name, layer in spa_layers(saved).items():
        if any(name == owned or name.startswith(owned + ".") for owned in task_specific):
            continue
        prefix = f"{name}." if name else ""
        pruned_in, pruned_out = ~layer.in_mask, ~layer.out_mask
        if hasattr(layer.adapter, "rows"):
            if getattr(layer, "groups", 1) == 1:
                state[prefix + "adapter.rows"][:, :, pruned_in] = 0
            state[prefix + "adapter.cols"][:, pruned_out, :] = 0
        else:
            state[prefix + "adapter"][pruned_out] = 0
            state[prefix + "adapter"][:, pruned_in] = 0
        if layer.bias is not None:
            state[prefix + "bias"][pruned_out] = 0
    return state


def save_to_bytes(model: nn.Module, task_specific=(), compress: bool = True, trained_state: bool = True) -> bytes:
    buffer = io.BytesIO()
    written = save_task(model, buffer, task_specific, compress=compress, trained_state=trained_state)
    assert written == len(buffer.getvalue())
    return buffer.getvalue()


def load_bytes(model: nn.Module, data: bytes) -> dict:
    return load_task(model, io.BytesIO(data))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("compress", [True, False], ids=["deflate", "stored"])
@pytest.mark.parametrize("conv_adapter", ["splora", "sppara"])
def test_round_trip_is_bit_exact(tmp_path, conv_adapter, compress):
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN(), conv_adapter=conv_adapter), seed=1, head_weight=True)
    path = tmp_path / "task.spa"
    written = save_task(saved, path, task_specific=HEAD_AND_NORMS, compress=compress)
    assert written == path.stat().st_size == task_size(path) == task_size(saved, HEAD_AND_NORMS, compress=compress)
    assert PREFIX.unpack_from(path.read_bytes())[2] == (DEFLATE if compress else STORED)
    want = expected_after_load(saved, HEAD_AND_NORMS)

    model = randomise_task(copy.deepcopy(saved), seed=2, head_weight=True)  # scrambled: masks, adapters, norms, head
    assert any(not torch.equal(value, want[key]) for key, value in model.state_dict().items())
    assert load_task(model, path) == {}
    state = model.state_dict()
    assert state.keys() == want.keys()
    for key in want:
        assert torch.equal(state[key], want[key]), key
    x = residual_cnn_input()
    assert torch.equal(model(x), saved(x))


def test_round_trip_of_layers_with_bias():
    torch.manual_seed(0)
    saved = randomise_task(converted(TinyMLP()), seed=3, keep=0.5)
    assert all(layer.bias is not None for layer in spa_layers(saved).values())
    data = save_to_bytes(saved)
    want = expected_after_load(saved)
    model = randomise_task(copy.deepcopy(saved), seed=4)
    load_bytes(model, data)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
    layer = model.fc1
    assert torch.count_nonzero(layer.bias[~layer.out_mask]) == 0  # the inactive outputs' bias is zero
    x = torch.randn(5, 12)
    assert torch.equal(model(x), saved(x))


def test_all_channels_pruned_and_one_kept():
    torch.manual_seed(0)
    saved = randomise_task(converted(TinyMLP()), seed=5)
    saved.fc1.set_masks(out_mask=torch.zeros(16, dtype=torch.bool))
    saved.fc2.set_masks(in_mask=torch.zeros(16, dtype=torch.bool), out_mask=torch.arange(16) == 7)
    data = save_to_bytes(saved)
    want = expected_after_load(saved)
    model = randomise_task(copy.deepcopy(saved), seed=6, keep=1.0)
    load_bytes(model, data)
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key
    assert model.fc2.out_idx.tolist() == [7]


def test_grouped_convolution_keeps_adapter_columns():
    torch.manual_seed(0)
    saved = randomise_task(converted(nn.Sequential(nn.Conv2d(4, 6, 3, groups=2))), seed=7, keep=0.5)
    layer = saved[0]
    assert layer.groups == 2 and layer.adapter.rows.shape[-1] == 2
    want = expected_after_load(saved)  # rows kept whole, cols zeroed on pruned outputs
    model = randomise_task(copy.deepcopy(saved), seed=8)
    load_bytes(model, save_to_bytes(saved))
    for key, value in model.state_dict().items():
        assert torch.equal(value, want[key]), key


def test_task_specific_modules_given_as_modules_or_one_name():
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=9)
    by_module = save_to_bytes(saved, [saved.head, saved.stem_bn])
    by_name = save_to_bytes(saved, ["head", "stem_bn"])
    assert by_module == by_name
    assert len(save_to_bytes(saved, "head")) == len(save_to_bytes(saved, ["head"]))


def test_load_into_another_dtype_and_under_no_grad():
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=10, head_weight=True)
    data = save_to_bytes(saved, HEAD_AND_NORMS)
    want = expected_after_load(saved, HEAD_AND_NORMS)
    model = randomise_task(copy.deepcopy(saved), seed=11, head_weight=True).double()
    with torch.no_grad():
        load_bytes(model, data)
    for key, value in model.state_dict().items():
        assert value.dtype == (torch.float64 if want[key].is_floating_point() else want[key].dtype), key
        assert torch.equal(value, want[key].to(value.dtype)), key
    assert model.head.bias.requires_grad and model.block.conv1.adapter.rows.requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_load_onto_cuda():
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=12, head_weight=True)
    data = save_to_bytes(saved, HEAD_AND_NORMS)
    want = expected_after_load(saved, HEAD_AND_NORMS)
    model = randomise_task(copy.deepcopy(saved), seed=13, head_weight=True).cuda()
    load_bytes(model, data)
    for key, value in model.state_dict().items():
        assert value.is_cuda and torch.equal(value.cpu(), want[key]), key
    assert save_to_bytes(model, HEAD_AND_NORMS) == save_to_bytes(copy.deepcopy(model).cpu(), HEAD_AND_NORMS)


# --------------------------------------------------------------------------- switching tasks on one base


def test_switching_between_tasks_on_one_base(tmp_path):
    torch.manual_seed(0)
    base = ResidualCNN()
    task_a = randomise_task(converted(base), seed=21, head_weight=True)
    task_b = randomise_task(converted(base), seed=22, head_weight=True)
    save_task(task_a, tmp_path / "a.spa", HEAD_AND_NORMS)
    save_task(task_b, tmp_path / "b.spa", HEAD_AND_NORMS)

    shared = converted(base)
    frozen = {name: layer.weight for name, layer in spa_layers(shared).items() if not name.startswith("head")}
    pointers = {name: weight.data_ptr() for name, weight in frozen.items()}
    values = {name: weight.clone() for name, weight in frozen.items()}
    x = residual_cnn_input(batch=3)
    want_a, want_b = task_a(x), task_b(x)
    assert not torch.equal(want_a, want_b)
    for path, want in (("a.spa", want_a), ("b.spa", want_b), ("a.spa", want_a), ("b.spa", want_b)):
        load_task(shared, tmp_path / path)
        assert torch.equal(shared(x), want), path
    for name, weight in frozen.items():
        assert spa_layers(shared)[name].weight is weight
        assert weight.data_ptr() == pointers[name] and torch.equal(weight, values[name]), name


# --------------------------------------------------------------------------- size


def test_size_follows_the_stored_per_task_formula(tmp_path):
    torch.manual_seed(0)
    model = randomise_task(converted(ResidualCNN(), rank=4), seed=30, keep=0.5)
    stored = save_to_bytes(model, compress=False, trained_state=False)  # the SPA layers' entries only
    values = mask_bytes = blobs = 0
    for layer in spa_layers(model).values():  # docs/design.md §1: r·(|O| + |S|) + |O| values per SPLoRA layer
        active_in, active_out = int(layer.in_mask.sum()), int(layer.out_mask.sum())
        values += layer.adapter.rows.shape[1] * (active_out + active_in)
        values += active_out if layer.bias is not None else 0
        mask_bytes += math.ceil(layer.in_mask.numel() / 8) + math.ceil(layer.out_mask.numel() / 8)
        blobs += 4 + (layer.bias is not None)
    formula = 4 * values + mask_bytes
    _, _, _, header_bytes, payload_bytes, body_bytes = PREFIX.unpack_from(stored)
    assert body_bytes == header_bytes + payload_bytes
    assert len(stored) == PREFIX.size + header_bytes + payload_bytes + DIGEST
    assert formula <= payload_bytes <= formula + (ALIGN - 1) * blobs
    assert header_bytes < 4096

    deflated = save_to_bytes(model, trained_state=False)
    assert read_parts(deflated) == read_parts(stored)  # the same header and payload, deflated
    assert len(deflated) < len(stored)
    path = tmp_path / "task.spa"
    assert save_task(model, path, trained_state=False) == len(deflated) == task_size(path)
    assert task_size(model, trained_state=False) == len(deflated)
    assert task_size(model) == save_task(model, path) > len(deflated)  # plus the batch norms


def test_deflate_shrinks_float32_values_by_their_exponent_bytes():
    """Byte planes put the exponent bytes together: random float32 adapters deflate to under 89 %.

    Their mantissa bytes are close to random, so that is about all a lossless codec can do
    (deflating the values as they are gives about 92 %).
    """
    torch.manual_seed(0)
    model = spa_kernels.convert(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), rank=16)
    with torch.no_grad():
        for layer in spa_layers(model).values():
            layer.adapter.rows.normal_(std=0.1)
            layer.adapter.cols.normal_(std=0.02)
    stored, deflated = save_to_bytes(model, compress=False), save_to_bytes(model)
    assert read_parts(deflated) == read_parts(stored)
    assert len(deflated) < 0.89 * len(stored)


def test_biasless_layers_store_no_bias():
    torch.manual_seed(0)
    model = converted(ResidualCNN())
    header = json.loads(read_parts(save_to_bytes(model))[0])
    for record in header["layers"]:
        assert ("bias" in record["tensors"]) == (record["name"] == "head"), record["name"]


# --------------------------------------------------------------------------- bad packages


def flip(data: bytes, position: int) -> bytes:
    doctored = bytearray(data)
    doctored[position] ^= 0x10
    return bytes(doctored)


def set_active_in(header: dict) -> None:
    header["layers"][1]["active_in"] += 1


def move_blob_outside(header: dict) -> None:
    header["layers"][0]["tensors"]["adapter.rows"]["offset"] = 10**9


def drop_tensor(header: dict) -> None:
    del header["layers"][0]["tensors"]["adapter.cols"]


@pytest.fixture(scope="module")
def package() -> tuple[nn.Module, bytes]:
    torch.manual_seed(0)
    base = ResidualCNN()
    saved = randomise_task(converted(base), seed=40)
    return base, save_to_bytes(saved, ["head"])


def resealed(**options):
    return lambda data: seal(*read_parts(data), **options)


def announcing_more_payload(data: bytes) -> bytes:
    header, payload = read_parts(data)
    return seal(header, payload, payload_bytes=len(payload) + 16)


def stored_with_a_longer_body(data: bytes) -> bytes:
    header, payload = read_parts(data)
    return seal(header, payload + bytes(16), codec=STORED, payload_bytes=len(payload))


def announcing_an_unaligned_header(data: bytes) -> bytes:
    header, payload = read_parts(data)
    return seal(header, payload, header_bytes=len(header) - 1)


BAD_BYTES = {
    "flipped payload byte": (lambda data: flip(data, len(data) - DIGEST - 5), "checksum"),
    "flipped header byte": (lambda data: flip(data, PREFIX.size + 3), "checksum"),
    "flipped checksum byte": (lambda data: flip(data, len(data) - 1), "checksum"),
    "truncated": (lambda data: data[: len(data) // 2], "truncated"),
    "truncated to a few bytes": (lambda data: data[:5], "truncated"),
    "empty": (lambda data: b"", "truncated"),
    "trailing bytes": (lambda data: data + b"\0", "unexpected bytes"),
    "wrong magic": (lambda data: b"PK\x03\x04" + data[4:], "magic"),
    "older version": (resealed(version=1), "format version 1"),
    "newer version": (resealed(version=5), "format version 5"),
    "unknown codec": (resealed(codec=7), "unknown codec 7"),
    "deflate stream not zlib": (lambda data: reseal_body(data, b"not a zlib stream"), "corrupt deflate stream"),
    "deflate stream cut short": (lambda data: reseal_body(data, zlib.compress(data)[:40]),
                                 "corrupt deflate stream|does not hold"),
    "deflate stream holds less than announced": (announcing_more_payload, "does not hold the announced"),
    "stored body of another length": (stored_with_a_longer_body, "stored body of"),
    "header length not a multiple of 16": (announcing_an_unaligned_header, "not a multiple of 16"),
    "active count disagrees with mask": (lambda data: doctored_header(data, set_active_in), "active counts"),
    "tensor outside the payload": (lambda data: doctored_header(data, move_blob_outside), "outside the payload"),
    "tensor missing": (lambda data: doctored_header(data, drop_tensor), "holds tensors"),
    "not JSON": (lambda data: seal(b"{not json", read_parts(data)[1]), "malformed header"),
    "not JSON, stored": (lambda data: seal(b"{not json", read_parts(data)[1], codec=STORED), "malformed header"),
}


@pytest.mark.parametrize("case", sorted(BAD_BYTES))
def test_bad_package_is_refused_and_model_unchanged(package, case):
    base, data = package
    doctor, message = BAD_BYTES[case]
    model = randomise_task(converted(base), seed=41)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_bytes(model, doctor(data))
    assert_same_state(snapshot(model), before)


class RenamedHead(ResidualCNN):
    """ResidualCNN whose head is called ``classifier``: the package's task-specific ``head`` is missing."""

    def __init__(self):
        super().__init__()
        self.classifier = self.head
        del self.head

    def forward(self, x):
        return self.classifier(x)


MISMATCHED_MODELS = {
    "another architecture": (lambda base: converted(TinyMLP()), "another architecture"),
    "another rank": (lambda base: converted(base, rank=4), "rank is 3 in the package, 4 in the model"),
    "another adapter kind": (lambda base: converted(base, conv_adapter="sppara"), "kind"),
    "missing task-specific module": (lambda base: converted(RenamedHead()), "no module 'head'"),
    "another head width": (lambda base: converted(ResidualCNN(classes=7)), "shape"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHED_MODELS))
def test_package_for_another_model_is_refused_and_model_unchanged(package, case):
    base, data = package
    build, message = MISMATCHED_MODELS[case]
    torch.manual_seed(1)
    model = randomise_task(build(base), seed=42)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_bytes(model, data)
    assert_same_state(snapshot(model), before)


def test_bad_task_specific_arguments():
    model = converted(ResidualCNN())
    with pytest.raises(ValueError, match="no module named 'classifier'"):
        save_to_bytes(model, ["classifier"])
    with pytest.raises(ValueError, match="not part of the model"):
        save_to_bytes(model, [nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="inside"):
        save_to_bytes(model, ["block", "block.bn1"])
    with pytest.raises(TypeError, match="task_specific"):
        save_to_bytes(model, [3])
    with pytest.raises(TypeError, match="model"):
        save_to_bytes("not a model")


# --------------------------------------------------------------------------- metadata


class Truncation(nn.Module):
    """A module whose task state is one integer: how many of its layers run."""

    def __init__(self, depth: int):
        super().__init__()
        self.depth = depth
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))

    def forward(self, x):
        for layer in self.layers[: self.depth]:
            x = layer(x)
        return x

    def task_metadata(self) -> dict[str, int]:
        return {"depth": self.depth}

    def load_task_metadata(self, metadata: dict[str, int]) -> None:
        self.depth = metadata["depth"]


class FixedDepth(nn.Module):
    """The layers of :class:`Truncation` without its task metadata."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(6, 6) for _ in range(4))


def test_task_metadata_round_trip():
    torch.manual_seed(0)
    saved = spa_kernels.convert(nn.Sequential(Truncation(depth=2)), rank=2)
    data = save_to_bytes(saved)
    model = copy.deepcopy(saved)
    model[0].depth = 4
    assert load_bytes(model, data) == {"0": {"depth": 2}}
    assert model[0].depth == 2
    x = torch.randn(3, 6)
    assert torch.equal(model(x), saved(x))

    without = converted(nn.Sequential(FixedDepth()))
    before = snapshot(without)
    with pytest.raises(ValueError, match="task metadata"):
        load_bytes(without, data)
    assert_same_state(snapshot(without), before)


def test_task_metadata_must_be_a_dict_of_integers():
    model = nn.Sequential(Truncation(depth=2))
    model[0].task_metadata = lambda: {"depth": 2.5}
    with pytest.raises(TypeError, match="dict\\[str, int\\]"):
        save_to_bytes(model)


# --------------------------------------------------------------------------- trained state outside the SPA layers


def test_batch_norms_are_stored_by_default_and_restore_the_model():
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=60)
    header = json.loads(read_parts(save_to_bytes(saved))[0])
    stored = {record["name"] for record in header["state"]}
    assert {"stem_bn.weight", "stem_bn.running_var", "stem_bn.num_batches_tracked", "down.shortcut.1.bias"} <= stored
    model = randomise_task(copy.deepcopy(saved), seed=61)
    load_bytes(model, save_to_bytes(saved, ["head"]))
    for key, value in expected_after_load(saved, ("head",)).items():
        assert torch.equal(model.state_dict()[key], value), key


def test_version_2_packages_still_load():
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=62)
    header, payload = read_parts(save_to_bytes(saved, HEAD_AND_NORMS, trained_state=False))
    header = json.loads(header)
    assert header.pop("state") == []
    model = randomise_task(copy.deepcopy(saved), seed=63)
    load_bytes(model, reseal(header, payload, version=2))
    for key, value in expected_after_load(saved, HEAD_AND_NORMS).items():
        assert torch.equal(model.state_dict()[key], value), key


def rename_state(header: dict) -> None:
    header["state"][0]["name"] = "stem_bn.no_such_tensor"


def reshape_state(header: dict) -> None:
    header["state"][0]["tensors"]["value"]["shape"] = [2, 4]


@pytest.mark.parametrize(("change", "message"), [(rename_state, "no parameter or buffer"), (reshape_state, "shape")])
def test_state_entry_that_does_not_fit_is_refused_and_model_unchanged(change, message):
    torch.manual_seed(0)
    saved = randomise_task(converted(ResidualCNN()), seed=64)
    data = doctored_header(save_to_bytes(saved), change)
    model = randomise_task(copy.deepcopy(saved), seed=65)
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        load_bytes(model, data)
    assert_same_state(snapshot(model), before)


def test_trainable_tensors_left_out_are_named_in_a_warning():
    torch.manual_seed(0)
    model = converted(ResidualCNN())
    with pytest.warns(UserWarning, match=r"stem_bn\.weight"):
        save_to_bytes(model, trained_state=False)
    model.block.conv1.weight.requires_grad_(True)  # masked fine-tuning: the frozen base is not in a package
    with pytest.warns(UserWarning, match=r"block\.conv1\.weight") as caught:
        save_to_bytes(model)
    assert "stem_bn" not in str(caught[0].message)
    model.block.conv1.weight.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_to_bytes(model)
