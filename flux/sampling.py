"""Noise, the shifted flow-matching schedule, latent packing and the denoising loop.

The semantics follow the official PuLID-FLUX sampler, so the same seed and settings give the same
latents: noise is drawn by ``torch.randn`` with a generator on the target device, timesteps and
guidance are passed to the model in the latent dtype, and the Euler update uses the schedule's
Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flux.conventions import TOKEN_PIXELS, uses_true_cfg
from flux.model import Flux, IDInjection
from flux.step_cache import FirstBlockCache

LATENT_CHANNELS = 16


def get_noise(
    num_samples: int,
    height: int,
    width: int,
    device: torch.device | str,
    dtype: torch.dtype,
    seed: int,
) -> Tensor:
    """Initial latent noise (B, 16, 2*ceil(H/16), 2*ceil(W/16)) for an image of ``height`` x ``width``."""
    return torch.randn(
        num_samples,
        LATENT_CHANNELS,
        2 * math.ceil(height / TOKEN_PIXELS),
        2 * math.ceil(width / TOKEN_PIXELS),
        device=device,
        dtype=dtype,
        generator=torch.Generator(device=device).manual_seed(seed),
    )


def pack(latents: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4): 2x2 patches become tokens, channels-major within a token."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for an image of ``height`` x ``width`` pixels."""
    b, _, d = tokens.shape
    h, w = math.ceil(height / TOKEN_PIXELS), math.ceil(width / TOKEN_PIXELS)
    c = d // 4
    x = tokens.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h * 2, w * 2)


def image_ids(
    batch: int, latent_height: int, latent_width: int, device: torch.device | str = "cpu"
) -> Tensor:
    """Position ids (B, h*w, 3) of packed image tokens: (0, row, column)."""
    h, w = latent_height // 2, latent_width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
    return ids.reshape(1, h * w, 3).repeat(batch, 1, 1).to(device)


def text_ids(batch: int, length: int, device: torch.device | str = "cpu") -> Tensor:
    """Text tokens all sit at position zero."""
    return torch.zeros(batch, length, 3, device=device)


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    """The flow-matching schedule's shift of ``t`` by ``mu`` (BFL's formula; ``sigma`` 1 there)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def get_lin_function(
    x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15
) -> Callable[[float], float]:
    """The line through (x1, y1) and (x2, y2): the schedule's shift ``mu`` as a function of image tokens."""
    slope = (y2 - y1) / (x2 - x1)
    intercept = y1 - slope * x1
    return lambda x: slope * x + intercept


def get_schedule(
    num_steps: int,
    image_seq_len: int,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    shift: bool = True,
) -> list[float]:
    """``num_steps + 1`` timesteps from 1 to 0, shifted towards 1 for longer image sequences."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = get_lin_function(y1=base_shift, y2=max_shift)(image_seq_len)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def image_to_image_start(num_steps: int, strength: float) -> int:
    """The index in the schedule where image-to-image begins: ``int((1 - strength) * num_steps)``,
    BFL's rule. ``strength`` 1 starts from pure noise (text-to-image); any strength in (0, 1]
    leaves at least one step. (diffusers' ``num_steps - int(num_steps * strength)`` can differ by
    one step where the float products round differently.)"""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], not {strength!r}")
    return min(int((1.0 - strength) * num_steps), num_steps - 1)


def noised(latents: Tensor, noise: Tensor, t: float) -> Tensor:
    """Clean ``latents`` moved to time ``t`` of the flow: ``t * noise + (1 - t) * latents``, in
    the noise's dtype (the interpolation flow matching trains on; BFL's and diffusers' img2img)."""
    return t * noise + (1.0 - t) * latents.to(noise.dtype)


@dataclass
class Inpainting:
    """Keep what lies outside a mask on the photo's own path: after every step, the latents there
    are replaced by the photo's latents noised to that step's time with the same noise, through a
    mask in [0, 1] (1: repaint; values between feather the edge). At the last step (t = 0) they are
    the photo's latents themselves. All three tensors are packed like the latents (B or 1, L, 64).
    """

    latents: Tensor
    noise: Tensor
    mask: Tensor

    def blend(self, img: Tensor, t: float) -> Tensor:
        kept = noised(self.latents, self.noise, t)
        return self.mask * img + (1.0 - self.mask) * kept


