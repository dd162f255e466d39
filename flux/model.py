"""The FLUX.1 flow transformer (DiT) with one documented entry point for identity conditioning."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from flux.layers import (
    Attention,
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    SingleStreamBlock,
    timestep_embedding,
)
from flux.params import FluxParams


@runtime_checkable
class IDInjection(Protocol):
    """Extra residuals added to the image tokens between DiT blocks (the PuLID identity path).

    This is the only way anything but the base FLUX weights enters :meth:`Flux.forward`. Each
    method gets the image tokens (B, L_img, hidden) after a block and returns a residual of the
    same shape to add to them, or ``None`` to leave them as they are. The model keeps no reference
    to the object after the call, so nothing of one request stays in the model for the next.
    """

    def after_double_block(self, index: int, img: Tensor) -> Tensor | None: ...

    def after_single_block(self, index: int, img: Tensor) -> Tensor | None: ...


@runtime_checkable
class StepCache(Protocol):
    """Reuse of the later blocks' work across denoising steps (:mod:`flux.step_cache`).

    After the first double block (and its ID injection), :meth:`reuse` gets that block's residual on
    the image tokens and returns the stored residual of the remaining blocks to add instead of
    running them, or ``None`` to run them; a full pass ends with :meth:`store`. Like
    :class:`IDInjection`, the model keeps no reference to it after the call.
    """

    def reuse(self, first_residual: Tensor) -> Tensor | None: ...

    def store(self, first_residual: Tensor, rest_residual: Tensor) -> None: ...


class Flux(nn.Module):
    """Transformer for flow matching on packed latent sequences."""

    #: The repeated blocks in execution order (see :mod:`flux.repeated`): 19 double then 38 single.
    block_lists = ("double_blocks", "single_blocks")

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.in_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(
                f"hidden_size {params.hidden_size} must be divisible by num_heads {params.num_heads}"
            )
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dimension {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=256, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(
                self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias
            )
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)

    def forward(
        self,
        img: Tensor,
        img_ids: Tensor,
        txt: Tensor,
        txt_ids: Tensor,
        timesteps: Tensor,
        y: Tensor,
        guidance: Tensor | None = None,
        id_injection: IDInjection | None = None,
        step_cache: StepCache | None = None,
        attention: Attention | None = None,
    ) -> Tensor:
        """Predict the flow for packed latents ``img`` (B, L_img, in_channels).

        The keyword arguments are the official ones; ``id_injection`` (see :class:`IDInjection`)
        replaces the official ``id``/``id_weight`` pair. With ``id_injection=None`` this is exactly
        the base FLUX model. ``step_cache`` (see :class:`StepCache`) may skip every block after the
        first; without one, or when it does not skip, the computation is unchanged.
        ``attention``: how the blocks attend (default :func:`flux.math.attention`); the tokens of
        one rank under sequence parallelism attend through :class:`flux.parallel.UlyssesAttention`.
        """
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must have 3 dimensions (batch, tokens, channels)")
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("guidance strength is required by the guidance-distilled model")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attend = {} if attention is None else {"attend": attention}  # none: the official call

        embedded = img
        for index, block in enumerate(self.double_blocks):
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, **attend)
            if id_injection is not None:
                residual = id_injection.after_double_block(index, img)
                if residual is not None:
                    img = img + residual
            if index == 0 and step_cache is not None:
                first_residual = img - embedded
                cached = step_cache.reuse(first_residual)
                if cached is not None:
                    return self.final_layer(img + cached, vec)
                after_first = img

        num_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for index, block in enumerate(self.single_blocks):
            x = block(x, vec=vec, pe=pe, **attend)
            if id_injection is not None:
                residual = id_injection.after_single_block(index, x[:, num_txt:])
                if residual is not None:
                    x = torch.cat((x[:, :num_txt], x[:, num_txt:] + residual), dim=1)
        img = x[:, num_txt:]
        if step_cache is not None:
            step_cache.store(first_residual, img - after_first)
        return self.final_layer(img, vec)
