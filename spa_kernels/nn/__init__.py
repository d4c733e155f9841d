"""Drop-in SPA modules: frozen layers with adapters and channel masks.

Parameter names and state-dict keys follow ``sp_adapters`` 0.7.1, so checkpoints
move between the two libraries; the forward pass runs the fused masked kernels.
"""

from .attention import SPLoRAMultiheadAttention
from .channel_masked import ChannelMasked
from .linear import SPLoRALinear
from .pruned_heads import PrunedHeadsAttention
from .splopa import BlockPrototypes, SPLoPALinear, SPLoPASharing
from .splora_conv import SPLoRAConv1d, SPLoRAConv2d, SPLoRAConv3d
from .sppara_conv import SPPaRAConv1d, SPPaRAConv2d, SPPaRAConv3d
from .transformer import ComposedTransformerEncoder, ComposedTransformerEncoderLayer, use_composed_forward

__all__ = [
    "BlockPrototypes",
    "ChannelMasked",
    "ComposedTransformerEncoder",
    "ComposedTransformerEncoderLayer",
    "PrunedHeadsAttention",
    "SPLoPALinear",
    "SPLoPASharing",
    "SPLoRAConv1d",
    "SPLoRAConv2d",
    "SPLoRAConv3d",
    "SPLoRALinear",
    "SPLoRAMultiheadAttention",
    "SPPaRAConv1d",
    "SPPaRAConv2d",
    "SPPaRAConv3d",
    "use_composed_forward",
]
