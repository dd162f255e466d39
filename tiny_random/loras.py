"""Synthetic LoRA files for a DiT, written in each layout people use, for tests and the tiny preset.

:func:`random_factors` makes low-rank factors on the official layer names; the ``write_*``
functions store the same factors as kohya, BFL/PEFT, diffusers and XLabs files. The key names
here are written out independently of the loader's tables (:mod:`flux.lora.layouts`), so a test
that reads these files back checks the loader against a second statement of each layout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn


@dataclass
class Factors:
    """One layer's LoRA: ``delta W = (alpha / rank) * up @ down``."""

    down: Tensor  # (rank, in)
    up: Tensor  # (out, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of every Linear of the model, by name."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    }


def random_factors(
    model: nn.Module,
    rank: int = 4,
    seed: int = 0,
    alpha: float | None = None,
    names: Iterable[str] | None = None,
    magnitude: float = 0.5,
) -> dict[str, Factors]:
    """Random factors for ``names`` (default: every Linear); alpha defaults to the rank."""
    shapes = linear_shapes(model)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name in names if names is not None else shapes:
        in_features, out_features = shapes[name]
        down = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        up = magnitude * torch.randn(out_features, rank, generator=generator) / rank**0.5
        out[name] = Factors(down, up, float(rank if alpha is None else alpha))
    return out


def write_kohya(path: Path, factors: dict[str, Factors], text_encoder_layers: int = 0) -> Path:
    """``lora_unet_<dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    tensors = {}
    for name, f in factors.items():
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = f.down.contiguous()
        tensors[f"{key}.lora_up.weight"] = f.up.contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(f.alpha)
    for index in range(text_encoder_layers):  # CLIP-L layers, which the app reports as ignored
        key = f"lora_te1_text_model_encoder_layers_{index}_self_attn_q_proj"
        tensors[f"{key}.lora_down.weight"] = torch.zeros(2, 8)
        tensors[f"{key}.lora_up.weight"] = torch.zeros(8, 2)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    return _save(path, tensors)


def write_bfl(path: Path, factors: dict[str, Factors], prefix: str = "diffusion_model.") -> Path:
    """The official names under ``prefix`` with PEFT's ``lora_A`` / ``lora_B`` and ``.alpha``."""
    tensors = {}
    for name, f in factors.items():
        tensors[f"{prefix}{name}.lora_A.weight"] = f.down.contiguous()
        tensors[f"{prefix}{name}.lora_B.weight"] = f.up.contiguous()
        tensors[f"{prefix}{name}.alpha"] = torch.tensor(f.alpha)
    return _save(path, tensors)


# The official layer -> diffusers' module names (and for fused layers, the parts in row order).
_DOUBLE = {
    "img_attn.qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn.qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn.proj": ["attn.to_out.0"],
    "txt_attn.proj": ["attn.to_add_out"],
    "img_mlp.0": ["ff.net.0.proj"],
    "img_mlp.2": ["ff.net.2"],
    "txt_mlp.0": ["ff_context.net.0.proj"],
    "txt_mlp.2": ["ff_context.net.2"],
    "img_mod.lin": ["norm1.linear"],
    "txt_mod.lin": ["norm1_context.linear"],
}
_SINGLE = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"],
    "modulation.lin": ["norm.linear"],
}
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}


def write_diffusers(path: Path, factors: dict[str, Factors], alpha_in: str = "keys") -> Path:
    """diffusers' names under ``transformer.``, fused layers split into their parts (each part its
    own copy of ``down`` and its rows of ``up``), ``norm_out`` with (scale, shift) halves.

    ``alpha_in``: ``"keys"`` (``.alpha`` tensors), ``"metadata"`` (PEFT's lora_adapter_metadata;
    needs one alpha for all) or ``"none"`` (alpha must then equal the rank)."""
    import json

    tensors = {}
    for name, f in factors.items():
        for module, down, up in _diffusers_parts(name, f):
            key = f"transformer.{module}"
            tensors[f"{key}.lora_A.weight"] = down.clone()
            tensors[f"{key}.lora_B.weight"] = up.contiguous()
            if alpha_in == "keys":
                tensors[f"{key}.alpha"] = torch.tensor(f.alpha)
    metadata = None
    if alpha_in == "metadata":
        alphas = {f.alpha for f in factors.values()}
        ranks = {f.rank for f in factors.values()}
        assert len(alphas) == 1 and len(ranks) == 1, "metadata holds one alpha and one rank"
        metadata = {
            "lora_adapter_metadata": json.dumps(
                {"transformer.lora_alpha": alphas.pop(), "transformer.r": ranks.pop()}
            )
        }
    elif alpha_in == "none":
        assert all(f.alpha == f.rank for f in factors.values()), "without alpha the scale is 1"
    return _save(path, tensors, metadata)


