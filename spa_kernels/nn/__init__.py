"""Drop-in SPA modules: frozen layers with adapters and channel masks.

Parameter names and state-dict keys follow ``sp_adapters`` 0.7.1, so checkpoints
move between the two libraries; the forward pass runs the fused masked kernels.
"""

from ._masks import ChannelMasked
from .linear import SPLoRALinear

__all__ = ["ChannelMasked", "SPLoRALinear"]
