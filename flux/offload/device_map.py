"""Several GPUs of one host: which device runs each stage of a pipeline (``--devices``).

A pipeline declares its stages (text, id, denoise, decode for PuLID-FLUX) and which components run
in each (:mod:`flux.offload.structure`). A :class:`DeviceMap` puts every stage on one device, so
each component lives on its stage's device and only a stage's results cross between devices, once
per stage (the prompt's embeddings, the ID tokens, the finished latents). Each device gets its own
memory plan from the same policy (a ``--vram_budget`` is per GPU), over its own stages and
components only.

Before anything loads, :func:`check_device_map` refuses a map that cannot be honoured (a device
that does not exist, a GPU whose free memory is less than its plan's peak), with the whole plan
as a table and the reason, instead of a CUDA error halfway through loading.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from flux.devices import HardwareError, resolve_device
from flux.offload.plan import GiB, MemoryPlan
from flux.offload.structure import ComponentSize, Stage


@dataclass(frozen=True)
class DeviceMap:
    """The device of each stage, in the pipeline's stage order."""

    stages: dict[str, torch.device]

    @classmethod
    def single(cls, device: torch.device | str, stages: Sequence[Stage]) -> DeviceMap:
        """Every stage on ``device`` (the usual one-GPU case)."""
        return cls({stage.name: torch.device(device) for stage in stages})

    @classmethod
    def parse(cls, text: str, stages: Sequence[Stage], main: str = "denoise") -> DeviceMap:
        """``--devices`` as given: ``cuda:0,cuda:1`` puts the ``main`` stage (the DiT) on the first
        device and every other stage on the second; ``denoise=cuda:0,text=cuda:1,...`` names
        stages, and a stage left out goes with ``main``. Devices are checked later, by
        :func:`check_device_map`."""
        names = [stage.name for stage in stages]
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise HardwareError(
                "--devices is empty: give two devices (cuda:0,cuda:1) or a map (denoise=cuda:0,...)"
            )
        named = [part for part in parts if "=" in part]
        if named and len(named) != len(parts):
            raise HardwareError(
                f"--devices {text}: give either devices (cuda:0,cuda:1) or stage=device pairs, not both"
            )
        if not named:
            if len(parts) > 2:
                raise HardwareError(
                    f"--devices {text}: with more than two devices, say which stage goes where: "
                    f"{','.join(f'{name}=...' for name in names)}"
                )
            first, rest = _device(parts[0], text), _device(parts[-1], text)
            return cls({name: first if name == main else rest for name in names})
        chosen: dict[str, torch.device] = {}
        for part in named:
            stage, _, device = part.partition("=")
            stage = stage.strip()
            if stage not in names:
                raise HardwareError(
                    f"--devices {text}: no stage {stage!r}; the stages are {', '.join(names)}"
                )
            if stage in chosen:
                raise HardwareError(f"--devices {text}: the stage {stage} is named twice")
            chosen[stage] = _device(device.strip(), text)
        if main not in chosen:
            raise HardwareError(f"--devices {text}: say where the {main} stage runs ({main}=cuda:N)")
        return cls({name: chosen.get(name, chosen[main]) for name in names})

    def device_of(self, stage: str) -> torch.device:
        """Where ``stage`` runs."""
        return self.stages[stage]

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, in the order their first stage runs."""
        seen: list[torch.device] = []
        for device in self.stages.values():
            if device not in seen:
                seen.append(device)
        return seen

    def stages_on(self, device: torch.device) -> list[str]:
        """The stages that run on ``device``, in pipeline order."""
        return [name for name, where in self.stages.items() if where == device]

    def split(
        self, sizes: Sequence[ComponentSize], stages: Sequence[Stage]
    ) -> dict[torch.device, tuple[tuple[ComponentSize, ...], tuple[Stage, ...]]]:
        """Each device's components and stages, for its own memory plan."""
        parts = {}
        for device in self.devices:
            on = set(self.stages_on(device))
            parts[device] = (
                tuple(size for size in sizes if size.stage in on),
                tuple(stage for stage in stages if stage.name in on),
            )
        return parts

    def __str__(self) -> str:
        return ", ".join(f"{stage}={device}" for stage, device in self.stages.items())


def _device(name: str, text: str) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, TypeError):
        raise HardwareError(f"--devices {text}: {name!r} is not a device (cuda:N or cpu)") from None


def plan_table(device_map: DeviceMap, plans: Mapping[torch.device, MemoryPlan], free: Mapping) -> str:
    """The whole placement as one table: per device, its stages, components, peak and free memory."""
    rows = [("device", "stages", "components", "peak", "free now")]
    for device in device_map.devices:
        plan = plans[device]
        components = ", ".join(
            name + ("" if mode == "resident" else f" ({mode})") for name, mode in plan.modes.items()
        )
        room = free.get(device)
        rows.append(
            (
                str(device),
                ", ".join(device_map.stages_on(device)),
                components,
                f"{plan.peak / GiB:.2f} GiB",
                "-" if room is None else f"{room / GiB:.2f} GiB",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(width) if i < 3 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device now (None for the CPU, whose memory is not planned here)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free


def check_device_map(
    device_map: DeviceMap,
    plans: Mapping[torch.device, MemoryPlan],
    free: Callable[[torch.device], int | None] = free_memory,
) -> str:
    """Refuse a map this machine cannot honour; returns the plan table for the log.

    Each device must exist (:func:`~flux.devices.resolve_device`) and each GPU must have its plan's
    peak free now. The error holds the table and every reason at once.
    """
    problems = []
    for device in device_map.devices:
        try:
            resolve_device(device)
        except HardwareError as err:
            problems.append(str(err))
    if problems:  # free memory cannot be asked of a device that does not exist
        raise _refusal(device_map, problems, plan_table(device_map, plans, {}))
    room = {device: free(device) for device in device_map.devices}
    for device in device_map.devices:
        need, have = plans[device].peak, room[device]
        if have is not None and need > have:
            stages = ", ".join(device_map.stages_on(device))
            problems.append(
                f"{device} needs {need / GiB:.2f} GiB for {stages} and has {have / GiB:.2f} GiB free: "
                "move a stage to another GPU, give a --vram_budget for each GPU, or free that GPU"
            )
    table = plan_table(device_map, plans, room)
    if problems:
        raise _refusal(device_map, problems, table)
    return table


def _refusal(device_map: DeviceMap, problems: list[str], table: str) -> HardwareError:
    return HardwareError(f"--devices {device_map}:\n" + "\n".join(f"- {p}" for p in problems) + "\n" + table)
