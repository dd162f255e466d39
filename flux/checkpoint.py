"""Strict checkpoint loading: every key present, none extra, every shape and dtype right.

The official loaders call ``load_state_dict(strict=False)`` and print a warning, so a truncated or
mismatched file silently leaves random weights in the model. Here any mismatch is an error that
names the file and the keys, raised after reading only the file header, before any long work.

The checks, the safetensors reader and the formats live here; the one loading loop,
:func:`flux.strict_load.load_checkpoint_strict`, for safetensors and GGUF files alike, sits above.
Models are built on the meta device and filled with ``assign=True``: tensors go from the file
straight to the target device and dtype, one at a time, with no float32 copy of the whole model.
What differs between checkpoints (plain weights, weights quantised to fp8 as they are read, a
quanto file, a GGUF file, an fp8 file) is a :class:`CheckpointFormat`: a per-tensor transform
handed to that loop, the way timm hands a checkpoint filter to its one model builder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flux.headers import CheckpointError, Header

MAX_LISTED_KEYS = 12

# safetensors header dtype codes.
DTYPE_CODES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
}
# A tensor stored in one of these may be cast to the model's float dtype as it is read (fp8 codes never are).
FLOAT_CODES = frozenset({"BF16", "F16", "F32", "F64"})
FLOAT_DTYPES = frozenset({torch.bfloat16, torch.float16, torch.float32, torch.float64})


def listing(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = f" (and {len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else ""
    return shown + more


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor of a file must be: its shape, and the dtype codes it may be stored in."""

    shape: tuple[int, ...]
    dtypes: frozenset[str] = FLOAT_CODES

    @classmethod
    def of(cls, tensor: Tensor) -> TensorSpec:
        """A model tensor's spec: float tensors may come in any float dtype, others exactly."""
        code = DTYPE_CODES.get(tensor.dtype, str(tensor.dtype))
        return cls(tuple(tensor.shape), FLOAT_CODES if code in FLOAT_CODES else frozenset({code}))


