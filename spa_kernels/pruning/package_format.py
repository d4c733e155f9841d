"""The byte format of a task package: layout, encoding, decoding and checks.

:mod:`spa_kernels.pruning.package` is the API (``save_task``, ``load_task``,
``task_size``) and says what a package stores; :mod:`.package_staging` checks a
parsed package against a model before anything is written.

Format (version 4)
------------------

All integers little-endian.  Nothing in a package is executed on load: the header
is JSON and the tensors are raw bytes.

=========  =====================================================================
bytes      content
=========  =====================================================================
8          magic ``b"SPATASK\\0"``
4          format version, uint32 (4; versions 2 and 3 still load: version 3
           has no ``"block_layers"`` and ``"shared"`` and stored a SPLoPA
           layer's tensors whole in ``"state"``, version 2 has no ``"state"``)
4          codec, uint32: 0 = stored, 1 = deflate
8          header length ``H`` in bytes, uint64 (a multiple of 16)
8          payload length ``P`` in bytes, uint64
8          body length ``L`` in bytes, uint64
L          body: header and payload, as the codec stores them (below)
32         SHA-256 of everything above
=========  =====================================================================

The header is ``H`` bytes of UTF-8 JSON padded with spaces; the payload is the
tensors' raw little-endian bytes, each at a multiple of 16 from the payload's
start, zero bytes in between.  Codec 0 stores header then payload as they are
(``L = H + P``).  Codec 1, the default, stores the zlib stream (RFC 1950) of the
header followed by the payload's *byte planes*: the first ``4·⌊P/4⌋`` bytes read
as 4-byte words are written as byte 0 of every word, then byte 1, byte 2, byte 3,
and the last ``P mod 4`` bytes follow as they are.  Grouping the bytes by position
puts the sign and exponent bytes of float32 values together, where deflate finds
their redundancy (the mantissa bytes are close to random), so the planes deflate
to about 86 % of the raw values, losslessly; the ~0.5 kB of JSON per layer deflate
to a tenth.

The header is a JSON object::

    {"format": "spa_kernels task package",
     "layers": [                       # SPA layers outside task-specific modules,
       {"name": "layer1.0.conv1",      # in named_modules order: the base model's
        "kind": "SPLoRAConv2d",        # description, checked against the model
        "adapter": "low-rank",         # "low-rank" | "full" | "none"
        "weight_shape": [64, 64, 3, 3], "in": 64, "out": 64, "groups": 1,
        "rank": 8, "scale": 1.0,       # null unless "low-rank"
        "bias": false,
        "active_in": 19, "active_out": 19,
        "tensors": {"in_mask": BLOB, "out_mask": BLOB,
                    "adapter.rows": BLOB,   # A[:, S], r × |S|
                    "adapter.cols": BLOB,   # B[O], |O| × r
                    ...}},                  # "adapter": P[O][:, S]; "bias": b[O]
       ...],
     "modules": [                      # task-specific modules: full state dicts
       {"name": "fc", "kind": "Linear", "tensors": {"weight": BLOB, "bias": BLOB}}],
     "state": [                        # other trained tensors, by qualified name:
       {"name": "bn1.weight", "tensors": {"value": BLOB}},   # norms, running statistics,
       {"name": "bn1.running_mean", "tensors": {"value": BLOB}}],  # tokens… (version 3)
     "block_layers": [                 # SPLoPA layers outside task-specific modules
       {"name": "mlp.fc1", "kind": "SPLoPALinear", "weight_shape": [64, 32],
        "block_shape": [8, 8], "num_prototypes": 4, "rank": 1, "scale": 1.0,
        "bias": true, "pos_weights": "own",         # "own" | "shared"
        "active_blocks": 13,
        "tensors": {"block_mask": BLOB,             # bits, out/p · in/q, row-major
                    "pos_weights": BLOB,            # Φ[:, M]: K × active blocks ("own" only)
                    "bias": BLOB}}],                # the whole bias
     "shared": [                       # tensors held by several SPLoPA layers, once each
       {"name": "mlp.fc1.adapter.prototypes", "kind": "prototypes",
        "layers": ["mlp.fc1", "mlp.fc2"], "tensors": {"rows": BLOB, "cols": BLOB}},
       {"name": "mlp.fc1.adapter.pos_weights", "kind": "pos_weights",
        "layers": [...], "tensors": {"value": BLOB}}],   # version 4
     "metadata": {"truncate": {"depth": 3}}}

    BLOB = {"dtype": "float32", "shape": [8, 19], "offset": 1024, "bytes": 608}

``offset`` counts from the payload's start.  Masks have dtype ``"bits"``: ``shape``
is the channel (or block) count ``n`` and the ``ceil(n / 8)`` bytes hold channel ``8j + b`` in
bit ``b`` (least significant first) of byte ``j``; padding bits are zero.  Other
dtypes are torch dtype names (``float32``, ``bfloat16``, ``int64``, ``bool``, …);
tensors keep the dtype of the parameter they came from.

The description covers shapes, kinds, ranks, scales and bias presence, so a package
for another architecture or rank is refused; it cannot tell two bases of the same
shapes apart (the frozen weights are not hashed, which would cost more than the load).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import ChannelMasked
from ._layers import spa_layers
from .package_blocks import SHARED_KINDS, block_records

MAGIC = b"SPATASK\x00"
FORMAT_VERSION = 4
# Version 3 is version 4 without "block_layers" and "shared"; version 2 is 3 without "state".
READABLE_VERSIONS = (2, 3, 4)
FIRST_BLOCK_VERSION = 4  # the first version that stores SPLoPA layers as block layers
FORMAT_NAME = "spa_kernels task package"
CODEC_STORED = 0
CODEC_DEFLATE = 1

_PREFIX = struct.Struct("<8sIIQQQ")  # magic, version, codec, header, payload and body lengths
_PLANE_WORD = 4  # bytes per word whose byte planes codec 1 deflates: float32's size
_DEFLATE_LEVEL = 9  # packages are small: the best ratio costs a few milliseconds
_DIGEST_BYTES = hashlib.sha256().digest_size
_ALIGN = 16
BITS = "bits"
_SHIFTS = torch.arange(8, dtype=torch.uint8)

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


# --------------------------------------------------------------------------- what a header says about a model


def layer_description(name: str, layer: ChannelMasked) -> dict:
    """The base model's facts about one SPA layer that a package must agree with."""
    adapter = getattr(layer, "adapter", None)
    rank = scale = None
    if adapter is None:
        kind = "none"
    elif isinstance(adapter, Tensor):
        kind = "full"
    elif isinstance(getattr(adapter, "rows", None), Tensor) and isinstance(getattr(adapter, "cols", None), Tensor):
        kind = "low-rank"
        rank = int(adapter.rows.shape[1])
        scale = float(getattr(layer, "scale", 1.0))
    else:
        raise TypeError(f"SPA layer {name!r} has an adapter of unknown kind {type(adapter).__name__}")
    return {
        "name": name,
        "kind": type(layer).__name__,
        "adapter": kind,
        "weight_shape": list(layer.weight.shape),
        "in": layer.in_mask.numel(),
        "out": layer.out_mask.numel(),
        "groups": int(getattr(layer, "groups", 1)),
        "rank": rank,
        "scale": scale,
        "bias": layer.bias is not None,
    }


