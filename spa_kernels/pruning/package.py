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
  SPLoRA layer (docs/design.md §1).  The frozen weight is never stored.  For a grouped
  convolution (``groups > 1``) the adapter's columns are not input channels, so its
  columns are stored in full (rows are still restricted to ``O``).
* For every SPLoPA layer (block-SPA, :mod:`.package_blocks`) outside the task-specific
  modules: its block mask, bit-packed; the position weights of the active blocks
  (K per block); its bias.  The prototypes, shared by the layers of one converted
  model, are stored once per shared set (and so are position weights that several
  layers share), and loading writes them once for every sharer.
* For every task-specific module: its full state dict (parameters and persistent
  buffers), whatever the module is, SPA layers included.
* By default (``trained_state=True``), every other tensor the task trains, outside the
  SPA layers and the task-specific modules (:mod:`.package_state`): each parameter that
  requires grad (norm affines, an excluded head, tokens left trainable) and the
  persistent buffers of its module and of every norm layer (batch-norm running
  statistics).  A trainable tensor that would still be left out (an SPA layer's
  ``weight`` being fine-tuned) is named in a warning.
* For every module defining ``task_metadata(self) -> dict[str, int]``: that dict,
  keyed by the module's name; :func:`load_task` hands it to the module's
  ``load_task_metadata(metadata)`` and returns all of them.

Loading sets the masks with ``set_masks``, writes the stored entries and zeroes the
inactive adapter and bias entries (a SPLoPA layer's inactive position weights), so a package loaded after another leaves no trace
of the first.  Everything is parsed, checked against the model and staged on the
parameters' device and dtype before the first write: a bad package raises
``ValueError`` and leaves the model unchanged.  (``load_task_metadata`` is user code
that cannot be checked in advance; it runs before the tensor writes, so that if it
raises, no tensor has been written.)

The byte format is documented, written and read in :mod:`.package_format`; the
checks against a model before loading are in :mod:`.package_staging`.
"""

from __future__ import annotations

import os
from typing import BinaryIO

import torch
from torch import nn

from .package_format import CODEC_DEFLATE, CODEC_STORED, FORMAT_VERSION, MAGIC, encode, inside, parse
from .package_staging import stage
from .package_state import trained_state_names, warn_about_left_out

PathOrFile = str | os.PathLike | BinaryIO


# --------------------------------------------------------------------------- public API


def save_task(model: nn.Module, path: PathOrFile, task_specific=(), *, compress: bool = True,
              trained_state: bool = True) -> int:
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
        trained_state: also store every parameter outside the SPA layers that requires
            grad, and the buffers of its module and of norm layers, so that
            :func:`load_task` reproduces the model exactly; ``False`` stores only the
            SPA layers' entries and the task-specific modules.

    Warns:
        UserWarning: naming every trainable tensor the package leaves out.

    Raises:
        TypeError: ``model`` is not a module, ``task_specific`` holds something other
            than names and modules, or a ``task_metadata`` is not a ``dict[str, int]``.
        ValueError: a ``task_specific`` entry is not part of ``model``, or two
            entries nest.
    """
    data = _encode_model(model, task_specific, compress, trained_state, warn=True)
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
    header, data, payload_start = parse(_read(path), where)
    plan = stage(model, header, data, payload_start, where)
    with torch.no_grad():
        for name, metadata in plan.metadata.items():
            model.get_submodule(name).load_task_metadata(dict(metadata))
        for layer in plan.layers:
            layer.apply()
        for block_layer in plan.blocks:
            block_layer.apply()
        for write in plan.shared:
            write.apply()
        for module, state in plan.modules:
            module.load_state_dict(state, strict=True)
        for target, value in plan.state:
            target.copy_(value)
        # Masks written in place above (an attention module's head mask, a SPLoPA block mask
        # in an older package's state) rebuild what their modules keep so that forward never
        # reads a mask on the host.
        for module in model.modules():
            refresh = getattr(module, "refresh_indices", None)
            if callable(refresh):
                refresh()
    return {name: dict(metadata) for name, metadata in plan.metadata.items()}


def task_size(path_or_model: PathOrFile | nn.Module, task_specific=(), *, compress: bool = True,
              trained_state: bool = True) -> int:
    """Bytes of a task package: the size of the file at a path, or what ``save_task`` would write for a model."""
    if isinstance(path_or_model, nn.Module):
        return len(_encode_model(path_or_model, task_specific, compress, trained_state))
    if task_specific:
        raise ValueError("task_specific applies to a model, not to a saved package")
    return os.path.getsize(_check_path(path_or_model, "path_or_model"))


# --------------------------------------------------------------------------- arguments


def _encode_model(model: nn.Module, task_specific, compress: bool, trained_state: bool, warn: bool = False) -> bytes:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    owned = _resolve_task_specific(model, task_specific)
    state = trained_state_names(model, owned) if trained_state else []
    if warn:
        warn_about_left_out(model, owned, state)
    return encode(model, owned, compress, state)


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
            if inner != outer and inside(inner, outer):
                raise ValueError(f"task_specific: {inner!r} lies inside {outer!r}; name one of them")
    return names


# --------------------------------------------------------------------------- files


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


__all__ = ["CODEC_DEFLATE", "CODEC_STORED", "FORMAT_VERSION", "MAGIC", "load_task", "save_task", "task_size"]
