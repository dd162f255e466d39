"""Apply a :class:`~flux.offload.plan.MemoryPlan` to the components a pipeline declares, stage by stage.

:class:`PipelinePlacement` knows a pipeline only through its declarations
(:mod:`flux.offload.structure`): resident components are placed once, offloaded ones go through a
:class:`ComponentOffload`, streamed ones through :class:`StreamedBlocks` for their blocks (and the
component offload for the rest), all counted in one ledger.

Entering a stage unloads the offloaded components of the one before (and frees the slots of its
streamed components), loads its own, and prefetches the next stage's when the plan's budget
leaves room for both. Either the caller brackets each stage with ``with placement.stage("text"):
...``, or :meth:`PipelinePlacement.attach` installs forward pre-hooks on each component's entry
modules, so the pipeline's code needs no change at all. The models must be on the host when the
placement is made (load them to the CPU); :meth:`close` puts everything back where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from flux.offload.blocks import StreamedBlocks
from flux.offload.components import ComponentOffload
from flux.offload.layout import FlatLayout
from flux.offload.plan import MemoryPlan
from flux.offload.structure import Component, Stage
from flux.offload.transfer import DeviceLedger, Transfer, default_transfer


class PipelinePlacement:
    """Keeps the declared ``components`` where ``plan`` says, through the ``stages`` in order."""

    def __init__(
        self,
        components: Sequence[Component],
        stages: Sequence[Stage],
        plan: MemoryPlan,
        device: torch.device | str,
        *,
        transfer: Transfer | None = None,
    ):
        self.components = list(components)
        self.stages = [stage.name for stage in stages]
        self.plan = plan
        self.device = torch.device(device)
        self.transfer = transfer if transfer is not None else default_transfer(self.device)
        self.ledger = DeviceLedger()
        self.offload = ComponentOffload(self.device, transfer=self.transfer, ledger=self.ledger)
        self.streams: dict[str, StreamedBlocks] = {}
        self.current: str | None = None
        self.log: list[str] = []  # stages entered, in order
        self._loaded: dict[str, list[tuple[nn.Module, ...]]] = {stage: [] for stage in self.stages}
        self._streamed_in: dict[str, list[StreamedBlocks]] = {stage: [] for stage in self.stages}
        self._hooks: list = []
        try:
            self._place()
        except BaseException:
            self.close()
            raise

    def _place(self) -> None:
        for component in self.components:
            mode = self.plan.modes[component.name]
            if component.stage not in self._loaded:
                raise ValueError(f"{component.name} is used in an undeclared stage {component.stage!r}")
            if mode == "resident":
                self.offload.add(component.modules, name=component.name, resident=True)
                continue
            exclude = component.blocks if mode == "stream" else ()
            self.offload.add(component.modules, name=component.name, exclude=exclude)
            self._loaded[component.stage].append(component.modules)
            if mode == "stream":
                stream = StreamedBlocks(
                    component.blocks,
                    self.device,
                    self.plan.block_capacity(component.name),
                    num_slots=self.plan.num_slots,
                    transfer=self.transfer,
                    ledger=self.ledger,
                    resident=self.plan.resident_blocks.get(component.name, ()),
                )
                stream.suspend()  # slots only while the component's stage runs
                self.streams[component.name] = stream
                self._streamed_in[component.stage].append(stream)

    def _stage_bytes(self, stage: str) -> int:
        return sum(FlatLayout(m).nbytes for m in self._loaded[stage])

    def enter(self, stage: str) -> None:
        """Make ``stage`` the current one (nothing to do if it already is)."""
        if stage not in self._loaded:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(self.stages)}")
        if stage == self.current:
            return
        self.leave()
        for other in self.stages:  # a prefetch for a stage that was skipped (e.g. no ID photo) goes back
            if other != stage:
                self.offload.offload(*self._loaded[other])
        self.log.append(stage)
        self.offload.load(*self._loaded[stage])
        self.current = stage
        following = self.stages[(self.stages.index(stage) + 1) % len(self.stages)]
        budget = self.plan.budget
        if budget is not None and self.plan.stage_peaks[stage] + self._stage_bytes(following) <= budget:
            self.offload.prefetch(*self._loaded[following])

    def leave(self) -> None:
        """Unload the current stage's offloaded components and free its streamed components' slots."""
        if self.current is None:
            return
        self.offload.unload(*self._loaded[self.current])
        for stream in self._streamed_in[self.current]:
            stream.suspend()
        self.current = None

    @contextlib.contextmanager
    def stage(self, stage: str) -> Iterator[None]:
        """Bracket one stage of a generation: its models are on the device inside the block."""
        self.enter(stage)
        try:
            yield
        finally:
            self.leave()

    def attach(self) -> PipelinePlacement:
        """Enter each stage automatically when one of its components' entry modules runs."""
        for component in self.components:
            enter = torch.compiler.disable(lambda m, a, s=component.stage: self.enter(s))
            for module in component.entry_modules:
                self._hooks.append(module.register_forward_pre_hook(enter))
        return self

    def close(self) -> None:
        """Remove the hooks and put every weight back where it was before the placement."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.leave()
        for stream in self.streams.values():
            stream.close()
        self.streams.clear()
        self.offload.close()

    def __enter__(self) -> PipelinePlacement:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
