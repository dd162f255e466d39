"""PuLID-FLUX identity encoder (IDFormer) and the cross-attention blocks it feeds into the DiT.

Module and parameter names follow the official ``pulid/encoders_flux.py`` exactly, so the released
``pulid_flux_v0.9.x.safetensors`` loads strictly: ``pulid_encoder.*`` (IDFormer) and
``pulid_ca.{i}.*`` (one PerceiverAttentionCA per insertion point). Defaults are the released
sizes; keyword arguments shrink them for tests.

Attention follows the official arithmetic order exactly (q and k each scaled by
``dim_head ** -0.25``, the product in the input dtype, softmax in float32, cast back), so bf16
results match the official code; the key/value sequences are only 32 to 1,000 tokens long, so a
fused kernel would save little.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

NUM_VIT_FEATURES = 5  # EVA-CLIP hidden states consumed, one group of IDFormer layers each
DOUBLE_INTERVAL = 2  # a cross-attention after every 2nd double block ...
SINGLE_INTERVAL = 4  # ... and after every 4th single block


def feed_forward(dim: int, mult: float = 4) -> nn.Sequential:
    """Pre-norm GELU MLP without biases; indices 0/1/3 carry the official key names."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


def _mapping_mlp(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-LN-LeakyReLU x2 then Linear (keys .0 .1 .3 .4 .6), as the official mappings."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, hidden),
        nn.LayerNorm(hidden),
        nn.LeakyReLU(),
        nn.Linear(hidden, out_dim),
    )


class _Perceiver(nn.Module):
    """Shared parameters of both perceiver attentions: norm1 (context), norm2 (queries), projections."""

    def __init__(self, dim: int, dim_head: int, heads: int, kv_dim: int | None) -> None:
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        kv_dim = dim if kv_dim is None else kv_dim
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _attend(self, queries: Tensor, context: Tensor) -> Tensor:
        """Multi-head attention of normalised ``queries`` over normalised ``context``."""
        b, n, _ = queries.shape
        q = self.to_q(queries).view(b, n, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, self.dim_head).transpose(1, 2)
        # The official arithmetic, step for step, so bf16 results match it: q and k each scaled by
        # dim_head ** -0.25, the product in the input dtype, softmax in float32 and cast back.
        scale = 1 / math.sqrt(math.sqrt(self.dim_head))
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        out = torch.softmax(weight.float(), dim=-1).type(weight.dtype) @ v
        return self.to_out(out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head))


