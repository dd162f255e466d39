"""The memory flags, parsed once into a :class:`MemoryPolicy` where the command line is read.

``--vram_budget GB`` (GiB) wins; otherwise ``--aggressive_offload`` takes the smallest plan (every
component offloaded or streamed, with as few resident blocks as fit the slots); otherwise
``--offload`` keeps each whole component on the device only during its stage (the official
behaviour); with no flag everything is resident. The policy checks that the device can honour it
and turns a pipeline's declared sizes into a :class:`~flux.offload.plan.MemoryPlan`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from flux.devices import HardwareError
from flux.offload.plan import DEFAULT_OVERHEAD, GiB, MemoryPlan, evaluate_plan, plan_memory
from flux.offload.structure import ComponentSize, Stage


@dataclass(frozen=True)
class MemoryPolicy:
    """What the user asked for: a VRAM budget in GiB, whole-component offload, or the smallest plan."""

    vram_budget_gb: float | None = None
    offload: bool = False
    aggressive: bool = False

    def __post_init__(self) -> None:
        budget = self.vram_budget_gb
        if budget is not None and (
            not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0
        ):
            raise ValueError(f"the VRAM budget must be a positive number of GiB, not {budget!r}")

    @property
    def placed(self) -> bool:
        """Whether the weights live on the host and move to the device stage by stage."""
        return self.vram_budget_gb is not None or self.offload or self.aggressive

    def describe(self) -> str:
        if self.vram_budget_gb is not None:
            return f"--vram_budget {self.vram_budget_gb:g}"
        if self.aggressive:
            return "--aggressive_offload"
        return "--offload" if self.offload else "resident"

    def check_device(self, device: torch.device | str) -> None:
        """A placed policy needs a CUDA device: on the CPU the "device" memory is the host's."""
        if self.placed and torch.device(device).type != "cuda":
            raise HardwareError(
                f"{self.describe()} moves weights between the host and a CUDA GPU, but the device is "
                f"{device}: drop the flag (on the CPU every weight is in host memory anyway)."
            )

    def plan(
        self,
        sizes: Sequence[ComponentSize],
        stages: Sequence[Stage],
        counts: Mapping[str, int] | None = None,
        overhead: int = DEFAULT_OVERHEAD,
    ) -> MemoryPlan:
        """The plan these flags ask for, over a pipeline's declared stages and component sizes."""
        options = dict(overhead=overhead, counts=counts)
        if self.vram_budget_gb is not None:
            return plan_memory(sizes, stages, int(self.vram_budget_gb * GiB), **options)
        if self.aggressive:
            return plan_memory(sizes, stages, None, **options)
        mode = "offload" if self.offload else "resident"
        plan = evaluate_plan(sizes, stages, {s.name: mode for s in sizes}, **options)
        assert plan is not None  # no budget, nothing streamed: always evaluates
        return plan
