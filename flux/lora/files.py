"""Reading a LoRA file: safetensors only (never unpickled), checked, fingerprinted.

:func:`read_lora` returns a :class:`LoRAFile`: the updates on the model's official layer names
(:func:`flux.lora.layouts.parse_lora`), what was ignored (text-encoder layers), the layouts seen,
and the first hex digits of the file's sha256 for the image's metadata.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from flux.checkpoint import FLOAT_CODES, CheckpointError, read_safetensors_header
from flux.lora.layouts import LoRAError, LowRank, Target, parse_lora

SHA_PREFIX = 12  # hex digits of sha256 recorded with each image (as A1111's "short hash" does: 10-12)


@dataclass
class LoRAFile:
    """A LoRA read for one model: its layer updates and what it is."""

    name: str
    path: Path
    sha256: str
    layers: dict[str, LowRank]
    layouts: tuple[str, ...]
    ignored: dict[str, list[str]] = field(default_factory=dict)

    @property
    def short_hash(self) -> str:
        return self.sha256[:SHA_PREFIX]

    @property
    def rank(self) -> int:
        """The largest rank of any layer."""
        return max(update.rank for update in self.layers.values())

    def ignored_summary(self) -> str:
        """ "CLIP-L: 72 layers" style text for the log and the metadata ("" when nothing was ignored)."""
        return ", ".join(f"{encoder}: {len(names)} layers" for encoder, names in sorted(self.ignored.items()))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_lora_suffix(path: Path) -> None:
    """Only safetensors files are LoRAs here: a .ckpt/.pt/.bin file is a pickle that could run code."""
    if path.suffix.lower() != ".safetensors":
        raise LoRAError(
            f"LoRA {path.name}: only .safetensors files are read (a .ckpt/.pt/.bin file could run code "
            "when unpickled); convert it to safetensors first."
        )


def read_lora(path: str | os.PathLike, targets: Mapping[str, Target], name: str | None = None) -> LoRAFile:
    """Read, check and convert a LoRA file for a model with these ``targets`` (:func:`lora_targets`).

    Raises :class:`LoRAError` naming the file (and the key) for anything that is not a FLUX.1-dev
    LoRA in a known layout, and for files that are not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    shown = path.name  # errors name the file; ``name`` is what the metadata records
    check_lora_suffix(path)
    if not path.is_file():
        raise LoRAError(f"LoRA {shown} is not a file.")
    try:
        header = read_safetensors_header(path)
    except CheckpointError as err:  # said of the file by its name: the folder is the server's business
        raise LoRAError(f"LoRA {shown}: {str(err).replace(str(path), shown)}") from None
    not_float = [key for key, (_, code) in header.items() if code not in FLOAT_CODES]
    if not_float:
        key = not_float[0]
        raise LoRAError(
            f"LoRA {shown}: tensor {key!r} is {header[key][1]}; LoRA factors must be float (F32, F16, BF16)."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in header}
    except (SafetensorError, OSError) as err:
        reason = getattr(err, "strerror", None) or str(err).replace(str(path), shown)
        raise LoRAError(
            f"LoRA {shown} could not be read ({reason}): it may be truncated or corrupt."
        ) from None
    parsed = parse_lora(tensors, targets, shown, metadata)
    return LoRAFile(name or path.stem, path, file_sha256(path), parsed.layers, parsed.layouts, parsed.ignored)
