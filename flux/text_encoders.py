"""The two prompt encoders FLUX needs: T5-XXL token features and the CLIP-L pooled vector.

Both run through transformers from local folders: the same hub repos as the official app (T5 from
``xlabs-ai/xflux_text_encoders``, CLIP from ``openai/clip-vit-large-patch14``), found or downloaded
by the caller. Loading is strict: the folder's config must be the expected model (a T5-small
folder would otherwise load and give meaningless features) and every weight must be in the file.
Prompts are padded to the maximum length with no attention mask, as the official encoders do: the
T5 features, and so the image, depend on that length, which is chosen per request (128-512).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flux.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

T5_MAX_LENGTHS = (128, 256, 384, 512)
CLIP_MAX_LENGTH = 77

# What the folders must hold (config values of google/t5-v1_1-xxl and the text half of CLIP ViT-L/14).
T5_XXL_CONFIG: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_layers": 24,
    "num_heads": 64,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
}
CLIP_L_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
}
# The CLIP repo holds the whole CLIP model; the text encoder leaves these weights unused.
CLIP_UNUSED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


class HFEmbedder(nn.Module):
    """A tokenizer plus a transformers encoder, returning one tensor per batch of prompts.

    ``block_lists`` declares the encoder's repeated layers (see :mod:`flux.repeated`), which the
    memory placement may stream one at a time.
    """

    def __init__(self, model: nn.Module, tokenizer, max_length: int, output_key: str):
        super().__init__()
        self.hf_module = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_key = output_key
        self.block_lists = tuple(
            f"hf_module.{path}"
            for path in ("encoder.block", "text_model.encoder.layers")
            if isinstance(_get(model, path), nn.ModuleList)
        )

    @property
    def device(self) -> torch.device:
        return next(self.hf_module.parameters()).device

    def forward(self, prompts: list[str], max_length: int | None = None) -> Tensor:
        encoding = self.tokenizer(
            list(prompts),
            truncation=True,
            max_length=max_length or self.max_length,
            return_length=False,
            return_overflowing_tokens=False,
            padding="max_length",
            return_tensors="pt",
        )
        outputs = self.hf_module(
            input_ids=encoding["input_ids"].to(self.device), attention_mask=None, output_hidden_states=False
        )
        return outputs[self.output_key]


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def check_config(config, expected: Mapping[str, Any], source: str, what: str) -> None:
    """Raise :class:`CheckpointError` naming every config value that is not the expected one."""
    wrong = [
        f"{key} = {getattr(config, key, None)!r} (expected {value!r})"
        for key, value in expected.items()
        if getattr(config, key, None) != value
    ]
    if wrong:
        raise CheckpointError(
            f"{source} is not {what}: its config has {'; '.join(wrong)}. Point the app at the right "
            "folder, or delete this one and download it again."
        )


def _check_loading(info: Mapping[str, Any], source: str, allowed_unused: tuple[str, ...] = ()) -> None:
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if not k.startswith(allowed_unused))
    mismatched = sorted(str(k) for k in info.get("mismatched_keys") or ())
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {label} weight(s): {', '.join(keys[:12])}")
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def _from_folder(loader, folder: Path, what: str, **kwargs):
    try:
        return loader(folder, local_files_only=True, **kwargs)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{folder} could not be loaded as {what} ({type(err).__name__}: {err}). It may be incomplete: "
            "delete it and download it again."
        ) from err


def load_t5(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = 512,
    expected: Mapping[str, Any] = T5_XXL_CONFIG,
) -> HFEmbedder:
    """T5 encoder from a local folder, returning ``last_hidden_state`` (B, max_length, d_model).

    ``expected`` are the config values the folder must have (T5-XXL v1.1 by default).
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    what = "the T5-XXL text encoder"
    config = _from_folder(T5Config.from_pretrained, folder, what)
    check_config(config, expected, str(folder), what)
    tokenizer = _from_folder(T5Tokenizer.from_pretrained, folder, what, max_length=max_length)
    model, info = _from_folder(
        T5EncoderModel.from_pretrained, folder, what, dtype=dtype, output_loading_info=True
    )
    _check_loading(info, str(folder))
    return HFEmbedder(model.to(device), tokenizer, max_length, "last_hidden_state")


def load_clip(
    folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    expected: Mapping[str, Any] = CLIP_L_TEXT_CONFIG,
) -> HFEmbedder:
    """CLIP text encoder from a local folder, returning ``pooler_output`` (B, hidden_size).

    The folder may hold a whole CLIP model (as the hub repo does): its vision weights are unused.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder = Path(folder)
    what = "the CLIP-L text encoder"
    config = _from_folder(CLIPTextConfig.from_pretrained, folder, what)
    check_config(config, expected, str(folder), what)
    tokenizer = _from_folder(CLIPTokenizer.from_pretrained, folder, what, max_length=CLIP_MAX_LENGTH)
    model, info = _from_folder(
        CLIPTextModel.from_pretrained, folder, what, dtype=dtype, output_loading_info=True
    )
    _check_loading(info, str(folder), CLIP_UNUSED_PREFIXES)
    return HFEmbedder(model.to(device), tokenizer, CLIP_MAX_LENGTH, "pooler_output")
