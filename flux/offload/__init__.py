"""Device-memory placement that wraps the models: block streaming, component offload, budget plans.

Nothing here changes a model class or its forward: weights are rebound between host and device
buffers (``tensor.data``) and blocks are driven by forward hooks that ``close()`` removes.

- :class:`StreamedBlocks`: some blocks resident, the rest copied through a ring of slots.
- :class:`ComponentOffload`: whole components on the device only while used, with prefetch.
- :func:`plan_memory` / :func:`plan_from_flags`: a :class:`MemoryPlan` for a VRAM budget.
- :class:`PipelinePlacement`: applies a plan to a PuLID-FLUX pipeline, stage by stage.
"""

from flux.offload.blocks import StreamedBlocks, choose_resident, flux_blocks, minimum_capacity
from flux.offload.components import ComponentOffload
from flux.offload.placement import PipelinePlacement, component_sizes
from flux.offload.plan import (
    ComponentSizes,
    MemoryPlan,
    StageReserves,
    evaluate_plan,
    plan_from_flags,
    plan_memory,
)
from flux.offload.transfer import BudgetError, CudaTransfer, DeviceLedger, SyncTransfer, Transfer

__all__ = [
    "BudgetError",
    "ComponentOffload",
    "ComponentSizes",
    "CudaTransfer",
    "DeviceLedger",
    "MemoryPlan",
    "PipelinePlacement",
    "StageReserves",
    "StreamedBlocks",
    "SyncTransfer",
    "Transfer",
    "choose_resident",
    "component_sizes",
    "evaluate_plan",
    "flux_blocks",
    "minimum_capacity",
    "plan_from_flags",
    "plan_memory",
]
