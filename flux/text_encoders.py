"""The two prompt encoders FLUX needs: T5-XXL token features and the CLIP-L pooled vector.

Both run through transformers from local folders: the same hub repos as the official app (T5 from
``xlabs-ai/xflux_text_encoders``, CLIP from ``openai/clip-vit-large-patch14``), found or downloaded
by the caller. Loading is strict: the folder's config must be the expected model (a T5-small
folder would otherwise load and give meaningless features) and every weight must be in the file.
Both can also come from single files, as people on small cards have them (ComfyUI's
``t5xxl_fp16``/``t5xxl_fp8_e4m3fn`` and ``clip_l`` safetensors, city96's T5 GGUF files), with the
tokenizer from a small folder of tokenizer files: :func:`load_t5_file`, :func:`load_clip_file`.
Prompts are padded to the maximum length with no attention mask, as the official encoders do: the
T5 features, and so the image, depend on that length, which is chosen per request (128-512).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from flux.checkpoint import CheckpointError

logger = logging.getLogger(__name__)

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
# A single CLIP-L file has no config: the model is built from the hub config's text values, the
# token ids included (they choose the pooled token).
CLIP_L_FILE_CONFIG: dict[str, Any] = {
    **CLIP_L_TEXT_CONFIG,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
# The CLIP repo holds the whole CLIP model; the text encoder leaves these weights unused.
CLIP_UNUSED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")
# llama.cpp's T5 tensor names -> transformers' (applied in order, as substring replacements).
T5_GGUF_NAMES = (
    ("enc.", "encoder."),
    (".blk.", ".block."),
    ("token_embd", "shared"),
    ("output_norm", "final_layer_norm"),
    ("attn_q", "layer.0.SelfAttention.q"),
    ("attn_k", "layer.0.SelfAttention.k"),
    ("attn_v", "layer.0.SelfAttention.v"),
    ("attn_o", "layer.0.SelfAttention.o"),
    ("attn_norm", "layer.0.layer_norm"),
    ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
    ("ffn_up", "layer.1.DenseReluDense.wi_1"),
    ("ffn_down", "layer.1.DenseReluDense.wo"),
    ("ffn_gate", "layer.1.DenseReluDense.wi_0"),
    ("ffn_norm", "layer.1.layer_norm"),
)
T5_GGUF_ARCHITECTURES = ("t5", "t5encoder")
T5_TIED = {"encoder.embed_tokens.weight": "shared.weight"}


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

    model, tokenizer = _load_folder(
        folder,
        "the T5-XXL text encoder",
        (T5Config, T5Tokenizer, T5EncoderModel),
        expected,
        dtype,
        max_length,
    )
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

    model, tokenizer = _load_folder(
        folder,
        "the CLIP-L text encoder",
        (CLIPTextConfig, CLIPTokenizer, CLIPTextModel),
        expected,
        dtype,
        CLIP_MAX_LENGTH,
        unused_prefixes=CLIP_UNUSED_PREFIXES,
    )
    return HFEmbedder(model.to(device), tokenizer, CLIP_MAX_LENGTH, "pooler_output")


def _load_folder(
    folder: str | os.PathLike,
    what: str,
    classes: tuple[Any, Any, Any],
    expected: Mapping[str, Any],
    dtype: torch.dtype,
    max_length: int,
    unused_prefixes: tuple[str, ...] = (),
) -> tuple[Any, Any]:
    """A transformers encoder and its tokenizer from ``folder``, strictly: the config checked
    against ``expected`` first, then every weight present and none unexpected (but for
    ``unused_prefixes``). ``classes``: its config, tokenizer and model classes."""
    config_class, tokenizer_class, model_class = classes
    folder = Path(folder)
    config = _from_folder(config_class.from_pretrained, folder, what)
    check_config(config, expected, str(folder), what)
    tokenizer = _from_folder(tokenizer_class.from_pretrained, folder, what, max_length=max_length)
    model, info = _from_folder(
        model_class.from_pretrained, folder, what, dtype=dtype, output_loading_info=True
    )
    _check_loading(info, str(folder), unused_prefixes)
    return model, tokenizer


def t5_gguf_name(key: str) -> str:
    """The transformers name of a tensor of a llama.cpp T5 GGUF (``enc.blk.0.attn_q.weight`` ->
    ``encoder.block.0.layer.0.SelfAttention.q.weight``)."""
    for old, new in T5_GGUF_NAMES:
        key = key.replace(old, new)
    return key


def open_t5_file(path: str | os.PathLike):
    """A single T5 file opened under transformers' names (GGUF names mapped; other models refused)."""
    from flux.checkpoint import RenamedFile
    from flux.strict_load import open_checkpoint

    file = open_checkpoint(path)
    if file.kind == "gguf":
        file.expect_architecture(T5_GGUF_ARCHITECTURES, "the T5-XXL text encoder")
        file = RenamedFile(file, t5_gguf_name)
    return file


