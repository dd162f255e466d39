"""Device-memory placement that wraps the models: block streaming, component offload, budget plans.

Nothing here changes a model class or its forward: weights are rebound between host and device
buffers (``tensor.data``) and blocks are driven by forward hooks that ``close()`` removes. It knows
a pipeline only by what the pipeline declares (:mod:`flux.offload.structure`).

- :class:`StreamedBlocks`: some blocks resident, the rest copied through a ring of slots.
- :class:`ComponentOffload`: whole components on the device only while used, with prefetch.
- :class:`MemoryPolicy`: the memory flags, and the :class:`MemoryPlan` they ask for.
- :class:`PipelinePlacement`: applies a plan to declared components, stage by stage.
"""

from flux.offload.blocks import StreamedBlocks, choose_resident, minimum_capacity
from flux.offload.components import ComponentOffload
from flux.offload.placement import PipelinePlacement
from flux.offload.plan import MemoryPlan, evaluate_plan, plan_memory
from flux.offload.policy import MemoryPolicy
from flux.offload.structure import Component, ComponentSize, Stage, measure
from flux.offload.transfer import BudgetError, CudaTransfer, DeviceLedger, SyncTransfer, Transfer

__all__ = [
    "BudgetError",
    "Component",
    "ComponentOffload",
    "ComponentSize",
    "CudaTransfer",
    "DeviceLedger",
    "MemoryPlan",
    "MemoryPolicy",
    "PipelinePlacement",
    "Stage",
    "StreamedBlocks",
    "SyncTransfer",
    "Transfer",
    "choose_resident",
    "evaluate_plan",
    "measure",
    "minimum_capacity",
    "plan_memory",
]
