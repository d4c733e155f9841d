"""Pruning on the kernels: the masks that make channels free.

A user converts a model (:func:`spa_kernels.convert`), scores its channels with a
criterion, prunes coupled channel groups to a target with a schedule, and saves a
per-task package that switches a shared frozen base model to that task.
"""