class PerceiverAttention(_Perceiver):
    """IDFormer layer attention: latents attend over [context, latents] (perceiver resampler)."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8, kv_dim: int | None = None) -> None:
        super().__init__(dim, dim_head, heads, kv_dim)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        """x: context (B, N, kv_dim); latents: (B, M, dim) -> update for the latents (B, M, dim)."""
        latents = self.norm2(latents)
        return self._attend(latents, torch.cat((self.norm1(x), latents), dim=-2))


class PerceiverAttentionCA(_Perceiver):
    """DiT-side cross-attention: image tokens query the ID tokens; the caller adds the result.

    Called as ``ca(id_tokens, image_tokens)`` like the official code: ``x`` (B, 32, kv_dim) gives
    keys/values, ``latents`` (B, L, dim) are the queries; returns (B, L, dim).
    """

    def __init__(
        self, *, dim: int = 3072, dim_head: int = 128, heads: int = 16, kv_dim: int | None = 2048
    ) -> None:
        super().__init__(dim, dim_head, heads, kv_dim)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        return self._attend(self.norm2(latents), self.norm1(x))


class IDFormer(nn.Module):
    """Maps an ID vector and five EVA-CLIP hidden states to ``num_queries`` ID tokens for the DiT.

    ``id_cond`` is [ArcFace 512-d, L2-normalised EVA pooled 768-d] = 1280-d (``id_dim``); each
    hidden state (B, 577, ``vit_dim``) goes through its own ``mapping_i`` and serves as context for
    ``depth // 5`` consecutive perceiver layers. ``mapping_dim`` is the official hard-coded 1024.
    """

    def __init__(
        self,
        dim: int = 1024,
        depth: int = 10,
        dim_head: int = 64,
        heads: int = 16,
        num_id_token: int = 5,
        num_queries: int = 32,
        output_dim: int = 2048,
        ff_mult: float = 4,
        *,
        id_dim: int = 1280,
        vit_dim: int = 1024,
        mapping_dim: int = 1024,
    ) -> None:
        super().__init__()
        if depth % NUM_VIT_FEATURES:
            raise ValueError(f"IDFormer depth {depth} must be a multiple of {NUM_VIT_FEATURES}")
        self.num_id_token = num_id_token
        self.dim = dim
        self.num_queries = num_queries
        self.layers_per_feature = depth // NUM_VIT_FEATURES
        self.latents = nn.Parameter(torch.empty(1, num_queries, dim))
        self.proj_out = nn.Parameter(torch.empty(dim, output_dim))
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                    feed_forward(dim, ff_mult),
                ]
            )
            for _ in range(depth)
        )
        for i in range(NUM_VIT_FEATURES):
            setattr(self, f"mapping_{i}", _mapping_mlp(vit_dim, mapping_dim, dim))
        self.id_embedding_mapping = _mapping_mlp(id_dim, mapping_dim, dim * num_id_token)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official init of the two free parameters: N(0, 1/dim)."""
        scale = self.dim**-0.5
        with torch.no_grad():
            self.latents.normal_(0.0, scale)
            self.proj_out.normal_(0.0, scale)

    def forward(self, id_cond: Tensor, vit_hidden: Sequence[Tensor]) -> Tensor:
        """id_cond (B, id_dim), or (B, K, id_dim) for K images; 5 x (B, N, vit_dim) -> (B, Q, output_dim)."""
        if len(vit_hidden) != NUM_VIT_FEATURES:
            raise ValueError(f"IDFormer needs {NUM_VIT_FEATURES} EVA hidden states, got {len(vit_hidden)}")
        batch = id_cond.shape[0]
        num_images = id_cond.shape[1] if id_cond.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(id_cond)
        id_tokens = id_tokens.reshape(batch, self.num_id_token * num_images, self.dim)
        latents = torch.cat((self.latents.expand(batch, -1, -1), id_tokens), dim=1)
        for i, hidden in enumerate(vit_hidden):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(hidden)), dim=1)
            start = i * self.layers_per_feature
            for attn, ff in self.layers[start : start + self.layers_per_feature]:
                latents = attn(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, : self.num_queries] @ self.proj_out


def num_pulid_ca(
    depth: int,
    depth_single: int,
    double_interval: int = DOUBLE_INTERVAL,
    single_interval: int = SINGLE_INTERVAL,
) -> int:
    """Number of cross-attention modules: one per ``interval`` double and single blocks (20 for FLUX-dev)."""
    return math.ceil(depth / double_interval) + math.ceil(depth_single / single_interval)


class PuLIDWeights(nn.Module):
    """Everything in ``pulid_flux_v0.9.x.safetensors``: ``pulid_encoder`` and ``pulid_ca.{i}``.

    ``num_ca`` defaults to FLUX.1-dev's 19 double / 38 single blocks; ``encoder_kwargs`` and
    ``ca_kwargs`` shrink the modules for tests.
    """

    def __init__(
        self,
        num_ca: int | None = None,
        *,
        encoder_kwargs: dict | None = None,
        ca_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        num_ca = num_pulid_ca(19, 38) if num_ca is None else num_ca
        self.pulid_encoder = IDFormer(**(encoder_kwargs or {}))
        self.pulid_ca = nn.ModuleList(PerceiverAttentionCA(**(ca_kwargs or {})) for _ in range(num_ca))


def load_pulid_weights(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.bfloat16,
    num_ca: int | None = None,
    encoder_kwargs: dict | None = None,
    ca_kwargs: dict | None = None,
) -> PuLIDWeights:
    """Build on the meta device and fill strictly from a PuLID-FLUX safetensors file (eval mode)."""
    from flux.strict_load import load_checkpoint_strict

    with torch.device("meta"):
        weights = PuLIDWeights(num_ca, encoder_kwargs=encoder_kwargs, ca_kwargs=ca_kwargs)
    load_checkpoint_strict(weights, path, device=device, dtype=dtype)
    return weights.eval().requires_grad_(False)
