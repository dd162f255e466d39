"""FLUX.1 LoRA files in the layouts in common use, read onto the DiT's official module names.

Every layout ends as one :class:`LowRank` per official Linear (``double_blocks.0.img_attn.qkv``):
``delta W = up @ diag(scale) @ down``. The layouts, told apart key by key:

- **kohya** (sd-scripts): ``lora_unet_double_blocks_0_img_attn_qkv``
  ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; the name is the official module path
  with its dots written as underscores.
- **BFL/PEFT** (ComfyUI-style files): the official path itself, bare or under ``diffusion_model.``,
  with ``.lora_A.weight`` / ``.lora_B.weight`` (or ``lora_down`` / ``lora_up``) and ``.alpha``.
- **diffusers/PEFT**: diffusers' module names under ``transformer.``. Where the official model has
  one fused Linear, diffusers has several: q, k and v of each double-block stream (``attn.to_q``,
  ``attn.add_q_proj``...) and q, k, v and the MLP input of each single block (``proj_mlp``). Each
  part keeps its own factors: stacked, they are one update of the fused layer whose ``up`` is
  block-diagonal over the parts' output rows. ``norm_out.linear`` holds (scale, shift) where the
  official ``final_layer.adaLN_modulation.1`` holds (shift, scale), so its rows are swapped.
- **XLabs** (x-flux): ``double_blocks.0.processor.qkv_lora1.down.weight`` (``1`` the image stream,
  ``2`` the text stream, ``proj_lora`` the attention output); in single blocks ``qkv_lora`` covers
  the q, k and v rows of ``linear1`` and ``proj_lora`` is ``linear2``, on the same inputs.

The rules are those of diffusers' FLUX LoRA converters and kohya sd-scripts' FLUX network. Scale:
``alpha / rank`` per layer, alpha from the layer's ``.alpha`` tensor, else from PEFT's
``lora_adapter_metadata`` (``lora_alpha``, ``alpha_pattern``, ``use_rslora``), else the rank
(scale 1, as diffusers and x-flux do without an alpha).

Everything is checked against the model (:func:`lora_targets`): a key that names no Linear, a
missing half of a pair, a shape that does not fit, a file for another model, all raise
:class:`LoRAError` naming the file and the key. Text-encoder keys are collected, not applied, and
reported as ignored by the caller.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from flux.checkpoint import CheckpointError

MAX_LISTED = 8


class LoRAError(CheckpointError):
    """A LoRA file does not fit the model, is for another model, or is not a LoRA file."""


@dataclass(frozen=True)
class Target:
    """One Linear of the model a LoRA may change: its sizes and, for fused layers, the output rows
    of each part (q, k, v; q, k, v, MLP for a single block's ``linear1``)."""

    in_features: int
    out_features: int
    parts: tuple[int, ...]

    def part_rows(self, first: int, count: int = 1) -> slice:
        start = sum(self.parts[:first])
        return slice(start, start + sum(self.parts[first : first + count]))


@dataclass(frozen=True)
class LowRank:
    """The update of one Linear: ``delta W = up @ diag(scale) @ down``.

    ``down`` (rank, in) and ``up`` (out, rank) are kept as stored (float32 here); ``scale`` (rank,)
    is float32 ``alpha / rank`` of the part each rank row comes from.
    """

    down: Tensor
    up: Tensor
    scale: Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The full (out, in) update, for checks."""
        return (self.up.to(dtype) * self.scale.to(dtype)) @ self.down.to(dtype)


@dataclass
class ParsedLoRA:
    """What a file holds for the model: an update per official Linear, and what was not applied."""

    layers: dict[str, LowRank]
    layouts: tuple[str, ...]
    ignored: dict[str, list[str]] = field(default_factory=dict)  # text encoder -> its module names


def lora_targets(model: nn.Module) -> dict[str, Target]:
    """Name -> :class:`Target` of every Linear of a FLUX DiT (bf16, fp8 or quanto layers alike)."""
    targets = {}
    for name, module in model.named_modules():
        in_features = getattr(module, "in_features", None)
        out_features = getattr(module, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            continue
        if name.endswith(".qkv"):
            parts = (out_features // 3,) * 3
        elif name.endswith(".linear1"):
            parts = (in_features,) * 3 + (out_features - 3 * in_features,)
        else:
            parts = (out_features,)
        targets[name] = Target(in_features, out_features, parts)
    return targets


# Key endings -> the role of the tensor. Longer endings first: ".lora.down.weight" before ".down.weight".
_ENDINGS = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Endings of other adapter kinds, for a message that says what they are.
_UNSUPPORTED = {
    "dora_scale": "DoRA (weight-decomposed LoRA)",
    "lokr_w1": "LoKr",
    "lokr_w2": "LoKr",
    "hada_w1_a": "LoHa",
    "hada_w1_b": "LoHa",
    ".diff": "a full weight difference",
    ".diff_b": "a bias difference",
    ".lora_A.bias": "a LoRA with biases",
    ".lora_B.bias": "a LoRA with biases",
    ".lora_up.bias": "a LoRA with biases",
}
# Module-name prefixes of the text encoders (kohya, diffusers, ComfyUI): not applied, reported.
_TEXT_ENCODERS = (
    ("lora_te1_", "CLIP-L"),
    ("lora_te2_", "T5-XXL"),
    ("lora_te3_", "T5-XXL"),
    ("lora_te_", "CLIP-L"),
    ("text_encoder.", "CLIP-L"),
    ("text_encoder_2.", "T5-XXL"),
    ("text_encoders.clip_l.", "CLIP-L"),
    ("text_encoders.t5xxl.", "T5-XXL"),
)
# Names that only UNet models (SD 1.5, SDXL) and SD3 have.
_OTHER_MODELS = (
    (
        re.compile(r"(down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)"),
        "a Stable Diffusion UNet (SD 1.5 / SDXL)",
    ),
    (re.compile(r"(joint_blocks|context_block|x_block)"), "Stable Diffusion 3"),
    (re.compile(r"(double_stream_modulation|single_stream_modulation)"), "FLUX.2"),
)

_DIFFUSERS_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0),
    "attn.to_k": ("img_attn.qkv", 1),
    "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0),
    "attn.add_k_proj": ("txt_attn.qkv", 1),
    "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None),
    "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None),
    "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None),
    "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None),
    "norm1_context.linear": ("txt_mod.lin", None),
}
_DIFFUSERS_SINGLE = {
    "attn.to_q": ("linear1", 0),
    "attn.to_k": ("linear1", 1),
    "attn.to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm.linear": ("modulation.lin", None),
}
_DIFFUSERS_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}
_SWAPPED_HALVES = {"final_layer.adaLN_modulation.1"}  # diffusers' (scale, shift) vs (shift, scale)
_XLABS = {
    "double_blocks": {
        "qkv_lora1": ("img_attn.qkv", None),
        "qkv_lora2": ("txt_attn.qkv", None),
        "proj_lora1": ("img_attn.proj", None),
        "proj_lora2": ("txt_attn.proj", None),
    },
    "single_blocks": {"qkv_lora": ("linear1", (0, 3)), "proj_lora": ("linear2", None)},
}
_DIFFUSERS_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_XLABS_KEY = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.processor\.([a-z_0-9]+)$")


@dataclass(frozen=True)
class _Place:
    """Where one module of the file lands: the official Linear and the rows of its parts."""

    target: str
    first_part: int | None = None  # None: the whole layer
    num_parts: int = 1
    layout: str = ""


def _split_key(key: str, source: str) -> tuple[str, str]:
    for ending, role in _ENDINGS:
        if key.endswith(ending):
            return key[: -len(ending)], role
    for ending, kind in _UNSUPPORTED.items():
        if key.endswith(ending):
            raise LoRAError(
                f"LoRA {source}: key {key!r} belongs to {kind}, which this app does not apply; only "
                "plain LoRA (down/up factors and alpha) is supported."
            )
    raise LoRAError(
        f"LoRA {source}: key {key!r} is not a LoRA weight (expected names ending in .lora_down.weight / "
        ".lora_up.weight / .alpha, .lora_A.weight / .lora_B.weight, or XLabs' .down.weight / .up.weight)."
    )


def _text_encoder(module: str) -> str | None:
    for prefix, encoder in _TEXT_ENCODERS:
        if module.startswith(prefix):
            return encoder
    return None


def _place(module: str, targets: Mapping[str, Target], kohya_names: Mapping[str, str]) -> _Place | None:
    """The official Linear a file's module name stands for, or None when no layout knows it."""
    if module.startswith("lora_unet_"):
        name = kohya_names.get(module[len("lora_unet_") :])
        return None if name is None else _Place(name, layout="kohya")
    bare = module
    for prefix in ("diffusion_model.", "model.diffusion_model."):
        if bare.startswith(prefix):
            bare = bare[len(prefix) :]
    if bare in targets:
        return _Place(bare, layout="BFL/PEFT")
    match = _XLABS_KEY.match(bare)
    if match:
        kind, index, part = match.groups()
        found = _XLABS[kind].get(part)
        if found is None:
            return None
        name, parts = found
        first, count = parts if parts else (None, 1)
        return _Place(f"{kind}.{index}.{name}", first, count, "XLabs")
    for prefix in ("base_model.model.", "transformer."):
        if bare.startswith(prefix):
            bare = bare[len(prefix) :]
    match = _DIFFUSERS_BLOCK.match(bare)
    if match:
        kind, index, rest = match.groups()
        table = _DIFFUSERS_DOUBLE if kind == "transformer_blocks" else _DIFFUSERS_SINGLE
        official = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        found = table.get(rest)
        if found is None:
            return None
        name, part = found
        return _Place(f"{official}.{index}.{name}", part, 1, "diffusers")
    if bare in _DIFFUSERS_TOP:
        return _Place(_DIFFUSERS_TOP[bare], layout="diffusers")
    return None


def _peft_alpha(metadata: Mapping[str, str] | None, source: str):
    """PEFT's ``lora_adapter_metadata`` (diffusers writes it): a function module -> (alpha, rslora),
    or None when the file has none."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise LoRAError(f"LoRA {source}: its lora_adapter_metadata is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        return None
    # Keys are "transformer.lora_alpha" (diffusers) or "lora_alpha" (PEFT's own config).
    leaf = {
        key.removeprefix("transformer."): value
        for key, value in config.items()
        if "." not in key.removeprefix("transformer.")
    }
    alpha = leaf.get("lora_alpha")
    if not isinstance(alpha, (int, float)):
        return None
    rslora = bool(leaf.get("use_rslora", False))
    patterns = leaf.get("alpha_pattern") or {}
    try:
        compiled = [(re.compile(rf"(.*\.)?({pattern})$"), value) for pattern, value in patterns.items()]
    except (re.error, TypeError, AttributeError) as err:
        raise LoRAError(f"LoRA {source}: its alpha_pattern cannot be read ({err}).") from None

    def alpha_of(module: str) -> tuple[float, bool]:
        for pattern, value in compiled:
            if pattern.match(module):
                return float(value), rslora
        return float(alpha), rslora

    return alpha_of


def _named_hint(source: str, metadata: Mapping[str, str] | None, modules: list[str]) -> None:
    """Refuse, with what it is, a file made for another model (by its metadata or its names)."""
    meta = metadata or {}
    architecture = str(meta.get("modelspec.architecture", "")).lower()
    base = str(meta.get("ss_base_model_version", "")).lower()
    for text in (architecture, base):
        if "schnell" in text:
            raise LoRAError(
                f"LoRA {source} was trained for FLUX.1-schnell ({text}), not FLUX.1-dev: "
                "use a FLUX.1-dev LoRA."
            )
        if "flux-2" in text or "flux2" in text or "flux.2" in text:
            raise LoRAError(f"LoRA {source} is for FLUX.2 ({text}), not FLUX.1-dev.")
        if any(word in text for word in ("stable-diffusion", "sdxl", "sd_v1", "sd3", "sd_2")):
            raise LoRAError(f"LoRA {source} is for Stable Diffusion ({text}), not FLUX.1-dev.")
    for pattern, model in _OTHER_MODELS:
        hits = [module for module in modules if pattern.search(module)]
        if hits:
            raise LoRAError(
                f"LoRA {source} is for {model}, not FLUX.1-dev (key {hits[0]!r}): "
                "use a LoRA made for FLUX.1-dev."
            )


def parse_lora(
    tensors: Mapping[str, Tensor],
    targets: Mapping[str, Target],
    source: str,
    metadata: Mapping[str, str] | None = None,
) -> ParsedLoRA:
    """The file's tensors as one :class:`LowRank` per official Linear of ``targets``; strict."""
    if not tensors:
        raise LoRAError(f"LoRA {source} holds no tensors.")
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        module, role = _split_key(key, source)
        grouped.setdefault(module, {})[role] = tensor
    _named_hint(source, metadata, list(grouped))

    kohya_names = {name.replace(".", "_"): name for name in targets}
    peft_alpha = _peft_alpha(metadata, source)
    ignored: dict[str, list[str]] = {}
    pieces: dict[str, list[tuple[_Place, str, Tensor, Tensor, float]]] = {}
    unknown, misshaped = [], []
    for module, roles in grouped.items():
        encoder = _text_encoder(module)
        if encoder is not None:
            ignored.setdefault(encoder, []).append(module)
            continue
        place = _place(module, targets, kohya_names)
        if place is None:
            unknown.append(module)
            continue
        if "down" not in roles or "up" not in roles:
            half = "down (A)" if "down" not in roles else "up (B)"
            raise LoRAError(f"LoRA {source}: module {module!r} has no {half} factor.")
        down, up = roles["down"], roles["up"]
        target = targets[place.target]
        rows = (
            target.part_rows(place.first_part, place.num_parts)
            if place.first_part is not None
            else slice(0, target.out_features)
        )
        expected_up = rows.stop - rows.start
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            misshaped.append(
                f"{module}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                "(rank, in) / (out, rank) pair"
            )
            continue
        if down.shape[1] != target.in_features or up.shape[0] != expected_up:
            misshaped.append(
                f"{module}: down {tuple(down.shape)}, up {tuple(up.shape)}; {place.target} needs "
                f"(rank, {target.in_features}) and ({expected_up}, rank)"
            )
            continue
        rank = down.shape[0]
        alpha, rslora = float(rank), False
        if "alpha" in roles:
            value = roles["alpha"]
            if value.numel() != 1:
                raise LoRAError(
                    f"LoRA {source}: {module}.alpha has shape {tuple(value.shape)}, not one number."
                )
            alpha = float(value.reshape(()).float())
        elif peft_alpha is not None:
            alpha, rslora = peft_alpha(module)
        if not math.isfinite(alpha):
            raise LoRAError(f"LoRA {source}: {module}.alpha is {alpha}, not a finite number.")
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        pieces.setdefault(place.target, []).append((place, module, down, up, scale))

    if unknown:
        shown = ", ".join(repr(m) for m in sorted(unknown)[:MAX_LISTED])
        more = f" (and {len(unknown) - MAX_LISTED} more)" if len(unknown) > MAX_LISTED else ""
        raise LoRAError(
            f"LoRA {source}: {len(unknown)} module(s) name no layer of the FLUX.1-dev transformer: "
            f"{shown}{more}. Expected kohya (lora_unet_double_blocks_0_img_attn_qkv), BFL "
            "(double_blocks.0.img_attn.qkv), diffusers (transformer.transformer_blocks.0.attn.to_q) or "
            "XLabs (double_blocks.0.processor.qkv_lora1) names."
        )
    if misshaped:
        hint = ""
        if len(misshaped) * 2 >= len(grouped) - sum(len(v) for v in ignored.values()):
            hint = (
                " Most layers do not fit: this LoRA is probably for another model "
                "(FLUX.2, SD3, a pruned FLUX)."
            )
        raise LoRAError(
            f"LoRA {source}: {len(misshaped)} layer(s) do not fit FLUX.1-dev: "
            + "; ".join(misshaped[:MAX_LISTED])
            + hint
        )
    layers = {name: _stack(targets[name], found, source) for name, found in pieces.items()}
    if not layers:
        raise LoRAError(
            f"LoRA {source} changes nothing in the FLUX.1-dev transformer (text-encoder layers only)."
        )
    layouts = tuple(sorted({place.layout for found in pieces.values() for place, *_ in found}))
    return ParsedLoRA(layers, layouts, ignored)


def _stack(target: Target, found: list, source: str) -> LowRank:
    """One update of a layer from its pieces: a whole-layer piece, or parts of a fused layer."""
    whole = [piece for piece in found if piece[0].first_part is None]
    if whole and len(found) > 1:
        names = ", ".join(module for _, module, *_ in found)
        raise LoRAError(f"LoRA {source}: the layer is given more than once ({names}).")
    seen: set[int] = set()
    downs, ups, scales = [], [], []
    for place, module, down, up, scale in found:
        if place.first_part is not None:
            covered = set(range(place.first_part, place.first_part + place.num_parts))
            if covered & seen:
                raise LoRAError(f"LoRA {source}: {module} repeats a part of the layer given by another key.")
            seen |= covered
            rows = target.part_rows(place.first_part, place.num_parts)
        else:
            rows = slice(0, target.out_features)
        full_up = torch.zeros(target.out_features, down.shape[0], dtype=torch.float32)
        block = up.float()
        if place.target in _SWAPPED_HALVES and place.layout == "diffusers":
            block = torch.cat(block.chunk(2, dim=0)[::-1], dim=0)
        full_up[rows] = block
        downs.append(down.float())
        ups.append(full_up)
        scales.append(torch.full((down.shape[0],), scale, dtype=torch.float32))
    return LowRank(torch.cat(downs), torch.cat(ups, dim=1), torch.cat(scales))
