"""Strict checkpoint loading: every key present, none extra, every shape right.

The official loaders call ``load_state_dict(strict=False)`` and print a warning, so a truncated or
mismatched file silently leaves random weights in the model. Here any mismatch is an error that
names the file and the keys, raised after reading only the file header, before any long work.

Models are built on the meta device and filled with ``assign=True``: tensors go from the file
straight to the target device and dtype, one at a time, with no float32 copy of the whole model.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_LISTED_KEYS = 12


class CheckpointError(ValueError):
    """A checkpoint is missing keys, has unexpected keys or shapes, or cannot be read."""


def _listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f" (and {len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return shown + more


def check_keys_and_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    missing = expected.keys() - found.keys()
    unexpected = found.keys() - expected.keys()
    misshaped = [
        f"{k}: file {tuple(found[k])} vs model {tuple(expected[k])}"
        for k in sorted(expected.keys() & found.keys())
        if tuple(found[k]) != tuple(expected[k])
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if misshaped:
        problems.append(
            f"{len(misshaped)} key(s) with the wrong shape: {'; '.join(misshaped[:MAX_LISTED_KEYS])}"
        )
    if problems:
        message = f"Checkpoint {source} does not match the model:\n  " + "\n  ".join(problems)
        if hint:
            message += f"\n{hint}"
        raise CheckpointError(message)


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the module's persistent state (parameters and buffers)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def _cast(tensor: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    if dtype is not None and tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hint: str = "",
) -> None:
    """Check then load ``state_dict`` into ``module``, casting floating tensors to ``dtype``."""
    check_keys_and_shapes(
        expected_shapes(module), {k: tuple(v.shape) for k, v in state_dict.items()}, source, hint
    )
    converted = {k: _cast(v, device, dtype) for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=_is_meta(module))


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype string) from the file header, without reading tensor data."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            out = {}
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                sl = handle.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(
            f"Checkpoint {path} is not a readable safetensors file ({err}). It may be truncated or "
            "corrupt: delete it and download it again."
        ) from err


def load_safetensors_strict(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    key_prefix: str | None = None,
    key_map: Callable[[str], str | None] | None = None,
    hint: str | Callable[[set[str]], str] = "",
) -> None:
    """Load a safetensors file into ``module`` strictly, tensor by tensor, onto ``device``.

    ``key_prefix`` keeps only keys starting with it (and strips it); ``key_map`` renames keys or
    drops them (returning None). The header is checked before any tensor is read. ``hint`` is
    added to a mismatch error; given as a function, it gets the file's keys.
    """
    from safetensors import SafetensorError, safe_open

    header = read_safetensors_header(path)

    def rename(key: str) -> str | None:
        if key_prefix is not None:
            if not key.startswith(key_prefix):
                return None
            key = key[len(key_prefix) :]
        return key_map(key) if key_map is not None else key

    names = {k: rename(k) for k in header}
    found = {new: header[old][0] for old, new in names.items() if new is not None}
    hint_text = hint(set(header)) if callable(hint) else hint
    check_keys_and_shapes(expected_shapes(module), found, str(path), hint_text)

    state: dict[str, Tensor] = {}
    load_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=load_device) as handle:
            for old, new in names.items():
                if new is not None:
                    state[new] = _cast(handle.get_tensor(old), device, dtype)
    except SafetensorError as err:
        raise CheckpointError(
            f"Checkpoint {path} could not be read ({err}): it may be truncated or corrupt."
        ) from err
    module.load_state_dict(state, strict=True, assign=_is_meta(module))
