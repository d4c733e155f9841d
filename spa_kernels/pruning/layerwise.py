"""Layer-wise pruning of an adapted model: drop the deepest blocks (SLS, arXiv 2407.14330).

A model adapted to a new task with a frozen base often does not need all of the
base's depth: the task's classes may already be as well separated after some
block as after the last one.  SLS (Straightforward Layer-wise pruning) measures
that separation per block from the features alone, with no training:

1. :func:`block_features`: run the model on the task's training data and
   capture each block's output, reduced to one vector per sample (global average
   pooling over positions by default).
2. :func:`embedding_silhouette`: embed the vectors of all samples in 2-D (t-SNE,
   as in the paper, or PCA, much cheaper) and score the embedding by its
   silhouette coefficient against the labels: near 1 when the classes form
   tight, separate clusters, near 0 when they overlap.
   :func:`block_scores` does steps 1 and 2 for every block.
3. :func:`choose_depth`: the depth rule, with threshold ``T = alpha × score of
   the last block``.
4. :class:`TruncatedBlocks` / :func:`truncate`: run only the first ``depth``
   blocks.  The dropped blocks stay in memory (they are part of the shared base
   that other tasks may use) but are never called, so they cost no time; a task
   stores its depth as one integer (``task_metadata``).

After truncation the head reads the output of the last kept block, so the
task-specific parameters (adapters, normalisation, head) are retrained briefly.

The blocks must be the children of one ``nn.Sequential`` whose blocks all map
features of one shape to features of that shape, so that any prefix of them can
feed what follows (a stack of residual blocks, or of transformer blocks).
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

EMBEDDINGS = ("pca", "tsne")


def global_average_pool(output: Tensor) -> Tensor:
    """One vector per sample: ``(N, C, *positions)`` averaged over the positions to ``(N, C)``.

    The layout is channels-first, as for convolutions: dim 0 is the sample, dim 1
    the channel, every later dim a position.  A ``(N, C)`` output is returned as
    it is.  For token layouts ``(N, L, C)`` pass another ``reduce`` to
    :func:`block_features`, e.g. ``lambda y: y.mean(dim=1)`` or the class token
    ``lambda y: y[:, 0]`` (what the paper uses for ViT).
    """
    if not isinstance(output, Tensor):
        raise TypeError(f"a block output must be a Tensor to be pooled, got {type(output).__name__}")
    if output.dim() < 2:
        raise ValueError(f"a block output must be at least (N, C), got shape {tuple(output.shape)}")
    if output.dim() == 2:
        return output
    return output.flatten(2).mean(dim=2)


def _resolve_blocks(model: nn.Module, blocks: nn.Sequential | str) -> nn.Sequential:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(blocks, str):
        try:
            blocks = model.get_submodule(blocks)
        except AttributeError as error:
            raise ValueError(f"blocks: model has no submodule named {blocks!r}") from error
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"blocks must be an nn.Sequential (or its name in model), got {type(blocks).__name__}")
    if not any(module is blocks for module in model.modules()):
        raise ValueError("blocks must be a submodule of model")
    if len(blocks) == 0:
        raise ValueError("blocks is an empty nn.Sequential: there is nothing to score")
    return blocks


def _batches(inputs: Tensor | Iterable[Tensor]) -> list[Tensor]:
    if isinstance(inputs, Tensor):
        batches = [inputs]
    else:
        try:
            batches = list(inputs)
        except TypeError as error:
            raise TypeError(
                f"inputs must be a Tensor or an iterable of Tensors, got {type(inputs).__name__}"
            ) from error
    if not batches:
        raise ValueError("inputs holds no batch")
    for batch in batches:
        if not isinstance(batch, Tensor):
            raise TypeError(f"inputs must be a Tensor or an iterable of Tensors, got a {type(batch).__name__}")
    return batches


def _labels_vector(labels: Tensor | Sequence | Iterable[Tensor]) -> Tensor:
    if isinstance(labels, Tensor):
        vector = labels
    elif isinstance(labels, (list, tuple)) and labels and all(isinstance(part, Tensor) for part in labels):
        vector = torch.cat([part.reshape(-1) for part in labels])
    else:
        try:
            vector = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"labels must be a 1-D tensor or array of class labels, got {type(labels).__name__}") \
                from error
    if vector.dim() != 1:
        raise ValueError(f"labels must be 1-D (one label per sample), got shape {tuple(vector.shape)}")
    if vector.dtype.is_floating_point or vector.dtype.is_complex or vector.dtype == torch.bool:
        raise TypeError(f"labels must be integer class labels, got dtype {vector.dtype}")
    return vector.detach().cpu()


@torch.no_grad()
def block_features(
    model: nn.Module,
    blocks: nn.Sequential | str,
    inputs: Tensor | Iterable[Tensor],
    *,
    reduce: Callable[[Tensor], Tensor] = global_average_pool,
) -> list[Tensor]:
    """Each block's output on ``inputs``, one ``(samples, features)`` float32 CPU tensor per block.

    ``blocks`` is an ``nn.Sequential`` inside ``model`` (or its qualified name);
    forward hooks on its children capture their outputs while ``model(batch)``
    runs on every batch of ``inputs`` (one Tensor, or an iterable of batches).
    The model runs in eval mode (batch norms use their running statistics, as
    at inference) without gradients; its training flag is restored afterwards.
    ``reduce`` maps a block output to one vector per sample.  Every block must
    run exactly once per batch: a block that is skipped (a truncated model) or
    run twice raises ``ValueError``.
    """
    blocks = _resolve_blocks(model, blocks)
    batches = _batches(inputs)
    if not callable(reduce):
        raise TypeError(f"reduce must be callable, got {type(reduce).__name__}")
    captured: list[list[Tensor]] = [[] for _ in blocks]

    def capture(index: int):
        def hook(_module: nn.Module, _args, output) -> None:
            vectors = reduce(output)
            if not isinstance(vectors, Tensor) or vectors.dim() != 2:
                raise ValueError(f"reduce must return a (samples, features) Tensor for block {index}")
            captured[index].append(vectors.detach().to(device="cpu", dtype=torch.float32))

        return hook

    handles = [block.register_forward_hook(capture(index)) for index, block in enumerate(blocks)]
    was_training = model.training
    try:
        model.eval()
        for batch_number, batch in enumerate(batches):
            model(batch)
            for index, outputs in enumerate(captured):
                if len(outputs) != batch_number + 1:
                    raise ValueError(
                        f"block {index} of blocks ran {len(outputs) - batch_number} times on batch {batch_number}, "
                        "expected once: every block must be called exactly once per forward pass"
                    )
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [torch.cat(outputs) for outputs in captured]


def embedding_silhouette(
    features: Tensor,
    labels: Tensor | Sequence,
    *,
    embedding: str = "pca",
    seed: int = 0,
    perplexity: float = 30.0,
) -> float:
    """Silhouette coefficient of a 2-D embedding of ``features`` (samples × features) against ``labels``.

    ``embedding="pca"``: the first two principal components.  ``embedding="tsne"``:
    t-SNE (PCA initialisation, seeded by ``seed``), with ``perplexity`` capped at
    ``(samples - 1) / 3`` so that small sets work.  The silhouette is
    ``sklearn.metrics.silhouette_score`` with Euclidean distances on the embedding
    as it comes (the paper's code min-max scales each t-SNE axis first; a t-SNE
    map is isotropic, and per-axis scaling would distort a PCA map's variance ratio).
    Needs scikit-learn, imported here so the package itself does not.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if isinstance(perplexity, bool) or not isinstance(perplexity, numbers.Real) or not perplexity > 0:
        raise ValueError(f"perplexity must be a positive number, got {perplexity!r}")
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a Tensor, got {type(features).__name__}")
    if features.dim() != 2:
        raise ValueError(f"features must be (samples, features), got shape {tuple(features.shape)}")
    labels = _labels_vector(labels)
    samples = features.shape[0]
    if labels.numel() != samples:
        raise ValueError(f"labels has {labels.numel()} entries for {samples} samples of features")
    classes = int(torch.unique(labels).numel())
    if not 2 <= classes <= samples - 1:
        raise ValueError(
            f"labels: the silhouette needs at least 2 classes and more samples than classes, "
            f"got {classes} classes in {samples} samples"
        )
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    try:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE
        from sklearn.metrics import silhouette_score
    except ImportError as error:
        raise ImportError(
            "layer-wise scoring needs scikit-learn for the 2-D embedding and the silhouette score: "
            "pip install scikit-learn"
        ) from error

    points = features.to(torch.float64).numpy()
    if embedding == "pca":
        components = min(2, points.shape[0], points.shape[1])
        points = PCA(n_components=components, random_state=int(seed)).fit_transform(points)
    else:
        capped = min(float(perplexity), max(1.0, (samples - 1) / 3))
        points = TSNE(n_components=2, perplexity=capped, init="pca", random_state=int(seed)).fit_transform(points)
    return float(silhouette_score(points, labels.numpy(), metric="euclidean"))


def block_scores(
    model: nn.Module,
    blocks: nn.Sequential | str,
    inputs: Tensor | Iterable[Tensor],
    labels: Tensor | Sequence | Iterable[Tensor],
    *,
    embedding: str = "pca",
    seed: int = 0,
    perplexity: float = 30.0,
    reduce: Callable[[Tensor], Tensor] = global_average_pool,
) -> list[float]:
    """The SLS score of every block: the silhouette of its features' 2-D embedding against the labels.

    ``inputs`` are the task's training samples (one Tensor or an iterable of
    batches) and ``labels`` their class labels in the same order (one tensor, or
    a list of per-batch tensors).  See :func:`block_features` for how features
    are captured and :func:`embedding_silhouette` for the score.  Returns one
    float in [-1, 1] per block, in block order.
    """
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    labels = _labels_vector(labels)
    features = block_features(model, blocks, inputs, reduce=reduce)
    if features[0].shape[0] != labels.numel():
        raise ValueError(f"labels has {labels.numel()} entries for {features[0].shape[0]} samples of inputs")
    return [
        embedding_silhouette(block, labels, embedding=embedding, seed=seed, perplexity=perplexity)
        for block in features
    ]


def choose_depth(scores: Sequence[float] | Tensor, alpha: float) -> int:
    """How many blocks to keep, by the SLS rule with threshold ``T = alpha × scores[-1]``.

    The rule, as the paper's released code applies it: walk from the last block
    towards the first while the blocks score at least ``T``; stop at the first
    block (counting from the end) whose score falls under ``T``.  (Counting from
    the first block instead would stop almost at once, since early blocks score
    low, and would keep all blocks whenever none falls under ``T``, which is the
    very case where the first block is already enough.)  That block
    and every block before it are kept, together with the block right after it,
    which is the shallowest block of the final run of blocks scoring at least
    ``T``: the truncated network ends where the features first reach the
    threshold for good.  As a formula (blocks numbered from 1)::

        depth = min{ d : scores[i] >= T for every block i from d to the last }

    Edge cases:

    * no block falls under ``T``: the first block already separates the classes
      well enough, so ``depth = 1``;
    * ``scores[-1] <= 0``: the full network's features do not cluster by class,
      so the threshold says nothing and every block is kept (``len(scores)``);
    * ``alpha = 1`` keeps up to the shallowest block of the final run scoring at
      least as high as the last block; ``alpha = 0`` needs only non-negative scores.

    ``alpha`` must be a real number in [0, 1]; ``scores`` a non-empty 1-D
    sequence of finite numbers (silhouettes, one per block, in block order).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a real number, got {type(alpha).__name__}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if isinstance(scores, Tensor):
        if scores.dim() != 1:
            raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
        scores = scores.tolist()
    if isinstance(scores, (str, bytes)) or not isinstance(scores, Sequence):
        raise TypeError(f"scores must be a sequence of numbers, got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError("scores is empty: there are no blocks to choose from")
    values = []
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise TypeError(f"scores[{index}] must be a real number, got {type(score).__name__}")
        if not math.isfinite(float(score)):
            raise ValueError(f"scores[{index}] must be finite, got {score!r}")
        values.append(float(score))
    last = values[-1]
    if last <= 0.0:
        return len(values)
    threshold = float(alpha) * last
    depth = len(values)
    for index in range(len(values) - 1, -1, -1):
        if values[index] < threshold:
            break
        depth = index + 1
    return depth


def _checked_depth(depth: object, blocks: int, name: str = "depth") -> int:
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(depth).__name__}")
    if not 0 <= int(depth) <= blocks:
        raise ValueError(f"{name} must lie in [0, {blocks}] (the number of blocks), got {depth}")
    return int(depth)


class TruncatedBlocks(nn.Sequential):
    """An ``nn.Sequential`` of blocks that runs only the first ``depth`` of them.

    It holds the very same block modules under the same child names as the
    sequence it is built from, so parameter and buffer names (the state dict)
    do not change: a task's truncated model loads the shared base's weights
    as is.  The dropped blocks stay in memory but are never called; ``len``,
    iteration and indexing still see every block (a slice is a plain
    ``nn.Sequential``).
    ``depth = 0`` runs no block (the identity).  The depth is task-specific and
    travels as one integer through :meth:`task_metadata` /
    :meth:`load_task_metadata` (the task-package protocol).
    """

    def __init__(self, blocks: nn.Sequential, depth: int):
        if not isinstance(blocks, nn.Sequential):
            raise TypeError(f"blocks must be an nn.Sequential, got {type(blocks).__name__}")
        super().__init__(OrderedDict(blocks.named_children()))
        self._depth = _checked_depth(depth, len(self))

    @property
    def depth(self) -> int:
        """The number of leading blocks that run."""
        return self._depth

    @depth.setter
    def depth(self, depth: int) -> None:
        self._depth = _checked_depth(depth, len(self))

    def __getitem__(self, index):
        if isinstance(index, slice):  # a slice has no depth of its own: a plain Sequential of those blocks
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return super().__getitem__(index)

    def forward(self, x):
        for index, block in enumerate(self):
            if index >= self._depth:
                break
            x = block(x)
        return x

    def task_metadata(self) -> dict[str, int]:
        """The task-specific state that is not a tensor: ``{"depth": depth}``."""
        return {"depth": self._depth}

    def load_task_metadata(self, metadata: Mapping[str, int]) -> None:
        """Set the depth from a dict saved by :meth:`task_metadata` (validated against this model)."""
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a mapping, got {type(metadata).__name__}")
        if set(metadata) != {"depth"}:
            raise ValueError(f"metadata must hold exactly the key 'depth', got keys {sorted(map(str, metadata))}")
        self._depth = _checked_depth(metadata["depth"], len(self), name="metadata['depth']")

    def extra_repr(self) -> str:
        return f"depth={self._depth} of {len(self)}"


def truncate(model: nn.Module, blocks_name: str, depth: int) -> TruncatedBlocks:
    """Replace ``model``'s ``nn.Sequential`` named ``blocks_name`` by a :class:`TruncatedBlocks` of ``depth``.

    The model is changed in place and the wrapper is returned.  If the named
    module is already a ``TruncatedBlocks`` its depth is set (any depth up to
    the full count, since no block was removed).  Parameter names are unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(blocks_name, str) or not blocks_name:
        raise TypeError(f"blocks_name must be a non-empty str, got {blocks_name!r}")
    try:
        blocks = model.get_submodule(blocks_name)
    except AttributeError as error:
        raise ValueError(f"blocks_name: model has no submodule named {blocks_name!r}") from error
    if isinstance(blocks, TruncatedBlocks):
        blocks.depth = depth
        return blocks
    if not isinstance(blocks, nn.Sequential):
        raise TypeError(f"blocks_name must name an nn.Sequential, {blocks_name!r} is a {type(blocks).__name__}")
    wrapper = TruncatedBlocks(blocks, depth)
    parent_name, _, child_name = blocks_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child_name, wrapper)
    return wrapper


__all__ = [
    "EMBEDDINGS",
    "TruncatedBlocks",
    "block_features",
    "block_scores",
    "choose_depth",
    "embedding_silhouette",
    "global_average_pool",
    "truncate",
]
