"""Run a stack of blocks under a device-memory budget: some resident, the rest streamed in slots.

:class:`StreamedBlocks` wraps the blocks of a model (for FLUX: the 19 double then 38 single
blocks, in execution order) with forward hooks; the model's code does not change. Resident blocks
are packed once into device buffers. Streamed blocks live in host memory (page-locked on CUDA) and
are copied into a small ring of device *slots*, each sized for the largest streamed block:

- before streamed block k runs, the copy of the next ``num_slots - 1`` streamed blocks is issued
  (after the last streamed block of a pass, that is the first ones of the next pass), then the
  compute stream waits for block k's own copy, then the block is bound to its slot;
- after block k runs, an event is recorded on the compute stream and the block is bound back to its
  host copy; the next copy into that slot waits for the event, so a slot is never overwritten
  while the compute stream may still read it.

Which blocks stay resident (:func:`choose_resident`): the largest first. Slots are sized by the
largest *streamed* block, so streaming only small blocks makes the slots cheap (FLUX: two 283 MB
single-block slots instead of two 680 MB double-block slots), and the large blocks (FLUX's double
blocks) move the most bytes per unit of compute, so they are the worst to stream. Within a group
of equal blocks the streamed ones are spread evenly through the order, so that the copy of each
streamed block overlaps the compute of the resident blocks before it instead of queuing behind
a run of other copies.

The weights are treated as read-only (inference): moving a block out is only a rebinding to its
host copy, never a device-to-host copy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flux.offload.layout import FlatLayout
from flux.offload.transfer import BudgetError, DeviceLedger, Event, Transfer, default_transfer

DEFAULT_SLOTS = 2


def _spread(count: int, total: int) -> list[int]:
    """``count`` positions out of ``range(total)``, as evenly spaced as possible."""
    return sorted({int((j + 0.5) * total / count) for j in range(count)}) if count else []


def _greedy_fill(sizes: Sequence[int], candidates: list[int], room: int) -> tuple[list[int], int]:
    """Resident blocks among ``candidates``: largest sizes first, spreading the left-out ones evenly."""
    resident: list[int] = []
    for size in sorted({sizes[i] for i in candidates}, reverse=True):
        group = [i for i in candidates if sizes[i] == size]
        keep = min(len(group), room // size) if size else len(group)
        streamed = {group[p] for p in _spread(len(group) - keep, len(group))}
        chosen = [i for i in group if i not in streamed]
        resident += chosen
        room -= size * len(chosen)
    return sorted(resident), room


def choose_resident(
    sizes: Sequence[int],
    capacity: int,
    num_slots: int = DEFAULT_SLOTS,
    max_resident: int | None = None,
) -> list[int]:
    """Indices of the blocks to keep resident, maximising resident bytes within ``capacity``.

    ``capacity`` pays for the resident blocks plus ``num_slots`` slots of the largest streamed
    block; ``max_resident`` (when given) bounds the resident blocks alone, for a caller whose slots
    exist only part of the time. Every possible largest-streamed size is tried (the blocks above it
    must be resident), and the rest is filled largest first. Raises :class:`BudgetError` when not
    even the slots fit.
    """
    limit = capacity if max_resident is None else min(capacity, max_resident)
    if sum(sizes) <= limit:
        return list(range(len(sizes)))
    best: tuple[int, list[int]] | None = None
    for largest in sorted(set(sizes), reverse=True):
        forced = [i for i, s in enumerate(sizes) if s > largest]
        forced_bytes = sum(sizes[i] for i in forced)
        room = capacity - forced_bytes - num_slots * largest
        if max_resident is not None:
            room = min(room, max_resident - forced_bytes)
        if room < 0:
            continue
        chosen, _ = _greedy_fill(sizes, [i for i, s in enumerate(sizes) if s <= largest], room)
        resident = sorted(forced + chosen)
        if len(resident) == len(sizes):
            continue  # nothing streamed with this slot size: another candidate covers it
        resident_bytes = sum(sizes[i] for i in resident)
        if best is None or resident_bytes > best[0]:
            best = (resident_bytes, resident)
    if best is None:
        raise BudgetError(
            f"{capacity:,} bytes cannot hold the blocks' slots: streaming {len(sizes)} blocks with "
            f"{num_slots} slots needs at least {minimum_capacity(sizes, num_slots):,} bytes"
        )
    return best[1]


def fewest_resident(sizes: Sequence[int], num_slots: int = DEFAULT_SLOTS) -> list[int]:
    """The resident blocks of the smallest footprint that still streams: for each candidate slot
    size, the blocks larger than it must stay; the candidate with the fewest bytes wins."""
    if not sizes:
        return []
    best = min(set(sizes), key=lambda largest: sum(s for s in sizes if s > largest) + num_slots * largest)
    return [i for i, s in enumerate(sizes) if s > best]


def minimum_capacity(sizes: Sequence[int], num_slots: int = DEFAULT_SLOTS) -> int:
    """The fewest bytes :func:`choose_resident` can work with (streaming as much as possible)."""
    if not sizes:
        return 0
    return min(
        sum(sizes),
        *(sum(s for s in sizes if s > largest) + num_slots * largest for largest in set(sizes)),
    )


@dataclass
class _Slot:
    buffer: torch.Tensor
    block: int | None = None  # position in the streamed order of the block it holds
    loaded: Event = None  # copy-stream event: the block's bytes are in the slot
    released: Event = None  # compute-stream event: the last block bound to the slot has run
    stamp: int = -1  # when it was last filled, for least-recently-filled reuse


class StreamedBlocks:
    """Keep ``blocks`` runnable on ``device`` within ``budget_bytes - reserve_bytes`` of weights.

    ``reserve_bytes`` is what the caller keeps for everything else on the device (activations, the
    model's non-block layers). ``resident`` overrides the choice of :func:`choose_resident` (block
    indices). Call :meth:`close` (or use ``with``) to put the model back as it was.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        device: torch.device | str,
        budget_bytes: int,
        reserve_bytes: int = 0,
        *,
        num_slots: int = DEFAULT_SLOTS,
        transfer: Transfer | None = None,
        ledger: DeviceLedger | None = None,
        resident: Iterable[int] | None = None,
    ):
        if num_slots < 1:
            raise ValueError("at least one slot is needed")
        self.blocks = list(blocks)
        self.device = torch.device(device)
        self.transfer = transfer if transfer is not None else default_transfer(self.device)
        self.capacity = budget_bytes - reserve_bytes
        self.layouts = [FlatLayout(block) for block in self.blocks]
        sizes = [layout.nbytes for layout in self.layouts]
        if resident is None:
            resident = choose_resident(sizes, self.capacity, num_slots)
        self.resident = sorted(set(resident))
        self.streamed = [i for i in range(len(self.blocks)) if i not in set(self.resident)]
        self.num_slots = min(num_slots, len(self.streamed))
        self.slot_bytes = max((sizes[i] for i in self.streamed), default=0)
        self.resident_bytes = sum(sizes[i] for i in self.resident)
        planned = self.resident_bytes + self.num_slots * self.slot_bytes
        if planned > self.capacity:
            raise BudgetError(
                f"{len(self.resident)} resident blocks ({self.resident_bytes:,} bytes) and "
                f"{self.num_slots} slots of {self.slot_bytes:,} bytes need {planned:,} bytes; "
                f"the budget leaves {self.capacity:,}"
            )
        self.ledger = ledger if ledger is not None else DeviceLedger(limit=self.capacity)
        self._device_buffers: dict[int, torch.Tensor] = {}  # resident block index -> buffer
        self._homes: dict[int, torch.Tensor] = {}  # streamed block index -> host buffer
        self._slots: list[_Slot] = []
        self._hooks: list = []
        self._clock = 0
        self._closed = False
        self._owner = object()  # this object's entries in a ledger that may be shared
        try:
            self._place()
        except BaseException:
            self.close()
            raise

    # -- setup and teardown ---------------------------------------------------------------------

    def _place(self) -> None:
        for index in self.resident:
            layout = self.layouts[index]
            self.ledger.allocate(("block", self._owner, index), layout.nbytes)
            self._device_buffers[index] = self.transfer.device_buffer(layout.nbytes)
            layout.pack(self._device_buffers[index])
        for index in self.streamed:
            self._homes[index] = self.transfer.host_buffer(self.layouts[index].nbytes)
            self.layouts[index].pack(self._homes[index])
        self._allocate_slots()
        for position, index in enumerate(self.streamed):
            block = self.blocks[index]
            # Hooks stay eager when the block is compiled (flux.compile): they move weights, not math.
            before = torch.compiler.disable(functools.partial(self._before, position))
            after = torch.compiler.disable(functools.partial(self._after, position))
            self._hooks.append(block.register_forward_pre_hook(before))
            self._hooks.append(block.register_forward_hook(after, always_call=True))

    def _allocate_slots(self, first: int = 0) -> None:
        for n in range(self.num_slots):
            self.ledger.allocate(("slot", self._owner, n), self.slot_bytes)
            self._slots.append(_Slot(self.transfer.device_buffer(self.slot_bytes)))
        # The allocator may hand back memory that kernels already queued on the compute stream still
        # read (activations of the stage before): the first copy into each slot waits for this point.
        allocated = self.transfer.record(label="slots")
        for slot in self._slots:
            slot.released = allocated
        if self.streamed:
            self._ensure_loaded(first, protected=set())  # the next pass starts with its copy under way

    def suspend(self) -> None:
        """Free the slots until the next forward (which allocates them again), e.g. between the
        uses of a text encoder; resident blocks stay."""
        for n, slot in enumerate(self._slots):
            self.transfer.wait(slot.loaded)  # the compute stream frees it, after the copy into it
            self.ledger.release(("slot", self._owner, n))
        self._slots.clear()

    def close(self) -> None:
        """Remove the hooks and give every weight its own memory where it was before; idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.transfer.synchronize()  # no copy may still read a host buffer or write a slot
        for index in [*self._device_buffers, *self._homes]:
            self.layouts[index].restore()
        self.suspend()
        for key in [k for k in self.ledger.entries if isinstance(k, tuple) and k[1] is self._owner]:
            self.ledger.release(key)  # resident blocks, including any of a construction that failed
        for home in self._homes.values():
            self.transfer.free_host_buffer(home)
        self._device_buffers.clear()
        self._homes.clear()
        self._slots.clear()

    def __enter__(self) -> StreamedBlocks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the schedule ---------------------------------------------------------------------------

    @property
    def device_bytes(self) -> int:
        """Weight bytes this object places on the device while open: resident blocks plus slots."""
        return self.resident_bytes + self.num_slots * self.slot_bytes

    def _ensure_loaded(self, position: int, protected: set[int]) -> _Slot:
        """The slot holding streamed block ``position``, issuing its copy if no slot has it."""
        for slot in self._slots:
            if slot.block == position:
                return slot
        free = [s for s in self._slots if s.block not in protected]
        slot = min(free, key=lambda s: s.stamp)  # least recently filled; never one needed now
        index = self.streamed[position]
        nbytes = self.layouts[index].nbytes
        slot.loaded = self.transfer.copy(
            slot.buffer[:nbytes], self._homes[index][:nbytes], after=slot.released, label=index
        )
        slot.block = position
        slot.stamp = self._clock
        self._clock += 1
        return slot

    def _before(self, position: int, module: nn.Module, args) -> None:
        if not self._slots:
            self._allocate_slots(first=position)
        needed = {position}
        slot = self._ensure_loaded(position, needed)
        for ahead in range(1, self.num_slots):  # prefetch, wrapping to the next pass
            following = (position + ahead) % len(self.streamed)
            if following in needed:
                break
            needed.add(following)
            self._ensure_loaded(following, needed)
        self.transfer.wait(slot.loaded)
        self.layouts[self.streamed[position]].bind(slot.buffer)

    def _after(self, position: int, module: nn.Module, args, output) -> None:
        index = self.streamed[position]
        slot = next((s for s in self._slots if s.block == position), None)
        if slot is not None:  # None only if the pre-hook itself failed
            slot.released = self.transfer.record(label=index)
        self.layouts[index].bind(self._homes[index])

    # -- introspection, for tests and reports ---------------------------------------------------

    def slot_buffers(self) -> list[torch.Tensor]:
        return [slot.buffer for slot in self._slots]

    def resident_buffer(self, index: int) -> torch.Tensor:
        return self._device_buffers[index]

    def home_buffer(self, index: int) -> torch.Tensor:
        return self._homes[index]
