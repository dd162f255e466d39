"""All weights of a module packed into one flat byte buffer, and rebound between such buffers.

Why one buffer: a block then moves with a single large copy (the fastest kind of host-to-device
transfer), a device slot is one allocation of a known size, and pointing the module at another
copy is a loop of ``tensor.data = view`` with no allocation. The parameter and buffer objects stay
the same Python objects throughout, so anything holding them (the state dict, hooks) keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ALIGNMENT = 256  # bytes; keeps every view as aligned as a fresh allocation (64 B on CPU, 256 B on CUDA)


def module_tensors(modules: Iterable[nn.Module], exclude: Iterable[nn.Module] = ()) -> list[Tensor]:
    """Parameters then buffers of ``modules``, each once (tied weights appear once), minus those of
    ``exclude`` (e.g. a model without its streamed blocks)."""
    skip = {id(t) for module in exclude for t in [*module.parameters(), *module.buffers()]}
    seen: dict[int, Tensor] = {}
    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            if id(tensor) not in skip:
                seen.setdefault(id(tensor), tensor)
    return list(seen.values())


def tensor_bytes(modules: Iterable[nn.Module]) -> int:
    """Unpadded bytes of the weights (works on the meta device, for planning)."""
    return sum(t.numel() * t.element_size() for t in module_tensors(modules))


@dataclass
class _Entry:
    tensor: Tensor
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    device: torch.device  # where it was before packing, restored by :meth:`FlatLayout.restore`
    pinned: bool


class FlatLayout:
    """Offsets of every tensor of some modules inside one buffer of :attr:`nbytes` bytes."""

    def __init__(self, modules: nn.Module | Iterable[nn.Module], exclude: Iterable[nn.Module] = ()):
        modules = [modules] if isinstance(modules, nn.Module) else list(modules)
        self.entries: list[_Entry] = []
        offset = 0
        for tensor in module_tensors(modules, exclude):
            nbytes = tensor.numel() * tensor.element_size()
            pinned = tensor.device.type == "cpu" and torch.cuda.is_available() and tensor.is_pinned()
            self.entries.append(
                _Entry(tensor, offset, nbytes, tensor.dtype, tensor.shape, tensor.device, pinned)
            )
            offset += -(-nbytes // ALIGNMENT) * ALIGNMENT
        self.nbytes = offset

    @property
    def tensors(self) -> list[Tensor]:
        return [e.tensor for e in self.entries]

    def _view(self, buffer: Tensor, entry: _Entry) -> Tensor:
        return buffer[entry.offset : entry.offset + entry.nbytes].view(entry.dtype).view(entry.shape)

    def pack(self, buffer: Tensor) -> None:
        """Copy the tensors' current values into ``buffer`` (synchronously) and bind them to it."""
        self._check(buffer)
        for entry in self.entries:
            view = self._view(buffer, entry)
            view.copy_(entry.tensor.data)
            entry.tensor.data = view

    def bind(self, buffer: Tensor) -> None:
        """Point every tensor at its bytes in ``buffer``; no data moves."""
        self._check(buffer)
        for entry in self.entries:
            entry.tensor.data = self._view(buffer, entry)

    def bound_to(self, buffer: Tensor) -> bool:
        """Whether every tensor currently reads its bytes from ``buffer``."""
        return all(
            e.tensor.device == buffer.device
            and (not e.nbytes or e.tensor.data_ptr() == buffer.data_ptr() + e.offset)
            for e in self.entries
        )

    @torch.inference_mode(False)
    def restore(self) -> None:
        """Give every tensor its own memory again, on the device (and pinning) it had before packing."""
        for entry in self.entries:
            data = entry.tensor.data
            if entry.device.type == "cpu":
                fresh = torch.empty(entry.shape, dtype=entry.dtype, pin_memory=entry.pinned)
                fresh.copy_(data)
            else:
                fresh = data.to(entry.device, copy=True)
            entry.tensor.data = fresh

    def _check(self, buffer: Tensor) -> None:
        if buffer.dtype != torch.uint8 or buffer.ndim != 1 or buffer.numel() < self.nbytes:
            raise ValueError(f"need a flat uint8 buffer of at least {self.nbytes} bytes")
