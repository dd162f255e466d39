"""Strict loading: a weight file opened as its bytes say, and a module filled from it with every
key, shape and dtype checked (:mod:`flux.checkpoint` holds the checks and the formats).

The one loading loop, :func:`load_checkpoint_strict`, reads safetensors and GGUF files alike; it
sits above both readers (:class:`~flux.checkpoint.SafetensorsFile`, :class:`flux.gguf_file.GGUFFile`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from flux.checkpoint import (
    PLAIN,
    CheckpointError,
    CheckpointFormat,
    SafetensorsFile,
    check_header,
    is_meta,
    listing,
    not_the_format,
    other_format,
)
from flux.gguf_file import GGUFFile, is_gguf


def open_checkpoint(path: str | os.PathLike):
    """The file at ``path`` as a checkpoint to load: GGUF (by its magic) or safetensors. A ``.gguf``
    file without the magic is said to be what it is, as a GGUF file (not as safetensors)."""
    path = Path(path)
    named_gguf = path.suffix.lower() == ".gguf"
    if named_gguf and path.is_file() and not is_gguf(path) and (kind := other_format(path)):
        raise CheckpointError(not_the_format(path, kind, "gguf"))
    return GGUFFile(path) if named_gguf or is_gguf(path) else SafetensorsFile(path)


def _without_view_base(tensor: Tensor) -> Tensor:
    """The same memory, as a tensor that is not a view of another.

    Why: safetensors hands out views into a memory map of the whole file. A buffer that is such a
    view keeps its base, and with it the whole map, alive even after a memory placement rebinds
    its ``.data`` to a pinned copy (parameters are re-wrapped and do not). On the fp8 files that
    left all 16 GiB of the DiT and T5 files mapped next to their pinned copies.
    """
    if tensor._base is None:
        return tensor
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    return alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.shape, tensor.stride())


def load_checkpoint_strict(
    module: nn.Module,
    source,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    fmt: CheckpointFormat = PLAIN,
    hint: Callable[[set[str]], str] | None = None,
    tied: Mapping[str, str] | None = None,
) -> None:
    """Fill ``module`` (built on the meta device, or materialised) from a checkpoint file, strictly.

    ``source`` is a path (safetensors or GGUF, told apart by the file's magic) or an opened file
    (:class:`SafetensorsFile`, :class:`flux.gguf_file.GGUFFile`). ``fmt`` prepares the module
    from the header and converts each tensor (see :class:`CheckpointFormat`). The header is checked
    against the prepared module before any tensor is read; a mismatch names the keys, plus
    ``hint(keys)`` (or the format's hint) when the file is recognisably something else. ``tied``
    maps state keys that share another key's tensor (T5's ``encoder.embed_tokens.weight`` is its
    ``shared.weight``) to that key: files may omit them, and a copy in the file is not read.
    Afterwards no tensor may be left on the meta device.
    """
    file = open_checkpoint(source) if isinstance(source, (str, os.PathLike)) else source
    tied = dict(tied or {})
    state: dict[str, Tensor] = {}
    try:  # closed however it ends (a GGUF holds a memory map of the whole file)
        header = {k: v for k, v in file.header.items() if k not in tied}
        fmt.prepare(module, header)
        keys = set(header)
        hint_text = fmt.hint(keys) or (hint(keys) if hint is not None else "")
        layout = {k: v for k, v in fmt.file_layout(module).items() if k not in tied}
        check_header(layout, header, str(file.path), hint_text)
        for key in fmt.read_order(header):
            state.update(fmt.convert(key, file.tensor(key, device), device, dtype))
    finally:
        file.close()
    state = {key: _without_view_base(tensor) for key, tensor in state.items()}
    for alias, key in tied.items():
        state[alias] = state[key]
    module.load_state_dict(state, strict=True, assign=is_meta(module))
    left = [k for k, v in module.state_dict().items() if v.is_meta]
    left += [k for k, v in module.named_buffers() if v.is_meta and k not in left]  # non-persistent too
    if left:  # a format that forgot a tensor: never run with uninitialised weights
        raise CheckpointError(f"Checkpoint {file.path} left tensors unloaded: {listing(left)}")
