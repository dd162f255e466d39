"""Where weight bytes live and how they move: host buffers, device buffers, copies and events.

Everything the offloaders do to memory goes through a :class:`Transfer`, so the scheduling code is
the same on every device: :class:`CudaTransfer` copies on a side CUDA stream from page-locked host
memory and orders the streams with events; :class:`SyncTransfer` (CPU, or any device without
streams) copies at once and its events are ``None``. Tests subclass the latter to log or to delay
copies. :class:`DeviceLedger` counts the bytes placed on the device, so a budget is checked by
arithmetic rather than by reading an allocator that a CPU test does not have.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import Tensor

from flux.errors import UserError

logger = logging.getLogger(__name__)

Event = Any  # an opaque token: a torch.cuda.Event, None, or whatever a test transfer makes

# Buffers are made outside inference mode even when a generation allocates them lazily: weights
# bound to inference tensors could not be copied into or used normally after the generation.
normal_tensors = torch.inference_mode(False)


class BudgetError(UserError, ValueError):
    """The weights that must be on the device do not fit the byte budget; the message says by how much."""


class DeviceLedger:
    """The bytes this package holds on the device, by owner, with the peak since creation.

    Why: the budget is a promise about bytes we allocate (slots, resident blocks, loaded
    components); counting them is exact on any device, unlike allocator statistics, which also
    include activations and are absent on a CPU.
    """

    def __init__(self, limit: int | None = None):
        self.limit = limit
        self.entries: dict[object, int] = {}
        self.current = 0
        self.peak = 0

    def allocate(self, owner: object, nbytes: int) -> None:
        if owner in self.entries:
            raise KeyError(f"{owner!r} already holds device memory")
        if self.limit is not None and self.current + nbytes > self.limit:
            raise BudgetError(
                f"placing {nbytes:,} more bytes would hold {self.current + nbytes:,} bytes on the device, "
                f"over the limit of {self.limit:,}"
            )
        self.entries[owner] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def release(self, owner: object) -> None:
        self.current -= self.entries.pop(owner)


class Transfer(Protocol):
    """The memory operations the offloaders need; one implementation per kind of device."""

    device: torch.device

    def host_buffer(self, nbytes: int) -> Tensor:
        """A uint8 CPU buffer that copies to the device can read asynchronously (pinned on CUDA)."""
        ...

    def free_host_buffer(self, buffer: Tensor) -> None: ...

    def device_buffer(self, nbytes: int) -> Tensor:
        """A uint8 buffer on the device, allocated on the compute stream."""
        ...

    def record(self, label: object = None) -> Event:
        """An event at the current point of the compute stream."""
        ...

    def copy(self, dst: Tensor, src: Tensor, after: Event, label: object = None) -> Event:
        """Issue ``dst.copy_(src)`` on the copy stream once ``after`` has happened; its completion event."""
        ...

    def wait(self, event: Event) -> None:
        """Make the compute stream wait for ``event`` (``None``: nothing to wait for)."""
        ...

    def synchronize(self) -> None:
        """Block the host until every copy and all compute issued so far are done."""
        ...


class SyncTransfer:
    """Copies happen when issued, so there is nothing to order: events are ``None``.

    The "device" buffers are distinct allocations on ``device`` (the CPU in tests), so weights do
    move between buffers and the tests see the same bindings, bytes and order as on a GPU.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @normal_tensors
    def host_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def free_host_buffer(self, buffer: Tensor) -> None:
        pass

    @normal_tensors
    def device_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def record(self, label: object = None) -> Event:
        return None

    def copy(self, dst: Tensor, src: Tensor, after: Event, label: object = None) -> Event:
        dst.copy_(src)
        return None

    def wait(self, event: Event) -> None:
        pass

    def synchronize(self) -> None:
        pass


class CudaTransfer:
    """Host-to-device copies on a side stream, ordered against the compute stream by CUDA events.

    Host buffers are plain CPU allocations page-locked with ``cudaHostRegister``: PyTorch's pinned
    allocator rounds every request up to a power of two (a 680 MB block would take 1 GiB of
    page-locked memory), registering does not. ``pin="allocator"`` uses ``pin_memory=True`` instead.
    Device buffers are allocated on the compute stream (the stream that frees them), and every copy
    waits for an event recorded after that allocation, so memory the allocator hands back while
    earlier compute kernels may still use it is never written too early.
    """

    def __init__(self, device: torch.device | str = "cuda", pin: str = "register"):
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaTransfer needs a CUDA device, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if pin not in ("register", "allocator"):
            raise ValueError(f"pin must be 'register' or 'allocator', not {pin!r}")
        self.pin = pin
        self.stream = torch.cuda.Stream(self.device)
        self._registered: set[int] = set()

    @normal_tensors
    def host_buffer(self, nbytes: int) -> Tensor:
        if self.pin == "allocator" or nbytes == 0:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        error = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), nbytes, 0))
        if error != 0:  # e.g. a locked-memory limit: fall back to the caching pinned allocator
            logger.warning("cudaHostRegister failed (error %d); using pin_memory for %d bytes", error, nbytes)
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._registered.add(buffer.data_ptr())
        return buffer

    def free_host_buffer(self, buffer: Tensor) -> None:
        """Unregister before the memory is freed; the caller must hold no copy in flight from it."""
        ptr = buffer.data_ptr()
        if ptr in self._registered:
            self._registered.discard(ptr)
            torch.cuda.cudart().cudaHostUnregister(ptr)

    @normal_tensors
    def device_buffer(self, nbytes: int) -> Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def record(self, label: object = None) -> Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: Tensor, src: Tensor, after: Event, label: object = None) -> Event:
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, event: Event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def synchronize(self) -> None:
        self.stream.synchronize()
        torch.cuda.synchronize(self.device)


def default_transfer(device: torch.device | str) -> Transfer:
    """Asynchronous copies on CUDA, synchronous ones elsewhere."""
    device = torch.device(device)
    return CudaTransfer(device) if device.type == "cuda" else SyncTransfer(device)
