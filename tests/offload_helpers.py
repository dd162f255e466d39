"""An instrumented transfer and memory plans for the placement tests (CPU stand-ins for CUDA)."""

import itertools

import torch

from flux.offload import MemoryPolicy, Stage, SyncTransfer, evaluate_plan, plan_memory
from pulid.pipeline import STAGES


class LoggingTransfer(SyncTransfer):
    """Logs copies, events and waits; ``lazy`` delays each copy until an event at or after it is waited on."""

    def __init__(self, lazy: bool = False):
        super().__init__("cpu")
        self.lazy = lazy
        self.log: list[tuple] = []
        self.pending: list[tuple] = []
        self.device_buffers: list[torch.Tensor] = []
        self._ids = itertools.count()

    def device_buffer(self, nbytes):
        buffer = super().device_buffer(nbytes).fill_(0xFF)  # NaN-like garbage until written
        self.device_buffers.append(buffer)
        return buffer

    def record(self, label=None):
        self.log.append(("record", label))
        return ("released", label, next(self._ids))

    def copy(self, dst, src, after, label=None):
        self.log.append(("copy", label, None if after is None else after[1]))
        token = ("loaded", label, next(self._ids))
        if self.lazy:
            self.pending.append((token, dst, src))
        else:
            dst.copy_(src)
        return token

    def wait(self, event):
        if event is None:
            return
        self.log.append(("wait", event[1]))
        if event[0] == "loaded":
            self._flush_through(event)

    def synchronize(self):
        self._flush_through(None)

    def _flush_through(self, token):
        while self.pending:  # in order, like a stream
            done, dst, src = self.pending.pop(0)
            dst.copy_(src)
            if done == token:
                return

    def copies(self):
        return [entry[1] for entry in self.log if entry[0] == "copy"]


NO_RESERVES = tuple(Stage(stage.name) for stage in STAGES)


def tiny_plans(sizes):
    """Plans of every kind for the tiny pipeline (whose autoencoder outweighs its DiT)."""
    options = dict(overhead=0, counts={"step": 4, "prompt": 2})  # true CFG, 2 steps
    dit_blocks = next(s.blocks for s in sizes if s.name == "dit")
    streaming = {**{s.name: "offload" for s in sizes}, "dit": "stream", "t5": "stream"}
    streamed = evaluate_plan(sizes, NO_RESERVES, streaming, **options)
    partly = evaluate_plan(sizes, NO_RESERVES, streaming, streamed.peak + dit_blocks[0], **options)
    assert len(streamed.streamed_blocks("dit")) == 5 and 0 < len(partly.resident_blocks["dit"]) < 5
    return {
        "all-streamed": streamed,
        "partly-resident": partly,
        "smallest": plan_memory(sizes, NO_RESERVES, None, **options),
        "offload-flag": MemoryPolicy(offload=True).plan(sizes, NO_RESERVES, overhead=0),
        "resident": MemoryPolicy().plan(sizes, NO_RESERVES, overhead=0),
    }
