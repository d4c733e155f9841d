"""Find modules whose own code reads a child layer's weight instead of calling the child.

Some models use a layer's parameters directly: as a lookup table
(``self.rel_pos_bias.weight.t()[...]``), in a hand-written kernel call
(``conv1d_fn(x, self.conv1d.weight, ...)``), reshaped into another op
(``F.conv2d(k, self.k_proj.weight[..., None, None])``), or concatenated with another
weight.  An SPA layer put in such a child's place would be skipped: its adapter and
masks would be silently ignored.  ``convert`` leaves such children unchanged.

The check reads the source of the parent's class (every class in its MRO that is
not part of torch or of this package) and looks for ``self.<child>.weight`` or
``self.<child>.bias`` used for anything but its metadata (dtype, device, shape).
It is conservative in the safe direction: a match leaves a layer unconverted, with
a warning; code that reaches a child's weight by other means (``getattr``, a helper
function outside the class) is not seen, which is why the model tests compare
every mode against the unadapted base.
"""

from __future__ import annotations

import functools
import inspect
import re

from torch import nn

# ``self.<child>.weight``/``.bias``, unless only its metadata is read or it is assigned
# to (weight tying, which ``convert`` finds from the shared parameters themselves).
_DIRECT_READ = re.compile(
    r"self\.(?P<child>\w+)\.(?:weight|bias)\b"
    r"(?!\s*\.\s*(?:dtype|device|shape|size\(|ndim|dim\(|numel\(|is_meta|requires_grad)\b)"
    r"(?!\s*=[^=])"
)


def _is_own_or_torch(cls: type) -> bool:
    module_name = cls.__module__ or ""
    return module_name.split(".")[0] in {"torch", "spa_kernels", "builtins"}


@functools.cache
def _direct_reads_of_class(cls: type) -> dict[str, str]:
    reads: dict[str, str] = {}
    for klass in cls.__mro__:
        if _is_own_or_torch(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # defined in a REPL or compiled: nothing to read
            continue
        for line in source.splitlines():
            for match in _DIRECT_READ.finditer(line):
                reads.setdefault(match.group("child"), line.strip())
    return reads


def children_read_directly(module: nn.Module) -> dict[str, str]:
    """Names of ``module``'s children whose weight or bias its class's code reads itself.

    Returns:
        child name -> the first source line that reads it.
    """
    reads = _direct_reads_of_class(type(module))
    children = dict(module.named_children())
    return {name: line for name, line in reads.items() if name in children}
