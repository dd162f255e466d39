"""An instrumented transfer and memory plans for the placement tests (CPU stand-ins for CUDA)."""

import itertools

import torch
from torch import nn

from flux.offload import MemoryPolicy, Stage, SyncTransfer, evaluate_plan, plan_memory
from pulid.injection import Identity, PuLIDInjection
from pulid.pipeline import STAGES
from tests.tiny_configs import tiny_flux_params
from tests.tiny_models import random_inputs, random_model, tiny_ca_modules


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


PARAMS = tiny_flux_params(depth=2, depth_single_blocks=5)  # 7 blocks: 2 double, 5 single


def tiny_setup(seed=0):
    model = random_model(PARAMS, torch.float32, seed=seed)
    inputs = random_inputs(PARAMS, batch=1, dtype=torch.float32)
    return model, inputs


def injection(seed=0):
    cas = tiny_ca_modules(PARAMS, dtype=torch.float32, seed=seed)
    tokens = torch.randn(1, 4, 48, generator=torch.Generator().manual_seed(seed))
    return cas, PuLIDInjection(cas, [Identity(tokens, 0.8)], PARAMS.depth, PARAMS.depth_single_blocks)


def small_component(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).eval()


def generation_requests():
    from pulid.request import GenerationRequest
    from tests.stubs import photo

    small = dict(prompt="a portrait of a woman", width=256, height=256, num_steps=2)
    # true CFG: two T5 calls and two DiT passes per step; the second request hits the ID cache
    return [
        GenerationRequest(**small, seed=7, id_images=[photo(1)], true_cfg=1.5),
        GenerationRequest(**small, seed=3),
    ]
