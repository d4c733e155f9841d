"""Per-task packages: the few bytes that switch a shared frozen base model to one task.

A converted and pruned model is a frozen base (the ``weight`` of every SPA layer,
shared by all tasks) plus, per task, its channel masks, the adapter and bias entries
of the active channels, and whatever modules the task owns outright (a classifier
head, fine-tuned batch norms).  :func:`save_task` writes the per-task part,
:func:`load_task` applies it to a model holding the same base, and :func:`task_size`
says how many bytes it takes.

What a package stores
---------------------

* For every SPA layer (:func:`spa_kernels.pruning._layers.spa_layers`) outside the
  task-specific modules: its masks, bit-packed; the adapter entries of the active
  channels ``S`` (inputs) and ``O`` (outputs) only: SPLoRA ``A[:, S]``
  (``adapter.rows[0]``) and ``B[O]`` (``adapter.cols[0]``), SPPaRA ``P[O][:, S]``;
  and ``b[O]`` if the layer has a bias.  That is ``r·(|O| + |S|) + |O|`` values per
  SPLoRA layer (DESIGN.md §1).  The frozen weight is never stored.  For a grouped
  convolution (``groups > 1``) the adapter's columns are not input channels, so its
  columns are stored in full (rows are still restricted to ``O``).
* For every task-specific module: its full state dict (parameters and persistent
  buffers), whatever the module is, SPA layers included.
* For every module defining ``task_metadata(self) -> dict[str, int]``: that dict,
  keyed by the module's name; :func:`load_task` hands it to the module's
  ``load_task_metadata(metadata)`` and returns all of them.

Loading sets the masks with ``set_masks``, writes the stored entries and zeroes the
inactive adapter and bias entries, so a package loaded after another leaves no trace
of the first.  Everything is parsed, checked against the model and staged on the
parameters' device and dtype before the first write: a bad package raises
``ValueError`` and leaves the model unchanged.  (``load_task_metadata`` is user code
that cannot be checked in advance; it runs before the tensor writes, so that if it
raises, no tensor has been written.)

Format (version 2)
------------------

All integers little-endian.  Nothing in a package is executed on load: the header
is JSON and the tensors are raw bytes.

=========  =====================================================================
bytes      content
=========  =====================================================================
8          magic ``b"SPATASK\\0"``
4          format version, uint32 (2)
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
     "metadata": {"truncate": {"depth": 3}}}

    BLOB = {"dtype": "float32", "shape": [8, 19], "offset": 1024, "bytes": 608}

``offset`` counts from the payload's start.  Masks have dtype ``"bits"``: ``shape``
is the channel count ``n`` and the ``ceil(n / 8)`` bytes hold channel ``8j + b`` in
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
import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor, nn

from ..nn import ChannelMasked
from ._layers import spa_layers

MAGIC = b"SPATASK\x00"
FORMAT_VERSION = 2
FORMAT_NAME = "spa_kernels task package"
CODEC_STORED = 0
CODEC_DEFLATE = 1

_PREFIX = struct.Struct("<8sIIQQQ")  # magic, version, codec, header, payload and body lengths
_PLANE_WORD = 4  # bytes per word whose byte planes codec 1 deflates: float32's size
_DEFLATE_LEVEL = 9  # packages are small: the best ratio costs a few milliseconds
_DIGEST_BYTES = hashlib.sha256().digest_size
_ALIGN = 16
_BITS = "bits"
_SHIFTS = torch.arange(8, dtype=torch.uint8)

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}

PathOrFile = str | os.PathLike | BinaryIO


# --------------------------------------------------------------------------- public API


def save_task(model: nn.Module, path: PathOrFile, task_specific=(), *, compress: bool = True) -> int:
    """Write the task package of ``model`` to ``path``; return the number of bytes written.

    Args:
        model: a converted (and usually pruned) model.
        path: a file path (written atomically: a reader never sees half a package)
            or a binary file object open for writing.
        task_specific: modules the task owns outright, stored as full state dicts:
            qualified names or the modules themselves (one of either, or a
            sequence).  SPA layers inside them are stored in full, not as adapters.
        compress: deflate the header and the payload's byte planes (codec 1, lossless:
            loading gives back the same bits); ``False`` stores them as they are (codec 0).

    Raises:
        TypeError: ``model`` is not a module, ``task_specific`` holds something other
            than names and modules, or a ``task_metadata`` is not a ``dict[str, int]``.
        ValueError: a ``task_specific`` entry is not part of ``model``, or two
            entries nest.
    """
    data = _encode(model, task_specific, compress)
    if hasattr(path, "write"):
        path.write(data)
        return len(data)
    path = _check_path(path, "path")
    temporary = f"{os.fspath(path)}.tmp"
    try:
        with open(temporary, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return len(data)


def load_task(model: nn.Module, path: PathOrFile) -> dict[str, dict[str, int]]:
    """Switch ``model`` to the task of the package at ``path``; return the metadata it holds.

    Args:
        model: a model with the same architecture (names, kinds, shapes, ranks) as
            the one the package was saved from, on any device and in any dtype.
        path: a file path or a binary file object open for reading.

    Returns:
        ``{module name: metadata}`` for every module that defines ``task_metadata``
        (after each module's ``load_task_metadata`` has been called).

    Raises:
        ValueError: the package is truncated, corrupt (checksum), not a package
            (magic), of another format version, malformed, or does not fit
            ``model``.  The model is unchanged then.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    where = _describe_source(path)
    header, data, payload_start = _parse(_read(path), where)
    plan = _stage(model, header, data, payload_start, where)
    with torch.no_grad():
        for name, metadata in plan.metadata.items():
            model.get_submodule(name).load_task_metadata(dict(metadata))
        for layer in plan.layers:
            layer.apply()
        for module, state in plan.modules:
            module.load_state_dict(state, strict=True)
    return {name: dict(metadata) for name, metadata in plan.metadata.items()}


def task_size(path_or_model: PathOrFile | nn.Module, task_specific=(), *, compress: bool = True) -> int:
    """Bytes of a task package: the size of the file at a path, or what ``save_task`` would write for a model."""
    if isinstance(path_or_model, nn.Module):
        return len(_encode(path_or_model, task_specific, compress))
    if task_specific:
        raise ValueError("task_specific applies to a model, not to a saved package")
    return os.path.getsize(_check_path(path_or_model, "path_or_model"))


# --------------------------------------------------------------------------- what a model holds


def _layer_description(name: str, layer: ChannelMasked) -> dict:
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


def _selects_columns(description: dict) -> bool:
    """Whether the adapter's columns are the layer's input channels (not so in grouped convolutions)."""
    return description["groups"] == 1


def _resolve_task_specific(model: nn.Module, task_specific) -> list[str]:
    if isinstance(task_specific, (str, nn.Module)):
        task_specific = (task_specific,)
    try:
        entries = list(task_specific)
    except TypeError:
        raise TypeError("task_specific must be a module name, a module, or a sequence of them, "
                        f"got {type(task_specific).__name__}") from None
    names_of = {id(module): name for name, module in model.named_modules()}
    names: list[str] = []
    for entry in entries:
        if isinstance(entry, str):
            try:
                model.get_submodule(entry)
            except AttributeError:
                raise ValueError(f"task_specific: the model has no module named {entry!r}") from None
            name = entry
        elif isinstance(entry, nn.Module):
            if id(entry) not in names_of:
                raise ValueError(f"task_specific: a {type(entry).__name__} that is not part of the model")
            name = names_of[id(entry)]
        else:
            raise TypeError(f"task_specific entries must be module names or modules, got {type(entry).__name__}")
        if name not in names:
            names.append(name)
    for outer in names:
        for inner in names:
            if inner != outer and _inside(inner, outer):
                raise ValueError(f"task_specific: {inner!r} lies inside {outer!r}; name one of them")
    return names


def _inside(name: str, outer: str) -> bool:
    return outer == "" or name == outer or name.startswith(outer + ".")


def _metadata_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if callable(getattr(module, "task_metadata", None))}