def selects_columns(description: dict) -> bool:
    """Whether the adapter's columns are the layer's input channels (not so in grouped convolutions)."""
    return description["groups"] == 1


def inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def metadata_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if callable(getattr(module, "task_metadata", None))}


def check_metadata(metadata: object, owner: str) -> dict[str, int]:
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, int) and not isinstance(value, bool)
        for key, value in metadata.items()
    ):
        raise TypeError(f"task_metadata of module {owner!r} must return a dict[str, int], got {metadata!r}")
    return dict(metadata)


# --------------------------------------------------------------------------- encoding


def _le_bytes(tensor: Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor, row-major."""
    raw = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    if sys.byteorder == "big" and tensor.element_size() > 1:
        raw = raw.reshape(-1, tensor.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


def _pack_bits(mask: Tensor) -> bytes:
    bits = mask.detach().to("cpu", torch.uint8)
    bits = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).reshape(-1, 8)
    return (bits << _SHIFTS).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


@dataclass
class _PayloadWriter:
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0

    def _append(self, data: bytes) -> int:
        padding = (-self.size) % _ALIGN
        if padding:
            self.chunks.append(bytes(padding))
            self.size += padding
        offset = self.size
        self.chunks.append(data)
        self.size += len(data)
        return offset

    def tensor(self, tensor: Tensor) -> dict:
        if tensor.dtype not in DTYPE_NAMES:
            raise TypeError(f"cannot store a tensor of dtype {tensor.dtype} in a task package")
        data = _le_bytes(tensor)
        return {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "offset": self._append(data), "bytes": len(data)}

    def bits(self, mask: Tensor) -> dict:
        data = _pack_bits(mask)
        return {"dtype": BITS, "shape": [mask.numel()], "offset": self._append(data), "bytes": len(data)}


def _layer_record(name: str, layer: ChannelMasked, writer: _PayloadWriter) -> dict:
    record = layer_description(name, layer)
    in_mask, out_mask = layer.in_mask.detach().cpu(), layer.out_mask.detach().cpu()
    in_idx, out_idx = in_mask.nonzero().flatten(), out_mask.nonzero().flatten()
    record["active_in"], record["active_out"] = in_idx.numel(), out_idx.numel()
    tensors = {"in_mask": writer.bits(in_mask), "out_mask": writer.bits(out_mask)}
    columns = selects_columns(record)
    with torch.no_grad():
        if record["adapter"] == "low-rank":
            rows, cols = layer.adapter.rows[0].detach().cpu(), layer.adapter.cols[0].detach().cpu()
            tensors["adapter.rows"] = writer.tensor(rows.index_select(1, in_idx) if columns else rows)
            tensors["adapter.cols"] = writer.tensor(cols.index_select(0, out_idx))
        elif record["adapter"] == "full":
            adapter = layer.adapter.detach().cpu().index_select(0, out_idx)
            tensors["adapter"] = writer.tensor(adapter.index_select(1, in_idx) if columns else adapter)
        if layer.bias is not None:
            tensors["bias"] = writer.tensor(layer.bias.detach().cpu().index_select(0, out_idx))
    record["tensors"] = tensors
    return record


def encode(model: nn.Module, owned: list[str], compress: bool, trained: list[str] = ()) -> bytes:
    """The bytes of ``model``'s package; ``owned`` are the task-specific modules' names,
    ``trained`` the qualified names of the other parameters and buffers to store."""
    writer = _PayloadWriter()

    def inside_owned(name: str) -> bool:
        return any(inside(name, outer) for outer in owned)

    layers = [_layer_record(name, layer, writer) for name, layer in spa_layers(model).items() if not inside_owned(name)]
    block_layers, shared = block_records(model, inside_owned, writer)
    modules = []
    for name in owned:
        module = model.get_submodule(name)
        state = module.state_dict()
        modules.append({"name": name, "kind": type(module).__name__,
                        "tensors": {key: writer.tensor(value) for key, value in state.items()}})
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    state_records = [{"name": name, "tensors": {"value": writer.tensor(tensors[name])}} for name in trained]
    metadata = {name: check_metadata(module.task_metadata(), name) for name, module in metadata_modules(model).items()}
    header = json.dumps(
        {"format": FORMAT_NAME, "layers": layers, "modules": modules, "state": state_records,
         "block_layers": block_layers, "shared": shared, "metadata": metadata},
        separators=(",", ":"), allow_nan=False,
    ).encode("utf-8")
    header += b" " * ((-len(header)) % _ALIGN)
    payload = b"".join(writer.chunks)
    if compress:
        codec, body = CODEC_DEFLATE, zlib.compress(header + byte_planes(payload), _DEFLATE_LEVEL)
    else:
        codec, body = CODEC_STORED, header + payload
    prefixed = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec, len(header), len(payload), len(body)) + body
    return prefixed + hashlib.sha256(prefixed).digest()


def byte_planes(payload: bytes) -> bytes:
    """Codec 1's layout of the payload: its 4-byte words as byte planes, then the tail bytes."""
    whole = len(payload) - len(payload) % _PLANE_WORD
    words = np.frombuffer(payload, dtype=np.uint8, count=whole).reshape(-1, _PLANE_WORD)
    return words.T.tobytes() + payload[whole:]


def from_byte_planes(planes: bytearray, start: int) -> None:
    """Undoes :func:`byte_planes` in place on ``planes[start:]``."""
    whole = (len(planes) - start) - (len(planes) - start) % _PLANE_WORD
    view = np.frombuffer(planes, dtype=np.uint8, count=whole, offset=start)
    view[:] = view.reshape(_PLANE_WORD, -1).T.reshape(-1)  # the right side is a copy, so this is safe


# --------------------------------------------------------------------------- reading and parsing


class Malformed(Exception):
    """A header that does not follow the format; turned into a ValueError naming the package."""


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Malformed(message)


def parse(data: bytearray, where: str) -> tuple[dict, bytearray, int]:
    """Check prefix, lengths and checksum, undo the codec; return the header, the decoded body and the payload's start."""

    def fail(message: str) -> ValueError:
        return ValueError(f"task package {where}: {message}")

    smallest = _PREFIX.size + _DIGEST_BYTES
    if len(data) < len(MAGIC):
        raise fail(f"truncated: {len(data)} bytes, a package has at least {smallest}")
    if bytes(data[: len(MAGIC)]) != MAGIC:
        raise fail(f"not a task package (magic {bytes(data[:len(MAGIC)])!r}, expected {MAGIC!r})")
    if len(data) < smallest:
        raise fail(f"truncated: {len(data)} bytes, a package has at least {smallest}")
    _, version, codec, header_bytes, payload_bytes, body_bytes = _PREFIX.unpack_from(data)
    if version not in READABLE_VERSIONS:
        raise fail(f"format version {version}; this version of spa_kernels reads versions "
                   f"{', '.join(map(str, READABLE_VERSIONS))}")
    expected = _PREFIX.size + body_bytes + _DIGEST_BYTES
    if len(data) < expected:
        raise fail(f"truncated: {len(data)} bytes, its prefix announces {expected}")
    if len(data) > expected:
        raise fail(f"{len(data) - expected} unexpected bytes after the checksum ({expected} announced)")
    if hashlib.sha256(memoryview(data)[: expected - _DIGEST_BYTES]).digest() != bytes(data[expected - _DIGEST_BYTES:]):
        raise fail("checksum mismatch: the package is corrupt")
    try:
        decoded = _decode_body(data[_PREFIX.size: expected - _DIGEST_BYTES], codec, header_bytes, payload_bytes)
        header = json.loads(bytes(decoded[:header_bytes]).decode("utf-8"))
        if isinstance(header, dict):
            if version < FIRST_BLOCK_VERSION:
                header.setdefault("block_layers", [])
                header.setdefault("shared", [])
            if version == 2:
                header.setdefault("state", [])
            header["format_version"] = version  # staging reads older packages' SPLoPA layers from "state"
        _check_header(header, payload_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"malformed header: {error}") from None
    except Malformed as error:
        raise fail(f"malformed header: {error}") from None
    except Undecodable as error:
        raise fail(str(error)) from None
    return header, decoded, header_bytes


class Undecodable(Exception):
    """A body its codec cannot turn into the announced header and payload."""


def _decode_body(body: bytearray, codec: int, header_bytes: int, payload_bytes: int) -> bytearray:
    """Header followed by payload, as the codec stored them (the payload starts at ``header_bytes``)."""
    size = header_bytes + payload_bytes
    if header_bytes % _ALIGN:
        raise Undecodable(f"header length {header_bytes} is not a multiple of {_ALIGN}")
    if codec == CODEC_STORED:
        if len(body) != size:
            raise Undecodable(f"stored body of {len(body)} bytes for a {header_bytes}-byte header and "
                               f"a {payload_bytes}-byte payload")
        return body
    if codec != CODEC_DEFLATE:
        raise Undecodable(f"unknown codec {codec} (this version reads {CODEC_STORED} and {CODEC_DEFLATE})")
    inflater = zlib.decompressobj()
    try:
        decoded = bytearray(inflater.decompress(body, size))  # never more than announced
    except zlib.error as error:
        raise Undecodable(f"corrupt deflate stream: {error}") from None
    if len(decoded) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise Undecodable(f"the deflate stream does not hold the announced {size} bytes "
                           f"(header {header_bytes}, payload {payload_bytes})")
    from_byte_planes(decoded, header_bytes)
    return decoded


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_blob(blob: object, what: str, payload_bytes: int) -> None:
    expect(isinstance(blob, dict), f"{what} is not an object")
    expect(blob.get("dtype") in DTYPES or blob.get("dtype") == BITS, f"{what} has unknown dtype {blob.get('dtype')!r}")
    shape = blob.get("shape")
    expect(isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape), f"{what} has a bad shape {shape!r}")
    offset, size = blob.get("offset"), blob.get("bytes")
    expect(_is_int(offset) and _is_int(size) and offset >= 0 and size >= 0, f"{what} has a bad offset or size")
    expect(offset + size <= payload_bytes, f"{what} lies outside the payload")
    if blob["dtype"] == BITS:
        expect(len(shape) == 1 and size == math.ceil(shape[0] / 8), f"{what}: {size} bytes for {shape} bits")
    else:
        wanted = math.prod(shape) * DTYPES[blob["dtype"]].itemsize
        expect(size == wanted, f"{what}: {size} bytes for shape {shape} of {blob['dtype']} ({wanted} expected)")