@dataclass
class TextConditioning:
    """The prompt as the DiT sees it: T5 tokens, their (zero) ids and the CLIP pooled vector."""

    txt: Tensor
    txt_ids: Tensor
    vec: Tensor

    def expand(self, batch: int) -> TextConditioning:
        """The same prompt for each image of a batch (views of the one encoding, no copies)."""
        if self.txt.shape[0] == batch:
            return self
        return TextConditioning(
            txt=self.txt.expand(batch, -1, -1),
            txt_ids=self.txt_ids.expand(batch, -1, -1),
            vec=self.vec.expand(batch, -1),
        )


@dataclass
class StepInfo:
    """What a per-step callback gets: 0-based ``step`` of ``total``, and the latents after it
    (None once the step is reported to another process, where they stay behind)."""

    step: int
    total: int
    t_curr: float
    t_prev: float
    latents: Tensor | None


class GenerationCancelled(Exception):
    """Raised by a step callback to stop sampling; the caller decides what to show."""


def denoise(
    model: Flux,
    img: Tensor,
    img_ids: Tensor,
    cond: TextConditioning,
    timesteps: list[float],
    guidance: float = 4.0,
    *,
    neg_cond: TextConditioning | None = None,
    true_cfg: float = 1.0,
    cfg_start_step: int = 1,
    id_injection: IDInjection | None = None,
    neg_id_injection: IDInjection | None = None,
    id_start_step: int = 0,
    callback: Callable[[StepInfo], None] | None = None,
    step_cache: FirstBlockCache | None = None,
    inpainting: Inpainting | None = None,
) -> Tensor:
    """Euler integration of the flow from noise (t=1) to image latents (t=0).

    ``guidance`` is FLUX-dev's distilled guidance. True CFG (``true_cfg`` != 1, needs ``neg_cond``)
    runs a second, negative pass from step ``cfg_start_step`` on and mixes
    ``neg + true_cfg * (pos - neg)``. Identity conditioning is used from step ``id_start_step`` on:
    ``id_injection`` for the positive pass, ``neg_id_injection`` (the unconditional ID) for the
    negative one. ``callback`` runs after each step and may raise :class:`GenerationCancelled`.
    ``step_cache`` (made for this run only) may skip the later DiT blocks on steps that barely
    change (:mod:`flux.step_cache`); each branch of true CFG keeps its own state, and nothing is
    reused across the step where the ID starts. ``inpainting`` blends the latents after each
    step (:class:`Inpainting`), before ``callback`` sees them.
    """
    use_true_cfg = uses_true_cfg(true_cfg)
    if use_true_cfg and neg_cond is None:
        raise ValueError("true CFG needs a negative prompt conditioning (neg_cond)")
    batch = img.shape[0]
    guidance_vec = torch.full((batch,), guidance, device=img.device, dtype=img.dtype)
    total = len(timesteps) - 1
    for step, (t_curr, t_prev) in enumerate(zip(timesteps[:-1], timesteps[1:], strict=True)):
        t_vec = torch.full((batch,), t_curr, dtype=img.dtype, device=img.device)
        use_id = step >= id_start_step
        if step_cache is not None:
            step_cache.begin_step(step, total, id_starts=step == id_start_step and step > 0)
        pred = model(
            img=img,
            img_ids=img_ids,
            txt=cond.txt,
            txt_ids=cond.txt_ids,
            y=cond.vec,
            timesteps=t_vec,
            guidance=guidance_vec,
            id_injection=id_injection if use_id else None,
            **_cache_of(step_cache, "cond"),
        )
        if use_true_cfg and step >= cfg_start_step:
            neg_pred = model(
                img=img,
                img_ids=img_ids,
                txt=neg_cond.txt,
                txt_ids=neg_cond.txt_ids,
                y=neg_cond.vec,
                timesteps=t_vec,
                guidance=guidance_vec,
                id_injection=neg_id_injection if use_id else None,
                **_cache_of(step_cache, "uncond"),
            )
            pred = neg_pred + true_cfg * (pred - neg_pred)
        img = img + (t_prev - t_curr) * pred
        if inpainting is not None:
            img = inpainting.blend(img, t_prev)
        if callback is not None:
            callback(StepInfo(step=step, total=total, t_curr=t_curr, t_prev=t_prev, latents=img))
    return img


def _cache_of(step_cache: FirstBlockCache | None, branch: str) -> dict:
    """The model's ``step_cache`` argument for one pass; none at all without a cache, so the call
    is the official one."""
    return {} if step_cache is None else {"step_cache": step_cache.branch(branch)}
