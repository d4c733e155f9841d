"""Pruning on the kernels: the masks that make channels free.

A user converts a model (:func:`spa_kernels.convert`), scores its channels with a
criterion, prunes coupled channel groups to a target with a schedule, and saves a
per-task package that switches a shared frozen base model to that task::

    model = spa_kernels.convert(base, rank=8)
    groups = channel_groups(model, example_inputs)
    iterative_prune(model, TaylorCriterion(), feed, density=0.3, steps=3, groups=groups,
                    fine_tune=fine_tune)
    save_task(model, "task.spa", task_specific=["head"])
    ...
    load_task(shared_model, "task.spa")   # a few kilobytes; the base is never copied

Modules: ``criteria`` (channel importance), ``groups`` (channels tied by residual
additions, concatenation and norms, found with torch-pruning), ``schedule`` (one-shot
and iterative pruning), ``accounting`` (stored parameters and active FLOPs),
``package`` (task packages), ``adaptive`` (adaptive activation-based pruning) and
``layerwise`` (layer-wise truncation of adapted models, SLS); ``block_pruning``
(block scores, schedules and accounting of block-SPA layers).
"""

from .accounting import (
    active_flops,
    active_macs,
    active_macs_by_layer,
    layer_stored_parameters,
    stored_parameters,
    stored_parameters_by_layer,
)
from .adaptive import AdaptivePolicy, AdaptiveResult, ThresholdSearch, adaptive_prune
from .block_pruning import (
    BlockMovement,
    iterative_block_prune,
    prune_blocks,
    splopa_active_flops,
    splopa_stored_parameters,
)
from .criteria import ActivationCriterion, Criterion, GradientCriterion, MagnitudeCriterion, TaylorCriterion
from .groups import (
    AttentionGroup,
    ChannelGroup,
    ChannelMap,
    channel_groups,
    install_norm_masks,
    remove_norm_masks,
)
from .heads import attention_blocks, skip_pruned_heads
from .layerwise import TruncatedBlocks, block_scores, choose_depth, truncate
from .package import load_task, save_task, task_size
from .schedule import PruneReport, iterative_prune, prune, round_densities
from .thresholds import layer_thresholds

__all__ = [
    "ActivationCriterion",
    "AttentionGroup",
    "BlockMovement",
    "AdaptivePolicy",
    "AdaptiveResult",
    "ChannelGroup",
    "ChannelMap",
    "Criterion",
    "GradientCriterion",
    "MagnitudeCriterion",
    "PruneReport",
    "TaylorCriterion",
    "ThresholdSearch",
    "TruncatedBlocks",
    "active_flops",
    "active_macs",
    "active_macs_by_layer",
    "adaptive_prune",
    "attention_blocks",
    "block_scores",
    "channel_groups",
    "choose_depth",
    "install_norm_masks",
    "iterative_block_prune",
    "iterative_prune",
    "layer_stored_parameters",
    "prune_blocks",
    "splopa_active_flops",
    "splopa_stored_parameters",
    "layer_thresholds",
    "load_task",
    "prune",
    "remove_norm_masks",
    "round_densities",
    "save_task",
    "skip_pruned_heads",
    "stored_parameters",
    "stored_parameters_by_layer",
    "task_size",
    "truncate",
]