def _check_tensors(record: dict, what: str, payload_bytes: int) -> None:
    tensors = record.get("tensors")
    expect(isinstance(tensors, dict), f"{what} has no tensors object")
    for key, blob in tensors.items():
        _check_blob(blob, f"{what} tensor {key!r}", payload_bytes)


def _check_header(header: object, payload_bytes: int) -> None:
    """The header's structure (not yet whether it fits a model)."""
    expect(isinstance(header, dict), "not a JSON object")
    expect(header.get("format") == FORMAT_NAME, f"format name {header.get('format')!r}")
    for section in ("layers", "modules", "state", "block_layers", "shared"):
        records = header.get(section)
        expect(isinstance(records, list), f"no {section!r} list")
        for index, record in enumerate(records):
            expect(isinstance(record, dict) and isinstance(record.get("name"), str),
                    f"{section}[{index}] has no name")
            _check_tensors(record, f"{section} entry {record['name']!r}", payload_bytes)
    for record in header["layers"]:
        what = f"layer {record['name']!r}"
        expect(_is_int(record.get("active_in")) and _is_int(record.get("active_out")), f"{what} has no active counts")
        for key in ("in_mask", "out_mask"):
            expect(record["tensors"].get(key, {}).get("dtype") == BITS, f"{what} has no bit-packed {key}")
    for record in header["block_layers"]:
        what = f"block layer {record['name']!r}"
        expect(_is_int(record.get("active_blocks")), f"{what} has no active block count")
        expect(record["tensors"].get("block_mask", {}).get("dtype") == BITS, f"{what} has no bit-packed block_mask")
    for record in header["shared"]:
        what = f"shared entry {record['name']!r}"
        expect(record.get("kind") in SHARED_KINDS, f"{what} has unknown kind {record.get('kind')!r}")
        holders = record.get("layers")
        expect(isinstance(holders, list) and holders and all(isinstance(name, str) for name in holders),
               f"{what} names no layers")
    metadata = header.get("metadata")
    expect(isinstance(metadata, dict), "no 'metadata' object")
    for name, values in metadata.items():
        expect(isinstance(values, dict) and all(_is_int(v) for v in values.values()),
                f"metadata of {name!r} is not a dict of integers")


def decode_tensor(data: bytearray, start: int, blob: dict) -> Tensor:
    """The stored tensor, sharing memory with ``data`` (no copy on a little-endian host)."""
    dtype = DTYPES[blob["dtype"]]
    if blob["bytes"] == 0:
        return torch.empty(blob["shape"], dtype=dtype)
    offset = start + blob["offset"]
    if sys.byteorder == "big" and dtype.itemsize > 1:
        raw = torch.frombuffer(data, dtype=torch.uint8, count=blob["bytes"], offset=offset)
        return raw.reshape(-1, dtype.itemsize).flip(1).contiguous().view(dtype).reshape(blob["shape"])
    count = blob["bytes"] // dtype.itemsize
    return torch.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(blob["shape"])


def decode_bits(data: bytearray, start: int, blob: dict, what: str) -> np.ndarray:
    """A bool mask from its packed bits (numpy: a few microseconds, where torch ops cost more)."""
    count = blob["shape"][0]
    packed = np.frombuffer(data, dtype=np.uint8, count=blob["bytes"], offset=start + blob["offset"])
    bits = np.unpackbits(packed, bitorder="little")
    expect(not bits[count:].any(), f"{what} has padding bits set")
    return bits[:count].astype(bool)
