"""Apply a :class:`~flux.offload.plan.MemoryPlan` to a whole PuLID-FLUX pipeline.

:class:`PipelinePlacement` wraps the pipeline's models (it only reads the attributes ``t5``,
``clip``, ``id_encoder.eva``, ``id_encoder.id_former``, ``pulid_ca``, ``flow`` and ``ae``): resident
components are placed once, offloaded ones go through a :class:`ComponentOffload`, streamed ones
(the DiT's blocks, T5's layers) through :class:`StreamedBlocks`, all counted in one ledger.

The pipeline moves from stage to stage (``text``, ``id``, ``denoise``, ``decode``): entering a
stage unloads the offloaded components of the one before, loads its own, and prefetches the next
stage's when the plan's budget leaves room for both. Either the caller brackets each stage with
``with placement.stage("text"): ...``, or :meth:`PipelinePlacement.attach` installs forward
pre-hooks that enter a stage when one of its models is first called, so the pipeline's code needs
no change at all. The models must be on the host when the placement is made (load them to the
CPU); :meth:`close` puts everything back where it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from flux.offload.blocks import StreamedBlocks, flux_blocks
from flux.offload.components import ComponentOffload
from flux.offload.layout import FlatLayout
from flux.offload.plan import COMPONENTS, STAGE_OF, STAGES, ComponentSizes, MemoryPlan, dit_sizes
from flux.offload.transfer import DeviceLedger, Transfer, default_transfer


def pipeline_components(pipeline) -> dict[str, list[nn.Module]]:
    """The modules of each planned component (empty when the pipeline has no ID encoder)."""
    id_encoder = pipeline.id_encoder
    return {
        "t5": [pipeline.t5],
        "clip": [pipeline.clip],
        "id_encoder": [id_encoder.eva, id_encoder.id_former] if id_encoder is not None else [],
        "pulid_ca": [pipeline.pulid_ca],
        "dit": [pipeline.flow],
        "ae": [pipeline.ae],
    }


def t5_blocks(t5: nn.Module) -> list[nn.Module]:
    """The encoder layers of a transformers T5 inside an ``HFEmbedder`` (empty if it has another shape)."""
    blocks = getattr(getattr(getattr(t5, "hf_module", None), "encoder", None), "block", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def component_sizes(pipeline) -> ComponentSizes:
    """The weight bytes of a loaded pipeline, for :func:`~flux.offload.plan.plan_memory`."""
    parts = pipeline_components(pipeline)
    packed = {name: FlatLayout(modules).nbytes for name, modules in parts.items() if name != "dit"}
    return ComponentSizes(
        **packed,
        **dit_sizes(pipeline.flow),
        t5_blocks=tuple(FlatLayout(b).nbytes for b in t5_blocks(pipeline.t5)),
    )


class PipelinePlacement:
    """Keeps a pipeline's models where ``plan`` says, stage by stage."""

    def __init__(
        self,
        pipeline,
        plan: MemoryPlan,
        device: torch.device | str | None = None,
        *,
        transfer: Transfer | None = None,
    ):
        self.plan = plan
        self.device = torch.device(device if device is not None else pipeline.device)
        self.transfer = transfer if transfer is not None else default_transfer(self.device)
        self.ledger = DeviceLedger()
        self.offload = ComponentOffload(self.device, transfer=self.transfer, ledger=self.ledger)
        self.streams: dict[str, StreamedBlocks] = {}
        self.current: str | None = None
        self.log: list[str] = []  # stages entered, in order
        self._loaded: dict[str, list[list[nn.Module]]] = {stage: [] for stage in STAGES}
        self._hooks: list = []
        self._modules = pipeline_components(pipeline)
        try:
            self._place(pipeline)
        except BaseException:
            self.close()
            raise

    def _place(self, pipeline) -> None:
        for name in COMPONENTS:
            modules, mode = self._modules[name], self.plan.modes[name]
            if not modules:
                continue
            if mode == "stream" and name == "dit":
                blocks = flux_blocks(pipeline.flow)
                self.offload.add(modules, name=name, resident=True, exclude=blocks)
                self.streams[name] = StreamedBlocks(
                    blocks,
                    self.device,
                    self.plan.dit_block_capacity,
                    num_slots=self.plan.num_slots,
                    transfer=self.transfer,
                    ledger=self.ledger,
                    resident=self.plan.dit_resident_blocks,
                )
            elif mode == "stream":  # T5: every layer streamed, the slots only during the text stage
                blocks = t5_blocks(pipeline.t5)
                if not blocks:
                    raise ValueError("this T5 has no encoder layers to stream; plan it as 'offload'")
                self.offload.add(modules, name=name, exclude=blocks)
                self._loaded[STAGE_OF[name]].append(modules)
                stream = StreamedBlocks(
                    blocks,
                    self.device,
                    self.plan.num_slots * max(FlatLayout(b).nbytes for b in blocks),
                    num_slots=self.plan.num_slots,
                    transfer=self.transfer,
                    ledger=self.ledger,
                    resident=(),
                )
                stream.suspend()
                self.streams[name] = stream
            else:
                self.offload.add(modules, name=name, resident=mode == "resident")
                if mode == "offload":
                    self._loaded[STAGE_OF[name]].append(modules)

    def _stage_bytes(self, stage: str) -> int:
        return sum(FlatLayout(m).nbytes for m in self._loaded[stage])

    def enter(self, stage: str) -> None:
        """Make ``stage`` the current one (nothing to do if it already is)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
        if stage == self.current:
            return
        self.leave()
        for other in STAGES:  # a prefetch for a stage that was skipped (e.g. no ID photo) goes back
            if other != stage:
                self.offload.offload(*self._loaded[other])
        self.log.append(stage)
        self.offload.load(*self._loaded[stage])
        self.current = stage
        following = STAGES[(STAGES.index(stage) + 1) % len(STAGES)]
        budget = self.plan.budget
        if budget is not None and self.plan.stage_peaks[stage] + self._stage_bytes(following) <= budget:
            self.offload.prefetch(*self._loaded[following])

    def leave(self) -> None:
        """Unload the current stage's offloaded components (and free T5's slots after the text stage)."""
        if self.current is None:
            return
        self.offload.unload(*self._loaded[self.current])
        if self.current == "text" and "t5" in self.streams:
            self.streams["t5"].suspend()
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
        """Enter each stage automatically when one of its models runs (forward pre-hooks)."""
        for name, modules in self._modules.items():
            for module in modules:
                stage = STAGE_OF[name]
                target = getattr(module, "decoder", module) if name == "ae" else module  # ae.decode()
                enter = torch.compiler.disable(lambda m, a, s=stage: self.enter(s))
                self._hooks.append(target.register_forward_pre_hook(enter))
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
