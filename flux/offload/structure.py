"""What a pipeline declares so that memory placement can work without knowing the pipeline.

A pipeline runs :class:`Stage` s in order (for PuLID-FLUX: text, id, denoise, decode), and each of
its :class:`Component` s is used in one stage. A component lists its modules, the modules whose
forward begins its stage (where the placement hooks in), the repeated blocks it may stream (from
the model's own declaration, :mod:`flux.repeated`) and how often it runs per image. The planner
sees only the byte sizes of these declarations (:func:`measure`); the placement only their modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from flux.offload.layout import FlatLayout


@dataclass(frozen=True)
class Stage:
    """One stage of a generation, and the device bytes it needs besides weights (activations...)."""

    name: str
    reserve: int = 0


@dataclass(frozen=True, eq=False)
class Component:
    """Models that are placed together, used in ``stage``.

    ``entry``: the modules whose forward starts the stage (default: ``modules``); ``blocks``: the
    repeated blocks, in execution order, that may be streamed (empty: never streamed); ``uses``:
    how often it runs per image, as a key of the planner's counts ("image", "prompt", "step").
    """

    name: str
    stage: str
    modules: tuple[nn.Module, ...]
    entry: tuple[nn.Module, ...] = ()
    blocks: tuple[nn.Module, ...] = ()
    uses: str = "image"

    @property
    def entry_modules(self) -> tuple[nn.Module, ...]:
        return self.entry or self.modules


@dataclass(frozen=True)
class ComponentSize:
    """The bytes of a component as :class:`~flux.offload.layout.FlatLayout` packs them (each tensor
    padded to 256 bytes), so a plan counts exactly what the offloaders allocate."""

    name: str
    stage: str
    total: int
    blocks: tuple[int, ...] = ()
    uses: str = "image"

    @property
    def other(self) -> int:
        """The bytes outside the blocks (embeddings, final layers)."""
        return self.total - sum(self.blocks)


def measure(components: Sequence[Component]) -> tuple[ComponentSize, ...]:
    """The sizes the planner needs, for loaded models or models on the meta device."""
    sizes = []
    for component in components:
        blocks = tuple(FlatLayout(block).nbytes for block in component.blocks)
        rest = FlatLayout(component.modules, component.blocks).nbytes
        total = rest + sum(blocks)
        sizes.append(ComponentSize(component.name, component.stage, total, blocks, component.uses))
    return tuple(sizes)
