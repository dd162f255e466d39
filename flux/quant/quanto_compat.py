"""Load XLabs' fp8 FLUX.1-dev checkpoint (optimum-quanto qfloat8) strictly, onto a meta-built model.

``flux-dev-fp8.safetensors`` is the state dict of a quanto-quantised, frozen Flux: for each Linear
in ``flux_dev_quantization_map.json``, ``weight._data`` (float8_e4m3fn) and ``weight._scale`` (bf16,
per output row) replace ``weight``, plus scalar ``input_scale``/``output_scale`` buffers.

x-flux loads it with ``optimum.quanto.requantize``, which ends in ``load_state_dict(strict=False)``
(a truncated or mismatched file silently keeps random weights) and first materialises every weight
of the model it is given in bf16 on the CPU and the target device. Here the same two steps run
differently: quanto's ``quantize`` swaps the map's modules on the meta device, ``freeze`` gives the
exact keys, shapes and dtypes the file must have, the header is checked against them (named
missing/unexpected/mis-shaped keys, like :mod:`flux.checkpoint`), and the tensors are assigned
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

import torch
from torch import nn

from flux.checkpoint import CheckpointError, check_keys_and_shapes, read_safetensors_header
from flux.model import Flux, FluxParams
from flux.registry import ModelSpec

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install -r requirements-fp8.txt"
MIN_QUANTO_VERSION = (0, 2, 7)  # the first version tested here; 0.2.4 cannot freeze on the meta device
XLABS_QCONFIG = {"weights": "qfloat8_e4m3fn", "activations": "none"}

# safetensors header dtype codes of the dtypes a quanto state dict can hold.
_CODES = {
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
}
# Stored in one of these, a tensor may be cast to the model's dtype; anything else must match exactly.
_CASTABLE = {"BF16", "F16", "F32", "F64"}

QuantizationMap = dict[str, dict[str, str]]


def import_quanto() -> ModuleType:
    """``optimum.quanto``, or an ImportError that says how to install it."""
    try:
        import optimum.quanto as quanto
    except ImportError as err:
        raise ImportError(
            f"The fp8 (quanto) FLUX checkpoint needs optimum-quanto, which is not installed: {INSTALL_HINT}"
        ) from err
    version = tuple(int(p) for p in quanto.__version__.split(".")[:3] if p.isdigit())
    if version < MIN_QUANTO_VERSION:
        raise ImportError(
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


def expected_state(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a (quantised, frozen) model's state dict: what its file must hold."""
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _hint(keys: set[str]) -> str:
    if any(k.endswith("._data") for k in keys):
        return ""
    if any(k.startswith("double_blocks.") and k.endswith(".weight") for k in keys):
        return (
            "This looks like a high-precision checkpoint in the official layout (e.g. "
            "flux1-dev.safetensors), not a quanto fp8 one: load it without the quanto loader."
        )
    from flux.loading import layout_hint

    return layout_hint(keys)


def check_quanto_header(
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    header: Mapping[str, tuple[tuple[int, ...], str]],
    source: str,
    hint: str = "",
) -> None:
    """Raise :class:`CheckpointError` unless ``header`` (from the file) holds exactly ``expected``.

    Keys and shapes must match; fp8/integer tensors must have the model's dtype; floating tensors may
    be stored in any float dtype (quanto <= 0.2.4 wrote float32 input/output scales, 0.2.7 bf16).
    """
    shapes = {k: v[0] for k, v in expected.items()}
    check_keys_and_shapes(shapes, {k: v[0] for k, v in header.items()}, source, hint)
    wrong = [
        f"{key}: file {header[key][1]} vs model {_CODES.get(dtype, str(dtype))}"
        for key, (_, dtype) in expected.items()
        if key in header
        and header[key][1] != _CODES.get(dtype)
        and not (header[key][1] in _CASTABLE and _CODES.get(dtype) in _CASTABLE)
    ]
    if wrong:
        raise CheckpointError(
            f"Checkpoint {source} has {len(wrong)} tensor(s) of the wrong dtype: {'; '.join(wrong[:12])}"
        )


def load_quanto_fp8_flow_model(
    path: str | os.PathLike,
    map_path: str | os.PathLike | None,
    params: FluxParams,
    device: torch.device | str,
    dtype: torch.dtype = torch.bfloat16,
) -> Flux:
    """Flux from a quanto fp8 checkpoint and its quantization map, checked strictly before loading.

    ``map_path=None`` uses :func:`xlabs_quantization_map` (identical to XLabs' published map).
    Biases, RMSNorm scales and quanto scales are cast to ``dtype`` (what x-flux's bf16 model holds).
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    with torch.device("meta"):
        model = Flux(params).to(dtype)
    if map_path is None:
        qmap, map_source = xlabs_quantization_map(model), "built-in (every Linear in qfloat8_e4m3fn)"
    else:
        qmap, map_source = read_quantization_map(map_path), str(map_path)
    header = read_safetensors_header(path)
    quantize_as_mapped(model, qmap, map_source)
    expected = expected_state(model)
    source = f"{path} (quantization map: {map_source})"
    check_quanto_header(expected, header, source, _hint(set(header)))

    logger.info("Loading the fp8 (quanto) transformer from %s onto %s", path, device)
    load_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
    state = {}
    try:
        with safe_open(str(path), framework="pt", device=load_device) as handle:
            for key, (_, want) in expected.items():
                tensor = handle.get_tensor(key)
                cast = want if header[key][1] in _CASTABLE else tensor.dtype
                state[key] = tensor.to(device=device, dtype=cast)
    except SafetensorError as err:
        raise CheckpointError(f"Checkpoint {path} could not be read ({err}): it may be truncated.") from err
    model.load_state_dict(state, strict=True, assign=True)
    left = [k for k, v in model.state_dict().items() if v.is_meta]
    if left:  # would mean quanto changed how it (de)serialises: never run with uninitialised weights
        raise CheckpointError(f"Checkpoint {source} left tensors unloaded: {left[:12]}")
    return model.eval().requires_grad_(False)


def load_quanto_fp8_flow(
    spec: ModelSpec,
    device: torch.device | str,
    path: str | os.PathLike | None = None,
    map_path: str | os.PathLike | None = None,
    models_dir: str | os.PathLike | None = None,
) -> Flux:
    """Resolve (explicit path, ``models/``, hub) the fp8 checkpoint of ``spec`` and its map, and load them.

    Without the map file on disk or on the hub the built-in map is used: it is what XLabs publishes,
    and the strict header check catches any file that does not follow it.
    """
    from flux.hub import WeightsNotFoundError, resolve_weight

    if spec.fp8_flow is None:
        raise ValueError(f"There is no fp8 (quanto) checkpoint for {spec.name}.")
    weights = resolve_weight(spec.fp8_flow, path, models_dir)
    qmap = None
    try:
        if spec.fp8_quantization_map is not None:
            qmap = resolve_weight(spec.fp8_quantization_map, map_path, models_dir)
    except WeightsNotFoundError:
        if map_path is not None:
            raise
        logger.info("No %s found: using the built-in map", spec.fp8_quantization_map.filename)
    return load_quanto_fp8_flow_model(weights, qmap, spec.params, device)