def _check_metadata(metadata: object, owner: str) -> dict[str, int]:
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
        if tensor.dtype not in _DTYPE_NAMES:
            raise TypeError(f"cannot store a tensor of dtype {tensor.dtype} in a task package")
        data = _le_bytes(tensor)
        return {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                "offset": self._append(data), "bytes": len(data)}

    def bits(self, mask: Tensor) -> dict:
        data = _pack_bits(mask)
        return {"dtype": _BITS, "shape": [mask.numel()], "offset": self._append(data), "bytes": len(data)}


def _layer_record(name: str, layer: ChannelMasked, writer: _PayloadWriter) -> dict:
    record = _layer_description(name, layer)
    in_mask, out_mask = layer.in_mask.detach().cpu(), layer.out_mask.detach().cpu()
    in_idx, out_idx = in_mask.nonzero().flatten(), out_mask.nonzero().flatten()
    record["active_in"], record["active_out"] = in_idx.numel(), out_idx.numel()
    tensors = {"in_mask": writer.bits(in_mask), "out_mask": writer.bits(out_mask)}
    columns = _selects_columns(record)
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


def _encode(model: nn.Module, task_specific, compress: bool) -> bytes:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    owned = _resolve_task_specific(model, task_specific)
    writer = _PayloadWriter()
    layers = [
        _layer_record(name, layer, writer)
        for name, layer in spa_layers(model).items()
        if not any(_inside(name, outer) for outer in owned)
    ]
    modules = []
    for name in owned:
        module = model.get_submodule(name)
        state = module.state_dict()
        modules.append({"name": name, "kind": type(module).__name__,
                        "tensors": {key: writer.tensor(value) for key, value in state.items()}})
    metadata = {name: _check_metadata(module.task_metadata(), name) for name, module in _metadata_modules(model).items()}
    header = json.dumps(
        {"format": FORMAT_NAME, "layers": layers, "modules": modules, "metadata": metadata},
        separators=(",", ":"), allow_nan=False,
    ).encode("utf-8")
    header += b" " * ((-len(header)) % _ALIGN)
    payload = b"".join(writer.chunks)
    if compress:
        codec, body = CODEC_DEFLATE, zlib.compress(header + _byte_planes(payload), _DEFLATE_LEVEL)
    else:
        codec, body = CODEC_STORED, header + payload
    prefixed = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec, len(header), len(payload), len(body)) + body
    return prefixed + hashlib.sha256(prefixed).digest()