def _diffusers_parts(name: str, f: Factors):
    parts = name.split(".")
    if parts[0] in ("double_blocks", "single_blocks"):
        prefix = "transformer_blocks" if parts[0] == "double_blocks" else "single_transformer_blocks"
        table = _DOUBLE if parts[0] == "double_blocks" else _SINGLE
        modules = table[".".join(parts[2:])]
        out = f.up.shape[0]
        if len(modules) == 1:
            sizes = [out]
        elif len(modules) == 3:
            sizes = [out // 3] * 3
        else:  # linear1: q, k, v of the hidden size (its input size), then the MLP
            hidden = f.down.shape[1]
            sizes = [hidden] * 3 + [out - 3 * hidden]
        ups = torch.split(f.up, sizes, dim=0)
        return [(f"{prefix}.{parts[1]}.{m}", f.down, u) for m, u in zip(modules, ups, strict=True)]
    up = f.up
    if name == "final_layer.adaLN_modulation.1":
        shift, scale = up.chunk(2, dim=0)
        up = torch.cat([scale, shift], dim=0)
    return [(_TOP[name], f.down, up)]


def write_xlabs(path: Path, factors: dict[str, Factors]) -> Path:
    """x-flux's processor keys; only the layers XLabs trains (attention qkv and proj of both
    streams, a single block's q/k/v rows of linear1 and its linear2). No alpha: scale 1."""
    tensors = {}
    for name, f in factors.items():
        assert f.alpha == f.rank, "XLabs files carry no alpha: the scale is 1"
        kind, index, *rest = name.split(".")
        layer = ".".join(rest)
        up = f.up
        if kind == "double_blocks":
            part = {
                "img_attn.qkv": "qkv_lora1",
                "txt_attn.qkv": "qkv_lora2",
                "img_attn.proj": "proj_lora1",
                "txt_attn.proj": "proj_lora2",
            }[layer]
        elif layer == "linear1":
            hidden = f.down.shape[1]
            assert torch.count_nonzero(up[3 * hidden :]) == 0, "XLabs adapts only q, k, v of linear1"
            part, up = "qkv_lora", up[: 3 * hidden]
        else:
            part = {"linear2": "proj_lora"}[layer]
        tensors[f"{kind}.{index}.processor.{part}.down.weight"] = f.down.contiguous()
        tensors[f"{kind}.{index}.processor.{part}.up.weight"] = up.contiguous()
    return _save(path, tensors)


def xlabs_layers(model: nn.Module) -> list[str]:
    """The layers an XLabs LoRA can hold for ``model``."""
    double = ("_attn.qkv", "_attn.proj")
    single = (".linear1", ".linear2")
    return [
        name
        for name in linear_shapes(model)
        if (name.startswith("double_blocks.") and name.endswith(double))
        or (name.startswith("single_blocks.") and name.endswith(single))
    ]


def _save(path: Path, tensors: dict[str, Tensor], metadata: dict | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def write_example_loras(folder: Path, model: nn.Module) -> list[Path]:
    """Two small LoRAs for the tiny-random preset's picker (written once)."""
    folder = Path(folder)
    written = []
    style = folder / "tiny-style.safetensors"
    if not style.is_file():
        written.append(write_kohya(style, random_factors(model, rank=4, seed=11, alpha=2.0)))
    detail = folder / "tiny-detail.safetensors"
    if not detail.is_file():
        written.append(write_diffusers(detail, random_factors(model, rank=2, seed=12)))
    return written