def encoder_file_format(file):
    """GGUF, fp8 (weight-only: T5's activations have outliers that per-token fp8 would flatten) or plain."""
    from flux.quant.stored import format_for_file

    return format_for_file(file, _t5_fp8_linears, "dequantize")


def _t5_fp8_linears(module: nn.Module, header) -> list[str]:
    """The Linears an fp8 file keeps in fp8, except T5's feed-forward outputs (``wo``): transformers'
    T5 casts the activations to ``wo``'s weight dtype, which would make them fp8 (upcast at load
    instead: 1 GB more for T5-XXL)."""
    from flux.quant.fp8_file import fp8_weight_names

    return [name for name in fp8_weight_names(module, header) if not name.endswith("DenseReluDense.wo")]


def load_t5_file(
    path: str | os.PathLike,
    tokenizer_folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    max_length: int = 512,
    expected: Mapping[str, Any] = T5_XXL_CONFIG,
) -> HFEmbedder:
    """T5 encoder from one file: safetensors (bf16, fp16, fp8 e4m3fn, scaled or not) or GGUF.

    GGUF names are llama.cpp's (mapped by :func:`t5_gguf_name`); its quantised Linears stay
    quantised, fp8 Linears stay fp8 and are upcast as they run. The model is built from
    ``expected`` (T5-XXL v1.1), so every weight of that architecture must be in the file.
    """
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    from flux.strict_load import load_checkpoint_strict

    file = open_t5_file(path)
    tokenizer = _from_folder(
        T5Tokenizer.from_pretrained, Path(tokenizer_folder), "the T5 tokenizer", max_length=max_length
    )
    with torch.device("meta"):
        model = T5EncoderModel(T5Config(**expected)).to(dtype)
    logger.info("Loading the T5 encoder from %s (%s)", path, file.kind)
    load_checkpoint_strict(
        model, file, device=device, dtype=dtype, fmt=encoder_file_format(file), hint=_t5_hint, tied=T5_TIED
    )
    model.encoder.embed_tokens.weight = model.shared.weight  # one table, as in the model's own tie
    return HFEmbedder(model, tokenizer, max_length, "last_hidden_state")


def _t5_hint(keys: set[str]) -> str:
    if any(k.startswith("decoder.") for k in keys):
        return "This file holds a whole T5 (encoder and decoder): use an encoder-only file."
    if any(k.startswith("text_model.") for k in keys):
        return "This looks like a CLIP text encoder, not T5."
    return ""


def clip_file_name(model_keys: set[str]) -> Callable[[str], str | None]:
    """File key -> the model's key for a CLIP-L single file (``text_model.`` names; vision and
    projection weights dropped). Newer transformers drop the ``text_model.`` level from the model."""
    nested = any(k.startswith("text_model.") for k in model_keys)

    def rename(key: str) -> str | None:
        if key.startswith(CLIP_UNUSED_PREFIXES) or key.endswith("position_ids"):
            return None
        if not nested and key.startswith("text_model."):
            return key[len("text_model.") :]
        return key

    return rename


def load_clip_file(
    path: str | os.PathLike,
    tokenizer_folder: str | os.PathLike,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    expected: Mapping[str, Any] = CLIP_L_FILE_CONFIG,
) -> HFEmbedder:
    """CLIP-L text encoder from one safetensors file (fp16/bf16/fp32 or fp8), e.g. ComfyUI's ``clip_l``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from flux.checkpoint import RenamedFile
    from flux.strict_load import load_checkpoint_strict, open_checkpoint

    tokenizer = _from_folder(
        CLIPTokenizer.from_pretrained,
        Path(tokenizer_folder),
        "the CLIP tokenizer",
        max_length=CLIP_MAX_LENGTH,
    )
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig(**expected)).to(dtype)
    file = open_checkpoint(path)
    if file.kind == "gguf":
        raise CheckpointError(
            f"{path}: CLIP-L is read from safetensors files only (e.g. clip_l.safetensors)."
        )
    file = RenamedFile(file, clip_file_name(set(model.state_dict())))
    logger.info("Loading the CLIP text encoder from %s", path)
    for module in model.modules():  # a buffer files do not hold (not persistent): 0, 1, 2... per position
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            positions = torch.arange(ids.shape[-1], device=device).expand(tuple(ids.shape))
            module.register_buffer("position_ids", positions, persistent=False)
    load_checkpoint_strict(model, file, device=device, dtype=dtype, fmt=encoder_file_format(file))
    return HFEmbedder(model, tokenizer, CLIP_MAX_LENGTH, "pooler_output")
