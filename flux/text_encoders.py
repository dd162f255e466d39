"""The two prompt encoders FLUX needs: T5-XXL token features and the CLIP-L pooled vector.

Both run through transformers, from the same hub sources as the official app (T5 from
``xlabs-ai/xflux_text_encoders``, CLIP from ``openai/clip-vit-large-patch14``) or local folders.
Prompts are padded to the maximum length with no attention mask, as the official encoders do: the
T5 features, and so the image, depend on that length, which is chosen per request (128-512).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flux.hub import WeightsNotFoundError, default_models_dir, format_size, hub_offline

logger = logging.getLogger(__name__)

T5_MAX_LENGTHS = (128, 256, 384, 512)
CLIP_MAX_LENGTH = 77


@dataclass(frozen=True)
class TextEncoderSource:
    """A transformers model folder on the hub, and its folder name under ``models/``."""

    repo_id: str
    local_name: str
    size_bytes: int
    description: str


T5_SOURCE = TextEncoderSource(
    "xlabs-ai/xflux_text_encoders", "xflux_text_encoders", 9_524_621_312, "the T5-XXL text encoder (bf16)"
)
CLIP_SOURCE = TextEncoderSource(
    "openai/clip-vit-large-patch14", "clip-vit-large-patch14", 1_710_540_580, "the CLIP ViT-L/14 text encoder"
)


class HFEmbedder(nn.Module):
    """A tokenizer plus a transformers encoder, returning one tensor per batch of prompts."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, output_key: str):
        super().__init__()
        self.hf_module = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.output_key = output_key

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


def resolve_text_encoder(
    source: TextEncoderSource, explicit: str | os.PathLike | None, models_dir: Path | None
) -> str:
    """A local folder (explicit, then ``models/<name>``) or the hub repo id to load from."""
    models_dir = Path(models_dir) if models_dir is not None else default_models_dir()
    if explicit is not None:
        if not Path(explicit).is_dir():
            raise WeightsNotFoundError(f"{source.description}: the folder {explicit} does not exist.")
        return str(explicit)
    local = models_dir / source.local_name
    if local.is_dir():
        return str(local)
    return source.repo_id


def _missing_text_encoder(
    source: TextEncoderSource, models_dir: Path | None, err: Exception
) -> WeightsNotFoundError:
    folder = (Path(models_dir) if models_dir else default_models_dir()) / source.local_name
    return WeightsNotFoundError(
        f"Cannot load {source.description} ({format_size(source.size_bytes)}) from the hub repo "
        f"{source.repo_id}: {err}\n  - download the repo (e.g. `hf download {source.repo_id} "
        f"--local-dir {folder}`) and the app will load it from {folder}"
    )


def load_t5(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = 512,
    path: str | os.PathLike | None = None,
    models_dir: Path | None = None,
) -> HFEmbedder:
    """T5-XXL encoder returning ``last_hidden_state`` (B, max_length, 4096)."""
    from transformers import T5EncoderModel, T5Tokenizer

    where = resolve_text_encoder(T5_SOURCE, path, models_dir)
    try:
        tokenizer = T5Tokenizer.from_pretrained(where, max_length=max_length, local_files_only=hub_offline())
        model = T5EncoderModel.from_pretrained(where, dtype=dtype, local_files_only=hub_offline())
    except OSError as err:
        raise _missing_text_encoder(T5_SOURCE, models_dir, err) from err
    return HFEmbedder(model.to(device), tokenizer, max_length, "last_hidden_state")


def load_clip(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    path: str | os.PathLike | None = None,
    models_dir: Path | None = None,
) -> HFEmbedder:
    """CLIP-L text encoder returning ``pooler_output`` (B, 768)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    where = resolve_text_encoder(CLIP_SOURCE, path, models_dir)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(
            where, max_length=CLIP_MAX_LENGTH, local_files_only=hub_offline()
        )
        model = CLIPTextModel.from_pretrained(where, dtype=dtype, local_files_only=hub_offline())
    except OSError as err:
        raise _missing_text_encoder(CLIP_SOURCE, models_dir, err) from err
    return HFEmbedder(model.to(device), tokenizer, CLIP_MAX_LENGTH, "pooler_output")
