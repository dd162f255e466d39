"""Repeated blocks: the one declaration that compilation, fp8 and memory placement work from.

A model lists the attribute paths of its ``nn.ModuleList`` s of repeated blocks, in execution
order, as ``block_lists`` (the FLUX DiT: ``("double_blocks", "single_blocks")``). Code that treats
blocks one by one (``torch.compile`` per block, fp8 layers inside blocks, streaming blocks under a
memory budget) asks :func:`repeated_blocks` instead of naming the model's attributes itself.
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every block ``model`` declares in ``block_lists``, in order."""
    lists = getattr(model, "block_lists", None)
    if lists is None:
        raise TypeError(f"{type(model).__name__} declares no repeated blocks (a block_lists attribute)")
    blocks = []
    for path in lists:
        container = model.get_submodule(path)
        if not isinstance(container, nn.ModuleList):
            raise TypeError(f"{type(model).__name__}.{path} is not an nn.ModuleList of blocks")
        blocks += [(f"{path}.{index}", block) for index, block in enumerate(container)]
    return blocks


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The blocks of :func:`repeated_blocks` without their names."""
    return [block for _, block in repeated_blocks(model)]