def _byte_planes(payload: bytes) -> bytes:
    """Codec 1's layout of the payload: its 4-byte words as byte planes, then the tail bytes."""
    whole = len(payload) - len(payload) % _PLANE_WORD
    words = np.frombuffer(payload, dtype=np.uint8, count=whole).reshape(-1, _PLANE_WORD)
    return words.T.tobytes() + payload[whole:]


def _from_byte_planes(planes: bytearray, start: int) -> None:
    """Undoes :func:`_byte_planes` in place on ``planes[start:]``."""
    whole = (len(planes) - start) - (len(planes) - start) % _PLANE_WORD
    view = np.frombuffer(planes, dtype=np.uint8, count=whole, offset=start)
    view[:] = view.reshape(_PLANE_WORD, -1).T.reshape(-1)  # the right side is a copy, so this is safe


# --------------------------------------------------------------------------- reading and parsing


def _check_path(path: object, argument: str) -> str | os.PathLike:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{argument} must be a path or a binary file object, got {type(path).__name__}")
    return path


def _describe_source(path: PathOrFile) -> str:
    if hasattr(path, "read"):
        return repr(getattr(path, "name", "<stream>"))
    return repr(os.fspath(_check_path(path, "path")))


def _read(path: PathOrFile) -> bytearray:
    if hasattr(path, "read"):
        return bytearray(path.read())
    with open(path, "rb") as file:
        return bytearray(file.read())


class _Malformed(Exception):
    """A header that does not follow the format; turned into a ValueError naming the package."""


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise _Malformed(message)


