"""Optional torch.compile of the repeated blocks: the DiT's double and single blocks, PuLID's CA.

Each block is compiled on its own (``Module.compile``), so the ID injection between blocks and the
offload hooks around them stay in eager Python; all blocks of one kind share one compiled graph.
"""

from __future__ import annotations

from torch import nn


def compile_blocks(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile every block of ``model`` in place (a Flux, or a ModuleList of blocks); returns the count.

    Works with the memory placements of :mod:`flux.offload`: their hooks are excluded from
    compilation and run eagerly around each compiled block.
    """
    lists = [getattr(model, name) for name in ("double_blocks", "single_blocks") if hasattr(model, name)]
    if isinstance(model, nn.ModuleList):
        lists = [model]
    count = 0
    for blocks in lists:
        for block in blocks:
            block.compile(mode=mode, dynamic=False, backend=backend)
            count += 1
    return count
