"""Modules that ``convert`` must leave as they are: resolving ``exclude=`` and setting them aside."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterable, Iterator

from torch import nn

from .freeze import inside_any


def excluded_names(model: nn.Module, exclude: object) -> list[str]:
    """Qualified names of the outermost modules of ``model`` that ``exclude`` selects.

    ``exclude`` holds module names, ``fnmatch`` patterns of them, and module types (one
    of either, or an iterable of them).  A name or pattern that selects nothing raises
    ``ValueError``, since a misspelt head name would otherwise be converted silently.
    """
    if isinstance(exclude, (str, type)):
        exclude = (exclude,)
    try:
        entries = list(exclude)
    except TypeError:
        raise TypeError("exclude must be a module name, a module type, or an iterable of them, "
                        f"got {type(exclude).__name__}") from None
    names = [entry for entry in entries if isinstance(entry, str)]
    types = tuple(entry for entry in entries if isinstance(entry, type) and issubclass(entry, nn.Module))
    for entry in entries:
        if not isinstance(entry, str) and not (isinstance(entry, type) and issubclass(entry, nn.Module)):
            raise TypeError(f"exclude entries must be module names or nn.Module types, got {entry!r}")
    modules = dict(model.named_modules())
    for pattern in names:
        if pattern not in modules and not any(fnmatch.fnmatchcase(name, pattern) for name in modules):
            raise ValueError(f"exclude: the model has no module named {pattern!r}")
    selected: list[str] = []
    for name, module in modules.items():
        if inside_any(name, selected):
            continue
        if (types and isinstance(module, types)) or name in names or any(
            fnmatch.fnmatchcase(name, pattern) for pattern in names
        ):
            selected.append(name)
    return selected


class _SetAside(nn.Module):
    """Stands in for an excluded module while the model is converted (nothing converts it)."""


@contextlib.contextmanager
def set_aside(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Within the block, the named submodules of ``model`` are placeholders; restored on exit."""
    removed: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name in names:
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            removed.append((parent, child_name, getattr(parent, child_name)))
            setattr(parent, child_name, _SetAside())
        yield
    finally:
        for parent, child_name, module in reversed(removed):
            setattr(parent, child_name, module)


__all__ = ["excluded_names", "set_aside"]
