"""From a memory policy (``--vram_budget``, ``--offload``, ``--aggressive_offload``) to a placement plan.

The plan works from what a pipeline declares (:mod:`flux.offload.structure`): its stages in order,
each with the device bytes it needs besides weights, and its components, each used in one stage
and run once per image, per prompt or per denoising step. Each component is

- ``resident``: on the device for the whole session (no transfers);
- ``offload``: on the device only during its stage, copied in once per image;
- ``stream`` (components that declare repeated blocks): offloaded like the above except for its
  blocks, of which as many as fit stay resident and the rest are copied in one at a time through a
  few slots every time the component runs; the slots exist only during its stage.

The peak of a stage is the overhead (CUDA context and allocator slack), plus everything resident,
plus what that stage loads (its offloaded components, the non-block part and the slots of its
streamed ones), plus its reserve. :func:`plan_memory` tries every combination of modes (a few
hundred) and keeps the one that fits the budget with the fewest bytes copied per image (then the
lowest peak). A block used on every step costs ``steps x (1 + true CFG)`` copies when streamed,
where an offloaded component costs one: the budget goes to the most used component's blocks first.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from flux.offload.blocks import DEFAULT_SLOTS, choose_resident, fewest_resident
from flux.offload.structure import ComponentSize, Stage
from flux.offload.transfer import BudgetError

GiB = 1024**3
MODES = ("resident", "offload", "stream")
DEFAULT_OVERHEAD = 1 * GiB  # CUDA context (0.75 GiB measured on an H100) and allocator slack
PINNED_BANDWIDTH = 47 * GiB  # bytes/s host-to-device from page-locked memory, H100 (bench.py saw 51)


@dataclass
class MemoryPlan:
    """Where each component lives and what that costs; ``str(plan)`` is a table."""

    budget: int | None
    modes: dict[str, str]
    stage_peaks: dict[str, int]
    transfer_bytes: int  # host-to-device bytes per image
    resident_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)  # streamed components
    num_slots: int = DEFAULT_SLOTS
    sizes: tuple[ComponentSize, ...] = field(default=(), repr=False)
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.stage_peaks.values())

    @property
    def resident(self) -> list[str]:
        return [name for name, mode in self.modes.items() if mode == "resident"]

    def size_of(self, name: str) -> ComponentSize:
        return next(size for size in self.sizes if size.name == name)

    def streamed_blocks(self, name: str) -> tuple[int, ...]:
        kept = set(self.resident_blocks.get(name, ()))
        return tuple(i for i in range(len(self.size_of(name).blocks)) if i not in kept)

    def slot_bytes(self, name: str) -> int:
        blocks = self.size_of(name).blocks
        return max((blocks[i] for i in self.streamed_blocks(name)), default=0)

    def block_capacity(self, name: str) -> int:
        """Device bytes for a streamed component's resident blocks plus its slots."""
        blocks = self.size_of(name).blocks
        resident = sum(blocks[i] for i in self.resident_blocks.get(name, ()))
        return resident + self.num_slots * self.slot_bytes(name)

    def table(self) -> str:
        budget = "none" if self.budget is None else _gb(self.budget)
        lines = [
            f"VRAM plan (budget {budget}, peak {_gb(self.peak)})",
            f"{'component':<12}{'mode':<10}detail",
        ]
        for size in self.sizes:
            mode = self.modes[size.name]
            detail = _gb(size.total)
            if mode == "stream":
                streamed = self.streamed_blocks(size.name)
                detail = (
                    f"{len(size.blocks) - len(streamed)} of {len(size.blocks)} blocks resident, "
                    f"{len(streamed)} streamed ({_gb(sum(size.blocks[i] for i in streamed))} per run) "
                    f"through {self.num_slots} slots of {_gb(self.slot_bytes(size.name))}"
                )
            lines.append(f"{size.name:<12}{mode:<10}{detail}")
        lines.append("stage peaks: " + ", ".join(f"{s} {_gb(b)}" for s, b in self.stage_peaks.items()))
        seconds = self.transfer_bytes / PINNED_BANDWIDTH
        runs = ", ".join(f"{n} per {u}" for u, n in self.counts.items() if u != "image")
        lines.append(
            f"copied per image ({runs}): {_gb(self.transfer_bytes)} "
            f"(~{seconds:.1f} s at {PINNED_BANDWIDTH / GiB:.0f} GiB/s)"
        )
        return "\n".join(lines)

    __str__ = table