def _parse(data: bytearray, where: str) -> tuple[dict, bytearray, int]:
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
    if version != FORMAT_VERSION:
        raise fail(f"format version {version}; this version of spa_kernels reads version {FORMAT_VERSION}")
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
        _check_header(header, payload_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise fail(f"malformed header: {error}") from None
    except _Malformed as error:
        raise fail(f"malformed header: {error}") from None
    except _Undecodable as error:
        raise fail(str(error)) from None
    return header, decoded, header_bytes


class _Undecodable(Exception):
    """A body its codec cannot turn into the announced header and payload."""


def _decode_body(body: bytearray, codec: int, header_bytes: int, payload_bytes: int) -> bytearray:
    """Header followed by payload, as the codec stored them (the payload starts at ``header_bytes``)."""
    size = header_bytes + payload_bytes
    if header_bytes % _ALIGN:
        raise _Undecodable(f"header length {header_bytes} is not a multiple of {_ALIGN}")
    if codec == CODEC_STORED:
        if len(body) != size:
            raise _Undecodable(f"stored body of {len(body)} bytes for a {header_bytes}-byte header and "
                               f"a {payload_bytes}-byte payload")
        return body
    if codec != CODEC_DEFLATE:
        raise _Undecodable(f"unknown codec {codec} (this version reads {CODEC_STORED} and {CODEC_DEFLATE})")
    inflater = zlib.decompressobj()
    try:
        decoded = bytearray(inflater.decompress(body, size))  # never more than announced
    except zlib.error as error:
        raise _Undecodable(f"corrupt deflate stream: {error}") from None
    if len(decoded) != size or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise _Undecodable(f"the deflate stream does not hold the announced {size} bytes "
                           f"(header {header_bytes}, payload {payload_bytes})")
    _from_byte_planes(decoded, header_bytes)
    return decoded


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_blob(blob: object, what: str, payload_bytes: int) -> None:
    _expect(isinstance(blob, dict), f"{what} is not an object")
    _expect(blob.get("dtype") in _DTYPES or blob.get("dtype") == _BITS, f"{what} has unknown dtype {blob.get('dtype')!r}")
    shape = blob.get("shape")
    _expect(isinstance(shape, list) and all(_is_int(s) and s >= 0 for s in shape), f"{what} has a bad shape {shape!r}")
    offset, size = blob.get("offset"), blob.get("bytes")
    _expect(_is_int(offset) and _is_int(size) and offset >= 0 and size >= 0, f"{what} has a bad offset or size")
    _expect(offset + size <= payload_bytes, f"{what} lies outside the payload")
    if blob["dtype"] == _BITS:
        _expect(len(shape) == 1 and size == math.ceil(shape[0] / 8), f"{what}: {size} bytes for {shape} bits")
    else:
        wanted = math.prod(shape) * _DTYPES[blob["dtype"]].itemsize
        _expect(size == wanted, f"{what}: {size} bytes for shape {shape} of {blob['dtype']} ({wanted} expected)")


def _check_tensors(record: dict, what: str, payload_bytes: int) -> None:
    tensors = record.get("tensors")
    _expect(isinstance(tensors, dict), f"{what} has no tensors object")
    for key, blob in tensors.items():
        _check_blob(blob, f"{what} tensor {key!r}", payload_bytes)


def _check_header(header: object, payload_bytes: int) -> None:
    """The header's structure (not yet whether it fits a model)."""
    _expect(isinstance(header, dict), "not a JSON object")
    _expect(header.get("format") == FORMAT_NAME, f"format name {header.get('format')!r}")
    for section in ("layers", "modules"):
        records = header.get(section)
        _expect(isinstance(records, list), f"no {section!r} list")
        for index, record in enumerate(records):
            _expect(isinstance(record, dict) and isinstance(record.get("name"), str),
                    f"{section}[{index}] has no name")
            _check_tensors(record, f"{section} entry {record['name']!r}", payload_bytes)
    for record in header["layers"]:
        what = f"layer {record['name']!r}"
        _expect(_is_int(record.get("active_in")) and _is_int(record.get("active_out")), f"{what} has no active counts")
        for key in ("in_mask", "out_mask"):
            _expect(record["tensors"].get(key, {}).get("dtype") == _BITS, f"{what} has no bit-packed {key}")
    metadata = header.get("metadata")
    _expect(isinstance(metadata, dict), "no 'metadata' object")
    for name, values in metadata.items():
        _expect(isinstance(values, dict) and all(_is_int(v) for v in values.values()),
                f"metadata of {name!r} is not a dict of integers")


def _decode_tensor(data: bytearray, start: int, blob: dict) -> Tensor:
    """The stored tensor, sharing memory with ``data`` (no copy on a little-endian host)."""
    dtype = _DTYPES[blob["dtype"]]
    if blob["bytes"] == 0:
        return torch.empty(blob["shape"], dtype=dtype)
    offset = start + blob["offset"]
    if sys.byteorder == "big" and dtype.itemsize > 1:
        raw = torch.frombuffer(data, dtype=torch.uint8, count=blob["bytes"], offset=offset)
        return raw.reshape(-1, dtype.itemsize).flip(1).contiguous().view(dtype).reshape(blob["shape"])
    count = blob["bytes"] // dtype.itemsize
    return torch.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(blob["shape"])


def _decode_bits(data: bytearray, start: int, blob: dict, what: str) -> np.ndarray:
    """A bool mask from its packed bits (numpy: a few microseconds, where torch ops cost more)."""
    count = blob["shape"][0]
    packed = np.frombuffer(data, dtype=np.uint8, count=blob["bytes"], offset=start + blob["offset"])
    bits = np.unpackbits(packed, bitorder="little")
    _expect(not bits[count:].any(), f"{what} has padding bits set")
    return bits[:count].astype(bool)


# --------------------------------------------------------------------------- staging against a model


@dataclass
class _Write:
    """``target`` becomes zero except at ``rows`` × ``columns`` (``None``: all), which take ``value``."""

    target: Tensor
    value: Tensor  # on the target's device, in its dtype
    rows: Tensor | None
    columns: Tensor | None

    def apply(self) -> None:
        if self.rows is None and self.columns is None:
            self.target.copy_(self.value)
            return
        self.target.zero_()
        if self.rows is None:
            self.target.index_copy_(1, self.columns, self.value)
        elif self.columns is None:
            self.target.index_copy_(0, self.rows, self.value)
        else:
            self.target[self.rows.unsqueeze(1), self.columns] = self.value


@dataclass
class _StagedLayer:
    """Masks and stored entries of one SPA layer, checked and ready to be written."""

    layer: ChannelMasked
    in_mask: Tensor
    out_mask: Tensor
    writes: list[_Write]

    def apply(self) -> None:
        self.layer.set_masks(self.in_mask, self.out_mask)
        for write in self.writes:
            write.apply()


@dataclass
class _Plan:
    layers: list[_StagedLayer]
    modules: list[tuple[nn.Module, dict[str, Tensor]]]
    metadata: dict[str, dict[str, int]]


def _stage(model: nn.Module, header: dict, data: bytearray, start: int, where: str) -> _Plan:
    try:
        return _stage_checked(model, header, data, start)
    except _Malformed as error:
        raise ValueError(f"task package {where} does not fit the model: {error}") from None


def _check_names(kind: str, in_package: list[str], in_model: list[str]) -> None:
    missing = [name for name in in_package if name not in in_model]
    extra = [name for name in in_model if name not in in_package]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"the model lacks {missing[:4]}" + (" …" if len(missing) > 4 else ""))
        if extra:
            parts.append(f"the package lacks {extra[:4]}" + (" …" if len(extra) > 4 else ""))
        raise _Malformed(f"its {kind} differ from the model's ({'; '.join(parts)}): another architecture?")


