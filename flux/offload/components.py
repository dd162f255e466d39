"""Whole components (text encoders, ID encoder models, DiT, autoencoder) on the device only while used.

Each component (one module or a group of modules) is packed once into a host buffer (page-locked
on CUDA) and bound to it. ``with offload.on_device(t5): ...`` copies it into a fresh device buffer,
binds it there for the block, and on exit binds it back to the host copy and frees the device
buffer: weights are read-only during inference, so nothing is copied back.

:meth:`ComponentOffload.prefetch` starts the copy of the *next* component on the copy stream while
the current one still computes; the ``on_device`` that follows only makes the compute stream wait
for that copy. Call it at the start of the current block, before its work is issued::

    with offload.on_device(pipeline.t5, pipeline.clip):
        offload.prefetch(pipeline.id_encoder.eva)   # overlaps the text encoders
        ...encode the prompts...
    with offload.on_device(pipeline.id_encoder.eva): # waits only for the copy
        ...

Both components are then on the device together, and the ledger counts both. Components added with
``resident=True`` are placed once and stay; ``on_device`` on them does nothing, so callers can
wrap every stage the same way whatever the memory plan.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux.offload.layout import FlatLayout
from flux.offload.transfer import DeviceLedger, Event, Transfer, default_transfer

Component = nn.Module | Iterable[nn.Module]


@dataclass(eq=False)
class _Managed:
    name: str
    layout: FlatLayout
    resident: bool
    home: Tensor | None = None  # host copy; None for resident components
    device: Tensor | None = None  # device copy while loaded or loading
    loaded: Event = None  # copy event not yet waited for by the compute stream
    users: int = 0  # open on_device blocks


class ComponentOffload:
    """Moves registered components between host memory and ``device`` as they are used."""

    def __init__(
        self,
        device: torch.device | str,
        *,
        transfer: Transfer | None = None,
        ledger: DeviceLedger | None = None,
    ):
        self.device = torch.device(device)
        self.transfer = transfer if transfer is not None else default_transfer(self.device)
        self.ledger = ledger if ledger is not None else DeviceLedger()
        self._managed: dict[tuple[int, ...], _Managed] = {}
        self._owner_of: dict[int, tuple[int, ...]] = {}  # id(tensor) -> component key

    @staticmethod
    def _key(component: Component) -> tuple[int, ...]:
        modules = [component] if isinstance(component, nn.Module) else list(component)
        return tuple(id(m) for m in modules)

    def add(
        self,
        component: Component,
        *,
        name: str | None = None,
        resident: bool = False,
        exclude: Iterable[nn.Module] = (),
    ) -> None:
        """Take charge of ``component``: pack it into host memory, or onto the device if ``resident``.

        The weights of ``exclude`` (e.g. blocks a :class:`~flux.offload.blocks.StreamedBlocks`
        manages) are left alone.
        """
        key = self._key(component)
        if key in self._managed:
            raise ValueError(f"{self._managed[key].name} is already managed")
        modules = [component] if isinstance(component, nn.Module) else list(component)
        layout = FlatLayout(modules, exclude)
        for tensor in layout.tensors:
            if id(tensor) in self._owner_of:
                other = self._managed[self._owner_of[id(tensor)]].name
                raise ValueError(f"a weight of {name or modules} is already managed as part of {other}")
        managed = _Managed(name or "+".join(type(m).__name__ for m in modules), layout, resident)
        if resident:
            self.ledger.allocate(managed, layout.nbytes)
            managed.device = self.transfer.device_buffer(layout.nbytes)
            layout.pack(managed.device)
        else:
            managed.home = self.transfer.host_buffer(layout.nbytes)
            layout.pack(managed.home)
        self._managed[key] = managed
        for tensor in layout.tensors:
            self._owner_of[id(tensor)] = key

    def _get(self, component: Component) -> _Managed:
        key = self._key(component)
        if key not in self._managed:
            self.add(component)
        return self._managed[key]

    def _start_copy(self, managed: _Managed) -> None:
        if managed.device is not None:
            return
        self.ledger.allocate(managed, managed.layout.nbytes)
        managed.device = self.transfer.device_buffer(managed.layout.nbytes)
        allocated = self.transfer.record(label=managed.name)
        managed.loaded = self.transfer.copy(managed.device, managed.home, after=allocated, label=managed.name)

    def prefetch(self, *components: Component) -> None:
        """Start copying ``components`` to the device now; they stay there until used and released."""
        for component in components:
            self._start_copy(self._get(component))

    def load(self, *components: Component | None) -> None:
        """Bring ``components`` to the device (waiting for their copies) until a matching :meth:`unload`.

        ``None`` entries are skipped, so a pipeline without some component needs no special case.
        """
        held = [self._get(c) for c in components if c is not None]
        for managed in held:  # issue every copy before waiting for any
            self._start_copy(managed)
        for managed in held:
            self.transfer.wait(managed.loaded)
            managed.loaded = None
            managed.layout.bind(managed.device)
            managed.users += 1

    def unload(self, *components: Component | None) -> None:
        """End one :meth:`load`; a component no longer loaded by anyone goes back to host memory."""
        for component in components:
            if component is None:
                continue
            managed = self._get(component)
            if managed.users == 0:
                raise RuntimeError(f"{managed.name} is not loaded")
            managed.users -= 1
            if managed.users == 0:
                self._release(managed)

    @contextlib.contextmanager
    def on_device(self, *components: Component | None) -> Iterator[None]:
        """Hold ``components`` on the device for the block (``None`` entries are skipped)."""
        self.load(*components)
        try:
            yield
        finally:
            self.unload(*components)

    def offload(self, *components: Component) -> None:
        """Drop the device copy of components not in use (e.g. a prefetch that turned out unneeded)."""
        for component in components:
            managed = self._get(component)
            if managed.users:
                raise RuntimeError(f"{managed.name} is in use")
            self._release(managed)

    def _release(self, managed: _Managed) -> None:
        if managed.resident or managed.device is None:
            return
        self.transfer.wait(managed.loaded)  # a copy never waited for must finish before the free
        managed.loaded = None
        managed.layout.bind(managed.home)
        managed.device = None
        self.ledger.release(managed)

    def is_on_device(self, component: Component) -> bool:
        """Whether the component's weights currently read from device memory."""
        managed = self._managed.get(self._key(component))
        return managed is not None and managed.device is not None and managed.layout.bound_to(managed.device)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._managed.values()]

    def close(self) -> None:
        """Give every managed weight its own memory where it was before, and forget the components."""
        self.transfer.synchronize()
        for managed in self._managed.values():
            if not managed.resident:
                managed.layout.bind(managed.home)
            managed.layout.restore()
            if managed.device is not None:
                self.ledger.release(managed)
            if managed.home is not None:
                self.transfer.free_host_buffer(managed.home)
        self._managed.clear()
        self._owner_of.clear()

    def __enter__(self) -> ComponentOffload:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
