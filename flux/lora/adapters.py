"""LoRA on the FLUX DiT, two ways, with the base weights exactly as loaded after every request.

:class:`LoRAAdapters` wraps a model once, when the pipeline is built (before ``torch.compile``),
and :meth:`LoRAAdapters.applied` puts a request's LoRAs on it for the duration of a ``with``
block, also undoing them on an error or a cancel. Each adapted Linear gets one of:

- **merged**: ``W <- W + sum strength * alpha/rank * up @ down`` (summed in float32, rounded once
  to the weight's dtype; an fp8 layer requantises its dequantised weight plus the update), after
  copying the weight (and fp8 scales) aside on its own device; at the end the copies are put
  back, so the weights are bit for bit what they were. No step costs anything extra; each request
  pays the merge and the restore. Used where the layer is on the compute device and the copies fit
  in free device memory (resident bf16 or fp8, compiled or not).
- **side path**: a forward hook adds ``(x @ down.T) @ up.T`` to the layer's output; nothing of the
  layer is written. Used where merging cannot be done or undone cheaply: quanto layers, weights
  streamed from host memory under a VRAM budget or offloaded, and when the copies would not fit.
  The update stays in the compute dtype (bf16 beside fp8 codes). Costs two thin matmuls and a
  pass over the layer's output per step (BENCHMARKS.md).

The hooks are installed once, up front, because torch.compile ignores hooks added after it has
traced a block; an empty slot returns the layer's output untouched. Several LoRAs on one layer are
stacked into one pair of factors (ranks add up, padded to a few sizes, :func:`rank_bucket`); each
LoRA's strength is folded into the stacked ``down`` in place, so changing only strengths keeps
compiled graphs (and merging writes weights, which compiled graphs read as inputs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux.lora.layouts import LoRAError, LowRank, lora_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveLoRA:
    """One LoRA of a request: its updates (on official module names) and its strength."""

    name: str
    layers: dict[str, LowRank]
    strength: float


MIN_RANK_BUCKET = 16


def rank_bucket(rank: int) -> int:
    """The stacked rank a layer's factors are padded to: a power of two, at least 16.

    Compiled blocks keep one graph per set of factor shapes; padding the summed rank of a
    request's LoRAs to a few sizes lets LoRAs of other ranks (and other combinations) reuse the
    graphs already made instead of compiling new ones. Padding costs at most twice the side
    path's (small) work; the zero rows and columns change no value.
    """
    return max(MIN_RANK_BUCKET, 1 << (rank - 1).bit_length())


class _Slot:
    """The side path of one Linear; empty (``factors is None``) leaves the layer's output as it is.

    ``factors``: ``down`` with each rank row already multiplied by its scale (strength x alpha /
    rank), and ``up``; two kernels per layer: ``h = x @ down.T``, then ``out + h @ up.T`` as one addmm.
    """

    __slots__ = ("factors",)

    def __init__(self) -> None:
        self.factors: tuple[Tensor, Tensor] | None = None

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        factors = self.factors
        if factors is None:
            return None
        down, up = factors
        x = args[0]
        side = x.reshape(-1, x.shape[-1]).to(down.dtype) @ down.t()
        flat = output.reshape(-1, output.shape[-1])
        if flat.dtype != up.dtype:
            return output + (side @ up.t()).to(output.dtype).view(output.shape)
        # One kernel for the second product and the sum; nothing here breaks a compiled graph.
        return torch.addmm(flat, side, up.t()).view(output.shape)


MERGE_HEADROOM = 2 * 2**30  # device memory left free beside the weights' copies when merging


class LoRAAdapters:
    """The LoRA slots of one model. ``device``/``dtype``: where and in what the factors compute
    (the device the model runs on, its compute dtype: bf16 for the real DiT)."""

    def __init__(self, model: nn.Module, device: torch.device | str, dtype: torch.dtype):
        self.targets = lora_targets(model)
        self.device = _normalised(torch.device(device))
        self.dtype = dtype
        self.last_mode = "none"  # how the last request's LoRAs were applied (for its metadata)
        self._slots: dict[str, _Slot] = {}
        self._hooks = []
        modules = dict(model.named_modules())
        self._modules = {name: modules[name] for name in self.targets}
        for name in self.targets:
            slot = _Slot()
            self._slots[name] = slot
            self._hooks.append(modules[name].register_forward_hook(slot))
        # The factors of the last set of LoRAs, kept so that the same LoRAs at other strengths
        # reuse them (only the scale vectors change, in place).
        self._cached_layers: list[dict] = []  # held, so the identities in the key stay unique
        self._cached_skip: frozenset = frozenset()
        # name -> (down, scaled down, up, scale, where each LoRA's scale sits)
        self._cached: dict[str, tuple[Tensor, Tensor, Tensor, Tensor, list[tuple[int, Tensor | None]]]] = {}
        self._active = False

    def close(self) -> None:
        """Remove the hooks (the model is then exactly as it was before :class:`LoRAAdapters`)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._cached.clear()
        self._cached_layers = []

    def check(self, lora: ActiveLoRA) -> None:
        """Raise :class:`LoRAError` if ``lora`` names a layer this model does not have."""
        missing = [name for name in lora.layers if name not in self._slots]
        if missing:
            raise LoRAError(f"LoRA {lora.name}: no layer {missing[0]!r} in this model.")

    @contextlib.contextmanager
    def applied(self, loras: Sequence[ActiveLoRA], *, merge: bool = True) -> Iterator[None]:
        """The model with ``loras`` (at their strengths) for the ``with`` block, then exactly as
        before. ``merge=False`` keeps every layer on the side path (memory placements ask this:
        their weights are not resident, and a copy would break their budget)."""
        if self._active:
            raise RuntimeError("LoRAs are already applied: one request at a time")
        loras = [lora for lora in loras if lora.strength != 0.0]
        if not loras:
            self.last_mode = "none"
            yield
            return
        for lora in loras:
            self.check(lora)
        names = sorted({name for lora in loras for name in lora.layers})
        merged = self._mergeable(names) if merge else []
        backups: dict[str, dict[str, Tensor]] = {}
        self._active = True
        try:
            with torch.inference_mode(False), torch.no_grad():
                for name in merged:
                    self._merge(name, loras, backups)
            skip = frozenset(merged)
            if len(skip) < len(names):
                self._fill(loras, skip)
            else:  # all merged: side-path factors of an earlier request would only hold memory
                self.release()
            self.last_mode = (
                "merged" if len(skip) == len(names) else "side path" if not skip else "merged + side path"
            )
            yield
        finally:
            for slot in self._slots.values():
                slot.factors = None
            with torch.inference_mode(False), torch.no_grad():
                for name, originals in backups.items():
                    for key, original in originals.items():
                        getattr(self._modules[name], key).copy_(original)  # the very bits that were there
            backups.clear()
            self._active = False

    def _mergeable(self, names: Sequence[str]) -> list[str]:
        """The layers whose update can go into the weight: plain Linear weights and layers that
        requantise an update themselves (fp8), on the compute device; all of them or none, when
        the copies of their weights fit in free device memory."""
        plain = [
            name
            for name in names
            if _merge_kind(self._modules[name]) is not None
            and _normalised(self._modules[name].weight.device) == self.device
        ]
        if not plain or self.device.type != "cuda":
            return plain
        need = sum(t.nbytes for name in plain for t in _weights(self._modules[name]).values())
        largest = max(self._modules[name].weight.numel() for name in plain) * 8  # float32 sums
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if need + largest + MERGE_HEADROOM > free:
            logger.info(
                "LoRA: %.1f GiB of weight copies would not fit in %.1f GiB free: side path instead",
                need / 2**30,
                free / 2**30,
            )
            return []
        return plain

    def _merge(self, name: str, loras: Sequence[ActiveLoRA], backups: dict) -> None:
        module = self._modules[name]
        backups[name] = {key: tensor.detach().clone() for key, tensor in _weights(module).items()}
        weight = module.weight
        wide = torch.float64 if weight.dtype == torch.float64 else torch.float32  # fp8 codes too
        delta = torch.zeros(weight.shape, device=weight.device, dtype=wide)
        for lora in loras:
            update = lora.layers.get(name)
            if update is not None:
                up = update.up.to(self.device, wide) * (update.scale.to(self.device, wide) * lora.strength)
                delta.addmm_(up, update.down.to(self.device, wide))
        if _merge_kind(module) == "requantise":
            module.add_to_weight(delta)
        else:
            weight.copy_(weight.to(wide) + delta)  # rounded once to the weight's dtype

    def factor_bytes(self) -> int:
        """Device memory the factors of the last set of LoRAs take."""
        return sum(sum(t.nbytes for t in entry[:4]) for entry in self._cached.values())

    def release(self) -> None:
        """Free the side path's factors kept for the next request (memory placements call this
        after each request)."""
        for slot in self._slots.values():
            slot.factors = None
        self._cached.clear()
        self._cached_layers = []

    @staticmethod
    def factor_bytes_of(loras: Sequence[ActiveLoRA], dtype: torch.dtype) -> int:
        """Device memory :meth:`applied` would take for ``loras`` (before making anything)."""
        size = torch.empty((), dtype=dtype).element_size()
        ranks: dict[str, int] = {}
        shapes: dict[str, tuple[int, int]] = {}
        for lora in loras:
            for name, update in lora.layers.items():
                ranks[name] = ranks.get(name, 0) + update.rank
                shapes[name] = (update.down.shape[1], update.up.shape[0])
        total = 0
        for name, rank in ranks.items():
            padded = rank_bucket(rank)
            in_features, out_features = shapes[name]
            total += (2 * in_features + out_features + 1) * padded * size
        return total

    def _fill(self, loras: Sequence[ActiveLoRA], skip: frozenset = frozenset()) -> None:
        """Side-path factors for every layer of ``loras`` not in ``skip`` (merged ones)."""
        same = (
            self._cached_skip == skip
            and len(self._cached_layers) == len(loras)
            and all(held is lora.layers for held, lora in zip(self._cached_layers, loras, strict=True))
        )
        # Normal tensors, not inference ones, whether or not the caller is in inference mode.
        with torch.inference_mode(False), torch.no_grad():
            if not same:
                self._cached.clear()  # free the previous set's factors before making the new ones
                self._cached_layers = []
                self._cached = self._stack(loras, skip)
                self._cached_layers = [lora.layers for lora in loras]
                self._cached_skip = skip
            strengths = [lora.strength for lora in loras]
            for name, (down, scaled, up, scale, pieces) in self._cached.items():
                for (start, base), strength in zip(pieces, strengths, strict=True):
                    if base is not None:
                        scale[start : start + base.numel()].copy_(base * strength)
                torch.mul(down, scale[:, None], out=scaled)  # in place: compiled graphs stay valid
                self._slots[name].factors = (scaled, up)

    def _stack(self, loras: Sequence[ActiveLoRA], skip: frozenset) -> dict:
        """Per layer: the LoRAs' factors stacked on the device, and where each LoRA's scale sits."""
        stacked = {}
        names = sorted({name for lora in loras for name in lora.layers} - skip)
        for name in names:
            downs, ups, bases, pieces, start = [], [], [], [], 0
            for lora in loras:
                update = lora.layers.get(name)
                if update is None:
                    pieces.append((start, None))
                    continue
                downs.append(update.down)
                ups.append(update.up)
                base = update.scale.to(self.device, torch.float32)
                bases.append(base)
                pieces.append((start, base))
                start += update.rank
            padded = rank_bucket(start)  # zero rows and columns add exactly nothing
            down = torch.zeros(padded, downs[0].shape[1], device=self.device, dtype=self.dtype)
            up = torch.zeros(ups[0].shape[0], padded, device=self.device, dtype=self.dtype)
            down[:start] = torch.cat(downs).to(self.device, self.dtype)
            up[:, :start] = torch.cat(ups, dim=1).to(self.device, self.dtype)
            scale = torch.zeros(padded, device=self.device, dtype=self.dtype)
            stacked[name] = (down, torch.empty_like(down), up, scale, pieces)
        logger.info(
            "LoRA factors for %d layers: %.1f MiB on %s",
            len(stacked),
            sum(sum(t.nbytes for t in entry[:4]) for entry in stacked.values()) / 2**20,
            self.device,
        )
        return stacked


def _normalised(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``, so weights and slots compare equal on the same GPU."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _merge_kind(module: nn.Module) -> str | None:
    """How an update goes into this layer's weight: "add" (a float weight), "requantise" (a layer
    that requantises ``dequantized + update`` itself, such as fp8), or None (side path only)."""
    if type(module) is nn.Linear and module.weight.is_floating_point():
        return "add"
    if callable(getattr(module, "add_to_weight", None)):
        return "requantise"
    return None


def _weights(module: nn.Module) -> dict[str, Tensor]:
    """The tensors a merge changes (and a restore puts back): the weight and, if any, its scales."""
    found = {"weight": module.weight}
    scale = getattr(module, "weight_scale", None)
    if isinstance(scale, Tensor):
        found["weight_scale"] = scale
    return found
