"""From ``--vram_budget`` / ``--offload`` / ``--aggressive_offload`` to a placement for every component.

A generation runs four stages, each needing some components on the device: ``text`` (T5, CLIP),
``id`` (EVA-CLIP and the IDFormer), ``denoise`` (the DiT and the PuLID cross-attentions) and
``decode`` (the autoencoder). Each component is

- ``resident``: on the device for the whole session (no transfers);
- ``offload``: on the device only during its stage, copied in once per image;
- ``stream`` (the DiT, and T5 when its layer sizes are known): blocks copied in one at a time
  through a few slots during every pass, while some DiT blocks stay resident.

The peak of a stage is the overhead, plus everything resident, plus what that stage loads, plus
its activation reserve. :func:`plan_memory` tries every combination of modes (a few hundred) and
keeps the one that fits the budget with the fewest bytes copied per image (then the lowest peak).
The DiT dominates that count: it is used on every step, so each streamed byte costs
``steps x (1 + true CFG)`` copies, where an offloaded component costs one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace

import torch

from flux.offload.blocks import DEFAULT_SLOTS, choose_resident, flux_blocks, minimum_capacity
from flux.offload.layout import FlatLayout
from flux.offload.transfer import BudgetError

GiB = 1024**3
STAGES = ("text", "id", "denoise", "decode")
COMPONENTS = ("t5", "clip", "id_encoder", "pulid_ca", "dit", "ae")
STAGE_OF = {
    "t5": "text",
    "clip": "text",
    "id_encoder": "id",
    "pulid_ca": "denoise",
    "dit": "denoise",
    "ae": "decode",
}
PINNED_BANDWIDTH = 47 * GiB  # bytes/s host-to-device from page-locked memory, H100 (bench.py saw 51)

# Full-size weights not built here (bf16 unless noted), from the official configurations:
T5_XXL_LAYER_BYTES = 385_892_352  # one T5-XXL encoder layer: attention 4x4096^2, gated FF 3x4096x10240
T5_XXL_LAYERS = 24
T5_XXL_BIAS_BYTES = 4_096  # the relative position bias, in the first layer only
T5_XXL_OTHER_BYTES = 263_200_768  # the shared 32128x4096 embedding and the final norm
CLIP_L_TEXT_BYTES = 246_120_960  # 123,060,480 parameters
EVA02_L_336_BYTES = 608_865_664  # 304,432,832 parameters


@dataclass(frozen=True)
class ComponentSizes:
    """Weight bytes of every component; the DiT (and optionally T5) as a list of block sizes.

    Bytes are as :class:`~flux.offload.layout.FlatLayout` packs them (each tensor padded to 256
    bytes), so a plan counts exactly what the offloaders allocate.
    """

    t5: int
    clip: int
    id_encoder: int
    pulid_ca: int
    ae: int
    dit_other: int
    dit_blocks: tuple[int, ...]
    dit_double: int = 0  # how many of dit_blocks are double blocks (for the table only)
    t5_blocks: tuple[int, ...] = ()  # empty: T5 can be resident or offloaded, not streamed

    @property
    def dit(self) -> int:
        return self.dit_other + sum(self.dit_blocks)

    def of(self, component: str) -> int:
        return self.dit if component == "dit" else getattr(self, component)

    @classmethod
    def flux_dev(cls) -> ComponentSizes:
        """FLUX.1-dev + PuLID v0.9 in bf16 (AE in float32), the DiT and PuLID measured on the meta device."""
        from flux.autoencoder import AutoEncoder
        from flux.loading import build_flow_model
        from flux.registry import MODELS
        from pulid.encoders import PuLIDWeights

        spec = MODELS["flux-dev"]
        flow = build_flow_model(spec.params, "meta", torch.bfloat16)
        with torch.device("meta"):
            pulid = PuLIDWeights().to(torch.bfloat16)
            ae = AutoEncoder(spec.ae_params)
        t5_blocks = (T5_XXL_LAYER_BYTES + T5_XXL_BIAS_BYTES,) + (T5_XXL_LAYER_BYTES,) * (T5_XXL_LAYERS - 1)
        return cls(
            t5=sum(t5_blocks) + T5_XXL_OTHER_BYTES,
            clip=CLIP_L_TEXT_BYTES,
            id_encoder=EVA02_L_336_BYTES + FlatLayout(pulid.pulid_encoder).nbytes,
            pulid_ca=FlatLayout(pulid.pulid_ca).nbytes,
            ae=FlatLayout(ae).nbytes,
            **dit_sizes(flow),
            t5_blocks=t5_blocks,
        )


def dit_sizes(flow: torch.nn.Module) -> dict:
    """``dit_other``, ``dit_blocks`` and ``dit_double`` of a FLUX DiT (any device, meta included)."""
    blocks = flux_blocks(flow)
    return dict(
        dit_other=FlatLayout(flow, exclude=blocks).nbytes,
        dit_blocks=tuple(FlatLayout(b).nbytes for b in blocks),
        dit_double=len(flow.double_blocks),
    )


@dataclass(frozen=True)
class StageReserves:
    """Device bytes a stage needs besides weights (activations, workspaces, the face models for ``id``).

    ``overhead`` is always there: the CUDA context and allocator slack. The defaults are for
    1024x1024 images, from ``python benchmarks/bench_offload.py`` on an H100 (bf16): the DiT's
    activations peaked at 0.59 GiB (1.24 GiB at 1536x1536), the autoencoder decode at 3.53 GiB
    (11.9 GiB at 1536x1536), the CUDA context took 0.75 GiB. :meth:`for_image` scales them.
    """

    text: int = 1 * GiB
    id: int = 2 * GiB
    denoise: int = 3 * GiB // 2
    decode: int = 4 * GiB
    overhead: int = 1 * GiB

    def of(self, stage: str) -> int:
        return getattr(self, stage)

    def for_image(self, width: int, height: int) -> StageReserves:
        """Reserves for the largest image to be made: the DiT's grow with the pixels, the decoder's
        faster (its attention at 1/8 resolution is quadratic): x3.4 for 2.25x the pixels."""
        scale = width * height / (1024 * 1024)
        return replace(self, denoise=int(self.denoise * scale), decode=int(self.decode * scale**1.5))


@dataclass
class MemoryPlan:
    """Where each component lives and what that costs; ``str(plan)`` is a table."""

    budget: int | None
    modes: dict[str, str]
    stage_peaks: dict[str, int]
    transfer_bytes: int  # host-to-device bytes per image
    dit_resident_blocks: tuple[int, ...] = ()
    dit_streamed_blocks: tuple[int, ...] = ()
    dit_block_capacity: int = 0  # budget for StreamedBlocks: resident blocks + slots
    num_slots: int = DEFAULT_SLOTS
    sizes: ComponentSizes | None = field(default=None, repr=False)
    passes: int = 20

    @property
    def peak(self) -> int:
        return max(self.stage_peaks.values())

    @property
    def resident(self) -> list[str]:
        return [c for c in COMPONENTS if self.modes[c] == "resident"]

    def table(self) -> str:
        sizes = self.sizes
        budget = "none" if self.budget is None else _gb(self.budget)
        lines = [
            f"VRAM plan (budget {budget}, peak {_gb(self.peak)})",
            f"{'component':<12}{'mode':<10}detail",
        ]
        for name in COMPONENTS:
            mode = self.modes[name]
            detail = _gb(sizes.of(name)) if sizes else ""
            if name == "dit" and mode == "stream" and sizes:
                double = sum(1 for i in self.dit_resident_blocks if i < sizes.dit_double)
                single = len(self.dit_resident_blocks) - double
                streamed = sum(sizes.dit_blocks[i] for i in self.dit_streamed_blocks)
                slot = max(sizes.dit_blocks[i] for i in self.dit_streamed_blocks)
                detail = (
                    f"{double} double + {single} single blocks resident, "
                    f"{len(self.dit_streamed_blocks)} streamed ({_gb(streamed)} per pass) "
                    f"through {self.num_slots} slots of {_gb(slot)}"
                )
            elif name == "t5" and mode == "stream" and sizes:
                detail = f"{len(sizes.t5_blocks)} layers streamed through {self.num_slots} slots"
            lines.append(f"{name:<12}{mode:<10}{detail}")
        lines.append("stage peaks: " + ", ".join(f"{s} {_gb(b)}" for s, b in self.stage_peaks.items()))
        seconds = self.transfer_bytes / PINNED_BANDWIDTH
        lines.append(
            f"copied per image ({self.passes} DiT passes): {_gb(self.transfer_bytes)} "
            f"(~{seconds:.1f} s at {PINNED_BANDWIDTH / GiB:.0f} GiB/s)"
        )
        return "\n".join(lines)

    __str__ = table


def _gb(nbytes: int) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def evaluate_plan(
    sizes: ComponentSizes,
    modes: dict[str, str],
    budget: int | None = None,
    *,
    reserves: StageReserves | None = None,
    num_slots: int = DEFAULT_SLOTS,
    passes: int = 20,
    text_passes: int = 1,
) -> MemoryPlan | None:
    """The plan for one choice of modes, or ``None`` if it cannot fit ``budget``.

    A streamed DiT gets as many resident blocks as the budget leaves room for (none when
    ``budget`` is ``None``). :func:`plan_memory` calls this for every choice of modes.
    """
    reserves = reserves if reserves is not None else StageReserves()
    permanent = reserves.overhead + sum(sizes.of(c) for c in COMPONENTS if modes[c] == "resident")
    transient = {stage: reserves.of(stage) for stage in STAGES}
    moved = 0
    for name in COMPONENTS:
        if modes[name] == "offload":
            transient[STAGE_OF[name]] += sizes.of(name)
            moved += sizes.of(name)
    if modes["t5"] == "stream":  # the non-layer part is loaded like an offloaded component
        t5_other = sizes.t5 - sum(sizes.t5_blocks)
        transient["text"] += t5_other + num_slots * max(sizes.t5_blocks)
        moved += t5_other + sum(sizes.t5_blocks) * text_passes
    plan = MemoryPlan(budget, dict(modes), {}, 0, num_slots=num_slots, sizes=sizes, passes=passes)
    if modes["dit"] == "stream":
        permanent += sizes.dit_other
        worst = max(transient.values())
        if budget is None:
            capacity = minimum_capacity(sizes.dit_blocks, num_slots)
        else:
            capacity = budget - permanent - worst
        try:
            resident = choose_resident(sizes.dit_blocks, capacity, num_slots)
        except BudgetError:
            return None
        streamed = tuple(i for i in range(len(sizes.dit_blocks)) if i not in set(resident))
        if not streamed:
            return None  # that is the resident mode
        slots = num_slots * max(sizes.dit_blocks[i] for i in streamed)
        permanent += sum(sizes.dit_blocks[i] for i in resident) + slots
        moved += sum(sizes.dit_blocks[i] for i in streamed) * passes
        plan.dit_resident_blocks, plan.dit_streamed_blocks = tuple(resident), streamed
        plan.dit_block_capacity = capacity
    plan.stage_peaks = {stage: permanent + transient[stage] for stage in STAGES}
    plan.transfer_bytes = moved
    if budget is not None and plan.peak > budget:
        return None
    return plan


def plan_memory(
    sizes: ComponentSizes,
    budget: int | None,
    *,
    reserves: StageReserves | None = None,
    num_slots: int = DEFAULT_SLOTS,
    passes: int = 20,
    text_passes: int = 1,
) -> MemoryPlan:
    """The placement with the fewest bytes copied per image whose every stage fits ``budget`` bytes.

    ``passes`` is the number of DiT forward passes per image (steps, doubled with true CFG) and
    ``text_passes`` the number of T5 calls (2 with a negative prompt). ``budget=None`` gives the
    plan with the lowest peak (what ``--aggressive_offload`` uses), and within that peak the
    fewest copies. Raises :class:`BudgetError` when nothing fits.
    """
    reserves = reserves if reserves is not None else StageReserves()
    choices = {name: ["resident", "offload"] for name in COMPONENTS}
    choices["dit"].append("stream")
    if sizes.t5_blocks:
        choices["t5"].append("stream")
    options = dict(reserves=reserves, num_slots=num_slots, passes=passes, text_passes=text_passes)
    plans = []
    for combination in itertools.product(*(choices[name] for name in COMPONENTS)):
        modes = dict(zip(COMPONENTS, combination, strict=True))
        plan = evaluate_plan(sizes, modes, budget, **options)
        if plan is not None:
            plans.append(plan)
    if not plans:
        smallest = plan_memory(sizes, None, **options)
        raise BudgetError(
            f"a VRAM budget of {_gb(budget)} ({budget:,} bytes) is too small: the smallest plan needs "
            f"{_gb(smallest.peak)} ({smallest.peak:,} bytes)"
        )
    if budget is None:  # the lowest peak, then the best use of it (e.g. more resident DiT blocks)
        return plan_memory(sizes, min(p.peak for p in plans), **options)
    return min(plans, key=lambda p: (p.transfer_bytes, p.peak))


def all_modes(mode: str) -> dict[str, str]:
    return dict.fromkeys(COMPONENTS, mode)


def plan_from_flags(
    sizes: ComponentSizes,
    *,
    vram_budget_gb: float | None = None,
    offload: bool = False,
    aggressive_offload: bool = False,
    reserves: StageReserves | None = None,
    passes: int = 20,
) -> MemoryPlan:
    """The plan the command-line flags ask for.

    ``--vram_budget GB`` (GiB) wins; otherwise ``--aggressive_offload`` takes the smallest plan
    (every component offloaded, T5 and the DiT streamed with as few resident blocks as fit the
    slots); otherwise ``--offload`` keeps each whole component on the device only during its stage
    (the official behaviour); with no flag everything is resident.
    """
    if vram_budget_gb is not None:
        return plan_memory(sizes, int(vram_budget_gb * GiB), reserves=reserves, passes=passes)
    if aggressive_offload:
        return plan_memory(sizes, None, reserves=reserves, passes=passes)
    plan = evaluate_plan(
        sizes, all_modes("offload" if offload else "resident"), reserves=reserves, passes=passes
    )
    assert plan is not None  # no budget: always evaluates
    return plan