def check_keys_and_shapes(
    expected: Mapping[str, tuple[int, ...]],
    found: Mapping[str, tuple[int, ...]],
    source: str,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointError` naming missing, unexpected and mis-shaped keys."""
    check_header(
        {k: TensorSpec(tuple(v), frozenset()) for k, v in expected.items()},
        {k: (tuple(v), "") for k, v in found.items()},
        source,
        hint,
        check_dtypes=False,
    )


def check_header(
    expected: Mapping[str, TensorSpec],
    header: Header,
    source: str,
    hint: str = "",
    *,
    check_dtypes: bool = True,
) -> None:
    """Raise :class:`CheckpointError` unless ``header`` (key -> (shape, dtype code)) holds ``expected``."""
    missing = expected.keys() - header.keys()
    unexpected = header.keys() - expected.keys()
    common = sorted(expected.keys() & header.keys())
    misshaped = [
        f"{k}: file {tuple(header[k][0])} vs model {tuple(expected[k].shape)}"
        for k in common
        if tuple(header[k][0]) != tuple(expected[k].shape)
    ]
    mistyped = [
        f"{k}: file {header[k][1]} vs model {'/'.join(sorted(expected[k].dtypes))}"
        for k in common
        if check_dtypes and header[k][1] not in expected[k].dtypes
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {listing(unexpected)}")
    if misshaped:
        problems.append(
            f"{len(misshaped)} key(s) with the wrong shape: {'; '.join(misshaped[:MAX_LISTED_KEYS])}"
        )
    if mistyped:
        problems.append(
            f"{len(mistyped)} tensor(s) of the wrong dtype: {'; '.join(mistyped[:MAX_LISTED_KEYS])}"
        )
    if problems:
        message = f"Checkpoint {source} does not match the model:\n  " + "\n  ".join(problems)
        if hint:
            message += f"\n{hint}"
        raise CheckpointError(message)


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of the module's persistent state (parameters and buffers)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.state_dict().values())


def cast(tensor: Tensor, device: torch.device | str | None, dtype: torch.dtype | None) -> Tensor:
    """``tensor`` on ``device``; bf16/fp16/fp32/fp64 tensors in ``dtype`` too (others keep theirs)."""
    if dtype is not None and tensor.dtype in FLOAT_DTYPES:
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)


class CheckpointFormat:
    """How a file's tensors become a module's state: the per-tensor transform of the one loader.

    The base class reads a file whose keys are the module's state-dict keys, floats in any float
    dtype, cast to the load dtype. Subclasses change the module before loading (:meth:`prepare`,
    e.g. swap Linear layers for quantised ones on the meta device), say what the file must then
    hold (:meth:`file_layout`) and turn each file tensor into state entries (:meth:`convert`).
    """

    def prepare(self, module: nn.Module, header: Header) -> None:
        """Change the (meta-device) module before it is filled, knowing the file's header (key ->
        (shape, dtype code)); the default changes nothing."""

    def read_order(self, header: Header) -> list[str]:
        """The order to read the file's keys in (a format may need scales before their weights)."""
        return list(header)

    def file_layout(self, module: nn.Module) -> dict[str, TensorSpec]:
        """Key -> what the file must hold for the prepared ``module``."""
        return {k: TensorSpec.of(v) for k, v in module.state_dict().items()}

    def convert(
        self, key: str, tensor: Tensor, device: torch.device | str, dtype: torch.dtype | None
    ) -> dict[str, Tensor]:
        """The state entries made from one file tensor."""
        return {key: cast(tensor, device, dtype)}

    def hint(self, keys: set[str]) -> str:
        """A sentence for a mismatch error, from the file's keys (e.g. "this is another model")."""
        return ""


PLAIN = CheckpointFormat()


def load_state_dict_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    source: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    hint: str = "",
) -> None:
    """Check then load an in-memory ``state_dict`` into ``module``, casting floating tensors to ``dtype``."""
    check_keys_and_shapes(
        expected_shapes(module), {k: tuple(v.shape) for k, v in state_dict.items()}, source, hint
    )
    converted = {k: cast(v, device, dtype) for k, v in state_dict.items()}
    module.load_state_dict(converted, strict=True, assign=is_meta(module))


LFS_POINTER = b"version https://git-lfs"  # how a Git LFS pointer file begins
LFS_POINTER_IS = (
    "a Git LFS pointer, not the weights (it was cloned without git-lfs: run `git lfs pull` in its "
    "repository, or download the file itself)"
)


def other_format(path: str | os.PathLike) -> str | None:
    """What a weight file is by its first bytes when that is plainly not safetensors (a GGUF file,
    a PyTorch pickle, text, an empty file), else None. Safetensors begins with its header's length
    (8 bytes, little-endian) and then its JSON header."""
    with open(path, "rb") as handle:
        start = handle.read(24)
    if not start:
        return "an empty file"
    if start.startswith(LFS_POINTER):
        return LFS_POINTER_IS
    if start.startswith(b"GGUF"):
        return "a GGUF file"
    if start.startswith(b"PK\x03\x04") or start.startswith(b"\x80"):
        return "a PyTorch pickle (.pt, .pth, .ckpt)"
    if len(start) > 8 and start[8:9] == b"{":
        return None
    if all(32 <= byte < 127 or byte in b"\t\r\n" for byte in start):
        return "a text file"
    return None


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype code) from the file header, without reading tensor data."""
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
        if kind := other_format(path):
            raise CheckpointError(not_the_format(path, kind, "safetensors")) from err
        raise CheckpointError(
            f"Checkpoint {path} is not a readable safetensors file ({err}). It may be truncated or "
            "corrupt: delete it and download it again."
        ) from err


class SafetensorsFile:
    """A safetensors checkpoint opened for :func:`load_checkpoint_strict`: its header, and tensors by key."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.header = read_safetensors_header(self.path)
        self._handle = None

    def open(self, device: torch.device | str) -> None:
        """Read tensors straight onto ``device`` (cpu or cuda) from now on."""
        from safetensors import safe_open

        load_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
        self._handle = safe_open(str(self.path), framework="pt", device=load_device)

    def tensor(self, key: str, device: torch.device | str = "cpu") -> Tensor:
        from safetensors import SafetensorError

        if self._handle is None:
            self.open(device)
        try:
            return self._handle.get_tensor(key)
        except SafetensorError as err:
            raise CheckpointError(
                f"Checkpoint {self.path} could not be read ({err}): it may be truncated or corrupt."
            ) from err

    def close(self) -> None:
        self._handle = None


class RenamedFile:
    """An opened checkpoint seen under the model's key names: ``rename`` maps each file key to the
    model's name for it, or to None for a tensor the model does not use (dropped, e.g. CLIP's
    vision tower). Two file keys mapped to one name is an error naming both."""

    def __init__(self, file, rename: Callable[[str], str | None]):
        self.file = file
        self.path = file.path
        self._names: dict[str, str] = {}
        for key in file.header:
            name = rename(key)
            if name is None:
                continue
            if name in self._names:
                raise CheckpointError(
                    f"Checkpoint {self.path} holds {self._names[name]} and {key}, which are both {name}."
                )
            self._names[name] = key
        self.header = {name: file.header[key] for name, key in self._names.items()}

    def __getattr__(self, attribute: str):  # metadata, architecture... of the underlying file
        return getattr(self.file, attribute)

    def tensor(self, key: str, device: torch.device | str = "cpu") -> Tensor:
        return self.file.tensor(self._names[key], device)

    def close(self) -> None:
        self.file.close()


def not_the_format(path: Path, kind: str, expected: str) -> str:
    """The message for a weight file that is plainly something else, naming the format asked for."""
    return (
        f"Checkpoint {path} is {kind}, not a {expected} file: give the .{expected} file itself "
        "(README.md, Weights, lists each one)."
    )
