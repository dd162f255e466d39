"""Read GGUF files (city96's FLUX and T5 files, llama.cpp's format) safely, as tensors for the loader.

Parsing is the ``gguf`` package's :class:`gguf.GGUFReader` (a memory map: nothing is read until a
tensor is asked for). Before and around it this module refuses what a hostile or broken file could
do to it: a bad magic or version, counts of tensors or metadata that cannot fit in the file or that
no FLUX or T5 file has, a metadata array or string longer than the bytes left (the reader would loop
past the end, growing without bound), tensors whose data runs past its end (the reader's reshape
fails), unknown tensor types, non-UTF-8 names;
every case is a :class:`~flux.checkpoint.CheckpointError` naming the file and what is wrong, raised
before any tensor data is read.

A :class:`GGUFFile` presents the file the way the one loading loop of :mod:`flux.checkpoint` wants
a checkpoint: a header (key -> torch-order shape, type name) and tensors by key. Float tensors
(F32, F16, BF16) come back as torch tensors of that dtype; block-quantised ones as their raw
bytes, uint8 of shape (rows, bytes per row), for :class:`flux.quant.ggml.GGMLLinear` or
:func:`flux.quant.ggml.dequantize`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from flux.headers import CheckpointError, Header
from flux.quant.ggml import FORMATS

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# The smallest possible size of one tensor-info entry (name length, an empty name, 1 dim, type,
# offset) and of one metadata entry (key length, type, a 1-byte value): bounds for the counts.
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8
MIN_KV_BYTES = 8 + 4 + 1
# Far above what any FLUX or T5 file holds (city96's FLUX-dev: 780 tensors and ~10 metadata
# entries; T5-XXL: ~220 tensors, a 32,128-string vocabulary in one entry). The reader keeps ~5 KB of
# Python objects per entry, so a file listing millions of tiny tensors would take minutes and GBs.
MAX_TENSORS = 4096
MAX_METADATA_ENTRIES = 1024
MAX_DIMS = 4  # GGML_MAX_DIMS
# Value types of GGUF metadata: fixed sizes; 8 is a string, 9 an array.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ARCHITECTURE_KEY = "general.architecture"
# What gguf.GGUFReader raises on malformed input (it indexes a memory map with the file's numbers).
PARSE_ERRORS = (ValueError, IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError)


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file starts with the GGUF magic (cheap: reads 4 bytes)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists dimensions innermost first)
    type_name: str  # "F32", "F16", "BF16" or a block format such as "Q4_K"
    index: int  # in the reader's tensor list


def _check_preamble(path: Path, size: int) -> None:
    """Magic, version and counts, from the first 24 bytes, before the parser loops over anything."""
    with open(path, "rb") as handle:
        head = handle.read(24)
    if len(head) < 24 or head[:4] != GGUF_MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not start with 'GGUF').")
    (version,) = struct.unpack("<I", head[4:8])
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(
            f"{path} is GGUF version {version}; versions {SUPPORTED_VERSIONS} can be read. "
            "It may be corrupt, or written by a newer tool."
        )
    tensors, kvs = struct.unpack("<QQ", head[8:24])
    if tensors * MIN_TENSOR_INFO_BYTES + kvs * MIN_KV_BYTES > size:
        raise CheckpointError(
            f"{path} claims {tensors} tensors and {kvs} metadata entries, which cannot fit in its "
            f"{size} bytes: the file is truncated or corrupt. Delete it and download it again."
        )
    if tensors > MAX_TENSORS or kvs > MAX_METADATA_ENTRIES:
        raise CheckpointError(
            f"{path} claims {tensors} tensors and {kvs} metadata entries; a FLUX or T5 file has at most "
            f"{MAX_TENSORS} and {MAX_METADATA_ENTRIES}. It is corrupt or not a model for this app."
        )
    with _LayoutScan(path, size) as scan:
        scan.run(tensors, kvs)


class _LayoutScan:
    """Walks the metadata and tensor list with every length checked against the bytes left, before
    gguf's reader trusts them: a 249-byte file declaring a 2**40-item array is refused at once."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.pos = path, size, 24
        self.data = b""

    def __enter__(self) -> _LayoutScan:
        with open(self.path, "rb") as handle:  # a map: only the pages the walk touches are read
            self.data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self

    def __exit__(self, *exc) -> None:
        self.data.close()

    def _corrupt(self, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path} is truncated or corrupt: {what} at byte {self.pos} runs past the end of its "
            f"{self.size} bytes. Delete it and download it again."
        )

    def _take(self, count: int, what: str) -> bytes:
        if count > len(self.data) - self.pos:
            raise self._corrupt(what)
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def _number(self, fmt: str, what: str) -> int:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt), what))[0]

    def _string(self, what: str) -> None:
        self._take(self._number("<Q", f"the length of {what}"), what)

    def _value(self, value_type: int, what: str, depth: int = 0) -> None:
        if value_type in _FIXED_SIZES:
            self._take(_FIXED_SIZES[value_type], what)
        elif value_type == _STRING:
            self._string(what)
        elif value_type == _ARRAY and depth < 2:
            item_type = self._number("<I", f"the item type of {what}")
            count = self._number("<Q", f"the length of {what}")
            smallest = _FIXED_SIZES.get(item_type, 8)  # a string or array item takes 8 bytes at least
            if count * smallest > len(self.data) - self.pos:
                raise self._corrupt(f"{what} ({count} items)")
            if item_type in _FIXED_SIZES:
                self._take(count * smallest, what)
            else:
                for _ in range(count):
                    self._value(item_type, what, depth + 1)
        else:
            raise CheckpointError(f"{self.path} is corrupt: {what} has the unknown value type {value_type}.")

    def run(self, tensors: int, kvs: int) -> None:
        for entry in range(kvs):
            self._string(f"metadata key {entry}")
            self._value(self._number("<I", f"the type of metadata entry {entry}"), f"metadata entry {entry}")
        for entry in range(tensors):
            self._string(f"the name of tensor {entry}")
            dims = self._number("<I", f"the dimensions of tensor {entry}")
            if not 1 <= dims <= MAX_DIMS:
                raise CheckpointError(f"{self.path} is corrupt: tensor {entry} claims {dims} dimensions.")
            self._take(8 * dims + 4 + 8, f"tensor {entry}'s shape, type and offset")


