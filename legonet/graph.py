"""A model's wiring as a ``torch.fx`` graph of its layers, for the passes that need it.

BatchNorm folding, data-free bias correction and channel grouping (:mod:`legonet.datafree`), the
calibrated pipeline and the exports read which layer feeds which. They all trace with
:class:`LayerTracer`, which keeps every instance of a weight layer (convolutions, Linear,
Embedding, normalisation layers) as one node, *subclasses included*: users' networks often define
their own ``nn.Conv2d`` subclass (TensorFlow's 'SAME' padding computed in ``forward``, as ported
EfficientNets do), and ``torch.fx``'s default tracer would trace into it, see a bare
``F.conv2d`` on a parameter, and every pass would lose the layer. A subclass computes what its base
class does up to the padding it applies, which none of these passes depends on.

When tracing fails, :func:`trace` raises :class:`~legonet.errors.ArchitectureError` with the reason
in one line; passes turn that into a :class:`PassNote` saying what they left undone and why.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from legonet.errors import ArchitectureError

_NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                                       nn.modules.instancenorm._InstanceNorm) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# modules traced as one node whatever their class: they hold the weights the passes work on
LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding) + _NORMS


class LayerTracer(fx.Tracer):
    """``torch.fx`` tracer keeping every instance of :data:`LAYER_TYPES` (subclasses too) as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, LAYER_TYPES) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``model`` as a graph of its layers; raises :class:`ArchitectureError` saying why it cannot be traced."""
    tracer = LayerTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types for code it cannot trace
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ArchitectureError(f"torch.fx cannot trace {type(model).__name__}: {first}") from None
    return fx.GraphModule(tracer.root, graph)


def own_forward_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose class is a subclass of a :data:`LAYER_TYPES` type with a ``forward``
    of its own (traced as the layer it derives from; listed so a pipeline can say so)."""
    out = []
    for name, m in model.named_modules():
        base = next((t for t in LAYER_TYPES if isinstance(m, t)), None)
        if base is not None and type(m) is not base and type(m).forward is not _base_forward(type(m)):
            out.append(name)
    return out


def _base_forward(cls: type) -> object:
    """The ``forward`` of the nearest torch.nn class ``cls`` derives from."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("torch.nn"):
            return klass.forward
    return None


@dataclass(frozen=True)
class PassNote:
    """What a pass left undone: ``layer`` (a module name; ``""`` for the whole model) and why."""

    step: str
    layer: str
    reason: str

    def __str__(self) -> str:
        where = f" {self.layer}" if self.layer else ""
        return f"{self.step}: skipped{where}: {self.reason}"


def graph_or_note(model: nn.Module, step: str) -> tuple[fx.GraphModule | None, PassNote | None]:
    """:func:`trace`, or ``(None, note)`` naming ``step`` and why the model could not be traced."""
    try:
        return trace(model), None
    except ArchitectureError as exc:
        return None, PassNote(step, "", str(exc))


__all__ = ["LAYER_TYPES", "LayerTracer", "PassNote", "graph_or_note", "own_forward_layers", "trace"]