def _gb(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def _count(counts: Mapping[str, int], uses: str) -> int:
    return counts.get(uses, 1)


def evaluate_plan(
    sizes: Sequence[ComponentSize],
    stages: Sequence[Stage],
    modes: Mapping[str, str],
    budget: int | None = None,
    *,
    overhead: int = DEFAULT_OVERHEAD,
    num_slots: int = DEFAULT_SLOTS,
    counts: Mapping[str, int] | None = None,
) -> MemoryPlan | None:
    """The plan for one choice of modes, or ``None`` if it cannot fit ``budget``.

    Streamed components get resident blocks in the order of how often they run (the most used
    first), as many as the budget leaves room for; with ``budget=None`` none beyond what the
    smallest slots force.
    """
    counts = dict(counts or {})
    permanent = overhead + sum(s.total for s in sizes if modes[s.name] == "resident")
    transient = {stage.name: stage.reserve for stage in stages}
    moved = 0
    streamed = [s for s in sizes if modes[s.name] == "stream"]
    for size in sizes:
        if modes[size.name] == "offload":
            transient[size.stage] += size.total
            moved += size.total
    slots = {}
    for size in streamed:  # provisional slots: the largest block, until the component chooses
        if not size.blocks:
            return None
        transient[size.stage] += size.other
        moved += size.other
        slots[size.name] = num_slots * max(size.blocks)
        transient[size.stage] += slots[size.name]
    plan = MemoryPlan(budget, dict(modes), {}, 0, num_slots=num_slots, sizes=tuple(sizes), counts=counts)
    for size in sorted(streamed, key=lambda s: -_count(counts, s.uses)):
        transient[size.stage] -= slots[size.name]
        if budget is None:
            resident = fewest_resident(size.blocks, num_slots)
        else:
            capacity = budget - permanent - transient[size.stage]
            others = [b for name, b in transient.items() if name != size.stage]
            cap = budget - permanent - max(others, default=0)
            try:
                resident = choose_resident(size.blocks, capacity, num_slots, max_resident=cap)
            except BudgetError:
                return None
        kept = set(resident)
        left = [i for i in range(len(size.blocks)) if i not in kept]
        if not left:
            return None  # nothing streamed: that is the resident mode
        slots[size.name] = num_slots * max(size.blocks[i] for i in left)
        transient[size.stage] += slots[size.name]
        permanent += sum(size.blocks[i] for i in resident)
        moved += sum(size.blocks[i] for i in left) * _count(counts, size.uses)
        plan.resident_blocks[size.name] = tuple(resident)
    plan.stage_peaks = {stage.name: permanent + transient[stage.name] for stage in stages}
    plan.transfer_bytes = moved
    if budget is not None and plan.peak > budget:
        return None
    return plan


def plan_memory(
    sizes: Sequence[ComponentSize],
    stages: Sequence[Stage],
    budget: int | None,
    *,
    overhead: int = DEFAULT_OVERHEAD,
    num_slots: int = DEFAULT_SLOTS,
    counts: Mapping[str, int] | None = None,
) -> MemoryPlan:
    """The placement with the fewest bytes copied per image whose every stage fits ``budget`` bytes.

    ``counts`` says how often each kind of use happens per image (e.g. ``{"step": 28, "prompt": 1}``
    for 28 steps without true CFG). ``budget=None`` gives the plan with the lowest peak (what
    ``--aggressive_offload`` uses), and within that peak the fewest copies. Raises
    :class:`BudgetError` when nothing fits.
    """
    known = {stage.name for stage in stages}
    unknown = sorted({s.stage for s in sizes} - known)
    if unknown:
        raise ValueError(f"components use undeclared stage(s) {', '.join(unknown)}")
    options = dict(overhead=overhead, num_slots=num_slots, counts=counts)
    choices = [MODES if size.blocks else MODES[:2] for size in sizes]
    plans = []
    for combination in itertools.product(*choices):
        modes = {size.name: mode for size, mode in zip(sizes, combination, strict=True)}
        plan = evaluate_plan(sizes, stages, modes, budget, **options)
        if plan is not None:
            plans.append(plan)
    if not plans:
        smallest = plan_memory(sizes, stages, None, **options)
        raise BudgetError(
            f"a VRAM budget of {_gb(budget)} ({budget:,} bytes) is too small: the smallest plan needs "
            f"{_gb(smallest.peak)} ({smallest.peak:,} bytes)"
        )
    if budget is None:  # the lowest peak, then the best use of it (e.g. more resident blocks)
        return plan_memory(sizes, stages, min(p.peak for p in plans), **options)
    return min(plans, key=lambda p: (p.transfer_bytes, p.peak))
