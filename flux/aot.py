"""Blocks compiled ahead of time (AOTInductor packages), for hosts that cannot compile at request time.

On a ZeroGPU Space every request runs in a fresh GPU worker, so ``torch.compile``'s Inductor and
Triton compilation would run again in every worker. This module moves that work to start-up:

- ``build``: the blocks are compiled (``nn.Module.compile``, as :mod:`flux.compile` does) with
  :class:`AheadOfTime` as the backend. For each graph Dynamo traces (one per kind of block and
  image size: all blocks of a kind share one graph, their weights being its inputs), the backend
  compiles an AOTInductor package into ``folder`` and runs it.
- ``load``: in a worker, the same compile call finds each graph's package by its key and loads it;
  Dynamo only traces (no Inductor, no Triton). A graph with no package (an image size that was not
  built) runs as traced, uncompiled, so a request never waits for a compiler.

The key of a graph is a hash of its code and of its inputs' shapes, dtypes and strides, so a
package is only used for the graph it was built from.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import fx, nn

logger = logging.getLogger(__name__)

MODES = ("build", "load")


def graph_key(graph: fx.GraphModule, inputs: Sequence[object]) -> str:
    """A name for ``graph`` with these inputs, the same in every process of this torch on this
    kind of GPU: packages kept on a Space's persistent disk must not be loaded by another torch
    (a package is the compiled code of one Inductor) or on another GPU architecture."""
    digest = hashlib.sha256(graph.code.encode())
    digest.update(torch.__version__.encode())
    devices = {
        value.device for value in inputs if isinstance(value, torch.Tensor) and value.device.type == "cuda"
    }
    for device in sorted(devices, key=str):
        digest.update(f"sm{torch.cuda.get_device_capability(device)}".encode())
    for value in inputs:
        if isinstance(value, torch.Tensor):
            digest.update(f"{tuple(value.shape)}{value.dtype}{value.stride()}{value.device.type}".encode())
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()[:24]


class AheadOfTime:
    """A ``torch.compile`` backend that builds or loads one AOTInductor package per graph."""

    def __init__(self, folder: str | Path, mode: str = "load"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        self.folder = Path(folder)
        self.mode = mode
        self.built: list[str] = []  # keys compiled by this backend
        self.missing: list[str] = []  # graphs run uncompiled for want of a package
        # One loaded package per key, shared: Dynamo traces every block it meets (each block is
        # compiled on its own) and gets the same graph for all blocks of a kind, whose weights
        # are its inputs; loading a package again for each would cost about 0.4 s a block.
        self.runners: dict[str, Callable] = {}
        self.seconds: dict[str, float] = {}  # "load <key>", "first run <key>": what a worker pays once

    @property
    def loaded(self) -> list[str]:
        return list(self.runners)

    def prepare(self) -> float:
        """Do now, once per process, what the first package load would otherwise do: Inductor's
        check of the CPU's vector instructions, which runs the C++ compiler several times (47 s
        of a fresh process's first load on an H100 host, BENCHMARKS.md). Called in the app
        process, its result is inherited by every GPU worker forked after it. Returns seconds."""
        from torch._inductor.cpu_vec_isa import valid_vec_isa_list

        start = time.perf_counter()
        valid_vec_isa_list()
        return time.perf_counter() - start

    def package(self, key: str) -> Path:
        return self.folder / f"{key}.pt2"

    def __call__(self, graph: fx.GraphModule, inputs: list) -> Callable:
        key = graph_key(graph, inputs)
        if key in self.runners:
            return self.runners[key]
        path = self.package(key)
        if not path.is_file():
            if self.mode == "load":
                self.missing.append(key)
                logger.warning("no ahead-of-time package for graph %s: it runs uncompiled", key)
                return graph.forward
            self.folder.mkdir(parents=True, exist_ok=True)
            exported = torch.export.export(graph, tuple(inputs), strict=False)
            # built beside its place and moved there whole: a build cut off (a slice's time
            # limit, a crash) leaves no half-written package for later starts to load
            partial = path.with_name(f".partial-{os.getpid()}-{path.name}")  # ends in .pt2, as AOTI asks
            torch._inductor.aoti_compile_and_package(exported, package_path=str(partial))
            os.replace(partial, path)
            self.built.append(key)
        start = time.perf_counter()
        try:
            package = torch._inductor.aoti_load_package(str(path))
        except Exception:  # noqa: BLE001 - a damaged package: the graph still runs, uncompiled
            if self.mode == "build":
                raise
            self.missing.append(key)
            logger.warning(
                "the ahead-of-time package %s could not be loaded: it runs uncompiled", path, exc_info=True
            )
            return graph.forward
        self.seconds[f"load {key}"] = time.perf_counter() - start
        first = [True]

        def run(*args):
            if not first[0]:
                return package(*args)
            first[0] = False
            start = time.perf_counter()
            out = package(*args)
            if args and isinstance(args[0], torch.Tensor) and args[0].is_cuda:
                torch.cuda.synchronize(args[0].device)
            self.seconds[f"first run {key}"] = time.perf_counter() - start
            return out

        self.runners[key] = run
        return run


def compile_ahead(blocks: Iterable[nn.Module], backend: AheadOfTime) -> int:
    """``nn.Module.compile`` each block with ``backend`` (see :func:`flux.compile.compile_blocks`)."""
    from flux.compile import compile_blocks

    return compile_blocks(blocks, backend=backend)
