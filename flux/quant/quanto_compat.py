"""Read XLabs' fp8 FLUX.1-dev checkpoint (optimum-quanto qfloat8) strictly, through the one DiT loader.

``flux-dev-fp8.safetensors`` is the state dict of a quanto-quantised, frozen Flux: for each Linear
in ``flux_dev_quantization_map.json``, ``weight._data`` (float8_e4m3fn) and ``weight._scale`` (bf16,
per output row) replace ``weight``, plus scalar ``input_scale``/``output_scale`` buffers.

x-flux loads it with ``optimum.quanto.requantize``, which ends in ``load_state_dict(strict=False)``
(a truncated or mismatched file silently keeps random weights) and first materialises every weight
of the model it is given in bf16 on the CPU and the target device. Here :class:`QuantoFormat` is a
:class:`~flux.checkpoint.CheckpointFormat` for :func:`flux.loading.load_flow_model`: quanto's
``quantize`` swaps the map's modules on the meta device, ``freeze`` gives the exact keys, shapes and
dtypes the file must have, the header is checked against them, and the tensors are assigned
straight from the file to the device: no bf16 copy of the model ever exists. The result is the same
model ``requantize`` builds (tests/test_fp8.py compares them).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

from torch import nn

from flux.checkpoint import CheckpointFormat, TensorSpec
from flux.errors import UserError
from flux.headers import CheckpointError, Header, layout_hint

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-fp8.txt"
MIN_QUANTO_VERSION = (0, 2, 7)  # the first version tested here; 0.2.4 cannot freeze on the meta device
XLABS_QCONFIG = {"weights": "qfloat8_e4m3fn", "activations": "none"}

QuantizationMap = dict[str, dict[str, str]]


class QuantoMissingError(UserError, ImportError):
    """optimum-quanto is missing or too old for the quanto checkpoint; the message says what to install."""


def import_quanto() -> ModuleType:
    """``optimum.quanto``, or an ImportError that says how to install it."""
    try:
        import optimum.quanto as quanto
    except ImportError as err:
        raise QuantoMissingError(
            f"The fp8 (quanto) FLUX checkpoint needs optimum-quanto, which is not installed: {INSTALL_HINT}"
        ) from err
    version = tuple(int(p) for p in quanto.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_QUANTO_VERSION:
        raise QuantoMissingError(
            f"optimum-quanto {quanto.__version__} is too old for the fp8 loader (needs >= "
            f"{'.'.join(map(str, MIN_QUANTO_VERSION))}): {INSTALL_HINT}"
        )
    return quanto


def xlabs_quantization_map(model: nn.Module) -> QuantizationMap:
    """The map XLabs publishes with the checkpoint: every Linear, qfloat8 e4m3 weights, no activations."""
    return {name: dict(XLABS_QCONFIG) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_quantization_map(path: str | os.PathLike) -> QuantizationMap:
    """Read and shape-check a quanto map JSON (module name -> {"weights": qtype, "activations": qtype})."""
    path = Path(path)
    try:
        qmap = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Quantization map {path} is not a readable JSON file ({err}).") from err
    if not isinstance(qmap, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("weights"), str) and isinstance(v.get("activations"), str)
        for v in qmap.values()
    ):
        raise CheckpointError(
            f"Quantization map {path} is not a quanto map: expected {{module name: "
            '{"weights": qtype, "activations": qtype}}.'
        )
    return qmap


def quantize_as_mapped(model: nn.Module, qmap: Mapping[str, Mapping[str, str]], source: str) -> None:
    """Swap the map's modules for quanto modules and freeze them (works on the meta device)."""
    quanto = import_quanto()
    modules = dict(model.named_modules())
    unknown = sorted(set(qmap) - set(modules))
    if unknown:
        raise CheckpointError(
            f"Quantization map {source} names {len(unknown)} module(s) the model does not have: "
            f"{', '.join(unknown[:12])}"
        )
    groups: dict[tuple[str, str], list[str]] = {}
    for name, qconfig in qmap.items():
        for role in ("weights", "activations"):
            if qconfig[role] != "none" and qconfig[role] not in quanto.qtypes:
                raise CheckpointError(f"Quantization map {source}: unknown {role} qtype {qconfig[role]!r}")
        groups.setdefault((qconfig["weights"], qconfig["activations"]), []).append(name)
    for (weights, activations), names in groups.items():
        quanto.quantize(
            model,
            weights=None if weights == "none" else weights,
            activations=None if activations == "none" else activations,
            include=names,
        )
    modules = dict(model.named_modules())
    skipped = sorted(n for n in qmap if not isinstance(modules[n], quanto.QModuleMixin))
    if skipped:
        raise CheckpointError(
            f"Quantization map {source} names modules quanto cannot quantize: {', '.join(skipped[:12])}"
        )
    quanto.freeze(model)


def expected_state(model: nn.Module) -> dict[str, TensorSpec]:
    """What the file of a (quantised, frozen) model must hold: fp8 and integer tensors in their own
    dtype, floats in any float dtype (quanto <= 0.2.4 wrote float32 input/output scales, 0.2.7 bf16)."""
    return {k: TensorSpec.of(v) for k, v in model.state_dict().items()}


class QuantoFormat(CheckpointFormat):
    """A quanto checkpoint: the map's Linears become quanto modules, fp8 data is kept as stored.

    ``qmap=None`` uses :func:`xlabs_quantization_map` (identical to XLabs' published map). Biases,
    RMSNorm scales and quanto scales are cast to the load dtype (what x-flux's bf16 model holds).
    """

    def __init__(self, qmap: QuantizationMap | None = None, source: str | None = None):
        self.qmap = qmap
        self.source = source or ("built-in (every Linear in qfloat8_e4m3fn)" if qmap is None else "given")

    def prepare(self, module: nn.Module, header: Header) -> None:
        qmap = self.qmap if self.qmap is not None else xlabs_quantization_map(module)
        quantize_as_mapped(module, qmap, self.source)

    def file_layout(self, module: nn.Module) -> dict[str, TensorSpec]:
        return expected_state(module)

    def hint(self, keys: set[str]) -> str:
        if any(k.endswith("._data") for k in keys):
            return f"(quantization map: {self.source})"
        if any(k.startswith("double_blocks.") and k.endswith(".weight") for k in keys):
            return (
                "This looks like a high-precision checkpoint in the official layout (e.g. "
                "flux1-dev.safetensors), not a quanto fp8 one: load it without --fp8_mode quanto."
            )
        return layout_hint(keys)


def quanto_format(map_path: str | os.PathLike | None = None) -> QuantoFormat:
    """The format for XLabs' file, with its map JSON when there is one (else the built-in map)."""
    if map_path is None:
        return QuantoFormat()
    return QuantoFormat(read_quantization_map(map_path), str(map_path))
