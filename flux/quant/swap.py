"""Put a quantised layer where a Linear was, by its dotted name (the fp8 and GGUF formats do this)."""

from __future__ import annotations

from torch import nn


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root``'s submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