def _stage_checked(model: nn.Module, header: dict, data: bytearray, start: int) -> _Plan:
    owned = [record["name"] for record in header["modules"]]
    owned_modules = {}
    for name in owned:
        try:
            owned_modules[name] = model.get_submodule(name)
        except AttributeError:
            raise _Malformed(f"the model has no module {name!r}, which the package holds as task-specific") from None
    model_layers = {
        name: layer for name, layer in spa_layers(model).items() if not any(_inside(name, outer) for outer in owned)
    }
    _check_names("SPA layers", [record["name"] for record in header["layers"]], list(model_layers))
    model_metadata = _metadata_modules(model)
    _check_names("modules with task metadata", list(header["metadata"]), list(model_metadata))
    for name in header["metadata"]:
        _expect(callable(getattr(model_metadata[name], "load_task_metadata", None)),
                f"module {name!r} defines task_metadata but not load_task_metadata")
    layers = [_stage_layer(model_layers[record["name"]], record, data, start) for record in header["layers"]]
    modules = [_stage_module(owned_modules[record["name"]], record, data, start) for record in header["modules"]]
    return _Plan(layers, modules, header["metadata"])


def _stage_layer(layer: ChannelMasked, record: dict, data: bytearray, start: int) -> _StagedLayer:
    name = record["name"]
    description = _layer_description(name, layer)
    for key, value in description.items():
        _expect(record.get(key) == value,
                f"layer {name!r}: {key} is {record.get(key)!r} in the package, {value!r} in the model")
    tensors = record["tensors"]
    in_mask = _decode_bits(data, start, tensors["in_mask"], f"layer {name!r} in_mask")
    out_mask = _decode_bits(data, start, tensors["out_mask"], f"layer {name!r} out_mask")
    _expect(in_mask.size == description["in"] and out_mask.size == description["out"],
            f"layer {name!r}: mask lengths {in_mask.size}, {out_mask.size} for "
            f"{description['in']} inputs, {description['out']} outputs")
    in_idx, out_idx = np.flatnonzero(in_mask), np.flatnonzero(out_mask)
    _expect(record["active_in"] == in_idx.size and record["active_out"] == out_idx.size,
            f"layer {name!r}: active counts disagree with its masks")

    device = layer.weight.device
    on_device: dict[str, Tensor] = {}

    def index(which: str, positions: np.ndarray) -> Tensor:
        if which not in on_device:
            on_device[which] = torch.from_numpy(positions).to(device)
        return on_device[which]

    # key -> (target, expected stored shape, rows, columns) with rows/columns as ("in"|"out", indices) or None
    columns = _selects_columns(description)
    plan: dict[str, tuple[Tensor, tuple[int, ...], tuple | None, tuple | None]] = {}
    if description["adapter"] == "low-rank":
        rows, cols = layer.adapter.rows[0], layer.adapter.cols[0]  # A (r × in), B (out × r)
        plan["adapter.rows"] = (rows, (rows.shape[0], in_idx.size if columns else rows.shape[1]),
                                None, ("in", in_idx) if columns else None)
        plan["adapter.cols"] = (cols, (out_idx.size, cols.shape[1]), ("out", out_idx), None)
    elif description["adapter"] == "full":
        adapter = layer.adapter
        plan["adapter"] = (adapter, (out_idx.size, in_idx.size if columns else adapter.shape[1]),
                           ("out", out_idx), ("in", in_idx) if columns else None)
    if layer.bias is not None:
        plan["bias"] = (layer.bias, (out_idx.size,), ("out", out_idx), None)
    wanted = set(plan) | {"in_mask", "out_mask"}
    _expect(set(tensors) == wanted, f"layer {name!r} holds tensors {sorted(tensors)}, expected {sorted(wanted)}")

    writes = []
    for key, (target, shape, rows_at, columns_at) in plan.items():
        blob = tensors[key]
        _expect(tuple(blob["shape"]) == shape, f"layer {name!r} {key}: shape {blob['shape']} in the package, "
                                               f"{list(shape)} expected from its masks and the model")
        _expect(blob["dtype"] in _DTYPES and _DTYPES[blob["dtype"]].is_floating_point,
                f"layer {name!r} {key}: dtype {blob['dtype']} is not a float dtype")
        value = _decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)
        writes.append(_Write(target, value,
                             None if rows_at is None else index(*rows_at),
                             None if columns_at is None else index(*columns_at)))
    return _StagedLayer(layer, torch.from_numpy(in_mask), torch.from_numpy(out_mask), writes)