class GGUFFile:
    """A GGUF checkpoint opened for the strict loader (see the module docstring). A tensor in a type
    this project cannot dequantise (Q2_K, Q3_K, the IQ types...) is refused here, by name."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"Checkpoint {self.path} does not exist.")
        size = self.path.stat().st_size
        _check_preamble(self.path, size)
        try:
            reader = gguf.GGUFReader(self.path)
        except PARSE_ERRORS as err:
            raise CheckpointError(
                f"{self.path} is not a readable GGUF file ({type(err).__name__}: {err}). It may be truncated "
                "or corrupt: delete it and download it again."
            ) from err
        self._reader = reader
        self.metadata = _scalar_metadata(reader)
        self.tensors: dict[str, GGUFTensor] = {}
        for index, info in enumerate(reader.tensors):
            type_name = info.tensor_type.name
            shape = tuple(int(d) for d in reversed(info.shape.tolist()))
            self.tensors[info.name] = GGUFTensor(info.name, shape, type_name, index)
        unsupported = self.unsupported()
        if unsupported:
            listed = ", ".join(f"{name} ({kind})" for name, kind in sorted(unsupported.items())[:8])
            raise CheckpointError(
                f"{self.path} holds {len(unsupported)} tensor(s) in quantisation types this app cannot "
                f"read: {listed}. Supported: F32, F16, BF16, {', '.join(FORMATS)}. Use a file in one "
                "of those (e.g. city96's Q8_0, Q6_K, Q5_K_S or Q4_K_S)."
            )

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(ARCHITECTURE_KEY)
        return value if isinstance(value, str) else None

    def expect_architecture(self, accepted: tuple[str, ...], what: str) -> None:
        """Refuse a file labelled as another model (a missing label is left to the key check)."""
        arch = self.architecture
        if arch is not None and arch not in accepted:
            raise CheckpointError(
                f"{self.path} is a GGUF of a {arch!r} model, not {what}. Use a file made for it "
                f"(its general.architecture is {' or '.join(repr(a) for a in accepted)})."
            )

    @property
    def header(self) -> Header:
        """Key -> (torch-order shape, type name), like :func:`flux.checkpoint.read_safetensors_header`."""
        return {name: (t.shape, t.type_name) for name, t in self.tensors.items()}

    def unsupported(self) -> dict[str, str]:
        """Tensor -> type name of every tensor in a type this project cannot dequantise."""
        return {
            name: t.type_name
            for name, t in self.tensors.items()
            if t.type_name not in FLOAT_TYPES and t.type_name not in FORMATS
        }

    def tensor(self, key: str, device: torch.device | str = "cpu") -> Tensor:
        """The tensor ``key``: floats in their dtype and shape, block formats as raw uint8 rows."""
        info = self.tensors[key]
        data = self._reader.tensors[info.index].data
        if info.type_name == "BF16":  # the reader gives BF16 as bytes
            array = np.ascontiguousarray(data).view(np.int16).reshape(info.shape)
            return torch.from_numpy(array.copy()).view(torch.bfloat16).to(device)
        if info.type_name in FLOAT_TYPES:
            return torch.from_numpy(np.array(data, copy=True).reshape(info.shape)).to(device)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        array = np.array(data, copy=True).reshape(rows, -1)
        return torch.from_numpy(array).to(device)

    def close(self) -> None:
        self._reader = None  # drops the memory map

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _scalar_metadata(reader) -> dict[str, object]:
    """The string and number metadata entries (arrays, such as tokenizer vocabularies, are skipped)."""
    import gguf

    out: dict[str, object] = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == gguf.GGUFValueType.ARRAY:
            continue
        try:
            value = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError):
            continue
        if isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out
