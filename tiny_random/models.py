"""Tiny random-weight versions of every FLUX component, for tests and the ``tiny-random`` preset.

They keep the official structure (every block type and key pattern) at a size that runs on a CPU
in milliseconds. Their output is noise: they exist to exercise the real code paths without
downloading anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from flux.autoencoder import AutoEncoderParams
from flux.model import FluxParams
from flux.text_encoders import HFEmbedder, load_clip, load_t5

WORDS = ["a", "photo", "of", "woman", "man", "portrait", "cinematic", "color", "in", "snow", "the", "with"]
TINY_T5_DIM = 24
TINY_CLIP_DIM = 16
# The architecture of the tiny encoders: what their loaders expect in place of T5-XXL's and CLIP-L's.
TINY_T5_CONFIG = dict(
    d_model=TINY_T5_DIM, d_kv=8, d_ff=48, num_layers=2, num_heads=3, feed_forward_proj="gated-gelu"
)
TINY_CLIP_CONFIG = dict(
    hidden_size=TINY_CLIP_DIM,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
)


def tiny_flux_params(**overrides) -> FluxParams:
    values = dict(
        in_channels=64,
        vec_in_dim=TINY_CLIP_DIM,
        context_in_dim=TINY_T5_DIM,
        hidden_size=64,
        mlp_ratio=4.0,
        num_heads=2,
        depth=2,
        depth_single_blocks=3,
        axes_dim=[8, 12, 12],
        theta=10_000,
        qkv_bias=True,
        guidance_embed=True,
    )
    values.update(overrides)
    return FluxParams(**values)


def tiny_ae_params(**overrides) -> AutoEncoderParams:
    values = dict(
        resolution=32,
        in_channels=3,
        ch=32,
        out_ch=3,
        ch_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        z_channels=16,
        scale_factor=0.3611,
        shift_factor=0.1159,
    )
    values.update(overrides)
    return AutoEncoderParams(**values)


def tiny_t5_tokenizer():
    """A unigram T5 tokenizer over a few words (ids stay below 16, valid for any T5 vocabulary)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [
        (f"\u2581{w}", -float(i + 1)) for i, w in enumerate(WORDS)
    ]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def write_tiny_t5(folder: Path, seed: int = 0) -> Path:
    """A T5 encoder (2 layers, width 24) and :func:`tiny_t5_tokenizer`, saved to ``folder``."""
    from transformers import T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_t5_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), relative_attention_num_buckets=8, **TINY_T5_CONFIG)
    T5EncoderModel(config).save_pretrained(folder)
    return folder


def tiny_clip_tokenizer():
    """A CLIP BPE tokenizer whose merges spell a few words (ids stay small)."""
    from transformers import CLIPTokenizer

    letters = sorted(set("".join(WORDS)))
    tokens = [
        "<|startoftext|>",
        "<|endoftext|>",
        *letters,
        *(c + "</w>" for c in letters),
        *(w + "</w>" for w in WORDS),
    ]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    merges = []
    for word in WORDS:  # merge left to right until the word is one token
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A CLIP text encoder (2 layers, width 16) and :func:`tiny_clip_tokenizer`, saved to ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_clip_tokenizer()
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        **TINY_CLIP_CONFIG,
        projection_dim=8,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    CLIPTextModel(config).save_pretrained(folder)
    return folder


def written_once(target: Path, write: Callable[[Path], object]) -> None:
    """``write(folder)`` into ``target`` unless it exists, atomically: the files are written in a
    folder of this process's own and renamed into place, so processes starting together (ranks,
    replicas) never read a half-written folder."""
    target = Path(target)
    if target.is_dir():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        write(staging)
        os.rename(staging, target)  # fails if another process got there first: theirs is whole
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def tiny_text_encoders(
    folder: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[HFEmbedder, HFEmbedder]:
    """Write (once) and load the tiny T5 and CLIP through the real loaders."""
    t5_dir, clip_dir = Path(folder) / "t5", Path(folder) / "clip"
    written_once(t5_dir, write_tiny_t5)
    written_once(clip_dir, write_tiny_clip)
    t5 = load_t5(t5_dir, device, dtype, max_length=512, expected=TINY_T5_CONFIG)
    clip = load_clip(clip_dir, device, dtype, expected=TINY_CLIP_CONFIG)
    return t5, clip
