"""Optional torch.compile of repeated blocks: the DiT's double and single blocks, PuLID's cross-attentions.

Each block is compiled on its own (``Module.compile``), so the ID injection between blocks and the
memory-placement hooks around them stay in eager Python; all blocks of one kind share one compiled
graph. Which blocks a model has comes from its declaration (:mod:`flux.repeated`).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from flux.repeated import block_modules


def compile_blocks(blocks: Iterable[nn.Module], mode: str | None = None, backend: str = "inductor") -> int:
    """Compile each module of ``blocks`` in place; returns how many.

    Works with the memory placements of :mod:`flux.offload`: their hooks are excluded from
    compilation and run eagerly around each compiled block.
    """
    import torch._dynamo

    # A block legitimately meets several shapes: with and without LoRA factors, at a few padded
    # ranks (flux.lora.adapters.rank_bucket). Past the default limit of 8 graphs per function,
    # dynamo would silently run the block eagerly from then on.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    count = 0
    for block in blocks:
        block.compile(mode=mode, dynamic=False, backend=backend)
        count += 1
    return count


def compile_repeated_blocks(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> int:
    """Compile every block ``model`` declares in ``block_lists`` (e.g. a :class:`~flux.model.Flux`)."""
    return compile_blocks(block_modules(model), mode=mode, backend=backend)
