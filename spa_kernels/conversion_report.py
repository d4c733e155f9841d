"""What a conversion did to a model: converted layers, layers left alone and why, what trains.

:func:`spa_kernels.convert` builds a :class:`ConversionReport`, logs it at INFO and returns
it with ``report=True``; :func:`conversion_report` builds one for any model, so other
tools that convert or freeze a model describe it the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from torch import nn

from .freeze import inside_any, is_spa_layer


@dataclass
class ConversionReport:
    """A model's SPA layers, the layers left alone (with the reason) and its trainable parameters.

    Attributes:
        converted: ``{module name: SPA module type name}``.
        left_alone: ``{module name: reason}`` for layers of a convertible family that
            stayed as they were (excluded, unsupported, even kernel, subclass…).
        excluded: names of the modules excluded from conversion (they keep training).
        trainable: ``{parameter name: element count}`` of the parameters that require grad.
        total_parameters: element count of every parameter of the model.
    """

    converted: dict[str, str] = field(default_factory=dict)
    left_alone: dict[str, str] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)
    trainable: dict[str, int] = field(default_factory=dict)
    total_parameters: int = 0

    @property
    def trainable_parameters(self) -> int:
        return sum(self.trainable.values())

    def summary(self, max_names: int = 8) -> str:
        """A few readable lines: counts, then the names (at most ``max_names`` per list)."""

        def names(items: Iterable[str]) -> str:
            items = list(items)
            shown = ", ".join(items[:max_names])
            return shown + (f", … ({len(items) - max_names} more)" if len(items) > max_names else "")

        share = self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0
        lines = [f"converted {len(self.converted)} layers; left {len(self.left_alone)} alone; "
                 f"{len(self.excluded)} excluded",
                 f"trainable: {self.trainable_parameters:,} of {self.total_parameters:,} parameters "
                 f"({100 * share:.2f} %) in {len(self.trainable)} tensors"]
        if self.converted:
            kinds: dict[str, int] = {}
            for kind in self.converted.values():
                kinds[kind] = kinds.get(kind, 0) + 1
            lines.append("  converted: " + ", ".join(f"{count} × {kind}" for kind, count in kinds.items()))
        for name, reason in list(self.left_alone.items())[:max_names]:
            lines.append(f"  left alone: {name or '<model>'}: {reason}")
        if len(self.left_alone) > max_names:
            lines.append(f"  left alone: … ({len(self.left_alone) - max_names} more)")
        if self.excluded:
            lines.append(f"  excluded (trainable): {names(self.excluded)}")
        trainable_outside = [name for name in self.trainable if not _in_spa_layer(name, self.converted)]
        if trainable_outside:
            lines.append(f"  trainable outside SPA layers: {names(trainable_outside)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _in_spa_layer(parameter_name: str, converted: dict[str, str]) -> bool:
    owner = parameter_name.rpartition(".")[0]
    while True:
        if owner in converted:
            return True
        if not owner:
            return False
        owner = owner.rpartition(".")[0]


def conversion_report(
    model: nn.Module,
    *,
    excluded: Iterable[str] = (),
    left_alone_reason: Callable[[nn.Module], str | None] | None = None,
) -> ConversionReport:
    """The :class:`ConversionReport` of ``model`` as it is now.

    Args:
        model: any model, converted or not.
        excluded: qualified names of modules excluded from conversion.
        left_alone_reason: for a module that is not an SPA layer, why it was not
            converted, or ``None`` when it is not a convertible layer at all
            (``convert`` passes its own rules).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    excluded = list(excluded)
    report = ConversionReport(excluded=excluded)
    for name, module in model.named_modules():
        if is_spa_layer(module):
            report.converted[name] = type(module).__name__
            continue
        if name in excluded:
            report.left_alone[name] = "excluded: kept as it is, and trains in full"
            continue
        if left_alone_reason is None or inside_any(name, report.left_alone):
            continue
        reason = left_alone_reason(module)
        if reason is not None:
            report.left_alone[name] = reason
    for name, parameter in model.named_parameters():
        report.total_parameters += parameter.numel()
        if parameter.requires_grad:
            report.trainable[name] = parameter.numel()
    return report


__all__ = ["ConversionReport", "conversion_report"]