def _stage_module(module: nn.Module, record: dict, data: bytearray, start: int) -> tuple[nn.Module, dict[str, Tensor]]:
    name = record["name"]
    _expect(record.get("kind") == type(module).__name__,
            f"task-specific module {name!r} is a {record.get('kind')} in the package, "
            f"a {type(module).__name__} in the model")
    current = module.state_dict()
    tensors = record["tensors"]
    _check_names(f"state-dict keys of {name!r}", list(tensors), list(current))
    state = {}
    for key, blob in tensors.items():
        target = current[key]
        _expect(blob["dtype"] in _DTYPES, f"{name!r} {key}: dtype {blob['dtype']} is not a tensor dtype")
        dtype = _DTYPES[blob["dtype"]]
        _expect(tuple(blob["shape"]) == tuple(target.shape),
                f"{name!r} {key}: shape {blob['shape']} in the package, {list(target.shape)} in the model")
        _expect(dtype == target.dtype or (dtype.is_floating_point and target.dtype.is_floating_point),
                f"{name!r} {key}: dtype {blob['dtype']} in the package, {target.dtype} in the model")
        state[key] = _decode_tensor(data, start, blob).to(device=target.device, dtype=target.dtype)
    return module, state


__all__ = ["CODEC_DEFLATE", "CODEC_STORED", "FORMAT_VERSION", "MAGIC", "load_task", "save_task", "task_size"]
